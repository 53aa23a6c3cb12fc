"""The iscsiadm wrapper and the udev identity match fed with open-iscsi's and udev's
real answers, recorded on the lab's proxy (tests/fixtures/recorded/RELEASE/proxy,
by tests/lab/test_proxy_tools.py with SANOLAB_RECORD=1)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from sanoffload.errors import AuthError
from sanoffload.proxy.devices import check_identifier, device_wwids
from sanoffload.testing import FakeRunner
from sanoffload.tools import iscsiadm

from . import recorded
from .recorded import RECORDED

P = "10.77.0.11:3260"
RELEASES = sorted(p.parent.name for p in RECORDED.glob("*/proxy"))


@pytest.fixture(params=RELEASES, autouse=True)
def release(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test runs on each release's recordings (bookworm: open-iscsi 2.1.8, trixie:
    2.1.11); the target is that recording session's."""
    global T, NODE
    from . import recorded

    monkeypatch.setattr(recorded, "DEFAULT_RELEASE", request.param)
    T = (RECORDED / request.param / "proxy" / "session.out").read_text().split()[3]
    NODE = ["iscsiadm", "-m", "node", "-T", T, "-p", P]
    return str(request.param)


T = ""
NODE: list[str] = []


def rec(name: str) -> str:
    return f"proxy/{name}"


def test_both_releases_are_recorded() -> None:
    assert RELEASES == ["bookworm", "trixie"]


def test_no_session_is_an_empty_list_not_an_error() -> None:
    runner = recorded.feed(FakeRunner(), ["iscsiadm", "-m", "session"], rec("session_none"))
    assert recorded.load(rec("session_none"))[2] == iscsiadm.ISCSI_ERR_NO_OBJS_FOUND
    assert iscsiadm.sessions(runner) == []


def test_the_recorded_session_is_parsed_and_found() -> None:
    runner = recorded.feed(FakeRunner(), ["iscsiadm", "-m", "session"], rec("session"))
    [s] = iscsiadm.sessions(runner)
    sid = int(recorded.load(rec("session"))[0].split()[1].strip("[]"))
    assert (s.target, s.portal, s.tpgt, s.sid, s.flash) == (T, P, 1, sid, False)
    assert sid > 0
    assert iscsiadm.find_session(runner, T, P) == s
    assert iscsiadm.find_session(runner, T + "x", P) is None


def test_the_recorded_discovery_offers_the_target() -> None:
    found = iscsiadm.parse_discovery(recorded.load(rec("discovery"))[0])
    assert [(d.target, d.portal) for d in found] == [(T, P)]


def test_a_second_login_is_tolerated_by_its_named_code() -> None:
    runner = recorded.feed(FakeRunner(), NODE + ["--login"], rec("login_again"))
    res = iscsiadm.login(runner, T, P)
    assert res.returncode == 15 and res.code_name != "error"


def test_a_wrong_chap_secret_is_an_auth_error() -> None:
    runner = recorded.feed(FakeRunner(), NODE + ["--login"], rec("login_badchap"))
    with pytest.raises(AuthError, match="CHAP authorization failure") as exc:
        iscsiadm.login(runner, T, P)
    assert exc.value.exit_code == 10


def test_logout_and_delete_of_what_is_gone_are_idempotent() -> None:
    runner = recorded.feed(FakeRunner(), NODE + ["--logout"], rec("logout_again"))
    recorded.feed(runner, NODE + ["-o", "delete"], rec("node_delete_again"))
    assert iscsiadm.logout(runner, T, P) is False
    assert iscsiadm.delete_node(runner, T, P) is False
    runner = recorded.feed(FakeRunner(), NODE + ["--logout"], rec("logout"))
    recorded.feed(runner, NODE + ["-o", "delete"], rec("node_delete"))
    assert iscsiadm.logout(runner, T, P) is True
    assert iscsiadm.delete_node(runner, T, P) is True


def test_udev_shows_the_agents_identifier_with_its_extension() -> None:
    wwid = (RECORDED / recorded.DEFAULT_RELEASE / "proxy" / "wwid").read_text().strip()
    props = dict(line.split("=", 1) for line in recorded.load(rec("udev_props"))[0].splitlines()
                 if "=" in line)
    disk = SimpleNamespace(properties=props, attributes={"device/wwid": wwid.encode()})
    ident = check_identifier(wwid)
    assert device_wwids(disk) == {ident}
    # ID_WWN alone is too short to tell two LIO disks apart: never matched on
    disk_short = SimpleNamespace(properties={"ID_WWN": props["ID_WWN"]}, attributes={})
    assert device_wwids(disk_short) == set()
