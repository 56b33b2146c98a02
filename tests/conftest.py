"""Shared fixtures: one look-alike cloud per test worker (real mosquitto with mutual TLS, real
HTTPS store), unique thing names per test, a paho-mqtt device, and the broker's log attached to
every failing test that used the cloud."""
from __future__ import annotations

import json
import queue
import subprocess
import threading
import uuid
from pathlib import Path
from typing import Optional

import paho.mqtt.client as mqtt
import pytest

from tests.cloud import Cloud

REPO = Path(__file__).resolve().parent.parent
MINUTE = 1.0  # one Jobs "minute" lasts a second in tests


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", help="also run slow tests (long fuzzing)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed:
        cloud = item.funcargs.get("cloud") if hasattr(item, "funcargs") else None
        if isinstance(cloud, Cloud):
            report.sections.append(("mosquitto log (tail)", cloud.broker.log_text()[-6000:]))


@pytest.fixture(scope="session")
def cloud(tmp_path_factory) -> Cloud:
    c = Cloud(tmp_path_factory.mktemp("cloud"), minute=MINUTE).start()
    yield c
    c.stop()


@pytest.fixture
def fast_step_timers(cloud):
    """Step timers (stepTimeoutInMinutes) in seconds, for this test: a minute lasts MINUTE."""
    cloud.jobs.step_minute = MINUTE
    yield
    cloud.jobs.step_minute = 60.0


@pytest.fixture(autouse=True)
def stop_core_daemons(tmp_path):
    """The look-alike core daemon that the scripts start is stopped by its pid after each test."""
    yield
    import os
    import signal
    for pid_file in tmp_path.rglob("greengrassd.pid"):
        try:
            os.kill(int(pid_file.read_text()), signal.SIGTERM)
        except (ValueError, ProcessLookupError, OSError):
            pass


@pytest.fixture(autouse=True)
def isolated_releases(request):
    """Releases a test publishes are withdrawn after it: the catalogue (like AWS's) serves the
    newest release of a platform, and one test's release must not become the next test's."""
    if "cloud" not in request.fixturenames:
        yield
        return
    cloud = request.getfixturevalue("cloud")
    before = list(cloud.greengrass.releases)
    yield
    cloud.greengrass.releases = before


@pytest.fixture
def thing(cloud) -> str:
    name = "thing-" + uuid.uuid4().hex[:8]
    cloud.add_thing(name)
    return name


class PahoDevice:
    """A device made of paho-mqtt: subscribes to all of its jobs topics and collects messages."""

    def __init__(self, cloud: Cloud, thing: str, client_id: Optional[str] = None,
                 cert=None, subscribe: Optional[str] = None) -> None:
        self.thing = thing
        self.messages: queue.Queue[tuple[str, dict]] = queue.Queue()
        self.all: list[tuple[str, dict]] = []
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        self.disconnects: list = []
        cert = cert or cloud.add_thing(thing)
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id or thing,
                                  protocol=mqtt.MQTTv311)
        self.client.tls_set(ca_certs=str(cloud.pki.ca_path), certfile=str(cert.cert), keyfile=str(cert.key))
        self.topic = subscribe or f"$aws/things/{thing}/jobs/#"
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda c, u, mid, rc, p: self.subscribed.set()
        self.client.on_message = self._on_message
        self.client.on_disconnect = lambda c, u, f, rc, p: self.disconnects.append(rc)
        self.client.connect("localhost", cloud.port, keepalive=60)
        self.client.loop_start()
        assert self.connected.wait(10), "device did not connect"
        assert self.subscribed.wait(10), "device subscription not acknowledged"

    def _on_connect(self, c, userdata, flags, rc, props):
        if not rc.is_failure:
            self.connected.set()
            c.subscribe(self.topic, qos=1)

    def _on_message(self, c, userdata, msg):
        try:
            payload = json.loads(msg.payload)
        except ValueError:
            payload = {"raw": msg.payload}
        self.all.append((msg.topic, payload))
        self.messages.put((msg.topic, payload))

    def publish(self, suffix: str, payload) -> None:
        data = payload if isinstance(payload, (bytes, str)) else json.dumps(payload)
        info = self.client.publish(f"$aws/things/{self.thing}/jobs/{suffix}", data, qos=1)
        info.wait_for_publish(10)

    def request(self, suffix: str, payload=None, timeout: float = 10) -> tuple[str, dict]:
        """Send a request; return ('accepted' | 'rejected', reply) for its clientToken."""
        token = uuid.uuid4().hex
        body = dict(payload or {})
        body.setdefault("clientToken", token)
        token = body["clientToken"]
        self.publish(suffix, body)
        return self.wait_reply(suffix, token, timeout)

    def wait_reply(self, suffix: str, token, timeout: float = 10) -> tuple[str, dict]:
        want = f"$aws/things/{self.thing}/jobs/{suffix}/"
        return self.wait(lambda t, p: t.startswith(want) and t[len(want):] in ("accepted", "rejected")
                         and p.get("clientToken") == token, timeout,
                         transform=lambda t, p: (t[len(want):], p))

    def wait(self, match, timeout: float = 10, transform=lambda t, p: (t, p)):
        import time
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no matching message; saw: " + json.dumps(self.all[-10:], default=str)[:3000])
            try:
                topic, payload = self.messages.get(timeout=left)
            except queue.Empty:
                continue
            if match(topic, payload):
                return transform(topic, payload)

    def drain(self) -> list:
        out = []
        while True:
            try:
                out.append(self.messages.get_nowait())
            except queue.Empty:
                return out

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def device(cloud, thing):
    dev = PahoDevice(cloud, thing)
    yield dev
    dev.close()


@pytest.fixture
def make_device(cloud):
    made = []

    def make(thing, **kw):
        dev = PahoDevice(cloud, thing, **kw)
        made.append(dev)
        return dev
    yield make
    for d in made:
        d.close()


@pytest.fixture
def make_tmpfs(tmp_path):
    """A real, small filesystem: make_tmpfs("1m") mounts a tmpfs of that size under tmp_path
    (skipping the test where mounting is not allowed) and unmounts it afterwards."""
    mounted = []

    def make(size: str) -> Path:
        disk = tmp_path / f"tmpfs-{len(mounted)}"
        disk.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)],
                          capture_output=True).returncode != 0:
            pytest.skip("cannot mount a tmpfs here")
        mounted.append(disk)
        return disk
    yield make
    for disk in mounted:
        subprocess.run(["umount", "-l", str(disk)], check=False)
