"""End to end: field networks. Both channels (MQTT and the artifact download) through a real
HTTP proxy (Debian's tinyproxy, started by the test), with and without Basic authentication, a
proxy that refuses, one that dies mid-download, the no-proxy list and HTTPS_PROXY; and a client
id of its own, so that the agent never takes the core's connection away."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Optional

import pytest

from tests.agent_harness import Device, details
from tests.cloud.broker import free_port, wait_for_port

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(shutil.which("tinyproxy") is None,
                                                  reason="tinyproxy is not installed")]


class Tinyproxy:
    """A real HTTP proxy on loopback. `auth`: (user, password) for Basic authentication;
    `connect_ports`: the only ports it tunnels to (None: any)."""

    def __init__(self, workdir: Path, auth: Optional[tuple] = None, connect_ports: Optional[list] = None,
                 port: Optional[int] = None) -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.log = self.dir / "tinyproxy.log"
        conf = [f"Port {self.port}", "Listen 127.0.0.1", "Timeout 60", "Allow 127.0.0.1", "MaxClients 50",
                f'LogFile "{self.log}"', "LogLevel Info"]
        if auth:
            conf.append(f"BasicAuth {auth[0]} {auth[1]}")
        for p in connect_ports or []:
            conf.append(f"ConnectPort {p}")
        (self.dir / "tinyproxy.conf").write_text("\n".join(conf) + "\n")
        self.proc: Optional[subprocess.Popen] = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(["tinyproxy", "-d", "-c", str(self.dir / "tinyproxy.conf")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        wait_for_port(self.port, 10, self.proc)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)

    def tunnels(self) -> list:
        """host:port of every CONNECT the proxy was asked for."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return [line.split("CONNECT ", 2)[-1].split()[0] for line in text.splitlines()
                if "Request (file descriptor" in line and ": CONNECT " in line]


@pytest.fixture
def proxies(tmp_path):
    made = []

    def make(**kw):
        p = Tinyproxy(tmp_path / f"proxy{len(made)}", **kw)
        made.append(p)
        return p
    yield make
    for p in made:
        p.stop()


def proxied_device(cloud, tmp_path, proxy: Optional[Tinyproxy], user=None, password=None, no_proxy=None,
                   ota=None) -> Device:
    device = Device(cloud, tmp_path, ota=ota)
    if proxy is not None:
        cfg = json.loads(device.dev.config_path.read_text())
        block: dict = {"proxy": {"url": f"http://127.0.0.1:{proxy.port}"}}
        if user:
            block["proxy"].update(username=user, password=password)
        if no_proxy:
            block["noProxyAddresses"] = no_proxy
        cfg["coreThing"]["networkProxy"] = block
        device.dev.config_path.write_text(json.dumps(cfg))
    return device


@pytest.mark.frozen
@pytest.mark.parametrize("auth", [None, ("ota", "s3cret-pw")])
def test_both_channels_go_through_the_proxy(cloud, tmp_path, proxies, auth):
    proxy = proxies(auth=auth)
    device = proxied_device(cloud, tmp_path, proxy, *(auth or (None, None)))
    try:
        device.release_core("1.11.6")
        device.start()
        assert device.wait_status(device.update_job())["status"] == "SUCCEEDED", device.log()[-3000:]
        tunnels = proxy.tunnels()
        assert f"localhost:{cloud.port}" in tunnels  # MQTT
        assert f"localhost:{cloud.store.port}" in tunnels  # the presigned download
        assert "s3cret-pw" not in device.log() and "through the proxy http://" in device.log()
        out = device.run("--root", str(device.root), "--dry-run")
        assert "OK   proxy: http://" in out.stdout and "answers CONNECT" in out.stdout
        assert "s3cret-pw" not in out.stdout + json.dumps(device.status())
    finally:
        device.stop()


def test_a_wrong_password_is_a_clear_error_and_never_a_fast_loop(cloud, tmp_path, proxies):
    proxy = proxies(auth=("ota", "right"))
    device = proxied_device(cloud, tmp_path, proxy, "ota", "Wr0ng-pw-77", ota={"reconnectMaxSeconds": 2})
    try:
        device.start()
        time.sleep(6)
        log = device.log()
        assert "refused CONNECT" in log and ("407" in log or "401 Unauthorized" in log)  # tinyproxy says 401
        assert "Wr0ng-pw-77" not in log
        assert "connected to" not in log
        assert 2 <= len(proxy.tunnels()) <= 15  # retried with the usual backoff (capped at 2 s here), no loop
        out = device.run("--root", str(device.root), "--dry-run")
        assert out.returncode == 1 and "FAIL proxy" in out.stdout and "Unauthorized" in out.stdout
    finally:
        device.stop()


def test_a_proxy_that_refuses_the_download_port_fails_the_job_like_a_download(cloud, tmp_path, proxies):
    proxy = proxies(connect_ports=[cloud.port])  # MQTT may pass, the store's port may not
    device = proxied_device(cloud, tmp_path, proxy, ota={"downloadRetries": 1})
    try:
        device.release_core("1.11.6")
        device.start()
        ex = device.wait_status(device.update_job(), timeout=90)
        assert ex["status"] == "FAILED" and details(ex)["reason"] == "DOWNLOAD_FAILED", device.log()[-3000:]
        assert "refused CONNECT" in details(ex)["message"]
    finally:
        device.stop()


@pytest.mark.frozen
def test_a_proxy_that_dies_mid_download_is_ridden_out_and_the_download_resumes(cloud, tmp_path, proxies):
    proxy = proxies()
    device = proxied_device(cloud, tmp_path, proxy)
    try:
        art = device.release_core("1.11.6", payload_bytes=1_500_000)
        obj = device.stored(art)
        obj.faults.throttle_bps = 400_000
        device.start()
        job = device.update_job()
        device.wait_log("downloaded", timeout=30)
        proxy.stop()
        time.sleep(1.5)
        obj.faults.throttle_bps = None
        proxy.start()
        assert device.wait_status(job, timeout=120)["status"] == "SUCCEEDED", device.log()[-3000:]
        assert any(status == 206 for _, status in obj.requests)  # resumed, through the proxy again
        assert proxy.tunnels().count(f"localhost:{cloud.store.port}") >= 2
    finally:
        device.stop()


def test_the_no_proxy_list_and_https_proxy(cloud, tmp_path, proxies):
    proxy = proxies()
    device = proxied_device(cloud, tmp_path, proxy, no_proxy="http://127.0.0.9,LOCALHOST")
    try:
        device.release_core("1.11.6")
        device.start()
        assert device.wait_status(device.update_job())["status"] == "SUCCEEDED"
        assert proxy.tunnels() == []  # both hosts are on the list: direct
    finally:
        device.stop()
    cfg = json.loads(device.dev.config_path.read_text())
    del cfg["coreThing"]["networkProxy"]
    device.dev.config_path.write_text(json.dumps(cfg))
    env_proxy = proxies()
    device.release_core("1.11.7")
    device.start(extra_env={"HTTPS_PROXY": f"http://127.0.0.1:{env_proxy.port}", "NO_PROXY": ""})
    try:
        assert device.wait_status(device.update_job())["status"] == "SUCCEEDED"
        assert f"localhost:{cloud.port}" in env_proxy.tunnels() and f"localhost:{cloud.store.port}" in \
            env_proxy.tunnels()
    finally:
        device.stop()


@pytest.mark.frozen
def test_the_agent_never_takes_the_cores_connection_away(cloud, tmp_path):
    """AWS IoT (and the look-alike's broker) drops the older of two connections with one client
    id. The agent connects as <thing>-ota: a client connected as the thing (the core) stays."""
    import paho.mqtt.client as mqtt
    device = Device(cloud, tmp_path)
    cert = cloud.add_thing(device.thing)
    drops = []
    core = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=device.thing, protocol=mqtt.MQTTv311)
    core.tls_set(ca_certs=str(cloud.pki.ca_path), certfile=str(cert.cert), keyfile=str(cert.key))
    core.on_disconnect = lambda *a: drops.append(a)
    core.connect("localhost", cloud.port)
    core.loop_start()
    try:
        device.start()
        device.wait_log(f"as {device.thing}-ota", timeout=30)
        time.sleep(5)
        assert core.is_connected() and not drops
        assert device.log().count("connected to") == 1  # nor was the agent kicked off
    finally:
        device.stop()
        core.loop_stop()
        core.disconnect()


class TlsFront:
    """An https:// proxy: Debian's socat terminating TLS (a certificate of its own CA, not the
    cloud's) in front of a tinyproxy. `ca_path`: that CA, for otaAgent.extraCaPath."""

    def __init__(self, workdir: Path, backend: Tinyproxy) -> None:
        import trustme
        workdir.mkdir(parents=True, exist_ok=True)
        ca = trustme.CA(organization_name="site proxy CA")
        self.ca_path = workdir / "proxy-ca.pem"
        ca.cert_pem.write_to_path(str(self.ca_path))
        leaf = ca.issue_cert("localhost", "127.0.0.1")
        pem = workdir / "proxy.pem"
        leaf.private_key_and_cert_chain_pem.write_to_path(str(pem))
        self.port = free_port()
        self.proc = subprocess.Popen(
            ["socat", f"OPENSSL-LISTEN:{self.port},bind=127.0.0.1,reuseaddr,fork,cert={pem},verify=0",
             f"TCP:127.0.0.1:{backend.port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        wait_for_port(self.port, 10, self.proc)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)


def https_proxied_device(cloud, tmp_path, front: TlsFront, trust: bool) -> Device:
    device = Device(cloud, tmp_path, ota={"extraCaPath": str(front.ca_path)} if trust else None)
    cfg = json.loads(device.dev.config_path.read_text())
    cfg["coreThing"]["networkProxy"] = {"proxy": {"url": f"https://localhost:{front.port}", "username": "ota",
                                                  "password": "tls-pw-9"}}
    device.dev.config_path.write_text(json.dumps(cfg))
    return device


@pytest.mark.frozen
@pytest.mark.skipif(shutil.which("socat") is None, reason="socat is not installed")
def test_an_https_proxy_carries_both_channels_tls_inside_tls(cloud, tmp_path, proxies):
    """TLS to the proxy (verified against otaAgent.extraCaPath), and inside its tunnel the
    agent's own TLS to the broker and to the store, verified end to end as ever."""
    backend = proxies(auth=("ota", "tls-pw-9"))
    front = TlsFront(tmp_path / "front", backend)
    device = https_proxied_device(cloud, tmp_path, front, trust=True)
    try:
        device.release_core("1.11.6", payload_bytes=600_000)
        device.start()
        assert device.wait_status(device.update_job(), timeout=120)["status"] == "SUCCEEDED", device.log()[-3000:]
        assert f"localhost:{cloud.port}" in backend.tunnels() and f"localhost:{cloud.store.port}" in \
            backend.tunnels()
        assert "through the proxy https://ota:***@localhost" in device.log() and "tls-pw-9" not in device.log()
        out = device.run("--root", str(device.root), "--dry-run")
        assert "OK   proxy: https://ota:***@localhost" in out.stdout and "answers CONNECT" in out.stdout, out.stdout
        assert "tls-pw-9" not in out.stdout
    finally:
        device.stop()
        front.stop()


@pytest.mark.skipif(shutil.which("socat") is None, reason="socat is not installed")
def test_an_https_proxy_that_does_not_verify_is_a_clear_error(cloud, tmp_path, proxies):
    """The proxy's certificate is checked like any server's: without its CA, no connection, a
    clear PROXY_FAILED line naming the fix, and the usual backoff."""
    front = TlsFront(tmp_path / "front", proxies())
    device = https_proxied_device(cloud, tmp_path, front, trust=False)
    try:
        out = device.run("--root", str(device.root), "--dry-run")
        assert out.returncode == 1 and "FAIL proxy" in out.stdout and "failed TLS verification" in out.stdout
        assert "extraCaPath" in out.stdout
        device.start()
        device.wait_log("failed TLS verification", timeout=30)
        assert "connected to" not in device.log()
    finally:
        device.stop()
        front.stop()
