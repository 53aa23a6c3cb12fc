"""Issue 13, file level: prune keeps every backup a kept incremental level needs.

A real Repository in tmp_path (no test-read: these are about manifests); each level
carries a state file whose head GNU tar 1.34 wrote.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sanoffload.store.prune import Policy, dependencies, prune
from sanoffload.store.repo import Backup, BackupId, Repository

pytestmark = pytest.mark.unit

#: the head of a state file GNU tar 1.34 wrote (recorded on this machine), then a record
STATE = b"GNU tar-1.34-2\n1796161436\x00289291417\x000\x001796161436\x00"


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    (tmp_path / "repo").mkdir()
    return Repository(tmp_path / "repo")


def level(repo: Repository, stamp: str, tar_level: int | None = None,
          parent: Backup | None = None) -> Backup:
    """A backup of fs1:/srv/data at ``stamp`` (a level of ``parent``'s chain, a level 0,
    or with ``tar_level`` None a full backup)."""
    fields: dict[str, Any] = {}
    with repo.writer("fs1", "/srv/data", timestamp=stamp) as w:
        w.write(b"archive " + stamp.encode())
        if tar_level is not None:
            fields["tar_level"] = tar_level
            if parent is not None:
                fields["parent"] = str(parent.id)
                fields["chain"] = parent.manifest.chain_id
            w.write_snapshot([STATE])
        return w.commit(fields, verify=False)


def ids(backups: list[Backup]) -> list[str]:
    return sorted(b.id.timestamp for b in backups)


@pytest.fixture
def two_chains(repo: Repository) -> dict[str, Backup]:
    """Chain A (levels 0-2, one a day), a full backup (day 3, before A2), chain B
    (levels 0-1, day 4)."""
    out: dict[str, Backup] = {}
    out["a0"] = level(repo, "20261101T100000Z", 0)
    out["a1"] = level(repo, "20261102T100000Z", 1, out["a0"])
    out["a2"] = level(repo, "20261103T100000Z", 2, out["a1"])
    out["full"] = level(repo, "20261103T080000Z")
    out["b0"] = level(repo, "20261104T100000Z", 0)
    out["b1"] = level(repo, "20261104T110000Z", 1, out["b0"])
    return out


def test_dependencies_walk_to_the_level_0(two_chains: dict[str, Backup]) -> None:
    by_id = {b.id: b for b in two_chains.values()}
    a = two_chains
    assert dependencies(by_id, {a["a2"].id}) == {a["a1"].id: str(a["a2"].id),
                                                 a["a0"].id: str(a["a2"].id)}
    # the newest kept names what it needs; what a kept one needs is its own reason
    assert dependencies(by_id, {a["a2"].id, a["a1"].id}) == {a["a1"].id: str(a["a2"].id),
                                                             a["a0"].id: str(a["a2"].id)}
    assert dependencies(by_id, {a["full"].id, a["b0"].id, a["a0"].id}) == {}


def test_a_kept_level_2_keeps_its_level_1_and_0(repo: Repository,
                                                two_chains: dict[str, Backup]) -> None:
    a = two_chains
    # one a day for two days: B1 (day 4) and A2 (day 3)
    plan = prune(repo, Policy(daily=2))
    reasons = {b.id.timestamp: r for b, r in plan.keep}
    assert ids([b for b, _ in plan.keep]) == ids([a["a0"], a["a1"], a["a2"], a["b0"],
                                                  a["b1"]])
    assert ids(plan.remove) == ids([a["full"]])
    assert reasons[a["a1"].id.timestamp] == (f"chain of {a['a2'].id}",)
    assert reasons[a["a0"].id.timestamp] == (f"chain of {a['a2'].id}",)
    assert sorted((b.id.timestamp, n) for b, n in plan.kept_for_chain) == sorted(
        [(a["a0"].id.timestamp, str(a["a2"].id)), (a["a1"].id.timestamp, str(a["a2"].id)),
         (a["b0"].id.timestamp, str(a["b1"].id))])
    assert plan.to_dict()["kept_for_chain"][0]["needed_by"] in (str(a["a2"].id),
                                                                str(a["b1"].id))
    assert ids(repo.list()) == ids([a["a0"], a["a1"], a["a2"], a["b0"], a["b1"]])
    assert [b.id for b in repo.chain(a["a2"].id)] == [a["a0"].id, a["a1"].id, a["a2"].id]


def test_an_unkept_whole_chain_goes(repo: Repository, two_chains: dict[str, Backup]) -> None:
    a = two_chains
    plan = prune(repo, Policy(last=1))
    assert ids([b for b, _ in plan.keep]) == ids([a["b0"], a["b1"]])
    assert ids(plan.remove) == ids([a["a0"], a["a1"], a["a2"], a["full"]])
    assert ids(repo.list()) == ids([a["b0"], a["b1"]])
    for gone in ("a0", "a1", "a2"):
        assert not repo.snapshot_path(a[gone].id).exists()  # its state file went too
    assert repo.leftovers() == []
    assert len(repo.chain(a["b1"].id)) == 2


def test_a_dry_run_removes_nothing(repo: Repository, two_chains: dict[str, Backup]) -> None:
    plan = prune(repo, Policy(last=1), dry_run=True)
    assert len(plan.remove) == 4 and len(repo.list()) == 6


@pytest.mark.hostile("store", "prune with a kept level whose parent's manifest is broken",
                     "the chain's level 0 is kept (the broken link left alone)")
def test_a_broken_link_does_not_make_prune_delete_the_chain(
        repo: Repository, two_chains: dict[str, Backup]) -> None:
    a = two_chains
    a["a1"].manifest_path.write_text("{ not json")
    plan = prune(repo, Policy(daily=2))
    assert [b.id for b in plan.broken] == [a["a1"].id]
    assert a["a0"].id in {b.id for b, _ in plan.keep}
    assert ids(plan.remove) == ids([a["full"]])
    assert repo.get(a["a0"].id).manifest.tar_level == 0


@pytest.mark.hostile("store", "prune with a kept level whose parent is missing",
                     "the older levels of its chain are kept")
def test_a_missing_link_does_not_make_prune_delete_the_chain(
        repo: Repository, two_chains: dict[str, Backup]) -> None:
    a = two_chains
    repo.delete(a["a1"].id)
    plan = prune(repo, Policy(daily=2))
    assert ids([b for b, _ in plan.keep]) == ids([a["a0"], a["a2"], a["b0"], a["b1"]])
    assert ids(plan.remove) == ids([a["full"]])
    assert repo.get(a["a0"].id).id == a["a0"].id


def test_a_kept_level_0_needs_nothing(repo: Repository,
                                      two_chains: dict[str, Backup]) -> None:
    a = two_chains
    by_id: dict[BackupId, Backup] = {b.id: b for b in two_chains.values()}
    assert dependencies(by_id, {a["b0"].id}) == {}


def test_a_chain_of_levels_stored_without_the_test_read_is_whole(
        repo: Repository, two_chains: dict[str, Backup]) -> None:
    """``not-verified`` (no test-read on receipt) is not ``failed``: the chain holds."""
    a = two_chains
    assert repo.get(a["a0"].id).manifest.verification.status == "not-verified"  # type: ignore[union-attr]
    assert [b.id for b in repo.chain(a["a2"].id)] == [a["a0"].id, a["a1"].id, a["a2"].id]
