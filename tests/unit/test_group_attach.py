"""A consistency group on the proxy: one login, every member's disk, its mounts and binds,
their undo, their journal and their cleanup after a crash.

The fakes are test_proxy_attach's and test_proxy_devices': a FakeRunner for iscsiadm,
blkid and mount (the login makes udev announce every LUN, mount fills the member's mount
point with its tree, umount empties it), fake pyudev for the disks. The journal is real
files; the "killed" proxy of the cleanup test is a real child process SIGKILLed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from sanoffload.channel.messages import PrepareAnswer
from sanoffload.errors import CleanupError, CommandError, DeadlineError, RefusedError
from sanoffload.proxy.attach import Attached, attach
from sanoffload.proxy.cleanup import cleanup
from sanoffload.proxy.devices import DisksWaiter
from sanoffload.proxy.journal import BrokenRecord, ProxyJournal
from sanoffload.proxy.stream import group_create_argv, tar_source
from sanoffload.testing import FakeRunner
from sanoffload.tools import tar
from sanoffload.undo import UndoStack
from tests.unit.test_proxy_attach import NODE, SECRET, SESSION_LINE, SID, USER, P, T, upd
from tests.unit.test_proxy_devices import HEX, OTHER_HEX, FakeUdev, FakeUdevDevice, FakeUdevMonitor

pytestmark = pytest.mark.unit

THIRD_HEX = "6001405c0ffee0000000000000000003"
REPO_ROOT = Path(__file__).resolve().parents[2]
BIND_RO = "remount,bind,ro,nodev,nosuid,noexec"

#: (path, path_in_fs, object_kind, hex, disk)
MEMBERS = [("/srv/san/db", "db", "directory", HEX, "sdb"),
           ("/srv/san/log", "log", "directory", OTHER_HEX, "sdc"),
           ("/srv/etc/app.conf", "app.conf", "file", THIRD_HEX, "sdd")]


def group_wire(members: list[tuple[str, str, str, str, str]] = MEMBERS,
               **changes: Any) -> dict[str, Any]:
    """A group's answer as the agent sends it: member 0 is the top level's."""
    wire: dict[str, Any] = {
        "session_id": SID, "target_iqn": T, "portals": [P], "lun": 0,
        "identifier": f"naa.{members[0][3]}", "unit_serial": "serial0", "chap_user": USER,
        "chap_secret": SECRET, "fstype": "ext4", "path_in_fs": members[0][1],
        "object_kind": members[0][2], "duplicate_kind": "snapshot", "freeze_window_ms": 12.5,
        "frozen_by": "fsfreeze", "lease_expires": 1.0e9,
        "members": [{"path": path, "path_in_fs": pif, "fstype": "ext4", "object_kind": kind,
                     "duplicate_kind": "snapshot", "lun": i, "identifier": f"naa.{hx}",
                     "unit_serial": f"serial{i}"}
                    for i, (path, pif, kind, hx, _disk) in enumerate(members)]}
    wire.update(changes)
    return wire


def group_answer(members: list[tuple[str, str, str, str, str]] = MEMBERS) -> PrepareAnswer:
    return PrepareAnswer.from_wire(group_wire(members))


class GroupLab:
    """The proxy with fake iscsiadm/blkid/mount and fake udev, for a group's LUNs."""

    def __init__(self, tmp_path: Path, members: list[tuple[str, str, str, str, str]] = MEMBERS,
                 *, journal: bool = True) -> None:
        self.members = members
        self.answer = group_answer(members)
        self.udev = FakeUdev()
        self.root = tmp_path / "mnt"
        self.session_dir = self.root / SID
        self.journal = (ProxyJournal(tmp_path / "journal", mount_root=str(self.root))
                        if journal else None)
        self.order: list[str] = self.udev.context.log
        self.records: list[dict[str, Any]] = []
        r = self.runner = FakeRunner()
        r.on("iscsiadm", action=self.note)
        r.on("iscsiadm", "-m", "session", returncode=21, stderr="iscsiadm: No active sessions.\n")
        r.on("iscsiadm", "-m", "discovery", stdout=f"{P},1 {T}\n")
        r.on(*NODE, "--login", stdout="Login ... successful.\n", action=self._login)
        r.on("blkid", stdout="ext4\n")
        r.on("mount", action=self._mount)
        r.on("umount", action=self._umount)

    def note(self, argv: list[str]) -> None:
        self.order.append(" ".join(argv))

    def _login(self, argv: list[str]) -> None:
        self.note(argv)
        # one login brings every LUN of the target; udev announces them one after the other
        for i, (*_x, hx, disk) in enumerate(self.members):
            self.udev.context.emit(FakeUdevDevice(disk, wwn_hex=hx), delay=0.1 * (i + 1))

    def _mount(self, argv: list[str]) -> None:
        self.note(argv)
        if self.journal is not None:  # what a crash at this moment would leave recorded
            self.records.append(json.loads((self.journal.dir / f"{SID}.json").read_text()))
        if argv[1] != "-t":
            return  # a bind or its remount: nothing to fill
        mp = Path(argv[-1])
        disk = argv[-2].removeprefix("/dev/")
        _path, pif, kind, _hx, _disk = next(m for m in self.members if m[4] == disk)
        if kind == "file":
            (mp / pif).write_text("setting = 1\n")
        else:
            (mp / pif).mkdir()
            (mp / pif / "data").write_text(disk)

    def _umount(self, argv: list[str]) -> None:
        self.note(argv)
        target = Path(argv[-1])
        if target.parent == self.session_dir:  # a member's mount point: its tree goes
            for child in target.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()

    def attach(self, undo: UndoStack, **kwargs: Any) -> Attached:
        return attach(self.runner, self.answer, undo,
                      waiter_factory=self.udev.factory(), group_waiter_factory=self.waiter,
                      mount_root=str(self.root), journal=self.journal, **kwargs)

    def waiter(self, identifiers: list[str], deadline_s: float = 60.0) -> DisksWaiter:
        return DisksWaiter(identifiers, deadline_s, context=self.udev.context,
                           monitor_factory=FakeUdevMonitor.from_netlink, clock=self.udev.clock)


def mp(lab: GroupLab, rel: str) -> str:
    return str(lab.session_dir / rel)


STAGED = ["stage/srv/san/db", "stage/srv/san/log", "stage/srv/etc/app.conf"]


# --------------------------------------------------------------------------
# the whole sequence
# --------------------------------------------------------------------------

def test_a_group_is_one_login_its_disks_mounts_and_binds(tmp_path: Path) -> None:
    lab = GroupLab(tmp_path)
    undo = UndoStack()
    got = lab.attach(undo)
    staging = mp(lab, "stage")
    assert got == Attached(device="/dev/sdb", mountpoint=str(lab.session_dir),
                           object_path=staging, staging=staging,
                           names=("srv/san/db", "srv/san/log", "srv/etc/app.conf"),
                           mountpoints=(mp(lab, "m0"), mp(lab, "m1"), mp(lab, "m2")))
    opts = "ro,noload,nodev,nosuid,noexec"
    assert lab.runner.argvs() == [
        ["iscsiadm", "-m", "session"],
        ["iscsiadm", "-m", "discovery", "-t", "sendtargets", "-p", P, "-o", "nonpersistent"],
        [*NODE, "-o", "new"],
        upd("node.session.auth.authmethod", "CHAP"),
        upd("node.session.auth.username", USER),
        upd("node.session.auth.password", SECRET),
        upd("node.session.timeo.replacement_timeout", "15"),
        upd("node.startup", "manual"),
        [*NODE, "--login"],  # one login for the whole group
        ["blkid", "-o", "value", "-s", "TYPE", "/dev/sdb"],
        ["mount", "-t", "ext4", "-o", opts, "/dev/sdb", mp(lab, "m0")],
        ["blkid", "-o", "value", "-s", "TYPE", "/dev/sdc"],
        ["mount", "-t", "ext4", "-o", opts, "/dev/sdc", mp(lab, "m1")],
        ["blkid", "-o", "value", "-s", "TYPE", "/dev/sdd"],
        ["mount", "-t", "ext4", "-o", opts, "/dev/sdd", mp(lab, "m2")],
        ["mount", "--bind", mp(lab, "m0/db"), mp(lab, STAGED[0])],
        ["mount", "-o", BIND_RO, mp(lab, STAGED[0])],
        ["mount", "--bind", mp(lab, "m1/log"), mp(lab, STAGED[1])],
        ["mount", "-o", BIND_RO, mp(lab, STAGED[1])],
        ["mount", "--bind", mp(lab, "m2/app.conf"), mp(lab, STAGED[2])],
        ["mount", "-o", BIND_RO, mp(lab, STAGED[2])],
    ]
    # one udev monitor, listening before the login
    assert lab.order.count("monitor-start") == 1
    assert lab.order.index("monitor-start") < lab.order.index(" ".join([*NODE, "--login"]))
    # a file member is bound onto an empty file, a directory onto an empty directory
    assert (lab.session_dir / STAGED[2]).is_file() and (lab.session_dir / STAGED[0]).is_dir()
    # every mount was journaled before it was made
    assert lab.journal is not None
    record = json.loads((lab.journal.dir / f"{SID}.json").read_text())
    assert record["resources"] == ["node", "session", "mount"]
    assert record["mounts"] == ["m0", "m1", "m2", *STAGED]
    assert [r["mounts"][-1] for r in lab.records] == [
        "m0", "m1", "m2", STAGED[0], STAGED[0], STAGED[1], STAGED[1], STAGED[2], STAGED[2]]

    # unwinding undoes everything, newest first, and the record goes
    lab.runner.calls.clear()
    assert undo.unwind() == []
    assert lab.runner.argvs() == [
        ["umount", mp(lab, STAGED[2])], ["umount", mp(lab, STAGED[1])],
        ["umount", mp(lab, STAGED[0])],
        ["umount", mp(lab, "m2")], ["umount", mp(lab, "m1")], ["umount", mp(lab, "m0")],
        [*NODE, "--logout"], [*NODE, "-o", "delete"]]
    assert not lab.session_dir.exists()
    assert list(lab.journal.dir.iterdir()) == []


def test_tar_reads_the_staging_tree_by_archive_names_in_order(tmp_path: Path) -> None:
    lab = GroupLab(tmp_path, journal=False)
    with UndoStack() as undo:
        att = lab.attach(undo)
        src, argv = tar_source(att, group_answer())
    assert src == mp(lab, "stage")
    assert argv == ["tar", "--create", "--file=-", f"--directory={src}", *tar.CREATE_OPTIONS,
                    "--", "srv/san/db", "srv/san/log", "srv/etc/app.conf"]
    # no --one-file-system: every name is a bind mount that tar must enter
    assert not any("one-file-system" in a for a in argv)


def test_a_single_path_keeps_its_tar_argv(tmp_path: Path) -> None:
    from tests.unit.test_proxy_attach import answer

    att = Attached("/dev/sdb", "/run/sanoffload/mnt/x", "/run/sanoffload/mnt/x/srv/data")
    assert tar_source(att, answer(object_kind="directory")) == (
        att.object_path, tar.create_argv(att.object_path, "."))


@pytest.mark.parametrize("names", [[], ["/etc"], ["a/../../etc"], [""]])
def test_group_argv_refuses_names_that_are_not_relative(names: list[str]) -> None:
    with pytest.raises(ValueError):
        group_create_argv("/run/x/stage", names)


# --------------------------------------------------------------------------
# failures unwind what was made
# --------------------------------------------------------------------------

@pytest.mark.hostile("proxy", "a group whose third member's disk will not mount",
                     "members 1 and 0 unmounted, logged out, node deleted, nothing left")
def test_a_failure_mounting_member_2_unwinds_members_1_and_0(tmp_path: Path) -> None:
    lab = GroupLab(tmp_path)
    lab.runner.on("mount", "-t", "ext4", "-o", "ro,noload,nodev,nosuid,noexec", "/dev/sdd",
                  returncode=32, stderr="mount: /x: wrong fs type, bad option, bad superblock "
                                        "on /dev/sdd.\n", action=lab.note)
    with pytest.raises(CommandError, match="wrong fs type"):
        with UndoStack() as undo:
            lab.attach(undo)
    after = lab.order[lab.order.index(" ".join(["mount", "-t", "ext4", "-o",
                                                "ro,noload,nodev,nosuid,noexec", "/dev/sdd",
                                                mp(lab, "m2")])) + 1:]
    assert after == [f"umount {mp(lab, 'm1')}", f"umount {mp(lab, 'm0')}",
                     " ".join([*NODE, "--logout"]), " ".join([*NODE, "-o", "delete"])]
    assert not any(a[:2] == ["mount", "--bind"] for a in lab.runner.argvs())
    assert not lab.session_dir.exists()
    assert lab.journal is not None and list(lab.journal.dir.iterdir()) == []


def test_a_bind_that_cannot_be_made_read_only_is_unmounted(tmp_path: Path) -> None:
    lab = GroupLab(tmp_path)
    lab.runner.on("mount", "-o", BIND_RO, mp(lab, STAGED[1]), returncode=32,
                  stderr="mount: cannot remount read-only\n")
    with pytest.raises(CommandError):
        with UndoStack() as undo:
            lab.attach(undo)
    umounts = [a[1] for a in lab.runner.argvs() if a[0] == "umount"]
    # the bind of member 1 exists the moment mount --bind succeeds: it is undone too
    assert umounts == [mp(lab, STAGED[1]), mp(lab, STAGED[0]), mp(lab, "m2"), mp(lab, "m1"),
                       mp(lab, "m0")]
    assert not lab.session_dir.exists()


def test_a_missing_disk_names_it_and_mounts_nothing(tmp_path: Path) -> None:
    lab = GroupLab(tmp_path)
    lab.members = MEMBERS[:2]  # the login brings two LUNs of three
    with pytest.raises(DeadlineError, match=f"naa.{THIRD_HEX}") as info:
        with UndoStack() as undo:
            lab.attach(undo, device_deadline_s=10)
    assert "2 of 3 found" in str(info.value)
    assert not lab.runner.called("mount") and not lab.runner.called("blkid")
    assert lab.runner.argvs()[-3:] == [[*NODE, "--rescan"], [*NODE, "--logout"],
                                       [*NODE, "-o", "delete"]]


def test_an_unsupported_fstype_of_any_member_is_refused_before_login(tmp_path: Path) -> None:
    lab = GroupLab(tmp_path)
    wire = group_wire()
    wire["members"][2]["fstype"] = "btrfs"
    with pytest.raises(RefusedError, match="btrfs"):
        attach(lab.runner, PrepareAnswer.from_wire(wire), UndoStack(),
               group_waiter_factory=lab.waiter, mount_root=str(lab.root))
    assert lab.runner.calls == []


@pytest.mark.hostile("proxy", "a group member whose path in its filesystem is a symlink out",
                     "refused; every mount unwound before anything is bound")
def test_a_member_object_leading_out_of_its_mount_is_refused(tmp_path: Path) -> None:
    lab = GroupLab(tmp_path)
    real_mount = lab._mount

    def mount(argv: list[str]) -> None:
        if argv[-2:] == ["/dev/sdc", mp(lab, "m1")]:
            os.symlink("/etc", mp(lab, "m1/log"))
            lab.note(argv)
            return
        real_mount(argv)

    lab.runner.on("mount", action=mount)
    with pytest.raises(RefusedError, match="outside"):
        with UndoStack() as undo:
            lab.attach(undo)
    assert not any(a[:2] == ["mount", "--bind"] for a in lab.runner.argvs())
    assert not lab.session_dir.exists()


# --------------------------------------------------------------------------
# the disks waiter
# --------------------------------------------------------------------------

def test_disks_waiter_takes_disks_that_already_exist_and_waits_for_the_rest() -> None:
    udev = FakeUdev()
    udev.context.add(FakeUdevDevice("sdc", wwn_hex=OTHER_HEX))
    ids = [f"naa.{HEX}", f"naa.{OTHER_HEX}"]
    with DisksWaiter(ids, 30, context=udev.context,
                     monitor_factory=FakeUdevMonitor.from_netlink, clock=udev.clock) as w:
        udev.context.emit(FakeUdevDevice("sdb"), delay=2)
        assert w.wait() == ["/dev/sdb", "/dev/sdc"]  # in the identifiers' order


def test_disks_waiter_refuses_the_same_identifier_twice() -> None:
    with pytest.raises(ValueError):
        DisksWaiter([f"naa.{HEX}", f"0x{HEX}"])


# --------------------------------------------------------------------------
# cleanup after a crash
# --------------------------------------------------------------------------

def killed_group_proxy(journal: ProxyJournal, mounts: list[str]) -> None:
    """A real process records a group's attachment and its mounts, makes their directories
    (as attach does, before each mount), then is SIGKILLed."""
    code = textwrap.dedent(f"""
        import os, signal
        from sanoffload.proxy.journal import ProxyJournal
        j = ProxyJournal({str(journal.dir)!r}, mount_root={journal.mount_root!r})
        d = os.path.join(j.mount_root, {SID!r})
        held = j.begin({SID!r}, {T!r}, {P!r}, d)
        for kind in ("node", "session", "mount"):
            held.intend(kind)
        os.mkdir(d, 0o700)
        for rel in {mounts!r}:
            held.intend_mount(rel)
            os.makedirs(os.path.join(d, rel), exist_ok=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                         check=False)
    assert res.returncode == -signal.SIGKILL, res.stderr.decode()


def cleanup_runner() -> FakeRunner:
    return (FakeRunner().on("umount")
            .on("iscsiadm", "-m", "session", stdout=SESSION_LINE)
            .on(*NODE, "--logout").on(*NODE, "-o", "delete"))


def test_cleanup_after_a_crash_unmounts_every_member_and_bind(tmp_path: Path) -> None:
    (tmp_path / "mnt").mkdir()
    journal = ProxyJournal(tmp_path / "journal", mount_root=str(tmp_path / "mnt"))
    killed_group_proxy(journal, ["m0", "m1", STAGED[0], STAGED[1]])
    d = tmp_path / "mnt" / SID
    runner = cleanup_runner()
    done = cleanup(runner, journal)
    # newest first: the binds, the members' duplicates, then the session, the node
    assert runner.argvs() == [
        ["umount", str(d / STAGED[1])], ["umount", str(d / STAGED[0])],
        ["umount", str(d / "m1")], ["umount", str(d / "m0")],
        ["iscsiadm", "-m", "session"], [*NODE, "--logout"], [*NODE, "-o", "delete"]]
    assert [(o.session_id, o.action) for o in done] == [(SID, "removed")]
    assert f"mount {d / STAGED[1]}" in done[0].detail
    assert not d.exists()
    assert list(journal.dir.iterdir()) == []


def test_a_group_mount_that_will_not_go_stays_recorded(tmp_path: Path) -> None:
    (tmp_path / "mnt").mkdir()
    journal = ProxyJournal(tmp_path / "journal", mount_root=str(tmp_path / "mnt"))
    killed_group_proxy(journal, ["m0", "m1", STAGED[0]])
    d = tmp_path / "mnt" / SID
    runner = cleanup_runner().on("umount", str(d / "m1"), returncode=32,
                                 stderr=f"umount: {d / 'm1'}: target is busy.\n")
    with pytest.raises(CleanupError):
        cleanup(runner, journal)
    # the others were still tried; the busy one and what depends on it stay for the next run
    assert ["umount", str(d / "m0")] in runner.argvs()
    record = journal.load(SID)
    assert record is not None and record.mounts == ["m1"] and "mount" in record.resources


@pytest.mark.hostile("proxy", "proxy journal record whose group mounts lead out of the session "
                     "directory ('..', absolute, odd names)",
                     "refused as broken; cleanup changes nothing")
@pytest.mark.parametrize("mounts", [["../../etc"], ["/etc"], ["stage/../../x"], ["stage"],
                                    ["m0", "m0"], ["tmp"], "m0", [7], ["m0\n"],
                                    [f"m{i}" for i in range(17)]])
def test_a_record_with_mounts_outside_the_session_is_broken(tmp_path: Path,
                                                            mounts: Any) -> None:
    (tmp_path / "mnt").mkdir()
    journal = ProxyJournal(tmp_path / "journal", mount_root=str(tmp_path / "mnt"))
    held = journal.begin(SID, T, P, str(tmp_path / "mnt" / SID))
    held.intend("mount")
    data = held.record.to_dict()
    data["mounts"] = mounts
    (journal.dir / f"{SID}.json").write_text(json.dumps(data))
    held.release()
    with pytest.raises(BrokenRecord):
        journal.load(SID)
    runner = FakeRunner()
    with pytest.raises(CleanupError, match="nothing was changed"):
        cleanup(runner, journal)
    assert runner.calls == []


def test_a_single_paths_record_has_no_mounts_key(tmp_path: Path) -> None:
    journal = ProxyJournal(tmp_path / "journal", mount_root=str(tmp_path / "mnt"))
    held = journal.begin(SID, T, P, str(tmp_path / "mnt" / SID))
    held.intend("node")
    assert set(json.loads((journal.dir / f"{SID}.json").read_text())) == {
        "session_id", "target", "portal", "mountpoint", "pid", "created", "resources"}
    held.gone("node")
    assert held.finish()
