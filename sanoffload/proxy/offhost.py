"""``sanoffload backup HOST:PATH --store STORE``: one off-host backup, end to end.

On the proxy::

    ssh HOST sanoffload agent serve --stdio      # prepare: freeze, duplicate, export
    ssh STORE sanoffload store serve --stdio     # put: the archive goes here
    attach (iSCSI login, find the disk by identifier, mount read-only)
    tar | zstd  ->  store (hashed on the way; the store decodes it as it arrives)
    agent status: still healthy? (else the backup is discarded)
    --verify full only: tar --diff of the stored archive against the mount
    unmount, logout; release; hang up

The default check (``--verify stream``, :class:`~sanoffload.kinds.VerifyMode`)
costs no second read: zstd's frame checksum covers every byte tar wrote, the
proxy's sha256 every byte it sent, and the store decodes and lists what it
receives, checksums included, and matches the sha256 before it publishes. So a
stored backup is, byte for byte, the stream tar read from the duplicate.

Every step registers its undo the moment its resource exists; on success,
failure, SIGTERM or Ctrl-C the mount, the iSCSI session and the agent's
session go, in that order. Should the proxy die outright, its ssh connection
drops and the agent releases the session after its grace period, and the
proxy's journal names what ``sanoffload proxy cleanup`` must undo here.

The agent's ``warnings`` (a post-thaw or holding hook failed: a database may
still be in backup mode) are logged as they arrive, stored in the manifest and
returned in the summary; the caller decides the exit code (14) once everything
is released. The holding hooks' outputs (``held``: PostgreSQL's
``backup_label``...) go into the manifest as the agent sent them (checked by
:meth:`~sanoffload.channel.messages.PrepareAnswer.from_wire`); the summary
names the hooks whose output was stored.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..channel.client import DEFAULT_CONNECTION_S, Connector, ssh_connector
from ..channel.messages import PrepareAnswer
from ..errors import ConfigError, IntegrityError, ProtocolError, UsageError
from ..kinds import DuplicateKind, VerifyMode
from ..runner import Runner
from ..text import printable
from ..undo import UndoStack
from . import jobs
from .attach import Attached
from .compare import compare_stored_archive
from .peers import AgentClient, LocalStoreClient, StoreClient
from .stream import journaled_attach, stream_duplicate

if TYPE_CHECKING:
    from ..store.service import StoreService

log = logging.getLogger(__name__)

INITIATOR_FILE = "/etc/iscsi/initiatorname.iscsi"


def local_initiator(path: str = INITIATOR_FILE) -> str:
    """This host's iSCSI initiator name (``InitiatorName=`` in open-iscsi's file)."""
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                key, _, value = line.strip().partition("=")
                if key == "InitiatorName" and value:
                    return value
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file", hint="install open-iscsi") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    raise ConfigError(f"{path}: no InitiatorName= line")


def manifest_fields(answer: PrepareAnswer) -> dict[str, Any]:
    """What the manifest records of the agent's answer (wire strings, as the store checks them).

    A zero ``frozen_at`` (an agent older than the field) is left out: the
    store then names the backup by its own clock. ``warnings`` and ``held`` only
    when there are some, so a manifest without them stays as it was.
    """
    fields: dict[str, Any] = {"duplicate_kind": answer.duplicate_kind.value,
                              "freeze_window_ms": answer.freeze_window_ms,
                              "frozen_by": answer.frozen_by.value,
                              "session_id": answer.session_id}
    if answer.frozen_at:
        fields["frozen_at"] = answer.frozen_at
    if answer.warnings:
        fields["warnings"] = list(answer.warnings)
    if answer.held:
        # the holding hooks' outputs (backup_label...): a restore needs them beside the archive
        fields["held"] = [h.to_wire() for h in answer.held]
    if answer.members:
        # a group: what each archive top directory was read from (no LUN, no secret)
        fields["members"] = [{"path": m.path, "identifier": m.identifier,
                              "duplicate_kind": m.duplicate_kind.value, "fstype": m.fstype,
                              "object_kind": m.object_kind.value} for m in answer.members]
    return fields


def check_group(source: str, also: Sequence[str]) -> tuple[str, ...]:
    """A consistency group's other paths (``--with``), checked: :func:`jobs.group_paths`."""
    return jobs.group_paths(source, also, "--with")


def _check_members(answer: PrepareAnswer, paths: list[str], where: str) -> None:
    """The agent must answer the group that was asked for, in its order: the archive's
    top directories are named after these paths."""
    got = [m.path for m in answer.members]
    if len(paths) == 1 and not got:
        return
    if got != paths:
        raise ProtocolError(f"{where}: asked for {', '.join(paths)}, the agent answered "
                            f"{printable(', '.join(got)) or 'one path'}")


@dataclass(frozen=True)
class Location:
    """``HOST:/PATH`` (host None: a local path)."""

    host: str | None
    path: str

    def __str__(self) -> str:
        return f"{self.host}:{self.path}" if self.host else self.path


def _client_name() -> str:
    return socket.gethostname().split(".")[0]


def agent_connector(runner: Runner, host: str, ssh_options: tuple[str, ...] = (), *,
                    timeout: float = DEFAULT_CONNECTION_S) -> Connector:
    # a forced command replaces this; for a plain key the client is this host's name
    return ssh_connector(runner, host, ["sanoffload", "agent", "serve", "--stdio",
                                        "--client", _client_name()],
                         options=ssh_options, timeout=timeout)


def _local_service(runner: Runner, path: str) -> StoreService:
    from ..store.repo import Repository
    from ..store.service import StoreService

    return StoreService(Repository(path, runner), "local")


def local_store(runner: Runner, path: str) -> LocalStoreClient:
    """A repository on this host, served in this process (a put's bytes go straight in)."""
    from ..channel.client import in_process_connector
    from ..channel.server import serve

    service = _local_service(runner, path)
    return LocalStoreClient(in_process_connector(lambda ch: serve(service, ch), peer=path),
                            service, name=path)


def store_connector(runner: Runner, loc: Location, ssh_options: tuple[str, ...] = (), *,
                    timeout: float = DEFAULT_CONNECTION_S) -> Connector:
    """To a store over ssh, or to a local repository served in this process."""
    if loc.host is None:
        from ..channel.client import in_process_connector
        from ..channel.server import serve

        service = _local_service(runner, loc.path)
        return in_process_connector(lambda ch: serve(service, ch), peer=loc.path)
    return ssh_connector(runner, loc.host, ["sanoffload", "store", "serve", "--stdio",
                                            "--repo", loc.path, "--client", _client_name()],
                         options=ssh_options, timeout=timeout)


class Progress:
    """A one-line progress report on a terminal: bytes sent, rate, against the volume's use."""

    def __init__(self, out: Any = None, every_s: float = 1.0) -> None:
        self.out = out or sys.stderr
        self.every_s = every_s
        self.started = time.monotonic()
        self.last = 0.0
        self.estimate: int | None = None

    def attached(self, att: Any) -> None:
        """Size the display from the duplicate's used space (the whole filesystem's;
        a group's: all of its members')."""
        total = 0
        for path in getattr(att, "mountpoints", ()) or (att.mountpoint,):
            try:
                st = os.statvfs(path)
            except OSError:
                return
            total += (st.f_blocks - st.f_bfree) * st.f_frsize
        self.estimate = total

    def __call__(self, sent: int) -> None:
        now = time.monotonic()
        if now - self.last < self.every_s:
            return
        self.last = now
        rate = sent / max(now - self.started, 1e-3) / (1 << 20)
        of = f" (volume holds ~{self.estimate / (1 << 30):.1f} GiB)" if self.estimate else ""
        self.out.write(f"\r  sent {sent / (1 << 20):9.1f} MiB compressed, {rate:6.1f} MiB/s{of}")
        self.out.flush()

    def done(self) -> None:
        self.out.write("\n")
        self.out.flush()


def run_offhost_backup(runner: Runner, source: Location, store: Location, *,
                       verify: VerifyMode | bool = VerifyMode.STREAM,
                       kind: DuplicateKind | None = None, level: int | None = None,
                       ssh_options: tuple[str, ...] = (),
                       timeout: float = DEFAULT_CONNECTION_S, initiator: str | None = None,
                       progress: Progress | None = None,
                       agent_conn: Connector | None = None,
                       store_conn: Connector | None = None,
                       attach_fn: Callable[..., Attached] = journaled_attach,
                       also: Sequence[str] = ()) -> dict[str, Any]:
    """Back up ``source`` (on its first server) into ``store``; returns the summary.

    ``also``: more paths on the same first server, frozen in the same window
    (a consistency group, one archive holding each under its path); the
    summary's ``members`` lists every path then.
    ``summary["warnings"]`` holds the agent's warnings (escaped); non-empty
    means the backup is stored but needs a look (the CLI exits 14).
    ``attach_fn`` makes the duplicate readable here (tests inject their own).
    ``verify``: a :class:`~sanoffload.kinds.VerifyMode` (True/False: full/none).
    """
    mode = VerifyMode.of(verify, where="verify")
    if source.host is None:
        raise UsageError(f"{source}: name the first server (HOST:/PATH): a backup is "
                         "always taken off-host")
    group = [source.path, *check_group(source.path, also)] if also else [source.path]
    initiator = initiator or local_initiator()
    agent_conn = agent_conn or agent_connector(runner, source.host, ssh_options, timeout=timeout)
    started = time.monotonic()
    with UndoStack() as undo:
        agent = AgentClient(agent_conn, name=source.host)
        undo.push(f"connection to {source.host}", agent.close)
        depot = (StoreClient(store_conn, name=store.host or "store") if store_conn is not None
                 else local_store(runner, store.path) if store.host is None
                 else StoreClient(store_connector(runner, store, ssh_options, timeout=timeout),
                                  name=store.host))
        undo.push(f"connection to {store}", depot.close)
        answer = agent.prepare(source.path, initiator, kind, also=tuple(group[1:]))
        sid = answer.session_id
        undo.push(f"release of {sid}", agent.release, sid)
        _check_members(answer, group, f"{source.host}: the agent's answer")
        log.info("%s: session %s, %s frozen %.1f ms by %s", source, sid,
                 answer.duplicate_kind, answer.freeze_window_ms, answer.frozen_by)
        warnings = list(answer.warnings)  # escaped and bounded by from_wire
        for w in warnings:
            log.warning("%s: %s", source.host, w)
        writer = depot.writer(agent.host, source.path, manifest_fields(answer),
                              progress=progress)

        def still_valid() -> bool:
            status = agent.status(sid)
            if status != "healthy":
                log.error("session %s is %s", sid, status)
            return status == "healthy"

        verdict: dict[str, Any] = {}

        def compare(stored: Mapping[str, Any], src: str) -> bool:
            same, detail = compare_stored_archive(runner, depot, str(stored["id"]), src,
                                                  timeout=timeout)
            verdict["backup"] = depot.verify(str(stored["id"]),
                                             {"status": "ok" if same else "failed",
                                              "detail": detail})
            verdict["detail"] = detail
            return same

        extra: dict[str, Any] = {}
        if progress is not None:
            extra["on_attach"] = progress.attached
        try:
            summary = stream_duplicate(runner, answer, writer, still_valid=still_valid,
                                       compare=compare if mode is VerifyMode.FULL else None,
                                       attach_fn=attach_fn, level=level, **extra)
        except IntegrityError:
            log.error("the stored archive differs from the duplicate: %s",
                      verdict.get("detail", ""))
            raise
        finally:
            if progress is not None:
                progress.done()
        stored = verdict.get("backup") or summary.backup
    seconds = time.monotonic() - started
    summary_extra: dict[str, Any] = {}
    if answer.members:
        summary_extra["members"] = [m.path for m in answer.members]
    return {**summary_extra,
        "backup_id": stored["id"], "source": str(source), "store": str(store),
        "session_id": sid, "duplicate_kind": answer.duplicate_kind.value,
        "frozen_by": answer.frozen_by.value, "freeze_window_ms": answer.freeze_window_ms,
        "archive_bytes": summary.bytes, "sha256": stored.get("sha256"),
        "member_count": stored.get("member_count"),
        "stream_seconds": round(summary.seconds, 3), "total_seconds": round(seconds, 3),
        "throughput_mib_s": round(summary.throughput_mib_s, 2),
        # stream: the store refused anything else, so a stored backup is a checked one
        "verified": True if mode is VerifyMode.STREAM else summary.verified,
        "verify": mode.value,
        "verification": stored.get("verification"), "compared": stored.get("compared"),
        "warnings": warnings,
        "held": [h.hook for h in answer.held],
    }


def parse_location(text: str, what: str = "location") -> Location:
    """``fs1:/srv/data``, ``root@fs1:/srv/data`` or a local ``/srv/backups``."""
    host, path = jobs.parse_location(text, what)
    return Location(host, path)
