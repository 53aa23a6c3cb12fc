"""``bench/run --lab``: the lab figures of issue 11 (px1, fs1, bk1 of scripts/sanolab).

WRITTEN, NOT YET RUN: the lab was busy when this was written. Expect to fix
details on the first run. It reuses a running lab (``vm.LabState``) or boots
one, deploys as tests/lab/test_backup.py does (``deploy.deploy``), and:

* ``throughput_vs_tar``: the off-host backup's source bytes/s (``sanoffload
  backup --json --no-verify`` on px1) ÷ ``tar | zstd -T0 > /dev/null`` on px1
  of the same bytes (a copy on px1's own disk: the mounted duplicate exists
  only inside a backup); ``lun_read_mib_s`` is ``dd iflag=direct`` of fs1's LV;
* ``offload_cpu_ratio``: fs1's busy CPU seconds (/proc/stat) during the
  off-host backup ÷ during fs1's own ``tar | zstd -T0 | ssh bk1 'cat >/dev/null'``
  (``> /dev/null`` when fs1 has no key for bk1; the report says which);
* ``freeze_overhead``: the freeze window the backup reports ÷ the bare
  ``lvcreate`` of the same duplicate kind on fs1, per kind;
* ``app_stall_ms``: the longest fsync'd write latency of a writer on fs1
  during a backup, and without one.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "scripts"), str(ROOT)]

from sanoffload.runner import CommandRunner  # noqa: E402
from sanolab import config, deploy, sync, vm  # noqa: E402

BENCH_DIR = deploy.DATA + "/bench"
STORE = f"bk1:{deploy.REPO}"

GEN = r"""set -e
rm -rf {d}; mkdir -p {d}/small
head -c {r}M /dev/urandom > {d}/random.bin
seq 1 20000000 | awk '{{print $1, $1*7, "line of text", $1%97}}' | head -c {t}M > {d}/text.txt
i=0
while [ $i -lt 5000 ]; do
    head -c $((i % 4096 + 64)) {d}/text.txt > {d}/small/f$i; i=$((i+1))
done
sync
"""

CPU_BUSY = "awk '/^cpu /{print ($2+$3+$4+$7+$8)/100}' /proc/stat"  # user nice system irq softirq

STALL_WRITER = r"""python3 - <<'EOF'
import os, time, json
fd = os.open('{path}', os.O_WRONLY | os.O_CREAT | os.O_APPEND)
worst = 0.0; end = time.time() + {secs}
while time.time() < end:
    t = time.perf_counter(); os.write(fd, b'x' * 4096); os.fsync(fd)
    worst = max(worst, time.perf_counter() - t); time.sleep(0.01)
print(json.dumps({{"max_ms": worst * 1000}}))
EOF"""


def main(args: argparse.Namespace) -> int:
    runner = CommandRunner(default_timeout=600)
    state = vm.LabState.load()
    if not (state and all(vm.status(runner)[h]["ssh"] for h in state.hosts)):
        state = vm.up(runner, config.RELEASES[0] if isinstance(config.RELEASES, (list, tuple))
                      else next(iter(config.RELEASES)), list(config.HOSTS))
    sync.sync(runner, state.hosts)
    deploy.deploy(runner, state.hosts, grace_s=3)

    def sh(host: str, script: str, timeout: float = 1800) -> str:
        return vm.ssh(runner, host, ["sh", "-c", script], timeout=timeout).stdout

    size = min(args.size or 400, 450)  # the lab's data LV is 600 MiB
    sh("fs1", GEN.format(d=BENCH_DIR, r=size * 4 // 10, t=size * 5 // 10))
    src_bytes = int(sh("fs1", f"du -sb {BENCH_DIR} | cut -f1").split()[0])
    figures: dict[str, float | str] = {}

    def backup(kind: str | None = None) -> tuple[dict[str, object], float]:
        before = float(sh("fs1", CPU_BUSY))
        out = sh("px1", shlex.join(["sanoffload", "backup", f"fs1:{BENCH_DIR}", "--store", STORE,
                                    "--json", "--no-verify", "--no-progress",
                                    *(["--kind", kind] if kind else [])]))
        return json.loads(out), float(sh("fs1", CPU_BUSY)) - before

    summary, fs1_cpu_offhost = backup()
    figures["lab_source_mib"] = src_bytes / (1 << 20)
    figures["lab_backup_mib_s"] = src_bytes / float(summary["total_seconds"]) / (1 << 20)  # type: ignore[arg-type]

    # tar | zstd on px1 of the same bytes (copied to px1's disk; read warm)
    sh("px1", f"rm -rf /var/tmp/bench-copy; mkdir -p /var/tmp/bench-copy && "
              f"ssh -o BatchMode=yes fs1 tar -cf - -C {BENCH_DIR} . | tar -xf - -C "
              f"/var/tmp/bench-copy "
              f"|| scp -r -q fs1:{BENCH_DIR}/. /var/tmp/bench-copy/")
    t0 = time.perf_counter()
    sh("px1", "tar -cf - -C /var/tmp/bench-copy . | zstd -T0 -q -c > /dev/null")
    tar_s = time.perf_counter() - t0
    figures["throughput_vs_tar"] = figures["lab_backup_mib_s"] / (src_bytes / tar_s / (1 << 20))  # type: ignore[operator]
    dd = sh("fs1", f"dd if=/dev/{deploy.VG}/data of=/dev/null bs=4M iflag=direct 2>&1 | tail -1")
    figures["lun_read"] = dd.strip().split(",")[-1].strip()

    # fs1 backing itself up
    before = float(sh("fs1", CPU_BUSY))
    via = "ssh bk1"
    rc = vm.ssh(runner, "fs1", ["sh", "-c", (f"tar -cf - -C {BENCH_DIR} . | zstd -T0 -q -c | "
                                            "ssh -o BatchMode=yes bk1 'cat > /dev/null'")],
                timeout=1800, ok_codes=dict.fromkeys(range(1, 256), "no key")).returncode
    if rc != 0:
        via = "/dev/null (fs1 has no key for bk1)"
        before = float(sh("fs1", CPU_BUSY))
        sh("fs1", f"tar -cf - -C {BENCH_DIR} . | zstd -T0 -q -c > /dev/null")
    fs1_cpu_self = float(sh("fs1", CPU_BUSY)) - before
    figures["offload_cpu_ratio"] = fs1_cpu_offhost / max(fs1_cpu_self, 1e-3)
    figures["offload_cpu_self_via"] = via

    # freeze overhead per kind: the reported window ÷ the bare lvcreate
    snap = f"lvcreate -q -y -s -L 64m -n benchsnap {deploy.VG}/data"
    for kind, create in (("thin-snapshot", None), ("snapshot", snap)):
        if create is None:
            continue  # thin needs a thin pool: the lab's data LV is linear (measure when built)
        try:
            s, _ = backup(kind)
        except Exception as exc:
            figures[f"freeze_overhead_{kind}"] = f"not measured: {exc}"
            continue
        t0 = time.perf_counter()
        sh("fs1", f"{create} && lvremove -q -y {deploy.VG}/benchsnap")
        bare_ms = (time.perf_counter() - t0) * 1000  # includes ssh and the lvremove: an upper bound
        figures[f"freeze_overhead_{kind}"] = float(s["freeze_window_ms"]) / bare_ms  # type: ignore[arg-type]

    # app stall: fsync'd writes on fs1 without and during a backup
    quiet = json.loads(sh("fs1", STALL_WRITER.format(path=deploy.DATA + "/stall", secs=20)))
    proc = vm.ssh  # the writer runs while px1 backs up: start it in the background on fs1
    writer = STALL_WRITER.format(path=deploy.DATA + "/stall", secs=40)
    sh("fs1", f"nohup sh -c {shlex.quote(writer)} "
              "> /run/bench-stall.json 2>&1 &")
    backup()
    time.sleep(1)  # not synchronisation: the writer's own 40 s window ends on its own
    del proc
    busy = json.loads(sh("fs1", "while pgrep -f bench-stall >/dev/null; do sleep 1; done; "
                                "cat /run/bench-stall.json", timeout=120))
    figures["app_stall_ms_quiet"] = quiet["max_ms"]
    figures["app_stall_ms"] = busy["max_ms"]

    for k, v in figures.items():
        print(f"{k}={round(v, 3) if isinstance(v, float) else v}")
    out = ROOT / "bench" / "results" / "LAB.md"
    lines = "\n".join(f"- {k}: {v}" for k, v in figures.items())
    out.write_text(f"# bench/run --lab\n\n{lines}\n")
    return 0
