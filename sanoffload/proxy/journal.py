"""The proxy's journal: one small JSON record per attachment, so a killed proxy's leftovers
can be found and undone (``sanoffload proxy cleanup``).

An attachment leaves three kinds of resource on the proxy::

    node     the iSCSI node record in /etc/iscsi/nodes     survives a reboot
    session  the iSCSI session (and its disk)               gone after a reboot
    mount    the read-only mount under /run/sanoffload/mnt  gone after a reboot

Because node records outlive a reboot, the journal lives on persistent storage
(``/var/lib/sanoffload/proxy``), not under /run. Each resource is written down
*before* it is made (every undo step is idempotent, so an intent that never
became a resource costs one harmless "nothing there"), and struck off once its
undo succeeded; the record goes when nothing is left in it.

Live or dead is told by a lock, not a pid: the attaching process holds an
exclusive ``flock`` on ``SESSION.lock`` for as long as it is attached. The
kernel drops it when the process dies, SIGKILL included, and a reused pid
cannot fake it. Cleanup takes the same lock before touching anything, so it
never undoes what a running backup holds.

A consistency group's record also lists, in ``mounts``, every mount it makes
inside its session directory (``m0``, ``m1``… a member's duplicate;
``stage/srv/san/db``… a member's object bound into the staging tree), each
written down before it is made and struck off once unmounted; ``mount`` then
stands for the session directory itself. A single path's record has no
``mounts`` key and is what it always was.

Records are replaced atomically (write, fsync, rename, fsync the directory)
and checked on reading like anything else from disk: owned by us, not
writable by others, names that pass the same checks the attach used.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..channel.messages import is_session_id as _is_session_id
from ..durable import replace_json
from ..errors import ResourceError
from ..tools import iscsiadm
from . import mount

JOURNAL_DIR = "/var/lib/sanoffload/proxy"
#: the resources an attachment can hold, in the order they are made
KINDS = ("node", "session", "mount")
_MAX_RECORD = 64 * 1024
#: a group's mounts: a duplicate and a bind mount per member (messages.MAX_MEMBERS is 8)
MAX_MOUNTS = 16


class BrokenRecord(ValueError):
    """A journal record that cannot be trusted (unreadable, malformed, or not ours)."""


@dataclass
class Attachment:
    """What one attach made (or meant to make), for its undo after a crash."""

    session_id: str
    target: str
    portal: str
    mountpoint: str
    pid: int = field(default_factory=os.getpid)
    created: float = field(default_factory=time.time)
    resources: list[str] = field(default_factory=list)
    #: a group's mounts inside ``mountpoint`` (its session directory), in the order made
    mounts: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "session_id": self.session_id, "target": self.target, "portal": self.portal,
            "mountpoint": self.mountpoint, "pid": self.pid, "created": self.created,
            "resources": list(self.resources)}
        if self.mounts:  # only a group's: a single path's record is unchanged
            data["mounts"] = list(self.mounts)
        return data

    @classmethod
    def from_dict(cls, data: Any, mount_root: str) -> Attachment:
        """Check a record read from disk; BrokenRecord says what is wrong with it."""
        if not isinstance(data, dict):
            raise BrokenRecord("not a JSON object")
        want: dict[str, type | tuple[type, ...]] = {
            "session_id": str, "target": str, "portal": str, "mountpoint": str, "pid": int,
            "created": (int, float), "resources": list}
        for key, typ in want.items():
            value = data.get(key)
            if not isinstance(value, typ) or isinstance(value, bool):
                raise BrokenRecord(f"field {key!r} is missing or not a {typ}")
        mounts = data.get("mounts", [])
        if not isinstance(mounts, list) or len(mounts) > MAX_MOUNTS:
            raise BrokenRecord(f"field 'mounts' is not a list of at most {MAX_MOUNTS}")
        try:
            for rel in mounts:
                mount.check_group_mount(rel)
        except ValueError as exc:
            raise BrokenRecord(str(exc)) from None
        if len(set(mounts)) != len(mounts):
            raise BrokenRecord("field 'mounts' names a mount twice")
        unknown = set(data) - set(want) - {"mounts"}
        if unknown:
            raise BrokenRecord(f"unknown field(s) {sorted(unknown)}")
        sid = data["session_id"]
        if not _is_session_id(sid):
            raise BrokenRecord(f"invalid session id {sid!r}")
        try:
            iscsiadm.check_target(data["target"])
            iscsiadm.check_portal(data["portal"])
        except ValueError as exc:
            raise BrokenRecord(str(exc)) from None
        # the only mount point a record may name is the session's own under our root
        if data["mountpoint"] != mount.mountpoint_for(sid, mount_root):
            raise BrokenRecord(f"mount point {data['mountpoint']!r} is not "
                               f"{mount.mountpoint_for(sid, mount_root)}")
        res = data["resources"]
        if any(r not in KINDS for r in res) or len(set(res)) != len(res):
            raise BrokenRecord(f"invalid resources {res!r}")
        return cls(session_id=sid, target=data["target"], portal=data["portal"],
                   mountpoint=data["mountpoint"], pid=data["pid"],
                   created=float(data["created"]), resources=list(res),
                   mounts=list(mounts))


class Held:
    """An attachment's record and the lock that says its process is alive."""

    def __init__(self, journal: ProxyJournal, record: Attachment, lock_fd: int) -> None:
        self.journal = journal
        self.record = record
        self._fd: int | None = lock_fd

    def intend(self, kind: str) -> None:
        """Write ``kind`` down before making it."""
        if kind not in KINDS:
            raise ValueError(f"unknown resource kind {kind!r}")
        if kind not in self.record.resources:
            self.record.resources.append(kind)
            self.journal.save(self.record)

    def gone(self, kind: str) -> None:
        """``kind`` was undone: strike it off."""
        if kind in self.record.resources:
            self.record.resources.remove(kind)
            self.journal.save(self.record)

    def intend_mount(self, rel: str) -> None:
        """Write a group's mount ``rel`` (inside the session directory) down before making it."""
        mount.check_group_mount(rel)
        if rel not in self.record.mounts:
            self.record.mounts.append(rel)
            self.journal.save(self.record)

    def mount_gone(self, rel: str) -> None:
        """A group's mount ``rel`` was unmounted: strike it off."""
        if rel in self.record.mounts:
            self.record.mounts.remove(rel)
            self.journal.save(self.record)

    def finish(self) -> bool:
        """Remove the record if nothing is left in it; let go of the lock either way.

        True if removed. A record still naming a resource stays for ``proxy cleanup``.
        """
        removed = False
        try:
            if not self.record.resources and not self.record.mounts:
                self.journal.remove(self.record.session_id)
                removed = True
        finally:
            self.release()
        return removed

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None


class ProxyJournal:
    """Attachment records ``DIR/SESSION.json`` and their locks ``DIR/SESSION.lock``."""

    def __init__(self, directory: str | os.PathLike[str] | None = None, *,
                 mount_root: str | None = None) -> None:
        # the defaults are read when called, so tests can point them elsewhere
        self.dir = Path(directory if directory is not None else JOURNAL_DIR)
        self.mount_root = mount_root if mount_root is not None else mount.MOUNT_ROOT

    def _path(self, session_id: str, suffix: str) -> Path:
        if not _is_session_id(session_id):
            raise ValueError(f"invalid session id {session_id!r}")
        return self.dir / f"{session_id}{suffix}"

    # -- the lock ---------------------------------------------------------
    def try_lock(self, session_id: str) -> int | None:
        """An fd holding ``SESSION.lock`` exclusively, or None while another process holds it."""
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = self._path(session_id, ".lock")
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    return None
                raise
            # the holder before us may have removed the file after we opened it: a lock on
            # an unlinked inode guards nothing, so take the one now at the path
            try:
                same = os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return fd
            os.close(fd)

    # -- records ------------------------------------------------------------
    def begin(self, session_id: str, target: str, portal: str, mountpoint: str) -> Held:
        """Lock and record a new attachment (nothing made yet).

        ResourceError if another live process is attached to this session.
        """
        fd = self.try_lock(session_id)
        if fd is None:
            raise ResourceError(f"another sanoffload process is attached to session "
                                f"{session_id} (its lock {self._path(session_id, '.lock')} "
                                "is held)")
        record = Attachment(session_id, target, portal, mountpoint)
        try:
            old = self.load(session_id)
        except BrokenRecord:
            old = None  # ours to replace: we hold the session's lock
        if old is not None:
            # a dead attempt of this same session left these: they stay ours to undo
            record.resources = list(old.resources)
            record.mounts = list(old.mounts)
        held = Held(self, record, fd)
        try:
            self.save(record)
        except BaseException:
            held.release()
            raise
        return held

    def save(self, record: Attachment) -> None:
        """Atomically replace the record on disk (and make the rename durable)."""
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        replace_json(self._path(record.session_id, ".json"), record.to_dict())

    def load(self, session_id: str) -> Attachment | None:
        """The record of ``session_id``, None if there is none; BrokenRecord if unusable."""
        return self._read(self._path(session_id, ".json"))

    def _read(self, path: Path) -> Attachment | None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise BrokenRecord(f"cannot open: {exc.strerror or exc}") from None
        try:
            st = os.fstat(fd)
            # only what this user wrote can say what to log out and unmount
            if not stat.S_ISREG(st.st_mode):
                raise BrokenRecord("not a regular file")
            if st.st_uid != os.geteuid():
                raise BrokenRecord(f"owned by uid {st.st_uid}, not {os.geteuid()}")
            if st.st_mode & 0o022:
                raise BrokenRecord(f"writable by others (mode {stat.filemode(st.st_mode)})")
            raw = os.read(fd, _MAX_RECORD + 1)
        finally:
            os.close(fd)
        if len(raw) > _MAX_RECORD:
            raise BrokenRecord(f"larger than {_MAX_RECORD} bytes")
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError) as exc:
            raise BrokenRecord(f"not valid JSON: {exc}") from None
        record = Attachment.from_dict(data, self.mount_root)
        if path.name != f"{record.session_id}.json":
            raise BrokenRecord(f"names session {record.session_id}, not {path.stem}")
        return record

    def scan(self) -> Iterator[tuple[Path, Attachment | BrokenRecord]]:
        """Every record file with what it holds (or why it cannot be used), by name."""
        if not self.dir.is_dir():
            return
        for path in sorted(self.dir.glob("*.json")):
            try:
                record = self._read(path)
            except BrokenRecord as exc:
                yield path, exc
                continue
            if record is not None:
                yield path, record

    def remove(self, session_id: str) -> None:
        """Remove the record and its lock file (the caller holds the lock)."""
        self._path(session_id, ".json").unlink(missing_ok=True)
        self._path(session_id, ".lock").unlink(missing_ok=True)

    def stray_locks(self) -> list[str]:
        """Session ids with a lock file but no record (a kill between the two files)."""
        if not self.dir.is_dir():
            return []
        return sorted(p.stem for p in self.dir.glob("*.lock")
                      if not p.with_suffix(".json").exists() and _is_session_id(p.stem))
