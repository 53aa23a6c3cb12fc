"""``zstd``: the compressor of every archive the store holds.

Command lines::

    zstd -T0 -q -c --check [-N]    # compress stdin to stdout, one thread per core
    zstd -d -q -c ARCHIVE          # decompress ARCHIVE (or stdin: -) to stdout
    zstd -t -q -- ARCHIVE          # test: decode everything, check each frame's checksum

The zstd CLI writes a content checksum into every frame by default (``--check``),
so ``zstd -t`` notices a flipped byte anywhere in the compressed stream.
Reading archives inside GNU tar goes through ``tar --zstd``, which runs
``zstd -d`` as its own child (see :mod:`sanoffload.tools.tar`).
"""

from __future__ import annotations

import os

from ..requirements import Requirement
from ..runner import Result, Runner

REQUIRES: tuple[Requirement, ...] = (
    Requirement("zstd", "zstd compressor", roles=("proxy", "store"),
                fails_without="cannot compress, verify or restore backup archives",
                executables=("zstd",)),
)

#: the suffix every stored archive carries
SUFFIX = ".zst"


def compress_argv(*, level: int | None = None, threads: int = 0) -> list[str]:
    """``zstd -T0 -q -c --check`` (stdin to stdout); ``level`` None keeps zstd's default (3).

    ``-T0`` uses every core: the proxy's CPU is there to be used, and a single
    zstd thread would cap the backup at ~400 MB/s. ``--check`` (zstd's default,
    named because the design rests on it): the frame's checksum of everything
    tar wrote, which the store's decode on receipt verifies.
    """
    argv = ["zstd", f"-T{threads}", "-q", "-c", "--check"]
    if level is not None:
        if not 1 <= level <= 19:
            raise ValueError(f"zstd level out of range: {level}")
        argv.append(f"-{level}")
    return argv


def decompress_argv(archive: str | bytes | os.PathLike[str] = "-") -> list[str]:
    """``zstd -d -q -c ARCHIVE``: the decompressed stream on stdout ("-": from stdin)."""
    path = os.fsdecode(archive)  # bytes paths: the runner encodes this back byte for byte
    # "--" would make "-" a file named "-": only a real path gets it
    return ["zstd", "-d", "-q", "-c", path] if path == "-" else ["zstd", "-d", "-q", "-c", "--",
                                                                 path]


def check(runner: Runner, archive: str | bytes | os.PathLike[str], *, timeout: float) -> Result:
    """``zstd -t -q -- ARCHIVE``: raises CommandError (exit 1) if any frame is damaged.

    zstd reads the file itself and keeps nothing but its window in memory.
    """
    return runner.run(["zstd", "-t", "-q", "--", os.fsdecode(archive)], timeout=timeout)
