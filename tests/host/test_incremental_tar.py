"""File-level incremental backups with REAL GNU tar and zstd (issue 13), as root.

Level 0 of a tree, then files changed, added, deleted and renamed (and one changed
between the simulated freeze and tar's start), level 1; a restore of level 1 applies
the chain and equals the source exactly (the round-trip test's own tree digest).
Without the dump-time rewrite, that one file would be missing from level 1.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from sanoffload.errors import IntegrityError
from sanoffload.runner import Runner
from sanoffload.store.repo import BackupId, Repository
from sanoffload.store.restore import restore
from sanoffload.tools import tar, zstd
from tests.host.test_store_roundtrip import ENV, assert_same_tree

pytestmark = pytest.mark.host

#: the freeze, as the agent says it, is this long before tar starts
FREEZE_BEFORE_TAR_S = 30.0
#: level 1's freeze: later than level 0's, still before its tar starts
LEVEL1_FREEZE_BEFORE_TAR_S = 20.0
MARGIN_S = 60.0


@pytest.fixture
def work(require_root: None) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="sanoffload-incr-", dir="/var/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def repo(work: Path, host_runner: Runner) -> Repository:
    (work / "repo").mkdir()
    return Repository(work / "repo", host_runner)


def level(repo: Repository, src: Path, state: Path, frozen_at: float, fields: dict[str, object],
          *, rewrite: bool = True) -> BackupId:
    """``tar --create --listed-incremental=STATE --no-check-device ... | zstd`` into the
    store, the state file's dump time set to the freeze less the margin, sent, committed."""
    argv = tar.with_incremental(tar.create_argv(str(src)), state)
    when = datetime.fromtimestamp(frozen_at, UTC)
    with repo.writer("fs1", "/srv/data", timestamp=when) as w, \
            tempfile.TemporaryFile() as errors:
        t = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=errors, env=ENV)
        z = subprocess.Popen(zstd.compress_argv(), stdin=t.stdout, stdout=subprocess.PIPE,
                             env=ENV)
        assert t.stdout is not None and z.stdout is not None
        t.stdout.close()
        w.write_from(z.stdout)
        z.stdout.close()
        assert z.wait(60) == 0 and t.wait(60) == 0, errors.read()
        if rewrite:
            tar.rewrite_snapshot_file(state, frozen_at - MARGIN_S)
        w.write_snapshot([state.read_bytes()])
        return w.commit({"frozen_at": frozen_at, **fields}).id


def make_tree(src: Path) -> None:
    (src / "d" / "sub").mkdir(parents=True)
    (src / "keep.txt").write_bytes(b"unchanged\n")
    (src / "change.txt").write_bytes(b"old content\n")
    (src / "late.txt").write_bytes(b"before the freeze\n")
    (src / "delete.txt").write_bytes(b"to be deleted\n")
    (src / "d" / "rename-me").write_bytes(b"renamed later\n")
    (src / "d" / "sub" / "gone").write_bytes(b"its directory goes\n")
    os.symlink("keep.txt", src / "link")


def change_tree(src: Path, frozen_at: float) -> None:
    (src / "change.txt").write_bytes(b"new content, longer than before\n")
    (src / "added.txt").write_bytes(b"added after level 0\n")
    (src / "delete.txt").unlink()
    os.rename(src / "d" / "rename-me", src / "d" / "renamed")
    shutil.rmtree(src / "d" / "sub")
    (src / "link").unlink()
    os.symlink("added.txt", src / "link")
    # changed after the freeze of level 1's parent but before its tar started: on a real
    # duplicate this change is not in level 0, and its mtime is older than tar's start
    (src / "late.txt").write_bytes(b"changed between the freeze and tar's start\n")
    os.utime(src / "late.txt", (frozen_at + 10, frozen_at + 10))


def test_level_1_restores_the_source_exactly(work: Path, repo: Repository) -> None:
    src = work / "src"
    make_tree(src)
    state = work / "state.snar"
    frozen0 = time.time() - FREEZE_BEFORE_TAR_S
    l0 = level(repo, src, state, frozen0, {"tar_level": 0})
    header = tar.parse_snapshot_header(state.read_bytes())
    assert header.seconds == int(frozen0 - MARGIN_S)
    change_tree(src, frozen0)
    l1 = level(repo, src, state, time.time() - LEVEL1_FREEZE_BEFORE_TAR_S,
               {"tar_level": 1, "parent": str(l0), "chain": str(l0)})
    b1 = repo.get(l1)
    assert b1.manifest.tar_level == 1 and b1.manifest.chain == str(l0)
    assert [b.id for b in repo.chain(b1)] == [l0, l1]
    repo.verify(l1)  # the chain is whole, the state file matches
    target = work / "restored"
    done = restore(repo, l1, target, setid=True)
    assert done.chain == (l0, l1)
    assert_same_tree(os.fsencode(src), os.fsencode(target))
    assert (target / "late.txt").read_bytes() == b"changed between the freeze and tar's start\n"
    assert not (target / "delete.txt").exists() and not (target / "d" / "sub").exists()


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, env=ENV, capture_output=True, timeout=120)


@pytest.fixture
def live(work: Path) -> Iterator[Path]:
    """A real ext4 on a loop device: its duplicates (copies taken under fsfreeze) keep the
    inode numbers, as a snapshot does; only the device differs (--no-check-device)."""
    image, mnt = work / "live.img", work / "live"
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(64 << 20)
    _run("mkfs.ext4", "-q", "-F", str(image))
    _run("mount", "-o", "loop", str(image), str(mnt))
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], env=ENV, check=False)


def duplicate(work: Path, live: Path, name: str) -> tuple[Path, float]:
    """Freeze ``live``, copy its device, thaw; mount the copy read-only: (where, freeze time)."""
    image, mnt = work / f"{name}.img", work / name
    mnt.mkdir()
    _run("fsfreeze", "-f", str(live))
    try:
        frozen = time.time()
        _run("cp", "--sparse=always", str(work / "live.img"), str(image))
    finally:
        _run("fsfreeze", "-u", str(live))
    _run("mount", "-o", "loop,ro,noload", str(image), str(mnt))
    return mnt, frozen


def test_without_the_rewrite_a_file_changed_after_the_freeze_is_missed(
        work: Path, repo: Repository, live: Path) -> None:
    """The real timeline: freeze, a change on the live filesystem, then tar on the duplicate.

    The change (mtime and ctime after the freeze, before tar's start) is not in level 0;
    level 1 must carry it. With tar's own dump time it is skipped (and lost); with the
    freeze time less the margin it is in level 1.
    """
    make_tree(live / "data")
    found = {}
    for rewrite in (False, True):
        (live / "data" / "late.txt").write_bytes(b"before the freeze\n")
        os.sync()
        time.sleep(1.1)  # mtimes are compared to the second and nanosecond: apart for sure
        dup0, frozen0 = duplicate(work, live, f"dup0-{rewrite}")
        (live / "data" / "late.txt").write_bytes(b"changed between the freeze and tar\n")
        time.sleep(1.1)  # tar starts strictly after the change, as on a busy proxy
        state = work / f"state-{rewrite}.snar"
        l0 = level(repo, dup0 / "data", state, frozen0, {"tar_level": 0}, rewrite=rewrite)
        os.sync()
        time.sleep(1.1)
        dup1, frozen1 = duplicate(work, live, f"dup1-{rewrite}")
        l1 = level(repo, dup1 / "data", state, frozen1,
                   {"tar_level": 1, "parent": str(l0), "chain": str(l0)}, rewrite=rewrite)
        target = work / f"restored-{rewrite}"
        restore(repo, l1, target, setid=True)
        found[rewrite] = (target / "late.txt").read_bytes()
        if rewrite:
            assert_same_tree(os.fsencode(dup1 / "data"), os.fsencode(target))
        for d in (dup0, dup1):
            subprocess.run(["umount", str(d)], env=ENV, check=False)
        for b in (l1, l0):
            repo.delete(b)
    assert found[False] == b"before the freeze\n"  # lost without the rewrite
    assert found[True] == b"changed between the freeze and tar\n"


@pytest.mark.hostile("restore", "level 1 whose level 0 was deleted",
                     "IntegrityError naming the missing backup; nothing written")
def test_a_missing_link_is_refused(work: Path, repo: Repository) -> None:
    src = work / "src"
    make_tree(src)
    state = work / "state.snar"
    frozen0 = time.time() - FREEZE_BEFORE_TAR_S
    l0 = level(repo, src, state, frozen0, {"tar_level": 0})
    change_tree(src, frozen0)
    l1 = level(repo, src, state, time.time() - LEVEL1_FREEZE_BEFORE_TAR_S,
               {"tar_level": 1, "parent": str(l0), "chain": str(l0)})
    repo.delete(l0)
    target = work / "restored"
    with pytest.raises(IntegrityError, match=str(l0)):
        restore(repo, l1, target)
    assert not target.exists()
    with pytest.raises(IntegrityError, match="chain is broken"):
        repo.verify(l1)


@pytest.mark.hostile("restore", "level 0 makes link -> /outside, level 1 makes link a "
                     "directory holding a file", "the symlink is removed from staging first: "
                     "nothing is written outside")
def test_a_symlink_turned_directory_is_not_followed(work: Path, repo: Repository) -> None:
    src = work / "src"
    outside = work / "outside"
    outside.mkdir()
    src.mkdir()
    os.symlink(str(outside), src / "x")
    state = work / "state.snar"
    frozen0 = time.time() - FREEZE_BEFORE_TAR_S
    l0 = level(repo, src, state, frozen0, {"tar_level": 0})
    (src / "x").unlink()
    (src / "x").mkdir()
    (src / "x" / "f").write_bytes(b"inside\n")
    l1 = level(repo, src, state, time.time() - LEVEL1_FREEZE_BEFORE_TAR_S,
               {"tar_level": 1, "parent": str(l0), "chain": str(l0)})
    target = work / "restored"
    restore(repo, l1, target, setid=True)
    assert os.listdir(outside) == []
    assert (target / "x" / "f").read_bytes() == b"inside\n"
    assert_same_tree(os.fsencode(src), os.fsencode(target))
