"""``store copy``: backups copied between repositories on any two backends, re-hashed.

A directory, a MemoryBackend and an EncryptedBackend over one (each with its own
key); tar and zstd are this machine's, as in test_repo_backend: a copy restored
with real tar is the proof.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from sanoffload.errors import IntegrityError, ResourceError
from sanoffload.runner import CommandRunner
from sanoffload.store.backend_crypt import EncryptedBackend
from sanoffload.store.copy import copy_backups
from sanoffload.store.image import restore_image
from sanoffload.store.keys import RepoKeys
from sanoffload.store.repo import BackupId, Repository
from sanoffload.store.restore import restore
from sanoffload.testing import MemoryBackend

from .conftest import make_archive
from .test_repo_backend import FROZEN, keys_of, source, tree, two_levels

Maker = Callable[[Path, str], Repository]


def _dir(tmp_path: Path, name: str) -> Repository:
    (tmp_path / name).mkdir()
    return Repository(tmp_path / name, CommandRunner())


def _memory(tmp_path: Path, name: str) -> Repository:
    return Repository.on(MemoryBackend(name=name), CommandRunner())


def _encrypted(tmp_path: Path, name: str) -> Repository:
    return Repository.on(EncryptedBackend(MemoryBackend(name=name), RepoKeys.generate()),
                         CommandRunner())


PAIRS: dict[str, tuple[Maker, Maker]] = {
    "dir->encrypted": (_dir, _encrypted),
    "encrypted->dir": (_encrypted, _dir),
    "memory->encrypted": (_memory, _encrypted),
    "encrypted->encrypted": (_encrypted, _encrypted),
}


@pytest.fixture(params=sorted(PAIRS))
def pair(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Repository, Repository]:
    make_src, make_dst = PAIRS[request.param]
    return make_src(tmp_path, "src-repo"), make_dst(tmp_path, "dst-repo")


def test_a_tar_backup_is_copied_and_restores_equal(
        tmp_path: Path, pair: tuple[Repository, Repository]) -> None:
    src, dst = pair
    data = source(tmp_path)
    bid = src.put("fs1", "/srv/data", io.BytesIO(make_archive(data)), {"frozen_at": FROZEN})
    report = copy_backups(src, dst)
    assert report.copied == [bid] and report.skipped == [] and report.broken == []
    copied = dst.get(bid)
    assert copied.manifest.to_dict() == src.get(bid).manifest.to_dict()  # fields kept
    restore(dst, bid, tmp_path / "out")
    assert tree(tmp_path / "out") == tree(data)
    dst.verify(bid)
    # a second copy finds it there: nothing written
    before = keys_of(dst.backend)
    again = copy_backups(src, dst)
    assert again.copied == [] and again.skipped == [bid] and keys_of(dst.backend) == before


def test_an_image_backup_is_copied_and_restores_equal(
        tmp_path: Path, pair: tuple[Repository, Repository]) -> None:
    from .test_store_image import local, put_image, volume

    src, dst = pair
    data = volume(b"copy")
    bid = BackupId.parse(put_image(local(src), data)["id"])
    report = copy_backups(src, dst, [str(bid)])
    assert report.copied == [bid] and report.chunks == 4  # five pieces, one all zero
    assert dst.get(bid).manifest.image == src.get(bid).manifest.image
    restore_image(dst, bid, tmp_path / "img")
    assert (tmp_path / "img").read_bytes() == data
    dst.verify(bid)
    again = copy_backups(src, dst)
    assert again.copied == [] and again.skipped == [bid] and again.chunks == 0


def test_an_incremental_chain_is_copied_parent_first(
        tmp_path: Path, pair: tuple[Repository, Repository]) -> None:
    src, dst = pair
    data = source(tmp_path)
    state = tmp_path / "state.snar"
    ids = two_levels(src, data, state)
    # naming the child copies the chain it needs, the parent first
    report = copy_backups(src, dst, [ids[1]])
    assert report.copied == ids
    assert [b.id for b in dst.chain(ids[1])] == ids
    assert dst.load_snapshot(dst.get(ids[1])) == state.read_bytes()
    done = restore(dst, ids[1], tmp_path / "out")
    assert done.chain == tuple(ids) and tree(tmp_path / "out") == tree(data)


@pytest.mark.hostile("store", "store copy: a flipped byte in the source's archive object",
                     "IntegrityError naming the backup; the upload aborted, nothing in DST")
def test_a_flipped_byte_in_the_source_is_not_copied(tmp_path: Path) -> None:
    backend = MemoryBackend()
    src = Repository.on(backend, CommandRunner())
    dst = _encrypted(tmp_path, "dst-repo")
    bid = src.put("fs1", "/srv", io.BytesIO(make_archive(source(tmp_path))),
                  {"frozen_at": FROZEN})
    key = src.get(bid).archive_key
    (info, blob), = backend.objects[key]
    bad = bytearray(blob)
    bad[40] ^= 1
    backend.objects[key] = [(info, bytes(bad))]
    with pytest.raises(IntegrityError, match=f"{bid}: sha256 mismatch"):
        copy_backups(src, dst)
    assert dst.list() == [] and keys_of(dst.backend) == []
    inner = dst.backend.inner  # type: ignore[attr-defined]
    assert inner.uploads == {}  # the upload was aborted, not left behind


@pytest.mark.hostile("store", "store copy: DST holds another backup under the same id",
                     "ResourceError naming the id; nothing copied, DST unchanged")
def test_a_conflicting_id_in_the_destination_is_refused(tmp_path: Path) -> None:
    src = _memory(tmp_path, "src-repo")
    dst = _dir(tmp_path, "dst-repo")
    archive = make_archive(source(tmp_path))
    first = src.put("fs1", "/srv", io.BytesIO(archive), {"frozen_at": "2026-11-25T10:00:00Z"})
    bid = src.put("fs1", "/srv", io.BytesIO(archive), {"frozen_at": FROZEN})
    other = tmp_path / "other"
    other.mkdir()
    (other / "x").write_bytes(b"other data\n")
    assert dst.put("fs1", "/srv", io.BytesIO(make_archive(other)), {"frozen_at": FROZEN}) == bid
    before = keys_of(dst.backend)
    with pytest.raises(ResourceError, match=str(bid)):
        copy_backups(src, dst)
    # the other backup, not in conflict, was not copied either: nothing is written
    assert keys_of(dst.backend) == before and [b.id for b in dst.list()] == [bid]
    assert first not in [b.id for b in dst.list()]


@pytest.mark.hostile("store", "store copy: a source backup whose manifest is not JSON",
                     "reported as broken, not copied; the others are")
def test_a_broken_source_backup_is_reported_and_not_copied(tmp_path: Path) -> None:
    backend = MemoryBackend()
    src = Repository.on(backend, CommandRunner())
    dst = _memory(tmp_path, "dst-repo")
    archive = make_archive(source(tmp_path))
    good = src.put("fs1", "/srv", io.BytesIO(archive), {"frozen_at": "2026-11-25T10:00:00Z"})
    bad = src.put("fs1", "/srv", io.BytesIO(archive), {"frozen_at": FROZEN})
    mkey = src.get(bad).manifest_key
    (info, _), = backend.objects[mkey]
    backend.objects[mkey] = [(info, b"{not json")]
    report = copy_backups(src, dst)
    assert report.copied == [good] and [b for b, _ in report.broken] == [bad]
    assert [b.id for b in dst.list()] == [good]


def test_the_cli_copies_and_prints_json(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    from sanoffload.cli import run

    src = _dir(tmp_path, "src-repo")
    (tmp_path / "dst-repo").mkdir()
    bid = src.put("fs1", "/srv", io.BytesIO(make_archive(source(tmp_path))),
                  {"frozen_at": FROZEN})
    base = ["store", "--repo", str(tmp_path / "src-repo"), "copy", str(tmp_path / "dst-repo")]
    assert run([*base, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["copied"] == [str(bid)]
    assert run([*base, str(bid), "--host", "fs1"]) == 0
    out = capsys.readouterr().out
    assert f"skipped {bid}" in out and "0 copied, 1 already there" in out
