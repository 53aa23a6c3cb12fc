"""The quiesce step with a fake runner and a fake guard; the guard process on its own.

The real freeze, with a real guard thawing after SIGKILL or a deadline, is in
tests/host/test_freeze_guard.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import psutil
import pytest

from sanoffload.agent import guard as guard_mod
from sanoffload.agent.guard import FreezeGuard
from sanoffload.agent.hooks import Hooks
from sanoffload.agent.quiesce import quiesce_and_duplicate
from sanoffload.channel.messages import HeldOutput
from sanoffload.errors import (
    CommandError,
    ConfigError,
    FreezeError,
    Interrupted,
    RefusedError,
    UsageError,
)
from sanoffload.kinds import WhoFreezes
from sanoffload.runner import CommandRunner
from sanoffload.signals import install_signal_handlers
from sanoffload.testing import FakeRunner
from sanoffload.tools import fsfreeze
from tests.unit.test_hooks import HoldRunner, ScriptedHold

pytestmark = pytest.mark.unit

MP = "/srv/data"
EINVAL = "fsfreeze: /srv/data: unfreeze failed: Invalid argument\n"
EBUSY = "fsfreeze: /srv/data: freeze failed: Device or resource busy\n"


class FakeGuard:
    """Stands in for FreezeGuard: records what quiesce did to it; can be made to fire."""

    def __init__(self, events: list[str]) -> None:
        self.events = events
        self.disarmed = False
        self.fire = False
        self.created: list[tuple[str, float, Any]] = []

    def factory(self, runner: Any, mountpoint: str, deadline_s: float, *,
                state_dir: Any) -> FakeGuard:
        self.created.append((mountpoint, deadline_s, state_dir))
        return self

    def __enter__(self) -> FakeGuard:
        self.events.append("guard-arm")
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        # a real guard thaws on EOF when it was not disarmed
        self.events.append("guard-exit" if self.disarmed else "guard-exit-thaws")

    def disarm(self) -> None:
        self.events.append("guard-disarm")
        self.disarmed = True

    @property
    def fired(self) -> bool:
        return self.fire

    @property
    def report(self) -> dict[str, Any] | None:
        if self.fire:
            return {"fired": True, "reason": "deadline", "thaw": "thawed"}
        return {"fired": False, "reason": "disarmed", "thaw": "untouched"}


def make_hook(path: Path) -> str:
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(0o755)
    return str(path)


@pytest.fixture
def events() -> list[str]:
    return []


@pytest.fixture
def guard(events: list[str]) -> FakeGuard:
    return FakeGuard(events)


@pytest.fixture
def hooks(tmp_path: Path) -> Hooks:
    return Hooks.from_paths([make_hook(tmp_path / "pre")], [make_hook(tmp_path / "post")],
                            timeout=5, trusted_uid=os.getuid())


@pytest.fixture
def runner(events: list[str], hooks: Hooks) -> FakeRunner:
    """Every command quiesce runs succeeds and leaves its name in ``events``."""
    r = FakeRunner()

    def note(name: str) -> Any:
        return lambda argv: events.append(name)

    r.on("sync", "-f", action=note("sync"))
    r.on("fsfreeze", "--freeze", action=note("freeze"))
    r.on("fsfreeze", "--unfreeze", action=note("unfreeze"))
    r.on(hooks.pre_freeze[0].path, action=note("pre-hook"))
    r.on(hooks.post_thaw[0].path, action=note("post-hook"))
    return r


def run(runner: FakeRunner, guard: FakeGuard, hooks: Hooks, duplicate: Any,
        **kwargs: Any) -> Any:
    return quiesce_and_duplicate(runner, MP, duplicate, hooks=hooks, guard_factory=guard.factory,
                                 state_dir="/run/test-state", **kwargs)


# --------------------------------------------------------------------------
# the normal path
# --------------------------------------------------------------------------

def test_order_of_steps(runner: FakeRunner, guard: FakeGuard, hooks: Hooks,
                        events: list[str]) -> None:
    def duplicate() -> str:
        events.append("duplicate")
        return "snap-1"

    q = run(runner, guard, hooks, duplicate, deadline_s=7.5)
    assert events == ["pre-hook", "sync", "guard-arm", "freeze", "duplicate", "unfreeze",
                      "guard-disarm", "guard-exit", "post-hook"]
    assert runner.argvs() == [[hooks.pre_freeze[0].path], ["sync", "-f", MP],
                              ["fsfreeze", "--freeze", MP], ["fsfreeze", "--unfreeze", MP],
                              [hooks.post_thaw[0].path]]
    assert guard.created == [(MP, 7.5, "/run/test-state")]
    assert q.result == "snap-1" and q.frozen_by == "fsfreeze" and q.post_thaw_failures == ()
    assert q.guard_report == {"fired": False, "reason": "disarmed", "thaw": "untouched"}


def test_window_is_freeze_to_thaw(runner: FakeRunner, guard: FakeGuard, hooks: Hooks) -> None:
    q = run(runner, guard, hooks, lambda: time.sleep(0.05))
    assert 50 <= q.window_ms < 5000


def test_hooks_get_the_backed_up_path(runner: FakeRunner, guard: FakeGuard,
                                      hooks: Hooks) -> None:
    run(runner, guard, hooks, lambda: None, path="/srv/data/db")
    hook_calls = [c for c in runner.calls if c.argv[0].startswith("/")]
    assert [c.env["SANOFFLOAD_PHASE"] for c in hook_calls] == ["pre-freeze", "post-thaw"]
    assert {c.env["SANOFFLOAD_PATH"] for c in hook_calls} == {"/srv/data/db"}
    assert {c.env["SANOFFLOAD_MOUNTPOINT"] for c in hook_calls} == {MP}


def test_post_thaw_hook_failure_is_reported_not_raised(runner: FakeRunner, guard: FakeGuard,
                                                       hooks: Hooks) -> None:
    runner.on(hooks.post_thaw[0].path, returncode=4, stderr="resume: no such db\n")
    q = run(runner, guard, hooks, lambda: "snap")
    assert q.result == "snap"
    (failure,) = q.post_thaw_failures
    assert failure.returncode == 4 and failure.stderr_tail == "resume: no such db"


# --------------------------------------------------------------------------
# failures before the freeze: nothing frozen
# --------------------------------------------------------------------------

def test_failing_pre_freeze_hook_freezes_nothing(runner: FakeRunner, guard: FakeGuard,
                                                 hooks: Hooks, events: list[str]) -> None:
    runner.on(hooks.pre_freeze[0].path, returncode=1, stderr="db refused backup mode\n")
    called = []
    with pytest.raises(FreezeError, match="pre-freeze hook .*/pre failed .*db refused") as info:
        run(runner, guard, hooks, lambda: called.append(1))
    assert info.value.exit_code == 9
    assert called == [] and guard.created == []
    assert not runner.called("fsfreeze") and not runner.called("sync")
    # post-thaw hooks still undo what pre-freeze hooks began
    assert events == ["post-hook"]


def test_insecure_hook_refuses_before_anything_runs(runner: FakeRunner, guard: FakeGuard,
                                                    hooks: Hooks) -> None:
    Path(hooks.post_thaw[0].path).chmod(0o777)
    with pytest.raises(RefusedError, match="world-writable"):
        run(runner, guard, hooks, lambda: None)
    assert runner.calls == [] and guard.created == []


def test_flush_failure_freezes_nothing(runner: FakeRunner, guard: FakeGuard, hooks: Hooks) -> None:
    runner.on("sync", returncode=1, stderr="sync: error syncing '/srv/data': Input/output error\n")
    with pytest.raises(FreezeError, match="could not flush .*Input/output error"):
        run(runner, guard, hooks, lambda: None)
    assert not runner.called("fsfreeze") and guard.created == []


def test_bad_arguments_are_usage_errors(runner: FakeRunner, guard: FakeGuard,
                                        hooks: Hooks) -> None:
    with pytest.raises(UsageError):
        run(runner, guard, hooks, lambda: None, who_freezes="dmsetup")
    with pytest.raises(UsageError):
        run(runner, guard, hooks, lambda: None, deadline_s=0)
    assert runner.calls == []


# --------------------------------------------------------------------------
# failures around the freeze: always thawed
# --------------------------------------------------------------------------

def test_duplicate_failure_thaws_then_reraises(runner: FakeRunner, guard: FakeGuard,
                                               hooks: Hooks, events: list[str]) -> None:
    def duplicate() -> None:
        events.append("duplicate")
        raise CommandError("lvcreate failed: Insufficient free space", returncode=5)

    with pytest.raises(CommandError, match="Insufficient free space"):
        run(runner, guard, hooks, duplicate)
    assert events == ["pre-hook", "sync", "guard-arm", "freeze", "duplicate", "unfreeze",
                      "guard-disarm", "guard-exit", "post-hook"]


def test_sigterm_during_duplicate_thaws(runner: FakeRunner, guard: FakeGuard, hooks: Hooks,
                                        events: list[str]) -> None:
    restore = install_signal_handlers()
    try:
        def duplicate() -> None:
            events.append("duplicate")
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises Interrupted here
            events.append("not reached")

        with pytest.raises(Interrupted) as info:
            run(runner, guard, hooks, duplicate)
    finally:
        restore()
    assert info.value.signum == signal.SIGTERM
    assert events == ["pre-hook", "sync", "guard-arm", "freeze", "duplicate", "unfreeze",
                      "guard-disarm", "guard-exit", "post-hook"]


def test_interrupt_during_the_thaw_leaves_it_to_the_guard(runner: FakeRunner, guard: FakeGuard,
                                                          hooks: Hooks,
                                                          events: list[str]) -> None:
    def interrupted(argv: list[str]) -> None:
        events.append("unfreeze")
        raise Interrupted(signal.SIGHUP)

    runner.on("fsfreeze", "--unfreeze", action=interrupted)
    with pytest.raises(Interrupted):
        run(runner, guard, hooks, lambda: "snap")
    # not disarmed: leaving the block closes the guard's pipe, and it thaws at once
    assert events[-3:] == ["unfreeze", "guard-exit-thaws", "post-hook"]
    assert "guard-disarm" not in events


def test_freeze_refused_by_the_kernel_thaws_nothing(runner: FakeRunner, guard: FakeGuard,
                                                    hooks: Hooks, events: list[str]) -> None:
    runner.on("fsfreeze", "--freeze", returncode=1, stderr=EBUSY)
    called = []
    with pytest.raises(FreezeError, match="could not freeze /srv/data: .*resource busy"):
        run(runner, guard, hooks, lambda: called.append(1))
    assert called == []
    # someone else's freeze is not ours to thaw: no unfreeze, and the guard is told to stand down
    assert not runner.called("fsfreeze", "--unfreeze")
    assert events[-3:] == ["guard-disarm", "guard-exit", "post-hook"]


def test_freeze_timeout_thaws_anyway(runner: FakeRunner, guard: FakeGuard, hooks: Hooks) -> None:
    runner.on("fsfreeze", "--freeze", timeout=True)
    with pytest.raises(FreezeError, match="freezing /srv/data timed out"):
        run(runner, guard, hooks, lambda: None, deadline_s=4)
    # killed mid-ioctl, the freeze may still complete in the kernel
    assert runner.called("fsfreeze", "--unfreeze")
    freeze_call = next(c for c in runner.calls if c.argv[:2] == ["fsfreeze", "--freeze"])
    assert freeze_call.timeout == 34


def test_thaw_failure_leaves_it_to_the_guard_and_discards(runner: FakeRunner, guard: FakeGuard,
                                                          hooks: Hooks,
                                                          events: list[str]) -> None:
    runner.on("fsfreeze", "--unfreeze", returncode=1,
              stderr="fsfreeze: /srv/data: unfreeze failed: Input/output error\n")
    discarded: list[str] = []
    with pytest.raises(FreezeError, match="could not thaw .*the freeze guard thawed it; "
                                          "the duplicate was discarded"):
        run(runner, guard, hooks, lambda: "snap", discard=discarded.append)
    assert discarded == ["snap"]
    assert "guard-exit-thaws" in events and "guard-disarm" not in events


# --------------------------------------------------------------------------
# the guard fired: deadline exceeded
# --------------------------------------------------------------------------

def test_guard_fired_discards_and_raises(runner: FakeRunner, guard: FakeGuard, hooks: Hooks,
                                         events: list[str]) -> None:
    runner.on("fsfreeze", "--unfreeze", stderr=EINVAL, returncode=1)  # the guard thawed it

    def duplicate() -> str:
        guard.fire = True  # the duplicate step overran the deadline
        return "snap-late"

    discarded: list[str] = []
    with pytest.raises(FreezeError, match="freeze deadline exceeded") as info:
        run(runner, guard, hooks, duplicate, deadline_s=5, discard=discarded.append)
    assert discarded == ["snap-late"]
    assert info.value.exit_code == 9
    assert "the duplicate was discarded" in str(info.value)
    assert events[-2:] == ["guard-exit", "post-hook"]


def test_guard_fired_without_discard_says_not_to_use_it(runner: FakeRunner, guard: FakeGuard,
                                                       hooks: Hooks) -> None:
    runner.on("fsfreeze", "--unfreeze", stderr=EINVAL, returncode=1)

    def duplicate() -> str:
        guard.fire = True
        return "snap-late"

    with pytest.raises(FreezeError, match="deadline exceeded.*must not be used"):
        run(runner, guard, hooks, duplicate)


def test_failing_discard_is_reported_with_the_deadline(runner: FakeRunner, guard: FakeGuard,
                                                       hooks: Hooks) -> None:
    runner.on("fsfreeze", "--unfreeze", stderr=EINVAL, returncode=1)

    def duplicate() -> str:
        guard.fire = True
        return "snap-late"

    def discard(_result: str) -> None:
        raise CommandError("lvremove failed")

    with pytest.raises(FreezeError, match="deadline exceeded.*discarding the duplicate failed "
                                          "too: lvremove failed"):
        run(runner, guard, hooks, duplicate, discard=discard)


def test_thawed_by_someone_else_is_not_trusted(runner: FakeRunner, guard: FakeGuard,
                                               hooks: Hooks) -> None:
    runner.on("fsfreeze", "--unfreeze", stderr=EINVAL, returncode=1)
    discarded: list[str] = []
    with pytest.raises(FreezeError, match="thawed by someone else"):
        run(runner, guard, hooks, lambda: "snap", discard=discarded.append)
    assert discarded == ["snap"]


# --------------------------------------------------------------------------
# LVM freezes
# --------------------------------------------------------------------------

def test_lvm_mode_never_calls_fsfreeze_nor_arms_a_guard(runner: FakeRunner, hooks: Hooks,
                                                        events: list[str]) -> None:
    def no_guard(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("no guard in lvm mode: nothing of ours is frozen")

    def duplicate() -> str:
        events.append("duplicate")
        time.sleep(0.02)
        return "lvm-snap"

    q = quiesce_and_duplicate(runner, MP, duplicate, hooks=hooks, who_freezes="lvm",
                              guard_factory=no_guard)
    assert events == ["pre-hook", "sync", "duplicate", "post-hook"]
    assert not runner.called("fsfreeze")
    assert q.frozen_by == "lvm" and q.result == "lvm-snap" and q.guard_report is None
    assert q.window_ms >= 20


# --------------------------------------------------------------------------
# the fsfreeze wrapper
# --------------------------------------------------------------------------

def test_fsfreeze_command_lines() -> None:
    r = FakeRunner().on("sync").on("fsfreeze")
    fsfreeze.syncfs(r, "/m")
    fsfreeze.freeze(r, "/m", timeout=12)
    assert fsfreeze.unfreeze(r, "/m") is True
    assert r.argvs() == [["sync", "-f", "/m"], ["fsfreeze", "--freeze", "/m"],
                         ["fsfreeze", "--unfreeze", "/m"]]
    assert r.calls[1].timeout == 12


def test_unfreeze_of_a_thawed_fs_is_false_other_errors_raise() -> None:
    r = FakeRunner().on("fsfreeze", returncode=1, stderr=EINVAL)
    assert fsfreeze.unfreeze(r, MP) is False
    r.on("fsfreeze", returncode=1, stderr="fsfreeze: cannot open /x: No such file or directory\n")
    with pytest.raises(CommandError, match="No such file"):
        fsfreeze.unfreeze(r, "/x")


# --------------------------------------------------------------------------
# the guard process itself (no freeze: "/proc" stands in for the mountpoint,
# so its FITHAW only ever answers EINVAL or, unprivileged, EPERM)
# --------------------------------------------------------------------------

def _guard(tmp_path: Path, deadline: float = 30.0) -> FreezeGuard:
    return FreezeGuard(CommandRunner(), "/proc", deadline, state_dir=tmp_path / "state")


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_disarmed_guard_exits_without_touching_anything(tmp_path: Path) -> None:
    with _guard(tmp_path) as g:
        assert g.pid is not None and not _gone(g.pid)
        g.disarm()
        assert g.exit_code == guard_mod.EXIT_DISARMED
    assert _gone(g.pid)
    assert not g.fired
    assert g.report is not None
    assert g.report["reason"] == "disarmed" and g.report["thaw"] == "untouched"
    assert list((tmp_path / "state").iterdir()) == []  # nothing left behind


def test_guard_fires_at_once_on_eof(tmp_path: Path) -> None:
    g = _guard(tmp_path)
    with g:
        started = time.monotonic()
    # leaving without disarm closed the pipe: the guard acted and ended, long before 30 s
    assert time.monotonic() - started < 5
    assert g.fired and g.report is not None and g.report["reason"] == "agent-gone"
    assert g.report["thaw"] in ("not-frozen", "error: EPERM Operation not permitted")
    assert Path(g.report_path or "").exists()  # a guard that fired leaves its report


def test_guard_fires_at_the_deadline(tmp_path: Path) -> None:
    with _guard(tmp_path, deadline=0.5) as g:
        assert g.pid is not None
        end = time.monotonic() + 10
        while not _gone(g.pid) and time.monotonic() < end:
            time.sleep(0.02)
        g.disarm()  # too late: the pipe is broken, and that is fine
    assert g.fired and g.report is not None and g.report["reason"] == "deadline"
    assert 0.5 <= g.report["armed_for_s"] < 5
    assert g.report["deadline_s"] == 0.5


def test_guard_ignores_stop_signals(tmp_path: Path) -> None:
    with _guard(tmp_path) as g:
        assert g.pid is not None
        for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            os.kill(g.pid, signum)
        time.sleep(0.3)
        assert not _gone(g.pid)
        g.disarm()
    assert not g.fired


def test_guard_refuses_a_state_dir_on_the_frozen_fs(tmp_path: Path) -> None:
    g = FreezeGuard(CommandRunner(), tmp_path, 5, state_dir=tmp_path / "state")
    with pytest.raises(ConfigError, match="on the filesystem being frozen"):
        g.__enter__()


def test_guard_that_cannot_arm_is_a_freeze_error(tmp_path: Path) -> None:
    # a file, not a directory: the guard's own open fails, after our checks passed
    g = FreezeGuard(CommandRunner(), "/proc/version", 5, state_dir=tmp_path / "state")
    with pytest.raises(FreezeError, match="did not arm .*cannot open /proc/version: Not a dir"):
        g.arm()
    assert g.pid is not None and _gone(g.pid)


def test_guard_for_a_missing_mountpoint_is_refused(tmp_path: Path) -> None:
    g = FreezeGuard(CommandRunner(), tmp_path / "missing", 5, state_dir="/run/test-unused")
    with pytest.raises(FreezeError, match="cannot guard .*missing: No such file"):
        g.arm()
    assert g.pid is None


def test_guard_command_line_and_a_guard_that_never_arms(tmp_path: Path) -> None:
    runner = FakeRunner().on(sys.executable, timeout=True)  # runs, never says "armed"
    g = FreezeGuard(runner, "/proc", 5, state_dir=tmp_path / "state", arm_timeout=0.2)
    with pytest.raises(FreezeError, match="did not arm within 0.2s .*nothing was frozen"):
        g.arm()
    (call,) = runner.calls
    argv = call.argv
    assert argv[:8] == [sys.executable, "-P", "-m", "sanoffload.agent.guard", "--mount", "/proc",
                        "--deadline", "5.0"]
    assert argv[8] == "--fd" and argv[10] == "--ready-fd" and argv[12] == "--report"
    assert argv[13].startswith(str(tmp_path / "state" / "guard-")) and argv[13].endswith(".json")
    assert call.env["PYTHONPATH"] == str(Path(guard_mod.__file__).parents[2])
    assert g._proc is not None and g._proc.killed  # type: ignore[attr-defined]


def test_guard_module_imports_only_the_standard_library() -> None:
    # the guard must not import anything that might live on (or write to) the frozen fs
    code = ("import sys; before = set(sys.modules); import sanoffload.agent.guard; "
            "print(sorted(m for m in set(sys.modules) - before if m.startswith('sanoffload')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}).stdout
    assert out.strip() == "['sanoffload', 'sanoffload.agent', 'sanoffload.agent.guard']"


# --------------------------------------------------------------------------
# holding hooks: READY before the flush and the freeze, let go after the thaw
# --------------------------------------------------------------------------

@pytest.fixture
def hold_hooks(tmp_path: Path) -> Hooks:
    return Hooks.from_paths([make_hook(tmp_path / "pre")], [make_hook(tmp_path / "post")],
                            [make_hook(tmp_path / "db-hold")], timeout=5, hold_ready_s=5,
                            trusted_uid=os.getuid())


def hold_runner(events: list[str], hooks: Hooks, script: ScriptedHold) -> HoldRunner:
    r = HoldRunner()

    def note(name: str) -> Any:
        return lambda argv: events.append(name)

    r.on("sync", "-f", action=note("sync"))
    r.on("fsfreeze", "--freeze", action=note("freeze"))
    r.on("fsfreeze", "--unfreeze", action=note("unfreeze"))
    r.on(hooks.pre_freeze[0].path, action=note("pre-hook"))
    r.on(hooks.post_thaw[0].path, action=note("post-hook"))
    r.hold(hooks.hold[0].path, script)
    return r


LABEL = b"START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\nLABEL: sanoffload\n"


def test_holding_hook_is_ready_before_the_flush_and_lets_go_after_the_thaw(
        guard: FakeGuard, hold_hooks: Hooks, events: list[str]) -> None:
    script = ScriptedHold(after=LABEL, events=events, name="hold")
    runner = hold_runner(events, hold_hooks, script)

    def duplicate() -> str:
        events.append("duplicate")
        return "snap-1"

    q = run(runner, guard, hold_hooks, duplicate, deadline_s=7.5, path="/srv/data/db")
    assert events == ["pre-hook", "hold-start", "sync", "guard-arm", "freeze", "duplicate",
                      "unfreeze", "guard-disarm", "guard-exit", "hold-let-go", "post-hook"]
    assert q.held == (HeldOutput(hold_hooks.hold[0].path, LABEL.decode()),)
    assert q.hold_failures == () and q.warnings == []
    assert script.env["SANOFFLOAD_PHASE"] == "hold"
    assert script.env["SANOFFLOAD_MOUNTPOINT"] == MP
    assert script.env["SANOFFLOAD_PATH"] == "/srv/data/db"


def test_holding_hook_in_lvm_mode_holds_across_the_duplicate(hold_hooks: Hooks,
                                                             events: list[str]) -> None:
    runner = hold_runner(events, hold_hooks, ScriptedHold(events=events, name="hold"))
    quiesce_and_duplicate(runner, MP, lambda: events.append("duplicate"), hooks=hold_hooks,
                          who_freezes="lvm")
    assert events == ["pre-hook", "hold-start", "sync", "duplicate", "hold-let-go", "post-hook"]


def test_holding_hook_never_ready_freezes_nothing(guard: FakeGuard, tmp_path: Path,
                                                 events: list[str]) -> None:
    hooks = Hooks.from_paths([make_hook(tmp_path / "pre")], [make_hook(tmp_path / "post")],
                             [make_hook(tmp_path / "db-hold")], timeout=5, hold_ready_s=0.2,
                             trusted_uid=os.getuid())
    script = ScriptedHold(b"", events=events, name="hold", hang=True)
    runner = hold_runner(events, hooks, script)
    called: list[int] = []
    with pytest.raises(FreezeError, match="did not say READY within 0.2s; nothing was "
                                          "frozen") as info:
        run(runner, guard, hooks, lambda: called.append(1))
    assert info.value.exit_code == 9
    assert called == [] and guard.created == []
    assert not runner.called("sync") and not runner.called("fsfreeze")
    # killed, and the post-thaw hooks still undo what the pre-freeze hooks began
    assert events == ["pre-hook", "hold-start", "hold-killed", "post-hook"]


def test_a_failed_freeze_tells_the_holding_hook_to_let_go(guard: FakeGuard, hold_hooks: Hooks,
                                                         events: list[str]) -> None:
    runner = hold_runner(events, hold_hooks, ScriptedHold(events=events, name="hold"))
    runner.on("fsfreeze", "--freeze", returncode=1, stderr=EBUSY)
    with pytest.raises(FreezeError, match="could not freeze"):
        run(runner, guard, hold_hooks, lambda: None)
    assert events[-3:] == ["guard-exit", "hold-let-go", "post-hook"]


def test_a_holding_hook_failing_after_the_thaw_is_a_warning(guard: FakeGuard, hold_hooks: Hooks,
                                                           events: list[str]) -> None:
    script = ScriptedHold(after=b"", returncode=4, stderr="UNLOCK TABLES: server gone\n",
                          events=events, name="hold")
    runner = hold_runner(events, hold_hooks, script)
    q = run(runner, guard, hold_hooks, lambda: "snap")
    assert q.result == "snap"
    (failure,) = q.hold_failures
    assert q.warnings == [(f"hold hook {hold_hooks.hold[0].path} failed (exit 4): "
                           "UNLOCK TABLES: server gone")]
    assert failure.returncode == 4
    assert events[-2:] == ["hold-let-go", "post-hook"]


# --------------------------------------------------------------------------
# a consistency group: several mount points, one window
# --------------------------------------------------------------------------

def _group_runner(events: list[str], hooks: Hooks) -> FakeRunner:
    r = FakeRunner()
    r.on("sync", "-f", action=lambda argv: events.append(f"sync {argv[-1]}"))
    r.on("fsfreeze", "--freeze", action=lambda argv: events.append(f"freeze {argv[-1]}"))
    r.on("fsfreeze", "--unfreeze", action=lambda argv: events.append(f"thaw {argv[-1]}"))
    r.on(hooks.pre_freeze[0].path, action=lambda argv: events.append("pre-hook"))
    r.on(hooks.post_thaw[0].path, action=lambda argv: events.append("post-hook"))
    return r


def test_a_group_is_frozen_in_order_duplicated_once_and_thawed_in_reverse(
        guard: FakeGuard, hooks: Hooks, events: list[str]) -> None:
    runner = _group_runner(events, hooks)

    def duplicate() -> list[str]:
        events.append("duplicate all")
        return ["dup-a", "dup-b"]

    q = quiesce_and_duplicate(runner, ["/srv/a", "/srv/b"], duplicate, hooks=hooks,
                              guard_factory=guard.factory, state_dir="/run/test-state")
    assert q.result == ["dup-a", "dup-b"] and q.frozen_by is WhoFreezes.FSFREEZE
    plain = [e for e in events if not e.startswith("guard")]
    assert plain == ["pre-hook", "sync /srv/a", "sync /srv/b", "freeze /srv/a", "freeze /srv/b",
                     "duplicate all", "thaw /srv/b", "thaw /srv/a", "post-hook"]
    assert [m for m, _d, _s in guard.created] == ["/srv/a", "/srv/b"]  # a guard for each


def test_a_group_whose_second_freeze_fails_thaws_the_first(
        guard: FakeGuard, hooks: Hooks, events: list[str]) -> None:
    runner = _group_runner(events, hooks)
    runner.on("fsfreeze", "--freeze", "/srv/b", returncode=1,
              stderr="fsfreeze: /srv/b: freeze failed: Operation not supported\n")
    made: list[str] = []
    with pytest.raises(FreezeError, match="could not freeze /srv/b"):
        quiesce_and_duplicate(runner, ["/srv/a", "/srv/b"], lambda: made.append("x"),
                              hooks=hooks, guard_factory=guard.factory,
                              state_dir="/run/test-state")
    assert made == []
    assert "thaw /srv/a" in events and "thaw /srv/b" not in events


@pytest.mark.hostile("agent", "a consistency group asked to freeze by LVM's suspend",
                     "refused before any hook or freeze: no common instant")
def test_a_group_cannot_be_frozen_by_lvm(guard: FakeGuard, hooks: Hooks,
                                         events: list[str]) -> None:
    runner = _group_runner(events, hooks)
    with pytest.raises(UsageError, match="consistency group is frozen by fsfreeze"):
        quiesce_and_duplicate(runner, ["/srv/a", "/srv/b"], lambda: None, hooks=hooks,
                              who_freezes="lvm", guard_factory=guard.factory)
    assert events == []
