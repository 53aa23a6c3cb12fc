"""The manifest's ``members`` (a consistency group's paths): stored only for a group,
checked as hostile input like every sender field, read back unchanged."""

from __future__ import annotations

import json
from typing import Any

import pytest

from sanoffload.store.manifest import Manifest, sender_fields

pytestmark = pytest.mark.unit

SHA = "ab" * 32


def member(path: str, n: int = 6, **changes: Any) -> dict[str, Any]:
    m = {"path": path, "identifier": f"naa.6001405{n:025x}", "duplicate_kind": "snapshot",
         "fstype": "ext4", "object_kind": "directory"}
    m.update(changes)
    return m


GOOD = [member("/srv/san/db", 1), member("/srv/san/log", 2, object_kind="file",
                                         duplicate_kind="thin-snapshot", fstype="xfs")]


def manifest(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"host": "fs1", "path": "/srv/san/db", "slug": "srv-san-db-1",
                            "timestamp": "20261126T102933Z", "archive_bytes": 10,
                            "sha256": SHA, "members": GOOD}
    data.update(changes)
    return {k: v for k, v in data.items() if v is not None}


def test_a_groups_members_round_trip() -> None:
    m = Manifest.from_dict(manifest())
    assert [x.path for x in m.members] == ["/srv/san/db", "/srv/san/log"]
    assert [x.archive_name for x in m.members] == ["srv/san/db", "srv/san/log"]
    again = Manifest.from_json(m.to_json())
    assert again == m
    assert json.loads(m.to_json())["members"] == GOOD
    assert sender_fields({"members": GOOD}) == {"members": GOOD}


def test_a_single_paths_manifest_has_no_members_key() -> None:
    m = Manifest.from_dict(manifest(members=None))
    assert m.members == () and "members" not in json.loads(m.to_json())
    # an empty list reads as no group, and is not written back
    assert "members" not in Manifest.from_dict(manifest(members=[])).to_dict()


@pytest.mark.hostile("store", "a manifest's or sender's 'members' with unknown or missing keys, "
                     "wrong types, a relative, '..' or control-character path, a bad "
                     "identifier, kind or fstype, one member, nine, duplicates or nesting",
                     "refused (ValueError / usage error) naming members; nothing stored")
@pytest.mark.parametrize("members", [
    "srv", {"path": "/srv"}, [member("/a")], [member(f"/p{i}", i) for i in range(9)],
    [member("/a", 1), {**member("/b", 2), "lun": 1}],
    [member("/a", 1), {k: v for k, v in member("/b", 2).items() if k != "fstype"}],
    [member("/a", 1), member("b", 2)], [member("/a", 1), member("/b/../c", 2)],
    [member("/a", 1), member("/b\x1b[2J", 2)], [member("/a", 1), member("/", 2)],
    [member("/a", 1), member("/b//c", 2)], [member("/a", 1), member("/" + "x" * 5000, 2)],
    [member("/a", 1), member("/b", 2, identifier="naa.12")],
    [member("/a", 1), member("/b", 2, identifier=["naa"])],
    [member("/a", 1), member("/b", 2, duplicate_kind="lvm-magic")],
    [member("/a", 1), member("/b", 2, object_kind="socket")],
    [member("/a", 1), member("/b", 2, fstype="ext4 -o rw")],
    [member("/a", 1), member("/b", 2, fstype=4)],
    [member("/a", 1), member("/a", 2)], [member("/a", 1), member("/a/b", 2)],
    [member("/a", 1), "x"], [member("/a", 1), None],
])
def test_bad_members_are_refused(members: Any) -> None:
    first = members[0]["path"] if isinstance(members, list) and members and \
        isinstance(members[0], dict) else "/a"
    with pytest.raises(ValueError, match="members"):
        Manifest.from_dict(manifest(members=members, path=first))
    with pytest.raises(ValueError, match="members"):
        sender_fields({"members": members})


@pytest.mark.hostile("store", "a group manifest whose first member is not the backup's path",
                     "refused as a broken manifest")
def test_the_first_member_is_the_backups_path() -> None:
    with pytest.raises(ValueError, match="members\\[0\\]"):
        Manifest.from_dict(manifest(path="/srv/other"))


def test_unknown_keys_are_still_kept_apart_from_members() -> None:
    m = Manifest.from_dict(manifest(future={"x": 1}))
    assert m.extra == {"future": {"x": 1}} and len(m.members) == 2
    with pytest.raises(ValueError, match="unknown manifest field"):
        sender_fields({"members": GOOD, "membres": GOOD})
