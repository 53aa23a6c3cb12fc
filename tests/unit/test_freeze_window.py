"""The frozen window holds one command: the real LocalController's plan inside the real quiesce.

LVM's answers are recorded outputs (tests/fixtures/recorded); the lookups a
duplicate needs (``vgs`` for a snapshot's size, ``lvs`` of the thin pool) and
the checks of what was made (``lvs``, ``lvchange --addtag``) must run before
``fsfreeze --freeze`` or after ``fsfreeze --unfreeze``, never between them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sanoffload.agent import config as agent_config
from sanoffload.agent.controller import LocalController
from sanoffload.agent.hooks import Hooks
from sanoffload.agent.quiesce import quiesce_and_duplicate
from sanoffload.kinds import DuplicateKind
from sanoffload.testing import FakeRunner

from .fakes_agent import FakeResolver, recorded_lv
from .recorded import feed, load
from .test_quiesce import FakeGuard

pytestmark = pytest.mark.unit

CONFIG = """
freeze = "fsfreeze"
[portal]
address = "10.77.0.11"
[clients.px1]
initiators = ["iqn.2026-11.org.sanoffload.lab:px1"]
roots = ["/srv"]
"""
NAME = "sanoffload-fs1-0a1b2c3d"


def lvs_with(origin: str, attr: str) -> str:
    """The recorded ``lvs --all`` plus a row for NAME made from ``origin`` (as after lvcreate)."""
    data = json.loads(load("lvs_all")[0])
    rows = data["report"][0]["lv"]
    row = dict(next(r for r in rows if r["lv_name"] == origin))
    row.update(lv_name=NAME, lv_attr=attr, origin=origin, lv_tags="sanoffload")
    rows.append(row)
    return json.dumps(data)


def runner_for(kind: DuplicateKind) -> FakeRunner:
    r = FakeRunner()
    r.on("sync", "-f")
    r.on("fsfreeze")
    if kind is DuplicateKind.SNAPSHOT:
        feed(r, "vgs", "vgs")
        feed(r, "lvcreate", "lvcreate_snap")
        r.on("lvs", stdout=lvs_with("lin", "swi-a-s---"))
    elif kind is DuplicateKind.THIN_SNAPSHOT:
        feed(r, "lvs", "lvs_all")
        r.on("lvs", "--all", "--reportformat", stdout=lvs_with("thin", "Vwi-a-tz--"))
        feed(r, "lvcreate", "lvcreate_thinsnap")
    elif kind is DuplicateKind.RAID1_SPLIT:
        feed(r, "lvconvert", "lvconvert_split")
        feed(r, "lvs", "lvs_split")
    else:
        feed(r, "lvconvert", "lvconvert_msplit")
        r.on("lvchange", "--addtag")
        feed(r, "lvs", "lvs_msplit")
    return r


ORIGIN = {DuplicateKind.SNAPSHOT: "lin", DuplicateKind.THIN_SNAPSHOT: "thin",
          DuplicateKind.RAID1_SPLIT: "r1", DuplicateKind.MIRROR_SPLIT: "m1"}
FROZEN_COMMAND = {DuplicateKind.SNAPSHOT: "lvcreate", DuplicateKind.THIN_SNAPSHOT: "lvcreate",
                  DuplicateKind.RAID1_SPLIT: "lvconvert", DuplicateKind.MIRROR_SPLIT: "lvconvert"}


@pytest.mark.parametrize("kind", list(DuplicateKind))
def test_only_the_duplicating_command_runs_frozen(kind: DuplicateKind, tmp_path: Path) -> None:
    runner = runner_for(kind)
    controller = LocalController(runner, agent_config.parse(CONFIG, "test"), exporter=None,
                                 kernel_release="6.12.57+deb13-amd64")
    obj = FakeResolver(lv=recorded_lv(ORIGIN[kind]))(runner, "/srv/lin/x", ["/srv"],
                                                    duplicate_kind=kind.value)
    # the recorded mirror split was named sanoffload-msplit
    name = "sanoffload-msplit" if kind is DuplicateKind.MIRROR_SPLIT else NAME
    plan = controller.plan_duplicate(obj, name)
    planned = len(runner.calls)
    q = quiesce_and_duplicate(runner, "/srv/lin", plan.make, hooks=Hooks.from_paths([], []),
                              guard_factory=FakeGuard([]).factory, state_dir=str(tmp_path),
                              who_freezes="fsfreeze")
    dup = plan.complete(q.result)
    argvs = runner.argvs()
    freeze = argvs.index(["fsfreeze", "--freeze", "/srv/lin"])
    thaw = argvs.index(["fsfreeze", "--unfreeze", "/srv/lin"])
    assert [a[0] for a in argvs[freeze + 1:thaw]] == [FROZEN_COMMAND[kind]]
    # the lookups went before the freeze (and sync -f), the checks after the thaw
    assert planned == (1 if kind in (DuplicateKind.SNAPSHOT, DuplicateKind.THIN_SNAPSHOT) else 0)
    assert any(a[0] == "lvs" for a in argvs[thaw + 1:])
    assert dup.kind is kind and dup.origin == ORIGIN[kind]
    assert dup.name == ("r1_rimage_1" if kind is DuplicateKind.RAID1_SPLIT else name)
