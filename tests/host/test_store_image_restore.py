"""Image backups with real block devices, as root: a real ext4 on a loop device is stored
as 4 MiB chunks and restored to a file and to another loop device, bit for bit.

The volume is read in Python as the proxy does (4 MiB at volume offsets, sha256,
zero pieces marked, zstd through encode_chunk); the store side is the real
LocalImageSink, verify_image and restore_image. ``e2fsck -fn`` checks the restored
filesystem; a mounted or smaller target device is refused.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from sanoffload.errors import IntegrityError, RefusedError
from sanoffload.runner import Runner
from sanoffload.store.chunks import encode_chunk, is_zero
from sanoffload.store.image import LocalImageSink, load_map, restore_image, verify_image
from sanoffload.store.imagemap import ZERO, ChunkMap
from sanoffload.store.repo import Repository
from tests.host.conftest import LoopFs, destroy_loopfs, make_loopfs

pytestmark = pytest.mark.host

MIB = 1 << 20


@pytest.fixture
def work(host_runner: Runner) -> Iterator[tuple[Path, LoopFs]]:
    """A 64 MiB ext4 on a loop device with some files, unmounted (the device stays)."""
    workdir = Path(tempfile.mkdtemp(prefix="sanoffload-image-", dir="/var/tmp"))
    fs = make_loopfs(host_runner, "ext4", workdir, size_mb=64)
    try:
        (fs.mountpoint / "data").write_bytes(os.urandom(5 * MIB))
        (fs.mountpoint / "text").write_bytes(b"an image backup\n" * 100_000)
        host_runner.run(["umount", str(fs.mountpoint)])
        yield workdir, fs
    finally:
        destroy_loopfs(host_runner, fs)
        for p in sorted(workdir.rglob("*"), reverse=True):
            p.rmdir() if p.is_dir() else p.unlink()
        workdir.rmdir()


def _loop(runner: Runner, path: Path, size: int) -> str:
    with open(path, "wb") as f:
        f.truncate(size)
    return runner.run(["losetup", "--find", "--show", str(path)]).stdout.strip()


def _back_up(repo: Repository, device: str) -> str:
    fd = os.open(device, os.O_RDONLY)
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        chunk_map = ChunkMap.zeros(size)
        changes: dict[int, bytes] = {}
        with LocalImageSink(repo, "px1", "fs1", "/srv/thin",
                            {"frozen_at": "2026-11-26T10:29:33Z"}) as sink:
            for i in range(chunk_map.count):
                off, length = chunk_map.span(i)
                piece = os.pread(fd, length, off)
                if is_zero(piece):
                    changes[i] = ZERO
                    continue
                digest = hashlib.sha256(piece).digest()
                changes[i] = digest
                if sink.missing([digest.hex()]):
                    sink.put_chunk(digest.hex(), *encode_chunk(piece), length)
            done = sink.commit(chunk_map.merged(changes), {"image": {"fstype": "ext4",
                                                                    "read_bytes": size}})
    finally:
        os.close(fd)
    return str(done["id"])


def _sha(path: str | Path, size: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        left = size
        while left:
            block = f.read(min(left, 4 * MIB))
            assert block
            h.update(block)
            left -= len(block)
    return h.hexdigest()


def test_restore_to_a_file_and_to_a_loop_device(work: tuple[Path, LoopFs],
                                                host_runner: Runner) -> None:
    workdir, fs = work
    (workdir / "repo").mkdir()
    repo = Repository(workdir / "repo")
    bid = _back_up(repo, fs.device)
    size = 64 * MIB
    want = _sha(fs.device, size)
    verify_image(repo, repo.get(bid))

    image = workdir / "restored.img"
    done = restore_image(repo, bid, image, jobs=4)
    assert _sha(image, size) == want and image.stat().st_size == size
    assert image.stat().st_blocks * 512 < size  # the empty parts are holes
    assert done.zero_chunks > 0
    host_runner.run(["e2fsck", "-fn", str(image)])

    # a device bigger than the image, holding old data where the image has zeros
    target = workdir / "target.img"
    dev = _loop(host_runner, target, size + MIB)
    try:
        with open(dev, "r+b") as f:
            f.write(b"\xff" * (size + MIB))
        assert restore_image(repo, bid, dev).device
        assert _sha(dev, size) == want
        host_runner.run(["e2fsck", "-fn", dev])
    finally:
        host_runner.run(["losetup", "-d", dev])

    small = workdir / "small.img"
    sdev = _loop(host_runner, small, size - MIB)
    try:
        with pytest.raises(RefusedError, match="needs"):
            restore_image(repo, bid, sdev)
    finally:
        host_runner.run(["losetup", "-d", sdev])


@pytest.mark.hostile("store", "an image restore onto a mounted block device",
                     "refused (exit 3): O_EXCL finds it busy; nothing written")
def test_restore_refuses_a_mounted_device(work: tuple[Path, LoopFs],
                                          host_runner: Runner) -> None:
    workdir, fs = work
    (workdir / "repo").mkdir()
    repo = Repository(workdir / "repo")
    bid = _back_up(repo, fs.device)
    host_runner.run(["mount", fs.device, str(fs.mountpoint)])
    with pytest.raises(RefusedError, match="in use"):
        restore_image(repo, bid, fs.device)
    # (the mount itself changes the superblock: the files say nothing was written)
    assert (fs.mountpoint / "text").read_bytes() == b"an image backup\n" * 100_000
    host_runner.run(["umount", str(fs.mountpoint)])
    host_runner.run(["e2fsck", "-fn", fs.device])


@pytest.mark.hostile("store", "one flipped byte in a stored zstd chunk of a real volume",
                     "verify and restore fail naming the backup and the chunk; no image "
                     "written as if whole")
def test_verify_finds_a_flipped_byte(work: tuple[Path, LoopFs]) -> None:
    workdir, fs = work
    (workdir / "repo").mkdir()
    repo = Repository(workdir / "repo")
    bid = _back_up(repo, fs.device)
    backup = repo.get(bid)
    cid = sorted(load_map(repo, backup).referenced())[-1]
    path = repo.chunks.path(cid)
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    path.write_bytes(bytes(blob))
    with pytest.raises(IntegrityError, match=f"{bid}.*{cid}"):
        verify_image(repo, backup)
    with pytest.raises(IntegrityError, match=cid):
        restore_image(repo, bid, workdir / "out.img")
    assert not (workdir / "out.img").exists()  # a file it made is not left half-written
