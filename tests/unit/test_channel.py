"""The control channel: message checks, JSON lines and chunk frames, errors, the serve loop.

Channels run over io.BytesIO or os.pipe pairs; the serve loop runs in a thread
behind :func:`sanoffload.channel.client.in_process_connector` with a tiny
service, and malformed input is written as raw bytes to the client's
``channel.wfile``.
"""

from __future__ import annotations

import io
import json
import math
import os
import signal
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import pytest

from sanoffload.channel.client import Client, Connection, Connector, in_process_connector, ssh_argv
from sanoffload.channel.protocol import (
    MAX_CHUNK,
    MAX_LINE,
    VERSIONS,
    Channel,
    Spec,
    check_message,
    check_reply,
    error_reply,
    negotiate,
    raise_error,
)
from sanoffload.channel.server import Service, refuse, serve
from sanoffload.errors import (
    AuthError,
    CleanupError,
    CommandError,
    CompletedWithWarnings,
    IntegrityError,
    Interrupted,
    JournalError,
    LioError,
    MissingDependencyError,
    ProtocolError,
    ResourceError,
    SanoffloadError,
    UsageError,
)

pytestmark = pytest.mark.unit

SPECS = {
    "put": Spec(required={"host": str, "size": int},
                optional={"ratio": float, "meta": dict, "note": str}),
    "ping": Spec(),
}


def reader(data: bytes) -> Channel:
    return Channel(io.BytesIO(data), io.BytesIO(), peer="fs1")


def written(*msgs: dict[str, Any]) -> bytes:
    out = io.BytesIO()
    ch = Channel(io.BytesIO(), out, peer="fs1")
    for m in msgs:
        ch.send(m)
    return out.getvalue()


@pytest.fixture
def pipe_pair() -> Iterator[tuple[Channel, Channel]]:
    """Two channels joined by os.pipe pairs: (a, b), what a sends b receives and back."""
    a_r, b_w = os.pipe()
    b_r, a_w = os.pipe()
    a = Channel(os.fdopen(a_r, "rb"), os.fdopen(a_w, "wb"), peer="b")
    b = Channel(os.fdopen(b_r, "rb"), os.fdopen(b_w, "wb"), peer="a")
    yield a, b
    a.close()
    b.close()


# -- check_message -----------------------------------------------------------------
def test_check_message_returns_the_op_and_the_fields_without_it() -> None:
    op, fields = check_message({"op": "put", "host": "fs1", "size": 3, "note": None}, SPECS)
    assert op == "put"
    assert fields == {"host": "fs1", "size": 3, "note": None}


@pytest.mark.parametrize("msg, problem", [
    ({"op": "get"}, "unknown op 'get' (known: ping, put)"),
    ({"host": "fs1"}, "the message has no 'op'"),
    ({"op": 7}, "the message has no 'op'"),
    ({"op": "put", "host": "fs1", "size": 1, "colour": "red"}, "put: unknown field(s) 'colour'"),
    ({"op": "put", "host": "fs1"}, "put: missing field 'size'"),
    ({"op": "put", "host": "fs1", "size": True}, "put: field 'size' must be an integer"),
    ({"op": "put", "host": "fs1", "size": 1.0}, "put: field 'size' must be an integer"),
    ({"op": "put", "host": "fs1", "size": "1"}, "put: field 'size' must be an integer"),
    ({"op": "put", "host": None, "size": 1}, "put: field 'host' must be a string"),
    ({"op": "put", "host": "fs1", "size": 1, "ratio": math.nan}, "field 'ratio' must be a number"),
    ({"op": "put", "host": "fs1", "size": 1, "ratio": math.inf}, "field 'ratio' must be a number"),
    ({"op": "put", "host": "fs1", "size": 1, "ratio": False}, "field 'ratio' must be a number"),
    ({"op": "put", "host": "fs1", "size": 1, "meta": []}, "field 'meta' must be an object"),
    ([{"op": "ping"}], "must be a JSON object"),
    ("ping", "must be a JSON object"),
    (None, "must be a JSON object"),
])
def test_check_message_refuses_and_names_the_problem(msg: Any, problem: str) -> None:
    with pytest.raises(ProtocolError) as info:
        check_message(msg, SPECS)
    assert problem in info.value.message
    assert info.value.exit_code == 11


def test_check_message_takes_an_integer_for_a_number() -> None:
    _, fields = check_message({"op": "put", "host": "fs1", "size": 0, "ratio": 2}, SPECS)
    assert fields["ratio"] == 2


def test_check_reply_names_the_missing_field() -> None:
    assert check_reply({"ok": True, "time": 1}, {"time": (int, float)})["time"] == 1
    with pytest.raises(ProtocolError, match="lacks 'time'"):
        check_reply({"ok": True, "time": True}, {"time": (int, float)})
    with pytest.raises(ProtocolError, match="not a JSON object"):
        check_reply([1], {})


# -- messages ----------------------------------------------------------------------
def test_messages_round_trip_over_a_pipe(pipe_pair: tuple[Channel, Channel]) -> None:
    a, b = pipe_pair
    msgs: list[dict[str, Any]] = [{"op": "ping"},
                                  {"op": "put", "host": "fs1", "size": 3, "meta": {"ü": [1, 2.5]}}]
    for m in msgs:
        a.send(m)
    assert [b.recv(), b.recv()] == msgs
    b.send({"ok": True})
    assert a.recv() == {"ok": True}
    a.wfile.close()
    assert b.recv() is None  # a clean end: no byte of a next message
    with pytest.raises(ProtocolError, match="a closed the connection"):
        b.expect()


def test_one_message_is_one_line() -> None:
    assert written({"op": "ping", "text": "a\nb"}) == b'{"op":"ping","text":"a\\nb"}\n'


def test_a_line_of_exactly_max_line_bytes_passes_both_ways() -> None:
    pad = MAX_LINE - len(b'{"p":""}\n')
    data = written({"p": "x" * pad})
    assert len(data) == MAX_LINE
    assert reader(data).recv() == {"p": "x" * pad}
    with pytest.raises(ProtocolError, match="larger than"):
        written({"p": "x" * (pad + 1)})


def test_an_oversized_message_is_not_sent_at_all() -> None:
    out = io.BytesIO()
    with pytest.raises(ProtocolError, match=f"message to fs1 larger than {MAX_LINE} bytes"):
        Channel(io.BytesIO(), out, peer="fs1").send({"p": "x" * MAX_LINE})
    assert out.getvalue() == b""


@pytest.mark.parametrize("data, problem", [
    (b"x" * (MAX_LINE + 10) + b"\n", f"message from fs1 larger than {MAX_LINE} bytes"),
    (b'{"op": "ping"' + b" " * MAX_LINE + b"}\n", "larger than"),
    (b"{not json}\n", "malformed JSON from fs1"),
    (b'{"op": "ping"}{"op": "ping"}\n', "malformed JSON"),
    (b"\xff\xfe\n", "malformed JSON"),
    (b'[{"op": "ping"}]\n', "is not a JSON object"),
    (b'"ping"\n', "is not a JSON object"),
    (b"null\n", "is not a JSON object"),
    (b'{"op": "ping"}', "ended in the middle of a message"),
])
def test_broken_lines_are_refused(data: bytes, problem: str) -> None:
    with pytest.raises(ProtocolError) as info:
        reader(data).recv()
    assert problem in info.value.message


def test_deeply_nested_json_is_a_protocol_error_not_a_traceback() -> None:
    with pytest.raises(ProtocolError, match="malformed"):
        reader(b"[" * 200_000 + b"\n").recv()


def test_a_big_send_to_a_closed_peer_is_a_protocol_error() -> None:
    r, w = os.pipe()
    os.close(r)
    ch = Channel(io.BytesIO(), os.fdopen(w, "wb"), peer="fs1")
    with pytest.raises(ProtocolError, match="the connection to fs1 was lost"):
        ch.send({"p": "x" * 100_000})  # bigger than the buffer: the write itself fails
    with pytest.raises(ProtocolError, match="the connection to fs1 was lost"):
        ch.send_chunk(b"x" * 100_000)
    ch.close()


def test_a_small_send_to_a_closed_peer_is_a_protocol_error() -> None:
    r, w = os.pipe()
    os.close(r)
    ch = Channel(io.BytesIO(), os.fdopen(w, "wb"), peer="fs1")
    try:
        with pytest.raises(ProtocolError, match="the connection to fs1 was lost"):
            ch.send({"op": "ping"})  # buffered by the write, fails in the flush
        with pytest.raises(ProtocolError, match="the connection to fs1 was lost"):
            ch.end_chunks()
    finally:
        ch.close()


# -- chunks ------------------------------------------------------------------------
def test_chunks_round_trip_with_the_end_frame() -> None:
    out = io.BytesIO()
    ch = Channel(io.BytesIO(), out)
    ch.send_chunk(b"abc")
    ch.send_chunk(memoryview(b"\n{x}\n"))  # raw bytes, never parsed as lines
    ch.send_chunk(b"")  # an empty chunk IS the end frame
    ch.send({"op": "commit"})
    raw = out.getvalue()
    assert raw == b'{"chunk":3}\nabc{"chunk":5}\n\n{x}\n{"chunk":0}\n{"op":"commit"}\n'
    back = reader(raw)
    assert list(back.recv_chunks()) == [b"abc", b"\n{x}\n"]
    assert back.recv() == {"op": "commit"}  # in step after the data


def test_end_chunks_alone_is_an_empty_stream(pipe_pair: tuple[Channel, Channel]) -> None:
    a, b = pipe_pair
    a.end_chunks()  # flushes: nothing else is needed for the peer to see it
    assert list(b.recv_chunks()) == []


def test_chunks_over_a_pipe(pipe_pair: tuple[Channel, Channel]) -> None:
    a, b = pipe_pair
    data = os.urandom(40_000)
    a.send_chunk(data[:30_000])
    a.send_chunk(data[30_000:])
    a.end_chunks()
    assert b"".join(b.recv_chunks()) == data


@pytest.mark.parametrize("frame", [
    {"chunk": MAX_CHUNK + 1},
    {"chunk": -1},
    {"chunk": True},
    {"chunk": 1.0},
    {"chunk": "3"},
    {"chunk": 3, "more": 1},
    {"op": "commit"},
])
def test_a_bad_chunk_frame_is_refused(frame: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError, match=f"at most {MAX_CHUNK} bytes"):
        list(reader(json.dumps(frame).encode() + b"\nabc").recv_chunks())


def test_a_chunk_of_max_chunk_is_taken() -> None:
    data = b"z" * MAX_CHUNK
    chunks = list(reader(b'{"chunk":%d}\n' % MAX_CHUNK + data + b'{"chunk":0}\n').recv_chunks())
    assert chunks == [data]


@pytest.mark.parametrize("data", [
    b'{"chunk":10}\nabc',  # the data is cut short
    b'{"chunk":10}\n',
])
def test_data_cut_short_is_refused(data: bytes) -> None:
    with pytest.raises(ProtocolError, match="ended inside a data chunk"):
        list(reader(data).recv_chunks())


def test_the_stream_ending_between_chunks_is_refused() -> None:
    with pytest.raises(ProtocolError, match="fs1 closed the connection"):
        list(reader(b'{"chunk":3}\nabc').recv_chunks())


def test_an_error_reply_inside_the_data_raises_the_peers_error() -> None:
    data = b'{"chunk":3}\nabc' + written(error_reply(AuthError("no, not you")))
    ch = reader(data)
    got = []
    with pytest.raises(AuthError, match="fs1: no, not you"):
        for c in ch.recv_chunks():
            got.append(c)
    assert got == [b"abc"]


# -- negotiate ---------------------------------------------------------------------
@pytest.mark.parametrize("versions, chosen", [([1], 1), ([7, 1, 3], 1), ([1, 1], 1)])
def test_negotiate_picks_the_common_version(versions: list[int], chosen: int) -> None:
    assert negotiate(versions) == chosen


@pytest.mark.parametrize("versions", [[2], [], [0, 2, 3]])
def test_negotiate_without_a_common_version(versions: list[int]) -> None:
    with pytest.raises(ProtocolError, match="no common protocol version"):
        negotiate(versions)


@pytest.mark.parametrize("versions", [["1"], [True], [1.0], "1", 1, None, {"1": 1}])
def test_negotiate_refuses_non_integers(versions: Any) -> None:
    with pytest.raises(ProtocolError, match="'versions' must be a list of integers"):
        negotiate(versions)


# -- errors on the wire ------------------------------------------------------------
def test_an_auth_error_comes_back_as_an_auth_error() -> None:
    reply = error_reply(AuthError("client px9 is not allowed", hint="add [clients.px9]"))
    assert reply == {"ok": False, "error": {"type": "AuthError",
                                            "message": "client px9 is not allowed",
                                            "exit_code": 10, "hint": "add [clients.px9]"}}
    reply = json.loads(json.dumps(reply))  # what the peer reads
    with pytest.raises(AuthError) as info:
        raise_error(reply, "fs1")
    assert type(info.value) is AuthError
    assert info.value.exit_code == 10
    assert info.value.message == "fs1: client px9 is not allowed"
    assert info.value.hint == "add [clients.px9]"


def test_errors_with_other_constructors_come_back() -> None:
    cleanup = error_reply(CleanupError([OSError("busy")], context="release"))
    with pytest.raises(CleanupError) as c_info:
        raise_error(cleanup, "fs1")
    assert c_info.value.exit_code == 13
    assert c_info.value.message.startswith("fs1: release: 1 step(s) failed: OSError: busy")
    assert c_info.value.errors == []

    stop = error_reply(Interrupted(signal.SIGTERM))
    with pytest.raises(Interrupted) as i_info:
        raise_error(stop, "fs1")
    assert i_info.value.exit_code == 130
    assert "SIGTERM" in i_info.value.message

    cmd = error_reply(CommandError("lvcreate exited 5", hint="look at the VG"))
    with pytest.raises(CommandError) as e_info:
        raise_error(cmd, "fs1")
    assert (e_info.value.exit_code, e_info.value.hint) == (5, "look at the VG")


@pytest.mark.parametrize("kind", ["FrobError", "InternalError", "Sequence", "annotations",
                                  "Exception", None, 3])
def test_an_unknown_error_type_is_a_plain_sanoffload_error(kind: Any) -> None:
    reply = {"ok": False, "error": {"type": kind, "message": "it broke", "exit_code": 99}}
    with pytest.raises(SanoffloadError) as info:
        raise_error(reply, "bk1")
    assert type(info.value) is SanoffloadError
    assert info.value.exit_code == 1
    assert info.value.message == "bk1: it broke"


@pytest.mark.parametrize("reply", [{"ok": False}, {"ok": False, "error": "nope"},
                                   {"ok": False, "error": {"type": "AuthError"}}])
def test_a_failure_without_a_message_is_a_protocol_error(reply: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError, match="bk1 answered a failure without an error message"):
        raise_error(reply, "bk1")


def test_a_non_sanoffload_exception_is_named_without_a_traceback() -> None:
    lookup: dict[str, str] = {}
    try:
        lookup["secret"]
    except KeyError as exc:
        reply = error_reply(exc)
    assert reply == {"ok": False, "error": {"type": "InternalError",
                                            "message": "KeyError: 'secret'", "exit_code": 1}}


# -- the serve loop ----------------------------------------------------------------
class Echo(Service):
    name = "echo"
    specs: Mapping[str, Spec] = {"ping": Spec(), "echo": Spec(required={"text": str}),
                                 "boom": Spec(), "deny": Spec(), "wait": Spec()}

    def __init__(self) -> None:
        self.closed_with: list[bool] = []
        self.handled: list[str] = []
        self.entered = threading.Event()
        self.release = threading.Event()

    def hello_info(self) -> dict[str, Any]:
        return {"host": "h1"}

    def handle(self, op: str, fields: dict[str, Any],
               channel: Channel) -> dict[str, Any] | None:
        self.handled.append(op)
        if op == "ping":
            return {"pong": True}
        if op == "echo":
            return {"text": fields["text"]}
        if op == "deny":
            raise UsageError("not today")
        if op == "wait":
            self.entered.set()
            self.release.wait(10)
            return {"waited": True}
        raise KeyError("secret")

    def closed(self, clean: bool) -> None:
        self.closed_with.append(clean)


class EchoClient(Client):
    service = "echo"


class Served:
    """A service behind an in-process connector; ``codes`` are serve()'s return values."""

    def __init__(self) -> None:
        self.service = Echo()
        self.codes: list[int] = []
        self.connector: Connector = in_process_connector(
            lambda ch: self.codes.append(serve(self.service, ch)), peer="h1")


@pytest.fixture
def served() -> Served:
    return Served()


def test_hello_then_ops_then_a_clean_end(served: Served) -> None:
    client = EchoClient(served.connector, name="h1")
    assert client.peer.version == max(VERSIONS)
    assert client.peer.service == "echo"
    assert client.peer.software.startswith("sanoffload ")
    assert client.peer.info == {"host": "h1"}
    assert client.call("echo", text="hé") == {"ok": True, "text": "hé"}
    assert client.call("ping") == {"ok": True, "pong": True}
    client.close()
    assert served.codes == [0]
    assert served.service.closed_with == [True]


def test_a_connection_closed_before_the_hello_ends_cleanly(served: Served) -> None:
    conn = served.connector()
    conn.close()
    assert served.codes == [0]
    assert served.service.closed_with == [True]


@pytest.mark.parametrize("hello, problem", [
    ({"op": "hello", "versions": [2]}, "no common protocol version"),
    ({"op": "hello", "versions": ["1"]}, "must be a list of integers"),
    ({"op": "hello"}, "hello: missing field 'versions'"),
    ({"op": "ping"}, "unknown op 'ping' (known: hello)"),
])
def test_a_bad_hello_is_answered_and_ends_the_connection(served: Served, hello: dict[str, Any],
                                                         problem: str) -> None:
    conn = served.connector()
    conn.channel.send(hello)
    reply = conn.channel.recv()
    assert reply is not None and reply["ok"] is False
    assert reply["error"]["type"] == "ProtocolError"
    assert problem in reply["error"]["message"]
    assert conn.channel.recv() is None  # the server hung up
    conn.close()
    assert served.codes == [11]
    assert served.service.handled == []


def test_the_client_raises_the_servers_hello_refusal(served: Served) -> None:
    class OtherService(Client):
        service = "store"

    with pytest.raises(ProtocolError, match="h1 is a sanoffload echo, not a store"):
        OtherService(served.connector, name="h1")


def test_a_bad_request_is_answered_and_the_connection_goes_on(served: Served) -> None:
    client = EchoClient(served.connector, name="h1")
    with pytest.raises(ProtocolError, match="h1: unknown op 'frob'"):
        client.call("frob")
    with pytest.raises(ProtocolError, match="h1: echo: field 'text' must be a string"):
        client.call("echo", text=5)
    with pytest.raises(UsageError, match="h1: not today"):
        client.call("deny")
    assert client.call("ping")["pong"] is True
    client.close()
    assert served.codes == [0]
    assert served.service.handled == ["deny", "ping"]


def test_a_malformed_line_ends_the_connection(served: Served) -> None:
    client = EchoClient(served.connector, name="h1")
    client.channel.wfile.write(b"{this is not json\n")
    client.channel.wfile.flush()
    reply = client.channel.recv()
    assert reply is not None and reply["ok"] is False
    assert "malformed JSON" in reply["error"]["message"]
    assert client.channel.recv() is None
    client.close()
    assert served.codes == [11]
    assert served.service.closed_with == [False]


def test_an_oversized_line_ends_the_connection(served: Served) -> None:
    client = EchoClient(served.connector, name="h1")
    client.channel.wfile.write(b'{"op": "echo", "text": "' + b"x" * MAX_LINE + b'"}\n')
    client.channel.wfile.flush()
    reply = client.channel.recv()
    assert reply is not None and "larger than" in reply["error"]["message"]
    client.close()
    assert served.codes == [11]
    assert served.service.handled == []


def test_a_json_array_line_ends_the_connection(served: Served) -> None:
    client = EchoClient(served.connector, name="h1")
    client.channel.wfile.write(b'[{"op": "ping"}]\n')
    client.channel.wfile.flush()
    with pytest.raises(ProtocolError, match="not a JSON object"):
        client.reply()
    client.close()
    assert served.codes == [11]


def test_a_handler_bug_is_answered_as_internal_error_and_the_connection_goes_on(
        served: Served) -> None:
    client = EchoClient(served.connector, name="h1")
    client.channel.send({"op": "boom"})
    reply = client.channel.recv()
    assert reply == {"ok": False, "error": {"type": "InternalError",
                                            "message": "KeyError: 'secret'", "exit_code": 1}}
    with pytest.raises(SanoffloadError) as info:  # what Client.call makes of it
        client.call("boom")
    assert type(info.value) is SanoffloadError and info.value.exit_code == 1
    assert client.call("echo", text="still here")["text"] == "still here"
    client.close()
    assert served.codes == [0]


def test_refuse_answers_the_hello_with_the_error() -> None:
    codes: list[int] = []
    connector = in_process_connector(
        lambda ch: codes.append(refuse(ch, AuthError("client 'px9' is not in the config"))),
        peer="fs1")
    with pytest.raises(AuthError) as info:
        EchoClient(connector, name="fs1")
    assert info.value.message == "fs1: client 'px9' is not in the config"
    assert info.value.exit_code == 10
    assert codes == [10]


def test_no_answer_to_the_hello_is_a_command_error() -> None:
    def hang_up_after_reading(ch: Channel) -> None:
        ch.recv()  # reads the hello, answers nothing

    connector = in_process_connector(hang_up_after_reading, peer="fs1")
    with pytest.raises(CommandError, match="fs1: no answer on the control channel"):
        EchoClient(connector, name="fs1")


def test_a_peer_gone_before_the_hello_is_a_command_error() -> None:
    gone = threading.Event()

    def hang_up(ch: Channel) -> None:
        ch.close()
        gone.set()

    inner = in_process_connector(hang_up, peer="fs1")

    def connector() -> Connection:
        conn = inner()
        gone.wait(10)  # ssh exited (a refused key, no route) before the hello went out
        return conn

    with pytest.raises(CommandError, match="fs1: no answer on the control channel"):
        EchoClient(connector, name="fs1")


def test_a_peer_gone_while_the_server_answers_ends_serve_with_11() -> None:
    service = Echo()
    outcome: list[Any] = []

    def run(ch: Channel) -> None:
        try:
            outcome.append(serve(service, ch))
        except BaseException as exc:  # what serve() let out
            outcome.append(exc)

    client = EchoClient(in_process_connector(run, peer="h1"), name="h1")
    client.channel.send({"op": "wait"})
    service.entered.wait(10)
    client.channel.rfile.close()  # the proxy went away while the request runs
    service.release.set()
    client.close()
    assert outcome == [11]
    assert service.closed_with == [False]


# -- ssh ---------------------------------------------------------------------------
@pytest.mark.parametrize("dest", ["", "-oProxyCommand=touch /tmp/x", "-p", "fs1 -v",
                                  "fs1\nfs2", "root@fs1\n", "fs\x001"])
def test_ssh_argv_refuses_a_destination_that_is_not_one(dest: str) -> None:
    with pytest.raises(ValueError, match="invalid ssh destination"):
        ssh_argv(dest, ["true"])


def test_ssh_argv_puts_the_destination_after_double_dash() -> None:
    argv = ssh_argv("root@fs1", ["sanoffload", "agent", "serve", "--stdio"],
                    options=["-i", "/etc/sanoffload/key"])
    assert argv[0] == "ssh"
    i = argv.index("--")
    assert argv[i + 1:] == ["root@fs1", "sanoffload", "agent", "serve", "--stdio"]
    assert argv[argv.index("BatchMode=yes") - 1] == "-o"
    assert argv.index("BatchMode=yes") < i
    assert argv[i - 2:i] == ["-i", "/etc/sanoffload/key"]  # options before the destination
    assert "-T" in argv[:i]


# --------------------------------------------------------------------------
# every error keeps its exit code across the channel
# --------------------------------------------------------------------------

@pytest.mark.hostile("channel", "an error class the proxy does not know (LioError, a newer "
                     "peer's), with its exit code", "keeps its exit code and meaning, not 1")
@pytest.mark.parametrize("kind,code,cls", [
    ("LioError", 5, CommandError), ("NewerPeersError", 7, ResourceError),
    ("FrobError", 4, MissingDependencyError), ("BrokenStream", 12, IntegrityError),
    ("FrobError", 13, CleanupError), ("FrobError", 130, Interrupted),
    ("FrobError", 14, CompletedWithWarnings)])
def test_an_unknown_type_keeps_a_known_exit_code(kind: str, code: int,
                                                 cls: type[SanoffloadError]) -> None:
    reply = {"ok": False, "error": {"type": kind, "message": "it broke", "exit_code": code}}
    with pytest.raises(SanoffloadError) as info:
        raise_error(json.loads(json.dumps(reply)), "fs1")
    assert isinstance(info.value, cls)
    assert info.value.exit_code == code
    assert info.value.message == "fs1: it broke"


@pytest.mark.parametrize("code", [0, 99, -5, True, "5", 5.0, None, 2**70])
def test_an_unknown_type_with_a_bad_exit_code_is_a_plain_error(code: Any) -> None:
    reply = {"ok": False, "error": {"type": "FrobError", "message": "it broke",
                                    "exit_code": code}}
    with pytest.raises(SanoffloadError) as info:
        raise_error(reply, "fs1")
    assert type(info.value) is SanoffloadError and info.value.exit_code == 1


def test_lio_error_arrives_as_itself_with_exit_5() -> None:
    reply = json.loads(json.dumps(error_reply(LioError("LIO has no target iqn.x"))))
    assert reply["error"]["exit_code"] == 5
    with pytest.raises(LioError) as info:
        raise_error(reply, "fs1")
    assert info.value.exit_code == 5 and isinstance(info.value, CommandError)


def test_a_journal_error_comes_back_with_its_code() -> None:
    reply = error_reply(JournalError("journal record /x.json is unreadable", paths=["/x.json"]))
    with pytest.raises(JournalError) as info:
        raise_error(json.loads(json.dumps(reply)), "fs1")
    assert info.value.exit_code == 13 and "/x.json" in info.value.message
