"""``losetup``: a file as a read-only block device (``sanoffload mount`` of an image backup).

Command lines::

    losetup --read-only --find --show FILE     # prints the device it took: /dev/loopN
    losetup --detach /dev/loopN

``--find --show`` takes a free device and names it in one call, so no other
process can take the device between a lookup and the attach. ``--read-only``
makes the device itself refuse writes: a filesystem mounted from it cannot
replay a journal into the backup even if its own ``ro`` were lost.

Detaching a device that is no longer attached exits 1 with "No such device or
address" (ENXIO): that is reported as "was not attached", anything else raises.
Before detaching, callers check the device still reads the file they attached
(:func:`backing_file`): after a crash and a reboot, ``/dev/loop0`` may be
someone else's.
"""

from __future__ import annotations

import logging
import os
import re

from ..errors import CommandError
from ..requirements import Requirement
from ..runner import Runner

REQUIRES: tuple[Requirement, ...] = (
    Requirement("losetup", "losetup (util-linux)", roles=(), optional_for=("store",),
                fails_without="'sanoffload mount' cannot expose an image backup as a block "
                              "device to mount its filesystem",
                executables=("losetup",)),
)

log = logging.getLogger(__name__)

#: losetup exits 1 for every failure; only ENXIO's message means "not attached"
DETACH_FAILURE: dict[int, str] = {1: "detach-failed"}
_NOT_ATTACHED = "No such device or address"
_LOOP_RE = re.compile(r"/dev/loop[0-9]{1,6}")
SYS_BLOCK = "/sys/block"


def check_loop(device: str) -> str:
    """``device`` if it names a loop device (``/dev/loopN``); ValueError otherwise."""
    if not isinstance(device, str) or not _LOOP_RE.fullmatch(device):
        raise ValueError(f"not a loop device: {device!r}")
    return device


def attach_readonly(runner: Runner, path: str) -> str:
    """Attach ``path`` (absolute) to a free loop device, read-only; returns ``/dev/loopN``."""
    if not os.path.isabs(path):
        raise ValueError(f"losetup: the file must be an absolute path: {path!r}")
    res = runner.run(["losetup", "--read-only", "--find", "--show", path])
    device = res.stdout.strip()
    if not _LOOP_RE.fullmatch(device):
        raise CommandError(f"losetup --show printed {device[:80]!r}, not a loop device",
                           argv=res.argv, returncode=res.returncode, stdout=res.stdout,
                           stderr=res.stderr)
    log.info("attached %s read-only to %s", path, device)
    return device


def detach(runner: Runner, device: str) -> bool:
    """``losetup --detach DEV``: True if detached, False if it was not attached."""
    res = runner.run(["losetup", "--detach", check_loop(device)], ok_codes=DETACH_FAILURE)
    if res.returncode == 0:
        log.info("detached %s", device)
        return True
    if _NOT_ATTACHED in res.stderr:
        log.debug("losetup: %s was not attached", device)
        return False
    detail = res.stderr.strip().splitlines()
    raise CommandError(f"{' '.join(res.argv)} failed with exit code {res.returncode}: "
                       f"{detail[-1] if detail else 'no output'}", argv=res.argv,
                       returncode=res.returncode, stdout=res.stdout, stderr=res.stderr)


def backing_file(device: str, *, sys_block: str = SYS_BLOCK) -> str | None:
    """The file loop ``device`` reads (sysfs ``loop/backing_file``), or None if detached."""
    name = os.path.basename(check_loop(device))
    try:
        with open(os.path.join(sys_block, name, "loop", "backing_file"), "rb") as f:
            raw = f.read(8192)
    except (FileNotFoundError, NotADirectoryError):
        return None
    # sysfs ends the path with a newline; a path may hold any other byte
    return os.fsdecode(raw[:-1] if raw.endswith(b"\n") else raw)
