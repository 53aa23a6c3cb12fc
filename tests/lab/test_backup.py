"""End to end in the lab: px1 backs up fs1:/srv/data to bk1 over ssh, iSCSI and udev.

Deployed as a sysadmin would (scripts/sanolab/deploy.py): px1's key in root's
authorized_keys on fs1 and bk1 with forced commands, the agent's and the
store's config files. Nothing else: the tests run ``sanoffload`` on px1 and
look at what it left on every host.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from sanoffload.runner import Result
from sanolab import deploy

from .labctl import Lab

TREE = deploy.DATA + "/tree"
LIVE = deploy.DATA + "/live"

# every kind of entry restore must give back exactly
MAKE_TREE = rf"""set -e
rm -rf {TREE} {LIVE}
mkdir -p {TREE} {LIVE}
cd {TREE}
mkdir -p "empty dir" sub/deeper ro
printf 'plain\n' > plain.txt
printf 'spaces\n' > "name with spaces"
printf 'newline\n' > "$(printf 'new\nline')"
printf 'latin1\n' > "$(printf 'caf\351')"
printf 'x%.0s' $(seq 1 5000) > sub/deeper/5k.txt
ln -s plain.txt link
ln -s /nonexistent/target dangling
ln plain.txt hardlink
truncate -s 48M sparse
printf 'middle' | dd of=sparse bs=1 seek=25165824 conv=notrunc status=none
mkfifo fifo
chown 1234:5678 plain.txt
chown -h 4321:8765 link
chmod 4750 plain.txt
chmod 0555 ro
setfattr -n user.color -v blue "name with spaces"
setfacl -m u:1234:rwx,g:5678:r-x sub
setfacl -d -m g:5678:r-x sub
touch -d '2001-02-03 04:05:06' "name with spaces" sub/deeper/5k.txt
touch -h -d '2002-03-04 05:06:07' link
touch -d '2003-04-05 06:07:08' sub/deeper "empty dir"
echo 0 > {LIVE}/counter
sync
"""

def digest(lab: Lab, host: str, root: str) -> dict[str, Any]:
    return deploy.digest(lab.runner, host, root)


def px1(lab: Lab, args: list[str], *, check: bool = True, timeout: float = 900) -> Result:
    return lab.sh("px1", ["sanoffload", *args], check=check, timeout=timeout)


def assert_clean(lab: Lab) -> None:
    """No iSCSI session or mount on px1, no export or tagged LV on fs1, no partial on bk1."""
    sessions = lab.sh("px1", ["iscsiadm", "-m", "session"], check=False)
    assert sessions.returncode != 0 or not sessions.stdout.strip(), sessions.stdout
    mounts = lab.sh("px1", "grep ' /run/sanoffload' /proc/mounts || true").stdout
    assert not mounts.strip(), mounts
    assert lab.lio_inventory("fs1") == {"targets": [], "backstores": []}
    tagged = lab.sh("fs1", ["lvs", "--noheadings", "-o", "lv_name", "@sanoffload"]).stdout
    assert not tagged.strip(), tagged
    assert json.loads(lab.sh("fs1", ["sanoffload", "agent", "sessions", "--json"]).stdout) == []
    partial = lab.sh("bk1", f"find {deploy.REPO} -name '*.partial' -o -name '.sanoffload-*'")
    assert not partial.stdout.strip(), partial.stdout


@pytest.fixture(scope="module")
def site(lab: Lab) -> Iterator[Lab]:
    deploy.deploy(lab.runner, lab.hosts, grace_s=3)
    lab.sh("bk1", f"rm -rf {deploy.REPO}/fs1")  # a reused lab may hold earlier backups
    lab.sh("fs1", MAKE_TREE, timeout=300)
    try:
        yield lab
    finally:
        deploy.stop_writer(lab.runner)
        deploy.undeploy_volumes(lab.runner)


def test_backup_while_a_writer_writes_restores_the_frozen_state(site: Lab) -> None:
    lab = site
    before = digest(lab, "fs1", TREE)
    # a writer that keeps appending numbered lines for the whole backup
    deploy.start_writer(lab.runner, f"{LIVE}/counter")
    time.sleep(2)
    res = px1(lab, ["backup", "fs1:" + deploy.DATA, "--store", "bk1:" + deploy.REPO, "--json"])
    summary = json.loads(res.stdout)
    deploy.stop_writer(lab.runner)
    # the default check (stream): decoded by bk1 on receipt, nothing read twice
    # (test_units' job runs --verify full: tar --diff against the duplicate)
    assert summary["verified"] is True and summary["verify"] == "stream"
    assert summary["compared"] is None
    assert summary["verification"]["status"] == "ok"
    assert summary["verification"]["detail"] == "on receipt"
    assert summary["duplicate_kind"] == "snapshot"
    assert summary["freeze_window_ms"] >= 0
    assert summary["archive_bytes"] > 0
    bid = summary["backup_id"]
    assert bid.startswith("fs1/srv-data-")
    assert_clean(lab)

    # the catalog, from px1 over the channel and on bk1 itself
    listed = json.loads(px1(lab, ["list", "--store", "bk1:" + deploy.REPO, "--json"]).stdout)
    assert [b["id"] for b in listed] == [bid]
    assert listed[0]["session_id"] == summary["session_id"]

    # a fourth place: restore on bk1 from the repository alone (fs1 not involved)
    lab.sh("bk1", "rm -rf /restore")
    # --setid: the tree holds a set-uid file, restored exactly only when asked
    lab.sh("bk1", ["sanoffload", "store", "--repo", deploy.REPO, "restore", "--setid", bid,
                   "/restore"],
           timeout=600)
    assert digest(lab, "bk1", "/restore/tree") == before
    # the live file: consistent (whole lines 0..k) and frozen (writes went on after)
    restored = lab.sh("bk1", ["cat", "/restore/live/counter"]).stdout.split("\n")
    final = lab.sh("fs1", ["cat", f"{LIVE}/counter"]).stdout.split("\n")
    assert restored[-1] == "" and restored[:-1] == [str(i) for i in range(len(restored) - 1)]
    assert len(restored) < len(final), "writes after the freeze reached the backup"
    assert final[:len(restored) - 1] == restored[:-1]

    # restore over the channel on px1 too, one selected path
    lab.sh("px1", "rm -rf /restore")
    px1(lab, ["restore", "--setid", "--store", "bk1:" + deploy.REPO, bid, "/restore", "tree/sub"])
    got = digest(lab, "px1", "/restore/tree/sub")
    want = {k: v for k, v in before.items()
            if bytes.fromhex(k).startswith(b"sub/")}
    assert {bytes.fromhex(k) for k in got} == {bytes.fromhex(k)[4:] for k in want}
    lab.sh("px1", "rm -rf /restore")
    lab.sh("bk1", "rm -rf /restore")

    # a flipped byte: verify fails (12) and restore refuses
    archive = lab.sh("bk1", f"ls {deploy.REPO}/{bid}.tar.zst").stdout.strip()
    lab.sh("bk1", f"chmod u+w {archive} && printf 'X' | dd of={archive} bs=1 seek=200 "
                  "conv=notrunc status=none")
    assert px1(lab, ["verify", "--store", "bk1:" + deploy.REPO, bid],
               check=False).returncode == 12
    res = lab.sh("bk1", ["sanoffload", "store", "--repo", deploy.REPO, "restore", bid,
                         "/restore"], check=False)
    assert res.returncode == 12, res.stderr
    assert lab.sh("bk1", "test -e /restore", check=False).returncode == 1
    lab.sh("bk1", f"rm -f {deploy.REPO}/{bid}.*")


def test_backup_to_ceph_rgw_restores_on_the_backup_server(site: Lab, rgw: Any) -> None:
    """px1 backs up fs1 to the lab's Ceph RGW (encrypted on px1, as the proxy user); bk1,
    with the maintenance profile and the key alone, lists and restores it exactly."""
    lab = site
    before = digest(lab, "fs1", TREE)
    res = px1(lab, ["backup", "fs1:" + deploy.DATA, "--store", deploy.s3_store("px1"),
                    "--json"])
    summary = json.loads(res.stdout)
    assert summary["verified"] is True, summary
    assert summary["archive_bytes"] > 0
    bid = summary["backup_id"]
    assert bid.startswith("fs1/srv-data-")
    assert_clean(lab)

    listed = json.loads(lab.sh("bk1", ["sanoffload", "list", "--store",
                                       deploy.s3_store("maint"), "--json"]).stdout)
    assert [b["id"] for b in listed] == [bid]
    lab.sh("bk1", "rm -rf /restore-s3")
    lab.sh("bk1", ["sanoffload", "restore", "--setid", "--store", deploy.s3_store("maint"), bid,
                   "/restore-s3"], timeout=600)
    assert digest(lab, "bk1", "/restore-s3/tree") == before
    lab.sh("bk1", "rm -rf /restore-s3")

    # the proxy's credentials cannot take it away: refused before anything is deleted
    res = px1(lab, ["prune", "--store", deploy.s3_store("px1"), "--keep-last", "0"],
              check=False)
    assert res.returncode == 10, res.stderr
    listed = json.loads(px1(lab, ["list", "--store", deploy.s3_store("px1"), "--json"]).stdout)
    assert [b["id"] for b in listed] == [bid]


def test_killed_ssh_connection_makes_the_agent_release(site: Lab) -> None:
    lab = site
    lab.sh("fs1", f"mkdir -p {deploy.DATA}/big && head -c 150M /dev/urandom > "
                  f"{deploy.DATA}/big/blob && sync", timeout=600)
    lab.sh("px1", f"nohup sanoffload backup fs1:{deploy.DATA}/big --store bk1:{deploy.REPO} "
                  "--no-progress > /tmp/bk.out 2>&1 & echo $! > /tmp/bk.pid")
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        sessions = json.loads(lab.sh("fs1", ["sanoffload", "agent", "sessions", "--json"]).stdout)
        if sessions and sessions[0].get("status") == "healthy":
            break
        time.sleep(0.5)
    else:
        pytest.fail("no session appeared on fs1")
    killed = time.monotonic()
    lab.sh("px1", "pkill -KILL -f '[s]sh .* fs1 sanoffload agent serve'")
    # the agent, on its own (the proxy may still be waiting on the vanished LUN)
    while time.monotonic() - killed < 60:
        if not json.loads(lab.sh("fs1", ["sanoffload", "agent", "sessions",
                                         "--json"]).stdout):
            break
        time.sleep(0.5)
    took = time.monotonic() - killed
    assert took < 3 + 30, f"the agent released the session only after {took:.0f} s"
    # the proxy notices, cleans up on its side and fails
    lab.sh("px1", "while kill -0 $(cat /tmp/bk.pid) 2>/dev/null; do sleep 0.5; done",
           timeout=300)
    out = lab.sh("px1", ["cat", "/tmp/bk.out"]).stdout
    assert "sanoffload: error:" in out, out
    listed = json.loads(px1(lab, ["list", "--store", "bk1:" + deploy.REPO, "--json"]).stdout)
    assert listed == []
    assert_clean(lab)
    lab.sh("fs1", f"rm -rf {deploy.DATA}/big")


def test_refusals_change_nothing(site: Lab) -> None:
    lab = site
    store = ["--store", "bk1:" + deploy.REPO]
    # a root the agent does not allow px1: refused (3), nothing made
    res = px1(lab, ["backup", "fs1:/etc", *store], check=False)
    assert res.returncode == 3, res.stderr
    assert "outside the allowed roots" in res.stderr and "/etc" in res.stderr
    # a key fs1 does not know: auth error (10)
    lab.sh("px1", "test -f /root/.ssh/other || ssh-keygen -q -t ed25519 -N '' -f /root/.ssh/other")
    res = px1(lab, ["backup", "fs1:" + deploy.DATA, *store, "--ssh-option",
                    "IdentityFile=/root/.ssh/other", "--ssh-option", "IdentitiesOnly=yes"],
              check=False)
    assert res.returncode == 10, res.stderr
    # raw protocol through the real forced command: each gets one clear error line
    for raw, expect in (
            (b"not json\n", "malformed JSON"),
            (b'{"op":"hello","versions":[99]}\n', "no common protocol version"),
            (b'{"op":"hello","versions":[1]}\n{"op":"format_disk"}\n', "unknown op"),
            (b'{"op":"hello","versions":[1]}\n' + b'{"op":"ping","pad":"' + b"x" * (1 << 21)
             + b'"}\n', "larger than"),
            (b'{"op":"hello","versions":[1]}\n{"op":"prepare","path":"/srv/data"}\n',
             "missing field 'initiator'"),
    ):
        out = lab.sh("px1", ["ssh", "-T", "-o", "BatchMode=yes", "fs1"], input=raw,
                     check=False).stdout
        replies = [json.loads(line) for line in out.splitlines()]
        assert replies and replies[-1]["ok"] is False, out
        assert expect in replies[-1]["error"]["message"], replies[-1]
        assert "Traceback" not in out
    # prune over the network is refused: a proxy never deletes
    res = px1(lab, ["prune", "--store", "bk1:" + deploy.REPO, "--keep-last", "1"], check=False)
    assert res.returncode == 3
    assert_clean(lab)


FILL = """#!/bin/sh
# a post-thaw hook that writes more than the snapshot can hold
head -c 64M /dev/urandom > /srv/data/fill && sync
"""


def test_an_overflowing_snapshot_fails_the_backup_and_stores_nothing(site: Lab) -> None:
    lab = site
    cfg = "/etc/sanoffload/agent.toml"
    hook = "/usr/local/sbin/sanoffload-test-fill"
    lab.sh("fs1", f"cat > {hook} && chmod 755 {hook}", input=FILL)
    lab.sh("fs1", f"cp {cfg} {cfg}.orig && sed -i 's/^percent = .*/percent = 1/; "
                  f"s/^min_mb = .*/min_mb = 4/' {cfg} && "
                  f"printf '\\n[hooks]\\npost_thaw = [\"{hook}\"]\\n' >> {cfg}")
    try:
        res = px1(lab, ["backup", f"fs1:{TREE}", "--store", "bk1:" + deploy.REPO],
                  check=False)
        assert res.returncode == 8, res.stderr
        assert "became invalid" in res.stderr, res.stderr
        listed = json.loads(px1(lab, ["list", "--store", "bk1:" + deploy.REPO,
                                      "--json"]).stdout)
        assert listed == []
        assert_clean(lab)
    finally:
        lab.sh("fs1", f"mv {cfg}.orig {cfg}; rm -f {hook} {deploy.DATA}/fill", check=False)
