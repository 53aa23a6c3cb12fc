"""A consistency group's staging on this host, as root: real loop devices, real read-only
mounts (ext4 and xfs, the proxy's options), real ``mount --bind`` and remount, real tar.

Only iSCSI is stood in for (this kernel has no LIO): iscsiadm answers from a script and
the "LUNs" are loop devices handed to attach_group by a stand-in waiter. Everything from
the mounts on is the proxy's own code: attach_group, stream's tar argv, the undo, and
``proxy cleanup`` after the attaching process let go without undoing anything.
"""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

from sanoffload.channel.messages import PrepareAnswer
from sanoffload.process import RawResult
from sanoffload.proxy.attach import attach_group
from sanoffload.proxy.cleanup import cleanup
from sanoffload.proxy.journal import ProxyJournal
from sanoffload.proxy.stream import tar_source
from sanoffload.runner import CommandRunner, Runner
from sanoffload.undo import UndoStack
from tests.host.conftest import LoopFs, destroy_loopfs, make_loopfs

pytestmark = pytest.mark.host

SID = "fs1-6a0c0001"
T = f"iqn.2026-11.org.sanoffload:{SID}"
P = "10.77.0.11:3260"


class ScriptedIscsi(CommandRunner):
    """Real commands, but iscsiadm answers as open-iscsi would with nothing logged in yet."""

    def _execute(self, argv: list[str], *, timeout: float, input: bytes | str | None,
                 cwd: str | None, env: dict[str, str],
                 pass_fds: tuple[int, ...] = ()) -> RawResult:
        if argv[0] != "iscsiadm":
            return super()._execute(argv, timeout=timeout, input=input, cwd=cwd, env=env,
                                    pass_fds=pass_fds)
        if argv[1:3] == ["-m", "session"]:
            return RawResult(21, b"", b"iscsiadm: No active sessions.\n")
        if argv[1:3] == ["-m", "discovery"]:
            return RawResult(0, f"{P},1 {T}\n".encode(), b"")
        return RawResult(0, b"", b"")


class LoopWaiter:
    """Hands out the loop devices as the LUNs' disks, in the identifiers' order."""

    def __init__(self, devices: list[str]) -> None:
        self.devices = devices

    def __call__(self, identifiers: list[str], deadline_s: float = 60.0) -> LoopWaiter:
        assert len(identifiers) == len(self.devices)
        return self

    def __enter__(self) -> LoopWaiter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        pass

    def wait(self, rescan: Any = None) -> list[str]:
        return list(self.devices)


@pytest.fixture
def volumes(host_runner: Runner) -> Iterator[tuple[Path, list[LoopFs]]]:
    """Two "duplicates": an ext4 holding db/, an xfs holding etc/app.conf; unmounted."""
    workdir = Path(tempfile.mkdtemp(prefix="sanoffload-group-", dir="/var/tmp"))
    made: list[LoopFs] = []
    try:
        for fstype in ("ext4", "xfs"):
            made.append(make_loopfs(host_runner, fstype, workdir))
        db = made[0].mountpoint / "db"
        (db / "base").mkdir(parents=True)
        (db / "base" / "16384").write_bytes(b"page" * 4096)
        (made[1].mountpoint / "etc").mkdir()
        (made[1].mountpoint / "etc" / "app.conf").write_text("wal_level = replica\n")
        for fs in made:
            host_runner.run(["umount", str(fs.mountpoint)])
        yield workdir, made
    finally:
        for fs in made:
            destroy_loopfs(host_runner, fs)
        subprocess.run(["rm", "-rf", "--one-file-system", str(workdir)], check=False)


def answer(volumes: list[LoopFs]) -> PrepareAnswer:
    members = [
        {"path": "/srv/san/db", "path_in_fs": "db", "fstype": "ext4",
         "object_kind": "directory", "duplicate_kind": "snapshot", "lun": 0,
         "identifier": "naa.6001405a1b2c3d4e5f60718293a4b5c6", "unit_serial": "s0"},
        {"path": "/srv/etc/app.conf", "path_in_fs": "etc/app.conf", "fstype": "xfs",
         "object_kind": "file", "duplicate_kind": "snapshot", "lun": 1,
         "identifier": "naa.6001405ffeeddccbbaa9988776655443", "unit_serial": "s1"}]
    return PrepareAnswer.from_wire({
        "session_id": SID, "target_iqn": T, "portals": [P], "lun": 0,
        "identifier": members[0]["identifier"], "unit_serial": "s0", "chap_user": "px1",
        "chap_secret": "never-shown-1234", "fstype": "ext4", "path_in_fs": "db",
        "object_kind": "directory", "duplicate_kind": "snapshot", "freeze_window_ms": 1.0,
        "frozen_by": "fsfreeze", "lease_expires": 1.0e9, "members": members})


def mounts_under(path: Path) -> list[tuple[str, str]]:
    """(mount point, options) of every mount at or below ``path``, from /proc/self/mounts."""
    out = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if fields[1] == str(path) or fields[1].startswith(f"{path}/"):
            out.append((fields[1], fields[3]))
    return out


def test_two_members_are_staged_read_only_archived_and_unwound(
        volumes: tuple[Path, list[LoopFs]]) -> None:
    workdir, fss = volumes
    runner = ScriptedIscsi(default_timeout=60)
    root = workdir / "mnt"
    journal = ProxyJournal(workdir / "journal", mount_root=str(root))
    session = root / SID
    with UndoStack() as undo:
        att = attach_group(runner, answer(fss), undo,
                           waiter_factory=LoopWaiter([fs.device for fs in fss]),
                           mount_root=str(root), journal=journal)
        staged = mounts_under(session)
        # two duplicates and two binds, every one read-only and nodev,nosuid,noexec
        assert [m for m, _ in staged] == [str(session / "m0"), str(session / "m1"),
                                          str(session / "stage/srv/san/db"),
                                          str(session / "stage/srv/etc/app.conf")]
        for _m, options in staged:
            assert {"ro", "nodev", "nosuid", "noexec"} <= set(options.split(","))
        with pytest.raises(OSError):  # read-only: the staging tree cannot write the duplicate
            (session / "stage/srv/san/db/new").write_text("x")
        # tar with the proxy's argv, from the staging tree: the binds are entered
        src, argv = tar_source(att, answer(fss))
        archive = workdir / "group.tar"
        with open(archive, "wb") as out:
            subprocess.run(argv, stdout=out, check=True)
        names = subprocess.run(["tar", "-tf", str(archive)], capture_output=True, check=True,
                               text=True).stdout.split()
        assert names == ["srv/san/db/", "srv/san/db/base/", "srv/san/db/base/16384",
                         "srv/etc/app.conf"]
        # --verify full's tar --diff against the same tree finds nothing
        subprocess.run(["tar", "--diff", f"--file={archive}", f"--directory={src}",
                        "--numeric-owner"], check=True)
    # the undo: nothing mounted, the tree and the journal record gone
    assert mounts_under(session) == [] and not session.exists()
    assert list(journal.dir.iterdir()) == []
    # the archive restores to srv/san/db/... and srv/etc/app.conf
    restored = workdir / "restore"
    restored.mkdir()
    subprocess.run(["tar", "-xf", str(archive), "-C", str(restored)], check=True)
    assert (restored / "srv/san/db/base/16384").read_bytes() == b"page" * 4096
    assert (restored / "srv/etc/app.conf").read_text() == "wal_level = replica\n"


def test_proxy_cleanup_unmounts_a_crashed_groups_mounts(
        volumes: tuple[Path, list[LoopFs]]) -> None:
    workdir, fss = volumes
    runner = ScriptedIscsi(default_timeout=60)
    root = workdir / "mnt"
    journal = ProxyJournal(workdir / "journal", mount_root=str(root))
    session = root / SID
    undo = UndoStack()
    attach_group(runner, answer(fss), undo, waiter_factory=LoopWaiter([fs.device for fs in fss]),
                 mount_root=str(root), journal=journal)
    assert len(mounts_under(session)) == 4
    # "killed": no undo runs; the journal's lock goes with the process (here: closed)
    record_holder = next(args[0] for label, _fn, args in undo._steps
                         if label.startswith("journal record"))
    record_holder.release()
    try:
        done = cleanup(runner, journal)
        assert [o.action for o in done] == ["removed"]
        assert mounts_under(session) == [] and not session.exists()
        assert list(journal.dir.iterdir()) == []
    finally:
        if mounts_under(session):  # a failed test must not leave mounts behind
            for m, _ in reversed(mounts_under(session)):
                subprocess.run(["umount", m], check=False)
