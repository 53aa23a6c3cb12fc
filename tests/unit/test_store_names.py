"""Names that reach the repository's filesystem: every escape attempt is refused."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sanoffload.errors import RefusedError
from sanoffload.store.repo import (
    BackupId,
    Repository,
    check_host,
    check_slug,
    check_timestamp,
    slug_for_path,
)

pytestmark = pytest.mark.unit

TS = "20261126T102933Z"

#: refused as a host name and as a slug alike
BAD_NAMES = [
    "", ".", "..", "...", "../x", "x/..", "a/b", "/abs", "/", "\\", "a\\b", ".hidden", "-rf",
    "--repo", "_x", "a..b", "fs1.", "fs1\n", "\nfs1", "fs1\0", "fs1 ", " fs1", "fs 1", "fs1\t",
    "ｆｓ1", "fs1\u200b", "fś1", "fs1:22", "fs1;rm", "fs1*", "fs1?", "~root", "$HOME", "a%2fb",
    "fs1.partial", "x" * 101,
]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_host_names_and_slugs_are_refused(name: str) -> None:
    with pytest.raises(RefusedError):
        check_host(name)
    with pytest.raises(RefusedError):
        check_slug(name)


@pytest.mark.parametrize("name", [None, 1, b"fs1", ["fs1"]])
def test_non_strings_are_refused(name: object) -> None:
    with pytest.raises(RefusedError):
        check_host(name)
    with pytest.raises(RefusedError):
        check_slug(name)
    with pytest.raises(RefusedError):
        check_timestamp(name)


@pytest.mark.parametrize("name", ["fs1", "FS1", "fs1.example.org", "a", "db-01_b", "x" * 63,
                                  "1"])
def test_good_host_names(name: str) -> None:
    assert check_host(name) == name


def test_length_limits() -> None:
    with pytest.raises(RefusedError):
        check_host("x" * 64)
    assert check_slug("s" * 100) == "s" * 100
    with pytest.raises(RefusedError):
        check_slug("s" * 101)


@pytest.mark.parametrize("ts", [
    "", "20261126T102933z", "20261126t102933Z", "20261126T102933", "2026-11-26T10:29:33Z",
    "20261126T102933Z\n", "20261126T102933Z ", " 20261126T102933Z", "../20261126T102933Z",
    "20261126T102933Z/..", "20261326T102933Z", "20260230T102933Z", "20261126T246000Z",
    "20261126T106033Z", "٢٠٢٦١١٢٦T102933Z", "20261126T1029331Z", "2026112T102933Z",
    "20261126T102933Z.tar.zst",
])
def test_bad_timestamps_are_refused(ts: str) -> None:
    with pytest.raises(RefusedError):
        check_timestamp(ts)


def test_good_timestamps() -> None:
    assert check_timestamp(TS) == TS
    assert check_timestamp("20240229T235959Z")  # a leap day


@pytest.mark.parametrize("text", [
    "fs1/slug", "fs1/slug/20261126T102933Z/x", "fs1//20261126T102933Z",
    "../slug/20261126T102933Z", "fs1/../20261126T102933Z", "fs1/slug/..", "/fs1/slug/" + TS,
    "fs1/slug/" + TS + "/", "fs1/.slug/" + TS, "fs1\\slug\\" + TS, "",
])
def test_bad_backup_ids_are_refused(text: str) -> None:
    with pytest.raises(RefusedError):
        BackupId.parse(text)


def test_backup_id_round_trip() -> None:
    bid = BackupId.parse(f"fs1/srv-data-1a2b3c4d/{TS}")
    assert (bid.host, bid.slug, bid.timestamp) == ("fs1", "srv-data-1a2b3c4d", TS)
    assert str(bid) == f"fs1/srv-data-1a2b3c4d/{TS}"
    assert bid.time.isoformat() == "2026-11-26T10:29:33+00:00"


@pytest.mark.parametrize("path", [
    "/srv/data", "/", "/srv-data", "/srv/data/", "/a b/c d", "/données/été", "/../../etc",
    "/.hidden", "/" + "x" * 300, "/-rf", "/a..b", "/srv/data.partial",
])
def test_slugs_of_any_absolute_path_are_valid(path: str) -> None:
    assert check_slug(slug_for_path(path)) == slug_for_path(path)


def test_slugs_are_readable_and_never_shared() -> None:
    assert slug_for_path("/srv/data").startswith("srv-data-")
    assert slug_for_path("/").startswith("root-")
    assert slug_for_path("/srv/data") != slug_for_path("/srv-data")
    assert slug_for_path("/srv/data") != slug_for_path("/srv/data/")
    assert slug_for_path("/srv/data") == slug_for_path("/srv/data")


@pytest.mark.parametrize("path", ["srv/data", "", "relative", "/a\0b", "/a\nb", "/\x1b[2Jx",
                                  "/\u202ex", "/" + "x" * 4096])
def test_slug_needs_an_absolute_path_without_control_characters(path: str) -> None:
    with pytest.raises(RefusedError):
        slug_for_path(path)


def test_nothing_accepted_lands_outside_the_repository(tmp_path: Path) -> None:
    repo = Repository(tmp_path)
    root = os.path.realpath(tmp_path)
    for host in ["fs1", "a.b", "x" * 63]:
        for slug in ["s", slug_for_path("/../../etc")]:
            bid = BackupId(host, slug, TS)
            for p in (repo.archive_path(bid), repo.manifest_path(bid)):
                assert os.path.realpath(p).startswith(root + os.sep)
                assert os.path.dirname(os.path.dirname(os.path.dirname(p))) == root


def test_writer_refuses_bad_names_before_touching_the_disk(tmp_path: Path) -> None:
    repo = Repository(tmp_path)
    for host, path, slug in [("../x", "/srv", None), ("fs1", "/srv", "../x"),
                             ("fs1", "relative", None), ("fs1", "/srv", ".x")]:
        with pytest.raises(RefusedError):
            repo.writer(host, path, slug=slug)
    with pytest.raises(RefusedError):
        repo.writer("fs1", "/srv", timestamp="../../x")
    assert list(tmp_path.iterdir()) == []
