"""The repository: a directory of backups, written so that only complete ones are ever seen.

Layout::

    <repo>/<host>/<slug>/<timestamp>.tar.zst    the archive (tar | zstd), read-only
    <repo>/<host>/<slug>/<timestamp>.json       its manifest, written last: the commit
    <repo>/<host>/<slug>/<timestamp>.map        an image backup's chunk map (instead of
                                                 an archive; :mod:`sanoffload.store.image`)
    <repo>/chunks/                              the chunks image backups' maps name
                                                 (:mod:`sanoffload.store.chunks`)

**On an object store** (a :class:`~sanoffload.store.backend.Backend` without
:class:`~sanoffload.store.backend.LocalFiles`) the same keys hold the same objects,
with three differences:

* *Keyed names* when the backend encrypts (it says so by holding keys,
  :class:`KeyedNames`): folders are ``backups/<name_token(HOST)>/<name_token(SLUG)>/``
  and chunks ``chunks/XX/<chunk_name>`` (:class:`KeyedNaming`), so the store learns no
  host, path or chunk hash from a name. The encrypted manifest keeps the real host and
  path: listing reads every manifest (and checks it names its own folder); ``get``
  maps an id to its folder. Maps keep plain sha256 ids (they are encrypted too).
* *Written once*: nothing is rewritten. A verification or comparison is a small
  record beside the manifest, ``STAMP.verify-<UTC time>.json``, put only if absent;
  loading a backup takes the newest valid of at most :data:`MAX_RECORDS` records.
  On a versioned bucket the oldest version of an object is what is read, and a
  manifest or data object with more than one version makes its backup
  :class:`Broken` ("overwritten"): a writer with the proxy's rights tried to replace it.
* *Removal* deletes every version (manifest first), and the store may refuse it
  (the proxy's credentials, Object Lock retention): :func:`~sanoffload.store.prune.prune`
  reports that per backup.

A backup's data file is its archive (``"kind": "tar"``) or its chunk map
(``"kind": "image"``); :attr:`Backup.archive` names whichever it is. A map is
published like an archive, before its manifest. ``chunks`` is therefore no host
name (:func:`check_host` refuses it).

A backup is streamed to ``<timestamp>.tar.zst.partial``, fsynced, test-read,
published under its final name without replacing anything (link, then unlink
the partial name: a rename that cannot clobber), and the directory fsynced;
then the manifest goes the same way. A backup is listed only when both files
are there and the manifest reads back and names that very place, so a crash at
any point leaves at most a ``*.partial`` or an archive without a manifest:
both are ignored (:meth:`Repository.leftovers` names them).

Every name that reaches the filesystem is checked first (:func:`check_host`,
:func:`check_slug`, :func:`check_timestamp`): a strict ASCII charset, no ``/``,
no ``..``, no leading ``.`` or ``-``, bounded length, so nothing a sender or an
operator types can reach outside the repository. A backed-up path may hold no
control characters (:func:`check_path`): it is printed by every listing.

A manifest that cannot be read (bad JSON, nested 30,000 deep, a time out of
range) or that names another backup makes that backup :class:`Broken`: listed as
such, never pruned, failed by verify; the rest of the repository goes on.

**Live and dead writers.** A writer holds an exclusive ``flock`` on its partial
file's descriptor from creating it until the archive is published or removed.
A partial whose lock can be taken belongs to a dead writer (SIGKILL, a power
cut): a retry of the same backup, or the next backup of the object, removes it;
a live one is refused ("a backup of this id is being written"). Partials are
created and swept only under the repository's own lock (a ``flock`` on its root
directory), so a sweeper never removes a name a new writer has just taken.

**Quota: reserve, then commit** (:class:`Quota`). A client is charged for the
backups it put (the manifest's ``client``; an incremental level's state file counts
with its archive); a backup stored before the store
recorded the client (no ``client``) is charged to every client that may read
its host, as before. A put reserves quota before it writes: a reservation file
per put in ``.sanoffload-reservations/``, flock-held by the writer like its
partial, grown in steps (:data:`QUOTA_STEP`, or a quarter of what it holds)
under the repository lock, where the client's stored bytes plus every live
reservation of that client must stay within the quota. Publishing the manifest
moves the bytes from "reserved" to "stored"; then the reservation goes. A dead
put's reservation is not counted (its lock is free) and is removed when seen.
Concurrent puts of one client can therefore never store more than its quota
together; a put that would exceed it is refused (ResourceError) and leaves
nothing.
"""

from __future__ import annotations

import builtins
import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
import stat
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from ..durable import fsync_dir
from ..errors import (
    AuthError,
    CommandError,
    CommandNotFoundError,
    CommandTimeoutError,
    IntegrityError,
    RefusedError,
    ResourceError,
    UsageError,
)
from ..runner import Runner
from ..text import has_control, printable
from ..tools import tar, zstd
from .backend import (
    Backend,
    ByteReader,
    Children,
    LocalFiles,
    NotFound,
    ObjectWriter,
    Retaining,
    check_key,
)
from .backend_dir import (
    DirBackend,
    _open_locked,
    _publish,
    _sweep_partial,
    _write_all,
    _write_file,
)
from .chunks import BackendChunkStore, ChunkStore, delete_versions
from .imagemap import ChunkMap
from .manifest import (
    KIND_IMAGE,
    KIND_TAR,
    MAX_BYTES,
    NOT_VERIFIED,
    VERIFIED_OK,
    VERIFY_FAILED,
    Manifest,
    Verification,
    parse_verification_record,
    sender_fields,
    to_utc,
    utc_iso,
    verification_record,
)

if TYPE_CHECKING:  # crypt needs the cryptography package: imported when a key is in use
    from .keys import RepoKeys

log = logging.getLogger(__name__)

ARCHIVE_SUFFIX = ".tar" + zstd.SUFFIX
#: the test-read on receipt lasts as long as the upload; the channel bounds a stalled sender
RECEIPT_CHECK_TIMEOUT = 24 * 3600.0
MANIFEST_SUFFIX = ".json"
MAP_SUFFIX = ".map"
#: an incremental tar backup's state file (``--listed-incremental``), beside its archive
SNAPSHOT_SUFFIX = ".snar"
#: names in the repository's root that are not hosts
RESERVED_HOSTS = frozenset({"chunks"})
PARTIAL_SUFFIX = ".partial"
#: every read and write moves this much at a time
CHUNK = 1 << 20
#: a time limit for reading a whole archive: this floor, plus one second per RATE bytes,
#: never more than MAX_TIMEOUT whatever sizes a manifest or a sender claims
MIN_TIMEOUT = 3600.0
RATE = 8 << 20
MAX_TIMEOUT = 48 * 3600.0
#: the longest backed-up path
MAX_PATH = 4096
#: the puts' quota reservations (leading ".": never taken for a host)
RESERVATIONS = ".sanoffload-reservations"
#: how far ahead of its data a put reserves quota (at least; or a quarter of what it holds)
QUOTA_STEP = 64 << 20

_HOST_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_SLUG_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_TIMESTAMP_RE = re.compile(r"[0-9]{8}T[0-9]{6}Z")
TIMESTAMP_FORMAT = "%Y%m%dT%H%M%SZ"
# what a path keeps in its slug; the rest becomes "-"
_SLUG_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


class ByteSource(Protocol):
    """What :meth:`Repository.put` reads: a file, a pipe, a socket's file, BytesIO.

    ``readinto`` is used when the object has one (no new bytes object per chunk);
    ``read`` otherwise. Either returning None means a non-blocking stream.
    """

    def read(self, size: int, /) -> bytes | None: ...


def _check_name(kind: str, name: object, pattern: re.Pattern[str], limit: int) -> str:
    if not isinstance(name, str):
        raise RefusedError(f"invalid {kind}: not a string: {name!r}")
    # fullmatch: "$" would let a trailing newline through
    if not pattern.fullmatch(name) or ".." in name or name.endswith((PARTIAL_SUFFIX, ".")):
        raise RefusedError(f"invalid {kind} {name!r}: use 1-{limit} of A-Z a-z 0-9 . _ -, "
                           "starting with a letter or digit, without '..'")
    return name


def check_host(name: object) -> str:
    """A host name as a directory name: ``fs1``, ``fs1.example.org``."""
    if isinstance(name, str) and name in RESERVED_HOSTS:
        raise RefusedError(f"invalid host name {name!r}: the repository keeps its chunks there")
    return _check_name("host name", name, _HOST_RE, 63)


def check_slug(name: object) -> str:
    """An object slug as a directory name: ``srv-data-3f2a9c1e``."""
    return _check_name("object slug", name, _SLUG_RE, 100)


def check_timestamp(name: object) -> str:
    """A backup timestamp ``20261126T102933Z`` (UTC) naming a real instant."""
    if not isinstance(name, str) or not _TIMESTAMP_RE.fullmatch(name):
        raise RefusedError(f"invalid timestamp {name!r}: expected UTC like 20261126T102933Z")
    try:
        datetime.strptime(name, TIMESTAMP_FORMAT)
    except ValueError:
        raise RefusedError(f"invalid timestamp {name!r}: no such date or time") from None
    return name


def format_timestamp(when: datetime) -> str:
    """The timestamp naming a backup taken at ``when`` (aware), to the second, UTC."""
    return when.astimezone(UTC).strftime(TIMESTAMP_FORMAT)


def parse_timestamp(name: str) -> datetime:
    return datetime.strptime(check_timestamp(name), TIMESTAMP_FORMAT).replace(
        tzinfo=UTC)


def check_path(path: object) -> str:
    """A backed-up path as a sender gives it: absolute, bounded, no control characters."""
    if not isinstance(path, str) or not path.startswith("/") or "\0" in path:
        raise RefusedError(f"invalid path {printable(repr(path))}: must be absolute")
    if len(path) > MAX_PATH:
        raise RefusedError(f"invalid path: longer than {MAX_PATH} characters")
    if has_control(path):
        # it is printed by every listing: a newline forges a row, an escape retitles a terminal
        raise RefusedError(f"invalid path '{printable(path)}': holds a control character or "
                           "escape sequence")
    return path


def slug_for_path(path: str) -> str:
    """The slug of a backed-up path: readable, plus a hash so that no two paths share one.

    ``/srv/data`` -> ``srv-data-<8 hex>``; ``/`` -> ``root-<8 hex>``. ``/srv/data``
    and ``/srv-data`` read alike but hash apart, so they never share a directory
    (or a prune policy).
    """
    check_path(path)
    digest = hashlib.sha256(os.fsencode(path)).hexdigest()[:8]
    readable = _SLUG_UNSAFE.sub("-", path.encode("ascii", "replace").decode()).strip("-._")
    readable = readable.replace("..", "-")[:80].rstrip("-._") or "root"
    return check_slug(f"{readable}-{digest}")


@dataclass(frozen=True, order=True)
class BackupId:
    """``host/slug/timestamp``: what the operator and the CLI call a backup."""

    host: str
    slug: str
    timestamp: str

    def __post_init__(self) -> None:
        check_host(self.host)
        check_slug(self.slug)
        check_timestamp(self.timestamp)

    @classmethod
    def parse(cls, text: str) -> BackupId:
        parts = text.split("/") if isinstance(text, str) else []
        if len(parts) != 3:
            raise RefusedError(f"invalid backup id {text!r}: expected HOST/SLUG/TIMESTAMP")
        return cls(*parts)

    @property
    def time(self) -> datetime:
        return parse_timestamp(self.timestamp)

    def __str__(self) -> str:
        return f"{self.host}/{self.slug}/{self.timestamp}"


@dataclass(frozen=True)
class Backup:
    """A complete backup: its id, its manifest and where its data file is (``archive``: the
    ``.tar.zst`` of a tar backup, the ``.map`` of an image backup)."""

    id: BackupId
    manifest: Manifest
    archive: Path
    manifest_path: Path
    #: the folder its objects are in (:meth:`Repository.folder`); None: ``HOST/SLUG``
    folder: str | None = None

    @property
    def is_image(self) -> bool:
        return self.manifest.is_image

    def key(self, suffix: str) -> str:
        """The key of this backup's object with ``suffix`` (``.json``, ``.tar.zst``...)."""
        if self.folder is None:
            return object_key(self.id, suffix)
        return f"{self.folder}/{self.id.timestamp}{suffix}"

    @property
    def archive_key(self) -> str:
        """The data file's object key (``archive`` is its file in a directory repository)."""
        return self.key(MAP_SUFFIX if self.is_image else ARCHIVE_SUFFIX)

    @property
    def manifest_key(self) -> str:
        return self.key(MANIFEST_SUFFIX)

    def to_dict(self) -> dict[str, Any]:
        return {"id": str(self.id), **self.manifest.to_dict()}


@dataclass(frozen=True)
class Broken:
    """A backup whose manifest cannot be read or names another backup.

    Listed as broken, failed by verify, never pruned (nothing about it can be
    trusted, its time included); ``reason`` comes from the file: print it
    through :func:`~sanoffload.text.printable`.
    """

    id: BackupId
    reason: str
    archive: Path
    manifest_path: Path
    #: the manifest as first written (the oldest version), when it reads: a backup broken
    #: because its manifest or data was overwritten keeps its original here
    manifest: Manifest | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"id": str(self.id), "broken": self.reason}


@dataclass(frozen=True)
class Quota:
    """A client's share of a repository: what the backups it put may take in all.

    ``hosts``: the source hosts the client may read (None: all); backups stored
    without a recorded client are charged to it when their host is one of these.
    """

    client: str
    limit: int
    hosts: tuple[str, ...] | None = None


def object_key(bid: BackupId, suffix: str) -> str:
    """The key of one of ``bid``'s objects: ``HOST/SLUG/STAMP<suffix>`` (the directory layout)."""
    return f"{bid.host}/{bid.slug}/{bid.timestamp}{suffix}"


#: where an encrypted repository keeps its backups' folders (``backups/<host token>/<slug token>``)
KEYED_BACKUPS = "backups"
#: an object store's verification records, beside the manifest they add to:
#: ``STAMP.verify-<UTC time to the microsecond>.json`` (the manifest itself is never rewritten)
VERIFY_INFIX = ".verify-"
_RECORD_RE = re.compile(r"([0-9]{8}T[0-9]{6}Z)" + re.escape(VERIFY_INFIX)
                        + r"([0-9]{8}T[0-9]{6}\.[0-9]{6}Z)" + re.escape(MANIFEST_SUFFIX))
#: how many of a backup's newest verification records are read (each at most 8 KiB):
#: a writer that piles up records cannot make a listing read them all
MAX_RECORDS = 8
MAX_RECORD_BYTES = 8192
_TOKEN_RE = re.compile(r"[0-9a-f]{32}")


@runtime_checkable
class KeyedNames(Protocol):
    """A backend whose object names must say nothing of what they hold (an encrypted one):
    the repository then names folders and chunks with its keys (:class:`KeyedNaming`)."""

    keys: RepoKeys


class Naming:
    """Where a repository's objects go: the directory layout, ``HOST/SLUG/STAMP.*`` and
    ``chunks/XX/<sha256>`` (directories, unencrypted object stores)."""

    keyed = False

    def folder(self, host: str, slug: str) -> str:
        """The folder (key prefix, without the trailing ``/``) of one object's backups."""
        return f"{host}/{slug}"

    def chunk_key(self, chunk_id: str) -> str:
        """The object key of the chunk whose plaintext has sha256 ``chunk_id`` (checked)."""
        from .chunks import CHUNKS, check_id

        cid = check_id(chunk_id)
        return f"{CHUNKS}/{cid[:2]}/{cid}"


class KeyedNaming(Naming):
    """Names that tell the store nothing (an encrypted repository): a folder is
    ``backups/<name_token(HOST)>/<name_token(SLUG)>``, a chunk ``chunks/XX/<chunk_name>``
    (HMAC-SHA256 under the repository's id key: the store cannot test a guess of a host,
    a path or a chunk's content). The manifest, encrypted, keeps the real host and path."""

    keyed = True

    def __init__(self, keys: RepoKeys) -> None:
        self.keys = keys

    def folder(self, host: str, slug: str) -> str:
        from .crypt import NameKind, name_token

        return (f"{KEYED_BACKUPS}/{name_token(self.keys, NameKind.HOST, check_host(host))}/"
                f"{name_token(self.keys, NameKind.SLUG, check_slug(slug))}")

    def host_prefix(self, host: str) -> str:
        from .crypt import NameKind, name_token

        return f"{KEYED_BACKUPS}/{name_token(self.keys, NameKind.HOST, check_host(host))}/"

    def slug_token(self, slug: str) -> str:
        from .crypt import NameKind, name_token

        return name_token(self.keys, NameKind.SLUG, check_slug(slug))

    def chunk_key(self, chunk_id: str) -> str:
        from .chunks import CHUNKS, check_id
        from .crypt import chunk_name

        name = chunk_name(self.keys, check_id(chunk_id))
        return f"{CHUNKS}/{name[:2]}/{name}"


def naming_for(backend: Backend) -> Naming:
    """Keyed names for a backend that holds keys (:class:`KeyedNames`), else the plain layout."""
    if isinstance(backend, KeyedNames):
        return KeyedNaming(backend.keys)
    return Naming()


def read_timeout(*sizes: int | None) -> float:
    """How long reading (or extracting) an archive of these sizes may take (capped)."""
    biggest = max((s for s in (0, *sizes) if isinstance(s, int)), default=0)
    return min(MAX_TIMEOUT, MIN_TIMEOUT + biggest / RATE)


class Repository:
    """A backup repository: an existing directory (``Repository(root)``), or any
    :class:`~sanoffload.store.backend.Backend` (:meth:`on`).

    Everything it reads goes through the backend. What only a directory can do
    (the repository lock, flock-held partials, quota reservations, handing tar a
    path) is asked of it as :class:`~sanoffload.store.backend.LocalFiles`.
    """

    def __init__(self, root: str | os.PathLike[str] | None = None,
                 runner: Runner | None = None, *, backend: Backend | None = None,
                 naming: Naming | None = None) -> None:
        if backend is None:
            if root is None:
                raise ValueError("a repository needs a root directory or a backend")
            path = Path(os.path.abspath(root))
            if not path.is_dir():
                raise UsageError(f"{path}: no such repository directory (create it first)")
            backend = DirBackend(path)
        elif root is not None:
            raise ValueError("a repository takes a root directory or a backend, not both")
        self.backend = backend
        #: the directory capabilities, when the backend is a directory on this host
        self.local: LocalFiles | None = backend if isinstance(backend, LocalFiles) else None
        self.runner = runner
        #: plain names, or keyed ones when the backend encrypts (:func:`naming_for`)
        self.naming = naming if naming is not None else naming_for(backend)
        # keyed folders seen while listing, by id: a broken manifest's backup is listed
        # under its folder's tokens, and found again by them
        self._folders: dict[BackupId, str] = {}

    @classmethod
    def on(cls, backend: Backend, runner: Runner | None = None, *,
           naming: Naming | None = None) -> Repository:
        """A repository kept on ``backend``: the directory layout, or keyed names when the
        backend encrypts (see :class:`KeyedNaming`)."""
        return cls(runner=runner, backend=backend, naming=naming)

    def folder(self, bid: BackupId) -> str:
        """The key prefix (no trailing ``/``) of ``bid``'s objects."""
        return self._folders.get(bid) or self.naming.folder(bid.host, bid.slug)

    def key(self, bid: BackupId, suffix: str) -> str:
        """The key of ``bid``'s object with ``suffix``: ``FOLDER/STAMP<suffix>``."""
        return f"{self.folder(bid)}/{bid.timestamp}{suffix}"

    @property
    def root(self) -> Path:
        """The repository's directory; UsageError for a repository on an object store."""
        if self.local is None:
            raise UsageError(f"{self.backend.location} is not a directory repository")
        return self.local.root

    @property
    def location(self) -> str:
        """For messages: the directory, or the object store's URL."""
        return self.backend.location

    def _file(self, key: str) -> Path:
        """The file of ``key`` in a directory repository; elsewhere the key itself, as a
        name for messages (never opened: objects are read through the backend)."""
        return self.local.file(key) if self.local is not None else Path(key)

    def scratch(self) -> tempfile.TemporaryDirectory[str]:
        """A private temporary directory for member listings, on the repository's disk.

        Listings of big trees are big; /tmp may be a small tmpfs. The name starts
        with ".", so :meth:`list` never takes it for a host. A read-only
        repository falls back to the system's temporary directory.
        """
        try:
            if self.local is None:
                raise OSError("not a directory repository")
            return tempfile.TemporaryDirectory(prefix=".sanoffload-tmp-", dir=self.local.root)
        except OSError:
            return tempfile.TemporaryDirectory(prefix="sanoffload-tmp-")

    def command_runner(self) -> Runner:
        """The runner external commands go through (UsageError if opened without one)."""
        if self.runner is None:
            raise UsageError("this repository was opened without a command runner")
        return self.runner

    @contextmanager
    def lock(self) -> Iterator[None]:
        """The repository's lock: held while partials and reservations are made, grown, swept.

        Held for file operations only (never while data flows), so waiting is short.
        An object store has none: its write-once puts keep writers apart.
        """
        if self.local is None:
            yield
            return
        with self.local.lock():
            yield

    def charged(self, client: str, hosts: tuple[str, ...] | None = None) -> int:
        """Stored bytes charged to ``client``: the backups it put, plus those of no recorded
        client whose host it may read (``hosts``; None: any)."""
        total = 0
        for b in self.list():
            owner = b.manifest.client
            if owner == client or (owner is None and (hosts is None or b.id.host in hosts)):
                # an incremental level's state file is stored beside its archive
                total += b.manifest.stored_bytes + (b.manifest.snapshot_bytes or 0)
        return total

    def reserved(self, client: str, *, besides: Path | None = None) -> int:
        """Bytes live puts of ``client`` have reserved (but ``besides``); dead ones are removed.

        Call with the repository lock held.
        """
        if self.local is None:
            return 0  # an object store keeps no reservations (its own quotas apply)
        directory = self.local.root / RESERVATIONS
        try:
            names = sorted(os.listdir(directory))
        except FileNotFoundError:
            return 0
        total = 0
        for name in names:
            path = directory / name
            if path == besides:
                continue
            try:
                fd = _open_locked(path)
            except OSError:
                continue  # gone meanwhile, or not a reservation of ours
            if fd is not None:  # its put is gone: it holds nothing
                path.unlink(missing_ok=True)
                os.close(fd)
                continue
            try:
                data = json.loads(path.read_bytes()[:4096])
                if data.get("client") == client:
                    total += int(data["bytes"])
            except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
                log.warning("%s: unreadable quota reservation: %s", path, exc)
        return total

    # -- places -------------------------------------------------------------
    def _dir(self, host: str, slug: str, *, create: bool = False) -> Path:
        """``<repo>/<host>/<slug>``; refuses a symlink or non-directory on the way."""
        path = self.root
        absent = False
        for name in (check_host(host), check_slug(slug)):
            path = path / name
            if create:
                try:
                    path.mkdir(mode=0o750)
                except FileExistsError:
                    pass
                else:
                    fsync_dir(path.parent)  # the new directory survives a crash too
            if absent:
                continue
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                if create:
                    raise
                absent = True  # callers find nothing there: "no such backup"
                continue
            if not stat.S_ISDIR(st.st_mode):
                raise RefusedError(f"{path} is not a directory (a symlink?): not following it")
        return path

    def archive_path(self, bid: BackupId) -> Path:
        return self._dir(bid.host, bid.slug) / (bid.timestamp + ARCHIVE_SUFFIX)

    def manifest_path(self, bid: BackupId) -> Path:
        return self._dir(bid.host, bid.slug) / (bid.timestamp + MANIFEST_SUFFIX)

    def map_path(self, bid: BackupId) -> Path:
        return self._dir(bid.host, bid.slug) / (bid.timestamp + MAP_SUFFIX)

    def snapshot_path(self, bid: BackupId) -> Path:
        return self._dir(bid.host, bid.slug) / (bid.timestamp + SNAPSHOT_SUFFIX)

    @property
    def chunks(self) -> ChunkStore:
        """The chunks of this repository's image backups (``ROOT/chunks/``)."""
        if self.local is None:
            return BackendChunkStore(self.backend, self.naming.chunk_key,
                                     keyed=self.naming.keyed)
        return ChunkStore(self.local.root)

    # -- writing --------------------------------------------------------------
    def check_new(self, bid: BackupId, quota: Quota | None) -> None:
        """Before a put on an object store: ResourceError if ``bid`` exists, or if ``quota``'s
        client has stored its limit already (there are no reservations there)."""
        if any(self._present(self.key(bid, s))
               for s in (ARCHIVE_SUFFIX, MANIFEST_SUFFIX, MAP_SUFFIX)):
            raise ResourceError(f"backup {bid} already exists")
        if quota is not None:
            used = self.charged(quota.client, quota.hosts)
            if used >= quota.limit:
                raise ResourceError(f"client {quota.client}'s quota of {quota.limit} bytes "
                                    f"is used up ({used} bytes stored)", hint="prune old backups")

    def writer(self, host: str, path: str, *, slug: str | None = None,
               timestamp: str | datetime | None = None, client: str | None = None,
               quota: Quota | None = None, check_on_receipt: bool = True) -> BackupWriter:
        """A new backup to stream into; publish it with :meth:`BackupWriter.commit`.

        ``check_on_receipt``: test-read the bytes while they arrive (commit with
        ``verify=False`` if not: nothing else reads them back).

        ``timestamp`` defaults to now (UTC); the sender's freeze time is better.
        ``client`` (or ``quota.client``) is recorded in the manifest; with
        ``quota`` the writer reserves before it writes (see the module docstring).
        """
        if isinstance(timestamp, datetime):
            timestamp = format_timestamp(timestamp)
        elif timestamp is None:
            timestamp = format_timestamp(datetime.now(UTC))
        if slug is None:
            slug = slug_for_path(path)
        else:
            check_path(path)
        if quota is not None:
            if client is not None and client != quota.client:
                raise ValueError(f"client {client!r} with the quota of {quota.client!r}")
            client = quota.client
        bid = BackupId(host, slug, timestamp)
        return BackupWriter(self, bid, path, client=client, quota=quota,
                            check_on_receipt=check_on_receipt)

    def put(self, host: str, path: str, stream: ByteSource,
            manifest_fields: Mapping[str, Any] | None = None, *, slug: str | None = None,
            verify: bool = True, client: str | None = None,
            quota: Quota | None = None) -> BackupId:
        """Store the ``.tar.zst`` read from ``stream`` (to its end) as a backup of HOST:PATH.

        Reads CHUNK bytes at a time and hashes them on the way; ``verify``
        test-reads them on the way too (``tar --list --zstd`` fed the same
        bytes: no second pass), so an archive that cannot be read back is never
        published. ``manifest_fields`` are the
        sender's (:data:`~sanoffload.store.manifest.SENDER_FIELDS`); its
        ``frozen_at`` names the backup, and its ``sha256``/``archive_bytes``, if
        given, must match what arrived (IntegrityError). Any error or
        interruption removes the partial file.
        """
        try:
            fields = sender_fields(manifest_fields)
        except ValueError as exc:
            raise UsageError(f"manifest fields: {exc}") from None
        when = to_utc(fields["frozen_at"]) if "frozen_at" in fields else None
        with self.writer(host, path, slug=slug, timestamp=when, client=client,
                         quota=quota, check_on_receipt=verify) as w:
            w.write_from(stream)
            return w.commit(fields, verify=verify).id

    # -- reading --------------------------------------------------------------
    def _present(self, key: str) -> bool:
        """True if an object (a regular file) is stored under ``key``."""
        try:
            return self.backend.stat(key) is not None
        except IntegrityError:
            return False  # a symlink or FIFO under its name: no data file

    def _versions_note(self, key: str) -> tuple[str | None, str | None]:
        """``(version, why)``: the oldest version of ``key`` (what was first written: read
        that), and why it cannot be trusted when it has more than one. Objects are written
        once; a second version is a writer with the proxy's rights replacing one. A
        directory has one version: ``(None, None)``."""
        if self.local is not None:
            return None, None
        found = self.backend.versions(key, retention=False)
        oldest = next((v.version for v in found if not v.deleted), None)
        if len(found) > 1:
            return oldest, (f"overwritten: {len(found)} versions of {key}; a writer with the "
                            "proxy's rights tried to replace it")
        return oldest, None

    def _folder_names(self, folder: str) -> set[str]:
        """The object names directly in ``folder``."""
        prefix = folder + "/"
        return {info.key[len(prefix):] for info in self.backend.list(prefix, shallow=True)}

    def _load(self, bid: BackupId) -> Backup | Broken | None:
        """The backup ``bid``; Broken if its manifest is bad; None if its manifest or the data
        file its kind needs (archive or map) is missing."""
        if self.naming.keyed and bid not in self._folders and \
                _TOKEN_RE.fullmatch(bid.host) and _TOKEN_RE.fullmatch(bid.slug):
            # a broken backup is listed by its folder's tokens (its manifest says nothing)
            found = self._load_in(f"{KEYED_BACKUPS}/{bid.host}/{bid.slug}", bid.timestamp, None)
            if isinstance(found, Broken) and found.id == bid:
                return found
        return self._load_in(self.folder(bid), bid.timestamp, bid)

    def _load_in(self, folder: str, stamp: str, bid: BackupId | None,
                 names: set[str] | None = None) -> Backup | Broken | None:
        """The backup whose manifest is ``FOLDER/STAMP.json``. ``bid`` is the id it must
        name; None in a keyed folder, where the manifest says whose backup it is (and must
        be of that very folder). ``names``: the folder's listing, if the caller has it."""
        mkey, archive, map_file = (f"{folder}/{stamp}{s}"
                                   for s in (MANIFEST_SUFFIX, ARCHIVE_SUFFIX, MAP_SUFFIX))
        data = {KIND_TAR: self._present(archive), KIND_IMAGE: self._present(map_file)}
        mpath = self._file(mkey)
        # until the manifest says otherwise, a keyed backup is known by its folder's tokens
        listed = bid if bid is not None else _folder_id(folder, stamp)
        original: Manifest | None = None

        def broken(reason: str) -> Broken:
            log.warning("%s: %s", mpath, printable(reason))
            self._remember(listed, folder)
            return Broken(listed, reason[:300], self._file(map_file if data[KIND_IMAGE]
                                                           and not data[KIND_TAR] else archive),
                          mpath, original)

        if not any(data.values()):
            return None
        try:
            info = self.backend.stat(mkey)
            if info is None:
                return None
        except IntegrityError:
            return broken("the manifest is not a regular file")
        if info.size > MAX_BYTES:
            return broken(f"unreadable manifest: manifest larger than {MAX_BYTES} bytes")
        try:
            oldest, overwritten = self._versions_note(mkey)
            # bounded: a manifest's size is never trusted; one byte more shows a big one
            raw = self.backend.get(mkey, max_bytes=MAX_BYTES + 1, version=oldest)
        except NotFound:
            return None
        except IntegrityError as exc:
            return broken(f"unreadable manifest: {exc.message}")
        except OSError as exc:
            return broken(f"cannot read the manifest: {exc.strerror or exc}")
        try:
            manifest = Manifest.from_json(raw)
        except ValueError as exc:
            return broken(f"unreadable manifest: {exc}")
        if bid is None:
            try:
                named = BackupId.parse(manifest.backup_id)
            except RefusedError as exc:
                return broken(f"the manifest names no valid backup: {exc.message}")
            if self.naming.folder(named.host, named.slug) != folder or named.timestamp != stamp:
                return broken(f"the manifest names {manifest.backup_id}, not this backup")
            listed = named
        elif manifest.backup_id != str(bid):
            return broken(f"the manifest names {manifest.backup_id}, not this backup")
        original = manifest
        if not data[manifest.kind]:
            return None  # its own data file is gone (being deleted): not a backup
        written_once = [mkey, map_file if manifest.is_image else archive]
        if manifest.is_incremental:
            written_once.append(f"{folder}/{stamp}{SNAPSHOT_SUFFIX}")
        try:
            for key in written_once:
                why = overwritten if key == mkey else self._versions_note(key)[1]
                if why is not None:
                    return broken(why)
        except IntegrityError as exc:
            return broken(f"cannot list the versions of its objects: {exc.message}")
        if self.local is None:
            manifest = self._with_records(folder, stamp, listed, manifest, names)
        self._remember(listed, folder)
        return Backup(listed, manifest, self._file(map_file if manifest.is_image else archive),
                      mpath, folder if self.naming.keyed else None)

    def _remember(self, bid: BackupId, folder: str) -> None:
        if self.naming.keyed:
            self._folders[bid] = folder

    def _with_records(self, folder: str, stamp: str, bid: BackupId, manifest: Manifest,
                      names: set[str] | None) -> Manifest:
        """``manifest`` with the newest valid verification records of its backup (an object
        store's verify never rewrites the manifest). Only the :data:`MAX_RECORDS` newest are
        read; one that does not read, or was written twice, is skipped (and logged)."""
        if names is None:
            names = self._folder_names(folder)
        records = sorted(n for n in names
                         if (m := _RECORD_RE.fullmatch(n)) is not None and m.group(1) == stamp)
        found: dict[str, Verification] = {}
        for name in reversed(records[-MAX_RECORDS:]):
            key = f"{folder}/{name}"
            try:
                version, overwritten = self._versions_note(key)
                if overwritten is not None:
                    raise ValueError(overwritten)
                raw = self.backend.get(key, max_bytes=MAX_RECORD_BYTES, version=version)
                field, result = parse_verification_record(raw, str(bid))
            except NotFound:
                continue
            except (ValueError, IntegrityError, OSError) as exc:
                log.warning("%s: verification record skipped: %s", printable(key),
                            printable(str(exc))[:200])
                continue
            found.setdefault(field, result)
        if "verification" in found:
            manifest = manifest.with_verification(found["verification"])
        if "compared" in found:
            manifest = manifest.with_compared(found["compared"])
        return manifest

    def get(self, bid: BackupId | str) -> Backup:
        """The complete backup ``bid``; UsageError if there is none, IntegrityError if its
        manifest is broken."""
        if isinstance(bid, str):
            bid = BackupId.parse(bid)
        found = self._load(bid)
        if found is None:
            raise UsageError(f"no such backup: {bid}")
        if isinstance(found, Broken):
            raise IntegrityError(f"{bid}: {found.reason}")
        return found

    def _subdirs(self, prefix: str, check: Any) -> Iterator[str]:
        """The names one level below ``prefix`` that ``check`` accepts, sorted."""
        if isinstance(self.backend, Children):
            names: Iterable[str] = self.backend.children(prefix)
        else:
            # no one-level listing: every key below, cut at the next "/"
            names = sorted({info.key[len(prefix):].split("/", 1)[0]
                            for info in self.backend.list(prefix)
                            if "/" in info.key[len(prefix):]})
        for name in names:
            try:
                check(name)
            except RefusedError:
                continue
            yield name

    def _names(self, host: str, slug: str) -> set[str]:
        """The object names stored in ``host/slug/``; RefusedError if a symlink is on the way."""
        if self.local is not None:
            self._dir(host, slug)  # a symlink for the host or slug directory: refused
        return self._folder_names(f"{host}/{slug}")

    def _keyed_folders(self, host: str | None, slug: str | None
                       ) -> builtins.list[tuple[str, set[str]]]:
        """A keyed repository's folders (``backups/<token>/<token>``) with the names in
        each, sorted by folder; only ``host``'s / ``slug``'s if given."""
        assert isinstance(self.naming, KeyedNaming)
        if host and slug:
            prefix = self.naming.folder(host, slug) + "/"
        elif host:
            prefix = self.naming.host_prefix(host)
        else:
            prefix = KEYED_BACKUPS + "/"
        slug_token = self.naming.slug_token(slug) if slug else None
        groups: dict[str, set[str]] = {}
        for info in self.backend.list(prefix):
            parts = info.key.split("/")
            if len(parts) != 4 or parts[0] != KEYED_BACKUPS or \
                    not _TOKEN_RE.fullmatch(parts[1]) or not _TOKEN_RE.fullmatch(parts[2]):
                continue
            if slug_token is not None and parts[2] != slug_token:
                continue
            groups.setdefault("/".join(parts[:3]), set()).add(parts[3])
        return sorted(groups.items())

    def _keyed_catalog(self, host: str | None, slug: str | None,
                       after: BackupId | None) -> builtins.list[Backup | Broken]:
        """Every backup of a keyed repository, in id order: its ids are in its manifests,
        so each is read (the oldest version of each, as always)."""
        found: list[Backup | Broken] = []
        for folder, names in self._keyed_folders(host, slug):
            for name in sorted(names):
                stamp = name[:-len(MANIFEST_SUFFIX)]
                if not name.endswith(MANIFEST_SUFFIX) or not _TIMESTAMP_RE.fullmatch(stamp) or \
                        (stamp + ARCHIVE_SUFFIX not in names and stamp + MAP_SUFFIX not in names):
                    continue
                try:
                    check_timestamp(stamp)
                except RefusedError:
                    continue
                entry = self._load_in(folder, stamp, None, names)
                if entry is not None and (after is None or entry.id > after):
                    found.append(entry)
        found.sort(key=lambda e: e.id)
        return found

    def ids(self, host: str | None = None, slug: str | None = None, *,
            after: BackupId | None = None) -> Iterator[BackupId]:
        """The ids that have an archive and a manifest (unread), in order; only those past
        ``after`` if given. Cheap: listings only (a keyed repository reads its manifests:
        nothing else says whose backup a folder holds)."""
        if self.naming.keyed:
            for entry in self._keyed_catalog(host, slug, after):
                yield entry.id
            return
        hosts = [check_host(host)] if host else list(self._subdirs("", check_host))
        for h in hosts:
            if after is not None and h < after.host:
                continue
            slugs = ([check_slug(slug)] if slug
                     else list(self._subdirs(f"{h}/", check_slug)))
            for s in slugs:
                if after is not None and (h, s) < (after.host, after.slug):
                    continue
                names = self._names(h, s)
                for name in sorted(names):
                    ts = name[:-len(MANIFEST_SUFFIX)]
                    if not name.endswith(MANIFEST_SUFFIX) or (ts + ARCHIVE_SUFFIX not in names
                                                              and ts + MAP_SUFFIX not in names):
                        continue
                    try:
                        bid = BackupId(h, s, ts)
                    except RefusedError:
                        continue
                    if after is None or bid > after:
                        yield bid

    def catalog(self, host: str | None = None, slug: str | None = None, *,
                after: BackupId | None = None) -> Iterator[Backup | Broken]:
        """Every backup, complete or broken, in id order (past ``after``), read lazily."""
        if self.naming.keyed:
            yield from self._keyed_catalog(host, slug, after)
            return
        for bid in self.ids(host, slug, after=after):
            found = self._load(bid)
            if found is not None:
                yield found

    def list(self, host: str | None = None, slug: str | None = None) -> list[Backup]:
        """Every complete backup (optionally of one host / object), oldest first per object.

        Broken ones are left out (:meth:`broken` names them).
        """
        return [b for b in self.catalog(host, slug) if isinstance(b, Backup)]

    def broken(self, host: str | None = None, slug: str | None = None) -> builtins.list[Broken]:
        """The backups whose manifest cannot be read or names another backup."""
        return [b for b in self.catalog(host, slug) if isinstance(b, Broken)]

    def _folder_groups(self) -> Iterator[tuple[str, set[str]]]:
        """Every folder of backups with the names in it (a directory's own listing, which
        shows its partial files too)."""
        if self.naming.keyed:
            yield from self._keyed_folders(None, None)
            return
        for h in self._subdirs("", check_host):
            for s in self._subdirs(f"{h}/", check_slug):
                names = (set(os.listdir(self._file(f"{h}/{s}"))) if self.local is not None
                         else self._names(h, s))
                yield f"{h}/{s}", names

    # builtins.list: "list" in this class is the method above
    def leftovers(self) -> builtins.list[tuple[Path, str]]:
        """What :meth:`list` leaves out: partial files (an upload running or cut off),
        archives without manifest or the other way round, unreadable manifests."""
        found: list[tuple[Path, str]] = []
        for folder, names in self._folder_groups():
            directory = self._file(folder)
            for name in sorted(names):
                if name.endswith(PARTIAL_SUFFIX):
                    found.append((directory / name, "partial (an upload running or cut off)"))
                    continue
                for suffix, others, why in (
                        (ARCHIVE_SUFFIX, (MANIFEST_SUFFIX,), "archive without a manifest"),
                        (MAP_SUFFIX, (MANIFEST_SUFFIX,), "chunk map without a manifest"),
                        (SNAPSHOT_SUFFIX, (MANIFEST_SUFFIX,),
                         "state file without a manifest"),
                        (MANIFEST_SUFFIX, (ARCHIVE_SUFFIX, MAP_SUFFIX),
                         "manifest without an archive or chunk map")):
                    ts = name[:-len(suffix)]
                    if not name.endswith(suffix) or not _TIMESTAMP_RE.fullmatch(ts):
                        continue
                    if not any(ts + other in names for other in others):
                        found.append((directory / name, why))
                    elif suffix == MANIFEST_SUFFIX:
                        try:
                            bid = None if self.naming.keyed else _folder_id(folder, ts)
                        except RefusedError:
                            continue
                        loaded = self._load_in(folder, ts, bid, names)
                        if isinstance(loaded, Broken):
                            found.append((directory / name, f"broken: {loaded.reason}"))
        return found

    # -- checking -------------------------------------------------------------
    @contextmanager
    def open_archive(self, backup: Backup) -> Iterator[ByteReader]:
        """The archive of tar backup ``backup`` opened for reading, its size checked against
        the manifest first; IntegrityError if it cannot be read or is not that size."""
        _not_image(backup)
        key = backup.archive_key
        try:
            info = self.backend.stat(key)
            if info is None:
                raise NotFound(key)
            if info.size != backup.manifest.archive_bytes:
                raise IntegrityError(f"{backup.id}: archive is {info.size} bytes, the manifest "
                                     f"says {backup.manifest.archive_bytes}")
            reader = self.backend.open_read(key)
        except NotFound:
            raise IntegrityError(f"{backup.id}: cannot read the archive: it is missing") \
                from None
        except OSError as exc:
            raise IntegrityError(f"{backup.id}: cannot read the archive: {exc}") from None
        try:
            yield reader
        finally:
            reader.close()

    def archive_pieces(self, backup: Backup, reader: ByteReader) -> Iterator[memoryview]:
        """``reader``'s bytes, CHUNK at a time (one buffer, reused: use each before the next);
        IntegrityError if reading fails or the archive is not the manifest's size."""
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        readinto = getattr(reader, "readinto", None)
        total = 0
        try:
            while True:
                if readinto is not None:
                    n = readinto(buf)
                    piece = view[:n] if n else None
                else:
                    data = reader.read(CHUNK)
                    piece = memoryview(data) if data else None
                if piece is None:
                    break
                total += len(piece)
                yield piece
        except OSError as exc:
            raise IntegrityError(f"{backup.id}: cannot read the archive: {exc}") from None
        if total != backup.manifest.archive_bytes:
            raise IntegrityError(f"{backup.id}: archive is {total} bytes, the manifest says "
                                 f"{backup.manifest.archive_bytes}")

    @contextmanager
    def archive_fd(self, backup: Backup, *, verify: bool = False) -> Iterator[int | None]:
        """A descriptor tar reads tar backup ``backup``'s archive from, or None in a directory
        repository (tar then reads its file, ``backup.archive``, as it always has).

        Elsewhere it is a pipe fed from :meth:`open_archive` by a thread: tar reads it
        as stdin or as ``/proc/self/fd/N``. A read failure (or a size that is not the
        manifest's) is raised when the block ends, in place of tar's own complaint
        about a cut archive. ``verify`` (a pipe in a directory repository too): the
        feeder also hashes every byte, reading on to the end after tar stops, and an
        archive whose sha256 is not the manifest's is an IntegrityError when the block
        ends, so one read both checks and lists it; also when the block fails (tar's
        complaint about a changed archive, a member refused), except on a timeout or an
        interrupt, which stop the reading at once.
        """
        if self.local is not None and not verify:
            yield None
            return
        failure: list[BaseException] = []
        digest = hashlib.sha256() if verify else None
        abandoned = threading.Event()
        with self.open_archive(backup) as f:
            r, w = os.pipe()

            def feed() -> None:
                writing = True
                try:
                    for piece in self.archive_pieces(backup, f):
                        if abandoned.is_set():
                            break
                        if digest is not None:
                            digest.update(piece)
                        if not writing:
                            continue
                        try:
                            _write_all(w, piece)
                        except BrokenPipeError:
                            # tar stopped reading: its exit status says why; a check reads on
                            if digest is None:
                                break
                            writing = False
                except BaseException as exc:  # handed to the caller when the block ends
                    failure.append(exc)
                finally:
                    os.close(w)

            feeder = threading.Thread(target=feed, name="archive-feed", daemon=True)
            feeder.start()
            try:
                yield r
            except BaseException as exc:
                # tar's complaint or a refused member: a changed archive is named as such
                # (read on to the end); an interrupt stops the reading at once
                checking = digest is not None and isinstance(exc, Exception) and \
                    not isinstance(exc, CommandTimeoutError)
                if not checking:
                    abandoned.set()
                os.close(r)  # a feeder still writing gets EPIPE
                r = -1
                feeder.join()
                if failure:
                    raise failure[0] from exc
                if checking:
                    self._compare(backup, digest)
                raise
            finally:
                if r >= 0:
                    os.close(r)
                feeder.join()
            if failure:
                raise failure[0]
            if digest is not None:
                self._compare(backup, digest)

    @staticmethod
    def _compare(backup: Backup, digest: Any) -> None:
        if digest.hexdigest() != backup.manifest.sha256:
            raise IntegrityError(f"{backup.id}: sha256 mismatch: archive has "
                                 f"{digest.hexdigest()}, the manifest says "
                                 f"{backup.manifest.sha256}")

    def check_sha256(self, backup: Backup) -> None:
        """Re-hash the archive (CHUNK at a time) and compare size and sha256 with the manifest."""
        h = hashlib.sha256()
        with self.open_archive(backup) as f:
            for piece in self.archive_pieces(backup, f):
                h.update(piece)
        self._compare(backup, h)

    def read_check(self, backup: Backup, *, timeout: float) -> int:
        """Read the archive once: its size and sha256 against the manifest while tar lists it
        (:class:`~sanoffload.tools.tar.StreamCount`); returns the member count.

        One read of the file instead of two (hash, then ``tar --list`` of the
        file). A changed archive is named as such (sha256 mismatch) even when
        tar also fails on it.
        """
        m = backup.manifest
        h = hashlib.sha256()
        counter: tar.StreamCount | None = None
        unreadable: CommandError | None = None
        count = 0
        try:
            with self.open_archive(backup) as f:
                counter = tar.StreamCount(self.command_runner(), timeout=timeout)
                for piece in self.archive_pieces(backup, f):
                    h.update(piece)
                    if unreadable is None:
                        try:
                            counter.feed(piece)
                        except (CommandNotFoundError, CommandTimeoutError):
                            raise
                        except CommandError as exc:
                            unreadable = exc  # hash on: a changed archive says more
                if unreadable is None:
                    try:
                        count = counter.finish()
                    except (CommandNotFoundError, CommandTimeoutError):
                        raise
                    except CommandError as exc:
                        unreadable = exc
        finally:
            if counter is not None:
                counter.abort()
        if h.hexdigest() != m.sha256:
            raise IntegrityError(f"{backup.id}: sha256 mismatch: archive has {h.hexdigest()}, "
                                 f"the manifest says {m.sha256}")
        if unreadable is not None:
            raise IntegrityError(f"{backup.id}: cannot be read back: {unreadable}")
        return count

    def test_read(self, archive: Path, *, timeout: float) -> int:
        """``tar --list --zstd`` to the end (one decode); returns the member count.

        tar's ``zstd -d`` checks every frame's content checksum, so this is
        the ``zstd -t`` too. A damaged archive raises IntegrityError; a missing
        tool or a timeout keeps its own error (that says nothing about the archive).
        """
        runner = self.command_runner()
        try:
            # through a pipe: a listing written to a file on a full disk is cut silently
            return tar.count_members(runner, archive, timeout=timeout)
        except (CommandNotFoundError, CommandTimeoutError):
            raise
        except CommandError as exc:
            raise IntegrityError(f"{archive.name}: cannot be read back: {exc}") from None

    def verify(self, bid: BackupId | str, *, timeout: float | None = None) -> Backup:
        """Re-check a stored backup in one read: size, sha256, decode and listing, member count.

        The outcome is written into the manifest (``verification``); a failure
        raises IntegrityError after that.
        """
        backup = self.get(bid)
        m = backup.manifest
        limit = timeout if timeout is not None else read_timeout(m.archive_bytes, m.source_bytes)
        failure: IntegrityError | None = None
        try:
            if backup.is_image:
                count, missing, bad = self.check_image_chunks(backup)
                if missing or bad:
                    raise IntegrityError(image_failure(backup.id, count, missing, bad))
            else:
                count = self.read_check(backup, timeout=limit)
                if m.member_count is not None and count != m.member_count:
                    raise IntegrityError(f"{backup.id}: {count} archive members, the manifest "
                                         f"says {m.member_count}")
                if m.is_incremental:
                    # restorable only with its whole chain and its state file
                    self.load_snapshot(backup)
                    self.chain(backup)
        except IntegrityError as exc:
            failure = exc
        result = (Verification.now(VERIFY_FAILED, str(failure)) if failure
                  else Verification.now(VERIFIED_OK))
        try:
            backup = self._record(backup, m.with_verification(result))
        except (OSError, ResourceError, AuthError) as exc:
            # a read-only repository, a write-once store: the answer still stands
            log.warning("%s: cannot record the verification in the manifest: %s", backup.id, exc)
            backup = Backup(backup.id, m.with_verification(result), backup.archive,
                            backup.manifest_path)
        if failure is not None:
            raise failure
        return backup

    def load_map(self, backup: Backup) -> ChunkMap:
        """The chunk map of image backup ``backup``, checked against its manifest's
        ``map_bytes`` and ``map_sha256`` and then whole; IntegrityError otherwise."""
        info = backup.manifest.image
        if info is None:
            raise UsageError(f"{backup.id} is a tar backup: it has no chunk map")
        where = f"{backup.id}: chunk map"
        data = self._read_recorded(backup.archive_key, info.map_bytes, where)
        chunk_map = ChunkMap.from_bytes(data, where=where)
        if chunk_map.sha256() != info.map_sha256:
            raise IntegrityError(f"{where}: sha256 {chunk_map.sha256()}, the manifest says "
                                 f"{info.map_sha256} (damaged)")
        if (chunk_map.size, chunk_map.chunk_size) != (info.size, info.chunk_size):
            raise IntegrityError(f"{where}: geometry differs from the manifest's")
        return chunk_map

    def check_image_chunks(self, backup: Backup
                           ) -> tuple[int, builtins.list[str], builtins.list[tuple[str, str]]]:
        """An image backup's map loaded (IntegrityError if it is bad) and every chunk it names
        re-hashed: ``(chunks, missing ids, (bad id, reason) pairs)``."""
        referenced = sorted(self.load_map(backup).referenced())
        report = self.chunks.verify(referenced)
        return len(referenced), list(report.missing), list(report.bad)

    # -- incremental chains (issue 13) ------------------------------------------
    def load_snapshot(self, backup: Backup) -> bytes:
        """The state file of incremental backup ``backup``, checked against its manifest's
        ``snapshot_bytes`` and ``snapshot_sha256`` and its header parsed; IntegrityError
        otherwise."""
        m = backup.manifest
        if m.snapshot_bytes is None or m.snapshot_sha256 is None:
            raise UsageError(f"{backup.id} is not an incremental backup: it has no state file")
        where = f"{backup.id}: state file"
        data = self._read_recorded(backup.key(SNAPSHOT_SUFFIX), m.snapshot_bytes,
                                   where)
        digest = hashlib.sha256(data).hexdigest()
        if digest != m.snapshot_sha256:
            raise IntegrityError(f"{where}: sha256 {digest}, the manifest says "
                                 f"{m.snapshot_sha256} (damaged)")
        try:
            tar.parse_snapshot_header(data)
        except ValueError as exc:
            raise IntegrityError(f"{where}: {exc}") from None
        return data

    def _read_recorded(self, key: str, size: int, where: str) -> bytes:
        """An object a manifest records beside itself (a chunk map, a state file): exactly the
        ``size`` bytes the manifest says; IntegrityError naming ``where`` otherwise (the size
        is the stored object's, checked before anything is read: never the manifest's claim)."""
        try:
            info = self.backend.stat(key)
            if info is None:
                raise NotFound(key)
            if info.size != size:
                raise IntegrityError(f"{where}: {info.size} bytes, the manifest says {size}")
            data = self.backend.get(key, max_bytes=size)
        except NotFound:
            raise IntegrityError(f"{where} is missing") from None
        except IntegrityError as exc:
            if exc.message.startswith(where):
                raise
            raise IntegrityError(f"{where}: {exc.message}") from None
        if len(data) != size:
            raise IntegrityError(f"{where} changed while it was read")
        return data

    def chain(self, backup: Backup | BackupId | str) -> builtins.list[Backup]:
        """The backups a restore of ``backup`` applies, level 0 first, ``backup`` last.

        A full backup is its own chain. Each parent must exist, have a manifest that
        reads, be the level below in the same chain and not have failed its last
        verification: IntegrityError naming the first link that does not.
        """
        if not isinstance(backup, Backup):
            backup = self.get(backup)
        out = [backup]
        while (m := out[-1].manifest).tar_level:
            parent = m.parent
            assert parent is not None  # the manifest's check: level > 0 has a parent
            try:
                found = self._load(BackupId.parse(parent))
            except RefusedError:
                found = None
            if found is None:
                raise IntegrityError(f"{backup.id}: its chain is broken: {parent} (the parent "
                                     f"of {out[-1].id}) is missing")
            if isinstance(found, Broken):
                raise IntegrityError(f"{backup.id}: its chain is broken: {parent}: "
                                     f"{found.reason}")
            pm = found.manifest
            if pm.tar_level != m.tar_level - 1 or pm.chain_id != m.chain_id:
                raise IntegrityError(f"{backup.id}: its chain is broken: {parent} is not "
                                     f"level {m.tar_level - 1} of chain {m.chain_id}")
            # failed, not "not verified": a put without the test-read (no runner, --no-verify)
            # is a link like any other, as the proxy's next_level takes it
            if pm.verification is not None and pm.verification.status == VERIFY_FAILED:
                raise IntegrityError(f"{backup.id}: its chain is broken: {parent} failed "
                                     f"its verification: {pm.verification.detail[:200]}")
            out.append(found)
        out.reverse()
        return out

    def latest_state(self, host: str, slug: str) -> Backup | None:
        """The newest complete incremental backup of ``host``/``slug`` (its state file is
        the next level's start), or None."""
        found = None
        for entry in self.catalog(host, slug):
            if isinstance(entry, Backup) and entry.manifest.is_incremental:
                found = entry
        return found

    def record_compare(self, bid: BackupId | str, result: Verification) -> Backup:
        """Record the proxy's comparison of the archive with its duplicate in the manifest."""
        backup = self.get(bid)
        return self._record(backup, backup.manifest.with_compared(result))

    def _record(self, backup: Backup, manifest: Manifest) -> Backup:
        """Record ``manifest``'s verification and comparison: a directory replaces the
        manifest (atomically: a reader sees the old or the new); an object store writes a
        record beside it (:meth:`_put_record`) and never rewrites the manifest."""
        if self.local is None:
            changed = [(name, getattr(manifest, name)) for name in ("verification", "compared")
                       if getattr(manifest, name) is not None
                       and getattr(manifest, name) != getattr(backup.manifest, name)]
            for name, result in changed:
                self._put_record(backup, name, result)
            return Backup(backup.id, manifest, backup.archive, backup.manifest_path,
                          backup.folder)
        directory = backup.manifest_path.parent
        partial = directory / f"{backup.id.timestamp}{MANIFEST_SUFFIX}.{secrets.token_hex(4)}" \
                              f"{PARTIAL_SUFFIX}"
        _write_file(partial, manifest.to_json(), 0o640)
        try:
            os.replace(partial, backup.manifest_path)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        if not backup.archive.exists():
            # pruned meanwhile: the replace must not bring back a manifest of nothing
            backup.manifest_path.unlink(missing_ok=True)
            raise UsageError(f"backup {backup.id} was removed meanwhile")
        fsync_dir(directory)
        return Backup(backup.id, manifest, backup.archive, backup.manifest_path)

    def _put_record(self, backup: Backup, name: str, result: Verification) -> None:
        """Write one verification record, ``STAMP.verify-<now>.json``, only if absent: on a
        versioned or write-once bucket a rewritten manifest would be a second version (a
        tampering alarm) or refused. A record of a backup removed meanwhile goes again."""
        raw = verification_record(str(backup.id), name, result)
        for _ in range(3):  # two verifies in one microsecond: the next microsecond
            stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
            key = check_key(f"{self.folder(backup.id)}/{backup.id.timestamp}{VERIFY_INFIX}"
                            f"{stamp}{MANIFEST_SUFFIX}")
            try:
                self.backend.put(key, raw, exclusive=True)
                break
            except ResourceError:
                continue
        else:
            raise ResourceError(f"{backup.id}: cannot name a new verification record")
        if not self._present(backup.archive_key):
            self._delete_versions(key)
            raise UsageError(f"backup {backup.id} was removed meanwhile")

    # -- removing -------------------------------------------------------------
    def _objects_of(self, bid: BackupId) -> builtins.list[str]:
        """Every key of ``bid``: the manifest first, then its data and its records."""
        keys = [self.key(bid, s) for s in (MANIFEST_SUFFIX, ARCHIVE_SUFFIX, MAP_SUFFIX,
                                            SNAPSHOT_SUFFIX)]
        if self.local is None:
            names = self._folder_names(self.folder(bid))
            keys += [f"{self.folder(bid)}/{n}" for n in sorted(names)
                     if (m := _RECORD_RE.fullmatch(n)) is not None
                     and m.group(1) == bid.timestamp]
        return keys

    def _delete_versions(self, key: str) -> None:
        """Remove every version of ``key`` (delete markers last): a plain delete on a
        versioned bucket only hides an object behind a marker. AuthError if refused."""
        if self.local is not None:
            self.backend.delete(key)
            return
        delete_versions(self.backend, key)

    def retained_until(self, bid: BackupId, *, now: float | None = None) -> float | None:
        """The latest Object Lock retention date (seconds since the epoch) of any version of
        ``bid``'s objects still in force at ``now``; None when nothing of it is retained
        (always, on a directory)."""
        if self.local is not None:
            return None
        now = time.time() if now is None else now
        dates = [v.retain_until for key in self._objects_of(bid)
                 for v in self.backend.versions(key)
                 if v.retain_until is not None and v.retain_until > now]
        return max(dates, default=None)

    def extend_retention(self, bid: BackupId | str, until: float) -> Locked:
        """Hold every version of backup ``bid``'s objects (manifest, data, records) and, for
        an image backup, every chunk its map names, under Object Lock until at least
        ``until``; never shortened. UsageError where the store cannot hold objects (a
        directory, a bucket without Object Lock); AuthError if the credentials may not
        (the proxy's); IntegrityError if the backup is broken (its map unreadable)."""
        backup = self.get(bid)
        if not isinstance(self.backend, Retaining) or self.local is not None:
            raise UsageError(f"{self.backend.location}: a directory repository cannot hold "
                             "backups under a retention (S3 Object Lock only)")
        backend = self.backend
        chunks = sorted(self.load_map(backup).referenced()) if backup.is_image else []

        def hold(key: str) -> tuple[int, float]:
            count, low = 0, float("inf")
            for v in backend.versions(key, retention=False):
                if v.deleted:
                    continue
                got = backend.extend_retention(key, version=v.version, until=until)
                if got is None:
                    raise UsageError(f"{backend.location}: the bucket has no Object Lock: its "
                                     "objects cannot be held", hint=(
                                         "Object Lock is chosen when a bucket is created: "
                                         "store init-s3 a new bucket with --object-lock"))
                count, low = count + 1, min(low, got)
            return count, low

        objects, held = 0, float("inf")
        # three requests an object: one at a time, a large image backup's chunks take hours
        with ThreadPoolExecutor(max_workers=HOLD_WORKERS, thread_name_prefix="hold") as pool:
            try:
                # a key of _objects_of that is not there (no state file) has no versions
                for count, low in pool.map(hold, [*self._objects_of(backup.id),
                                                  *map(self.naming.chunk_key, chunks)]):
                    objects, held = objects + count, min(held, low)
            except BaseException:
                pool.shutdown(cancel_futures=True)  # the first failure says it all
                raise
        return Locked(backup.id, objects, len(chunks), held)

    def delete(self, bid: BackupId) -> None:
        """Remove a backup: the manifest first, so it is never listed half-removed; then its
        archive or chunk map (its chunks stay until ``store gc`` finds them unreferenced),
        and on an object store every version of each, and its verification records.

        AuthError when the store refuses (the proxy's credentials, a retention): what was
        removed before stays removed, and a backup without its manifest is never listed.
        """
        for key in self._objects_of(bid):
            self._delete_versions(key)


#: object requests ``extend_retention`` keeps in flight (each a HEAD, a listing and a PUT)
HOLD_WORKERS = 8


@dataclass(frozen=True)
class Locked:
    """What :meth:`Repository.extend_retention` did: how many object versions (chunks among
    them) are now held, and the earliest date any of them is held until."""

    id: BackupId
    objects: int
    chunks: int
    until: float

    def to_dict(self) -> dict[str, Any]:
        return {"id": str(self.id), "objects": self.objects, "chunks": self.chunks,
                "until": utc_iso(datetime.fromtimestamp(self.until, UTC))}


def _folder_id(folder: str, stamp: str) -> BackupId:
    """The id a folder's last two names and a timestamp make (a keyed folder: its tokens);
    RefusedError if they are not a host and a slug."""
    host, slug = folder.split("/")[-2:]
    return BackupId(host, slug, stamp)


def image_failure(bid: BackupId, chunks: int, missing: Sequence[str],
                  bad: Sequence[tuple[str, str]], named: int = 5) -> str:
    """What a failed image verification says: the backup, the counts, the first chunks."""
    said = [f"{cid} missing" for cid in missing[:named]] + \
           [f"{cid} bad ({printable(why)[:120]})" for cid, why in bad[:named]]
    return (f"{bid}: {len(missing)} chunk(s) missing, {len(bad)} bad of {chunks}: "
            + "; ".join(said))


def _not_image(backup: Backup) -> None:
    """UsageError for an image backup where only an archive will do."""
    if backup.is_image:
        raise UsageError(f"{backup.id} is an image backup (no archive): restore it with "
                         "--image TARGET, or mount it")


def _commit_files(directory: Path, stamp: str, data: Sequence[tuple[Path, Path]],
                  manifest: Manifest, manifest_path: Path) -> None:
    """Publish each ``(partial, final)`` data file in order, then the manifest (the commit).

    No manifest, no backup: on any failure the data files already published go again,
    so none stays behind alone (a tar state file without its archive, a map without its
    manifest)."""
    published: list[Path] = []
    try:
        for partial, final in data:
            _publish(partial, final)
            published.append(final)
        fsync_dir(directory)
        partial = directory / (stamp + MANIFEST_SUFFIX + PARTIAL_SUFFIX)
        _write_file(partial, manifest.to_json(), 0o640)
        try:
            _publish(partial, manifest_path)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        fsync_dir(directory)
    except BaseException:
        for final in reversed(published):
            final.unlink(missing_ok=True)
        raise


class BackupWriter:
    """One backup being received: bytes go to a ``.partial`` file, hashed as they pass.

    Use as a context manager; leaving it without :meth:`commit` (an error, an
    interruption) removes the partial file::

        with repo.writer("fs1", "/srv/data") as w:
            w.write_from(stream)        # or w.write(chunk) per frame of a protocol
            w.commit({"file_count": 120})

    The partial file's descriptor stays open, flock-ed, until the archive is
    published or removed: that lock is how a sweeper tells this live writer
    from a dead one. With a :class:`Quota`, every write stays within what the
    writer has reserved (see the module docstring).

    On an object store (a backend without
    :class:`~sanoffload.store.backend.LocalFiles`) the archive and the state file
    stream into the backend's writers (multipart uploads on S3), nothing visible
    until the commit publishes them, then the manifest with ``put(exclusive=True)``.
    There are no reservations there: a quota refuses a put once the client's
    stored bytes reach it, the store's own quotas do the rest.
    """

    def __init__(self, repo: Repository, bid: BackupId, path: str, *,
                 client: str | None = None, quota: Quota | None = None,
                 check_on_receipt: bool = True) -> None:
        self.repo = repo
        self.id = bid
        self.path = path
        self.client = client
        self.quota = quota
        self.bytes = 0
        self._hash = hashlib.sha256()
        self._fd: int | None = None
        self._reservation: _Reservation | None = None
        self._sealed = False
        self._done = False
        #: the test-read, fed as the bytes arrive (started by the first write)
        self._check: tar.StreamCount | None = None
        self._checking = check_on_receipt and repo.runner is not None
        #: an object store's writers: the archive's, then the state file's
        self._obj: ObjectWriter | None = None
        self._snap_obj: ObjectWriter | None = None
        #: (sha256, bytes) of the state file received (an incremental backup), else None
        self.snapshot_received: tuple[str, int] | None = None
        if repo.local is None:
            self._open_object(repo, bid, quota)
            return
        self.directory = repo._dir(bid.host, bid.slug, create=True)
        self.archive = self.directory / (bid.timestamp + ARCHIVE_SUFFIX)
        self.manifest_path = self.directory / (bid.timestamp + MANIFEST_SUFFIX)
        self.partial = self.directory / (bid.timestamp + ARCHIVE_SUFFIX + PARTIAL_SUFFIX)
        self.snapshot = self.directory / (bid.timestamp + SNAPSHOT_SUFFIX)
        self._snapshot_partial = self.directory / (bid.timestamp + SNAPSHOT_SUFFIX
                                                   + PARTIAL_SUFFIX)
        with repo.lock():
            if self.archive.exists() or self.manifest_path.exists() or \
                    (self.directory / (bid.timestamp + MAP_SUFFIX)).exists():
                raise ResourceError(f"backup {bid} already exists")
            if quota is not None:
                used = repo.charged(quota.client, quota.hosts)
                others = repo.reserved(quota.client)
                if used + others >= quota.limit:
                    receiving = f", {others} bytes being received" if others else ""
                    raise ResourceError(f"client {quota.client}'s quota of {quota.limit} bytes "
                                        f"is used up ({used} bytes stored{receiving})",
                                        hint="prune old backups")
            self._sweep_dead_partials()
            # O_EXCL: a second upload of the same backup fails here instead of mixing bytes
            fd = os.open(self.partial,
                         os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # new, under the lock: free
                if quota is not None:
                    self._reservation = _Reservation.create(repo, quota.client, bid)
            except BaseException:
                os.close(fd)
                self.partial.unlink(missing_ok=True)
                raise
            self._fd = fd

    def _open_object(self, repo: Repository, bid: BackupId, quota: Quota | None) -> None:
        """Start the archive's upload on an object store (see the class docstring)."""
        # names for messages only: nothing is opened by them
        self.directory = repo._file(repo.folder(bid))
        self.archive = self.partial = repo._file(repo.key(bid, ARCHIVE_SUFFIX))
        self.manifest_path = repo._file(repo.key(bid, MANIFEST_SUFFIX))
        self.snapshot = self._snapshot_partial = repo._file(repo.key(bid, SNAPSHOT_SUFFIX))
        repo.check_new(bid, quota)
        self._obj = repo.backend.writer(repo.key(bid, ARCHIVE_SUFFIX))

    @property
    def _closed(self) -> bool:
        return self._fd is None and self._obj is None

    def _sweep_dead_partials(self) -> None:
        """Remove this object's partials left by dead writers; refuse if ours is alive."""
        _sweep_partial(self.partial)
        suffix = ARCHIVE_SUFFIX + PARTIAL_SUFFIX
        for name in sorted(os.listdir(self.directory)):
            if name.endswith(suffix) and _TIMESTAMP_RE.fullmatch(name[:-len(suffix)]):
                try:
                    _sweep_partial(self.directory / name)
                except (ResourceError, OSError):
                    continue  # alive, or not ours to judge: another put's business
        # a state file's partial carries no lock of its own: its writer holds the archive's
        # partial from before it creates it until after it is published or removed, so one
        # without an archive partial (swept just above, or gone) is a dead writer's. Left,
        # it would block a retry of the same backup (its name is taken with O_EXCL).
        snar = SNAPSHOT_SUFFIX + PARTIAL_SUFFIX
        for name in sorted(os.listdir(self.directory)):
            stamp = name[:-len(snar)]
            if name.endswith(snar) and _TIMESTAMP_RE.fullmatch(stamp) and \
                    not os.path.lexists(self.directory / (stamp + suffix)):
                log.warning("%s: removing a state file's partial whose writer is gone",
                            self.directory / name)
                (self.directory / name).unlink(missing_ok=True)

    def _reserve(self, need: int) -> None:
        """Hold at least ``need`` bytes of the client's quota, or ResourceError."""
        reservation, quota = self._reservation, self.quota
        assert reservation is not None and quota is not None
        reservation.grow(self.repo, quota, need)

    def __enter__(self) -> BackupWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if not self._done:
            self.abort()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Append one chunk of the compressed archive."""
        if self._closed or self._sealed:
            raise ValueError("backup writer is closed")
        view = memoryview(data).cast("B")
        if self._reservation is not None and self.bytes + len(view) > self._reservation.bytes:
            self._reserve(self.bytes + len(view))
        self._hash.update(view)
        if self._obj is not None:
            self._obj.write(view)
        else:
            assert self._fd is not None
            _write_all(self._fd, view, full=f"{self.directory}: no space left for {self.id}")
        self.bytes += len(view)
        if self._checking:
            if self._check is None:
                self._check = tar.StreamCount(self.repo.command_runner(),
                                              timeout=RECEIPT_CHECK_TIMEOUT)
            try:
                self._check.feed(view)
            except (CommandNotFoundError, CommandTimeoutError):
                raise
            except CommandError as exc:
                raise IntegrityError(f"{self.id}: what arrives cannot be read back: {exc}") \
                    from None

    def write_from(self, stream: ByteSource) -> int:
        """Copy ``stream`` to its end, CHUNK at a time; returns the bytes copied."""
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        start = self.bytes
        readinto = getattr(stream, "readinto", None)
        while True:
            if readinto is not None:
                n = readinto(buf)
                if n is None:
                    raise UsageError("the input stream is non-blocking: give a blocking one")
                if not n:
                    break
                self.write(view[:n])
            else:
                chunk = stream.read(CHUNK)
                if chunk is None:
                    raise UsageError("the input stream is non-blocking: give a blocking one")
                if not chunk:
                    break
                self.write(chunk)
        return self.bytes - start

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()

    def write_snapshot(self, chunks: Iterable[bytes | bytearray | memoryview]) -> tuple[str, int]:
        """Receive the state file of an incremental backup (after the archive, before the
        commit): at most ``tar.MAX_SNAPSHOT_BYTES``, its header parsed strictly; returns
        ``(sha256, bytes)``. Published as ``STAMP.snar`` before the manifest."""
        if self._closed or self._done or self.snapshot_received is not None:
            raise ValueError("backup writer is closed or has its state file")
        h = hashlib.sha256()
        size = 0
        head = b""
        if self._obj is not None:
            self._snap_obj = self.repo.backend.writer(self.repo.key(self.id, SNAPSHOT_SUFFIX))
            fd = -1
        else:
            fd = os.open(self._snapshot_partial,
                         os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0o600)
        try:
            for chunk in chunks:
                view = memoryview(chunk).cast("B")
                size += len(view)
                if size > tar.MAX_SNAPSHOT_BYTES:
                    raise IntegrityError(f"{self.id}: the state file is larger than "
                                         f"{tar.MAX_SNAPSHOT_BYTES} bytes")
                # the state file is stored too: the quota holds it with the archive
                if self._reservation is not None and \
                        self.bytes + size > self._reservation.bytes:
                    self._reserve(self.bytes + size)
                if len(head) < 256:
                    head += bytes(view[:256 - len(head)])
                h.update(view)
                if self._snap_obj is not None:
                    self._snap_obj.write(view)
                else:
                    _write_all(fd, view)
            try:
                tar.parse_snapshot_header(head)
            except ValueError as exc:
                raise IntegrityError(f"{self.id}: {exc}") from None
            if fd >= 0:
                os.fsync(fd)
        except BaseException:
            if self._snap_obj is not None:
                self._snap_obj.abort()
                self._snap_obj = None
            else:
                os.close(fd)
                self._snapshot_partial.unlink(missing_ok=True)
            raise
        if fd >= 0:
            os.close(fd)
        self.snapshot_received = (h.hexdigest(), size)
        return self.snapshot_received

    def abort(self) -> None:
        """Forget this backup: remove the partial file (and anything published), then unlock."""
        self._done = True
        if self._fd is not None:
            # removed while still locked: a sweeper that gets the lock finds nothing to remove
            self.partial.unlink(missing_ok=True)
            self._snapshot_partial.unlink(missing_ok=True)
        for obj in (self._obj, self._snap_obj):
            if obj is not None:
                obj.abort()
        self._obj = self._snap_obj = None
        self._close()

    def _close(self) -> None:
        if self._check is not None:
            self._check.abort()  # a no-op once it has finished
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._reservation is not None:
            self._reservation.release()
            self._reservation = None

    def commit(self, fields: Mapping[str, Any] | None = None, *, verify: bool = True) -> Backup:
        """fsync, check against the sender's counts, test-read, publish archive then manifest.

        Any failure removes everything this writer made, published or not.
        """
        if self._closed or self._done or self._sealed:
            raise ValueError("backup writer is closed")
        try:
            backup = self._commit(fields, verify)
        except BaseException:
            self.abort()
            raise
        self._done = True
        # the manifest is published: the bytes are charged as stored, the reservation can go
        self._close()
        log.info("stored %s: %d bytes, sha256 %s", self.id, self.bytes, backup.manifest.sha256)
        return backup

    def _commit(self, fields: Mapping[str, Any] | None, verify: bool) -> Backup:
        try:
            values = sender_fields(fields)
        except ValueError as exc:
            raise UsageError(f"manifest fields: {exc}") from None
        if self._fd is not None:
            os.fsync(self._fd)
            # read-only from now on: nothing should ever write into a stored archive; the
            # descriptor stays open (and locked) until the end: the put is alive until then
            os.fchmod(self._fd, 0o440)
        self._sealed = True
        digest = self.sha256
        expected = values.pop("sha256", None)
        if expected is not None and expected != digest:
            raise IntegrityError(f"{self.id}: received data has sha256 {digest}, "
                                 f"the sender says {expected}")
        sent = values.pop("archive_bytes", None)
        if sent is not None and sent != self.bytes:
            raise IntegrityError(f"{self.id}: received {self.bytes} bytes, the sender says {sent}")
        self._check_snapshot(values)
        members: int | None = None
        if verify and self._check is not None:
            # the test-read ran while the bytes arrived: only its end is waited for
            try:
                members = self._check.finish()
            except (CommandNotFoundError, CommandTimeoutError):
                raise
            except CommandError as exc:
                raise IntegrityError(f"{self.partial.name}: cannot be read back: {exc}") \
                    from None
            check = Verification.now(VERIFIED_OK, "on receipt")
        elif verify and self._obj is not None:
            # nothing to read back by path on an object store: the check runs on receipt
            raise UsageError(f"{self.id}: an object store's backup is test-read as it arrives "
                             "(open the writer with check_on_receipt and a command runner)")
        elif verify:
            members = self.repo.test_read(self.partial,
                                          timeout=read_timeout(self.bytes,
                                                               values.get("source_bytes")))
            check = Verification.now(VERIFIED_OK, "on receipt")
        else:
            check = Verification.now(NOT_VERIFIED)
        manifest = Manifest(host=self.id.host, path=self.path, slug=self.id.slug,
                            timestamp=self.id.timestamp, archive_bytes=self.bytes, sha256=digest,
                            member_count=members, stored_at=utc_iso(datetime.now(UTC)),
                            verification=check, client=self.client, **values)
        if self._obj is not None:
            self._commit_objects(manifest)
            return Backup(self.id, manifest, self.archive, self.manifest_path,
                          self.repo.folder(self.id) if self.repo.naming.keyed else None)
        data = [(self.partial, self.archive)]
        if self.snapshot_received is not None:
            # before the archive and the manifest (the commit): a listed incremental backup
            # always has its state file
            data.insert(0, (self._snapshot_partial, self.snapshot))
        _commit_files(self.directory, self.id.timestamp, data, manifest, self.manifest_path)
        return Backup(self.id, manifest, self.archive, self.manifest_path)

    def _commit_objects(self, manifest: Manifest) -> None:
        """Publish the state file, the archive, then the manifest (the commit) on an object
        store; on any failure what was published goes again (best effort: a proxy's
        credentials may not delete, and gc finds objects no manifest names)."""
        published: list[str] = []
        try:
            for name in ("_snap_obj", "_obj"):
                obj = getattr(self, name)
                if obj is not None:
                    obj.commit()
                    setattr(self, name, None)  # published: nothing left to abort
                    published.append(obj.key)
            self.repo.backend.put(self.repo.key(self.id, MANIFEST_SUFFIX), manifest.to_json(),
                                  exclusive=True)
        except BaseException:
            for key in reversed(published):
                try:
                    self.repo.backend.delete(key)
                except (OSError, AuthError, ResourceError) as exc:
                    log.warning("%s: left for gc: %s", printable(key), exc)
            raise

    def _check_snapshot(self, values: dict[str, Any]) -> None:
        """An incremental backup's fields against the state file received (filled in from
        it); IntegrityError on a mismatch, UsageError for a state file without a level."""
        got = self.snapshot_received
        if values.get("tar_level") is None:
            if got is not None:
                raise UsageError(f"{self.id}: a state file arrived for a backup without a "
                                 "tar_level")
            return
        if got is None:
            raise UsageError(f"{self.id}: an incremental backup (tar_level "
                             f"{values['tar_level']}) without its state file")
        for key, have in (("snapshot_sha256", got[0]), ("snapshot_bytes", got[1])):
            said = values.get(key)
            if said is not None and said != have:
                raise IntegrityError(f"{self.id}: the state file received has {key} {have}, "
                                     f"the sender says {said}")
            values[key] = have
        if values["tar_level"] == 0:
            values["chain"] = str(self.id)  # a level 0 is its own chain
        elif values.get("parent") is not None:
            parent = BackupId.parse(values["parent"])
            if (parent.host, parent.slug) != (self.id.host, self.id.slug):
                raise UsageError(f"{self.id}: parent {parent} is a backup of another path")
            try:
                links = self.repo.chain(parent)
            except (IntegrityError, UsageError) as exc:
                raise IntegrityError(f"{self.id}: its parent's chain: {exc.message}") from None
            pm = links[-1].manifest
            if pm.tar_level != values["tar_level"] - 1 or pm.chain_id != values.get("chain"):
                raise UsageError(f"{self.id}: parent {parent} is not level "
                                 f"{values['tar_level'] - 1} of chain {values.get('chain')}")


class QuotaHold:
    """A put's hold on its client's quota, for writers other than :class:`BackupWriter`
    (an image backup's sink): checked and created under the repository lock, grown ahead
    of the bytes, released when the manifest is published or the put fails."""

    def __init__(self, repo: Repository, quota: Quota, bid: BackupId) -> None:
        self.repo = repo
        self.quota = quota
        self.id = bid
        with repo.lock():
            used = repo.charged(quota.client, quota.hosts)
            others = repo.reserved(quota.client)
            if used + others >= quota.limit:
                raise ResourceError(f"client {quota.client}'s quota of {quota.limit} bytes is "
                                    f"used up ({used} bytes stored, {others} being received)",
                                    hint="prune old backups, then run store gc")
            self._reservation: _Reservation | None = _Reservation.create(repo, quota.client,
                                                                         bid)

    def need(self, total: int) -> None:
        """Hold at least ``total`` bytes in all, or ResourceError."""
        reservation, quota = self._reservation, self.quota
        if reservation is None:
            raise ValueError("quota hold released")
        if total > reservation.bytes:
            reservation.grow(self.repo, quota, total)

    def release(self) -> None:
        if self._reservation is not None:
            self._reservation.release()
            self._reservation = None


class _Reservation:
    """One put's claim on its client's quota: a flock-held file naming the client and bytes."""

    def __init__(self, path: Path, fd: int, client: str, bid: BackupId) -> None:
        self.path = path
        self.fd = fd
        self.client = client
        self.id = bid
        self.bytes = 0

    @classmethod
    def create(cls, repo: Repository, client: str, bid: BackupId) -> _Reservation:
        """A new, empty reservation; call with the repository lock held."""
        directory = repo.root / RESERVATIONS
        try:
            directory.mkdir(mode=0o700)
        except FileExistsError:
            if not stat.S_ISDIR(os.lstat(directory).st_mode):
                raise ResourceError(f"{directory} is not a directory: cannot reserve quota") \
                    from None
        path = directory / f"{secrets.token_hex(8)}.json"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            reservation = cls(path, fd, client, bid)
            reservation.set(0)
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        return reservation

    def grow(self, repo: Repository, quota: Quota, need: int) -> None:
        """Hold at least ``need`` bytes of ``quota``, or ResourceError (takes the lock)."""
        with repo.lock():
            used = repo.charged(quota.client, quota.hosts)
            others = repo.reserved(quota.client, besides=self.path)
            room = quota.limit - used - others
            if need > room:
                raise ResourceError(f"client {quota.client}'s quota of {quota.limit} bytes would "
                                    f"be exceeded by {self.id} ({used} bytes stored, {others} "
                                    "being received by other puts)", hint="prune old backups")
            # ahead of the data, so that growing is rare; never past the room there is
            self.set(min(room, need + max(QUOTA_STEP, self.bytes // 4)))

    def set(self, size: int) -> None:
        """Hold ``size`` bytes; call with the repository lock held (readers hold it too)."""
        data = json.dumps({"client": self.client, "bytes": size, "id": str(self.id)}).encode()
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)
        self.bytes = size

    def release(self) -> None:
        """Give the bytes back: the file goes, then the lock."""
        self.path.unlink(missing_ok=True)
        os.close(self.fd)
