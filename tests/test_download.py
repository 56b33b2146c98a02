"""ggc_ota's download against the look-alike S3 store and each of its faults."""
from __future__ import annotations

import hashlib
import os

import pytest

import ggc_ota as g

SIZE = 3 * 1024 * 1024 + 123


@pytest.fixture
def artifact(cloud, tmp_path):
    data = os.urandom(SIZE)
    src = tmp_path / "src.tar.gz"
    src.write_bytes(data)
    key = f"dl/{tmp_path.name}/a.tar.gz"
    stored = cloud.store.put("bucket", key, src)
    return key, data, stored


def make(cloud, tmp_path, key, data, **kw):
    ctx = g.https_context([str(cloud.pki.ca_path)])
    kw.setdefault("retry_base", 0.01)
    kw.setdefault("retry_cap", 0.05)
    kw.setdefault("progress_interval", 0)
    return g.Download(url=kw.pop("url", None) or cloud.store.presign("bucket", key, 60), dest=str(tmp_path / "out"),
                      sha256=kw.pop("sha256", hashlib.sha256(data).hexdigest()), size=kw.pop("size", len(data)),
                      context=ctx, fresh_url=kw.pop("fresh_url", lambda: cloud.store.presign("bucket", key, 60)), **kw)


def test_clean_download_with_progress(cloud, tmp_path, artifact):
    key, data, stored = artifact
    seen = []
    dl = make(cloud, tmp_path, key, data, progress=lambda done, total: seen.append((done, total)))
    dl.run()
    assert (tmp_path / "out").read_bytes() == data and not (tmp_path / "out.part").exists()
    assert seen[-1] == (SIZE, SIZE) and [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert [s for _, s in stored.requests] == [200]


def test_reset_resumes_with_range(cloud, tmp_path, artifact):
    key, data, stored = artifact
    stored.faults.reset_after = 1_000_000
    make(cloud, tmp_path, key, data).run()
    assert (tmp_path / "out").read_bytes() == data
    assert stored.requests[0] == (None, 200)
    rng, status = stored.requests[1]
    # an RST drops what was in flight: the resume point is at or before the reset point
    assert status == 206 and rng.startswith("bytes=") and 0 < int(rng[6:-1]) <= 1_000_000


def test_restart_resumes_from_partial_file(cloud, tmp_path, artifact):
    key, data, stored = artifact
    (tmp_path / "out.part").write_bytes(data[:2_000_000])
    make(cloud, tmp_path, key, data).run()
    assert (tmp_path / "out").read_bytes() == data
    assert stored.requests == [("bytes=2000000-", 206)]


def test_wrong_partial_file_is_redone_from_scratch(cloud, tmp_path, artifact):
    key, data, stored = artifact
    (tmp_path / "out.part").write_bytes(b"\0" * 1_000_000)
    make(cloud, tmp_path, key, data).run()
    assert (tmp_path / "out").read_bytes() == data
    assert [s for _, s in stored.requests] == [206, 200]  # resumed, mismatched, redone whole


def test_partial_larger_than_artifact_is_discarded(cloud, tmp_path, artifact):
    key, data, stored = artifact
    (tmp_path / "out.part").write_bytes(b"\0" * (SIZE + 10))
    make(cloud, tmp_path, key, data).run()
    assert (tmp_path / "out").read_bytes() == data


def test_expired_url_is_refreshed(cloud, tmp_path, artifact):
    key, data, stored = artifact
    old = cloud.store.presign("bucket", key, 60)
    cloud.store.skew(120)
    try:
        dl = make(cloud, tmp_path, key, data, url=old)
        dl.run()
    finally:
        cloud.store.skew(-120)
    assert dl.url_refreshes == 1 and (tmp_path / "out").read_bytes() == data


def test_reset_after_expiry_resumes_with_a_fresh_url(cloud, tmp_path, artifact):
    key, data, stored = artifact
    stored.faults.reset_after = 1_500_000
    dl = make(cloud, tmp_path, key, data)
    real_stream = dl.stream_body

    def stream_then_time_passes(resp):
        try:
            return real_stream(resp)
        finally:
            if cloud.store.clock_skew == 0:
                cloud.store.skew(120)  # cut off, and the first URL expires meanwhile
    dl.stream_body = stream_then_time_passes
    try:
        dl.run()
    finally:
        cloud.store.skew(-cloud.store.clock_skew)
    assert (tmp_path / "out").read_bytes() == data and dl.url_refreshes == 1
    statuses = [s for _, s in stored.requests]
    assert statuses == [200, 206], statuses  # the 403 came before the object was looked up


def test_wrong_hash_fails_and_leaves_nothing(cloud, tmp_path, artifact):
    key, data, stored = artifact
    stored.faults.corrupt_offset = 12345
    with pytest.raises(g.HashMismatch) as err:
        make(cloud, tmp_path, key, data).run()
    assert err.value.reason == "HASH_MISMATCH"
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.part").exists()


def test_truncated_object_is_a_size_mismatch(cloud, tmp_path, artifact):
    key, data, stored = artifact
    stored.faults.truncate_to = 1000
    with pytest.raises(g.DownloadError) as err:
        make(cloud, tmp_path, key, data).run()
    assert err.value.reason == "SIZE_MISMATCH"


def test_server_errors_are_retried(cloud, tmp_path, artifact):
    key, data, stored = artifact
    stored.faults.error_500 = 2
    make(cloud, tmp_path, key, data).run()
    assert [s for _, s in stored.requests] == [500, 500, 200]


def test_gives_up_after_retries_without_leaking_the_signature(cloud, tmp_path, artifact):
    key, data, stored = artifact
    stored.faults.reset_after = 0  # no progress at all, every time
    stored.faults.reset_always = True
    with pytest.raises(g.DownloadError) as err:
        make(cloud, tmp_path, key, data, retries=3).run()
    assert "giving up" in str(err.value) and "X-Amz-Signature" not in str(err.value)
    assert len(stored.requests) == 4


def test_http_and_unknown_ca_refused(cloud, tmp_path, artifact):
    key, data, _ = artifact
    with pytest.raises(g.DownloadError, match="https"):
        make(cloud, tmp_path, key, data, url="http://localhost/x?X-Amz-Signature=secret").run()
    dl = make(cloud, tmp_path, key, data)
    dl.context = g.https_context([])  # system CAs only: the look-alike's CA is unknown
    with pytest.raises(g.DownloadError) as err:
        dl.run()
    assert "certificate" in str(err.value) and "X-Amz-Signature" not in str(err.value)


def test_redact_url():
    assert g.redact_url("https://b.s3.amazonaws.com/k/a.tgz?X-Amz-Signature=abc#f") == "https://b.s3.amazonaws.com/k/a.tgz"


def test_a_drip_is_a_stall_and_ends_the_download(cloud, tmp_path, artifact):
    """A server that keeps sending a little (here 400 bytes/s) keeps every read alive: the
    download counts what arrives per read timeout, and too little is a stall (retried, then
    DOWNLOAD_FAILED), not a download that never ends."""
    import time
    key, data, stored = artifact
    stored.faults.throttle_bps = 400
    dl = make(cloud, tmp_path, key, data, read_timeout=5, retries=0, stall_bytes=8192)
    started = time.monotonic()
    with pytest.raises(g.DownloadError, match="stalled") as err:
        dl.run()
    assert err.value.reason == "DOWNLOAD_FAILED" and time.monotonic() - started < 30


def test_abort_ends_a_blocked_read_at_once(cloud, tmp_path, artifact):
    key, data, stored = artifact
    stored.faults.throttle_bps = 20_000
    abort_after(make(cloud, tmp_path, key, data, read_timeout=60), 1.5)
    assert 0 < (tmp_path / "out.part").stat().st_size < SIZE  # kept for the resume


def abort_after(dl, seconds: float) -> None:
    """Run `dl` on a thread, abort it after `seconds`: it must end CANCELED within 3 s."""
    import threading
    import time
    errors = []
    worker = threading.Thread(target=lambda: errors.append(pytest.raises(g.DownloadError, dl.run)))
    worker.start()
    time.sleep(seconds)
    started = time.monotonic()
    dl.abort()
    worker.join(10)
    assert not worker.is_alive() and time.monotonic() - started < 3
    assert errors and errors[0].value.reason == "CANCELED"


def accept_each(server, handle) -> None:
    """Serve each connection `server` accepts on a thread of its own, `handle(conn)`, until the
    server is closed."""
    import threading
    while True:
        try:
            conn, _ = server.accept()
        except OSError:
            return
        threading.Thread(target=handle, args=(conn,), daemon=True).start()


class Dripper:
    """A raw server on loopback that accepts, optionally does TLS, reads what it is sent, then
    drips `reply` one byte every `every` seconds for as long as the client listens."""

    def __init__(self, reply: bytes, every: float = 0.5, tls=None) -> None:
        import socket
        import threading
        self.reply, self.every, self.tls = reply, every, tls
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.connections = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        accept_each(self.server, self._drip)

    def _drip(self, conn) -> None:
        self.connections += 1
        self._drip_on(conn)

    def _drip_on(self, conn) -> None:
        import time
        try:
            if self.tls is not None:
                conn = self.tls.wrap_socket(conn, server_side=True)
            conn.recv(4096)
            for byte in self.reply:
                conn.sendall(bytes([byte]))
                time.sleep(self.every)
        except OSError:
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self.server.close()


def test_response_headers_that_drip_are_a_stall(cloud, tmp_path):
    """A store that sends its headers one byte every half second keeps each read alive: the
    request has read_timeout for everything before the body, then it is retried, then
    DOWNLOAD_FAILED (the first request used to be held for good)."""
    import ssl
    import time
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(str(cloud.pki.server.cert), str(cloud.pki.server.key))
    drip = Dripper(b"HTTP/1.1 200 OK\r\n" + b"X-Slow: " + b"a" * 1000, tls=tls)
    try:
        dl = g.Download(url=f"https://localhost:{drip.port}/a?X-Amz-Signature=s", dest=str(tmp_path / "out"),
                        sha256="0" * 64, size=10, context=g.https_context([str(cloud.pki.ca_path)]),
                        read_timeout=2, retries=1, retry_base=0.01, retry_cap=0.05)
        started = time.monotonic()
        with pytest.raises(g.DownloadError, match="no response from localhost within 2 s") as err:
            dl.run()
        assert err.value.reason == "DOWNLOAD_FAILED" and time.monotonic() - started < 12
        assert drip.connections == 2  # retried once
    finally:
        drip.close()


def test_a_proxy_that_drips_its_connect_reply_is_stopped_by_abort_and_by_the_deadline(cloud, tmp_path):
    """The abort path had no socket to shut while the proxy's CONNECT reply dripped in: SIGTERM
    could not stop the agent. Now abort() ends it at once, and the deadline ends it anyway."""
    import time
    drip = Dripper(b"HTTP/1.1 200 Connection established\r\n" + b"X: " + b"a" * 1000)
    proxy = g.parse_proxy(f"http://127.0.0.1:{drip.port}", None, None, None, "test")
    try:
        def download(timeout: float):
            return g.Download(url="https://localhost:1/a", dest=str(tmp_path / "out"), sha256="0" * 64, size=10,
                              context=g.https_context([str(cloud.pki.ca_path)]), read_timeout=timeout, retries=0,
                              proxy=proxy)
        abort_after(download(60), 1.5)
        started = time.monotonic()
        with pytest.raises(g.DownloadError, match="within 2 s"):
            download(2).run()
        assert time.monotonic() - started < 8
    finally:
        drip.close()


def test_what_a_proxy_says_is_escaped_before_it_is_printed(cloud, tmp_path, capsys):
    """A proxy's status line with ESC and BEL reached the operator's terminal through --dry-run."""
    hostile = Dripper(b"HTTP/1.1 403 \x1b[2J\x1b]0;owned\x07Forbidden\r\n\r\n", every=0)
    try:
        proxy = g.parse_proxy(f"http://127.0.0.1:{hostile.port}", None, None, None, "test")
        with pytest.raises(g.ProxyFailed) as err:
            g.open_tunnel(proxy, "localhost", 8883, 5)
        assert "\x1b" not in str(err.value) and "\x07" not in str(err.value) and "\\x1b[2J" in str(err.value)
        g.print_checks([g.Check("proxy", False, "raw \x1b[31mred\x07 " + str(err.value))], as_json=False)
        out = capsys.readouterr().out
        assert "\x1b" not in out and "\x07" not in out and out.startswith("FAIL proxy: raw \\x1b[31mred\\x07")
    finally:
        hostile.close()


def test_a_rate_cap_holds_the_average_and_a_resume_fetches_nothing_twice(cloud, tmp_path, artifact):
    """otaAgent.maxDownloadBytesPerSecond: a token bucket (a burst of at most one second's worth)
    holds the average rate at the cap, across a reset and its resume, which asks only for the
    bytes it lacks. (A lower bound on the time: a slow machine only makes it longer.)"""
    import time
    key, data, stored = artifact
    stored.faults.reset_after = 1_000_000
    cap = 1024 * 1024
    dl = make(cloud, tmp_path, key, data, max_rate=cap)
    started = time.monotonic()
    dl.run()
    elapsed = time.monotonic() - started
    assert (tmp_path / "out").read_bytes() == data
    assert elapsed >= (SIZE - cap) / cap * 0.95, elapsed  # 3 MiB at 1 MiB/s, the first second's burst aside
    ranges = [r for r, _ in stored.requests]  # the resume asks from what it has (what the reset let through)
    assert ranges[0] is None and len(ranges) == 2 and ranges[1].startswith("bytes=") and \
        int(ranges[1][6:].split("-")[0]) > 0, ranges


def test_a_stop_under_a_rate_cap_is_prompt(cloud, tmp_path, artifact):
    import threading
    import time
    key, data, stored = artifact
    dl = make(cloud, tmp_path, key, data, max_rate=64 * 1024)
    worker = threading.Thread(target=lambda: pytest.raises(g.OtaError, dl.run), daemon=True)
    worker.start()
    time.sleep(1.5)
    started = time.monotonic()
    dl.abort()
    worker.join(10)
    assert not worker.is_alive() and time.monotonic() - started < 2
    assert 0 < os.path.getsize(tmp_path / "out.part") < SIZE  # kept for the resume
