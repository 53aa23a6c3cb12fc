"""S3 profiles: ``/etc/sanoffload/s3.toml``, and the ``s3://BUCKET/PREFIX`` store URL.

A profile names an object store, a bucket and the credentials of one role::

    default = "px1"                      # optional: the profile a URL without ?profile= uses

    [profiles.px1]
    endpoints = ["https://rgw1.example:7480", "https://rgw2.example:7480"]  # tried in order
    region = "us-east-1"                 # default; RGW accepts any name of its zonegroup
    bucket = "backups"
    prefix = "site-a"                    # optional: every key lives under site-a/
    access_key = "PX1ACCESSKEY"
    secret_key = "..."                   # or secret_key_file = "/etc/sanoffload/px1.secret"
    ca_file = "/etc/sanoffload/s3-ca.pem" # optional: the CA that signed the gateways' certificates
    role = "proxy"                       # "proxy" (put, get) or "maint" (prune, gc: deletes)
    part_size = "16MiB"                  # multipart part size: 5 MiB to 512 MiB (bytes, or "NMiB")
    connect_timeout = 10                 # seconds
    read_timeout = 120                   # seconds
    max_attempts = 5                     # per request, botocore's standard retries
    conditional_put = "verify"           # "verify" (default) or "trust": see S3Profile
    encryption = "client"                # "client" (default: sealed on this host) or "none"
    key_file = "/etc/sanoffload/repo.key" # the repository key (sanoffload key init/import)
    passphrase_file = "/etc/sanoffload/repo.pass" # optional: its passphrase (0600); none for a
                                         #   raw key file, else SANOFFLOAD_PASSPHRASE or a prompt

The file decides where root's backups go with whose credentials, so it is read
like every other config (:func:`sanoffload.configfile.read_text`'s checks on the
opened file) and, because it may hold a secret, more strictly: a file with a
``secret_key`` must not be readable by group or others. Unknown keys are
refused, every value is checked for type and range, and a secret never appears
in a repr, a log line or an error message.
"""

from __future__ import annotations

import enum
import ipaddress
import math
import os
import re
import stat
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from .. import configfile
from ..configfile import NAME_RULE, parse_toml, valid_name
from ..errors import ConfigError, UsageError
from ..text import has_control, printable
from .backend import MAX_KEY, check_key

DEFAULT_PATH = "/etc/sanoffload/s3.toml"

MIB = 1 << 20
#: S3's smallest part (but the last); RGW's rgw_multipart_min_part_size is the same
MIN_PART = 5 * MIB
#: a part is held in memory twice (one filling, one in flight): this bounds the proxy's memory
MAX_PART = 512 * MIB
DEFAULT_PART = 16 * MIB
MAX_ENDPOINTS = 8
#: a secret file is one line; anything bigger is the wrong file
MAX_SECRET_BYTES = 4096

_PROFILE_KEYS = frozenset({
    "endpoints", "region", "bucket", "prefix", "access_key", "secret_key", "secret_key_file",
    "ca_file", "part_size", "role", "connect_timeout", "read_timeout", "max_attempts",
    "conditional_put", "encryption", "key_file", "passphrase_file"})
_TOP_KEYS = frozenset({"profiles", "default"})

_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_REGION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
#: access keys are identifiers (RGW: 20 upper-case characters; AWS: AKIA...); printable, no spaces
_ACCESS_RE = re.compile(r"[A-Za-z0-9_+=,.@/-]{1,128}")
#: secrets: printable ASCII without whitespace (RGW's are 40 of base64's alphabet)
_SECRET_RE = re.compile(r"[!-~]{1,256}")
_SIZE_RE = re.compile(r"([0-9]{1,6})\s*(MiB|M|GiB|G)")


class Role(enum.Enum):
    """Whose credentials a profile holds: the bucket policy gives each role its rights."""

    #: put and get, never delete: a proxy taken over cannot destroy backups
    PROXY = "proxy"
    #: the maintenance role: prune, gc and lock-extend, with delete rights
    MAINT = "maint"


class ConditionalPut(enum.Enum):
    """How a write-once put is made sure not to replace an object.

    RGW honours ``If-None-Match: *`` on a put to an unversioned bucket; on a
    versioned one (Object Lock needs versioning) 16.2 may store a second
    version instead of answering 412 (docs/design/issue14-s3-research.md, 2).
    """

    #: HEAD before, If-None-Match on the put, and the key's versions listed after:
    #: a second version is a conflict (ResourceError) even if the store took it
    VERIFY = "verify"
    #: If-None-Match alone: for a store shown (``S3Backend.probe_conditional_put``) to honour it
    TRUST = "trust"


class Encryption(enum.Enum):
    """Whether a repository's objects are sealed on this host before they leave it."""

    #: the default for S3: the store sees keys, sizes and times, never contents
    CLIENT = "client"
    #: plaintext objects (the repository's config then says so, and no key is ever read)
    NONE = "none"


@dataclass(frozen=True)
class S3Profile:
    """One profile of s3.toml, checked; ``secret_key`` is never in its repr."""

    name: str
    endpoints: tuple[str, ...]
    bucket: str
    access_key: str
    secret_key: str = field(repr=False)
    role: Role
    #: keys live under ``prefix/`` ("" : at the bucket's top); a valid key, no trailing "/"
    prefix: str = ""
    region: str = "us-east-1"
    ca_file: str | None = None
    part_size: int = DEFAULT_PART
    connect_timeout: float = 10.0
    read_timeout: float = 120.0
    max_attempts: int = 5
    conditional_put: ConditionalPut = ConditionalPut.VERIFY
    encryption: Encryption = Encryption.CLIENT
    #: the repository key file (:mod:`sanoffload.store.keys`); None: no key on this host
    key_file: str | None = None
    #: the key file's passphrase, in a private file (None: SANOFFLOAD_PASSPHRASE or a prompt)
    passphrase_file: str | None = None
    #: the file it came from, for messages
    source: str = DEFAULT_PATH

    @property
    def location(self) -> str:
        """``s3://bucket/prefix`` for messages."""
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def who(self) -> str:
        """Which credentials, for an AuthError: never the secret."""
        return (f"profile {self.name!r} of {self.source} (role {self.role.value}, "
                f"access key {self.access_key})")


@dataclass(frozen=True)
class _Parsed:
    """A profile as the file states it: the secret may still be in a file."""

    profile: S3Profile
    secret_key_file: str | None


@dataclass(frozen=True)
class S3Config:
    profiles: dict[str, _Parsed]
    default: str | None
    source: str
    #: the file's mode, to refuse a readable file once it is known to hold a secret
    mode: int = 0o600

    def names(self) -> list[str]:
        return sorted(self.profiles)


@dataclass(frozen=True)
class StoreURL:
    """``s3://BUCKET/PREFIX[?profile=NAME]``, checked."""

    bucket: str
    prefix: str
    profile: str | None

    def __str__(self) -> str:
        s = f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"
        return s + (f"?profile={self.profile}" if self.profile else "")


def is_s3_url(text: str) -> bool:
    """True for a ``--store`` that names S3 object storage rather than a directory."""
    return text.startswith("s3://")


def check_bucket(name: object) -> str:
    """An S3 bucket name (the rules every S3 store accepts); UsageError otherwise."""
    rule = ("3-63 of a-z 0-9 . -, starting and ending with a letter or digit, no '..', "
            "not an IP address")
    if (not isinstance(name, str) or not _BUCKET_RE.fullmatch(name) or ".." in name
            or ".-" in name or "-." in name or name.startswith("xn--") or _is_ip(name)):
        shown = printable(name) if isinstance(name, str) else repr(name)
        raise UsageError(f"invalid bucket name {shown[:80]!r}: {rule}")
    return name


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def check_store_prefix(prefix: object) -> str:
    """A profile's or URL's key prefix: "" or a valid key (no leading/trailing "/")."""
    if prefix == "":
        return ""
    if not isinstance(prefix, str):
        raise UsageError(f"invalid prefix {prefix!r:.80}: must be a string")
    # leave room for the repository's own keys under it
    if len(prefix) > MAX_KEY // 2:
        raise UsageError(f"invalid prefix {printable(prefix)[:80]!r}: longer than "
                         f"{MAX_KEY // 2} characters")
    return check_key(prefix)


def parse_url(text: str) -> StoreURL:
    """``s3://BUCKET[/PREFIX][?profile=NAME]``; UsageError naming what is wrong."""
    shown = printable(text)[:200]
    if not is_s3_url(text):
        raise UsageError(f"{shown}: not an s3:// URL")
    if has_control(text) or any(c.isspace() for c in text):
        # urlsplit silently drops tabs and newlines: "a\nb" would become "ab"
        raise UsageError(f"{shown}: control characters or spaces in an s3:// URL")
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise UsageError(f"{shown}: not a valid URL: {exc}") from None
    if parts.username is not None or parts.password is not None or port is not None:
        raise UsageError(f"{shown}: an s3:// URL names a bucket, not a host; credentials "
                         "and endpoints belong in the profile (s3.toml)")
    if parts.fragment:
        raise UsageError(f"{shown}: a '#' has no meaning in an s3:// URL")
    bucket = check_bucket(parts.netloc)
    prefix = check_store_prefix(parts.path.strip("/")) if parts.path not in ("", "/") else ""
    if parts.path.startswith("//") or parts.path.endswith("//"):
        raise UsageError(f"{shown}: an empty part in the prefix")
    profile = None
    if parts.query:
        try:
            query = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=True,
                              max_num_fields=4)
        except ValueError as exc:
            raise UsageError(f"{shown}: the query is not key=value: {exc}") from None
        for k, v in query:
            if k != "profile":
                raise UsageError(f"{shown}: unknown URL parameter {printable(k)[:40]!r} "
                                 "(known: profile)")
            if profile is not None:
                raise UsageError(f"{shown}: profile given twice")
            if not valid_name(v):
                raise UsageError(f"{shown}: profile names are {NAME_RULE}")
            profile = v
    return StoreURL(bucket, prefix, profile)


def _err(source: str, key: str, what: str) -> ConfigError:
    return ConfigError(f"{source}: {key}: {what}")


def _str(body: dict[str, Any], k: str, source: str, where: str, *,
         pattern: re.Pattern[str] | None = None, rule: str = "",
         default: str | None = None, required: bool = False) -> str | None:
    v = body.get(k)
    if v is None:
        if required:
            raise _err(source, f"{where}.{k}", "required")
        return default
    if not isinstance(v, str):
        raise _err(source, f"{where}.{k}", f"must be a string, not {type(v).__name__}")
    if pattern is not None and not pattern.fullmatch(v):
        raise _err(source, f"{where}.{k}", rule)
    return v


def _number(body: dict[str, Any], k: str, source: str, where: str, *, low: float,
            high: float, default: float, integer: bool = False) -> float:
    v = body.get(k)
    if v is None:
        return default
    ok_type = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok_type or not math.isfinite(v) or not low <= v <= high:
        kind = "an integer" if integer else "a number"
        raise _err(source, f"{where}.{k}", f"must be {kind} from {low:g} to {high:g}")
    return float(v)


def check_endpoint(url: object) -> str:
    """An ``https://HOST[:PORT]`` URL; UsageError otherwise."""
    shown = printable(url)[:120] if isinstance(url, str) else repr(url)[:120]
    if not isinstance(url, str) or any(c.isspace() for c in url) or has_control(url):
        raise UsageError(f"invalid endpoint {shown!r}: an https://HOST[:PORT] URL")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UsageError(f"invalid endpoint {shown!r}: {exc}") from None
    if parts.scheme != "https":
        raise UsageError(f"invalid endpoint {shown!r}: https only (botocore sends checksums "
                         "and credentials over it; plain http is for nothing here)")
    if not parts.hostname or parts.username is not None or parts.password is not None:
        raise UsageError(f"invalid endpoint {shown!r}: an https://HOST[:PORT] URL, "
                         "no user or password in it")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise UsageError(f"invalid endpoint {shown!r}: no path, query or fragment "
                         "(the bucket is named by 'bucket')")
    if port == 0:
        raise UsageError(f"invalid endpoint {shown!r}: port 0")
    return url.rstrip("/")


def _part_size(v: object, source: str, where: str) -> int:
    rule = (f"must be a size from {MIN_PART // MIB} MiB to {MAX_PART // MIB} MiB: "
            "bytes (an integer) or a string like \"16MiB\"")
    if isinstance(v, bool):
        raise _err(source, f"{where}.part_size", rule)
    if isinstance(v, int):
        size = v
    elif isinstance(v, str) and (m := _SIZE_RE.fullmatch(v.strip())):
        size = int(m.group(1)) * (MIB if m.group(2).startswith("M") else 1024 * MIB)
    else:
        raise _err(source, f"{where}.part_size", rule)
    if not MIN_PART <= size <= MAX_PART:
        raise _err(source, f"{where}.part_size", rule)
    return size


def _profile(name: str, body: dict[str, Any], source: str) -> _Parsed:
    where = f"profiles.{name}"
    for k in body:
        if k not in _PROFILE_KEYS:
            raise _err(source, f"{where}.{printable(str(k))[:40]}",
                       f"unknown key (known: {', '.join(sorted(_PROFILE_KEYS))})")
    raw = body.get("endpoints")
    if not isinstance(raw, list) or not 1 <= len(raw) <= MAX_ENDPOINTS:
        raise _err(source, f"{where}.endpoints",
                   f"required, a list of 1 to {MAX_ENDPOINTS} https URLs")
    try:
        endpoints = tuple(check_endpoint(u) for u in raw)
    except UsageError as exc:
        raise _err(source, f"{where}.endpoints", exc.message) from None
    if len(set(endpoints)) != len(endpoints):
        raise _err(source, f"{where}.endpoints", "an endpoint is listed twice")
    try:
        bucket = check_bucket(body.get("bucket"))
    except UsageError as exc:
        raise _err(source, f"{where}.bucket", exc.message) from None
    try:
        prefix = check_store_prefix(body.get("prefix", ""))
    except UsageError as exc:
        raise _err(source, f"{where}.prefix", exc.message) from None
    region = _str(body, "region", source, where, pattern=_REGION_RE, default="us-east-1",
                  rule="letters, digits, '-' and '_', at most 64")
    access = _str(body, "access_key", source, where, pattern=_ACCESS_RE, required=True,
                  rule="1-128 of letters, digits and +=,.@/_- (no spaces)")
    secret = body.get("secret_key")
    secret_file = body.get("secret_key_file")
    if (secret is None) == (secret_file is None):
        raise _err(source, where, "give exactly one of secret_key and secret_key_file")
    if secret is not None and (not isinstance(secret, str) or not _SECRET_RE.fullmatch(secret)):
        # the value is never shown: it is (nearly) a secret even when malformed
        raise _err(source, f"{where}.secret_key",
                   "must be a string of 1-256 printable ASCII characters, no spaces")
    if secret_file is not None and (not isinstance(secret_file, str)
                                    or not os.path.isabs(secret_file)
                                    or ".." in secret_file.split("/")):
        raise _err(source, f"{where}.secret_key_file", "an absolute path without '..'")
    ca_file = body.get("ca_file")
    if ca_file is not None and (not isinstance(ca_file, str) or not os.path.isabs(ca_file)
                                or ".." in ca_file.split("/")):
        raise _err(source, f"{where}.ca_file", "an absolute path without '..'")
    role_v = body.get("role")
    try:
        role = Role(role_v)
    except ValueError:
        raise _err(source, f"{where}.role", "required: \"proxy\" or \"maint\"") from None
    cond_v = body.get("conditional_put", ConditionalPut.VERIFY.value)
    try:
        cond = ConditionalPut(cond_v)
    except ValueError:
        raise _err(source, f"{where}.conditional_put", "\"verify\" or \"trust\"") from None
    part = _part_size(body["part_size"], source, where) if "part_size" in body else DEFAULT_PART
    enc_v = body.get("encryption", Encryption.CLIENT.value)
    try:
        encryption = Encryption(enc_v)
    except (ValueError, TypeError):
        raise _err(source, f"{where}.encryption", "\"client\" or \"none\"") from None
    key_file = _path(body, "key_file", source, where)
    passphrase_file = _path(body, "passphrase_file", source, where)
    if encryption is Encryption.NONE and (key_file or passphrase_file):
        raise _err(source, where, "encryption = \"none\" takes no key_file or passphrase_file")
    if passphrase_file is not None and key_file is None:
        raise _err(source, f"{where}.passphrase_file", "is the passphrase of a key_file: "
                   "give key_file too")
    profile = S3Profile(
        name=name, endpoints=endpoints, bucket=bucket, access_key=str(access),
        secret_key=secret if isinstance(secret, str) else "", role=role, prefix=prefix,
        region=str(region), ca_file=ca_file, part_size=part,
        connect_timeout=float(_number(body, "connect_timeout", source, where, low=0.1,
                                      high=300, default=10.0)),
        read_timeout=float(_number(body, "read_timeout", source, where, low=1, high=3600,
                                   default=120.0)),
        max_attempts=int(_number(body, "max_attempts", source, where, low=1, high=10,
                                 default=5, integer=True)),
        conditional_put=cond, encryption=encryption, key_file=key_file,
        passphrase_file=passphrase_file, source=source)
    return _Parsed(profile, secret_file)


def _path(body: dict[str, Any], k: str, source: str, where: str) -> str | None:
    """An absolute path setting: no '..', no control characters (it is printed), bounded."""
    v = body.get(k)
    if v is None:
        return None
    if (not isinstance(v, str) or not os.path.isabs(v) or ".." in v.split("/")
            or has_control(v) or len(v) > 4096):
        raise _err(source, f"{where}.{k}", "an absolute path without '..' or control "
                   "characters")
    return v


def parse(text: str, source: str, *, mode: int = 0o600) -> S3Config:
    """The profiles of ``text`` (read from ``source``, whose mode is ``mode``), checked."""
    data = parse_toml(text, source)
    for k in data:
        if k not in _TOP_KEYS:
            raise _err(source, printable(k)[:40], "unknown key (known: default, profiles)")
    profiles = data.get("profiles")
    if not isinstance(profiles, dict) or not profiles:
        raise _err(source, "profiles", "no [profiles.NAME] table")
    out: dict[str, _Parsed] = {}
    for name, body in profiles.items():
        if not valid_name(name):
            raise _err(source, f"profiles.{printable(name)[:40]}", f"profile names are {NAME_RULE}")
        if not isinstance(body, dict):
            raise _err(source, f"profiles.{name}", "must be a table")
        out[name] = _profile(name, body, source)
    default = data.get("default")
    if default is not None and (not isinstance(default, str) or default not in out):
        raise _err(source, "default", f"must name a profile (have: {', '.join(sorted(out))})")
    if stat.S_IMODE(mode) & 0o077 and any(p.profile.secret_key for p in out.values()):
        raise ConfigError(f"{source}: holds a secret_key and is readable by group or others "
                          f"(mode {stat.S_IMODE(mode):04o})", hint=f"chmod 600 {source}")
    return S3Config(out, default, source, stat.S_IMODE(mode))


def _read_private(path: str, *, limit: int, secret: bool) -> tuple[str, int]:
    """The text of ``path`` and its mode (configfile's checks on the opened file).

    ``secret``: also refuse a file that group or others may read.
    """
    found = configfile.read_text_mode(path, missing=ConfigError(f"{path}: no such file"),
                                      private=secret, limit=limit)
    assert found is not None  # a missing file raised
    return found


def read(path: str = DEFAULT_PATH) -> S3Config:
    """The profiles file at ``path``; ConfigError naming it when it is missing or wrong."""
    text, mode = _read_private(path, limit=configfile.MAX_CONFIG_BYTES, secret=False)
    return parse(text, path, mode=mode)


def _read_secret(path: str, source: str, where: str) -> str:
    text, _ = _read_private(path, limit=MAX_SECRET_BYTES, secret=True)
    value = text[:-1] if text.endswith("\n") else text
    if not _SECRET_RE.fullmatch(value):
        raise ConfigError(f"{source}: {where}.secret_key_file: {path} must hold one line of "
                          "1-256 printable ASCII characters, no spaces")
    return value


def profile(config: S3Config, name: str | None = None) -> S3Profile:
    """The profile ``name`` (default: the file's ``default``, or its only one), secret loaded."""
    if name is None:
        name = config.default
        if name is None:
            if len(config.profiles) != 1:
                raise ConfigError(f"{config.source}: several profiles and no default: name one "
                                  f"(?profile=NAME; have: {', '.join(config.names())})")
            name = next(iter(config.profiles))
    parsed = config.profiles.get(name)
    if parsed is None:
        raise ConfigError(f"{config.source}: no profile {printable(name)[:64]!r} "
                          f"(have: {', '.join(config.names())})")
    prof = parsed.profile
    if parsed.secret_key_file is not None:
        prof = replace(prof, secret_key=_read_secret(parsed.secret_key_file, config.source,
                                                     f"profiles.{name}"))
    if prof.ca_file is not None and not os.path.isfile(prof.ca_file):
        raise ConfigError(f"{config.source}: profiles.{name}.ca_file: {prof.ca_file}: "
                          "no such file")
    return prof


def for_url(url: str | StoreURL, path: str = DEFAULT_PATH) -> S3Profile:
    """The profile an ``s3://`` store URL selects, with the URL's prefix.

    The URL must name the profile's bucket: a profile's credentials are for
    one bucket (its policy). A URL prefix narrows the profile's prefix: with
    ``prefix = "site-a"`` in the profile, ``s3://b/site-a/px1`` is allowed and
    ``s3://b/other`` is not (as store.toml binds a client to its repository).
    """
    parsed = url if isinstance(url, StoreURL) else parse_url(url)
    prof = profile(read(path), parsed.profile)
    if parsed.bucket != prof.bucket:
        raise ConfigError(f"{path}: profile {prof.name!r} is for bucket {prof.bucket!r}, "
                          f"not {parsed.bucket!r}")
    if not parsed.prefix:
        return prof
    if prof.prefix and parsed.prefix != prof.prefix and not parsed.prefix.startswith(
            prof.prefix + "/"):
        raise ConfigError(f"{path}: profile {prof.name!r} may use {prof.location}, "
                          f"not s3://{parsed.bucket}/{parsed.prefix}")
    return replace(prof, prefix=parsed.prefix)
