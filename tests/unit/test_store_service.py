"""The store's side of the control channel (StoreService) and its configuration.

A real Repository in tmp_path with a CommandRunner: the archive is a real
``tar | zstd`` of a small tree, so the store's test-read on commit and verify
run the real tools. Each test-read costs two command starts (~0.2 s), so
backups a test only needs as a starting point are put with ``verify=False``,
and tests about bookkeeping (quota, recorded comparisons) use a repository
whose runner fakes ``zstd -t`` and ``tar --list``. The serve loop runs in a
thread (in_process_connector); the proxy's StoreClient / RemoteWriter /
compare_stored_archive talk to it.
"""

from __future__ import annotations

import hashlib
import io
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from sanoffload.channel.client import in_process_connector
from sanoffload.channel.protocol import CHUNK
from sanoffload.channel.server import serve
from sanoffload.errors import (
    AuthError,
    ConfigError,
    IntegrityError,
    ProtocolError,
    RefusedError,
    ResourceError,
    UsageError,
)
from sanoffload.proxy.compare import compare_stored_archive
from sanoffload.proxy.peers import StoreClient
from sanoffload.runner import CommandRunner
from sanoffload.store import config as store_config
from sanoffload.store.repo import Repository
from sanoffload.store.service import StoreService
from tests.unit.conftest import listing_runner

pytestmark = pytest.mark.unit

FROZEN = "2026-11-26T10:29:33.120Z"
TS = "20261126T102933Z"


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    (tmp_path / "repo").mkdir()
    return Repository(tmp_path / "repo", CommandRunner())


@pytest.fixture
def fake_repo(tmp_path: Path) -> Repository:
    """A repository whose test-reads are faked (for tests about bookkeeping only)."""
    (tmp_path / "fake-repo").mkdir()
    return Repository(tmp_path / "fake-repo", listing_runner())


def stored(repo: Repository, data: bytes, host: str = "fs1", path: str = "/srv/data",
           frozen_at: str = FROZEN) -> str:
    """A backup put straight into the repository, without the test-read: its id."""
    return str(repo.put(host, path, io.BytesIO(data), {"frozen_at": frozen_at}, verify=False))


class Served:
    """A StoreService behind an in-process connector; ``codes``: serve()'s return values."""

    def __init__(self, repo: Repository, **kw: Any) -> None:
        self.service = StoreService(repo, "px1", **kw)
        self.codes: list[int] = []
        self.thread_errors: list[BaseException] = []
        #: set when the serve loop has ended and its end of the pipes is closed
        self.gone = threading.Event()

        def run(ch: Any) -> None:
            try:
                self.codes.append(serve(self.service, ch))
            except BaseException as exc:  # checked by the tests
                self.thread_errors.append(exc)
            finally:
                ch.close()
                self.gone.set()

        self.connector = in_process_connector(run, peer="bk1")

    def client(self) -> StoreClient:
        return StoreClient(self.connector, name="bk1")


def put(client: StoreClient, data: bytes, host: str = "fs1", path: str = "/srv/data",
        frozen_at: str = FROZEN) -> dict[str, Any]:
    w = client.writer(host, path, {"frozen_at": frozen_at, "duplicate_kind": "snapshot"})
    assert w.write_from(io.BytesIO(data)) == len(data)
    return w.commit({"file_count": 3})


def no_partials(repo: Repository) -> bool:
    return repo.leftovers() == [] and not list(repo.root.rglob("*.partial"))


# -- put -------------------------------------------------------------------------
def test_put_stores_what_was_sent(repo: Repository, archive: bytes) -> None:
    served = Served(repo)
    with served.client() as client:
        assert client.peer.info == {"client": "px1"}
        w = client.writer("fs1", "/srv/data", {"frozen_at": FROZEN, "duplicate_kind": "snapshot"})
        assert w.id.startswith("fs1/srv-data-") and w.id.endswith(f"/{TS}")
        w.write_from(io.BytesIO(archive))
        backup = w.commit({"file_count": 3})
        listed = client.list("fs1")
    digest = hashlib.sha256(archive).hexdigest()
    assert backup["id"] == w.id
    assert backup["sha256"] == digest == w.sha256
    assert backup["archive_bytes"] == len(archive)
    assert backup["verification"]["status"] == "ok"
    assert backup["frozen_at"] == FROZEN and backup["file_count"] == 3
    assert [b["id"] for b in listed] == [w.id]
    [stored] = repo.list()
    assert str(stored.id) == w.id
    assert stored.manifest.sha256 == digest
    assert stored.archive.read_bytes() == archive
    assert no_partials(repo)
    assert served.codes == [0] and served.thread_errors == []


@pytest.mark.parametrize("lie", ["sha256", "archive_bytes"])
def test_a_commit_that_does_not_match_the_data_stores_nothing(repo: Repository, archive: bytes,
                                                               lie: str) -> None:
    served = Served(repo)
    with served.client() as client:
        w = client.writer("fs1", "/srv/data", {"frozen_at": FROZEN})
        w.write_from(io.BytesIO(archive))
        fields = {"sha256": hashlib.sha256(archive).hexdigest(), "archive_bytes": len(archive)}
        fields[lie] = "0" * 64 if lie == "sha256" else len(archive) + 1
        client.channel.end_chunks()
        client.channel.send({"op": "commit", "fields": fields})
        with pytest.raises(IntegrityError, match="the sender says"):
            client.reply()
        assert client.list() == []  # the connection goes on
    assert repo.list() == []
    assert no_partials(repo)
    assert served.codes == [0]


def test_a_commit_with_bad_fields_stores_nothing(repo: Repository, archive: bytes) -> None:
    served = Served(repo)
    with served.client() as client:
        w = client.writer("fs1", "/srv/data", {})
        w.write_from(io.BytesIO(archive))
        with pytest.raises(UsageError, match="unknown manifest field 'colour'"):
            w.commit({"colour": "red"})
        assert client.list() == []
    assert no_partials(repo)


def test_abort_stores_nothing_and_the_connection_goes_on(repo: Repository,
                                                        archive: bytes) -> None:
    served = Served(repo)
    with served.client() as client:
        w = client.writer("fs1", "/srv/data", {"frozen_at": FROZEN})
        w.write_from(io.BytesIO(archive[:100]))
        w.abort("tar failed")
        assert no_partials(repo)
        assert client.list() == []  # the connection goes on
        # the same backup can be sent again: the aborted one left nothing in the way
        again = client.writer("fs1", "/srv/data", {"frozen_at": FROZEN})
        assert again.id == w.id
        again.abort()
    assert repo.list() == []
    assert no_partials(repo)
    assert served.codes == [0]


def test_bad_put_fields_are_refused_before_the_data(repo: Repository) -> None:
    served = Served(repo)
    with served.client() as client:
        with pytest.raises(UsageError, match="put: manifest fields"):
            client.writer("fs1", "/srv/data", {"frozen_at": "yesterday"})
        with pytest.raises(UsageError, match="put: manifest fields"):
            client.writer("fs1", "/srv/data", {"owner": "me"})
        assert client.list() == []
    assert list(repo.root.iterdir()) == []


def test_a_second_put_of_the_same_backup_is_refused(repo: Repository, archive: bytes) -> None:
    first = stored(repo, archive)
    served = Served(repo)
    with served.client() as client:
        with pytest.raises(ResourceError, match="already exists"):
            put(client, archive)
        assert [b["id"] for b in client.list()] == [first]
    assert repo.get(first).archive.read_bytes() == archive
    assert no_partials(repo)


# -- quota ------------------------------------------------------------------------
def test_a_put_bigger_than_the_quota_is_refused(repo: Repository) -> None:
    served = Served(repo, quota_bytes=1000)
    # more than the pipe and a chunk hold: the writes must meet the refusal, not outrun it
    data = os.urandom(8 * CHUNK + 5)  # never committed: no need for a real archive
    with served.client() as client:
        w = client.writer("fs1", "/srv/data", {})
        with pytest.raises(ResourceError, match="quota of 1000 bytes would be exceeded"):
            w.write_from(io.BytesIO(data))
    assert served.codes == [7]  # the data stream is broken: the connection ends
    assert repo.list() == []
    assert no_partials(repo)


def test_a_used_up_quota_refuses_the_put_request(repo: Repository, archive: bytes) -> None:
    stored(repo, archive)
    served = Served(repo, quota_bytes=len(archive))
    with served.client() as client:
        with pytest.raises(ResourceError, match=f"used up \\({len(archive)} bytes stored\\)"):
            client.writer("fs1", "/srv/other", {})
        assert len(client.list()) == 1  # refused before any data: the connection goes on
    assert served.codes == [0]
    assert no_partials(repo)


def test_a_put_of_exactly_the_quota_is_stored(fake_repo: Repository) -> None:
    data = os.urandom(5000)
    served = Served(fake_repo, quota_bytes=len(data))
    with served.client() as client:
        put(client, data)
    assert [b.manifest.archive_bytes for b in fake_repo.list()] == [len(data)]


def test_a_quota_hit_on_the_last_chunk_is_reported_as_such(repo: Repository) -> None:
    served = Served(repo, quota_bytes=10)
    client = served.client()
    try:
        w = client.writer("fs1", "/srv/data", {})
        w.write_from(io.BytesIO(b"x" * 100))  # one small chunk: buffered, not refused yet
        send = client.channel.send

        def send_once_the_store_hung_up(msg: Any) -> None:
            served.gone.wait(10)  # the store refused the data and closed: ssh exited
            send(msg)

        client.channel.send = send_once_the_store_hung_up  # type: ignore[method-assign]
        with pytest.raises(ResourceError, match="quota of 10 bytes would be exceeded"):
            w.commit()
    finally:
        client.close(quiet=True)
    assert served.codes == [7]


# -- hosts --------------------------------------------------------------------------
def test_a_client_reaches_only_its_hosts(repo: Repository, archive: bytes) -> None:
    other = stored(repo, archive, host="fs2")
    mine = stored(repo, archive, host="fs1")
    served = Served(repo, hosts=("fs1",))
    with served.client() as client:
        with pytest.raises(AuthError, match="client px1 may not store or read backups of 'fs2'"):
            client.writer("fs2", "/srv/other", {})
        with pytest.raises(AuthError, match="'fs2'"):
            client.list("fs2")
        with pytest.raises(AuthError, match="'fs2'"):
            client.get(other, io.BytesIO())
        with pytest.raises(AuthError, match="'fs2'"):
            client.verify(other, {"status": "ok", "detail": ""})
        assert [b["id"] for b in client.list()] == [mine]  # fs2's is not shown
        assert [b["id"] for b in client.list("fs1")] == [mine]
        client.writer("fs1", "/srv/other", {}).abort()  # its own host: the put starts
    assert len(repo.list()) == 2
    assert repo.get(other).manifest.compared is None
    assert no_partials(repo)
    assert served.codes == [0]


# -- get ---------------------------------------------------------------------------
def test_get_sends_the_stored_archive(repo: Repository, archive: bytes) -> None:
    bid = stored(repo, archive)
    with Served(repo).client() as client:
        out = io.BytesIO()
        got = client.get(bid, out)
    assert out.getvalue() == archive
    assert got["id"] == bid
    assert got["sha256"] == hashlib.sha256(archive).hexdigest()


def test_get_of_several_chunks(repo: Repository) -> None:
    data = os.urandom(2 * CHUNK + 77)
    bid = stored(repo, data, path="/srv/big")
    with Served(repo).client() as client:
        out = io.BytesIO()
        client.get(bid, out)
        assert client.list()[0]["id"] == bid  # in step after the data
    assert out.getvalue() == data


def test_get_of_a_damaged_archive_is_refused_before_sending(repo: Repository,
                                                           archive: bytes) -> None:
    bid = stored(repo, archive)
    path = repo.get(bid).archive
    assert path.stat().st_mode & 0o777 == 0o440
    path.chmod(0o640)
    damaged = bytearray(path.read_bytes())
    damaged[len(damaged) // 2] ^= 0x01
    path.write_bytes(damaged)
    with Served(repo).client() as client:
        out = io.BytesIO()
        with pytest.raises(IntegrityError, match="sha256 mismatch"):
            client.get(bid, out)
        assert out.getvalue() == b""
        assert len(client.list()) == 1  # the connection goes on


def test_get_of_an_unknown_backup(repo: Repository) -> None:
    with Served(repo).client() as client:
        with pytest.raises(UsageError, match="no such backup"):
            client.get(f"fs1/srv-data-00000000/{TS}", io.BytesIO())
        with pytest.raises(RefusedError, match="invalid backup id"):
            client.get("fs1/etc", io.BytesIO())
        with pytest.raises(RefusedError, match="invalid object slug '..'"):
            client.get(f"fs1/../{TS}", io.BytesIO())
        assert client.list() == []


# -- verify ------------------------------------------------------------------------
def test_verify_records_the_proxys_comparison(repo: Repository, archive: bytes) -> None:
    bid = stored(repo, archive)
    assert repo.get(bid).manifest.verification.status == "not-verified"  # type: ignore[union-attr]
    with Served(repo).client() as client:
        verified = client.verify(bid, {"status": "ok", "detail": ""})
    assert verified["compared"]["status"] == "ok"
    assert verified["verification"]["status"] == "ok"  # the real zstd -t and tar --list
    manifest = repo.get(bid).manifest
    assert manifest.compared is not None and manifest.compared.status == "ok"
    assert manifest.verification is not None and manifest.verification.status == "ok"


def test_verify_records_a_failed_comparison(fake_repo: Repository) -> None:
    bid = stored(fake_repo, b"fake archive")
    with Served(fake_repo).client() as client:
        answer = client.verify(bid, {"status": "failed", "detail": "./x: Size differs"})
        plain = client.verify(bid)  # no comparison: the recorded one stays
    assert answer["compared"]["status"] == "failed"
    assert answer["compared"]["detail"] == "./x: Size differs"
    assert plain["compared"] == answer["compared"]
    compared = fake_repo.get(bid).manifest.compared
    assert compared is not None and compared.status == "failed"


@pytest.mark.parametrize("compared", [{"status": "maybe", "detail": ""},
                                      {"status": "not-verified"},
                                      {"status": "ok", "detail": 3},
                                      {"status": "ok", "detail": "", "by": "me"},
                                      {}])
def test_verify_refuses_a_bad_comparison(fake_repo: Repository,
                                         compared: dict[str, Any]) -> None:
    bid = stored(fake_repo, b"fake archive")
    with Served(fake_repo).client() as client:
        with pytest.raises(ProtocolError, match="'compared' must be"):
            client.verify(bid, compared)
        assert len(client.list()) == 1  # the connection goes on
    assert fake_repo.get(bid).manifest.compared is None


# -- compare_stored_archive -------------------------------------------------------------------
def test_compare_with_the_tree_the_archive_was_made_of(repo: Repository, archive: bytes,
                                                       tree: Path) -> None:
    runner = CommandRunner()
    bid = stored(repo, archive)
    with Served(repo).client() as client:
        assert compare_stored_archive(runner, client, bid, str(tree), timeout=60) == (True, "")
        (tree / "sub" / "a.txt").write_text("HELLO\n")  # same size, other content
        same, detail = compare_stored_archive(runner, client, bid, str(tree), timeout=60)
        assert client.list()[0]["id"] == bid  # still in step
    assert same is False
    assert "sub/a.txt" in detail
    assert "b.bin" not in detail


# -- store.toml ----------------------------------------------------------------------
GOOD = """
[clients.px1]
repo = "/srv/backups/"
quota_gb = 0.5
hosts = ["fs1", "fs2.example.org"]

[clients.px2]
repo = "/srv/other"
"""


def test_parse_a_good_config() -> None:
    clients = store_config.parse(GOOD, "store.toml")
    assert clients == {
        "px1": store_config.StoreClient("px1", "/srv/backups", 1 << 29, ("fs1", "fs2.example.org")),
        "px2": store_config.StoreClient("px2", "/srv/other", None, None),
    }


@pytest.mark.parametrize("text, where", [
    ('colour = 1\n[clients.px1]\nrepo = "/srv"', "store.toml: colour: unknown key"),
    ('[clients.px1]\nrepo = "/srv"\nretention = 3',
     "store.toml: clients.px1.retention: unknown key"),
    ('[clients.px1]\nrepo = "srv/backups"', "store.toml: clients.px1.repo: required"),
    ('[clients.px1]\nrepo = "/srv/../etc"', "store.toml: clients.px1.repo"),
    ('[clients.px1]\nquota_gb = 1', "store.toml: clients.px1.repo"),
    ('[clients.px1]\nrepo = 5', "store.toml: clients.px1.repo"),
    ('[clients.px1]\nrepo = "/srv"\nquota_gb = 0', "store.toml: clients.px1.quota_gb"),
    ('[clients.px1]\nrepo = "/srv"\nquota_gb = -1', "store.toml: clients.px1.quota_gb"),
    ('[clients.px1]\nrepo = "/srv"\nquota_gb = "10"', "store.toml: clients.px1.quota_gb"),
    ('[clients.px1]\nrepo = "/srv"\nquota_gb = true', "store.toml: clients.px1.quota_gb"),
    ('[clients.px1]\nrepo = "/srv"\nhosts = "fs1"', "store.toml: clients.px1.hosts"),
    ('[clients.px1]\nrepo = "/srv"\nhosts = ["../etc"]', "store.toml: clients.px1.hosts"),
    ('[clients.px1]\nrepo = "/srv"\nhosts = ["fs 1"]', "store.toml: clients.px1.hosts"),
    ('[clients.px1]\nrepo = "/srv"\nhosts = [1]', "store.toml: clients.px1.hosts"),
    ('[clients."px 1"]\nrepo = "/srv"', "store.toml: clients.px 1: client names"),
    ('[clients]\npx1 = "/srv"', "store.toml: clients.px1: must be a table"),
    ("[clients]", "store.toml: clients: no [clients.NAME] table"),
    ("", "store.toml: clients: no [clients.NAME] table"),
    ("clients = [", "store.toml: not valid TOML"),
])
def test_a_bad_config_names_the_key(text: str, where: str) -> None:
    with pytest.raises(ConfigError) as info:
        store_config.parse(text, "store.toml")
    assert info.value.message.startswith(where)
    assert info.value.exit_code == 2


@pytest.mark.parametrize("quota", ["inf", "nan"])
def test_a_non_finite_quota_names_the_key(quota: str) -> None:
    with pytest.raises(ConfigError, match="clients.px1.quota_gb"):
        store_config.parse(f'[clients.px1]\nrepo = "/srv"\nquota_gb = {quota}', "store.toml")


def test_client_for_without_a_file(tmp_path: Path) -> None:
    missing = str(tmp_path / "store.toml")
    with pytest.raises(ConfigError, match="no such file, and no --repo given"):
        store_config.client_for("px1", path=missing)
    assert store_config.client_for("px1", path=missing, repo="/srv/backups") == \
        store_config.StoreClient("px1", "/srv/backups")


def test_client_for_with_a_file(tmp_path: Path) -> None:
    path = tmp_path / "store.toml"
    path.write_text(GOOD)
    found = store_config.client_for("px1", path=str(path))
    assert (found.repo, found.quota_bytes, found.hosts) == ("/srv/backups", 1 << 29,
                                                            ("fs1", "fs2.example.org"))
    # the forced command's --repo may repeat the configured one (in any spelling)
    assert store_config.client_for("px1", path=str(path), repo="/srv/backups/") == found
    with pytest.raises(AuthError, match="client 'px9' is not in"):
        store_config.client_for("px9", path=str(path))
    with pytest.raises(AuthError, match="client 'px2' may use /srv/other, not /srv/backups"):
        store_config.client_for("px2", path=str(path), repo="/srv/backups")


def test_client_for_an_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "store.toml"
    path.write_bytes(b"[clients.px1]\nrepo = \"/srv/\xff\"\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        store_config.client_for("px1", path=str(path))
    with pytest.raises(ConfigError, match="cannot read"):
        store_config.client_for("px1", path=str(tmp_path))  # a directory
