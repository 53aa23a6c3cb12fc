"""A fresh machine, as a new user has it: ``scripts/setup`` and the unit tier in a minimal root.

CI's proof that the README's install works on stock Debian: a ``minbase``
root with nothing but python3 and git (no pip, PEP 668 in force), a
``git clone`` of this checkout in it, then in a chroot::

    ./scripts/setup                  # the README's command: apt packages, then .venv
    ./scripts/test -m unit

(``--tier unit`` runs ``./scripts/setup --tier unit`` instead: the venv and
the unit tier's tools only. On this project's CI machine plain setup costs
~5 s more, 81 packages and 47 MB, so CI runs the command the README gives.)

The root is built once with mmdebstrap and cached as a tar under
``cache_dir()/fresh-RELEASE-HASH/`` (HASH covers what goes in: release,
mirror, packages), beside the lab images; every run unpacks a pristine copy,
so nothing one run installs is seen by the next.

The chroot runs inside its own mount and PID namespaces (``unshare``), on a
tmpfs: the root and the mounts it needs (/proc, a read-only /sys, a private
/dev) are unmounted on the way out, and should an unmount fail or this process
be killed, the kernel drops them with the namespace and kills whatever the
chroot left running, so nothing stays mounted or left over on the host.

Names are resolved with this machine's /etc/resolv.conf, and pip verifies TLS
with the CA bundle this machine's pip is configured with (see ``_pip_cert``);
nothing else of this machine's Python or pip setup goes in.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import shutil
import stat
import sys
import tempfile
import time
from pathlib import Path

from sanoffload.errors import CommandError, CommandTimeoutError, Interrupted
from sanoffload.runner import CommandRunner, Runner
from sanoffload.signals import install_signal_handlers

from . import config
from .image import debian_mirror

log = logging.getLogger("fresh-root")

#: what a stock machine has: Debian's python3 (no pip, externally managed) and git to clone with
PACKAGES = ("python3", "git")
RELEASES = ("bookworm", "trixie")
CLONE = "/root/sanoffload"
#: a login's environment, not ours: no PIP_*, PYTHON* or pyenv from this machine leaks in
CHROOT_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
              "HOME": "/root", "LANG": "C.UTF-8", "TERM": "dumb"}
#: taken from our environment when set: how this network reaches the registries
PASSTHROUGH = ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY",
               "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_TRUSTED_HOST", "PIP_CERT")
#: where the root gets a copy of the CA bundle this machine's pip verifies with
PIP_CERT_IN_ROOT = "/usr/local/share/sanoffload-fresh-root/pip-cert.pem"
STEP_TIMEOUT = 1800.0
#: a cap, not a reservation: the root takes ~0.9 GB after plain setup
ROOT_TMPFS_SIZE = "6G"


# -- the cached root -------------------------------------------------------------

def recipe_hash(release: str, mirror: str) -> str:
    h = hashlib.sha256("\0".join(("minbase", release, mirror, *PACKAGES)).encode())
    return h.hexdigest()[:12]


def root_tar(release: str, mirror: str) -> Path:
    return config.cache_dir() / f"fresh-{release}-{recipe_hash(release, mirror)}" / "root.tar"


def build(runner: Runner, release: str, mirror: str, *, force: bool = False) -> Path:
    """Build (or reuse) the minimal root's tar for ``release``; return its path."""
    tar = root_tar(release, mirror)
    if tar.exists() and (tar.parent / "DONE").exists() and not force:
        log.info("root %s is cached", tar)
        return tar
    config.cache_dir().mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"build-fresh-{release}-", dir=config.cache_dir()))
    try:
        log.info("building a minimal %s root from %s", release, mirror)
        runner.run(["mmdebstrap", "--quiet", "--variant=minbase", "--mode=root", "--format=tar",
                    "--include=" + ",".join(PACKAGES), release, str(work / "root.tar"), mirror],
                   timeout=STEP_TIMEOUT)
        (work / "DONE").write_text(f"{release} {mirror} {' '.join(PACKAGES)}\n")
        if tar.parent.exists():
            shutil.rmtree(tar.parent)
        work.rename(tar.parent)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    # older recipes of the same release are never used again
    for old in config.cache_dir().glob(f"fresh-{release}-*"):
        if old != tar.parent and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
    return tar


# -- the clone -------------------------------------------------------------------

def clone(runner: Runner, dest: Path, *, committed_only: bool, only: tuple[str, ...] = ()) -> int:
    """``git clone`` the checkout to ``dest``; unless ``committed_only``, carry over
    its uncommitted changes too (none on CI's clean checkout), so what runs is
    what the tree holds; with ``only``, just those under these paths. Returns
    how many paths were carried over."""
    repo = str(config.REPO)
    runner.run(["git", "clone", "--quiet", "--no-hardlinks", repo, str(dest)], timeout=300)
    if committed_only:
        return 0
    out = runner.run(["git", "-C", repo, "status", "--porcelain=v1", "-z", "--untracked-files=all"],
                     timeout=60).stdout
    fields = out.split("\0")
    carried = 0
    i = 0
    while i < len(fields):
        entry = fields[i]
        i += 1
        if len(entry) < 4:
            continue
        if entry[0] in "RC":  # a rename's source follows in its own field
            i += 1
        rel = entry[3:]
        if only and not any(rel == p or rel.startswith(p.rstrip("/") + "/") for p in only):
            continue
        src = config.REPO / rel
        dst = dest / rel
        if not dst.resolve().is_relative_to(dest.resolve()):
            raise SystemExit(f"fresh-root: refusing path outside the clone: {rel!r}")
        if src.is_symlink() or src.is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            if dst.is_symlink() or dst.exists():
                dst.unlink()
            shutil.copy2(src, dst, follow_symlinks=False)
        elif not src.exists() and (dst.is_symlink() or dst.exists()):
            dst.unlink()
        else:
            continue
        carried += 1
    return carried


# -- inside the namespaces ---------------------------------------------------------

def _mount(runner: Runner, mounts: list[Path], fstype: str, options: str, source: str,
           point: Path) -> None:
    runner.run(["mount", "-t", fstype, "-o", options, source, str(point)])
    mounts.append(point)


def _make_dev(runner: Runner, mounts: list[Path], dev: Path) -> None:
    """A private /dev with the nodes setup and the tests use (the host's is never bound in)."""
    _mount(runner, mounts, "tmpfs", "mode=755,nosuid", "fresh-dev", dev)
    for name, major, minor in (("null", 1, 3), ("zero", 1, 5), ("full", 1, 7), ("random", 1, 8),
                               ("urandom", 1, 9), ("tty", 5, 0)):
        os.mknod(dev / name, 0o666 | stat.S_IFCHR, os.makedev(major, minor))
        os.chmod(dev / name, 0o666)  # mknod's mode is cut by the umask
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                         ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2"),
                         ("ptmx", "pts/ptmx")):
        os.symlink(target, dev / name)
    (dev / "pts").mkdir()
    _mount(runner, mounts, "devpts", "newinstance,ptmxmode=0666,mode=0620", "devpts", dev / "pts")
    (dev / "shm").mkdir()
    # multiprocessing's semaphores live here
    _mount(runner, mounts, "tmpfs", "mode=1777,nosuid,nodev", "fresh-shm", dev / "shm")


def _prepare(runner: Runner, root: Path, args: argparse.Namespace) -> None:
    """Unpack the pristine root, give it this network's settings, clone the project into it."""
    runner.run(["tar", "-C", str(root), "--numeric-owner", "-xf", str(args.tar)], timeout=600)
    # the chroot resolves names the way this machine does
    resolv = root / "etc" / "resolv.conf"
    if resolv.is_symlink() or resolv.exists():
        resolv.unlink()
    shutil.copyfile("/etc/resolv.conf", resolv)
    if args.cert:
        dest = root / PIP_CERT_IN_ROOT.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(args.cert, dest)
    carried = clone(runner, root / CLONE.lstrip("/"), committed_only=args.committed,
                    only=tuple(args.only))
    if carried:
        print(f"fresh-root: cloned {config.REPO}; carried over {carried} uncommitted path(s)",
              flush=True)


def _step(runner: Runner, root: Path, argv: list[str], env: dict[str, str]) -> tuple[bool, float]:
    """Run ``argv`` in the clone inside the chroot; print its output; (passed, seconds)."""
    shown = " ".join(argv)
    print(f"fresh-root: {shown} ...", flush=True)
    started = time.monotonic()
    cmd = ["chroot", str(root), "/usr/bin/env", "-i", "-C", CLONE,
           *(f"{k}={v}" for k, v in env.items()), *argv]
    try:
        res = runner.run(cmd, timeout=STEP_TIMEOUT)
        output, passed = res.stdout + res.stderr, True
    except CommandTimeoutError as exc:
        output, passed = f"{exc.stdout}{exc.stderr}\n(timed out)", False
    except CommandError as exc:
        output, passed = f"{exc.stdout}{exc.stderr}", False
    took = time.monotonic() - started
    print(output.rstrip(), flush=True)
    print(f"fresh-root: {shown}: {'passed' if passed else 'FAILED'} in {took:.1f} s", flush=True)
    return passed, took


def inside(argv: list[str]) -> int:
    """In the new mount and PID namespaces: a tmpfs root, the chroot's mounts, the steps,
    unmount."""
    parser = argparse.ArgumentParser(prog="freshroot --inside")
    parser.add_argument("work", type=Path)
    parser.add_argument("--tar", type=Path, required=True)
    parser.add_argument("--cert", type=Path)
    parser.add_argument("--tier", default="all")
    parser.add_argument("--committed", action="store_true")
    parser.add_argument("--only", action="append", default=[])
    args = parser.parse_args(argv)
    runner = CommandRunner(default_timeout=60)
    env = dict(CHROOT_ENV)
    env.update({k: os.environ[k] for k in PASSTHROUGH if k in os.environ})
    root: Path = args.work / "root"
    root.mkdir()
    mounts: list[Path] = []
    try:
        started = time.monotonic()
        # in memory: unpacking is quick and the whole root goes with one unmount
        _mount(runner, mounts, "tmpfs", f"mode=755,size={ROOT_TMPFS_SIZE}", "fresh-root", root)
        _prepare(runner, root, args)
        times = [f"unpack and clone {time.monotonic() - started:.0f} s"]
        _mount(runner, mounts, "proc", "nosuid,nodev,noexec", "proc", root / "proc")
        _mount(runner, mounts, "sysfs", "ro,nosuid,nodev,noexec", "sysfs", root / "sys")
        _make_dev(runner, mounts, root / "dev")
        setup = (["./scripts/setup"] if args.tier == "all"
                 else ["./scripts/setup", "--tier", args.tier])
        passed, took = _step(runner, root, setup, env)
        times.append(f"setup {took:.0f} s")
        if passed:
            passed, took = _step(runner, root, ["./scripts/test", "-m", "unit"], env)
            times.append(f"unit tier {took:.0f} s")
        print(f"fresh-root: {', '.join(times)}", flush=True)
        return 0 if passed else 1
    finally:
        for mnt in reversed(mounts):
            try:
                runner.run(["umount", str(mnt)])
            except CommandError as exc:
                # a process the chroot left still holds it: detach it now; the
                # namespace, and with it the mount, goes when we exit anyway
                print(f"fresh-root: {exc}; unmounting lazily", flush=True)
                runner.run(["umount", "--lazy", str(mnt)], ok_codes={32: "already gone"})


# -- the whole step ----------------------------------------------------------------

def _pip_cert(runner: Runner) -> Path | None:
    """The CA bundle this machine's pip verifies the registry with, if it names one.

    A network that intercepts TLS hands its machines a CA to trust; a stock
    root lacks it and pip fails with CERTIFICATE_VERIFY_FAILED, which is this
    network's doing, not the install's. The root gets the same bundle, the
    way this network's admin would set a new machine up.
    """
    named = os.environ.get("PIP_CERT") or runner.run(
        [sys.executable, "-m", "pip", "config", "get", "global.cert"],
        ok_codes={1: "not set"}).stdout.strip()
    return Path(named) if named and Path(named).is_file() else None


def _mounted_under(path: Path) -> list[str]:
    """Mount points at or below ``path`` in our own namespace (there should be none)."""
    prefix = str(path.resolve())
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].encode().decode("unicode_escape")
        if point == prefix or point.startswith(prefix + "/"):
            found.append(point)
    return found


def _follow(runner: Runner, argv: list[str], log_path: Path, env: dict[str, str],
            limit: float) -> int:
    """Run ``argv`` with its output going to ``log_path`` and relayed to ours as it comes."""
    log_path.touch()
    proc = runner.spawn(argv, log_path=str(log_path), env=env)
    deadline = time.monotonic() + limit
    try:
        with open(log_path, "rb") as out:
            while True:
                try:
                    rc = proc.wait(timeout=2)
                except CommandTimeoutError:
                    sys.stdout.buffer.write(out.read())
                    sys.stdout.flush()
                    if time.monotonic() > deadline:
                        print(f"fresh-root: gave up after {limit:.0f} s", flush=True)
                        return 124
                    continue
                sys.stdout.buffer.write(out.read())
                sys.stdout.flush()
                return rc
    finally:
        if proc.poll() is None:
            proc.kill()  # unshare's --kill-child takes the namespace's processes along


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/fresh-root",
        description="Run ./scripts/setup and the unit tier in a fresh minimal Debian root.")
    parser.add_argument("--release", choices=RELEASES, default="bookworm")
    parser.add_argument("--tier", choices=("all", "unit"), default="all",
                        help="unit: ./scripts/setup --tier unit (the venv only) instead of "
                             "plain setup")
    parser.add_argument("--committed", action="store_true",
                        help="the clone only, without the checkout's uncommitted changes")
    parser.add_argument("--only", action="append", default=[], metavar="PATH",
                        help="carry over only the uncommitted changes under PATH (repeatable)")
    parser.add_argument("--rebuild", action="store_true", help="rebuild the cached root")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="fresh-root: %(message)s")
    if os.geteuid() != 0:
        print("fresh-root: run as root (mmdebstrap, chroot, mount)", file=sys.stderr)
        return 2
    runner = CommandRunner(default_timeout=120)
    mirror = os.environ.get("SANOLAB_MIRROR") or debian_mirror()
    started = time.monotonic()
    tar = build(runner, args.release, mirror, force=args.rebuild)
    built = time.monotonic() - started

    env = {"PYTHONPATH": f"{config.REPO / 'scripts'}:{config.REPO}", "PYTHONUNBUFFERED": "1"}
    env.update({k: os.environ[k] for k in PASSTHROUGH if k in os.environ})
    # private propagation: no mount made in there ever shows on the host
    inner = ["unshare", "--mount", "--propagation=private", "--pid", "--fork", "--kill-child", "--",
             sys.executable, "-m", "sanolab.freshroot", "--inside", "--tar", str(tar)]
    env.pop("PIP_CERT", None)
    cert = _pip_cert(runner)
    if cert is not None:
        inner += ["--cert", str(cert)]
        env["PIP_CERT"] = PIP_CERT_IN_ROOT
        log.info("pip in the root verifies TLS with a copy of %s, as pip here does", cert)
    inner += ["--tier", args.tier] + ["--committed"] * args.committed
    for path in args.only:
        inner += ["--only", path]
    work = Path(tempfile.mkdtemp(prefix=f"sanoffload-fresh-{args.release}-", dir="/var/tmp"))
    # the chroot runs in its own session: a CI job cancelled with SIGTERM must
    # reach the finally below, which takes it down
    install_signal_handlers()
    try:
        rc = _follow(runner, [*inner, str(work)], work / "log", env, 2 * STEP_TIMEOUT + 600)
    except Interrupted as exc:
        log.error("%s: the chroot and its mounts are gone with their namespace", exc)
        rc = 130
    finally:
        left = _mounted_under(work)
        if left:
            log.error("still mounted, so %s is kept: %s", work, ", ".join(left))
        else:
            shutil.rmtree(work, ignore_errors=True)
    log.info("%s: %s (root %s %.0f s; %.0f s in all)", args.release,
             "passed" if rc == 0 else f"FAILED (exit {rc})",
             "built in" if built > 5 else "cached,", built, time.monotonic() - started)
    return rc if rc in (0, 130) else 1


if __name__ == "__main__":
    if sys.argv[1:2] == ["--inside"]:
        sys.exit(inside(sys.argv[2:]))
    sys.exit(main(sys.argv[1:]))
