"""What lab tests hold: run commands on the lab's hosts and check they are clean."""

from __future__ import annotations

import json
import shlex
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from sanoffload.runner import Result, Runner
from sanolab import config, deploy, vm

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

    def leftovers(self, *, deployed: Collection[str] = ("san",)) -> list[str]:
        """What a test left behind on any host: sessions, mounts, LIO objects, LVs.

        ``deployed`` names the deploys (:mod:`sanolab.deploy`) whose production
        objects are the site's, not leftovers: ``"san"`` (st1's sanvg/fs1db and
        fs1log, their backstores, SAN_TARGET; fs1's session to it), ``"volumes"``
        (fs1's datavg/data). Exactly those names are skipped: a ``sanoffload-*``
        LV beside them, or any other session of fs1's, is still reported. After
        an undeploy, pass ``deployed=()`` to check it removed them too.
        """
        san = "san" in deployed
        kept_lvs: set[tuple[str, ...]] = set()
        kept_targets: set[str] = set()
        kept_backstores: set[str] = set()
        if san:
            kept_lvs |= {("st1", deploy.SAN_VG, lun.lv) for lun in deploy.SAN_LUNS.values()}
            kept_targets.add(deploy.SAN_TARGET)
            kept_backstores |= {lun.lv for lun in deploy.SAN_LUNS.values()}
        if "volumes" in deployed:
            kept_lvs.add(("fs1", deploy.VG, "data"))
        found: list[str] = []
        for host in self.hosts:
            role = config.HOSTS[host].role
            if role in ("proxy", "agent"):
                sessions = self._sessions(host)
                if role == "agent" and san:
                    # fs1's production disks: its one session to st1's production target
                    sessions = [s for s in sessions
                                if s[1:] != (self.ip("st1"), deploy.SAN_TARGET)]
                if sessions:
                    found.append(f"{host}: iSCSI sessions: {[s[0] for s in sessions]}")
            if role == "proxy":
                mounts = self.sh(host, "grep -E ' /(run/sanoffload|mnt)/' /proc/mounts || true")
                if mounts.stdout.strip():
                    found.append(f"{host}: mounts: {mounts.stdout.strip()}")
            if role in ("storage", "agent"):
                inv = self.lio_inventory(host)
                inv = {"targets": [t for t in inv["targets"] if t not in kept_targets],
                       "backstores": [b for b in inv["backstores"] if b not in kept_backstores]}
                if inv["targets"] or inv["backstores"]:
                    found.append(f"{host}: LIO objects: {inv}")
                lvs = self.sh(host, ["lvs", "--noheadings", "-o", "vg_name,lv_name"], check=False)
                rows = [tuple(line.split()) for line in lvs.stdout.splitlines() if line.strip()]
                left = [f"{r[0]} {r[1]}" if len(r) == 2 else " ".join(r) for r in rows
                        if (host, *r) not in kept_lvs]
                if left:
                    found.append(f"{host}: LVs: {' '.join(left)}")
        return found

    def _sessions(self, host: str) -> list[tuple[str, str, str]]:
        """``(line, portal address, target)`` of each iSCSI session ``host`` has."""
        res = self.sh(host, ["iscsiadm", "-m", "session"], check=False)
        if res.returncode != 0:  # 21: no active sessions
            return []
        found = []
        for line in res.stdout.splitlines():
            # tcp: [1] 10.77.0.10:3260,1 iqn.2026-11.org.sanoffload.lab:st1.fs1 (non-flash)
            fields = line.split()
            if len(fields) >= 4:
                found.append((line.strip(), fields[2].rsplit(":", 1)[0], fields[3]))
            elif line.strip():
                found.append((line.strip(), "", ""))
        return found

def q(*args: str) -> str:
    return shlex.join(args)
