"""The control channel's wire format: versioned JSON lines, plus framed data chunks.

A proxy speaks to an agent or a store through a byte stream (OpenSSH's
stdin/stdout; no daemon or crypto of our own). Each message is one line of
JSON holding one object, at most :data:`MAX_LINE` bytes::

    -> {"op": "hello", "versions": [1], "software": "sanoffload 0.1.0"}
    <- {"ok": true, "version": 1, "service": "agent", "host": "fs1", "software": "..."}
    -> {"op": "prepare", "path": "/srv/data", "initiator": "iqn...:px1"}
    <- {"ok": true, "session": {...}}
    <- {"ok": false, "error": {"type": "AuthError", "message": "...", "exit_code": 7}}

Bulk data (an archive going to or coming from a store) follows a request as
chunks: a line ``{"chunk": N}`` then exactly N raw bytes; ``{"chunk": 0}``
ends the data. Nothing is base64-encoded and Python only copies whole chunks.

Every message is checked against its op's spec (:class:`Spec`): unknown ops
and fields, missing fields, wrong types and oversized lines are refused with a
:class:`~sanoffload.errors.ProtocolError` that says which, never a traceback.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import IO, Any, TypeGuard

from .. import __version__, errors as _errors
from ..errors import ProtocolError, SanoffloadError

#: protocol versions this side speaks (hello picks the highest common one)
VERSIONS: tuple[int, ...] = (1,)
#: the longest message line (a list of many backups is the biggest; data goes as chunks)
MAX_LINE = 1 << 20
#: the largest data chunk a peer may announce
MAX_CHUNK = 4 << 20
#: what a sender puts in one chunk
CHUNK = 1 << 20
SOFTWARE = f"sanoffload {__version__}"

_JSON_TYPES = {str: "a string", int: "an integer", float: "a number", bool: "a boolean",
               list: "a list", dict: "an object"}


@dataclass(frozen=True)
class Spec:
    """Fields of one op: name -> accepted type(s); ``optional`` ones may be absent."""

    required: Mapping[str, type | tuple[type, ...]] = field(default_factory=dict)
    optional: Mapping[str, type | tuple[type, ...]] = field(default_factory=dict)


def _type_ok(value: Any, want: type | tuple[type, ...]) -> bool:
    kinds = want if isinstance(want, tuple) else (want,)
    if isinstance(value, bool):  # bool is an int to Python, not to a peer
        return bool in kinds
    if isinstance(value, float) and float in kinds:
        return math.isfinite(value)
    if isinstance(value, int) and float in kinds:
        return True
    return isinstance(value, kinds) and not isinstance(value, bool)


def _is_int(value: object) -> TypeGuard[int]:
    """An integer on the wire (a JSON ``true`` is not one)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _describe(want: type | tuple[type, ...]) -> str:
    kinds = want if isinstance(want, tuple) else (want,)
    return " or ".join(_JSON_TYPES.get(k, k.__name__) for k in kinds)


def check_message(msg: Any, specs: Mapping[str, Spec], *,
                  key: str = "op") -> tuple[str, dict[str, Any]]:
    """``(op, fields)`` of a request, or ProtocolError saying what is wrong with it."""
    if not isinstance(msg, dict):
        raise ProtocolError("a message must be a JSON object")
    op = msg.get(key)
    if not isinstance(op, str):
        raise ProtocolError(f"the message has no {key!r} (a string)")
    spec = specs.get(op)
    if spec is None:
        raise ProtocolError(f"unknown {key} {op!r} (known: {', '.join(sorted(specs))})")
    fields = {k: v for k, v in msg.items() if k != key}
    unknown = sorted(set(fields) - set(spec.required) - set(spec.optional))
    if unknown:
        raise ProtocolError(f"{op}: unknown field(s) {', '.join(map(repr, unknown))}")
    for name in spec.required:
        if name not in fields:
            raise ProtocolError(f"{op}: missing field {name!r}")
    for name, value in fields.items():
        want = spec.required.get(name) or spec.optional[name]
        if value is None and name in spec.optional:
            continue
        if not _type_ok(value, want):
            raise ProtocolError(f"{op}: field {name!r} must be {_describe(want)}")
    return op, fields


def check_reply(reply: Any, required: Mapping[str, type | tuple[type, ...]]) -> dict[str, Any]:
    """A peer's successful reply, checked for the fields the caller uses."""
    if not isinstance(reply, dict):
        raise ProtocolError("the peer's reply is not a JSON object")
    for name, want in required.items():
        if name not in reply or not _type_ok(reply[name], want):
            raise ProtocolError(f"the peer's reply lacks {name!r} ({_describe(want)})")
    return reply


def error_reply(exc: BaseException) -> dict[str, Any]:
    """The wire form of an error (a non-sanoffload exception is named, not traced)."""
    if isinstance(exc, SanoffloadError):
        err: dict[str, Any] = {"type": type(exc).__name__, "message": exc.message,
                               "exit_code": exc.exit_code}
        if exc.hint:
            err["hint"] = exc.hint
    else:
        err = {"type": "InternalError", "message": f"{type(exc).__name__}: {exc}",
               "exit_code": 1}
    return {"ok": False, "error": err}


def _class_for_code(code: Any) -> type[SanoffloadError]:
    """The most general class of errors.py raising exit ``code`` (SanoffloadError if none).

    An error type this side does not know (a newer peer's, or one defined
    outside errors.py) still keeps its exit code and its meaning: a LioError
    is a CommandError here, exit 5, not "a bug".
    """
    if not _type_ok(code, int) or code not in _errors.EXIT_CODES or code in (0, 1):
        return SanoffloadError
    kind = _errors.EXIT_CODES[code][0]
    found = [c for c in vars(_errors).values()
             if isinstance(c, type) and issubclass(c, SanoffloadError)
             and c.exit_code == code and c.kind == kind]
    return min(found, key=lambda c: len(c.__mro__), default=SanoffloadError)


def raise_error(reply: Mapping[str, Any], peer: str) -> None:
    """Raise the sanoffload error a failed reply carries (ProtocolError for a reply without one).

    A type errors.py does not define becomes the class its exit code stands for.
    """
    err = reply.get("error")
    if not isinstance(err, dict) or not isinstance(err.get("message"), str):
        raise ProtocolError(f"{peer} answered a failure without an error message")
    cls = getattr(_errors, str(err.get("type")), None)
    if not (isinstance(cls, type) and issubclass(cls, SanoffloadError)):
        cls = _class_for_code(err.get("exit_code"))
    hint = err.get("hint") if isinstance(err.get("hint"), str) else None
    message = f"{peer}: {err['message']}"
    if issubclass(cls, (_errors.CleanupError, _errors.Interrupted)):
        # their constructors take other things than a message: build the base part only
        exc = cls.__new__(cls)
        SanoffloadError.__init__(exc, message, hint=hint)
        if isinstance(exc, _errors.CleanupError):
            exc.errors = []
        if isinstance(exc, _errors.JournalError):
            exc.paths = []
        if isinstance(exc, _errors.Interrupted):
            exc.signum = 0
        raise exc
    raise cls(message, hint=hint)


class Channel:
    """One end of a connection: messages and chunks over a pair of binary streams."""

    def __init__(self, rfile: IO[bytes], wfile: IO[bytes], *, peer: str = "peer") -> None:
        self.rfile = rfile
        self.wfile = wfile
        self.peer = peer

    # -- messages --------------------------------------------------------------
    def send(self, msg: Mapping[str, Any]) -> None:
        data = json.dumps(msg, separators=(",", ":"), allow_nan=False).encode() + b"\n"
        if len(data) > MAX_LINE:
            raise ProtocolError(f"message to {self.peer} larger than {MAX_LINE} bytes")
        self._write(data)
        self._flush()

    def recv(self) -> dict[str, Any] | None:
        """The next message, or None at a clean end of the stream (before any byte)."""
        line = self.rfile.readline(MAX_LINE + 1)
        if not line:
            return None
        if len(line) > MAX_LINE or not line.endswith(b"\n"):
            if len(line) > MAX_LINE:
                raise ProtocolError(f"message from {self.peer} larger than {MAX_LINE} bytes")
            raise ProtocolError(f"the connection to {self.peer} ended in the middle of a message")
        try:
            msg = json.loads(line)
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise ProtocolError(f"malformed JSON from {self.peer}") from None
        if not isinstance(msg, dict):
            raise ProtocolError(f"a message from {self.peer} is not a JSON object")
        return msg

    def expect(self) -> dict[str, Any]:
        msg = self.recv()
        if msg is None:
            raise ProtocolError(f"{self.peer} closed the connection")
        return msg

    # -- data ------------------------------------------------------------------
    def send_chunk(self, data: bytes | bytearray | memoryview) -> None:
        self._write(b'{"chunk":%d}\n' % len(data))
        if len(data):
            self._write(data)

    def end_chunks(self) -> None:
        self.send_chunk(b"")
        self._flush()

    def recv_chunks(self) -> Iterator[bytes]:
        """Chunks until the end frame; ProtocolError for anything else on the line."""
        while True:
            msg = self.expect()
            size = msg.get("chunk")
            if set(msg) != {"chunk"} or not _is_int(size) or not 0 <= size <= MAX_CHUNK:
                if msg.get("ok") is False:
                    raise_error(msg, self.peer)
                raise ProtocolError(f"{self.peer} sent {json.dumps(msg)[:80]} inside the data; "
                                    f"expected a chunk frame of at most {MAX_CHUNK} bytes")
            if size == 0:
                return
            data = self.rfile.read(size)
            if data is None or len(data) != size:
                raise ProtocolError(f"the connection to {self.peer} ended inside a data chunk")
            yield data

    def _write(self, data: bytes | bytearray | memoryview) -> None:
        try:
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            raise ProtocolError(f"the connection to {self.peer} was lost") from None

    def _flush(self) -> None:
        try:
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            raise ProtocolError(f"the connection to {self.peer} was lost") from None

    def close(self) -> None:
        for f in (self.wfile, self.rfile):
            try:
                f.close()
            except OSError:
                pass


def negotiate(versions: Any) -> int:
    """The version both sides speak (the highest), or ProtocolError."""
    if not isinstance(versions, list) or not all(_is_int(v) for v in versions):
        raise ProtocolError("hello: 'versions' must be a list of integers")
    common = {v for v in versions if _is_int(v)} & set(VERSIONS)
    if not common:
        raise ProtocolError(f"no common protocol version: the client speaks {sorted(versions)}, "
                            f"this side speaks {list(VERSIONS)}")
    return max(common)


HELLO = Spec(required={"versions": list}, optional={"software": str})
