"""LocalController's decisions and LIO naming, on recorded outputs (no LIO here)."""

from __future__ import annotations

import pytest

from sanoffload.agent import config as agent_config
from sanoffload.agent.controller import (
    Duplicate,
    LocalController,
    kernel_allows_nested_freeze,
)
from sanoffload.iqn import valid_iqn
from sanoffload.kinds import DuplicateKind
from sanoffload.testing import FakeRunner
from sanoffload.tools import lio

from .recorded import feed

pytestmark = pytest.mark.unit

CONFIG = """
[portal]
address = "10.77.0.11"
[clients.px1]
initiators = ["iqn.2026-11.org.sanoffload.lab:px1"]
roots = ["/srv"]
"""


def _controller(runner: FakeRunner, release: str, freeze: str = "auto") -> LocalController:
    cfg = agent_config.parse(f'freeze = "{freeze}"\n' + CONFIG, "test")
    return LocalController(runner, cfg, exporter=None, kernel_release=release)


@pytest.mark.parametrize("release,nested", [("6.1.0-50-amd64", False), ("6.5.13", False),
                                            ("6.6.0", True), ("6.12.57+deb13-amd64", True),
                                            ("garbage", False)])
def test_nested_freeze_by_kernel_release(release: str, nested: bool) -> None:
    assert kernel_allows_nested_freeze(release) is nested


def test_who_freezes_follows_kernel_kind_and_override() -> None:
    old = _controller(FakeRunner(), "6.1.0-50-amd64")
    assert old.who_freezes(DuplicateKind.SNAPSHOT) == "lvm"
    assert old.who_freezes(DuplicateKind.THIN_SNAPSHOT) == "lvm"
    # fsfreeze + split worked on 6.1
    assert old.who_freezes(DuplicateKind.RAID1_SPLIT) == "fsfreeze"
    new = _controller(FakeRunner(), "6.12.57+deb13-amd64")
    assert new.who_freezes(DuplicateKind.SNAPSHOT) == "fsfreeze"
    forced = _controller(FakeRunner(), "6.12.57+deb13-amd64", freeze="lvm")
    assert forced.who_freezes(DuplicateKind.RAID1_SPLIT) == "lvm"


def test_leftovers_of_a_failed_lvcreate_are_removed_by_name() -> None:
    runner = FakeRunner()
    runner.on("lvremove", returncode=0)
    runner.on("dmsetup", "remove", returncode=0)
    feed(runner, "lvs", "lvs_after_frozen")  # snap2 still has lin as origin: -real stays
    ctl = _controller(runner, "6.1.0")
    removed = ctl.remove_leftovers("datavg", "sanoffload-snap3", "lin")
    assert runner.argvs()[0][:2] == ["lvremove", "--yes"]
    assert ["dmsetup", "remove", "--retry", "datavg-sanoffload--snap3-cow"] in runner.argvs()
    assert ["dmsetup", "remove", "--retry", "datavg-sanoffload--snap3"] in runner.argvs()
    assert not any("lin-real" in " ".join(a) for a in runner.argvs())
    assert "LV datavg/sanoffload-snap3" in removed


def test_orphan_real_device_goes_when_no_snapshot_needs_it() -> None:
    runner = FakeRunner()
    runner.on("lvremove", returncode=5, stderr='  Failed to find logical volume "datavg/x"\n')
    runner.on("dmsetup", "remove", returncode=1, stderr="No such device or address\n")
    runner.on("lvs", stdout='{"report":[{"lv":[]}]}')
    runner.on("dmsetup", "info", stdout="0\n")
    runner.on("dmsetup", "remove", "--retry", "datavg-lin-real", returncode=0)
    removed = _controller(runner, "6.1.0").remove_leftovers("datavg", "x", "lin")
    assert removed == ["dm device datavg-lin-real"]


def test_health_reports_an_overflowed_snapshot_invalid() -> None:
    runner = FakeRunner()
    feed(runner, "lvs", "lvs_overflow")
    ctl = _controller(runner, "6.1.0")
    snap = DuplicateKind.SNAPSHOT
    assert ctl.health(Duplicate(snap, "datavg", "sanoffload-snap1", "lin")) == "invalid"
    assert ctl.health(Duplicate(snap, "datavg", "sanoffload-snap2", "lin")) == "healthy"
    assert ctl.health(Duplicate(DuplicateKind.SNAPSHOT, "datavg", "gone", "lin")) == "missing"


def test_identifier_is_lio_naa_of_the_serial() -> None:
    # seen in the lab: serial ea0c139e-... presented as naa.6001405ea0c139ecf014536b143859e3
    assert (lio.naa_from_serial("ea0c139e-cf01-4536-b143-859e35718396")
            == "naa.6001405ea0c139ecf014536b143859e3")
    with pytest.raises(ValueError):
        lio.naa_from_serial("short")


def test_target_names_carry_the_mark_and_are_valid_iqns() -> None:
    iqn = lio.target_iqn_for("fs1-0a1b2c3d")
    assert iqn == "iqn.2026-11.org.sanoffload:fs1-0a1b2c3d"
    assert valid_iqn(iqn)
    assert lio.backstore_name_for("fs1-0a1b2c3d").startswith(lio.BACKSTORE_PREFIX)
    for bad in ("iqn.2026-11.org.x:UPPER", "eui.0123", "iqn.26-1.x", ""):
        assert not valid_iqn(bad)
    with pytest.raises(ValueError):
        lio.target_iqn_for("bad id!")
