"""sanoffload.tools.thin: thin_delta output recorded from the real tool, and hostile XML."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from sanoffload.errors import CleanupError, CommandError, UsageError
from sanoffload.testing import FakeRunner
from sanoffload.tools import thin
from sanoffload.tools.thin import Delta, Range

pytestmark = pytest.mark.unit

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "thin"
KIB = 1024
MIB = 1024 * KIB
BLOCK = 64 * KIB  # data_block_size="128" in the fixtures
VOLUME = 1024 * BLOCK  # 64 MiB: the fixture's thin devices use blocks 0..1023
POOL = "vg0-pool0-tpool"
META = "/dev/mapper/vg0-pool0_tmeta"
THIN_DELTA = ["thin_delta", "--metadata-snap", "--snap1", "1", "--snap2", "2", META]


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


def blocks(*pairs: tuple[int, int]) -> list[Range]:
    """Ranges given as (first block, block count)."""
    return [Range(b * BLOCK, n * BLOCK) for b, n in pairs]


#: what restore-pair.xml implies: 1 -> 2
PAIR = Delta(BLOCK, changed=blocks((60, 10), (95, 9), (700, 5)),
             discarded=blocks((256, 128), (400, 10), (1023, 1)))


def doc(body: str, *, head: str = 'data_block_size="128" nr_data_blocks="1024"',
        diff: str = 'left="1" right="2"') -> str:
    return (f'<superblock uuid="" time="1" transaction="2" {head}>\n'
            f'  <diff {diff}>\n{body}\n  </diff>\n</superblock>')


# --------------------------------------------------------------------------
# Recorded output
# --------------------------------------------------------------------------

def test_recorded_delta_parses_into_merged_byte_ranges() -> None:
    # different 95+5 then right_only 100+4 are one changed range
    assert thin.parse_delta(fixture("delta-pair.xml"), snap1=1, snap2=2,
                            volume_bytes=VOLUME) == PAIR


def test_recorded_verbose_delta_gives_the_same_ranges() -> None:
    assert thin.parse_delta(fixture("delta-pair-verbose.xml"), snap1=1, snap2=2,
                            volume_bytes=VOLUME) == PAIR


def test_recorded_reversed_delta_swaps_changed_and_discarded() -> None:
    delta = thin.parse_delta(fixture("delta-pair-reversed.xml"), snap1=2, snap2=1)
    assert delta.changed == blocks((60, 10), (95, 5), (256, 128), (400, 10), (1023, 1))
    assert delta.discarded == blocks((100, 4), (700, 5))


def test_parse_reads_a_stream_in_pieces() -> None:
    stream = io.BytesIO(fixture("delta-pair.xml").encode())
    assert thin.parse_delta(stream, snap1=1, snap2=2) == PAIR


def test_thin_delta_runs_the_command_and_streams_its_output() -> None:
    runner = FakeRunner().on("thin_delta", stdout=fixture("delta-pair.xml"))
    assert thin.thin_delta(runner, META, 1, 2, volume_bytes=VOLUME) == PAIR
    assert runner.argvs() == [THIN_DELTA]


def test_thin_delta_without_metadata_snapshot_for_a_file() -> None:
    assert thin.thin_delta_argv("/tmp/meta", 3, 4, use_metadata_snap=False) == [
        "thin_delta", "--snap1", "3", "--snap2", "4", "/tmp/meta"]


@pytest.mark.parametrize("err", ["no-metadata-snap.err", "unknown-snap.err"])
def test_thin_delta_failure_is_a_command_error_with_its_message(err: str) -> None:
    message = fixture(err)
    runner = FakeRunner().on("thin_delta", returncode=1, stderr=message)
    with pytest.raises(CommandError) as caught:
        thin.thin_delta(runner, META, 1, 2)
    assert message.splitlines()[0] in str(caught.value)


@pytest.mark.hostile("agent", "thin_delta argv: relative metadata path, id past 24 bits, bool id",
                     "UsageError, nothing run")
@pytest.mark.parametrize("args", [("meta", 1, 2), ("-meta", 1, 2), (META, 1 << 24, 2),
                                  (META, -1, 2), (META, True, 2)])
def test_thin_delta_argv_refuses_bad_arguments(args: tuple[str, int, int]) -> None:
    with pytest.raises(UsageError):
        thin.thin_delta_argv(*args)


# --------------------------------------------------------------------------
# Hostile output
# --------------------------------------------------------------------------

LAUGHS = ('<?xml version="1.0"?>\n<!DOCTYPE lolz [<!ENTITY lol "lol">'
          '<!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">]>\n'
          + doc('<same begin="0" length="1"/>&lol2;'))
EXTERNAL = ('<!DOCTYPE superblock SYSTEM "file:///etc/passwd">'
            + doc('<same begin="0" length="1"/>'))

HOSTILE: dict[str, tuple[str, str]] = {
    "billion laughs": (LAUGHS, "DOCTYPE"),
    "external DTD": (EXTERNAL, "DOCTYPE"),
    "undefined entity": (doc('<same begin="0" length="1"/>&xxe;'), "not well-formed"),
    "processing instruction": (doc('<?php echo 1 ?>'), "processing instruction"),
    "CDATA": (doc('<![CDATA[x]]>'), "CDATA"),
    "unknown element": (doc('<changed begin="0" length="1"/>'), "unexpected element <changed>"),
    "unknown element in range": (doc('<different><range begin="0" length="1"><x/></range>'
                                     '</different>'), "unexpected element <x>"),
    "range outside a kind": (doc('<range begin="0" length="1"/>'), "unexpected element <range>"),
    "two diffs": (doc('<same begin="0" length="1"/></diff><diff left="1" right="2">'),
                  "unexpected element <diff>"),
    "unknown attribute": (doc('<different begin="0" length="1" units="bytes"/>'),
                          "unknown attributes units"),
    "unknown superblock attribute": (doc("", head='data_block_size="128" nr_data_blocks="1" '
                                              'sector_size="4096"'), "unknown attributes"),
    "text": (doc('hello'), "unexpected text"),
    "negative begin": (doc('<different begin="-1" length="2"/>'), "not a block number"),
    "hex begin": (doc('<different begin="0x10" length="2"/>'), "not a block number"),
    "spaced number": (doc('<different begin=" 1" length="2"/>'), "not a block number"),
    "u64 overflow": (doc('<right_only begin="18446744073709551616" length="1"/>'),
                     "not a block number"),
    "missing length": (doc('<different begin="1"/>'), "has no length"),
    "zero length": (doc('<different begin="1" length="0"/>'), "length 0"),
    "overlap": (doc('<different begin="0" length="4"/>\n<left_only begin="3" length="1"/>'),
                "overlaps"),
    "unsorted": (doc('<different begin="8" length="1"/>\n<right_only begin="2" length="1"/>'),
                 "overlaps or precedes"),
    "past the volume": (doc('<right_only begin="1023" length="2"/>'), "reach past the volume"),
    "starts past the volume": (doc('<left_only begin="5000" length="1"/>'),
                               "reach past the volume"),
    "block size 0": (doc("", head='data_block_size="0" nr_data_blocks="1"'), "no pool's"),
    "block size 1 sector": (doc("", head='data_block_size="1" nr_data_blocks="1"'), "no pool's"),
    "block size 4 GiB": (doc("", head='data_block_size="8388608" nr_data_blocks="1"'),
                         "no pool's"),
    "block size not 64 KiB steps": (doc("", head='data_block_size="200" nr_data_blocks="1"'),
                                    "no pool's"),
    "no block size": (doc("", head='nr_data_blocks="1"'), "has no data_block_size"),
    "other devices": (doc("", diff='left="1" right="3"'), "asked for 1 and 2"),
    "no diff": ('<superblock data_block_size="128" nr_data_blocks="1"></superblock>',
                "no <superblock><diff>"),
    "empty": ("", "not well-formed"),
    "truncated": (fixture("delta-pair.xml")[:200], "not well-formed"),
    "trailing junk": (fixture("delta-pair.xml") + "<superblock/>", "not well-formed"),
    "other root": ('<html><diff left="1" right="2"/></html>', "unexpected element <html>"),
}


@pytest.mark.hostile("agent", "thin_delta output: DOCTYPE/entities, unknown elements or "
                              "attributes, bad numbers, unsorted/overlapping ranges, ranges "
                              "past the volume, impossible block size, wrong devices, cut short",
                     "CommandError naming what was refused; no range used")
@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_output_is_refused(name: str) -> None:
    text, message = HOSTILE[name]
    with pytest.raises(CommandError) as caught:
        thin.parse_delta(text, snap1=1, snap2=2, volume_bytes=VOLUME)
    assert message in str(caught.value)
    assert "thin_delta output refused" in str(caught.value)


@pytest.mark.hostile("agent", "hostile thin_delta output arriving from the running tool",
                     "CommandError naming what was refused")
def test_hostile_streamed_output_is_refused() -> None:
    runner = FakeRunner().on("thin_delta", stdout=LAUGHS)
    with pytest.raises(CommandError, match="DOCTYPE"):
        thin.thin_delta(runner, META, 1, 2)


def test_control_characters_in_refused_output_are_escaped() -> None:
    with pytest.raises(CommandError) as caught:
        thin.parse_delta(doc('<different begin="1\x1b[2J" length="1"/>'))
    assert "\x1b" not in str(caught.value)


def test_last_block_may_reach_past_a_volume_that_is_not_whole_blocks() -> None:
    volume = VOLUME - 4096
    delta = thin.parse_delta(doc('<right_only begin="1023" length="1"/>'), volume_bytes=volume)
    assert delta.changed == [Range(1023 * BLOCK, BLOCK - 4096)]


def test_empty_delta() -> None:
    delta = thin.parse_delta(doc('<same begin="0" length="1024"/>'), volume_bytes=VOLUME)
    assert delta == Delta(BLOCK, [], [])
    assert thin.changed_chunks(delta, VOLUME) == []
    assert thin.discarded_chunks(delta, VOLUME) == []


# --------------------------------------------------------------------------
# Chunks
# --------------------------------------------------------------------------

def test_recorded_delta_chunks() -> None:
    # 4 MiB chunks are 64 blocks: 60+10 crosses 0|1 and 700+5 crosses 10|11; 256+128 is
    # chunks 4 and 5 exactly; 400+10 is part of chunk 6, 1023 part of chunk 15: read again
    assert thin.changed_chunks(PAIR, VOLUME) == [0, 1, 6, 10, 11, 15]
    assert thin.discarded_chunks(PAIR, VOLUME) == [4, 5]


def test_range_crossing_a_chunk_boundary_touches_both() -> None:
    delta = Delta(BLOCK, [Range(4 * MIB - 512, 1024)], [])
    assert thin.changed_chunks(delta, VOLUME) == [0, 1]


def test_range_ending_on_a_boundary_does_not_touch_the_next() -> None:
    delta = Delta(BLOCK, [Range(0, 4 * MIB)], [Range(8 * MIB, 4 * MIB)])
    assert thin.changed_chunks(delta, VOLUME) == [0]
    assert thin.discarded_chunks(delta, VOLUME) == [2]


def test_discard_up_to_the_end_of_a_short_last_chunk_is_whole() -> None:
    volume = 10 * MIB  # chunks 0, 1 and a last one of 2 MiB
    delta = Delta(BLOCK, [], [Range(8 * MIB, 2 * MIB)])
    assert thin.discarded_chunks(delta, volume) == [2]
    assert thin.changed_chunks(delta, volume) == []


def test_discard_short_of_the_end_of_the_last_chunk_is_a_change() -> None:
    volume = 10 * MIB
    delta = Delta(BLOCK, [], [Range(8 * MIB, MIB)])
    assert thin.discarded_chunks(delta, volume) == []
    assert thin.changed_chunks(delta, volume) == [2]


def test_discard_spanning_chunks_counts_only_whole_ones() -> None:
    delta = Delta(BLOCK, [], [Range(2 * MIB, 12 * MIB)])  # half of 0, 1, 2, half of 3
    assert thin.discarded_chunks(delta, VOLUME) == [1, 2]
    assert thin.changed_chunks(delta, VOLUME) == [0, 3]


def test_changed_range_at_the_end_of_the_volume() -> None:
    delta = Delta(BLOCK, [Range(VOLUME - BLOCK, BLOCK)], [])
    assert thin.changed_chunks(delta, VOLUME) == [VOLUME // (4 * MIB) - 1]


@pytest.mark.hostile("agent", "chunk mapping: range past the volume, zero or odd chunk size",
                     "UsageError")
@pytest.mark.parametrize(("volume", "chunk"), [(VOLUME, 0), (VOLUME, 1000), (0, 4 * MIB),
                                               (VOLUME - 64 * MIB + BLOCK, 4 * MIB)])
def test_chunk_mapping_refuses_bad_sizes(volume: int, chunk: int) -> None:
    delta = Delta(BLOCK, [Range(BLOCK, BLOCK)], [Range(8 * MIB, BLOCK)])
    with pytest.raises(UsageError):
        thin.changed_chunks(delta, volume, chunk)


# --------------------------------------------------------------------------
# Metadata snapshot
# --------------------------------------------------------------------------

RESERVE = ["dmsetup", "message", POOL, "0", "reserve_metadata_snap"]
RELEASE = ["dmsetup", "message", POOL, "0", "release_metadata_snap"]


def test_metadata_snap_reserves_then_releases() -> None:
    runner = FakeRunner().on("dmsetup").on("thin_delta", stdout=fixture("delta-pair.xml"))
    with thin.metadata_snap(runner, POOL):
        thin.thin_delta(runner, META, 1, 2)
    assert runner.argvs() == [RESERVE, THIN_DELTA, RELEASE]


def test_metadata_snap_releases_when_the_block_fails() -> None:
    runner = FakeRunner().on("dmsetup").on("thin_delta", returncode=1,
                                           stderr=fixture("unknown-snap.err"))
    with pytest.raises(CommandError, match="Unable to find mapping tree"):
        with thin.metadata_snap(runner, POOL):
            thin.thin_delta(runner, META, 1, 2)
    assert runner.argvs()[-1] == RELEASE


def test_release_failure_becomes_a_note_and_the_first_error_goes_on() -> None:
    runner = (FakeRunner().on("dmsetup").on(*RELEASE, returncode=1, stderr="ioctl failed")
              .on("thin_delta", stdout=LAUGHS))
    with pytest.raises(CommandError) as caught:
        with thin.metadata_snap(runner, POOL):
            thin.thin_delta(runner, META, 1, 2)
    assert "DOCTYPE" in str(caught.value)
    notes = "\n".join(getattr(caught.value, "__notes__", []))
    assert "release_metadata_snap" in notes and "ioctl failed" in notes


def test_release_failure_after_success_is_a_cleanup_error() -> None:
    runner = FakeRunner().on("dmsetup").on(*RELEASE, returncode=1, stderr="ioctl failed")
    with pytest.raises(CleanupError):
        with thin.metadata_snap(runner, POOL):
            pass


def test_failed_reserve_releases_nothing() -> None:
    runner = FakeRunner().on("dmsetup", returncode=1, stderr="Device or resource busy")
    with pytest.raises(CommandError):
        with thin.metadata_snap(runner, POOL):
            pytest.fail("the block ran without a snapshot")
    assert runner.argvs() == [RESERVE]


@pytest.mark.hostile("agent", "pool name: not a -tpool device, a leading '-', a slash, "
                              "a control character",
                     "UsageError, no dmsetup run")
@pytest.mark.parametrize("name", ["vg0-pool0", "-tpool", "--help-tpool", "vg0/pool0-tpool",
                                  "vg0-pool0\n-tpool", ""])
def test_bad_pool_name_is_refused_before_dmsetup(name: str) -> None:
    runner = FakeRunner()
    with pytest.raises(UsageError):
        with thin.metadata_snap(runner, name):
            pass
    assert runner.calls == []
