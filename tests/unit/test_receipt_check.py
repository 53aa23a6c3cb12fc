"""The store's test-read while the archive arrives (one pass), with this machine's tar and zstd."""

from __future__ import annotations

import io
import os
import subprocess
from pathlib import Path

import pytest

from sanoffload.errors import IntegrityError
from sanoffload.runner import CommandRunner
from sanoffload.store.repo import CHUNK, Repository
from sanoffload.tools import tar
from tests.unit.conftest import make_archive

pytestmark = pytest.mark.unit


class Counted(io.RawIOBase):
    """A stream that remembers how much of it was read."""

    def __init__(self, data: bytes) -> None:
        self._f = io.BytesIO(data)
        self.read_bytes = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buf: memoryview) -> int:  # type: ignore[override]
        n = self._f.readinto(buf)
        self.read_bytes += n
        return n


def leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_the_count_comes_from_the_bytes_as_they_arrive(tmp_path: Path, tree: Path) -> None:
    data = make_archive(tree)
    (tmp_path / "repo").mkdir()
    repo = Repository(tmp_path / "repo", CommandRunner())
    bid = repo.put("fs1", "/srv/data", io.BytesIO(data))
    listed = subprocess.run(["tar", "--list", "--zstd", "-f", str(repo.archive_path(bid))],
                            capture_output=True, check=True).stdout
    m = repo.get(bid).manifest
    assert m.member_count == listed.count(b"\n") == 4
    assert m.verification is not None and m.verification.detail == "on receipt"
    # verify reads the file once: hash and listing together, and agrees
    assert repo.verify(bid).manifest.verification.ok  # type: ignore[union-attr]


@pytest.mark.hostile("store", "50 MiB that are not an archive, sent to put",
                     "refused (exit 12) long before the end is received; nothing left")
def test_garbage_is_refused_early_not_after_the_whole_upload(tmp_path: Path) -> None:
    (tmp_path / "repo").mkdir()
    repo = Repository(tmp_path / "repo", CommandRunner())
    stream = Counted(os.urandom(50 * CHUNK))
    with pytest.raises(IntegrityError) as info:
        repo.put("fs1", "/srv/data", stream)
    assert info.value.exit_code == 12
    # at most the check's queue (and a chunk or two in flight) ahead of tar
    assert stream.read_bytes < (tar.StreamCount.QUEUED + 8) * CHUNK, \
        "the damage was found only after most of the upload"
    assert leftovers(tmp_path / "repo") == []


@pytest.mark.hostile("store", "a valid archive followed by more zstd data after tar's end",
                     "refused (exit 12): bytes no restore would read are not stored as part "
                     "of a backup")
def test_bytes_after_the_end_of_the_archive_are_refused(tmp_path: Path, tree: Path) -> None:
    (tmp_path / "repo").mkdir()
    repo = Repository(tmp_path / "repo", CommandRunner())
    tail = subprocess.run(["zstd", "-q", "-c"], input=os.urandom(4 * CHUNK),
                          capture_output=True, check=True).stdout
    with pytest.raises(IntegrityError, match="after its end-of-archive|cannot be read back"):
        repo.put("fs1", "/srv/data", io.BytesIO(make_archive(tree) + tail))
    assert leftovers(tmp_path / "repo") == []


@pytest.mark.hostile("store", "a real archive with one byte flipped near its end (checksum)",
                     "refused (exit 12) by the frame checksum; nothing left")
def test_a_flipped_byte_is_caught_by_the_one_decode(tmp_path: Path, tree: Path) -> None:
    (tmp_path / "repo").mkdir()
    repo = Repository(tmp_path / "repo", CommandRunner())
    data = bytearray(make_archive(tree))
    data[-2] ^= 0x40  # inside the content checksum: only a full decode notices
    with pytest.raises(IntegrityError, match="checksum"):
        repo.put("fs1", "/srv/data", io.BytesIO(bytes(data)))
    assert leftovers(tmp_path / "repo") == []


def test_an_abandoned_check_leaves_no_process(tmp_path: Path, tree: Path) -> None:
    count = tar.StreamCount(CommandRunner(), timeout=60)
    count.feed(make_archive(tree)[:100])
    pid = count._pipe.procs[0].pid  # type: ignore[attr-defined]
    count.abort()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
