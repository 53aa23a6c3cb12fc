"""The hostile-input table: tests marked ``hostile`` and what they assert.

A test that feeds sanoffload a hostile or clumsy input is marked::

    @pytest.mark.hostile("restore", "a symlink inside the target leads elsewhere",
                         "refused (exit 3); nothing written outside the target")

(group, input, expected outcome). The suite prints the table with each row's
result at the end of a run; ``docs/reliability.md`` holds the same rows
(``python3 -m tests.hostile`` regenerates it; a unit test fails when they differ).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "reliability.md"

#: the groups, in the order the document and the table show them
GROUPS: dict[str, str] = {
    "restore": "Restore",
    "store": "The store",
    "channel": "The control channel",
    "agent": "Agent, configs, CLI",
    "proxy": "Proxy",
    "tests": "Tests that could pass without testing",
}

HEADER = """# Reliability: hostile inputs tried

Every row is an input an attacker or a clumsy administrator could give
sanoffload, the outcome the product must show, and the test that asserts it
(tier in brackets). The test suite prints this table with each row's result at
the end of every run (`scripts/test`). Generated from the tests' `hostile`
markers by `python3 -m tests.hostile`; a unit test keeps this file in step.
"""


@dataclass(frozen=True, order=True)
class Row:
    group: str
    input: str
    expected: str
    test: str
    tier: str


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def row_of(nodeid: str, tier: str, args: tuple[object, ...]) -> Row:
    if len(args) != 3 or not all(isinstance(a, str) and a for a in args):
        raise ValueError(f"{nodeid}: hostile(group, input, expected) takes three texts")
    group, what, expected = (str(a) for a in args)
    if group not in GROUPS:
        raise ValueError(f"{nodeid}: hostile group {group!r} is not one of {sorted(GROUPS)}")
    # one row per test function, whatever its parameters
    return Row(group, what, expected, nodeid.split("[", 1)[0], tier)


def render(rows: Iterable[Row], results: dict[Row, str] | None = None) -> str:
    """The document (``results`` None) or the end-of-run table (a result column)."""
    unique = sorted(set(rows), key=lambda r: (list(GROUPS).index(r.group), r.test, r.input))
    out: list[str] = []
    for key, title in GROUPS.items():
        group = [r for r in unique if r.group == key]
        if not group:
            continue
        out += ["", f"## {title}", ""]
        if results is None:
            out += ["| input | expected outcome | test |", "|---|---|---|"]
            out += [f"| {_cell(r.input)} | {_cell(r.expected)} | `{r.test}` [{r.tier}] |"
                    for r in group]
        else:
            out += ["| input | expected outcome | result |", "|---|---|---|"]
            out += [f"| {_cell(r.input)} | {_cell(r.expected)} | {results.get(r, 'not run')} |"
                    for r in group]
    return "\n".join(out) + "\n"


def document(rows: Iterable[Row]) -> str:
    return HEADER + render(rows)


def collect() -> list[Row]:
    """The rows of every test in the tree (pytest --collect-only, no test runs)."""
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--collect-only", "-q",
         "-p", "tests.hostile_collect", str(REPO / "tests")],
        cwd=REPO, capture_output=True, text=True, check=False)
    rows: list[Row] = []
    for line in proc.stdout.splitlines():
        if line.startswith("HOSTILE\t"):
            _, group, what, expected, test, tier = line.split("\t")
            rows.append(Row(group, what, expected, test, tier))
    if proc.returncode not in (0, 5) or not rows:
        raise RuntimeError(f"collecting the hostile rows failed:\n{proc.stdout[-2000:]}"
                           f"\n{proc.stderr[-2000:]}")
    return rows


if __name__ == "__main__":
    if sys.argv[1:]:
        sys.exit("usage: python3 -m tests.hostile  (rewrites docs/reliability.md from the markers)")
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text(document(collect()), encoding="utf-8")
    print(f"wrote {DOC.relative_to(REPO)}")
