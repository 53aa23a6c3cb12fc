"""Pre-freeze, holding and post-thaw hooks: site executables run around the freeze.

A pre-freeze hook readies an application (flush a database, enter backup
mode); a post-thaw hook undoes that. A holding hook keeps a lock that lives in
one database session (MySQL's ``FLUSH TABLES WITH READ LOCK``, MariaDB's
``BACKUP STAGE BLOCK_COMMIT``, PostgreSQL's ``pg_backup_start``) across the
freeze, which a hook that runs and exits cannot do (see :class:`Holding`).
Hooks run as root, so each must be an absolute path to a regular executable
that only root can change: owned by root, not group- or world-writable, in
directories only root can change.
Anything else is refused before any hook runs.

Each hook runs through the runner with its own timeout, ``cwd=/`` (never
inside the filesystem being frozen) and::

    SANOFFLOAD_PHASE=pre-freeze|hold|post-thaw
    SANOFFLOAD_MOUNTPOINT=<the filesystem being frozen>
    SANOFFLOAD_PATH=<the directory being backed up>

A failing pre-freeze hook aborts before anything is frozen; post-thaw hook
failures are collected and returned, never raised (the filesystem is thawed
by then, and one failing hook must not stop the others from running). They
are not dropped either: each becomes a warning line (:meth:`HookFailure.warning`)
in prepare's answer, so the backup ends "done, with warnings" (exit 14) and a
database left in backup mode shows in the manifest, not only in the agent's log.

A holding hook's protocol (stdin and stdout are pipes to the agent)::

    agent starts it            (after the pre-freeze hooks, before sync -f)
    hook: takes its lock, prints "READY\\n"      within hold_ready_s, or it is killed
    agent: sync -f, freeze, duplicate, thaw
    agent closes the hook's stdin               "let go"; also what the agent's death does
    hook: releases its lock, prints its output  (PostgreSQL's backup_label...), exits 0

Nothing is frozen until every holding hook said READY; one that exits, says
anything else first or misses the deadline is a :class:`FreezeError` (the
others are told to let go, and nothing was frozen). What it prints after READY
is its output (at most :data:`~sanoffload.channel.messages.MAX_HELD_OUTPUT`
bytes, control characters but newline and tab escaped), stored with the
backup. A hook that fails after the thaw, or ends before it is told to, is a
warning like a failed post-thaw hook.
"""

from __future__ import annotations

import io
import json
import logging
import os
import queue
import stat
import subprocess
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from ..channel.messages import (
    HELD_KEEPS,
    MAX_HELD,
    MAX_HELD_JSON,
    MAX_HELD_OUTPUT,
    HeldOutput,
    held_json_size,
)
from ..errors import CommandError, CommandTimeoutError, FreezeError, RefusedError
from ..pipeline import PipelineLike, Stage, StageResult
from ..runner import Result, Runner
from ..text import printable

log = logging.getLogger(__name__)

Phase = Literal["pre-freeze", "hold", "post-thaw"]
PRE_FREEZE: Phase = "pre-freeze"
HOLD: Phase = "hold"
POST_THAW: Phase = "post-thaw"
DEFAULT_HOOK_TIMEOUT = 60.0
#: how long a holding hook may take to say READY (it may wait for a lock itself)
DEFAULT_HOLD_READY_S = 30.0
#: the line a holding hook prints once it holds its lock
READY_LINES = (b"READY\n", b"READY\r\n")
#: the most of a holding hook's first line that is read (and shown, if it is not READY)
FIRST_LINE_MAX = 4096
#: after a kill, how long to wait for a holding hook to be gone before going on without it
KILL_WAIT_S = 5.0
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
    #: holding hooks: started before the flush, told to let go after the thaw
    hold: tuple[Hook, ...] = ()
    #: how long each holding hook may take to say READY
    hold_ready_s: float = DEFAULT_HOLD_READY_S

    @classmethod
    def from_paths(cls, pre_freeze: Iterable[str] = (), post_thaw: Iterable[str] = (),
                   hold: Iterable[str] = (), *, timeout: float = DEFAULT_HOOK_TIMEOUT,
                   hold_ready_s: float = DEFAULT_HOLD_READY_S, trusted_uid: int = 0) -> Hooks:
        return cls(tuple(Hook(p, timeout) for p in pre_freeze),
                   tuple(Hook(p, timeout) for p in post_thaw), trusted_uid,
                   tuple(Hook(p, timeout) for p in hold), hold_ready_s)

    def all(self) -> tuple[Hook, ...]:
        return (*self.pre_freeze, *self.hold, *self.post_thaw)


@dataclass(frozen=True)
class HookFailure:
    """A post-thaw or holding hook that failed (or was refused); reported, not raised."""

    hook: Hook
    phase: Phase
    message: str
    returncode: int | None = None
    stderr_tail: str = ""
    #: what went wrong, as the warning says it ("failed", "let go early", "output cut")
    what: str = "failed"

    def warning(self) -> str:
        """One printable, bounded line for the proxy: which hook, its exit code, what it said."""
        code = f" (exit {self.returncode})" if self.returncode is not None else ""
        line = (f"{self.phase} hook {printable(self.hook.path)} {self.what}{code}: "
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
    """Check every hook (all phases) up front, so a bad one refuses before anything runs."""
    if len(hooks.hold) > MAX_HELD:
        raise RefusedError(f"{len(hooks.hold)} holding hooks: at most {MAX_HELD} "
                           "(their outputs go into one manifest)")
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


# --------------------------------------------------------------------------
# holding hooks
# --------------------------------------------------------------------------

def held_text(raw: bytes) -> str:
    r"""A holding hook's output as text: lines kept, every other control escaped.

    Undecodable bytes become ``\xNN`` and controls their escapes
    (:func:`~sanoffload.text.printable`), except newline and tab: the output
    is multi-line text (``backup_label``) that a restore needs as it was.
    """
    text = raw.decode("utf-8", errors="backslashreplace")
    parts: list[str] = []
    start = 0
    for i, c in enumerate(text):
        if c in HELD_KEEPS:
            parts.append(printable(text[start:i]))
            parts.append(c)
            start = i + 1
    parts.append(printable(text[start:]))
    return "".join(parts)


def _cut_utf8(text: str, limit: int) -> str:
    """The longest start of ``text`` that is at most ``limit`` bytes of UTF-8."""
    return text.encode("utf-8")[:limit].decode("utf-8", errors="ignore")


def _cut_json(text: str, budget: int) -> str:
    """The longest start of ``text`` whose JSON string form (escaped) takes ``budget`` bytes."""
    used = 0
    for i, c in enumerate(text):
        used += len(json.dumps(c)) - 2
        if used > budget:
            return text[:i]
    return text


class Holder:
    """One running holding hook: its pipes, READY, letting go, its output.

    A reader thread reads the hook's stdout from start to end (so the hook
    never blocks on a full pipe, even while the filesystem is frozen), then
    reaps it; the caller only waits on the thread's signals, each with a
    deadline, so no hook can stall the agent.
    """

    def __init__(self, hook: Hook, proc: PipelineLike) -> None:
        self.hook = hook
        self.proc = proc
        self._first: queue.Queue[bytes] = queue.Queue(maxsize=1)
        self._eof = threading.Event()
        self._done = threading.Event()
        self._output = bytearray()
        self._cut = False
        self._results: list[StageResult] = []
        self._error: CommandError | None = None
        self._thread = threading.Thread(target=self._read, name=f"hold {hook.name}",
                                        daemon=True)
        self._thread.start()

    # -- the reader thread --------------------------------------------------
    def _read(self) -> None:
        said_first = False
        try:
            out = self.proc.stdout
            first = out.readline(FIRST_LINE_MAX)
            self._first.put(first)
            said_first = True
            # read1: what the pipe holds now; a plain read waits for a full 64 KiB or EOF
            read = out.read1 if isinstance(out, io.BufferedIOBase) else out.read
            while first:
                chunk = read(1 << 16)
                if not chunk:
                    break
                room = MAX_HELD_OUTPUT + 1 - len(self._output)  # one more: "it was cut"
                if room > 0:
                    self._output += chunk[:room]
                if len(self._output) > MAX_HELD_OUTPUT:
                    self._cut = True  # read on to the end anyway: the hook must not block
        except (OSError, ValueError):
            pass  # the pipe went with a kill; the exit status says the rest
        finally:
            if not said_first:
                self._first.put(b"")
            self._eof.set()
            try:
                self._results = self.proc.wait()
            except CommandError as exc:  # its timeout (CommandTimeoutError) too
                self._error = exc
            except Exception as exc:  # never let the agent wait for a thread that died
                self._error = CommandError(f"{self.hook.path}: {exc}")
            finally:
                self._done.set()

    # -- what the agent does -------------------------------------------------
    def wait_ready(self, ready_s: float) -> None:
        """Return once the hook said READY; FreezeError (nothing frozen) if it did not."""
        path = self.hook.path
        try:
            first = self._first.get(timeout=ready_s)
        except queue.Empty:
            raise FreezeError(f"holding hook {path} did not say READY within {ready_s:g}s; "
                              "nothing was frozen") from None
        if first in READY_LINES:
            log.info("holding hook %s: READY", path)
            return
        if not first:
            self._done.wait(KILL_WAIT_S)
            raise FreezeError(f"holding hook {path} ended before it said READY"
                              f"{self._exit_text()}; nothing was frozen: "
                              f"{self._stderr() or 'no output'}")
        shown = printable(first[:80]) + ("…" if len(first) > 80 else "")
        raise FreezeError(f"holding hook {path} said {shown!r} instead of READY; "
                          "nothing was frozen")

    def let_go(self) -> tuple[HeldOutput | None, list[HookFailure]]:
        """Close the hook's stdin, wait for it to end (bounded); its output and any failure."""
        early = self._eof.is_set()  # before we told it: it may not have held throughout
        self._close_stdin()
        failures: list[HookFailure] = []
        if not self._done.wait(self.hook.timeout):
            self._kill()
            failures.append(HookFailure(
                self.hook, HOLD, f"did not end within {self.hook.timeout:g}s of being told "
                                 "to let go; killed", self._returncode(), self._stderr(),
                what="timed out"))
        elif self._error is not None:
            failures.append(HookFailure(self.hook, HOLD, self._error.message,
                                        self._returncode(), self._stderr()))
        if early and not failures:
            failures.append(HookFailure(
                self.hook, HOLD, "its output ended before it was told to let go: it may not "
                                 "have held its lock while the duplicate was made",
                self._returncode(), what="let go early"))
        if not self._done.is_set():
            return None, failures  # not gone even after the kill: nothing trustworthy to keep
        text = held_text(bytes(self._output[:MAX_HELD_OUTPUT]))
        if self._cut or len(text.encode("utf-8")) > MAX_HELD_OUTPUT:
            text = _cut_utf8(text, MAX_HELD_OUTPUT)
            failures.append(HookFailure(
                self.hook, HOLD, f"its output was longer than {MAX_HELD_OUTPUT} bytes; "
                                 f"the first {MAX_HELD_OUTPUT} were kept", what="output cut"))
        return HeldOutput(self.hook.path, text), failures

    def stop(self, *, kill: bool) -> list[HookFailure]:
        """On a failed quiesce: let go (or kill a hook that broke the protocol); bounded."""
        if kill:
            self._kill()
            return []
        self._close_stdin()
        if self._done.wait(self.hook.timeout):
            if self._error is None:
                return []
            return [HookFailure(self.hook, HOLD, self._error.message, self._returncode(),
                                self._stderr())]
        self._kill()
        return [HookFailure(self.hook, HOLD, f"did not end within {self.hook.timeout:g}s of "
                                             "being told to let go; killed", what="timed out")]

    # -- helpers -------------------------------------------------------------
    def _close_stdin(self) -> None:
        stdin = self.proc.stdin
        if stdin is not None:
            try:
                stdin.close()
            except (OSError, ValueError):  # it is gone already: nothing more to tell it
                pass

    def _kill(self) -> None:
        if self._done.is_set():
            return  # reaped already: its group id may belong to someone else by now
        self.proc.kill()
        if not self._done.wait(KILL_WAIT_S):
            # a child it left behind holds the pipe open; the pipeline's deadline ends it
            log.error("holding hook %s: still not gone %gs after the kill", self.hook.path,
                      KILL_WAIT_S)

    def _returncode(self) -> int | None:
        if self._error is not None:
            return self._error.returncode
        return self._results[0].returncode if self._results else None

    def _exit_text(self) -> str:
        code = self._returncode()
        return f" (exit {code})" if code is not None else ""

    def _stderr(self) -> str:
        if self._error is not None:
            return stderr_tail(self._error.stderr)
        return stderr_tail(self._results[0].stderr) if self._results else ""


class Holding:
    """The holding hooks of one quiesce, started in order, each READY before the next starts."""

    def __init__(self) -> None:
        self.holders: list[Holder] = []

    @classmethod
    def start(cls, runner: Runner, hooks: Hooks, mountpoint: str, path: str, *,
              life_s: float) -> Holding:
        """Start every holding hook and wait for its READY.

        ``life_s`` bounds each hook's whole life (the pipeline's deadline kills
        it), should the agent hang between READY and letting go. Raises
        :class:`FreezeError` (or the RefusedError of a hook changed since it
        was checked) after telling the hooks already started to let go.
        """
        holding = cls()
        current: Holder | None = None
        try:
            for hook in hooks.hold:
                current = None
                check_hook(hook, trusted_uid=hooks.trusted_uid)
                log.info("holding hook: %s", hook.path)
                try:
                    # its own process group, a deadline, stdin and stdout as pipes;
                    # stdin is the "let go" signal, and closes by itself if we die
                    proc = runner.pipeline([Stage([hook.path])], timeout=life_s,
                                           stdin=subprocess.PIPE, cwd="/",
                                           env=hook_env(HOLD, mountpoint, path))
                except CommandError as exc:
                    raise FreezeError(f"holding hook {hook.path} could not start: "
                                      f"{exc.message}; nothing was frozen") from exc
                current = Holder(hook, proc)
                current.wait_ready(hooks.hold_ready_s)
                holding.holders.append(current)
        except BaseException as exc:
            if current is not None:
                current.stop(kill=True)  # it broke the protocol: no lock of its to release
            for failure in holding.stop():
                exc.add_note(f"holding hook {failure.hook.path} also failed: "
                             f"{failure.message}")
            raise
        return holding

    def let_go(self) -> tuple[tuple[HeldOutput, ...], tuple[HookFailure, ...]]:
        """After the thaw: tell each hook (newest first) to let go; outputs in start order."""
        outputs: dict[int, HeldOutput] = {}
        failures: list[HookFailure] = []
        for i, holder in reversed(list(enumerate(self.holders))):
            output, failed = holder.let_go()
            if output is not None:
                outputs[i] = output
            failures += failed
        held, cut = fit_held([outputs[i] for i in sorted(outputs)], self.holders)
        failures += cut
        for failure in failures:
            log.error("holding hook %s: %s", failure.hook.path, failure.message)
        return held, tuple(failures)

    def stop(self) -> list[HookFailure]:
        """On a failed quiesce: tell each hook, newest first, to let go; the failures."""
        failures: list[HookFailure] = []
        for holder in reversed(self.holders):
            failures += holder.stop(kill=False)
        self.holders.clear()
        return failures


def fit_held(outputs: list[HeldOutput], holders: list[Holder]
             ) -> tuple[tuple[HeldOutput, ...], list[HookFailure]]:
    """Cut outputs, last ones first, until all fit :data:`MAX_HELD_JSON` (what the proxy
    and the store accept); each cut is a warning."""
    by_path = {h.hook.path: h.hook for h in holders}
    if held_json_size(outputs) <= MAX_HELD_JSON:
        return tuple(outputs), []
    kept: list[HeldOutput] = []
    failures: list[HookFailure] = []
    # every entry keeps its hook's name; the outputs share what is left, earlier ones first
    room = MAX_HELD_JSON - held_json_size([HeldOutput(o.hook, "") for o in outputs])
    for out in outputs:
        text = _cut_json(out.output, max(room, 0))
        room -= len(json.dumps(text)) - 2
        if text != out.output:
            failures.append(HookFailure(
                by_path.get(out.hook, Hook(out.hook)), HOLD,
                f"the holding hooks' outputs are longer than {MAX_HELD_JSON} bytes together; "
                f"{len(text)} of {len(out.output)} characters of this one were kept",
                what="output cut"))
        kept.append(HeldOutput(out.hook, text))
    return tuple(kept), failures
