"""Holding hooks with real processes around a real freeze (ext4 on a loop device).

Each hook is a shell script run as the agent runs it (its own process group,
stdin and stdout pipes, the runner's minimal environment). It logs what it
does to a file outside the filesystem being frozen, so the order of steps is
read from what the processes themselves did. Every test thaws in its
``finally`` (frozen_fs_safety) before anything else, so a failure cannot leave
the machine with a frozen filesystem.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import psutil
import pytest

from sanoffload.agent.hooks import Hooks
from sanoffload.agent.quiesce import quiesce_and_duplicate
from sanoffload.channel.messages import check_held
from sanoffload.errors import FreezeError
from sanoffload.runner import CommandRunner, Result
from sanoffload.tools import fsfreeze

from .conftest import LoopFs, destroy_loopfs, make_loopfs
from .test_freeze_guard import frozen_fs_safety, guard_pids

DEADLINE_S = 5.0
#: what PostgreSQL's pg_backup_stop() hands back, as a hook would print it
BACKUP_LABEL = ("START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\n"
                "CHECKPOINT LOCATION: 0/2000060\n"
                "BACKUP METHOD: streamed\n"
                "BACKUP FROM: primary\n"
                "START TIME: 2026-11-26 10:29:33 UTC\n"
                "LABEL: sanoffload\tfs1\n"
                "START TIMELINE: 1\n")


class RecordingRunner(CommandRunner):
    """The real runner, keeping every single command's argv: what never ran is proven so."""

    def __init__(self) -> None:
        super().__init__(default_timeout=60)
        self.argvs: list[list[str]] = []

    def run(self, argv: Sequence[Any], **kwargs: Any) -> Result:
        self.argvs.append([str(a) for a in argv])
        return super().run(argv, **kwargs)

    def ran(self, *prefix: str) -> bool:
        return any(tuple(a[:len(prefix)]) == prefix for a in self.argvs)


@pytest.fixture
def ext4(require_root: None) -> Iterator[LoopFs]:
    runner = CommandRunner(default_timeout=60)
    workdir = Path(tempfile.mkdtemp(prefix="sanoffload-hold-", dir="/var/tmp"))
    fs = make_loopfs(runner, "ext4", workdir)
    try:
        yield fs
    finally:
        destroy_loopfs(runner, fs)
        for p in sorted(workdir.rglob("*"), reverse=True):
            p.rmdir() if p.is_dir() else p.unlink()
        workdir.rmdir()


@pytest.fixture
def state_dir(tmp_path: Path, ext4: LoopFs) -> Path:
    path = tmp_path / "state"
    path.mkdir()
    assert path.stat().st_dev != ext4.mountpoint.stat().st_dev
    return path


def script(path: Path, body: str) -> str:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return str(path)


def log_lines(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def holding_hook(tmp_path: Path, log: Path, *, after: str = "", exit_code: int = 0) -> str:
    """READY, then wait for stdin's EOF (the agent's "let go"), then print ``after``."""
    return script(tmp_path / "db-hold",
                  f'echo "$$" > {tmp_path}/hold.pid\n'
                  f'echo "hold $SANOFFLOAD_PHASE $SANOFFLOAD_MOUNTPOINT ready" >> {log}\n'
                  "echo READY\n"
                  "cat > /dev/null\n"  # returns at EOF: the agent closed our stdin
                  f"echo released >> {log}\n"
                  f"printf '%s' '{after}'\n"
                  "echo 'UNLOCK TABLES: lost connection' >&2\n"
                  f"exit {exit_code}\n")


def phase_hook(tmp_path: Path, name: str, log: Path) -> str:
    return script(tmp_path / name, f'echo "$SANOFFLOAD_PHASE" >> {log}\n')


def test_a_holding_hook_holds_across_the_real_freeze(ext4: LoopFs, state_dir: Path,
                                                     tmp_path: Path) -> None:
    runner = RecordingRunner()
    mp = ext4.mountpoint
    log = tmp_path / "steps.log"
    hooks = Hooks.from_paths([phase_hook(tmp_path, "pre", log)],
                             [phase_hook(tmp_path, "post", log)],
                             [holding_hook(tmp_path, log)], timeout=10, hold_ready_s=10)
    seen: dict[str, Any] = {}

    def duplicate() -> str:
        # frozen now: the hook still runs, holding, not yet told to let go
        pid = int((tmp_path / "hold.pid").read_text())
        seen["alive"] = psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        seen["guards"] = len(guard_pids(mp))
        with open(log, "a") as f:
            f.write("duplicate\n")
        return "dup"

    with frozen_fs_safety(ext4, runner, []):
        q = quiesce_and_duplicate(runner, mp, duplicate, hooks=hooks, deadline_s=DEADLINE_S,
                                  state_dir=state_dir)
        assert q.result == "dup" and q.frozen_by == "fsfreeze" and q.window_ms > 0
        assert seen == {"alive": True, "guards": 1}
        assert q.hold_failures == () and q.post_thaw_failures == () and q.warnings == []
        (mp / "after.txt").write_text("writable\n")  # thawed
    assert log_lines(log) == ["pre-freeze", f"hold hold {mp} ready", "duplicate", "released",
                              "post-thaw"]
    # READY came before the flush and the freeze: the hook started before sync -f ran
    assert runner.argvs[1:3] == [["sync", "-f", str(mp)], ["fsfreeze", "--freeze", str(mp)]]


def test_a_holding_hook_that_never_says_ready_freezes_nothing(ext4: LoopFs, state_dir: Path,
                                                              tmp_path: Path) -> None:
    runner = RecordingRunner()
    mp = ext4.mountpoint
    log = tmp_path / "steps.log"
    # it writes onto the filesystem (that would block were it frozen), then never says READY
    silent = script(tmp_path / "silent-hold",
                    f'echo "$$" > {tmp_path}/hold.pid\n'
                    'echo "not frozen" > "$SANOFFLOAD_MOUNTPOINT/witness"\n'
                    "echo 'waiting for a lock' >&2\n"
                    "exec sleep 3600\n")
    hooks = Hooks.from_paths([phase_hook(tmp_path, "pre", log)],
                             [phase_hook(tmp_path, "post", log)], [silent], timeout=10,
                             hold_ready_s=1.0)
    called: list[int] = []
    with frozen_fs_safety(ext4, runner, []):
        with pytest.raises(FreezeError, match="did not say READY within 1s; nothing was "
                                              "frozen") as info:
            quiesce_and_duplicate(runner, mp, lambda: called.append(1), hooks=hooks,
                                  deadline_s=DEADLINE_S, state_dir=state_dir)
        assert info.value.exit_code == 9
        # never frozen: neither flushed nor frozen, no guard armed, no duplicate made ...
        assert called == []
        assert not runner.ran("fsfreeze") and not runner.ran("sync")
        assert list(state_dir.iterdir()) == [] and guard_pids(mp) == []
        # ... and the kernel agrees: there is nothing to thaw
        assert fsfreeze.unfreeze(runner, mp) is False
    assert (mp / "witness").read_text() == "not frozen\n"
    # the hook was killed (its process group), and post-thaw hooks ran as for a failed pre-freeze
    pid = int((tmp_path / "hold.pid").read_text())
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert log_lines(log) == ["pre-freeze", "post-thaw"]


def test_a_holding_hook_failing_after_the_thaw_is_a_warning(ext4: LoopFs, state_dir: Path,
                                                            tmp_path: Path) -> None:
    runner = RecordingRunner()
    mp = ext4.mountpoint
    log = tmp_path / "steps.log"
    hook = holding_hook(tmp_path, log, exit_code=3)
    hooks = Hooks.from_paths([], [phase_hook(tmp_path, "post", log)], [hook], timeout=10,
                             hold_ready_s=10)
    with frozen_fs_safety(ext4, runner, []):
        q = quiesce_and_duplicate(runner, mp, lambda: "dup", hooks=hooks,
                                  deadline_s=DEADLINE_S, state_dir=state_dir)
        assert q.result == "dup"  # the backup goes on
        assert q.warnings == [f"hold hook {hook} failed (exit 3): UNLOCK TABLES: lost connection"]
        assert fsfreeze.unfreeze(runner, mp) is False  # thawed
    assert log_lines(log) == [f"hold hold {mp} ready", "released", "post-thaw"]


def test_a_holding_hooks_backup_label_reaches_quiesced(ext4: LoopFs, state_dir: Path,
                                                       tmp_path: Path) -> None:
    runner = RecordingRunner()
    log = tmp_path / "steps.log"
    hook = holding_hook(tmp_path, log, after=BACKUP_LABEL + "\x1b[2J")
    hooks = Hooks.from_paths([], [], [hook], timeout=10, hold_ready_s=10)
    with frozen_fs_safety(ext4, runner, []):
        q = quiesce_and_duplicate(runner, ext4.mountpoint, lambda: "dup", hooks=hooks,
                                  deadline_s=DEADLINE_S, state_dir=state_dir)
    (held,) = q.held
    assert held.hook == hook
    # lines and tabs as printed; the escape sequence made harmless
    assert held.output == BACKUP_LABEL + "\\x1b[2J"
    assert check_held(q.held) == q.held  # what the proxy and the store accept
    assert q.warnings == []
