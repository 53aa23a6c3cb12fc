"""``bench/image.py``: image backups, the cost follows the change (issue 13; bench/README.md).

Run as root from the checkout::

    nice -n 19 .venv/bin/python bench/image.py [--size-mib 1024] [--rounds 3] [--out FILE]

A seeded volume (a regular file under ``/var/tmp/sanoffload-bench/image``, served
as a read-only loop device with ``--direct-io=on``: the loop reads its backing file
with O_DIRECT, so every read of the device reaches the disk) of ~40 % random, ~30 %
text-like and ~30 % zero chunks (a thin volume's unmapped areas read as zeros). Each
round, into a fresh repository:

- **full**: ``read_image(delta=None)`` of the whole device into a ``LocalImageSink``,
  the compare (``compare_image``, ``--verify stream``: the chunks read are read
  again), the commit;
- **0 %, 1 %, 10 %**: that share of the volume's 4 MiB chunks rewritten with random
  data (plus, for 1 % and 10 %, a few 64 KiB writes where a filesystem keeps its
  metadata), then the incremental backup with the :class:`Delta` thin_delta would
  answer for exactly those writes (their chunks, as chunk-aligned ranges; base = the
  previous backup) and ``previous`` = that backup's map, read back from the store as
  the proxy does (``ImageSink.previous_map``);
- **no base, 10 %**: another 10 % rewritten, then ``delta=None`` (a classic snapshot
  or raid1 split: everything is read, only the chunks the repository lacks are stored).

The delta is synthetic: what thin_delta would say for these writes, made here from
the list of chunks written. The real thin_delta path (a thin pool, a reserved metadata
snapshot, the agent's parser) is measured in the lab: tests/lab/test_image.py.

Every case runs as a child process (this script with ``--child``): wall around it, CPU
from ``os.wait4`` (user + system, its threads included); inside, the child also times
its read, compare and commit without the interpreter's start. Bytes read are counted
on the loop device (``/sys/block/loopN/stat``, sectors read); bytes stored are the
repository's disk use (``st_blocks``, as ``du``) before and after. The volume's writes
are undone after each round, so every round backs up the same data. Ratios are of
medians, against the full backup. Prints ``name=value`` lines on stdout (progress on
stderr) and writes ``bench/results/IMAGE.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(BENCH))

MIB = 1 << 20
CHUNK = 4 * MIB
META_WRITE = 64 * 1024
#: 64 KiB writes per changed case, each at the start of an ext4-like 128 MiB block group
#: (where bitmaps and inode tables live), as a filesystem's metadata updates would be
META_WRITES = 4
BLOCK_GROUP = 128 * MIB
WORK = Path("/var/tmp/sanoffload-bench/image")
HOST, PATH = "bench", "/srv/thin"
#: the shares of the volume's chunks: random (incompressible), text-like, zeros
MIX = (("random", 0.4), ("text", 0.3), ("zero", 0.3))

FULL, INC0, INC1, INC10, NOBASE = "full", "inc_0", "inc_1", "inc_10", "nobase_10"
CASES = {
    FULL: "full backup (no delta)",
    INC0: "0 % changed, delta",
    INC1: "1 % changed, delta",
    INC10: "10 % changed, delta",
    NOBASE: "10 % changed, no base (reads all)",
}


# -- the child: one backup ---------------------------------------------------------------
def child(args: argparse.Namespace) -> int:
    """One image backup of ``--device`` into ``--repo``; one JSON line on stdout."""
    import logging

    from sanoffload.channel.messages import Delta
    from sanoffload.proxy.image import compare_image, device_size, read_image
    from sanoffload.runner import CommandRunner
    from sanoffload.store.image import LocalImageSink
    from sanoffload.store.imagemap import DEFAULT_CHUNK_SIZE
    from sanoffload.store.repo import Repository

    logging.basicConfig(level=logging.ERROR, stream=sys.stderr)

    def cpu() -> float:
        ru = resource.getrusage(resource.RUSAGE_SELF)  # every thread of this process
        return ru.ru_utime + ru.ru_stime

    t0, c0 = time.perf_counter(), cpu()
    delta = None
    if args.delta:
        delta = Delta.from_wire(json.loads(Path(args.delta).read_text()))
    repo = Repository(args.repo, CommandRunner())
    size = device_size(args.device)
    sink = LocalImageSink(repo, HOST, HOST, PATH, {"frozen_at": args.frozen_at},
                          size=size, chunk_size=DEFAULT_CHUNK_SIZE)
    put_s = [0.0]
    put_chunk = sink.put_chunk

    def timed_put(chunk_id: str, codec: int, payload: bytes, plain_bytes: int) -> None:
        # the store's share inside the read: decode, re-hash, write, fsync file and directory
        t = time.perf_counter()
        try:
            put_chunk(chunk_id, codec, payload, plain_bytes)
        finally:
            put_s[0] += time.perf_counter() - t

    sink.put_chunk = timed_put  # type: ignore[method-assign]
    try:
        previous = sink.previous_map(delta.base) if delta is not None else None
        if delta is not None and previous is None:
            raise RuntimeError(f"the store has no map of {delta.base}")
        t1 = time.perf_counter()
        result = read_image(args.device, sink, delta=delta, previous=previous)
        t2 = time.perf_counter()
        m = result.chunk_map
        indexes = {"stream": list(result.read_indexes()), "full": list(range(m.count)),
                   "none": []}[args.verify]
        compared = compare_image(args.device, m, indexes) if indexes else 0
        t3 = time.perf_counter()
        base = None if result.full or delta is None else delta.base
        backup = sink.commit(m, {"image": {"read_bytes": result.read_bytes, "base": base}})
        t4 = time.perf_counter()
    except BaseException:
        sink.abort("the bench case failed")
        raise
    compared_bytes = sum(m.span(i)[1] for i in indexes)
    print(json.dumps({
        "id": backup["id"], "read_bytes": result.read_bytes, "chunks_read": result.chunks_read,
        "chunks_new": result.chunks_new, "new_bytes": result.new_bytes,
        "chunks_zero": result.chunks_zero, "changed": result.changed, "full": result.full,
        "compared": compared, "compared_bytes": compared_bytes, "chunks": m.count,
        "open_s": t1 - t0, "read_s": t2 - t1, "put_s": put_s[0], "compare_s": t3 - t2,
        "commit_s": t4 - t3,
        "in_child_wall_s": t4 - t0, "in_child_cpu_s": cpu() - c0}), flush=True)
    return 0


# -- the volume --------------------------------------------------------------------------
def make_volume(path: Path, size: int, seed: int) -> dict[str, int]:
    """Write the seeded mix to ``path``: runs of 1-8 chunks of one kind, the kinds' shares
    exact to a chunk; returns how many chunks of each kind."""
    import dataset

    rng = random.Random(seed)
    gen = dataset.Gen(seed)  # Zipf words from a made-up vocabulary: zstd -3 keeps ~0.3
    count = -(-size // CHUNK)
    counts = {kind: round(share * count) for kind, share in MIX}
    counts["zero"] = count - counts["random"] - counts["text"]
    runs: list[tuple[str, int]] = []
    for kind, n in counts.items():
        left = n
        while left > 0:
            k = min(left, rng.randint(1, 8))
            runs.append((kind, k))
            left -= k
    rng.shuffle(runs)
    with open(path, "wb") as f:
        f.truncate(size)  # zero runs stay holes, as a thin volume's unmapped blocks
        at = 0
        for kind, k in runs:
            for _ in range(k):
                length = min(CHUNK, size - at)
                if kind == "random":
                    f.seek(at)
                    f.write(rng.randbytes(length))
                elif kind == "text":
                    f.seek(at)
                    f.write(gen.text(length))
                at += length
        f.flush()
        os.fsync(f.fileno())
    return counts


@dataclass
class Changes:
    """The writes made to the volume since its making, to undo at the end of a round."""

    fd: int
    size: int
    undo: list[tuple[int, bytes]] = field(default_factory=list)

    def write(self, offset: int, data: bytes) -> None:
        self.undo.append((offset, os.pread(self.fd, len(data), offset)))
        os.pwrite(self.fd, data, offset)

    def change(self, rng: random.Random, share: float, meta: int) -> list[int]:
        """Rewrite ``share`` of the chunks with random data and make ``meta`` 64 KiB
        writes; the chunk indexes touched, sorted."""
        count = -(-self.size // CHUNK)
        chunks = set(rng.sample(range(count), round(share * count)))
        for i in sorted(chunks):
            self.write(i * CHUNK, rng.randbytes(min(CHUNK, self.size - i * CHUNK)))
        groups = max(1, self.size // BLOCK_GROUP)
        for _ in range(meta):
            g = rng.randrange(groups) * BLOCK_GROUP
            off = g + rng.randrange(min(CHUNK, self.size - g) // META_WRITE) * META_WRITE
            self.write(off, rng.randbytes(META_WRITE))
            chunks.add(off // CHUNK)
        os.fsync(self.fd)
        return sorted(chunks)

    def revert(self) -> None:
        for offset, data in reversed(self.undo):
            os.pwrite(self.fd, data, offset)
        os.fsync(self.fd)
        self.undo.clear()


def delta_for(chunks: list[int], base: str, size: int) -> dict[str, Any]:
    """What thin_delta would make the agent answer for writes to ``chunks``: their ranges,
    chunk-aligned, neighbours joined (the last one cut at the volume's end)."""
    ranges: list[list[int]] = []
    for i in chunks:
        off, end = i * CHUNK, min((i + 1) * CHUNK, size)
        if ranges and ranges[-1][0] + ranges[-1][1] == off:
            ranges[-1][1] = end - ranges[-1][0]
        else:
            ranges.append([off, end - off])
    return {"base": base, "volume_bytes": size, "chunk_bytes": CHUNK, "changed": ranges,
            "discarded": []}


# -- measuring ---------------------------------------------------------------------------
def disk_use(root: Path) -> int:
    """Bytes ``root`` takes on disk (``du -s -B1``: allocated blocks)."""
    total = 0
    for d, _dirs, files in os.walk(root):
        for name in (*files, *_dirs):
            try:
                total += os.lstat(os.path.join(d, name)).st_blocks * 512
            except FileNotFoundError:
                pass
    return total


def sectors_read(device: str) -> int | None:
    """Bytes read from ``device`` so far (its sysfs stat), None for a regular file."""
    if not device.startswith("/dev/"):
        return None
    stat = Path("/sys/block") / os.path.basename(device) / "stat"
    return int(stat.read_text().split()[2]) * 512


def attach(backing: Path) -> str | None:
    """A read-only loop device over ``backing`` reading it with O_DIRECT, or None."""
    for extra in (["--direct-io=on"], []):
        done = subprocess.run(["losetup", "--find", "--show", "--read-only", *extra,
                               str(backing)], capture_output=True, text=True, timeout=60,
                              check=False)
        if done.returncode == 0:
            return done.stdout.strip()
    return None


def detach(device: str) -> None:
    subprocess.run(["losetup", "-d", device], capture_output=True, timeout=60, check=False)


def loop_direct(device: str) -> bool:
    p = Path("/sys/block") / os.path.basename(device) / "loop" / "dio"
    return p.exists() and p.read_text().strip() == "1"


@dataclass
class Case:
    wall: float
    cpu: float
    device_read: int
    stored: int
    out: dict[str, Any]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=13)
    ap.add_argument("--verify", choices=("stream", "full", "none"), default="stream",
                    help="what is read again before the commit (default: stream, the "
                         "product's default: the chunks read)")
    ap.add_argument("--no-loop", action="store_true",
                    help="read the regular file itself (no loop device; bytes read are then "
                         "what the backup asked for, not counted on a device)")
    ap.add_argument("--out", default=str(BENCH / "results" / "IMAGE.md"))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--device", help=argparse.SUPPRESS)
    ap.add_argument("--repo", help=argparse.SUPPRESS)
    ap.add_argument("--frozen-at", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--delta", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args)
    if args.size_mib < 8 or args.rounds < 1:
        ap.error("--size-mib at least 8, --rounds at least 1")
    return bench(args)


def bench(args: argparse.Namespace) -> int:
    import harness

    started = time.time()
    info = harness.machine()
    for k in ("borg", "restic", "tar", "zstd"):
        info.pop(k, None)
    try:
        import zstandard
        info["zstandard"] = f"{zstandard.__version__} (the chunk store's codec, level 3)"
    except ImportError:
        info["zstandard"] = "not importable: chunks stored raw"
    qemu_before = harness.qemu_cpu()
    size = args.size_mib * MIB
    count = -(-size // CHUNK)
    if WORK.exists():
        shutil.rmtree(WORK)
    WORK.mkdir(parents=True)
    backing = WORK / "volume.img"
    harness.say(f"making a {args.size_mib} MiB volume (seed {args.seed})")
    t = time.perf_counter()
    mix = make_volume(backing, size, args.seed)
    made_s = time.perf_counter() - t
    device = None if args.no_loop else attach(backing)
    if device is None and not args.no_loop:
        harness.say("losetup failed: reading the regular file")
    source = device or str(backing)
    info["source"] = (f"{device} (loop, read-only, "
                      f"{'direct-io=on' if loop_direct(device) else 'buffered: page cache!'})"
                      if device else f"{backing} (a regular file, O_DIRECT)")
    stamp = [1_800_000_000.0]
    runs: dict[str, list[Case]] = {name: [] for name in CASES}
    shares: dict[str, float] = {}
    fd = os.open(backing, os.O_RDWR | os.O_CLOEXEC)
    changes = Changes(fd, size)

    def run(name: str, repo: Path, delta: dict[str, Any] | None, rnd: int) -> Case:
        stamp[0] += 3600  # every backup its own id
        argv = [harness.PY, str(Path(__file__).resolve()), "--child", "--device", source,
                "--repo", str(repo), "--frozen-at", str(stamp[0]), "--verify", args.verify]
        if delta is not None:
            dfile = WORK / "delta.json"
            dfile.write_text(json.dumps(delta))
            argv += ["--delta", str(dfile)]
        harness.say(f"round {rnd}/{args.rounds}: {CASES[name]}")
        before_read, before_use = sectors_read(source), disk_use(repo)
        r = harness.run_child(argv)
        after_read = sectors_read(source)
        dev = (after_read - before_read if after_read is not None and before_read is not None
               else r.out["read_bytes"] + r.out["compared_bytes"])
        case = Case(r.wall, r.cpu, dev, disk_use(repo) - before_use, r.out)
        runs[name].append(case)
        return case

    try:
        for rnd in range(1, args.rounds + 1):
            repo = WORK / f"repo-{rnd}"
            repo.mkdir()
            # the same writes every round: the rounds back up the same data
            rng = random.Random(args.seed * 1000 + 1)
            base = run(FULL, repo, None, rnd).out["id"]
            base = run(INC0, repo, delta_for([], base, size), rnd).out["id"]
            shares[INC0] = 0.0
            for name, share in ((INC1, 0.01), (INC10, 0.10)):
                touched = changes.change(rng, share, META_WRITES)
                shares[name] = len(touched) / count
                base = run(name, repo, delta_for(touched, base, size), rnd).out["id"]
            touched = changes.change(rng, 0.10, META_WRITES)
            shares[NOBASE] = len(touched) / count
            run(NOBASE, repo, None, rnd)
            changes.revert()
            shutil.rmtree(repo)
    finally:
        os.close(fd)
        if device:
            detach(device)
        shutil.rmtree(WORK)
    info["load after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    seconds = time.time() - started
    info["outside load"] = harness.qemu_share(qemu_before, harness.qemu_cpu(), seconds)
    values = figures(runs, shares, size)
    values["bench_seconds"] = round(seconds, 1)
    for k, v in values.items():
        print(f"{k}={v}", flush=True)
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True, check=False).stdout.strip()
    write_report(Path(args.out), args=args, info=info, head=head, runs=runs, values=values,
                 shares=shares, mix=mix, count=count, made_s=made_s)
    harness.say(f"wrote {args.out}")
    return 0


def med(cases: list[Case], what: str) -> float:
    return float(statistics.median(
        c.out[what] if what in c.out else getattr(c, what) for c in cases))


def figures(runs: dict[str, list[Case]], shares: dict[str, float], size: int
            ) -> dict[str, Any]:
    """The ``name=value`` figures: the full backup's, then each case's ratios to it."""
    full = runs[FULL]
    v: dict[str, Any] = {}
    v["full_wall_s"] = round(med(full, "wall"), 3)
    v["full_cpu_s"] = round(med(full, "cpu"), 3)
    v["full_read_mib"] = round(med(full, "device_read") / MIB, 1)
    v["full_stored_mib"] = round(med(full, "stored") / MIB, 1)
    for phase in ("read", "put", "compare", "commit"):
        v[f"full_{phase}_s"] = round(med(full, f"{phase}_s"), 3)
    for name in (INC0, INC1, INC10, NOBASE):
        rs = runs[name]
        v[f"{name}_changed_share"] = round(shares[name], 4)
        for what, key in (("wall", "time"), ("cpu", "cpu"), ("device_read", "read"),
                          ("stored", "stored")):
            v[f"{name}_{key}_ratio"] = round(med(rs, what) / max(med(full, what), 1e-9), 4)
        if shares[name]:
            # against the bytes of the chunks the writes touched: ~1 (read once), ~2 with
            # the compare's re-read of what was read (--verify stream)
            changed = shares[name] * size
            v[f"{name}_read_per_changed"] = round(med(rs, "device_read") / changed, 3)
            v[f"{name}_stored_per_changed"] = round(med(rs, "stored") / changed, 3)
        v[f"{name}_wall_s"] = round(med(rs, "wall"), 3)
        v[f"{name}_in_child_wall_s"] = round(med(rs, "in_child_wall_s"), 3)
    return v


def write_report(path: Path, *, args: argparse.Namespace, info: dict[str, str], head: str,
                 runs: dict[str, list[Case]], values: dict[str, Any],
                 shares: dict[str, float], mix: dict[str, int], count: int,
                 made_s: float) -> None:
    full = runs[FULL]

    def rounds(cs: list[Case], what: str, scale: float = 1.0, fmt: str = "{:.2f}") -> str:
        return ", ".join(fmt.format((c.out[what] if what in c.out else getattr(c, what))
                                    / scale) for c in cs)

    out = [
        "# bench/image.py: image backups, the cost follows the change (issue 13)", "",
        (f"Taken {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} with "
         f"`{' '.join(['bench/image.py', *sys.argv[1:]])}` (nice {info['nice']}) from the checkout "
         f"at `{head}` (plus uncommitted work in progress of other engineers)."), "",
        ("**The delta is synthetic:** it is what thin_delta would make the agent answer for "
         "these writes (their chunks as chunk-aligned ranges, base = the previous backup), "
         "built here from the list of chunks written. The real path (thin pool, reserved "
         "metadata snapshot, thin_delta, the agent's parser) is measured in the lab by "
         "`tests/lab/test_image.py`."), "",
        (f"**Conditions:** a shared machine: {info.get('outside load', '?')}; load average "
         f"before {info['load before']}, after {info['load after']}. Absolute seconds are "
         "slower and noisier than on an idle machine; read the ratios."), "",
        "## Machine", "", *(f"- {k}: {v}" for k, v in info.items()), "",
        "## Volume", "",
        (f"- {args.size_mib} MiB = {count} chunks of 4 MiB, seed {args.seed}, made in "
         f"{made_s:.1f} s: {mix['random']} random (incompressible), {mix['text']} text-like "
         f"(Zipf words, `bench/dataset.py`; zstd -3 keeps ~0.3), {mix['zero']} zero (holes in "
         "the file, as a thin volume's unmapped blocks), in runs of 1-8 chunks."),
        (f"- changes: 1 % / 10 % of the chunks rewritten whole with random data, plus "
         f"{META_WRITES} writes of 64 KiB at the start of random 128 MiB block groups (where "
         "ext4 keeps bitmaps and inode tables). Share of chunks the delta names: "
         + ", ".join(f"{CASES[k]} {shares[k]:.1%}" for k in (INC0, INC1, INC10, NOBASE))
         + ". The writes are undone after each round: every round backs up the same data."),
        (f"- each round into a fresh repository, in this order (each backup is the next one's "
         f"base): {', '.join(CASES.values())}; compare before commit: `--verify "
         f"{args.verify}`."), "",
        "## Figures (`name=value` as printed; ratios of medians against the full backup)", "",
        "```", *(f"{k}={v}" for k, v in values.items()), "```", "",
        "## Every round", "",
        ("wall: around the child process (interpreter start included); CPU: `os.wait4` of the "
         "child (user + system, all its threads); in-child: open the sink + read + compare + "
         "commit, without the interpreter's start (put: the time inside the sink's "
         "`put_chunk`, part of the read: the store's decode, re-hash, write and two "
         "fsyncs of each new chunk); read: bytes read from the device (the "
         "loop's sysfs counter: the backup's read and the compare's re-read); stored: growth "
         "of the repository's disk use (chunks, map, manifest)."), "",
        ("| case | wall s | CPU s | in-child s (read [of which put] / compare / commit) | "
         "read MiB | stored MiB | new chunks | wall ÷ full | CPU ÷ full | read ÷ full | "
         "stored ÷ full |"),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, cs in runs.items():
        ratios = " | ".join(f"{med(cs, w) / max(med(full, w), 1e-9):.3f}"
                            for w in ("wall", "cpu", "device_read", "stored"))
        phases = "; ".join(f"{c.out['in_child_wall_s']:.2f} ({c.out['read_s']:.2f} [put "
                           f"{c.out['put_s']:.2f}] / {c.out['compare_s']:.2f} / "
                           f"{c.out['commit_s']:.2f})" for c in cs)
        out.append(
            f"| {CASES[name]} | {rounds(cs, 'wall')} | {rounds(cs, 'cpu')} | {phases} | "
            f"{rounds(cs, 'device_read', MIB, '{:.1f}')} | {rounds(cs, 'stored', MIB, '{:.1f}')} "
            f"| {rounds(cs, 'chunks_new', 1, '{:.0f}')} | {ratios} |")
    fw, f_in = values["full_wall_s"], med(full, "in_child_wall_s")
    i0 = med(runs[INC0], "in_child_wall_s")
    stored_more = values[f"{INC10}_stored_ratio"] > values[f"{INC10}_read_ratio"]
    above = "above" if stored_more else "not above"
    out += [
        "", "## Reading it", "",
        (f"- With a delta, bytes read and stored follow the changed share. The stored ratio "
         f"is {above} "
         f"the read ratio here: the full backup's zero chunks cost nothing and its "
         f"text compresses, while the changed chunks are random (stored as they are): "
         f"`*_stored_per_changed` (stored bytes ÷ bytes of the chunks touched) is the "
         f"figure that follows the change. Time and CPU have a floor: "
         f"the 0 % backup still costs {values[f'{INC0}_wall_s']:.2f} s of wall "
         f"({i0:.2f} s in the child; the rest is the interpreter's start and the imports), "
         f"against {fw:.2f} s ({f_in:.2f} s in the child) for the full one. Of the full "
         f"backup's read phase ({values['full_read_s']:.2f} s), "
         f"{values['full_put_s']:.2f} s is the store putting the new chunks (each written "
         f"and fsynced with its directory, on the same disk); the compare's re-read takes "
         f"{values['full_compare_s']:.2f} s."),
        (f"- `*_read_per_changed` is the device's bytes read ÷ the bytes of the chunks the "
         f"writes touched: with `--verify {args.verify}` "
         + ("the compare reads every chunk read a second time before the commit (O_DIRECT, "
            "past the cache), so ~2 is the expected figure: the read itself is ~1."
            if args.verify == "stream" else
            "see the compare's re-reads in the table." if args.verify == "full" else
            "there is no compare: ~1 is the expected figure.")),
        ("- Without a base (a classic snapshot, a raid1 split) the read is the whole volume "
         "again and so is most of the time (every chunk hashed); only the stored bytes follow "
         "the change."),
        "",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(out))


if __name__ == "__main__":
    sys.exit(main())
