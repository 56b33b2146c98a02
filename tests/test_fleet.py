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
    fleet.results = {"rollout": result}


def test_after_a_broker_restart_every_core_comes_back_spread_out(fleet):
    result = fleet.broker_restart()
    assert result["stillAlive"] == CORES
    assert result["jobsRequestsPerCore"] <= 2.0  # one listing, nothing pending
    # full jitter over reconnectBaseSeconds (10 s): ten cores within 3 s would be a herd
    assert result["reconnectSeconds"]["max"] >= 3.0 and result["busiestSecondShare"] <= 0.6
    fleet.results["brokerRestart"] = result


def test_a_throttled_rollout_still_ends_and_no_retry_comes_too_soon(fleet):
    result = fleet.rollout(payload=64 * 1024, throttle=0.3)
    assert result["statuses"] == {"SUCCEEDED": CORES} and result["stillAlive"] == CORES
    assert 0.15 <= result["throttledShare"] <= 0.45 and result["retries"] > 0
    assert result["minRetryGapSeconds"] >= 0.45  # equal jitter: never sooner than half of the 1 s window
    fleet.results["throttled"] = result


def test_idle_costs_no_request_and_the_paper_figures_follow(fleet):
    result = fleet.idle(10)
    assert result["jobsRequestsPerCoreHour"] == 0 and result["cores"] == CORES
    fleet.results["idle"] = result
    paper = on_paper(fleet.results)
    share = fleet.results["brokerRestart"]["busiestSecondShare"]
    assert paper["connectsPerSecondAfterOutage"] == round(100_000 * share)
    assert paper["idleJobsRequestsPerSecond"] >= 100_000 / 3600 * 0.75  # the hourly resync, by design
