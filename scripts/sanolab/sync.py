"""Install the working tree's sanoffload into lab VMs.

The VMs have no network beyond the lab, so the code travels as a tar stream
over ssh: the ``sanoffload`` package, plus the ``sh`` library (Debian's is
older than the runner needs) from a wheel cached on this machine. The other
Python dependencies come from Debian's packages in the image.
"""

from __future__ import annotations

import io
import tarfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

from sanoffload.runner import Runner

from . import config, vm

SH_REQUIREMENT = "sh>=2.0,<3"

ENTRY_POINT = """#!/usr/bin/python3
# installed by 'scripts/lab sync'
import sys
from sanoffload.cli import main
sys.exit(main())
"""

INSTALL_SCRIPT = r"""
set -eu
site=$(python3 -c 'import site; print([p for p in site.getsitepackages() if p.startswith("/usr/local")][0])')
mkdir -p "$site"
rm -rf "$site/sanoffload" "$site/sh" "$site/sh.py"
tar -x -C "$site" -f -
mv "$site/sanoffload-entry" /usr/local/bin/sanoffload
chmod 755 /usr/local/bin/sanoffload
python3 -c 'import sanoffload, sh; print(sanoffload.__version__)'
"""


def _sh_wheel(runner: Runner) -> Path:
    wheels = config.cache_dir() / "wheels"
    found = sorted(wheels.glob("sh-2*.whl"))
    if found:
        return found[-1]
    wheels.mkdir(parents=True, exist_ok=True)
    runner.run(["python3", "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                "-d", str(wheels), SH_REQUIREMENT], timeout=300)
    found = sorted(wheels.glob("sh-2*.whl"))
    if not found:
        raise SystemExit("lab: could not download the sh wheel")
    return found[-1]


def payload(runner: Runner) -> bytes:
    """A tar of what goes into the guest's site-packages."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        pkg = config.REPO / "sanoffload"
        for path in sorted(pkg.rglob("*")):
            if "__pycache__" in path.parts or path.suffix == ".pyc":
                continue
            tar.add(path, arcname=str(path.relative_to(config.REPO)), recursive=False)
        with zipfile.ZipFile(_sh_wheel(runner)) as whl:
            for name in whl.namelist():
                if ".dist-info/" in name:
                    continue
                data = whl.read(name)
                info = tarfile.TarInfo(name)
                info.size = len(data)
                info.mode = 0o644
                tar.addfile(info, io.BytesIO(data))
        entry = ENTRY_POINT.encode()
        info = tarfile.TarInfo("sanoffload-entry")
        info.size = len(entry)
        info.mode = 0o755
        tar.addfile(info, io.BytesIO(entry))
    return buf.getvalue()


def sync(runner: Runner, hosts: Sequence[str]) -> dict[str, str]:
    data = payload(runner)
    versions: dict[str, str] = {}
    for host in hosts:
        res = vm.ssh(runner, host, ["sh", "-c", INSTALL_SCRIPT], input=data, timeout=120)
        versions[host] = res.stdout.strip()
    return versions
