"""The chunk store: content-addressed pieces of volume images (issue 13), beside the archives.

Layout::

    ROOT/chunks/                        0700
    ROOT/chunks/ab/                     0700, one per first two hex digits of an id
    ROOT/chunks/ab/abcdef…              0600, one chunk: HEADER + payload
    ROOT/chunks/ab/abcdef….<16 hex>.partial   a put being written (or cut off)

A chunk's id is the sha256 (64 lowercase hex) of its plain data, whatever codec
stores it. Every file starts with a 12-byte header: ``SOCHNK``, version 1, the
codec, the plain length (big-endian u32). A put writes a partial file in the
chunk's own directory, fsyncs it, renames it to the id and fsyncs the directory:
a crash leaves the chunk whole or a ``.partial``, never half a chunk under its id.
An existing chunk is not rewritten (its mtime is refreshed, see below).

**Codecs: raw or zstd, behind the header's codec byte.** zstd comes from the
``zstandard`` package (in process: the zstd CLI through the runner would mean a
fork and exec per 4 MiB chunk, half a million for 2 TB), imported only when a
chunk is encoded or decoded. :func:`encode_chunk` stores raw when the package is
absent or zstd saves nothing (an encrypted or already compressed volume); a zstd
chunk read without the package is a clear MissingDependencyError, never garbage.
Ids hash the *plain* data, so the codec changes no id, no map and no manifest. A
payload is decoded with its plain length as the bound (a zstd bomb stops there)
and re-hashed before it is stored (:meth:`ChunkStore.put_encoded`) and whenever it
is read (:meth:`ChunkStore.get`); an unknown codec is an IntegrityError.

**gc is mark and sweep with a grace period.** The caller marks (the ids every
manifest references); :meth:`ChunkStore.gc` sweeps chunks neither referenced nor
touched within ``grace_s``. A backup still running has no manifest yet, so its
chunks are protected by age only: ``grace_s`` must exceed the longest backup.
A put that finds its chunk present refreshes the chunk's mtime under a shared
lock on ``chunks/``; gc re-checks the age under the exclusive lock right before
each unlink, so a chunk a backup has just re-used is never swept under it.

**Hostile files.** Ids are checked (64 lowercase hex) before a path is built;
every open is relative to a directory descriptor opened with O_NOFOLLOW, so a
symlink in ``chunks/`` (a fan-out directory or a chunk) is never followed, read
through or deleted through: listings report it as junk and leave it. A file is
read only if it is regular and no bigger than :data:`MAX_CHUNK` plus the header.
"""

from __future__ import annotations

import calendar
import errno
import fcntl
import hashlib
import io
import json
import logging
import math
import os
import re
import secrets
import stat
import struct
import time
from collections.abc import Callable, Iterable, Iterator, Set
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import (
    AuthError,
    IntegrityError,
    MissingDependencyError,
    RefusedError,
    ResourceError,
    UsageError,
)
from ..text import printable
from .backend import Backend, NotFound, ObjectInfo
from .backend_dir import _write_all

log = logging.getLogger(__name__)

#: the size image backups cut a volume into (aligned to volume offsets)
CHUNK_SIZE = 4 << 20
#: the biggest chunk put accepts and get reads: a hostile file must not make us read gigabytes
MAX_CHUNK = 16 << 20
CHUNKS = "chunks"
PARTIAL_SUFFIX = ".partial"
#: magic, version, codec, plain length
HEADER = struct.Struct(">6sBBI")
MAGIC = b"SOCHNK"
VERSION = 1
CODEC_RAW = 0
CODEC_ZSTD = 1
CODECS = {CODEC_RAW: "raw", CODEC_ZSTD: "zstd"}
#: zstd level for chunks: fast (a chunk is compressed on the proxy, in line with the read)
ZSTD_LEVEL = 3
ZSTD_PACKAGE = "zstandard"

_ID_RE = re.compile(r"[0-9a-f]{64}")
_FAN_RE = re.compile(r"[0-9a-f]{2}")
_PARTIAL_RE = re.compile(r"([0-9a-f]{64})\.[0-9a-f]{16}" + re.escape(PARTIAL_SUFFIX))
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a FIFO planted under a chunk's name must not hang the open
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def check_id(chunk_id: object) -> str:
    """A chunk id: 64 lowercase hex digits (a sha256), or RefusedError."""
    # fullmatch: "$" would let a trailing newline through
    if not isinstance(chunk_id, str) or not _ID_RE.fullmatch(chunk_id):
        raise RefusedError(f"invalid chunk id {printable(repr(chunk_id))[:80]}: "
                           "expected 64 lowercase hex digits")
    return chunk_id


def chunk_id(data: bytes | bytearray | memoryview) -> str:
    """The id ``data`` is stored under: its sha256."""
    return hashlib.sha256(data).hexdigest()


def is_zero(data: bytes | bytearray | memoryview) -> bool:
    """True if ``data`` is all zero bytes: such a chunk is marked in the map, not stored."""
    # bytes == bytes is one memcmp; a memoryview compares item by item, 50 times slower
    raw = data if isinstance(data, bytes) else bytes(data)
    return raw == bytes(len(raw))


def _zstd(*, needed: bool) -> Any:
    """The ``zstandard`` module; None if absent (MissingDependencyError if ``needed``)."""
    try:
        import zstandard
    except ImportError:
        if needed:
            raise MissingDependencyError(
                f"a zstd chunk needs the Python package {ZSTD_PACKAGE!r} to be read",
                hint=f"pip install {ZSTD_PACKAGE}") from None
        return None
    return zstandard


def encode_chunk(data: bytes | bytearray | memoryview) -> tuple[int, bytes]:
    """``(codec, payload)`` for storing ``data``: zstd when available and smaller, else raw."""
    raw = bytes(data)
    zstandard = _zstd(needed=False)
    if zstandard is not None and raw:
        packed = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(raw)
        if len(packed) < len(raw):
            return CODEC_ZSTD, packed
    return CODEC_RAW, raw


def decode_chunk(codec: int, payload: bytes | bytearray | memoryview, plain_bytes: int,
                 *, where: str = "chunk") -> bytes:
    """The plain data of ``payload`` (``plain_bytes`` long, at most MAX_CHUNK), or
    IntegrityError; the length bound holds while decoding, so a bomb never expands."""
    if isinstance(plain_bytes, bool) or not isinstance(plain_bytes, int) or \
            not 0 <= plain_bytes <= MAX_CHUNK:
        raise IntegrityError(f"{where}: plain length {plain_bytes!r}: expected 0 to {MAX_CHUNK}")
    if codec == CODEC_RAW:
        if len(payload) != plain_bytes:
            raise IntegrityError(f"{where}: {len(payload)} bytes of raw data, {plain_bytes} "
                                 "announced")
        return bytes(payload)
    if codec != CODEC_ZSTD:
        raise IntegrityError(f"{where}: unknown codec {printable(repr(codec))[:40]} "
                             "(written by a newer version?)")
    zstandard = _zstd(needed=True)
    # a stream read with the plain length (+1) as the bound: a frame claiming gigabytes,
    # or no size at all, stops there instead of filling memory
    out = bytearray()
    try:
        with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(bytes(payload))) as reader:
            while len(out) <= plain_bytes:
                piece = reader.read(plain_bytes + 1 - len(out))
                if not piece:
                    break
                out += piece
    except zstandard.ZstdError as exc:
        raise IntegrityError(f"{where}: zstd data cannot be decoded: {exc}") from None
    if len(out) != plain_bytes:
        more = "more than " if len(out) > plain_bytes else ""
        raise IntegrityError(f"{where}: decodes to {more}{min(len(out), plain_bytes)} bytes, "
                             f"{plain_bytes} announced")
    return bytes(out)


@dataclass(frozen=True)
class Junk:
    """Something in ``chunks/`` that is not ours to read or remove; ``path`` is relative to the
    store's root and came from the disk: print it through :func:`printable`."""

    path: str
    reason: str


@dataclass
class VerifyReport:
    """What :meth:`ChunkStore.verify` found: ``bad`` holds (id, reason) pairs."""

    checked: int = 0
    bad: list[tuple[str, str]] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    junk: list[Junk] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.bad and not self.missing


@dataclass
class GcReport:
    """What :meth:`ChunkStore.gc` removed (or would remove, with ``dry_run``) and kept."""

    dry_run: bool
    removed: list[str] = field(default_factory=list)
    freed_bytes: int = 0
    kept_referenced: int = 0
    #: unreferenced, but younger than the grace period (a backup may still be writing)
    kept_young: int = 0
    partials_removed: list[str] = field(default_factory=list)
    partials_left: int = 0
    junk: list[Junk] = field(default_factory=list)
    #: an object store's two phases: unreferenced chunks recorded by this run, removed by a
    #: later one past the grace period if still unreferenced
    candidates: int = 0
    #: unreferenced and due, but under an Object Lock retention
    kept_retained: int = 0
    #: (name, why) the store refused to remove
    refused: list[tuple[str, str]] = field(default_factory=list)
    #: uncommitted uploads (S3 multipart) older than the grace period, aborted
    uploads_aborted: list[str] = field(default_factory=list)
    #: data objects no manifest names (a backup that failed to commit), older than the grace
    orphans_removed: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Entry:
    kind: str  # "chunk", "partial" or "junk"
    fan: str
    name: str
    reason: str = ""


class ChunkStore:
    """The chunks of a repository rooted at an existing directory (see the module docstring)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(os.path.abspath(root))
        if not self.root.is_dir():
            raise UsageError(f"{self.root}: no such repository directory (create it first)")

    # -- places ---------------------------------------------------------------
    def _open_dir(self, parent_fd: int, name: str, *, create: bool = False) -> int | None:
        """``name`` in ``parent_fd`` opened without following a symlink; None if absent."""
        if create:
            try:
                os.mkdir(name, 0o700, dir_fd=parent_fd)
            except FileExistsError:
                pass
            else:
                os.fsync(parent_fd)  # the new directory survives a crash too
        try:
            return os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise RefusedError(f"{printable(name)} in {self.root}/{CHUNKS}: not a directory "
                                   "(a symlink?): not following it") from None
            raise

    @contextmanager
    def _open(self, *names: str, create: bool = False) -> Iterator[list[int] | None]:
        """``chunks/`` (then ``chunks/NAME``) as descriptors; None if one is absent."""
        with ExitStack() as stack:
            # the root is the operator's: followed; below it, nothing is
            parent = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            stack.callback(os.close, parent)
            fds: list[int] = []
            for name in (CHUNKS, *names):
                fd = self._open_dir(parent, name, create=create)
                if fd is None:
                    yield None
                    return
                stack.callback(os.close, fd)
                fds.append(parent := fd)
            yield fds

    def path(self, chunk_id: str) -> Path:
        """Where chunk ``chunk_id`` lives (for messages: open nothing by this path)."""
        return self.root / CHUNKS / check_id(chunk_id)[:2] / chunk_id

    # -- writing --------------------------------------------------------------
    def put(self, data: bytes | bytearray | memoryview) -> str:
        """Store ``data`` (at most MAX_CHUNK bytes) unless present; returns its id."""
        view = memoryview(data).cast("B")
        if len(view) > MAX_CHUNK:
            raise RefusedError(f"chunk of {len(view)} bytes: the most is {MAX_CHUNK}")
        cid = chunk_id(view)
        with self._open(cid[:2], create=True) as fds:
            assert fds is not None
            chunks_fd, fan_fd = fds
            with _flock(chunks_fd, fcntl.LOCK_SH):
                if self._refresh(fan_fd, cid):
                    return cid
            self._write(chunks_fd, fan_fd, cid, CODEC_RAW, view, len(view))
        return cid

    def put_encoded(self, chunk_id: str, codec: int, payload: bytes | bytearray | memoryview,
                    plain_bytes: int) -> int:
        """Store a chunk a peer encoded: decoded (bounded by ``plain_bytes``, at most
        MAX_CHUNK) and re-hashed first, IntegrityError if it is not ``chunk_id``'s data;
        stored as given (``codec``). Returns the bytes it added on disk (0: already there)."""
        cid = check_id(chunk_id)
        view = memoryview(payload).cast("B")
        if len(view) > MAX_CHUNK:
            raise RefusedError(f"chunk payload of {len(view)} bytes: the most is {MAX_CHUNK}")
        plain = decode_chunk(codec, view, plain_bytes, where=f"chunk {cid}")
        if hashlib.sha256(plain).hexdigest() != cid:  # (``chunk_id`` is the argument here)
            raise IntegrityError(f"chunk {cid}: the data sent does not hash to its id")
        with self._open(cid[:2], create=True) as fds:
            assert fds is not None
            chunks_fd, fan_fd = fds
            with _flock(chunks_fd, fcntl.LOCK_SH):
                if self._refresh(fan_fd, cid):
                    return 0
            self._write(chunks_fd, fan_fd, cid, codec, view, plain_bytes)
        return HEADER.size + len(view)

    def _refresh(self, fan_fd: int, cid: str) -> bool:
        """True if chunk ``cid`` is there; its mtime is then set to now (gc's grace restarts)."""
        try:
            st = os.stat(cid, dir_fd=fan_fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        if not stat.S_ISREG(st.st_mode):
            raise RefusedError(f"{self.path(cid)} is not a regular file (a symlink?): "
                               "not writing through it")
        os.utime(cid, dir_fd=fan_fd, follow_symlinks=False)
        return True

    def _write(self, chunks_fd: int, fan_fd: int, cid: str, codec: int, view: memoryview,
               plain_bytes: int) -> None:
        partial = f"{cid}.{secrets.token_hex(8)}{PARTIAL_SUFFIX}"
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600, dir_fd=fan_fd)
        try:
            # held until the rename: gc leaves a partial whose writer is alive, however old
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            _write_all(fd, memoryview(HEADER.pack(MAGIC, VERSION, codec, plain_bytes)))
            _write_all(fd, view)
            os.fsync(fd)
            with _flock(chunks_fd, fcntl.LOCK_SH):
                # a concurrent put of the same data renames identical bytes: either one wins
                os.rename(partial, cid, src_dir_fd=fan_fd, dst_dir_fd=fan_fd)
                os.fsync(fan_fd)
        except BaseException:
            try:
                os.unlink(partial, dir_fd=fan_fd)
            except FileNotFoundError:
                pass
            raise
        finally:
            os.close(fd)

    # -- reading --------------------------------------------------------------
    def has(self, chunk_id: str) -> bool:
        """True if a chunk file (a regular one) is stored under ``chunk_id``; nothing is read."""
        st = self._lstat(chunk_id)
        return st is not None and stat.S_ISREG(st.st_mode)

    def touch(self, chunk_id: str) -> bool:
        """True if chunk ``chunk_id`` is stored; its mtime is then set to now, so gc's grace
        period protects it for a backup that re-uses it instead of putting it again."""
        cid = check_id(chunk_id)
        with self._open(cid[:2]) as fds:
            if fds is None:
                return False
            chunks_fd, fan_fd = fds
            with _flock(chunks_fd, fcntl.LOCK_SH):
                try:
                    return self._refresh(fan_fd, cid)
                except RefusedError:
                    return False  # junk under its name: "missing", and put refuses it

    def size(self, chunk_id: str) -> int:
        """The bytes chunk ``chunk_id`` takes on disk, header included; IntegrityError if none."""
        st = self._lstat(chunk_id)
        if st is None or not stat.S_ISREG(st.st_mode):
            raise IntegrityError(f"chunk {chunk_id} is missing")
        return st.st_size

    def _lstat(self, chunk_id: str) -> os.stat_result | None:
        """What is at the chunk's name (not followed); None if nothing."""
        cid = check_id(chunk_id)
        with self._open(cid[:2]) as fds:
            if fds is None:
                return None
            try:
                return os.stat(cid, dir_fd=fds[1], follow_symlinks=False)
            except FileNotFoundError:
                return None

    def get(self, chunk_id: str) -> bytes:
        """The plain data of chunk ``chunk_id``, re-hashed; IntegrityError if missing or bad."""
        cid = check_id(chunk_id)
        try:
            with self._open(cid[:2]) as fds:
                if fds is None:
                    raise IntegrityError(f"chunk {cid} is missing")
                return self._read(fds[1], cid)
        except RefusedError as exc:  # a symlink for chunks/ or its fan-out directory
            raise IntegrityError(str(exc)) from None

    def _read(self, fan_fd: int, cid: str) -> bytes:
        where = self.path(cid)
        try:
            fd = os.open(cid, _READ_FLAGS, dir_fd=fan_fd)
        except FileNotFoundError:
            raise IntegrityError(f"chunk {cid} is missing") from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise IntegrityError(f"{where} is a symlink: not following it") from None
            raise
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise IntegrityError(f"{where} is not a regular file")
            limit = HEADER.size + MAX_CHUNK
            if st.st_size > limit:
                raise IntegrityError(f"{where}: {st.st_size} bytes, more than a chunk can hold "
                                     f"({limit}): not reading it")
            with open(fd, "rb", closefd=False) as f:
                blob = f.read(st.st_size + 1)  # one more: a file growing under us shows
        finally:
            os.close(fd)
        if len(blob) != st.st_size:
            raise IntegrityError(f"{where} changed while it was read")
        return _parse_chunk(blob, str(where), cid)

    # -- listing, checking, sweeping -----------------------------------------
    def _scan(self) -> Iterator[tuple[_Entry, int, int]]:
        """Every entry under ``chunks/``, sorted and classified, with the descriptors of
        ``chunks/`` and of its fan-out directory (-1 for junk in ``chunks/`` itself), valid
        until the next entry. Nothing is followed or opened but the fan-out directories."""
        with self._open() as fds:
            if fds is None:
                return
            chunks_fd = fds[0]
            with os.scandir(chunks_fd) as it:
                fans = sorted(it, key=lambda e: e.name)
            for fan in fans:
                if not _FAN_RE.fullmatch(fan.name):
                    yield _Entry("junk", "", fan.name, "not a fan-out name"), chunks_fd, -1
                    continue
                try:
                    fan_fd = self._open_dir(chunks_fd, fan.name)
                except RefusedError:
                    why = "not a directory (a symlink?): not followed"
                    yield _Entry("junk", "", fan.name, why), chunks_fd, -1
                    continue
                if fan_fd is None:
                    continue  # gone since the listing
                try:
                    with os.scandir(fan_fd) as it:
                        entries = sorted(it, key=lambda e: e.name)
                    for entry in entries:
                        yield _classify(fan.name, entry), chunks_fd, fan_fd
                finally:
                    os.close(fan_fd)

    def ids(self, junk: list[Junk] | None = None) -> Iterator[str]:
        """The stored chunks' ids, sorted; anything else is logged and appended to ``junk``."""
        for entry, _, _ in self._scan():
            if entry.kind == "chunk":
                yield entry.name
            elif entry.kind == "junk":
                found = Junk(_rel(entry), entry.reason)
                log.warning("%s: %s", printable(found.path), found.reason)
                if junk is not None:
                    junk.append(found)

    def verify(self, ids: Iterable[str] | None = None) -> VerifyReport:
        """Re-hash every chunk, or those of ``ids`` (missing ones are listed as such)."""
        report = VerifyReport()
        for cid in (self.ids(report.junk) if ids is None else ids):
            report.checked += 1
            try:
                self.get(cid)
            except RefusedError as exc:
                report.bad.append((printable(repr(cid))[:80], str(exc)))
            except IntegrityError as exc:
                if self._absent(cid):
                    report.missing.append(cid)
                else:
                    report.bad.append((cid, str(exc)))
        return report

    def _absent(self, cid: str) -> bool:
        """True if nothing at all is stored under chunk ``cid``'s name."""
        try:
            return self._lstat(cid) is None
        except RefusedError:
            return False  # a symlink for a fan-out directory: bad, not missing

    def gc(self, referenced: Set[str], *, grace_s: float, now: float | None = None,
           dry_run: bool = False) -> GcReport:
        """Remove chunks not in ``referenced`` and not touched for ``grace_s`` seconds, and
        partial files older than that whose writer is gone. Junk is reported, never removed."""
        if not isinstance(grace_s, (int, float)) or not math.isfinite(grace_s) or grace_s < 0:
            raise UsageError(f"gc grace period must be a finite number of seconds >= 0, "
                             f"not {grace_s!r}")
        now = time.time() if now is None else now
        report = GcReport(dry_run=dry_run)
        for entry, chunks_fd, fan_fd in self._scan():
            if entry.kind == "junk":
                report.junk.append(Junk(_rel(entry), entry.reason))
            elif entry.kind == "chunk" and entry.name in referenced:
                report.kept_referenced += 1
            else:
                self._sweep(chunks_fd, fan_fd, entry, now - grace_s, report)
        return report

    def _sweep(self, chunks_fd: int, fan_fd: int, entry: _Entry, cutoff: float,
               report: GcReport) -> None:
        """Remove one unreferenced chunk or partial if older than ``cutoff`` (an mtime)."""
        if entry.kind == "partial":
            if not _old_regular(fan_fd, entry.name, cutoff):
                report.partials_left += 1
            elif _remove_dead_partial(report, fan_fd, entry.name):
                report.partials_removed.append(_rel(entry))
            else:
                report.partials_left += 1  # its writer is alive
            return
        # exclusive: no put can re-use this chunk between the age check and the unlink
        with _flock(chunks_fd, fcntl.LOCK_EX):
            try:
                st = os.stat(entry.name, dir_fd=fan_fd, follow_symlinks=False)
            except FileNotFoundError:
                return
            if not stat.S_ISREG(st.st_mode) or st.st_mtime >= cutoff:
                report.kept_young += 1
                return
            if not report.dry_run:
                os.unlink(entry.name, dir_fd=fan_fd)
        if not report.dry_run:
            os.fsync(fan_fd)
        report.removed.append(entry.name)
        report.freed_bytes += st.st_size


class BackendChunkStore(ChunkStore):
    """The chunks of a repository on an object store: ``chunks/XX/<name>`` objects, one
    per chunk, each written with ``put(exclusive=True)`` (already there is fine).

    ``<name>`` is the chunk's id (its sha256) in a plain repository, or its keyed name
    (:func:`~sanoffload.store.crypt.chunk_name`) in an encrypted one: ``key_of`` says
    which (:meth:`~sanoffload.store.repo.Naming.chunk_key`). A keyed name cannot be turned
    back into an id, so such a store lists keys, not ids.

    There are no flocks or mtime refreshes here: a chunk a backup re-uses keeps its first
    write time, and S3 has no cheap "touch" (a copy onto itself is a new version). gc is
    therefore two-phase (:meth:`gc`).
    """

    def __init__(self, backend: Backend, key_of: Callable[[str], str] | None = None, *,
                 keyed: bool = False) -> None:  # no root directory: not ChunkStore's
        self.backend = backend
        self._key_of = key_of if key_of is not None else _plain_key
        self.keyed = keyed

    def key(self, chunk_id: str) -> str:
        """The object key of chunk ``chunk_id`` (checked)."""
        return self._key_of(check_id(chunk_id))

    def path(self, chunk_id: str) -> Path:
        """The chunk's key, for messages."""
        return Path(self.backend.location) / self.key(chunk_id)

    def _info(self, cid: str) -> ObjectInfo | None:
        try:
            return self.backend.stat(self.key(cid))
        except IntegrityError:
            return None  # not an object (a directory store's junk): missing, never read

    def _store(self, cid: str, codec: int, view: memoryview, plain_bytes: int) -> int:
        """Bytes added (0: the chunk was there)."""
        if self._info(cid) is not None:
            return 0
        blob = HEADER.pack(MAGIC, VERSION, codec, plain_bytes) + bytes(view)
        try:
            self.backend.put(self.key(cid), blob, exclusive=True)
        except ResourceError:
            return 0  # a concurrent put of the same data won: identical bytes
        return len(blob)

    def put(self, data: bytes | bytearray | memoryview) -> str:
        view = memoryview(data).cast("B")
        if len(view) > MAX_CHUNK:
            raise RefusedError(f"chunk of {len(view)} bytes: the most is {MAX_CHUNK}")
        cid = chunk_id(view)
        self._store(cid, CODEC_RAW, view, len(view))
        return cid

    def put_encoded(self, chunk_id: str, codec: int, payload: bytes | bytearray | memoryview,
                    plain_bytes: int) -> int:
        cid = check_id(chunk_id)
        view = memoryview(payload).cast("B")
        if len(view) > MAX_CHUNK:
            raise RefusedError(f"chunk payload of {len(view)} bytes: the most is {MAX_CHUNK}")
        plain = decode_chunk(codec, view, plain_bytes, where=f"chunk {cid}")
        if hashlib.sha256(plain).hexdigest() != cid:
            raise IntegrityError(f"chunk {cid}: the data sent does not hash to its id")
        return self._store(cid, codec, view, plain_bytes)

    def has(self, chunk_id: str) -> bool:
        return self._info(chunk_id) is not None

    def touch(self, chunk_id: str) -> bool:
        """True if the chunk is stored (an object store keeps its write time as it is)."""
        return self.has(chunk_id)

    def size(self, chunk_id: str) -> int:
        info = self._info(chunk_id)
        if info is None:
            raise IntegrityError(f"chunk {chunk_id} is missing")
        return info.size

    def get(self, chunk_id: str) -> bytes:
        cid = check_id(chunk_id)
        try:
            blob = self.backend.get(self.key(cid), max_bytes=HEADER.size + MAX_CHUNK)
        except NotFound:
            raise IntegrityError(f"chunk {cid} is missing") from None
        return _parse_chunk(blob, str(self.path(cid)), cid)

    def _absent(self, cid: str) -> bool:
        return self._info(cid) is None

    def _objects(self, junk: list[Junk] | None) -> Iterator[ObjectInfo]:
        for info in self.backend.list(f"{CHUNKS}/"):
            parts = info.key.split("/")
            if len(parts) != 3 or not _ID_RE.fullmatch(parts[2]) or parts[2][:2] != parts[1]:
                found = Junk(info.key, "not a chunk name")
                log.warning("%s: %s", printable(found.path), found.reason)
                if junk is not None:
                    junk.append(found)
                continue
            yield info

    def ids(self, junk: list[Junk] | None = None) -> Iterator[str]:
        if self.keyed:
            raise UsageError(f"{self.backend.location}: chunk names are keyed: they do not "
                             "say which chunk they hold (verify the backups instead)")
        for info in self._objects(junk):
            yield info.key.rsplit("/", 1)[1]

    def gc(self, referenced: Set[str], *, grace_s: float, now: float | None = None,
           dry_run: bool = False) -> GcReport:
        """Two-phase sweep: chunks not in ``referenced`` are recorded in a candidates object
        (``gc/candidates-<time>``, sealed like the rest in an encrypted repository); a later
        run removes a candidate that a run at least ``grace_s`` ago recorded, that is still
        unreferenced, was written more than ``grace_s`` ago and is not retained. With
        ``grace_s`` 0 one run does both (nothing to wait for). Uncommitted uploads older
        than the grace are aborted. Every removal is of every version (a versioned
        bucket's plain delete only hides an object).

        Why two phases: a backup still running has no manifest yet, and a chunk it re-uses
        keeps its old write time, so neither age nor references alone say it is unused; a
        chunk unreferenced at two marks a grace apart is, when no backup runs longer.
        """
        if not isinstance(grace_s, (int, float)) or not math.isfinite(grace_s) or grace_s < 0:
            raise UsageError(f"gc grace period must be a finite number of seconds >= 0, "
                             f"not {grace_s!r}")
        now = time.time() if now is None else now
        cutoff = now - grace_s
        report = GcReport(dry_run=dry_run)
        wanted = {self.key(cid) for cid in referenced}
        unreferenced: dict[str, ObjectInfo] = {}
        for info in self._objects(report.junk):
            if info.key in wanted:
                report.kept_referenced += 1
            else:
                unreferenced[info.key] = info
        due, consumed = self._due_candidates(cutoff)
        if grace_s == 0:
            due |= set(unreferenced)
        left: list[str] = []
        for key, info in sorted(unreferenced.items()):
            if key not in due or info.mtime >= cutoff:
                report.kept_young += 1
                left.append(key)
                continue
            versions = self.backend.versions(key)
            until = max((v.retain_until for v in versions
                         if v.retain_until is not None and v.retain_until > now), default=None)
            if until is not None:
                report.kept_retained += 1
                left.append(key)
                continue
            if not dry_run:
                try:
                    delete_versions(self.backend, key, versions)
                except AuthError as exc:
                    report.refused.append((key, exc.message))
                    left.append(key)
                    continue
            report.removed.append(key.rsplit("/", 1)[1])
            report.freed_bytes += info.size
        report.candidates = len(left)
        if dry_run:
            return report
        if left:
            stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + \
                f".{int(now * 1e6) % 1_000_000:06d}Z"
            doc = {"format": CANDIDATES_FORMAT, "version": 1, "keys": left}
            try:
                self.backend.put(f"{GC_DIR}/{CANDIDATES_PREFIX}{stamp}",
                                 json.dumps(doc, separators=(",", ":")).encode(),
                                 exclusive=True)
            except ResourceError:
                log.warning("gc: a candidates record of %s exists already: not replaced", stamp)
        for key in consumed:
            try:
                delete_versions(self.backend, key)
            except AuthError as exc:
                log.warning("gc: %s: %s", printable(key), exc.message)
        for upload in self.backend.stale_uploads(cutoff):
            try:
                self.backend.abort_upload(upload)
            except AuthError as exc:
                report.refused.append((upload.key, exc.message))
                continue
            report.uploads_aborted.append(upload.key)
        return report

    def _due_candidates(self, cutoff: float) -> tuple[set[str], list[str]]:
        """The chunk keys recorded by gc runs before ``cutoff``, and those records' keys.

        A record's time is the later of its name's and the store's write time (a record
        named in the past is not due early). A record that does not read, was written
        twice, or names anything but chunk keys is skipped whole (and logged): it can only
        delay a removal, never cause one.
        """
        due: set[str] = set()
        consumed: list[str] = []
        for info in self.backend.list(f"{GC_DIR}/"):
            name = info.key[len(GC_DIR) + 1:]
            match = _CANDIDATES_RE.fullmatch(name)
            if match is None:
                continue
            try:
                named = calendar.timegm(time.strptime(match.group(1), "%Y%m%dT%H%M%S"))
            except ValueError:
                continue
            if max(float(named), info.mtime) >= cutoff:
                continue
            try:
                versions = self.backend.versions(info.key)
                if len(versions) > 1:
                    raise ValueError(f"{len(versions)} versions: it was overwritten")
                raw = self.backend.get(info.key, max_bytes=MAX_CANDIDATES_BYTES,
                                       version=versions[0].version if versions else None)
                keys = _candidate_keys(raw)
            except (ValueError, IntegrityError, NotFound) as exc:
                log.warning("gc: %s skipped: %s", printable(info.key), printable(str(exc))[:200])
                continue
            due |= keys
            consumed.append(info.key)
        return due, consumed


#: where an object store's gc keeps its candidates records
GC_DIR = "gc"
CANDIDATES_PREFIX = "candidates-"
CANDIDATES_FORMAT = "sanoffload-gc-candidates"
#: 250,000 chunks (1 TB of 4 MiB chunks) take about 20 MB of keys
MAX_CANDIDATES_BYTES = 64 << 20
_CANDIDATES_RE = re.compile(re.escape(CANDIDATES_PREFIX)
                            + r"([0-9]{8}T[0-9]{6})\.[0-9]{6}Z")
_CHUNK_KEY_RE = re.compile(re.escape(CHUNKS) + r"/([0-9a-f]{2})/(\1[0-9a-f]{62})")


def _plain_key(cid: str) -> str:
    return f"{CHUNKS}/{cid[:2]}/{cid}"


def _candidate_keys(raw: bytes) -> set[str]:
    """The chunk keys of a candidates record, checked as hostile input (ValueError)."""
    try:
        doc = json.loads(raw)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    if not isinstance(doc, dict) or set(doc) != {"format", "version", "keys"} or \
            doc["format"] != CANDIDATES_FORMAT or doc["version"] != 1 or \
            not isinstance(doc["keys"], list):
        raise ValueError(f"not a {CANDIDATES_FORMAT} record")
    keys = doc["keys"]
    if not all(isinstance(k, str) and _CHUNK_KEY_RE.fullmatch(k) for k in keys):
        raise ValueError("names something that is not a chunk")
    return set(keys)


def delete_versions(backend: Backend, key: str,
                    versions: list[ObjectInfo] | None = None) -> None:
    """Remove every version of ``key``, delete markers last (a plain delete on a versioned
    bucket only hides the object behind a marker); AuthError if the store refuses."""
    found = backend.versions(key) if versions is None else versions
    if not found or all(v.version is None for v in found):
        backend.delete(key)
        return
    for v in sorted(found, key=lambda v: v.deleted):
        backend.delete(key, version=v.version)


def _parse_chunk(blob: bytes, where: str, cid: str) -> bytes:
    """The plain data of chunk file ``blob`` (header + payload), checked to be ``cid``'s;
    IntegrityError naming ``where`` otherwise."""
    if len(blob) < HEADER.size:
        raise IntegrityError(f"{where}: {len(blob)} bytes, shorter than a chunk header")
    magic, version, codec, length = HEADER.unpack_from(blob)
    if magic != MAGIC or version != VERSION:
        raise IntegrityError(f"{where}: not a chunk file (bad header)")
    payload = memoryview(blob)[HEADER.size:]
    if codec == CODEC_RAW and len(payload) != length:
        raise IntegrityError(f"{where}: {len(payload)} bytes of data, the header says "
                             f"{length}")
    plain = decode_chunk(codec, payload, length, where=where)
    if chunk_id(plain) != cid:
        raise IntegrityError(f"{where}: content does not match its sha256 (damaged)")
    return plain


def _remove_dead_partial(report: GcReport, fan_fd: int, name: str) -> bool:
    """Remove a dead writer's partial (True); False if its writer still holds its lock."""
    try:
        fd = os.open(name, _READ_FLAGS, dir_fd=fan_fd)
    except FileNotFoundError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        here = os.stat(name, dir_fd=fan_fd, follow_symlinks=False)
        mine = os.fstat(fd)
        # the writer may have renamed it and another taken the name: remove only what we hold
        if (here.st_dev, here.st_ino) != (mine.st_dev, mine.st_ino):
            return False
        if not report.dry_run:
            os.unlink(name, dir_fd=fan_fd)
        return True
    except FileNotFoundError:
        return False
    finally:
        os.close(fd)


def _classify(fan: str, entry: os.DirEntry[str]) -> _Entry:
    name = entry.name
    partial = _PARTIAL_RE.fullmatch(name)
    cid = partial.group(1) if partial else name
    if not _ID_RE.fullmatch(cid):
        return _Entry("junk", fan, name, "not a chunk name")
    if cid[:2] != fan:
        return _Entry("junk", fan, name, "a chunk name in the wrong fan-out directory")
    if not entry.is_file(follow_symlinks=False):
        return _Entry("junk", fan, name, "not a regular file (a symlink?): not followed")
    return _Entry("partial" if partial else "chunk", fan, name)


def _rel(entry: _Entry) -> str:
    return "/".join(p for p in (CHUNKS, entry.fan, entry.name) if p)


def _old_regular(dir_fd: int, name: str, cutoff: float) -> bool:
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_mtime < cutoff


@contextmanager
def _flock(fd: int, how: int) -> Iterator[None]:
    """``chunks/``'s lock: shared by puts, exclusive for one gc unlink at a time."""
    # each operation opens chunks/ anew: flock on one shared description would convert, not wait
    fcntl.flock(fd, how)
    try:
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)

