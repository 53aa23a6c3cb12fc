"""Issue 13, file level, on the wire: the store's ``state`` op and the ``snapshot`` frames
of a ``put``, between the proxy's StoreClient (and LocalStoreClient) and a real
StoreService over the in-process channel.

State files are real: GNU tar on this machine writes them (``--listed-incremental``).
The repository's test-read is faked (``listing_runner``): these tests are about the
state file, not the archive.
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from sanoffload.channel.client import in_process_connector
from sanoffload.channel.server import serve
from sanoffload.errors import (
    IntegrityError,
    ProtocolError,
    ResourceError,
    SanoffloadError,
    UsageError,
)
from sanoffload.proxy.peers import LocalStoreClient, StoreClient
from sanoffload.store.repo import Backup, BackupId, Quota, Repository
from sanoffload.store.service import StoreService
from sanoffload.tools import tar
from tests.unit.conftest import listing_runner
from tests.unit.test_store_service import FROZEN, Served, no_partials

pytestmark = pytest.mark.unit

LATER = "2026-11-26T11:29:33.120Z"
LATEST = "2026-11-26T12:29:33.120Z"


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    (tmp_path / "repo").mkdir()
    return Repository(tmp_path / "repo", listing_runner())


@pytest.fixture
def snar(tree: Path, tmp_path: Path) -> Path:
    """A state file GNU tar wrote for ``tree`` (a level 0's)."""
    state = tmp_path / "level0.snar"
    subprocess.run(["tar", "--create", "--file=/dev/null", f"--listed-incremental={state}",
                    "--no-check-device", f"--directory={tree}", "."], check=True)
    assert state.read_bytes().startswith(b"GNU tar-")
    return state


def _fields(frozen_at: str, **level: Any) -> dict[str, Any]:
    return {"frozen_at": frozen_at, "duplicate_kind": "snapshot", **level}


def put_level(client: StoreClient, archive: bytes, state: Path, frozen_at: str = FROZEN,
              **level: Any) -> dict[str, Any]:
    """One incremental level: archive, state file, commit (``level``: tar_level, parent,
    chain)."""
    w = client.writer("fs1", "/srv/data", _fields(frozen_at, **level))
    w.write_from(io.BytesIO(archive))
    sha256, size = w.send_snapshot(str(state))
    assert (sha256, size) == (hashlib.sha256(state.read_bytes()).hexdigest(),
                              state.stat().st_size)
    return w.commit({"file_count": 3})


def chain_of_two(client: StoreClient, archive: bytes, snar: Path) -> tuple[str, str]:
    zero = put_level(client, archive, snar, tar_level=0)
    one = put_level(client, archive, snar, LATER, tar_level=1, parent=zero["id"],
                    chain=zero["id"])
    return zero["id"], one["id"]


# -- state: found, not found, broken ----------------------------------------------
def test_state_of_a_path_without_incremental_backups(repo: Repository) -> None:
    with Served(repo).client() as client:
        out = io.BytesIO()
        got = client.state("fs1", "/srv/data", out)
    assert got.backup is None and got.reason == "no incremental backup"
    assert out.getvalue() == b""


def test_state_answers_the_newest_level_and_its_state_file(
        repo: Repository, archive: bytes, snar: Path) -> None:
    with Served(repo).client() as client:
        zero, one = chain_of_two(client, archive, snar)
        out = io.BytesIO()
        got = client.state("fs1", "/srv/data", out)
        # the connection is still in step after the frames
        assert [b["id"] for b in client.list("fs1")] == [zero, one]
    assert got.backup is not None
    assert got.backup["id"] == one and got.backup["tar_level"] == 1
    assert got.backup["parent"] == zero and got.backup["chain"] == zero
    assert out.getvalue() == snar.read_bytes()
    stored = repo.get(one)
    assert repo.snapshot_path(stored.id).read_bytes() == snar.read_bytes()
    assert stored.manifest.snapshot_sha256 == hashlib.sha256(snar.read_bytes()).hexdigest()
    assert no_partials(repo)


def test_a_full_backup_is_not_a_previous_level(repo: Repository, archive: bytes) -> None:
    with Served(repo).client() as client:
        w = client.writer("fs1", "/srv/data", _fields(FROZEN))
        w.write_from(io.BytesIO(archive))
        w.commit({})
        got = client.state("fs1", "/srv/data", io.BytesIO())
    assert got.backup is None


@pytest.mark.hostile("store", "state asked when the newest level's parent is gone",
                     "found: false, the broken link named; never a base")
def test_state_of_a_broken_chain_is_not_found(repo: Repository, archive: bytes,
                                              snar: Path) -> None:
    with Served(repo).client() as client:
        zero, _one = chain_of_two(client, archive, snar)
        repo.delete(BackupId.parse(zero))
        out = io.BytesIO()
        got = client.state("fs1", "/srv/data", out)
    assert got.backup is None
    assert "broken" in got.reason and zero in got.reason
    assert out.getvalue() == b""


@pytest.mark.hostile("store", "a stored state file damaged on disk (same size)",
                     "found: false (sha256 differs), never sent as a base")
def test_state_with_a_damaged_state_file_is_not_found(repo: Repository, archive: bytes,
                                                      snar: Path) -> None:
    with Served(repo).client() as client:
        zero = put_level(client, archive, snar, tar_level=0)["id"]
        path = repo.snapshot_path(repo.get(zero).id)
        data = bytearray(path.read_bytes())
        data[-2] ^= 1
        path.write_bytes(bytes(data))
        got = client.state("fs1", "/srv/data", io.BytesIO())
    assert got.backup is None and "sha256" in got.reason


def _tampering(repo: Repository, change: Any) -> None:
    """The store's load_snapshot hands out ``change(the real bytes)``: what a store that
    lies (or a channel that damages) sends."""
    real = repo.load_snapshot

    def load(backup: Backup) -> bytes:
        changed: bytes = change(real(backup))
        return changed

    repo.load_snapshot = load  # type: ignore[method-assign]


@pytest.mark.hostile("store", "a state answer whose bytes differ from the manifest's sha256",
                     "StoreClient.state refuses (IntegrityError)")
def test_client_refuses_a_state_file_that_is_not_the_manifests(
        repo: Repository, archive: bytes, snar: Path) -> None:
    with Served(repo).client() as client:
        put_level(client, archive, snar, tar_level=0)
        _tampering(repo, lambda data: data[:-1] + bytes([data[-1] ^ 1]))
        with pytest.raises(IntegrityError, match="not what the manifest says"):
            client.state("fs1", "/srv/data", io.BytesIO())


class LyingStore(StoreService):
    """A store whose ``state`` answer is made up by the test: ``answer`` then ``frames``."""

    def __init__(self, repo: Repository, answer: dict[str, Any], frames: list[bytes]) -> None:
        super().__init__(repo, "px1")
        self.answer = answer
        self.frames = frames

    def _state(self, host: str, path: str, channel: Any) -> None:
        channel.send(self.answer)
        for frame in self.frames:
            channel.send_chunk(frame)
        channel.end_chunks()


def lying_client(repo: Repository, answer: dict[str, Any], frames: list[bytes]) -> StoreClient:
    service = LyingStore(repo, answer, frames)
    return StoreClient(in_process_connector(lambda ch: serve(service, ch), peer="bk1"),
                       name="bk1")


def _manifest_of(snar: Path, **over: Any) -> dict[str, Any]:
    data = snar.read_bytes()
    return {"id": "fs1/srv-data-1/20261126T102933Z", "tar_level": 0,
            "snapshot_sha256": hashlib.sha256(data).hexdigest(),
            "snapshot_bytes": len(data), **over}


@pytest.mark.hostile("store", "a state answer with more bytes than it announced",
                     "StoreClient.state refuses (ProtocolError), stops reading")
def test_client_refuses_a_state_file_longer_than_announced(repo: Repository,
                                                           snar: Path) -> None:
    data = snar.read_bytes()
    answer = {"ok": True, "found": True, "backup": _manifest_of(snar),
              "snapshot_bytes": len(data)}
    out = io.BytesIO()
    with lying_client(repo, answer, [data, b"x" * 10]) as client:
        with pytest.raises(ProtocolError, match="longer than"):
            client.state("fs1", "/srv/data", out)
    assert len(out.getvalue()) <= len(data)


@pytest.mark.hostile("store", "a state answer announcing more than MAX_SNAPSHOT_BYTES",
                     "StoreClient.state refuses past the limit (ProtocolError)")
def test_client_refuses_a_state_file_over_the_limit(repo: Repository, snar: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tar, "MAX_SNAPSHOT_BYTES", 64)
    data = snar.read_bytes() + b"\0" * 200
    answer = {"ok": True, "found": True, "snapshot_bytes": len(data),
              "backup": _manifest_of(snar, snapshot_bytes=len(data),
                                     snapshot_sha256=hashlib.sha256(data).hexdigest())}
    with lying_client(repo, answer, [data]) as client:
        with pytest.raises(ProtocolError, match="longer than"):
            client.state("fs1", "/srv/data", io.BytesIO())


@pytest.mark.hostile("store", "a state answer: size differs from the manifest's, or no "
                     "backup", "refused (IntegrityError / ProtocolError)")
@pytest.mark.parametrize("case", ["short", "no backup", "size not a number"])
def test_client_refuses_odd_state_answers(repo: Repository, snar: Path, case: str) -> None:
    data = snar.read_bytes()
    answer: dict[str, Any] = {"ok": True, "found": True, "backup": _manifest_of(snar),
                              "snapshot_bytes": len(data)}
    frames = [data]
    expected: type[SanoffloadError] = ProtocolError
    if case == "short":
        answer["snapshot_bytes"] = len(data) - 1
        frames = [data[:-1]]
        expected = IntegrityError
    elif case == "no backup":
        del answer["backup"]
    else:
        answer["snapshot_bytes"] = True
    with lying_client(repo, answer, frames) as client:
        with pytest.raises(expected):
            client.state("fs1", "/srv/data", io.BytesIO())


# -- put: the snapshot frames ---------------------------------------------------------
def _raw_put(client: StoreClient, archive: bytes, frames: list[bytes],
             commit: dict[str, Any] | None = None, **level: Any) -> dict[str, Any]:
    """A put whose state file frames are sent by hand (past the client's own checks)."""
    w = client.writer("fs1", "/srv/data", _fields(FROZEN, tar_level=0, **level))
    w.write_from(io.BytesIO(archive))
    channel = client.channel
    channel.end_chunks()
    channel.send({"op": "snapshot"})
    for frame in frames:
        channel.send_chunk(frame)
    return w.commit(commit or {})


@pytest.mark.hostile("store", "a put's state file over MAX_SNAPSHOT_BYTES",
                     "refused, nothing stored, no partial left")
def test_store_refuses_a_state_file_over_the_limit(repo: Repository, archive: bytes,
                                                   snar: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tar, "MAX_SNAPSHOT_BYTES", 4096)
    data = snar.read_bytes()
    served = Served(repo)
    with served.client() as client:
        with pytest.raises(IntegrityError, match="larger than 4096"):
            _raw_put(client, archive, [data, b"\0" * 4096])
    served.gone.wait(10)
    assert repo.list() == [] and no_partials(repo)


@pytest.mark.hostile("store", "a put's state file with a bad header (format 1, garbage)",
                     "refused, nothing stored, no partial left")
@pytest.mark.parametrize("head", [b"GNU tar-1.34-1\n1\x000\x00", b"not a state file\n"])
def test_store_refuses_a_state_file_with_a_bad_header(repo: Repository, archive: bytes,
                                                      head: bytes) -> None:
    served = Served(repo)
    with served.client() as client:
        with pytest.raises(IntegrityError, match="state file"):
            _raw_put(client, archive, [head])
    served.gone.wait(10)
    assert repo.list() == [] and no_partials(repo)


@pytest.mark.hostile("store", "a commit whose snapshot_sha256 (or _bytes) differs from the "
                     "state file received", "refused (IntegrityError), nothing stored")
@pytest.mark.parametrize("key", ["snapshot_sha256", "snapshot_bytes"])
def test_store_refuses_a_commit_that_misnames_the_state_file(
        repo: Repository, archive: bytes, snar: Path, key: str) -> None:
    data = snar.read_bytes()
    said = {"snapshot_sha256": hashlib.sha256(data).hexdigest(), "snapshot_bytes": len(data)}
    said[key] = {"snapshot_sha256": "b" * 64, "snapshot_bytes": len(data) + 1}[key]
    with Served(repo).client() as client:
        with pytest.raises(IntegrityError, match=key):
            _raw_put(client, archive, [data], commit=said)
    assert repo.list() == [] and no_partials(repo)


@pytest.mark.hostile("store", "a level without a state file, a state file without a level, "
                     "two state files", "refused, nothing stored")
@pytest.mark.parametrize("case", ["no state file", "no level", "two"])
def test_store_refuses_a_put_whose_state_file_does_not_fit(
        repo: Repository, archive: bytes, snar: Path, case: str) -> None:
    served = Served(repo)
    with served.client() as client:
        with pytest.raises((UsageError, ProtocolError)):
            if case == "no state file":
                w = client.writer("fs1", "/srv/data", _fields(FROZEN, tar_level=0))
                w.write_from(io.BytesIO(archive))
                w.commit({})
            elif case == "no level":
                w = client.writer("fs1", "/srv/data", _fields(FROZEN))
                w.write_from(io.BytesIO(archive))
                w.send_snapshot(str(snar))
                w.commit({})
            else:
                w = client.writer("fs1", "/srv/data", _fields(FROZEN, tar_level=0))
                w.write_from(io.BytesIO(archive))
                w.send_snapshot(str(snar))
                w.send_snapshot(str(snar))
                w.commit({})
    served.gone.wait(10)
    assert repo.list() == [] and no_partials(repo)


# -- the same through LocalStoreClient (no channel for the put's bytes) -----------------
def local_client(repo: Repository) -> LocalStoreClient:
    service = StoreService(repo, "local")
    return LocalStoreClient(in_process_connector(lambda ch: serve(service, ch), peer="repo"),
                            service, name="repo")


def test_local_store_keeps_and_answers_the_state_file(repo: Repository, archive: bytes,
                                                      snar: Path) -> None:
    with local_client(repo) as client:
        assert client.state("fs1", "/srv/data", io.BytesIO()).backup is None
        zero, one = chain_of_two(client, archive, snar)
        out = io.BytesIO()
        got = client.state("fs1", "/srv/data", out)
    assert got.backup is not None and got.backup["id"] == one
    assert got.backup["chain"] == zero
    assert out.getvalue() == snar.read_bytes()
    assert no_partials(repo)


@pytest.mark.hostile("store", "a local put: a state file with a bad header, or over the "
                     "limit", "refused, nothing stored, no partial left")
@pytest.mark.parametrize("case", ["header", "size"])
def test_local_store_refuses_a_bad_state_file(repo: Repository, archive: bytes, snar: Path,
                                              tmp_path: Path, case: str,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    bad = tmp_path / "bad.snar"
    if case == "header":
        bad.write_bytes(b"GNU tar-1.34-1\n1\x000\x00")
    else:
        monkeypatch.setattr(tar, "MAX_SNAPSHOT_BYTES", 100)
        bad.write_bytes(snar.read_bytes() + b"\0" * 100)
    with local_client(repo) as client:
        w = client.writer("fs1", "/srv/data", _fields(FROZEN, tar_level=0))
        with pytest.raises(IntegrityError):
            w.write_from(io.BytesIO(archive))
            w.send_snapshot(str(bad))
            w.commit({})
        w.abort()
    assert repo.list() == [] and no_partials(repo)


@pytest.mark.hostile("store", "a local commit whose snapshot_sha256 differs",
                     "refused (IntegrityError), nothing stored")
def test_local_store_refuses_a_commit_that_misnames_the_state_file(
        repo: Repository, archive: bytes, snar: Path) -> None:
    with local_client(repo) as client:
        w = client.writer("fs1", "/srv/data", _fields(FROZEN, tar_level=0))
        w.write_from(io.BytesIO(archive))
        w.send_snapshot(str(snar))
        with pytest.raises(IntegrityError, match="snapshot_sha256"):
            w.commit({"snapshot_sha256": "c" * 64, "snapshot_bytes": snar.stat().st_size})
        w.abort()
    assert repo.list() == [] and no_partials(repo)


# -- the repository: a dead writer's state file, the quota ---------------------------
def test_a_dead_writers_state_file_partial_is_swept(repo: Repository, archive: bytes,
                                                    snar: Path) -> None:
    """A put killed after its state file began arriving leaves ``STAMP.snar.partial``
    beside its archive's partial; the retry of the same backup sweeps both (it was
    refused: the state file's O_EXCL name was taken)."""
    dead = repo.writer("fs1", "/srv/data", timestamp="20261126T102933Z")
    dead.write(archive)
    # killed while the state file arrived: what write_snapshot had written so far
    dead._snapshot_partial.write_bytes(b"GNU tar-1.34-2\n")
    leftover = sorted(p.name for p in dead.directory.iterdir())
    assert leftover == ["20261126T102933Z.snar.partial", "20261126T102933Z.tar.zst.partial"]
    os.close(dead._fd)  # type: ignore[arg-type]  # the writer dies: its lock goes
    dead._fd = None
    with repo.writer("fs1", "/srv/data", timestamp="20261126T102933Z") as retry:
        retry.write(archive)
        retry.write_snapshot([snar.read_bytes()])
        backup = retry.commit({"tar_level": 0})
    assert repo.snapshot_path(backup.id).read_bytes() == snar.read_bytes()
    assert no_partials(repo)


def test_a_dead_writers_state_file_partial_is_swept_by_the_next_backup(
        repo: Repository, archive: bytes) -> None:
    dead = repo.writer("fs1", "/srv/data", timestamp="20261126T102933Z")
    dead.write(archive)
    dead.write_snapshot([b"GNU tar-1.34-2\n1\x000\x00"])
    os.close(dead._fd)  # type: ignore[arg-type]
    dead._fd = None
    with repo.writer("fs1", "/srv/data", timestamp="20261126T112933Z") as w:
        w.write(archive)
        w.commit({})
    assert no_partials(repo)


def test_a_live_writers_state_file_partial_is_left_alone(repo: Repository,
                                                         archive: bytes) -> None:
    live = repo.writer("fs1", "/srv/data", timestamp="20261126T102933Z")
    live.write(archive)
    live.write_snapshot([b"GNU tar-1.34-2\n1\x000\x00"])
    with repo.writer("fs1", "/srv/data", timestamp="20261126T112933Z") as w:
        w.write(archive)
        w.commit({})
    assert live._snapshot_partial.exists()
    live.commit({"tar_level": 0})
    assert repo.snapshot_path(live.id).exists()


def test_a_state_file_without_a_manifest_is_a_leftover(repo: Repository, archive: bytes,
                                                       snar: Path) -> None:
    """Killed between publishing the state file and the manifest: reported."""
    with repo.writer("fs1", "/srv/data", timestamp="20261126T102933Z") as w:
        w.write(archive)
        w.write_snapshot([snar.read_bytes()])
        backup = w.commit({"tar_level": 0})
    backup.manifest_path.unlink()
    backup.archive.unlink()
    found = [(p.name, why) for p, why in repo.leftovers()]
    assert found == [("20261126T102933Z.snar", "state file without a manifest")]


def _quota_service(repo: Repository, limit: int) -> Served:
    served = Served(repo)
    served.service.quota = lambda: Quota("px1", limit)  # type: ignore[method-assign]
    return served


def test_state_file_bytes_are_charged_to_the_client(repo: Repository, archive: bytes,
                                                    snar: Path) -> None:
    with Served(repo).client() as client:
        put_level(client, archive, snar, tar_level=0)
    assert repo.charged("px1") == len(archive) + snar.stat().st_size


def test_a_state_file_past_the_quota_is_refused(repo: Repository, archive: bytes,
                                                snar: Path) -> None:
    """The archive fits the quota; the archive and its state file do not."""
    served = _quota_service(repo, len(archive) + snar.stat().st_size - 1)
    with served.client() as client:
        with pytest.raises(ResourceError, match="quota"):
            put_level(client, archive, snar, tar_level=0)
    served.gone.wait(10)
    assert repo.list() == [] and no_partials(repo)
    served = _quota_service(repo, len(archive) + snar.stat().st_size)
    with served.client() as client:
        put_level(client, archive, snar, tar_level=0)
