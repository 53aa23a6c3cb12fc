"""Host tier: root on this machine, real loop devices, real filesystems, real fsfreeze.

Every resource a fixture makes is undone in its finalizer, thawing first: a
filesystem left frozen would hang whatever touches it next.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from sanoffload.runner import CommandRunner, Runner

MKFS = {
    "ext4": ["mkfs.ext4", "-q", "-F"],
    "xfs": ["mkfs.xfs", "-q", "-f"],
    "btrfs": ["mkfs.btrfs", "-q", "-f"],
}


@dataclass
class LoopFs:
    fstype: str
    image: Path
    device: str
    mountpoint: Path


@pytest.fixture(scope="session")
def host_runner(require_root: None) -> Runner:
    return CommandRunner(default_timeout=60)


def make_loopfs(runner: Runner, fstype: str, workdir: Path, size_mb: int = 320) -> LoopFs:
    image = workdir / f"{fstype}.img"
    with open(image, "wb") as f:
        f.truncate(size_mb * 1024 * 1024)
    runner.run([*MKFS[fstype], str(image)])
    device = runner.run(["losetup", "--find", "--show", str(image)]).stdout.strip()
    mountpoint = workdir / f"mnt-{fstype}"
    mountpoint.mkdir()
    try:
        runner.run(["mount", device, str(mountpoint)])
    except Exception:
        runner.run(["losetup", "-d", device])
        raise
    return LoopFs(fstype, image, device, mountpoint)


def destroy_loopfs(runner: Runner, fs: LoopFs) -> None:
    # thaw first (EINVAL when not frozen is fine), then unmount, then detach
    runner.run(["fsfreeze", "--unfreeze", str(fs.mountpoint)], ok_codes={1: "not frozen"})
    runner.run(["umount", str(fs.mountpoint)], ok_codes={32: "not mounted"})
    runner.run(["losetup", "-d", fs.device], ok_codes={1: "already detached"})
    fs.image.unlink(missing_ok=True)


@pytest.fixture(params=["ext4", "xfs"])
def loopfs(request: pytest.FixtureRequest, host_runner: Runner) -> Iterator[LoopFs]:
    """A freshly made filesystem of each kind on a loop device, mounted."""
    workdir = Path(tempfile.mkdtemp(prefix="sanoffload-host-", dir="/var/tmp"))
    fs = make_loopfs(host_runner, request.param, workdir)
    try:
        yield fs
    finally:
        destroy_loopfs(host_runner, fs)
        for p in sorted(workdir.rglob("*"), reverse=True):
            p.rmdir() if p.is_dir() else p.unlink()
        workdir.rmdir()
        assert fs.device not in host_runner.run(["losetup", "-a"]).stdout
        assert str(fs.mountpoint) not in Path("/proc/mounts").read_text()
