"""Install the working tree's sanoffload into lab VMs, the way the README tells a sysadmin to.

A wheel is built from the tree (``pip wheel --no-deps``) and, with the ``sh``
wheel (Debian's is older than the runner needs), sent over ssh as a tar stream;
each VM installs it into a virtual environment, ``/opt/sanoffload``, and links
``/usr/local/bin/sanoffload`` to it (README, *Deploying on real hosts*). The VMs
have no network beyond the lab, so the venv sees Debian's click, pyudev, psutil
and python3-rtslib-fb through ``--system-site-packages`` (the README's variant
for the agent) and pip installs with ``--no-index`` from the wheels sent.
"""

from __future__ import annotations

import hashlib
import io
import shlex
import sys
import tarfile
import tempfile
import tomllib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from sanoffload.runner import Runner

from . import config, vm

SH_REQUIREMENT = "sh>=2.0,<3"
#: pure-Python wheels Debian does not package (or packages too old), sent with sanoffload's
PURE_WHEELS = {"sh": SH_REQUIREMENT, "mfusepy": "mfusepy>=3.1,<4"}
VENV = "/opt/sanoffload"
#: the package extras a test may add to some VMs (``pip install 'sanoffload[s3]'`` on a real
#: host), with what proves one installed: not in every VM, as botocore alone takes a minute
#: to install under emulation
EXTRA_IMPORTS = {"s3": "boto3, cryptography.hazmat.primitives.ciphers.aead"}


def extra_requirements(extra: str) -> list[str]:
    """The requirements of ``extra`` as pyproject.toml names them (the one list)."""
    project = tomllib.loads((config.REPO / "pyproject.toml").read_text())["project"]
    found: list[str] = project["optional-dependencies"][extra]
    return found


#: the head of every install script: the wheels sent on stdin, unpacked into a temp dir
UNPACK = r"""
set -eu
wheels=$(mktemp -d /tmp/sanoffload-wheels.XXXXXX)
trap 'rm -rf "$wheels"' EXIT
tar -x -C "$wheels" -f -
"""

# One pip run: under emulation each costs ~15 s. --no-deps: the dependencies are
# Debian's (the VMs have no network); the import check below proves they are there.
INSTALL_SCRIPT = UNPACK + r"""
[ -x VENV/bin/pip ] || python3 -m venv --system-site-packages VENV
VENV/bin/pip install --quiet --disable-pip-version-check --no-index --force-reinstall \
    --no-deps "$wheels"/*.whl
ln -sfn VENV/bin/sanoffload /usr/local/bin/sanoffload
VENV/bin/python -c 'import click, psutil, pyudev, sh, mfusepy, zstandard, sanoffload
print(sanoffload.__version__)'
""".replace("VENV", VENV)


def _pip(runner: Runner, *args: str) -> None:
    # this interpreter's pip: on a fresh machine the system python3 has none (PEP 668)
    runner.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args], timeout=300)


def _pure_wheel(runner: Runner, name: str) -> Path:
    """The cached wheel of ``name`` (downloaded once): pure Python, so one fits every release."""
    wheels = config.cache_dir() / "wheels"
    pattern = f"{name}-*-py3-none-any.whl"
    found = sorted(wheels.glob(pattern))
    if found:
        return found[-1]
    wheels.mkdir(parents=True, exist_ok=True)
    _pip(runner, "download", "--quiet", "--no-deps", "--only-binary=:all:", "-d", str(wheels),
         PURE_WHEELS[name])
    found = sorted(wheels.glob(pattern))
    if not found:
        raise SystemExit(f"lab: could not download the {name} wheel")
    return found[-1]


def _extra_wheels(runner: Runner, extra: str, release: str) -> list[Path]:
    """The wheels of ``extra`` and their dependencies for ``release``'s python and glibc,
    downloaded once per requirement list (compiled ones, cryptography and cffi, are per
    release)."""
    wanted = extra_requirements(extra)
    key = hashlib.sha256("\n".join(wanted).encode()).hexdigest()[:12]
    wheels = config.cache_dir() / "wheels" / f"{extra}-{release}-{key}"
    stamp = wheels / ".complete"
    if not stamp.exists():
        wheels.mkdir(parents=True, exist_ok=True)
        # pip takes each platform tag literally: name every manylinux the release can run
        platforms = ["manylinux2014_x86_64", *(f"manylinux_2_{minor}_x86_64"
                                               for minor in range(17, config.GLIBC[release] + 1))]
        _pip(runner, "download", "--quiet", "--only-binary=:all:", "-d", str(wheels),
             "--python-version", config.PYTHON[release], "--implementation", "cp",
             *(arg for p in platforms for arg in ("--platform", p)), *wanted)
        stamp.touch()
    found = sorted(wheels.glob("*.whl"))
    if not found:
        raise SystemExit(f"lab: no wheels downloaded for the {extra} extra ({release})")
    return found


def build_wheel(runner: Runner, dest: Path) -> Path:
    """``pip wheel --no-deps -w DEST REPO``: the wheel a sysadmin would install."""
    _pip(runner, "wheel", "--quiet", "--no-deps", "-w", str(dest), str(config.REPO))
    found = sorted(dest.glob("sanoffload-*.whl"))
    if len(found) != 1:
        raise SystemExit(f"lab: expected one sanoffload wheel in {dest}, found {found}")
    return found[0]


def _tar(wheels: Sequence[Path]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for wheel in wheels:
            tar.add(wheel, arcname=wheel.name, recursive=False)
    return buf.getvalue()


def payload(runner: Runner) -> bytes:
    """A tar of the wheels each VM installs: sanoffload's, built from this tree, and
    :data:`PURE_WHEELS`."""
    with tempfile.TemporaryDirectory(prefix="sanolab-wheel-") as tmp:
        return _tar([build_wheel(runner, Path(tmp)),
                     *(_pure_wheel(runner, n) for n in PURE_WHEELS)])


def _run_on_each(runner: Runner, hosts: Sequence[str], script: str, data: bytes,
                 timeout: float) -> dict[str, str]:
    """``script`` with ``data`` on stdin on every host, in parallel (each VM is its own QEMU
    process): ``{host: its stdout}``."""
    def run(host: str) -> str:
        return vm.ssh(runner, host, ["sh", "-c", script], input=data,
                      timeout=timeout).stdout.strip()

    with ThreadPoolExecutor(max_workers=len(hosts) or 1) as pool:
        return dict(zip(hosts, pool.map(run, hosts), strict=True))


def sync(runner: Runner, hosts: Sequence[str]) -> dict[str, str]:
    return _run_on_each(runner, hosts, INSTALL_SCRIPT, payload(runner), 300)


# the dependencies resolve against the wheels sent and Debian's packages the venv sees
EXTRA_SCRIPT = r"""
if VENV/bin/python -c 'import IMPORTS' 2>/dev/null; then echo present; exit 0; fi
""" + UNPACK + r"""
VENV/bin/pip install --quiet --disable-pip-version-check --no-index --find-links "$wheels" \
    REQUIREMENTS
VENV/bin/python -c 'import IMPORTS'
echo installed
"""


def sync_extra(runner: Runner, release: str, hosts: Sequence[str], extra: str) -> dict[str, str]:
    """Install ``extra``'s dependencies (:func:`extra_requirements`) into ``hosts``' venv,
    unless there already: ``{host: "present" | "installed"}``. Run after :func:`sync` (the
    venv must exist)."""
    script = (EXTRA_SCRIPT.replace("VENV", VENV).replace("IMPORTS", EXTRA_IMPORTS[extra])
              .replace("REQUIREMENTS", " ".join(map(shlex.quote, extra_requirements(extra)))))
    return _run_on_each(runner, hosts, script, _tar(_extra_wheels(runner, extra, release)), 900)
