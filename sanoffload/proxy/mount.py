"""Mount the duplicate read-only at a private mount point and find the backup object in it.

Command lines::

    blkid -o value -s TYPE DEV                              # what the disk holds
    mount -t ext4 -o ro,noload,nodev,nosuid,noexec DEV MP
    mount -t xfs -o ro,norecovery,nouuid,nodev,nosuid,noexec DEV MP
    umount MP

The duplicate is a crash-consistent (frozen) image of a filesystem still
mounted on the first server: ``noload``/``norecovery`` keep the kernel from
replaying a journal (it could not write anyway, the LUN is read-only),
``nouuid`` lets XFS mount a copy whose UUID may already be mounted here, and
``nodev,nosuid,noexec`` keep the backed-up data from acting on the proxy.
The mount point is ``/run/sanoffload/mnt/SESSION`` (mode 0700).

A consistency group (several volumes in one backup) gets a directory per
session instead, each member's duplicate mounted as above at ``m0``, ``m1``…
and its object bind-mounted read-only into a staging tree at its archive name::

    SESSION/m0                 mount -t ext4 -o ro,... DEV0 SESSION/m0
    SESSION/stage/srv/san/db   mount --bind SESSION/m0/db SESSION/stage/srv/san/db
                               mount -o remount,bind,ro,nodev,nosuid,noexec SESSION/stage/srv/san/db
"""

from __future__ import annotations

import logging
import os
import re
import stat
from collections.abc import Mapping

from ..channel.messages import check_session_id
from ..errors import CommandError, RefusedError, ResourceError
from ..kinds import ObjectKind
from ..requirements import Requirement
from ..runner import Runner
from ..tools import findmnt

REQUIRES: tuple[Requirement, ...] = (
    Requirement("mount", "mount, umount and blkid", roles=("proxy",),
                fails_without="cannot check and mount the duplicate read-only to back it up",
                executables=("mount", "umount", "blkid")),
)

log = logging.getLogger(__name__)

MOUNT_ROOT = "/run/sanoffload/mnt"
MOUNT_OPTIONS: Mapping[str, str] = {
    "ext4": "ro,noload,nodev,nosuid,noexec",
    "xfs": "ro,norecovery,nouuid,nodev,nosuid,noexec",
}
#: blkid exit 2: no filesystem signature (or no TYPE tag) found on the device
BLKID_NOTHING: Mapping[int, str] = {2: "no-signature"}
#: umount exit 32 ("mount failure"): tolerated only with the message "not mounted"
UMOUNT_FAILURE: Mapping[int, str] = {32: "umount-failure"}
_NOT_MOUNTED = "not mounted"


def check_fstype(fstype: str) -> str:
    """``fstype`` if sanoffload mounts it (ext4, xfs); RefusedError otherwise."""
    if fstype not in MOUNT_OPTIONS:
        raise RefusedError(f"filesystem type {fstype!r} is not supported on the proxy "
                           f"(supported: {', '.join(MOUNT_OPTIONS)})")
    return fstype


def mountpoint_for(session_id: str, root: str = MOUNT_ROOT) -> str:
    """``ROOT/SESSION``; the session id must be a plain name (no '/', no '..'): ValueError."""
    return os.path.join(root, check_session_id(session_id))


def make_mountpoint(session_id: str, root: str = MOUNT_ROOT) -> str:
    """Create ``ROOT/SESSION`` (0700, ROOT too) and return it.

    An existing empty directory is reused (an earlier attempt of this session
    left it); anything else there raises ResourceError.
    """
    path = mountpoint_for(session_id, root)
    os.makedirs(root, mode=0o700, exist_ok=True)
    try:
        os.mkdir(path, 0o700)
        return path
    except FileExistsError:
        pass
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise ResourceError(f"mount point {path} exists and is not a directory")
    if os.path.ismount(path):
        return path  # the caller checks what is mounted there (mounted_device)
    if os.listdir(path):
        raise ResourceError(f"mount point {path} exists and is not empty",
                            hint="a leftover of an earlier session? inspect and remove it")
    return path


#: what a group's session directory holds: a member's mount point, and the staging tree
MEMBER_DIR_RE = re.compile(r"m[0-9]{1,2}")
STAGE_DIR = "stage"
#: options of a bind mount of a member's object, as its remount gives them
BIND_OPTIONS = "remount,bind,ro,nodev,nosuid,noexec"


def member_dir(index: int) -> str:
    """``m0``, ``m1``…: the name of member ``index``'s mount point in its session directory."""
    if not 0 <= index < 100:
        raise ValueError(f"member index out of range: {index}")
    return f"m{index}"


def check_group_mount(rel: str) -> str:
    """``rel`` if it can name a group's mount inside its session directory; ValueError if not.

    ``mN`` or ``stage/NAME…``: relative, normalised, no '..', no control character. A
    journal record is read with this, so it can never send umount outside the directory.
    """
    if not isinstance(rel, str) or not rel or len(rel) > 4200 or rel.startswith("/") \
            or os.path.normpath(rel) != rel or ".." in rel.split("/") \
            or any(ord(c) < 32 or c == "\x7f" for c in rel):
        raise ValueError(f"not a group mount inside a session directory: {rel!r}")
    head, _, rest = rel.partition("/")
    if not (MEMBER_DIR_RE.fullmatch(rel) or (head == STAGE_DIR and rest)):
        raise ValueError(f"not a group mount inside a session directory: {rel!r}")
    return rel


def make_private_dir(path: str) -> str:
    """mkdir ``path`` 0700; an existing empty directory is reused, anything else is refused."""
    try:
        os.mkdir(path, 0o700)
        return path
    except FileExistsError:
        pass
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or os.path.ismount(path) or os.listdir(path):
        raise ResourceError(f"{path} exists and is not an empty directory",
                            hint="a leftover of an earlier attempt? run 'sanoffload proxy "
                                 "cleanup'")
    return path


def make_bind_target(path: str, kind: ObjectKind) -> str:
    """An empty directory (or, for a file, an empty file) at ``path`` to bind-mount onto.

    Its parents are made 0700 (tar is not given them: only the member is archived).
    """
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    if kind is ObjectKind.FILE:
        # O_EXCL|O_NOFOLLOW: a leftover (or a link) is never bind-mounted over
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600))
    else:
        make_private_dir(path)
    return path


def bind(runner: Runner, source: str, target: str) -> None:
    """``mount --bind SRC DST``: the object at SRC seen at DST (read-only only after
    :func:`remount_readonly`: a bind does not take ``ro`` from its own options)."""
    for path in (source, target):
        if not os.path.isabs(path):
            raise ValueError(f"bind mount paths must be absolute: {path!r}")
    runner.run(["mount", "--bind", source, target])


def remount_readonly(runner: Runner, target: str) -> None:
    """``mount -o remount,bind,ro,nodev,nosuid,noexec DST``: the bind at DST made read-only."""
    if not os.path.isabs(target):
        raise ValueError(f"mount point must be absolute: {target!r}")
    runner.run(["mount", "-o", BIND_OPTIONS, target])
    log.info("bound read-only at %s", target)


def remove_tree(root: str) -> bool:
    """Remove a group's session directory: empty directories and empty files only.

    True if removed, False if already gone. Never descends into another
    filesystem: an entry on another device than ``root`` is a mount still
    there (a member's duplicate, a bind mount) and raises ResourceError, as
    does anything that is not an empty directory or an empty regular file.
    """
    try:
        top = os.lstat(root)
    except FileNotFoundError:
        return False
    if not stat.S_ISDIR(top.st_mode):
        raise ResourceError(f"{root} is not a directory")
    order: list[tuple[str, bool]] = []
    stack = [root]
    while stack:
        here = stack.pop()
        order.append((here, True))
        for name in os.listdir(here):
            path = os.path.join(here, name)
            st = os.lstat(path)
            if st.st_dev != top.st_dev:
                raise ResourceError(f"{path} is still mounted", hint=f"umount {path}")
            if stat.S_ISDIR(st.st_mode):
                stack.append(path)
            elif stat.S_ISREG(st.st_mode) and st.st_size == 0:
                order.append((path, False))
            else:
                raise ResourceError(f"{path} is not ours to remove (not an empty file)")
    # deepest first: a directory goes once everything in it has gone
    for path, is_dir in sorted(order, key=lambda e: e[0].count("/"), reverse=True):
        if is_dir:
            os.rmdir(path)
        else:
            os.unlink(path)
    return True


def remove_mountpoint(path: str) -> bool:
    """rmdir ``path``: True if removed, False if already gone.

    Only ever rmdir: a directory that still holds a mount or files stays, and
    the OSError says why.
    """
    try:
        os.rmdir(path)
    except FileNotFoundError:
        return False
    return True


def probe_fstype(runner: Runner, device: str) -> str:
    """``blkid -o value -s TYPE DEV``: the filesystem type, "" if blkid finds none (exit 2)."""
    res = runner.run(["blkid", "-o", "value", "-s", "TYPE", _dev(device)], ok_codes=BLKID_NOTHING)
    if res.returncode != 0:
        return ""
    return res.stdout.strip()


def verify_fstype(runner: Runner, device: str, expected: str) -> None:
    """RefusedError unless ``device`` holds the filesystem type the agent named."""
    check_fstype(expected)
    found = probe_fstype(runner, device)
    if found != expected:
        raise RefusedError(
            f"{device} holds {found or 'no recognisable filesystem'}, but the agent said "
            f"{expected}: refusing to mount it",
            hint="is this the right disk? compare its wwid with the agent's identifier")


def mount_readonly(runner: Runner, device: str, fstype: str, mountpoint: str, *,
                   verify: bool = True) -> None:
    """``mount -t FSTYPE -o OPTIONS DEV MP`` with the read-only options of MOUNT_OPTIONS.

    ``verify`` (default) checks the type with blkid first and refuses a mismatch.
    """
    options = MOUNT_OPTIONS[check_fstype(fstype)]
    if verify:
        verify_fstype(runner, device, fstype)
    if not os.path.isabs(mountpoint):
        raise ValueError(f"mount point must be absolute: {mountpoint!r}")
    runner.run(["mount", "-t", fstype, "-o", options, _dev(device), mountpoint])
    log.info("mounted %s (%s) read-only at %s", device, fstype, mountpoint)


def mounted_device(runner: Runner, mountpoint: str) -> findmnt.Mount | None:
    """What is mounted exactly at ``mountpoint`` (findmnt), or None."""
    mnt = findmnt.mount_of(runner, mountpoint)
    if os.path.normpath(mnt.target) != os.path.normpath(mountpoint):
        return None
    return mnt


def is_same_device(a: str, b: str) -> bool:
    """True if two device paths lead to the same node (``/dev/disk/by-id/…`` vs ``/dev/sdb``)."""
    return os.path.realpath(a) == os.path.realpath(b)


def unmount(runner: Runner, mountpoint: str) -> bool:
    """``umount MP``: True if unmounted, False if nothing was mounted there.

    umount exits 32 for every failure; only its "not mounted" message is
    tolerated, a busy target raises. A mount point that does not exist holds
    no mount, so umount is not run for it.
    """
    if not os.path.lexists(mountpoint):
        return False
    res = runner.run(["umount", mountpoint], ok_codes=UMOUNT_FAILURE)
    if res.returncode == 0:
        log.info("unmounted %s", mountpoint)
        return True
    if _NOT_MOUNTED in res.stderr:
        log.debug("umount: %s was not mounted", mountpoint)
        return False
    detail = res.stderr.strip().splitlines()
    raise CommandError(f"{' '.join(res.argv)} failed with exit code {res.returncode}: "
                       f"{detail[-1] if detail else 'no output'}", argv=res.argv,
                       returncode=res.returncode, stdout=res.stdout, stderr=res.stderr,
                       hint="is a process still using it? (fuser -vm MP)")


def _dev(device: str) -> str:
    # an absolute /dev path cannot be read as an option by blkid or mount
    if not device.startswith("/dev/"):
        raise ValueError(f"not a device path: {device!r}")
    return device


def _inside(path: str, root: str) -> bool:
    # commonpath, not startswith: /run/x/mnt2 is not inside /run/x/mnt
    return os.path.commonpath([path, root]) == root


def check_object(mountpoint: str, path_in_fs: str, kind: ObjectKind | None = None) -> str:
    """The backup object's real path inside the mount; RefusedError if it is not usable.

    ``path_in_fs`` is relative to the filesystem's root ("." for the root,
    a leading '/' is ignored); '..' is refused. Symlinks are resolved and the
    result must stay inside the mount: an absolute link resolves against the
    proxy's root, so it leads out and is refused. ``kind`` (as the agent said)
    must match; without it either is accepted. Anything else (a device node, a
    FIFO) is refused.
    """
    if kind is not None:
        kind = ObjectKind.parse(kind, where="check_object")
    rel = path_in_fs.strip("/") or "."
    if "\x00" in rel or ".." in rel.split("/"):
        raise RefusedError(f"path inside the filesystem {path_in_fs!r} contains '..'")
    root = os.path.realpath(mountpoint)
    real = os.path.realpath(os.path.join(root, rel))
    if not _inside(real, root):
        raise RefusedError(f"{path_in_fs!r} in the duplicate resolves to {real}, outside "
                           f"its mount {root} (a symlink leading out)")
    try:
        st = os.stat(real)
    except FileNotFoundError:
        raise RefusedError(f"{path_in_fs!r} does not exist in the duplicate mounted at "
                           f"{root}") from None
    found = (ObjectKind.DIRECTORY if stat.S_ISDIR(st.st_mode)
             else ObjectKind.FILE if stat.S_ISREG(st.st_mode) else None)
    if found is None or (kind is not None and found is not kind):
        want = kind or "a directory or a regular file"
        raise RefusedError(f"{path_in_fs!r} in the duplicate is not {want} "
                           f"(mode {stat.filemode(st.st_mode)})")
    return real
