"""End to end: the agent updates itself (R3): run the new agent from staging first, swap,
exec it in the same process, confirm or roll back."""
from __future__ import annotations

import pytest

from tests.agent_harness import Device, details, device, release_agent  # noqa: F401 (device is a fixture)

pytestmark = pytest.mark.e2e


def test_self_update_succeeds_in_the_same_process(device):
    release_agent(device, "0.2.0")
    proc = device.start()
    job = device.update_job(software="ota_agent")
    ex = device.wait_status(job)
    assert ex["status"] == "SUCCEEDED", device.log()[-3000:]
    assert details(ex)["version"] == "0.2.0"
    assert proc.poll() is None and device.proc is proc  # same PID: exec, not exit
    assert "ggc-ota 0.2.0 starting" in device.log()
    assert device.run("--version").stdout.strip() == "ggc-ota 0.2.0"
    assert device.dev.hook_calls() == ["ota_pre_update.sh", "ota_post_update.sh"]
    status = device.status()
    assert status["agentVersion"] == "0.2.0" and status["history"][-1]["result"] == "SUCCEEDED"
    assert status["updateInFlight"] is None


def test_new_agent_that_cannot_start_is_refused_before_the_swap(device):
    before = device.dev.tree_digest("ota")
    release_agent(device, "0.2.0", broken="version")
    device.start()
    ex = device.wait_status(device.update_job(software="ota_agent"))
    assert ex["status"] == "FAILED" and details(ex)["reason"] == "NEW_AGENT_BROKEN"
    assert device.dev.tree_digest("ota") == before and device.dev.hook_calls() == []


def test_new_agent_crash_loop_is_rolled_back(device):
    """The new agent starts but dies every time (as under Restart=on-failure): after two starts
    the third restores the old agent, runs ota_post_update.sh and execs it; it reports FAILED."""
    before = device.dev.tree_digest("ota")
    release_agent(device, "0.2.0")
    device.start(crash_at="trial_started")
    job = device.update_job(software="ota_agent")
    assert device.wait_exit(60) == 99, device.log()[-3000:]  # first start of the new agent
    device.start(crash_at="trial_started")
    assert device.wait_exit(60) == 99  # second
    device.start(crash_at="trial_started")  # third: rolled back
    ex = device.wait_status(job)
    assert ex["status"] == "FAILED" and details(ex)["reason"] == "NEW_AGENT_CRASHED"
    assert details(ex)["rolledBack"] == "true"
    assert device.dev.tree_digest("ota") == before
    assert device.run("--version").stdout.strip() == "ggc-ota 0.1.0"
    assert device.dev.hook_calls() == ["ota_pre_update.sh", "ota_post_update.sh"]


def test_new_agent_that_never_connects_is_rolled_back(cloud, tmp_path):
    device = Device(cloud, tmp_path, ota={"newAgentTimeout": 3})
    try:
        before = device.dev.tree_digest("ota")
        release_agent(device, "0.2.0", broken="connect")
        proc = device.start()
        ex = device.wait_status(device.update_job(software="ota_agent"))
        assert ex["status"] == "FAILED" and details(ex)["reason"] == "NEW_AGENT_NO_CONNECTION"
        assert device.dev.tree_digest("ota") == before and proc.poll() is None
        assert device.run("--version").stdout.strip() == "ggc-ota 0.1.0"
    finally:
        device.stop()


def test_failing_ota_post_update_rolls_back(device):
    before = device.dev.tree_digest("ota")
    release_agent(device, "0.2.0")
    device.dev.fail_script("ota_post_update.sh", 9, once=True)
    proc = device.start()
    ex = device.wait_status(device.update_job(software="ota_agent"))
    assert ex["status"] == "FAILED" and details(ex)["reason"] == "HOOK_FAILED"
    assert details(ex)["rolledBack"] == "true"
    assert device.dev.tree_digest("ota") == before and proc.poll() is None
    assert device.dev.hook_calls() == ["ota_pre_update.sh", "ota_post_update.sh", "ota_post_update.sh"]
    assert "ggc-ota 0.1.0 starting" in device.log().split("rolling back")[-1]


# step -> final status, the agent version left installed
AGENT_STEPS = {
    "after_pre_update": ("FAILED", "0.1.0"),
    "swap_started": ("FAILED", "0.1.0"),
    "mid_swap": ("FAILED", "0.1.0"),
    "after_swap": ("SUCCEEDED", "0.2.0"),    # the new agent in place: it is tried, and passes
    "before_exec": ("SUCCEEDED", "0.2.0"),
}


@pytest.mark.parametrize("step", list(AGENT_STEPS))
def test_crash_at_each_self_update_step(cloud, tmp_path, step):
    device = Device(cloud, tmp_path)
    try:
        before = device.dev.tree_digest("ota")
        release_agent(device, "0.2.0")
        device.start(crash_at=step)
        job = device.update_job(software="ota_agent")
        assert device.wait_exit(60) == 99, device.log()[-3000:]
        device.start()  # the supervisor starts whatever agent is installed now
        final, version = AGENT_STEPS[step]
        ex = device.wait_status(job)
        assert ex["status"] == final, device.log()[-3000:]
        assert device.run("--version").stdout.strip() == f"ggc-ota {version}"
        if version == "0.1.0":
            assert device.dev.tree_digest("ota") == before
            assert details(ex)["rolledBack"] == "true"
        assert device.status()["updateInFlight"] is None
    finally:
        device.stop()
