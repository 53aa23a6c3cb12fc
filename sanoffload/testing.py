"""Test doubles for the process layer: a recording :class:`FakeRunner` and what it returns.

Production code never imports this module (a unit test checks it); it
imports production code, so the fakes apply the very masking, logging and
exit-code policy of :class:`~sanoffload.runner.Runner` and the same checks
as a real :class:`~sanoffload.pipeline.Pipeline`. Answers should be real
outputs recorded from real tools (tests/fixtures), not invented ones.
"""

from __future__ import annotations

import builtins
import io
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import IO, Any

from .errors import AuthError, CommandTimeoutError, IntegrityError, ObjectStoreError, ResourceError
from .pipeline import (
    PipelineLike,
    Stage,
    StageResult,
    StagesBase,
    check_results,
    code_name,
)
from .process import NotFound, RawResult, Spawned, TimedOut, fs_str
from .runner import Runner
from .store import backend as _backend
from .store.backend import ObjectInfo, Upload, check_key, check_prefix

__all__ = ["Call", "FakePipeline", "FakeRunner", "FakeSpawned", "MemoryBackend", "MemoryWriter",
           "Rule"]


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
    """One recorded call: ``argv`` as the command would get it (bytes in their fsdecode form)."""

    argv: list[str]
    timeout: float
    input: bytes | str | None
    env: dict[str, str] = field(default_factory=dict)
    pass_fds: tuple[int, ...] = ()


class FakeRunner(Runner):
    """Answers from scripted rules and records every call.

    The same masking, logging and exit-code policy as
    :class:`~sanoffload.runner.CommandRunner` applies, so error paths behave
    exactly as they would for real. A call that no rule matches fails the
    test loudly.
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
                    raise NotFound()
                return rule
        raise AssertionError(f"FakeRunner: no rule for {what}{argv!r}")

    def _spawn(self, argv: list[str], *, pass_fds: tuple[int, ...], log_path: str | None,
               env: dict[str, str]) -> Spawned:
        self.calls.append(Call(list(argv), 0.0, None, env))
        rule = self._answer(argv, "spawn ")
        return FakeSpawned(argv, rule.returncode, running=rule.timeout)

    def _pipeline(self, stages: list[Stage], shown: list[tuple[str, ...]], *, timeout: float,
                  stdin: IO[bytes] | int | None, env: dict[str, str],
                  mask: Callable[[str], str], cwd: str | None = None) -> PipelineLike:
        """Each stage answered by its rule; the last stage's stdout is what is read."""
        rules = []
        for stage in stages:
            argv = [fs_str(a) for a in stage.argv]
            self.calls.append(Call(argv, timeout, None, env))
            rules.append(self._answer(argv, "pipeline stage "))
        return FakePipeline(stages, shown, io.BytesIO(_enc(rules[-1].stdout)),
                            [(r.returncode, _enc(r.stderr).decode()) for r in rules],
                            timed_out=any(r.timeout for r in rules), mask=mask,
                            stdin=_Sink() if stdin == subprocess.PIPE else None)

    def _execute(self, argv: list[str], *, timeout: float, input: bytes | str | None,
                 cwd: str | None, env: dict[str, str],
                 pass_fds: tuple[int, ...] = ()) -> RawResult:
        self.calls.append(Call(list(argv), timeout, input, env, pass_fds))
        rule = self._answer(argv, "")
        if rule.timeout:
            raise TimedOut(_enc(rule.stdout), _enc(rule.stderr))
        return RawResult(rule.returncode, _enc(rule.stdout), _enc(rule.stderr))


class FakeSpawned(Spawned):
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


class _Sink(io.BytesIO):
    """A pipeline's stdin: keeps what was written after the writer closes it."""

    def __init__(self) -> None:
        super().__init__()
        self.written = b""

    def close(self) -> None:
        if not self.closed:
            self.written = self.getvalue()
        super().close()


class FakePipeline(StagesBase):
    """What FakeRunner.pipeline returns: scripted output and exit codes, the real checks.

    It implements :class:`~sanoffload.pipeline.PipelineLike` in full, like
    :class:`~sanoffload.pipeline.Pipeline`: ``stdin`` is a sink (when started
    with ``stdin=subprocess.PIPE``) whose bytes stay in :attr:`written`;
    ``wait()`` closes the streams and may be called once.
    """

    def __init__(self, stages: Sequence[Stage], shown: Sequence[tuple[str, ...]],
                 stdout: IO[bytes], outcomes: Sequence[tuple[int, str]], *, timed_out: bool,
                 mask: Callable[[str], str], stdin: IO[bytes] | None = None) -> None:
        self.stages, self.shown, self._stdout = list(stages), list(shown), stdout
        self._stdin = stdin
        self._outcomes, self._timed_out, self._mask = list(outcomes), timed_out, mask
        self.killed = False
        self._waited = False

    @property
    def stdout(self) -> IO[bytes]:
        return self._stdout

    @property
    def stdin(self) -> IO[bytes] | None:
        return self._stdin

    @property
    def timed_out(self) -> bool:
        return self._timed_out

    @property
    def written(self) -> bytes:
        """What the caller wrote to ``stdin``."""
        if isinstance(self._stdin, _Sink):
            return self._stdin.written if self._stdin.closed else self._stdin.getvalue()
        return b""

    def kill(self) -> None:
        self.killed = True

    def wait(self) -> list[StageResult]:
        if self._waited:
            raise RuntimeError("pipeline already waited for")
        self._waited = True
        results = [StageResult(tuple(shown), rc, code_name(stage, rc), self._mask(err))
                   for stage, shown, (rc, err) in zip(self.stages, self.shown, self._outcomes,
                                                      strict=True)]
        self._stdout.close()
        if self._stdin is not None:
            self._stdin.close()
        return check_results(results, self.shown, self._timed_out)



def _enc(data: str | bytes) -> bytes:
    return data.encode() if isinstance(data, str) else data


class MemoryBackend:
    """A :class:`~sanoffload.store.backend.Backend` in a dict, for the layers above the seam.

    It keeps the same contract as the directory and S3 backends
    (``tests/unit/test_backend_contract.py`` runs it with them) and models the
    S3 roles the repository must cope with:

    - ``versioned``: every write is kept; a delete without a version adds a
      delete marker (a bucket with versioning, as Object Lock needs);
    - ``deny_delete``: every delete is refused with AuthError (the proxy's
      credentials under the bucket policy);
    - ``retain_until``: objects written from now on are retained until then
      (Object Lock): deleting such a version before ``clock()`` passes it is
      refused with AuthError; adding a delete marker is not, as on S3.

    Like S3 (and unlike a directory) it cannot tell a live upload from a dead
    one: every uncommitted writer is an upload, and ``stale_uploads`` goes by age.
    """

    def __init__(self, *, versioned: bool = False, deny_delete: bool = False,
                 retain_until: float | None = None, clock: Callable[[], float] = time.time,
                 name: str = "test") -> None:
        self.location = f"memory:{name}"
        self.versioned = versioned
        self.deny_delete = deny_delete
        self.retain_until = retain_until
        self.clock = clock
        #: key -> its versions, oldest first (unversioned: one), with their bytes
        self.objects: dict[str, list[tuple[ObjectInfo, bytes]]] = {}
        #: upload id -> the writer holding it, until it commits or is aborted
        self.uploads: dict[str, MemoryWriter] = {}
        self._serial = 0

    def _next(self, kind: str) -> str:
        self._serial += 1
        return f"{kind}{self._serial:06d}"

    def _current(self, key: str) -> tuple[ObjectInfo, bytes] | None:
        versions = self.objects.get(check_key(key))
        if not versions or versions[-1][0].deleted:
            return None
        return versions[-1]

    def _find(self, key: str, version: str | None) -> tuple[ObjectInfo, bytes]:
        if version is None:
            found = self._current(key)
        else:
            found = next((v for v in self.objects.get(check_key(key), [])
                          if v[0].version == version and not v[0].deleted), None)
        if found is None:
            raise _backend.NotFound(key, version)
        return found

    def get(self, key: str, *, max_bytes: int, version: str | None = None) -> bytes:
        info, data = self._find(key, version)
        if info.size > max_bytes:
            raise IntegrityError(f"{self.location}/{key}: {info.size} bytes, more than the "
                                 f"{max_bytes} accepted")
        return data

    def open_read(self, key: str, *, version: str | None = None) -> io.BytesIO:
        return io.BytesIO(self._find(key, version)[1])

    def put(self, key: str, data: bytes, *, exclusive: bool = True) -> ObjectInfo:
        return self._store(check_key(key), bytes(data), exclusive=exclusive)

    def _store(self, key: str, data: bytes, *, exclusive: bool) -> ObjectInfo:
        if exclusive and self._current(key) is not None:
            raise ResourceError(f"{self.location}/{key} already exists: not replacing it")
        info = ObjectInfo(key=key, size=len(data), mtime=self.clock(),
                          version=self._next("v") if self.versioned else None,
                          retain_until=self.retain_until)
        if self.versioned:
            self.objects.setdefault(key, []).append((info, data))
        else:
            self.objects[key] = [(info, data)]
        return info

    def writer(self, key: str, *, size_hint: int | None = None) -> MemoryWriter:
        upload = Upload(key=check_key(key), upload_id=self._next("u"), started=self.clock())
        self.uploads[upload.upload_id] = w = MemoryWriter(self, upload)
        return w

    def stat(self, key: str) -> ObjectInfo | None:
        found = self._current(key)
        return None if found is None else found[0]

    def extend_retention(self, key: str, *, version: str | None, until: float) -> float | None:
        """As S3 with Object Lock: only where the store retains objects (``retain_until``
        given), never shortened; AuthError with ``deny_delete`` (the proxy's policy denies
        PutObjectRetention too)."""
        info, data = self._find(key, version)
        if self.retain_until is None:
            return None
        if self.deny_delete:
            raise AuthError(f"{self.location}/{key}: changing a retention is not allowed to "
                            "these credentials")
        if info.retain_until is not None and info.retain_until >= until:
            return info.retain_until
        versions = self.objects[key]
        at = next(i for i, (v, _) in enumerate(versions) if v is info)
        versions[at] = (replace(info, retain_until=until), data)
        return until

    def list(self, prefix: str = "", *, shallow: bool = False) -> Iterator[ObjectInfo]:
        check_prefix(prefix)
        for key in sorted(k for k in self.objects if k.startswith(prefix)
                          and not (shallow and "/" in k[len(prefix):])):
            found = self._current(key)
            if found is not None:
                yield found[0]

    def versions(self, key: str, *, retention: bool = True) -> builtins.list[ObjectInfo]:
        return [info for info, _ in self.objects.get(check_key(key), [])]

    def delete(self, key: str, *, version: str | None = None) -> None:
        versions = self.objects.get(check_key(key), [])
        if self.deny_delete:
            raise AuthError(f"{self.location}/{key}: deleting is not allowed to these credentials")
        if self.versioned and version is None:
            if versions and not versions[-1][0].deleted:
                marker = ObjectInfo(key=key, size=0, mtime=self.clock(), version=self._next("v"),
                                    deleted=True)
                versions.append((marker, b""))
            return
        for i, (info, _) in enumerate(versions):
            if info.version == version:
                if info.retain_until is not None and info.retain_until > self.clock():
                    raise AuthError(f"{self.location}/{key}: retained until "
                                    f"{info.retain_until:.0f}: not removing it")
                del versions[i]
                break
        if not versions:
            self.objects.pop(key, None)

    def stale_uploads(self, older_than: float) -> Iterator[Upload]:
        for w in builtins.list(self.uploads.values()):
            if w.upload.started < older_than:
                yield w.upload

    def abort_upload(self, upload: Upload) -> None:
        self.uploads.pop(upload.upload_id, None)


class MemoryWriter:
    """An upload of :class:`MemoryBackend`: nothing is visible until :meth:`commit`."""

    def __init__(self, backend: MemoryBackend, upload: Upload) -> None:
        self.backend = backend
        self.upload = upload
        self.key = upload.key
        self._data: bytearray | None = bytearray()

    def write(self, data: bytes | bytearray | memoryview, /) -> None:
        if self._data is None:
            raise ValueError("object writer is closed")
        self._data += memoryview(data).cast("B")

    def commit(self) -> ObjectInfo:
        """Publish; ResourceError if the key exists, ObjectStoreError if the upload was
        aborted meanwhile (S3's NoSuchUpload). A failed commit leaves the upload to abort."""
        if self._data is None:
            raise ValueError("object writer is closed")
        if self.backend.uploads.get(self.upload.upload_id) is not self:
            raise ObjectStoreError(f"{self.backend.location}/{self.key}: the upload was aborted")
        info = self.backend._store(self.key, bytes(self._data), exclusive=True)
        self.backend.uploads.pop(self.upload.upload_id, None)
        self._data = None
        return info

    def abort(self) -> None:
        self.backend.uploads.pop(self.upload.upload_id, None)
        self._data = None

    def __enter__(self) -> MemoryWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()
