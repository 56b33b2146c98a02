"""End to end: what the cloud and the network do to the agent: cancellation, a broker restart
mid-download, a reset after the URL expired, statuses kept on disk while offline."""
from __future__ import annotations

import json
import time

import pytest

from tests.agent_harness import Device, details, device  # noqa: F401 (device is a fixture)

pytestmark = pytest.mark.e2e


def slow_release(device, cloud, bps=400_000, size=1_200_000):
    art = device.release_core("1.11.6", payload_bytes=size)
    obj = device.stored(art)
    obj.faults.throttle_bps = bps
    return obj


@pytest.mark.frozen
def test_canceled_mid_download_is_abandoned(cloud, device):
    before = device.dev.tree_digest("ggc")
    slow_release(device, cloud, bps=300_000)
    device.start()
    job = device.update_job()
    device.wait_log("downloaded", timeout=30)
    cloud.cancel_job(job, force=True, comment="operator changed their mind")
    device.wait_log("abandoned", timeout=30)
    assert device.execution(job)["status"] == "CANCELED"
    assert device.dev.hook_calls() == [] and device.dev.tree_digest("ggc") == before
    assert device.status()["history"][-1]["result"] == "CANCELED"
    assert not list((device.root / "ota-state/downloads").iterdir())


def test_progress_is_reported_in_status_details(cloud, device):
    slow_release(device, cloud, bps=600_000)
    device.start()
    job = device.update_job()
    assert device.wait_status(job)["status"] == "SUCCEEDED"
    progress = [h["statusDetails"].get("progress") for h in device.history(job)
                if h["statusDetails"].get("phase") == "download"]
    assert len(progress) >= 3 and progress[-1] == "100%"
    assert all("X-Amz" not in json.dumps(h) for h in device.history(job))


def test_broker_restart_mid_download(cloud, device):
    slow_release(device, cloud, bps=500_000)
    device.start()
    job = device.update_job()
    device.wait_log("downloaded", timeout=30)
    cloud.broker.restart()
    assert cloud.wait_service_connected(20)
    assert device.wait_status(job, timeout=120)["status"] == "SUCCEEDED"
    assert "reconnecting" in device.log()


def test_reset_after_the_url_expired_gets_a_fresh_url(cloud, device):
    obj = slow_release(device, cloud, bps=600_000)
    obj.faults.reset_after = 500_000
    seen = len(cloud.store.log)
    device.start()
    job = device.update_job()
    device.wait_log("downloaded", timeout=30)
    cloud.store.skew(4000)  # the first URL (3600 s) expires while the download runs
    try:
        assert device.wait_status(job, timeout=60)["status"] == "SUCCEEDED"
    finally:
        cloud.store.skew(-4000)
    denied = [e["denied"] for e in cloud.store.log[seen:] if e["denied"]]
    assert denied == ["AccessDenied"]
    assert any(status == 206 for _, status in obj.requests)


@pytest.mark.frozen
def test_terminal_status_kept_on_disk_while_offline(cloud, device):
    device.release_core("1.11.6")
    device.dev.hang_script("ggc_post_update.sh", 3)
    device.start()
    job = device.update_job()
    device.wait_log("running ggc_post_update.sh", timeout=30)
    cloud.broker.kill()  # the cloud is gone when the agent wants to report SUCCEEDED
    outbox = device.root / "ota-state/outbox"
    deadline = time.monotonic() + 30
    while not any(json.loads(p.read_text())["status"] == "SUCCEEDED" for p in outbox.glob("*.json")):
        assert time.monotonic() < deadline, device.log()[-2000:]
        time.sleep(0.1)
    assert device.execution(job)["status"] == "IN_PROGRESS"
    device.stop()  # and the agent restarts while offline, too
    device.start()
    time.sleep(1)
    cloud.broker.restart()
    assert cloud.wait_service_connected(20)
    assert device.wait_status(job, timeout=60)["status"] == "SUCCEEDED"
    deadline = time.monotonic() + 10
    while list(outbox.glob("*.json")):
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_throttled_and_failing_jobs_api_is_ridden_out(cloud, device):
    device.release_core("1.11.6")
    cloud.jobs.inject_fault(device.thing, "get", "InternalError", count=2)
    cloud.jobs.inject_fault(device.thing, "update", "RequestThrottled", count=3)
    device.start()
    job = device.update_job()
    assert device.wait_status(job)["status"] == "SUCCEEDED"
    assert "RequestThrottled" in device.log() and "InternalError" in device.log()


@pytest.mark.frozen
def test_a_device_that_dies_mid_download_times_out_and_its_download_goes(cloud, tmp_path, fast_step_timers):
    """Every IN_PROGRESS update carries a step timer sized to its phase: an agent killed in the
    middle of a download, and left dead, leaves an execution that ends TIMED_OUT in the cloud
    (here a step timer's minute lasts a second). Started again, the agent runs nothing for it and
    removes its partial download."""
    import os
    import signal
    device = Device(cloud, tmp_path, ota={"slowLinkBytesPerSecond": 100_000_000})  # timers of 2 minutes
    try:
        art = device.release_core("1.11.6", payload_bytes=3_000_000)
        device.stored(art).faults.throttle_bps = 300_000
        device.start()
        job = device.update_job()
        device.wait_log(f"job {job}: downloaded", timeout=30)
        steps = [json.loads(r["payload"]).get("stepTimeoutInMinutes") for r in cloud.jobs.requests
                 if r["thing"] == device.thing and r["topic"].endswith(f"{job}/update")]
        assert steps and all(isinstance(m, int) and 1 <= m <= 10080 for m in steps), steps
        os.killpg(device.proc.pid, signal.SIGKILL)
        device.proc.wait(10)
        device.proc = None  # dead, and left so
        assert device.wait_status(job, timeout=30)["status"] == "TIMED_OUT"
        assert list((device.root / "ota-state/downloads").iterdir())  # the partial download
        device.start()
        device.wait_log(f"job {job} is no longer pending in the cloud", timeout=30)
        time.sleep(1)
        assert not list((device.root / "ota-state/downloads").iterdir())
        assert device.execution(job)["status"] == "TIMED_OUT" and device.dev.hook_calls() == []
        assert device.status()["history"] == []
    finally:
        device.stop()
