"""Test doubles for the process layer: a recording :class:`FakeRunner` and what it returns.

Production code never imports this module (a unit test checks it); it
imports production code, so the fakes apply the very masking, logging and
exit-code policy of :class:`~sanoffload.runner.Runner` and the same checks
as a real :class:`~sanoffload.pipeline.Pipeline`. Answers should be real
outputs recorded from real tools (tests/fixtures), not invented ones.
"""

from __future__ import annotations

import io
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

from .errors import CommandTimeoutError
from .pipeline import (
    PipelineLike,
    Stage,
    StageResult,
    StagesBase,
    check_results,
    code_name,
)
from .process import NotFound, RawResult, Spawned, TimedOut, fs_str
from .runner import Runner

__all__ = ["Call", "FakePipeline", "FakeRunner", "FakeSpawned", "Rule"]


@dataclass
class Rule:
    """One scripted answer: matches calls whose argv starts with ``prefix``."""

    prefix: tuple[str, ...]
    returncode: int = 0
    stdout: str | bytes = ""
    stderr: str | bytes = ""
    timeout: bool = False
    not_found: bool = False
    times: int | None = None  # None: any number of times
    action: Callable[[list[str]], None] | None = None
    used: int = 0

    def matches(self, argv: Sequence[str]) -> bool:
        if self.times is not None and self.used >= self.times:
            return False
        return tuple(argv[: len(self.prefix)]) == self.prefix


@dataclass
class Call:
    """One recorded call: ``argv`` as the command would get it (bytes in their fsdecode form)."""

    argv: list[str]
    timeout: float
    input: bytes | str | None
    env: dict[str, str] = field(default_factory=dict)
    pass_fds: tuple[int, ...] = ()


class FakeRunner(Runner):
    """Answers from scripted rules and records every call.

    The same masking, logging and exit-code policy as
    :class:`~sanoffload.runner.CommandRunner` applies, so error paths behave
    exactly as they would for real. A call that no rule matches fails the
    test loudly.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.rules: list[Rule] = []
        self.calls: list[Call] = []

    def on(self, *prefix: str, returncode: int = 0, stdout: str | bytes = "",
           stderr: str | bytes = "", timeout: bool = False, not_found: bool = False,
           times: int | None = None,
           action: Callable[[list[str]], None] | None = None) -> FakeRunner:
        """Script the answer for calls starting with ``prefix``; later rules win."""
        self.rules.insert(0, Rule(tuple(prefix), returncode, stdout, stderr, timeout,
                                  not_found, times, action))
        return self

    def argvs(self) -> list[list[str]]:
        return [c.argv for c in self.calls]

    def called(self, *prefix: str) -> bool:
        return any(tuple(c.argv[: len(prefix)]) == prefix for c in self.calls)

    def _answer(self, argv: list[str], what: str) -> Rule:
        """The rule answering ``argv`` (its action run); unmatched calls fail the test."""
        for rule in self.rules:
            if rule.matches(argv):
                rule.used += 1
                if rule.action:
                    rule.action(argv)
                if rule.not_found:
                    raise NotFound()
                return rule
        raise AssertionError(f"FakeRunner: no rule for {what}{argv!r}")

    def _spawn(self, argv: list[str], *, pass_fds: tuple[int, ...], log_path: str | None,
               env: dict[str, str]) -> Spawned:
        self.calls.append(Call(list(argv), 0.0, None, env))
        rule = self._answer(argv, "spawn ")
        return FakeSpawned(argv, rule.returncode, running=rule.timeout)

    def _pipeline(self, stages: list[Stage], shown: list[tuple[str, ...]], *, timeout: float,
                  stdin: IO[bytes] | int | None, env: dict[str, str],
                  mask: Callable[[str], str], cwd: str | None = None) -> PipelineLike:
        """Each stage answered by its rule; the last stage's stdout is what is read."""
        rules = []
        for stage in stages:
            argv = [fs_str(a) for a in stage.argv]
            self.calls.append(Call(argv, timeout, None, env))
            rules.append(self._answer(argv, "pipeline stage "))
        return FakePipeline(stages, shown, io.BytesIO(_enc(rules[-1].stdout)),
                            [(r.returncode, _enc(r.stderr).decode()) for r in rules],
                            timed_out=any(r.timeout for r in rules), mask=mask,
                            stdin=_Sink() if stdin == subprocess.PIPE else None)

    def _execute(self, argv: list[str], *, timeout: float, input: bytes | str | None,
                 cwd: str | None, env: dict[str, str],
                 pass_fds: tuple[int, ...] = ()) -> RawResult:
        self.calls.append(Call(list(argv), timeout, input, env, pass_fds))
        rule = self._answer(argv, "")
        if rule.timeout:
            raise TimedOut(_enc(rule.stdout), _enc(rule.stderr))
        return RawResult(rule.returncode, _enc(rule.stdout), _enc(rule.stderr))


class FakeSpawned(Spawned):
    """A scripted helper: exits with the rule's code, or runs until killed (timeout=True)."""

    def __init__(self, argv: Sequence[str], returncode: int, *, running: bool) -> None:
        super().__init__(argv, pid=0)
        self.returncode = returncode
        self.running = running
        self.killed = False

    def poll(self) -> int | None:
        return None if self.running else self.returncode

    def wait(self, timeout: float) -> int:
        if self.running:
            raise CommandTimeoutError(f"{self.argv[0]} still running after {timeout:.0f}s",
                                      argv=self.argv)
        return self.returncode

    def kill(self) -> None:
        self.killed = True
        self.running = False
        self.returncode = 137


class _Sink(io.BytesIO):
    """A pipeline's stdin: keeps what was written after the writer closes it."""

    def __init__(self) -> None:
        super().__init__()
        self.written = b""

    def close(self) -> None:
        if not self.closed:
            self.written = self.getvalue()
        super().close()


class FakePipeline(StagesBase):
    """What FakeRunner.pipeline returns: scripted output and exit codes, the real checks.

    It implements :class:`~sanoffload.pipeline.PipelineLike` in full, like
    :class:`~sanoffload.pipeline.Pipeline`: ``stdin`` is a sink (when started
    with ``stdin=subprocess.PIPE``) whose bytes stay in :attr:`written`;
    ``wait()`` closes the streams and may be called once.
    """

    def __init__(self, stages: Sequence[Stage], shown: Sequence[tuple[str, ...]],
                 stdout: IO[bytes], outcomes: Sequence[tuple[int, str]], *, timed_out: bool,
                 mask: Callable[[str], str], stdin: IO[bytes] | None = None) -> None:
        self.stages, self.shown, self._stdout = list(stages), list(shown), stdout
        self._stdin = stdin
        self._outcomes, self._timed_out, self._mask = list(outcomes), timed_out, mask
        self.killed = False
        self._waited = False

    @property
    def stdout(self) -> IO[bytes]:
        return self._stdout

    @property
    def stdin(self) -> IO[bytes] | None:
        return self._stdin

    @property
    def timed_out(self) -> bool:
        return self._timed_out

    @property
    def written(self) -> bytes:
        """What the caller wrote to ``stdin``."""
        if isinstance(self._stdin, _Sink):
            return self._stdin.written if self._stdin.closed else self._stdin.getvalue()
        return b""

    def kill(self) -> None:
        self.killed = True

    def wait(self) -> list[StageResult]:
        if self._waited:
            raise RuntimeError("pipeline already waited for")
        self._waited = True
        results = [StageResult(tuple(shown), rc, code_name(stage, rc), self._mask(err))
                   for stage, shown, (rc, err) in zip(self.stages, self.shown, self._outcomes,
                                                      strict=True)]
        self._stdout.close()
        if self._stdin is not None:
            self._stdin.close()
        return check_results(results, self.shown, self._timed_out)



def _enc(data: str | bytes) -> bytes:
    return data.encode() if isinstance(data, str) else data
