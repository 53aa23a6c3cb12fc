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
from ..errors import AuthError, ProtocolError, ResourceError, SanoffloadError, UsageError
from ..text import printable
from .config import check_client
from .manifest import VERIFIED_OK, VERIFY_FAILED, Verification, sender_fields, to_utc
from .repo import Backup, BackupId, BackupWriter, Quota, Repository

log = logging.getLogger(__name__)

SPECS = {
    "ping": Spec(),
    "list": Spec(optional={"host": str, "slug": str, "after": str}),
    "put": Spec(required={"host": str, "path": str}, optional={"fields": dict}),
    "get": Spec(required={"id": str}),
    "verify": Spec(required={"id": str}, optional={"compared": dict}),
}
_AFTER_DATA = {"commit": Spec(optional={"fields": dict}), "abort": Spec(optional={"reason": str})}
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
        quota = (Quota(self.client, self.quota_bytes, self.hosts)
                 if self.quota_bytes is not None else None)
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
            except ProtocolError as exc:  # out of step after the data: hang up
                raise BrokenStream(exc) from None
            if op == "abort":
                reason = printable(after.get("reason") or "no reason given")[:200]
                log.info("client %s aborted %s: %s", self.client, writer.id, reason)
                raise UsageError(f"{writer.id}: aborted by the sender: {reason}")
            backup = self.finish_put(writer, sent, after.get("fields"))
        return {"backup": backup.to_dict()}

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

    # -- get -----------------------------------------------------------------------
    def _get(self, bid: BackupId, channel: Channel) -> None:
        backup = self.repo.get(bid)
        self.repo.check_sha256(backup)
        channel.send({"ok": True, "backup": backup.to_dict()})
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        with open(backup.archive, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                channel.send_chunk(view[:n])
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
