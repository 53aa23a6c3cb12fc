"""``scripts/ceph``: start, inspect and stop the test Ceph cluster (``python -m sanoceph``)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from sanoffload.errors import SanoffloadError

from .cluster import Cluster, up

DEFAULT_DIR = Path(os.environ.get("SANOCEPH_DIR", "/var/tmp/sanoffload-ceph"))

EXAMPLES = """examples:
  scripts/ceph up                                   # 1 memstore OSD, 1 gateway (~20 s)
  scripts/ceph up --osds 3 --bluestore --gateways 2 # the fault tier
  scripts/ceph status
  scripts/ceph down
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/ceph", description=__doc__, epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR,
                        help=f"the cluster's private directory (default {DEFAULT_DIR}, "
                             "or $SANOCEPH_DIR)")
    sub = parser.add_subparsers(dest="cmd", required=True)
    u = sub.add_parser("up", help="start a cluster; print endpoint, CA and users as JSON")
    u.add_argument("--osds", type=int, default=1)
    u.add_argument("--bluestore", action="store_true",
                   help="BlueStore OSDs on sparse files in --dir (default: memstore, in RAM)")
    u.add_argument("--gateways", type=int, default=1)
    u.add_argument("--replicas", type=int, help="pool size (default 1 for one OSD, else 2)")
    u.add_argument("--bind", default="127.0.0.1", help="the address every daemon listens on")
    sub.add_parser("down", help="stop the cluster's daemons (by PID) and remove --dir")
    sub.add_parser("status", help="the cluster's endpoint, users, live PIDs and RSS as JSON")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="ceph: %(message)s")
    if os.geteuid() != 0:
        print("ceph: must run as root (the daemons write where root may)", file=sys.stderr)
        return 2
    try:
        if args.cmd == "up":
            c = up(args.dir, osds=args.osds, gateways=args.gateways, bind=args.bind,
                   objectstore="bluestore" if args.bluestore else "memstore",
                   replicas=args.replicas)
            print(json.dumps(c.describe(), indent=2))
        elif args.cmd == "status":
            c = Cluster.load(args.dir)
            info = c.describe()
            info["rss"] = c.rss()
            print(json.dumps(info, indent=2))
            return 0 if len(info["pids"]) == len(c.daemons) else 1
        elif args.cmd == "down":
            c = Cluster.load(args.dir)
            started = time.monotonic()
            c.stop()
            logging.getLogger("ceph").info("stopped in %.1fs", time.monotonic() - started)
    except SanoffloadError as exc:
        print(f"ceph: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
