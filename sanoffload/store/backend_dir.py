"""The directory backend: a :class:`~sanoffload.store.backend.Backend` over a local directory.

A key ``a/b/c`` is the file ``<root>/a/b/c``. The root is the operator's and is
followed; below it nothing is: every directory on a key's way is opened with
``O_NOFOLLOW`` relative to its parent's descriptor (``openat``), so a symlink
planted for a directory or a key leads nowhere (:class:`RefusedError` for a
directory, :class:`IntegrityError` for the key itself), and a FIFO at a key
never blocks a read (``O_NONBLOCK``, then "not a regular file").

**Writing.** A writer streams to ``<key>.<random>.partial`` beside the key,
holding an exclusive ``flock`` on it from creation until it is published or
removed (the repository's live/dead writer rule: a partial whose lock can be
taken belongs to a dead writer). Commit fsyncs it, publishes it without
replacing anything (link, then unlink the partial name: :func:`_publish`) and
fsyncs the directory; ``put(exclusive=False)`` renames over the key instead (a
reader sees the old object or the new one). :meth:`DirBackend.stale_uploads`
names the partials whose lock is free and whose mtime is older than the cutoff.

This module also holds the file primitives the repository (:mod:`.repo`,
:mod:`.image`) is built from: one copy of each, taking an optional ``dir_fd``
so that paths (the repository) and descriptors (this backend) share them.
"""

from __future__ import annotations

import builtins
import errno
import fcntl
import logging
import os
import re
import secrets
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

from ..durable import read_bounded
from ..errors import IntegrityError, RefusedError, ResourceError, UsageError
from ..text import printable
from .backend import (
    _COMPONENT,
    MAX_KEY,
    RESERVED_SUFFIX,
    NotFound,
    ObjectInfo,
    Upload,
    check_key,
    check_prefix,
)

log = logging.getLogger(__name__)

#: a path (the repository) or a name relative to ``dir_fd`` (this backend)
PathArg = str | os.PathLike[str]

#: link(2) failing with these means "this filesystem has no hard links"
_NO_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS}
#: a directory below the root, opened without following a symlink
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: a file to read: no symlink followed, no FIFO waited on
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
#: a writer's partial: ``<leaf>.<16 hex>.partial``; stale_uploads also names the repository's
#: own (``<stamp>.tar.zst.partial``, ``<stamp>.json.<8 hex>.partial``)
_PARTIAL_RE = re.compile(r"(?P<leaf>[A-Za-z0-9_][A-Za-z0-9._-]{0,127}?)(?:\.[0-9a-f]{8,32})?"
                         + re.escape(RESERVED_SUFFIX))
#: an object's mode once committed: write-once, so read-only
OBJECT_MODE = 0o440


# -- the file primitives the repository shares --------------------------------------------------
def _unlink(path: PathArg, dir_fd: int | None = None) -> None:
    try:
        os.unlink(path, dir_fd=dir_fd)
    except FileNotFoundError:
        pass


def _write_all(fd: int, data: memoryview, *, full: str | None = None) -> None:
    """All of ``data`` to ``fd``; with ``full``, a full disk or quota is ResourceError(full)."""
    try:
        while data:
            data = data[os.write(fd, data):]
    except OSError as exc:
        if full is not None and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ResourceError(full) from exc
        raise


def _write_file(path: PathArg, data: bytes, mode: int, *, dir_fd: int | None = None) -> None:
    """A new file (never an existing name, never through a symlink) holding ``data``, fsynced."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode,
                 dir_fd=dir_fd)
    try:
        _write_all(fd, memoryview(data))
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        _unlink(path, dir_fd)
        raise
    os.close(fd)


def _open_locked(path: PathArg, *, dir_fd: int | None = None) -> int | None:
    """``path`` opened and exclusively flock-ed without waiting; None if a live holder has it.

    Never follows a symlink and never blocks on a FIFO. FileNotFoundError if
    there is nothing there.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


def _sweep_partial(path: PathArg, *, dir_fd: int | None = None, shown: object = None) -> None:
    """Remove a dead writer's partial file; ResourceError if its writer is alive.

    Call with the repository lock held: no new writer can take the name meanwhile.
    ``shown`` names the file in messages (default: ``path``).
    """
    shown = path if shown is None else shown
    try:
        fd = _open_locked(path, dir_fd=dir_fd)
    except FileNotFoundError:
        return
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        _unlink(path, dir_fd)  # a symlink under a partial's name: not ours, not followed
        return
    if fd is None:
        raise ResourceError(f"a backup of this id is being written ({os.path.basename(path)} "
                            "is held by a live put)",
                            hint="wait for it, or stop the put that holds it")
    try:
        here = os.stat(path, dir_fd=dir_fd, follow_symlinks=False)
        mine = os.fstat(fd)
        # the writer may have published and gone between open and lock: remove only what we hold
        if (here.st_dev, here.st_ino) == (mine.st_dev, mine.st_ino):
            log.warning("%s: removing a partial file whose writer is gone", shown)
            os.unlink(path, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    finally:
        os.close(fd)


def _publish(partial: PathArg, final: PathArg, *, dir_fd: int | None = None,
             shown: object = None) -> None:
    """Give ``partial`` its final name unless that name exists; the partial name goes.

    ``shown`` names the final file in messages (default: ``final``).
    """
    shown = final if shown is None else shown
    try:
        # a rename would silently replace a backup of the same second: a link cannot
        os.link(partial, final, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
    except FileExistsError:
        raise ResourceError(f"{shown} already exists: not replacing it") from None
    except OSError as exc:
        if exc.errno not in _NO_LINKS:
            raise
        # no hard links here: check, then rename (the O_EXCL partial name keeps two
        # writers of the same backup apart, so the gap only matters to a foreign writer)
        try:
            os.stat(final, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            os.rename(partial, final, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            return
        raise ResourceError(f"{shown} already exists: not replacing it") from None
    os.unlink(partial, dir_fd=dir_fd)


def _open_regular(path: PathArg, where: str, *,
                  dir_fd: int | None = None) -> tuple[int, os.stat_result]:
    """``path`` opened for reading and its stat: a regular file, or IntegrityError naming
    ``where``; FileNotFoundError if there is nothing there."""
    try:
        fd = os.open(path, _READ_FLAGS, dir_fd=dir_fd)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise IntegrityError(f"{where}: cannot open it: {exc.strerror or exc}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise IntegrityError(f"{where} is not a regular file")
    return fd, st


# -- the backend ----------------------------------------------------------------------------------
class DirBackend:
    """Write-once objects as files under ``root`` (an existing directory)."""

    def __init__(self, root: str | os.PathLike[str], *, dir_mode: int = 0o750) -> None:
        self.root = Path(os.path.abspath(root))
        #: directories made on a key's way (the repository's host and slug directories: 0750)
        self.dir_mode = dir_mode
        self.location = str(self.root)
        if not self.root.is_dir():
            raise UsageError(f"{self.root}: no such directory (create it first)")

    def _where(self, key: str) -> str:
        return f"{self.location}/{key}"

    # -- what only a directory can do (:class:`~sanoffload.store.backend.LocalFiles`) ---------
    def file(self, key: str) -> Path:
        """The file of ``key`` (for a tool that reads by path, and for messages)."""
        return self.root / check_key(key)

    @contextmanager
    def lock(self) -> Iterator[None]:
        """The store's lock: held while partials and reservations are made, grown, swept."""
        # the root directory itself is the lock: no file of ours to leave behind or to replace
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def children(self, prefix: str = "") -> Iterator[str]:
        """The subdirectories of ``prefix`` with valid key names, sorted; a symlink is none."""
        names = check_prefix(prefix).split("/")[:-1]
        fd = self._open_dirs(names, create=False)
        if fd is None:
            return
        try:
            with os.scandir(fd) as it:
                found = sorted(e.name for e in it if e.is_dir(follow_symlinks=False))
        finally:
            os.close(fd)
        yield from (n for n in found if _COMPONENT.fullmatch(n) and
                    not n.endswith(RESERVED_SUFFIX) and len(prefix) + len(n) <= MAX_KEY)

    # -- descriptors --------------------------------------------------------------------------
    def _open_dirs(self, names: builtins.list[str], *, create: bool) -> int | None:
        """The directory ``root/names...`` opened, following no symlink below the root; None
        if one is absent (and not ``create``); RefusedError if one is not a directory."""
        # the root is the operator's: followed
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        done: builtins.list[str] = []
        try:
            for name in names:
                if create:
                    try:
                        os.mkdir(name, self.dir_mode, dir_fd=fd)
                    except FileExistsError:
                        pass
                    else:
                        os.fsync(fd)  # the new directory survives a crash too
                done.append(name)
                try:
                    child = os.open(name, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    os.close(fd)
                    return None
                except OSError as exc:
                    if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                        raise
                    raise RefusedError(f"{self.location}/{'/'.join(done)} is not a directory "
                                       "(a symlink?): not following it") from None
                os.close(fd)
                fd = child
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _parent(self, key: str, *, create: bool = False) -> tuple[int | None, str]:
        """``(descriptor of the key's directory or None if absent, the key's last part)``."""
        *dirs, leaf = check_key(key).split("/")
        return self._open_dirs(dirs, create=create), leaf

    def _info(self, key: str, st: os.stat_result) -> ObjectInfo:
        return ObjectInfo(key=key, size=st.st_size, mtime=st.st_mtime)

    # -- reading ------------------------------------------------------------------------------
    def _open(self, key: str, version: str | None) -> tuple[int, os.stat_result]:
        if version is not None:
            check_key(key)
            raise NotFound(key, version)  # a directory keeps one version, named None
        parent, leaf = self._parent(key)
        if parent is None:
            raise NotFound(key)
        try:
            return _open_regular(leaf, self._where(key), dir_fd=parent)
        except FileNotFoundError:
            raise NotFound(key) from None
        finally:
            os.close(parent)

    def get(self, key: str, *, max_bytes: int, version: str | None = None) -> bytes:
        """The whole object; NotFound, or IntegrityError if it is bigger than ``max_bytes``."""
        fd, st = self._open(key, version)
        with open(fd, "rb") as f:
            # the file's size is what the disk holds, checked before anything is allocated
            if st.st_size > max_bytes:
                raise IntegrityError(f"{self._where(key)}: {st.st_size} bytes, more than the "
                                     f"{max_bytes} accepted")
            data = read_bounded(f, max_bytes)
        if len(data) > max_bytes:
            raise IntegrityError(f"{self._where(key)}: grew past {max_bytes} bytes while read")
        return data

    def open_read(self, key: str, *, version: str | None = None) -> BinaryIO:
        """A stream of the object's bytes; NotFound."""
        fd, _ = self._open(key, version)
        return open(fd, "rb")

    def stat(self, key: str) -> ObjectInfo | None:
        """The object's info, None if there is none; IntegrityError if something that is not
        a regular file (a symlink, a FIFO) holds its name."""
        parent, leaf = self._parent(key)
        if parent is None:
            return None
        try:
            st = os.stat(leaf, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            return None
        finally:
            os.close(parent)
        if not stat.S_ISREG(st.st_mode):
            raise IntegrityError(f"{self._where(key)} is not a regular file (a symlink?): "
                                 "not following it")
        return self._info(key, st)

    def versions(self, key: str, *, retention: bool = True) -> builtins.list[ObjectInfo]:
        """[the object] or []: a directory keeps no older versions."""
        info = self.stat(key)
        return [] if info is None else [info]

    def list(self, prefix: str = "", *, shallow: bool = False) -> Iterator[ObjectInfo]:
        """Every object under ``prefix`` (``shallow``: in its directory, none below), in key
        order; anything else found is logged, skipped."""
        names = check_prefix(prefix).split("/")[:-1]
        try:
            fd = self._open_dirs(names, create=False)
        except RefusedError as exc:
            log.warning("%s", exc)
            return
        if fd is None:
            return
        for dir_fd, directory, name in self._walk(fd, prefix, deep=not shallow):
            if name.endswith(RESERVED_SUFFIX):
                log.debug("%s: an upload in flight: not an object", self._where(directory + name))
                continue
            try:
                st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                continue  # deleted since the listing
            if stat.S_ISREG(st.st_mode):
                yield self._info(directory + name, st)

    def _walk(self, fd: int, prefix: str, *, deep: bool = True) -> Iterator[tuple[int, str, str]]:
        """``(directory's descriptor, its key prefix, name)`` of every regular file below
        directory ``fd`` (closed at the end; ``deep=False``: in it) named as an object or a
        partial, in key order; anything else is logged and skipped, and no symlink is
        followed."""
        try:
            with os.scandir(fd) as it:
                entries = [(e.name, e.is_dir(follow_symlinks=False),
                            e.is_file(follow_symlinks=False)) for e in it]
            # "a/..." sorts after "a.x": a directory's keys sort as its name plus "/"
            entries.sort(key=lambda e: e[0] + "/" if e[1] else e[0])
            for name, is_dir, is_file in entries:
                key = prefix + name
                if name.endswith(RESERVED_SUFFIX) and is_file:
                    yield fd, prefix, name
                elif not _COMPONENT.fullmatch(name) or len(key) > MAX_KEY \
                        or name.endswith(RESERVED_SUFFIX):
                    self._junk(key, "not a valid object name")
                elif is_dir:
                    if not deep:
                        continue  # a folder, not an object: not entered
                    try:
                        child = os.open(name, _DIR_FLAGS, dir_fd=fd)
                    except FileNotFoundError:
                        continue  # gone since the listing
                    except OSError as exc:
                        if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                            raise
                        self._junk(key, "replaced by a symlink while listed: not followed")
                        continue
                    yield from self._walk(child, key + "/")
                elif is_file:
                    yield fd, prefix, name
                else:
                    self._junk(key, "not a regular file (a symlink?): not followed")
        finally:
            os.close(fd)

    def _junk(self, key: str, why: str) -> None:
        # dot-led names are the repository's own bookkeeping (reservations, scratch)
        level = logging.DEBUG if key.rsplit("/", 1)[-1].startswith(".") else logging.WARNING
        log.log(level, "%s: %s: skipped", printable(self._where(key)), why)

    # -- writing ------------------------------------------------------------------------------
    def writer(self, key: str, *, size_hint: int | None = None) -> DirWriter:
        """A writer streaming to a flock-held partial beside the key (``size_hint`` unused)."""
        return DirWriter(self, key)

    def put(self, key: str, data: bytes, *, exclusive: bool = True) -> ObjectInfo:
        """Store ``data`` whole; ``exclusive``: ResourceError if the key exists, else replace."""
        with self.writer(key) as w:
            w.write(data)
            return w.commit(replace=not exclusive)

    def delete(self, key: str, *, version: str | None = None) -> None:
        """Remove the object (missing is fine; a version other than None is never there)."""
        parent, leaf = self._parent(key)
        if parent is None or version is not None:
            if parent is not None:
                os.close(parent)
            return
        try:
            try:
                st = os.stat(leaf, dir_fd=parent, follow_symlinks=False)
            except FileNotFoundError:
                return
            if stat.S_ISDIR(st.st_mode):
                raise RefusedError(f"{self._where(key)} is a directory: not removing it")
            os.unlink(leaf, dir_fd=parent)  # a symlink goes itself: nothing behind it is touched
            os.fsync(parent)
        finally:
            os.close(parent)

    # -- uploads ------------------------------------------------------------------------------
    def stale_uploads(self, older_than: float) -> Iterator[Upload]:
        """Partials whose writer is gone (their lock is free) and whose mtime is before
        ``older_than``."""
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        for dir_fd, directory, name in self._walk(fd, ""):
            if not name.endswith(RESERVED_SUFFIX):
                continue
            found = _PARTIAL_RE.fullmatch(name)
            key = directory + found["leaf"] if found else ""
            try:
                check_key(key)
            except UsageError:
                self._junk(directory + name, "not a partial file of this store")
                continue
            try:
                lock = _open_locked(name, dir_fd=dir_fd)
            except OSError:
                continue  # gone meanwhile, or not a file to judge
            if lock is None:
                continue  # a live writer holds it
            try:
                st = os.fstat(lock)
            finally:
                os.close(lock)  # before the yield: abort_upload takes it again
            if stat.S_ISREG(st.st_mode) and st.st_mtime < older_than:
                yield Upload(key=key, upload_id=directory + name, started=st.st_mtime)

    def abort_upload(self, upload: Upload) -> None:
        """Remove a dead writer's partial (gone already is fine); ResourceError if its writer
        is alive."""
        uid = upload.upload_id
        directory, _, name = uid.rpartition("/") if isinstance(uid, str) else ("", "", "")
        if not _PARTIAL_RE.fullmatch(name):
            raise UsageError(f"invalid upload id {uid!r:.80}")
        names = check_key(directory).split("/") if directory else []
        parent = self._open_dirs(names, create=False)
        if parent is None:
            return
        try:
            _sweep_partial(name, dir_fd=parent, shown=self._where(uid))
        finally:
            os.close(parent)


class DirWriter:
    """One object being written to a flock-held ``<key>.<random>.partial`` beside its key."""

    def __init__(self, backend: DirBackend, key: str) -> None:
        self.backend = backend
        self.key = key
        self.bytes = 0
        self._fd: int | None = None
        parent, leaf = backend._parent(key, create=True)
        if parent is None:  # made on the way, and removed at once by someone else
            raise ResourceError(f"{backend._where(key)}: its directory vanished as it was made")
        self._dir_fd: int | None = parent
        self._leaf = leaf
        try:
            self._fd, self.partial = self._create(parent, leaf)
        except BaseException:
            self._close()
            raise

    @staticmethod
    def _create(parent: int, leaf: str) -> tuple[int, str]:
        """A new partial, locked and still under its name (a sweeper may judge a fresh one
        stale between its creation and the lock: then it is gone, and another is made)."""
        for _ in range(3):
            name = f"{leaf}.{secrets.token_hex(8)}{RESERVED_SUFFIX}"
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0o600, dir_fd=parent)
            try:
                # waits only while a sweeper looks at it
                fcntl.flock(fd, fcntl.LOCK_EX)
                here = os.stat(name, dir_fd=parent, follow_symlinks=False)
                mine = os.fstat(fd)
            except FileNotFoundError:
                os.close(fd)
                continue
            except BaseException:
                os.close(fd)
                _unlink(name, parent)
                raise
            if (here.st_dev, here.st_ino) == (mine.st_dev, mine.st_ino):
                return fd, name
            os.close(fd)
        raise ResourceError("cannot keep a partial file: something removes them as they are made")

    def __enter__(self) -> DirWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.abort()

    def write(self, data: bytes | bytearray | memoryview, /) -> None:
        if self._fd is None:
            raise ValueError("object writer is closed")
        view = memoryview(data).cast("B")
        _write_all(self._fd, view, full=f"{self.backend._where(self.key)}: no space left")
        self.bytes += len(view)

    def commit(self, *, replace: bool = False) -> ObjectInfo:
        """fsync, publish (never over an existing object unless ``replace``: then an atomic
        rename), fsync the directory. Any failure removes the partial."""
        fd, parent = self._fd, self._dir_fd
        if fd is None or parent is None:
            raise ValueError("object writer is closed")
        try:
            os.fsync(fd)
            os.fchmod(fd, OBJECT_MODE)
            if replace:
                os.rename(self.partial, self._leaf, src_dir_fd=parent, dst_dir_fd=parent)
            else:
                _publish(self.partial, self._leaf, dir_fd=parent,
                         shown=self.backend._where(self.key))
            os.fsync(parent)
            info = self.backend._info(self.key, os.fstat(fd))
        except BaseException:
            self.abort()
            raise
        self._close()
        return info

    def abort(self) -> None:
        """Drop the partial (while still locked: a sweeper finds nothing); safe to repeat."""
        if self._fd is not None and self._dir_fd is not None:
            _unlink(self.partial, self._dir_fd)
        self._close()

    def _close(self) -> None:
        for name in ("_fd", "_dir_fd"):
            fd = getattr(self, name)
            if fd is not None:
                os.close(fd)
                setattr(self, name, None)
