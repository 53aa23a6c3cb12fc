"""Restore: member-path checks on crafted listings, and nothing written before the checks pass."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from sanoffload.errors import CommandError, IntegrityError, RefusedError, UsageError
from sanoffload.store.repo import BackupId, Repository
from sanoffload.store.restore import check_members, member_parts, restore, stream_out
from sanoffload.testing import FakeRunner
from sanoffload.tools.tar import Member

pytestmark = pytest.mark.unit


def F(name: bytes) -> Member:
    return Member("-", name)


def D(name: bytes) -> Member:
    return Member("d", name)


def L(name: bytes, link: bytes) -> Member:
    return Member("l", name, link)


def H(name: bytes, link: bytes) -> Member:
    return Member("h", name, link)


GOOD = [D(b"./"), D(b"./etc/"), F(b"./etc/app.conf"), L(b"./etc/link", b"/etc/passwd"),
        L(b"./up", b"../../outside"), H(b"./etc/hard", b"./etc/app.conf"), D(b"./a b/"),
        F(b"./a b/nl\nname"), F(b"./\xff\xfe"), Member("p", b"./fifo"), D(b"./empty/"),
        F(b"./..data"), F(b"./a..b"), F(b"./...")]


def test_a_normal_archive_passes() -> None:
    assert check_members(GOOD).members == len(GOOD)


def test_names_without_dot_slash_pass_too() -> None:
    assert check_members([D(b"etc/"), F(b"etc/x"), H(b"etc/y", b"etc/x")]).members == 3


@pytest.mark.parametrize("members,words", [
    ([F(b"/etc/passwd")], "absolute"),
    ([D(b"./"), F(b"//etc/cron.d/x")], "absolute"),
    ([F(b"../escape")], "'..'"),
    ([F(b"./../escape")], "'..'"),
    ([F(b"./a/../../b")], "'..'"),
    ([D(b"./a/"), F(b"./a/../b")], "'..'"),  # harmless, but sanoffload never makes it
    ([F(b"a/b/c/../../../../x")], "'..'"),
    ([F(b"..")], "'..'"),
    ([D(b"../")], "'..'"),
    # a symlink made earlier in the archive, then written through
    ([L(b"./link", b"/etc"), F(b"./link/passwd")], "through"),
    ([L(b"link", b"/tmp"), D(b"link/sub/"), F(b"link/sub/x")], "through"),
    ([L(b"./link", b"."), F(b"./link/x")], "through"),  # even one pointing inside
    ([D(b"./d/"), L(b"./d/l", b"/"), D(b"./d/l/etc/")], "through"),
    ([L(b"./a", b"/etc"), D(b"./a/"), F(b"./a/x")], "through"),  # replaced, still refused
    ([L(b"./link", b"/etc"), F(b"link//passwd")], "through"),  # spelled differently
    ([L(b"./link", b"/etc"), F(b"./link/./passwd")], "through"),
    ([F(b"./file"), F(b"./file/x")], "through"),
    ([F(b"./x"), H(b"./h", b"./x"), F(b"./h/y")], "through"),
    # hard links: only to earlier members, never out
    ([H(b"./h", b"etc/passwd")], "not an earlier member"),
    ([H(b"./h", b"/etc/passwd")], "absolute"),
    ([H(b"./h", b"../outside")], "'..'"),
    ([F(b"./x"), H(b"./h", b"./y/../x")], "'..'"),
    ([D(b"./d/"), H(b"./h", b"./d")], "not an earlier member"),
    ([H(b"./h", b"./later"), F(b"./later")], "not an earlier member"),
    ([Member("h", b"./h")], "without target"),
    # the target itself
    ([L(b"./", b"/etc")], "target itself"),
    ([F(b".")], "target itself"),
    ([L(b"", b"/")], "target itself"),
])
@pytest.mark.hostile("restore", "archive members that are absolute, hold '..', go through an "
                     "earlier symlink or file, or hard-link outside",
                     "archive refused before extraction (exit 3); nothing written")
def test_dangerous_members_are_refused(members: list[Member], words: str) -> None:
    with pytest.raises(RefusedError, match=words):
        check_members(members)


def test_refusal_names_the_member_on_one_line() -> None:
    with pytest.raises(RefusedError) as info:
        check_members([L(b"./l\nx", b"/"), F(b"./l\nx/\xffy")])
    assert "\n" not in str(info.value)
    assert "l\\nx" in str(info.value)


@pytest.mark.parametrize("path", [b"/abs", b"../up", b"a/../../b", b"", b".", b"./"])
def test_parts(path: bytes) -> None:
    if path.startswith(b"/") or b".." in path.split(b"/"):
        with pytest.raises(RefusedError):
            member_parts(path)
    else:
        assert member_parts(path) == ()


def test_selection_maps_to_archive_names() -> None:
    got = check_members(GOOD, [b"etc/app.conf", b"./a b/nl\nname", b"a b", b"\xff\xfe",
                               b"etc//"])
    assert got.selected == (b"./etc/app.conf", b"./a b/nl\nname", b"./a b", b"./\xff\xfe",
                            b"./etc")


@pytest.mark.parametrize("path,words", [
    (b"missing", "not in the backup"), (b"/etc/app.conf", "relative"), (b"../x", "'..'"),
    (b"etc/../etc/app.conf", "'..'"), (b".", "root"), (b"", "relative"),
])
def test_bad_selections(path: bytes, words: str) -> None:
    with pytest.raises(UsageError, match=words):
        check_members(GOOD, [path])


# --------------------------------------------------------------------------
# restore(): the order of checks, with a fake runner
# --------------------------------------------------------------------------

GOOD_LISTING = (b'drwxr-xr-x 0/0 0 2026-11-26 10:32 "./"\n'
                b'-rw-r--r-- 0/0 2 2026-11-26 10:32 "./a b"\n'
                b'hrw-r--r-- 0/0 0 2026-11-26 10:32 "./hard" link to "./a b"\n')
EVIL_LISTING = (b'lrwxrwxrwx 0/0 0 2026-11-26 10:32 "link" -> "/etc"\n'
                b'-rw-r--r-- 0/0 1 2026-11-26 10:32 "link/cron.d/evil"\n')


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Repository, BackupId, FakeRunner, Path]:
    runner = FakeRunner()
    repo_dir = tmp_path / "repo"
    repo_dir.mkdir()
    repo = Repository(repo_dir, runner)
    bid = repo.put("fs1", "/srv", io.BytesIO(b"pretend this is zstd"), verify=False)
    return repo, bid, runner, tmp_path


def test_restore_lists_checks_then_extracts(setup: tuple[Repository, BackupId, FakeRunner,
                                                         Path]) -> None:
    repo, bid, runner, tmp = setup
    runner.on("tar", "--list", stdout=GOOD_LISTING)
    runner.on("tar", "--extract")
    done = restore(repo, bid, tmp / "new" / "target")
    assert done.members == 3 and done.selected == ()
    assert [a[:2] for a in runner.argvs()] == [["tar", "--list"], ["tar", "--extract"]]
    extract = runner.argvs()[1]
    assert f"--file={repo.archive_path(bid)}" in extract
    # tar gets the private staging directory by descriptor, never the target's path
    assert any(a.startswith("--directory=/proc/self/fd/") for a in extract)
    assert not any(a.startswith("--files-from") for a in extract)
    assert (tmp / "new" / "target").is_dir()
    assert os.listdir(tmp / "new" / "target") == []  # the fake extracted nothing
    assert (tmp / "new" / "target").stat().st_mode & 0o777 == 0o700


def test_restore_of_selected_paths_passes_them_as_a_nul_list(
        setup: tuple[Repository, BackupId, FakeRunner, Path]) -> None:
    repo, bid, runner, tmp = setup
    seen: list[bytes] = []

    def grab(argv: list[str]) -> None:
        sel = next(a for a in argv if a.startswith("--files-from="))
        seen.append(Path(sel.partition("=")[2]).read_bytes())

    runner.on("tar", "--list", stdout=GOOD_LISTING)
    runner.on("tar", "--extract", action=grab)
    done = restore(repo, bid, tmp / "t", ["hard", b"a b"])
    assert seen == [b"./hard\0./a b\0"]
    assert done.selected == (b"./hard", b"./a b")


def test_corrupt_archive_is_refused_before_anything_is_extracted(
        setup: tuple[Repository, BackupId, FakeRunner, Path]) -> None:
    repo, bid, runner, tmp = setup
    path = repo.archive_path(bid)
    os.chmod(path, 0o640)
    data = bytearray(path.read_bytes())
    data[3] ^= 0x40
    path.write_bytes(bytes(data))
    (tmp / "empty").mkdir()
    with pytest.raises(IntegrityError, match="sha256"):
        restore(repo, bid, tmp / "empty")
    with pytest.raises(IntegrityError):
        restore(repo, bid, tmp / "absent")
    with pytest.raises(IntegrityError):
        stream_out(repo, bid, io.BytesIO())
    # one read hashes and lists (tar --list reads a pipe); nothing is ever extracted
    assert runner.calls and not runner.called("tar", "--extract")
    assert all("--list" in call.argv for call in runner.calls), runner.calls
    assert list((tmp / "empty").iterdir()) == [] and not (tmp / "absent").exists()


def test_malicious_listing_is_refused_and_nothing_is_extracted(
        setup: tuple[Repository, BackupId, FakeRunner, Path]) -> None:
    repo, bid, runner, tmp = setup
    runner.on("tar", "--list", stdout=EVIL_LISTING)
    with pytest.raises(RefusedError, match="through"):
        restore(repo, bid, tmp / "t")
    assert not runner.called("tar", "--extract")
    assert not (tmp / "t").exists()


def test_unparseable_listing_is_refused(setup: tuple[Repository, BackupId, FakeRunner,
                                                     Path]) -> None:
    repo, bid, runner, tmp = setup
    runner.on("tar", "--list",
              stdout=b'Vrw 0/0 0 2026-11-26 10:32 "x" --Volume Header--\n')
    with pytest.raises(RefusedError, match="listing line 1"):
        restore(repo, bid, tmp / "t")
    assert not runner.called("tar", "--extract")


def test_unreadable_archive_is_an_integrity_error(
        setup: tuple[Repository, BackupId, FakeRunner, Path]) -> None:
    repo, bid, runner, tmp = setup
    runner.on("tar", "--list", returncode=2, stderr="tar: Unexpected EOF in archive")
    with pytest.raises(IntegrityError, match="Unexpected EOF"):
        restore(repo, bid, tmp / "t")
    assert not (tmp / "t").exists()


def test_non_empty_target_needs_force(setup: tuple[Repository, BackupId, FakeRunner,
                                                   Path]) -> None:
    repo, bid, runner, tmp = setup
    target = tmp / "busy"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(RefusedError, match="not empty"):
        restore(repo, bid, target)
    assert runner.calls == []
    runner.on("tar", "--list", stdout=GOOD_LISTING)
    runner.on("tar", "--extract", returncode=2, stderr="tar: ./a b: Cannot open: No space")
    with pytest.raises(CommandError):
        restore(repo, bid, target, force=True)
    # a failed --force restore does not empty what was there before
    assert (target / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("kind", ["file", "symlink"])
def test_target_must_be_a_directory(setup: tuple[Repository, BackupId, FakeRunner, Path],
                                    kind: str) -> None:
    repo, bid, runner, tmp = setup
    target = tmp / "t"
    if kind == "file":
        target.write_text("x")
    else:
        (tmp / "real").mkdir()
        target.symlink_to(tmp / "real")
    with pytest.raises(RefusedError, match="not a directory"):
        restore(repo, bid, target)
    assert runner.calls == []


def test_target_inside_the_repository_is_refused(
        setup: tuple[Repository, BackupId, FakeRunner, Path]) -> None:
    repo, bid, runner, tmp = setup
    for target in (repo.root, repo.root / "fs1" / "x", tmp / "repo" / "new"):
        with pytest.raises(RefusedError, match="inside the repository"):
            restore(repo, bid, target)
    assert runner.calls == []


def test_failed_extraction_into_an_empty_target_leaves_it_empty(
        setup: tuple[Repository, BackupId, FakeRunner, Path]) -> None:
    repo, bid, runner, tmp = setup

    def half(argv: list[str]) -> None:
        target = Path(next(a for a in argv if a.startswith("--directory="))[12:])
        assert target.parent == Path("/proc/self/fd")
        (target / "a b").write_text("half")
        (target / "sub").mkdir()
        (target / "sub" / "x").write_text("half")
        (target / "sub" / "ln").symlink_to(tmp / "outside")

    (tmp / "outside").mkdir()
    (tmp / "outside" / "precious").write_text("keep")
    runner.on("tar", "--list", stdout=GOOD_LISTING)
    runner.on("tar", "--extract", returncode=2, stderr="tar: Error is not recoverable",
              action=half)
    (tmp / "empty").mkdir()
    with pytest.raises(CommandError):
        restore(repo, bid, tmp / "empty")
    assert list((tmp / "empty").iterdir()) == []
    with pytest.raises(CommandError):
        restore(repo, bid, tmp / "absent")
    assert not (tmp / "absent").exists()
    assert (tmp / "outside" / "precious").read_text() == "keep"


def test_stream_out_sends_the_checked_archive(setup: tuple[Repository, BackupId, FakeRunner,
                                                           Path]) -> None:
    repo, bid, runner, _ = setup
    out = io.BytesIO()
    stream_out(repo, bid, out)
    assert out.getvalue() == b"pretend this is zstd"
    assert runner.calls == []


def test_unknown_backup(setup: tuple[Repository, BackupId, FakeRunner, Path]) -> None:
    repo, bid, _, tmp = setup
    with pytest.raises(UsageError, match="no such backup"):
        restore(repo, BackupId(bid.host, bid.slug, "20200101T000000Z"), tmp / "t")
    with pytest.raises(RefusedError):
        restore(repo, "fs1/../x", tmp / "t")


def test_selected_hard_links_bring_the_member_holding_their_data() -> None:
    members = [D(b"./"), F(b"./a"), D(b"./dir/"), H(b"./dir/b", b"./a"), H(b"./c", b"./a"),
               F(b"./dir/x"), H(b"./dir/y", b"./dir/x")]
    got = check_members(members, [b"dir"])
    assert got.selected == (b"./dir",)
    # ./dir/y links to ./dir/x, inside the selection: nothing more needed
    assert got.link_targets == (b"./a",)
    assert got.names == (b"./dir", b"./a")
    assert check_members(members, [b"a"]).link_targets == ()
    assert check_members(members, [b"c", b"dir/b"]).link_targets == (b"./a",)
    assert check_members(members, [b"dir/y"]).link_targets == (b"./dir/x",)
    assert check_members(members).link_targets == ()
