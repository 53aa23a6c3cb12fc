"""durable.read_bounded: a bound is a limit, never an allocation (a 512 MiB map bound on a
512 MiB backup server was a MemoryError before any byte was read)."""

from __future__ import annotations

import io

import pytest

from sanoffload.durable import read_bounded

pytestmark = pytest.mark.unit


class Stingy(io.BytesIO):
    """Refuses any read asking for more than a piece at a time."""

    def read(self, size: int | None = -1, /) -> bytes:
        assert size is not None and 0 < size <= 1 << 20, size
        return super().read(size)


def test_reads_in_pieces_whatever_the_bound() -> None:
    data = b"x" * (3 << 20) + b"tail"
    assert read_bounded(Stingy(data), 1 << 40) == data


def test_one_byte_more_than_the_bound_says_too_big() -> None:
    assert read_bounded(Stingy(b"y" * 100), 10) == b"y" * 11
    assert read_bounded(Stingy(b""), 10) == b""
