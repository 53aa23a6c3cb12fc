"""GNU ``tar``: the one place that says how archives are made, listed and extracted.

The proxy creates, the store lists and extracts; both take their argv from
here so an archive is always read back with the options it was made with.

Create (the proxy; the archive goes to stdout, into ``zstd -T0 -q -c``)::

    tar --create --file=- --directory=SRC --format=posix --numeric-owner \\
        --xattrs --xattrs-include='*' --acls --sparse .

List (the store; the listing comes through a pipe, parsed line by line as it
arrives, never into a file and never whole into memory)::

    tar --list [--verbose --numeric-owner] --quoting-style=c --force-local \\
        --zstd --file=ARCHIVE

Extract (the store; only after the member list was checked, into a private
staging directory that restore hands over as ``/proc/self/fd/N``)::

    tar --extract --force-local --zstd --file=ARCHIVE --directory=STAGING \\
        --numeric-owner --same-owner --preserve-permissions \\
        --xattrs --xattrs-include='*' --acls --delay-directory-restore \\
        [--no-wildcards --anchored --null --verbatim-files-from --no-unquote --files-from=LIST]

Why these options:

* ``--format=posix`` (pax): nanosecond mtimes, names and link targets of any
  length and any bytes, xattrs and ACLs; the GNU format has none of these.
* ``--numeric-owner``: uid/gid as numbers. The proxy and the store do not share
  the first server's user database, so names would map to the wrong owners.
* ``--xattrs-include='*'``: on extract GNU tar restores only ``user.*``
  unless told otherwise; ``security.*`` and ``trusted.*`` need this (and root).
* ``--sparse``: a 64 GiB sparse file with 1 MiB of data is archived as 1 MiB
  and restored with its holes.
* ``.`` with ``--directory``: relative names (``./a/b``), and the ``./``
  member carries the root directory's own mode, owner, times, xattrs and ACL.
* ``--force-local``: a ``:`` in the archive path would otherwise make tar
  treat it as ``host:file`` and run rsh.
* ``--quoting-style=c``: every name and link target is one ``"..."`` string
  with C escapes (``\\n``, ``\\377``), so a name holding a newline, a quote
  or ``" -> "`` cannot be mistaken for another member or a link.
* ``--delay-directory-restore``: directory modes and times are set after all
  their contents, so a 0555 directory still receives its files and its mtime
  is not bumped by them.
* never ``--absolute-names``: without it GNU tar strips ``/`` and ``../``
  prefixes and creates symlinks that point outside the target only at the end,
  behind a placeholder (the store's member check refuses such archives anyway).
* ``--null --verbatim-files-from --no-unquote``: selected paths travel in a
  NUL-separated file, byte for byte: newlines, backslashes, non-UTF-8 bytes
  and a leading ``-`` mean nothing special.
* ``--listed-incremental=STATE --no-check-device`` (an incremental backup, issue 13):
  STATE is the previous backup's state file (absent: a level 0); the attached
  duplicate's device number changes every run, so devices are not compared.
  Extracting a level: ``--listed-incremental=/dev/null``, so the deletions it
  recorded are replayed in the staging tree. The state file's dump time is then
  rewritten to the freeze time (:func:`rewrite_dump_time`).
* no ``--index-file``: GNU tar ignores write errors on it, so on a full disk
  the listing was silently cut short. Read from tar's stdout, the listing is
  whole or the listing fails: tar's exit status is checked after the last
  line, and a last line without its newline is an error.
"""

from __future__ import annotations

import os
import queue
import re
import subprocess
import threading
from collections.abc import Generator, Iterable
from dataclasses import dataclass

from ..durable import read_bounded
from ..errors import CommandError
from ..pipeline import PipelineLike, Stage
from ..requirements import Requirement
from ..runner import Result, Runner

REQUIRES: tuple[Requirement, ...] = (
    # GNU tar, not any tar: doctor runs tar --version (busybox and bsdtar lack these options)
    Requirement("tar", "GNU tar", roles=("proxy", "store"),
                fails_without="cannot write, list, verify or restore backup archives",
                executables=("tar",)),
)

#: the longest listing line read: far above two PATH_MAX names C-escaped; a longer one is
#: refused rather than held in memory
MAX_LINE = 1 << 20

#: what ``create_argv`` puts between ``--directory`` and the ``.``
CREATE_OPTIONS: tuple[str, ...] = (
    "--format=posix", "--numeric-owner", "--xattrs", "--xattrs-include=*", "--acls", "--sparse",
)

#: what ``extract_argv`` asks for, whatever is selected
EXTRACT_OPTIONS: tuple[str, ...] = (
    "--numeric-owner", "--same-owner", "--preserve-permissions",
    "--xattrs", "--xattrs-include=*", "--acls", "--delay-directory-restore",
)

#: how selected members are named in a --files-from list (position-sensitive: before it)
_SELECT_OPTIONS: tuple[str, ...] = (
    "--no-wildcards", "--anchored", "--null", "--verbatim-files-from", "--no-unquote",
)

#: member kinds the listing shows in the first column of the mode string
REGULAR, DIRECTORY, HARDLINK, SYMLINK = "-", "d", "h", "l"
CHARDEV, BLOCKDEV, FIFO, CONTIGUOUS = "c", "b", "p", "C"
KNOWN_KINDS = frozenset({REGULAR, DIRECTORY, HARDLINK, SYMLINK, CHARDEV, BLOCKDEV, FIFO,
                         CONTIGUOUS})


#: what an incremental create adds before ``--`` (see :func:`incremental_options`)
NO_CHECK_DEVICE = "--no-check-device"
#: what extracting one level of an incremental chain adds: deletions are replayed
EXTRACT_INCREMENTAL = "--listed-incremental=/dev/null"

#: the largest state file (``--listed-incremental``) handled: tens of MiB for a big tree
MAX_SNAPSHOT_BYTES = 256 << 20
#: ``GNU tar-1.34-2\n``: format 2, the only one GNU tar has written since 1.16
_SNAPSHOT_HEAD = re.compile(rb"GNU tar-([0-9]{1,4}(?:\.[0-9]{1,4}){1,3})-2\n")
_DECIMAL = re.compile(rb"(0|[1-9][0-9]{0,18})\0")


def incremental_options(state_file: str | os.PathLike[str]) -> list[str]:
    """``--listed-incremental=STATE --no-check-device``: put before ``--`` in a create argv."""
    return [f"--listed-incremental={os.fspath(state_file)}", NO_CHECK_DEVICE]


def with_incremental(argv: list[str], state_file: str | os.PathLike[str] | None) -> list[str]:
    """``argv`` (a ``tar --create ... -- NAMES``) with :func:`incremental_options` before
    the ``--``; unchanged for None."""
    if state_file is None:
        return list(argv)
    cut = argv.index("--")
    return [*argv[:cut], *incremental_options(state_file), *argv[cut:]]


@dataclass(frozen=True)
class SnapshotHeader:
    """The head of a GNU tar state file (snapshot format 2): version and dump time."""

    version: str
    seconds: int
    nanoseconds: int
    #: the offset of the first directory record (just after the dump time)
    end: int


def parse_snapshot_header(data: bytes) -> SnapshotHeader:
    """The header of a ``--listed-incremental`` state file, checked strictly.

    ``GNU tar-<version>-2\n`` then the dump time as two NUL-terminated
    decimals (seconds, nanoseconds). Anything else (format 0 or 1, a sign,
    a leading zero, nanoseconds past 999999999, a missing NUL) is a ValueError:
    a state file is hostile input and a misread dump time silently skips files.
    """
    head = _SNAPSHOT_HEAD.match(data)
    if head is None:
        raise ValueError("not a GNU tar state file of format 2 (want 'GNU tar-VERSION-2'): "
                         f"{show(data[:40])}")
    sec = _DECIMAL.match(data, head.end())
    if sec is None:
        raise ValueError("state file: the dump time's seconds are not a NUL-terminated decimal")
    nsec = _DECIMAL.match(data, sec.end())
    if nsec is None:
        raise ValueError("state file: the dump time's nanoseconds are not a NUL-terminated "
                         "decimal")
    nanoseconds = int(nsec.group(1))
    if nanoseconds > 999_999_999:
        raise ValueError(f"state file: {nanoseconds} nanoseconds")
    return SnapshotHeader(head.group(1).decode(), int(sec.group(1)), nanoseconds, nsec.end())


def rewrite_dump_time(data: bytes, seconds: int, nanoseconds: int = 0) -> bytes:
    """``data`` (a state file) with its dump time set to ``seconds.nanoseconds``.

    tar records the time it *started*; files changed between the freeze and
    then would be skipped by the next level, silently. The freeze time (minus
    a margin for clock skew) is what this backup really holds.
    """
    if seconds < 0 or not 0 <= nanoseconds <= 999_999_999:
        raise ValueError(f"dump time {seconds}.{nanoseconds:09d} out of range")
    header = parse_snapshot_header(data)
    head = data[:data.index(b"\n") + 1]
    return head + b"%d\0%d\0" % (seconds, nanoseconds) + data[header.end:]


def rewrite_snapshot_file(path: str | os.PathLike[str], when: float) -> SnapshotHeader:
    """Rewrite the dump time of the state file at ``path`` to ``when`` (epoch seconds, never
    later than what tar wrote); returns the header as it was. The file is replaced whole."""
    with open(path, "rb") as f:
        data = read_bounded(f, MAX_SNAPSHOT_BYTES)
    if len(data) > MAX_SNAPSHOT_BYTES:
        raise ValueError(f"state file larger than {MAX_SNAPSHOT_BYTES} bytes")
    old = parse_snapshot_header(data)
    seconds = int(when)
    nanoseconds = round((when - seconds) * 1e9)
    if nanoseconds > 999_999_999:
        seconds, nanoseconds = seconds + 1, 0
    if (seconds, nanoseconds) > (old.seconds, old.nanoseconds):
        # never later than tar's own start: that would skip what changed before it
        seconds, nanoseconds = old.seconds, old.nanoseconds
    new = rewrite_dump_time(data, max(seconds, 0), nanoseconds)
    tmp = f"{os.fspath(path)}.rewrite"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with open(fd, "wb") as f:
        f.write(new)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return old


def create_argv(source_dir: str | os.PathLike[str], member: str = ".") -> list[str]:
    """``tar --create --file=- --directory=SRC <CREATE_OPTIONS> MEMBER``: the archive on stdout.

    MEMBER is ``.`` for a directory, or one file's name inside SRC (passed after
    ``--`` so a name starting with ``-`` stays a name). Pipe it into
    :func:`sanoffload.tools.zstd.compress_argv`. Exit 1 means "a file changed
    while read" (impossible on a frozen duplicate: treat as failure).
    """
    if member != "." and ("/" in member or member in ("", "..")):
        raise ValueError(f"tar member must be '.' or a plain file name, not {member!r}")
    return ["tar", "--create", "--file=-", f"--directory={os.fspath(source_dir)}",
            *CREATE_OPTIONS, "--", member]


def compare_argv(archive: str | os.PathLike[str], source_dir: str | os.PathLike[str]) -> list[str]:
    """``tar --diff --zstd --file=ARCHIVE --directory=SRC --numeric-owner``.

    Compares every member's contents, size, mode, owner, mtime and link target
    with the tree it was made from (the still-attached duplicate); exit 1 lists
    the differences.
    """
    return ["tar", "--diff", "--force-local", "--zstd", f"--file={os.fspath(archive)}",
            f"--directory={os.fspath(source_dir)}", "--numeric-owner"]


def list_argv(archive: str | bytes | os.PathLike[str],
              index_file: str | os.PathLike[str] | None = None, *,
              verbose: bool = True, zstd: bool = True) -> list[str]:
    """``tar --list [--verbose --numeric-owner] --quoting-style=c ... [--index-file=LISTING]``.

    One line per member, on stdout (``index_file`` None: see :func:`list_members`)
    or in LISTING (kept for the benchmark; a full disk cuts LISTING short unnoticed).
    """
    argv = ["tar", "--list"]
    if verbose:
        argv += ["--verbose", "--numeric-owner"]
    argv += ["--quoting-style=c", "--force-local"]
    if zstd:
        argv.append("--zstd")
    argv.append("--file=" + os.fsdecode(archive))
    if index_file is not None:
        argv.append(f"--index-file={os.fspath(index_file)}")
    return argv


def extract_argv(target: str | bytes | os.PathLike[str],
                 archive: str | bytes | os.PathLike[str] = "-", *,
                 zstd: bool = True,
                 files_from: str | bytes | os.PathLike[str] | None = None,
                 incremental: bool = False) -> list[str]:
    """``tar --extract --force-local --zstd --file=ARCHIVE --directory=TARGET <EXTRACT_OPTIONS>``.

    ``archive`` "-" reads stdin; ``zstd`` False when the stream is already
    decompressed. ``files_from``: a NUL-separated list of member names to
    extract (each with everything below it); None extracts everything. Paths
    may be bytes: the argv holds their ``os.fsdecode`` form, which the runner
    turns back into the same bytes.
    """
    argv = ["tar", "--extract", "--force-local"]
    if zstd:
        argv.append("--zstd")
    argv += ["--file=" + os.fsdecode(archive), "--directory=" + os.fsdecode(target),
             *EXTRACT_OPTIONS]
    if incremental:
        # one level of a chain: the deletions it recorded are replayed
        argv.append(EXTRACT_INCREMENTAL)
    if files_from is not None:
        argv += [*_SELECT_OPTIONS, "--files-from=" + os.fsdecode(files_from)]
    return argv


def list_members(runner: Runner, archive: str | bytes | os.PathLike[str], *,
                 timeout: float, stdin: int | None = None) -> Generator[Member, None, None]:
    """Every member of a stored ``.tar.zst``, in archive order, parsed as tar lists it.

    The verbose listing comes through a pipe and is parsed lazily: memory
    stays flat whatever the archive holds. tar reads (and zstd decompresses)
    the whole archive, so a damaged or truncated archive raises CommandError
    once the last line is read. A line that does not parse, is longer than
    MAX_LINE or lacks its newline at the end raises ValueError naming it
    (tar is killed). Closing the iterator early kills tar too. ``archive`` "-" reads
    ``stdin`` (a descriptor).
    """
    number, cut = 0, b""
    with runner.stream(list_argv(archive), timeout=timeout, stdin=stdin) as out:
        while line := out.readline(MAX_LINE + 1):
            number += 1
            if not line.endswith(b"\n"):
                if len(line) > MAX_LINE:
                    raise ValueError(f"listing line {number}: longer than {MAX_LINE} bytes: "
                                     f"{show(line[:120])}")
                # tar ends every line: its exit status (checked as the block ends) says why
                cut = line
                break
            yield parse_numbered(number, line)
    if cut:
        raise ValueError(f"listing line {number}: cut short: {show(cut[:120])}")


def count_members(runner: Runner, archive: str | bytes | os.PathLike[str], *,
                  timeout: float) -> int:
    """How many members a stored ``.tar.zst`` holds (a non-verbose listing, through a pipe).

    Also the test-read: tar reads the whole archive; a damaged block or a
    truncated stream raises CommandError. One line per member: newlines in
    names are escaped by ``--quoting-style=c``.
    """
    argv = list_argv(archive, verbose=False)
    count, last = 0, b"\n"
    with runner.stream(argv, timeout=timeout) as out:
        while chunk := out.read(1 << 20):
            count += chunk.count(b"\n")
            last = chunk[-1:]
    if last != b"\n":
        # tar ends every line; a cut one with exit status 0 means the listing is not whole
        raise CommandError(f"tar --list: the listing was cut short after {count} members",
                           argv=runner.mask_argv(argv), returncode=0)
    return count


class StreamCount:
    """The test-read done while the archive arrives: ``tar --list --zstd --file=-`` fed each
    chunk as it is written, counting members, so no second read follows the write.

    ::

        tar --list --quoting-style=c --force-local --zstd --file=-     (stdin: the chunks)

    tar's own ``zstd -d`` checks every block and each frame's content checksum,
    so a flipped byte anywhere fails the count; that one decode replaces
    ``zstd -t`` and a ``tar --list`` of the stored file (two decodes). The
    chunks go to tar from a thread of its own through a bounded queue, so the
    receiver never waits for the decode unless it is :data:`QUEUED` chunks
    ahead. A feed raises CommandError as soon as tar has stopped reading: a
    damaged archive fails early (tar exited non-zero), and bytes after tar's
    end-of-archive (which no sanoffload archive has) fail it as well.
    """

    #: chunks (of up to 1 MiB) held for tar at most: the memory the check may use
    QUEUED = 16

    def __init__(self, runner: Runner, *, timeout: float) -> None:
        self._runner = runner
        self._argv = list_argv("-", verbose=False)
        self._pipe: PipelineLike = runner.pipeline([Stage(self._argv)], timeout=timeout,
                                                   stdin=subprocess.PIPE)
        self.count = 0
        self._last = b"\n"
        self._finished = False
        self._stopped = threading.Event()  # tar closed its stdin: feeding is over
        self._queue: queue.Queue[bytes | None] = queue.Queue(self.QUEUED)
        self._reader = threading.Thread(target=self._drain, name="tar-list", daemon=True)
        self._reader.start()
        self._feeder = threading.Thread(target=self._feed_tar, name="tar-list-feed", daemon=True)
        self._feeder.start()

    def _drain(self) -> None:
        out = self._pipe.stdout
        try:
            while chunk := out.read(1 << 16):
                self.count += chunk.count(b"\n")
                self._last = chunk[-1:]
        except (OSError, ValueError):
            self._last = b""  # the pipe went under us (a kill): never a whole listing

    def _feed_tar(self) -> None:
        stdin = self._pipe.stdin
        assert stdin is not None
        while (data := self._queue.get()) is not None:
            if self._stopped.is_set():
                continue  # keep taking, so a put() never blocks on a dead tar
            try:
                stdin.write(data)
            except (BrokenPipeError, ValueError):
                self._stopped.set()
        try:
            stdin.close()
        except OSError:
            self._stopped.set()  # tar is gone: wait() says why

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Hand tar the next bytes of the compressed archive (waits only if it is far behind)."""
        if self._stopped.is_set():
            self._end()
            raise self._stopped_early()
        self._queue.put(bytes(data))

    def _stopped_early(self) -> CommandError:
        return CommandError("tar --list stopped reading before the end of the archive: "
                            "there are bytes after its end-of-archive marker",
                            argv=self._runner.mask_argv(self._argv), returncode=0)

    def finish(self) -> int:
        """Tell tar the archive is whole; its member count, or CommandError (damaged, cut)."""
        self._end()
        if self._stopped.is_set():
            raise self._stopped_early()
        if self._last != b"\n":
            raise CommandError(f"tar --list: the listing was cut short after {self.count} "
                               "members", argv=self._runner.mask_argv(self._argv), returncode=0)
        return self.count

    def _end(self) -> None:
        """Let the feeder finish, then tar; raise tar's own error if it failed."""
        if self._finished:
            return
        self._finished = True
        self._queue.put(None)
        self._feeder.join()
        # the reader ends at tar's EOF (its exit, or the deadline's kill); only then may
        # wait() close the pipe it reads
        self._reader.join()
        self._pipe.wait()

    def abort(self) -> None:
        """Stop the check (the backup is being given up): kill tar, reap it."""
        if self._finished:
            return
        self._finished = True
        self._pipe.kill()  # the feeder's next write fails: it drains the queue and ends
        self._stopped.set()
        self._queue.put(None)
        self._feeder.join()
        self._reader.join()  # the kill ended its input
        try:
            self._pipe.wait()
        except CommandError:
            pass  # killed on purpose


def extract(runner: Runner, archive: str | bytes | os.PathLike[str],
            target: str | bytes | os.PathLike[str], *, timeout: float,
            files_from: str | bytes | os.PathLike[str] | None = None,
            pass_fds: Iterable[int] = (), incremental: bool = False) -> Result:
    """Run :func:`extract_argv` on a stored ``.tar.zst`` (check its members first).

    ``target`` may be ``/proc/self/fd/N`` with N in ``pass_fds``: tar then
    extracts into the very directory that descriptor holds, whatever its path
    has become since.
    """
    return runner.run(extract_argv(target, archive, files_from=files_from,
                                   incremental=incremental), timeout=timeout, pass_fds=pass_fds)


def write_files_from(path: str | os.PathLike[str], names: Iterable[bytes]) -> None:
    """Write ``names`` as the NUL-separated list ``--null --files-from`` reads."""
    with open(path, "wb") as f:
        for name in names:
            if b"\0" in name:
                raise ValueError(f"NUL byte in a member name: {name!r}")
            f.write(name + b"\0")


# --------------------------------------------------------------------------
# The verbose listing
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class Member:
    """One archive member as GNU tar lists it (name and link as raw bytes)."""

    kind: str
    name: bytes
    #: symlink target (kind "l") or the member a hard link (kind "h") links to
    link: bytes | None = None

    @property
    def shown(self) -> str:
        """The name for messages: printable, one line."""
        return show(self.name)


def show(name: bytes) -> str:
    """A member name fit for a one-line message (escapes newlines and odd bytes)."""
    text = name.decode("utf-8", errors="backslashreplace")  # b"\xff" -> "\\xff"
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


# quotearg's C style: a backslash starts \\ \" \a \b \f \n \r \t \v \? or 1-3 octal digits
_C_TOKEN = re.compile(rb'[^"\\]+|\\[0-7]{1,3}|\\[\\"abfnrtv?]|"')
_C_SIMPLE = {b"\\": b"\\", b'"': b'"', b"a": b"\a", b"b": b"\b", b"f": b"\f", b"n": b"\n",
             b"r": b"\r", b"t": b"\t", b"v": b"\v", b"?": b"?"}
_SYMLINK_SEP = b' -> "'
_HARDLINK_SEP = b' link to "'


def _unquote_c(line: bytes, start: int) -> tuple[bytes, int]:
    """Decode the C-quoted string opening at ``line[start]``; return it and the index after."""
    if line[start:start + 1] != b'"':
        raise ValueError("expected a quoted name")
    out = bytearray()
    pos = start + 1
    while pos < len(line):
        m = _C_TOKEN.match(line, pos)
        if m is None:
            raise ValueError(f"bad escape at column {pos}")
        tok = m.group()
        pos = m.end()
        if tok == b'"':
            return bytes(out), pos
        if tok[0:1] != b"\\":
            out += tok
        elif tok[1:2].isdigit():
            value = int(tok[1:], 8)
            if value > 0xFF:
                raise ValueError(f"octal escape out of range: {tok!r}")
            out.append(value)
        else:
            out += _C_SIMPLE[tok[1:2]]
    raise ValueError("unterminated quoted name")


def parse_list_line(line: bytes) -> Member:
    """Parse one line of ``tar --list --verbose --numeric-owner --quoting-style=c``.

    ``drwxr-xr-x 0/0 0 2026-11-26 10:32 "./d/"``,
    ``lrwxrwxrwx 0/0 0 2026-11-26 10:32 "./l" -> "a b"``,
    ``hrw-r--r-- 0/0 0 2026-11-26 10:32 "./h" link to "./a b"``.
    Nothing before the name can hold a ``"`` (numeric owners, sizes, dates), so
    the first one opens the name. Raises ValueError for anything else
    (volume labels, multi-volume parts, unknown types).
    """
    line = line.rstrip(b"\n")
    quote = line.find(b'"')
    if quote < 0:
        raise ValueError("no quoted name")
    head = line[:quote].split()
    if len(head) < 4 or not head[0]:
        raise ValueError("too few columns before the name")
    kind = chr(head[0][0])
    if kind not in KNOWN_KINDS:
        raise ValueError(f"member type {kind!r} is not restorable")
    name, pos = _unquote_c(line, quote)
    link: bytes | None = None
    rest = line[pos:]
    if kind == SYMLINK:
        if not rest.startswith(_SYMLINK_SEP):
            raise ValueError("symlink without a target")
        link, pos = _unquote_c(line, pos + len(_SYMLINK_SEP) - 1)
    elif kind == HARDLINK:
        if not rest.startswith(_HARDLINK_SEP):
            raise ValueError("hard link without a target")
        link, pos = _unquote_c(line, pos + len(_HARDLINK_SEP) - 1)
    if line[pos:]:
        raise ValueError(f"unexpected text after the name: {line[pos:][:40]!r}")
    return Member(kind, name, link)


def parse_numbered(number: int, line: bytes) -> Member:
    """:func:`parse_list_line`, its ValueError naming the line (number and text, escaped)."""
    try:
        return parse_list_line(line)
    except ValueError as exc:
        text = show(line.rstrip(b"\n")[:120])
        raise ValueError(f"listing line {number}: {exc}: {text}") from None
