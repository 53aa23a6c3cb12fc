"""The storage-controller interface and its local implementation (LVM + LIO).

The claims' "storage system" duplicates a volume, exposes the duplicate on a
port, answers the identifier the duplicate presents there, reports its health
and releases it. :class:`StorageController` is that interface; the agent only
talks to it. :class:`LocalController` implements it on the first server's own
disks (LVM for the duplicate, LIO for the export); a remote storage node is
another implementation behind the same interface.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol

from ..errors import CommandError, RefusedError, SanoffloadError
from ..kinds import DuplicateKind, FreezeMode, WhoFreezes
from ..runner import Runner
from ..tools import lio, lvm
from .config import Config
from .resolve import BackupObject

log = logging.getLogger(__name__)

Health = Literal["healthy", "invalid", "missing"]
OrphanKind = Literal["lv", "lio-target", "lio-backstore"]


@dataclass(frozen=True)
class Accounted:
    """What the journal accounts for: a marked object outside it is an orphan."""

    #: (vg, name) of every journaled duplicate, intended or made
    duplicates: frozenset[tuple[str, str]] = field(default_factory=frozenset)
    targets: frozenset[str] = field(default_factory=frozenset)
    backstores: frozenset[str] = field(default_factory=frozenset)


@dataclass(frozen=True)
class Orphan:
    """An object carrying sanoffload's mark that no journal record accounts for.

    Made by a controller's :meth:`StorageController.orphans` and handed back,
    unchanged, to its :meth:`StorageController.remove_orphan`.
    """

    kind: OrphanKind
    name: str
    #: the LV's volume group (kind "lv")
    vg: str = ""
    #: the origin of an orphaned snapshot LV, whose ``-real`` device may go with it
    origin: str = ""

    def __str__(self) -> str:
        if self.kind == "lv":
            return f"LV {self.vg}/{self.name}"
        return f"LIO {'target' if self.kind == 'lio-target' else 'backstore'} {self.name}"


@dataclass(frozen=True)
class Duplicate:
    """Where the duplicate lives (enough to find and undo it after a crash)."""

    kind: DuplicateKind
    vg: str
    name: str  # the duplicate's LV name
    origin: str  # the origin LV's name

    def __post_init__(self) -> None:
        # built from journal records too: their kind is text until here
        object.__setattr__(self, "kind", DuplicateKind.parse(self.kind))

    @property
    def device(self) -> str:
        return f"/dev/{self.vg}/{self.name}"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "kind": self.kind.value}


class DuplicatePlan(Protocol):
    """A duplicate ready to be made: :meth:`make` is all that runs while the filesystem is
    frozen (one command); lookups went before it, checks come in :meth:`complete`."""

    def make(self) -> Duplicate:
        """Make the duplicate (frozen); what it returns names it, enough to discard it."""
        ...

    def complete(self, made: Duplicate) -> Duplicate:
        """After the thaw: check what :meth:`make` made and say exactly where it is."""
        ...


class Immediate:
    """The plan of a duplicate made by one call that needs no check after (a fake, a storage
    node answering one request)."""

    def __init__(self, make: Callable[[], Duplicate]) -> None:
        self._make = make

    def make(self) -> Duplicate:
        return self._make()

    def complete(self, made: Duplicate) -> Duplicate:
        return made


class StorageController(Protocol):
    """What the agent's session asks of the storage (this host's, or a storage node's).

    The session never looks behind it: cleanup after a crash goes through
    :meth:`discard_partial` and :meth:`orphans`/:meth:`remove_orphan` too.
    """

    def plan_duplicate(self, obj: BackupObject, name: str) -> DuplicatePlan:
        """Everything a duplicate of ``obj`` needs before the freeze (sizes, room, pool)."""
        ...

    def discard(self, dup: Duplicate) -> None: ...

    def discard_partial(self, dup: Duplicate) -> list[str]:
        """Remove what an interrupted :meth:`duplicate` may have half made (before discard)."""
        ...

    def orphans(self, accounted: Accounted) -> Sequence[Orphan]:
        """Our marked objects the journal does not account for (read-only)."""
        ...

    def remove_orphan(self, orphan: Orphan) -> list[str]: ...

    def expose(self, dup: Duplicate, spec: lio.ExportSpec) -> lio.Export: ...

    def identify(self, target_iqn: str, lun: int = 0) -> str: ...

    def unexpose(self, target_iqn: str, backstore: str) -> list[str]: ...

    def health(self, dup: Duplicate) -> Health: ...

    def who_freezes(self, kind: DuplicateKind) -> WhoFreezes: ...


def kernel_allows_nested_freeze(release: str | None = None) -> bool:
    """Linux 6.6 added freeze holders: a userspace fsfreeze and a device suspend nest."""
    release = release or os.uname().release
    try:
        major, minor = (int(x) for x in release.split("-", 1)[0].split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= (6, 6)


@contextlib.contextmanager
def _explain_nested_freeze(lv_name: str) -> Iterator[None]:
    """Name the cause when LVM's suspend could not nest inside our freeze."""
    try:
        yield
    except CommandError as exc:
        if "suspend" not in (exc.stderr or ""):
            raise
        raise CommandError(
            f"LVM could not suspend {lv_name} while its filesystem was frozen (this kernel "
            f"cannot nest LVM's freeze inside fsfreeze before Linux 6.6): {exc.message}",
            argv=exc.argv, returncode=exc.returncode, stdout=exc.stdout, stderr=exc.stderr,
            hint='use freeze = "auto" (or "lvm") in the agent config') from exc


class LocalController:
    """LVM duplicates and LIO exports on this host."""

    def __init__(self, runner: Runner, config: Config, exporter: lio.LioExporter | None = None,
                 *, kernel_release: str | None = None) -> None:
        self.runner = runner
        self.config = config
        self._exporter = exporter
        self.nested_freeze = kernel_allows_nested_freeze(kernel_release)

    @property
    def exporter(self) -> lio.LioExporter:
        if self._exporter is None:
            self._exporter = lio.LioExporter()
        return self._exporter

    def who_freezes(self, kind: DuplicateKind) -> WhoFreezes:
        """Who inhibits writes and flushes for ``kind`` on this kernel.

        A snapshot suspends the origin device, and LVM freezes the filesystem
        itself for that; before Linux 6.6 that freeze fails inside ours
        ("suspend ioctl ... Device or resource busy"), so there LVM's own
        suspend is the quiesce step. Splitting a mirror works under fsfreeze.
        """
        if self.config.freeze is not FreezeMode.AUTO:
            return WhoFreezes(self.config.freeze.value)
        if DuplicateKind(kind).is_snapshot and not self.nested_freeze:
            return WhoFreezes.LVM
        return WhoFreezes.FSFREEZE

    # -- duplicate ---------------------------------------------------------
    def duplicate(self, obj: BackupObject, name: str) -> Duplicate:
        """Plan, make and complete in one go (nothing frozen around it)."""
        plan = self.plan_duplicate(obj, name)
        return plan.complete(plan.make())

    def plan_duplicate(self, obj: BackupObject, name: str) -> DuplicatePlan:
        """The lookups (``vgs`` for a snapshot's size, ``lvs`` of the thin pool and its room)
        happen here, before the freeze; the frozen part is one ``lvcreate``/``lvconvert``."""
        if obj.lv is None or obj.duplicate_kind is None:
            raise RefusedError(f"{obj.requested_path}: on {obj.volume}, not an LV of this host")
        return self.plan_lv_duplicate(obj.lv, obj.duplicate_kind, name)

    def plan_lv_duplicate(self, lv: lvm.LogicalVolume, kind: DuplicateKind,
                          name: str) -> DuplicatePlan:
        """:meth:`plan_duplicate` of an LV (a storage node's LUN has no filesystem here)."""
        if kind is DuplicateKind.SNAPSHOT:
            vg = lvm.get_vg(self.runner, lv.vg)
            size = lvm.snapshot_size(lv.size_bytes, vg, self.config.snapshot.percent,
                                     self.config.snapshot.min_bytes)
            return _LvmPlan(self.runner, lv, kind, name, size)
        if kind is DuplicateKind.THIN_SNAPSHOT:
            pool = lvm.get_lv(self.runner, lv.vg, lv.pool_lv)
            if pool is None:
                raise RefusedError(f"thin pool {lv.vg}/{lv.pool_lv} of {lv.full_name} not found")
            lvm.check_thin_pool_room(pool, self.config.thin.max_data_percent,
                                     self.config.thin.max_metadata_percent)
            return _LvmPlan(self.runner, lv, kind, name)
        if kind in (DuplicateKind.RAID1_SPLIT, DuplicateKind.MIRROR_SPLIT):
            return _LvmPlan(self.runner, lv, kind, name)
        raise RefusedError(f"unknown duplicate kind {kind}")

    def remove_leftovers(self, vg: str, name: str, origin: str | None = None) -> list[str]:
        """Remove a half-made snapshot LV and the dm devices a failed lvcreate leaves.

        After "Failed to suspend ... Manual intervention required" (a snapshot
        of a frozen origin on Linux < 6.6) LVM leaves the snapshot LV (attr
        ``-wi-i-----``), its ``-cow`` device and the origin's ``-real`` device;
        ``lvremove`` takes the LV, ``dmsetup remove`` what is left of ours (by
        name), and the origin's ``-real`` goes once no snapshot needs it.
        Called after the thaw: removing them under a freeze would fail the same way.
        """
        removed = []
        if lvm.remove_lv(self.runner, vg, name):
            removed.append(f"LV {vg}/{name}")
        dm = lvm.dm_name(vg, name)
        for dev in (f"{dm}-cow", dm):
            if lvm.dm_remove(self.runner, dev):
                removed.append(f"dm device {dev}")
        if origin:
            removed += self._remove_orphan_real(vg, origin)
        return removed

    def discard_partial(self, dup: Duplicate) -> list[str]:
        """A failed or interrupted lvcreate can leave a half-made LV and dm devices.

        Only snapshots leave such debris: a split either happened or not.
        """
        if not dup.kind.is_snapshot:
            return []
        return self.remove_leftovers(dup.vg, dup.name, dup.origin)

    def orphans(self, accounted: Accounted) -> list[Orphan]:
        """LVs by their tag (never by name, see LogicalVolume.is_ours), LIO objects by
        sanoffload's naming (LioExporter.ours), that ``accounted`` does not name. A thin
        base (its tag) is never one: agent/bases.py decides when it goes."""
        found: list[Orphan] = []
        try:
            ours = self.exporter.ours()
        except SanoffloadError:
            # no LIO here (or it cannot be read): nothing of ours can be exported either
            ours = {"targets": [], "backstores": []}
        found += [Orphan("lio-target", iqn) for iqn in ours["targets"]
                  if iqn not in accounted.targets]
        found += [Orphan("lio-backstore", bs) for bs in ours["backstores"]
                  if bs not in accounted.backstores]
        found += [Orphan("lv", lv.name, vg=lv.vg, origin=lv.origin or "")
                  for lv in lvm.list_lvs(self.runner)
                  if lv.is_ours and (lv.vg, lv.name) not in accounted.duplicates
                  and not lv.is_hidden and not lv.is_base]
        return found

    def remove_orphan(self, orphan: Orphan) -> list[str]:
        if orphan.kind == "lio-target":
            return self.unexpose(orphan.name, "")
        if orphan.kind == "lio-backstore":
            return self.unexpose("", orphan.name)
        return self.remove_leftovers(orphan.vg, orphan.name, orphan.origin or None)

    def discard(self, dup: Duplicate) -> None:
        """Drop the duplicate (or give a split image back to its mirror)."""
        if dup.kind.is_snapshot:
            lvm.remove_lv(self.runner, dup.vg, dup.name)
            self._remove_orphan_real(dup.vg, dup.origin)
        elif dup.kind is DuplicateKind.RAID1_SPLIT:
            # before the split returned, the journal only knows our planned name: then any
            # tracked image of the origin is the one this session split off
            images = [lv for lv in lvm.list_lvs(self.runner, dup.vg)
                      if lv.is_tracked_split_image
                      and (lv.name == dup.name or lv.name.startswith(f"{dup.origin}_rimage_"))]
            for image in images[:1]:
                lvm.merge_raid1(self.runner, image)
        elif dup.kind is DuplicateKind.MIRROR_SPLIT:
            origin = lvm.get_lv(self.runner, dup.vg, dup.origin)
            if origin is not None and not origin.is_mirror:
                lvm.readd_mirror(self.runner, origin, dup.name)
            else:
                lvm.remove_lv(self.runner, dup.vg, dup.name)

    def _remove_orphan_real(self, vg: str, origin: str) -> list[str]:
        """An origin with no snapshot left must not keep a ``-real`` device."""
        if any(lv.origin == origin for lv in lvm.list_lvs(self.runner, vg)):
            return []
        dm = f"{lvm.dm_name(vg, origin)}-real"
        if lvm.dm_open_count(self.runner, dm) == 0:
            lvm.dm_remove(self.runner, dm)
            return [f"dm device {dm}"]
        return []

    # -- expose ------------------------------------------------------------
    def expose(self, dup: Duplicate, spec: lio.ExportSpec) -> lio.Export:
        return self.exporter.export(spec)

    def identify(self, target_iqn: str, lun: int = 0) -> str:
        return self.exporter.identify(target_iqn, lun)

    def unexpose(self, target_iqn: str, backstore: str) -> list[str]:
        return self.exporter.unexport(target_iqn, backstore)

    # -- health ------------------------------------------------------------
    def health(self, dup: Duplicate) -> Health:
        lv = lvm.get_lv(self.runner, dup.vg, dup.name)
        if lv is None:
            return "missing"
        return "invalid" if lv.is_invalid else "healthy"


class _LvmPlan:
    """One LVM duplicate: the single command while frozen, the ``lvs`` checks after the thaw."""

    TAGS = (lvm.SANOFFLOAD_TAG,)

    def __init__(self, runner: Runner, lv: lvm.LogicalVolume, kind: DuplicateKind, name: str,
                 size_bytes: int | None = None) -> None:
        self.runner = runner
        self.lv = lv
        self.kind = kind
        self.name = name
        self.size_bytes = size_bytes
        self._argv: list[str] = []
        self._stdout = ""

    def make(self) -> Duplicate:
        lv, kind = self.lv, self.kind
        if kind is DuplicateKind.SNAPSHOT:
            assert self.size_bytes is not None
            with _explain_nested_freeze(lv.full_name):
                self._argv = lvm.make_snapshot(self.runner, lv, self.name, self.size_bytes,
                                               self.TAGS)
        elif kind is DuplicateKind.THIN_SNAPSHOT:
            with _explain_nested_freeze(lv.full_name):
                self._argv = lvm.make_thin_snapshot(self.runner, lv, self.name, self.TAGS)
        elif kind is DuplicateKind.RAID1_SPLIT:
            self._argv, self._stdout = lvm.make_raid1_split(self.runner, lv)
            # the image's name is known once lvs is asked, after the thaw
            return Duplicate(kind, lv.vg, "", lv.name)
        else:
            self._argv = lvm.make_mirror_split(self.runner, lv, self.name)
        return Duplicate(kind, lv.vg, self.name, lv.name)

    def complete(self, made: Duplicate) -> Duplicate:
        lv, kind = self.lv, self.kind
        if kind is DuplicateKind.SNAPSHOT:
            lvm.snapshot_made(self.runner, lv.vg, self.name, self._argv)
        elif kind is DuplicateKind.THIN_SNAPSHOT:
            lvm.thin_snapshot_made(self.runner, lv.vg, self.name, self._argv)
        elif kind is DuplicateKind.RAID1_SPLIT:
            image = lvm.raid1_split_image(self.runner, lv, self._argv, self._stdout)
            return Duplicate(kind, lv.vg, image.name, lv.name)
        else:
            lvm.mirror_split_made(self.runner, lv.vg, self.name, self.TAGS, self._argv)
        return made
