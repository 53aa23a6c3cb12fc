"""The agent's side of the control channel (AgentService), with a fake Agent: no LVM, no LIO.

The fake stands in for :class:`sanoffload.agent.session.Agent`: its config
knows clients px1 and px2, prepare hands out session ids, and every call is
recorded. The grace period's sleep is injected and records its duration.
End-to-end tests run the serve loop in a thread (in_process_connector) and
talk to it with the proxy's AgentClient.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from sanoffload.agent.service import AgentService
from sanoffload.agent.session import DUPLICATE_KINDS
from sanoffload.channel.client import in_process_connector
from sanoffload.channel.messages import PrepareAnswer
from sanoffload.channel.server import serve
from sanoffload.errors import (
    AuthError,
    CleanupError,
    CommandError,
    Interrupted,
    ProtocolError,
    UsageError,
)
from sanoffload.kinds import DuplicateKind
from sanoffload.proxy.peers import AgentClient

from .test_messages import sample_answer

pytestmark = pytest.mark.unit

PX1 = "iqn.2026-11.org.sanoffload.lab:px1"
GRACE = 10.0


class FakeConfig:
    def __init__(self, clients: tuple[str, ...] = ("px1", "px2"), grace_s: float = GRACE) -> None:
        self.clients = clients
        self.grace_s = grace_s

    def client(self, name: str) -> SimpleNamespace:
        if name not in self.clients:
            raise AuthError(f"client {name!r} is not in the agent config")
        return SimpleNamespace(name=name)


class FakeAgent:
    """Records calls; ``owners`` maps a session id to its client; ``fail[sid]`` makes
    release(sid) raise."""

    host = "fs1"

    def __init__(self, config: FakeConfig | None = None) -> None:
        self.config = config or FakeConfig()
        self.closed = 0
        self.owners: dict[str, str] = {}
        self.calls: list[tuple[Any, ...]] = []
        self.fail: dict[str, BaseException] = {}
        self.lock = threading.Lock()
        self._n = 0

    def close(self) -> None:
        """Hangs up on storage nodes (none here)."""
        self.closed += 1

    def prepare(self, path: str, initiator: str, *, kind: str | None = None,
                client: str | None = None) -> PrepareAnswer:
        with self.lock:
            self.calls.append(("prepare", path, initiator, kind, client))
            self._n += 1
            sid = f"fs1-{self._n:08x}"
            assert client is not None
            self.owners[sid] = client
        return sample_answer(session_id=sid, identifier=f"naa.6001405{self._n:09x}",
                             target_iqn=f"iqn.2026-11.org.sanoffload:{sid}", lun=0,
                             duplicate_kind=kind or "snapshot")

    def owner(self, session_id: str) -> str | None:
        return self.owners.get(session_id)

    def status(self, session_id: str) -> dict[str, Any]:
        self.calls.append(("status", session_id))
        known = session_id in self.owners
        return {"session_id": session_id, "status": "healthy" if known else "unknown"}

    def release(self, session_id: str) -> list[str]:
        with self.lock:
            self.calls.append(("release", session_id))
            if session_id in self.fail:
                raise self.fail[session_id]
            if self.owners.pop(session_id, None) is None:
                return []
            return [f"lio-target iqn.2026-11.org.sanoffload:{session_id}"]

    def released(self) -> list[str]:
        return [c[1] for c in self.calls if c[0] == "release"]


@pytest.fixture(autouse=True)
def keep_sighup() -> Iterator[None]:
    """closed() in the main thread ignores SIGHUP: put the test process's handler back."""
    before = signal.getsignal(signal.SIGHUP)
    yield
    signal.signal(signal.SIGHUP, before)


@pytest.fixture
def agent() -> FakeAgent:
    return FakeAgent()


class Sleeps(list):  # type: ignore[type-arg]
    """An injected sleep: records each duration (and SIGHUP's disposition at the time)."""

    def __init__(self) -> None:
        super().__init__()
        self.sighup: list[Any] = []

    def __call__(self, seconds: float) -> None:
        self.sighup.append(signal.getsignal(signal.SIGHUP))
        self.append(seconds)


def service(agent: FakeAgent, client: str = "px1") -> tuple[AgentService, Sleeps]:
    sleeps = Sleeps()
    return AgentService(agent, client, sleep=sleeps), sleeps  # type: ignore[arg-type]


def prepare(svc: AgentService, path: str = "/srv/data", kind: str | None = None) -> str:
    reply = svc.handle("prepare", {"path": path, "initiator": PX1, "kind": kind},
                       None)  # type: ignore[arg-type]
    return str(reply["session"]["session_id"])


# -- construction and ops ----------------------------------------------------------
def test_an_unknown_client_is_refused_at_construction(agent: FakeAgent) -> None:
    with pytest.raises(AuthError, match="'nope' is not in the agent config"):
        AgentService(agent, "nope")  # type: ignore[arg-type]
    assert agent.calls == []


def test_prepare_is_for_the_forced_commands_client(agent: FakeAgent) -> None:
    svc, _ = service(agent, "px2")
    reply = svc.handle("prepare", {"path": "/srv/data", "initiator": PX1},
                       None)  # type: ignore[arg-type]
    assert reply["session"]["session_id"] == "fs1-00000001"
    assert agent.calls == [("prepare", "/srv/data", PX1, None, "px2")]
    assert svc.open == ["fs1-00000001"]


@pytest.mark.parametrize("kind", DUPLICATE_KINDS)
def test_prepare_passes_a_known_kind(agent: FakeAgent, kind: str) -> None:
    svc, _ = service(agent)
    prepare(svc, kind=kind)
    assert agent.calls == [("prepare", "/srv/data", PX1, kind, "px1")]


@pytest.mark.parametrize("kind", ["bogus", "", "Snapshot"])
def test_prepare_refuses_an_unknown_kind_without_preparing(agent: FakeAgent, kind: str) -> None:
    svc, _ = service(agent)
    with pytest.raises(UsageError, match=f"unknown duplicate kind {kind!r}"):
        prepare(svc, kind=kind)
    assert agent.calls == []
    assert svc.open == []


def test_hello_info_names_the_host_and_the_client(agent: FakeAgent) -> None:
    svc, _ = service(agent, "px2")
    assert svc.hello_info() == {"host": "fs1", "client": "px2"}


@pytest.mark.parametrize("op", ["status", "release"])
def test_another_clients_session_is_refused(agent: FakeAgent, op: str) -> None:
    agent.owners["fs1-0000beef"] = "px2"
    svc, _ = service(agent, "px1")
    with pytest.raises(AuthError, match="fs1-0000beef belongs to another client"):
        svc.handle(op, {"session_id": "fs1-0000beef"}, None)  # type: ignore[arg-type]
    assert agent.calls == []
    assert agent.owners == {"fs1-0000beef": "px2"}


def test_an_unknown_session_goes_through(agent: FakeAgent) -> None:
    svc, _ = service(agent)
    status = svc.handle("status", {"session_id": "fs1-00000bad"}, None)  # type: ignore[arg-type]
    assert status == {"session_id": "fs1-00000bad", "status": "unknown"}
    # release is idempotent: releasing what is gone already is not an error
    assert svc.handle("release", {"session_id": "fs1-00000bad"},
                      None) == {"released": []}  # type: ignore[arg-type]
    assert agent.calls == [("status", "fs1-00000bad"), ("release", "fs1-00000bad")]


def test_own_session_status_and_release(agent: FakeAgent) -> None:
    svc, _ = service(agent)
    sid = prepare(svc)
    assert svc.handle("status", {"session_id": sid},
                      None)["status"] == "healthy"  # type: ignore[arg-type]
    reply = svc.handle("release", {"session_id": sid}, None)  # type: ignore[arg-type]
    assert reply == {"released": [f"lio-target iqn.2026-11.org.sanoffload:{sid}"]}
    assert svc.open == []


def test_ping_answers_the_time(agent: FakeAgent) -> None:
    svc, _ = service(agent)
    t = svc.handle("ping", {}, None)["time"]  # type: ignore[arg-type]
    assert isinstance(t, float) and t > 1.7e9


# -- closed(): what the connection left open ---------------------------------------
def test_closed_releases_open_sessions_after_the_grace_period(agent: FakeAgent) -> None:
    svc, sleeps = service(agent)
    a, b, c = prepare(svc), prepare(svc), prepare(svc)
    svc.handle("release", {"session_id": b}, None)  # type: ignore[arg-type]
    svc.closed(clean=False)
    assert sleeps == [GRACE]
    assert agent.released() == [b, a, c]  # b once only: it was released already
    assert svc.open == []
    assert agent.owners == {}


def test_closed_ignores_sighup_during_the_grace_period(agent: FakeAgent) -> None:
    svc, sleeps = service(agent)
    prepare(svc)
    svc.closed(clean=True)
    assert sleeps.sighup == [signal.SIG_IGN]


def test_closed_without_open_sessions_does_not_sleep(agent: FakeAgent) -> None:
    svc, sleeps = service(agent)
    sid = prepare(svc)
    svc.handle("release", {"session_id": sid}, None)  # type: ignore[arg-type]
    svc.closed(clean=True)
    assert sleeps == []
    assert agent.released() == [sid]


def test_closed_uses_the_configured_grace(agent: FakeAgent) -> None:
    agent.config.grace_s = 0.25
    svc, sleeps = service(agent)
    prepare(svc)
    svc.closed(clean=True)
    assert sleeps == [0.25]


def test_a_stop_signal_during_the_grace_releases_at_once(agent: FakeAgent) -> None:
    def interrupted(seconds: float) -> None:
        raise Interrupted(signal.SIGTERM)

    svc = AgentService(agent, "px1", sleep=interrupted)  # type: ignore[arg-type]
    sid = prepare(svc)
    svc.closed(clean=False)
    assert agent.released() == [sid]


def test_one_failing_release_does_not_stop_the_others(agent: FakeAgent) -> None:
    svc, sleeps = service(agent)
    a, b, c = prepare(svc), prepare(svc), prepare(svc)
    agent.fail[b] = CommandError("targetcli exited 1")
    with pytest.raises(CleanupError) as info:
        svc.closed(clean=False)
    assert agent.released() == [a, b, c]
    assert "release after the connection ended: 1 step(s) failed" in info.value.message
    assert "targetcli exited 1" in info.value.message
    assert [type(e) for e in info.value.errors] == [CommandError]
    assert svc.open == [b]  # still open: nothing pretends it is gone
    assert sleeps == [GRACE]


# -- end to end: the proxy's AgentClient over the serve loop -----------------------
class Served:
    def __init__(self, agent: FakeAgent, client: str = "px1") -> None:
        self.agent = agent
        self.service, self.sleeps = service(agent, client)
        self.codes: list[int] = []
        self.thread_errors: list[BaseException] = []

        def run(ch: Any) -> None:
            try:
                self.codes.append(serve(self.service, ch))
            except BaseException as exc:  # checked by the tests
                self.thread_errors.append(exc)

        self.connector = in_process_connector(run, peer="fs1")

    def client(self) -> AgentClient:
        return AgentClient(self.connector, name="fs1")


def test_hello_carries_host_and_client(agent: FakeAgent) -> None:
    served = Served(agent, "px2")
    with served.client() as client:
        assert client.peer.service == "agent"
        assert client.peer.info == {"host": "fs1", "client": "px2"}
        assert client.host == "fs1"
        assert client.ping() > 0
    assert served.codes == [0]


def test_a_refused_client_never_gets_a_session() -> None:
    with pytest.raises(AuthError):
        Served(FakeAgent(FakeConfig(clients=("px2",))), "px1")


def test_prepare_status_release_round_trip(agent: FakeAgent) -> None:
    served = Served(agent)
    with served.client() as client:
        session = client.prepare("/srv/data", PX1, kind=DuplicateKind.THIN_SNAPSHOT)
        sid = session.session_id
        assert session.duplicate_kind is DuplicateKind.THIN_SNAPSHOT
        assert client.status(sid) == "healthy"
        assert client.release(sid) == [f"lio-target iqn.2026-11.org.sanoffload:{sid}"]
        assert client.status(sid) == "unknown"
    assert agent.calls == [("prepare", "/srv/data", PX1, "thin-snapshot", "px1"),
                           ("status", sid), ("release", sid), ("status", sid)]
    assert served.sleeps == []  # nothing was left open
    assert served.codes == [0] and served.thread_errors == []


def test_errors_reach_the_proxy_and_the_connection_goes_on(agent: FakeAgent) -> None:
    agent.owners["fs1-0000beef"] = "px2"
    served = Served(agent)
    with served.client() as client:
        with pytest.raises(AuthError, match="fs1: session fs1-0000beef belongs to another"):
            client.release("fs1-0000beef")
        with pytest.raises(UsageError, match="unknown duplicate kind 'bogus'"):
            # the typed client cannot send it: say it on the wire, as another program could
            client.call("prepare", path="/srv/data", initiator=PX1, kind="bogus")
        with pytest.raises(ProtocolError, match="prepare: missing field 'initiator'"):
            client.call("prepare", path="/srv/data")
        with pytest.raises(ProtocolError, match="status: unknown field"):
            client.call("status", session_id="fs1-0000beef", client="px2")
        assert client.ping() > 0
    assert agent.calls == []
    assert agent.owners == {"fs1-0000beef": "px2"}


def test_a_dropped_connection_releases_its_session(agent: FakeAgent) -> None:
    served = Served(agent)
    client = served.client()
    kept = client.prepare("/srv/data", PX1).session_id
    done = client.prepare("/srv/other", PX1).session_id
    client.release(done)
    client.close()  # no release of `kept`: the proxy died, or lost its link
    # close() waits for the server thread, which slept the grace, then released
    assert served.sleeps == [GRACE]
    assert agent.released() == [done, kept]
    assert agent.owners == {}
    assert served.codes == [0] and served.thread_errors == []


def test_a_broken_connection_releases_its_session(agent: FakeAgent) -> None:
    served = Served(agent)
    client = served.client()
    sid = client.prepare("/srv/data", PX1).session_id
    client.channel.wfile.write(b"\x00garbage\n")
    client.channel.wfile.flush()
    with pytest.raises(ProtocolError, match="malformed JSON"):
        client.reply()
    client.close()
    assert served.codes == [11]
    assert agent.released() == [sid]
    assert served.sleeps == [GRACE]


def test_one_connections_drop_leaves_another_connections_session(agent: FakeAgent) -> None:
    first, second = Served(agent), Served(agent)
    c1, c2 = first.client(), second.client()
    s1 = c1.prepare("/srv/data", PX1).session_id
    s2 = c2.prepare("/srv/other", PX1).session_id
    c1.close()
    assert agent.released() == [s1]
    assert c2.status(s2) == "healthy"
    c2.release(s2)
    c2.close()
    assert agent.released() == [s1, s2]
    assert second.sleeps == []


@pytest.mark.hostile("agent", "prepare's 'also' with a number in it, or eight extra paths",
                     "protocol error (11) before anything is resolved or frozen")
@pytest.mark.parametrize("also", [["/srv/log", 5], [f"/srv/p{i}" for i in range(8)]])
def test_prepare_refuses_a_malformed_also_without_preparing(agent: FakeAgent,
                                                            also: list[object]) -> None:
    svc, _ = service(agent)
    with pytest.raises(ProtocolError, match="'also' must be a list of at most 7 paths"):
        svc.handle("prepare", {"path": "/srv/data", "initiator": PX1, "also": also},
                   None)  # type: ignore[arg-type]
    assert agent.calls == [] and svc.open == []
