"""An image backup's chunk map: which chunk holds each 4 MiB of the volume (issue 13).

An image backup is logically full: its map names a chunk for every piece of the
volume, so it restores alone whatever backups came before. An incremental backup
copies the previous backup's map and replaces the entries of the chunks that
changed (:meth:`ChunkMap.merged`).

Entry ``i`` covers bytes ``[i * chunk_size, min((i + 1) * chunk_size, size))``;
only the last may be shorter. An entry is the sha256 digest (32 bytes) of that
piece's plain data, which is also the chunk's id in the store
(:mod:`sanoffload.store.chunks`), or :data:`ZERO`: the piece is all zero bytes,
nothing is stored and a restore writes a hole. No sha256 is 32 zero bytes.

The map travels and is kept as one binary file beside the manifest
(``STAMP.map``), whose sha256 and size the manifest records::

    b"SOIMAP"  version (u8, 1)  reserved (u8, 0)  chunk_size (u32)  size (u64)  count (u64)
    count x 32-byte entries                                      (big-endian, no padding)

Like every byte from a peer or the disk, a map is hostile until
:meth:`ChunkMap.from_bytes` has checked it whole: the magic and version, a chunk
size the store accepts, a size within :data:`MAX_IMAGE_BYTES`, a count that is
exactly what the size needs, and a length that is exactly the header plus the
entries. The entries are one ``bytes`` (32 bytes each), not one object per
chunk: a 64 TiB volume's map is 512 MiB, not gigabytes of Python objects.

:class:`ImageSink` is the seam between the proxy that reads a duplicate and the
store that keeps chunks: the local repository and the store's wire both provide it.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from ..errors import IntegrityError

MAGIC = b"SOIMAP"
VERSION = 1
HEADER = struct.Struct(">6sBBIQQ")
DIGEST_BYTES = 32
#: the entry of an all-zero piece (stored nowhere; restored as a hole)
ZERO = bytes(DIGEST_BYTES)
#: what image backups cut a volume into; the chunk store's CHUNK_SIZE
DEFAULT_CHUNK_SIZE = 4 << 20
MIN_CHUNK_SIZE = 64 << 10
MAX_CHUNK_SIZE = 16 << 20
#: the biggest volume an image backup takes: its map at 4 MiB is 512 MiB
MAX_IMAGE_BYTES = 64 << 40


def check_geometry(size: object, chunk_size: object) -> tuple[int, int]:
    """``(size, chunk_size)`` if an image of ``size`` bytes in ``chunk_size`` pieces is
    one we keep, or IntegrityError saying which number is wrong."""
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or \
            not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE or chunk_size & (chunk_size - 1):
        raise IntegrityError(f"chunk size {chunk_size!r}: expected a power of two from "
                             f"{MIN_CHUNK_SIZE} to {MAX_CHUNK_SIZE} bytes")
    if not isinstance(size, int) or isinstance(size, bool) or not 0 < size <= MAX_IMAGE_BYTES:
        raise IntegrityError(f"image size {size!r}: expected 1 to {MAX_IMAGE_BYTES} bytes")
    return size, chunk_size


@dataclass(frozen=True)
class ChunkMap:
    """A volume of ``size`` bytes as ``count`` entries of :data:`DIGEST_BYTES` each."""

    size: int
    chunk_size: int
    #: ``count * 32`` bytes: entry i is ``entries[32 i : 32 i + 32]``
    entries: bytes

    def __post_init__(self) -> None:
        check_geometry(self.size, self.chunk_size)
        if len(self.entries) != self.count * DIGEST_BYTES:
            raise IntegrityError(f"chunk map of a {self.size}-byte image holds "
                                 f"{len(self.entries)} bytes of entries, expected "
                                 f"{self.count * DIGEST_BYTES}")

    @property
    def count(self) -> int:
        return -(-self.size // self.chunk_size)

    @classmethod
    def zeros(cls, size: int, chunk_size: int = DEFAULT_CHUNK_SIZE) -> ChunkMap:
        """A map of an all-zero volume (the start of a first, full image backup)."""
        size, chunk_size = check_geometry(size, chunk_size)
        return cls(size, chunk_size, bytes(-(-size // chunk_size) * DIGEST_BYTES))

    def span(self, index: int) -> tuple[int, int]:
        """``(offset, length)`` of entry ``index`` in the volume."""
        if not 0 <= index < self.count:
            raise IndexError(f"chunk {index} of {self.count}")
        offset = index * self.chunk_size
        return offset, min(self.chunk_size, self.size - offset)

    def digest(self, index: int) -> bytes:
        """Entry ``index``: a sha256 digest, or :data:`ZERO`."""
        if not 0 <= index < self.count:
            raise IndexError(f"chunk {index} of {self.count}")
        return self.entries[index * DIGEST_BYTES:(index + 1) * DIGEST_BYTES]

    def chunk_id(self, index: int) -> str | None:
        """Entry ``index`` as a chunk id (hex), or None for an all-zero piece."""
        d = self.digest(index)
        return None if d == ZERO else d.hex()

    def __iter__(self) -> Iterator[str | None]:
        """Every entry as :meth:`chunk_id` gives it, in volume order."""
        for i in range(self.count):
            yield self.chunk_id(i)

    def referenced(self) -> set[str]:
        """The ids of every chunk this map needs in the store (zero pieces need none)."""
        return {cid for cid in self if cid is not None}

    def merged(self, changes: Mapping[int, bytes]) -> ChunkMap:
        """This map with entry i replaced by ``changes[i]`` (a 32-byte digest or ZERO)."""
        buf = bytearray(self.entries)
        for index, digest in changes.items():
            if not 0 <= index < self.count:
                raise IndexError(f"chunk {index} of {self.count}")
            if len(digest) != DIGEST_BYTES:
                raise ValueError(f"a digest is {DIGEST_BYTES} bytes, not {len(digest)}")
            buf[index * DIGEST_BYTES:(index + 1) * DIGEST_BYTES] = digest
        return ChunkMap(self.size, self.chunk_size, bytes(buf))

    def to_bytes(self) -> bytes:
        return HEADER.pack(MAGIC, VERSION, 0, self.chunk_size, self.size, self.count) + \
            self.entries

    def sha256(self) -> str:
        """The hex sha256 of :meth:`to_bytes` (what the manifest records)."""
        h = hashlib.sha256(HEADER.pack(MAGIC, VERSION, 0, self.chunk_size, self.size,
                                       self.count))
        h.update(self.entries)
        return h.hexdigest()

    @classmethod
    def from_bytes(cls, data: bytes, *, where: str = "chunk map") -> ChunkMap:
        """Check a map read from a peer or the disk, whole; IntegrityError names what is wrong."""
        if len(data) < HEADER.size:
            raise IntegrityError(f"{where}: {len(data)} bytes, shorter than its header")
        magic, version, reserved, chunk_size, size, count = HEADER.unpack_from(data)
        if magic != MAGIC:
            raise IntegrityError(f"{where}: not a sanoffload chunk map")
        if version != VERSION or reserved != 0:
            raise IntegrityError(f"{where}: version {version} (this software reads {VERSION})")
        try:
            check_geometry(size, chunk_size)
        except IntegrityError as e:
            raise IntegrityError(f"{where}: {e.message}") from None
        if count != -(-size // chunk_size):
            raise IntegrityError(f"{where}: {count} entries for {size} bytes in "
                                 f"{chunk_size}-byte chunks")
        if len(data) != HEADER.size + count * DIGEST_BYTES:
            raise IntegrityError(f"{where}: {len(data)} bytes, expected "
                                 f"{HEADER.size + count * DIGEST_BYTES}")
        return cls(size, chunk_size, bytes(data[HEADER.size:]))


class ImageSink(Protocol):
    """Where the proxy puts one image backup: the store's chunks, then the map as the commit.

    Both the local repository and the store's wire provide it. Until :meth:`commit`
    returns, nothing is listed: a failure (or :meth:`abort`) leaves at most chunks
    no manifest names, which ``store gc`` sweeps after its grace period.
    """

    def previous_map(self, backup_id: str) -> ChunkMap | None:
        """The map of image backup ``backup_id`` of the same host and path, checked against
        its manifest's sha256; None if the store has no such whole backup (read everything)."""
        ...

    def missing(self, chunk_ids: Sequence[str]) -> set[str]:
        """Which of ``chunk_ids`` the store does not hold (at most 4096 ids a call)."""
        ...

    def put_chunk(self, chunk_id: str, codec: int, payload: bytes, plain_bytes: int) -> None:
        """Store one chunk: ``payload`` is its plain data encoded by ``codec``
        (:mod:`sanoffload.store.chunks` codecs); the store decodes and re-hashes it."""
        ...

    def commit(self, chunk_map: ChunkMap, fields: Mapping[str, Any]) -> dict[str, Any]:
        """Check every chunk the map names is present, write the map and then the manifest
        (the commit); returns the stored backup as the store lists it."""
        ...

    def abort(self, reason: str = "the backup failed") -> None:
        ...
