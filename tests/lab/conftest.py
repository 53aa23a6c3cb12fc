"""Lab tier: boots the QEMU lab once per release per session.

Tests take the ``lab`` fixture. Those marked ``release_sensitive`` run on every
release in ``SANOLAB_RELEASES`` (default ``bookworm,trixie``); the others on
the first one only. ``release_sensitive(cases=[...])`` narrows a test's
``fs1_volume`` cases on the later releases to those listed. ``SANOLAB_REUSE=1``
keeps a lab that is already up (and leaves it up), for a quick edit-test loop;
CI always boots a fresh one.
If the lab cannot boot, every lab test fails with the reason.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from sanoceph import Cluster
from sanoffload.errors import SanoffloadError
from sanoffload.runner import CommandRunner
from sanolab import ceph, config, deploy, sync, vm

from .labctl import Lab


def _releases() -> list[str]:
    raw = os.environ.get("SANOLAB_RELEASES", "bookworm,trixie")
    rels = [r.strip() for r in raw.split(",") if r.strip()]
    bad = [r for r in rels if r not in config.RELEASES]
    if bad:
        raise pytest.UsageError(f"SANOLAB_RELEASES: unknown release(s) {bad}")
    return rels


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``@pytest.mark.release_sensitive(cases=[...])``: on releases after the first, only
    those values of the test's ``fs1_volume`` run (the kernel-dependent ones; the others
    are the same code on every kernel, and each case costs a minute under emulation)."""
    first = _releases()[0]
    dropped = []
    for item in items:
        marker = item.get_closest_marker("release_sensitive")
        callspec = getattr(item, "callspec", None)
        if marker is None or callspec is None or "cases" not in marker.kwargs:
            continue
        if callspec.params.get("lab") != first and \
                tuple(callspec.params.get("fs1_volume", ())) not in marker.kwargs["cases"]:
            dropped.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = [i for i in items if i not in dropped]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "lab" not in metafunc.fixturenames:
        return
    rels = _releases()
    if not metafunc.definition.get_closest_marker("release_sensitive"):
        rels = rels[:1]
    metafunc.parametrize("lab", rels, indirect=True, scope="session")


_failed_boot: dict[str, str] = {}

#: what the release-sensitive tests use (the first server and the proxy): a later release
#: boots only these, as each more VM under emulation slows every other one's boot (an
#: initiator outside the ACL is tried on the first release only, from bk1)
RELEASE_SENSITIVE_HOSTS = ("fs1", "px1")


def _hosts(release: str) -> list[str]:
    """Every host for the first release; the release-sensitive tests' hosts for the others."""
    if release == _releases()[0]:
        return list(config.HOSTS)
    return [h for h in config.HOSTS if h in RELEASE_SENSITIVE_HOSTS]


@pytest.fixture(scope="session")
def lab(request: pytest.FixtureRequest) -> Iterator[Lab]:
    release: str = request.param
    if os.geteuid() != 0:
        pytest.fail("lab tests need root (network namespace, QEMU taps); "
                    "run as root or select '-m \"unit or host\"'", pytrace=False)
    if release in _failed_boot:
        pytest.fail(f"the {release} lab did not boot: {_failed_boot[release]}", pytrace=False)
    runner = CommandRunner(default_timeout=120)
    reuse = os.environ.get("SANOLAB_REUSE") == "1"
    state = vm.LabState.load()
    if reuse and state and state.release == release and all(
            vm.status(runner)[h]["ssh"] for h in state.hosts):
        sync.sync(runner, state.hosts)
        yield Lab(runner, release, state.hosts)
        return
    try:
        state = vm.up(runner, release, _hosts(release))
        sync.sync(runner, state.hosts)
    except (Exception, SystemExit) as exc:  # SystemExit: the lab tool's own refusals
        _failed_boot[release] = str(exc)
        vm.down(runner, quiet=True)
        pytest.fail(f"the {release} lab did not boot: {exc}", pytrace=False)
    try:
        yield Lab(runner, release, state.hosts)
    finally:
        if not reuse:
            problems = vm.down(runner)
            assert not problems, f"lab down left problems: {problems}"
            assert not vm.leftover_processes(), "lab down left QEMU or ssh processes"
            assert not (Path("/run/netns") / config.NETNS).exists(), "lab down left the netns"


@pytest.fixture(scope="module")
def rgw(lab: Lab) -> Iterator[Cluster]:
    """A real Ceph RGW in the lab's network, px1 and bk1 deployed with the s3 extra, their
    profiles and the repository key, and the repository made by bk1's ``store init-s3``
    (``deploy.s3_site``). A cluster that cannot start fails the tests with the reason."""
    missing = [h for h in deploy.S3_PROFILES if h not in lab.hosts]
    if missing:
        pytest.fail(f"the S3 tests need {', '.join(missing)} in the lab", pytrace=False)
    ceph.down()  # a reused lab may still run one
    cluster: Cluster | None = None
    try:
        try:
            cluster = deploy.s3_site(lab.runner, lab.release)
        except SanoffloadError as exc:
            pytest.fail(f"the lab's S3 repository could not be set up: {exc}", pytrace=False)
        yield cluster
    finally:
        deploy.undeploy_s3(lab.runner)
        ceph.down()
        assert cluster is None or not cluster.pids(), \
            f"Ceph daemons left running: {cluster.pids() if cluster else ''}"
