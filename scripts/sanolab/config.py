"""The lab's fixed layout: hosts, addresses, disks, and where things live."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PROVISION = REPO / "scripts" / "provision"

#: one lab per machine: the network namespace and the addresses are fixed
NETNS = "sanolab"
BRIDGE = "sanolab0"
SUBNET_PREFIX = "10.77.0"
GATEWAY = f"{SUBNET_PREFIX}.1"
NETMASK = "255.255.255.0"
IQN_DOMAIN = "iqn.2026-11.org.sanoffload.lab"

RELEASES = ("bookworm", "trixie")
DEFAULT_RELEASE = "bookworm"
#: each release's python3 and glibc: the wheels of compiled extras are chosen for them
PYTHON = {"bookworm": "3.11", "trixie": "3.13"}
GLIBC = {"bookworm": 36, "trixie": 41}


@dataclass(frozen=True)
class Host:
    name: str
    octet: int
    memory_mb: int
    disks_gb: tuple[int, ...]
    role: str

    @property
    def ip(self) -> str:
        return f"{SUBNET_PREFIX}.{self.octet}"

    @property
    def mac(self) -> str:
        return f"52:54:00:77:00:{self.octet:02x}"

    @property
    def tap(self) -> str:
        return f"sltap-{self.name}"

    @property
    def iqn(self) -> str:
        """The initiator name the guest gives itself at boot (common.sh)."""
        return f"{IQN_DOMAIN}:{self.name}"


HOSTS: dict[str, Host] = {h.name: h for h in (
    # the claims' storage system: two data disks for LVM, LIO target
    Host("st1", 10, 768, (4, 4), "storage"),
    # first server: its own disks for the co-located mode (two, so raid1 works)
    Host("fs1", 11, 768, (4, 4), "agent"),
    # second server: the backup proxy, open-iscsi initiator
    Host("px1", 12, 640, (), "proxy"),
    # backup server: a repository disk
    Host("bk1", 13, 512, (4,), "store"),
)}


def cache_dir() -> Path:
    """Built images, keyed by release and recipe hash (kept between runs)."""
    return Path(os.environ.get("SANOLAB_CACHE", "/var/cache/sanoffload-lab"))


def state_dir() -> Path:
    """The running lab's overlays, sockets, pid files and consoles."""
    return Path(os.environ.get("SANOLAB_STATE", "/var/tmp/sanoffload-lab"))
