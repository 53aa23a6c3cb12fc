"""``findmnt``: which mounted filesystem holds a path.

Command line::

    findmnt --json --target PATH -o TARGET,SOURCE,FSTYPE,OPTIONS,MAJ:MIN

findmnt exits 1 with no output at all when PATH does not exist (findmnt_run:
``/run/sanoffload`` was absent), so exit 1 is tolerated under the name
``no-such-path`` and reported as such.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

from ..errors import CommandError, RefusedError
from ..requirements import Requirement
from ..runner import Runner

REQUIRES: tuple[Requirement, ...] = (
    Requirement("findmnt", "mount table query tool", roles=("agent",),
                fails_without="cannot map a backup path to its filesystem and device",
                executables=("findmnt",)),
)

COLUMNS = "TARGET,SOURCE,FSTYPE,OPTIONS,MAJ:MIN"
#: findmnt's exit code when it finds nothing; with --target that means no such path
NO_SUCH_PATH: dict[int, str] = {1: "no-such-path"}
# a bind mount's SOURCE: "/dev/mapper/datavg-lin[/dir]"
_BIND_RE = re.compile(r"^(?P<dev>.*)\[(?P<root>/.*)\]$")


@dataclass(frozen=True)
class Mount:
    """One mounted filesystem, as findmnt reports it."""

    target: str
    #: the device (a bind mount's "[/subdir]" suffix is moved to ``fsroot``)
    source: str
    fstype: str
    options: tuple[str, ...]
    major: int
    minor: int
    #: the directory of the filesystem mounted at ``target``: "/" unless a bind mount
    fsroot: str = "/"

    @property
    def devno(self) -> tuple[int, int]:
        return self.major, self.minor

    @property
    def is_readonly(self) -> bool:
        return "ro" in self.options

    @classmethod
    def from_report(cls, row: dict[str, Any]) -> Mount:
        source = str(row.get("source") or "")
        fsroot = "/"
        bind = _BIND_RE.match(source)
        if bind:
            source, fsroot = bind.group("dev"), bind.group("root")
        major, _, minor = str(row.get("maj:min", "")).partition(":")
        return cls(target=str(row["target"]), source=source, fstype=str(row.get("fstype") or ""),
                   options=tuple(o for o in str(row.get("options") or "").split(",") if o),
                   major=int(major), minor=int(minor), fsroot=fsroot)


def mount_of(runner: Runner, path: str) -> Mount:
    """The filesystem holding ``path`` (absolute).

    Raises RefusedError when the path does not exist (findmnt's exit 1),
    CommandError for anything else that goes wrong.
    """
    if not os.path.isabs(path):
        raise ValueError(f"findmnt: path must be absolute: {path!r}")
    argv = ["findmnt", "--json", "--target", path, "-o", COLUMNS]
    res = runner.run(argv, ok_codes=NO_SUCH_PATH)
    if res.returncode == 1 and not res.stdout.strip():
        raise RefusedError(f"{path}: no such file or directory (findmnt found no filesystem)")
    data = res.json()
    rows = data.get("filesystems", []) if isinstance(data, dict) else []
    if not rows:
        raise CommandError(f"{' '.join(res.argv)}: no filesystem in the output", argv=res.argv,
                           returncode=res.returncode, stdout=res.stdout, stderr=res.stderr)
    # over-mounted targets: the last one listed is the one the path reaches
    return Mount.from_report(rows[-1])
