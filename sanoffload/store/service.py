"""``sanoffload store serve --stdio --client NAME``: the store's side of the control channel.

Ops (JSON lines, see :mod:`sanoffload.channel.protocol`)::

    {"op": "ping"}                                 -> {"time": …}
    {"op": "list", "host": "fs1"}                  -> {"backups": [{id, manifest fields…}, …]}
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
"""

from __future__ import annotations

import logging
import time
from typing import Any

from ..channel.protocol import CHUNK, Channel, Spec, check_message
from ..channel.server import BrokenStream, Service
from ..errors import AuthError, ProtocolError, ResourceError, SanoffloadError, UsageError
from .manifest import VERIFIED_OK, VERIFY_FAILED, Verification, sender_fields, to_utc
from .repo import BackupId, Repository

log = logging.getLogger(__name__)

SPECS = {
    "ping": Spec(),
    "list": Spec(optional={"host": str, "slug": str}),
    "put": Spec(required={"host": str, "path": str}, optional={"fields": dict}),
    "get": Spec(required={"id": str}),
    "verify": Spec(required={"id": str}, optional={"compared": dict}),
}
_AFTER_DATA = {"commit": Spec(optional={"fields": dict}), "abort": Spec(optional={"reason": str})}


def used_bytes(repo: Repository) -> int:
    """Bytes of the complete backups in ``repo`` (what a quota counts)."""
    return sum(b.manifest.archive_bytes for b in repo.list())


class StoreService(Service):
    """The store's ops for one authenticated client over one connection."""

    name = "store"
    specs = SPECS

    def __init__(self, repo: Repository, client: str, *, quota_bytes: int | None = None,
                 hosts: tuple[str, ...] | None = None) -> None:
        self.repo = repo
        self.client = client
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
            if fields.get("host") is not None:
                self._host_allowed(fields["host"])
            backups = [b for b in self.repo.list(fields.get("host"), fields.get("slug"))
                       if self.hosts is None or b.id.host in self.hosts]
            return {"backups": [b.to_dict() for b in backups]}
        if op == "put":
            return self._put(fields, channel)
        bid = BackupId.parse(fields["id"])
        self._host_allowed(bid.host)
        if op == "get":
            return self._get(bid, channel)
        return self._verify(bid, fields.get("compared"))

    # -- put ---------------------------------------------------------------------
    def _put(self, fields: dict[str, Any], channel: Channel) -> dict[str, Any]:
        self._host_allowed(fields["host"])
        sent = dict(fields.get("fields") or {})
        when = sent.get("frozen_at")
        try:
            sender_fields(sent)
            stamp = to_utc(when) if when is not None else None
        except ValueError as exc:
            raise UsageError(f"put: manifest fields: {exc}") from None
        used = used_bytes(self.repo) if self.quota_bytes is not None else 0
        if self.quota_bytes is not None and used >= self.quota_bytes:
            raise ResourceError(f"client {self.client}'s quota of {self.quota_bytes} bytes is "
                                f"used up ({used} bytes stored)", hint="prune old backups")
        writer = self.repo.writer(fields["host"], fields["path"], timestamp=stamp)
        backup = None
        with writer:
            channel.send({"ok": True, "id": str(writer.id)})
            try:
                for chunk in channel.recv_chunks():
                    writer.write(chunk)
                    if self.quota_bytes is not None and used + writer.bytes > self.quota_bytes:
                        raise ResourceError(f"client {self.client}'s quota of "
                                            f"{self.quota_bytes} bytes would be exceeded by "
                                            f"{writer.id}", hint="prune old backups")
            except SanoffloadError as exc:
                raise BrokenStream(exc) from None
            except OSError as exc:
                raise BrokenStream(ResourceError(f"{writer.id}: cannot write: {exc}")) from None
            try:
                op, after = check_message(channel.expect(), _AFTER_DATA)
            except ProtocolError as exc:  # out of step after the data: hang up
                raise BrokenStream(exc) from None
            if op == "abort":
                log.info("client %s aborted %s: %s", self.client, writer.id,
                         after.get("reason", ""))
                raise UsageError(f"{writer.id}: aborted by the sender: "
                                 f"{after.get('reason') or 'no reason given'}")
            final = dict(sent)
            final.update(after.get("fields") or {})
            try:
                backup = writer.commit(final)
            except ValueError as exc:
                raise UsageError(f"commit: {exc}") from None
        log.info("client %s stored %s (%d bytes)", self.client, backup.id,
                 backup.manifest.archive_bytes)
        return {"backup": backup.to_dict()}

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
        return None  # answered already, before the data

    # -- verify --------------------------------------------------------------------
    def _verify(self, bid: BackupId, compared: Any) -> dict[str, Any]:
        if compared is not None:
            status = compared.get("status") if isinstance(compared, dict) else None
            detail = compared.get("detail", "") if isinstance(compared, dict) else ""
            if (status not in (VERIFIED_OK, VERIFY_FAILED) or not isinstance(detail, str)
                    or set(compared) - {"status", "detail"}):
                raise ProtocolError("verify: 'compared' must be {status: ok|failed, detail}")
            self.repo.record_compare(bid, Verification.now(status, detail))
        backup = self.repo.verify(bid)
        return {"backup": backup.to_dict()}
