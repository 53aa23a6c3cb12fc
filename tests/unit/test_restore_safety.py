"""Restore's safety rules with a fake tar: staging, no write through symlinks, devices, set-id.

The fake ``tar --extract`` writes what a real one would into the directory it
is handed (``/proc/self/fd/N``, open in this very process); the host tier
(tests/host/test_restore_hostile.py) runs the same attacks with real tar.
"""

from __future__ import annotations

import io
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from sanoffload.errors import CommandError, IntegrityError, RefusedError
from sanoffload.store.repo import BackupId, Repository
from sanoffload.store.restore import STAGING_PREFIX, _open_dir, check_members, restore
from sanoffload.testing import FakeRunner
from sanoffload.tools.tar import Member

pytestmark = pytest.mark.unit

LISTING = (b'drwxr-xr-x 0/0 0 2026-11-26 10:32 "./"\n'
           b'-rw-r--r-- 0/0 2 2026-11-26 10:32 "./x/file"\n'
           b'-rwsr-xr-x 0/0 2 2026-11-26 10:32 "./su"\n')
DEVICE_LISTING = LISTING + (b'drwxr-xr-x 0/0 0 2026-11-26 10:32 "./dev/"\n'
                            b'crw-rw-rw- 0/0 1,3 2026-11-26 10:32 "./dev/null"\n'
                            b'brw-rw-rw- 0/0 8,0 2026-11-26 10:32 "./dev/sda"\n')


def staged_into(argv: list[str]) -> Path:
    """The directory the fake tar was told to extract into (must be a descriptor, not a path)."""
    target = Path(next(a for a in argv if a.startswith("--directory="))[12:])
    assert target.parent == Path("/proc/self/fd")
    return target


def extracts(tree: dict[str, bytes], modes: dict[str, int] | None = None
             ) -> Callable[[list[str]], None]:
    def write(argv: list[str]) -> None:
        root = staged_into(argv)
        for name, data in tree.items():
            path = root / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            if modes and name in modes:
                os.chmod(path, modes[name])
    return write


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Repository, BackupId, FakeRunner, Path]:
    runner = FakeRunner()
    (tmp_path / "repo").mkdir()
    repo = Repository(tmp_path / "repo", runner)
    bid = repo.put("fs1", "/srv", io.BytesIO(b"pretend this is zstd"), verify=False)
    return repo, bid, runner, tmp_path


Setup = tuple[Repository, BackupId, FakeRunner, Path]


@pytest.mark.hostile("restore", "restore ID TARGET x/file --force where TARGET/x is a symlink "
                     "elsewhere (fake tar)", "tar writes only into a private staging directory; "
                     "the symlink is replaced, nothing written elsewhere")
def test_tar_never_sees_the_target_and_symlinks_there_are_replaced(setup: Setup) -> None:
    repo, bid, runner, tmp = setup
    elsewhere = tmp / "elsewhere"
    elsewhere.mkdir()
    target = tmp / "t"
    target.mkdir()
    (target / "x").symlink_to(elsewhere)
    runner.on("tar", "--list", stdout=LISTING)
    runner.on("tar", "--extract", action=extracts({"x/file": b"new"}))
    restore(repo, bid, target, ["x/file"], force=True)
    assert list(elsewhere.iterdir()) == []
    assert not (target / "x").is_symlink() and (target / "x" / "file").read_bytes() == b"new"
    extract = runner.argvs()[-1]
    assert not any(str(target) in a for a in extract)
    assert sorted(os.listdir(target)) == ["x"]  # the staging directory is gone


def test_the_staging_directory_is_private_and_inside_the_target(setup: Setup) -> None:
    repo, bid, runner, tmp = setup
    seen: list[tuple[int, list[str]]] = []

    def look(argv: list[str]) -> None:
        staging = [n for n in os.listdir(tmp / "t") if n.startswith(STAGING_PREFIX)]
        assert len(staging) == 1
        seen.append((stat.S_IMODE(os.lstat(tmp / "t" / staging[0]).st_mode),
                     os.listdir(tmp / "t" / staging[0])))
        assert os.path.samefile(staged_into(argv), tmp / "t" / staging[0] / "root")

    runner.on("tar", "--list", stdout=LISTING)
    runner.on("tar", "--extract", action=look)
    restore(repo, bid, tmp / "t")
    assert seen == [(0o700, ["root"])]


def test_a_failed_extraction_leaves_even_a_forced_target_as_it_was(setup: Setup) -> None:
    repo, bid, runner, tmp = setup
    target = tmp / "t"
    target.mkdir()
    (target / "su").write_text("mine")
    runner.on("tar", "--list", stdout=LISTING)
    runner.on("tar", "--extract", returncode=2, stderr="tar: ./x/file: Cannot write: Bad\n",
              action=extracts({"su": b"half"}))
    with pytest.raises(CommandError, match="Cannot write"):
        restore(repo, bid, target, force=True)
    assert os.listdir(target) == ["su"] and (target / "su").read_text() == "mine"


@pytest.mark.hostile("restore", "an archive whose listing shows character and block devices",
                     "refused naming them, before tar extracts anything (exit 3)")
def test_devices_are_refused_before_extraction(setup: Setup) -> None:
    repo, bid, runner, tmp = setup
    runner.on("tar", "--list", stdout=DEVICE_LISTING)
    with pytest.raises(RefusedError, match=r"device nodes \('./dev/null', './dev/sda'\): pass "
                                           "--devices"):
        restore(repo, bid, tmp / "t")
    assert not runner.called("tar", "--extract") and not (tmp / "t").exists()
    runner.on("tar", "--extract")
    restore(repo, bid, tmp / "t", devices=True)
    restore(repo, bid, tmp / "t2", ["su"])  # no device among what is restored


def test_check_members_reports_devices_and_directory_members() -> None:
    members = [Member("d", b"./"), Member("d", b"./a/"), Member("-", b"./a/f"),
               Member("c", b"./a/null"), Member("d", b"./b/"), Member("b", b"./b/sda"),
               Member("h", b"./b/h", b"./a/null")]
    whole = check_members(members)
    assert whole.devices == (b"./a/null", b"./b/sda")
    assert whole.dirs == {b"a", b"b"}
    part = check_members(members, [b"b"])
    assert part.devices == (b"./a/null", b"./b/sda")  # the hard link brings ./a/null along
    assert part.dirs == {b"b"}
    assert check_members(members, [b"a/f"]).devices == ()
    assert check_members(members, [b"a/f"]).dirs == frozenset()


@pytest.mark.hostile("restore", "an archive holding a set-uid file (fake tar)",
                     "its set-uid bit is cleared before it leaves the staging directory")
def test_setid_bits_are_cleared_in_staging(setup: Setup) -> None:
    repo, bid, runner, tmp = setup
    runner.on("tar", "--list", stdout=LISTING)
    runner.on("tar", "--extract", action=extracts({"su": b"#!", "x/file": b"f"},
                                                  {"su": 0o4755, "x/file": 0o644}))
    done = restore(repo, bid, tmp / "t")
    assert stat.S_IMODE(os.lstat(tmp / "t" / "su").st_mode) == 0o755
    assert done.setid_cleared == 1
    done = restore(repo, bid, tmp / "t2", setid=True)
    assert stat.S_IMODE(os.lstat(tmp / "t2" / "su").st_mode) == 0o4755
    assert done.setid_cleared == 0


@pytest.mark.hostile("restore", "a target directory replaced by a symlink between the check "
                     "and the move", "the open fails (O_NOFOLLOW); refused, not followed")
def test_a_symlink_is_never_opened_as_a_directory(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(RefusedError, match="never writes through a symlink"):
            _open_dir("link", fd, b"t/link")
        os.close(_open_dir("real", fd, b"t/real"))
    finally:
        os.close(fd)


@pytest.mark.hostile("restore", "a member listing cut short (tar fails after part of it)",
                     "integrity error (exit 12); nothing extracted")
def test_a_listing_cut_short_is_an_integrity_error(setup: Setup) -> None:
    repo, bid, runner, tmp = setup
    runner.on("tar", "--list", stdout=LISTING[:60], returncode=2,
              stderr="tar: Unexpected EOF in archive\n")
    with pytest.raises(IntegrityError, match="Unexpected EOF"):
        restore(repo, bid, tmp / "t")
    assert not runner.called("tar", "--extract") and not (tmp / "t").exists()


def test_restore_writes_nothing_into_the_repository(setup: Setup) -> None:
    repo, bid, runner, tmp = setup
    before = sorted(p.name for p in repo.root.rglob("*"))
    runner.on("tar", "--list", stdout=LISTING)
    read: list[bytes] = []

    def read_selection(argv: list[str]) -> None:
        read.extend(Path(a.partition("=")[2]).read_bytes() for a in argv
                    if a.startswith("--files-from="))

    runner.on("tar", "--extract", action=read_selection)
    restore(repo, bid, tmp / "t", ["x/file"])
    assert read == [b"./x/file\0"]  # the selection lives in the private staging directory
    assert sorted(p.name for p in repo.root.rglob("*")) == before


def test_a_target_that_cannot_be_made_is_refused(setup: Setup) -> None:
    repo, bid, runner, tmp = setup
    (tmp / "file").write_text("x")
    runner.on("tar", "--list", stdout=LISTING)
    with pytest.raises(RefusedError, match="cannot be made"):
        restore(repo, bid, tmp / "file" / "t")
    assert not runner.called("tar", "--extract")
