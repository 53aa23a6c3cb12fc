"""Turn stop signals into an exception so cleanup code runs.

The default action of SIGTERM and SIGHUP kills the process on the spot: no
``finally`` block, no ``ExitStack`` callback, so a frozen filesystem or an
exported LUN could be left behind.  With these handlers the first signal raises
:class:`~sanoffload.errors.Interrupted` in the main thread; teardown then runs
and the CLI exits with code 130.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Callable, Iterable, Iterator
from types import FrameType
from typing import Any

from .errors import Interrupted

log = logging.getLogger(__name__)

#: SIGINT too, so Ctrl-C gives the same exit code and message as SIGTERM
DEFAULT_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)


#: what signal.signal() returns and accepts: a function, SIG_DFL/SIG_IGN, or None (a
#: handler set outside Python)
_Handler = Callable[[int, FrameType | None], Any] | int | None

_deferring = 0
_pending: list[int] = []


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Hold stop signals back for a short critical section, then raise the first one.

    Why ``sh`` needs it: sh starts each command's I/O threads with
    ``threading.Thread.start``, which waits on a lock for the new thread to
    come up. :func:`install_signal_handlers` raises ``Interrupted`` from the
    handler, so a SIGTERM landing in that wait leaves the thread
    half-registered (started, never marked so) and the interpreter hangs at
    exit joining it; the command, in a group of its own, is left running with
    nothing holding its pid to kill it. So ``process.run_command`` and
    ``process.spawn_command`` start commands (never wait for them) in here.
    The pipeline starts in here too, for the same two reasons: its watchdog
    is a thread, and a signal between a fork and ``Popen``'s return would
    leave a stage no list holds.

    Keep the section short: a signal is only delayed, never lost. Only the
    main thread handles signals; elsewhere this does nothing.
    """
    global _deferring
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
        if not _deferring and _pending:
            signum = _pending.pop(0)
            _pending.clear()
            handler = signal.getsignal(signum)
            if callable(handler):
                handler(signum, None)


def install_signal_handlers(
        signals: Iterable[int] = DEFAULT_SIGNALS) -> Callable[[], None]:
    """Make each of ``signals`` raise :class:`Interrupted`; return a function that restores.

    Only the first signal raises.  Later ones are logged and ignored so that a
    second SIGTERM (systemd, an impatient operator) cannot abort the cleanup
    the first one started; SIGKILL remains the way to stop without cleanup.
    Must be called from the main thread (a Python rule for signal handlers).
    """
    received: list[int] = []

    def handler(signum: int, _frame: FrameType | None) -> None:
        if _deferring and not received:
            # inside a critical section (e.g. sh starting its threads): raise at its end
            _pending.append(signum)
            return
        received.append(signum)
        if len(received) > 1:
            log.warning("got %s while stopping after %s; cleanup continues",
                        signal.Signals(signum).name, signal.Signals(received[0]).name)
            return
        raise Interrupted(signum)

    previous: dict[int, _Handler] = {}
    for signum in signals:
        previous[signum] = signal.signal(signum, handler)

    def restore() -> None:
        for signum, old in previous.items():
            signal.signal(signum, old)

    return restore
