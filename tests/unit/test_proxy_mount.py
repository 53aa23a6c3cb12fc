"""sanoffload.proxy.mount: read-only options, fstype checks, umount tolerance, object checks.

Mount points live under pytest's tmp_path; mount(8)/umount(8)/blkid are the
FakeRunner's (messages as util-linux 2.38 prints them).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from sanoffload.errors import CommandError, RefusedError, ResourceError, UsageError
from sanoffload.kinds import ObjectKind
from sanoffload.proxy import mount
from sanoffload.testing import FakeRunner

pytestmark = pytest.mark.unit

DEV = "/dev/sdb"


def blkid(runner: FakeRunner, fstype: str | None) -> FakeRunner:
    if fstype is None:
        return runner.on("blkid", returncode=2)  # blkid prints nothing and exits 2
    return runner.on("blkid", stdout=f"{fstype}\n")


# --------------------------------------------------------------------------
# fstype
# --------------------------------------------------------------------------

@pytest.mark.parametrize("fstype", ["btrfs", "vfat", "ext3", "", "ext4,rw"])
def test_other_fstypes_are_refused_before_anything_runs(fstype: str, tmp_path: Path) -> None:
    runner = FakeRunner()
    with pytest.raises(RefusedError):
        mount.mount_readonly(runner, DEV, fstype, str(tmp_path))
    assert runner.calls == []


def test_probe_argv() -> None:
    runner = blkid(FakeRunner(), "xfs")
    assert mount.probe_fstype(runner, DEV) == "xfs"
    assert runner.argvs() == [["blkid", "-o", "value", "-s", "TYPE", DEV]]


def test_probe_nothing_found_is_exit_2_and_empty() -> None:
    assert mount.probe_fstype(blkid(FakeRunner(), None), DEV) == ""


def test_probe_other_failure_raises() -> None:
    runner = FakeRunner().on("blkid", returncode=4, stderr="blkid: bad usage\n")
    with pytest.raises(CommandError):
        mount.probe_fstype(runner, DEV)


def test_probe_refuses_a_non_device_path() -> None:
    with pytest.raises(ValueError):
        mount.probe_fstype(FakeRunner(), "-p")


@pytest.mark.parametrize("found", ["xfs", None])
def test_fstype_mismatch_is_refused_and_nothing_mounted(found: str | None,
                                                        tmp_path: Path) -> None:
    runner = blkid(FakeRunner(), found)
    with pytest.raises(RefusedError) as excinfo:
        mount.mount_readonly(runner, DEV, "ext4", str(tmp_path))
    assert "the agent said ext4" in str(excinfo.value)
    assert not runner.called("mount")


# --------------------------------------------------------------------------
# mount
# --------------------------------------------------------------------------

@pytest.mark.parametrize("fstype,options", [
    ("ext4", "ro,noload,nodev,nosuid,noexec"),
    ("xfs", "ro,norecovery,nouuid,nodev,nosuid,noexec"),
])
def test_mount_exact_options(fstype: str, options: str, tmp_path: Path) -> None:
    runner = blkid(FakeRunner(), fstype).on("mount")
    mount.mount_readonly(runner, DEV, fstype, str(tmp_path))
    assert runner.argvs() == [["blkid", "-o", "value", "-s", "TYPE", DEV],
                              ["mount", "-t", fstype, "-o", options, DEV, str(tmp_path)]]


def test_mount_without_verify_runs_no_blkid(tmp_path: Path) -> None:
    runner = FakeRunner().on("mount")
    mount.mount_readonly(runner, DEV, "xfs", str(tmp_path), verify=False)
    assert [a[0] for a in runner.argvs()] == ["mount"]


def test_mount_failure_raises(tmp_path: Path) -> None:
    runner = blkid(FakeRunner(), "ext4").on(
        "mount", returncode=32,
        stderr=f"mount: {tmp_path}: wrong fs type, bad option, bad superblock on {DEV}.\n")
    with pytest.raises(CommandError):
        mount.mount_readonly(runner, DEV, "ext4", str(tmp_path))


def test_mount_point_must_be_absolute() -> None:
    with pytest.raises(ValueError):
        mount.mount_readonly(FakeRunner(), DEV, "ext4", "rel/mp", verify=False)


# --------------------------------------------------------------------------
# umount
# --------------------------------------------------------------------------

def test_umount_argv(tmp_path: Path) -> None:
    runner = FakeRunner().on("umount")
    assert mount.unmount(runner, str(tmp_path)) is True
    assert runner.argvs() == [["umount", str(tmp_path)]]


def test_umount_not_mounted_is_tolerated(tmp_path: Path) -> None:
    runner = FakeRunner().on("umount", returncode=32, stderr=f"umount: {tmp_path}: not mounted.\n")
    assert mount.unmount(runner, str(tmp_path)) is False


def test_umount_busy_raises(tmp_path: Path) -> None:
    runner = FakeRunner().on("umount", returncode=32,
                             stderr=f"umount: {tmp_path}: target is busy.\n")
    with pytest.raises(CommandError) as excinfo:
        mount.unmount(runner, str(tmp_path))
    assert "target is busy" in str(excinfo.value)


def test_umount_of_a_missing_mount_point_runs_nothing(tmp_path: Path) -> None:
    runner = FakeRunner()
    assert mount.unmount(runner, str(tmp_path / "gone")) is False
    assert runner.calls == []


# --------------------------------------------------------------------------
# the mount point
# --------------------------------------------------------------------------

def test_make_mountpoint_private(tmp_path: Path) -> None:
    root = tmp_path / "run" / "mnt"
    path = mount.make_mountpoint("fs1-0a1b2c3d", str(root))
    assert path == str(root / "fs1-0a1b2c3d")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(root).st_mode) == 0o700


def test_make_mountpoint_reuses_an_empty_leftover(tmp_path: Path) -> None:
    (tmp_path / "s1").mkdir()
    assert mount.make_mountpoint("s1", str(tmp_path)) == str(tmp_path / "s1")


def test_make_mountpoint_refuses_a_non_empty_dir_or_a_file(tmp_path: Path) -> None:
    (tmp_path / "s1").mkdir()
    (tmp_path / "s1" / "x").write_text("x")
    with pytest.raises(ResourceError):
        mount.make_mountpoint("s1", str(tmp_path))
    (tmp_path / "s2").write_text("x")
    with pytest.raises(ResourceError):
        mount.make_mountpoint("s2", str(tmp_path))


@pytest.mark.parametrize("bad", ["..", ".", "a/b", "../x", "", "-x", "x" * 200])
def test_mountpoint_for_refuses_unsafe_session_ids(bad: str) -> None:
    with pytest.raises(ValueError):
        mount.mountpoint_for(bad)


def test_mountpoint_default_root() -> None:
    assert mount.mountpoint_for("fs1-0a1b2c3d") == "/run/sanoffload/mnt/fs1-0a1b2c3d"


def test_remove_mountpoint_is_rmdir_only(tmp_path: Path) -> None:
    mp = tmp_path / "s1"
    mp.mkdir()
    assert mount.remove_mountpoint(str(mp)) is True
    assert mount.remove_mountpoint(str(mp)) is False
    mp.mkdir()
    (mp / "data").write_text("still mounted?")
    with pytest.raises(OSError):
        mount.remove_mountpoint(str(mp))
    assert (mp / "data").exists()


# --------------------------------------------------------------------------
# the backup object inside the mount
# --------------------------------------------------------------------------

@pytest.fixture
def fs(tmp_path: Path) -> Path:
    """A mounted duplicate's tree: srv/data (dir), srv/data/f (file) and some links."""
    root = tmp_path / "mnt"
    (root / "srv" / "data").mkdir(parents=True)
    (root / "srv" / "data" / "f").write_text("payload")
    (root / "srv" / "inside").symlink_to("data")
    (root / "srv" / "abs").symlink_to("/etc")
    (root / "srv" / "up").symlink_to("../../")
    os.mkfifo(root / "srv" / "fifo")
    (tmp_path / "outside").mkdir()
    return root


def test_object_directory_and_file(fs: Path) -> None:
    assert mount.check_object(str(fs), "srv/data", ObjectKind.DIRECTORY) == str(fs / "srv" / "data")
    got = mount.check_object(str(fs), "/srv/data/f", ObjectKind.FILE)
    assert got == str(fs / "srv" / "data" / "f")
    assert mount.check_object(str(fs), "srv/data") == str(fs / "srv" / "data")
    assert mount.check_object(str(fs), ".", ObjectKind.DIRECTORY) == str(fs)


def test_object_kind_must_match(fs: Path) -> None:
    with pytest.raises(RefusedError, match="is not file"):
        mount.check_object(str(fs), "srv/data", ObjectKind.FILE)
    with pytest.raises(RefusedError, match="is not directory"):
        mount.check_object(str(fs), "srv/data/f", ObjectKind.DIRECTORY)


def test_object_missing(fs: Path) -> None:
    with pytest.raises(RefusedError, match="does not exist"):
        mount.check_object(str(fs), "srv/nope")


def test_object_symlink_inside_is_followed(fs: Path) -> None:
    got = mount.check_object(str(fs), "srv/inside", ObjectKind.DIRECTORY)
    assert got == str(fs / "srv" / "data")


@pytest.mark.parametrize("path", ["srv/abs", "srv/up", "srv/up/outside"])
def test_object_symlink_escaping_the_mount_is_refused(fs: Path, path: str) -> None:
    with pytest.raises(RefusedError, match="outside"):
        mount.check_object(str(fs), path)


def test_object_dotdot_is_refused(fs: Path) -> None:
    with pytest.raises(RefusedError, match=r"'\.\.'"):
        mount.check_object(str(fs), "srv/../../outside")


def test_object_special_file_is_refused(fs: Path) -> None:
    with pytest.raises(RefusedError, match="not a directory or a regular file"):
        mount.check_object(str(fs), "srv/fifo")


def test_object_kind_value_checked(fs: Path) -> None:
    # the one parse of sanoffload.kinds: the same error for a bad kind everywhere
    with pytest.raises(UsageError, match="unknown object kind 'dir'"):
        mount.check_object(str(fs), "srv/data", "dir")  # type: ignore[arg-type]
