"""sanoffload.kinds: one enum per fixed set of values, one error for a value outside it.

The same bad duplicate kind used to be a UsageError (exit 2) over the channel
and a RefusedError (exit 3) in resolve; every edge now gives exit 2 with the
valid values listed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sanoffload import cli
from sanoffload.agent import config as agent_config
from sanoffload.agent.controller import Duplicate
from sanoffload.agent.quiesce import quiesce_and_duplicate
from sanoffload.agent.resolve import BackupObject, resolve
from sanoffload.agent.service import AgentService
from sanoffload.errors import UsageError
from sanoffload.kinds import (
    BackupMode,
    Choice,
    DuplicateKind,
    FreezeMode,
    ObjectKind,
    VerifyMode,
    WhoFreezes,
)
from sanoffload.testing import FakeRunner
from tests.unit.fakes_agent import recorded_lv, recorded_mount
from tests.unit.test_agent_session import Env

pytestmark = pytest.mark.unit

PX1 = "iqn.2026-11.org.sanoffload.lab:px1"
BAD = "clone\x1b[2J"
ALL = [DuplicateKind, FreezeMode, WhoFreezes, ObjectKind, VerifyMode, BackupMode]


@pytest.mark.parametrize("enum", ALL)
def test_parse_gives_members_and_values_stay_the_wire_strings(enum: type[Choice]) -> None:
    for member in enum:
        assert enum.parse(member.value) is member
        assert enum.parse(member) is member
        assert json.loads(json.dumps({"v": member})) == {"v": member.value}
        assert f"{member}" == member.value


@pytest.mark.parametrize("enum", ALL)
@pytest.mark.parametrize("text", ["bogus", "", "Snapshot", None, 3, ["snapshot"]])
def test_parse_refuses_anything_else_with_one_error(enum: type[Choice], text: Any) -> None:
    with pytest.raises(UsageError) as exc:
        enum.parse(text)
    assert exc.value.exit_code == 2
    assert f"(one of: {', '.join(enum.values())})" in exc.value.message


def test_the_wire_values_are_unchanged() -> None:
    # the proxy, the store and existing journal records hold these strings
    assert DuplicateKind.values() == ("snapshot", "thin-snapshot", "raid1-split", "mirror-split")
    assert FreezeMode.values() == ("auto", "fsfreeze", "lvm")
    assert WhoFreezes.values() == ("fsfreeze", "lvm")
    assert ObjectKind.values() == ("directory", "file")
    assert VerifyMode.values() == ("stream", "full", "none")
    assert BackupMode.values() == ("tar", "image")


def test_what_each_is_called_in_messages() -> None:
    assert [enum.label() for enum in ALL] == ["duplicate kind", "freeze mode", "freezer",
                                              "object kind", "verify mode", "backup mode"]
    with pytest.raises(UsageError, match=r"^job: unknown backup mode 'zfs' \(one of: tar, "
                       r"image\)$"):
        BackupMode.parse("zfs", where="job")


# --------------------------------------------------------------------------
# one bad value, every edge: exit 2, the valid values named, nothing done
# --------------------------------------------------------------------------

def _via_resolve(tmp_path: Path) -> None:
    resolve(FakeRunner(), "/srv/lin/dir", ["/srv"], duplicate_kind=BAD)


def _via_channel(tmp_path: Path) -> None:
    env = Env(tmp_path)
    try:
        AgentService(env.agent, "px1").handle(
            "prepare", {"path": "/srv/lin/dir", "initiator": PX1, "kind": BAD},
            None)  # type: ignore[arg-type]
    finally:
        assert env.ctl.calls == [] and env.files() == []


def _via_prepare(tmp_path: Path) -> None:
    env = Env(tmp_path)
    env.agent.resolve = resolve  # the real one: the kind is checked before any command
    try:
        env.agent.prepare("/srv/lin/dir", PX1, kind=BAD)  # type: ignore[arg-type]
    finally:
        assert env.ctl.calls == [] and env.runner.calls == [] and env.files() == []


def _via_duplicate(tmp_path: Path) -> None:
    Duplicate(BAD, "datavg", "x", "lin")  # type: ignore[arg-type]


def _via_backup_object(tmp_path: Path) -> None:
    BackupObject(requested_path="/srv/lin", real_path="/srv/lin", kind="socket",  # type: ignore[arg-type]
                 mount=recorded_mount(), lv=recorded_lv("lin"), path_in_fs=".",
                 duplicate_kind="snapshot", root="/srv")  # type: ignore[arg-type]


def _via_quiesce(tmp_path: Path) -> None:
    runner = FakeRunner()
    try:
        quiesce_and_duplicate(runner, "/srv/lin", lambda: None, who_freezes=BAD)
    finally:
        assert runner.calls == []


EDGES: dict[str, Callable[[Path], None]] = {
    "resolve": _via_resolve, "channel": _via_channel, "prepare": _via_prepare,
    "duplicate": _via_duplicate, "backup-object": _via_backup_object, "quiesce": _via_quiesce,
}


@pytest.mark.hostile("agent", "an unknown duplicate kind, object kind or freezer (with escapes) "
                              "at each edge: resolve, channel, prepare, quiesce",
                     "UsageError, exit 2 everywhere, valid values listed; nothing run")
@pytest.mark.parametrize("edge", sorted(EDGES))
def test_a_bad_value_is_exit_2_at_every_edge(tmp_path: Path, edge: str) -> None:
    with pytest.raises(UsageError) as exc:
        EDGES[edge](tmp_path)
    assert exc.value.exit_code == 2 and type(exc.value) is UsageError
    assert "one of: " in exc.value.message and "\x1b" not in exc.value.message


@pytest.mark.hostile("agent", "agent prepare --kind clone on the command line",
                     "one line, exit 2, the valid kinds listed; nothing run")
def test_a_bad_kind_on_the_command_line_is_exit_2(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "srv").mkdir()
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'state_dir = "{tmp_path}/state"\nrun_dir = "{tmp_path}/run"\n'
                   f'[portal]\naddress = "10.77.0.11"\n'
                   f'[clients.px1]\ninitiators = ["{PX1}"]\nroots = ["{tmp_path}/srv"]\n')
    runner = FakeRunner()
    monkeypatch.setattr(cli, "make_runner", lambda: runner)
    rc = cli.run(["agent", "--config", str(cfg), "prepare", f"{tmp_path}/srv",
                  "--initiator", PX1, "--kind", "clone"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.count("\n") == 1 and "unknown duplicate kind 'clone'" in err
    assert "snapshot, thin-snapshot, raid1-split, mirror-split" in err
    assert runner.calls == []


def test_a_bad_freeze_mode_in_the_config_names_the_key_and_the_values() -> None:
    with pytest.raises(UsageError, match=r"t\.toml: freeze: unknown freeze mode 'sometimes' "
                                         r"\(one of: auto, fsfreeze, lvm\)") as exc:
        agent_config.parse('freeze = "sometimes"\n[portal]\naddress = "10.0.0.1"\n'
                           f'[clients.a]\ninitiators = ["{PX1}"]\nroots = ["/srv"]\n', "t.toml")
    assert exc.value.exit_code == 2


def test_the_agent_holds_members_past_the_edge(tmp_path: Path) -> None:
    env = Env(tmp_path)
    p = env.prepare(kind=DuplicateKind.SNAPSHOT)
    assert p.duplicate_kind is DuplicateKind.SNAPSHOT and p.object_kind is ObjectKind.DIRECTORY
    assert p.frozen_by is WhoFreezes.LVM
    wire = p.to_dict()
    assert (wire["duplicate_kind"], wire["object_kind"], wire["frozen_by"]) == (
        "snapshot", "directory", "lvm")
    assert all(type(wire[k]) is str for k in ("duplicate_kind", "object_kind", "frozen_by"))
