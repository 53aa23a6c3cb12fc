"""Restore against hostile archives and targets, with real GNU tar and zstd, as root.

Each test builds the situation an attacker or a clumsy admin would (a symlink
planted in the target, device nodes and set-uid files in an archive uploaded
with a proxy's key, a full repository or target disk, a target whose name is
not UTF-8) and asserts what restore must do: nothing written outside the
target, nothing privileged unless asked, a listing that is whole or an error,
an error that names its cause.
"""

from __future__ import annotations

import io
import os
import shutil
import stat
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from sanoffload.errors import RefusedError, ResourceError
from sanoffload.runner import DEFAULT_PATH, Runner
from sanoffload.store.repo import BackupId, Repository
from sanoffload.store.restore import restore
from sanoffload.tools import tar
from tests.host.conftest import LoopFs, destroy_loopfs, make_loopfs

pytestmark = pytest.mark.host

ENV = {"PATH": DEFAULT_PATH, "LC_ALL": "C"}


# --------------------------------------------------------------------------
# archives made member by member
# --------------------------------------------------------------------------

def _info(name: str, kind: bytes = tarfile.REGTYPE, *, mode: int = 0o644, uid: int = 0,
          link: str = "", size: int = 0) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.uid, info.gid, info.linkname = kind, mode, uid, uid, link
    info.size = size
    info.mtime = 1_700_000_000
    return info


def make_archive(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    # surrogateescape: a name os.fsdecode made from b"d\xfe" is stored as those bytes
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT,
                      errors="surrogateescape") as t:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            t.addfile(info, io.BytesIO(data) if data is not None else None)
    return subprocess.run(["zstd", "-q", "-c"], input=buf.getvalue(), capture_output=True,
                          check=True, env=ENV).stdout


def F(name: str, data: bytes = b"data", **kw: int) -> tuple[tarfile.TarInfo, bytes | None]:
    return _info(name, **kw), data  # type: ignore[arg-type]


def D(name: str, **kw: int) -> tuple[tarfile.TarInfo, bytes | None]:
    return _info(name, tarfile.DIRTYPE, mode=kw.pop("mode", 0o755), **kw), None  # type: ignore[arg-type]


def store(repo: Repository, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> BackupId:
    return repo.put("fs1", "/srv/data", io.BytesIO(make_archive(members)), verify=False)


def files_below(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# --------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------

@pytest.fixture
def place(require_root: None) -> Iterator[Path]:
    # /var/tmp: a disk filesystem like a real target (the staging directory lives in it)
    path = Path(tempfile.mkdtemp(prefix="sanoffload-hostile-", dir="/var/tmp"))
    try:
        yield path
    finally:
        subprocess.run(["umount", "--recursive", "--quiet", str(path)], check=False)
        shutil.rmtree(path)


@pytest.fixture
def repo(place: Path, host_runner: Runner) -> Repository:
    (place / "repo").mkdir()
    return Repository(place / "repo", host_runner)


@pytest.fixture
def small_fs(place: Path, host_runner: Runner) -> Iterator[LoopFs]:
    """A 16 MiB ext4 on a loop device, mounted (filled by the test that needs it full)."""
    (place / "images").mkdir()
    fs = make_loopfs(host_runner, "ext4", place / "images", size_mb=16)
    try:
        yield fs
    finally:
        destroy_loopfs(host_runner, fs)


def fill(fs: LoopFs) -> None:
    """Write until the filesystem refuses (as root: the reserved blocks too)."""
    block = b"\xa5" * (1 << 16)
    with open(fs.mountpoint / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(block)
        except OSError as exc:
            assert exc.errno == 28
    for i in range(10000):  # the inode table and directory blocks too
        try:
            (fs.mountpoint / f"tiny-{i}").touch()
        except OSError:
            break
    with pytest.raises(OSError):
        (fs.mountpoint / "probe").write_bytes(b"x" * 8192)


# --------------------------------------------------------------------------
# 1. no write through a symlink restore did not create
# --------------------------------------------------------------------------

@pytest.mark.hostile("restore", "restore ID TARGET x/file --force where TARGET/x is a symlink "
                     "to a directory elsewhere", "nothing written elsewhere; the symlink is "
                     "replaced by the backup's directory")
def test_selected_path_below_a_planted_symlink_is_not_written_through(
        repo: Repository, place: Path) -> None:
    bid = store(repo, [D("./"), D("./x/"), F("./x/file", b"from the backup"), F("./other")])
    outside = place / "elsewhere"
    outside.mkdir()
    target = place / "t"
    target.mkdir()
    (target / "x").symlink_to(outside)
    (target / "keep").write_text("mine")
    restore(repo, bid, target, ["x/file"], force=True)
    assert files_below(outside) == []
    assert not (target / "x").is_symlink()
    assert (target / "x" / "file").read_bytes() == b"from the backup"
    assert files_below(target) == ["keep", "x", "x/file"]


@pytest.mark.hostile("restore", "a whole --force restore of an archive holding ./x/file but "
                     "no ./x/ member, into a target where x is a symlink elsewhere",
                     "nothing written elsewhere")
@pytest.mark.parametrize("link", ["absolute", "relative"])
def test_whole_restore_without_a_directory_member_does_not_follow_a_planted_symlink(
        repo: Repository, place: Path, link: str) -> None:
    bid = store(repo, [D("./"), F("./x/file", b"pwned"), F("./x/sub/deeper", b"pwned")])
    outside = place / "elsewhere"
    outside.mkdir()
    (outside / "file").write_text("precious")
    target = place / "t"
    target.mkdir()
    (target / "x").symlink_to(outside if link == "absolute" else Path("..") / "elsewhere")
    restore(repo, bid, target, force=True)
    assert files_below(outside) == ["file"]
    assert (outside / "file").read_text() == "precious"
    assert (target / "x" / "file").read_bytes() == b"pwned"
    assert not (target / "x").is_symlink()


@pytest.mark.hostile("restore", "--force over a target holding a symlink where the backup has a "
                     "file, and a hard link to a file outside", "the link is replaced; the file "
                     "outside is never written")
def test_force_replaces_links_instead_of_writing_into_them(repo: Repository,
                                                           place: Path) -> None:
    bid = store(repo, [D("./"), F("./a", b"new a"), F("./b", b"new b")])
    outside = place / "elsewhere"
    outside.mkdir()
    (outside / "a").write_text("precious a")
    (outside / "b").write_text("precious b")
    target = place / "t"
    target.mkdir()
    (target / "a").symlink_to(outside / "a")
    os.link(outside / "b", target / "b")
    restore(repo, bid, target, force=True)
    assert (outside / "a").read_text() == "precious a"
    assert (outside / "b").read_text() == "precious b"
    assert (target / "a").read_bytes() == b"new a" and not (target / "a").is_symlink()
    assert (target / "b").read_bytes() == b"new b"


def test_force_merges_into_existing_directories_and_keeps_other_files(
        repo: Repository, place: Path) -> None:
    bid = store(repo, [D("./"), D("./d/", mode=0o750, uid=1234), F("./d/new", b"n"),
                       F("./file", b"f")])
    target = place / "t"
    (target / "d").mkdir(parents=True)
    (target / "d" / "mine").write_text("kept")
    (target / "file").mkdir()  # a non-empty directory where the backup has a file
    (target / "file" / "inside").write_text("kept too")
    with pytest.raises(ResourceError, match="'file'"):
        restore(repo, bid, target, force=True)
    assert (target / "d" / "mine").read_text() == "kept"
    assert (target / "d" / "new").read_bytes() == b"n"
    st = (target / "d").lstat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_mtime) == (0o750, 1234, 1_700_000_000)
    assert (target / "file" / "inside").read_text() == "kept too"
    assert not [n for n in os.listdir(target) if n.startswith(".sanoffload")]


# --------------------------------------------------------------------------
# 2. devices and set-id bits only when asked; the target's own mode is ours
# --------------------------------------------------------------------------

def _device(name: str) -> tuple[tarfile.TarInfo, bytes | None]:
    info = _info(name, tarfile.CHRTYPE, mode=0o666)
    info.devmajor, info.devminor = 1, 3  # /dev/null's numbers
    return info, None


@pytest.mark.hostile("restore", "an archive holding a device node (mode 0666)",
                     "refused before anything is written unless --devices")
def test_device_nodes_are_refused_unless_asked(repo: Repository, place: Path) -> None:
    bid = store(repo, [D("./"), F("./plain"), D("./dev/"), _device("./dev/mem-like")])
    target = place / "t"
    with pytest.raises(RefusedError, match="device nodes.*'./dev/mem-like'.*--devices"):
        restore(repo, bid, target)
    assert not target.exists()
    restore(repo, bid, target, ["plain"])  # not among what is restored: fine
    assert files_below(target) == ["plain"]
    done = restore(repo, bid, place / "t2", devices=True)
    assert stat.S_ISCHR((place / "t2" / "dev" / "mem-like").lstat().st_mode)
    assert done.members == 4


@pytest.mark.hostile("restore", "an archive holding a set-uid root file and a set-gid file",
                     "restored without the set-id bits unless --setid")
def test_setid_bits_are_cleared_unless_asked(repo: Repository, place: Path) -> None:
    bid = store(repo, [D("./"), F("./su", b"#!/bin/sh\n", mode=0o4755),
                       F("./sg", b"x", mode=0o2755), D("./gd/", mode=0o2775),
                       (_info("./hl", tarfile.LNKTYPE, link="./su"), None)])
    done = restore(repo, bid, place / "t")
    assert stat.S_IMODE((place / "t" / "su").lstat().st_mode) == 0o755
    assert stat.S_IMODE((place / "t" / "hl").lstat().st_mode) == 0o755
    assert stat.S_IMODE((place / "t" / "sg").lstat().st_mode) == 0o755
    assert stat.S_IMODE((place / "t" / "gd").lstat().st_mode) == 0o2775  # a directory's: kept
    assert done.setid_cleared == 2
    restore(repo, bid, place / "t2", setid=True)
    assert stat.S_IMODE((place / "t2" / "su").lstat().st_mode) == 0o4755
    assert stat.S_IMODE((place / "t2" / "sg").lstat().st_mode) == 0o2755


@pytest.mark.hostile("restore", "an archive whose ./ member makes the target 0777 and "
                     "owned by another user", "the target's mode and owner stay ours "
                     "(0700 root when made, unchanged when it exists)")
@pytest.mark.parametrize("exists", [False, True])
def test_the_target_directory_is_ours(repo: Repository, place: Path, exists: bool) -> None:
    bid = store(repo, [D("./", mode=0o777, uid=1234), F("./f")])
    target = place / "t"
    if exists:
        target.mkdir()
        os.chmod(target, 0o750)
    restore(repo, bid, target)
    st = target.lstat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid) == ((0o750 if exists else 0o700), 0)
    assert files_below(target) == ["f"]


# --------------------------------------------------------------------------
# 3. the listing is whole even on a full repository disk
# --------------------------------------------------------------------------

@pytest.mark.hostile("store", "restore from a repository whose disk is full (the member "
                     "listing used to be written there, silently cut short)",
                     "the whole listing is checked: an evil last member is still refused")
def test_listing_is_whole_on_a_full_repository_disk(place: Path, host_runner: Runner,
                                                    small_fs: LoopFs) -> None:
    repo_dir = small_fs.mountpoint / "repo"
    repo_dir.mkdir()
    repo = Repository(repo_dir, host_runner)
    many = [F(f"./file-{i:05d}-{'x' * 60}", b"") for i in range(3000)]
    good = repo.put("fs1", "/srv/good", io.BytesIO(make_archive([D("./"), *many])),
                    verify=False)
    evil = repo.put("fs1", "/srv/data", io.BytesIO(make_archive(
        [D("./"), *many, (_info("./zz", tarfile.SYMTYPE, link="/etc"), None),
         F("./zz/cron.d/pwned")])), verify=False)
    fill(small_fs)
    target = place / "t"
    with pytest.raises(RefusedError, match="through"):
        restore(repo, evil, target)
    assert not target.exists()
    done = restore(repo, good, target)
    assert done.members == 3001 and len(os.listdir(target)) == 3000
    assert tar.count_members(host_runner, repo.archive_path(good), timeout=60) == 3001


# --------------------------------------------------------------------------
# 4. errors keep their cause
# --------------------------------------------------------------------------

@pytest.mark.hostile("restore", "restore into a filesystem too small for the backup",
                     "fails (exit 7) naming 'no space left on device' and tar's own line; "
                     "the target is left as it was")
def test_disk_full_restore_names_the_cause_and_leaves_the_target(
        repo: Repository, small_fs: LoopFs) -> None:
    bid = store(repo, [D("./"), F("./small", b"s"), F("./big", os.urandom(24 << 20))])
    target = small_fs.mountpoint / "t"
    target.mkdir()
    (target / "mine").write_text("kept")
    with pytest.raises(ResourceError) as info:
        restore(repo, bid, target, force=True)
    assert "no space left on device (ENOSPC)" in str(info.value)
    # tar's own words come along ("Wrote only 2048 of 10240 bytes")
    assert "./big: Wrote only" in str(info.value)
    assert "\n" not in str(info.value)
    assert sorted(os.listdir(target)) == ["mine"]  # the staging directory is gone too


# --------------------------------------------------------------------------
# 13. paths are bytes
# --------------------------------------------------------------------------

@pytest.mark.hostile("restore", "a restore target whose name is not UTF-8 (b'\\xff'), and a "
                     "selected path likewise", "restored there byte for byte")
def test_restore_into_a_non_utf8_target(repo: Repository, place: Path) -> None:
    odd = os.fsdecode(b"d\xfe")
    bid = store(repo, [D("./"), F("./a", b"a"), D(f"./{odd}/"), F(f"./{odd}/in", b"i")])
    target = os.fsencode(place) + b"/t\xff"
    done = restore(repo, bid, target)
    assert sorted(os.listdir(target)) == [b"a", b"d\xfe"]
    assert os.listdir(target + b"/d\xfe") == [b"in"]
    assert done.target == Path(os.fsdecode(target))
    target2 = os.fsencode(place) + b"/sel\xfe"
    restore(repo, bid, target2, [b"d\xfe/in"])
    assert os.listdir(target2) == [b"d\xfe"] and os.listdir(target2 + b"/d\xfe") == [b"in"]
    # the tar wrapper given a bytes --directory, through the real runner
    plain = os.fsencode(place) + b"/plain\xfd"
    os.mkdir(plain)
    tar.extract(repo.command_runner(), repo.archive_path(bid), plain, timeout=60)
    assert sorted(os.listdir(plain)) == [b"a", b"d\xfe"]
