"""sanoffload.tools.findmnt against findmnt output recorded on bookworm."""

from __future__ import annotations

import json

import pytest

from sanoffload.errors import CommandError, RefusedError
from sanoffload.testing import FakeRunner
from sanoffload.tools import findmnt
from sanoffload.tools.findmnt import Mount
from tests.unit.recorded import feed

pytestmark = pytest.mark.unit

COLUMNS = "TARGET,SOURCE,FSTYPE,OPTIONS,MAJ:MIN"


def one_fs(**row: str) -> str:
    return json.dumps({"filesystems": [row]})


def test_linear_lv_mount_and_argv() -> None:
    runner = feed(FakeRunner(), "findmnt", "findmnt_lin")
    mount = findmnt.mount_of(runner, "/srv/lin/dir")
    assert mount == Mount(target="/srv/lin", source="/dev/mapper/datavg-lin", fstype="ext4",
                          options=("rw", "relatime"), major=253, minor=0, fsroot="/")
    assert runner.argvs() == [["findmnt", "--json", "--target", "/srv/lin/dir", "-o", COLUMNS]]
    assert mount.devno == (253, 0) and not mount.is_readonly


def test_thin_lv_xfs_mount() -> None:
    mount = findmnt.mount_of(feed(FakeRunner(), "findmnt", "findmnt_thin"), "/srv/thin/dir")
    assert (mount.target, mount.fstype, mount.devno) == ("/srv/thin", "xfs", (253, 5))
    assert "inode64" in mount.options and "logbsize=32k" in mount.options


def test_root_filesystem() -> None:
    mount = findmnt.mount_of(feed(FakeRunner(), "findmnt", "findmnt_root"), "/etc")
    assert (mount.target, mount.source, mount.devno) == ("/", "/dev/vda", (254, 0))
    assert "errors=remount-ro" in mount.options


def test_missing_path_exit_1_is_refused() -> None:
    runner = feed(FakeRunner(), "findmnt", "findmnt_run")
    with pytest.raises(RefusedError, match="/run/sanoffload: no such file or directory") as exc:
        findmnt.mount_of(runner, "/run/sanoffload")
    assert exc.value.exit_code == 3


def test_other_failure_is_a_command_error() -> None:
    runner = FakeRunner().on("findmnt", returncode=2, stderr="findmnt: bad usage\n")
    with pytest.raises(CommandError, match="bad usage"):
        findmnt.mount_of(runner, "/srv")


def test_empty_filesystem_list_is_a_command_error() -> None:
    runner = FakeRunner().on("findmnt", stdout='{"filesystems": []}')
    with pytest.raises(CommandError, match="no filesystem"):
        findmnt.mount_of(runner, "/srv")


def test_bind_mount_source_keeps_the_subdirectory_apart() -> None:
    runner = FakeRunner().on("findmnt", stdout=one_fs(
        target="/mnt/b", source="/dev/mapper/datavg-lin[/dir]", fstype="ext4",
        options="ro,relatime", **{"maj:min": "253:0"}))
    mount = findmnt.mount_of(runner, "/mnt/b")
    assert (mount.source, mount.fsroot) == ("/dev/mapper/datavg-lin", "/dir")
    assert mount.is_readonly


def test_over_mount_takes_the_last_listed() -> None:
    rows = {"filesystems": [
        {"target": "/srv", "source": "/dev/a", "fstype": "ext4", "options": "rw",
         "maj:min": "253:1"},
        {"target": "/srv", "source": "/dev/b", "fstype": "xfs", "options": "rw",
         "maj:min": "253:2"}]}
    mount = findmnt.mount_of(FakeRunner().on("findmnt", stdout=json.dumps(rows)), "/srv")
    assert (mount.source, mount.fstype) == ("/dev/b", "xfs")


def test_relative_path_is_a_bug() -> None:
    runner = FakeRunner()
    with pytest.raises(ValueError, match="absolute"):
        findmnt.mount_of(runner, "srv/lin")
    assert runner.calls == []
