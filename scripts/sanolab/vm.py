"""Boot, reach and stop the lab's VMs.

Network: one L2 segment, a Linux bridge inside a network namespace of the
lab's own (``sanolab``) with one tap per VM. The host's own namespace sees
none of the lab's traffic, and the VMs have no way out: there is no uplink.
QEMU runs under TCG (the machine's KVM cannot boot a stock kernel), one vCPU
per VM, with a per-VM qcow2 overlay on the cached read-only root image.

Control: ssh as root with the image's key, multiplexed through one
ControlMaster per VM, so a command costs a round trip, not a handshake.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import socket
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from sanoffload.errors import CommandError, SanoffloadError
from sanoffload.runner import Result, Runner

from . import ceph, config, image

log = logging.getLogger(__name__)

#: a hang, not a slow boot: four VMs under emulation on a busy 2-core host took 276 s
BOOT_DEADLINE = 600.0


@dataclass
class LabState:
    release: str
    hosts: list[str]
    image: str

    @staticmethod
    def path() -> Path:
        return config.state_dir() / "lab.json"

    @classmethod
    def load(cls) -> LabState | None:
        try:
            data = json.loads(cls.path().read_text())
        except (OSError, ValueError):
            return None
        return cls(**data)

    def save(self) -> None:
        self.path().parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path().with_suffix(".tmp")
        tmp.write_text(json.dumps(self.__dict__))
        tmp.replace(self.path())


def _ns(argv: Sequence[str]) -> list[str]:
    return ["ip", "netns", "exec", config.NETNS, *argv]


def _pidfile(host: str) -> Path:
    return config.state_dir() / f"{host}.pid"


def _pid(host: str) -> int | None:
    try:
        pid = int(_pidfile(host).read_text().strip())
    except (OSError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    return pid


def _control_path(host: str) -> Path:
    return config.state_dir() / f"ssh-{host}.sock"


def key_path(release: str | None = None) -> Path:
    state = LabState.load()
    rel = release or (state.release if state else config.DEFAULT_RELEASE)
    return image.image_dir(rel) / "id_ed25519"


def ssh_base(host: str, *, key: Path | None = None) -> list[str]:
    h = config.HOSTS[host]
    return ["ssh", "-i", str(key or key_path()), "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=10",
            "-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=4",
            "-o", f"ControlPath={_control_path(host)}", f"root@{h.ip}"]


# --------------------------------------------------------------------------
# network namespace
# --------------------------------------------------------------------------

def _setup_network(runner: Runner, hosts: Iterable[config.Host]) -> None:
    _teardown_network(runner)
    runner.run(["ip", "netns", "add", config.NETNS])
    runner.run(_ns(["ip", "link", "set", "lo", "up"]))
    runner.run(_ns(["ip", "link", "add", config.BRIDGE, "type", "bridge"]))
    runner.run(_ns(["ip", "addr", "add", f"{config.GATEWAY}/24", "dev", config.BRIDGE]))
    runner.run(_ns(["ip", "link", "set", config.BRIDGE, "up"]))
    for h in hosts:
        runner.run(_ns(["ip", "tuntap", "add", "dev", h.tap, "mode", "tap"]))
        runner.run(_ns(["ip", "link", "set", h.tap, "master", config.BRIDGE]))
        runner.run(_ns(["ip", "link", "set", h.tap, "up"]))


def _teardown_network(runner: Runner) -> None:
    # deleting the namespace deletes its bridge and taps with it
    if (Path("/run/netns") / config.NETNS).exists():
        runner.run(["ip", "netns", "del", config.NETNS])


# --------------------------------------------------------------------------
# up / down / status
# --------------------------------------------------------------------------

def up(runner: Runner, release: str, hosts: Sequence[str]) -> LabState:
    """Boot ``hosts`` of ``release`` (building the image if needed)."""
    unknown = [h for h in hosts if h not in config.HOSTS]
    if unknown:
        raise SystemExit(f"lab: unknown host(s) {', '.join(unknown)}; "
                         f"the lab has {', '.join(config.HOSTS)}")
    img = image.build(runner, release)
    down(runner, quiet=True)
    state_dir = config.state_dir()
    state_dir.mkdir(parents=True, exist_ok=True)
    state = LabState(release=release, hosts=list(hosts), image=str(img))
    state.save()
    chosen = [config.HOSTS[h] for h in hosts]
    _setup_network(runner, chosen)
    started = time.monotonic()
    for h in chosen:
        _boot(runner, h, img)
    for h in chosen:
        _wait_ssh(runner, h.name, img / "id_ed25519", started + BOOT_DEADLINE)
    log.info("lab up (%s: %s) in %.0fs", release, " ".join(hosts), time.monotonic() - started)
    return state


def _boot(runner: Runner, h: config.Host, img: Path) -> None:
    sd = config.state_dir()
    overlay = sd / f"{h.name}-root.qcow2"
    runner.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b",
                str(img / "root.img"), str(overlay)])
    cmdline = " ".join([
        "root=/dev/vda", "rw", "console=ttyS0", "quiet", "net.ifnames=0",
        f"systemd.hostname={h.name}",
        f"ip={h.ip}::{config.GATEWAY}:{config.NETMASK}:{h.name}:eth0:off",
        # fail a broken boot instead of dropping into an emergency shell forever
        "panic=10", "systemd.show_status=0",
    ])
    argv = [
        "qemu-system-x86_64", "-name", h.name, "-nodefaults", "-display", "none",
        "-machine", "pc", "-accel", "tcg,thread=multi,tb-size=256", "-cpu", "max",
        "-smp", "1", "-m", str(h.memory_mb),
        "-kernel", str(img / "vmlinuz"), "-initrd", str(img / "initrd.img"),
        "-append", cmdline,
        # fixed PCI slots keep the names stable: root is vda, data disks vdb, vdc...
        "-drive", f"file={overlay},if=none,id=root,format=qcow2,cache=unsafe,discard=unmap",
        "-device", "virtio-blk-pci,drive=root,addr=0x4",
    ]
    for i, size in enumerate(h.disks_gb, start=1):
        disk = sd / f"{h.name}-data{i}.raw"
        disk.unlink(missing_ok=True)
        with open(disk, "wb") as f:
            f.truncate(size * 1024**3)
        # a serial number makes the disk findable in the guest by /dev/disk/by-id
        argv += ["-drive", f"file={disk},if=none,id=d{i},format=raw,cache=unsafe,discard=unmap",
                 "-device", (f"virtio-blk-pci,drive=d{i},serial=sanolab-{h.name}-d{i},"
                             f"addr={0x4 + i:#x}")]
    argv += [
        "-netdev", f"tap,id=n0,ifname={h.tap},script=no,downscript=no",
        "-device", f"virtio-net-pci,netdev=n0,mac={h.mac},addr=0x3",
        "-serial", f"file:{sd / (h.name + '.console')}",
        "-qmp", f"unix:{sd / (h.name + '.qmp')},server=on,wait=off",
        "-pidfile", str(_pidfile(h.name)), "-daemonize",
    ]
    runner.run(_ns(argv), timeout=60)


def _wait_ssh(runner: Runner, host: str, key: Path, deadline: float) -> None:
    """Start the ssh ControlMaster once sshd answers (bounded by ``deadline``)."""
    h = config.HOSTS[host]
    while True:
        if _pid(host) is None:
            raise SystemExit(f"lab: {host}'s QEMU exited during boot; see "
                             f"{config.state_dir() / (host + '.console')}")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise SystemExit(f"lab: {host} did not answer ssh within {BOOT_DEADLINE:.0f}s; see "
                             f"{config.state_dir() / (host + '.console')}")
        try:
            # -f -N -M: authenticate, then background the master and return 0
            # the master must not hold the runner's pipes open: its stdio goes to a log
            base = ssh_base(host, key=key)
            log_file = config.state_dir() / f"ssh-{host}.log"
            master = [base[0], "-f", "-N", "-M", "-o", "ControlPersist=yes", "-E",
                      str(log_file), *base[1:]]
            runner.run(_ns(["sh", "-c", 'exec "$@" </dev/null >/dev/null 2>&1', "sh", *master]),
                       timeout=min(30.0, max(remaining, 1.0)))
            return
        except CommandError:
            # sshd not up yet: connection refused returns at once, so wait a little
            time.sleep(2)
        log.debug("waiting for %s (%s)", host, h.ip)


def _qmp(host: str, command: str) -> None:
    path = config.state_dir() / f"{host}.qmp"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(str(path))
        f = s.makefile("rwb")
        f.readline()  # greeting
        for cmd in ("qmp_capabilities", command):
            f.write(json.dumps({"execute": cmd}).encode() + b"\n")
            f.flush()
            f.readline()


def _qmp_quit(host: str) -> None:
    _qmp(host, "quit")


def reset(runner: Runner, host: str) -> None:
    """Hard-reset a VM (like the reset button: no shutdown) and wait until ssh answers."""
    state = LabState.load()
    if state is None or host not in state.hosts:
        raise SystemExit(f"lab: {host} is not up")
    cp = _control_path(host)
    runner.run(["ssh", "-o", f"ControlPath={cp}", "-O", "exit", "lab"], timeout=10,
               ok_codes={255: "no master"})
    cp.unlink(missing_ok=True)
    _qmp(host, "system_reset")
    _wait_ssh(runner, host, Path(state.image) / "id_ed25519", time.monotonic() + BOOT_DEADLINE)


def down(runner: Runner, *, quiet: bool = False) -> list[str]:
    """Stop every lab VM and remove overlays, disks, sockets and the namespace.

    Returns the problems it met (it goes on past each one).
    """
    problems: list[str] = []
    sd = config.state_dir()
    for host in config.HOSTS:
        cp = _control_path(host)
        if cp.exists():
            try:
                runner.run(["ssh", "-o", f"ControlPath={cp}", "-O", "exit", "lab"], timeout=10,
                           ok_codes={255: "no master"})
            except CommandError as exc:
                problems.append(f"{host}: ssh master: {exc}")
            cp.unlink(missing_ok=True)
        pid = _pid(host)
        if pid is not None:
            try:
                _qmp_quit(host)
            except OSError as exc:
                log.debug("%s: QMP quit failed (%s); killing", host, exc)
            deadline = time.monotonic() + 15
            while _pid(host) is not None and time.monotonic() < deadline:
                time.sleep(0.2)
            if _pid(host) is not None:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                time.sleep(0.5)
            if _pid(host) is not None:
                problems.append(f"{host}: QEMU pid {pid} would not stop")
    try:
        # its daemons live in the namespace: stopped before it goes
        ceph.down()
    except (SanoffloadError, OSError) as exc:
        problems.append(f"lab ceph: {exc}")
    try:
        _teardown_network(runner)
    except CommandError as exc:
        problems.append(f"network namespace: {exc}")
    if sd.exists():
        for p in sd.iterdir():
            if p.suffix in (".qcow2", ".raw", ".pid", ".qmp", ".sock", ".json", ".tmp", ".log"):
                p.unlink(missing_ok=True)
    if problems and not quiet:
        for problem in problems:
            log.error("%s", problem)
    return problems


def leftover_processes() -> list[int]:
    """PIDs of QEMU or ssh processes that belong to the lab (by its state dir)."""
    import psutil

    marker = str(config.state_dir())
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if marker in cmd and ("qemu-system" in cmd or cmd.startswith("ssh")):
            found.append(proc.info["pid"])
    return found


def status(runner: Runner) -> dict[str, dict[str, object]]:
    state = LabState.load()
    out: dict[str, dict[str, object]] = {}
    for host in config.HOSTS:
        pid = _pid(host)
        reachable = False
        if pid is not None and _control_path(host).exists():
            try:
                runner.run(["ssh", "-o", f"ControlPath={_control_path(host)}", "-O", "check",
                            "lab"], timeout=10)
                reachable = True
            except CommandError:
                pass
        out[host] = {"running": pid is not None, "pid": pid, "ssh": reachable,
                     "ip": config.HOSTS[host].ip,
                     "release": state.release if state and host in state.hosts else None}
    return out


def ssh(runner: Runner, host: str, argv: Sequence[str] | str, *, timeout: float = 300,
        input: bytes | str | None = None, ok_codes: dict[int, str] | None = None) -> Result:
    """Run a command on a lab host; a list is quoted for the remote shell."""
    if host not in config.HOSTS:
        raise SystemExit(f"lab: unknown host {host!r}")
    remote = argv if isinstance(argv, str) else shlex.join(argv)
    return runner.run(_ns(ssh_base(host) + ["--", remote]), timeout=timeout, input=input,
                      ok_codes=ok_codes)
