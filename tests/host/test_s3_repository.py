"""``--store s3://…`` end to end against a real Ceph RGW (16.2, memstore, HTTPS, test CA).

The cluster is the host tier's session fixture ``ceph`` (tests/host/ceph_fixture.py):
users ``maint`` (owns buckets) and ``proxy`` (``--max-buckets=-1``). If it cannot
start, these tests fail with its reason (never skip).

What runs is what the CLI runs: ``sanoffload store init-s3`` as maint, then
:func:`~sanoffload.proxy.offhost.run_offhost_backup` with ``--store s3://…`` as the
proxy profile (the store opened in-process by ``sanoffload.store.open``, as the
``backup`` command does), and ``sanoffload restore|list|verify|prune`` through
``sanoffload.cli.run``. Only the first server is a stand-in (the unit tier's fake
agent over the real control channel) and the duplicate is attached by a stand-in:
the tar backup reads a real directory tree with the real tar and zstd, the image
backup a real read-only loop device with O_DIRECT. Every object goes through the
production S3 client and the encrypting backend.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from sanoffload import cli
from sanoffload.agent.service import AgentService
from sanoffload.channel.client import in_process_connector
from sanoffload.channel.server import serve
from sanoffload.errors import AuthError
from sanoffload.proxy.offhost import Location, run_offhost_backup
from sanoffload.runner import CommandRunner, Runner
from sanoffload.store import open as store_open
from sanoffload.store.backend_s3 import S3Backend
from sanoffload.store.keys import MIN_N, RepoKeys, write_key_file, write_raw_key_file
from sanoffload.store.repo import BackupId
from tests.unit.test_proxy_image_offhost import FakeBlockAttach, ImageAgent
from tests.unit.test_proxy_offhost import INITIATOR, FakeAgent, FakeAttach

from .ceph_fixture import ceph  # noqa: F401  (the session cluster fixture)

pytestmark = pytest.mark.host

BUCKET = "h8-repo"
URL = f"s3://{BUCKET}/site-a"
LOCKED_BUCKET = "h8-locked"
LOCKED_URL = f"s3://{LOCKED_BUCKET}/site-a"
#: planted in a source file, in the backed-up path and in the volume: never in the bucket
MARKER = b"H8-PLAINTEXT-MARKER-7f3a9c"
PASSPHRASE = "h8 correct horse battery"
CS = 4 << 20


@dataclass
class Site:
    """The s3.toml, the keys, and a CLI runner that reads them."""

    dir: Path
    config: str
    cluster: Any

    def url(self, profile: str) -> str:
        return f"{URL}?profile={profile}"

    def run(self, *argv: str) -> int:
        return cli.run(list(argv))


def _private(path: Path, text: str) -> str:
    path.write_text(text)
    path.chmod(0o600)
    return str(path)


@pytest.fixture(scope="module")
def site(ceph: Any) -> Iterator[Site]:  # noqa: F811 (the imported fixture, by name)
    """Profiles ``proxy`` (raw key, role proxy), ``maint`` (passphrase-protected key, role
    maint), and two wrong ones: ``wrongkey`` (another repository's key) and
    ``wrongpass``; the repository made by ``store init-s3`` as maint."""
    d = Path(tempfile.mkdtemp(prefix="sanoffload-h8-", dir="/var/tmp"))
    keys = RepoKeys.generate()
    write_raw_key_file(d / "proxy.key", keys)
    write_key_file(d / "maint.key", keys, PASSPHRASE, n=MIN_N)
    write_raw_key_file(d / "other.key", RepoKeys.generate())
    good = _private(d / "maint.pass", PASSPHRASE + "\n")
    bad = _private(d / "wrong.pass", "not the passphrase\n")
    common = (f'endpoints = {json.dumps(list(ceph.endpoints))}\n'
              f'prefix = "site-a"\nca_file = "{ceph.ca}"\npart_size = "5MiB"\n')

    def profile(name: str, user: Any, role: str, extra: str, bucket: str = BUCKET) -> str:
        return (f"[profiles.{name}]\n{common}bucket = \"{bucket}\"\n"
                f"access_key = \"{user.access_key}\"\n"
                f"secret_key = \"{user.secret_key}\"\nrole = \"{role}\"\n{extra}\n")

    text = (profile("proxy", ceph.proxy, "proxy", f'key_file = "{d}/proxy.key"')
            + profile("maint", ceph.maint, "maint",
                      f'key_file = "{d}/maint.key"\npassphrase_file = "{good}"')
            + profile("wrongkey", ceph.proxy, "proxy", f'key_file = "{d}/other.key"')
            + profile("wrongpass", ceph.proxy, "proxy",
                      f'key_file = "{d}/maint.key"\npassphrase_file = "{bad}"')
            # a second repository, in a bucket with Object Lock
            + profile("lockmaint", ceph.maint, "maint", f'key_file = "{d}/proxy.key"',
                      LOCKED_BUCKET)
            + profile("lockproxy", ceph.proxy, "proxy", f'key_file = "{d}/proxy.key"',
                      LOCKED_BUCKET))
    config = _private(d / "s3.toml", text)
    old = os.environ.get(store_open.CONFIG_ENV)
    os.environ[store_open.CONFIG_ENV] = config
    try:
        yield Site(d, config, ceph)
    finally:
        if old is None:
            os.environ.pop(store_open.CONFIG_ENV, None)
        else:
            os.environ[store_open.CONFIG_ENV] = old
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def initialised(site: Site) -> Site:
    assert site.run("store", "init-s3", URL, "--profile", "maint", "--proxy-user", "proxy",
                    "--json") == 0
    return site


def _maint_client(site: Site) -> Any:
    from sanoceph.s3 import client

    return client(site.cluster, "maint")


def test_init_s3_makes_the_bucket_the_policy_and_the_config_and_is_idempotent(
        initialised: Site, capsys: pytest.CaptureFixture[str]) -> None:
    s3 = _maint_client(initialised)
    assert s3.get_bucket_versioning(Bucket=BUCKET)["Status"] == "Enabled"
    policy = json.loads(s3.get_bucket_policy(Bucket=BUCKET)["Policy"])
    deny = [st for st in policy["Statement"] if st["Effect"] == "Deny"]
    assert deny and "s3:DeleteObjectVersion" in deny[0]["Action"]
    raw = s3.get_object(Bucket=BUCKET, Key="site-a/config")["Body"].read()
    config = json.loads(raw)
    assert config["encryption"] == "client" and len(config["repo_id"]) == 32
    capsys.readouterr()
    # again: nothing to create, the config is left as it is and read back
    assert initialised.run("store", "init-s3", URL, "--profile", "maint",
                           "--proxy-user", "proxy") == 0
    out = capsys.readouterr().out
    assert "bucket      exists" in out and "config      already there" in out
    # a proxy profile may not set up a repository (its credentials could not anyway)
    assert initialised.run("store", "init-s3", URL, "--profile", "proxy") == 10
    assert "the bucket's owner" in capsys.readouterr().err


def _source_tree(root: Path) -> Path:
    src = root / "src"
    (src / "etc").mkdir(parents=True)
    # random bytes around the marker: zstd stores such a block raw, so an unencrypted
    # repository would hold the marker as it is (the scan below would see it)
    (src / "etc" / "secret.conf").write_bytes(os.urandom(5000) + MARKER + os.urandom(5000))
    (src / "big.bin").write_bytes(os.urandom(3 << 20))
    (src / "empty").mkdir()
    (src / "link").symlink_to("etc/secret.conf")
    os.chmod(src / "etc" / "secret.conf", 0o640)
    return src


def _tree(root: Path) -> dict[str, tuple[int, bytes]]:
    out: dict[str, tuple[int, bytes]] = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        body = (os.readlink(p).encode() if p.is_symlink() else
                p.read_bytes() if p.is_file() else b"")
        out[str(p.relative_to(root))] = (stat.S_IFMT(st.st_mode) | stat.S_IMODE(st.st_mode),
                                         body)
    return out


def _agent_conn(agent: Any) -> Any:
    return in_process_connector(lambda ch: serve(agent, ch), peer="fs1")


@pytest.fixture(scope="module")
def tar_backup(initialised: Site) -> tuple[Site, str, Path]:
    """A tar backup of a real tree through S3, as the proxy (``backup --store s3://…``)."""
    src = _source_tree(initialised.dir)
    agent = FakeAgent()
    summary = run_offhost_backup(
        CommandRunner(), Location("fs1", "/srv/" + MARKER.decode()),
        Location(None, initialised.url("proxy")), initiator=INITIATOR, timeout=120,
        agent_conn=_agent_conn(AgentService(agent, "px1", sleep=lambda s: None)),  # type: ignore[arg-type]
        attach_fn=FakeAttach(src))
    assert summary["store"] == initialised.url("proxy")
    return initialised, str(summary["backup_id"]), src


@pytest.fixture(scope="module")
def image_backup(initialised: Site, host_runner: Runner) -> Iterator[tuple[Site, str, Path]]:
    """An image backup of a real read-only loop device through S3, as the proxy."""
    backing = initialised.dir / "volume.img"
    with open(backing, "wb") as f:
        f.write(os.urandom(CS))
        f.write(bytes(CS))  # a zero chunk: stored as nothing
        f.write(os.urandom(CS // 2) + MARKER + os.urandom(CS // 2 - len(MARKER)))
        f.write(os.urandom(4096 + 512))  # a short last chunk
    device = host_runner.run(["losetup", "--find", "--show", "--read-only",
                              str(backing)]).stdout.strip()
    try:
        events: list[str] = []
        summary = run_offhost_backup(
            CommandRunner(), Location("fs1", "/srv/thin"), Location(None, initialised.url("proxy")),
            initiator=INITIATOR, timeout=120, agent_conn=_agent_conn(ImageAgent()), image=True,
            attach_block_fn=FakeBlockAttach(Path(device), events))
        assert summary["kind"] == "image" and events == ["attach", "detached"]
        yield initialised, str(summary["backup_id"]), backing
    finally:
        host_runner.run(["losetup", "-d", device], ok_codes={1: "already detached"})


def test_a_tar_backup_round_trips_through_s3_encrypted(
        tar_backup: tuple[Site, str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    site, bid, src = tar_backup
    capsys.readouterr()
    assert site.run("list", "--store", site.url("proxy"), "--json") == 0
    assert bid in [b["id"] for b in json.loads(capsys.readouterr().out)]
    assert site.run("verify", "--store", site.url("proxy"), bid) == 0
    target = site.dir / "restored-tar"
    assert site.run("restore", "--store", site.url("proxy"), bid, str(target)) == 0
    assert _tree(target) == _tree(src)
    # the maintenance host reads what the proxy uploaded (the policy's reader statement)
    assert site.run("store", "--repo", site.url("maint"), "verify", bid) == 0


def test_an_image_backup_round_trips_through_s3_encrypted(
        image_backup: tuple[Site, str, Path]) -> None:
    site, bid, backing = image_backup
    out = site.dir / "restored.img"
    assert site.run("restore", "--store", site.url("proxy"), bid, "--image", str(out)) == 0
    assert hashlib.sha256(out.read_bytes()).digest() == \
        hashlib.sha256(backing.read_bytes()).digest()
    out.unlink()
    assert site.run("store", "--repo", site.url("maint"), "restore", bid, "--image",
                    str(out)) == 0
    assert out.read_bytes() == backing.read_bytes()


def _every_version(site: Site) -> Iterator[tuple[str, str, bytes]]:
    s3 = _maint_client(site)
    pages = s3.get_paginator("list_object_versions").paginate(Bucket=BUCKET)
    for page in pages:
        for v in page.get("Versions", []):
            body = s3.get_object(Bucket=BUCKET, Key=v["Key"], VersionId=v["VersionId"])
            yield v["Key"], v["VersionId"], body["Body"].read()


def test_no_object_version_in_the_bucket_holds_the_plaintext_marker(
        tar_backup: tuple[Site, str, Path], image_backup: tuple[Site, str, Path]) -> None:
    site = tar_backup[0]
    # the scan would see it: the restored archive stream holds the marker as stored
    # in plaintext form (zstd keeps random data raw)
    archive = site.dir / "stream.tar.zst"
    with open(archive, "wb") as f:
        from sanoffload.store.restore import stream_out

        repo = store_open.open_store(site.url("proxy"), CommandRunner())
        stream_out(repo, tar_backup[1], f)
    assert MARKER in archive.read_bytes()
    seen = 0
    for key, version, body in _every_version(site):
        seen += 1
        assert MARKER not in body, f"plaintext marker in {key} (version {version})"
        # keys are the repository layout's (host/slug/timestamp names): not checked here
    # config, the tar backup (archive, manifest), the image backup (map, manifest, chunks)
    assert seen >= 6


@pytest.mark.hostile("store", "an S3 repository opened with another repository's key or the "
                     "wrong passphrase", "exit 15, the message names the repository and why")
@pytest.mark.parametrize(("profile", "said"), [
    ("wrongkey", "is for repository"),
    ("wrongpass", "wrong passphrase for key file"),
])
def test_a_wrong_key_or_passphrase_fails_clearly(
        initialised: Site, capsys: pytest.CaptureFixture[str], profile: str,
        said: str) -> None:
    capsys.readouterr()
    assert initialised.run("list", "--store", initialised.url(profile)) == 15
    err = capsys.readouterr().err
    assert f"{URL}: " in err and said in err


@pytest.mark.hostile("store", "prune and deletes with the proxy's S3 credentials",
                     "refused: prune exit 10 before anything goes, the engine answers 403 to "
                     "a delete, every backup stays")
def test_the_proxy_profile_cannot_delete(tar_backup: tuple[Site, str, Path],
                                         capsys: pytest.CaptureFixture[str]) -> None:
    site, bid, _ = tar_backup
    capsys.readouterr()
    assert site.run("prune", "--store", site.url("proxy"), "--keep-last", "1") == 10
    assert "never delete" in capsys.readouterr().err
    # and were a proxy to try anyway (a taken-over proxy), the engine refuses it
    prof = store_open.s3_profile(site.url("proxy"))
    backend = S3Backend(prof)
    keys = [i.key for i in backend.list("")]
    manifest = next(k for k in keys if k.endswith(".json"))
    with pytest.raises(AuthError, match="refused for profile 'proxy'"):
        backend.delete(manifest)
    version = backend.versions(manifest)[0].version
    with pytest.raises(AuthError, match="deleting is the maint role's"):
        backend.delete(manifest, version=version)
    assert site.run("list", "--store", site.url("proxy")) == 0
    assert bid in capsys.readouterr().out


class _FrozenLater(FakeAgent):
    """The fake agent, its duplicate made ``shift`` seconds later (a later backup id)."""

    def __init__(self, shift: float) -> None:
        super().__init__()
        self.shift = shift

    def prepare(self, *args: Any, **kwargs: Any) -> Any:
        answer = super().prepare(*args, **kwargs)
        answer.data["frozen_at"] += self.shift
        answer.data["lease_expires"] += self.shift
        return answer


@pytest.mark.hostile("store", "prune and gc by the maintenance role of backups under Object Lock "
                     "(COMPLIANCE) retention", "each retained backup is kept whole and reported "
                     "'retained ID until DATE', exit 0; every object is still there")
def test_object_lock_keeps_backups_from_the_maintenance_role(
        site: Site, capsys: pytest.CaptureFixture[str]) -> None:
    assert site.run("store", "init-s3", LOCKED_URL, "--profile", "lockmaint", "--proxy-user",
                    "proxy", "--object-lock", "compliance", "--days", "1") == 0
    src = _source_tree(site.dir / "locked-src")
    ids = []
    for hours in (0, 1):
        summary = run_offhost_backup(
            CommandRunner(), Location("fs1", "/srv/locked"),
            Location(None, f"{LOCKED_URL}?profile=lockproxy"), initiator=INITIATOR,
            timeout=120,
            agent_conn=_agent_conn(AgentService(_FrozenLater(hours * 3600), "px1",  # type: ignore[arg-type]
                                                sleep=lambda s: None)),
            attach_fn=FakeAttach(src))
        ids.append(str(summary["backup_id"]))
    assert len(set(ids)) == 2
    backend = S3Backend(store_open.s3_profile(f"{LOCKED_URL}?profile=lockmaint"))
    before = sorted((i.key, i.size) for i in backend.list(""))
    capsys.readouterr()

    maint = f"{LOCKED_URL}?profile=lockmaint"
    assert site.run("prune", "--store", maint, "--keep-last", "1") == 0
    out = capsys.readouterr().out
    assert f"retained {ids[0]} until " in out and "0 removed, 1 retained" in out, out
    assert site.run("store", "--repo", maint, "gc", "--grace", "0") == 0
    assert sorted((i.key, i.size) for i in backend.list("")) == before
    capsys.readouterr()
    assert site.run("list", "--store", maint, "--json") == 0
    assert sorted(b["id"] for b in json.loads(capsys.readouterr().out)) == sorted(ids)
    assert site.run("verify", "--store", maint, ids[0]) == 0

    # a backup kept long (a monthly) is held longer: lock-extend, through PutObjectRetention
    assert site.run("store", "--repo", f"{LOCKED_URL}?profile=lockproxy", "lock-extend",
                    "--days", "3", ids[0]) == 10
    capsys.readouterr()
    assert site.run("store", "--repo", maint, "lock-extend", "--days", "3", ids[0]) == 0
    assert f"held   {ids[0]} until " in capsys.readouterr().out
    repo = store_open.open_store(maint, CommandRunner())
    floor = time.time() + 2.9 * 86400
    for key in repo._objects_of(BackupId.parse(ids[0])):
        for v in repo.backend.versions(key):
            assert v.retain_until is not None and v.retain_until > floor, (key, v)
    later = repo.backend.versions(repo._objects_of(BackupId.parse(ids[1]))[0])
    assert all(v.retain_until is not None and v.retain_until < floor for v in later)
