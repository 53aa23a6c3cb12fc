"""``sanoffload agent``: bad input gets one clear line and its exit code, and changes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sanoffload import cli
from sanoffload.testing import FakeRunner

pytestmark = pytest.mark.unit

PX1 = "iqn.2026-11.org.sanoffload.lab:px1"


@pytest.fixture
def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, FakeRunner]:
    root = tmp_path / "srv"
    (root / "data").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (root / "data" / "escape").symlink_to(tmp_path / "outside")
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'state_dir = "{tmp_path}/state"\nrun_dir = "{tmp_path}/run"\n'
                   f'[portal]\naddress = "10.77.0.11"\n'
                   f'[clients.px1]\ninitiators = ["{PX1}"]\nroots = ["{root}"]\n')
    runner = FakeRunner()  # no rules: any command would fail the test
    monkeypatch.setattr(cli, "make_runner", lambda: runner)
    return tmp_path, runner


@pytest.mark.parametrize("path,initiator,code,words", [
    ("{tmp}/outside", PX1, 3, "outside"),
    ("{tmp}/srv/data/../../outside", PX1, 3, ".."),
    ("{tmp}/srv/data/escape", PX1, 3, "outside"),
    ("{tmp}/srv/data/missing", PX1, 3, "not exist"),
    ("relative/path", PX1, 3, "absolute"),
    ("{tmp}/srv/data", "iqn.2026-11.org.example:stranger", 10, "not allowed"),
])
def test_refusals_are_one_line_with_their_exit_code(setup: tuple[Path, FakeRunner],
                                                    capsys: pytest.CaptureFixture[str],
                                                    path: str, initiator: str, code: int,
                                                    words: str) -> None:
    tmp, runner = setup
    rc = cli.run(["agent", "--config", str(tmp / "agent.toml"), "prepare",
                  path.format(tmp=tmp), "--initiator", initiator])
    err = capsys.readouterr().err
    assert rc == code, err
    assert err.count("\n") == 1 and err.startswith("sanoffload: error: ")
    assert words in err
    assert runner.calls == []  # nothing was run, so nothing changed
    sessions = tmp / "state" / "sessions"
    assert not sessions.exists() or not any(sessions.iterdir())


def test_unknown_session_status_and_idempotent_release(setup: tuple[Path, FakeRunner],
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    tmp, _ = setup
    base = ["agent", "--config", str(tmp / "agent.toml")]
    assert cli.run([*base, "status", "fs1-00000000", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "unknown"
    assert cli.run([*base, "release", "fs1-00000000"]) == 0
    assert "released (0 object(s) removed)" in capsys.readouterr().out


def test_a_broken_config_is_a_usage_error(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text("[portal]\naddress = 1\n")
    assert cli.run(["agent", "--config", str(cfg), "sessions"]) == 2
    assert "portal.address" in capsys.readouterr().err
