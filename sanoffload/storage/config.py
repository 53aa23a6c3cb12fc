"""The storage node's configuration: ``/etc/sanoffload/storage.toml``.

Example (every key; at least one port and one client are required)::

    state_dir = "/var/lib/sanoffload/storage"
    lease_s = 86400               # a duplicate left this long is released even if held
    grace_s = 10                  # a client's dropped connection: release its duplicates after

    [ports.p1]                    # port ID -> the portal the proxies reach it by
    address = "10.77.0.10"
    port = 3260

    [snapshot]                    # classic snapshot COW size, as the agent's
    percent = 10
    min_mb = 64

    [thin]                        # refuse a thin snapshot above these pool usages
    max_data_percent = 80
    max_metadata_percent = 80

    [clients.fs1]                 # a first server, by the --client name of its forced command
    luns = ["naa.6001405a1b2c3d4e5f60718293a4b5c6"]   # identifiers it may duplicate
    proxies = ["iqn.2026-11.org.sanoffload.lab:px1"]  # initiators its duplicates may go to
    max_sessions = 4

A LUN is named by its identifier (what the first server's udev shows as the
disk's wwid, what LIO derives from the backstore's unit serial), never by a
backstore name or a device path: those differ between the two hosts. Checked
like agent.toml (:mod:`sanoffload.configfile`): root-owned, not writable by
others, unknown keys refused, every error naming the file and the key.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# the agent's checker: one set of rules (and messages) for IQNs, addresses, numbers, paths
from ..agent.config import (
    DEFAULT_GRACE_S,
    DEFAULT_PORT,
    Checker,
    SnapshotPolicy,
    ThinPolicy,
)
from ..configfile import parse_toml, read_text
from ..errors import AuthError, ConfigError

DEFAULT_PATH = "/etc/sanoffload/storage.toml"
DEFAULT_STATE_DIR = "/var/lib/sanoffload/storage"
#: a backup streams for hours; the connection's end (plus grace_s), not the lease,
#: releases a duplicate in the usual case: the lease is the backstop
DEFAULT_LEASE_S = 86400
DEFAULT_MAX_SESSIONS = 4
#: LIO's identifiers: NAA 6 (IEEE registered extended, 32 hex digits) or NAA 5 (16)
IDENTIFIER_RE = re.compile(r"naa\.(?:[0-9a-f]{16}|[0-9a-f]{32})")


@dataclass(frozen=True)
class Port:
    """A portal of this node (the target portal group's address) that proxies reach."""

    id: str
    address: str
    port: int = DEFAULT_PORT


@dataclass(frozen=True)
class StorageClient:
    """One first server: the LUNs it may duplicate and the proxies they may go to."""

    name: str
    luns: tuple[str, ...]
    proxies: tuple[str, ...]
    max_sessions: int = DEFAULT_MAX_SESSIONS


@dataclass(frozen=True)
class StorageConfig:
    path: str
    ports: Mapping[str, Port]
    clients: Mapping[str, StorageClient]
    state_dir: str = DEFAULT_STATE_DIR
    lease_s: int = DEFAULT_LEASE_S
    grace_s: float = DEFAULT_GRACE_S
    snapshot: SnapshotPolicy = field(default_factory=SnapshotPolicy)
    thin: ThinPolicy = field(default_factory=ThinPolicy)

    def client(self, name: str) -> StorageClient:
        """The client called ``name`` (the forced command's ``--client``); AuthError if none."""
        found = self.clients.get(name)
        if found is None:
            raise AuthError(f"client {name!r} is not in {self.path}",
                            hint=f"add a [clients.{name}] table")
        return found


_TOP_KEYS = {"state_dir", "lease_s", "grace_s", "ports", "snapshot", "thin", "clients"}


def from_dict(data: Mapping[str, Any], source: str = "<config>") -> StorageConfig:
    """Validate parsed TOML ``data``; ``source`` names the file in error messages."""
    c = Checker(source)
    top = c.table(dict(data), "", _TOP_KEYS)

    snapshot = c.snapshot_policy(top.get("snapshot"))
    thin = c.thin_policy(top.get("thin"))

    return StorageConfig(
        path=source, ports=_ports(c, top.get("ports")), clients=_clients(c, top.get("clients")),
        state_dir=c.abspath(top.get("state_dir", DEFAULT_STATE_DIR), "state_dir"),
        lease_s=c.integer(top.get("lease_s", DEFAULT_LEASE_S), "lease_s", 1),
        grace_s=c.number(top.get("grace_s", DEFAULT_GRACE_S), "grace_s", 3600),
        snapshot=snapshot, thin=thin)


def _ports(c: Checker, data: Any) -> dict[str, Port]:
    ports: dict[str, Port] = {}
    for port_id, key, body in c.named_tables(
            data, "ports", "port IDs",
            required="no [ports.ID] table: no duplicate could be exposed"):
        t = c.table(body, key, {"address", "port"})
        if "address" not in t:
            raise c.error(f"{key}.address", "required: the address LIO listens on for this "
                                            "port (a sysadmin must choose the interface)")
        ports[port_id] = Port(port_id, c.address(t["address"], f"{key}.address"),
                              c.integer(t.get("port", DEFAULT_PORT), f"{key}.port", 1, 65535))
    return ports


def _identifier(c: Checker, value: Any, key: str) -> str:
    if not isinstance(value, str) or not IDENTIFIER_RE.fullmatch(value):
        raise c.error(key, f"not a LUN identifier (naa. and 16 or 32 lowercase hex digits, as "
                           f"/sys/block/sdX/device/wwid shows it): {value!r}")
    return value


def _clients(c: Checker, data: Any) -> dict[str, StorageClient]:
    clients: dict[str, StorageClient] = {}
    owner: dict[str, str] = {}
    for name, key, body in c.named_tables(
            data, "clients", "client names",
            required="no [clients.NAME] table: no first server could use this node"):
        t = c.table(body, key, {"luns", "proxies", "max_sessions"})
        for required in ("luns", "proxies"):
            if required not in t:
                raise c.error(f"{key}.{required}", "required")
        luns = c.str_list(t["luns"], f"{key}.luns", lambda v, k: _identifier(c, v, k))
        proxies = c.str_list(t["proxies"], f"{key}.proxies", c.iqn)
        if not luns:
            raise c.error(f"{key}.luns", "must list at least one LUN identifier")
        if not proxies:
            raise c.error(f"{key}.proxies", "must list at least one proxy initiator")
        for lun in luns:
            if lun in owner:
                # two first servers duplicating one disk: whose freeze would the copy hold?
                raise c.error(f"{key}.luns", f"{lun} is already listed by client {owner[lun]!r}")
            owner[lun] = name
        clients[name] = StorageClient(
            name, luns, proxies,
            c.integer(t.get("max_sessions", DEFAULT_MAX_SESSIONS), f"{key}.max_sessions", 1))
    return clients


def parse(text: str, source: str = "<string>") -> StorageConfig:
    """Parse and validate TOML ``text``."""
    return from_dict(parse_toml(text, source), source)


def load(path: str | os.PathLike[str] = DEFAULT_PATH) -> StorageConfig:
    """Read (owner, mode, type checked), parse and validate the storage node's config file."""
    name = os.fspath(path)
    text = read_text(name, missing=ConfigError(f"{name}: no such file",
                                               hint="create it (see the README)"))
    assert text is not None
    return parse(text, name)
