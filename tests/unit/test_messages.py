"""sanoffload.channel.messages: the prepare answer, one typed object on both ends of the wire.

The agent sends ``PrepareAnswer.to_wire()``; the proxy reads it back with
``PrepareAnswer.from_wire``, which treats every field as hostile: a bad type,
a huge value, a control character, a malformed IQN, portal or identifier or an
unknown kind is a ProtocolError (exit 11), never a KeyError or TypeError.
"""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from typing import Any

import pytest

from sanoffload.channel.messages import HeldOutput, PrepareAnswer, check_held
from sanoffload.errors import ProtocolError
from sanoffload.kinds import DuplicateKind, ObjectKind, WhoFreezes

pytestmark = pytest.mark.unit

SID = "fs1-0a1b2c3d"
#: an answer exactly as agents send it today (keys and string values): the wire format
WIRE: dict[str, Any] = {
    "session_id": SID,
    "target_iqn": f"iqn.2003-01.org.linux-iscsi.sanoffload:{SID}",
    "portals": ["10.77.0.11:3260"], "lun": 0,
    "identifier": "naa.60014050a1b2c3d4e5f60718293a4b5c",
    "unit_serial": "0a1b2c3d-1111-2222-3333-444455556666",
    "chap_user": f"sanoffload-{SID}", "chap_secret": "s3cretS3cret1234",
    "fstype": "ext4", "path_in_fs": "data", "object_kind": "directory",
    "duplicate_kind": "thin-snapshot", "freeze_window_ms": 41.7, "frozen_by": "fsfreeze",
    "lease_expires": 1795689573.125, "frozen_at": 1795688973.125, "warnings": [],
}


def wire(**changes: Any) -> dict[str, Any]:
    """WIRE with some keys changed (a value of ``...`` removes the key)."""
    data = copy.deepcopy(WIRE)
    for key, value in changes.items():
        if value is ...:
            data.pop(key, None)
        else:
            data[key] = value
    return data


def sample_answer(**changes: Any) -> PrepareAnswer:
    """A checked PrepareAnswer from WIRE with some wire keys changed."""
    return PrepareAnswer.from_wire(wire(**changes))


def test_round_trip_keeps_the_wire_format() -> None:
    answer = PrepareAnswer.from_wire(WIRE)
    assert answer.duplicate_kind is DuplicateKind.THIN_SNAPSHOT
    assert answer.object_kind is ObjectKind.DIRECTORY and answer.frozen_by is WhoFreezes.FSFREEZE
    assert answer.portal == "10.77.0.11:3260"
    out = answer.to_wire()
    assert out == WIRE
    # the same JSON an older proxy or agent reads: plain strings, same keys
    assert json.loads(json.dumps(out)) == WIRE
    assert all(type(out[k]) is str for k in ("duplicate_kind", "object_kind", "frozen_by"))
    assert PrepareAnswer.from_wire(json.loads(json.dumps(out))) == answer
    assert answer.to_dict() == out


def test_the_secret_is_not_in_the_repr() -> None:
    assert WIRE["chap_secret"] not in repr(PrepareAnswer.from_wire(WIRE))


def test_fields_older_agents_did_not_send_have_defaults() -> None:
    answer = PrepareAnswer.from_wire(wire(object_kind=..., frozen_at=..., warnings=..., lun=...))
    assert answer.object_kind is None and answer.frozen_at == 0.0
    assert answer.warnings == [] and answer.lun == 0
    assert "object_kind" not in answer.to_wire()
    # one "portal" instead of "portals"
    assert PrepareAnswer.from_wire(wire(portals=..., portal="10.0.0.1:3260")).portals == [
        "10.0.0.1:3260"]
    # a key this version does not know is ignored
    assert PrepareAnswer.from_wire(wire(multipath=True)) == PrepareAnswer.from_wire(WIRE)


def test_identifier_is_normalised() -> None:
    answer = PrepareAnswer.from_wire(wire(identifier="NAA.60014050A1B2C3D4E5F60718293A4B5C"))
    assert answer.identifier == WIRE["identifier"]


HUGE = "a" * 100_000
BAD_FIELDS: list[tuple[str, Any]] = [
    # session id: a mount point name, a target name, a journal file
    ("session_id", None), ("session_id", 7), ("session_id", ""), ("session_id", "../etc"),
    ("session_id", "a/b"), ("session_id", ".."), ("session_id", "fs1\nx"), ("session_id", HUGE),
    # target
    ("target_iqn", None), ("target_iqn", "--login"), ("target_iqn", "iqn.2026-13.org.x:y"),
    ("target_iqn", "iqn.2026-11.org.x:y\n"), ("target_iqn", "IQN.2026-11.ORG.X"),
    ("target_iqn", "iqn.2026-11.org.x:" + HUGE), ("target_iqn", ["iqn.2026-11.org.x"]),
    # portals
    ("portals", None), ("portals", []), ("portals", "10.0.0.1:3260"), ("portals", [None]),
    ("portals", ["10.0.0.1"]), ("portals", ["10.0.0.1:0"]), ("portals", ["10.0.0.1:70000"]),
    ("portals", ["-oProxyCommand=x:1"]), ("portals", ["10.0.0.1:3260\n"]),
    ("portals", ["10.0.0.1:3260"] * 17),
    # lun
    ("lun", True), ("lun", -1), ("lun", 1.5), ("lun", "0"), ("lun", 10**30),
    # identifier
    ("identifier", None), ("identifier", "naa.xyz"), ("identifier", "naa.6001405"),
    ("identifier", "/dev/sda"), ("identifier", "naa.60014050a1b2c3d4\x1b[2J"),
    ("identifier", HUGE),
    # words that reach command lines
    ("unit_serial", None), ("unit_serial", "a b"), ("unit_serial", HUGE),
    ("chap_user", None), ("chap_user", "-v"), ("chap_user", "px1\nroot"), ("chap_user", HUGE),
    ("chap_secret", None), ("chap_secret", ""), ("chap_secret", "sec ret"),
    ("chap_secret", "sec\x00ret"), ("chap_secret", "s" * 256),
    ("fstype", None), ("fstype", "ext4\x1b]0;pwned\x07"), ("fstype", "-oexec"),
    ("fstype", "x" * 33),
    # path in the filesystem
    ("path_in_fs", None), ("path_in_fs", ""), ("path_in_fs", 3), ("path_in_fs", "a\x00b"),
    ("path_in_fs", "a\nb"), ("path_in_fs", "a/" * 3000),
    # enums
    ("object_kind", "socket"), ("object_kind", 1), ("duplicate_kind", None),
    ("duplicate_kind", "clone\x1b[2J"), ("duplicate_kind", ["snapshot"]),
    ("frozen_by", None), ("frozen_by", "lvm-suspend"), ("frozen_by", {}),
    # numbers
    ("freeze_window_ms", None), ("freeze_window_ms", "41"), ("freeze_window_ms", -1),
    ("freeze_window_ms", float("nan")), ("freeze_window_ms", float("inf")),
    ("freeze_window_ms", 1e300), ("freeze_window_ms", True),
    ("lease_expires", None), ("lease_expires", -5), ("lease_expires", 1e20),
    ("frozen_at", "2026-11-26"), ("frozen_at", float("nan")), ("frozen_at", 1e20),
    # warnings
    ("warnings", "hook failed"), ("warnings", [1]), ("warnings", {"a": 1}),
]


@pytest.mark.hostile("proxy", "the agent's prepare answer with a field of the wrong type, huge, "
                              "with control characters, a bad IQN/portal/identifier or an "
                              "unknown kind",
                     "ProtocolError (exit 11) naming the field; never KeyError/TypeError")
@pytest.mark.parametrize("key,value", BAD_FIELDS, ids=[f"{k}-{i}" for i, (k, _) in
                                                        enumerate(BAD_FIELDS)])
def test_each_field_is_checked_as_hostile(key: str, value: Any) -> None:
    with pytest.raises(ProtocolError) as exc:
        PrepareAnswer.from_wire(wire(**{key: value}))
    assert exc.value.exit_code == 11
    assert key in exc.value.message
    assert "\x1b" not in exc.value.message and "\n" not in exc.value.message
    assert len(exc.value.message) < 400


@pytest.mark.hostile("proxy", "a prepare answer missing a required field, or not an object",
                     "ProtocolError (exit 11), not KeyError")
@pytest.mark.parametrize("key", ["session_id", "target_iqn", "portals", "identifier",
                                 "unit_serial", "chap_user", "chap_secret", "fstype",
                                 "path_in_fs", "duplicate_kind", "freeze_window_ms",
                                 "frozen_by", "lease_expires"])
def test_a_missing_required_field_is_a_protocol_error(key: str) -> None:
    with pytest.raises(ProtocolError, match=key):
        PrepareAnswer.from_wire(wire(**{key: ...}))


@pytest.mark.parametrize("data", [None, [], "session", 3])
def test_not_an_object_is_a_protocol_error(data: Any) -> None:
    with pytest.raises(ProtocolError, match="not an object"):
        PrepareAnswer.from_wire(data)


@pytest.mark.hostile("proxy", "the agent's warnings with escape sequences, 10,000 of them, "
                              "or a megabyte each",
                     "escaped, at most 32 kept plus a count, each clipped")
def test_warnings_are_escaped_and_bounded() -> None:
    answer = PrepareAnswer.from_wire(wire(warnings=["db\x1b[2J\nfailed"] + ["x" * 10**6] * 9999))
    assert answer.warnings[0] == "db\\x1b[2J\\nfailed"
    assert len(answer.warnings) == 33 and answer.warnings[-1].startswith("... and 9968 more")
    assert all(len(w) <= 1000 for w in answer.warnings)


def test_the_agent_side_builds_the_same_type() -> None:
    from sanoffload.agent.session import Prepared

    assert Prepared is PrepareAnswer
    answer = PrepareAnswer.from_wire(WIRE)
    assert replace(answer, warnings=["w"]).to_wire()["warnings"] == ["w"]


# -- held: the holding hooks' outputs ------------------------------------------------------
BACKUP_LABEL = ("START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\n"
                "CHECKPOINT LOCATION: 0/2000060\nBACKUP METHOD: streamed\n"
                "BACKUP FROM: primary\nSTART TIME: 2026-11-26 10:29:33 UTC\n"
                "LABEL: sanoffload\tfs1\nSTART TIMELINE: 1\n")
PG_HOLD = "/etc/sanoffload/hooks/pg-hold"


def test_held_round_trips_and_is_absent_when_empty() -> None:
    held = [{"hook": PG_HOLD, "output": BACKUP_LABEL}, {"hook": "/h/app", "output": ""}]
    answer = PrepareAnswer.from_wire(wire(held=held))
    assert answer.held == [HeldOutput(PG_HOLD, BACKUP_LABEL), HeldOutput("/h/app", "")]
    out = answer.to_wire()
    assert out["held"] == held
    assert PrepareAnswer.from_wire(json.loads(json.dumps(out))) == answer
    # an agent without holding hooks sends what it always sent, and an older one none
    assert "held" not in PrepareAnswer.from_wire(wire(held=[])).to_wire()
    assert PrepareAnswer.from_wire(wire(held=None)).held == []
    assert PrepareAnswer.from_wire(WIRE).held == []


BAD_HELD = [
    pytest.param("START WAL", id="a string"),
    pytest.param({"hook": PG_HOLD, "output": "x"}, id="an object"),
    pytest.param(["x"], id="a list of strings"),
    pytest.param([{"hook": PG_HOLD}], id="no output"),
    pytest.param([{"hook": PG_HOLD, "output": "x", "more": 1}], id="an unknown key"),
    pytest.param([{"hook": PG_HOLD, "output": 7}], id="output a number"),
    pytest.param([{"hook": PG_HOLD, "output": ["x"]}], id="output a list"),
    pytest.param([{"hook": "", "output": "x"}], id="empty hook"),
    pytest.param([{"hook": None, "output": "x"}], id="hook null"),
    pytest.param([{"hook": "/h\nforged row", "output": "x"}], id="hook with a newline"),
    pytest.param([{"hook": "/h" * 3000, "output": "x"}], id="hook too long"),
    pytest.param([{"hook": f"/h{i}", "output": "x"} for i in range(9)], id="nine hooks"),
    pytest.param([{"hook": PG_HOLD, "output": "x" * (64 * 1024 + 1)}], id="output too long"),
    pytest.param([{"hook": PG_HOLD, "output": "\u00e9" * (32 * 1024 + 1)}],
                 id="output too long in UTF-8"),
    pytest.param([{"hook": f"/h{i}", "output": "\u00e9" * 16_000} for i in range(3)],
                 id="too much JSON together"),
    pytest.param([{"hook": PG_HOLD, "output": "ok\x1b[2J\x1b]0;owned\x07"}], id="escape sequence"),
    pytest.param([{"hook": PG_HOLD, "output": "line\rforged"}], id="carriage return"),
    pytest.param([{"hook": PG_HOLD, "output": "a\u202eb"}], id="bidi override"),
    pytest.param([{"hook": PG_HOLD, "output": "a\ud800b"}], id="lone surrogate"),
    pytest.param([{"hook": PG_HOLD, "output": "a\x00b"}], id="NUL"),
]


@pytest.mark.hostile("proxy", "the agent's 'held' outputs: wrong types, nine of them, "
                              "over 64 KiB, control characters or escapes other than "
                              "newline and tab",
                     "ProtocolError (exit 11) naming 'held'; nothing stored")
@pytest.mark.parametrize("held", BAD_HELD)
def test_bad_held_is_a_protocol_error(held: Any) -> None:
    with pytest.raises(ProtocolError, match="held") as info:
        PrepareAnswer.from_wire(wire(held=held))
    assert info.value.exit_code == 11
    assert "\x1b" not in str(info.value) and "\n" not in str(info.value)
    assert len(str(info.value)) < 300


def test_held_at_its_bounds_is_accepted() -> None:
    held = [{"hook": f"/h{i}", "output": "x" * 20_000 + "\n\t"} for i in range(8)]
    assert len(PrepareAnswer.from_wire(wire(held=held)).held) == 8
    one = [{"hook": PG_HOLD, "output": "y" * (64 * 1024)}]
    assert PrepareAnswer.from_wire(wire(held=one)).held[0].output == "y" * (64 * 1024)
    with pytest.raises(ValueError, match="at most 8"):
        check_held([{"hook": f"/h{i}", "output": ""} for i in range(9)])
