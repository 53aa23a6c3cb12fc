"""Chunk codecs (issue 13): zstd through the ``zstandard`` package, raw otherwise.

A real ChunkStore in tmp_path and the real zstandard library; "the package is
absent" is made by hiding it from the import system (sys.modules[name] = None).
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import pytest
import zstandard

from sanoffload.errors import IntegrityError, MissingDependencyError, RefusedError
from sanoffload.store.chunks import (
    CODEC_RAW,
    CODEC_ZSTD,
    HEADER,
    MAX_CHUNK,
    ChunkStore,
    chunk_id,
    decode_chunk,
    encode_chunk,
)

pytestmark = pytest.mark.unit


@pytest.fixture
def store(tmp_path: Path) -> ChunkStore:
    (tmp_path / "repo").mkdir()
    return ChunkStore(tmp_path / "repo")


def _codec_on_disk(store: ChunkStore, cid: str) -> int:
    return int(HEADER.unpack_from(store.path(cid).read_bytes())[2])


def test_zstd_round_trip_compressible_chunk(store: ChunkStore) -> None:
    data = (b"a text file, many times over\n" * 150_000)[:4 << 20]
    codec, payload = encode_chunk(data)
    assert codec == CODEC_ZSTD and len(payload) < len(data) // 10
    cid = chunk_id(data)
    added = store.put_encoded(cid, codec, payload, len(data))
    assert added == HEADER.size + len(payload)
    assert store.path(cid).stat().st_size == added
    assert _codec_on_disk(store, cid) == CODEC_ZSTD
    assert store.get(cid) == data
    assert store.verify([cid]).ok
    # present already: nothing added, the chunk stays as it is
    assert store.put_encoded(cid, CODEC_RAW, data, len(data)) == 0
    assert _codec_on_disk(store, cid) == CODEC_ZSTD


def test_incompressible_chunk_is_stored_raw(store: ChunkStore) -> None:
    data = os.urandom(1 << 20)
    codec, payload = encode_chunk(data)
    assert codec == CODEC_RAW and payload == data
    cid = chunk_id(data)
    store.put_encoded(cid, codec, payload, len(data))
    assert _codec_on_disk(store, cid) == CODEC_RAW and store.get(cid) == data


@pytest.mark.hostile("store", "an encoded chunk whose data does not hash to the id it is sent "
                     "under", "IntegrityError (exit 12); nothing stored under that id")
@pytest.mark.parametrize("codec", [CODEC_RAW, CODEC_ZSTD])
def test_put_encoded_refuses_data_of_another_id(store: ChunkStore, codec: int) -> None:
    data = b"x" * 100_000
    lie = chunk_id(b"y" * 100_000)
    payload = data if codec == CODEC_RAW else zstandard.ZstdCompressor().compress(data)
    with pytest.raises(IntegrityError) as info:
        store.put_encoded(lie, codec, payload, len(data))
    assert info.value.exit_code == 12
    assert not store.has(lie) and list(store.ids()) == []


@pytest.mark.hostile("store", "a zstd chunk that expands past its announced plain length (a "
                     "bomb: 16 MiB of zeros announced as 4 KiB)",
                     "IntegrityError; the decoder stops at the bound, nothing stored")
def test_a_zstd_bomb_stops_at_the_announced_length(store: ChunkStore) -> None:
    big = bytes(MAX_CHUNK)
    payload = zstandard.ZstdCompressor().compress(big)
    with pytest.raises(IntegrityError, match="more than 4096"):
        store.put_encoded(chunk_id(big), CODEC_ZSTD, payload, 4096)
    # a frame without a content size in its header is bounded the same way
    streamed = zstandard.ZstdCompressor(write_content_size=False).compress(big)
    with pytest.raises(IntegrityError, match="more than"):
        decode_chunk(CODEC_ZSTD, streamed, 10)
    assert list(store.ids()) == []


@pytest.mark.hostile("store", "an encoded chunk with a lying plain length, an unknown codec, "
                     "garbage as zstd, or a payload over 16 MiB",
                     "IntegrityError or refused, nothing stored")
def test_put_encoded_hostile_headers(store: ChunkStore) -> None:
    data = b"z" * 5000
    cid = chunk_id(data)
    packed = zstandard.ZstdCompressor().compress(data)
    for codec, payload, plain in ((CODEC_RAW, data, 4999), (CODEC_ZSTD, packed, 5001),
                                  (CODEC_ZSTD, packed, MAX_CHUNK + 1), (CODEC_ZSTD, packed, -1),
                                  (7, data, 5000), (CODEC_ZSTD, b"not zstd at all", 5000)):
        with pytest.raises(IntegrityError):
            store.put_encoded(cid, codec, payload, plain)
    with pytest.raises(RefusedError):
        store.put_encoded(cid, CODEC_RAW, bytes(MAX_CHUNK + 1), MAX_CHUNK + 1)
    with pytest.raises(RefusedError):
        store.put_encoded("../../etc/passwd", CODEC_RAW, data, 5000)
    assert list(store.ids()) == []


@pytest.mark.hostile("store", "a stored zstd chunk with a flipped byte in its compressed data",
                     "get raises IntegrityError; verify lists it as bad")
def test_a_damaged_zstd_chunk_on_disk(store: ChunkStore) -> None:
    data = b"0123456789abcdef" * 20_000
    codec, payload = encode_chunk(data)
    cid = chunk_id(data)
    store.put_encoded(cid, codec, payload, len(data))
    path = store.path(cid)
    blob = bytearray(path.read_bytes())
    blob[HEADER.size + len(payload) // 2] ^= 0x40
    path.write_bytes(bytes(blob))
    with pytest.raises(IntegrityError):
        store.get(cid)
    assert [b[0] for b in store.verify([cid]).bad] == [cid]


def test_without_the_package_raw_is_written_and_zstd_is_a_clear_error(
        store: ChunkStore, monkeypatch: pytest.MonkeyPatch) -> None:
    data = b"compressible " * 10_000
    codec, payload = encode_chunk(data)
    cid = chunk_id(data)
    store.put_encoded(cid, codec, payload, len(data))
    monkeypatch.setitem(sys.modules, "zstandard", None)  # "import zstandard" now fails
    assert encode_chunk(data) == (CODEC_RAW, data)
    with pytest.raises(MissingDependencyError, match="zstandard") as info:
        store.get(cid)
    assert info.value.exit_code == 4
    raw = b"raw chunk" * 100
    rid = chunk_id(raw)
    store.put_encoded(rid, *encode_chunk(raw), len(raw))
    assert store.get(rid) == raw and hashlib.sha256(raw).hexdigest() == rid
