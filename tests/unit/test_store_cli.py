"""``sanoffload store``: output, JSON, and one-line errors with their exit codes."""

from __future__ import annotations

import io
import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from sanoffload import cli
from sanoffload.store.repo import BackupId, Repository
from sanoffload.testing import FakeRunner

pytestmark = pytest.mark.unit

T0 = datetime(2026, 11, 20, 10, 0, tzinfo=UTC)


@pytest.fixture
def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
          ) -> tuple[Path, FakeRunner, list[BackupId]]:
    runner = FakeRunner()  # no rules: list, prune and the refusals run nothing
    monkeypatch.setattr(cli, "make_runner", lambda: runner)
    monkeypatch.delenv("SANOFFLOAD_REPO", raising=False)
    repo_dir = tmp_path / "repo"
    repo_dir.mkdir()
    repo = Repository(repo_dir)
    ids = [repo.put("fs1", "/srv/data", io.BytesIO(b"archive %d" % i),
                    {"frozen_at": T0 + timedelta(days=i), "file_count": i}, verify=False)
           for i in range(5)]
    return repo_dir, runner, ids


def one_error_line(err: str) -> str:
    assert err.count("\n") == 1 and err.startswith("sanoffload: error: "), err
    return err


def test_list_text_and_json(setup: tuple[Path, FakeRunner, list[BackupId]],
                            capsys: pytest.CaptureFixture[str]) -> None:
    repo, runner, ids = setup
    assert cli.run(["store", "--repo", str(repo), "list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["ID", "KIND", "SIZE", "MEMBERS", "VERIFIED", "COMPARED", "PATH"]
    assert [line.split()[0] for line in out[1:]] == [str(i) for i in ids]
    assert out[1].split()[-3:] == ["not-verified", "-", "/srv/data"]
    assert cli.run(["store", "--repo", str(repo), "list", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [d["id"] for d in data] == [str(i) for i in ids]
    assert data[2]["file_count"] == 2 and data[2]["path"] == "/srv/data"
    assert runner.calls == []


def test_repo_from_the_environment(setup: tuple[Path, FakeRunner, list[BackupId]],
                                   capsys: pytest.CaptureFixture[str],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    repo, _, ids = setup
    monkeypatch.setenv("SANOFFLOAD_REPO", str(repo))
    assert cli.run(["store", "list", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == len(ids)


def test_empty_repository(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.run(["store", "--repo", str(tmp_path), "list"]) == 0
    assert capsys.readouterr().out == "no backups\n"


def test_prune_dry_run_then_for_real(setup: tuple[Path, FakeRunner, list[BackupId]],
                                     capsys: pytest.CaptureFixture[str]) -> None:
    repo, _, ids = setup
    base = ["store", "--repo", str(repo), "prune", "--keep-last", "2"]
    assert cli.run([*base, "--dry-run", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["dry_run"] is True and plan["remove"] == [str(i) for i in ids[:3]]
    assert plan["keep"][-1] == {"id": str(ids[4]), "reasons": ["newest", "last"]}
    assert len(Repository(repo).list()) == 5
    assert cli.run(base) == 0
    out = capsys.readouterr().out
    assert f"removed {ids[0]}" in out and "2 kept, 3 removed" in out
    assert [b.id for b in Repository(repo).list()] == ids[3:]


def test_verify_failure_is_one_line_exit_12(setup: tuple[Path, FakeRunner, list[BackupId]],
                                            capsys: pytest.CaptureFixture[str]) -> None:
    repo, runner, ids = setup
    path = Repository(repo).archive_path(ids[1])
    os.chmod(path, 0o640)
    path.write_bytes(b"archive X")
    runner.on("tar", "--list")  # read in the same pass as the hash; the hash names the fault
    assert cli.run(["store", "--repo", str(repo), "verify", str(ids[1])]) == 12
    captured = capsys.readouterr()
    assert "sha256 mismatch" in one_error_line(captured.err)
    assert captured.out.startswith(f"FAILED {ids[1]}")


def test_verify_all_with_json(setup: tuple[Path, FakeRunner, list[BackupId]],
                              capsys: pytest.CaptureFixture[str]) -> None:
    repo, runner, ids = setup
    runner.on("tar", "--list", returncode=2, stderr="zstd: /*stdin*\\: unsupported format")
    assert cli.run(["store", "--repo", str(repo), "verify", "--all", "--json"]) == 12
    captured = capsys.readouterr()
    results = json.loads(captured.out)
    assert [r["ok"] for r in results] == [False] * 5
    assert "5 of 5 backups failed" in one_error_line(captured.err)
    assert Repository(repo).get(ids[0]).manifest.verification.status == "failed"  # type: ignore[union-attr]


@pytest.mark.parametrize("args,code,words", [
    (["verify"], 2, "--all"),
    (["verify", "fs1/../etc/20261126T102933Z"], 3, "invalid"),
    (["verify", "fs1/srv/20261126T102933Z"], 2, "no such backup"),
    (["verify", "a/b"], 3, "HOST/SLUG/TIMESTAMP"),
    (["restore", "fs1/x/20261126T102933Z", "{tmp}/t"], 2, "no such backup"),
    (["restore", "{id}", "-", "etc"], 2, "no PATHS"),
    (["restore", "{id}", "{tmp}/busy"], 3, "not empty"),
    (["restore", "{id}", "{tmp}/busy/f"], 3, "not a directory"),
    (["restore", "{id}", "{repo}/fs1"], 3, "inside the repository"),
    (["prune"], 2, "--keep"),
    (["list", "--host", "../x"], 3, "invalid host"),
])
def test_refusals(setup: tuple[Path, FakeRunner, list[BackupId]],
                  capsys: pytest.CaptureFixture[str], args: list[str], code: int,
                  words: str) -> None:
    repo, runner, ids = setup
    tmp = repo.parent
    (tmp / "busy").mkdir()
    (tmp / "busy" / "f").write_text("mine")
    argv = [a.format(tmp=tmp, id=ids[0], repo=repo) for a in args]
    assert cli.run(["store", "--repo", str(repo), *argv]) == code
    assert words in one_error_line(capsys.readouterr().err)
    assert runner.calls == []
    assert (tmp / "busy" / "f").read_text() == "mine"
    assert not (tmp / "t").exists()


def test_missing_or_absent_repository(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SANOFFLOAD_REPO", raising=False)
    assert cli.run(["store", "list"]) == 2
    assert "--repo" in capsys.readouterr().err
    assert cli.run(["store", "--repo", str(tmp_path / "nope"), "list"]) == 2
    assert "no such repository" in one_error_line(capsys.readouterr().err)


def test_restore_to_stdout_streams_the_archive(setup: tuple[Path, FakeRunner, list[BackupId]],
                                               capsysbinary: pytest.CaptureFixture[bytes]
                                               ) -> None:
    repo, runner, ids = setup
    assert cli.run(["store", "--repo", str(repo), "restore", str(ids[3]), "-"]) == 0
    assert capsysbinary.readouterr().out == b"archive 3"
    assert runner.calls == []


def test_store_is_listed_in_the_top_level_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.run(["--help"]) == 0
    assert "store" in capsys.readouterr().out


@pytest.mark.parametrize("flags, devices, setid", [([], False, False),
                                                   (["--devices"], True, False),
                                                   (["--setid"], False, True),
                                                   (["--devices", "--setid"], True, True)])
def test_restore_passes_devices_and_setid_only_when_asked(
        setup: tuple[Path, FakeRunner, list[BackupId]], capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch, flags: list[str], devices: bool, setid: bool) -> None:
    from sanoffload.errors import UsageError
    from sanoffload.store import cli as store_cli
    from sanoffload.store.restore import Restored

    repo, _, ids = setup
    seen: dict[str, object] = {}

    def restore(repo: Repository, backup_id: str, target: str, paths: list[bytes],
                **kw: object) -> Restored:
        seen.update(kw)
        raise UsageError("stop here")  # only the wiring is under test

    monkeypatch.setattr(store_cli, "restore_backup", restore)
    assert cli.run(["store", "--repo", str(repo), "restore", str(ids[0]),
                    str(repo.parent / "t"), *flags]) == 2
    assert seen == {"force": False, "devices": devices, "setid": setid}
    assert cli.run(["store", "--repo", str(repo), "restore", str(ids[0]), "-", *flags]) == \
        (2 if flags else 0)


def test_list_escapes_and_marks_warnings_and_broken_rows() -> None:
    from sanoffload.store.cli import format_backups

    table = format_backups([
        {"id": "fs1/s/20261126T102933Z", "archive_bytes": 10, "path": "/a\nb\x1b[2J",
         "warnings": ["w1", "w2"], "verification": {"status": "ok\x07"}},
        {"id": "fs1/s/20261127T102933Z", "broken": "unreadable manifest: x\ny"},
        {"id": "fs1/s/20261128T102933Z", "archive_bytes": "lots", "verification": "ok",
         "member_count": "3\n4"},
    ])
    lines = table.splitlines()
    assert len(lines) == 4
    assert "\x1b" not in table and "\x07" not in table
    assert "/a\\nb\\x1b[2J  [warnings: 2]" in lines[1] and "ok\\x07" in lines[1]
    assert "BROKEN" in lines[2] and "x\\ny" in lines[2]
    assert lines[3].split()[1:5] == ["tar", "?", "3\\n4", "-"]
