"""The agent's session talks to its storage only through the StorageController protocol.

:class:`NodeController` below is a second, minimal implementation (no LVM, no
LIO, nothing shared with LocalController), shaped like issue 12's storage node:
it names what it makes its own way and keeps it in dictionaries. prepare,
status, release and both cleanups must work with it unchanged: if the session
looked behind the protocol (``isinstance(..., LocalController)``), the
half-made duplicate and the orphans below would survive.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from sanoffload.agent.controller import (
    Accounted,
    Duplicate,
    Health,
    Immediate,
    Orphan,
    StorageController,
)
from sanoffload.agent.journal import Journal, Resource, SessionRecord
from sanoffload.agent.resolve import BackupObject
from sanoffload.agent.session import Agent
from sanoffload.kinds import DuplicateKind, WhoFreezes
from sanoffload.testing import FakeRunner
from sanoffload.tools import lio
from tests.unit.fakes_agent import Clock, FakeResolver
from tests.unit.test_agent_session import MP, PATH, PX1, T0, make_config

pytestmark = pytest.mark.unit


class NodeController:
    """A storage node's view: LUN copies and exports in dictionaries, its own names."""

    def __init__(self) -> None:
        self.copies: dict[str, Duplicate] = {}
        #: what a duplicate() interrupted half-way left, by the duplicate's name
        self.debris: set[str] = set()
        self.exports: set[str] = set()
        self.log: list[str] = []

    def who_freezes(self, kind: DuplicateKind) -> WhoFreezes:
        return WhoFreezes.LVM  # the node copies atomically; here: no guard process in a unit test

    def plan_duplicate(self, obj: BackupObject, name: str) -> Immediate:
        return Immediate(lambda: self.duplicate(obj, name))

    def duplicate(self, obj: BackupObject, name: str) -> Duplicate:
        assert obj.lv is not None and obj.duplicate_kind is not None
        dup = Duplicate(obj.duplicate_kind, "node-pool", name, obj.lv.name)
        self.copies[name] = dup
        return dup

    def discard(self, dup: Duplicate) -> None:
        self.log.append(f"discard {dup.name}")
        self.copies.pop(dup.name, None)

    def discard_partial(self, dup: Duplicate) -> list[str]:
        self.log.append(f"discard_partial {dup.name}")
        if dup.name in self.debris:
            self.debris.discard(dup.name)
            return [f"debris of {dup.name}"]
        return []

    def expose(self, dup: Duplicate, spec: lio.ExportSpec) -> lio.Export:
        self.exports.add(spec.target_iqn)
        return lio.Export(spec.target_iqn, "10.77.0.30", 3260, spec.lun, spec.serial,
                          lio.naa_from_serial(spec.serial), spec.backstore)

    def identify(self, target_iqn: str, lun: int = 0) -> str:
        raise NotImplementedError

    def unexpose(self, target_iqn: str, backstore: str) -> list[str]:
        self.log.append(f"unexpose {target_iqn or backstore}")
        if target_iqn in self.exports:
            self.exports.discard(target_iqn)
            return [target_iqn]
        return []

    def health(self, dup: Duplicate) -> Health:
        return "healthy" if dup.name in self.copies else "missing"

    def orphans(self, accounted: Accounted) -> list[Orphan]:
        found = [Orphan("lv", d.name, vg=d.vg, origin=d.origin) for d in self.copies.values()
                 if (d.vg, d.name) not in accounted.duplicates]
        return found + [Orphan("lio-target", t) for t in sorted(self.exports)
                        if t not in accounted.targets]

    def remove_orphan(self, orphan: Orphan) -> list[str]:
        self.log.append(f"remove_orphan {orphan.name}")
        if orphan.kind == "lv":
            self.copies.pop(orphan.name, None)
        else:
            self.exports.discard(orphan.name)
        return [str(orphan)]


def _agent(tmp_path: Path, ctl: NodeController) -> Agent:
    config = make_config(tmp_path, max_sessions=3)
    runner = FakeRunner()
    runner.on("sync", "-f", MP)
    return Agent(runner, config, controller=ctl, host="fs1", clock=Clock(T0),
                 resolver=FakeResolver())


def test_node_controller_satisfies_the_protocol() -> None:
    ctl: StorageController = NodeController()  # mypy checks the structure here
    assert ctl.orphans(Accounted()) == []


def test_session_runs_on_a_second_controller_implementation(tmp_path: Path) -> None:
    ctl = NodeController()
    agent = _agent(tmp_path, ctl)

    p = agent.prepare(PATH, PX1)
    assert p.portals == ["10.77.0.30:3260"] and p.identifier.startswith("naa.6001405")
    assert agent.status(p.session_id)["status"] == "healthy"

    # a crash left: a copy and an export the journal does not name, and a session
    # whose duplicate() was interrupted half-way
    ctl.copies["lost-copy"] = Duplicate(DuplicateKind.SNAPSHOT, "node-pool", "lost-copy", "lin")
    ctl.exports.add("iqn.2026-11.org.sanoffload:fs1-0000dead")
    crashed = SessionRecord(
        session_id="fs1-0000000c", client="px1", initiator=PX1, path=PATH, created=T0,
        lease_expires=T0 + 60, state="preparing",
        resources=[Resource("snapshot", {"vg": "node-pool", "name": "half", "origin": "lin"})])
    Journal(agent.config.state_dir).save(crashed)
    ctl.debris.add("half")

    report = agent.cleanup()
    assert report["released"] == ["fs1-0000000c"]
    assert sorted(report["orphans_removed"]) == [
        "LIO target iqn.2026-11.org.sanoffload:fs1-0000dead", "LV node-pool/lost-copy"]
    assert ctl.debris == set()
    # the ready session is accounted for: untouched
    assert set(ctl.copies) == {f"sanoffload-{p.session_id}"} and ctl.exports == {p.target_iqn}

    agent.release(p.session_id)
    assert ctl.copies == {} and ctl.exports == set()
    assert agent.cleanup(all_sessions=True) == {"released": [], "orphans_removed": []}
