"""The repository's objects on S3 object storage (Ceph RGW), through botocore.

Why these client settings (docs/design/issue14-s3-research.md, 2), each for a
failure seen with RGW::

    Config(s3={"addressing_style": "path"},            # RGW has no per-bucket DNS names
           request_checksum_calculation="when_required", # botocore >= 1.36 otherwise sends an
           response_checksum_validation="when_required", # aws-chunked body with a trailer
                                                        # checksum over https, no Content-Length:
                                                        # RGW answers 411 MissingContentLength
           retries={"mode": "standard", ...},          # 5xx and throttling, with backoff
           connect_timeout=..., read_timeout=...)      # a dead gateway fails, not hangs
    create_client("s3", endpoint_url=..., verify=profile.ca_file)

botocore no longer sends Content-MD5 by itself, so every put and part carries
ours and the ETag that comes back must be that MD5: transport integrity only;
the repository keeps its own sha256 of every object.

Big objects (archives as they stream) go up as our own multipart upload, not
``upload_fileobj`` (s3transfer reads ahead with up to 10 threads and retries
whole transfers): one part filling while at most one is in flight, so memory
is at most two parts, and a part that fails (5xx, a dropped connection) is sent
again, the same number with the same bytes, with backoff, through the next
endpoint when one stops answering. RGW 16.2 has no conditional
CompleteMultipartUpload, so a commit looks (HEAD) before it completes and lists
the key's versions after: a second version is a conflict.

boto3's session is not used: it reads ``~/.aws`` and ``AWS_*`` variables that
could point the client elsewhere. The botocore session here reads no file.
"""

from __future__ import annotations

import base64
import builtins
import functools
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from ..errors import (
    AuthError,
    IntegrityError,
    MissingDependencyError,
    ObjectStoreError,
    ResourceError,
    SanoffloadError,
)
from ..text import printable
from .backend import NotFound, ObjectInfo, Upload, check_key, check_prefix
from .s3config import MAX_PART, ConditionalPut, Role, S3Profile

log = logging.getLogger(__name__)

#: S3's (and RGW's rgw_multipart_part_upload_limit) most parts per upload
MAX_PARTS = 10_000
#: after this many parts the part size doubles (up to MAX_PART): a stream of unknown size
#: still fits in MAX_PARTS, and memory grows only for very big archives
PARTS_PER_STEP = 1000
#: how long a part is retried (our retries, around botocore's own) before the upload gives up
PART_RETRY_S = 120.0
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 15.0
#: server messages are shown, bounded and escaped
_MSG_MAX = 200
#: a missing object, version or (multipart) upload: backend.NotFound
_NOT_FOUND = frozenset({"NoSuchKey", "404", "NotFound", "NoSuchVersion", "NoSuchUpload"})
_DENIED = frozenset({"AccessDenied", "403", "Forbidden", "InvalidAccessKeyId",
                     "SignatureDoesNotMatch", "AllAccessDisabled"})
_TRANSIENT_CODES = frozenset({"SlowDown", "RequestTimeout", "InternalError",
                              "ServiceUnavailable", "BadDigest", "RequestTimeTooSkewed"})


def _botocore() -> Any:
    try:
        # botocore ships no type information: the client is Any here, as in boto3's own use
        import botocore.config  # type: ignore[import-untyped]
        import botocore.exceptions  # type: ignore[import-untyped]
        import botocore.session  # type: ignore[import-untyped]
    except ImportError:
        raise MissingDependencyError(
            "S3 repositories need boto3 >= 1.36 (botocore)",
            hint="pip install 'sanoffload[s3]' (or 'boto3>=1.36')") from None
    return botocore


def client_config(profile: S3Profile) -> Any:
    """The botocore Config for ``profile`` (the module docstring says why each key)."""
    bc = _botocore()
    return bc.config.Config(
        region_name=profile.region,
        signature_version="s3v4",
        s3={"addressing_style": "path"},
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        # total_max_attempts counts the first try: max_attempts = 1 is "no retry"
        retries={"mode": "standard", "total_max_attempts": profile.max_attempts},
        connect_timeout=profile.connect_timeout,
        read_timeout=profile.read_timeout,
        max_pool_connections=4,
        tcp_keepalive=True,
    )


def make_client(profile: S3Profile, endpoint: str) -> Any:
    """A botocore S3 client for one endpoint of ``profile``, reading no AWS config file."""
    bc = _botocore()
    # no profile, no ~/.aws files, and no AWS_PROFILE / AWS_CONFIG_FILE /
    # AWS_SHARED_CREDENTIALS_FILE from the environment: (config key, env var, default, convert)
    session = bc.session.Session(session_vars={
        "profile": (None, None, None, None),
        "config_file": (None, None, os.devnull, None),
        "credentials_file": (None, None, os.devnull, None)})
    try:
        major, minor = (int(x) for x in bc.__version__.split(".")[:2])
    except (AttributeError, ValueError):
        major, minor = 0, 0
    if (major, minor) < (1, 36):
        raise MissingDependencyError(
            f"botocore {getattr(bc, '__version__', '?')} is too old for RGW: 1.36 or newer is "
            "needed (request_checksum_calculation)", hint="pip install 'boto3>=1.36'")
    return session.create_client(
        "s3", endpoint_url=endpoint, region_name=profile.region,
        aws_access_key_id=profile.access_key, aws_secret_access_key=profile.secret_key,
        verify=profile.ca_file if profile.ca_file else True, config=client_config(profile))


def _md5(data: bytes | bytearray | memoryview) -> tuple[str, str]:
    """(hex, base64) MD5 of ``data``: Content-MD5 and the ETag to expect."""
    h = hashlib.md5(data, usedforsecurity=False)
    return h.hexdigest(), base64.b64encode(h.digest()).decode("ascii")


def _etag(resp: dict[str, Any]) -> str:
    return str(resp.get("ETag", "")).strip('"')


def _ts(value: object) -> float:
    return value.timestamp() if isinstance(value, datetime) else 0.0


def _code(exc: BaseException) -> tuple[str, int]:
    resp = getattr(exc, "response", None) or {}
    code = str((resp.get("Error") or {}).get("Code", ""))
    status = int((resp.get("ResponseMetadata") or {}).get("HTTPStatusCode") or 0)
    return code, status


def _server_message(exc: BaseException) -> str:
    resp = getattr(exc, "response", None) or {}
    msg = str((resp.get("Error") or {}).get("Message", "") or "")
    return printable(msg)[:_MSG_MAX]


def _retried(exc: BaseException) -> bool:
    resp = getattr(exc, "response", None) or {}
    return int((resp.get("ResponseMetadata") or {}).get("RetryAttempts") or 0) > 0


def _is_tls_verify(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "certificate verify failed" in text or "certificate_verify_failed" in text


class _Unreachable(Exception):
    """Every endpoint failed to connect (or dropped the connection) for one request."""

    def __init__(self, failures: list[tuple[str, BaseException]]) -> None:
        super().__init__(failures)
        self.failures = failures


#: the Object Lock modes S3 knows: anything else a store answers is refused, not sent back
LOCK_MODES = ("GOVERNANCE", "COMPLIANCE")


def _transient(exc: BaseException) -> bool:
    """Worth sending again (the same part, later): 5xx, throttling, a lost connection."""
    if isinstance(exc, _Unreachable):
        return not all(_is_tls_verify(e) for _, e in exc.failures)
    bc = _botocore()
    if isinstance(exc, bc.exceptions.ClientError):
        code, status = _code(exc)
        return status >= 500 or code in _TRANSIENT_CODES
    return isinstance(exc, (bc.exceptions.ConnectionError, bc.exceptions.HTTPClientError))


@dataclass
class _Part:
    number: int
    md5_hex: str
    size: int


class S3Backend:
    """A :class:`~sanoffload.store.backend.Backend` on an S3 bucket under ``profile.prefix``.

    ``client_factory`` makes the client for an endpoint (tests attach a botocore
    Stubber to it); ``sleep`` and ``clock`` are the backoff's (tests do not wait).
    """

    def __init__(self, profile: S3Profile, *,
                 client_factory: Callable[[S3Profile, str], Any] = make_client,
                 sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic,
                 part_retry_s: float = PART_RETRY_S) -> None:
        self.profile = profile
        self.location = profile.location
        self._factory = client_factory
        self._clients: dict[int, Any] = {}
        self._lock = threading.Lock()
        #: the endpoint that answered last: requests start there
        self._current = 0
        self.sleep = sleep
        self.clock = clock
        self.part_retry_s = part_retry_s
        #: If-None-Match alone is trusted (the profile says so, or a probe showed it)
        self.trust_if_none_match = profile.conditional_put is ConditionalPut.TRUST
        self._base = f"{profile.prefix}/" if profile.prefix else ""

    def __repr__(self) -> str:
        return f"S3Backend({self.location}, profile={self.profile.name!r})"

    # -- plumbing ---------------------------------------------------------------------------

    def client(self, index: int = 0) -> Any:
        """The client of endpoint ``index`` (made on first use)."""
        with self._lock:
            c = self._clients.get(index)
            if c is None:
                c = self._clients[index] = self._factory(self.profile,
                                                         self.profile.endpoints[index])
            return c

    def _full(self, key: str) -> str:
        return self._base + check_key(key)

    def _send(self, op: str, **params: Any) -> Any:
        """One request, starting at the current endpoint, the next one on a lost connection.

        Raises the botocore error of an answered request as it is, and
        :class:`_Unreachable` when no endpoint could be reached.
        """
        bc = _botocore()
        n = len(self.profile.endpoints)
        start = self._current
        failures: list[tuple[str, BaseException]] = []
        for i in range(n):
            index = (start + i) % n
            try:
                resp = getattr(self.client(index), op)(**params)
            except (bc.exceptions.ConnectionError, bc.exceptions.HTTPClientError) as exc:
                failures.append((self.profile.endpoints[index], exc))
                log.warning("S3 %s at %s: %s; trying the next endpoint", op,
                            self.profile.endpoints[index], printable(str(exc))[:_MSG_MAX])
                continue
            if index != start:
                self._current = index
            return resp
        raise _Unreachable(failures)

    def _map(self, exc: BaseException, op: str, key: str | None) -> SanoffloadError | NotFound:
        """The error an operator reads: which object, which endpoint, never a secret."""
        what = f"{self.location}/{key}" if key else self.location
        endpoint = self.profile.endpoints[self._current]
        if isinstance(exc, _Unreachable):
            if any(_is_tls_verify(e) for _, e in exc.failures):
                ca = (f"the CA file {self.profile.ca_file}" if self.profile.ca_file
                      else "the system's CAs (no ca_file in the profile)")
                return ObjectStoreError(
                    f"S3 {op} {what}: TLS verification of "
                    f"{', '.join(e for e, _ in exc.failures)} failed against {ca}",
                    hint=f"set ca_file in profile {self.profile.name!r} of "
                         f"{self.profile.source} to the CA that signed the gateway's certificate")
            tried = "; ".join(f"{e}: {printable(str(x))[:_MSG_MAX]}" for e, x in exc.failures)
            return ObjectStoreError(f"S3 {op} {what}: no endpoint answered ({tried})")
        bc = _botocore()
        if isinstance(exc, bc.exceptions.ClientError):
            code, status = _code(exc)
            msg = _server_message(exc)
            detail = f"{printable(code)[:64] or status}" + (f": {msg}" if msg else "")
            if code in _NOT_FOUND or (status == 404 and code != "NoSuchBucket"):
                return NotFound(key or "")
            if code in _DENIED or status == 403:
                hint = None
                if op.startswith(("delete", "abort")) and self.profile.role is Role.PROXY:
                    hint = "deleting is the maint role's (a maint profile runs prune and gc)"
                elif op.startswith("delete"):
                    hint = "an object under Object Lock retention cannot be removed before then"
                return AuthError(f"S3 {op} {what} refused for {self.profile.who()} at "
                                 f"{endpoint} ({detail})", hint=hint)
            if code == "PreconditionFailed" or status == 412:
                return ResourceError(f"S3 {op} {what}: an object exists under this key "
                                     "(write-once)")
            if code == "NoSuchBucket":
                return ObjectStoreError(f"S3 {op} {what}: no bucket {self.profile.bucket!r} at "
                                        f"{endpoint}")
            return ObjectStoreError(f"S3 {op} {what} at {endpoint} failed ({detail}, HTTP "
                                    f"{status})")
        if isinstance(exc, bc.exceptions.BotoCoreError):
            return ObjectStoreError(f"S3 {op} {what} at {endpoint}: {type(exc).__name__}: "
                                    f"{printable(str(exc))[:_MSG_MAX]}")
        return ObjectStoreError(f"S3 {op} {what} at {endpoint}: {type(exc).__name__}")

    def _call(self, op: str, key: str | None, **params: Any) -> Any:
        """:meth:`_send`, with its failure mapped (NotFound passes as itself)."""
        bc = _botocore()
        try:
            return self._send(op, Bucket=self.profile.bucket, **params)
        except (_Unreachable, bc.exceptions.BotoCoreError, bc.exceptions.ClientError) as exc:
            raise self._map(exc, op, key) from exc

    def bucket_request(self, op: str, **params: Any) -> Any:
        """A request about the bucket itself (``init-s3``: versioning, lock, policy), with the
        same endpoint failover and error mapping as every object request."""
        return self._call(op, None, **params)

    # -- reads --------------------------------------------------------------------------------

    def stat(self, key: str) -> ObjectInfo | None:
        try:
            resp = self._call("head_object", key, Key=self._full(key))
        except NotFound:
            return None
        return self._info(key, resp)

    def _info(self, key: str, resp: dict[str, Any], *, size: int | None = None) -> ObjectInfo:
        retain = resp.get("ObjectLockRetainUntilDate")
        return ObjectInfo(key=key, size=int(resp.get("ContentLength", size or 0)),
                          mtime=_ts(resp.get("LastModified")) or time.time(),
                          version=_version(resp.get("VersionId")),
                          retain_until=_ts(retain) if retain else None)

    def get(self, key: str, *, max_bytes: int, version: str | None = None) -> bytes:
        extra = {"VersionId": version} if version else {}
        resp = self._call("get_object", key, Key=self._full(key), **extra)
        body = resp["Body"]
        try:
            length = int(resp.get("ContentLength", -1))
            if length > max_bytes:
                raise IntegrityError(f"{self.location}/{key}: {length} bytes, more than the "
                                     f"{max_bytes} expected")
            data = self._read_bounded(body, max_bytes + 1, key)
        finally:
            body.close()
        if len(data) > max_bytes:
            raise IntegrityError(f"{self.location}/{key}: more than the {max_bytes} bytes "
                                 "expected")
        if length >= 0 and len(data) != length:
            raise ObjectStoreError(f"S3 get_object {self.location}/{key}: {len(data)} bytes "
                                   f"read of {length} (the connection ended early)")
        return data

    def _read_bounded(self, body: Any, limit: int, key: str) -> bytes:
        bc = _botocore()
        chunks: list[bytes] = []
        got = 0
        try:
            while got < limit:
                chunk = body.read(min(limit - got, 1 << 20))
                if not chunk:
                    break
                chunks.append(chunk)
                got += len(chunk)
        except (bc.exceptions.BotoCoreError, OSError) as exc:
            raise self._map(exc, "get_object", key) from exc
        return b"".join(chunks)

    def open_read(self, key: str, *, version: str | None = None) -> _Reader:
        extra = {"VersionId": version} if version else {}
        resp = self._call("get_object", key, Key=self._full(key), **extra)
        return _Reader(self, key, resp, version)

    def list(self, prefix: str = "", *, shallow: bool = False) -> Iterator[ObjectInfo]:
        check_prefix(prefix)
        full = self._base + prefix
        token: str | None = None
        while True:
            extra: dict[str, str] = {"ContinuationToken": token} if token else {}
            if shallow:
                extra["Delimiter"] = "/"  # deeper keys come as CommonPrefixes: not read
            resp = self._call("list_objects_v2", prefix or None, Prefix=full, **extra)
            for item in resp.get("Contents") or []:
                key = self._relative(item.get("Key"), full)
                if key is not None and not (shallow and "/" in key[len(prefix):]):
                    yield ObjectInfo(key=key, size=int(item.get("Size") or 0),
                                     mtime=_ts(item.get("LastModified")))
            token = self._next_token(resp, "NextContinuationToken", token)
            if token is None:
                return

    def _next_token(self, resp: dict[str, Any], name: str, previous: str | None) -> str | None:
        if not resp.get("IsTruncated"):
            return None
        token = resp.get(name)
        if not isinstance(token, str) or not token or token == previous:
            # a listing that says "more" without a new place to go on from would loop for ever
            raise ObjectStoreError(f"S3 listing of {self.location}: truncated without a new "
                                   f"{name}")
        return token

    def _relative(self, name: object, full_prefix: str) -> str | None:
        """The repository key of a listed S3 key, or None (logged) if it cannot be one."""
        if not isinstance(name, str) or not name.startswith(full_prefix):
            log.warning("S3 listing of %s: skipped %s, not under the prefix asked for",
                        self.location, printable(str(name))[:_MSG_MAX])
            return None
        key = name[len(self._base):]
        try:
            return check_key(key)
        except SanoffloadError:
            log.warning("S3 listing of %s: skipped %s, not a valid object name",
                        self.location, printable(name)[:_MSG_MAX])
            return None

    def versions(self, key: str, *, retention: bool = True) -> builtins.list[ObjectInfo]:
        full = self._full(key)
        rows: builtins.list[tuple[float, int, ObjectInfo]] = []
        order = 0
        for resp in self._marker_pages("list_object_versions", key, "VersionId",
                                       f"version listing of {self.location}/{key}",
                                       Prefix=full):
            # S3 lists a key's versions newest first; -order keeps that for equal times
            for item in resp.get("Versions") or []:
                if item.get("Key") == full:
                    order += 1
                    rows.append((_ts(item.get("LastModified")), -order, ObjectInfo(
                        key=key, size=int(item.get("Size") or 0),
                        mtime=_ts(item.get("LastModified")),
                        version=_version(item.get("VersionId")))))
            for item in resp.get("DeleteMarkers") or []:
                if item.get("Key") == full:
                    order += 1
                    rows.append((_ts(item.get("LastModified")), -order, ObjectInfo(
                        key=key, size=0, mtime=_ts(item.get("LastModified")),
                        version=_version(item.get("VersionId")), deleted=True)))
            next_key = resp.get("NextKeyMarker")
            if resp.get("IsTruncated") and isinstance(next_key, str) and next_key > full:
                break  # past our key: the rest are other keys with the same prefix
        out = [info for _, _, info in sorted(rows, key=lambda r: (r[0], r[1]))]
        if retention:
            out = [self._with_retention(i) for i in out]
        return out

    def _with_retention(self, info: ObjectInfo) -> ObjectInfo:
        if info.deleted or info.version is None:
            return info
        try:
            resp = self._call("head_object", info.key, Key=self._full(info.key),
                              VersionId=info.version)
        except NotFound:
            return info
        retain = resp.get("ObjectLockRetainUntilDate")
        if not retain:
            return info
        return ObjectInfo(info.key, info.size, info.mtime, info.version, _ts(retain),
                          info.deleted)

    def extend_retention(self, key: str, *, version: str | None, until: float) -> float | None:
        """HEAD the version for its lock; if it ends before ``until``,
        ``PutObjectRetention`` (``Mode`` kept, else the bucket's default) to ``until``."""
        extra = {"VersionId": version} if version else {}
        head = self._call("head_object", key, Key=self._full(key), **extra)
        retain = head.get("ObjectLockRetainUntilDate")
        current = _ts(retain) if retain else None
        if current is not None and current >= until:
            return current
        mode = head.get("ObjectLockMode") or self._default_lock_mode
        if mode is None:
            return None
        if mode not in LOCK_MODES:
            raise ObjectStoreError(f"S3 head_object {self.location}/{key}: Object Lock mode "
                                   f"{printable(str(mode))[:40]!r} is neither of {LOCK_MODES}")
        version = version or _version(head.get("VersionId"))
        self._call("put_object_retention", key, Key=self._full(key),
                   Retention={"Mode": mode, "RetainUntilDate": datetime.fromtimestamp(until, UTC)},
                   **({"VersionId": version} if version else {}))
        return until

    @functools.cached_property
    def _default_lock_mode(self) -> str | None:
        """The bucket's default Object Lock mode (one of LOCK_MODES); None without one. Asked
        once (a failure is not cached: the next call asks again)."""
        try:
            conf = self._call("get_object_lock_configuration", None)
        except NotFound:
            return None
        rule = (conf.get("ObjectLockConfiguration") or {}).get("Rule") or {}
        mode = (rule.get("DefaultRetention") or {}).get("Mode")
        return mode if mode in LOCK_MODES else None

    def stale_uploads(self, older_than: float) -> Iterator[Upload]:
        for resp in self._marker_pages("list_multipart_uploads", None, "UploadId",
                                       f"upload listing of {self.location}",
                                       Prefix=self._base):
            for item in resp.get("Uploads") or []:
                key = self._relative(item.get("Key"), self._base)
                uid = item.get("UploadId")
                started = _ts(item.get("Initiated"))
                if key is None or not isinstance(uid, str) or not uid.isprintable() \
                        or len(uid) > 1024:
                    continue
                if started < older_than:
                    yield Upload(key, uid, started)

    def _marker_pages(self, op: str, key: str | None, second: str, what: str,
                      **params: Any) -> Iterator[dict[str, Any]]:
        """The pages of a listing that goes on from ``KeyMarker`` and ``<second>Marker``
        (``VersionId``, ``UploadId``). A page saying "more" with no new place to go on from
        would loop for ever: ObjectStoreError."""
        key_marker: str | None = None
        second_marker: str | None = None
        while True:
            extra: dict[str, str] = {}
            if key_marker:
                extra["KeyMarker"] = key_marker
            if second_marker:
                extra[f"{second}Marker"] = second_marker
            resp = self._call(op, key, **params, **extra)
            yield resp
            if not resp.get("IsTruncated"):
                return
            nk, ns = resp.get("NextKeyMarker"), resp.get(f"Next{second}Marker")
            if not isinstance(nk, str) or (nk, ns) == (key_marker, second_marker):
                raise ObjectStoreError(f"S3 {what}: truncated without a new marker")
            key_marker, second_marker = nk, ns if isinstance(ns, str) else None

    # -- writes -------------------------------------------------------------------------------

    def put(self, key: str, data: bytes, *, exclusive: bool = True) -> ObjectInfo:
        full = self._full(key)
        verify = exclusive and not self.trust_if_none_match
        if verify and self.stat(key) is not None:
            raise ResourceError(f"S3 put_object {self.location}/{key}: an object exists under "
                                "this key (write-once)")
        md5_hex, md5_b64 = _md5(data)
        extra = {"IfNoneMatch": "*"} if exclusive else {}
        bc = _botocore()
        try:
            resp = self._send("put_object", Bucket=self.profile.bucket, Key=full, Body=data,
                              ContentMD5=md5_b64, ContentLength=len(data), **extra)
        except (_Unreachable, bc.exceptions.BotoCoreError, bc.exceptions.ClientError) as exc:
            err = self._map(exc, "put_object", key)
            if isinstance(err, ResourceError) and _retried(exc):
                # a put retried after a lost answer finds its own first attempt: same bytes, ours
                info = self.stat(key)
                if info is not None and info.size == len(data) and self._etag_of(key) == md5_hex:
                    return info
            raise err from exc
        if _etag(resp) != md5_hex:
            raise ObjectStoreError(f"S3 put_object {self.location}/{key}: the store answered "
                                   f"ETag {printable(_etag(resp))[:80]!r}, not the MD5 of the "
                                   f"bytes sent ({md5_hex})")
        info = ObjectInfo(key=key, size=len(data), mtime=time.time(),
                          version=_version(resp.get("VersionId")))
        if verify:
            self._check_single_version(key, "put_object", info.version)
        return info

    def _etag_of(self, key: str) -> str | None:
        try:
            return _etag(self._call("head_object", key, Key=self._full(key)))
        except NotFound:
            return None

    def _check_single_version(self, key: str, op: str, ours: str | None) -> None:
        """After a write-once write: a key with a second version had another writer."""
        found = self.versions(key, retention=False)
        if len(found) <= 1:
            return
        oldest = found[0]
        if oldest.version == ours:
            raise ResourceError(f"S3 {op} {self.location}/{key}: written, but the key has "
                                f"{len(found)} versions: another writer wrote it after us "
                                "(the oldest, ours, is the one the repository reads)")
        raise ResourceError(f"S3 {op} {self.location}/{key}: an object existed under this key "
                            f"({len(found)} versions now; the store did not refuse the write: "
                            "the oldest is the one the repository reads)")

    def writer(self, key: str, *, size_hint: int | None = None) -> S3Writer:
        self._full(key)
        part = self.profile.part_size
        if size_hint is not None and size_hint > 0:
            # fit the expected size in 90% of the part limit, whole MiB, within the bounds
            need = -(-size_hint // (MAX_PARTS * 9 // 10))
            part = min(MAX_PART, max(part, -(-need // (1 << 20)) * (1 << 20)))
        return S3Writer(self, key, part)

    def delete(self, key: str, *, version: str | None = None) -> None:
        extra = {"VersionId": version} if version else {}
        try:
            self._call("delete_object", key, Key=self._full(key), **extra)
        except NotFound:
            pass

    def abort_upload(self, upload: Upload) -> None:
        try:
            self._call("abort_multipart_upload", upload.key, Key=self._full(upload.key),
                       UploadId=upload.upload_id)
        except NotFound:
            pass

    def probe_conditional_put(self, key: str = "config/probe-if-none-match") -> bool:
        """Does the store refuse a second put with ``If-None-Match: *``? Sets the trust flag.

        Writes ``key`` twice (the second exclusively); True when the second is
        refused (412). A maint profile removes every version it made.
        """
        full = self._full(key)
        body = b"sanoffload probe\n"
        _, md5_b64 = _md5(body)
        bc = _botocore()
        self._call("put_object", key, Key=full, Body=body, ContentMD5=md5_b64)
        try:
            self._send("put_object", Bucket=self.profile.bucket, Key=full, Body=body,
                       ContentMD5=md5_b64, IfNoneMatch="*")
            honoured = False
        except bc.exceptions.ClientError as exc:
            code, status = _code(exc)
            if code != "PreconditionFailed" and status != 412:
                raise self._map(exc, "put_object", key) from exc
            honoured = True
        except (_Unreachable, bc.exceptions.BotoCoreError) as exc:
            raise self._map(exc, "put_object", key) from exc
        if self.profile.role is Role.MAINT:
            for v in self.versions(key, retention=False):
                self.delete(key, version=v.version)
        self.trust_if_none_match = honoured
        return honoured

    # -- multipart, for S3Writer ------------------------------------------------------------

    def _upload_part(self, key: str, upload_id: str, number: int,
                     data: bytes | bytearray, deadline: float) -> _Part:
        """Send one part until it is stored (or the deadline passes); same number, same bytes."""
        md5_hex, md5_b64 = _md5(data)
        bc = _botocore()
        delay = BACKOFF_FIRST_S
        attempt = 0
        while True:
            attempt += 1
            try:
                resp = self._send("upload_part", Bucket=self.profile.bucket,
                                  Key=self._full(key), UploadId=upload_id, PartNumber=number,
                                  Body=data, ContentMD5=md5_b64, ContentLength=len(data))
            except (_Unreachable, bc.exceptions.BotoCoreError,
                    bc.exceptions.ClientError) as exc:
                if not _transient(exc) or self.clock() + delay > deadline:
                    err = self._map(exc, "upload_part", key)
                    if isinstance(err, NotFound):
                        err = ObjectStoreError(f"S3 upload_part {self.location}/{key} part "
                                               f"{number}: the upload is gone (aborted, or "
                                               "removed by gc as stale)")
                    if isinstance(err, ObjectStoreError) and _transient(exc):
                        err = ObjectStoreError(f"{err.message}; part {number} tried {attempt} "
                                               f"times in {self.part_retry_s:g} s",
                                               hint=err.hint)
                    raise err from exc
                log.warning("S3 upload_part %s/%s part %d failed (%s); again in %.1f s",
                            self.location, key, number,
                            printable(str(exc))[:_MSG_MAX], delay)
                self.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX_S)
                continue
            if _etag(resp) != md5_hex:
                raise ObjectStoreError(f"S3 upload_part {self.location}/{key} part {number}: "
                                       f"ETag {printable(_etag(resp))[:80]!r} is not the MD5 "
                                       f"of the part ({md5_hex})")
            return _Part(number, md5_hex, len(data))


def _version(v: object) -> str | None:
    # an unversioned bucket says "null"
    return v if isinstance(v, str) and v and v != "null" else None


class _Reader:
    """A streamed object (``open_read``); a dropped connection resumes where it stopped.

    The resume asks for the same version (or, unversioned, the same ETag with
    If-Match), so a replaced object is never spliced into the stream.
    """

    def __init__(self, backend: S3Backend, key: str, resp: dict[str, Any],
                 version: str | None) -> None:
        self._backend = backend
        self.key = key
        self._body = resp["Body"]
        self._length = int(resp.get("ContentLength", -1))
        self._etag = str(resp.get("ETag", ""))
        self._version = version or _version(resp.get("VersionId"))
        self._pos = 0
        self._resumes = 0

    def read(self, size: int = -1, /) -> bytes:
        bc = _botocore()
        while True:
            try:
                data: bytes = self._body.read(size if size >= 0 else None)
            except (bc.exceptions.BotoCoreError, OSError) as exc:
                if self._resumes >= self._backend.profile.max_attempts:
                    raise self._backend._map(exc, "get_object", self.key) from exc
                self._resume(exc)
                continue
            self._pos += len(data)
            if not data and 0 <= self._pos < self._length and size != 0:
                # the body ended before Content-Length: resume rather than truncate
                if self._resumes >= self._backend.profile.max_attempts:
                    raise ObjectStoreError(f"S3 get_object {self._backend.location}/{self.key}: "
                                           f"ended at {self._pos} of {self._length} bytes")
                self._resume(None)
                continue
            return data

    def _resume(self, exc: BaseException | None) -> None:
        self._resumes += 1
        log.warning("S3 read of %s/%s broke at byte %d (%s); resuming", self._backend.location,
                    self.key, self._pos, printable(str(exc))[:_MSG_MAX] if exc else "short body")
        try:
            self._body.close()
        except Exception:  # the old stream is dead either way
            pass
        cond = {"VersionId": self._version} if self._version else {"IfMatch": self._etag}
        resp = self._backend._call("get_object", self.key, Key=self._backend._full(self.key),
                                   Range=f"bytes={self._pos}-", **cond)
        self._body = resp["Body"]

    def close(self) -> None:
        self._body.close()

    def __enter__(self) -> _Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class S3Writer:
    """One object written in parts (an :class:`~sanoffload.store.backend.ObjectWriter`).

    Memory: the part filling and at most one part in flight. An object that
    never fills a part goes up as one put at commit.
    """

    def __init__(self, backend: S3Backend, key: str, part_size: int) -> None:
        self.backend = backend
        self.key = key
        self.part_size = part_size
        self._buf = bytearray()
        self._parts: list[_Part] = []
        self._upload_id: str | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._inflight: Future[_Part] | None = None
        self._state = "open"

    @property
    def upload_id(self) -> str | None:
        return self._upload_id

    def write(self, data: bytes | bytearray | memoryview, /) -> None:
        if self._state != "open":
            raise ValueError(f"writer of {self.key} is {self._state}")
        view = memoryview(data).cast("B")
        try:
            while view:
                room = self.part_size - len(self._buf)
                self._buf += view[:room]
                view = view[room:]
                if len(self._buf) >= self.part_size:
                    self._ship(final=False)
        except BaseException:
            # the upload cannot go on (a part failed for good, or we were interrupted):
            # abort() removes it
            self._state = "failed"
            raise

    def _ship(self, *, final: bool) -> None:
        """Hand the filled part to the uploader, after the one in flight is stored."""
        self._wait()
        if self._upload_id is None:
            resp = self.backend._call("create_multipart_upload", self.key,
                                      Key=self.backend._full(self.key))
            uid = resp.get("UploadId")
            if not isinstance(uid, str) or not uid:
                raise ObjectStoreError(f"S3 create_multipart_upload {self.backend.location}/"
                                       f"{self.key}: no UploadId in the answer")
            self._upload_id = uid
            self._pool = ThreadPoolExecutor(max_workers=1,
                                            thread_name_prefix="sanoffload-s3-part")
        number = len(self._parts) + 1
        if number > MAX_PARTS:
            raise ObjectStoreError(f"S3 multipart {self.backend.location}/{self.key}: more than "
                                   f"{MAX_PARTS} parts")
        # the part goes in a box the uploader empties: the executor keeps a finished task's
        # arguments until its thread next runs, which can be after we filled another part
        box, self._buf = [self._buf], bytearray()
        deadline = self.backend.clock() + self.backend.part_retry_s
        assert self._pool is not None
        self._inflight = self._pool.submit(self._send, box, self._upload_id, number, deadline)
        if final:
            self._wait()
        elif number % PARTS_PER_STEP == 0:
            self.part_size = min(MAX_PART, self.part_size * 2)

    def _send(self, box: list[bytearray], upload_id: str, number: int,
              deadline: float) -> _Part:
        return self.backend._upload_part(self.key, upload_id, number, box.pop(), deadline)

    def _wait(self) -> None:
        fut, self._inflight = self._inflight, None
        if fut is not None:
            self._parts.append(fut.result())

    def commit(self) -> ObjectInfo:
        if self._state != "open":
            raise ValueError(f"writer of {self.key} is {self._state}")
        try:
            if self._upload_id is None:
                info = self.backend.put(self.key, bytes(self._buf), exclusive=True)
            else:
                if self._buf:
                    self._ship(final=True)
                self._wait()
                info = self._complete()
        except BaseException as exc:
            self._state = "failed"
            try:
                self.abort()
            except Exception as undo:  # the commit's error is the one to report
                exc.add_note(f"and aborting the upload failed too: {undo} (gc removes it later)")
            raise
        self._state = "committed"
        self._buf = bytearray()
        self._shutdown()
        return info

    def _complete(self) -> ObjectInfo:
        b = self.backend
        full = b._full(self.key)
        # no conditional CompleteMultipartUpload in RGW 16.2: look first
        if b.stat(self.key) is not None:
            raise ResourceError(f"S3 complete_multipart_upload {b.location}/{self.key}: an "
                                "object exists under this key (write-once)")
        digest = hashlib.md5(b"".join(bytes.fromhex(p.md5_hex) for p in self._parts),
                             usedforsecurity=False).hexdigest()
        expected = f"{digest}-{len(self._parts)}"
        size = sum(p.size for p in self._parts)
        parts = [{"PartNumber": p.number, "ETag": f'"{p.md5_hex}"'} for p in self._parts]
        try:
            resp = b._call("complete_multipart_upload", self.key, Key=full,
                           UploadId=self._upload_id, MultipartUpload={"Parts": parts})
        except NotFound:
            # a complete retried after a lost answer finds the upload gone: ours if the ETag is
            info = b.stat(self.key)
            if info is None or b._etag_of(self.key) != expected:
                raise ObjectStoreError(f"S3 complete_multipart_upload {b.location}/{self.key}: "
                                       "the upload is gone (aborted, or removed by gc as "
                                       "stale)") from None
            resp = {"ETag": f'"{expected}"', "VersionId": info.version}
        if not _etag(resp):
            # RGW 16.2 answers CompleteMultipartUpload with an empty <ETag/>: ask for it
            version = _version(resp.get("VersionId"))
            extra = {"VersionId": version} if version else {}
            resp = {**b._call("head_object", self.key, Key=full, **extra),
                    "VersionId": resp.get("VersionId")}
        if _etag(resp) != expected:
            raise ObjectStoreError(f"S3 complete_multipart_upload {b.location}/{self.key}: ETag "
                                   f"{printable(_etag(resp))[:80]!r}, not {expected} (the MD5 "
                                   "of the parts' MD5s)")
        self._upload_id = None
        version = _version(resp.get("VersionId"))
        b._check_single_version(self.key, "complete_multipart_upload", version)
        return ObjectInfo(key=self.key, size=size, mtime=time.time(), version=version)

    def abort(self) -> None:
        if self._state in ("committed", "aborted"):
            return
        self._state = "aborting"
        try:
            self._wait()
        except BaseException:  # the part's failure is why we abort
            pass
        self._shutdown()
        self._buf = bytearray()
        upload, self._upload_id = self._upload_id, None
        self._state = "aborted"
        if upload is not None:
            try:
                self.backend.abort_upload(Upload(self.key, upload, 0.0))
            except SanoffloadError as exc:
                # the failure that made us abort is the one to report (a dead gateway refuses
                # the abort too); the upload stays listed by stale_uploads, and gc aborts it
                log.warning("S3 %s/%s: upload not aborted (%s); gc removes it later",
                            self.backend.location, self.key, printable(str(exc))[:_MSG_MAX])

    def _shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
