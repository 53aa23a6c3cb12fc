"""Deterministic benchmark trees: the same seed and size give the same bytes, names and times.

A "mixed" tree holds about 30 % big incompressible files (seeded random
bytes), 40 % big text files (words drawn from a made-up vocabulary with a
Zipf-like frequency: zstd -3 shrinks them to about a third, and no block
repeats, so deduplicating tools gain nothing from them) and 30 % small files
(64 B to 256 KiB, log-uniform, half text, half random) in directories of 200,
plus a few symlinks. "small" is N files of ~1 KiB; "large" is the same bytes
in 4 files. Every mtime is fixed, so two generations are identical trees.
"""

from __future__ import annotations

import math
import os
import random
import shutil
from pathlib import Path

MIB = 1 << 20
MTIME = 1_790_000_000  # fixed: the tree (and its tar stream) does not depend on the day


def _vocab(rng: random.Random, n: int = 4000) -> tuple[list[str], list[float]]:
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    words = ["".join(rng.choices(letters, weights=range(26, 0, -1), k=rng.randint(1, 11)))
             for _ in range(n)]
    cum: list[float] = []
    total = 0.0
    for rank in range(1, n + 1):
        total += 1.0 / rank
        cum.append(total)
    return words, cum


class Gen:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.words, self.cum = _vocab(self.rng)

    def text(self, size: int) -> bytes:
        out: list[bytes] = []
        have = 0
        while have < size:
            ws = self.rng.choices(self.words, cum_weights=self.cum,
                                 k=min(200_000, (size - have) // 5 + 16))
            chunk = "\n".join(" ".join(ws[i:i + 12]) for i in range(0, len(ws), 12)).encode()
            out.append(chunk)
            have += len(chunk) + 1
        return b"\n".join(out)[:size]

    def random(self, size: int) -> bytes:
        return self.rng.randbytes(size)

    def big_file(self, path: Path, size: int, text: bool) -> None:
        with open(path, "wb") as f:
            left = size
            while left > 0:
                n = min(left, 32 * MIB)
                f.write(self.text(n) if text else self.random(n))
                left -= n
        os.utime(path, (MTIME, MTIME))


def _finish(tmp: Path, final: Path) -> Path:
    for d, _dirs, _files in os.walk(tmp, topdown=False):
        os.utime(d, (MTIME, MTIME))
    os.rename(tmp, final)
    return final


def _fresh(final: Path) -> Path | None:
    """The cached tree, or None after clearing a half-made one."""
    if final.is_dir():
        return final
    tmp = final.with_name(final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return None


def mixed(cache: Path, size: int, seed: int) -> Path:
    """A ~``size``-byte tree: big random, big text, many small files."""
    final = cache / f"mixed-{size // MIB}M-seed{seed}"
    if _fresh(final):
        return final
    tmp = final.with_name(final.name + ".tmp")
    g = Gen(seed)
    big = tmp / "big"
    big.mkdir()
    rand_total, text_total = int(size * 0.3), int(size * 0.4)
    for i in range(3):
        g.big_file(big / f"blob{i}.bin", rand_total // 3, text=False)
    for i in range(4):
        g.big_file(big / f"log{i}.txt", text_total // 4, text=True)
    small_left = size - rand_total - text_total
    n = 0
    lo, hi = math.log(64), math.log(256 * 1024)
    while small_left > 0:
        d = tmp / "small" / f"d{n // 200:04d}"
        if n % 200 == 0:
            d.mkdir(parents=True)
        sz = min(small_left, int(math.exp(g.rng.uniform(lo, hi))))
        text = n % 2 == 0
        p = d / (f"f{n:06d}.txt" if text else f"f{n:06d}.dat")
        p.write_bytes(g.text(sz) if text else g.random(sz))
        os.utime(p, (MTIME, MTIME))
        small_left -= sz
        n += 1
    links = tmp / "links"
    links.mkdir()
    for i in range(20):
        (links / f"l{i}").symlink_to(f"../small/d0000/f{i:06d}.{'txt' if i % 2 == 0 else 'dat'}")
        os.utime(links / f"l{i}", (MTIME, MTIME), follow_symlinks=False)
    return _finish(tmp, final)


def small_files(cache: Path, count: int, seed: int) -> Path:
    """``count`` files of 256 B to 1.75 KiB (half text, half random) in directories of 1000."""
    final = cache / f"small-{count}-seed{seed}"
    if _fresh(final):
        return final
    tmp = final.with_name(final.name + ".tmp")
    g = Gen(seed)
    pool_t, pool_r = g.text(4 * MIB), g.random(4 * MIB)
    for n in range(count):
        if n % 1000 == 0:
            d = tmp / f"d{n // 1000:04d}"
            d.mkdir()
        sz = g.rng.randint(256, 1792)
        pool = pool_t if n % 2 == 0 else pool_r
        off = g.rng.randrange(0, len(pool) - sz)
        p = d / f"f{n:06d}"
        p.write_bytes(pool[off:off + sz])
        os.utime(p, (MTIME, MTIME))
    return _finish(tmp, final)


def few_large(cache: Path, total: int, seed: int) -> Path:
    """``total`` bytes in 4 files, half text, half random (the same mix as :func:`small_files`)."""
    final = cache / f"large-{total // MIB}M-seed{seed}"
    if _fresh(final):
        return final
    tmp = final.with_name(final.name + ".tmp")
    g = Gen(seed)
    for i in range(4):
        g.big_file(tmp / f"big{i}", total // 4, text=i % 2 == 0)
    return _finish(tmp, final)


def tree_bytes(path: Path) -> tuple[int, int]:
    """(bytes in regular files, entries) under ``path``."""
    total = entries = 0
    for d, dirs, files in os.walk(path):
        entries += len(dirs) + len(files)
        for name in files:
            st = os.lstat(os.path.join(d, name))
            if not os.path.islink(os.path.join(d, name)):
                total += st.st_size
    return total, entries
