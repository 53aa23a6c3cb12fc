"""``sanoffload.proxy.image`` on a real block device: a read-only loop device, read with
O_DIRECT, its size from BLKGETSIZE64, its short last chunk read up to the device's end;
``compare_image`` catches a block changed behind the device's back."""

from __future__ import annotations

import fcntl
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from sanoffload.errors import IntegrityError
from sanoffload.proxy.image import Volume, compare_image, raw_encode, read_image
from sanoffload.runner import Runner
from sanoffload.store.imagemap import ZERO
from tests.unit.test_proxy_image import RecordingSink, piece

pytestmark = pytest.mark.host

CS = 4 << 20
#: a multiple of 512 (a loop device's sector), not of 4096: the last read is cut by the device
TAIL = 4096 + 512
SIZE = 3 * CS + TAIL


@pytest.fixture
def loop(host_runner: Runner) -> Iterator[tuple[str, Path]]:
    """A read-only loop device over a file of three chunks (one all zero) and a short tail."""
    workdir = Path(tempfile.mkdtemp(prefix="sanoffload-image-", dir="/var/tmp"))
    backing = workdir / "lun.img"
    backing.write_bytes(piece(0, CS) + bytes(CS) + piece(2, CS) + piece(3, TAIL))
    device = host_runner.run(["losetup", "--find", "--show", "--read-only",
                              str(backing)]).stdout.strip()
    try:
        yield device, backing
    finally:
        host_runner.run(["losetup", "-d", device], ok_codes={1: "already detached"})
        backing.unlink()
        workdir.rmdir()


def test_a_loop_device_is_read_with_o_direct_to_its_last_byte(loop: tuple[str, Path]) -> None:
    device, backing = loop
    with Volume(device) as vol:
        assert fcntl.fcntl(vol.fd, fcntl.F_GETFL) & os.O_DIRECT
        assert vol.size == SIZE == backing.stat().st_size  # BLKGETSIZE64
    sink = RecordingSink()
    res = read_image(device, sink, delta=None, previous=None, encode=raw_encode)
    data = backing.read_bytes()
    m = res.chunk_map
    assert m.size == SIZE and m.count == 4
    assert m.digest(1) == ZERO
    for i in (0, 2, 3):
        off, length = m.span(i)
        assert m.digest(i) == hashlib.sha256(data[off:off + length]).digest()
    assert res.read_bytes == SIZE and len(sink.put) == 3
    assert compare_image(device, m, range(m.count)) == 4


@pytest.mark.parametrize(("where", "chunk"), [(CS + 4096, 1), (3 * CS + TAIL - 1, 3)])
def test_compare_image_catches_a_block_changed_under_the_device(
        loop: tuple[str, Path], where: int, chunk: int) -> None:
    device, backing = loop
    m = read_image(device, RecordingSink(), delta=None, previous=None,
                   encode=raw_encode).chunk_map
    # a buffered read of the device fills its page cache; compare_image reads past it
    with open(device, "rb") as f:
        f.read()
    with open(backing, "r+b") as f:
        f.seek(where)
        f.write(b"\xff")
        f.flush()
        os.fsync(f.fileno())
    with pytest.raises(IntegrityError, match=rf"chunk {chunk} at offset {chunk * CS} differs"):
        compare_image(device, m, range(m.count))
    # the chunks that did not change still compare equal
    assert compare_image(device, m, [i for i in range(m.count) if i != chunk]) == 3
