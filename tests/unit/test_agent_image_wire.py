"""channel.messages.Delta and PrepareAnswer.delta: the agent's image answer, checked on arrival."""

from __future__ import annotations

from typing import Any

import pytest

from sanoffload.channel.messages import (
    MAX_DELTA_RANGES,
    Delta,
    PrepareAnswer,
    check_backup_id,
)
from sanoffload.errors import ProtocolError
from tests.unit.test_messages import WIRE

pytestmark = pytest.mark.unit

MIB = 1024 * 1024
C = 4 * MIB
BASE = "fs1/srv-thin-0a1b2c3d/20261125T020000Z"


def wire(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"base": BASE, "volume_bytes": 100 * C + 512, "chunk_bytes": C,
                            "changed": [[0, 2 * C], [10 * C, C], [100 * C, 512]],
                            "discarded": [[4 * C, 3 * C]]}
    data.update(changes)
    return data


def test_a_delta_goes_over_the_wire_and_back() -> None:
    delta = Delta.from_wire(wire())
    assert delta.changed == ((0, 2 * C), (10 * C, C), (100 * C, 512))
    assert delta.discarded == ((4 * C, 3 * C),)
    assert delta.ranges == 4 and delta.changed_bytes == 3 * C + 512
    assert delta.to_wire() == wire()
    assert Delta.from_wire(delta.to_wire()) == delta


def test_an_answer_without_a_delta_is_the_json_it_always_was() -> None:
    answer = PrepareAnswer.from_wire(dict(WIRE))
    assert answer.delta is None
    assert "delta" not in answer.to_wire()


def test_an_answer_carries_its_delta() -> None:
    answer = PrepareAnswer.from_wire({**dict(WIRE), "delta": wire()})
    assert answer.delta == Delta.from_wire(wire())
    assert answer.to_wire()["delta"] == wire()


@pytest.mark.parametrize("value", [
    "fs1/srv-data-3f2a9c1e/20261126T102933Z", "fs1.example.org/root-00000000/20000101T000000Z",
])
def test_backup_ids(value: str) -> None:
    assert check_backup_id(value) == value


_BAD: list[tuple[str, dict[str, Any]]] = [
    ("not an object", {"__replace__": [1, 2]}),
    ("unknown key", {"extra": 1}),
    ("base missing", {"base": None}),
    ("base a path", {"base": "/etc/passwd"}),
    ("base with ..", {"base": "fs1/../20261125T020000Z"}),
    ("base no such date", {"base": "fs1/x/20261131T020000Z"}),
    ("base with an escape", {"base": "fs1/x\x1b[2J/20261125T020000Z"}),
    ("base huge", {"base": "a" * 100_000}),
    ("volume_bytes a string", {"volume_bytes": "400"}),
    ("volume_bytes true", {"volume_bytes": True}),
    ("volume_bytes zero", {"volume_bytes": 0}),
    ("volume_bytes huge", {"volume_bytes": 1 << 80}),
    ("chunk_bytes not a power of two", {"chunk_bytes": 3 * MIB}),
    ("chunk_bytes tiny", {"chunk_bytes": 512}),
    ("chunk_bytes float", {"chunk_bytes": 4194304.0}),
    ("changed not a list", {"changed": "0-4194304"}),
    ("a range of three", {"changed": [[0, C, 1]]}),
    ("a range of floats", {"changed": [[0.0, float(C)]]}),
    ("a range of bools", {"changed": [[False, True]]}),
    ("a negative offset", {"changed": [[-C, C]]}),
    ("a zero length", {"changed": [[0, 0]]}),
    ("unaligned offset", {"changed": [[512, C]]}),
    ("unaligned end", {"changed": [[0, C + 512]]}),
    ("past the volume", {"changed": [[100 * C, C]]}),
    ("unsorted", {"changed": [[10 * C, C], [0, C]]}),
    ("overlapping", {"changed": [[0, 2 * C], [C, C]]}),
    ("changed and discarded overlap", {"discarded": [[C, C]]}),
    ("too many ranges", {"changed": [[i * 2 * 65536, 65536] for i in range(MAX_DELTA_RANGES)],
                         "discarded": [[(2 * MAX_DELTA_RANGES + 1) * 65536, 65536]],
                         "chunk_bytes": 65536, "volume_bytes": 1 << 40}),
    ("a huge offset", {"changed": [[1 << 70, C]]}),
]


@pytest.mark.hostile("channel", "the agent's delta: a bad base id, sizes of the wrong type or "
                                "out of range, ranges unaligned, unsorted, overlapping, past "
                                "the volume, changed overlapping discarded, too many",
                     "ProtocolError (exit 11) naming the delta; the proxy reads nothing")
@pytest.mark.parametrize("name, changes", _BAD, ids=[n for n, _c in _BAD])
def test_a_hostile_delta_is_refused(name: str, changes: dict[str, Any]) -> None:
    data: Any = changes["__replace__"] if "__replace__" in changes else wire(**changes)
    with pytest.raises(ProtocolError, match="delta"):
        PrepareAnswer.from_wire({**dict(WIRE), "delta": data})


def test_a_delta_cannot_even_be_built_wrong() -> None:
    with pytest.raises(ValueError, match="aligned"):
        Delta(BASE, 100 * C, C, ((512, C),), ())
