"""``sanoffload doctor``: is everything a host role needs present?

Each role (``agent``, ``proxy``, ``store``, ``storage``) needs a set of tools,
kernel features and Python modules. The set is not written here: each tool
wrapper declares its ``REQUIRES`` (:mod:`sanoffload.requirements`) and
:func:`requirements_for` collects them per role, so doctor asks for what the
code runs and nothing else. Every check says what it looked for,
what it found, and what would fail without it, so a missing piece is found
before a backup run trips over it half-way.

A role may also have *setup* checks: is this host configured for it, not
only equipped? A storage node's ``storage.toml`` must load, its ports must be
addresses of this host, its clients' LUNs must resolve to LVs here and its
state directory must be root's alone. A setup check that needs another
(``Need.after``) is left out while that one fails, and the failing one says so.

Where it looks is injectable: commands go through a
:class:`~sanoffload.runner.Runner`, files are read under a ``root`` prefix (a
fake sysfs/procfs tree in unit tests), Python modules are imported through
an ``importer`` callable, and this host's addresses and its LUN map come from
callables a test can replace.
"""

from __future__ import annotations

import importlib
import ipaddress
import os
import socket
import stat
from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Protocol, cast

from .channel import client
from .configfile import trusted_owners
from .errors import (
    CommandError,
    ConfigError,
    MissingDependencyError,
    RefusedError,
    SanoffloadError,
)
from .proxy import devices, mount
from .requirements import ROLES, Requirement
from .runner import Runner
from .store import mount as image_mount
from .text import printable
from .tools import findmnt, fsfreeze, iscsiadm, lio, losetup, lvm, tar, thin, zstd

if TYPE_CHECKING:
    from .agent.config import StorageNodeRef
    from .storage.config import StorageClient, StorageConfig
    from .storage.luns import Lun

#: short timeout: doctor must answer quickly even when a tool hangs
PROBE_TIMEOUT = 10.0


#: abstract socket iscsiadm talks to; iscsid (or systemd's iscsid.socket) listens on it
ISCSID_SOCKET = "@ISCSIADM_ABSTRACT_NAMESPACE"

#: a module by name: importlib.import_module, or a test's stand-in (a namespace of attributes)
Importer = Callable[[str], object]


class RemoteLike(Protocol):
    """What the agent's storage-node check asks of a RemoteController."""

    def ping(self) -> float: ...

    def close(self) -> None: ...


class LunResolver(Protocol):
    """What doctor asks of :class:`~sanoffload.storage.luns.LunMap`."""

    def resolve(self, identifier: str, client: StorageClient) -> Lun: ...


def local_addresses() -> set[str]:
    """Every IPv4/IPv6 address of this host's interfaces, in ipaddress's spelling."""
    import psutil  # here, not at the top: doctor must load even where psutil is broken

    found: set[str] = set()
    for snics in psutil.net_if_addrs().values():
        for snic in snics:
            if snic.family in (socket.AF_INET, socket.AF_INET6):
                # psutil gives link-local IPv6 with its zone ("fe80::1%eth0")
                found.add(str(ipaddress.ip_address(snic.address.split("%", 1)[0])))
    return found


def lio_lun_map(host: Host) -> LunResolver:
    """The storage node's own LunMap over LIO (rtslib-fb through the host's importer)."""
    from .storage.luns import LunMap

    try:
        rts = host.module("rtslib_fb")
    except Exception as exc:  # any import-time failure: the rtslib_fb check says more
        raise MissingDependencyError(f"rtslib_fb does not import: {exc}") from exc
    return LunMap(host.runner, lio.LioExporter(cast(ModuleType, rts)))


class Host:
    """Where the checks look: one runner, one filesystem root, one importer.

    ``config``: the role's configuration file (None: the role's default, e.g.
    /etc/sanoffload/storage.toml), a path as on the real host. ``addresses``
    and ``lun_map`` answer "which addresses does this host have" and "which LV
    is behind this LUN" (psutil and LIO by default).
    """

    def __init__(self, runner: Runner, *, root: str | os.PathLike[str] = "/",
                 importer: Importer | None = None, config: str | None = None,
                 addresses: Callable[[], Collection[str]] | None = None,
                 lun_map: Callable[[Host], LunResolver] | None = None,
                 remote: Callable[[StorageNodeRef], RemoteLike] | None = None) -> None:
        self.runner = runner
        self.root = Path(root)
        self.importer: Importer = importer or importlib.import_module
        self.config = config
        self.addresses: Callable[[], Collection[str]] = addresses or local_addresses
        self.lun_map: Callable[[Host], LunResolver] = lun_map or lio_lun_map
        self.remote: Callable[[StorageNodeRef], RemoteLike] = remote or self._ssh_remote
        self._storage: StorageConfig | ConfigError | None = None

    def path(self, path: str) -> Path:
        """``path`` (absolute, as on the real host) under this host's root."""
        return self.root / path.lstrip("/")

    def exists(self, path: str) -> bool:
        return self.path(path).exists()

    def read(self, path: str) -> str | None:
        """Text of ``path``, or None when it is absent or unreadable."""
        try:
            return self.path(path).read_text(errors="replace")
        except OSError:
            return None

    def first_existing(self, paths: Sequence[str]) -> str | None:
        return next((p for p in paths if self.exists(p)), None)

    def which(self, tool: str) -> str | None:
        return self.runner.which(tool)

    def module(self, name: str) -> object:
        return self.importer(name)

    def _ssh_remote(self, ref: StorageNodeRef) -> RemoteLike:
        from .agent.remote import RemoteController

        return RemoteController.over_ssh(self.runner, ref)

    def storage_config_path(self) -> str:
        """storage.toml as on the real host (a relative --config is taken from the cwd)."""
        from .storage.config import DEFAULT_PATH

        return os.path.abspath(self.config or DEFAULT_PATH)

    def storage_config(self) -> StorageConfig:
        """The storage node's configuration, read once (a ConfigError is kept and raised again)."""
        if self._storage is None:
            from .storage import config as storage_config

            path = self.path(self.storage_config_path())
            try:
                self._storage = storage_config.load(path)
            except ConfigError as exc:
                self._storage = exc
        if isinstance(self._storage, ConfigError):
            raise self._storage
        return self._storage


@dataclass(frozen=True)
class Check:
    """The outcome of one check on one host."""

    name: str
    what: str
    present: bool
    detail: str
    fails_without: str
    optional: bool = False

    @property
    def status(self) -> str:
        if self.present:
            return "ok"
        return "warn" if self.optional else "missing"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "status": self.status}


@dataclass(frozen=True)
class Report:
    """All checks for one role; ``ok`` only when every required one is present."""

    role: str
    checks: tuple[Check, ...]

    @property
    def missing(self) -> list[str]:
        return [c.name for c in self.checks if not c.present and not c.optional]

    @property
    def warnings(self) -> list[str]:
        return [c.name for c in self.checks if not c.present and c.optional]

    @property
    def ok(self) -> bool:
        return not self.missing

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else MissingDependencyError.exit_code

    def check(self, name: str) -> Check:
        for c in self.checks:
            if c.name == name:
                return c
        raise KeyError(name)

    def error(self) -> MissingDependencyError | None:
        """The error the CLI raises for this report (None when all is well)."""
        if self.ok:
            return None
        return MissingDependencyError(
            f"role {self.role} is missing: {', '.join(self.missing)}",
            hint="the report says what fails without each one")

    def to_dict(self) -> dict[str, Any]:
        return {"role": self.role, "ok": self.ok, "exit_code": self.exit_code,
                "missing": self.missing, "warnings": self.warnings,
                "checks": [c.to_dict() for c in self.checks]}


# --------------------------------------------------------------------------
# Probes: each returns (present, detail)
# --------------------------------------------------------------------------

Probe = Callable[[Host], tuple[bool, str]]


def tools(*names: str) -> Probe:
    """All of ``names`` are executables on the runner's PATH."""

    def probe(host: Host) -> tuple[bool, str]:
        found = {n: host.which(n) for n in names}
        absent = [n for n, p in found.items() if p is None]
        if absent:
            return False, f"not found on PATH: {', '.join(absent)}"
        return True, ", ".join(str(p) for p in found.values())

    return probe


def gnu_tar(host: Host) -> tuple[bool, str]:
    """tar exists and is GNU tar (busybox/bsdtar differ in --xattrs, --sparse, --numeric-owner)."""
    if host.which("tar") is None:
        return False, "not found on PATH: tar"
    try:
        res = host.runner.run(["tar", "--version"], timeout=PROBE_TIMEOUT)
    except CommandError as exc:
        return False, f"tar --version failed: {exc}"
    first = res.stdout.strip().splitlines()[0] if res.stdout.strip() else "no version output"
    if "GNU tar" not in first:
        return False, f"not GNU tar: {first}"
    return True, first


def _kernel_module(host: Host, module: str, markers: Sequence[str]) -> tuple[bool, str]:
    """Present when a sysfs marker exists; otherwise ask ``modprobe -n`` (a dry run)."""
    paths = [*markers, f"/sys/module/{module}"]
    hit = host.first_existing(paths)
    if hit:
        return True, f"{hit} exists"
    where = f"{paths[0]} absent" if len(paths) == 1 else f"none of {', '.join(paths)} exists"
    if host.which("modprobe") is None:
        return False, f"{where}; no modprobe to look for a loadable module"
    try:
        res = host.runner.run(["modprobe", "-n", "-q", module], timeout=PROBE_TIMEOUT,
                              ok_codes={1: "no such module"})
    except CommandError as exc:
        return False, f"{where}; modprobe -n {module} failed: {exc}"
    if res.ok:
        return True, f"{module} is available as a module (not loaded yet: modprobe {module})"
    return False, f"{where}; modprobe finds no module {module}"


def device_mapper(host: Host) -> tuple[bool, str]:
    """The kernel device-mapper driver, not only the dmsetup tool."""
    hit = host.first_existing(["/sys/class/misc/device-mapper"])
    if hit:
        return True, f"{hit} exists"
    misc = host.read("/proc/misc") or ""
    if any(line.split()[1:] == ["device-mapper"] for line in misc.splitlines()):
        return True, "device-mapper listed in /proc/misc"
    if host.which("dmsetup") is not None:
        # dmsetup opens /dev/mapper/control: the authoritative answer, and a stale
        # control node (containers, copied /dev) cannot fool it
        try:
            res = host.runner.run(["dmsetup", "version"], timeout=PROBE_TIMEOUT,
                                  ok_codes={1: "no kernel driver"})
        except CommandError as exc:
            return False, f"dmsetup version failed: {exc}"
        for line in res.stdout.splitlines():
            if line.startswith("Driver version:"):
                return True, line.strip()
        return False, ("no kernel driver: /sys/class/misc/device-mapper absent and "
                       "'dmsetup version' reports no driver (load dm_mod or use a kernel "
                       "with CONFIG_BLK_DEV_DM)")
    if host.exists("/dev/mapper/control"):
        return True, "/dev/mapper/control exists (dmsetup not installed to confirm)"
    return False, ("no kernel driver: /sys/class/misc/device-mapper and /dev/mapper/control "
                   "absent (load dm_mod or use a kernel with CONFIG_BLK_DEV_DM)")


def _mounted(host: Host, fstype: str, mountpoint: str) -> bool:
    for line in (host.read("/proc/mounts") or "").splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[1] == mountpoint and fields[2] == fstype:
            return True
    return False


def configfs(host: Host) -> tuple[bool, str]:
    """configfs mounted at /sys/kernel/config (LIO is configured through it)."""
    if _mounted(host, "configfs", "/sys/kernel/config"):
        return True, "configfs mounted at /sys/kernel/config"
    if host.exists("/sys/kernel/config/target"):
        return True, "/sys/kernel/config/target exists"
    known = host.read("/proc/filesystems") or ""
    if not any(line.split()[-1:] == ["configfs"] for line in known.splitlines()):
        return False, "kernel has no configfs (CONFIG_CONFIGFS_FS) or it is not loaded"
    return False, ("not mounted at /sys/kernel/config "
                   "(mount -t configfs configfs /sys/kernel/config)")


def lio_core(host: Host) -> tuple[bool, str]:
    """LIO's target core: /sys/kernel/config/target appears once target_core_mod is loaded."""
    if host.exists("/sys/kernel/config/target"):
        version = (host.read("/sys/kernel/config/target/version") or "").strip()
        return True, version.splitlines()[0] if version else "/sys/kernel/config/target exists"
    if host.exists("/sys/module/target_core_mod"):
        return False, ("target_core_mod is loaded but /sys/kernel/config/target is absent: "
                       "mount configfs at /sys/kernel/config")
    loadable, detail = _kernel_module(host, "target_core_mod", [])
    if loadable:
        # rtslib-fb loads target_core_mod on first use, as it does iscsi_target_mod
        return True, detail
    return False, (f"/sys/kernel/config/target absent; {detail} "
                   "(the kernel needs CONFIG_TARGET_CORE)")


def lio_iscsi(host: Host) -> tuple[bool, str]:
    """LIO's iSCSI fabric (rtslib loads it on first use, so 'available' is enough)."""
    return _kernel_module(host, "iscsi_target_mod", ["/sys/kernel/config/target/iscsi"])


def scsi(host: Host) -> tuple[bool, str]:
    """The kernel SCSI layer (LIO's target core and the iSCSI initiator build on it)."""
    return _kernel_module(host, "scsi_mod", ["/sys/bus/scsi", "/sys/class/scsi_host"])


def iscsi_tcp(host: Host) -> tuple[bool, str]:
    """The initiator's TCP transport."""
    return _kernel_module(host, "iscsi_tcp", ["/sys/class/iscsi_transport/tcp"])


def iscsid(host: Host) -> tuple[bool, str]:
    """iscsid running, or its socket held by systemd (iscsid.socket) so iscsiadm starts it."""
    unix = host.read("/proc/net/unix") or ""
    if any(line.split()[-1:] == [ISCSID_SOCKET] for line in unix.splitlines()):
        return True, f"{ISCSID_SOCKET} is listening (iscsid running or socket-activated)"
    proc = host.path("/proc")
    try:
        pids = [p for p in proc.iterdir() if p.name.isdigit()]
    except OSError:
        pids = []
    for pid in pids:
        if host.read(f"/proc/{pid.name}/comm") == "iscsid\n":
            return True, f"iscsid running (pid {pid.name})"
    return False, ("iscsid not running and nothing listens on "
                   f"{ISCSID_SOCKET} (systemctl enable --now iscsid.socket)")


def udev(host: Host) -> tuple[bool, str]:
    """udevadm installed and udevd running (waiting for devices needs both)."""
    tool = host.which("udevadm")
    running = host.exists("/run/udev/control")
    if tool and running:
        return True, f"{tool}; udevd running (/run/udev/control)"
    problems = []
    if not tool:
        problems.append("udevadm not found on PATH")
    if not running:
        problems.append("udevd not running (/run/udev/control absent)")
    return False, "; ".join(problems)


def python_module(name: str, smoke: Callable[[Any], object] | None = None) -> Probe:
    """``name`` imports (and ``smoke(module)`` works, when given)."""

    def probe(host: Host) -> tuple[bool, str]:
        try:
            mod = host.module(name)
            if smoke is not None:
                smoke(mod)
        except Exception as exc:  # any import-time failure means "not usable"
            return False, f"{type(exc).__name__}: {exc}"
        version = getattr(mod, "__version__", None)
        where = getattr(mod, "__file__", None) or "built in"
        return True, f"{name} {version} ({where})" if version else f"{name} ({where})"

    return probe


def _pyudev_smoke(mod: Any) -> object:
    # pyudev imports without libudev; creating a Context is what loads it
    return mod.Context()


# --------------------------------------------------------------------------
# Storage node setup: is this host configured as the storage.toml says?
# --------------------------------------------------------------------------

def storage_toml(host: Host) -> tuple[bool, str]:
    """storage.toml reads (root-owned, not group/world-writable) and validates."""
    path = host.storage_config_path()
    try:
        cfg = host.storage_config()
    except ConfigError as exc:
        # the message quotes the file's own values: shown escaped, never obeyed
        return False, printable(str(exc))
    luns = sum(len(c.luns) for c in cfg.clients.values())
    return True, printable(f"{path}: {len(cfg.ports)} port(s) ({', '.join(cfg.ports)}), "
                           f"{len(cfg.clients)} client(s) ({', '.join(cfg.clients)}), "
                           f"{luns} LUN(s)")


def agent_storage_nodes(host: Host) -> tuple[bool, str]:
    """SAN mode: each storage node in agent.toml answers on its channel (hello, ping).

    Without agent.toml (not deployed yet) or without ``[storage_nodes]``
    (co-located mode) there is nothing to reach: the check passes and says so.
    """
    from .agent import config as agent_config

    path = os.path.abspath(host.config or agent_config.DEFAULT_PATH)
    if not host.exists(path):
        return True, printable(f"{path} absent: no storage node to reach")
    try:
        cfg = agent_config.load(host.path(path))
    except ConfigError as exc:
        return False, printable(str(exc))
    if not cfg.storage_nodes:
        return True, "none configured (co-located mode)"
    answered, failed = [], []
    for ref in cfg.storage_nodes.values():
        ctl = host.remote(ref)
        try:
            ctl.ping()
            answered.append(f"{ref.name} ({ref.ssh})")
        except SanoffloadError as exc:
            failed.append(f"{ref.name} ({ref.ssh}): {exc.message}")
        finally:
            ctl.close()
    if failed:
        return False, printable("; ".join(failed))
    return True, printable("answered: " + ", ".join(answered))


def storage_ports(host: Host) -> tuple[bool, str]:
    """Every port's address is one of this host's (LIO can listen only there)."""
    cfg = host.storage_config()
    here = set(host.addresses())
    absent = [p for p in cfg.ports.values() if p.address not in here]
    if absent:
        wrong = "; ".join(f"port {p.id}: {p.address} is not an address of this host"
                          for p in absent)
        return False, printable(f"{wrong} (this host has {', '.join(sorted(here)) or 'none'})")
    return True, printable(", ".join(f"{p.id} {p.address}:{p.port}" for p in cfg.ports.values()))


def storage_luns(host: Host) -> tuple[bool, str]:
    """Every client's LUN identifier is presented by a block backstore on an LV here."""
    cfg = host.storage_config()
    found: list[str] = []
    refused: list[str] = []
    try:
        luns = host.lun_map(host)
        for client in cfg.clients.values():
            for identifier in client.luns:
                try:
                    lun = luns.resolve(identifier, client)
                except RefusedError as exc:
                    # the map's reason (a disk, a file, no backstore, two backstores)
                    refused.append(f"{client.name}: {exc.message}")
                else:
                    found.append(f"{identifier} -> {lun.lv.vg}/{lun.lv.name}")
    except MissingDependencyError as exc:  # no rtslib-fb, or LIO not loaded
        return False, f"cannot look: {printable(exc.message)}"
    if refused:
        return False, printable("; ".join(refused))
    return True, printable(", ".join(found))


def _unsafe_dir(st: os.stat_result) -> str | None:
    """Why a directory that decides what cleanup removes is not root's alone (None: it is)."""
    if st.st_uid not in trusted_owners():
        return f"owned by uid {st.st_uid}, not root"
    if st.st_mode & 0o022:
        return f"group- or world-writable (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def storage_state_dir(host: Host) -> tuple[bool, str]:
    """state_dir is a 0700 directory of root's, or can be made as one (doctor makes nothing)."""
    state_dir = host.storage_config().state_dir
    shown = printable(state_dir)
    try:
        st = os.stat(host.path(state_dir))
    except FileNotFoundError:
        return _state_dir_can_be_made(host, state_dir)
    except OSError as exc:
        return False, f"{shown}: cannot examine: {exc.strerror or exc}"
    if not stat.S_ISDIR(st.st_mode):
        return False, f"{shown}: exists and is not a directory"
    # the journal there names what cleanup removes: whoever can write it steers root
    why = _unsafe_dir(st)
    if why is None and st.st_mode & 0o077:
        why = f"mode {stat.S_IMODE(st.st_mode):04o}, not 0700"
    if why is not None:
        return False, f"{shown}: {why} (chown root: {shown} && chmod 0700 {shown})"
    return True, f"{shown} (root's, mode {stat.S_IMODE(st.st_mode):04o})"


def _state_dir_can_be_made(host: Host, state_dir: str) -> tuple[bool, str]:
    shown = printable(state_dir)
    parent = os.path.dirname(state_dir)
    while not host.path(parent).exists() and parent != os.path.dirname(parent):
        parent = os.path.dirname(parent)
    where = printable(parent)
    try:
        st = os.stat(host.path(parent))
    except OSError as exc:
        return False, f"{shown} absent; {where}: cannot examine: {exc.strerror or exc}"
    if not stat.S_ISDIR(st.st_mode):
        return False, f"{shown} absent and {where} is not a directory"
    why = _unsafe_dir(st)
    if why is not None:
        # someone else could make state_dir first, and the node would take it for its own
        return False, f"{shown} absent and {where} is {why}: make {shown} (0700) by hand"
    if not os.access(host.path(parent), os.W_OK | os.X_OK):
        return False, f"{shown} absent and {where} is not writable: make it as root"
    return True, f"{shown} absent; the first request makes it (mode 0700) in {where}"


# --------------------------------------------------------------------------
# What each role needs: collected from the wrappers' declarations
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class Need:
    """One requirement of a role: a probe plus what breaks without it."""

    name: str
    what: str
    probe: Probe
    fails_without: str
    optional: bool = False
    #: the check this one builds on: while that one fails, this one is left out
    after: str | None = None


#: the modules that declare REQUIRES (see sanoffload/requirements.py): each wrapper in
#: tools/, and the proxy's and the channel's modules that run a tool or use a library
DECLARING_MODULES: tuple[ModuleType, ...] = (lvm, fsfreeze, findmnt, lio, iscsiadm, tar, zstd,
                                             mount, devices, client, thin, losetup,
                                             image_mount)

#: needs no module of ours runs, so they are needs of the host, declared here: sshd runs
#: the forced commands (``store serve``; ``storage serve``, the storage node's only way
#: in); LVM runs thin_check whenever it activates a thin pool (lvm.conf's
#: thin_check_executable). thin_delta is not asked of a storage node: no code of the
#: node runs it (the agent does, for incremental images of its own thin volumes).
HOST_SERVICES: tuple[Requirement, ...] = (
    Requirement("sshd", "OpenSSH server", roles=("storage",), optional_for=("store",),
                fails_without="first servers cannot reach storage serve, proxies cannot push "
                              "archives (the control channel is ssh)"),
    Requirement("thin_check", "thin-provisioning-tools (thin_check, run by LVM)", roles=(),
                optional_for=("storage",),
                fails_without="LVM cannot activate a thin pool (thin LUNs and their thin "
                              "snapshots) after a reboot",
                executables=("thin_check",)),
)

#: what a role's configuration must give on this host, after the tools and features
SETUP: dict[str, tuple[Need, ...]] = {
    "agent": (
        Need("storage nodes", "SAN mode: each storage node in agent.toml answers (ssh, "
             "storage serve)", agent_storage_nodes,
             "a backup of a path on that node's LUNs fails at its freeze"),
    ),
    "storage": (
        Need("storage.toml", "the storage node's configuration (root's, valid)", storage_toml,
             "storage serve refuses every first server and storage cleanup cannot run"),
        Need("ports", "each port's address is an address of this host", storage_ports,
             "LIO cannot listen on that portal: exposing a duplicate there fails",
             after="storage.toml"),
        Need("luns", "each client's LUN identifiers resolve to an LV here", storage_luns,
             "a first server's duplicate request for that LUN is refused",
             after="storage.toml"),
        Need("state_dir", "state_dir is root's alone (mode 0700) or can be made so",
             storage_state_dir,
             "no journal: nothing can be duplicated, and cleanup cannot find what a crash left",
             after="storage.toml"),
    ),
}

#: kernel and system features: what doctor calls each, its probe, what fails without it
KERNEL: dict[str, tuple[str, Probe, str]] = {
    "device-mapper": ("kernel device-mapper driver", device_mapper,
                      "LVM can make no snapshot or split, nor activate volumes at all"),
    "configfs": ("configfs mounted at /sys/kernel/config", configfs,
                 "LIO cannot be configured, so nothing can be exported over iSCSI"),
    "LIO": ("LIO target core (target_core_mod, /sys/kernel/config/target)", lio_core,
            "the duplicate cannot be exported as an iSCSI target"),
    "iscsi_target_mod": ("LIO iSCSI fabric module", lio_iscsi,
                         "LIO cannot create iSCSI targets or portals"),
    "SCSI": ("kernel SCSI layer (/sys/bus/scsi or /sys/class/scsi_host)", scsi,
             "LIO's target core cannot load, and no disk appears for an iSCSI LUN"),
    "iscsi_tcp": ("kernel iSCSI/TCP initiator transport", iscsi_tcp,
                  "iscsiadm login fails with 'transport not loaded'"),
    "iscsid": ("open-iscsi daemon (running or socket-activated)", iscsid,
               "iscsiadm logins fail: iscsid does the session work"),
    "udev": ("udevadm and a running udevd", udev,
             "cannot wait for the LUN's block device and its by-path link"),
}

#: executables whose mere presence is not enough
_EXECUTABLE_PROBES: dict[str, Probe] = {"tar": gnu_tar}
#: Python modules that import without what they wrap
_PYTHON_SMOKES: dict[str, Callable[[Any], object]] = {"pyudev": _pyudev_smoke}


def declared() -> tuple[Requirement, ...]:
    """Every requirement: the modules' REQUIRES, then :data:`HOST_SERVICES`."""
    out: list[Requirement] = []
    for module in DECLARING_MODULES:
        out += module.REQUIRES
    return (*out, *HOST_SERVICES)


def requirements_for(role: str,
                     requirements: Sequence[Requirement] | None = None) -> tuple[Need, ...]:
    """The checks ``role`` needs, in declaration order, each once."""
    needs: dict[str, Need] = {}
    for req in declared() if requirements is None else requirements:
        if role not in req.roles and role not in req.optional_for:
            continue
        optional = role in req.optional_for
        found: list[Need] = []
        if req.executables or not (req.python or req.kernel):
            probe = _EXECUTABLE_PROBES.get(req.name) or tools(*(req.executables or (req.name,)))
            found.append(Need(req.name, req.what, probe, req.fails_without, optional))
        for mod in req.python:
            what = req.what if not req.executables else f"Python module {mod}"
            found.append(Need(mod, what, python_module(mod, _PYTHON_SMOKES.get(mod)),
                              req.fails_without, optional))
        for feature in req.kernel:
            what, probe, fails = KERNEL[feature]
            found.append(Need(feature, what, probe, fails, optional))
        for need in found:
            needs.setdefault(need.name, need)
    return tuple(needs.values())


REQUIREMENTS: dict[str, tuple[Need, ...]] = {
    role: (*requirements_for(role), *SETUP.get(role, ())) for role in ROLES}


def run_checks(role: str, host: Host) -> Report:
    """Run every check ``role`` needs on ``host``."""
    if role not in REQUIREMENTS:
        raise ValueError(f"unknown role {role!r}; expected one of {', '.join(ROLES)}")
    checks: list[Check] = []
    failed: set[str] = set()
    for need in REQUIREMENTS[role]:
        if need.after is not None and need.after in failed:
            failed.add(need.name)  # and whatever builds on it
            continue
        try:
            present, detail = need.probe(host)
        except (OSError, CommandError) as exc:
            # a probe that cannot even look counts as missing, with the reason shown;
            # Interrupted and other errors propagate so a signal still stops doctor
            present, detail = False, f"check failed: {exc}"
        if not present:
            failed.add(need.name)
            waiting = [n.name for n in REQUIREMENTS[role] if n.after == need.name]
            if waiting:
                detail += f" (checked once this passes: {', '.join(waiting)})"
        checks.append(Check(need.name, need.what, present, detail, need.fails_without,
                            need.optional))
    return Report(role, tuple(checks))
