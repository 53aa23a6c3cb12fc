"""How a command is found, started, waited for and killed: the bottom of the process layer.

The layer, bottom to top (each imports only the ones below it, never the
reverse, so there is no import cycle):

* ``process`` (this module): executable lookup on the runner's PATH, argv
  encoding (bytes exactly as given), every command in its own process group,
  one way to kill a group, a deadline; single commands run through ``sh``,
  the design's subprocess library.
* ``pipeline``: stages joined by kernel pipes, on the standard library (it
  says why).
* ``runner``: the policy every call follows (minimal environment, timeouts,
  named ok codes, masked secrets, logging) and the ``Runner`` code is handed.

The test doubles (``FakeRunner``...) live in ``sanoffload.testing``, which no
production module imports.
"""

from __future__ import annotations

import codecs
import contextlib
import fcntl
import os
import select
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import CommandTimeoutError
from .signals import deferred as deferred_signals
from .text import printable

OkCodes = Mapping[int, str]
#: one argv element: Linux paths are bytes, so bytes (and paths) are as good as str
Arg = str | bytes | os.PathLike[str] | os.PathLike[bytes] | int


def fs_str(arg: Arg) -> str:
    """``arg`` as the str that encodes back to its exact bytes (surrogateescape, as
    ``os.fsdecode``)."""
    if isinstance(arg, int):
        return str(arg)
    return os.fsdecode(arg)


#: the codec sh encodes argv with: the filesystem encoding with surrogateescape, so an
#: argument os.fsdecode made from b"\xff" goes out as b"\xff" (sh's default, strict
#: UTF-8, raises UnicodeEncodeError in the forked child instead)
ARGV_CODEC = "sanoffload-argv"


def _argv_codec(name: str) -> codecs.CodecInfo | None:
    if name not in (ARGV_CODEC, ARGV_CODEC.replace("-", "_")):
        return None
    fs_enc, fs_err = sys.getfilesystemencoding(), sys.getfilesystemencodeerrors()

    def encode(text: str, errors: str = "strict") -> tuple[bytes, int]:
        return text.encode(fs_enc, fs_err), len(text)

    def decode(data: Any, errors: str = "strict") -> tuple[str, int]:
        raw = bytes(data)
        return raw.decode(fs_enc, fs_err), len(raw)

    return codecs.CodecInfo(encode, decode, name=ARGV_CODEC)


codecs.register(_argv_codec)


# --------------------------------------------------------------------------
# What the executors tell the policy layer (never seen by callers of Runner)
# --------------------------------------------------------------------------

class NotFound(Exception):
    """The command's executable is not on the PATH (the runner raises CommandNotFoundError)."""

    def __init__(self, hint: str | None = None) -> None:
        super().__init__(hint)
        self.hint = hint

    @classmethod
    def for_command(cls, name: str) -> NotFound:
        return cls(f"install the package that provides '{printable(os.fsencode(name))}'")


class TimedOut(Exception):
    """The deadline passed and the group was killed; what it wrote so far is kept."""

    def __init__(self, stdout: bytes = b"", stderr: bytes = b"") -> None:
        super().__init__("timeout")
        self.stdout = stdout
        self.stderr = stderr


@dataclass
class RawResult:
    """A finished command before the runner's policy (masking, ok codes) is applied."""

    returncode: int
    stdout: bytes
    stderr: bytes


#: how much of a failed command's output its error message keeps
DETAIL_LINES = 4
DETAIL_WIDTH = 300


def error_detail(output: str) -> str:
    """The lines of a failed command's output that say why, as one printable line.

    Tools print the causes first and a summary last (tar: "Cannot write: No
    space left on device" ... "Exiting with failure status due to previous
    errors"), so the first distinct lines are kept along with the last, each
    cut to DETAIL_WIDTH and escaped; the rest is counted, not shown.
    """
    lines = list(dict.fromkeys(line.strip() for line in output.splitlines() if line.strip()))
    if not lines:
        return "no output"
    keep = lines[:DETAIL_LINES - 1]
    if lines[-1] not in keep:
        keep.append(lines[-1])
    text = "; ".join(printable(line[:DETAIL_WIDTH]) for line in keep)
    more = len(lines) - len(keep)
    return f"{text} (and {more} more line{'s' if more > 1 else ''})" if more else text


# --------------------------------------------------------------------------
# Primitives
# --------------------------------------------------------------------------

def find_executable(name: str, path: str) -> str | None:
    """The executable ``name`` runs as on ``path`` (a PATH string), or None.

    A name with a slash is taken as it is (if executable): the caller chose
    that file, and a PATH search must not substitute another.
    """
    return shutil.which(name, path=path)


def require_executable(name: str, env: Mapping[str, str]) -> str:
    """:func:`find_executable` on ``env``'s PATH, raising :class:`NotFound` with a hint."""
    exe = find_executable(name, env.get("PATH", os.defpath))
    if exe is None:
        raise NotFound.for_command(name)
    return exe


#: the size asked for a pipe Python reads or writes in 1 MiB chunks (Linux's default is
#: 64 KiB: sixteen wake-ups of each side per chunk)
PIPE_BYTES = 1 << 20


def widen_pipe(fd: int) -> None:
    """Ask for a :data:`PIPE_BYTES` pipe buffer; a smaller limit (pipe-max-size) is fine."""
    try:
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
    except OSError:
        pass  # an unprivileged user over pipe-user-pages-soft: the default still works


def kill_group(pgid: int) -> None:
    """SIGKILL every process of group ``pgid`` (the command and what it started); gone is fine."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        # already reaped (ESRCH), or only zombies left that we may not signal (EPERM)
        pass


@dataclass(frozen=True)
class Deadline:
    """A point on the monotonic clock that one call or one pipeline must finish by."""

    at: float

    @classmethod
    def after(cls, seconds: float) -> Deadline:
        return cls(time.monotonic() + seconds)

    def remaining(self, floor: float = 0.0) -> float:
        """Seconds left, never below ``floor`` (a wait of 0 would not even reap an exited child)."""
        return max(floor, self.at - time.monotonic())


@contextlib.contextmanager
def _inheritable(fds: Sequence[int]) -> Iterator[None]:
    # Python opens descriptors O_CLOEXEC and sh passes them on without clearing it
    for fd in fds:
        os.set_inheritable(fd, True)
    try:
        yield
    finally:
        for fd in fds:
            os.set_inheritable(fd, False)


def _reap(proc: Any) -> None:
    """Wait for a killed child so it does not linger as a zombie."""
    with contextlib.suppress(Exception):  # it was SIGKILLed: any outcome of the wait is fine
        proc.wait(timeout=5)


# --------------------------------------------------------------------------
# Single commands, through sh
# --------------------------------------------------------------------------

def run_command(argv: Sequence[str], *, timeout: float, input: bytes | str | None,
                cwd: str | None, env: dict[str, str], pass_fds: Sequence[int] = ()) -> RawResult:
    """Run ``argv`` in its own process group to completion or ``timeout``.

    Any exit code comes back (the policy layer judges it); a death by signal
    N comes back as 128+N like a shell's. Raises :class:`NotFound` or
    :class:`TimedOut` (the group killed). If we are interrupted (a stop
    signal, Ctrl-C) while it runs, the group is killed and reaped: nothing
    else would stop a command in a group of its own.

    The deadline is a timer that kills the group, not sh's ``_timeout``:
    that one polls every 0.1 s, and a short command (``fsfreeze``, ``lvs``)
    paid the whole 0.1 s, inside the freeze window too.
    """
    import sh  # sh is imported only in this module

    exe = require_executable(argv[0], env)
    proc = None
    expired = threading.Event()
    timer: threading.Timer | None = None
    extra: dict[str, Any] = {"_pass_fds": set(pass_fds)} if pass_fds else {}
    try:
        with _inheritable(pass_fds):
            with deferred_signals():
                proc = sh.Command(exe)(
                    *argv[1:], _env=env, _in=input, _cwd=cwd,
                    _ok_code=list(range(256)), _tty_out=False, _bg=True, _bg_exc=False,
                    _new_group=True, _return_cmd=True, _truncate_exc=False,
                    _encoding=ARGV_CODEC, **extra)
                pid = proc.pid

                def expire() -> None:
                    expired.set()
                    kill_group(pid)

                timer = threading.Timer(max(timeout, 0.0), expire)
                timer.daemon = True
                timer.start()
            proc.wait()
    except sh.SignalException as exc:
        if expired.is_set():
            raise TimedOut(exc.stdout, exc.stderr) from None
        return RawResult(128 + abs(exc.exit_code), exc.stdout, exc.stderr)
    except BaseException:
        if proc is not None:
            kill_group(proc.pid)
            _reap(proc)
        raise
    finally:
        if timer is not None:
            timer.cancel()
    if expired.is_set():  # the leader ended on its own just as the deadline passed
        raise TimedOut(proc.stdout, proc.stderr)
    return RawResult(proc.exit_code, proc.stdout, proc.stderr)


class Spawned:
    """A started helper process."""

    def __init__(self, argv: Sequence[str], pid: int) -> None:
        self.argv = list(argv)
        self.pid = pid

    def poll(self) -> int | None:
        """Exit code, or None while it runs."""
        raise NotImplementedError

    def wait(self, timeout: float) -> int:
        """Wait up to ``timeout`` seconds; raise CommandTimeoutError if it still runs."""
        raise NotImplementedError

    def kill(self) -> None:
        raise NotImplementedError


class ShSpawned(Spawned):
    """A helper started through sh, leading its own session (and so its own group)."""

    def __init__(self, argv: Sequence[str], proc: Any) -> None:
        super().__init__(argv, proc.pid)
        self._proc = proc

    def poll(self) -> int | None:
        return None if self._proc.is_alive() else int(self._proc.process.exit_code)

    def wait(self, timeout: float) -> int:
        """Wait on a pidfd (woken the moment it exits), not sh's 0.1 s polling loop."""
        import sh

        if self._proc.is_alive():
            try:
                pidfd = os.pidfd_open(self.pid)
            except ProcessLookupError:
                pidfd = None  # exited and reaped meanwhile: the wait below returns at once
            if pidfd is not None:
                try:
                    ready, _, _ = select.select([pidfd], [], [], max(timeout, 0.0))
                finally:
                    os.close(pidfd)
                if not ready:
                    raise CommandTimeoutError(f"{self.argv[0]} still running after "
                                              f"{timeout:.0f}s", argv=self.argv)
        try:
            self._proc.wait()
        except sh.SignalException as exc:
            return 128 + abs(exc.exit_code)
        return int(self._proc.exit_code)

    def kill(self) -> None:
        kill_group(self.pid)


def spawn_command(argv: Sequence[str], *, pass_fds: Sequence[int], log_path: str | None,
                  env: dict[str, str]) -> Spawned:
    """Start ``argv`` in a new session and return at once (see :meth:`Runner.spawn`)."""
    import sh

    exe = require_executable(argv[0], env)
    # a helper outlives us on purpose (the freeze guard): a signal arriving while it
    # starts is raised after the start, and the caller's cleanup deals with it
    with _inheritable(pass_fds), deferred_signals():
        proc = sh.Command(exe)(
            *argv[1:], _env=env, _bg=True, _bg_exc=False, _new_session=True,
            _pass_fds=set(pass_fds), _ok_code=list(range(256)), _tty_out=False,
            _out=log_path or os.devnull, _err_to_out=True, _return_cmd=True,
            _truncate_exc=False, _encoding=ARGV_CODEC)
    return ShSpawned(argv, proc)
