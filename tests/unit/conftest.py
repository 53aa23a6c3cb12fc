"""Fixtures shared by the unit tests of the store, the channel and the proxy."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from sanoffload.testing import FakeRunner
from sanoffload.tools import tar, zstd


def make_archive(src: Path) -> bytes:
    """A real ``.tar.zst`` of ``src``, made with this machine's tar and zstd."""
    t = subprocess.run(tar.create_argv(src), capture_output=True, check=True).stdout
    return subprocess.run(zstd.compress_argv(), input=t, capture_output=True, check=True).stdout


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A small source tree: a file in a subdirectory and a binary one."""
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "a.txt").write_text("hello from fs1\n")
    (src / "b.bin").write_bytes(bytes(range(256)) * 8)
    return src


@pytest.fixture
def archive(tree: Path) -> bytes:
    """``tree`` as a real ``.tar.zst``."""
    return make_archive(tree)


def listing_runner(members: int = 3) -> FakeRunner:
    """``tar --list`` (the test-read) prints ``members`` lines on its stdout."""
    return FakeRunner().on(
        "tar", "--list", stdout=b"".join(b'"./m%d"\n' % i for i in range(members)))
