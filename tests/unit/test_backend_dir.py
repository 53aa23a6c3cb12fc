"""The directory backend's own rules, beyond the contract (tests/unit/test_backend_contract.py).

A real DirBackend in tmp_path: symlinks and FIFOs planted where a key or one of its
directories should be, a live writer (this process holds its lock) and a dead one (a
real child process killed with SIGKILL).
"""

from __future__ import annotations

import errno
import fcntl
import io
import logging
import os
import re
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from sanoffload.errors import IntegrityError, RefusedError, ResourceError, UsageError
from sanoffload.store import backend_dir, repo
from sanoffload.store.backend import NotFound, Upload
from sanoffload.store.backend_dir import DirBackend

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "store").mkdir()
    return tmp_path / "store"


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A directory a planted symlink points at, with a file that must stay as it is."""
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret").write_bytes(b"not the store's")
    return tmp_path / "outside"


def keys(b: DirBackend, prefix: str = "") -> list[str]:
    return [i.key for i in b.list(prefix)]


def files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def within(seconds: float, call: Callable[[], object]) -> BaseException | None:
    """Run ``call`` in a thread; fail the test if it has not returned by the deadline (a
    read that blocks on a FIFO would never return). Returns what it raised."""
    raised: list[BaseException | None] = [None]

    def run() -> None:
        try:
            call()
        except BaseException as exc:
            raised[0] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), "blocked"
    return raised[0]


def test_a_key_is_a_file_under_the_root(root: Path) -> None:
    b = DirBackend(root)
    b.put("a/b/c", b"data")
    assert (root / "a" / "b" / "c").read_bytes() == b"data"
    assert files(root) == ["a", "a/b", "a/b/c"]  # no partial left
    assert stat.S_IMODE((root / "a").stat().st_mode) == 0o750
    assert stat.S_IMODE((root / "a" / "b" / "c").stat().st_mode) == 0o440  # write-once


def test_a_missing_root_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError):
        DirBackend(tmp_path / "none")


def test_the_repository_and_the_backend_share_one_copy_of_the_file_code() -> None:
    for name in ("_publish", "_write_file", "_write_all", "_open_locked", "_sweep_partial"):
        assert getattr(repo, name) is getattr(backend_dir, name), name


def test_a_writer_holds_a_locked_partial_beside_its_key(root: Path) -> None:
    b = DirBackend(root)
    with b.writer("a/k") as w:
        w.write(b"data")
        (name,) = os.listdir(root / "a")
        assert re.fullmatch(r"k\.[0-9a-f]{16}\.partial", name)
        fd = os.open(root / "a" / name, os.O_RDONLY)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
        w.commit()
    assert os.listdir(root / "a") == ["k"]


def test_replacing_is_atomic_for_a_reader(root: Path) -> None:
    b = DirBackend(root)
    b.put("k", b"old" * 1000)
    reader = b.open_read("k")
    try:
        b.put("k", b"new", exclusive=False)
        assert reader.read(10_000) == b"old" * 1000  # the reader keeps the object it opened
    finally:
        reader.close()
    assert b.get("k", max_bytes=10) == b"new"
    assert files(root) == ["k"]


def test_without_hard_links_publishing_still_never_replaces(
        root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_links(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr("sanoffload.store.backend_dir.os.link", no_links)
    b = DirBackend(root)
    b.put("k", b"first")
    with pytest.raises(ResourceError):
        b.put("k", b"second")
    assert b.get("k", max_bytes=10) == b"first"
    assert files(root) == ["k"]


def test_mtime_is_the_files(root: Path) -> None:
    b = DirBackend(root)
    b.put("a/k", b"data")
    os.utime(root / "a" / "k", (1_000_000_000, 1_000_000_000))
    info = b.stat("a/k")
    assert info is not None and info.mtime == 1_000_000_000 and info.version is None
    assert [i.mtime for i in b.list()] == [1_000_000_000]


def test_a_directory_has_no_other_versions(root: Path) -> None:
    b = DirBackend(root)
    b.put("k", b"data")
    with pytest.raises(NotFound):
        b.get("k", max_bytes=10, version="v1")
    b.delete("k", version="v1")  # no such version: nothing removed
    assert b.get("k", max_bytes=10) == b"data"


# -- what a foreign writer plants ---------------------------------------------------------------
@pytest.mark.hostile("store", "a symlink planted at an object's key, pointing outside the store",
                     "never followed: reads refused, writes replace the link or are refused, "
                     "its target untouched, not listed")
def test_a_symlink_at_a_key_is_never_followed(root: Path, outside: Path) -> None:
    b = DirBackend(root)
    (root / "k").symlink_to(outside / "secret")
    with pytest.raises(IntegrityError):
        b.get("k", max_bytes=100)
    with pytest.raises(IntegrityError):
        b.open_read("k")
    with pytest.raises(IntegrityError):
        b.stat("k")
    assert keys(b) == []
    with pytest.raises(ResourceError):
        b.put("k", b"written through?")
    w = b.writer("k")
    w.write(b"written through?")
    with pytest.raises(ResourceError):
        w.commit()
    assert (outside / "secret").read_bytes() == b"not the store's"
    b.put("k", b"mine", exclusive=False)  # the link itself is replaced
    assert not (root / "k").is_symlink() and b.get("k", max_bytes=10) == b"mine"
    assert (outside / "secret").read_bytes() == b"not the store's"
    (root / "j").symlink_to(outside / "secret")
    b.delete("j")  # the link goes, not what it points at
    assert not os.path.lexists(root / "j") and (outside / "secret").exists()


@pytest.mark.hostile("store", "a symlink planted for a directory on an object's way",
                     "refused (not a directory: not followed); nothing read or written "
                     "outside the store; nothing listed below it")
def test_a_symlink_for_a_directory_is_never_followed(root: Path, outside: Path) -> None:
    b = DirBackend(root)
    (root / "a").symlink_to(outside)
    with pytest.raises(RefusedError):
        b.get("a/secret", max_bytes=100)
    with pytest.raises(RefusedError):
        b.put("a/new", b"data")
    with pytest.raises(RefusedError):
        b.writer("a/b/new")
    with pytest.raises(RefusedError):
        b.delete("a/secret")
    with pytest.raises(RefusedError):
        b.stat("a/secret")
    assert keys(b) == [] and keys(b, "a/") == []
    assert list(b.stale_uploads(time.time() + 3600)) == []
    assert sorted(os.listdir(outside)) == ["secret"]
    assert (outside / "secret").read_bytes() == b"not the store's"


@pytest.mark.hostile("store", "a FIFO at an object's key and under a partial file's name",
                     "reads fail at once (not a regular file); listing and the stale-upload "
                     "scan skip it; nothing blocks")
def test_a_fifo_never_blocks(root: Path) -> None:
    b = DirBackend(root)
    os.mkfifo(root / "k")
    os.mkfifo(root / "j.0123456789abcdef.partial")
    assert isinstance(within(10, lambda: b.get("k", max_bytes=10)), IntegrityError)
    assert isinstance(within(10, lambda: b.open_read("k")), IntegrityError)
    assert within(10, lambda: keys(b)) is None
    assert keys(b) == []
    found: list[Upload] = []
    assert within(10, lambda: found.extend(b.stale_uploads(time.time() + 3600))) is None
    assert found == []


@pytest.mark.hostile("store", "files a foreign writer left in the store: bad names, a newline "
                     "in a name, dot files, an unlocked '.partial', a directory named '.partial'",
                     "not listed as objects; each odd one logged (escaped)")
def test_listing_skips_what_is_not_an_object(root: Path,
                                             caplog: pytest.LogCaptureFixture) -> None:
    b = DirBackend(root)
    b.put("sub/ok", b"data")
    (root / "bad name").write_bytes(b"x")
    (root / "evil\nname").write_bytes(b"x")
    (root / ".hidden").write_bytes(b"x")
    (root / "x.partial").write_bytes(b"x")
    (root / "d.partial").mkdir()
    (root / "d.partial" / "inner").write_bytes(b"x")
    (root / ("l" * 200)).mkdir()
    (root / ("l" * 200) / ("m" * 200)).mkdir()
    (root / ("l" * 200) / ("m" * 200) / ("n" * 120)).write_bytes(b"too long a key")
    with caplog.at_level(logging.DEBUG, logger="sanoffload.store.backend_dir"):
        assert keys(b) == ["sub/ok"]
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("bad name" in m for m in warned)
    assert any("evil\\nname" in m for m in warned) and not any("\n" in m for m in warned)
    assert not any(".hidden" in m for m in warned)  # the repository's own dot files: quiet


@pytest.mark.hostile("store", "an upload id naming a file outside the store or no partial",
                     "UsageError; nothing removed")
@pytest.mark.parametrize("uid", ["../secret", "../x.partial", "/etc/x.partial", "a/../x.partial",
                                 "k", "a//x.partial", ""])
def test_abort_upload_refuses_a_bad_upload_id(root: Path, outside: Path, uid: str) -> None:
    b = DirBackend(root)
    (root / "x.partial").write_bytes(b"x")
    with pytest.raises(UsageError):
        b.abort_upload(Upload(key="x", upload_id=uid, started=0.0))
    assert (root / "x.partial").exists() and (outside / "secret").exists()


# -- live and dead writers -----------------------------------------------------------------------
def test_a_live_writers_partial_is_not_stale(root: Path) -> None:
    b = DirBackend(root)
    w = b.writer("a/k")
    w.write(b"still coming")
    assert list(b.stale_uploads(time.time() + 3600)) == []
    with pytest.raises(ResourceError, match="held by a live put"):
        b.abort_upload(Upload(key="a/k", upload_id=f"a/{w.partial}", started=0.0))
    w.commit()  # untouched by the attempts
    assert b.get("a/k", max_bytes=100) == b"still coming"


_CHILD = """
import sys
from sanoffload.store.backend_dir import DirBackend
w = DirBackend(sys.argv[1]).writer("cut/k")
w.write(b"half an object")
print("ready", flush=True)
sys.stdin.read()
"""


@pytest.mark.hostile("store", "an object writer killed with SIGKILL mid-object",
                     "its partial is never listed; found stale once its lock is free, "
                     "and removed")
def test_a_dead_writers_partial_is_stale_and_removed(root: Path) -> None:
    b = DirBackend(root)
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(root)], cwd=REPO_ROOT,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == b"ready\n"
        assert list(b.stale_uploads(time.time() + 3600)) == []  # alive: its lock is held
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
        for stream in (child.stdin, child.stdout):
            if stream is not None:
                stream.close()
    (partial,) = os.listdir(root / "cut")
    assert keys(b) == []
    (upload,) = b.stale_uploads(time.time() + 3600)
    assert upload.key == "cut/k" and upload.upload_id == f"cut/{partial}"
    assert list(b.stale_uploads(upload.started)) == []  # not older than its own mtime
    b.abort_upload(upload)
    assert os.listdir(root / "cut") == []
    b.put("cut/k", b"the retry")
    assert b.get("cut/k", max_bytes=100) == b"the retry"


def test_stale_uploads_names_the_repositorys_own_partials(root: Path) -> None:
    b = DirBackend(root)
    d = root / "fs1" / "srv-data-3f2a9c1e"
    d.mkdir(parents=True)
    (d / "20260101T000000Z.tar.zst.partial").write_bytes(b"x")
    (d / "20260101T000000Z.json.1a2b3c4d.partial").write_bytes(b"x")
    found = sorted((u.key, u.upload_id) for u in b.stale_uploads(time.time() + 3600))
    prefix = "fs1/srv-data-3f2a9c1e/20260101T000000Z"
    assert found == [(f"{prefix}.json", f"{prefix}.json.1a2b3c4d.partial"),
                     (f"{prefix}.tar.zst", f"{prefix}.tar.zst.partial")]


def test_a_full_disk_is_a_resource_error_and_leaves_nothing(
        root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    b = DirBackend(root)

    def full(fd: int, data: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("sanoffload.store.backend_dir.os.write", full)
    with pytest.raises(ResourceError, match="no space left"):
        b.put("a/k", b"data")
    assert files(root) == ["a"]


def test_the_repositorys_writer_says_a_full_disk_through_the_shared_write(
        root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(fd: int, data: object) -> int:
        raise OSError(errno.EDQUOT, "Disk quota exceeded")

    monkeypatch.setattr("sanoffload.store.backend_dir.os.write", full)
    with pytest.raises(ResourceError, match=r"no space left for fs1/srv-"):
        repo.Repository(root).put("fs1", "/srv", io.BytesIO(b"data"), verify=False)
    assert [p for p in files(root) if p.endswith(".partial")] == []
