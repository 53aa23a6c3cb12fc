"""Client-side encryption of repository objects (sanoffload.store.crypt).

Real pyca/cryptography throughout; what the store hands back is attacked the
way a store (or whoever holds its disks) could: bits flipped, objects cut,
segments dropped, reordered or repeated, objects moved to other names, a
header claiming a huge segment. Every case must be an IntegrityError, and no
plaintext of a segment may come out before that segment authenticated.
"""

from __future__ import annotations

import hashlib
import os
import random
import struct
import tracemalloc

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from sanoffload.errors import IntegrityError, UsageError
from sanoffload.store.crypt import (
    DEFAULT_SEGMENT,
    HEADER_BYTES,
    MAX_SEGMENT,
    MIN_SEGMENT,
    TAG_BYTES,
    Decryptor,
    Encryptor,
    NameKind,
    chunk_name,
    ciphertext_size,
    decrypt_object,
    encrypt_object,
    name_token,
)
from sanoffload.store.keys import RepoKeys

pytestmark = pytest.mark.unit

SEG = MIN_SEGMENT  # small segments keep the many-segment cases fast
NAME = "backups/0123/4567/20261126T102933Z.tar.zst"
#: fixed keys for the test vectors
FIXED = RepoKeys(bytes(range(32)), bytes(range(32, 64)), bytes(16))


@pytest.fixture
def keys() -> RepoKeys:
    return RepoKeys.generate()


def seal(keys: RepoKeys, data: bytes, name: str = NAME, segment: int = SEG) -> bytes:
    return encrypt_object(keys, name, data, segment=segment)


def segments(blob: bytes, segment: int = SEG) -> tuple[bytes, list[bytes]]:
    """Split a sealed object into its header and sealed segments."""
    step = segment + TAG_BYTES
    body = blob[HEADER_BYTES:]
    return blob[:HEADER_BYTES], [body[i:i + step] for i in range(0, len(body), step)]


def stream_open(keys: RepoKeys, blob: bytes, name: str = NAME, piece: int = 1000) -> bytes:
    dec = Decryptor(keys, name)
    out = []
    for i in range(0, len(blob), piece):
        out += dec.feed(blob[i:i + piece])
    out.append(dec.close())
    return b"".join(out)


# --------------------------------------------------------------------------
# round trips and sizes
# --------------------------------------------------------------------------

@pytest.mark.parametrize("size", [0, 1, SEG - 1, SEG, SEG + 1, 2 * SEG, 3 * SEG + 5])
def test_roundtrip_sizes_small_segments(keys: RepoKeys, size: int) -> None:
    data = os.urandom(size)
    blob = seal(keys, data)
    assert len(blob) == ciphertext_size(size, SEG)
    assert decrypt_object(keys, NAME, blob, max_plain=size) == data
    assert stream_open(keys, blob) == data
    assert stream_open(keys, blob, piece=1) == data  # byte by byte: headers split anywhere


@pytest.mark.parametrize("size", [0, 1, DEFAULT_SEGMENT - 1, DEFAULT_SEGMENT,
                                  DEFAULT_SEGMENT + 1, 5 * DEFAULT_SEGMENT + 12345])
def test_roundtrip_sizes_default_segment(keys: RepoKeys, size: int) -> None:
    data = random.Random(size).randbytes(size)
    blob = encrypt_object(keys, NAME, data)
    assert len(blob) == ciphertext_size(size)
    assert decrypt_object(keys, NAME, blob, max_plain=size) == data
    assert stream_open(keys, blob, piece=300_001) == data


def test_ciphertext_size_formula() -> None:
    assert ciphertext_size(0) == HEADER_BYTES + 16 == 59
    assert ciphertext_size(1) == 60
    assert ciphertext_size(DEFAULT_SEGMENT) == HEADER_BYTES + DEFAULT_SEGMENT + 16
    assert ciphertext_size(DEFAULT_SEGMENT + 1) == HEADER_BYTES + DEFAULT_SEGMENT + 1 + 32
    for bad in (-1, True, 1.5):
        with pytest.raises(UsageError):
            ciphertext_size(bad)  # type: ignore[arg-type]
    for seg in (0, MIN_SEGMENT - 1, MAX_SEGMENT + 1):
        with pytest.raises(UsageError):
            ciphertext_size(10, seg)


def test_encryptor_emits_whole_segments_as_soon_as_known(keys: RepoKeys) -> None:
    calls: list[bytes] = []
    enc = Encryptor(keys, NAME, calls.append, segment=SEG)
    rng = random.Random(1)
    data = rng.randbytes(10 * SEG + 1)
    pos = 0
    while pos < len(data):  # irregular writes, as a tar pipe delivers them
        n = rng.randint(1, 3 * SEG)
        enc.write(data[pos:pos + n])
        pos += n
    # 10 full segments are out before close: a byte after them arrived, so none is the last
    assert enc.cipher_bytes == HEADER_BYTES + 10 * (SEG + TAG_BYTES)
    enc.close()
    assert [len(c) for c in calls] == [HEADER_BYTES] + [SEG + TAG_BYTES] * 10 + [1 + TAG_BYTES]
    assert enc.plain_bytes == len(data) and enc.cipher_bytes == ciphertext_size(len(data), SEG)
    assert decrypt_object(keys, NAME, b"".join(calls), max_plain=len(data)) == data
    with pytest.raises(ValueError):
        enc.write(b"late")


def test_encryptor_context_manager_seals_only_on_success(keys: RepoKeys) -> None:
    out: list[bytes] = []
    with Encryptor(keys, NAME, out.append, segment=SEG) as enc:
        enc.write(b"x" * 10)
    assert decrypt_object(keys, NAME, b"".join(out), max_plain=10) == b"x" * 10
    out.clear()
    with pytest.raises(RuntimeError), Encryptor(keys, NAME, out.append, segment=SEG) as enc:
        enc.write(b"y" * (SEG + 1))
        raise RuntimeError("the source failed")
    # no last segment was sealed: what went out does not pass as a whole object
    with pytest.raises(IntegrityError):
        decrypt_object(keys, NAME, b"".join(out), max_plain=SEG + 1)


def test_streaming_memory_is_bounded_by_the_segment(keys: RepoKeys) -> None:
    """64 MiB through Encryptor and Decryptor in 64 KiB writes: peak Python memory stays near
    two segments, not the stream's size."""
    piece = os.urandom(64 << 10)
    total = 64 << 20
    dec = Decryptor(keys, NAME)
    got = hashlib.sha256()

    def sink(b: bytes) -> None:
        for p in dec.feed(b):
            got.update(p)

    tracemalloc.start()
    try:
        enc = Encryptor(keys, NAME, sink)
        for _ in range(total // len(piece)):
            enc.write(piece)
        enc.close()
        got.update(dec.close())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    want = hashlib.sha256()
    for _ in range(total // len(piece)):
        want.update(piece)
    assert got.digest() == want.digest()
    assert peak < 8 * DEFAULT_SEGMENT, peak


def test_each_object_has_its_own_salt(keys: RepoKeys) -> None:
    a, b = seal(keys, b"same bytes"), seal(keys, b"same bytes")
    assert a != b and a[11:HEADER_BYTES] != b[11:HEADER_BYTES]


@pytest.mark.hostile("store", "a marker file's bytes stored encrypted",
                     "the stored object holds no trace of the marker")
def test_ciphertext_does_not_contain_the_marker(keys: RepoKeys) -> None:
    marker = b"SANOFFLOAD-MARKER-7f3c2a91e5"
    data = (b"header " + marker + b"\n") * 5000
    for blob in (seal(keys, data), encrypt_object(keys, NAME, data)):
        assert marker not in blob and marker[:12] not in blob
        assert marker.hex().encode() not in blob


# --------------------------------------------------------------------------
# the format, checked against an independent construction
# --------------------------------------------------------------------------

def test_format_vector_built_from_the_primitives() -> None:
    """An object built by hand from the documented format opens; ours has that layout."""
    salt = bytes(range(100, 132))
    header = b"SOENC" + bytes([1, 1]) + struct.pack(">I", SEG) + salt
    k = HKDF(algorithm=hashes.SHA256(), length=32, salt=salt,
             info=b"sanoffload obj v1").derive(FIXED.enc_key)
    aad = header + NAME.encode()
    plain = bytes(range(256)) * 20  # 5120 bytes: one full segment and one of 1024
    blob = header + AESGCM(k).encrypt(bytes(11) + b"\x00", plain[:SEG], aad) \
        + AESGCM(k).encrypt((1).to_bytes(11, "big") + b"\x01", plain[SEG:], aad)
    assert decrypt_object(FIXED, NAME, blob, max_plain=len(plain)) == plain
    ours = seal(FIXED, plain)
    assert ours[:11] == header[:11] and len(ours) == len(blob)


def test_chunk_name_vector() -> None:
    """HMAC-SHA256(id_key, b"chunk\\0" + digest); the value is from `openssl dgst -mac HMAC`."""
    digest = hashlib.sha256(b"marker chunk").hexdigest()
    assert digest == "176239d5da5457acf2ec52665b95407d308df9cfb686e2bb9e6588858c29a9fb"
    assert chunk_name(FIXED, digest) == \
        "cef77699dac79acbc42d98bf74de3823846e396c5a3c2413b0e41771c2f2f45b"
    assert chunk_name(RepoKeys.generate(), digest) != chunk_name(FIXED, digest)


def test_name_token_vector_and_domains() -> None:
    # openssl: printf 'name\0host\0fs1' | openssl dgst -sha256 -mac HMAC -macopt hexkey:2021..3f
    assert name_token(FIXED, NameKind.HOST, "fs1") == "cac678253b0e92da0820beb698a052f6"
    assert name_token(FIXED, "host", "fs1") == name_token(FIXED, NameKind.HOST, "fs1")
    assert name_token(FIXED, NameKind.SLUG, "fs1") != name_token(FIXED, NameKind.HOST, "fs1")
    token = name_token(FIXED, NameKind.SLUG, "srv-data-3f2a9c1e")
    assert len(token) == 32 and int(token, 16) >= 0
    assert name_token(FIXED, NameKind.HOST, "caf\udcff") != name_token(FIXED, "host", "caf")


@pytest.mark.hostile("store", "a chunk id or name kind that is not a sha256 / host|slug",
                     "refused (exit 2) before any key is used")
@pytest.mark.parametrize("bad", ["", "A" * 64, "g" * 64, "ab" * 31, "../" + "a" * 61,
                                 "a" * 64 + "\n", None])
def test_chunk_name_refuses_what_is_not_a_sha256(bad: object) -> None:
    with pytest.raises(UsageError):
        chunk_name(FIXED, bad)  # type: ignore[arg-type]
    with pytest.raises(UsageError):
        name_token(FIXED, "user", "fs1")
    with pytest.raises(UsageError):
        name_token(FIXED, NameKind.HOST, "")


# --------------------------------------------------------------------------
# what a hostile store can hand back
# --------------------------------------------------------------------------

def five_segments(keys: RepoKeys) -> tuple[bytes, bytes]:
    data = os.urandom(4 * SEG + 100)
    return data, seal(keys, data)


def refused(keys: RepoKeys, blob: bytes, name: str = NAME, *, match: str | None = None) -> str:
    with pytest.raises(IntegrityError, match=match) as one:
        decrypt_object(keys, name, blob, max_plain=1 << 24)
    with pytest.raises(IntegrityError, match=match):
        stream_open(keys, blob, name, piece=777)
    assert one.value.exit_code == 12
    return str(one.value)


@pytest.mark.hostile("store", "an encrypted object with one flipped bit (header, salt, any "
                     "segment, any tag)", "IntegrityError (exit 12) naming the object")
def test_a_flipped_bit_anywhere_is_refused(keys: RepoKeys) -> None:
    _, blob = five_segments(keys)
    step = SEG + TAG_BYTES
    spots = [0, 5, 6, 9, 10, 11, 42, HEADER_BYTES, HEADER_BYTES + SEG + 3,
             HEADER_BYTES + step - 1, HEADER_BYTES + 2 * step + 17, len(blob) - 17,
             len(blob) - 1]
    for spot in spots:
        for bit in (0, 7):
            bad = bytearray(blob)
            bad[spot] ^= 1 << bit
            assert NAME in refused(keys, bytes(bad))


@pytest.mark.hostile("store", "an encrypted object cut short (inside the header, inside a "
                     "segment, at a segment boundary, to its header)",
                     "IntegrityError: truncated")
def test_truncation_is_refused(keys: RepoKeys) -> None:
    _, blob = five_segments(keys)
    step = SEG + TAG_BYTES
    for cut in (0, 10, HEADER_BYTES, HEADER_BYTES + 5, HEADER_BYTES + step,
                HEADER_BYTES + step + 1, HEADER_BYTES + 4 * step, len(blob) - 1):
        refused(keys, blob[:cut])
    # a cut at a boundary: the last segment read was not sealed as the last
    msg = refused(keys, blob[:HEADER_BYTES + 4 * step], match="ends early")
    assert "segment 3" in msg


@pytest.mark.hostile("store", "an encrypted object's last segment dropped",
                     "IntegrityError: ends early")
def test_dropped_last_segment_is_refused(keys: RepoKeys) -> None:
    data = os.urandom(3 * SEG)  # a multiple of the segment: each piece is a whole segment
    header, segs = segments(seal(keys, data))
    assert len(segs) == 3
    refused(keys, header + segs[0] + segs[1], match="ends early")


@pytest.mark.hostile("store", "an encrypted object's segments reordered, repeated, or one "
                     "dropped from the middle", "IntegrityError (exit 12)")
def test_reordered_repeated_or_missing_segments_are_refused(keys: RepoKeys) -> None:
    _, blob = five_segments(keys)
    header, segs = segments(blob)
    assert len(segs) == 5
    for order in ([1, 0, 2, 3, 4], [0, 2, 1, 3, 4], [0, 1, 2, 4, 3], [0, 0, 1, 2, 3, 4],
                  [0, 1, 2, 3, 3, 4], [0, 2, 3, 4], [0, 1, 2, 3, 4, 4]):
        refused(keys, header + b"".join(segs[i] for i in order))


@pytest.mark.hostile("store", "an encrypted object served under another name (a chunk for "
                     "another, yesterday's manifest as today's)", "IntegrityError (exit 12)")
def test_an_object_under_another_name_is_refused(keys: RepoKeys) -> None:
    blob = seal(keys, b"manifest of yesterday", name="backups/a/b/20261125T000000Z.json")
    msg = refused(keys, blob, name="backups/a/b/20261126T000000Z.json")
    assert "another name" in msg
    # two objects' headers swapped: each segment is bound to its own header
    other = seal(keys, b"x" * 21, name=NAME)
    mine = seal(keys, b"y" * 21, name=NAME)
    refused(keys, other[:HEADER_BYTES] + mine[HEADER_BYTES:])


@pytest.mark.hostile("store", "an encrypted object opened with another repository's key",
                     "IntegrityError naming damage or another key as the causes")
def test_another_key_is_refused(keys: RepoKeys) -> None:
    blob = seal(keys, b"secret")
    msg = refused(RepoKeys.generate(), blob)
    assert "another repository's key" in msg


@pytest.mark.hostile("store", "an encrypted object's header: bad magic, unknown version or "
                     "algorithm, segment size 0 or 4 GiB", "IntegrityError before any "
                     "allocation of the claimed size")
def test_bad_headers_are_refused_before_allocating(keys: RepoKeys) -> None:
    blob = seal(keys, b"data" * 100)
    cases = {
        b"NOENC" + blob[5:]: "bad magic",
        blob[:5] + b"\x02" + blob[6:]: "version 2",
        blob[:6] + b"\x07" + blob[7:]: "algorithm 7",
        blob[:7] + struct.pack(">I", 0) + blob[11:]: "segment size 0",
        blob[:7] + struct.pack(">I", 0xFFFFFFFF) + blob[11:]: "segment size 4294967295",
        blob[:7] + struct.pack(">I", MAX_SEGMENT + 1) + blob[11:]: "outside",
    }
    tracemalloc.start()
    try:
        for bad, why in cases.items():
            refused(keys, bad, match=why)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


@pytest.mark.hostile("store", "an encrypted object bigger than its kind may be (a huge "
                     "'manifest')", "IntegrityError from its size, before decrypting")
def test_max_plain_bounds_small_objects(keys: RepoKeys) -> None:
    data = os.urandom(3 * SEG)
    blob = seal(keys, data)
    assert decrypt_object(keys, NAME, blob, max_plain=len(data)) == data
    with pytest.raises(IntegrityError, match="more than"):
        decrypt_object(keys, NAME, blob, max_plain=len(data) - 1)
    with pytest.raises(IntegrityError, match="more than"):
        decrypt_object(keys, NAME, blob + os.urandom(10 * SEG), max_plain=len(data))
    dec = Decryptor(keys, NAME, max_plain=SEG)
    with pytest.raises(IntegrityError, match="more than"):
        dec.feed(blob)
        dec.close()


@pytest.mark.hostile("store", "a damaged segment in the middle of a streamed restore",
                     "the segments before it come out, none of the damaged one: IntegrityError")
def test_no_plaintext_of_a_damaged_segment_comes_out(keys: RepoKeys) -> None:
    data, blob = five_segments(keys)
    bad = bytearray(blob)
    bad[HEADER_BYTES + 2 * (SEG + TAG_BYTES) + 5] ^= 0x80  # inside segment 2
    dec = Decryptor(keys, NAME)
    out: list[bytes] = []
    with pytest.raises(IntegrityError, match="segment 2 does not authenticate"):
        for i in range(0, len(bad), 1000):
            out += dec.feed(bytes(bad[i:i + 1000]))
    assert b"".join(out) == data[:2 * SEG]


def test_names_are_checked(keys: RepoKeys) -> None:
    for bad in ("", "x" * 1025, None):
        with pytest.raises(UsageError):
            encrypt_object(keys, bad, b"")  # type: ignore[arg-type]
        with pytest.raises(UsageError):
            Decryptor(keys, bad)  # type: ignore[arg-type]
