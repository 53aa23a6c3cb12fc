"""Image backups in the repository (issue 13): manifest, local sink, wire ops, verify, gc.

A real Repository in tmp_path; the store's wire is the real StoreService behind an
in-process connector (as in test_store_service.py). Chunks are small (64 KiB) so a
"volume" is a few hundred KiB of bytes in memory.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from sanoffload.channel.client import in_process_connector
from sanoffload.channel.server import serve
from sanoffload.errors import (
    IntegrityError,
    ProtocolError,
    ResourceError,
    SanoffloadError,
    UsageError,
)
from sanoffload.proxy.peers import StoreClient
from sanoffload.proxy.storeimage import local_image_sink, remote_image_sink
from sanoffload.store.chunks import CODEC_RAW, encode_chunk, is_zero
from sanoffload.store.image import LocalImageSink, load_map, restore_image, verify_image
from sanoffload.store.imagemap import ChunkMap, ImageSink
from sanoffload.store.manifest import Manifest
from sanoffload.store.prune import Policy, gc, prune
from sanoffload.store.repo import BackupId, Repository
from sanoffload.store.service import StoreService

pytestmark = pytest.mark.unit

CS = 64 << 10
FROZEN = "2026-11-26T10:29:33Z"
LATER = "2026-11-27T10:29:33Z"
T_FAR = 4_000_000_000.0  # gc's "now": every chunk is older than any grace


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    (tmp_path / "repo").mkdir()
    return Repository(tmp_path / "repo")


def volume(seed: bytes, chunks: int = 5) -> bytes:
    """Distinct chunks, one all zero, the last one short."""
    parts = [hashlib.sha256(seed + bytes([i])).digest() * (CS // 32) for i in range(chunks)]
    parts[2] = bytes(CS)
    return b"".join(parts)[:-1000]


def put_image(sink: ImageSink, data: bytes, previous: ChunkMap | None = None,
              fields: dict[str, Any] | None = None) -> dict[str, Any]:
    """What the proxy does: hash, ask what is missing, put it, commit the merged map."""
    base = previous or ChunkMap.zeros(len(data), CS)
    changes: dict[int, bytes] = {}
    pieces: dict[str, bytes] = {}
    for i in range(base.count):
        off, ln = base.span(i)
        piece = data[off:off + ln]
        digest = bytes(32) if is_zero(piece) else hashlib.sha256(piece).digest()
        if digest != base.digest(i):
            changes[i] = digest
            if not is_zero(piece):
                pieces[digest.hex()] = piece
    for cid in sink.missing(sorted(pieces)):
        codec, payload = encode_chunk(pieces[cid])
        sink.put_chunk(cid, codec, payload, len(pieces[cid]))
    return sink.commit(base.merged(changes),
                       fields or {"image": {"read_bytes": len(data), "fstype": "xfs"}})


def local(repo: Repository, frozen: str = FROZEN, **kw: Any) -> LocalImageSink:
    return LocalImageSink(repo, "px1", "fs1", "/srv/thin", {"frozen_at": frozen}, **kw)


# -- manifest -------------------------------------------------------------------
def _image_manifest(**image: Any) -> dict[str, Any]:
    info = {"size": 5 * CS, "chunk_size": CS, "map_sha256": "a" * 64,
            "map_bytes": 28 + 5 * 32, "chunks": 4, "new_chunks": 4, "new_bytes": 4 * CS,
            "read_bytes": 5 * CS, "base": None, "fstype": "xfs"}
    info.update(image)
    return {"host": "fs1", "path": "/srv/thin", "slug": "s", "timestamp": "t",
            "kind": "image", "image": info}


def test_image_manifest_round_trip_and_old_manifests_read_as_tar() -> None:
    m = Manifest.from_dict(_image_manifest())
    assert m.is_image and m.stored_bytes == 4 * CS
    d = m.to_dict()
    assert d["kind"] == "image" and "sha256" not in d and "archive_bytes" not in d
    assert Manifest.from_json(m.to_json()) == m
    old = Manifest(host="h", path="/p", slug="s", timestamp="t", archive_bytes=5,
                   sha256="0" * 64)
    assert old.kind == "tar" and "kind" not in old.to_dict() and "image" not in old.to_dict()


@pytest.mark.hostile("store", "an image manifest with a wrong map size, more chunks than the "
                     "map holds, a huge size, a bad base id, unknown keys, or a tar sha256",
                     "the manifest is refused (the backup listed as broken)")
@pytest.mark.parametrize("change", [
    {"map_bytes": 1 << 40}, {"chunks": 6}, {"new_chunks": 5}, {"size": 1 << 60},
    {"chunk_size": 3}, {"base": "../../etc/x"}, {"base": "fs1/a/b"}, {"fstype": "x\ny"},
    {"new_bytes": 1 << 40}, {"map_sha256": "X" * 64}, {"read_bytes": -1}, {"extra": 1},
    {"kind": "zip"}, {"sha256": "0" * 64},
])
def test_hostile_image_manifest_fields(change: dict[str, Any]) -> None:
    raw = _image_manifest()
    if "kind" in change or "sha256" in change:
        raw.update(change)
    else:
        raw["image"].update(change)
    with pytest.raises(ValueError):
        Manifest.from_dict(raw)


# -- local sink, verify, restore ------------------------------------------------------
def test_local_put_list_verify_restore_and_incremental(repo: Repository, tmp_path: Path) -> None:
    first = volume(b"one")
    done = put_image(local(repo), first)
    assert done["kind"] == "image" and done["image"]["chunks"] == 4
    assert done["image"]["new_chunks"] == 4 and done["client"] == "px1"
    b1 = repo.get(done["id"])
    assert b1.archive.name.endswith(".map") and repo.list() == [b1]
    assert repo.verify(b1.id).manifest.verification.ok  # type: ignore[union-attr]
    # an incremental: one chunk changed; only it is new
    second = bytearray(first)
    second[10] ^= 1
    with local(repo, LATER) as sink:
        prev = sink.previous_map(done["id"])
        assert prev == load_map(repo, b1)
        again = put_image(sink, bytes(second), prev,
                          {"image": {"base": done["id"], "read_bytes": CS}})
    assert again["image"]["new_chunks"] == 1 and again["image"]["base"] == done["id"]
    out = tmp_path / "restored.img"
    r = restore_image(repo, again["id"], out, jobs=3)
    assert out.read_bytes() == bytes(second) and (r.chunks, r.zero_chunks) == (4, 1)
    assert os.stat(out).st_blocks * 512 < len(second)  # the zero chunk is a hole
    with pytest.raises(SanoffloadError):
        restore_image(repo, again["id"], out)  # exists: not replaced without force
    restore_image(repo, done["id"], out, force=True)
    assert out.read_bytes() == first


@pytest.mark.hostile("store", "an image commit whose map names a chunk the store does not "
                     "hold", "IntegrityError; no manifest, no map, nothing listed")
def test_commit_naming_a_missing_chunk_is_refused(repo: Repository) -> None:
    data = volume(b"x")
    sink = local(repo)
    m = ChunkMap.zeros(len(data), CS).merged({0: hashlib.sha256(b"never put").digest()})
    with pytest.raises(IntegrityError, match="does not hold"):
        sink.commit(m, {})
    assert repo.list() == [] and not list(repo.root.rglob("*.map*"))


def test_a_manifest_that_cannot_be_published_takes_the_map_back(repo: Repository) -> None:
    """The map is published first; no manifest, no backup: the map goes again."""
    sink = local(repo)
    sink.manifest_path.write_bytes(b"not ours")
    with pytest.raises(ResourceError, match="already exists"):
        put_image(sink, volume(b"x"))
    assert not list(repo.root.rglob("*.map*")) and not list(repo.root.rglob("*.partial"))
    assert sink.manifest_path.read_bytes() == b"not ours"


@pytest.mark.hostile("store", "verify of an image backup with a chunk flipped or removed, "
                     "or its map changed", "IntegrityError naming the backup and the chunk")
def test_verify_names_the_backup_and_the_bad_chunk(repo: Repository) -> None:
    done = put_image(local(repo), volume(b"v"))
    backup = repo.get(done["id"])
    cid = sorted(load_map(repo, backup).referenced())[0]
    path = repo.chunks.path(cid)
    blob = bytearray(path.read_bytes())
    blob[-5] ^= 1
    path.write_bytes(bytes(blob))
    with pytest.raises(IntegrityError, match=f"{done['id']}.*{cid}"):
        verify_image(repo, backup)
    with pytest.raises(IntegrityError):
        repo.verify(backup.id)
    assert repo.get(backup.id).manifest.verification.status == "failed"  # type: ignore[union-attr]
    path.unlink()
    with pytest.raises(IntegrityError, match="1 chunk.s. missing"):
        verify_image(repo, backup)
    backup.archive.chmod(0o644)
    backup.archive.write_bytes(backup.archive.read_bytes()[:-1] + b"\x01")
    with pytest.raises(IntegrityError, match="sha256"):
        load_map(repo, backup)


def test_tar_paths_refuse_an_image_backup_and_delete_removes_the_map(repo: Repository) -> None:
    done = put_image(local(repo), volume(b"d"))
    backup = repo.get(done["id"])
    with pytest.raises(UsageError, match="image backup"):
        repo.check_sha256(backup)
    repo.delete(backup.id)
    assert repo.list() == [] and not backup.archive.exists()


def test_quota_charges_new_chunk_bytes(repo: Repository) -> None:
    from sanoffload.store.repo import Quota

    quota = Quota("px1", 3 * CS)
    random_volume = os.urandom(5 * CS)  # incompressible: stored at full size
    with pytest.raises(ResourceError, match="quota"), local(repo, quota=quota) as sink:
        put_image(sink, random_volume)
    assert repo.list() == []
    small = put_image(local(repo, quota=Quota("px1", 8 * CS)), os.urandom(CS))
    assert repo.charged("px1") == small["image"]["new_bytes"] > CS


# -- the wire ----------------------------------------------------------------------
class Served:
    def __init__(self, repo: Repository, **kw: Any) -> None:
        self.service = StoreService(repo, "px1", **kw)
        self.codes: list[int] = []
        self.gone = threading.Event()

        def run(ch: Any) -> None:
            try:
                self.codes.append(serve(self.service, ch))
            finally:
                ch.close()
                self.gone.set()

        self.connector = in_process_connector(run, peer="bk1")

    def client(self) -> StoreClient:
        return StoreClient(self.connector, name="bk1")


def test_remote_and_local_sinks_store_the_same(repo: Repository, tmp_path: Path) -> None:
    data = volume(b"w")
    served = Served(repo)
    with served.client() as client:
        sink = remote_image_sink(client, "fs1", "/srv/thin", {"frozen_at": FROZEN},
                                 size=len(data), chunk_size=CS)
        done = put_image(sink, data)
        with pytest.raises(SanoffloadError):
            remote_image_sink(client, "fs1", "/srv/thin", {"frozen_at": FROZEN},
                              size=len(data), chunk_size=CS)  # exists: never overwritten
        sink2 = remote_image_sink(client, "fs1", "/srv/thin", {"frozen_at": LATER},
                                  size=len(data), chunk_size=CS)
        prev = sink2.previous_map(done["id"])
        assert prev is not None and prev == load_map(repo, repo.get(done["id"]))
        assert sink2.previous_map("fs1/other-1/20260101T000000Z") is None
        sink2.abort("test")
    assert served.gone.wait(10)
    other = local_image_sink(StoreService(repo, "px1"), "fs1", "/srv/thin",
                             {"frozen_at": "2026-11-28T00:00:00Z"}, size=len(data),
                             chunk_size=CS)
    again = put_image(other, data)
    assert again["image"]["map_sha256"] == done["image"]["map_sha256"]
    assert again["image"]["new_chunks"] == 0
    restore_image(repo, again["id"], tmp_path / "r.img")
    assert (tmp_path / "r.img").read_bytes() == data


def _open(client: StoreClient, size: int = 5 * CS, frozen: str = FROZEN) -> str:
    reply = client.call("image", host="fs1", path="/srv/thin", size=size, chunk_size=CS,
                        fields={"frozen_at": frozen})
    return str(reply["id"])


def _chunk_frames(client: StoreClient, header: dict[str, Any], payload: bytes) -> None:
    client.channel.send({"op": "chunk", **header})
    client.channel.send_chunk(payload)
    client.channel.end_chunks()


@pytest.mark.hostile("store", "image wire ops: a chunk whose payload does not hash to its id, "
                     "a chunk bigger than the put's chunk size, more payload than announced, "
                     "a missing list of 5000 ids, a chunk before any open",
                     "refused; the put is aborted (nothing listed), the connection closed "
                     "where frames may follow")
@pytest.mark.parametrize("case", ["bad-hash", "too-big", "more-than-announced", "many-ids",
                                  "no-open", "huge-size"])
def test_hostile_image_wire_ops(repo: Repository, case: str) -> None:
    served = Served(repo)
    good = b"g" * 1000
    cid = hashlib.sha256(good).hexdigest()
    with served.client() as client:
        with pytest.raises((SanoffloadError, ProtocolError)):
            if case == "no-open":
                _chunk_frames(client, {"id": cid, "codec": 0, "plain_bytes": 1000,
                                       "payload_bytes": 1000}, good)
                client.reply()
            elif case == "huge-size":
                _open(client, size=1 << 62)
            else:
                _open(client)
                if case == "bad-hash":
                    _chunk_frames(client, {"id": cid, "codec": CODEC_RAW, "plain_bytes": 1000,
                                           "payload_bytes": 1000}, b"h" * 1000)
                    client.reply()
                elif case == "too-big":
                    _chunk_frames(client, {"id": cid, "codec": 0, "plain_bytes": CS + 1,
                                           "payload_bytes": CS + 1}, bytes(CS + 1))
                    client.reply()
                elif case == "more-than-announced":
                    _chunk_frames(client, {"id": cid, "codec": 0, "plain_bytes": 1000,
                                           "payload_bytes": 1000}, good + b"extra")
                    client.reply()
                else:
                    client.call("missing", ids=[cid] * 5000)
    assert served.gone.wait(10)
    assert repo.list() == [] and not list(repo.root.rglob("*.partial"))
    assert list(repo.chunks.ids()) == []


@pytest.mark.hostile("store", "an image commit whose map frames are longer or shorter than "
                     "the put's geometry implies, or name a chunk never put",
                     "refused; nothing listed")
@pytest.mark.parametrize("case", ["long", "short", "missing-chunk"])
def test_hostile_image_commit_over_the_wire(repo: Repository, case: str) -> None:
    served = Served(repo)
    size = 5 * CS
    m = ChunkMap.zeros(size, CS)
    blob = m.to_bytes()
    if case == "long":
        blob += bytes(32)
    elif case == "short":
        blob = blob[:-1]
    else:
        blob = m.merged({1: hashlib.sha256(b"nope").digest()}).to_bytes()
    with served.client() as client:
        _open(client, size)
        with pytest.raises(SanoffloadError):
            client.channel.send({"op": "image_commit", "fields": {}})
            client.channel.send_chunk(blob)
            client.channel.end_chunks()
            client.reply()
    assert served.gone.wait(10)
    assert repo.list() == [] and not list(repo.root.rglob("*.map*"))


def test_image_map_is_only_for_hosts_the_client_may_read(repo: Repository) -> None:
    put_image(local(repo), volume(b"h"))
    theirs = LocalImageSink(repo, "px2", "fs2", "/srv/thin", {"frozen_at": FROZEN})
    other = put_image(theirs, volume(b"h2"))
    served = Served(repo, hosts=("fs1",))
    with served.client() as client:
        _open(client, len(volume(b"h")), LATER)
        with pytest.raises(SanoffloadError, match="may not"):
            client.call("image_map", id=other["id"])


# -- prune and gc ----------------------------------------------------------------------
def test_gc_never_removes_a_referenced_chunk(repo: Repository) -> None:
    a, b = volume(b"a"), bytearray(volume(b"a"))
    b[CS * 3 + 7] ^= 1
    first = put_image(local(repo), a)
    second = put_image(local(repo, LATER), bytes(b))
    referenced = load_map(repo, repo.get(second["id"])).referenced()
    only_first = load_map(repo, repo.get(first["id"])).referenced() - referenced
    assert len(only_first) == 1
    report = gc(repo, grace_s=0, now=T_FAR)
    assert report.removed == [] and report.kept_referenced == len(referenced) + 1
    plan = prune(repo, Policy(last=1))
    assert plan.images_removed and [str(x.id) for x in plan.remove] == [first["id"]]
    young = gc(repo, grace_s=3600)  # just written: young, kept
    assert young.removed == [] and young.kept_young == 1
    dry = gc(repo, grace_s=0, now=T_FAR, dry_run=True)
    assert dry.removed == sorted(only_first) and repo.chunks.has(dry.removed[0])
    swept = gc(repo, grace_s=0, now=T_FAR)
    assert swept.removed == sorted(only_first)
    assert all(repo.chunks.has(c) for c in referenced)
    verify_image(repo, repo.get(second["id"]))


@pytest.mark.hostile("store", "gc with an image backup whose map is damaged or missing, or "
                     "whose manifest is broken beside its map",
                     "gc refuses to sweep anything, naming the backup (exit 12)")
@pytest.mark.parametrize("damage", ["map-flipped", "map-gone", "manifest-broken"])
def test_gc_refuses_when_a_map_cannot_be_read(repo: Repository, damage: str) -> None:
    kept = put_image(local(repo), volume(b"k"))
    put_image(local(repo, LATER), volume(b"orphan-source"))
    repo.delete(BackupId.parse(put_image(local(repo, "2026-11-29T00:00:00Z"),
                                         volume(b"pruned"))["id"]))
    backup = repo.get(kept["id"])
    if damage == "map-flipped":
        backup.archive.chmod(0o644)
        blob = bytearray(backup.archive.read_bytes())
        blob[-1] ^= 1
        backup.archive.write_bytes(bytes(blob))
    elif damage == "map-gone":
        backup.archive.unlink()
    else:
        backup.manifest_path.write_text(json.dumps({"host": "fs1"}))
    before = sorted(repo.chunks.ids())
    with pytest.raises(IntegrityError, match=kept["id"]) as info:
        gc(repo, grace_s=0, now=T_FAR)
    assert info.value.exit_code == 12
    assert sorted(repo.chunks.ids()) == before


# -- the operator's commands -------------------------------------------------------------
def test_store_cli_list_gc_verify_restore_image(repo: Repository, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    from sanoffload import cli

    data = volume(b"cli")
    done = put_image(local(repo), data)
    base = ["store", "--repo", str(repo.root)]
    assert cli.run([*base, "list"]) == 0
    row = capsys.readouterr().out.splitlines()[1].split()
    assert row[:2] == [done["id"], "image"]
    assert cli.run([*base, "verify", done["id"]]) == 0
    out = tmp_path / "vol.img"
    assert cli.run([*base, "restore", done["id"], "--image", str(out)]) == 0
    assert out.read_bytes() == data
    assert cli.run([*base, "restore", done["id"], "--image", str(out)]) == 3  # exists
    assert cli.run([*base, "gc", "--grace", "0s", "--dry-run", "--json"]) == 0
    capsys.readouterr()
    assert cli.run([*base, "gc", "--grace", "soon"]) == 2
    repo.delete(BackupId.parse(done["id"]))
    assert cli.run([*base, "gc", "--grace", "0s"]) == 0
    assert "4 chunk(s) freed" in capsys.readouterr().out
    assert list(repo.chunks.ids()) == []
