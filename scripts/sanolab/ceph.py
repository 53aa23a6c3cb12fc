"""The lab's object store: a real Ceph RGW that the VMs reach over the lab network.

The test cluster of ``scripts/ceph`` (:mod:`sanoceph`: a mon, a memstore OSD and
an HTTPS gateway) is started *inside* the lab's network namespace with every
daemon bound to the bridge address (``10.77.0.1``), so the VMs reach it as a site
reaches its object store, and nothing outside the lab does. The command line::

    ip netns exec sanolab python -m sanoceph --dir STATE/ceph up --bind 10.77.0.1

Its daemons run in their own sessions and outlive that command; :func:`down`
stops them by PID (``vm.down`` calls it too, so no daemon outlives the lab).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from sanoceph import Cluster
from sanoceph.cluster import STATE_FILE
from sanoffload.runner import Runner

from . import config


def ceph_dir() -> Path:
    """The cluster's private directory, with the lab's other state."""
    return config.state_dir() / "ceph"


def up(runner: Runner) -> Cluster:
    """Start the lab's cluster (about 20 s) and return it; refused if one already runs."""
    scripts = str(config.REPO / "scripts")
    env = {"PYTHONPATH": os.pathsep.join(p for p in (scripts, os.environ.get("PYTHONPATH"))
                                         if p)}
    runner.run(["ip", "netns", "exec", config.NETNS, sys.executable, "-m", "sanoceph",
                "--dir", str(ceph_dir()), "up", "--bind", config.GATEWAY],
               timeout=300, env=env)
    return Cluster.load(ceph_dir())


def down() -> bool:
    """Stop the lab's cluster if one was started; whether there was one."""
    if not (ceph_dir() / STATE_FILE).exists():
        return False
    Cluster.load(ceph_dir()).stop()
    return True
