"""The repository: atomic put from a stream, only complete backups listed, verify."""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from sanoffload.errors import (
    CommandNotFoundError,
    IntegrityError,
    Interrupted,
    RefusedError,
    ResourceError,
    UsageError,
)
from sanoffload.store import repo as repo_mod
from sanoffload.store.repo import CHUNK, BackupId, Repository
from sanoffload.testing import FakeRunner
from tests.unit.conftest import listing_runner

pytestmark = pytest.mark.unit

DATA = os.urandom(3 * CHUNK + 12345)  # several chunks and a tail
FROZEN = "2026-11-26T10:29:33.120Z"
TS = "20261126T102933Z"


def all_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir())


class Boom(Exception):
    pass


class FailingStream(io.RawIOBase):
    """Gives ``good`` bytes, then raises ``exc`` (a broken connection, a signal)."""

    def __init__(self, good: bytes, exc: BaseException) -> None:
        self.data = io.BytesIO(good)
        self.exc = exc

    def readable(self) -> bool:
        return True

    def readinto(self, buf: memoryview) -> int:  # type: ignore[override]
        n = self.data.readinto(buf)
        if not n:
            raise self.exc
        return n


class ReadOnly:
    """A stream with read() only (no readinto)."""

    def __init__(self, data: bytes) -> None:
        self._f = io.BytesIO(data)
        self.sizes: list[int] = []

    def read(self, n: int) -> bytes:
        self.sizes.append(n)
        return self._f.read(n)


def test_put_writes_archive_then_manifest_and_hashes_on_the_way(tmp_path: Path) -> None:
    runner = listing_runner(members=7)
    repo = Repository(tmp_path, runner)
    bid = repo.put("fs1", "/srv/data", io.BytesIO(DATA),
                   {"frozen_at": FROZEN, "duplicate_kind": "snapshot", "freeze_window_ms": 41.7,
                    "file_count": 5, "sha256": hashlib.sha256(DATA).hexdigest(),
                    "archive_bytes": len(DATA)})
    assert bid.host == "fs1" and bid.slug.startswith("srv-data-") and bid.timestamp == TS
    archive, manifest = repo.archive_path(bid), repo.manifest_path(bid)
    assert archive.read_bytes() == DATA
    assert archive.stat().st_mode & 0o777 == 0o440
    m = json.loads(manifest.read_text())
    assert m["sha256"] == hashlib.sha256(DATA).hexdigest()
    assert m["archive_bytes"] == len(DATA) and m["member_count"] == 7 and m["file_count"] == 5
    assert m["frozen_at"] == FROZEN and m["duplicate_kind"] == "snapshot"
    assert m["verification"]["status"] == "ok"
    assert all_files(tmp_path) == sorted([f"fs1/{bid.slug}/{TS}.json",
                                          f"fs1/{bid.slug}/{TS}.tar.zst"])
    # the test-read was fed the bytes as they arrived (one decode, no second read)
    assert [c[:2] for c in runner.argvs()] == [["tar", "--list"]]
    assert runner.argvs()[0][-1] == "--file=-"
    assert "--force-local" in runner.argvs()[0] and "--zstd" in runner.argvs()[0]
    assert [b.id for b in repo.list()] == [bid]
    assert repo.get(str(bid)).manifest.sha256 == m["sha256"]


def test_put_reads_in_chunks_from_a_read_only_stream(tmp_path: Path) -> None:
    repo = Repository(tmp_path)
    stream = ReadOnly(DATA)
    bid = repo.put("fs1", "/srv", stream, verify=False)
    assert set(stream.sizes) == {CHUNK}
    assert repo.archive_path(bid).read_bytes() == DATA
    assert repo.get(bid).manifest.verification.status == "not-verified"  # type: ignore[union-attr]


def test_writer_takes_frames_one_by_one(tmp_path: Path) -> None:
    repo = Repository(tmp_path)
    with repo.writer("fs1", "/srv", timestamp=TS) as w:
        for i in range(0, len(DATA), 70000):
            w.write(DATA[i:i + 70000])
        backup = w.commit({"sha256": hashlib.sha256(DATA).hexdigest()}, verify=False)
    assert backup.archive.read_bytes() == DATA
    assert str(backup.id).endswith(TS)


@pytest.mark.parametrize("exc", [OSError("connection reset"), Boom("bug"),
                                 KeyboardInterrupt(), Interrupted(15)])
def test_a_failing_stream_leaves_nothing(tmp_path: Path, exc: BaseException) -> None:
    repo = Repository(tmp_path, listing_runner())
    with pytest.raises(type(exc)):
        repo.put("fs1", "/srv/data", FailingStream(DATA[:CHUNK + 5], exc))
    assert all_files(tmp_path) == []
    assert repo.list() == []


def test_a_partial_is_never_listed(tmp_path: Path) -> None:
    repo = Repository(tmp_path)
    done = repo.put("fs1", "/srv", io.BytesIO(b"done"), {"frozen_at": "2026-11-25T10:00:00Z"},
                    verify=False)
    w = repo.writer("fs1", "/srv", timestamp=TS)
    w.write(b"half of it")
    assert w.partial.exists()
    assert [b.id for b in repo.list()] == [done]
    with pytest.raises(UsageError):
        repo.get(BackupId(done.host, done.slug, TS))
    # a second upload of the same backup cannot start meanwhile
    with pytest.raises(ResourceError):
        repo.writer("fs1", "/srv", timestamp=TS)
    assert [p.name for p, _ in repo.leftovers()] == [f"{TS}.tar.zst.partial"]
    w.abort()
    assert not w.partial.exists() and repo.leftovers() == []


def test_an_archive_without_manifest_or_with_a_bad_one_is_not_listed(tmp_path: Path) -> None:
    repo = Repository(tmp_path)
    bid = repo.put("fs1", "/srv", io.BytesIO(b"x"), verify=False)
    d = repo.archive_path(bid).parent
    (d / "20261101T000000Z.tar.zst").write_bytes(b"orphan")
    (d / "20261102T000000Z.tar.zst").write_bytes(b"y")
    (d / "20261102T000000Z.json").write_text("{not json")
    (d / "20261103T000000Z.tar.zst").write_bytes(b"z")
    # a manifest copied from elsewhere does not describe this place
    (d / "20261103T000000Z.json").write_bytes(repo.manifest_path(bid).read_bytes())
    (d / "20261104T000000Z.json").write_bytes(repo.manifest_path(bid).read_bytes())
    (d / "junk.json").write_text("{}")
    (d / "..json").write_text("{}")
    assert [b.id for b in repo.list()] == [bid]
    assert [(p.name, why.split()[0]) for p, why in repo.leftovers()] == [
        ("20261101T000000Z.tar.zst", "archive"), ("20261102T000000Z.json", "broken:"),
        ("20261103T000000Z.json", "broken:"), ("20261104T000000Z.json", "manifest")]
    # the two with both files but a bad manifest are listed as broken, with the reason
    assert [(b.id.timestamp, b.reason.split(":")[0]) for b in repo.broken()] == [
        ("20261102T000000Z", "unreadable manifest"),
        ("20261103T000000Z", f"the manifest names {bid}, not this backup")]


def test_sender_checksum_or_size_mismatch_stores_nothing(tmp_path: Path) -> None:
    repo = Repository(tmp_path)
    with pytest.raises(IntegrityError, match="sha256"):
        repo.put("fs1", "/srv", io.BytesIO(DATA), {"sha256": "0" * 64}, verify=False)
    with pytest.raises(IntegrityError, match="bytes"):
        repo.put("fs1", "/srv", io.BytesIO(DATA), {"archive_bytes": 5}, verify=False)
    assert all_files(tmp_path) == []


def test_unreadable_upload_is_refused_and_removed(tmp_path: Path) -> None:
    runner = FakeRunner().on("tar", "--list", returncode=2,
                             stderr="/*stdin*\\ : Decoding error (36) : Restored data doesn't "
                                    "match checksum")
    repo = Repository(tmp_path, runner)
    with pytest.raises(IntegrityError, match="checksum"):
        repo.put("fs1", "/srv", io.BytesIO(DATA))
    assert all_files(tmp_path) == []


class NonBlocking:
    """A stream with read() only that answers None, as a non-blocking pipe with nothing ready."""

    def read(self, n: int) -> bytes | None:
        return None


@pytest.mark.hostile("store", "a non-blocking input stream whose read() answers None",
                     "UsageError naming it; no backup stored empty, no partial file left")
def test_a_non_blocking_stream_is_refused_not_stored_empty(tmp_path: Path) -> None:
    repo = Repository(tmp_path)
    with pytest.raises(UsageError, match="non-blocking"):
        repo.put("fs1", "/srv", NonBlocking(), verify=False)
    assert all_files(tmp_path) == []


def test_missing_tool_is_not_an_integrity_error(tmp_path: Path) -> None:
    repo = Repository(tmp_path, FakeRunner().on("tar", not_found=True))
    with pytest.raises(CommandNotFoundError):
        repo.put("fs1", "/srv", io.BytesIO(DATA))
    assert all_files(tmp_path) == []


def test_bad_sender_fields_are_refused_before_reading(tmp_path: Path) -> None:
    repo = Repository(tmp_path)
    stream = ReadOnly(DATA)
    with pytest.raises(UsageError):
        repo.put("fs1", "/srv", stream, {"path": "/etc"}, verify=False)
    assert stream.sizes == [] and all_files(tmp_path) == []


def test_same_timestamp_never_replaces_a_backup(tmp_path: Path) -> None:
    repo = Repository(tmp_path)
    bid = repo.put("fs1", "/srv", io.BytesIO(b"first"), {"frozen_at": FROZEN}, verify=False)
    with pytest.raises(ResourceError):
        repo.put("fs1", "/srv", io.BytesIO(b"second"), {"frozen_at": FROZEN}, verify=False)
    assert repo.archive_path(bid).read_bytes() == b"first"
    assert len(all_files(tmp_path)) == 2


def test_failing_manifest_write_takes_the_archive_back(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    repo = Repository(tmp_path)

    def full(path: Path, data: bytes, mode: int) -> None:
        raise ResourceError("disk full")

    monkeypatch.setattr(repo_mod, "_write_file", full)
    with pytest.raises(ResourceError):
        repo.put("fs1", "/srv", io.BytesIO(DATA), verify=False)
    assert all_files(tmp_path) == []


STATE = b"GNU tar-1.34-2\n1796161436\x00289291417\x000\x001796161436\x00"


@pytest.mark.parametrize("taken", ["archive", "manifest"])
def test_a_failed_commit_takes_back_the_state_file_and_the_archive(
        tmp_path: Path, taken: str) -> None:
    """A listed incremental backup publishes its state file, then its archive, then the
    manifest: whichever cannot be published, none of ours stays without a manifest (and
    the file in the way is not touched)."""
    repo = Repository(tmp_path)
    w = repo.writer("fs1", "/srv", timestamp=TS)
    w.write(DATA)
    w.write_snapshot([STATE])
    in_the_way = w.archive if taken == "archive" else w.manifest_path
    in_the_way.write_bytes(b"not ours")
    with pytest.raises(ResourceError, match="already exists"):
        w.commit({"tar_level": 0}, verify=False)
    assert all_files(tmp_path) == [str(in_the_way.relative_to(tmp_path))]
    assert in_the_way.read_bytes() == b"not ours"


@pytest.mark.hostile("store", "a stored state file one byte longer than its manifest says",
                     "IntegrityError naming its real size; the manifest's size is not "
                     "what is read")
def test_a_state_file_of_another_size_is_named_by_its_real_size(tmp_path: Path) -> None:
    repo = Repository(tmp_path)
    with repo.writer("fs1", "/srv", timestamp=TS) as w:
        w.write(DATA)
        w.write_snapshot([STATE])
        backup = w.commit({"tar_level": 0}, verify=False)
    assert repo.load_snapshot(backup) == STATE
    path = repo.snapshot_path(backup.id)
    os.chmod(path, 0o600)
    with open(path, "ab") as f:
        f.write(b"\0")
    with pytest.raises(IntegrityError, match=f"state file: {len(STATE) + 1} bytes, the "
                                             f"manifest says {len(STATE)}$"):
        repo.load_snapshot(backup)


def test_no_space_is_a_resource_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = Repository(tmp_path)

    def enospc(fd: int, data: memoryview) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("sanoffload.store.repo.os.write", enospc)
    with pytest.raises(ResourceError, match="no space"):
        repo.put("fs1", "/srv", io.BytesIO(DATA), verify=False)
    monkeypatch.undo()
    assert all_files(tmp_path) == []


def test_symlinked_host_directory_is_not_followed(tmp_path: Path) -> None:
    (tmp_path / "repo").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "repo" / "fs1").symlink_to(tmp_path / "elsewhere")
    repo = Repository(tmp_path / "repo")
    with pytest.raises(RefusedError, match="symlink"):
        repo.put("fs1", "/srv", io.BytesIO(b"x"), verify=False)
    assert list((tmp_path / "elsewhere").iterdir()) == []
    assert repo.list() == []


def test_repository_must_exist(tmp_path: Path) -> None:
    with pytest.raises(UsageError):
        Repository(tmp_path / "missing")


# --------------------------------------------------------------------------
# verify
# --------------------------------------------------------------------------

@pytest.fixture
def stored(tmp_path: Path) -> Iterator[tuple[Repository, BackupId, FakeRunner]]:
    runner = listing_runner(members=3)
    repo = Repository(tmp_path, runner)
    bid = repo.put("fs1", "/srv/data", io.BytesIO(DATA), {"frozen_at": FROZEN})
    runner.calls.clear()
    yield repo, bid, runner


def test_verify_rehashes_and_test_reads(stored: tuple[Repository, BackupId, FakeRunner]) -> None:
    repo, bid, runner = stored
    backup = repo.verify(bid)
    assert backup.manifest.verification is not None and backup.manifest.verification.ok
    # one read of the file: hashed while tar lists it from stdin
    assert [c[:2] for c in runner.argvs()] == [["tar", "--list"]]
    assert runner.argvs()[0][-1] == "--file=-"


@pytest.mark.parametrize("damage", ["flip", "truncate", "append"])
def test_verify_names_a_damaged_archive_by_its_hash_or_size(
        stored: tuple[Repository, BackupId, FakeRunner], damage: str) -> None:
    repo, bid, runner = stored
    path = repo.archive_path(bid)
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x01
    elif damage == "truncate":
        data = data[:-1]
    else:
        data += b"\0"
    os.chmod(path, 0o640)
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="sha256|bytes"):
        repo.verify(bid)
    if damage != "flip":  # a wrong size is known before anything is read
        assert runner.calls == []
    v = repo.get(bid).manifest.verification
    assert v is not None and v.status == "failed" and str(bid) in v.detail
    # the failure is recorded atomically: no temporary manifest left
    assert all(not p.name.endswith(".partial") for p in path.parent.iterdir())


def test_verify_catches_a_member_count_change(
        stored: tuple[Repository, BackupId, FakeRunner]) -> None:
    repo, bid, runner = stored
    runner.rules.clear()
    runner.on("tar", "--list", stdout=b'"./a"\n')
    with pytest.raises(IntegrityError, match="1 archive members"):
        repo.verify(bid)


def test_verify_reports_unreadable_archives(
        stored: tuple[Repository, BackupId, FakeRunner]) -> None:
    repo, bid, runner = stored
    runner.on("tar", "--list", returncode=2, stderr="tar: Unexpected EOF in archive")
    with pytest.raises(IntegrityError, match="Unexpected EOF"):
        repo.verify(bid)


def test_delete_removes_the_manifest_first(stored: tuple[Repository, BackupId, FakeRunner],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    repo, bid, _ = stored
    order: list[str] = []
    real_delete = repo.backend.delete

    def delete(key: str, *, version: str | None = None) -> None:
        if repo.backend.stat(key) is not None:
            order.append(key.rsplit("/", 1)[-1])
        real_delete(key, version=version)

    monkeypatch.setattr(repo.backend, "delete", delete)
    repo.delete(bid)
    assert order == [f"{TS}.json", f"{TS}.tar.zst"]
    assert repo.list() == []


def test_publishing_without_hard_links_still_never_replaces(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_links(*args: object, **kwargs: object) -> None:
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr("sanoffload.store.repo.os.link", no_links)
    repo = Repository(tmp_path)
    bid = repo.put("fs1", "/srv", io.BytesIO(b"first"), {"frozen_at": FROZEN}, verify=False)
    assert repo.archive_path(bid).read_bytes() == b"first"
    with pytest.raises(ResourceError):
        repo.put("fs1", "/srv", io.BytesIO(b"second"), {"frozen_at": FROZEN}, verify=False)
    assert repo.archive_path(bid).read_bytes() == b"first"
    assert len(all_files(tmp_path)) == 2


def test_the_member_listing_is_read_from_tar_stdout_not_a_file(
        stored: tuple[Repository, BackupId, FakeRunner]) -> None:
    repo, bid, runner = stored
    repo.verify(bid)
    assert not any(a.startswith("--index-file") for a in runner.argvs()[0])
    assert sorted(p.name for p in repo.root.iterdir()) == ["fs1"]  # nothing written there
    assert [b.id for b in repo.list()] == [bid]


def test_verify_of_a_read_only_manifest_directory_still_answers(
        stored: tuple[Repository, BackupId, FakeRunner], monkeypatch: pytest.MonkeyPatch) -> None:
    repo, bid, _ = stored

    def read_only(*args: object, **kwargs: object) -> None:
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(repo_mod, "_write_file", read_only)
    backup = repo.verify(bid)
    assert backup.manifest.verification is not None and backup.manifest.verification.ok
