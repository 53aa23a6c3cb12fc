"""The S3 backend against a real Ceph RGW (16.2, memstore, HTTPS with a test CA).

The cluster is the host tier's session fixture ``ceph`` (tests/host/ceph_fixture.py,
``scripts/sanoceph``: mon, one memstore OSD, one gateway, users ``maint`` and
``proxy``), stopped by PID at the end. If it cannot start, every test here fails
with the cluster's reason (no skip). Buckets are this module's own (``h3-*``).

Every request goes through the production client factory
(``backend_s3.make_client``): path style, checksums "when required", Content-MD5
of our own, TLS verified against the cluster's CA. The one injected fault (a
part answered 500 once) is a ``before-send`` hook on that real client; the
request after it reaches the gateway.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from botocore.awsrequest import AWSResponse  # type: ignore[import-untyped]

from sanoffload.errors import AuthError, ObjectStoreError, ResourceError
from sanoffload.store.backend import Backend, NotFound
from sanoffload.store.backend_s3 import S3Backend
from sanoffload.store.s3config import ConditionalPut, Role, S3Profile

from .ceph_fixture import ceph  # noqa: F401  (the session cluster fixture)

pytestmark = pytest.mark.host

MIB = 1 << 20
log = logging.getLogger(__name__)


@pytest.fixture(scope="module")
def cluster(ceph: Any) -> Any:  # noqa: F811 (the imported fixture, by name)
    """H1's session cluster (tests/host/ceph_fixture.py): it fails, never skips, if Ceph
    cannot start."""
    return ceph


def _bucket(cluster: Any, name: str, **kw: Any) -> str:
    from sanoceph.s3 import make_bucket

    make_bucket(cluster, name, **kw)
    return name


@pytest.fixture(scope="module")
def plain_bucket(cluster: Any) -> str:
    return _bucket(cluster, "h3-plain")


@pytest.fixture(scope="module")
def locked_bucket(cluster: Any) -> str:
    # Object Lock: versioning on for good, as the immutable repository has it
    return _bucket(cluster, "h3-locked", object_lock=True)


def _profile(cluster: Any, bucket: str, role: Role = Role.PROXY, **kw: Any) -> S3Profile:
    user = cluster.proxy if role is Role.PROXY else cluster.maint
    base: dict[str, Any] = {"name": role.value, "endpoints": tuple(cluster.endpoints),
                            "bucket": bucket, "access_key": user.access_key,
                            "secret_key": user.secret_key, "role": role, "prefix": "repo",
                            "ca_file": str(cluster.ca), "part_size": 8 * MIB}
    base.update(kw)
    return S3Profile(**base)


def _stream(total: int, piece: int = MIB) -> Iterator[bytes]:
    """``total`` bytes that differ per MiB (so a misplaced part would show)."""
    block = os.urandom(piece)
    for i in range(total // piece):
        yield i.to_bytes(8, "big") + block[8:]


def test_put_get_stat_list_and_write_once(cluster: Any, plain_bucket: str) -> None:
    b = S3Backend(_profile(cluster, plain_bucket))
    assert isinstance(b, Backend)
    info = b.put("backups/fs1/m.json", b'{"a": 1}\n')
    assert info.size == 9
    assert b.get("backups/fs1/m.json", max_bytes=9) == b'{"a": 1}\n'
    st = b.stat("backups/fs1/m.json")
    assert st is not None and st.size == 9 and abs(st.mtime - time.time()) < 300
    assert b.stat("backups/fs1/none") is None
    with pytest.raises(NotFound):
        b.get("backups/fs1/none", max_bytes=10)
    with pytest.raises(ResourceError, match="an object exists"):
        b.put("backups/fs1/m.json", b"other")
    # and with If-None-Match alone (RGW honours it on an unversioned bucket): 412
    b.trust_if_none_match = True
    with pytest.raises(ResourceError, match="an object exists"):
        b.put("backups/fs1/m.json", b"other")
    assert b.get("backups/fs1/m.json", max_bytes=100) == b'{"a": 1}\n'
    b.put("backups/fs1/n.json", b"n")
    assert [i.key for i in b.list("backups/")] == ["backups/fs1/m.json", "backups/fs1/n.json"]
    assert [i.size for i in b.list("backups/fs1/")] == [9, 1]


def test_a_40_mib_object_in_8_mib_parts(cluster: Any, locked_bucket: str) -> None:
    b = S3Backend(_profile(cluster, locked_bucket))
    w = b.writer("backups/fs1/a.tar.zst")
    assert w.part_size == 8 * MIB
    h = hashlib.sha256()
    for piece in _stream(40 * MIB):
        h.update(piece)
        w.write(piece)
    info = w.commit()
    assert info.size == 40 * MIB and info.version
    with b.open_read("backups/fs1/a.tar.zst") as r:
        got = hashlib.sha256()
        n = 0
        while chunk := r.read(3 * MIB):
            got.update(chunk)
            n += len(chunk)
    assert (n, got.hexdigest()) == (40 * MIB, h.hexdigest())
    versions = b.versions("backups/fs1/a.tar.zst")
    assert [v.version for v in versions] == [info.version]
    # a second commit under the same key is refused and leaves no upload behind
    w2 = b.writer("backups/fs1/a.tar.zst")
    for piece in _stream(9 * MIB):
        w2.write(piece)
    with pytest.raises(ResourceError, match="an object exists"):
        w2.commit()
    assert list(b.stale_uploads(time.time() + 60)) == []
    assert len(b.versions("backups/fs1/a.tar.zst")) == 1


def test_versioned_bucket_write_once_and_roles(cluster: Any, locked_bucket: str) -> None:
    proxy = S3Backend(_profile(cluster, locked_bucket))
    maint = S3Backend(_profile(cluster, locked_bucket, Role.MAINT))
    honoured = maint.probe_conditional_put()
    log.warning("RGW %s If-None-Match on a versioned bucket: %s", cluster.endpoint,
                "honoured (412)" if honoured else "ignored (a second version)")
    assert proxy.profile.conditional_put is ConditionalPut.VERIFY
    v1 = proxy.put("backups/fs1/x.json", b"first")
    with pytest.raises(ResourceError):
        proxy.put("backups/fs1/x.json", b"second")
    got = proxy.versions("backups/fs1/x.json")
    assert got[0].version == v1.version
    assert proxy.get("backups/fs1/x.json", max_bytes=10, version=v1.version) == b"first"
    # the proxy may not delete (bucket policy); the maint role may
    with pytest.raises(AuthError, match="role proxy") as e:
        proxy.delete("backups/fs1/x.json", version=v1.version)
    assert cluster.proxy.secret_key not in str(e.value)
    for v in got:
        maint.delete("backups/fs1/x.json", version=v.version)
    assert maint.versions("backups/fs1/x.json") == []
    # missing: not an error (on a versioned bucket it adds a delete marker)
    maint.delete("backups/fs1/x.json")


def test_a_part_answered_500_once_is_sent_again(cluster: Any, plain_bucket: str) -> None:
    # botocore's own retries off: our retry of the part is what must save the upload
    b = S3Backend(_profile(cluster, plain_bucket, max_attempts=1), sleep=lambda s: None)
    failed: list[int] = []

    class Raw:
        """What urllib3 would hand botocore for a 500 with RGW's error body."""

        def stream(self, *_: Any, **__: Any) -> Iterator[bytes]:
            yield (b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>InternalError</Code>"
                   b"<Message>injected</Message></Error>")

    def fail_part_2_once(request: Any, **_: Any) -> AWSResponse | None:
        if "partNumber=2" in request.url and not failed:
            failed.append(2)
            return AWSResponse(request.url, 500, {}, Raw())
        return None

    b.client(0).meta.events.register("before-send.s3.UploadPart", fail_part_2_once)
    w = b.writer("backups/fs1/retry.tar.zst")
    data = b"".join(_stream(20 * MIB))
    w.write(data)
    info = w.commit()
    assert failed == [2] and info.size == 20 * MIB
    assert b.get("backups/fs1/retry.tar.zst", max_bytes=20 * MIB) == data


def test_an_abandoned_upload_is_listed_stale_and_removed(cluster: Any, plain_bucket: str) -> None:
    maint = S3Backend(_profile(cluster, plain_bucket, Role.MAINT))
    w = maint.writer("backups/fs1/abandoned.tar.zst")
    for piece in _stream(10 * MIB):
        w.write(piece)
    w._wait()  # part 1 stored; a killed proxy leaves exactly this
    stale = [u for u in maint.stale_uploads(time.time() + 60)
             if u.key == "backups/fs1/abandoned.tar.zst"]
    assert [u.upload_id for u in stale] == [w.upload_id]
    assert [u for u in maint.stale_uploads(time.time() - 3600)
            if u.key == "backups/fs1/abandoned.tar.zst"] == []  # too young to be stale
    maint.abort_upload(stale[0])
    maint.abort_upload(stale[0])  # gone: not an error
    assert [u for u in maint.stale_uploads(time.time() + 60)
            if u.key == "backups/fs1/abandoned.tar.zst"] == []
    w._state = "failed"
    w.abort()


@pytest.mark.hostile("store", "S3 gateway whose certificate the configured CA did not sign",
                     "ObjectStoreError (exit 16) naming the CA file")
def test_a_wrong_ca_is_a_clear_error(cluster: Any, plain_bucket: str, tmp_path: Path) -> None:
    from sanoceph.cluster import _make_tls

    other_ca = _make_tls(tmp_path / "other", "127.0.0.1")
    b = S3Backend(_profile(cluster, plain_bucket, ca_file=str(other_ca), max_attempts=1))
    with pytest.raises(ObjectStoreError, match=f"failed against the CA file {other_ca}") as e:
        b.stat("x")
    assert e.value.exit_code == 16


@pytest.mark.hostile("store", "S3 credentials with a wrong secret", "AuthError (exit 10) "
                     "naming the profile, not the secret")
def test_a_wrong_secret_is_an_auth_error(cluster: Any, plain_bucket: str) -> None:
    wrong = "x" * 40
    b = S3Backend(_profile(cluster, plain_bucket, secret_key=wrong))
    with pytest.raises(AuthError, match="SignatureDoesNotMatch|AccessDenied") as e:
        b.get("backups/fs1/m.json", max_bytes=10)
    assert wrong not in str(e.value) and "profile 'proxy'" in str(e.value)


def test_a_200_mib_stream_holds_at_most_two_parts(cluster: Any, plain_bucket: str) -> None:
    part = 8 * MIB
    b = S3Backend(_profile(cluster, plain_bucket, part_size=part))
    pieces = list(_stream(16 * MIB))  # 16 distinct MiB, sent over and over
    total = 200 * MIB
    w = b.writer("backups/fs1/big.tar.zst")
    # botocore loads its S3 model (~11 MiB of parsed JSON) on a client's first request:
    # a constant, not the data path's, so it is loaded before measuring
    assert b.stat("backups/fs1/big.tar.zst") is None
    tracemalloc.start()
    try:
        t0 = time.monotonic()
        for i in range(total // MIB):
            w.write(pieces[i % len(pieces)])
        info = w.commit()
        elapsed = time.monotonic() - t0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.size == total
    log.warning("200 MiB multipart write to %s: %.1f s, %.1f MiB/s; peak Python memory "
                "%.1f MiB (parts of %d MiB)", cluster.endpoint, elapsed, total / MIB / elapsed,
                peak / MIB, part // MIB)
    # one part filling + one in flight (+ bytearray's 1/8 over-allocation), and a little
    # of botocore's per-request state
    assert peak < 2.5 * part + 2 * MIB, f"peak {peak / MIB:.1f} MiB"
    st = b.stat("backups/fs1/big.tar.zst")
    assert st is not None and st.size == total
