"""The look-alike's AWS IoT Jobs MQTT API, exercised by paho-mqtt as the device, and its
replies parsed by AWS's own models (awsiot.iotjobs)."""
from __future__ import annotations

import inspect
import json
import re
import time
import uuid

import pytest
from awsiot import iotjobs

from tests.cloud.jobs import MAX_DOCUMENT

DOC = {"operation": "reboot"}


def job_for(cloud, thing, document=None, **kw) -> str:
    job_id = "job-" + uuid.uuid4().hex[:10]
    cloud.create_job(job_id, [cloud.thing_arn(thing)], document or DOC, **kw)
    return job_id


def model_fields(cls) -> set:
    """The payload keys an awsiot model reads (from its from_payload source)."""
    return set(re.findall(r"payload\.get\('(\w+)'\)", inspect.getsource(cls.from_payload)))


def assert_fits_model(cls, payload: dict) -> None:
    """Every key we send is one AWS's model knows, and the model parses the payload."""
    unknown = set(payload) - model_fields(cls)
    assert not unknown, f"{cls.__name__} has no fields {unknown}"
    cls.from_payload(payload)
    nested = {"execution": iotjobs.JobExecutionData, "executionState": iotjobs.JobExecutionState}
    for key, sub in nested.items():
        if key in payload:
            assert_fits_model(sub, payload[key])
    for key in ("inProgressJobs", "queuedJobs"):
        for summary in payload.get(key, []):
            assert_fits_model(iotjobs.JobExecutionSummary, summary)


def test_get_with_nothing_pending(device):
    outcome, reply = device.request("get", {"clientToken": "tok-1"})
    assert outcome == "accepted"
    assert reply["inProgressJobs"] == [] and reply["queuedJobs"] == []
    assert reply["clientToken"] == "tok-1"
    assert isinstance(reply["timestamp"], int) and abs(reply["timestamp"] - time.time()) < 5
    assert_fits_model(iotjobs.GetPendingJobExecutionsResponse, reply)


def test_new_job_notifies_and_lists(cloud, device):
    job_id = job_for(cloud, device.thing)
    topic, note = device.wait(lambda t, p: t.endswith("/jobs/notify") and p.get("jobs"))
    assert [j["jobId"] for j in note["jobs"]["QUEUED"]] == [job_id]
    assert_fits_model(iotjobs.JobExecutionsChangedEvent, note)
    for s in note["jobs"]["QUEUED"]:
        assert_fits_model(iotjobs.JobExecutionSummary, s)
    _, nxt = device.wait(lambda t, p: t.endswith("/jobs/notify-next"))
    assert nxt["execution"]["jobId"] == job_id and nxt["execution"]["jobDocument"] == DOC
    assert_fits_model(iotjobs.NextJobExecutionChangedEvent, nxt)
    outcome, reply = device.request("get")
    assert outcome == "accepted"
    summary = reply["queuedJobs"][0]
    assert summary["jobId"] == job_id and summary["versionNumber"] == 1 and summary["executionNumber"] == 1
    assert "startedAt" not in summary and isinstance(summary["queuedAt"], int)
    assert_fits_model(iotjobs.GetPendingJobExecutionsResponse, reply)


def test_describe_by_id_and_next(cloud, device):
    first = job_for(cloud, device.thing, {"n": 1})
    time.sleep(1.05)  # queuedAt has a resolution of one second
    job_for(cloud, device.thing, {"n": 2})
    outcome, reply = device.request(f"{first}/get")
    assert outcome == "accepted"
    ex = reply["execution"]
    assert ex["jobId"] == first and ex["jobDocument"] == {"n": 1} and ex["status"] == "QUEUED"
    assert ex["thingName"] == device.thing
    assert_fits_model(iotjobs.DescribeJobExecutionResponse, reply)
    outcome, reply = device.request("$next/get")
    assert outcome == "accepted" and reply["execution"]["jobId"] == first
    outcome, reply = device.request(f"{first}/get", {"includeJobDocument": False})
    assert "jobDocument" not in reply["execution"]


def test_describe_next_with_nothing_pending_has_no_execution(device):
    outcome, reply = device.request("$next/get")
    assert outcome == "accepted" and "execution" not in reply


def test_update_increments_version_and_reports_state(cloud, device):
    job_id = job_for(cloud, device.thing)
    outcome, reply = device.request(f"{job_id}/update", {
        "status": "IN_PROGRESS", "statusDetails": {"phase": "download"}, "expectedVersion": 1,
        "includeJobExecutionState": True, "includeJobDocument": True})
    assert outcome == "accepted", reply
    assert reply["executionState"] == {"status": "IN_PROGRESS", "statusDetails": {"phase": "download"},
                                       "versionNumber": 2}
    assert reply["jobDocument"] == DOC
    assert_fits_model(iotjobs.UpdateJobExecutionResponse, reply)
    _, desc = device.request(f"{job_id}/get")
    assert desc["execution"]["versionNumber"] == 2 and isinstance(desc["execution"]["startedAt"], int)
    outcome, reply = device.request(f"{job_id}/update", {"status": "IN_PROGRESS"})
    assert outcome == "accepted" and "executionState" not in reply
    _, desc = device.request(f"{job_id}/get")
    assert desc["execution"]["versionNumber"] == 3
    assert desc["execution"]["statusDetails"] == {"phase": "download"}  # kept when not given


def test_version_mismatch_carries_execution_state(cloud, device):
    job_id = job_for(cloud, device.thing)
    outcome, reply = device.request(f"{job_id}/update", {"status": "IN_PROGRESS", "expectedVersion": 7,
                                                         "clientToken": "abc"})
    assert outcome == "rejected"
    assert reply["code"] == "VersionMismatch" and reply["clientToken"] == "abc"
    assert reply["executionState"] == {"status": "QUEUED", "versionNumber": 1}
    assert_fits_model(iotjobs.RejectedError, reply)
    assert reply["code"] in {c.value if hasattr(c, "value") else c for c in vars(iotjobs.RejectedErrorCode).values()
                             if isinstance(c, str)}


def test_terminal_state_rules(cloud, device):
    job_id = job_for(cloud, device.thing)
    assert device.request(f"{job_id}/update", {"status": "SUCCEEDED", "statusDetails": {"version": "1"}})[0] \
        == "accepted"
    outcome, reply = device.request(f"{job_id}/update", {"status": "IN_PROGRESS"})
    assert (outcome, reply["code"]) == ("rejected", "InvalidStateTransition")
    outcome, reply = device.request(f"{job_id}/update", {"status": "SUCCEEDED"})
    assert (outcome, reply["code"]) == ("rejected", "InvalidStateTransition")
    outcome, reply = device.request(f"{job_id}/get")
    assert (outcome, reply["code"]) == ("rejected", "TerminalStateReached")
    assert_fits_model(iotjobs.RejectedError, reply)
    _, listing = device.request("get")
    assert listing["queuedJobs"] == [] and listing["inProgressJobs"] == []
    assert any(t.endswith("/jobs/notify") and p["jobs"] == {} for t, p in device.all)
    assert cloud.describe_job(job_id)["job"]["status"] == "COMPLETED"


@pytest.mark.parametrize("status", ["QUEUED", "CANCELED", "TIMED_OUT", "REMOVED", "DONE", None, 3])
def test_device_cannot_set_other_statuses(cloud, device, status):
    job_id = job_for(cloud, device.thing)
    outcome, reply = device.request(f"{job_id}/update", {"status": status})
    assert (outcome, reply["code"]) == ("rejected", "InvalidRequest")


@pytest.mark.parametrize("final", ["FAILED", "REJECTED", "SUCCEEDED"])
def test_queued_may_end_directly(cloud, device, final):
    job_id = job_for(cloud, device.thing)
    outcome, reply = device.request(f"{job_id}/update", {"status": final, "includeJobExecutionState": True})
    assert outcome == "accepted" and reply["executionState"]["status"] == final
    assert cloud.describe_job_execution(job_id, device.thing)["execution"]["status"] == final


def test_unknown_job_is_resource_not_found(device):
    for suffix, body in (("nope-123/get", {}), ("nope-123/update", {"status": "IN_PROGRESS"})):
        outcome, reply = device.request(suffix, body)
        assert (outcome, reply["code"]) == ("rejected", "ResourceNotFound")


def test_unknown_execution_number(cloud, device):
    job_id = job_for(cloud, device.thing)
    outcome, reply = device.request(f"{job_id}/get", {"executionNumber": 9})
    assert (outcome, reply["code"]) == ("rejected", "ResourceNotFound")


def test_invalid_json(device):
    device.publish("get", b"{not json")
    _, reply = device.wait(lambda t, p: t.endswith("/jobs/get/rejected"))
    assert reply["code"] == "InvalidJson"
    assert_fits_model(iotjobs.RejectedError, reply)


def test_invalid_topic(device):
    outcome, reply = device.request("frobnicate")
    assert (outcome, reply["code"]) == ("rejected", "InvalidTopic")


@pytest.mark.parametrize("details", [
    {"bad key": "x"}, {"k": "x" * 1025}, {"k": "line1\nline2"}, {"k": 5}, {"k": ""}, ["x"],
    {f"k{i}": "v" for i in range(11)},
])
def test_bad_status_details_rejected(cloud, device, details):
    job_id = job_for(cloud, device.thing)
    outcome, reply = device.request(f"{job_id}/update", {"status": "IN_PROGRESS", "statusDetails": details})
    assert (outcome, reply["code"]) == ("rejected", "InvalidRequest")
    assert cloud.describe_job_execution(job_id, device.thing)["execution"]["versionNumber"] == 1


def test_good_status_details_limits_accepted(cloud, device):
    job_id = job_for(cloud, device.thing)
    details = {"a-b_c:d": "x" * 1024, "unicode": "añadido ✓"}
    outcome, _ = device.request(f"{job_id}/update", {"status": "IN_PROGRESS", "statusDetails": details})
    assert outcome == "accepted"


def test_bad_client_token(device):
    outcome, reply = device.request("get", {"clientToken": "x" * 65})
    assert (outcome, reply["code"]) == ("rejected", "InvalidRequest")


def test_start_next_takes_oldest_queued(cloud, device):
    first = job_for(cloud, device.thing)
    time.sleep(1.05)
    job_for(cloud, device.thing)
    outcome, reply = device.request("start-next", {"statusDetails": {"by": "start-next"}})
    assert outcome == "accepted" and reply["execution"]["jobId"] == first
    assert reply["execution"]["status"] == "IN_PROGRESS" and reply["execution"]["versionNumber"] == 2
    assert_fits_model(iotjobs.StartNextJobExecutionResponse, reply)
    outcome, again = device.request("start-next")
    assert again["execution"]["jobId"] == first and again["execution"]["versionNumber"] == 2


def test_start_next_with_nothing_pending(device):
    outcome, reply = device.request("start-next")
    assert outcome == "accepted" and "execution" not in reply


def test_notify_next_only_when_head_changes(cloud, device):
    first = job_for(cloud, device.thing)
    device.wait(lambda t, p: t.endswith("notify-next") and p.get("execution", {}).get("jobId") == first)
    time.sleep(1.05)
    second = job_for(cloud, device.thing)
    device.wait(lambda t, p: t.endswith("/notify") and len(p["jobs"].get("QUEUED", [])) == 2)
    time.sleep(0.3)
    assert not [m for m in device.drain() if m[0].endswith("notify-next")], "head did not change"
    device.request(f"{first}/update", {"status": "SUCCEEDED"})
    _, nxt = device.wait(lambda t, p: t.endswith("notify-next"))
    assert nxt["execution"]["jobId"] == second


def test_cancel_queued_and_in_progress(cloud, make_device, thing):
    dev = make_device(thing)
    other = "thing-" + uuid.uuid4().hex[:8]
    cloud.add_thing(other)
    job_id = "job-" + uuid.uuid4().hex[:10]
    cloud.create_job(job_id, [cloud.thing_arn(thing), cloud.thing_arn(other)], DOC)
    dev.request(f"{job_id}/update", {"status": "IN_PROGRESS"})
    cloud.cancel_job(job_id, comment="operator changed their mind")
    assert cloud.describe_job_execution(job_id, other)["execution"]["status"] == "CANCELED"
    assert cloud.describe_job_execution(job_id, thing)["execution"]["status"] == "IN_PROGRESS"
    details = cloud.describe_job(job_id)["job"]
    assert details["status"] == "CANCELED" and details["jobProcessDetails"]["numberOfCanceledThings"] == 1
    # the device may still finish what it started
    assert dev.request(f"{job_id}/update", {"status": "IN_PROGRESS"})[0] == "accepted"

    forced = "job-" + uuid.uuid4().hex[:10]
    cloud.create_job(forced, [cloud.thing_arn(thing)], DOC)
    dev.request(f"{forced}/update", {"status": "IN_PROGRESS"})
    dev.drain()
    cloud.cancel_job(forced, force=True)
    assert cloud.describe_job_execution(forced, thing)["execution"]["status"] == "CANCELED"
    dev.wait(lambda t, p: t.endswith("/notify") and forced not in json.dumps(p))
    outcome, reply = dev.request(f"{forced}/update", {"status": "SUCCEEDED"})
    assert (outcome, reply["code"]) == ("rejected", "InvalidStateTransition")


def test_step_timeout_times_out(cloud, device, fast_step_timers):
    job_id = job_for(cloud, device.thing)
    device.request(f"{job_id}/update", {"status": "IN_PROGRESS", "stepTimeoutInMinutes": 1})
    deadline = time.monotonic() + 10
    while cloud.describe_job_execution(job_id, device.thing)["execution"]["status"] != "TIMED_OUT":
        assert time.monotonic() < deadline, "step timeout never fired"
        time.sleep(0.1)
    assert cloud.describe_job(job_id)["job"]["jobProcessDetails"]["numberOfTimedOutThings"] == 1
    outcome, reply = device.request(f"{job_id}/update", {"status": "SUCCEEDED"})
    assert (outcome, reply["code"]) == ("rejected", "InvalidStateTransition")


def test_step_timeout_is_rearmed_by_each_update(cloud, device, fast_step_timers):
    job_id = job_for(cloud, device.thing)
    for _ in range(3):
        device.request(f"{job_id}/update", {"status": "IN_PROGRESS", "stepTimeoutInMinutes": 1})
        time.sleep(0.6)
    assert cloud.describe_job_execution(job_id, device.thing)["execution"]["status"] == "IN_PROGRESS"


def test_job_in_progress_timeout(cloud, device):
    job_id = job_for(cloud, device.thing, timeout_minutes=1)
    device.request(f"{job_id}/update", {"status": "IN_PROGRESS"})
    deadline = time.monotonic() + 10
    while cloud.describe_job_execution(job_id, device.thing)["execution"]["status"] != "TIMED_OUT":
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_bad_step_timeout(cloud, device):
    job_id = job_for(cloud, device.thing)
    outcome, reply = device.request(f"{job_id}/update", {"status": "IN_PROGRESS", "stepTimeoutInMinutes": 0})
    assert (outcome, reply["code"]) == ("rejected", "InvalidRequest")


def test_document_size_limit(cloud, thing):
    with pytest.raises(Exception) as err:
        job_for(cloud, thing, {"pad": "x" * MAX_DOCUMENT})
    assert getattr(err.value, "code", "") == "LimitExceededException"


def test_oversized_payload_disconnects(cloud, device):
    device.publish("get", b"{" + b" " * (130 * 1024) + b"}")
    deadline = time.monotonic() + 10
    while not device.disconnects:
        assert time.monotonic() < deadline, "broker accepted a payload over 128 KB"
        time.sleep(0.05)


@pytest.mark.parametrize("code", ["RequestThrottled", "InternalError"])
def test_injected_errors(cloud, device, code):
    cloud.jobs.inject_fault(device.thing, "get", code, count=1)
    outcome, reply = device.request("get")
    assert (outcome, reply["code"]) == ("rejected", code)
    assert device.request("get")[0] == "accepted"


def test_throttling_a_share_of_requests(cloud, device):
    """A share of every request, chosen at random, is answered RequestThrottled, as AWS answers
    a throttled Jobs request over MQTT; each request is recorded with its outcome."""
    cloud.jobs.throttle_share(0.5, seed=7)
    try:
        outcomes = [device.request("get") for _ in range(40)]
    finally:
        cloud.jobs.throttle_share(0.0)
    throttled = [reply for outcome, reply in outcomes if outcome == "rejected"]
    assert 8 <= len(throttled) <= 32 and all(r["code"] == "RequestThrottled" for r in throttled)
    for reply in throttled:
        iotjobs.RejectedError.from_payload(reply)  # AWS's own model reads it
    mine = [r for r in cloud.jobs.requests if r["thing"] == device.thing][-40:]
    assert sum(r["code"] == "RequestThrottled" for r in mine) == len(throttled)
    assert device.request("get")[0] == "accepted"


def test_throttling_by_rate_for_the_whole_account(cloud, device):
    """Past N requests a second (a burst of one second's worth) the account is throttled; a
    client that waits gets through again."""
    cloud.jobs.rate_limit(5)
    try:
        burst = [device.request("get")[0] for _ in range(12)]
        assert burst[:5] == ["accepted"] * 5 and "rejected" in burst[5:]
        time.sleep(1.0)
        assert device.request("get")[0] == "accepted"
    finally:
        cloud.jobs.rate_limit(None)


def test_history_keeps_every_update(cloud, device):
    job_id = job_for(cloud, device.thing)
    device.request(f"{job_id}/update", {"status": "IN_PROGRESS", "statusDetails": {"p": "1"}})
    device.request(f"{job_id}/update", {"status": "IN_PROGRESS", "statusDetails": {"p": "2"}})
    device.request(f"{job_id}/update", {"status": "FAILED", "statusDetails": {"reason": "X"}})
    hist = cloud.history(job_id, device.thing)
    assert [(h["status"], h["statusDetails"].get("p"), h["versionNumber"]) for h in hist] == [
        ("QUEUED", None, 1), ("IN_PROGRESS", "1", 2), ("IN_PROGRESS", "2", 3), ("FAILED", None, 4)]


def test_presigned_placeholder_is_fresh_each_time(cloud, device, tmp_path):
    art = tmp_path / "a.bin"
    art.write_bytes(b"x" * 10)
    cloud.store.put("bucket", "a.bin", art)
    doc = {"artifact": {"url": "${aws:iot:s3-presigned-url:https://bucket.s3.amazonaws.com/a.bin}"}}
    job_id = job_for(cloud, device.thing, doc, presigned_url_config={"roleArn": "arn:aws:iam::1:role/r",
                                                                      "expiresInSec": 60})
    _, first = device.request(f"{job_id}/get")
    cloud.store.skew(5)
    _, second = device.request(f"{job_id}/get")
    u1, u2 = first["execution"]["jobDocument"]["artifact"]["url"], second["execution"]["jobDocument"]["artifact"]["url"]
    assert u1.startswith(f"https://localhost:{cloud.store.port}/bucket/a.bin?") and "X-Amz-Signature=" in u1
    assert "X-Amz-Expires=60" in u1
    assert u1 != u2
    assert cloud.jobs.jobs[job_id].document == doc  # the stored document keeps its placeholder
    cloud.store.skew(-5)
