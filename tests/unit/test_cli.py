"""The CLI: version, doctor output, one-line errors, exit codes, signals."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click
import psutil
import pytest

import sanoffload
from sanoffload import cli
from sanoffload.doctor import Host
from sanoffload.errors import CompletedWithWarnings, Interrupted, RefusedError, ResourceError
from sanoffload.signals import install_signal_handlers

from ..fixtures.doctor import fakehost as fh

pytestmark = pytest.mark.unit

REPO = Path(sanoffload.__file__).resolve().parent.parent




def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "SANOFFLOAD_DEBUG"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), extra.pop("PYTHONPATH", "")]))
    env.update(extra)
    return env


@pytest.fixture(autouse=True)
def _clean_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """setup_logging changes the 'sanoffload' logger; undo it after each test."""
    monkeypatch.delenv("SANOFFLOAD_DEBUG", raising=False)
    logger = logging.getLogger("sanoffload")
    level, handlers = logger.level, list(logger.handlers)
    yield
    logger.setLevel(level)
    logger.handlers[:] = handlers


FakeMachine = Callable[..., fh.FakeHost]
Capsys = pytest.CaptureFixture[str]


@pytest.fixture
def fake_machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeMachine:
    """Point the CLI's factories at a fake host; returns a function choosing what is missing."""

    def install(without: tuple[str, ...] = ()) -> fh.FakeHost:
        host = fh.fake_host(tmp_path, without=without)
        monkeypatch.setattr(cli, "make_runner", lambda: host.runner)
        monkeypatch.setattr(cli, "make_host", lambda runner: host)
        return host

    return install


# --------------------------------------------------------------------------
# version, help
# --------------------------------------------------------------------------

def test_version(capsys: Capsys) -> None:
    assert cli.run(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"sanoffload, version {sanoffload.__version__}"


def test_main_exits_with_the_code(capsys: Capsys) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0


def test_python_dash_m_works() -> None:
    proc = subprocess.run([sys.executable, "-m", "sanoffload", "--version"], capture_output=True,
                          text=True, env=child_env(), timeout=60, cwd="/", check=False)
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"sanoffload, version {sanoffload.__version__}"


def test_help_shows_examples(capsys: Capsys) -> None:
    assert cli.run(["doctor", "--help"]) == 0
    out = capsys.readouterr().out
    assert "sanoffload doctor --role" in out and "Examples:" in out
    assert cli.run(["--help"]) == 0
    out = capsys.readouterr().out
    assert "doctor" in out and "--debug" in out and "Example:" in out


def test_usage_error_exits_2(capsys: Capsys) -> None:
    assert cli.run(["doctor", "--role", "nas"]) == 2
    assert "Invalid value for '--role'" in capsys.readouterr().err
    assert cli.run(["no-such-command"]) == 2


# --------------------------------------------------------------------------
# doctor output
# --------------------------------------------------------------------------

def test_doctor_json_has_documented_fields(fake_machine: FakeMachine, capsys: Capsys) -> None:
    fake_machine()
    assert cli.run(["doctor", "--role", "proxy", "--json"]) == 0
    captured = capsys.readouterr()
    data = json.loads(captured.out)
    assert set(data) == {"role", "ok", "exit_code", "missing", "warnings", "checks"}
    assert data["role"] == "proxy" and data["ok"] is True and data["exit_code"] == 0
    assert data["missing"] == [] and data["warnings"] == []
    assert len(data["checks"]) == 10
    for check in data["checks"]:
        assert set(check) == {"name", "what", "status", "present", "optional", "detail",
                              "fails_without"}
        assert check["status"] == "ok" and check["present"] is True
    assert captured.err == ""


def test_doctor_json_failure_still_valid_json(fake_machine: FakeMachine, capsys: Capsys) -> None:
    fake_machine(without=("device-mapper", "LIO", "SCSI"))
    assert cli.run(["doctor", "--role", "storage", "--json"]) == 4
    captured = capsys.readouterr()
    data = json.loads(captured.out)
    assert data["missing"] == ["device-mapper", "LIO", "SCSI", "storage.toml"]
    assert data["exit_code"] == 4
    assert captured.err.count("\n") == 1
    assert captured.err.startswith("sanoffload: error: role storage is missing: "
                                   "device-mapper, LIO, SCSI")


def test_doctor_table(fake_machine: FakeMachine, capsys: Capsys) -> None:
    fake_machine(without=("LIO",))
    assert cli.run(["doctor", "--role", "agent"]) == 4
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["CHECK", "STATUS", "DETAIL"]
    lio = next(i for i, line in enumerate(out) if line.startswith("LIO "))
    assert out[lio].split()[1] == "MISSING"
    assert out[lio + 1].strip() == \
        "without it: the duplicate cannot be exported as an iSCSI target"
    assert any(line.startswith("lvm ") and line.split()[1] == "ok" for line in out)
    assert out[-1] == "role agent: missing LIO"


def test_doctor_table_all_ok_with_warning(
        fake_machine: FakeMachine, monkeypatch: pytest.MonkeyPatch, capsys: Capsys) -> None:
    host = fake_machine()
    assert isinstance(host.runner, fh.ToolsFakeRunner)
    host.runner.tools.discard("sshd")
    assert cli.run(["doctor", "--role", "store"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^sshd +warn ", out, re.M), out
    assert out.strip().splitlines()[-1] == \
        "role store: everything required is present (optional missing: sshd)"


def test_runner_created_by_the_factory(
        fake_machine: FakeMachine, monkeypatch: pytest.MonkeyPatch, capsys: Capsys) -> None:
    host = fake_machine()
    created: list[object] = []

    def factory() -> object:
        created.append(host.runner)
        return host.runner

    monkeypatch.setattr(cli, "make_runner", factory)
    assert cli.run(["doctor", "--role", "store"]) == 0
    assert created == [host.runner]
    assert host.runner.called("tar", "--version")


def test_injected_app_runner_is_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys: Capsys) -> None:
    host = fh.fake_host(tmp_path)
    monkeypatch.setattr(cli, "make_runner", lambda: pytest.fail("factory must not be used"))
    monkeypatch.setattr(cli, "make_host", lambda runner: Host(runner, root=tmp_path,
                                                             importer=host.importer))
    app = cli.App(runner=host.runner)
    assert cli.run(["doctor", "--role", "proxy"], app=app) == 0
    assert host.runner.called("tar", "--version")


# --------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------

def test_sanoffload_error_is_one_line_with_its_exit_code(
        fake_machine: FakeMachine, monkeypatch: pytest.MonkeyPatch, capsys: Capsys) -> None:
    fake_machine()

    def boom(role: str, host: Host) -> None:
        raise ResourceError("volume group vg0 has\nonly 1 GiB free", hint="extend it")

    monkeypatch.setattr(cli, "run_checks", boom)
    assert cli.run(["doctor", "--role", "agent"]) == 7
    err = capsys.readouterr().err
    assert err == "sanoffload: error: volume group vg0 has only 1 GiB free (hint: extend it)\n"


@pytest.mark.hostile("proxy", "a peer's error message with terminal escape sequences",
                     "printed escaped on the one error line")
def test_an_error_message_from_elsewhere_is_printed_escaped(
        fake_machine: FakeMachine, monkeypatch: pytest.MonkeyPatch, capsys: Capsys) -> None:
    fake_machine()

    def boom(role: str, host: Host) -> None:
        raise ResourceError("store says: \x1b]0;pwned\x07disk full\x1b[2J\u202e")

    monkeypatch.setattr(cli, "run_checks", boom)
    assert cli.run(["doctor", "--role", "agent"]) == 7
    err = capsys.readouterr().err
    assert err == ("sanoffload: error: store says: \\x1b]0;pwned\\x07disk full"
                   "\\x1b[2J\\u202e\n")


def test_a_warning_exit_is_a_warning_line_with_code_14(
        fake_machine: FakeMachine, monkeypatch: pytest.MonkeyPatch, capsys: Capsys) -> None:
    fake_machine()

    def done_but(role: str, host: Host) -> None:
        raise CompletedWithWarnings("backup X is stored, with 1 warning(s)", ["hook failed"])

    monkeypatch.setattr(cli, "run_checks", done_but)
    assert cli.run(["doctor", "--role", "agent"]) == 14
    assert capsys.readouterr().err == ("sanoffload: warning: backup X is stored, "
                                       "with 1 warning(s)\n")


def test_unexpected_error_is_one_line_exit_1(
        fake_machine: FakeMachine, monkeypatch: pytest.MonkeyPatch, capsys: Capsys) -> None:
    fake_machine()
    monkeypatch.setattr(cli, "run_checks", lambda role, host: {"x": 1}["bug"])
    assert cli.run(["doctor", "--role", "agent"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("sanoffload: error: unexpected KeyError: 'bug'")
    assert "--debug" in err


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_shows_traceback(fake_machine: FakeMachine, monkeypatch: pytest.MonkeyPatch,
                               capsys: Capsys, how: str) -> None:
    fake_machine()
    monkeypatch.setattr(cli, "run_checks", lambda role, host: {"x": 1}["bug"])
    args = ["doctor", "--role", "agent"]
    if how == "flag":
        args.insert(0, "--debug")
    else:
        monkeypatch.setenv("SANOFFLOAD_DEBUG", "1")
    assert cli.run(args) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err
    assert err.strip().splitlines()[-1].startswith("sanoffload: error: unexpected KeyError")


def test_debug_traceback_for_sanoffload_error(
        fake_machine: FakeMachine, monkeypatch: pytest.MonkeyPatch, capsys: Capsys) -> None:
    fake_machine()

    def refuse(role: str, host: Host) -> None:
        raise RefusedError("/ is not on LVM")

    monkeypatch.setattr(cli, "run_checks", refuse)
    assert cli.run(["--debug", "doctor", "--role", "agent"]) == 3
    err = capsys.readouterr().err
    assert "Traceback" in err and err.endswith("sanoffload: error: / is not on LVM\n")


def test_interrupted_inside_command_exits_130(
        fake_machine: FakeMachine, monkeypatch: pytest.MonkeyPatch, capsys: Capsys) -> None:
    fake_machine()

    def interrupted(role: str, host: Host) -> None:
        raise Interrupted(signal.SIGTERM)

    monkeypatch.setattr(cli, "run_checks", interrupted)
    assert cli.run(["doctor", "--role", "agent"]) == 130
    assert capsys.readouterr().err == "sanoffload: error: interrupted by SIGTERM\n"


def test_verbose_levels_log_runner_calls(fake_machine: FakeMachine, capsys: Capsys) -> None:
    fake_machine()
    assert cli.run(["doctor", "--role", "store"]) == 0
    assert "run: tar --version" not in capsys.readouterr().err
    assert cli.run(["-v", "doctor", "--role", "store"]) == 0
    assert logging.getLogger("sanoffload").level == logging.INFO
    assert "run: tar --version" not in capsys.readouterr().err
    assert cli.run(["-vv", "doctor", "--role", "store"]) == 0
    err = capsys.readouterr().err
    assert "sanoffload: DEBUG: run: tar --version" in err
    assert len(logging.getLogger("sanoffload").handlers) == 1  # not one per invocation


# --------------------------------------------------------------------------
# extending the group
# --------------------------------------------------------------------------

EXTRA_MODULE = '''
import click
from sanoffload.cli import App, pass_app
from sanoffload.errors import AuthError


@click.command()
@click.option("--fail", is_flag=True)
@pass_app
def hello(app: App, fail: bool) -> None:
    """Say hello (a test-only command)."""
    if fail:
        raise AuthError("initiator iqn.x not allowed")
    click.echo(f"hello from {type(app.get_runner()).__name__}")
'''


def test_lazy_command_is_listed_and_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: Capsys) -> None:
    (tmp_path / "sanoffload_test_extra.py").write_text(EXTRA_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.LAZY_COMMANDS, "hello", "sanoffload_test_extra:hello")
    monkeypatch.setattr(cli, "make_runner", lambda: fh.ToolsFakeRunner(()))
    assert cli.run(["--help"]) == 0
    assert "hello" in capsys.readouterr().out
    assert cli.run(["hello"]) == 0
    assert capsys.readouterr().out == "hello from ToolsFakeRunner\n"
    assert cli.run(["hello", "--fail"]) == 10
    assert capsys.readouterr().err == "sanoffload: error: initiator iqn.x not allowed\n"


def test_lazy_entry_that_is_not_a_command_is_a_bug(monkeypatch: pytest.MonkeyPatch,
                                                   capsys: Capsys) -> None:
    monkeypatch.setitem(cli.LAZY_COMMANDS, "broken", "os:path")
    assert cli.run(["broken"]) == 1
    assert "is not a click command" in capsys.readouterr().err


def test_group_is_a_click_group() -> None:
    assert isinstance(cli.cli, click.Group)
    assert "doctor" in cli.cli.list_commands(click.Context(cli.cli))


# --------------------------------------------------------------------------
# signals
# --------------------------------------------------------------------------

SIGNAL_SCRIPT = textwrap.dedent('''
    import os, signal, sys, time
    from sanoffload.errors import Interrupted
    from sanoffload.signals import install_signal_handlers

    install_signal_handlers()
    marker, signame, twice = sys.argv[1], sys.argv[2], sys.argv[3] == "twice"
    signum = getattr(signal, signame)
    try:
        try:
            os.kill(os.getpid(), signum)
            time.sleep(30)
            sys.exit(0)
        finally:
            if twice:  # a second signal must not abort the cleanup
                os.kill(os.getpid(), signum)
            with open(marker, "w") as f:
                f.write("cleaned up")
    except Interrupted as exc:
        sys.exit(exc.exit_code)
''')


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGHUP", "SIGINT"])
@pytest.mark.parametrize("times", ["once", "twice"])
def test_signal_becomes_interrupted_and_cleanup_runs(tmp_path: Path, signame: str,
                                                      times: str) -> None:
    marker = tmp_path / "marker"
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", SIGNAL_SCRIPT, str(marker), signame, times],
                          capture_output=True, text=True, env=child_env(), timeout=60,
                          check=False)
    assert proc.returncode == 130, proc.stderr
    assert marker.read_text() == "cleaned up"
    assert time.monotonic() - started < 25  # the sleep was cut short


def test_restore_puts_back_previous_handlers() -> None:
    before = signal.getsignal(signal.SIGUSR1)
    restore = install_signal_handlers([signal.SIGUSR1])
    try:
        assert signal.getsignal(signal.SIGUSR1) is not before
        with pytest.raises(Interrupted) as info:
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(5)  # the handler raises before this ends
        assert info.value.signum == signal.SIGUSR1
    finally:
        restore()
    assert signal.getsignal(signal.SIGUSR1) is before


HANG_MODULE = '''
import click
from pathlib import Path
from typing import Any
from sanoffload.cli import App, pass_app


@click.command()
@click.argument("workdir")
@pass_app
def hang(app: App, workdir: str) -> None:
    """Run a long command; clean up whatever happens."""
    work = Path(workdir)
    try:
        app.get_runner().run(
            ["sh", "-c", f"echo $$ > {work}/pid.tmp; mv {work}/pid.tmp {work}/pid; sleep 300"],
            timeout=120)
    finally:
        (work / "cleanup").write_text("done")
'''

HANG_MAIN = textwrap.dedent('''
    import sys
    from sanoffload import cli
    cli.LAZY_COMMANDS["hang"] = "sanoffload_test_hang:hang"
    cli.main(sys.argv[1:])
''')


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGHUP"])
def test_sigterm_during_a_command_cleans_up_and_exits_130(tmp_path: Path, signame: str) -> None:
    """End to end: the CLI process gets the signal while a child command runs."""
    (tmp_path / "sanoffload_test_hang.py").write_text(HANG_MODULE)
    work = tmp_path / "work"
    work.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", HANG_MAIN, "hang", str(work)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=child_env(PYTHONPATH=str(tmp_path)))
    try:
        deadline = time.monotonic() + 30
        while not (work / "pid").exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "command never started"
            time.sleep(0.05)
        child = int((work / "pid").read_text())
        proc.send_signal(getattr(signal, signame))
        _out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130
    assert err == f"sanoffload: error: interrupted by {signame}\n"
    assert (work / "cleanup").read_text() == "done"
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            if psutil.Process(child).status() == psutil.STATUS_ZOMBIE:
                break
        except psutil.NoSuchProcess:
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"child {child} still running after the CLI exited")


def _commands(group: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    import click

    ctx = click.Context(group)
    out = []
    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)
        out.append(prefix + (name,))
        if isinstance(cmd, click.Group):
            out += _commands(cmd, prefix + (name,))
    return out


def test_every_command_has_help_with_an_example(capsys: Capsys) -> None:
    from sanoffload.cli import cli as root

    names = _commands(root)
    assert ("backup",) in names and ("agent", "serve") in names and ("store", "serve") in names
    for path in names:
        assert cli.run([*path, "--help"]) == 0, path
        out = capsys.readouterr().out
        assert "Example" in out, f"'sanoffload {' '.join(path)} --help' shows no example"
