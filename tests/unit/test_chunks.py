"""The chunk store (issue 13 groundwork): put/get, integrity, gc, and hostile files in chunks/.

A real ChunkStore in tmp_path; no external commands. Times are injected into
gc (``now``) and set on files with os.utime, so nothing waits.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import random
import stat
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import cast

import pytest

from sanoffload.errors import IntegrityError, RefusedError, UsageError
from sanoffload.store.chunks import (
    CHUNK_SIZE,
    HEADER,
    MAX_CHUNK,
    ChunkStore,
    Junk,
    check_id,
    is_zero,
)
from sanoffload.text import printable

pytestmark = pytest.mark.unit

#: a past instant (2001): a put's real clock is always later
T0 = 1_000_000_000.0
DAY = 86400.0


@pytest.fixture
def store(tmp_path: Path) -> ChunkStore:
    (tmp_path / "repo").mkdir()
    return ChunkStore(tmp_path / "repo")


def age(store: ChunkStore, cid: str, when: float) -> None:
    """Set a chunk's mtime (what gc's grace period is measured from)."""
    os.utime(store.path(cid), (when, when))


def flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x01]))


def test_put_get_roundtrip_layout_and_modes(store: ChunkStore) -> None:
    data = os.urandom(CHUNK_SIZE)
    cid = store.put(data)
    assert cid == hashlib.sha256(data).hexdigest()
    path = store.root / "chunks" / cid[:2] / cid
    assert store.path(cid) == path and path.is_file()
    assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0
    assert stat.S_IMODE(path.parent.stat().st_mode) & 0o077 == 0
    assert stat.S_IMODE(path.parent.parent.stat().st_mode) & 0o077 == 0
    assert store.has(cid) and store.get(cid) == data
    assert store.size(cid) == HEADER.size + len(data)
    assert list(store.ids()) == [cid]
    # nothing left beside it: the partial was renamed
    assert os.listdir(path.parent) == [cid]


def test_put_is_idempotent_and_does_not_rewrite(store: ChunkStore) -> None:
    data = b"x" * 1000
    cid = store.put(data)
    before = os.stat(store.path(cid))
    age(store, cid, T0)
    assert store.put(bytearray(data)) == cid
    after = os.stat(store.path(cid))
    assert after.st_ino == before.st_ino  # not rewritten
    assert after.st_mtime > T0  # but touched: gc's grace period starts again
    assert list(store.ids()) == [cid]


def test_empty_store_and_absent_chunk(store: ChunkStore) -> None:
    cid = hashlib.sha256(b"nothing").hexdigest()
    assert not store.has(cid) and list(store.ids()) == []
    with pytest.raises(IntegrityError, match="missing"):
        store.get(cid)
    report = store.verify([cid])
    assert report.missing == [cid] and not report.ok
    assert store.gc(set(), grace_s=0).removed == []


def test_a_missing_repository_root_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError):
        ChunkStore(tmp_path / "nowhere")


def test_is_zero() -> None:
    assert is_zero(bytes(CHUNK_SIZE)) and is_zero(bytearray(10)) and is_zero(b"")
    assert is_zero(memoryview(bytes(4096)))
    assert not is_zero(bytes(CHUNK_SIZE - 1) + b"\x01")
    assert not is_zero(b"\x01" + bytes(100))


@pytest.mark.hostile("store", "a chunk file with one flipped byte (data or header)",
                     "get raises IntegrityError (exit 12), never returns the bytes; verify "
                     "lists it, the good chunks pass")
@pytest.mark.parametrize("where", ["payload", "length", "magic", "codec"])
def test_corruption_is_detected_on_get_and_verify(store: ChunkStore, where: str) -> None:
    good = store.put(b"good" * 100)
    cid = store.put(b"payload" * 1000)
    offset = {"payload": HEADER.size + 1234, "length": HEADER.size - 1, "magic": 0,
              "codec": 7}[where]
    flip(store.path(cid), offset)
    with pytest.raises(IntegrityError) as info:
        store.get(cid)
    assert info.value.exit_code == 12
    report = store.verify()
    assert report.checked == 2 and [b[0] for b in report.bad] == [cid] and not report.ok
    assert store.verify([good]).ok


@pytest.mark.hostile("store", "a chunk file cut short, or with bytes appended",
                     "IntegrityError on get and in verify")
@pytest.mark.parametrize("cut", [-1, +1, -(HEADER.size + 4000), "header"])
def test_truncated_or_extended_chunk(store: ChunkStore, cut: int | str) -> None:
    cid = store.put(b"z" * 4000)
    path = store.path(cid)
    if cut == "header":
        os.truncate(path, 5)
    else:
        assert isinstance(cut, int)
        os.truncate(path, path.stat().st_size + cut)
    with pytest.raises(IntegrityError):
        store.get(cid)
    assert store.verify().bad[0][0] == cid


@pytest.mark.hostile("store", "a chunk id that is a path, upper case, short, or ends in a "
                     "newline", "refused (exit 3) before any path is built")
@pytest.mark.parametrize("bad", ["../../etc/passwd", "A" * 64, "a" * 63, "a" * 64 + "\n",
                                 "ab/" + "a" * 61, "g" * 64, "", 42])
def test_invalid_ids_are_refused(store: ChunkStore, bad: object) -> None:
    hostile = cast(str, bad)  # what a manifest could hold where an id belongs
    for call in (store.get, store.has, store.size, store.path, check_id):
        with pytest.raises(RefusedError) as info:
            call(hostile)
        assert info.value.exit_code == 3
    # verify lists it as bad instead of stopping there
    report = store.verify([hostile])
    assert len(report.bad) == 1 and not report.missing
    assert not (store.root / "chunks").exists()


@pytest.mark.hostile("store", "a chunk of more than 16 MiB to put",
                     "refused (exit 3); nothing written")
def test_put_refuses_an_oversized_chunk(store: ChunkStore) -> None:
    with pytest.raises(RefusedError, match="the most is"):
        store.put(bytes(MAX_CHUNK + 1))
    assert list(store.ids()) == []
    assert store.put(b"\x01" * MAX_CHUNK)  # the bound itself is fine


@pytest.mark.hostile("store", "a 1 GiB (sparse) file under a chunk's name",
                     "IntegrityError without reading it: memory stays under 20 MiB")
def test_get_refuses_a_huge_file_without_reading_it(store: ChunkStore) -> None:
    cid = store.put(b"small")
    os.truncate(store.path(cid), 1 << 30)
    tracemalloc.start()
    try:
        with pytest.raises(IntegrityError, match="more than a chunk can hold"):
            store.get(cid)
        assert not store.verify().ok
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 20 << 20


# -- gc ----------------------------------------------------------------------------------

def test_gc_never_removes_a_referenced_chunk_random_sets(store: ChunkStore) -> None:
    rng = random.Random(13)
    stored: dict[str, bytes] = {}
    for _round in range(25):
        for _ in range(rng.randrange(0, 12)):
            data = rng.randbytes(rng.randrange(0, 3000))
            cid = store.put(data)
            stored[cid] = data
            age(store, cid, T0 - rng.choice([0, DAY, 30 * DAY]))
        referenced = {c for c in stored if rng.random() < 0.5}
        # manifests may name chunks that are gone, and hostile strings
        referenced |= {hashlib.sha256(rng.randbytes(8)).hexdigest(), "../x", ""}
        grace = rng.choice([0.0, 3600.0, 7 * DAY])
        dry = rng.random() < 0.2
        report = store.gc(referenced, grace_s=grace, now=T0, dry_run=dry)
        present = set(store.ids())
        for cid in referenced & set(stored):
            assert cid in present and store.get(cid) == stored[cid]
        assert not referenced & set(report.removed)
        for cid in report.removed:
            assert (cid in present) == dry
            if not dry:
                del stored[cid]
        # what stays unreferenced is within the grace period
        for cid in present - referenced if not dry else ():
            assert os.stat(store.path(cid)).st_mtime >= T0 - grace
        assert store.verify().ok


def test_gc_respects_the_grace_period(store: ChunkStore) -> None:
    old, kept = store.put(b"old"), store.put(b"kept")
    for cid in (old, kept):
        age(store, cid, T0)
    hour = 3600.0
    report = store.gc({kept}, grace_s=hour, now=T0 + hour - 1)
    assert report.removed == [] and report.kept_young == 1 and report.kept_referenced == 1
    report = store.gc({kept}, grace_s=hour, now=T0 + hour + 1, dry_run=True)
    assert report.removed == [old] and report.dry_run and store.has(old)
    report = store.gc({kept}, grace_s=hour, now=T0 + hour + 1)
    assert report.removed == [old] and report.freed_bytes == HEADER.size + 3
    assert not store.has(old) and store.get(kept) == b"kept"
    # a chunk written "in the future" (a clock step) is young, not removed
    future = store.put(b"future")
    age(store, future, T0 + DAY)
    assert store.gc(set(), grace_s=0, now=T0).removed == []


def test_a_re_used_old_chunk_is_not_swept_under_a_running_backup(store: ChunkStore) -> None:
    # an old, unreferenced chunk that a new backup puts again (dedup hit) must survive a gc
    # that runs before that backup's manifest exists
    cid = store.put(b"shared")
    age(store, cid, T0 - 30 * DAY)
    assert store.put(b"shared") == cid
    report = store.gc(set(), grace_s=DAY)
    assert report.removed == [] and store.get(cid) == b"shared"


@pytest.mark.hostile("store", "gc given a negative, infinite or NaN grace period",
                     "refused (exit 2); nothing removed")
@pytest.mark.parametrize("grace", [-1.0, float("inf"), float("nan")])
def test_gc_refuses_a_bad_grace_period(store: ChunkStore, grace: float) -> None:
    cid = store.put(b"a")
    with pytest.raises(UsageError):
        store.gc(set(), grace_s=grace)
    assert store.has(cid)


def test_gc_partials_young_kept_stale_removed_live_writer_kept(store: ChunkStore) -> None:
    cid = store.put(b"c")
    fan = store.path(cid).parent
    young, stale, live = (fan / f"{cid}.{n:016x}.partial" for n in (1, 2, 3))
    for p in (young, stale, live):
        p.write_bytes(b"half a chunk")
    os.utime(young, (T0, T0))
    os.utime(stale, (T0 - DAY, T0 - DAY))
    os.utime(live, (T0 - DAY, T0 - DAY))
    with open(live, "rb") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)  # a writer stalled for a day, still alive
        report = store.gc({cid}, grace_s=3600, now=T0)
    assert report.partials_removed == [f"chunks/{cid[:2]}/{stale.name}"]
    assert report.partials_left == 2 and report.junk == []
    assert young.exists() and live.exists() and not stale.exists()
    assert list(store.ids()) == [cid]  # partials are not chunks


# -- hostile files in chunks/ ---------------------------------------------------------------

@pytest.mark.hostile("store", "a symlink under a chunk's name in chunks/ab/ pointing outside, "
                     "and one pointing to a real chunk", "never read, listed or deleted "
                     "through: reported as junk; get raises IntegrityError; targets intact")
def test_a_symlink_planted_in_a_fan_out_dir(store: ChunkStore, tmp_path: Path) -> None:
    real = store.put(b"real chunk")
    secret = tmp_path / "secret"
    secret.write_bytes(b"not yours")
    fan = store.path(real).parent
    # names that are valid ids in the right fan-out directory
    evil = real[:2] + "0" * 62
    alias = real[:2] + "1" * 62
    (fan / evil).symlink_to(secret)
    (fan / alias).symlink_to(fan / real)
    for name in (evil, alias, real):
        os.utime(fan / name, (T0, T0), follow_symlinks=False)
    os.utime(secret, (T0, T0))
    junk: list[Junk] = []
    assert list(store.ids(junk)) == [real]
    assert {j.path for j in junk} == {f"chunks/{real[:2]}/{evil}", f"chunks/{real[:2]}/{alias}"}
    for name in (evil, alias):
        assert not store.has(name)
        with pytest.raises(IntegrityError, match="symlink"):
            store.get(name)
    report = store.gc(set(), grace_s=0, now=T0 + DAY)
    assert report.removed == [real]
    assert len(report.junk) == 2
    assert (fan / evil).is_symlink() and (fan / alias).is_symlink()
    assert secret.read_bytes() == b"not yours"
    verify = store.verify([evil])
    assert verify.bad and not verify.missing


@pytest.mark.hostile("store", "a symlink planted under the id of data about to be put",
                     "put refuses (exit 3); nothing written through the link")
def test_put_does_not_write_through_a_symlink(store: ChunkStore, tmp_path: Path) -> None:
    data = b"victim"
    cid = hashlib.sha256(data).hexdigest()
    secret = tmp_path / "secret"
    secret.write_bytes(b"not yours")
    os.utime(secret, (T0, T0))
    fan = store.root / "chunks" / cid[:2]
    fan.mkdir(parents=True)
    (fan / cid).symlink_to(secret)
    with pytest.raises(RefusedError, match="not a regular file"):
        store.put(data)
    assert secret.read_bytes() == b"not yours" and secret.stat().st_mtime == T0
    assert sorted(os.listdir(fan)) == [cid]  # no partial left behind


@pytest.mark.hostile("store", "a fan-out directory chunks/ab that is a symlink to a directory "
                     "outside holding a valid-looking chunk", "not followed: junk in listings, "
                     "IntegrityError on get, refused on put; the outside file survives gc")
def test_a_symlinked_fan_out_directory(store: ChunkStore, tmp_path: Path) -> None:
    data = b"outside"
    cid = hashlib.sha256(data).hexdigest()
    outside = tmp_path / "outside"
    outside.mkdir()
    # a genuine chunk file, made by a second store, then moved out of reach
    other = tmp_path / "other"
    other.mkdir()
    ChunkStore(other).put(data)
    (other / "chunks" / cid[:2] / cid).rename(outside / cid)
    os.utime(outside / cid, (T0, T0))
    (store.root / "chunks").mkdir()
    (store.root / "chunks" / cid[:2]).symlink_to(outside)
    junk: list[Junk] = []
    assert list(store.ids(junk)) == [] and [j.path for j in junk] == [f"chunks/{cid[:2]}"]
    with pytest.raises(IntegrityError, match="not following"):
        store.get(cid)
    with pytest.raises(RefusedError, match="not following"):
        store.put(data)
    with pytest.raises(RefusedError):
        store.has(cid)
    report = store.gc(set(), grace_s=0, now=T0 + DAY)
    assert report.removed == [] and len(report.junk) == 1
    assert (outside / cid).exists()
    verify = store.verify([cid])
    assert verify.bad and not verify.missing


@pytest.mark.hostile("store", "chunks/ itself a symlink to another directory",
                     "refused (exit 3) by put, ids and gc; nothing there touched")
def test_chunks_dir_itself_a_symlink(store: ChunkStore, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "ab").mkdir(parents=True)
    victim = elsewhere / "ab" / ("ab" + "0" * 62)
    victim.write_bytes(b"x")
    os.utime(victim, (T0, T0))
    (store.root / "chunks").symlink_to(elsewhere)
    with pytest.raises(RefusedError):
        store.put(b"data")
    with pytest.raises(RefusedError):
        list(store.ids())
    with pytest.raises(RefusedError):
        store.gc(set(), grace_s=0, now=T0 + DAY)
    assert victim.exists() and sorted(os.listdir(elsewhere)) == ["ab"]


@pytest.mark.hostile("store", "junk in chunks/: stray files, upper-case or misplaced ids, a "
                     "directory or a FIFO under a chunk's name, a fan-out that is a file",
                     "listed as junk, never opened or removed; a FIFO does not hang get")
def test_junk_names_are_reported_not_touched(store: ChunkStore) -> None:
    real = store.put(b"real")
    chunks = store.root / "chunks"
    fan = chunks / real[:2]
    other_fan = "00" if real[:2] != "00" else "01"
    (chunks / other_fan).mkdir()
    fifo_id = real[:2] + "f" * 62
    dir_id = real[:2] + "e" * 62
    planted: dict[str, Callable[[], object]] = {
        "chunks/README": lambda: (chunks / "README").write_text("hi"),
        "chunks/AB": (chunks / "AB").mkdir,
        "chunks/zz": lambda: (chunks / "zz").write_text("a file for a fan-out"),
        f"chunks/{real[:2]}/{real.upper()}": lambda: (fan / real.upper()).write_text("x"),
        f"chunks/{other_fan}/{real}": lambda: (chunks / other_fan / real).write_bytes(
            store.path(real).read_bytes()),
        f"chunks/{real[:2]}/{dir_id}": (fan / dir_id).mkdir,
        f"chunks/{real[:2]}/{fifo_id}": lambda: os.mkfifo(fan / fifo_id),
        f"chunks/{real[:2]}/{real}.partial": lambda: (fan / f"{real}.partial").write_text("x"),
        f"chunks/{real[:2]}/line\\nbreak": lambda: (fan / "line\nbreak").write_text("x"),
    }
    for make in planted.values():
        make()
    for p in chunks.rglob("*"):
        os.utime(p, (T0, T0), follow_symlinks=False)
    junk: list[Junk] = []
    assert list(store.ids(junk)) == [real]
    assert {printable(j.path) for j in junk} == set(planted)
    with pytest.raises(IntegrityError, match="not a regular file"):
        store.get(fifo_id)  # opened non-blocking: no writer needed, no hang
    with pytest.raises(IntegrityError):
        store.get(dir_id)
    report = store.gc(set(), grace_s=0, now=T0 + DAY)
    assert report.removed == [real] and len(report.junk) == len(planted)
    assert sorted(p.name for p in fan.iterdir()) == sorted(
        [real.upper(), dir_id, fifo_id, f"{real}.partial", "line\nbreak"])
    assert (chunks / other_fan / real).exists() and (chunks / "README").exists()
