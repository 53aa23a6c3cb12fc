"""``store copy``: copy backups from one repository to another, every byte re-hashed.

Any two backends (a directory, S3, either encrypted): each repository reads and
writes through its own backend, so keyed names and encryption are each side's.
Objects go over as the repository commits them (data first, the manifest last,
written only if absent: the commit), and nothing reaches DST unchecked:

* a tar backup's archive is streamed (CHUNK at a time, bounded memory) and its
  size and sha256 compared with SRC's manifest *before* DST's upload is committed:
  a mismatch aborts the upload and nothing is listed; an incremental level's state
  file is read whole (bounded), checked against the manifest, and published before
  the archive;
* an image backup's map is checked against the manifest, every chunk it names
  that DST lacks is read from SRC (its plain sha256 re-checked there) and re-checked
  again on DST's put; the map, then the manifest, go last.

The manifest is SRC's as it stands (host, path, times, sizes, client, last
verification): a copy is the same backup somewhere else. Backups go oldest first,
so a chain's parent is in DST before its child; naming an incremental backup
copies the chain it needs. A backup DST already holds with the same data (same
kind, archive or map sha256, state file sha256) is skipped: a second copy does
nothing. Under the same id with other data it is a conflict, and every conflict is
found before anything is written (ResourceError, nothing copied). A broken backup
of SRC (its manifest unreadable, its chain broken) is reported and not copied.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ..errors import AuthError, IntegrityError, ResourceError, UsageError
from ..text import printable
from .chunks import encode_chunk
from .manifest import Manifest
from .repo import (
    ARCHIVE_SUFFIX,
    MANIFEST_SUFFIX,
    MAP_SUFFIX,
    SNAPSHOT_SUFFIX,
    Backup,
    BackupId,
    Broken,
    Repository,
)

log = logging.getLogger(__name__)

#: how many conflicting ids an error names (the count says the rest)
_NAMED = 5


@dataclass
class CopyReport:
    """What :func:`copy_backups` did."""

    copied: list[BackupId] = field(default_factory=list)
    #: already in DST with the same data
    skipped: list[BackupId] = field(default_factory=list)
    #: SRC's backups that cannot be trusted, with why (not copied)
    broken: list[tuple[BackupId, str]] = field(default_factory=list)
    #: chunks and data bytes written to DST (chunks DST had are not counted)
    chunks: int = 0
    bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"copied": [str(b) for b in self.copied],
                "skipped": [str(b) for b in self.skipped],
                "broken": [{"id": str(b), "reason": why} for b, why in self.broken],
                "chunks": self.chunks, "bytes": self.bytes}


def same_data(a: Manifest, b: Manifest) -> bool:
    """True if two manifests describe the same backup data (verification records aside:
    an object store adds them beside the manifest, a directory rewrites it)."""
    def ident(m: Manifest) -> tuple[object, ...]:
        return (m.backup_id, m.kind, m.sha256, m.archive_bytes,
                m.image.map_sha256 if m.image is not None else None,
                m.snapshot_sha256, m.tar_level, m.parent)
    return ident(a) == ident(b)


def _chosen(src: Repository, ids: Iterable[BackupId | str] | None, host: str | None,
            report: CopyReport) -> list[Backup]:
    """SRC's backups to copy, ancestors included, oldest first; broken ones into ``report``."""
    picked: list[Backup] = []
    if ids is None:
        for entry in src.catalog(host=host):
            if isinstance(entry, Broken):
                report.broken.append((entry.id, entry.reason))
            else:
                picked.append(entry)
    else:
        for raw in ids:
            bid = raw if isinstance(raw, BackupId) else BackupId.parse(raw)
            if host is not None and bid.host != host:
                raise UsageError(f"{bid} is not a backup of host {host}")
            try:
                picked.append(src.get(bid))  # UsageError for none: the operator named it
            except IntegrityError as exc:
                report.broken.append((bid, exc.message))
    out: dict[BackupId, Backup] = {}
    for backup in picked:
        if not backup.manifest.is_incremental:
            out[backup.id] = backup
            continue
        try:
            links = src.chain(backup)  # the parents a restore from DST will need
        except IntegrityError as exc:
            report.broken.append((backup.id, exc.message))
            continue
        for link in links:
            out[link.id] = link
    return sorted(out.values(), key=lambda b: (b.id.time, b.id))


def _in_dst(dst: Repository, backup: Backup) -> bool | str:
    """True: DST has this very backup; False: it has nothing under its id; a str: why the
    id is taken by something else."""
    try:
        there = dst.get(backup.id)
    except UsageError:
        return False
    except IntegrityError as exc:
        return f"broken there: {exc.message}"
    if same_data(there.manifest, backup.manifest):
        return True
    return "other data under the same id"


def copy_backups(src: Repository, dst: Repository,
                 ids: Iterable[BackupId | str] | None = None, *,
                 host: str | None = None) -> CopyReport:
    """Copy SRC's backups (all, or ``ids``, or ``host``'s) to DST; see the module docstring.

    ResourceError before anything is written when DST holds another backup under one
    of the ids; IntegrityError naming the backup when its data does not match SRC's
    manifest (DST's upload aborted; the backups copied before it stay, complete).
    """
    if src.location == dst.location:
        raise UsageError(f"{src.location}: source and destination are the same repository")
    report = CopyReport()
    plan = _chosen(src, ids, host, report)
    conflicts: list[str] = []
    todo: list[Backup] = []
    for backup in plan:
        found = _in_dst(dst, backup)
        if found is True:
            report.skipped.append(backup.id)
        elif found is False:
            todo.append(backup)
        else:
            conflicts.append(f"{backup.id} ({printable(found)[:200]})")
    if conflicts:
        raise ResourceError(f"{dst.location} already holds {len(conflicts)} of these backups "
                            f"with other data: {'; '.join(conflicts[:_NAMED])}; nothing copied",
                            hint="copy into another repository, or remove them there first")
    for backup in todo:
        if backup.is_image:
            _copy_image(src, dst, backup, report)
        else:
            _copy_tar(src, dst, backup, report)
        report.copied.append(backup.id)
        log.info("copied %s from %s to %s", backup.id, src.location, dst.location)
    return report


def _forget(dst: Repository, keys: list[str]) -> None:
    """Remove what a failed copy published (best effort: a proxy's credentials may not
    delete, and gc finds objects no manifest names)."""
    for key in reversed(keys):
        try:
            dst.backend.delete(key)
        except (OSError, AuthError, ResourceError) as exc:
            log.warning("%s: left for gc: %s", printable(key), exc)


def _copy_tar(src: Repository, dst: Repository, backup: Backup, report: CopyReport) -> None:
    m = backup.manifest
    # checked against the manifest (size, sha256, header) before anything is written
    snapshot = src.load_snapshot(backup) if m.is_incremental else None
    published: list[str] = []
    writer = dst.backend.writer(dst.key(backup.id, ARCHIVE_SUFFIX), size_hint=m.archive_bytes)
    committed = False
    try:
        h = hashlib.sha256()
        with src.open_archive(backup) as f:
            for piece in src.archive_pieces(backup, f):  # the size is checked at the end
                h.update(piece)
                writer.write(piece)
        if h.hexdigest() != m.sha256:
            raise IntegrityError(f"{backup.id}: sha256 mismatch: the archive in {src.location} "
                                 f"has {h.hexdigest()}, the manifest says {m.sha256}; "
                                 "not copied")
        if snapshot is not None:
            # before the archive and the manifest: a listed incremental level has its state
            key = dst.key(backup.id, SNAPSHOT_SUFFIX)
            dst.backend.put(key, snapshot, exclusive=True)
            published.append(key)
        writer.commit()
        committed = True
        published.append(writer.key)
        dst.backend.put(dst.key(backup.id, MANIFEST_SUFFIX), m.to_json(), exclusive=True)
    except BaseException:
        if not committed:
            writer.abort()
        _forget(dst, published)
        raise
    report.bytes += m.archive_bytes + (len(snapshot) if snapshot is not None else 0)


def _copy_image(src: Repository, dst: Repository, backup: Backup, report: CopyReport) -> None:
    info = backup.manifest.image
    assert info is not None  # an image backup's manifest has its image fields
    chunk_map = src.load_map(backup)  # its size and sha256 checked against the manifest
    blob = chunk_map.to_bytes()
    if len(blob) != info.map_bytes:
        raise IntegrityError(f"{backup.id}: chunk map of {len(blob)} bytes, the manifest "
                             f"says {info.map_bytes}; not copied")
    referenced = sorted(chunk_map.referenced())
    have, put = src.chunks, dst.chunks
    for cid in referenced:
        # touched, not just looked at: a chunk DST already holds is young for its gc from now
        if put.touch(cid):
            continue
        data = have.get(cid)  # re-hashed: IntegrityError if missing or damaged
        codec, payload = encode_chunk(data)
        added = put.put_encoded(cid, codec, payload, len(data))  # re-hashed again
        if added:
            report.chunks += 1
            report.bytes += added
    map_key = dst.key(backup.id, MAP_SUFFIX)
    published: list[str] = []
    try:
        # under DST's lock: its gc marks under it too, so no chunk named here goes meanwhile
        with dst.lock():
            absent = [cid for cid in referenced if not put.has(cid)]
            if absent:
                raise IntegrityError(f"{backup.id}: {len(absent)} chunk(s) vanished from "
                                     f"{dst.location} during the copy: "
                                     f"{', '.join(absent[:_NAMED])}")
            dst.backend.put(map_key, blob, exclusive=True)
            published.append(map_key)
            dst.backend.put(dst.key(backup.id, MANIFEST_SUFFIX), backup.manifest.to_json(),
                            exclusive=True)
    except BaseException:
        _forget(dst, published)
        raise
    report.bytes += len(blob)


__all__ = ["CopyReport", "copy_backups", "same_data"]
