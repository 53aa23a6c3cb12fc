"""The one way sanoffload runs external commands.

Every call goes through a :class:`Runner` that is handed to the code that needs
it (never a module-level global), so unit tests can pass a
``sanoffload.testing.FakeRunner`` that records calls and answers with real
outputs recorded from real tools. This module is the policy; how processes are
started, grouped, timed out and killed is :mod:`sanoffload.process` (single
commands, through ``sh``) and :mod:`sanoffload.pipeline` (stages on kernel
pipes), and both executors share it.

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

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Any

from . import process
from .errors import CommandError, CommandNotFoundError, CommandTimeoutError
from .pipeline import PipelineLike, Stage, start as start_pipeline
from .process import (
    Arg,
    NotFound,
    OkCodes,
    RawResult,
    Spawned,
    TimedOut,
    error_detail,
    fs_str,
)
from .text import printable

__all__ = ["DEFAULT_PATH", "DEFAULT_TIMEOUT", "MASK", "CommandRunner", "OkCodes", "Result",
           "Runner", "Spawned"]

log = logging.getLogger(__name__)
# sh logs every chunk at DEBUG; our own lines say what matters
logging.getLogger("sh").setLevel(logging.WARNING)

MASK = "***"
DEFAULT_TIMEOUT = 60.0
#: sbin directories first: storage tools live there and root's PATH may lack them
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: an argv element following one of these is masked even if not registered
_SECRET_FLAG_WORDS = ("password", "passwd", "secret", "chap")


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
        except NotFound as exc:
            raise CommandNotFoundError(f"command not found: {shown[0]}", argv=shown,
                                       hint=exc.hint) from None
        except TimedOut as exc:
            took = time.monotonic() - started
            log.warning("timeout after %.1fs: %s", took, " ".join(shown))
            raise CommandTimeoutError(
                f"{shown[0]} timed out after {limit:g}s and was killed: {' '.join(shown)}",
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
            raise CommandError(f"{' '.join(shown)} failed with exit code {raw.returncode}: "
                               f"{detail}", argv=shown, returncode=raw.returncode,
                               stdout=res.stdout, stderr=res.stderr)
        return res

    def json(self, argv: Sequence[str], **kwargs: Any) -> Any:
        """``run`` and parse stdout as JSON."""
        return self.run(argv, **kwargs).json()

    def which(self, name: str) -> str | None:
        """Path of ``name`` on the runner's PATH, or None."""
        return process.find_executable(name, self.build_env()["PATH"])

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
        except NotFound as exc:
            raise CommandNotFoundError(f"command not found: {shown[0]}", argv=shown,
                                       hint=exc.hint) from None

    def pipeline(self, stages: Sequence[Stage], *, timeout: float | None = None,
                 stdin: IO[bytes] | int | None = None, env: Mapping[str, str] | None = None,
                 secrets: Iterable[str] = (), cwd: str | None = None) -> PipelineLike:
        """Start ``stages`` joined by pipes; read the result from ``.stdout``, then ``.wait()``.

        Like :meth:`run`: minimal env with ``LC_ALL=C``, one deadline for the
        whole pipeline (the process group is killed), tolerated exit codes
        named per stage, secrets masked in what is logged and raised; ``cwd``
        for every stage (None: ours).
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
                                  mask=lambda text: self.mask(text, secrets), cwd=cwd)
        except NotFound as exc:
            raise CommandNotFoundError(f"command not found in pipeline: {exc.hint}",
                                       hint=exc.hint) from None

    @contextlib.contextmanager
    def stream(self, argv: Sequence[Arg], *, timeout: float | None = None,
               ok_codes: OkCodes | None = None, env: Mapping[str, str] | None = None,
               secrets: Iterable[str] = (), stdin: int | None = None) -> Iterator[IO[bytes]]:
        """Run ``argv`` and yield its stdout to read as it comes (never a file, never all in
        memory).

        The command runs in its own process group under one deadline, its
        stderr kept for the error. When the block ends normally, what is left
        unread is read to EOF and the exit status checked (CommandError,
        CommandTimeoutError); when it ends by an exception, the group is killed
        and reaped, and the exception goes on. ``stdin``: a descriptor the command reads
        (None: none).
        """
        with self.pipeline([Stage(argv, ok_codes)], timeout=timeout, env=env,
                           secrets=secrets, stdin=stdin) as p:
            yield p.stdout
            while p.stdout.read(1 << 16):
                pass
            p.wait()

    def _execute(self, argv: list[str], *, timeout: float, input: bytes | str | None,
                 cwd: str | None, env: dict[str, str], pass_fds: tuple[int, ...] = ()) -> RawResult:
        raise NotImplementedError

    def _pipeline(self, stages: list[Stage], shown: list[tuple[str, ...]], *, timeout: float,
                  stdin: IO[bytes] | int | None, env: dict[str, str],
                  mask: Callable[[str], str], cwd: str | None = None) -> PipelineLike:
        raise NotImplementedError

    def _spawn(self, argv: list[str], *, pass_fds: tuple[int, ...], log_path: str | None,
               env: dict[str, str]) -> Spawned:
        raise NotImplementedError


class CommandRunner(Runner):
    """Runs commands for real: single commands through ``sh``, pipelines on kernel pipes."""

    def _execute(self, argv: list[str], *, timeout: float, input: bytes | str | None,
                 cwd: str | None, env: dict[str, str],
                 pass_fds: tuple[int, ...] = ()) -> RawResult:
        return process.run_command(argv, timeout=timeout, input=input, cwd=cwd, env=env,
                                   pass_fds=pass_fds)

    def _spawn(self, argv: list[str], *, pass_fds: tuple[int, ...], log_path: str | None,
               env: dict[str, str]) -> Spawned:
        return process.spawn_command(argv, pass_fds=pass_fds, log_path=log_path, env=env)

    def _pipeline(self, stages: list[Stage], shown: list[tuple[str, ...]], *, timeout: float,
                  stdin: IO[bytes] | int | None, env: dict[str, str],
                  mask: Callable[[str], str], cwd: str | None = None) -> PipelineLike:
        return start_pipeline(stages, shown, env=env, timeout=timeout, stdin=stdin, mask=mask,
                              cwd=cwd)


def _decode(data: bytes | str) -> str:
    if isinstance(data, str):
        return data
    return data.decode("utf-8", errors="replace")

