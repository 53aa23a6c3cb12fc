"""pytest plugin used by ``tests.hostile.collect``: prints each hostile row, tab-separated."""

from __future__ import annotations

import pytest

from tests.hostile import row_of


def pytest_collection_finish(session: pytest.Session) -> None:
    seen = set()
    for item in session.items:
        for mark in item.iter_markers("hostile"):
            tier = next((t for t in ("unit", "host", "lab") if item.get_closest_marker(t)), "?")
            row = row_of(item.nodeid, tier, tuple(mark.args))
            if row in seen:
                continue
            seen.add(row)
            fields = (row.group, row.input, row.expected, row.test, row.tier)
            print("HOSTILE\t" + "\t".join(f.replace("\t", " ") for f in fields))
