"""``sanoffload.store.open``: a ``--store``/``--repo`` value made into a repository.

S3 repositories are opened through a profile of a real s3.toml written here, on
:class:`~sanoffload.testing.MemoryBackend` (the factory stands in for the S3
client: the layers above the seam are what is tested); the real RGW is
tests/host/test_s3_repository.py's. Key files are real (scrypt at its lowest cost).
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sanoffload import cli
from sanoffload.errors import (
    AuthError,
    ConfigError,
    RepositoryKeyError,
    UsageError,
)
from sanoffload.proxy import jobs
from sanoffload.proxy.offhost import Location, parse_location
from sanoffload.runner import CommandRunner
from sanoffload.store import open as store_open, s3config
from sanoffload.store.backend import Backend
from sanoffload.store.backend_crypt import EncryptedBackend, init_config
from sanoffload.store.keys import MIN_N, RepoKeys, write_key_file, write_raw_key_file
from sanoffload.store.repo import Repository
from sanoffload.store.s3config import Encryption, Role, S3Profile
from sanoffload.testing import MemoryBackend

from .conftest import make_archive

pytestmark = pytest.mark.unit

URL = "s3://backups/site-a"
FROZEN = "2026-11-26T10:29:33Z"


class Store:
    """One in-memory "bucket" per (bucket, prefix), as the S3 factory would reach it."""

    def __init__(self) -> None:
        self.buckets: dict[str, MemoryBackend] = {}
        self.made: list[S3Profile] = []

    def __call__(self, profile: S3Profile) -> Backend:
        self.made.append(profile)
        backend = self.at(profile.location)
        backend.profile = profile  # type: ignore[attr-defined]  # as S3Backend carries it
        return backend

    def at(self, location: str = URL) -> MemoryBackend:
        if location not in self.buckets:
            self.buckets[location] = MemoryBackend()
            self.buckets[location].location = location  # as S3Backend names itself
        return self.buckets[location]


def write_config(tmp_path: Path, **profiles: dict[str, Any]) -> str:
    lines = []
    for name, body in profiles.items():
        lines.append(f"[profiles.{name}]")
        for k, v in {"endpoints": ["https://rgw.example:7480"], "bucket": "backups",
                     "prefix": "site-a", "access_key": "ACCESS", "secret_key": "secret",
                     "role": "proxy", **body}.items():
            lines.append(f"{k} = {json.dumps(v)}")
    path = tmp_path / "s3.toml"
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o600)
    return str(path)


@pytest.fixture
def keys() -> RepoKeys:
    return RepoKeys.generate()


@pytest.fixture
def raw_key(tmp_path: Path, keys: RepoKeys) -> str:
    path = tmp_path / "repo.key"
    write_raw_key_file(path, keys)
    return str(path)


@pytest.fixture
def wrapped_key(tmp_path: Path, keys: RepoKeys) -> str:
    path = tmp_path / "wrapped.key"
    write_key_file(path, keys, "correct horse", n=MIN_N)
    return str(path)


def secret_file(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    path.chmod(0o600)
    return str(path)


def no_terminal(prompt: str) -> str:
    raise AssertionError("a passphrase was asked at the terminal")


# -- what a value names --------------------------------------------------------------------------
def test_a_local_directory_is_todays_repository(tmp_path: Path) -> None:
    repo = store_open.open_store(str(tmp_path))
    assert repo.root == tmp_path and repo.local is not None


@pytest.mark.hostile("store", "a --repo that is relative, remote or names no directory",
                     "usage error (exit 2) saying what a repository value is")
@pytest.mark.parametrize(("value", "said"), [
    ("backups", "an absolute /PATH or an s3://BUCKET/PREFIX URL"),
    ("bk1:/srv/backups", "reached through its store"),
    ("", "give a directory or an s3:// URL"),
    ("/nonexistent/repo-h8", "no such repository directory"),
    ("s3://Not_A_Bucket/x", "invalid bucket name"),
    ("s3://backups/a/../b", "invalid object key"),
    ("s3://backups/x?endpoint=https://evil", "unknown URL parameter"),
])
def test_values_that_name_no_repository_here(tmp_path: Path, value: str, said: str) -> None:
    with pytest.raises(UsageError, match=said.replace("(", r"\(")) as err:
        store_open.open_store(value, path=write_config(tmp_path, px1={}), factory=Store())
    assert err.value.exit_code == 2


def test_parse_location_keeps_an_s3_url_whole_and_checks_it() -> None:
    loc = parse_location("s3://backups/site-a?profile=px1", "--store")
    assert loc == Location(None, "s3://backups/site-a?profile=px1") and loc.is_s3
    assert not parse_location("/srv/backups", "--store").is_s3
    with pytest.raises(UsageError, match="invalid bucket name"):
        parse_location("s3://B/x", "--store")


def test_a_job_may_name_an_s3_store() -> None:
    job = jobs.parse("data", 'source = "fs1:/srv/data"\nstore = "s3://backups/site-a?profile=px1"\n')
    assert job.store_host is None and job.store_path == "s3://backups/site-a?profile=px1"
    assert job.store == "s3://backups/site-a?profile=px1"


@pytest.mark.hostile("store", "a job whose s3:// store is malformed", "ConfigError naming the "
                     "file and the key")
def test_a_job_with_a_bad_s3_store_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"jobs/x.toml: store: .*unknown URL parameter"):
        jobs.parse("x", 'source = "fs1:/srv/data"\nstore = "s3://backups/a?x=1"\n',
                   "/etc/sanoffload/jobs/x.toml")


# -- profile key settings --------------------------------------------------------------------------
def test_profile_key_settings_are_read(tmp_path: Path) -> None:
    path = write_config(tmp_path, px1={"key_file": "/etc/sanoffload/repo.key",
                                       "passphrase_file": "/etc/sanoffload/repo.pass"},
                        plain={"encryption": "none"})
    cfg = s3config.read(path)
    px1 = s3config.profile(cfg, "px1")
    assert (px1.encryption, px1.key_file, px1.passphrase_file) == (
        Encryption.CLIENT, "/etc/sanoffload/repo.key", "/etc/sanoffload/repo.pass")
    plain = s3config.profile(cfg, "plain")
    assert plain.encryption is Encryption.NONE and plain.key_file is None


@pytest.mark.hostile("store", "an s3.toml key setting that is relative, has '..', a newline, "
                     "a wrong type or contradicts encryption",
                     "ConfigError naming the profile's key")
@pytest.mark.parametrize(("body", "said"), [
    ({"key_file": "repo.key"}, r"px1\.key_file: an absolute path"),
    ({"key_file": "/etc/../root/repo.key"}, r"px1\.key_file: an absolute path"),
    ({"key_file": "/etc/repo.key\n[profiles.evil]"}, r"px1\.key_file: an absolute path"),
    ({"key_file": 7}, r"px1\.key_file: an absolute path"),
    ({"passphrase_file": "/etc/p"}, r"px1\.passphrase_file: is the passphrase of a key_file"),
    ({"encryption": "aes"}, r"px1\.encryption: \"client\" or \"none\""),
    ({"encryption": ["none"]}, r"px1\.encryption: \"client\" or \"none\""),
    ({"encryption": "none", "key_file": "/k"}, r"takes no key_file"),
])
def test_hostile_key_settings_are_refused(tmp_path: Path, body: dict[str, Any],
                                          said: str) -> None:
    with pytest.raises(ConfigError, match=said):
        s3config.read(write_config(tmp_path, px1=body))


# -- opening an S3 repository --------------------------------------------------------------------
def test_an_encrypted_s3_repository_opens_with_a_raw_key_and_round_trips(
        tmp_path: Path, keys: RepoKeys, raw_key: str) -> None:
    store = Store()
    init_config(store.at(), keys)
    path = write_config(tmp_path, px1={"key_file": raw_key})
    repo = store_open.open_store(URL, CommandRunner(), path=path, factory=store)
    assert isinstance(repo.backend, EncryptedBackend) and repo.location == URL
    assert store.made[0].name == "px1" and store.made[0].prefix == "site-a"
    src = tmp_path / "src"
    src.mkdir()
    (src / "marker.txt").write_bytes(b"PLAINTEXT-MARKER-h8\n" * 50)
    bid = repo.put("fs1", "/srv/data", io.BytesIO(make_archive(src)), {"frozen_at": FROZEN})
    again = store_open.open_store(URL, CommandRunner(), path=path, factory=store)
    assert [b.id for b in again.list()] == [bid]
    # what the "bucket" holds is sealed: no plaintext of the marker in any object
    mem = store.at()
    for info in mem.list(""):
        assert b"PLAINTEXT-MARKER" not in mem.get(info.key, max_bytes=1 << 26)


def test_a_passphrase_protected_key_opens_with_the_profiles_passphrase_file(
        tmp_path: Path, keys: RepoKeys, wrapped_key: str) -> None:
    store = Store()
    init_config(store.at(), keys)
    pw = secret_file(tmp_path, "pass", "correct horse\n")
    path = write_config(tmp_path, px1={"key_file": wrapped_key, "passphrase_file": pw})
    repo = store_open.open_s3(URL, path=path, factory=store)
    assert isinstance(repo.backend, EncryptedBackend) and repo.backend.keys == keys


def test_the_passphrase_may_come_from_the_environment(tmp_path: Path, keys: RepoKeys,
                                                      wrapped_key: str) -> None:
    store = Store()
    init_config(store.at(), keys)
    prof = store_open.s3_profile(URL, path=write_config(tmp_path, px1={"key_file": wrapped_key}))
    backend = store_open.open_backend(prof, factory=store,
                                      environ={"SANOFFLOAD_PASSPHRASE": "correct horse"},
                                      ask=no_terminal)
    assert isinstance(backend, EncryptedBackend)


@pytest.mark.hostile("store", "the wrong passphrase for an S3 repository's key file",
                     "RepositoryKeyError (exit 15) naming the repository and the key file")
def test_a_wrong_passphrase_names_the_repository(tmp_path: Path, keys: RepoKeys,
                                                 wrapped_key: str) -> None:
    store = Store()
    init_config(store.at(), keys)
    pw = secret_file(tmp_path, "pass", "wrong horse\n")
    path = write_config(tmp_path, px1={"key_file": wrapped_key, "passphrase_file": pw})
    with pytest.raises(RepositoryKeyError, match=rf"^{URL}: wrong passphrase for key file "
                       rf".*wrapped.key \(repository {keys.repo_id_hex}\)") as err:
        store_open.open_s3(URL, path=path, factory=store)
    assert err.value.exit_code == 15


@pytest.mark.hostile("store", "an encrypted S3 repository and a profile with no key_file",
                     "RepositoryKeyError (exit 15) naming the repository and the profile")
def test_no_key_file_for_an_encrypted_repository(tmp_path: Path, keys: RepoKeys) -> None:
    store = Store()
    init_config(store.at(), keys)
    path = write_config(tmp_path, px1={})
    with pytest.raises(RepositoryKeyError, match=rf"{URL} is an encrypted repository "
                       rf"\({keys.repo_id_hex}\), and profile 'px1' of .* names no key_file"):
        store_open.open_s3(URL, path=path, factory=store)


@pytest.mark.hostile("store", "a key file that is not there", "RepositoryKeyError (exit 15) "
                     "naming the repository and the file")
def test_a_missing_key_file(tmp_path: Path, keys: RepoKeys) -> None:
    store = Store()
    init_config(store.at(), keys)
    path = write_config(tmp_path, px1={"key_file": str(tmp_path / "gone.key")})
    with pytest.raises(RepositoryKeyError, match=rf"^{URL}: no key file .*gone.key"):
        store_open.open_s3(URL, path=path, factory=store)


@pytest.mark.hostile("store", "a key file of another repository", "RepositoryKeyError (exit 15) "
                     "naming both repository ids and the location")
def test_a_key_of_another_repository(tmp_path: Path, raw_key: str) -> None:
    store = Store()
    other = RepoKeys.generate()
    init_config(store.at(), other)
    path = write_config(tmp_path, px1={"key_file": raw_key})
    with pytest.raises(RepositoryKeyError, match=rf"^{URL}: key file .* is for repository "
                       rf"[0-9a-f]{{32}}, not for this repository \({other.repo_id_hex}\)"):
        store_open.open_s3(URL, path=path, factory=store)


def test_a_passphrase_nowhere_is_a_key_error_not_a_prompt(tmp_path: Path, keys: RepoKeys,
                                                          wrapped_key: str) -> None:
    store = Store()
    init_config(store.at(), keys)
    prof = store_open.s3_profile(URL, path=write_config(tmp_path, px1={"key_file": wrapped_key}))
    with pytest.raises(RepositoryKeyError, match="needs its passphrase"):
        # stdin is not a terminal under pytest, no file, no variable
        store_open.open_backend(prof, factory=store, environ={})


@pytest.mark.hostile("store", "a store whose config was rewritten to encryption none",
                     "RepositoryKeyError (exit 15): never written or read as plaintext")
def test_a_client_profile_refuses_a_plaintext_repository(tmp_path: Path, raw_key: str) -> None:
    store = Store()
    init_config(store.at(), None)
    path = write_config(tmp_path, px1={"key_file": raw_key})
    with pytest.raises(RepositoryKeyError, match="says encryption 'none'"):
        store_open.open_s3(URL, path=path, factory=store)


def test_encryption_none_opens_a_plain_repository_and_refuses_an_encrypted_one(
        tmp_path: Path, keys: RepoKeys) -> None:
    path = write_config(tmp_path, plain={"encryption": "none"})
    store = Store()
    init_config(store.at(), None)
    repo = store_open.open_s3(URL, path=path, factory=store)
    assert repo.backend is store.at()
    sealed = Store()
    init_config(sealed.at(), keys)
    with pytest.raises(RepositoryKeyError, match=r"is an encrypted repository .* says "
                       r"encryption = \"none\""):
        store_open.open_s3(URL, path=path, factory=sealed)


def test_an_empty_location_is_not_a_repository_yet(tmp_path: Path, raw_key: str) -> None:
    path = write_config(tmp_path, px1={"key_file": raw_key})
    with pytest.raises(UsageError, match="no sanoffload repository there") as err:
        store_open.open_s3(URL, path=path, factory=Store())
    assert "init-s3" in str(err.value.hint)


def test_profile_given_twice_must_agree(tmp_path: Path) -> None:
    path = write_config(tmp_path, px1={}, maint={"role": "maint"})
    assert store_open.s3_profile(URL + "?profile=maint", path=path).role is Role.MAINT
    assert store_open.s3_profile(URL, profile="maint", path=path).role is Role.MAINT
    with pytest.raises(UsageError, match="give one"):
        store_open.s3_profile(URL + "?profile=px1", profile="maint", path=path)


# -- deleting is the maint role's ----------------------------------------------------------------
def cli_with(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, store: Store,
             **profiles: dict[str, Any]) -> Callable[..., int]:
    monkeypatch.setenv(store_open.CONFIG_ENV, write_config(tmp_path, **profiles))
    monkeypatch.setattr(store_open, "_default_factory", store)
    return lambda *argv: cli.run(list(argv))


@pytest.mark.hostile("store", "prune and gc on S3 with a proxy profile", "refused before "
                     "anything is removed (exit 10), saying deleting is the maint role's")
def test_prune_and_gc_with_a_proxy_profile_are_refused(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, keys: RepoKeys, raw_key: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    store = Store()
    init_config(store.at(), keys)
    run = cli_with(monkeypatch, tmp_path, store, px1={"key_file": raw_key})
    assert run("store", "--repo", URL, "prune", "--keep-last", "1") == 10
    assert 'role "proxy", which may add and read backups but never delete them' in \
        capsys.readouterr().err
    assert run("prune", "--store", URL, "--keep-last", "1") == 10
    assert run("store", "--repo", URL, "gc") == 10
    # a dry run deletes nothing: allowed
    assert run("store", "--repo", URL, "prune", "--keep-last", "1", "--dry-run") == 0
    assert run("store", "--repo", URL, "list") == 0
    assert "no backups" in capsys.readouterr().out


def test_the_store_cli_lists_an_s3_repository(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                              keys: RepoKeys, raw_key: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    store = Store()
    init_config(store.at(), keys)
    repo = Repository.on(EncryptedBackend(store.at(), keys), CommandRunner())
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(b"a\n")
    bid = repo.put("fs1", "/srv/data", io.BytesIO(make_archive(src)), {"frozen_at": FROZEN})
    run = cli_with(monkeypatch, tmp_path, store, maint={"key_file": raw_key, "role": "maint"})
    assert run("store", "--repo", URL, "list", "--json") == 0
    assert [b["id"] for b in json.loads(capsys.readouterr().out)] == [str(bid)]
    assert run("list", "--store", URL) == 0
    assert str(bid) in capsys.readouterr().out


def test_lock_extend_on_the_command_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                        keys: RepoKeys, raw_key: str,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    store = Store()
    locked = store.buckets[URL] = MemoryBackend(versioned=True, retain_until=time.time() + 60)
    locked.location = URL
    init_config(locked, keys)
    repo = Repository.on(EncryptedBackend(locked, keys), CommandRunner())
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(b"a\n")
    ids = [str(repo.put("fs1", "/srv/data", io.BytesIO(make_archive(src)), {"frozen_at": t}))
           for t in (FROZEN, "2026-11-27T10:29:33Z")]
    run = cli_with(monkeypatch, tmp_path, store, maint={"key_file": raw_key, "role": "maint"},
                   px1={"key_file": raw_key})
    maint = URL + "?profile=maint"
    assert run("store", "--repo", URL + "?profile=px1", "lock-extend", "--days", "30") == 10
    assert run("store", "--repo", maint, "lock-extend", "--days", "30", ids[0],
               "--host", "fs1") == 2
    capsys.readouterr()
    floor = time.time() + 29 * 86400
    assert run("store", "--repo", maint, "lock-extend", "--days", "30", "--json") == 0
    done = json.loads(capsys.readouterr().out)
    assert [h["id"] for h in done["held"]] == ids and done["failed"] == []
    assert all(h["objects"] == 2 and h["chunks"] == 0 for h in done["held"])  # manifest, archive
    held = [v for k, vs in locked.objects.items() if k != "config" for v, _ in vs]
    assert held and all(v.retain_until is not None and v.retain_until > floor for v in held)


@pytest.mark.hostile("store", "a wrong key for an S3 repository on the command line",
                     "exit 15, the message names the repository")
def test_the_cli_exits_15_for_a_wrong_key(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                          raw_key: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    store = Store()
    init_config(store.at(), RepoKeys.generate())
    run = cli_with(monkeypatch, tmp_path, store, px1={"key_file": raw_key})
    assert run("store", "--repo", URL, "list") == 15
    assert f"{URL}: key file" in capsys.readouterr().err


# -- init-s3: what is checked before any request ----------------------------------------------
def test_the_policy_gives_proxies_no_delete_and_maint_read_and_hold() -> None:
    policy = store_open.bucket_policy("backups", ["px1", "site2$px2"], "maint")
    allow, deny, maint = policy["Statement"]
    assert allow["Principal"] == deny["Principal"] == {
        "AWS": ["arn:aws:iam:::user/px1", "arn:aws:iam::site2:user/px2"]}
    assert allow["Effect"] == "Allow" and deny["Effect"] == "Deny"
    assert not any("Delete" in a or "Retention" in a or "Policy" in a for a in allow["Action"])
    for needed in ("s3:DeleteObject", "s3:DeleteObjectVersion", "s3:BypassGovernanceRetention",
                   "s3:PutBucketPolicy", "s3:PutLifecycleConfiguration",
                   "s3:PutBucketVersioning"):
        assert needed in deny["Action"]
    assert maint["Principal"] == {"AWS": ["arn:aws:iam:::user/maint"]}
    assert maint["Resource"] == ["arn:aws:s3:::backups/*"]
    # maint reads what the proxies upload and may hold it longer (lock-extend), nothing more:
    # it deletes as the bucket's owner
    assert set(maint["Action"]) == {"s3:GetObject", "s3:GetObjectVersion",
                                    "s3:GetObjectRetention", "s3:PutObjectRetention"}


@pytest.mark.hostile("store", "a --proxy-user that would inject into the policy's ARN",
                     "usage error (exit 2), nothing sent")
@pytest.mark.parametrize("uid", ["px1\"}]", "a/b", "", "x" * 65, "t$", "px 1", "*"])
def test_hostile_user_ids_are_refused(tmp_path: Path, keys: RepoKeys, raw_key: str,
                                      uid: str) -> None:
    store = Store()
    path = write_config(tmp_path, maint={"role": "maint", "key_file": raw_key})
    with pytest.raises(UsageError, match="invalid user id"):
        store_open.init_s3(URL, path=path, proxy_users=[uid], factory=store)
    assert store.made == []


def test_init_s3_refuses_a_proxy_profile_and_a_missing_key_before_any_request(
        tmp_path: Path) -> None:
    store = Store()
    path = write_config(tmp_path, px1={}, maint={"role": "maint"})
    with pytest.raises(AuthError, match="the bucket's owner"):
        store_open.init_s3(URL, profile="px1", path=path, factory=store)
    with pytest.raises(RepositoryKeyError, match="to be encrypted, and profile 'maint'"):
        store_open.init_s3(URL, profile="maint", path=path, factory=store)
    with pytest.raises(UsageError, match="--days"):
        store_open.init_s3(URL, profile="maint", path=path, lock=("legal", 1), factory=store)
    assert store.made == []


def test_require_delete_rights_sees_through_the_encrypting_layer(tmp_path: Path,
                                                                 keys: RepoKeys) -> None:
    path = write_config(tmp_path, px1={}, maint={"role": "maint"})
    for name, refused in (("px1", True), ("maint", False)):
        prof = store_open.s3_profile(URL, profile=name, path=path)
        inner = MemoryBackend()
        inner.profile = prof  # type: ignore[attr-defined]  # as S3Backend carries it
        repo = Repository.on(EncryptedBackend(inner, keys))
        if refused:
            with pytest.raises(AuthError):
                store_open.require_delete_rights(repo, "prune")
        else:
            store_open.require_delete_rights(repo, "prune")
    store_open.require_delete_rights(Repository(tmp_path), "prune")  # a directory: the store's
