"""An undo stack that goes on past errors and never hides the error that started it.

``contextlib.ExitStack`` runs every callback too, but when one raises, that
error replaces the one being handled: the operator would read "unexport
failed" instead of why the backup failed. :class:`UndoStack` runs every undo
step (newest first), attaches each failure as a note to the original error and
re-raises the original; when it unwinds without an error in flight (``unwind``
called directly) and a step fails, it raises :class:`CleanupError` naming all.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from types import TracebackType
from typing import Any

from .errors import CleanupError

log = logging.getLogger(__name__)


class UndoStack:
    def __init__(self) -> None:
        self._steps: list[tuple[str, Callable[..., Any], tuple[Any, ...]]] = []

    def push(self, label: str, fn: Callable[..., Any], *args: Any) -> None:
        """Register an undo step the moment its resource exists (or is intended)."""
        self._steps.append((label, fn, args))

    def commit(self) -> None:
        """Success: keep everything; nothing will be undone."""
        self._steps.clear()

    def unwind(self) -> list[BaseException]:
        """Run every step, newest first; return the failures (each logged)."""
        failures: list[BaseException] = []
        while self._steps:
            label, fn, args = self._steps.pop()
            try:
                fn(*args)
            except Exception as exc:  # go on: every other step must still run
                log.error("undo %s failed: %s", label, exc)
                exc.add_note(f"while undoing: {label}")
                failures.append(exc)
        return failures

    def __enter__(self) -> UndoStack:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        failures = self.unwind()
        if exc is not None:
            for f in failures:
                exc.add_note(f"cleanup after this error also failed: {type(f).__name__}: {f}")
            return  # the original error propagates
        if failures:
            raise CleanupError(failures, context="undo")
