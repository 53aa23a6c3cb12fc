"""sanoffload.tools.lvm against lvs/vgs/lvcreate/lvconvert/lvremove output recorded on bookworm."""

from __future__ import annotations

import dataclasses
import json
import logging

import pytest

from sanoffload.errors import CommandError, DuplicateInvalidError, RefusedError, ResourceError
from sanoffload.testing import FakeRunner
from sanoffload.tools import lvm
from sanoffload.tools.lvm import LogicalVolume, VolumeGroup
from tests.unit.recorded import feed, load

pytestmark = pytest.mark.unit

MIB = 1024 * 1024
MUTATING = ("lvcreate", "lvconvert", "lvremove", "lvchange", "lvrename", "fsfreeze")
LV_FIELDS = ("lv_name,vg_name,lv_attr,lv_size,segtype,pool_lv,origin,data_percent,"
             "metadata_percent,snap_percent,copy_percent,sync_percent,lv_tags,lv_path,"
             "lv_dm_path,lv_kernel_major,lv_kernel_minor,lv_uuid,raid_sync_action,"
             "lv_health_status,lv_active,thin_id")
LVS = ["lvs", "--all", "--reportformat", "json", "--units", "b", "--nosuffix", "-o", LV_FIELDS]


def lvs_of(name: str) -> dict[str, LogicalVolume]:
    """The LVs of a recorded lvs output, by name, parsed through list_lvs."""
    runner = feed(FakeRunner(), "lvs", name)
    return {lv.name: lv for lv in lvm.list_lvs(runner, "datavg")}


def edited_lvs(name: str, lv_name: str, **changes: str) -> str:
    """A recorded lvs output with one LV's fields changed (for states not recorded)."""
    data = json.loads(load(name)[0])
    for row in data["report"][0]["lv"]:
        if row["lv_name"] == lv_name:
            row.update(changes)
            return json.dumps(data)
    raise AssertionError(f"{lv_name} not in {name}")


def mutations(runner: FakeRunner) -> list[list[str]]:
    return [argv for argv in runner.argvs() if argv[0] in MUTATING]


def vg(free: int = 6148849664, extent: int = 4 * MIB) -> VolumeGroup:
    return VolumeGroup("datavg", 8581545984, free, extent, [])


# --------------------------------------------------------------------------
# reading: lvs, vgs
# --------------------------------------------------------------------------

def test_list_lvs_argv_and_env() -> None:
    runner = feed(FakeRunner(), "lvs", "lvs_all")
    lvm.list_lvs(runner, "datavg")
    assert runner.argvs() == [[*LVS, "datavg"]]
    assert runner.calls[0].env["LVM_SUPPRESS_FD_WARNINGS"] == "1"
    assert runner.calls[0].env["LC_ALL"] == "C"


def test_list_lvs_without_all_with_select_and_no_vg() -> None:
    runner = feed(FakeRunner(), "lvs", "lvs_all")
    lvm.list_lvs(runner, all=False, select="lv_tags=sanoffload")
    assert runner.argvs() == [["lvs", "--reportformat", "json", "--units", "b", "--nosuffix",
                               "-o", LV_FIELDS, "--select", "lv_tags=sanoffload"]]


def test_list_lvs_parses_every_field_of_a_linear_lv() -> None:
    lin = lvs_of("lvs_all")["lin"]
    assert lin == LogicalVolume(
        name="lin", vg="datavg", attr="-wi-ao----", size_bytes=536870912, segtype="linear",
        pool_lv="", origin="", data_percent=None, metadata_percent=None, snap_percent=None,
        copy_percent=None, sync_percent=None, tags=[], path="/dev/datavg/lin",
        dm_path="/dev/mapper/datavg-lin", kernel_major=253, kernel_minor=0,
        uuid="OeVGBi-oI3H-QpX7-O91o-WpzJ-qF3z-RW4Ghu", sync_action="", health_status="",
        active="active", hidden=False)
    assert lin.full_name == "datavg/lin"
    assert lin.devno == (253, 0)
    assert lin.is_open and lin.is_active
    assert not (lin.is_snapshot or lin.is_thin or lin.is_thin_pool or lin.is_raid1
                or lin.is_mirror or lin.is_invalid or lin.is_half_made or lin.is_hidden
                or lin.is_tracked_split_image or lin.looks_like_ours)
    assert lin.is_in_sync  # nothing to sync on a linear LV


def test_hidden_lvs_lose_their_brackets_and_inactive_ones_their_devno() -> None:
    lvs = lvs_of("lvs_all")
    spare = lvs["lvol0_pmspare"]
    assert spare.is_hidden and spare.path == ""
    assert spare.kernel_major is None and spare.kernel_minor is None and spare.devno is None
    assert not spare.is_active
    assert lvs["r1_rimage_0"].is_hidden and lvs["pool_tdata"].is_hidden
    assert not lvs["r1"].is_hidden


def test_thin_pool_and_thin_volume() -> None:
    lvs = lvs_of("lvs_all")
    pool, thin = lvs["pool"], lvs["thin"]
    assert pool.is_thin_pool and not pool.is_thin
    assert (pool.data_percent, pool.metadata_percent) == (6.29, 11.52)
    # lvs reports the -tpool device's number for the pool (dmsetup_ls: datavg-pool is 253:4)
    assert pool.devno == (253, 3)
    assert thin.is_thin and not thin.is_thin_pool and not thin.is_snapshot
    assert thin.pool_lv == "pool" and thin.data_percent == 12.59


def test_raid1_and_mirror_in_sync() -> None:
    lvs = lvs_of("lvs_all")
    assert lvs["r1"].is_raid1 and lvs["r1"].is_in_sync and lvs["r1"].sync_action == "idle"
    assert lvs["m1"].is_mirror and lvs["m1"].is_in_sync and lvs["m1"].copy_percent == 100.0
    resyncing = dataclasses.replace(lvs["r1"], copy_percent=42.0)
    assert not resyncing.is_in_sync
    assert not dataclasses.replace(lvs["m1"], copy_percent=None).is_in_sync


def test_overflowed_snapshot_is_invalid() -> None:
    lvs = lvs_of("lvs_overflow")
    snap1, snap2 = lvs["sanoffload-snap1"], lvs["sanoffload-snap2"]
    assert snap1.attr == "swi-I-s---" and snap1.is_invalid and snap1.is_snapshot
    assert snap1.origin == "lin" and snap1.tags == ["sanoffload"] and snap1.is_ours
    assert snap2.is_snapshot and not snap2.is_invalid
    with pytest.raises(DuplicateInvalidError, match="sanoffload-snap1 is invalid") as exc:
        lvm.ensure_valid(snap1)
    assert exc.value.exit_code == 8
    lvm.ensure_valid(snap2)  # no raise
    # the origin is marked (o)rigin, and is not a snapshot itself
    assert lvs["lin"].attr.startswith("o") and not lvs["lin"].is_snapshot


def test_full_cow_is_invalid_even_before_the_state_says_so() -> None:
    snap2 = lvs_of("lvs_overflow")["sanoffload-snap2"]
    assert dataclasses.replace(snap2, snap_percent=100.0).is_invalid
    # a thin snapshot at 100 % data is a full pool matter, not an invalid snapshot
    tsnap = lvs_of("lvs_overflow")["sanoffload-tsnap"]
    assert not dataclasses.replace(tsnap, data_percent=100.0, snap_percent=100.0).is_invalid


def test_thin_snapshot_is_a_snapshot() -> None:
    tsnap = lvs_of("lvs_overflow")["sanoffload-tsnap"]
    assert tsnap.is_thin and tsnap.is_snapshot and tsnap.origin == "thin"
    assert tsnap.is_active and not tsnap.is_open


def test_half_made_snapshot_after_frozen_lvcreate() -> None:
    snap3 = lvs_of("lvs_after_frozen")["sanoffload-snap3"]
    assert snap3.attr == "-wi-i-----"
    assert snap3.is_half_made and snap3.is_ours
    # never became a snapshot: no 's', no origin
    assert not snap3.is_snapshot and snap3.origin == ""
    with pytest.raises(DuplicateInvalidError, match="never completed"):
        lvm.ensure_valid(snap3)


def test_tracked_split_image() -> None:
    split = lvs_of("lvs_split")
    image = split["r1_rimage_1"]
    assert image.attr == "Iri-a-r---" and image.is_tracked_split_image
    assert not image.is_hidden and image.path == "/dev/datavg/r1_rimage_1"
    assert [lv.name for lv in split.values() if lv.is_tracked_split_image] == ["r1_rimage_1"]
    assert not any(lv.is_tracked_split_image for lv in lvs_of("lvs_merged").values())


def test_mirror_split_looks_like_ours_by_name_but_only_a_tag_makes_it_ours() -> None:
    lvs = lvs_of("lvs_msplit")
    msplit = lvs["sanoffload-msplit"]
    assert msplit.tags == [] and msplit.looks_like_ours and not msplit.is_ours
    assert not lvs["m1"].is_mirror and lvs["m1"].segtype == "linear"


def test_get_vg() -> None:
    runner = feed(FakeRunner(), "vgs", "vgs")
    got = lvm.get_vg(runner, "datavg")
    assert got == VolumeGroup("datavg", 8581545984, 6148849664, 4194304, [])
    assert runner.argvs() == [["vgs", "--reportformat", "json", "--units", "b", "--nosuffix",
                               "-o", "vg_name,vg_size,vg_free,vg_extent_size,vg_tags",
                               "datavg"]]
    assert runner.calls[0].env["LVM_SUPPRESS_FD_WARNINGS"] == "1"


def test_get_vg_not_reported() -> None:
    runner = feed(FakeRunner(), "vgs", "vgs")
    with pytest.raises(CommandError, match="no volume group 'othervg'"):
        lvm.get_vg(runner, "othervg")


def test_non_json_report_is_a_command_error() -> None:
    runner = FakeRunner().on("lvs", stdout="  lin datavg -wi-ao----\n")
    with pytest.raises(CommandError, match="not JSON"):
        lvm.list_lvs(runner)


@pytest.mark.parametrize(("devno", "expected"), [
    ((253, 0), "lin"), ((253, 5), "thin"), ((253, 10), "r1"), ((253, 13), "m1"),
    ((253, 3), "pool"), ((253, 7), "r1_rimage_0"),
])
def test_find_lv_by_devno(devno: tuple[int, int], expected: str) -> None:
    runner = feed(FakeRunner(), "lvs", "lvs_all")
    lv = lvm.find_lv_by_devno(runner, *devno)
    assert lv is not None and lv.name == expected
    assert runner.argvs() == [[*LVS, "--select",
                               f"lv_kernel_major={devno[0]} && lv_kernel_minor={devno[1]}"]]


@pytest.mark.parametrize("devno", [(254, 0), (253, 14), (253, 99)])
def test_find_lv_by_devno_none(devno: tuple[int, int]) -> None:
    # 254:0 is /dev/vda; 253:14 is datavg-lin-real, a layer, not an LV
    runner = feed(FakeRunner(), "lvs", "lvs_overflow")
    assert lvm.find_lv_by_devno(runner, *devno) is None


def test_get_lv() -> None:
    runner = feed(FakeRunner(), "lvs", "lvs_overflow")
    lv = lvm.get_lv(runner, "datavg", "sanoffload-tsnap")
    assert lv is not None and lv.segtype == "thin"
    assert runner.argvs() == [[*LVS, "--select", 'lv_name="sanoffload-tsnap"', "datavg"]]
    assert lvm.get_lv(runner, "datavg", "sanoffload-snap3") is None


# --------------------------------------------------------------------------
# policy: snapshot size, thin pool room
# --------------------------------------------------------------------------

def test_snapshot_size_minimum_for_a_small_origin() -> None:
    # 10 % of lin (512 MiB) is 51.2 MiB: the 64 MiB floor wins
    assert lvm.snapshot_size(536870912, vg()) == 64 * MIB


def test_snapshot_size_percent_rounded_up_to_extents() -> None:
    assert lvm.snapshot_size(1000 * MIB, vg(), percent=10) == 100 * MIB
    assert lvm.snapshot_size(1000 * MIB, vg(), percent=7) == 72 * MIB  # 70 MiB → 18 extents
    assert lvm.snapshot_size(1, vg(), percent=10, min_bytes=1) == 4 * MIB


def test_snapshot_size_exactly_the_free_space_fits() -> None:
    assert lvm.snapshot_size(10 * 1024 * MIB, vg(free=1024 * MIB)) == 1024 * MIB


def test_snapshot_size_more_than_free_is_a_resource_error() -> None:
    # what lvcreate_snap_nospace asked for (20 GiB) against vgs.out's vg_free
    with pytest.raises(ResourceError, match=r"datavg has 6148849664 bytes free.*needs "
                                            r"21474836480 bytes") as exc:
        lvm.snapshot_size(20 * 1024 * MIB, lvm.get_vg(feed(FakeRunner(), "vgs", "vgs"),
                                                      "datavg"), percent=100)
    assert exc.value.exit_code == 7


@pytest.mark.parametrize("percent", [0, -5, 101])
def test_snapshot_size_rejects_silly_percent(percent: float) -> None:
    with pytest.raises(ValueError, match="percent"):
        lvm.snapshot_size(MIB, vg(), percent=percent)


def test_thin_pool_room_ok() -> None:
    lvm.check_thin_pool_room(lvs_of("lvs_all")["pool"], 80, 80)  # 6.29 / 11.52


def test_thin_pool_data_too_full() -> None:
    with pytest.raises(ResourceError, match=r"thin pool datavg/pool .* data 6\.29 % "
                                            r"\(limit 5 %\), metadata 11\.52 %"):
        lvm.check_thin_pool_room(lvs_of("lvs_all")["pool"], 5, 80)


def test_thin_pool_metadata_too_full() -> None:
    with pytest.raises(ResourceError, match=r"datavg/pool.*metadata 11\.52 % \(limit 10 %\)"):
        lvm.check_thin_pool_room(lvs_of("lvs_all")["pool"], 80, 10)


def test_thin_pool_out_of_space_or_inactive() -> None:
    pool = lvs_of("lvs_all")["pool"]
    with pytest.raises(ResourceError, match="out of data space"):
        lvm.check_thin_pool_room(dataclasses.replace(pool, attr="twi-aotzD-"), 80, 80)
    with pytest.raises(ResourceError, match="usage unknown"):
        lvm.check_thin_pool_room(dataclasses.replace(pool, data_percent=None), 80, 80)


def test_thin_pool_check_needs_a_pool() -> None:
    with pytest.raises(ValueError, match="not a thin pool"):
        lvm.check_thin_pool_room(lvs_of("lvs_all")["thin"], 80, 80)


# --------------------------------------------------------------------------
# changes
# --------------------------------------------------------------------------

def test_create_snapshot_argv_and_result() -> None:
    lin = lvs_of("lvs_all")["lin"]
    runner = feed(FakeRunner(), "lvcreate", "lvcreate_snap")
    feed(runner, "lvs", "lvs_overflow")
    snap = lvm.create_snapshot(runner, lin, "sanoffload-snap1", 64 * MIB, ["sanoffload", "job.7"])
    assert runner.argvs()[0] == [
        "lvcreate", "--yes", "--snapshot", "--size", "67108864b", "--name", "sanoffload-snap1",
        "--addtag", "sanoffload", "--addtag", "job.7", "datavg/lin"]
    assert runner.argvs()[1][0] == "lvs"
    assert snap.name == "sanoffload-snap1" and snap.origin == "lin"
    assert all(c.env["LVM_SUPPRESS_FD_WARNINGS"] == "1" for c in runner.calls)


def test_create_snapshot_capped_by_lvm_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    lin = lvs_of("lvs_all")["lin"]
    runner = feed(FakeRunner(), "lvcreate", "lvcreate_snap_nospace")
    feed(runner, "lvs", "lvs_overflow")
    with caplog.at_level(logging.INFO, logger="sanoffload.tools.lvm"):
        snap = lvm.create_snapshot(runner, lin, "sanoffload-snap2", 20 * 1024 * MIB)
    assert snap.size_bytes == 541065216  # 516 MiB: what LVM made of 20 GiB
    assert "capped the COW of datavg/sanoffload-snap2" in caplog.text


def test_create_snapshot_on_frozen_origin_names_the_leftover() -> None:
    lin = lvs_of("lvs_all")["lin"]
    runner = feed(FakeRunner(), "lvcreate", "lvcreate_frozen")
    feed(runner, "lvs", "lvs_after_frozen")
    with pytest.raises(CommandError) as exc:
        lvm.create_snapshot(runner, lin, "sanoffload-snap3", 64 * MIB)
    assert exc.value.returncode == 5
    assert "Manual intervention required" in exc.value.message
    assert "left datavg/sanoffload-snap3 (lv_attr -wi-i-----)" in exc.value.message
    assert "suspend ioctl" in exc.value.stderr
    assert exc.value.hint and "cleanup" in exc.value.hint


def test_create_snapshot_failure_without_leftover_is_unchanged() -> None:
    lin = lvs_of("lvs_all")["lin"]
    runner = FakeRunner().on("lvcreate", returncode=5, stderr="  Volume group full.\n")
    feed(runner, "lvs", "lvs_all")
    with pytest.raises(CommandError, match="Volume group full") as exc:
        lvm.create_snapshot(runner, lin, "sanoffload-snap9", 64 * MIB)
    assert "left" not in exc.value.message


@pytest.mark.parametrize(("name", "tags"), [("-rf", ["sanoffload"]), ("a/b", ["sanoffload"]),
                                            ("ok", ["bad tag"]), ("ok", ["-x"])])
def test_create_snapshot_validates_names_and_tags(name: str, tags: list[str]) -> None:
    lin = lvs_of("lvs_all")["lin"]
    runner = FakeRunner()
    with pytest.raises(ValueError, match="invalid"):
        lvm.create_snapshot(runner, lin, name, 64 * MIB, tags)
    assert runner.calls == []


def test_create_snapshot_of_thin_lv_is_a_bug() -> None:
    runner = FakeRunner()
    with pytest.raises(ValueError, match="create_thin_snapshot"):
        lvm.create_snapshot(runner, lvs_of("lvs_all")["thin"], "s", 64 * MIB)
    assert runner.calls == []


def test_create_thin_snapshot_argv_and_active() -> None:
    thin = lvs_of("lvs_all")["thin"]
    runner = feed(FakeRunner(), "lvcreate", "lvcreate_thinsnap")
    feed(runner, "lvs", "lvs_overflow")
    tsnap = lvm.create_thin_snapshot(runner, thin, "sanoffload-tsnap", ["sanoffload"])
    assert runner.argvs()[0] == [
        "lvcreate", "--yes", "--snapshot", "--setactivationskip", "n", "--name",
        "sanoffload-tsnap", "--addtag", "sanoffload", "datavg/thin"]
    assert tsnap.is_active and tsnap.origin == "thin"


def test_create_thin_snapshot_left_inactive_is_an_error() -> None:
    thin = lvs_of("lvs_all")["thin"]
    runner = feed(FakeRunner(), "lvcreate", "lvcreate_thinsnap")
    runner.on("lvs", stdout=edited_lvs("lvs_overflow", "sanoffload-tsnap",
                                       lv_attr="Vwi---tz-k", lv_kernel_major="-1",
                                       lv_kernel_minor="-1"))
    with pytest.raises(CommandError, match="not active"):
        lvm.create_thin_snapshot(runner, thin, "sanoffload-tsnap")


def test_create_thin_snapshot_needs_thin_origin() -> None:
    runner = FakeRunner()
    with pytest.raises(ValueError, match="not a thin LV"):
        lvm.create_thin_snapshot(runner, lvs_of("lvs_all")["lin"], "s")
    assert runner.calls == []


def test_split_raid1_returns_the_tracked_image() -> None:
    r1 = lvs_of("lvs_all")["r1"]
    runner = feed(FakeRunner(), "lvconvert", "lvconvert_split")
    feed(runner, "lvs", "lvs_split")
    image = lvm.split_raid1(runner, r1)
    assert runner.argvs()[0] == ["lvconvert", "--yes", "--splitmirrors", "1", "--trackchanges",
                                 "datavg/r1"]
    assert image.name == "r1_rimage_1" and image.is_tracked_split_image
    assert image.devno == (253, 9)


def test_split_raid1_finds_the_image_without_the_message() -> None:
    r1 = lvs_of("lvs_all")["r1"]
    runner = FakeRunner().on("lvconvert")
    feed(runner, "lvs", "lvs_split")
    assert lvm.split_raid1(runner, r1).name == "r1_rimage_1"


def test_split_raid1_without_a_visible_image_is_an_error() -> None:
    r1 = lvs_of("lvs_all")["r1"]
    runner = feed(FakeRunner(), "lvconvert", "lvconvert_split")
    feed(runner, "lvs", "lvs_merged")
    with pytest.raises(CommandError, match="cannot tell which image"):
        lvm.split_raid1(runner, r1)


def test_split_raid1_refuses_out_of_sync_or_not_raid1() -> None:
    lvs = lvs_of("lvs_all")
    runner = FakeRunner()
    with pytest.raises(RefusedError, match=r"datavg/r1 is not in sync \(42\.0 %"):
        lvm.split_raid1(runner, dataclasses.replace(lvs["r1"], copy_percent=42.0))
    with pytest.raises(RefusedError, match="not raid1"):
        lvm.split_raid1(runner, lvs["m1"])
    assert runner.calls == []


def test_merge_raid1_argv() -> None:
    image = lvs_of("lvs_split")["r1_rimage_1"]
    runner = feed(FakeRunner(), "lvconvert", "lvconvert_merge")
    lvm.merge_raid1(runner, image)
    assert runner.argvs() == [["lvconvert", "--yes", "--merge", "datavg/r1_rimage_1"]]


def test_merge_raid1_refuses_an_image_not_split() -> None:
    runner = FakeRunner()
    with pytest.raises(RefusedError, match="not a raid1 image split"):
        lvm.merge_raid1(runner, lvs_of("lvs_all")["r1_rimage_1"])
    assert runner.calls == []


def test_split_mirror_then_tags() -> None:
    m1 = lvs_of("lvs_all")["m1"]
    runner = feed(FakeRunner(), "lvconvert", "lvconvert_msplit")
    runner.on("lvchange")
    feed(runner, "lvs", "lvs_msplit")
    split = lvm.split_mirror(runner, m1, "sanoffload-msplit")
    assert mutations(runner) == [
        ["lvconvert", "--yes", "--splitmirrors", "1", "--name", "sanoffload-msplit", "datavg/m1"],
        ["lvchange", "--addtag", "sanoffload", "datavg/sanoffload-msplit"]]
    assert split.name == "sanoffload-msplit" and split.size_bytes == m1.size_bytes


def test_split_mirror_refuses_raid1_and_out_of_sync() -> None:
    lvs = lvs_of("lvs_all")
    runner = FakeRunner()
    with pytest.raises(RefusedError, match="not a legacy mirror"):
        lvm.split_mirror(runner, lvs["r1"], "sanoffload-msplit")
    with pytest.raises(RefusedError, match="not in sync"):
        lvm.split_mirror(runner, dataclasses.replace(lvs["m1"], copy_percent=99.5), "x")
    assert runner.calls == []


def test_readd_mirror_removes_the_split_then_converts() -> None:
    m1 = lvs_of("lvs_msplit")["m1"]
    runner = feed(FakeRunner(), "lvremove", "lvremove_snap")
    runner.on("lvconvert")
    lvm.readd_mirror(runner, m1, lvs_of("lvs_msplit")["sanoffload-msplit"])
    assert runner.argvs() == [
        ["lvremove", "--yes", "datavg/sanoffload-msplit"],
        ["lvconvert", "--yes", "--type", "mirror", "-m", "1", "--mirrorlog", "core",
         "--background", "datavg/m1"]]


def test_readd_mirror_when_the_split_is_already_gone() -> None:
    m1 = lvs_of("lvs_msplit")["m1"]
    runner = feed(FakeRunner(), "lvremove", "lvremove_missing")
    runner.on("lvconvert")
    lvm.readd_mirror(runner, m1, "sanoffload-msplit")
    assert runner.argvs()[-1][:3] == ["lvconvert", "--yes", "--type"]


def test_readd_mirror_never_removes_the_mirror_itself() -> None:
    runner = FakeRunner()
    m1 = lvs_of("lvs_msplit")["m1"]
    with pytest.raises(ValueError, match="the mirror itself"):
        lvm.readd_mirror(runner, m1, "m1")
    with pytest.raises(ValueError, match="mirror log"):
        lvm.readd_mirror(runner, m1, "sanoffload-msplit", mirrorlog="--force")
    assert runner.calls == []


def test_remove_lv_removed() -> None:
    runner = feed(FakeRunner(), "lvremove", "lvremove_snap")
    assert lvm.remove_lv(runner, "datavg", "sanoffload-snap1") is True
    assert runner.argvs() == [["lvremove", "--yes", "datavg/sanoffload-snap1"]]
    assert runner.calls[0].env["LVM_SUPPRESS_FD_WARNINGS"] == "1"


def test_remove_lv_already_gone_is_tolerated() -> None:
    runner = feed(FakeRunner(), "lvremove", "lvremove_missing")
    assert lvm.remove_lv(runner, "datavg", "nonexistent") is False


def test_remove_lv_other_exit_5_raises() -> None:
    runner = FakeRunner().on("lvremove", returncode=5,
                             stderr="  Logical volume datavg/lin in use.\n")
    with pytest.raises(CommandError, match="in use") as exc:
        lvm.remove_lv(runner, "datavg", "lin")
    assert exc.value.returncode == 5


def test_remove_lv_other_exit_code_raises() -> None:
    runner = FakeRunner().on("lvremove", returncode=3,
                             stderr='  Failed to find logical volume "datavg/x"\n')
    with pytest.raises(CommandError):
        lvm.remove_lv(runner, "datavg", "x")


def test_add_tag_argv() -> None:
    runner = FakeRunner().on("lvchange")
    lvm.add_tag(runner, "datavg", "sanoffload-msplit", "sanoffload")
    assert runner.argvs() == [["lvchange", "--addtag", "sanoffload",
                               "datavg/sanoffload-msplit"]]
    assert runner.calls[0].env["LVM_SUPPRESS_FD_WARNINGS"] == "1"
