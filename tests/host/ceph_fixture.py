"""Session fixtures with a real Ceph RGW (scripts/sanoceph): ``ceph`` and ``ceph_fault``.

Use them from a host test module with ``from .ceph_fixture import ceph``.
Each starts its cluster once per session, the first time a test asks for it,
in a fresh 0700 directory under /var/tmp, and stops it by PID at the end. A
cluster that cannot start (Ceph not installed, a daemon dying, a deadline)
FAILS the tests that need it with the reason and the daemon's last log
lines: the host tier never skips silently.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sanoceph import Cluster, ClusterError, up
from sanoffload.errors import SanoffloadError


def _start(*, osds: int = 1, objectstore: str = "memstore", gateways: int = 1) -> Cluster:
    try:
        import boto3  # type: ignore[import-untyped]  # noqa: F401  (the tests' S3 client)
        import cryptography  # noqa: F401  (the test CA)
    except ImportError as exc:
        pytest.fail(f"the s3 extra is not installed ({exc}); run ./scripts/setup --tier host",
                    pytrace=False)
    workdir = Path(tempfile.mkdtemp(prefix="sanoceph-", dir="/var/tmp"))
    try:
        return up(workdir, osds=osds, objectstore=objectstore, gateways=gateways)
    except SanoffloadError as exc:
        shutil.rmtree(workdir, ignore_errors=True)  # our fresh mkdtemp; up() cleaned inside
        pytest.fail(f"the test Ceph cluster did not come up: {exc}", pytrace=False)


def _stop(cluster: Cluster) -> None:
    pids = dict(cluster.pids())
    started = time.monotonic()
    cluster.stop()
    # stop() must leave nothing behind: no daemon of ours, no directory
    assert not cluster.pids(), f"daemons still running after stop(): {cluster.pids()}"
    assert not cluster.dir.exists(), f"{cluster.dir} left behind"
    print(f"\nceph ({cluster.objectstore}): stopped {sorted(pids)} in "
          f"{time.monotonic() - started:.1f}s")


@pytest.fixture(scope="session")
def ceph(require_root: None) -> Iterator[Cluster]:
    """One memstore OSD, one HTTPS gateway, users ``maint`` and ``proxy`` (about 20 s to start)."""
    cluster = _start()
    try:
        yield cluster
    finally:
        _stop(cluster)


@pytest.fixture(scope="session")
def ceph_fault(require_root: None) -> Iterator[Cluster]:
    """The fault tier: three BlueStore OSDs (replication 2) and two gateways."""
    cluster = _start(osds=3, objectstore="bluestore", gateways=2)
    try:
        yield cluster
    finally:
        _stop(cluster)


__all__ = ["ClusterError", "ceph", "ceph_fault"]
