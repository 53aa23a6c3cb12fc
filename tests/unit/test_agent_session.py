"""sanoffload.agent.session: prepare, status, release and cleanup, with a fake controller.

The storage controller is :class:`tests.unit.fakes_agent.FakeController`, an
in-memory double of the StorageController protocol whose ``who_freezes``
answers "lvm" (quiesce runs only ``sync -f``, arms no guard, never fsfreeze).
Commands go to a FakeRunner: one not scripted here fails the test. The
backup object is built from the recorded lvs/findmnt outputs of the lab's fs1.
The journal is real, under tmp_path.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import psutil
import pytest

from sanoffload.agent import config as agent_config
from sanoffload.agent.controller import Duplicate
from sanoffload.agent.journal import SESSION_ID_RE, Journal, Resource, SessionRecord
from sanoffload.agent.session import CHAP_SECRET_LEN, Agent, Prepared, new_session_id
from sanoffload.channel.messages import HeldOutput, PrepareAnswer
from sanoffload.errors import (
    AuthError,
    CleanupError,
    CommandError,
    FreezeError,
    JournalError,
    LioError,
    ResourceError,
)
from sanoffload.iqn import valid_iqn
from sanoffload.kinds import DuplicateKind
from sanoffload.runner import MASK
from sanoffload.testing import FakeRunner
from sanoffload.tools import lio, lvm
from tests.unit.fakes_agent import Clock, FakeController, FakeResolver
from tests.unit.test_hooks import HoldRunner, ScriptedHold

pytestmark = pytest.mark.unit

PX1 = "iqn.2026-11.org.sanoffload.lab:px1"
PX2 = "iqn.2026-11.org.sanoffload.lab:px2"
STRANGER = "iqn.2026-11.org.example:stranger"
MP = "/srv/lin"
PATH = "/srv/lin/dir"
LEASE = 3600
T0 = 1_000_000.0
EINVAL = "fsfreeze: /srv/lin: unfreeze failed: Invalid argument\n"


def make_config(tmp_path: Path, max_sessions: int = 1) -> agent_config.Config:
    return agent_config.parse(f"""
state_dir = "{tmp_path / 'state'}"
run_dir = "{tmp_path / 'run'}"
lease_s = {LEASE}

[portal]
address = "10.77.0.11"

[clients.px1]
initiators = ["{PX1}"]
roots = ["/srv"]
max_sessions = {max_sessions}

[clients.px2]
initiators = ["{PX2}"]
roots = ["/srv"]
""", "test.toml")


class Env:
    """One agent with its fakes."""

    def __init__(self, tmp_path: Path, max_sessions: int = 1) -> None:
        self.config = make_config(tmp_path, max_sessions)
        self.runner = FakeRunner()
        self.runner.on("sync", "-f", MP)
        # only a release of a "frozen" resource thaws; not frozen: exit 1 + EINVAL
        self.runner.on("fsfreeze", "--unfreeze", MP, returncode=1, stderr=EINVAL)
        self.ctl = FakeController(self.config.state_dir)
        self.clock = Clock(T0)
        self.resolver = FakeResolver()
        self.agent = Agent(self.runner, self.config, controller=self.ctl, host="fs1",
                           clock=self.clock, resolver=self.resolver)
        self.journal = Journal(self.config.state_dir)
        self.sessions_dir = Path(self.config.state_dir) / "sessions"

    def prepare(self, initiator: str = PX1, **kw: Any) -> Prepared:
        return self.agent.prepare(PATH, initiator, **kw)

    def files(self) -> list[str]:
        if not self.sessions_dir.is_dir():
            return []
        return sorted(p.name for p in self.sessions_dir.glob("*.json"))

    def raw(self, sid: str) -> dict[str, Any]:
        record: dict[str, Any] = json.loads((self.sessions_dir / f"{sid}.json").read_text())
        return record


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return Env(tmp_path)


def kinds(rec: SessionRecord | dict[str, Any]) -> list[str]:
    res = rec.resources if isinstance(rec, SessionRecord) else rec["resources"]
    return [r.kind if isinstance(r, Resource) else r["kind"] for r in res]


def res_of(rec: dict[str, Any], kind: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [r for r in rec["resources"] if r["kind"] == kind]
    assert len(found) == 1, f"{kind}: {rec['resources']}"
    return found[0]


def seen_record(snapshot: list[dict[str, Any]], sid: str | None = None) -> dict[str, Any]:
    """The one session record (or ``sid``'s) in a journal snapshot taken by the controller."""
    recs = [r for r in snapshot if sid is None or r["session_id"] == sid]
    assert len(recs) == 1, snapshot
    return recs[0]


def every_error(exc: BaseException) -> list[BaseException]:
    """exc, what it chains (__cause__/__context__) and what a CleanupError lists."""
    out: list[BaseException] = []
    todo = [exc]
    while todo:
        e = todo.pop()
        if e is None or any(e is o for o in out):
            continue
        out.append(e)
        todo += [e.__cause__, e.__context__, *getattr(e, "errors", [])]  # type: ignore[list-item]
    return out


def sid_dup(sid: str) -> Duplicate:
    return Duplicate(DuplicateKind.SNAPSHOT, "datavg", f"{lvm.NAME_PREFIX}{sid}", "lin")


def failed_record(sid: str, *, state: str = "failed", frozen: bool = False,
                  client: str = "px1", pid: int | None = None) -> SessionRecord:
    """A record as a crash or a failed release leaves it (a snapshot, maybe a freeze)."""
    res = []
    if frozen:
        res.append(Resource("frozen", {"mountpoint": MP}))
    res.append(Resource("snapshot", {"vg": "datavg", "name": f"{lvm.NAME_PREFIX}{sid}",
                                     "origin": "lin"},
                        "intended" if state == "preparing" else "created"))
    info: dict[str, Any] = {"mountpoint": MP, "fstype": "ext4", "origin": "datavg/lin",
                            "kind": "snapshot"}
    if pid is not None:
        info["pid"] = pid
    return SessionRecord(session_id=sid, client=client, initiator=PX1, path=PATH, created=T0,
                         lease_expires=T0 + LEASE, state=state, resources=res, info=info)


# --------------------------------------------------------------------------
# prepare: success
# --------------------------------------------------------------------------

def test_prepare_answers_what_the_proxy_needs(env: Env) -> None:
    p = env.prepare()
    sid = p.session_id
    assert sid.startswith("fs1-") and SESSION_ID_RE.match(sid)
    # resolve was asked for the path within the client's roots
    assert env.resolver.calls == [(PATH, ("/srv",), None)]

    expose = [c for c in env.ctl.calls if c[0] == "expose"]
    assert len(expose) == 1
    _, dup, spec = expose[0]
    # the identifier is the one the controller answered, not made up by the agent
    assert p.identifier == lio.naa_from_serial(spec.serial)
    assert p.unit_serial == spec.serial
    assert p.path_in_fs == "dir"
    assert p.fstype == "ext4"
    assert p.duplicate_kind == "snapshot"
    assert dup == sid_dup(sid) and spec.device == f"/dev/datavg/{lvm.NAME_PREFIX}{sid}"
    assert p.target_iqn.startswith(lio.TARGET_IQN_PREFIX) and sid in p.target_iqn
    assert valid_iqn(p.target_iqn)
    assert spec.initiator_iqn == PX1
    assert p.portals == ["10.77.0.11:3260"] and p.lun == 0
    assert p.chap_user == f"sanoffload-{sid}" == spec.chap_user
    assert p.frozen_by == "lvm"
    assert p.lease_expires == T0 + LEASE
    assert p.to_dict()["session_id"] == sid
    # what the agent sends is what the proxy's checks accept, field for field
    assert PrepareAnswer.from_wire(json.loads(json.dumps(p.to_wire()))) == p


def test_prepare_chap_secret_is_fresh_and_masked(env: Env, tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG")
    p = env.prepare()
    spec = next(c[2] for c in env.ctl.calls if c[0] == "expose")
    assert len(p.chap_secret) == CHAP_SECRET_LEN == 16
    assert p.chap_secret.isalnum() and p.chap_secret.isascii()
    assert spec.chap_secret == p.chap_secret
    # registered on the runner: masked in every later log line, result and error
    assert env.runner.mask(f"secret={p.chap_secret}!") == f"secret={MASK}!"
    # and never written down
    assert p.chap_secret not in caplog.text
    for f in env.sessions_dir.glob("*"):
        assert p.chap_secret not in f.read_text()
    # a second session gets another secret
    other = Env(tmp_path / "other").prepare()
    assert other.chap_secret != p.chap_secret


def test_prepare_runs_only_sync_when_lvm_freezes(env: Env) -> None:
    env.prepare()
    # who_freezes "lvm": no fsfreeze, no guard spawned; the flush still runs
    assert env.runner.argvs() == [["sync", "-f", MP]]
    assert env.ctl.methods() == ["who_freezes", "duplicate", "expose"]
    assert env.ctl.calls[0] == ("who_freezes", "snapshot")


def test_prepare_journal_ready_with_created_resources(env: Env) -> None:
    p = env.prepare()
    assert env.files() == [f"{p.session_id}.json"]
    rec = env.journal.load(p.session_id)
    assert rec is not None
    assert rec.state == "ready"
    assert rec.client == "px1" and rec.initiator == PX1 and rec.path == PATH
    assert rec.created == T0 and rec.lease_expires == T0 + LEASE
    assert sorted(kinds(rec)) == ["lio-backstore", "lio-target", "snapshot"]
    assert "frozen" not in kinds(rec)
    assert {r.state for r in rec.resources} == {"created"}
    tgt, bs, snap = rec.find("lio-target"), rec.find("lio-backstore"), rec.find("snapshot")
    assert tgt and bs and snap
    assert tgt.fields == {"iqn": p.target_iqn, "backstore": lio.backstore_name_for(p.session_id)}
    assert bs.fields == {"name": lio.backstore_name_for(p.session_id), "serial": p.unit_serial}
    assert snap.fields == {"vg": "datavg", "name": f"{lvm.NAME_PREFIX}{p.session_id}",
                           "origin": "lin"}
    assert rec.info["identifier"] == p.identifier
    assert rec.info["mountpoint"] == MP and rec.info["fstype"] == "ext4"
    assert rec.info["origin"] == "datavg/lin" and rec.info["kind"] == "snapshot"
    assert rec.info["frozen_by"] == "lvm"


def test_prepare_passes_the_kind_override_to_resolve(env: Env) -> None:
    p = env.prepare(kind="snapshot")
    assert env.resolver.calls == [(PATH, ("/srv",), "snapshot")]
    assert p.duplicate_kind == "snapshot"


# --------------------------------------------------------------------------
# prepare: intents before actions
# --------------------------------------------------------------------------

def test_duplicate_intent_is_journaled_before_duplicate(env: Env) -> None:
    p = env.prepare()
    rec = seen_record(env.ctl.journal_seen["duplicate"][0])
    assert rec["session_id"] == p.session_id
    assert rec["state"] == "preparing"
    snap = res_of(rec, "snapshot")
    assert snap["state"] == "intended"
    assert snap["fields"] == {"vg": "datavg", "name": f"{lvm.NAME_PREFIX}{p.session_id}",
                              "origin": "lin"}
    # the freeze is journaled before quiesce too (a crash while frozen must thaw)
    assert res_of(rec, "frozen")["fields"] == {"mountpoint": MP}
    assert not any(r["kind"].startswith("lio-") for r in rec["resources"])


def test_export_intents_are_journaled_before_expose(env: Env) -> None:
    p = env.prepare()
    rec = seen_record(env.ctl.journal_seen["expose"][0])
    assert rec["state"] == "preparing"
    bs = res_of(rec, "lio-backstore")
    tgt = res_of(rec, "lio-target")
    assert bs["state"] == tgt["state"] == "intended"
    assert bs["fields"]["name"] == lio.backstore_name_for(p.session_id)
    assert tgt["fields"] == {"iqn": p.target_iqn,
                             "backstore": lio.backstore_name_for(p.session_id)}
    # the duplicate exists by then; the freeze is over and forgotten
    assert res_of(rec, "snapshot")["state"] == "created"
    assert "frozen" not in kinds(rec)


def test_serial_is_journaled_before_expose(env: Env) -> None:
    env.prepare()
    spec = next(c[2] for c in env.ctl.calls if c[0] == "expose")
    rec = seen_record(env.ctl.journal_seen["expose"][0])
    assert res_of(rec, "lio-backstore")["fields"].get("serial") == spec.serial


# --------------------------------------------------------------------------
# prepare: failures unwind
# --------------------------------------------------------------------------

@pytest.mark.parametrize("error", [LioError("LIO refused the target"),
                                   RuntimeError("rtslib: configfs write failed")],
                         ids=["sanoffload-error", "foreign-error"])
def test_expose_failure_unwinds_everything(env: Env, error: Exception) -> None:
    env.ctl.fail["expose"] = error
    with pytest.raises(type(error)) as excinfo:
        env.prepare()
    # the original error, not something the cleanup raised
    assert excinfo.value is error
    expose = next(c for c in env.ctl.calls if c[0] == "expose")
    spec = expose[2]
    sid = spec.session_id
    after = env.ctl.calls[env.ctl.calls.index(expose) + 1:]
    # undone newest first: the target, the backstore, then the duplicate
    assert after == [("unexpose", spec.target_iqn, spec.backstore),
                     ("unexpose", "", spec.backstore),
                     ("discard", sid_dup(sid))]
    # each undo ran while its resource was still journaled (forgotten only once undone)
    seen_tgt = seen_record(env.ctl.journal_seen["unexpose"][0])
    assert "lio-target" in kinds(seen_tgt)
    seen_discard = seen_record(env.ctl.journal_seen["discard"][0])
    assert kinds(seen_discard) == ["snapshot"]
    assert env.ctl.empty
    assert env.files() == []
    assert env.journal.load(sid) is None


def test_duplicate_failure_discards_the_intended_duplicate(env: Env) -> None:
    error = CommandError("lvcreate failed with exit code 5: Insufficient free space")
    env.ctl.fail["duplicate"] = error
    with pytest.raises(CommandError) as excinfo:
        env.prepare()
    assert excinfo.value is error
    dup_call = next(c for c in env.ctl.calls if c[0] == "duplicate")
    sid = dup_call[2].removeprefix(lvm.NAME_PREFIX)
    # lvcreate may have half made the LV: the intended duplicate is discarded all the same
    assert env.ctl.calls[-1] == ("discard", sid_dup(sid))
    # ...while it was still journaled, as an intent
    seen = seen_record(env.ctl.journal_seen["discard"][0])
    assert res_of(seen, "snapshot")["state"] == "intended"
    assert "expose" not in env.ctl.methods()
    assert not env.runner.called("fsfreeze", "--freeze")
    assert env.files() == []


def test_duplicate_failure_with_failing_discard_keeps_a_failed_record(env: Env) -> None:
    env.ctl.fail["duplicate"] = CommandError("lvcreate failed")
    env.ctl.fail["discard"] = CommandError("lvremove failed")
    with pytest.raises(CommandError):
        env.prepare()
    [name] = env.files()
    rec = env.raw(name.removesuffix(".json"))
    assert rec["state"] == "failed"
    assert kinds(rec) == ["snapshot"]
    assert res_of(rec, "snapshot")["state"] == "intended"
    # cleanup retries it
    env.ctl.fail.clear()
    assert env.agent.cleanup()["released"] == [rec["session_id"]]
    assert env.files() == []


def test_failed_duplicate_in_lvm_mode_runs_no_fsfreeze(env: Env) -> None:
    env.ctl.fail["duplicate"] = CommandError("lvcreate failed")
    with pytest.raises(CommandError):
        env.prepare()
    assert not env.runner.called("fsfreeze"), env.runner.argvs()


def _fail_step_and_undo(env: Env, step: str, undo: str) -> tuple[Exception, Exception, Any]:
    step_err: Exception = (LioError("LIO refused the target") if step == "expose"
                           else CommandError("lvcreate failed with exit code 5"))
    undo_err: Exception
    if undo == "fsfreeze":
        undo_err = CommandError("fsfreeze --unfreeze /srv/lin failed with exit code 1: "
                                "No such file or directory")
        env.runner.on("fsfreeze", "--unfreeze", MP, returncode=1,
                      stderr="fsfreeze: cannot open /srv/lin: No such file or directory\n")
    elif undo == "discard":
        undo_err = CommandError("lvremove --yes datavg/x failed with exit code 5: busy")
        env.ctl.fail["discard"] = undo_err
    else:
        undo_err = LioError("LIO would not delete the target")
        env.ctl.fail["unexpose"] = undo_err
    env.ctl.fail[step] = step_err
    with pytest.raises(Exception) as excinfo:
        env.prepare()
    return step_err, undo_err, excinfo


def test_expose_and_discard_failure_keep_a_failed_record(env: Env) -> None:
    expose_err, discard_err, excinfo = _fail_step_and_undo(env, "expose", "discard")
    exc = excinfo.value
    # neither error is lost: the expose error surfaces, the discard failure as a note
    reachable = every_error(exc)
    notes = " ".join(n for e in reachable for n in getattr(e, "__notes__", []))
    assert any(e is expose_err for e in reachable)
    assert any(e is discard_err for e in reachable) or str(discard_err) in notes
    # the target and backstore were undone; the duplicate is still there and journaled
    [name] = env.files()
    sid = name.removesuffix(".json")
    rec = env.journal.load(sid)
    assert rec is not None and rec.state == "failed"
    assert kinds(rec) == ["snapshot"] and rec.resources[0].state == "created"
    assert not env.ctl.targets and not env.ctl.backstores
    assert (("datavg", f"{lvm.NAME_PREFIX}{sid}") in env.ctl.duplicates)
    # so cleanup retries, and succeeds once discard works
    env.ctl.fail.clear()
    assert env.agent.cleanup()["released"] == [sid]
    assert env.ctl.empty and env.files() == []


# (no "fsfreeze" undo: once quiesce returns or raises it has thawed, so prepare runs none)
@pytest.mark.parametrize("step,undo", [("expose", "discard"), ("expose", "unexpose"),
                                       ("duplicate", "discard")])
def test_prepare_error_is_reported_when_an_undo_fails_too(env: Env, step: str,
                                                          undo: str) -> None:
    step_err, undo_err, excinfo = _fail_step_and_undo(env, step, undo)
    exc = excinfo.value
    undo_msg = str(undo_err) if undo != "fsfreeze" else "fsfreeze"
    noted = exc is step_err and any(undo_msg in n for n in getattr(exc, "__notes__", []))
    listed = (isinstance(exc, CleanupError) and any(e is step_err for e in exc.errors)
              and len(exc.errors) >= 2)
    assert noted or listed, f"raised {type(exc).__name__}: {exc}"


def test_unknown_initiator_is_refused_before_anything(env: Env) -> None:
    with pytest.raises(AuthError, match="not allowed"):
        env.prepare(STRANGER)
    assert env.ctl.calls == []
    assert env.resolver.calls == []
    assert env.runner.calls == []
    assert env.files() == []


def test_max_sessions_reached_creates_nothing(env: Env) -> None:
    first = env.prepare()
    calls, argvs = list(env.ctl.calls), env.runner.argvs()
    with pytest.raises(ResourceError, match="max_sessions = 1"):
        env.prepare()
    assert env.ctl.calls == calls
    assert env.runner.argvs() == argvs
    assert env.files() == [f"{first.session_id}.json"]
    # another client is not limited by px1's sessions
    assert env.prepare(PX2).session_id != first.session_id


def test_max_sessions_counts_per_client(tmp_path: Path) -> None:
    env = Env(tmp_path, max_sessions=2)
    a, b = env.prepare(), env.prepare()
    assert a.session_id != b.session_id
    with pytest.raises(ResourceError):
        env.prepare()
    assert len(env.files()) == 2


# --------------------------------------------------------------------------
# status
# --------------------------------------------------------------------------

def test_status_healthy(env: Env) -> None:
    p = env.prepare()
    st = env.agent.status(p.session_id)
    assert st["status"] == "healthy" and st["state"] == "ready"
    assert st["session_id"] == p.session_id and st["path"] == PATH
    assert st["lease_expires"] == p.lease_expires
    assert st["identifier"] == p.identifier and st["mountpoint"] == MP
    assert env.ctl.calls[-1] == ("health", sid_dup(p.session_id))


@pytest.mark.parametrize("health", ["invalid", "missing"])
def test_status_reports_the_controllers_health(env: Env, health: str) -> None:
    p = env.prepare()
    env.ctl.health_answer = health  # type: ignore[assignment]
    assert env.agent.status(p.session_id)["status"] == health


def test_status_expired_at_the_lease(env: Env) -> None:
    p = env.prepare()
    env.clock.now = p.lease_expires - 0.5
    assert env.agent.status(p.session_id)["status"] == "healthy"
    n = len(env.ctl.calls)
    env.clock.now = p.lease_expires
    st = env.agent.status(p.session_id)
    assert st["status"] == "expired" and st["state"] == "ready"
    # an expired lease is answered without asking the storage
    assert len(env.ctl.calls) == n


def test_status_unknown_session(env: Env) -> None:
    assert env.agent.status("fs1-deadbeef") == {"session_id": "fs1-deadbeef",
                                                 "status": "unknown"}
    assert env.ctl.calls == []


def test_status_of_a_failed_session_is_its_state(env: Env) -> None:
    env.journal.save(failed_record("fs1-0000000f"))
    st = env.agent.status("fs1-0000000f")
    assert st["status"] == "failed"
    assert "health" not in env.ctl.methods()


def test_sessions_lists_every_record(env: Env) -> None:
    p = env.prepare()
    env.journal.save(failed_record("fs1-0000000f", client="px2"))
    rows = {r["session_id"]: r["status"] for r in env.agent.sessions()}
    assert rows == {p.session_id: "healthy", "fs1-0000000f": "failed"}


# --------------------------------------------------------------------------
# release
# --------------------------------------------------------------------------

def test_release_undoes_target_then_backstore_then_duplicate(env: Env) -> None:
    p = env.prepare()
    sid, bs = p.session_id, lio.backstore_name_for(p.session_id)
    env.ctl.calls.clear()
    done = env.agent.release(sid)
    assert env.ctl.calls == [("unexpose", p.target_iqn, bs), ("unexpose", "", bs),
                             ("discard", sid_dup(sid))]
    assert [d.split()[0] for d in done] == ["lio-target", "lio-backstore", "snapshot"]
    assert env.ctl.empty
    assert env.files() == [] and env.journal.load(sid) is None
    # the record said "releasing" while it was being released
    seen = seen_record(env.ctl.journal_seen["discard"][-1], sid)
    assert seen["state"] == "releasing"
    assert kinds(seen) == ["snapshot"]  # target and backstore already forgotten


def test_release_is_idempotent(env: Env) -> None:
    p = env.prepare()
    assert env.agent.release(p.session_id)
    calls, argvs = list(env.ctl.calls), env.runner.argvs()
    assert env.agent.release(p.session_id) == []
    assert env.ctl.calls == calls and env.runner.argvs() == argvs
    assert env.agent.release("fs1-deadbeef") == []


def test_release_thaws_a_journaled_freeze(env: Env) -> None:
    env.journal.save(failed_record("fs1-0000000a", state="preparing", frozen=True))
    done = env.agent.release("fs1-0000000a")
    assert env.runner.called("fsfreeze", "--unfreeze", MP)
    # the thaw comes before the duplicate's discard
    assert [d.split()[0] for d in done] == ["frozen", "snapshot"]
    # the duplicate was only intended: what a half-done duplicate() left goes first
    dup = sid_dup("fs1-0000000a")
    assert env.ctl.calls == [("discard_partial", dup), ("discard", dup)]
    assert env.files() == []


def test_failing_unexpose_goes_on_and_keeps_a_failed_record(env: Env) -> None:
    p = env.prepare()
    sid = p.session_id
    env.ctl.calls.clear()
    err = LioError("LIO would not delete it")
    env.ctl.fail["unexpose"] = err
    with pytest.raises(CleanupError) as excinfo:
        env.agent.release(sid)
    # both unexposes failed; the duplicate was discarded all the same
    assert excinfo.value.errors == [err, err]
    assert f"release of {sid}" in str(excinfo.value)
    assert env.ctl.methods() == ["unexpose", "unexpose", "discard"]
    assert not env.ctl.duplicates
    rec = env.journal.load(sid)
    assert rec is not None and rec.state == "failed"
    assert sorted(kinds(rec)) == ["lio-backstore", "lio-target"]
    # a later release (or cleanup) finishes the job
    env.ctl.fail.clear()
    assert len(env.agent.release(sid)) == 2
    assert env.ctl.empty and env.files() == []


def test_failing_discard_keeps_only_the_duplicate(env: Env) -> None:
    p = env.prepare()
    err = CommandError("lvremove failed with exit code 5: Logical volume in use")
    env.ctl.fail["discard"] = err
    with pytest.raises(CleanupError) as excinfo:
        env.agent.release(p.session_id)
    assert excinfo.value.errors == [err]
    assert excinfo.value.exit_code == 13
    rec = env.journal.load(p.session_id)
    assert rec is not None and rec.state == "failed" and kinds(rec) == ["snapshot"]
    assert not env.ctl.targets and not env.ctl.backstores


def test_release_goes_on_past_a_foreign_error(env: Env) -> None:
    p = env.prepare()
    env.ctl.fail["unexpose"] = RuntimeError("RTSLibError: Could not delete target")
    with pytest.raises(CleanupError):
        env.agent.release(p.session_id)
    assert "discard" in env.ctl.methods()
    rec = env.journal.load(p.session_id)
    assert rec is not None and rec.state == "failed"


# --------------------------------------------------------------------------
# cleanup
# --------------------------------------------------------------------------

def test_cleanup_releases_failed_preparing_and_expired_only(tmp_path: Path) -> None:
    env = Env(tmp_path, max_sessions=5)
    env.clock.now = T0
    expired = env.prepare().session_id           # lease ends T0 + 3600
    env.clock.now = T0 + 3000
    ready = env.prepare()                         # lease ends T0 + 6600
    env.journal.save(failed_record("fs1-0000000f"))
    env.journal.save(failed_record("fs1-0000000a", state="preparing", frozen=True))
    releasing = failed_record("fs1-0000000b", state="releasing")
    env.journal.save(releasing)
    env.clock.now = T0 + LEASE  # exactly at the first lease's end
    env.ctl.calls.clear()

    report = env.agent.cleanup()
    assert sorted(report["released"]) == sorted([expired, "fs1-0000000f", "fs1-0000000a",
                                                  "fs1-0000000b"])
    assert report["orphans_removed"] == []
    assert env.files() == [f"{ready.session_id}.json"]
    kept = env.journal.load(ready.session_id)
    assert kept is not None and kept.state == "ready"
    # the ready session's export and duplicate are untouched
    assert env.ctl.targets == {ready.target_iqn}
    assert list(env.ctl.duplicates) == [("datavg", f"{lvm.NAME_PREFIX}{ready.session_id}")]
    assert all(ready.session_id not in repr(c) for c in env.ctl.calls if c[0] != "orphans")
    assert env.runner.called("fsfreeze", "--unfreeze", MP)  # the preparing one's freeze

    # a second pass finds nothing to do
    env.ctl.calls.clear()
    assert env.agent.cleanup()["released"] == []
    assert env.ctl.methods() == ["orphans"]  # it only looked

    # at boot everything goes
    report = env.agent.cleanup(all_sessions=True)
    assert report["released"] == [ready.session_id]
    assert env.ctl.empty and env.files() == []


def test_cleanup_skips_a_prepare_another_live_process_runs(env: Env) -> None:
    # pid 1 is alive and is not us: that prepare is in progress, not a crash's leftover
    env.journal.save(failed_record("fs1-0000000a", state="preparing", pid=1))
    # its process is gone: a leftover
    gone = _dead_pid()
    env.journal.save(failed_record("fs1-0000000b", state="preparing", pid=gone))
    report = env.agent.cleanup()
    assert report["released"] == ["fs1-0000000b"]
    assert env.files() == ["fs1-0000000a.json"]
    dup = sid_dup("fs1-0000000b")
    assert [c for c in env.ctl.calls if c[0] != "orphans"] == [("discard_partial", dup),
                                                              ("discard", dup)]
    # at boot nothing can be in progress: it goes too
    assert env.agent.cleanup(all_sessions=True)["released"] == ["fs1-0000000a"]
    assert env.files() == []


def test_cleanup_skips_no_failed_record_of_a_live_process(env: Env) -> None:
    # only "preparing" is protected: a failed record of a live process is released
    env.journal.save(failed_record("fs1-0000000f", pid=1))
    assert env.agent.cleanup()["released"] == ["fs1-0000000f"]


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    assert not psutil.pid_exists(proc.pid)
    return proc.pid


def test_cleanup_goes_on_past_a_failing_release(env: Env) -> None:
    env.journal.save(failed_record("fs1-0000000e"))
    env.journal.save(failed_record("fs1-0000000f"))
    env.ctl.fail["discard"] = CommandError("lvremove failed")
    with pytest.raises(CleanupError) as excinfo:
        env.agent.cleanup()
    # both were tried; each failure is listed
    assert [c[1].name for c in env.ctl.calls if c[0] == "discard"] == [
        f"{lvm.NAME_PREFIX}fs1-0000000e", f"{lvm.NAME_PREFIX}fs1-0000000f"]
    assert len(excinfo.value.errors) == 2
    assert all(isinstance(e, CleanupError) for e in excinfo.value.errors)
    for sid in ("fs1-0000000e", "fs1-0000000f"):
        rec = env.journal.load(sid)
        assert rec is not None and rec.state == "failed"


def test_cleanup_stops_at_a_broken_record_and_prepare_goes_on(env: Env) -> None:
    p = env.prepare()
    env.journal.save(failed_record("fs1-0000000f"))
    bad = env.sessions_dir / "fs1-0000000d.json"
    bad.write_text("{not json")
    env.ctl.calls.clear()
    with pytest.raises(JournalError) as info:
        env.agent.cleanup()
    assert info.value.paths == [str(bad)] and info.value.exit_code == 13
    assert env.ctl.calls == []  # nothing released, nothing removed
    assert bad.exists()  # kept for the operator
    assert env.journal.load(p.session_id) is not None
    assert env.journal.load("fs1-0000000f") is not None
    # prepare's own pass releases only what readable records name: it goes on
    env.agent.release(p.session_id)
    env.prepare()
    assert env.journal.load("fs1-0000000f") is None


# --------------------------------------------------------------------------
# session ids
# --------------------------------------------------------------------------

def test_session_ids_are_unique_and_valid() -> None:
    ids = {new_session_id("FS1.example") for _ in range(50)}
    assert len(ids) == 50
    for sid in ids:
        assert SESSION_ID_RE.match(sid) and sid.startswith("fs1example-")
        assert valid_iqn(lio.target_iqn_for(sid))
    assert new_session_id("___").startswith("host-")


@pytest.mark.parametrize("host", ["émile-pc", "-edge", "fs²"])
def test_session_id_from_an_odd_hostname_is_valid(host: str) -> None:
    sid = new_session_id(host)
    assert SESSION_ID_RE.match(sid), sid
    assert isinstance(SessionRecord(session_id=sid, client="c", initiator=PX1, path=PATH),
                      SessionRecord)


# --------------------------------------------------------------------------
# holding hooks: their outputs and failures reach the answer
# --------------------------------------------------------------------------

BACKUP_LABEL = b"START WAL LOCATION: 0/2000028\nLABEL: sanoffload\tfs1\n"


def held_agent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
               *scripts: ScriptedHold) -> tuple[Agent, list[str], HoldRunner]:
    hookdir = tmp_path / "hooks"
    hookdir.mkdir()
    paths = []
    for i, _ in enumerate(scripts):
        hook = hookdir / f"hold{i}"
        hook.write_text("#!/bin/sh\nexit 0\n")
        hook.chmod(0o755)
        paths.append(str(hook))
    config = dataclasses.replace(make_config(tmp_path), hooks=agent_config.HooksConfig(
        hold=tuple(paths), hold_ready_s=5, timeout_s=5))
    # the hooks are owned by whoever runs the tests; production trusts root only
    real = agent_config.HooksConfig.to_hooks
    monkeypatch.setattr(agent_config.HooksConfig, "to_hooks", lambda self: dataclasses.replace(
        real(self), trusted_uid=os.geteuid()))
    runner = HoldRunner()
    runner.on("sync", "-f", MP)
    for path, script in zip(paths, scripts, strict=True):
        runner.hold(path, script)
    agent = Agent(runner, config, controller=FakeController(config.state_dir), host="fs1",
                  clock=Clock(T0), resolver=FakeResolver())
    return agent, paths, runner


def test_the_answer_carries_the_holding_hooks_outputs(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    agent, (pg,), runner = held_agent(tmp_path, monkeypatch, ScriptedHold(after=BACKUP_LABEL))
    answer = agent.prepare(PATH, PX1)
    assert answer.held == [HeldOutput(pg, BACKUP_LABEL.decode())]
    assert answer.warnings == []
    wire = json.loads(json.dumps(answer.to_wire()))
    assert wire["held"] == [{"hook": pg, "output": BACKUP_LABEL.decode()}]
    # what the agent sends is what the proxy's checks accept
    assert PrepareAnswer.from_wire(wire) == answer
    assert runner.argvs() == [[pg], ["sync", "-f", MP]]


def test_a_holding_hook_failing_after_the_thaw_is_a_warning_in_the_answer(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    agent, (good, bad), _ = held_agent(
        tmp_path, monkeypatch, ScriptedHold(after=BACKUP_LABEL),
        ScriptedHold(after=b"x", returncode=2, stderr="UNLOCK TABLES: \x1b[2Jgone\n"))
    answer = agent.prepare(PATH, PX1)
    assert answer.warnings == [f"hold hook {bad} failed (exit 2): UNLOCK TABLES: \\x1b[2Jgone"]
    assert [h.hook for h in answer.held] == [good, bad]
    assert PrepareAnswer.from_wire(json.loads(json.dumps(answer.to_wire()))) == answer


def test_a_holding_hook_that_is_never_ready_fails_prepare_and_leaves_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    agent, _, runner = held_agent(tmp_path, monkeypatch, ScriptedHold(b"NO\n", hang=True))
    with pytest.raises(FreezeError, match="instead of READY"):
        agent.prepare(PATH, PX1)
    assert not runner.called("sync")
    assert not list((tmp_path / "state" / "sessions").glob("*.json"))
