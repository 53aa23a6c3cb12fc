"""The S3 backend's error paths and the S3 profile file, without a store.

Real botocore clients made by the production factory (so every Config key is
the one the backend uses), with ``botocore.stub.Stubber`` answering the
requests: answers recorded from S3/RGW's documented shapes, errors as RGW
sends them (code, HTTP status). Connection failures, which a Stubber cannot
make, come from a ``before-send`` event hook raising botocore's own exception,
as urllib3 would. The happy paths run against a real RGW in
tests/host/test_backend_s3_rgw.py.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import io
import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# botocore ships no type information
from botocore.exceptions import (  # type: ignore[import-untyped]
    EndpointConnectionError,
    ReadTimeoutError,
    SSLError,
)
from botocore.response import StreamingBody  # type: ignore[import-untyped]
from botocore.stub import ANY, Stubber  # type: ignore[import-untyped]

from sanoffload.errors import (
    AuthError,
    ConfigError,
    IntegrityError,
    ObjectStoreError,
    ResourceError,
    UsageError,
)
from sanoffload.store import backend_s3, s3config
from sanoffload.store.backend import Backend, NotFound
from sanoffload.store.backend_s3 import S3Backend, S3Writer, make_client
from sanoffload.store.s3config import ConditionalPut, Role, S3Profile

SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYzSECRET"
EP1, EP2 = "https://rgw1.test:7480", "https://rgw2.test:7480"
T0 = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)


def _profile(**kw: Any) -> S3Profile:
    base: dict[str, Any] = {"name": "px1", "endpoints": (EP1, EP2), "bucket": "bkt",
                            "access_key": "PX1KEY", "secret_key": SECRET, "role": Role.PROXY,
                            "prefix": "site", "max_attempts": 1}
    base.update(kw)
    return S3Profile(**base)


def md5(data: bytes) -> tuple[str, str]:
    h = hashlib.md5(data, usedforsecurity=False)
    return h.hexdigest(), base64.b64encode(h.digest()).decode()


class Clock:
    """A clock that only moves when the backend sleeps: backoff without waiting."""

    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.slept.append(s)
        self.now += s


class Rig:
    """An S3Backend whose endpoints' clients are stubbed (or made unreachable)."""

    def __init__(self, **kw: Any) -> None:
        self.clock = Clock()
        self.stubs: dict[str, Stubber] = {}
        self.profile = _profile(**kw)
        self.backend = S3Backend(self.profile, client_factory=self._make,
                                 sleep=self.clock.sleep, clock=self.clock, part_retry_s=10)

    def _make(self, profile: S3Profile, endpoint: str) -> Any:
        client = make_client(profile, endpoint)
        stub = Stubber(client)
        stub.activate()
        self.stubs[endpoint] = stub
        return client

    def stub(self, endpoint: str = EP1) -> Stubber:
        i = self.profile.endpoints.index(endpoint)
        self.backend.client(i)
        return self.stubs[endpoint]

    def unreachable(self, endpoint: str, exc: Exception | None = None) -> None:
        i = self.profile.endpoints.index(endpoint)
        client = self.backend.client(i)
        # no stub: the request is signed and sent, and dies where urllib3 would
        self.stubs.pop(endpoint).deactivate()

        def refuse(**_: Any) -> None:
            raise exc or EndpointConnectionError(endpoint_url=endpoint)

        client.meta.events.register("before-send.s3", refuse)

    def done(self) -> None:
        for s in self.stubs.values():
            s.assert_no_pending_responses()


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = Rig()
    yield r
    r.done()


def _body(data: bytes) -> StreamingBody:
    return StreamingBody(io.BytesIO(data), len(data))


def _no_secret(text: str) -> None:
    assert SECRET not in text and SECRET[:12] not in text


# -- the client ------------------------------------------------------------------------------

def test_every_client_setting_rgw_needs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("not read until a connection\n")
    # an AWS profile, config file or checksum setting in the environment must change nothing
    cfg = tmp_path / "aws.cfg"
    cfg.write_text("[default]\ns3 =\n  addressing_style = virtual\n"
                   "request_checksum_calculation = when_supported\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(cfg))
    monkeypatch.setenv("AWS_PROFILE", "no-such-profile")
    prof = _profile(ca_file=str(ca), connect_timeout=7.0, read_timeout=99.0, max_attempts=4,
                    region="zg1")
    client = make_client(prof, EP2)
    c = client.meta.config
    assert c.s3 == {"addressing_style": "path"}
    assert c.request_checksum_calculation == "when_required"
    assert c.response_checksum_validation == "when_required"
    assert c.retries == {"mode": "standard", "total_max_attempts": 4}
    assert (c.connect_timeout, c.read_timeout) == (7.0, 99.0)
    assert c.signature_version == "s3v4" and c.region_name == "zg1"
    assert c.max_pool_connections == 4 and c.tcp_keepalive is True
    assert client.meta.endpoint_url == EP2
    assert client._endpoint.http_session._verify == str(ca)
    assert make_client(_profile(), EP1)._endpoint.http_session._verify is True
    # the one the backend makes is the same
    assert S3Backend(prof).client(1).meta.config.s3 == {"addressing_style": "path"}
    _no_secret(repr(prof) + str(prof) + repr(S3Backend(prof)))


def test_s3backend_is_a_backend(rig: Rig) -> None:
    assert isinstance(rig.backend, Backend)
    assert rig.backend.location == "s3://bkt/site"


# -- put ------------------------------------------------------------------------------------

def test_put_sends_content_md5_and_if_none_match_and_checks_the_etag(rig: Rig) -> None:
    rig.backend.trust_if_none_match = True
    data = b"manifest\n"
    hx, b64 = md5(data)
    s = rig.stub()
    s.add_response("put_object", {"ETag": f'"{hx}"', "VersionId": "v1"},
                   {"Bucket": "bkt", "Key": "site/m.json", "Body": data, "ContentMD5": b64,
                    "ContentLength": len(data), "IfNoneMatch": "*"})
    info = rig.backend.put("m.json", data)
    assert (info.key, info.size, info.version) == ("m.json", len(data), "v1")
    s.add_response("put_object", {"ETag": '"00000000000000000000000000000000"'},
                   {"Bucket": "bkt", "Key": "site/x", "Body": data, "ContentMD5": b64,
                    "ContentLength": len(data)})
    with pytest.raises(ObjectStoreError, match="not the MD5") as info2:
        rig.backend.put("x", data, exclusive=False)
    assert info2.value.exit_code == 16


@pytest.mark.hostile("store", "S3: a put over an existing key (412 Precondition Failed)",
                     "ResourceError (exit 7) naming the key")
def test_412_is_a_resource_error(rig: Rig) -> None:
    rig.backend.trust_if_none_match = True
    rig.stub().add_client_error("put_object", "PreconditionFailed", "At least one of the "
                                "pre-conditions you specified did not hold", 412)
    with pytest.raises(ResourceError, match=r"s3://bkt/site/m.json: an object exists") as e:
        rig.backend.put("m.json", b"x")
    assert e.value.exit_code == 7


def test_a_412_after_a_retry_of_our_own_put_is_success(rig: Rig) -> None:
    # the first attempt stored the object, its answer was lost, the retry found it: ours
    rig.backend.trust_if_none_match = True
    data = b"same bytes"
    hx, _ = md5(data)
    s = rig.stub()
    s.add_client_error("put_object", "PreconditionFailed", "", 412,
                       response_meta={"RetryAttempts": 1})
    s.add_response("head_object", {"ContentLength": len(data), "ETag": f'"{hx}"',
                                   "LastModified": T0})
    s.add_response("head_object", {"ContentLength": len(data), "ETag": f'"{hx}"',
                                   "LastModified": T0})
    assert rig.backend.put("k", data).size == len(data)


@pytest.mark.hostile("store", "S3 versioned bucket: a second put under a key is stored, not "
                     "refused", "HEAD before and versions after: ResourceError naming the key")
def test_verify_mode_heads_before_and_lists_versions_after(rig: Rig) -> None:
    assert rig.profile.conditional_put is ConditionalPut.VERIFY
    data = b"m"
    hx, _ = md5(data)
    s = rig.stub()
    s.add_response("head_object", {"ContentLength": 1, "ETag": f'"{hx}"', "LastModified": T0})
    with pytest.raises(ResourceError, match="an object exists"):
        rig.backend.put("m.json", data)
    s.add_client_error("head_object", "404", "", 404)
    s.add_response("put_object", {"ETag": f'"{hx}"', "VersionId": "v2"})
    s.add_response("list_object_versions", {"IsTruncated": False, "Versions": [
        {"Key": "site/m.json", "VersionId": "v2", "LastModified": T0 + dt.timedelta(seconds=1),
         "Size": 1, "IsLatest": True},
        {"Key": "site/m.json", "VersionId": "v1", "LastModified": T0, "Size": 1}]},
        {"Bucket": "bkt", "Prefix": "site/m.json"})
    with pytest.raises(ResourceError, match=r"site/m.json: an object existed.*2 versions"):
        rig.backend.put("m.json", data)


@pytest.mark.hostile("store", "S3: the proxy's credentials refused (403 AccessDenied), e.g. "
                     "on delete", "AuthError (exit 10) naming profile and role, no secret")
def test_403_is_an_auth_error_that_names_the_role_not_the_secret(rig: Rig) -> None:
    rig.stub().add_client_error("delete_object", "AccessDenied", "Access Denied", 403)
    with pytest.raises(AuthError) as e:
        rig.backend.delete("backups/x.json", version="v1")
    msg = str(e.value)
    assert e.value.exit_code == 10
    assert "profile 'px1'" in msg and "role proxy" in msg and "PX1KEY" in msg
    assert "AccessDenied" in msg and "maint role" in msg and "s3://bkt/site/backups/x.json" in msg
    _no_secret(msg)
    rig.stub().add_client_error("get_object", "SignatureDoesNotMatch", "The request signature "
                                "we calculated does not match", 403)
    with pytest.raises(AuthError):
        rig.backend.get("k", max_bytes=10)


def test_missing_objects_are_notfound(rig: Rig) -> None:
    s = rig.stub()
    s.add_client_error("get_object", "NoSuchKey", "", 404)
    with pytest.raises(NotFound):
        rig.backend.get("k", max_bytes=10)
    s.add_client_error("head_object", "404", "", 404)
    assert rig.backend.stat("k") is None
    s.add_client_error("delete_object", "NoSuchKey", "", 404)
    rig.backend.delete("k")  # missing is not an error
    s.add_client_error("get_object", "NoSuchBucket", "", 404)
    with pytest.raises(ObjectStoreError, match="no bucket 'bkt'"):
        rig.backend.get("k", max_bytes=10)


# -- endpoints, connections, TLS ---------------------------------------------------------------

def test_a_refused_connection_tries_the_next_endpoint_and_stays_there(rig: Rig) -> None:
    rig.unreachable(EP1)
    s2 = rig.stub(EP2)
    s2.add_response("head_object", {"ContentLength": 3, "ETag": '"e"', "LastModified": T0})
    s2.add_response("head_object", {"ContentLength": 4, "ETag": '"e"', "LastModified": T0})
    assert rig.backend.stat("a") is not None
    assert rig.backend.stat("b") is not None  # straight to EP2 this time


@pytest.mark.hostile("store", "S3: every endpoint refuses connections", "ObjectStoreError "
                     "(exit 16) naming each endpoint")
def test_no_endpoint_answering_is_an_object_store_error(rig: Rig) -> None:
    rig.unreachable(EP1)
    rig.unreachable(EP2)
    with pytest.raises(ObjectStoreError) as e:
        rig.backend.get("k", max_bytes=10)
    assert e.value.exit_code == 16 and EP1 in str(e.value) and EP2 in str(e.value)
    _no_secret(str(e.value))


@pytest.mark.hostile("store", "S3 gateway's certificate not signed by the configured CA",
                     "ObjectStoreError (exit 16) naming the CA file")
def test_tls_verification_failure_names_the_ca_file(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    r = Rig(ca_file=str(ca), endpoints=(EP1,))
    r.unreachable(EP1, SSLError(endpoint_url=EP1, error="[SSL: CERTIFICATE_VERIFY_FAILED] "
                                "certificate verify failed: self-signed certificate"))
    with pytest.raises(ObjectStoreError, match=f"TLS verification of {EP1} failed against "
                                               f"the CA file {ca}") as e:
        r.backend.stat("k")
    assert "ca_file" in (e.value.hint or "")


# -- bounded reads ---------------------------------------------------------------------------

@pytest.mark.hostile("store", "S3 object bigger than the reader accepts (Content-Length, or a "
                     "body longer than it claims)", "IntegrityError; at most max_bytes+1 read")
def test_get_is_bounded(rig: Rig) -> None:
    s = rig.stub()
    big = _Counting(b"x" * 1000)
    s.add_response("get_object", {"Body": StreamingBody(big, 1000), "ContentLength": 1000})
    with pytest.raises(IntegrityError, match="1000 bytes, more than the 10"):
        rig.backend.get("k", max_bytes=10)
    assert big.got == 0  # refused from the header, nothing read
    lying = _Counting(b"y" * 1000)
    s.add_response("get_object", {"Body": StreamingBody(lying, 1000), "ContentLength": 5})
    with pytest.raises(IntegrityError, match="more than the 10 bytes"):
        rig.backend.get("k", max_bytes=10)
    assert lying.got == 11
    s.add_response("get_object", {"Body": _body(b"abc"), "ContentLength": 5})
    with pytest.raises(ObjectStoreError, match="3 bytes read of 5"):
        rig.backend.get("k", max_bytes=10)
    s.add_response("get_object", {"Body": _body(b"abc"), "ContentLength": 3, "VersionId": "v"},
                   {"Bucket": "bkt", "Key": "site/k", "VersionId": "v"})
    assert rig.backend.get("k", max_bytes=3, version="v") == b"abc"


class _Counting(io.BytesIO):
    """A body that counts what was read from it (closing does not forget)."""

    got = 0

    def read(self, size: int | None = -1) -> bytes:
        out = super().read(size)
        self.got += len(out)
        return out


class _Breaking(io.RawIOBase):
    """A body that delivers ``n`` bytes, then times out like a dead connection."""

    def __init__(self, data: bytes, n: int) -> None:
        self.data, self.n, self.pos = data, n, 0

    def read(self, size: int | None = -1) -> bytes:
        if self.pos >= self.n:
            raise ReadTimeoutError(endpoint_url=EP1)
        size = self.n - self.pos if size is None or size < 0 else min(size, self.n - self.pos)
        out = self.data[self.pos:self.pos + size]
        self.pos += len(out)
        return out


def test_open_read_resumes_the_same_version_after_a_dropped_connection() -> None:
    r = Rig(max_attempts=2)
    data = bytes(range(256)) * 4
    s = r.stub()
    s.add_response("get_object", {"Body": _Breaking(data, 300), "ContentLength": len(data),
                                  "ETag": '"e1"', "VersionId": "v7"})
    s.add_response("get_object", {"Body": _body(data[300:]), "ContentLength": len(data) - 300},
                   {"Bucket": "bkt", "Key": "site/a.tar.zst", "Range": "bytes=300-",
                    "VersionId": "v7"})
    reader = r.backend.open_read("a.tar.zst")
    got = b""
    while chunk := reader.read(100):
        got += chunk
    reader.close()
    assert got == data
    r.done()


# -- listings --------------------------------------------------------------------------------

@pytest.mark.hostile("store", "S3 listing with names that are no valid key (.., control "
                     "characters, outside the prefix, .partial)", "skipped and logged "
                     "escaped; only valid keys returned")
def test_hostile_listing_names_are_skipped(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    names = ["site/backups/../../etc", "site/backups/a\nFAKE row", "site/backups/\x1b]0;x\x07",
             "other/backups/x", "site/backups/ok.partial", "site/backups/good.json",
             "site/backups/" + "a" * 600]
    rig.stub().add_response("list_objects_v2", {"IsTruncated": False, "Contents": [
        {"Key": n, "Size": 1, "LastModified": T0} for n in names]},
        {"Bucket": "bkt", "Prefix": "site/backups/"})
    with caplog.at_level(logging.WARNING):
        got = list(rig.backend.list("backups/"))
    assert [i.key for i in got] == ["backups/good.json"]
    assert got[0].mtime == T0.timestamp()
    text = caplog.text
    assert "\x1b" not in text and "FAKE row" in text and "a\nFAKE" not in text
    assert text.count("skipped") == len(names) - 1


@pytest.mark.hostile("store", "S3 listing that says 'truncated' with no new continuation token",
                     "ObjectStoreError, not an endless loop")
def test_listing_pages_and_refuses_a_loop(rig: Rig) -> None:
    s = rig.stub()
    s.add_response("list_objects_v2", {"IsTruncated": True, "NextContinuationToken": "t1",
                                       "Contents": [{"Key": "site/a", "Size": 1}]},
                   {"Bucket": "bkt", "Prefix": "site/"})
    s.add_response("list_objects_v2", {"IsTruncated": False,
                                       "Contents": [{"Key": "site/b", "Size": 2}]},
                   {"Bucket": "bkt", "Prefix": "site/", "ContinuationToken": "t1"})
    assert [i.key for i in rig.backend.list()] == ["a", "b"]
    s.add_response("list_objects_v2", {"IsTruncated": True, "NextContinuationToken": "t1"})
    s.add_response("list_objects_v2", {"IsTruncated": True, "NextContinuationToken": "t1"})
    with pytest.raises(ObjectStoreError, match="truncated without a new"):
        list(rig.backend.list())
    with pytest.raises(UsageError):
        list(rig.backend.list("../"))


def test_versions_are_oldest_first_with_markers_and_only_this_key(rig: Rig) -> None:
    s = rig.stub()
    t = [T0 + dt.timedelta(seconds=i) for i in range(3)]
    s.add_response("list_object_versions", {
        "IsTruncated": False,
        "Versions": [{"Key": "site/k", "VersionId": "v2", "LastModified": t[1], "Size": 2},
                     {"Key": "site/k", "VersionId": "v1", "LastModified": t[0], "Size": 1},
                     {"Key": "site/k2", "VersionId": "x", "LastModified": t[0], "Size": 9}],
        "DeleteMarkers": [{"Key": "site/k", "VersionId": "d3", "LastModified": t[2]}]})
    s.add_response("head_object", {"ContentLength": 1, "ObjectLockRetainUntilDate": t[2]},
                   {"Bucket": "bkt", "Key": "site/k", "VersionId": "v1"})
    s.add_response("head_object", {"ContentLength": 2},
                   {"Bucket": "bkt", "Key": "site/k", "VersionId": "v2"})
    got = rig.backend.versions("k")
    assert [(v.version, v.deleted) for v in got] == [("v1", False), ("v2", False), ("d3", True)]
    assert got[0].retain_until == t[2].timestamp() and got[1].retain_until is None


def test_versions_without_retention_send_no_request_per_version(rig: Rig) -> None:
    s = rig.stub()
    s.add_response("list_object_versions", {"IsTruncated": False, "Versions": [
        {"Key": "site/k", "VersionId": "v2", "LastModified": T0, "Size": 1},
        {"Key": "site/k", "VersionId": "v1", "LastModified": T0, "Size": 1}]})
    # the stub fails on any request not queued: no head_object per version
    got = rig.backend.versions("k", retention=False)
    assert [v.version for v in got] == ["v1", "v2"]  # oldest first (S3 lists newest first)
    s.assert_no_pending_responses()


def test_stale_uploads_are_those_started_before(rig: Rig) -> None:
    rig.stub().add_response("list_multipart_uploads", {"IsTruncated": False, "Uploads": [
        {"Key": "site/a", "UploadId": "u1", "Initiated": T0},
        {"Key": "site/b", "UploadId": "u2", "Initiated": T0 + dt.timedelta(hours=2)},
        {"Key": "site/../c", "UploadId": "u3", "Initiated": T0}]},
        {"Bucket": "bkt", "Prefix": "site/"})
    got = list(rig.backend.stale_uploads(T0.timestamp() + 3600))
    assert [(u.key, u.upload_id) for u in got] == [("a", "u1")]
    rig.stub().add_client_error("abort_multipart_upload", "NoSuchUpload", "", 404)
    rig.backend.abort_upload(got[0])  # gone already: not an error


# -- the multipart writer -------------------------------------------------------------------

def _multipart(s: Stubber, key: str = "site/a.tar.zst", uid: str = "up-1") -> None:
    s.add_response("create_multipart_upload", {"UploadId": uid, "Key": key, "Bucket": "bkt"},
                   {"Bucket": "bkt", "Key": key})


def _part(s: Stubber, n: int, data: bytes, uid: str = "up-1") -> None:
    hx, b64 = md5(data)
    s.add_response("upload_part", {"ETag": f'"{hx}"'},
                   {"Bucket": "bkt", "Key": "site/a.tar.zst", "UploadId": uid, "PartNumber": n,
                    "Body": ANY, "ContentMD5": b64, "ContentLength": len(data)})


def _complete(s: Stubber, parts: list[bytes], uid: str = "up-1") -> None:
    digest = hashlib.md5(b"".join(hashlib.md5(p).digest() for p in parts)).hexdigest()
    s.add_client_error("head_object", "404", "", 404)
    s.add_response("complete_multipart_upload",
                   {"ETag": f'"{digest}-{len(parts)}"', "VersionId": "v1"},
                   {"Bucket": "bkt", "Key": "site/a.tar.zst", "UploadId": uid,
                    "MultipartUpload": {"Parts": [
                        {"PartNumber": i + 1, "ETag": f'"{md5(p)[0]}"'}
                        for i, p in enumerate(parts)]}})
    s.add_response("list_object_versions", {"IsTruncated": False, "Versions": [
        {"Key": "site/a.tar.zst", "VersionId": "v1", "LastModified": T0,
         "Size": sum(map(len, parts))}]})


def test_multipart_parts_carry_md5_and_complete_checks_the_etag(rig: Rig) -> None:
    s = rig.stub()
    _multipart(s)
    _part(s, 1, b"abcdefgh")
    _part(s, 2, b"ijklmnop")
    _part(s, 3, b"qr")
    _complete(s, [b"abcdefgh", b"ijklmnop", b"qr"])
    w = S3Writer(rig.backend, "a.tar.zst", 8)
    for piece in (b"abc", b"defghijklm", memoryview(b"nop"), bytearray(b"qr")):
        w.write(piece)
    info = w.commit()
    assert (info.size, info.version) == (18, "v1")
    w.abort()  # after commit: nothing to do


def test_an_object_smaller_than_a_part_is_one_put(rig: Rig) -> None:
    rig.backend.trust_if_none_match = True
    hx, b64 = md5(b"tiny")
    rig.stub().add_response("put_object", {"ETag": f'"{hx}"'},
                            {"Bucket": "bkt", "Key": "site/a.tar.zst", "Body": b"tiny",
                             "ContentMD5": b64, "ContentLength": 4, "IfNoneMatch": "*"})
    w = rig.backend.writer("a.tar.zst")
    assert w.part_size == rig.profile.part_size
    w.write(b"tiny")
    assert w.commit().size == 4


def test_a_part_failing_with_5xx_is_sent_again(rig: Rig) -> None:
    s = rig.stub()
    _multipart(s)
    s.add_client_error("upload_part", "ServiceUnavailable", "", 503)
    s.add_client_error("upload_part", "InternalError", "", 500)
    _part(s, 1, b"12345678")
    _part(s, 2, b"9")
    _complete(s, [b"12345678", b"9"])
    w = S3Writer(rig.backend, "a.tar.zst", 8)
    w.write(b"123456789")
    w.commit()
    assert rig.clock.slept == [0.5, 1.0]


def test_a_part_goes_to_the_next_endpoint_when_one_dies(rig: Rig) -> None:
    s1, s2 = rig.stub(EP1), rig.stub(EP2)
    _multipart(s1)

    def die(**_: Any) -> None:
        # EP1 dies once the upload is created: the parts and the rest go to EP2
        rig.unreachable(EP1)

    rig.backend.client(0).meta.events.register("after-call.s3.CreateMultipartUpload", die)
    _part(s2, 1, b"12345678")
    _part(s2, 2, b"9")
    _complete(s2, [b"12345678", b"9"])
    w = S3Writer(rig.backend, "a.tar.zst", 8)
    w.write(b"123456789")
    w.commit()
    assert rig.clock.slept == []  # a dead endpoint is not waited for when another answers


@pytest.mark.hostile("store", "S3 part upload failing (5xx) past its retry deadline",
                     "ObjectStoreError (exit 16) and the multipart upload aborted")
def test_retries_exhausted_fail_and_abort_the_upload(rig: Rig) -> None:
    s = rig.stub()
    _multipart(s)
    for _ in range(5):  # 0.5 + 1 + 2 + 4 = 7.5 s of backoff, the next 8 s would pass 10 s
        s.add_client_error("upload_part", "SlowDown", "Please reduce your request rate", 503)
    s.add_response("abort_multipart_upload", {},
                   {"Bucket": "bkt", "Key": "site/a.tar.zst", "UploadId": "up-1"})
    w = S3Writer(rig.backend, "a.tar.zst", 8)
    w.write(b"12345678")  # part 1 in flight
    with pytest.raises(ObjectStoreError, match=r"SlowDown.*part 1 tried 5 times") as e:
        w.commit()
    assert e.value.exit_code == 16 and rig.clock.slept == [0.5, 1.0, 2.0, 4.0]
    w.abort()  # twice: nothing more is sent
    with pytest.raises(ValueError):
        w.write(b"x")


def test_a_failed_part_surfaces_at_the_next_write_and_abort_removes_the_upload(rig: Rig) -> None:
    s = rig.stub()
    _multipart(s)
    s.add_client_error("upload_part", "AccessDenied", "", 403)
    s.add_response("abort_multipart_upload", {})
    w = S3Writer(rig.backend, "a.tar.zst", 4)
    w.write(b"1234")
    with pytest.raises(AuthError):
        w.write(b"5678")  # waits for part 1 before shipping part 2
    w.abort()
    assert w.upload_id is None


def test_an_abort_the_store_refuses_too_never_replaces_the_failure(
        rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    s = rig.stub()
    _multipart(s)
    s.add_client_error("upload_part", "AccessDenied", "", 403)
    s.add_client_error("abort_multipart_upload", "AccessDenied", "", 403)
    w = S3Writer(rig.backend, "a.tar.zst", 4)
    w.write(b"1234")
    with pytest.raises(AuthError, match="upload_part"):
        try:
            w.write(b"5678")
        finally:
            w.abort()  # as a writer's cleanup does: must not raise over the part's error
    assert w.upload_id is None
    assert "upload not aborted" in caplog.text and "gc removes it later" in caplog.text


@pytest.mark.hostile("store", "S3 multipart commit over a key that exists", "ResourceError "
                     "(exit 7); the upload aborted, nothing replaced")
def test_commit_over_an_existing_key_is_refused_and_aborted(rig: Rig) -> None:
    s = rig.stub()
    _multipart(s)
    _part(s, 1, b"1234")
    _part(s, 2, b"5")
    s.add_response("head_object", {"ContentLength": 3, "ETag": '"x"', "LastModified": T0})
    s.add_response("abort_multipart_upload", {})
    w = S3Writer(rig.backend, "a.tar.zst", 4)
    w.write(b"12345")
    with pytest.raises(ResourceError, match="an object exists"):
        w.commit()


def test_size_hint_grows_the_part_to_fit_the_part_limit(rig: Rig) -> None:
    assert rig.backend.writer("k").part_size == 16 << 20
    assert rig.backend.writer("k", size_hint=1 << 40).part_size == 117 << 20
    assert rig.backend.writer("k", size_hint=1 << 50).part_size == s3config.MAX_PART
    with pytest.raises(UsageError):
        rig.backend.writer("../k")
    assert backend_s3.MAX_PARTS == 10_000


# -- the profile file -----------------------------------------------------------------------

GOOD = f"""
default = "px1"
[profiles.px1]
endpoints = ["{EP1}", "{EP2}/"]
bucket = "backups"
prefix = "site-a"
access_key = "PX1KEY"
secret_key = "{SECRET}"
role = "proxy"
part_size = "8MiB"
connect_timeout = 5
read_timeout = 60.5
max_attempts = 3
conditional_put = "trust"

[profiles.maint]
endpoints = ["{EP1}"]
bucket = "backups"
access_key = "MAINTKEY"
secret_key_file = "SECRETFILE"
role = "maint"
"""


def _write(tmp_path: Path, text: str, mode: int = 0o600, name: str = "s3.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    os.chmod(p, mode)
    return p


def _good(tmp_path: Path, mode: int = 0o600, secret_mode: int = 0o600) -> Path:
    sf = _write(tmp_path, "maint-secret-value\n", secret_mode, "maint.secret")
    return _write(tmp_path, GOOD.replace("SECRETFILE", str(sf)), mode)


def test_a_good_profile_file(tmp_path: Path) -> None:
    path = _good(tmp_path)
    p = s3config.for_url("s3://backups/site-a/px1", str(path))
    assert p.name == "px1" and p.endpoints == (EP1, EP2) and p.prefix == "site-a/px1"
    assert (p.part_size, p.connect_timeout, p.read_timeout, p.max_attempts) == (
        8 << 20, 5.0, 60.5, 3)
    assert p.conditional_put is ConditionalPut.TRUST and p.role is Role.PROXY
    assert p.secret_key == SECRET and p.region == "us-east-1" and p.ca_file is None
    m = s3config.for_url("s3://backups?profile=maint", str(path))
    assert m.secret_key == "maint-secret-value" and m.role is Role.MAINT and m.prefix == ""
    assert m.part_size == s3config.DEFAULT_PART
    assert m.conditional_put is ConditionalPut.VERIFY
    _no_secret(repr(p) + repr(m) + str(s3config.read(str(path))))
    assert "maint-secret-value" not in repr(m)


@pytest.mark.hostile("store", "s3.toml holding a secret_key readable by group or others "
                     "(or a secret_key_file that is)", "ConfigError (exit 2) naming the file")
@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644], ids=oct)
def test_a_readable_file_with_a_secret_is_refused(tmp_path: Path, mode: int) -> None:
    path = _good(tmp_path, mode=mode)
    with pytest.raises(ConfigError, match=f"{path}: holds a secret_key and is readable by "
                                          f"group or others \\(mode {mode:04o}\\)") as e:
        s3config.read(str(path))
    assert e.value.exit_code == 2 and e.value.hint == f"chmod 600 {path}"
    _no_secret(str(e.value))
    # without a secret in it, the file may be readable; the secret file may not
    text = path.read_text().replace(f'secret_key = "{SECRET}"',
                                    f'secret_key_file = "{tmp_path / "maint.secret"}"')
    path.write_text(text)
    assert s3config.read(str(path)).profiles["px1"].profile.secret_key == ""
    os.chmod(tmp_path / "maint.secret", mode)
    with pytest.raises(ConfigError, match="maint.secret: holds a secret and is readable"):
        s3config.for_url("s3://backups/site-a", str(path))


@pytest.mark.hostile("store", "s3.toml (or its secret_key_file) group-writable, a symlink, a "
                     "FIFO, huge, or owned by another user", "ConfigError (exit 2) naming it, "
                     "no hang")
@pytest.mark.parametrize("kind", ["writable", "symlink", "fifo", "huge", "other-owner",
                                  "secret-symlink", "missing"])
def test_untrustworthy_profile_files_are_refused(tmp_path: Path, kind: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    path = _good(tmp_path)
    target = path
    if kind == "writable":
        os.chmod(path, 0o620)
    elif kind == "symlink":
        target = tmp_path / "link.toml"
        target.symlink_to(path)
    elif kind == "fifo":
        target = tmp_path / "fifo.toml"
        os.mkfifo(target, 0o600)
    elif kind == "huge":
        path.write_text("#" * (2 << 20))
    elif kind == "other-owner":
        if os.geteuid() == 0:
            os.chown(path, 65534, -1)
        else:  # no chown without root: the same check, with this user not trusted
            monkeypatch.setattr("sanoffload.configfile.trusted_owners",
                                lambda: frozenset({0, os.geteuid() + 4242}))
    elif kind == "secret-symlink":
        sf = tmp_path / "maint.secret"
        sf.rename(tmp_path / "real.secret")
        sf.symlink_to(tmp_path / "real.secret")
        with pytest.raises(ConfigError, match="symbolic link"):
            s3config.for_url("s3://backups?profile=maint", str(path))
        return
    elif kind == "missing":
        target = tmp_path / "none.toml"
    with pytest.raises(ConfigError, match=str(target)) as e:
        s3config.read(str(target))
    _no_secret(str(e.value))


@pytest.mark.hostile("store", "s3.toml with unknown keys, wrong types, out-of-range values, "
                     "plain http or user:password@ endpoints, bad bucket names",
                     "ConfigError (exit 2) naming the key; the secret never shown")
@pytest.mark.parametrize(("old", "new", "words"), [
    ('role = "proxy"', 'role = "proxy"\nendpoint = "x"', "profiles.px1.endpoint: unknown key"),
    ('default = "px1"', 'default = "px1"\n[other]', "other: unknown key"),
    ('default = "px1"', 'default = "nobody"', "default: must name a profile"),
    ('role = "proxy"', 'role = "admin"', 'profiles.px1.role: required: "proxy" or "maint"'),
    ('part_size = "8MiB"', 'part_size = "4MiB"', "profiles.px1.part_size: must be a size from 5"),
    ('part_size = "8MiB"', 'part_size = 1073741824', "part_size: must be a size"),
    ('part_size = "8MiB"', 'part_size = true', "part_size: must be a size"),
    ('part_size = "8MiB"', 'part_size = "8 potatoes"', "part_size: must be a size"),
    ("max_attempts = 3", "max_attempts = 0", "max_attempts: must be an integer from 1 to 10"),
    ("max_attempts = 3", "max_attempts = 2.5", "max_attempts: must be an integer"),
    ("connect_timeout = 5", 'connect_timeout = "5"', "connect_timeout: must be a number"),
    ("read_timeout = 60.5", "read_timeout = nan", "read_timeout: must be a number"),
    ("read_timeout = 60.5", "read_timeout = -1", "read_timeout: must be a number"),
    (f'endpoints = ["{EP1}", "{EP2}/"]', 'endpoints = ["http://rgw:7480"]', "https only"),
    (f'endpoints = ["{EP1}", "{EP2}/"]', 'endpoints = ["https://u:p@rgw:7480"]',
     "no user or password"),
    (f'endpoints = ["{EP1}", "{EP2}/"]', 'endpoints = ["https://rgw:7480/bkt"]', "no path"),
    (f'endpoints = ["{EP1}", "{EP2}/"]', 'endpoints = ["https://rgw:99999"]', "invalid endpoint"),
    (f'endpoints = ["{EP1}", "{EP2}/"]', 'endpoints = []', "a list of 1 to 8 https URLs"),
    (f'endpoints = ["{EP1}", "{EP2}/"]', f'endpoints = ["{EP1}", "{EP1}/"]', "listed twice"),
    (f'endpoints = ["{EP1}", "{EP2}/"]', 'endpoints = "https://rgw"', "a list of 1 to 8"),
    ('bucket = "backups"', 'bucket = "Backups"', "profiles.px1.bucket: invalid bucket name"),
    ('bucket = "backups"', 'bucket = "192.168.1.1"', "invalid bucket name"),
    ('bucket = "backups"', 'bucket = "a..b"', "invalid bucket name"),
    ('prefix = "site-a"', 'prefix = "../up"', "profiles.px1.prefix: invalid object key"),
    ('prefix = "site-a"', 'prefix = "a/"', "profiles.px1.prefix: invalid object key"),
    ('access_key = "PX1KEY"', 'access_key = "PX1 KEY"', "access_key: 1-128 of"),
    (f'secret_key = "{SECRET}"', f'secret_key = "{SECRET} x"', "secret_key: must be a string"),
    (f'secret_key = "{SECRET}"', "secret_key = 12345", "secret_key: must be a string"),
    (f'secret_key = "{SECRET}"', "", "exactly one of secret_key and secret_key_file"),
    ('secret_key_file = "SECRETFILE"', 'secret_key_file = "rel/secret"',
     "secret_key_file: an absolute path"),
    ('role = "maint"', 'role = "maint"\nca_file = "ca.pem"', "ca_file: an absolute path"),
    ('conditional_put = "trust"', 'conditional_put = "yes"', 'conditional_put: "verify" or'),
    ("[profiles.maint]", '[profiles."bad name"]', "profile names are"),
    ("x", "= broken", "not valid TOML"),
])
def test_hostile_profile_files(tmp_path: Path, old: str, new: str, words: str) -> None:
    text = GOOD if old == "x" else GOOD.replace(old, new)
    if old == "x":
        text = new
    assert text != GOOD
    path = _write(tmp_path, text.replace("SECRETFILE", "/nonexistent/secret"))
    with pytest.raises(ConfigError) as e:
        s3config.read(str(path))
    assert str(path) in str(e.value) and words in str(e.value), str(e.value)
    assert e.value.exit_code == 2
    _no_secret(str(e.value))


def test_profile_selection_and_the_url_binding(tmp_path: Path) -> None:
    path = _good(tmp_path)
    with pytest.raises(ConfigError, match="is for bucket 'backups', not 'other'"):
        s3config.for_url("s3://other/site-a", str(path))
    with pytest.raises(ConfigError, match="may use s3://backups/site-a, not s3://backups/site-b"):
        s3config.for_url("s3://backups/site-b", str(path))
    with pytest.raises(ConfigError, match="may use s3://backups/site-a, not "
                                          "s3://backups/site-ab"):
        s3config.for_url("s3://backups/site-ab", str(path))
    with pytest.raises(ConfigError, match="no profile 'ghost'"):
        s3config.for_url("s3://backups?profile=ghost", str(path))
    assert s3config.for_url("s3://backups/", str(path)).prefix == "site-a"
    text = path.read_text()
    nodefault = _write(tmp_path, text.replace('default = "px1"', ""), name="n.toml")
    with pytest.raises(ConfigError, match="several profiles and no default"):
        s3config.for_url("s3://backups", str(nodefault))
    ca = _write(tmp_path, text.replace('role = "maint"', 'role = "maint"\nca_file = '
                                       '"/nonexistent/ca.pem"'), name="ca.toml")
    with pytest.raises(ConfigError, match="ca_file: /nonexistent/ca.pem: no such file"):
        s3config.for_url("s3://backups?profile=maint", str(ca))


@pytest.mark.hostile("store", "--store s3:// URLs with bad bucket names, '..', ports, users, "
                     "unknown parameters or control characters", "UsageError (exit 2), escaped")
@pytest.mark.parametrize("url", [
    "s3://", "s3://B", "s3://bkt/../x", "s3://bkt/a//b", "s3://bkt:443/x", "s3://u:p@bkt/x",
    "s3://bkt/x?profile=a&profile=b", "s3://bkt/x?region=eu", "s3://bkt/x?profile=../a",
    "s3://bkt/x#frag", "s3://bkt/a\nb", "s3://bkt/\x1b[2J", "s3://bkt/x.partial",
    "/srv/backups", "s3://bkt/x?profile",
])
def test_hostile_store_urls(url: str) -> None:
    with pytest.raises(UsageError) as e:
        s3config.parse_url(url)
    assert "\x1b" not in str(e.value) and "\n" not in str(e.value)


def test_store_urls() -> None:
    u = s3config.parse_url("s3://my-bkt.1/a/b/?profile=px1")
    assert (u.bucket, u.prefix, u.profile) == ("my-bkt.1", "a/b", "px1")
    assert str(u) == "s3://my-bkt.1/a/b?profile=px1"
    assert s3config.parse_url("s3://bkt") == s3config.StoreURL("bkt", "", None)
    assert s3config.is_s3_url("s3://bkt") and not s3config.is_s3_url("bk1:/srv/backups")


def test_file_mode_is_taken_from_the_opened_file(tmp_path: Path) -> None:
    path = _good(tmp_path)
    cfg = s3config.read(str(path))
    assert stat.S_IMODE(cfg.mode) == 0o600


def test_extend_retention_keeps_the_mode_never_shortens_and_asks_the_bucket_once(
        rig: Rig) -> None:
    s = rig.stub()
    later = T0 + dt.timedelta(days=30)
    until = later.timestamp()
    # held already past the date: nothing sent
    s.add_response("head_object", {"ObjectLockMode": "COMPLIANCE",
                                   "ObjectLockRetainUntilDate": later + dt.timedelta(days=1),
                                   "VersionId": "v1"},
                   {"Bucket": "bkt", "Key": "site/a", "VersionId": "v1"})
    assert rig.backend.extend_retention("a", version="v1", until=until) == \
        (later + dt.timedelta(days=1)).timestamp()
    # held in GOVERNANCE until earlier: extended in that mode
    s.add_response("head_object", {"ObjectLockMode": "GOVERNANCE",
                                   "ObjectLockRetainUntilDate": T0, "VersionId": "v2"},
                   {"Bucket": "bkt", "Key": "site/b", "VersionId": "v2"})
    s.add_response("put_object_retention", {}, {
        "Bucket": "bkt", "Key": "site/b", "VersionId": "v2",
        "Retention": {"Mode": "GOVERNANCE", "RetainUntilDate": later}})
    assert rig.backend.extend_retention("b", version="v2", until=until) == until
    # not held: the bucket's default mode, asked for once
    for key in ("c", "d"):
        s.add_response("head_object", {"VersionId": "v3"},
                       {"Bucket": "bkt", "Key": f"site/{key}", "VersionId": "v3"})
        if key == "c":
            s.add_response("get_object_lock_configuration", {"ObjectLockConfiguration": {
                "ObjectLockEnabled": "Enabled",
                "Rule": {"DefaultRetention": {"Mode": "COMPLIANCE", "Days": 1}}}})
        s.add_response("put_object_retention", {}, {
            "Bucket": "bkt", "Key": f"site/{key}", "VersionId": "v3",
            "Retention": {"Mode": "COMPLIANCE", "RetainUntilDate": later}})
        assert rig.backend.extend_retention(key, version="v3", until=until) == until


def test_extend_retention_in_a_bucket_without_object_lock_says_so(rig: Rig) -> None:
    s = rig.stub()
    s.add_response("head_object", {"VersionId": "v1"})
    s.add_client_error("get_object_lock_configuration", "ObjectLockConfigurationNotFoundError",
                       "no lock", 404)
    assert rig.backend.extend_retention("a", version=None, until=T0.timestamp()) is None


@pytest.mark.hostile("store", "an S3 HEAD answering an Object Lock mode that is not S3's "
                     "(lock-extend)", "ObjectStoreError naming it; no retention request sent")
def test_extend_retention_refuses_a_lock_mode_s3_does_not_have(rig: Rig) -> None:
    s = rig.stub()
    s.add_response("head_object", {"ObjectLockMode": "FOREVER\x1b[2J",
                                   "ObjectLockRetainUntilDate": T0, "VersionId": "v1"})
    later = (T0 + dt.timedelta(days=1)).timestamp()
    with pytest.raises(ObjectStoreError, match="neither of") as caught:
        rig.backend.extend_retention("a", version="v1", until=later)
    assert "\x1b" not in str(caught.value)
