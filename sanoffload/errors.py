"""One error hierarchy for sanoffload.

Every error the tool raises on purpose is a :class:`SanoffloadError`; each
class carries the process exit code the CLI returns for it.  The README's
exit-code table is generated from :data:`EXIT_CODES` (keep them in step).
"""

from __future__ import annotations

from collections.abc import Sequence


class SanoffloadError(Exception):
    """Base of every error sanoffload raises on purpose."""

    exit_code: int = 1
    #: one word for --json output and logs
    kind: str = "error"

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message} (hint: {self.hint})"
        return self.message

    def to_dict(self) -> dict[str, object]:
        return {"error": self.kind, "message": self.message, "hint": self.hint,
                "exit_code": self.exit_code}


class UsageError(SanoffloadError):
    """Bad arguments or configuration."""

    exit_code = 2
    kind = "usage"


class ConfigError(UsageError):
    """A configuration file is missing, unreadable or invalid."""

    kind = "config"


class RefusedError(SanoffloadError):
    """The request names something sanoffload must not touch (bad path, unsupported volume)."""

    exit_code = 3
    kind = "refused"


class MissingDependencyError(SanoffloadError):
    """A tool or kernel feature this role needs is not present."""

    exit_code = 4
    kind = "missing-dependency"


class CommandError(SanoffloadError):
    """An external command failed; argv is already masked."""

    exit_code = 5
    kind = "command-failed"

    def __init__(self, message: str, *, argv: Sequence[str] = (), returncode: int | None = None,
                 stdout: str = "", stderr: str = "", hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.argv = list(argv)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr


class LioError(CommandError):
    """LIO (the kernel's iSCSI target, through rtslib-fb and configfs) refused or lost an object.

    Not a command, but the same meaning to an operator: the tool under us
    failed. It lives here so it keeps its class and exit code across the
    control channel.
    """


class CommandNotFoundError(CommandError, MissingDependencyError):
    """The executable is not installed (or not on PATH)."""

    exit_code = 4
    kind = "missing-dependency"


class DeadlineError(SanoffloadError):
    """A deadline passed (a command, a device that did not appear, a freeze window)."""

    exit_code = 6
    kind = "timeout"


class CommandTimeoutError(CommandError, DeadlineError):
    """An external command ran past its timeout and was killed."""

    exit_code = 6
    kind = "timeout"


class ResourceError(SanoffloadError):
    """Not enough of something (VG space, thin pool room, session slots) or a conflict."""

    exit_code = 7
    kind = "resource"


class DuplicateInvalidError(SanoffloadError):
    """The duplicate can no longer be trusted (e.g. a classic snapshot overflowed)."""

    exit_code = 8
    kind = "duplicate-invalid"


class FreezeError(SanoffloadError):
    """Quiescing failed or the freeze deadline was exceeded; nothing is left frozen."""

    exit_code = 9
    kind = "freeze"


class AuthError(SanoffloadError):
    """A client, initiator or CHAP credential is not allowed."""

    exit_code = 10
    kind = "auth"


class ProtocolError(SanoffloadError):
    """A control-channel message was malformed, too large, or of an unknown version/op."""

    exit_code = 11
    kind = "protocol"


class IntegrityError(SanoffloadError):
    """A backup failed verification (checksum mismatch, unreadable archive)."""

    exit_code = 12
    kind = "integrity"


class CleanupError(SanoffloadError):
    """Teardown went on past errors; this reports all of them."""

    exit_code = 13
    kind = "cleanup"

    def __init__(self, errors: Sequence[BaseException], *, context: str = "cleanup") -> None:
        self.errors = list(errors)
        lines = "; ".join(f"{type(e).__name__}: {e}" for e in self.errors)
        super().__init__(f"{context}: {len(self.errors)} step(s) failed: {lines}")


class JournalError(CleanupError):
    """A record of the agent's journal cannot be read: nothing was removed.

    Cleanup stops rather than guess: the objects the record names would look
    like orphans and be removed while a backup may still use them. The file is
    named so the operator can inspect, repair or remove it.
    """

    kind = "journal"

    def __init__(self, message: str, *, paths: Sequence[str] = (),
                 hint: str | None = None) -> None:
        SanoffloadError.__init__(self, message, hint=hint)
        self.errors = []
        self.paths = list(paths)


class CompletedWithWarnings(SanoffloadError):
    """The work is done and stored, but something needs a look (a post-thaw hook failed).

    Not a failure: the backup exists and is listed; its manifest holds the
    warnings. Raised by the CLI after success so the exit code tells a scheduler.
    """

    exit_code = 14
    kind = "warning"

    def __init__(self, message: str, warnings: Sequence[str] = (), *,
                 hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.warnings = list(warnings)


class RepositoryKeyError(SanoffloadError):
    """The repository's key is missing, or the key or passphrase given is not its key."""

    exit_code = 15
    kind = "key"


class ObjectStoreError(SanoffloadError):
    """The S3 object store failed a request, after its retries, or answered what it must not."""

    exit_code = 16
    kind = "object-store"


class Interrupted(SanoffloadError):
    """SIGINT, SIGTERM or SIGHUP arrived; cleanup has run."""

    exit_code = 130
    kind = "interrupted"

    def __init__(self, signum: int) -> None:
        import signal

        self.signum = signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")


#: exit code -> (kind, meaning); the README table mirrors this.
EXIT_CODES: dict[int, tuple[str, str]] = {
    0: ("ok", "success"),
    1: ("error", "unexpected error (a bug: please report it with --debug output)"),
    2: ("usage", "bad arguments or configuration"),
    3: ("refused", "the path or volume is not allowed or not supported; nothing was changed"),
    4: ("missing-dependency", "a tool or kernel feature this role needs is missing"),
    5: ("command-failed", "an external command failed"),
    6: ("timeout", "a command or deadline timed out"),
    7: ("resource", "not enough space/slots, or a conflicting object exists"),
    8: ("duplicate-invalid", "the snapshot/duplicate became invalid (overflow)"),
    9: ("freeze", "quiesce failed or the freeze deadline was exceeded (filesystem was thawed)"),
    10: ("auth", "client, initiator or CHAP credentials not allowed"),
    11: ("protocol", "malformed or unsupported control-channel message"),
    12: ("integrity", "backup verification failed"),
    13: ("cleanup", "teardown could not remove everything; run 'sanoffload agent cleanup'"),
    14: ("warning", ("done, with warnings: a backup stored while a post-thaw hook failed (see "
                     "the manifest warnings); a prune the store did not let finish (a refused "
                     "delete)")),
    15: ("key", "the repository key is missing, or the key or passphrase is wrong"),
    16: ("object-store", "the S3 object store failed a request after retries (or is unreachable)"),
    130: ("interrupted", "stopped by SIGINT/SIGTERM/SIGHUP after cleaning up"),
}
