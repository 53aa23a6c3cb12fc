"""The repository: a directory of backups, written so that only complete ones are ever seen.

Layout::

    <repo>/<host>/<slug>/<timestamp>.tar.zst    the archive (tar | zstd), read-only
    <repo>/<host>/<slug>/<timestamp>.json       its manifest, written last: the commit

A backup is streamed to ``<timestamp>.tar.zst.partial``, fsynced, test-read,
published under its final name without replacing anything (link, then unlink
the partial name: a rename that cannot clobber), and the directory fsynced;
then the manifest goes the same way. A backup is listed only when both files
are there and the manifest reads back and names that very place, so a crash at
any point leaves at most a ``*.partial`` or an archive without a manifest:
both are ignored (:meth:`Repository.leftovers` names them).

Every name that reaches the filesystem is checked first (:func:`check_host`,
:func:`check_slug`, :func:`check_timestamp`): a strict ASCII charset, no ``/``,
no ``..``, no leading ``.`` or ``-``, bounded length, so nothing a sender or an
operator types can reach outside the repository.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import secrets
import stat
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

from ..errors import (CommandError, CommandNotFoundError, CommandTimeoutError, IntegrityError,
                      RefusedError, ResourceError, UsageError)
from ..runner import Runner
from ..tools import tar, zstd
from .manifest import (NOT_VERIFIED, VERIFIED_OK, VERIFY_FAILED, Manifest, Verification,
                       sender_fields, to_utc, utc_iso)

log = logging.getLogger(__name__)

ARCHIVE_SUFFIX = ".tar" + zstd.SUFFIX
MANIFEST_SUFFIX = ".json"
PARTIAL_SUFFIX = ".partial"
#: every read and write moves this much at a time
CHUNK = 1 << 20
#: a time limit for reading a whole archive: this floor, plus one second per RATE bytes
MIN_TIMEOUT = 3600.0
RATE = 8 << 20

_HOST_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_SLUG_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_TIMESTAMP_RE = re.compile(r"[0-9]{8}T[0-9]{6}Z")
TIMESTAMP_FORMAT = "%Y%m%dT%H%M%SZ"
# what a path keeps in its slug; the rest becomes "-"
_SLUG_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _check_name(kind: str, name: object, pattern: re.Pattern[str], limit: int) -> str:
    if not isinstance(name, str):
        raise RefusedError(f"invalid {kind}: not a string: {name!r}")
    # fullmatch: "$" would let a trailing newline through
    if not pattern.fullmatch(name) or ".." in name or name.endswith((PARTIAL_SUFFIX, ".")):
        raise RefusedError(f"invalid {kind} {name!r}: use 1-{limit} of A-Z a-z 0-9 . _ -, "
                           "starting with a letter or digit, without '..'")
    return name


def check_host(name: object) -> str:
    """A host name as a directory name: ``fs1``, ``fs1.example.org``."""
    return _check_name("host name", name, _HOST_RE, 63)


def check_slug(name: object) -> str:
    """An object slug as a directory name: ``srv-data-3f2a9c1e``."""
    return _check_name("object slug", name, _SLUG_RE, 100)


def check_timestamp(name: object) -> str:
    """A backup timestamp ``20261126T102933Z`` (UTC) naming a real instant."""
    if not isinstance(name, str) or not _TIMESTAMP_RE.fullmatch(name):
        raise RefusedError(f"invalid timestamp {name!r}: expected UTC like 20261126T102933Z")
    try:
        datetime.strptime(name, TIMESTAMP_FORMAT)
    except ValueError:
        raise RefusedError(f"invalid timestamp {name!r}: no such date or time") from None
    return name


def format_timestamp(when: datetime) -> str:
    """The timestamp naming a backup taken at ``when`` (aware), to the second, UTC."""
    return when.astimezone(timezone.utc).strftime(TIMESTAMP_FORMAT)


def parse_timestamp(name: str) -> datetime:
    return datetime.strptime(check_timestamp(name), TIMESTAMP_FORMAT).replace(
        tzinfo=timezone.utc)


def slug_for_path(path: str) -> str:
    """The slug of a backed-up path: readable, plus a hash so that no two paths share one.

    ``/srv/data`` -> ``srv-data-<8 hex>``; ``/`` -> ``root-<8 hex>``. ``/srv/data``
    and ``/srv-data`` read alike but hash apart, so they never share a directory
    (or a prune policy).
    """
    if not isinstance(path, str) or not path.startswith("/") or "\0" in path:
        raise RefusedError(f"invalid path {path!r}: must be absolute")
    digest = hashlib.sha256(os.fsencode(path)).hexdigest()[:8]
    readable = _SLUG_UNSAFE.sub("-", path.encode("ascii", "replace").decode()).strip("-._")
    readable = readable.replace("..", "-")[:80].rstrip("-._") or "root"
    return check_slug(f"{readable}-{digest}")


@dataclass(frozen=True, order=True)
class BackupId:
    """``host/slug/timestamp``: what the operator and the CLI call a backup."""

    host: str
    slug: str
    timestamp: str

    def __post_init__(self) -> None:
        check_host(self.host)
        check_slug(self.slug)
        check_timestamp(self.timestamp)

    @classmethod
    def parse(cls, text: str) -> BackupId:
        parts = text.split("/") if isinstance(text, str) else []
        if len(parts) != 3:
            raise RefusedError(f"invalid backup id {text!r}: expected HOST/SLUG/TIMESTAMP")
        return cls(*parts)

    @property
    def time(self) -> datetime:
        return parse_timestamp(self.timestamp)

    def __str__(self) -> str:
        return f"{self.host}/{self.slug}/{self.timestamp}"


@dataclass(frozen=True)
class Backup:
    """A complete backup: its id, its manifest and where its archive is."""

    id: BackupId
    manifest: Manifest
    archive: Path
    manifest_path: Path

    def to_dict(self) -> dict[str, Any]:
        return {"id": str(self.id), **self.manifest.to_dict()}


def read_timeout(*sizes: int | None) -> float:
    """How long reading (or extracting) an archive of these sizes may take."""
    return MIN_TIMEOUT + max((s or 0) for s in (0, *sizes)) / RATE


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        data = data[os.write(fd, data):]


#: link(2) failing with these means "this filesystem has no hard links"
_NO_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS}


def _publish(partial: Path, final: Path) -> None:
    """Give ``partial`` its final name unless that name exists; the partial name goes."""
    try:
        # a rename would silently replace a backup of the same second: a link cannot
        os.link(partial, final, follow_symlinks=False)
    except FileExistsError:
        raise ResourceError(f"{final} already exists: not replacing it") from None
    except OSError as exc:
        if exc.errno not in _NO_LINKS:
            raise
        # no hard links here: check, then rename (the O_EXCL partial name keeps two
        # writers of the same backup apart, so the gap only matters to a foreign writer)
        if os.path.lexists(final):
            raise ResourceError(f"{final} already exists: not replacing it") from None
        os.rename(partial, final)
        return
    os.unlink(partial)


class Repository:
    """A backup repository rooted at an existing directory."""

    def __init__(self, root: str | os.PathLike[str], runner: Runner | None = None) -> None:
        self.root = Path(os.path.abspath(root))
        self.runner = runner
        if not self.root.is_dir():
            raise UsageError(f"{self.root}: no such repository directory (create it first)")

    def scratch(self) -> tempfile.TemporaryDirectory[str]:
        """A private temporary directory for member listings, on the repository's disk.

        Listings of big trees are big; /tmp may be a small tmpfs. The name starts
        with ".", so :meth:`list` never takes it for a host. A read-only
        repository falls back to the system's temporary directory.
        """
        try:
            return tempfile.TemporaryDirectory(prefix=".sanoffload-tmp-", dir=self.root)
        except OSError:
            return tempfile.TemporaryDirectory(prefix="sanoffload-tmp-")

    def command_runner(self) -> Runner:
        """The runner external commands go through (UsageError if opened without one)."""
        if self.runner is None:
            raise UsageError("this repository was opened without a command runner")
        return self.runner

    # -- places -------------------------------------------------------------
    def _dir(self, host: str, slug: str, *, create: bool = False) -> Path:
        """``<repo>/<host>/<slug>``; refuses a symlink or non-directory on the way."""
        path = self.root
        absent = False
        for name in (check_host(host), check_slug(slug)):
            path = path / name
            if create:
                try:
                    path.mkdir(mode=0o750)
                except FileExistsError:
                    pass
                else:
                    _fsync_dir(path.parent)  # the new directory survives a crash too
            if absent:
                continue
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                if create:
                    raise
                absent = True  # callers find nothing there: "no such backup"
                continue
            if not stat.S_ISDIR(st.st_mode):
                raise RefusedError(f"{path} is not a directory (a symlink?): not following it")
        return path

    def archive_path(self, bid: BackupId) -> Path:
        return self._dir(bid.host, bid.slug) / (bid.timestamp + ARCHIVE_SUFFIX)

    def manifest_path(self, bid: BackupId) -> Path:
        return self._dir(bid.host, bid.slug) / (bid.timestamp + MANIFEST_SUFFIX)

    # -- writing --------------------------------------------------------------
    def writer(self, host: str, path: str, *, slug: str | None = None,
               timestamp: str | datetime | None = None) -> BackupWriter:
        """A new backup to stream into; publish it with :meth:`BackupWriter.commit`.

        ``timestamp`` defaults to now (UTC); the sender's freeze time is better.
        """
        if isinstance(timestamp, datetime):
            timestamp = format_timestamp(timestamp)
        elif timestamp is None:
            timestamp = format_timestamp(datetime.now(timezone.utc))
        if slug is None:
            slug = slug_for_path(path)
        elif not isinstance(path, str) or not path.startswith("/"):
            raise RefusedError(f"invalid path {path!r}: must be absolute")
        bid = BackupId(host, slug, timestamp)
        return BackupWriter(self, bid, path)

    def put(self, host: str, path: str, stream: BinaryIO,
            manifest_fields: Mapping[str, Any] | None = None, *, slug: str | None = None,
            verify: bool = True) -> BackupId:
        """Store the ``.tar.zst`` read from ``stream`` (to its end) as a backup of HOST:PATH.

        Reads CHUNK bytes at a time and hashes them on the way (no second pass
        over the data to hash it); ``verify`` then test-reads the partial file
        (``zstd -t``, ``tar --list``) before it is published, so an archive that
        cannot be read back is never stored. ``manifest_fields`` are the
        sender's (:data:`~sanoffload.store.manifest.SENDER_FIELDS`); its
        ``frozen_at`` names the backup, and its ``sha256``/``archive_bytes``, if
        given, must match what arrived (IntegrityError). Any error or
        interruption removes the partial file.
        """
        try:
            fields = sender_fields(manifest_fields)
        except ValueError as exc:
            raise UsageError(f"manifest fields: {exc}") from None
        when = to_utc(fields["frozen_at"]) if "frozen_at" in fields else None
        with self.writer(host, path, slug=slug, timestamp=when) as w:
            w.write_from(stream)
            return w.commit(fields, verify=verify).id

    # -- reading --------------------------------------------------------------
    def _load(self, bid: BackupId) -> Backup | None:
        directory = self._dir(bid.host, bid.slug)
        archive = directory / (bid.timestamp + ARCHIVE_SUFFIX)
        mpath = directory / (bid.timestamp + MANIFEST_SUFFIX)
        try:
            if not stat.S_ISREG(os.lstat(archive).st_mode):
                return None
            with open(mpath, "rb") as f:
                raw = f.read(1 << 17)
        except FileNotFoundError:
            return None
        try:
            manifest = Manifest.from_json(raw)
        except ValueError as exc:
            log.warning("%s: unreadable manifest, backup not listed: %s", mpath, exc)
            return None
        if manifest.backup_id != str(bid):
            log.warning("%s: manifest names %s, not this place: not listed", mpath,
                        manifest.backup_id)
            return None
        return Backup(bid, manifest, archive, mpath)

    def get(self, bid: BackupId | str) -> Backup:
        """The complete backup ``bid``; UsageError if there is none."""
        if isinstance(bid, str):
            bid = BackupId.parse(bid)
        backup = self._load(bid)
        if backup is None:
            raise UsageError(f"no such backup: {bid}")
        return backup

    def _subdirs(self, path: Path, check: Any) -> Iterator[str]:
        try:
            entries = sorted(os.scandir(path), key=lambda e: e.name)
        except FileNotFoundError:
            return
        for entry in entries:
            try:
                check(entry.name)
            except RefusedError:
                continue
            if entry.is_dir(follow_symlinks=False):
                yield entry.name

    def list(self, host: str | None = None, slug: str | None = None) -> list[Backup]:
        """Every complete backup (optionally of one host / object), oldest first per object."""
        out: list[Backup] = []
        hosts = [check_host(host)] if host else list(self._subdirs(self.root, check_host))
        for h in hosts:
            slugs = ([check_slug(slug)] if slug
                     else list(self._subdirs(self.root / h, check_slug)))
            for s in slugs:
                directory = self._dir(h, s)
                try:
                    names = set(os.listdir(directory))
                except FileNotFoundError:
                    continue
                for name in sorted(names):
                    ts = name[:-len(MANIFEST_SUFFIX)]
                    if not name.endswith(MANIFEST_SUFFIX) or ts + ARCHIVE_SUFFIX not in names:
                        continue
                    try:
                        bid = BackupId(h, s, ts)
                    except RefusedError:
                        continue
                    backup = self._load(bid)
                    if backup is not None:
                        out.append(backup)
        return sorted(out, key=lambda b: b.id)

    def leftovers(self) -> list[tuple[Path, str]]:
        """What :meth:`list` leaves out: partial files (an upload running or cut off),
        archives without manifest or the other way round, unreadable manifests."""
        found: list[tuple[Path, str]] = []
        for h in self._subdirs(self.root, check_host):
            for s in self._subdirs(self.root / h, check_slug):
                directory = self.root / h / s
                names = set(os.listdir(directory))
                for name in sorted(names):
                    if name.endswith(PARTIAL_SUFFIX):
                        found.append((directory / name, "partial (an upload running or cut off)"))
                        continue
                    for suffix, other, why in (
                            (ARCHIVE_SUFFIX, MANIFEST_SUFFIX, "archive without a manifest"),
                            (MANIFEST_SUFFIX, ARCHIVE_SUFFIX, "manifest without an archive")):
                        ts = name[:-len(suffix)]
                        if not name.endswith(suffix) or not _TIMESTAMP_RE.fullmatch(ts):
                            continue
                        if ts + other not in names:
                            found.append((directory / name, why))
                        elif suffix == MANIFEST_SUFFIX and self._load(BackupId(h, s, ts)) is None:
                            found.append((directory / name, "manifest unreadable or about "
                                                            "another backup"))
        return found

    # -- checking -------------------------------------------------------------
    def check_sha256(self, backup: Backup) -> None:
        """Re-hash the archive (CHUNK at a time) and compare size and sha256 with the manifest."""
        m = backup.manifest
        try:
            with open(backup.archive, "rb", buffering=0) as f:
                size = os.fstat(f.fileno()).st_size
                if size != m.archive_bytes:
                    raise IntegrityError(f"{backup.id}: archive is {size} bytes, the manifest "
                                         f"says {m.archive_bytes}")
                digest = _hash_file(f)
        except OSError as exc:
            raise IntegrityError(f"{backup.id}: cannot read the archive: {exc}") from None
        if digest != m.sha256:
            raise IntegrityError(f"{backup.id}: sha256 mismatch: archive has {digest}, "
                                 f"the manifest says {m.sha256}")

    def test_read(self, archive: Path, *, timeout: float) -> int:
        """``zstd -t`` then ``tar --list`` to the end; returns the member count.

        A damaged archive raises IntegrityError; a missing tool or a timeout
        keeps its own error (that says nothing about the archive).
        """
        runner = self.command_runner()
        try:
            zstd.check(runner, archive, timeout=timeout)
            with self.scratch() as tmp:
                listing = Path(tmp) / "members"
                tar.list_to_file(runner, archive, listing, timeout=timeout, verbose=False)
                return tar.count_lines(listing)
        except (CommandNotFoundError, CommandTimeoutError):
            raise
        except CommandError as exc:
            raise IntegrityError(f"{archive.name}: cannot be read back: {exc}") from None

    def verify(self, bid: BackupId | str, *, timeout: float | None = None) -> Backup:
        """Re-check a stored backup: size, sha256, ``zstd -t``, ``tar --list``, member count.

        The outcome is written into the manifest (``verification``); a failure
        raises IntegrityError after that.
        """
        backup = self.get(bid)
        m = backup.manifest
        limit = timeout if timeout is not None else read_timeout(m.archive_bytes, m.source_bytes)
        failure: IntegrityError | None = None
        try:
            self.check_sha256(backup)
            count = self.test_read(backup.archive, timeout=limit)
            if m.member_count is not None and count != m.member_count:
                raise IntegrityError(f"{backup.id}: {count} archive members, the manifest "
                                     f"says {m.member_count}")
        except IntegrityError as exc:
            failure = exc
        result = (Verification.now(VERIFY_FAILED, str(failure)) if failure
                  else Verification.now(VERIFIED_OK))
        try:
            backup = self._record(backup, m.with_verification(result))
        except OSError as exc:  # a read-only repository: the answer still stands
            log.warning("%s: cannot record the verification in the manifest: %s", backup.id, exc)
            backup = Backup(backup.id, m.with_verification(result), backup.archive,
                            backup.manifest_path)
        if failure is not None:
            raise failure
        return backup

    def record_compare(self, bid: BackupId | str, result: Verification) -> Backup:
        """Record the proxy's comparison of the archive with its duplicate in the manifest."""
        backup = self.get(bid)
        return self._record(backup, backup.manifest.with_compared(result))

    def _record(self, backup: Backup, manifest: Manifest) -> Backup:
        """Replace a published manifest (atomically: a reader sees the old or the new)."""
        directory = backup.manifest_path.parent
        partial = directory / f"{backup.id.timestamp}{MANIFEST_SUFFIX}.{secrets.token_hex(4)}" \
                              f"{PARTIAL_SUFFIX}"
        _write_file(partial, manifest.to_json(), 0o640)
        try:
            os.replace(partial, backup.manifest_path)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        if not backup.archive.exists():
            # pruned meanwhile: the replace must not bring back a manifest of nothing
            backup.manifest_path.unlink(missing_ok=True)
            raise UsageError(f"backup {backup.id} was removed meanwhile")
        _fsync_dir(directory)
        return Backup(backup.id, manifest, backup.archive, backup.manifest_path)

    # -- removing -------------------------------------------------------------
    def delete(self, bid: BackupId) -> None:
        """Remove a backup: the manifest first, so it is never listed half-removed."""
        directory = self._dir(bid.host, bid.slug)
        (directory / (bid.timestamp + MANIFEST_SUFFIX)).unlink(missing_ok=True)
        _fsync_dir(directory)
        (directory / (bid.timestamp + ARCHIVE_SUFFIX)).unlink(missing_ok=True)
        _fsync_dir(directory)


def _hash_file(f: BinaryIO) -> str:
    h = hashlib.sha256()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    while n := f.readinto(buf):
        h.update(view[:n])
    return h.hexdigest()


def _write_file(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        _write_all(fd, memoryview(data))
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)


class BackupWriter:
    """One backup being received: bytes go to a ``.partial`` file, hashed as they pass.

    Use as a context manager; leaving it without :meth:`commit` (an error, an
    interruption) removes the partial file::

        with repo.writer("fs1", "/srv/data") as w:
            w.write_from(stream)        # or w.write(chunk) per frame of a protocol
            w.commit({"file_count": 120})
    """

    def __init__(self, repo: Repository, bid: BackupId, path: str) -> None:
        self.repo = repo
        self.id = bid
        self.path = path
        self.bytes = 0
        self._hash = hashlib.sha256()
        self.directory = repo._dir(bid.host, bid.slug, create=True)
        self.archive = self.directory / (bid.timestamp + ARCHIVE_SUFFIX)
        self.manifest_path = self.directory / (bid.timestamp + MANIFEST_SUFFIX)
        self.partial = self.directory / (bid.timestamp + ARCHIVE_SUFFIX + PARTIAL_SUFFIX)
        if self.archive.exists() or self.manifest_path.exists():
            raise ResourceError(f"backup {bid} already exists")
        try:
            # O_EXCL: a second upload of the same backup fails here instead of mixing bytes
            self._fd: int | None = os.open(
                self.partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600)
        except FileExistsError:
            raise ResourceError(f"backup {bid} is being received already "
                                f"({self.partial.name} exists)") from None
        self._done = False

    def __enter__(self) -> BackupWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if not self._done:
            self.abort()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Append one chunk of the compressed archive."""
        if self._fd is None:
            raise ValueError("backup writer is closed")
        view = memoryview(data).cast("B")
        self._hash.update(view)
        try:
            _write_all(self._fd, view)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise ResourceError(f"{self.directory}: no space left for {self.id}") from exc
            raise
        self.bytes += len(view)

    def write_from(self, stream: BinaryIO) -> int:
        """Copy ``stream`` to its end, CHUNK at a time; returns the bytes copied."""
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        start = self.bytes
        readinto = getattr(stream, "readinto", None)
        while True:
            if readinto is not None:
                n = readinto(buf)
                if n is None:
                    raise UsageError("the input stream is non-blocking: give a blocking one")
                if not n:
                    break
                self.write(view[:n])
            else:
                chunk = stream.read(CHUNK)
                if not chunk:
                    break
                self.write(chunk)
        return self.bytes - start

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()

    def abort(self) -> None:
        """Forget this backup: close and remove the partial file (and anything published)."""
        self._done = True
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self.partial.unlink(missing_ok=True)

    def commit(self, fields: Mapping[str, Any] | None = None, *, verify: bool = True) -> Backup:
        """fsync, check against the sender's counts, test-read, publish archive then manifest.

        Any failure removes everything this writer made, published or not.
        """
        if self._fd is None or self._done:
            raise ValueError("backup writer is closed")
        try:
            backup = self._commit(fields, verify)
        except BaseException:
            self.abort()
            raise
        self._done = True
        log.info("stored %s: %d bytes, sha256 %s", self.id, self.bytes, backup.manifest.sha256)
        return backup

    def _commit(self, fields: Mapping[str, Any] | None, verify: bool) -> Backup:
        assert self._fd is not None
        try:
            values = sender_fields(fields)
        except ValueError as exc:
            raise UsageError(f"manifest fields: {exc}") from None
        os.fsync(self._fd)
        # read-only from now on: nothing should ever write into a stored archive
        os.fchmod(self._fd, 0o440)
        os.close(self._fd)
        self._fd = None
        digest = self.sha256
        expected = values.pop("sha256", None)
        if expected is not None and expected != digest:
            raise IntegrityError(f"{self.id}: received data has sha256 {digest}, "
                                 f"the sender says {expected}")
        sent = values.pop("archive_bytes", None)
        if sent is not None and sent != self.bytes:
            raise IntegrityError(f"{self.id}: received {self.bytes} bytes, the sender says {sent}")
        members: int | None = None
        if verify:
            members = self.repo.test_read(self.partial,
                                          timeout=read_timeout(self.bytes,
                                                               values.get("source_bytes")))
            check = Verification.now(VERIFIED_OK, "on receipt")
        else:
            check = Verification.now(NOT_VERIFIED)
        manifest = Manifest(host=self.id.host, path=self.path, slug=self.id.slug,
                            timestamp=self.id.timestamp, archive_bytes=self.bytes, sha256=digest,
                            member_count=members, stored_at=utc_iso(datetime.now(timezone.utc)),
                            verification=check, **values)
        _publish(self.partial, self.archive)
        try:
            _fsync_dir(self.directory)
            partial = self.directory / (self.id.timestamp + MANIFEST_SUFFIX + PARTIAL_SUFFIX)
            _write_file(partial, manifest.to_json(), 0o640)
            try:
                _publish(partial, self.manifest_path)
            except BaseException:
                partial.unlink(missing_ok=True)
                raise
            _fsync_dir(self.directory)
        except BaseException:
            # no manifest, no backup: the archive alone must not stay behind
            self.archive.unlink(missing_ok=True)
            raise
        return Backup(self.id, manifest, self.archive, self.manifest_path)
