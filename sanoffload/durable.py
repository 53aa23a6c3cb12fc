"""Small files that must survive a crash whole: journal records.

A record is replaced atomically (a temporary file in the same directory,
fsynced, renamed over the old one, the directory fsynced), so after a power
cut the journal holds the old record or the new one, never half of either:
cleanup after a crash reads it to decide what to remove.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make the directory's entries (a rename, a new file) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_temp(directory: Path, payload: bytes, *, prefix: str = ".tmp-") -> str:
    """A new file in ``directory`` holding ``payload``, on disk; its path. The caller renames
    or links it into place, or removes it. Mode 0600 from the start (mkstemp): a secret in it
    is never readable by others, not even for a moment."""
    fd, tmp = tempfile.mkstemp(prefix=prefix, dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return tmp


def replace_json(path: Path, data: Mapping[str, Any]) -> None:
    """Write ``data`` as JSON to ``path`` atomically and durably (the directory must exist)."""
    tmp = write_temp(path.parent, json.dumps(data, indent=1, sort_keys=True).encode())
    try:
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def read_bounded(f: BinaryIO, limit: int, *, piece: int = 1 << 20) -> bytes:
    """At most ``limit + 1`` bytes of ``f`` (one more than allowed tells the caller it was too
    big), read in pieces: ``f.read(limit + 1)`` would allocate the whole limit up front,
    hundreds of MiB for a map's or a state file's bound, on a small backup server."""
    out = bytearray()
    while len(out) <= limit:
        data = f.read(min(piece, limit + 1 - len(out)))
        if not data:
            break
        out += data
    return bytes(out)
