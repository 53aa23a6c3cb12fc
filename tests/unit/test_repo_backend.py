"""The repository on the Backend seam: one repository over any backend (issue 14).

The same tar and image backups, listings, verification, chains, restores and
deletions as on a directory, run on :class:`~sanoffload.testing.MemoryBackend`
and on :class:`~sanoffload.store.backend_crypt.EncryptedBackend` over it. tar and
zstd are this machine's (as the unit conftest's archives are): a restore that
never ran tar would prove nothing.
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from sanoffload.errors import IntegrityError, ResourceError, UsageError
from sanoffload.runner import CommandRunner
from sanoffload.store.backend import Backend
from sanoffload.store.backend_crypt import EncryptedBackend
from sanoffload.store.image import check_image, load_map, restore_image, verify_image
from sanoffload.store.keys import RepoKeys
from sanoffload.store.prune import gc
from sanoffload.store.repo import BackupId, Repository
from sanoffload.store.restore import restore, stream_out
from sanoffload.testing import MemoryBackend
from sanoffload.tools import tar

from .conftest import make_archive

FROZEN = "2026-11-26T10:29:33Z"
KINDS: dict[str, Callable[[], Backend]] = {
    "memory": MemoryBackend,
    "encrypted": lambda: EncryptedBackend(MemoryBackend(), RepoKeys.generate()),
}


@pytest.fixture(params=sorted(KINDS))
def backend(request: pytest.FixtureRequest) -> Backend:
    return KINDS[request.param]()


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def source(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "a.txt").write_bytes(b"alpha\n")
    (src / "d" / "b.bin").write_bytes(os.urandom(3000))
    return src


def keys_of(backend: Backend) -> list[str]:
    return [info.key for info in backend.list("")]


def test_a_tar_backup_round_trips_on_any_backend(tmp_path: Path, backend: Backend) -> None:
    src = source(tmp_path)
    repo = Repository.on(backend, CommandRunner())
    with pytest.raises(UsageError, match="not a directory repository"):
        _ = repo.root
    bid = repo.put("fs1", "/srv/data", io.BytesIO(make_archive(src)), {"frozen_at": FROZEN})
    assert [b.id for b in repo.list()] == [bid] and repo.broken() == []
    slug = bid.slug
    if isinstance(backend, EncryptedBackend):
        # keyed names: no host or path in the store's keys (tests/unit/test_repo_keyed.py)
        assert [k.split("/")[0] for k in keys_of(backend)] == ["backups", "backups"]
    else:
        assert keys_of(backend) == [f"fs1/{slug}/20261126T102933Z.json",
                                    f"fs1/{slug}/20261126T102933Z.tar.zst"]
    backup = repo.verify(bid)
    assert backup.manifest.verification is not None and backup.manifest.verification.ok
    assert backup.manifest.member_count == 4  # ./ ./a.txt ./d/ ./d/b.bin
    assert repo.chain(bid) == [repo.get(bid)]
    done = restore(repo, bid, tmp_path / "out")
    assert done.members == 4 and tree(tmp_path / "out") == tree(src)
    out = io.BytesIO()
    stream_out(repo, bid, out)
    assert hashlib.sha256(out.getvalue()).hexdigest() == backup.manifest.sha256
    with pytest.raises(ResourceError, match="already exists"):
        repo.put("fs1", "/srv/data", io.BytesIO(make_archive(src)), {"frozen_at": FROZEN})
    repo.delete(bid)
    assert repo.list() == [] and keys_of(backend) == []


def stored_in_memory(tmp_path: Path) -> tuple[MemoryBackend, Repository, BackupId, str]:
    """A tar backup on a MemoryBackend: the backend, the repository, the id, the archive's key."""
    backend = MemoryBackend()
    repo = Repository.on(backend, CommandRunner())
    bid = repo.put("fs1", "/srv", io.BytesIO(make_archive(source(tmp_path))),
                   {"frozen_at": FROZEN})
    return backend, repo, bid, repo.get(bid).archive_key


@pytest.mark.hostile("store", "an archive object changed in an object store (MemoryBackend)",
                     "verify and restore fail: sha256 mismatch; nothing extracted")
def test_a_changed_archive_object_fails_verify_and_restore(tmp_path: Path) -> None:
    backend, repo, bid, key = stored_in_memory(tmp_path)
    (info, data), = backend.objects[key]
    bad = bytearray(data)
    bad[40] ^= 1
    backend.objects[key] = [(info, bytes(bad))]
    with pytest.raises(IntegrityError, match="sha256 mismatch"):
        repo.verify(bid)
    with pytest.raises(IntegrityError, match="sha256"):
        restore(repo, bid, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.hostile("store", "a listed backup's archive object cut short in an object store",
                     "IntegrityError naming its size against the manifest's")
def test_a_cut_archive_object_is_named(tmp_path: Path) -> None:
    backend, repo, bid, key = stored_in_memory(tmp_path)
    data = backend.get(key, max_bytes=1 << 20)
    backend.delete(key)
    backend.put(key, data[:-10])
    with pytest.raises(IntegrityError, match="the manifest says"):
        repo.check_sha256(repo.get(bid))


def test_a_backup_without_its_manifest_is_not_listed(tmp_path: Path, backend: Backend) -> None:
    repo = Repository.on(backend, CommandRunner())
    w = repo.writer("fs1", "/srv", timestamp="20261126T102933Z")
    w.write(make_archive(source(tmp_path)))
    assert repo.list() == [] and keys_of(backend) == []  # nothing visible before the commit
    w.abort()
    assert keys_of(backend) == []


def _level(src: Path, state: Path, level: int) -> bytes:
    """A real level of an incremental tar backup of ``src`` (its state file in ``state``)."""
    argv = tar.with_incremental(tar.create_argv(src), state)
    t = subprocess.run(argv, capture_output=True, check=True).stdout
    return subprocess.run(["zstd", "-q", "-c"], input=t, capture_output=True, check=True).stdout


def two_levels(repo: Repository, src: Path, state: Path) -> list[BackupId]:
    """A level 0 of ``src`` and a level 1 after a change (a file removed, one added), stored
    in ``repo`` with their state files (``state`` holds the last one): their ids."""
    ids: list[BackupId] = []
    for level, stamp in enumerate(("2026-11-26T10:00:00Z", "2026-11-26T11:00:00Z")):
        if level:
            (src / "a.txt").unlink()
            (src / "new.txt").write_bytes(b"new\n")
        data = _level(src, state, level)
        fields: dict[str, object] = {"frozen_at": stamp, "tar_level": level}
        if level:
            fields |= {"parent": str(ids[-1]), "chain": str(ids[0])}
        with repo.writer("fs1", "/srv", timestamp=stamp.replace("-", "").replace(":", "")
                         ) as w:
            w.write(data)
            w.write_snapshot([state.read_bytes()])
            ids.append(w.commit(fields).id)
    return ids


def test_an_incremental_chain_restores_from_any_backend(tmp_path: Path,
                                                        backend: Backend) -> None:
    src = source(tmp_path)
    state = tmp_path / "state.snar"
    repo = Repository.on(backend, CommandRunner())
    ids = two_levels(repo, src, state)
    assert [b.id for b in repo.chain(ids[1])] == ids
    assert repo.load_snapshot(repo.get(ids[1])) == state.read_bytes()
    repo.verify(ids[1])
    done = restore(repo, ids[1], tmp_path / "out")
    assert done.chain == tuple(ids) and tree(tmp_path / "out") == tree(src)


# -- image backups ------------------------------------------------------------------------------
def test_an_image_backup_round_trips_on_any_backend(tmp_path: Path, backend: Backend) -> None:
    from .test_store_image import LATER, T_FAR, local, put_image, volume

    repo = Repository.on(backend)
    data = volume(b"one")
    first = put_image(local(repo), data)
    bid = BackupId.parse(first["id"])
    chunk_keys = [k for k in keys_of(backend) if k.startswith("chunks/")]
    assert len(chunk_keys) == 4  # five pieces, one of them all zero (never stored)
    backup = repo.get(bid)
    assert backup.is_image and [b.id for b in repo.list()] == [bid]
    verification = repo.verify(bid).manifest.verification
    assert verify_image(repo, backup).ok and verification is not None and verification.ok
    done = restore_image(repo, bid, tmp_path / "img")
    assert (tmp_path / "img").read_bytes() == data and done.size == len(data)
    # a second backup re-uses what is there: only the changed chunk is stored
    changed = bytearray(data)
    changed[0] ^= 1
    second = put_image(local(repo, LATER), bytes(changed), load_map(repo, backup))
    assert second["image"]["new_chunks"] == 1
    assert len([k for k in keys_of(backend) if k.startswith("chunks/")]) == len(chunk_keys) + 1
    with pytest.raises(ResourceError, match="already exists"):
        local(repo)
    repo.delete(bid)
    report = gc(repo, grace_s=0, now=T_FAR)
    assert len(report.removed) == 1 and report.kept_referenced == len(chunk_keys)
    restore_image(repo, BackupId.parse(second["id"]), tmp_path / "img2")
    assert (tmp_path / "img2").read_bytes() == bytes(changed)


@pytest.mark.hostile("store", "a chunk object changed, and one removed, in an object store",
                     "verify names both (bad, missing); the image restore fails, no file left")
def test_a_damaged_or_missing_chunk_object_is_named(tmp_path: Path) -> None:
    from .test_store_image import local, put_image, volume

    backend = MemoryBackend()
    repo = Repository.on(backend)
    bid = BackupId.parse(put_image(local(repo), volume(b"two"))["id"])
    first, second = [k for k in keys_of(backend) if k.startswith("chunks/")][:2]
    (info, blob), = backend.objects[first]
    backend.objects[first] = [(info, blob[:-1] + bytes([blob[-1] ^ 1]))]
    backend.delete(second)
    check = check_image(repo, repo.get(bid))
    assert check.missing == [second.rsplit("/", 1)[1]]
    assert [cid for cid, _ in check.bad] == [first.rsplit("/", 1)[1]]
    with pytest.raises(IntegrityError):
        restore_image(repo, bid, tmp_path / "img")
    assert not (tmp_path / "img").exists()
