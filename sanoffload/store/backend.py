"""The seam under the repository: a store of named, write-once objects.

A repository (archives, maps, chunks, state files, manifests) is kept on a
:class:`Backend`. Two implement it: a directory (:mod:`sanoffload.store.backend_dir`,
local or behind ``store serve``) and S3 object storage such as Ceph RGW
(:mod:`sanoffload.store.backend_s3`). The repository above the seam owns the
layout, the commit order (data objects first, the manifest last with
``exclusive=True``: the commit) and every check of what it reads back; a backend
only stores bytes under names and never interprets them.

The contract, the same on both (``tests/unit/test_backend_contract.py`` runs it
on each; the host tier on a real RGW):

- **Keys** are relative, ``/``-separated ASCII names checked by :func:`check_key`
  before they reach a path or a URL: no ``..``, no empty or dot-led component,
  nothing outside ``[A-Za-z0-9._-]``, no name ending in :data:`RESERVED_SUFFIX`
  (the directory backend's in-flight files), bounded length.
- **Write once.** :meth:`Backend.put` with ``exclusive=True`` (the default) and a
  :class:`ObjectWriter`'s commit never replace an existing object: they raise
  :class:`~sanoffload.errors.ResourceError`. Until commit, nothing is visible
  under the key; an aborted or crashed writer leaves at most an upload that
  :meth:`Backend.stale_uploads` reports and :meth:`Backend.abort_upload` removes.
- **Bounded reads.** :meth:`Backend.get` takes the most it will accept and
  raises :class:`~sanoffload.errors.IntegrityError` when the object is bigger:
  a size is never trusted to allocate.
- **Versions.** S3 buckets with versioning (required for Object Lock) keep every
  write; :meth:`Backend.versions` lists them oldest first, and a key with more
  than one is a sign of tampering that the repository reports. A directory has
  one version (``version`` is None).
- **Deletion** is the maintenance role's: a proxy's S3 credentials are refused
  it by the bucket policy (:class:`~sanoffload.errors.AuthError`), and an object
  under retention cannot be removed before ``retain_until`` (also AuthError).

Missing objects raise :class:`NotFound`, which is not a
:class:`~sanoffload.errors.SanoffloadError`: whether a missing object is an
integrity failure (a listed backup's archive) or an ordinary answer (a chunk
not yet stored) is the caller's to say.
"""

from __future__ import annotations

import builtins
import re
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from ..errors import UsageError

#: the directory backend's in-flight suffix: never a key, so never listed as an object
RESERVED_SUFFIX = ".partial"

MAX_KEY = 512
_COMPONENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")


class NotFound(LookupError):
    """No object (or no such version of it) under this key."""

    def __init__(self, key: str, version: str | None = None) -> None:
        self.key = key
        self.version = version
        super().__init__(key if version is None else f"{key} (version {version})")


def check_key(key: object) -> str:
    """``key`` if it is a valid object name; UsageError otherwise (never a path outside)."""
    if not isinstance(key, str) or not key or len(key) > MAX_KEY:
        raise UsageError(f"invalid object key {key!r:.80}: 1 to {MAX_KEY} characters")
    parts = key.split("/")
    if any(not _COMPONENT.fullmatch(p) for p in parts) or key.endswith(RESERVED_SUFFIX):
        raise UsageError(f"invalid object key {key!r:.80}: each '/'-separated part is "
                         "[A-Za-z0-9_][A-Za-z0-9._-]*, and no key ends in "
                         f"{RESERVED_SUFFIX!r}")
    return key


def check_prefix(prefix: object) -> str:
    """A listing prefix: empty, or a valid key followed by ``/``."""
    if prefix == "":
        return ""
    if not isinstance(prefix, str) or not prefix.endswith("/"):
        raise UsageError(f"invalid object prefix {prefix!r:.80}: empty or ending in '/'")
    check_key(prefix[:-1])
    return prefix


@dataclass(frozen=True)
class ObjectInfo:
    """What a backend says about one stored object (one version of it)."""

    key: str
    size: int
    #: seconds since the epoch: the directory's mtime, S3's LastModified
    mtime: float
    #: S3 VersionId on a versioned bucket; None for a directory or an unversioned bucket
    version: str | None = None
    #: Object Lock retention (seconds since the epoch); None if the object is not retained
    retain_until: float | None = None
    #: a delete marker on a versioned bucket, not data
    deleted: bool = False


@dataclass(frozen=True)
class Upload:
    """An object being written and not committed (S3: a multipart upload)."""

    key: str
    upload_id: str
    started: float


class ByteReader(Protocol):
    """A stream of an object's bytes: ``read(n)`` returns at most n, ``b""`` at the end."""

    def read(self, size: int, /) -> bytes: ...

    def close(self) -> None: ...


class ObjectWriter(Protocol):
    """One object being written in pieces (an archive as it streams).

    Nothing is visible under the key until :meth:`commit`. Memory is bounded by
    the backend (a part at a time), whatever is written.
    """

    key: str

    def write(self, data: bytes | bytearray | memoryview, /) -> None: ...

    def commit(self) -> ObjectInfo:
        """Publish the object; ResourceError if one exists under the key."""
        ...

    def abort(self) -> None:
        """Drop what was written; safe to call twice and after a failed commit."""
        ...


@runtime_checkable
class Backend(Protocol):
    """A store of write-once objects under checked keys (see the module docstring)."""

    #: for messages: ``/srv/backups`` or ``s3://bucket/prefix``
    location: str

    def get(self, key: str, *, max_bytes: int, version: str | None = None) -> bytes:
        """The whole object; NotFound, or IntegrityError if it is bigger than ``max_bytes``."""
        ...

    def open_read(self, key: str, *, version: str | None = None) -> ByteReader:
        """A stream of the object (a restore reads an archive this way); NotFound."""
        ...

    def put(self, key: str, data: bytes, *, exclusive: bool = True) -> ObjectInfo:
        """Store a small object whole; with ``exclusive``, ResourceError if the key exists."""
        ...

    def writer(self, key: str, *, size_hint: int | None = None) -> ObjectWriter:
        """A writer for a big object (multipart on S3); ``size_hint`` sizes the parts."""
        ...

    def stat(self, key: str) -> ObjectInfo | None:
        """The current version's info, or None if there is no object under ``key``."""
        ...

    def list(self, prefix: str = "", *, shallow: bool = False) -> Iterator[ObjectInfo]:
        """Every object whose key starts with ``prefix`` (a :func:`check_prefix`), in key order.

        ``shallow``: only those with no "/" after the prefix (S3's delimiter; a directory
        is not descended into), so stray folders below cost nothing.
        A name in the store that is not a valid key is skipped (and logged), never
        returned: nothing a foreign writer put there reaches a path or a message.
        """
        ...

    def versions(self, key: str, *, retention: bool = True) -> builtins.list[ObjectInfo]:
        """Every version of ``key``, oldest first, delete markers included; [] if none.

        ``retention=False``: ``retain_until`` may be left None (S3 needs a request per
        version to say it; a caller only counting versions asks for none)."""
        ...

    def delete(self, key: str, *, version: str | None = None) -> None:
        """Remove one version (or, unversioned, the object); missing is not an error.

        AuthError when the credentials or a retention forbid it.
        """
        ...

    def stale_uploads(self, older_than: float) -> Iterator[Upload]:
        """Uncommitted uploads started before ``older_than`` (seconds since the epoch)."""
        ...

    def abort_upload(self, upload: Upload) -> None:
        """Remove an uncommitted upload's parts; gone already is not an error."""
        ...


# -- optional capabilities: asked for with isinstance(backend, <Protocol>) ----------------------
@runtime_checkable
class Retaining(Protocol):
    """A backend whose objects can be held under Object Lock retention (S3 with Object Lock)."""

    def extend_retention(self, key: str, *, version: str | None, until: float) -> float | None:
        """Hold ``key``'s ``version`` (None: the current one) until at least ``until``
        (seconds since the epoch), in the mode it is already held in, else the bucket's
        default mode; never shortened. The date it is held until now; None when the store
        has no lock for it (a bucket without Object Lock). NotFound if it is gone."""
        ...


@runtime_checkable
class Children(Protocol):
    """A backend that can list one level of names (a directory's entries, S3's CommonPrefixes),
    so the repository finds its hosts without walking every chunk."""

    def children(self, prefix: str = "") -> Iterator[str]:
        """The names one ``/`` below ``prefix`` (a :func:`check_prefix`) under which objects
        may be, sorted; names that are not valid key parts are skipped."""
        ...


@runtime_checkable
class LocalFiles(Protocol):
    """A backend whose objects are files on this host: what only a directory can do.

    The repository asks for it (``isinstance``) for what has no object-store
    equivalent: its ``flock`` (partials and quota reservations are made and swept
    under it), handing tar an archive by path, flock-held partials that tell a
    live writer from a dead one, quota reservation files, and refreshing a chunk's
    mtime for gc's grace period.
    """

    #: the directory holding every object
    root: Path

    def file(self, key: str) -> Path:
        """The file of ``key`` (for tools that read by path, and for messages)."""
        ...

    def lock(self) -> AbstractContextManager[None]:
        """The store's exclusive lock (short: file operations only, never while data flows)."""
        ...
