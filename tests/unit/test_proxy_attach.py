"""sanoffload.proxy.attach: the whole sequence with a FakeRunner and fake udev.

The fake iscsiadm's login makes udev announce the disk (as the kernel would),
the fake mount fills the mount point with the duplicate's tree and the fake
umount empties it again, so the undo steps meet what real ones would.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import pytest

from sanoffload.channel.messages import PrepareAnswer
from sanoffload.errors import (
    AuthError,
    CommandError,
    CommandTimeoutError,
    DeadlineError,
    ProtocolError,
    RefusedError,
    ResourceError,
)
from sanoffload.kinds import ObjectKind
from sanoffload.proxy.attach import Attached, attach, detach
from sanoffload.testing import FakeRunner
from sanoffload.undo import UndoStack
from tests.unit.test_proxy_devices import HEX, FakeUdev, FakeUdevDevice

pytestmark = pytest.mark.unit

SID = "fs1-0a1b2c3d"
T = f"iqn.2026-11.org.sanoffload:{SID}"
P = "10.77.0.11:3260"
SECRET = "Zq8rT2mV5xK1pL9w"
USER = f"sanoffload-{SID}"
NODE = ["iscsiadm", "-m", "node", "-T", T, "-p", P]
SESSION_LINE = f"tcp: [1] {P},1 {T} (non-flash)\n"


def wire_answer(**changes: Any) -> dict[str, Any]:
    """An answer as the agent sends it (PrepareAnswer.to_wire()); a None value drops the key."""
    base: dict[str, Any] = {
        "session_id": SID, "target_iqn": T, "portals": [P], "lun": 0,
        "identifier": f"naa.{HEX}", "unit_serial": "a1b2c3d4-e5f6-0718-293a-4b5c6d7e8f90",
        "chap_user": USER, "chap_secret": SECRET, "fstype": "ext4", "path_in_fs": "srv/data",
        "duplicate_kind": "snapshot", "freeze_window_ms": 12.5, "frozen_by": "fsfreeze",
        "lease_expires": 1.0e9,
    }
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


def answer(**changes: Any) -> PrepareAnswer:
    """The answer as the proxy holds it: read back and checked by from_wire."""
    return PrepareAnswer.from_wire(wire_answer(**changes))


class Lab:
    """The proxy as the unit tests see it: fake iscsiadm/blkid/mount and fake udev."""

    def __init__(self, tmp_path: Path, *, logged_in: bool = False, disk_on_login: bool = True,
                 fstype: str = "ext4") -> None:
        self.udev = FakeUdev()
        self.root = tmp_path / "mnt"
        self.order: list[str] = self.udev.context.log  # "monitor-start" lands here too
        self.runner = FakeRunner()
        r = self.runner
        r.on("iscsiadm", action=self.note)
        if logged_in:
            r.on("iscsiadm", "-m", "session", stdout=SESSION_LINE)
        else:
            r.on("iscsiadm", "-m", "session", returncode=21,
                 stderr="iscsiadm: No active sessions.\n")
        r.on("iscsiadm", "-m", "discovery", stdout=f"{P},1 {T}\n")
        r.on(*NODE, "--login", stdout="Login ... successful.\n",
             action=self._login if disk_on_login else self.note)
        r.on("blkid", stdout=f"{fstype}\n")
        r.on("mount", action=self._mount)
        r.on("umount", action=self._umount)

    def note(self, argv: list[str]) -> None:
        self.order.append(" ".join(argv))

    def _login(self, argv: list[str]) -> None:
        self.note(argv)
        # the kernel adds the LUN's disk; udev announces it a moment later
        self.udev.context.emit(FakeUdevDevice("sdb"), delay=0.3)

    def _mount(self, argv: list[str]) -> None:
        self.order.append("mount")
        mp = Path(argv[-1])
        (mp / "srv" / "data").mkdir(parents=True)
        (mp / "srv" / "data" / "file").write_text("x")

    def _umount(self, argv: list[str]) -> None:
        self.order.append("umount")
        for child in Path(argv[-1]).iterdir():
            shutil.rmtree(child)

    def attach(self, ans: PrepareAnswer | None = None, undo: UndoStack | None = None,
               **kwargs: Any) -> Attached:
        return attach(self.runner, ans or answer(), undo if undo is not None else UndoStack(),
                      waiter_factory=self.udev.factory(), mount_root=str(self.root), **kwargs)

    def iscsi(self) -> list[list[str]]:
        return [a for a in self.runner.argvs() if a[0] == "iscsiadm"]


def upd(name: str, value: str) -> list[str]:
    return [*NODE, "-o", "update", "-n", name, "-v", value]


# --------------------------------------------------------------------------
# the whole sequence
# --------------------------------------------------------------------------

def test_attach_runs_every_step_in_order(tmp_path: Path) -> None:
    lab = Lab(tmp_path)
    undo = UndoStack()
    got = lab.attach(undo=undo)
    mp = str(lab.root / SID)
    assert got == Attached(device="/dev/sdb", mountpoint=mp,
                           object_path=str(lab.root / SID / "srv" / "data"))
    assert lab.runner.argvs() == [
        ["iscsiadm", "-m", "session"],
        ["iscsiadm", "-m", "discovery", "-t", "sendtargets", "-p", P, "-o", "nonpersistent"],
        [*NODE, "-o", "new"],
        upd("node.session.auth.authmethod", "CHAP"),
        upd("node.session.auth.username", USER),
        upd("node.session.auth.password", SECRET),
        upd("node.session.timeo.replacement_timeout", "15"),
        upd("node.startup", "manual"),
        [*NODE, "--login"],
        ["blkid", "-o", "value", "-s", "TYPE", "/dev/sdb"],
        ["mount", "-t", "ext4", "-o", "ro,noload,nodev,nosuid,noexec", "/dev/sdb", mp],
    ]
    # the udev monitor listened before the login
    assert lab.order.index("monitor-start") < lab.order.index(" ".join([*NODE, "--login"]))

    # unwinding (the backup is done) undoes everything, newest first
    lab.runner.calls.clear()
    assert undo.unwind() == []
    assert lab.runner.argvs() == [["umount", mp], [*NODE, "--logout"], [*NODE, "-o", "delete"]]
    assert not (lab.root / SID).exists()


def test_the_secret_never_reaches_a_log_line(tmp_path: Path,
                                             caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="sanoffload")
    lab = Lab(tmp_path)
    with UndoStack() as undo:
        lab.attach(undo=undo)
    assert caplog.text and SECRET not in caplog.text
    assert "node.session.auth.password -v ***" in caplog.text
    assert SECRET not in repr(answer())


def test_failure_while_waiting_logs_out_deletes_the_node_and_never_mounts(
        tmp_path: Path) -> None:
    lab = Lab(tmp_path, disk_on_login=False)
    with pytest.raises(DeadlineError) as excinfo:
        with UndoStack() as undo:
            lab.attach(undo=undo, device_deadline_s=10)
    assert "appeared within 10 s" in str(excinfo.value)
    assert lab.iscsi()[-4:] == [
        [*NODE, "--login"],
        [*NODE, "--rescan"],      # once, at half the deadline
        [*NODE, "--logout"],      # unwinding: the session first,
        [*NODE, "-o", "delete"],  # then its node record
    ]
    assert not lab.runner.called("blkid") and not lab.runner.called("mount")
    assert not lab.root.exists()


def test_undo_for_the_session_is_registered_the_moment_login_succeeds(tmp_path: Path) -> None:
    lab = Lab(tmp_path, disk_on_login=False)
    undo = UndoStack()
    seen: list[list[str]] = []

    class Spy:
        """Stands in for the waiter: looks at the UndoStack when wait() begins."""

        def __init__(self, identifier: str, deadline_s: float = 60) -> None:
            pass

        def __enter__(self) -> Spy:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def wait(self, rescan: Any = None) -> str:
            seen.extend([label.split()[:2] for label, _fn, _args in undo._steps])
            raise DeadlineError("no disk")

    with pytest.raises(DeadlineError):
        attach(lab.runner, answer(), undo, waiter_factory=Spy, mount_root=str(lab.root))
    assert seen == [["iscsi", "node"], ["iscsi", "session"]]


def test_rejected_chap_is_auth_error_and_removes_the_node(tmp_path: Path) -> None:
    lab = Lab(tmp_path)
    lab.runner.on(*NODE, "--login", returncode=24, stderr=(
        "iscsiadm: initiator reported error (24 - iSCSI login failed due to authorization "
        "failure)\niscsiadm: Could not log into all portals\n"))
    with pytest.raises(AuthError) as excinfo:
        with UndoStack() as undo:
            lab.attach(undo=undo)
    assert excinfo.value.exit_code == 10
    assert lab.iscsi()[-2:] == [[*NODE, "--login"], [*NODE, "-o", "delete"]]
    assert not lab.runner.called(*NODE, "--logout")  # no session was made


def test_a_login_killed_by_its_timeout_is_still_logged_out(tmp_path: Path) -> None:
    lab = Lab(tmp_path)
    lab.runner.on(*NODE, "--login", timeout=True)
    with pytest.raises(CommandTimeoutError):
        with UndoStack() as undo:
            lab.attach(undo=undo)
    assert lab.iscsi()[-2:] == [[*NODE, "--logout"], [*NODE, "-o", "delete"]]


def test_login_tolerates_session_exists_from_a_racing_login(tmp_path: Path) -> None:
    lab = Lab(tmp_path)
    lab.runner.on(*NODE, "--login", returncode=15, action=lab._login,
                  stderr="iscsiadm: default: 1 session requested, but 1 already present.\n")
    assert lab.attach().device == "/dev/sdb"


def test_target_not_offered_stops_before_any_record(tmp_path: Path) -> None:
    lab = Lab(tmp_path)
    lab.runner.on("iscsiadm", "-m", "discovery", returncode=21,
                  stderr="iscsiadm: No portals found\n")
    with pytest.raises(CommandError, match="does not offer target"):
        with UndoStack() as undo:
            lab.attach(undo=undo)
    assert [a[:3] for a in lab.iscsi()] == [["iscsiadm", "-m", "session"],
                                            ["iscsiadm", "-m", "discovery"]]


# --------------------------------------------------------------------------
# idempotence
# --------------------------------------------------------------------------

def test_already_logged_in_does_not_log_in_again(tmp_path: Path) -> None:
    lab = Lab(tmp_path, logged_in=True)
    lab.udev.context.add(FakeUdevDevice("sdc"))  # the disk of the earlier login
    undo = UndoStack()
    got = lab.attach(undo=undo)
    assert got.device == "/dev/sdc"
    assert lab.iscsi() == [["iscsiadm", "-m", "session"]]
    # the leftover session belongs to this backup session: undone with the rest
    lab.runner.calls.clear()
    undo.unwind()
    assert lab.runner.argvs() == [["umount", got.mountpoint], [*NODE, "--logout"],
                                  [*NODE, "-o", "delete"]]


def test_same_target_other_portal_is_not_the_session(tmp_path: Path) -> None:
    lab = Lab(tmp_path)
    lab.runner.on("iscsiadm", "-m", "session",
                  stdout=f"tcp: [1] 10.77.0.99:3260,1 {T} (non-flash)\n")
    lab.attach()
    assert lab.runner.called(*NODE, "--login")


def test_a_mount_left_by_an_earlier_attempt_is_reused(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    lab = Lab(tmp_path, logged_in=True)
    lab.udev.context.add(FakeUdevDevice("sdb"))
    mp = lab.root / SID
    (mp / "srv" / "data").mkdir(parents=True)
    monkeypatch.setattr("sanoffload.proxy.attach.os.path.ismount", lambda p: p == str(mp))
    lab.runner.on("findmnt", stdout=json.dumps({"filesystems": [
        {"target": str(mp), "source": "/dev/sdb", "fstype": "ext4",
         "options": "ro,nosuid,nodev,noexec,relatime,norecovery", "maj:min": "8:16"}]}))
    got = lab.attach()
    assert got.mountpoint == str(mp)
    assert not lab.runner.called("mount") and not lab.runner.called("blkid")


def test_something_else_mounted_there_is_refused(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    lab = Lab(tmp_path, logged_in=True)
    lab.udev.context.add(FakeUdevDevice("sdb"))
    mp = lab.root / SID
    mp.mkdir(parents=True)
    monkeypatch.setattr("sanoffload.proxy.attach.os.path.ismount", lambda p: p == str(mp))
    lab.runner.on("findmnt", stdout=json.dumps({"filesystems": [
        {"target": str(mp), "source": "/dev/sdz", "fstype": "ext4",
         "options": "rw,relatime", "maj:min": "8:240"}]}))
    with pytest.raises(ResourceError, match="/dev/sdz"):
        lab.attach()
    assert not lab.runner.called("mount")


# --------------------------------------------------------------------------
# refusals before anything happens
# --------------------------------------------------------------------------

@pytest.mark.parametrize("changes", [
    {"target_iqn": None}, {"target_iqn": "--login"}, {"portals": []}, {"portals": None},
    {"identifier": "naa.123"}, {"chap_secret": ""}, {"session_id": "../x"},
    {"path_in_fs": 7}, {"lun": "x"}, {"object_kind": "socket"},
])
def test_malformed_answer_is_a_protocol_error(tmp_path: Path, changes: dict[str, Any]) -> None:
    # refused where the proxy reads it, so attach never holds one (test_messages.py has more)
    with pytest.raises(ProtocolError):
        answer(**changes)


def test_unsupported_fstype_is_refused_before_login(tmp_path: Path) -> None:
    lab = Lab(tmp_path)
    with pytest.raises(RefusedError, match="btrfs"):
        lab.attach(answer(fstype="btrfs"))
    assert lab.runner.calls == []


def test_single_portal_key_is_accepted(tmp_path: Path) -> None:
    req = answer(portals=None, portal=P, object_kind="directory")
    assert req.portal == P and req.object_kind is ObjectKind.DIRECTORY


def test_fstype_on_disk_differs_from_the_answer(tmp_path: Path) -> None:
    lab = Lab(tmp_path, fstype="xfs")
    with pytest.raises(RefusedError, match="holds xfs"):
        with UndoStack() as undo:
            lab.attach(undo=undo)
    assert not lab.runner.called("mount")
    assert lab.iscsi()[-2:] == [[*NODE, "--logout"], [*NODE, "-o", "delete"]]
    assert not (lab.root / SID).exists()


def test_object_kind_mismatch_unwinds_the_mount(tmp_path: Path) -> None:
    lab = Lab(tmp_path)
    with pytest.raises(RefusedError, match="is not file"):
        with UndoStack() as undo:
            lab.attach(answer(object_kind="file"), undo=undo)
    assert lab.order[-1] == " ".join([*NODE, "-o", "delete"])
    assert "umount" in lab.order
    assert not (lab.root / SID).exists()


# --------------------------------------------------------------------------
# detach after a crash
# --------------------------------------------------------------------------

def test_detach_is_idempotent(tmp_path: Path) -> None:
    runner = (FakeRunner()
              .on("umount", returncode=32, stderr="umount: x: not mounted.\n")
              .on("iscsiadm", returncode=21, stderr="iscsiadm: No records found\n"))
    (tmp_path / SID).mkdir()
    detach(runner, answer(), mount_root=str(tmp_path))
    assert runner.argvs() == [["umount", str(tmp_path / SID)], [*NODE, "--logout"],
                              [*NODE, "-o", "delete"]]
    assert not (tmp_path / SID).exists()
    runner.calls.clear()
    detach(runner, answer(), mount_root=str(tmp_path))
    assert runner.argvs() == [[*NODE, "--logout"], [*NODE, "-o", "delete"]]


# --------------------------------------------------------------------------
# attach_block: an image backup's disk, never mounted
# --------------------------------------------------------------------------

def test_attach_block_logs_in_finds_the_disk_and_never_mounts(tmp_path: Path) -> None:
    from sanoffload.proxy.attach import attach_block
    from sanoffload.proxy.journal import ProxyJournal

    lab = Lab(tmp_path)
    journal = ProxyJournal(tmp_path / "journal", mount_root=str(lab.root))
    undo = UndoStack()
    device = attach_block(lab.runner, answer(), undo, waiter_factory=lab.udev.factory(),
                          mount_root=str(lab.root), journal=journal)
    assert device == "/dev/sdb"
    assert lab.runner.argvs()[-1] == [*NODE, "--login"]
    assert not lab.runner.called("blkid") and not lab.runner.called("mount")
    record = journal.load(SID)
    assert record is not None and record.resources == ["node", "session"]
    assert not lab.root.exists()  # no mount point was made
    # unwinding logs out, deletes the node record, and the journal record goes
    lab.runner.calls.clear()
    assert undo.unwind() == []
    assert lab.runner.argvs() == [[*NODE, "--logout"], [*NODE, "-o", "delete"]]
    assert journal.load(SID) is None


def test_attach_block_of_any_filesystem_type(tmp_path: Path) -> None:
    """An image holds blocks: no filesystem is mounted, so none is refused here."""
    from sanoffload.proxy.attach import attach_block

    lab = Lab(tmp_path)
    with UndoStack() as undo:
        assert attach_block(lab.runner, answer(fstype="btrfs"), undo,
                            waiter_factory=lab.udev.factory(),
                            mount_root=str(lab.root)) == "/dev/sdb"


def test_attach_block_refuses_a_group_before_any_login(tmp_path: Path) -> None:
    from sanoffload.proxy.attach import attach_block
    from tests.unit.test_group_attach import group_answer

    lab = Lab(tmp_path)
    with pytest.raises(RefusedError, match="an image backup reads one volume"):
        with UndoStack() as undo:
            attach_block(lab.runner, group_answer(), undo, waiter_factory=lab.udev.factory(),
                         mount_root=str(lab.root))
    assert lab.runner.argvs() == []
