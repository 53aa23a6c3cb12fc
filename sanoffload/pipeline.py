"""Streaming pipelines for the runner: ``tar ... | zstd ...`` whose output Python reads.

Stages are joined by kernel pipes, so bytes go from one tool to the next
without passing through Python; only the last stage's output is read here
(for hashing and sending). ``sh`` pipes through Python threads, which would
cost a copy per byte, so this is the one place that uses ``subprocess``.

Every stage runs in one new process group: a deadline, an error or an
interruption kills the whole pipeline at once. Each stage's stderr goes to a
temporary file (a pipe could fill and stall the stage) and ends up, masked,
in the error naming the failed stage.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Any

from .errors import CommandError, CommandTimeoutError
from .text import printable

OkCodes = Mapping[int, str]
#: one argv element: Linux paths are bytes, so bytes (and paths) are as good as str
Arg = str | bytes | os.PathLike[str] | os.PathLike[bytes] | int


def fs_str(arg: Arg) -> str:
    """``arg`` as the str that encodes back to its exact bytes (``os.fsdecode``'s surrogateescape)."""
    if isinstance(arg, int):
        return str(arg)
    return os.fsdecode(arg)


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


class Pipeline:
    """A running pipeline: read ``stdout``, then ``wait()`` (or use it as a context manager)."""

    def __init__(self, stages: Sequence[Stage], shown: Sequence[tuple[str, ...]],
                 procs: Sequence[subprocess.Popen[bytes]], errs: Sequence[IO[bytes]],
                 deadline: float, mask: Callable[[str], str]) -> None:
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
        #: the first stage's stdin when the pipeline was started with ``stdin=subprocess.PIPE``
        self.stdin: IO[bytes] | None = self.procs[0].stdin
        self._watchdog = threading.Timer(max(0.0, deadline - time.monotonic()), self._expire)
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
        try:
            os.killpg(self.pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def wait(self) -> list[StageResult]:
        """Wait for every stage; raise naming each stage that failed (or the timeout)."""
        if self._waited:
            raise RuntimeError("pipeline already waited for")
        self._waited = True
        results: list[StageResult] = []
        try:
            for stage, shown, proc, err in zip(self.stages, self.shown, self.procs, self._errs):
                remaining = max(0.1, self.deadline - time.monotonic())
                try:
                    rc = proc.wait(timeout=remaining)
                except subprocess.TimeoutExpired:
                    self.timed_out = True
                    self.kill()
                    rc = proc.wait()
                err.seek(0)
                stderr = self._mask(err.read().decode("utf-8", errors="replace"))
                codes = {0: "ok", **(stage.ok_codes or {})}
                if rc < 0:
                    rc = 128 - rc
                results.append(StageResult(tuple(shown), rc, codes.get(rc, "error"), stderr))
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
        return _check(results, self.shown, self.timed_out)

    def describe(self) -> str:
        return _describe(self.shown)

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if exc is not None and not self._waited:
            # the reader gave up (error, SIGTERM): nothing of the pipeline may outlive it
            self.kill()
            try:
                self.wait()
            except CommandError:
                pass


def _describe(shown: Sequence[tuple[str, ...]]) -> str:
    return " | ".join(s[0] for s in shown)


def _check(results: list[StageResult], shown: Sequence[tuple[str, ...]],
           timed_out: bool) -> list[StageResult]:
    """Raise for a timeout or for each stage whose exit code was not tolerated."""
    if timed_out:
        raise CommandTimeoutError(f"pipeline {_describe(shown)} timed out and was killed",
                                  argv=shown[0])
    failed = [r for r in results if r.code_name == "error"]
    if failed:
        parts = [f"{r.argv[0]} exited {r.returncode}: {error_detail(r.stderr)}" for r in failed]
        raise CommandError(f"pipeline {_describe(shown)} failed: {'; '.join(parts)}",
                           argv=failed[0].argv, returncode=failed[0].returncode,
                           stderr=failed[0].stderr)
    return results


class FakePipeline:
    """What FakeRunner.pipeline returns: scripted output and exit codes, same checks."""

    def __init__(self, stages: Sequence[Stage], shown: Sequence[tuple[str, ...]],
                 stdout: IO[bytes], outcomes: Sequence[tuple[int, str]], *, timed_out: bool,
                 mask: Callable[[str], str]) -> None:
        self.stages, self.shown, self.stdout = list(stages), list(shown), stdout
        self._outcomes, self.timed_out, self._mask = list(outcomes), timed_out, mask
        self.killed = False

    def kill(self) -> None:
        self.killed = True

    def wait(self) -> list[StageResult]:
        results = []
        for stage, shown, (rc, err) in zip(self.stages, self.shown, self._outcomes):
            codes = {0: "ok", **(stage.ok_codes or {})}
            results.append(StageResult(tuple(shown), rc, codes.get(rc, "error"), self._mask(err)))
        return _check(results, self.shown, self.timed_out)

    def __enter__(self) -> FakePipeline:
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if exc is not None:
            self.kill()


def start(stages: Sequence[Stage], shown: Sequence[tuple[str, ...]], *,
          env: dict[str, str], timeout: float, stdin: IO[bytes] | int | None,
          mask: Callable[[str], str], resolve: Callable[[str], str | None]) -> Pipeline:
    """Start ``stages`` joined by pipes (see :meth:`Runner.pipeline`)."""
    from .runner import _NotFound  # the runner turns this into CommandNotFoundError

    exes = []
    for stage in stages:
        exe = resolve(fs_str(stage.argv[0]))
        if exe is None:
            raise _NotFound(f"install the package that provides "
                            f"'{printable(os.fsencode(fs_str(stage.argv[0])))}'")
        exes.append(exe)
    procs: list[subprocess.Popen[bytes]] = []
    errs: list[IO[bytes]] = []
    prev: IO[bytes] | int | None = subprocess.DEVNULL if stdin is None else stdin
    try:
        for i, (stage, exe) in enumerate(zip(stages, exes)):
            err: IO[bytes] = tempfile.TemporaryFile()
            errs.append(err)
            proc = subprocess.Popen(
                [exe, *(fs_str(a) for a in stage.argv[1:])], stdin=prev,
                stdout=subprocess.PIPE, stderr=err,
                env=env, close_fds=True,
                # one group for all stages: the first stage leads it
                process_group=0 if i == 0 else procs[0].pid)
            before = procs[i - 1].stdout if i > 0 else None
            if before is not None:
                before.close()  # only the next stage holds the pipe now
            procs.append(proc)
            prev = proc.stdout
    except BaseException:
        if procs:
            try:
                os.killpg(procs[0].pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            for p in procs:
                p.wait()
        for err in errs:
            err.close()
        raise
    return Pipeline(stages, shown, procs, errs, time.monotonic() + timeout, mask)


#: what Runner.pipeline returns (the real one, or FakeRunner's)
PipelineLike = Pipeline | FakePipeline
