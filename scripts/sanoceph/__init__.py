"""A real single-node Ceph (mon, OSDs, RGW over HTTPS) for tests, started and stopped by PID.

``scripts/ceph up|down|status`` drives it from a shell; host tests take the
session fixture in ``tests/host/ceph_fixture.py``. See :mod:`sanoceph.cluster`.
"""

from .cluster import Cluster, ClusterError, User, up

__all__ = ["Cluster", "ClusterError", "User", "up"]
