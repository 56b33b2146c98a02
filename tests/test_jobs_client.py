"""ggc_ota's Jobs client over its own MQTT client, against the look-alike's Jobs service."""
from __future__ import annotations

import json
import queue
import random
import time
import uuid

import pytest

import ggc_ota as g


@pytest.fixture
def jobs(cloud, thing):
    cert = cloud.add_thing(thing)
    notes: queue.Queue[dict] = queue.Queue()
    holder = {}
    settings = g.MqttSettings("localhost", cloud.port, thing, str(cloud.pki.ca_path), str(cert.cert), str(cert.key),
                              keepalive=30)
    mqtt = g.MqttClient(settings, lambda t, p: holder["jobs"].handle(t, p))
    client = g.JobsClient(mqtt, thing, on_notify=notes.put, timeout=10, retry_base=0.05)
    holder["jobs"] = client
    mqtt.start()
    assert mqtt.wait_connected(10)
    client.subscribe()
    client.notes = notes
    yield client
    mqtt.stop()


def new_job(cloud, thing, doc=None):
    job_id = "job-" + uuid.uuid4().hex[:10]
    cloud.create_job(job_id, [cloud.thing_arn(thing)], doc or {"softwareToUpdate": "core"})
    return job_id


def test_list_describe_update(cloud, thing, jobs):
    assert jobs.list_pending() == ([], [])
    first = new_job(cloud, thing)
    time.sleep(1.05)
    second = new_job(cloud, thing)
    in_progress, queued = jobs.list_pending()
    assert in_progress == [] and [j["jobId"] for j in queued] == [first, second]
    ex = jobs.describe(first)
    assert ex["jobDocument"] == {"softwareToUpdate": "core"} and ex["versionNumber"] == 1
    reply = jobs.update(first, "IN_PROGRESS", {"phase": "download"}, expected_version=1)
    assert reply["executionState"]["versionNumber"] == 2
    in_progress, queued = jobs.list_pending()
    assert [j["jobId"] for j in in_progress] == [first] and [j["jobId"] for j in queued] == [second]
    jobs.update(first, "SUCCEEDED", {"version": "1.11.6"})
    assert jobs.describe(first) is None  # terminal
    assert cloud.history(first, thing)[-1]["statusDetails"] == {"version": "1.11.6"}


def test_rejections_carry_the_code(cloud, thing, jobs):
    job_id = new_job(cloud, thing)
    with pytest.raises(g.JobsRejected) as err:
        jobs.update(job_id, "IN_PROGRESS", expected_version=9)
    assert err.value.code == "VersionMismatch" and err.value.execution_state["versionNumber"] == 1
    with pytest.raises(g.JobsRejected) as err:
        jobs.update(job_id, "IN_PROGRESS", {"bad key": "x"})
    assert err.value.code == "InvalidRequest"
    assert jobs.describe("no-such-job") is None


def test_throttling_is_retried(cloud, thing, jobs):
    cloud.jobs.inject_fault(thing, "get", "RequestThrottled", count=2)
    assert jobs.list_pending() == ([], [])
    cloud.jobs.inject_fault(thing, "get", "InternalError", count=10)
    with pytest.raises(g.JobsRejected, match="InternalError"):
        jobs.list_pending()


def test_a_throttled_request_is_retried_never_sooner_than_half_its_window():
    """Equal jitter: the n-th retry waits between half and all of min(cap, base * 2**n), so a
    fleet the cloud throttled never comes straight back; reconnects keep full jitter (spread)."""
    rng = random.Random(3)
    for attempt in range(8):
        window = min(30.0, 1.0 * 2 ** attempt)
        delays = [g.retry_delay(attempt, 1.0, 30.0, rng) for _ in range(500)]
        assert window / 2 <= min(delays) and max(delays) <= window
        assert max(delays) - min(delays) > window / 4  # jittered, not a fixed step
    spread = [g.backoff_delay(0, 10.0, 120.0, rng) for _ in range(500)]
    assert min(spread) < 1.0 and max(spread) > 9.0 and max(spread) <= 10.0


def test_notify_reaches_the_agent(cloud, thing, jobs):
    job_id = new_job(cloud, thing)
    note = jobs.notes.get(timeout=10)
    assert [j["jobId"] for j in note["jobs"]["QUEUED"]] == [job_id]


def test_foreign_replies_and_garbage_are_ignored(thing, jobs):
    assert not jobs.handle("$aws/things/other/jobs/notify", b"{}")
    assert jobs.handle(f"$aws/things/{thing}/jobs/get/accepted", b"not json")
    assert jobs.handle(f"$aws/things/{thing}/jobs/get/accepted", b'{"clientToken": "nobody-waits"}')


@pytest.mark.parametrize("job_id,ok", [("GreengrassUpdateJob_1-a", True), ("j" * 64, True), ("j" * 65, False),
                                       ("", False), ("../../ggc", False), ("a+b", False), ("a/b", False),
                                       ("x\x00y", False), ("a\n", False), (7, False), (None, False)])
def test_job_ids_are_aws_job_ids_and_only_they_name_files(tmp_path, job_id, ok):
    assert g.valid_job_id(job_id) is ok
    if ok:
        assert g.State.job_path(str(tmp_path), job_id, ".json") == str(tmp_path / (job_id + ".json"))
    else:
        with pytest.raises(g.OtaError) as err:
            g.State.job_path(str(tmp_path), job_id)
        assert err.value.reason == "INVALID_JOB_ID"


def test_describe_refuses_a_bad_id_without_asking(cloud, thing, jobs):
    sent = len(cloud.jobs.requests)
    with pytest.raises(g.MqttProtocolError):
        jobs.describe("../x")
    assert len(cloud.jobs.requests) == sent


class LoopbackMqtt:
    """The in-process seam: publish() hands each request to `answer`, whose reply goes straight
    back into the client, as the network thread would deliver it."""

    def __init__(self, answer):
        self.answer = answer
        self.client = None

    def publish(self, topic, payload, qos=1, timeout=30.0):
        reply_topic, reply = self.answer(topic, json.loads(payload))
        if reply_topic is not None:
            self.client.handle(reply_topic, reply)


def test_an_unreadable_reply_fails_its_request_at_once():
    """Another application's job whose document cannot be parsed (JSON nested 3000 deep): its
    describe fails at once with UnreadableReply, so the agent leaves that job and goes on,
    instead of waiting for a reply that will never be read and retrying it for ever."""
    deep = b'{"execution": {"jobId": "other", "jobDocument": ' + b"[" * 3000 + b"]" * 3000 + b"}}"
    mqtt = LoopbackMqtt(lambda topic, request: (topic + "/accepted", deep))
    client = g.JobsClient(mqtt, "t", timeout=30)
    mqtt.client = client
    started = time.monotonic()
    with pytest.raises(g.JobsRejected) as err:
        client.describe("other")
    assert err.value.code == g.UNREADABLE_REPLY and time.monotonic() - started < 1


def test_three_unanswered_requests_name_the_likely_causes_once(caplog):
    """A thing name or IoT policy that does not match only ever shows as silence: after three
    requests in a row without a reply, one WARNING names the likely causes and the values in use."""
    import logging
    import types

    class Silent:
        settings = types.SimpleNamespace(client_id="my-core-ota")

        def publish(self, *args, **kwargs):
            pass
    caplog.set_level(logging.WARNING, logger="ggc-ota")
    g.log.propagate = True
    client = g.JobsClient(mqtt=Silent(), thing="my-core", timeout=0.05, retries=0)  # type: ignore[arg-type]
    for _ in range(5):
        with pytest.raises(g.MqttTimeout):
            client.list_pending()
    warned = [r.getMessage() for r in caplog.records if "requests in a row got no reply" in r.getMessage()]
    assert len(warned) == 1 and "my-core" in warned[0] and "my-core-ota" in warned[0], warned
