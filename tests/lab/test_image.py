"""Image backups of a thin volume on fs1 (issue 13, block level), end to end in the lab.

fs1: a thin pool and a 256 MiB thin volume with ext4 at /srv/data. px1 takes a full image
backup, the volume changes (a file rewritten, one added, one deleted, fstrim), an
incremental is made to fail after its snapshot was taken (the repository's chunk
directories made immutable on bk1), and then one succeeds. Asserted:

* the failed backup leaves the old base (same backup id, same LV), no session and no snapshot;
* the next backup is incremental against the first, and px1 reads at most 1.2 x the bytes of
  the chunks that differ between the two backups (counted by the kernel on px1: pgpgin), and
  the repository grows by at most 1.2 x that;
* the second backup restored to a file on bk1 has the sha256 of fs1's new base snapshot
  (the snapshot the backup read, kept by the agent);
* ``sanoffload mount`` of the second backup on bk1 shows the rewritten file's new content and
  not the deleted file; ``umount`` leaves no loop device, FUSE mount or mount behind.

And the file level on the same volume: a ``--incremental`` tar level 0 whose post-thaw hook
changes a file after the freeze (before tar starts), then changes, a rename and deletions, then
level 1: its restore on bk1 (the chain applied) equals the tree frozen for level 1.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Iterator
from typing import Any

import pytest

from sanolab import deploy

from .labctl import Lab

VG = deploy.VG
DATA = deploy.DATA
STORE = "bk1:" + deploy.REPO
VOLUME_MIB = 256
CHUNK = 4 << 20
CHANGED_MIB = 8  # ~3 % of the volume
MNT = "/mnt/image-backup"
IMG = "/var/tmp/image-restore.img"

# ChunkMap's header (sanoffload/store/imagemap.py), read on bk1 with nothing of ours
MAP_DIFF = r"""
import struct, sys
def entries(path):
    data = open(path, "rb").read()
    magic, version, _, chunk, size, count = struct.unpack_from(">6sBBIQQ", data)
    assert magic == b"SOIMAP" and len(data) == 28 + 32 * count, path
    return size, chunk, [data[28 + 32 * i:60 + 32 * i] for i in range(count)]
size, chunk, a = entries(sys.argv[1])
_, _, b = entries(sys.argv[2])
changed = sum(min(chunk, size - i * chunk) for i, (x, y) in enumerate(zip(a, b)) if x != y)
print(changed)
"""


def _backup(lab: Lab, *, check: bool = True) -> tuple[int, dict[str, Any] | str]:
    res = lab.sh("px1", ["sanoffload", "backup", f"fs1:{DATA}", "--image", "--store", STORE,
                         "--json"], check=False, timeout=1200)
    if check:
        assert res.returncode == 0, (res.stdout[-2000:], res.stderr[-3000:])
    if res.returncode == 0:
        summary: dict[str, Any] = json.loads(res.stdout)
        return 0, summary
    return res.returncode, res.stderr


def _bases(lab: Lab) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = json.loads(
        lab.sh("fs1", ["sanoffload", "agent", "status", "--json"]).stdout)["bases"]
    return rows


def _pgpgin_bytes(lab: Lab) -> int:
    for line in lab.sh("px1", ["cat", "/proc/vmstat"]).stdout.splitlines():
        name, value = line.split()
        if name == "pgpgin":
            return int(value) * 1024  # KiB, whatever the page size
    raise AssertionError("no pgpgin in px1's /proc/vmstat")


def _repo_bytes(lab: Lab) -> int:
    return int(lab.sh("bk1", ["du", "-sb", deploy.REPO]).stdout.split()[0])


def _map_path(backup_id: str) -> str:
    return f"{deploy.REPO}/{backup_id}.map"


@pytest.fixture(scope="module")
def thin(lab: Lab) -> Iterator[Lab]:
    deploy.hosts_file(lab.runner, lab.hosts)
    deploy.ssh_keys(lab.runner)
    deploy.configs(lab.runner, grace_s=3)
    lab.sh("fs1", f"""set -e
        pvcreate -q -y /dev/vdb /dev/vdc
        vgcreate -q {VG} /dev/vdb /dev/vdc
        lvcreate -q -y -L 900m -T {VG}/pool
        lvcreate -q -y -V {VOLUME_MIB}m -T {VG}/pool -n data
        mkfs.ext4 -q -E lazy_itable_init=0,lazy_journal_init=0,discard /dev/{VG}/data
        """, timeout=600)
    try:
        deploy.volumes(lab.runner)  # mounts fs1's thin data and bk1's repository disk
        lab.sh("bk1", f"rm -rf {deploy.REPO}/fs1 {deploy.REPO}/chunks {IMG}; mkdir -p {MNT}")
        yield lab
    finally:
        lab.sh("bk1", f"sanoffload umount {MNT} >/dev/null 2>&1; "
                      f"chattr -R -i {deploy.REPO} 2>/dev/null; rm -rf {IMG}; true", check=False)
        deploy.undeploy_volumes(lab.runner)
    assert lab.leftovers() == []


def test_incremental_image_backup_reads_the_change_and_restores_the_snapshot(thin: Lab) -> None:
    lab = thin
    lab.sh("fs1", f"""set -e
        mkdir -p {DATA}/img
        for i in $(seq 1 12); do head -c 4M /dev/urandom > {DATA}/img/base-$i; done
        echo v1 > {DATA}/img/keep.txt
        head -c 4M /dev/urandom > {DATA}/img/gone.bin
        sync""", timeout=600)
    rc, first = _backup(lab)
    assert isinstance(first, dict)
    assert first["kind"] == "image" and first["incremental"] is False, first
    assert first["read_bytes"] >= VOLUME_MIB << 20  # the whole volume
    bases = _bases(lab)
    assert [(b["backup"], b["trusted"]) for b in bases] == [(first["backup_id"], True)], bases

    lab.sh("fs1", f"""set -e
        echo v2 > {DATA}/img/keep.txt
        head -c {CHANGED_MIB}M /dev/urandom > {DATA}/img/new.bin
        rm {DATA}/img/gone.bin
        sync
        fstrim {DATA}""", timeout=300)

    # a backup failing after its snapshot was taken: no chunk can be created on bk1
    lab.sh("bk1", f"chattr +i {deploy.REPO}/chunks {deploy.REPO}/chunks/*")
    try:
        rc, err = _backup(lab, check=False)
    finally:
        lab.sh("bk1", f"chattr -i {deploy.REPO}/chunks {deploy.REPO}/chunks/*")
    assert rc != 0, err
    assert _bases(lab) == bases, "a failed backup must leave the old base as it was"
    assert json.loads(lab.sh("fs1", ["sanoffload", "agent", "sessions", "--json"]).stdout) == []
    lvs = lab.sh("fs1", ["lvs", "--noheadings", "-o", "lv_name", "@sanoffload"]).stdout.split()
    assert lvs == [bases[0]["base"].split("/")[1]], lvs

    repo_before = _repo_bytes(lab)
    read_before = _pgpgin_bytes(lab)
    rc, second = _backup(lab)
    read = _pgpgin_bytes(lab) - read_before
    grown = _repo_bytes(lab) - repo_before
    assert isinstance(second, dict)
    assert second["incremental"] is True and second["base"] == first["backup_id"], second
    changed = int(lab.sh("bk1", ["python3", "-c", MAP_DIFF, _map_path(first["backup_id"]),
                                 _map_path(second["backup_id"])]).stdout.strip())
    print(f"changed chunks {changed >> 20} MiB (user data {CHANGED_MIB + 1} MiB); px1 read "
          f"{read / (1 << 20):.1f} MiB (the proxy counted {second['read_bytes'] >> 20} MiB); "
          f"the repository grew {grown / (1 << 20):.1f} MiB")
    assert CHANGED_MIB << 20 <= changed < (VOLUME_MIB << 20) // 4, changed
    assert read <= 1.2 * changed, (read, changed)
    assert grown <= 1.2 * changed, (grown, changed)

    # the restore equals the snapshot the backup read: the agent's new base
    bases = _bases(lab)
    assert [(b["backup"], b["trusted"]) for b in bases] == [(second["backup_id"], True)], bases
    base = bases[0]["base"]
    lab.sh("fs1", ["lvchange", "-ay", "-K", base])
    try:
        want = lab.sh("fs1", ["sha256sum", f"/dev/{base}"], timeout=600).stdout.split()[0]
    finally:
        lab.sh("fs1", ["lvchange", "-an", base])
    lab.sh("bk1", ["sanoffload", "restore", second["backup_id"], "--image", IMG,
                   "--store", deploy.REPO], timeout=900)
    got = lab.sh("bk1", ["sha256sum", IMG], timeout=600).stdout.split()[0]
    lab.sh("bk1", ["rm", "-f", IMG])
    assert got == want

    # single files from the image backup
    lab.sh("bk1", ["sanoffload", "mount", "--repo", deploy.REPO, second["backup_id"], MNT],
           timeout=300)
    try:
        assert lab.sh("bk1", ["cat", f"{MNT}/img/keep.txt"]).stdout == "v2\n"
        assert lab.sh("bk1", ["test", "-e", f"{MNT}/img/gone.bin"], check=False).returncode == 1
        size = lab.sh("bk1", ["stat", "-c", "%s", f"{MNT}/img/new.bin"]).stdout.strip()
        assert int(size) == CHANGED_MIB << 20
        assert lab.sh("bk1", f"touch {shlex.quote(MNT)}/img/x", check=False).returncode != 0
    finally:
        lab.sh("bk1", ["sanoffload", "umount", MNT], timeout=300)
    # a FUSE mount's type is fuse or fuse.SUBTYPE (fusectl is the kernel's control filesystem)
    left = lab.sh("bk1", "losetup -a; awk '$3 ~ /^fuse($|[.])/ || $2 ~ /image-backup/' "
                         "/proc/mounts; pgrep -f '[s]anoffload.store.fusefile'; true"
                  ).stdout.strip()
    assert left == "", left


LATE_HOOK = """#!/bin/sh
# a post-thaw hook (runs after the thaw, before the proxy's tar starts) that changes a file
# when asked: the change is after the freeze, so this level must not hold it and the next must
[ -e /run/sano-late.on ] && echo late >> /srv/data/inc/late.txt
exit 0
"""


def _tar_backup(lab: Lab) -> dict[str, Any]:
    res = lab.sh("px1", ["sanoffload", "backup", f"fs1:{DATA}/inc", "--incremental",
                         "--store", STORE, "--json"], timeout=900)
    summary: dict[str, Any] = json.loads(res.stdout)
    return summary


def test_a_level_1_tar_backup_restores_the_frozen_tree_exactly(thin: Lab) -> None:
    """File level: level 0 (a file changed by a post-thaw hook between the freeze and tar's
    start), then changes, renames and deletions, then level 1; the restore of level 1 (its
    chain applied on bk1) equals the tree frozen for level 1, the late change included."""
    lab = thin
    lab.sh("fs1", f"""set -e
        cat > /usr/local/sbin/sano-late && chmod 755 /usr/local/sbin/sano-late
        printf '[hooks]\\npost_thaw = ["/usr/local/sbin/sano-late"]\\n' \\
            >> /etc/sanoffload/agent.toml
        rm -rf {DATA}/inc; mkdir -p {DATA}/inc/sub {DATA}/inc/gone
        echo early > {DATA}/inc/late.txt
        echo a > {DATA}/inc/a.txt; echo b > {DATA}/inc/sub/b.txt; echo c > {DATA}/inc/gone/c.txt
        head -c 1M /dev/urandom > {DATA}/inc/blob; ln -s a.txt {DATA}/inc/link
        touch /run/sano-late.on; sync""", input=LATE_HOOK)
    try:
        level0 = _tar_backup(lab)
        assert level0["tar_level"] == 0, level0
        lab.sh("fs1", f"""set -e
            rm -f /run/sano-late.on
            grep -qx late {DATA}/inc/late.txt   # the hook ran after the freeze
            echo a2 >> {DATA}/inc/a.txt
            echo new > {DATA}/inc/sub/new.txt
            mv {DATA}/inc/sub/b.txt {DATA}/inc/sub/b-renamed.txt
            rm -r {DATA}/inc/gone
            ln -sfn sub {DATA}/inc/link
            sync""")
        level1 = _tar_backup(lab)
        assert (level1["tar_level"], level1["parent"]) == (1, level0["backup_id"]), level1
        want = deploy.digest(lab.runner, "fs1", f"{DATA}/inc")
        lab.sh("bk1", "rm -rf /restore")
        lab.sh("bk1", ["sanoffload", "store", "--repo", deploy.REPO, "restore",
                       level1["backup_id"], "/restore"], timeout=600)
        got = deploy.digest(lab.runner, "bk1", "/restore")
        assert got == want
        assert lab.sh("bk1", ["cat", "/restore/late.txt"]).stdout == "early\nlate\n"
    finally:
        lab.sh("fs1", "rm -f /run/sano-late.on /usr/local/sbin/sano-late; "
                      "sed -i '/^\\[hooks\\]/,$d' /etc/sanoffload/agent.toml", check=False)
        lab.sh("bk1", "rm -rf /restore", check=False)
