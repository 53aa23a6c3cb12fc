"""doctor --role storage: is this host configured as its storage.toml says?

The fake storage node: a storage.toml under the fake root, addresses given
as psutil would list them, and the node's real LunMap over an in-memory
rtslib-fb module (the production backstores as LIO lists them), device
numbers from an injected stat and LVM answered by the lab's recorded ``lvs``.
"""

from __future__ import annotations

import os
import stat
import types
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import pytest

from sanoffload import cli
from sanoffload.doctor import (
    REQUIREMENTS,
    Host,
    LunResolver,
    lio_lun_map,
    local_addresses,
    run_checks,
)
from sanoffload.storage.luns import LunMap
from sanoffload.tools import lio

from ..fixtures.doctor import fakehost as fh
from .recorded import feed

pytestmark = pytest.mark.unit

PX1 = "iqn.2026-11.org.sanoffload.lab:px1"
#: unit serials of the node's production backstores (fs1's udev sees their identifiers)
SERIALS = {"lin": "5e2b7c1a-0d4f-4a8e-9b3c-1f2e3d4c5b6a",
           "thin": "0b9f1e2d-3c4b-4a59-8687-96a5b4c3d2e1",
           "sdb": "d15c0000-aaaa-4bbb-8ccc-dddddddddddd",
           "gone": "feedface-0000-4000-8000-000000000001"}
LUN = {name: lio.naa_from_serial(serial) for name, serial in SERIALS.items()}
#: backstore device -> (major, minor) as the recorded lvs_all reports datavg's LVs; sdb a disk
DEVICES = {"/dev/datavg/lin": (253, 0), "/dev/datavg/thin": (253, 5), "/dev/sdb": (8, 16)}
BACKSTORES = {"fs1-data": ("/dev/datavg/lin", SERIALS["lin"]),
              "fs1-thin": ("/dev/datavg/thin", SERIALS["thin"]),
              "fs1-disk": ("/dev/sdb", SERIALS["sdb"])}
STATE = "/var/lib/sanoffload/storage"
TOOLS = fh.ALL_TOOLS | {"thin_check"}


def storage_toml(luns: Collection[str] = (LUN["lin"], LUN["thin"]),
                 state_dir: str = STATE, ports: str = 'address = "10.77.0.10"') -> str:
    listed = ", ".join(f'"{lun}"' for lun in luns)
    return (f'state_dir = "{state_dir}"\n\n[ports.p1]\n{ports}\n\n'
            f'[clients.fs1]\nluns = [{listed}]\nproxies = ["{PX1}"]\n')


def fake_stat(path: str) -> os.stat_result:
    if path not in DEVICES:
        raise FileNotFoundError(2, "No such file or directory", path)
    major, minor = DEVICES[path]
    # st_rdev is not among the ten fields of the tuple: it comes in the attribute dict
    fields = [stat.S_IFBLK | 0o660, 1, 6, 1, 0, 6, 0, 0, 0, 0]
    return os.stat_result(fields, {"st_rdev": os.makedev(major, minor)})


def fake_rtslib(backstores: dict[str, tuple[str, str]]) -> types.ModuleType:
    """rtslib-fb as the node's LIO would answer: block backstores with their unit serials."""
    objects = [types.SimpleNamespace(name=name, plugin="block", udev_path=device, wwn=serial,
                                     path=f"/nonexistent/core/iblock_0/{name}")
               for name, (device, serial) in backstores.items()]
    module = types.ModuleType("fake_rtslib")
    module.RTSRoot = lambda: types.SimpleNamespace(  # type: ignore[attr-defined]
        storage_objects=objects, targets=[])
    return module


def node_lun_map(backstores: dict[str, tuple[str, str]] | None = None,
                 ) -> Callable[[Host], LunResolver]:
    """The node's real LunMap over :func:`fake_rtslib`, :func:`fake_stat` and the host's runner."""
    rts = fake_rtslib(BACKSTORES if backstores is None else backstores)

    def make(host: Host) -> LunResolver:
        return LunMap(host.runner, lio.LioExporter(rts), stat_fn=fake_stat)

    return make


def storage_host(tmp_path: Path, *, toml: str | None = None, state_mode: int | None = 0o700,
                 addresses: Collection[str] = ("127.0.0.1", "10.77.0.10", "fe80::1"),
                 backstores: dict[str, tuple[str, str]] | None = None,
                 tools: Collection[str] = TOOLS, **kw: Any) -> fh.FakeHost:
    """A fake storage node whose every check passes unless told otherwise.

    ``toml``: storage.toml's text (None: a valid one); ``state_mode``: state_dir's mode (None:
    absent).
    """
    host = fh.fake_host(tmp_path, tools=tools, **kw)
    feed(host.runner, "lvs", "lvs_all")
    etc = tmp_path / "etc/sanoffload"
    etc.mkdir(parents=True, exist_ok=True)
    (etc / "storage.toml").write_text(storage_toml() if toml is None else toml)
    (etc / "storage.toml").chmod(0o644)
    (tmp_path / "var/lib").mkdir(parents=True, exist_ok=True)
    (tmp_path / "var/lib").chmod(0o755)
    if state_mode is not None:
        state = tmp_path / STATE.lstrip("/")
        state.mkdir(parents=True, exist_ok=True)
        state.chmod(state_mode)
        state.parent.chmod(0o755)
    host.addresses = lambda: set(addresses)
    host.lun_map = node_lun_map(backstores)
    return host


def check(host: Host, name: str) -> tuple[bool, str]:
    found = run_checks("storage", host).check(name)
    return found.present, found.detail


# --------------------------------------------------------------------------
# all set up
# --------------------------------------------------------------------------

def test_a_set_up_storage_node_passes(tmp_path: Path) -> None:
    report = run_checks("storage", storage_host(tmp_path))
    assert report.ok and report.missing == [] and report.warnings == []
    assert [c.name for c in report.checks] == [n.name for n in REQUIREMENTS["storage"]]
    assert report.check("storage.toml").detail.endswith(
        "storage.toml: 1 port(s) (p1), 1 client(s) (fs1), 2 LUN(s)")
    assert report.check("ports").detail == "p1 10.77.0.10:3260"
    assert report.check("luns").detail == (f"{LUN['lin']} -> datavg/lin, "
                                           f"{LUN['thin']} -> datavg/thin")
    assert report.check("state_dir").detail == f"{STATE} (root's, mode 0700)"


def test_the_lun_map_only_reads(tmp_path: Path) -> None:
    host = storage_host(tmp_path)
    run_checks("storage", host)
    ran = {argv[0] for argv in host.runner.argvs()}
    assert "lvs" in ran
    assert not ran & {"lvcreate", "lvremove", "lvconvert", "lvchange"}


# --------------------------------------------------------------------------
# storage.toml
# --------------------------------------------------------------------------

@pytest.mark.hostile("agent", "storage node doctor: no storage.toml at all",
                     "one failed check with a hint, no traceback; dependents wait for it")
def test_a_missing_storage_toml_is_a_failed_check_with_a_hint(tmp_path: Path) -> None:
    host = storage_host(tmp_path, state_mode=None)
    (tmp_path / "etc/sanoffload/storage.toml").unlink()
    report = run_checks("storage", host)
    assert report.missing == ["storage.toml"] and report.exit_code == 4
    detail = report.check("storage.toml").detail
    assert "storage.toml: no such file" in detail and "create it" in detail
    assert detail.endswith("(checked once this passes: ports, luns, state_dir)")
    names = [c.name for c in report.checks]
    assert "ports" not in names and "luns" not in names and "state_dir" not in names


def test_through_the_cli_a_missing_storage_toml_exits_4_in_one_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    host = storage_host(tmp_path)
    (tmp_path / "etc/sanoffload/storage.toml").unlink()
    monkeypatch.setattr(cli, "make_runner", lambda: host.runner)
    monkeypatch.setattr(cli, "make_host", lambda runner: host)
    assert cli.run(["doctor", "--role", "storage"]) == 4
    out, err = capsys.readouterr()
    assert err.startswith("sanoffload: error: role storage is missing: storage.toml (hint:")
    assert err.count("\n") == 1
    assert any(line.startswith("storage.toml") and "MISSING" in line
               for line in out.splitlines())
    assert "Traceback" not in out + err


@pytest.mark.hostile("agent", "storage node doctor: storage.toml with an unknown key and a "
                              "terminal escape in a value",
                     "the check fails naming the key; the escape is shown, not obeyed")
def test_an_invalid_storage_toml_names_the_key_escaped(tmp_path: Path) -> None:
    host = storage_host(tmp_path, toml=storage_toml() + 'colour = "\\u001b[31mred"\n')
    present, detail = check(host, "storage.toml")
    assert not present
    assert "colour" in detail and "\x1b" not in detail


@pytest.mark.hostile("agent", "storage node doctor: storage.toml writable by group and others",
                     "the check fails: chmod go-w")
def test_a_world_writable_storage_toml_fails(tmp_path: Path) -> None:
    host = storage_host(tmp_path)
    (tmp_path / "etc/sanoffload/storage.toml").chmod(0o666)
    present, detail = check(host, "storage.toml")
    assert not present and "group- or world-writable" in detail and "chmod go-w" in detail


def test_config_names_another_file(tmp_path: Path) -> None:
    host = storage_host(tmp_path)
    (tmp_path / "srv").mkdir()
    (tmp_path / "srv/st.toml").write_text(storage_toml(luns=[LUN["lin"]]))
    host.config = "/srv/st.toml"
    present, detail = check(host, "storage.toml")
    assert present and detail.endswith("srv/st.toml: 1 port(s) (p1), 1 client(s) (fs1), 1 LUN(s)")


# --------------------------------------------------------------------------
# ports
# --------------------------------------------------------------------------

@pytest.mark.hostile("agent", "storage node doctor: a port whose address is another host's",
                     "the ports check fails naming the port and this host's addresses")
def test_a_port_address_not_on_this_host_fails(tmp_path: Path) -> None:
    host = storage_host(tmp_path, addresses=("127.0.0.1", "10.77.0.99"))
    report = run_checks("storage", host)
    assert report.missing == ["ports"]
    assert report.check("ports").detail == ("port p1: 10.77.0.10 is not an address of this "
                                            "host (this host has 10.77.0.99, 127.0.0.1)")


def test_an_ipv6_port_matches_however_written(tmp_path: Path) -> None:
    toml = storage_toml(ports='address = "2001:DB8:0:0::10"')
    host = storage_host(tmp_path, toml=toml, addresses=("2001:db8::10",))
    assert check(host, "ports") == (True, "p1 2001:db8::10:3260")


def test_this_hosts_addresses_come_from_psutil() -> None:
    # the real interfaces of this machine: loopback is always there
    assert "127.0.0.1" in local_addresses()
    assert all("%" not in a for a in local_addresses())


# --------------------------------------------------------------------------
# LUNs
# --------------------------------------------------------------------------

@pytest.mark.hostile("agent", "storage node doctor: storage.toml lists a LUN no backstore "
                              "presents, and one backed by a plain disk",
                     "the luns check fails with both reasons")
def test_luns_that_do_not_resolve_to_an_lv_fail(tmp_path: Path) -> None:
    toml = storage_toml(luns=[LUN["lin"], LUN["gone"], LUN["sdb"]])
    host = storage_host(tmp_path, toml=toml)
    report = run_checks("storage", host)
    assert report.missing == ["luns"]
    detail = report.check("luns").detail
    assert f"fs1: no block backstore of this node presents {LUN['gone']}" in detail
    assert f"fs1: LUN {LUN['sdb']} is backed by /dev/sdb (8:16), not a logical volume" in detail
    assert "datavg/lin" not in detail  # only what is wrong


def test_luns_without_lio_fail_saying_why(tmp_path: Path) -> None:
    host = storage_host(tmp_path)
    host.lun_map = lio_lun_map  # the default: the fake host's rtslib_fb has no RTSRoot
    present, detail = check(host, "luns")
    assert not present and detail.startswith("cannot look: LIO is not available")


def test_luns_without_rtslib_fail_saying_why(tmp_path: Path) -> None:
    modules = fh.default_modules()
    del modules["rtslib_fb"]
    host = storage_host(tmp_path, modules=modules)
    host.lun_map = lio_lun_map
    report = run_checks("storage", host)
    assert report.missing == ["rtslib_fb", "luns"]
    assert report.check("luns").detail.startswith("cannot look: rtslib_fb does not import")


# --------------------------------------------------------------------------
# state_dir
# --------------------------------------------------------------------------

def test_an_absent_state_dir_under_roots_directory_passes(tmp_path: Path) -> None:
    host = storage_host(tmp_path, state_mode=None)
    present, detail = check(host, "state_dir")
    assert present
    assert detail == f"{STATE} absent; the first request makes it (mode 0700) in /var/lib"
    assert not (tmp_path / STATE.lstrip("/")).exists()  # doctor makes nothing


@pytest.mark.hostile("agent", "storage node doctor: state_dir readable by others (0755)",
                     "the state_dir check fails: chmod 0700")
def test_a_state_dir_others_can_read_fails(tmp_path: Path) -> None:
    host = storage_host(tmp_path, state_mode=0o755)
    present, detail = check(host, "state_dir")
    assert not present and "mode 0755, not 0700" in detail and f"chmod 0700 {STATE}" in detail


@pytest.mark.hostile("agent", "storage node doctor: state_dir owned by a user, not root",
                     "the state_dir check fails: chown root")
def test_a_state_dir_not_roots_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    host = storage_host(tmp_path)
    uid = os.stat(tmp_path / STATE.lstrip("/")).st_uid
    # as if another uid than the test's own were root (no chown: unit tests need no root)
    monkeypatch.setattr("sanoffload.doctor.trusted_owners", lambda: frozenset({uid + 1}))
    present, detail = check(host, "state_dir")
    assert not present and f"owned by uid {uid}, not root" in detail


@pytest.mark.hostile("agent", "storage node doctor: state_dir absent in a world-writable "
                              "directory (like /tmp)",
                     "the check fails: anyone could make it first")
def test_an_absent_state_dir_in_a_world_writable_dir_fails(tmp_path: Path) -> None:
    host = storage_host(tmp_path, toml=storage_toml(state_dir="/tmp/sanoffload/storage"),
                        state_mode=None)
    (tmp_path / "tmp").mkdir()
    (tmp_path / "tmp").chmod(0o1777)
    present, detail = check(host, "state_dir")
    assert not present
    assert "/tmp/sanoffload/storage absent and /tmp is group- or world-writable" in detail


def test_a_state_dir_that_is_a_file_fails(tmp_path: Path) -> None:
    host = storage_host(tmp_path, state_mode=None)
    (tmp_path / STATE.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / STATE.lstrip("/")).write_text("")
    assert check(host, "state_dir") == (False, f"{STATE}: exists and is not a directory")


# --------------------------------------------------------------------------
# sshd, thin_check
# --------------------------------------------------------------------------

def test_sshd_is_required_on_a_storage_node(tmp_path: Path) -> None:
    report = run_checks("storage", storage_host(tmp_path, tools=TOOLS - {"sshd"}))
    assert report.missing == ["sshd"] and report.exit_code == 4


def test_thin_check_is_optional_on_a_storage_node(tmp_path: Path) -> None:
    report = run_checks("storage", storage_host(tmp_path, tools=TOOLS - {"thin_check"}))
    assert report.ok and report.warnings == ["thin_check"]
    assert "thin pool" in report.check("thin_check").fails_without
