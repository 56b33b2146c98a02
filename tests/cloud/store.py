"""An S3 look-alike for artifacts: HTTPS (the test CA), presigned URLs with an HMAC signature
and an expiry in the query string checked when a request starts, S3's XML errors, single
`Range` requests (206 / Content-Range / 416), and fault injection per object: throttle,
reset after N bytes (once or always), corrupt a byte, truncate, answer 500."""
from __future__ import annotations

import calendar
import hashlib
import hmac
import http.server
import os
import socket
import ssl
import struct
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .pki import Pki

CHUNK = 256 * 1024
S3_HOST_SUFFIX = ".s3.amazonaws.com"
PLACEHOLDER = "${aws:iot:s3-presigned-url:"


@dataclass
class Faults:
    throttle_bps: Optional[int] = None      # bytes per second
    reset_after: Optional[int] = None       # close the connection with RST after N body bytes
    reset_always: bool = False              # ... on every request, not only the first
    corrupt_offset: Optional[int] = None    # flip one byte at this offset
    truncate_to: Optional[int] = None       # serve only the first N bytes (consistent headers)
    error_500: int = 0                      # answer 500 to the next N requests (-1: always)
    resets_done: int = 0


@dataclass
class StoredObject:
    path: Path
    faults: Faults = field(default_factory=Faults)
    requests: list = field(default_factory=list)  # (range header, status) of each GET


class _Reset(Exception):
    pass


class ArtifactStore:
    """Objects are addressed as /<bucket>/<key>. `presign(bucket, key, expires)` returns a URL;
    `skew(seconds)` moves the store's clock forward, so tests can expire URLs without sleeping."""

    def __init__(self, pki: Pki, secret: bytes = b"look-alike-secret") -> None:
        self.pki = pki
        self.secret = secret
        self.objects: dict[str, StoredObject] = {}
        self.clock_skew = 0.0
        self.lock = threading.Lock()
        self.log: list[dict] = []
        self._ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        self._ctx.load_cert_chain(str(pki.server.cert), str(pki.server.key))
        self._server: Optional[http.server.ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None
        self.port = 0

    # ---- objects ------------------------------------------------------------------------
    def put(self, bucket: str, key: str, path: Path) -> StoredObject:
        obj = StoredObject(Path(path))
        with self.lock:
            self.objects[f"{bucket}/{key}"] = obj
        return obj

    def faults(self, bucket: str, key: str) -> Faults:
        return self.objects[f"{bucket}/{key}"].faults

    def skew(self, seconds: float) -> None:
        self.clock_skew += seconds

    def now(self) -> float:
        return time.time() + self.clock_skew

    # ---- presigning -------------------------------------------------------------------------
    def _signature(self, path: str, amz_date: str, expires: str) -> str:
        msg = "\n".join(["GET", path, amz_date, expires]).encode()
        return hmac.new(self.secret, msg, hashlib.sha256).hexdigest()

    def presign(self, bucket: str, key: str, expires: int = 3600) -> str:
        path = "/" + urllib.parse.quote(f"{bucket}/{key}")
        amz_date = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(self.now()))
        query = {
            "X-Amz-Algorithm": "AWS4-HMAC-SHA256",
            "X-Amz-Credential": f"AKIALOOKALIKE/{amz_date[:8]}/us-east-1/s3/aws4_request",
            "X-Amz-Date": amz_date,
            "X-Amz-Expires": str(expires),
            "X-Amz-SignedHeaders": "host",
        }
        query["X-Amz-Signature"] = self._signature(path, amz_date, query["X-Amz-Expires"])
        return f"https://localhost:{self.port}{path}?{urllib.parse.urlencode(query)}"

    def presign_s3_url(self, s3_url: str, expires: int = 3600) -> str:
        """`https://<bucket>.s3.amazonaws.com/<key>` (as in a stored job document) → presigned URL."""
        parsed = urllib.parse.urlsplit(s3_url)
        host = parsed.hostname or ""
        if host.endswith(S3_HOST_SUFFIX):
            bucket, key = host[: -len(S3_HOST_SUFFIX)], parsed.path.lstrip("/")
        else:  # path style: https://s3.amazonaws.com/<bucket>/<key>
            bucket, _, key = parsed.path.lstrip("/").partition("/")
        return self.presign(bucket, urllib.parse.unquote(key), expires)

    def substitute(self, value, expires: int = 3600):
        """Replace every `${aws:iot:s3-presigned-url:<s3 url>}` in a document with a fresh URL."""
        if isinstance(value, dict):
            return {k: self.substitute(v, expires) for k, v in value.items()}
        if isinstance(value, list):
            return [self.substitute(v, expires) for v in value]
        if isinstance(value, str) and value.startswith(PLACEHOLDER) and value.endswith("}"):
            return self.presign_s3_url(value[len(PLACEHOLDER):-1], expires)
        return value

    def check(self, path: str, query: dict) -> Optional[tuple[int, str, str]]:
        """None when the URL is valid now, else (status, S3 code, message)."""
        try:
            amz_date, expires, sig = query["X-Amz-Date"], query["X-Amz-Expires"], query["X-Amz-Signature"]
        except KeyError:
            return (403, "AccessDenied",
                    "Query-string authentication requires X-Amz-Date, X-Amz-Expires and X-Amz-Signature")
        if not hmac.compare_digest(sig, self._signature(path, amz_date, expires)):
            return (403, "SignatureDoesNotMatch",
                    "The request signature we calculated does not match the signature you provided.")
        try:
            signed_at = calendar.timegm(time.strptime(amz_date, "%Y%m%dT%H%M%SZ"))
            lifetime = int(expires)
        except ValueError:
            return 403, "AuthorizationQueryParametersError", "X-Amz-Date or X-Amz-Expires is malformed"
        if self.now() > signed_at + lifetime:
            return 403, "AccessDenied", "Request has expired"
        return None

    # ---- server -----------------------------------------------------------------------------
    def start(self) -> None:
        store = self

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 64

            def finish_request(self, request, client_address):  # TLS handshake in the worker thread
                request.settimeout(30)
                try:
                    tls = store._ctx.wrap_socket(request, server_side=True)
                except (ssl.SSLError, OSError):
                    request.close()
                    return
                try:
                    self.RequestHandlerClass(tls, client_address, self)
                finally:
                    tls.close()

        self._server = Server(("127.0.0.1", 0), _Handler)
        self._server.store = store  # type: ignore[attr-defined]
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="artifact-store", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def s3_error(code: str, message: str, resource: str) -> bytes:
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
            f"<Resource>{resource}</Resource><RequestId>LOOKALIKE{int(time.time())}</RequestId></Error>").encode()


def parse_range(header: str, size: int) -> Optional[tuple[int, int]]:
    """A single `bytes=` range → (first, last) inclusive; None when unsatisfiable."""
    spec = header.strip()
    if not spec.startswith("bytes=") or "," in spec:
        raise ValueError("only single byte ranges are supported")
    first_s, _, last_s = spec[6:].partition("-")
    if first_s == "":
        n = int(last_s)
        if n <= 0:
            return None
        return max(0, size - n), size - 1
    first = int(first_s)
    last = int(last_s) if last_s else size - 1
    if first >= size or last < first:
        return None
    return first, min(last, size - 1)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "AmazonS3"
    sys_version = ""

    def log_message(self, format, *args):  # noqa: A002 - quiet; the store keeps its own log
        pass

    def handle(self):
        try:
            super().handle()
        except (_Reset, OSError, ValueError):
            pass

    def _error(self, status: int, code: str, message: str, resource: str, head: bool = False) -> None:
        body = s3_error(code, message, resource)
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def do_HEAD(self):
        self.do_GET(head=True)

    def do_GET(self, head: bool = False):
        store: ArtifactStore = self.server.store  # type: ignore[attr-defined]
        parsed = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(parsed.query))
        path = parsed.path
        problem = store.check(path, query)
        store.log.append({"path": path, "range": self.headers.get("Range"), "at": time.time(),
                          "denied": problem[1] if problem else None})
        if problem:
            return self._error(problem[0], problem[1], problem[2], path, head)
        obj = store.objects.get(urllib.parse.unquote(path.lstrip("/")))
        if obj is None or not obj.path.exists():
            return self._error(404, "NoSuchKey", "The specified key does not exist.", path, head)
        faults = obj.faults
        if faults.error_500:
            if faults.error_500 > 0:
                faults.error_500 -= 1
            obj.requests.append((self.headers.get("Range"), 500))
            return self._error(500, "InternalError", "We encountered an internal error. Please try again.",
                               path, head)
        size = obj.path.stat().st_size
        if faults.truncate_to is not None:
            size = min(size, faults.truncate_to)
        first, last, status = 0, size - 1, 200
        range_header = self.headers.get("Range")
        if range_header:
            try:
                span = parse_range(range_header, size)
            except ValueError:
                span = (0, size - 1)  # S3 ignores a range it cannot parse
                range_header = None
            if span is None:
                obj.requests.append((range_header, 416))
                self.send_response(416)
                body = s3_error("InvalidRange", "The requested range is not satisfiable", path)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not head:
                    self.wfile.write(body)
                return
            if range_header:
                first, last, status = span[0], span[1], 206
        obj.requests.append((range_header, status))
        self.send_response(status)
        self.send_header("Content-Type", "application/x-gzip")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(last - first + 1))
        self.send_header("ETag", f'"{int(obj.path.stat().st_mtime)}-{size}"')
        if status == 206:
            self.send_header("Content-Range", f"bytes {first}-{last}/{size}")
        self.end_headers()
        if not head:
            self._send_body(obj, first, last)

    def _send_body(self, obj: StoredObject, first: int, last: int) -> None:
        faults = obj.faults
        reset_at = None
        if faults.reset_after is not None and (faults.reset_always or faults.resets_done == 0):
            reset_at = faults.reset_after
        sent = 0
        started = time.monotonic()
        chunk = CHUNK if not faults.throttle_bps else max(1024, min(CHUNK, faults.throttle_bps // 10))
        with open(obj.path, "rb") as f:
            f.seek(first)
            pos = first
            while pos <= last:
                data = f.read(min(chunk, last - pos + 1))
                if not data:
                    break
                if faults.corrupt_offset is not None and pos <= faults.corrupt_offset < pos + len(data):
                    i = faults.corrupt_offset - pos
                    data = data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:]
                if reset_at is not None and sent + len(data) >= reset_at:
                    self.wfile.write(data[: max(0, reset_at - sent)])
                    self.wfile.flush()
                    faults.resets_done += 1
                    self._reset()
                self.wfile.write(data)
                sent += len(data)
                pos += len(data)
                if faults.throttle_bps:
                    ahead = sent / faults.throttle_bps - (time.monotonic() - started)
                    if ahead > 0:
                        time.sleep(ahead)

    def _reset(self) -> None:
        """Abort the connection with a TCP RST, as a broken link or a load balancer would."""
        sock = self.connection
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        os.close(sock.detach())  # closing the raw descriptor with linger 0 sends the RST
        raise _Reset()
