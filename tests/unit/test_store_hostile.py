"""The store against hostile and clumsy input (issue 9, items 5-9 and the manifest side of 15).

A real Repository in tmp_path; archives that must be test-read are real
``tar | zstd`` archives read by the real tools (CommandRunner). The serve loop
runs in a thread per connection (in_process_connector), as in
test_store_service.py. The killed put is a real child process killed with
SIGKILL.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from sanoffload import cli
from sanoffload.channel.client import in_process_connector
from sanoffload.channel.server import serve
from sanoffload.errors import IntegrityError, RefusedError, ResourceError, UsageError
from sanoffload.proxy.peers import StoreClient
from sanoffload.runner import CommandRunner
from sanoffload.store import manifest as manifest_mod
from sanoffload.store.manifest import Manifest
from sanoffload.store.prune import Policy, prune
from sanoffload.store.repo import (
    MAX_TIMEOUT,
    BackupId,
    Quota,
    Repository,
    read_timeout,
    slug_for_path,
)
from sanoffload.store.service import StoreService
from tests.unit.conftest import make_archive

pytestmark = pytest.mark.unit

FROZEN = "2026-11-26T10:29:33.120Z"
TS = "20261126T102933Z"
REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    (tmp_path / "repo").mkdir()
    return Repository(tmp_path / "repo", CommandRunner())


class Served:
    """A StoreService for ``client`` behind an in-process connector."""

    def __init__(self, repo: Repository, client: str = "px1", **kw: Any) -> None:
        self.service = StoreService(repo, client, **kw)
        self.codes: list[int] = []

        def run(ch: Any) -> None:
            try:
                self.codes.append(serve(self.service, ch))
            finally:
                ch.close()

        self.connector = in_process_connector(run, peer="bk1")

    def client(self) -> StoreClient:
        return StoreClient(self.connector, name="bk1")


def random_archive(tmp_path: Path, name: str, size: int) -> bytes:
    """A real .tar.zst of one incompressible file of ``size`` bytes."""
    src = tmp_path / f"src-{name}"
    src.mkdir()
    (src / "data.bin").write_bytes(os.urandom(size))
    return make_archive(src)


def nothing_left(repo: Repository) -> bool:
    """No partial file, no reservation, no half-made backup anywhere in the repository."""
    stray = [p for p in repo.root.rglob("*") if p.name.endswith(".partial")]
    reservations = repo.root / ".sanoffload-reservations"
    held = list(reservations.iterdir()) if reservations.exists() else []
    return repo.leftovers() == [] and stray == [] and held == []


def write_manifest(repo: Repository, host: str, path: str, ts: str, raw: bytes,
                   archive: bytes = b"x") -> BackupId:
    """A backup's two files written by hand (what a crash, an old version or an attacker left)."""
    bid = BackupId(host, slug_for_path(path), ts)
    directory = repo.root / bid.host / bid.slug
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{ts}.tar.zst").write_bytes(archive)
    (directory / f"{ts}.json").write_bytes(raw)
    return bid


def good_manifest(host: str, path: str, ts: str, archive: bytes = b"x", **kw: Any) -> bytes:
    import hashlib
    return Manifest(host=host, path=path, slug=slug_for_path(path), timestamp=ts,
                    archive_bytes=len(archive), sha256=hashlib.sha256(archive).hexdigest(),
                    **kw).to_json()


# -- item 5: the quota across concurrent puts, and per client ---------------------------
@pytest.mark.hostile("store", "three puts opened at once, each 0.6 x the client's quota",
                     "the quota holds: one stored, the others refused (exit 7), nothing left")
def test_concurrent_puts_stay_within_the_quota(repo: Repository, tmp_path: Path) -> None:
    archives = [random_archive(tmp_path, str(i), 1_500_000) for i in range(3)]
    quota = int(max(len(a) for a in archives) / 0.6)
    served = Served(repo, quota_bytes=quota)
    clients = [served.client() for _ in archives]
    # every put is opened (and passes the check before the data) before any data is sent
    writers = [c.writer("fs1", f"/srv/d{i}", {"frozen_at": FROZEN}) for i, c in enumerate(clients)]
    start = threading.Barrier(len(writers))
    outcome: list[Any] = [None] * len(writers)

    def send(i: int) -> None:
        start.wait()
        try:
            writers[i].write_from(io.BytesIO(archives[i]))
            outcome[i] = writers[i].commit()
        except ResourceError as exc:
            outcome[i] = exc

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(writers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for c in clients:
        c.close(quiet=True)
    stored = [o for o in outcome if isinstance(o, dict)]
    refused = [o for o in outcome if isinstance(o, ResourceError)]
    assert len(stored) == 1 and len(refused) == 2, outcome
    assert all(e.exit_code == 7 and "quota" in e.message for e in refused)
    assert sum(b.manifest.archive_bytes for b in repo.list()) <= quota
    assert [b.manifest.client for b in repo.list()] == ["px1"]
    assert nothing_left(repo)


@pytest.mark.hostile("store", "a client sharing a repository with another that filled its quota",
                     "each client is charged for the backups it put only")
def test_a_client_is_charged_only_for_its_own_backups(repo: Repository, tmp_path: Path) -> None:
    archive = random_archive(tmp_path, "a", 50_000)
    with Served(repo, "px2", quota_bytes=len(archive)).client() as px2:
        w = px2.writer("fs1", "/srv/a", {"frozen_at": FROZEN})
        w.write_from(io.BytesIO(archive))
        w.commit()
        with pytest.raises(ResourceError, match="used up"):
            px2.writer("fs1", "/srv/b", {})
    with Served(repo, "px1", quota_bytes=len(archive)).client() as px1:
        w = px1.writer("fs1", "/srv/b", {"frozen_at": FROZEN})
        w.write_from(io.BytesIO(archive))
        w.commit()
    assert sorted(b.manifest.client or "" for b in repo.list()) == ["px1", "px2"]
    assert repo.charged("px1") == repo.charged("px2") == len(archive)


def test_backups_of_no_recorded_client_are_charged_to_every_client_that_may_read_them(
        repo: Repository) -> None:
    repo.put("fs1", "/srv/old", io.BytesIO(b"a" * 100), {"frozen_at": FROZEN}, verify=False)
    assert repo.list()[0].manifest.client is None
    assert repo.charged("px1") == 100
    assert repo.charged("px1", hosts=("fs1",)) == 100
    assert repo.charged("px1", hosts=("fs2",)) == 0


# -- item 9: a killed put's partial ----------------------------------------------------
_CHILD = """
import io, sys
from sanoffload.store.repo import Quota, Repository
repo = Repository(sys.argv[1])
w = repo.writer("fs1", "/srv/data", timestamp=sys.argv[2],
                quota=Quota("px1", int(sys.argv[3])))
w.write(b"x" * int(sys.argv[3]))
print("ready", flush=True)
sys.stdin.read()  # until killed
"""


@pytest.mark.hostile("store", "a put killed with SIGKILL half-way, then the same backup again",
                     "the dead put's partial and reservation are swept; a live one is refused")
def test_a_killed_puts_partial_does_not_block_a_retry(repo: Repository) -> None:
    quota = 1000
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(repo.root), TS, str(quota)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=REPO_ROOT)
    try:
        assert child.stdout is not None and child.stdout.readline() == b"ready\n"
        # alive: its partial is not ours to take, and its reservation counts
        with pytest.raises(ResourceError, match="a backup of this id is being written"):
            repo.writer("fs1", "/srv/data", timestamp=TS)
        with pytest.raises(ResourceError, match="quota"):
            with repo.writer("fs1", "/srv/other", quota=Quota("px1", quota)) as w:
                w.write(b"y")
        assert list(repo.root.rglob("*.partial"))
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    assert child.returncode == -signal.SIGKILL
    with repo.writer("fs1", "/srv/data", timestamp=TS, quota=Quota("px1", quota)) as w:
        w.write(b"z" * quota)
        backup = w.commit(verify=False)
    assert backup.archive.read_bytes() == b"z" * quota
    assert nothing_left(repo)


# -- item 6: a long list over the channel -----------------------------------------------
@pytest.mark.hostile("store", "list over the channel of 3,000 backups (replies over 1 MiB)",
                     "paged: the proxy gets all 3,000")
def test_list_of_3000_backups_over_the_channel(repo: Repository) -> None:
    ids = []
    for i in range(3000):
        ts = f"2026{1 + i // 500:02d}{1 + i % 28:02d}T{i % 24:02d}{i % 60:02d}00Z"
        path = f"/srv/data{i % 7}"
        ids.append(write_manifest(repo, "fs1", path, ts, good_manifest("fs1", path, ts)))
    ids.sort()
    assert len(set(ids)) == 3000
    with Served(repo).client() as client:
        listed = client.list()
        assert [b["id"] for b in listed] == [str(i) for i in ids]
        assert client.list("fs2") == []


def test_list_pages_refuse_a_store_that_does_not_move_on(repo: Repository) -> None:
    from sanoffload.errors import ProtocolError

    class Stuck(StoreService):
        def handle(self, op: str, fields: dict[str, Any], channel: Any) -> Any:
            return {"backups": [{"id": f"fs1/s/{TS}"}], "next": f"fs1/s/{TS}"}

    service = Stuck(repo, "px1")
    connector = in_process_connector(lambda ch: serve(service, ch), peer="bk1")
    with StoreClient(connector, name="bk1") as client:
        with pytest.raises(ProtocolError, match="did not move on"):
            client.list()


# -- item 7: one bad manifest ----------------------------------------------------------------
def bad_manifest(kind: str, ts: str) -> bytes:
    if kind == "30,000-deep JSON":
        return b"[" * 30000 + b"]" * 30000
    data = json.loads(good_manifest("fs1", "/srv/data", ts))
    if kind == "frozen_at out of range":
        data["frozen_at"] = "9999-12-31T23:59:59-23:59"
    elif kind == "stored_at out of range":
        data["stored_at"] = "0001-01-01T00:00:00+01:00"
    elif kind == "checked_at out of range":
        data["verification"] = {"status": "ok", "checked_at": "9999-12-31T23:00:00-05:00"}
    else:
        data["colour"] = json.loads("[" * 500 + "]" * 500)
    return json.dumps(data).encode()


@pytest.fixture
def with_bad_manifest(repo: Repository, tmp_path: Path, request: pytest.FixtureRequest
                      ) -> tuple[Repository, list[BackupId], BackupId]:
    """Two good backups (real archives) around one with a bad manifest, all of one object."""
    good = []
    for n, ts in enumerate(["20261120T100000Z", "20261122T100000Z"]):
        archive = random_archive(tmp_path, str(n), 1000)
        good.append(write_manifest(repo, "fs1", "/srv/data", ts,
                                   good_manifest("fs1", "/srv/data", ts, archive), archive))
    bad = write_manifest(repo, "fs1", "/srv/data", "20261121T100000Z",
                         bad_manifest(request.param, "20261121T100000Z"))
    return repo, good, bad


KINDS = ["30,000-deep JSON", "frozen_at out of range", "stored_at out of range",
         "checked_at out of range", "deep unknown key"]


@pytest.mark.hostile("store", "a manifest of 30,000-deep JSON, a time out of Python's range "
                              "or 500-deep unknown values, beside good ones",
                     "list shows it broken, prune leaves it, verify fails it; the rest go on")
@pytest.mark.parametrize("with_bad_manifest", KINDS, indirect=True)
def test_a_bad_manifest_is_reported_and_the_rest_go_on(
        with_bad_manifest: tuple[Repository, list[BackupId], BackupId],
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    repo, good, bad = with_bad_manifest
    monkeypatch.setattr(cli, "make_runner", CommandRunner)
    base = ["store", "--repo", str(repo.root)]
    assert [b.id for b in repo.list()] == good
    assert [b.id for b in repo.broken()] == [bad]
    with pytest.raises(IntegrityError, match="manifest"):
        repo.get(bad)

    assert cli.run([*base, "list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out[1:]] == [str(good[0]), str(bad), str(good[1])]
    assert "BROKEN" in out[2]
    assert cli.run([*base, "list", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [d["id"] for d in data] == [str(good[0]), str(bad), str(good[1])]
    assert set(data[1]) == {"id", "broken"}

    assert cli.run([*base, "verify", "--all"]) == 12
    captured = capsys.readouterr()
    assert f"FAILED {bad}" in captured.out
    assert f"ok {good[0]}" in captured.out and f"ok {good[1]}" in captured.out
    assert "Traceback" not in captured.err

    # keep-last 1 would remove good[0]; the broken one neither counts nor goes
    assert cli.run([*base, "prune", "--keep-last", "1"]) == 0
    said = capsys.readouterr().out
    assert f"removed {good[0]}" in said and f"broken {bad}" in said
    assert [b.id for b in repo.list()] == [good[1]]
    assert [b.id for b in repo.broken()] == [bad]

    with Served(repo).client() as client:
        assert [b.get("broken") is not None for b in client.list()] == [True, False]


def test_prune_never_removes_on_the_basis_of_a_broken_manifest(repo: Repository) -> None:
    for ts in ("20261120T100000Z", "20261121T100000Z"):
        write_manifest(repo, "fs1", "/srv/data", ts, good_manifest("fs1", "/srv/data", ts))
    bad = write_manifest(repo, "fs1", "/srv/data", "20261122T100000Z", b"{")
    plan = prune(repo, Policy(last=1))
    assert [str(b.id) for b, _ in plan.keep] == ["fs1/" + bad.slug + "/20261121T100000Z"]
    assert [b.id for b in plan.broken] == [bad]
    assert plan.to_dict()["broken"][0]["id"] == str(bad)
    assert (repo.root / bad.host / bad.slug / f"{bad.timestamp}.tar.zst").exists()


@pytest.mark.hostile("store", "a put whose frozen_at is out of Python's time range",
                     "refused as a usage error (exit 2), no traceback; the connection goes on")
@pytest.mark.parametrize("when", ["9999-12-31T23:59:59-23:59", "0001-01-01T00:00:00+01:00"])
def test_a_put_with_a_time_out_of_range_is_refused(repo: Repository, when: str) -> None:
    with Served(repo).client() as client:
        with pytest.raises(UsageError, match="put: manifest fields"):
            client.writer("fs1", "/srv/data", {"frozen_at": when})
        assert client.list() == []
    assert list(repo.root.iterdir()) == []


@pytest.mark.hostile("store", "a put saying source_bytes = 2**62 (or a freeze of years)",
                     "refused (exit 2); no time limit can be pushed past MAX_TIMEOUT")
@pytest.mark.parametrize("fields", [{"source_bytes": 2**62}, {"file_count": 2**62},
                                    {"freeze_window_ms": 1e15}])
def test_sizes_and_times_a_sender_gives_are_bounded(repo: Repository,
                                                    fields: dict[str, Any]) -> None:
    with Served(repo).client() as client:
        with pytest.raises(UsageError, match="put: manifest fields"):
            client.writer("fs1", "/srv/data", fields)
    assert read_timeout(2**62) == MAX_TIMEOUT
    assert read_timeout(10, 2**62) == MAX_TIMEOUT
    assert read_timeout(0) < MAX_TIMEOUT


# -- item 8: control characters ------------------------------------------------------------
@pytest.mark.hostile("store", "a put of a path with a newline and terminal escapes",
                     "refused (exit 3) before anything is written")
@pytest.mark.parametrize("path", ["/srv/da\nfs1/forged/20260101T000000Z",
                                  "/srv/\x1b]0;owned\x07data", "/srv/\u202edata"])
def test_a_path_with_control_characters_is_refused_at_put(repo: Repository, path: str) -> None:
    with Served(repo).client() as client:
        with pytest.raises(RefusedError, match="control character"):
            client.writer("fs1", path, {})
        assert client.list() == []
    with pytest.raises(RefusedError, match="control character"):
        repo.put("fs1", path, io.BytesIO(b"x"), verify=False)
    assert list(repo.root.iterdir()) == []


@pytest.mark.hostile("store", "a stored manifest (from an older version) whose path and "
                              "warnings hold a newline and escapes",
                     "store list shows them escaped, one line per backup")
def test_list_escapes_what_a_manifest_holds(repo: Repository,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    data = json.loads(good_manifest("fs1", "/srv/x", TS))
    data["path"] = "/srv/x\nfs1/forged/20260101T000000Z \x1b]0;owned\x07"
    data["warnings"] = ["hook said \x1b[2J"]
    write_manifest(repo, "fs1", "/srv/x", TS, json.dumps(data).encode())
    assert cli.run(["store", "--repo", str(repo.root), "list"]) == 0
    out = capsys.readouterr().out
    assert len(out.splitlines()) == 2
    assert "\x1b" not in out and "\x07" not in out
    assert "\\x1b]0;owned\\x07" in out


# -- item 15: warnings in the manifest ----------------------------------------------------------
def test_warnings_are_stored_and_shown(repo: Repository, capsys: pytest.CaptureFixture[str],
                                       monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    archive = random_archive(tmp_path, "w", 1000)
    warnings = ["post-thaw hook /etc/sanoffload/hooks/db failed: exit 3", "second"]
    with Served(repo).client() as client:
        w = client.writer("fs1", "/srv/data", {"frozen_at": FROZEN, "warnings": warnings})
        w.write_from(io.BytesIO(archive))
        backup = w.commit()
        assert client.list()[0]["warnings"] == warnings
    assert backup["warnings"] == warnings
    assert list(repo.list()[0].manifest.warnings) == warnings
    monkeypatch.setattr(cli, "make_runner", CommandRunner)
    assert cli.run(["store", "--repo", str(repo.root), "list"]) == 0
    assert "warnings: 2" in capsys.readouterr().out
    assert cli.run(["store", "--repo", str(repo.root), "list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["warnings"] == warnings


@pytest.mark.hostile("store", "manifest warnings: too many, too long, not strings, or holding "
                              "control characters",
                     "the put is refused (exit 2) before any data")
@pytest.mark.parametrize("warnings", [
    ["w"] * (manifest_mod.MAX_WARNINGS + 1),
    ["w" * (manifest_mod.MAX_WARNING_CHARS + 1)],
    "one string",
    [3],
    [["nested"]],
    ["line one\nline two"],
    ["\x1b[2J cleared"],
])
def test_bad_warnings_are_refused(repo: Repository, warnings: Any) -> None:
    with Served(repo).client() as client:
        with pytest.raises(UsageError, match="manifest fields: warnings: "):
            client.writer("fs1", "/srv/data", {"warnings": warnings})
    assert list(repo.root.iterdir()) == []


def test_the_most_warnings_allowed_fit_in_a_manifest_and_a_list_reply(repo: Repository) -> None:
    warnings = ["\u00e9" * manifest_mod.MAX_WARNING_CHARS] * manifest_mod.MAX_WARNINGS
    with pytest.raises(ValueError, match="warnings"):
        manifest_mod.sender_fields({"warnings": warnings})  # too big in all (JSON-escaped)
    fit = ["w" * manifest_mod.MAX_WARNING_CHARS] * 30
    assert manifest_mod.sender_fields({"warnings": fit})["warnings"] == fit
    # what the proxy sends at most (33 of 1,000 characters), in the costliest characters
    worst = ["\U0001f600" * 1000] * 33
    assert manifest_mod.sender_fields({"warnings": worst})["warnings"] == worst
    ts = "20261119T100000Z"
    write_manifest(repo, "fs1", "/srv/data", ts,
                   good_manifest("fs1", "/srv/data", ts, warnings=tuple(worst)))
    assert len(repo.list()) == 1
    for n in range(3):
        ts = f"2026112{n}T100000Z"
        write_manifest(repo, "fs1", "/srv/data", ts,
                       good_manifest("fs1", "/srv/data", ts, warnings=tuple(fit)))
    with Served(repo).client() as client:
        assert [len(b["warnings"]) for b in client.list()] == [33, 30, 30, 30]


@pytest.mark.hostile("store", "a forced command's --client with a space, a newline or an escape",
                     "refused (exit 10) before serving: it would be recorded in manifests")
@pytest.mark.parametrize("client", ["px 1", "px1\nfs1", "\x1b[2Jpx1", "", "-px1", "x" * 65])
def test_a_client_name_that_cannot_be_recorded_is_refused(repo: Repository, tmp_path: Path,
                                                          client: str) -> None:
    from sanoffload.errors import AuthError
    from sanoffload.store import config as store_config

    with pytest.raises(AuthError, match="invalid client name"):
        StoreService(repo, client)
    with pytest.raises(AuthError, match="invalid client name"):
        store_config.client_for(client, path=str(tmp_path / "absent.toml"), repo=str(repo.root))
