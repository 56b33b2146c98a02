"""The look-alike broker: mutual TLS only, per-thing ACL isolation, and AWS's rule that a second
connection with the same client id closes the first. paho-mqtt plays the devices."""
from __future__ import annotations

import json
import ssl
import time
import uuid

import paho.mqtt.client as mqtt
import pytest

from tests.cloud import Pki


def connect_result(cloud, certfile=None, keyfile=None, ca=None, host="localhost"):
    """(connected?, error) for a paho client with the given credentials."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="probe-" + uuid.uuid4().hex[:6],
                         protocol=mqtt.MQTTv311)
    client.tls_set(ca_certs=str(ca or cloud.pki.ca_path), certfile=certfile and str(certfile),
                   keyfile=keyfile and str(keyfile))
    result = {}
    client.on_connect = lambda c, u, f, rc, p: result.setdefault("rc", rc)
    try:
        client.connect(host, cloud.port, keepalive=10)
        deadline = time.monotonic() + 5
        while "rc" not in result and time.monotonic() < deadline:
            client.loop(0.1)
    except (ssl.SSLError, OSError) as err:
        return False, err
    finally:
        client.disconnect()
    rc = result.get("rc")
    return bool(rc is not None and not rc.is_failure), rc


def test_thing_certificate_connects(cloud, thing):
    cert = cloud.add_thing(thing)
    ok, err = connect_result(cloud, cert.cert, cert.key)
    assert ok, err


def test_no_client_certificate_refused(cloud):
    ok, err = connect_result(cloud)
    assert not ok


def test_certificate_from_another_ca_refused(cloud, tmp_path):
    other = Pki(tmp_path / "other").client("intruder")
    ok, err = connect_result(cloud, other.cert, other.key)
    assert not ok


def test_wrong_server_ca_refused(cloud, thing, tmp_path):
    other = Pki(tmp_path / "other")
    cert = cloud.add_thing(thing)
    ok, err = connect_result(cloud, cert.cert, cert.key, ca=other.ca_path)
    assert not ok and isinstance(err, ssl.SSLCertVerificationError)


def test_tls_below_1_2_refused(cloud, thing):
    cert = cloud.add_thing(thing)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(str(cloud.pki.ca_path))
    ctx.load_cert_chain(str(cert.cert), str(cert.key))
    try:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
        ctx.minimum_version = ssl.TLSVersion.TLSv1
    except ValueError:
        pytest.skip("this OpenSSL cannot even offer TLS 1.1")
    import socket
    with socket.create_connection(("127.0.0.1", cloud.port), timeout=5) as raw:
        with pytest.raises((ssl.SSLError, OSError)):
            ctx.wrap_socket(raw, server_hostname="localhost")


def test_acl_isolates_things(cloud, make_device):
    a = "thing-" + uuid.uuid4().hex[:8]
    b = "thing-" + uuid.uuid4().hex[:8]
    dev_a = make_device(a)
    # b's device subscribes to a's topics: mosquitto acknowledges but must deliver nothing.
    spy = make_device(b, subscribe=f"$aws/things/{a}/jobs/#")
    dev_b = make_device(b + "-own", cert=cloud.add_thing(b), client_id=b + "-own",
                        subscribe=f"$aws/things/{b}/jobs/#")
    job_id = "job-" + uuid.uuid4().hex[:8]
    cloud.create_job(job_id, [cloud.thing_arn(a)], {"x": 1})
    dev_a.wait(lambda t, p: t.endswith("/notify"))
    seen_before = len(cloud.jobs.requests)
    # b publishes a request on a's topic: dropped by the ACL, so the service never sees it.
    dev_b.client.publish(f"$aws/things/{a}/jobs/{job_id}/update", json.dumps({"status": "FAILED"}), qos=1)
    time.sleep(0.5)
    assert not [m for m in spy.all if a in m[0]], "a thing received another thing's messages"
    assert all(r["thing"] != a for r in cloud.jobs.requests[seen_before:])
    assert cloud.describe_job_execution(job_id, a)["execution"]["status"] == "QUEUED"


def test_same_client_id_closes_first_connection(cloud, make_device, thing):
    first = make_device(thing)
    second = make_device(thing)
    deadline = time.monotonic() + 10
    while not first.disconnects:
        assert time.monotonic() < deadline, "the first connection was not closed"
        time.sleep(0.05)
    first.client.loop_stop()  # stop paho's own reconnect from kicking the second one back
    assert second.request("get")[0] == "accepted"
    assert "already connected, closing old connection" in cloud.broker.log_text()
