"""The demo: one off-host backup in the lab, for real, while the first server keeps writing.

1. boot the lab (bookworm; the image is built on first use) and install this
   tree's sanoffload in the VMs;
2. deploy as on real hosts (scripts/sanolab/deploy.py): px1's key with forced
   commands on fs1 and bk1, the agent's and the store's configs, an LVM volume
   on fs1 holding a sample tree at /srv/data;
3. start a writer on fs1 that keeps appending to a file;
4. on px1: ``sanoffload backup fs1:/srv/data --store bk1:/srv/backups --json``;
5. restore on bk1 from the repository alone and compare it with the source
   (the writer's file: a consistent prefix, frozen at the freeze);
6. print the freeze window, bytes, throughput and the verification result,
   and take the lab down (``--keep`` leaves it up).

``--store s3``: the repository is a bucket on a real Ceph RGW in the lab's network
(scripts/sanolab/ceph.py) instead of bk1's disk: px1 backs up into it encrypted, as the
RGW user that may not delete, and bk1 restores with the maintenance profile and the key.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time

from sanoffload.runner import CommandRunner

from . import config, deploy, sync, vm

SAMPLE = r"""set -e
d=/srv/data
rm -rf $d/sample $d/live
mkdir -p $d/sample/etc $d/sample/www "$d/sample/empty dir" $d/live
for i in $(seq 1 200); do printf 'line %s of a config file\n' $i > $d/sample/etc/app$i.conf; done
head -c 20M /dev/urandom > $d/sample/www/blob.bin
seq 1 200000 > $d/sample/www/numbers.txt
ln -s ../etc/app1.conf $d/sample/www/current.conf
ln $d/sample/etc/app2.conf $d/sample/www/hardlink.conf
truncate -s 32M $d/sample/sparse.img
setfattr -n user.demo -v yes $d/sample/www/numbers.txt
setfacl -m u:1000:r $d/sample/etc/app3.conf
echo 0 > $d/live/counter
sync
"""



def say(text: str) -> None:
    print(f"demo: {text}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="scripts/demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keep", action="store_true", help="leave the lab up afterwards")
    ap.add_argument("--release", default=config.DEFAULT_RELEASE, choices=config.RELEASES)
    ap.add_argument("--store", choices=("bk1", "s3"), default="bk1",
                    help="bk1: bk1's repository over ssh (default); s3: a bucket on Ceph RGW")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="demo: %(message)s")
    runner = CommandRunner(default_timeout=300)
    ok = False
    try:
        say(f"booting the lab ({args.release}; the first run builds the image, ~2 min)")
        state = vm.up(runner, args.release, list(config.HOSTS))
        sync.sync(runner, state.hosts)
        say("deploying: ssh keys with forced commands, configs, an LVM volume on fs1")
        deploy.deploy(runner, state.hosts)
        deploy.sh(runner, "bk1", f"rm -rf {deploy.REPO}/fs1")
        deploy.sh(runner, "fs1", SAMPLE, timeout=600)
        if args.store == "s3":
            say("starting Ceph (mon, OSD, RGW over HTTPS) in the lab's network, installing "
                "boto3/cryptography on px1 and bk1, store init-s3 on bk1")
            cluster = deploy.s3_site(runner, args.release)
            store, restore_from = (shlex.quote(deploy.s3_store("px1")),
                                   f"--store {shlex.quote(deploy.s3_store('maint'))}")
            where = (f"{deploy.s3_store('px1').split('?')[0]} on Ceph RGW at "
                     f"{cluster.endpoint}, encrypted on px1")
        else:
            store, restore_from = "bk1:/srv/backups", f"--store {deploy.REPO}"
            where = "bk1:/srv/backups, over ssh to its forced 'store serve'"
        say("starting a writer on fs1 that keeps appending to /srv/data/live/counter")
        deploy.start_writer(runner, "/srv/data/live/counter")
        time.sleep(2)
        say(f"px1: sanoffload backup fs1:/srv/data --store {store} --json")
        out = deploy.sh(runner, "px1", f"sanoffload backup fs1:/srv/data --store {store} --json",
                        timeout=1800)
        summary = json.loads(out)
        deploy.stop_writer(runner)
        bid = summary["backup_id"]
        say(f"restoring {bid} on bk1 (from the repository alone) into /restore")
        deploy.sh(runner, "bk1", f"rm -rf /restore && sanoffload restore --setid {restore_from} "
                                 f"{bid} /restore", timeout=900)
        src = deploy.digest(runner, "fs1", "/srv/data/sample")
        dst = deploy.digest(runner, "bk1", "/restore/sample")
        restored = deploy.sh(runner, "bk1", "wc -l < /restore/live/counter").strip()
        now = deploy.sh(runner, "fs1", "wc -l < /srv/data/live/counter").strip()
        lines = deploy.sh(runner, "bk1", "cat /restore/live/counter").split()
        consistent = lines == [str(i) for i in range(len(lines))]
        leftovers = deploy.sh(runner, "fs1", "lvs --noheadings -o lv_name @sanoffload; "
                                             "sanoffload agent sessions --json | "
                                             "grep -v '^\\[\\]$' || true").strip()
        leftovers += deploy.sh(runner, "px1", "iscsiadm -m session 2>/dev/null; "
                                              "grep /run/sanoffload /proc/mounts || true").strip()
        same = src == dst
        print()
        print(f"  backup            {bid}")
        print(f"  repository        {where}")
        print(f"  duplicate         {summary['duplicate_kind']}, frozen by {summary['frozen_by']}"
              f" for {summary['freeze_window_ms']} ms")
        print(f"  archive           {summary['archive_bytes']} bytes (tar.zst), "
              f"{summary['member_count']} members")
        print(f"  throughput        {summary['throughput_mib_s']} MiB/s "
              f"({summary['stream_seconds']} s streaming, {summary['total_seconds']} s in all;"
              " QEMU software emulation)")
        v = summary["verification"]
        print(f"  verification      --verify {summary.get('verify')}: store decoded it "
              f"{v['detail'] or 'later'}: {v['status']}; the stream tar read from the duplicate: "
              f"{'yes' if summary['verified'] else 'not checked'}")
        print(f"  restore           {'identical to the source' if same else 'DIFFERS'} "
              f"({len(src)} entries: contents, modes, owners, times, links, xattrs, ACLs)")
        print(f"  writer's file     {restored} lines at the freeze ({now} now): "
              f"{'consistent' if consistent else 'TORN'}")
        print(f"  left behind       {leftovers or 'nothing'} (fs1: no snapshot/session; "
              "px1: no iSCSI session/mount)")
        print()
        ok = same and consistent and not leftovers and int(restored) < int(now)
        say("passed" if ok else "FAILED")
    finally:
        if args.keep:
            say("lab left up (scripts/lab ssh px1; scripts/lab down)")
        else:
            say("taking the lab down")
            vm.down(runner, quiet=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
