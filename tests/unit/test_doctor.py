"""doctor: per-role checks against a fake sysfs tree, plus one run on this very machine."""

from __future__ import annotations

import ast
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

import sanoffload
from sanoffload.doctor import PROBE_TIMEOUT, REQUIREMENTS, SETUP, Host, run_checks
from sanoffload.errors import Interrupted
from sanoffload.requirements import ROLES
from sanoffload.runner import DEFAULT_PATH

from ..fixtures.doctor import fakehost as fh
from .test_doctor_storage import storage_host

pytestmark = pytest.mark.unit

REPO = Path(sanoffload.__file__).resolve().parent.parent

#: the fake host, configured as a storage node too (storage.toml, addresses, LUNs, state_dir),
#: so the storage role's setup checks pass unless a test says otherwise
fake_host = storage_host


def names(role: str) -> list[str]:
    return [need.name for need in REQUIREMENTS[role]]


# --------------------------------------------------------------------------
# everything present / everything missing
# --------------------------------------------------------------------------

@pytest.mark.parametrize("role", ROLES)
def test_all_present_exits_zero(tmp_path: Path, role: str) -> None:
    report = run_checks(role, fake_host(tmp_path))
    assert report.missing == []
    assert report.warnings == []
    assert report.ok and report.exit_code == 0
    assert report.error() is None
    assert all(c.status == "ok" for c in report.checks)
    assert [c.name for c in report.checks] == names(role)


@pytest.mark.parametrize("role", ROLES)
def test_nothing_present_fails_and_every_check_explains_itself(tmp_path: Path, role: str) -> None:
    host = fake_host(tmp_path, without=fh.FEATURES, tools=(), modules={})
    report = run_checks(role, host)
    assert not report.ok and report.exit_code == 4
    # the host is set up (storage.toml, LUNs…): only the tools and features are gone
    required = [n.name for n in REQUIREMENTS[role]
                if not n.optional and n not in SETUP.get(role, ())]
    assert report.missing == required
    for check in report.checks:
        assert check.name and check.what and check.detail and check.fails_without
        assert "\n" not in check.fails_without  # one line, as the table prints it
    err = report.error()
    assert err is not None and err.exit_code == 4
    assert all(name in err.message for name in required)


def test_storage_on_bare_machine_names_device_mapper_lio_and_scsi(tmp_path: Path) -> None:
    # tools installed but the kernel lacks the features: the situation of a dev VM
    host = fake_host(tmp_path, without=("device-mapper", "LIO", "SCSI", "configfs",
                                           "iscsi_target_mod"))
    report = run_checks("storage", host)
    assert report.exit_code == 4
    assert {"device-mapper", "LIO", "SCSI"} <= set(report.missing)
    assert report.check("dmsetup").present  # the tool is there; the kernel driver is not
    assert "no kernel driver" in report.check("device-mapper").detail


# --------------------------------------------------------------------------
# individual features
# --------------------------------------------------------------------------

@pytest.mark.parametrize("role", ["agent", "storage"])
def test_missing_device_mapper_is_named(tmp_path: Path, role: str) -> None:
    host = fake_host(tmp_path, without=["device-mapper"])
    report = run_checks(role, host)
    assert report.missing == ["device-mapper"]
    assert report.exit_code == 4
    # dmsetup was asked, with a timeout, because sysfs had no answer
    call = next(c for c in host.runner.calls if c.argv == ["dmsetup", "version"])
    assert call.timeout == PROBE_TIMEOUT


def test_device_mapper_found_by_dmsetup_driver_line(tmp_path: Path) -> None:
    runner = fh.fake_runner(dm_driver=True)
    host = fake_host(tmp_path, without=["device-mapper"], runner=runner)
    check = run_checks("storage", host).check("device-mapper")
    assert check.present
    assert check.detail.startswith("Driver version:")


def test_device_mapper_found_in_proc_misc_without_running_dmsetup(tmp_path: Path) -> None:
    host = fake_host(tmp_path, without=["device-mapper"])
    (tmp_path / "proc/misc").write_text(" 58 device-mapper\n237 loop-control\n")
    check = run_checks("storage", host).check("device-mapper")
    assert check.present and "/proc/misc" in check.detail
    assert not host.runner.called("dmsetup")


def test_device_mapper_control_node_counts_only_without_dmsetup(tmp_path: Path) -> None:
    tools = fh.ALL_TOOLS - {"dmsetup"}
    host = fake_host(tmp_path, without=["device-mapper"], tools=tools)
    (tmp_path / "dev/mapper").mkdir(parents=True)
    (tmp_path / "dev/mapper/control").touch()
    report = run_checks("storage", host)
    assert report.check("device-mapper").present
    assert "/dev/mapper/control" in report.check("device-mapper").detail
    assert report.missing == ["dmsetup"]


def test_stale_control_node_does_not_fool_dmsetup(tmp_path: Path) -> None:
    host = fake_host(tmp_path, without=["device-mapper"])
    (tmp_path / "dev/mapper").mkdir(parents=True)
    (tmp_path / "dev/mapper/control").touch()
    assert not run_checks("storage", host).check("device-mapper").present


def test_dmsetup_timeout_is_reported_not_raised(tmp_path: Path) -> None:
    runner = fh.fake_runner()
    runner.on("dmsetup", "version", timeout=True)
    host = fake_host(tmp_path, without=["device-mapper"], runner=runner)
    check = run_checks("storage", host).check("device-mapper")
    assert not check.present
    assert "timed out" in check.detail


@pytest.mark.parametrize("role", ["agent", "storage"])
def test_missing_lio_is_named(tmp_path: Path, role: str) -> None:
    report = run_checks(role, fake_host(tmp_path, without=["LIO"]))
    assert report.missing == ["LIO"]
    assert "CONFIG_TARGET_CORE" in report.check("LIO").detail


def test_lio_loadable_module_counts_as_present_and_says_so(tmp_path: Path) -> None:
    # rtslib-fb loads target_core_mod on first use, so a loadable module is enough
    runner = fh.fake_runner(fh.ALL_TOOLS | {"modprobe"})
    runner.on("modprobe", "-n", "-q", "target_core_mod", returncode=0)
    host = fake_host(tmp_path, without=["LIO"], runner=runner)
    check = run_checks("storage", host).check("LIO")
    assert check.present
    assert "modprobe target_core_mod" in check.detail
    assert runner.called("modprobe", "-n", "-q", "target_core_mod")


def test_lio_module_loaded_but_configfs_unmounted(tmp_path: Path) -> None:
    host = fake_host(tmp_path, without=["LIO", "configfs"])
    (tmp_path / "sys/module/target_core_mod").mkdir(parents=True)
    report = run_checks("storage", host)
    assert report.missing == ["configfs", "LIO"]
    assert "mount configfs" in report.check("LIO").detail


def test_configfs_known_but_not_mounted(tmp_path: Path) -> None:
    host = fake_host(tmp_path, without=["configfs"])
    (tmp_path / "proc/filesystems").write_text("nodev\tsysfs\nnodev\tconfigfs\n")
    check = run_checks("agent", host).check("configfs")
    # LIO's directory exists in the fake tree, which implies configfs is mounted
    assert check.present
    (tmp_path / "sys/kernel/config/target/version").unlink()
    (tmp_path / "sys/kernel/config/target").rmdir()
    check = run_checks("agent", host).check("configfs")
    assert not check.present and "not mounted" in check.detail


def test_configfs_absent_from_kernel(tmp_path: Path) -> None:
    host = fake_host(tmp_path, without=["configfs", "LIO"])
    check = run_checks("storage", host).check("configfs")
    assert not check.present and "CONFIG_CONFIGFS_FS" in check.detail


@pytest.mark.parametrize("role", ["storage", "proxy", "agent"])
def test_missing_scsi_is_named(tmp_path: Path, role: str) -> None:
    report = run_checks(role, fake_host(tmp_path, without=["SCSI"]))
    assert report.missing == ["SCSI"]
    assert "/sys/bus/scsi" in report.check("SCSI").detail


def test_scsi_class_dir_alone_is_enough(tmp_path: Path) -> None:
    host = fake_host(tmp_path, without=["SCSI"])
    (tmp_path / "sys/class/scsi_host").mkdir(parents=True)
    assert run_checks("proxy", host).check("SCSI").present


def test_iscsi_tcp_loadable_via_modprobe_dry_run(tmp_path: Path) -> None:
    tools = fh.ALL_TOOLS | {"modprobe"}
    runner = fh.fake_runner(tools)
    runner.on("modprobe", "-n", "-q", "iscsi_tcp", returncode=0)
    host = fake_host(tmp_path, without=["iscsi_tcp"], runner=runner)
    check = run_checks("proxy", host).check("iscsi_tcp")
    assert check.present and "not loaded yet" in check.detail
    call = next(c for c in runner.calls if c.argv[0] == "modprobe")
    assert call.argv == ["modprobe", "-n", "-q", "iscsi_tcp"]  # -n: never loads anything
    assert call.timeout == PROBE_TIMEOUT


def test_iscsi_tcp_unknown_to_modprobe(tmp_path: Path) -> None:
    runner = fh.fake_runner(fh.ALL_TOOLS | {"modprobe"})
    host = fake_host(tmp_path, without=["iscsi_tcp"], runner=runner)
    report = run_checks("proxy", host)
    assert report.missing == ["iscsi_tcp"]
    assert "modprobe finds no module iscsi_tcp" in report.check("iscsi_tcp").detail


def test_iscsi_tcp_without_modprobe_is_missing_without_calling_it(tmp_path: Path) -> None:
    host = fake_host(tmp_path, without=["iscsi_tcp"])  # ALL_TOOLS has no modprobe
    report = run_checks("proxy", host)
    assert report.missing == ["iscsi_tcp"]
    assert not host.runner.called("modprobe")


def test_iscsid_found_as_process(tmp_path: Path) -> None:
    host = fake_host(tmp_path, without=["iscsid"])
    assert run_checks("proxy", host).missing == ["iscsid"]
    (tmp_path / "proc/4242").mkdir()
    (tmp_path / "proc/4242/comm").write_text("iscsid\n")
    check = run_checks("proxy", host).check("iscsid")
    assert check.present and "4242" in check.detail


def test_iscsid_socket_activation_counts(tmp_path: Path) -> None:
    check = run_checks("proxy", fake_host(tmp_path)).check("iscsid")
    assert check.present and "ISCSIADM_ABSTRACT_NAMESPACE" in check.detail


def test_udev_needs_running_daemon(tmp_path: Path) -> None:
    report = run_checks("proxy", fake_host(tmp_path, without=["udevd"]))
    assert report.missing == ["udev"]
    assert "udevd not running" in report.check("udev").detail


def test_udevadm_missing(tmp_path: Path) -> None:
    report = run_checks("proxy", fake_host(tmp_path, tools=fh.ALL_TOOLS - {"udevadm"}))
    assert report.missing == ["udev"]
    assert "udevadm not found" in report.check("udev").detail


def test_lvm_needs_all_three_tools(tmp_path: Path) -> None:
    report = run_checks("storage", fake_host(tmp_path, tools=fh.ALL_TOOLS - {"lvcreate"}))
    assert report.missing == ["lvm"]
    assert report.check("lvm").detail == "not found on PATH: lvcreate"


def test_rtslib_not_importable(tmp_path: Path) -> None:
    modules = fh.default_modules()
    del modules["rtslib_fb"]
    report = run_checks("storage", fake_host(tmp_path, modules=modules))
    assert report.missing == ["rtslib_fb"]
    assert "ModuleNotFoundError" in report.check("rtslib_fb").detail


def test_pyudev_without_libudev_is_missing(tmp_path: Path) -> None:
    def no_libudev() -> object:
        raise ImportError("libudev.so.1: cannot open shared object file")

    modules = fh.default_modules()
    modules["pyudev"] = SimpleNamespace(__version__="0.24.1", Context=no_libudev)
    report = run_checks("proxy", fake_host(tmp_path, modules=modules))
    assert report.missing == ["pyudev"]
    assert "libudev.so.1" in report.check("pyudev").detail


def test_non_gnu_tar_is_missing(tmp_path: Path) -> None:
    runner = fh.fake_runner()
    runner.on("tar", "--version", stdout=fh.fixture_text("tar-version-bsd.txt"))
    report = run_checks("store", fake_host(tmp_path, runner=runner))
    assert report.missing == ["tar"]
    assert report.check("tar").detail.startswith("not GNU tar: bsdtar")


def test_tar_that_rejects_version_flag_is_missing(tmp_path: Path) -> None:
    runner = fh.fake_runner()
    runner.on("tar", "--version", returncode=1, stderr="tar: unrecognized option '--version'\n")
    check = run_checks("proxy", fake_host(tmp_path, runner=runner)).check("tar")
    assert not check.present and "unrecognized option" in check.detail


def test_gnu_tar_version_in_detail(tmp_path: Path) -> None:
    check = run_checks("store", fake_host(tmp_path)).check("tar")
    assert check.present and check.detail == "tar (GNU tar) 1.34"


# --------------------------------------------------------------------------
# role differences and optional checks
# --------------------------------------------------------------------------

def test_role_check_lists_differ_where_roles_differ() -> None:
    agent, proxy, store, storage = (set(names(r)) for r in ("agent", "proxy", "store", "storage"))
    assert {"fsfreeze", "findmnt", "LIO", "device-mapper", "SCSI"} <= agent
    assert {"iscsiadm", "iscsid", "iscsi_tcp", "pyudev", "mount", "tar", "zstd", "ssh"} <= proxy
    assert {"LIO", "device-mapper", "lvm", "dmsetup", "SCSI", "rtslib_fb", "sshd", "thin_check",
            "storage.toml", "ports", "luns", "state_dir"} <= storage
    # image backups: the optional mount of one (FUSE, loop device, mount)
    assert store == {"tar", "zstd", "ssh", "sshd", "image-mount", "losetup", "mfusepy"}
    assert "LIO" not in proxy and "iscsiadm" not in storage and "fsfreeze" not in storage


def test_store_ignores_kernel_features(tmp_path: Path) -> None:
    report = run_checks("store", fake_host(tmp_path, without=fh.FEATURES))
    assert report.ok and report.exit_code == 0


def test_optional_missing_only_warns(tmp_path: Path) -> None:
    host = fake_host(tmp_path, tools=fh.ALL_TOOLS - {"ssh", "sshd"})
    report = run_checks("store", host)
    assert report.ok and report.exit_code == 0
    assert report.warnings == ["ssh", "sshd"]
    assert report.check("sshd").status == "warn"


def test_ssh_required_on_proxy(tmp_path: Path) -> None:
    report = run_checks("proxy", fake_host(tmp_path, tools=fh.ALL_TOOLS - {"ssh"}))
    assert report.missing == ["ssh"] and report.exit_code == 4


def test_report_to_dict_is_json_ready(tmp_path: Path) -> None:
    report = run_checks("proxy", fake_host(tmp_path, without=["iscsi_tcp"]))
    data = json.loads(json.dumps(report.to_dict()))
    assert data["role"] == "proxy" and data["ok"] is False and data["exit_code"] == 4
    assert data["missing"] == ["iscsi_tcp"]
    row = next(c for c in data["checks"] if c["name"] == "iscsi_tcp")
    assert row["status"] == "missing" and row["present"] is False and row["optional"] is False
    assert set(row) == {"name", "what", "present", "detail", "fails_without", "optional",
                        "status"}


def test_unknown_role_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown role"):
        run_checks("nas", fake_host(tmp_path))


def test_host_reads_under_root_only(tmp_path: Path) -> None:
    host = Host(fh.ToolsFakeRunner(()), root=tmp_path)
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/misc").write_text("x\n")
    assert host.path("/proc/misc") == tmp_path / "proc/misc"
    assert host.read("/proc/misc") == "x\n"
    assert host.read("/proc/nonexistent") is None
    assert not host.exists("/proc/self")  # the real /proc is not consulted


# --------------------------------------------------------------------------
# the real thing, on this machine
# --------------------------------------------------------------------------

def _on_path(tool: str) -> bool:
    return shutil.which(tool, path=DEFAULT_PATH) is not None


def test_real_doctor_storage_on_this_machine() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "sanoffload", "doctor", "--role", "storage",
                           "--json"], capture_output=True, text=True, env=env, timeout=120,
                          cwd=REPO, check=False)
    report = json.loads(proc.stdout)
    status = {c["name"]: c["present"] for c in report["checks"]}

    dm_here = os.path.exists("/sys/class/misc/device-mapper") or "device-mapper" in (
        Path("/proc/misc").read_text() if os.path.exists("/proc/misc") else "")
    lio_here = os.path.exists("/sys/kernel/config/target")
    scsi_markers = any(os.path.exists(p) for p in
                       ("/sys/bus/scsi", "/sys/class/scsi_host", "/sys/module/scsi_mod"))

    assert status["device-mapper"] is dm_here
    if not os.path.exists("/etc/sanoffload/storage.toml"):
        # not a storage node: a failed check, named, not a traceback
        assert "storage.toml" in report["missing"]
        assert "no such file" in next(c["detail"] for c in report["checks"]
                                      if c["name"] == "storage.toml")
    assert status["LIO"] is lio_here
    if scsi_markers or not _on_path("modprobe"):
        assert status["SCSI"] is scsi_markers
    else:  # a loadable scsi_mod makes it present; either way doctor asked modprobe
        assert status["SCSI"] or "modprobe" in next(
            c["detail"] for c in report["checks"] if c["name"] == "SCSI")

    if not (dm_here or lio_here or scsi_markers):
        # a machine like the dev VM: storage role impossible, all three named
        assert proc.returncode == 4
        assert {"device-mapper", "LIO", "SCSI"} <= set(report["missing"])
        err = proc.stderr.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("sanoffload: error: role storage is missing")
        for name in ("device-mapper", "LIO", "SCSI"):
            assert name in err[0]
    else:
        assert proc.returncode == (0 if report["ok"] else 4)


def test_signal_during_a_probe_stops_doctor(tmp_path: Path) -> None:
    def sigterm(_argv: list[str]) -> None:
        raise Interrupted(signal.SIGTERM)

    runner = fh.fake_runner()
    runner.on("tar", "--version", action=sigterm)
    with pytest.raises(Interrupted):
        run_checks("store", fake_host(tmp_path, runner=runner))


def test_probe_that_cannot_read_counts_as_missing(tmp_path: Path) -> None:
    host = fake_host(tmp_path)

    def unreadable(_host: Host) -> tuple[bool, str]:
        raise PermissionError(13, "Permission denied", "/sys/kernel/config")

    need = REQUIREMENTS["store"][0]
    patched = {"store": (type(need)(need.name, need.what, unreadable, need.fails_without),)}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("sanoffload.doctor.REQUIREMENTS", patched)
        report = run_checks("store", host)
    assert report.missing == ["tar"]
    assert report.check("tar").detail.startswith("check failed: [Errno 13] Permission denied")


# --------------------------------------------------------------------------
# doctor asks for what the code runs, collected from the wrappers' declarations
# --------------------------------------------------------------------------

_RUNS = {"run", "spawn", "stream", "Stage"}


def _executables_in(tree: ast.AST) -> set[str]:
    """argv[0] of every argv literal: passed to run/spawn/stream/Stage, kept in ``argv``,
    or returned (the ``*_argv`` builders and iscsiadm's ``_node``)."""
    argvs: list[ast.List] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(
                node.func, "id", "")
            if name in _RUNS and node.args and isinstance(node.args[0], ast.List):
                argvs.append(node.args[0])
        elif isinstance(node, ast.Assign) and isinstance(node.value, ast.List):
            if any(isinstance(t, ast.Name) and t.id == "argv" for t in node.targets):
                argvs.append(node.value)
        elif isinstance(node, ast.Return) and isinstance(node.value, ast.List):
            argvs.append(node.value)
        elif isinstance(node, ast.IfExp):
            argvs += [v for v in (node.body, node.orelse) if isinstance(v, ast.List)]
    return {a.elts[0].value for a in argvs
            if a.elts and isinstance(a.elts[0], ast.Constant) and isinstance(a.elts[0].value, str)}


def _run_by_the_package() -> dict[str, set[str]]:
    """executable -> the modules that run it (doctor's own probes aside)."""
    found: dict[str, set[str]] = {}
    for path in sorted((REPO / "sanoffload").rglob("*.py")):
        if path.name == "doctor.py":
            continue
        for exe in _executables_in(ast.parse(path.read_text(), str(path))):
            found.setdefault(exe, set()).add(str(path.relative_to(REPO)))
    return found


class LookingRunner(fh.ToolsFakeRunner):
    """Records which executables doctor looks for."""

    def __init__(self) -> None:
        super().__init__(fh.ALL_TOOLS)
        self.looked: list[str] = []
        base = fh.fake_runner()
        self.rules = base.rules

    def which(self, name: str) -> str | None:
        self.looked.append(name)
        return super().which(name)


def _looked_for(tmp_path: Path, role: str) -> set[str]:
    runner = LookingRunner()
    run_checks(role, fake_host(tmp_path / role, runner=runner))
    return set(runner.looked)


def test_the_scan_sees_the_commands_we_know_of() -> None:
    # the scan itself works: these are run through the runner today
    assert {"lvs", "lvcreate", "lvremove", "fsfreeze", "sync", "findmnt", "dmsetup",
            "iscsiadm", "tar", "zstd", "ssh", "mount", "umount", "blkid"} <= set(
        _run_by_the_package())


@pytest.mark.hostile("tests", "a command the code runs that doctor does not ask for "
                              "(blkid on the proxy, lvconvert, sync)",
                     "the test names it and the module that runs it")
def test_every_command_the_package_runs_is_checked_for_some_role(tmp_path: Path) -> None:
    looked = set().union(*(_looked_for(tmp_path, role) for role in ROLES))
    missing = {exe: sorted(mods) for exe, mods in _run_by_the_package().items()
               if exe not in looked}
    assert missing == {}, f"run but not declared (add it to that module's REQUIRES): {missing}"


def test_agent_role_asks_only_for_what_the_agent_runs(tmp_path: Path) -> None:
    looked = _looked_for(tmp_path, "agent")
    assert not looked & {"lsblk", "blkid", "udevadm"}
    assert "udev" not in names("agent")
    assert {"lvs", "vgs", "lvcreate", "lvconvert", "lvchange", "lvremove", "dmsetup",
            "fsfreeze", "sync", "findmnt"} <= looked


def test_doctor_builds_its_checks_from_the_wrappers_declarations() -> None:
    from sanoffload.doctor import requirements_for
    from sanoffload.requirements import Requirement
    from sanoffload.tools import fsfreeze, lvm

    assert lvm.REQUIRES[0].executables and "agent" in lvm.REQUIRES[0].roles
    mine = Requirement("thing", "a thing", roles=("agent",), fails_without="no thing",
                       executables=("thingctl",), kernel=("configfs",))
    built = requirements_for("agent", [*fsfreeze.REQUIRES, mine])
    assert [n.name for n in built] == ["fsfreeze", "thing", "configfs"]
    assert requirements_for("proxy", [mine]) == ()


@pytest.mark.parametrize("kw", [{"roles": ("nas",)}, {"kernel": ("zfs",)},
                                {"fails_without": "two\nlines"}])
def test_a_declaration_typo_is_refused_at_import(kw: dict[str, object]) -> None:
    from sanoffload.requirements import Requirement

    args: dict[str, object] = {"roles": ("agent",), "fails_without": "x", **kw}
    with pytest.raises(ValueError):
        Requirement("x", "x", **args)  # type: ignore[arg-type]


def test_every_module_declaring_requires_is_collected() -> None:
    """A need lives beside the code that has it, and doctor collects every such module."""
    import importlib

    from sanoffload.channel import client
    from sanoffload.doctor import DECLARING_MODULES, HOST_SERVICES
    from sanoffload.proxy import devices, mount
    from sanoffload.tools import tar, zstd

    for module, need in [(tar, "tar"), (zstd, "zstd"), (mount, "mount"), (devices, "pyudev"),
                         (client, "ssh")]:
        assert need in [r.name for r in module.REQUIRES], module.__name__
    declaring = set()
    for path in sorted((REPO / "sanoffload").rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        if any(isinstance(node, (ast.Assign, ast.AnnAssign)) and "REQUIRES" in [
                t.id for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
                if isinstance(t, ast.Name)] for node in tree.body):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts)
            declaring.add(importlib.import_module(name))
    assert declaring == set(DECLARING_MODULES)
    # only what no module of ours runs is declared in doctor itself
    assert [r.name for r in HOST_SERVICES] == ["sshd", "thin_check"]
