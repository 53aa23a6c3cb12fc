"""The chunk map of an image backup (issue 13): geometry, merge, and hostile bytes."""

from __future__ import annotations

import hashlib
import struct

import pytest

from sanoffload.errors import IntegrityError
from sanoffload.store.imagemap import (
    DIGEST_BYTES,
    HEADER,
    MAGIC,
    MAX_IMAGE_BYTES,
    ZERO,
    ChunkMap,
)

pytestmark = pytest.mark.unit

CS = 64 << 10


def _digest(text: bytes) -> bytes:
    return hashlib.sha256(text).digest()


def test_round_trip_merge_and_referenced() -> None:
    m = ChunkMap.zeros(3 * CS + 100, CS)
    assert m.count == 4 and m.span(3) == (3 * CS, 100) and list(m) == [None] * 4
    a, b = _digest(b"a"), _digest(b"b")
    n = m.merged({0: a, 3: b, 1: a})
    assert n.referenced() == {a.hex(), b.hex()} and n.chunk_id(2) is None
    back = ChunkMap.from_bytes(n.to_bytes())
    assert back == n and back.sha256() == hashlib.sha256(n.to_bytes()).hexdigest()
    assert n.merged({0: ZERO}).chunk_id(0) is None


def _header(size: int, count: int, chunk_size: int = CS, magic: bytes = MAGIC,
            version: int = 1) -> bytes:
    return HEADER.pack(magic, version, 0, chunk_size, size, count)


@pytest.mark.hostile("store", "a chunk map cut short, with a wrong entry count, a huge size, "
                     "a bad chunk size, magic or version, or bytes appended",
                     "IntegrityError naming what is wrong, before anything is allocated")
@pytest.mark.parametrize("blob, match", [
    (b"SOIMAP", "shorter than its header"),
    (_header(2 * CS, 2) + bytes(DIGEST_BYTES), "expected"),            # truncated
    (_header(2 * CS, 2) + bytes(3 * DIGEST_BYTES), "expected"),        # appended
    (_header(2 * CS, 3) + bytes(3 * DIGEST_BYTES), "3 entries"),       # wrong count
    (_header(MAX_IMAGE_BYTES + 1, 2), "image size"),                   # huge size
    (_header(1 << 62, (1 << 62) // CS), "image size"),
    (_header(CS, 1, chunk_size=CS + 1) + bytes(DIGEST_BYTES), "chunk size"),
    (_header(CS, 1, chunk_size=1 << 30) + bytes(DIGEST_BYTES), "chunk size"),
    (_header(CS, 1, magic=b"SOIMAQ") + bytes(DIGEST_BYTES), "not a sanoffload"),
    (_header(CS, 1, version=2) + bytes(DIGEST_BYTES), "version"),
    (_header(0, 0), "image size"),
])
def test_hostile_maps_are_refused(blob: bytes, match: str) -> None:
    with pytest.raises(IntegrityError, match=match):
        ChunkMap.from_bytes(blob)


def test_a_huge_count_is_refused_without_allocating() -> None:
    # a header claiming 2**60 entries on a few bytes: refused by arithmetic alone
    blob = struct.pack(">6sBBIQQ", MAGIC, 1, 0, CS, MAX_IMAGE_BYTES, 1 << 60)
    with pytest.raises(IntegrityError, match="entries"):
        ChunkMap.from_bytes(blob)
