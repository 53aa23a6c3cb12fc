"""Client-side encryption of repository objects: what the object store sees is ciphertext.

Every object (a chunk, a manifest, a map, a whole tar archive) is sealed under
its own key and laid out as::

    header   b"SOENC" | version (1 byte) | alg (1 byte) | segment size (u32 BE) | salt (32)
    segment  AES-256-GCM(k, nonce_i, plain_i, aad = header | object name)   (len(plain_i) + 16)
    ...

* ``k = HKDF-SHA256(enc_key, salt, info=b"sanoffload obj v1")`` with a fresh
  random salt per object, so nonces can be counters: ``nonce_i`` is ``i`` as
  11 big-endian bytes and one byte that is 1 on the last segment only (the
  STREAM construction of age and Tink). A random 96-bit nonce per segment
  would run into GCM's birthday bound on a repository's worth of segments
  under one key; a fresh key per object has no such bound.
* The counter catches reordered and dropped segments; the last-flag catches
  an object cut at a segment boundary; the name in the AAD catches an object
  copied or moved to another name (a manifest of yesterday served as today's,
  one chunk served for another): the store can only hand back what it was
  given, under the name it was given for.
* Segments bound memory (1 MiB by default: a multipart upload is fed whole
  segments) and keep each AES-GCM call far below pyca's 2**31-byte and GCM's
  64 GiB limits.

Every segment but the last holds exactly ``segment`` plaintext bytes; the last
holds 1 to ``segment`` bytes (0 only for an empty object), so the ciphertext
size of ``n`` plaintext bytes is known in advance (:func:`ciphertext_size`).

A wrong key cannot be told from damage here: AES-GCM fails the same way for
both. The repository's unencrypted config names the repository id its key must
have, so a key of another repository is refused (RepositoryKeyError, exit 15)
by :mod:`sanoffload.store.keys` before any object is read; what fails here is
an IntegrityError (exit 12) whose message names both causes.

Names: chunk and path names are HMAC-SHA256 under ``id_key`` (:func:`chunk_name`,
:func:`name_token`), so the store cannot confirm a guess of what a chunk holds
or whose backup a folder is.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import struct
from collections.abc import Callable
from enum import Enum
from typing import TYPE_CHECKING

from ..errors import IntegrityError, UsageError
from ..text import printable
from .pyca import AESGCM, HKDF, InvalidTag, hashes

if TYPE_CHECKING:  # keys imports nothing from here; the type is only for signatures
    from .keys import RepoKeys

MAGIC = b"SOENC"
VERSION = 1
#: the one algorithm so far; the byte exists so a second one can be added
ALG_AES256_GCM = 1
SALT_BYTES = 32
TAG_BYTES = 16
_HEADER = struct.Struct(">5sBBI32s")
HEADER_BYTES = _HEADER.size  # 43
HKDF_INFO = b"sanoffload obj v1"

DEFAULT_SEGMENT = 1 << 20
#: a header may name any size in this range: below, a crafted object costs an AES-GCM call
#: per few bytes; above, one segment is more memory than a reader should hold for it
MIN_SEGMENT = 1 << 12
MAX_SEGMENT = 16 << 20

#: names longer than this are not repository names (a bug or a hostile caller)
MAX_NAME_BYTES = 1024
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


class NameKind(Enum):
    """Which path component :func:`name_token` hides: separate domains, so a host named like
    a slug never gets the slug's token."""

    HOST = "host"
    SLUG = "slug"


def _check_segment(segment: int) -> int:
    if isinstance(segment, bool) or not isinstance(segment, int) \
            or not MIN_SEGMENT <= segment <= MAX_SEGMENT:
        raise UsageError(f"segment size {segment!r} is not within {MIN_SEGMENT}..{MAX_SEGMENT}")
    return segment


def _name_bytes(name: str) -> bytes:
    if not isinstance(name, str) or not name:
        raise UsageError("an encrypted object needs a non-empty name")
    # surrogatepass: a file name read with surrogateescape still has one fixed encoding
    raw = name.encode("utf-8", errors="surrogatepass")
    if len(raw) > MAX_NAME_BYTES:
        raise UsageError(f"object name longer than {MAX_NAME_BYTES} bytes: "
                         f"{printable(name[:80])}...")
    return raw


def ciphertext_size(n: int, segment: int = DEFAULT_SEGMENT) -> int:
    """The stored size of an object of ``n`` plaintext bytes sealed in ``segment``-byte segments."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise UsageError(f"plaintext size {n!r} is not a size")
    _check_segment(segment)
    segments = max(1, -(-n // segment))
    return HEADER_BYTES + n + segments * TAG_BYTES


def _nonce(index: int, last: bool) -> bytes:
    return index.to_bytes(11, "big") + (b"\x01" if last else b"\x00")


def _object_key(enc_key: bytes, salt: bytes) -> AESGCM:
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=HKDF_INFO).derive(enc_key)
    return AESGCM(key)


class Encryptor:
    """Seal one object as a stream: :meth:`write` plaintext, :meth:`close` at the end.

    ``sink_write`` receives the header, then one whole sealed segment per call
    (``segment + 16`` bytes, the last one shorter), never more: a multipart
    writer can cut parts at segment boundaries and memory stays at about one
    segment. A segment goes out only once a byte after it has arrived, because
    the last segment is sealed differently and a full one may be the last.
    """

    def __init__(self, keys: RepoKeys, name: str, sink_write: Callable[[bytes], object], *,
                 segment: int = DEFAULT_SEGMENT) -> None:
        self.name = name
        self.segment = _check_segment(segment)
        self._sink = sink_write
        salt = os.urandom(SALT_BYTES)
        self.header = _HEADER.pack(MAGIC, VERSION, ALG_AES256_GCM, segment, salt)
        self._aad = self.header + _name_bytes(name)
        self._aead = _object_key(keys.enc_key, salt)
        self._buf = bytearray()
        self._index = 0
        self._started = False
        self.closed = False
        self.plain_bytes = 0
        self.cipher_bytes = 0

    def _emit(self, data: bytes) -> None:
        self.cipher_bytes += len(data)
        self._sink(data)

    def _seal(self, plain: bytes | memoryview, last: bool) -> None:
        if not self._started:
            self._started = True
            self._emit(self.header)
        self._emit(self._aead.encrypt(_nonce(self._index, last), plain, self._aad))
        self._index += 1

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Add plaintext; whole segments go to the sink as soon as they are known not to be
        the last."""
        if self.closed:
            raise ValueError(f"write to the closed encryptor of {self.name!r}")
        self.plain_bytes += len(data)
        self._buf += data
        seg = self.segment
        if len(self._buf) <= seg:
            return
        view = memoryview(self._buf)
        done = 0
        # strictly more than one segment left: the one sealed now cannot be the last
        while len(self._buf) - done > seg:
            self._seal(view[done:done + seg], last=False)
            done += seg
        view.release()
        del self._buf[:done]

    def close(self) -> None:
        """Seal the last segment (an empty one for an empty object)."""
        if self.closed:
            return
        self._seal(bytes(self._buf), last=True)
        self._buf = bytearray()
        self.closed = True

    def __enter__(self) -> Encryptor:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        # on an error the object is incomplete: the caller aborts its upload, nothing to seal
        if exc_type is None:
            self.close()


class Decryptor:
    """Open one sealed object as a stream: :meth:`feed` ciphertext, get plaintext back.

    Raises IntegrityError (exit 12) on a bad header, a segment that fails to
    authenticate (a flipped bit, a segment moved, the object under another
    name, or another key: indistinguishable here), and from :meth:`close` when
    the object ended early (cut inside a segment, or at a segment boundary:
    the last segment read was not sealed as the last). Memory: about two
    segments plus what one :meth:`feed` hands in. No plaintext is returned
    from a segment before that segment authenticated.
    """

    def __init__(self, keys: RepoKeys, name: str, *, max_plain: int | None = None) -> None:
        self.name = name
        self._aad_name = _name_bytes(name)
        self._enc_key = keys.enc_key
        self.max_plain = max_plain
        self._buf = bytearray()
        self._aead: AESGCM | None = None
        self._aad = b""
        self.segment = 0
        self._index = 0
        self.plain_bytes = 0
        self.closed = False

    def _fail(self, what: str) -> IntegrityError:
        return IntegrityError(f"encrypted object {printable(self.name)}: {what}")

    def _read_header(self) -> None:
        magic, version, alg, segment, salt = _HEADER.unpack(bytes(self._buf[:HEADER_BYTES]))
        if magic != MAGIC:
            raise self._fail("not a sanoffload encrypted object (bad magic)")
        if version != VERSION:
            raise self._fail(f"unknown format version {version} (this sanoffload reads "
                             f"{VERSION})")
        if alg != ALG_AES256_GCM:
            raise self._fail(f"unknown algorithm {alg}")
        if not MIN_SEGMENT <= segment <= MAX_SEGMENT:
            raise self._fail(f"segment size {segment} outside {MIN_SEGMENT}..{MAX_SEGMENT}")
        self.segment = segment
        self._aad = bytes(self._buf[:HEADER_BYTES]) + self._aad_name
        self._aead = _object_key(self._enc_key, salt)
        del self._buf[:HEADER_BYTES]

    def _open(self, sealed: bytes | memoryview, last: bool) -> bytes:
        assert self._aead is not None
        try:
            plain = self._aead.decrypt(_nonce(self._index, last), sealed, self._aad)
        except InvalidTag:
            if last and self._index > 0:
                why = ("the object ends early (truncated, or its last segment dropped), or "
                       "that segment was altered")
            else:
                why = ("altered or moved (a flipped bit, segments reordered, or the object "
                       "stored under another name), or sealed with another repository's key")
            raise self._fail(f"segment {self._index} does not authenticate: {why}") from None
        self._index += 1
        self.plain_bytes += len(plain)
        if self.max_plain is not None and self.plain_bytes > self.max_plain:
            raise self._fail(f"more than {self.max_plain} bytes of plaintext")
        return plain

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """Add ciphertext; returns the plaintext of every segment now known to be complete
        and not the last (the last one comes from :meth:`close`)."""
        if self.closed:
            raise ValueError(f"feed to the closed decryptor of {self.name!r}")
        self._buf += data
        if self._aead is None:
            if len(self._buf) < HEADER_BYTES:
                return []
            self._read_header()
        sealed = self.segment + TAG_BYTES
        out: list[bytes] = []
        if len(self._buf) <= sealed:
            return out
        view = memoryview(self._buf)
        done = 0
        while len(self._buf) - done > sealed:
            out.append(self._open(view[done:done + sealed], last=False))
            done += sealed
        view.release()
        del self._buf[:done]
        return out

    def close(self) -> bytes:
        """The last segment's plaintext; IntegrityError if the object ended early."""
        if self.closed:
            return b""
        self.closed = True
        if self._aead is None:
            raise self._fail(f"shorter than its {HEADER_BYTES}-byte header "
                             f"({len(self._buf)} bytes)")
        if len(self._buf) < TAG_BYTES:
            raise self._fail(f"ends {len(self._buf)} bytes into segment {self._index} (a "
                             f"segment holds at least its {TAG_BYTES}-byte tag): truncated")
        plain = self._open(bytes(self._buf), last=True)
        self._buf = bytearray()
        return plain


def encrypt_object(keys: RepoKeys, name: str, plaintext: bytes, *,
                   segment: int = DEFAULT_SEGMENT) -> bytes:
    """A small object (a chunk, a manifest, a map) sealed whole; see the module docstring."""
    out: list[bytes] = []
    enc = Encryptor(keys, name, out.append, segment=segment)
    enc.write(plaintext)
    enc.close()
    return b"".join(out)


def decrypt_object(keys: RepoKeys, name: str, blob: bytes, *, max_plain: int) -> bytes:
    """The plaintext of a sealed object of at most ``max_plain`` bytes; IntegrityError when it
    is damaged, cut, renamed, sealed with another key, or too big (checked from its size
    before any decryption)."""
    if len(blob) >= HEADER_BYTES:
        segment = struct.unpack_from(">I", blob, 7)[0]
        if MIN_SEGMENT <= segment <= MAX_SEGMENT and len(blob) > ciphertext_size(max_plain,
                                                                                  segment):
            raise IntegrityError(f"encrypted object {printable(name)}: {len(blob)} bytes, more "
                                 f"than a {max_plain}-byte plaintext can take")
    dec = Decryptor(keys, name, max_plain=max_plain)
    pieces = dec.feed(blob)
    pieces.append(dec.close())
    return b"".join(pieces)


def chunk_name(keys: RepoKeys, sha256_hex: str) -> str:
    """The stored name of the chunk whose plaintext has this sha256: hex HMAC-SHA256(id_key,
    b"chunk\\0" + digest), so the store cannot test a guess of a chunk's content."""
    if not isinstance(sha256_hex, str) or not _SHA256_HEX.fullmatch(sha256_hex):
        raise UsageError(f"not a sha256 (64 lower-case hex digits): {printable(str(sha256_hex))}")
    return hmac.new(keys.id_key, b"chunk\0" + bytes.fromhex(sha256_hex),
                    hashlib.sha256).hexdigest()


def name_token(keys: RepoKeys, kind: NameKind | str, text: str) -> str:
    """A 32-hex-digit token standing for a host or slug in stored paths (HMAC under id_key):
    the same text gives the same token, so ``list --host`` still works by prefix."""
    try:
        kind = NameKind(kind)
    except ValueError:
        raise UsageError(f"not a name kind: {printable(str(kind))} (host or slug)") from None
    if not isinstance(text, str) or not text:
        raise UsageError(f"a {kind.value} name must be a non-empty string")
    message = b"name\0" + kind.value.encode() + b"\0" + text.encode("utf-8", "surrogatepass")
    mac = hmac.new(keys.id_key, message, hashlib.sha256)
    return mac.hexdigest()[:32]
