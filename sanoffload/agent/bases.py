"""Thin bases: the snapshot an image backup committed, kept for the next one's thin_delta.

Tick/tock (issue 13): an image backup of a thin volume takes a new thin snapshot
as every backup does. Once the store has committed the backup, the proxy releases
the session with ``committed: BACKUP_ID`` and the new snapshot becomes the
volume's *base* (the old base goes); released without it (a failure, a tar
backup) the new snapshot goes and the old base stays. So the base is always a
snapshot whose content a committed backup holds, and the next backup reads only
what thin_delta says changed since it::

    lvchange --addtag sanoffload-base VG/sanoffload-SID
    lvrename VG sanoffload-SID sanoffload-base_SID
    lvremove --yes VG/sanoffload-base_OLDSID

A base is journaled (``<state_dir>/bases/ORIGIN_UUID.json``, written before each
change, see :class:`~sanoffload.agent.journal.BaseRecord`), carries the
``sanoffload-base`` tag besides sanoffload's mark, and is never taken for an orphan.
It is trusted only while ``lvs`` shows it as recorded (LV UUID, thin id, origin,
pool, size): anything else and the next backup is a full read, and its commit
replaces the base.

The delta is computed after the thaw, never inside the frozen window; any failure
there is a warning and a full read, never a failed backup. While the pool's data
or metadata use is above ``thin_base_max_use`` no base is kept (a base pins every
block the volume rewrites until the next backup) and the one there is dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..channel.messages import MAX_DELTA_RANGES, Delta
from ..errors import SanoffloadError
from ..runner import Runner
from ..text import printable
from ..tools import lvm, thin
from .config import Config
from .journal import BaseJournal, BaseRecord

log = logging.getLogger(__name__)


def base_name(snapshot_name: str) -> str:
    """The base's LV name for a session's snapshot ``sanoffload-SID``: ``sanoffload-base_SID``
    (a session id holds no '_', so no session's snapshot is ever called so)."""
    sid = snapshot_name.removeprefix(lvm.NAME_PREFIX)
    return lvm.check_name(f"{lvm.BASE_PREFIX}{sid}")


def pool_dm_name(vg: str, pool: str) -> str:
    """The pool's thin-pool target (``VG-POOL-tpool``): where the metadata snapshot is asked."""
    return f"{lvm.dm_name(vg, pool)}-tpool"


def metadata_device(vg: str, pool: str) -> str:
    """The pool's metadata device (``/dev/mapper/VG-POOL_tmeta``): what thin_delta reads."""
    return f"/dev/mapper/{lvm.dm_name(vg, pool + '_tmeta')}"


@dataclass
class ImagePrepared:
    """What an image prepare learnt: the delta (None: full read), warnings for the answer,
    and ``keep``: what the release needs to make the new snapshot the base (None: keep none)."""

    delta: Delta | None = None
    warnings: list[str] = field(default_factory=list)
    keep: dict[str, Any] | None = None


def _find(lvs: Sequence[lvm.LogicalVolume], name: str) -> lvm.LogicalVolume | None:
    return next((lv for lv in lvs if lv.name == name and not lv.hidden), None)


class ThinBases:
    """The bases of this host's thin volumes (LVM, thin_delta, the base journal)."""

    def __init__(self, runner: Runner, config: Config) -> None:
        self.runner = runner
        self.config = config
        self.journal = BaseJournal(config.state_dir)

    # -- the pool guard ------------------------------------------------------
    def pool_too_full(self, vg: str, pool: str, *, unknown: bool = True) -> str | None:
        """Why no base may be kept in ``vg/pool`` (its use above the limit), or None.

        ``unknown``: whether a pool whose use lvs cannot tell (not found, inactive) counts
        as too full; a new base is not kept then, but an old one is not dropped for it (a
        pool not yet active at boot is no reason to lose every base).
        """
        limit = self.config.thin_base_max_use
        lv = lvm.get_lv(self.runner, vg, pool)
        data = lv.data_percent if lv is not None and lv.is_thin_pool else None
        meta = lv.metadata_percent if lv is not None and lv.is_thin_pool else None
        if data is None or meta is None:
            return f"thin pool {vg}/{pool}: its use is unknown" if unknown else None
        if data > limit or meta > limit:
            return (f"thin pool {vg}/{pool} is {data:.2f} % full (data), {meta:.2f} % "
                    f"(metadata), above thin_base_max_use = {limit} %")
        return None

    # -- prepare -------------------------------------------------------------
    def prepare(self, origin: lvm.LogicalVolume, snapshot: str) -> ImagePrepared:
        """After the thaw: the delta of ``origin``'s new thin snapshot ``snapshot`` against
        its base, if it has one it trusts. Never raises for a failure of its own: it is a
        warning and a full read."""
        out = ImagePrepared()
        try:
            self._prepare(origin, snapshot, out)
        except (SanoffloadError, ValueError, OSError) as exc:
            out.delta = None
            out.warnings.append(f"image backup of {origin.full_name}: full read: "
                                f"{printable(str(exc))}")
        for line in out.warnings:
            log.warning("%s", line)
        return out

    def _prepare(self, origin: lvm.LogicalVolume, snapshot: str, out: ImagePrepared) -> None:
        vg = origin.vg
        listing = lvm.list_lvs(self.runner, vg)
        snap = _find(listing, snapshot)
        if snap is None or snap.thin_id is None or snap.origin != origin.name:
            raise ValueError(f"its snapshot {vg}/{snapshot} is not listed as a thin snapshot "
                             f"of {origin.name}")
        now = _find(listing, origin.name)
        origin_uuid = now.uuid if now is not None else origin.uuid
        rec = self.journal.load(origin_uuid)
        full = self.pool_too_full(vg, snap.pool_lv)
        if full is not None:
            dropped = (self._drop(rec, listing, "the pool is too full")
                       if self.pool_too_full(vg, snap.pool_lv, unknown=False) else "")
            out.warnings.append(f"image backup of {origin.full_name}: no base kept: {full}"
                                + dropped)
            return
        out.keep = {"origin_vg": vg, "origin_lv": origin.name, "origin_uuid": origin_uuid,
                    "pool": snap.pool_lv, "name": snap.name, "uuid": snap.uuid,
                    "thin_id": snap.thin_id, "size_bytes": snap.size_bytes}
        if rec is None:
            log.info("image backup of %s: no base yet: full read", origin.full_name)
            return
        why = self._distrust(rec, listing, origin_uuid, snap)
        if why is not None:
            out.warnings.append(f"image backup of {origin.full_name}: base {vg}/{rec.name} "
                                f"not trusted ({why}): full read; the next commit replaces it")
            return
        with thin.metadata_snap(self.runner, pool_dm_name(vg, snap.pool_lv)):
            found = thin.thin_delta(self.runner, metadata_device(vg, snap.pool_lv),
                                    rec.thin_id, snap.thin_id, volume_bytes=snap.size_bytes)
        changed, discarded = thin.chunk_ranges(found, snap.size_bytes, thin.CHUNK_BYTES,
                                               max_ranges=MAX_DELTA_RANGES)
        out.delta = Delta(base=rec.backup, volume_bytes=snap.size_bytes,
                          chunk_bytes=thin.CHUNK_BYTES, changed=changed, discarded=discarded)
        log.info("image backup of %s: %d bytes changed since %s (%d ranges)",
                 origin.full_name, out.delta.changed_bytes, rec.backup, out.delta.ranges)

    @staticmethod
    def _distrust(rec: BaseRecord, listing: Sequence[lvm.LogicalVolume], origin_uuid: str,
                  snap: lvm.LogicalVolume) -> str | None:
        """Why the base ``rec`` names is not the snapshot its backup was read from; None if
        lvs shows it exactly as recorded."""
        if rec.state != "kept":
            return f"its record is {rec.state}"
        lv = _find(listing, rec.name)
        if lv is None:
            return "its LV is gone"
        checks = (("LV UUID", lv.uuid, rec.uuid), ("thin id", lv.thin_id, rec.thin_id),
                  ("origin", lv.origin, rec.origin_lv), ("pool", lv.pool_lv, rec.pool),
                  ("origin UUID", origin_uuid, rec.origin_uuid),
                  ("size", lv.size_bytes, rec.size_bytes),
                  ("volume size", snap.size_bytes, rec.size_bytes))
        for what, seen, recorded in checks:
            if seen != recorded:
                return f"{what} {printable(str(seen))}, recorded {printable(str(recorded))}"
        if not lv.is_base:
            return f"it lacks the {lvm.BASE_TAG} tag"
        return None

    # -- release ---------------------------------------------------------------
    def commit(self, keep: dict[str, Any], committed: str) -> str:
        """Make the session's snapshot ``keep`` names the base of its volume for backup
        ``committed``; the old base goes. Returns what was done.

        Raises (the caller then discards the snapshot as any other): the snapshot is not
        the one prepare saw, the pool is too full, an LVM command failed. The old base
        is untouched until the new one is recorded as kept.
        """
        vg, origin_uuid = str(keep["origin_vg"]), str(keep["origin_uuid"])
        listing = lvm.list_lvs(self.runner, vg)
        snap = _find(listing, str(keep["name"]))
        if snap is None or (snap.uuid, snap.thin_id) != (keep["uuid"], keep["thin_id"]):
            raise ValueError(f"{vg}/{keep['name']} is not the snapshot prepare made")
        old = self._settle(self.journal.load(origin_uuid), listing)
        full = self.pool_too_full(vg, str(keep["pool"]))
        if full is not None:
            dropped = (self._drop(old, listing, "the pool is too full")
                       if self.pool_too_full(vg, str(keep["pool"]), unknown=False) else "")
            raise ValueError(f"no base kept: {full}{dropped}")
        new = BaseRecord(origin_vg=vg, origin_lv=str(keep["origin_lv"]),
                         origin_uuid=origin_uuid, pool=str(keep["pool"]),
                         name=base_name(snap.name), uuid=snap.uuid, thin_id=int(keep["thin_id"]),
                         size_bytes=int(keep["size_bytes"]), backup=committed,
                         state="promoting",
                         previous={**old.to_dict(), "previous": None} if old else None)
        # journaled first: a crash from here on is rolled back by tidy(), the old base whole
        self.journal.save(new)
        try:
            lvm.add_tag(self.runner, vg, snap.name, lvm.BASE_TAG)
            lvm.rename_lv(self.runner, vg, snap.name, new.name)
            new.state = "kept"
            self.journal.save(new)
        except BaseException:
            self._restore(old, new)
            raise
        self._finish(new, listing)
        log.info("%s/%s is the base of %s/%s (backup %s)", vg, new.name, vg, new.origin_lv,
                 committed)
        return f"thin-base {vg}/{new.name} of {new.origin_lv} for {committed}"

    def _restore(self, old: BaseRecord | None, new: BaseRecord) -> None:
        """A promotion failed: the new name goes if it was given, the old record comes back
        (the caller discards the snapshot under its session name)."""
        try:
            lvm.remove_lv(self.runner, new.origin_vg, new.name)
            if old is not None:
                self.journal.save(old)
            else:
                self.journal.remove(new.origin_uuid)
        except Exception as exc:  # tidy() finishes it: the record still says "promoting"
            log.warning("rolling back the base of %s/%s: %s", new.origin_vg, new.origin_lv,
                        printable(str(exc)))

    def _finish(self, rec: BaseRecord, listing: Sequence[lvm.LogicalVolume]) -> list[str]:
        """Remove the base ``rec`` replaced (only the LV recorded: same name and UUID)."""
        if rec.previous is None:
            return []
        name, uuid = str(rec.previous["name"]), str(rec.previous["uuid"])
        lv = _find(listing, name)
        done = []
        if lv is not None and lv.uuid == uuid and name != rec.name:
            lvm.remove_lv(self.runner, rec.origin_vg, name)
            done.append(f"old base {rec.origin_vg}/{name}")
        rec.previous = None
        self.journal.save(rec)
        return done

    def _settle(self, rec: BaseRecord | None,
                listing: Sequence[lvm.LogicalVolume]) -> BaseRecord | None:
        """A record a crash left mid-way, settled: "promoting" rolled back to the base it
        replaced, a replaced base that is still there removed. The record after that."""
        if rec is None:
            return None
        if rec.state == "promoting":
            lv = _find(listing, rec.name)
            if lv is not None and lv.uuid == rec.uuid:
                lvm.remove_lv(self.runner, rec.origin_vg, rec.name)
            prev = rec.previous
            if prev is None:
                self.journal.remove(rec.origin_uuid)
                log.warning("base of %s/%s: an interrupted promotion rolled back",
                            rec.origin_vg, rec.origin_lv)
                return None
            # the old base is whole: it goes only once the new one is kept
            back = BaseRecord.from_dict({**prev, "previous": None})
            lv = _find(listing, back.name)
            if lv is None or lv.uuid != back.uuid:
                self.journal.remove(rec.origin_uuid)
                return None
            self.journal.save(back)
            log.warning("base of %s/%s: an interrupted promotion rolled back to %s",
                        rec.origin_vg, rec.origin_lv, back.name)
            return back
        self._finish(rec, listing)
        return rec

    def _drop(self, rec: BaseRecord | None, listing: Sequence[lvm.LogicalVolume],
              why: str) -> str:
        """Remove the base ``rec`` names (LV and record); '' if there is none, else what the
        warning adds."""
        if rec is None:
            return ""
        lv = _find(listing, rec.name)
        if lv is not None and lv.uuid == rec.uuid:
            lvm.remove_lv(self.runner, rec.origin_vg, rec.name)
        self.journal.remove(rec.origin_uuid)
        log.warning("dropped the base %s/%s of %s (%s)", rec.origin_vg, rec.name,
                    rec.origin_lv, why)
        return f"; dropped the base {rec.origin_vg}/{rec.name}"

    # -- cleanup and status ------------------------------------------------------
    def names(self) -> frozenset[tuple[str, str]]:
        """``(vg, name)`` of every LV a base record accounts for (never an orphan)."""
        found = set()
        for rec in self.journal:
            found.add((rec.origin_vg, rec.name))
            if rec.previous is not None:
                found.add((rec.origin_vg, str(rec.previous["name"])))
        return frozenset(found)

    def tidy(self) -> list[str]:
        """What a crash or a change of the volumes left: interrupted promotions rolled back,
        replaced bases removed, bases whose volume is gone or whose pool is too full dropped
        (each with a log line). A base is never removed for lacking a session."""
        done: list[str] = []
        listings: dict[str, list[lvm.LogicalVolume]] = {}
        for rec in list(self.journal):
            listing = listings.get(rec.origin_vg)
            if listing is None:
                listing = listings[rec.origin_vg] = lvm.list_lvs(self.runner, rec.origin_vg)
            settled = self._settle(rec, listing)
            if rec.state == "promoting":
                done.append(f"base of {rec.origin_vg}/{rec.origin_lv}: " + (
                    f"rolled back to {settled.name}" if settled is not None
                    else "an interrupted promotion undone"))
            if settled is None:
                continue
            if not any(lv.uuid == rec.origin_uuid for lv in listing):
                self._drop(settled, listing, "its volume is gone")
                done.append(f"base {rec.origin_vg}/{settled.name} (its volume is gone)")
                continue
            full = self.pool_too_full(rec.origin_vg, rec.pool, unknown=False)
            if full is not None:
                self._drop(settled, listing, full)
                done.append(f"base {rec.origin_vg}/{settled.name} ({full})")
        return done

    def status(self) -> list[dict[str, Any]]:
        """One row per base record, and one per base-tagged LV no record names."""
        rows: list[dict[str, Any]] = []
        everything = lvm.list_lvs(self.runner)
        listings: dict[str, list[lvm.LogicalVolume]] = {}
        for lv in everything:
            listings.setdefault(lv.vg, []).append(lv)
        for rec in self.journal:
            listing = listings.get(rec.origin_vg, [])
            snap = _find(listing, rec.name)
            why = (self._distrust(rec, listing, rec.origin_uuid, snap) if snap is not None
                   else "its LV is gone")
            rows.append({"volume": f"{rec.origin_vg}/{rec.origin_lv}",
                         "base": f"{rec.origin_vg}/{rec.name}", "backup": rec.backup,
                         "thin_id": rec.thin_id, "pool": rec.pool, "state": rec.state,
                         "trusted": why is None, **({"why": why} if why else {})})
        recorded = {(r["base"]) for r in rows}
        for vg, listing in listings.items():
            for lv in listing:
                if lv.is_base and f"{vg}/{lv.name}" not in recorded:
                    rows.append({"volume": f"{vg}/{lv.origin}", "base": f"{vg}/{lv.name}",
                                 "state": "unrecorded", "trusted": False,
                                 "why": "no base record names it (lvremove it by hand)"})
        return rows
