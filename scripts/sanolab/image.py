"""Build the lab's root image from Debian's packages with mmdebstrap.

One image per release, cached under ``cache_dir()/RELEASE-HASH/`` where HASH
covers everything that goes into it (package list, provisioning scripts, this
file), so changing the recipe rebuilds and an unchanged recipe never does.
The image is a raw ext4 file made with ``mkfs.ext4 -d`` (no loop mount) plus
the kernel and initrd taken out of it; VMs boot it through qcow2 overlays.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

from sanoffload.runner import Runner

from . import config

log = logging.getLogger(__name__)

IMAGE_SIZE = "3G"
RECIPE_FILES = ("packages.txt", "common.sh", "lab-image.sh")


def packages() -> list[str]:
    text = (config.PROVISION / "packages.txt").read_text()
    return [ln.split("#", 1)[0].strip() for ln in text.splitlines() if ln.split("#", 1)[0].strip()]


def recipe_hash(release: str) -> str:
    h = hashlib.sha256(release.encode())
    for name in RECIPE_FILES:
        h.update((config.PROVISION / name).read_bytes())
    h.update(Path(__file__).read_bytes())
    return h.hexdigest()[:12]


def image_dir(release: str) -> Path:
    return config.cache_dir() / f"{release}-{recipe_hash(release)}"


def is_built(release: str) -> bool:
    d = image_dir(release)
    return all((d / n).exists()
               for n in ("root.img", "vmlinuz", "initrd.img", "id_ed25519", "DONE"))


def debian_mirror() -> str:
    """The Debian mirror this machine's apt already uses (never hard-coded)."""
    candidates: list[str] = []
    srcs = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in srcs:
        try:
            text = path.read_text()
        except OSError:
            continue
        if path.suffix == ".sources":
            candidates += re.findall(r"^URIs:\s*(\S+)", text, flags=re.M)
        else:
            candidates += re.findall(r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+)", text, flags=re.M)
    for uri in candidates:
        if re.search(r"/debian/?$", uri) and "security" not in uri:
            return uri.rstrip("/")
    raise SystemExit("lab: no Debian mirror found in /etc/apt/sources.list*; "
                     "add one or set SANOLAB_MIRROR")


def build(runner: Runner, release: str, *, force: bool = False) -> Path:
    """Build (or reuse) the image for ``release``; return its directory."""
    if release not in config.RELEASES:
        raise SystemExit(f"lab: unknown release {release!r} "
                         f"(choose from {', '.join(config.RELEASES)})")
    dest = image_dir(release)
    if is_built(release) and not force:
        log.info("image %s is up to date", dest)
        return dest
    mirror = os.environ.get("SANOLAB_MIRROR") or debian_mirror()
    config.cache_dir().mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"build-{release}-", dir=config.cache_dir()))
    try:
        root = work / "root"
        key = work / "id_ed25519"
        runner.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "sanolab", "-f", str(key)])
        hooks = [
            f'copy-in {config.PROVISION / "common.sh"} {config.PROVISION / "lab-image.sh"} /tmp',
            'chroot "$1" sh /tmp/common.sh',
            'chroot "$1" sh /tmp/lab-image.sh',
            f'upload {key}.pub /root/.ssh/authorized_keys',
            ('chmod 600 "$1/root/.ssh/authorized_keys"; '
             'rm -f "$1/tmp/common.sh" "$1/tmp/lab-image.sh"'),
        ]
        argv = ["mmdebstrap", "--variant=minbase", "--mode=root", "--format=directory",
                "--include=" + ",".join(packages())]
        argv += [f"--customize-hook={h}" for h in hooks]
        argv += [release, str(root), mirror]
        log.info("building %s image from %s (takes 2-4 minutes)", release, mirror)
        runner.run(argv, timeout=1800)
        kernels = sorted((root / "boot").glob("vmlinuz-*"))
        initrds = sorted((root / "boot").glob("initrd.img-*"))
        if not kernels or not initrds:
            raise SystemExit("lab: the image has no kernel/initrd in /boot")
        shutil.copy2(kernels[-1], work / "vmlinuz")
        shutil.copy2(initrds[-1], work / "initrd.img")
        runner.run(["mkfs.ext4", "-q", "-F", "-L", "sanolab-root", "-d", str(root),
                    str(work / "root.img"), IMAGE_SIZE], timeout=900)
        shutil.rmtree(root)
        (work / "DONE").write_text(f"{release} {recipe_hash(release)} {kernels[-1].name}\n")
        if dest.exists():
            shutil.rmtree(dest)
        work.rename(dest)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    _prune_old(release, keep=dest)
    return dest


def _prune_old(release: str, keep: Path) -> None:
    """Drop images of older recipes of the same release: they are never used again."""
    for old in config.cache_dir().glob(f"{release}-*"):
        if old != keep and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
