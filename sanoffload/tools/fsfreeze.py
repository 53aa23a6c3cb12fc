"""``fsfreeze`` and ``sync -f``: freeze, thaw and flush one filesystem.

Command lines (always through the runner, never a shell)::

    sync -f PATH                    # syncfs(2) of the filesystem holding PATH
    fsfreeze --freeze MOUNTPOINT    # FIFREEZE: flush, then block every writer
    fsfreeze --unfreeze MOUNTPOINT  # FITHAW: let writers go on

``fsfreeze`` exits 1 for every error; "was not frozen" is the one whose
message ends in ``Invalid argument`` (the ioctl's EINVAL).
"""

from __future__ import annotations

import os

from ..errors import CommandError
from ..requirements import Requirement
from ..runner import Result, Runner

REQUIRES: tuple[Requirement, ...] = (
    Requirement("fsfreeze", "filesystem flush and freeze tools (sync, fsfreeze)",
                roles=("agent",),
                fails_without="cannot flush or quiesce the filesystem, so no consistent "
                              "duplicate can be made",
                executables=("fsfreeze", "sync")),
)

#: fsfreeze's exit code for any failure, tolerated by unfreeze and told apart by stderr
NOT_FROZEN: dict[int, str] = {1: "not frozen"}
_EINVAL = "Invalid argument"

DEFAULT_THAW_TIMEOUT = 30.0
DEFAULT_SYNC_TIMEOUT = 300.0


def freeze(runner: Runner, mountpoint: str | os.PathLike[str], timeout: float) -> Result:
    """``fsfreeze --freeze MOUNTPOINT``; raises CommandError if it did not freeze.

    ``timeout`` bounds the flush the kernel does before it blocks writers; a
    freeze that times out may still complete in the kernel, so the caller must
    treat a timeout as "maybe frozen" and thaw.
    """
    return runner.run(["fsfreeze", "--freeze", os.fspath(mountpoint)], timeout=timeout)


def unfreeze(runner: Runner, mountpoint: str | os.PathLike[str],
             timeout: float = DEFAULT_THAW_TIMEOUT) -> bool:
    """``fsfreeze --unfreeze MOUNTPOINT``: True if it thawed, False if it was not frozen.

    Any other failure (no such path, not permitted) raises CommandError.
    """
    res = runner.run(["fsfreeze", "--unfreeze", os.fspath(mountpoint)], timeout=timeout,
                     ok_codes=NOT_FROZEN)
    if res.returncode == 0:
        return True
    if _EINVAL in res.stderr:
        return False
    # exit 1 for another reason: the tolerated code must not hide a real failure
    detail = res.stderr.strip().splitlines()
    raise CommandError(f"{' '.join(res.argv)} failed with exit code {res.returncode}: "
                       f"{detail[-1] if detail else 'no output'}", argv=res.argv,
                       returncode=res.returncode, stdout=res.stdout, stderr=res.stderr)


def syncfs(runner: Runner, path: str | os.PathLike[str],
           timeout: float = DEFAULT_SYNC_TIMEOUT) -> Result:
    """``sync -f PATH``: write out the filesystem's dirty data before freezing.

    The freeze flushes too, but with writers already blocked; flushing first
    leaves the freeze little to do, so the frozen window stays short.
    """
    return runner.run(["sync", "-f", os.fspath(path)], timeout=timeout)
