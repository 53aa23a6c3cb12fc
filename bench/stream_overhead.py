#!/usr/bin/env python3
"""What sanoffload's Python layer adds to the backup data path (a benchmark, not a test).

One run, one generated source tree, three ways of moving ``tar | zstd`` of it:

A. baseline: ``tar --create … | zstd -T0 -q -c > /dev/null``; two processes joined
   by a kernel pipe, Python only starts and waits for them.
B. sanoffload's pipeline (``CommandRunner().pipeline`` with the argv of
   ``tools.tar.create_argv`` / ``tools.zstd.compress_argv``), its output read by
   Python in 1 MiB ``readinto`` chunks, sha256-hashed and written to /dev/null.
C. the whole channel path in this process: ``StoreClient.writer(...)`` ->
   ``RemoteWriter.write_from(pipe.stdout)`` -> ``{"chunk": N}`` frames over OS pipes
   (``in_process_connector``) -> ``StoreService`` -> ``BackupWriter`` (hash + write
   to a ``.partial`` in a temporary repository, and the check on receipt: ``tar --list
   --zstd --file=-`` fed the same bytes from a thread) -> ``commit()`` (fsync, sha256
   and size checks, the check's end, publish, manifest).

Each case is timed with ``time.perf_counter`` (wall) and with the CPU time it
cost: this process's own (all threads: reading, hashing, framing, writing) and
its children's (tar, zstd, and in C the store's check on receipt). The median of
``--repeat`` runs is printed, the cases interleaved (A B C, A B C, ...).

Run from the repository root::

    python3 bench/stream_overhead.py [--mib 256] [--repeat 3]
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import hashlib  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Any  # noqa: E402

from sanoffload.channel.client import in_process_connector  # noqa: E402
from sanoffload.channel.protocol import CHUNK  # noqa: E402
from sanoffload.channel.server import serve  # noqa: E402
from sanoffload.pipeline import Stage  # noqa: E402
from sanoffload.proxy.peers import StoreClient  # noqa: E402
from sanoffload.runner import DEFAULT_PATH, CommandRunner  # noqa: E402
from sanoffload.store.repo import Repository  # noqa: E402
from sanoffload.store.service import StoreService  # noqa: E402
from sanoffload.tools import tar, zstd  # noqa: E402

MiB = 1 << 20
TIMEOUT_S = 1800.0


# -- the source tree ----------------------------------------------------------------
@dataclass(frozen=True)
class Source:
    path: str
    bytes: int
    files: int


def _vocabulary(rng: random.Random) -> list[bytes]:
    """4096 made-up words of 2-10 letters; every tenth ends a line."""
    words = []
    for i in range(4096):
        word = "".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 10))).encode()
        words.append(word + b"\n" if i % 10 == 0 else word)
    return words


def _text_block(rng: random.Random, vocab: list[bytes], size: int) -> bytes:
    """``size`` bytes of text: words drawn uniformly from ``vocab`` (zstd -3 makes ~1/3 of it)."""
    out: list[bytes] = []
    total = 0
    while total < size:
        words = min(20000, (size - total) // 5 + 1)  # ~6.5 bytes a word
        picks = memoryview(rng.randbytes(2 * words)).cast("H")
        chunk = b" ".join([vocab[i & 4095] for i in picks])
        out.append(chunk)
        total += len(chunk)
    return b"".join(out)[:size]


def make_source(parent: str, mib: int, small_files: int, seed: int = 1) -> Source:
    """Half incompressible (os.urandom), the rest one text file plus ``small_files`` files."""
    rng = random.Random(seed)
    vocab = _vocabulary(rng)
    root = os.path.join(parent, "src")
    os.mkdir(root)
    total = mib * MiB
    random_bytes = total // 2
    small_total = min(total // 16, small_files * 32 * 1024)
    text_bytes = total - random_bytes - small_total
    with open(os.path.join(root, "random.bin"), "wb") as f:
        left = random_bytes
        while left:
            n = min(left, MiB)
            f.write(os.urandom(n))
            left -= n
    with open(os.path.join(root, "text.log"), "wb") as f:
        left = text_bytes
        while left:
            n = min(left, 4 * MiB)
            f.write(_text_block(rng, vocab, n))
            left -= n
    per_file = small_total // max(small_files, 1)
    sizes = [rng.randint(per_file // 2, per_file * 3 // 2) for _ in range(small_files - 1)]
    if small_files:
        sizes.append(max(0, small_total - sum(sizes)))
    for i, size in enumerate(sizes):
        d = os.path.join(root, "small", f"d{i % 16:02d}")
        os.makedirs(d, exist_ok=True)
        # half text, half random bytes: like source code next to small binaries
        data = _text_block(rng, vocab, size // 2) + os.urandom(size - size // 2)
        with open(os.path.join(d, f"f{i:04d}.dat"), "wb") as f:
            f.write(data)
    size = files = 0
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            size += os.path.getsize(os.path.join(dirpath, name))
            files += 1
    os.sync()  # on disk (no writeback during the runs) and still in the page cache
    return Source(root, size, files)


# -- measuring ----------------------------------------------------------------------
@dataclass
class Sample:
    wall: float
    out_bytes: int
    py_cpu: float  # this process, all threads
    child_cpu: float  # reaped children: tar, zstd (and the store's check in C)
    phases: dict[str, float] = field(default_factory=dict)


class Meter:
    """Wall time (perf_counter), this process's CPU and its reaped children's CPU."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.p0 = time.process_time()
        self.c0 = self._children()

    @staticmethod
    def _children() -> float:
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        return ru.ru_utime + ru.ru_stime

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def sample(self, out_bytes: int, **phases: float) -> Sample:
        wall = time.perf_counter() - self.t0
        return Sample(wall, out_bytes, time.process_time() - self.p0,
                      self._children() - self.c0, phases)


Usage = tuple[float, float, float, float]


def thread_cpu() -> Usage:
    """The calling thread's (user s, system s, voluntary, involuntary context switches)."""
    ru = resource.getrusage(resource.RUSAGE_THREAD)
    return ru.ru_utime, ru.ru_stime, float(ru.ru_nvcsw), float(ru.ru_nivcsw)


def cpu_since(start: Usage) -> Usage:
    now = thread_cpu()
    return now[0] - start[0], now[1] - start[1], now[2] - start[2], now[3] - start[3]


def stages(src: Source) -> list[Stage]:
    return [Stage(tar.create_argv(src.path)), Stage(zstd.compress_argv())]


def case_a(src: Source) -> Sample:
    """tar | zstd > /dev/null: kernel pipes only (the same argv and env the runner uses)."""
    env = {"PATH": DEFAULT_PATH, "LC_ALL": "C", "LANG": "C"}
    tar_argv, zstd_argv = (st.argv for st in stages(src))
    tar_argv = [shutil.which(tar_argv[0], path=DEFAULT_PATH), *tar_argv[1:]]
    zstd_argv = [shutil.which(zstd_argv[0], path=DEFAULT_PATH), *zstd_argv[1:]]
    m = Meter()
    with tempfile.TemporaryFile() as err, open(os.devnull, "wb") as null:
        t = subprocess.Popen(tar_argv, stdout=subprocess.PIPE, stderr=err, env=env)
        z = subprocess.Popen(zstd_argv, stdin=t.stdout, stdout=null, stderr=err, env=env)
        assert t.stdout is not None
        t.stdout.close()
        rcs = (t.wait(), z.wait())
        sample = m.sample(0)
        if rcs != (0, 0):
            err.seek(0)
            raise RuntimeError(f"baseline failed {rcs}: {err.read().decode(errors='replace')}")
    return sample


def case_b(src: Source, runner: CommandRunner) -> tuple[Sample, str]:
    """The runner's pipeline read by Python, 1 MiB readinto, sha256, to /dev/null."""
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    h = hashlib.sha256()
    total = 0
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        m = Meter()
        with runner.pipeline(stages(src), timeout=TIMEOUT_S) as pipe:
            t0 = thread_cpu()
            while n := pipe.stdout.readinto(buf):  # type: ignore[attr-defined]
                h.update(view[:n])
                os.write(null, view[:n])
                total += n
            user, system, vcs, ics = cpu_since(t0)
            pipe.wait()
        sample = m.sample(total, reader_user=user, reader_sys=system, reader_vcs=vcs,
                          reader_ics=ics)
    finally:
        os.close(null)
    return sample, h.hexdigest()


class TimedRepository(Repository):
    """A Repository whose writers time their commit (it runs in the store's thread, so the
    store thread's CPU is also read there: what receiving the data cost it) and, inside
    it, the wait for the end of the check on receipt (``tar --list --zstd --file=-`` fed
    as the bytes arrived)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.check_waits: list[float] = []
        self.store_cpu_at_commit: Usage | None = None

    def writer(self, *args: Any, **kwargs: Any) -> Any:
        w = super().writer(*args, **kwargs)
        commit = w.commit

        def timed_commit(*c_args: Any, **c_kwargs: Any) -> Any:
            self.store_cpu_at_commit = thread_cpu()
            check = w._check  # started by the first write; None if nothing was checked
            if check is not None:
                finish = check.finish

                def timed_finish() -> int:
                    t0 = time.perf_counter()
                    try:
                        return finish()
                    finally:
                        self.check_waits.append(time.perf_counter() - t0)

                check.finish = timed_finish  # type: ignore[method-assign]
            return commit(*c_args, **c_kwargs)

        w.commit = timed_commit  # type: ignore[method-assign]
        return w


def case_c(src: Source, runner: CommandRunner, work: str) -> tuple[Sample, str]:
    """RemoteWriter -> channel frames -> StoreService -> BackupWriter, then commit."""
    repo_dir = tempfile.mkdtemp(prefix="repo-", dir=work)
    try:
        repo = TimedRepository(repo_dir, CommandRunner())
        store_start: list[Usage] = []

        def serve_store(ch: Any) -> int:  # runs in the connector's thread
            store_start.append(thread_cpu())
            return serve(StoreService(repo, "bench"), ch)

        connector = in_process_connector(serve_store, peer="bench-store")
        m = Meter()
        client = StoreClient(connector, name="bench-store")
        try:
            # like proxy.stream.stream_duplicate: the put is open before the pipeline starts
            writer = client.writer("bench", "/bench/src", {"duplicate_kind": "snapshot"})
            t_setup = m.now()
            with runner.pipeline(stages(src), timeout=TIMEOUT_S) as pipe:
                t0 = thread_cpu()
                writer.write_from(pipe.stdout)
                proxy = cpu_since(t0)
                pipe.wait()
            t_stream = m.now()
            c_stream = Meter._children() - m.c0
            p_stream = time.process_time() - m.p0
            backup = writer.commit({"file_count": src.files, "source_bytes": src.bytes})
            t_commit = m.now()
        finally:
            client.close()
        at_commit = repo.store_cpu_at_commit
        assert at_commit is not None and store_start
        sample = m.sample(
            writer.bytes, setup=t_setup, stream=t_stream - t_setup,
            commit=t_commit - t_stream, check_wait=repo.check_waits[-1],
            stream_py_cpu=p_stream, stream_child_cpu=c_stream,
            proxy_user=proxy[0], proxy_sys=proxy[1], proxy_vcs=proxy[2], proxy_ics=proxy[3],
            **{f"store_{k}": at_commit[i] - store_start[0][i]
               for i, k in enumerate(("user", "sys", "vcs", "ics"))})
        assert backup["sha256"] == writer.sha256 and backup["archive_bytes"] == writer.bytes, \
            backup
        archives = list((Path(repo_dir) / backup["id"].rsplit("/", 1)[0]).glob("*.tar.zst"))
        assert len(archives) == 1, archives
        # not timed above: the store's check alone, its own command fed the stored file
        with open(archives[0], "rb") as f:
            t0 = time.perf_counter()
            subprocess.run(tar.list_argv("-", verbose=False), stdin=f, check=True,
                           env={"PATH": DEFAULT_PATH, "LC_ALL": "C"}, stdout=subprocess.DEVNULL)
            sample.phases["check_alone"] = time.perf_counter() - t0
        return sample, writer.sha256
    finally:
        shutil.rmtree(repo_dir, ignore_errors=True)


# -- reporting ----------------------------------------------------------------------
def _version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10,
                             check=False).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    return out.strip().splitlines()[0] if out.strip() else "unknown"


def sha256_alone(nbytes: int) -> float:
    """CPU seconds of one sha256 pass over ``nbytes`` from memory, 1 MiB at a time: the
    floor for each hashing side (B hashes once, C twice: proxy and store)."""
    buf = os.urandom(CHUNK)
    h = hashlib.sha256()
    full, rest = divmod(nbytes, CHUNK)
    c0 = thread_cpu()
    for _ in range(full):
        h.update(buf)
    h.update(buf[:rest])
    user, system, _, _ = cpu_since(c0)
    return user + system


def write_alone(nbytes: int, directory: str) -> float:
    """CPU seconds of writing ``nbytes`` from memory to a new file in ``directory``, 1 MiB
    at a time (no fsync): the kernel's copy into the page cache that the store also pays."""
    buf = os.urandom(CHUNK)
    full, rest = divmod(nbytes, CHUNK)
    path = os.path.join(directory, "write-alone")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        c0 = thread_cpu()
        for _ in range(full):
            os.write(fd, buf)
        os.write(fd, buf[:rest])
        user, system, _, _ = cpu_since(c0)
    finally:
        os.close(fd)
        os.unlink(path)
    return user + system


def med(samples: list[Sample], attr: str) -> float:
    return statistics.median(getattr(s, attr) for s in samples)


def med_phase(samples: list[Sample], name: str) -> float:
    return statistics.median(s.phases[name] for s in samples)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=256, help="size of the source tree (MiB)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per case (median shown)")
    ap.add_argument("--small-files", type=int, default=400, help="how many small files")
    ap.add_argument("--tmpdir", default=None, help="where the source and repository go "
                                                    "(default: the system's temp dir)")
    args = ap.parse_args(argv)
    if args.mib < 1 or args.repeat < 1:
        ap.error("--mib and --repeat must be at least 1")

    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count() or 0
    print(f"machine: {platform.machine()}, os.cpu_count()={os.cpu_count()}, "
          f"usable CPUs={affinity}, Python {platform.python_version()}, "
          f"{platform.system()} {platform.release()}")
    print(f"tools:   {_version(['tar', '--version'])}; {_version(['zstd', '--version'])}")
    load_before = os.getloadavg()

    work = tempfile.mkdtemp(prefix="sanoffload-bench-", dir=args.tmpdir)
    try:
        t0 = time.perf_counter()
        src = make_source(work, args.mib, args.small_files)
        print(f"source:  {src.bytes / MiB:.1f} MiB in {src.files} files (half os.urandom, "
              f"one text file, {args.small_files} small files) under {work}; "
              f"generated in {time.perf_counter() - t0:.1f} s")
        runner = CommandRunner()
        # warm-up, not counted: binaries and the source in the page cache, lazy imports
        case_a(src)
        case_b(src, runner)
        case_c(src, runner, work)
        results: dict[str, list[Sample]] = {"A": [], "B": [], "C": []}
        digests: set[str] = set()
        sizes: set[int] = set()
        for _ in range(args.repeat):
            results["A"].append(case_a(src))
            sample, digest = case_b(src, runner)
            results["B"].append(sample)
            digests.add(digest)
            sizes.add(sample.out_bytes)
            sample, digest = case_c(src, runner, work)
            results["C"].append(sample)
            digests.add(digest)
            sizes.add(sample.out_bytes)
        hashing = [sha256_alone(max(sizes)) for _ in range(args.repeat)]
        writing = [write_alone(max(sizes), work) for _ in range(args.repeat)]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    load_after = os.getloadavg()

    out_bytes = max(sizes)
    print(f"archive: {out_bytes / MiB:.1f} MiB compressed (ratio {src.bytes / out_bytes:.2f}); "
          f"B and C produced {'the same sha256' if len(digests) == 1 else 'DIFFERENT sha256s'}"
          f"{'' if len(sizes) == 1 else ' and sizes ' + str(sorted(sizes))}")
    print(f"median of {args.repeat} run(s); CPU = seconds of CPU time "
          f"(py: this process, all threads; children: tar, zstd, the store's check)")
    print()
    base = med(results["A"], "wall")
    base_cpu = med(results["A"], "py_cpu") + med(results["A"], "child_cpu")
    labels = {"A": "A  tar | zstd > /dev/null",
              "B": "B  pipeline -> Python sha256",
              "C": "C  RemoteWriter -> store"}
    head = (f"{'case':<31} {'seconds':>8} {'min-max':>13} {'out MiB/s':>10} "
            f"{'src MiB/s':>10} {'x A':>6} {'py CPU':>7} {'child CPU':>10} {'CPU x A':>8}")
    print(head)
    print("-" * len(head))
    for key, samples in results.items():
        wall = med(samples, "wall")
        walls = [x.wall for x in samples]
        spread = f"{min(walls):.2f}-{max(walls):.2f}"
        print(f"{labels[key]:<31} {wall:8.3f} {spread:>13} {out_bytes / MiB / wall:10.1f} "
              f"{src.bytes / MiB / wall:10.1f} {wall / base:6.2f} "
              f"{med(samples, 'py_cpu'):7.2f} {med(samples, 'child_cpu'):10.2f} "
              f"{(med(samples, 'py_cpu') + med(samples, 'child_cpu')) / base_cpu:8.2f}")
    c = results["C"]
    stream = med_phase(c, "stream")
    commit = med_phase(c, "commit")
    check_wait = med_phase(c, "check_wait")
    print()
    print("C by phase (medians; the stream phase is the one comparable to A and B):")
    print(f"  connect + hello + put     {med_phase(c, 'setup'):8.3f} s")
    stream_cpu = med_phase(c, "stream_py_cpu") + med_phase(c, "stream_child_cpu")
    print(f"  stream (write_from, wait) {stream:8.3f} s   x A {stream / base:5.2f}   "
          f"py CPU {med_phase(c, 'stream_py_cpu'):.2f} s, "
          f"child CPU {med_phase(c, 'stream_child_cpu'):.2f} s, "
          f"CPU x A {stream_cpu / base_cpu:.2f}")
    print(f"  commit                    {commit:8.3f} s   of which waiting for the check on "
          f"receipt to end {check_wait:.3f} s, the rest (end frame, fsync, publish, manifest) "
          f"{commit - check_wait:.3f} s")
    print(f"  the store's check alone   {med_phase(c, 'check_alone'):8.3f} s   (tar --list "
          "--zstd --file=- fed the stored file; during the stream it runs beside it)")
    hash_cpu = statistics.median(cpu for cpu in hashing)
    print()
    print("Python threads (medians; user: where hashing shows, system: the kernel copying; "
          "context switches: vol = waited (a pipe, the GIL), invol = preempted):")
    rows = (("B reader: readinto, sha256, write to /dev/null", results["B"], "reader"),
            ("C proxy:  readinto, sha256, frames into the pipe", c, "proxy"),
            ("C store:  frames from the pipe, sha256, write file", c, "store"))
    for label, samples, key in rows:
        print(f"  {label:<52} user {med_phase(samples, key + '_user'):5.2f} s  "
              f"system {med_phase(samples, key + '_sys'):5.2f} s  "
              f"ctx switches {med_phase(samples, key + '_vcs'):5.0f} vol "
              f"{med_phase(samples, key + '_ics'):4.0f} invol")
    print(f"  {'one sha256 pass over the archive, from memory':<52} CPU  {hash_cpu:5.2f} s  "
          f"({out_bytes / MiB / max(hash_cpu, 1e-9):.0f} MiB per CPU second)")
    print(f"  {'one write of the archive to a file, from memory':<52} CPU  "
          f"{statistics.median(writing):5.2f} s  (no fsync)")
    b = med(results["B"], "wall")
    print()
    print(f"ratios: B/A {b / base:.2f}   C/A {med(c, 'wall') / base:.2f}   "
          f"C stream/A {stream / base:.2f}")
    print(f"load average (1 min) before {load_before[0]:.2f}, after {load_after[0]:.2f} "
          f"on {affinity} CPUs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
