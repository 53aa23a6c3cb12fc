"""Read an attached duplicate's blocks into the chunk store: the proxy's side of an image backup.

What :func:`read_image` does, for a volume cut into 4 MiB chunks at volume offsets::

    open(DEV, O_RDONLY | O_DIRECT)      # the LUN's blocks, never the proxy's page cache
    ioctl(DEV, BLKGETSIZE64)            # the volume's size (st_size of a regular file: tests)
    per window of WINDOW chunks to read (the delta's changed chunks, or all of them):
        pread 4 MiB at index * 4 MiB    # into page-aligned buffers (mmap), as O_DIRECT needs
        sha256 of each                  # in a small pool while the next chunk is read
        sink.missing(ids)               # which of them the store lacks
        encode + sink.put_chunk         # only those (encoded in the pool too)
    map = previous map, read chunks replaced, discarded chunks -> ZERO (never read)

Why O_DIRECT: a snapshot read once must not push the proxy's cache out, and
:func:`compare_image` (the check before the agent is told to release) must read
the device again, not the cached copy of the first read.

Memory stays bounded whatever the volume's size: WINDOW buffers of one chunk,
their encoded copies, and the map (32 bytes a chunk). ``hashlib`` and
``zstandard`` release the GIL on big buffers, so a pool of two or three threads
hashes and compresses while the next chunk is read.

Everything the agent said is hostile until checked: a delta's ranges were checked as
it arrived (:meth:`Delta.from_wire`: chunk-aligned, sorted, disjoint, within its
volume); here it is refused (ProtocolError, exit 11) unless its volume is the
attached device's size and its chunks ours. A previous map of another geometry
makes a full read (it is the store's, already checked whole).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import mmap
import os
import stat
import struct
import time
from collections.abc import Callable, Generator, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, closing
from dataclasses import dataclass
from functools import lru_cache

from ..channel.messages import Delta
from ..errors import IntegrityError, ProtocolError, RefusedError, ResourceError
from ..store.chunks import CODEC_RAW, encode_chunk
from ..store.imagemap import DEFAULT_CHUNK_SIZE, DIGEST_BYTES, ZERO, ChunkMap, ImageSink

log = logging.getLogger(__name__)

#: <linux/fs.h>: _IOR(0x12, 114, size_t), the device's size in bytes
BLKGETSIZE64 = 0x80081272
#: O_DIRECT wants buffer, offset and length aligned to the logical block size (<= 4096)
ALIGN = 4096
#: chunks read before the store is asked which of them it lacks (one round trip each)
WINDOW = 8
#: the most ids one ``missing`` call names (ImageSink's limit)
MISSING_BATCH = 4096
#: threads hashing and compressing beside the reader
JOBS = 3
#: ``encode(plain) -> (codec, payload)``: the chunk store's encode_chunk, or a test's
Encoder = Callable[[bytes], tuple[int, bytes]]


def raw_encode(data: bytes) -> tuple[int, bytes]:
    """Stored as it is (CODEC_RAW)."""
    return CODEC_RAW, data


@dataclass(frozen=True)
class ImageResult:
    """What one :func:`read_image` did; ``read_ranges`` are chunk index ranges [first, end)."""

    chunk_map: ChunkMap
    read_bytes: int
    chunks_read: int
    #: chunks put into the store (the store lacked them) and their encoded bytes
    chunks_new: int
    new_bytes: int
    #: chunks found all zero when read, and chunks the delta discarded (not read)
    chunks_zero: int
    chunks_discarded: int
    #: entries that differ from the previous map (a full read: every entry)
    changed: int
    read_ranges: tuple[tuple[int, int], ...]
    full: bool
    #: why the whole volume was read (None: an incremental read)
    full_reason: str | None
    seconds: float

    def read_indexes(self) -> Iterator[int]:
        """Every chunk index read, in order (what a stream verification re-reads)."""
        for first, end in self.read_ranges:
            yield from range(first, end)


@lru_cache(maxsize=8)
def _zero_digest(length: int) -> bytes:
    # a piece whose sha256 is this one is all zeros: no second pass to find out
    return hashlib.sha256(bytes(length)).digest()


def _digest(view: memoryview) -> bytes:
    d = hashlib.sha256(view).digest()
    return ZERO if d == _zero_digest(len(view)) else d


class Volume:
    """A block device (or, in tests, a regular file) open for O_DIRECT reads of whole chunks."""

    def __init__(self, path: str, *, direct: bool = True) -> None:
        self.path = path
        flags = os.O_RDONLY | os.O_CLOEXEC
        try:
            self.fd = os.open(path, flags | (os.O_DIRECT if direct else 0))
        except OSError as exc:
            if not (direct and exc.errno == errno.EINVAL and os.path.isfile(path)):
                raise ResourceError(f"{path}: cannot open: {exc.strerror or exc}") from None
            # a regular file on a filesystem without O_DIRECT (tmpfs): a test's "device"
            self.fd = os.open(path, flags)
        try:
            self.size = self._size()
        except BaseException:
            os.close(self.fd)
            raise

    def _size(self) -> int:
        st = os.fstat(self.fd)
        if stat.S_ISBLK(st.st_mode):
            try:
                raw = fcntl.ioctl(self.fd, BLKGETSIZE64, bytes(8))
            except OSError as exc:
                raise ResourceError(f"{self.path}: cannot get its size (BLKGETSIZE64): "
                                    f"{exc.strerror or exc}") from None
            size: int = struct.unpack("=Q", raw)[0]
            return size
        if stat.S_ISREG(st.st_mode):
            return st.st_size
        raise RefusedError(f"{self.path}: not a block device")

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> Volume:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def read(self, buf: mmap.mmap, offset: int, length: int) -> memoryview:
        """``length`` bytes at ``offset`` into ``buf`` (page-aligned); a view of them.

        The read is rounded up to :data:`ALIGN` (a short last chunk's tail): the device
        ends there, so the kernel returns what there is. Anything less than ``length``
        is an error naming the device and the offset.
        """
        want = min(-(-length // ALIGN) * ALIGN, len(buf))
        got = 0
        with memoryview(buf) as whole:
            while got < length:
                try:
                    n = os.preadv(self.fd, [whole[got:want]], offset + got)
                except OSError as exc:
                    raise ResourceError(f"{self.path}: read error at offset {offset + got}: "
                                        f"{exc.strerror or exc}") from None
                if n <= 0:
                    raise ResourceError(f"{self.path}: short read at offset {offset}: "
                                        f"{got} of {length} bytes (the device ended early)")
                got += n
        return memoryview(buf)[:length]


def device_size(device: str) -> int:
    """The size of ``device`` in bytes (BLKGETSIZE64; st_size of a regular file); an empty
    device is refused."""
    with Volume(device) as vol:
        if vol.size <= 0:
            raise RefusedError(f"{device}: an empty device")
        return vol.size


def check_delta(delta: Delta, size: int, chunk_size: int) -> None:
    """ProtocolError unless ``delta`` is of this device's size and in our chunks.

    Its ranges need no second look: a :class:`Delta` exists only chunk-aligned, sorted,
    disjoint and inside its ``volume_bytes`` (checked as it arrives, exit 11).
    """
    if delta.volume_bytes != size:
        raise ProtocolError(f"the agent's delta is of a {delta.volume_bytes}-byte volume; "
                            f"the attached device holds {size} bytes")
    if delta.chunk_bytes != chunk_size:
        raise ProtocolError(f"the agent's delta is in {delta.chunk_bytes}-byte chunks, "
                            f"not {chunk_size}")


def _index_ranges(ranges: Iterable[tuple[int, int]], chunk_size: int) -> list[tuple[int, int]]:
    """Byte ranges (checked: chunk-aligned, sorted) as chunk index ranges, neighbours joined."""
    out: list[tuple[int, int]] = []
    for off, length in ranges:
        first, end = off // chunk_size, -(-(off + length) // chunk_size)
        if out and out[-1][1] == first:
            out[-1] = (out[-1][0], end)
        else:
            out.append((first, end))
    return out


def _buffers(stack: ExitStack, count: int, chunk_size: int) -> list[mmap.mmap]:
    # anonymous maps are page-aligned: what O_DIRECT needs of a buffer
    size = -(-chunk_size // ALIGN) * ALIGN
    return [stack.enter_context(mmap.mmap(-1, size)) for _ in range(count)]


Window = list[tuple[int, memoryview, "Future[bytes]"]]


def _windows(vol: Volume, indexes: Iterable[int], chunk_size: int, bufs: list[mmap.mmap],
             pool: ThreadPoolExecutor,
             progress: Callable[[int], None] | None = None) -> Generator[Window, None, None]:
    """Windows of ``(index, data, digest future)``; each window's views are valid until the
    next one is asked for (its buffers are reused)."""
    window: Window = []
    done = 0
    try:
        for index in indexes:
            offset = index * chunk_size
            length = min(chunk_size, vol.size - offset)
            view = vol.read(bufs[len(window)], offset, length)
            window.append((index, view, pool.submit(_digest, view)))
            done += length
            if progress is not None:
                progress(done)
            if len(window) == len(bufs):
                yield window
                _release(window)
                window = []
        if window:
            yield window
    finally:
        _release(window)


def _release(window: Window) -> None:
    for _, view, fut in window:
        try:
            fut.result()  # no thread may still read a buffer that is about to be reused
        except BaseException:  # reported where it was asked for
            pass
        view.release()


def read_image(device: str, sink: ImageSink, *, delta: Delta | None,
               previous: ChunkMap | None, encode: Encoder = encode_chunk,
               chunk_size: int = DEFAULT_CHUNK_SIZE, window: int = WINDOW, jobs: int = JOBS,
               direct: bool = True,
               progress: Callable[[int], None] | None = None) -> ImageResult:
    """Read ``device`` into ``sink``; the merged map and what it cost (see the module doc).

    With a ``delta`` (checked here) and the ``previous`` map of its base, only the changed
    chunks are read and the discarded ones become ZERO; otherwise every chunk is read.
    ``encode`` turns a chunk the store lacks into ``(codec, payload)``.
    ``progress`` hears the bytes read so far. Nothing is committed: the caller compares
    (:func:`compare_image`) and commits.
    """
    if not 1 <= window <= MISSING_BATCH:
        raise ValueError(f"window {window}: 1 to {MISSING_BATCH} chunks")
    started = time.monotonic()
    with ExitStack() as stack:
        vol = stack.enter_context(Volume(device, direct=direct))
        size = vol.size
        if size <= 0:
            raise RefusedError(f"{device}: an empty device")
        blank = ChunkMap.zeros(size, chunk_size)  # checks the geometry
        count = blank.count
        reason = _full_reason(delta, previous, size, chunk_size)
        if reason is None:
            assert delta is not None and previous is not None
            base_entries = previous.entries
            to_read = _index_ranges(delta.changed, chunk_size)
            discarded = _index_ranges(delta.discarded, chunk_size)
        else:
            log.warning("%s: reading the whole volume: %s", device, reason)
            base_entries = blank.entries
            to_read, discarded = [(0, count)], []
        entries = bytearray(base_entries)
        changed = 0
        zero = 0
        n_discarded = 0
        for first, end in discarded:
            for i in range(first, end):
                if base_entries[i * DIGEST_BYTES:(i + 1) * DIGEST_BYTES] != ZERO:
                    changed += 1
                entries[i * DIGEST_BYTES:(i + 1) * DIGEST_BYTES] = ZERO
                n_discarded += 1
        pool = stack.enter_context(ThreadPoolExecutor(max(1, jobs),
                                                      thread_name_prefix="image"))
        bufs = _buffers(stack, window, chunk_size)
        read_bytes = chunks_read = chunks_new = new_bytes = 0
        indexes = (i for first, end in to_read for i in range(first, end))
        # closed before the buffers are: no view of them may outlive this block
        wins = stack.enter_context(closing(_windows(vol, indexes, chunk_size, bufs, pool,
                                                    progress)))
        for win in wins:
            digests: list[bytes] = []
            for index, view, fut in win:
                d = fut.result()
                digests.append(d)
                read_bytes += len(view)
                chunks_read += 1
                at = slice(index * DIGEST_BYTES, (index + 1) * DIGEST_BYTES)
                if reason is not None or base_entries[at] != d:
                    changed += 1
                entries[at] = d
                zero += d == ZERO
            put, put_bytes = _store(sink, encode, pool, win, digests)
            chunks_new += put
            new_bytes += put_bytes
        chunk_map = ChunkMap(size, chunk_size, bytes(entries))
    seconds = time.monotonic() - started
    log.info("%s: read %d chunk(s) (%d bytes), %d new (%d bytes stored), %d zero, "
             "%d discarded, in %.1f s", device, chunks_read, read_bytes, chunks_new, new_bytes,
             zero, n_discarded, seconds)
    return ImageResult(chunk_map=chunk_map, read_bytes=read_bytes, chunks_read=chunks_read,
                       chunks_new=chunks_new, new_bytes=new_bytes, chunks_zero=zero,
                       chunks_discarded=n_discarded, changed=changed,
                       read_ranges=tuple(to_read), full=reason is not None,
                       full_reason=reason, seconds=seconds)


def _full_reason(delta: Delta | None, previous: ChunkMap | None, size: int,
                 chunk_size: int) -> str | None:
    """Why the whole volume must be read, or None (read the delta). A bad delta raises."""
    if delta is None:
        return "the agent sent no delta (no trusted base on the first server)"
    check_delta(delta, size, chunk_size)
    if previous is None:
        return f"the store has no map of the base backup {delta.base}"
    if previous.size != size or previous.chunk_size != chunk_size:
        return (f"the base backup's map is of a {previous.size}-byte volume in "
                f"{previous.chunk_size}-byte chunks, the device holds {size} bytes")
    return None


def _store(sink: ImageSink, encode: Encoder, pool: ThreadPoolExecutor, win: Window,
           digests: list[bytes]) -> tuple[int, int]:
    """Put the window's chunks the store lacks; ``(chunks put, encoded bytes put)``."""
    first: dict[str, tuple[memoryview, int]] = {}
    for (_, view, _), d in zip(win, digests, strict=True):
        if d != ZERO:
            first.setdefault(d.hex(), (view, len(view)))  # the same data twice: put once
    if not first:
        return 0, 0
    asked = list(first)
    lacking = set(sink.missing(asked)) & set(asked)  # an id never asked for is ignored
    jobs = [(cid, first[cid][1], pool.submit(encode, bytes(first[cid][0])))
            for cid in asked if cid in lacking]
    put = put_bytes = 0
    try:
        for cid, plain, fut in jobs:
            codec, payload = fut.result()
            sink.put_chunk(cid, codec, payload, plain)
            put += 1
            put_bytes += len(payload)
    finally:
        for _, _, fut in jobs:
            fut.cancel()
    return put, put_bytes


def _in_map(chunk_map: ChunkMap, indexes: Iterable[int]) -> Iterator[int]:
    for index in indexes:
        chunk_map.span(index)  # IndexError before a read past the map
        yield index


def compare_image(device: str, chunk_map: ChunkMap, indexes: Iterable[int], *,
                  window: int = WINDOW, jobs: int = JOBS, direct: bool = True) -> int:
    """Read chunks ``indexes`` of ``device`` again; each must hash to its map entry.

    IntegrityError names the first chunk (and its offset) that differs; returns how many
    chunks were compared.
    """
    compared = 0
    with ExitStack() as stack:
        vol = stack.enter_context(Volume(device, direct=direct))
        if vol.size != chunk_map.size:
            raise IntegrityError(f"{device} holds {vol.size} bytes; the map is of "
                                 f"{chunk_map.size}")
        pool = stack.enter_context(ThreadPoolExecutor(max(1, jobs),
                                                      thread_name_prefix="compare"))
        bufs = _buffers(stack, window, chunk_map.chunk_size)
        wins = stack.enter_context(closing(_windows(vol, _in_map(chunk_map, indexes),
                                                    chunk_map.chunk_size, bufs, pool)))
        for win in wins:
            for index, _, fut in win:
                got = fut.result()
                want = chunk_map.digest(index)
                if got != want:
                    offset = chunk_map.span(index)[0]
                    raise IntegrityError(
                        f"{device}: chunk {index} at offset {offset} differs from what was "
                        f"stored (read {'zeros' if got == ZERO else got.hex()[:16]}, the map "
                        f"holds {'zeros' if want == ZERO else want.hex()[:16]})")
                compared += 1
    return compared
