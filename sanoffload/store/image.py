"""Image backups in the repository (issue 13): the map beside the manifest, the local sink,
verify and restore.

An image backup is ``<timestamp>.map`` (the :class:`~sanoffload.store.imagemap.ChunkMap`)
plus ``<timestamp>.json`` (its manifest, ``"kind": "image"``), the chunks in
``ROOT/chunks/``. A put (:class:`LocalImageSink`) holds ``<timestamp>.map.partial``
from its start, exclusively created and flock-held like an archive's partial (a
second put of the same id fails at once; a dead one's is swept). Chunks go to the
chunk store as they come, each decoded and re-hashed
(:meth:`~sanoffload.store.chunks.ChunkStore.put_encoded`). The commit checks that
every chunk the map names is present, writes the map into the partial, publishes it
(a link: nothing replaced), then writes and publishes the manifest, which is the
commit. A failure before that leaves at most chunks no manifest names: ``store gc``
sweeps them after its grace period.

Quota: an image backup is charged the bytes it added to ``chunks/`` (``new_bytes``),
reserved before each chunk is written (:class:`~sanoffload.store.repo.QuotaHold`).
A chunk two backups share is charged to the one that stored it first.

Restore (:func:`restore_image`) reads chunks in a small thread pool, each re-hashed
by the chunk store, and writes them at their offsets: to a new regular file (zero
pieces stay holes, the file is truncated to the image's size) or to a block device
opened ``O_EXCL`` (the kernel refuses it while it is mounted or held) and at least as
big as the image (zero pieces are written as zeros: a device has old data there).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
from collections.abc import Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..errors import AuthError, IntegrityError, RefusedError, ResourceError, UsageError
from ..text import printable
from .backend_dir import _sweep_partial, _write_all
from .chunks import HEADER as CHUNK_HEADER, MAX_CHUNK, check_id
from .imagemap import DEFAULT_CHUNK_SIZE, ChunkMap
from .manifest import (
    KIND_IMAGE,
    MAX_BYTES,
    VERIFIED_OK,
    ImageInfo,
    Manifest,
    Verification,
    image_sender_fields,
    to_utc,
    utc_iso,
)
from .repo import (
    ARCHIVE_SUFFIX,
    MANIFEST_SUFFIX,
    MAP_SUFFIX,
    PARTIAL_SUFFIX,
    Backup,
    BackupId,
    Quota,
    QuotaHold,
    Repository,
    _commit_files,
    check_path,
    format_timestamp,
    image_failure,
    slug_for_path,
)

log = logging.getLogger(__name__)

#: the most ids one :meth:`LocalImageSink.missing` call takes (the wire's bound too)
MAX_MISSING_IDS = 4096
#: how many chunks a restore reads at once
DEFAULT_JOBS = 4
#: how many missing or bad chunks an error names (the count says the rest)
_NAMED = 5


def load_map(repo: Repository, backup: Backup) -> ChunkMap:
    """The chunk map of image backup ``backup``, checked against its manifest's
    ``map_bytes`` and ``map_sha256`` and then whole; IntegrityError otherwise."""
    return repo.load_map(backup)


def image_backup(repo: Repository, bid: BackupId | str) -> Backup:
    """Backup ``bid``, which must be an image backup (UsageError for a tar one)."""
    backup = repo.get(bid)
    if not backup.is_image:
        raise UsageError(f"{backup.id} is a tar backup, not an image: restore it into a "
                         "directory")
    return backup


# -- putting -------------------------------------------------------------------
class LocalImageSink:
    """One image backup being put into a repository on this host (an
    :class:`~sanoffload.store.imagemap.ImageSink`; the store's wire ops use it too).

    ``fields`` are the sender's (:func:`~sanoffload.store.manifest.image_sender_fields`):
    ``frozen_at`` names the backup; more may come with :meth:`commit`. ``size`` and
    ``chunk_size``, when given at the start (the wire gives them), bound every chunk
    and must be the committed map's.
    """

    def __init__(self, repo: Repository, client: str | None, host: str, path: str,
                 fields: Mapping[str, Any] | None = None, *, quota: Quota | None = None,
                 size: int | None = None, chunk_size: int | None = None) -> None:
        self.repo = repo
        self.client = quota.client if quota is not None else client
        self.path = check_path(path)
        try:
            self.fields, self.image_fields = image_sender_fields(fields)
        except ValueError as exc:
            raise UsageError(f"image backup: manifest fields: {exc}") from None
        when = self.fields.get("frozen_at")
        stamp = format_timestamp(to_utc(when) if when is not None else datetime.now(UTC))
        self.id = BackupId(host, slug_for_path(path), stamp)
        self.geometry: tuple[int, int] | None = None
        if size is not None or chunk_size is not None:
            probe = ChunkMap.zeros(size if size is not None else -1,
                                   chunk_size if chunk_size is not None else -1)
            self.geometry = (probe.size, probe.chunk_size)
        self.new_chunks = 0
        self.new_bytes = 0
        self._done = False
        self._hold: QuotaHold | None = None
        self._fd: int | None = None
        if repo.local is None:
            self._open_object(quota)
            return
        self.directory = repo._dir(host, self.id.slug, create=True)
        stem = self.id.timestamp
        self.map_path = self.directory / (stem + MAP_SUFFIX)
        self.manifest_path = self.directory / (stem + MANIFEST_SUFFIX)
        self.partial = self.directory / (stem + MAP_SUFFIX + PARTIAL_SUFFIX)
        with repo.lock():
            if any(os.path.lexists(self.directory / (stem + s))
                   for s in (ARCHIVE_SUFFIX, MANIFEST_SUFFIX, MAP_SUFFIX)):
                raise ResourceError(f"backup {self.id} already exists")
            _sweep_partial(self.partial)
            fd = os.open(self.partial,
                         os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BaseException:
                os.close(fd)
                self.partial.unlink(missing_ok=True)
                raise
            self._fd = fd
        if quota is not None:
            try:
                self._hold = QuotaHold(repo, quota, self.id)
            except BaseException:
                self.abort("refused by the quota")
                raise

    def _open_object(self, quota: Quota | None) -> None:
        """Start on an object store: nothing to hold until the commit puts the map, then the
        manifest, each only if absent (quota: refused once the client's stored bytes reach
        it; the store's own quotas do the rest)."""
        repo, bid = self.repo, self.id
        self.map_path = repo._file(repo.key(bid, MAP_SUFFIX))  # names for messages
        self.manifest_path = repo._file(repo.key(bid, MANIFEST_SUFFIX))
        repo.check_new(bid, quota)

    def __enter__(self) -> LocalImageSink:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._done:
            self.abort("the put did not commit")

    def _open(self) -> None:
        if self._done or (self._fd is None and self.repo.local is not None):
            raise UsageError(f"{self.id}: this image put is over")

    def previous_map(self, backup_id: str) -> ChunkMap | None:
        """The map of image backup ``backup_id`` of this host and path, checked; None if
        there is no such whole image backup here (the caller reads everything)."""
        self._open()
        try:
            bid = BackupId.parse(backup_id)
        except RefusedError as exc:
            log.warning("%s: previous map %s: %s", self.id, printable(str(backup_id))[:120],
                        exc)
            return None
        if (bid.host, bid.slug) != (self.id.host, self.id.slug):
            log.warning("%s: previous map of another object (%s): not used", self.id, bid)
            return None
        try:
            backup = self.repo.get(bid)
            if not backup.is_image:
                return None
            found = load_map(self.repo, backup)
            if self.geometry is not None and (found.size, found.chunk_size) != self.geometry:
                log.warning("%s: previous map %s is of another geometry (a full read)",
                            self.id, bid)
                return None
            return found
        except (UsageError, IntegrityError) as exc:
            log.warning("%s: no usable previous map %s (a full read): %s", self.id, bid, exc)
            return None

    def missing(self, chunk_ids: Sequence[str]) -> set[str]:
        """Which of ``chunk_ids`` (at most :data:`MAX_MISSING_IDS`) the store lacks."""
        self._open()
        if len(chunk_ids) > MAX_MISSING_IDS:
            raise UsageError(f"missing: {len(chunk_ids)} ids in one call, the most is "
                             f"{MAX_MISSING_IDS}")
        store = self.repo.chunks
        # touched, not just looked at: a chunk this backup re-uses is young for gc from now
        return {cid for cid in map(check_id, chunk_ids) if not store.touch(cid)}

    def put_chunk(self, chunk_id: str, codec: int, payload: bytes, plain_bytes: int) -> None:
        """Decode, re-hash and store one chunk (its new bytes reserved from the quota)."""
        self._open()
        limit = self.geometry[1] if self.geometry is not None else MAX_CHUNK
        if isinstance(plain_bytes, bool) or not isinstance(plain_bytes, int) or \
                not 0 < plain_bytes <= limit:
            raise UsageError(f"chunk {printable(str(chunk_id))[:70]}: {plain_bytes!r} plain "
                             f"bytes, expected 1 to {limit}")
        if len(payload) > limit:
            raise UsageError(f"chunk {printable(str(chunk_id))[:70]}: payload of "
                             f"{len(payload)} bytes, more than its chunk size {limit}")
        if self._hold is not None:
            self._hold.need(self.new_bytes + CHUNK_HEADER.size + len(payload))
        added = self.repo.chunks.put_encoded(chunk_id, codec, payload, plain_bytes)
        if added:
            self.new_chunks += 1
            self.new_bytes += added

    def commit(self, chunk_map: ChunkMap, fields: Mapping[str, Any] | None = None
               ) -> dict[str, Any]:
        """Check every referenced chunk is present, publish the map, then the manifest."""
        self._open()
        try:
            # under the repository lock: gc marks under it too, so it sees this manifest
            # or this commit sees what gc swept, never a map naming a chunk swept meanwhile
            with self.repo.lock():
                backup = self._commit(chunk_map, fields)
        except BaseException:
            self.abort("the commit failed")
            raise
        self._close()
        self._done = True
        log.info("stored image %s: %d chunks (%d new, %d bytes)", self.id,
                 backup.manifest.image.chunks if backup.manifest.image else 0,
                 self.new_chunks, self.new_bytes)
        return backup.to_dict()

    def _commit(self, chunk_map: ChunkMap, fields: Mapping[str, Any] | None) -> Backup:
        if self.geometry is not None and (chunk_map.size, chunk_map.chunk_size) != self.geometry:
            raise UsageError(f"{self.id}: the map is of {chunk_map.size} bytes in "
                             f"{chunk_map.chunk_size}-byte chunks, the put was opened for "
                             f"{self.geometry[0]} in {self.geometry[1]}")
        try:
            more, more_image = image_sender_fields(fields)
        except ValueError as exc:
            raise UsageError(f"commit: manifest fields: {exc}") from None
        values = {**self.fields, **more}
        stated = {**self.image_fields, **more_image}
        referenced = chunk_map.referenced()
        store = self.repo.chunks
        absent = sorted(cid for cid in referenced if not store.has(cid))
        if absent:
            raise IntegrityError(f"{self.id}: the map names {len(absent)} chunk(s) the store "
                                 f"does not hold: {', '.join(absent[:_NAMED])}")
        blob = chunk_map.to_bytes()
        computed = {"size": chunk_map.size, "chunk_size": chunk_map.chunk_size,
                    "map_sha256": chunk_map.sha256(), "map_bytes": len(blob),
                    "chunks": len(referenced), "new_chunks": self.new_chunks,
                    "new_bytes": self.new_bytes}
        for key, value in computed.items():
            if key in stated and stated[key] != value:
                raise IntegrityError(f"{self.id}: the sender says image.{key} is "
                                     f"{printable(str(stated[key]))[:80]}, the store counts "
                                     f"{value}")
        try:
            info = ImageInfo(size=chunk_map.size, chunk_size=chunk_map.chunk_size,
                             map_sha256=chunk_map.sha256(), map_bytes=len(blob),
                             chunks=len(referenced), new_chunks=self.new_chunks,
                             new_bytes=self.new_bytes, read_bytes=stated.get("read_bytes"),
                             base=stated.get("base"), fstype=stated.get("fstype"))
            manifest = Manifest(host=self.id.host, path=self.path, slug=self.id.slug,
                                timestamp=self.id.timestamp, kind=KIND_IMAGE, image=info,
                                stored_at=utc_iso(datetime.now(UTC)),
                                verification=Verification.now(VERIFIED_OK, "on receipt"),
                                client=self.client, **values)
        except (ValueError, TypeError) as exc:
            raise UsageError(f"commit: {exc}") from None
        if len(manifest.to_json()) > MAX_BYTES:
            raise UsageError(f"commit: the manifest would exceed {MAX_BYTES} bytes")
        if self._fd is None:
            self._commit_objects(blob, manifest)
            return Backup(self.id, manifest, self.map_path, self.manifest_path,
                          self.repo.folder(self.id) if self.repo.naming.keyed else None)
        _write_all(self._fd, memoryview(blob))
        os.fsync(self._fd)
        os.fchmod(self._fd, 0o440)
        _commit_files(self.directory, self.id.timestamp, [(self.partial, self.map_path)],
                      manifest, self.manifest_path)
        return Backup(self.id, manifest, self.map_path, self.manifest_path)

    def _commit_objects(self, blob: bytes, manifest: Manifest) -> None:
        """The map, then the manifest (the commit), each only if absent; a map left alone by
        a failed manifest goes again (best effort: gc finds it otherwise)."""
        backend = self.repo.backend
        key = self.repo.key(self.id, MAP_SUFFIX)
        backend.put(key, blob, exclusive=True)
        try:
            backend.put(self.repo.key(self.id, MANIFEST_SUFFIX), manifest.to_json(),
                        exclusive=True)
        except BaseException:
            try:
                backend.delete(key)
            except (OSError, AuthError, ResourceError) as exc:
                log.warning("%s: left for gc: %s", key, exc)
            raise

    def abort(self, reason: str = "the backup failed") -> None:
        """Forget this put: its partial goes; the chunks it stored wait for ``store gc``."""
        if self._done:
            return
        self._done = True
        log.info("%s: image put aborted: %s", self.id, printable(reason)[:200])
        if self._fd is not None:
            self.partial.unlink(missing_ok=True)  # while still locked: no sweeper races it
        self._close()

    def _close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._hold is not None:
            self._hold.release()
            self._hold = None


# -- verifying -------------------------------------------------------------------
@dataclass
class ImageCheck:
    """What :func:`verify_image` found (it raises IntegrityError unless ``ok``)."""

    backup: BackupId
    chunks: int = 0
    missing: list[str] = field(default_factory=list)
    bad: list[tuple[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.missing and not self.bad


def check_image(repo: Repository, backup: Backup) -> ImageCheck:
    """Re-check an image backup: its map (size, sha256, whole) and every chunk it names,
    re-hashed; IntegrityError only for the map (the chunks' findings are in the result)."""
    count, missing, bad = repo.check_image_chunks(backup)
    return ImageCheck(backup.id, count, missing, bad)


def verify_image(repo: Repository, backup: Backup) -> ImageCheck:
    """:func:`check_image`, raising IntegrityError naming the backup and the first chunks
    missing or bad."""
    found = check_image(repo, backup)
    if not found.ok:
        raise IntegrityError(image_failure(backup.id, found.chunks, found.missing, found.bad))
    return found


# -- restoring -------------------------------------------------------------------
@dataclass(frozen=True)
class ImageRestore:
    """What :func:`restore_image` wrote."""

    backup: BackupId
    target: Path
    size: int
    chunks: int
    zero_chunks: int
    device: bool


def _open_target(target: Path, size: int, *, force: bool) -> tuple[int, bool]:
    """``(fd, is_device)`` for writing an image of ``size`` bytes to ``target``."""
    try:
        st = os.stat(target)
    except FileNotFoundError:
        st = None
    if st is not None and stat.S_ISBLK(st.st_mode):
        try:
            # O_EXCL on a block device: EBUSY while it is mounted or held by anyone
            fd = os.open(target, os.O_WRONLY | os.O_EXCL | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                raise RefusedError(f"{target} is in use (mounted, or held by another "
                                   "device): not writing an image over it") from None
            raise UsageError(f"{target}: cannot open it: {exc.strerror or exc}") from None
        try:
            have = os.lseek(fd, 0, os.SEEK_END)
            if have < size:
                raise RefusedError(f"{target} holds {have} bytes, the image needs {size}")
        except BaseException:
            os.close(fd)
            raise
        return fd, True
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise RefusedError(f"{target} is neither a block device nor a regular file")
    if st is not None and not force:
        raise RefusedError(f"{target} exists: not replacing it (give --force, or a new name)")
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(target, flags | (0 if st is not None else os.O_EXCL), 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise RefusedError(f"{target} is a symlink: not writing through it") from None
        raise UsageError(f"{target}: cannot create it: {exc.strerror or exc}") from None
    # emptied first: a hole must read as zeros, not as what was there
    os.ftruncate(fd, 0)
    os.ftruncate(fd, size)
    return fd, False


def restore_image(repo: Repository, bid: BackupId | str, target: str | os.PathLike[str], *,
                  jobs: int = DEFAULT_JOBS, force: bool = False) -> ImageRestore:
    """Write image backup ``bid`` to ``target`` (a regular file or a block device); every
    chunk is re-hashed before it is written. See the module docstring."""
    backup = image_backup(repo, bid)
    chunk_map = load_map(repo, backup)
    if not isinstance(jobs, int) or not 1 <= jobs <= 64:
        raise UsageError(f"jobs must be 1 to 64, not {jobs!r}")
    where = Path(os.path.abspath(target))
    created = not os.path.lexists(where)
    fd, device = _open_target(where, chunk_map.size, force=force)
    store = repo.chunks
    zeros = bytes(chunk_map.chunk_size) if device else b""

    def one(index: int) -> bool:
        offset, length = chunk_map.span(index)
        cid = chunk_map.chunk_id(index)
        if cid is None:
            if device:
                _pwrite_all(fd, memoryview(zeros)[:length], offset)
            return False
        data = store.get(cid)  # re-hashed there: IntegrityError if missing or damaged
        if len(data) != length:
            raise IntegrityError(f"{backup.id}: chunk {index} ({cid}) holds {len(data)} bytes, "
                                 f"the map needs {length}")
        _pwrite_all(fd, memoryview(data), offset)
        return True

    written = 0
    try:
        with ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="restore") as pool:
            pending: set[Future[bool]] = set()
            try:
                for index in range(chunk_map.count):
                    # bounded: at most 2 x jobs chunks (4 MiB each) in memory at once
                    if len(pending) >= 2 * jobs:
                        done, pending = wait(pending, return_when=FIRST_COMPLETED)
                        written += sum(f.result() for f in done)
                    pending.add(pool.submit(one, index))
                done, pending = wait(pending)
                written += sum(f.result() for f in done)
            finally:
                for f in pending:
                    f.cancel()
        os.fsync(fd)
    except BaseException as exc:
        os.close(fd)
        if created:
            where.unlink(missing_ok=True)  # a file we made must not pass for the image
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ResourceError(f"{where}: no space left for the image") from None
        raise
    os.close(fd)
    return ImageRestore(backup.id, where, chunk_map.size, written, chunk_map.count - written,
                        device)


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        n = os.pwrite(fd, data, offset)
        data = data[n:]
        offset += n


__all__ = ["DEFAULT_CHUNK_SIZE", "ImageCheck", "ImageRestore", "LocalImageSink",
           "check_image", "image_backup", "load_map", "restore_image", "verify_image"]
