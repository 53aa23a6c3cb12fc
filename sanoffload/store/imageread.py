"""Random reads of a stored volume image, for ``sanoffload mount`` (issue 13).

:class:`ImageReader` answers ``read(offset, length)`` over the image a chunk map
describes: each piece comes from :meth:`ChunkStore.get`, which re-hashes the
chunk on every read, so a damaged chunk is an :class:`IntegrityError` (the FUSE
server turns it into EIO), never wrong bytes handed to a filesystem driver. A
:data:`~sanoffload.store.imagemap.ZERO` entry reads as zeros without touching
the store.

A filesystem driver reads in small pieces (4 KiB to 128 KiB) and mostly in
order, so a few whole chunks are kept (a small LRU): without it every 128 KiB
read would re-read and re-hash a 4 MiB chunk. The FUSE server calls from
several threads at once; the cache is guarded by a lock that is never held
while a chunk is read, so a slow chunk does not stall reads of the others.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from ..errors import IntegrityError
from .chunks import ChunkStore
from .imagemap import ChunkMap

#: chunks kept in memory: 8 × 4 MiB = 32 MiB
DEFAULT_CACHE_CHUNKS = 8


class ImageReader:
    """The image of ``chunk_map`` read from ``chunks``; safe to call from several threads."""

    def __init__(self, chunks: ChunkStore, chunk_map: ChunkMap, *,
                 cache_chunks: int = DEFAULT_CACHE_CHUNKS) -> None:
        if cache_chunks < 1:
            raise ValueError(f"cache_chunks must be at least 1, not {cache_chunks}")
        self.chunks = chunks
        self.chunk_map = chunk_map
        self.cache_chunks = cache_chunks
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._lock = threading.Lock()
        #: chunks read from the store (a cache miss each): for tests and logs
        self.fetched = 0

    @property
    def size(self) -> int:
        return self.chunk_map.size

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes from ``offset``; fewer at the end of the image, none past it."""
        if offset < 0 or length < 0:
            raise ValueError(f"read of {length} bytes at {offset}: both must be >= 0")
        end = min(offset + length, self.size)
        if offset >= end:
            return b""
        step = self.chunk_map.chunk_size
        parts: list[memoryview] = []
        pos = offset
        while pos < end:
            index = pos // step
            start, _ = self.chunk_map.span(index)
            piece = self._chunk(index)
            parts.append(memoryview(piece)[pos - start:min(end - start, len(piece))])
            pos = start + len(piece)
        return b"".join(parts)

    def _chunk(self, index: int) -> bytes:
        """The plain data of entry ``index``, its length checked against the map."""
        _, span = self.chunk_map.span(index)
        cid = self.chunk_map.chunk_id(index)
        if cid is None:
            return bytes(span)
        with self._lock:
            data = self._cache.get(index)
            if data is not None:
                self._cache.move_to_end(index)
                return data
        data = self.chunks.get(cid)  # re-hashed: IntegrityError if missing or damaged
        if len(data) != span:
            # the chunk is whole (its hash matched) but not the piece the map says: a bad map
            raise IntegrityError(f"chunk {cid} holds {len(data)} bytes, but the map's entry "
                                 f"{index} covers {span}")
        with self._lock:
            self.fetched += 1
            self._cache[index] = data
            self._cache.move_to_end(index)
            while len(self._cache) > self.cache_chunks:
                self._cache.popitem(last=False)
        return data
