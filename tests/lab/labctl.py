"""What lab tests hold: run commands on the lab's hosts and check they are clean."""

from __future__ import annotations

import json
import shlex
from collections.abc import Sequence
from dataclasses import dataclass

from sanoffload.runner import Result, Runner
from sanolab import config, vm

ANY_CODE = dict.fromkeys(range(1, 256), "nonzero")

# Lists sanoffload-relevant LIO objects, for cleanliness checks.
LIO_INVENTORY = r"""
import json, rtslib_fb
root = rtslib_fb.RTSRoot()
print(json.dumps({
    "targets": [t.wwn for t in root.targets],
    "backstores": [s.name for s in root.storage_objects],
}))
"""


@dataclass
class Lab:
    runner: Runner
    release: str
    hosts: list[str]

    def sh(self, host: str, argv: Sequence[str] | str, *, check: bool = True,
           timeout: float = 300, input: bytes | str | None = None) -> Result:
        """Run on ``host``: a list is one argv; a string is a shell script."""
        cmd = ["sh", "-c", argv] if isinstance(argv, str) else list(argv)
        return vm.ssh(self.runner, host, cmd, timeout=timeout, input=input,
                      ok_codes=None if check else ANY_CODE)

    def py(self, host: str, code: str, *, check: bool = True, timeout: float = 300) -> Result:
        """Run a Python snippet on ``host`` (fed on stdin)."""
        return self.sh(host, ["python3", "-"], input=code, check=check, timeout=timeout)

    def reset(self, host: str) -> None:
        """Hard-reset ``host`` (data disks and root overlay survive, memory does not)."""
        vm.reset(self.runner, host)

    def iqn(self, host: str) -> str:
        return config.HOSTS[host].iqn

    def ip(self, host: str) -> str:
        return config.HOSTS[host].ip

    def lio_inventory(self, host: str) -> dict[str, list[str]]:
        inventory: dict[str, list[str]] = json.loads(self.py(host, LIO_INVENTORY).stdout)
        return inventory

    def leftovers(self) -> list[str]:
        """What a test left behind on any host: sessions, mounts, LIO objects, tagged LVs."""
        found: list[str] = []
        for host in self.hosts:
            role = config.HOSTS[host].role
            if role == "proxy":
                res = self.sh(host, ["iscsiadm", "-m", "session"], check=False)
                if res.returncode == 0 and res.stdout.strip():
                    found.append(f"{host}: iSCSI sessions: {res.stdout.strip()}")
                mounts = self.sh(host, "grep -E ' /(run/sanoffload|mnt)/' /proc/mounts || true")
                if mounts.stdout.strip():
                    found.append(f"{host}: mounts: {mounts.stdout.strip()}")
            if role in ("storage", "agent"):
                inv = self.lio_inventory(host)
                if inv["targets"] or inv["backstores"]:
                    found.append(f"{host}: LIO objects: {inv}")
                lvs = self.sh(host, ["lvs", "--noheadings", "-o", "vg_name,lv_name"], check=False)
                if lvs.stdout.strip():
                    found.append(f"{host}: LVs: {' '.join(lvs.stdout.split())}")
        return found


def q(*args: str) -> str:
    return shlex.join(args)
