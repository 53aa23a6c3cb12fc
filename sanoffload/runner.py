"""The one way sanoffload runs external commands.

Every call goes through a :class:`Runner` that is handed to the code that needs
it (never a module-level global), so unit tests can pass a :class:`FakeRunner`
that records calls and answers with real outputs recorded from real tools.

Rules every call follows:

* argv is a list, never a shell string;
* the environment is minimal and has ``LC_ALL=C`` so output parses the same
  everywhere;
* every call has a timeout (the runner's default unless the call names one);
  on expiry the whole process group is killed;
* exit codes other than 0 are errors unless the call names them in
  ``ok_codes`` (``{15: "session exists"}``): the name lands in the result and
  the log;
* secrets (CHAP passwords...) registered on the runner or passed per call are
  replaced by ``***`` in logs, results and error messages;
* argv elements are ``str``, ``bytes`` or paths: Linux paths are bytes, so a
  ``b"\\xff"`` (or its ``os.fsdecode`` form) reaches the command byte for byte;
  logged and raised forms show it escaped (``\\xff``), never raw;
* a failure's message keeps the lines that say why (tar's "Cannot write: No
  space left on device"), not only the summary line a tool ends with.
"""

from __future__ import annotations

import codecs
import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

from .errors import CommandError, CommandNotFoundError, CommandTimeoutError
from .pipeline import Arg, PipelineLike, Stage, error_detail, fs_str
from .pipeline import start as start_pipeline
from .signals import deferred as deferred_signals
from .text import printable

log = logging.getLogger(__name__)
# sh logs every chunk at DEBUG; our own lines say what matters
logging.getLogger("sh").setLevel(logging.WARNING)

MASK = "***"
DEFAULT_TIMEOUT = 60.0
#: sbin directories first: storage tools live there and root's PATH may lack them
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: an argv element following one of these is masked even if not registered
_SECRET_FLAG_WORDS = ("password", "passwd", "secret", "chap")

OkCodes = Mapping[int, str]

#: the codec sh encodes argv with: the filesystem encoding with surrogateescape, so an
#: argument os.fsdecode made from b"\xff" goes out as b"\xff" (sh's default, strict
#: UTF-8, raises UnicodeEncodeError in the forked child instead)
_ARGV_CODEC = "sanoffload-argv"


def _argv_codec(name: str) -> codecs.CodecInfo | None:
    if name != _ARGV_CODEC.replace("-", "_") and name != _ARGV_CODEC:
        return None
    fs_enc, fs_err = sys.getfilesystemencoding(), sys.getfilesystemencodeerrors()

    def encode(text: str, errors: str = "strict") -> tuple[bytes, int]:
        return text.encode(fs_enc, fs_err), len(text)

    def decode(data: Any, errors: str = "strict") -> tuple[str, int]:
        raw = bytes(data)
        return raw.decode(fs_enc, fs_err), len(raw)

    return codecs.CodecInfo(encode, decode, name=_ARGV_CODEC)


codecs.register(_argv_codec)


@dataclass(frozen=True)
class Result:
    """What a finished command gave back (argv and output already masked)."""

    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    duration: float
    #: the name the call gave this exit code ("ok" for 0)
    code_name: str = "ok"

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def json(self) -> Any:
        """Parse stdout as JSON (for ``--reportformat json``, ``-J`` ...)."""
        try:
            return json.loads(self.stdout)
        except ValueError as exc:
            raise CommandError(f"{self.argv[0]}: output is not JSON: {exc}", argv=self.argv,
                               returncode=self.returncode, stdout=self.stdout[:2000],
                               stderr=self.stderr) from exc


@dataclass
class _Raw:
    returncode: int
    stdout: bytes
    stderr: bytes


class Runner:
    """Base runner: masking, logging and exit-code policy; subclasses execute."""

    def __init__(self, *, default_timeout: float = DEFAULT_TIMEOUT,
                 extra_env: Mapping[str, str] | None = None) -> None:
        self.default_timeout = default_timeout
        self.extra_env = dict(extra_env or {})
        self._secrets: set[str] = set()

    # -- secrets ----------------------------------------------------------
    def add_secret(self, secret: str) -> None:
        """Mask ``secret`` in every later log line, result and error."""
        if secret:
            self._secrets.add(secret)

    def mask(self, text: str, extra: Iterable[str] = ()) -> str:
        for secret in sorted({*self._secrets, *extra}, key=len, reverse=True):
            if secret:
                text = text.replace(secret, MASK)
        return text

    def mask_argv(self, argv: Sequence[Arg], extra: Iterable[str] = ()) -> tuple[str, ...]:
        """``argv`` as logged and raised: secrets masked, odd bytes and controls escaped."""
        return tuple(printable(os.fsencode(a))
                     for a in self._mask_args([fs_str(a) for a in argv], extra))

    def _mask_args(self, argv: Sequence[str], extra: Iterable[str]) -> list[str]:
        out: list[str] = []
        hide_next = False
        for arg in argv:
            if hide_next:
                if arg.startswith("-"):  # "-v"/"--value" between the name and the secret
                    out.append(arg)
                    continue
                out.append(MASK)
                hide_next = False
                continue
            low = arg.lower()
            key, eq, _value = arg.partition("=")
            if eq and any(w in key.lower() for w in _SECRET_FLAG_WORDS):
                out.append(f"{key}={MASK}")
                continue
            out.append(self.mask(arg, extra))
            # "-v SECRET" after "-n node.session.auth.password" is the iscsiadm idiom
            hide_next = any(w in low for w in _SECRET_FLAG_WORDS) and not eq
        return out

    # -- environment --------------------------------------------------------
    def build_env(self, env: Mapping[str, str] | None = None) -> dict[str, str]:
        base = {"PATH": DEFAULT_PATH, "LC_ALL": "C", "LANG": "C"}
        base.update(self.extra_env)
        if env:
            base.update(env)
        base["LC_ALL"] = "C"
        return base

    # -- running ------------------------------------------------------------
    def run(self, argv: Sequence[Arg], *, timeout: float | None = None,
            ok_codes: OkCodes | None = None, input: bytes | str | None = None,
            secrets: Iterable[str] = (), cwd: str | None = None,
            env: Mapping[str, str] | None = None, pass_fds: Iterable[int] = ()) -> Result:
        """Run ``argv`` to completion and return its :class:`Result`.

        ``pass_fds``: descriptors the command inherits (a directory it reaches
        as ``/proc/self/fd/N``, never by a path someone could swap).
        Raises :class:`CommandNotFoundError`, :class:`CommandTimeoutError`, or
        :class:`CommandError` for an exit code not in ``ok_codes``.
        """
        if not argv:
            raise ValueError("empty argv")
        args = [fs_str(a) for a in argv]
        secrets = tuple(secrets)
        codes: dict[int, str] = {0: "ok"}
        codes.update(ok_codes or {})
        limit = self.default_timeout if timeout is None else timeout
        shown = self.mask_argv(args, secrets)
        log.debug("run: %s (timeout %.0fs)", " ".join(shown), limit)
        started = time.monotonic()
        try:
            raw = self._execute(args, timeout=limit, input=input, cwd=cwd, env=self.build_env(env),
                                pass_fds=tuple(pass_fds))
        except _NotFound as exc:
            raise CommandNotFoundError(f"command not found: {shown[0]}", argv=shown,
                                       hint=exc.hint) from None
        except _TimedOut as exc:
            took = time.monotonic() - started
            log.warning("timeout after %.1fs: %s", took, " ".join(shown))
            raise CommandTimeoutError(
                f"{shown[0]} timed out after {limit:.0f}s and was killed: {' '.join(shown)}",
                argv=shown, stdout=self.mask(_decode(exc.stdout), secrets),
                stderr=self.mask(_decode(exc.stderr), secrets)) from None
        took = time.monotonic() - started
        res = Result(argv=shown, returncode=raw.returncode,
                     stdout=self.mask(_decode(raw.stdout), secrets),
                     stderr=self.mask(_decode(raw.stderr), secrets), duration=took,
                     code_name=codes.get(raw.returncode, "error"))
        log.debug("done: %s rc=%d (%s) in %.2fs", shown[0], res.returncode, res.code_name, took)
        if raw.returncode not in codes:
            detail = error_detail(res.stderr.strip() or res.stdout)
            raise CommandError(f"{' '.join(shown)} failed with exit code {raw.returncode}: {detail}",
                               argv=shown, returncode=raw.returncode, stdout=res.stdout,
                               stderr=res.stderr)
        return res

    def json(self, argv: Sequence[str], **kwargs: Any) -> Any:
        """``run`` and parse stdout as JSON."""
        return self.run(argv, **kwargs).json()

    def which(self, name: str) -> str | None:
        """Path of ``name`` on the runner's PATH, or None."""
        return shutil.which(name, path=self.build_env()["PATH"])

    def spawn(self, argv: Sequence[Arg], *, pass_fds: Iterable[int] = (),
              log_path: str | None = None, env: Mapping[str, str] | None = None,
              secrets: Iterable[str] = ()) -> Spawned:
        """Start a long-lived helper (a guard, a pipeline stage) and return at once.

        It runs in its own session, so signals aimed at our process group (and
        our death) do not reach it; ``pass_fds`` are the only descriptors it
        inherits. Its output goes to ``log_path`` (or nowhere).
        """
        args = [fs_str(a) for a in argv]
        shown = self.mask_argv(args, tuple(secrets))
        log.debug("spawn: %s", " ".join(shown))
        try:
            return self._spawn(args, pass_fds=tuple(pass_fds), log_path=log_path,
                               env=self.build_env(env))
        except _NotFound as exc:
            raise CommandNotFoundError(f"command not found: {shown[0]}", argv=shown,
                                       hint=exc.hint) from None

    def pipeline(self, stages: Sequence[Stage], *, timeout: float | None = None,
                 stdin: IO[bytes] | int | None = None, env: Mapping[str, str] | None = None,
                 secrets: Iterable[str] = ()) -> PipelineLike:
        """Start ``stages`` joined by pipes; read the result from ``.stdout``, then ``.wait()``.

        Like :meth:`run`: minimal env with ``LC_ALL=C``, one deadline for the
        whole pipeline (the process group is killed), tolerated exit codes
        named per stage, secrets masked in what is logged and raised.
        """
        if not stages:
            raise ValueError("empty pipeline")
        secrets = tuple(secrets)
        shown = [self.mask_argv(st.argv, secrets) for st in stages]
        limit = self.default_timeout if timeout is None else timeout
        log.debug("pipeline: %s (timeout %.0fs)", " | ".join(" ".join(a) for a in shown), limit)
        try:
            return self._pipeline(list(stages), shown, timeout=limit, stdin=stdin,
                                  env=self.build_env(env),
                                  mask=lambda text: self.mask(text, secrets))
        except _NotFound as exc:
            raise CommandNotFoundError(f"command not found in pipeline: {exc.hint}",
                                       hint=exc.hint) from None

    @contextlib.contextmanager
    def stream(self, argv: Sequence[Arg], *, timeout: float | None = None,
               ok_codes: OkCodes | None = None, env: Mapping[str, str] | None = None,
               secrets: Iterable[str] = ()) -> Iterator[IO[bytes]]:
        """Run ``argv`` and yield its stdout to read as it comes (never a file, never all in memory).

        The command runs in its own process group under one deadline, its
        stderr kept for the error. When the block ends normally, what is left
        unread is read to EOF and the exit status checked (CommandError,
        CommandTimeoutError); when it ends by an exception, the group is killed
        and reaped, and the exception goes on.
        """
        with self.pipeline([Stage(argv, ok_codes)], timeout=timeout, env=env,
                           secrets=secrets) as p:
            yield p.stdout
            while p.stdout.read(1 << 16):
                pass
            p.wait()

    def _execute(self, argv: list[str], *, timeout: float, input: bytes | str | None,
                 cwd: str | None, env: dict[str, str], pass_fds: tuple[int, ...] = ()) -> _Raw:
        raise NotImplementedError

    def _pipeline(self, stages: list[Stage], shown: list[tuple[str, ...]], *, timeout: float,
                  stdin: IO[bytes] | int | None, env: dict[str, str],
                  mask: Callable[[str], str]) -> PipelineLike:
        raise NotImplementedError

    def _spawn(self, argv: list[str], *, pass_fds: tuple[int, ...], log_path: str | None,
               env: dict[str, str]) -> Spawned:
        raise NotImplementedError


class Spawned:
    """A started helper process."""

    def __init__(self, argv: Sequence[str], pid: int) -> None:
        self.argv = list(argv)
        self.pid = pid

    def poll(self) -> int | None:
        """Exit code, or None while it runs."""
        raise NotImplementedError

    def wait(self, timeout: float) -> int:
        """Wait up to ``timeout`` seconds; raise CommandTimeoutError if it still runs."""
        raise NotImplementedError

    def kill(self) -> None:
        raise NotImplementedError


class _ShSpawned(Spawned):
    def __init__(self, argv: Sequence[str], proc: Any) -> None:
        super().__init__(argv, proc.pid)
        self._proc = proc

    def poll(self) -> int | None:
        return None if self._proc.is_alive() else self._proc.process.exit_code

    def wait(self, timeout: float) -> int:
        import sh

        try:
            self._proc.wait(timeout=timeout)
        except sh.TimeoutException:
            raise CommandTimeoutError(f"{self.argv[0]} still running after {timeout:.0f}s",
                                      argv=self.argv) from None
        except sh.SignalException as exc:
            return 128 + abs(exc.exit_code)
        return int(self._proc.exit_code)

    def kill(self) -> None:
        _kill_group(self.pid)


class _NotFound(Exception):
    def __init__(self, hint: str | None = None) -> None:
        super().__init__(hint)
        self.hint = hint


class _TimedOut(Exception):
    def __init__(self, stdout: bytes = b"", stderr: bytes = b"") -> None:
        super().__init__("timeout")
        self.stdout = stdout
        self.stderr = stderr


def _decode(data: bytes | str) -> str:
    if isinstance(data, str):
        return data
    return data.decode("utf-8", errors="replace")


class CommandRunner(Runner):
    """Runs commands for real, through the ``sh`` library."""

    def _execute(self, argv: list[str], *, timeout: float, input: bytes | str | None,
                 cwd: str | None, env: dict[str, str], pass_fds: tuple[int, ...] = ()) -> _Raw:
        import sh  # only the runner touches sh

        exe = argv[0] if os.sep in argv[0] else shutil.which(argv[0], path=env["PATH"])
        if exe is None or not os.access(exe, os.X_OK):
            raise _NotFound(f"install the package that provides '{argv[0]}'")
        proc = None
        extra: dict[str, Any] = {"_pass_fds": set(pass_fds)} if pass_fds else {}
        try:
            for fd in pass_fds:
                os.set_inheritable(fd, True)
            with deferred_signals():
                proc = sh.Command(exe)(
                    *argv[1:], _env=env, _in=input, _cwd=cwd, _timeout=timeout,
                    _ok_code=list(range(0, 256)), _tty_out=False, _bg=True, _bg_exc=False,
                    _new_group=True, _return_cmd=True, _truncate_exc=False,
                    _encoding=_ARGV_CODEC, **extra)
            proc.wait()
        except sh.TimeoutException:
            # sh killed the leader; children it left (pipes, helpers) die with the group
            assert proc is not None
            _kill_group(proc.pid)
            raise _TimedOut(proc.stdout, proc.stderr) from None
        except sh.SignalException as exc:
            return _Raw(128 + abs(exc.exit_code), exc.stdout, exc.stderr)
        except BaseException:
            # Interrupted (SIGTERM/SIGHUP handler, Ctrl-C) while starting or waiting: the
            # child has its own process group, so nothing else will stop it
            if proc is not None:
                _kill_group(proc.pid)
                _reap(proc)
            raise
        finally:
            for fd in pass_fds:
                os.set_inheritable(fd, False)
        return _Raw(proc.exit_code, proc.stdout, proc.stderr)


    def _spawn(self, argv: list[str], *, pass_fds: tuple[int, ...], log_path: str | None,
               env: dict[str, str]) -> Spawned:
        import sh

        exe = argv[0] if os.sep in argv[0] else shutil.which(argv[0], path=env["PATH"])
        if exe is None or not os.access(exe, os.X_OK):
            raise _NotFound(f"install the package that provides '{argv[0]}'")
        # sh leaves pass_fds open but not inheritable (Python opens fds O_CLOEXEC)
        for fd in pass_fds:
            os.set_inheritable(fd, True)
        try:
            # a helper outlives us on purpose (the freeze guard): a signal arriving while it
            # starts is raised after the start, and the caller's cleanup deals with it
            with deferred_signals():
                proc = sh.Command(exe)(
                    *argv[1:], _env=env, _bg=True, _bg_exc=False, _new_session=True,
                    _pass_fds=set(pass_fds), _ok_code=list(range(0, 256)), _tty_out=False,
                    _out=log_path or os.devnull, _err_to_out=True, _return_cmd=True,
                    _truncate_exc=False, _encoding=_ARGV_CODEC)
        finally:
            for fd in pass_fds:
                os.set_inheritable(fd, False)
        return _ShSpawned(argv, proc)


    def _pipeline(self, stages: list[Stage], shown: list[tuple[str, ...]], *, timeout: float,
                  stdin: IO[bytes] | int | None, env: dict[str, str],
                  mask: Callable[[str], str]) -> PipelineLike:
        with deferred_signals():
            return start_pipeline(stages, shown, env=env, timeout=timeout, stdin=stdin,
                                  mask=mask, resolve=lambda name: _resolve(name, env))


def _resolve(name: str, env: Mapping[str, str]) -> str | None:
    exe = name if os.sep in name else shutil.which(name, path=env["PATH"])
    return exe if exe is not None and os.access(exe, os.X_OK) else None


def _reap(proc: Any) -> None:
    """Wait for a killed child so it does not linger as a zombie."""
    try:
        proc.wait(timeout=5)
    except Exception:  # it was SIGKILLed: any outcome of the wait is fine
        pass


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


# --------------------------------------------------------------------------
# The recording fake, for unit tests
# --------------------------------------------------------------------------

@dataclass
class Rule:
    """One scripted answer: matches calls whose argv starts with ``prefix``."""

    prefix: tuple[str, ...]
    returncode: int = 0
    stdout: str | bytes = ""
    stderr: str | bytes = ""
    timeout: bool = False
    not_found: bool = False
    times: int | None = None  # None: any number of times
    action: Callable[[list[str]], None] | None = None
    used: int = 0

    def matches(self, argv: Sequence[str]) -> bool:
        if self.times is not None and self.used >= self.times:
            return False
        return tuple(argv[: len(self.prefix)]) == self.prefix


@dataclass
class Call:
    argv: list[str]
    timeout: float
    input: bytes | str | None
    env: dict[str, str] = field(default_factory=dict)
    pass_fds: tuple[int, ...] = ()


class FakeRunner(Runner):
    """Answers from scripted rules and records every call.

    The same masking, logging and exit-code policy as :class:`CommandRunner`
    applies, so error paths behave exactly as they would for real. A call that
    no rule matches fails the test loudly.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.rules: list[Rule] = []
        self.calls: list[Call] = []

    def on(self, *prefix: str, returncode: int = 0, stdout: str | bytes = "",
           stderr: str | bytes = "", timeout: bool = False, not_found: bool = False,
           times: int | None = None,
           action: Callable[[list[str]], None] | None = None) -> FakeRunner:
        """Script the answer for calls starting with ``prefix``; later rules win."""
        self.rules.insert(0, Rule(tuple(prefix), returncode, stdout, stderr, timeout,
                                  not_found, times, action))
        return self

    def argvs(self) -> list[list[str]]:
        return [c.argv for c in self.calls]

    def called(self, *prefix: str) -> bool:
        return any(tuple(c.argv[: len(prefix)]) == prefix for c in self.calls)

    def _answer(self, argv: list[str], what: str) -> Rule:
        """The rule answering ``argv`` (its action run); unmatched calls fail the test."""
        for rule in self.rules:
            if rule.matches(argv):
                rule.used += 1
                if rule.action:
                    rule.action(argv)
                if rule.not_found:
                    raise _NotFound()
                return rule
        raise AssertionError(f"FakeRunner: no rule for {what}{argv!r}")

    def _spawn(self, argv: list[str], *, pass_fds: tuple[int, ...], log_path: str | None,
               env: dict[str, str]) -> Spawned:
        self.calls.append(Call(list(argv), 0.0, None, env))
        rule = self._answer(argv, "spawn ")
        return _FakeSpawned(argv, rule.returncode, running=rule.timeout)

    def _pipeline(self, stages: list[Stage], shown: list[tuple[str, ...]], *, timeout: float,
                  stdin: IO[bytes] | int | None, env: dict[str, str],
                  mask: Callable[[str], str]) -> PipelineLike:
        """Each stage answered by its rule; the last stage's stdout is what is read."""
        import io

        from .pipeline import FakePipeline

        rules = []
        for stage in stages:
            argv = [fs_str(a) for a in stage.argv]
            self.calls.append(Call(argv, timeout, None, env))
            rules.append(self._answer(argv, "pipeline stage "))
        return FakePipeline(stages, shown, io.BytesIO(_enc(rules[-1].stdout)),
                            [(r.returncode, _enc(r.stderr).decode()) for r in rules],
                            timed_out=any(r.timeout for r in rules), mask=mask)

    def _execute(self, argv: list[str], *, timeout: float, input: bytes | str | None,
                 cwd: str | None, env: dict[str, str], pass_fds: tuple[int, ...] = ()) -> _Raw:
        self.calls.append(Call(list(argv), timeout, input, env, pass_fds))
        rule = self._answer(argv, "")
        if rule.timeout:
            raise _TimedOut(_enc(rule.stdout), _enc(rule.stderr))
        return _Raw(rule.returncode, _enc(rule.stdout), _enc(rule.stderr))


class _FakeSpawned(Spawned):
    """A scripted helper: exits with the rule's code, or runs until killed (timeout=True)."""

    def __init__(self, argv: Sequence[str], returncode: int, *, running: bool) -> None:
        super().__init__(argv, pid=0)
        self.returncode = returncode
        self.running = running
        self.killed = False

    def poll(self) -> int | None:
        return None if self.running else self.returncode

    def wait(self, timeout: float) -> int:
        if self.running:
            raise CommandTimeoutError(f"{self.argv[0]} still running after {timeout:.0f}s",
                                      argv=self.argv)
        return self.returncode

    def kill(self) -> None:
        self.killed = True
        self.running = False
        self.returncode = 137


def _enc(data: str | bytes) -> bytes:
    return data.encode() if isinstance(data, str) else data
