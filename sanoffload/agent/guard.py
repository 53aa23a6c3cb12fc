"""The freeze guard: a helper process that thaws a filesystem the agent left frozen.

A frozen filesystem blocks every writer on the host until someone thaws it.
If the agent is SIGKILLed, or hangs, between ``fsfreeze --freeze`` and
``--unfreeze``, no ``finally`` block runs. So before freezing, the agent
starts this guard in a session of its own (signals aimed at the agent's
process group and the agent's death do not reach it) and hands it the read
end of a pipe::

    python3 -m sanoffload.agent.guard --mount M --deadline S --fd N \\
        --ready-fd R --report PATH

The guard imports everything, opens the mountpoint, chdirs to ``/``, writes
``armed`` on fd R and then waits on fd N with ``select()``:

* ``thawed\\n`` from the agent (it unfroze the filesystem itself): exit 0,
  touching nothing;
* EOF (the agent died, or gave up without thawing): thaw at once;
* S seconds after arming: thaw.

Either way it writes a JSON report (why, when, the deadline) to PATH, which
must not be on the filesystem it guards, and exits. It ignores SIGTERM, SIGHUP
and SIGINT: it exists to outlive trouble (SIGKILL still stops it).

The guard's half of this module imports the standard library only, at the
top: once the filesystem is frozen an import (or exec'ing a tool) could read
or write files on it and block. :class:`FreezeGuard` is the agent's half.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import json
import logging
import os
import select
import signal
import sys
import time
from types import TracebackType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..runner import Runner, Spawned

#: <linux/fs.h>: _IOWR('X', 119, int) and _IOWR('X', 120, int)
FIFREEZE = 0xC0045877
FITHAW = 0xC0045878

DISARM = b"thawed\n"
READY = b"armed\n"

#: guard exit codes (the report says more)
EXIT_DISARMED = 0
EXIT_USAGE = 2  # argparse's
EXIT_FIRED = 3
EXIT_THAW_FAILED = 4
EXIT_SETUP = 5

#: why the guard ended (``reason`` in the report)
DISARMED = "disarmed"
AGENT_GONE = "agent-gone"
DEADLINE = "deadline"

log = logging.getLogger(__name__)

DEFAULT_STATE_DIR = "/run/sanoffload"
ARM_TIMEOUT = 10.0
EXIT_TIMEOUT = 5.0


# --------------------------------------------------------------------------
# The guard process
# --------------------------------------------------------------------------

def _utc(wall: float) -> str:
    # gmtime needs no zone file: nothing to read once the filesystem is frozen
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(wall)) + f".{int(wall % 1 * 1000):03d}Z"


def thaw_fd(fd: int) -> str:
    """FITHAW on ``fd``: ``thawed``, ``not-frozen`` (EINVAL) or ``error: ...``."""
    try:
        fcntl.ioctl(fd, FITHAW, 0)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return "not-frozen"
        return f"error: {errno.errorcode.get(exc.errno or 0, exc.errno)} {exc.strerror}"
    return "thawed"


def write_report(path: str, report: dict[str, Any]) -> None:
    """Write ``report`` as JSON, atomically (a reader never sees half of it)."""
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, json.dumps(report, sort_keys=True).encode() + b"\n")
    finally:
        os.close(fd)
    os.replace(tmp, path)


def wait_for_agent(fd: int, deadline_at: float) -> str:
    """Block until the agent disarms, goes away (EOF) or the deadline passes."""
    buf = b""
    while True:
        remaining = deadline_at - time.monotonic()
        if remaining <= 0:
            return DEADLINE
        ready, _, _ = select.select([fd], [], [], remaining)
        if not ready:
            continue  # the loop re-checks the clock: select may wake a little early
        chunk = os.read(fd, 64)
        if not chunk:
            return AGENT_GONE
        buf += chunk
        if DISARM in buf:
            return DISARMED
        buf = buf[-len(DISARM):]  # anything else is noise; keep only a possible prefix


def guard_main(argv: list[str] | None = None) -> int:
    """The guard process (see the module docstring); returns its exit code."""
    parser = argparse.ArgumentParser(prog="python3 -m sanoffload.agent.guard")
    parser.add_argument("--mount", required=True, help="mountpoint of the frozen filesystem")
    parser.add_argument("--deadline", required=True, type=float,
                        help="seconds after arming at which to thaw regardless")
    parser.add_argument("--fd", required=True, type=int, help="read end of the agent's pipe")
    parser.add_argument("--ready-fd", required=True, type=int,
                        help="write end of the pipe on which to say 'armed'")
    parser.add_argument("--report", required=True, help="JSON report path (on another fs)")
    args = parser.parse_args(argv)

    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(signum, signal.SIG_IGN)
    os.chdir("/")  # never hold a cwd on the guarded filesystem
    try:
        # held from before the freeze: no path lookup later, and the same superblock
        # even if the mount moves
        mount_fd = os.open(args.mount, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        print(f"freeze guard: cannot open {args.mount}: {exc.strerror}", file=sys.stderr,
              flush=True)
        return EXIT_SETUP
    try:
        # the kernel's OOM killer must not take the guard in place of the agent
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("-1000")
    except OSError:
        pass  # not root (a unit test): the guard still works
    armed_wall = time.time()
    _utc(armed_wall)  # warm up everything the report needs before saying "armed"
    armed_at = time.monotonic()
    deadline_at = armed_at + args.deadline
    try:
        os.write(args.ready_fd, READY)
    finally:
        os.close(args.ready_fd)

    reason = wait_for_agent(args.fd, deadline_at)
    thaw = "untouched"
    if reason != DISARMED:
        # the one place sanoffload does not go through the runner: exec'ing fsfreeze
        # could block if the binary (or a library) lives on the frozen filesystem
        thaw = thaw_fd(mount_fd)
    ended = time.time()
    os.close(mount_fd)
    report = {
        "version": 1,
        "mountpoint": args.mount,
        "pid": os.getpid(),
        "fired": reason != DISARMED,
        "reason": reason,
        "thaw": thaw,
        "deadline_s": args.deadline,
        "armed_at": _utc(armed_wall),
        "deadline_at": _utc(armed_wall + args.deadline),
        "ended_at": _utc(ended),
        "armed_for_s": round(time.monotonic() - armed_at, 3),
    }
    try:
        write_report(args.report, report)
    except OSError as exc:
        print(f"freeze guard: cannot write {args.report}: {exc.strerror}; report: "
              f"{json.dumps(report)}", file=sys.stderr, flush=True)
    if reason != DISARMED:
        print(f"freeze guard: {args.mount}: {reason}, {thaw}", file=sys.stderr, flush=True)
    if thaw.startswith("error"):
        return EXIT_THAW_FAILED
    return EXIT_FIRED if reason != DISARMED else EXIT_DISARMED


# --------------------------------------------------------------------------
# The agent's half
# --------------------------------------------------------------------------

class FreezeGuard:
    """Run a guard process for one freeze of ``mountpoint``.

    ``with FreezeGuard(...) as guard:`` returns once the guard is armed; only
    then may the caller freeze. After a successful unfreeze, call
    :meth:`disarm`. Leaving the block without disarming (an error, an
    interrupt) closes the pipe, and the guard thaws at once; if the agent
    dies, the kernel closes it. The deadline counts from arming.
    """

    def __init__(self, runner: Runner, mountpoint: str | os.PathLike[str], deadline_s: float, *,
                 state_dir: str | os.PathLike[str] = DEFAULT_STATE_DIR,
                 arm_timeout: float = ARM_TIMEOUT, exit_timeout: float = EXIT_TIMEOUT) -> None:
        self.runner = runner
        self.mountpoint = os.fspath(mountpoint)
        self.deadline_s = float(deadline_s)
        self.state_dir = os.fspath(state_dir)
        self.arm_timeout = arm_timeout
        self.exit_timeout = exit_timeout
        self.report_path: str | None = None
        self.log_path: str | None = None
        self.disarmed = False
        self._proc: Spawned | None = None
        self._ctl: int | None = None
        self._exit_code: int | None = None
        self._report: dict[str, Any] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    # -- arming -------------------------------------------------------------
    def __enter__(self) -> FreezeGuard:
        self.arm()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def arm(self) -> None:
        """Start the guard and wait (bounded) until it says it is armed."""
        from ..errors import ConfigError, FreezeError

        try:
            mount_dev = os.stat(self.mountpoint).st_dev
        except OSError as exc:
            raise FreezeError(f"cannot guard {self.mountpoint}: {exc.strerror}; "
                              "nothing was frozen") from None
        os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        if os.stat(self.state_dir).st_dev == mount_dev:
            raise ConfigError(f"freeze guard state dir {self.state_dir} is on the filesystem "
                              f"being frozen ({self.mountpoint}): the guard could not write its "
                              "report", hint="use a directory on another filesystem, "
                              f"e.g. {DEFAULT_STATE_DIR}")
        stem = os.path.join(self.state_dir, f"guard-{os.getpid()}-{time.monotonic_ns()}")
        self.report_path, self.log_path = f"{stem}.json", f"{stem}.log"
        ctl_r, ctl_w = os.pipe()
        ready_r, ready_w = os.pipe()
        try:
            try:
                self._proc = self.runner.spawn(
                    # -P: not the agent's cwd on sys.path, where a stray "sanoffload"
                    # directory would be imported, as root, in place of ours
                    [sys.executable or "python3", "-P", "-m", "sanoffload.agent.guard",
                     "--mount", self.mountpoint,
                     "--deadline", repr(self.deadline_s), "--fd", str(ctl_r),
                     "--ready-fd", str(ready_w), "--report", self.report_path],
                    pass_fds=(ctl_r, ready_w), log_path=self.log_path,
                    # this very tree, whether installed or run from a checkout; no .pyc
                    # writes (the package may live on the filesystem being frozen)
                    env={"PYTHONPATH": _package_root(), "PYTHONDONTWRITEBYTECODE": "1"})
            finally:
                # only the guard may hold these: its EOF and ours depend on it
                os.close(ctl_r)
                os.close(ready_w)
            self._ctl, ctl_w = ctl_w, -1
            if not _read_ready(ready_r, self.arm_timeout):
                self._proc.kill()  # not armed, so nothing of ours is frozen: safe to kill
                self._finish_wait(kill=False)
                raise FreezeError(f"freeze guard for {self.mountpoint} did not arm within "
                                  f"{self.arm_timeout:g}s ({self._log_tail() or 'no output'});"
                                  " nothing was frozen")
        except BaseException:
            if ctl_w >= 0:
                os.close(ctl_w)
            self._close_ctl()
            if self._proc is not None and self._proc.poll() is None:
                self._proc.kill()
            raise
        finally:
            os.close(ready_r)

    # -- ending ---------------------------------------------------------------
    def disarm(self) -> None:
        """Tell the guard the filesystem is thawed, then wait (bounded) for it to exit."""
        if self._ctl is not None:
            try:
                os.write(self._ctl, DISARM)
            except BrokenPipeError:
                pass  # it already ended (fired): the report says why
            self._close_ctl()
            self.disarmed = True
        # we thawed: a guard that does not exit in time has nothing left to do
        self._finish_wait(kill=True)

    def close(self) -> None:
        """End the guard: disarmed, or (EOF) thawing now; never leave the pipe open."""
        was_open = self._ctl is not None
        self._close_ctl()
        if was_open:
            # not disarmed: the guard thaws on EOF; do not kill it, it is doing its job
            self._finish_wait(kill=False)
        self._cleanup_files()

    def _close_ctl(self) -> None:
        if self._ctl is not None:
            os.close(self._ctl)
            self._ctl = None

    def _finish_wait(self, *, kill: bool) -> None:
        from ..errors import CommandTimeoutError

        if self._proc is None or self._exit_code is not None:
            return
        try:
            self._exit_code = self._proc.wait(self.exit_timeout)
        except CommandTimeoutError:
            if kill:
                log.warning("freeze guard %d still running %.0fs after disarm; killed",
                            self._proc.pid, self.exit_timeout)
                self._proc.kill()
                self._exit_code = self._proc.wait(self.exit_timeout)
            else:
                log.error("freeze guard %d still running %.0fs after the agent let go of %s",
                          self._proc.pid, self.exit_timeout, self.mountpoint)
                return
        self._load_report()

    # -- outcome --------------------------------------------------------------
    def _load_report(self) -> None:
        if self._report is None and self.report_path and os.path.exists(self.report_path):
            with open(self.report_path, encoding="utf-8") as f:
                self._report = json.load(f)

    @property
    def report(self) -> dict[str, Any] | None:
        """The guard's JSON report once it ended, else None."""
        self._load_report()
        return self._report

    @property
    def fired(self) -> bool:
        """Whether the guard had to act (deadline, or the agent let go without disarming)."""
        report = self.report
        if report is not None:
            return bool(report.get("fired"))
        return self._exit_code not in (None, EXIT_DISARMED)

    @property
    def exit_code(self) -> int | None:
        return self._exit_code

    def _log_tail(self) -> str:
        try:
            with open(self.log_path or "", encoding="utf-8", errors="replace") as f:
                lines = f.read().strip().splitlines()
        except OSError:
            return ""
        return " | ".join(lines[-3:])[-300:]

    def _cleanup_files(self) -> None:
        # a report of a guard that fired stays, for whoever looks into it later
        if self._exit_code is None or self.fired:
            return
        self._load_report()
        for path in (self.report_path, self.log_path):
            if path:
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass


def _package_root() -> str:
    """The directory holding the ``sanoffload`` package this module came from."""
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _read_ready(fd: int, timeout: float) -> bool:
    """Wait up to ``timeout`` s for the guard's ``armed`` line; False on EOF or timeout."""
    deadline = time.monotonic() + timeout
    buf = b""
    while READY not in buf:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        ready, _, _ = select.select([fd], [], [], remaining)
        if ready:
            chunk = os.read(fd, 64)
            if not chunk:
                return False
            buf += chunk
    return True


if __name__ == "__main__":
    sys.exit(guard_main())
