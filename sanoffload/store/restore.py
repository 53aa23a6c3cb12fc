"""Restore: give back exactly what was at the freeze, and nothing outside the target.

Order of work, each step before anything is written::

    1. the archive's size and sha256 against the manifest    (IntegrityError, exit 12)
    2. tar --list --verbose --numeric-owner --quoting-style=c ... --index-file=LISTING
       every member checked (:func:`check_members`)          (RefusedError, exit 3)
    3. tar --extract ... --directory=TARGET                   (see sanoffload.tools.tar)

A damaged archive is therefore refused before the target is touched; an
extraction that fails anyway (disk full, interrupted) into a target that was
empty or absent empties it again, so a half-restored tree never stays behind
looking like a restore.

The member check refuses an archive holding a member that is absolute, has a
``..`` component (``./a/../../b`` included), sits below a member that is not a
directory (a symlink made earlier in the archive, then written through), or is
a hard link to anything but an earlier member. GNU tar defends itself too (it
strips ``/`` and ``../``, delays outward symlinks); the store refuses such an
archive outright, since sanoffload never makes one.

Selected paths are matched against the archive's own spelling (``./etc/x``)
and passed to tar as a NUL-separated list. A selected hard link whose data
sits under a name outside the selection (tar stores it once, under the name
archived first) brings that name along, or tar could not make the link.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ..errors import (CommandError, CommandNotFoundError, CommandTimeoutError, IntegrityError,
                      RefusedError, UsageError)
from ..tools import tar
from ..tools.tar import DIRECTORY, HARDLINK, Member
from .repo import CHUNK, Backup, BackupId, Repository, read_timeout

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
        if key in wanted and key not in found:
            # as the archive spells it ("./etc/x"): tar matches names literally
            found[key] = member.name.rstrip(b"/") or member.name
    missing = [wanted[k] for k in wanted if k not in found]
    if missing:
        raise UsageError("not in the backup: " + ", ".join(f"'{tar.show(p)}'" for p in missing))
    return Checked(count, tuple(found[k] for k in wanted), tuple(link_targets.values()))


def _target_state(target: Path) -> str:
    """``absent``, ``empty`` or ``full``; RefusedError if it is not a directory."""
    try:
        st = os.lstat(target)
    except FileNotFoundError:
        return "absent"
    if not stat.S_ISDIR(st.st_mode):
        raise RefusedError(f"restore target {target} exists and is not a directory")
    with os.scandir(target) as it:
        return "full" if next(it, None) is not None else "empty"


def _empty(target: Path) -> None:
    """Remove everything below ``target`` (symlinks themselves, never what they point to)."""
    with os.scandir(target) as it:
        for entry in it:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)


@dataclass(frozen=True)
class Restored:
    backup: BackupId
    target: Path
    members: int
    selected: tuple[bytes, ...]
    #: restored too: the first names of hard-linked files selected under another name
    link_targets: tuple[bytes, ...] = ()


def restore(repo: Repository, backup_id: BackupId | str,
            target: str | bytes | os.PathLike[str],
            paths: Sequence[bytes | str] = (), *, force: bool = False,
            timeout: float | None = None) -> Restored:
    """Extract a backup (or ``paths`` of it, each with everything below) into ``target``.

    ``target`` is made if absent; an existing non-empty one is refused unless
    ``force`` (then files in it are replaced). Checks the archive first (see
    the module docstring); nothing is written when a check fails.
    """
    backup = repo.get(backup_id)
    dest = Path(os.fsdecode(os.path.abspath(target)))
    select = [os.fsencode(p) for p in paths]
    repo_root = os.path.realpath(repo.root)
    real = os.path.realpath(dest)
    if real == repo_root or real.startswith(repo_root.rstrip("/") + "/"):
        raise RefusedError(f"restore target {dest} is inside the repository")
    state = _target_state(dest)
    if state == "full" and not force:
        raise RefusedError(f"restore target {dest} is not empty (--force replaces what "
                           "the backup holds)")
    m = backup.manifest
    limit = timeout if timeout is not None else read_timeout(m.archive_bytes, m.source_bytes)
    repo.check_sha256(backup)
    runner = repo.command_runner()
    with repo.scratch() as tmp:
        listing = Path(tmp) / "members"
        try:
            tar.list_to_file(runner, backup.archive, listing, timeout=limit)
        except (CommandNotFoundError, CommandTimeoutError):
            raise
        except CommandError as exc:
            raise IntegrityError(f"{backup.id}: cannot list the archive: {exc}") from None
        try:
            checked = check_members((mem for _, mem in tar.read_listing(listing)), select)
        except ValueError as exc:
            raise RefusedError(f"{backup.id}: {exc}") from None
        files_from = None
        if checked.selected:
            files_from = Path(tmp) / "selected"
            tar.write_files_from(files_from, checked.names)
        if state == "absent":
            dest.mkdir(parents=True, mode=0o700)
        try:
            tar.extract(runner, backup.archive, dest, timeout=limit, files_from=files_from)
        except BaseException as exc:
            if state != "full":
                # it was empty: make it so again rather than leave half a tree
                log.error("restore of %s into %s failed: removing what was extracted",
                          backup.id, dest)
                try:
                    _empty(dest)
                    if state == "absent":
                        dest.rmdir()
                except OSError as cleanup:  # the restore's own error is the one to show
                    exc.add_note(f"{dest} could not be emptied again: {cleanup}")
            raise
    log.info("restored %s into %s (%d members%s)", backup.id, dest, checked.members,
             f", {len(checked.selected)} selected" if checked.selected else "")
    return Restored(backup.id, dest, checked.members, checked.selected, checked.link_targets)


def stream_out(repo: Repository, backup_id: BackupId | str, out: BinaryIO) -> Backup:
    """Write the stored ``.tar.zst`` to ``out``, CHUNK at a time, after checking it.

    The sha256 is checked before the first byte goes out, and again over what
    went out: if the file changed in between, IntegrityError (the reader must
    then discard what it got; the exit code says so).
    """
    backup = repo.get(backup_id)
    repo.check_sha256(backup)
    h = hashlib.sha256()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with open(backup.archive, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
            out.write(view[:n])
    out.flush()
    if h.hexdigest() != backup.manifest.sha256:
        raise IntegrityError(f"{backup.id}: the archive changed while it was sent")
    return backup
