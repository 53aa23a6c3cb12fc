"""The proxy's view of its peers: the first server's agent and the backup server's store.

Both are reached over the control channel (:mod:`sanoffload.channel`); these
classes turn its ops into typed calls and check the replies they rely on.
"""

from __future__ import annotations

import hashlib
import io
import logging
import select
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Any

from ..channel.client import Client, Connector
from ..channel.messages import PrepareAnswer
from ..channel.protocol import CHUNK, check_reply
from ..errors import CommandError, IntegrityError, ProtocolError, SanoffloadError
from ..kinds import DuplicateKind
from ..store.imagemap import ImageSink
from ..store.service import StoreService
from ..text import printable
from ..tools import tar

log = logging.getLogger(__name__)

#: the most backups a store's list may name (pages are read until the end, up to this)
MAX_LISTED = 1_000_000


class AgentClient(Client):
    """``prepare``, ``status``, ``release`` and ``ping`` on a first server's agent."""

    service = "agent"

    @property
    def host(self) -> str:
        host = self.peer.info.get("host")
        if not isinstance(host, str) or not host:
            raise ProtocolError(f"{self.name}: the agent did not say its host name")
        return host

    def prepare(self, path: str, initiator: str, kind: DuplicateKind | None = None, *,
                also: Sequence[str] = (), image: bool = False) -> PrepareAnswer:
        """The agent's answer, every field checked (ProtocolError, exit 11, if malformed).

        ``also``: the other paths of a consistency group, sent as ``"also"`` only
        when there are some; ``image``: an image backup (the agent may answer a
        ``delta``), sent only when true. A tar backup's request is what it always was.
        """
        extra: dict[str, Any] = {"also": list(also)} if also else {}
        if image:
            extra["image"] = True
        reply = self.call("prepare", path=path, initiator=initiator,
                          kind=None if kind is None else kind.value, **extra)
        session = check_reply(reply, {"session": dict})["session"]
        try:
            return PrepareAnswer.from_wire(session, what=f"{self.name}: the agent's answer")
        except ProtocolError:
            # an answer we cannot use still holds a frozen-then-exported duplicate on the
            # agent: release it now rather than after the connection's grace period
            sid = session.get("session_id")
            if isinstance(sid, str):
                try:
                    self.release(sid)
                except SanoffloadError as exc:
                    log.warning("%s: could not release the unusable session: %s",
                                self.name, exc)
            raise

    def status(self, session_id: str) -> str:
        return str(check_reply(self.call("status", session_id=session_id),
                               {"status": str})["status"])

    def release(self, session_id: str, committed: str | None = None) -> list[str]:
        """Release the session; ``committed``: the image backup the store committed from it
        (its snapshot becomes the agent's base), sent only when set."""
        extra: dict[str, Any] = {} if committed is None else {"committed": committed}
        return list(check_reply(self.call("release", session_id=session_id, **extra),
                                {"released": list})["released"])

    def ping(self) -> float:
        return float(check_reply(self.call("ping"), {"time": (int, float)})["time"])


class StoreClient(Client):
    """``put``, ``list``, ``get`` and ``verify`` on a backup server's store."""

    service = "store"

    def list(self, host: str | None = None) -> list[dict[str, Any]]:
        """Every backup the store lists (of ``host``), read a page at a time.

        A page names the last id it holds as ``next`` when more follow; each
        ``next`` must be past the one before (ids order as their three parts), so
        a store cannot keep the proxy reading forever.
        """
        out: list[dict[str, Any]] = []
        after: str | None = None
        while True:
            reply = check_reply(self.call("list", host=host, after=after), {"backups": list})
            out.extend(reply["backups"])
            following = reply.get("next")
            if following is None:
                return out
            if (not isinstance(following, str) or not reply["backups"]
                    or (after is not None and following.split("/") <= after.split("/"))):
                raise ProtocolError(f"{self.name}: the list did not move on past "
                                    f"{after or 'its first page'}")
            if len(out) > MAX_LISTED:
                raise ProtocolError(f"{self.name}: lists more than {MAX_LISTED} backups")
            after = following

    def writer(self, host: str, path: str, fields: Mapping[str, Any], *,
               progress: Callable[[int], None] | None = None) -> RemoteWriter | LocalWriter:
        return RemoteWriter(self, host, path, fields, progress=progress)

    def state(self, host: str, path: str, out: IO[bytes]) -> PreviousState:
        """The newest incremental backup of ``host:path`` whose chain is whole: its state
        file goes to ``out`` (at most ``tar.MAX_SNAPSHOT_BYTES``, its sha256 checked against
        the manifest); ``found`` False (and the store's reason) if there is none."""
        reply = check_reply(self.call("state", host=host, path=path), {"found": bool})
        if not reply["found"]:
            reason = reply.get("reason")
            return PreviousState(None, printable(reason)[:300] if isinstance(reason, str)
                                 else "no incremental backup")
        backup = reply.get("backup")
        size = reply.get("snapshot_bytes")
        if not isinstance(backup, dict) or isinstance(size, bool) or not isinstance(size, int):
            self.close(quiet=True)  # its frames follow: out of step now
            raise ProtocolError(f"{self.name}: a state answer without backup and size")
        h = hashlib.sha256()
        got = 0
        for chunk in self.channel.recv_chunks():
            got += len(chunk)
            if got > min(size, tar.MAX_SNAPSHOT_BYTES):
                self.close(quiet=True)
                raise ProtocolError(f"{self.name}: the state file is longer than the "
                                    f"{size} bytes announced")
            h.update(chunk)
            out.write(chunk)
        bid = printable(str(backup.get("id")))[:200]
        if got != size or got != backup.get("snapshot_bytes") or \
                h.hexdigest() != backup.get("snapshot_sha256"):
            raise IntegrityError(f"{bid}: the state file that arrived ({got} bytes, sha256 "
                                 f"{h.hexdigest()}) is not what the manifest says")
        return PreviousState(backup, "")

    def image_sink(self, host: str, path: str, fields: Mapping[str, Any], *,
                   size: int | None = None, chunk_size: int | None = None) -> ImageSink:
        """Where an image backup of ``host:path`` goes (the store's image ops over the wire);
        ``size``: the volume's bytes (else ``fields["image"]["size"]``)."""
        from .storeimage import remote_image_sink

        return remote_image_sink(self, host, path, fields, size=size, chunk_size=chunk_size)

    def verify(self, backup_id: str,
               compared: Mapping[str, str] | None = None) -> dict[str, Any]:
        reply = self.call("verify", id=backup_id,
                          compared=dict(compared) if compared is not None else None)
        return dict(check_reply(reply, {"backup": dict})["backup"])

    def get(self, backup_id: str, out: IO[bytes]) -> dict[str, Any]:
        """Write backup ``backup_id``'s archive to ``out``; its sha256 is checked on the way."""
        backup = dict(check_reply(self.call("get", id=backup_id), {"backup": dict})["backup"])
        h = hashlib.sha256()
        size = 0
        try:
            for chunk in self.channel.recv_chunks():
                h.update(chunk)
                size += len(chunk)
                out.write(chunk)
        except (BrokenPipeError, OSError) as exc:
            # the reader stopped (tar found a difference and quit): the channel is now
            # out of step, so it is closed
            self.close(quiet=True)
            raise CommandError(f"{backup_id}: the reader of the archive stopped: {exc}") \
                from None
        if h.hexdigest() != backup.get("sha256") or size != backup.get("archive_bytes"):
            raise IntegrityError(f"{backup_id}: what arrived ({size} bytes, sha256 "
                                 f"{h.hexdigest()}) is not what the manifest says")
        return backup


@dataclass(frozen=True)
class PreviousState:
    """What ``state`` answered: the previous incremental backup (its manifest's fields, as
    the store sent them; None: there is none, ``reason`` says why)."""

    backup: dict[str, Any] | None
    reason: str


def send_file_chunks(path: str, send: Callable[[memoryview], None]) -> tuple[str, int]:
    """Read the file at ``path`` (at most ``tar.MAX_SNAPSHOT_BYTES``) and give it to
    ``send`` CHUNK at a time; ``(sha256, bytes)``."""
    h = hashlib.sha256()
    size = 0
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            size += n
            if size > tar.MAX_SNAPSHOT_BYTES:
                raise IntegrityError(f"the state file is larger than {tar.MAX_SNAPSHOT_BYTES} "
                                     "bytes")
            h.update(view[:n])
            send(view[:n])
    return h.hexdigest(), size


class LocalStoreClient(StoreClient):
    """A repository on this host (``--store /PATH``): list, get and verify go over the
    in-process channel like a remote store's; a put's bytes go straight into the store's
    writer (:meth:`StoreService.open_put`), with the same checks, without the channel's
    frames, its pipe and a second sha256 in between."""

    def __init__(self, connector: Connector, service: StoreService, *,
                 name: str = "store") -> None:
        super().__init__(connector, name=name)
        self.store_service = service

    def writer(self, host: str, path: str, fields: Mapping[str, Any], *,
               progress: Callable[[int], None] | None = None) -> RemoteWriter | LocalWriter:
        return LocalWriter(self.store_service, host, path, fields, progress=progress)

    def image_sink(self, host: str, path: str, fields: Mapping[str, Any], *,
                   size: int | None = None, chunk_size: int | None = None) -> ImageSink:
        """Chunks straight into the repository on this host (no channel in between)."""
        from .storeimage import local_image_sink

        return local_image_sink(self.store_service, host, path, fields, size=size,
                                chunk_size=chunk_size)


class LocalWriter:
    """One backup streaming into a repository on this host (see :class:`LocalStoreClient`)."""

    def __init__(self, service: StoreService, host: str, path: str, fields: Mapping[str, Any],
                 *, progress: Callable[[int], None] | None = None) -> None:
        self.service = service
        self.progress = progress
        self._writer, self._sent = service.open_put(host, path, fields)
        self.id = str(self._writer.id)
        self.bytes = 0

    def write_from(self, stream: io.BufferedIOBase) -> int:
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        start = self.bytes
        while n := stream.readinto(buf):
            self._writer.write(view[:n])
            self.bytes += n
            if self.progress is not None:
                self.progress(self.bytes)
        return self.bytes - start

    @property
    def sha256(self) -> str:
        return self._writer.sha256

    def send_snapshot(self, path: str) -> tuple[str, int]:
        """Hand the store the state file at ``path`` (an incremental backup); ``(sha256,
        bytes)``."""
        pieces: list[bytes] = []
        sent = send_file_chunks(path, lambda view: pieces.append(bytes(view)))
        self._writer.write_snapshot(pieces)
        return sent

    def commit(self, fields: Mapping[str, Any] | None = None) -> dict[str, Any]:
        return self.service.finish_put(self._writer, self._sent, fields).to_dict()

    def abort(self, reason: str = "the backup failed") -> None:
        log.info("%s: %s", self.id, reason)
        self._writer.abort()


class RemoteWriter:
    """One backup streaming into a remote store (the proxy side of ``put``).

    Hashes what it sends, so the store can check that what it received is
    what left (and the sender learns the sha256 without a second pass).
    """

    def __init__(self, store: StoreClient, host: str, path: str,
                 fields: Mapping[str, Any], *,
                 progress: Callable[[int], None] | None = None) -> None:
        self.store = store
        #: told the bytes sent so far after each chunk
        self.progress = progress
        self.bytes = 0
        self._hash = hashlib.sha256()
        self._done = False
        reply = store.call("put", host=host, path=path, fields=dict(fields))
        self.id = str(check_reply(reply, {"id": str})["id"])

    def _early_error(self) -> None:
        """The store answered in the middle of the data: that is an error (quota, disk)."""
        try:
            ready, _, _ = select.select([self.store.channel.rfile], [], [], 0)
        except (ValueError, OSError):
            return
        if ready:
            self._done = True
            self.store.reply()  # raises the store's error
            raise ProtocolError(f"{self.store.name} answered in the middle of the data")

    def write_from(self, stream: io.BufferedIOBase) -> int:
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        start = self.bytes
        channel = self.store.channel
        while n := stream.readinto(buf):
            self._hash.update(view[:n])
            try:
                channel.send_chunk(view[:n])
            except ProtocolError:
                self._early_error()
                raise
            self.bytes += n
            if self.progress is not None:
                self.progress(self.bytes)
            self._early_error()
        return self.bytes - start

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()

    def send_snapshot(self, path: str) -> tuple[str, int]:
        """Send the state file at ``path`` after the archive (an incremental backup);
        ``(sha256, bytes)``. The commit follows."""
        channel = self.store.channel
        try:
            channel.end_chunks()
            channel.send({"op": "snapshot"})
            sent = send_file_chunks(path, channel.send_chunk)
        except (ProtocolError, OSError):
            self._early_error()
            raise
        return sent

    def commit(self, fields: Mapping[str, Any] | None = None) -> dict[str, Any]:
        self._done = True
        channel = self.store.channel
        final = {**dict(fields or {}), "sha256": self.sha256, "archive_bytes": self.bytes}
        try:
            channel.end_chunks()  # of the archive, or of the state file that followed it
            channel.send({"op": "commit", "fields": final})
        except (ProtocolError, OSError):
            self._early_error()  # the store refused the last chunk and hung up: say why
            raise
        return dict(check_reply(self.store.reply(), {"backup": dict})["backup"])

    def abort(self, reason: str = "the backup failed") -> None:
        if self._done:
            return
        self._done = True
        try:
            self.store.channel.end_chunks()
            self.store.channel.send({"op": "abort", "reason": reason[:200]})
            self.store.reply()
        except SanoffloadError:
            pass  # the abort is answered with an error by design, or the link is gone
