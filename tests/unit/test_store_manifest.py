"""The manifest: round trip, strict types (it crosses the network), sender fields."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from sanoffload import __version__
from sanoffload.channel.messages import HeldOutput
from sanoffload.store.manifest import (
    Manifest,
    Verification,
    parse_iso,
    sender_fields,
    to_utc,
    utc_iso,
)

pytestmark = pytest.mark.unit

SHA = "ab" * 32


def _full() -> Manifest:
    return Manifest(host="fs1", path="/srv/data", slug="srv-data-1a2b3c4d",
                    timestamp="20261126T102933Z", archive_bytes=1048576, sha256=SHA,
                    duplicate_kind="thin-snapshot", frozen_at="2026-11-26T10:29:33.120Z",
                    freeze_window_ms=41.7, frozen_by="fsfreeze", session_id="fs1-1a2b3c4d",
                    source_bytes=5 << 20, file_count=120, member_count=131,
                    stored_at="2026-11-26T10:31:02Z",
                    verification=Verification("ok", "2026-11-26T10:31:02Z", "on receipt"))


def test_round_trip_through_json() -> None:
    m = _full()
    again = Manifest.from_json(m.to_json())
    assert again == m
    assert again.to_json() == m.to_json()
    data = json.loads(m.to_json())
    assert data["sanoffload_version"] == __version__
    assert data["format"] == 1 and data["compression"] == "zstd"
    assert data["verification"] == {"status": "ok", "checked_at": "2026-11-26T10:31:02Z",
                                    "detail": "on receipt"}
    assert m.backup_id == "fs1/srv-data-1a2b3c4d/20261126T102933Z"


def test_minimal_manifest_round_trips() -> None:
    m = Manifest(host="fs1", path="/", slug="root-1", timestamp="20261126T102933Z",
                 archive_bytes=0, sha256=SHA)
    assert Manifest.from_json(m.to_json()) == m


def test_unknown_keys_are_kept() -> None:
    data = json.loads(_full().to_json())
    data["future_field"] = {"x": [1, 2]}
    m = Manifest.from_dict(data)
    assert m.extra == {"future_field": {"x": [1, 2]}}
    assert json.loads(m.to_json()) == data


def test_with_verification_replaces_only_that() -> None:
    m = _full()
    v = Verification.now("failed", "sha256 mismatch")
    m2 = m.with_verification(v)
    assert m2.verification == v and m2.sha256 == m.sha256
    assert not v.ok and m.verification is not None and m.verification.ok


@pytest.mark.parametrize("change", [
    {"sha256": "AB" * 32}, {"sha256": "ab" * 31}, {"sha256": 5}, {"archive_bytes": -1},
    {"archive_bytes": True}, {"archive_bytes": 1.5}, {"archive_bytes": "1"},
    {"file_count": -3}, {"member_count": "9"}, {"path": "srv/data"}, {"path": ""},
    {"path": "/a\0b"}, {"host": ""}, {"host": 7}, {"format": 2}, {"frozen_at": "yesterday"},
    {"frozen_at": "2026-11-26T10:29:33"}, {"freeze_window_ms": -1}, {"freeze_window_ms": "1"},
    {"freeze_window_ms": float("nan")}, {"duplicate_kind": "a b"}, {"duplicate_kind": ""},
    {"verification": {"status": "great", "checked_at": "2026-11-26T10:31:02Z"}},
    {"verification": {"status": "ok", "checked_at": "2026-11-26T10:31:02Z", "x": 1}},
    {"verification": "ok"}, {"stored_at": "now"},
])
def test_bad_values_are_refused(change: dict[str, Any]) -> None:
    data = json.loads(_full().to_json())
    data.update(change)
    with pytest.raises(ValueError):
        Manifest.from_dict(data)


@pytest.mark.parametrize("key", ["host", "path", "slug", "timestamp", "archive_bytes", "sha256"])
def test_required_keys(key: str) -> None:
    data = json.loads(_full().to_json())
    del data[key]
    with pytest.raises(ValueError):
        Manifest.from_dict(data)


@pytest.mark.parametrize("raw", [b"[]", b'"x"', b"null", b"{", b" " * 70000])
def test_not_a_manifest(raw: bytes) -> None:
    with pytest.raises(ValueError):
        Manifest.from_json(raw)


def test_times() -> None:
    when = datetime(2026, 11, 26, 10, 29, 33, 120000, tzinfo=UTC)
    assert utc_iso(when) == "2026-11-26T10:29:33Z"
    assert utc_iso(when, millis=True) == "2026-11-26T10:29:33.120Z"
    assert parse_iso("2026-11-26T11:29:33+01:00") == when.replace(microsecond=0)
    assert to_utc(when.timestamp()) == when
    assert to_utc("2026-11-26T10:29:33.120Z") == when
    assert to_utc(when.astimezone(timezone(timedelta(hours=-5)))) == when
    for bad in (datetime(2026, 1, 1), True, float("inf"), -1, "2026-11-26"):
        with pytest.raises(ValueError):
            to_utc(bad)


def test_sender_fields_are_checked_and_normalised() -> None:
    got = sender_fields({"frozen_at": 1795689155.5, "duplicate_kind": "snapshot",
                         "freeze_window_ms": 12, "file_count": 3, "sha256": "AB" * 32,
                         "session_id": None})
    assert got == {"frozen_at": "2026-11-26T10:32:35.500Z", "duplicate_kind": "snapshot",
                   "freeze_window_ms": 12, "file_count": 3, "sha256": "ab" * 32}
    assert sender_fields(None) == {}


@pytest.mark.parametrize("fields", [
    {"host": "other"}, {"sha256_": "x"}, {"path": "/etc"}, {"file_count": -1},
    {"file_count": "12"}, {"sha256": "zz" * 32}, {"frozen_at": "soon"},
    {"archive_bytes": -5}, {"duplicate_kind": "../x"}, {"verification": {}},
])
def test_bad_sender_fields_are_refused(fields: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        sender_fields(fields)


@pytest.mark.hostile("store", "a manifest or a sender naming a duplicate kind or freezer no "
                              "sanoffload makes ('clone', 'lvm-suspend', escapes)",
                     "refused by the one enum parse (a broken manifest; the put refused)")
@pytest.mark.parametrize("change", [
    {"duplicate_kind": "clone"}, {"duplicate_kind": "Snapshot"}, {"duplicate_kind": 3},
    {"frozen_by": "lvm-suspend"}, {"frozen_by": "fsfreeze\x1b[2J"}, {"frozen_by": ["lvm"]},
])
def test_kinds_are_checked_by_the_enums(change: dict[str, Any]) -> None:
    data = json.loads(_full().to_json())
    data.update(change)
    key = next(iter(change))
    with pytest.raises(ValueError, match=f"manifest: {key}: unknown") as exc:
        Manifest.from_dict(data)
    assert "\x1b" not in str(exc.value)
    with pytest.raises(ValueError, match=key):
        sender_fields(change)


def test_kinds_stay_the_same_strings() -> None:
    from sanoffload.kinds import DuplicateKind, WhoFreezes

    m = Manifest.from_dict({**json.loads(_full().to_json()),
                            "duplicate_kind": DuplicateKind.RAID1_SPLIT,
                            "frozen_by": WhoFreezes.LVM})
    assert type(m.duplicate_kind) is str and type(m.frozen_by) is str
    data = json.loads(m.to_json())
    assert (data["duplicate_kind"], data["frozen_by"]) == ("raid1-split", "lvm")


# -- held: the holding hooks' outputs ------------------------------------------------------
LABEL = ("START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\n"
         "CHECKPOINT LOCATION: 0/2000060\nLABEL: sanoffload\tfs1\n")
HELD = [{"hook": "/etc/sanoffload/hooks/pg-hold", "output": LABEL},
        {"hook": "/etc/sanoffload/hooks/app-hold", "output": ""}]


def test_held_round_trips_through_json_and_sender_fields() -> None:
    fields = sender_fields({"held": HELD, "warnings": ["hold hook /x failed (exit 1): y"]})
    assert fields["held"] == HELD
    m = Manifest(host="fs1", path="/srv/db", slug="srv-db-1", timestamp="20261126T102933Z",
                 archive_bytes=1, sha256=SHA, **fields)
    assert m.held == (HeldOutput(HELD[0]["hook"], LABEL), HeldOutput(HELD[1]["hook"], ""))
    raw = m.to_json()
    assert json.loads(raw)["held"] == HELD  # the text as it was: newlines and tabs kept
    again = Manifest.from_json(raw)
    assert again == m and again.to_json() == raw


def test_a_manifest_without_held_stays_as_it_was() -> None:
    data = json.loads(_full().to_json())
    assert "held" not in data
    assert "held" not in Manifest.from_dict(data).to_dict()


@pytest.mark.hostile("store", "a sender's or a stored manifest's 'held': wrong types, nine "
                              "entries, an output over 64 KiB, escape sequences, or with the "
                              "warnings over 400 KiB of JSON",
                     "refused (ValueError: the put is refused, the manifest is broken)")
@pytest.mark.parametrize("held", [
    "label", [LABEL], [{"hook": "/h", "output": 1}], [{"hook": "/h"}],
    [{"hook": "/h", "output": "x", "extra": 1}],
    [{"hook": f"/h{i}", "output": ""} for i in range(9)],
    [{"hook": "/h", "output": "x" * (64 * 1024 + 1)}],
    [{"hook": "/h", "output": "ok\x1b]0;owned\x07"}],
    [{"hook": "/h\x1b[2J", "output": "ok"}],
])
def test_bad_held_is_refused(held: Any) -> None:
    with pytest.raises(ValueError, match="held"):
        sender_fields({"held": held})
    data = json.loads(_full().to_json())
    data["held"] = held
    with pytest.raises(ValueError, match="held"):
        Manifest.from_dict(data)


def test_held_and_warnings_together_are_bounded() -> None:
    held = [{"hook": f"/h{i}", "output": "\u00e9" * 5_000} for i in range(6)]  # 180 KB as JSON
    warnings = ["\u00e9" * 4000] * 10  # 240 KB as JSON
    sender_fields({"held": held})
    sender_fields({"warnings": warnings})
    with pytest.raises(ValueError, match="warnings and held"):
        sender_fields({"held": held, "warnings": warnings})
