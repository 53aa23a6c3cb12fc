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

An image backup (``--image``, issue 13) reads the duplicate's blocks instead::

    ssh HOST … prepare {"image": true}           # the answer may carry a delta since the base
    store: the base backup's chunk map (ImageSink.previous_map), when there is a delta
    attach (iSCSI login, find the disk; no mount)
    read the changed chunks (or all), O_DIRECT; the store gets the ones it lacks
    --verify full: read every chunk again and compare it with the map
    agent status: still healthy?  commit the map and the manifest
    logout; release {"committed": BACKUP_ID}     # the agent keeps the snapshot as the base

As for an archive, the default check (``stream``) costs no second read: a chunk's id
is the sha256 of the bytes read from the duplicate, and the store decodes and
re-hashes every chunk against its id before it keeps it, and refuses a commit whose
map names a chunk it lacks. A second read would double what an incremental reads.

An incremental tar backup (``--incremental``, issue 13) asks the store first::

    store: state HOST:PATH -> the newest incremental backup whose chain is whole and
           its state file (sha256 checked), into a private temporary directory
    level: 0 if there is none, if its verification failed or the chain already has
           full_every levels above its level 0; else the next one
    tar --listed-incremental=STATE --no-check-device …   (see sanoffload.proxy.stream)
    the state file's dump time set to the freeze time less a margin; sent, then commit

On any failure the sink is aborted and the release carries no ``committed``: the
agent drops the new snapshot and keeps the old base (see :mod:`sanoffload.proxy.image`).

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
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..channel.client import DEFAULT_CONNECTION_S, Connector, ssh_connector
from ..channel.messages import PrepareAnswer
from ..errors import (
    ConfigError,
    DuplicateInvalidError,
    IntegrityError,
    ProtocolError,
    SanoffloadError,
    UsageError,
)
from ..kinds import DuplicateKind, VerifyMode
from ..runner import Runner
from ..store.imagemap import DEFAULT_CHUNK_SIZE
from ..store.manifest import MAX_TAR_LEVEL, VERIFY_FAILED, check_incremental
from ..store.repo import BackupId
from ..store.s3config import is_s3_url
from ..text import printable
from ..undo import UndoStack
from . import jobs
from .attach import Attached, attach_block
from .compare import compare_stored_archive
from .image import ImageResult, check_delta, compare_image, device_size, read_image
from .journal import ProxyJournal
from .peers import AgentClient, LocalStoreClient, StoreClient
from .stream import Incremental, _blame_invalid, journaled_attach, stream_duplicate

if TYPE_CHECKING:
    from ..store.imagemap import ImageSink
    from ..store.service import StoreService

#: opens an image backup's sink on the store: ``(store, host, path, fields, *, size)``
SinkFactory = Callable[..., "ImageSink"]

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
    """``HOST:/PATH`` (host None: a local path, or an ``s3://`` URL in ``path``)."""

    host: str | None
    path: str

    def __str__(self) -> str:
        return f"{self.host}:{self.path}" if self.host else self.path

    @property
    def is_s3(self) -> bool:
        """S3 object storage, opened in this process like a local repository."""
        return self.host is None and is_s3_url(self.path)


def _client_name() -> str:
    return socket.gethostname().split(".")[0]


def agent_connector(runner: Runner, host: str, ssh_options: tuple[str, ...] = (), *,
                    timeout: float = DEFAULT_CONNECTION_S) -> Connector:
    # a forced command replaces this; for a plain key the client is this host's name
    return ssh_connector(runner, host, ["sanoffload", "agent", "serve", "--stdio",
                                        "--client", _client_name()],
                         options=ssh_options, timeout=timeout)


def _local_service(runner: Runner, path: str) -> StoreService:
    from ..store.open import open_store
    from ..store.service import StoreService

    return StoreService(open_store(path, runner, what="--store"), "local")


def local_store(runner: Runner, path: str) -> LocalStoreClient:
    """A repository on this host or on S3 (``s3://…``), served in this process: a put's
    bytes go straight in (sealed here with the repository key when it is encrypted)."""
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
        #: what the count is: an archive's compressed bytes sent, or an image's bytes read
        self.what = "sent {mib:9.1f} MiB compressed"
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
        done = self.what.format(mib=sent / (1 << 20))
        self.out.write(f"\r  {done}, {rate:6.1f} MiB/s{of}")
        self.out.flush()

    def done(self) -> None:
        self.out.write("\n")
        self.out.flush()


def journaled_attach_block(runner: Runner, answer: PrepareAnswer, undo: UndoStack) -> str:
    """:func:`~sanoffload.proxy.attach.attach_block` with the proxy's journal."""
    return attach_block(runner, answer, undo, journal=ProxyJournal())


def _open_sink(depot: StoreClient, host: str, path: str, fields: Mapping[str, Any], *,
               size: int) -> ImageSink:
    return depot.image_sink(host, path, fields, size=size)


def image_fields(answer: PrepareAnswer, result: ImageResult) -> dict[str, Any]:
    """What an image backup's commit tells the store: :func:`manifest_fields` and ``image``.

    The store makes the manifest ``"kind": "image"`` itself and counts ``new_chunks`` and
    ``new_bytes`` as it stores them (a chunk another backup stored meanwhile is not this
    one's); the map's numbers are stated so that the store checks them against its own.
    """
    m = result.chunk_map
    base = None if result.full or answer.delta is None else answer.delta.base
    return {**manifest_fields(answer),
            "image": {"size": m.size, "chunk_size": m.chunk_size, "map_sha256": m.sha256(),
                      "map_bytes": len(m.to_bytes()), "chunks": len(m.referenced()),
                      "read_bytes": result.read_bytes, "base": base,
                      "fstype": answer.fstype}}


@dataclass
class _ImageRun:
    result: ImageResult
    backup: dict[str, Any]
    compared: int | None


def _image_backup(runner: Runner, answer: PrepareAnswer, open_sink: Callable[[int], ImageSink],
                  mode: VerifyMode, *, still_valid: Callable[[], bool],
                  attach_block_fn: Callable[..., str], outcome: dict[str, str],
                  progress: Progress | None) -> _ImageRun:
    """Attach, open the store's sink for the device's size, read, compare, check, commit
    (see the module doc); the sink is aborted on any failure, and ``outcome["committed"]``
    set once the store has committed."""
    delta = answer.delta
    sink: ImageSink | None = None
    if answer.path_in_fs not in ("", "."):
        log.info("%s is %s inside its filesystem: the image holds the whole volume",
                 answer.session_id, printable(answer.path_in_fs))
    try:
        with UndoStack() as undo:
            device = attach_block_fn(runner, answer, undo)
            try:
                size = device_size(device)
                if delta is not None:
                    # before the store is asked for a base map of some other volume
                    check_delta(delta, size, DEFAULT_CHUNK_SIZE)
                sink = open_sink(size)
                previous = None
                if delta is not None:
                    previous = sink.previous_map(delta.base)
                    if previous is None:
                        log.warning("the store has no map of %s (the agent's base): a full "
                                    "read", printable(delta.base))
                if progress is not None:
                    progress.what = "read {mib:9.1f} MiB"
                result = read_image(device, sink, delta=delta, previous=previous,
                                    progress=progress)
                compared: int | None = None
                if mode is VerifyMode.FULL:
                    # the whole map is what the snapshot holds: every chunk read again
                    # (the base's too) and its hash compared
                    chunk_map = result.chunk_map
                    compared = compare_image(device, chunk_map, range(chunk_map.count))
                if not still_valid():
                    raise DuplicateInvalidError(
                        f"the duplicate of session {answer.session_id} became invalid "
                        "(snapshot overflow?): the backup is discarded")
            except BaseException as exc:
                _blame_invalid(exc, answer, still_valid)
                raise
            finally:
                if progress is not None:
                    progress.done()
            backup = sink.commit(result.chunk_map, image_fields(answer, result))
            bid = backup.get("id")
            if not isinstance(bid, str) or not bid:
                raise ProtocolError(f"the store committed the image backup without an id: "
                                    f"{printable(repr(bid))[:80]}")
            outcome["committed"] = bid
        return _ImageRun(result, backup, compared)
    except BaseException as exc:
        if sink is not None and "committed" not in outcome:
            try:
                sink.abort(f"the backup failed: {type(exc).__name__}")
            except SanoffloadError as err:  # the original error says more
                log.warning("could not abort the image backup on the store: %s", err)
        raise


#: a new level 0 after this many incremental levels (a job's ``full_every``)
DEFAULT_FULL_EVERY = 7
#: the state file's dump time is the freeze time less this: the first server's and the
#: proxy's clocks may differ, and a file changed just before the freeze must not be skipped
DUMP_MARGIN_S = 60.0


def next_level(previous: Mapping[str, Any] | None, full_every: int) -> tuple[dict[str, Any], str]:
    """The manifest fields of the next level after ``previous`` (the store's ``state``
    answer: a manifest's fields, hostile until checked) and why it is that level.

    Level 0 when there is no previous level, when it failed its verification, when the
    chain has ``full_every`` levels above its level 0, or when its fields do not check.
    """
    if previous is None:
        return {"tar_level": 0}, "no previous incremental backup"
    bid = previous.get("id")
    level = previous.get("tar_level")
    try:
        check_incremental(level, previous.get("parent"), previous.get("chain"),
                          previous.get("snapshot_sha256"), previous.get("snapshot_bytes"),
                          own=bid if isinstance(bid, str) else None)
        BackupId.parse(bid if isinstance(bid, str) else "")
    except (ValueError, SanoffloadError) as exc:
        return {"tar_level": 0}, f"the previous level does not check: {printable(str(exc))[:200]}"
    assert isinstance(level, int) and isinstance(bid, str)
    verification = previous.get("verification")
    if isinstance(verification, Mapping) and verification.get("status") == VERIFY_FAILED:
        return {"tar_level": 0}, f"{bid} failed its verification"
    if level >= full_every:
        return {"tar_level": 0}, f"the chain has {level} levels above its level 0"
    chain = previous.get("chain") or bid
    return ({"tar_level": level + 1, "parent": bid, "chain": chain},
            f"level {level + 1} of {chain}")


def _prepare_incremental(depot: StoreClient, host: str, path: str, full_every: int,
                         directory: str) -> tuple[str, dict[str, Any]]:
    """Fetch the previous state file into ``directory`` and decide the level:
    ``(state file path, manifest fields)``; the file is absent for a level 0."""
    state = os.path.join(directory, "state.snar")
    fd = os.open(state, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    with open(fd, "wb") as f:
        previous = depot.state(host, path, f)
    fields, why = next_level(previous.backup, full_every)
    if previous.backup is None:
        why = f"{why}: {previous.reason}"
    if fields["tar_level"] == 0:
        os.unlink(state)  # tar makes a level 0 when its state file is absent
    log.info("%s:%s: incremental level %d (%s)", host, printable(path), fields["tar_level"],
             why)
    return state, fields


def _release(agent: AgentClient, session_id: str, outcome: Mapping[str, str]) -> None:
    # committed only once the store has the backup: the agent then keeps its snapshot as
    # the base; without it the snapshot goes and the old base stays
    agent.release(session_id, committed=outcome.get("committed"))


def run_offhost_backup(runner: Runner, source: Location, store: Location, *,
                       verify: VerifyMode | bool = VerifyMode.STREAM,
                       kind: DuplicateKind | None = None, level: int | None = None,
                       ssh_options: tuple[str, ...] = (),
                       timeout: float = DEFAULT_CONNECTION_S, initiator: str | None = None,
                       progress: Progress | None = None,
                       agent_conn: Connector | None = None,
                       store_conn: Connector | None = None,
                       attach_fn: Callable[..., Attached] = journaled_attach,
                       also: Sequence[str] = (), image: bool = False,
                       attach_block_fn: Callable[..., str] = journaled_attach_block,
                       image_sink_fn: SinkFactory = _open_sink,
                       incremental: bool = False, full_every: int = DEFAULT_FULL_EVERY,
                       dump_margin_s: float = DUMP_MARGIN_S) -> dict[str, Any]:
    """Back up ``source`` (on its first server) into ``store``; returns the summary.

    ``also``: more paths on the same first server, frozen in the same window
    (a consistency group, one archive holding each under its path); the
    summary's ``members`` lists every path then.
    ``summary["warnings"]`` holds the agent's warnings (escaped); non-empty
    means the backup is stored but needs a look (the CLI exits 14).
    ``attach_fn`` makes the duplicate readable here (tests inject their own).
    ``verify``: a :class:`~sanoffload.kinds.VerifyMode` (True/False: full/none).
    ``image``: an image backup (:func:`_image_backup`; ``attach_block_fn`` and
    ``image_sink_fn`` are injected by tests), summarised by :func:`_image_summary`.
    ``incremental``: a level of a ``tar --listed-incremental`` chain (a new level 0
    after ``full_every`` levels); the state file's dump time is set to the freeze time
    less ``dump_margin_s``.
    """
    mode = VerifyMode.of(verify, where="verify")
    if source.host is None:
        raise UsageError(f"{source}: name the first server (HOST:/PATH): a backup is "
                         "always taken off-host")
    if image and incremental:
        raise UsageError("--incremental is for tar backups: an image backup is incremental "
                         "by itself (on thin volumes)")
    if isinstance(full_every, bool) or not isinstance(full_every, int) or \
            not 1 <= full_every <= MAX_TAR_LEVEL:
        raise UsageError(f"full_every must be 1 to {MAX_TAR_LEVEL}: {full_every!r}")
    if not 0 <= dump_margin_s <= 86400:
        raise UsageError(f"the dump time margin must be 0 to 86400 s: {dump_margin_s!r}")
    if image and also:
        raise UsageError("an image backup reads one volume: --with (a consistency group) "
                         "is backed up without --image")
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
        asked_at = time.time()
        answer = agent.prepare(source.path, initiator, kind, also=tuple(group[1:]),
                               image=image)
        sid = answer.session_id
        outcome: dict[str, str] = {}
        undo.push(f"release of {sid}", _release, agent, sid, outcome)
        _check_members(answer, group, f"{source.host}: the agent's answer")
        log.info("%s: session %s, %s frozen %.1f ms by %s", source, sid,
                 answer.duplicate_kind, answer.freeze_window_ms, answer.frozen_by)
        warnings = list(answer.warnings)  # escaped and bounded by from_wire
        for w in warnings:
            log.warning("%s: %s", source.host, w)

        def still_valid() -> bool:
            status = agent.status(sid)
            if status != "healthy":
                log.error("session %s is %s", sid, status)
            return status == "healthy"

        run: _ImageRun | None = None
        if image:
            fields = manifest_fields(answer)
            run = _image_backup(runner, answer,
                                lambda size: image_sink_fn(depot, agent.host, source.path,
                                                           fields, size=size),
                                mode, still_valid=still_valid,
                                attach_block_fn=attach_block_fn, outcome=outcome,
                                progress=progress)
        else:
            fields = manifest_fields(answer)
            level_run: Incremental | None = None
            if incremental:
                scratch = tempfile.mkdtemp(prefix="sanoffload-state-")  # 0700: ours only
                undo.push("the state file's directory", shutil.rmtree, scratch, True)
                state, level_fields = _prepare_incremental(depot, agent.host, source.path,
                                                           full_every, scratch)
                fields.update(level_fields)
                # an agent without frozen_at: the moment it was asked is before the freeze
                frozen = min(answer.frozen_at or asked_at, asked_at + 3600)
                level_run = Incremental(state, max(frozen - dump_margin_s, 0.0))
            writer = depot.writer(agent.host, source.path, fields, progress=progress)

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
                                           attach_fn=attach_fn, level=level,
                                           incremental=level_run, **extra)
            except IntegrityError:
                log.error("the stored archive differs from the duplicate: %s",
                          verdict.get("detail", ""))
                raise
            finally:
                if progress is not None:
                    progress.done()
            stored = verdict.get("backup") or summary.backup
    seconds = time.monotonic() - started
    if run is not None:
        return _image_summary(run, answer, source, store, mode, seconds, warnings)
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
        **({"tar_level": stored.get("tar_level"), "parent": stored.get("parent"),
            "chain": stored.get("chain")} if incremental else {}),
    }


def _image_summary(run: _ImageRun, answer: PrepareAnswer, source: Location, store: Location,
                   mode: VerifyMode, seconds: float, warnings: list[str]) -> dict[str, Any]:
    r = run.result
    delta = answer.delta
    return {
        "backup_id": run.backup["id"], "kind": "image", "source": str(source),
        "store": str(store), "session_id": answer.session_id,
        "duplicate_kind": answer.duplicate_kind.value, "frozen_by": answer.frozen_by.value,
        "freeze_window_ms": answer.freeze_window_ms,
        "size": r.chunk_map.size, "chunks": r.chunk_map.count,
        "read_bytes": r.read_bytes, "chunks_read": r.chunks_read,
        "new_bytes": r.new_bytes, "new_chunks": r.chunks_new,
        "changed_chunks": r.changed, "zero_chunks": r.chunks_zero,
        "discarded_chunks": r.chunks_discarded,
        "incremental": not r.full, "full_reason": r.full_reason,
        "base": None if r.full or delta is None else delta.base,
        "stream_seconds": round(r.seconds, 3), "total_seconds": round(seconds, 3),
        "throughput_mib_s": round(r.read_bytes / max(r.seconds, 1e-6) / (1 << 20), 2),
        # every chunk's hash was checked by the store; compared: read again and matched
        "verified": mode is not VerifyMode.NONE, "verify": mode.value,
        "compared_chunks": run.compared,
        "warnings": warnings, "held": [h.hook for h in answer.held],
    }


def parse_location(text: str, what: str = "location") -> Location:
    """``fs1:/srv/data``, ``root@fs1:/srv/data``, a local ``/srv/backups``, or (a store)
    ``s3://BUCKET/PREFIX[?profile=NAME]``, checked here, opened when used."""
    if isinstance(text, str) and is_s3_url(text):
        from ..store.s3config import parse_url

        parse_url(text)
        return Location(None, text)
    host, path = jobs.parse_location(text, what)
    return Location(host, path)
