"""The agent's configuration: ``/etc/sanoffload/agent.toml``.

Example (every key; only ``portal.address`` and one client are required)::

    state_dir = "/var/lib/sanoffload"
    run_dir = "/run/sanoffload"
    freeze_deadline_s = 10        # longest a filesystem may stay frozen
    freeze = "auto"               # who inhibits writes for snapshots: auto | fsfreeze | lvm
    lease_s = 3600                # an export left unreleased this long is torn down
    grace_s = 10                  # a proxy's dropped connection: release its sessions after this
    thin_base_max_use = 80        # image backups: keep no thin base above this pool use (%)

    [portal]
    address = "10.77.0.11"        # required: the interface the proxies reach
    port = 3260

    [snapshot]                    # classic snapshot COW size
    percent = 10
    min_mb = 64

    [thin]                        # refuse a thin snapshot above these pool usages
    max_data_percent = 80
    max_metadata_percent = 80

    [hooks]
    pre_freeze = ["/usr/local/sbin/db-flush"]
    post_thaw = ["/usr/local/sbin/db-resume"]
    hold = ["/etc/sanoffload/hooks/mariadb-hold"]   # keep a lock across the freeze (READY...)
    hold_ready_s = 30             # how long each holding hook may take to say READY
    timeout_s = 60

    [storage_nodes.st1]          # SAN mode: a storage node serving this host's disks as LUNs
    ssh = "root@st1"              # its authorized_keys forces
                                  #   "sanoffload storage serve --stdio --client fs1"
    identity = "/root/.ssh/id_ed25519"   # optional: the key to offer
    timeout_s = 30                # each request's deadline (the freeze waits on 'duplicate')
    luns = ["naa.6001405a1b2c3d4e5f60718293a4b5c6"]  # optional with one node: what it serves

    [clients.px1]
    initiators = ["iqn.2026-11.org.sanoffload.lab:px1"]
    roots = ["/srv"]
    max_sessions = 1
    san_port = "p1"               # SAN mode: the storage node's port ID this proxy reaches

Every problem is a :class:`ConfigError` naming the file, the key and the
reason; unknown keys are refused (a typo must not silently fall back to a
default).
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ..channel.messages import MAX_HELD, check_identifier
from ..configfile import NAME_RULE, parse_toml, read_text, valid_name
from ..errors import AuthError, ConfigError, UsageError
from ..iqn import valid_iqn
from ..kinds import FreezeMode
from .hooks import DEFAULT_HOLD_READY_S, DEFAULT_HOOK_TIMEOUT, Hooks

DEFAULT_PATH = "/etc/sanoffload/agent.toml"
DEFAULT_STATE_DIR = "/var/lib/sanoffload"
DEFAULT_RUN_DIR = "/run/sanoffload"
DEFAULT_PORT = 3260
DEFAULT_FREEZE_DEADLINE_S = 10.0
#: a freeze longer than this stalls every writer of the filesystem for too long
MAX_FREEZE_DEADLINE_S = 300.0
DEFAULT_LEASE_S = 3600
DEFAULT_GRACE_S = 10.0
DEFAULT_SNAPSHOT_PERCENT = 10
DEFAULT_SNAPSHOT_MIN_MB = 64
DEFAULT_THIN_MAX_PERCENT = 80
#: above this data or metadata use (percent) of its pool, no thin base is kept
DEFAULT_THIN_BASE_MAX_USE = 80
DEFAULT_MAX_SESSIONS = 1
DEFAULT_STORAGE_TIMEOUT_S = 30.0
#: a storage node slower than this keeps the filesystem frozen too long anyway
MAX_STORAGE_TIMEOUT_S = 300.0
#: a holding hook that needs longer than this to take its lock keeps writers waiting too long
MAX_HOLD_READY_S = 600.0

T = TypeVar("T")
#: what ssh accepts as a destination here: no option, no space, no shell or ssh_config tricks
_SSH_DEST_RE = re.compile(r"(?:[a-z_][a-z0-9_.-]{0,31}@)?[A-Za-z0-9][A-Za-z0-9.:-]{0,252}")


@dataclass(frozen=True)
class Portal:
    """Where LIO listens for the proxies."""

    address: str
    port: int = DEFAULT_PORT


@dataclass(frozen=True)
class SnapshotPolicy:
    """COW size of a classic snapshot: ``percent`` of the origin, at least ``min_mb``."""

    percent: int = DEFAULT_SNAPSHOT_PERCENT
    min_mb: int = DEFAULT_SNAPSHOT_MIN_MB

    @property
    def min_bytes(self) -> int:
        return self.min_mb * 1024 * 1024


@dataclass(frozen=True)
class ThinPolicy:
    """A thin snapshot is refused while the pool is fuller than these."""

    max_data_percent: int = DEFAULT_THIN_MAX_PERCENT
    max_metadata_percent: int = DEFAULT_THIN_MAX_PERCENT


@dataclass(frozen=True)
class HooksConfig:
    pre_freeze: tuple[str, ...] = ()
    post_thaw: tuple[str, ...] = ()
    timeout_s: float = DEFAULT_HOOK_TIMEOUT
    #: holding hooks (see :mod:`sanoffload.agent.hooks`), in the order they start
    hold: tuple[str, ...] = ()
    hold_ready_s: float = DEFAULT_HOLD_READY_S

    def to_hooks(self) -> Hooks:
        """The :class:`~sanoffload.agent.hooks.Hooks` to run (checked again before each run)."""
        return Hooks.from_paths(self.pre_freeze, self.post_thaw, self.hold,
                                timeout=self.timeout_s, hold_ready_s=self.hold_ready_s)


@dataclass(frozen=True)
class Client:
    """One backup proxy: its initiator names and the paths it may back up."""

    name: str
    initiators: tuple[str, ...]
    roots: tuple[str, ...]
    max_sessions: int = DEFAULT_MAX_SESSIONS
    #: SAN mode: the storage node's port ID (storage.toml ``[ports.ID]``) this proxy reaches
    san_port: str | None = None


@dataclass(frozen=True)
class StorageNodeRef:
    """A storage node this agent asks for duplicates of its SAN disks (SAN mode)."""

    name: str
    #: the ssh destination (``host`` or ``user@host``)
    ssh: str
    identity: str | None = None
    #: each request's deadline: the filesystem stays frozen while ``duplicate`` runs
    timeout_s: float = DEFAULT_STORAGE_TIMEOUT_S
    #: the LUN identifiers this node serves (empty: every SAN disk, when it is the only node)
    luns: tuple[str, ...] = ()

    def ssh_options(self) -> tuple[str, ...]:
        return ("-i", self.identity, "-o", "IdentitiesOnly=yes") if self.identity else ()


@dataclass(frozen=True)
class Config:
    path: str
    portal: Portal
    clients: Mapping[str, Client]
    state_dir: str = DEFAULT_STATE_DIR
    run_dir: str = DEFAULT_RUN_DIR
    freeze_deadline_s: float = DEFAULT_FREEZE_DEADLINE_S
    freeze: FreezeMode = FreezeMode.AUTO
    lease_s: int = DEFAULT_LEASE_S
    grace_s: float = DEFAULT_GRACE_S
    snapshot: SnapshotPolicy = field(default_factory=SnapshotPolicy)
    thin: ThinPolicy = field(default_factory=ThinPolicy)
    hooks: HooksConfig = field(default_factory=HooksConfig)
    storage_nodes: Mapping[str, StorageNodeRef] = field(default_factory=dict)
    #: a thin pool fuller than this (data or metadata, percent) keeps no base: a base pins
    #: every block the volume rewrites until the next backup
    thin_base_max_use: int = DEFAULT_THIN_BASE_MAX_USE

    def storage_node_for(self, identifier: str) -> StorageNodeRef | None:
        """The storage node serving the LUN ``identifier``: the node listing it, else the one
        node that lists none; None when no node is configured."""
        nodes = list(self.storage_nodes.values())
        for node in nodes:
            if identifier in node.luns:
                return node
        unlisted = [n for n in nodes if not n.luns]
        return unlisted[0] if len(unlisted) == 1 and len(nodes) == 1 else None

    def client_for_initiator(self, iqn: str) -> Client:
        """The client that owns initiator ``iqn``; AuthError if none does.

        Compared exactly: the config only holds lowercase names, and an
        initiator presenting another spelling is not the one configured.
        """
        for client in self.clients.values():
            if iqn in client.initiators:
                return client
        raise AuthError(f"initiator {iqn!r} is not allowed: no client lists it")

    def client(self, name: str) -> Client:
        """The client called ``name`` (the forced command's ``--client``); AuthError if none."""
        found = self.clients.get(name)
        if found is None:
            raise AuthError(f"client {name!r} is not in {self.path}",
                            hint=f"add a [clients.{name}] table")
        return found


# --------------------------------------------------------------------------
# Validation helpers: each takes the dotted key for its error message
# --------------------------------------------------------------------------

class Checker:
    def __init__(self, source: str) -> None:
        self.source = source

    def error(self, key: str, reason: str) -> ConfigError:
        return ConfigError(f"{self.source}: {key}: {reason}")

    def table(self, data: Any, key: str, allowed: set[str]) -> dict[str, Any]:
        if not isinstance(data, dict):
            raise self.error(key, f"must be a table, not {type(data).__name__}")
        for name in data:
            if name not in allowed:
                full = f"{key}.{name}" if key else name
                raise self.error(full, f"unknown key (known: {', '.join(sorted(allowed))})")
        return data

    def integer(self, value: Any, key: str, lo: int, hi: int | None = None) -> int:
        # bool is an int in Python; "true" for a number is a mistake
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(key, f"must be an integer, not {value!r}")
        if value < lo or (hi is not None and value > hi):
            bounds = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
            raise self.error(key, f"must be {bounds}, not {value}")
        return value

    def number(self, value: Any, key: str, hi: float | None = None) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.error(key, f"must be a number of seconds, not {value!r}")
        if not value > 0 or (hi is not None and value > hi):
            limit = f" and at most {hi:g}" if hi is not None else ""
            raise self.error(key, f"must be greater than 0{limit}, not {value}")
        return float(value)

    def abspath(self, value: Any, key: str) -> str:
        if not isinstance(value, str) or not value:
            raise self.error(key, f"must be a path string, not {value!r}")
        if not os.path.isabs(value):
            raise self.error(key, f"must be an absolute path, not {value!r}")
        if ".." in value.split("/") or "\0" in value:
            raise self.error(key, f"must not contain '..' or NUL: {value!r}")
        return os.path.normpath(value)

    def str_list(self, value: Any, key: str, item: Callable[[Any, str], T]) -> tuple[T, ...]:
        if not isinstance(value, list):
            raise self.error(key, f"must be a list, not {value!r}")
        out = tuple(item(v, f"{key}[{i}]") for i, v in enumerate(value))
        seen: set[T] = set()
        for i, v in enumerate(out):
            if v in seen:
                raise self.error(f"{key}[{i}]", f"listed twice: {v!r}")
            seen.add(v)
        return out

    def iqn(self, value: Any, key: str) -> str:
        if not isinstance(value, str):
            raise self.error(key, f"must be an iSCSI name string, not {value!r}")
        if value != value.lower():
            raise self.error(key, f"iSCSI names are lowercase (RFC 3722): {value!r}")
        if not valid_iqn(value):
            raise self.error(key, f"not an iSCSI qualified name "
                                  f"(iqn.YYYY-MM.reversed.domain[:unique]): {value!r}")
        return value

    def root(self, value: Any, key: str) -> str:
        path = self.abspath(value, key)
        if path == "/":
            raise self.error(key, "'/' would allow every path; name the directories to back up")
        return path

    def named_tables(self, data: Any, what: str, rule: str, *, required: str | None = None,
                     ) -> Iterator[tuple[str, str, Any]]:
        """``(name, key, body)`` of each ``[what.NAME]`` table; ``required``: why at least one
        must be there (None: none is fine)."""
        if data is None or data == {}:
            if required is not None:
                raise self.error(what, required)
            return
        if not isinstance(data, dict):
            raise self.error(what, f"must be a table of [{what}.NAME], not "
                                   f"{type(data).__name__}")
        for name, body in data.items():
            key = f"{what}.{name}"
            if not valid_name(name):
                raise self.error(key, f"{rule} are {NAME_RULE}")
            yield name, key, body

    def snapshot_policy(self, data: Any) -> SnapshotPolicy:
        """The ``[snapshot]`` table (the agent's and a storage node's)."""
        t = self.table(data if data is not None else {}, "snapshot", {"percent", "min_mb"})
        return SnapshotPolicy(
            self.integer(t.get("percent", DEFAULT_SNAPSHOT_PERCENT), "snapshot.percent", 1, 100),
            self.integer(t.get("min_mb", DEFAULT_SNAPSHOT_MIN_MB), "snapshot.min_mb", 1))

    def thin_policy(self, data: Any) -> ThinPolicy:
        """The ``[thin]`` table (the agent's and a storage node's)."""
        t = self.table(data if data is not None else {}, "thin",
                       {"max_data_percent", "max_metadata_percent"})
        return ThinPolicy(
            self.integer(t.get("max_data_percent", DEFAULT_THIN_MAX_PERCENT),
                         "thin.max_data_percent", 1, 100),
            self.integer(t.get("max_metadata_percent", DEFAULT_THIN_MAX_PERCENT),
                         "thin.max_metadata_percent", 1, 100))

    def address(self, value: Any, key: str) -> str:
        if not isinstance(value, str):
            raise self.error(key, f"must be an IP address string, not {value!r}")
        try:
            addr = ipaddress.ip_address(value)
        except ValueError:
            raise self.error(key, f"not an IP address: {value!r}") from None
        if addr.is_unspecified:
            raise self.error(key, f"{value} listens on every interface; choose the address "
                                  "of the interface the proxies reach")
        return str(addr)


_TOP_KEYS = {"state_dir", "run_dir", "freeze_deadline_s", "freeze", "lease_s", "grace_s", "portal",
             "snapshot", "thin", "hooks", "clients", "storage_nodes", "thin_base_max_use"}
#: auto: fsfreeze where the kernel nests it with LVM's suspend (>= 6.6), else LVM's suspend
FREEZE_MODES: tuple[str, ...] = FreezeMode.values()


def from_dict(data: Mapping[str, Any], source: str = "<config>") -> Config:
    """Validate parsed TOML ``data``; ``source`` names the file in error messages."""
    c = Checker(source)
    top = c.table(dict(data), "", _TOP_KEYS)

    if "portal" not in top:
        raise c.error("portal.address", "required: the address LIO listens on (a sysadmin "
                                        "must choose the interface)")
    portal_t = c.table(top["portal"], "portal", {"address", "port"})
    if "address" not in portal_t:
        raise c.error("portal.address", "required: the address LIO listens on (a sysadmin "
                                        "must choose the interface)")
    portal = Portal(c.address(portal_t["address"], "portal.address"),
                    c.integer(portal_t.get("port", DEFAULT_PORT), "portal.port", 1, 65535))

    snapshot = c.snapshot_policy(top.get("snapshot"))
    thin = c.thin_policy(top.get("thin"))

    hooks_t = c.table(top.get("hooks", {}), "hooks",
                      {"pre_freeze", "post_thaw", "timeout_s", "hold", "hold_ready_s"})
    hold = c.str_list(hooks_t.get("hold", []), "hooks.hold", c.abspath)
    if len(hold) > MAX_HELD:
        # their outputs travel in one answer and are stored in one manifest
        raise c.error("hooks.hold", f"at most {MAX_HELD} holding hooks, not {len(hold)}")
    hooks = HooksConfig(
        c.str_list(hooks_t.get("pre_freeze", []), "hooks.pre_freeze", c.abspath),
        c.str_list(hooks_t.get("post_thaw", []), "hooks.post_thaw", c.abspath),
        c.number(hooks_t.get("timeout_s", DEFAULT_HOOK_TIMEOUT), "hooks.timeout_s"),
        hold,
        c.number(hooks_t.get("hold_ready_s", DEFAULT_HOLD_READY_S), "hooks.hold_ready_s",
                 MAX_HOLD_READY_S))

    clients = _clients(c, top.get("clients"))
    nodes = _storage_nodes(c, top.get("storage_nodes", {}))
    if nodes:
        for client in clients.values():
            if client.san_port is None:
                raise c.error(f"clients.{client.name}.san_port",
                              "required with storage_nodes: the port ID (storage.toml "
                              "[ports.ID]) through which this proxy reaches the storage node")
    try:
        freeze = FreezeMode.parse(top.get("freeze", FreezeMode.AUTO.value))
    except UsageError as exc:
        raise c.error("freeze", exc.message) from None

    return Config(
        path=source, portal=portal, clients=clients,
        state_dir=c.abspath(top.get("state_dir", DEFAULT_STATE_DIR), "state_dir"),
        run_dir=c.abspath(top.get("run_dir", DEFAULT_RUN_DIR), "run_dir"),
        freeze_deadline_s=c.number(top.get("freeze_deadline_s", DEFAULT_FREEZE_DEADLINE_S),
                                   "freeze_deadline_s", MAX_FREEZE_DEADLINE_S),
        freeze=freeze,
        lease_s=c.integer(top.get("lease_s", DEFAULT_LEASE_S), "lease_s", 1),
        grace_s=c.number(top.get("grace_s", DEFAULT_GRACE_S), "grace_s", 3600),
        snapshot=snapshot, thin=thin, hooks=hooks, storage_nodes=nodes,
        thin_base_max_use=c.integer(top.get("thin_base_max_use", DEFAULT_THIN_BASE_MAX_USE),
                                    "thin_base_max_use", 1, 100))


def _storage_nodes(c: Checker, data: Any) -> dict[str, StorageNodeRef]:
    nodes: dict[str, StorageNodeRef] = {}
    served: dict[str, str] = {}
    for name, key, body in c.named_tables(data, "storage_nodes", "storage node names"):
        t = c.table(body, key, {"ssh", "identity", "timeout_s", "luns"})
        dest = t.get("ssh")
        if not isinstance(dest, str) or not _SSH_DEST_RE.fullmatch(dest):
            raise c.error(f"{key}.ssh", f"required: an ssh destination (host or user@host), "
                                        f"not {dest!r}")

        def identifier(value: Any, k: str) -> str:
            try:
                return check_identifier(value if isinstance(value, str) else repr(value))
            except ValueError as exc:
                raise c.error(k, str(exc)) from None

        luns = c.str_list(t.get("luns", []), f"{key}.luns", identifier)
        for lun in luns:
            if lun in served:
                raise c.error(f"{key}.luns", f"{lun} is already served by {served[lun]!r}")
            served[lun] = name
        identity = t.get("identity")
        nodes[name] = StorageNodeRef(
            name, dest, None if identity is None else c.abspath(identity, f"{key}.identity"),
            c.number(t.get("timeout_s", DEFAULT_STORAGE_TIMEOUT_S), f"{key}.timeout_s",
                     MAX_STORAGE_TIMEOUT_S), luns)
    if len(nodes) > 1:
        bare = [n for n in nodes.values() if not n.luns]
        if bare:
            raise c.error(f"storage_nodes.{bare[0].name}.luns",
                          "required with more than one storage node: which LUNs it serves")
    return nodes


def _clients(c: Checker, data: Any) -> dict[str, Client]:
    clients: dict[str, Client] = {}
    owner: dict[str, str] = {}
    for name, key, body in c.named_tables(
            data, "clients", "client names",
            required="no [clients.NAME] table: no proxy could use this agent"):
        t = c.table(body, key, {"initiators", "roots", "max_sessions", "san_port"})
        for required in ("initiators", "roots"):
            if required not in t:
                raise c.error(f"{key}.{required}", "required")
        initiators = c.str_list(t["initiators"], f"{key}.initiators", c.iqn)
        roots = c.str_list(t["roots"], f"{key}.roots", c.root)
        if not initiators:
            raise c.error(f"{key}.initiators", "must list at least one initiator")
        if not roots:
            raise c.error(f"{key}.roots", "must list at least one root")
        for iqn in initiators:
            if iqn in owner:
                # one initiator, two clients: which roots would apply is ambiguous
                raise c.error(f"{key}.initiators",
                              f"{iqn} is already listed by client {owner[iqn]!r}")
            owner[iqn] = name
        san_port = t.get("san_port")
        if san_port is not None and not (isinstance(san_port, str) and valid_name(san_port)):
            raise c.error(f"{key}.san_port", f"port IDs are {NAME_RULE}, not {san_port!r}")
        clients[name] = Client(name, initiators, roots,
                               c.integer(t.get("max_sessions", DEFAULT_MAX_SESSIONS),
                                         f"{key}.max_sessions", 1), san_port)
    return clients


def parse(text: str, source: str = "<string>") -> Config:
    """Parse and validate TOML ``text``."""
    return from_dict(parse_toml(text, source), source)


def load(path: str | os.PathLike[str] = DEFAULT_PATH) -> Config:
    """Read, parse and validate the agent's config file."""
    name = os.fspath(path)
    text = read_text(name, missing=ConfigError(f"{name}: no such file",
                                               hint="create it (see the README)"))
    assert text is not None
    return parse(text, name)
