"""The proxy's side of an image put (issue 13): an :class:`~sanoffload.store.imagemap.ImageSink`
over the store's wire (:func:`remote_image_sink`) or straight into a repository on this
host (:func:`local_image_sink`, for :class:`~sanoffload.proxy.peers.LocalStoreClient`).

The wire ops are the store's (:mod:`sanoffload.store.service`): ``image`` opens the
put with the volume's geometry, ``image_map``, ``missing``, ``chunk`` (a header, then
the payload as data frames), ``image_commit`` (the map as data frames) and
``image_abort``. What the store sends back is checked like any peer's reply: a
previous map is read only up to the size this volume's map has and checked whole; a
``missing`` answer may only name ids that were asked about.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from ..channel.protocol import CHUNK, Channel, check_reply
from ..errors import IntegrityError, ProtocolError, SanoffloadError, UsageError
from ..store.image import MAX_MISSING_IDS, LocalImageSink
from ..store.imagemap import (
    DEFAULT_CHUNK_SIZE,
    DIGEST_BYTES,
    HEADER as MAP_HEADER,
    ChunkMap,
    ImageSink,
    check_geometry,
)
from ..text import printable

if TYPE_CHECKING:
    from ..store.service import StoreService


class StoreClient(Protocol):
    """What an image put needs of :class:`~sanoffload.proxy.peers.StoreClient` (named by
    its shape: peers imports this module, so this module cannot import peers)."""

    name: str
    channel: Channel

    def call(self, op: str, **fields: Any) -> dict[str, Any]: ...

    def reply(self) -> dict[str, Any]: ...

    def close(self, *, quiet: bool = False) -> None: ...

log = logging.getLogger(__name__)


def _geometry(fields: Mapping[str, Any], size: int | None, chunk_size: int | None
              ) -> tuple[int, int]:
    """The volume's size and chunk size: given, or stated in ``fields["image"]``."""
    given = fields.get("image")
    stated: Mapping[str, Any] = given if isinstance(given, Mapping) else {}
    size = size if size is not None else stated.get("size")
    chunk_size = chunk_size if chunk_size is not None else stated.get("chunk_size",
                                                                      DEFAULT_CHUNK_SIZE)
    if size is None:
        raise UsageError("an image put needs the volume's size (size=, or image.size)")
    try:
        return check_geometry(size, chunk_size)
    except IntegrityError as exc:
        raise UsageError(f"image put: {exc.message}") from None


class RemoteImageSink:
    """One image put over a store's channel (see the module docstring)."""

    def __init__(self, store: StoreClient, host: str, path: str, fields: Mapping[str, Any],
                 *, size: int | None = None, chunk_size: int | None = None) -> None:
        self.store = store
        self.size, self.chunk_size = _geometry(fields, size, chunk_size)
        self.map_bytes = MAP_HEADER.size + -(-self.size // self.chunk_size) * DIGEST_BYTES
        self._done = False
        reply = store.call("image", host=host, path=path, size=self.size,
                           chunk_size=self.chunk_size, fields=dict(fields))
        self.id = str(check_reply(reply, {"id": str})["id"])

    def previous_map(self, backup_id: str) -> ChunkMap | None:
        reply = check_reply(self.store.call("image_map", id=backup_id), {"found": bool})
        if not reply["found"]:
            return None
        announced = reply.get("map_bytes")
        if announced != self.map_bytes:
            # the frames that follow cannot be trusted to line up: hang up
            self.store.close(quiet=True)
            raise ProtocolError(f"{self.store.name}: previous map of "
                                f"{printable(str(announced))[:40]} bytes, this volume's "
                                f"is {self.map_bytes}")
        blob = bytearray()
        for piece in self.store.channel.recv_chunks():
            if len(blob) + len(piece) > self.map_bytes:
                self.store.close(quiet=True)
                raise ProtocolError(f"{self.store.name}: more map than announced")
            blob += piece
        if len(blob) != self.map_bytes:
            raise ProtocolError(f"{self.store.name}: a map of {len(blob)} bytes, "
                                f"{self.map_bytes} announced")
        found = ChunkMap.from_bytes(bytes(blob), where=f"{self.store.name}: map {backup_id}")
        if (found.size, found.chunk_size) != (self.size, self.chunk_size):
            raise IntegrityError(f"{self.store.name}: map {backup_id} is of another volume")
        return found

    def missing(self, chunk_ids: Sequence[str]) -> set[str]:
        if len(chunk_ids) > MAX_MISSING_IDS:
            raise UsageError(f"missing: at most {MAX_MISSING_IDS} ids a call")
        asked = set(chunk_ids)
        reply = check_reply(self.store.call("missing", ids=list(chunk_ids)), {"missing": list})
        answer = reply["missing"]
        if not all(isinstance(cid, str) and cid in asked for cid in answer):
            raise ProtocolError(f"{self.store.name}: 'missing' names ids not asked about")
        return set(answer)

    def _send(self, header: dict[str, Any], data: bytes) -> None:
        """``header``, then ``data`` as frames; the store's answer is read by the caller."""
        channel = self.store.channel
        view = memoryview(data)
        try:
            channel.send(header)
            for start in range(0, len(view), CHUNK):
                channel.send_chunk(view[start:start + CHUNK])
            channel.end_chunks()
        except ProtocolError:
            self._done = True  # the put is over either way: no abort to send
            self.store.reply()  # the store refused and hung up: its reason, if it said one
            raise

    def put_chunk(self, chunk_id: str, codec: int, payload: bytes, plain_bytes: int) -> None:
        self._send({"op": "chunk", "id": chunk_id, "codec": codec,
                    "plain_bytes": plain_bytes, "payload_bytes": len(payload)}, payload)
        check_reply(self.store.reply(), {"stored": bool})

    def commit(self, chunk_map: ChunkMap, fields: Mapping[str, Any]) -> dict[str, Any]:
        self._done = True
        self._send({"op": "image_commit", "fields": dict(fields)}, chunk_map.to_bytes())
        return dict(check_reply(self.store.reply(), {"backup": dict})["backup"])

    def abort(self, reason: str = "the backup failed") -> None:
        if self._done:
            return
        self._done = True
        try:
            self.store.call("image_abort", reason=reason[:200])
        except SanoffloadError as exc:
            log.info("%s: abort of %s: %s", self.store.name, self.id, exc)


def remote_image_sink(store: StoreClient, host: str, path: str, fields: Mapping[str, Any],
                      *, size: int | None = None, chunk_size: int | None = None) -> ImageSink:
    """An image put of HOST:PATH over ``store``'s channel; ``size`` is the volume's bytes
    (or ``fields["image"]["size"]``), ``chunk_size`` 4 MiB unless given."""
    return RemoteImageSink(store, host, path, fields, size=size, chunk_size=chunk_size)


def local_image_sink(service: StoreService, host: str, path: str, fields: Mapping[str, Any],
                     *, size: int | None = None, chunk_size: int | None = None) -> ImageSink:
    """An image put of HOST:PATH straight into ``service``'s repository (same checks and
    quota as over the wire, no frames in between)."""
    geometry: tuple[int | None, int | None] = (size, chunk_size)
    if size is not None or isinstance(fields.get("image"), Mapping):
        try:
            geometry = _geometry(fields, size, chunk_size)
        except UsageError:
            if size is not None:
                raise
    if geometry[0] is None:
        geometry = (None, None)  # chunks bounded by MAX_CHUNK, the map checked at commit
    sink: LocalImageSink = service.open_image(host, path, fields, size=geometry[0],
                                              chunk_size=geometry[1])
    return sink
