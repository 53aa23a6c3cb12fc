"""``sanoffload proxy cleanup``: undo what a killed backup left on this proxy.

A proxy that dies outright (SIGKILL, OOM, power) runs no undo: its mount,
iSCSI session and node record stay. The journal (:mod:`sanoffload.proxy.journal`)
names them; for every record whose process is gone (its lock is free) this
runs, newest resource first::

    umount /run/sanoffload/mnt/SESSION; rmdir it      # "mount"
    iscsiadm -m session                               # "session": logged in still?
    iscsiadm -m node -T T -p P --logout               #   only then (iscsid may not run yet)
    iscsiadm -m node -T T -p P -o delete              # "node"

and removes the record once nothing is left in it. A consistency group's
record also names its mounts inside the session directory (``mounts``):
each is unmounted, newest first (the staging tree's bind mounts, then the
members' duplicates), before the directory's tree of empty directories goes::

    umount /run/sanoffload/mnt/SESSION/stage/srv/san/log   # "mounts", newest first
    umount /run/sanoffload/mnt/SESSION/stage/srv/san/db
    umount /run/sanoffload/mnt/SESSION/m1
    umount /run/sanoffload/mnt/SESSION/m0
    (empty directories and files of SESSION removed)       # "mount" Only what carries our
marks is touched: the targets and mount points named in our own records, and
directories in our own mount root (``/run/sanoffload/mnt``) no record claims;
never a node record, session or mount this proxy did not make. An attachment
whose process still holds its lock is skipped. A record that cannot be read
stops the cleanup before anything is changed: guessing what it held could
undo someone else's attachment.

Run at boot by ``sanoffload-proxy-cleanup.service`` (node records survive a
reboot; sessions and mounts do not, and their steps then find nothing).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..channel.messages import is_session_id as _is_session_id
from ..errors import CleanupError, SanoffloadError
from ..runner import Runner
from ..text import printable
from ..tools import iscsiadm
from ..undo import UndoStack
from . import mount
from .journal import Attachment, BrokenRecord, Held, ProxyJournal

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class Outcome:
    """One line of the cleanup's report."""

    session_id: str
    action: str  # removed | skipped | failed
    detail: str

    def __str__(self) -> str:
        return f"{self.action:<8} {printable(self.session_id)}: {printable(self.detail)}"


def _logout_if_logged_in(runner: Runner, target: str, portal: str) -> None:
    # -m session reads sysfs; --logout needs iscsid, which may not run yet at boot
    if iscsiadm.find_session(runner, target, portal) is not None:
        iscsiadm.logout(runner, target, portal)


def _unmount(runner: Runner, mountpoint: str) -> None:
    if os.path.ismount(mountpoint):
        mount.unmount(runner, mountpoint)
    mount.remove_mountpoint(mountpoint)


def _unmount_group(runner: Runner, held: Held) -> None:
    """A group's mounts, newest first, then its session directory (only empty things in it)."""
    rec = held.record
    errors: list[BaseException] = []
    for rel in reversed(list(rec.mounts)):
        try:
            # umount tolerates "not mounted": after a reboot there is nothing left
            mount.unmount(runner, os.path.join(rec.mountpoint, rel))
            held.mount_gone(rel)
        except (SanoffloadError, OSError) as exc:  # the others are still tried
            errors.append(exc)
    if errors:
        raise CleanupError(errors, context=f"unmounting the group of {rec.session_id}")
    mount.remove_tree(rec.mountpoint)


def _step(held: Held, kind: str, fn: Callable[..., Any], *args: Any) -> None:
    fn(*args)
    held.gone(kind)


def undo_attachment(runner: Runner, held: Held) -> list[BaseException]:
    """Undo every resource the record names (newest first); the failures, each logged."""
    rec = held.record
    undo = UndoStack()
    # pushed in the order attach makes them, so unwinding undoes the newest first
    if "node" in rec.resources:
        undo.push(f"iscsi node {rec.target}", _step, held, "node",
                  iscsiadm.delete_node, runner, rec.target, rec.portal)
    if "session" in rec.resources:
        undo.push(f"iscsi session {rec.target}", _step, held, "session",
                  _logout_if_logged_in, runner, rec.target, rec.portal)
    if rec.mounts or ("mount" in rec.resources and _is_group_dir(rec.mountpoint)):
        undo.push(f"group mounts under {rec.mountpoint}", _step, held, "mount",
                  _unmount_group, runner, held)
    elif "mount" in rec.resources:
        undo.push(f"mount {rec.mountpoint}", _step, held, "mount",
                  _unmount, runner, rec.mountpoint)
    return undo.unwind()


def _is_group_dir(path: str) -> bool:
    """A session directory holding a group's tree (mN, stage), not a mount point itself."""
    try:
        names = os.listdir(path)
    except OSError:
        return False
    return not os.path.ismount(path) and bool(names) and all(
        mount.MEMBER_DIR_RE.fullmatch(n) or n == mount.STAGE_DIR for n in names)


def _describe(rec: Attachment) -> str:
    what = {"mount": f"mount {rec.mountpoint}", "session": f"session to {rec.target}",
            "node": f"node record {rec.target} at {rec.portal}"}
    done = [f"mount {os.path.join(rec.mountpoint, m)}" for m in reversed(rec.mounts)]
    done += [what[k] for k in reversed(rec.resources)]
    return ", ".join(done) if done else "an empty record"


def cleanup(runner: Runner, journal: ProxyJournal | None = None, *,
            on_outcome: Callable[[Outcome], None] | None = None) -> list[Outcome]:
    """Undo every dead attachment in ``journal`` and sweep our unclaimed mount points.

    Returns what was done (``on_outcome`` hears each as it is done); raises
    CleanupError (after doing the rest) if a step failed, and before changing
    anything if a record cannot be read.
    """
    journal = journal or ProxyJournal()
    outcomes = _Outcomes(on_outcome)
    found = list(journal.scan())
    broken = [(path, why) for path, why in found if isinstance(why, BrokenRecord)]
    if broken:
        exc = CleanupError([BrokenRecord(f"{path}: {why}") for path, why in broken],
                           context="proxy cleanup: unreadable journal record(s), nothing "
                                   "was changed")
        exc.hint = "inspect the record(s), undo what they held by hand, then remove them"
        raise exc

    failures: list[BaseException] = []
    claimed: set[str] = set()
    for _path, rec in found:
        assert isinstance(rec, Attachment)
        claimed.add(rec.session_id)
        fd = journal.try_lock(rec.session_id)
        if fd is None:
            outcomes.append(Outcome(rec.session_id, "skipped",
                                    f"its backup (pid {rec.pid}) is still running"))
            continue
        # re-read under the lock: the holder we waited for may have changed or removed it
        try:
            current = journal.load(rec.session_id)
        except BrokenRecord as exc:
            os.close(fd)
            failures.append(exc)
            outcomes.append(Outcome(rec.session_id, "failed", str(exc)))
            continue
        if current is None:
            os.close(fd)
            continue
        held = Held(journal, current, fd)
        what = _describe(current)
        errors = undo_attachment(runner, held)
        held.finish()
        if errors:
            failures += errors
            outcomes.append(Outcome(rec.session_id, "failed",
                                    f"{'; '.join(str(e) for e in errors)} (left: "
                                    f"{', '.join(current.resources)})"))
        else:
            log.info("proxy cleanup: removed %s of session %s", what, rec.session_id)
            outcomes.append(Outcome(rec.session_id, "removed", what))

    _sweep(runner, journal, claimed, failures, outcomes)
    for sid in journal.stray_locks():
        fd = journal.try_lock(sid)
        if fd is not None:  # a process between taking its lock and writing its record keeps it
            journal.remove(sid)
            os.close(fd)
    if failures:
        raise CleanupError(failures, context="proxy cleanup")
    return list(outcomes)


class _Outcomes(list[Outcome]):
    """The report so far; each outcome is told to the listener as it is added."""

    def __init__(self, listener: Callable[[Outcome], None] | None) -> None:
        super().__init__()
        self.listener = listener

    def append(self, outcome: Outcome) -> None:
        super().append(outcome)
        if self.listener is not None:
            self.listener(outcome)


def _sweep(runner: Runner, journal: ProxyJournal, claimed: set[str],
           failures: list[BaseException], outcomes: list[Outcome]) -> None:
    """Mount points in our own root that no record claims (a proxy older than its journal)."""
    root = journal.mount_root
    try:
        names = sorted(os.listdir(root))
    except FileNotFoundError:
        return
    for name in names:
        path = os.path.join(root, name)
        if name in claimed or not _is_session_id(name) or os.path.islink(path) \
                or not os.path.isdir(path):
            continue
        fd = journal.try_lock(name)
        if fd is None:
            continue  # a live attach between its lock and its record
        try:
            if journal.load(name) is not None:
                continue  # recorded since the scan: a live one's
            mounted = os.path.ismount(path)
            _unmount(runner, path)
            journal.remove(name)
            outcomes.append(Outcome(name, "removed",
                                    f"{'mount' if mounted else 'empty mount point'} {path} "
                                    "(no journal record)"))
        except (SanoffloadError, OSError, ValueError) as exc:  # go on; reported at the end
            failures.append(exc)
            outcomes.append(Outcome(name, "failed", str(exc)))
        finally:
            os.close(fd)
