"""The proxy in the lab: a SIGKILLed backup is cleaned up, and the exported LUN cannot be written.

* A ``sanoffload backup`` on px1 killed with SIGKILL while it streams leaves
  its mount, iSCSI session and node record; ``sanoffload proxy cleanup`` (from
  the proxy's journal) removes all three, and fs1's agent releases the
  session on its own within its grace period.
* With the duplicate's LUN logged in on px1, writes to the block device fail
  (plainly, O_DIRECT, and after ``blockdev --setrw``), and the snapshot's first
  MiB on fs1 is unchanged.
"""

from __future__ import annotations

import json
import re
import shlex
import time
from collections.abc import Iterator
from typing import Any

import pytest

from sanolab import deploy

from .labctl import Lab

GRACE_S = 3
JOURNAL = "/var/lib/sanoffload/proxy"
BIG = deploy.DATA + "/big"


@pytest.fixture(scope="module")
def site(lab: Lab) -> Iterator[Lab]:
    deploy.deploy(lab.runner, lab.hosts, grace_s=GRACE_S)
    lab.sh("bk1", f"rm -rf {deploy.REPO}/fs1")  # a reused lab may hold earlier backups
    try:
        yield lab
    finally:
        lab.sh("px1", "pkill -KILL -x sanoffload; iscsiadm -m node --logoutall=all; "
                      "iscsiadm -m node -o delete; true", check=False)
        lab.sh("fs1", f"rm -rf {BIG}", check=False)
        deploy.undeploy_volumes(lab.runner)


def wait_for(what: str, check: object, timeout: float, every: float = 0.5) -> float:
    """Poll ``check()`` until true; the seconds it took (fails the test after ``timeout``)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if check():  # type: ignore[operator]
            return time.monotonic() - start
        time.sleep(every)
    pytest.fail(f"{what}: not within {timeout:.0f} s")


def agent_sessions(lab: Lab) -> list[dict[str, Any]]:
    out = lab.sh("fs1", ["sanoffload", "agent", "sessions", "--json"]).stdout
    sessions: list[dict[str, Any]] = json.loads(out)
    return sessions


def node_records(lab: Lab) -> str:
    res = lab.sh("px1", ["iscsiadm", "-m", "node"], check=False)
    return res.stdout if res.returncode == 0 else ""  # 21: "No records found"


def iscsi_sessions(lab: Lab) -> str:
    res = lab.sh("px1", ["iscsiadm", "-m", "session"], check=False)
    return res.stdout if res.returncode == 0 else ""  # 21: "No active sessions."


def our_mounts(lab: Lab) -> str:
    return lab.sh("px1", "grep ' /run/sanoffload' /proc/mounts || true").stdout.strip()


def test_a_killed_backup_is_undone_by_proxy_cleanup(site: Lab) -> None:
    lab = site
    lab.sh("fs1", f"mkdir -p {BIG} && head -c 120M /dev/urandom > {BIG}/blob && sync",
           timeout=600)
    lab.sh("px1", f"rm -rf {JOURNAL}; nohup sanoffload backup fs1:{BIG} --store "
                  f"bk1:{deploy.REPO} --no-progress > /tmp/killed.out 2>&1 & "
                  "echo $! > /tmp/killed.pid")
    pid = lab.sh("px1", ["cat", "/tmp/killed.pid"]).stdout.strip()

    # streaming: the duplicate is mounted and tar reads it
    wait_for("px1 streaming", lambda: our_mounts(lab) and lab.sh(
        "px1", "pgrep -x tar", check=False).returncode == 0, 300)
    [record] = json.loads(lab.py("px1", "import glob, json\nprint(json.dumps([json.load(open(p))"
                                        f" for p in glob.glob('{JOURNAL}/*.json')]))").stdout)
    assert record["resources"] == ["node", "session", "mount"], record
    assert record["pid"] == int(pid)
    target = record["target"]

    lab.sh("px1", ["kill", "-KILL", pid])
    killed = time.monotonic()
    # what the killed proxy left: its session, its node record, its mount
    assert target in iscsi_sessions(lab) and target in node_records(lab)
    assert record["mountpoint"] in our_mounts(lab)

    # the agent releases on its own once the dead proxy's ssh connection is gone
    wait_for("fs1 releasing the session", lambda: agent_sessions(lab) == [], GRACE_S + 60)
    took = time.monotonic() - killed
    assert took < GRACE_S + 30, f"the agent released the session only after {took:.0f} s"

    # tar and zstd lose their reader and die; then nothing holds the mount
    wait_for("tar ending", lambda: lab.sh("px1", "pgrep -x tar", check=False).returncode != 0,
             60)
    res = lab.sh("px1", ["sanoffload", "proxy", "cleanup"], check=False, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert re.search(rf"removed\s+{re.escape(record['session_id'])}:", res.stdout), res.stdout
    assert target not in iscsi_sessions(lab)
    assert target not in node_records(lab)
    assert our_mounts(lab) == ""
    left = lab.sh("px1", f"find {JOURNAL} /run/sanoffload/mnt -mindepth 1", check=False)
    assert left.stdout.strip() == "", left.stdout
    # a second run finds nothing
    assert lab.sh("px1", ["sanoffload", "proxy", "cleanup"]).stdout.strip() == \
        "nothing to clean up"
    # and nothing was stored
    listed = json.loads(lab.sh("px1", ["sanoffload", "list", "--store", "bk1:" + deploy.REPO,
                                       "--json"]).stdout)
    assert listed == []
    assert lab.lio_inventory("fs1") == {"targets": [], "backstores": []}
    lab.sh("fs1", f"rm -rf {BIG}")


WRITE_ERRORS = ("Read-only file system", "Input/output error", "Operation not permitted",
                "Permission denied")


def test_the_exported_lun_cannot_be_written_from_px1(site: Lab) -> None:
    lab = site
    lab.sh("fs1", f"mkdir -p {deploy.DATA}/ro && echo keep > {deploy.DATA}/ro/f && sync")
    ans = json.loads(lab.sh("fs1", ["sanoffload", "agent", "prepare", deploy.DATA + "/ro",
                                    "--initiator", lab.iqn("px1"), "--json"]).stdout)
    sid, target, portal = ans["session_id"], ans["target_iqn"], ans["portals"][0]
    node = f"iscsiadm -m node -T {shlex.quote(target)} -p {shlex.quote(portal)}"
    try:
        snap = lab.sh("fs1", ["lvs", "--noheadings", "-o", "lv_path", "@sanoffload"]
                      ).stdout.split()
        assert len(snap) == 1, snap
        first_mib = f"head -c 1048576 {snap[0]} | sha256sum"
        before = lab.sh("fs1", first_mib).stdout.split()[0]

        lab.sh("px1", f"""set -e
            {node} -o new >/dev/null
            {node} -o update -n node.session.auth.authmethod -v CHAP
            {node} -o update -n node.session.auth.username -v {shlex.quote(ans['chap_user'])}
            {node} -o update -n node.session.auth.password -v {shlex.quote(ans['chap_secret'])}
            {node} --login >/dev/null
            udevadm settle --timeout=60""", timeout=300)
        dev = f"/dev/disk/by-id/wwn-0x{ans['identifier'].removeprefix('naa.')}"
        lab.sh("px1", f"test -b {dev}")
        # one block of random data: writing zeros over zeros would prove nothing
        lab.sh("px1", "head -c 4096 /dev/urandom > /tmp/block")
        dd = f"dd if=/tmp/block of={dev} bs=4096 count=1 conv=notrunc,fsync status=none"

        assert lab.sh("px1", ["blockdev", "--getro", dev]).stdout.strip() == "1"
        for label, cmd in (("plain", dd), ("O_DIRECT", dd + " oflag=direct")):
            res = lab.sh("px1", cmd, check=False)
            assert res.returncode != 0, f"{label} write to the LUN succeeded"
            assert any(e in res.stderr for e in WRITE_ERRORS), (label, res.stderr)

        # the proxy's own read-only flag off: the target must still refuse
        setrw = lab.sh("px1", ["blockdev", "--setrw", dev], check=False)
        for label, cmd in (("after --setrw", dd), ("after --setrw, O_DIRECT",
                                                   dd + " oflag=direct")):
            res = lab.sh("px1", cmd, check=False)
            assert res.returncode != 0, f"{label}: write succeeded (setrw: {setrw.stderr})"
            assert any(e in res.stderr for e in WRITE_ERRORS), (label, res.stderr)

        lab.sh("fs1", ["sync"])
        after = lab.sh("fs1", f"echo 3 > /proc/sys/vm/drop_caches; {first_mib}").stdout.split()[0]
        assert after == before, "the snapshot's first MiB changed"
        # the first server's own data is untouched too
        assert lab.sh("fs1", ["cat", f"{deploy.DATA}/ro/f"]).stdout == "keep\n"
    finally:
        lab.sh("px1", f"{node} --logout; {node} -o delete; true", check=False)
        lab.sh("fs1", ["sanoffload", "agent", "release", sid], check=False)
        lab.sh("fs1", f"rm -rf {deploy.DATA}/ro", check=False)
    assert lab.lio_inventory("fs1") == {"targets": [], "backstores": []}
    assert target not in iscsi_sessions(lab) and target not in node_records(lab)


def test_the_boot_unit_deletes_a_node_record_a_dead_proxy_left(site: Lab) -> None:
    """sanoffload-proxy-cleanup.service as installed: what a reboot leaves (a node record)."""
    lab = site
    sid = "fs1-deadbeef"
    target, portal = f"iqn.2026-11.org.sanoffload:{sid}", f"{lab.ip('fs1')}:3260"
    foreign = "iqn.2026-11.org.example:not-ours"
    record = {"session_id": sid, "target": target, "portal": portal,
              "mountpoint": f"/run/sanoffload/mnt/{sid}", "pid": 1, "created": time.time(),
              "resources": ["node", "session", "mount"]}
    try:
        out = lab.sh("px1", ["sanoffload", "install-units", "--role", "proxy"]).stdout
        assert "sanoffload-proxy-cleanup.service" in out
        lab.sh("px1", "systemctl daemon-reload && "
                      "systemctl enable sanoffload-proxy-cleanup.service")
        # after a reboot: the node records are still there, the session and mount are not
        for t in (target, foreign):
            lab.sh("px1", ["iscsiadm", "-m", "node", "-T", t, "-p", portal, "-o", "new"])
        lab.sh("px1", f"mkdir -p -m 700 {JOURNAL} && umask 077 && "
                      f"cat > {JOURNAL}/{sid}.json", input=json.dumps(record))
        lab.sh("px1", ["systemctl", "start", "sanoffload-proxy-cleanup.service"], timeout=300)
        log = lab.sh("px1", ["journalctl", "--no-pager", "-u",
                             "sanoffload-proxy-cleanup.service"]).stdout
        assert re.search(rf"removed\s+{sid}:", log), log[-2000:]
        nodes = node_records(lab)
        assert target not in nodes, nodes
        assert foreign in nodes, "a node record sanoffload did not make was removed"
        assert lab.sh("px1", f"ls -A {JOURNAL}").stdout.strip() == ""
        # nothing journaled: the unit does not even start
        lab.sh("px1", ["systemctl", "start", "sanoffload-proxy-cleanup.service"])
        state = lab.sh("px1", ["systemctl", "show", "-p", "ConditionResult",
                               "sanoffload-proxy-cleanup.service"]).stdout.strip()
        assert state == "ConditionResult=no", state
    finally:
        lab.sh("px1", f"iscsiadm -m node -T {foreign} -p {portal} -o delete; "
                      f"iscsiadm -m node -T {target} -p {portal} -o delete; "
                      f"rm -f {JOURNAL}/{sid}.json; "
                      "systemctl disable sanoffload-proxy-cleanup.service; "
                      "rm -f /etc/systemd/system/sanoffload-*; systemctl daemon-reload; true",
               check=False)
