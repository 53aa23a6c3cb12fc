"""``bench/run --lab``: the lab figures of issue 11 (fs1, px1, bk1 of scripts/sanolab).

It reuses a running lab (``vm.LabState``: fs1, px1 and bk1 answering ssh) or
boots one (bookworm, those three hosts), installs this tree's wheel
(``sync.sync``), deploys as the lab tests do (``deploy.deploy``: VG ``datavg``
on fs1's two disks, a linear 600 MiB ext4 LV ``datavg/data`` at /srv/data, no
thin pool, px1's key forced to ``agent serve`` on fs1 and ``store serve`` on
bk1), generates a seeded data set on fs1 and measures:

* ``throughput_vs_tar`` (px1): the off-host backup's source MiB/s (``sanoffload
  backup --json --verify stream``, whole run; ``--no-verify`` where the CLI has no
  stream mode: either way no second read) ÷ ``tar | zstd -T0 > /dev/null`` on
  px1 of the same mounted duplicate. The duplicate exists only inside a
  session, so the bench makes one with ``sanoffload agent prepare`` on fs1 and
  attaches it on px1 with the proxy's own code (``proxy.attach.attach``: login,
  udev, read-only mount); ``lun_read_mib_s`` is ``dd iflag=direct`` of that
  LUN on px1 in the same session.
* ``offload_cpu_ratio`` (co-located): fs1's busy CPU seconds (/proc/stat)
  during the off-host backup ÷ during fs1 backing the same directory up
  itself: ``tar | zstd -T0 | ssh bk1`` (the bench gives fs1 a key for bk1
  whose forced command writes the archive to bk1's /var/tmp).
* ``freeze_overhead_<kind>``: the freeze window the agent reports ÷ the bare
  duplicate command (``lvcreate --snapshot`` with the agent's size) timed on
  fs1 itself, per duplicate kind fs1 offers.
* ``app_stall_ms``: the longest fsync'd write of a writer on fs1 during an
  off-host backup, and (``app_stall_ms_quiet``) without one.

Prints ``name=value`` lines and writes bench/results/LAB.md. No fixed sleeps
for synchronisation: background work on the VMs is a child ssh process the
bench starts and joins. The one timed wait is the idle window that measures
fs1's and px1's background CPU (a measurement, nothing waits on it).
"""

from __future__ import annotations

import argparse
import calendar
import hashlib
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "scripts"), str(ROOT)]

from sanoffload.runner import CommandRunner  # noqa: E402
from sanolab import config, deploy, sync, vm  # noqa: E402

HOSTS = ("fs1", "px1", "bk1")
BENCH_DIR = deploy.DATA + "/bench"
GEN_MARK = deploy.DATA + "/.bench-gen.json"
STALL_FILE = deploy.DATA + "/.bench-stall"
STORE = f"bk1:{deploy.REPO}"
SELF_ARCHIVE = "/var/tmp/bench-self.tar.zst"  # on bk1, written by fs1's own backup
SELF_KNOWN_HOSTS = "/root/.ssh/known_hosts.bench"  # on fs1
DEFAULT_MIB = 128
MAX_MIB = 400  # datavg/data is 600 MiB (deploy.volumes); the snapshot COW is 64 MiB
IDLE_WINDOW_S = 15
QUIET_STALL_S = 20
BARE_ROUNDS = 3
MIB = 1 << 20

# seeded, so every run backs up the same bytes: 40 % random, 45 % text (letters
# drawn with English-like frequencies: zstd gets ~0.55), 15 % small files 1-64 KiB
GEN = r"""
import json, os, random, sys
d, mib, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(seed)
weights = (" " * 40 + "e" * 25 + "t" * 18 + "a" * 16 + "o" * 15 + "i" * 14 + "n" * 14
           + "s" * 13 + "h" * 12 + "r" * 12 + "d" * 9 + "l" * 8 + "c" * 6 + "u" * 6
           + "m" * 5 + "w" * 5 + "f" * 4 + "g" * 4 + "y" * 4 + "p" * 4 + "b" * 3 + "\n" * 6
           + "v" * 2 + "k" * 2 + ".,xjqz")
table = (weights * 2)[:256].encode()
def text(n): return rng.randbytes(n).translate(table)
os.system("rm -rf " + d)
os.makedirs(d + "/small")
files = 0
def put(name, data):
    global files
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)
    files += 1
big = 8 << 20
for kind, share, make in (("random", 40, rng.randbytes), ("text", 45, text)):
    left, i = mib * share // 100 << 20, 0
    while left > 0:
        n = min(big, left); put(f"{kind}-{i:03}.{'bin' if kind == 'random' else 'txt'}", make(n))
        left -= n; i += 1
left, i = mib * 15 // 100 << 20, 0
while left > 0:
    n = min(rng.randint(1024, 65536), left)
    put(f"small/f{i:05}", text(n) if i % 2 else rng.randbytes(n)); left -= n; i += 1
for dirpath, dirs, names in os.walk(d):
    for name in names + dirs:
        os.utime(os.path.join(dirpath, name), (1790000000, 1790000000))
os.sync()
print(json.dumps({"files": files}))
"""

#: busy and total CPU seconds since boot (USER_HZ 100): user nice system irq softirq steal
CPU_STAT = "awk '/^cpu /{print ($2+$3+$4+$7+$8+$9)/100, ($2+$3+$4+$5+$6+$7+$8+$9)/100}' /proc/stat"

# fsync'd 4 KiB writes, always to the same block (the snapshot's COW copies it once),
# every 20 ms for at most SECS seconds, or (UNTIL_EOF=1) until its stdin reaches EOF:
# the longest write, when it happened (fs1's clock), the writes over 100 ms
STALL_WRITER = r"""
import json, os, select, sys, time
secs, until_eof = float(sys.argv[2]), sys.argv[3] == "1"
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT, 0o600)
block = b"x" * 4096
start = time.time(); end = start + secs; worst = worst_at = 0.0; n = 0; slow = []
while time.time() < end:
    if until_eof and select.select([0], [], [], 0)[0] and not os.read(0, 4096):
        break
    t = time.perf_counter(); os.pwrite(fd, block, 0); os.fsync(fd)
    dt = time.perf_counter() - t; n += 1
    if dt > 0.1 and len(slow) < 1000:
        slow.append((time.time() - dt, dt * 1000))
    if dt > worst:
        worst, worst_at = dt, time.time() - dt
    time.sleep(0.02)
os.close(fd)
print(json.dumps({"max_ms": worst * 1000, "max_at": worst_at, "start": start,
                  "end": time.time(), "writes": n, "over_100ms": len(slow), "slow": slow}))
"""

# fs1: the bare duplicate command of the agent (lvm.create_snapshot with the agent's size
# rule: percent of the origin, at least min_mb, whole extents; or create_thin_snapshot),
# timed here; lvremove after, untimed
BARE_SNAPSHOT = r"""
import json, math, os, subprocess, sys, time
vg, lv, rounds, thin = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "thin"
percent, min_mb = 10, 64
env = {**os.environ, "LVM_SUPPRESS_FD_WARNINGS": "1"}
def out(*a): return subprocess.run(a, check=True, capture_output=True, text=True, env=env).stdout
size = int(out("lvs", "--noheadings", "--units", "b", "--nosuffix", "-o", "lv_size", f"{vg}/{lv}"))
ext = int(out("vgs", "--noheadings", "--units", "b", "--nosuffix", "-o", "vg_extent_size", vg))
cow = math.ceil(max(math.ceil(size * percent / 100), min_mb << 20) / ext) * ext
times = []
for _ in range(rounds):
    how = ["--setactivationskip", "n"] if thin else ["--size", f"{cow}b"]
    argv = ["lvcreate", "--yes", "--snapshot", *how, "--name", "benchsnap",
            "--addtag", "sanoffload-bench", f"{vg}/{lv}"]
    t = time.perf_counter(); subprocess.run(argv, check=True, capture_output=True, env=env)
    times.append((time.perf_counter() - t) * 1000)
    subprocess.run(["lvremove", "--yes", f"{vg}/benchsnap"], check=True, capture_output=True,
                   env=env)
print(json.dumps({"ms": times, "cow_bytes": cow, "argv": " ".join(argv)}))
"""

# px1, with the installed package: attach the session's LUN as the proxy does (login,
# udev, read-only mount), dd iflag=direct its first DD_MIB, then tar | zstd -T0 of the
# object from the mount; everything undone on the way out (UndoStack)
PX1_READ = r"""
import json, logging, resource, subprocess, sys, time
from sanoffload.channel.messages import PrepareAnswer
from sanoffload.proxy.attach import attach
from sanoffload.runner import CommandRunner
from sanoffload.tools import tar, zstd
from sanoffload.undo import UndoStack
logging.basicConfig(level=logging.WARNING)
dd_mib = int(sys.argv[1])
req = PrepareAnswer.from_wire(json.loads(sys.stdin.read()))
res = {}
with UndoStack() as undo:
    a = attach(CommandRunner(default_timeout=600), req, undo)
    size = int(subprocess.run(["blockdev", "--getsize64", a.device], check=True,
                              capture_output=True, text=True).stdout)
    count = min(dd_mib, size >> 20) // 4
    t = time.perf_counter()
    dd = subprocess.run(["dd", f"if={a.device}", "of=/dev/null", "bs=4M", f"count={count}",
                         "iflag=direct"], check=True, capture_output=True, text=True)
    res.update(dd_s=time.perf_counter() - t, dd_bytes=count * 4 << 20, lun_bytes=size,
               dd_line=dd.stderr.strip().splitlines()[-1])
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    t_p = subprocess.Popen(tar.create_argv(a.object_path, "."), stdout=subprocess.PIPE)
    z_p = subprocess.Popen(zstd.compress_argv(), stdin=t_p.stdout, stdout=subprocess.DEVNULL)
    t_p.stdout.close()
    rc = (z_p.wait(), t_p.wait())
    res["tar_s"] = time.perf_counter() - t
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    res["tar_cpu_s"] = (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)
    res["tar_rc"] = list(rc)
    res["device"], res["mountpoint"] = a.device, a.mountpoint
print(json.dumps(res))
"""


class Lab:
    """ssh to the lab's hosts (the ControlMaster of scripts/sanolab), blocking or as a child."""

    def __init__(self, runner: CommandRunner) -> None:
        self.runner = runner

    def sh(self, host: str, script: str, *, timeout: float = 1800, input: str | None = None,
           check: bool = True) -> str:
        ok = None if check else dict.fromkeys(range(1, 256), "nonzero")
        return vm.ssh(self.runner, host, ["sh", "-c", script], timeout=timeout, input=input,
                      ok_codes=ok).stdout

    def py(self, host: str, code: str, *args: object, python: str = "python3",
           input: str | None = None, timeout: float = 1800) -> Any:
        """Run ``code`` with ``python`` on ``host``; its stdout's last line, parsed as JSON."""
        out = vm.ssh(self.runner, host, [python, "-c", code, *map(str, args)], input=input,
                     timeout=timeout).stdout
        return json.loads(out.strip().splitlines()[-1])

    def start_py(self, host: str, code: str, *args: object) -> subprocess.Popen[str]:
        """The same in the background: a child ssh process the caller joins."""
        remote = shlex.join(["python3", "-c", code, *map(str, args)])
        argv = ["ip", "netns", "exec", config.NETNS, *vm.ssh_base(host), "--", remote]
        return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    def cpu(self, host: str) -> tuple[float, float]:
        busy, total = self.sh(host, CPU_STAT).split()
        return float(busy), float(total)


def parallel(*calls: Callable[[], Any]) -> list[Any]:
    """Run the calls in threads, join them all; the first exception is raised."""
    results: list[Any] = [None] * len(calls)
    errors: list[BaseException] = []

    def run(i: int, call: Callable[[], Any]) -> None:
        try:
            results[i] = call()
        except BaseException as exc:  # re-raised below, in the caller's thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def say(msg: str) -> None:
    print(f"lab bench: {msg}", file=sys.stderr, flush=True)


def bring_up(runner: CommandRunner) -> vm.LabState:
    state = vm.LabState.load()
    st = vm.status(runner)
    if state and all(h in state.hosts and st[h]["ssh"] for h in HOSTS):
        say(f"reusing the running lab ({state.release}: {' '.join(state.hosts)})")
        return state
    say("booting the lab (bookworm: fs1 px1 bk1)")
    return vm.up(runner, config.DEFAULT_RELEASE, list(HOSTS))


def qemu_conditions(host: str) -> dict[str, str]:
    """What the running QEMU of ``host`` was started with (accel, vCPUs, memory)."""
    try:
        pid = int((config.state_dir() / f"{host}.pid").read_text())
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    except (OSError, ValueError):
        return {}
    opts = {a: argv[i + 1] for i, a in enumerate(argv[:-1]) if a in ("-accel", "-smp", "-m",
                                                                      "-cpu")}
    return {"accel": opts.get("-accel", "?"), "vcpus": opts.get("-smp", "?"),
            "memory_mb": opts.get("-m", "?"), "cpu": opts.get("-cpu", "?")}


def fs1_key_for_bk1(lab: Lab) -> str:
    """fs1 gets a key for bk1 (deploy gives it none), forced to write the archive to a file."""
    pub = lab.sh("fs1", "test -f /root/.ssh/id_ed25519 || ssh-keygen -q -t ed25519 -N '' "
                        "-C root@fs1-bench -f /root/.ssh/id_ed25519; "
                        "cat /root/.ssh/id_ed25519.pub").strip()
    line = f'command="cat > {SELF_ARCHIVE}",restrict {pub}\n'
    lab.sh("bk1", "mkdir -p -m 700 /root/.ssh; touch /root/.ssh/authorized_keys; "
                  f"grep -vF {shlex.quote(pub)} /root/.ssh/authorized_keys > /root/.ssh/ak; "
                  "cat >> /root/.ssh/ak; mv /root/.ssh/ak /root/.ssh/authorized_keys; "
                  "chmod 600 /root/.ssh/authorized_keys", input=line)
    lab.sh("fs1", f"ssh-keyscan -t ed25519 bk1 2>/dev/null > {SELF_KNOWN_HOSTS}.new && "
                  f"mv {SELF_KNOWN_HOSTS}.new {SELF_KNOWN_HOSTS}")
    return f"ssh -o BatchMode=yes -o UserKnownHostsFile={SELF_KNOWN_HOSTS} bk1"


def dataset(lab: Lab, mib: int, seed: int) -> dict[str, Any]:
    want = {"mib": mib, "seed": seed, "gen": hashlib.sha256(GEN.encode()).hexdigest()[:12]}
    have = lab.sh("fs1", f"cat {GEN_MARK} 2>/dev/null", check=False).strip()
    if not have or {k: json.loads(have).get(k) for k in want} != want:
        say(f"generating {mib} MiB (seed {seed}) in fs1:{BENCH_DIR}")
        t0 = time.perf_counter()
        gen = lab.py("fs1", GEN, BENCH_DIR, mib, seed)
        lab.sh("fs1", f"cat > {GEN_MARK}", input=json.dumps({**want, **gen}))
        say(f"generated in {time.perf_counter() - t0:.0f} s")
    info: dict[str, Any] = json.loads(lab.sh("fs1", f"cat {GEN_MARK}"))
    info["bytes"] = int(lab.sh("fs1", f"du -sb {BENCH_DIR}").split()[0])
    info["apparent_mib"] = info["bytes"] / MIB
    return info


def frozen_at(summary: dict[str, Any]) -> float:
    """When the freeze began (epoch s, fs1's clock): the backup id's UTC second."""
    stamp = str(summary["backup_id"]).rsplit("/", 1)[-1]
    return calendar.timegm(time.strptime(stamp, "%Y%m%dT%H%M%SZ"))


def verify_args(lab: Lab) -> list[str]:
    """No second read of the duplicate: ``--verify stream`` where the CLI has it (checks in
    flight, the default since the single-pass data path), else ``--no-verify``."""
    helptext = lab.sh("px1", "sanoffload backup --help")
    return ["--verify", "stream"] if "stream" in helptext else ["--no-verify"]


def backup(lab: Lab, kind: str, verify: list[str]) -> dict[str, Any]:
    """One off-host backup run on px1, with each host's busy CPU seconds around it."""
    before = parallel(*(lambda h=h: lab.cpu(h) for h in HOSTS))
    fs1_clock = float(lab.sh("fs1", "date +%s.%N"))
    t0 = time.perf_counter()
    out = lab.sh("px1", shlex.join(["sanoffload", "backup", f"fs1:{BENCH_DIR}", "--store", STORE,
                                    "--json", *verify, "--no-progress", "--kind", kind]))
    wall = time.perf_counter() - t0
    after = parallel(*(lambda h=h: lab.cpu(h) for h in HOSTS))
    summary: dict[str, Any] = json.loads(out)
    for h, (b0, _), (b1, _) in zip(HOSTS, before, after, strict=True):
        summary[f"{h}_cpu_s"] = b1 - b0
    summary.update(bench_wall_s=wall, frozen_at_s=frozen_at(summary),
                   freeze_after_s=frozen_at(summary) - fs1_clock)
    return summary


def lun_session(lab: Lab, kind: str, dd_mib: int) -> dict[str, Any]:
    """A session made by the agent's CLI on fs1, read on px1 as the proxy attaches it."""
    answer = lab.sh("fs1", shlex.join(["sanoffload", "agent", "prepare", BENCH_DIR, "--initiator",
                                       config.HOSTS["px1"].iqn, "--kind", kind, "--json"]))
    prepared = json.loads(answer)
    try:
        res: dict[str, Any] = lab.py("px1", PX1_READ, dd_mib, python="/opt/sanoffload/bin/python",
                                     input=answer)
    finally:
        lab.sh("fs1", shlex.join(["sanoffload", "agent", "release", prepared["session_id"]]))
    res["freeze_window_ms"] = prepared["freeze_window_ms"]
    res["frozen_by"] = prepared["frozen_by"]
    return res


def self_backup(lab: Lab, ssh_bk1: str) -> dict[str, Any]:
    """fs1 backing itself up: tar | zstd -T0 | ssh bk1, caches dropped first (a disk read)."""
    lab.sh("fs1", "sync; echo 3 > /proc/sys/vm/drop_caches")
    b0, _ = lab.cpu("fs1")
    t0 = time.perf_counter()
    vm.ssh(lab.runner, "fs1", ["bash", "-o", "pipefail", "-c",
                               f"tar -cf - -C {BENCH_DIR} . | zstd -T0 -q -c | {ssh_bk1}"],
           timeout=1800)
    wall = time.perf_counter() - t0
    b1, _ = lab.cpu("fs1")
    size = int(lab.sh("bk1", f"stat -c %s {SELF_ARCHIVE}; rm -f {SELF_ARCHIVE}").split()[0])
    return {"fs1_cpu_s": b1 - b0, "wall_s": wall, "archive_bytes": size}


def idle_rates(lab: Lab) -> dict[str, float]:
    """Background busy CPU per second of fs1 and px1 over IDLE_WINDOW_S with nothing run."""
    def one(host: str) -> float:
        out = lab.sh(host, f"{CPU_STAT}; sleep {IDLE_WINDOW_S}; {CPU_STAT}").split()
        b0, t0, b1, t1 = map(float, out)
        return (b1 - b0) / max(t1 - t0, 1e-6)
    fs1, px1 = parallel(lambda: one("fs1"), lambda: one("px1"))
    return {"fs1": fs1, "px1": px1}


def duplicate_kinds(lab: Lab) -> tuple[str, list[str]]:
    """datavg/data's segment type, and the thin pools on fs1."""
    seg = lab.sh("fs1", f"lvs --noheadings -o segtype {deploy.VG}/data").strip()
    pools = lab.sh("fs1", "lvs --noheadings -o vg_name,lv_name --select segtype=thin-pool",
                   check=False).split("\n")
    return seg, ["/".join(p.split()) for p in pools if p.strip()]


def thin_mount(lab: Lab) -> tuple[str, str, str] | None:
    """A mounted thin LV under /srv on fs1 (the agent's roots): (mountpoint, VG, LV)."""
    for line in lab.sh("fs1", "findmnt -rn -o TARGET,SOURCE", check=False).splitlines():
        target, _, source = line.partition(" ")
        if not target.startswith("/srv/") or not source.startswith("/dev/"):
            continue
        row = lab.sh("fs1", f"lvs --noheadings -o vg_name,lv_name,segtype {shlex.quote(source)}",
                     check=False).split()
        if len(row) == 3 and row[2] == "thin":
            return target, row[0], row[1]
    return None


def prepare_release(lab: Lab, path: str, kind: str) -> float:
    """``agent prepare`` then ``agent release`` on fs1: the freeze window reported."""
    answer = json.loads(lab.sh("fs1", shlex.join([
        "sanoffload", "agent", "prepare", path, "--initiator", config.HOSTS["px1"].iqn,
        "--kind", kind, "--json"])))
    lab.sh("fs1", shlex.join(["sanoffload", "agent", "release", answer["session_id"]]))
    return float(answer["freeze_window_ms"])


def thin_overhead(lab: Lab, pools: list[str]) -> tuple[object, str]:
    """freeze_overhead_thin-snapshot: two prepares of a mounted thin LV ÷ the bare lvcreate."""
    if not pools:
        return "not measured: no thin pool on fs1", ""
    found = thin_mount(lab)
    if found is None:
        return (f"not measured: fs1 has thin pool(s) {', '.join(pools)} but no thin LV "
                "mounted under /srv"), ""
    mountpoint, vg, lv = found
    windows = [prepare_release(lab, mountpoint, "thin-snapshot") for _ in range(2)]
    bare = lab.py("fs1", BARE_SNAPSHOT, vg, lv, BARE_ROUNDS, "thin")
    note = (f"{vg}/{lv} at {mountpoint}: windows {', '.join(f'{w:.0f}' for w in windows)} ms "
            f"(agent prepare); bare `{bare['argv']}` "
            f"{', '.join(f'{m:.0f}' for m in bare['ms'])} ms")
    return statistics.median(windows) / statistics.median(bare["ms"]), note


def git_commit() -> str:
    def git(*a: str) -> str:
        return subprocess.run(["git", "-C", str(ROOT), *a], capture_output=True, text=True,
                              check=False).stdout.strip()
    head = git("log", "-1", "--format=%h %s")
    status = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain"],
                            capture_output=True, text=True, check=False).stdout
    dirty = [line[3:] for line in status.splitlines()
             if line[3:] not in (".venv", "bench/results/LAB.md")]
    return head + (f" (working tree differs: {', '.join(dirty)})" if dirty else "")


def fmt(v: object) -> str:
    return f"{v:.3f}".rstrip("0").rstrip(".") if isinstance(v, float) else str(v)


def main(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    runner = CommandRunner(default_timeout=600)
    state = bring_up(runner)
    t0 = time.perf_counter()
    say("installing this tree's wheel (sync) and deploying")
    sync.sync(runner, state.hosts)
    deploy.deploy(runner, state.hosts, grace_s=3)
    lab = Lab(runner)
    ssh_bk1 = fs1_key_for_bk1(lab)
    setup_s = time.perf_counter() - t0

    mib = min(args.size or DEFAULT_MIB, MAX_MIB)
    data = dataset(lab, mib, args.seed)
    seg, pools = duplicate_kinds(lab)
    vm_info = {h: lab.sh(h, "echo $(nproc) $(uname -r) $(cat /etc/debian_version) "
                            "$(awk '/MemTotal/{print int($2/1024)}' /proc/meminfo) "
                            "$(systemd-detect-virt || true)").split() for h in HOSTS}
    qemu = {h: qemu_conditions(h) for h in HOSTS}
    load_before = os.getloadavg()[0]
    src = data["bytes"]
    figures: dict[str, object] = {}
    notes: dict[str, str] = {}
    measure_t0 = time.perf_counter()

    say(f"idle window: fs1's and px1's background CPU over {IDLE_WINDOW_S} s")
    idle = idle_rates(lab)

    say("off-host backup (snapshot) on px1")
    verify = verify_args(lab)
    b1 = backup(lab, "snapshot", verify)
    backup_mib_s = src / float(b1["total_seconds"]) / MIB
    stream_mib_s = src / float(b1["stream_seconds"]) / MIB
    figures["backup_verify"] = " ".join(verify)
    figures["backup_mib_s"] = backup_mib_s
    figures["backup_stream_mib_s"] = stream_mib_s
    figures["backup_total_s"] = float(b1["total_seconds"])
    figures["backup_stream_s"] = float(b1["stream_seconds"])
    figures["backup_archive_mib"] = int(b1["archive_bytes"]) / MIB
    for h in HOSTS:
        figures[f"backup_{h}_busy"] = b1[f"{h}_cpu_s"] / b1["bench_wall_s"]

    say("a session by `agent prepare` on fs1: dd iflag=direct and tar | zstd -T0 on px1")
    lun = lun_session(lab, "snapshot", min(256, mib * 2))
    tar_mib_s = src / lun["tar_s"] / MIB
    figures["px1_tar_zstd_mib_s"] = tar_mib_s
    figures["px1_tar_zstd_busy"] = lun["tar_cpu_s"] / lun["tar_s"]
    figures["throughput_vs_tar"] = backup_mib_s / tar_mib_s
    figures["throughput_vs_tar_stream"] = stream_mib_s / tar_mib_s
    figures["lun_read_mib_s"] = lun["dd_bytes"] / lun["dd_s"] / MIB
    notes["lun_read"] = lun["dd_line"]

    say("fs1 backing itself up: tar | zstd -T0 | ssh bk1")
    own = self_backup(lab, ssh_bk1)
    figures["offload_cpu_ratio"] = b1["fs1_cpu_s"] / max(own["fs1_cpu_s"], 1e-3)
    figures["offload_fs1_cpu_s"] = b1["fs1_cpu_s"]
    figures["self_fs1_cpu_s"] = own["fs1_cpu_s"]
    bg_off, bg_own = idle["fs1"] * b1["bench_wall_s"], idle["fs1"] * own["wall_s"]
    figures["offload_cpu_ratio_net"] = (max(b1["fs1_cpu_s"] - bg_off, 0.0)
                                        / max(own["fs1_cpu_s"] - bg_own, 1e-3))
    figures["self_backup_s"] = own["wall_s"]

    say(f"bare lvcreate --snapshot on fs1, {BARE_ROUNDS} rounds")
    bare = lab.py("fs1", BARE_SNAPSHOT, deploy.VG, "data", BARE_ROUNDS, "classic")
    bare_ms = statistics.median(bare["ms"])
    windows = [float(b1["freeze_window_ms"]), float(lun["freeze_window_ms"])]
    figures["freeze_window_ms_snapshot"] = statistics.median(windows)
    figures["bare_lvcreate_ms"] = bare_ms
    figures["freeze_overhead_snapshot"] = statistics.median(windows) / bare_ms
    notes["freeze"] = (f"windows {', '.join(f'{w:.0f}' for w in windows)} ms (backup, prepare; "
                       f"frozen_by {b1['frozen_by']}); bare `{bare['argv']}` "
                       f"{', '.join(f'{m:.0f}' for m in bare['ms'])} ms")
    figures["freeze_overhead_thin-snapshot"], notes["thin"] = thin_overhead(lab, pools)
    for kind in ("raid1-split", "mirror-split"):
        figures[f"freeze_overhead_{kind}"] = f"not offered: {deploy.VG}/data is {seg}"

    say(f"app stall: fsync'd writes on fs1, {QUIET_STALL_S} s quiet")
    quiet = lab.py("fs1", STALL_WRITER, STALL_FILE, QUIET_STALL_S, 0)
    secs = float(b1["total_seconds"]) * 3 + 60  # a bound only: it stops at its stdin's EOF
    say("app stall: the same writer during an off-host backup (it stops when the backup has)")
    writer = lab.start_py("fs1", STALL_WRITER, STALL_FILE, f"{secs:.0f}", 1)
    try:
        b2 = backup(lab, "snapshot", verify)
    finally:
        w_out, w_err = writer.communicate(input="", timeout=secs + 600)
    if writer.returncode != 0:
        raise SystemExit(f"lab bench: the stall writer failed ({writer.returncode}): {w_err}")
    busy = json.loads(w_out.strip().splitlines()[-1])
    figures["app_stall_ms_quiet"] = quiet["max_ms"]
    figures["app_stall_ms"] = busy["max_ms"]
    frozen = b2["frozen_at_s"]
    # the writes that began between the freeze's second and the window's end (+1 s)
    span = (frozen - 1, frozen + float(b2["freeze_window_ms"]) / 1000 + 2)
    figures["app_stall_ms_at_freeze"] = max(
        [ms for at, ms in busy["slow"] if span[0] <= at <= span[1]], default=0.0)
    covered = busy["start"] <= frozen <= busy["end"] - 1
    notes["stall"] = (
        f"quiet: {quiet['writes']} writes, {quiet['over_100ms']} over 100 ms; during: "
        f"{busy['writes']} writes, {busy['over_100ms']} over 100 ms "
        f"({', '.join(f'{at - frozen:+.1f} s: {ms:.0f} ms' for at, ms in busy['slow'][:12])}"
        f"{' …' if len(busy['slow']) > 12 else ''}), the longest "
        f"{busy['max_at'] - frozen:+.1f} s from the freeze's start (backup id's second; window "
        f"{float(b2['freeze_window_ms']):.0f} ms); the writer "
        f"{'covered' if covered else 'did NOT cover'} the freeze")
    figures["freeze_window_ms_under_writes"] = float(b2["freeze_window_ms"])
    figures["backup_under_writes_mib_s"] = src / float(b2["total_seconds"]) / MIB
    measure_s = time.perf_counter() - measure_t0
    total_s = time.perf_counter() - started
    load_after = os.getloadavg()[0]

    for k, v in figures.items():
        print(f"{k}={fmt(v)}")
    cond = {
        "commit": git_commit(), "release": state.release, "hosts": " ".join(state.hosts),
        "host_cpus": os.cpu_count(), "load": f"{load_before:.2f} before, {load_after:.2f} after",
        "qemu": "; ".join(f"{h}: accel {q.get('accel')}, {q.get('vcpus')} vCPU, "
                          f"{q.get('memory_mb')} MiB" for h, q in qemu.items()),
        "vms": "; ".join(f"{h}: nproc {v[0]}, kernel {v[1]}, Debian {v[2]}, {v[3]} MiB, "
                         f"virt {v[4] if len(v) > 4 else '?'}" for h, v in vm_info.items()),
        "data": (f"{src / MIB:.1f} MiB in {data['files']} files (seed {data['seed']}: 40 % random,"
                 f" 45 % text, 15 % small files) in fs1:{BENCH_DIR} on {deploy.VG}/data "
                 f"({seg}, 600 MiB ext4)"),
        "idle": f"fs1 {idle['fs1']:.3f}, px1 {idle['px1']:.3f} busy CPU s per s",
        "duration": f"{total_s:.0f} s in all: setup (sync, deploy) {setup_s:.0f} s, "
                    f"measurements {measure_s:.0f} s",
    }
    write_report(ROOT / "bench" / "results" / "LAB.md", figures, notes, cond, b1, lun, own)
    say(f"done in {total_s:.0f} s; wrote bench/results/LAB.md")
    return 0


def write_report(path: Path, f: dict[str, object], notes: dict[str, str], cond: dict[str, Any],
                 b1: dict[str, Any], lun: dict[str, Any], own: dict[str, Any]) -> None:
    def g(k: str) -> float:
        v = f[k]
        assert isinstance(v, float | int), k
        return float(v)

    tcg = "tcg" in cond["qemu"]
    limit_tp = (
        f"During the backup fs1 was busy {g('backup_fs1_busy') * 100:.0f} %, px1 "
        f"{g('backup_px1_busy') * 100:.0f} %, bk1 {g('backup_bk1_busy') * 100:.0f} % of its one "
        f"vCPU (the three VMs share {cond['host_cpus']} host CPUs), px1 "
        f"{g('px1_tar_zstd_busy') * 100:.0f} % during tar | zstd, while the LUN reads "
        f"{g('lun_read_mib_s'):.1f} MiB/s raw (`dd iflag=direct`: {notes['lun_read']}), "
        f"{g('lun_read_mib_s') / max(g('backup_mib_s'), 1e-6):.1f}× the backup's source rate: ")
    limit_tp += ("the CPU limits, not the LUN" + (" (QEMU software emulation: every instruction of"
                 " tar, zstd, ssh and Python is emulated)" if tcg else "")
                 if g("lun_read_mib_s") > 1.5 * g("backup_mib_s") else
                 "the LUN's read rate is close to the backup's: the LUN limits")
    run = [
        f"<!-- run: {cond['commit']} -->",
        f"## Run of {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", "",
        f"- **commit:** {cond['commit']}",
        f"- **lab:** {cond['release']}, hosts {cond['hosts']}; {cond['qemu']}",
        f"- **VMs:** {cond['vms']}",
        (f"- **machine:** {cond['host_cpus']} CPUs shared by the VMs; load (1 min) "
        f"{cond['load']}"),
        f"- **data set:** {cond['data']}",
        f"- **background CPU** (idle window): {cond['idle']}",
        f"- **duration:** {cond['duration']}", "",
        "```", *(f"{k}={fmt(v)}" for k, v in f.items()), "```", "",
        "What limits each:", "",
        (f"- `throughput_vs_tar` {g('throughput_vs_tar'):.2f} (streaming phase alone "
         f"{g('throughput_vs_tar_stream'):.2f}): the whole off-host backup "
         f"(`{f['backup_verify']}`, {g('backup_total_s'):.1f} s, of which "
         f"{g('backup_stream_s'):.1f} s streaming, "
         f"{g('backup_mib_s'):.2f} MiB/s of source) against `tar | zstd -T0 > /dev/null` of the "
         f"same mounted duplicate on px1 ({g('px1_tar_zstd_mib_s'):.2f} MiB/s). The rest of the "
         "whole run is fixed cost: ssh and Python start-ups on three hosts, the freeze and "
         "lvcreate, the iSCSI export, login and udev, the store's commit (up to ed84eed with "
         "its test-read: two decompressions of the stored archive), release. "
         + limit_tp + "."),
        (f"- `lun_read_mib_s` {g('lun_read_mib_s'):.1f}: `dd bs=4M iflag=direct` of the LUN on "
         f"px1 ({lun['dd_bytes'] >> 20} MiB of {lun['lun_bytes'] >> 20}), in a session made by "
         "`sanoffload agent prepare` and attached by the proxy's own code; under emulation the "
         "iSCSI target and initiator's CPU limit it, not the disks (raw image files in the "
         "host's page cache)."),
        (f"- `offload_cpu_ratio` {g('offload_cpu_ratio'):.3f} (net of fs1's background "
         f"{g('offload_cpu_ratio_net'):.3f}): fs1 spent {g('offload_fs1_cpu_s'):.1f} CPU s during"
         f" the off-host backup ({b1['bench_wall_s']:.0f} s) against "
         f"{g('self_fs1_cpu_s'):.1f} CPU s backing the same directory up itself "
         f"(`tar | zstd -T0 | ssh bk1`, {own['wall_s']:.0f} s, {own['archive_bytes'] >> 20} MiB "
         "sent). Co-located mode: fs1 still serves every byte through LIO (the iSCSI target's "
         "kernel threads) and runs the agent (Python start-up, lvcreate, the export); it no "
         "longer compresses or encrypts. SAN mode (goal ≤ 0.01) is not built."),
        (f"- `freeze_overhead_snapshot` {g('freeze_overhead_snapshot'):.2f}: the reported window "
         f"({g('freeze_window_ms_snapshot'):.0f} ms, median) ÷ the bare `lvcreate --snapshot` "
         f"timed on fs1 ({g('bare_lvcreate_ms'):.0f} ms, median of {BARE_ROUNDS}): "
         f"{notes['freeze']}. On Linux < 6.6 LVM's own suspend freezes (frozen_by lvm) and the "
         "agent reports its duplicate step as the window, so whatever it runs there besides "
         "`lvcreate` counts in it (up to ed84eed a `vgs` before and an `lvs` after; bf9e3a9 "
         "moved both out), though writes are held only inside lvcreate's suspend. "
         "Under emulation lvcreate itself is ~100× slower than on hardware."),
        (f"- `freeze_overhead_thin-snapshot`: {fmt(f['freeze_overhead_thin-snapshot'])}"
         + (f" ({notes['thin']})" if notes["thin"] else " (deploy makes a linear LV)")
         + f". raid1-split, mirror-split: {f['freeze_overhead_raid1-split']}."),
        (f"- `app_stall_ms` {g('app_stall_ms'):.0f} vs `app_stall_ms_quiet` "
         f"{g('app_stall_ms_quiet'):.0f}: the longest fsync'd 4 KiB write on /srv/data during a "
         f"backup and without one; {notes['stall']}. `app_stall_ms_at_freeze` "
         f"{g('app_stall_ms_at_freeze'):.0f}: the longest write over 100 ms that began within "
         "the freeze (from its second to the window's end + 1 s), "
         f"{g('app_stall_ms_at_freeze') / g('freeze_window_ms_under_writes') * 100:.0f} % of "
         "the window the agent reported for that backup: writes are held only while LVM "
         "suspends the origin inside lvcreate, and the window also counts lvcreate's own work "
         "before and after the suspend (and up to ed84eed a `vgs` and an `lvs`). Outside the "
         "freeze the "
         "slow writes are the emulated vCPU waiting for a host CPU (the quiet figure shows "
         "the same)."),
        "<!-- end run -->",
    ]
    earlier = ""
    if path.exists():
        m = re.search(r"<!-- run: (.*?) -->\n(.*?)<!-- end run -->", path.read_text(), re.S)
        if m and m.group(1) != cond["commit"]:
            earlier = m.group(2).replace("## Run of", "### Earlier run: run of", 1)
    head = [
        "# bench/run --lab: the lab figures of issue 11", "",
        ("Written by `bench/run --lab` (bench/lab.py); see bench/README.md. The figures are "
        "`name=value` lines; ratios > 1 mean sanoffload takes longer (throughput_vs_tar < 1: "
        "slower than tar). Under QEMU software emulation (TCG) every figure is CPU-bound and "
        "tells little about hardware; the ratios are what to read."), "",
    ]
    text = "\n".join(head + run) + "\n"
    if earlier:
        text += "\n## Earlier run\n\n" + earlier.rstrip() + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
