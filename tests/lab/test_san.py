"""SAN mode end to end: fs1's data lives on st1's LUNs; px1 backs it up straight from st1.

Deployed as a sysadmin would (scripts/sanolab/deploy.py: ``san_volumes``,
``san_config``) plus the agent's ``[storage_nodes.st1]`` and px1's port ID.
fs1 freezes, asks st1 (over ssh, forced ``storage serve --client fs1``) for a
duplicate of the LUN its filesystem is on, by identifier, and for its export
on port p1; thaws; answers px1 with st1's portal. px1 logs in to st1.

The wiring first (from ``san_volumes``): fs1's disk carrying each LUN has
the LUN's identifier as its wwid and is mounted where it should be; st1's own
lookup maps each identifier to its LV and the forced command answers fs1; the
production objects are not leftovers, a stray ``sanoffload-*`` LV beside them
is; and, last, after a hard reset fs1 is logged in and mounted again by itself, and
its boot unit has released a local and a SAN session the crash left.

Then SAN mode. Asserted: the backup restores to the frozen state while a writer appends;
during it fs1 reads nothing from st1, sends next to nothing and spends far
less CPU than px1; the identifier answered is the one px1's udev reports for
the disk reached through port p1; a port ID st1 does not have is refused;
st1's service killed in the middle of the duplicate leaves fs1 thawed, px1
with a clear error, and nothing on st1 once its cleanup ran.
"""

from __future__ import annotations

import json
import shlex
import time
from collections.abc import Iterator
from typing import Any

import pytest

from sanoffload.runner import Result
from sanolab import deploy

from .labctl import Lab

LUNS = deploy.SAN_LUNS
DB = LUNS["db"]
STATIC = f"{DB.mount}/static"
#: a small directory for the tests that do not measure the data path
SMALL = f"{DB.mount}/small"
SEQ = f"{DB.mount}/seq"
STORE = "bk1:" + deploy.REPO
FLAG = "/run/sanoffload-san-writer.on"
#: the data px1 reads from st1 (incompressible: zstd cannot shrink it)
DATA_MIB = 64

# fs1's CPU ticks (USER_HZ), its bytes on the network and the sectors it read from the LUN
COUNTERS = r"""
import json, os, sys
cpu = [int(x) for x in open("/proc/stat").readline().split()[1:]]
net = [l.split() for l in open("/proc/net/dev").read().splitlines()[2:]]
rx = sum(int(f[1]) for f in net if not f[0].startswith("lo"))
tx = sum(int(f[9]) for f in net if not f[0].startswith("lo"))
disk = os.path.basename(os.path.realpath(sys.argv[1])) if len(sys.argv) > 1 else None
read = int(open(f"/sys/block/{disk}/stat").read().split()[2]) if disk else 0
# user nice system idle iowait irq softirq steal: busy is everything but idle and iowait
print(json.dumps({"busy": sum(cpu) - cpu[3] - cpu[4], "hz": os.sysconf("SC_CLK_TCK"),
                  "rx": rx, "tx": tx, "read_sectors": read}))
"""

AGENT_SAN = """
[storage_nodes.st1]
ssh = "root@st1"
timeout_s = 25              # below freeze_deadline_s: the node's answer ends the freeze
"""

#: an lvcreate on st1 that makes the duplicate, then kills the storage service that ran it
#: (SIGKILL: no cleanup of its own) before it could answer
KILLING_LVCREATE = """#!/bin/sh
/usr/sbin/lvcreate "$@"
kill -KILL $PPID
exit 0
"""


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


def counters(lab: Lab, host: str, disk: str | None = None) -> dict[str, int]:
    argv = ["python3", "-c", COUNTERS] + ([disk] if disk else [])
    data: dict[str, int] = json.loads(lab.sh(host, argv).stdout)
    return data


def px1(lab: Lab, args: list[str], *, check: bool = True, timeout: float = 900) -> Result:
    return lab.sh("px1", ["sanoffload", *args], check=check, timeout=timeout)


#: one process appending a numbered line ten times a second (a shell loop would fork a sleep
#: for each line, and under emulation that alone costs more CPU than the agent)
WRITER = r"""
import os, sys, time
flag, path = sys.argv[1:]
i = int(open(path).read().split()[-1])
with open(path, "a") as f:
    while os.path.exists(flag):
        i += 1
        f.write(f"{i}\n")
        f.flush()
        time.sleep(0.1)
"""


def start_writer(lab: Lab) -> None:
    """Append numbered lines to seq on the db LUN until :func:`stop_writer`."""
    lab.sh("fs1", f"touch {FLAG}; nohup python3 -c {shlex.quote(WRITER)} {FLAG} {SEQ} "
                  ">/dev/null 2>&1 &")


def stop_writer(lab: Lab) -> None:
    lab.sh("fs1", f"rm -f {FLAG}; sleep 1; sync", check=False)


def st1_clean(lab: Lab) -> list[str]:
    """sanoffload's objects on st1 (the site's production LUNs are not)."""
    found = []
    inv = lab.lio_inventory("st1")
    found += [t for t in inv["targets"] if t.startswith("iqn.2026-11.org.sanoffload:")]
    found += [b for b in inv["backstores"] if b.startswith("sanoffload-")]
    lvs = lab.sh("st1", ["lvs", "--noheadings", "-o", "lv_name", "@sanoffload"]).stdout.split()
    found += lvs
    state = lab.sh("st1", f"ls {deploy.STORAGE_STATE}/sessions 2>/dev/null || true").stdout
    found += state.split()
    return found


@pytest.fixture(scope="module")
def san(lab: Lab) -> Iterator[Lab]:
    deploy.hosts_file(lab.runner, lab.hosts)
    deploy.ssh_keys(lab.runner)
    deploy.configs(lab.runner, grace_s=3)
    try:
        deploy.san_volumes(lab.runner)
        deploy.san_config(lab.runner)
        lab.sh("fs1", "cat >> /etc/sanoffload/agent.toml && "
                      "sed -i '/^\\[clients.px1\\]/a san_port = \"p1\"' /etc/sanoffload/agent.toml",
               input=AGENT_SAN)
        lab.sh("bk1", f"mkdir -p {deploy.REPO} && rm -rf {deploy.REPO}/fs1")
        lab.sh("fs1", f"set -e; rm -rf {STATIC} {SEQ}; mkdir -p {STATIC}/sub; "
                      f"head -c {DATA_MIB}M /dev/urandom > {STATIC}/blob; "
                      f"printf 'x' > {STATIC}/sub/small; ln -s blob {STATIC}/link; "
                      f"echo 0 > {SEQ}; mkdir -p {SMALL}; echo small > {SMALL}/file; sync",
               timeout=600)
        yield lab
    finally:
        stop_writer(lab)
        lab.sh("st1", "rm -f /usr/local/sbin/lvcreate", check=False)
        deploy.undeploy_san(lab.runner)
        lab.sh("bk1", f"rm -rf {deploy.REPO}/fs1 /restore", check=False)
    # the undeploy took the production objects away too
    assert lab.leftovers(deployed=()) == []


def test_each_fs1_disk_is_its_lun_by_identifier_and_mounted(san: Lab) -> None:
    lab = san
    _assert_luns_mounted(lab)
    fstab = lab.sh("fs1", ["cat", "/etc/fstab"]).stdout
    for lun in LUNS.values():
        lines = [ln.split() for ln in fstab.splitlines() if f" {lun.mount} " in ln]
        assert len(lines) == 1, fstab
        assert lines[0][0].startswith("UUID=") and "_netdev" in lines[0][3] \
            and "nofail" in lines[0][3], lines[0]
    startup = lab.sh("fs1", ["iscsiadm", "-m", "node", "-T", deploy.SAN_TARGET, "-o", "show"])
    assert "node.startup = automatic" in startup.stdout


def test_st1_finds_each_luns_lv_and_serves_fs1_on_the_channel(san: Lab) -> None:
    lab = san
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
def test_leftovers_skip_only_the_san_production_objects(san: Lab) -> None:
    lab = san
    assert lab.leftovers() == []
    stray = f"{deploy.SAN_VG}/sanoffload-stray"
    lab.sh("st1", ["lvcreate", "-q", "-y", "-L", "8m", "-n", "sanoffload-stray", deploy.SAN_VG])
    try:
        assert lab.leftovers() == [f"st1: LVs: {deploy.SAN_VG} sanoffload-stray"]
    finally:
        lab.sh("st1", ["lvremove", "-q", "-y", stray])
    without_san = "\n".join(lab.leftovers(deployed=()))
    assert deploy.SAN_TARGET in without_san and "fs1db" in without_san, without_san


def test_backup_reads_from_st1_restores_the_frozen_state_and_fs1_stays_idle(san: Lab) -> None:
    lab = san
    before = deploy.digest(lab.runner, "fs1", STATIC)
    start_writer(lab)
    fs1_0, px1_0 = counters(lab, "fs1", DB.by_id), counters(lab, "px1")
    res = px1(lab, ["backup", "fs1:" + DB.mount, "--store", STORE, "--json"])
    fs1_1, px1_1 = counters(lab, "fs1", DB.by_id), counters(lab, "px1")
    stop_writer(lab)
    summary = json.loads(res.stdout)
    assert summary["frozen_by"] == "fsfreeze" and summary["duplicate_kind"] == "snapshot"
    assert summary["verification"]["status"] == "ok"

    # fs1 carried no backup I/O: it read nothing of the data from st1, and sent and received
    # far less than the data; its CPU time is a small fraction of px1's
    data = DATA_MIB << 20
    read = (fs1_1["read_sectors"] - fs1_0["read_sectors"]) * 512
    net = (fs1_1["rx"] - fs1_0["rx"]) + (fs1_1["tx"] - fs1_0["tx"])
    fs1_cpu = (fs1_1["busy"] - fs1_0["busy"]) / fs1_0["hz"]
    px1_cpu = (px1_1["busy"] - px1_0["busy"]) / px1_0["hz"]
    print(f"SAN offload: fs1 read {read} B from the LUN, {net} B on the network, "
          f"CPU {fs1_cpu:.1f} s; px1 CPU {px1_cpu:.1f} s; archive {summary['archive_bytes']} B")
    assert read < data // 50, f"fs1 read {read} bytes of its LUN during the backup"
    assert net < data // 10, f"fs1 moved {net} bytes on the network during the backup"
    # fs1's share is fixed (the agent's start, the freeze, ssh), px1's follows the data:
    # 12.7 s against 46 s for 64 MiB in the emulated lab
    assert fs1_cpu < 0.5 * px1_cpu, (fs1_cpu, px1_cpu)

    # the duplicate, its export and the journal records are gone from st1 after release
    assert st1_clean(lab) == []
    assert lab.sh("px1", ["iscsiadm", "-m", "session"], check=False).stdout.strip() == ""

    # restored on bk1 from the repository alone: the data exactly, the writer's file whole
    # lines 0..k, frozen (it went on after)
    bid = summary["backup_id"]
    lab.sh("bk1", "rm -rf /restore")
    lab.sh("bk1", ["sanoffload", "store", "--repo", deploy.REPO, "restore", bid, "/restore"],
           timeout=600)
    assert deploy.digest(lab.runner, "bk1", "/restore/static") == before
    restored = lab.sh("bk1", ["cat", "/restore/seq"]).stdout.split("\n")
    final = lab.sh("fs1", ["cat", SEQ]).stdout.split("\n")
    assert restored[-1] == "" and restored[:-1] == [str(i) for i in range(len(restored) - 1)]
    assert 1 < len(restored) < len(final), "the writer's appends after the freeze were stored"
    lab.sh("bk1", "rm -rf /restore")


def _login(lab: Lab, ans: dict[str, Any]) -> str:
    """px1 logs in to the portal answered, with the CHAP pair; returns the disk's wwid."""
    iqn, portal = ans["target_iqn"], ans["portals"][0]
    base = ["iscsiadm", "-m", "node", "-T", iqn, "-p", portal]
    lab.sh("px1", ["iscsiadm", "-m", "discovery", "-t", "sendtargets", "-p", portal,
                   "-o", "nonpersistent"], check=False)
    lab.sh("px1", [*base, "-o", "new"])
    for key, value in (("node.session.auth.authmethod", "CHAP"),
                       ("node.session.auth.username", ans["chap_user"]),
                       ("node.session.auth.password", ans["chap_secret"])):
        lab.sh("px1", [*base, "-o", "update", "-n", key, "-v", value])
    lab.sh("px1", [*base, "--login"])
    lab.sh("px1", ["udevadm", "settle", "--timeout=60"])
    link = f"/dev/disk/by-id/wwn-0x{ans['identifier'].removeprefix('naa.')}"
    dev = lab.sh("px1", ["readlink", "-e", link]).stdout.strip()
    name = dev.rsplit("/", 1)[-1]
    return lab.sh("px1", ["cat", f"/sys/block/{name}/device/wwid"]).stdout.strip()


def test_the_identifier_answered_is_the_disk_px1_reaches_through_the_port(san: Lab) -> None:
    lab = san
    res = lab.sh("fs1", ["sanoffload", "agent", "prepare", DB.mount, "--initiator",
                         lab.iqn("px1"), "--json"])
    ans = json.loads(res.stdout)
    try:
        assert ans["portals"] == [f"{lab.ip('st1')}:3260"]  # st1's port p1, not fs1
        assert _login(lab, ans) == ans["identifier"]
        # fs1 exports nothing itself
        assert lab.lio_inventory("fs1") == {"targets": [], "backstores": []}
    finally:
        lab.sh("px1", f"iscsiadm -m node -T {ans['target_iqn']} --logout; "
                      f"iscsiadm -m node -T {ans['target_iqn']} -o delete; true", check=False)
        lab.sh("fs1", ["sanoffload", "agent", "release", ans["session_id"]])
    assert st1_clean(lab) == []


def test_a_port_id_st1_does_not_have_is_refused(san: Lab) -> None:
    lab = san
    conf = "/etc/sanoffload/agent.toml"
    lab.sh("fs1", f"sed -i 's/^san_port = \"p1\"/san_port = \"p9\"/' {conf}")
    try:
        res = px1(lab, ["backup", "fs1:" + SMALL, "--store", STORE], check=False)
    finally:
        lab.sh("fs1", f"sed -i 's/^san_port = \"p9\"/san_port = \"p1\"/' {conf}")
    assert res.returncode == 3, res.stdout + res.stderr
    assert "no port p9 on this storage node (ports: p1)" in res.stderr
    assert st1_clean(lab) == []
    assert lab.sh("fs1", ["timeout", "10", "touch", f"{DB.mount}/thawed"]).returncode == 0


def test_st1_killed_during_the_duplicate_thaws_fs1_and_its_cleanup_removes_all(
        san: Lab) -> None:
    lab = san
    lab.sh("st1", "cat > /usr/local/sbin/lvcreate && chmod 755 /usr/local/sbin/lvcreate",
           input=KILLING_LVCREATE)
    try:
        res = px1(lab, ["backup", "fs1:" + SMALL, "--store", STORE], check=False)
    finally:
        lab.sh("st1", "rm -f /usr/local/sbin/lvcreate")
    out = res.stdout + res.stderr
    assert res.returncode == 5, out
    assert "storage node st1: the connection ended during duplicate" in out, out
    # fs1 thawed at once (a write goes through), and holds no session
    assert lab.sh("fs1", ["timeout", "10", "touch", f"{DB.mount}/thawed"]).returncode == 0
    assert json.loads(lab.sh("fs1", ["sanoffload", "agent", "sessions", "--json"]).stdout) == []
    # st1: its cleanup leaves nothing of sanoffload's (the agent's undo may have done it first)
    report = lab.sh("st1", ["sanoffload", "storage", "cleanup", "--json"], check=False)
    assert report.returncode == 0, report.stdout + report.stderr
    assert st1_clean(lab) == []
    assert lab.sh("px1", ["iscsiadm", "-m", "session"], check=False).stdout.strip() == ""


SILENT_HOLD = """#!/bin/sh
# takes no lock and never says READY
exec sleep 600
"""

FAILING_HOLD = """#!/bin/sh
echo READY
cat >/dev/null            # holds until the agent closes stdin (after the thaw)
echo "START WAL LOCATION: 0/2000028 (file 000000010000000000000002)"
echo "UNLOCK failed: lost connection" >&2
exit 3
"""


def _with_hold(lab: Lab, hook: str, body: str) -> None:
    lab.sh("fs1", f"mkdir -p /etc/sanoffload/hooks && cat > {hook} && chmod 755 {hook} && "
                  f"printf '\\n[hooks]\\nhold = [\"{hook}\"]\\nhold_ready_s = 5\\n' "
                  ">> /etc/sanoffload/agent.toml", input=body)


def _without_hold(lab: Lab, hook: str) -> None:
    lab.sh("fs1", "python3 - <<'EOF'\n"
                  "p = '/etc/sanoffload/agent.toml'\n"
                  "t = open(p).read()\n"
                  "open(p, 'w').write(t[:t.index('\\n[hooks]')] + '\\n' if '\\n[hooks]' in t "
                  "else t)\nEOF\n"
                  f"rm -f {hook}")


def test_a_holding_hook_that_never_says_ready_fails_before_anything_is_frozen(
        san: Lab) -> None:
    lab = san
    hook = "/etc/sanoffload/hooks/silent-hold"
    _with_hold(lab, hook, SILENT_HOLD)
    try:
        res = px1(lab, ["backup", "fs1:" + SMALL, "--store", STORE], check=False)
    finally:
        _without_hold(lab, hook)
    assert res.returncode == 9, res.stdout + res.stderr
    assert "did not say READY within 5s; nothing was frozen" in res.stderr, res.stderr
    # nothing was asked of st1, and nothing is left anywhere
    assert st1_clean(lab) == []
    assert lab.sh("fs1", "pgrep -f '[s]ilent-hold' || true").stdout.strip() == ""
    assert json.loads(lab.sh("fs1", ["sanoffload", "agent", "sessions", "--json"]).stdout) == []


def test_a_holding_hook_failing_after_the_thaw_is_a_warning_in_the_manifest(san: Lab) -> None:
    lab = san
    hook = "/etc/sanoffload/hooks/failing-hold"
    _with_hold(lab, hook, FAILING_HOLD)
    try:
        res = px1(lab, ["backup", "fs1:" + SMALL, "--store", STORE, "--json"], check=False)
    finally:
        _without_hold(lab, hook)
    assert res.returncode == 14, res.stdout + res.stderr  # stored, with a warning
    summary = json.loads(res.stdout)
    assert summary["held"] == [hook]
    assert any(hook in w and "exit 3" in w for w in summary["warnings"]), summary["warnings"]
    listed = json.loads(px1(lab, ["list", "--store", STORE, "--json"]).stdout)
    [manifest] = [b for b in listed if b["id"] == summary["backup_id"]]
    assert any(hook in w for w in manifest["warnings"]), manifest
    assert [h["hook"] for h in manifest["held"]] == [hook]
    assert "START WAL LOCATION" in manifest["held"][0]["output"]
    assert st1_clean(lab) == []


#: one process appending the same number to a file on each LUN, db first, ten times a second
PAIR_WRITER = r"""
import os, sys, time
flag, first, second = sys.argv[1:]
i = 0
with open(first, "a") as a, open(second, "a") as b:
    while os.path.exists(flag):
        i += 1
        for f in (a, b):
            f.write(f"{i}\n")
            f.flush()
        time.sleep(0.1)
"""


def _lines(lab: Lab, host: str, path: str) -> list[int]:
    text = lab.sh(host, ["cat", path]).stdout
    assert text.endswith("\n"), f"{path}: a torn last line"
    return [int(x) for x in text.split()]


def test_a_two_volume_group_restores_a_pair_from_one_instant(san: Lab) -> None:
    lab = san
    log = deploy.SAN_LUNS["log"]
    dirs = (f"{DB.mount}/pair", f"{log.mount}/pair")
    lab.sh("fs1", f"rm -rf {dirs[0]} {dirs[1]}; mkdir -p {dirs[0]} {dirs[1]}; sync")
    lab.sh("fs1", f"touch {FLAG}; nohup python3 -c {shlex.quote(PAIR_WRITER)} {FLAG} "
                  f"{dirs[0]}/seq {dirs[1]}/seq >/dev/null 2>&1 &")
    try:
        lab.sh("fs1", f"timeout 60 sh -c 'until [ -s {dirs[1]}/seq ]; do sleep 0.2; done'")
        res = px1(lab, ["backup", "fs1:" + dirs[0], "--with", dirs[1], "--store", STORE,
                        "--json"])
    finally:
        stop_writer(lab)
    summary = json.loads(res.stdout)
    assert summary["members"] == list(dirs)
    assert summary["frozen_by"] == "fsfreeze"
    assert st1_clean(lab) == []
    assert lab.sh("px1", "grep ' /run/sanoffload' /proc/mounts || true").stdout.strip() == ""

    lab.sh("bk1", "rm -rf /restore")
    lab.sh("bk1", ["sanoffload", "store", "--repo", deploy.REPO, "restore",
                   summary["backup_id"], "/restore"], timeout=600)
    first = _lines(lab, "bk1", f"/restore{dirs[0]}/seq")
    second = _lines(lab, "bk1", f"/restore{dirs[1]}/seq")
    final = _lines(lab, "fs1", f"{dirs[0]}/seq")
    lab.sh("bk1", "rm -rf /restore")
    # each whole and in order; the writer went on after the freeze
    for got in (first, second):
        assert got == list(range(1, len(got) + 1)) and 0 < len(got) < len(final)
    # one instant: the db file was frozen first, so its log is at most one line behind it;
    # two separate freezes a backup apart would differ by many
    assert 0 <= len(first) - len(second) <= 1, (len(first), len(second))


def _agent_sessions(lab: Lab) -> list[dict[str, Any]]:
    out = lab.sh("fs1", ["sanoffload", "agent", "sessions", "--json"]).stdout
    sessions: list[dict[str, Any]] = json.loads(out)
    return sessions


def test_after_a_hard_reset_fs1_logs_in_again_and_its_boot_unit_releases_all(san: Lab) -> None:
    """One hard reset of fs1 (the lab's only one: a reset and boot cost minutes under
    emulation) shows the three things a crash must not break: the SAN disks come back by
    themselves; a local session and a SAN session alive at the crash are released by the
    boot-time cleanup unit, nobody running ``agent cleanup``; LIO holds nothing of ours."""
    lab = san
    deploy.volumes(lab.runner, store=False)  # a co-located volume beside the SAN disks
    try:
        out = lab.sh("fs1", ["sanoffload", "install-units", "--role", "agent"]).stdout
        assert "sanoffload-cleanup.service" in out
        lab.sh("fs1", "systemctl daemon-reload && systemctl enable sanoffload-cleanup.service")
        marks = {lun.mount: f"{lun.lv} before reset\n" for lun in LUNS.values()}
        for mount, text in marks.items():
            lab.sh("fs1", f"cat > {mount}/mark.txt && sync", input=text)
        lab.sh("fs1", f"mkdir -p {deploy.DATA}/tree && echo x > {deploy.DATA}/tree/f && sync")
        asked = []
        for path in (f"{deploy.DATA}/tree", SMALL):
            ans = json.loads(lab.sh("fs1", ["sanoffload", "agent", "prepare", path,
                                            "--initiator", lab.iqn("px1"), "--json"]).stdout)
            asked.append(ans["session_id"])
        assert {s["session_id"] for s in _agent_sessions(lab)} == set(asked)
        assert st1_clean(lab), "the SAN session should hold a duplicate on st1"
        started = time.monotonic()
        lab.reset("fs1")
        # the boot's own end, not a guess: the _netdev mounts and the cleanup unit are part of it
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
        boot = lab.sh("fs1", ["journalctl", "--no-pager", "-b", "-u",
                              "sanoffload-cleanup.service"]).stdout
        assert "released 2 session(s)" in boot, boot[-2000:]
        assert _agent_sessions(lab) == []
        assert st1_clean(lab) == []
        tagged = lab.sh("fs1", ["lvs", "--noheadings", "-o", "lv_name", "@sanoffload"]).stdout
        assert not tagged.strip(), tagged
        assert lab.lio_inventory("fs1") == {"targets": [], "backstores": []}
        assert lab.leftovers(deployed=("san", "volumes")) == []
    finally:
        lab.sh("fs1", "systemctl disable sanoffload-cleanup.service; "
                      "rm -f /etc/systemd/system/sanoffload-*; systemctl daemon-reload",
               check=False)
        deploy.undeploy_volumes(lab.runner, store=False)
