"""Streaming pipelines for the runner: ``tar ... | zstd ...`` whose output Python reads.

Why the standard library here, when ``sh`` runs every single command
(``process.run_command``):

* stages must be joined by kernel pipes, so bytes go from one tool to the
  next without passing through Python; only the last stage's output is read
  here (for hashing and sending). ``sh`` pipes through Python threads, a copy
  of every byte of a backup through the interpreter;
* all stages must share one process group, so a deadline, an error or an
  interruption kills the whole pipeline at once; ``sh`` gives each command a
  group of its own (``_new_group``) and cannot put a second command into the
  first one's group (``subprocess.Popen(process_group=...)`` can);
* the caller must be able to write into the first stage (``stdin=PIPE``: the
  store's archive fed to ``tar --diff``) as a plain file object.

Everything else is the process layer's: the executable lookup, the group
kill and the deadline come from :mod:`sanoffload.process`. Each stage's
stderr goes to a temporary file (a pipe could fill and stall the stage) and
ends up, masked, in the error naming the failed stage.
"""

from __future__ import annotations

import subprocess
import tempfile
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import IO, Protocol, Self, runtime_checkable

from .errors import CommandError, CommandTimeoutError
from .process import (
    Arg,
    Deadline,
    OkCodes,
    error_detail,
    fs_str,
    kill_group,
    require_executable,
    widen_pipe,
)
from .signals import deferred as deferred_signals


@dataclass(frozen=True)
class Stage:
    """One command of a pipeline and the exit codes it may end with (named)."""

    argv: Sequence[Arg]
    ok_codes: OkCodes | None = None


@dataclass(frozen=True)
class StageResult:
    argv: tuple[str, ...]  # masked
    returncode: int
    code_name: str
    stderr: str  # masked


@runtime_checkable
class PipelineLike(Protocol):
    """What ``Runner.pipeline`` returns: the real :class:`Pipeline` or ``testing.FakePipeline``.

    Read ``stdout`` (and write ``stdin`` when started with ``stdin=PIPE``),
    then ``wait()``, which raises for a timeout or a stage whose exit code
    was not tolerated. Leaving the ``with`` block by an exception kills it.
    """

    @property
    def stdout(self) -> IO[bytes]: ...

    @property
    def stdin(self) -> IO[bytes] | None:
        """The first stage's stdin if the pipeline was started with ``stdin=subprocess.PIPE``."""

    @property
    def timed_out(self) -> bool: ...

    def kill(self) -> None: ...

    def wait(self) -> list[StageResult]: ...

    def describe(self) -> str: ...

    def __enter__(self) -> Self: ...

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None: ...


class StagesBase(ABC):
    """What every pipeline, real or fake, does the same way: describe it, and never let it
    outlive a reader that gave up (error, SIGTERM) — kill, then reap."""

    shown: list[tuple[str, ...]]
    _waited: bool

    @abstractmethod
    def kill(self) -> None: ...

    @abstractmethod
    def wait(self) -> list[StageResult]: ...

    def describe(self) -> str:
        return describe(self.shown)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc is not None and not self._waited:
            self.kill()
            try:
                self.wait()
            except CommandError:
                pass


class Pipeline(StagesBase):
    """A running pipeline: read ``stdout``, then ``wait()`` (or use it as a context manager)."""

    def __init__(self, stages: Sequence[Stage], shown: Sequence[tuple[str, ...]],
                 procs: Sequence[subprocess.Popen[bytes]], errs: Sequence[IO[bytes]],
                 deadline: Deadline, mask: Callable[[str], str]) -> None:
        self.stages = list(stages)
        self.shown = list(shown)
        self.procs = list(procs)
        self._errs = list(errs)
        self.deadline = deadline
        self._mask = mask
        self.timed_out = False
        self._waited = False
        last = self.procs[-1].stdout
        assert last is not None
        self.stdout: IO[bytes] = last
        self.stdin: IO[bytes] | None = self.procs[0].stdin
        self._watchdog = threading.Timer(deadline.remaining(), self._expire)
        self._watchdog.daemon = True
        self._watchdog.start()

    @property
    def pgid(self) -> int:
        return self.procs[0].pid

    def _expire(self) -> None:
        # a blocked read of stdout returns EOF once the group is gone
        self.timed_out = True
        self.kill()

    def kill(self) -> None:
        kill_group(self.pgid)

    def wait(self) -> list[StageResult]:
        """Wait for every stage; raise naming each stage that failed (or the timeout)."""
        if self._waited:
            raise RuntimeError("pipeline already waited for")
        self._waited = True
        results: list[StageResult] = []
        try:
            for stage, shown, proc, err in zip(self.stages, self.shown, self.procs, self._errs,
                                               strict=True):
                # a plain blocking wait: Popen.wait(timeout) polls (sleeps up to 50 ms a
                # turn), and the watchdog already kills the group at the deadline
                rc = proc.wait()
                err.seek(0)
                stderr = self._mask(err.read().decode("utf-8", errors="replace"))
                if rc < 0:
                    rc = 128 - rc
                results.append(StageResult(tuple(shown), rc, code_name(stage, rc), stderr))
        finally:
            self._watchdog.cancel()
            self.stdout.close()
            if self.stdin is not None and not self.stdin.closed:
                try:
                    self.stdin.close()
                except OSError:  # the stage is gone; nothing more to tell it
                    pass
            for err in self._errs:
                err.close()
        return check_results(results, self.shown, self.timed_out)



def code_name(stage: Stage, returncode: int) -> str:
    """The name ``stage`` gives ``returncode`` ("ok" for 0), or "error"."""
    return {0: "ok", **(stage.ok_codes or {})}.get(returncode, "error")


def describe(shown: Sequence[tuple[str, ...]]) -> str:
    """The pipeline as its errors name it: ``tar | zstd``."""
    return " | ".join(s[0] for s in shown)


def check_results(results: list[StageResult], shown: Sequence[tuple[str, ...]],
                  timed_out: bool) -> list[StageResult]:
    """Raise for a timeout or for each stage whose exit code was not tolerated."""
    if timed_out:
        raise CommandTimeoutError(f"pipeline {describe(shown)} timed out and was killed",
                                  argv=shown[0])
    failed = [r for r in results if r.code_name == "error"]
    if failed:
        parts = [f"{r.argv[0]} exited {r.returncode}: {error_detail(r.stderr)}" for r in failed]
        raise CommandError(f"pipeline {describe(shown)} failed: {'; '.join(parts)}",
                           argv=failed[0].argv, returncode=failed[0].returncode,
                           stderr=failed[0].stderr)
    return results


def start(stages: Sequence[Stage], shown: Sequence[tuple[str, ...]], *,
          env: dict[str, str], timeout: float, stdin: IO[bytes] | int | None,
          mask: Callable[[str], str], cwd: str | None = None) -> Pipeline:
    """Start ``stages`` joined by pipes in one new process group (see :meth:`Runner.pipeline`).

    Every executable is looked up before anything starts, so a missing tool
    raises ``process.NotFound`` with nothing to clean up.
    """
    exes = [require_executable(fs_str(stage.argv[0]), env) for stage in stages]
    procs: list[subprocess.Popen[bytes]] = []
    errs: list[IO[bytes]] = []
    prev: IO[bytes] | int | None = subprocess.DEVNULL if stdin is None else stdin
    # a stop signal raised between a fork and Popen's return would leave a child no list
    # holds, and one raised inside the watchdog's Thread.start hangs the interpreter at
    # exit: it is held back until the pipeline is started (or cleaned up)
    with deferred_signals():
        try:
            for i, (stage, exe) in enumerate(zip(stages, exes, strict=True)):
                err: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115 (closed by wait())
                errs.append(err)
                proc = subprocess.Popen(
                    [exe, *(fs_str(a) for a in stage.argv[1:])], stdin=prev,
                    stdout=subprocess.PIPE, stderr=err,
                    env=env, close_fds=True, cwd=cwd,
                    # one group for all stages: the first stage leads it
                    process_group=0 if i == 0 else procs[0].pid)
                before = procs[i - 1].stdout if i > 0 else None
                if before is not None:
                    before.close()  # only the next stage holds the pipe now
                procs.append(proc)
                prev = proc.stdout
            for end in (procs[0].stdin, procs[-1].stdout):  # the ends Python reads or writes
                if end is not None:
                    widen_pipe(end.fileno())
            return Pipeline(stages, shown, procs, errs, Deadline.after(timeout), mask)
        except BaseException:
            if procs:
                kill_group(procs[0].pid)
                for p in procs:
                    p.wait()
            for err in errs:
                err.close()
            raise

