"""Thin pools: which blocks changed between two thin devices (``thin_delta``).

A live pool's metadata may only be read through a metadata snapshot, which
the pool's thin-pool target (the ``-tpool`` device of an LVM pool) reserves
and releases on request::

    dmsetup message VG-POOL-tpool 0 reserve_metadata_snap
    dmsetup message VG-POOL-tpool 0 release_metadata_snap

A reserved snapshot pins metadata blocks until released, so
:func:`metadata_snap` always releases it. Between the two::

    thin_delta --metadata-snap --snap1 BASE_ID --snap2 NEW_ID /dev/mapper/VG-POOL_tmeta
    thin_delta --snap1 BASE_ID --snap2 NEW_ID META_FILE     # a file (tests): no snapshot

Not ``--verbose``: it adds the data-block addresses, which say nothing about
what to read, at several times the size. The output (thin-provisioning-tools
0.9.0, recorded in tests/fixtures/thin/)::

    <superblock uuid="" time="1" transaction="2" data_block_size="128" nr_data_blocks="1000">
      <diff left="1" right="2">
        <same begin="0" length="3"/>
        <different begin="3" length="2"/>      # mapped in both, to other data: changed
        <left_only begin="10" length="1"/>     # unmapped in the new one: discarded
        <right_only begin="30" length="4"/>    # newly mapped: changed
      </diff>
    </superblock>

``begin`` and ``length`` count the pool's data blocks of ``data_block_size``
sectors (512 bytes) in the thin device's own address space. The output is
hostile until checked: it is parsed by expat as it streams (bounded memory),
with no DOCTYPE and so no entity of any kind (the stdlib's expat alone, not
``defusedxml``: refusing the DOCTYPE at its first event is all that would
bring, and it would be a new dependency), every element and attribute known,
every number plain decimal and in range, the ranges sorted and disjoint and
inside the volume.
"""

from __future__ import annotations

import heapq
import logging
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO
from xml.parsers import expat

from ..errors import CommandError, UsageError
from ..requirements import Requirement
from ..runner import Runner
from ..text import printable
from ..undo import UndoStack

log = logging.getLogger(__name__)

REQUIRES: tuple[Requirement, ...] = (
    # optional: without it an image backup of a thin volume reads the whole volume
    Requirement("thin_delta", "thin-provisioning-tools (thin_delta)", roles=(),
                optional_for=("agent",),
                fails_without="no block-level incremental backup of thin volumes "
                              "(every image backup reads the whole volume)",
                executables=("thin_delta",)),
    # optional: without it no thin base is kept (the same full read); part of LVM's tools
    Requirement("lvrename", "LVM tools (lvrename)", roles=(), optional_for=("agent",),
                fails_without="no thin base is kept for image backups (every image backup "
                              "reads the whole volume)",
                executables=("lvrename",)),
    Requirement("dmsetup", "device-mapper tool", roles=("agent",),
                fails_without="cannot reserve a thin pool's metadata snapshot "
                              "(no block-level incremental backup)",
                executables=("dmsetup",), kernel=("device-mapper",)),
)

SECTOR = 512
MIB = 1024 * 1024
#: the proxy's unit of reading, hashing and storing; aligned to volume offsets
CHUNK_BYTES = 4 * MIB
#: the kernel's limits on a pool's data block (dm-thin.c): 64 KiB .. 1 GiB, in 64 KiB steps
MIN_DATA_BLOCK_SECTORS = 128
MAX_DATA_BLOCK_SECTORS = 2097152
#: thin device ids are 24 bits in the metadata
MAX_THIN_ID = (1 << 24) - 1
#: a block number or count past this is no pool's (u64 in the metadata)
MAX_U64 = (1 << 64) - 1

DMSETUP_TIMEOUT = 30.0
#: thin_delta walks both devices' mapping trees: minutes on a big, fragmented pool
THIN_DELTA_TIMEOUT = 1800.0
_READ_SIZE = 1 << 16

# device-mapper names as LVM makes them; a leading '-' would read as an option
_DM_NAME_RE = re.compile(r"^[A-Za-z0-9+_.][A-Za-z0-9+_.-]{0,126}$")
_NUMBER_RE = re.compile(r"^[0-9]{1,20}$")

_SUPERBLOCK_ATTRS = frozenset({"uuid", "time", "transaction", "flags", "version",
                               "data_block_size", "nr_data_blocks"})
_KINDS = ("same", "different", "left_only", "right_only")
#: attributes of a verbose ``<range>``: data addresses, checked as numbers, then unused
_VERBOSE_RANGE_ATTRS = frozenset({"begin", "length", "data_begin", "left_data_begin",
                                  "right_data_begin"})


# --------------------------------------------------------------------------
# Metadata snapshot
# --------------------------------------------------------------------------

def check_pool_dm_name(name: str) -> str:
    """The thin-pool target's device-mapper name (``VG-POOL-tpool``), or UsageError."""
    if not _DM_NAME_RE.match(name) or not name.endswith("-tpool"):
        raise UsageError(f"not the device-mapper name of a thin-pool target: {printable(name)}",
                         hint="the pool's -tpool device, e.g. vg0-pool0-tpool")
    return name


def metadata_snap_argv(pool_dm_name: str, action: str) -> list[str]:
    """``dmsetup message POOL-tpool 0 reserve_metadata_snap|release_metadata_snap``."""
    if action not in ("reserve_metadata_snap", "release_metadata_snap"):
        raise ValueError(f"unknown pool message {action!r}")
    return ["dmsetup", "message", check_pool_dm_name(pool_dm_name), "0", action]


def reserve_metadata_snap(runner: Runner, pool_dm_name: str) -> None:
    """Reserve the pool's metadata snapshot (fails if one is already reserved)."""
    runner.run(metadata_snap_argv(pool_dm_name, "reserve_metadata_snap"),
               timeout=DMSETUP_TIMEOUT)


def release_metadata_snap(runner: Runner, pool_dm_name: str) -> None:
    """Release the pool's metadata snapshot."""
    runner.run(metadata_snap_argv(pool_dm_name, "release_metadata_snap"),
               timeout=DMSETUP_TIMEOUT)


@contextmanager
def metadata_snap(runner: Runner, pool_dm_name: str) -> Iterator[None]:
    """Hold the pool's metadata snapshot for the block; always released.

    A release failure after an error becomes a note on that error (which goes
    on); after success it raises :class:`~sanoffload.errors.CleanupError`.
    """
    with UndoStack() as undo:
        reserve_metadata_snap(runner, pool_dm_name)
        undo.push(f"release the metadata snapshot of {pool_dm_name}",
                  release_metadata_snap, runner, pool_dm_name)
        yield


# --------------------------------------------------------------------------
# thin_delta
# --------------------------------------------------------------------------

def _check_thin_id(value: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_THIN_ID:
        raise UsageError(f"{what}: not a thin device id: {value!r}")
    return value


def thin_delta_argv(metadata_dev: str, snap1: int, snap2: int, *,
                    use_metadata_snap: bool = True) -> list[str]:
    """The thin_delta command line; ``use_metadata_snap=False`` only for a metadata file."""
    if not metadata_dev.startswith("/"):
        raise UsageError(f"metadata device must be an absolute path: {printable(metadata_dev)}")
    argv = ["thin_delta"]
    if use_metadata_snap:
        argv.append("--metadata-snap")
    argv += ["--snap1", str(_check_thin_id(snap1, "snap1")),
             "--snap2", str(_check_thin_id(snap2, "snap2")), metadata_dev]
    return argv


def thin_delta(runner: Runner, metadata_dev: str, snap1: int, snap2: int, *,
               use_metadata_snap: bool = True, volume_bytes: int | None = None,
               timeout: float = THIN_DELTA_TIMEOUT) -> Delta:
    """Run thin_delta and parse its output as it streams (never all in memory)."""
    argv = thin_delta_argv(metadata_dev, snap1, snap2, use_metadata_snap=use_metadata_snap)
    refused: CommandError | None = None
    with runner.stream(argv, timeout=timeout) as out:
        try:
            delta = parse_delta(out, snap1=snap1, snap2=snap2, volume_bytes=volume_bytes)
        except CommandError as exc:
            # a failed thin_delta prints nothing to parse: its exit status and stderr,
            # checked as the block ends, say why; the refusal only if it exited 0
            refused = exc
    if refused is not None:
        raise refused
    return delta


# --------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class Range:
    """A byte range of the thin device."""

    start_byte: int
    length_bytes: int

    @property
    def end_byte(self) -> int:
        return self.start_byte + self.length_bytes


@dataclass(frozen=True)
class Delta:
    """What changed from snap1 to snap2, in bytes, adjacent ranges merged.

    ``changed``: mapped to other data, or newly mapped (``different``,
    ``right_only``); ``discarded``: mapped in snap1 only (``left_only``), which
    reads as zeros in snap2.
    """

    block_size_bytes: int
    changed: list[Range]
    discarded: list[Range]


def _bad(message: str) -> CommandError:
    return CommandError(f"thin_delta output refused: {message}", argv=["thin_delta"])


def _number(attrs: dict[str, str], name: str, where: str) -> int:
    raw = attrs.get(name)
    if raw is None:
        raise _bad(f"<{where}> has no {name}")
    if not _NUMBER_RE.match(raw) or int(raw) > MAX_U64:
        raise _bad(f"<{where}> {name}={printable(raw)!r} is not a block number")
    return int(raw)


def _append(ranges: list[Range], start: int, length: int) -> None:
    if ranges and ranges[-1].end_byte == start:
        ranges[-1] = Range(ranges[-1].start_byte, ranges[-1].length_bytes + length)
    else:
        ranges.append(Range(start, length))


class _DeltaParser:
    """expat handlers checking the document as it comes."""

    def __init__(self, snap1: int | None, snap2: int | None, volume_bytes: int | None) -> None:
        self.snap1, self.snap2, self.volume_bytes = snap1, snap2, volume_bytes
        self.stack: list[str] = []
        self.block_bytes = 0
        self.seen_superblock = self.seen_diff = False
        #: the kind element open without attributes (verbose form), else None
        self.verbose_kind: str | None = None
        self.next_block = 0  # ranges must come sorted and disjoint
        self.changed: list[Range] = []
        self.discarded: list[Range] = []

    def start(self, name: str, attrs: dict[str, str]) -> None:
        depth = len(self.stack)
        parent = self.stack[-1] if self.stack else None
        if depth == 0 and name == "superblock" and not self.seen_superblock:
            self._superblock(attrs)
        elif depth == 1 and name == "diff" and not self.seen_diff:
            self._diff(attrs)
        elif depth == 2 and name in _KINDS:
            if attrs:  # <different begin= length=/>
                self._only(attrs, {"begin", "length"}, name)
                self._range(name, attrs)
            else:  # --verbose: <different><range .../></different>
                self.verbose_kind = name
        elif depth == 3 and name == "range" and parent in _KINDS and self.verbose_kind:
            self._only(attrs, _VERBOSE_RANGE_ATTRS, name)
            for key in attrs:
                _number(attrs, key, name)
            self._range(self.verbose_kind, attrs)
        else:
            where = "/".join(self.stack) or "top level"
            raise _bad(f"unexpected element <{printable(name)}> in {where}")
        self.stack.append(name)

    def end(self, name: str) -> None:
        self.stack.pop()
        if name in _KINDS:
            self.verbose_kind = None

    def text(self, data: str) -> None:
        if data.strip():
            raise _bad(f"unexpected text {printable(data.strip()[:40])!r}")

    @staticmethod
    def _only(attrs: dict[str, str], allowed: Iterable[str], where: str) -> None:
        unknown = sorted(set(attrs) - set(allowed))
        if unknown:
            raise _bad(f"<{where}> has unknown attributes {printable(', '.join(unknown))}")

    def _superblock(self, attrs: dict[str, str]) -> None:
        self._only(attrs, _SUPERBLOCK_ATTRS, "superblock")
        sectors = _number(attrs, "data_block_size", "superblock")
        _number(attrs, "nr_data_blocks", "superblock")
        if (sectors % MIN_DATA_BLOCK_SECTORS
                or not MIN_DATA_BLOCK_SECTORS <= sectors <= MAX_DATA_BLOCK_SECTORS):
            raise _bad(f"data_block_size {sectors} sectors is no pool's (a multiple of "
                       f"{MIN_DATA_BLOCK_SECTORS} from {MIN_DATA_BLOCK_SECTORS} to "
                       f"{MAX_DATA_BLOCK_SECTORS})")
        self.block_bytes = sectors * SECTOR
        self.seen_superblock = True

    def _diff(self, attrs: dict[str, str]) -> None:
        self._only(attrs, {"left", "right"}, "diff")
        left, right = _number(attrs, "left", "diff"), _number(attrs, "right", "diff")
        # the answer to another question is no answer to ours
        if (self.snap1 is not None and left != self.snap1) or (
                self.snap2 is not None and right != self.snap2):
            raise _bad(f"diff of {left} and {right}, asked for {self.snap1} and {self.snap2}")
        self.seen_diff = True

    def _range(self, kind: str, attrs: dict[str, str]) -> None:
        begin, length = _number(attrs, "begin", kind), _number(attrs, "length", kind)
        if length == 0:
            raise _bad(f"<{kind}> of length 0 at block {begin}")
        if begin < self.next_block:
            raise _bad(f"<{kind}> at block {begin} overlaps or precedes the range before "
                       f"(which ends at block {self.next_block})")
        end = begin + length
        start_byte, end_byte = begin * self.block_bytes, end * self.block_bytes
        if self.volume_bytes is not None:
            # the last block may reach past a volume whose size is not a whole block
            if end_byte - self.volume_bytes >= self.block_bytes or start_byte >= self.volume_bytes:
                raise _bad(f"<{kind}> blocks {begin}..{end} reach past the volume's "
                           f"{self.volume_bytes} bytes")
            end_byte = min(end_byte, self.volume_bytes)
        self.next_block = end
        if kind in ("different", "right_only"):
            _append(self.changed, start_byte, end_byte - start_byte)
        elif kind == "left_only":
            _append(self.discarded, start_byte, end_byte - start_byte)


def parse_delta(source: str | bytes | IO[bytes], *, snap1: int | None = None,
                snap2: int | None = None, volume_bytes: int | None = None) -> Delta:
    """Parse thin_delta's output (plain or ``--verbose``) into a :class:`Delta`.

    ``snap1``/``snap2``: the ids asked for (the diff must be of those);
    ``volume_bytes``: the thin device's size (no range may reach past it; the
    last range is cut at it). Raises CommandError naming what was refused.
    """
    if volume_bytes is not None and volume_bytes <= 0:
        raise UsageError(f"volume size must be positive: {volume_bytes}")
    state = _DeltaParser(snap1, snap2, volume_bytes)
    parser = expat.ParserCreate()
    # no DOCTYPE at all: no entity (billion laughs), no external fetch
    parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)

    def refuse(what: str) -> None:
        raise _bad(f"{what} is not allowed")

    parser.StartDoctypeDeclHandler = lambda *_: refuse("a DOCTYPE")
    parser.EntityDeclHandler = lambda *_: refuse("an entity declaration")
    parser.ProcessingInstructionHandler = lambda *_: refuse("a processing instruction")
    parser.StartCdataSectionHandler = lambda: refuse("a CDATA section")
    parser.StartElementHandler = state.start
    parser.EndElementHandler = state.end
    parser.CharacterDataHandler = state.text
    try:
        if isinstance(source, (str, bytes)):
            parser.Parse(source, True)
        else:
            while block := source.read(_READ_SIZE):
                parser.Parse(block, False)
            parser.Parse(b"", True)
    except expat.ExpatError as exc:
        raise _bad(f"not well-formed XML: {exc}") from None
    if not state.seen_diff:
        raise _bad("no <superblock><diff> in it")
    return Delta(state.block_bytes, state.changed, state.discarded)


# --------------------------------------------------------------------------
# Chunks
# --------------------------------------------------------------------------

def _check_sizes(volume_bytes: int, chunk_bytes: int) -> None:
    if chunk_bytes <= 0 or chunk_bytes % SECTOR:
        raise UsageError(f"chunk size must be a positive multiple of {SECTOR}: {chunk_bytes}")
    if volume_bytes <= 0:
        raise UsageError(f"volume size must be positive: {volume_bytes}")


def _clipped(ranges: Iterable[Range], volume_bytes: int) -> Iterator[tuple[int, int]]:
    for r in ranges:
        if r.start_byte >= volume_bytes:
            raise UsageError(f"range at byte {r.start_byte} is past the volume's "
                             f"{volume_bytes} bytes")
        yield r.start_byte, min(r.end_byte, volume_bytes)


def discarded_chunks(delta: Delta, volume_bytes: int,
                     chunk_bytes: int = CHUNK_BYTES) -> list[int]:
    """Indexes of the chunks wholly discarded (all zeros now: nothing to read), ascending.

    The volume's last chunk counts as whole when discarded up to the volume's end.
    """
    _check_sizes(volume_bytes, chunk_bytes)
    out: list[int] = []
    for start, end in _clipped(delta.discarded, volume_bytes):
        first = -(-start // chunk_bytes)  # the first chunk starting inside the range
        last = end // chunk_bytes if end < volume_bytes else -(-end // chunk_bytes)
        for index in range(first, last):
            if not out or out[-1] < index:
                out.append(index)
    return out


def changed_chunks(delta: Delta, volume_bytes: int, chunk_bytes: int = CHUNK_BYTES) -> list[int]:
    """Indexes of the chunks the proxy must read again, ascending.

    Every chunk a changed range touches, and every chunk a discard touches
    without covering it: its discarded part now reads as zeros and the rest
    does not, so the chunk's content changed.
    """
    _check_sizes(volume_bytes, chunk_bytes)
    whole = set(discarded_chunks(delta, volume_bytes, chunk_bytes))
    touched: set[int] = set()
    for ranges in (delta.changed, delta.discarded):
        for start, end in _clipped(ranges, volume_bytes):
            touched.update(range(start // chunk_bytes, (end - 1) // chunk_bytes + 1))
    return sorted(touched - whole)


#: thin_delta's answer past this many ranges is coalesced (the channel's line limit)
DEFAULT_MAX_RANGES = 16384

ByteRanges = tuple[tuple[int, int], ...]


def _merged(spans: Iterable[tuple[int, int]]) -> list[list[int]]:
    """``[start, end)`` spans sorted, overlapping and touching ones joined."""
    out: list[list[int]] = []
    for start, end in sorted(spans):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return out


def _minus(spans: list[list[int]], cut: list[list[int]]) -> list[list[int]]:
    """``spans`` without ``cut`` (both sorted and disjoint)."""
    out: list[list[int]] = []
    j = 0
    for start, end in spans:
        while j < len(cut) and cut[j][1] <= start:
            j += 1
        k, pos = j, start
        while k < len(cut) and cut[k][0] < end:
            if cut[k][0] > pos:
                out.append([pos, cut[k][0]])
            pos = max(pos, cut[k][1])
            k += 1
        if pos < end:
            out.append([pos, end])
    return out


def chunk_ranges(delta: Delta, volume_bytes: int, chunk_bytes: int = CHUNK_BYTES, *,
                 max_ranges: int = DEFAULT_MAX_RANGES) -> tuple[ByteRanges, ByteRanges]:
    """``(changed, discarded)``: thin_delta's answer as the proxy reads it, in bytes.

    Every range starts on a chunk and ends on one (or at the volume's end); a chunk
    any changed block touches is changed (read again whole), and so is a chunk only
    partly discarded (its discarded part now reads as zeros, the rest does not);
    discarded keeps the chunks discarded whole. Neighbours are then joined, the
    cheapest joins first (the fewest bytes the proxy reads in vain; a discarded range
    swallowed by a join is read, as zeros: correct, only slower), until at most
    ``max_ranges`` ranges remain in all: an answer over the channel's line limit would
    be no answer.
    """
    _check_sizes(volume_bytes, chunk_bytes)
    if max_ranges < 1:
        raise UsageError(f"max_ranges must be at least 1, not {max_ranges}")
    c = chunk_bytes
    # in chunk indexes: [first, last)
    changed = [(start // c, -(-end // c)) for start, end in _clipped(delta.changed,
                                                                      volume_bytes)]
    whole: list[tuple[int, int]] = []
    for start, end in _clipped(delta.discarded, volume_bytes):
        touched = (start // c, -(-end // c))
        first = -(-start // c)
        last = end // c if end < volume_bytes else touched[1]
        if first >= last:  # inside one chunk, or across a boundary covering neither
            changed.append(touched)
            continue
        whole.append((first, last))
        # the chunks at either end the discard touches without covering
        if touched[0] < first:
            changed.append((touched[0], first))
        if last < touched[1]:
            changed.append((last, touched[1]))
    changed_m = _merged(changed)
    discarded_m = _minus(_merged(whole), changed_m)
    spans = sorted([(s, e, True) for s, e in changed_m] + [(s, e, False) for s, e in discarded_m])
    spans = _coalesce(spans, max_ranges)
    last_chunk_end = -(-volume_bytes // c)

    def to_bytes(s: int, e: int) -> tuple[int, int]:
        end = volume_bytes if e >= last_chunk_end else e * c
        return s * c, end - s * c

    return (tuple(to_bytes(s, e) for s, e, read in spans if read),
            tuple(to_bytes(s, e) for s, e, read in spans if not read))


def _coalesce(spans: list[tuple[int, int, bool]],
              max_ranges: int) -> list[tuple[int, int, bool]]:
    """Join neighbouring spans, the one costing the fewest chunks read in vain first, until
    at most ``max_ranges`` are left; a joined span is read (it covers a gap)."""
    n = len(spans)
    if n <= max_ranges:
        return spans
    start = [s for s, _e, _r in spans]
    end = [e for _s, e, _r in spans]
    read = [r for _s, _e, r in spans]
    nxt = list(range(1, n + 1))
    prv = list(range(-1, n - 1))
    alive = [True] * n
    version = [0] * n

    def cost(i: int) -> int:
        j = nxt[i]
        # the gap, plus what of either side is not read yet
        return (start[j] - end[i]) + (0 if read[i] else end[i] - start[i]) + (
            0 if read[j] else end[j] - start[j])

    heap = [(cost(i), i, 0, 0) for i in range(n - 1)]
    heapq.heapify(heap)
    left = n
    while left > max_ranges and heap:
        _cost, i, vi, vj = heapq.heappop(heap)
        j = nxt[i] if alive[i] else n
        if not alive[i] or j >= n or version[i] != vi or version[j] != vj:
            continue  # stale: one side changed since
        end[i], read[i] = end[j], True
        alive[j] = False
        nxt[i] = nxt[j]
        if nxt[i] < n:
            prv[nxt[i]] = i
        version[i] += 1
        left -= 1
        if nxt[i] < n:
            heapq.heappush(heap, (cost(i), i, version[i], version[nxt[i]]))
        if prv[i] >= 0:
            p = prv[i]
            heapq.heappush(heap, (cost(p), p, version[p], version[i]))
    return [(start[i], end[i], read[i]) for i in range(n) if alive[i]]
