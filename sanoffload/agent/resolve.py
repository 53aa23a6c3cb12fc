"""Resolve a requested path to the backup object: file or directory, mount, LV, duplicate kind.

Everything here only reads (``stat``, ``realpath``, ``findmnt``, ``lvs``):
a refusal (:class:`RefusedError`, exit 3) leaves the host exactly as it was.

Order of checks, cheapest and least revealing first::

    absolute, no NUL, no '..'  →  realpath inside an allowed root  →  exists
    →  directory or regular file  →  findmnt: not '/', ext4/xfs, not the root fs
    →  lvs: an LV, not internal/snapshot/pool/ours, in sync  →  duplicate kind
       or else udev: a whole SCSI disk with an NAA identifier (SAN mode: a storage
       node's LUN; which node serves it is the agent config's business)

The roots are checked before existence so a client learns nothing about
paths outside its roots.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from ..errors import RefusedError
from ..kinds import DuplicateKind, ObjectKind
from ..runner import Runner
from ..tools import findmnt, lvm
from ..tools.findmnt import Mount
from ..tools.lvm import LogicalVolume

#: kept for the proxy's job files (proxy/jobs.py), which check against the strings
DUPLICATE_KINDS: tuple[str, ...] = DuplicateKind.values()
#: filesystems whose freeze, snapshot and read-only mount on the proxy are tested
SUPPORTED_FSTYPES: tuple[str, ...] = ("ext4", "xfs")
#: a copy-on-write snapshot works on these without knowing their layout
_PLAIN_SEGTYPES = ("linear", "striped")
# lv_attr[0] of an LV that LVM is reshaping right now
_BUSY = {"O": "its snapshot is being merged into it", "p": "pvmove is moving it",
         "c": "it is under conversion"}


class FS(Protocol):
    """The filesystem lookups resolve needs (tests pass a fake tree)."""

    def stat(self, path: str) -> os.stat_result: ...

    def realpath(self, path: str) -> str: ...


class OsFS:
    """The real filesystem."""

    def stat(self, path: str) -> os.stat_result:
        return os.stat(path)

    def realpath(self, path: str) -> str:
        return os.path.realpath(path)


@dataclass(frozen=True)
class SanDisk:
    """A whole disk that is a storage node's LUN, named by the identifier both hosts see."""

    identifier: str
    #: this host's device node (for messages only: names differ between hosts)
    device: str


class Disks(Protocol):
    """The udev lookups resolve needs for a disk that is not an LV (tests pass a fake)."""

    def san_disk(self, major: int, minor: int) -> SanDisk | str | None:
        """The LUN behind device ``major:minor``; None if it is no SCSI disk with an
        identifier; a reason (text) if it is one but cannot be duplicated whole."""
        ...


class UdevDisks:
    """pyudev: the block device's ``device/wwid`` and ``ID_WWN_WITH_EXTENSION``."""

    def san_disk(self, major: int, minor: int) -> SanDisk | str | None:
        import pyudev

        from ..channel.messages import device_wwids

        try:
            dev = pyudev.Devices.from_device_number(pyudev.Context(), "block",
                                                    os.makedev(major, minor))
        except (pyudev.DeviceNotFoundError, ValueError, OSError):
            return None
        wwids = sorted(w for w in device_wwids(dev) if w.startswith("naa."))
        if not wwids:
            parent = dev.find_parent("block", "disk") if dev.device_type == "partition" else None
            if parent is not None and device_wwids(parent):
                return (f"{dev.device_node} is a partition of a SAN disk; the duplicate is "
                        "the whole LUN, so only a filesystem on the whole disk is supported")
            return None
        if len(wwids) > 1:
            return f"{dev.device_node} reports {len(wwids)} identifiers ({', '.join(wwids)})"
        return SanDisk(wwids[0], str(dev.device_node))


@dataclass(frozen=True)
class BackupObject:
    """What a request resolves to: on an LV of this host (``lv``) or on a LUN (``san``)."""

    requested_path: str
    real_path: str
    kind: ObjectKind
    mount: Mount
    lv: LogicalVolume | None
    #: relative to the filesystem's root ("." for it): what the proxy joins to
    #: its own mount of the duplicate. The same as relative to the mount point,
    #: except under a bind mount, where the bound subdirectory comes first.
    path_in_fs: str
    #: None only on a LUN with no kind asked for: the storage node chooses
    duplicate_kind: DuplicateKind | None
    #: the allowed root (real path) the object lies in
    root: str
    san: SanDisk | None = None

    def __post_init__(self) -> None:
        # the enums hold past here even for an object a test or a caller built from text
        object.__setattr__(self, "kind", ObjectKind.parse(self.kind))
        if self.duplicate_kind is not None or self.san is None:
            object.__setattr__(self, "duplicate_kind", DuplicateKind.parse(self.duplicate_kind))
        if (self.lv is None) == (self.san is None):
            raise ValueError("a backup object is on an LV or on a LUN, exactly one")

    @property
    def volume(self) -> str:
        """The volume, as messages and the journal name it."""
        if self.lv is not None:
            return self.lv.full_name
        assert self.san is not None
        return self.san.identifier


def _inside(path: str, root: str) -> bool:
    # commonpath, not startswith: /srv/data2 is not inside /srv/data
    return os.path.commonpath([path, root]) == root


def _type_name(mode: int) -> str:
    for test, name in ((stat.S_ISBLK, "a block device"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISFIFO, "a fifo"),
                       (stat.S_ISLNK, "a symlink")):
        if test(mode):
            return name
    return f"a special file (mode {mode:o})"


def _refuse(path: str, reason: str, hint: str | None = None) -> RefusedError:
    return RefusedError(f"{path}: {reason}", hint=hint)


def fitting_kinds(lv: LogicalVolume) -> tuple[DuplicateKind, ...]:
    """The duplicate kinds that work for ``lv``, the suggested one first."""
    if lv.is_thin:
        return (DuplicateKind.THIN_SNAPSHOT,)
    if lv.is_raid1:
        return (DuplicateKind.RAID1_SPLIT, DuplicateKind.SNAPSHOT)
    if lv.is_mirror:
        return (DuplicateKind.MIRROR_SPLIT, DuplicateKind.SNAPSHOT)
    if lv.segtype in _PLAIN_SEGTYPES or lv.segtype.startswith("raid"):
        return (DuplicateKind.SNAPSHOT,)
    return ()


def _check_path_syntax(path: str) -> None:
    if not isinstance(path, str) or not path:
        raise RefusedError(f"{path!r}: not a path")
    if "\0" in path:
        raise _refuse(repr(path), "contains a NUL byte")
    if not os.path.isabs(path):
        raise _refuse(path, "not an absolute path")
    # refused even when it would normalise inside a root: it is never needed
    if ".." in path.split("/"):
        raise _refuse(path, "contains a '..' segment")


def _check_roots(fs: FS, path: str, real: str, allowed_roots: Sequence[str]) -> str:
    if not allowed_roots:
        raise _refuse(path, "this client has no allowed roots")
    roots = []
    for root in allowed_roots:
        if not os.path.isabs(root):
            raise ValueError(f"allowed root must be absolute: {root!r}")
        roots.append(fs.realpath(root))
    for root in roots:
        if _inside(real, root):
            return root
    lexical = os.path.normpath(path)
    if any(_inside(lexical, os.path.normpath(r)) or _inside(lexical, r)
           for r in (*allowed_roots, *roots)):
        raise _refuse(path, f"a symlink in the path leads outside the allowed roots (to {real})")
    raise _refuse(path, f"outside the allowed roots ({', '.join(allowed_roots)})")


def _check_kind(fs: FS, path: str, real: str) -> ObjectKind:
    try:
        st = fs.stat(real)
    except (FileNotFoundError, NotADirectoryError):
        raise _refuse(path, "does not exist") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _refuse(path, "symlink loop") from None
        raise _refuse(path, f"cannot be examined: {exc.strerror or exc}") from None
    if stat.S_ISDIR(st.st_mode):
        return ObjectKind.DIRECTORY
    if stat.S_ISREG(st.st_mode):
        return ObjectKind.FILE
    raise _refuse(path, f"not a directory or regular file: it is {_type_name(st.st_mode)}")


def _check_mount(runner: Runner, path: str, mount: Mount) -> None:
    if mount.target == "/":
        raise _refuse(path, "on the root filesystem (/): freezing it could hang the agent itself")
    if mount.fstype not in SUPPORTED_FSTYPES:
        raise _refuse(path, f"filesystem type {mount.fstype or 'unknown'} at {mount.target} is "
                            f"not supported (only {', '.join(SUPPORTED_FSTYPES)})")
    # the root filesystem also reached through a bind mount elsewhere
    root = findmnt.mount_of(runner, "/")
    if root.devno == mount.devno:
        raise _refuse(path, f"{mount.target} is the root filesystem ({mount.source}, also "
                            "mounted at /): freezing it could hang the agent itself")


def check_lv(path: str, lv: LogicalVolume) -> None:
    name = lv.full_name
    if lv.is_hidden:
        raise _refuse(path, f"on {name}, an LV internal to LVM")
    if lv.looks_like_ours:
        raise _refuse(path, f"on {name}, which sanoffload made (tag {lvm.SANOFFLOAD_TAG!r} or "
                            f"name {lvm.NAME_PREFIX}*)")
    if lv.is_snapshot:
        raise _refuse(path, f"on {name}, itself a snapshot (of {lv.origin})")
    if lv.is_thin_pool:
        raise _refuse(path, f"on {name}, a thin pool")
    if lv.is_tracked_split_image:
        raise _refuse(path, f"on {name}, a raid1 image split off with --trackchanges")
    if lv.is_invalid or lv.is_half_made:
        raise _refuse(path, f"on {name}, which is not usable (lv_attr {lv.attr})")
    busy = _BUSY.get(lv.attr[:1])
    if busy:
        raise _refuse(path, f"on {name}: {busy}", hint="try again when LVM is done")
    if (lv.is_raid1 or lv.is_mirror) and not lv.is_in_sync:
        copied = "unknown" if lv.copy_percent is None else f"{lv.copy_percent:.2f} %"
        raise _refuse(path, f"on {name}, a {lv.segtype} LV that is not in sync "
                            f"({copied} copied)", hint="wait for the resync to finish")


def choose_kind(path: str, lv: LogicalVolume,
                 override: DuplicateKind | None) -> DuplicateKind:
    fitting = fitting_kinds(lv)
    if not fitting:
        raise _refuse(path, f"on {lv.full_name}, of segment type {lv.segtype}, which "
                            "sanoffload cannot duplicate")
    if override is None:
        return fitting[0]
    for kind in fitting:
        if kind == override:
            return kind
    raise _refuse(path, f"duplicate kind '{override.value}' does not fit {lv.full_name} "
                        f"(segment type "
                        f"{lv.segtype}; possible: {', '.join(fitting)})")


def _path_in_fs(path: str, real: str, mount: Mount) -> str:
    if not _inside(real, mount.target):
        raise _refuse(path, f"findmnt placed {real} under {mount.target}; the path changed "
                            "while it was being resolved")
    rel = os.path.relpath(real, mount.target)
    if mount.fsroot != "/":
        rel = os.path.normpath(os.path.join(mount.fsroot.lstrip("/"), rel))
    return rel


def resolve(runner: Runner, path: str, allowed_roots: Sequence[str], *,
            duplicate_kind: DuplicateKind | str | None = None,
            fs: FS | None = None, disks: Disks | None = None) -> BackupObject:
    """Resolve ``path`` for a client allowed ``allowed_roots``; RefusedError names why not.

    ``duplicate_kind`` overrides the suggestion drawn from the LV's segment
    type; one that does not fit the LV is refused (exit 3). One that is no
    duplicate kind at all is a UsageError (exit 2), as at every other edge.
    """
    fs = fs or OsFS()
    override = None if duplicate_kind is None else DuplicateKind.parse(duplicate_kind)
    _check_path_syntax(path)
    real = fs.realpath(path)
    root = _check_roots(fs, path, real, allowed_roots)
    kind = _check_kind(fs, path, real)

    mount = findmnt.mount_of(runner, real)
    _check_mount(runner, path, mount)
    lv = lvm.find_lv_by_devno(runner, mount.major, mount.minor)
    if lv is None:
        san = (disks or UdevDisks()).san_disk(mount.major, mount.minor)
        if isinstance(san, SanDisk):
            return BackupObject(requested_path=path, real_path=real, kind=kind, mount=mount,
                                lv=None, path_in_fs=_path_in_fs(path, real, mount),
                                duplicate_kind=override, root=root, san=san)
        why = f" ({san})" if isinstance(san, str) else ""
        raise _refuse(path, f"not on LVM: {mount.target} is mounted from {mount.source} "
                            f"({mount.major}:{mount.minor}), not a logical volume nor a "
                            f"storage node's LUN{why}")
    check_lv(path, lv)
    chosen = choose_kind(path, lv, override)
    return BackupObject(requested_path=path, real_path=real, kind=kind, mount=mount, lv=lv,
                        path_in_fs=_path_in_fs(path, real, mount), duplicate_kind=chosen,
                        root=root)
