"""The state journal: atomic records, intents written before resources exist."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sanoffload.agent.journal import BaseJournal, BaseRecord, Journal, SessionRecord
from sanoffload.errors import JournalError, UsageError

pytestmark = pytest.mark.unit


def _record(sid: str = "fs1-0a1b2c3d") -> SessionRecord:
    return SessionRecord(session_id=sid, client="px1", initiator="iqn.2026-11.org.x:px1",
                         path="/srv/data")


def test_intent_is_on_disk_before_the_resource_is_made(tmp_path: Path) -> None:
    j = Journal(tmp_path)
    rec = _record()
    j.save(rec)
    res = j.intend(rec, "snapshot", vg="datavg", name="sanoffload-fs1-0a1b2c3d")
    on_disk = json.loads((tmp_path / "sessions" / "fs1-0a1b2c3d.json").read_text())
    assert on_disk["resources"] == [{"kind": "snapshot", "state": "intended",
                                     "fields": {"vg": "datavg",
                                                "name": "sanoffload-fs1-0a1b2c3d"}}]
    j.done(rec, res, size=67108864)
    again = j.load("fs1-0a1b2c3d")
    assert again is not None
    assert again.resources[0].state == "created"
    assert again.resources[0].fields["size"] == 67108864
    j.forget(rec, res)
    assert j.load("fs1-0a1b2c3d").resources == []  # type: ignore[union-attr]


def test_records_round_trip_and_list(tmp_path: Path) -> None:
    j = Journal(tmp_path)
    for sid in ("fs1-aaaa", "fs1-bbbb"):
        rec = _record(sid)
        j.intend(rec, "lio-target", iqn=f"iqn.2026-11.org.sanoffload:fs1.{sid}")
    assert sorted(r.session_id for r in j) == ["fs1-aaaa", "fs1-bbbb"]
    j.remove("fs1-aaaa")
    j.remove("fs1-aaaa")  # idempotent
    assert [r.session_id for r in j] == ["fs1-bbbb"]


def test_no_temporary_files_are_left_and_files_are_private(tmp_path: Path) -> None:
    j = Journal(tmp_path)
    j.save(_record())
    names = [p.name for p in (tmp_path / "sessions").iterdir()]
    assert names == ["fs1-0a1b2c3d.json"]
    assert (tmp_path / "sessions").stat().st_mode & 0o077 == 0


@pytest.mark.parametrize("sid", ["../etc/passwd", "a/b", "", "X" * 80, "UPPER"])
def test_session_ids_that_could_escape_are_refused(tmp_path: Path, sid: str) -> None:
    with pytest.raises(UsageError):
        Journal(tmp_path).load(sid)


def test_unknown_resource_kinds_are_refused(tmp_path: Path) -> None:
    j = Journal(tmp_path)
    with pytest.raises(ValueError):
        j.intend(_record(), "nfs-export", path="/x")


def test_a_corrupt_record_does_not_hide_the_others(tmp_path: Path) -> None:
    j = Journal(tmp_path)
    j.save(_record("fs1-good"))
    (tmp_path / "sessions" / "fs1-bad.json").write_text("{not json")
    assert [r.session_id for r in j] == ["fs1-good"]
    assert [exc.paths for exc in j.broken()] == [[str(tmp_path / "sessions" / "fs1-bad.json")]]


@pytest.mark.hostile("agent", "a journal record that is not JSON, has fields of the wrong "
                     "type, or names another session than its file", "JournalError naming "
                     "the file (exit 13), no traceback")
@pytest.mark.parametrize("content", [
    "{not json", "", "null", "[]", '{"session_id": "fs1-bad"}',
    ('{"session_id": "fs1-bad", "client": "px1", "initiator": "i", "path": "/", '
     '"lease_expires": "soon"}'),
    ('{"session_id": "fs1-bad", "client": "px1", "initiator": "i", "path": "/", '
     '"resources": [{"kind": "snapshot", "fields": []}]}'),
    ('{"session_id": "fs1-bad", "client": "px1", "initiator": "i", "path": "/", '
     '"resources": ["x"]}'),
    '{"session_id": "fs1-other", "client": "px1", "initiator": "i", "path": "/"}',
    '{"session_id": "../x", "client": "px1", "initiator": "i", "path": "/"}',
    "[" * 30_000 + "]" * 30_000,
], ids=["bad-json", "empty", "null", "list", "fields-missing", "lease-a-string",
        "fields-a-list", "resource-a-string", "another-session", "bad-id", "30000-deep"])
def test_loading_a_corrupt_record_names_the_file(tmp_path: Path, content: str) -> None:
    j = Journal(tmp_path)
    bad = tmp_path / "sessions" / "fs1-bad.json"
    bad.parent.mkdir()
    bad.write_text(content)
    with pytest.raises(JournalError) as info:
        j.load("fs1-bad")
    assert info.value.exit_code == 13 and info.value.paths == [str(bad)]
    assert str(bad) in info.value.message and "\n" not in str(info.value)
    assert list(j) == []
    with pytest.raises(JournalError, match="cleanup: nothing was done: journal record"):
        j.check("cleanup")


def test_check_passes_a_readable_journal(tmp_path: Path) -> None:
    j = Journal(tmp_path)
    j.check("cleanup")  # no directory yet
    j.save(_record())
    j.check("cleanup")


UUID = "NV5dDp-saSw-k7nk-ODGt-FUCg-dGPc-cPh4i0"
OTHER_UUID = "Xq9wPz-aB3c-Dd4e-Ef5g-Gh6i-Ij7k-Kl8mN0"


def _base(uuid: str = UUID) -> BaseRecord:
    return BaseRecord(origin_vg="datavg", origin_lv="thin", origin_uuid=uuid, pool="pool",
                      name="sanoffload-base_fs1-1a2b3c4d", uuid=OTHER_UUID, thin_id=2,
                      size_bytes=1 << 30, backup="fs1/srv-thin-0a1b2c3d/20261125T020000Z")


def test_base_records_round_trip_and_are_private(tmp_path: Path) -> None:
    j = BaseJournal(tmp_path)
    assert j.load(UUID) is None and list(j) == [] and j.broken() == []
    rec = _base()
    j.save(rec)
    assert j.load(UUID) == rec and list(j) == [rec]
    assert (tmp_path / "bases").stat().st_mode & 0o777 == 0o700
    j.remove(UUID)
    assert j.load(UUID) is None
    with pytest.raises(UsageError):
        j.load("../sessions/x")


@pytest.mark.hostile("agent", "a base record that is not JSON, nested 30000 deep, or names "
                     "another volume than its file", "JournalError naming the file and why "
                     "(exit 13), no traceback")
@pytest.mark.parametrize("content,why", [
    ("{not json", "Expecting property name"),
    ("[" * 30_000 + "]" * 30_000, "nested too deeply"),
    (json.dumps(_base(OTHER_UUID).to_dict()), f"it holds the base of '{OTHER_UUID}'"),
], ids=["bad-json", "30000-deep", "another-volume"])
def test_loading_a_corrupt_base_record_names_the_file(tmp_path: Path, content: str,
                                                      why: str) -> None:
    j = BaseJournal(tmp_path)
    bad = tmp_path / "bases" / f"{UUID}.json"
    bad.parent.mkdir()
    bad.write_text(content)
    with pytest.raises(JournalError) as info:
        j.load(UUID)
    assert info.value.exit_code == 13 and info.value.paths == [str(bad)]
    assert f"base record {bad} is unreadable ({why}" in info.value.message
    assert "full read" in (info.value.hint or "")
    assert list(j) == [] and [exc.paths for exc in j.broken()] == [[str(bad)]]
