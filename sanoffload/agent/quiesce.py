"""The quiesce step: hooks, flush, freeze, duplicate, thaw, hooks.

Order (``who_freezes="fsfreeze"``)::

    pre-freeze hooks → holding hooks, each READY → sync -f → arm guard
        → fsfreeze --freeze → t0 → duplicate() → fsfreeze --unfreeze → t1
        → disarm guard → holding hooks let go (newest first) → post-thaw hooks

Holding hooks (:class:`~sanoffload.agent.hooks.Holding`) keep an application's
lock from before the flush until after the thaw; their outputs (PostgreSQL's
``backup_label``...) come back in :attr:`Quiesced.held`. If one is not READY
in time, nothing is frozen, the others let go and post-thaw hooks run as for
a failed pre-freeze hook.

Only freeze → duplicate → thaw happens while frozen: every slow step (hooks,
the flush, starting the guard) comes before or after. The thaw is in a
``finally``, so an error in ``duplicate()`` or a SIGTERM/SIGHUP (raised as
:class:`~sanoffload.errors.Interrupted` by :mod:`sanoffload.signals`) still
thaws; if the agent is SIGKILLed or hangs, the freeze guard
(:mod:`sanoffload.agent.guard`) thaws.

A consistency group names several mount points: each is flushed, then they
are frozen in order (each under its own guard), ``duplicate()`` makes every
duplicate, and they are thawed in reverse order — one window, every volume
captured at the same instant. Hooks run once for the group.

``who_freezes="lvm"``: on Linux < 6.6 LVM's own device suspend freezes the
filesystem, and a userspace freeze cannot nest with it, so we do not call
fsfreeze (and arm no guard: nothing of ours is frozen). Hooks and the flush
still run; the window is the duration of ``duplicate()``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Generic, Protocol, TypeVar

from ..channel.messages import HeldOutput
from ..errors import CommandError, CommandTimeoutError, FreezeError, UsageError
from ..kinds import WhoFreezes
from ..runner import Runner
from ..tools import fsfreeze
from .guard import DEFAULT_STATE_DIR, FreezeGuard
from .hooks import Holding, HookFailure, Hooks, check_hooks, run_post_thaw, run_pre_freeze

log = logging.getLogger(__name__)

T = TypeVar("T")
#: extra time a freeze may take beyond the deadline (the kernel flushes first);
#: the guard thaws at the deadline anyway
FREEZE_TIMEOUT_SLACK = 30.0
#: beyond the steps' own timeouts, how long a holding hook may live before its deadline
#: kills it (only if the agent hangs: normally it is told to let go long before)
HOLD_LIFE_SLACK = 60.0


class GuardLike(Protocol):
    """What quiesce needs from a freeze guard (:class:`FreezeGuard`, or a test's fake)."""

    def __enter__(self) -> GuardLike: ...

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None: ...

    def disarm(self) -> None: ...

    @property
    def fired(self) -> bool: ...

    @property
    def report(self) -> dict[str, Any] | None: ...


GuardFactory = Callable[..., GuardLike]


@dataclass(frozen=True)
class Quiesced(Generic[T]):
    """What one quiesce gave: the duplicate and how long the filesystem was frozen."""

    result: T
    window_ms: float
    frozen_by: WhoFreezes
    post_thaw_failures: tuple[HookFailure, ...] = ()
    guard_report: dict[str, Any] | None = None
    #: each holding hook's output, in the order the hooks started
    held: tuple[HeldOutput, ...] = ()
    #: holding hooks that failed after the thaw (or whose output was cut): warnings
    hold_failures: tuple[HookFailure, ...] = ()

    @property
    def warnings(self) -> list[str]:
        """One line per hook that failed after the thaw: holding hooks first, then post-thaw."""
        return [f.warning() for f in (*self.hold_failures, *self.post_thaw_failures)]


def quiesce_and_duplicate(
        runner: Runner, mountpoint: str | os.PathLike[str] | Sequence[str],
        duplicate: Callable[[], T], *,
        hooks: Hooks | None = None, deadline_s: float = 10.0,
        who_freezes: WhoFreezes | str = WhoFreezes.FSFREEZE,
        state_dir: str | os.PathLike[str] = DEFAULT_STATE_DIR,
        path: str | os.PathLike[str] | None = None,
        discard: Callable[[T], None] | None = None,
        guard_factory: GuardFactory = FreezeGuard) -> Quiesced[T]:
    """Freeze ``mountpoint`` just long enough for ``duplicate()``; return its result.

    ``path`` is the directory being backed up (``SANOFFLOAD_PATH`` for hooks;
    the mountpoint by default). A sequence of mount points is a consistency
    group: all frozen in that order, thawed in reverse; hooks see the first.
    Raises :class:`FreezeError` when a pre-freeze hook fails (nothing frozen),
    the freeze fails, or the freeze deadline was exceeded; in the last case
    ``discard(result)`` is called first if ``duplicate()`` had returned, since
    that duplicate may not be consistent.
    Whatever happens, the filesystem is thawed, holding hooks are told to let
    go and post-thaw hooks run.
    """
    who = WhoFreezes.parse(who_freezes, where="who_freezes")
    if deadline_s <= 0:
        raise UsageError(f"freeze deadline must be positive, not {deadline_s}")
    mps = [os.fspath(mountpoint)] if isinstance(mountpoint, (str, os.PathLike)) else \
        [os.fspath(m) for m in mountpoint]
    if not mps or len(set(mps)) != len(mps):
        raise UsageError(f"want distinct mount points, not {mps}")
    if len(mps) > 1 and who is not WhoFreezes.FSFREEZE:
        # LVM's suspend freezes one volume during its own lvcreate: no common instant
        raise UsageError("a consistency group is frozen by fsfreeze, not by LVM's suspend")
    mp = mps[0]
    target = os.fspath(path) if path is not None else mp
    hooks = hooks or Hooks()
    check_hooks(hooks)  # a hook we would refuse later refuses now, before anything ran

    holding: Holding | None = None
    try:
        run_pre_freeze(runner, hooks, mp, target)
        # every holding hook holds its lock before the flush, and so before the freeze
        holding = Holding.start(runner, hooks, mp, target,
                                life_s=_hold_life_s(hooks, deadline_s))
        for each in mps:
            _flush(runner, each)
        if who is WhoFreezes.LVM:
            out = _duplicate_lvm_frozen(mp, duplicate, deadline_s)
        else:
            out = _frozen_in_order(runner, mps, duplicate, deadline_s=deadline_s,
                                   state_dir=state_dir, discard=discard,
                                   guard_factory=guard_factory)
    except BaseException as exc:
        if holding is not None:
            for failure in holding.stop():
                exc.add_note(f"holding hook {failure.hook.path} also failed: {failure.message}")
        # post-thaw hooks undo what pre-freeze hooks began, even after a failure
        for failure in run_post_thaw(runner, hooks, mp, target):
            exc.add_note(f"post-thaw hook {failure.hook.path} also failed: {failure.message}")
        raise
    # thawed: the locks go before the post-thaw hooks (which may undo what they needed)
    held, hold_failures = holding.let_go()
    failures = run_post_thaw(runner, hooks, mp, target)
    return Quiesced(out.result, out.window_ms, out.frozen_by, tuple(failures), out.guard_report,
                    held, hold_failures)


def _hold_life_s(hooks: Hooks, deadline_s: float) -> float:
    """The longest a holding hook can legitimately live: every READY, the flush, the freeze
    and its thaw, then letting go."""
    longest = max((h.timeout for h in hooks.hold), default=0.0)
    return (len(hooks.hold) * hooks.hold_ready_s + fsfreeze.DEFAULT_SYNC_TIMEOUT + deadline_s
            + FREEZE_TIMEOUT_SLACK + fsfreeze.DEFAULT_THAW_TIMEOUT + longest + HOLD_LIFE_SLACK)


def _flush(runner: Runner, mp: str) -> None:
    try:
        fsfreeze.syncfs(runner, mp)
    except CommandError as exc:
        raise FreezeError(f"could not flush {mp} before freezing: {exc.message}; "
                          "nothing was frozen") from exc


def _duplicate_lvm_frozen(mp: str, duplicate: Callable[[], T], deadline_s: float) -> Quiesced[T]:
    t0 = time.monotonic()
    result = duplicate()
    window_ms = (time.monotonic() - t0) * 1000
    log.info("%s: duplicated in %.1f ms, frozen by LVM's device suspend", mp, window_ms)
    if window_ms > deadline_s * 1000:
        log.warning("%s: LVM's freeze window (%.1f ms) exceeded the deadline (%.1f s)", mp,
                    window_ms, deadline_s)
    return Quiesced(result, window_ms, WhoFreezes.LVM)


def _frozen_in_order(runner: Runner, mps: Sequence[str], duplicate: Callable[[], T], *,
                     deadline_s: float, state_dir: str | os.PathLike[str],
                     discard: Callable[[T], None] | None,
                     guard_factory: GuardFactory) -> Quiesced[T]:
    """Freeze ``mps[0]``, and inside that window the rest (recursively); duplicate with all
    frozen; thaw in reverse. The window reported is the first one's: it holds the others."""
    if len(mps) == 1:
        return _duplicate_frozen(runner, mps[0], duplicate, deadline_s=deadline_s,
                                 state_dir=state_dir, discard=discard,
                                 guard_factory=guard_factory)

    def inner() -> Quiesced[T]:
        return _frozen_in_order(runner, mps[1:], duplicate, deadline_s=deadline_s,
                                state_dir=state_dir, discard=discard,
                                guard_factory=guard_factory)

    def discard_inner(q: Quiesced[T]) -> None:
        if discard is not None:
            discard(q.result)

    outer = _duplicate_frozen(runner, mps[0], inner, deadline_s=deadline_s,
                              state_dir=state_dir, discard=discard_inner,
                              guard_factory=guard_factory)
    return Quiesced(outer.result.result, outer.window_ms, outer.frozen_by,
                    guard_report=outer.guard_report)


def _duplicate_frozen(runner: Runner, mp: str, duplicate: Callable[[], T], *, deadline_s: float,
                      state_dir: str | os.PathLike[str], discard: Callable[[T], None] | None,
                      guard_factory: GuardFactory) -> Quiesced[T]:
    guard = guard_factory(runner, mp, deadline_s, state_dir=state_dir)
    have_result = False
    result: T | None = None
    thawed_by_us = False
    thaw_error: CommandError | None = None
    t0 = t1 = 0.0
    with guard:
        maybe_frozen = False
        try:
            maybe_frozen = True  # from the first moment an interrupt could leave it frozen
            try:
                fsfreeze.freeze(runner, mp, timeout=deadline_s + FREEZE_TIMEOUT_SLACK)
            except CommandTimeoutError as exc:
                # killed mid-ioctl: the kernel may still finish the freeze; thaw below
                raise FreezeError(f"freezing {mp} timed out: {exc.message}") from exc
            except CommandError as exc:
                # fsfreeze said no (already frozen by someone else, not supported):
                # nothing of ours is frozen, and someone else's freeze is not ours to thaw
                maybe_frozen = False
                raise FreezeError(f"could not freeze {mp}: {exc.message}") from exc
            t0 = time.monotonic()
            result = duplicate()
            have_result = True
        finally:
            if maybe_frozen:
                try:
                    thawed_by_us = fsfreeze.unfreeze(runner, mp)
                except CommandError as exc:
                    # leaving the with-block without disarming closes the guard's pipe:
                    # it thaws at once
                    thaw_error = exc
                    log.error("could not thaw %s: %s; the freeze guard thaws it", mp, exc)
                else:
                    t1 = time.monotonic()
                    guard.disarm()
            else:
                guard.disarm()
            if not have_result and guard.fired:
                # duplicate()'s own error is what propagates; say the deadline passed too
                log.error("%s: the freeze guard thawed it past the %gs deadline", mp, deadline_s)
    # here the filesystem is thawed, by us or by the guard, and the guard is gone
    report = guard.report
    window_ms = (t1 - t0) * 1000 if t1 else 0.0
    if thawed_by_us and not guard.fired:
        log.info("%s: frozen for %.1f ms (fsfreeze)", mp, window_ms)
        return Quiesced(result, window_ms, WhoFreezes.FSFREEZE, guard_report=report)

    if guard.fired:
        why = (f"freeze deadline exceeded: {mp} was still frozen {deadline_s:g}s after the "
               f"freeze guard armed, and the guard thawed it"
               f" ({(report or {}).get('thaw', 'see its report')})")
    elif thaw_error is not None:
        why = f"could not thaw {mp} ({thaw_error.message}); the freeze guard thawed it"
    else:
        why = f"{mp} was thawed by someone else while the duplicate was being made"
    log.error("%s (window %.1f ms)", why, window_ms)
    if have_result and discard is not None:
        try:
            discard(result)
        except Exception as exc:
            err = FreezeError(f"{why}; discarding the duplicate failed too: {exc}")
            raise err from exc
        raise FreezeError(f"{why}; the duplicate was discarded")
    raise FreezeError(f"{why}; the duplicate must not be used")
