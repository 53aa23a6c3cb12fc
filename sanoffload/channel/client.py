"""The proxy's side of the control channel: connect with OpenSSH, say hello, call ops.

::

    ssh -T -o BatchMode=yes -o ServerAliveInterval=15 -o ServerAliveCountMax=4 \\
        [OPTIONS…] -- fs1 sanoffload agent serve --stdio

On a real deployment sshd replaces the command by the key's forced command
(``command="sanoffload agent serve --stdio --client px1",restrict``); the one
sent here makes a plain key work too. sshd authenticates, OpenSSH encrypts:
sanoffload adds no crypto of its own.
"""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Self

from ..errors import AuthError, CommandError, ProtocolError, SanoffloadError
from ..pipeline import Stage
from ..process import widen_pipe
from ..requirements import Requirement
from ..runner import Runner
from .protocol import SOFTWARE, VERSIONS, Channel, check_reply, raise_error

REQUIRES: tuple[Requirement, ...] = (
    Requirement("ssh", "OpenSSH client", roles=("proxy",), optional_for=("store",),
                fails_without="no control channel to an agent or a store (it is OpenSSH); "
                              "a store without it only restores locally",
                executables=("ssh",)),
)

log = logging.getLogger(__name__)

#: ssh options every connection gets: never prompt, notice a dead link within a minute
SSH_BASE = ("-T", "-o", "BatchMode=yes", "-o", "ServerAliveInterval=15",
            "-o", "ServerAliveCountMax=4", "-o", "ConnectTimeout=20")
#: the longest a connection may stay open (a backup of a big tree)
DEFAULT_CONNECTION_S = 24 * 3600.0


class Connection:
    """A channel plus what must happen when it closes (wait for ssh, collect its error)."""

    def __init__(self, channel: Channel, close: Callable[[], str | None] | None = None,
                 kill: Callable[[], None] | None = None) -> None:
        self.channel = channel
        self._close = close
        self._kill = kill
        self.closed = False

    def kill(self) -> None:
        """End the transport now (from another thread: a reply that must not be waited for
        longer); the reader then sees the end of the stream."""
        if self._kill is not None:
            self._kill()
        else:
            self.channel.close()

    def close(self) -> str | None:
        """Hang up; returns the transport's complaint (ssh's last stderr line) if any."""
        if self.closed:
            return None
        self.closed = True
        self.channel.close()
        return self._close() if self._close else None


Connector = Callable[[], Connection]


def ssh_argv(dest: str, remote: Sequence[str], options: Sequence[str] = ()) -> list[str]:
    """The ssh command line reaching ``dest`` (``host`` or ``user@host``) to run ``remote``."""
    if not dest or dest.startswith("-") or any(c in dest for c in " \n\0"):
        raise ValueError(f"invalid ssh destination {dest!r}")
    return ["ssh", *SSH_BASE, *options, "--", dest, *remote]


def ssh_connector(runner: Runner, dest: str, remote: Sequence[str], *,
                  options: Sequence[str] = (),
                  timeout: float = DEFAULT_CONNECTION_S) -> Connector:
    """Open connections to ``dest`` through the runner (one ssh process each)."""

    def connect() -> Connection:
        pipe = runner.pipeline([Stage(ssh_argv(dest, remote, options),
                                      ok_codes={255: "connection failed"})],
                               stdin=subprocess.PIPE, timeout=timeout)
        assert pipe.stdin is not None  # stdin=PIPE
        channel = Channel(pipe.stdout, pipe.stdin, peer=dest.rpartition("@")[2])

        def close() -> str | None:
            results = pipe.wait()
            last = results[-1]
            if last.returncode == 0:
                return None
            lines = last.stderr.strip().splitlines()
            return f"ssh {dest} exited {last.returncode}: {lines[-1] if lines else 'no output'}"

        return Connection(channel, close, pipe.kill)

    return connect


def in_process_connector(serve_fn: Callable[[Channel], Any], peer: str = "peer") -> Connector:
    """A connector to a server run in a thread over OS pipes (tests, local stores)."""
    import os
    import threading

    def connect() -> Connection:
        c2s_r, c2s_w = os.pipe()
        s2c_r, s2c_w = os.pipe()
        widen_pipe(c2s_w)  # the data goes this way, 1 MiB chunks at a time
        server = Channel(os.fdopen(c2s_r, "rb"), os.fdopen(s2c_w, "wb"), peer="client")

        def run() -> None:
            try:
                serve_fn(server)
            finally:
                server.close()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        channel = Channel(os.fdopen(s2c_r, "rb"), os.fdopen(c2s_w, "wb"), peer=peer)

        killed = threading.Event()

        def kill() -> None:
            # /dev/null takes the place of the server's write end: the client's reader sees
            # EOF, and a stuck server that wakes up later writes into nothing
            killed.set()
            null = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(null, s2c_w)
            finally:
                os.close(null)

        def close() -> str | None:
            if not killed.is_set():
                thread.join(30)
            return None

        return Connection(channel, close, kill)

    return connect


@dataclass
class Peer:
    """What the other side said in its hello."""

    version: int
    service: str
    software: str
    info: dict[str, Any]


class Client:
    """A connected, greeted peer of one ``service`` kind (``agent`` or ``store``)."""

    service = "service"

    def __init__(self, connector: Connector, *, name: str = "peer") -> None:
        self.name = name
        self.conn = connector()
        self.channel = self.conn.channel
        try:
            self.peer = self._hello()
        except BaseException:
            self.close(quiet=True)
            raise

    def _hello(self) -> Peer:
        try:
            self.channel.send({"op": "hello", "versions": list(VERSIONS), "software": SOFTWARE})
            reply = self.channel.recv()
        except ProtocolError:
            reply = None
        if reply is None:
            complaint = self.conn.close()
            if complaint and "Permission denied" in complaint:
                raise AuthError(f"{self.name}: the ssh key was refused ({complaint})",
                                hint="add this proxy's key to the peer's authorized_keys "
                                     "with the forced command (see README)")
            raise CommandError(f"{self.name}: no answer on the control channel"
                               + (f" ({complaint})" if complaint else ""),
                               hint="is sanoffload installed there and the forced command "
                                    "right? try: sanoffload doctor")
        if reply.get("ok") is not True:
            raise_error(reply, self.name)
        check_reply(reply, {"version": int, "service": str, "software": str})
        if reply["version"] not in VERSIONS:
            raise ProtocolError(f"{self.name} chose protocol version {reply['version']}, "
                                f"which this side does not speak")
        if reply["service"] != self.service:
            raise ProtocolError(f"{self.name} is a sanoffload {reply['service']}, "
                                f"not a {self.service} (check the forced command)")
        info = {k: v for k, v in reply.items()
                if k not in ("ok", "version", "service", "software")}
        log.debug("%s: %s, protocol %d", self.name, reply["software"], reply["version"])
        return Peer(reply["version"], reply["service"], reply["software"], info)

    def call(self, op: str, **fields: Any) -> dict[str, Any]:
        """Send one request and return the successful reply (or raise the peer's error)."""
        self.channel.send({"op": op, **{k: v for k, v in fields.items() if v is not None}})
        return self.reply()

    def reply(self) -> dict[str, Any]:
        try:
            reply = self.channel.expect()
        except ProtocolError as exc:
            complaint = self.conn.close()
            raise ProtocolError(f"{self.name}: {exc}"
                                + (f" ({complaint})" if complaint else "")) from None
        if reply.get("ok") is not True:
            raise_error(reply, self.name)
        return reply

    def close(self, *, quiet: bool = False) -> None:
        try:
            complaint = self.conn.close()
        except SanoffloadError:
            if not quiet:
                raise
            return
        if complaint and not quiet:
            log.warning("%s", complaint)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close(quiet=exc[0] is not None)
