"""Pre-freeze / post-thaw hooks: who may be a hook, how they run, what a failure does."""

from __future__ import annotations

import io
import json
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO

import pytest

from sanoffload.agent.hooks import (
    HOLD,
    POST_THAW,
    PRE_FREEZE,
    Holding,
    Hook,
    HookFailure,
    Hooks,
    check_hook,
    check_hooks,
    fit_held,
    held_text,
    run_post_thaw,
    run_pre_freeze,
    stderr_tail,
)
from sanoffload.channel.messages import MAX_HELD_JSON, MAX_HELD_OUTPUT, HeldOutput, check_held
from sanoffload.errors import FreezeError, RefusedError
from sanoffload.pipeline import PipelineLike, Stage, StageResult, StagesBase, check_results
from sanoffload.process import fs_str
from sanoffload.testing import Call, FakeRunner

pytestmark = pytest.mark.unit

ME = os.getuid()
MP = "/srv/data"
PATH = "/srv/data/db"


def make_hook(path: Path, mode: int = 0o755) -> str:
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(mode)
    return str(path)


@pytest.fixture
def hookdir(tmp_path: Path) -> Path:
    d = tmp_path / "hooks"
    d.mkdir(mode=0o755)
    return d


# --------------------------------------------------------------------------
# who may be a hook
# --------------------------------------------------------------------------

def test_a_private_executable_is_accepted(hookdir: Path) -> None:
    check_hook(Hook(make_hook(hookdir / "ok")), trusted_uid=ME)


def test_relative_path_is_refused() -> None:
    with pytest.raises(RefusedError, match="absolute path") as info:
        check_hook(Hook("hooks/flush-db"), trusted_uid=ME)
    assert info.value.exit_code == 3


def test_missing_hook_is_refused(hookdir: Path) -> None:
    with pytest.raises(RefusedError, match="No such file"):
        check_hook(Hook(str(hookdir / "nope")), trusted_uid=ME)


def test_not_executable_is_refused(hookdir: Path) -> None:
    with pytest.raises(RefusedError, match="not executable"):
        check_hook(Hook(make_hook(hookdir / "h", 0o644)), trusted_uid=ME)


def test_directory_is_refused(hookdir: Path) -> None:
    with pytest.raises(RefusedError, match="not a regular file"):
        check_hook(Hook(str(hookdir)), trusted_uid=ME)


@pytest.mark.parametrize("mode", [0o775, 0o757, 0o777])
def test_group_or_world_writable_hook_is_refused(hookdir: Path, mode: int) -> None:
    with pytest.raises(RefusedError, match=f"group- or world-writable \\(mode {mode:04o}\\)") \
            as info:
        check_hook(Hook(make_hook(hookdir / "h", mode)), trusted_uid=ME)
    assert info.value.hint == f"chmod go-w {hookdir / 'h'}"


def test_hook_not_owned_by_root_is_refused(hookdir: Path) -> None:
    path = make_hook(hookdir / "h")
    if os.geteuid() == 0:
        os.chown(path, 12345, -1)  # as root: give it away; as a user it is already not root's
    with pytest.raises(RefusedError, match="owned by uid .*, must be owned by root"):
        check_hook(Hook(path), trusted_uid=0)


def test_hook_in_a_writable_directory_is_refused(hookdir: Path) -> None:
    path = make_hook(hookdir / "h")
    hookdir.chmod(0o777)  # anyone could rename it away and put their own in its place
    with pytest.raises(RefusedError, match=f"directory {hookdir} is group- or world-writable"):
        check_hook(Hook(path), trusted_uid=ME)


def test_hook_in_a_sticky_directory_is_accepted(hookdir: Path) -> None:
    path = make_hook(hookdir / "h")
    hookdir.chmod(0o1777)  # like /tmp: others cannot rename or remove what is not theirs
    check_hook(Hook(path), trusted_uid=ME)


def test_symlink_is_judged_by_its_target(hookdir: Path) -> None:
    target = make_hook(hookdir / "real", 0o777)
    (hookdir / "link").symlink_to(target)
    with pytest.raises(RefusedError, match="world-writable"):
        check_hook(Hook(str(hookdir / "link")), trusted_uid=ME)


def test_check_hooks_covers_post_thaw_hooks_too(hookdir: Path) -> None:
    hooks = Hooks.from_paths([make_hook(hookdir / "pre")], [make_hook(hookdir / "post", 0o777)],
                             trusted_uid=ME)
    with pytest.raises(RefusedError, match="post"):
        check_hooks(hooks)


# --------------------------------------------------------------------------
# running them
# --------------------------------------------------------------------------

def test_pre_freeze_hooks_run_in_order_with_env_and_timeout(hookdir: Path) -> None:
    a, b = make_hook(hookdir / "a"), make_hook(hookdir / "b")
    hooks = Hooks((Hook(a, 7), Hook(b, 9)), (), trusted_uid=ME)
    runner = FakeRunner().on(a).on(b)
    run_pre_freeze(runner, hooks, MP, PATH)
    assert runner.argvs() == [[a], [b]]
    assert [c.timeout for c in runner.calls] == [7, 9]
    env = runner.calls[0].env
    assert env["SANOFFLOAD_PHASE"] == PRE_FREEZE == "pre-freeze"
    assert env["SANOFFLOAD_MOUNTPOINT"] == MP and env["SANOFFLOAD_PATH"] == PATH
    assert env["LC_ALL"] == "C"  # the runner's minimal environment, plus ours


def test_failing_pre_freeze_hook_raises_freeze_error_with_stderr_tail(hookdir: Path) -> None:
    a, b = make_hook(hookdir / "flush-db"), make_hook(hookdir / "b")
    hooks = Hooks.from_paths([a, b], trusted_uid=ME)
    noise = "".join(f"line {i}\n" for i in range(20))
    runner = FakeRunner().on(a, returncode=3, stderr=noise + "db: cannot lock tables\n").on(b)
    with pytest.raises(FreezeError) as info:
        run_pre_freeze(runner, hooks, MP, PATH)
    msg = str(info.value)
    assert f"pre-freeze hook {a} failed (exit 3)" in msg
    assert "nothing was frozen" in msg
    assert msg.endswith("line 16 | line 17 | line 18 | line 19 | db: cannot lock tables")
    assert info.value.exit_code == 9
    assert not runner.called(b), "hooks after a failing one must not run"


def test_pre_freeze_hook_timeout_is_a_freeze_error(hookdir: Path) -> None:
    a = make_hook(hookdir / "slow")
    runner = FakeRunner().on(a, timeout=True, stderr="still flushing\n")
    with pytest.raises(FreezeError, match="slow timed out after 60s; nothing was frozen: "
                                          "still flushing"):
        run_pre_freeze(runner, Hooks.from_paths([a], trusted_uid=ME), MP, PATH)


def test_pre_freeze_hook_changed_since_the_check_is_refused(hookdir: Path) -> None:
    a = make_hook(hookdir / "a")
    hooks = Hooks.from_paths([a], trusted_uid=ME)
    check_hooks(hooks)
    Path(a).chmod(0o777)
    runner = FakeRunner()
    with pytest.raises(RefusedError):
        run_pre_freeze(runner, hooks, MP, PATH)
    assert runner.calls == []


def test_post_thaw_failures_are_collected_and_every_hook_runs(hookdir: Path) -> None:
    a, b, c = (make_hook(hookdir / n) for n in ("a", "b", "c"))
    hooks = Hooks.from_paths([], [a, b, c], trusted_uid=ME)
    runner = FakeRunner().on(a, returncode=2, stderr="resume failed\n").on(b, timeout=True).on(c)
    failures = run_post_thaw(runner, hooks, MP, PATH)
    assert runner.argvs() == [[a], [b], [c]]
    assert all(call.env["SANOFFLOAD_PHASE"] == POST_THAW for call in runner.calls)
    assert [f.hook.path for f in failures] == [a, b]
    assert failures[0].returncode == 2 and failures[0].stderr_tail == "resume failed"
    assert failures[0].phase == "post-thaw"
    assert "timed out" in failures[1].message


def test_refused_post_thaw_hook_is_a_failure_not_an_exception(hookdir: Path) -> None:
    a, b = make_hook(hookdir / "a"), make_hook(hookdir / "b")
    Path(a).chmod(0o777)
    runner = FakeRunner().on(b)
    failures = run_post_thaw(runner, Hooks.from_paths([], [a, b], trusted_uid=ME), MP, PATH)
    assert runner.argvs() == [[b]]
    assert len(failures) == 1 and "world-writable" in failures[0].message


def test_stderr_tail_is_bounded() -> None:
    assert stderr_tail("") == ""
    assert stderr_tail("a\n\nb\n") == "a | b"
    assert len(stderr_tail("x" * 10_000)) == 500



# --------------------------------------------------------------------------
# holding hooks: a scripted hook behind a real pipe
# --------------------------------------------------------------------------

class _LetGo(io.BytesIO):
    """A holding hook's stdin: closing it is "let go"."""

    def __init__(self, on_close: Callable[[], None]) -> None:
        super().__init__()
        self._on_close = on_close

    def close(self) -> None:
        if not self.closed:
            super().close()
            self._on_close()


class ScriptedHold(StagesBase):
    """A holding hook as a FakeRunner pipeline: its stdout a real pipe, so reads block as they
    would on a live hook.

    Started, it prints ``before`` (``READY\\n`` by default) and notes ``NAME-start`` in
    ``events``; once its stdin is closed it notes ``NAME-let-go``, prints ``after`` and ends
    with ``returncode`` (and ``stderr``). ``hang``: it never ends until killed;
    ``exits_early``: it ends right after ``before``.
    """

    def __init__(self, before: bytes = b"READY\n", after: bytes = b"", returncode: int = 0,
                 stderr: str = "", *, events: list[str] | None = None, name: str = "hold",
                 hang: bool = False, exits_early: bool = False) -> None:
        self.before, self.after, self.returncode, self.stderr = before, after, returncode, stderr
        self.events = events if events is not None else []
        self.name, self.hang, self.exits_early = name, hang, exits_early
        self.shown = [(name,)]
        self.stages = [Stage([name])]
        self._waited = False
        self.killed = False
        self.env: dict[str, str] = {}
        r, w = os.pipe()
        self._stdout = os.fdopen(r, "rb")
        self._w: int | None = w
        self._ended = threading.Event()
        self._stdin = _LetGo(self._let_go)

    # -- what HoldRunner does ------------------------------------------------
    def started(self, env: dict[str, str]) -> None:
        self.env = env
        self.events.append(f"{self.name}-start")
        if self.before:
            assert self._w is not None
            os.write(self._w, self.before)
        if self.exits_early:
            self._end()

    def _let_go(self) -> None:
        self.events.append(f"{self.name}-let-go")
        if self.hang or self._w is None:
            return
        os.write(self._w, self.after)  # the hold's reader thread drains it
        self._end()

    def _end(self) -> None:
        if self._w is not None:
            os.close(self._w)
            self._w = None
        self._ended.set()

    # -- PipelineLike ----------------------------------------------------------
    @property
    def stdout(self) -> IO[bytes]:
        return self._stdout

    @property
    def stdin(self) -> IO[bytes] | None:
        return self._stdin

    @property
    def timed_out(self) -> bool:
        return False

    def kill(self) -> None:
        self.killed = True
        self.returncode = 137
        self.events.append(f"{self.name}-killed")
        self._end()

    def wait(self) -> list[StageResult]:
        if self._waited:
            raise RuntimeError("pipeline already waited for")
        self._waited = True
        assert self._ended.wait(30), "a scripted hold was never ended"
        self._stdout.close()
        rc = self.returncode
        return check_results([StageResult((self.name,), rc, "ok" if rc == 0 else "error",
                                          self.stderr)], self.shown, False)


class HoldRunner(FakeRunner):
    """A FakeRunner whose pipelines for the given paths are scripted holding hooks."""

    def __init__(self) -> None:
        super().__init__()
        self.holds: dict[str, ScriptedHold] = {}

    def hold(self, path: str, script: ScriptedHold) -> ScriptedHold:
        self.holds[path] = script
        return script

    def _pipeline(self, stages: list[Stage], shown: list[tuple[str, ...]], *, timeout: float,
                  stdin: IO[bytes] | int | None, env: dict[str, str],
                  mask: Callable[[str], str], cwd: str | None = None) -> PipelineLike:
        argv = [fs_str(a) for a in stages[0].argv]
        script = self.holds.get(argv[0])
        if script is None:
            return super()._pipeline(stages, shown, timeout=timeout, stdin=stdin, env=env,
                                     mask=mask, cwd=cwd)
        assert len(stages) == 1 and stdin is not None  # one stage, and a stdin to close
        assert cwd == "/"  # never inside the filesystem being frozen
        self.calls.append(Call(argv, timeout, None, env))
        script.started(env)
        return script


def holding_hooks(hookdir: Path, *names: str, ready_s: float = 5, timeout: float = 5) -> Hooks:
    return Hooks.from_paths([], [], [make_hook(hookdir / n) for n in names], timeout=timeout,
                            hold_ready_s=ready_s, trusted_uid=ME)


def test_holding_hooks_say_ready_in_order_then_let_go_newest_first(hookdir: Path) -> None:
    hooks = holding_hooks(hookdir, "db", "app")
    runner = HoldRunner()
    events: list[str] = []
    for hook, text in zip(hooks.hold, (b"LABEL: db\n", b"app\tok\n"), strict=True):
        runner.hold(hook.path, ScriptedHold(after=text, events=events, name=hook.name))
    holding = Holding.start(runner, hooks, MP, PATH, life_s=500)
    assert events == ["db-start", "app-start"]
    held, failures = holding.let_go()
    assert events[2:] == ["app-let-go", "db-let-go"]
    assert held == (HeldOutput(hooks.hold[0].path, "LABEL: db\n"),
                    HeldOutput(hooks.hold[1].path, "app\tok\n"))
    assert failures == ()
    assert [c.env["SANOFFLOAD_PHASE"] for c in runner.calls] == [HOLD, HOLD] == ["hold"] * 2
    assert runner.calls[0].env["SANOFFLOAD_PATH"] == PATH
    assert runner.calls[0].timeout == 500  # the pipeline's deadline: the hook's whole life


@pytest.mark.hostile("agent", "a holding hook that prints something other than READY first",
                     "FreezeError (exit 9), it is killed, the hooks before it let go")
@pytest.mark.parametrize("first", [b"READY?\n", b"ready\n", b"\x1b]0;owned\x07READY\n",
                                   b"x" * 10_000])
def test_a_hook_printing_something_else_first_is_refused(hookdir: Path, first: bytes) -> None:
    hooks = holding_hooks(hookdir, "db", "odd")
    runner = HoldRunner()
    events: list[str] = []
    runner.hold(hooks.hold[0].path, ScriptedHold(events=events, name="db"))
    odd = runner.hold(hooks.hold[1].path, ScriptedHold(first, events=events, name="odd",
                                                       hang=True))
    with pytest.raises(FreezeError, match="holding hook .*/odd said .* instead of READY; "
                                          "nothing was frozen") as info:
        Holding.start(runner, hooks, MP, PATH, life_s=500)
    assert info.value.exit_code == 9
    assert "\x1b" not in str(info.value) and len(str(info.value)) < 400
    assert odd.killed
    assert events == ["db-start", "odd-start", "odd-killed", "db-let-go"]


def test_a_hook_that_never_says_ready_times_out(hookdir: Path) -> None:
    hooks = holding_hooks(hookdir, "slow", ready_s=0.2)
    runner = HoldRunner()
    slow = runner.hold(hooks.hold[0].path, ScriptedHold(b"", hang=True))
    with pytest.raises(FreezeError, match="did not say READY within 0.2s; nothing was frozen"):
        Holding.start(runner, hooks, MP, PATH, life_s=500)
    assert slow.killed


def test_a_hook_that_exits_before_ready_says_why(hookdir: Path) -> None:
    hooks = holding_hooks(hookdir, "db")
    runner = HoldRunner()
    runner.hold(hooks.hold[0].path, ScriptedHold(b"", returncode=2, exits_early=True,
                                                 stderr="ERROR 1045: Access denied\n"))
    with pytest.raises(FreezeError, match="ended before it said READY \\(exit 2\\); nothing was "
                                          "frozen: ERROR 1045: Access denied"):
        Holding.start(runner, hooks, MP, PATH, life_s=500)


def test_a_hook_failing_after_the_thaw_is_a_warning(hookdir: Path) -> None:
    hooks = holding_hooks(hookdir, "db")
    runner = HoldRunner()
    runner.hold(hooks.hold[0].path, ScriptedHold(after=b"partial\n", returncode=3,
                                                 stderr="unlock: lost connection\n"))
    held, (failure,) = Holding.start(runner, hooks, MP, PATH, life_s=500).let_go()
    assert failure.warning() == (f"hold hook {hooks.hold[0].path} failed (exit 3): "
                                 "unlock: lost connection")
    assert held == (HeldOutput(hooks.hold[0].path, "partial\n"),)


def test_a_hook_that_does_not_let_go_in_time_is_killed_and_a_warning(hookdir: Path) -> None:
    hooks = holding_hooks(hookdir, "stuck", timeout=0.2)
    runner = HoldRunner()
    stuck = runner.hold(hooks.hold[0].path, ScriptedHold(hang=True))
    _held, (failure,) = Holding.start(runner, hooks, MP, PATH, life_s=500).let_go()
    assert stuck.killed
    assert failure.what == "timed out" and "killed" in failure.warning()


def test_a_hook_that_ended_before_it_was_told_is_a_warning(hookdir: Path) -> None:
    hooks = holding_hooks(hookdir, "quitter")
    runner = HoldRunner()
    runner.hold(hooks.hold[0].path, ScriptedHold(b"READY\nbye\n", exits_early=True))
    holding = Holding.start(runner, hooks, MP, PATH, life_s=500)
    holding.holders[0]._done.wait(5)  # it is gone before anyone told it to let go
    held, (failure,) = holding.let_go()
    assert failure.what == "let go early" and "may not have held its lock" in failure.warning()
    assert held == (HeldOutput(hooks.hold[0].path, "bye\n"),)


@pytest.mark.hostile("agent", "a holding hook printing 1 MiB with escape sequences and "
                     "invalid UTF-8 after READY",
                     "kept escaped (newline and tab as they are), cut to 64 KiB, a warning")
def test_a_hooks_output_is_escaped_and_bounded(hookdir: Path) -> None:
    hooks = holding_hooks(hookdir, "chatty")
    runner = HoldRunner()
    after = b"a\tb\x1b[2J\xff\r\n" + b"y" * (1 << 20)
    runner.hold(hooks.hold[0].path, ScriptedHold(after=after))
    (held,), (failure,) = Holding.start(runner, hooks, MP, PATH, life_s=500).let_go()
    assert held.output.startswith("a\tb\\x1b[2J\\xff\\r\nyyy")
    assert len(held.output.encode()) == MAX_HELD_OUTPUT
    assert failure.what == "output cut"
    check_held((held,))  # what the proxy and the store accept


def test_held_text_keeps_lines_and_escapes_the_rest() -> None:
    assert held_text(b"START WAL LOCATION: 0/2000028\nLABEL: x\tz\n") == \
        "START WAL LOCATION: 0/2000028\nLABEL: x\tz\n"
    assert held_text(b"\x1b]0;t\x07\r\xe2\x80\xae\xff") == "\\x1b]0;t\\x07\\r\\u202e\\xff"


def test_outputs_together_are_cut_to_what_the_wire_takes() -> None:
    outs = [HeldOutput(f"/h{i}", "\u00e9" * 30_000) for i in range(8)]  # 6 bytes each as JSON
    kept, failures = fit_held(outs, [])
    assert len(json.dumps([h.to_wire() for h in kept])) <= MAX_HELD_JSON
    assert [h.hook for h in kept] == [h.hook for h in outs]
    assert kept[0] == outs[0] and len(failures) >= 1
    assert all(f.what == "output cut" and f.phase == HOLD for f in failures)
    check_held(kept)


def test_more_than_eight_holding_hooks_are_refused(hookdir: Path) -> None:
    hooks = holding_hooks(hookdir, *(f"h{i}" for i in range(9)))
    with pytest.raises(RefusedError, match="at most 8"):
        check_hooks(hooks)


def test_check_hooks_covers_holding_hooks(hookdir: Path) -> None:
    hooks = holding_hooks(hookdir, "db")
    Path(hooks.hold[0].path).chmod(0o777)
    with pytest.raises(RefusedError, match="world-writable"):
        check_hooks(hooks)


def test_a_holding_hook_warning_names_its_phase() -> None:
    failure = HookFailure(Hook("/h/db"), HOLD, "x", 1, "said\x1b[2Jno")
    assert failure.warning() == "hold hook /h/db failed (exit 1): said\\x1b[2Jno"
