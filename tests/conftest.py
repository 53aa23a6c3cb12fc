"""Test tiers: ``unit`` (no root), ``host`` (root on this machine), ``lab`` (QEMU VMs).

Select tiers with ``-m``; ``scripts/test`` runs all three. A selected test whose
tier cannot run here fails with the reason: nothing is skipped silently.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from tests.hostile import Row, render, row_of

REPO = Path(__file__).resolve().parents[1]
# the lab tool lives in scripts/sanolab (not part of the installed package)
sys.path.insert(0, str(REPO / "scripts"))

TIER_MARKERS = ("unit", "host", "lab")

#: hostile row -> worst result seen this run ("passed" < "skipped" < "FAILED")
_hostile_results: dict[Row, str] = {}
_RANK = {"passed": 0, "skipped": 1, "FAILED": 2}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # every test belongs to exactly one tier, taken from its folder
    for item in items:
        parts = Path(str(item.fspath)).relative_to(REPO / "tests").parts
        tier = parts[0] if parts and parts[0] in TIER_MARKERS else None
        if tier is None:
            raise pytest.UsageError(f"{item.nodeid}: tests must live under tests/unit, "
                                    "tests/host or tests/lab")
        if not item.get_closest_marker(tier):
            item.add_marker(getattr(pytest.mark, tier))


@pytest.fixture(scope="session")
def require_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("host-tier tests need root (loop devices, mount, fsfreeze); "
                    "run them as root or select '-m unit'", pytrace=False)


def _hostile_row(item: pytest.Item) -> list[Row]:
    tier = next((t for t in TIER_MARKERS if item.get_closest_marker(t)), "?")
    return [row_of(item.nodeid, tier, tuple(m.args)) for m in item.iter_markers("hostile")]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" or report.outcome != "passed":
        result = "FAILED" if report.failed else report.outcome
        for row in _hostile_row(item):
            old = _hostile_results.get(row)
            if old is None or _RANK[result] > _RANK[old]:
                _hostile_results[row] = result


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _hostile_results:
        return
    terminalreporter.section("hostile inputs (docs/reliability.md)")
    terminalreporter.write(render(_hostile_results, _hostile_results))
