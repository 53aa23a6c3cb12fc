"""Pre-freeze and post-thaw hooks: site executables run around the freeze.

A pre-freeze hook readies an application (flush a database, enter backup
mode); a post-thaw hook undoes that. Hooks run as root, so each must be an
absolute path to a regular executable that only root can change: owned by
root, not group- or world-writable, in directories only root can change.
Anything else is refused before any hook runs.

Each hook runs through the runner with its own timeout, ``cwd=/`` and::

    SANOFFLOAD_PHASE=pre-freeze|post-thaw
    SANOFFLOAD_MOUNTPOINT=<the filesystem being frozen>
    SANOFFLOAD_PATH=<the directory being backed up>

A failing pre-freeze hook aborts before anything is frozen; post-thaw hook
failures are collected and returned, never raised (the filesystem is thawed
by then, and one failing hook must not stop the others from running). They
are not dropped either: each becomes a warning line (:meth:`HookFailure.warning`)
in prepare's answer, so the backup ends "done, with warnings" (exit 14) and a
database left in backup mode shows in the manifest, not only in the agent's log.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from ..errors import CommandError, CommandTimeoutError, FreezeError, RefusedError
from ..runner import Result, Runner
from ..text import printable

log = logging.getLogger(__name__)

Phase = Literal["pre-freeze", "post-thaw"]
PRE_FREEZE: Phase = "pre-freeze"
POST_THAW: Phase = "post-thaw"
DEFAULT_HOOK_TIMEOUT = 60.0
#: how much of a failing hook's stderr lands in the error message
TAIL_LINES = 5
TAIL_CHARS = 500
#: the longest warning line a failed post-thaw hook gives the proxy (and its manifest)
WARNING_CHARS = 500


@dataclass(frozen=True)
class Hook:
    """One executable and how long it may run."""

    path: str
    timeout: float = DEFAULT_HOOK_TIMEOUT

    @property
    def name(self) -> str:
        return os.path.basename(self.path)


@dataclass(frozen=True)
class Hooks:
    """The hooks of one quiesce; run in the order given."""

    pre_freeze: tuple[Hook, ...] = ()
    post_thaw: tuple[Hook, ...] = ()
    #: the only owner a hook (and its directories) may have besides root;
    #: production keeps 0, unprivileged unit tests pass their own uid
    trusted_uid: int = 0

    @classmethod
    def from_paths(cls, pre_freeze: Iterable[str] = (), post_thaw: Iterable[str] = (), *,
                   timeout: float = DEFAULT_HOOK_TIMEOUT, trusted_uid: int = 0) -> Hooks:
        return cls(tuple(Hook(p, timeout) for p in pre_freeze),
                   tuple(Hook(p, timeout) for p in post_thaw), trusted_uid)

    def all(self) -> tuple[Hook, ...]:
        return (*self.pre_freeze, *self.post_thaw)


@dataclass(frozen=True)
class HookFailure:
    """A post-thaw hook that failed (or was refused); reported, not raised."""

    hook: Hook
    phase: Phase
    message: str
    returncode: int | None = None
    stderr_tail: str = ""

    def warning(self) -> str:
        """One printable, bounded line for the proxy: which hook, its exit code, what it said."""
        code = f" (exit {self.returncode})" if self.returncode is not None else ""
        line = (f"{self.phase} hook {printable(self.hook.path)} failed{code}: "
                f"{printable(self.stderr_tail or self.message)}")
        return line if len(line) <= WARNING_CHARS else line[:WARNING_CHARS - 1] + "…"


def stderr_tail(text: str, lines: int = TAIL_LINES, chars: int = TAIL_CHARS) -> str:
    """The last few lines of ``text``, bounded, for one-line error messages."""
    tail = " | ".join(line for line in text.strip().splitlines()[-lines:] if line.strip())
    return tail[-chars:]


def check_hook(hook: Hook, *, trusted_uid: int = 0) -> None:
    """Refuse a hook that someone other than root could have changed.

    Raises :class:`RefusedError` naming the hook and the reason.
    """
    path = hook.path
    if not os.path.isabs(path):
        raise RefusedError(f"hook {path!r}: must be an absolute path")
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
    except OSError as exc:
        raise RefusedError(f"hook {path}: cannot use it: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise RefusedError(f"hook {path}: not a regular file")
    if not st.st_mode & 0o111 or not os.access(real, os.X_OK):
        raise RefusedError(f"hook {path}: not executable", hint=f"chmod 0755 {real}")
    owners = {0, trusted_uid}
    if st.st_uid not in owners:
        raise RefusedError(f"hook {path}: owned by uid {st.st_uid}, must be owned by root",
                           hint=f"chown root: {real}")
    if st.st_mode & 0o022:
        raise RefusedError(f"hook {path}: group- or world-writable "
                           f"(mode {stat.S_IMODE(st.st_mode):04o})", hint=f"chmod go-w {real}")
    # whoever can write a directory on the way can swap the file for another
    parent = os.path.dirname(real)
    while True:
        dst = os.stat(parent)
        if dst.st_uid not in owners:
            raise RefusedError(f"hook {path}: directory {parent} is owned by uid {dst.st_uid}, "
                               "must be owned by root")
        # sticky (like /tmp): others may not rename or remove what root owns there
        if dst.st_mode & 0o022 and not dst.st_mode & stat.S_ISVTX:
            raise RefusedError(f"hook {path}: directory {parent} is group- or world-writable "
                               f"(mode {stat.S_IMODE(dst.st_mode):04o})")
        if parent == "/":
            break
        parent = os.path.dirname(parent)


def check_hooks(hooks: Hooks) -> None:
    """Check every hook (both phases) up front, so a bad one refuses before anything runs."""
    for hook in hooks.all():
        check_hook(hook, trusted_uid=hooks.trusted_uid)


def hook_env(phase: Phase, mountpoint: str, path: str) -> dict[str, str]:
    return {"SANOFFLOAD_PHASE": phase, "SANOFFLOAD_MOUNTPOINT": mountpoint,
            "SANOFFLOAD_PATH": path}


def run_hook(runner: Runner, hook: Hook, phase: Phase, mountpoint: str, path: str, *,
             trusted_uid: int = 0) -> Result:
    """Check ``hook`` again (it may have changed since) and run it; raise on failure."""
    check_hook(hook, trusted_uid=trusted_uid)
    log.info("%s hook: %s", phase, hook.path)
    # cwd=/: never start a hook inside the filesystem being frozen
    return runner.run([hook.path], timeout=hook.timeout, cwd="/",
                      env=hook_env(phase, mountpoint, path))


def run_pre_freeze(runner: Runner, hooks: Hooks, mountpoint: str, path: str) -> None:
    """Run the pre-freeze hooks in order; the first failure raises :class:`FreezeError`.

    Nothing is frozen yet when this raises, so the caller has nothing to undo
    but the post-thaw hooks (which it still runs).
    """
    for hook in hooks.pre_freeze:
        try:
            run_hook(runner, hook, PRE_FREEZE, mountpoint, path, trusted_uid=hooks.trusted_uid)
        except CommandTimeoutError as exc:
            raise FreezeError(f"pre-freeze hook {hook.path} timed out after {hook.timeout:.0f}s; "
                              f"nothing was frozen: {stderr_tail(exc.stderr) or 'no output'}"
                              ) from exc
        except CommandError as exc:
            raise FreezeError(f"pre-freeze hook {hook.path} failed (exit {exc.returncode}); "
                              f"nothing was frozen: {stderr_tail(exc.stderr) or 'no output'}"
                              ) from exc


def run_post_thaw(runner: Runner, hooks: Hooks, mountpoint: str, path: str) -> list[HookFailure]:
    """Run every post-thaw hook, whatever the others did; return the failures."""
    failures: list[HookFailure] = []
    for hook in hooks.post_thaw:
        try:
            run_hook(runner, hook, POST_THAW, mountpoint, path, trusted_uid=hooks.trusted_uid)
        except RefusedError as exc:
            failures.append(HookFailure(hook, POST_THAW, str(exc)))
        except CommandError as exc:
            # CommandTimeoutError and CommandNotFoundError are CommandErrors too
            failures.append(HookFailure(hook, POST_THAW, exc.message, exc.returncode,
                                        stderr_tail(exc.stderr)))
    for failure in failures:
        log.error("post-thaw hook %s failed: %s%s", failure.hook.path, failure.message,
                  f" ({failure.stderr_tail})" if failure.stderr_tail else "")
    return failures
