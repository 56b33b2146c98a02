"""The look-alike S3: presigned URLs (expiry, tamper), S3 XML errors, Range, and each fault,
checked with the standard library's own HTTPS client against the test CA."""
from __future__ import annotations

import hashlib
import http.client
import os
import ssl
import time
import urllib.parse

import pytest


@pytest.fixture
def obj(cloud, tmp_path):
    data = os.urandom(300_000)
    path = tmp_path / "artifact.tar.gz"
    path.write_bytes(data)
    key = f"objects/{tmp_path.name}/artifact.tar.gz"
    stored = cloud.store.put("bucket", key, path)
    return key, data, stored


def fetch(cloud, url, headers=None, method="GET"):
    ctx = ssl.create_default_context(cafile=str(cloud.pki.ca_path))
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPSConnection(parts.hostname, parts.port, context=ctx, timeout=20)
    conn.request(method, parts.path + "?" + parts.query, headers=headers or {})
    resp = conn.getresponse()
    try:
        body = resp.read()
    except (http.client.IncompleteRead, ConnectionError) as err:
        body = err
    conn.close()
    return resp, body


def test_presigned_get_whole_object(cloud, obj):
    key, data, _ = obj
    url = cloud.store.presign("bucket", key, 60)
    for name in ("X-Amz-Algorithm", "X-Amz-Credential", "X-Amz-Date", "X-Amz-Expires", "X-Amz-Signature"):
        assert name + "=" in url
    resp, body = fetch(cloud, url)
    assert resp.status == 200 and body == data
    assert resp.getheader("Content-Length") == str(len(data)) and resp.getheader("Accept-Ranges") == "bytes"


def test_expired_url_is_403_access_denied(cloud, obj):
    key, _, _ = obj
    url = cloud.store.presign("bucket", key, 60)
    cloud.store.skew(61)
    try:
        resp, body = fetch(cloud, url)
    finally:
        cloud.store.skew(-61)
    assert resp.status == 403
    assert b"<Code>AccessDenied</Code>" in body and b"Request has expired" in body
    assert resp.getheader("Content-Type") == "application/xml"
    assert fetch(cloud, url)[0].status == 200  # the same URL is fine again before its expiry


@pytest.mark.parametrize("tamper", ["signature", "expires", "path"])
def test_tampered_url_is_signature_mismatch(cloud, obj, tamper):
    key, _, _ = obj
    url = cloud.store.presign("bucket", key, 60)
    if tamper == "signature":
        url = url[:-1] + ("0" if url[-1] != "0" else "1")
    elif tamper == "expires":
        url = url.replace("X-Amz-Expires=60", "X-Amz-Expires=3600")
    else:
        url = url.replace("artifact.tar.gz", "other.tar.gz")
    resp, body = fetch(cloud, url)
    assert resp.status == 403 and b"<Code>SignatureDoesNotMatch</Code>" in body


def test_unsigned_request_denied(cloud, obj):
    key, _, _ = obj
    resp, body = fetch(cloud, f"https://localhost:{cloud.store.port}/bucket/{key}?")
    assert resp.status == 403 and b"AccessDenied" in body


def test_missing_object_is_no_such_key(cloud):
    resp, body = fetch(cloud, cloud.store.presign("bucket", "no/such/object", 60))
    assert resp.status == 404 and b"<Code>NoSuchKey</Code>" in body


@pytest.mark.parametrize("header,first,last", [
    ("bytes=0-99", 0, 99), ("bytes=1000-", 1000, 299_999), ("bytes=-500", 299_500, 299_999),
    ("bytes=299990-400000", 299_990, 299_999),
])
def test_range_requests(cloud, obj, header, first, last):
    key, data, _ = obj
    resp, body = fetch(cloud, cloud.store.presign("bucket", key), {"Range": header})
    assert resp.status == 206
    assert resp.getheader("Content-Range") == f"bytes {first}-{last}/{len(data)}"
    assert body == data[first:last + 1]


@pytest.mark.parametrize("header", ["bytes=300000-", "bytes=400000-500000", "bytes=-0"])
def test_unsatisfiable_range_is_416(cloud, obj, header):
    key, data, _ = obj
    resp, body = fetch(cloud, cloud.store.presign("bucket", key), {"Range": header})
    assert resp.status == 416 and resp.getheader("Content-Range") == f"bytes */{len(data)}"
    assert b"InvalidRange" in body


def test_head_request(cloud, obj):
    key, data, _ = obj
    resp, body = fetch(cloud, cloud.store.presign("bucket", key), method="HEAD")
    assert resp.status == 200 and body == b"" and resp.getheader("Content-Length") == str(len(data))


def test_fault_throttle(cloud, obj):
    key, data, stored = obj
    stored.faults.throttle_bps = 400_000
    start = time.monotonic()
    resp, body = fetch(cloud, cloud.store.presign("bucket", key))
    elapsed = time.monotonic() - start
    assert body == data
    assert elapsed >= 0.6, f"300 kB at 400 kB/s took only {elapsed:.2f} s"


@pytest.mark.parametrize("always", [False, True])
def test_fault_reset_after_n_bytes(cloud, obj, always):
    key, data, stored = obj
    stored.faults.reset_after = 100_000
    stored.faults.reset_always = always
    url = cloud.store.presign("bucket", key)
    resp, body = fetch(cloud, url)
    assert resp.status == 200 and isinstance(body, (http.client.IncompleteRead, ConnectionError))
    if isinstance(body, http.client.IncompleteRead):
        assert len(body.partial) <= 100_000
    resp2, body2 = fetch(cloud, url)
    if always:
        assert not isinstance(body2, bytes)
    else:
        assert body2 == data


def test_fault_corrupt_byte(cloud, obj):
    key, data, stored = obj
    stored.faults.corrupt_offset = 123_456
    _, body = fetch(cloud, cloud.store.presign("bucket", key))
    assert len(body) == len(data) and body != data
    assert [i for i in range(len(data)) if body[i] != data[i]] == [123_456]
    _, part = fetch(cloud, cloud.store.presign("bucket", key), {"Range": "bytes=123450-123460"})
    assert part != data[123_450:123_461] and len(part) == 11


def test_fault_truncate(cloud, obj):
    key, data, stored = obj
    stored.faults.truncate_to = 1000
    resp, body = fetch(cloud, cloud.store.presign("bucket", key))
    assert resp.status == 200 and body == data[:1000]
    assert hashlib.sha256(body).hexdigest() != hashlib.sha256(data).hexdigest()


def test_fault_500_then_ok(cloud, obj):
    key, data, stored = obj
    stored.faults.error_500 = 2
    url = cloud.store.presign("bucket", key)
    assert fetch(cloud, url)[0].status == 500
    resp, body = fetch(cloud, url)
    assert resp.status == 500 and b"<Code>InternalError</Code>" in body
    assert fetch(cloud, url)[1] == data
    assert [status for _, status in stored.requests] == [500, 500, 200]


def test_store_certificate_is_verified(cloud, obj, tmp_path):
    key, _, _ = obj
    url = urllib.parse.urlsplit(cloud.store.presign("bucket", key))
    ctx = ssl.create_default_context()  # system CAs only: the test CA is unknown
    conn = http.client.HTTPSConnection("localhost", url.port, context=ctx, timeout=10)
    with pytest.raises(ssl.SSLCertVerificationError):
        conn.request("GET", url.path + "?" + url.query)
    conn.close()
