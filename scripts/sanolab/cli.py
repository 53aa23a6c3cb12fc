"""``scripts/lab``: build, boot, reach and stop the QEMU lab."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from sanoffload.errors import CommandError
from sanoffload.runner import CommandRunner

from . import config, image, sync, vm

log = logging.getLogger("lab")

USAGE_EXAMPLES = """examples:
  scripts/lab build --release trixie
  scripts/lab up                      # all four hosts, bookworm
  scripts/lab up --release trixie --hosts fs1,px1
  scripts/lab ssh st1 -- sanoffload doctor --role storage
  scripts/lab sync                    # install this tree's sanoffload in the VMs
  scripts/lab sync --hosts px1,bk1 --extra s3
  scripts/lab down
"""


def _hosts(arg: str | None) -> list[str]:
    return list(config.HOSTS) if not arg else [h.strip() for h in arg.split(",") if h.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/lab", description=__doc__,
                                     epilog=USAGE_EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build (or reuse) the cached root image")
    b.add_argument("--release", default=config.DEFAULT_RELEASE, choices=config.RELEASES)
    b.add_argument("--force", action="store_true", help="rebuild even if cached")
    u = sub.add_parser("up", help="boot the lab (builds the image first if needed)")
    u.add_argument("--release", default=os.environ.get("SANOLAB_RELEASE", config.DEFAULT_RELEASE),
                   choices=config.RELEASES)
    u.add_argument("--hosts", help="comma-separated subset of " + ",".join(config.HOSTS))
    u.add_argument("--no-sync", action="store_true", help="do not install sanoffload in the VMs")
    sub.add_parser("down", help="stop every VM, remove overlays, disks and the network")
    s = sub.add_parser("status", help="which VMs run and answer ssh")
    s.add_argument("--json", action="store_true")
    rs = sub.add_parser("reset", help="hard-reset a VM (no shutdown) and wait for it")
    rs.add_argument("host", choices=list(config.HOSTS))
    sy = sub.add_parser("sync", help="install this tree's sanoffload into the running VMs")
    sy.add_argument("--hosts")
    sy.add_argument("--extra", choices=sorted(sync.EXTRA_IMPORTS),
                    help="also install an extra's dependencies (s3: boto3, cryptography)")
    sh = sub.add_parser("ssh", help="run a command in a VM: scripts/lab ssh HOST -- CMD...")
    sh.add_argument("host", choices=list(config.HOSTS))
    sh.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="lab: %(message)s")
    if os.geteuid() != 0:
        print("lab: must run as root (network namespace, taps, mmdebstrap)", file=sys.stderr)
        return 2
    runner = CommandRunner(default_timeout=120)
    try:
        if args.cmd == "build":
            print(image.build(runner, args.release, force=args.force))
        elif args.cmd == "up":
            state = vm.up(runner, args.release, _hosts(args.hosts))
            if not args.no_sync:
                for host, version in sync.sync(runner, state.hosts).items():
                    log.info("%s: sanoffload %s", host, version)
        elif args.cmd == "down":
            return 1 if vm.down(runner) else 0
        elif args.cmd == "status":
            st = vm.status(runner)
            if args.json:
                print(json.dumps(st, indent=2))
            else:
                for host, info in st.items():
                    print(f"{host:4} {'running' if info['running'] else 'stopped':8} "
                          f"ssh={'yes' if info['ssh'] else 'no':3} {info['ip']} "
                          f"{info['release'] or ''}")
            return 0 if any(i["running"] for i in st.values()) else 3
        elif args.cmd == "reset":
            vm.reset(runner, args.host)
        elif args.cmd == "sync":
            loaded = vm.LabState.load()
            if loaded is None:
                print("lab: the lab is not up", file=sys.stderr)
                return 3
            chosen = _hosts(args.hosts) if args.hosts else loaded.hosts
            for host, version in sync.sync(runner, chosen).items():
                print(f"{host}: sanoffload {version}")
            if args.extra:
                for host, what in sync.sync_extra(runner, loaded.release, chosen,
                                                  args.extra).items():
                    print(f"{host}: {args.extra} extra {what}")
        elif args.cmd == "ssh":
            cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
            if not cmd:
                parser.error("ssh needs a command after --")
            res = vm.ssh(runner, args.host, cmd, timeout=3600,
                         ok_codes=dict.fromkeys(range(1, 256), "remote"),
                         input=None if sys.stdin.isatty() else sys.stdin.buffer.read())
            sys.stdout.write(res.stdout)
            sys.stderr.write(res.stderr)
            return res.returncode
    except CommandError as exc:
        print(f"lab: {exc}", file=sys.stderr)
        if exc.stderr:
            print(exc.stderr.rstrip(), file=sys.stderr)
        return 1
    return 0
