"""Debian's mosquitto as a stand-in for the AWS IoT Core message broker: mutual TLS 1.2+,
identity = certificate CN, no anonymous access, and an ACL that confines each thing to
`$aws/things/<its name>/#` while the service identity may use every topic."""
from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from .pki import Pki

SERVICE_IDENTITY = "iot-service"
MAX_PAYLOAD = 128 * 1024  # AWS IoT Core's limit for one message


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


class Mosquitto:
    """One mosquitto process. `start`, `stop`, `restart` (same port), `freeze`/`thaw`
    (SIGSTOP/SIGCONT, a half-open link as the client sees it), and `log_text` for failures."""

    def __init__(self, directory: Path, pki: Pki, port: int | None = None,
                 keepalive_cap: int | None = None) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.pki = pki
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None
        self.log_path = self.dir / "mosquitto.log"
        self.conf_path = self.dir / "mosquitto.conf"
        self.acl_path = self.dir / "acl"
        self.keepalive_cap = keepalive_cap
        self.exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"

    def _write_config(self) -> None:
        self.acl_path.write_text(
            "# each thing: only its own AWS IoT reserved topics\n"
            "pattern readwrite $aws/things/%u/#\n\n"
            f"user {SERVICE_IDENTITY}\n"
            "topic readwrite #\n"
            "topic readwrite $aws/#\n")
        lines = [
            "per_listener_settings false",
            f"user {getpass.getuser()}",  # stay the invoking user: the files here are theirs
            "allow_anonymous false",
            "persistence false",
            f"log_dest file {self.log_path}",
            "log_type error", "log_type warning", "log_type notice", "log_type information",
            "connection_messages true",
            "log_timestamp true",
            f"acl_file {self.acl_path}",
            f"max_packet_size {MAX_PAYLOAD + 1024}",  # 128 KB payload plus topic and header
            "max_inflight_messages 100",
            "set_tcp_nodelay true",  # like a real broker: no Nagle delay on small replies
            f"listener {self.port} 127.0.0.1",
            f"cafile {self.pki.ca_path}",
            f"certfile {self.pki.server.cert}",
            f"keyfile {self.pki.server.key}",
            "require_certificate true",
            "use_identity_as_username true",
            "tls_version tlsv1.2",
        ]
        if self.keepalive_cap:
            lines.append(f"max_keepalive {self.keepalive_cap}")
        self.conf_path.write_text("\n".join(lines) + "\n")

    def start(self, timeout: float = 10.0) -> None:
        self._write_config()
        self.proc = subprocess.Popen([self.exe, "-c", str(self.conf_path)],
                                     stdout=subprocess.DEVNULL, stderr=open(self.dir / "stderr", "ab"),
                                     start_new_session=True)
        try:
            wait_for_port(self.port, timeout, self.proc)
        except Exception:
            self.stop()
            raise

    def stop(self, timeout: float = 5.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        try:
            os.kill(proc.pid, signal.SIGCONT)
            proc.terminate()
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)

    def kill(self) -> None:
        """SIGKILL: the broker vanishes without closing its connections cleanly."""
        if self.proc is not None:
            self.proc.kill()  # a stopped (frozen) process dies too, without running another step
            self.proc.wait(5)
            self.proc = None

    def restart(self) -> None:
        self.stop()
        deadline = time.monotonic() + 10
        while True:  # the port may linger briefly in the kernel
            try:
                self.start()
                return
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def freeze(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
