"""``sanoffload agent serve --stdio --client NAME``: the agent's side of the control channel.

Ops (JSON lines, see :mod:`sanoffload.channel.protocol`)::

    {"op": "ping"}                                   -> {"time": 1764151773.2}
    {"op": "prepare", "path": "/srv/data", "initiator": "iqn…:px1", "kind": null,
     "also": ["/srv/log"]}                           -> {"session": {...PrepareAnswer...,
                                                         "warnings": ["post-thaw hook …"]}}

``also`` (optional, at most 7 paths) makes a consistency group: every path frozen
in one window, one LUN each of one target; the answer lists them as ``members``.
    {"op": "status", "session_id": "fs1-1a2b3c4d"}   -> {"status": "healthy", ...}
    {"op": "release", "session_id": "fs1-1a2b3c4d"}  -> {"released": ["lio-target ...", ...]}

``image`` (prepare, optional): an image backup; a thin volume's answer may carry
``delta`` (what changed since its base, see :class:`~sanoffload.channel.messages.Delta`).
``committed`` (release, optional): the backup id the store committed the image backup
as; the session's thin snapshot becomes the volume's base (``sanoffload.agent.bases``).

The client name comes from the forced command sshd ran for the proxy's key,
never from the request: a proxy can only use its own initiators and roots, and
only see and release its own sessions. ``warnings`` lists, one printable line
each, the post-thaw hooks that failed (empty when all went well): the backup is
good, but an application may be left in backup mode, and the proxy records it.
A session lives with its connection:
when the connection ends (cleanly or not, or sshd hangs up with SIGHUP) the
sessions it prepared and did not release are released after ``grace_s``.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from ..channel.messages import MAX_BACKUP_ID_CHARS, MAX_MEMBERS, check_backup_id
from ..channel.protocol import Channel, Spec
from ..channel.server import Service
from ..errors import AuthError, CleanupError, Interrupted, ProtocolError
from ..kinds import DuplicateKind
from .session import Agent

log = logging.getLogger(__name__)

SPECS = {
    "ping": Spec(),
    "prepare": Spec(required={"path": str, "initiator": str},
                    optional={"kind": str, "also": list, "image": bool}),
    "status": Spec(required={"session_id": str}),
    "release": Spec(required={"session_id": str}, optional={"committed": str}),
}


def release_after_grace(open_ids: list[str], release: Callable[[str], Sequence[str]], *,
                        grace_s: float, sleep: Callable[[float], None], who: str,
                        clean: bool) -> None:
    """Release what a connection left open, ``grace_s`` after it ended.

    The agent's and a storage node's: SIGHUP ignored
    (the peer's sshd hanging up must not stop it), a stop signal releases at
    once, one failure does not stop the others, all are reported together.
    """
    if not open_ids:
        return
    log.warning("connection of %s ended %s with %d object(s) open; releasing them in %.0f s",
                who, "cleanly" if clean else "abruptly", len(open_ids), grace_s)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        sleep(grace_s)
    except Interrupted as exc:  # told to stop: release now rather than never
        log.warning("%s: releasing at once", exc)
    errors: list[BaseException] = []
    for ident in list(open_ids):
        try:
            release(ident)
            open_ids.remove(ident)
            log.info("released %s (its connection ended)", ident)
        except Exception as exc:  # the others must still be released
            errors.append(exc)
    if errors:
        raise CleanupError(errors, context="release after the connection ended")


class AgentService(Service):
    """The agent's ops for one authenticated client over one connection."""

    name = "agent"
    specs = SPECS

    def __init__(self, agent: Agent, client: str, *,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        agent.config.client(client)  # AuthError now, before any request
        self.agent = agent
        self.client = client
        self.sleep = sleep
        #: sessions this connection prepared and has not released yet
        self.open: list[str] = []

    def hello_info(self) -> dict[str, Any]:
        return {"host": self.agent.host, "client": self.client}

    def _own(self, session_id: str) -> None:
        owner = self.agent.owner(session_id)
        if owner is not None and owner != self.client:
            raise AuthError(f"session {session_id} belongs to another client")

    def handle(self, op: str, fields: dict[str, Any], channel: Channel) -> dict[str, Any]:
        if op == "ping":
            return {"time": time.time()}
        if op == "prepare":
            raw = fields.get("kind")
            # checked here, before anything is looked at: exit 2 like every other edge
            kind = None if raw is None else DuplicateKind.parse(raw, where="prepare")
            also = fields.get("also") or []
            if len(also) > MAX_MEMBERS - 1 or not all(isinstance(p, str) for p in also):
                raise ProtocolError(f"prepare: 'also' must be a list of at most "
                                    f"{MAX_MEMBERS - 1} paths")
            extra: dict[str, Any] = {"also": also} if also else {}
            if fields.get("image"):
                extra["image"] = True
            answer = self.agent.prepare(fields["path"], fields["initiator"], kind=kind,
                                        client=self.client, **extra)
            self.open.append(answer.session_id)
            log.info("client %s: prepared %s for %s", self.client, answer.session_id,
                     fields["path"])
            return {"session": answer.to_wire()}
        session_id = fields["session_id"]
        self._own(session_id)
        if op == "status":
            return self.agent.status(session_id)
        # release
        committed = fields.get("committed")
        if committed is not None:
            # it names the base the next delta is answered against, and goes into a log
            try:
                check_backup_id(committed)
            except ValueError as exc:
                raise ProtocolError(f"release: committed: {str(exc)[:MAX_BACKUP_ID_CHARS]}") \
                    from None
        done = (self.agent.release(session_id, committed=committed) if committed is not None
                else self.agent.release(session_id))
        if session_id in self.open:
            self.open.remove(session_id)
        log.info("client %s: released %s", self.client, session_id)
        return {"released": done}

    def closed(self, clean: bool) -> None:
        """Release what the connection left open, after the grace period."""
        try:
            release_after_grace(self.open, self.agent.release,
                                grace_s=self.agent.config.grace_s, sleep=self.sleep,
                                who=f"client {self.client}", clean=clean)
        finally:
            self.agent.close()  # the storage nodes' connections (SAN mode)
