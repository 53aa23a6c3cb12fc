"""``sanoffload store serve --stdio --client NAME``: the store's side of the control channel.

Ops (JSON lines, see :mod:`sanoffload.channel.protocol`)::

    {"op": "ping"}                                 -> {"time": …}
    {"op": "list", "host": "fs1", "after": ID}     -> {"backups": [{id, manifest fields…}
                                                       or {id, broken}, …], "next": ID|null}
    {"op": "put", "host": "fs1", "path": "/srv/data", "fields": {frozen_at, …}}
        <- {"ok": true, "id": "fs1/srv-data-…/2026…Z"}     (the writer is open)
        -> {"chunk": N} + N bytes, …, {"chunk": 0}
        -> {"op": "commit", "fields": {"sha256": …, "archive_bytes": …}}   or {"op": "abort"}
                                               -> {"backup": {id, manifest fields…}}
    {"op": "get", "id": "fs1/…/2026…Z"}
        <- {"ok": true, "backup": {…}} then chunks and {"chunk": 0}
    {"op": "verify", "id": …, "compared": {"status": "ok", "detail": ""}}
                                               -> {"backup": {…}}

An incremental tar backup (issue 13) sends its state file after the archive, before
the commit; the proxy asks for the previous one with ``state``::

    put … {"chunk": 0}  -> {"op": "snapshot"} + chunks of the state file, {"chunk": 0}
        -> {"op": "commit", "fields": {…, "tar_level": N, "parent": ID, "chain": ID,
                                       "snapshot_sha256": …, "snapshot_bytes": …}}
    {"op": "state", "host": "fs1", "path": "/srv/data"}
        <- {"ok": true, "found": false, "reason": "…"}
        or {"ok": true, "found": true, "backup": {…}, "snapshot_bytes": N} then chunks

An image backup (issue 13) is one put over several ops, on one connection, one at
a time; every size and id the client gives is checked before anything is read::

    {"op": "image", "host": "fs1", "path": "/srv/thin", "size": N, "chunk_size": 4194304,
     "fields": {frozen_at, …}}                 -> {"id": "fs1/srv-thin-…/2026…Z"}
    {"op": "image_map", "id": BASE}            -> {"found": false}
                                                or {"found": true, "map_bytes": N} + chunks
    {"op": "missing", "ids": [ID, …]}          -> {"missing": [ID, …]}   (at most 4096 ids)
    {"op": "chunk", "id": ID, "codec": 0|1, "plain_bytes": N, "payload_bytes": M}
        -> M bytes as chunk frames, {"chunk": 0}  -> {"stored": true|false}
    {"op": "image_commit", "fields": {…, "image": {read_bytes, base, fstype}}}
        -> the map as chunk frames, {"chunk": 0}  -> {"backup": {id, manifest fields…}}
    {"op": "image_abort", "reason": "…"}       -> {"aborted": true}

``image_map`` answers only for an image backup of the same host and path as the
open put (and a host the client may read): the previous map of an incremental. A
chunk's ``plain_bytes`` and ``payload_bytes`` are at most the put's chunk size; its
payload is decoded with that bound and re-hashed, and a payload that does not hash
to its id fails the put. The map's frames are bounded by the size its geometry
implies; the commit checks that every chunk the map names is in the store. Any
error inside an image put aborts it (its chunks wait for ``store gc``); an error
while frames may still come closes the connection. New chunk bytes count against
the quota (reserved before each chunk is written).

A client can add backups and read them, never delete or overwrite one (prune
runs on the store itself): a stolen proxy key cannot destroy the history. A
failure half-way through a put removes the partial file; the error reply goes
out at once and the connection closes (the peer may still be sending).

``list`` answers a page at a time, each reply at most :data:`PAGE_BYTES` of
JSON (a line is at most 1 MiB): ``next`` names the last id of the page when
more follow, and the client asks again with ``after`` set to it. A backup
whose manifest is broken is listed as ``{id, broken: reason}``.

The quota (``quota_bytes``) is the client's own: it is charged for the
backups it put (recorded as ``client`` in their manifests), and concurrent
puts reserve before they write, so together they cannot pass it
(:class:`~sanoffload.store.repo.Quota`).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from typing import Any

from ..channel.protocol import CHUNK, MAX_LINE, Channel, Spec, check_message
from ..channel.server import BrokenStream, Service
from ..errors import (
    AuthError,
    IntegrityError,
    ProtocolError,
    RefusedError,
    ResourceError,
    SanoffloadError,
    UsageError,
)
from ..text import printable
from .config import check_client
from .image import MAX_MISSING_IDS, LocalImageSink
from .imagemap import DIGEST_BYTES, HEADER as MAP_HEADER, ChunkMap, check_geometry
from .manifest import VERIFIED_OK, VERIFY_FAILED, Verification, sender_fields, to_utc
from .repo import (
    Backup,
    BackupId,
    BackupWriter,
    Quota,
    Repository,
    check_host,
    check_path,
    slug_for_path,
)

log = logging.getLogger(__name__)

SPECS = {
    "ping": Spec(),
    "list": Spec(optional={"host": str, "slug": str, "after": str}),
    "put": Spec(required={"host": str, "path": str}, optional={"fields": dict}),
    "get": Spec(required={"id": str}),
    "verify": Spec(required={"id": str}, optional={"compared": dict}),
    "state": Spec(required={"host": str, "path": str}),
}
_AFTER_DATA = {"commit": Spec(optional={"fields": dict}), "abort": Spec(optional={"reason": str}),
               "snapshot": Spec()}
IMAGE_SPECS = {
    "image": Spec(required={"host": str, "path": str, "size": int, "chunk_size": int},
                  optional={"fields": dict}),
    "image_map": Spec(required={"id": str}),
    "missing": Spec(required={"ids": list}),
    "chunk": Spec(required={"id": str, "codec": int, "plain_bytes": int,
                            "payload_bytes": int}),
    "image_commit": Spec(optional={"fields": dict}),
    "image_abort": Spec(optional={"reason": str}),
}
SPECS.update(IMAGE_SPECS)
#: the most JSON one list reply carries (half a line: the envelope and one more entry fit)
PAGE_BYTES = MAX_LINE // 2


class StoreService(Service):
    """The store's ops for one authenticated client over one connection."""

    name = "store"
    specs = SPECS

    def __init__(self, repo: Repository, client: str, *, quota_bytes: int | None = None,
                 hosts: tuple[str, ...] | None = None) -> None:
        self.repo = repo
        self.client = check_client(client)
        self.quota_bytes = quota_bytes
        #: the source hosts this client may store and read (None: any)
        self.hosts = hosts
        #: the image put open on this connection, if any
        self._image: LocalImageSink | None = None

    def hello_info(self) -> dict[str, Any]:
        return {"client": self.client}

    def _host_allowed(self, host: str) -> None:
        if self.hosts is not None and host not in self.hosts:
            raise AuthError(f"client {self.client} may not store or read backups of {host!r}")

    def handle(self, op: str, fields: dict[str, Any],
               channel: Channel) -> dict[str, Any] | None:
        if op == "ping":
            return {"time": time.time()}
        if op == "list":
            return self._list(fields)
        if op == "put":
            return self._put(fields, channel)
        if op == "state":
            self._state(fields["host"], fields["path"], channel)
            return None  # answered already, before the data
        if op in IMAGE_SPECS:
            return self._image_op(op, fields, channel)
        bid = BackupId.parse(fields["id"])
        self._host_allowed(bid.host)
        if op == "get":
            self._get(bid, channel)
            return None  # answered already, before the data
        return self._verify(bid, fields.get("compared"))

    # -- list --------------------------------------------------------------------
    def _list(self, fields: dict[str, Any]) -> dict[str, Any]:
        if fields.get("host") is not None:
            self._host_allowed(fields["host"])
        after = BackupId.parse(fields["after"]) if fields.get("after") is not None else None
        page: list[dict[str, Any]] = []
        size = 0
        for entry in self.repo.catalog(fields.get("host"), fields.get("slug"), after=after):
            if self.hosts is not None and entry.id.host not in self.hosts:
                continue
            item = entry.to_dict()
            n = len(json.dumps(item, separators=(",", ":"))) + 1
            if n > PAGE_BYTES:  # cannot happen with manifests this store wrote
                item = {"id": str(entry.id), "broken": "manifest too large to send"}
                n = len(json.dumps(item)) + 1
            if page and size + n > PAGE_BYTES:
                return {"backups": page, "next": page[-1]["id"]}
            page.append(item)
            size += n
        return {"backups": page, "next": None}

    # -- put ---------------------------------------------------------------------
    def open_put(self, host: str, path: str,
                 sent: Mapping[str, Any] | None) -> tuple[BackupWriter, dict[str, Any]]:
        """A put's checks and its writer (quota reserved), before any data: ``(writer, the
        sender's fields)``; the channel's ``put`` and a store in the proxy's own process
        (:class:`~sanoffload.proxy.peers.LocalStoreClient`) both start here."""
        self._host_allowed(host)
        fields = dict(sent or {})
        when = fields.get("frozen_at")
        try:
            sender_fields(fields)
            stamp = to_utc(when) if when is not None else None
        except ValueError as exc:
            raise UsageError(f"put: manifest fields: {exc}") from None
        quota = self.quota()
        # the writer checks the quota (and reserves) before the data: a refusal is an answer
        writer = self.repo.writer(host, path, timestamp=stamp, client=self.client, quota=quota)
        return writer, fields

    def _put(self, fields: dict[str, Any], channel: Channel) -> dict[str, Any]:
        writer, sent = self.open_put(fields["host"], fields["path"], fields.get("fields"))
        backup = None
        with writer:
            channel.send({"ok": True, "id": str(writer.id)})
            try:
                for chunk in channel.recv_chunks():
                    writer.write(chunk)
            except SanoffloadError as exc:
                raise BrokenStream(exc) from None
            except OSError as exc:
                raise BrokenStream(ResourceError(f"{writer.id}: cannot write: {exc}")) from None
            try:
                op, after = check_message(channel.expect(), _AFTER_DATA)
                if op == "snapshot":
                    # an incremental backup's state file, as frames up to the end frame
                    self._receive_snapshot(writer, channel)
                    op, after = check_message(channel.expect(), _AFTER_DATA)
                    if op == "snapshot":
                        raise ProtocolError("put: a second state file")
            except ProtocolError as exc:  # out of step after the data: hang up
                raise BrokenStream(exc) from None
            if op == "abort":
                reason = printable(after.get("reason") or "no reason given")[:200]
                log.info("client %s aborted %s: %s", self.client, writer.id, reason)
                raise UsageError(f"{writer.id}: aborted by the sender: {reason}")
            backup = self.finish_put(writer, sent, after.get("fields"))
        return {"backup": backup.to_dict()}

    @staticmethod
    def _receive_snapshot(writer: BackupWriter, channel: Channel) -> None:
        try:
            writer.write_snapshot(channel.recv_chunks())
        except SanoffloadError as exc:
            raise BrokenStream(exc) from None
        except OSError as exc:
            raise BrokenStream(ResourceError(f"{writer.id}: cannot write: {exc}")) from None

    # -- state (incremental backups) --------------------------------------------------
    def _state(self, host: str, path: str, channel: Channel) -> None:
        """The newest incremental backup of HOST:PATH whose chain is whole, and its state
        file (checked against the manifest) as frames; ``found`` false (and why) if none."""
        self._host_allowed(host)
        try:
            latest = self.repo.latest_state(check_host(host), slug_for_path(check_path(path)))
        except RefusedError as exc:
            raise UsageError(f"state: {exc.message}") from None
        if latest is None:
            channel.send({"ok": True, "found": False, "reason": "no incremental backup"})
            return
        try:
            self.repo.chain(latest)
            data = self.repo.load_snapshot(latest)
        except IntegrityError as exc:
            log.warning("client %s: %s: not a base for the next level: %s", self.client,
                        latest.id, exc.message)
            channel.send({"ok": True, "found": False, "reason": exc.message[:300]})
            return
        channel.send({"ok": True, "found": True, "backup": latest.to_dict(),
                      "snapshot_bytes": len(data)})
        view = memoryview(data)
        for start in range(0, len(data), CHUNK):
            channel.send_chunk(view[start:start + CHUNK])
        channel.end_chunks()

    def finish_put(self, writer: BackupWriter, sent: Mapping[str, Any],
                   after: Mapping[str, Any] | None) -> Backup:
        """Commit a put: the sender's fields (those of the end win), checks, publish."""
        final = dict(sent)
        final.update(after or {})
        try:
            backup = writer.commit(final)
        except ValueError as exc:
            raise UsageError(f"commit: {exc}") from None
        log.info("client %s stored %s (%d bytes)", self.client, backup.id,
                 backup.manifest.archive_bytes)
        return backup

    # -- image puts --------------------------------------------------------------
    def quota(self) -> Quota | None:
        return (Quota(self.client, self.quota_bytes, self.hosts)
                if self.quota_bytes is not None else None)

    def open_image(self, host: str, path: str, sent: Mapping[str, Any] | None, *,
                   size: int | None = None, chunk_size: int | None = None) -> LocalImageSink:
        """An image put's checks and its sink (the wire's ``image`` op and a store in the
        proxy's own process both start here)."""
        self._host_allowed(host)
        return LocalImageSink(self.repo, self.client, host, path, sent, quota=self.quota(),
                              size=size, chunk_size=chunk_size)

    def _image_op(self, op: str, fields: dict[str, Any],
                  channel: Channel) -> dict[str, Any] | None:
        if op == "image":
            if self._image is not None:
                raise UsageError(f"image: a put ({self._image.id}) is already open on this "
                                 "connection")
            try:
                check_geometry(fields["size"], fields["chunk_size"])
            except IntegrityError as exc:
                raise UsageError(f"image: {exc.message}") from None
            self._image = self.open_image(fields["host"], fields["path"], fields.get("fields"),
                                          size=fields["size"], chunk_size=fields["chunk_size"])
            return {"id": str(self._image.id)}
        sink = self._image
        if sink is None:
            raise BrokenStream(UsageError(f"{op}: no image put is open")) if op in (
                "chunk", "image_commit") else UsageError(f"{op}: no image put is open")
        try:
            if op == "image_map":
                self._image_map(sink, fields["id"], channel)
                return None
            if op == "missing":
                ids = fields["ids"]
                if len(ids) > MAX_MISSING_IDS or not all(isinstance(i, str) for i in ids):
                    raise UsageError(f"missing: at most {MAX_MISSING_IDS} ids (strings)")
                return {"missing": sorted(sink.missing(ids))}
            if op == "chunk":
                return {"stored": self._chunk(sink, fields, channel)}
            if op == "image_commit":
                return {"backup": self._image_commit(sink, fields.get("fields"), channel)}
            reason = printable(fields.get("reason") or "no reason given")[:200]
            sink.abort(f"aborted by the sender: {reason}")
            self._image = None
            return {"aborted": True}
        except BaseException:
            if self._image is sink:
                sink.abort(f"{op} failed")
                self._image = None
            raise

    def _image_map(self, sink: LocalImageSink, backup_id: str, channel: Channel) -> None:
        bid = BackupId.parse(backup_id)
        self._host_allowed(bid.host)
        found = sink.previous_map(str(bid))
        if found is None:
            channel.send({"ok": True, "found": False})
            return
        blob = found.to_bytes()
        channel.send({"ok": True, "found": True, "map_bytes": len(blob)})
        view = memoryview(blob)
        for start in range(0, len(blob), CHUNK):
            channel.send_chunk(view[start:start + CHUNK])
        channel.end_chunks()

    def _chunk(self, sink: LocalImageSink, fields: dict[str, Any], channel: Channel) -> bool:
        assert sink.geometry is not None
        limit = sink.geometry[1]
        plain, size = fields["plain_bytes"], fields["payload_bytes"]
        # the frames follow unasked: a header we refuse leaves them on the line, so hang up
        if not 0 < plain <= limit or not 0 < size <= limit:
            raise BrokenStream(UsageError(f"chunk: plain_bytes {plain} and payload_bytes "
                                          f"{size} must be 1 to the chunk size {limit}"))
        data = _recv_exactly(channel, size, "chunk")
        before = sink.new_chunks
        try:
            sink.put_chunk(fields["id"], fields["codec"], data, plain)
        except SanoffloadError as exc:
            log.warning("client %s: %s: chunk refused: %s", self.client, sink.id, exc)
            raise
        return sink.new_chunks > before

    def _image_commit(self, sink: LocalImageSink, sent: Any,
                      channel: Channel) -> dict[str, Any]:
        assert sink.geometry is not None
        size, chunk_size = sink.geometry
        expected = MAP_HEADER.size + -(-size // chunk_size) * DIGEST_BYTES
        blob = _recv_exactly(channel, expected, "image_commit")
        try:
            chunk_map = ChunkMap.from_bytes(blob, where=f"{sink.id}: the map sent")
        except IntegrityError as exc:
            raise UsageError(exc.message) from None
        backup = sink.commit(chunk_map, sent)
        self._image = None
        return backup

    def closed(self, clean: bool) -> None:
        if self._image is not None:
            self._image.abort("the connection closed")
            self._image = None

    # -- get -----------------------------------------------------------------------
    def _get(self, bid: BackupId, channel: Channel) -> None:
        backup = self.repo.get(bid)
        self.repo.check_sha256(backup)
        channel.send({"ok": True, "backup": backup.to_dict()})
        with self.repo.open_archive(backup) as f:
            for piece in self.repo.archive_pieces(backup, f):
                channel.send_chunk(piece)
        channel.end_chunks()

    # -- verify --------------------------------------------------------------------
    def _verify(self, bid: BackupId, compared: Any) -> dict[str, Any]:
        if compared is not None:
            status = compared.get("status") if isinstance(compared, dict) else None
            detail = compared.get("detail", "") if isinstance(compared, dict) else ""
            if (status not in (VERIFIED_OK, VERIFY_FAILED) or not isinstance(detail, str)
                    or set(compared) - {"status", "detail"}):
                raise ProtocolError("verify: 'compared' must be {status: ok|failed, detail}")
            # tar's own words about the tree: file names may hold anything, stored escaped
            self.repo.record_compare(bid, Verification.now(status, printable(detail)))
        backup = self.repo.verify(bid)
        return {"backup": backup.to_dict()}


def _recv_exactly(channel: Channel, size: int, op: str) -> bytes:
    """``size`` bytes as chunk frames up to the end frame; more (refused as soon as it
    shows), less, or a broken frame closes the connection."""
    buf = bytearray()
    try:
        for piece in channel.recv_chunks():
            if len(buf) + len(piece) > size:
                raise ProtocolError(f"{op}: more than the {size} bytes announced")
            buf += piece
    except SanoffloadError as exc:
        raise BrokenStream(exc) from None
    if len(buf) != size:
        raise UsageError(f"{op}: {len(buf)} bytes arrived, {size} announced")
    return bytes(buf)
