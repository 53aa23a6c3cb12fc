"""UndoStack: every step runs, newest first; the original error is never replaced."""

from __future__ import annotations

import pytest

from sanoffload.errors import CleanupError
from sanoffload.undo import UndoStack

pytestmark = pytest.mark.unit


def test_all_steps_run_newest_first_and_the_original_error_survives() -> None:
    ran: list[str] = []

    def fail(name: str) -> None:
        ran.append(name)
        raise OSError(f"{name} broke")

    with pytest.raises(ValueError) as excinfo:
        with UndoStack() as undo:
            undo.push("a", ran.append, "a")
            undo.push("b", fail, "b")
            undo.push("c", ran.append, "c")
            raise ValueError("the real failure")
    assert ran == ["c", "b", "a"]
    assert any("b broke" in n for n in excinfo.value.__notes__)


def test_commit_keeps_everything() -> None:
    ran: list[str] = []
    with UndoStack() as undo:
        undo.push("a", ran.append, "a")
        undo.commit()
    assert ran == []


def test_failures_without_an_error_in_flight_raise_cleanup_error() -> None:
    undo = UndoStack()
    undo.push("x", lambda: (_ for _ in ()).throw(OSError("gone wrong")))
    with pytest.raises(CleanupError, match="gone wrong"):
        undo.__exit__(None, None, None)
