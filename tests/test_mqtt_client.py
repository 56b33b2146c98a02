"""ggc_ota's MQTT client against real brokers: mosquitto with mutual TLS (the look-alike's, and
one of its own for freezing, killing and restarting), Python TLS servers for TLS-version and
ALPN checks, and amqtt for interop. Message flows are observed with paho-mqtt."""
from __future__ import annotations

import queue
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid

import pytest

import ggc_ota as g
from tests.cloud import Pki
from tests.cloud import mqtt_codec as bc
from tests.cloud.broker import Mosquitto, free_port, wait_for_port
from tests.conftest import REPO, PahoDevice


def settings_for(cloud, thing, port=None, **over) -> g.MqttSettings:
    cert = cloud.add_thing(thing)
    s = g.MqttSettings(host="localhost", port=port or cloud.port, client_id=thing, ca_path=str(cloud.pki.ca_path),
                       cert_path=str(cert.cert), key_path=str(cert.key), keepalive=30, backoff_base=0.2,
                       backoff_cap=1.0, connect_timeout=3, connack_timeout=3)
    return s._replace(**over)


class Inbox:
    def __init__(self):
        self.q: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.connects = 0

    def on_message(self, topic, payload):
        self.q.put((topic, payload))

    def on_connect(self):
        self.connects += 1

    def get(self, timeout=10):
        return self.q.get(timeout=timeout)


@pytest.fixture
def client_factory():
    made = []

    def make(settings, inbox=None, rng=None):
        inbox = inbox or Inbox()
        c = g.MqttClient(settings, inbox.on_message, inbox.on_connect, rng=rng)
        c.inbox = inbox
        c.start()
        made.append(c)
        return c
    yield make
    for c in made:
        c.stop()


def wait_until(cond, timeout, what):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


# ---- connecting and refusing ---------------------------------------------------------------------
def test_round_trip_qos0_and_qos1(cloud, thing, client_factory):
    c = client_factory(settings_for(cloud, thing))
    assert c.wait_connected(10), c.last_error
    topic = f"$aws/things/{thing}/jobs/echo"
    assert c.subscribe(topic, 1) == 1
    c.publish(topic, b"qos1", qos=1, timeout=10)
    assert c.inbox.get() == (topic, b"qos1")
    c.publish(topic, b"qos0", qos=0)
    assert c.inbox.get() == (topic, b"qos0")


def test_paho_sees_what_we_publish_and_we_see_paho(cloud, thing, client_factory):
    c = client_factory(settings_for(cloud, thing))
    assert c.wait_connected(10)
    c.subscribe(f"$aws/things/{thing}/jobs/in", 1)
    paho = PahoDevice(cloud, thing, client_id=thing + "-paho", cert=cloud.add_thing(thing))
    try:
        c.publish(f"$aws/things/{thing}/jobs/out", b'{"from":"ggc-ota"}', qos=1)
        topic, payload = paho.wait(lambda t, p: t.endswith("/out"))
        assert payload == {"from": "ggc-ota"}
        paho.client.publish(f"$aws/things/{thing}/jobs/in", b"from paho", qos=1)
        assert c.inbox.get() == (f"$aws/things/{thing}/jobs/in", b"from paho")
    finally:
        paho.close()


def test_check_connection_ok(cloud, thing):
    g.MqttClient(settings_for(cloud, thing), lambda t, p: None).check_connection()


def test_wrong_ca_refused(cloud, thing, tmp_path):
    other = Pki(tmp_path / "other")
    s = settings_for(cloud, thing, ca_path=str(other.ca_path))
    with pytest.raises(g.MqttAuthError, match="failed verification"):
        g.MqttClient(s, lambda t, p: None).check_connection()


def test_wrong_hostname_refused(cloud, thing):
    s = settings_for(cloud, thing, host="127.0.0.1", server_hostname="wrong.example.com")
    with pytest.raises(g.MqttAuthError, match="failed verification"):
        g.MqttClient(s, lambda t, p: None).check_connection()


def test_missing_certificate_file(cloud, thing, tmp_path):
    s = settings_for(cloud, thing, cert_path=str(tmp_path / "absent.pem"))
    with pytest.raises(g.MqttAuthError) as err:
        g.MqttClient(s, lambda t, p: None).check_connection()
    assert err.value.reason == "CONFIG_INVALID" and "absent.pem" in str(err.value)


def test_certificate_from_another_ca_refused(cloud, tmp_path):
    other = Pki(tmp_path / "other").client("intruder")
    s = g.MqttSettings("localhost", cloud.port, "intruder", str(cloud.pki.ca_path), str(other.cert), str(other.key),
                       connect_timeout=3, connack_timeout=3)
    with pytest.raises(g.MqttError) as err:
        g.MqttClient(s, lambda t, p: None).check_connection()
    assert "certificate" in str(err.value)


def test_refused_certificate_reported_by_the_running_client(cloud, tmp_path, client_factory):
    other = Pki(tmp_path / "other").client("intruder")
    s = g.MqttSettings("localhost", cloud.port, "intruder", str(cloud.pki.ca_path), str(other.cert), str(other.key),
                       connect_timeout=3, connack_timeout=3, backoff_base=0.2, backoff_cap=0.5)
    c = client_factory(s)
    wait_until(lambda: c.last_error is not None, 10, "an error")
    assert not c.connected and "certificate" in str(c.last_error)


def tls_server(ctx, port_holder, seen, ready):
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port_holder.append(srv.getsockname()[1])
    ready.set()
    srv.settimeout(10)
    try:
        conn, _ = srv.accept()
        with ctx.wrap_socket(conn, server_side=True) as tls:
            seen["alpn"] = tls.selected_alpn_protocol()
            seen["version"] = tls.version()
            tls.recv(1024)
    except (OSError, ssl.SSLError) as err:
        seen["error"] = err
    finally:
        srv.close()


def server_ctx(cloud):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(cloud.pki.server.cert), str(cloud.pki.server.key))
    return ctx


def test_alpn_offered_in_443_mode(cloud, thing):
    ctx = server_ctx(cloud)
    ctx.set_alpn_protocols(["x-amzn-mqtt-ca"])
    port, seen, ready = [], {}, threading.Event()
    t = threading.Thread(target=tls_server, args=(ctx, port, seen, ready))
    t.start()
    ready.wait(5)
    s = settings_for(cloud, thing, port=port[0], alpn=True, connack_timeout=1)
    with pytest.raises(g.MqttError):
        g.MqttClient(s, lambda t, p: None).check_connection()  # the server speaks no MQTT
    t.join(10)
    assert seen.get("alpn") == "x-amzn-mqtt-ca"
    assert g.MqttSettings("h", 443, "c", "", "", "").wants_alpn()
    assert not g.MqttSettings("h", 8883, "c", "", "", "").wants_alpn()


def test_tls_below_1_2_refused(cloud, thing):
    ctx = server_ctx(cloud)
    try:
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    except (ValueError, ssl.SSLError):
        pytest.skip("this OpenSSL cannot serve TLS 1.1")
    port, seen, ready = [], {}, threading.Event()
    t = threading.Thread(target=tls_server, args=(ctx, port, seen, ready))
    t.start()
    ready.wait(5)
    s = settings_for(cloud, thing, port=port[0])
    with pytest.raises(g.MqttAuthError, match="TLS handshake"):
        g.MqttClient(s, lambda t, p: None).check_connection()
    t.join(10)
    assert "version" not in seen  # no session was ever established


def test_qos2_refused_by_the_api(cloud, thing, client_factory):
    c = client_factory(settings_for(cloud, thing))
    assert c.wait_connected(10)
    with pytest.raises(g.MqttError, match="QoS 0 and 1"):
        c.subscribe("x", qos=2)


class ScriptedBroker:
    """A TLS server that speaks just enough MQTT (with ggc_ota's codec) to misbehave on purpose:
    `script(packet) -> bytes` answers each packet the client sends."""

    def __init__(self, cloud, script):
        self.script = script
        self.ctx = server_ctx(cloud)
        self.srv = socket.socket()
        self.srv.bind(("127.0.0.1", 0))
        self.srv.listen(4)
        self.port = self.srv.getsockname()[1]
        self.received = []
        self.connections = 0
        self._stop = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        self.srv.settimeout(0.2)
        while not self._stop:
            try:
                conn, _ = self.srv.accept()
            except OSError:
                continue
            self.connections += 1
            try:
                with self.ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.settimeout(5)
                    reader = bc.broker_reader()
                    while not self._stop:
                        data = tls.recv(4096)
                        if not data:
                            break
                        for packet in reader.feed(data):
                            self.received.append(packet)
                            answer = self.script(packet)
                            if answer:
                                tls.sendall(answer)
            except (OSError, ssl.SSLError, g.MqttProtocolError):
                pass

    def close(self):
        self._stop = True
        self.thread.join(5)
        self.srv.close()


@pytest.fixture
def scripted(cloud):
    made = []

    def make(script):
        b = ScriptedBroker(cloud, script)
        made.append(b)
        return b
    yield make
    for b in made:
        b.close()


def test_malformed_connack_is_a_protocol_error(cloud, thing, scripted):
    broker = scripted(lambda p: b"\x20\x03\x00\x00\x00" if p.type == g.CONNECT else b"")
    with pytest.raises(g.MqttProtocolError, match="CONNACK of length 3"):
        g.MqttClient(settings_for(cloud, thing, port=broker.port), lambda t, p: None).check_connection()


def test_connack_not_authorized_backs_off_long(cloud, thing, scripted, client_factory, caplog):
    caplog.set_level("INFO", logger="ggc-ota")
    broker = scripted(lambda p: bc.encode_connack(5) if p.type == g.CONNECT else b"")
    with pytest.raises(g.MqttConnectRefused) as err:
        g.MqttClient(settings_for(cloud, thing, port=broker.port), lambda t, p: None).check_connection()
    assert err.value.code == 5 and "not authorized" in str(err.value)
    c = client_factory(settings_for(cloud, thing, port=broker.port, not_authorized_backoff=30))
    wait_until(lambda: "reconnecting in" in caplog.text, 10, "a reconnect plan")
    assert "reconnecting in 30.0 s" in caplog.text and broker.connections == 2
    assert isinstance(c.last_error, g.MqttConnectRefused) and not c.connected


def test_no_connack_times_out(cloud, thing, scripted):
    broker = scripted(lambda p: b"")
    s = settings_for(cloud, thing, port=broker.port, connack_timeout=1)
    with pytest.raises(g.MqttTimeout, match="CONNACK"):
        g.MqttClient(s, lambda t, p: None).check_connection()


def test_suback_0x80_is_surfaced(cloud, thing, scripted, client_factory):
    def script(p):
        if p.type == g.CONNECT:
            return bc.encode_connack(0)
        if p.type == g.SUBSCRIBE:
            return bc.encode_suback(p.packet_id, [0x80 if t == "denied" else 1 for t, _ in p.topics])
        return b""
    broker = scripted(script)
    c = client_factory(settings_for(cloud, thing, port=broker.port))
    assert c.wait_connected(10)
    assert c.subscribe("allowed", 1) == 1
    with pytest.raises(g.MqttSubscribeRefused, match="denied"):
        c.subscribe("denied", 1, timeout=5)


def test_missing_suback_times_out(cloud, thing, scripted, client_factory):
    broker = scripted(lambda p: bc.encode_connack(0) if p.type == g.CONNECT else b"")
    c = client_factory(settings_for(cloud, thing, port=broker.port))
    assert c.wait_connected(10)
    with pytest.raises(g.MqttTimeout, match="SUBACK"):
        c.subscribe("never-acked", 1, timeout=1)


def test_garbage_from_the_broker_closes_and_reconnects(cloud, thing, scripted, client_factory):
    def script(p):
        if p.type == g.CONNECT:
            return bc.encode_connack(0) + b"\x36\x05\x00\x01t\x00\x01"  # then a PUBLISH with QoS 3
        return b""
    broker = scripted(script)
    c = client_factory(settings_for(cloud, thing, port=broker.port))
    wait_until(lambda: broker.connections >= 2, 10, "a reconnect after the protocol error")
    assert isinstance(c.last_error, g.MqttProtocolError)
    assert c.thread.is_alive()


def test_buffered_tls_records_are_not_left_waiting(cloud, thing, scripted, client_factory):
    """Three PUBLISHes in one write: all must be delivered at once, not one per select() wake-up
    (the SSLSocket.pending() bug of paho #131)."""
    def script(p):
        if p.type == g.CONNECT:
            return bc.encode_connack(0)
        if p.type == g.SUBSCRIBE:
            return (bc.encode_suback(p.packet_id, [1]) + g.encode_publish("t", b"1", 0) +
                    g.encode_publish("t", b"2", 0) + g.encode_publish("t", b"3" * 70000, 0))
        return b""
    broker = scripted(script)
    c = client_factory(settings_for(cloud, thing, port=broker.port, keepalive=600))
    assert c.wait_connected(10)
    c.subscribe("t", 1)
    got = [c.inbox.get(timeout=3)[1] for _ in range(3)]
    assert got[:2] == [b"1", b"2"] and got[2] == b"3" * 70000


# ---- keepalive, half-open links, restarts ---------------------------------------------------------
@pytest.fixture
def own_broker(cloud, tmp_path):
    b = Mosquitto(tmp_path / "own-broker", cloud.pki)
    b.start()
    yield b
    b.stop()


def test_idle_connection_survives_several_keepalives(cloud, thing, own_broker, client_factory):
    c = client_factory(settings_for(cloud, thing, port=own_broker.port, keepalive=1))
    assert c.wait_connected(10)
    time.sleep(4.5)
    assert c.connected and c.connect_count == 1
    c.subscribe(f"$aws/things/{thing}/jobs/x", 1)
    c.publish(f"$aws/things/{thing}/jobs/x", b"still here", qos=1, timeout=5)
    assert c.inbox.get()[1] == b"still here"
    assert "exceeded timeout" not in own_broker.log_text()


def seconds_to_notice_a_frozen_broker(c, broker, limit: float, meanwhile=None, poll: float = 0.05) -> float:
    """Freeze the broker (SIGSTOP: a half-open link as the client sees it) under a connected
    client; the seconds until the client saw the link dead (`limit` if it never did), calling
    `meanwhile` every `poll` seconds; the broker is thawed again."""
    broker.freeze()
    frozen_at = time.monotonic()
    try:
        while c.connected and time.monotonic() - frozen_at < limit:
            if meanwhile is not None:
                meanwhile()
            time.sleep(poll)
        return time.monotonic() - frozen_at
    finally:
        broker.thaw()


def test_frozen_broker_detected_and_reconnected(cloud, thing, own_broker, client_factory):
    keepalive = 2
    c = client_factory(settings_for(cloud, thing, port=own_broker.port, keepalive=keepalive))
    assert c.wait_connected(10)
    noticed = seconds_to_notice_a_frozen_broker(c, own_broker, 4 * keepalive)
    assert noticed <= 2 * keepalive + 1.0, f"noticed after {noticed:.1f} s"
    assert isinstance(c.last_error, g.MqttTimeout)
    assert c.wait_connected(15), c.last_error
    assert c.connect_count == 2


def test_broker_restart_resubscribes_and_flows(cloud, thing, own_broker, client_factory):
    c = client_factory(settings_for(cloud, thing, port=own_broker.port))
    assert c.wait_connected(10)
    topic = f"$aws/things/{thing}/jobs/flow"
    c.subscribe(topic, 1)
    own_broker.kill()
    wait_until(lambda: not c.connected, 10, "disconnect")
    own_broker.restart()
    wait_until(lambda: c.connected, 20, "reconnect")
    deadline = time.monotonic() + 10
    c.publish(topic, b"after restart", qos=1, timeout=10)  # our own subscription came back
    while True:
        topic_got, payload = c.inbox.get(timeout=max(0.1, deadline - time.monotonic()))
        if payload == b"after restart":
            break
    assert c.connect_count == 2


class SlowestBackoff(__import__("random").Random):
    """Full jitter at its upper bound: a reconnect exactly `backoff_cap` seconds later."""

    def uniform(self, a, b):
        return b


def test_unacknowledged_qos1_is_delivered_after_reconnect(cloud, thing, own_broker, client_factory):
    c = client_factory(settings_for(cloud, thing, port=own_broker.port, keepalive=2, backoff_base=3.0,
                                    backoff_cap=3.0), rng=SlowestBackoff())
    assert c.wait_connected(10)
    topic = f"$aws/things/{thing}/jobs/resend"
    own_broker.freeze()  # the PUBLISH goes into a socket nobody reads: no PUBACK
    result = {}

    def publish():
        try:
            c.publish(topic, b"must arrive", qos=1, timeout=60)
            result["ok"] = True
        except g.MqttError as err:
            result["error"] = err
    t = threading.Thread(target=publish)
    t.start()
    time.sleep(0.5)
    own_broker.kill()  # the frozen broker dies with the message unread and unacknowledged
    wait_until(lambda: not c.connected, 10, "disconnect")
    own_broker.start()
    own_broker_cert = cloud.add_thing(thing)
    # Subscribe a paho watcher on the new broker before our client's reconnect backoff ends.
    import paho.mqtt.client as mqtt
    got = queue.Queue()
    w = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=thing + "-watch", protocol=mqtt.MQTTv311)
    w.tls_set(ca_certs=str(cloud.pki.ca_path), certfile=str(own_broker_cert.cert), keyfile=str(own_broker_cert.key))
    w.on_message = lambda cl, u, m: got.put(m.payload)
    subscribed = threading.Event()
    w.on_subscribe = lambda *a: subscribed.set()
    w.on_connect = lambda cl, *a: cl.subscribe(topic, 1)
    w.connect("localhost", own_broker.port)
    w.loop_start()
    try:
        assert subscribed.wait(10)
        t.join(30)
        assert result.get("ok"), result
        assert got.get(timeout=10) == b"must arrive", own_broker.log_text()
    finally:
        w.disconnect()
        w.loop_stop()


def test_publish_times_out_while_disconnected_and_is_dropped(cloud, thing, own_broker, client_factory):
    c = client_factory(settings_for(cloud, thing, port=own_broker.port))
    assert c.wait_connected(10)
    own_broker.kill()
    wait_until(lambda: not c.connected, 10, "disconnect")
    with pytest.raises(g.MqttTimeout):
        c.publish(f"$aws/things/{thing}/jobs/x", b"late", qos=1, timeout=0.5)
    assert not c.inflight  # a timed-out message is not sent later behind the caller's back


def test_same_client_id_elsewhere_is_logged(cloud, thing, own_broker, client_factory, caplog):
    caplog.set_level("INFO", logger="ggc-ota")
    s = settings_for(cloud, thing, port=own_broker.port)
    c = client_factory(s)
    assert c.wait_connected(10)
    other = g.MqttClient(s, lambda t, p: None)
    other.check_connection()  # takes over the client id, then leaves
    wait_until(lambda: c.connect_count >= 2, 15, "reconnect after the takeover")
    assert "same client id" in caplog.text


def test_backoff_full_jitter_bounds():
    import random
    rng = random.Random(1)
    delays = [g.backoff_delay(n, 1.0, 60.0, rng) for n in range(12) for _ in range(50)]
    assert all(0 <= d <= 60.0 for d in delays)
    assert max(g.backoff_delay(0, 1.0, 60.0, rng) for _ in range(200)) <= 1.0
    assert max(g.backoff_delay(10, 1.0, 60.0, rng) for _ in range(200)) > 30  # capped, not stuck low


# ---- packet ids ------------------------------------------------------------------------------------
def test_packet_ids_wrap_and_skip_ids_in_use(cloud, thing):
    c = g.MqttClient(settings_for(cloud, thing), lambda t, p: None)
    c.next_id = 65534
    c.inflight[65535] = g.Inflight(65535, "t", b"")
    c.inflight[1] = g.Inflight(1, "t", b"")
    assert [c.allocate_id() for _ in range(2)] == [2, 3]  # 65535 and 1 are still in flight


def test_more_than_65535_qos1_publishes_on_one_connection(cloud, thing, client_factory):
    c = client_factory(settings_for(cloud, thing))
    assert c.wait_connected(10)
    total, workers = 65_600, 8
    errors = []

    def worker(n):
        try:
            for i in range(n):
                c.publish(f"$aws/things/{thing}/jobs/count", b"%d" % i, qos=1, timeout=30)
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)
    threads = [threading.Thread(target=worker, args=(total // workers,)) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert not errors, errors[:3]
    assert c.connect_count == 1 and c.next_id < total - 65535 + 100  # the counter wrapped


# ---- interop with a second, independently written broker -------------------------------------------
def test_interop_with_amqtt(cloud, thing, client_factory):
    pytest.importorskip("amqtt")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tests.cloud.amqtt_broker", str(port), str(cloud.pki.ca_path),
                             str(cloud.pki.server.cert), str(cloud.pki.server.key)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        wait_for_port(port, 20, proc)
        c = client_factory(settings_for(cloud, thing, port=port))
        assert c.wait_connected(15), c.last_error
        topic = f"things/{uuid.uuid4().hex}/x"
        assert c.subscribe(topic, 1) in (0, 1)
        c.publish(topic, b"interop", qos=1, timeout=10)
        assert c.inbox.get(timeout=10) == (topic, b"interop")
        c.publish(topic, b"qos0", qos=0)
        assert c.inbox.get(timeout=10) == (topic, b"qos0")
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


# ---- what an independent conformance check found ---------------------------------------------------
def test_a_refused_resubscription_is_logged_and_retried(cloud, thing, scripted, client_factory, caplog):
    """Granted on the first connection, refused twice after a reconnect: an ERROR line, then
    tries again with backoff until it is granted (the agent would otherwise sit without notify)."""
    state = {"refusals": 0}

    def script(p):
        if p.type == g.CONNECT:
            return bc.encode_connack(0)
        if p.type == g.SUBSCRIBE:
            if broker.connections >= 2 and state["refusals"] < 2:
                state["refusals"] += 1
                return bc.encode_suback(p.packet_id, [0x80])
            return bc.encode_suback(p.packet_id, [1])
        if p.type == g.PUBLISH and broker.connections == 1:
            return b"\x36\x05\x00\x01t\x00\x01"  # garbage: the client reconnects
        return b""
    caplog.set_level("ERROR", logger="ggc-ota")
    g.log.propagate = True
    broker = scripted(script)
    c = client_factory(settings_for(cloud, thing, port=broker.port))
    assert c.subscribe("t", 1, timeout=10) == 1
    c.publish("kick", b"", 0)
    wait_until(lambda: state["refusals"] == 2 and c.subscriptions["t"].acked_generation == c.generation and c.connected,
               20, "the refused subscription to be granted again")
    assert "refused the subscription to t after a reconnect" in caplog.text


def test_stop_fails_a_waiting_subscribe_at_once(cloud, thing, scripted, client_factory):
    broker = scripted(lambda p: bc.encode_connack(0) if p.type == g.CONNECT else b"")  # never a SUBACK
    c = client_factory(settings_for(cloud, thing, port=broker.port))
    assert c.wait_connected(10)
    errors = []

    def subscribe():
        try:
            c.subscribe("never-acked", 1, timeout=30)
        except g.MqttError as err:
            errors.append(err)
    waiter = threading.Thread(target=subscribe)
    waiter.start()
    time.sleep(0.5)
    stopped = time.monotonic()
    c.stop()
    waiter.join(10)
    assert isinstance(errors[0], g.MqttNotConnected) and time.monotonic() - stopped < 7


def test_a_dead_link_is_found_while_the_client_keeps_publishing(cloud, thing, own_broker, client_factory):
    keepalive = 2
    c = client_factory(settings_for(cloud, thing, port=own_broker.port, keepalive=keepalive))
    assert c.wait_connected(10)
    # progress reports: the client is never quiet
    noticed = seconds_to_notice_a_frozen_broker(c, own_broker, 6 * keepalive,
                                                meanwhile=lambda: c.publish("busy", b"progress", 0), poll=0.2)
    assert not c.connected or c.last_error is not None
    assert noticed <= 2 * keepalive + 1.5, f"noticed after {noticed:.1f} s"


def test_a_puback_that_comes_as_publish_times_out_is_not_a_timeout(cloud, thing, monkeypatch):
    """The PUBACK lands after publish()'s wait gave up and before it took the lock: acknowledged."""
    class LateEvent(threading.Event):
        def wait(self, timeout=None):
            self.set()  # what the network thread does on PUBACK, just after the wait returned
            return False

    class LateInflight(g.Inflight):
        def __init__(self, *args):
            super().__init__(*args)
            self.done = LateEvent()
    monkeypatch.setattr(g, "Inflight", LateInflight)
    c = g.MqttClient(settings_for(cloud, thing), lambda t, p: None)
    try:
        c.publish("t", b"x", 1, timeout=0.01)  # no MqttTimeout
    finally:
        c.stop()


def test_packets_in_the_same_read_as_connack_are_not_lost(cloud, thing, scripted, client_factory):
    broker = scripted(lambda p: bc.encode_connack(0) + g.encode_publish("early", b"hello", 0)
                      if p.type == g.CONNECT else b"")
    c = client_factory(settings_for(cloud, thing, port=broker.port))
    assert c.inbox.get(10) == ("early", b"hello")


# ---- an https proxy that drips: every network phase has a deadline, and a stop ends it ----------
class DrippingHttpsProxy:
    """An https:// proxy on loopback (TLS with a CA of its own, `ca_path`) that answers CONNECT
    with 200. `mode` "handshake": instead of tunnelling, it sends the start of a 16 KiB TLS record
    and then one byte every half second, for ever (the client's TLS handshake inside the tunnel
    never completes); "relay": it relays to the target until `poison()`, then sends the client
    the same endless record in place of the target's bytes."""

    def __init__(self, workdir, mode: str) -> None:
        import trustme
        ca = trustme.CA(organization_name="dripping proxy CA")
        self.ca_path = workdir / "drip-ca.pem"
        ca.cert_pem.write_to_path(str(self.ca_path))
        self.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ca.issue_cert("localhost").configure_cert(self.tls)
        self.mode = mode
        self.poisoned = threading.Event()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.tunnels = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def proxy(self) -> g.Proxy:
        return g.parse_proxy(f"https://localhost:{self.port}", None, None, None, "test")._replace(
            ca_files=(str(self.ca_path),))

    def poison(self) -> None:
        self.poisoned.set()

    def close(self) -> None:
        self.server.close()

    def _serve(self) -> None:
        from tests.test_download import accept_each
        accept_each(self.server, self._tunnel)

    def _tunnel(self, conn) -> None:
        try:
            conn = self.tls.wrap_socket(conn, server_side=True)
            request = b""
            while b"\r\n\r\n" not in request:
                request += conn.recv(1)
            host, port = request.split()[1].decode().rsplit(":", 1)
            conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            self.tunnels += 1
            if self.mode == "handshake":
                self._drip(conn, b"\x16")  # a handshake record
                return
            target = socket.create_connection((host, int(port)))
            threading.Thread(target=self._pipe, args=(conn, target), daemon=True).start()
            target.settimeout(0.2)
            while not self.poisoned.is_set():
                try:
                    data = target.recv(65536)
                except socket.timeout:
                    continue
                if not data:
                    return
                conn.sendall(data)
            self._drip(conn, b"\x17")  # an application data record
        except OSError:
            pass
        finally:
            conn.close()

    @staticmethod
    def _pipe(src, dst) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    return
                dst.sendall(data)
        except OSError:
            pass

    @staticmethod
    def _drip(conn, kind: bytes) -> None:
        conn.sendall(kind + b"\x03\x03\x40\x00")  # 16 KiB to come
        while True:
            conn.sendall(b"\x00")
            time.sleep(0.5)


@pytest.fixture
def dripping(tmp_path):
    made = []

    def make(mode: str) -> DrippingHttpsProxy:
        made.append(DrippingHttpsProxy(tmp_path, mode))
        return made[-1]
    yield make
    for proxy in made:
        proxy.close()


def test_a_tls_handshake_that_drips_through_an_https_proxy_is_a_timeout(cloud, thing, dripping, client_factory):
    """Inside an https proxy's tunnel the TLS runs on memory buffers; each read waited its own
    timeout, so a handshake fed one byte every half second never ended. Now it ends within
    connect_timeout, and the client backs off and tries again."""
    proxy = dripping("handshake")
    started = time.monotonic()
    c = client_factory(settings_for(cloud, thing, proxy=proxy.proxy(), connect_timeout=2))
    wait_until(lambda: c.last_error is not None, 10, "the handshake to time out")
    assert isinstance(c.last_error, g.MqttTimeout) and "handshake" in str(c.last_error), c.last_error
    assert time.monotonic() - started < 6
    wait_until(lambda: proxy.tunnels >= 2, 10, "a second attempt")


def test_a_read_that_drips_through_an_https_proxy_is_caught_by_the_keepalive(cloud, thing, dripping,
                                                                             client_factory):
    """Connected through an https proxy that then drips an endless record: the client used to be
    deaf for good (one read held the network thread). Now each read ends within its wait, the
    missing PINGRESP is noticed, and the client connects again."""
    proxy = dripping("relay")
    c = client_factory(settings_for(cloud, thing, proxy=proxy.proxy(), keepalive=2, ping_timeout=1))
    assert c.wait_connected(10), c.last_error
    proxy.poison()
    wait_until(lambda: c.last_error is not None, 15, "the dead link to be noticed")
    assert "PINGRESP" in str(c.last_error), c.last_error


def test_a_stop_ends_a_handshake_that_drips_at_once(cloud, thing, dripping):
    """A stop shuts the socket under a network thread held in a connect or handshake: the agent
    stops in about a second, not after connect_timeout."""
    proxy = dripping("handshake")
    c = g.MqttClient(settings_for(cloud, thing, proxy=proxy.proxy(), connect_timeout=60), lambda t, p: None)
    c.start()
    wait_until(lambda: proxy.tunnels >= 1, 10, "the tunnel")
    time.sleep(0.5)
    started = time.monotonic()
    c.stop()
    assert not c.thread.is_alive() and time.monotonic() - started < 3


def test_a_connect_reply_that_drips_through_a_proxy_is_a_timeout(cloud, thing, client_factory):
    """An http proxy that drips its reply to CONNECT (each byte within the socket's timeout) held
    the network thread for hours; the reply as a whole now has connect_timeout."""
    from tests.test_download import Dripper
    drip = Dripper(b"HTTP/1.1 200 Connection established\r\n" + b"X: " + b"a" * 1000)
    try:
        proxy = g.parse_proxy(f"http://127.0.0.1:{drip.port}", None, None, None, "test")
        started = time.monotonic()
        c = client_factory(settings_for(cloud, thing, proxy=proxy, connect_timeout=2))
        wait_until(lambda: c.last_error is not None, 10, "the CONNECT reply to time out")
        assert "did not answer CONNECT" in str(c.last_error) and time.monotonic() - started < 6, c.last_error
    finally:
        drip.close()


def test_debug_shows_each_subacks_result(cloud, thing, client_factory, caplog):
    import logging
    caplog.set_level(logging.DEBUG, logger="ggc-ota")
    g.log.propagate = True
    c = client_factory(settings_for(cloud, thing))
    assert c.wait_connected(10), c.last_error
    c.subscribe(f"$aws/things/{thing}/jobs/notify", 1)
    assert any(f"MQTT: SUBACK $aws/things/{thing}/jobs/notify: granted QoS 1" in r.getMessage()
               for r in caplog.records)
