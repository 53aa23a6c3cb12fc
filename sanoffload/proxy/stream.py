"""Stream one prepared duplicate into the store: attach, tar | zstd, check, verify, detach.

Given the agent's ``prepare`` answer (a checked
:class:`~sanoffload.channel.messages.PrepareAnswer`), the proxy (claims 1-3, 10-12):

1. sets a path to the duplicate from its identifier and mounts it read-only
   (:func:`sanoffload.proxy.attach.attach`, journaled: :mod:`sanoffload.proxy.journal`);
2. streams ``tar --create … | zstd -T0 -q -c`` of the backup object into a
   store writer, which hashes the bytes on the way (no second pass);
3. asks whether the duplicate stayed valid (a classic snapshot can overflow
   while it is read) before the backup is published — an invalid duplicate
   is never recorded as a good backup;
4. optionally compares the stored archive with the still-attached duplicate
   (``tar --diff``) and records the result;
5. always unmounts and logs out (the UndoStack), whatever happened.

A consistency group's archive holds every member under its archive name
(its path without the leading /), read from the staging tree
:func:`~sanoffload.proxy.attach.attach_group` bound them into::

    tar --create --file=- --directory=STAGING <tar.CREATE_OPTIONS> -- srv/san/db srv/san/log

(no ``--one-file-system``: each name is a bind mount, which tar must enter).

An incremental backup (issue 13) adds ``--listed-incremental=STATE
--no-check-device`` before the ``--`` (STATE: the previous level's state file, in
a private temporary directory; absent for a level 0); once tar has ended, the
state file's dump time is set back to the freeze time minus a margin
(:func:`~sanoffload.tools.tar.rewrite_snapshot_file`) and it goes to the store
after the archive, before the commit.

Telling the agent to release is the caller's job (it owns that channel).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from ..channel.messages import PrepareAnswer
from ..errors import DuplicateInvalidError, IntegrityError, Interrupted
from ..kinds import ObjectKind
from ..pipeline import Stage
from ..runner import Runner
from ..tools import tar, zstd
from ..undo import UndoStack
from .attach import Attached, attach
from .journal import ProxyJournal

log = logging.getLogger(__name__)

#: a read of the duplicate may take long, but not for ever
STREAM_TIMEOUT_S = 24 * 3600


class Writer(Protocol):
    """Where the archive goes (a local repository's BackupWriter, or a remote one)."""

    bytes: int

    def write_from(self, stream: Any) -> int: ...

    def commit(self, fields: Mapping[str, Any] | None = None) -> Any: ...

    def abort(self) -> None: ...


@runtime_checkable
class SnapshotWriter(Writer, Protocol):
    """A writer that also takes an incremental level's state file (the store's writers)."""

    def send_snapshot(self, path: str) -> tuple[str, int]: ...


@dataclass(frozen=True)
class Incremental:
    """One level of a ``--listed-incremental`` chain, as the proxy runs it."""

    #: the state file tar reads and updates (the previous level's copy; absent: level 0)
    state_file: str
    #: what the state file's dump time becomes after tar (epoch seconds): the freeze time
    #: minus the clock-skew margin
    dump_time: float


@dataclass(frozen=True)
class BackupSummary:
    backup: Any
    bytes: int
    seconds: float
    verified: bool | None

    @property
    def throughput_mib_s(self) -> float:
        return self.bytes / max(self.seconds, 1e-6) / (1024 * 1024)


def source_of(att: Attached, kind: ObjectKind | None) -> tuple[str, str]:
    """``(directory, member)`` for tar: the object itself, or its parent and its name."""
    if kind is ObjectKind.FILE:
        return os.path.dirname(att.object_path), os.path.basename(att.object_path)
    return att.object_path, "."


def group_create_argv(staging: str, names: tuple[str, ...] | list[str]) -> list[str]:
    """``tar --create`` of a group's members, by their archive names inside ``staging``.

    The names are relative and come after ``--`` (checked by the answer's
    reader: absolute, normalised, no control character, none inside another).
    """
    if not names or any(not n or n.startswith("/") or ".." in n.split("/") for n in names):
        raise ValueError(f"want the members' relative archive names, not {names!r}")
    return ["tar", "--create", "--file=-", f"--directory={staging}", *tar.CREATE_OPTIONS,
            "--", *names]


def tar_source(att: Attached, answer: PrepareAnswer) -> tuple[str, list[str]]:
    """``(directory tar reads in and compares against, tar --create argv)``."""
    if answer.members:
        if att.staging is None or list(att.names) != [m.archive_name for m in answer.members]:
            raise ValueError("a group's attachment without its staging tree")
        return att.staging, group_create_argv(att.staging, att.names)
    src, member = source_of(att, answer.object_kind)
    return src, tar.create_argv(src, member)


def _invalid(answer: PrepareAnswer) -> DuplicateInvalidError:
    return DuplicateInvalidError(
        f"the duplicate of session {answer.session_id} became invalid "
        "(snapshot overflow?): the backup is discarded",
        hint="give classic snapshots more room ([snapshot] percent) or use thin "
             "or mirror duplicates")


def _blame_invalid(exc: BaseException, answer: PrepareAnswer,
                   still_valid: Callable[[], bool]) -> None:
    """An I/O error reading an overflowed snapshot is really "the duplicate is invalid"."""
    if isinstance(exc, (DuplicateInvalidError, Interrupted)) or not isinstance(exc, Exception):
        return
    try:
        valid = still_valid()
    except Exception:  # the agent is unreachable: the original error says enough
        return
    if not valid:
        raise _invalid(answer) from exc


def _finish_state(writer: Writer, incremental: Incremental) -> dict[str, Any]:
    """Set the state file's dump time to the freeze (tar wrote its own start) and send it;
    the manifest fields that name it."""
    try:
        old = tar.rewrite_snapshot_file(incremental.state_file, incremental.dump_time)
    except (OSError, ValueError) as exc:
        raise IntegrityError(f"the state file tar wrote: {exc}") from None
    log.info("state file: dump time %d.%09d (tar's start) set to %.3f (the freeze, less the "
             "margin)", old.seconds, old.nanoseconds, incremental.dump_time)
    if not isinstance(writer, SnapshotWriter):
        raise TypeError(f"{type(writer).__name__} cannot store an incremental level's state file")
    sha256, size = writer.send_snapshot(incremental.state_file)
    return {"snapshot_sha256": sha256, "snapshot_bytes": size}


def journaled_attach(runner: Runner, answer: PrepareAnswer, undo: UndoStack) -> Attached:
    """:func:`~sanoffload.proxy.attach.attach` with the proxy's journal, so what a killed
    proxy left is found by ``sanoffload proxy cleanup``."""
    return attach(runner, answer, undo, journal=ProxyJournal())


def stream_duplicate(runner: Runner, answer: PrepareAnswer, writer: Writer, *,
                     still_valid: Callable[[], bool], fields: Mapping[str, Any] | None = None,
                     compare: Callable[[Any, str], bool] | None = None,
                     attach_fn: Callable[..., Attached] = journaled_attach,
                     on_attach: Callable[[Attached], None] | None = None,
                     level: int | None = None,
                     incremental: Incremental | None = None) -> BackupSummary:
    """Back up the session ``answer`` describes into ``writer``; see the module doc.

    ``still_valid`` asks the agent about the duplicate (status is "healthy");
    ``compare(backup, source_dir)`` checks the stored archive against the
    mounted duplicate (None: not verified); ``on_attach`` hears where the
    duplicate is mounted (a progress display sizes itself from it); ``level``
    is zstd's (None: its default, 3). ``incremental``: one level of a chain (the
    writer must have ``send_snapshot``; ``fields`` hold the level's manifest fields).
    """
    with UndoStack() as undo:
        try:
            att = attach_fn(runner, answer, undo)
        except BaseException as exc:
            writer.abort()  # the store must not wait for an archive that will not come
            _blame_invalid(exc, answer, still_valid)
            raise
        if on_attach is not None:
            on_attach(att)
        try:
            src, create = tar_source(att, answer)
            if incremental is not None:
                create = tar.with_incremental(create, incremental.state_file)
        except BaseException:
            writer.abort()
            raise
        started = time.monotonic()
        stages = [Stage(create), Stage(zstd.compress_argv(level=level))]
        try:
            with runner.pipeline(stages, timeout=STREAM_TIMEOUT_S) as pipe:
                writer.write_from(pipe.stdout)
                pipe.wait()
            if not still_valid():
                raise _invalid(answer)
            final = dict(fields or {})
            if incremental is not None:
                final.update(_finish_state(writer, incremental))
            backup = writer.commit(final)
        except BaseException as exc:
            writer.abort()
            _blame_invalid(exc, answer, still_valid)
            raise
        seconds = time.monotonic() - started
        verified: bool | None = None
        if compare is not None:
            verified = compare(backup, src)
            if not verified:
                raise IntegrityError(f"the stored archive {backup} differs from the duplicate")
        log.info("backed up %s: %d bytes in %.1f s", answer.session_id, writer.bytes, seconds)
        return BackupSummary(backup, writer.bytes, seconds, verified)
