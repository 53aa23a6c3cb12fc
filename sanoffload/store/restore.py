"""Restore: give back exactly what was at the freeze, and nothing outside the target.

Order of work, each step before anything is written into the target::

    1. the archive's size and sha256 against the manifest    (IntegrityError, exit 12)
    2. tar --list --verbose --numeric-owner --quoting-style=c ...   read through a pipe;
       every member checked (:func:`check_members`)          (RefusedError, exit 3)
       device nodes refused unless ``devices``               (RefusedError, exit 3)
    3. tar --extract ... --directory=/proc/self/fd/N          into a private staging
       directory inside the target (see below)
    4. set-uid/set-gid bits cleared on files unless ``setid``
    5. each staged entry moved into the target with no-follow checks, the
       staging directory removed

The member check refuses an archive holding a member that is absolute, has a
``..`` component (``./a/../../b`` included), sits below a member that is not a
directory (a symlink made earlier in the archive, then written through), or is
a hard link to anything but an earlier member. GNU tar defends itself too (it
strips ``/`` and ``../``, delays outward symlinks); the store refuses such an
archive outright, since sanoffload never makes one. The listing comes from
tar's stdout, never a file: it is whole, or the restore fails.

Why staging, and why it is safe against races. tar extracting straight into
the target follows a symlink it finds there (``TARGET/x -> /etc`` and a member
``./x/file`` writes ``/etc/file``, as root), and checking the target first
leaves a window before tar runs. So tar never sees the target:

* ``TARGET/.sanoffload-restore-XXXX`` (0700, ours: checked with fstat on a
  descriptor opened with O_NOFOLLOW) holds ``root/``, the directory tar
  extracts into. tar gets it as ``/proc/self/fd/N``: the kernel resolves that
  to the very directory we opened, whatever anyone renames or plants by its
  path meanwhile. Nobody else can reach anything below the 0700 directory
  (``root/`` itself takes the archive's ``./`` mode at tar's end, a level
  below), so device nodes and set-id files there are never exposed, and
  what tar wrote is exactly what the archive holds.
* Moving into place works on directory descriptors only: every directory of
  the target that is entered is opened with O_NOFOLLOW|O_DIRECTORY relative to
  its parent's descriptor, and entries move with ``renameat``, which never
  follows the last component (a symlink at the destination is replaced, not
  written through; a file's inode is replaced, never written into). A
  symlink swapped in after a check makes the open fail, it is not followed.
  So nothing is written except into directories reached from the target
  without following a symlink.
* The target directory's own mode, owner, ACL, xattrs and times are ours:
  0700 when restore creates it, unchanged when it exists (the archive's ``./``
  member lands on ``root/`` and is dropped with it).
* When extraction fails (disk full, a damaged block, a signal), only the
  staging directory is removed: the target is left as it was, ``--force``
  or not. A failure while moving into a target that was empty or absent
  empties it again.

With ``--force``, an existing directory where the backup has one is merged
into (its contents kept unless the backup holds the same names; its
attributes set from the backup); a file or symlink is replaced; a non-empty
directory where the backup has a file is left alone and reported
(ResourceError, exit 7) rather than deleted. Staging needs the target's
filesystem to hold the restored data while old files are still there.

Selected paths are matched against the archive's own spelling (``./etc/x``)
and passed to tar as a NUL-separated list. A selected hard link whose data
sits under a name outside the selection (tar stores it once, under the name
archived first) brings that name along, or tar could not make the link.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import secrets
import shutil
import stat
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from ..errors import (
    CommandError,
    CommandNotFoundError,
    CommandTimeoutError,
    IntegrityError,
    RefusedError,
    ResourceError,
    UsageError,
)
from ..text import printable
from ..tools import tar
from ..tools.tar import BLOCKDEV, CHARDEV, DIRECTORY, HARDLINK, Member
from .repo import Backup, BackupId, Repository, read_timeout

log = logging.getLogger(__name__)


def member_parts(name: bytes) -> tuple[bytes, ...]:
    """The components of a member name, ``.`` and empty ones dropped (``./a//b/`` -> a, b).

    Raises RefusedError for an absolute name or a ``..`` component.
    """
    if name.startswith(b"/"):
        raise RefusedError(f"archive member has an absolute name: {tar.show(name)}")
    parts = tuple(p for p in name.split(b"/") if p not in (b"", b"."))
    if b".." in parts:
        raise RefusedError(f"archive member has a '..' component: {tar.show(name)}")
    return parts


@dataclass(frozen=True)
class Checked:
    """What :func:`check_members` found: the member count and the names to extract."""

    members: int
    #: archive names of the selected paths, in the order asked (empty: everything)
    selected: tuple[bytes, ...] = ()
    #: members outside the selection that selected hard links need (they hold the data)
    link_targets: tuple[bytes, ...] = ()
    #: device nodes (c, b) among what is extracted, as the archive spells them
    devices: tuple[bytes, ...] = ()
    #: directory members extracted ("etc/ssl": parts joined, no "./"); a directory tar makes
    #: only to hold a selected path is not one, and its attributes are not the backup's
    dirs: frozenset[bytes] = field(default_factory=frozenset)

    @property
    def names(self) -> tuple[bytes, ...]:
        """What to hand ``tar --extract --files-from``."""
        return self.selected + self.link_targets


def _selected(parts: tuple[bytes, ...], wanted: dict[bytes, bytes]) -> bool:
    return any(b"/".join(parts[:depth]) in wanted for depth in range(1, len(parts) + 1))


def check_members(members: Iterable[Member], select: Sequence[bytes] = ()) -> Checked:
    """Refuse an archive any member of which could write outside the target.

    ``members`` in archive order. ``select``: paths relative to the backup's
    root to restore (each must be a member; UsageError otherwise). Memory grows
    with the number of members (their names), never with the data.
    """
    wanted: dict[bytes, bytes] = {}
    for path in select:
        if not path or path.startswith(b"/"):
            raise UsageError(f"restore path '{tar.show(path)}' must be relative to the backup's "
                             "root (like 'etc/app.conf')")
        try:
            wanted[b"/".join(member_parts(path))] = path
        except RefusedError as exc:
            raise UsageError(f"restore path: {exc.message}") from None
    if b"" in wanted:
        raise UsageError("restore path names the backup's root: leave the paths out instead")
    found: dict[bytes, bytes] = {}
    link_targets: dict[bytes, bytes] = {}
    # names that were ever something other than a directory: nothing may go below them
    not_dirs: set[bytes] = set()
    dirs: set[bytes] = set()
    devices: list[tuple[tuple[bytes, ...], bytes]] = []
    count = 0
    for member in members:
        count += 1
        parts = member_parts(member.name)
        key = b"/".join(parts)
        if not parts and member.kind != DIRECTORY:
            raise RefusedError(f"archive member '{member.shown}' would replace the target itself")
        for depth in range(1, len(parts)):
            prefix = b"/".join(parts[:depth])
            if prefix in not_dirs:
                raise RefusedError(f"archive member '{member.shown}' would be written through "
                                   f"'{tar.show(prefix)}', which the archive made a symlink "
                                   "or file earlier")
        if member.kind == HARDLINK:
            if member.link is None:
                raise RefusedError(f"archive member '{member.shown}': hard link without target")
            try:
                target = b"/".join(member_parts(member.link))
            except RefusedError as exc:
                raise RefusedError(f"archive member '{member.shown}': hard link target: "
                                   f"{exc.message}") from None
            if target not in not_dirs:
                raise RefusedError(f"archive member '{member.shown}' is a hard link to "
                                   f"'{tar.show(member.link)}', which is not an earlier member")
            if wanted and _selected(parts, wanted) and not _selected(tuple(target.split(b"/")),
                                                                     wanted):
                # tar stores a hard-linked file's data once, under the name archived first:
                # without that member, "Cannot hard link to ..."
                link_targets.setdefault(target, member.link)
        if member.kind != DIRECTORY:
            not_dirs.add(key)
        elif parts and (not wanted or _selected(parts, wanted)):
            dirs.add(key)
        if member.kind in (CHARDEV, BLOCKDEV):
            devices.append((parts, member.name))
        if key in wanted and key not in found:
            # as the archive spells it ("./etc/x"): tar matches names literally
            found[key] = member.name.rstrip(b"/") or member.name
    missing = [wanted[k] for k in wanted if k not in found]
    if missing:
        raise UsageError("not in the backup: " + ", ".join(f"'{tar.show(p)}'" for p in missing))
    extracted_devices = tuple(
        name for parts, name in devices
        if not wanted or _selected(parts, wanted) or b"/".join(parts) in link_targets)
    return Checked(count, tuple(found[k] for k in wanted), tuple(link_targets.values()),
                   extracted_devices, frozenset(dirs))


_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: the staging directory's name inside the target (random: the archive cannot aim at it)
STAGING_PREFIX = ".sanoffload-restore-"


def _target_state(target: bytes) -> str:
    """``absent``, ``empty`` or ``full``; RefusedError if it is not a directory."""
    try:
        st = os.lstat(target)
    except FileNotFoundError:
        return "absent"
    except OSError as exc:  # a component that is a file, a loop of symlinks, no access
        raise RefusedError(f"restore target {printable(target)} cannot be made: "
                           f"{exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise RefusedError(f"restore target {printable(target)} exists and is not a directory")
    with os.scandir(target) as it:
        return "full" if next(it, None) is not None else "empty"


def _open_dir(name: str | bytes, dir_fd: int | None, shown: bytes) -> int:
    """A directory's descriptor, never through a symlink (RefusedError if it is one)."""
    try:
        return os.open(name, _OPEN_DIR, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise RefusedError(f"restore: {printable(shown)} is not a directory (a symlink?): "
                               "restore never writes through a symlink") from None
        raise


def _private_dir(parent: int, name: str, shown: bytes) -> int:
    """Make ``name`` (0700) in ``parent`` and open it, checking it is the one just made."""
    os.mkdir(name, 0o700, dir_fd=parent)
    fd = _open_dir(name, parent, shown)
    st = os.fstat(fd)
    if st.st_uid != os.geteuid() or st.st_mode & 0o077:
        os.close(fd)
        raise RefusedError(f"restore: {printable(shown)} was replaced while being made")
    return fd


#: below this much room (or with no inode left) a failed extraction is reported as disk full
FULL_BELOW = 1 << 20


def _space_left(fd: int) -> str | None:
    """What is missing on the filesystem holding ``fd``, if it is (nearly) full."""
    st = os.fstatvfs(fd)
    if st.f_bfree * st.f_frsize < FULL_BELOW:
        return (f"no space left on device (ENOSPC): {st.f_bfree * st.f_frsize} bytes free "
                "on the target's filesystem")
    if st.f_files and st.f_ffree == 0:
        return "no space left on device (ENOSPC): no free inodes on the target's filesystem"
    return None


def _clear_setid(root: int) -> int:
    """Clear set-uid/set-gid on every file below ``root`` (private: nobody else can reach it).

    Directories keep set-gid (it only makes new files inherit the group). Returns the count.
    """
    cleared = 0
    for _path, _dirs, files, dfd in os.fwalk(".", dir_fd=root):
        for name in files:
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            if stat.S_ISREG(st.st_mode) and st.st_mode & (stat.S_ISUID | stat.S_ISGID):
                os.chmod(name, stat.S_IMODE(st.st_mode) & ~(stat.S_ISUID | stat.S_ISGID),
                         dir_fd=dfd)
                cleared += 1
    return cleared


_ACL_XATTRS = ("system.posix_acl_access", "system.posix_acl_default")


def _copy_dir_attributes(src: int, dst: int, st: os.stat_result) -> None:
    """Give the existing directory ``dst`` the staged one's owner, xattrs, ACLs, mode, times."""
    os.fchown(dst, st.st_uid, st.st_gid)
    names = set(os.listxattr(src))
    for name in names:
        os.setxattr(dst, name, os.getxattr(src, name))
    for name in _ACL_XATTRS:
        if name not in names:
            try:
                os.removexattr(dst, name)
            except OSError as exc:  # none there, or no ACL support: nothing to remove
                if exc.errno not in (errno.ENODATA, errno.EOPNOTSUPP):
                    raise
    os.fchmod(dst, stat.S_IMODE(st.st_mode))
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))


@dataclass
class _Merge:
    """Moves a staged tree into the target, on descriptors only (see the module docstring)."""

    dirs: frozenset[bytes]
    target: bytes
    conflicts: list[bytes] = field(default_factory=list)

    def move(self, src: int, dst: int, prefix: bytes = b"") -> None:
        for name in sorted(os.listdir(src)):
            key = prefix + os.fsencode(name)
            shown = os.path.join(self.target, key)
            s_st = os.stat(name, dir_fd=src, follow_symlinks=False)
            try:
                d_st: os.stat_result | None = os.stat(name, dir_fd=dst, follow_symlinks=False)
            except FileNotFoundError:
                d_st = None
            try:
                if d_st is not None and stat.S_ISDIR(s_st.st_mode) \
                        and stat.S_ISDIR(d_st.st_mode):
                    self._into(name, src, dst, key, s_st)
                    continue
                if d_st is not None and stat.S_ISDIR(d_st.st_mode):
                    try:
                        os.rmdir(name, dir_fd=dst)
                    except OSError as exc:
                        if exc.errno != errno.ENOTEMPTY:
                            raise
                        self.conflicts.append(key)
                        continue
                elif d_st is not None and stat.S_ISDIR(s_st.st_mode):
                    os.unlink(name, dir_fd=dst)  # rename puts no directory over a file
                # never follows the last component: a symlink there is replaced, not used
                os.rename(name, name, src_dir_fd=src, dst_dir_fd=dst)
                if stat.S_ISDIR(s_st.st_mode):
                    # some filesystems stamp a directory whose ".." changed
                    os.utime(name, ns=(s_st.st_atime_ns, s_st.st_mtime_ns), dir_fd=dst,
                             follow_symlinks=False)
            except OSError as exc:
                raise ResourceError(f"restore: cannot move {printable(shown)} into place: "
                                    f"{exc.strerror}") from None

    def _into(self, name: str, src: int, dst: int, key: bytes, st: os.stat_result) -> None:
        sub_src = _open_dir(name, src, key)
        try:
            sub_dst = _open_dir(name, dst, os.path.join(self.target, key))
            try:
                self.move(sub_src, sub_dst, key + b"/")
                if key in self.dirs:
                    _copy_dir_attributes(sub_src, sub_dst, st)
            finally:
                os.close(sub_dst)
        finally:
            os.close(sub_src)


def _remove_all(fd: int, keep: str | None = None) -> None:
    """Remove every entry in the directory ``fd`` (symlinks themselves, never their targets)."""
    for name in os.listdir(fd):
        if name == keep:
            continue
        if stat.S_ISDIR(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode):
            shutil.rmtree(name, dir_fd=fd)
        else:
            os.unlink(name, dir_fd=fd)


@contextmanager
def _fds() -> Iterator[list[int]]:
    opened: list[int] = []
    try:
        yield opened
    finally:
        for fd in reversed(opened):
            os.close(fd)


@dataclass(frozen=True)
class Restored:
    backup: BackupId
    target: Path
    members: int
    selected: tuple[bytes, ...]
    #: restored too: the first names of hard-linked files selected under another name
    link_targets: tuple[bytes, ...] = ()
    #: files whose set-uid/set-gid bits were cleared (``setid`` False)
    setid_cleared: int = 0
    #: an incremental level: the backups applied, level 0 first (empty: one archive)
    chain: tuple[BackupId, ...] = ()


def restore(repo: Repository, backup_id: BackupId | str,
            target: str | bytes | os.PathLike[str],
            paths: Sequence[bytes | str] = (), *, force: bool = False,
            timeout: float | None = None, devices: bool = False,
            setid: bool = False) -> Restored:
    """Extract a backup (or ``paths`` of it, each with everything below) into ``target``.

    ``target`` is made (0700) if absent; an existing non-empty one is refused
    unless ``force`` (then what the backup holds replaces what is there).
    ``devices``: restore device nodes (otherwise an archive holding any among
    what is restored is refused). ``setid``: keep set-uid/set-gid bits on
    files (otherwise cleared). Checks the archive first (see the module
    docstring); nothing is written when a check fails.
    """
    backup = repo.get(backup_id)
    dest = os.fsencode(os.path.abspath(os.fspath(target)))
    shown = printable(dest)
    select = [os.fsencode(p) for p in paths]
    real = os.path.realpath(dest)
    if repo.local is not None:
        repo_root = os.fsencode(os.path.realpath(repo.local.root))
        if real == repo_root or real.startswith(repo_root.rstrip(b"/") + b"/"):
            raise RefusedError(f"restore target {shown} is inside the repository")
    state = _target_state(dest)
    if state == "full" and not force:
        raise RefusedError(f"restore target {shown} is not empty (--force replaces what "
                           "the backup holds)")
    links = repo.chain(backup) if backup.manifest.is_incremental else [backup]
    if backup.manifest.is_incremental and select:
        raise UsageError(f"{backup.id} is level {backup.manifest.tar_level} of an incremental "
                         "chain: selected paths are not restored from a chain yet; restore "
                         "the whole backup into an empty directory and copy from there")
    runner = repo.command_runner()
    levels: list[_Level] = []
    for link in links:
        m = link.manifest
        limit = timeout if timeout is not None else read_timeout(m.archive_bytes,
                                                                 m.source_bytes)
        seen: list[tuple[tuple[bytes, ...], bool]] = []
        try:
            # one read hashes the archive and lists it: nothing is extracted unless both pass
            with repo.archive_fd(link, verify=True) as fd:
                listing = tar.list_members(runner, "-", timeout=limit, stdin=fd)
                checked = check_members(_recording(listing, seen), select)
        except (CommandNotFoundError, CommandTimeoutError):
            raise
        except CommandError as exc:
            raise IntegrityError(f"{link.id}: cannot list the archive: {exc}") from None
        except ValueError as exc:
            raise RefusedError(f"{link.id}: {exc}") from None
        if checked.devices and not devices:
            names = ", ".join(f"'{tar.show(n)}'" for n in checked.devices[:3])
            more = f" and {len(checked.devices) - 3} more" if len(checked.devices) > 3 else ""
            raise RefusedError(f"{link.id}: archive holds device nodes ({names}{more}): pass "
                               "--devices to restore them")
        levels.append(_Level(link, checked, limit, seen))
    _plan_removals(levels)
    # every level lists every directory: the last one's are the restored tree's
    checked = levels[-1].checked
    if state == "absent":
        try:
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            os.mkdir(dest, 0o700)
        except OSError as exc:
            raise RefusedError(f"restore target {shown} cannot be made: {exc.strerror}") from None
    staging = STAGING_PREFIX + secrets.token_hex(8)
    cleared = 0
    merge = _Merge(checked.dirs, dest)
    done = False
    with _fds() as fds:
        try:
            fds.append(tfd := _open_dir(dest, None, dest))
            if state == "absent" and os.fstat(tfd).st_uid != os.geteuid():
                raise RefusedError(f"restore target {shown} was replaced while being made")
            fds.append(sfd := _private_dir(tfd, staging, os.path.join(dest, staging.encode())))
            fds.append(rfd := _private_dir(sfd, "root", os.path.join(dest, staging.encode())))
        except BaseException as exc:
            if fds[1:]:
                shutil.rmtree(staging, dir_fd=fds[0], ignore_errors=True)
            if state == "absent":
                _rmdir_quietly(dest)
            if isinstance(exc, OSError):
                raise RefusedError(f"restore target {shown}: cannot make the staging directory "
                                   f"there: {exc.strerror}") from None
            raise
        try:
            try:
                files_from = None
                if checked.selected:
                    files_from = f"/proc/self/fd/{sfd}/selected"
                    tar.write_files_from(files_from, checked.names)
                try:
                    for level in levels:
                        for key in level.remove:
                            _remove_staged(rfd, key)
                        with repo.archive_fd(level.backup) as fd:
                            # a pipe (an object store) by descriptor: tar reads it as a file
                            tar.extract(runner, level.backup.archive if fd is None
                                        else f"/proc/self/fd/{fd}", f"/proc/self/fd/{rfd}",
                                        timeout=level.timeout, files_from=files_from,
                                        pass_fds=(rfd, sfd) if fd is None else (rfd, sfd, fd),
                                        incremental=level.backup.manifest.is_incremental)
                except CommandError as exc:
                    # tar says "Wrote only 2048 of 10240 bytes" for a short write: the
                    # filesystem, still holding what was staged, tells the cause
                    full = _space_left(rfd)
                    if full:
                        raise ResourceError(f"restore into {shown} failed: {full}: "
                                            f"{exc.message}") from exc
                    raise
                if not setid:
                    cleared = _clear_setid(rfd)
            except BaseException:
                # nothing reached the target: it stays as it was, --force or not
                log.error("restore of %s into %s failed: the target is unchanged",
                          backup.id, shown)
                raise
            try:
                merge.move(rfd, tfd)
                done = True
            except BaseException as exc:
                if state != "full":
                    # it was empty: make it so again rather than leave half a tree
                    log.error("restore of %s into %s failed: removing what was moved there",
                              backup.id, shown)
                    try:
                        _remove_all(tfd, keep=staging)
                    except OSError as cleanup:  # the restore's own error is the one to show
                        exc.add_note(f"{shown} could not be emptied again: {cleanup}")
                raise
        finally:
            try:
                shutil.rmtree(staging, dir_fd=tfd)
            except OSError as exc:
                log.error("restore: could not remove %s: %s",
                          printable(os.path.join(dest, staging.encode())), exc)
            if state == "absent" and not done and not os.listdir(tfd):
                _rmdir_quietly(dest)
    if merge.conflicts:
        names = ", ".join(f"'{tar.show(k)}'" for k in merge.conflicts[:5])
        raise ResourceError(f"restored {backup.id} into {shown} except {len(merge.conflicts)} "
                            f"path(s) where a non-empty directory holds what the backup has as "
                            f"a file, left as they were: {names}")
    log.info("restored %s into %s (%d members%s%s)", backup.id, shown, checked.members,
             f", {len(checked.selected)} selected" if checked.selected else "",
             f", set-id bits cleared on {cleared} files" if cleared else "")
    return Restored(backup.id, Path(os.fsdecode(dest)), checked.members, checked.selected,
                    checked.link_targets, cleared,
                    tuple(link.id for link in links) if len(links) > 1 else ())


@dataclass
class _Level:
    """One archive a restore extracts (a chain has several, level 0 first)."""

    backup: Backup
    checked: Checked
    timeout: float
    #: every member's name parts and whether it is a directory, in archive order
    members: list[tuple[tuple[bytes, ...], bool]]
    #: names left as non-directories by earlier levels that this level makes a directory
    #: or writes below: removed from staging before it is extracted
    remove: list[bytes] = field(default_factory=list)


def _recording(members: Iterable[Member],
               out: list[tuple[tuple[bytes, ...], bool]]) -> Iterator[Member]:
    for member in members:
        out.append((member_parts(member.name), member.kind == DIRECTORY))
        yield member


def _plan_removals(levels: Sequence[_Level]) -> None:
    """What each level of a chain needs gone from staging first.

    Each archive is checked alone; across levels, a name an earlier level left as a
    symlink (or file) may be a directory in a later one. tar would go through such a
    symlink (it takes what a symlink to a directory points at as the directory), and an
    outward symlink is real once the earlier tar has ended. So that name is removed
    from staging before the later level is extracted: nothing is ever written through it.
    """
    non_dirs: set[bytes] = set()
    for level in levels:
        remove: set[bytes] = set()
        made_dirs: set[bytes] = set()
        made_files: set[bytes] = set()
        for parts, is_dir in level.members:
            for depth in range(1, len(parts) + 1):
                prefix = b"/".join(parts[:depth])
                if prefix in non_dirs and (depth < len(parts) or is_dir):
                    remove.add(prefix)
            key = b"/".join(parts)
            (made_dirs if is_dir else made_files).add(key)
        level.remove = sorted(remove, key=lambda k: (k.count(b"/"), k))
        non_dirs = (non_dirs - made_dirs) | made_files


def _remove_staged(root: int, key: bytes) -> None:
    """Unlink the non-directory ``key`` below the staging root ``root`` (descriptors only,
    no symlink followed); nothing if it or a parent is gone or is a directory."""
    parts = key.split(b"/")
    fds: list[int] = []
    try:
        cur = root
        for part in parts[:-1]:
            try:
                cur = os.open(part, _OPEN_DIR, dir_fd=cur)
            except OSError:
                return  # a parent that is not a directory is removed first, as its own name
            fds.append(cur)
        try:
            st = os.stat(parts[-1], dir_fd=cur, follow_symlinks=False)
        except FileNotFoundError:
            return
        if not stat.S_ISDIR(st.st_mode):
            os.unlink(parts[-1], dir_fd=cur)
    finally:
        for fd in fds:
            os.close(fd)


def _rmdir_quietly(path: bytes) -> None:
    try:
        os.rmdir(path)
    except OSError as exc:
        log.error("restore: could not remove %s again: %s", printable(path), exc)


def stream_out(repo: Repository, backup_id: BackupId | str, out: BinaryIO) -> Backup:
    """Write the stored ``.tar.zst`` to ``out``, CHUNK at a time, after checking it.

    The sha256 is checked before the first byte goes out, and again over what
    went out: if the file changed in between, IntegrityError (the reader must
    then discard what it got; the exit code says so).
    """
    backup = repo.get(backup_id)
    repo.check_sha256(backup)
    h = hashlib.sha256()
    with repo.open_archive(backup) as f:
        for piece in repo.archive_pieces(backup, f):
            h.update(piece)
            out.write(piece)
    out.flush()
    if h.hexdigest() != backup.manifest.sha256:
        raise IntegrityError(f"{backup.id}: the archive changed while it was sent")
    return backup
