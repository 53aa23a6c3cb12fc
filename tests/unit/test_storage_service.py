"""The storage node's service (``storage serve``) over the real channel, on recorded LVM outputs.

LVM answers come from the FakeRunner fed with the lab's recorded outputs
(tests/fixtures/recorded); LIO is :class:`FakeLio`, an in-memory exporter
holding the node's production backstores (as rtslib-fb would list them) and
what the node exports. Device numbers come from an injected ``stat``. Each
test talks to a :class:`~sanoffload.storage.service.StorageService` through
``in_process_connector`` and the channel's :class:`Client`, as the agent's
RemoteController will.
"""

from __future__ import annotations

import json
import os
import stat
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sanoffload.agent.journal import Journal, Resource, SessionRecord
from sanoffload.channel.client import Client, in_process_connector
from sanoffload.channel.server import serve
from sanoffload.errors import (
    AuthError,
    LioError,
    ProtocolError,
    RefusedError,
    ResourceError,
    UsageError,
)
from sanoffload.storage import config as storage_config
from sanoffload.storage.node import LIVE_CONNECTIONS, StorageNode
from sanoffload.storage.service import StorageService
from sanoffload.testing import FakeRunner
from sanoffload.tools import lio

from .recorded import feed, load

pytestmark = pytest.mark.unit

PX1 = "iqn.2026-11.org.sanoffload.lab:px1"
PX2 = "iqn.2026-11.org.sanoffload.lab:px2"
#: unit serials of the node's production backstores (what fs1's udev sees as wwids)
SERIALS = {"lin": "5e2b7c1a-0d4f-4a8e-9b3c-1f2e3d4c5b6a",
           "thin": "0b9f1e2d-3c4b-4a59-8687-96a5b4c3d2e1",
           "r1": "7a6b5c4d-3e2f-4011-8223-344556677889",
           "m1": "c0ffee00-1234-4567-89ab-cdef01234567",
           "sdb": "d15c0000-aaaa-4bbb-8ccc-dddddddddddd"}
LUN = {name: lio.naa_from_serial(serial) for name, serial in SERIALS.items()}
#: backstore device -> (major, minor), as lvs_all.out reports datavg's LVs; sdb is a disk
DEVICES = {"/dev/datavg/lin": (253, 0), "/dev/datavg/thin": (253, 5),
           "/dev/datavg/r1": (253, 10), "/dev/datavg/m1": (253, 13), "/dev/sdb": (8, 16)}
SID = "fs1-0000000a"
NAME = f"sanoffload-{SID}"
SECRET = "s3cretCHAPpass99"
GRACE = 5.0


class RTSLibError(Exception):
    """Stands in for rtslib_fb's RTSLibError (a fake module, not a mock of the tool)."""


def _so(name: str, device: str, serial: str, *, readonly: bool = False) -> Any:
    return types.SimpleNamespace(name=name, plugin="block", udev_path=device, wwn=serial,
                                 readonly=readonly, path=f"/nonexistent/core/iblock_0/{name}",
                                 attached_luns=[])


class FakeLio(lio.LioExporter):
    """LIO in memory: the production backstores, and the exports the node makes."""

    def __init__(self) -> None:
        self.root = types.SimpleNamespace(targets=[], storage_objects=[
            _so("fs1-data", "/dev/datavg/lin", SERIALS["lin"]),
            _so("fs1-thin", "/dev/datavg/thin", SERIALS["thin"]),
            _so("fs1-raid", "/dev/datavg/r1", SERIALS["r1"]),
            _so("fs2-data", "/dev/datavg/m1", SERIALS["m1"]),
            _so("fs1-disk", "/dev/sdb", SERIALS["sdb"]),
            types.SimpleNamespace(name="iso", plugin="fileio", udev_path="/srv/x.iso",
                                  wwn="x", readonly=True, path="/nonexistent", attached_luns=[]),
        ])
        module = types.ModuleType("fake_rtslib")
        module.RTSRoot = lambda: self.root  # type: ignore[attr-defined]
        module.RTSLibError = RTSLibError  # type: ignore[attr-defined]
        super().__init__(module)
        self.exports: dict[str, lio.ExportSpec] = {}

    def export(self, spec: lio.ExportSpec) -> lio.Export:
        self.exports[spec.target_iqn] = spec
        self.root.storage_objects.append(_so(spec.backstore, spec.device, spec.serial,
                                             readonly=True))
        return lio.Export(spec.target_iqn, spec.portal_ip, spec.portal_port, spec.lun,
                          spec.serial, lio.naa_from_serial(spec.serial), spec.backstore)

    def identify(self, target_iqn: str, lun: int = 0) -> str:
        spec = self.exports.get(target_iqn)
        if spec is None or spec.lun != lun:
            raise LioError(f"LIO has no target {target_iqn} lun {lun}")
        return lio.naa_from_serial(spec.serial)

    def unexport(self, target_iqn: str, backstore: str) -> list[str]:
        removed = []
        if self.exports.pop(target_iqn, None) is not None:
            removed.append(f"target {target_iqn}")
        before = len(self.root.storage_objects)
        self.root.storage_objects = [so for so in self.root.storage_objects
                                     if so.name != backstore]
        if len(self.root.storage_objects) < before:
            removed.append(f"backstore {backstore}")
        return removed

    def ours(self) -> dict[str, list[str]]:
        return {"targets": sorted(self.exports),
                "backstores": [so.name for so in self.root.storage_objects
                               if so.name.startswith(lio.BACKSTORE_PREFIX)]}

    @property
    def backstore_names(self) -> list[str]:
        return [so.name for so in self.root.storage_objects]


def fake_stat(path: str) -> os.stat_result:
    if path not in DEVICES:
        raise FileNotFoundError(2, "No such file or directory", path)
    major, minor = DEVICES[path]
    # st_rdev is not among the ten fields of the tuple: it comes in the attribute dict
    fields = [stat.S_IFBLK | 0o660, 1, 6, 1, 0, 6, 0, 0, 0, 0]
    return os.stat_result(fields, {"st_rdev": os.makedev(major, minor)})


def lvm_runner() -> FakeRunner:
    """lvs/vgs/lvcreate/lvremove/lvconvert answered with the lab's recorded outputs; after a
    snapshot or split, lvs lists it (the recording, with the new name)."""
    runner = FakeRunner()
    feed(runner, "lvs", "lvs_all")
    feed(runner, "vgs", "vgs")

    def lvs_now(recording: str, made: str = "") -> None:
        # lvs_overflow's healthy snapshot sanoffload-snap2, renamed to what was made
        out, err, rc = load(recording)
        if made:
            out = out.replace("sanoffload-snap2", made)
        runner.on("lvs", stdout=out, stderr=err, returncode=rc)

    out, err, rc = load("lvcreate_snap")
    runner.on("lvcreate", stdout=out, stderr=err, returncode=rc,
              action=lambda argv: lvs_now("lvs_overflow", argv[argv.index("--name") + 1]))
    out, err, rc = load("lvconvert_split")
    runner.on("lvconvert", "--yes", "--splitmirrors", stdout=out, stderr=err, returncode=rc,
              action=lambda argv: lvs_now("lvs_split"))
    feed(runner, ("lvconvert", "--yes", "--merge"), "lvconvert_merge")
    out, err, rc = load("lvremove_snap")
    runner.on("lvremove", stdout=out, stderr=err, returncode=rc,
              action=lambda argv: lvs_now("lvs_all"))
    runner.on("dmsetup", "info", stdout="0\n")
    runner.on("dmsetup", "remove", returncode=0)
    return runner


def make_config(tmp_path: Path, extra: str = "") -> storage_config.StorageConfig:
    return storage_config.parse(f"""
state_dir = "{tmp_path / 'state'}"
grace_s = {GRACE}
{extra}
[ports.p1]
address = "10.77.0.10"
[ports.p2]
address = "10.78.0.10"
port = 3261

[clients.fs1]
luns = ["{LUN['lin']}", "{LUN['thin']}", "{LUN['r1']}", "{LUN['sdb']}"]
proxies = ["{PX1}"]
max_sessions = 2

[clients.fs2]
luns = ["{LUN['m1']}"]
proxies = ["{PX2}"]
""", "storage.toml")


class StorageClient(Client):
    service = "storage"


class Node:
    """One storage node (runner, LIO, journal) and connections to it."""

    def __init__(self, tmp_path: Path) -> None:
        self.runner = lvm_runner()
        self.lio = FakeLio()
        self.config = make_config(tmp_path)
        self.node = StorageNode(self.runner, self.config, exporter=self.lio, stat_fn=fake_stat,
                                host="st1")
        self.sleeps: list[float] = []
        self.services: list[StorageService] = []

    def connect(self, client: str = "fs1") -> StorageClient:
        service = StorageService(self.node, client, sleep=self.sleeps.append)
        self.services.append(service)
        return StorageClient(in_process_connector(lambda ch: serve(service, ch), peer="st1"),
                             name="st1")

    def journal(self) -> list[SessionRecord]:
        return list(self.node.journal)

    def lvm(self, verb: str) -> list[list[str]]:
        return [a for a in self.runner.argvs() if a[0] == verb]


@pytest.fixture
def st1(tmp_path: Path) -> Iterator[Node]:
    node = Node(tmp_path)
    yield node
    LIVE_CONNECTIONS.clear()


def expose_fields(dup: dict[str, Any], **over: Any) -> dict[str, Any]:
    fields = {"duplicate": dup, "initiator": PX1, "port": "p2",
              "target_iqn": lio.target_iqn_for(SID), "backstore": lio.backstore_name_for(SID),
              "serial": "ea0c139e-cf01-4536-b143-859e35718396", "userid": f"sanoffload-{SID}",
              "password": SECRET, "lun": 0}
    fields.update(over)
    return fields


def test_round_trip_duplicate_expose_identify_health_unexpose_discard(st1: Node) -> None:
    with st1.connect() as fs1:
        assert fs1.peer.service == "storage" and fs1.peer.info["client"] == "fs1"
        reply = fs1.call("duplicate", lun=LUN["lin"], kind=None, name=NAME)
        dup = reply["duplicate"]
        assert dup == {"kind": "snapshot", "vg": "datavg", "name": NAME, "origin": "lin"}
        assert isinstance(reply["took_ms"], float) and reply["took_ms"] >= 0
        [lvcreate] = st1.lvm("lvcreate")
        assert lvcreate[-1] == "datavg/lin" and lvcreate[-3:-1] == ["--addtag", "sanoffload"]

        export = fs1.call("expose", **expose_fields(dup))["export"]
        identifier = lio.naa_from_serial("ea0c139e-cf01-4536-b143-859e35718396")
        assert export == {"target_iqn": lio.target_iqn_for(SID), "portal_ip": "10.78.0.10",
                          "portal_port": 3261, "lun": 0, "identifier": identifier,
                          "serial": "ea0c139e-cf01-4536-b143-859e35718396"}
        spec = st1.lio.exports[lio.target_iqn_for(SID)]
        assert (spec.device, spec.initiator_iqn, spec.chap_secret) == (
            f"/dev/datavg/{NAME}", PX1, SECRET)
        assert fs1.call("identify", target_iqn=export["target_iqn"], lun=0) == {
            "ok": True, "identifier": identifier}
        assert fs1.call("health", duplicate=dup)["health"] == "healthy"
        # the CHAP secret is never written down
        files = list((Path(st1.config.state_dir) / "sessions").glob("*.json"))
        assert files and all(SECRET not in f.read_text() for f in files)

        removed = fs1.call("unexpose", target_iqn=export["target_iqn"],
                           backstore=lio.backstore_name_for(SID))["removed"]
        assert removed == [f"target {lio.target_iqn_for(SID)}",
                           f"backstore {lio.backstore_name_for(SID)}"]
        assert fs1.call("discard", duplicate=dup)["removed"]
        assert st1.lvm("lvremove")[0][-1] == f"datavg/{NAME}"
        assert fs1.call("health", duplicate=dup)["health"] == "missing"
        # idempotent: gone is gone
        assert fs1.call("discard", duplicate=dup)["removed"] == []
        assert fs1.call("discard_partial", duplicate=dup)["removed"] == []
    assert st1.journal() == [] and st1.lio.exports == {} and st1.sleeps == []


def test_raid1_split_is_found_by_the_image_name_it_answered(st1: Node) -> None:
    with st1.connect() as fs1:
        dup = fs1.call("duplicate", lun=LUN["r1"], name=NAME)["duplicate"]
        assert dup == {"kind": "raid1-split", "vg": "datavg", "name": "r1_rimage_1",
                       "origin": "r1"}
        assert fs1.call("health", duplicate=dup)["health"] == "healthy"
        fs1.call("discard", duplicate=dup)
        assert ["lvconvert", "--yes", "--merge", "datavg/r1_rimage_1"] in st1.runner.argvs()
    assert st1.journal() == []


def test_a_dropped_connection_is_released_after_the_grace_period(st1: Node) -> None:
    fs1 = st1.connect()
    fs1.call("duplicate", lun=LUN["lin"], name=NAME)
    assert len(st1.journal()) == 1
    fs1.close()  # the first server vanished between freeze and answer
    assert st1.sleeps == [GRACE]
    assert st1.journal() == [] and st1.lio.exports == {}
    assert st1.lvm("lvremove")[0][-1] == f"datavg/{NAME}"


def test_an_exposed_duplicate_outlives_the_connection_until_the_client_releases_it(
        st1: Node) -> None:
    fs1 = st1.connect()
    dup = fs1.call("duplicate", lun=LUN["lin"], name=NAME)["duplicate"]
    fs1.call("expose", **expose_fields(dup))
    fs1.close()  # a one-shot 'agent prepare': the agent's journal holds the session now
    assert len(st1.journal()) == 1 and st1.lvm("lvremove") == []
    with st1.connect() as again:
        assert again.call("cleanup")["removed"] == []  # the client's sweep keeps it too
        # and so does the node's own (the lease timer's storage cleanup), until its lease ends
        # (its orphan pass takes the recording's stray sanoffload-snap* LVs, not ours)
        assert st1.node.cleanup()["released"] == [] and st1.lio.exports != {}
        assert [f"datavg/{NAME}"] not in [a[-1:] for a in st1.lvm("lvremove")]
        again.call("discard", duplicate=dup)
    assert st1.journal() == [] and st1.lio.exports == {}
    assert st1.lvm("lvremove")[-1][-1] == f"datavg/{NAME}"


def _stale(node: Node, sid: str, client: str) -> None:
    """A record a killed serve process left: its duplicate made, its connection gone."""
    Journal(node.config.state_dir).save(SessionRecord(
        session_id=sid, client=client, initiator="", path=LUN["lin"], state="ready",
        lease_expires=4e9, info={"pid": os.getpid(), "conn": "ended"},
        resources=[Resource("snapshot", {"vg": "datavg", "name": f"sanoffload-{sid}",
                                         "origin": "lin", "requested": f"sanoffload-{sid}"},
                            state="created")]))


def test_cleanup_releases_only_this_clients_records_no_connection_holds(st1: Node) -> None:
    _stale(st1, "fs1-000000b1", "fs1")
    _stale(st1, "fs2-000000b2", "fs2")
    with st1.connect() as live:
        live.call("duplicate", lun=LUN["lin"], name=NAME)
        with st1.connect() as other:
            removed = other.call("cleanup")["removed"]
        assert len(removed) == 1 and "sanoffload-fs1-000000b1" in removed[0]
        assert sorted(r.session_id for r in st1.journal()) == sorted(["fs2-000000b2", SID])
        live.call("discard", duplicate={"kind": "snapshot", "vg": "", "name": NAME,
                                        "origin": ""})
    assert [r.session_id for r in st1.journal()] == ["fs2-000000b2"]


def test_node_cleanup_releases_what_no_connection_holds_and_orphans(st1: Node) -> None:
    _stale(st1, "fs2-000000b2", "fs2")
    # a crash left a backstore of ours and tagged snapshots (lvs_overflow) no record names
    st1.lio.root.storage_objects.append(_so("sanoffload-fs1-0000dead", "/dev/datavg/x",
                                            lio.new_serial(), readonly=True))
    feed(st1.runner, "lvs", "lvs_overflow")
    feed(st1.runner, "lvremove", "lvremove_snap")  # lvs keeps answering lvs_overflow
    report = st1.node.cleanup()
    assert report["released"] == ["fs2-000000b2"] and st1.journal() == []
    assert sorted(report["orphans_removed"]) == [
        "LIO backstore sanoffload-fs1-0000dead", "LV datavg/sanoffload-snap1",
        "LV datavg/sanoffload-snap2", "LV datavg/sanoffload-tsnap"]
    assert "fs1-data" in st1.lio.backstore_names  # the production LUNs are not ours


def test_max_sessions_is_per_client(st1: Node) -> None:
    with st1.connect() as fs1:
        fs1.call("duplicate", lun=LUN["lin"], name="sanoffload-fs1-00000001")
        fs1.call("duplicate", lun=LUN["thin"], name="sanoffload-fs1-00000002")
        with pytest.raises(ResourceError, match="max_sessions = 2"):
            fs1.call("duplicate", lun=LUN["lin"], name="sanoffload-fs1-00000003")


def test_the_service_refuses_a_client_not_in_the_config(st1: Node) -> None:
    with pytest.raises(AuthError, match="fs9"):
        StorageService(st1.node, "fs9")


# --------------------------------------------------------------------------
# hostile requests: each refused, nothing changed
# --------------------------------------------------------------------------

def _untouched(node: Node) -> None:
    assert node.lvm("lvcreate") == [] and node.lvm("lvremove") == []
    assert node.lio.exports == {}


@pytest.mark.hostile("agent", "storage node: duplicate of a LUN identifier no client lists, "
                     "or one listed for another client", "RefusedError before LIO or LVM is read")
@pytest.mark.parametrize("lun", [lio.naa_from_serial("deadbeef-dead-4eef-8ead-beefdeadbeef"),
                                 LUN["m1"]])
def test_a_lun_not_listed_for_the_client_is_refused_unread(st1: Node, lun: str) -> None:
    with st1.connect() as fs1:
        with pytest.raises(RefusedError, match="not one client fs1 may duplicate"):
            fs1.call("duplicate", lun=lun, name=NAME)
    assert st1.runner.calls == [] and st1.journal() == []


@pytest.mark.hostile("agent", "storage node: duplicate of a LUN named by a path, in capitals, "
                     "or with a newline", "RefusedError: not a LUN identifier, nothing read")
@pytest.mark.parametrize("lun", ["/dev/datavg/lin", LUN["lin"].upper(), LUN["lin"] + "\n"])
def test_a_lun_that_is_no_identifier_is_refused(st1: Node, lun: str) -> None:
    with st1.connect() as fs1:
        with pytest.raises(RefusedError, match="not a LUN identifier"):
            fs1.call("duplicate", lun=lun, name=NAME)
    assert st1.runner.calls == []


@pytest.mark.hostile("agent", "storage node: duplicate of an allowed LUN backed by a disk, "
                     "not an LV", "RefusedError: not a logical volume, nothing made")
def test_a_lun_not_backed_by_an_lv_is_refused(st1: Node) -> None:
    with st1.connect() as fs1:
        with pytest.raises(RefusedError, match=r"/dev/sdb \(8:16\), not a logical volume"):
            fs1.call("duplicate", lun=LUN["sdb"], name=NAME)
    _untouched(st1)
    assert st1.journal() == []


@pytest.mark.hostile("agent", "storage node: duplicate named without sanoffload's mark "
                     "(lin, ../x, sanoffload-X)", "RefusedError, nothing made")
@pytest.mark.parametrize("name", ["lin", "../x", "sanoffload-X", "sanoffload-fs1-0000000a\n"])
def test_a_name_without_the_mark_is_refused(st1: Node, name: str) -> None:
    with st1.connect() as fs1:
        with pytest.raises(RefusedError, match="not a sanoffload duplicate's name"):
            fs1.call("duplicate", lun=LUN["lin"], name=name)
        with pytest.raises(RefusedError, match="not a sanoffload duplicate's name"):
            fs1.call("discard", duplicate={"kind": "snapshot", "vg": "datavg", "name": name,
                                           "origin": "lin"})
        with pytest.raises(RefusedError, match="not sanoffload's"):
            fs1.call("unexpose", target_iqn="iqn.2003-01.org.linux-iscsi.st1:prod",
                     backstore="fs1-data")
    _untouched(st1)
    assert "fs1-data" in st1.lio.backstore_names


@pytest.mark.hostile("agent", "storage node: expose on a port ID the node does not have",
                     "RefusedError naming the ports it has, nothing exported")
def test_an_unknown_port_id_is_refused(st1: Node) -> None:
    with st1.connect() as fs1:
        dup = fs1.call("duplicate", lun=LUN["lin"], name=NAME)["duplicate"]
        with pytest.raises(RefusedError,
                           match=r"no port p9 on this storage node \(ports: p1, p2\)"):
            fs1.call("expose", **expose_fields(dup, port="p9"))
        assert st1.lio.exports == {}
        assert [r.kind for r in st1.journal()[0].resources] == ["snapshot"]


@pytest.mark.hostile("agent", "storage node: expose to an initiator that is not one of the "
                     "client's proxies", "AuthError, nothing exported")
def test_an_initiator_not_among_the_clients_proxies_is_refused(st1: Node) -> None:
    with st1.connect() as fs1:
        dup = fs1.call("duplicate", lun=LUN["lin"], name=NAME)["duplicate"]
        for initiator in (PX2, "iqn.2026-11.org.example:stranger"):
            with pytest.raises(AuthError, match="not one client fs1 may expose to"):
                fs1.call("expose", **expose_fields(dup, initiator=initiator))
    assert st1.lio.exports == {}


@pytest.mark.hostile("agent", "storage node: another client's duplicate named in health, "
                     "expose, discard, discard_partial, duplicate; its export in identify "
                     "and unexpose", "AuthError, the object untouched")
def test_another_clients_objects_cannot_be_touched(st1: Node) -> None:
    with st1.connect() as fs1:
        dup = fs1.call("duplicate", lun=LUN["lin"], name=NAME)["duplicate"]
        fs1.call("expose", **expose_fields(dup))
        with st1.connect("fs2") as fs2:
            for op, fields in (("health", {"duplicate": dup}),
                               ("expose", expose_fields(dup, initiator=PX2)),
                               ("discard", {"duplicate": dup}),
                               ("discard_partial", {"duplicate": dup}),
                               ("identify", {"target_iqn": lio.target_iqn_for(SID), "lun": 0}),
                               ("unexpose", {"target_iqn": lio.target_iqn_for(SID),
                                             "backstore": ""}),
                               ("unexpose", {"target_iqn": "",
                                             "backstore": lio.backstore_name_for(SID)})):
                with pytest.raises(AuthError, match="belongs to another client"):
                    fs2.call(op, **fields)
            with pytest.raises(AuthError, match="belongs to another client"):
                fs2.call("duplicate", lun=LUN["m1"], name=NAME)
            assert fs2.call("cleanup")["removed"] == []
        assert st1.lvm("lvremove") == [] and lio.target_iqn_for(SID) in st1.lio.exports
        assert fs1.call("health", duplicate=dup)["health"] == "healthy"


@pytest.mark.hostile("agent", "storage node: expose with a serial whose identifier a "
                     "production LUN presents", "RefusedError: no second disk with its identity")
def test_a_serial_copying_a_production_luns_identity_is_refused(st1: Node) -> None:
    with st1.connect() as fs1:
        dup = fs1.call("duplicate", lun=LUN["lin"], name=NAME)["duplicate"]
        with pytest.raises(RefusedError, match="already presents"):
            fs1.call("expose", **expose_fields(dup, serial=SERIALS["m1"]))
    assert st1.lio.exports == {}


@pytest.mark.hostile("agent", "storage node: expose under a target or backstore name that "
                     "is not the duplicate's session's", "RefusedError, nothing exported")
@pytest.mark.parametrize("over", [{"target_iqn": "iqn.2003-01.org.linux-iscsi.st1:prod"},
                                  {"target_iqn": lio.target_iqn_for("fs2-0000000b")},
                                  {"backstore": "fs1-data"}])
def test_expose_names_must_be_the_duplicates(st1: Node, over: dict[str, str]) -> None:
    with st1.connect() as fs1:
        dup = fs1.call("duplicate", lun=LUN["lin"], name=NAME)["duplicate"]
        with pytest.raises(RefusedError, match="not this duplicate's"):
            fs1.call("expose", **expose_fields(dup, **over))
    assert st1.lio.exports == {}


@pytest.mark.hostile("channel", "storage node: malformed fields (duplicate not an object of "
                     "four strings, lun a string, a bad kind, serial not a UUID, a CHAP "
                     "secret with a newline, an unknown field)",
                     "ProtocolError/UsageError; the connection goes on; nothing changed")
@pytest.mark.parametrize("op,fields,error", [
    ("health", {"duplicate": "sanoffload-fs1-0000000a"}, ProtocolError),
    ("health", {"duplicate": {"name": NAME}}, UsageError),
    ("health", {"duplicate": {"kind": "snapshot", "vg": 1, "name": NAME, "origin": ""}},
     UsageError),
    ("health", {"duplicate": {"kind": "copy", "vg": "", "name": NAME, "origin": ""}},
     UsageError),
    ("duplicate", {"lun": LUN["lin"], "name": NAME, "kind": "clone"}, UsageError),
    ("duplicate", {"lun": LUN["lin"], "name": NAME, "size": 1}, ProtocolError),
    ("identify", {"target_iqn": lio.target_iqn_for(SID), "lun": "0"}, ProtocolError),
    ("expose", {"serial": "not-a-uuid"}, UsageError),
    ("expose", {"password": "abcdefghijkl\nmnop"}, UsageError),
    ("expose", {"lun": 256}, UsageError),
    ("expose", {"lun": True}, ProtocolError),
])
def test_malformed_fields_are_refused_and_the_connection_goes_on(
        st1: Node, op: str, fields: dict[str, Any], error: type[Exception]) -> None:
    with st1.connect() as fs1:
        dup = fs1.call("duplicate", lun=LUN["lin"], name=NAME)["duplicate"]
        if op == "expose":
            fields = expose_fields(dup, **fields)
        with pytest.raises(error):
            fs1.channel.send({"op": op, **fields})
            fs1.reply()
        assert "time" in fs1.call("ping")
    assert st1.lio.exports == {} and st1.lvm("lvremove")[-1][-1] == f"datavg/{NAME}"


def test_a_duplicate_that_fails_half_way_leaves_nothing(st1: Node) -> None:
    out, err, rc = load("lvcreate_frozen")
    st1.runner.on("lvcreate", stdout=out, stderr=err, returncode=rc)
    with st1.connect() as fs1:
        with pytest.raises(Exception, match="suspend"):
            fs1.call("duplicate", lun=LUN["lin"], name=NAME)
    # the intent was journaled: release took the debris (lvremove) and the record
    assert st1.lvm("lvremove")[0][-1] == f"datavg/{NAME}" and st1.journal() == []
    assert json.dumps(st1.sleeps) == "[]"


@pytest.mark.hostile("agent", "storage node: expose with a one-letter CHAP 'secret'",
                     "UsageError before it is registered: logs are not masked letter by letter")
def test_a_short_secret_is_refused_before_it_is_masked(st1: Node) -> None:
    with st1.connect() as fs1:
        dup = fs1.call("duplicate", lun=LUN["lin"], name=NAME)["duplicate"]
        with pytest.raises(UsageError, match="password must be 12-255"):
            fs1.call("expose", **expose_fields(dup, password="e"))
    assert st1.runner.mask("lvcreate datavg") == "lvcreate datavg"
