"""The first server's agent on fs1, with px1 as the proxy (co-located mode: fs1's own disks).

prepare returns an identifier; px1 logs in with the given CHAP (plain
iscsiadm here) and finds exactly one disk whose wwid equals it; a file written
on fs1 after prepare is absent from the duplicate, one written before is
present; a wrong CHAP secret or an initiator outside the ACL cannot log in;
release leaves no LIO object and no tagged LV.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from .labctl import Lab

VG = "datavg"
AGENT_TOML = """
state_dir = "/var/lib/sanoffload"
run_dir = "/run/sanoffload"
freeze_deadline_s = 10

[portal]
address = "{ip}"

[clients.px1]
initiators = ["{px1}"]
roots = ["/srv"]
max_sessions = 2
"""

# no lazy init: ext4lazyinit would keep writing after mount and fill small snapshots
MKFS = {"ext4": "mkfs.ext4 -q -E lazy_itable_init=0,lazy_journal_init=0", "xfs": "mkfs.xfs -q -f"}
RO_OPTS = {"ext4": "ro,noload", "xfs": "ro,norecovery,nouuid"}
#: the LV size per filesystem: as small as each allows (xfsprogs >= 5.19 refuses < 300 MiB),
#: since mkfs and a mirror's initial resync write all of it under emulation
SIZE = {"ext4": "128m", "xfs": "320m"}
LVCREATE = {
    "snapshot": f"lvcreate -q -y -L {{size}} -n data {VG}",
    "thin-snapshot": f"lvcreate -q -y -L 900m -T {VG}/pool && "
                     f"lvcreate -q -y -V {{size}} -T {VG}/pool -n data",
    # the agent refuses a mirror that is not in sync: wait for the initial resync
    "raid1-split": f"lvcreate -q -y --type raid1 -m 1 -L {{size}} -n data {VG} && "
                   f"while lvs --noheadings -o copy_percent {VG}/data | grep -qv 100.00; "
                   "do sleep 1; done",
    "mirror-split": f"lvcreate -q -y --type mirror -m 1 --mirrorlog core -L {{size}} -n data "
                    f"{VG} && while lvs --noheadings -o copy_percent {VG}/data | "
                    "grep -qv 100.00; do sleep 1; done",
}


@pytest.fixture
def fs1_volume(lab: Lab, request: pytest.FixtureRequest) -> Iterator[tuple[str, str]]:
    """An LV of the requested kind on fs1 with a filesystem mounted at /srv/data."""
    kind, fstype = request.param
    lab.sh("fs1", f"""set -e
        pvcreate -q -y /dev/vdb /dev/vdc
        vgcreate -q {VG} /dev/vdb /dev/vdc
        {LVCREATE[kind].format(size=SIZE[fstype])}
        {MKFS[fstype]} /dev/{VG}/data
        mkdir -p /srv/data /etc/sanoffload
        mount /dev/{VG}/data /srv/data
        mkdir -p /srv/data/tree
        echo before > /srv/data/tree/before.txt
        """, timeout=600)
    lab.sh("fs1", ["sh", "-c", "cat > /etc/sanoffload/agent.toml"],
           input=AGENT_TOML.format(ip=lab.ip("fs1"), px1=lab.iqn("px1")))
    try:
        yield kind, fstype
    finally:
        lab.sh("px1", "umount /mnt/dup 2>/dev/null; iscsiadm -m node --logoutall=all 2>/dev/null;"
                      " iscsiadm -m node -o delete 2>/dev/null; true")
        lab.sh("fs1", "sanoffload agent cleanup --all >/dev/null 2>&1; "
                      f"umount /srv/data 2>/dev/null; vgremove -q -f {VG} >/dev/null 2>&1; "
                      "pvremove -q /dev/vdb /dev/vdc >/dev/null 2>&1; "
                      "wipefs -q -a /dev/vdb /dev/vdc; rm -rf /var/lib/sanoffload; true")


def _login(lab: Lab, ans: dict[str, Any], secret: str, host: str = "px1") -> int:
    portal = ans["portals"][0]
    iqn = ans["target_iqn"]
    base = ["iscsiadm", "-m", "node", "-T", iqn, "-p", portal]
    # as the proxy does: a persistent discovery would add a second record for the same
    # target and portal (with the portal group tag), and "-o update" then fails on one of
    # the two ("iface iter could not stat ...": iSCSI database failure, exit 6)
    lab.sh(host, ["iscsiadm", "-m", "discovery", "-t", "sendtargets", "-p", portal,
                  "-o", "nonpersistent"], check=False)
    lab.sh(host, base + ["-o", "new"], check=False)
    for name, value in (("node.session.auth.authmethod", "CHAP"),
                        ("node.session.auth.username", ans["chap_user"]),
                        ("node.session.auth.password", secret)):
        lab.sh(host, base + ["-o", "update", "-n", name, "-v", value])
    return lab.sh(host, base + ["--login"], check=False).returncode


CASES = [("snapshot", "ext4"), ("snapshot", "xfs"), ("thin-snapshot", "ext4"),
         ("thin-snapshot", "xfs"), ("raid1-split", "ext4"), ("raid1-split", "xfs"),
         ("mirror-split", "ext4")]


#: what differs between kernels: who freezes a classic snapshot (LVM's suspend before 6.6,
#: fsfreeze from 6.6 on) for both filesystems, and a thin snapshot (dm-thin). A raid1 split
#: runs on every release in test_raid1_merge_back_resyncs_only_changed_regions; a mirror
#: split is the same code as a raid1 split past lvconvert.
KERNEL_CASES = [("snapshot", "ext4"), ("snapshot", "xfs"), ("thin-snapshot", "ext4")]

#: the case that also checks the refusals (a wrong CHAP secret, an initiator outside the
#: ACL): the same LIO objects whatever the duplicate, so once per release is enough
REFUSALS_CASE = ("snapshot", "ext4")


@pytest.mark.release_sensitive(cases=KERNEL_CASES)
@pytest.mark.parametrize("fs1_volume", CASES, indirect=True, ids=[f"{k}-{f}" for k, f in CASES])
def test_prepare_exports_a_frozen_duplicate_to_px1_only(lab: Lab,
                                                        fs1_volume: tuple[str, str]) -> None:
    kind, fstype = fs1_volume
    out = lab.sh("fs1", ["sanoffload", "agent", "prepare", "/srv/data/tree",
                         "--initiator", lab.iqn("px1"), "--json"])
    ans = json.loads(out.stdout)
    assert ans["duplicate_kind"] == kind
    assert ans["fstype"] == fstype
    assert ans["path_in_fs"] == "tree"
    assert ans["identifier"].startswith("naa.6001405")
    assert ans["freeze_window_ms"] >= 0
    # written after prepare: must not be in the duplicate
    lab.sh("fs1", "echo after > /srv/data/tree/after.txt && sync")

    if (kind, fstype) == REFUSALS_CASE:
        # wrong CHAP secret, then an initiator outside the ACL: both refused
        assert _login(lab, ans, "wrong-secret-123") != 0
        lab.sh("px1", ["iscsiadm", "-m", "node", "-T", ans["target_iqn"], "-o", "delete"],
               check=False)
        if "bk1" in lab.hosts:  # later releases boot fs1 and px1 only
            assert _login(lab, ans, ans["chap_secret"], host="bk1") != 0
            lab.sh("bk1", ["iscsiadm", "-m", "node", "-o", "delete"], check=False)

    assert _login(lab, ans, ans["chap_secret"]) == 0
    lab.sh("px1", ["udevadm", "settle", "--timeout=60"])
    wwid = ans["identifier"].removeprefix("naa.")
    found = lab.sh("px1", "grep -l '^" + ans["identifier"] + "$' /sys/block/sd*/device/wwid")
    disks = found.stdout.split()
    assert len(disks) == 1, disks
    dev = "/dev/" + disks[0].split("/")[3]
    assert lab.sh("px1", ["readlink", "-e", f"/dev/disk/by-id/wwn-0x{wwid}"]).stdout.strip() == dev
    lab.sh("px1", f"mkdir -p /mnt/dup && mount -o {RO_OPTS[fstype]} {dev} /mnt/dup")
    assert lab.sh("px1", ["cat", "/mnt/dup/tree/before.txt"]).stdout == "before\n"
    assert lab.sh("px1", ["test", "-e", "/mnt/dup/tree/after.txt"], check=False).returncode == 1
    lab.sh("px1", f"umount /mnt/dup && iscsiadm -m node -T {ans['target_iqn']} --logout && "
                  f"iscsiadm -m node -T {ans['target_iqn']} -o delete")

    status = json.loads(lab.sh("fs1", ["sanoffload", "agent", "status", ans["session_id"],
                                       "--json"]).stdout)
    assert status["status"] == "healthy"
    lab.sh("fs1", ["sanoffload", "agent", "release", ans["session_id"]])
    lab.sh("fs1", ["sanoffload", "agent", "release", ans["session_id"]])  # idempotent
    inv = lab.lio_inventory("fs1")
    assert inv == {"targets": [], "backstores": []}
    tagged = lab.sh("fs1", ["lvs", "--noheadings", "-o", "lv_name", "@sanoffload"]).stdout
    assert tagged.strip() == ""
    if kind == "raid1-split":
        lvs = lab.sh("fs1", ["lvs", "-a", "--noheadings", "-o", "lv_name", VG]).stdout
        assert "data_rimage_1" in lvs  # merged back, not dropped
    if kind == "mirror-split":
        segtype = lab.sh("fs1", ["lvs", "--noheadings", "-o", "segtype", f"{VG}/data"]).stdout
        assert segtype.strip() == "mirror"  # the leg was re-added


def _write_config(lab: Lab, extra: str = "", tables: str = "") -> None:
    """``extra``: top-level keys (before the first table); ``tables``: more tables."""
    text = extra + AGENT_TOML.format(ip=lab.ip("fs1"), px1=lab.iqn("px1")) + tables
    lab.sh("fs1", ["sh", "-c", "cat > /etc/sanoffload/agent.toml"], input=text)


def _leftovers_on_fs1(lab: Lab) -> str:
    return lab.sh("fs1", "lvs --noheadings -o lv_name @sanoffload; dmsetup ls | "
                         "grep -E 'sanoffload|-real|-cow' || true; "
                         "ls /var/lib/sanoffload/sessions 2>/dev/null || true").stdout.strip()


@pytest.mark.release_sensitive
@pytest.mark.parametrize("fs1_volume", [("snapshot", "ext4")], indirect=True,
                         ids=["snapshot-ext4"])
def test_fsfreeze_around_lvcreate_per_kernel(lab: Lab, fs1_volume: tuple[str, str]) -> None:
    """Forcing a userspace freeze around lvcreate: 6.1 fails cleanly, >= 6.6 works."""
    _write_config(lab, extra='freeze = "fsfreeze"\n')
    res = lab.sh("fs1", ["sanoffload", "agent", "prepare", "/srv/data/tree",
                         "--initiator", lab.iqn("px1"), "--json"], check=False)
    if lab.release == "bookworm":
        # LVM's suspend cannot nest in our freeze: a clear error, and nothing half made
        assert res.returncode == 5, res.stdout + res.stderr
        assert "suspend" in res.stderr, res.stderr
        assert _leftovers_on_fs1(lab) == ""
        # and the filesystem is not left frozen
        lab.sh("fs1", "timeout 10 sh -c 'echo ok > /srv/data/written-after.txt'")
    else:
        assert res.returncode == 0, res.stderr
        ans = json.loads(res.stdout)
        assert ans["frozen_by"] == "fsfreeze"
        lab.sh("fs1", ["sanoffload", "agent", "release", ans["session_id"]])
        assert _leftovers_on_fs1(lab) == ""


@pytest.mark.parametrize("fs1_volume", [("snapshot", "ext4")], indirect=True,
                         ids=["snapshot-ext4"])
def test_overflowed_snapshot_reports_invalid(lab: Lab, fs1_volume: tuple[str, str]) -> None:
    _write_config(lab, tables="\n[snapshot]\npercent = 1\nmin_mb = 8\n")
    ans = json.loads(lab.sh("fs1", ["sanoffload", "agent", "prepare", "/srv/data/tree",
                                    "--initiator", lab.iqn("px1"), "--json"]).stdout)
    sid = ans["session_id"]
    assert json.loads(lab.sh("fs1", ["sanoffload", "agent", "status", sid, "--json"]
                             ).stdout)["status"] == "healthy"
    # overwrite more than the 8 MiB COW holds
    lab.sh("fs1", "dd if=/dev/urandom of=/srv/data/fill bs=1M count=32 conv=fsync 2>/dev/null")
    st = json.loads(lab.sh("fs1", ["sanoffload", "agent", "status", sid, "--json"]).stdout)
    assert st["status"] == "invalid"
    lab.sh("fs1", ["sanoffload", "agent", "release", sid])
    assert _leftovers_on_fs1(lab) == ""


HOOK = """#!/bin/sh
# post-thaw hook that holds prepare after the duplicate exists, so the test can kill it
touch /run/sanoffload-hook-reached
sleep 120
"""


@pytest.mark.parametrize("fs1_volume", [("snapshot", "ext4")], indirect=True,
                         ids=["snapshot-ext4"])
def test_cleanup_after_agent_killed_mid_prepare(lab: Lab, fs1_volume: tuple[str, str]) -> None:
    lab.sh("fs1", ["sh", "-c", ("cat > /usr/local/sbin/sano-hold && chmod 755 "
                                "/usr/local/sbin/sano-hold && rm -f /run/sanoffload-hook-reached")],
           input=HOOK)
    _write_config(lab, tables='\n[hooks]\npost_thaw = ["/usr/local/sbin/sano-hold"]\n'
                              'timeout_s = 300\n')
    lab.sh("fs1", "setsid sanoffload agent prepare /srv/data/tree --initiator "
                  f"{lab.iqn('px1')} >/run/prepare.out 2>&1 & echo $! > /run/prepare.pid")
    lab.sh("fs1", "for i in $(seq 120); do [ -e /run/sanoffload-hook-reached ] && exit 0; "
                  "sleep 1; done; exit 1")
    # -x: by process name, so the pattern cannot match this very shell's command line
    lab.sh("fs1", "kill -9 $(cat /run/prepare.pid); pkill -9 -x sano-hold; "
                  "pkill -9 -f '^sleep 120$'; true")
    left = lab.sh("fs1", "lvs --noheadings -o lv_name @sanoffload").stdout.strip()
    assert left.startswith("sanoffload-"), "the kill should have left a duplicate behind"
    report = json.loads(lab.sh("fs1", ["sanoffload", "agent", "cleanup", "--json"]).stdout)
    assert len(report["released"]) == 1
    assert _leftovers_on_fs1(lab) == ""
    _write_config(lab)


@pytest.mark.release_sensitive
@pytest.mark.parametrize("fs1_volume", [("raid1-split", "ext4")], indirect=True,
                         ids=["raid1-split-ext4"])
def test_raid1_merge_back_resyncs_only_changed_regions(lab: Lab,
                                                       fs1_volume: tuple[str, str]) -> None:
    ans = json.loads(lab.sh("fs1", ["sanoffload", "agent", "prepare", "/srv/data",
                                    "--initiator", lab.iqn("px1"), "--json"]).stdout)
    # change a little (4 MiB of 128 MiB) while the image is split off
    lab.sh("fs1", "dd if=/dev/urandom of=/srv/data/changed bs=1M count=4 conv=fsync 2>/dev/null")
    lab.sh("fs1", ["sanoffload", "agent", "release", ans["session_id"]])
    # dm-raid's status right after the merge: "<health> <synced>/<total> <action>"
    status = lab.sh("fs1", f"dmsetup status {VG}-data").stdout.split()
    print("sync report after merge:", " ".join(status))
    synced, total = (int(x) for x in status[6].split("/"))
    assert synced >= total * 0.5, f"merge resynced from scratch: {status}"
    lab.sh("fs1", f"while lvs --noheadings -o copy_percent {VG}/data | grep -qv 100.00; "
                  "do sleep 1; done", timeout=600)
    assert "data_rimage_1" in lab.sh("fs1", ["lvs", "-a", "--noheadings", "-o", "lv_name",
                                             VG]).stdout
