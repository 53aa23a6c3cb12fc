"""``doctor --role agent`` in SAN mode: each storage node in agent.toml must answer.

The fake host of test_doctor with an agent.toml under its root; the storage
nodes' controllers are fakes answering ping (or failing as a dead ssh would).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from sanoffload.agent.config import StorageNodeRef
from sanoffload.doctor import run_checks
from sanoffload.errors import CommandError

from ..fixtures.doctor import fakehost as fh

pytestmark = pytest.mark.unit

AGENT_TOML = """
[portal]
address = "10.77.0.11"
{nodes}
[clients.px1]
initiators = ["iqn.2026-11.org.sanoffload.lab:px1"]
roots = ["/srv"]
san_port = "p1"
"""
NODES = '[storage_nodes.st1]\nssh = "root@st1"\n'


class FakeRemote:
    def __init__(self, ref: StorageNodeRef, answers: dict[str, Exception | None],
                 log: list[str]) -> None:
        self.ref = ref
        self.answer = answers.get(ref.name)
        self.log = log

    def ping(self) -> float:
        self.log.append(f"ping {self.ref.ssh}")
        if self.answer is not None:
            raise self.answer
        return 1.0

    def close(self) -> None:
        self.log.append(f"close {self.ref.name}")


def agent_host(tmp_path: Path, toml: str | None,
               answers: dict[str, Exception | None] | None = None) -> tuple[fh.FakeHost, list[str]]:
    host = fh.fake_host(tmp_path)
    if toml is not None:
        etc = tmp_path / "etc/sanoffload"
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "agent.toml").write_text(toml)
        (etc / "agent.toml").chmod(0o644)
    log: list[str] = []
    host.remote = lambda ref: FakeRemote(ref, answers or {}, log)
    return host, log


def check(host: fh.FakeHost) -> tuple[bool, str]:
    found = run_checks("agent", host).check("storage nodes")
    return found.present, found.detail


def test_no_agent_toml_yet_passes_and_says_so(tmp_path: Path) -> None:
    host, log = agent_host(tmp_path, None)
    ok, detail = check(host)
    assert ok and "absent: no storage node to reach" in detail and log == []


def test_co_located_mode_has_no_node_to_reach(tmp_path: Path) -> None:
    host, log = agent_host(tmp_path, AGENT_TOML.format(nodes="").replace('san_port = "p1"\n', ""))
    assert check(host) == (True, "none configured (co-located mode)") and log == []


def test_each_storage_node_is_pinged_and_its_connection_closed(tmp_path: Path) -> None:
    host, log = agent_host(tmp_path, AGENT_TOML.format(nodes=NODES))
    ok, detail = check(host)
    assert ok and detail == "answered: st1 (root@st1)"
    assert log == ["ping root@st1", "close st1"]


@pytest.mark.hostile("agent", "doctor --role agent with a storage node whose ssh key is refused",
                     "a failed check naming the node and the reason (exit 4)")
def test_a_storage_node_that_does_not_answer_fails_the_check(tmp_path: Path) -> None:
    refused = CommandError("storage node st1: the ssh key was refused\x1b[2J")
    host, log = agent_host(tmp_path, AGENT_TOML.format(nodes=NODES), {"st1": refused})
    report = run_checks("agent", host)
    found = report.check("storage nodes")
    assert not found.present and "st1 (root@st1): storage node st1: the ssh key was refused" \
        in found.detail
    assert "\x1b" not in found.detail  # escaped for the terminal
    assert "storage nodes" in report.missing and report.exit_code == 4
    assert log == ["ping root@st1", "close st1"]


def test_an_invalid_agent_toml_fails_the_check(tmp_path: Path) -> None:
    host, _ = agent_host(tmp_path, AGENT_TOML.format(nodes='[storage_nodes.st1]\nssh = "-oX"\n'))
    ok, detail = check(host)
    assert not ok and "storage_nodes.st1.ssh" in detail
