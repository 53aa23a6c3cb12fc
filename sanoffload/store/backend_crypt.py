"""An encrypting :class:`~sanoffload.store.backend.Backend` over any other one.

:class:`EncryptedBackend` seals every object body with :mod:`sanoffload.store.crypt`
before it reaches the inner backend (a directory, S3) and opens it on the way
back. The object's key, exactly as stored in the inner backend, is in each
segment's AAD: an object moved or copied to another key does not open there.

**Keys pass through unchanged.** Hiding what names say (a chunk's content hash,
a host or a volume name) is the repository layout's job, which names chunks
with :func:`~sanoffload.store.crypt.chunk_name` and host/slug folders with
:func:`~sanoffload.store.crypt.name_token`; this layer only hides bodies.

**What the store still sees**: every key, each object's stored size (the
plaintext size plus 43 bytes and 16 per segment, so the plaintext size is
exactly known: :func:`plaintext_size`), its write time, and the pattern of
reads and writes. Sizes reported here (``stat``, ``list``, ``versions``, a
commit) are plaintext sizes, converted back exactly from the stored size with
the repository's segment size (every object is sealed with it); a stored size
no plaintext size gives is an IntegrityError naming the key.

**The repository config** (:data:`CONFIG_KEY`) is the one object left in the
clear: a small JSON document naming the repository id, the algorithm and the
segment size, so that a key of another repository is refused by id
(RepositoryKeyError, both ids named) before any object is decrypted::

    {"format": "sanoffload-repository", "version": 1, "encryption": "client",
     "repo_id": "<32 hex>", "alg": "aes-256-gcm", "segment": 1048576,
     "mac": "<64 hex: HMAC-SHA256(id_key, the other fields)>"}

    {"format": "sanoffload-repository", "version": 1, "encryption": "none"}

The store can rewrite it: the MAC makes a changed segment size or algorithm an
IntegrityError for whoever holds the key, and a config turned to ``"none"``
is refused by :func:`open_encrypted` (never read as plaintext). Whether a
repository *should* be encrypted is the caller's setting (on by default for
S3), not the config's: a store that drops or rewrites the config gets an
error, not plaintext.
"""

from __future__ import annotations

import builtins
import hashlib
import hmac
import json
import re
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Any

from ..errors import IntegrityError, RepositoryKeyError, ResourceError, UsageError
from ..text import printable
from . import crypt
from .backend import (
    Backend,
    ByteReader,
    NotFound,
    ObjectInfo,
    ObjectWriter,
    Retaining,
    Upload,
    check_key,
)
from .keys import RepoKeys, check_repo_id

#: the repository's unencrypted config object (reserved: never an encrypted object's key)
CONFIG_KEY = "config"
CONFIG_FORMAT = "sanoffload-repository"
CONFIG_VERSION = 1
#: a config is about 250 bytes; anything this big is not one, and is not read whole
MAX_CONFIG_BYTES = 4096
ENCRYPTION_NONE = "none"
ENCRYPTION_CLIENT = "client"
#: the config's algorithm names -> crypt's header byte
ALGS = {"aes-256-gcm": crypt.ALG_AES256_GCM}
DEFAULT_ALG = "aes-256-gcm"

_MAC_CONTEXT = b"sanoffload-config\0"
_HEX32 = re.compile(r"[0-9a-f]{32}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_CLIENT_FIELDS = frozenset({"format", "version", "encryption", "repo_id", "alg", "segment",
                            "mac"})
_NONE_FIELDS = frozenset({"format", "version", "encryption"})

#: what a stream reads from the inner one at a time: small beside a segment, so the
#: decryptor holds about one sealed segment rather than two
READ_SIZE = 64 << 10

#: what a key loader gets: the repository id the config names (32 hex digits), so a key file
#: of another repository is refused before its passphrase is asked or scrypt runs
KeyLoader = Callable[[str], RepoKeys]


def plaintext_size(stored: int, segment: int = crypt.DEFAULT_SEGMENT, *,
                   key: str = "an object") -> int:
    """The plaintext size of a sealed object of ``stored`` bytes (the exact inverse of
    :func:`~sanoffload.store.crypt.ciphertext_size`); IntegrityError naming ``key`` for a
    size no plaintext gives (an object cut short, padded, or not sealed by us)."""
    crypt.ciphertext_size(0, segment)  # checks the segment size (UsageError)
    ok_type = isinstance(stored, int) and not isinstance(stored, bool)
    body = stored - crypt.HEADER_BYTES if ok_type else -1
    if body >= crypt.TAG_BYTES:
        sealed = segment + crypt.TAG_BYTES
        n = body - -(-body // sealed) * crypt.TAG_BYTES
        # segments hold `segment` bytes but the last (1..segment, 0 only when it is the
        # only one): a last segment of just a tag after a full one has no plaintext size
        if n >= 0 and crypt.ciphertext_size(n, segment) == stored:
            return n
    raise IntegrityError(f"encrypted object {printable(key)}: a stored size of {stored} bytes "
                         f"is no sealed object's (segment {segment}): cut short, padded, or "
                         "not written by sanoffload")


def _reserved(key: str) -> str:
    if check_key(key) == CONFIG_KEY:
        raise UsageError(f"{CONFIG_KEY!r} is the repository's unencrypted config, not an "
                         "object to read or write through its key")
    return key


class EncryptedBackend:
    """A :class:`Backend` that seals what it stores in ``inner`` (see the module docstring)."""

    def __init__(self, inner: Backend, keys: RepoKeys, *,
                 segment: int = crypt.DEFAULT_SEGMENT) -> None:
        crypt.ciphertext_size(0, segment)  # UsageError for a segment size crypt refuses
        self.inner = inner
        self.keys = keys
        self.segment = segment
        self.location = inner.location

    def _plain(self, info: ObjectInfo) -> ObjectInfo:
        if info.deleted:  # a delete marker has no body
            return info
        return replace(info, size=plaintext_size(info.size, self.segment,
                                                 key=f"{self.location}/{info.key}"))

    # -- reading ------------------------------------------------------------------------------
    def get(self, key: str, *, max_bytes: int, version: str | None = None) -> bytes:
        """The whole plaintext; NotFound; IntegrityError if it is bigger than ``max_bytes`` (the
        inner backend is asked for no more than that much plaintext's ciphertext) or does not
        authenticate."""
        _reserved(key)
        blob = self.inner.get(key, max_bytes=crypt.ciphertext_size(max_bytes, self.segment),
                              version=version)
        return crypt.decrypt_object(self.keys, key, blob, max_plain=max_bytes)

    def open_read(self, key: str, *, version: str | None = None) -> DecryptingReader:
        """A stream of the plaintext, one authenticated segment at a time; NotFound."""
        _reserved(key)
        return DecryptingReader(self.inner.open_read(key, version=version),
                                crypt.Decryptor(self.keys, key))

    def stat(self, key: str) -> ObjectInfo | None:
        info = self.inner.stat(_reserved(key))
        return None if info is None else self._plain(info)

    def list(self, prefix: str = "", *, shallow: bool = False) -> Iterator[ObjectInfo]:
        """The inner listing with plaintext sizes, the config left out."""
        for info in self.inner.list(prefix, shallow=shallow):
            if info.key != CONFIG_KEY:
                yield self._plain(info)

    def versions(self, key: str, *, retention: bool = True) -> builtins.list[ObjectInfo]:
        return [self._plain(v) for v in self.inner.versions(_reserved(key), retention=retention)]

    def extend_retention(self, key: str, *, version: str | None, until: float) -> float | None:
        """The inner store's (None over one that cannot hold objects: a directory)."""
        if not isinstance(self.inner, Retaining):
            return None
        return self.inner.extend_retention(_reserved(key), version=version, until=until)

    # -- writing ------------------------------------------------------------------------------
    def put(self, key: str, data: bytes, *, exclusive: bool = True) -> ObjectInfo:
        """Seal ``data`` whole and store it; the info has the plaintext size."""
        blob = crypt.encrypt_object(self.keys, _reserved(key), data, segment=self.segment)
        return replace(self.inner.put(key, blob, exclusive=exclusive), size=len(data))

    def writer(self, key: str, *, size_hint: int | None = None) -> EncryptingWriter:
        """A writer sealing segment by segment into the inner writer (bounded memory);
        ``size_hint`` is the plaintext size (the inner writer gets the stored size)."""
        _reserved(key)
        hint = None if size_hint is None else crypt.ciphertext_size(max(0, size_hint),
                                                                     self.segment)
        return EncryptingWriter(self.inner.writer(key, size_hint=hint), self.keys,
                                segment=self.segment)

    # -- passed through -----------------------------------------------------------------------
    def delete(self, key: str, *, version: str | None = None) -> None:
        self.inner.delete(_reserved(key), version=version)

    def stale_uploads(self, older_than: float) -> Iterator[Upload]:
        return self.inner.stale_uploads(older_than)

    def abort_upload(self, upload: Upload) -> None:
        self.inner.abort_upload(upload)


class EncryptingWriter:
    """An :class:`ObjectWriter` that seals into an inner writer: at most about one segment
    (plus what one :meth:`write` hands in) is held here."""

    def __init__(self, inner: ObjectWriter, keys: RepoKeys, *,
                 segment: int = crypt.DEFAULT_SEGMENT) -> None:
        self.inner = inner
        self.key = inner.key
        self._enc = crypt.Encryptor(keys, inner.key, inner.write, segment=segment)
        self._committed = False

    def write(self, data: bytes | bytearray | memoryview, /) -> None:
        self._enc.write(memoryview(data).cast("B"))

    def commit(self) -> ObjectInfo:
        """Seal the last segment and commit the inner writer; the info has the plaintext size."""
        if self._committed:
            raise ValueError(f"object writer of {self.key!r} is closed")
        self._enc.close()
        info = self.inner.commit()
        self._committed = True
        return replace(info, size=self._enc.plain_bytes)

    def abort(self) -> None:
        """Drop what was written; safe to repeat, and after a failed commit."""
        if not self._committed:
            self._enc.closed = True  # a later write is refused, not sealed into a dead upload
            self.inner.abort()

    def __enter__(self) -> EncryptingWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.abort()


class DecryptingReader:
    """A :class:`ByteReader` of plaintext over a stream of ciphertext.

    Plaintext comes out one authenticated segment at a time (never a byte of a
    segment that did not authenticate); damage is an IntegrityError, raised again
    by every later read rather than looking like the end. Memory: about one sealed
    segment and a read of the inner stream, twice a segment of plaintext while one is
    opened, and the plaintext not read yet.
    """

    def __init__(self, inner: ByteReader, decryptor: crypt.Decryptor, *,
                 read_size: int = READ_SIZE) -> None:
        self._inner = inner
        self._dec = decryptor
        self._read_size = read_size
        self._ready: deque[bytes] = deque()
        self._offset = 0  # into _ready[0]
        self._buffered = 0
        self._eof = False
        self._error: IntegrityError | None = None

    def _fill(self) -> None:
        if self._error is not None:
            raise self._error
        data = self._inner.read(self._read_size)
        try:
            pieces = self._dec.feed(data) if data else [self._dec.close()]
        except IntegrityError as exc:
            self._error = exc
            raise
        if not data:
            self._eof = True
        for piece in pieces:
            if piece:
                self._ready.append(piece)
                self._buffered += len(piece)

    def read(self, size: int = -1, /) -> bytes:
        """At most ``size`` bytes of plaintext (all that is left if negative); ``b""`` at the
        end; IntegrityError if the object does not authenticate up to there."""
        if self._error is not None:
            raise self._error
        want = size if size >= 0 else None
        while not self._eof and (want is None or self._buffered < want):
            self._fill()
        out = bytearray()
        while self._ready and (want is None or len(out) < want):
            head = self._ready[0]
            take = len(head) - self._offset if want is None \
                else min(len(head) - self._offset, want - len(out))
            out += memoryview(head)[self._offset:self._offset + take]
            self._offset += take
            self._buffered -= take
            if self._offset == len(head):
                self._ready.popleft()
                self._offset = 0
        return bytes(out)

    def close(self) -> None:
        self._ready.clear()
        self._buffered = 0
        self._inner.close()

    def __enter__(self) -> DecryptingReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- the repository config ------------------------------------------------------------------------
@dataclass(frozen=True)
class RepoConfig:
    """What a repository's config object says (checked, not yet authenticated)."""

    encrypted: bool
    repo_id: str | None = None
    alg: str | None = None
    segment: int | None = None
    mac: str | None = None

    def _fields(self) -> dict[str, Any]:
        if not self.encrypted:
            return {"format": CONFIG_FORMAT, "version": CONFIG_VERSION,
                    "encryption": ENCRYPTION_NONE}
        return {"format": CONFIG_FORMAT, "version": CONFIG_VERSION,
                "encryption": ENCRYPTION_CLIENT, "repo_id": self.repo_id, "alg": self.alg,
                "segment": self.segment}


def _config_mac(keys: RepoKeys, config: RepoConfig) -> str:
    body = json.dumps(config._fields(), sort_keys=True, separators=(",", ":")).encode()
    return hmac.new(keys.id_key, _MAC_CONTEXT + body, hashlib.sha256).hexdigest()


def init_config(inner: Backend, keys: RepoKeys | None, *,
                segment: int = crypt.DEFAULT_SEGMENT) -> RepoConfig:
    """Write a new repository's config (never over an existing one: ResourceError): encrypted
    with ``keys``, or ``"encryption": "none"`` when ``keys`` is None."""
    if keys is None:
        config = RepoConfig(encrypted=False)
    else:
        crypt.ciphertext_size(0, segment)
        config = RepoConfig(encrypted=True, repo_id=keys.repo_id_hex, alg=DEFAULT_ALG,
                            segment=segment)
        config = replace(config, mac=_config_mac(keys, config))
    doc = config._fields()
    if config.mac is not None:
        doc["mac"] = config.mac
    raw = (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()
    try:
        inner.put(CONFIG_KEY, raw, exclusive=True)
    except ResourceError:
        raise ResourceError(f"{inner.location} already has a repository config: not replacing "
                            "it", hint="open the repository instead, or choose an empty "
                            "location") from None
    return config


def _no_duplicates(pairs: builtins.list[tuple[str, Any]]) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    for name, value in pairs:
        if name in doc:  # parsers disagree on which one wins: refuse the ambiguity
            raise ValueError(f"field {name!r} given twice")
        doc[name] = value
    return doc


def read_config(inner: Backend) -> RepoConfig | None:
    """The repository config in ``inner``, checked as hostile input; None if there is none.

    IntegrityError for anything that is not a config this sanoffload reads (too
    big, not JSON, a field missing, unknown or of the wrong type, another version).
    """
    where = f"repository config {printable(inner.location)}/{CONFIG_KEY}"
    try:
        raw = inner.get(CONFIG_KEY, max_bytes=MAX_CONFIG_BYTES)
    except NotFound:
        return None
    except IntegrityError as exc:
        raise IntegrityError(f"{where}: not a sanoffload repository config: {exc}") from None

    def bad(why: str) -> IntegrityError:
        return IntegrityError(f"{where}: not a sanoffload repository config: {why}")

    try:
        doc = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise bad(f"not JSON ({printable(str(exc))[:80]})") from None
    if not isinstance(doc, dict):
        raise bad("not a JSON object")
    if doc.get("format") != CONFIG_FORMAT:
        raise bad(f"format is not {CONFIG_FORMAT!r}")
    version = doc.get("version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise bad(f"version {printable(repr(version))[:40]} is not a whole number")
    if version != CONFIG_VERSION:
        raise IntegrityError(f"{where}: format version {version}; this sanoffload reads "
                             f"{CONFIG_VERSION}", hint="a newer sanoffload made this "
                             "repository: use that one")
    encryption = doc.get("encryption")
    known = {ENCRYPTION_NONE: _NONE_FIELDS, ENCRYPTION_CLIENT: _CLIENT_FIELDS}
    fields = known.get(encryption) if isinstance(encryption, str) else None
    if fields is None:
        raise bad(f"encryption {printable(repr(encryption))[:40]} (known: "
                  f"{ENCRYPTION_CLIENT}, {ENCRYPTION_NONE})")
    unknown = set(doc) - fields
    missing = fields - set(doc)
    if unknown or missing:
        raise bad("; ".join(
            ([f"unknown fields {printable(', '.join(sorted(unknown)))[:80]}"] if unknown else [])
            + ([f"missing {', '.join(sorted(missing))}"] if missing else [])))
    if encryption == ENCRYPTION_NONE:
        return RepoConfig(encrypted=False)
    repo_id, alg, segment, mac = doc["repo_id"], doc["alg"], doc["segment"], doc["mac"]
    if not isinstance(repo_id, str) or not _HEX32.fullmatch(repo_id):
        raise bad("repo_id is not 32 lower-case hex digits")
    if alg not in ALGS:
        raise bad(f"alg {printable(repr(alg))[:40]} (known: {', '.join(ALGS)})")
    if isinstance(segment, bool) or not isinstance(segment, int) \
            or not crypt.MIN_SEGMENT <= segment <= crypt.MAX_SEGMENT:
        raise bad(f"segment {printable(repr(segment))[:40]} is not a whole number in "
                  f"{crypt.MIN_SEGMENT}..{crypt.MAX_SEGMENT}")
    if not isinstance(mac, str) or not _HEX64.fullmatch(mac):
        raise bad("mac is not 64 lower-case hex digits")
    return RepoConfig(encrypted=True, repo_id=repo_id, alg=alg, segment=segment, mac=mac)


def _not_encrypted(location: str, why: str) -> RepositoryKeyError:
    return RepositoryKeyError(f"{printable(location)}: {why}: it is not an encrypted "
                              "repository, and a key is of no use for it",
                              hint="open it without a key, or give the location of the "
                              "encrypted repository this key belongs to")


def open_encrypted(inner: Backend, key_loader: KeyLoader | RepoKeys) -> EncryptedBackend:
    """The encrypted repository in ``inner``, opened with the key ``key_loader`` gives.

    The config is read and checked first; the key is asked for (``key_loader(repo_id)``)
    only for an encrypted repository, and its repository id is compared with the config's
    before anything is decrypted: a key of another repository is a RepositoryKeyError
    naming both ids. A repository without a config, or with ``"encryption": "none"``, is a
    RepositoryKeyError saying so (never read as if it were sealed, or as plaintext).
    """
    return _open_encrypted(inner, read_config(inner), key_loader)


def _open_encrypted(inner: Backend, config: RepoConfig | None,
                    key_loader: KeyLoader | RepoKeys) -> EncryptedBackend:
    if config is None:
        raise _not_encrypted(inner.location, f"no {CONFIG_KEY!r} object (not a repository "
                                             "yet, or one made without encryption)")
    if not config.encrypted:
        raise _not_encrypted(inner.location, f"its config says encryption {ENCRYPTION_NONE!r}")
    assert config.repo_id is not None and config.segment is not None and config.mac is not None
    keys = key_loader if isinstance(key_loader, RepoKeys) else key_loader(config.repo_id)
    check_repo_id(keys, config.repo_id, source="the key given")
    if not hmac.compare_digest(_config_mac(keys, config), config.mac):
        raise IntegrityError(f"repository config {printable(inner.location)}/{CONFIG_KEY} does "
                             f"not authenticate under the key of repository {config.repo_id}: "
                             "it was altered (segment size, algorithm), or the key file's "
                             "repository id is not its own")
    return EncryptedBackend(inner, keys, segment=config.segment)


def open_repository(inner: Backend, key_loader: KeyLoader | RepoKeys | None) -> Backend:
    """``inner`` as the repository its config says: encrypted (a key is then required) or
    plain (a key given is refused). No config at all is a plain repository of an older
    sanoffload, unless a key was given."""
    config = read_config(inner)
    if key_loader is not None:
        return _open_encrypted(inner, config, key_loader)
    if config is not None and config.encrypted:
        raise RepositoryKeyError(f"{printable(inner.location)} is an encrypted repository "
                                 f"({config.repo_id}): its key is needed",
                                 hint="give the repository's key file")
    return inner
