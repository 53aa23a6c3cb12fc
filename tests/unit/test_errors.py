"""The error hierarchy: exit codes, kinds, and the EXIT_CODES table agree."""

from __future__ import annotations

import inspect
import signal

import pytest

from sanoffload import errors
from sanoffload.errors import (
    EXIT_CODES,
    CleanupError,
    CommandError,
    CommandNotFoundError,
    CommandTimeoutError,
    DeadlineError,
    Interrupted,
    MissingDependencyError,
    SanoffloadError,
)

pytestmark = pytest.mark.unit

ERROR_CLASSES: list[type[SanoffloadError]] = [
    obj for _, obj in inspect.getmembers(errors, inspect.isclass)
    if issubclass(obj, SanoffloadError) and obj.__module__ == errors.__name__
]


def test_found_the_whole_hierarchy() -> None:
    # guards the introspection below against silently checking nothing
    assert len(ERROR_CLASSES) >= 15
    assert SanoffloadError in ERROR_CLASSES and Interrupted in ERROR_CLASSES


@pytest.mark.parametrize("cls", ERROR_CLASSES, ids=lambda c: c.__name__)
def test_every_class_maps_to_an_exit_code_entry(cls: type[SanoffloadError]) -> None:
    assert cls.exit_code in EXIT_CODES
    table_kind = EXIT_CODES[cls.exit_code][0]
    # a refinement (ConfigError < UsageError) may have its own kind but must sit
    # under an ancestor whose kind is the table's for that code
    ancestors = [k for k in cls.__mro__ if isinstance(k, type) and issubclass(k, SanoffloadError)]
    assert any(a.kind == table_kind and a.exit_code == cls.exit_code for a in ancestors)


def test_kinds_in_table_are_unique() -> None:
    kinds = [kind for kind, _ in EXIT_CODES.values()]
    assert len(kinds) == len(set(kinds))


def test_shared_exit_codes_only_between_a_class_and_its_refinement() -> None:
    for a in ERROR_CLASSES:
        for b in ERROR_CLASSES:
            if a is not b and a.exit_code == b.exit_code:
                assert issubclass(a, b) or issubclass(b, a), (a, b)


def test_same_kind_means_same_exit_code() -> None:
    by_kind: dict[str, set[int]] = {}
    for cls in ERROR_CLASSES:
        by_kind.setdefault(cls.kind, set()).add(cls.exit_code)
    assert all(len(codes) == 1 for codes in by_kind.values()), by_kind


def test_every_failure_code_in_table_is_raised_by_some_class() -> None:
    used = {cls.exit_code for cls in ERROR_CLASSES}
    assert set(EXIT_CODES) - used == {0}


def test_exit_codes_fit_a_process_status() -> None:
    assert all(0 <= code <= 255 for code in EXIT_CODES)
    assert EXIT_CODES[0][0] == "ok"


def test_command_errors_are_catchable_by_their_meaning() -> None:
    nf = CommandNotFoundError("command not found: lvs", argv=["lvs"])
    assert isinstance(nf, MissingDependencyError) and isinstance(nf, CommandError)
    assert nf.exit_code == 4
    to = CommandTimeoutError("lvs timed out", argv=["lvs"])
    assert isinstance(to, DeadlineError) and to.exit_code == 6
    assert CommandError("x").exit_code == 5


def test_command_error_keeps_its_details() -> None:
    exc = CommandError("lvs failed", argv=("lvs", "vg0"), returncode=5, stdout="o",
                       stderr="Volume group not found", hint="check the VG name")
    assert exc.argv == ["lvs", "vg0"] and exc.returncode == 5
    assert exc.stderr == "Volume group not found" and exc.stdout == "o"
    assert str(exc) == "lvs failed (hint: check the VG name)"
    assert exc.to_dict() == {"error": "command-failed", "message": "lvs failed",
                             "hint": "check the VG name", "exit_code": 5}


def test_cleanup_error_aggregates_every_message() -> None:
    exc = CleanupError([CommandError("lvremove vg0/snap failed"), OSError("umount: busy"),
                        ValueError("bad state")], context="teardown of job 7")
    assert exc.exit_code == 13
    assert len(exc.errors) == 3
    text = str(exc)
    assert text.startswith("teardown of job 7: 3 step(s) failed")
    for part in ("CommandError: lvremove vg0/snap failed", "OSError: umount: busy",
                 "ValueError: bad state"):
        assert part in text
    assert "\n" not in text


def test_cleanup_error_default_context() -> None:
    assert str(CleanupError([RuntimeError("x")])) == "cleanup: 1 step(s) failed: RuntimeError: x"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_interrupted_names_the_signal(signum: signal.Signals) -> None:
    exc = Interrupted(signum)
    assert exc.signum == signum and exc.exit_code == 130
    assert str(exc) == f"interrupted by {signum.name}"


def test_readme_exit_code_table_matches_exit_codes() -> None:
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    rows = re.findall(r"^\| (\d+) \| ([a-z-]+) \| (.+?) \|$", readme, flags=re.M)
    table = {int(code): (kind, meaning.replace("`", "")) for code, kind, meaning in rows}
    expected = {code: (kind, meaning.replace("'", "")) for code, (kind, meaning)
                in EXIT_CODES.items()}
    assert table == expected
