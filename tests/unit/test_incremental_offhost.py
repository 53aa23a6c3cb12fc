"""Issue 13, file level: ``run_offhost_backup(incremental=True)`` end to end over in-process
peers (the fakes of test_proxy_offhost: a fake agent, a real StoreService over a
Repository in tmp_path, the attach injected; tar and zstd run for real).

What is checked: the level chosen from the store's ``state`` answer (0 without one, N+1
with the parent's state file given to tar, 0 again at ``full_every``), the tar argv
(``--listed-incremental=FILE --no-check-device``), the stored state file's dump time (the
freeze less the margin, not tar's start) and the private temporary state file gone after
success and after failure.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from sanoffload.errors import DuplicateInvalidError, IntegrityError
from sanoffload.kinds import VerifyMode
from sanoffload.pipeline import Stage
from sanoffload.proxy.offhost import Location, run_offhost_backup
from sanoffload.runner import CommandRunner
from sanoffload.store.repo import Backup, Repository
from sanoffload.tools import tar
from tests.unit.test_proxy_offhost import FROZEN_AT, SOURCE, FakeAgent, FakeAttach, Lab, RawAnswer

pytestmark = pytest.mark.unit

HOUR = 3600.0


class MovingAgent(FakeAgent):
    """The fake agent, freezing at ``frozen_at`` (each backup its own time, so its own id)."""

    def __init__(self) -> None:
        super().__init__()
        self.frozen_at = FROZEN_AT

    def prepare(self, path: str, initiator: str, *, kind: str | None = None,
                client: str | None = None) -> RawAnswer:
        answer = super().prepare(path, initiator, kind=kind, client=client)
        answer.data["frozen_at"] = self.frozen_at
        answer.data["lease_expires"] = self.frozen_at + 600
        return answer


class TarWatcher(CommandRunner):
    """The real runner; records each pipeline's tar argv and the state file tar was given
    (its bytes when tar starts; None: absent, a level 0)."""

    def __init__(self) -> None:
        super().__init__()
        self.creates: list[list[str]] = []
        self.given: list[bytes | None] = []

    def pipeline(self, stages: Sequence[Stage], **kwargs: Any) -> Any:
        argv = [str(a) if isinstance(a, int) else os.fsdecode(a) for a in stages[0].argv]
        if argv[:2] == ["tar", "--create"]:
            self.creates.append(argv)
            state = state_option(argv)
            self.given.append(Path(state).read_bytes()
                              if state is not None and os.path.exists(state) else None)
        return super().pipeline(stages, **kwargs)


def state_option(argv: list[str]) -> str | None:
    found = [a.split("=", 1)[1] for a in argv if a.startswith("--listed-incremental=")]
    assert len(found) <= 1
    return found[0] if found else None


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    (tmp_path / "repo").mkdir()
    return Repository(tmp_path / "repo", CommandRunner())


@pytest.fixture
def scratch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Where the proxy's private temporary directories go (checked empty afterwards)."""
    where = tmp_path / "tmp"
    where.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(where))
    return where


@pytest.fixture
def agent() -> MovingAgent:
    return MovingAgent()


@pytest.fixture
def lab(agent: MovingAgent, repo: Repository) -> Lab:
    return Lab(agent, repo)


def backup(lab: Lab, tree: Path, runner: CommandRunner, at: float, *, full_every: int = 7,
           attach: Any = None, verify: VerifyMode = VerifyMode.STREAM) -> dict[str, Any]:
    """One incremental backup frozen at ``at``; a fresh pair of peers each time."""
    assert isinstance(lab.agent, MovingAgent)
    lab.agent.frozen_at = at
    fresh = Lab(lab.agent, lab.repo)
    return run_offhost_backup(runner, SOURCE, Location("bk1", str(lab.repo.root)),
                              **fresh.wiring(attach or FakeAttach(tree)), verify=verify,
                              incremental=True, full_every=full_every)


def stored(repo: Repository, summary: dict[str, Any]) -> Backup:
    return repo.get(summary["backup_id"])


def test_level_0_then_level_1_with_the_parents_state_file(
        lab: Lab, tree: Path, repo: Repository, scratch: Path) -> None:
    runner = TarWatcher()
    first = backup(lab, tree, runner, FROZEN_AT)
    assert first["tar_level"] == 0 and first["parent"] is None
    zero = stored(repo, first)
    assert zero.manifest.tar_level == 0 and zero.manifest.chain_id == str(zero.id)
    # a level 0: tar was given a state file name that did not exist yet
    argv = runner.creates[0]
    state = state_option(argv)
    assert state is not None and runner.given == [None]
    assert "--no-check-device" in argv
    assert argv.index("--no-check-device") < argv.index("--")
    assert argv.index(f"--listed-incremental={state}") < argv.index("--")
    assert os.listdir(scratch) == []  # the private directory went

    (tree / "sub" / "new.txt").write_text("added after level 0\n")
    second = backup(lab, tree, runner, FROZEN_AT + HOUR)
    one = stored(repo, second)
    assert second["tar_level"] == 1 == one.manifest.tar_level
    assert one.manifest.parent == str(zero.id) == one.manifest.chain == second["chain"]
    # tar started from a copy of level 0's stored state file, in a fresh private place
    assert runner.given[1] == repo.snapshot_path(zero.id).read_bytes()
    assert state_option(runner.creates[1]) != state
    assert "--no-check-device" in runner.creates[1]
    assert os.listdir(scratch) == []
    assert [b.id for b in repo.chain(one)] == [zero.id, one.id]
    assert repo.leftovers() == []


def test_a_new_level_0_at_full_every(lab: Lab, tree: Path, repo: Repository,
                                     scratch: Path) -> None:
    runner = TarWatcher()
    levels = [backup(lab, tree, runner, FROZEN_AT + i * HOUR, full_every=2)["tar_level"]
              for i in range(5)]
    assert levels == [0, 1, 2, 0, 1]
    assert runner.given[0] is None and runner.given[3] is None
    assert all(given is not None for i, given in enumerate(runner.given) if i not in (0, 3))
    newest = repo.list()[-1]
    assert newest.manifest.chain == str(repo.list()[3].id)
    assert os.listdir(scratch) == []


def test_the_state_files_dump_time_is_the_freeze_less_the_margin(
        lab: Lab, tree: Path, repo: Repository, scratch: Path) -> None:
    """tar writes the time it started; what is stored says the freeze less 60 s, so a
    file changed between the freeze and tar's start is in the next level."""
    runner = TarWatcher()
    zero = stored(repo, backup(lab, tree, runner, FROZEN_AT))
    header = tar.parse_snapshot_header(repo.snapshot_path(zero.id).read_bytes())
    assert (header.seconds, header.nanoseconds) == (int(FROZEN_AT) - 60, 125_000_000)
    one = stored(repo, backup(lab, tree, runner, FROZEN_AT + HOUR))
    header = tar.parse_snapshot_header(repo.snapshot_path(one.id).read_bytes())
    assert (header.seconds, header.nanoseconds) == (int(FROZEN_AT + HOUR) - 60, 125_000_000)
    # what tar was given for level 1 is level 0's, rewritten time and all
    given = runner.given[1]
    assert given is not None and tar.parse_snapshot_header(given).seconds == int(FROZEN_AT) - 60


def test_an_agent_frozen_in_the_future_is_not_believed(lab: Lab, tree: Path,
                                                       repo: Repository, scratch: Path,
                                                       agent: MovingAgent) -> None:
    """A freeze time ahead of tar's own start never moves the dump time later (files
    changed meanwhile would be skipped next time)."""
    runner = TarWatcher()
    before = time.time()
    zero = stored(repo, backup(lab, tree, runner, before + 3 * 86400))
    header = tar.parse_snapshot_header(repo.snapshot_path(zero.id).read_bytes())
    assert header.seconds <= time.time()


def test_the_state_file_is_removed_after_a_failure(lab: Lab, tree: Path, repo: Repository,
                                                   scratch: Path, agent: MovingAgent) -> None:
    runner = TarWatcher()
    backup(lab, tree, runner, FROZEN_AT)
    # the duplicate goes bad while tar runs: tar wrote the state file, then the failure
    agent.health = "invalid"
    with pytest.raises(DuplicateInvalidError):
        backup(lab, tree, runner, FROZEN_AT + HOUR)
    assert runner.given[1] is not None  # the parent's state file had been fetched
    assert os.listdir(scratch) == []
    assert len(repo.list()) == 1 and not list(repo.root.rglob("*.partial"))
    # the attach fails: before tar, after the state file was fetched
    agent.health = "healthy"
    with pytest.raises(IntegrityError):
        backup(lab, tree, runner, FROZEN_AT + 2 * HOUR,
               attach=FakeAttach(tree, fail=IntegrityError("no such disk")))
    assert os.listdir(scratch) == []
    assert len(repo.list()) == 1 and not list(repo.root.rglob("*.partial"))
    # and the next one still builds on level 0
    assert backup(lab, tree, runner, FROZEN_AT + 3 * HOUR)["tar_level"] == 1
    assert os.listdir(scratch) == []
