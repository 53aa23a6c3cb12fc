"""EncryptedBackend (sanoffload.store.backend_crypt): sealed objects over any Backend.

Real pyca/cryptography over the real MemoryBackend and DirBackend (under
tmp_path). The Backend contract's own tests (tests/unit/test_backend_contract.py)
run here too, with the encrypted backend as their ``subject``. What the inner
store holds is attacked the way the store could: bytes flipped, objects cut,
an object copied under another key, the plaintext config rewritten.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from sanoffload.errors import IntegrityError, RepositoryKeyError, ResourceError, UsageError
from sanoffload.store import crypt
from sanoffload.store.backend import Backend, ByteReader, NotFound, ObjectInfo, ObjectWriter
from sanoffload.store.backend_crypt import (
    CONFIG_KEY,
    MAX_CONFIG_BYTES,
    EncryptedBackend,
    EncryptingWriter,
    init_config,
    open_encrypted,
    open_repository,
    plaintext_size,
    read_config,
)
from sanoffload.store.backend_dir import DirBackend
from sanoffload.store.keys import RepoKeys
from sanoffload.testing import MemoryBackend

# the contract's tests, collected here again with the encrypted backend as their subject
from tests.unit.test_backend_contract import *  # noqa: F403
from tests.unit.test_backend_contract import Subject, _crash_dir_writer, peak_memory

# ...but not the ones about MemoryBackend itself, which need no second run
for _name in [n for n in globals() if n.startswith("test_memory_")]:
    del globals()[_name]

pytestmark = pytest.mark.unit

SEG = crypt.MIN_SEGMENT  # small segments: many-segment cases stay fast
MARKER = b"SANOFFLOAD-PLAINTEXT-MARKER-7f3a"


def _abandon_inner(crash: Callable[[ObjectWriter], None]) -> Callable[[ObjectWriter], None]:
    def abandon(w: ObjectWriter) -> None:
        assert isinstance(w, EncryptingWriter)
        crash(w.inner)
    return abandon


# replaces the contract's own fixture of this name
@pytest.fixture(params=["memory", "memory-versioned", "dir"])  # type: ignore[no-redef]
def subject(request: pytest.FixtureRequest, tmp_path: Path) -> Subject:
    """The contract's subject: an EncryptedBackend over each inner backend."""
    if request.param == "dir":
        return Subject(EncryptedBackend(DirBackend(tmp_path), RepoKeys.generate()),
                       _abandon_inner(_crash_dir_writer))
    inner = MemoryBackend(versioned=request.param == "memory-versioned")
    return Subject(EncryptedBackend(inner, RepoKeys.generate()), lambda w: None)


# shadows the contract's helper of this name (its tests keep their own module's)
@pytest.fixture  # type: ignore[no-redef]
def keys() -> RepoKeys:
    return RepoKeys.generate()


@pytest.fixture(params=["memory", "dir"])
def inner(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "dir":
        root = tmp_path / "repo"
        root.mkdir()
        return DirBackend(root)
    return MemoryBackend()


def stored(inner: Backend, key: str) -> bytes:
    """What the inner store holds under ``key``, read raw."""
    return inner.get(key, max_bytes=1 << 30)


def restore(inner: Backend, key: str, data: bytes) -> None:
    """Make the inner store hold ``data`` under ``key`` (what a store or its disk could do)."""
    if isinstance(inner, DirBackend):
        path = inner.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            path.chmod(0o600)  # committed objects are read-only
        path.write_bytes(data)
        return
    assert isinstance(inner, MemoryBackend)
    versions = inner.objects.get(key)
    if versions:
        info, _ = versions[-1]
        versions[-1] = (replace(info, size=len(data)), data)
    else:
        inner.put(key, data)


def read_all(reader: ByteReader, step: int = 1000) -> bytes:
    out = bytearray()
    try:
        while piece := reader.read(step):
            assert len(piece) <= step
            out += piece
    finally:
        reader.close()
    return bytes(out)


def pattern(n: int, seed: int = 0) -> bytes:
    """``n`` bytes that differ from segment to segment (a reordering would show)."""
    out = bytearray()
    i = 0
    while len(out) < n:
        out += hashlib.sha256(b"%d:%d" % (seed, i)).digest()
        i += 1
    return bytes(out[:n])


SIZES = [0, 1, SEG - 1, SEG, SEG + 1, 3 * SEG, 3 * SEG + 5]


# -- round trips -------------------------------------------------------------------------------
@pytest.mark.parametrize("size", SIZES)
def test_whole_and_streamed_objects_round_trip_with_plaintext_sizes(
        inner: Backend, keys: RepoKeys, size: int) -> None:
    b = EncryptedBackend(inner, keys, segment=SEG)
    data = pattern(size)
    info = b.put("objs/whole", data)
    assert info.size == size
    assert b.get("objs/whole", max_bytes=size) == data
    assert read_all(b.open_read("objs/whole")) == data

    w = b.writer("objs/streamed", size_hint=size)
    for at in range(0, size, 777):  # pieces that straddle segment boundaries
        w.write(data[at:at + 777])
    committed = w.commit()
    assert committed.size == size and committed.key == "objs/streamed"
    assert read_all(b.open_read("objs/streamed"), step=SEG + 3) == data
    assert b.get("objs/streamed", max_bytes=size) == data

    sizes = {i.key: i.size for i in b.list("objs/")}
    assert sizes == {"objs/streamed": size, "objs/whole": size}
    found = b.stat("objs/streamed")
    assert found is not None and found.size == size
    assert [v.size for v in b.versions("objs/whole")] == [size]
    # the store holds the sealed size, and only it
    assert len(stored(inner, "objs/whole")) == crypt.ciphertext_size(size, SEG)
    assert len(stored(inner, "objs/streamed")) == crypt.ciphertext_size(size, SEG)


def test_a_read_of_everything_and_reads_of_nothing(keys: RepoKeys) -> None:
    b = EncryptedBackend(MemoryBackend(), keys, segment=SEG)
    data = pattern(2 * SEG + 9)
    b.put("k", data)
    r = b.open_read("k")
    assert r.read(0) == b""
    assert r.read(5) == data[:5]
    assert r.read() == data[5:]
    assert r.read(10) == b"" and r.read() == b""
    r.close()


def test_the_store_holds_no_plaintext(inner: Backend, keys: RepoKeys) -> None:
    b = EncryptedBackend(inner, keys, segment=SEG)
    secret = (b"line of a known file " + MARKER + b"\n") * 1000
    b.put("manifests/m.json", MARKER)
    w = b.writer("archives/a.tar.zst")
    w.write(secret)
    w.commit()
    for info in inner.list():
        raw = stored(inner, info.key)
        assert MARKER not in raw and MARKER[:16] not in raw
        assert raw.startswith(crypt.MAGIC)
    # the same plaintext sealed twice looks different (a fresh per-object key)
    b.put("manifests/n.json", MARKER)
    assert stored(inner, "manifests/m.json")[crypt.HEADER_BYTES:] != \
        stored(inner, "manifests/n.json")[crypt.HEADER_BYTES:]


def test_the_writer_gives_the_inner_writer_the_stored_size(keys: RepoKeys) -> None:
    hints: list[int | None] = []

    class Recording(MemoryBackend):
        def writer(self, key: str, *, size_hint: int | None = None):  # type: ignore[no-untyped-def]
            hints.append(size_hint)
            return super().writer(key, size_hint=size_hint)

    b = EncryptedBackend(Recording(), keys)
    b.writer("a", size_hint=10 << 20).abort()
    b.writer("b").abort()
    assert hints == [crypt.ciphertext_size(10 << 20), None]


def test_a_20_mib_stream_round_trips_in_bounded_memory(tmp_path: Path, keys: RepoKeys) -> None:
    b = EncryptedBackend(DirBackend(tmp_path), keys)  # 1 MiB segments, files on disk
    piece = 256 << 10
    total = 20 << 20
    digest = hashlib.sha256()

    def write() -> None:
        w = b.writer("archives/big.tar.zst", size_hint=total)
        for i in range(total // piece):
            data = hashlib.sha256(b"%d" % i).digest() * (piece // 32)
            digest.update(data)
            w.write(data)
        assert w.commit().size == total

    back = hashlib.sha256()

    def read() -> None:
        with b.open_read("archives/big.tar.zst") as r:
            while data := r.read(64 << 10):
                back.update(data)

    # a few segments (1 MiB each) at most, whatever the object's size
    write_peak, read_peak = peak_memory(write), peak_memory(read)
    assert write_peak < 4 << 20 and read_peak < 4 << 20, (write_peak, read_peak)
    assert back.digest() == digest.digest()
    info = b.stat("archives/big.tar.zst")
    assert info is not None and info.size == total


# -- sizes -------------------------------------------------------------------------------------
@pytest.mark.parametrize("segment", [crypt.MIN_SEGMENT, 5000, crypt.DEFAULT_SEGMENT])
def test_plaintext_size_is_the_exact_inverse_of_ciphertext_size(segment: int) -> None:
    sizes = set(range(0, 3 * segment + 40, max(1, segment // 64)))
    sizes |= {k * segment + d for k in range(4) for d in (-1, 0, 1) if k * segment + d >= 0}
    seen: dict[int, int] = {}
    for n in sorted(sizes):
        c = crypt.ciphertext_size(n, segment)
        assert plaintext_size(c, segment) == n
        assert seen.setdefault(c, n) == n  # one plaintext size per stored size
    assert plaintext_size(crypt.HEADER_BYTES + crypt.TAG_BYTES, segment) == 0


@pytest.mark.hostile("store", "a stored object whose size no sealed object has (cut inside a "
                     "tag, a bare tag after a full segment, shorter than a header)",
                     "IntegrityError naming the object's key from stat, list and versions")
@pytest.mark.parametrize("stored_size", [
    0, 1, crypt.HEADER_BYTES, crypt.HEADER_BYTES + crypt.TAG_BYTES - 1,
    crypt.HEADER_BYTES + SEG + crypt.TAG_BYTES + 1,  # a second segment shorter than its tag
    crypt.HEADER_BYTES + SEG + 2 * crypt.TAG_BYTES,  # an empty last segment after a full one
])
def test_a_stored_size_no_plaintext_gives_is_refused(keys: RepoKeys, stored_size: int) -> None:
    inner = MemoryBackend()
    inner.put("chunks/odd", b"\0" * stored_size)
    b = EncryptedBackend(inner, keys, segment=SEG)
    for call in (lambda: b.stat("chunks/odd"), lambda: list(b.list("chunks/")),
                 lambda: b.versions("chunks/odd")):
        with pytest.raises(IntegrityError, match="chunks/odd"):
            call()
    with pytest.raises(IntegrityError):
        plaintext_size(stored_size, SEG)
    with pytest.raises(IntegrityError):
        b.get("chunks/odd", max_bytes=1 << 20)


def test_a_bool_or_negative_size_is_no_size() -> None:
    for bad in (True, -1):
        with pytest.raises(IntegrityError):
            plaintext_size(bad)


# -- bounded reads -----------------------------------------------------------------------------
@pytest.mark.hostile("store", "an encrypted object bigger than a read accepts (8 MiB, a 64 KiB "
                     "read)", "IntegrityError; the inner store asked for at most the sealed size "
                     "of 64 KiB; never more held in memory")
def test_get_asks_the_store_for_no_more_than_the_bound(keys: RepoKeys) -> None:
    asked: list[int] = []

    class Recording(MemoryBackend):
        def get(self, key: str, *, max_bytes: int, version: str | None = None) -> bytes:
            asked.append(max_bytes)
            return super().get(key, max_bytes=max_bytes, version=version)

    b = EncryptedBackend(Recording(), keys, segment=SEG)
    w = b.writer("big")
    for _ in range(8):
        w.write(b"\0" * (1 << 20))
    w.commit()

    def refused() -> None:
        with pytest.raises(IntegrityError):
            b.get("big", max_bytes=64 << 10)

    assert peak_memory(refused) < 1 << 20
    assert asked == [crypt.ciphertext_size(64 << 10, SEG)]
    b.put("exact", b"x" * 1000)
    assert b.get("exact", max_bytes=1000) == b"x" * 1000
    with pytest.raises(IntegrityError):
        b.get("exact", max_bytes=999)


def test_a_huge_bound_allocates_nothing_of_its_size(keys: RepoKeys) -> None:
    b = EncryptedBackend(MemoryBackend(), keys)
    b.put("small", b"tiny")
    got: list[bytes] = []
    assert peak_memory(lambda: got.append(b.get("small", max_bytes=1 << 40))) < 4 << 20
    assert got == [b"tiny"]


# -- damage -----------------------------------------------------------------------------------
def _flip(at: int) -> Callable[[bytes], bytes]:
    def f(blob: bytes) -> bytes:
        i = at % len(blob)
        return blob[:i] + bytes([blob[i] ^ 0x01]) + blob[i + 1:]
    return f


#: damage -> (what it does to the stored bytes, the first segment it spoils)
DAMAGE: dict[str, tuple[Callable[[bytes], bytes], int]] = {
    "magic": (_flip(0), 0),
    "segment-size-in-header": (_flip(8), 0),
    "salt": (_flip(20), 0),
    "first-segment": (_flip(crypt.HEADER_BYTES + 5), 0),
    "middle-segment": (_flip(crypt.HEADER_BYTES + SEG + crypt.TAG_BYTES + 100), 1),
    "last-tag": (_flip(-1), 3),
    "cut-inside-last-segment": (lambda b: b[:-7], 3),
    "cut-at-a-segment-boundary": (lambda b: b[:crypt.HEADER_BYTES + 2 * (SEG + crypt.TAG_BYTES)],
                                  2),
    "cut-to-the-header": (lambda b: b[:crypt.HEADER_BYTES], 0),
    "cut-to-nothing": (lambda b: b"", 0),
    "a-segment-dropped": (lambda b: (b[:crypt.HEADER_BYTES + SEG + crypt.TAG_BYTES]
                                     + b[crypt.HEADER_BYTES + 2 * (SEG + crypt.TAG_BYTES):]), 1),
    "segments-swapped": (lambda b: (
        b[:crypt.HEADER_BYTES] + b[crypt.HEADER_BYTES + SEG + crypt.TAG_BYTES:
                                   crypt.HEADER_BYTES + 2 * (SEG + crypt.TAG_BYTES)]
        + b[crypt.HEADER_BYTES:crypt.HEADER_BYTES + SEG + crypt.TAG_BYTES]
        + b[crypt.HEADER_BYTES + 2 * (SEG + crypt.TAG_BYTES):]), 0),
}


@pytest.mark.hostile("store", "an encrypted object with a byte flipped, cut short, a segment "
                     "dropped or two swapped", "IntegrityError from get and from the stream; "
                     "no plaintext of a bad segment returned")
@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_object_is_an_integrity_error(inner: Backend, keys: RepoKeys,
                                                damage: str) -> None:
    b = EncryptedBackend(inner, keys, segment=SEG)
    data = pattern(3 * SEG + 100)
    b.put("archives/a", data)
    spoil, first_bad = DAMAGE[damage]
    restore(inner, "archives/a", spoil(stored(inner, "archives/a")))
    with pytest.raises(IntegrityError, match="archives/a"):
        b.get("archives/a", max_bytes=len(data))
    r = b.open_read("archives/a")
    got = bytearray()
    with pytest.raises(IntegrityError):
        while piece := r.read(SEG // 3):
            got += piece
    # what came out before the error is plaintext of the segments before the damaged one
    assert data.startswith(bytes(got)) and len(got) <= first_bad * SEG
    with pytest.raises(IntegrityError):  # the stream does not turn into a clean end
        r.read(10)
    r.close()


@pytest.mark.hostile("store", "an encrypted object copied (or moved) under another key",
                     "IntegrityError: the key is bound into every segment")
@pytest.mark.parametrize("source", ["chunks/aa", "backups/h/s/20260101T000000Z.json"])
def test_an_object_copied_under_another_key_does_not_open(inner: Backend, keys: RepoKeys,
                                                          source: str) -> None:
    b = EncryptedBackend(inner, keys, segment=SEG)
    b.put(source, b"yesterday's manifest")
    w = b.writer("backups/h/s/big")
    w.write(pattern(2 * SEG))
    w.commit()
    restore(inner, "backups/h/s/20260102T000000Z.json", stored(inner, source))
    restore(inner, "backups/h/s/other", stored(inner, "backups/h/s/big"))
    with pytest.raises(IntegrityError, match="20260102T000000Z.json"):
        b.get("backups/h/s/20260102T000000Z.json", max_bytes=100)
    with pytest.raises(IntegrityError, match="another name"):
        read_all(b.open_read("backups/h/s/other"))
    assert b.get(source, max_bytes=100) == b"yesterday's manifest"  # the original still opens


def test_an_object_sealed_with_another_key_does_not_open(keys: RepoKeys) -> None:
    inner = MemoryBackend()
    EncryptedBackend(inner, RepoKeys.generate()).put("k", b"data")
    with pytest.raises(IntegrityError, match="another repository's key"):
        EncryptedBackend(inner, keys).get("k", max_bytes=10)


def test_missing_objects_stay_not_found(keys: RepoKeys) -> None:
    b = EncryptedBackend(MemoryBackend(), keys)
    with pytest.raises(NotFound):
        b.get("no/such", max_bytes=10)
    with pytest.raises(NotFound):
        b.open_read("no/such")
    assert b.stat("no/such") is None


# -- writers ----------------------------------------------------------------------------------
def test_an_aborted_or_failed_writer_leaves_nothing(keys: RepoKeys) -> None:
    inner = MemoryBackend()
    b = EncryptedBackend(inner, keys, segment=SEG)
    with b.writer("k") as w:
        w.write(pattern(3 * SEG))
    assert inner.uploads == {} and inner.objects == {}
    with pytest.raises(ValueError):
        w.write(b"more")  # not sealed into a dead upload
    b.put("k", b"first")
    w = b.writer("k")
    w.write(b"second")
    with pytest.raises(ResourceError):
        w.commit()
    w.abort()
    assert inner.uploads == {}
    assert b.get("k", max_bytes=10) == b"first"
    with b.writer("j") as w:
        w.write(b"x")
        w.commit()  # leaving the block after a commit aborts nothing
    assert b.get("j", max_bytes=1) == b"x"
    with pytest.raises(ValueError):
        w.commit()


# -- the config and the key check ----------------------------------------------------------------
class Watching(MemoryBackend):
    """A MemoryBackend that records every key read."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def get(self, key: str, *, max_bytes: int, version: str | None = None) -> bytes:
        self.reads.append(key)
        return super().get(key, max_bytes=max_bytes, version=version)

    def open_read(self, key: str, *, version: str | None = None):  # type: ignore[no-untyped-def]
        self.reads.append(key)
        return super().open_read(key, version=version)


def test_init_then_open_with_the_repositorys_key(inner: Backend, keys: RepoKeys) -> None:
    config = init_config(inner, keys, segment=SEG)
    assert config.repo_id == keys.repo_id_hex and config.segment == SEG
    doc = json.loads(stored(inner, CONFIG_KEY))
    assert doc["repo_id"] == keys.repo_id_hex and doc["segment"] == SEG
    assert doc["alg"] == "aes-256-gcm" and doc["version"] == 1 and doc["encryption"] == "client"
    raw = stored(inner, CONFIG_KEY)
    for secret in (keys.enc_key, keys.id_key):
        assert secret not in raw and secret.hex().encode() not in raw
    asked: list[str] = []

    def loader(repo_id: str) -> RepoKeys:
        asked.append(repo_id)
        return keys

    b = open_encrypted(inner, loader)
    assert asked == [keys.repo_id_hex]
    assert b.segment == SEG
    b.put("a/b", b"hello")
    assert open_encrypted(inner, keys).get("a/b", max_bytes=5) == b"hello"
    # the config is not an object of the encrypted repository
    assert [i.key for i in b.list()] == ["a/b"]
    for call in (lambda: b.get(CONFIG_KEY, max_bytes=10), lambda: b.put(CONFIG_KEY, b"x"),
                 lambda: b.stat(CONFIG_KEY), lambda: b.writer(CONFIG_KEY),
                 lambda: b.delete(CONFIG_KEY), lambda: b.open_read(CONFIG_KEY)):
        with pytest.raises(UsageError, match="config"):
            call()
    with pytest.raises(ResourceError, match="already has a repository config"):
        init_config(inner, RepoKeys.generate())


def test_a_key_of_another_repository_is_refused_before_anything_is_decrypted(
        keys: RepoKeys) -> None:
    inner = Watching()
    init_config(inner, keys)
    EncryptedBackend(inner, keys).put("chunks/c", b"data")
    inner.reads.clear()
    other = RepoKeys.generate()
    with pytest.raises(RepositoryKeyError) as caught:
        open_encrypted(inner, lambda repo_id: other)
    assert keys.repo_id_hex in str(caught.value) and other.repo_id_hex in str(caught.value)
    assert caught.value.exit_code == 15
    assert inner.reads == [CONFIG_KEY]


@pytest.mark.hostile("store", "the plaintext repository config rewritten by the store (another "
                     "segment size or algorithm, same repository id)",
                     "IntegrityError from its MAC before any object is read")
def test_a_rewritten_config_does_not_authenticate(keys: RepoKeys) -> None:
    inner = Watching()
    init_config(inner, keys, segment=SEG)
    doc = json.loads(stored(inner, CONFIG_KEY))
    doc["segment"] = SEG * 2
    restore(inner, CONFIG_KEY, json.dumps(doc).encode())
    inner.reads.clear()
    with pytest.raises(IntegrityError, match="does not authenticate"):
        open_encrypted(inner, keys)
    assert inner.reads == [CONFIG_KEY]
    # a key whose label names this repository but whose secrets are another's: the same
    forged = RepoKeys(os.urandom(32), os.urandom(32), keys.repo_id)
    inner.objects.clear()
    init_config(inner, keys, segment=SEG)
    with pytest.raises(IntegrityError, match="does not authenticate"):
        open_encrypted(inner, forged)


@pytest.mark.hostile("store", "an encrypted key given for a repository with no config, or one "
                     "whose config says encryption none",
                     "RepositoryKeyError saying it is not encrypted; the key is never loaded")
@pytest.mark.parametrize("config", [None, "none"])
def test_an_unencrypted_repository_is_told_apart(inner: Backend, config: str | None) -> None:
    if config is not None:
        init_config(inner, None)
        assert json.loads(stored(inner, CONFIG_KEY)) == {
            "format": "sanoffload-repository", "version": 1, "encryption": "none"}
    inner.put("backups/h/s/x.json", b'{"plain": "manifest"}')

    def loader(repo_id: str) -> RepoKeys:
        raise AssertionError("no key is asked for an unencrypted repository")

    with pytest.raises(RepositoryKeyError, match="not an encrypted repository") as caught:
        open_encrypted(inner, loader)
    assert caught.value.hint and "without a key" in caught.value.hint
    # opened without a key, it is the plain store
    assert open_repository(inner, None) is inner
    with pytest.raises(RepositoryKeyError):
        open_repository(inner, loader)


def test_an_encrypted_repository_opened_without_a_key_is_refused(keys: RepoKeys) -> None:
    inner = MemoryBackend()
    init_config(inner, keys)
    with pytest.raises(RepositoryKeyError, match="encrypted repository") as caught:
        open_repository(inner, None)
    assert keys.repo_id_hex in str(caught.value)
    b = open_repository(inner, keys)
    assert isinstance(b, EncryptedBackend)
    assert read_config(inner) is not None


def _good_config(keys: RepoKeys) -> dict[str, object]:
    inner = MemoryBackend()
    init_config(inner, keys)
    doc: dict[str, object] = json.loads(stored(inner, CONFIG_KEY))
    return doc


def _edited(**changes: object) -> Callable[[dict[str, object]], bytes]:
    def edit(doc: dict[str, object]) -> bytes:
        for field, value in changes.items():
            if value is _DROP:
                doc.pop(field)
            else:
                doc[field] = value
        return json.dumps(doc).encode()
    return edit


_DROP = object()

HOSTILE_CONFIGS: dict[str, Callable[[dict[str, object]], bytes]] = {
    "huge": lambda doc: b" " * (1 << 20) + json.dumps(doc).encode(),
    "just-over-the-bound": lambda doc: json.dumps(doc).encode().ljust(MAX_CONFIG_BYTES + 1),
    "not-json": lambda doc: b"{not json",
    "not-utf8": lambda doc: b'{"format": "\xff"}',
    "a-list": lambda doc: b"[1, 2]",
    "deeply-nested": lambda doc: b"[" * 2000 + b"]" * 2000,
    "duplicate-field": lambda doc: json.dumps(doc).encode()[:-1]
    + b', "segment": 4096}',
    "unknown-field": _edited(extra="x"),
    "missing-mac": _edited(mac=_DROP),
    "missing-repo-id": _edited(repo_id=_DROP),
    "other-format": _edited(format="restic"),
    "version-2": _edited(version=2),
    "version-true": _edited(version=True),
    "version-text": _edited(version="1"),
    "repo-id-number": _edited(repo_id=12345),
    "repo-id-upper-hex": _edited(repo_id="AB" * 16),
    "repo-id-with-escape": _edited(repo_id="\x1b[2J" + "0" * 28),
    "segment-text": _edited(segment="1048576"),
    "segment-true": _edited(segment=True),
    "segment-float": _edited(segment=1048576.0),
    "segment-tiny": _edited(segment=16),
    "segment-huge": _edited(segment=1 << 40),
    "alg-unknown": _edited(alg="rot13"),
    "encryption-unknown": _edited(encryption="\x1b]0;pwned\x07"),
    "mac-not-hex": _edited(mac="z" * 64),
}


@pytest.mark.hostile("store", "a hostile repository config: 1 MiB, not JSON, nested 2000 deep, "
                     "a field twice, unknown fields, wrong types, version 2, escape sequences",
                     "IntegrityError naming the config; bounded read; no key asked for")
@pytest.mark.parametrize("case", sorted(HOSTILE_CONFIGS))
def test_a_hostile_config_is_refused_clearly(keys: RepoKeys, case: str) -> None:
    inner = Watching()
    restore(inner, CONFIG_KEY, HOSTILE_CONFIGS[case](_good_config(keys)))
    asked: list[str] = []

    def loader(repo_id: str) -> RepoKeys:
        asked.append(repo_id)
        return keys

    def refused() -> None:
        with pytest.raises(IntegrityError, match="repository config") as caught:
            open_encrypted(inner, loader)
        message = str(caught.value)
        assert "\x1b" not in message and "\x07" not in message
        if case == "version-2":
            assert "format version 2" in message and caught.value.hint

    assert peak_memory(refused) < 256 << 10
    assert asked == []
    with pytest.raises(IntegrityError):
        read_config(inner)


def test_the_config_check_is_what_refuses_the_hostile_configs(keys: RepoKeys) -> None:
    """The unedited config opens (so each hostile case fails for its edit alone)."""
    inner = MemoryBackend()
    restore(inner, CONFIG_KEY, _edited()(_good_config(keys)))
    assert isinstance(open_encrypted(inner, keys), EncryptedBackend)


# -- helpers the contract subjects share ----------------------------------------------------------
def test_the_encrypted_backend_is_a_backend(keys: RepoKeys) -> None:
    b = EncryptedBackend(MemoryBackend(), keys)
    assert isinstance(b, Backend)
    assert b.location == "memory:test"
    with pytest.raises(UsageError):
        EncryptedBackend(MemoryBackend(), keys, segment=100)


def _infos(it: Iterator[ObjectInfo]) -> list[tuple[str, int]]:
    return [(i.key, i.size) for i in it]


def test_versions_and_delete_markers_keep_their_sizes(keys: RepoKeys) -> None:
    inner = MemoryBackend(versioned=True)
    b = EncryptedBackend(inner, keys, segment=SEG)
    first = b.put("k", b"one")
    b.put("k", b"three", exclusive=False)
    b.delete("k")
    history = b.versions("k")
    assert [(v.size, v.deleted) for v in history] == [(3, False), (5, False), (0, True)]
    assert b.get("k", max_bytes=3, version=first.version) == b"one"
    assert _infos(b.list()) == []
