"""sanoffload.tools.iscsiadm: exact command lines, tolerated exit codes, CHAP masking.

The outputs below follow open-iscsi 2.1 (bookworm): they are written by hand
from its messages, not recorded (no initiator on this machine); the lab tests
run the real tool.
"""

from __future__ import annotations

import logging

import pytest

from sanoffload.errors import AuthError, CommandError, CommandTimeoutError
from sanoffload.runner import MASK
from sanoffload.testing import FakeRunner
from sanoffload.tools import iscsiadm
from sanoffload.tools.iscsiadm import Discovered, Session

pytestmark = pytest.mark.unit

T = "iqn.2026-11.org.sanoffload:fs1-0a1b2c3d"
P = "10.77.0.11:3260"
NODE = ["iscsiadm", "-m", "node", "-T", T, "-p", P]
SECRET = "Zq8rT2mV5xK1pL9w"
USER = "sanoffload-fs1-0a1b2c3d"

LOGIN_OK = (f"Logging in to [iface: default, target: {T}, portal: 10.77.0.11,3260]\n"
            f"Login to [iface: default, target: {T}, portal: 10.77.0.11,3260] successful.\n")
LOGIN_EXISTS_ERR = ("iscsiadm: default: 1 session requested, but 1 already present.\n"
                    "iscsiadm: Could not log into all portals\n")
LOGIN_AUTH_ERR = (f"iscsiadm: Could not login to [iface: default, target: {T}, "
                  "portal: 10.77.0.11,3260].\n"
                  "iscsiadm: initiator reported error (24 - iSCSI login failed due to "
                  "authorization failure)\n"
                  "iscsiadm: Could not log into all portals\n")
SESSIONS_ONE = f"tcp: [1] 10.77.0.11:3260,1 {T} (non-flash)\n"
SESSIONS_SEVERAL = (
    f"tcp: [1] 10.77.0.11:3260,1 {T} (non-flash)\n"
    "tcp: [3] 10.77.0.11:3260,1 iqn.2026-11.org.sanoffload:fs1-99887766 (non-flash)\n"
    "tcp: [4] [fd00::11]:3260,2 iqn.2026-11.org.sanoffload:fs2-00000001 (non-flash)\n"
    "iser: [7] 10.77.0.12:3260,1 iqn.2026-11.org.example:old\n")


def node(*rest: str) -> list[str]:
    return [*NODE, *rest]


# --------------------------------------------------------------------------
# command lines
# --------------------------------------------------------------------------

def test_discover_argv_and_parse() -> None:
    out = (f"10.77.0.11:3260,1 {T}\n"
           "10.77.0.11:3260,1 iqn.2026-11.org.sanoffload:fs1-99887766\n")
    runner = FakeRunner().on("iscsiadm", "-m", "discovery", stdout=out)
    found = iscsiadm.discover(runner, P)
    assert runner.argvs() == [["iscsiadm", "-m", "discovery", "-t", "sendtargets", "-p", P,
                               "-o", "nonpersistent"]]
    assert found == [Discovered(P, 1, T),
                     Discovered(P, 1, "iqn.2026-11.org.sanoffload:fs1-99887766")]


def test_discover_nothing_offered_is_21_and_empty() -> None:
    runner = FakeRunner().on("iscsiadm", "-m", "discovery", returncode=21,
                             stderr="iscsiadm: No portals found\n")
    assert iscsiadm.discover(runner, P) == []


def test_discover_unreachable_portal_raises() -> None:
    runner = FakeRunner().on(
        "iscsiadm", "-m", "discovery", returncode=4,
        stderr="iscsiadm: cannot make connection to 10.77.0.11: Connection refused\n"
               "iscsiadm: Could not perform SendTargets discovery: encountered connection "
               "failure\n")
    with pytest.raises(CommandError) as excinfo:
        iscsiadm.discover(runner, P)
    assert excinfo.value.returncode == 4
    assert "connection failure" in str(excinfo.value)


def test_create_node_argv() -> None:
    runner = FakeRunner().on("iscsiadm", stdout="New iSCSI node [...] added\n")
    iscsiadm.create_node(runner, T, P)
    assert runner.argvs() == [node("-o", "new")]


def test_set_chap_argv_passes_the_secret_but_never_logs_it(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="sanoffload")
    runner = FakeRunner().on("iscsiadm")
    iscsiadm.set_chap(runner, T, P, USER, SECRET)
    assert runner.argvs() == [
        node("-o", "update", "-n", "node.session.auth.authmethod", "-v", "CHAP"),
        node("-o", "update", "-n", "node.session.auth.username", "-v", USER),
        node("-o", "update", "-n", "node.session.auth.password", "-v", SECRET),
    ]
    assert SECRET not in caplog.text
    assert f"node.session.auth.password -v {MASK}" in caplog.text
    assert USER in caplog.text  # the user name is not a secret


def test_a_failing_password_update_masks_the_secret_in_the_error() -> None:
    runner = FakeRunner().on("iscsiadm").on(
        *node("-o", "update", "-n", "node.session.auth.password"), returncode=6,
        stderr=f"iscsiadm: could not set node.session.auth.password to {SECRET}\n")
    with pytest.raises(CommandError) as excinfo:
        iscsiadm.set_chap(runner, T, P, USER, SECRET)
    err = excinfo.value
    assert SECRET not in str(err) and SECRET not in err.stderr
    assert SECRET not in " ".join(err.argv)
    assert err.argv[-1] == MASK


def test_set_chap_refuses_empty_credentials() -> None:
    runner = FakeRunner()
    with pytest.raises(ValueError):
        iscsiadm.set_chap(runner, T, P, USER, "")
    assert runner.calls == []


def test_set_replacement_timeout_argv() -> None:
    runner = FakeRunner().on("iscsiadm")
    iscsiadm.set_replacement_timeout(runner, T, P, 15)
    iscsiadm.set_startup_manual(runner, T, P)
    assert runner.argvs() == [
        node("-o", "update", "-n", "node.session.timeo.replacement_timeout", "-v", "15"),
        node("-o", "update", "-n", "node.startup", "-v", "manual"),
    ]
    with pytest.raises(ValueError):
        iscsiadm.set_replacement_timeout(runner, T, P, 0)


def test_update_refuses_a_value_that_would_inject_a_setting() -> None:
    runner = FakeRunner()
    with pytest.raises(ValueError):
        iscsiadm.update(runner, T, P, "node.session.auth.username", "x\nnode.startup = automatic")
    with pytest.raises(ValueError):
        iscsiadm.update(runner, T, P, "--login", "x")
    assert runner.calls == []


@pytest.mark.parametrize("bad", ["-T", "--login", "iqn", "iqn.2026-11.org.x y", ""])
def test_target_names_are_checked_before_anything_runs(bad: str) -> None:
    runner = FakeRunner()
    with pytest.raises(ValueError):
        iscsiadm.login(runner, bad, P)
    assert runner.calls == []


@pytest.mark.parametrize("bad", ["10.77.0.11", "-p", "10.77.0.11:0", "10.77.0.11:70000",
                                 "fd00::11:3260"])
def test_portals_are_checked(bad: str) -> None:
    with pytest.raises(ValueError):
        iscsiadm.check_portal(bad)


def test_portal_forms_accepted() -> None:
    for good in (P, "[fd00::11]:3260", "st1.lab:3260"):
        assert iscsiadm.check_portal(good) == good


# --------------------------------------------------------------------------
# login / logout / delete
# --------------------------------------------------------------------------

def test_login_argv_and_timeout() -> None:
    runner = FakeRunner().on("iscsiadm", stdout=LOGIN_OK)
    res = iscsiadm.login(runner, T, P)
    assert runner.argvs() == [node("--login")]
    assert runner.calls[0].timeout == iscsiadm.LOGIN_TIMEOUT
    assert res.code_name == "ok"


def test_login_tolerates_15_session_exists() -> None:
    runner = FakeRunner().on("iscsiadm", returncode=15, stderr=LOGIN_EXISTS_ERR)
    res = iscsiadm.login(runner, T, P)
    assert res.returncode == 15 and res.code_name == "session-exists"


def test_login_refused_for_chap_is_auth_error() -> None:
    runner = FakeRunner().on("iscsiadm", returncode=24, stdout=LOGIN_OK.splitlines()[0],
                             stderr=LOGIN_AUTH_ERR)
    with pytest.raises(AuthError) as excinfo:
        iscsiadm.login(runner, T, P)
    assert excinfo.value.exit_code == 10
    assert "CHAP authorization failure" in str(excinfo.value)
    assert isinstance(excinfo.value.__cause__, CommandError)


def test_login_auth_failure_recognised_by_message_alone() -> None:
    # an older iscsiadm may report it as a non-retryable login failure (19)
    err = "iscsiadm: initiator reported error (19 - authorization failure)\n"
    runner = FakeRunner().on("iscsiadm", returncode=19, stderr=err)
    with pytest.raises(AuthError):
        iscsiadm.login(runner, T, P)


def test_login_other_failures_stay_command_errors() -> None:
    runner = FakeRunner().on("iscsiadm", returncode=8,
                             stderr="iscsiadm: initiator reported error (8 - connection timed "
                                    "out)\n")
    with pytest.raises(CommandError) as excinfo:
        iscsiadm.login(runner, T, P)
    assert not isinstance(excinfo.value, AuthError)
    assert excinfo.value.returncode == 8


def test_login_killed_by_its_timeout() -> None:
    runner = FakeRunner().on("iscsiadm", timeout=True)
    with pytest.raises(CommandTimeoutError):
        iscsiadm.login(runner, T, P)


def test_logout_argv_and_21_tolerated() -> None:
    runner = FakeRunner().on("iscsiadm", stdout="Logout of [sid: 1, ...] successful.\n")
    assert iscsiadm.logout(runner, T, P) is True
    assert runner.argvs() == [node("--logout")]
    runner = FakeRunner().on("iscsiadm", returncode=21,
                             stderr="iscsiadm: No matching sessions found\n")
    assert iscsiadm.logout(runner, T, P) is False


def test_logout_other_failure_raises() -> None:
    runner = FakeRunner().on("iscsiadm", returncode=10, stderr="iscsiadm: Could not logout\n")
    with pytest.raises(CommandError):
        iscsiadm.logout(runner, T, P)


def test_delete_node_argv_and_21_tolerated() -> None:
    runner = FakeRunner().on("iscsiadm")
    assert iscsiadm.delete_node(runner, T, P) is True
    assert runner.argvs() == [node("-o", "delete")]
    runner = FakeRunner().on("iscsiadm", returncode=21, stderr="iscsiadm: No records found\n")
    assert iscsiadm.delete_node(runner, T, P) is False


def test_delete_node_in_use_raises() -> None:
    runner = FakeRunner().on("iscsiadm", returncode=6, stderr=(
        f"iscsiadm: This command will remove the record [iface: default, target: {T}, "
        "portal: 10.77.0.11,3260], but a session is using it. Logout session then rerun "
        "command to remove record.\n"))
    with pytest.raises(CommandError):
        iscsiadm.delete_node(runner, T, P)


def test_rescan_argv_both_forms() -> None:
    runner = FakeRunner().on("iscsiadm")
    iscsiadm.rescan(runner, T, P)
    iscsiadm.rescan(runner, sid=3)
    assert runner.argvs() == [node("--rescan"),
                              ["iscsiadm", "-m", "session", "-r", "3", "--rescan"]]
    with pytest.raises(ValueError):
        iscsiadm.rescan(runner)


# --------------------------------------------------------------------------
# sessions
# --------------------------------------------------------------------------

def test_sessions_none_is_exit_21() -> None:
    runner = FakeRunner().on("iscsiadm", returncode=21, stderr="iscsiadm: No active sessions.\n")
    assert iscsiadm.sessions(runner) == []
    assert runner.argvs() == [["iscsiadm", "-m", "session"]]


def test_sessions_one() -> None:
    runner = FakeRunner().on("iscsiadm", stdout=SESSIONS_ONE)
    assert iscsiadm.sessions(runner) == [Session("tcp", 1, P, 1, T, False)]


def test_sessions_several_ipv6_and_no_flash_suffix() -> None:
    runner = FakeRunner().on("iscsiadm", stdout=SESSIONS_SEVERAL)
    found = iscsiadm.sessions(runner)
    assert [s.sid for s in found] == [1, 3, 4, 7]
    assert found[2] == Session("tcp", 4, "[fd00::11]:3260", 2,
                               "iqn.2026-11.org.sanoffload:fs2-00000001", False)
    assert found[3].transport == "iser" and found[3].target == "iqn.2026-11.org.example:old"


def test_sessions_unexpected_line_is_skipped(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="sanoffload")
    runner = FakeRunner().on("iscsiadm", stdout=f"garbage here\n{SESSIONS_ONE}")
    assert [s.sid for s in iscsiadm.sessions(runner)] == [1]
    assert "unexpected line" in caplog.text


def test_sessions_other_failure_raises() -> None:
    runner = FakeRunner().on("iscsiadm", returncode=20,
                             stderr="iscsiadm: can not connect to iSCSI daemon (111)!\n")
    with pytest.raises(CommandError):
        iscsiadm.sessions(runner)


def test_find_session_by_target_and_portal() -> None:
    runner = FakeRunner().on("iscsiadm", stdout=SESSIONS_SEVERAL)
    assert iscsiadm.find_session(runner, T, P) == Session("tcp", 1, P, 1, T, False)
    assert iscsiadm.find_session(runner, T, "10.77.0.99:3260") is None
    assert iscsiadm.find_session(runner, "iqn.2026-11.org.sanoffload:nope") is None
    assert iscsiadm.find_session(runner, "iqn.2026-11.org.sanoffload:fs2-00000001",
                                 "[FD00::11]:3260") is not None
