"""``sanoffload mount`` without root: the target checks, the losetup wrapper (fed with real
losetup output recorded on Debian 12, util-linux 2.38.1), the saved state, the mount table
reader and the CLI's refusals. The real mount is tests/host/test_store_mount.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from sanoffload.errors import CommandError, RefusedError, UsageError
from sanoffload.store import mount as imount, mountcli
from sanoffload.store.imagemap import ChunkMap
from sanoffload.testing import FakeRunner
from sanoffload.tools import losetup

pytestmark = pytest.mark.unit

# recorded: losetup --read-only --find --show /tmp/lt.img; losetup -d (twice); util-linux 2.38.1
ATTACH_OUT = "/dev/loop0\n"
DETACH_GONE_ERR = "losetup: /dev/loop0: detach failed: No such device or address\n"
DETACH_NODEV_ERR = "losetup: /dev/loop999: failed to use device: No such device\n"


def no_commands() -> FakeRunner:
    """A runner with no rules: any command run fails the test."""
    return FakeRunner()


def refused_before_anything(tmp_path: Path, target: Path, match: str) -> None:
    runner = no_commands()
    root = tmp_path / "mounts"
    with pytest.raises(RefusedError, match=match):
        imount.mount_map(runner, str(tmp_path), ChunkMap.zeros(1 << 20), str(target),
                         label="x", root=str(root))
    assert runner.calls == []
    assert not root.exists()


@pytest.mark.hostile("restore", "sanoffload mount onto a directory that is not empty",
                     "RefusedError naming it; no command run, nothing created")
def test_a_non_empty_target_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "t"
    target.mkdir()
    (target / "precious").write_text("keep me")
    refused_before_anything(tmp_path, target, "is not empty")
    assert (target / "precious").read_text() == "keep me"


@pytest.mark.hostile("restore", "sanoffload mount onto a symlink to an empty directory",
                     "RefusedError: give the directory itself; nothing created")
def test_a_symlink_target_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    refused_before_anything(tmp_path, link, "is a symlink")
    assert os.listdir(real) == []


@pytest.mark.hostile("restore", "sanoffload mount onto a missing path or a regular file",
                     "RefusedError; nothing created")
def test_a_missing_or_file_target_is_refused(tmp_path: Path) -> None:
    refused_before_anything(tmp_path, tmp_path / "absent", "does not exist")
    (tmp_path / "file").write_text("")
    refused_before_anything(tmp_path, tmp_path / "file", "not a directory")


def test_an_unsupported_filesystem_type_is_refused_before_anything(tmp_path: Path) -> None:
    target = tmp_path / "t"
    target.mkdir()
    runner = no_commands()
    with pytest.raises(RefusedError, match="not supported"):
        imount.mount_map(runner, str(tmp_path), ChunkMap.zeros(1 << 20), str(target),
                         label="x", fstype="ntfs", root=str(tmp_path / "mounts"))
    assert runner.calls == []


def test_losetup_attach_reads_the_device_it_printed() -> None:
    runner = FakeRunner().on("losetup", stdout=ATTACH_OUT)
    assert losetup.attach_readonly(runner, "/run/x/fuse/image") == "/dev/loop0"
    assert runner.argvs() == [["losetup", "--read-only", "--find", "--show",
                               "/run/x/fuse/image"]]


@pytest.mark.hostile("restore", "losetup --show printing something that is not /dev/loopN",
                     "CommandError; the output is not used as a device")
def test_losetup_attach_refuses_odd_output() -> None:
    runner = FakeRunner().on("losetup", stdout="/dev/sda\n")
    with pytest.raises(CommandError, match="not a loop device"):
        losetup.attach_readonly(runner, "/x/image")


def test_losetup_detach_of_a_detached_device_is_false_other_errors_raise() -> None:
    runner = FakeRunner().on("losetup", returncode=1, stderr=DETACH_GONE_ERR)
    assert losetup.detach(runner, "/dev/loop0") is False
    runner = FakeRunner().on("losetup", returncode=1, stderr=DETACH_NODEV_ERR)
    with pytest.raises(CommandError, match="No such device"):
        losetup.detach(runner, "/dev/loop999")
    assert losetup.detach(FakeRunner().on("losetup"), "/dev/loop3") is True
    with pytest.raises(ValueError):
        losetup.detach(FakeRunner(), "/dev/sda")


def test_backing_file_from_sysfs(tmp_path: Path) -> None:
    d = tmp_path / "loop7" / "loop"
    d.mkdir(parents=True)
    (d / "backing_file").write_bytes(b"/run/sanoffload/mounts/x/fuse/image\n")
    assert losetup.backing_file("/dev/loop7", sys_block=str(tmp_path)) == \
        "/run/sanoffload/mounts/x/fuse/image"
    assert losetup.backing_file("/dev/loop8", sys_block=str(tmp_path)) is None


def test_state_round_trips_and_is_found_by_target(tmp_path: Path) -> None:
    root = tmp_path / "mounts"
    workdir = root / "fs1-srv-20261201T101010Z-0123abcd"
    workdir.mkdir(parents=True)
    state = imount.MountState(target="/mnt/old", backup="fs1/srv/20261201T101010Z",
                              workdir=str(workdir), server_pid=42, server_start=7,
                              loop="/dev/loop3", fstype="ext4", mounted=True)
    state.save()
    assert imount.MountState.load(str(workdir)) == state
    assert imount.find_state("/mnt/old", root=str(root)) == state
    with pytest.raises(RefusedError, match="no image backup"):
        imount.find_state("/mnt/other", root=str(root))


@pytest.mark.hostile("restore", "a mount state file naming another directory or a non-loop "
                                "device, or with extra keys",
                     "ignored: umount finds no mount there and touches nothing")
def test_a_forged_state_is_ignored(tmp_path: Path) -> None:
    root = tmp_path / "mounts"
    workdir = root / "x-0123abcd"
    workdir.mkdir(parents=True)
    forgeries = [
        ('{"version": 1, "target": "/mnt/old", "backup": "b", "workdir": "/etc", '
         '"server_pid": 1, "server_start": 1, "loop": null, "fstype": null, "mounted": true}'),
        ('{"version": 1, "target": "/mnt/old", "backup": "b", "workdir": '
         f'"{workdir}", "server_pid": 1, "server_start": 1, "loop": "/dev/sda", '
         '"fstype": null, "mounted": true}'),
        '{"version": 1, "target": "/mnt/old", "evil": 1}',
    ]
    for forged in forgeries:
        (workdir / imount.STATE_NAME).write_text(forged)
        with pytest.raises(RefusedError, match="no image backup"):
            imount.umount_image("/mnt/old", runner=no_commands(), root=str(root))


def test_mountinfo_reader_unescapes_and_keeps_the_topmost(tmp_path: Path) -> None:
    info = tmp_path / "mountinfo"
    info.write_text(
        "86 27 0:41 / /tmp/a\\040b ro,nosuid - fuse.sanoffload sanoffload ro,user_id=0\n"
        "90 86 7:0 / /mnt/old ro - ext3 /dev/loop1 ro\n"
        "91 86 7:0 / /mnt/old ro,nodev shared:5 - ext4 /dev/loop0 ro,noload\n")
    assert imount.mounts(str(info)) == {"/tmp/a b": ("fuse.sanoffload", "sanoffload"),
                                        "/mnt/old": ("ext4", "/dev/loop0")}


def test_process_start_of_ourselves_and_of_nobody() -> None:
    assert isinstance(imount.process_start(os.getpid()), int)
    assert imount.process_start(2 ** 22 + 12345) is None
    assert imount.stop_process(os.getpid(), None) is False  # not ours to stop: untouched


def test_cli_mount_needs_a_repository(tmp_path: Path) -> None:
    res = CliRunner().invoke(mountcli.mount, ["fs1/s/20261201T101010Z", str(tmp_path)],
                             env={"SANOFFLOAD_REPO": ""})
    assert isinstance(res.exception, UsageError)


def test_cli_umount_of_a_directory_with_nothing_of_ours(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mountcli, "MOUNTS_ROOT", str(tmp_path / "none"))
    res = CliRunner().invoke(mountcli.umount, [str(tmp_path)])
    assert isinstance(res.exception, RefusedError)
