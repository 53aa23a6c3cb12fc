"""Keyed names on an encrypted repository (issue 14): the store learns nothing from names.

An :class:`~sanoffload.store.backend_crypt.EncryptedBackend` over a
:class:`~sanoffload.testing.MemoryBackend`: the inner store's keys must hold no
host, path, slug or chunk sha256, yet ids round-trip through listings, ``get``,
verify, restore, delete and gc. tar and zstd are this machine's.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pytest

from sanoffload.errors import IntegrityError, UsageError
from sanoffload.runner import CommandRunner
from sanoffload.store.backend_crypt import EncryptedBackend
from sanoffload.store.chunks import BackendChunkStore
from sanoffload.store.crypt import chunk_name
from sanoffload.store.keys import RepoKeys
from sanoffload.store.prune import gc
from sanoffload.store.repo import KeyedNaming, Naming, Repository
from sanoffload.store.restore import restore
from sanoffload.testing import MemoryBackend

from .conftest import make_archive
from .test_repo_backend import source, tree
from .test_store_image import CS, T_FAR, local, put_image, volume

FROZEN = "2026-11-26T10:29:33Z"


def encrypted() -> tuple[MemoryBackend, EncryptedBackend]:
    inner = MemoryBackend()
    return inner, EncryptedBackend(inner, RepoKeys.generate())


def chunk_ids(data: bytes) -> set[str]:
    return {hashlib.sha256(data[i:i + CS]).hexdigest() for i in range(0, len(data), CS)}


def test_an_encrypted_repository_gets_keyed_names_a_plain_one_does_not() -> None:
    inner, outer = encrypted()
    assert isinstance(Repository.on(outer).naming, KeyedNaming)
    plain = Repository.on(inner).naming
    assert type(plain) is Naming and plain.folder("fs1", "s") == "fs1/s"


def test_names_in_the_store_say_nothing_and_ids_round_trip(tmp_path: Path) -> None:
    inner, outer = encrypted()
    repo = Repository.on(outer, CommandRunner())
    src = source(tmp_path)
    archive = make_archive(src)
    bid = repo.put("fs1", "/srv/data", io.BytesIO(archive), {"frozen_at": FROZEN})
    data = volume(b"keyed")
    image = put_image(local(repo), data)
    names = [k for k in inner.objects if k != "config"]
    secrets = ["fs1", "srv", bid.slug, "thin", hashlib.sha256(archive).hexdigest(),
               *chunk_ids(data)]
    assert names and not [n for n in names for s in secrets if s in n]
    assert {n.split("/")[0] for n in names} == {"backups", "chunks"}
    keys = outer.keys
    assert {f"chunks/{chunk_name(keys, c)[:2]}/{chunk_name(keys, c)}"
            for c in chunk_ids(data) if c != hashlib.sha256(bytes(CS)).hexdigest()} == \
        {n for n in names if n.startswith("chunks/")}
    # a new repository object (nothing remembered) lists and finds the real ids
    again = Repository.on(outer, CommandRunner())
    ids = [str(b.id) for b in again.list()]
    assert sorted(ids) == sorted([str(bid), image["id"]]) and again.broken() == []
    assert [str(b.id) for b in again.list(host="fs1", slug=bid.slug)] == [str(bid)]
    assert again.list(host="fs2") == [] and list(again.ids(slug="nothing-00000000")) == []
    backup = again.get(str(bid))
    assert backup.manifest.host == "fs1" and backup.manifest.path == "/srv/data"
    assert backup.archive_key.startswith("backups/") and backup.archive_key in inner.objects
    again.verify(bid)
    done = restore(again, bid, tmp_path / "out")
    assert tree(tmp_path / "out") == tree(src) and done.members == 4
    assert again.leftovers() == []
    again.delete(bid)
    again.delete(again.get(image["id"]).id)
    report = gc(again, grace_s=0, now=T_FAR)
    assert len(report.removed) == 4 and report.candidates == 0
    assert [k for k in inner.objects if k != "config"] == []


@pytest.mark.hostile("store", "an encrypted manifest copied into another backup's keyed folder",
                     "it does not open there: listed broken under the folder's tokens")
def test_a_manifest_moved_to_another_folder_is_broken(tmp_path: Path) -> None:
    inner, outer = encrypted()
    repo = Repository.on(outer, CommandRunner())
    src = source(tmp_path)
    first = repo.put("fs1", "/srv/a", io.BytesIO(make_archive(src)), {"frozen_at": FROZEN})
    second = repo.put("fs1", "/srv/b", io.BytesIO(make_archive(src)), {"frozen_at": FROZEN})
    a, b = repo.get(first), repo.get(second)
    inner.delete(b.manifest_key)
    inner.put(b.manifest_key, inner.get(a.manifest_key, max_bytes=1 << 20))
    fresh = Repository.on(outer, CommandRunner())
    assert [x.id for x in fresh.list()] == [first]
    (broken,) = fresh.broken()
    assert "does not authenticate" in broken.reason or "unreadable" in broken.reason
    assert broken.id.host == b.manifest_key.split("/")[1]  # the folder's token, not fs1
    # found again by that id, even by a repository that did not list it
    with pytest.raises(IntegrityError):
        Repository.on(outer).get(broken.id)
    assert any("broken" in why for _, why in fresh.leftovers())


def test_a_keyed_chunk_store_lists_no_ids() -> None:
    _, outer = encrypted()
    store = Repository.on(outer).chunks
    assert isinstance(store, BackendChunkStore) and store.keyed
    with pytest.raises(UsageError, match="keyed"):
        list(store.ids())
