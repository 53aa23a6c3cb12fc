"""``sanoffload mount``: the filesystem of an image backup, read-only, for single files.

What :func:`mount_image` makes, in this order (each undo registered the moment
its resource exists, so a failure half-way leaves nothing behind)::

    /run/sanoffload/mounts/HOST-SLUG-STAMP-RAND/         0700, the private directory
        state.json                                      what exists so far (for umount)
        server.log                                      the FUSE server's log
        fuse/                                           0700, the FUSE mount point
    python -m sanoffload.store.fusefile ... --mountpoint .../fuse   fuse/image: the volume
    losetup --read-only --find --show .../fuse/image    /dev/loopN
    mount -t ext4 -o ro,noload,nodev,nosuid,noexec /dev/loopN DIR
    mount -t xfs -o ro,norecovery,nouuid,nodev,nosuid,noexec /dev/loopN DIR

:func:`umount_image` finds the private directory whose state names DIR and
undoes it in reverse (``umount DIR``, ``losetup --detach``, ``umount .../fuse``,
the server stopped), going on past errors and reporting them all; the private
directory goes only when everything else has.

**Why a FUSE file and a loop device.** The kernel mounts filesystems from block
devices: the loop device gives it one over a file, and the file is our chunks
(re-hashed on every read, :class:`~sanoffload.store.imageread.ImageReader`). No
copy of the volume is made. The filesystem was frozen, not unmounted, when the
backup was taken: ``noload``/``norecovery`` keep the kernel from replaying its
journal (the loop device is read-only anyway), ``nouuid`` lets XFS mount a copy
of a filesystem that is mounted here too, and ``nodev,nosuid,noexec`` keep the
backed-up data from acting on this host.

**Nothing is followed or trusted blindly.** DIR must exist, be an empty
directory (not a symlink, not a mount point): a clear RefusedError otherwise,
with nothing changed. umount checks that DIR holds our loop device, that the
loop device still reads our image file, and that the server is the process it
started (pid and start time), before it touches any of them.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import select
import signal
import stat
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from ..errors import (
    CleanupError,
    CommandError,
    DeadlineError,
    IntegrityError,
    RefusedError,
    ResourceError,
)
from ..proxy import mount as fsmount
from ..requirements import Requirement
from ..runner import Runner
from ..text import printable
from ..tools import losetup
from ..undo import UndoStack
from .fusefile import IMAGE_NAME
from .imagemap import ChunkMap
from .repo import Backup, BackupId, Repository

REQUIRES: tuple[Requirement, ...] = (
    Requirement("image-mount", "mount, umount and blkid (for 'sanoffload mount')", roles=(),
                optional_for=("store",),
                fails_without="'sanoffload mount' cannot mount an image backup's filesystem",
                executables=("mount", "umount", "blkid")),
    Requirement("mfusepy", "mfusepy and libfuse (the image as a FUSE file)", roles=(),
                optional_for=("store",),
                fails_without="'sanoffload mount' cannot expose an image backup as a file",
                python=("mfusepy",)),
)

log = logging.getLogger(__name__)

MOUNTS_ROOT = "/run/sanoffload/mounts"
STATE_NAME = "state.json"
LOG_NAME = "server.log"
MAP_NAME = "image.map"
FUSE_DIR = "fuse"
STATE_VERSION = 1
#: the FUSE server mounts within this (it reads and checks the whole map first)
READY_TIMEOUT = 120.0
#: a stopped server has this long to go after SIGTERM, then as long again after SIGKILL
STOP_TIMEOUT = 10.0
#: the biggest state file read (it is ours, but in a directory anyone root can write)
MAX_STATE = 64 << 10
_WORKDIR_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,250}-[0-9a-f]{8}")


@dataclass
class MountState:
    """What one mount made so far; saved in the private directory after every step."""

    target: str
    backup: str
    workdir: str
    server_pid: int | None = None
    #: the server's start time (clock ticks since boot): a recycled pid is not ours
    server_start: int | None = None
    loop: str | None = None
    fstype: str | None = None
    mounted: bool = False
    version: int = STATE_VERSION

    @property
    def fuse_dir(self) -> str:
        return os.path.join(self.workdir, FUSE_DIR)

    @property
    def image(self) -> str:
        return os.path.join(self.fuse_dir, IMAGE_NAME)

    def save(self) -> None:
        """Write state.json atomically (a crash leaves the old state or the new, whole)."""
        path = os.path.join(self.workdir, STATE_NAME)
        tmp = f"{path}.{secrets.token_hex(4)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        with open(fd, "w") as f:
            json.dump(asdict(self), f, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, path)

    @classmethod
    def load(cls, workdir: str) -> MountState:
        """The state saved in ``workdir``; ValueError if it is not a state of ours."""
        fd = os.open(os.path.join(workdir, STATE_NAME),
                     os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        with open(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise ValueError("not a regular file")
            raw = json.loads(f.read(MAX_STATE + 1)[:MAX_STATE])
        if not isinstance(raw, dict) or raw.get("version") != STATE_VERSION:
            raise ValueError("not a mount state of this version")
        types: dict[str, tuple[type, ...]] = {
            "target": (str,), "backup": (str,), "workdir": (str,), "server_pid": (int, type(None)),
            "server_start": (int, type(None)), "loop": (str, type(None)),
            "fstype": (str, type(None)), "mounted": (bool,), "version": (int,)}
        known = {f.name for f in fields(cls)}
        if set(raw) != known:
            raise ValueError(f"unexpected keys {sorted(set(raw) ^ known)}")
        for name, allowed in types.items():
            if not isinstance(raw[name], allowed):
                raise ValueError(f"{name}: {raw[name]!r}")
        state = cls(**raw)
        if state.workdir != workdir:
            raise ValueError(f"names another directory: {state.workdir!r}")
        if state.loop is not None:
            losetup.check_loop(state.loop)
        return state


# -- the target directory -------------------------------------------------------

def check_target(target_dir: str | os.PathLike[str]) -> str:
    """``target_dir`` as an absolute path if it is an empty directory we may mount on;
    RefusedError (nothing changed) otherwise."""
    target = os.path.abspath(target_dir)
    shown = printable(target)
    try:
        st = os.lstat(target)
    except FileNotFoundError:
        raise RefusedError(f"{shown} does not exist", hint=f"mkdir {shown}") from None
    if stat.S_ISLNK(st.st_mode):
        raise RefusedError(f"{shown} is a symlink: give the directory itself")
    if not stat.S_ISDIR(st.st_mode):
        raise RefusedError(f"{shown} is not a directory")
    if os.path.ismount(target):
        raise RefusedError(f"{shown} is already a mount point")
    if os.listdir(target):
        raise RefusedError(f"{shown} is not empty: mounting there would hide what it holds")
    if _inside(target, MOUNTS_ROOT):
        raise RefusedError(f"{shown} is inside sanoffload's own {MOUNTS_ROOT}")
    return target


def _inside(path: str, root: str) -> bool:
    return os.path.commonpath([path, root]) == root


# -- the mount table --------------------------------------------------------------

def _unescape(field: str) -> str:
    # mountinfo writes space, tab, newline and backslash as \ooo
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mounts(mountinfo: str = "/proc/self/mountinfo") -> dict[str, tuple[str, str]]:
    """Mount point -> (fstype, source) of the topmost mount at each point."""
    out: dict[str, tuple[str, str]] = {}
    with open(mountinfo, encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            head, sep, tail = line.rstrip("\n").partition(" - ")
            parts, rest = head.split(" "), tail.split(" ")
            if not sep or len(parts) < 5 or len(rest) < 2:
                continue
            out[_unescape(parts[4])] = (rest[0], _unescape(rest[1]))
    return out


# -- the server process -----------------------------------------------------------

def process_start(pid: int) -> int | None:
    """Process ``pid``'s start time (clock ticks since boot), or None if there is none."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # the command name (field 2) may hold spaces and ')': fields count from the last ')'
    after = raw[raw.rfind(b")") + 2:].split()
    return int(after[19]) if len(after) > 19 else None


def stop_process(pid: int, start: int | None, *, timeout: float = STOP_TIMEOUT) -> bool:
    """SIGTERM process ``pid`` if it is the one that started at ``start``, and wait for it
    to go (SIGKILL after ``timeout``); False if it was already gone."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return False
    try:
        # checked after the open: the descriptor now holds this very process
        if start is None or process_start(pid) != start:
            return False
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                signal.pidfd_send_signal(pidfd, sig)
            except ProcessLookupError:
                return True
            ready, _, _ = select.select([pidfd], [], [], timeout)
            if ready:
                return True
            log.warning("process %d still there %.0fs after %s", pid, timeout, sig.name)
        raise DeadlineError(f"process {pid} (the FUSE server) did not exit after SIGKILL")
    finally:
        os.close(pidfd)


def _package_parent() -> str:
    # the server runs `python -m sanoffload.store.fusefile`: this very package, installed or not
    return str(Path(__file__).resolve().parents[2])


def _log_tail(path: str, lines: int = 5) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 4096))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return "no log"
    tail = [ln for ln in text.splitlines() if ln.strip()][-lines:]
    return printable(" | ".join(tail)) if tail else "no output"


def start_server(runner: Runner, undo: UndoStack, state: MountState, chunks_root: str,
                 chunk_map: ChunkMap, *, timeout: float = READY_TIMEOUT) -> None:
    """Start the FUSE server on ``state.fuse_dir`` and wait until it serves the image."""
    map_path = os.path.join(state.workdir, MAP_NAME)
    fd = os.open(map_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    with open(fd, "wb") as f:
        f.write(chunk_map.to_bytes())
    log_path = os.path.join(state.workdir, LOG_NAME)
    argv = [sys.executable, "-m", "sanoffload.store.fusefile", "--chunks", chunks_root,
            "--map", map_path, "--map-sha256", chunk_map.sha256(),
            "--mountpoint", state.fuse_dir, "--log", log_path]
    ready_r, ready_w = os.pipe()
    try:
        try:
            server = runner.spawn([*argv, "--ready-fd", str(ready_w)], pass_fds=[ready_w],
                                  env={"PYTHONPATH": _package_parent()})
        finally:
            os.close(ready_w)  # the server holds the only write end: its death is our EOF
        state.server_pid, state.server_start = server.pid, process_start(server.pid)
        undo.push(f"stop the FUSE server (pid {server.pid})", stop_process, server.pid,
                  state.server_start)
        state.save()
        ready, _, _ = select.select([ready_r], [], [], timeout)
        if not ready:
            raise DeadlineError(f"the FUSE server did not mount within {timeout:.0f}s: "
                                f"{_log_tail(log_path)}")
        if os.read(ready_r, 1) != b"1":
            raise CommandError(f"the FUSE server failed: {_log_tail(log_path)}",
                               argv=[printable(a) for a in argv])
    finally:
        os.close(ready_r)
    undo.push(f"umount {state.fuse_dir}", unmount_fuse, runner, state.fuse_dir)
    st = os.stat(state.image)
    if not stat.S_ISREG(st.st_mode) or st.st_size != chunk_map.size:
        raise IntegrityError(f"{state.image}: {st.st_size} bytes, the map says {chunk_map.size}")


# -- mount and umount -------------------------------------------------------------

def manifest_fstype(backup: Backup) -> str | None:
    """The filesystem type the image backup's manifest records, or None."""
    image: Any = getattr(backup.manifest, "image", None)
    if image is None:
        image = backup.manifest.extra.get("image")
    fstype = image.get("fstype") if isinstance(image, dict) else getattr(image, "fstype", None)
    return fstype if isinstance(fstype, str) and fstype else None


def load_backup(repo: Repository, bid: BackupId) -> tuple[Backup, ChunkMap]:
    """Image backup ``bid`` and its map, checked against its manifest (the store's
    ``image_backup`` refuses a tar backup; ``load_map`` checks the map whole)."""
    from .image import image_backup, load_map

    backup = image_backup(repo, bid)
    return backup, load_map(repo, backup)


def mount_image(repo: Repository, backup_id: str | BackupId, target_dir: str, *,
                runner: Runner | None = None, root: str = MOUNTS_ROOT,
                ready_timeout: float = READY_TIMEOUT) -> MountState:
    """Mount image backup ``backup_id``'s filesystem read-only at ``target_dir``."""
    bid = backup_id if isinstance(backup_id, BackupId) else BackupId.parse(backup_id)
    target = check_target(target_dir)
    backup, chunk_map = load_backup(repo, bid)
    return mount_map(runner or repo.command_runner(), str(repo.root), chunk_map, target,
                     label=str(bid), fstype=manifest_fstype(backup), root=root,
                     ready_timeout=ready_timeout)


def mount_map(runner: Runner, chunks_root: str, chunk_map: ChunkMap, target_dir: str, *,
              label: str, fstype: str | None = None, root: str = MOUNTS_ROOT,
              ready_timeout: float = READY_TIMEOUT) -> MountState:
    """Mount the filesystem in the image ``chunk_map`` describes (chunks in
    ``chunks_root``'s ``chunks/``) read-only at ``target_dir``; ``label`` names it."""
    target = check_target(target_dir)
    if fstype is not None:
        fsmount.check_fstype(fstype)
    os.makedirs(root, mode=0o700, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", label).strip("-.")[:200] or "image"
    workdir = os.path.join(root, f"{slug}-{secrets.token_hex(4)}")
    with UndoStack() as undo:
        os.mkdir(workdir, 0o700)
        undo.push(f"remove {workdir}", _remove_workdir, workdir)
        state = MountState(target=target, backup=label, workdir=workdir, fstype=fstype)
        state.save()
        os.mkdir(state.fuse_dir, 0o700)
        start_server(runner, undo, state, chunks_root, chunk_map, timeout=ready_timeout)
        state.loop = losetup.attach_readonly(runner, state.image)
        undo.push(f"losetup --detach {state.loop}", losetup.detach, runner, state.loop)
        state.save()
        if state.fstype is None:
            found = fsmount.probe_fstype(runner, state.loop)
            if not found:
                raise RefusedError(f"the image of {printable(label)} holds no filesystem "
                                   "blkid recognises: nothing to mount")
            state.fstype = fsmount.check_fstype(found)
        fsmount.mount_readonly(runner, state.loop, state.fstype, target)
        undo.push(f"umount {target}", fsmount.unmount, runner, target)
        state.mounted = True
        state.save()
        undo.commit()
    log.info("mounted %s (%s) read-only at %s", label, state.fstype, target)
    return state


def find_state(target_dir: str, *, root: str = MOUNTS_ROOT) -> MountState:
    """The state of the mount at ``target_dir``; RefusedError if sanoffload made none there."""
    target = os.path.abspath(target_dir)
    try:
        names = sorted(os.listdir(root))
    except FileNotFoundError:
        names = []
    for name in names:
        workdir = os.path.join(root, name)
        if not _WORKDIR_RE.fullmatch(name) or not os.path.isdir(workdir) \
                or os.path.islink(workdir):
            continue
        try:
            state = MountState.load(workdir)
        except (OSError, ValueError) as exc:
            log.warning("%s: unreadable mount state: %s", printable(workdir), exc)
            continue
        if state.target == target:
            return state
    raise RefusedError(f"no image backup of sanoffload is mounted at {printable(target)}")


def umount_image(target_dir: str, *, runner: Runner, root: str = MOUNTS_ROOT) -> MountState:
    """Undo :func:`mount_image` at ``target_dir`` in reverse, past errors (CleanupError
    names them all; the state stays for a retry)."""
    state = find_state(target_dir, root=root)
    failures: list[BaseException] = []

    def step(label: str, fn: Callable[[], object]) -> None:
        try:
            fn()
        except Exception as exc:  # go on: every other step must still run
            log.error("umount: %s failed: %s", label, exc)
            exc.add_note(f"while undoing: {label}")
            failures.append(exc)

    step(f"umount {state.target}", lambda: _umount_target(runner, state))
    step(f"losetup --detach {state.loop}", lambda: _detach(runner, state))
    step(f"umount {state.fuse_dir}", lambda: _umount_fuse(runner, state))
    if state.server_pid is not None:
        pid, start = state.server_pid, state.server_start
        step(f"stop the FUSE server (pid {pid})", lambda: stop_process(pid, start))
    if failures:
        raise CleanupError(failures, context=f"umount {printable(state.target)}")
    _remove_workdir(state.workdir)
    log.info("unmounted %s", state.target)
    return state


def _umount_target(runner: Runner, state: MountState) -> None:
    here = mounts().get(state.target)
    if here is None:
        return
    if state.loop is None or here[1] != state.loop:
        raise ResourceError(f"{printable(state.target)} holds {printable(here[1])}, not this "
                            "backup's loop device: not unmounting it")
    fsmount.unmount(runner, state.target)


def _detach(runner: Runner, state: MountState) -> None:
    if state.loop is None:
        return
    backing = losetup.backing_file(state.loop)
    if backing is None:
        return
    if backing != state.image:
        log.warning("%s now reads %s, not %s: left alone", state.loop, printable(backing),
                    state.image)
        return
    losetup.detach(runner, state.loop)


def _umount_fuse(runner: Runner, state: MountState) -> None:
    here = mounts().get(state.fuse_dir)
    if here is not None and here[0].startswith("fuse"):
        unmount_fuse(runner, state.fuse_dir)


def unmount_fuse(runner: Runner, fuse_dir: str) -> None:
    """``umount FUSE_DIR``; if busy, ``umount --lazy FUSE_DIR``.

    A detached loop device lets go of its file when its last opener closes, and
    the kernel may finish that a moment after ``losetup --detach`` returns: the
    FUSE mount is then briefly busy. Nothing else can use it (the directory is
    root's, 0700), so a lazy unmount is safe: the kernel drops it once released.
    """
    try:
        fsmount.unmount(runner, fuse_dir)
    except CommandError as exc:
        if "busy" not in exc.stderr:
            raise
        log.warning("%s is busy a moment after the loop device's detach: lazy unmount",
                    fuse_dir)
        runner.run(["umount", "--lazy", fuse_dir])


def _remove_workdir(workdir: str) -> None:
    """Remove the private directory: our files and the (unmounted) FUSE mount point."""
    if not os.path.lexists(workdir):
        return
    fuse_dir = os.path.join(workdir, FUSE_DIR)
    if os.path.ismount(fuse_dir):
        raise ResourceError(f"{fuse_dir} is still mounted: not removing {workdir}")
    for name in os.listdir(workdir):
        path = os.path.join(workdir, name)
        if name == FUSE_DIR:
            os.rmdir(path)
        elif name in (STATE_NAME, LOG_NAME, MAP_NAME) or name.endswith(".tmp"):
            os.unlink(path)
        else:
            raise ResourceError(f"{path}: not a file of ours: not removing {workdir}")
    os.rmdir(workdir)

