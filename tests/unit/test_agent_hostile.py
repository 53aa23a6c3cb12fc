"""The agent against what it must not trust: look-alike objects, a corrupt journal, a failing hook.

Cleanup runs every minute as root (the lease timer): it must remove only
what is provably ours — an LV carrying sanoffload's tag, a LIO object in
sanoffload's own naming — and stop, removing nothing, when a journal record
it would need cannot be read. The LVM side runs on the real recorded ``lvs``
output of the lab (tests/fixtures/recorded), with look-alikes added to a copy.
"""

from __future__ import annotations

import json
import os
import types
from pathlib import Path
from typing import Any

import pytest

from sanoffload import cli
from sanoffload.agent import config as agent_config
from sanoffload.agent.controller import LocalController
from sanoffload.agent.hooks import Hooks
from sanoffload.agent.journal import Journal, Resource, SessionRecord
from sanoffload.agent.service import AgentService
from sanoffload.agent.session import Agent
from sanoffload.channel.protocol import error_reply, raise_error
from sanoffload.errors import (
    CleanupError,
    JournalError,
    LioError,
    MissingDependencyError,
)
from sanoffload.testing import FakeRunner
from sanoffload.tools import lio
from tests.unit.fakes_agent import Clock, FakeController, FakeResolver
from tests.unit.recorded import load

pytestmark = pytest.mark.unit

PX1 = "iqn.2026-11.org.sanoffload.lab:px1"
T0 = 1_000_000.0


def config(tmp_path: Path, extra: str = "") -> agent_config.Config:
    return agent_config.parse(f"""
state_dir = "{tmp_path / 'state'}"
run_dir = "{tmp_path / 'run'}"
lease_s = 3600
{extra}
[portal]
address = "10.77.0.11"

[clients.px1]
initiators = ["{PX1}"]
roots = ["/srv"]
max_sessions = 4
""", "test.toml")


def lv_row(name: str, tags: str = "", attr: str = "swi-a-s---",
           origin: str = "lin") -> dict[str, str]:
    """An lvs row shaped like the recorded ones (a snapshot of datavg/lin by default)."""
    data = json.loads(load("lvs_all")[0])
    row = dict(data["report"][0]["lv"][0])  # datavg/lin, for the field set
    row.update({"lv_name": name, "lv_attr": attr, "lv_tags": tags, "origin": origin,
                "lv_path": f"/dev/datavg/{name}", "lv_dm_path": "", "lv_uuid": f"uuid-{name}",
                "lv_kernel_major": "253", "lv_kernel_minor": "40"})
    return row


def recorded_lvs_with(*rows: dict[str, str]) -> str:
    """A copy of the recorded ``lvs --all`` with ``rows`` added."""
    data = json.loads(load("lvs_all")[0])
    data["report"][0]["lv"].extend(rows)
    return json.dumps(data)


class NoLio:
    """An exporter with nothing in LIO (the LVM side is under test)."""

    def ours(self) -> dict[str, list[str]]:
        return {"targets": [], "backstores": []}


class LvmEnv:
    """An agent with the real LocalController on a FakeRunner fed recorded lvs output."""

    def __init__(self, tmp_path: Path, *rows: dict[str, str]) -> None:
        self.config = config(tmp_path)
        self.runner = FakeRunner()
        self.runner.on("lvs", stdout=recorded_lvs_with(*rows))
        self.runner.on("lvremove", returncode=0)
        self.runner.on("dmsetup", "remove", returncode=1, stderr="No such device or address\n")
        self.runner.on("dmsetup", "info", returncode=1, stderr="No such device or address\n")
        self.controller = LocalController(self.runner, self.config,
                                          exporter=NoLio(),  # type: ignore[arg-type]
                                          kernel_release="6.1.0")
        self.agent = Agent(self.runner, self.config, controller=self.controller, host="fs1",
                           clock=Clock(T0), resolver=FakeResolver())
        self.journal = Journal(self.config.state_dir)
        self.sessions_dir = Path(self.config.state_dir) / "sessions"

    def removed(self) -> list[str]:
        return [a[-1] for a in self.runner.argvs() if a[0] == "lvremove"]


# --------------------------------------------------------------------------
# item 10: only tagged LVs are ours
# --------------------------------------------------------------------------

@pytest.mark.hostile("agent", "an untagged LV named sanoffload-lookalike (the admin's) on "
                     "the host", "agent cleanup never removes it; a tagged orphan still goes")
def test_cleanup_never_removes_an_untagged_lookalike_lv(tmp_path: Path) -> None:
    env = LvmEnv(tmp_path, lv_row("sanoffload-lookalike"),
                 lv_row("sanoffload-fs1-0badc0de", tags="sanoffload"))
    report = env.agent.cleanup()
    assert env.removed() == ["datavg/sanoffload-fs1-0badc0de"]
    assert report["orphans_removed"] == ["LV datavg/sanoffload-fs1-0badc0de"]
    assert not any("lookalike" in " ".join(a) for a in env.runner.argvs())


def test_cleanup_at_boot_never_removes_an_untagged_lookalike_lv(tmp_path: Path) -> None:
    env = LvmEnv(tmp_path, lv_row("sanoffload-lookalike", attr="-wi-ao----", origin=""))
    env.agent.cleanup(all_sessions=True)
    assert env.removed() == []


# --------------------------------------------------------------------------
# item 10: an unreadable record stops the sweep
# --------------------------------------------------------------------------

def _record(sid: str, *, state: str = "failed") -> SessionRecord:
    return SessionRecord(session_id=sid, client="px1", initiator=PX1, path="/srv/lin/dir",
                         created=T0, lease_expires=T0 - 1, state=state,
                         resources=[Resource("snapshot", {"vg": "datavg",
                                                          "name": f"sanoffload-{sid}",
                                                          "origin": "lin"}, "created")],
                         info={"mountpoint": "/srv/lin"})


@pytest.mark.hostile("agent", "a journal record that is not JSON (its session's LV still "
                     "exists, tagged)", "cleanup removes nothing and names the file (exit 13)")
@pytest.mark.parametrize("content", [
    b"{not json", b"", b'{"session_id": "fs1-0000000d"}', b"\xff\xfe", b"[1, 2]",
    b"[" * 30_000 + b"]" * 30_000], ids=["bad-json", "empty", "fields-missing", "not-utf8",
                                          "a-list", "30000-deep"])
def test_an_unreadable_record_stops_cleanup_and_removes_nothing(tmp_path: Path,
                                                                content: bytes) -> None:
    # the broken record's session still holds its tagged LV: it must not look like an orphan
    env = LvmEnv(tmp_path, lv_row("sanoffload-fs1-0000000d", tags="sanoffload"),
                 lv_row("sanoffload-fs1-0000000e", tags="sanoffload"))
    env.journal.save(_record("fs1-0000000e"))  # failed and expired: would be released
    bad = env.sessions_dir / "fs1-0000000d.json"
    bad.write_bytes(content)
    for all_sessions in (False, True):
        with pytest.raises(JournalError) as info:
            env.agent.cleanup(all_sessions=all_sessions)
        assert info.value.exit_code == 13
        assert str(bad) in str(info.value) and "\n" not in str(info.value)
        assert info.value.paths == [str(bad)]
    assert env.removed() == [] and not env.runner.called("dmsetup", "remove")
    assert bad.read_bytes() == content  # kept for the operator
    assert env.journal.load("fs1-0000000e") is not None


def test_cleanup_cli_names_the_unreadable_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _config_file(tmp_path)
    sessions = tmp_path / "state" / "sessions"
    sessions.mkdir(parents=True)
    (sessions / "fs1-0000000d.json").write_text("{not json")
    runner = FakeRunner()  # nothing may run
    monkeypatch.setattr(cli, "make_runner", lambda: runner)
    assert cli.run(["agent", "--config", str(cfg), "cleanup"]) == 13
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "fs1-0000000d.json" in err and "Traceback" not in err
    assert runner.calls == []


# --------------------------------------------------------------------------
# item 12: status of a corrupt record
# --------------------------------------------------------------------------

def _config_file(tmp_path: Path) -> Path:
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'state_dir = "{tmp_path}/state"\nrun_dir = "{tmp_path}/run"\n'
                   f'[portal]\naddress = "10.77.0.11"\n'
                   f'[clients.px1]\ninitiators = ["{PX1}"]\nroots = ["/srv"]\n')
    cfg.chmod(0o644)
    return cfg


@pytest.mark.hostile("agent", "agent status of a session whose journal record is corrupt",
                     "one line naming the file, exit 13, no traceback")
@pytest.mark.parametrize("content", [
    "{not json", '{"session_id": 3}', '"just a string"',
    ('{"session_id": "fs1-0000000d", "client": "px1", "initiator": "x", "path": "/", '
     '"resources": [{"kind": "nfs"}]}')], ids=["bad-json", "id-a-number", "a-string",
                                               "unknown-kind"])
def test_status_of_a_corrupt_record_is_a_clear_error(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str],
                                                     content: str) -> None:
    cfg = _config_file(tmp_path)
    sessions = tmp_path / "state" / "sessions"
    sessions.mkdir(parents=True)
    bad = sessions / "fs1-0000000d.json"
    bad.write_text(content)
    monkeypatch.setattr(cli, "make_runner", FakeRunner)
    base = ["agent", "--config", str(cfg)]
    assert cli.run([*base, "status", "fs1-0000000d"]) == 13
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(bad) in err and "unreadable" in err
    assert "Traceback" not in err
    # the list shows it as unreadable, names the file, and says so in its exit code
    assert cli.run([*base, "sessions", "--json"]) == 13
    out, err = capsys.readouterr()
    assert json.loads(out) == [{"session_id": "fs1-0000000d", "status": "unreadable",
                                "record": str(bad)}]
    assert str(bad) in err and "Traceback" not in err


def test_status_over_the_channel_of_a_corrupt_record(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    agent = Agent(FakeRunner(), cfg, controller=FakeController(cfg.state_dir), host="fs1",
                  clock=Clock(T0), resolver=FakeResolver())
    sessions = Path(cfg.state_dir) / "sessions"
    sessions.mkdir(parents=True)
    (sessions / "fs1-0000000d.json").write_text("{not json")
    service = AgentService(agent, "px1")
    with pytest.raises(JournalError) as info:
        service.handle("status", {"session_id": "fs1-0000000d"}, None)  # type: ignore[arg-type]
    with pytest.raises(JournalError) as back:
        raise_error(json.loads(json.dumps(error_reply(info.value))), "fs1")
    assert back.value.exit_code == 13 and "fs1-0000000d.json" in back.value.message


# --------------------------------------------------------------------------
# item 15: post-thaw hook failures reach the proxy
# --------------------------------------------------------------------------

@pytest.mark.hostile("agent", "a post-thaw hook that fails (a database left in backup mode), "
                     "its stderr holding escape sequences",
                     "prepare's answer carries one escaped, bounded warning line")
def test_a_failing_post_thaw_hook_reaches_the_answer(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    hooks = []
    for name in ("db-end-backup", "chatty", "fine"):
        hook = tmp_path / "hooks" / name
        hook.parent.mkdir(exist_ok=True)
        hook.write_text("#!/bin/sh\nexit 0\n")
        hook.chmod(0o755)
        hooks.append(hook)
    post = ", ".join(f'"{h}"' for h in hooks)
    cfg = config(tmp_path, f"[hooks]\npost_thaw = [{post}]\n")
    # the hooks are owned by whoever runs the tests; production trusts root only
    monkeypatch.setattr(agent_config.HooksConfig, "to_hooks", lambda self: Hooks.from_paths(
        self.pre_freeze, self.post_thaw, timeout=5, trusted_uid=os.geteuid()))
    runner = FakeRunner()
    runner.on("sync", "-f", "/srv/lin")
    runner.on(str(hooks[0]), returncode=3, stderr="db: still in backup mode\x1b]0;owned\x07\n")
    runner.on(str(hooks[1]), returncode=1, stderr=("y" * 5000 + "\n") * 3)
    runner.on(str(hooks[2]))
    agent = Agent(runner, cfg, controller=FakeController(cfg.state_dir), host="fs1",
                  clock=Clock(T0), resolver=FakeResolver())
    answer = agent.prepare("/srv/lin/dir", PX1)
    db, chatty = answer.warnings  # one line per failed hook; the one that worked says nothing
    assert db == (f"post-thaw hook {hooks[0]} failed (exit 3): "
                  "db: still in backup mode\\x1b]0;owned\\x07")
    assert chatty.startswith(f"post-thaw hook {hooks[1]} failed (exit 1): yyy")
    assert len(chatty) <= 500
    for line in answer.warnings:
        assert not any(c in line for c in "\x1b\x07\n")
    assert answer.to_dict()["warnings"] == [db, chatty]
    # and over the channel, as the proxy reads it
    agent.release(answer.session_id)
    reply = AgentService(agent, "px1").handle("prepare", {"path": "/srv/lin/dir",
                                                          "initiator": PX1}, None)  # type: ignore[arg-type]
    assert json.loads(json.dumps(reply))["session"]["warnings"] == [db, chatty]


def test_no_warnings_when_the_hooks_succeed(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    runner = FakeRunner()
    runner.on("sync", "-f", "/srv/lin")
    agent = Agent(runner, cfg, controller=FakeController(cfg.state_dir), host="fs1",
                  clock=Clock(T0), resolver=FakeResolver())
    answer = agent.prepare("/srv/lin/dir", PX1)
    assert answer.warnings == [] and answer.to_dict()["warnings"] == []


# --------------------------------------------------------------------------
# item 14 and 10: LIO, through a fake rtslib module
# --------------------------------------------------------------------------

class RTSLibError(Exception):
    """Stands in for rtslib_fb.utils.RTSLibError (a fake module, not a mock of the tool)."""


class RTSLibNotInCFSError(RTSLibError):
    pass


def _obj(**kw: Any) -> types.SimpleNamespace:
    return types.SimpleNamespace(**kw)


def fake_rtslib(targets: list[Any], storage_objects: list[Any],
                **extra: Any) -> types.ModuleType:
    """A stand-in for the rtslib_fb module: a root holding ``targets`` and ``storage_objects``."""
    root = _obj(targets=targets, storage_objects=storage_objects)
    module = types.ModuleType("fake_rtslib")
    for name, value in {"RTSRoot": lambda: root, "RTSLibError": RTSLibError, **extra}.items():
        setattr(module, name, value)
    return module


def _target(wwn: str) -> Any:
    return _obj(wwn=wwn)


def _backstore(name: str, *, plugin: str = "block", readonly: bool = True,
               lun_targets: tuple[str, ...] = ()) -> Any:
    luns = [_obj(parent_tpg=_obj(parent_target=_target(w))) for w in lun_targets]
    return _obj(name=name, plugin=plugin, readonly=readonly, attached_luns=luns)


@pytest.mark.hostile("agent", "LIO objects named like sanoffload's (backstore "
                     "sanoffload-mine, a writable one, one serving another target's LUN)",
                     "not taken for ours: cleanup leaves them")
def test_only_lio_objects_in_our_naming_are_ours() -> None:
    mine = f"{lio.TARGET_IQN_PREFIX}fs1-0badc0de"
    rts = fake_rtslib(
        targets=[_target(mine), _target("iqn.2026-11.org.sanoffload:mine"),
                 _target("iqn.2003-01.org.linux-iscsi.fs1:sn.1234")],
        storage_objects=[
            _backstore("sanoffload-fs1-0badc0de", lun_targets=(mine,)),
            _backstore("sanoffload-fs1-0000000a"),               # orphan: no LUN left
            _backstore("sanoffload-mine"),                        # the admin's name
            _backstore("sanoffload-fs1-0000000b", readonly=False),  # ours are read-only
            _backstore("sanoffload-fs1-0000000c", plugin="fileio"),
            _backstore("sanoffload-fs1-0000000e",
                       lun_targets=("iqn.2003-01.org.linux-iscsi.fs1:sn.1234",)),
        ])
    ours = lio.LioExporter(rts).ours()
    assert ours == {"targets": [mine],
                    "backstores": ["sanoffload-fs1-0badc0de", "sanoffload-fs1-0000000a"]}


@pytest.mark.hostile("agent", "rtslib raising its own RTSLibError / RTSLibNotInCFSError or "
                     "an OSError from configfs", "a LioError, exit 5 at the proxy, not 1")
@pytest.mark.parametrize("exc", [RTSLibError("Cannot find storage object"),
                                 RTSLibNotInCFSError("No such path"),
                                 PermissionError(13, "Permission denied"),
                                 OSError(16, "Device or resource busy")])
def test_rtslib_exceptions_are_lio_errors(exc: BaseException) -> None:
    def boom(*_a: Any, **_k: Any) -> Any:
        raise exc

    target = _obj(wwn=f"{lio.TARGET_IQN_PREFIX}fs1-0badc0de", delete=boom)
    rts = fake_rtslib([target], [], BlockStorageObject=boom)
    exporter = lio.LioExporter(rts)
    with pytest.raises(LioError) as info:
        exporter.unexport(target.wwn, "")
    assert info.value.exit_code == 5 and type(exc).__name__ in info.value.message
    assert info.value.__cause__ is exc
    spec = lio.ExportSpec(session_id="fs1-0badc0de", device="/dev/datavg/x",
                          target_iqn=target.wwn, initiator_iqn=PX1, portal_ip="10.77.0.11",
                          chap_user="u", chap_secret="s", serial=lio.new_serial())
    with pytest.raises(LioError):
        exporter.export(spec)
    # at the proxy: exit 5 and a CommandError, not "a bug"
    with pytest.raises(LioError) as back:
        raise_error(json.loads(json.dumps(error_reply(info.value))), "fs1")
    assert back.value.exit_code == 5


def test_no_lio_at_all_is_still_a_missing_dependency() -> None:
    def no_configfs() -> Any:
        raise RTSLibNotInCFSError("configfs not mounted")

    rts = fake_rtslib([], [], RTSRoot=no_configfs)
    with pytest.raises(MissingDependencyError):
        lio.LioExporter(rts).ours()


def test_lio_error_lives_in_errors_and_is_a_command_error() -> None:
    from sanoffload import errors

    assert errors.LioError.__module__ == "sanoffload.errors"
    assert issubclass(errors.LioError, errors.CommandError)
    assert issubclass(errors.JournalError, CleanupError)
