"""Attach the agent's exported duplicate to the proxy: iSCSI login, find the disk, mount it.

Steps, each undo registered on the caller's UndoStack the moment its resource
exists (unwinding runs them newest first)::

    iscsiadm -m session                          # already logged in? then no new login
    iscsiadm -m discovery -t sendtargets -p P -o nonpersistent
    iscsiadm -m node -T T -p P -o new            # undo: -o delete
    iscsiadm -m node -T T -p P -o update ...     # CHAP, replacement timeout, startup manual
    (udev monitor started)
    iscsiadm -m node -T T -p P --login           # undo: --logout
    (wait for the disk whose wwid is the identifier; one --rescan at half the deadline)
    mkdir /run/sanoffload/mnt/SESSION            # undo: rmdir
    blkid -o value -s TYPE DEV
    mount -t FS -o ro,... DEV MP                 # undo: umount

The target IQN is the backup session's own (the agent makes one per
session), so a session or mount already there is a leftover of an earlier
attempt of this same backup: it is reused, and its undo registered like a
new one's, so that it is cleaned up with the rest.

An image backup needs the disk, not a filesystem: :func:`attach_block` stops after
the wait (node, session, disk), journaled and undone the same way.

A consistency group (the answer lists ``members``: LUNs of the one target) is
a branch of its own, :func:`attach_group`; a single path never goes there::

    (node record, udev monitor, one login: as above)
    (wait for every member's disk, one deadline)
    mkdir /run/sanoffload/mnt/SESSION                    # undo: remove the tree
    per member i: mkdir SESSION/mI; blkid; mount -t FS -o ro,... DEV SESSION/mI
    per member: mkdir/touch SESSION/stage/ARCHIVE_NAME
                mount --bind SESSION/mI/PATH_IN_FS SESSION/stage/ARCHIVE_NAME
                mount -o remount,bind,ro,nodev,nosuid,noexec SESSION/stage/ARCHIVE_NAME

and tar reads ``-C SESSION/stage ARCHIVE_NAME…``.

With a :class:`~sanoffload.proxy.journal.ProxyJournal`, each of the node
record, the session and the mount is written down before it is made and
struck off once undone, so a proxy killed outright (SIGKILL, power) leaves a
record ``sanoffload proxy cleanup`` undoes (see :mod:`sanoffload.proxy.journal`).
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..channel.messages import PrepareAnswer
from ..errors import CommandError, CommandTimeoutError, RefusedError, ResourceError
from ..runner import Runner
from ..tools import iscsiadm
from ..undo import UndoStack
from . import mount
from .devices import DEFAULT_DEADLINE_S, DeviceWaiter, DisksWaiter, GroupWaiter, Waiter
from .journal import Held, ProxyJournal

log = logging.getLogger(__name__)

#: makes the waiter for one identifier: DeviceWaiter, or a test's stand-in
WaiterFactory = Callable[..., Waiter]
#: makes the waiter for a group's identifiers: DisksWaiter, or a test's stand-in
GroupWaiterFactory = Callable[..., GroupWaiter]


@dataclass(frozen=True)
class Attached:
    """The mounted duplicate: its disk, where it is mounted, the backup object's real path.

    A group's: member 0's disk, the session directory, the staging tree (also
    ``staging``), the members' names in it in order, and their mount points.
    """

    device: str
    mountpoint: str
    object_path: str
    #: a group's staging tree (tar -C), None for a single path
    staging: str | None = None
    #: a group's members as tar names them inside ``staging`` (Member.archive_name)
    names: tuple[str, ...] = ()
    #: a group's members' mount points, in members' order
    mountpoints: tuple[str, ...] = ()


def attach(runner: Runner, req: PrepareAnswer, undo: UndoStack, *,
           waiter_factory: WaiterFactory = DeviceWaiter,
           device_deadline_s: float = DEFAULT_DEADLINE_S,
           replacement_timeout: int = iscsiadm.DEFAULT_REPLACEMENT_TIMEOUT,
           mount_root: str = mount.MOUNT_ROOT,
           journal: ProxyJournal | None = None,
           group_waiter_factory: GroupWaiterFactory = DisksWaiter) -> Attached:
    """Log in to the agent's export, find its disk, mount it read-only; see the module doc.

    Idempotent: an existing session to the target is not logged in again and
    a mount of the same disk at the session's mount point is reused.
    ``journal`` (None: none) records each resource before it is made. ``req``
    was checked field by field (:meth:`PrepareAnswer.from_wire`); a filesystem
    type the proxy does not mount is refused here (RefusedError), before
    anything is logged in or mounted.
    """
    if req.members:
        return attach_group(runner, req, undo, waiter_factory=group_waiter_factory,
                            device_deadline_s=device_deadline_s,
                            replacement_timeout=replacement_timeout, mount_root=mount_root,
                            journal=journal)
    mount.check_fstype(req.fstype)
    # masked everywhere from now on, not only in the call that passes it
    runner.add_secret(req.chap_secret)
    held = _begin(journal, req, mount.mountpoint_for(req.session_id, mount_root), undo)

    device: str = _log_in_and_wait(
        runner, req, undo, replacement_timeout, held,
        lambda: waiter_factory(req.identifier, deadline_s=device_deadline_s))

    mountpoint = _mount(runner, req, device, undo, mount_root, held)
    obj = mount.check_object(mountpoint, req.path_in_fs, req.object_kind)
    log.info("attached %s: %s mounted at %s, object %s", req.session_id, device, mountpoint, obj)
    return Attached(device=device, mountpoint=mountpoint, object_path=obj)


def attach_block(runner: Runner, req: PrepareAnswer, undo: UndoStack, *,
                 waiter_factory: WaiterFactory = DeviceWaiter,
                 device_deadline_s: float = DEFAULT_DEADLINE_S,
                 replacement_timeout: int = iscsiadm.DEFAULT_REPLACEMENT_TIMEOUT,
                 mount_root: str = mount.MOUNT_ROOT,
                 journal: ProxyJournal | None = None) -> str:
    """Log in to the agent's export and find its disk, without mounting it: the disk's path.

    An image backup reads the duplicate's blocks; a mount would only add a way to
    change them (a journal replay). The node record and the session are journaled
    and undone (logout, node deleted) exactly as :func:`attach`'s; the record names
    the session's mount point but never holds a mount. A consistency group is refused
    (RefusedError): an image is of one volume.
    """
    if req.members:
        raise RefusedError(f"session {req.session_id} is a consistency group of "
                           f"{len(req.members)} volumes: an image backup reads one volume "
                           "(back the group up without --image)")
    runner.add_secret(req.chap_secret)
    held = _begin(journal, req, mount.mountpoint_for(req.session_id, mount_root), undo)
    device: str = _log_in_and_wait(
        runner, req, undo, replacement_timeout, held,
        lambda: waiter_factory(req.identifier, deadline_s=device_deadline_s))
    log.info("attached %s: %s (not mounted: its blocks are read)", req.session_id, device)
    return device


def attach_group(runner: Runner, req: PrepareAnswer, undo: UndoStack, *,
                 waiter_factory: GroupWaiterFactory = DisksWaiter,
                 device_deadline_s: float = DEFAULT_DEADLINE_S,
                 replacement_timeout: int = iscsiadm.DEFAULT_REPLACEMENT_TIMEOUT,
                 mount_root: str = mount.MOUNT_ROOT,
                 journal: ProxyJournal | None = None) -> Attached:
    """A consistency group: one login, every member's disk, each mounted read-only at
    ``SESSION/mI`` and its object bound read-only at ``SESSION/stage/ARCHIVE_NAME``.

    Every mount is journaled before it is made and its undo registered the
    moment it exists; a failure at member i unwinds members i-1…0, logs out
    and deletes the node (the caller's UndoStack). A leftover session
    directory is refused (``sanoffload proxy cleanup`` removes it).
    """
    members = req.members
    for m in members:  # before anything is logged in or mounted
        mount.check_fstype(m.fstype)
    runner.add_secret(req.chap_secret)
    session_dir = mount.mountpoint_for(req.session_id, mount_root)
    held = _begin(journal, req, session_dir, undo)

    # one monitor for every member, listening before the login that brings all of them
    devices = _log_in_and_wait(
        runner, req, undo, replacement_timeout, held,
        lambda: waiter_factory([m.identifier for m in members], deadline_s=device_deadline_s))

    _intend(held, "mount")
    os.makedirs(mount_root, mode=0o700, exist_ok=True)
    # the tree goes only once every mount in it is gone: remove_tree never crosses a mount
    undo.push(f"session directory {session_dir}", _undone, held, "mount",
              mount.remove_tree, session_dir)
    mount.make_private_dir(session_dir)
    objects: list[str] = []
    mountpoints: list[str] = []
    for i, (m, device) in enumerate(zip(members, devices, strict=True)):
        rel = mount.member_dir(i)
        mp = os.path.join(session_dir, rel)
        _intend_mount(held, rel)
        mount.make_private_dir(mp)
        mount.verify_fstype(runner, device, m.fstype)
        _mount_step(runner, undo, held, rel, mp,
                    functools.partial(mount.mount_readonly, runner, device, m.fstype, mp,
                                      verify=False))
        objects.append(mount.check_object(mp, m.path_in_fs, m.object_kind))
        mountpoints.append(mp)
    staging = os.path.join(session_dir, mount.STAGE_DIR)
    mount.make_private_dir(staging)
    for m, obj in zip(members, objects, strict=True):
        rel = os.path.join(mount.STAGE_DIR, m.archive_name)
        dest = os.path.join(session_dir, rel)
        _intend_mount(held, rel)
        mount.make_bind_target(dest, m.object_kind)
        _mount_step(runner, undo, held, rel, dest,
                    functools.partial(mount.bind, runner, obj, dest))
        mount.remount_readonly(runner, dest)  # its undo is registered: the bind exists
    names = tuple(m.archive_name for m in members)
    log.info("attached group %s: %s mounted under %s, staged as %s", req.session_id,
             ", ".join(devices), session_dir, ", ".join(names))
    return Attached(device=devices[0], mountpoint=session_dir, object_path=staging,
                    staging=staging, names=names, mountpoints=tuple(mountpoints))


def _intend_mount(held: Held | None, rel: str) -> None:
    if held is not None:
        held.intend_mount(rel)


def _unmount_member(runner: Runner, held: Held | None, rel: str, path: str) -> None:
    mount.unmount(runner, path)
    if held is not None:
        held.mount_gone(rel)


def _mount_step(runner: Runner, undo: UndoStack, held: Held | None, rel: str, path: str,
                make: Callable[[], None]) -> None:
    """Make one of a group's mounts; its undo is registered the moment it may exist."""
    try:
        make()
    except CommandTimeoutError:
        # the kernel may finish a mount whose mount(8) was killed
        undo.push(f"mount {path}", _unmount_member, runner, held, rel, path)
        raise
    except BaseException:
        if held is not None:
            held.mount_gone(rel)  # refused: nothing was mounted
        raise
    undo.push(f"mount {path}", _unmount_member, runner, held, rel, path)


def _log_in_and_wait(runner: Runner, req: PrepareAnswer, undo: UndoStack,
                     replacement_timeout: int, held: Held | None,
                     waiter: Callable[[], Any]) -> Any:
    """The node (made, or an existing session's reused), then, with the waiter's monitor
    listening, the login; what the waiter's ``wait`` gives (a disk, or one per member)."""
    target, portal = req.target_iqn, req.portal
    existing = iscsiadm.find_session(runner, target, portal)
    if existing is None:
        _make_node(runner, req, undo, replacement_timeout, held)
    else:
        log.info("already logged in to %s at %s (session %d): not logging in again",
                 target, portal, existing.sid)
        _intend(held, "node")
        undo.push(f"iscsi node {target}", _undone, held, "node",
                  iscsiadm.delete_node, runner, target, portal)
    with waiter() as listening:
        if existing is None:
            _login(runner, req, undo, held)
        else:
            _intend(held, "session")
            undo.push(f"iscsi session {target}", _undone, held, "session",
                      iscsiadm.logout, runner, target, portal)
        return listening.wait(lambda: iscsiadm.rescan(runner, target, portal))


def _begin(journal: ProxyJournal | None, req: PrepareAnswer, mountpoint: str,
           undo: UndoStack) -> Held | None:
    """Lock and record the attachment before anything is made (no journal: None)."""
    if journal is None:
        return None
    try:
        held = journal.begin(req.session_id, req.target_iqn, req.portal, mountpoint)
    except OSError as exc:
        raise ResourceError(f"cannot write the proxy's journal in {journal.dir}: "
                            f"{exc.strerror or exc}",
                            hint="the proxy runs as root; is /var/lib writable?") from None
    # pushed first, so it runs last: the record goes only if every undo struck its entry off
    undo.push(f"journal record of {req.session_id}", _finish, held)
    return held


def _finish(held: Held) -> None:
    if not held.finish():
        log.warning("session %s: %s still to undo; 'sanoffload proxy cleanup' will retry",
                    held.record.session_id, ", ".join(held.record.resources))


def _intend(held: Held | None, kind: str) -> None:
    if held is not None:
        held.intend(kind)


def _undone(held: Held | None, kind: str, fn: Callable[..., Any], *args: Any) -> None:
    """Run an undo step; once it succeeded, strike ``kind`` off the journal record."""
    fn(*args)
    if held is not None:
        held.gone(kind)


def _make_node(runner: Runner, req: PrepareAnswer, undo: UndoStack,
               replacement_timeout: int, held: Held | None = None) -> None:
    target, portal = req.target_iqn, req.portal
    offered = iscsiadm.discover(runner, portal)
    if not any(d.target == target for d in offered):
        raise CommandError(
            f"portal {portal} does not offer target {target} to this proxy "
            f"(offered: {', '.join(sorted({d.target for d in offered})) or 'nothing'})",
            hint="the agent may have released the session (lease expired), or its ACL "
                 "does not name this proxy's initiator (/etc/iscsi/initiatorname.iscsi)")
    _intend(held, "node")
    # registered first: a failed or killed "-o new" may still have written the record,
    # and deleting one that is not there is a no-op (exit 21)
    undo.push(f"iscsi node {target}", _undone, held, "node",
              iscsiadm.delete_node, runner, target, portal)
    iscsiadm.create_node(runner, target, portal)
    iscsiadm.set_chap(runner, target, portal, req.chap_user, req.chap_secret)
    iscsiadm.set_replacement_timeout(runner, target, portal, replacement_timeout)
    iscsiadm.set_startup_manual(runner, target, portal)


def _login(runner: Runner, req: PrepareAnswer, undo: UndoStack,
           held: Held | None = None) -> None:
    target, portal = req.target_iqn, req.portal
    _intend(held, "session")
    try:
        iscsiadm.login(runner, target, portal)
    except CommandTimeoutError:
        # iscsid carries on with a login whose iscsiadm was killed: it may yet succeed
        undo.push(f"iscsi session {target}", _undone, held, "session",
                  iscsiadm.logout, runner, target, portal)
        raise
    except BaseException:
        if held is not None:
            held.gone("session")  # refused: no session was made
        raise
    undo.push(f"iscsi session {target}", _undone, held, "session",
              iscsiadm.logout, runner, target, portal)


def _mount(runner: Runner, req: PrepareAnswer, device: str, undo: UndoStack,
           root: str, held: Held | None = None) -> str:
    _intend(held, "mount")
    mountpoint = mount.make_mountpoint(req.session_id, root)
    # "mount" is struck off only when the directory is gone: rmdir fails on a mount still there
    undo.push(f"mount point {mountpoint}", _undone, held, "mount",
              mount.remove_mountpoint, mountpoint)
    if os.path.ismount(mountpoint):
        current = mount.mounted_device(runner, mountpoint)
        if (current is not None and mount.is_same_device(current.source, device)
                and current.fstype == req.fstype and current.is_readonly):
            log.info("%s is already mounted read-only at %s: reusing it", device, mountpoint)
            undo.push(f"mount {mountpoint}", mount.unmount, runner, mountpoint)
            return mountpoint
        what = f"{current.source} ({current.fstype}, {','.join(current.options)})" \
            if current is not None else "something"
        raise ResourceError(f"{mountpoint} already has {what} mounted, not {device} read-only",
                            hint=f"umount {mountpoint} if it is a leftover")
    mount.verify_fstype(runner, device, req.fstype)
    try:
        mount.mount_readonly(runner, device, req.fstype, mountpoint, verify=False)
    except CommandTimeoutError:
        # the kernel may finish a mount whose mount(8) was killed
        undo.push(f"mount {mountpoint}", mount.unmount, runner, mountpoint)
        raise
    undo.push(f"mount {mountpoint}", mount.unmount, runner, mountpoint)
    return mountpoint


def detach(runner: Runner, req: PrepareAnswer, *,
           mount_root: str = mount.MOUNT_ROOT) -> None:
    """Undo whatever :func:`attach` left for this answer, without an UndoStack
    (after a crash): umount, rmdir, logout, delete the node record. Idempotent;
    goes on past failures and raises CleanupError naming all of them."""
    runner.add_secret(req.chap_secret)
    undo = UndoStack()
    target = req.target_iqn
    # pushed in attach's order, so unwinding runs them in reverse, as attach's undo would
    undo.push(f"iscsi node {target}", iscsiadm.delete_node, runner, target, req.portal)
    undo.push(f"iscsi session {target}", iscsiadm.logout, runner, target, req.portal)
    mountpoint = mount.mountpoint_for(req.session_id, mount_root)
    undo.push(f"mount point {mountpoint}", mount.remove_mountpoint, mountpoint)
    undo.push(f"mount {mountpoint}", mount.unmount, runner, mountpoint)
    with undo:
        pass
