"""The repository on an object store's terms (issue 14): write-once, versions, roles, locks.

:class:`~sanoffload.testing.MemoryBackend` models what RGW does (versioned
buckets, the proxy's credentials without delete rights, Object Lock retention):
verification goes to records beside the manifest, an overwritten object breaks
its backup, prune reports what the store keeps, gc sweeps in two phases.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from sanoffload.errors import IntegrityError
from sanoffload.store.backend import ObjectInfo
from sanoffload.store.backend_crypt import EncryptedBackend
from sanoffload.store.chunks import BackendChunkStore
from sanoffload.store.image import verify_image
from sanoffload.store.keys import RepoKeys
from sanoffload.store.manifest import VERIFIED_OK, VERIFY_FAILED, Verification
from sanoffload.store.prune import Policy, gc, prune
from sanoffload.store.repo import ARCHIVE_SUFFIX, Backup, BackupId, Repository
from sanoffload.testing import MemoryBackend

from .test_store_image import local, put_image, volume

DAY = 86400.0
T0 = 1_800_000_000.0  # 2027-01-15: after the backups' stamps, before T_FAR


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def image(repo: Repository, frozen: str, seed: bytes) -> Backup:
    return repo.get(put_image(local(repo, frozen), volume(seed))["id"])


def versions_of(backend: MemoryBackend, key: str) -> int:
    return len(backend.objects.get(key, []))


# -- verification records -----------------------------------------------------------------------
@pytest.mark.parametrize("wrap", [False, True], ids=["plain", "encrypted"])
def test_verify_on_a_versioned_store_leaves_one_version_of_the_manifest(wrap: bool) -> None:
    inner = MemoryBackend(versioned=True)
    backend = EncryptedBackend(inner, RepoKeys.generate()) if wrap else inner
    repo = Repository.on(backend)
    backup = image(repo, "2026-11-26T10:29:33Z", b"v")
    checked = repo.verify(backup.id)
    assert checked.manifest.verification is not None and checked.manifest.verification.ok
    repo.record_compare(backup.id, Verification.now(VERIFY_FAILED, "tar --diff: a differs"))
    assert versions_of(inner, backup.manifest_key) == 1
    records = [k for k in inner.objects if ".verify-" in k]
    assert len(records) == 2 and all(versions_of(inner, k) == 1 for k in records)
    again = Repository.on(backend).get(backup.id)
    assert again.manifest.verification is not None
    assert again.manifest.verification.detail == ""  # the record's, not "on receipt"
    assert again.manifest.compared is not None and again.manifest.compared.status == VERIFY_FAILED
    assert Repository.on(backend).leftovers() == []
    repo.delete(backup.id)
    assert [k for k in inner.objects if not k.startswith("chunks/") and k != "config"] == []


@pytest.mark.hostile("store", "verification records: garbage, another backup's, oversized, "
                     "rewritten, and more than are read", "each skipped; the newest valid wins")
def test_hostile_verification_records_are_skipped() -> None:
    backend = MemoryBackend(versioned=True)
    repo = Repository.on(backend)
    backup = image(repo, "2026-11-26T10:29:33Z", b"r")
    folder = backup.manifest_key.rsplit("/", 1)[0]
    stamp = backup.id.timestamp

    def record(when: str, body: bytes) -> str:
        key = f"{folder}/{stamp}.verify-{when}.json"
        backend.put(key, body, exclusive=False)
        return key

    def doc(backup_id: str, status: str, detail: str) -> bytes:
        return json.dumps({"format": "sanoffload-verification", "version": 1,
                           "backup": backup_id, "verification": {
                               "status": status, "checked_at": "2026-11-27T00:00:00Z",
                               "detail": detail}}).encode()

    record("20261127T000000.000001Z", doc(str(backup.id), VERIFIED_OK, "the valid one"))
    record("20261127T000000.000002Z", b"{not json")
    other = BackupId("fs9", backup.id.slug, stamp)
    record("20261127T000000.000003Z", doc(str(other), VERIFY_FAILED, "another backup's"))
    record("20261127T000000.000004Z", b" " * 9000)
    twice = record("20261127T000000.000005Z", doc(str(backup.id), VERIFY_FAILED, "first"))
    backend.put(twice, doc(str(backup.id), VERIFY_FAILED, "second"), exclusive=False)
    record("20261127T000000.000006Z", json.dumps({"format": "sanoffload-verification",
                                                  "version": 1, "backup": str(backup.id),
                                                  "verification": {"status": "maybe"}}
                                                 ).encode())
    got = repo.get(backup.id).manifest.verification
    assert got is not None and (got.status, got.detail) == (VERIFIED_OK, "the valid one")
    # only the newest few are read: the valid one drowned under more garbage is not seen
    for i in range(7, 16):
        record(f"20261127T000000.{i:06d}Z", b"[]")
    got = repo.get(backup.id).manifest.verification
    assert got is not None and got.detail == "on receipt"


def test_listing_asks_the_store_for_no_retention_dates() -> None:
    # on S3 a retention date costs a request per version: loading a backup only counts them
    asked: list[bool] = []

    class Recording(MemoryBackend):
        def versions(self, key: str, *, retention: bool = True) -> list[ObjectInfo]:
            asked.append(retention)
            return super().versions(key, retention=retention)

    backend = Recording(versioned=True)
    repo = Repository.on(backend)
    backup = image(repo, "2026-11-26T10:29:33Z", b"n")
    assert [b.id for b in Repository.on(backend).list()] == [backup.id]
    assert asked and not any(asked)


# -- written once -------------------------------------------------------------------------------
@pytest.mark.hostile("store", "a manifest overwritten on a versioned bucket (a second version)",
                     "the backup is broken, 'overwritten'; the oldest version is the one read")
@pytest.mark.parametrize("wrap", [False, True], ids=["plain", "encrypted"])
def test_an_overwritten_manifest_breaks_its_backup_and_the_oldest_wins(wrap: bool) -> None:
    inner = MemoryBackend(versioned=True)
    backend = EncryptedBackend(inner, RepoKeys.generate()) if wrap else inner
    repo = Repository.on(backend)
    backup = image(repo, "2026-11-26T10:29:33Z", b"o")
    forged = backup.manifest.with_verification(Verification.now(VERIFY_FAILED, "forged"))
    backend.put(backup.manifest_key, forged.to_json(), exclusive=False)
    assert versions_of(inner, backup.manifest_key) == 2
    fresh = Repository.on(backend)
    assert fresh.list() == []
    (broken,) = fresh.broken()
    assert broken.id == backup.id and "overwritten: 2 versions" in broken.reason
    assert broken.manifest == backup.manifest  # the original, not the forged one
    with pytest.raises(IntegrityError, match="overwritten"):
        fresh.get(backup.id)
    # prune leaves it alone
    plan = prune(fresh, Policy(last=1))
    assert [b.id for b in plan.broken] == [backup.id] and plan.remove == []


@pytest.mark.hostile("store", "an archive object overwritten on a versioned bucket",
                     "the backup is broken: overwritten")
def test_an_overwritten_data_object_breaks_its_backup() -> None:
    backend = MemoryBackend(versioned=True)
    repo = Repository.on(backend)
    backup = image(repo, "2026-11-26T10:29:33Z", b"d")
    backend.put(backup.archive_key, b"other bytes", exclusive=False)
    (broken,) = repo.broken()
    assert "overwritten: 2 versions of " + backup.archive_key in broken.reason


# -- prune --------------------------------------------------------------------------------------
def three(repo: Repository) -> list[Backup]:
    return [image(repo, f"2026-11-2{d}T10:00:00Z", bytes([d])) for d in (4, 5, 6)]


@pytest.mark.hostile("store", "prune with credentials that may not delete (the proxy's)",
                     "each backup reported refused by the store; all still listed whole")
def test_prune_with_the_proxys_credentials_is_refused_per_backup() -> None:
    backend = MemoryBackend(versioned=True)
    repo = Repository.on(backend)
    backups = three(repo)
    backend.deny_delete = True
    plan = prune(repo, Policy(last=1))
    assert [b.id for b in plan.remove] == [b.id for b in backups[:2]]
    assert [b.id for b, _ in plan.not_removed] == [b.id for b in backups[:2]]
    assert all(why.startswith("refused by the store:") for _, why in plan.not_removed)
    assert not plan.complete and plan.to_dict()["not_removed"][0]["reason"]
    assert [b.id for b in repo.list()] == [b.id for b in backups] and repo.broken() == []


@pytest.mark.hostile("store", "prune of backups under Object Lock retention",
                     "retained until the date, the prune complete; nothing of them removed; "
                     "gone after it")
def test_prune_keeps_retained_backups_whole_and_says_until_when() -> None:
    clock = Clock()
    backend = MemoryBackend(versioned=True, retain_until=T0 + DAY, clock=clock)
    repo = Repository.on(backend)
    backups = three(repo)
    before = {k: versions_of(backend, k) for k in backend.objects}
    plan = prune(repo, Policy(last=1), now=clock.now)
    assert [until for _, until in plan.retained] == ["2027-01-16T08:00:00Z"] * 2
    assert plan.complete and not plan.not_removed
    assert [r["id"] for r in plan.to_dict()["retained"]] == [str(b.id) for b in backups[:2]]
    assert {k: versions_of(backend, k) for k in backend.objects} == before
    assert len(repo.list()) == 3
    clock.now = T0 + 2 * DAY
    plan = prune(repo, Policy(last=1), now=clock.now)
    assert plan.complete and [b.id for b in repo.list()] == [backups[2].id]
    # every version went, no delete marker is left behind
    gone = [b.manifest_key for b in backups[:2]] + [b.archive_key for b in backups[:2]]
    assert not [k for k in gone if k in backend.objects]


def test_prune_of_an_unrestricted_versioned_store_leaves_no_versions() -> None:
    backend = MemoryBackend(versioned=True)
    repo = Repository.on(backend)
    backups = three(repo)
    repo.verify(backups[0].id)  # a record too
    plan = prune(repo, Policy(last=1))
    assert plan.complete and [b.id for b in repo.list()] == [backups[2].id]
    assert not [k for k in backend.objects
                if k.rsplit("/", 1)[-1].startswith(("20261124", "20261125"))]


# -- gc -----------------------------------------------------------------------------------------
def stored(backend: MemoryBackend) -> set[str]:
    return {k for k in backend.objects if k.startswith("chunks/")}


@pytest.mark.parametrize("wrap", [False, True], ids=["plain", "encrypted"])
def test_gc_on_an_object_store_sweeps_in_two_phases(wrap: bool) -> None:
    clock = Clock()
    inner = MemoryBackend(versioned=True, clock=clock)
    backend: MemoryBackend | EncryptedBackend = \
        EncryptedBackend(inner, RepoKeys.generate()) if wrap else inner
    repo = Repository.on(backend)
    old, new = (image(repo, f"2026-11-2{d}T10:00:00Z", bytes([d])) for d in (4, 5))
    chunks_before = stored(inner)
    repo.delete(old.id)
    clock.now = T0 + DAY
    first = gc(repo, grace_s=DAY / 2, now=clock.now)
    assert first.removed == [] and first.candidates == 4 and stored(inner) == chunks_before
    assert len([k for k in inner.objects if k.startswith("gc/candidates-")]) == 1
    # between the phases a new backup re-uses one of the candidates (same data as `old`)
    again = image(repo, "2026-11-28T10:00:00Z", bytes([4]))
    assert again.manifest.image is not None and again.manifest.image.new_chunks == 0
    clock.now = T0 + 2 * DAY
    second = gc(repo, grace_s=DAY / 2, now=clock.now)
    assert second.removed == [] and second.candidates == 0  # all of them referenced again
    repo.delete(again.id)
    third = gc(repo, grace_s=DAY / 2, now=T0 + 3 * DAY)
    assert third.removed == [] and third.candidates == 4
    clock.now = T0 + 4 * DAY
    fourth = gc(repo, grace_s=DAY / 2, now=clock.now)
    assert len(fourth.removed) == 4 and fourth.freed_bytes > 0
    assert len(stored(inner)) == len(chunks_before) - 4
    assert not [k for k in inner.objects if k.startswith("gc/")]  # consumed records go
    assert verify_image(Repository.on(backend), Repository.on(backend).get(new.id)).ok


def test_gc_keeps_a_retained_candidate_and_aborts_stale_uploads() -> None:
    clock = Clock()
    backend = MemoryBackend(versioned=True, clock=clock, retain_until=T0 + 10 * DAY)
    repo = Repository.on(backend)
    backup = image(repo, "2026-11-24T10:00:00Z", b"k")
    stale = backend.writer("fs1/x/20261124T100000Z.tar.zst")
    stale.write(b"half an archive")
    # the backup's own objects were written without retention; its chunks keep theirs
    for key in (backup.manifest_key, backup.archive_key):
        backend.objects[key] = [(replace(info, retain_until=None), data)
                                for info, data in backend.objects[key]]
    repo.delete(backup.id)
    clock.now = T0 + DAY
    first = gc(repo, grace_s=DAY / 2, now=clock.now)
    assert first.uploads_aborted == ["fs1/x/20261124T100000Z.tar.zst"] and not backend.uploads
    report = gc(repo, grace_s=DAY / 2, now=T0 + 2 * DAY)
    assert report.removed == [] and report.kept_retained == 4 and report.candidates == 4
    assert report.refused == []


@pytest.mark.hostile("store", "an archive object left without a manifest (a failed commit)",
                     "gc removes it once older than the grace, not before")
def test_gc_removes_data_objects_no_manifest_names_after_the_grace() -> None:
    clock = Clock()
    backend = MemoryBackend(versioned=True, clock=clock)
    repo = Repository.on(backend)
    key = "fs1/srv-data-00000000/20261124T100000Z" + ARCHIVE_SUFFIX
    backend.put(key, b"an orphan")
    assert gc(repo, grace_s=DAY, now=T0 + 1).orphans_removed == []
    report = gc(repo, grace_s=DAY, now=T0 + 2 * DAY)
    assert report.orphans_removed == [key] and key not in backend.objects


@pytest.mark.hostile("store", "gc on an object store while an image backup's map is damaged",
                     "gc refuses to sweep (IntegrityError naming the backup); nothing removed")
def test_gc_refuses_when_a_map_cannot_be_read() -> None:
    backend = MemoryBackend(versioned=True)
    repo = Repository.on(backend)
    keep = image(repo, "2026-11-24T10:00:00Z", b"m")
    gone = image(repo, "2026-11-25T10:00:00Z", b"n")
    repo.delete(gone.id)
    (info, data), = backend.objects[keep.archive_key]
    backend.objects[keep.archive_key] = [(info, data[:-1] + bytes([data[-1] ^ 1]))]
    before = dict(backend.objects)
    for now in (T0, T0 + 2 * DAY):
        with pytest.raises(IntegrityError, match="not sweeping"):
            gc(repo, grace_s=0, now=now)
    assert backend.objects.keys() == before.keys()


@pytest.mark.hostile("store", "gc candidates records: forged, naming non-chunks, or rewritten",
                     "skipped whole: they can only delay a removal")
def test_forged_candidates_records_are_skipped() -> None:
    backend = MemoryBackend(versioned=True)
    repo = Repository.on(backend)
    backup = image(repo, "2026-11-24T10:00:00Z", b"f")
    store = repo.chunks
    assert isinstance(store, BackendChunkStore)
    live = sorted(stored(backend))
    body: Callable[[list[str]], bytes] = lambda keys: json.dumps(  # noqa: E731
        {"format": "sanoffload-gc-candidates", "version": 1, "keys": keys}).encode()
    backend.put("gc/candidates-20200101T000000.000000Z", body([*live, "fs1/a/b"]))
    backend.put("gc/candidates-20200102T000000.000000Z", body(live))
    backend.put("gc/candidates-20200102T000000.000000Z", body(live), exclusive=False)
    repo.delete(backup.id)
    report = gc(repo, grace_s=DAY / 2, now=T0 + 10 * DAY)
    assert report.removed == [] and report.candidates == len(live)


# -- lock-extend --------------------------------------------------------------------------------
def test_extend_retention_holds_every_version_and_chunk_and_prune_keeps_them() -> None:
    clock = Clock()
    backend = MemoryBackend(versioned=True, retain_until=T0 + DAY, clock=clock)
    repo = Repository.on(backend)
    backups = three(repo)
    repo.verify(backups[0].id)  # a verification record is one of its objects too
    locked = repo.extend_retention(backups[0].id, T0 + 30 * DAY)
    chunk_keys = {repo.naming.chunk_key(c) for c in repo.load_map(backups[0]).referenced()}
    assert locked.chunks == len(chunk_keys) > 0
    held = {k for k, vs in backend.objects.items()
            if all(v.retain_until == T0 + 30 * DAY for v, _ in vs)}
    mine = set(repo._objects_of(backups[0].id)) & set(backend.objects)
    assert mine | chunk_keys <= held
    assert locked.objects == len(mine) + len(chunk_keys) and locked.until == T0 + 30 * DAY
    # the others' own objects keep the bucket's default date
    assert not set(repo._objects_of(backups[1].id)) & held
    # never shortened: asking for less changes nothing and says what holds
    assert repo.extend_retention(backups[0].id, T0 + 2 * DAY).until == T0 + 30 * DAY
    # past the default date prune removes the others, and keeps the held one whole
    clock.now = T0 + 2 * DAY
    plan = prune(repo, Policy(last=1), now=clock.now)
    assert [b.id for b, _ in plan.retained] == [backups[0].id] and plan.complete
    assert [b.id for b in repo.list()] == [backups[0].id, backups[2].id]
    got = repo.verify(backups[0].id).manifest.verification
    assert got is not None and got.status == VERIFIED_OK


@pytest.mark.hostile("store", "lock-extend where objects cannot be held: a directory, a bucket "
                     "without Object Lock, the proxy's credentials",
                     "usage error (2) or refused (10) naming why; nothing changed")
def test_extend_retention_refuses_where_nothing_can_be_held(tmp_path: Path) -> None:
    from sanoffload.errors import AuthError, UsageError

    unlocked = MemoryBackend(versioned=True)
    repo = Repository.on(unlocked)
    bid = three(repo)[0].id
    with pytest.raises(UsageError, match="no Object Lock"):
        repo.extend_retention(bid, T0 + DAY)
    locked = MemoryBackend(versioned=True, retain_until=T0, deny_delete=True)
    repo = Repository.on(locked)
    bid = three(repo)[0].id
    before = {k: [v for v, _ in vs] for k, vs in locked.objects.items()}
    with pytest.raises(AuthError):
        repo.extend_retention(bid, T0 + DAY)
    assert {k: [v for v, _ in vs] for k, vs in locked.objects.items()} == before
    (tmp_path / "repo").mkdir()
    directory = Repository(tmp_path / "repo")
    put_image(local(directory, "2026-11-24T10:00:00Z"), volume(b"d"))
    with pytest.raises(UsageError, match="directory"):
        directory.extend_retention(directory.list()[0].id, T0 + DAY)
