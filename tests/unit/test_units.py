"""The shipped systemd units and ``sanoffload install-units`` (a checked, atomic file copy)."""

from __future__ import annotations

import configparser
import os
import re
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from sanoffload import cli, install_units as iu
from sanoffload.errors import UsageError
from sanoffload.install_units import ROLE_UNITS, install_units
from sanoffload.proxy.jobs import DEFAULT_TIMEOUT_S
from sanoffload.units import unit_files

pytestmark = pytest.mark.unit

AGENT = set(ROLE_UNITS["agent"])
PROXY = set(ROLE_UNITS["proxy"])
STORAGE = set(ROLE_UNITS["storage"])
ALL = AGENT | PROXY | STORAGE
DOC_URL = "https://github.com/sanoffload/sanoffload"


def parse_unit(text: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None,
                                       comment_prefixes=("#", ";"))
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read_string(text)
    return parser


@pytest.fixture(scope="module")
def units() -> dict[str, configparser.ConfigParser]:
    return {name: parse_unit(text) for name, text in unit_files().items()}


def seconds(span: str) -> float:
    """A systemd time span such as ``13h`` or ``5min`` in seconds (the forms used here)."""
    scale = {"s": 1, "min": 60, "h": 3600}
    total = 0.0
    for number, unit in re.findall(r"(\d+)\s*(min|h|s)", span):
        total += int(number) * scale[unit]
    assert total > 0, span
    return total


# --------------------------------------------------------------------------
# the unit files
# --------------------------------------------------------------------------

def test_shipped_units_are_exactly_the_roles_units() -> None:
    assert set(unit_files()) == ALL
    assert not AGENT & PROXY and not AGENT & STORAGE and not PROXY & STORAGE


@pytest.mark.parametrize("name", sorted(ALL))
def test_every_unit_parses_and_is_documented(units: dict[str, configparser.ConfigParser],
                                             name: str) -> None:
    unit = units[name]
    kind = name.rsplit(".", 1)[1]
    assert unit.has_section("Unit")
    assert unit.has_section(kind.capitalize()), f"{name} has no [{kind.capitalize()}]"
    assert unit["Unit"]["Description"].strip()
    assert DOC_URL in unit["Unit"]["Documentation"].split()
    # optional units (lvm2, LIO restore, iscsid) must never be hard requirements
    for hard in ("Requires", "Requisite", "BindsTo"):
        assert hard not in unit["Unit"], f"{name}: {hard}="


def test_cleanup_service_runs_cleanup_all_at_boot(
        units: dict[str, configparser.ConfigParser]) -> None:
    unit = units["sanoffload-cleanup.service"]
    assert unit["Service"]["Type"] == "oneshot"
    assert unit["Service"]["RemainAfterExit"] == "no"
    assert unit["Service"]["ExecStart"] == "/usr/bin/env sanoffload agent cleanup --all"
    after = unit["Unit"]["After"].split()
    assert {"local-fs.target", "lvm2-monitor.service", "network-online.target"} <= set(after)
    assert unit["Unit"]["Wants"] == "network-online.target"
    assert "network" not in unit["Unit"].get("Before", "")
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_lease_units_release_expired_sessions_every_minute(
        units: dict[str, configparser.ConfigParser]) -> None:
    service = units["sanoffload-lease.service"]
    assert service["Service"]["Type"] == "oneshot"
    assert service["Service"]["ExecStart"] == "/usr/bin/env sanoffload agent cleanup"
    # started by its timer only
    assert not service.has_section("Install")
    timer = units["sanoffload-lease.timer"]["Timer"]
    assert seconds(timer["OnBootSec"]) == 120
    assert seconds(timer["OnUnitActiveSec"]) == 60
    assert seconds(timer["AccuracySec"]) == 10
    assert timer.get("Unit", "sanoffload-lease.service") == "sanoffload-lease.service"
    assert units["sanoffload-lease.timer"]["Install"]["WantedBy"] == "timers.target"


@pytest.mark.parametrize("argv", [["agent", "cleanup", "--all"], ["agent", "cleanup"]])
def test_agent_units_command_lines_are_valid_commands(argv: list[str],
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    # an option the CLI does not know fails to parse even before --help is shown
    assert cli.run([*argv, "--help"]) == 0
    assert "Usage: sanoffload agent cleanup" in capsys.readouterr().out


def test_storage_cleanup_service_runs_storage_cleanup_all_at_boot(
        units: dict[str, configparser.ConfigParser],
        capsys: pytest.CaptureFixture[str]) -> None:
    unit = units["sanoffload-storage-cleanup.service"]
    assert ROLE_UNITS["storage"] == ("sanoffload-storage-cleanup.service",
                                     "sanoffload-storage-lease.service",
                                     "sanoffload-storage-lease.timer")
    service = unit["Service"]
    assert service["Type"] == "oneshot" and service["RemainAfterExit"] == "no"
    argv = service["ExecStart"].split()
    assert argv == ["/usr/bin/env", "sanoffload", "storage", "cleanup", "--all"]
    assert cli.run([*argv[2:], "--help"]) == 0  # a command line the CLI knows
    assert "Usage: sanoffload storage cleanup" in capsys.readouterr().out
    assert service["SyslogIdentifier"] == "sanoffload-storage-cleanup"
    # as the agent's: LVs active and LIO's saved configuration restored first
    agent_after = units["sanoffload-cleanup.service"]["Unit"]["After"].split()
    # the agent's also waits for the network (it asks storage nodes to release)
    assert unit["Unit"]["After"].split() == [a for a in agent_after
                                               if a != "network-online.target"]
    # no configuration, no node: the unit does nothing rather than fail every boot
    assert unit["Unit"]["ConditionPathExists"] == "/etc/sanoffload/storage.toml"
    # a cleanup stuck on LVM must not keep sshd (the administrator's way in) from starting
    assert "sshd.service" not in unit["Unit"].get("Before", "")
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_backup_service_runs_the_job_named_by_its_instance(
        units: dict[str, configparser.ConfigParser]) -> None:
    unit = units["sanoffload-backup@.service"]
    service = unit["Service"]
    assert service["Type"] == "oneshot"
    argv = service["ExecStart"].split()
    assert argv[:2] == ["/usr/bin/env", "sanoffload"]
    assert argv[2:] == ["backup", "--job", "%i", "--no-progress"]
    assert {"network-online.target", "iscsid.service"} <= set(unit["Unit"]["After"].split())
    assert "network-online.target" in unit["Unit"]["Wants"].split()
    assert service["SyslogIdentifier"] == "sanoffload-backup-%i"
    assert service["NoNewPrivileges"] == "yes"
    # the job's own deadline must fire (and clean up) before systemd kills the run
    assert seconds(service["TimeoutStartSec"]) > DEFAULT_TIMEOUT_S


def test_backup_service_keeps_iscsi_and_mounts_working(
        units: dict[str, configparser.ConfigParser]) -> None:
    service = units["sanoffload-backup@.service"]["Service"]
    # each of these hides devices, blocks module loading or puts the mounts
    # under /run/sanoffload into a namespace the host cannot see
    for key in ("ProtectSystem", "PrivateDevices", "PrivateTmp", "ProtectHome",
                "ProtectKernelModules", "ProtectKernelTunables", "DeviceAllow",
                "ReadOnlyPaths", "ReadWritePaths", "PrivateMounts", "ProtectClock"):
        assert key not in service, key


def test_proxy_cleanup_runs_at_boot_before_any_backup(
        units: dict[str, configparser.ConfigParser],
        capsys: pytest.CaptureFixture[str]) -> None:
    unit = units["sanoffload-proxy-cleanup.service"]
    argv = unit["Service"]["ExecStart"].split()
    assert argv[:2] == ["/usr/bin/env", "sanoffload"]
    assert argv[2:] == ["proxy", "cleanup"]
    assert cli.run([*argv[2:], "--help"]) == 0  # a command line the CLI knows
    assert "Usage: sanoffload proxy cleanup" in capsys.readouterr().out
    assert unit["Service"]["Type"] == "oneshot"
    # the journal survives reboots (node records do too); nothing journaled, nothing to do
    assert unit["Unit"]["ConditionDirectoryNotEmpty"] == "/var/lib/sanoffload/proxy"
    assert {"local-fs.target", "iscsid.service"} <= set(unit["Unit"]["After"].split())
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    assert "sanoffload-proxy-cleanup.service" in ROLE_UNITS["proxy"]
    after = units["sanoffload-backup@.service"]["Unit"]["After"].split()
    assert "sanoffload-proxy-cleanup.service" in after


def test_backup_timer_is_daily_per_instance(units: dict[str, configparser.ConfigParser]) -> None:
    timer = units["sanoffload-backup@.timer"]
    assert timer["Timer"]["OnCalendar"] == "daily"
    assert seconds(timer["Timer"]["RandomizedDelaySec"]) == 1800
    assert timer["Timer"]["Persistent"] == "true"
    assert timer["Timer"]["Unit"] == "sanoffload-backup@%i.service"
    assert timer["Install"]["WantedBy"] == "timers.target"


# --------------------------------------------------------------------------
# install-units
# --------------------------------------------------------------------------

def invoke(*args: str) -> Result:
    return CliRunner().invoke(install_units, list(args))


def listing(dest: Path) -> set[str]:
    return {p.name for p in dest.iterdir()}


def test_install_writes_every_unit_atomically_with_mode_0644(tmp_path: Path) -> None:
    result = invoke("--dest", str(tmp_path))
    assert result.exit_code == 0, result.output
    # nothing but the units: no temporary file left behind
    assert listing(tmp_path) == ALL
    shipped = unit_files()
    for name in ALL:
        path = tmp_path / name
        assert path.read_text() == shipped[name]
        assert path.stat().st_mode & 0o777 == 0o644
        assert f"written      {path}" in result.output.splitlines()
    assert ("systemctl daemon-reload && systemctl enable --now "
            "sanoffload-cleanup.service sanoffload-lease.timer") in result.output
    assert "systemctl enable --now sanoffload-backup@JOB.timer" in result.output


def test_install_again_leaves_identical_files_alone(tmp_path: Path) -> None:
    assert invoke("--dest", str(tmp_path)).exit_code == 0
    before = {n: (tmp_path / n).stat().st_ino for n in ALL}
    result = invoke("--dest", str(tmp_path))
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert sum(line.startswith("unchanged ") for line in lines) == len(ALL)
    assert not any(line.startswith("written") for line in lines)
    # not rewritten: the same inodes
    assert {n: (tmp_path / n).stat().st_ino for n in ALL} == before


def test_a_differing_file_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    mine = tmp_path / "sanoffload-lease.timer"
    mine.write_text("[Timer]\nOnCalendar=hourly\n")
    result = invoke("--dest", str(tmp_path))
    assert isinstance(result.exception, UsageError)
    assert str(mine) in str(result.exception)
    assert "--force" in str(result.exception)
    assert listing(tmp_path) == {mine.name}
    assert mine.read_text() == "[Timer]\nOnCalendar=hourly\n"


def test_every_differing_file_is_named(tmp_path: Path) -> None:
    for name in ("sanoffload-lease.timer", "sanoffload-backup@.service"):
        (tmp_path / name).write_text("mine\n")
    result = invoke("--dest", str(tmp_path))
    assert isinstance(result.exception, UsageError)
    assert "sanoffload-lease.timer" in str(result.exception)
    assert "sanoffload-backup@.service" in str(result.exception)


def test_force_replaces_a_differing_file(tmp_path: Path) -> None:
    mine = tmp_path / "sanoffload-cleanup.service"
    mine.write_text("mine\n")
    result = invoke("--dest", str(tmp_path), "--force")
    assert result.exit_code == 0, result.output
    assert mine.read_text() == unit_files()[mine.name]
    assert f"written      {mine} (replaces a different file)" in result.output.splitlines()
    assert listing(tmp_path) == ALL


def test_a_masked_unit_is_not_unmasked_without_force(tmp_path: Path) -> None:
    masked = tmp_path / "sanoffload-lease.timer"
    masked.symlink_to(os.devnull)
    result = invoke("--dest", str(tmp_path))
    assert isinstance(result.exception, UsageError)
    # (the temporary directory's name holds the test's name: look for the whole phrase)
    assert f"is a symlink to {os.devnull} (the unit is masked)" in str(result.exception)
    assert masked.is_symlink() and listing(tmp_path) == {masked.name}
    assert invoke("--dest", str(tmp_path), "--force").exit_code == 0
    assert not masked.is_symlink()
    assert masked.read_text() == unit_files()[masked.name]
    assert os.path.exists(os.devnull)  # the link was replaced, not its target


def test_dry_run_writes_nothing(tmp_path: Path) -> None:
    result = invoke("--dest", str(tmp_path), "--dry-run")
    assert result.exit_code == 0, result.output
    assert listing(tmp_path) == set()
    lines = result.output.splitlines()
    for name in ALL:
        assert f"would write  {tmp_path / name}" in lines


def test_dry_run_reports_the_refusal_a_real_run_would_meet(tmp_path: Path) -> None:
    (tmp_path / "sanoffload-cleanup.service").write_text("mine\n")
    result = invoke("--dest", str(tmp_path), "--dry-run")
    assert isinstance(result.exception, UsageError)
    assert (tmp_path / "sanoffload-cleanup.service").read_text() == "mine\n"


@pytest.mark.parametrize("role,expected,other", [
    ("agent", AGENT, "sanoffload-backup@JOB.timer"),
    ("proxy", PROXY, "sanoffload-lease.timer"),
    ("storage", STORAGE, "sanoffload-lease.timer"),
])
def test_role_filters_the_units_and_the_hint(tmp_path: Path, role: str, expected: set[str],
                                             other: str) -> None:
    result = invoke("--dest", str(tmp_path), "--role", role)
    assert result.exit_code == 0, result.output
    assert listing(tmp_path) == expected
    assert other not in result.output
    assert "systemctl daemon-reload" in result.output


def test_a_differing_file_of_another_role_does_not_matter(tmp_path: Path) -> None:
    (tmp_path / "sanoffload-backup@.service").write_text("mine\n")
    result = invoke("--dest", str(tmp_path), "--role", "agent")
    assert result.exit_code == 0, result.output
    assert listing(tmp_path) == AGENT | {"sanoffload-backup@.service"}


def test_a_missing_destination_is_refused_not_created(tmp_path: Path) -> None:
    dest = tmp_path / "no" / "such"
    result = invoke("--dest", str(dest))
    assert isinstance(result.exception, UsageError)
    assert "no such directory" in str(result.exception)
    assert not (tmp_path / "no").exists()


def test_a_failed_write_leaves_the_old_file_and_no_temporary(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "sanoffload-lease.timer"
    target.write_text("old\n")

    def broken_replace(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        iu.write_atomic(str(target), "new\n")
    assert target.read_text() == "old\n"
    assert listing(tmp_path) == {target.name}


def test_it_never_runs_a_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_process(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"install-units started a process: {args}")

    monkeypatch.setattr(subprocess, "Popen", no_process)
    monkeypatch.setattr(cli, "make_runner", no_process)
    result = invoke("--dest", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert listing(tmp_path) == ALL


def test_through_the_main_cli_a_refusal_is_one_line_and_exit_2(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    # how cli.py registers it: LAZY_COMMANDS["install-units"]
    monkeypatch.setitem(cli.LAZY_COMMANDS, "install-units",
                        "sanoffload.install_units:install_units")
    assert cli.run(["install-units", "--dest", str(tmp_path), "--role", "proxy"]) == 0
    (tmp_path / "sanoffload-backup@.timer").write_text("mine\n")
    capsys.readouterr()
    assert cli.run(["install-units", "--dest", str(tmp_path), "--role", "proxy"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sanoffload: error: refusing to replace 1 unit file(s)")
    assert err.count("\n") == 1


def test_help_has_an_example() -> None:
    result = invoke("--help")
    assert result.exit_code == 0
    assert "sanoffload install-units --role agent" in result.output
    assert "sanoffload install-units --role storage" in result.output
    assert "[agent|proxy|storage|all]" in result.output


def test_storage_role_installs_its_cleanup_and_lease_units_and_says_how_to_enable_them(
        tmp_path: Path) -> None:
    result = invoke("--dest", str(tmp_path), "--role", "storage")
    assert result.exit_code == 0, result.output
    names = ["sanoffload-storage-cleanup.service", "sanoffload-storage-lease.service",
             "sanoffload-storage-lease.timer"]
    assert listing(tmp_path) == set(names)
    for name in names:
        path = tmp_path / name
        assert path.read_text() == unit_files()[path.name]
        assert path.stat().st_mode & 0o777 == 0o644
    assert result.output.splitlines() == [
        *(f"written      {tmp_path / name}" for name in names),
        ("next, on the storage node: systemctl daemon-reload && "
         "systemctl enable --now sanoffload-storage-cleanup.service "
         "sanoffload-storage-lease.timer")]


def test_storage_lease_units_run_storage_cleanup_every_minute(
        units: dict[str, configparser.ConfigParser],
        capsys: pytest.CaptureFixture[str]) -> None:
    service = units["sanoffload-storage-lease.service"]
    argv = service["Service"]["ExecStart"].split()
    assert argv == ["/usr/bin/env", "sanoffload", "storage", "cleanup"]  # never --all
    assert cli.run([*argv[2:], "--help"]) == 0
    assert "Usage: sanoffload storage cleanup" in capsys.readouterr().out
    assert service["Unit"]["ConditionPathExists"] == "/etc/sanoffload/storage.toml"
    assert not service.has_section("Install")  # started by its timer only
    timer = units["sanoffload-storage-lease.timer"]
    assert seconds(timer["Timer"]["OnUnitActiveSec"]) == 60
    assert timer["Timer"]["Unit"] == "sanoffload-storage-lease.service"
    assert timer["Install"]["WantedBy"] == "timers.target"
