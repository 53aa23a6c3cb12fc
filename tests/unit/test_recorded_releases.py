"""The LVM and findmnt wrappers on each Debian release's real outputs.

bookworm (kernel 6.1, LVM 2.03.16) and trixie (kernel 6.12, LVM 2.03.31) were
recorded by tests/fixtures/recorded/record.sh on the lab's fs1. The parsing
and the states sanoffload decides on must read the same on both; the one
difference the agent relies on is checked too: on 6.12 ``lvcreate -s`` of a
filesystem frozen by ``fsfreeze`` succeeds, on 6.1 it fails.
"""

from __future__ import annotations

import pytest

from sanoffload.testing import FakeRunner
from sanoffload.tools import findmnt, lvm

from .recorded import RECORDED, feed, load

RELEASES = sorted(p.name for p in RECORDED.iterdir() if (p / "lvs_all.out").exists())


def lvs_of(name: str, release: str) -> dict[str, lvm.LogicalVolume]:
    runner = feed(FakeRunner(), "lvs", name, release=release)
    return {lv.name: lv for lv in lvm.list_lvs(runner, "datavg")}


def test_both_releases_are_recorded() -> None:
    assert RELEASES == ["bookworm", "trixie"]
    kernels = {r: (RECORDED / r / "uname").read_text().strip() for r in RELEASES}
    assert kernels["bookworm"].startswith("6.1.") and kernels["trixie"].startswith("6.12.")


@pytest.mark.parametrize("release", RELEASES)
def test_volumes_read_alike(release: str) -> None:
    lvs = lvs_of("lvs_all", release)
    assert lvs["lin"].segtype == "linear" and not lvs["lin"].is_snapshot
    assert lvs["thin"].is_thin and lvs["pool"].is_thin_pool
    # recorded during a "check" scrub: trixie's copy_percent is its progress (87 %), so a
    # split waits for it (refusing is the safe reading)
    assert lvs["r1"].is_raid1 and lvs["r1"].sync_action in ("check", "idle")
    assert lvs["r1"].is_in_sync == (lvs["r1"].copy_percent == 100.0)
    assert lvs["m1"].is_mirror and lvs["m1"].is_in_sync
    assert lvs["r1_rimage_0"].is_hidden
    assert all(lv.is_active for n, lv in lvs.items() if not n.endswith("_pmspare"))
    assert not any(lv.looks_like_ours for lv in lvs.values())
    vg = lvm.get_vg(feed(FakeRunner(), "vgs", "vgs", release=release), "datavg")
    assert 0 < vg.free < vg.size and vg.extent_size == 4 << 20


@pytest.mark.parametrize("release", RELEASES)
def test_an_overflowed_snapshot_is_invalid_and_a_thin_one_is_not(release: str) -> None:
    lvs = lvs_of("lvs_overflow", release)
    snap = lvs["sanoffload-snap1"]
    assert snap.is_snapshot and snap.is_invalid and snap.is_ours
    with pytest.raises(Exception, match="invalid"):
        lvm.ensure_valid(snap)
    tsnap = lvs["sanoffload-tsnap"]
    assert tsnap.is_snapshot and not tsnap.is_invalid


@pytest.mark.parametrize("release", RELEASES)
def test_raid1_split_and_merge_read_alike(release: str) -> None:
    split = lvs_of("lvs_split", release)
    assert split["r1_rimage_1"].is_tracked_split_image
    merged = lvs_of("lvs_merged", release)
    assert "r1_rimage_1" in merged and not merged["r1_rimage_1"].is_tracked_split_image
    assert merged["r1"].is_raid1
    msplit = lvs_of("lvs_msplit", release)
    assert msplit["sanoffload-msplit"].looks_like_ours
    assert not msplit["m1"].is_mirror  # one leg left: linear


@pytest.mark.parametrize("release", RELEASES)
def test_mounts_read_alike(release: str) -> None:
    runner = feed(FakeRunner(), "findmnt", "findmnt_lin", release=release)
    m = findmnt.mount_of(runner, "/srv/lin/dir")
    assert (m.target, m.fstype) == ("/srv/lin", "ext4")
    runner = feed(FakeRunner(), "findmnt", "findmnt_thin", release=release)
    assert findmnt.mount_of(runner, "/srv/thin/dir").fstype == "xfs"


def test_fsfreeze_nests_with_lvms_suspend_only_on_the_newer_kernel() -> None:
    assert load("lvcreate_frozen", "bookworm")[2] == 5
    assert "Device or resource busy" in load("lvcreate_frozen", "bookworm")[1]
    assert load("lvcreate_frozen", "trixie")[2] == 0
    after = lvs_of("lvs_after_frozen", "trixie")
    assert after["sanoffload-snap3"].is_snapshot and not after["sanoffload-snap3"].is_half_made
    assert lvs_of("lvs_after_frozen", "bookworm")["sanoffload-snap3"].is_half_made
