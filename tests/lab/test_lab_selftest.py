"""The lab proves the real stack (not the product): LVM snapshot → LIO → open-iscsi → udev → mount.

On st1 an LVM snapshot of an ext4 LV is exported with rtslib-fb to px1's
initiator only; px1 logs in, finds the disk by its WWN under /dev/disk/by-id,
mounts it read-only and reads a file written before the snapshot (and not one
written after); everything is torn down and the hosts are checked clean.
"""

from __future__ import annotations

import re
import uuid

import pytest

from .labctl import Lab

TARGET_IQN = "iqn.2026-11.org.sanoffload:selftest"
VG = "selftestvg"

EXPORT = r"""
import rtslib_fb as r
bs = r.BlockStorageObject("selftest", dev="/dev/{vg}/snap", wwn="{serial}", readonly=True)
tgt = r.Target(r.FabricModule("iscsi"), "{iqn}")
tpg = r.TPG(tgt, 1)
tpg.enable = True
tpg.set_attribute("authentication", "0")
tpg.set_attribute("generate_node_acls", "0")
r.NetworkPortal(tpg, "{ip}", 3260)
lun = r.LUN(tpg, 0, bs)
acl = r.NodeACL(tpg, "{initiator}")
r.MappedLUN(acl, 0, lun, write_protect=True)
print(bs.wwn)
"""

UNEXPORT = r"""
import rtslib_fb as r
root = r.RTSRoot()
for t in list(root.targets):
    if t.wwn == "{iqn}":
        t.delete()
for so in list(root.storage_objects):
    if so.name == "selftest":
        so.delete()
"""


def expected_wwid(serial: str) -> str:
    """LIO's NAA identifier: 6, the IEEE company id 001405, 25 hex digits of the serial."""
    return "6001405" + serial.replace("-", "")[:25]


def test_snapshot_exported_over_iscsi_is_found_by_wwn_and_read(lab: Lab) -> None:
    serial = str(uuid.uuid4())
    wwid = expected_wwid(serial)
    st1, px1 = "st1", "px1"
    try:
        lab.sh(st1, f"""set -e
            pvcreate -q /dev/vdb
            vgcreate -q {VG} /dev/vdb
            lvcreate -q -y -L 256m -n data {VG}
            mkfs.ext4 -q /dev/{VG}/data
            mkdir -p /mnt/data && mount /dev/{VG}/data /mnt/data
            echo before-snapshot > /mnt/data/known.txt
            sync
            lvcreate -q -s -L 64m -n snap {VG}/data
            echo after-snapshot > /mnt/data/later.txt
            sync""")
        out = lab.py(st1, EXPORT.format(vg=VG, serial=serial, iqn=TARGET_IQN,
                                        ip=lab.ip(st1), initiator=lab.iqn(px1)))
        assert out.stdout.strip() == serial
        lab.sh(px1, ["iscsiadm", "-m", "discovery", "-t", "sendtargets", "-p", lab.ip(st1)])
        lab.sh(px1, ["iscsiadm", "-m", "node", "-T", TARGET_IQN, "-p", lab.ip(st1), "--login"])
        lab.sh(px1, ["udevadm", "settle", "--timeout=60"])
        link = f"/dev/disk/by-id/wwn-0x{wwid}"
        dev = lab.sh(px1, ["readlink", "-e", link]).stdout.strip()
        assert re.fullmatch(r"/dev/sd[a-z]+", dev), dev
        name = dev.rsplit("/", 1)[1]
        wwid_file = f"/sys/block/{name}/device/wwid"
        assert lab.sh(px1, ["cat", wwid_file]).stdout.strip() == f"naa.{wwid}"
        assert lab.sh(px1, ["cat", f"/sys/block/{name}/ro"]).stdout.strip() == "1"
        lab.sh(px1, f"mkdir -p /mnt/selftest && mount -o ro,noload {dev} /mnt/selftest")
        assert lab.sh(px1, ["cat", "/mnt/selftest/known.txt"]).stdout == "before-snapshot\n"
        assert lab.sh(px1, ["test", "-e", "/mnt/selftest/later.txt"], check=False).returncode == 1
        # the ACL admits px1 only: fs1 sees the target refuse its login
        lab.sh("fs1", ["iscsiadm", "-m", "discovery", "-t", "sendtargets", "-p", lab.ip(st1)],
               check=False)
        denied = lab.sh("fs1", ["iscsiadm", "-m", "node", "-T", TARGET_IQN, "-p", lab.ip(st1),
                                "--login"], check=False)
        assert denied.returncode != 0, denied.stdout
    finally:
        lab.sh(px1, "umount /mnt/selftest 2>/dev/null; "
                    f"iscsiadm -m node -T {TARGET_IQN} --logout 2>/dev/null; "
                    f"iscsiadm -m node -T {TARGET_IQN} -o delete 2>/dev/null; true")
        lab.sh("fs1", f"iscsiadm -m node -T {TARGET_IQN} -o delete 2>/dev/null; true")
        lab.py(st1, UNEXPORT.format(iqn=TARGET_IQN))
        lab.sh(st1, f"umount /mnt/data 2>/dev/null; vgremove -q -f {VG} 2>/dev/null; "
                    "pvremove -q /dev/vdb 2>/dev/null; wipefs -q -a /dev/vdb; true")
    assert lab.leftovers() == []


@pytest.mark.release_sensitive
def test_guest_kernel_matches_release(lab: Lab) -> None:
    kernel = lab.sh("fs1", ["uname", "-r"]).stdout.strip()
    major_minor = tuple(int(x) for x in kernel.split(".")[:2])
    if lab.release == "bookworm":
        assert major_minor == (6, 1), kernel
    else:
        assert major_minor >= (6, 6), kernel
