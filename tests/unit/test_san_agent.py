"""SAN mode, agent side: fs1's agent freezes, asks a storage node over the real channel, thaws.

The storage node is the real :class:`~sanoffload.storage.node.StorageNode`
and :class:`~sanoffload.storage.service.StorageService` of
``test_storage_service`` (recorded LVM outputs, LIO in memory), reached by the
agent's :class:`~sanoffload.agent.remote.RemoteController` through
``in_process_connector``: the same requests and replies as over ssh. fs1's own
commands (``sync -f``, ``fsfreeze``) go to a FakeRunner; the freeze guard is
the quiesce tests' FakeGuard (no process).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest

from sanoffload.agent import config as agent_config
from sanoffload.agent.controller import Duplicate
from sanoffload.agent.journal import Journal, Resource, SessionRecord
from sanoffload.agent.remote import RemoteController
from sanoffload.agent.resolve import BackupObject, SanDisk, resolve
from sanoffload.agent.session import Agent
from sanoffload.channel.client import Connection, in_process_connector
from sanoffload.channel.messages import PrepareAnswer
from sanoffload.channel.protocol import Channel
from sanoffload.channel.server import Service, serve
from sanoffload.errors import (
    CommandError,
    ConfigError,
    DeadlineError,
    ProtocolError,
    RefusedError,
)
from sanoffload.kinds import DuplicateKind, ObjectKind, WhoFreezes
from sanoffload.storage.node import LIVE_CONNECTIONS
from sanoffload.storage.service import SPECS, StorageService
from sanoffload.testing import FakeRunner
from sanoffload.tools import lio
from tests.unit.fakes_agent import Clock, recorded_mount
from tests.unit.test_quiesce import FakeGuard
from tests.unit.test_resolve import LAB, lab
from tests.unit.test_storage_service import LUN, PX1, Node

pytestmark = pytest.mark.unit

MP = "/srv/lin"
PATH = "/srv/lin/dir"
T0 = 1_000_000.0


def agent_toml(tmp_path: Path, *, port: str = "p2", timeout_s: float = 5,
               nodes: str | None = None) -> str:
    nodes = nodes if nodes is not None else f"""
[storage_nodes.st1]
ssh = "root@st1"
timeout_s = {timeout_s}
"""
    return f"""
state_dir = "{tmp_path / 'fs1state'}"
run_dir = "{tmp_path / 'fs1run'}"
[portal]
address = "10.77.0.11"
{nodes}
[clients.px1]
initiators = ["{PX1}"]
roots = ["/srv"]
max_sessions = 2
san_port = "{port}"
"""


class SanResolver:
    """Every path is on fs1's disk /dev/sdb, LUN ``lin`` of st1."""

    def __init__(self, lun: str = LUN["lin"]) -> None:
        self.lun = lun

    def __call__(self, runner: Any, path: str, allowed_roots: Any, *,
                 duplicate_kind: str | None = None) -> BackupObject:
        return BackupObject(requested_path=path, real_path=path, kind=ObjectKind.DIRECTORY,
                            mount=recorded_mount("findmnt_lin"), lv=None, path_in_fs="dir",
                            duplicate_kind=None if duplicate_kind is None
                            else DuplicateKind.parse(duplicate_kind),
                            root="/srv", san=SanDisk(self.lun, "/dev/sdb"))


class San:
    """fs1's agent and st1's node, connected."""

    def __init__(self, tmp_path: Path, **toml: Any) -> None:
        self.st1 = Node(tmp_path)
        self.events: list[str] = []
        self.runner = FakeRunner()
        self.runner.on("sync", "-f", MP)
        # fs1's own LVM has no LV (its sweep for orphans of its own finds none)
        self.runner.on("lvs", stdout='{"report": [{"lv": []}]}')
        self.runner.on("fsfreeze", "--freeze", MP, action=lambda a: self.mark("freeze"))
        self.runner.on("fsfreeze", "--unfreeze", MP, action=lambda a: self.mark("thaw"))
        self.guard = FakeGuard(self.events)
        self.config = agent_config.parse(agent_toml(tmp_path, **toml), "agent.toml")
        self.remotes: list[RemoteController] = []
        self.agent = Agent(self.runner, self.config, host="fs1", clock=Clock(T0),
                           resolver=SanResolver(), remotes=self.remote,
                           guard_factory=self.guard.factory)

    def mark(self, what: str) -> None:
        self.events.append(f"{what} (st1 lvcreates: {len(self.st1.lvm('lvcreate'))})")

    def service(self) -> StorageService:
        svc = StorageService(self.st1.node, "fs1", sleep=self.st1.sleeps.append)
        self.st1.services.append(svc)
        return svc

    def remote(self, ref: agent_config.StorageNodeRef) -> RemoteController:
        ctl = RemoteController(ref, in_process_connector(lambda ch: serve(self.service(), ch),
                                                         peer="st1"))
        self.remotes.append(ctl)
        return ctl


@pytest.fixture
def san(tmp_path: Path) -> Iterator[San]:
    env = San(tmp_path)
    yield env
    env.agent.close()
    LIVE_CONNECTIONS.clear()


def test_prepare_freezes_here_duplicates_on_the_node_and_answers_its_port(san: San) -> None:
    answer = san.agent.prepare(PATH, PX1)
    # the duplicate was made on st1 while fs1 was frozen, and fs1 thawed right after
    assert [e for e in san.events if e.startswith(("freeze", "thaw"))] == [
        "freeze (st1 lvcreates: 0)", "thaw (st1 lvcreates: 1)"]
    assert san.st1.lvm("lvcreate")[0][-1] == "datavg/lin"
    # the answer is what st1 exposed on port p2, not fs1's own portal
    assert answer.portals == ["10.78.0.10:3261"] and answer.frozen_by is WhoFreezes.FSFREEZE
    assert answer.identifier == lio.naa_from_serial(answer.unit_serial)
    assert answer.duplicate_kind is DuplicateKind.SNAPSHOT and answer.fstype == "ext4"
    spec = san.st1.lio.exports[answer.target_iqn]
    assert (spec.initiator_iqn, spec.chap_user, spec.chap_secret) == (
        PX1, answer.chap_user, answer.chap_secret)
    assert spec.device == f"/dev/datavg/sanoffload-{answer.session_id}"
    # fs1 ran no LVM or LIO of its own
    assert {a[0] for a in san.runner.argvs()} == {"sync", "fsfreeze"}, san.runner.argvs()
    status = san.agent.status(answer.session_id)
    assert status["status"] == "healthy" and status["node"] == "st1"

    san.agent.release(answer.session_id)
    assert san.st1.journal() == [] and san.st1.lio.exports == {}
    assert san.st1.lvm("lvremove")[0][-1] == f"datavg/sanoffload-{answer.session_id}"
    assert list(Journal(san.config.state_dir)) == []


@pytest.mark.hostile("agent", "SAN mode: the proxy's port ID is not one the storage node has",
                     "refused (3) naming the node's ports; the duplicate made there is "
                     "discarded, fs1 thawed, no journal left")
def test_an_unknown_port_id_is_refused_and_nothing_is_left(tmp_path: Path) -> None:
    san = San(tmp_path, port="p9")
    with pytest.raises(RefusedError, match=r"no port p9 on this storage node \(ports: p1, p2\)"):
        san.agent.prepare(PATH, PX1)
    assert any(e.startswith("thaw") for e in san.events)
    assert san.st1.journal() == [] and san.st1.lio.exports == {}
    assert san.st1.lvm("lvremove"), "the duplicate made before the refusal was not discarded"
    assert list(Journal(san.config.state_dir)) == []
    san.agent.close()
    LIVE_CONNECTIONS.clear()


@pytest.mark.hostile("agent", "SAN mode: the storage node does not answer 'duplicate' while "
                              "fs1 is frozen", "DeadlineError (6) after timeout_s; fs1 thawed; "
                                               "nothing journaled on either side")
def test_a_node_that_does_not_answer_is_cut_off_at_its_deadline(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    san = San(tmp_path, timeout_s=0.3)
    stuck = threading.Event()
    handle = StorageService.handle

    def hang(self: StorageService, op: str, fields: dict[str, Any], ch: Channel) -> Any:
        if op == "duplicate":
            stuck.wait(30)  # a node hung before it made anything
        return handle(self, op, fields, ch)

    monkeypatch.setattr(StorageService, "handle", hang)
    try:
        with pytest.raises(DeadlineError, match="storage node st1 did not answer duplicate "
                                                "within 0.3 s"):
            san.agent.prepare(PATH, PX1)
        assert [e for e in san.events if e.startswith(("freeze", "thaw"))] == [
            "freeze (st1 lvcreates: 0)", "thaw (st1 lvcreates: 0)"]
        assert list(Journal(san.config.state_dir)) == []
    finally:
        stuck.set()
        san.agent.close()
        LIVE_CONNECTIONS.clear()


def test_cleanup_releases_an_interrupted_remote_duplicate_by_its_name(san: San) -> None:
    """The agent died after asking st1 for a duplicate and before the reply: its journal
    holds the name only (no VG, no kind); st1 has made it. cleanup finds it by the name."""
    sid = "fs1-0000c0de"
    name = f"sanoffload-{sid}"
    with san.st1.connect() as other:  # the dead agent's connection
        other.call("duplicate", lun=LUN["lin"], name=name)
        Journal(san.config.state_dir).save(SessionRecord(
            session_id=sid, client="px1", initiator=PX1, path=PATH, created=T0,
            lease_expires=T0 + 60, state="preparing", info={"node": "st1", "pid": 0},
            resources=[Resource("storage-duplicate", {"node": "st1", "vg": "", "name": name,
                                                      "origin": "", "made_kind": "",
                                                      "lun": LUN["lin"]})]))
        report = san.agent.cleanup()
    assert report["released"] == [sid]
    assert san.st1.journal() == [] and san.st1.lvm("lvremove")[0][-1] == f"datavg/{name}"
    assert list(Journal(san.config.state_dir)) == []


def test_the_agent_sweep_asks_the_node_and_keeps_what_it_exposed(san: San) -> None:
    answer = san.agent.prepare(PATH, PX1)
    report = san.agent.cleanup()
    assert report == {"released": [], "orphans_removed": []}
    assert len(san.st1.journal()) == 1  # the ready, exposed session is kept
    san.agent.release(answer.session_id)


@pytest.mark.hostile("agent", "a path on a SAN disk (an NAA identifier) with no storage node "
                              "configured", "refused (3) naming the disk and its identifier")
def test_a_san_disk_no_node_serves_is_refused(tmp_path: Path) -> None:
    config = agent_config.parse(agent_toml(tmp_path, nodes=""), "agent.toml")
    agent = Agent(FakeRunner(), config, host="fs1", resolver=SanResolver())
    with pytest.raises(RefusedError, match=rf"/dev/sdb, a SAN disk \(identifier "
                                           rf"{LUN['lin']}\) that no storage node"):
        agent.prepare(PATH, PX1)
    assert list(Journal(config.state_dir)) == []


# -- resolve ------------------------------------------------------------------

class FakeDisks:
    def __init__(self, answer: SanDisk | str | None) -> None:
        self.answer = answer
        self.asked: list[tuple[int, int]] = []

    def san_disk(self, major: int, minor: int) -> SanDisk | str | None:
        self.asked.append((major, minor))
        return self.answer


def test_resolve_names_a_path_on_a_whole_san_disk_by_its_identifier() -> None:
    disks = FakeDisks(SanDisk(LUN["lin"], "/dev/sdb"))
    obj = resolve(lab(), "/srv/plain", ["/srv"], fs=LAB, disks=disks)
    assert (obj.lv, obj.san, obj.volume) == (None, SanDisk(LUN["lin"], "/dev/sdb"), LUN["lin"])
    assert obj.duplicate_kind is None and disks.asked == [(254, 49)]
    kind = resolve(lab(), "/srv/plain", ["/srv"], fs=LAB, disks=disks,
                   duplicate_kind="thin-snapshot").duplicate_kind
    assert kind is DuplicateKind.THIN_SNAPSHOT  # the node checks it fits


@pytest.mark.hostile("agent", "a path on a partition of a SAN disk",
                     "refused (3): the duplicate is the whole LUN")
def test_resolve_refuses_a_partition_of_a_san_disk() -> None:
    with pytest.raises(RefusedError, match="not a logical volume nor a storage node's LUN "
                                           r"\(/dev/sdb1 is a partition"):
        resolve(lab(), "/srv/plain", ["/srv"], fs=LAB,
                disks=FakeDisks("/dev/sdb1 is a partition of a SAN disk; ..."))


def test_resolve_refuses_a_disk_that_is_neither() -> None:
    with pytest.raises(RefusedError, match=r"not on LVM: /srv/plain is mounted from /dev/vdd1 "
                                           r"\(254:49\), not a logical volume nor"):
        resolve(lab(), "/srv/plain", ["/srv"], fs=LAB, disks=FakeDisks(None))


# -- the remote controller checks every reply ------------------------------------

class Liar(Service):
    """A storage node that answers expose with something other than what was asked."""

    name = "storage"
    specs = SPECS

    def __init__(self, export: dict[str, Any]) -> None:
        self.export = export

    def handle(self, op: str, fields: dict[str, Any], channel: Channel) -> dict[str, Any]:
        return {"export": self.export}


def _liar(export: dict[str, Any]) -> RemoteController:
    ref = agent_config.StorageNodeRef("st1", "root@st1", timeout_s=5)
    return RemoteController(ref, in_process_connector(lambda ch: serve(Liar(export), ch)))


SPEC = lio.ExportSpec(session_id="fs1-0000000a", device="", target_iqn=lio.target_iqn_for(
    "fs1-0000000a"), initiator_iqn=PX1, portal_ip="", chap_user="u", chap_secret="s" * 16,
    serial="ea0c139e-cf01-4536-b143-859e35718396", port="p1")
DUP = Duplicate(DuplicateKind.SNAPSHOT, "datavg", "sanoffload-fs1-0000000a", "lin")
GOOD = {"target_iqn": SPEC.target_iqn, "portal_ip": "10.77.0.10", "portal_port": 3260,
        "lun": 0, "identifier": lio.naa_from_serial(SPEC.serial), "serial": SPEC.serial}


def test_a_truthful_expose_reply_is_taken() -> None:
    ctl = _liar(GOOD)
    try:
        export = ctl.expose(DUP, SPEC)
    finally:
        ctl.close()
    assert (export.portal_ip, export.identifier) == ("10.77.0.10", GOOD["identifier"])


@pytest.mark.hostile("agent", "a storage node answers expose with another identifier, target, "
                              "serial, a port out of range or a portal that is no address",
                     "protocol error (11): the proxy is never sent to an unchecked disk")
@pytest.mark.parametrize("bad", [
    {"identifier": "naa.6001405" + "0" * 25},
    {"target_iqn": "iqn.2026-11.org.sanoffload:fs1-0000000b"},
    {"serial": "00000000-cf01-4536-b143-859e35718396"},
    {"portal_port": 70000},
    {"portal_ip": "st1; rm -rf /"},
    {"identifier": "\x1b[31mnaa"},
])
def test_a_lying_expose_reply_is_refused(bad: dict[str, Any]) -> None:
    ctl = _liar({**GOOD, **bad})
    try:
        with pytest.raises(ProtocolError):
            ctl.expose(DUP, SPEC)
    finally:
        ctl.close()


def test_kill_ends_an_in_process_connection() -> None:
    """What the deadline relies on: kill() makes the reader see the end of the stream."""
    release = threading.Event()
    conn: Connection = in_process_connector(lambda ch: release.wait(10))()
    conn.kill()
    assert conn.channel.recv() is None
    release.set()
    conn.close()


# -- config ----------------------------------------------------------------------

@pytest.mark.hostile("agent", "agent.toml: an ssh destination that is an option, two nodes "
                              "without luns, a LUN on two nodes, a client without san_port",
                     "ConfigError naming the key")
@pytest.mark.parametrize(("nodes", "port", "match"), [
    ('[storage_nodes.st1]\nssh = "-oProxyCommand=sh"\n', "p1", r"storage_nodes.st1.ssh"),
    ('[storage_nodes.st1]\nssh = "st1"\n[storage_nodes.st2]\nssh = "st2"\n', "p1",
     r"storage_nodes.st1.luns: required with more than one storage node"),
    ((f'[storage_nodes.st1]\nssh = "st1"\nluns = ["{LUN["lin"]}"]\n'
      f'[storage_nodes.st2]\nssh = "st2"\nluns = ["{LUN["lin"].replace("naa.", "NAA.")}"]\n'),
     "p1", "already served by 'st1'"),
    ('[storage_nodes.st1]\nssh = "st1"\nluns = ["wwn-0x1"]\n', "p1",
     r"storage_nodes.st1.luns\[0\]"),
    ('[storage_nodes.st1]\nssh = "st1"\ntimeout_s = 0\n', "p1", "timeout_s"),
])
def test_storage_nodes_config_errors(tmp_path: Path, nodes: str, port: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        agent_config.parse(agent_toml(tmp_path, nodes=nodes, port=port), "agent.toml")


def test_storage_nodes_require_each_clients_san_port(tmp_path: Path) -> None:
    text = agent_toml(tmp_path).replace('san_port = "p2"\n', "")
    with pytest.raises(ConfigError, match=r"clients.px1.san_port: required with storage_nodes"):
        agent_config.parse(text, "agent.toml")


def test_which_node_serves_a_lun(tmp_path: Path) -> None:
    two = agent_config.parse(agent_toml(tmp_path, nodes=(
        f'[storage_nodes.st1]\nssh = "st1"\nluns = ["{LUN["lin"]}"]\n'
        f'[storage_nodes.st2]\nssh = "root@st2"\nidentity = "/etc/sanoffload/id"\n'
        f'luns = ["{LUN["thin"]}"]\n')), "agent.toml")
    assert two.storage_node_for(LUN["thin"]).name == "st2"  # type: ignore[union-attr]
    assert two.storage_node_for(LUN["r1"]) is None
    assert two.storage_nodes["st2"].ssh_options() == ("-i", "/etc/sanoffload/id",
                                                      "-o", "IdentitiesOnly=yes")
    one = agent_config.parse(agent_toml(tmp_path), "agent.toml")
    assert one.storage_node_for(LUN["r1"]).name == "st1"  # type: ignore[union-attr]


class Dies(Service):
    """A storage node whose service dies in the middle of a request."""

    name = "storage"
    specs = SPECS

    def handle(self, op: str, fields: dict[str, Any], channel: Channel) -> dict[str, Any]:
        channel.close()
        raise SystemExit(0)


@pytest.mark.hostile("agent", "SAN mode: the storage node's service dies during a request",
                     "CommandError (5) naming the node and the request; the next request "
                     "reconnects")
def test_a_node_that_dies_mid_request_is_a_clear_command_error() -> None:
    ref = agent_config.StorageNodeRef("st1", "root@st1", timeout_s=5)

    def run(ch: Channel) -> None:
        try:
            serve(Dies(), ch)
        except SystemExit:
            pass

    ctl = RemoteController(ref, in_process_connector(run))
    try:
        with pytest.raises(CommandError, match="storage node st1: the connection ended during "
                                               "health"):
            ctl.health(DUP)
        assert ctl._client is None  # dropped: the next request connects anew
    finally:
        ctl.close()


# -- a consistency group on st1 ------------------------------------------------------

class GroupResolver:
    """/srv/lin/dir is on LUN lin, /srv/thin/dir on LUN r1 (two filesystems on fs1)."""

    PLACES: ClassVar[dict[str, tuple[str, str]]] = {
        "/srv/lin/dir": ("findmnt_lin", "lin"), "/srv/thin/dir": ("findmnt_thin", "r1"),
        "/srv/lin/other": ("findmnt_lin", "lin")}

    def __call__(self, runner: Any, path: str, allowed_roots: Any, *,
                 duplicate_kind: str | None = None) -> BackupObject:
        mount, lun = self.PLACES[path]
        return BackupObject(requested_path=path, real_path=path, kind=ObjectKind.DIRECTORY,
                            mount=recorded_mount(mount), lv=None, path_in_fs="dir",
                            duplicate_kind=None, root="/srv",
                            san=SanDisk(LUN[lun], f"/dev/sd{lun[0]}"))


def _group(tmp_path: Path) -> San:
    env = San(tmp_path)
    env.agent.resolve = GroupResolver()
    def note(what: str) -> Callable[[list[str]], None]:
        return lambda argv: env.events.append(
            f"{what} {argv[-1]} (st1 duplicates: {len(env.st1.journal())})")

    env.runner.on("fsfreeze", "--freeze", action=note("freeze"))
    env.runner.on("fsfreeze", "--unfreeze", action=note("thaw"))
    env.runner.on("sync", "-f")
    return env


def test_a_group_is_frozen_together_duplicated_on_st1_and_exposed_as_luns_of_one_target(
        tmp_path: Path) -> None:
    san = _group(tmp_path)
    try:
        answer = san.agent.prepare("/srv/lin/dir", PX1, also=["/srv/thin/dir"])
        mounts = ("/srv/lin", "/srv/thin")
        assert [e for e in san.events if e.startswith(("freeze", "thaw"))] == [
            f"freeze {mounts[0]} (st1 duplicates: 0)", f"freeze {mounts[1]} (st1 duplicates: 0)",
            f"thaw {mounts[1]} (st1 duplicates: 2)", f"thaw {mounts[0]} (st1 duplicates: 2)"]
        assert [(m.path, m.lun, m.duplicate_kind.value) for m in answer.members] == [
            ("/srv/lin/dir", 0, "snapshot"), ("/srv/thin/dir", 1, "raid1-split")]
        assert (answer.lun, answer.identifier) == (0, answer.members[0].identifier)
        # both LUNs in the one target (the fake LIO keeps the last spec per target), behind
        # one CHAP pair, each its own backstore
        [spec] = san.st1.lio.exports.values()
        assert (spec.target_iqn, spec.lun) == (answer.target_iqn, 1)
        assert (spec.chap_user, spec.chap_secret) == (answer.chap_user, answer.chap_secret)
        sid = answer.session_id
        host, tail = sid.rsplit("-", 1)
        assert {f"sanoffload-{sid}", f"sanoffload-{host}-g1-{tail}"} <= set(
            san.st1.lio.backstore_names)
        wire = answer.to_wire()
        assert type(answer).from_wire(wire).members == answer.members
        # (status asks each member's health; the recorded lvs here knows one LV set at a time)
        san.agent.release(sid)
        assert san.st1.journal() == [] and san.st1.lio.exports == {}
        assert list(Journal(san.config.state_dir)) == []
    finally:
        san.agent.close()
        LIVE_CONNECTIONS.clear()


@pytest.mark.hostile("agent", "a consistency group naming two paths on one filesystem, or "
                              "one path inside another", "refused (3) before anything is frozen")
def test_a_group_with_two_paths_on_one_filesystem_is_refused(tmp_path: Path) -> None:
    san = _group(tmp_path)
    try:
        with pytest.raises(RefusedError, match="are on one filesystem"):
            san.agent.prepare("/srv/lin/dir", PX1, also=["/srv/lin/other"])
        assert san.events == [] and san.st1.journal() == []
        assert list(Journal(san.config.state_dir)) == []
    finally:
        san.agent.close()
        LIVE_CONNECTIONS.clear()


@pytest.mark.hostile("agent", "the node is asked to expose a duplicate in another session's "
                              "target, posing as a group member", "refused (3), nothing exported")
def test_the_node_takes_a_group_target_only_from_the_same_client(san: San) -> None:
    with san.st1.connect() as fs1:
        first = fs1.call("duplicate", lun=LUN["lin"], name="sanoffload-fs1-0000aaaa")["duplicate"]
        member = fs1.call("duplicate", lun=LUN["r1"],
                          name="sanoffload-fs1-g1-0000bbbb")["duplicate"]
        fields = {"initiator": PX1, "port": "p1", "userid": "sanoffload-fs1-0000aaaa",
                  "password": "s3cretCHAPpass99", "lun": 1,
                  "serial": "ea0c139e-cf01-4536-b143-859e35718396"}
        # g1-0000bbbb is no member of group 0000aaaa: its group would be 0000bbbb
        with pytest.raises(RefusedError, match="not this duplicate's"):
            fs1.call("expose", duplicate=member,
                     target_iqn=lio.target_iqn_for("fs1-0000aaaa"),
                     backstore=lio.backstore_name_for("fs1-g1-0000bbbb"), **fields)
        assert san.st1.lio.exports == {}
        fs1.call("discard", duplicate=member)
        fs1.call("discard", duplicate=first)


@pytest.mark.hostile("agent", "SAN: san_port with a space or a number",
                     "ConfigError naming clients.px1.san_port")
@pytest.mark.parametrize("port", ['"p 1"', "1"])
def test_a_malformed_san_port_is_refused(tmp_path: Path, port: str) -> None:
    text = agent_toml(tmp_path).replace('san_port = "p2"', f"san_port = {port}")
    with pytest.raises(ConfigError, match=r"clients.px1.san_port: port IDs are"):
        agent_config.parse(text, "agent.toml")


def _group_wire(**member1: Any) -> dict[str, Any]:
    identifier = lio.naa_from_serial(SPEC.serial)
    other = lio.naa_from_serial("00000000-cf01-4536-b143-859e35718396")
    first = {"path": "/srv/san/db", "path_in_fs": ".", "fstype": "ext4",
             "object_kind": "directory", "duplicate_kind": "snapshot", "lun": 0,
             "identifier": identifier, "unit_serial": SPEC.serial}
    second = {**first, "path": "/srv/san/log", "lun": 1, "identifier": other,
              "unit_serial": "00000000-cf01-4536-b143-859e35718396", **member1}
    return {"session_id": "fs1-0000000a", "target_iqn": SPEC.target_iqn,
            "portals": ["10.77.0.10:3260"], "lun": 0, "identifier": identifier,
            "unit_serial": SPEC.serial, "chap_user": "sanoffload-fs1-0000000a",
            "chap_secret": "s" * 16, "fstype": "ext4", "path_in_fs": ".",
            "object_kind": "directory", "duplicate_kind": "snapshot", "freeze_window_ms": 1.0,
            "frozen_by": "fsfreeze", "lease_expires": 2e9, "members": [first, second]}


def test_a_group_answer_reads_back() -> None:
    answer = PrepareAnswer.from_wire(_group_wire())
    assert [m.archive_name for m in answer.members] == ["srv/san/db", "srv/san/log"]


@pytest.mark.hostile("channel", "a group answer whose members share a LUN or identifier, nest, "
                                "name a relative path or '..', or carry an escape",
                     "protocol error (11) before any login")
@pytest.mark.parametrize("bad", [
    {"lun": 0}, {"identifier": lio.naa_from_serial(SPEC.serial)},
    {"path": "/srv/san/db/inner"}, {"path": "srv/san/log"}, {"path": "/srv/../etc"},
    {"path": "/srv/\x1b[2Jlog"}, {"object_kind": "socket"},
])
def test_a_malformed_group_answer_is_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError):
        PrepareAnswer.from_wire(_group_wire(**bad))


def test_a_member_session_id_leads_back_to_its_group() -> None:
    from sanoffload.agent.session import group_session_id, member_session_id

    assert member_session_id("fs1-0000aaaa", 0) == "fs1-0000aaaa"
    assert group_session_id(member_session_id("fs1-0000aaaa", 3)) == "fs1-0000aaaa"
    assert group_session_id("fs1-0000aaaa") is None  # a group's own id names no member
