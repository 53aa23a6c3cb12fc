"""``sanoffload mount`` for real: an ext4 image stored as chunks, served by the FUSE server,
attached to a loop device and mounted read-only; then undone, leaving nothing.

Root on this machine: /dev/fuse, loop devices, mkfs.ext4, mount. The image is
built with ``mkfs.ext4 -d`` from a directory of known files and cut into chunks
as a backup would (zero pieces marked, the rest put into a real ChunkStore).
The mounts' private directories live in tmp_path, not /run.
"""

from __future__ import annotations

import errno
import glob
import os
import random
from pathlib import Path

import pytest

from sanoffload.errors import RefusedError
from sanoffload.runner import Runner
from sanoffload.store import mount as imount
from sanoffload.store.chunks import ChunkStore, is_zero
from sanoffload.store.imagemap import ZERO, ChunkMap

pytestmark = pytest.mark.host

CS = 4 << 20


def store_image(store: ChunkStore, image: Path) -> ChunkMap:
    """Cut ``image`` into 4 MiB chunks into ``store``: its map."""
    data = image.read_bytes()
    changes: dict[int, bytes] = {}
    for i, off in enumerate(range(0, len(data), CS)):
        piece = data[off:off + CS]
        changes[i] = ZERO if is_zero(piece) else bytes.fromhex(store.put(piece))
    return ChunkMap.zeros(len(data), CS).merged(changes)


@pytest.fixture
def files() -> dict[str, bytes]:
    rng = random.Random(13)
    return {"hello.txt": b"hello from an image backup\n",
            "big.bin": rng.randbytes(9 << 20),  # spans several chunks
            "sub/deep/notes.txt": "ünïcode\n".encode() * 1000}


@pytest.fixture
def stored(tmp_path: Path, host_runner: Runner, files: dict[str, bytes]) -> tuple[Path, ChunkMap]:
    src = tmp_path / "src"
    for name, data in files.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(data)
    image = tmp_path / "volume.img"
    with open(image, "wb") as f:
        f.truncate(48 << 20)
    host_runner.run(["mkfs.ext4", "-q", "-F", "-d", str(src), str(image)])
    repo = tmp_path / "repo"
    repo.mkdir()
    chunk_map = store_image(ChunkStore(repo), image)
    image.unlink()  # only the chunks are left: the mount must read those
    return repo, chunk_map


@pytest.fixture
def target(tmp_path: Path) -> Path:
    path = tmp_path / "target"
    path.mkdir()
    return path


def loops_reading(prefix: str) -> list[str]:
    """Loop devices whose backing file lies under ``prefix``."""
    found = []
    for p in glob.glob("/sys/block/loop*/loop/backing_file"):
        try:
            backing = Path(p).read_text().strip()
        except OSError:
            continue
        if backing.startswith(prefix):
            found.append(p.split("/")[3])
    return found


def mounted_under(prefix: str) -> list[str]:
    return [m for m in imount.mounts() if m.startswith(prefix)]


def assert_nothing_left(tmp_path: Path, pid: int | None) -> None:
    assert mounted_under(str(tmp_path)) == []
    assert loops_reading(str(tmp_path)) == []
    if pid is not None:
        assert imount.process_start(pid) is None or _is_zombie(pid), "the server still runs"
    assert os.listdir(tmp_path / "mounts") == []


def _is_zombie(pid: int) -> bool:
    raw = Path(f"/proc/{pid}/stat").read_bytes()
    return raw[raw.rfind(b")") + 2:].split()[0] == b"Z"


def test_mount_reads_files_back_and_umount_leaves_nothing(
        tmp_path: Path, host_runner: Runner, stored: tuple[Path, ChunkMap],
        files: dict[str, bytes], target: Path) -> None:
    repo, chunk_map = stored
    root = str(tmp_path / "mounts")
    state = imount.mount_map(host_runner, str(repo), chunk_map, str(target),
                             label="fs1/srv-thin-12345678/20261201T101010Z", fstype="ext4",
                             root=root)
    try:
        assert state.mounted and state.loop and state.server_pid
        assert Path(state.workdir).stat().st_mode & 0o777 == 0o700
        for name, data in files.items():
            assert (target / name).read_bytes() == data, name
        opts = imount.mounts()[str(target)]
        assert opts == ("ext4", state.loop)
        # writes refused: the filesystem, the FUSE file and the loop device are read-only
        with pytest.raises(OSError) as e1:
            (target / "new.txt").write_bytes(b"x")
        assert e1.value.errno == errno.EROFS
        with pytest.raises(OSError) as e2:
            open(state.image, "r+b").close()
        assert e2.value.errno in (errno.EROFS, errno.EACCES)
        assert Path(f"/sys/block/{os.path.basename(state.loop)}/ro").read_text().strip() == "1"
        assert imount.find_state(str(target), root=root).server_pid == state.server_pid
    finally:
        imount.umount_image(str(target), runner=host_runner, root=root)
    assert_nothing_left(tmp_path, state.server_pid)
    assert os.listdir(target) == [] and not os.path.ismount(target)


def test_the_filesystem_type_is_probed_when_the_manifest_has_none(
        tmp_path: Path, host_runner: Runner, stored: tuple[Path, ChunkMap],
        target: Path) -> None:
    repo, chunk_map = stored
    root = str(tmp_path / "mounts")
    state = imount.mount_map(host_runner, str(repo), chunk_map, str(target), label="x",
                             root=root)
    try:
        assert state.fstype == "ext4"
        assert (target / "hello.txt").read_bytes().startswith(b"hello")
    finally:
        imount.umount_image(str(target), runner=host_runner, root=root)
    assert_nothing_left(tmp_path, state.server_pid)


@pytest.mark.hostile("restore", "an image whose filesystem is not the one its manifest names "
                                "(xfs recorded, ext4 inside)",
                     "refused after losetup; loop device, FUSE mount, server and directory "
                     "all undone")
def test_a_failure_after_losetup_leaves_nothing_behind(
        tmp_path: Path, host_runner: Runner, stored: tuple[Path, ChunkMap],
        target: Path) -> None:
    repo, chunk_map = stored
    root = str(tmp_path / "mounts")
    spawned: list[int] = []
    real_start = imount.process_start

    def remember(pid: int) -> int | None:
        spawned.append(pid)
        return real_start(pid)

    imount.process_start = remember  # only to learn the server's pid
    try:
        with pytest.raises(RefusedError, match="holds ext4, but the agent said xfs"):
            imount.mount_map(host_runner, str(repo), chunk_map, str(target), label="x",
                             fstype="xfs", root=root)
    finally:
        imount.process_start = real_start
    assert spawned
    assert_nothing_left(tmp_path, spawned[0])
    assert os.listdir(target) == []


@pytest.mark.hostile("restore", "a chunk of the mounted image damaged in the repository",
                     "reading the file that lies in it fails with EIO; other files read")
def test_a_damaged_chunk_is_eio_through_the_mount(
        tmp_path: Path, host_runner: Runner, stored: tuple[Path, ChunkMap],
        files: dict[str, bytes], target: Path) -> None:
    repo, chunk_map = stored
    root = str(tmp_path / "mounts")
    store = ChunkStore(repo)
    state = imount.mount_map(host_runner, str(repo), chunk_map, str(target), label="x",
                             fstype="ext4", root=root)
    try:
        # damage the chunk holding big.bin's middle (found in the store, not through the
        # mount: the server's cache must not hold it yet)
        needle = files["big.bin"][5 << 20:(5 << 20) + 4096]
        ids = [cid for cid in chunk_map if cid is not None]
        cid = next(c for c in ids if needle in store.get(c))
        path = store.path(cid)
        blob = bytearray(path.read_bytes())
        blob[-1] ^= 0xFF
        os.chmod(path, 0o600)
        path.write_bytes(bytes(blob))
        with pytest.raises(OSError) as exc:
            (target / "big.bin").read_bytes()
        assert exc.value.errno == errno.EIO
        assert (target / "sub/deep/notes.txt").read_bytes() == files["sub/deep/notes.txt"]
    finally:
        imount.umount_image(str(target), runner=host_runner, root=root)
    assert_nothing_left(tmp_path, state.server_pid)
