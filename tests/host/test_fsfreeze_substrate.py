"""What the agent's quiesce step stands on, shown on this machine's kernel.

fsfreeze must inhibit writes (a writer blocks while frozen) and flush what was
not yet written (the data is on the device, read past the page cache, while
still frozen); a thaw releases the writer. The writer is never waited on
while the filesystem is frozen: a task blocked on a frozen filesystem cannot
be killed, so the test thaws before it joins.
"""

from __future__ import annotations

import subprocess

from sanoffload.runner import Runner

from .conftest import LoopFs
from .test_freeze_guard import assert_blocked, start_writer

MARK = b"sanoffload-freeze-flush-marker-" + b"x" * 33


def _device_contains(device: str, needle: bytes) -> bool:
    # O_DIRECT read of the whole (small) device: what is on disk, not in the cache
    out = subprocess.run(["dd", f"if={device}", "bs=1M", "iflag=direct", "status=none"],
                         check=True, capture_output=True, timeout=60).stdout
    return needle in out


def test_freeze_blocks_writers_and_flushes_dirty_data(loopfs: LoopFs, host_runner: Runner) -> None:
    target = loopfs.mountpoint / "dirty.bin"
    # buffered write, not synced: only the page cache has it
    target.write_bytes(MARK * 64)
    host_runner.run(["fsfreeze", "--freeze", str(loopfs.mountpoint)])
    writer = None
    try:
        assert _device_contains(loopfs.device, MARK), "freeze did not write out dirty data"
        writer = start_writer(loopfs.mountpoint)
        # said its marker, then held in the kernel's freeze wait: not merely slow to start
        assert_blocked(writer)
    finally:
        host_runner.run(["fsfreeze", "--unfreeze", str(loopfs.mountpoint)])
    assert writer is not None
    assert writer.wait(timeout=10) == 0
    assert (loopfs.mountpoint / "late.txt").read_text() == "late\n"


def test_unfreeze_of_a_thawed_filesystem_is_an_error_we_can_name(loopfs: LoopFs,
                                                                  host_runner: Runner) -> None:
    # the agent's cleanup relies on this exit code to tell "was not frozen" from a failure
    res = host_runner.run(["fsfreeze", "--unfreeze", str(loopfs.mountpoint)],
                          ok_codes={1: "not frozen"})
    assert res.code_name == "not frozen"
    assert "Invalid argument" in res.stderr
