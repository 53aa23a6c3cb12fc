"""A consistency group's backup end to end over in-process peers (test_proxy_offhost's lab).

The agent is an AgentService over a fake agent that answers a group for ``also``; the
store is a real StoreService over a Repository in tmp_path; stream_duplicate, tar, zstd,
``tar --diff`` and the restore run for real. The attach is either a stand-in whose
"staging tree" is a directory in tmp_path, or the real attach_group over a FakeRunner and
fake udev (test_group_attach's GroupLab) for the failure that must release.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any, ClassVar

import pytest

from sanoffload import cli
from sanoffload.agent.service import SPECS, AgentService
from sanoffload.channel.protocol import Spec
from sanoffload.errors import CommandError, ConfigError, ProtocolError, UsageError
from sanoffload.kinds import VerifyMode
from sanoffload.proxy import jobs, offhost
from sanoffload.proxy.attach import Attached, attach
from sanoffload.proxy.offhost import Location, run_offhost_backup
from sanoffload.runner import CommandRunner
from sanoffload.store.repo import Repository
from sanoffload.store.restore import restore
from sanoffload.undo import UndoStack
from tests.unit import test_proxy_offhost as to
from tests.unit.test_group_attach import GroupLab, group_wire
from tests.unit.test_proxy_offhost import INITIATOR, SOURCE, FakeAgent, RawAnswer, Served

pytestmark = pytest.mark.unit

DB, LOG = "/srv/san/db", "/srv/san/log"
#: (path, path_in_fs, object_kind, hex, disk) of the two members the fake agent answers
TWO = [(DB, "db", "directory", "6001405a1b2c3d4e5f60718293a4b5c6", "sdb"),
       (LOG, "log", "directory", "6001405ffeeddccbbaa9988776655443", "sdc")]


class GroupAgent(FakeAgent):
    """The fake agent, answering a group when ``also`` is asked (as the real one will)."""

    def __init__(self) -> None:
        super().__init__()
        #: the members' paths it answers (None: the ones asked for)
        self.answer_paths: list[str] | None = None
        self.also_seen: list[Any] = []

    def prepare(self, path: str, initiator: str, *, kind: str | None = None,
                client: str | None = None, also: Any = None) -> RawAnswer:
        self.also_seen.append(also)
        single = super().prepare(path, initiator, kind=kind, client=client)
        if also is None:
            return single
        paths = self.answer_paths or [path, *also]
        members = [(p, p.rsplit("/", 1)[1], "directory", hx, disk)
                   for p, (_p, _pif, _k, hx, disk) in zip(paths, TWO, strict=False)]
        wire = group_wire(members)
        sid = single.session_id
        wire.update(session_id=sid, target_iqn=single.data["target_iqn"],
                    frozen_at=to.FROZEN_AT, lease_expires=to.FROZEN_AT + 600)
        return RawAnswer(wire)


class GroupService(AgentService):
    """AgentService taking ``also`` (a list of paths) in prepare, as the agent's will."""

    specs = {  # noqa: RUF012 (AgentService declares it a plain dict)
        **SPECS, "prepare": Spec(required={"path": str, "initiator": str},
                                 optional={"kind": str, "also": list})}
    requests: ClassVar[list[dict[str, Any]]] = []

    def handle(self, op: str, fields: dict[str, Any], channel: Any) -> dict[str, Any]:
        GroupService.requests.append({"op": op, **fields})
        if op == "prepare" and "also" in fields:
            answer = self.agent.prepare(fields["path"], fields["initiator"],
                                        kind=fields.get("kind"), client=self.client,
                                        also=fields["also"])
            self.open.append(answer.session_id)
            return {"session": answer.to_wire()}
        return super().handle(op, fields, channel)


class GroupStaging:
    """Stands in for attach_group: the "staging tree" is a directory holding both members."""

    def __init__(self, tmp_path: Path) -> None:
        self.staging = tmp_path / "session" / "stage"
        (self.staging / "srv/san/db").mkdir(parents=True)
        (self.staging / "srv/san/db/table.ibd").write_bytes(b"rows\n" * 100)
        (self.staging / "srv/san/log").mkdir(parents=True)
        (self.staging / "srv/san/log/wal.000001").write_text("commit 41\n")
        self.events: list[str] = []

    def __call__(self, runner: Any, answer: Any, undo: UndoStack) -> Attached:
        self.events.append(f"attach {len(answer.members)} members")
        undo.push("detach", self.events.append, "detached")
        return Attached("/dev/sdb", str(self.staging.parent), str(self.staging),
                        staging=str(self.staging),
                        names=tuple(m.archive_name for m in answer.members),
                        mountpoints=(str(self.staging.parent),))


@pytest.fixture
def lab(tmp_path: Path) -> to.Lab:
    (tmp_path / "repo").mkdir()
    repo = Repository(tmp_path / "repo", CommandRunner())
    agent = GroupAgent()
    lab = to.Lab(agent, repo)
    GroupService.requests = []
    lab.agent_side = Served(lambda: GroupService(agent, "px1",  # type: ignore[arg-type]
                                                 sleep=lab.graces.append), "fs1")
    return lab


def run_group(lab: to.Lab, attach_fn: Any, *, also: tuple[str, ...] = (LOG,),
              verify: VerifyMode = VerifyMode.FULL) -> dict[str, Any]:
    return run_offhost_backup(CommandRunner(), Location("fs1", DB),
                              Location("bk1", str(lab.repo.root)), **lab.wiring(attach_fn),
                              verify=verify, also=also)


def test_a_group_is_one_archive_with_every_member_under_its_path(lab: to.Lab,
                                                                  tmp_path: Path) -> None:
    staging = GroupStaging(tmp_path)
    summary = run_group(lab, staging)
    # the request named both paths; "also" only in a group's
    [prepare] = [r for r in GroupService.requests if r["op"] == "prepare"]
    assert prepare["path"] == DB and prepare["also"] == [LOG]
    [stored] = lab.repo.list()
    listing = subprocess.run(["tar", "--zstd", "-tf", str(stored.archive)], capture_output=True,
                             check=True, text=True).stdout.split()
    assert listing == ["srv/san/db/", "srv/san/db/table.ibd", "srv/san/log/",
                       "srv/san/log/wal.000001"]
    # the manifest lists the members (no LUN, no secret), the backup's path first
    m = stored.manifest
    assert m.path == DB
    assert [x.to_dict() for x in m.members] == [
        {"path": DB, "identifier": "naa.6001405a1b2c3d4e5f60718293a4b5c6",
         "duplicate_kind": "snapshot", "fstype": "ext4", "object_kind": "directory"},
        {"path": LOG, "identifier": "naa.6001405ffeeddccbbaa9988776655443",
         "duplicate_kind": "snapshot", "fstype": "ext4", "object_kind": "directory"}]
    raw = json.loads(stored.manifest_path.read_text())
    assert [x["path"] for x in raw["members"]] == [DB, LOG]
    assert "chap" not in stored.manifest_path.read_text()
    # --verify full compared the stored archive with the same staging tree
    assert summary["verified"] is True and summary["compared"]["status"] == "ok"
    assert summary["members"] == [DB, LOG]
    assert staging.events == ["attach 2 members", "detached"]
    assert lab.agent.ops("release") == [("release", "fs1-0a1b2c3d")]
    lab.check_peers_done()

    # restore needs nothing new: the archive holds srv/san/db/... and srv/san/log/...
    done = restore(lab.repo, stored.id, tmp_path / "restore")
    assert done.members == 4
    assert (tmp_path / "restore/srv/san/db/table.ibd").read_bytes() == b"rows\n" * 100
    assert (tmp_path / "restore/srv/san/log/wal.000001").read_text() == "commit 41\n"
    # and list shows it as any backup, by its first path
    from sanoffload.store.cli import format_backups

    assert DB in format_backups([{"id": str(stored.id), **m.to_dict()}])


def test_a_single_path_backup_is_what_it_always_was(lab: to.Lab, tree: Path) -> None:
    """No "also" in the request, no members in the manifest or the summary."""
    summary = run_offhost_backup(CommandRunner(), SOURCE, Location("bk1", str(lab.repo.root)),
                                 **lab.wiring(to.FakeAttach(tree)), verify=VerifyMode.STREAM)
    [prepare] = [r for r in GroupService.requests if r["op"] == "prepare"]
    assert set(prepare) == {"op", "path", "initiator"}
    assert lab.agent.also_seen == [None]  # type: ignore[attr-defined]
    [stored] = lab.repo.list()
    assert "members" not in json.loads(stored.manifest_path.read_text())
    assert stored.manifest.members == ()
    assert "members" not in summary
    listing = subprocess.run(["tar", "--zstd", "-tf", str(stored.archive)], capture_output=True,
                             check=True, text=True).stdout.split()
    assert listing[0] == "./"


@pytest.mark.hostile("proxy", "the agent answers a group other than the one asked for "
                     "(other paths, or a single path)",
                     "protocol error (11) before any attach; the session released")
@pytest.mark.parametrize("answered", [["/srv/san/db", "/etc"], ["/srv/san/log", "/srv/san/db"]])
def test_an_answer_for_other_paths_is_refused_and_released(lab: to.Lab, tmp_path: Path,
                                                           answered: list[str]) -> None:
    lab.agent.answer_paths = answered  # type: ignore[attr-defined]
    staging = GroupStaging(tmp_path)
    with pytest.raises(ProtocolError, match="asked for /srv/san/db, /srv/san/log"):
        run_group(lab, staging)
    assert staging.events == []
    assert lab.agent.ops("release") == [("release", "fs1-0a1b2c3d")]
    assert lab.repo.list() == []


def test_a_single_answer_to_a_group_request_is_refused(lab: to.Lab, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    agent = lab.agent
    monkeypatch.setattr(agent, "prepare", lambda path, initiator, *, kind=None, client=None,
                        also=None: FakeAgent.prepare(agent, path, initiator, kind=kind,
                                                     client=client))
    with pytest.raises(ProtocolError, match="answered one path"):
        run_group(lab, GroupStaging(tmp_path))
    assert lab.agent.ops("release") == [("release", "fs1-0a1b2c3d")]


def test_a_failure_mounting_a_member_unwinds_logs_out_and_releases(lab: to.Lab,
                                                                   tmp_path: Path) -> None:
    glab = GroupLab(tmp_path, TWO)
    glab.runner.on("mount", "-t", "ext4", "-o", "ro,noload,nodev,nosuid,noexec", "/dev/sdc",
                   returncode=32, stderr="mount: wrong fs type\n", action=glab.note)

    def real_attach(runner: Any, answer: Any, undo: UndoStack) -> Attached:
        return attach(glab.runner, answer, undo, group_waiter_factory=glab.waiter,
                      mount_root=str(glab.root), journal=glab.journal)

    with pytest.raises(CommandError, match="wrong fs type"):
        run_group(lab, real_attach)
    tail = [a for a in glab.runner.argvs() if a[0] in ("umount", "iscsiadm")][-3:]
    assert tail == [["umount", str(glab.session_dir / "m0")], [*to_node(), "--logout"],
                    [*to_node(), "-o", "delete"]]
    assert not glab.session_dir.exists()
    assert lab.agent.ops("release") == [("release", "fs1-0a1b2c3d")]
    assert lab.agent.calls[-1][0] == "release"
    assert lab.repo.list() == [] and to.no_leftovers(lab.repo)


def to_node() -> list[str]:
    target = "iqn.2026-11.org.sanoffload:fs1-0a1b2c3d"
    return ["iscsiadm", "-m", "node", "-T", target, "-p", "10.77.0.11:3260"]


# -- the request: --with and a job's "with" ---------------------------------------------
@pytest.mark.hostile("proxy", "--with paths that are relative, on another host, '/', '..', "
                     "named twice, nested, or nine of them",
                     "usage error (2) naming the path; nothing run")
@pytest.mark.parametrize("also, reason", [
    (("srv/log",), "absolute"), (("fs2:/srv/log",), "source.s host"),
    (("/",), "root directory"), (("/srv/../etc",), "'..'"), ((DB,), "named twice"),
    (("/srv/san/db/sub",), "inside /srv/san/db"), (("/srv",), "inside /srv"),
    (tuple(f"/srv/p{i}" for i in range(8)), "at most 8"), (("/srv/x\n",), "line breaks"),
])
def test_bad_group_paths_are_refused_before_connecting(also: tuple[str, ...],
                                                       reason: str) -> None:
    def never() -> Any:
        raise AssertionError("connected")

    with pytest.raises(UsageError, match=reason):
        run_offhost_backup(CommandRunner(), Location("fs1", DB), Location(None, "/nowhere"),
                           initiator=INITIATOR, agent_conn=never, also=also)


def test_the_cli_passes_every_with(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen: dict[str, Any] = {}

    def fake_run(runner: Any, source: Location, store: Location, **kw: Any) -> dict[str, Any]:
        seen.update(kw, source=source)
        raise UsageError("stop here")

    monkeypatch.setattr(offhost, "run_offhost_backup", fake_run)
    assert cli.run(["backup", f"fs1:{DB}", "--with", LOG, "--with", "/srv/etc/app.conf",
                    "--store", str(tmp_path), "--no-progress"]) == 2
    assert seen["also"] == (LOG, "/srv/etc/app.conf") and seen["source"].path == DB
    assert cli.run(["backup", "--job", "j", "--with", LOG]) == 2


def test_a_job_names_its_group_with_with() -> None:
    job = jobs.parse("db", f'source = "fs1:{DB}"\nstore = "bk1:/srv/backups"\n'
                           f'with = ["{LOG}", "/srv/etc//app.conf"]\n')
    assert job.also == (LOG, "/srv/etc/app.conf")
    assert jobs.parse("one", 'source = "fs1:/srv/data"\nstore = "/b"\n').also == ()


@pytest.mark.hostile("proxy", "a job's 'with' that is not a list, relative, on a host, nested "
                     "or repeated", "config error naming the file and the key")
@pytest.mark.parametrize("value, reason", [
    ('"/srv/log"', "must be a list"), ('["log"]', "absolute"), ('[7]', "HOST:/PATH"),
    ('["fs1:/srv/log"]', "source's host"), (f'["{DB}"]', "named twice"),
    (f'["{DB}/x"]', "inside"), ('["/srv/../x"]', "'..'"),
])
def test_a_bad_with_in_a_job_is_refused(value: str, reason: str) -> None:
    with pytest.raises(ConfigError, match=f"job.toml: with.*{reason}"):
        jobs.parse("db", f'source = "fs1:{DB}"\nstore = "/b"\nwith = {value}\n', "job.toml")
