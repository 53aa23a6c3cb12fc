"""tools.thin.chunk_ranges: thin_delta's blocks as the byte ranges the proxy reads, aligned and
bounded; on the real tool's output (tests/fixtures/thin, made from thin_restore-built metadata)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from sanoffload.channel.messages import Delta
from sanoffload.errors import UsageError
from sanoffload.tools import thin
from sanoffload.tools.thin import Range

pytestmark = pytest.mark.unit

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "thin"
MIB = 1024 * 1024
C = 4 * MIB
BLOCK = 64 * 1024
BASE = "fs1/srv-thin-0a1b2c3d/20261125T020000Z"


def parsed(name: str, snap1: int, snap2: int, volume: int) -> thin.Delta:
    return thin.parse_delta((FIXTURES / name).read_bytes(), snap1=snap1, snap2=snap2,
                            volume_bytes=volume)


def test_the_recorded_base_delta_in_chunks() -> None:
    volume = 512 * MIB
    changed, discarded = thin.chunk_ranges(parsed("delta-bases.xml", 2, 3, volume), volume)
    # different 60+10 blocks -> chunks 0-1; left_only 1030+98 covers neither of chunks 16
    # and 17 whole -> read; right_only 3000+4 -> chunk 46; left_only 4096+64 = chunk 64
    assert changed == ((0, 2 * C), (16 * C, 2 * C), (46 * C, C))
    assert discarded == ((64 * C, C),)
    Delta(BASE, volume, C, changed, discarded)  # what the proxy checks, it passes


def test_the_recorded_pair_delta_ends_at_a_volume_not_a_whole_chunk() -> None:
    # 1024 blocks of 64 KiB = 64 MiB; cut at 64 MiB - 4 KiB: the last chunk is short
    volume = 1024 * BLOCK - 4096
    changed, discarded = thin.chunk_ranges(parsed("delta-pair.xml", 1, 2, volume), volume)
    # different 60+10, 95+5, right_only 100+4: chunks 0, 1; left_only 256+128 = chunks 4-5
    # whole; left_only 400+10 inside chunk 6; right_only 700+5 across chunks 10 and 11;
    # left_only 1023
    # reaches the volume's end inside chunk 15, which is partly discarded -> read
    assert changed == ((0, 2 * C), (6 * C, C), (10 * C, 2 * C), (15 * C, volume - 15 * C))
    assert discarded == ((4 * C, 2 * C),)
    Delta(BASE, volume, C, changed, discarded)


def test_a_discard_reaching_the_volumes_end_is_whole() -> None:
    volume = 10 * C - 512
    delta = thin.Delta(BLOCK, [], [Range(8 * C, 2 * C)])
    assert thin.chunk_ranges(delta, volume) == ((), ((8 * C, 2 * C - 512),))


def test_a_partly_discarded_chunk_is_changed() -> None:
    delta = thin.Delta(BLOCK, [], [Range(C + BLOCK, C)])
    assert thin.chunk_ranges(delta, 10 * C) == (((C, 2 * C),), ())


def test_neighbours_are_joined_cheapest_first_down_to_the_limit() -> None:
    # changed chunks 0, 2 and 20; one gap of 1 chunk, one of 17
    delta = thin.Delta(BLOCK, [Range(0, BLOCK), Range(2 * C, BLOCK), Range(20 * C, BLOCK)], [])
    assert thin.chunk_ranges(delta, 100 * C, max_ranges=3) == (
        ((0, C), (2 * C, C), (20 * C, C)), ())
    assert thin.chunk_ranges(delta, 100 * C, max_ranges=2) == (((0, 3 * C), (20 * C, C)), ())
    assert thin.chunk_ranges(delta, 100 * C, max_ranges=1) == (((0, 21 * C),), ())


def test_a_discard_inside_a_join_is_read() -> None:
    delta = thin.Delta(BLOCK, [Range(0, BLOCK), Range(50 * C, BLOCK)], [Range(10 * C, 2 * C)])
    changed, discarded = thin.chunk_ranges(delta, 100 * C, max_ranges=1)
    assert (changed, discarded) == (((0, 51 * C),), ())


def test_many_ranges_are_coalesced_to_the_limit_and_stay_correct() -> None:
    rng = random.Random(13)
    volume = 64 * 1024 * C  # 256 GiB: 65536 chunks
    changed: list[Range] = []
    discarded: list[Range] = []
    pos = 0
    while pos < volume - 8 * C:
        pos += rng.randrange(1, 6) * BLOCK * rng.randrange(1, 64)
        length = rng.randrange(1, 200) * BLOCK
        if pos + length > volume:
            break
        (changed if rng.random() < 0.7 else discarded).append(Range(pos, length))
        pos += length
    delta = thin.Delta(BLOCK, changed, discarded)
    full_c, full_d = thin.chunk_ranges(delta, volume)
    assert len(full_c) + len(full_d) > 1000
    small_c, small_d = thin.chunk_ranges(delta, volume, max_ranges=1000)
    assert len(small_c) + len(small_d) <= 1000
    Delta(BASE, volume, C, small_c, small_d)  # aligned, sorted, disjoint

    def chunks(ranges: tuple[tuple[int, int], ...]) -> set[int]:
        return {i for off, n in ranges for i in range(off // C, -(-(off + n) // C))}

    # every chunk read before is still read; a chunk said discarded was discarded before
    assert chunks(full_c) <= chunks(small_c)
    assert chunks(small_d) <= chunks(full_d)
    # nothing is claimed zeros that was read, and every changed block is in a read chunk
    assert not chunks(small_c) & chunks(small_d)
    read = chunks(small_c)
    for r in changed:
        assert set(range(r.start_byte // C, -(-r.end_byte // C))) <= read


def test_max_ranges_below_one_is_refused() -> None:
    with pytest.raises(UsageError):
        thin.chunk_ranges(thin.Delta(BLOCK, [], []), C, max_ranges=0)
