"""The lab's SAN wiring: st1 serves fs1's production disks as LUNs (issue 12, item 2).

st1 exports sanvg/fs1db and sanvg/fs1log with fixed unit serials; fs1 logs in
(from a node record of its own, node.startup=automatic) and mounts an ext4 on
each whole disk by UUID with ``_netdev,nofail``. Asserted: fs1's disk carrying
each LUN has the LUN's identifier as its wwid and is mounted where it should
be; st1's doctor passes, its own lookup (LunMap) maps each identifier to its
LV and the forced command answers fs1 on the channel; after a hard reset fs1 is logged in and
mounted again by itself; the production objects are not leftovers, a stray
``sanoffload-*`` LV beside them is.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest

from sanolab import deploy

from .labctl import Lab

LUNS = deploy.SAN_LUNS

# st1's own lookup: identifier -> backstore -> device -> LV (sanoffload.storage.luns)
LUNMAP = r"""
import json, sys
from sanoffload.runner import CommandRunner
from sanoffload.storage import config
from sanoffload.storage.luns import LunMap
from sanoffload.tools.lio import LioExporter
client = config.load().client("fs1")
luns = LunMap(CommandRunner(), LioExporter())
print(json.dumps({i: [luns.resolve(i, client).lv.vg, luns.resolve(i, client).lv.name]
                  for i in sys.argv[1:]}))
"""


@pytest.fixture(scope="module")
def san(lab: Lab) -> Iterator[None]:
    try:
        deploy.hosts_file(lab.runner, lab.hosts)
        deploy.ssh_keys(lab.runner)
        deploy.configs(lab.runner)
        deploy.san_volumes(lab.runner)
        deploy.san_config(lab.runner)
        yield
    finally:
        deploy.undeploy_san(lab.runner)
    # the undeploy took the production objects away too
    assert lab.leftovers(deployed=()) == []


def _disk(lab: Lab, lun: deploy.SanLun) -> str:
    """fs1's kernel name for the disk behind ``lun`` (by its udev link, i.e. its wwid)."""
    dev = lab.sh("fs1", ["readlink", "-e", lun.by_id]).stdout.strip()
    assert dev.startswith("/dev/sd"), dev
    return dev.removeprefix("/dev/")


def _assert_luns_mounted(lab: Lab) -> None:
    for lun in LUNS.values():
        name = _disk(lab, lun)
        assert lab.sh("fs1", ["cat", f"/sys/block/{name}/device/wwid"]).stdout.strip() \
            == lun.identifier
        source = lab.sh("fs1", ["findmnt", "-n", "-o", "SOURCE", "-M", lun.mount],
                        check=False).stdout.strip()
        assert source == f"/dev/{name}", f"{lun.mount}: mounted from {source!r}"


def test_each_fs1_disk_is_its_lun_by_identifier_and_mounted(lab: Lab, san: None) -> None:
    _assert_luns_mounted(lab)
    fstab = lab.sh("fs1", ["cat", "/etc/fstab"]).stdout
    for lun in LUNS.values():
        lines = [ln.split() for ln in fstab.splitlines() if f" {lun.mount} " in ln]
        assert len(lines) == 1, fstab
        assert lines[0][0].startswith("UUID=") and "_netdev" in lines[0][3] \
            and "nofail" in lines[0][3], lines[0]
    startup = lab.sh("fs1", ["iscsiadm", "-m", "node", "-T", deploy.SAN_TARGET, "-o", "show"])
    assert "node.startup = automatic" in startup.stdout


def test_st1_finds_each_luns_lv_and_serves_fs1_on_the_channel(lab: Lab, san: None) -> None:
    # storage.toml as deployed passes the storage role's own checks (ports, luns, state_dir)
    doctor = lab.sh("st1", ["sanoffload", "doctor", "--role", "storage"], check=False)
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    found = json.loads(lab.sh("st1", ["/opt/sanoffload/bin/python", "-c", LUNMAP,
                                      *(lun.identifier for lun in LUNS.values())]).stdout)
    assert found == {lun.identifier: [deploy.SAN_VG, lun.lv] for lun in LUNS.values()}
    # fs1's key reaches st1's forced command: storage serve, client fs1
    out = lab.sh("fs1", ["ssh", "-o", "BatchMode=yes", "root@st1"],
                 input='{"op": "hello", "versions": [1]}\n{"op": "ping"}\n', timeout=120)
    hello, ping = (json.loads(line) for line in out.stdout.splitlines())
    assert hello["ok"] is True and hello["version"] == 1 and hello["service"] == "storage", hello
    assert ping["ok"] is True and isinstance(ping["time"], float), ping


@pytest.mark.hostile("tests", "a stray sanoffload LV beside the SAN's production LVs",
                     "reported as a leftover; the production objects are not")
def test_leftovers_skip_only_the_san_production_objects(lab: Lab, san: None) -> None:
    assert lab.leftovers() == []
    stray = f"{deploy.SAN_VG}/sanoffload-stray"
    lab.sh("st1", ["lvcreate", "-q", "-y", "-L", "8m", "-n", "sanoffload-stray", deploy.SAN_VG])
    try:
        assert lab.leftovers() == [f"st1: LVs: {deploy.SAN_VG} sanoffload-stray"]
    finally:
        lab.sh("st1", ["lvremove", "-q", "-y", stray])
    without_san = "\n".join(lab.leftovers(deployed=()))
    assert deploy.SAN_TARGET in without_san and "fs1db" in without_san, without_san


def test_fs1_logs_in_and_mounts_again_after_a_hard_reset(lab: Lab, san: None) -> None:
    marks = {lun.mount: f"{lun.lv} before reset\n" for lun in LUNS.values()}
    for mount, text in marks.items():
        lab.sh("fs1", f"cat > {mount}/mark.txt && sync", input=text)
    started = time.monotonic()
    lab.reset("fs1")
    # the boot's own end, not a guess: the _netdev mounts are part of it (bounded)
    state = lab.sh("fs1", ["timeout", "240", "systemctl", "is-system-running", "--wait"],
                   check=False, timeout=300)
    took = time.monotonic() - started
    assert state.stdout.strip() in ("running", "degraded"), (state.stdout, state.stderr)
    sessions = lab.sh("fs1", ["iscsiadm", "-m", "session"]).stdout
    assert f" {deploy.SAN_TARGET} " in sessions, sessions
    _assert_luns_mounted(lab)
    for mount, text in marks.items():
        assert lab.sh("fs1", ["cat", f"{mount}/mark.txt"]).stdout == text
    print(f"fs1 back with its SAN disks mounted {took:.0f}s after the reset")
    assert lab.leftovers() == []
