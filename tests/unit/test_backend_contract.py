"""The Backend contract (sanoffload/store/backend.py), one set of tests for every backend.

Each test takes the ``subject`` fixture: a backend under test and how to make one of
its writers look dead (a crashed process). Here it runs on :class:`MemoryBackend`
(unversioned and versioned) and on :class:`DirBackend` in tmp_path.

Another backend joins by importing these tests into a module of its own tier and
defining ``subject`` there; pytest collects the imported tests in that module, and
its fixture wins over this one. The S3 backend's host-tier module, for example::

    # tests/host/test_backend_s3_contract.py
    import pytest
    from tests.unit.test_backend_contract import *  # noqa: F403 (the contract's tests)
    from tests.unit.test_backend_contract import Subject

    @pytest.fixture
    def subject(rgw_bucket) -> Subject:          # a fresh bucket (prefix) per test
        backend = S3Backend(rgw_bucket.profile)
        # an abandoned multipart upload is all a dead S3 writer leaves
        return Subject(backend, abandon=lambda w: None)

The tests only assume what the contract says; what one backend does beyond it
(the directory's symlink and flock rules) is in tests/unit/test_backend_dir.py.
"""

from __future__ import annotations

import os
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import pytest

from sanoffload.errors import (
    AuthError,
    IntegrityError,
    ObjectStoreError,
    ResourceError,
    SanoffloadError,
    UsageError,
)
from sanoffload.store.backend import Backend, NotFound, ObjectWriter
from sanoffload.store.backend_dir import DirBackend, DirWriter
from sanoffload.testing import MemoryBackend


@dataclass
class Subject:
    """A backend under test, and how one of its writers is made to look crashed."""

    backend: Backend
    abandon: Callable[[ObjectWriter], None]


def _crash_dir_writer(w: ObjectWriter) -> None:
    """What the kernel does for a writer killed with SIGKILL: its descriptors close, so its
    lock is released, and its partial stays."""
    writer = cast(DirWriter, w)
    assert writer._fd is not None and writer._dir_fd is not None
    os.close(writer._fd)
    os.close(writer._dir_fd)
    writer._fd = writer._dir_fd = None


@pytest.fixture(params=["memory", "memory-versioned", "dir"])
def subject(request: pytest.FixtureRequest, tmp_path: Path) -> Subject:
    if request.param == "dir":
        return Subject(DirBackend(tmp_path), _crash_dir_writer)
    return Subject(MemoryBackend(versioned=request.param == "memory-versioned"),
                   lambda w: None)  # an uncommitted upload: nothing else to lose


def keys(backend: Backend, prefix: str = "") -> list[str]:
    return [info.key for info in backend.list(prefix)]


def peak_memory(call: Callable[[], object]) -> int:
    """The most memory Python held at once while ``call`` ran."""
    tracemalloc.start()
    try:
        call()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def later() -> float:
    """A cutoff every upload made so far is older than."""
    return time.time() + 3600


# -- storing and reading ----------------------------------------------------------------------
def test_a_put_object_reads_back_whole(subject: Subject) -> None:
    b = subject.backend
    info = b.put("hosts/fs1/a.json", b"hello")
    assert (info.key, info.size) == ("hosts/fs1/a.json", 5)
    assert b.get("hosts/fs1/a.json", max_bytes=5) == b"hello"
    found = b.stat("hosts/fs1/a.json")
    assert found is not None and found.size == 5 and found.mtime > 0
    assert [v.size for v in b.versions("hosts/fs1/a.json")] == [5]
    assert keys(b) == ["hosts/fs1/a.json"]


def test_a_writer_streams_pieces_into_one_object(subject: Subject) -> None:
    b = subject.backend
    piece = bytes(range(256)) * 4096  # 1 MiB
    w = b.writer("archives/x.tar.zst", size_hint=3 * len(piece))
    for _ in range(3):
        w.write(piece)
    w.write(memoryview(b"tail"))
    info = w.commit()
    assert info.size == 3 * len(piece) + 4
    stream = b.open_read("archives/x.tar.zst")
    try:
        got = bytearray()
        while data := stream.read(100_000):
            got += data
    finally:
        stream.close()
    assert bytes(got) == piece * 3 + b"tail"
    assert list(b.stale_uploads(later())) == []


def test_nothing_is_visible_before_the_commit(subject: Subject) -> None:
    b = subject.backend
    w = b.writer("a/b")
    w.write(b"data")
    assert b.stat("a/b") is None
    assert keys(b) == []
    assert b.versions("a/b") == []
    with pytest.raises(NotFound):
        b.get("a/b", max_bytes=10)
    w.commit()
    assert keys(b) == ["a/b"]


def test_an_aborted_writer_leaves_nothing(subject: Subject) -> None:
    b = subject.backend
    w = b.writer("a/b")
    w.write(b"data")
    w.abort()
    w.abort()  # twice is fine
    assert keys(b) == [] and b.stat("a/b") is None
    assert list(b.stale_uploads(later())) == []


# -- write once ------------------------------------------------------------------------------
def test_an_exclusive_put_never_replaces(subject: Subject) -> None:
    b = subject.backend
    b.put("k", b"first")
    with pytest.raises(ResourceError):
        b.put("k", b"second")
    assert b.get("k", max_bytes=100) == b"first"
    assert len(b.versions("k")) == 1


def test_a_writer_commit_onto_an_existing_key_is_refused(subject: Subject) -> None:
    b = subject.backend
    b.put("k", b"first")
    w = b.writer("k")
    w.write(b"second")
    with pytest.raises(ResourceError):
        w.commit()
    w.abort()  # after a failed commit: fine, and it drops the upload
    assert b.get("k", max_bytes=100) == b"first"
    assert keys(b) == ["k"]
    assert list(b.stale_uploads(later())) == []


def test_two_writers_of_one_key_one_wins(subject: Subject) -> None:
    b = subject.backend
    w1, w2 = b.writer("k"), b.writer("k")
    w1.write(b"one")
    w2.write(b"two")
    w2.commit()
    with pytest.raises(ResourceError):
        w1.commit()
    w1.abort()
    assert b.get("k", max_bytes=10) == b"two"


def test_a_non_exclusive_put_replaces(subject: Subject) -> None:
    b = subject.backend
    b.put("k", b"first")
    b.put("k", b"second, longer", exclusive=False)
    assert b.get("k", max_bytes=100) == b"second, longer"
    assert keys(b) == ["k"]
    current = b.stat("k")
    assert current is not None and current.size == len(b"second, longer")
    assert b.versions("k")[-1].size == current.size


# -- bounded reads, missing objects ------------------------------------------------------------
def test_a_bigger_object_than_accepted_is_an_integrity_error(subject: Subject) -> None:
    b = subject.backend
    b.put("k", b"x" * 1000)
    assert b.get("k", max_bytes=1000) == b"x" * 1000
    with pytest.raises(IntegrityError):
        b.get("k", max_bytes=999)


@pytest.mark.hostile("store", "an object far bigger than a read accepts (8 MiB, 64 KiB read)",
                     "IntegrityError; never more than the bound held in memory")
def test_reading_a_big_object_allocates_no_more_than_the_bound(subject: Subject) -> None:
    b = subject.backend
    w = b.writer("big")
    for _ in range(8):
        w.write(b"\0" * (1 << 20))
    w.commit()

    def refused() -> None:
        with pytest.raises(IntegrityError):
            b.get("big", max_bytes=64 << 10)

    assert peak_memory(refused) < 1 << 20


def test_a_generous_bound_is_not_what_is_allocated(subject: Subject) -> None:
    b = subject.backend
    b.put("small", b"tiny")
    got: list[bytes] = []
    assert peak_memory(lambda: got.append(b.get("small", max_bytes=1 << 40))) < 4 << 20
    assert got == [b"tiny"]


def test_missing_objects(subject: Subject) -> None:
    b = subject.backend
    with pytest.raises(NotFound) as caught:
        b.get("no/such", max_bytes=10)
    assert caught.value.key == "no/such"
    assert not isinstance(caught.value, SanoffloadError)  # the caller says what it means
    with pytest.raises(NotFound):
        b.open_read("no/such")
    assert b.stat("no/such") is None
    assert b.versions("no/such") == []
    b.delete("no/such")  # missing is fine


def test_a_deleted_object_is_gone(subject: Subject) -> None:
    b = subject.backend
    b.put("a/k", b"data")
    b.put("a/other", b"stays")
    b.delete("a/k")
    assert b.stat("a/k") is None
    with pytest.raises(NotFound):
        b.get("a/k", max_bytes=10)
    assert keys(b) == ["a/other"]
    b.put("a/k", b"again")  # the key is free again
    assert b.get("a/k", max_bytes=10) == b"again"


# -- listing ----------------------------------------------------------------------------------
NAMES = ["b", "a/c/d", "a.x", "a-b/c", "ab", "a/b", "a/b.json", "A", "_z", "a/b-c/e"]


def test_list_is_in_key_order_and_by_prefix(subject: Subject) -> None:
    b = subject.backend
    for name in NAMES:
        b.put(name, name.encode())
    # key order is the order of the names as strings ("a.x" < "a/b": '.' sorts before '/')
    assert keys(b) == sorted(NAMES)
    assert keys(b, "a/") == ["a/b", "a/b-c/e", "a/b.json", "a/c/d"]
    assert keys(b, "a/c/") == ["a/c/d"]
    assert keys(b, "none/") == []
    infos = {i.key: i for i in b.list()}
    assert all(infos[n].size == len(n) for n in NAMES)
    # shallow: the prefix's own objects, nothing of the folders below
    assert [i.key for i in b.list("a/", shallow=True)] == ["a/b", "a/b.json"]
    assert [i.key for i in b.list("", shallow=True)] == sorted(n for n in NAMES if "/" not in n)


# -- invalid keys -----------------------------------------------------------------------------
BAD_KEYS = [
    pytest.param("..", id="dotdot"),
    pytest.param("a/../b", id="dotdot-inside"),
    pytest.param("/abs", id="absolute"),
    pytest.param("a//b", id="empty-part"),
    pytest.param("a/", id="trailing-slash"),
    pytest.param("", id="empty"),
    pytest.param("x.partial", id="partial-suffix"),
    pytest.param("a/x.partial", id="partial-suffix-below"),
    pytest.param(".hidden", id="dot-led"),
    pytest.param("-rf", id="dash-led"),
    pytest.param("a\nb", id="newline"),
    pytest.param("a\x1b[2Jb", id="escape-sequence"),
    pytest.param("caf\u00e9", id="non-ascii"),
    pytest.param("a b", id="space"),
    pytest.param("x" * 600, id="600-chars"),
    pytest.param("/".join(["x"] * 300), id="600-chars-of-parts"),
    pytest.param(None, id="not-a-string"),
    pytest.param(b"bytes", id="bytes"),
]

OPERATIONS: dict[str, Callable[[Backend, str], object]] = {
    "get": lambda b, k: b.get(k, max_bytes=10),
    "open_read": lambda b, k: b.open_read(k),
    "put": lambda b, k: b.put(k, b"data"),
    "put-replace": lambda b, k: b.put(k, b"data", exclusive=False),
    "writer": lambda b, k: b.writer(k),
    "stat": lambda b, k: b.stat(k),
    "versions": lambda b, k: b.versions(k),
    "delete": lambda b, k: b.delete(k),
}


@pytest.mark.hostile("store", "an object key with '..', '/abs', 'a//b', '.partial', control "
                     "characters, 600 characters", "UsageError before any path or request; "
                     "nothing stored")
@pytest.mark.parametrize("operation", sorted(OPERATIONS))
@pytest.mark.parametrize("key", BAD_KEYS)
def test_invalid_keys_are_refused(subject: Subject, key: str, operation: str,
                                  tmp_path: Path) -> None:
    b = subject.backend
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(UsageError):
        OPERATIONS[operation](b, key)
    assert keys(b) == []
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


@pytest.mark.hostile("store", "a listing prefix without a trailing '/', with '..' or absolute",
                     "UsageError; nothing listed")
@pytest.mark.parametrize("prefix", ["a", "../", "/", "/a/", "a//", "x.partial/", "a\n/"])
def test_invalid_prefixes_are_refused(subject: Subject, prefix: str) -> None:
    subject.backend.put("a/b", b"data")
    with pytest.raises(UsageError):
        list(subject.backend.list(prefix))


# -- uploads that never finished --------------------------------------------------------------
def test_a_dead_writers_upload_is_found_and_aborted(subject: Subject) -> None:
    b = subject.backend
    b.put("done", b"committed")
    w = b.writer("cut/off")
    w.write(b"half an archive")
    subject.abandon(w)
    assert keys(b) == ["done"]  # never listed as an object
    found = list(b.stale_uploads(later()))
    assert [u.key for u in found] == ["cut/off"]
    assert found[0].started <= time.time()
    b.abort_upload(found[0])
    b.abort_upload(found[0])  # gone already is fine
    assert list(b.stale_uploads(later())) == []
    assert keys(b) == ["done"]
    b.put("cut/off", b"the retry")  # the key was never taken
    assert b.get("cut/off", max_bytes=100) == b"the retry"


def test_an_upload_newer_than_the_cutoff_is_not_stale(subject: Subject) -> None:
    b = subject.backend
    w = b.writer("k")
    w.write(b"x")
    subject.abandon(w)
    assert list(b.stale_uploads(time.time() - 3600)) == []
    assert len(list(b.stale_uploads(later()))) == 1


# -- the memory backend's model of the S3 roles -------------------------------------------------
def test_memory_versions_keep_every_write_and_delete_markers() -> None:
    b = MemoryBackend(versioned=True)
    first = b.put("k", b"one")
    b.put("k", b"two", exclusive=False)
    assert [v.size for v in b.versions("k")] == [3, 3]
    assert b.get("k", max_bytes=10, version=first.version) == b"one"
    b.delete("k")  # a delete marker: the versions stay
    assert b.stat("k") is None and keys(b) == []
    history = b.versions("k")
    assert [v.deleted for v in history] == [False, False, True]
    assert b.get("k", max_bytes=10, version=first.version) == b"one"
    for v in history:
        b.delete("k", version=v.version)
    assert b.versions("k") == []


def test_memory_deny_delete_models_the_proxy_role() -> None:
    b = MemoryBackend(versioned=True, deny_delete=True)
    info = b.put("k", b"data")
    with pytest.raises(AuthError):
        b.delete("k")
    with pytest.raises(AuthError):
        b.delete("k", version=info.version)
    assert b.get("k", max_bytes=10) == b"data"


def test_memory_retention_refuses_removing_a_version_early() -> None:
    now = [1000.0]
    b = MemoryBackend(versioned=True, retain_until=2000.0, clock=lambda: now[0])
    info = b.put("k", b"data")
    assert info.retain_until == 2000.0
    with pytest.raises(AuthError):
        b.delete("k", version=info.version)
    b.delete("k")  # a delete marker is allowed, as on S3; the data stays
    assert b.get("k", max_bytes=10, version=info.version) == b"data"
    now[0] = 2001.0
    b.delete("k", version=info.version)
    assert [v.deleted for v in b.versions("k")] == [True]


def test_memory_commit_of_an_aborted_upload_fails() -> None:
    b = MemoryBackend()
    w = b.writer("k")
    w.write(b"x")
    (upload,) = b.stale_uploads(later())
    b.abort_upload(upload)
    with pytest.raises(ObjectStoreError):
        w.commit()
    assert keys(b) == []
