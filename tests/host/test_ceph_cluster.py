"""The test Ceph cluster itself, and the RGW 16.2 answers issue 14's S3 repository relies on.

Each assertion pins one answer recorded in docs/design/issue14-spike.md: a
Ceph that answers differently fails here first, before a product test fails
for a reason that is hard to see.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from sanoceph import Cluster
from sanoceph.s3 import client, content_md5, make_bucket

from .ceph_fixture import ceph, ceph_fault

__all__ = ["ceph", "ceph_fault"]  # the fixtures, imported for pytest

REPO = Path(__file__).resolve().parents[2]
DAY = datetime.timedelta(days=1)


def _code(exc: pytest.ExceptionInfo[Any]) -> tuple[str, int]:
    """(S3 error code, HTTP status) of a botocore ClientError."""
    resp = exc.value.response
    return resp["Error"]["Code"], resp["ResponseMetadata"]["HTTPStatusCode"]


def _client_error() -> type[Exception]:
    from botocore.exceptions import ClientError  # type: ignore[import-untyped]

    return ClientError  # type: ignore[no-any-return]


def _bucket(prefix: str) -> str:
    return f"{prefix}-{os.getpid()}-{time.monotonic_ns() % 10**9}"


# --------------------------------------------------------------------------
# the cluster
# --------------------------------------------------------------------------

def test_cluster_up_without_mgr(ceph: Cluster) -> None:
    """mon + OSD + RGW run by our PIDs, no ceph-mgr, and every pool RGW made is usable."""
    version = ceph.runner.run(["radosgw", "--version"]).stdout.strip()
    print(f"\n{version}\nup: {ceph.timings}\nrss MiB: "
          f"{ {n: v >> 20 for n, v in ceph.rss().items()} }")
    assert "16.2." in version, f"expected Debian bookworm's Ceph 16.2 (Pacific): {version}"
    assert set(ceph.pids()) == {"mon.a", "osd.0", "client.rgw.0"}
    assert ceph.endpoint.startswith("https://127.0.0.1:")
    assert oct(ceph.dir.stat().st_mode & 0o777) == "0o700"
    status = ceph.ceph_json("status")
    assert status["mgrmap"]["available"] is False  # no mgr, and yet:
    s3 = client(ceph)
    bucket = _bucket("up")
    s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key="k", Body=b"x" * 100_000)
    assert s3.get_object(Bucket=bucket, Key="k")["Body"].read() == b"x" * 100_000
    # RGW made its pools through the mon alone (the data pool at the first bucket)
    pools = ceph.ceph_json("osd", "pool", "ls", "detail")
    assert "default.rgw.buckets.data" in {p["pool_name"] for p in pools}
    assert all(p["size"] == 1 for p in pools)


def test_state_file_and_status_cli(ceph: Cluster) -> None:
    """``scripts/ceph status`` (another process) finds the same PIDs through the state file."""
    assert Cluster.load(ceph.dir).pids() == ceph.pids()
    assert oct((ceph.dir / "cluster.json").stat().st_mode & 0o777) == "0o600"
    info = ceph.runner.run([REPO / "scripts" / "ceph", "--dir", ceph.dir, "status"]).json()
    assert info["pids"] == ceph.pids()
    assert info["endpoint"] == ceph.endpoint and info["ca"] == str(ceph.ca)
    assert set(info["users"]) == {"maint", "proxy"}


def test_proxy_user_may_own_no_bucket(ceph: Cluster) -> None:
    info = ceph.radosgw_admin("user", "info", "--uid=proxy").json()
    assert info["max_buckets"] == -1
    with pytest.raises(_client_error()) as exc:
        client(ceph, "proxy").create_bucket(Bucket=_bucket("px-own"))
    assert _code(exc) == ("AccessDenied", 403)


def test_gateway_kill_and_restart(ceph: Cluster) -> None:
    """kill_gateway() stops it for clients at once; start_gateway() brings the same port back."""
    from botocore.exceptions import EndpointConnectionError

    s3 = client(ceph, retries={"mode": "standard", "max_attempts": 1}, connect_timeout=3)
    old = ceph.pids()["client.rgw.0"]
    # SIGTERM: a SIGKILLed gateway's watch would stall the next create_bucket here for up to
    # `osd client watch timeout` (the fault test below does SIGKILL)
    ceph.kill_gateway(0, signal.SIGTERM)
    assert "client.rgw.0" not in ceph.pids()
    with pytest.raises(EndpointConnectionError):
        s3.list_buckets()
    ceph.start_gateway(0)
    assert ceph.pids()["client.rgw.0"] != old
    s3.list_buckets()


# --------------------------------------------------------------------------
# boto3 >= 1.36 settings RGW 16.2 needs (research doc 2, spike 6.3)
# --------------------------------------------------------------------------

@pytest.mark.hostile("store", "boto3 >= 1.36 default checksums over HTTPS",
                     "RGW refuses with 411 MissingContentLength; when_required works")
def test_default_checksums_fail_when_required_works(ceph: Cluster) -> None:
    bucket = _bucket("cksum")
    maint = client(ceph)
    maint.create_bucket(Bucket=bucket)
    default = client(ceph, rgw_settings=False)
    with pytest.raises(_client_error()) as exc:
        default.put_object(Bucket=bucket, Key="k", Body=b"hello")
    assert _code(exc) == ("MissingContentLength", 411)
    upload = default.create_multipart_upload(Bucket=bucket, Key="mp")["UploadId"]
    with pytest.raises(_client_error()) as exc:
        default.upload_part(Bucket=bucket, Key="mp", UploadId=upload, PartNumber=1, Body=b"x")
    assert _code(exc) == ("MissingContentLength", 411)
    got = maint.put_object(Bucket=bucket, Key="k", Body=b"hello", ContentMD5=content_md5(b"hello"))
    assert got["ETag"] == f'"{hashlib.md5(b"hello").hexdigest()}"'
    # responses: the default validation reads an RGW object fine
    assert default.get_object(Bucket=bucket, Key="k")["Body"].read() == b"hello"


@pytest.mark.hostile("store", "a body that does not match its Content-MD5",
                     "RGW refuses with 400 BadDigest, nothing stored")
def test_content_md5_mismatch_is_refused(ceph: Cluster) -> None:
    bucket = _bucket("md5")
    s3 = client(ceph)
    s3.create_bucket(Bucket=bucket)
    with pytest.raises(_client_error()) as exc:
        s3.put_object(Bucket=bucket, Key="k", Body=b"hello", ContentMD5=content_md5(b"hellx"))
    assert _code(exc) == ("BadDigest", 400)
    assert "Contents" not in s3.list_objects_v2(Bucket=bucket)


def test_checksum_required_calls_need_no_content_md5(ceph: Cluster) -> None:
    """DeleteObjects, PutBucketPolicy, PutObjectLockConfiguration: boto3's CRC32 header suffices."""
    bucket = _bucket("nomd5")
    s3 = make_bucket(ceph, bucket, object_lock=True, default_retention=("GOVERNANCE", 1))
    sent: list[dict[str, str]] = []
    s3.meta.events.register("before-send", lambda request, **_: sent.append(
        {k.lower(): v for k, v in request.headers.items()}))
    s3.put_object(Bucket=bucket, Key="a", Body=b"a")
    got = s3.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": "a"}]})
    assert got["Deleted"][0]["DeleteMarker"] is True
    s3.put_object_lock_configuration(Bucket=bucket, ObjectLockConfiguration={
        "ObjectLockEnabled": "Enabled",
        "Rule": {"DefaultRetention": {"Mode": "GOVERNANCE", "Days": 2}}})
    assert "content-md5" not in sent[-1] and "x-amz-checksum-crc32" in sent[-1]
    assert "content-md5" not in sent[-2]  # DeleteObjects went without it


# --------------------------------------------------------------------------
# conditional create (research doc 2, spike 6.1)
# --------------------------------------------------------------------------

def _complete(s3: Any, bucket: str, key: str, body: bytes, **extra: Any) -> dict[str, Any]:
    upload = s3.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
    etag = s3.upload_part(Bucket=bucket, Key=key, UploadId=upload, PartNumber=1, Body=body,
                          ContentMD5=content_md5(body))["ETag"]
    return s3.complete_multipart_upload(  # type: ignore[no-any-return]
        Bucket=bucket, Key=key, UploadId=upload,
        MultipartUpload={"Parts": [{"ETag": etag, "PartNumber": 1}]}, **extra)


@pytest.mark.hostile("store", "a second If-None-Match: * PUT of an existing manifest key",
                     "412 on an unversioned bucket; a second version on versioned/locked ones")
def test_if_none_match(ceph: Cluster) -> None:
    s3 = client(ceph)
    plain = _bucket("inm-plain")
    make_bucket(ceph, plain, policy_for=None)
    s3.put_object(Bucket=plain, Key="m", Body=b"one", IfNoneMatch="*")
    with pytest.raises(_client_error()) as exc:
        s3.put_object(Bucket=plain, Key="m", Body=b"two", IfNoneMatch="*")
    assert _code(exc) == ("PreconditionFailed", 412)
    assert s3.get_object(Bucket=plain, Key="m")["Body"].read() == b"one"
    # CompleteMultipartUpload ignores If-None-Match on 16.2: it replaces the object
    _complete(s3, plain, "m", b"three", IfNoneMatch="*")
    assert s3.get_object(Bucket=plain, Key="m")["Body"].read() == b"three"

    for bucket in (_bucket("inm-ver"), _bucket("inm-lock")):
        if "lock" in bucket:
            make_bucket(ceph, bucket, object_lock=True, default_retention=("GOVERNANCE", 1))
        else:
            make_bucket(ceph, bucket, versioned=True)
        first = s3.put_object(Bucket=bucket, Key="m", Body=b"one", IfNoneMatch="*")
        # versioned: the condition is NOT honoured, the PUT adds a version (the fallback of
        # the research doc: read manifests by their oldest version, flag a second one)
        second = s3.put_object(Bucket=bucket, Key="m", Body=b"two", IfNoneMatch="*")
        versions = s3.list_object_versions(Bucket=bucket, Prefix="m")["Versions"]
        assert [v["VersionId"] for v in versions] == [second["VersionId"], first["VersionId"]]
        got = s3.get_object(Bucket=bucket, Key="m", VersionId=versions[-1]["VersionId"])
        assert got["Body"].read() == b"one"


def test_complete_multipart_etag_empty_head_has_it(ceph: Cluster) -> None:
    """RGW 16.2 answers CompleteMultipartUpload with an empty <ETag>: check it with HEAD."""
    bucket = _bucket("mpetag")
    s3 = client(ceph)
    s3.create_bucket(Bucket=bucket)
    parts, md5s = [], b""
    upload = s3.create_multipart_upload(Bucket=bucket, Key="k")["UploadId"]
    for n, body in ((1, b"a" * (5 << 20)), (2, b"b" * 100)):
        md5s += hashlib.md5(body).digest()
        parts.append({"PartNumber": n, "ETag": s3.upload_part(
            Bucket=bucket, Key="k", UploadId=upload, PartNumber=n, Body=body,
            ContentMD5=content_md5(body))["ETag"]})
    done = s3.complete_multipart_upload(Bucket=bucket, Key="k", UploadId=upload,
                                        MultipartUpload={"Parts": parts})
    assert done["ETag"] == ""
    assert s3.head_object(Bucket=bucket, Key="k")["ETag"] == f'"{hashlib.md5(md5s).hexdigest()}-2"'


# --------------------------------------------------------------------------
# least privilege and Object Lock (research doc 3, spike 6.2)
# --------------------------------------------------------------------------

def test_default_retention_applies_to_put_and_multipart(ceph: Cluster) -> None:
    bucket = _bucket("ret")
    s3 = make_bucket(ceph, bucket, object_lock=True, default_retention=("GOVERNANCE", 1))
    proxy = client(ceph, "proxy")
    before = datetime.datetime.now(datetime.UTC)
    proxy.put_object(Bucket=bucket, Key="single", Body=b"s")
    _complete(proxy, bucket, "multi", b"m" * 1000)
    for key in ("single", "multi"):
        head = s3.head_object(Bucket=bucket, Key=key)
        assert head["ObjectLockMode"] == "GOVERNANCE"
        until = head["ObjectLockRetainUntilDate"]
        assert before + DAY - datetime.timedelta(minutes=5) < until < before + DAY + \
            datetime.timedelta(minutes=5), (key, until)


@pytest.mark.hostile("store", "a taken-over proxy's credentials deleting or rewriting backups",
                     "every delete and policy change refused; an overwrite only adds a version")
def test_proxy_cannot_delete(ceph: Cluster) -> None:
    bucket = _bucket("px")
    maint = make_bucket(ceph, bucket, object_lock=True, default_retention=("GOVERNANCE", 1))
    proxy = client(ceph, "proxy")
    v1 = proxy.put_object(Bucket=bucket, Key="k", Body=b"v1")["VersionId"]
    assert proxy.get_object(Bucket=bucket, Key="k")["Body"].read() == b"v1"
    denied: list[tuple[str, Any]] = [
        ("delete", lambda: proxy.delete_object(Bucket=bucket, Key="k")),
        ("delete version", lambda: proxy.delete_object(Bucket=bucket, Key="k", VersionId=v1)),
        ("delete version, bypass", lambda: proxy.delete_object(
            Bucket=bucket, Key="k", VersionId=v1, BypassGovernanceRetention=True)),
        ("delete_objects", lambda: proxy.delete_objects(
            Bucket=bucket, Delete={"Objects": [{"Key": "k", "VersionId": v1}]})),
        ("put_bucket_policy", lambda: proxy.put_bucket_policy(Bucket=bucket, Policy="{}")),
        ("delete_bucket_policy", lambda: proxy.delete_bucket_policy(Bucket=bucket)),
        ("lifecycle", lambda: proxy.put_bucket_lifecycle_configuration(
            Bucket=bucket, LifecycleConfiguration={"Rules": [
                {"ID": "x", "Status": "Enabled", "Filter": {"Prefix": ""},
                 "Expiration": {"Days": 1}}]})),
        ("versioning", lambda: proxy.put_bucket_versioning(
            Bucket=bucket, VersioningConfiguration={"Status": "Suspended"})),
        ("retention", lambda: proxy.put_object_retention(
            Bucket=bucket, Key="k", VersionId=v1, BypassGovernanceRetention=True,
            Retention={"Mode": "GOVERNANCE",
                       "RetainUntilDate": datetime.datetime.now(datetime.UTC)})),
        ("delete_bucket", lambda: proxy.delete_bucket(Bucket=bucket)),
    ]
    for what, call in denied:
        with pytest.raises(_client_error()) as exc:
            call()
        assert _code(exc) == ("AccessDenied", 403), what
    # overwriting is a PutObject: allowed, but only adds a version; v1's bytes stay
    proxy.put_object(Bucket=bucket, Key="k", Body=b"v2")
    versions = maint.list_object_versions(Bucket=bucket, Prefix="k")["Versions"]
    assert len(versions) == 2
    # the uploader owns an object: maint reads it only through the policy's reader statement
    assert maint.get_object(Bucket=bucket, Key="k", VersionId=v1)["Body"].read() == b"v1"
    assert {v["Owner"]["ID"] for v in versions} == {"proxy"}


def test_bucket_owner_cannot_read_uploader_objects_without_policy(ceph: Cluster) -> None:
    bucket = _bucket("own")
    maint = make_bucket(ceph, bucket, reader=None)
    client(ceph, "proxy").put_object(Bucket=bucket, Key="k", Body=b"p")
    with pytest.raises(_client_error()) as exc:
        maint.get_object(Bucket=bucket, Key="k")
    assert _code(exc) == ("AccessDenied", 403)
    maint.delete_object(Bucket=bucket, Key="k")  # deleting is a bucket right: allowed
    nopolicy = _bucket("nopol")
    maint.create_bucket(Bucket=nopolicy)
    with pytest.raises(_client_error()) as exc:
        client(ceph, "proxy").put_object(Bucket=nopolicy, Key="k", Body=b"p")
    assert _code(exc) == ("AccessDenied", 403)


@pytest.mark.parametrize("mode", ["GOVERNANCE", "COMPLIANCE"])
@pytest.mark.hostile("store", "the maintenance role deleting an Object-Locked version early",
                     "refused (compliance: even with bypass); a plain delete only adds a marker")
def test_lock_blocks_maint_deletes(ceph: Cluster, mode: str) -> None:
    bucket = _bucket(mode.lower())
    s3 = make_bucket(ceph, bucket, object_lock=True, default_retention=(mode, 1))
    v = s3.put_object(Bucket=bucket, Key="k", Body=b"data")["VersionId"]
    assert s3.delete_object(Bucket=bucket, Key="k")["DeleteMarker"] is True
    assert s3.get_object(Bucket=bucket, Key="k", VersionId=v)["Body"].read() == b"data"
    with pytest.raises(_client_error()) as exc:
        s3.delete_object(Bucket=bucket, Key="k", VersionId=v)
    assert _code(exc) == ("AccessDenied", 403)
    # DeleteObjects answers 200 with a per-key error: callers must read "Errors"
    got = s3.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": "k", "VersionId": v}]})
    assert [e["Code"] for e in got["Errors"]] == ["AccessDenied"] and not got.get("Deleted")
    shorter = datetime.datetime.now(datetime.UTC) + datetime.timedelta(minutes=1)
    with pytest.raises(_client_error()) as exc:
        s3.put_object_retention(Bucket=bucket, Key="k", VersionId=v,
                                Retention={"Mode": mode, "RetainUntilDate": shorter})
    assert _code(exc) == ("AccessDenied", 403)
    s3.put_object_retention(Bucket=bucket, Key="k", VersionId=v, Retention={
        "Mode": mode, "RetainUntilDate": datetime.datetime.now(datetime.UTC) + 2 * DAY})
    if mode == "GOVERNANCE":
        s3.delete_object(Bucket=bucket, Key="k", VersionId=v, BypassGovernanceRetention=True)
        with pytest.raises(_client_error()) as exc:
            s3.get_object(Bucket=bucket, Key="k", VersionId=v)
        assert _code(exc)[1] == 404
    else:
        with pytest.raises(_client_error()) as exc:
            s3.delete_object(Bucket=bucket, Key="k", VersionId=v, BypassGovernanceRetention=True)
        assert _code(exc) == ("AccessDenied", 403)
        assert s3.get_object(Bucket=bucket, Key="k", VersionId=v)["Body"].read() == b"data"


# --------------------------------------------------------------------------
# the fault tier
# --------------------------------------------------------------------------

def test_fault_tier_survives_an_osd_and_a_gateway(ceph_fault: Cluster) -> None:
    """3 BlueStore OSDs at size 2, 2 gateways: I/O goes on with one OSD and one gateway dead."""
    c = ceph_fault
    print(f"\nfault tier up: {c.timings}\nrss MiB: {({n: v >> 20 for n, v in c.rss().items()})}")
    assert set(c.pids()) == {"mon.a", "osd.0", "osd.1", "osd.2", "client.rgw.0", "client.rgw.1"}
    pools = c.ceph_json("osd", "pool", "ls", "detail")
    assert {(p["size"], p["min_size"]) for p in pools} == {(2, 1)}
    bucket = _bucket("fault")
    s3 = client(c, endpoint=0)
    s3.create_bucket(Bucket=bucket)
    body = os.urandom(1 << 20)
    s3.put_object(Bucket=bucket, Key="before", Body=body)
    c.kill_osd(1)
    took = c.wait_osd_down(1, timeout=30)
    print(f"osd.1 marked down {took:.1f}s after SIGKILL")
    s3.put_object(Bucket=bucket, Key="during", Body=body)
    assert s3.get_object(Bucket=bucket, Key="before")["Body"].read() == body
    c.kill_gateway(0)
    other = client(c, endpoint=1)
    assert other.get_object(Bucket=bucket, Key="during")["Body"].read() == body
    c.start_osd(1)
    c.start_gateway(0)
    assert s3.get_object(Bucket=bucket, Key="during")["Body"].read() == body
