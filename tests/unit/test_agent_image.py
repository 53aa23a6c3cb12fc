"""Image backups on the agent (issue 13): the delta against a thin base, and tick/tock.

LVM's answers are real (tests/fixtures/thin/lvm_*, recorded by record-lvm.sh with
vgcfgrestore on a loop device: a thin pool, the thin LV ``thin`` (thin id 1), its base
``sanoffload-base_fs1-1a2b3c4d`` (2) and the session's snapshot
``sanoffload-fs1-0000beef`` (3)); the pool's use comes from the lab's recorded
``lvs_all`` (data 6.29 %, metadata 11.52 %); thin_delta's output was made by the real
tool from metadata built by thin_restore (delta-bases.xml from restore-bases.xml).
The storage controller is the in-memory FakeController; the journals are real.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from sanoffload.agent import config as agent_config, session as session_mod
from sanoffload.agent.bases import ThinBases, base_name, metadata_device, pool_dm_name
from sanoffload.agent.journal import BaseJournal, BaseRecord
from sanoffload.agent.service import AgentService
from sanoffload.agent.session import Agent
from sanoffload.channel.messages import Delta, PrepareAnswer
from sanoffload.errors import ProtocolError
from sanoffload.kinds import DuplicateKind
from sanoffload.testing import FakeRunner
from sanoffload.tools import lvm
from tests.unit.fakes_agent import Clock, FakeController, FakeResolver, recorded_lv, recorded_mount
from tests.unit.recorded import load

pytestmark = pytest.mark.unit

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "thin"
PX1 = "iqn.2026-11.org.sanoffload.lab:px1"
SID = "fs1-0000beef"
SNAP = f"sanoffload-{SID}"
OLD_BASE = "sanoffload-base_fs1-1a2b3c4d"
NEW_BASE = "sanoffload-base_fs1-0000beef"
THIN_UUID = "NV5dDp-saSw-k7nk-ODGt-FUCg-dGPc-cPh4i0"
OLD_UUID = "b4SeAa-7Hq2-Lm0P-Rt5V-Wx8Y-Zc1D-Ef3Gh6"
SNAP_UUID = "n3WsNp-4Kd1-Qa9Z-Xc2V-Bn7M-Lk5J-Hg8Fd0"
VOLUME = 536870912
MIB = 1024 * 1024
OLD_BACKUP = "fs1/srv-thin-0a1b2c3d/20261125T020000Z"
NEW_BACKUP = "fs1/srv-thin-0a1b2c3d/20261126T020000Z"
LVS = ["lvs", "--all", *lvm.REPORT_ARGS, "-o", ",".join(lvm.LV_FIELDS)]
RESERVE = ("dmsetup", "message", "datavg-pool-tpool", "0", "reserve_metadata_snap")
RELEASE = ("dmsetup", "message", "datavg-pool-tpool", "0", "release_metadata_snap")
THIN_DELTA = ("thin_delta", "--metadata-snap", "--snap1", "2", "--snap2", "3",
              "/dev/mapper/datavg-pool_tmeta")


def fixture(name: str) -> tuple[str, str, int]:
    base = FIXTURES / name
    return (base.with_suffix(".out").read_text(), base.with_suffix(".err").read_text(),
            int(base.with_suffix(".rc").read_text()))


def make_config(tmp_path: Path, max_use: int = 80) -> agent_config.Config:
    return agent_config.parse(f"""
state_dir = "{tmp_path / 'state'}"
run_dir = "{tmp_path / 'run'}"
thin_base_max_use = {max_use}

[portal]
address = "10.77.0.11"

[clients.px1]
initiators = ["{PX1}"]
roots = ["/srv"]
""", "test.toml")


def old_base(**changes: Any) -> BaseRecord:
    """The record of the base in lvm_lvs_pair, as a commit of OLD_BACKUP wrote it."""
    fields: dict[str, Any] = {
        "origin_vg": "datavg", "origin_lv": "thin", "origin_uuid": THIN_UUID, "pool": "pool",
        "name": OLD_BASE, "uuid": OLD_UUID, "thin_id": 2, "size_bytes": VOLUME,
        "backup": OLD_BACKUP}
    fields.update(changes)
    return BaseRecord(**fields)


class Env:
    """An agent backing up the thin LV ``datavg/thin`` at /srv/thin."""

    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *,
                 max_use: int = 80) -> None:
        monkeypatch.setattr(session_mod, "new_session_id", lambda host: SID)
        self.config = make_config(tmp_path, max_use)
        self.runner = FakeRunner()
        self.runner.on("sync", "-f", "/srv/thin")
        self.lvs("lvm_lvs_pair")
        self.runner.on(*RESERVE)
        self.runner.on(*RELEASE)
        self.delta("delta-bases.xml")
        self.ctl = FakeController(self.config.state_dir)
        self.resolver = FakeResolver(lv=recorded_lv("thin"), mount=recorded_mount("findmnt_thin"))
        self.agent = Agent(self.runner, self.config, controller=self.ctl, host="fs1",
                           clock=Clock(), resolver=self.resolver)
        self.bases = BaseJournal(self.config.state_dir)

    def lvs(self, name: str) -> None:
        """``lvs`` (every VG, and datavg) answers the recording ``name``; the pool's use is
        the lab's (lvm_* was recorded with nothing active: no use)."""
        out, err, rc = fixture(name)
        self.runner.on(*LVS, stdout=out, stderr=err, returncode=rc)
        self.runner.on(*LVS, "datavg", stdout=out, stderr=err, returncode=rc)
        out, err, rc = load("lvs_all")
        self.runner.on(*LVS, "--select", 'lv_name="pool"', "datavg", stdout=out, stderr=err,
                       returncode=rc)

    def delta(self, name: str, *, returncode: int = 0, stderr: str = "") -> None:
        self.runner.on(*THIN_DELTA, stdout=(FIXTURES / name).read_text(), stderr=stderr,
                       returncode=returncode)

    def prepare(self) -> PrepareAnswer:
        return self.agent.prepare("/srv/thin/dir", PX1, kind=DuplicateKind.THIN_SNAPSHOT,
                                  image=True)

    def count(self, *prefix: str) -> int:
        return sum(1 for c in self.runner.argvs() if tuple(c[:len(prefix)]) == prefix)


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Env:
    return Env(tmp_path, monkeypatch)


# --------------------------------------------------------------------------
# names
# --------------------------------------------------------------------------

def test_a_base_is_named_apart_from_every_session_snapshot() -> None:
    assert base_name(SNAP) == NEW_BASE
    # a session id never holds '_': no host, however named, makes a snapshot called so
    assert not session_mod.new_session_id("base_fs1").startswith("base_")
    assert pool_dm_name("data-vg", "my-pool") == "data--vg-my--pool-tpool"
    assert metadata_device("datavg", "pool") == "/dev/mapper/datavg-pool_tmeta"


def test_lvs_reports_the_thin_id_uuid_origin_and_pool() -> None:
    runner = FakeRunner()
    out, _err, _rc = fixture("lvm_lvs_pair")
    runner.on("lvs", stdout=out)
    lvs = {lv.name: lv for lv in lvm.list_lvs(runner, "datavg")}
    base, snap, origin = lvs[OLD_BASE], lvs[SNAP], lvs["thin"]
    assert (base.thin_id, base.uuid, base.origin, base.pool_lv) == (2, OLD_UUID, "thin", "pool")
    assert base.is_base and not snap.is_base and snap.is_ours
    assert (snap.thin_id, origin.thin_id, lvs["pool"].thin_id) == (3, 1, None)


# --------------------------------------------------------------------------
# prepare
# --------------------------------------------------------------------------

def test_no_base_yet_is_a_full_read_and_the_snapshot_is_kept_at_commit(env: Env) -> None:
    answer = env.prepare()
    assert answer.delta is None and answer.warnings == []
    assert not env.runner.called("dmsetup") and not env.runner.called("thin_delta")
    env.lvs("lvm_lvs_pair")
    env.runner.on("lvchange", "--addtag", "sanoffload-base", f"datavg/{SNAP}")
    env.runner.on("lvrename", "datavg", SNAP, NEW_BASE)
    done = env.agent.release(SID, committed=NEW_BACKUP)
    assert any("thin-base" in d for d in done)
    rec = env.bases.load(THIN_UUID)
    assert rec is not None
    assert (rec.name, rec.uuid, rec.thin_id, rec.backup, rec.state, rec.previous) == (
        NEW_BASE, SNAP_UUID, 3, NEW_BACKUP, "kept", None)
    assert ("discard",) not in [c[:1] for c in env.ctl.calls]  # kept, not discarded


def test_a_trusted_base_gives_the_delta_after_the_thaw(env: Env) -> None:
    env.bases.save(old_base())
    answer = env.prepare()
    assert answer.delta == Delta(
        base=OLD_BACKUP, volume_bytes=VOLUME, chunk_bytes=4 * MIB,
        # different 60+10 blocks: chunks 0-1; left_only 1030+98 covers neither chunk 16 nor
        # 17 whole: both read; right_only 3000+4: chunk 46; left_only 4096+64: chunk 64 whole
        changed=((0, 8 * MIB), (64 * MIB, 8 * MIB), (184 * MIB, 4 * MIB)),
        discarded=((256 * MIB, 4 * MIB),))
    assert answer.warnings == []
    argvs = [tuple(a) for a in env.runner.argvs()]
    # the delta came after the snapshot's sync (the freeze), reserve .. release around it
    sync = argvs.index(("sync", "-f", "/srv/thin"))
    reserve = argvs.index(RESERVE)
    assert sync < reserve < argvs.index(THIN_DELTA) < argvs.index(RELEASE)
    assert PrepareAnswer.from_wire(answer.to_wire()).delta == answer.delta


def test_the_metadata_snapshot_is_released_when_thin_delta_fails(env: Env) -> None:
    env.bases.save(old_base())
    env.delta("delta-bases.xml", returncode=1,
              stderr=(FIXTURES / "unknown-snap.err").read_text())
    answer = env.prepare()
    assert answer.delta is None
    assert env.count(*RESERVE) == 1 and env.count(*RELEASE) == 1
    assert len(answer.warnings) == 1 and "full read" in answer.warnings[0]


def test_a_refused_thin_delta_output_is_a_full_read(env: Env) -> None:
    env.bases.save(old_base())
    env.delta("delta-pair.xml")  # a diff of 1 and 2, asked for 2 and 3
    answer = env.prepare()
    assert answer.delta is None and env.count(*RELEASE) == 1
    assert "full read" in answer.warnings[0]


@pytest.mark.parametrize("changes, why", [
    ({"uuid": "XXXXXX-7Hq2-Lm0P-Rt5V-Wx8Y-Zc1D-Ef3Gh6"}, "LV UUID"),
    ({"thin_id": 7}, "thin id"),
    ({"origin_lv": "other"}, "origin"),
    ({"size_bytes": VOLUME // 2}, "size"),
    ({"name": "sanoffload-base_fs1-99999999"}, "its LV is gone"),
    ({"state": "promoting"}, "promoting"),
])
def test_an_untrusted_base_is_a_full_read_and_is_replaced_at_the_commit(
        env: Env, changes: dict[str, Any], why: str) -> None:
    env.bases.save(old_base(**changes))
    answer = env.prepare()
    assert answer.delta is None
    assert not env.runner.called("thin_delta") and not env.runner.called("dmsetup")
    assert len(answer.warnings) == 1 and why in answer.warnings[0], answer.warnings
    # the snapshot is still kept at the commit: the untrusted base is replaced
    info = json.loads((Path(env.config.state_dir) / "sessions" / f"{SID}.json").read_text())
    assert info["info"]["image"]["name"] == SNAP


def test_a_pool_over_the_limit_keeps_no_base_and_drops_the_old_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env = Env(tmp_path, monkeypatch, max_use=5)  # the pool is 6.29 % full
    env.bases.save(old_base())
    env.runner.on("lvremove", "--yes", f"datavg/{OLD_BASE}")
    answer = env.prepare()
    assert answer.delta is None
    assert "thin_base_max_use = 5" in answer.warnings[0]
    assert "dropped the base" in answer.warnings[0]
    assert env.runner.called("lvremove", "--yes", f"datavg/{OLD_BASE}")
    assert env.bases.load(THIN_UUID) is None
    # and the release with committed discards the new snapshot: no base is kept
    env.agent.release(SID, committed=NEW_BACKUP)
    assert not env.runner.called("lvrename")
    assert "discard" in env.ctl.methods()


def test_a_classic_snapshot_image_backup_is_a_full_read_without_lvm_work(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env = Env(tmp_path, monkeypatch)
    env.resolver = FakeResolver()
    env.agent.resolve = env.resolver
    env.runner.on("sync", "-f", "/srv/lin")
    answer = env.agent.prepare("/srv/lin/dir", PX1, image=True)
    assert answer.delta is None and answer.warnings == []
    assert not env.runner.called("lvs")


# --------------------------------------------------------------------------
# release: tick/tock
# --------------------------------------------------------------------------

def test_commit_makes_the_snapshot_the_base_and_removes_the_old(env: Env) -> None:
    env.bases.save(old_base())
    env.prepare()
    env.runner.on("lvchange", "--addtag", "sanoffload-base", f"datavg/{SNAP}")
    env.runner.on("lvrename", "datavg", SNAP, NEW_BASE)
    env.runner.on("lvremove", "--yes", f"datavg/{OLD_BASE}")
    env.agent.release(SID, committed=NEW_BACKUP)
    argvs = [a[:1] for a in env.runner.argvs()]
    # tagged, renamed, and only then the old base removed
    assert argvs.index(["lvchange"]) < argvs.index(["lvrename"]) < argvs.index(["lvremove"])
    rec = env.bases.load(THIN_UUID)
    assert rec is not None and (rec.name, rec.thin_id, rec.backup, rec.previous) == (
        NEW_BASE, 3, NEW_BACKUP, None)
    assert env.agent.journal.load(SID) is None
    # the next prepare's delta is against the new base: lvs now shows it promoted
    env.lvs("lvm_lvs_promoted")
    assert env.agent.bases.status() == [{
        "volume": "datavg/thin", "base": f"datavg/{NEW_BASE}", "backup": NEW_BACKUP,
        "thin_id": 3, "pool": "pool", "state": "kept", "trusted": True}]


def test_release_without_committed_keeps_the_old_base(env: Env) -> None:
    env.bases.save(old_base())
    env.prepare()
    env.agent.release(SID)
    assert not env.runner.called("lvrename") and not env.runner.called("lvremove")
    assert "discard" in env.ctl.methods()
    rec = env.bases.load(THIN_UUID)
    assert rec is not None and rec.name == OLD_BASE and rec.backup == OLD_BACKUP


def test_a_failed_promotion_keeps_the_old_base_and_the_next_delta_is_against_it(
        env: Env) -> None:
    old = old_base()
    env.bases.save(old)
    env.prepare()
    env.runner.on("lvchange", "--addtag", "sanoffload-base", f"datavg/{SNAP}")
    out, err, rc = fixture("lvm_lvrename_nodm")  # rc 5: "Failed to suspend"
    env.runner.on("lvrename", "datavg", SNAP, NEW_BASE, stdout=out, stderr=err, returncode=rc)
    lvremove_out, lvremove_err, _rc = load("lvremove_missing")
    env.runner.on("lvremove", "--yes", f"datavg/{NEW_BASE}", stdout=lvremove_out,
                  stderr=lvremove_err, returncode=5)
    env.agent.release(SID, committed=NEW_BACKUP)
    # the new snapshot went the usual way; the old base and its record are untouched
    assert "discard" in env.ctl.methods()
    assert not env.runner.called("lvremove", "--yes", f"datavg/{OLD_BASE}")
    assert env.bases.load(THIN_UUID) == old
    # next backup: the delta is against the old base (thin id 2, OLD_BACKUP)
    env.ctl.calls.clear()
    answer = env.prepare()
    assert answer.delta is not None and answer.delta.base == OLD_BACKUP


def test_an_interrupted_promotion_rolls_back_to_the_old_base(env: Env) -> None:
    old = old_base()
    # a crash after the intent, before the rename: lvs still shows the pair
    env.bases.save(old_base(name=NEW_BASE, uuid=SNAP_UUID, thin_id=3, backup=NEW_BACKUP,
                            state="promoting", previous={**old.to_dict(), "previous": None}))
    lvremove_out, lvremove_err, _rc = load("lvremove_missing")
    env.runner.on("lvremove", "--yes", f"datavg/{NEW_BASE}", stdout=lvremove_out,
                  stderr=lvremove_err, returncode=5)
    env.ctl.fail.clear()
    report = env.agent.cleanup()
    assert env.bases.load(THIN_UUID) == old
    assert report["bases"] == [f"base of datavg/thin: rolled back to {OLD_BASE}"]


# --------------------------------------------------------------------------
# cleanup and status
# --------------------------------------------------------------------------

def test_cleanup_never_takes_a_base_for_an_orphan(env: Env) -> None:
    old = old_base()
    env.bases.save(old)
    env.agent.cleanup()
    assert not env.runner.called("lvremove", "--yes", f"datavg/{OLD_BASE}")
    assert env.bases.load(THIN_UUID) == old
    # an unrecorded base-tagged LV is no orphan either (listed by status instead)
    env.bases.remove(THIN_UUID)
    env.agent.cleanup()
    assert not env.runner.called("lvremove", "--yes", f"datavg/{OLD_BASE}")
    rows = env.agent.base_rows()
    assert rows == [{"volume": "datavg/thin", "base": f"datavg/{OLD_BASE}",
                     "state": "unrecorded", "trusted": False,
                     "why": "no base record names it (lvremove it by hand)"}]


def test_the_local_controller_leaves_bases_out_of_its_orphans(tmp_path: Path) -> None:
    from sanoffload.agent.controller import Accounted, LocalController

    runner = FakeRunner().on("lvs", stdout=fixture("lvm_lvs_pair")[0])
    ctl = LocalController(runner, make_config(tmp_path), exporter=_NoLio())  # type: ignore[arg-type]
    names = [o.name for o in ctl.orphans(Accounted())]
    assert names == [SNAP]


class _NoLio:
    def ours(self) -> dict[str, list[str]]:
        return {"targets": [], "backstores": []}


def test_a_base_whose_volume_is_gone_is_dropped_with_a_log_line(
        env: Env, caplog: pytest.LogCaptureFixture) -> None:
    env.bases.save(old_base())
    env.lvs("lvm_lvs_origin_gone")
    env.runner.on("lvremove", "--yes", f"datavg/{OLD_BASE}")
    report = env.agent.cleanup()
    assert env.runner.called("lvremove", "--yes", f"datavg/{OLD_BASE}")
    assert env.bases.load(THIN_UUID) is None
    assert report["bases"] == [f"base datavg/{OLD_BASE} (its volume is gone)"]
    assert "its volume is gone" in caplog.text


def test_status_lists_the_bases(env: Env) -> None:
    env.bases.save(old_base())
    assert env.agent.base_rows() == [{
        "volume": "datavg/thin", "base": f"datavg/{OLD_BASE}", "backup": OLD_BACKUP,
        "thin_id": 2, "pool": "pool", "state": "kept", "trusted": True}]


def test_an_unreadable_base_record_stops_cleanup(env: Env) -> None:
    from sanoffload.errors import JournalError

    env.bases.dir.mkdir(parents=True)
    (env.bases.dir / f"{THIN_UUID}.json").write_text("{not json")
    with pytest.raises(JournalError, match="base record"):
        env.agent.cleanup()
    assert not env.runner.called("lvremove")


# --------------------------------------------------------------------------
# the wire
# --------------------------------------------------------------------------

class _Agent:
    """What AgentService asks of an agent, recording the release's committed."""

    def __init__(self, config: agent_config.Config) -> None:
        self.config = config
        self.released: list[tuple[str, str | None]] = []
        self.prepared: list[dict[str, Any]] = []

    def owner(self, session_id: str) -> str:
        return "px1"

    def release(self, session_id: str, *, committed: str | None = None) -> list[str]:
        self.released.append((session_id, committed))
        return []

    def close(self) -> None:
        pass


def test_release_passes_committed_on(tmp_path: Path) -> None:
    agent = _Agent(make_config(tmp_path))
    svc = AgentService(agent, "px1")  # type: ignore[arg-type]
    svc.handle("release", {"session_id": SID, "committed": NEW_BACKUP}, None)  # type: ignore[arg-type]
    svc.handle("release", {"session_id": SID}, None)  # type: ignore[arg-type]
    assert agent.released == [(SID, NEW_BACKUP), (SID, None)]


@pytest.mark.hostile("agent", "release's committed: not a backup id (a path, '..', a bad date, "
                              "control characters, 10 KB)",
                     "protocol error (11); nothing released, no base kept")
@pytest.mark.parametrize("bad", [
    "/etc/passwd", "fs1/../20261126T020000Z", "fs1/x/20261131T020000Z", "fs1/x/y/z",
    "fs1/x\n/20261126T020000Z", "fs1/x/20261126T020000Z\x1b[2J", "a" * 10_000, "",
])
def test_release_refuses_a_bad_committed(tmp_path: Path, bad: str) -> None:
    agent = _Agent(make_config(tmp_path))
    svc = AgentService(agent, "px1")  # type: ignore[arg-type]
    with pytest.raises(ProtocolError, match="committed"):
        svc.handle("release", {"session_id": SID, "committed": bad}, None)  # type: ignore[arg-type]
    assert agent.released == []


def test_the_agent_specs_take_image_and_committed() -> None:
    from sanoffload.agent.service import SPECS

    assert SPECS["prepare"].optional["image"] is bool
    assert SPECS["release"].optional["committed"] is str


def test_thin_bases_prepare_never_raises(tmp_path: Path) -> None:
    """An lvs failure is a warning and a full read, never a failed backup."""
    runner = FakeRunner().on("lvs", returncode=5, stderr="  Volume group \"datavg\" not found\n")
    bases = ThinBases(runner, make_config(tmp_path))
    out = bases.prepare(recorded_lv("thin"), SNAP)
    assert out.delta is None and out.keep is None and "full read" in out.warnings[0]


def test_agent_status_without_a_session_lists_the_bases(
        env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from sanoffload.agent import cli as agent_cli

    env.bases.save(old_base(thin_id=7))
    monkeypatch.setattr(agent_cli, "_agent", lambda app, path: env.agent)
    from sanoffload.cli import cli

    result = CliRunner().invoke(cli, ["agent", "status"])
    assert result.exit_code == 0, result.output
    assert f"datavg/thin  base datavg/{OLD_BASE}  {OLD_BACKUP}  kept  NOT TRUSTED: thin id 2, " \
           "recorded 7" in result.output
    result = CliRunner().invoke(cli, ["agent", "status", "--json"])
    assert json.loads(result.output)["bases"][0]["trusted"] is False
