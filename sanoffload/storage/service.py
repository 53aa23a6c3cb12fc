"""``sanoffload storage serve --stdio --client NAME``: the storage node's side of the channel.

The first server's agent talks to this service through a RemoteController;
its ops mirror :class:`~sanoffload.agent.controller.StorageController` one to
one. The wire (JSON lines, see :mod:`sanoffload.channel.protocol`; service
name ``storage``; every reply also carries ``"ok": true``)::

    {"op": "ping"}                             -> {"time": 1764151773.2}
    {"op": "duplicate", "lun": "naa.6001405…", "kind": null | "snapshot" | …,
     "name": "sanoffload-fs1-1a2b3c4d"}
        -> {"duplicate": {"kind": "snapshot", "vg": "sanvg", "name": "sanoffload-fs1-1a2b3c4d",
                          "origin": "fs1data"}, "took_ms": 41.7}
    {"op": "expose", "duplicate": DUP, "initiator": "iqn…:px1", "port": "p1",
     "target_iqn": "iqn.2026-11.org.sanoffload:fs1-1a2b3c4d",
     "backstore": "sanoffload-fs1-1a2b3c4d", "serial": "UUID", "userid": "…",
     "password": "…", "lun": 0}
        -> {"export": {"target_iqn", "portal_ip", "portal_port", "lun", "identifier", "serial"}}
    {"op": "identify", "target_iqn": "…", "lun": 0} -> {"identifier": "naa.6001405…"}
    {"op": "health", "duplicate": DUP}         -> {"health": "healthy" | "invalid" | "missing"}
    {"op": "unexpose", "target_iqn": "…" | "", "backstore": "…" | ""} -> {"removed": [...]}
    {"op": "discard", "duplicate": DUP}        -> {"removed": [...]}
    {"op": "discard_partial", "duplicate": DUP} -> {"removed": [...]}
    {"op": "cleanup"}                          -> {"removed": [...]}

``DUP`` is the ``duplicate`` object a ``duplicate`` reply gave (``{kind, vg,
name, origin}``, all strings); before a reply came (an interrupted request),
the name the client asked for, with ``vg`` and ``origin`` ``""``. The node
finds every object in its journal, never by trusting the fields:

* ``duplicate``: ``lun`` is an identifier listed for this client in
  storage.toml and presented by a block backstore on an LV here (see
  :mod:`sanoffload.storage.luns`); ``kind`` as the agent's (``null``: the LV's
  suggestion); ``name`` is ``sanoffload-`` + the agent's session id. Lookups,
  the one ``lvcreate``/``lvconvert``, the checks, in one request: the first
  server is frozen for all of it; ``took_ms`` is the LVM command alone.
* ``expose``: ``port`` is a port ID of storage.toml (the portal the proxy
  reaches); ``initiator`` one of the client's proxies; ``target_iqn`` and
  ``backstore`` the names the duplicate's session gives (``lio.target_iqn_for``,
  ``sanoffload-SID``); ``serial`` a UUID no backstore here presents already;
  ``userid``/``password`` the CHAP pair (masked in every log). The LUN is
  read-only, its ACL that initiator alone.
* ``unexpose``, ``discard``, ``discard_partial``: idempotent (a marked name no
  record holds is already gone: ``removed: []``).
* ``cleanup``: what this client's ended connections left (records no live
  connection holds, expired or failed ones).

Errors (``{"ok": false, "error": {type, message, exit_code, hint}}``):
RefusedError (3) for an unknown or forbidden LUN, an unknown port ID ("no port
P on this storage node (ports: …)"), a name without sanoffload's mark;
AuthError (10) for an object of another client or an initiator not among the
client's proxies; UsageError (2) / ProtocolError (11) for malformed fields;
ResourceError (7) for max_sessions or an object that exists already.

The client name comes from the forced command (``--client``), never from a
request. Duplicates this connection made and neither discarded nor exposed
are released ``grace_s`` after it ends (cleanly or not): the client died
between freeze and answer. An exposed one is in the client's journal, released
by the client (release, its lease, its cleanup at start-up), and by this node's
``lease_s`` at the latest.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from ..agent.service import release_after_grace
from ..channel.protocol import Channel, Spec
from ..channel.server import Service
from ..kinds import DuplicateKind
from .node import StorageNode, WireDuplicate, session_of

log = logging.getLogger(__name__)

_DUP = {"duplicate": dict}
SPECS = {
    "ping": Spec(),
    "duplicate": Spec(required={"lun": str, "name": str}, optional={"kind": str}),
    "expose": Spec(required={**_DUP, "initiator": str, "port": str, "target_iqn": str,
                             "backstore": str, "serial": str, "userid": str, "password": str,
                             "lun": int}),
    "identify": Spec(required={"target_iqn": str, "lun": int}),
    "health": Spec(required=_DUP),
    "unexpose": Spec(required={"target_iqn": str, "backstore": str}),
    "discard": Spec(required=_DUP),
    "discard_partial": Spec(required=_DUP),
    "cleanup": Spec(),
}


class StorageService(Service):
    """The storage node's ops for one authenticated client over one connection."""

    name = "storage"
    specs = SPECS

    def __init__(self, node: StorageNode, client: str, *,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        node.config.client(client)  # AuthError now, before any request
        self.node = node
        self.client = client
        self.sleep = sleep
        self.conn = node.connect()
        #: session ids of the duplicates this connection made and has not discarded
        self.open: list[str] = []

    def hello_info(self) -> dict[str, Any]:
        return {"host": self.node.host, "client": self.client}

    def handle(self, op: str, fields: dict[str, Any], channel: Channel) -> dict[str, Any]:
        node, client = self.node, self.client
        if op == "ping":
            return {"time": time.time()}
        if op == "duplicate":
            raw = fields.get("kind")
            kind = None if raw is None else DuplicateKind.parse(raw, where="duplicate")
            made, took_ms = node.duplicate(client, fields["lun"], kind, fields["name"],
                                           conn=self.conn)
            self.open.append(session_of(fields["name"]))
            return {"duplicate": made.to_dict(), "took_ms": round(took_ms, 1)}
        if op == "identify":
            return {"identifier": node.identify(client, fields["target_iqn"], fields["lun"])}
        if op == "unexpose":
            return {"removed": node.unexpose(client, fields["target_iqn"], fields["backstore"])}
        if op == "cleanup":
            return {"removed": node.cleanup_client(client)}
        dup = WireDuplicate.parse(fields["duplicate"], op)
        if op == "expose":
            export = node.expose(
                client, dup, initiator=fields["initiator"], port=fields["port"],
                target_iqn=fields["target_iqn"], backstore=fields["backstore"],
                serial=fields["serial"], userid=fields["userid"], password=fields["password"],
                lun=fields["lun"])
            return {"export": {"target_iqn": export.target_iqn, "portal_ip": export.portal_ip,
                               "portal_port": export.portal_port, "lun": export.lun,
                               "identifier": export.identifier, "serial": export.serial}}
        if op == "health":
            return {"health": node.health(client, dup)}
        if op == "discard":
            removed = node.discard(client, dup)
            self._forget_released()
            return {"removed": removed}
        # discard_partial
        return {"removed": node.discard_partial(client, dup)}

    def _forget_released(self) -> None:
        # a discarded duplicate's record is gone: this connection no longer holds it
        self.open = [sid for sid in self.open if self.node.owner(sid) is not None]

    def closed(self, clean: bool) -> None:
        """Release what the connection left open, after the grace period."""
        self.node.disconnect(self.conn)
        # an exposed duplicate is the client's to release (its journal, its lease, its
        # cleanup at start-up; this node's lease as the backstop)
        still = [sid for sid in self.open
                 if self.node.owner(sid) is not None and not self.node.exposed(sid)]
        release_after_grace(still, self.node.release, grace_s=self.node.config.grace_s,
                            sleep=self.sleep, who=f"client {self.client}", clean=clean)
