"""The proxy's journal and ``sanoffload proxy cleanup``: what a killed backup left is undone.

iscsiadm is a FakeRunner fed open-iscsi's real answers recorded on the lab's px1
(tests/fixtures/recorded/*/proxy); the journal is real files in tmp_path, and a
"killed" proxy is a real child process that takes its locks, writes its record
and SIGKILLs itself, so the lock that tells live from dead is the kernel's.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from sanoffload import cli
from sanoffload.errors import AuthError, CleanupError, CommandError, ResourceError
from sanoffload.proxy import journal as journal_mod, mount as mount_mod
from sanoffload.proxy.cleanup import cleanup
from sanoffload.proxy.journal import Attachment, BrokenRecord, ProxyJournal
from sanoffload.testing import FakeRunner
from sanoffload.undo import UndoStack
from tests.unit import test_proxy_attach as ta
from tests.unit.recorded import feed

pytestmark = pytest.mark.unit

# the session the recordings were made with
SID = "fs1-e9d3706d"
T = f"iqn.2026-11.org.sanoffload:{SID}"
P = "10.77.0.11:3260"
NODE = ["iscsiadm", "-m", "node", "-T", T, "-p", P]
REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def journal(tmp_path: Path) -> ProxyJournal:
    (tmp_path / "mnt").mkdir()
    return ProxyJournal(tmp_path / "journal", mount_root=str(tmp_path / "mnt"))


def killed_proxy(journal: ProxyJournal, resources: list[str], *, sid: str = SID,
                 target: str = T, make_dir: bool = True) -> int:
    """A real process records an attachment holding ``resources``, then is SIGKILLed."""
    code = textwrap.dedent(f"""
        import os, signal
        from sanoffload.proxy.journal import ProxyJournal
        j = ProxyJournal({str(journal.dir)!r}, mount_root={journal.mount_root!r})
        mp = os.path.join(j.mount_root, {sid!r})
        held = j.begin({sid!r}, {target!r}, {P!r}, mp)
        for kind in {resources!r}:
            held.intend(kind)
        if {make_dir!r}:
            os.mkdir(mp, 0o700)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                         check=False)
    assert res.returncode == -signal.SIGKILL, res.stderr.decode()
    return os.getpid()


def iscsi_runner(*, logged_in: bool = True) -> FakeRunner:
    """iscsiadm as it answered on px1: a session to the target (or none), logout, delete."""
    r = FakeRunner()
    feed(r, ["iscsiadm", "-m", "session"], "proxy/session" if logged_in else "proxy/session_none")
    feed(r, [*NODE, "--logout"], "proxy/logout")
    feed(r, [*NODE, "-o", "delete"], "proxy/node_delete")
    return r


# --------------------------------------------------------------------------
# cleanup after a SIGKILL
# --------------------------------------------------------------------------

def test_cleanup_undoes_what_a_killed_proxy_recorded(journal: ProxyJournal) -> None:
    killed_proxy(journal, ["node", "session", "mount"])
    mp = Path(journal.mount_root) / SID
    assert mp.is_dir() and (journal.dir / f"{SID}.json").exists()
    runner = iscsi_runner()
    done = cleanup(runner, journal)
    # newest first: the mount point (not a mount here: rmdir only), the session, the record
    assert runner.argvs() == [["iscsiadm", "-m", "session"], [*NODE, "--logout"],
                              [*NODE, "-o", "delete"]]
    assert not mp.exists()
    assert [(o.session_id, o.action) for o in done] == [(SID, "removed")]
    assert f"node record {T} at {P}" in done[0].detail
    assert list(journal.dir.iterdir()) == []  # record and lock both gone
    # a second run finds nothing and runs nothing
    runner.calls.clear()
    assert cleanup(runner, journal) == [] and runner.calls == []


def test_after_a_reboot_only_the_node_record_is_left_to_delete(journal: ProxyJournal) -> None:
    """No session (the reboot dropped it, iscsid may not even run): no logout is tried."""
    killed_proxy(journal, ["node", "session", "mount"], make_dir=False)
    runner = iscsi_runner(logged_in=False)
    cleanup(runner, journal)
    assert runner.argvs() == [["iscsiadm", "-m", "session"], [*NODE, "-o", "delete"]]
    assert list(journal.dir.iterdir()) == []


def test_a_record_made_before_its_node_deletes_nothing_that_is_not_there(
        journal: ProxyJournal) -> None:
    """Killed right after writing its intent: iscsiadm says "No records found" (exit 21)."""
    killed_proxy(journal, ["node"], make_dir=False)
    runner = FakeRunner()
    feed(runner, [*NODE, "-o", "delete"], "proxy/node_delete_again")
    assert [o.action for o in cleanup(runner, journal)] == ["removed"]
    assert list(journal.dir.iterdir()) == []


@pytest.mark.hostile("proxy", "proxy cleanup while another backup is attached",
                     "its attachment is skipped, nothing run")
def test_an_attachment_whose_proxy_is_alive_is_skipped(journal: ProxyJournal) -> None:
    held = journal.begin(SID, T, P, os.path.join(journal.mount_root, SID))
    held.intend("node")
    held.intend("session")
    runner = FakeRunner()
    done = cleanup(runner, journal)
    assert [(o.session_id, o.action) for o in done] == [(SID, "skipped")]
    assert f"pid {os.getpid()}" in done[0].detail
    assert runner.calls == []
    assert journal.load(SID) is not None
    # a second attach of the same session is refused too
    with pytest.raises(ResourceError, match="another sanoffload process"):
        journal.begin(SID, T, P, os.path.join(journal.mount_root, SID))
    held.gone("session")
    held.gone("node")
    assert held.finish()
    assert list(journal.dir.iterdir()) == []


def test_a_failed_step_keeps_the_record_for_the_next_run(journal: ProxyJournal) -> None:
    killed_proxy(journal, ["node", "session"], make_dir=False)
    runner = iscsi_runner()
    runner.on(*NODE, "--logout", returncode=8,
              stderr="iscsiadm: Could not logout of [sid: 3, target: x]\n")
    runner.on(*NODE, "-o", "delete", returncode=6,
              stderr="iscsiadm: This command will remove the record [iface: default, "
                     "target: x], but a session is using it. Logout session then rerun.\n")
    seen: list[str] = []
    with pytest.raises(CleanupError) as info:
        cleanup(runner, journal, on_outcome=lambda o: seen.append(str(o)))
    assert info.value.exit_code == 13
    assert seen and seen[0].startswith("failed") and "left: node, session" in seen[0]
    rec = journal.load(SID)
    assert rec is not None and rec.resources == ["node", "session"]
    # the next run (iscsid back) finishes the job
    assert [o.action for o in cleanup(iscsi_runner(), journal)] == ["removed"]
    assert list(journal.dir.iterdir()) == []


# --------------------------------------------------------------------------
# records that cannot be trusted
# --------------------------------------------------------------------------

def write_record(journal: ProxyJournal, name: str, data: Any, mode: int = 0o600) -> Path:
    journal.dir.mkdir(parents=True, exist_ok=True)
    path = journal.dir / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    path.chmod(mode)
    return path


def good(**changes: Any) -> dict[str, Any]:
    return {"session_id": SID, "target": T, "portal": P,
            "mountpoint": f"/run/sanoffload/mnt/{SID}", "pid": 1, "created": 1.0,
            "resources": ["node"], **changes}


@pytest.mark.hostile("proxy", "proxy journal record pointing at /etc as its mount point",
                     "refused as broken; cleanup changes nothing")
@pytest.mark.parametrize("record,why", [
    ("{not json", "not valid JSON"),
    (good(mountpoint="/etc"), "mount point"),
    (good(mountpoint="/run/sanoffload/mnt/other"), "mount point"),
    (good(target="-o delete"), "invalid iSCSI target"),
    (good(portal="10.0.0.1:3260 --logoutall=all"), "invalid iSCSI portal"),
    (good(resources=["node", "lvm"]), "invalid resources"),
    (good(session_id="../x"), "invalid session id"),
    (good(extra=1), "unknown field"),
    (good(pid=True), "'pid'"),
    ("[" * 30000 + "]" * 30000, "JSON"),
])
def test_a_broken_record_stops_cleanup_before_anything_changes(
        tmp_path: Path, record: Any, why: str) -> None:
    journal = ProxyJournal(tmp_path / "journal", mount_root="/run/sanoffload/mnt")
    # a good record of a dead proxy (no lock held) beside the broken one
    write_record(journal, "fs1-11111111.json",
                 good(session_id="fs1-11111111", mountpoint="/run/sanoffload/mnt/fs1-11111111"))
    write_record(journal, f"{SID}.json", record)
    runner = FakeRunner()
    with pytest.raises(CleanupError, match="nothing was changed") as info:
        cleanup(runner, journal)
    assert why in str(info.value) and f"{SID}.json" in str(info.value)
    assert runner.calls == []
    assert (journal.dir / "fs1-11111111.json").exists()  # the good one waits too


@pytest.mark.hostile("proxy", "proxy journal record writable by others, or a symlink",
                     "refused as broken; cleanup changes nothing")
def test_a_record_others_can_write_or_a_symlink_is_not_trusted(journal: ProxyJournal,
                                                               tmp_path: Path) -> None:
    rec = good(mountpoint=os.path.join(journal.mount_root, SID))
    write_record(journal, f"{SID}.json", rec, mode=0o666)
    with pytest.raises(CleanupError, match="writable by others"):
        cleanup(FakeRunner(), journal)
    os.unlink(journal.dir / f"{SID}.json")
    elsewhere = write_record(journal, "../elsewhere.txt", rec)
    os.symlink(elsewhere, journal.dir / f"{SID}.json")
    with pytest.raises(CleanupError, match="cannot open"):
        cleanup(FakeRunner(), journal)


def test_a_record_under_another_name_is_not_trusted(journal: ProxyJournal) -> None:
    write_record(journal, "fs1-22222222.json",
                 good(mountpoint=os.path.join(journal.mount_root, SID)))
    with pytest.raises(BrokenRecord, match="names session"):
        journal.load("fs1-22222222")


# --------------------------------------------------------------------------
# our own mount root: what no record claims
# --------------------------------------------------------------------------

@pytest.mark.hostile("proxy", "leftover and foreign entries in the proxy's mount root",
                     "empty leftovers removed; files, symlinks and odd names left alone")
def test_the_mount_root_sweep_removes_only_empty_leftovers(journal: ProxyJournal) -> None:
    root = Path(journal.mount_root)
    (root / "fs1-33333333").mkdir()                 # a proxy older than its journal left it
    (root / "fs1-44444444").mkdir()
    (root / "fs1-44444444" / "data").write_text("someone's file")  # not a mount: kept
    (root / "name with space").mkdir()              # not a session name: not ours
    os.symlink("/etc", root / "fs1-55555555")       # never followed
    runner = FakeRunner()
    with pytest.raises(CleanupError):
        cleanup(runner, journal)
    assert not (root / "fs1-33333333").exists()
    assert (root / "fs1-44444444" / "data").read_text() == "someone's file"
    assert (root / "name with space").is_dir() and (root / "fs1-55555555").is_symlink()
    assert runner.calls == []  # nothing was mounted: no umount
    assert not [p for p in journal.dir.iterdir() if p.name.startswith("fs1-33333333")]


# --------------------------------------------------------------------------
# attach writes the journal before each resource exists
# --------------------------------------------------------------------------

def test_attach_records_each_resource_before_making_it(tmp_path: Path) -> None:
    lab = ta.Lab(tmp_path)
    journal = ProxyJournal(tmp_path / "journal", mount_root=str(lab.root))
    seen: dict[str, list[str]] = {}

    def recorded(step: str, then: Any = None) -> Any:
        def action(argv: list[str]) -> None:
            data = json.loads((journal.dir / f"{ta.SID}.json").read_text())
            seen[step] = data["resources"]
            if then is not None:
                then(argv)
        return action

    lab.runner.on(*ta.NODE, "-o", "new", action=recorded("new"))
    lab.runner.on(*ta.NODE, "--login", action=recorded("login", lab._login))
    lab.runner.on("mount", action=recorded("mount", lab._mount))
    undo = UndoStack()
    lab.attach(undo=undo, journal=journal)
    assert seen == {"new": ["node"], "login": ["node", "session"],
                    "mount": ["node", "session", "mount"]}
    rec = journal.load(ta.SID)
    assert rec is not None and rec.pid == os.getpid()
    assert rec.mountpoint == str(lab.root / ta.SID) and rec.target == ta.T
    assert journal.try_lock(ta.SID) is None  # held while attached
    assert ta.SECRET not in (journal.dir / f"{ta.SID}.json").read_text()
    assert undo.unwind() == []
    assert list(journal.dir.iterdir()) == []


def test_a_refused_login_leaves_no_session_in_the_record(tmp_path: Path) -> None:
    lab = ta.Lab(tmp_path)
    feed(lab.runner, [*ta.NODE, "--login"], "proxy/login_badchap")
    journal = ProxyJournal(tmp_path / "journal", mount_root=str(lab.root))
    undo = UndoStack()
    with pytest.raises(AuthError):
        lab.attach(undo=undo, journal=journal)
    assert journal.load(ta.SID).resources == ["node"]  # type: ignore[union-attr]
    assert undo.unwind() == []
    assert [a[-2:] for a in lab.iscsi()][-1] == ["-o", "delete"]
    assert list(journal.dir.iterdir()) == []


def test_an_undo_that_fails_keeps_the_record(tmp_path: Path) -> None:
    lab = ta.Lab(tmp_path)
    journal = ProxyJournal(tmp_path / "journal", mount_root=str(lab.root))
    undo = UndoStack()
    lab.attach(undo=undo, journal=journal)
    lab.runner.on(*ta.NODE, "--logout", returncode=8, stderr="iscsiadm: timed out\n")
    lab.runner.on(*ta.NODE, "-o", "delete", returncode=6, stderr="iscsiadm: session in use\n")
    failures = undo.unwind()
    assert len(failures) == 2 and all(isinstance(f, CommandError) for f in failures)
    rec = journal.load(ta.SID)
    assert rec is not None and rec.resources == ["node", "session"]
    assert journal.try_lock(ta.SID) is not None  # let go: cleanup may now take it


def test_attach_without_a_writable_journal_makes_nothing(tmp_path: Path) -> None:
    lab = ta.Lab(tmp_path)
    (tmp_path / "journal").write_text("a file where the directory should be")
    with pytest.raises(ResourceError, match="journal"):
        lab.attach(journal=ProxyJournal(tmp_path / "journal", mount_root=str(lab.root)))
    assert lab.runner.calls == []


# --------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------

def test_proxy_cleanup_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture[str]) -> None:
    jdir, root = tmp_path / "journal", tmp_path / "mnt"
    root.mkdir()
    monkeypatch.setattr(journal_mod, "JOURNAL_DIR", str(jdir))
    monkeypatch.setattr(mount_mod, "MOUNT_ROOT", str(root))
    monkeypatch.setattr(cli, "make_runner", lambda: iscsi_runner(logged_in=False))
    assert cli.run(["proxy", "cleanup"]) == 0
    assert capsys.readouterr().out == "nothing to clean up\n"
    killed_proxy(ProxyJournal(jdir, mount_root=str(root)), ["node"], make_dir=False)
    assert cli.run(["proxy", "cleanup", "--json"]) == 0
    [row] = json.loads(capsys.readouterr().out)
    assert row["session_id"] == SID and row["action"] == "removed"
    write_record(ProxyJournal(jdir), f"{SID}.json", "{")
    assert cli.run(["proxy", "cleanup"]) == 13
    err = capsys.readouterr().err
    assert err.startswith("sanoffload: error: proxy cleanup") and "hint:" in err


def test_attachment_round_trips() -> None:
    rec = Attachment(SID, T, P, f"/run/sanoffload/mnt/{SID}", resources=["node"])
    assert Attachment.from_dict(rec.to_dict(), "/run/sanoffload/mnt") == rec
