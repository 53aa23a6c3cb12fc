"""The quiesce step and its freeze guard, with real fsfreeze on ext4 and xfs.

A writer blocked on a frozen filesystem is the witness: it completes only
once the filesystem is thawed. It is never waited on without a bound while
the filesystem may be frozen (a task blocked there cannot be killed), and
every test's ``finally`` thaws with ``fsfreeze --unfreeze`` (tolerating "not
frozen") before it joins anything, so a failing test cannot leave the
machine with a frozen filesystem. After each test no guard process may be
left running.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest

from sanoffload.agent.guard import AGENT_GONE, DEADLINE, DISARMED
from sanoffload.agent.hooks import Hooks
from sanoffload.agent.quiesce import quiesce_and_duplicate
from sanoffload.errors import FreezeError
from sanoffload.runner import Runner
from sanoffload.tools import fsfreeze

from ..conftest import REPO
from .conftest import LoopFs

DEADLINE_S = 5.0
#: how long a writer may stay blocked after the guard should have thawed
SLACK_S = 1.0

#: a stand-in agent: quiesce_and_duplicate with a duplicate step that says
#: "frozen" on stdout (a pipe, not the frozen filesystem), then hangs for HANG s;
#: errors map to exit codes as the CLI does
AGENT = r"""
import sys, time
from sanoffload.agent.quiesce import quiesce_and_duplicate
from sanoffload.errors import SanoffloadError
from sanoffload.runner import CommandRunner
from sanoffload.signals import install_signal_handlers

mountpoint, state_dir = sys.argv[1], sys.argv[2]
deadline, hang = float(sys.argv[3]), float(sys.argv[4])
install_signal_handlers()

def duplicate():
    print("frozen", flush=True)
    time.sleep(hang)
    return "dup-1"

def discard(result):
    print("discarded", result, flush=True)

try:
    q = quiesce_and_duplicate(CommandRunner(), mountpoint, duplicate, deadline_s=deadline,
                              state_dir=state_dir, discard=discard)
except SanoffloadError as exc:
    print(f"sanoffload: error: {exc}", file=sys.stderr, flush=True)
    sys.exit(exc.exit_code)
print(f"done {q.window_ms:.1f}", flush=True)
"""


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------

def guard_pids(mountpoint: Path) -> list[int]:
    """Running (not zombie) guard processes for ``mountpoint``."""
    pids = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmd = proc.info["cmdline"] or []
        if ("sanoffload.agent.guard" in cmd and str(mountpoint) in cmd
                and proc.info["status"] != psutil.STATUS_ZOMBIE):
            pids.append(proc.pid)
    return pids


def start_agent(fs: LoopFs, state_dir: Path, hang: float) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", AGENT, str(fs.mountpoint), str(state_dir),
                             str(DEADLINE_S), str(hang)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, cwd="/")


def wait_for_output(proc: subprocess.Popen[bytes], needle: bytes, timeout: float) -> None:
    """Read the agent's stdout until ``needle`` (bounded)."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    buf = b""
    end = time.monotonic() + timeout
    while needle not in buf:
        left = end - time.monotonic()
        assert left > 0, f"agent did not say {needle!r} within {timeout}s (got {buf!r})"
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            chunk = os.read(fd, 4096)
            assert chunk, f"agent ended before saying {needle!r}: {proc.stderr.read()!r}"  # type: ignore[union-attr]
            buf += chunk


#: where the kernel parks a task waiting for a frozen filesystem (/proc/PID/wchan):
#: sb_start_write() (via mnt_want_write for an open(O_CREAT)) waits on the superblock's
#: percpu rw-semaphore until the thaw
FREEZE_WAITS = ("percpu_rwsem_wait", "__percpu_down_read", "percpu_down_read",
                "__sb_start_write", "sb_start_write", "mnt_want_write")
#: the writer's marker, written to a pipe immediately before its blocking write
WRITER_MARK = b"W"


def start_writer(mountpoint: Path) -> subprocess.Popen[bytes]:
    """A shell that writes WRITER_MARK to its stdout (a pipe), then ``late.txt`` on the fs.

    ``echo`` is a shell builtin and the redirection is the shell's own open():
    the process that said the marker is the one that blocks.
    """
    return subprocess.Popen(["sh", "-c", 'printf W; echo late > "$1"', "sh",
                             f"{mountpoint}/late.txt"], stdout=subprocess.PIPE)


def kernel_wait(pid: int) -> tuple[str, str]:
    """``(state, where)`` of ``pid``: its /proc state letter and the kernel function it sleeps in.

    ``where`` is /proc/PID/wchan, or, where the kernel hides that ("0"), the
    first freeze wait named in /proc/PID/stack (root only).
    """
    stat_line = Path(f"/proc/{pid}/stat").read_text()
    state = stat_line.rpartition(")")[2].split()[0]  # the name in (...) may hold spaces
    wchan = Path(f"/proc/{pid}/wchan").read_text().strip()
    if wchan in ("", "0"):
        try:
            stack = Path(f"/proc/{pid}/stack").read_text()
        except OSError:
            stack = ""
        wchan = next((w for w in FREEZE_WAITS if f"{w}+" in stack), wchan)
    return state, wchan


def wait_bounded(proc: subprocess.Popen[bytes], limit: float, since: float) -> float | None:
    """Seconds from ``since`` until ``proc`` ended, or None if it still runs at ``limit``."""
    while time.monotonic() - since < limit:
        if proc.poll() is not None:
            return time.monotonic() - since
        time.sleep(0.005)
    return time.monotonic() - since if proc.poll() is not None else None


def assert_blocked(writer: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """Prove ``writer`` is inside its write, held by the freeze (bounded waits only).

    It said its marker (so it ran up to the write), and the kernel shows it in
    uninterruptible sleep ('D') in a freeze wait. A writer that never got
    scheduled, or sleeps anywhere else, fails here.
    """
    assert writer.stdout is not None
    ready, _, _ = select.select([writer.stdout.fileno()], [], [], timeout)
    assert ready, f"the writer did not reach its write within {timeout}s"
    assert os.read(writer.stdout.fileno(), 1) == WRITER_MARK, "the writer ended before its write"
    end = time.monotonic() + timeout
    state, where = "?", "?"
    while time.monotonic() < end:
        assert writer.poll() is None, "the writer finished: the filesystem is not frozen"
        try:
            state, where = kernel_wait(writer.pid)
        except FileNotFoundError:
            continue  # it just ended: poll() says so next round
        if state == "D" and where in FREEZE_WAITS:
            return
        time.sleep(0.005)  # polls the kernel's view; the deadline bounds it
    raise AssertionError(f"the writer is not held by the freeze after {timeout}s: "
                         f"state {state!r}, waiting in {where!r}")


def reports(state_dir: Path) -> list[dict[str, object]]:
    return [json.loads(p.read_text()) for p in sorted(state_dir.glob("guard-*.json"))]


@contextmanager
def frozen_fs_safety(fs: LoopFs, runner: Runner, procs: list[subprocess.Popen[bytes]]
                     ) -> Iterator[None]:
    """Thaw first, then kill/join ``procs`` (bounded), then no guard may be left."""
    try:
        yield
    finally:
        fsfreeze.unfreeze(runner, fs.mountpoint)
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
        end = time.monotonic() + 5
        while guard_pids(fs.mountpoint) and time.monotonic() < end:
            time.sleep(0.05)
        left = guard_pids(fs.mountpoint)
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        assert not left, f"guard process(es) left running: {left}"


@pytest.fixture
def state_dir(tmp_path: Path, loopfs: LoopFs) -> Path:
    path = tmp_path / "state"
    path.mkdir()
    # the guard's report must not be on the filesystem it thaws
    assert path.stat().st_dev != loopfs.mountpoint.stat().st_dev
    return path


# --------------------------------------------------------------------------
# (a) the agent is SIGKILLed while frozen
# --------------------------------------------------------------------------

def test_guard_thaws_at_once_when_the_agent_is_sigkilled(loopfs: LoopFs, host_runner: Runner,
                                                         state_dir: Path) -> None:
    procs: list[subprocess.Popen[bytes]] = []
    with frozen_fs_safety(loopfs, host_runner, procs):
        agent = start_agent(loopfs, state_dir, hang=3600)
        procs.append(agent)
        wait_for_output(agent, b"frozen\n", timeout=30)
        assert len(guard_pids(loopfs.mountpoint)) == 1
        writer = start_writer(loopfs.mountpoint)
        procs.append(writer)
        assert_blocked(writer)

        killed_at = time.monotonic()
        agent.kill()
        waited = wait_bounded(writer, DEADLINE_S + SLACK_S, since=killed_at)
        assert waited is not None, \
            f"writer still blocked {DEADLINE_S + SLACK_S}s after the agent was SIGKILLed"
        print(f"\n[{loopfs.fstype}] (a) writer waited {waited * 1000:.0f} ms after SIGKILL")
        # EOF on the pipe, not the deadline, released it
        assert waited < DEADLINE_S / 2
        assert writer.returncode == 0
    (report,) = reports(state_dir)
    assert report["fired"] is True and report["reason"] == AGENT_GONE
    assert report["thaw"] == "thawed" and report["deadline_s"] == DEADLINE_S
    assert (loopfs.mountpoint / "late.txt").read_text() == "late\n"


# --------------------------------------------------------------------------
# (b) the duplicate step hangs past the deadline; the agent lives
# --------------------------------------------------------------------------

def test_guard_thaws_at_the_deadline_when_the_duplicate_step_hangs(
        loopfs: LoopFs, host_runner: Runner, state_dir: Path) -> None:
    procs: list[subprocess.Popen[bytes]] = []
    with frozen_fs_safety(loopfs, host_runner, procs):
        agent = start_agent(loopfs, state_dir, hang=DEADLINE_S + 3)
        procs.append(agent)
        wait_for_output(agent, b"frozen\n", timeout=30)
        frozen_at = time.monotonic()
        writer = start_writer(loopfs.mountpoint)
        procs.append(writer)
        assert_blocked(writer)

        waited = wait_bounded(writer, DEADLINE_S + SLACK_S, since=frozen_at)
        assert waited is not None, f"writer still blocked {DEADLINE_S + SLACK_S}s after freezing"
        print(f"\n[{loopfs.fstype}] (b) writer waited {waited * 1000:.0f} ms after the freeze "
              f"(deadline {DEADLINE_S:g}s)")
        # the deadline, counted from arming (just before the freeze), released it, not an EOF
        assert waited > DEADLINE_S / 2
        assert writer.returncode == 0

        out, err = agent.communicate(timeout=30)
        assert agent.returncode == FreezeError.exit_code == 9, err
        assert b"freeze deadline exceeded" in err
        assert b"discarded dup-1" in out  # the duplicate made after the deadline was dropped
    (report,) = reports(state_dir)
    assert report["fired"] is True and report["reason"] == DEADLINE
    assert report["thaw"] == "thawed"


# --------------------------------------------------------------------------
# (c) the normal path, in this process, with real hooks
# --------------------------------------------------------------------------

def _hook(path: Path, log: Path, exit_code: int = 0) -> Path:
    path.write_text("#!/bin/sh\n"
                    f'echo "$SANOFFLOAD_PHASE $SANOFFLOAD_MOUNTPOINT $SANOFFLOAD_PATH" >> {log}\n'
                    f"echo hook-said-no >&2\nexit {exit_code}\n")
    path.chmod(0o755)
    return path


def test_normal_path_measures_the_window_and_disarms_the_guard(
        loopfs: LoopFs, host_runner: Runner, state_dir: Path, tmp_path: Path) -> None:
    mp = loopfs.mountpoint
    (mp / "data").mkdir()
    log = tmp_path / "hooks.log"
    hooks = Hooks.from_paths([str(_hook(tmp_path / "pre", log))],
                             [str(_hook(tmp_path / "post", log))], timeout=10)
    procs: list[subprocess.Popen[bytes]] = []
    seen: dict[str, float | int | bool] = {}

    def duplicate() -> str:
        seen["started"] = time.monotonic()
        (guard,) = guard_pids(mp)
        seen["guard"] = guard
        # the guard outlives what is aimed at it; only SIGKILL stops it
        for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            os.kill(guard, signum)
        writer = start_writer(mp)
        procs.append(writer)
        assert_blocked(writer)
        seen["guard_alive"] = psutil.Process(guard).status() != psutil.STATUS_ZOMBIE
        seen["took_ms"] = (time.monotonic() - float(seen["started"])) * 1000
        return "dup-ok"

    with frozen_fs_safety(loopfs, host_runner, procs):
        q = quiesce_and_duplicate(host_runner, mp, duplicate, hooks=hooks, deadline_s=DEADLINE_S,
                                  state_dir=state_dir, path=mp / "data")
        print(f"\n[{loopfs.fstype}] (c) frozen window {q.window_ms:.0f} ms")
        assert q.result == "dup-ok" and q.frozen_by == "fsfreeze"
        # the window covers the whole duplicate step, and is far less than the deadline
        assert float(seen["took_ms"]) <= q.window_ms < DEADLINE_S * 1000
        assert q.post_thaw_failures == ()
        assert seen["guard_alive"] is True
        assert q.guard_report is not None
        assert q.guard_report["fired"] is False and q.guard_report["reason"] == DISARMED
        assert q.guard_report["thaw"] == "untouched"
        assert not psutil.pid_exists(int(seen["guard"])) or \
            psutil.Process(int(seen["guard"])).status() == psutil.STATUS_ZOMBIE
        # thawed: the blocked writer finished and new writes go through
        assert procs[0].wait(timeout=10) == 0
        (mp / "after.txt").write_text("writable\n")
        os.sync()
    assert (mp / "after.txt").read_text() == "writable\n"
    assert list(state_dir.iterdir()) == []  # a guard that did not fire leaves nothing behind
    assert log.read_text().splitlines() == [f"pre-freeze {mp} {mp}/data",
                                            f"post-thaw {mp} {mp}/data"]


# --------------------------------------------------------------------------
# more real-kernel paths
# --------------------------------------------------------------------------

def test_sigterm_to_the_agent_thaws_and_disarms(loopfs: LoopFs, host_runner: Runner,
                                                state_dir: Path) -> None:
    procs: list[subprocess.Popen[bytes]] = []
    with frozen_fs_safety(loopfs, host_runner, procs):
        agent = start_agent(loopfs, state_dir, hang=3600)
        procs.append(agent)
        wait_for_output(agent, b"frozen\n", timeout=30)
        writer = start_writer(loopfs.mountpoint)
        procs.append(writer)
        assert_blocked(writer)
        sent_at = time.monotonic()
        agent.send_signal(signal.SIGTERM)
        waited = wait_bounded(writer, DEADLINE_S + SLACK_S, since=sent_at)
        assert waited is not None and waited < DEADLINE_S / 2, waited
        _out, err = agent.communicate(timeout=30)
        assert agent.returncode == 130, err
        assert b"interrupted by SIGTERM" in err
    # the agent thawed it itself and disarmed the guard: no report of a firing
    assert reports(state_dir) == []


def test_failing_pre_freeze_hook_freezes_nothing(loopfs: LoopFs, host_runner: Runner,
                                                 state_dir: Path, tmp_path: Path) -> None:
    log = tmp_path / "hooks.log"
    hooks = Hooks.from_paths([str(_hook(tmp_path / "pre", log, exit_code=3))],
                             [str(_hook(tmp_path / "post", log))], timeout=10)
    called = []
    with frozen_fs_safety(loopfs, host_runner, []):
        with pytest.raises(FreezeError) as info:
            quiesce_and_duplicate(host_runner, loopfs.mountpoint, lambda: called.append(1),
                                  hooks=hooks, state_dir=state_dir)
        assert "pre-freeze hook" in str(info.value) and "hook-said-no" in str(info.value)
        assert called == []
        assert fsfreeze.unfreeze(host_runner, loopfs.mountpoint) is False  # never frozen
    assert [line.split()[0] for line in log.read_text().splitlines()] == ["pre-freeze",
                                                                          "post-thaw"]


def test_someone_elses_freeze_is_not_ours_to_thaw(loopfs: LoopFs, host_runner: Runner,
                                                  state_dir: Path) -> None:
    called = []
    host_runner.run(["fsfreeze", "--freeze", str(loopfs.mountpoint)])
    with frozen_fs_safety(loopfs, host_runner, []):
        with pytest.raises(FreezeError, match="could not freeze"):
            quiesce_and_duplicate(host_runner, loopfs.mountpoint, lambda: called.append(1),
                                  state_dir=state_dir)
        assert called == []
        # still frozen: the guard was disarmed, not let loose on the other freeze
        assert fsfreeze.unfreeze(host_runner, loopfs.mountpoint) is True
    assert reports(state_dir) == []


# --------------------------------------------------------------------------
# the witness itself
# --------------------------------------------------------------------------

@pytest.mark.hostile("tests", "a writer that never reached its write, or sleeps elsewhere "
                     "(not held by a freeze)", "assert_blocked fails instead of passing")
@pytest.mark.parametrize("script", ["exec sleep 30", "printf W; exec sleep 30"],
                         ids=["never-said-the-marker", "sleeps-elsewhere"])
def test_assert_blocked_fails_for_a_writer_not_held_by_a_freeze(script: str) -> None:
    writer = subprocess.Popen(["sh", "-c", script], stdout=subprocess.PIPE)
    try:
        with pytest.raises(AssertionError):
            assert_blocked(writer, timeout=1.0)
    finally:
        writer.kill()
        writer.wait(timeout=10)
