"""ImageReader: random reads of a stored image over a real ChunkStore in tmp_path.

Small chunks (64 KiB, the smallest a map allows) keep the images small; the
reader does not care about the size.
"""

from __future__ import annotations

import hashlib
import os
import random
import threading
from pathlib import Path

import pytest

from sanoffload.errors import IntegrityError
from sanoffload.store.chunks import ChunkStore, is_zero
from sanoffload.store.imagemap import MIN_CHUNK_SIZE, ZERO, ChunkMap
from sanoffload.store.imageread import ImageReader

pytestmark = pytest.mark.unit

CS = MIN_CHUNK_SIZE


def store_image(store: ChunkStore, image: bytes, chunk_size: int = CS) -> ChunkMap:
    """Cut ``image`` into chunks as a backup would: zero pieces marked, the rest put."""
    changes: dict[int, bytes] = {}
    for i, off in enumerate(range(0, len(image), chunk_size)):
        piece = image[off:off + chunk_size]
        changes[i] = ZERO if is_zero(piece) else bytes.fromhex(store.put(piece))
    return ChunkMap.zeros(len(image), chunk_size).merged(changes)


@pytest.fixture
def store(tmp_path: Path) -> ChunkStore:
    (tmp_path / "repo").mkdir()
    return ChunkStore(tmp_path / "repo")


@pytest.fixture
def image() -> bytes:
    """5 chunks and a half: data, zeros, data, data, zeros, a short last piece."""
    rng = random.Random(13)
    parts = [rng.randbytes(CS), bytes(CS), rng.randbytes(CS), rng.randbytes(CS), bytes(CS),
             rng.randbytes(CS // 2 + 7)]
    return b"".join(parts)


def test_reads_across_chunk_boundaries_equal_the_image(store: ChunkStore, image: bytes) -> None:
    reader = ImageReader(store, store_image(store, image))
    assert reader.size == len(image)
    for offset, length in [(0, len(image)), (0, 1), (CS - 3, 6), (CS - 1, 2 * CS + 2),
                           (3 * CS + 5, 4096), (len(image) - 10, 10), (17, 3 * CS)]:
        assert reader.read(offset, length) == image[offset:offset + length], (offset, length)


def test_every_small_read_in_order_rebuilds_the_image(store: ChunkStore, image: bytes) -> None:
    reader = ImageReader(store, store_image(store, image))
    got = b"".join(reader.read(off, 4096) for off in range(0, len(image), 4096))
    assert hashlib.sha256(got).digest() == hashlib.sha256(image).digest()


def test_read_past_the_end_is_short_then_empty(store: ChunkStore, image: bytes) -> None:
    reader = ImageReader(store, store_image(store, image))
    assert reader.read(len(image) - 4, 100) == image[-4:]
    assert reader.read(len(image), 100) == b""
    assert reader.read(len(image) + CS, 1) == b""
    assert reader.read(5, 0) == b""
    with pytest.raises(ValueError):
        reader.read(-1, 10)


def test_zero_chunks_read_as_zeros_without_the_store(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    empty = ChunkStore(tmp_path / "empty")  # holds nothing: every get would fail
    reader = ImageReader(empty, ChunkMap.zeros(3 * CS + 100, CS))
    assert reader.read(CS - 10, 2 * CS) == bytes(2 * CS)
    assert reader.read(3 * CS, 1000) == bytes(100)
    assert reader.fetched == 0


@pytest.mark.hostile("restore", "a chunk of a mounted image damaged on disk (one byte flipped)",
                     "the read raises IntegrityError (EIO to the reader), no wrong bytes")
def test_a_damaged_chunk_raises_integrity_error(store: ChunkStore, image: bytes) -> None:
    chunk_map = store_image(store, image)
    cid = chunk_map.chunk_id(2)
    assert cid is not None
    path = store.path(cid)
    blob = bytearray(path.read_bytes())
    blob[-100] ^= 0x01
    os.chmod(path, 0o600)
    path.write_bytes(bytes(blob))
    reader = ImageReader(store, chunk_map)
    assert reader.read(0, CS) == image[:CS]  # the others still read
    with pytest.raises(IntegrityError, match="sha256"):
        reader.read(2 * CS + 10, 10)
    with pytest.raises(IntegrityError):  # not cached as good on the way
        reader.read(CS + CS - 1, 2)


@pytest.mark.hostile("restore", "a chunk missing from the repository under a mounted image",
                     "the read raises IntegrityError naming the chunk")
def test_a_missing_chunk_raises_integrity_error(store: ChunkStore, image: bytes) -> None:
    chunk_map = store_image(store, image)
    cid = chunk_map.chunk_id(3)
    assert cid is not None
    store.path(cid).unlink()
    with pytest.raises(IntegrityError, match=f"{cid} is missing"):
        ImageReader(store, chunk_map).read(3 * CS, 1)


@pytest.mark.hostile("restore", "a map whose entry names a whole chunk of another length",
                     "IntegrityError: the chunk is not the piece the map says")
def test_a_chunk_of_the_wrong_length_for_its_entry_is_refused(store: ChunkStore) -> None:
    short = store.put(b"x" * 100)
    chunk_map = ChunkMap.zeros(2 * CS, CS).merged({0: bytes.fromhex(short)})
    with pytest.raises(IntegrityError, match="covers"):
        ImageReader(store, chunk_map).read(0, 10)


def test_the_cache_keeps_recent_chunks_and_drops_the_oldest(store: ChunkStore,
                                                           image: bytes) -> None:
    reader = ImageReader(store, store_image(store, image), cache_chunks=2)
    for off in range(0, CS, 4096):  # 16 reads of chunk 0: one fetch
        reader.read(off, 4096)
    assert reader.fetched == 1
    reader.read(2 * CS, 1)
    reader.read(3 * CS, 1)  # chunk 0 is now the oldest of three: dropped
    assert reader.fetched == 3
    reader.read(3 * CS + 1, 1)
    reader.read(2 * CS + 1, 1)
    assert reader.fetched == 3
    reader.read(0, 1)
    assert reader.fetched == 4
    with pytest.raises(ValueError):
        ImageReader(store, store_image(store, image), cache_chunks=0)


def test_concurrent_reads_from_many_threads_agree(store: ChunkStore, image: bytes) -> None:
    reader = ImageReader(store, store_image(store, image), cache_chunks=2)
    errors: list[str] = []
    start = threading.Barrier(8)

    def work(seed: int) -> None:
        rng = random.Random(seed)
        start.wait()
        for _ in range(200):
            off = rng.randrange(len(image))
            n = rng.randrange(1, 3 * CS)
            if reader.read(off, n) != image[off:off + n]:
                errors.append(f"{off}+{n}")

    threads = [threading.Thread(target=work, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
