"""SAN mode: the storage controller of a separate storage node, reached over the control channel.

The first server's disk is a LUN of a storage node (claims 5, 8, 18). The
agent freezes the filesystem here and asks the node, by the LUN's identifier,
for a duplicate; then it asks the node to expose the duplicate on the port ID
the proxy reaches. The proxy reads the duplicate from the node: this host
carries no backup I/O. Each op is one request of the wire in
:mod:`sanoffload.storage.service`, over::

    ssh -T -o BatchMode=yes … [-i IDENTITY -o IdentitiesOnly=yes] -- root@st1 \\
        sanoffload storage serve --stdio

(the node's authorized_keys forces ``--client NAME``).

Every request has a deadline (``storage_nodes.NAME.timeout_s``): a node that
does not answer in time has its connection killed and the request fails with
:class:`DeadlineError`, so a frozen filesystem waits for the node no longer
than that (and the freeze guard thaws at ``freeze_deadline_s`` regardless).
Every reply is checked before it is used.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable
from ipaddress import ip_address
from typing import Any

from ..channel.client import Client, Connector, ssh_connector
from ..channel.messages import check_identifier
from ..channel.protocol import check_reply
from ..errors import (
    CommandError,
    DeadlineError,
    ProtocolError,
    RefusedError,
    SanoffloadError,
)
from ..kinds import DuplicateKind, WhoFreezes
from ..runner import Runner
from ..text import printable
from ..tools import lio
from .config import StorageNodeRef
from .controller import Accounted, Duplicate, DuplicatePlan, Health, Immediate, Orphan
from .resolve import BackupObject

log = logging.getLogger(__name__)

#: what the node's forced command replaces (a plain key needs ``--client`` added there)
REMOTE_COMMAND = ("sanoffload", "storage", "serve", "--stdio")
#: LVM's names: what a duplicate's vg, name and origin may be
_LVM_NAME_RE = re.compile(r"[A-Za-z0-9+_.][A-Za-z0-9+_.-]{0,127}")
_HEALTH = ("healthy", "invalid", "missing")


class StorageClient(Client):
    """A greeted connection to a storage node's ``storage serve``."""

    service = "storage"


def _shown(value: object) -> str:
    text = printable(repr(value))
    return text if len(text) <= 80 else text[:80] + "…"


class RemoteController:
    """:class:`~sanoffload.agent.controller.StorageController` of a storage node.

    One connection, opened at the first request and kept: the node releases
    what a connection made and never exposed once the connection ends, so a
    duplicate the agent dies holding does not outlive it for long.
    """

    def __init__(self, node: StorageNodeRef, connector: Connector) -> None:
        self.node = node
        self._connector = connector
        self._client: StorageClient | None = None
        self._lock = threading.Lock()

    @classmethod
    def over_ssh(cls, runner: Runner, node: StorageNodeRef) -> RemoteController:
        return cls(node, ssh_connector(runner, node.ssh, REMOTE_COMMAND,
                                       options=node.ssh_options()))

    @property
    def name(self) -> str:
        return f"storage node {self.node.name}"

    # -- the channel -----------------------------------------------------------
    def _call(self, op: str, **fields: Any) -> dict[str, Any]:
        """One request with the node's deadline; a dead or late connection is dropped (the
        next request reconnects)."""
        with self._lock:
            timeout = self.node.timeout_s
            expired = threading.Event()
            client = self._client
            if client is None:
                client = StorageClient(self._connector, name=self.name)
                self._client = client

            def kill() -> None:
                expired.set()
                client.conn.kill()

            timer = threading.Timer(timeout, kill)
            timer.daemon = True
            timer.start()
            try:
                return client.call(op, **fields)
            except ProtocolError as exc:
                # the connection is gone or out of step: a new one for the next request
                self._drop()
                if expired.is_set():
                    raise DeadlineError(f"{self.name} did not answer {op} within {timeout:g} s",
                                        hint=f"storage_nodes.{self.node.name}.timeout_s; is "
                                             "'sanoffload storage serve' stuck there?") from None
                if "closed the connection" in exc.message:
                    # not a malformed reply: the node's service (or its host) went away
                    raise CommandError(f"{self.name}: the connection ended during {op} "
                                       f"({exc.message})",
                                       hint="see the storage node's log; what it made is "
                                            "released by this session's undo or by "
                                            "'sanoffload storage cleanup' there") from None
                raise
            finally:
                timer.cancel()

    def _drop(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close(quiet=True)

    def close(self) -> None:
        with self._lock:
            self._drop()

    # -- StorageController -----------------------------------------------------
    def who_freezes(self, kind: DuplicateKind) -> WhoFreezes:
        """Always fsfreeze: the node cannot reach this host's page cache or journal, and
        ``sync`` alone does not stop a write between it and the duplicate."""
        return WhoFreezes.FSFREEZE

    def plan_duplicate(self, obj: BackupObject, name: str) -> DuplicatePlan:
        """Nothing to look up here: the node does its lookups inside the one request, which
        is all the frozen window holds."""
        if obj.san is None:
            raise RefusedError(f"{obj.requested_path}: not on a LUN of {self.name}")
        lun = obj.san.identifier
        kind = None if obj.duplicate_kind is None else obj.duplicate_kind.value
        return Immediate(lambda: self._duplicate(lun, kind, name))

    def _duplicate(self, lun: str, kind: str | None, name: str) -> Duplicate:
        reply = self._call("duplicate", lun=lun, kind=kind, name=name)
        made = check_reply(reply, {"duplicate": dict})["duplicate"]
        return self._parse_duplicate(made, "duplicate")

    def _parse_duplicate(self, made: Any, op: str) -> Duplicate:
        if not isinstance(made, dict) or set(made) != {"kind", "vg", "name", "origin"} or \
                not all(isinstance(v, str) and _LVM_NAME_RE.fullmatch(v) for v in made.values()):
            raise ProtocolError(f"{self.name}: {op}: malformed duplicate {_shown(made)}")
        try:
            kind = DuplicateKind.parse(made["kind"], where=op)
        except SanoffloadError:
            raise ProtocolError(f"{self.name}: {op}: unknown duplicate kind "
                                f"{_shown(made['kind'])}") from None
        return Duplicate(kind, made["vg"], made["name"], made["origin"])

    def discard(self, dup: Duplicate) -> None:
        self._call("discard", duplicate=dup.to_dict())

    def discard_partial(self, dup: Duplicate) -> list[str]:
        return self._removed(self._call("discard_partial", duplicate=dup.to_dict()))

    def orphans(self, accounted: Accounted) -> list[Orphan]:
        """The node finds its own (:meth:`sweep`): nothing of it is visible from here."""
        return []

    def remove_orphan(self, orphan: Orphan) -> list[str]:
        return []

    def sweep(self) -> list[str]:
        """The node releases what this client's ended connections left there."""
        return self._removed(self._call("cleanup"))

    def expose(self, dup: Duplicate, spec: lio.ExportSpec) -> lio.Export:
        """Expose on the node's port ``spec.port``; the portal is the node's, not ours."""
        if not spec.port:
            raise RefusedError(f"no port ID to expose on at {self.name}",
                               hint="set san_port for this client in agent.toml")
        reply = self._call("expose", duplicate=dup.to_dict(), initiator=spec.initiator_iqn,
                           port=spec.port, target_iqn=spec.target_iqn, backstore=spec.backstore,
                           serial=spec.serial, userid=spec.chap_user,
                           password=spec.chap_secret, lun=spec.lun)
        got = check_reply(reply, {"export": dict})["export"]
        check_reply(got, {"target_iqn": str, "portal_ip": str, "portal_port": int, "lun": int,
                          "identifier": str, "serial": str})
        # the node must expose what was asked: another target or serial would send the
        # proxy to a disk nobody checked
        if got["target_iqn"] != spec.target_iqn or got["serial"] != spec.serial or \
                got["lun"] != spec.lun:
            raise ProtocolError(f"{self.name}: expose answered {_shown(got['target_iqn'])} "
                                f"lun {_shown(got['lun'])} serial {_shown(got['serial'])}, "
                                f"not what was asked")
        try:
            identifier = check_identifier(got["identifier"])
        except ValueError as exc:
            raise ProtocolError(f"{self.name}: expose: {exc}") from None
        if identifier != lio.naa_from_serial(spec.serial):
            raise ProtocolError(f"{self.name}: expose answered identifier {identifier}, not "
                                f"the one serial {spec.serial} gives")
        port = got["portal_port"]
        if isinstance(port, bool) or not 1 <= port <= 65535:
            raise ProtocolError(f"{self.name}: expose: portal port {_shown(port)}")
        try:
            portal_ip = str(ip_address(got["portal_ip"]))
        except ValueError:
            raise ProtocolError(f"{self.name}: expose: portal {_shown(got['portal_ip'])} is "
                                "not an IP address") from None
        return lio.Export(target_iqn=spec.target_iqn, portal_ip=portal_ip, portal_port=port,
                          lun=spec.lun, serial=spec.serial, identifier=identifier,
                          backstore=spec.backstore)

    def identify(self, target_iqn: str, lun: int = 0) -> str:
        reply = self._call("identify", target_iqn=target_iqn, lun=lun)
        try:
            return check_identifier(check_reply(reply, {"identifier": str})["identifier"])
        except ValueError as exc:
            raise ProtocolError(f"{self.name}: identify: {exc}") from None

    def unexpose(self, target_iqn: str, backstore: str) -> list[str]:
        return self._removed(self._call("unexpose", target_iqn=target_iqn, backstore=backstore))

    def health(self, dup: Duplicate) -> Health:
        got = check_reply(self._call("health", duplicate=dup.to_dict()), {"health": str})
        if got["health"] not in _HEALTH:
            raise ProtocolError(f"{self.name}: health {_shown(got['health'])}")
        health: Health = got["health"]
        return health

    def ping(self) -> float:
        return float(check_reply(self._call("ping"), {"time": (int, float)})["time"])

    def _removed(self, reply: dict[str, Any]) -> list[str]:
        removed = check_reply(reply, {"removed": list})["removed"]
        return [printable(str(r))[:200] for r in removed[:1000]]


RemoteFactory = Callable[[StorageNodeRef], RemoteController]
