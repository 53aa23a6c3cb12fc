"""One place that turns a ``--store`` / ``--repo`` value into a repository.

=================================  =============================================================
``/srv/backups``                   a directory on this host: :class:`Repository` as always
``bk1:/srv/backups``               a backup server over ssh (``store serve``): not opened here,
                                   the proxy's store client speaks to it
``s3://BUCKET/PREFIX[?profile=P]`` S3 object storage (Ceph RGW), opened in this process with the
                                   profile's credentials and, by default, its repository key
=================================  =============================================================

An S3 repository is opened as ``Repository.on(open(S3Backend(profile)))``: the
repository's ``config`` object is read first (it must exist: ``store init-s3``
writes it), then

* ``encryption = "client"`` (the profile's default) opens it with the key in
  the profile's ``key_file``, asking for the passphrase (``passphrase_file``,
  else ``SANOFFLOAD_PASSPHRASE``, else the terminal) only for a
  passphrase-protected file of *this* repository. A config that says
  ``"none"`` is refused: a store that rewrote its config must not make this
  host write plaintext.
* ``encryption = "none"`` opens it as plain objects; a config that says the
  repository is encrypted is refused (the key is needed).

A missing key, a key of another repository, or a wrong passphrase is a
:class:`~sanoffload.errors.RepositoryKeyError` (exit 15) naming the
repository. The production host never gets here: only the proxy and the
maintenance host hold profiles and keys.

``s3.toml`` is ``/etc/sanoffload/s3.toml`` unless ``SANOFFLOAD_S3_CONFIG``
names another file (tests, a second site).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import (
    AuthError,
    ConfigError,
    RepositoryKeyError,
    ResourceError,
    SanoffloadError,
    UsageError,
)
from ..runner import Runner
from ..text import printable
from . import s3config
from .backend import Backend, NotFound
from .repo import Repository
from .s3config import Encryption, Role, S3Profile, StoreURL, is_s3_url

log = logging.getLogger(__name__)

#: names another s3.toml than :data:`~sanoffload.store.s3config.DEFAULT_PATH`
CONFIG_ENV = "SANOFFLOAD_S3_CONFIG"

#: makes the backend of a profile (tests pass one over a recorded or in-memory store)
BackendFactory = Callable[[S3Profile], Backend]

#: Object Lock modes ``store init-s3 --object-lock`` accepts
LOCK_MODES = ("governance", "compliance")
MAX_LOCK_DAYS = 36500
#: an RGW user id: ``[TENANT$]NAME``; kept strict, it goes into a policy's ARN
_UID_RE = re.compile(r"(?:(?P<tenant>[A-Za-z0-9_-]{1,64})\$)?(?P<name>[A-Za-z0-9_.@-]{1,64})")

# the bucket policy (research doc 3.2): the proxy may put and read, never delete, change
# retention, the policy, versioning or lifecycle (a lifecycle rule could expire everything)
PROXY_ALLOW = ("s3:PutObject", "s3:GetObject", "s3:GetObjectVersion", "s3:ListBucket",
               "s3:ListBucketVersions", "s3:ListBucketMultipartUploads",
               "s3:ListMultipartUploadParts", "s3:AbortMultipartUpload")
PROXY_DENY = ("s3:DeleteObject", "s3:DeleteObjectVersion", "s3:PutObjectRetention",
              "s3:BypassGovernanceRetention", "s3:PutObjectLegalHold", "s3:PutBucketPolicy",
              "s3:DeleteBucketPolicy", "s3:PutLifecycleConfiguration", "s3:PutBucketVersioning",
              "s3:PutBucketObjectLockConfiguration", "s3:DeleteBucket")
#: RGW makes the uploader own each object: the owner (maint) reads the proxy's, and holds them
#: longer (``store lock-extend``), only if allowed
MAINT_ALLOW = ("s3:GetObject", "s3:GetObjectVersion", "s3:GetObjectRetention",
               "s3:PutObjectRetention")


def config_path(environ: Mapping[str, str] | None = None) -> str:
    """The s3.toml to read: ``SANOFFLOAD_S3_CONFIG`` or the default."""
    env = os.environ if environ is None else environ
    return env.get(CONFIG_ENV) or s3config.DEFAULT_PATH


def _default_factory(profile: S3Profile) -> Backend:
    from .backend_s3 import S3Backend

    return S3Backend(profile)


def s3_profile(url: str | StoreURL, *, profile: str | None = None,
               path: str | None = None) -> S3Profile:
    """The profile an ``s3://`` value selects (``profile`` overrides none in the URL)."""
    parsed = url if isinstance(url, StoreURL) else s3config.parse_url(url)
    if profile is not None:
        if parsed.profile is not None and parsed.profile != profile:
            raise UsageError(f"{printable(str(parsed))}: names profile {parsed.profile!r}, and "
                             f"--profile says {printable(profile)!r}: give one")
        parsed = StoreURL(parsed.bucket, parsed.prefix, profile)
    return s3config.for_url(parsed, path or config_path())


# -- keys ------------------------------------------------------------------------------------------
def _key_error(profile: S3Profile, exc: SanoffloadError) -> RepositoryKeyError:
    return RepositoryKeyError(f"{profile.location}: {exc.message}", hint=exc.hint)


def load_profile_keys(profile: S3Profile, repo_id: str | None = None, *,
                      environ: Mapping[str, str] | None = None,
                      ask: Callable[[str], str] | None = None) -> Any:
    """The repository keys the profile's ``key_file`` holds (checked against ``repo_id``
    when given); RepositoryKeyError naming the repository for a missing key, a key of
    another repository or a wrong passphrase."""
    from .keys import PASSPHRASE_ENV, get_passphrase, load_key_file

    where = f"profile {profile.name!r} of {profile.source}"
    if profile.key_file is None:
        what = f"an encrypted repository ({repo_id})" if repo_id else "to be encrypted"
        raise RepositoryKeyError(
            f"{profile.location} is {what}, and {where} names no key_file",
            hint="set key_file (sanoffload key import --raw … or key init), or encryption "
                 "= \"none\" for a repository made without encryption")

    def passphrase() -> str:
        try:
            return get_passphrase(profile.passphrase_file, environ=environ, ask=ask,
                                  option=f"passphrase_file in {where}")
        except UsageError as exc:
            if isinstance(exc, ConfigError):
                raise  # a passphrase file with the wrong owner or mode: a config problem
            raise RepositoryKeyError(
                f"key file {printable(str(profile.key_file))} needs its passphrase: "
                f"{exc.message}", hint=f"set passphrase_file in {where} or {PASSPHRASE_ENV}, "
                "or install a raw key file (sanoffload key import --raw)") from None

    try:
        return load_key_file(profile.key_file, passphrase, expected_repo_id=repo_id)
    except RepositoryKeyError as exc:
        raise _key_error(profile, exc) from None


def key_loader(profile: S3Profile, *, environ: Mapping[str, str] | None = None,
               ask: Callable[[str], str] | None = None) -> Callable[[str], Any]:
    """A :data:`~sanoffload.store.backend_crypt.KeyLoader` reading the profile's key file."""
    return lambda repo_id: load_profile_keys(profile, repo_id, environ=environ, ask=ask)


# -- opening ---------------------------------------------------------------------------------------
def open_backend(profile: S3Profile, *, factory: BackendFactory | None = None,
                 environ: Mapping[str, str] | None = None,
                 ask: Callable[[str], str] | None = None) -> Backend:
    """The repository backend of ``profile``: encrypted or plain as the profile and the
    repository's config agree (see the module docstring)."""
    from .backend_crypt import open_encrypted, read_config

    inner = (factory or _default_factory)(profile)
    config = read_config(inner)
    if config is None:
        raise UsageError(f"{profile.location}: no sanoffload repository there (no 'config' "
                         "object)", hint=f"create it: sanoffload store init-s3 "
                         f"{profile.location} --profile MAINT-PROFILE")
    if profile.encryption is Encryption.NONE:
        if config.encrypted:
            raise RepositoryKeyError(
                f"{profile.location} is an encrypted repository ({config.repo_id}), and "
                f"profile {profile.name!r} of {profile.source} says encryption = \"none\"",
                hint="set encryption = \"client\" and key_file in the profile")
        return inner
    try:
        return open_encrypted(inner, key_loader(profile, environ=environ, ask=ask))
    except RepositoryKeyError as exc:
        if exc.message.startswith(profile.location):
            raise
        raise _key_error(profile, exc) from None


def open_s3(url: str | StoreURL, runner: Runner | None = None, *, profile: str | None = None,
            path: str | None = None, factory: BackendFactory | None = None,
            environ: Mapping[str, str] | None = None,
            ask: Callable[[str], str] | None = None) -> Repository:
    """The repository at an ``s3://`` URL (see the module docstring)."""
    prof = s3_profile(url, profile=profile, path=path)
    return Repository.on(open_backend(prof, factory=factory, environ=environ, ask=ask), runner)


def open_store(text: str, runner: Runner | None = None, *, what: str = "--repo",
               path: str | None = None, factory: BackendFactory | None = None) -> Repository:
    """The repository ``text`` names on this host: a local ``/PATH`` or an ``s3://`` URL.

    ``HOST:/PATH`` is a backup server over ssh, which only its ``store serve`` opens:
    UsageError here (``what`` names the option).
    """
    if not isinstance(text, str) or not text:
        raise UsageError(f"{what}: give a directory or an s3:// URL")
    if is_s3_url(text):
        return open_s3(text, runner, path=path, factory=factory)
    if not text.startswith("/"):
        shown = printable(text)[:200]
        if ":" in text.split("/", 1)[0]:
            raise UsageError(f"{what} {shown}: a repository on another host is reached through "
                             "its store (sanoffload list/verify/restore --store HOST:/PATH), "
                             "not opened here")
        raise UsageError(f"{what} {shown}: an absolute /PATH or an s3://BUCKET/PREFIX URL")
    return Repository(text, runner)


def s3_profile_of(backend: Backend) -> S3Profile | None:
    """The S3 profile under ``backend`` (through an encrypting layer), None for a directory."""
    layer: object = backend
    for _ in range(4):  # an encrypting layer over the S3 backend: a short chain, never a loop
        prof = getattr(layer, "profile", None)
        if isinstance(prof, S3Profile):
            return prof
        layer = getattr(layer, "inner", None)
        if layer is None:
            break
    return None


def require_delete_rights(repo: Repository, what: str) -> None:
    """AuthError before anything is removed when ``repo`` is opened with a proxy profile:
    its credentials may put and read, never delete (the bucket policy refuses it too)."""
    prof = s3_profile_of(repo.backend)
    if prof is not None and prof.role is Role.PROXY:
        raise AuthError(f"{what} on {prof.location} refused: profile {prof.name!r} of "
                        f"{prof.source} has role \"proxy\", which may add and read backups "
                        "but never delete them or change their retention",
                        hint="run it on the maintenance host, with a profile of role "
                             "\"maint\" (the bucket policy refuses the proxy's deletes anyway)")


# -- store init-s3 ---------------------------------------------------------------------------------
def check_uid(uid: object) -> tuple[str, str]:
    """An RGW user id ``[TENANT$]NAME`` as (tenant, name); UsageError otherwise."""
    m = _UID_RE.fullmatch(uid) if isinstance(uid, str) else None
    if m is None:
        raise UsageError(f"invalid user id {printable(str(uid))[:80]!r}: [TENANT$]NAME of "
                         "letters, digits and _ . @ -")
    return m["tenant"] or "", m["name"]


def _arn(uid: str) -> str:
    tenant, name = check_uid(uid)
    return f"arn:aws:iam::{tenant}:user/{name}"


def bucket_policy(bucket: str, proxy_users: Sequence[str], maint_user: str) -> dict[str, Any]:
    """The policy ``init-s3`` applies: each proxy user puts and reads, never deletes; the
    maintenance user may read what the proxies uploaded and hold it longer under Object Lock
    (objects belong to their uploader)."""
    s3config.check_bucket(bucket)
    resources = [f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"]
    proxies = {"AWS": [_arn(u) for u in proxy_users]}
    return {"Version": "2012-10-17", "Statement": [
        {"Sid": "SanoffloadProxyWrite", "Effect": "Allow", "Principal": proxies,
         "Action": list(PROXY_ALLOW), "Resource": resources},
        {"Sid": "SanoffloadProxyNeverDelete", "Effect": "Deny", "Principal": proxies,
         "Action": list(PROXY_DENY), "Resource": resources},
        {"Sid": "SanoffloadMaintReadsAndHolds", "Effect": "Allow",
         "Principal": {"AWS": [_arn(maint_user)]}, "Action": list(MAINT_ALLOW),
         "Resource": [f"arn:aws:s3:::{bucket}/*"]}]}


@dataclass(frozen=True)
class InitReport:
    """What ``store init-s3`` found and did."""

    location: str
    bucket_created: bool
    versioning_enabled: bool
    lock: tuple[str, int] | None
    policy_users: tuple[str, ...]
    config_written: bool
    encrypted: bool
    repo_id: str | None

    def to_dict(self) -> dict[str, Any]:
        return {"location": self.location, "bucket_created": self.bucket_created,
                "versioning_enabled": self.versioning_enabled,
                "object_lock": None if self.lock is None else
                {"mode": self.lock[0], "days": self.lock[1]},
                "policy_users": list(self.policy_users), "config_written": self.config_written,
                "encrypted": self.encrypted, "repo_id": self.repo_id}


def _bucket_call(backend: Any, op: str, **params: Any) -> Any:
    # the backend's own request path: endpoint failover, errors mapped (never a secret shown)
    return backend.bucket_request(op, **params)


def init_s3(url: str | StoreURL, *, profile: str | None = None, path: str | None = None,
            lock: tuple[str, int] | None = None, proxy_users: Sequence[str] = (),
            factory: BackendFactory | None = None, environ: Mapping[str, str] | None = None,
            ask: Callable[[str], str] | None = None) -> InitReport:
    """Make the bucket (if missing) and the repository at ``url`` with a maint profile.

    Idempotent: an existing bucket is kept (versioning turned on if off; Object Lock can
    only come with a new bucket), the policy is put again, and an existing config of the
    same key and encryption is left as it is; a config of another repository is a
    ResourceError. The config is read back (and, encrypted, authenticated) at the end.
    """
    from .backend_crypt import init_config, open_encrypted, open_repository, read_config

    prof = s3_profile(url, profile=profile, path=path)
    if prof.role is not Role.MAINT:
        raise AuthError(f"store init-s3 {prof.location}: profile {prof.name!r} of {prof.source} "
                        f"has role {prof.role.value!r}; the bucket's owner (role \"maint\") "
                        "creates it and sets its policy", hint="give --profile of a maint "
                        "profile")
    if lock is not None:
        mode, days = lock
        if mode not in LOCK_MODES or isinstance(days, bool) or not 1 <= days <= MAX_LOCK_DAYS:
            raise UsageError(f"--object-lock {printable(str(mode))} --days {days}: a mode of "
                             f"{', '.join(LOCK_MODES)} and 1 to {MAX_LOCK_DAYS} days")
    users = tuple(dict.fromkeys(proxy_users))
    for u in users:
        check_uid(u)
    keys = None
    if prof.encryption is Encryption.CLIENT:
        # before anything is created: a wrong passphrase must not leave a half-made bucket
        keys = load_profile_keys(prof, environ=environ, ask=ask)
    backend: Any = (factory or _default_factory)(prof)
    created = False
    try:
        _bucket_call(backend, "head_bucket")
    except NotFound:
        params: dict[str, Any] = {"ObjectLockEnabledForBucket": lock is not None}
        if prof.region != "us-east-1":
            params["CreateBucketConfiguration"] = {"LocationConstraint": prof.region}
        _bucket_call(backend, "create_bucket", **params)
        created = True
        log.info("created bucket %s", prof.bucket)
    versioning = _bucket_call(backend, "get_bucket_versioning").get("Status")
    turned_on = False
    if versioning != "Enabled":
        # a versioned bucket keeps an overwritten object's first bytes (research doc 3.3)
        _bucket_call(backend, "put_bucket_versioning",
                     VersioningConfiguration={"Status": "Enabled"})
        turned_on = True
    if lock is not None:
        try:
            current = _bucket_call(backend, "get_object_lock_configuration")
            enabled = (current.get("ObjectLockConfiguration") or {}).get("ObjectLockEnabled")
        except NotFound:
            enabled = None
        if enabled != "Enabled":
            raise ResourceError(f"{prof.location}: bucket {prof.bucket!r} exists without Object "
                                "Lock, which can only be chosen when a bucket is created",
                                hint="init-s3 a new bucket with --object-lock")
        _bucket_call(backend, "put_object_lock_configuration", ObjectLockConfiguration={
            "ObjectLockEnabled": "Enabled",
            "Rule": {"DefaultRetention": {"Mode": lock[0].upper(), "Days": lock[1]}}})
    if users:
        owner = (_bucket_call(backend, "get_bucket_acl").get("Owner") or {}).get("ID")
        if not isinstance(owner, str) or not owner:
            raise ResourceError(f"{prof.location}: the store did not say who owns bucket "
                                f"{prof.bucket!r}")
        policy = bucket_policy(prof.bucket, users, owner)
        _bucket_call(backend, "put_bucket_policy", Policy=json.dumps(policy))
    existing = read_config(backend)
    written = False
    if existing is None:
        init_config(backend, keys)
        written = True
    elif existing.encrypted != (keys is not None) or (
            keys is not None and existing.repo_id != keys.repo_id_hex):
        said = (f"encrypted, repository {existing.repo_id}" if existing.encrypted
                else "not encrypted")
        want = f"repository {keys.repo_id_hex}" if keys is not None else "no encryption"
        raise ResourceError(f"{prof.location} already holds a repository ({said}); the profile "
                            f"asks for {want}: not replacing it",
                            hint="use that repository's key, or another prefix")
    # read back as every later open will: the MAC checked under the key
    opened: Backend
    if keys is not None:
        opened = open_encrypted(backend, keys)
        repo_id: str | None = keys.repo_id_hex
    else:
        opened = open_repository(backend, None)
        repo_id = None
    next(iter(Repository.on(opened).ids()), None)  # a listing works with these credentials
    return InitReport(prof.location, created, turned_on, lock, users, written,
                      keys is not None, repo_id)
