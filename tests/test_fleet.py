"""The fleet simulation, small (ten real agents against one look-alike cloud): the smoke test of
`./build.sh bench --fleet`. It checks what must hold at any size: every core ends its update,
throttled or not; a reconnect costs one listing; the fleet comes back spread, not in one
instant; no throttled request is retried sooner than its backoff allows."""
from __future__ import annotations

import pytest

from tests.fleet import Fleet, on_paper

pytestmark = pytest.mark.e2e

CORES = 10


@pytest.fixture(scope="module")
def fleet():
    f = Fleet(CORES)
    try:
        f.start()
        yield f
    finally:
        f.stop()
        f.cleanup()


def test_a_rollout_to_a_thing_group_ends_on_every_core(fleet):
    result = fleet.rollout(payload=256 * 1024)
    assert result["statuses"] == {"SUCCEEDED": CORES} and result["stillAlive"] == CORES
    assert result["jobsRequestsPerCoreByApi"]["GetPendingJobExecutions"] == 2.0  # no listing per notification
    assert result["jobsRequestsPerCore"] <= 13


def test_after_a_broker_restart_every_core_comes_back_spread_out(fleet):
    result = fleet.broker_restart()
    assert result["stillAlive"] == CORES
    assert result["jobsRequestsPerCore"] <= 2.0  # one listing, nothing pending
    # full jitter over reconnectBaseSeconds (10 s): ten cores within 3 s would be a herd
    assert result["reconnectSeconds"]["max"] >= 3.0 and result["busiestSecondShare"] <= 0.6


def test_a_throttled_rollout_still_ends_and_no_retry_comes_too_soon(fleet):
    result = fleet.rollout(payload=64 * 1024, throttle=0.3)
    assert result["statuses"] == {"SUCCEEDED": CORES} and result["stillAlive"] == CORES
    assert 0.15 <= result["throttledShare"] <= 0.45 and result["retries"] > 0
    assert result["minRetryGapSeconds"] >= 0.45  # equal jitter: never sooner than half of the 1 s window


def test_idle_costs_no_request(fleet):
    result = fleet.idle(10)
    assert result["jobsRequestsPerCoreHour"] == 0 and result["cores"] == CORES


def test_the_paper_figures_scale_the_per_core_ones():
    """100,000 cores: the busiest second's share of the fleet, the rollout's requests per core at
    AWS's pace of 1,000 cores a minute, and the idle resync (at least the hourly one, by design)."""
    measured = {"brokerRestart": {"busiestSecondShare": 0.13},
                "rollout": {"jobsRequestsPerCore": 12.0, "jobsRequestsPerCoreByApi": {"UpdateJobExecution": 8.0,
                                                                                     "GetPendingJobExecutions": 2.0}},
                "idle": {"jobsRequestsPerCoreHour": 0.0, "bytesPerCoreHour": 288}}
    paper = on_paper(measured)
    assert paper["connectsPerSecondAfterOutage"] == 13_000 and paper["secondsToReconnectAllAtQuota"] == 200
    assert paper["jobsRequestsPerSecondInRollout"] == 200.0 and paper["busiestApiPerSecondInRollout"] == 133.3
    assert paper["idleJobsRequestsPerSecond"] == 27.8 and paper["idleBytesPerSecond"] == 8000
    measured["idle"]["jobsRequestsPerCoreHour"] = 12.0  # a 5-minute resync, as before
    assert on_paper(measured)["idleJobsRequestsPerSecond"] == 333.3
