"""End to end: what the agent asks of the cloud, which a fleet multiplies. An update costs two
listings (a notification that names only jobs already handled costs none); a status the cloud
throttles is retried with backoff, never sooner than half a second, and delivered without
waiting for the hourly resync; nothing is asked while idle."""
from __future__ import annotations

import time

import pytest

from tests.agent_harness import details, device  # noqa: F401 (device is a fixture)

pytestmark = pytest.mark.e2e


def requests_of(cloud, thing: str, since: float) -> list:
    with cloud.jobs.lock:
        return [r for r in cloud.jobs.requests if r["thing"] == thing and r["at"] >= since]


def settle(cloud, thing: str, quiet: float = 2.0, timeout: float = 30.0) -> None:
    """Wait until the agent has listed its jobs at least once and then asked nothing for `quiet` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        mine = requests_of(cloud, thing, 0)
        if mine and time.time() - mine[-1]["at"] >= quiet:
            return
        time.sleep(0.2)
    raise AssertionError("the agent never listed its jobs, or never fell quiet")


def running_and_quiet(device) -> float:
    """Release a core, start the agent, wait until it listed its jobs and fell quiet; the time."""
    device.release_core("1.11.6")
    device.start()
    device.wait_log("MQTT: connected", timeout=30)
    settle(device.cloud, device.thing)
    return time.time()


@pytest.mark.frozen
def test_an_update_lists_the_jobs_twice_and_the_notifications_it_causes_cost_nothing(device):
    began = running_and_quiet(device)
    job = device.update_job()
    assert device.wait_status(job)["status"] == "SUCCEEDED"
    settle(device.cloud, device.thing)
    topics = [r["topic"].split("/jobs/", 1)[1] for r in requests_of(device.cloud, device.thing, began)]
    # the new job's notify: one listing and one description; after the update, one listing to
    # find the next job; the IN_PROGRESS and SUCCEEDED notifications name only this job: nothing
    assert topics.count("get") == 2, topics
    assert sum(t == f"{job}/get" for t in topics) <= 2, topics
    quiet_since = time.time()
    time.sleep(5)
    assert requests_of(device.cloud, device.thing, quiet_since) == []  # idle: keepalive only


@pytest.mark.frozen
def test_a_throttled_status_is_retried_with_backoff_and_delivered_soon(device):
    began = running_and_quiet(device)
    # more refusals than the client's own retries (4): the first statuses wait in the outbox
    device.cloud.jobs.inject_fault(device.thing, "update", "RequestThrottled", count=7)
    job = device.update_job()
    ex = device.wait_status(job, timeout=120)
    assert ex["status"] == "SUCCEEDED" and details(ex)["version"] == "1.11.6", device.log()[-3000:]
    updates = [r for r in requests_of(device.cloud, device.thing, began) if r["topic"].endswith("/update")]
    throttled = [r for r in updates if r["code"] == "RequestThrottled"]
    assert len(throttled) == 7
    gaps = [b["at"] - a["at"] for a, b in zip(updates, updates[1:]) if a["code"] == "RequestThrottled"]
    assert min(gaps) >= 0.45, gaps  # never sooner than half the first window (1 s), whatever the jitter
    assert "Traceback" not in device.log() and "unexpected error" not in device.log()
    # no status is left behind: the outbox is empty once the job ended
    settle(device.cloud, device.thing)
    assert device.status()["pendingStatuses"] == 0


@pytest.mark.frozen
def test_a_notify_does_not_cut_the_backoff_after_a_failed_listing_short(device):
    """The cloud throttles the job listing past the client's own retries; notifications keep
    coming meanwhile (a second job is created). The loop backs off (2 s at first) and a notify
    must not wake it early: no listing follows a throttled one within half a second."""
    began = running_and_quiet(device)
    device.cloud.jobs.inject_fault(device.thing, "get", "RequestThrottled", count=6)
    first = device.update_job()
    time.sleep(1.0)
    device.update_job()  # its notify arrives while the listing is being refused
    assert device.wait_status(first, timeout=120)["status"] == "SUCCEEDED", device.log()[-3000:]
    listings = [r for r in requests_of(device.cloud, device.thing, began) if r["topic"].endswith("/jobs/get")]
    assert sum(r["code"] == "RequestThrottled" for r in listings) == 6, listings
    gaps = [b["at"] - a["at"] for a, b in zip(listings, listings[1:]) if a["code"] == "RequestThrottled"]
    assert min(gaps) >= 0.45, gaps
    assert "Traceback" not in device.log() and "unexpected error" not in device.log()

