"""Issue 13, file level: the state file header, the next level, manifests, prune's rule."""

from __future__ import annotations

import pytest

from sanoffload.proxy.offhost import next_level
from sanoffload.store.manifest import Manifest
from sanoffload.tools import tar

pytestmark = pytest.mark.unit

#: the head of a state file GNU tar 1.34 wrote (recorded on this machine), then a record
REAL = b"GNU tar-1.34-2\n1796161436\x00289291417\x000\x001796161436\x00"


def test_header_is_parsed_and_rewritten() -> None:
    h = tar.parse_snapshot_header(REAL)
    assert (h.version, h.seconds, h.nanoseconds) == ("1.34", 1796161436, 289291417)
    new = tar.rewrite_dump_time(REAL, 1796161000, 5)
    assert new == b"GNU tar-1.34-2\n1796161000\x005\x000\x001796161436\x00"
    assert tar.parse_snapshot_header(new).seconds == 1796161000


@pytest.mark.hostile("store", "state files of format 0/1, a sign, a leading zero, 10^9 ns, "
                     "no NUL, 20 digits", "ValueError: never guessed")
@pytest.mark.parametrize("data", [
    b"GNU tar-1.34-1\n1\x000\x00", b"1796161436\n", b"GNU tar-1.34-2\n-1\x000\x00",
    b"GNU tar-1.34-2\n01\x000\x00", b"GNU tar-1.34-2\n1\x001000000000\x00",
    b"GNU tar-1.34-2\n1\x000", b"GNU tar-1.34-2\n" + b"9" * 20 + b"\x000\x00",
    b"GNU tar-x-2\n1\x000\x00", b""])
def test_hostile_headers_are_refused(data: bytes) -> None:
    with pytest.raises(ValueError):
        tar.parse_snapshot_header(data)


def _prev(**over: object) -> dict[str, object]:
    base: dict[str, object] = {"id": "fs1/srv-data-1/20260101T000200Z", "tar_level": 2,
                               "parent": "fs1/srv-data-1/20260101T000100Z",
                               "chain": "fs1/srv-data-1/20260101T000000Z",
                               "snapshot_sha256": "a" * 64, "snapshot_bytes": 10}
    base.update(over)
    return base


def test_next_level() -> None:
    assert next_level(None, 7)[0] == {"tar_level": 0}
    fields, _ = next_level(_prev(), 7)
    assert fields == {"tar_level": 3, "parent": "fs1/srv-data-1/20260101T000200Z",
                      "chain": "fs1/srv-data-1/20260101T000000Z"}
    assert next_level(_prev(), 2)[0] == {"tar_level": 0}  # full_every reached
    assert next_level(_prev(verification={"status": "failed"}), 7)[0] == {"tar_level": 0}


@pytest.mark.hostile("proxy", "a store's previous level with a bogus level, parent or chain",
                     "a new level 0, never a level built on it")
@pytest.mark.parametrize("over", [{"tar_level": -1}, {"tar_level": True}, {"parent": "../x"},
                                  {"chain": "fs2/other-1/20260101T000000Z"},
                                  {"snapshot_sha256": None}, {"id": 3}])
def test_next_level_of_a_hostile_previous(over: dict[str, object]) -> None:
    assert next_level(_prev(**over), 7)[0] == {"tar_level": 0}


@pytest.mark.hostile("store", "manifests with a level but no state file, a parent of another "
                     "path or a later one, level 1 whose chain is not its parent",
                     "refused (a broken manifest)")
@pytest.mark.parametrize("over", [
    {"tar_level": 1, "parent": "fs1/s/20260101T000000Z", "chain": "fs1/s/20260101T000000Z"},
    {"tar_level": 1, "parent": "fs1/t/20260101T000000Z", "chain": "fs1/t/20260101T000000Z",
     "snapshot_sha256": "a" * 64, "snapshot_bytes": 1},
    {"tar_level": 1, "parent": "fs1/s/20270101T000000Z", "chain": "fs1/s/20270101T000000Z",
     "snapshot_sha256": "a" * 64, "snapshot_bytes": 1},
    {"tar_level": 2, "parent": "fs1/s/20260101T000100Z", "chain": "fs1/s/20260101T000200Z",
     "snapshot_sha256": "a" * 64, "snapshot_bytes": 1},
    {"parent": "fs1/s/20260101T000000Z"},
    {"tar_level": 0, "snapshot_sha256": "a" * 64, "snapshot_bytes": 1 << 40},
])
def test_hostile_incremental_manifests(over: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        Manifest(host="fs1", path="/x", slug="s", timestamp="20260102T000000Z",
                 sha256="0" * 64, archive_bytes=1, **over)  # type: ignore[arg-type]


def test_a_good_level_reads_back() -> None:
    m = Manifest(host="fs1", path="/x", slug="s", timestamp="20260102T000000Z", sha256="0" * 64,
                 archive_bytes=1, tar_level=1, parent="fs1/s/20260101T000000Z",
                 chain="fs1/s/20260101T000000Z", snapshot_sha256="a" * 64, snapshot_bytes=9)
    assert Manifest.from_json(m.to_json()) == m
    plain = Manifest(host="fs1", path="/x", slug="s", timestamp="20260102T000000Z",
                     sha256="0" * 64, archive_bytes=1)
    assert "tar_level" not in plain.to_dict()
