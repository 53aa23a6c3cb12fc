"""open-iscsi's ``iscsiadm``: discover, configure, log in to and out of an iSCSI target.

Command lines (T: target IQN, P: portal ``IP:PORT``, ``[IPv6]:PORT`` for IPv6)::

    iscsiadm -m discovery -t sendtargets -p P -o nonpersistent
    iscsiadm -m node -T T -p P -o new
    iscsiadm -m node -T T -p P -o update -n node.session.auth.authmethod -v CHAP
    iscsiadm -m node -T T -p P -o update -n node.session.auth.username -v USER
    iscsiadm -m node -T T -p P -o update -n node.session.auth.password -v SECRET
    iscsiadm -m node -T T -p P -o update -n node.session.timeo.replacement_timeout -v N
    iscsiadm -m node -T T -p P -o update -n node.startup -v manual
    iscsiadm -m node -T T -p P --login
    iscsiadm -m node -T T -p P --logout
    iscsiadm -m node -T T -p P -o delete
    iscsiadm -m node -T T -p P --rescan
    iscsiadm -m session [-r SID --rescan]

Discovery is ``nonpersistent``: without it sendtargets writes a node record
for every target the portal offers (other backups' included), and those
records would outlive us. The one record we need is made with ``-o new``.

Exit codes are open-iscsi's (include/iscsi_err.h); the ones a call tolerates
are named per call. The CHAP secret goes on iscsiadm's command line (it has no
other way to take it) but is handed to the runner as ``secrets=``, so it is
masked in every log line, result and error.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..errors import AuthError, CommandError
from ..requirements import Requirement
from ..runner import Result, Runner

REQUIRES: tuple[Requirement, ...] = (
    Requirement("iscsiadm", "open-iscsi initiator tool", roles=("proxy",),
                fails_without="cannot discover or log in to the exported duplicate",
                executables=("iscsiadm",), kernel=("iscsid", "SCSI", "iscsi_tcp")),
)

log = logging.getLogger(__name__)

# open-iscsi include/iscsi_err.h (the ones sanoffload meets or names)
ISCSI_SUCCESS = 0
ISCSI_ERR = 1                       # generic error
ISCSI_ERR_SESS_NOT_FOUND = 2
ISCSI_ERR_TRANS = 4                 # connection failure
ISCSI_ERR_LOGIN = 5                 # generic login failure
ISCSI_ERR_IDBM = 6                  # node database error
ISCSI_ERR_INVAL = 7
ISCSI_ERR_TRANS_TIMEOUT = 8         # connection timer expired
ISCSI_ERR_LOGOUT = 10
ISCSI_ERR_PDU_TIMEOUT = 11
ISCSI_ERR_TRANS_NOT_FOUND = 12      # iscsi_tcp not loaded
ISCSI_ERR_ACCESS = 13               # permission denied (not root)
ISCSI_ERR_SESS_EXISTS = 15
ISCSI_ERR_ISCSID_COMM_ERR = 18
ISCSI_ERR_FATAL_LOGIN = 19          # non-retryable login failure
ISCSI_ERR_ISCSID_NOTCONN = 20       # iscsid not running
ISCSI_ERR_NO_OBJS_FOUND = 21        # no records/targets/sessions/portals
ISCSI_ERR_LOGIN_AUTH_FAILED = 24
ISCSI_ERR_BUSY = 28

#: login: "1 session requested, but 1 already present" (another login won the race)
SESSION_EXISTS: Mapping[int, str] = {ISCSI_ERR_SESS_EXISTS: "session-exists"}
#: logout: "No matching sessions found"
NO_SESSION: Mapping[int, str] = {ISCSI_ERR_NO_OBJS_FOUND: "no-session"}
#: -o delete: "No records found"
NO_RECORD: Mapping[int, str] = {ISCSI_ERR_NO_OBJS_FOUND: "no-record"}
#: -m session: "No active sessions."
NO_SESSIONS: Mapping[int, str] = {ISCSI_ERR_NO_OBJS_FOUND: "no-sessions"}
#: discovery: "No portals found" (the portal offers no target to this initiator)
NO_PORTALS: Mapping[int, str] = {ISCSI_ERR_NO_OBJS_FOUND: "no-portals"}

#: seconds to wait for a lost link before failing I/O (open-iscsi's default is 120):
#: a backup that loses its duplicate must fail, not hang
DEFAULT_REPLACEMENT_TIMEOUT = 15
#: a login retries node.session.initial_login_retry_max (8) times × the login
#: timeout (15 s) against an unreachable portal before giving up
LOGIN_TIMEOUT = 150.0
DISCOVERY_TIMEOUT = 60.0

_AUTH_MESSAGE = "authorization failure"
# "tcp: [1] 10.77.0.11:3260,1 iqn.2026-11.org.sanoffload:fs1-0a1b2c3d (non-flash)"
_SESSION_RE = re.compile(
    r"^(?P<transport>[\w-]+): \[(?P<sid>\d+)\] (?P<portal>\S+),(?P<tpgt>-?\d+) "
    r"(?P<target>\S+)(?: \((?P<flash>[^)]*)\))?$")
# "10.77.0.11:3260,1 iqn.2026-11.org.sanoffload:fs1-0a1b2c3d"
_DISCOVERED_RE = re.compile(r"^(?P<portal>\S+),(?P<tpgt>-?\d+) (?P<target>\S+)$")
# iqn.YYYY-MM.reversed.domain[:anything] or eui.16HEX or naa.HEX (RFC 3720 3.2.6.3)
_TARGET_RE = re.compile(r"^(iqn\.\d{4}-\d{2}\.[a-z0-9][a-z0-9.\-:]*|eui\.[0-9A-Fa-f]{16}"
                        r"|naa\.[0-9A-Fa-f]{16,32})$")
_PORTAL_RE = re.compile(r"^(?:(?P<v4>\d{1,3}(?:\.\d{1,3}){3})|\[(?P<v6>[0-9A-Fa-f:.]+)\]"
                        r"|(?P<host>[A-Za-z0-9][A-Za-z0-9.\-]*)):(?P<port>\d{1,5})$")
# node parameters this module sets: a name is never taken from outside
_PARAM_RE = re.compile(r"^node\.[a-z0-9_.\[\]]+$")


@dataclass(frozen=True)
class Session:
    """One line of ``iscsiadm -m session``."""

    transport: str
    sid: int
    portal: str
    tpgt: int
    target: str
    flash: bool = False


@dataclass(frozen=True)
class Discovered:
    """One line of sendtargets discovery: a target offered at a portal."""

    portal: str
    tpgt: int
    target: str


# --------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------

def check_target(target: str) -> str:
    """Return ``target`` if it is an iSCSI name (iqn./eui./naa.); ValueError otherwise.

    Checked so a name from the agent's answer can never pass as an option.
    """
    if not _TARGET_RE.match(target):
        raise ValueError(f"invalid iSCSI target name: {target!r}")
    return target


def check_portal(portal: str) -> str:
    """Return ``portal`` if it is ``IPv4:PORT``, ``[IPv6]:PORT`` or ``HOST:PORT``."""
    match = _PORTAL_RE.match(portal)
    if not match or not 0 < int(match.group("port")) < 65536:
        raise ValueError(f"invalid iSCSI portal (want IP:PORT): {portal!r}")
    return portal


def same_portal(a: str, b: str) -> bool:
    """True if two ``IP:PORT`` portals name the same address (IPv6 case-insensitive)."""
    return a.strip().lower() == b.strip().lower()


def _node(target: str, portal: str) -> list[str]:
    return ["iscsiadm", "-m", "node", "-T", check_target(target), "-p", check_portal(portal)]


# --------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------

def parse_sessions(text: str) -> list[Session]:
    """Parse ``iscsiadm -m session`` output; lines of another shape are skipped (logged)."""
    found: list[Session] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        match = _SESSION_RE.match(line)
        if not match:
            log.warning("iscsiadm -m session: unexpected line ignored: %r", line)
            continue
        found.append(Session(transport=match["transport"], sid=int(match["sid"]),
                             portal=match["portal"], tpgt=int(match["tpgt"]),
                             target=match["target"], flash=match["flash"] == "flash"))
    return found


def sessions(runner: Runner) -> list[Session]:
    """``iscsiadm -m session``: the running sessions (exit 21 "No active sessions." → [])."""
    res = runner.run(["iscsiadm", "-m", "session"], ok_codes=NO_SESSIONS)
    if res.returncode == ISCSI_ERR_NO_OBJS_FOUND:
        return []
    return parse_sessions(res.stdout)


def find_session(runner: Runner, target: str, portal: str | None = None) -> Session | None:
    """The running session to ``target`` (at ``portal`` if given), or None."""
    for sess in sessions(runner):
        if sess.target == target and (portal is None or same_portal(sess.portal, portal)):
            return sess
    return None


def parse_discovery(text: str) -> list[Discovered]:
    """Parse sendtargets output (``IP:PORT,TPGT TARGET`` per line)."""
    found: list[Discovered] = []
    for line in text.splitlines():
        match = _DISCOVERED_RE.match(line.strip())
        if match:
            found.append(Discovered(portal=match["portal"], tpgt=int(match["tpgt"]),
                                    target=match["target"]))
        elif line.strip():
            log.warning("iscsiadm discovery: unexpected line ignored: %r", line.strip())
    return found


def discover(runner: Runner, portal: str, *,
             timeout: float = DISCOVERY_TIMEOUT) -> list[Discovered]:
    """``iscsiadm -m discovery -t sendtargets -p P -o nonpersistent``: what the portal offers.

    Exit 21 ("No portals found": nothing offered to this initiator) gives [].
    An unreachable portal fails with exit 4 (connection failure) or 8 (timeout).
    """
    res = runner.run(["iscsiadm", "-m", "discovery", "-t", "sendtargets",
                      "-p", check_portal(portal), "-o", "nonpersistent"],
                     ok_codes=NO_PORTALS, timeout=timeout)
    if res.returncode == ISCSI_ERR_NO_OBJS_FOUND:
        return []
    return parse_discovery(res.stdout)


# --------------------------------------------------------------------------
# Node records
# --------------------------------------------------------------------------

def create_node(runner: Runner, target: str, portal: str) -> None:
    """``iscsiadm -m node -T T -p P -o new``: a node record with iscsid.conf's defaults.

    An existing record for the same target and portal is replaced, settings included.
    """
    runner.run([*_node(target, portal), "-o", "new"])


def update(runner: Runner, target: str, portal: str, name: str, value: str, *,
           secret: bool = False) -> None:
    """``iscsiadm -m node -T T -p P -o update -n NAME -v VALUE``.

    ``secret``: VALUE is a credential; it goes to the runner as ``secrets=``.
    """
    if not _PARAM_RE.match(name):
        raise ValueError(f"invalid node parameter name: {name!r}")
    if value.startswith("-") or "\n" in value:
        # the node DB is a key=value file: a newline would inject a setting
        raise ValueError(f"invalid value for {name}")
    runner.run([*_node(target, portal), "-o", "update", "-n", name, "-v", value],
               secrets=[value] if secret else [])


def set_chap(runner: Runner, target: str, portal: str, user: str, secret: str) -> None:
    """One-way CHAP on the node record (three ``-o update`` calls)::

        ... -o update -n node.session.auth.authmethod -v CHAP
        ... -o update -n node.session.auth.username -v USER
        ... -o update -n node.session.auth.password -v SECRET   # masked: ***
    """
    if not user or not secret:
        raise ValueError("CHAP user and secret must not be empty")
    update(runner, target, portal, "node.session.auth.authmethod", "CHAP")
    update(runner, target, portal, "node.session.auth.username", user)
    update(runner, target, portal, "node.session.auth.password", secret, secret=True)


def set_replacement_timeout(runner: Runner, target: str, portal: str,
                            seconds: int = DEFAULT_REPLACEMENT_TIMEOUT) -> None:
    """``... -o update -n node.session.timeo.replacement_timeout -v N``.

    How long the SCSI layer queues I/O while the session reconnects; after that
    reads fail (the backup fails) instead of hanging for open-iscsi's 120 s.
    """
    if int(seconds) < 1:
        raise ValueError(f"replacement timeout must be at least 1 s, not {seconds}")
    update(runner, target, portal, "node.session.timeo.replacement_timeout", str(int(seconds)))


def set_startup_manual(runner: Runner, target: str, portal: str) -> None:
    """``... -o update -n node.startup -v manual``: never logged in again at boot."""
    update(runner, target, portal, "node.startup", "manual")


def delete_node(runner: Runner, target: str, portal: str) -> bool:
    """``iscsiadm -m node -T T -p P -o delete``: True if removed, False if there was none.

    Exit 21 ("No records found") is tolerated; a record a session still uses
    is not removed (iscsiadm refuses), which raises.
    """
    res = runner.run([*_node(target, portal), "-o", "delete"], ok_codes=NO_RECORD)
    if res.returncode == ISCSI_ERR_NO_OBJS_FOUND:
        log.debug("iscsiadm: no node record for %s at %s", target, portal)
        return False
    return True


# --------------------------------------------------------------------------
# Sessions
# --------------------------------------------------------------------------

def _is_auth_failure(exc: CommandError) -> bool:
    return (exc.returncode == ISCSI_ERR_LOGIN_AUTH_FAILED
            or _AUTH_MESSAGE in f"{exc.stderr}\n{exc.stdout}".lower())


def login(runner: Runner, target: str, portal: str, *,
          timeout: float = LOGIN_TIMEOUT) -> Result:
    """``iscsiadm -m node -T T -p P --login``.

    Exit 15 (session exists: already logged in) is tolerated. A login the
    target refuses for its CHAP credentials (exit 24, "authorization
    failure") raises AuthError.
    """
    try:
        res = runner.run([*_node(target, portal), "--login"], ok_codes=SESSION_EXISTS,
                         timeout=timeout)
    except CommandError as exc:
        if _is_auth_failure(exc):
            raise AuthError(
                f"iSCSI login to {target} at {portal} refused: CHAP authorization failure "
                f"(iscsiadm exit {exc.returncode})",
                hint="the agent's CHAP credentials for this session did not match; was the "
                     "session released, or did the answer reach this proxy altered?") from exc
        raise
    if res.returncode == ISCSI_ERR_SESS_EXISTS:
        log.info("iscsiadm: already logged in to %s at %s", target, portal)
    return res


def logout(runner: Runner, target: str, portal: str) -> bool:
    """``iscsiadm -m node -T T -p P --logout``: True if logged out, False if no session.

    Exit 21 ("No matching sessions found") is tolerated.
    """
    res = runner.run([*_node(target, portal), "--logout"], ok_codes=NO_SESSION)
    if res.returncode == ISCSI_ERR_NO_OBJS_FOUND:
        log.debug("iscsiadm: no session to %s at %s", target, portal)
        return False
    return True


def rescan(runner: Runner, target: str | None = None, portal: str | None = None, *,
           sid: int | None = None) -> None:
    """Ask the target again for its LUNs::

        iscsiadm -m node -T T -p P --rescan
        iscsiadm -m session -r SID --rescan
    """
    argv: Sequence[str]
    if sid is not None:
        argv = ["iscsiadm", "-m", "session", "-r", str(int(sid)), "--rescan"]
    elif target is not None and portal is not None:
        argv = [*_node(target, portal), "--rescan"]
    else:
        raise ValueError("rescan needs a target and portal, or a session id")
    runner.run(argv)
