"""The proxy's commands through ``sanoffload.cli.run``: backup, list, verify, restore, prune.

A local ``--store /PATH`` is served in-process (store_connector), so list,
verify and restore run the real StoreService over a real repository in
tmp_path with the real tar and zstd. ``backup`` itself needs an agent over
ssh: its argument checks run for real, and its wiring (job file, options) is
checked with ``sanoffload.proxy.offhost.run_offhost_backup`` replaced by a recorder.
"""

from __future__ import annotations

import functools
import importlib
import io
import json
import logging
import os
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from sanoffload import cli
from sanoffload.channel.client import in_process_connector
from sanoffload.channel.server import serve
from sanoffload.kinds import DuplicateKind, VerifyMode
from sanoffload.proxy import jobs, offhost
from sanoffload.proxy.offhost import Location, Progress
from sanoffload.runner import CommandRunner
from sanoffload.store.repo import BackupId, Repository
from sanoffload.store.service import StoreService
from sanoffload.testing import FakeRunner
from tests.unit.conftest import make_archive

pytestmark = pytest.mark.unit

T0 = datetime(2026, 11, 20, 10, 0, tzinfo=UTC)
Capsys = pytest.CaptureFixture[str]


@pytest.fixture(autouse=True)
def _clean_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """setup_logging changes the 'sanoffload' logger; undo it after each test."""
    monkeypatch.delenv("SANOFFLOAD_DEBUG", raising=False)
    monkeypatch.delenv("SANOFFLOAD_REPO", raising=False)
    logger = logging.getLogger("sanoffload")
    level, handlers = logger.level, list(logger.handlers)
    yield
    logger.setLevel(level)
    logger.handlers[:] = handlers


def one_error_line(err: str) -> str:
    assert err.count("\n") == 1 and err.startswith("sanoffload: error: "), err
    return err


@pytest.fixture
def store(tmp_path: Path, archive: bytes) -> tuple[Path, list[BackupId]]:
    """A repository with two backups of fs1:/srv/data, a day apart (oldest first)."""
    root = tmp_path / "repo"
    root.mkdir()
    repo = Repository(root, CommandRunner())
    ids = [repo.put("fs1", "/srv/data", io.BytesIO(archive),
                    {"frozen_at": T0 + timedelta(days=i), "duplicate_kind": "snapshot"},
                    verify=False)
           for i in range(2)]
    return root, ids


def listed(root: Path) -> list[str]:
    return [str(b.id) for b in Repository(root).list()]


# -- backup: argument checks -------------------------------------------------------------
def test_backup_without_arguments(capsys: Capsys) -> None:
    assert cli.run(["backup"]) == 2
    err = one_error_line(capsys.readouterr().err)
    assert "give HOST:/PATH and --store STORE" in err


@pytest.mark.parametrize("argv,words", [
    (["x", "--store", "y"], "HOST:/PATH: no HOST: and not an absolute path"),
    (["fs1:/srv/data", "--store", "bk1:relative"], "--store: the path after ':' must be"),
    (["fs1:/srv/data"], "give HOST:/PATH and --store"),
    (["--store", "/srv/backups"], "give HOST:/PATH and --store"),
])
def test_backup_bad_locations(argv: list[str], words: str, capsys: Capsys) -> None:
    assert cli.run(["backup", *argv]) == 2
    assert words in one_error_line(capsys.readouterr().err)


def test_backup_of_a_local_path_is_refused_before_connecting(
        tmp_path: Path, capsys: Capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    runner = FakeRunner()  # no rules: an ssh (or anything else) would fail the test
    monkeypatch.setattr(cli, "make_runner", lambda: runner)
    assert cli.run(["backup", "/srv/data", "--store", str(tmp_path)]) == 2
    assert "always taken off-host" in one_error_line(capsys.readouterr().err)
    assert runner.calls == []


def test_backup_job_with_a_source_is_refused(capsys: Capsys) -> None:
    assert cli.run(["backup", "--job", "j", "fs1:/x"]) == 2
    assert "--job takes its source and store from the job file" in \
        one_error_line(capsys.readouterr().err)
    assert cli.run(["backup", "--job", "j", "--store", "/srv/backups"]) == 2
    assert "--job takes its source" in one_error_line(capsys.readouterr().err)


@pytest.mark.hostile("proxy", "sanoffload backup --kind with an unknown kind (with an escape)",
                     "one line, exit 2, the valid kinds listed, as the agent's --kind; "
                     "nothing run")
def test_backup_unknown_kind_is_a_usage_error(recorder: Recorder, capsys: Capsys) -> None:
    assert cli.run(["backup", "fs1:/srv/data", "--store", "/srv/b",
                    "--kind", "bogus\x1b[2J"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "--kind: unknown duplicate kind 'bogus\\x1b[2J'" in line
    assert "(one of: snapshot, thin-snapshot, raid1-split, mirror-split)" in line
    assert recorder.calls == []


def test_backup_bad_ssh_option(capsys: Capsys) -> None:
    assert cli.run(["backup", "fs1:/srv/data", "--store", "/srv/b",
                    "--ssh-option", "Port=22\nProxyCommand=x"]) == 2
    assert "invalid ssh option" in one_error_line(capsys.readouterr().err)


# -- backup: jobs and wiring (run.backup replaced) ---------------------------------------
class Recorder:
    """Stands in for run.backup: records its arguments, returns a summary."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def __call__(self, runner: Any, source: Location, store: Location,
                 **kwargs: Any) -> dict[str, Any]:
        self.calls.append((source, store, kwargs))
        return {"backup_id": "fs1/srv-data-3f2a9c1e/20261126T102933Z", "archive_bytes": 12345,
                "stream_seconds": 2.0, "throughput_mib_s": 0.01, "duplicate_kind": "snapshot",
                "freeze_window_ms": 41.7, "frozen_by": "fsfreeze",
                "verified": kwargs["verify"] is not VerifyMode.NONE or None,
                "verify": kwargs["verify"].value}


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    rec = Recorder()
    # the command imports run_offhost_backup when it runs: the module attribute is what it gets
    monkeypatch.setattr(offhost, "run_offhost_backup", rec)
    return rec


@pytest.fixture
def jobs_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """load_job's default directory is bound when jobs.py is imported (JOBS_DIR is read
    once, as a default argument): the command is pointed at tmp_path by replacing
    load_job itself, which the command imports when it runs."""
    d = tmp_path / "jobs"
    d.mkdir()
    monkeypatch.setattr(jobs, "load_job", functools.partial(jobs.load_job, jobs_dir=d))
    return d


def test_backup_with_a_missing_job_names_it(jobs_dir: Path, recorder: Recorder,
                                            capsys: Capsys) -> None:
    (jobs_dir / "other.toml").write_text('source = "fs1:/srv"\nstore = "/srv/b"\n')
    assert cli.run(["backup", "--job", "nightly"]) == 2
    err = one_error_line(capsys.readouterr().err)
    assert "no such job nightly" in err and str(jobs_dir / "nightly.toml") in err
    assert "jobs there: other" in err
    assert recorder.calls == []


def test_backup_with_a_bad_job_name(jobs_dir: Path, recorder: Recorder, capsys: Capsys) -> None:
    assert cli.run(["backup", "--job", "../etc/passwd"]) == 2
    assert "bad job name" in one_error_line(capsys.readouterr().err)
    assert recorder.calls == []


def test_backup_takes_everything_from_the_job(jobs_dir: Path, recorder: Recorder,
                                              capsys: Capsys) -> None:
    (jobs_dir / "data.toml").write_text(
        'source = "root@fs1:/srv/data"\nstore = "bk1:/srv/backups"\nverify = false\n'
        'kind = "thin-snapshot"\nssh_options = ["-o", "Port=2222"]\ntimeout_s = 600\n')
    assert cli.run(["backup", "--job", "data", "--json", "--ssh-option", "Compression=yes",
                    "--no-progress"]) == 0
    [(source, store, kw)] = recorder.calls
    assert source == Location("root@fs1", "/srv/data")
    assert store == Location("bk1", "/srv/backups")
    assert kw["verify"] is VerifyMode.NONE and kw["kind"] is DuplicateKind.THIN_SNAPSHOT
    assert kw["ssh_options"] == ("-o", "Port=2222", "-o", "Compression=yes")
    assert kw["timeout"] == 600.0 and kw["progress"] is None
    assert json.loads(capsys.readouterr().out)["backup_id"].startswith("fs1/")
    # options on the command line win over the job's
    assert cli.run(["backup", "--job", "data", "--verify", "--kind", "snapshot",
                    "--progress"]) == 0
    _, _, kw = recorder.calls[-1]
    assert kw["verify"] is VerifyMode.FULL and kw["kind"] is DuplicateKind.SNAPSHOT
    assert isinstance(kw["progress"], Progress)
    out = capsys.readouterr().out
    assert out.startswith("backup fs1/srv-data-3f2a9c1e/20261126T102933Z: 12345 bytes")
    assert "compared with the duplicate: identical" in out


def test_backup_text_output_without_a_comparison(recorder: Recorder, capsys: Capsys) -> None:
    assert cli.run(["backup", "fs1:/srv/data", "--store", "bk1:/srv/backups",
                    "--no-verify", "--no-progress"]) == 0
    [(source, store, kw)] = recorder.calls
    assert (source, store) == (Location("fs1", "/srv/data"), Location("bk1", "/srv/backups"))
    assert kw["verify"] is VerifyMode.NONE and kw["kind"] is None and kw["ssh_options"] == ()
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and out.rstrip().endswith("; not compared")
    assert "snapshot frozen 41.7 ms by fsfreeze" in out


# -- prune --------------------------------------------------------------------------------
def test_prune_over_the_network_is_refused(store: tuple[Path, list[BackupId]], capsys: Capsys,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    root, ids = store
    runner = FakeRunner()  # no rules: nothing may run
    monkeypatch.setattr(cli, "make_runner", lambda: runner)
    assert cli.run(["prune", "--store", "bk1:/srv"]) == 3
    err = one_error_line(capsys.readouterr().err)
    assert "prune runs on the backup server" in err and "ssh bk1" in err
    assert cli.run(["prune", "--store", f"localhost:{root}", "--keep-last", "0"]) == 3
    one_error_line(capsys.readouterr().err)
    assert runner.calls == []
    assert listed(root) == [str(i) for i in ids]


def test_prune_dry_run_on_a_local_store(store: tuple[Path, list[BackupId]],
                                        capsys: Capsys) -> None:
    root, ids = store
    assert cli.run(["prune", "--store", str(root), "--keep-last", "1", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"would remove {ids[0]}" in out and f"keep   {ids[1]}" in out
    assert "1 kept, 1 would remove" in out
    assert listed(root) == [str(i) for i in ids]
    assert cli.run(["prune", "--store", str(root), "--keep-last", "1", "--dry-run",
                    "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["dry_run"] is True and plan["remove"] == [str(ids[0])]
    assert listed(root) == [str(i) for i in ids]
    # and for real: the older one goes
    assert cli.run(["prune", "--store", str(root), "--keep-last", "1"]) == 0
    assert f"removed {ids[0]}" in capsys.readouterr().out
    assert listed(root) == [str(ids[1])]


# -- list ---------------------------------------------------------------------------------
def test_list_a_local_store(store: tuple[Path, list[BackupId]], capsys: Capsys) -> None:
    root, ids = store
    assert cli.run(["list", "--store", str(root), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [d["id"] for d in data] == [str(i) for i in ids]
    assert {d["path"] for d in data} == {"/srv/data"}
    assert data[0]["frozen_at"] == "2026-11-20T10:00:00.000Z"
    assert cli.run(["list", "--store", str(root)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[0] == "ID" and "PATH" in lines[0]
    assert [line.split()[0] for line in lines[1:]] == [str(i) for i in ids]
    assert cli.run(["list", "--store", str(root), "--host", "fs2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []


class HostileStore(StoreService):
    """A store whose list answers rows forged to rewrite the terminal and the table."""

    def __init__(self, root: Path, rows: list[Any]) -> None:
        super().__init__(Repository(root, CommandRunner()), "px1")
        self.rows = rows

    def handle(self, op: str, fields: dict[str, Any], channel: Any) -> Any:
        if op == "list":
            return {"backups": self.rows, "next": None}
        return super().handle(op, fields, channel)


@pytest.mark.hostile("proxy", "store's list rows with newlines, escape sequences, bad counts",
                     "every field printed escaped, one line per backup")
def test_list_escapes_every_field_from_the_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: Capsys) -> None:
    rows: list[dict[str, Any]] = [
        {"id": "fs1/x/20261120T100000Z\nfs1/forged/20261120T100000Z", "archive_bytes": 10,
         "member_count": 2, "path": "/srv/\x1b]0;pwned\x07data\x1b[2J",
         "verification": {"status": "ok\r\x1b[1A"}, "compared": {"status": "\u202efailed"}},
        {"id": "fs1/y/20261120T100000Z", "archive_bytes": "12\x1b", "member_count": [1],
         "path": "/srv/y", "verification": "ok\n", "compared": None},
    ]
    monkeypatch.setattr("sanoffload.proxy.cli.store_connector",
                        lambda runner, loc, ssh=(), **kw: in_process_connector(
                            lambda ch: serve(HostileStore(tmp_path, rows), ch), peer="bk1"))
    assert cli.run(["list", "--store", "bk1:/srv/backups"]) == 0
    out = capsys.readouterr().out
    assert not any(c in out for c in "\x1b\x07\r\u202e")
    lines = out.splitlines()
    assert len(lines) == 3, out  # the header and one line per backup: no forged row
    assert "fs1/x/20261120T100000Z\\nfs1/forged" in lines[1]
    assert "/srv/\\x1b]0;pwned\\x07data\\x1b[2J" in lines[1]
    assert lines[2].split()[0] == "fs1/y/20261120T100000Z"
    # --json: the JSON encoder escapes them itself
    assert cli.run(["list", "--store", "bk1:/srv/backups", "--json"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and json.loads(out)[0]["path"] == rows[0]["path"]


def test_list_needs_a_store(capsys: Capsys) -> None:
    assert cli.run(["list"]) == 2
    assert "--store" in capsys.readouterr().err


# -- verify -------------------------------------------------------------------------------
def test_verify_ok_then_a_flipped_byte(store: tuple[Path, list[BackupId]],
                                       capsys: Capsys) -> None:
    root, ids = store
    bid = str(ids[1])
    assert cli.run(["verify", "--store", str(root), bid]) == 0
    assert capsys.readouterr().out == f"ok {bid}\n"
    verification = Repository(root).get(bid).manifest.verification
    assert verification is not None and verification.status == "ok"

    path = Repository(root).archive_path(ids[1])
    os.chmod(path, 0o640)  # archives are stored 0440
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    assert cli.run(["verify", "--store", str(root), str(ids[0]), bid]) == 12
    captured = capsys.readouterr()
    assert captured.out.splitlines()[0] == f"ok {ids[0]}"
    assert captured.out.splitlines()[1].startswith(f"FAILED {bid}: ")
    assert "sha256 mismatch" in captured.out
    assert "1 of 2 backup(s) failed verification" in one_error_line(captured.err)
    verification = Repository(root).get(bid).manifest.verification
    assert verification is not None and verification.status == "failed"


def test_verify_an_unknown_backup(store: tuple[Path, list[BackupId]], capsys: Capsys) -> None:
    root, _ = store
    assert cli.run(["verify", "--store", str(root), "fs1/nope-00000000/20261120T100000Z"]) == 2
    assert "no such backup" in one_error_line(capsys.readouterr().err)


# -- restore ------------------------------------------------------------------------------
def test_restore_from_a_local_store(store: tuple[Path, list[BackupId]], tmp_path: Path,
                                    tree: Path, capsys: Capsys) -> None:
    root, ids = store
    target = tmp_path / "restored" / "here"
    assert cli.run(["restore", "--store", str(root), str(ids[0]), str(target)]) == 0
    assert (target / "sub" / "a.txt").read_text() == "hello from fs1\n"
    assert (target / "b.bin").read_bytes() == (tree / "b.bin").read_bytes()
    out = capsys.readouterr().out
    assert out.startswith(f"restored {ids[0]} into {target}")
    # a second time: the target is no longer empty
    (target / "sub" / "a.txt").write_text("mine\n")
    assert cli.run(["restore", "--store", str(root), str(ids[0]), str(target)]) == 3
    assert "is not empty" in one_error_line(capsys.readouterr().err)
    assert (target / "sub" / "a.txt").read_text() == "mine\n"
    # --force replaces what the backup holds
    assert cli.run(["restore", "--store", str(root), str(ids[0]), str(target), "--force"]) == 0
    assert (target / "sub" / "a.txt").read_text() == "hello from fs1\n"


@pytest.mark.parametrize("flags,expected", [
    ([], {"devices": False, "setid": False}),
    (["--devices"], {"devices": True, "setid": False}),
    (["--setid", "--devices"], {"devices": True, "setid": True}),
])
def test_restore_passes_devices_and_setid_through(store: tuple[Path, list[BackupId]],
                                                  tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  flags: list[str],
                                                  expected: dict[str, bool]) -> None:
    restore_mod = importlib.import_module("sanoffload.store.restore")
    seen: list[dict[str, Any]] = []
    real = restore_mod.restore

    def recording(*args: Any, **kwargs: Any) -> Any:
        seen.append({k: kwargs.get(k) for k in ("devices", "setid")})
        return real(*args, **kwargs)

    monkeypatch.setattr(restore_mod, "restore", recording)
    root, ids = store
    assert cli.run(["restore", "--store", str(root), str(ids[0]), str(tmp_path / "out"),
                    *flags]) == 0
    assert seen == [expected]


def test_restore_keeps_setid_bits_only_when_asked(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "tool").write_text("#!/bin/sh\n")
    (src / "tool").chmod(0o4755)
    root = tmp_path / "repo"
    root.mkdir()
    bid = Repository(root, CommandRunner()).put("fs1", "/srv/data", io.BytesIO(make_archive(src)),
                                                {"frozen_at": T0}, verify=False)
    assert cli.run(["restore", "--store", str(root), str(bid), str(tmp_path / "plain")]) == 0
    assert (tmp_path / "plain" / "tool").stat().st_mode & 0o7777 == 0o755
    assert cli.run(["restore", "--store", str(root), str(bid), str(tmp_path / "kept"),
                    "--setid"]) == 0
    assert (tmp_path / "kept" / "tool").stat().st_mode & 0o7777 == 0o4755


def test_restore_only_some_paths(store: tuple[Path, list[BackupId]], tmp_path: Path) -> None:
    root, ids = store
    target = tmp_path / "part"
    assert cli.run(["restore", "--store", str(root), str(ids[1]), str(target), "sub"]) == 0
    assert (target / "sub" / "a.txt").read_text() == "hello from fs1\n"
    assert not (target / "b.bin").exists()


@pytest.fixture
def remote_store(store: tuple[Path, list[BackupId]],
                 monkeypatch: pytest.MonkeyPatch) -> tuple[Path, list[BackupId]]:
    """``--store bk1:/srv/backups`` reaches the tmp repository, served in-process."""
    root, ids = store
    seen: list[Location] = []

    def connector(runner: Any, loc: Location, ssh: tuple[str, ...] = (), **kw: Any) -> Any:
        assert loc == Location("bk1", "/srv/backups")
        seen.append(loc)
        return in_process_connector(
            lambda ch: serve(StoreService(Repository(root, CommandRunner()), "px1"), ch),
            peer="bk1")

    monkeypatch.setattr("sanoffload.proxy.cli.store_connector", connector)
    return root, ids


def test_restore_from_a_remote_store(remote_store: tuple[Path, list[BackupId]],
                                     tmp_path: Path, capsys: Capsys) -> None:
    root, ids = remote_store
    (tmp_path / "dest").mkdir()
    target = tmp_path / "dest" / "out"
    assert cli.run(["restore", "--store", "bk1:/srv/backups", str(ids[1]), str(target)]) == 0
    assert (target / "sub" / "a.txt").read_text() == "hello from fs1\n"
    assert capsys.readouterr().out.startswith(f"restored {ids[1]} into {target}")
    # the private fetch repository beside the target is gone
    assert sorted(p.name for p in (tmp_path / "dest").iterdir()) == ["out"]
    assert listed(root) == [str(i) for i in ids]


def test_restore_from_a_remote_store_into_a_new_directory_tree(
        remote_store: tuple[Path, list[BackupId]], tmp_path: Path, capsys: Capsys) -> None:
    _, ids = remote_store
    target = tmp_path / "new" / "deeper" / "out"
    rc = cli.run(["restore", "--store", "bk1:/srv/backups", str(ids[1]), str(target)])
    assert (rc, capsys.readouterr().err) == (0, "")
    assert (target / "sub" / "a.txt").read_text() == "hello from fs1\n"


# -- backup --image ---------------------------------------------------------------------------
IMAGE_SUMMARY: dict[str, Any] = {
    "backup_id": "fs1/srv-thin-3f2a9c1e/20261126T102933Z", "kind": "image",
    "read_bytes": 8388608, "chunks_read": 2, "chunks": 256, "changed_chunks": 2,
    "new_bytes": 4000, "new_chunks": 1, "stream_seconds": 1.5, "throughput_mib_s": 5.3,
    "incremental": True, "base": "fs1/srv-thin-3f2a9c1e/20261125T102933Z", "full_reason": None,
    "duplicate_kind": "thin-snapshot", "freeze_window_ms": 12.5, "frozen_by": "fsfreeze",
    "compared_chunks": 2, "verify": "stream", "verified": True, "warnings": [],
}


def test_backup_image_asks_for_an_image_and_says_what_it_read(
        recorder: Recorder, monkeypatch: pytest.MonkeyPatch, capsys: Capsys) -> None:
    monkeypatch.setattr(offhost, "run_offhost_backup",
                        lambda *a, **kw: recorder(*a, **kw) and IMAGE_SUMMARY)
    assert cli.run(["backup", "fs1:/srv/thin", "--store", "bk1:/srv/backups", "--image",
                    "--no-progress"]) == 0
    [(_, _, kw)] = recorder.calls
    assert kw["image"] is True
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    assert out.startswith("image backup fs1/srv-thin-3f2a9c1e/20261126T102933Z: read 8388608 "
                          "bytes (2 of 256 chunks, 2 changed), stored 4000 bytes in 1 new")
    assert "incremental from fs1/srv-thin-3f2a9c1e/20261125T102933Z" in out
    assert "2 chunk(s) read again and compared with the duplicate" in out


def test_backup_image_full_read_reason_is_printed_escaped(
        recorder: Recorder, monkeypatch: pytest.MonkeyPatch, capsys: Capsys) -> None:
    summary = {**IMAGE_SUMMARY, "incremental": False, "base": None, "compared_chunks": None,
               "full_reason": "the store has no map of the base backup x\x1b[2J"}
    monkeypatch.setattr(offhost, "run_offhost_backup", lambda *a, **kw: summary)
    assert cli.run(["backup", "fs1:/srv/thin", "--store", "bk1:/srv/backups", "--image",
                    "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "full read (the store has no map of the base backup x" in out
    assert out.rstrip().endswith("; not compared")


def test_backup_is_tar_unless_asked_or_the_job_says_image(
        jobs_dir: Path, recorder: Recorder) -> None:
    assert cli.run(["backup", "fs1:/srv/data", "--store", "/srv/b", "--no-progress"]) == 0
    (jobs_dir / "thin.toml").write_text(
        'source = "fs1:/srv/thin"\nstore = "bk1:/srv/backups"\nmode = "image"\n')
    (jobs_dir / "data.toml").write_text('source = "fs1:/srv/data"\nstore = "bk1:/srv/b"\n')
    assert cli.run(["backup", "--job", "thin", "--no-progress", "--json"]) == 0
    assert cli.run(["backup", "--job", "data", "--no-progress", "--json"]) == 0
    assert cli.run(["backup", "--job", "data", "--image", "--no-progress", "--json"]) == 0
    # the command line, the image job, the tar job, the tar job with --image
    assert [kw["image"] for _, _, kw in recorder.calls] == [False, True, False, True]
