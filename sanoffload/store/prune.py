"""Prune: which backups a retention policy keeps, and removing the rest.

Semantics are restic's ``forget`` (borg's ``prune`` is alike), per object
(host + slug), newest first, times in UTC:

* ``last N``: the N newest backups;
* ``daily N``: the newest backup of each of the N most recent days that have
  a backup (a day without one does not use up a slot); likewise ``weekly``
  (ISO weeks, Monday first), ``monthly`` and ``yearly``;
* the rules are independent: a backup is kept if any rule keeps it, and each
  rule counts its own slots (the newest backup of today counts for ``last``
  and for ``daily`` alike);
* the newest backup is always kept, whatever the policy, so no object is ever
  left without a backup;
* a backup whose manifest is broken (unreadable, or naming another backup) is
  never removed and takes no slot: nothing prune decides rests on a manifest
  it cannot read. The plan names them (``broken``) for the operator.

Prune removes manifests and their archives or chunk maps, never chunks: an image
backup's chunks may be shared with kept backups. :func:`gc` (``store gc``) then
marks every chunk a listed image backup's map names and sweeps the rest older than
its grace period. It refuses to sweep at all if any backup's map (or manifest)
cannot be read whole: a chunk only that backup names would look unreferenced.

On an object store prune removes by version. A backup still under Object Lock
retention is left whole and reported (:attr:`Plan.retained`: the lock doing its job,
so prune succeeds; a later prune removes it); one the store refuses to let go
(:attr:`Plan.not_removed`: "refused by the store: ..." with credentials that may not
delete) makes the prune incomplete. gc is
two-phase (:meth:`~sanoffload.store.chunks.BackendChunkStore.gc`): a chunk goes only
when two runs a grace period apart both found it unreferenced.

:func:`select` is the pure part (unit-tested); :func:`prune` applies it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

from ..errors import AuthError, IntegrityError, SanoffloadError, UsageError
from ..text import printable
from .chunks import GcReport, delete_versions
from .manifest import MAX_TAR_LEVEL, utc_iso
from .repo import MAP_SUFFIX, Backup, BackupId, Broken, Repository

log = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)

#: rule name -> the period a backup time falls in
PERIODS: dict[str, Callable[[datetime], tuple[int, ...]]] = {
    "daily": lambda t: (t.year, t.month, t.day),
    "weekly": lambda t: tuple(t.isocalendar())[:2],
    "monthly": lambda t: (t.year, t.month),
    "yearly": lambda t: (t.year,),
}


@dataclass(frozen=True)
class Policy:
    """How many backups each rule keeps (0: the rule is off)."""

    last: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    yearly: int = 0

    def __post_init__(self) -> None:
        for name in ("last", *PERIODS):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise UsageError(f"keep-{name} must be a whole number >= 0, not {value!r}")

    @property
    def empty(self) -> bool:
        return not any(getattr(self, name) for name in ("last", *PERIODS))

    def to_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in ("last", *PERIODS)}


@dataclass(frozen=True)
class Selection:
    """:func:`select`'s answer: each kept key with why, and the keys to remove."""

    keep: dict[Any, tuple[str, ...]]
    remove: list[Any]


def select(backups: Iterable[tuple[K, datetime]], policy: Policy) -> Selection:
    """Split (key, time) pairs of ONE object into kept (with reasons) and removed.

    Pure: no filesystem, no clock. Ties in time are broken by key, newest
    (largest) first, so the answer does not depend on the input order.
    Reasons: ``newest``, ``last``, ``daily``, ``weekly``, ``monthly``, ``yearly``.
    """
    ordered = sorted(backups, key=lambda kt: (kt[1], kt[0]), reverse=True)
    left = {"last": policy.last, **{name: getattr(policy, name) for name in PERIODS}}
    last_period: dict[str, tuple[int, ...] | None] = dict.fromkeys(PERIODS)
    keep: dict[Any, tuple[str, ...]] = {}
    remove: list[Any] = []
    for index, (key, when) in enumerate(ordered):
        reasons: list[str] = []
        if index == 0:
            reasons.append("newest")
        if left["last"] > 0:
            left["last"] -= 1
            reasons.append("last")
        for name, period_of in PERIODS.items():
            if left[name] <= 0:
                continue
            period = period_of(when)
            if period != last_period[name]:
                # the newest backup of a period we have not seen yet: it takes a slot
                last_period[name] = period
                left[name] -= 1
                reasons.append(name)
        if reasons:
            keep[key] = tuple(reasons)
        else:
            remove.append(key)
    return Selection(keep, remove)


@dataclass
class Plan:
    """What prune keeps and removes, per backup, in list order."""

    policy: Policy
    keep: list[tuple[Backup, tuple[str, ...]]] = field(default_factory=list)
    remove: list[Backup] = field(default_factory=list)
    dry_run: bool = False
    #: backups whose manifest is broken: left alone
    broken: list[Broken] = field(default_factory=list)
    #: kept only because a kept incremental level needs them: (backup, the newest kept
    #: backup that needs it)
    kept_for_chain: list[tuple[Backup, str]] = field(default_factory=list)
    #: chosen for removal but still there because the store refused (the proxy's
    #: credentials, a retention the listing did not show): (backup, why), in ``remove`` too
    not_removed: list[tuple[Backup, str]] = field(default_factory=list)
    #: chosen for removal but under Object Lock retention, so left whole until then:
    #: (backup, "YYYY-MM-DDTHH:MM:SSZ"), in ``remove`` too; a later prune removes them
    retained: list[tuple[Backup, str]] = field(default_factory=list)

    @property
    def images_removed(self) -> bool:
        """True if an image backup went (or would go): its chunks wait for ``store gc``."""
        return any(b.is_image for b in self.remove)

    @property
    def complete(self) -> bool:
        """False if some backup chosen for removal is still there (see ``not_removed``)."""
        return not self.not_removed

    def to_dict(self) -> dict[str, Any]:
        return {"policy": self.policy.to_dict(), "dry_run": self.dry_run,
                "keep": [{"id": str(b.id), "reasons": list(r)} for b, r in self.keep],
                "remove": [str(b.id) for b in self.remove],
                "broken": [{"id": str(b.id), "reason": b.reason} for b in self.broken],
                "kept_for_chain": [{"id": str(b.id), "needed_by": n}
                                   for b, n in self.kept_for_chain],
                "not_removed": [{"id": str(b.id), "reason": why}
                                for b, why in self.not_removed],
                "retained": [{"id": str(b.id), "until": until} for b, until in self.retained]}


def dependencies(by_id: Mapping[BackupId, Backup], kept: set[BackupId]) -> dict[BackupId, str]:
    """Every backup a kept incremental level needs to be restored (its parents down to its
    level 0), mapped to the newest kept backup that needs it.

    A parent that is not in ``by_id`` (missing, or its manifest broken: left alone) ends
    the walk; then every earlier backup of the kept one's chain is kept too: the link may
    be repaired, and prune must not be the one that makes the break final (``store
    verify`` reports it).
    """
    needed: dict[BackupId, str] = {}
    for bid in sorted(kept, reverse=True):  # newest first: it names the dependency
        manifest = by_id[bid].manifest
        steps = 0
        while manifest.parent is not None and steps <= MAX_TAR_LEVEL:
            steps += 1
            try:
                parent = BackupId.parse(manifest.parent)
            except SanoffloadError:
                parent = None
            if parent is not None and parent in needed:
                break  # the rest of this chain is kept already
            if parent is None or parent not in by_id:
                chain = by_id[bid].manifest.chain_id
                for other, backup in by_id.items():
                    if other < bid and other not in needed and \
                            backup.manifest.chain_id == chain:
                        needed[other] = str(bid)
                break
            needed[parent] = str(bid)
            manifest = by_id[parent].manifest
    return needed


def prune(repo: Repository, policy: Policy, *, host: str | None = None,
          slug: str | None = None, dry_run: bool = False, now: float | None = None) -> Plan:
    """Apply ``policy`` to every object (or one host's / one object's) and remove the rest.

    Refuses an empty policy: "keep nothing" is never what an operator means. A backup
    the store will not let go (:func:`remove_backup`) is in ``plan.not_removed`` and the
    others are removed all the same: check :attr:`Plan.complete`. One under retention is
    in ``plan.retained`` (expected: the plan is still complete).
    """
    if policy.empty:
        raise UsageError("give at least one --keep-* rule (an empty policy would keep only "
                         "the newest backup of each object)")
    plan = Plan(policy, dry_run=dry_run)
    groups: dict[tuple[str, str], list[Backup]] = {}
    for backup in repo.catalog(host=host, slug=slug):
        if isinstance(backup, Broken):
            log.warning("prune: %s has a broken manifest: left alone", backup.id)
            plan.broken.append(backup)
            continue
        groups.setdefault((backup.id.host, backup.id.slug), []).append(backup)
    for members in groups.values():
        by_id = {b.id: b for b in members}
        chosen = select(((b.id, b.id.time) for b in members), policy)
        kept = dict(chosen.keep)
        for bid, needed in dependencies(by_id, set(chosen.keep)).items():
            kept[bid] = (*kept.get(bid, ()), f"chain of {needed}")
            if bid not in chosen.keep:
                plan.kept_for_chain.append((by_id[bid], needed))
        for backup in members:
            if backup.id in kept:
                plan.keep.append((backup, tuple(kept[backup.id])))
            else:
                plan.remove.append(by_id[backup.id])
    if not dry_run:
        for backup in plan.remove:
            held = remove_backup(repo, backup.id, now=now)
            if isinstance(held, Retained):
                plan.retained.append((backup, held.until))
            elif held is not None:
                plan.not_removed.append((backup, held))
    return plan


@dataclass(frozen=True)
class Retained:
    """A backup left whole because the store retains it (Object Lock) until ``until``."""

    until: str


def remove_backup(repo: Repository, bid: BackupId, *,
                  now: float | None = None) -> Retained | str | None:
    """Remove one backup; None when it is gone, else why it stays (and is still whole).

    On an object store a backup any of whose object versions is under Object Lock
    retention is left untouched (:class:`Retained`): removing part of it would only
    break it. A store that refuses a removal (the proxy's credentials have no delete
    right, a retention the listing did not show) is reported, not raised: the manifest
    goes first, so a backup is never listed half-removed.
    """
    try:
        until = repo.retained_until(bid, now=now)
    except AuthError as exc:
        return f"refused by the store: {exc.message}"
    if until is not None:
        when = utc_iso(datetime.fromtimestamp(until, UTC))
        log.info("prune: %s retained until %s: left for a later prune", bid, when)
        return Retained(when)
    log.info("prune: removing %s", bid)
    try:
        repo.delete(bid)
    except AuthError as exc:
        log.warning("prune: %s: refused by the store: %s", bid, exc.message)
        return f"refused by the store: {printable(exc.message)}"
    return None


#: the default grace period of ``store gc``: longer than any backup runs
DEFAULT_GRACE_S = 24 * 3600.0


def referenced_chunks(repo: Repository) -> tuple[set[str], int]:
    """Every chunk id some image backup's map names, and how many image backups there are.

    IntegrityError, naming the backup, if any backup's manifest or map cannot be read
    whole: gc must never sweep on a listing it could not read whole.
    """
    marked: set[str] = set()
    images = 0
    for bid in repo.ids():
        found = repo._load(bid)
        if found is None:
            raise IntegrityError(f"gc: {bid} vanished or lost its data file while being "
                                 "listed: not sweeping (run gc again)")
        if isinstance(found, Broken):
            if found.archive.name.endswith(MAP_SUFFIX) or \
                    repo.backend.stat(repo.key(bid, MAP_SUFFIX)) is not None:
                raise IntegrityError(f"gc: {bid} has a chunk map but its manifest is broken "
                                     f"({printable(found.reason)}): not sweeping", hint=(
                                         "repair or remove that backup, then run gc again"))
            continue
        if found.is_image:
            try:
                marked |= repo.load_map(found).referenced()
            except IntegrityError as exc:
                raise IntegrityError(f"gc: {exc.message}: not sweeping", hint=(
                    "repair or remove that backup, then run gc again")) from None
            images += 1
    for path, why in repo.leftovers():
        if why.startswith("manifest without"):
            raise IntegrityError(f"gc: {path}: {why}: it may be an image backup whose map "
                                 "is gone: not sweeping", hint="remove that manifest")
    return marked, images


def gc(repo: Repository, *, grace_s: float = DEFAULT_GRACE_S, dry_run: bool = False,
       now: float | None = None) -> GcReport:
    """Mark (every image backup's map) and sweep (chunks unreferenced and older than
    ``grace_s``), all under the repository lock: a commit (which takes it too) either
    is seen by the mark or sees what was swept.

    On an object store (no lock, no mtime to refresh) the sweep is two-phase
    (:meth:`~sanoffload.store.chunks.BackendChunkStore.gc`), stale uploads are aborted and
    data objects no manifest names, older than the grace, are removed."""
    with repo.lock():
        marked, images = referenced_chunks(repo)
        log.info("gc: %d chunk(s) referenced by %d image backup(s)", len(marked), images)
        report = repo.chunks.gc(marked, grace_s=grace_s, now=now, dry_run=dry_run)
    if repo.local is None:
        _remove_orphans(repo, report, time.time() if now is None else now, grace_s)
    return report


#: what :meth:`~sanoffload.store.repo.Repository.leftovers` calls data no manifest names
_ORPHANS = ("archive without a manifest", "chunk map without a manifest",
            "state file without a manifest")


def _remove_orphans(repo: Repository, report: GcReport, now: float, grace_s: float) -> None:
    """On an object store: remove data objects no manifest names (a backup whose commit
    failed, and whose proxy could not delete what it had published) written before
    ``grace_s`` ago: a running backup publishes its data shortly before its manifest."""
    cutoff = now - grace_s
    for path, why in repo.leftovers():
        if why not in _ORPHANS:
            continue
        key = str(path)
        info = repo.backend.stat(key)
        if info is None or info.mtime >= cutoff:
            continue
        if any(v.retain_until is not None and v.retain_until > now
               for v in repo.backend.versions(key)):
            report.kept_retained += 1
            continue
        if not report.dry_run:
            try:
                delete_versions(repo.backend, key)
            except AuthError as exc:
                report.refused.append((key, exc.message))
                continue
        report.orphans_removed.append(key)
