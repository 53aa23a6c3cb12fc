"""LVM: list, snapshot, split and remove logical volumes.

Every command goes through the runner with ``LVM_SUPPRESS_FD_WARNINGS=1`` (the
agent may hold descriptors open, and LVM would print a warning for each one
into stderr). Reports are always JSON, in bytes without a suffix, with an
explicit field list, so parsing never depends on the local lvm.conf::

    lvs --all --reportformat json --units b --nosuffix -o LV_FIELDS [--select S] [VG]
    vgs --reportformat json --units b --nosuffix -o VG_FIELDS VG

Changes (names and tags are validated first, so none can pass as an option)::

    lvcreate --yes --snapshot --size {n}b --name N --addtag T ... VG/LV     # classic COW
    lvcreate --yes --snapshot --setactivationskip n --name N --addtag T ... VG/LV   # thin
    lvconvert --yes --splitmirrors 1 --trackchanges VG/LV                   # raid1
    lvconvert --yes --merge VG/LV_rimage_N
    lvconvert --yes --splitmirrors 1 --name N VG/LV                         # legacy mirror
    lvconvert --yes --type mirror -m 1 --mirrorlog core --background VG/LV
    lvchange --addtag T VG/LV
    lvrename VG OLD NEW                                                      # a thin base
    lvremove --yes VG/LV

What a failed ``lvcreate`` leaves below LVM (device-mapper devices, by name)::

    dmsetup info -c --noheadings -o open DM_NAME    # how many hold it open
    dmsetup remove --retry DM_NAME

LVM exits 5 (ECMD_FAILED) for nearly every failure, so a tolerated 5 is always
told apart by its message. The ``lv_attr`` positions used below are those of
lvs(8), NOTES ("The lv_attr bits are").
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import CommandError, DuplicateInvalidError, RefusedError, ResourceError
from ..requirements import Requirement
from ..runner import Runner

log = logging.getLogger(__name__)

REQUIRES: tuple[Requirement, ...] = (
    Requirement("lvm", "LVM tools (lvs, vgs, lvcreate, lvconvert, lvchange, lvremove)",
                roles=("agent", "storage"),
                fails_without="cannot list volumes, nor make, split or remove the duplicate",
                executables=("lvs", "vgs", "lvcreate", "lvconvert", "lvchange", "lvremove"),
                kernel=("device-mapper",)),
    Requirement("dmsetup", "device-mapper tool", roles=("agent", "storage"),
                fails_without="cannot inspect or remove device-mapper devices left by an "
                              "interrupted run",
                executables=("dmsetup",)),
)
#: dmsetup exit 1: no such device (already gone)
DM_NO_DEVICE: dict[int, str] = {1: "no such device"}

#: LVM prints one warning per inherited descriptor on stderr without this
LVM_ENV: Mapping[str, str] = {"LVM_SUPPRESS_FD_WARNINGS": "1"}
REPORT_ARGS: tuple[str, ...] = ("--reportformat", "json", "--units", "b", "--nosuffix")
LV_FIELDS: tuple[str, ...] = (
    "lv_name", "vg_name", "lv_attr", "lv_size", "segtype", "pool_lv", "origin",
    "data_percent", "metadata_percent", "snap_percent", "copy_percent", "sync_percent",
    "lv_tags", "lv_path", "lv_dm_path", "lv_kernel_major", "lv_kernel_minor", "lv_uuid",
    "raid_sync_action", "lv_health_status", "lv_active", "thin_id")
VG_FIELDS: tuple[str, ...] = ("vg_name", "vg_size", "vg_free", "vg_extent_size", "vg_tags")

#: the tag every LV sanoffload creates carries: what makes an LV ours (and the name
#: prefix it uses, which makes an LV look like ours but proves nothing)
SANOFFLOAD_TAG = "sanoffload"
NAME_PREFIX = "sanoffload-"
#: a thin base (the snapshot an image backup committed, kept for the next one's thin_delta)
#: carries this tag besides SANOFFLOAD_TAG, and a name no session's snapshot can have (a
#: session id never holds '_')
BASE_TAG = "sanoffload-base"
BASE_PREFIX = "sanoffload-base_"

#: ``lvremove`` of an LV that is not there: exit 5 with this message (lvremove_missing)
LV_NOT_FOUND: dict[int, str] = {5: "lv-not-found"}
_NOT_FOUND_MSG = "Failed to find logical volume"

MIB = 1024 * 1024
DEFAULT_SNAPSHOT_PERCENT = 10
DEFAULT_SNAPSHOT_MIN_BYTES = 64 * MIB

# lvm's own rules (lib/misc/lvm-string.c): a leading '-' would read as an option
_NAME_RE = re.compile(r"^[A-Za-z0-9+_.][A-Za-z0-9+_.-]{0,126}$")
_TAG_RE = re.compile(r"^[A-Za-z0-9_+.=!:&#/][A-Za-z0-9_+.=!:&#/-]{0,1023}$")
# "  datavg/r1_rimage_1 split from datavg/r1 for read-only purposes."
_SPLIT_RE = re.compile(r"(\S+)/(\S+) split from (\S+)/(\S+) for read-only purposes")
_COW_CAPPED = "Reducing COW size"


# --------------------------------------------------------------------------
# Report records
# --------------------------------------------------------------------------

def _percent(value: str) -> float | None:
    return float(value) if value not in ("", None) else None


def _devnum(value: str) -> int | None:
    # -1: no kernel device (inactive LV, pool metadata spare)
    number = int(value) if value not in ("", None) else -1
    return None if number < 0 else number


def _thin_id(value: Any) -> int | None:
    # "" for an LV that is no thin volume; 24 bits in the pool's metadata
    text = str(value) if value is not None else ""
    return int(text) if text.isdigit() and int(text) < (1 << 24) else None


def _bare(name: str) -> str:
    return name[1:-1] if name.startswith("[") and name.endswith("]") else name


@dataclass(frozen=True)
class LogicalVolume:
    """One row of ``lvs``; ``name`` without the brackets lvs puts around hidden LVs."""

    name: str
    vg: str
    attr: str
    size_bytes: int
    segtype: str
    pool_lv: str
    origin: str
    data_percent: float | None
    metadata_percent: float | None
    snap_percent: float | None
    copy_percent: float | None
    sync_percent: float | None
    tags: list[str] = field(default_factory=list, hash=False)
    path: str = ""
    dm_path: str = ""
    kernel_major: int | None = None
    kernel_minor: int | None = None
    uuid: str = ""
    sync_action: str = ""
    health_status: str = ""
    active: str = ""
    #: lvs showed the name as ``[name]`` (an LV LVM uses internally)
    hidden: bool = False
    #: a thin LV's device id in its pool (what thin_delta takes); None for other LVs
    thin_id: int | None = None

    @classmethod
    def from_report(cls, row: Mapping[str, Any]) -> LogicalVolume:
        raw_name = str(row["lv_name"])
        tags = str(row.get("lv_tags", ""))
        return cls(
            name=_bare(raw_name), vg=str(row["vg_name"]), attr=str(row["lv_attr"]),
            size_bytes=int(row["lv_size"]), segtype=str(row.get("segtype", "")),
            pool_lv=_bare(str(row.get("pool_lv", ""))), origin=_bare(str(row.get("origin", ""))),
            data_percent=_percent(row.get("data_percent", "")),
            metadata_percent=_percent(row.get("metadata_percent", "")),
            snap_percent=_percent(row.get("snap_percent", "")),
            copy_percent=_percent(row.get("copy_percent", "")),
            sync_percent=_percent(row.get("sync_percent", "")),
            tags=[t for t in tags.split(",") if t],
            path=str(row.get("lv_path", "")), dm_path=str(row.get("lv_dm_path", "")),
            kernel_major=_devnum(row.get("lv_kernel_major", "")),
            kernel_minor=_devnum(row.get("lv_kernel_minor", "")),
            uuid=str(row.get("lv_uuid", "")), sync_action=str(row.get("raid_sync_action", "")),
            health_status=str(row.get("lv_health_status", "")),
            active=str(row.get("lv_active", "")),
            hidden=raw_name.startswith("["), thin_id=_thin_id(row.get("thin_id", "")))

    def _bit(self, index: int) -> str:
        return self.attr[index] if len(self.attr) > index else "-"

    @property
    def full_name(self) -> str:
        """``VG/LV``, as the LVM commands take it."""
        return f"{self.vg}/{self.name}"

    @property
    def devno(self) -> tuple[int, int] | None:
        if self.kernel_major is None or self.kernel_minor is None:
            return None
        return self.kernel_major, self.kernel_minor

    @property
    def is_hidden(self) -> bool:
        """An internal LV (``[name]`` in lvs): raid images, pool data, spares."""
        return self.hidden

    @property
    def is_snapshot(self) -> bool:
        """A classic snapshot (attr[0] s/S) or a thin snapshot (thin LV with an origin)."""
        return self._bit(0) in "sS" or (self.is_thin and bool(self.origin))

    @property
    def is_thin(self) -> bool:
        """A thin volume (not the pool)."""
        return self.segtype == "thin"

    @property
    def is_thin_pool(self) -> bool:
        return self.segtype == "thin-pool"

    @property
    def is_raid1(self) -> bool:
        return self.segtype == "raid1"

    @property
    def is_mirror(self) -> bool:
        """A legacy device-mapper mirror (``--type mirror``)."""
        return self.segtype == "mirror"

    @property
    def is_invalid(self) -> bool:
        """An overflowed classic snapshot: state I/S, or its COW at 100 % (lvs_overflow)."""
        if self._bit(4) in "IS":
            return True
        full = self.snap_percent if self.snap_percent is not None else self.data_percent
        return self._bit(0) in "sS" and full is not None and full >= 100.0

    @property
    def is_active(self) -> bool:
        """The LV has a device-mapper device (state anything but '-' or (h)istorical)."""
        return self._bit(4) not in "-h"

    @property
    def is_open(self) -> bool:
        """Something (a mount, a LUN) holds the device open (attr[5] 'o')."""
        return self._bit(5) == "o"

    @property
    def is_in_sync(self) -> bool:
        """raid1/mirror: every leg is a full copy (copy_percent 100). Other LVs: True."""
        if not (self.is_raid1 or self.is_mirror):
            return True
        return self.copy_percent is not None and self.copy_percent >= 100.0

    @property
    def is_tracked_split_image(self) -> bool:
        """A raid1 image split off with ``--trackchanges`` (``Iri-a-r---`` in lvs_split)."""
        return (not self.hidden and self._bit(0) == "I" and self._bit(1) == "r"
                and self._bit(6) == "r")

    @property
    def is_half_made(self) -> bool:
        """Left behind by a failed lvcreate: mapped device with only an (i)nactive table,
        or (d)evice without tables (``sanoffload-snap3 -wi-i-----`` in lvs_after_frozen)."""
        return self._bit(4) in "id"

    @property
    def is_ours(self) -> bool:
        """Made by sanoffload: it carries the tag. Only the tag decides ownership
        (as in ceph-volume): a name anyone can give, and cleanup removes what is ours.

        A mirror split is untagged for a moment (lvconvert takes no --addtag, see
        lvs_msplit); the journal, written before the split, accounts for it.
        """
        return SANOFFLOAD_TAG in self.tags

    @property
    def is_base(self) -> bool:
        """A thin base sanoffload keeps (its tag): never an orphan, see agent/bases.py."""
        return self.is_ours and BASE_TAG in self.tags

    @property
    def looks_like_ours(self) -> bool:
        """Tagged or named like sanoffload's LVs: never backed up (a refusal costs nothing),
        never removed on the strength of the name alone (see :attr:`is_ours`)."""
        return self.is_ours or self.name.startswith(NAME_PREFIX)


@dataclass(frozen=True)
class VolumeGroup:
    """One row of ``vgs``; sizes in bytes."""

    name: str
    size: int
    free: int
    extent_size: int
    tags: list[str] = field(default_factory=list, hash=False)

    @classmethod
    def from_report(cls, row: Mapping[str, Any]) -> VolumeGroup:
        return cls(name=str(row["vg_name"]), size=int(row["vg_size"]), free=int(row["vg_free"]),
                   extent_size=int(row["vg_extent_size"]),
                   tags=[t for t in str(row.get("vg_tags", "")).split(",") if t])


# --------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------

def check_name(name: str, what: str = "LV name") -> str:
    """Return ``name`` if LVM would accept it as a VG/LV name; ValueError otherwise."""
    if not _NAME_RE.match(name) or name in (".", ".."):
        raise ValueError(f"invalid {what}: {name!r}")
    return name


def check_tag(tag: str) -> str:
    """Return ``tag`` if LVM would accept it; ValueError otherwise."""
    if not _TAG_RE.match(tag):
        raise ValueError(f"invalid LVM tag: {tag!r}")
    return tag


def _lv_arg(vg: str, name: str) -> str:
    return f"{check_name(vg, 'VG name')}/{check_name(name)}"


def _tag_args(tags: Iterable[str]) -> list[str]:
    args: list[str] = []
    for tag in tags:
        args += ["--addtag", check_tag(tag)]
    return args


def _report_rows(data: Any, key: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for section in data.get("report", []) if isinstance(data, dict) else []:
        rows.extend(section.get(key, []))
    return rows


# --------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------

def list_lvs(runner: Runner, vg: str | None = None, *, all: bool = True,
             select: str | None = None) -> list[LogicalVolume]:
    """``lvs [--all] --reportformat json --units b --nosuffix -o LV_FIELDS [--select S] [VG]``.

    ``all`` includes hidden LVs (raid images, pool data), which a leftover
    check must see.
    """
    argv = ["lvs"]
    if all:
        argv.append("--all")
    argv += [*REPORT_ARGS, "-o", ",".join(LV_FIELDS)]
    if select:
        argv += ["--select", select]
    if vg is not None:
        argv.append(check_name(vg, "VG name"))
    data = runner.run(argv, env=LVM_ENV).json()
    return [LogicalVolume.from_report(row) for row in _report_rows(data, "lv")]


def get_lv(runner: Runner, vg: str, name: str) -> LogicalVolume | None:
    """The LV ``VG/NAME`` (hidden ones included), or None."""
    check_name(name)
    for lv in list_lvs(runner, vg, select=f'lv_name="{name}"'):
        # filtered here too: --select is a convenience, the name is what counts
        if lv.name == name and lv.vg == vg:
            return lv
    return None


def find_lv_by_devno(runner: Runner, major: int, minor: int) -> LogicalVolume | None:
    """The LV whose kernel device is ``major:minor`` (as findmnt's MAJ:MIN), or None.

    ``lvs --all ... --select 'lv_kernel_major=M && lv_kernel_minor=m'``; a
    device that is not an LV (a partition, dm-crypt, a -real/-cow layer) gives None.
    """
    found = [lv for lv in list_lvs(
        runner, select=f"lv_kernel_major={int(major)} && lv_kernel_minor={int(minor)}")
        if lv.devno == (major, minor)]
    # a visible LV before an internal one sharing its device (a thin pool and its -tpool)
    found.sort(key=lambda lv: lv.hidden)
    return found[0] if found else None


def get_vg(runner: Runner, name: str) -> VolumeGroup:
    """``vgs --reportformat json --units b --nosuffix -o VG_FIELDS NAME``."""
    argv = ["vgs", *REPORT_ARGS, "-o", ",".join(VG_FIELDS), check_name(name, "VG name")]
    rows = _report_rows(runner.run(argv, env=LVM_ENV).json(), "vg")
    for row in rows:
        if row.get("vg_name") == name:
            return VolumeGroup.from_report(row)
    raise CommandError(f"vgs reported no volume group {name!r}", argv=argv)


# --------------------------------------------------------------------------
# Policy
# --------------------------------------------------------------------------

def snapshot_size(origin_size: int, vg: VolumeGroup, percent: float = DEFAULT_SNAPSHOT_PERCENT,
                  min_bytes: int = DEFAULT_SNAPSHOT_MIN_BYTES) -> int:
    """COW size for a classic snapshot: ``percent`` of the origin, at least ``min_bytes``,
    rounded up to whole extents.

    Raises ResourceError when the VG has less free space. LVM would not
    refuse: it silently caps an oversized COW (lvcreate_snap_nospace), so
    the check has to be ours.
    """
    if not 0 < percent <= 100:
        raise ValueError(f"snapshot percent must be in (0, 100], not {percent}")
    wanted = max(math.ceil(origin_size * percent / 100), int(min_bytes))
    extent = max(vg.extent_size, 1)
    size = math.ceil(wanted / extent) * extent
    if size > vg.free:
        raise ResourceError(
            f"volume group {vg.name} has {vg.free} bytes free; a snapshot of a "
            f"{origin_size}-byte volume needs {size} bytes ({percent:g} %, at least "
            f"{min_bytes} bytes)", hint=f"free space in {vg.name} or lower the snapshot percent")
    return size


def check_thin_pool_room(pool_lv: LogicalVolume, max_data_percent: float,
                         max_metadata_percent: float) -> None:
    """Raise ResourceError if the thin pool is fuller than the limits (or failed).

    A pool that runs out of space blocks (or errors) every write of every
    thin LV in it, the production volume included; so a thin snapshot is
    only taken while the pool has room.
    """
    if not pool_lv.is_thin_pool:
        raise ValueError(f"{pool_lv.full_name} is not a thin pool (segtype {pool_lv.segtype})")
    name = pool_lv.full_name
    health = pool_lv.attr[8] if len(pool_lv.attr) > 8 else "-"
    if health in ("F", "D", "M"):
        what = {"F": "failed", "D": "out of data space", "M": "metadata read-only"}[health]
        raise ResourceError(f"thin pool {name} is {what} (lv_attr {pool_lv.attr})")
    data, meta = pool_lv.data_percent, pool_lv.metadata_percent
    if data is None or meta is None:
        raise ResourceError(f"thin pool {name}: usage unknown (is it active? "
                            f"lv_attr {pool_lv.attr})")
    if data > max_data_percent or meta > max_metadata_percent:
        raise ResourceError(
            f"thin pool {name} is too full for a snapshot: data {data:.2f} % "
            f"(limit {max_data_percent:g} %), metadata {meta:.2f} % "
            f"(limit {max_metadata_percent:g} %)", hint=f"lvextend the pool {name}")


def ensure_valid(lv: LogicalVolume) -> None:
    """Raise DuplicateInvalidError if a duplicate can no longer be trusted."""
    if lv.is_invalid:
        raise DuplicateInvalidError(
            f"snapshot {lv.full_name} is invalid (overflowed: lv_attr {lv.attr}, "
            f"{lv.snap_percent if lv.snap_percent is not None else '?'} % used)",
            hint="raise the snapshot percent or back up when less is written")
    if lv.is_half_made:
        raise DuplicateInvalidError(f"{lv.full_name} was never completed (lv_attr {lv.attr})")


# --------------------------------------------------------------------------
# Changes
# --------------------------------------------------------------------------

def _created(runner: Runner, vg: str, name: str, argv: Sequence[str]) -> LogicalVolume:
    lv = get_lv(runner, vg, name)
    if lv is None:
        raise CommandError(f"{' '.join(argv)} succeeded but {vg}/{name} is not listed",
                           argv=argv)
    return lv


def snapshot_made(runner: Runner, vg: str, name: str, argv: Sequence[str]) -> LogicalVolume:
    """The snapshot ``lvcreate`` made, as ``lvs`` reports it (CommandError if not listed)."""
    return _created(runner, vg, name, argv)


def _with_leftover(exc: CommandError, runner: Runner, vg: str, name: str) -> CommandError:
    """The lvcreate error, naming a half-made LV it may have left (lvcreate_frozen)."""
    try:
        left = get_lv(runner, vg, name)
    except CommandError:
        left = None  # the report is a courtesy: never hide the original failure
    if left is None:
        return exc
    return CommandError(f"{exc.message}; it left {left.full_name} (lv_attr {left.attr})",
                        argv=exc.argv, returncode=exc.returncode, stdout=exc.stdout,
                        stderr=exc.stderr, hint="sanoffload agent cleanup removes it")


def create_snapshot(runner: Runner, origin: LogicalVolume, name: str, size_bytes: int,
                    tags: Iterable[str] = (SANOFFLOAD_TAG,), *,
                    timeout: float | None = None) -> LogicalVolume:
    """:func:`make_snapshot`, then the new LV as ``lvs`` reports it."""
    argv = make_snapshot(runner, origin, name, size_bytes, tags, timeout=timeout)
    return _created(runner, origin.vg, name, argv)


def make_snapshot(runner: Runner, origin: LogicalVolume, name: str, size_bytes: int,
                  tags: Iterable[str] = (SANOFFLOAD_TAG,), *,
                  timeout: float | None = None) -> list[str]:
    """``lvcreate --yes --snapshot --size {n}b --name N --addtag T ... VG/LV``, that one
    command (it is what runs while the filesystem is frozen); returns its argv.

    On failure the CommandError names any half-made LV left behind: a
    frozen origin on kernel 6.1 makes lvcreate fail with EBUSY and leave one.
    """
    if origin.is_thin:
        raise ValueError(f"{origin.full_name} is a thin LV: use create_thin_snapshot")
    if size_bytes <= 0:
        raise ValueError(f"snapshot size must be positive, not {size_bytes}")
    argv = ["lvcreate", "--yes", "--snapshot", "--size", f"{int(size_bytes)}b",
            "--name", check_name(name), *_tag_args(tags), _lv_arg(origin.vg, origin.name)]
    try:
        res = runner.run(argv, env=LVM_ENV, timeout=timeout)
    except CommandError as exc:
        raise _with_leftover(exc, runner, origin.vg, name) from exc
    if _COW_CAPPED in res.stdout:
        # harmless (a COW as big as the origin cannot overflow), but not what was asked
        log.info("lvcreate capped the COW of %s/%s: %s", origin.vg, name, res.stdout.strip())
    return argv


def create_thin_snapshot(runner: Runner, origin: LogicalVolume, name: str,
                         tags: Iterable[str] = (SANOFFLOAD_TAG,), *,
                         timeout: float | None = None) -> LogicalVolume:
    """:func:`make_thin_snapshot`, then :func:`thin_snapshot_made`."""
    argv = make_thin_snapshot(runner, origin, name, tags, timeout=timeout)
    return thin_snapshot_made(runner, origin.vg, name, argv)


def make_thin_snapshot(runner: Runner, origin: LogicalVolume, name: str,
                       tags: Iterable[str] = (SANOFFLOAD_TAG,), *,
                       timeout: float | None = None) -> list[str]:
    """``lvcreate --yes --snapshot --setactivationskip n --name N --addtag T ... VG/LV``,
    that one command; returns its argv.

    Thin snapshots get the activation-skip flag by default and would stay
    inactive; ``--setactivationskip n`` makes lvcreate activate it at once.
    """
    if not origin.is_thin:
        raise ValueError(f"{origin.full_name} is not a thin LV (segtype {origin.segtype})")
    argv = ["lvcreate", "--yes", "--snapshot", "--setactivationskip", "n",
            "--name", check_name(name), *_tag_args(tags), _lv_arg(origin.vg, origin.name)]
    try:
        runner.run(argv, env=LVM_ENV, timeout=timeout)
    except CommandError as exc:
        raise _with_leftover(exc, runner, origin.vg, name) from exc
    return argv


def thin_snapshot_made(runner: Runner, vg: str, name: str, argv: Sequence[str]) -> LogicalVolume:
    """The thin snapshot ``lvcreate`` made, as ``lvs`` reports it; CommandError if not active."""
    lv = _created(runner, vg, name, argv)
    if not lv.is_active:
        raise CommandError(f"thin snapshot {lv.full_name} was created but is not active "
                           f"(lv_attr {lv.attr})", argv=argv)
    return lv


def _require_in_sync(lv: LogicalVolume) -> None:
    if not lv.is_in_sync:
        raise RefusedError(f"{lv.full_name} is not in sync ({lv.copy_percent} % copied): "
                           "a split would give an incomplete copy",
                           hint="wait for the resync (lvs -o copy_percent)")


def split_raid1(runner: Runner, lv: LogicalVolume, *,
                timeout: float | None = None) -> LogicalVolume:
    """:func:`make_raid1_split`, then :func:`raid1_split_image`."""
    argv, stdout = make_raid1_split(runner, lv, timeout=timeout)
    return raid1_split_image(runner, lv, argv, stdout)


def make_raid1_split(runner: Runner, lv: LogicalVolume, *,
                     timeout: float | None = None) -> tuple[list[str], str]:
    """``lvconvert --yes --splitmirrors 1 --trackchanges VG/LV``, that one command;
    returns its argv and stdout (which names the image).

    The image (``VG/LV_rimage_N``, attr ``Iri-a-r---``) is read-only; LVM tracks
    what changes on the LV meanwhile, so :func:`merge_raid1` resyncs only that.
    """
    if not lv.is_raid1:
        raise RefusedError(f"{lv.full_name} is not raid1 (segtype {lv.segtype})")
    _require_in_sync(lv)
    argv = ["lvconvert", "--yes", "--splitmirrors", "1", "--trackchanges",
            _lv_arg(lv.vg, lv.name)]
    res = runner.run(argv, env=LVM_ENV, timeout=timeout)
    return argv, res.stdout


def raid1_split_image(runner: Runner, lv: LogicalVolume, argv: Sequence[str],
                      stdout: str) -> LogicalVolume:
    """The image ``lvconvert --splitmirrors`` split off ``lv`` (by its message and ``lvs``)."""
    match = _SPLIT_RE.search(stdout)
    images = [x for x in list_lvs(runner, lv.vg)
              if x.is_tracked_split_image and re.fullmatch(rf"{re.escape(lv.name)}_rimage_\d+",
                                                           x.name)]
    if match:
        images = [x for x in images if x.name == match.group(2)]
    if len(images) != 1:
        raise CommandError(f"{' '.join(argv)}: cannot tell which image was split off "
                           f"(candidates: {[x.name for x in images]})", argv=argv,
                           stdout=stdout)
    return images[0]


def merge_raid1(runner: Runner, image: LogicalVolume, *, timeout: float | None = None) -> None:
    """``lvconvert --yes --merge VG/LV_rimage_N``: rejoin a tracked split image."""
    if not image.is_tracked_split_image:
        raise RefusedError(f"{image.full_name} is not a raid1 image split with --trackchanges "
                           f"(lv_attr {image.attr})")
    runner.run(["lvconvert", "--yes", "--merge", _lv_arg(image.vg, image.name)],
               env=LVM_ENV, timeout=timeout)


def split_mirror(runner: Runner, lv: LogicalVolume, name: str,
                 tags: Iterable[str] = (SANOFFLOAD_TAG,), *,
                 timeout: float | None = None) -> LogicalVolume:
    """:func:`make_mirror_split`, then :func:`mirror_split_made`."""
    tags = [check_tag(t) for t in tags]  # a bad tag is refused before anything is split
    argv = make_mirror_split(runner, lv, name, timeout=timeout)
    return mirror_split_made(runner, lv.vg, name, tags, argv)


def make_mirror_split(runner: Runner, lv: LogicalVolume, name: str, *,
                      timeout: float | None = None) -> list[str]:
    """``lvconvert --yes --splitmirrors 1 --name N VG/LV``, that one command; its argv."""
    if not lv.is_mirror:
        raise RefusedError(f"{lv.full_name} is not a legacy mirror (segtype {lv.segtype})")
    _require_in_sync(lv)
    argv = ["lvconvert", "--yes", "--splitmirrors", "1", "--name", check_name(name),
            _lv_arg(lv.vg, lv.name)]
    runner.run(argv, env=LVM_ENV, timeout=timeout)
    return argv


def mirror_split_made(runner: Runner, vg: str, name: str, tags: Iterable[str],
                      argv: Sequence[str]) -> LogicalVolume:
    """``lvchange --addtag`` per tag on the split, then the split as ``lvs`` reports it.

    lvconvert takes no ``--addtag``, so the split exists untagged for a moment
    (lvs_msplit); its ``sanoffload-`` name still marks it as ours.
    """
    for tag in [check_tag(t) for t in tags]:
        add_tag(runner, vg, name, tag)
    return _created(runner, vg, name, argv)


def readd_mirror(runner: Runner, lv: LogicalVolume, split: LogicalVolume | str, *,
                 mirrorlog: str = "core", timeout: float | None = None) -> None:
    """Remove the split LV, then ``lvconvert --yes --type mirror -m 1 --mirrorlog core
    --background VG/LV``.

    A legacy mirror split cannot be merged back (no ``--trackchanges`` for
    ``mirror``), so the leg is rebuilt by a full resync. The split goes first
    so its extents are free for the new leg. ``--mirrorlog core`` as the lab
    creates its mirrors: no log LV to allocate (the price, a full resync after
    each activation, is paid now anyway). ``--background``: without it
    lvconvert stays in the foreground polling the whole resync.
    """
    split_name = split if isinstance(split, str) else split.name
    if split_name == lv.name:
        raise ValueError(f"refusing to remove {lv.full_name}: it is the mirror itself")
    if mirrorlog not in ("core", "disk", "mirrored"):
        raise ValueError(f"invalid mirror log type: {mirrorlog!r}")
    remove_lv(runner, lv.vg, split_name, timeout=timeout)
    runner.run(["lvconvert", "--yes", "--type", "mirror", "-m", "1", "--mirrorlog", mirrorlog,
                "--background", _lv_arg(lv.vg, lv.name)], env=LVM_ENV, timeout=timeout)


def add_tag(runner: Runner, vg: str, name: str, tag: str) -> None:
    """``lvchange --addtag TAG VG/LV``."""
    runner.run(["lvchange", "--addtag", check_tag(tag), _lv_arg(vg, name)], env=LVM_ENV)


def rename_lv(runner: Runner, vg: str, name: str, new_name: str) -> None:
    """``lvrename VG NAME NEW_NAME``."""
    runner.run(["lvrename", check_name(vg, "VG name"), check_name(name), check_name(new_name)],
               env=LVM_ENV)


def remove_lv(runner: Runner, vg: str, name: str, *, timeout: float | None = None) -> bool:
    """``lvremove --yes VG/LV``: True if removed, False if it was already gone.

    Exit 5 is tolerated (as ``lv-not-found``) only with LVM's "Failed to find
    logical volume" message; any other exit 5 (in use, locked) raises.
    """
    res = runner.run(["lvremove", "--yes", _lv_arg(vg, name)], env=LVM_ENV, timeout=timeout,
                     ok_codes=LV_NOT_FOUND)
    if res.returncode == 0:
        return True
    if _NOT_FOUND_MSG in res.stderr:
        log.debug("lvremove: %s/%s already gone", vg, name)
        return False
    detail = res.stderr.strip().splitlines()
    raise CommandError(f"{' '.join(res.argv)} failed with exit code {res.returncode}: "
                       f"{detail[-1] if detail else 'no output'}", argv=res.argv,
                       returncode=res.returncode, stdout=res.stdout, stderr=res.stderr)


def dm_name(vg: str, name: str) -> str:
    """The device-mapper name of ``vg/name`` (LVM doubles each '-' inside a part)."""
    return f"{vg.replace('-', '--')}-{name.replace('-', '--')}"


def dm_remove(runner: Runner, device: str) -> bool:
    """``dmsetup remove --retry DEVICE``: True if removed, False if there was none."""
    return runner.run(["dmsetup", "remove", "--retry", device], ok_codes=DM_NO_DEVICE).ok


def dm_open_count(runner: Runner, device: str) -> int | None:
    """How many hold ``device`` open; None if there is no such device."""
    res = runner.run(["dmsetup", "info", "-c", "--noheadings", "-o", "open", device],
                     ok_codes=DM_NO_DEVICE)
    if not res.ok:
        return None
    text = res.stdout.strip()
    return int(text) if text.isdigit() else None
