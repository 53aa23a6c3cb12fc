"""Real tool outputs recorded in the lab (tests/fixtures/recorded), fed to a FakeRunner."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from sanoffload.testing import FakeRunner

RECORDED = Path(__file__).resolve().parents[1] / "fixtures" / "recorded"
DEFAULT_RELEASE = "bookworm"


def load(name: str, release: str | None = None) -> tuple[str, str, int]:
    """``(stdout, stderr, returncode)`` of the recorded command ``name`` (NAME.out/.err/.rc)."""
    base = RECORDED / (release or DEFAULT_RELEASE) / name
    stdout = base.with_suffix(".out").read_text()
    stderr = base.with_suffix(".err").read_text()
    rc = int(base.with_suffix(".rc").read_text().strip())
    return stdout, stderr, rc


def feed(runner: FakeRunner, prefix: str | Sequence[str], name: str, *,
         times: int | None = None, release: str | None = None) -> FakeRunner:
    """Answer calls starting with ``prefix`` with the recording ``name``; later feeds win."""
    stdout, stderr, rc = load(name, release)
    words = (prefix,) if isinstance(prefix, str) else tuple(prefix)
    return runner.on(*words, stdout=stdout, stderr=stderr, returncode=rc, times=times)
