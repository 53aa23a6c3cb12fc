"""``run_offhost_backup(image=True)``: the image backup flow over in-process peers.

The agent is :class:`ImageAgent`, a small Service speaking the agent's wire (prepare
with ``image``, status, release with ``committed``) and recording every request as it
arrived; the proxy's real AgentClient talks to it, so what crosses the wire is checked
(PrepareAnswer.from_wire, Delta.from_wire). The store's image ops are injected
(``image_sink_fn``) as the recording ImageSink of test_proxy_image; the "device" is a
regular file attached by :class:`FakeBlockAttach` (no iSCSI); read_image and
compare_image run for real on it.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest

from sanoffload.channel.client import in_process_connector
from sanoffload.channel.protocol import Spec
from sanoffload.channel.server import Service, serve
from sanoffload.errors import (
    DuplicateInvalidError,
    IntegrityError,
    ProtocolError,
    RefusedError,
    UsageError,
)
from sanoffload.kinds import VerifyMode
from sanoffload.proxy.offhost import Location, run_offhost_backup
from sanoffload.proxy.peers import AgentClient
from sanoffload.store.imagemap import ZERO, ChunkMap
from sanoffload.store.manifest import image_sender_fields
from sanoffload.undo import UndoStack
from tests.unit.test_proxy_image import RecordingSink, piece

pytestmark = pytest.mark.unit

CS = 4 << 20  # what the proxy cuts a volume into
SID = "fs1-0a1b2c3d"
INITIATOR = "iqn.2026-11.org.sanoffload.lab:px1"
SOURCE = Location("root@fs1.lab.example", "/srv/thin")
STORE = Location("bk1", "/srv/backups")
BASE = "fs1/srv-thin-1a2b3c4d/20261125T102933Z"
NEW_ID = "fs1/srv-thin-1a2b3c4d/20261126T102933Z"


class ImageAgent(Service):
    """The agent's wire for one image backup: records every request's fields as sent."""

    name = "agent"
    specs = MappingProxyType({
        "prepare": Spec(required={"path": str, "initiator": str},
                        optional={"kind": str, "also": list, "image": bool}),
        "status": Spec(required={"session_id": str}),
        "release": Spec(required={"session_id": str}, optional={"committed": str}),
    })

    def __init__(self, delta: Any = None, health: str = "healthy") -> None:
        self.delta = delta
        self.health = health
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.lock = threading.Lock()

    def hello_info(self) -> dict[str, Any]:
        return {"host": "fs1", "client": "px1"}

    def handle(self, op: str, fields: dict[str, Any], channel: Any) -> dict[str, Any]:
        with self.lock:
            self.requests.append((op, dict(fields)))
        if op == "prepare":
            session: dict[str, Any] = {
                "session_id": SID, "identifier": "naa.60014050a1b2c3d4",
                "target_iqn": f"iqn.2026-11.org.sanoffload:{SID}",
                "portals": ["192.0.2.10:3260"], "lun": 0, "unit_serial": "0a1b2c3d",
                "chap_user": "px1", "chap_secret": "s3cret", "fstype": "ext4",
                "path_in_fs": ".", "object_kind": "directory", "duplicate_kind": "thin-snapshot",
                "freeze_window_ms": 12.5, "frozen_by": "fsfreeze", "lease_expires": 2e9,
                "frozen_at": 1795688973.125}
            if self.delta is not None:
                session["delta"] = self.delta
            return {"session": session}
        if op == "status":
            return {"session_id": fields["session_id"], "status": self.health}
        return {"released": [f"lio-target {fields['session_id']}"]}

    def ops(self, op: str) -> list[dict[str, Any]]:
        return [f for o, f in self.requests if o == op]


class NoStore(Service):
    """The store's greeting only: the image ops go through the injected sink."""

    name = "store"
    specs = MappingProxyType({})


class CommittingSink(RecordingSink):
    """RecordingSink that commits (returns the stored backup) and records aborts."""

    def __init__(self, events: list[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.events = events
        self.opened: tuple[str, str, dict[str, Any]] | None = None
        self.committed: tuple[ChunkMap, dict[str, Any]] | None = None
        self.aborted: list[str] = []
        self.asked_for: list[str] = []
        self.after_put: Any = None
        self.size: int | None = None

    def previous_map(self, backup_id: str) -> ChunkMap | None:
        self.asked_for.append(backup_id)
        return self.previous

    def put_chunk(self, chunk_id: str, codec: int, payload: bytes, plain_bytes: int) -> None:
        super().put_chunk(chunk_id, codec, payload, plain_bytes)
        if self.after_put is not None:
            self.after_put()

    def commit(self, chunk_map: ChunkMap, fields: Mapping[str, Any]) -> dict[str, Any]:
        missing = chunk_map.referenced() - self.held
        assert not missing, "a map naming chunks the store lacks"
        self.committed = (chunk_map, dict(fields))
        self.events.append("commit")
        return {"id": NEW_ID, "kind": "image"}

    def abort(self, reason: str = "the backup failed") -> None:
        self.aborted.append(reason)
        self.events.append("abort")


class FakeBlockAttach:
    """Stands in for the iSCSI login: the "LUN" is a regular file."""

    def __init__(self, device: Path, events: list[str]) -> None:
        self.device = device
        self.events = events

    def __call__(self, runner: Any, answer: Any, undo: UndoStack) -> str:
        self.events.append("attach")
        undo.push("detach", self.events.append, "detached")
        return str(self.device)


class Lab:
    def __init__(self, tmp_path: Path, pieces: list[bytes], *, delta: Any = None,
                 previous: ChunkMap | None = None, health: str = "healthy") -> None:
        self.device = tmp_path / "lun"
        self.device.write_bytes(b"".join(pieces))
        self.events: list[str] = []
        self.agent = ImageAgent(delta, health)
        self.sink = CommittingSink(self.events, previous=previous)
        self.attach = FakeBlockAttach(self.device, self.events)

    def open_sink(self, depot: Any, host: str, path: str, fields: Mapping[str, Any], *,
                  size: int) -> CommittingSink:
        self.sink.opened = (host, path, dict(fields))
        self.sink.size = size
        return self.sink

    def run(self, verify: VerifyMode = VerifyMode.STREAM, **kwargs: Any) -> dict[str, Any]:
        agent = self.agent

        def release_seen(ch: Any) -> None:
            serve(agent, ch)

        return run_offhost_backup(
            None,  # type: ignore[arg-type]  # nothing runs a command in an image backup here
            SOURCE, STORE, verify=verify, initiator=INITIATOR, timeout=60,
            agent_conn=in_process_connector(release_seen, peer="fs1"),
            store_conn=in_process_connector(lambda ch: serve(NoStore(), ch), peer="bk1"),
            image=True, attach_block_fn=self.attach, image_sink_fn=self.open_sink, **kwargs)

    def released(self) -> list[dict[str, Any]]:
        return self.agent.ops("release")


def sha(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def wire_delta(changed: list[list[int]], discarded: Sequence[list[int]] = (),
               volume: int = 4 * CS, base: str = BASE) -> dict[str, Any]:
    return {"base": base, "volume_bytes": volume, "chunk_bytes": CS,
            "changed": [list(r) for r in changed], "discarded": [list(r) for r in discarded]}


FOUR = [piece(0, CS), piece(1, CS), bytes(CS), piece(3, CS)]


def previous_of(pieces: list[bytes]) -> ChunkMap:
    m = ChunkMap.zeros(sum(map(len, pieces)), CS)
    return m.merged({i: (ZERO if not any(p) else sha(p)) for i, p in enumerate(pieces)})


# -- a full image backup ------------------------------------------------------------------
def test_a_full_image_backup_is_read_compared_committed_and_released_with_its_id(
        tmp_path: Path) -> None:
    lab = Lab(tmp_path, FOUR)
    summary = lab.run()
    # prepare asked for an image; the release names the committed backup, after the detach
    [prep] = lab.agent.ops("prepare")
    assert prep["image"] is True and prep["path"] == "/srv/thin"
    assert lab.released() == [{"session_id": SID, "committed": NEW_ID}]
    assert lab.events == ["attach", "commit", "detached"]
    assert lab.agent.requests[-1][0] == "release"
    # the sink: opened for the agent's host and the path, with the usual manifest fields
    assert lab.sink.opened is not None
    host, path, opened = lab.sink.opened
    assert (host, path, opened["duplicate_kind"], opened["session_id"]) == (
        "fs1", "/srv/thin", "thin-snapshot", SID)
    assert lab.sink.size == 4 * CS  # opened for the attached device's size
    assert lab.sink.asked_for == []  # no delta: no previous map wanted
    assert lab.sink.committed is not None
    chunk_map, fields = lab.sink.committed
    assert [chunk_map.digest(i) for i in range(4)] == [sha(FOUR[0]), sha(FOUR[1]), ZERO,
                                                       sha(FOUR[3])]
    assert fields["frozen_by"] == "fsfreeze"
    # the store makes it "kind": "image" and counts what it stored itself
    assert fields["image"] == {
        "size": 4 * CS, "chunk_size": CS, "map_sha256": chunk_map.sha256(),
        "map_bytes": len(chunk_map.to_bytes()), "chunks": 3, "read_bytes": 4 * CS,
        "base": None, "fstype": "ext4"}
    assert not {"kind", "sha256", "archive_bytes"} & set(fields)
    image_sender_fields(fields)  # what the store's sink accepts
    assert summary["backup_id"] == NEW_ID and summary["kind"] == "image"
    assert (summary["read_bytes"], summary["chunks"], summary["new_chunks"]) == (4 * CS, 4, 3)
    assert summary["incremental"] is False and "no delta" in summary["full_reason"]
    # stream: no second read (the chunk ids are the hashes of what was read)
    assert summary["verify"] == "stream" and summary["compared_chunks"] is None
    assert lab.sink.aborted == []


def test_an_incremental_reads_only_the_delta_and_names_its_base(tmp_path: Path) -> None:
    new = [FOUR[0], piece(1, CS, b"new"), FOUR[2], FOUR[3]]
    # chunk 3 differs on the "LUN" but the delta does not name it: never read
    new[3] = piece(3, CS, b"not in the delta")
    lab = Lab(tmp_path, new, delta=wire_delta([[CS, CS]], [[2 * CS, CS]]),
              previous=previous_of(FOUR))
    lab.sink.held = previous_of(FOUR).referenced()
    summary = lab.run()
    assert lab.sink.asked_for == [BASE]
    assert lab.sink.committed is not None
    chunk_map, fields = lab.sink.committed
    assert chunk_map.digest(1) == sha(new[1]) and chunk_map.digest(3) == sha(FOUR[3])
    assert fields["image"]["base"] == BASE and fields["image"]["read_bytes"] == CS
    assert len(lab.sink.put) == 1
    assert summary["incremental"] is True and summary["base"] == BASE
    assert (summary["read_bytes"], summary["changed_chunks"], summary["compared_chunks"]) == (
        CS, 1, None)
    assert lab.released() == [{"session_id": SID, "committed": NEW_ID}]


def test_a_delta_whose_base_the_store_lacks_is_a_full_read(tmp_path: Path) -> None:
    lab = Lab(tmp_path, FOUR, delta=wire_delta([[CS, CS]]), previous=None)
    summary = lab.run()
    assert lab.sink.asked_for == [BASE]
    assert summary["incremental"] is False and summary["read_bytes"] == 4 * CS
    assert "no map of the base backup" in summary["full_reason"]
    assert lab.sink.committed is not None and lab.sink.committed[1]["image"]["base"] is None
    assert lab.released() == [{"session_id": SID, "committed": NEW_ID}]


@pytest.mark.parametrize(("mode", "compared"), [(VerifyMode.FULL, 4), (VerifyMode.NONE, None)])
def test_verify_full_compares_every_chunk_and_none_none(tmp_path: Path, mode: VerifyMode,
                                                         compared: int | None) -> None:
    lab = Lab(tmp_path, FOUR, delta=wire_delta([[0, CS]]), previous=previous_of(FOUR))
    lab.sink.held = previous_of(FOUR).referenced()
    summary = lab.run(verify=mode)
    assert summary["compared_chunks"] == compared and summary["read_bytes"] == CS


# -- failures: aborted, released without committed ---------------------------------------
def test_a_chunk_that_changed_after_its_read_fails_the_full_compare(tmp_path: Path) -> None:
    lab = Lab(tmp_path, FOUR)

    def scribble() -> None:  # the "snapshot" changes under the proxy after chunk 0 was read
        with open(lab.device, "r+b") as f:
            f.write(b"changed")

    lab.sink.after_put = scribble
    with pytest.raises(IntegrityError, match="chunk 0 at offset 0 differs"):
        lab.run(verify=VerifyMode.FULL)
    assert lab.sink.committed is None and len(lab.sink.aborted) == 1
    assert lab.released() == [{"session_id": SID}]
    assert lab.events[-2:] == ["detached", "abort"]


def test_an_unhealthy_duplicate_is_not_committed(tmp_path: Path) -> None:
    lab = Lab(tmp_path, FOUR, health="invalid")
    with pytest.raises(DuplicateInvalidError):
        lab.run()
    assert lab.sink.committed is None and lab.sink.aborted
    assert lab.released() == [{"session_id": SID}]


def test_an_empty_lun_is_refused_and_released_without_committed(tmp_path: Path) -> None:
    lab = Lab(tmp_path, FOUR)
    os.truncate(lab.device, 0)  # an empty "LUN"
    with pytest.raises(RefusedError, match="empty device"):
        lab.run()
    assert lab.sink.opened is None and lab.released() == [{"session_id": SID}]
    assert lab.events == ["attach", "detached"]


@pytest.mark.hostile("proxy", "an agent's delta of another volume size than the attached LUN",
                     "protocol error (11) before the store is asked for the base map; "
                     "detached, released without committed (the old base stays)")
def test_a_delta_of_another_size_is_refused_and_the_base_stays(tmp_path: Path) -> None:
    lab = Lab(tmp_path, FOUR, delta=wire_delta([[0, CS]], volume=8 * CS),
              previous=previous_of(FOUR))
    with pytest.raises(ProtocolError, match="the attached device holds"):
        lab.run()
    assert lab.sink.opened is None and lab.sink.asked_for == []
    assert lab.released() == [{"session_id": SID}]
    assert lab.events == ["attach", "detached"]


HOSTILE_WIRE_DELTAS = [
    pytest.param(wire_delta([[100, CS]]),
                 marks=pytest.mark.hostile("proxy", "an agent's delta range not on a chunk "
                                           "boundary", "protocol error (11); nothing attached "
                                           "or read; released without committed"),
                 id="unaligned"),
    pytest.param(wire_delta([[0, 2 * CS], [CS, CS]]),
                 marks=pytest.mark.hostile("proxy", "an agent's delta with overlapping ranges",
                                           "protocol error (11); nothing attached or read"),
                 id="overlapping"),
    pytest.param(wire_delta([[3 * CS, 2 * CS]]),
                 marks=pytest.mark.hostile("proxy", "an agent's delta range past the volume's "
                                           "end", "protocol error (11); nothing attached or "
                                           "read"),
                 id="out-of-range"),
    pytest.param(wire_delta([[0, CS]], [[0, CS]]),
                 marks=pytest.mark.hostile("proxy", "an agent's delta naming a chunk both "
                                           "changed and discarded", "protocol error (11)"),
                 id="changed-and-discarded"),
    pytest.param({**wire_delta([[0, CS]]), "base": "../../etc/passwd"},
                 marks=pytest.mark.hostile("proxy", "an agent's delta whose base is not a "
                                           "backup id", "protocol error (11); the store is "
                                           "never asked for it"),
                 id="bad-base"),
]


@pytest.mark.parametrize("bad", HOSTILE_WIRE_DELTAS)
def test_hostile_deltas_from_the_agent_are_refused_before_anything(tmp_path: Path,
                                                                   bad: Any) -> None:
    lab = Lab(tmp_path, FOUR, delta=bad, previous=previous_of(FOUR))
    with pytest.raises(ProtocolError) as err:
        lab.run()
    assert err.value.exit_code == 11
    assert lab.events == [] and lab.sink.opened is None and lab.sink.asked_for == []
    assert lab.released() == [{"session_id": SID}]


def test_an_image_backup_of_a_group_is_refused_before_anything(tmp_path: Path) -> None:
    lab = Lab(tmp_path, FOUR)
    with pytest.raises(UsageError, match="one volume"):
        lab.run(also=("/srv/log",))
    assert lab.agent.requests == []


# -- the wire: image and committed only when they mean something ---------------------------
def test_prepare_and_release_send_image_and_committed_only_when_set() -> None:
    agent = ImageAgent()
    with AgentClient(in_process_connector(lambda ch: serve(agent, ch), peer="fs1"),
                     name="fs1") as client:
        client.prepare("/srv/thin", INITIATOR)
        client.prepare("/srv/thin", INITIATOR, image=True)
        client.release(SID)
        client.release(SID, committed=NEW_ID)
    assert [("image" in f, f.get("image")) for f in agent.ops("prepare")] == [
        (False, None), (True, True)]
    assert agent.ops("release") == [{"session_id": SID},
                                    {"session_id": SID, "committed": NEW_ID}]


def test_a_failed_put_aborts_the_sink_and_releases_without_committed(tmp_path: Path) -> None:
    lab = Lab(tmp_path, FOUR)

    def refuse() -> None:
        raise RefusedError("the store's quota is full")

    lab.sink.after_put = refuse
    with pytest.raises(RefusedError, match="quota"):
        lab.run()
    assert lab.sink.committed is None and len(lab.sink.aborted) == 1
    assert lab.events == ["attach", "detached", "abort"]
    assert lab.released() == [{"session_id": SID}]


# -- into a real repository on this host (LocalStoreClient.image_sink) -----------------------
def test_an_image_backup_into_a_local_repository_then_an_incremental(tmp_path: Path) -> None:
    from sanoffload.runner import CommandRunner
    from sanoffload.store.image import load_map
    from sanoffload.store.repo import BackupId, Repository

    (tmp_path / "repo").mkdir()
    lab = Lab(tmp_path, FOUR)

    def run(agent: ImageAgent) -> dict[str, Any]:
        return run_offhost_backup(
            CommandRunner(), SOURCE, Location(None, str(tmp_path / "repo")), initiator=INITIATOR,
            timeout=60, agent_conn=in_process_connector(lambda ch: serve(agent, ch), peer="fs1"),
            image=True, attach_block_fn=lab.attach)

    first = run(lab.agent)
    repo = Repository(tmp_path / "repo", CommandRunner())
    backup = repo.get(BackupId.parse(first["backup_id"]))
    assert backup.manifest.kind == "image" and backup.manifest.image is not None
    assert backup.manifest.image.read_bytes == 4 * CS and backup.manifest.image.base is None
    assert load_map(repo, backup).entries == previous_of(FOUR).entries
    assert lab.agent.ops("release") == [{"session_id": SID, "committed": first["backup_id"]}]
    # the next one: chunk 1 changed, the agent's delta names the first backup as its base
    new = [FOUR[0], piece(1, CS, b"next"), FOUR[2], FOUR[3]]
    lab.device.write_bytes(b"".join(new))
    agent = ImageAgent(wire_delta([[CS, CS]], base=first["backup_id"]))
    # a later freeze names a later backup
    second = run(_later(agent))
    assert second["incremental"] is True and second["read_bytes"] == CS
    assert second["new_chunks"] == 1
    b2 = repo.get(BackupId.parse(second["backup_id"]))
    assert b2.manifest.image is not None and b2.manifest.image.base == first["backup_id"]
    assert load_map(repo, b2).entries == previous_of(new).entries


def _later(agent: ImageAgent) -> ImageAgent:
    handle = agent.handle

    def later(op: str, fields: dict[str, Any], channel: Any) -> dict[str, Any]:
        reply = handle(op, fields, channel)
        if op == "prepare":
            reply["session"]["frozen_at"] += 3600
        return reply

    agent.handle = later  # type: ignore[method-assign]
    return agent
