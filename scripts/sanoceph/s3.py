"""boto3 clients and buckets on the test cluster, set up the way issue 14 wants.

Test-harness code: the product's own S3 client is ``sanoffload/store``'s.
The client settings are the ones RGW 16.2 needs with boto3 >= 1.36: path-style
addressing, and checksums only "when required" for requests and responses
(the defaults send aws-chunked bodies with trailer checksums over HTTPS, which
RGW refuses with 411 ``MissingContentLength``); TLS verified against the
cluster's CA.
"""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

from .cluster import MAINT, PROXY, Cluster

#: (mode, days) of a bucket's default Object Lock retention: ("GOVERNANCE", 1)
Retention = tuple[str, int]


def client(cluster: Cluster, user: str = MAINT, *, endpoint: int = 0,
           rgw_settings: bool = True, **config: Any) -> Any:
    """A boto3 S3 client for ``user`` on gateway ``endpoint``.

    ``rgw_settings=False`` gives boto3's own defaults (path style kept), to
    show what they break; ``config`` overrides single botocore Config keys.
    """
    import boto3  # type: ignore[import-untyped]
    from botocore.config import Config  # type: ignore[import-untyped]

    settings: dict[str, Any] = {
        "region_name": "us-east-1", "signature_version": "s3v4",
        "s3": {"addressing_style": "path"},
        "retries": {"mode": "standard", "max_attempts": 3},
        "connect_timeout": 10, "read_timeout": 60,
    }
    if rgw_settings:
        settings["request_checksum_calculation"] = "when_required"
        settings["response_checksum_validation"] = "when_required"
    settings.update(config)
    u = cluster.users[user]
    session = boto3.session.Session(aws_access_key_id=u.access_key,
                                    aws_secret_access_key=u.secret_key)
    return session.client("s3", endpoint_url=cluster.endpoints[endpoint],
                          verify=str(cluster.ca), config=Config(**settings))


def content_md5(body: bytes) -> str:
    """The Content-MD5 header value (boto3 >= 1.36 no longer computes it)."""
    return base64.b64encode(hashlib.md5(body, usedforsecurity=False).digest()).decode()


def proxy_policy(bucket: str, user: str = PROXY, *, reader: str | None = MAINT) -> str:
    """The bucket policy of the research doc (3.2): ``user`` may put and get, never delete.

    Overwrites are possible with ``s3:PutObject``; on a versioned bucket they
    only add a version, so the old bytes stay. ``reader`` (the bucket owner)
    is also allowed to read: RGW makes the *uploader* own each object, and
    without this statement the owner gets 403 on the proxy's objects (spike).
    """
    principal = {"AWS": [f"arn:aws:iam:::user/{user}"]}
    resources = [f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"]
    statements: list[dict[str, Any]] = [
        {"Effect": "Allow", "Principal": principal, "Resource": resources,
         "Action": ["s3:PutObject", "s3:GetObject", "s3:GetObjectVersion", "s3:ListBucket",
                    "s3:ListBucketVersions", "s3:ListBucketMultipartUploads",
                    "s3:ListMultipartUploadParts", "s3:AbortMultipartUpload"]},
        {"Effect": "Deny", "Principal": principal, "Resource": resources,
         "Action": ["s3:DeleteObject", "s3:DeleteObjectVersion", "s3:PutObjectRetention",
                    "s3:BypassGovernanceRetention", "s3:PutObjectLegalHold",
                    "s3:PutBucketPolicy", "s3:DeleteBucketPolicy",
                    "s3:PutLifecycleConfiguration", "s3:PutBucketVersioning",
                    "s3:PutBucketObjectLockConfiguration", "s3:DeleteBucket"]},
    ]
    if reader:
        statements.append(
            {"Effect": "Allow", "Principal": {"AWS": [f"arn:aws:iam:::user/{reader}"]},
             "Resource": [f"arn:aws:s3:::{bucket}/*"],
             "Action": ["s3:GetObject", "s3:GetObjectVersion", "s3:GetObjectRetention"]})
    return json.dumps({"Version": "2012-10-17", "Statement": statements})


def make_bucket(cluster: Cluster, name: str, *, object_lock: bool = False,
                default_retention: Retention | None = None, versioned: bool = False,
                policy_for: str | None = PROXY, reader: str | None = MAINT) -> Any:
    """Create ``name`` as ``maint`` and return maint's client.

    ``object_lock`` can only be chosen at creation and turns versioning on for
    good; ``default_retention`` (needs ``object_lock``) is applied by RGW to
    every new object, so writers need no retention permission. ``policy_for``:
    the user the :func:`proxy_policy` is applied for (None: no policy), with
    ``reader`` allowed to read its objects.
    """
    if default_retention and not object_lock:
        raise ValueError("default retention needs an Object Lock bucket")
    s3 = client(cluster, MAINT)
    s3.create_bucket(Bucket=name, ObjectLockEnabledForBucket=object_lock)
    if versioned and not object_lock:
        s3.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
    if default_retention:
        mode, days = default_retention
        body = {"ObjectLockEnabled": "Enabled",
                "Rule": {"DefaultRetention": {"Mode": mode, "Days": days}}}
        s3.put_object_lock_configuration(Bucket=name, ObjectLockConfiguration=body)
    if policy_for:
        s3.put_bucket_policy(Bucket=name, Policy=proxy_policy(name, policy_for, reader=reader))
    return s3
