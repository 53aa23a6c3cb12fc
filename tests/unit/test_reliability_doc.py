"""docs/reliability.md lists exactly the hostile rows the tests carry."""

from __future__ import annotations

import pytest

from tests import hostile


def test_reliability_doc_is_in_step_with_the_tests() -> None:
    rows = hostile.collect()
    assert rows, "no test carries a hostile marker"
    want = hostile.document(rows)
    have = hostile.DOC.read_text(encoding="utf-8") if hostile.DOC.exists() else ""
    assert have == want, "docs/reliability.md is stale: run 'python3 -m tests.hostile'"


def test_a_marker_with_an_unknown_group_is_refused() -> None:
    with pytest.raises(ValueError, match="not one of"):
        hostile.row_of("tests/unit/x.py::t", "unit", ("nowhere", "an input", "an outcome"))
    with pytest.raises(ValueError, match="three texts"):
        hostile.row_of("tests/unit/x.py::t", "unit", ("restore", "an input"))
