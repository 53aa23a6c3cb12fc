"""tools/tar.py and tools/zstd.py: the exact command lines, and tar's verbose listing parsed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sanoffload.errors import CommandError
from sanoffload.testing import FakeRunner
from sanoffload.tools import tar, zstd
from sanoffload.tools.tar import Member, parse_list_line

pytestmark = pytest.mark.unit

#: real output of GNU tar 1.34 (tar --list --verbose --numeric-owner --quoting-style=c
#: --zstd --file=a.tar.zst --index-file=LISTING) for a tree with every kind of entry
REAL_LISTING = rb'''drwxr-xr-x 0/0               0 2026-11-26 10:32 "./"
-rw-r--r-- 0/0        67108869 2026-11-26 10:32 "./sparse"
-rw-r--r-- 0/0               1 2026-11-26 10:32 "./nl\nname"
-rw-r--r-- 0/0               2 2026-11-26 10:32 "./a b"
drwxr-xr-x 0/0               0 2026-11-26 10:32 "./empty/"
lrwxrwxrwx 0/0               0 2026-11-26 10:32 "./l -> x" -> "a b"
hrw-r--r-- 0/0               0 2026-11-26 10:32 "./hard" link to "./a b"
drwxrwxr-x 0/0               0 2026-11-26 10:32 "./d/"
-rw-r--r-- 0/0               1 2026-11-26 10:32 "./\377\376"
crw-r--r-- 0/0             1,3 1970-01-01 00:00 "dev"
prw-r--r-- 0/0               0 1970-01-01 00:00 "fifo"
'''


def test_create_argv_is_exactly_what_the_proxy_runs() -> None:
    assert tar.create_argv("/mnt/dup/srv/data") == [
        "tar", "--create", "--file=-", "--directory=/mnt/dup/srv/data", "--format=posix",
        "--numeric-owner", "--xattrs", "--xattrs-include=*", "--acls", "--sparse", "--", "."]
    assert tar.create_argv("/mnt/dup/srv", "-odd name")[-2:] == ["--", "-odd name"]
    for bad in ("a/b", "..", ""):
        with pytest.raises(ValueError):
            tar.create_argv("/mnt/dup", bad)
    assert zstd.compress_argv() == ["zstd", "-T0", "-q", "-c", "--check"]
    assert zstd.compress_argv(level=9, threads=4) == ["zstd", "-T4", "-q", "-c", "--check", "-9"]
    with pytest.raises(ValueError):
        zstd.compress_argv(level=22)
    assert zstd.decompress_argv() == ["zstd", "-d", "-q", "-c", "-"]
    assert zstd.decompress_argv("/r/a.tar.zst") == ["zstd", "-d", "-q", "-c", "--", "/r/a.tar.zst"]


def test_extract_argv_restores_everything_and_never_absolute_names() -> None:
    argv = tar.extract_argv("/restore", "/r/a.tar.zst")
    assert argv == [
        "tar", "--extract", "--force-local", "--zstd", "--file=/r/a.tar.zst",
        "--directory=/restore", "--numeric-owner", "--same-owner", "--preserve-permissions",
        "--xattrs", "--xattrs-include=*", "--acls", "--delay-directory-restore"]
    selected = tar.extract_argv("/restore", files_from="/tmp/sel", zstd=False)
    assert selected[:3] == ["tar", "--extract", "--force-local"] and "--zstd" not in selected
    assert "--file=-" in selected
    # position-sensitive: the naming options come before the list they apply to
    assert selected[-6:] == ["--no-wildcards", "--anchored", "--null", "--verbatim-files-from",
                             "--no-unquote", "--files-from=/tmp/sel"]
    for a in (argv, selected):
        assert not {"--absolute-names", "-P", "--overwrite", "--keep-directory-symlink",
                    "--dereference", "-h"} & set(a)


def test_list_argv() -> None:
    assert tar.list_argv("/r/a:b.tar.zst") == [
        "tar", "--list", "--verbose", "--numeric-owner", "--quoting-style=c", "--force-local",
        "--zstd", "--file=/r/a:b.tar.zst"]
    assert tar.list_argv("/r/a:b.tar.zst", "/tmp/l")[-1] == "--index-file=/tmp/l"
    assert tar.list_argv("/r/a", "/tmp/l", verbose=False)[:3] == ["tar", "--list",
                                                                  "--quoting-style=c"]


def test_real_listing_parses() -> None:
    members = [parse_list_line(line) for line in REAL_LISTING.splitlines(keepends=True)]
    assert members == [
        Member("d", b"./"), Member("-", b"./sparse"), Member("-", b"./nl\nname"),
        Member("-", b"./a b"), Member("d", b"./empty/"), Member("l", b"./l -> x", b"a b"),
        Member("h", b"./hard", b"./a b"), Member("d", b"./d/"), Member("-", b"./\xff\xfe"),
        Member("c", b"dev"), Member("p", b"fifo")]


@pytest.mark.parametrize("quoted,raw", [
    (rb'"a\"b"', b'a"b'), (rb'"a\\b"', b"a\\b"), (rb'"\t\r\v\f\a\b"', b"\t\r\v\f\a\b"),
    (rb'"\001\0\12"', b"\x01\x00\n"), (rb'"a -> b"', b"a -> b"),
    (rb'"x link to y"', b"x link to y"),
    (rb'"\?"', b"?"), (b'"\xc3\xa9t\xc3\xa9"', "été".encode()), (rb'""', b""),
])
def test_c_quoting_is_undone_byte_for_byte(quoted: bytes, raw: bytes) -> None:
    line = b"-rw-r--r-- 0/0 1 2026-11-26 10:32 " + quoted + b"\n"
    assert parse_list_line(line) == Member("-", raw)


def test_tricky_links() -> None:
    line = rb'lrwxrwxrwx 0/0 0 2026-11-26 10:32 "a\" -> \"b" -> "c -> d"'
    assert parse_list_line(line) == Member("l", b'a" -> "b', b"c -> d")
    line = rb'hrw-r--r-- 0/0 0 2026-11-26 10:32 "h link to x" link to "x link to y"'
    assert parse_list_line(line) == Member("h", b"h link to x", b"x link to y")


@pytest.mark.parametrize("line", [
    b"", b"garbage\n", b'"./a"\n',  # non-verbose
    rb'-rw-r--r-- 0/0 1 2026-11-26 10:32 "./a',  # unterminated
    rb'-rw-r--r-- 0/0 1 2026-11-26 10:32 "./a" trailing',
    rb'-rw-r--r-- 0/0 1 2026-11-26 10:32 "./a\q"',  # unknown escape
    rb'-rw-r--r-- 0/0 1 2026-11-26 10:32 "./a\777"',  # octal out of range
    rb'lrwxrwxrwx 0/0 0 2026-11-26 10:32 "./l"',  # symlink without target
    rb'hrw-r--r-- 0/0 0 2026-11-26 10:32 "./h" -> "x"',
    rb'-rw-r--r-- 0/0 1 2026-11-26 10:32 "./a" -> "x"',
    rb'Vrw-r--r-- 0/0 0 2026-11-26 10:32 "label" --Volume Header--',
    rb'Mrw-r--r-- 0/0 0 2026-11-26 10:32 "./a" --Continued at byte 10--',
    rb'?rw-r--r-- 0/0 0 2026-11-26 10:32 "./a" unknown file type',
    rb'-rw 1 "./a"',
])
def test_anything_else_in_a_listing_is_refused(line: bytes) -> None:
    with pytest.raises(ValueError):
        parse_list_line(line)


def test_list_members_reads_tars_stdout_and_parses_it() -> None:
    runner = FakeRunner().on("tar", "--list", stdout=REAL_LISTING)
    members = list(tar.list_members(runner, "/r/a.tar.zst", timeout=77))
    assert len(members) == 11 and members[5] == Member("l", b"./l -> x", b"a b")
    call = runner.calls[0]
    assert call.argv == tar.list_argv("/r/a.tar.zst") and call.timeout == 77
    assert not any(a.startswith("--index-file") for a in call.argv)


def test_list_members_names_the_bad_line() -> None:
    bad_line = b'Vrw 0/0 0 2026 x "v\x1b[2J" --Volume Header--\n'
    runner = FakeRunner().on("tar", "--list", stdout=REAL_LISTING + bad_line)
    with pytest.raises(ValueError, match="listing line 12") as info:
        list(tar.list_members(runner, "/r/a", timeout=9))
    assert "\x1b" not in str(info.value)


@pytest.mark.hostile("store", "the member listing cut short: tar fails after part of it",
                     "the listing fails (CommandError with tar's reason), never a short list")
@pytest.mark.parametrize("cut", [len(REAL_LISTING) // 2, len(REAL_LISTING) - 1,
                                 REAL_LISTING.index(b"\n") + 1])
def test_list_members_fails_when_tar_fails_after_partial_output(cut: int) -> None:
    runner = FakeRunner().on("tar", "--list", stdout=REAL_LISTING[:cut], returncode=2,
                             stderr="tar: Unexpected EOF in archive\n"
                                    "tar: Error is not recoverable: exiting now\n")
    got: list[Member] = []
    with pytest.raises(CommandError, match="Unexpected EOF in archive"):
        for member in tar.list_members(runner, "/r/a", timeout=9):
            got.append(member)
    assert 0 < len(got) < 11
    with pytest.raises(CommandError, match="Unexpected EOF"):
        tar.count_members(runner, "/r/a", timeout=9)


@pytest.mark.hostile("store", "a member listing whose last line lacks its end, or a line of "
                     "megabytes", "the listing fails naming the line; nothing held in memory")
def test_a_cut_or_endless_line_is_refused_even_if_tar_says_ok() -> None:
    runner = FakeRunner().on("tar", "--list", stdout=REAL_LISTING[:-1])
    with pytest.raises(ValueError, match="listing line 11: cut short"):
        list(tar.list_members(runner, "/r/a", timeout=9))
    with pytest.raises(CommandError, match="cut short after 10 members"):
        tar.count_members(runner, "/r/a", timeout=9)
    runner = FakeRunner().on("tar", "--list",
                             stdout=b'-rw 0/0 1 2026-11-26 10:32 "' + b"a" * (tar.MAX_LINE + 5))
    with pytest.raises(ValueError, match="listing line 1: longer than"):
        list(tar.list_members(runner, "/r/a", timeout=9))


def test_count_members_counts_a_non_verbose_listing() -> None:
    runner = FakeRunner().on("tar", "--list", stdout=b'"./"\n"./a\\nb"\n"./c"\n')
    assert tar.count_members(runner, "/r/a", timeout=5) == 3
    assert runner.calls[0].argv == tar.list_argv("/r/a", verbose=False)
    assert tar.count_members(FakeRunner().on("tar"), "/r/a", timeout=5) == 0


def test_stopping_early_kills_the_listing() -> None:
    runner = FakeRunner().on("tar", "--list", stdout=REAL_LISTING)
    members = tar.list_members(runner, "/r/a", timeout=9)
    assert next(members) == Member("d", b"./")
    members.close()  # e.g. the member check refused the archive


def test_bytes_paths_in_tar_argv_round_trip() -> None:
    argv = tar.extract_argv(b"/t\xff", b"/r/a\xfe.tar.zst", files_from=b"/s\xfd")
    assert [os.fsencode(a) for a in argv if a.startswith(("--directory", "--file"))] == [
        b"--file=/r/a\xfe.tar.zst", b"--directory=/t\xff", b"--files-from=/s\xfd"]


def test_files_from_is_nul_separated_bytes(tmp_path: Path) -> None:
    p = tmp_path / "sel"
    tar.write_files_from(p, [b"./a b", b"./nl\nname", b"./\xff", b"./-rf"])
    assert p.read_bytes() == b"./a b\0./nl\nname\0./\xff\0./-rf\0"
    with pytest.raises(ValueError):
        tar.write_files_from(p, [b"a\0b"])


def test_zstd_check_runs_through_the_runner() -> None:
    runner = FakeRunner().on("zstd", "-t", returncode=1, stderr="Decoding error (36)")
    with pytest.raises(CommandError, match="Decoding error"):
        zstd.check(runner, "/r/a.tar.zst", timeout=99)
    assert runner.argvs() == [["zstd", "-t", "-q", "--", "/r/a.tar.zst"]]
    assert runner.calls[0].timeout == 99


def test_zstd_takes_bytes_paths() -> None:
    assert [os.fsencode(a) for a in zstd.decompress_argv(b"/r/a\xff.zst")][-1] == b"/r/a\xff.zst"
    runner = FakeRunner().on("zstd", "-t")
    zstd.check(runner, b"/r/a\xff.zst", timeout=5)
    assert os.fsencode(runner.argvs()[0][-1]) == b"/r/a\xff.zst"
