"""``sanoffload.proxy.offhost.run_offhost_backup``: one backup end to end over in-process peers.

The agent is an AgentService over a small fake Agent (no LVM, no LIO): it
records prepare/status/release and hands out a prepared answer. The store is
a real StoreService over a Repository in tmp_path (CommandRunner: the store
test-reads with the real ``zstd -t`` and ``tar --list``). Both are reached
through in_process_connector, so the proxy's AgentClient, StoreClient,
RemoteWriter and compare_stored_archive (a real ``tar --diff``) all run for real.

Only the attach step is injected (:class:`FakeAttach`: no iSCSI, no mount;
the "duplicate" is a tree in tmp_path): stream_duplicate itself runs for real, with
the real tar and zstd.
"""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import pytest

from sanoffload import cli
from sanoffload.agent.service import AgentService
from sanoffload.channel.client import Connection, in_process_connector
from sanoffload.channel.messages import PrepareAnswer
from sanoffload.channel.server import serve
from sanoffload.errors import (
    AuthError,
    CommandError,
    ConfigError,
    DuplicateInvalidError,
    IntegrityError,
    ProtocolError,
    RefusedError,
    UsageError,
)
from sanoffload.kinds import DuplicateKind, VerifyMode
from sanoffload.proxy import offhost
from sanoffload.proxy.attach import Attached
from sanoffload.proxy.offhost import (
    Location,
    Progress,
    local_initiator,
    parse_location,
    run_offhost_backup,
)
from sanoffload.proxy.peers import StoreClient
from sanoffload.runner import CommandRunner
from sanoffload.store.repo import Repository, format_timestamp, slug_for_path
from sanoffload.store.service import StoreService
from sanoffload.text import printable
from sanoffload.undo import UndoStack

pytestmark = pytest.mark.unit

INITIATOR = "iqn.2026-11.org.sanoffload.lab:px1"
#: the agent's freeze time (epoch seconds, as prepare answers it): names the backup
FROZEN_AT = 1795688973.125
SOURCE = Location("root@fs1.lab.example", "/srv/data")


# -- the fake agent -------------------------------------------------------------------
class RawAnswer:
    """What the fake agent's prepare returns: the service sends ``to_wire()`` as it is, so a
    test can make the agent say anything (the proxy's from_wire must cope)."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data
        self.session_id = str(data["session_id"])

    def to_wire(self) -> dict[str, Any]:
        return dict(self.data)


class FakeConfig:
    grace_s = 0.0

    def client(self, name: str) -> SimpleNamespace:
        if name != "px1":
            raise AuthError(f"client {name!r} is not in the agent config")
        return SimpleNamespace(name=name)


class FakeAgent:
    """Records every call; ``health`` is what status says; ``refuse`` makes prepare raise."""

    host = "fs1"  # what the agent says in its hello: not the ssh destination

    def __init__(self) -> None:
        self.config = FakeConfig()
        self.calls: list[tuple[Any, ...]] = []
        self.health = "healthy"
        self.closed = 0
        self.refuse: BaseException | None = None
        #: what prepare answers as "warnings" (None: the key is absent, as from older agents)
        self.warnings: Any = None
        #: what prepare answers as "held" (None: the key is absent, as from older agents)
        self.held: Any = None
        #: called when status is asked (after the stream, before the commit)
        self.on_status: Callable[[], None] | None = None
        self.lock = threading.Lock()
        self.owners: dict[str, str] = {}

    def close(self) -> None:
        """Hangs up on storage nodes (none here)."""
        self.closed += 1

    def prepare(self, path: str, initiator: str, *, kind: str | None = None,
                client: str | None = None) -> RawAnswer:
        with self.lock:
            self.calls.append(("prepare", path, initiator, kind, client))
            if self.refuse is not None:
                raise self.refuse
            sid = "fs1-0a1b2c3d"
            self.owners[sid] = str(client)
        extra = {} if self.warnings is None else {"warnings": self.warnings}
        if self.held is not None:
            extra["held"] = self.held
        return RawAnswer({
            **extra, "session_id": sid, "identifier": "naa.60014050a1b2c3d4",
            "target_iqn": f"iqn.2026-11.org.sanoffload:{sid}", "portals": ["192.0.2.10:3260"],
            "lun": 0, "unit_serial": "0a1b2c3d", "chap_user": "px1",
            "chap_secret": "s3cret-never-stored", "fstype": "ext4", "path_in_fs": "data",
            "object_kind": "directory", "duplicate_kind": kind or "thin-snapshot",
            "freeze_window_ms": 41.7, "frozen_by": "fsfreeze", "lease_expires": FROZEN_AT + 600,
            "frozen_at": FROZEN_AT})

    def owner(self, session_id: str) -> str | None:
        return self.owners.get(session_id)

    def status(self, session_id: str) -> dict[str, Any]:
        with self.lock:
            self.calls.append(("status", session_id))
        if self.on_status is not None:
            self.on_status()
        return {"session_id": session_id, "status": self.health}

    def release(self, session_id: str) -> list[str]:
        with self.lock:
            self.calls.append(("release", session_id))
            self.owners.pop(session_id, None)
        return [f"lio-target iqn.2026-11.org.sanoffload:{session_id}"]

    def ops(self, op: str) -> list[tuple[Any, ...]]:
        return [c for c in self.calls if c[0] == op]


class Served:
    """A service behind an in-process connector; records serve()'s end and thread errors."""

    def __init__(self, make: Callable[[], Any], peer: str) -> None:
        self.connects = 0
        self.codes: list[int] = []
        self.errors: list[BaseException] = []

        def run(ch: Any) -> None:
            try:
                self.codes.append(serve(make(), ch))
            except BaseException as exc:  # checked by the tests
                self.errors.append(exc)

        inner = in_process_connector(run, peer=peer)

        def connect() -> Connection:
            self.connects += 1
            return inner()

        self.connector = connect


# -- the fake attach ------------------------------------------------------------------
class FakeAttach:
    """Stands in for the iSCSI login and the read-only mount: the "duplicate" is ``tree``.

    Everything else is the real stream_duplicate: tar | zstd of the tree, the store's
    writer, still_valid, commit, compare_stored_archive's ``tar --diff``, abort on failure.
    """

    def __init__(self, tree: Path, fail: BaseException | None = None) -> None:
        self.tree = tree
        self.fail = fail
        self.events: list[str] = []

    def __call__(self, runner: Any, answer: Any, undo: UndoStack) -> Attached:
        assert isinstance(answer, PrepareAnswer)  # the proxy holds the checked answer
        self.events.append(f"attach {answer.identifier}")
        if self.fail is not None:
            raise self.fail
        undo.push("detach", self.events.append, "detached")
        return Attached("/dev/sdz", str(self.tree.parent), str(self.tree))


# -- fixtures -------------------------------------------------------------------------


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    (tmp_path / "repo").mkdir()
    return Repository(tmp_path / "repo", CommandRunner())


@pytest.fixture
def agent() -> FakeAgent:
    return FakeAgent()


class Lab:
    def __init__(self, agent: FakeAgent, repo: Repository) -> None:
        self.agent = agent
        self.repo = repo
        #: the agent's grace periods: a session the proxy did not release itself
        self.graces: list[float] = []
        self.agent_side = Served(lambda: AgentService(agent, "px1",  # type: ignore[arg-type]
                                                      sleep=self.graces.append), "fs1")
        self.store_side = Served(lambda: StoreService(repo, "px1"), "bk1")

    def run(self, attach: Any, *, source: Location = SOURCE,
            verify: bool | VerifyMode = True,
            kind: DuplicateKind | None = None, progress: Progress | None = None) -> dict[str, Any]:
        return run_offhost_backup(CommandRunner(), source, Location("bk1", str(self.repo.root)),
                      **self.wiring(attach), verify=verify, kind=kind, progress=progress)

    def wiring(self, attach: Any) -> dict[str, Any]:
        """What a test gives run.backup besides its arguments: the peers and the attach."""
        return {"initiator": INITIATOR, "timeout": 60, "agent_conn": self.agent_side.connector,
                "store_conn": self.store_side.connector, "attach_fn": attach}

    def check_peers_done(self) -> None:
        """Both connections were made once and hung up cleanly; no server thread failed."""
        for side in (self.agent_side, self.store_side):
            assert side.connects == 1
            assert side.errors == []
            assert side.codes == [0]


@pytest.fixture
def lab(agent: FakeAgent, repo: Repository) -> Lab:
    return Lab(agent, repo)


def no_leftovers(repo: Repository) -> bool:
    return repo.leftovers() == [] and not list(repo.root.rglob("*.partial"))


# -- success ----------------------------------------------------------------------------
def test_a_backup_is_stored_compared_and_released(lab: Lab, tree: Path) -> None:
    attach = FakeAttach(tree)
    summary = lab.run(attach)

    [stored] = lab.repo.list()
    assert summary["backup_id"] == str(stored.id)
    # named by the host the agent says it is (not the ssh destination) and by the path
    assert stored.id.host == "fs1"
    assert stored.id.slug == slug_for_path("/srv/data")
    assert stored.manifest.path == "/srv/data"
    # ... at the agent's freeze time
    assert stored.id.timestamp == format_timestamp(datetime.fromtimestamp(FROZEN_AT,
                                                                         UTC))
    # what is stored is stream_duplicate's tar | zstd of the (stand-in) duplicate
    on_disk = lab.repo.archive_path(stored.id).read_bytes()
    assert summary["sha256"] == hashlib.sha256(on_disk).hexdigest() == stored.manifest.sha256
    assert summary["archive_bytes"] == len(on_disk)
    listing = subprocess.run(["tar", "--zstd", "-tf", str(stored.archive)], capture_output=True,
                             check=True, text=True).stdout.split()
    assert "./sub/a.txt" in listing and "./b.bin" in listing
    # attached once, detached once (before the release)
    assert attach.events == ["attach naa.60014050a1b2c3d4", "detached"]
    # compared with the duplicate, and the verdict recorded in the manifest
    assert summary["verified"] is True
    assert stored.manifest.compared is not None and stored.manifest.compared.status == "ok"
    assert summary["compared"]["status"] == "ok"
    assert summary["verification"]["status"] == "ok"
    assert stored.manifest.member_count is not None
    assert summary["member_count"] == stored.manifest.member_count > 0
    # the agent's freeze facts went into the manifest, its CHAP secret did not
    m = stored.manifest
    assert (m.duplicate_kind, m.frozen_by, m.freeze_window_ms, m.session_id) == (
        "thin-snapshot", "fsfreeze", 41.7, "fs1-0a1b2c3d")
    assert b"s3cret" not in stored.manifest_path.read_bytes()
    assert summary["session_id"] == "fs1-0a1b2c3d"
    assert summary["source"] == "root@fs1.lab.example:/srv/data"
    assert (summary["duplicate_kind"], summary["frozen_by"], summary["freeze_window_ms"]) == (
        "thin-snapshot", "fsfreeze", 41.7)
    assert summary["warnings"] == []
    # the agent: one prepare of this path for this initiator, asked once, released once
    assert lab.agent.ops("prepare") == [("prepare", "/srv/data", INITIATOR, None, "px1")]
    assert lab.agent.ops("status") == [("status", "fs1-0a1b2c3d")]
    assert lab.agent.ops("release") == [("release", "fs1-0a1b2c3d")]
    assert lab.agent.calls[-1][0] == "release"
    assert no_leftovers(lab.repo)
    lab.check_peers_done()


class CountingStore(StoreService):
    """The real store service, counting the ops the proxy asks of it."""

    ops: ClassVar[list[str]] = []

    def handle(self, op: str, fields: dict[str, Any], channel: Any) -> Any:
        CountingStore.ops.append(op)
        return super().handle(op, fields, channel)


def test_the_default_check_reads_nothing_twice(lab: Lab, tree: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # stream: no archive fetched back, no verify request, no tar --diff of the duplicate
    CountingStore.ops = []
    lab.store_side = Served(lambda: CountingStore(lab.repo, "px1"), "bk1")
    diffs: list[str] = []

    def compare(*args: Any, **kwargs: Any) -> tuple[bool, str]:
        diffs.append("diff")
        return True, ""

    monkeypatch.setattr(offhost, "compare_stored_archive", compare)
    summary = lab.run(FakeAttach(tree), verify=VerifyMode.STREAM)
    assert CountingStore.ops == ["put"] and diffs == []
    [stored] = lab.repo.list()
    assert summary["verified"] is True and summary["verify"] == "stream"
    # the store decoded and counted what it received, and says so in the manifest
    v = stored.manifest.verification
    assert v is not None and v.ok and v.detail == "on receipt"
    assert stored.manifest.member_count == summary["member_count"] == 4
    assert stored.manifest.compared is None
    lab.check_peers_done()


@pytest.mark.parametrize("mode", [VerifyMode.STREAM, VerifyMode.FULL])
def test_a_local_store_takes_the_bytes_straight_in(lab: Lab, tree: Path, mode: VerifyMode,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # --store /PATH: the put skips the channel (no frames, no second sha256), same checks
    real_call = StoreClient.call

    def call(self: Any, op: str, **fields: Any) -> dict[str, Any]:
        assert op != "put", "a local put must not go over the channel"
        return real_call(self, op, **fields)

    monkeypatch.setattr(StoreClient, "call", call)
    wiring = lab.wiring(FakeAttach(tree))
    del wiring["store_conn"]
    summary = run_offhost_backup(CommandRunner(), SOURCE, Location(None, str(lab.repo.root)),
                                 **wiring, verify=mode)
    [stored] = lab.repo.list()
    assert summary["backup_id"] == str(stored.id) and summary["verified"] is True
    assert stored.manifest.client == "local" and stored.manifest.member_count == 4
    on_disk = lab.repo.archive_path(stored.id).read_bytes()
    assert summary["sha256"] == hashlib.sha256(on_disk).hexdigest()
    if mode is VerifyMode.FULL:  # the comparison still reads it back over the channel
        assert stored.manifest.compared is not None and stored.manifest.compared.ok
    assert no_leftovers(lab.repo)


def test_a_failed_local_put_leaves_nothing(lab: Lab, tree: Path) -> None:
    wiring = lab.wiring(FakeAttach(tree))
    del wiring["store_conn"]
    lab.agent.health = "invalid"  # the duplicate overflowed while read: the put is aborted
    with pytest.raises(DuplicateInvalidError):
        run_offhost_backup(CommandRunner(), SOURCE, Location(None, str(lab.repo.root)),
                           **wiring)
    assert lab.repo.list() == [] and no_leftovers(lab.repo)


def test_full_check_also_compares_with_the_duplicate(lab: Lab, tree: Path) -> None:
    summary = lab.run(FakeAttach(tree), verify=VerifyMode.FULL)
    assert summary["verify"] == "full" and summary["compared"]["status"] == "ok"


def test_the_kind_is_passed_to_the_agent(lab: Lab, tree: Path) -> None:
    summary = lab.run(FakeAttach(tree), kind=DuplicateKind.MIRROR_SPLIT, verify=False)
    assert lab.agent.ops("prepare")[0][3] == "mirror-split"
    assert summary["duplicate_kind"] == "mirror-split"
    assert lab.repo.list()[0].manifest.duplicate_kind == "mirror-split"


def test_without_verify_nothing_is_compared(lab: Lab, tree: Path) -> None:
    attach = FakeAttach(tree)
    summary = lab.run(attach, verify=False)
    [stored] = lab.repo.list()
    assert stored.manifest.compared is None
    assert summary["compared"] is None and summary["verified"] is None
    assert summary["backup_id"] == str(stored.id)
    assert attach.events[-1] == "detached"
    assert lab.agent.ops("release") == [("release", "fs1-0a1b2c3d")]
    lab.check_peers_done()


# -- warnings from the agent (post-thaw hooks) --------------------------------------------
HOOK_FAILED = ("post-thaw hook /usr/local/sbin/db-end-backup failed (exit 1): "
               "ERROR: still in backup mode\n\x1b]0;owned\x07\x1b[2J")


@pytest.mark.hostile("proxy", "post-thaw hook warning with a newline and terminal escapes",
                     "stored escaped in the manifest and summary; backup kept")
def test_the_agents_warnings_reach_the_manifest_and_the_summary(lab: Lab, tree: Path) -> None:
    lab.agent.warnings = [HOOK_FAILED]
    summary = lab.run(FakeAttach(tree))
    escaped = printable(HOOK_FAILED)
    assert summary["warnings"] == [escaped]
    assert "\x1b" not in escaped and "\n" not in escaped and "\\x1b]0;owned" in escaped
    [stored] = lab.repo.list()
    assert json.loads(stored.manifest_path.read_text())["warnings"] == [escaped]
    # the backup itself is whole: stored, compared, released
    assert summary["verified"] is True and summary["backup_id"] == str(stored.id)
    assert lab.agent.ops("release") == [("release", "fs1-0a1b2c3d")]
    lab.check_peers_done()


@pytest.mark.hostile("proxy", "agent answers 'warnings' that is not a list of strings",
                     "protocol error (11); nothing stored, session released")
@pytest.mark.parametrize("bad", ["one string", [1, 2], {"w": "x"}, [None]])
def test_malformed_warnings_are_a_protocol_error(lab: Lab, tree: Path, bad: Any) -> None:
    lab.agent.warnings = bad
    attach = FakeAttach(tree)
    with pytest.raises(ProtocolError, match="warnings") as info:
        lab.run(attach)
    assert info.value.exit_code == 11
    assert attach.events == []
    assert lab.repo.list() == [] and no_leftovers(lab.repo)
    assert lab.agent.ops("release") == [("release", "fs1-0a1b2c3d")]
    lab.check_peers_done()


@pytest.mark.hostile("proxy", "agent answers an unknown duplicate kind, a bad IQN or identifier, "
                              "or a number where a name belongs",
                     "protocol error (11) before any login; the proxy releases the session "
                     "at once (no grace period)")
@pytest.mark.parametrize("key,value", [("duplicate_kind", "clone"), ("frozen_by", "magic"),
                                       ("object_kind", "socket"), ("target_iqn", "--login"),
                                       ("identifier", "naa.12"), ("session_id", 5)])
def test_an_unusable_answer_is_released_at_once(lab: Lab, tree: Path, key: str,
                                                value: Any) -> None:
    prepare = lab.agent.prepare

    def bad(*args: Any, **kwargs: Any) -> RawAnswer:
        answer = prepare(*args, **kwargs)
        answer.data[key] = value
        return answer

    lab.agent.prepare = bad  # type: ignore[method-assign]
    attach = FakeAttach(tree)
    with pytest.raises(ProtocolError, match=key) as info:
        lab.run(attach)
    assert info.value.exit_code == 11
    assert attach.events == [] and lab.repo.list() == [] and no_leftovers(lab.repo)
    if key != "session_id":
        assert lab.agent.ops("release") == [("release", "fs1-0a1b2c3d")]
        assert lab.graces == []  # released by the proxy, not by the connection's end
    lab.check_peers_done()


@pytest.mark.hostile("proxy", "agent answers 40 warnings of 5,000 characters each",
                     "bounded: at most 32 (+1 saying how many more), each clipped")
def test_warnings_are_bounded(lab: Lab, tree: Path) -> None:
    lab.agent.warnings = ["w" * 5000] * 40
    summary = lab.run(FakeAttach(tree), verify=False)
    assert len(summary["warnings"]) == 33
    assert all(len(w) <= 1000 for w in summary["warnings"])
    assert "8 more" in summary["warnings"][-1]


def test_warnings_make_the_backup_command_exit_14_after_release(
        lab: Lab, tree: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Through the CLI: JSON on stdout, the warnings escaped on stderr, exit 14 last."""
    lab.agent.warnings = [HOOK_FAILED, "post-thaw hook /x timed out after 60 s"]
    real = offhost.run_offhost_backup
    monkeypatch.setattr(offhost, "run_offhost_backup", lambda runner, source, store, **kw: real(
        CommandRunner(), source, store, **{**kw, **lab.wiring(FakeAttach(tree))}))
    code = cli.run(["backup", "fs1:/srv/data", "--store", "bk1:" + str(lab.repo.root),
                    "--json", "--no-progress"])
    out, err = capsys.readouterr()
    assert code == 14
    summary = json.loads(out)
    assert summary["warnings"] == [printable(HOOK_FAILED), "post-thaw hook /x timed out after 60 s"]
    assert "\x1b" not in err and "\x07" not in err
    assert err.count("sanoffload: WARNING: fs1: post-thaw hook") == 2
    last = err.splitlines()[-1]
    assert last.startswith(f"sanoffload: warning: backup {summary['backup_id']} is stored, "
                           "with 2 warning(s) from fs1")
    # the backup is listed, and the session was released before the command ended
    assert [str(b.id) for b in lab.repo.list()] == [summary["backup_id"]]
    assert lab.agent.ops("release") == [("release", "fs1-0a1b2c3d")]


# -- failures -----------------------------------------------------------------------------
def test_an_invalid_duplicate_is_discarded_and_released(lab: Lab, tree: Path) -> None:
    lab.agent.health = "invalid"
    attach = FakeAttach(tree)
    with pytest.raises(DuplicateInvalidError) as info:
        lab.run(attach)
    assert info.value.exit_code == 8
    assert attach.events[-1] == "detached"
    assert lab.repo.list() == []
    assert no_leftovers(lab.repo)
    assert lab.agent.ops("status") == [("status", "fs1-0a1b2c3d")]
    assert lab.agent.ops("release") == [("release", "fs1-0a1b2c3d")]
    lab.check_peers_done()


def test_a_difference_found_by_the_comparison_is_recorded(lab: Lab, tree: Path) -> None:
    def change() -> None:  # asked after the stream: the duplicate no longer matches the archive
        (tree / "sub" / "a.txt").write_text("changed after the archive was made\n")

    lab.agent.on_status = change
    with pytest.raises(IntegrityError) as info:
        lab.run(FakeAttach(tree))
    assert info.value.exit_code == 12
    [stored] = lab.repo.list()
    compared = stored.manifest.compared
    assert compared is not None and compared.status == "failed"
    assert "a.txt" in compared.detail
    assert lab.agent.ops("release") == [("release", "fs1-0a1b2c3d")]
    lab.check_peers_done()


def test_a_refused_prepare_stores_nothing_and_releases_nothing(lab: Lab, tree: Path) -> None:
    lab.agent.refuse = RefusedError("/srv/data: not on a logical volume")
    attach = FakeAttach(tree)
    with pytest.raises(RefusedError, match="not on a logical volume") as info:
        lab.run(attach)
    assert info.value.exit_code == 3
    assert attach.events == []
    assert lab.agent.ops("release") == [] and lab.agent.ops("status") == []
    assert lab.repo.list() == [] and no_leftovers(lab.repo)
    assert list(lab.repo.root.iterdir()) == []  # not even a put was begun
    lab.check_peers_done()


def test_a_source_without_a_host_is_refused_before_any_connection(repo: Repository) -> None:
    def must_not_connect() -> Connection:
        pytest.fail("a connector was called")

    def must_not_attach(*args: Any, **kwargs: Any) -> Any:
        pytest.fail("attach was called")

    with pytest.raises(UsageError, match="name the first server") as info:
        # initiator None: reading /etc/iscsi must not come first either
        run_offhost_backup(CommandRunner(), Location(None, "/srv/data"),
                           Location(None, str(repo.root)),
                           agent_conn=must_not_connect, store_conn=must_not_connect,
                           attach_fn=must_not_attach)
    assert type(info.value) is UsageError and info.value.exit_code == 2


# -- progress ---------------------------------------------------------------------------
def test_progress_writes_mib_after_its_interval() -> None:
    out = io.StringIO()
    p = Progress(out=out, every_s=0)
    p(3 << 20)
    assert "MiB" in out.getvalue() and "3.0" in out.getvalue()
    p.estimate = 2 << 30
    p(4 << 20)
    assert "GiB" in out.getvalue().split("\r")[-1]
    p.done()
    assert out.getvalue().endswith("\n")


def test_progress_is_quiet_within_its_interval() -> None:
    out = io.StringIO()
    p = Progress(out=out, every_s=3600)
    p(1 << 20)  # the first report: the interval since "never" has passed
    first = out.getvalue()
    p(2 << 20)
    assert out.getvalue() == first


def test_a_backup_reports_progress(lab: Lab, tree: Path) -> None:
    out = io.StringIO()
    summary = lab.run(FakeAttach(tree), verify=False, progress=Progress(out=out, every_s=0))
    text = out.getvalue()
    assert "MiB" in text and text.endswith("\n")
    assert "volume holds ~" in text  # sized from the mounted duplicate's used space
    assert lab.repo.list()[0].manifest.archive_bytes == summary["archive_bytes"] > 0


# -- local_initiator, parse_location -------------------------------------------------------
def test_local_initiator_reads_the_name(tmp_path: Path) -> None:
    f = tmp_path / "initiatorname.iscsi"
    f.write_text("## DO NOT EDIT OR REMOVE THIS FILE!\n"
                 "#InitiatorName=iqn.1993-08.org.debian:01:commented\n"
                 "\n"
                 "InitiatorName=iqn.2026-11.org.sanoffload.lab:px1\n")
    assert local_initiator(str(f)) == "iqn.2026-11.org.sanoffload.lab:px1"


def test_local_initiator_without_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file") as info:
        local_initiator(str(tmp_path / "missing"))
    assert info.value.hint == "install open-iscsi"
    assert info.value.exit_code == 2


def test_local_initiator_without_the_line(tmp_path: Path) -> None:
    f = tmp_path / "initiatorname.iscsi"
    f.write_text("# InitiatorName=iqn.x:commented\nInitiatorName=\n")
    with pytest.raises(ConfigError, match="no InitiatorName= line"):
        local_initiator(str(f))


@pytest.mark.parametrize("text,expected", [
    ("fs1:/srv/data", Location("fs1", "/srv/data")),
    ("root@fs1:/srv/data/", Location("root@fs1", "/srv/data")),
    ("[2001:db8::1]:/srv", Location("2001:db8::1", "/srv")),
    ("/srv/backups", Location(None, "/srv/backups")),
])
def test_parse_location(text: str, expected: Location) -> None:
    assert parse_location(text) == expected


@pytest.mark.parametrize("text", ["fs1", "fs1:srv", "-oProxyCommand=x:/srv", "fs1:/srv/../etc",
                                  ""])
def test_parse_location_refuses(text: str) -> None:
    with pytest.raises(UsageError):
        parse_location(text, "--store")


def test_location_text() -> None:
    assert str(Location("fs1", "/srv")) == "fs1:/srv"
    assert str(Location(None, "/srv")) == "/srv"


def test_a_failed_attach_stores_nothing_and_releases(lab: Lab, tree: Path) -> None:
    """stream_duplicate fails before streaming: the open put is dropped, the session released."""
    attach = FakeAttach(tree, fail=CommandError("iscsiadm exited 24: login failed"))
    with pytest.raises(CommandError, match="login failed"):
        lab.run(attach)
    assert lab.repo.list() == [] and no_leftovers(lab.repo)
    # asked once: had the duplicate become invalid, that would be the error to show
    assert lab.agent.ops("status") == [("status", "fs1-0a1b2c3d")]
    assert lab.agent.ops("release") == [("release", "fs1-0a1b2c3d")]
    assert lab.store_side.errors == [] and lab.agent_side.codes == [0]


def test_a_read_error_on_an_invalid_duplicate_is_reported_as_invalid(lab: Lab,
                                                                     tree: Path) -> None:
    """An overflowed snapshot fails the mount or the read with EIO: say what it really is."""
    attach = FakeAttach(tree, fail=CommandError("mount: /run/sanoffload/mnt/x: can't read "
                                                "superblock"))
    lab.agent.health = "invalid"
    with pytest.raises(DuplicateInvalidError, match="became invalid") as exc:
        lab.run(attach)
    assert isinstance(exc.value.__cause__, CommandError)
    assert lab.repo.list() == [] and no_leftovers(lab.repo)
    assert lab.agent.ops("release") == [("release", "fs1-0a1b2c3d")]


def test_a_zero_freeze_window_is_recorded(lab: Lab, tree: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    prepare = lab.agent.prepare

    def fast(*args: Any, **kwargs: Any) -> RawAnswer:
        answer = prepare(*args, **kwargs)
        answer.data["freeze_window_ms"] = 0.0  # round(window, 1) of a sub-0.05 ms freeze
        return answer

    monkeypatch.setattr(lab.agent, "prepare", fast)
    summary = lab.run(FakeAttach(tree), verify=False)
    assert summary["freeze_window_ms"] == 0.0
    assert lab.repo.list()[0].manifest.freeze_window_ms == 0.0



# -- held: the holding hooks' outputs ---------------------------------------------------------
BACKUP_LABEL = ("START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\n"
                "CHECKPOINT LOCATION: 0/2000060\nBACKUP METHOD: streamed\n"
                "LABEL: sanoffload\tfs1\n")


def test_the_holding_hooks_outputs_are_stored_with_the_backup(
        lab: Lab, tree: Path, capsys: pytest.CaptureFixture[str]) -> None:
    held = [{"hook": "/etc/sanoffload/hooks/pg-hold", "output": BACKUP_LABEL}]
    lab.agent.held = held
    lab.agent.warnings = ["hold hook /etc/sanoffload/hooks/app-hold failed (exit 1): gone"]
    summary = lab.run(FakeAttach(tree))
    assert summary["held"] == ["/etc/sanoffload/hooks/pg-hold"]
    assert summary["warnings"] == lab.agent.warnings  # exit 14 at the CLI, as for post-thaw
    [stored] = lab.repo.list()
    assert json.loads(stored.manifest_path.read_text())["held"] == held
    assert stored.manifest.held[0].output == BACKUP_LABEL
    # `sanoffload list --json` shows it as stored, newlines and tabs as they were
    assert cli.run(["list", "--store", str(lab.repo.root), "--json"]) == 0
    [row] = json.loads(capsys.readouterr().out)
    assert row["held"] == held
    lab.check_peers_done()


def test_an_answer_without_held_stores_a_manifest_without_it(lab: Lab, tree: Path) -> None:
    summary = lab.run(FakeAttach(tree))
    assert summary["held"] == []
    [stored] = lab.repo.list()
    assert "held" not in json.loads(stored.manifest_path.read_text())


@pytest.mark.hostile("proxy", "agent answers 'held' with an escape sequence in an output",
                     "protocol error (11); nothing attached or stored")
def test_held_with_an_escape_is_a_protocol_error(lab: Lab, tree: Path) -> None:
    lab.agent.held = [{"hook": "/h", "output": "label\x1b]0;owned\x07"}]
    attach = FakeAttach(tree)
    with pytest.raises(ProtocolError, match="held") as info:
        lab.run(attach)
    assert info.value.exit_code == 11
    assert attach.events == [] and lab.repo.list() == []
