"""Start a real Ceph cluster (one mon, N OSDs, M RADOS gateways) by PID, as ``src/vstart.sh`` does.

No systemd, no containers, no ceph-mgr: RGW's data path is librados to the
mon and the OSDs, and pool creation is a mon command, so a mgr would only add
PG statistics (and ~30 packages). Auth is off (``auth * required = none``):
the cluster listens on one address we chose (loopback by default) and lives
in a private 0700 directory that ``stop()`` removes.

Two shapes:

* the test tier: ``up(dir)``: one memstore OSD (RAM, nothing on disk), pool
  size 1, one gateway;
* the fault tier: ``up(dir, osds=3, objectstore="bluestore", gateways=2)``:
  BlueStore OSDs on sparse files in ``dir`` (O_DIRECT and libaio: ``dir`` must
  be on ext4/xfs, not tmpfs or overlayfs), pool size 2, min_size 1, fast
  heartbeats so a killed OSD is marked down in seconds.

Each gateway serves S3 over HTTPS only (beast ``ssl_endpoint``) with a
certificate from a test CA made here: botocore sends aws-chunked bodies with
trailer checksums only over TLS, which is where RGW's ``MissingContentLength``
shows, so a plain-HTTP test would hide it.

Every daemon runs with ``-f`` so the PID we record is the daemon itself; it
leads its own session (``Runner.spawn``), so a Ctrl-C aimed at pytest does not
reach it, and ``stop()`` signals exactly the PIDs it recorded, after checking
that each still runs our ``ceph.conf`` (a PID reused by something else is
left alone). One-shot commands (``ceph``, ``radosgw-admin``, ``monmaptool``)
go through the Runner with timeouts.
"""

from __future__ import annotations

import contextlib
import datetime
import http.client
import ipaddress
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import ssl
import stat
import string
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sanoffload.errors import CommandError, SanoffloadError
from sanoffload.runner import CommandRunner, Result, Runner, Spawned

log = logging.getLogger(__name__)

STATE_FILE = "cluster.json"
OBJECTSTORES = ("memstore", "bluestore")
#: deadlines (seconds); measured on a 2-core machine: up takes ~15 s (memstore)
MON_DEADLINE = 60.0
OSD_DEADLINE = 120.0
RGW_DEADLINE = 180.0
STOP_DEADLINE = 30.0
#: how often a readiness check is repeated inside its deadline
POLL = 0.5
#: the users up() makes: "maint" owns buckets; "proxy" may own none (only a bucket policy
#: lets it in), as issue 14's least-privilege roles want
MAINT, PROXY = "maint", "proxy"


class ClusterError(SanoffloadError):
    """The test cluster could not be started, reached or stopped."""

    kind = "ceph-cluster"


@dataclass(frozen=True)
class User:
    uid: str
    access_key: str
    secret_key: str


@dataclass
class Daemon:
    """One daemon we started: its ceph name (``osd.0``), argv and PID."""

    name: str
    argv: list[str]
    pid: int
    #: only in the process that started it (reaps it, sees its exit code)
    handle: Spawned | None = field(default=None, repr=False, compare=False)

    def running(self, conf: Path) -> bool:
        """Still alive and still ours (a recycled PID runs another command line)."""
        if self.handle is not None:
            return self.handle.poll() is None
        return _runs_conf(self.pid, conf)


def _runs_conf(pid: int, conf: Path) -> bool:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    # a zombie whose parent (a finished `scripts/ceph up`) nobody reaps has exited
    return state != "Z" and os.fsencode(conf) in argv


def _free_port(bind: str) -> int:
    """A port free on ``bind`` now (the daemon binds it a moment later: a clash fails loudly)."""
    family = socket.AF_INET6 if ":" in bind else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((bind, 0))
        return int(s.getsockname()[1])


def _hostport(bind: str, port: int) -> str:
    return f"[{bind}]:{port}" if ":" in bind else f"{bind}:{port}"


def _key(alphabet: str, n: int) -> str:
    return "".join(secrets.choice(alphabet) for _ in range(n))


def _log_tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text[-lines:])


@dataclass
class Cluster:
    """A running cluster: where to reach it, who may log in, and the PIDs to stop."""

    dir: Path
    bind: str
    fsid: str
    objectstore: str
    osds: int
    replicas: int
    mon_port: int
    gateway_ports: list[int]
    ca: Path
    users: dict[str, User]
    daemons: dict[str, Daemon] = field(default_factory=dict)
    #: seconds each phase of up() took (mon, osds, rgw, users, total)
    timings: dict[str, float] = field(default_factory=dict)
    runner: Runner = field(default_factory=lambda: CommandRunner(default_timeout=60),
                           repr=False, compare=False)

    # -- where ---------------------------------------------------------------
    @property
    def conf(self) -> Path:
        return self.dir / "ceph.conf"

    @property
    def endpoints(self) -> list[str]:
        return [f"https://{_hostport(self.bind, p)}" for p in self.gateway_ports]

    @property
    def endpoint(self) -> str:
        return self.endpoints[0]

    @property
    def maint(self) -> User:
        return self.users[MAINT]

    @property
    def proxy(self) -> User:
        return self.users[PROXY]

    def pids(self) -> dict[str, int]:
        """The daemons still running, by name."""
        return {n: d.pid for n, d in self.daemons.items() if d.running(self.conf)}

    def rss(self) -> dict[str, int]:
        """Resident memory of each running daemon, bytes."""
        out = {}
        for name, pid in self.pids().items():
            with contextlib.suppress(OSError, ValueError, IndexError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        out[name] = int(line.split()[1]) * 1024
        return out

    def describe(self) -> dict[str, Any]:
        """What a client needs (printed by ``scripts/ceph up``)."""
        return {"dir": str(self.dir), "endpoint": self.endpoint, "endpoints": self.endpoints,
                "ca": str(self.ca), "conf": str(self.conf), "objectstore": self.objectstore,
                "osds": self.osds, "replicas": self.replicas,
                "users": {u.uid: {"access_key": u.access_key, "secret_key": u.secret_key}
                          for u in self.users.values()},
                "pids": self.pids(), "timings": self.timings}

    # -- commands ------------------------------------------------------------
    def ceph(self, *args: str, timeout: float = 30) -> Result:
        return self.runner.run(["ceph", "-c", str(self.conf), "--connect-timeout", "10", *args],
                               timeout=timeout)

    def ceph_json(self, *args: str, timeout: float = 30) -> Any:
        return self.ceph(*args, "-f", "json", timeout=timeout).json()

    def radosgw_admin(self, *args: str, timeout: float = 60,
                      secrets: Iterable[str] = ()) -> Result:
        return self.runner.run(["radosgw-admin", "-c", str(self.conf), *args], timeout=timeout,
                               secrets=secrets)

    # -- state file ----------------------------------------------------------
    def save(self) -> None:
        data = {k: v for k, v in self.__dict__.items() if k not in ("runner", "daemons")}
        data["dir"], data["ca"] = str(self.dir), str(self.ca)
        data["users"] = {k: u.__dict__ for k, u in self.users.items()}
        data["daemons"] = {n: {"name": d.name, "argv": d.argv, "pid": d.pid}
                           for n, d in self.daemons.items()}
        tmp = self.dir / (STATE_FILE + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
        tmp.replace(self.dir / STATE_FILE)

    @classmethod
    def load(cls, dir: Path, runner: Runner | None = None) -> Cluster:
        """The cluster whose state file is in ``dir`` (started by another process)."""
        try:
            data = json.loads((dir / STATE_FILE).read_text())
            return cls(dir=Path(data["dir"]), bind=data["bind"], fsid=data["fsid"],
                       objectstore=data["objectstore"], osds=int(data["osds"]),
                       replicas=int(data["replicas"]), mon_port=int(data["mon_port"]),
                       gateway_ports=[int(p) for p in data["gateway_ports"]],
                       ca=Path(data["ca"]),
                       users={k: User(**u) for k, u in data["users"].items()},
                       daemons={n: Daemon(d["name"], list(d["argv"]), int(d["pid"]))
                                for n, d in data["daemons"].items()},
                       timings=dict(data.get("timings", {})),
                       runner=runner or CommandRunner(default_timeout=60))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ClusterError(f"no usable cluster state in {dir}: {exc}") from exc

    # -- daemons -------------------------------------------------------------
    def _spawn(self, name: str, argv: list[str]) -> Daemon:
        out = self.dir / "log" / f"{name}.out"
        handle = self.runner.spawn(argv, log_path=str(out))
        d = Daemon(name, argv, handle.pid, handle)
        self.daemons[name] = d
        self.save()
        log.debug("started %s: pid %d", name, d.pid)
        return d

    def _wait(self, what: str, ready: Callable[[], bool], deadline: float,
              watch: Sequence[str]) -> None:
        """Poll ``ready`` until true; fail at ``deadline`` or as soon as a watched daemon dies."""
        started = time.monotonic()
        while True:
            for name in watch:
                if not self.daemons[name].running(self.conf):
                    raise ClusterError(
                        f"{name} exited while waiting for {what}; last lines of its log:\n"
                        f"{_log_tail(self.dir / 'log' / f'{name}.log')}\n"
                        f"{_log_tail(self.dir / 'log' / f'{name}.out', 5)}")
            if ready():
                log.debug("%s ready after %.1fs", what, time.monotonic() - started)
                return
            if time.monotonic() > deadline:
                logs = "\n".join(f"{n}: {_log_tail(self.dir / 'log' / f'{n}.log', 8)}"
                                 for n in watch)
                raise ClusterError(f"{what} not ready after {time.monotonic() - started:.0f}s; "
                                   f"last log lines:\n{logs}")
            time.sleep(POLL)

    def _osd_states(self) -> dict[int, bool] | None:
        """OSD id -> up, as the mon sees it (None: the mon did not answer)."""
        try:
            dump = self.ceph_json("osd", "dump")
        except CommandError:
            return None
        return {int(o["osd"]): o.get("up") == 1 for o in dump.get("osds", [])}

    def _osd_up(self, ids: Iterable[int], up: bool = True) -> Callable[[], bool]:
        want = set(ids)

        def check() -> bool:
            states = self._osd_states()
            return states is not None and all(states.get(n) is up for n in want)
        return check

    def start_osd(self, n: int, *, wait: bool = True) -> None:
        """(Re)start OSD ``n`` on its existing data (after ``kill_osd``) and wait until it is up."""
        self._spawn(f"osd.{n}", ["ceph-osd", "-f", "-c", str(self.conf), "-i", str(n)])
        if wait:
            self._wait(f"osd.{n} up", self._osd_up([n]), time.monotonic() + OSD_DEADLINE,
                       [f"osd.{n}"])

    def kill_osd(self, n: int, sig: int = signal.SIGKILL) -> None:
        """Kill OSD ``n`` (SIGKILL: a crash, not a shutdown)."""
        self._signal(f"osd.{n}", sig)

    def wait_osd_down(self, n: int, timeout: float = 60) -> float:
        """Wait until the mon marks OSD ``n`` down; the seconds it took."""
        started = time.monotonic()
        self._wait(f"osd.{n} marked down", self._osd_up([n], up=False), started + timeout,
                   ["mon.a"])
        return time.monotonic() - started

    def _gateway_ready(self, i: int) -> Callable[[], bool]:
        ctx = ssl.create_default_context(cafile=str(self.ca))

        def check() -> bool:
            conn = http.client.HTTPSConnection(self.bind, self.gateway_ports[i], timeout=5,
                                               context=ctx)
            try:
                conn.request("GET", "/")  # anonymous ListBuckets: 200 and an empty list
                return conn.getresponse().status == 200
            except OSError:
                return False  # not listening yet (refused) or TLS not ready
            finally:
                conn.close()
        return check

    def start_gateway(self, i: int, *, wait: bool = True) -> None:
        """(Re)start gateway ``i`` and wait until it answers HTTPS."""
        name = f"client.rgw.{i}"
        self._spawn(name, ["radosgw", "-f", "-c", str(self.conf), "-n", name])
        if wait:
            self._wait(f"{name} on {self.endpoints[i]}", self._gateway_ready(i),
                       time.monotonic() + RGW_DEADLINE, [name])

    def kill_gateway(self, i: int, sig: int = signal.SIGKILL) -> None:
        """Kill gateway ``i`` (SIGKILL: a crash; SIGTERM: a clean stop)."""
        self._signal(f"client.rgw.{i}", sig)

    def _signal(self, name: str, sig: int) -> None:
        d = self.daemons[name]
        if not d.running(self.conf):
            raise ClusterError(f"{name} (pid {d.pid}) is not running")
        os.kill(d.pid, sig)
        # wait for the exit, so a restart finds the port and the data directory free
        if self._reap([d], time.monotonic() + (10 if sig == signal.SIGKILL else STOP_DEADLINE)):
            raise ClusterError(f"{name} (pid {d.pid}) still runs after signal {sig}")

    def _reap(self, daemons: Sequence[Daemon], deadline: float) -> list[Daemon]:
        """Wait until ``daemons`` exit or ``deadline`` passes; the ones still running."""
        left = list(daemons)
        while left:
            left = [d for d in left if d.running(self.conf)]
            if not left or time.monotonic() > deadline:
                break
            d = left[0]
            if d.handle is not None:
                # a pidfd wait: wakes the moment it exits
                with contextlib.suppress(CommandError):
                    d.handle.wait(max(0.0, min(POLL, deadline - time.monotonic())))
            else:
                time.sleep(0.1)  # not our child: nothing to wait on but /proc
        return left

    def stop(self, timeout: float = STOP_DEADLINE) -> None:
        """Stop our daemons (gateways, then OSDs, then the mon) and remove the directory.

        Each stage gets SIGTERM, up to ``timeout`` seconds, then SIGKILL. In
        stages because a daemon whose mon vanished under it waits for it
        (an OSD's shutdown reports to the mon): all at once took 30 s, in
        order about 5. Only the PIDs recorded here are signalled, and only
        while they still run this cluster's ``ceph.conf``.
        """
        stages = [[d for d in self.daemons.values() if d.name.startswith(prefix)]
                  for prefix in ("client.rgw.", "osd.", "mon.")]
        stuck: list[Daemon] = []
        for stage in stages:
            live = [d for d in stage if d.running(self.conf)]
            for d in live:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(d.pid, signal.SIGTERM)
            left = self._reap(live, time.monotonic() + timeout)
            for d in left:
                log.warning("%s (pid %d) ignored SIGTERM for %.0fs; killing", d.name, d.pid,
                            timeout)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(d.pid, signal.SIGKILL)
            stuck += self._reap(left, time.monotonic() + 10)
        if stuck:
            raise ClusterError("would not die: " + ", ".join(f"{d.name} (pid {d.pid})"
                                                             for d in stuck))
        shutil.rmtree(self.dir, ignore_errors=True)


# --------------------------------------------------------------------------
# bring-up
# --------------------------------------------------------------------------

def _conf_text(c: Cluster) -> str:
    d = c.dir
    ipv6 = ":" in c.bind
    lines = [
        "[global]",
        f"fsid = {c.fsid}",
        f"mon host = [v2:{_hostport(c.bind, c.mon_port)}]",
        f"public addr = {c.bind}",
        f"cluster addr = {c.bind}",  # else the OSDs' replication ports listen on 0.0.0.0
        f"ms bind ipv6 = {str(ipv6).lower()}",
        f"ms bind ipv4 = {str(not ipv6).lower()}",
        # loopback (or the lab's private bridge) only, so no cephx keys to hand around
        "auth cluster required = none",
        "auth service required = none",
        "auth client required = none",
        "ms mon client mode = crc",
        f"keyring = {d}/keyring",
        f"run dir = {d}/run",
        f"admin socket = {d}/run/$name.asok",
        f"log file = {d}/log/$name.log",
        f"crash dir = {d}/crash",
        f"rgw data = {d}/rgw",
        "log to stderr = false",
        f"osd pool default size = {c.replicas}",
        "osd pool default min size = 1",
        "mon allow pool size one = true",  # else EPERM "configuring pool size as 1 is disabled"
        "mon warn on pool no redundancy = false",
        # RGW makes ~7 pools: few PGs cost little CPU; the PG-per-OSD cap would refuse them (ERANGE)
        "osd pool default pg num = 8",
        "osd pool default pgp num = 8",
        "osd pool default pg autoscale mode = off",
        "mon max pg per osd = 1000",
        "osd crush chooseleaf type = 0",  # every OSD on this one host
        "mon osd reporter subtree level = osd",  # else a dead OSD on one host is never reported
        # the cluster shares the machine's disk: do not stop writing at 95 % full
        "mon data avail warn = 2",
        "mon data avail crit = 1",
        "mon osd nearfull ratio = .97",  # in this order, else HEALTH_ERR "out of order"
        "mon osd backfillfull ratio = .98",
        "mon osd full ratio = .99",
        "mon warn on insecure global id reclaim allowed = false",  # auth is off anyway
        # a SIGKILLed gateway keeps its watch on RGW's control objects until this expires, and
        # the other gateways' metadata writes (create_bucket) wait for it: 30 s by default
        "osd client watch timeout = 10",
        "",
        "[mon]",
        f"mon data = {d}/mon.$id",
        f"mon cluster log file = {d}/log/cluster.log",
        "",
        "[osd]",
        f"osd data = {d}/osd$id",
        f"osd objectstore = {c.objectstore}",
    ]
    if c.objectstore == "memstore":
        # memstore reports 1 GiB by default and RGW answers 507 once the OSD is marked full
        lines += ["memstore device bytes = 4294967296"]
    else:
        lines += [
            "bluestore block create = true",
            "bluestore block size = 8589934592",  # a sparse file in the OSD's directory
            "bluestore fsck on mount = false",
            "osd memory target = 1073741824",
            # a killed OSD is marked down in seconds, not after the default 20 s grace
            "osd heartbeat interval = 1",
            "osd heartbeat grace = 6",
            "mon osd min down reporters = 1",
        ]
    for i, port in enumerate(c.gateway_ports):
        lines += [
            "",
            f"[client.rgw.{i}]",
            (f"rgw frontends = beast ssl_endpoint={_hostport(c.bind, port)} "
             f"ssl_certificate={d}/tls/rgw.pem ssl_private_key={d}/tls/rgw.key"),
            "rgw thread pool size = 32",
        ]
    return "\n".join(lines) + "\n"


def make_tls(tls: Path, bind: str) -> Path:
    """A test CA and a server certificate for ``bind`` in a new 0700 ``tls``; the CA's path.

    Files: ``ca.pem``, ``rgw.pem`` (certificate for the address ``bind``, and
    ``localhost`` if it is a loopback address), ``rgw.key`` (0600).
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sanoceph test CA")])
    ca_cert = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, key_cert_sign=True, crl_sign=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.IPAddress(ipaddress.ip_address(bind))]
    if ipaddress.ip_address(bind).is_loopback:
        names.append(x509.DNSName("localhost"))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, bind)]))
        .issuer_name(ca_name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256()))
    tls.mkdir(mode=0o700)
    pem = serialization.Encoding.PEM
    ca_path = tls / "ca.pem"
    ca_path.write_bytes(ca_cert.public_bytes(pem))
    (tls / "rgw.pem").write_bytes(cert.public_bytes(pem))
    fd = os.open(tls / "rgw.key", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return ca_path


_make_tls = make_tls  # the name tests/host/test_backend_s3_rgw.py imports


def _claim_dir(dir: Path) -> None:
    """Make ``dir`` ours and private: created here, or empty, or a cluster of ours that is down."""
    if dir.is_symlink():
        raise ClusterError(f"{dir} is a symlink; give a real directory")
    if (dir / STATE_FILE).exists():
        old = Cluster.load(dir)
        if old.pids():
            raise ClusterError(f"a cluster is already running in {dir} (pids "
                               f"{sorted(old.pids().values())}); stop it first (scripts/ceph "
                               f"down --dir {dir})")
        shutil.rmtree(dir)  # ours (state file), all daemons gone: a leftover of a killed run
    try:
        dir.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        st = dir.lstat()
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or any(dir.iterdir()):
            raise ClusterError(f"{dir} exists and is not an empty directory of ours") from None
        dir.chmod(0o700)


def up(dir: Path | str, *, osds: int = 1, objectstore: str = "memstore", gateways: int = 1,
       bind: str = "127.0.0.1", replicas: int | None = None,
       runner: Runner | None = None) -> Cluster:
    """Start a cluster in ``dir`` and return it once every gateway answers S3 over HTTPS.

    Users ``maint`` (may own buckets) and ``proxy`` (``--max-buckets=-1``: only
    bucket policies let it in) exist. ``replicas`` defaults to 1 for one OSD, else 2.
    On failure everything started is stopped and ``dir`` removed; the error
    carries the failing daemon's last log lines.
    """
    if objectstore not in OBJECTSTORES:
        raise ClusterError(f"objectstore is one of {OBJECTSTORES}, not {objectstore!r}")
    if osds < 1 or gateways < 1:
        raise ClusterError("need at least one OSD and one gateway")
    ipaddress.ip_address(bind)  # ValueError for a name: the certificate names an address
    dir = Path(dir).absolute()
    replicas = replicas if replicas is not None else (1 if osds == 1 else 2)
    if not 1 <= replicas <= osds:
        raise ClusterError(f"replicas must be 1..{osds}, not {replicas}")
    runner = runner or CommandRunner(default_timeout=60)
    for tool in ("ceph-mon", "ceph-osd", "radosgw", "radosgw-admin", "ceph", "monmaptool",
                 "ceph-authtool"):
        if shutil.which(tool, path=runner.build_env()["PATH"]) is None:
            raise ClusterError(f"{tool} is not installed",
                               hint="apt-get install --no-install-recommends ceph-mon ceph-osd "
                                    "radosgw ceph-common (scripts/setup --tier host)")
    t0 = time.monotonic()
    _claim_dir(dir)
    for sub in ("run", "log", "crash", "rgw"):
        (dir / sub).mkdir(mode=0o700)
    c = Cluster(dir=dir, bind=bind, fsid=str(uuid.uuid4()), objectstore=objectstore, osds=osds,
                replicas=replicas, mon_port=_free_port(bind),
                gateway_ports=[_free_port(bind) for _ in range(gateways)],
                ca=make_tls(dir / "tls", bind), users={}, runner=runner)
    c.conf.write_text(_conf_text(c))
    c.save()
    try:
        _bring_up(c, t0)
    except BaseException as exc:
        try:
            c.stop(timeout=10)
        except ClusterError as cleanup:
            # keep the start failure as the error; the cleanup's is a note on it
            exc.add_note(f"cleanup: {cleanup}")
        raise
    return c


def _bring_up(c: Cluster, t0: float) -> None:
    d, conf = c.dir, str(c.conf)
    run = c.runner.run
    # mkfs wants a keyring even with auth off
    run(["ceph-authtool", "--create-keyring", f"{d}/keyring", "--gen-key", "-n", "mon.",
         "--cap", "mon", "allow *"])
    run(["ceph-authtool", f"{d}/keyring", "--gen-key", "-n", "client.admin",
         "--cap", "mon", "allow *", "--cap", "osd", "allow *", "--cap", "mgr", "allow *"])
    run(["monmaptool", "--create", "--clobber", "--fsid", c.fsid,
         "--addv", "a", f"[v2:{_hostport(c.bind, c.mon_port)}]", f"{d}/monmap"])
    run(["ceph-mon", "-c", conf, "--mkfs", "-i", "a", "--monmap", f"{d}/monmap",
         "--keyring", f"{d}/keyring"], timeout=60)
    c._spawn("mon.a", ["ceph-mon", "-f", "-c", conf, "-i", "a"])

    def mon_ready() -> bool:
        try:
            c.ceph("mon", "stat", timeout=20)
        except CommandError:
            return False
        return True
    c._wait("the monitor", mon_ready, time.monotonic() + MON_DEADLINE, ["mon.a"])
    c.timings["mon"] = round(time.monotonic() - t0, 1)

    for n in range(c.osds):
        osd_uuid = str(uuid.uuid4())
        got = c.ceph("osd", "new", osd_uuid).stdout.strip()
        if got != str(n):
            raise ClusterError(f"ceph osd new gave id {got!r}, expected {n}")
        (d / f"osd{n}").mkdir(mode=0o700)
        run(["ceph-osd", "-c", conf, "-i", str(n), "--mkfs", "--osd-uuid", osd_uuid],
            timeout=180)
        c.start_osd(n, wait=False)
    c._wait(f"{c.osds} OSD(s) up", c._osd_up(range(c.osds)), time.monotonic() + OSD_DEADLINE,
            [f"osd.{n}" for n in range(c.osds)])
    c.timings["osds"] = round(time.monotonic() - t0, 1)

    # one gateway first: it creates the zone and its pools; two at once would race for them
    for i in range(len(c.gateway_ports)):
        c.start_gateway(i)
    c.timings["rgw"] = round(time.monotonic() - t0, 1)

    upper = string.ascii_uppercase + string.digits
    for uid, extra in ((MAINT, []), (PROXY, ["--max-buckets=-1"])):
        user = User(uid, _key(upper, 20), _key(string.ascii_letters + string.digits, 40))
        c.runner.add_secret(user.secret_key)
        c.radosgw_admin("user", "create", f"--uid={uid}", f"--display-name={uid}",
                        f"--access-key={user.access_key}", f"--secret-key={user.secret_key}",
                        *extra, secrets=[user.secret_key])
        c.users[uid] = user
    c.timings["users"] = round(time.monotonic() - t0, 1)
    c.timings["total"] = c.timings["users"]
    c.save()
