"""``sanoffload.proxy.image``: reading a duplicate's chunks into an ImageSink.

The "device" is a regular file in tmp_path (read with O_DIRECT where the
filesystem allows it), cut into 64 KiB chunks so the volumes stay small; the
sink is :class:`RecordingSink`, our own ImageSink interface recorded (no external
tool stands behind it). Reads are counted at ``os.preadv``, the one call the
reader reads the device with.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from sanoffload.channel.messages import Delta
from sanoffload.errors import IntegrityError, ProtocolError, ResourceError
from sanoffload.proxy import image
from sanoffload.proxy.image import compare_image, read_image
from sanoffload.store.chunks import decode_chunk
from sanoffload.store.imagemap import ZERO, ChunkMap

pytestmark = pytest.mark.unit

CS = 64 << 10  # the smallest chunk size a map takes: small test volumes
RAW = image.raw_encode


class RecordingSink:
    """An ImageSink that records every call; ``held`` are the ids the "store" already has."""

    def __init__(self, held: set[str] | None = None, previous: ChunkMap | None = None) -> None:
        self.held = set(held or ())
        self.previous = previous
        self.asked: list[list[str]] = []
        self.put: list[tuple[str, int, int, int]] = []
        self.extra: set[str] = set()  # what missing() answers beyond the truth

    def previous_map(self, backup_id: str) -> ChunkMap | None:
        return self.previous

    def missing(self, chunk_ids: Sequence[str]) -> set[str]:
        assert len(chunk_ids) <= 4096
        self.asked.append(list(chunk_ids))
        return {c for c in chunk_ids if c not in self.held} | self.extra

    def put_chunk(self, chunk_id: str, codec: int, payload: bytes, plain_bytes: int) -> None:
        plain = decode_chunk(codec, payload, plain_bytes)
        assert hashlib.sha256(plain).hexdigest() == chunk_id  # what the store re-checks
        self.put.append((chunk_id, codec, len(payload), plain_bytes))
        self.held.add(chunk_id)

    def commit(self, chunk_map: ChunkMap, fields: Mapping[str, Any]) -> dict[str, Any]:
        raise AssertionError("read_image never commits")

    def abort(self, reason: str = "the backup failed") -> None:
        raise AssertionError("read_image never aborts")


def piece(i: int, length: int = CS, salt: bytes = b"") -> bytes:
    """Distinct, incompressible-enough content for chunk ``i``."""
    seed = hashlib.sha256(b"%d" % i + salt).digest()
    return (seed * (length // 32 + 1))[:length]


def make_volume(path: Path, pieces: list[bytes]) -> Path:
    path.write_bytes(b"".join(pieces))
    return path


def sha(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """Every (offset, length) the reader asks of the device."""
    seen: list[tuple[int, int]] = []
    real = os.preadv

    def counting(fd: int, buffers: Any, offset: int, *rest: Any) -> int:
        seen.append((offset, sum(len(b) for b in buffers)))
        return real(fd, buffers, offset, *rest)

    monkeypatch.setattr(os, "preadv", counting)
    return seen


def delta(size: int, changed: list[tuple[int, int]], discarded: Sequence[tuple[int, int]] = (),
          base: str = "fs1/srv-thin-1/20261126T102933Z", chunk: int = CS) -> Delta:
    return Delta(base=base, volume_bytes=size, chunk_bytes=chunk, changed=tuple(changed),
                 discarded=tuple(discarded))


# -- a full read ----------------------------------------------------------------------------
def test_full_read_maps_every_chunk_and_stores_only_what_is_missing(
        tmp_path: Path, reads: list[tuple[int, int]]) -> None:
    tail = 5000  # not a multiple of 512: the last chunk's aligned read ends at the file's end
    pieces = [piece(0), bytes(CS), piece(2), piece(0), piece(4), piece(5, tail)]
    dev = make_volume(tmp_path / "vol", pieces)
    sink = RecordingSink(held={sha(piece(4)).hex()})
    res = read_image(str(dev), sink, delta=None, previous=None, encode=RAW, chunk_size=CS,
                     window=2)
    m = res.chunk_map
    assert (m.size, m.chunk_size, m.count) == (5 * CS + tail, CS, 6)
    assert [m.digest(i) for i in range(6)] == [sha(piece(0)), ZERO, sha(piece(2)),
                                               sha(piece(0)), sha(piece(4)), sha(piece(5, tail))]
    assert res.full and res.full_reason is not None and "no delta" in res.full_reason
    assert (res.chunks_read, res.read_bytes) == (6, 5 * CS + tail)
    assert res.chunks_zero == 1
    # the zero chunk is never asked for nor stored; the store's chunk 4 is not put again;
    # piece 0 twice in one window... and in two windows: asked again, put once
    put_ids = [p[0] for p in sink.put]
    assert put_ids == [sha(piece(0)).hex(), sha(piece(2)).hex(), sha(piece(5, tail)).hex()]
    assert all(ZERO.hex() not in batch for batch in sink.asked)
    assert all(len(batch) <= 2 for batch in sink.asked)
    assert res.chunks_new == 3 and res.new_bytes == 2 * CS + tail
    assert res.changed == 6 and list(res.read_indexes()) == list(range(6))
    # each chunk read once, at its volume offset, aligned (the tail rounded up to 4096)
    assert [off for off, _ in reads] == [i * CS for i in range(6)]
    assert reads[-1][1] == 8192


def test_the_same_chunk_twice_in_one_window_is_put_once(tmp_path: Path) -> None:
    dev = make_volume(tmp_path / "vol", [piece(7), piece(7), piece(7)])
    sink = RecordingSink()
    res = read_image(str(dev), sink, delta=None, previous=None, encode=RAW, chunk_size=CS,
                     window=4)
    assert sink.asked == [[sha(piece(7)).hex()]]
    assert len(sink.put) == 1 and res.chunks_new == 1


def test_the_default_encoder_compresses_what_it_can(tmp_path: Path) -> None:
    pytest.importorskip("zstandard")
    text = (b"sanoffload " * (CS // 11 + 1))[:CS]
    dev = make_volume(tmp_path / "vol", [text])
    sink = RecordingSink()
    res = read_image(str(dev), sink, delta=None, previous=None, chunk_size=CS)
    (_cid, codec, payload, plain), = sink.put
    assert codec == 1 and payload < plain == CS and res.new_bytes == payload


def test_an_all_zero_volume_stores_nothing(tmp_path: Path) -> None:
    dev = make_volume(tmp_path / "vol", [bytes(CS)] * 3)
    sink = RecordingSink()
    res = read_image(str(dev), sink, delta=None, previous=None, encode=RAW, chunk_size=CS)
    assert res.chunk_map.referenced() == set() and res.chunks_zero == 3
    assert sink.asked == [] and sink.put == []


@pytest.mark.hostile("proxy", "the store's missing() names a chunk that was not asked about",
                     "ignored: only chunks read are put")
def test_missing_answers_beyond_the_question_are_ignored(tmp_path: Path) -> None:
    dev = make_volume(tmp_path / "vol", [piece(1)])
    sink = RecordingSink(held={sha(piece(1)).hex()})
    sink.extra = {"ab" * 32}
    read_image(str(dev), sink, delta=None, previous=None, encode=RAW, chunk_size=CS)
    assert sink.put == []


# -- an incremental read --------------------------------------------------------------------
def _base(tmp_path: Path, n: int = 8) -> tuple[Path, ChunkMap, list[bytes]]:
    pieces = [piece(i) for i in range(n)]
    dev = make_volume(tmp_path / "vol", pieces)
    first = read_image(str(dev), RecordingSink(), delta=None, previous=None, encode=RAW,
                       chunk_size=CS)
    return dev, first.chunk_map, pieces


def test_a_delta_reads_only_the_changed_chunks(tmp_path: Path,
                                               reads: list[tuple[int, int]]) -> None:
    dev, prev, pieces = _base(tmp_path)
    reads.clear()
    # chunks 1-2 and 6 changed; chunk 4 is changed on "disk" too but the delta does not say
    # so: a chunk it does not name is never read, so the map keeps the base's entry
    new = list(pieces)
    new[1], new[2], new[6] = piece(1, salt=b"x"), bytes(CS), piece(6, salt=b"y")
    new[4] = piece(4, salt=b"not-in-the-delta")
    make_volume(dev, new)
    sink = RecordingSink(held=prev.referenced(), previous=prev)
    d = delta(8 * CS, changed=[(CS, 2 * CS), (6 * CS, CS)], discarded=[(3 * CS, CS)])
    res = read_image(str(dev), sink, delta=d, previous=prev, encode=RAW, chunk_size=CS)
    assert sorted(off for off, _ in reads) == [CS, 2 * CS, 6 * CS]
    assert not res.full and res.full_reason is None
    assert (res.chunks_read, res.read_bytes) == (3, 3 * CS)
    m = res.chunk_map
    assert m.digest(1) == sha(new[1]) and m.digest(2) == ZERO and m.digest(6) == sha(new[6])
    assert m.digest(3) == ZERO  # discarded: zero without a read
    assert m.digest(4) == prev.digest(4) == sha(pieces[4])
    assert [m.digest(i) for i in (0, 5, 7)] == [prev.digest(i) for i in (0, 5, 7)]
    assert [p[0] for p in sink.put] == [sha(new[1]).hex(), sha(new[6]).hex()]
    assert (res.changed, res.chunks_discarded, res.chunks_zero) == (4, 1, 1)
    assert list(res.read_indexes()) == [1, 2, 6]


def test_a_delta_without_the_base_map_reads_everything(tmp_path: Path,
                                                       reads: list[tuple[int, int]]) -> None:
    dev, _, _ = _base(tmp_path, 4)
    reads.clear()
    res = read_image(str(dev), RecordingSink(), delta=delta(4 * CS, [(0, CS)]), previous=None,
                     encode=RAW, chunk_size=CS)
    assert res.full and "no map of the base backup" in str(res.full_reason)
    assert len(reads) == 4


def test_a_base_map_of_another_size_reads_everything(tmp_path: Path) -> None:
    dev, _, _ = _base(tmp_path, 4)
    other = ChunkMap.zeros(8 * CS, CS)
    res = read_image(str(dev), RecordingSink(), delta=delta(4 * CS, [(0, CS)]), previous=other,
                     encode=RAW, chunk_size=CS)
    assert res.full and res.chunks_read == 4


def test_a_short_last_chunk_in_a_delta(tmp_path: Path) -> None:
    pieces = [piece(0), piece(1, 1000)]
    dev = make_volume(tmp_path / "vol", pieces)
    size = CS + 1000
    prev = read_image(str(dev), RecordingSink(), delta=None, previous=None, encode=RAW,
                      chunk_size=CS).chunk_map
    make_volume(dev, [pieces[0], piece(1, 1000, b"z")])
    res = read_image(str(dev), RecordingSink(), delta=delta(size, [(CS, 1000)]),
                     previous=prev, encode=RAW, chunk_size=CS)
    assert res.chunk_map.digest(1) == sha(piece(1, 1000, b"z")) and res.read_bytes == 1000


# -- hostile deltas ---------------------------------------------------------------------------
SIZE = 8 * CS
# a delta's ranges are checked as it arrives (Delta.from_wire; the offhost tests send
# hostile ones over the wire): here, what only the attached device can tell
HOSTILE_DELTAS = [
    pytest.param(2 * SIZE, CS, "attached device holds",
                 marks=pytest.mark.hostile("proxy", "a delta of another volume size than the "
                                           "attached LUN's", "refused (exit 11) before "
                                           "anything is read"),
                 id="wrong-volume-size"),
    pytest.param(SIZE - 4096, CS, "attached device holds",
                 marks=pytest.mark.hostile("proxy", "a delta of a volume a little smaller than "
                                           "the attached LUN", "refused (exit 11)"),
                 id="smaller-volume"),
    pytest.param(SIZE, 2 * CS, "chunks, not",
                 marks=pytest.mark.hostile("proxy", "a delta in another chunk size than the "
                                           "image's", "refused (exit 11)"),
                 id="wrong-chunk-size"),
]


@pytest.mark.parametrize(("volume", "chunk", "says"), HOSTILE_DELTAS)
def test_deltas_of_another_geometry_are_refused_before_a_read(
        tmp_path: Path, reads: list[tuple[int, int]], volume: int, chunk: int,
        says: str) -> None:
    dev, prev, _ = _base(tmp_path)
    bad = delta(volume, [(0, chunk)], chunk=chunk)
    reads.clear()
    sink = RecordingSink(previous=prev)
    with pytest.raises(ProtocolError, match=says) as err:
        read_image(str(dev), sink, delta=bad, previous=prev, encode=RAW, chunk_size=CS)
    assert err.value.exit_code == 11
    assert reads == [] and sink.asked == [] and sink.put == []


# -- read errors ------------------------------------------------------------------------------
@pytest.mark.hostile("proxy", "the device ends early while its chunks are read (a short read)",
                     "an error naming the device and the offset; nothing committed")
def test_a_short_read_names_the_device_and_offset(tmp_path: Path) -> None:
    dev = make_volume(tmp_path / "vol", [piece(i) for i in range(6)])

    def shrink(done: int) -> None:
        if done == CS:  # after the first chunk: the "device" loses its end
            os.truncate(dev, 3 * CS + 10)

    with pytest.raises(ResourceError, match=rf"{dev}: short read at offset {3 * CS}"):
        read_image(str(dev), RecordingSink(), delta=None, previous=None, encode=RAW,
                   chunk_size=CS, window=1, progress=shrink)


def test_a_volume_that_cannot_be_opened(tmp_path: Path) -> None:
    with pytest.raises(ResourceError, match="cannot open"):
        read_image(str(tmp_path / "absent"), RecordingSink(), delta=None, previous=None,
                   encode=RAW, chunk_size=CS)


# -- compare ----------------------------------------------------------------------------------
def test_compare_image_passes_and_then_names_the_changed_chunk(tmp_path: Path) -> None:
    dev, prev, _ = _base(tmp_path)
    assert compare_image(str(dev), prev, range(prev.count), window=3) == 8
    with open(dev, "r+b") as f:
        f.seek(5 * CS + 123)
        f.write(b"!")
    assert compare_image(str(dev), prev, [0, 1, 2]) == 3  # only what is asked for is read
    with pytest.raises(IntegrityError, match=rf"chunk 5 at offset {5 * CS} differs"):
        compare_image(str(dev), prev, range(prev.count))


def test_compare_image_of_another_size_or_index_is_refused(tmp_path: Path) -> None:
    dev, prev, _ = _base(tmp_path)
    with pytest.raises(IndexError):
        compare_image(str(dev), prev, [8])
    with pytest.raises(IntegrityError, match="holds"):
        compare_image(str(dev), ChunkMap.zeros(4 * CS, CS), [0])
