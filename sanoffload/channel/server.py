"""The serving side of the control channel (``agent serve --stdio``, ``store serve --stdio``).

Run from a forced command in ``authorized_keys``: sshd has authenticated the
proxy's key and picked the client name; this loop speaks the protocol on
stdin/stdout until the proxy hangs up. A bad message gets an error reply and
the loop goes on; a broken frame (oversized line, bad JSON, data cut off)
ends the connection, because nothing after it can be trusted to line up.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from typing import Any

from ..errors import Interrupted, ProtocolError, SanoffloadError
from .protocol import HELLO, SOFTWARE, Channel, Spec, check_message, error_reply, negotiate

log = logging.getLogger(__name__)


class BrokenStream(SanoffloadError):
    """Raised by a handler whose data stream failed half-way: the reply goes out, then
    the connection closes (the peer may still be sending chunks)."""

    def __init__(self, cause: SanoffloadError) -> None:
        super().__init__(cause.message, hint=cause.hint)
        self.cause = cause


class Service:
    """What a server offers: its name, its ops' specs and their handlers."""

    name = "service"
    specs: Mapping[str, Spec] = {}

    def hello_info(self) -> dict[str, Any]:
        """Extra fields for the hello reply (the host name...)."""
        return {}

    def handle(self, op: str, fields: dict[str, Any],
               channel: Channel) -> dict[str, Any] | None:
        """The reply's fields; None when the handler has answered itself (before data)."""
        raise NotImplementedError

    def closed(self, clean: bool) -> None:
        """The connection ended (``clean``: the peer said nothing more and hung up)."""


def serve(service: Service, channel: Channel) -> int:
    """Speak the protocol until the peer hangs up; returns an exit code for the process."""
    clean = False
    try:
        try:
            first = channel.recv()
            if first is None:
                clean = True
                return 0
            _op, fields = check_message(first, {"hello": HELLO})
            version = negotiate(fields["versions"])
        except ProtocolError as exc:
            log.warning("refused hello: %s", exc)
            _try_send(channel, error_reply(exc))
            return exc.exit_code
        channel.send({"ok": True, "version": version, "service": service.name,
                      "software": SOFTWARE, **service.hello_info()})
        while True:
            try:
                msg = channel.recv()
            except ProtocolError as exc:
                log.warning("connection dropped: %s", exc)
                _try_send(channel, error_reply(exc))
                return exc.exit_code
            if msg is None:
                clean = True
                return 0
            try:
                op, fields = check_message(msg, service.specs)
                reply = service.handle(op, fields, channel)
            except Interrupted:
                raise  # a stop signal ends the connection (closed() releases what it holds)
            except BrokenStream as exc:
                log.warning("%s", exc)
                _try_send(channel, error_reply(exc.cause))
                return exc.cause.exit_code
            except SanoffloadError as exc:
                log.info("request refused: %s", exc)
                _try_send(channel, error_reply(exc))
                continue
            except Exception as exc:  # a bug: the peer gets one line, the log the trace
                log.exception("internal error serving %r", msg.get("op"))
                _try_send(channel, error_reply(exc))
                continue
            if reply is not None:
                channel.send({"ok": True, **reply})
    except ProtocolError as exc:  # the peer went away while we answered
        log.warning("%s", exc)
        return exc.exit_code
    finally:
        service.closed(clean)


def refuse(channel: Channel, exc: SanoffloadError) -> int:
    """Answer the peer's hello with ``exc`` (a server that cannot serve), then hang up."""
    log.warning("refusing the connection: %s", exc)
    try:
        channel.recv()
    except ProtocolError:
        pass
    _try_send(channel, error_reply(exc))
    return exc.exit_code


def _try_send(channel: Channel, msg: Mapping[str, Any]) -> None:
    try:
        channel.send(msg)
    except (ProtocolError, OSError):
        pass


def stdio_channel(peer: str) -> Channel:
    """The process's stdin/stdout as a channel; stdout is taken away from everyone else.

    A stray ``print`` (or a library writing to stdout) would corrupt the
    protocol, so fd 1 is moved aside for the channel and pointed at stderr.
    """
    out_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    rfile = os.fdopen(os.dup(0), "rb", buffering=1 << 16)
    wfile = os.fdopen(out_fd, "wb", buffering=1 << 16)
    return Channel(rfile, wfile, peer=peer)
