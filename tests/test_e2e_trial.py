"""End to end: a new agent that fails its trial in any way, (a) exiting at start, (b) dying of
SIGSEGV right after connecting, (c) never connecting, (d) connecting and then doing nothing,
under each way the agent is run (no init system, systemd-like, procd-like): FAILED with
rolledBack "true", the old agent file back, and the old agent running without a restart."""
from __future__ import annotations

import time

import pytest

from tests.agent_harness import Device, Supervised, alive, details
from tests.test_e2e_self_update import KINDS, MISBEHAVIOURS, publish_agent, stacked, tmpdir_t  # noqa: F401

pytestmark = [pytest.mark.e2e, pytest.mark.frozen]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("misbehaviour", list(MISBEHAVIOURS))
def test_a_new_agent_that_fails_its_trial_leaves_the_old_agent_running(cloud, tmp_path, tmpdir_t, kind,
                                                                        misbehaviour):
    device = Device(cloud, tmp_path, ota={"newAgentTimeout": 4, "scriptTimeout": 4})
    sup = Supervised(device, kind, tmpdir_t)
    try:
        before = device.dev.tree_digest("ota")
        publish_agent(device, "0.2.0", misbehaviour)
        sup.start()
        device.wait_log("connected to", timeout=30)
        sup.wait_settled(stacked(1))
        tracked = sup.main_pid()
        ex = device.wait_status(device.update_job(software="ota_agent"), timeout=90)
        assert ex["status"] == "FAILED", device.log()[-4000:]
        assert details(ex)["reason"] == MISBEHAVIOURS[misbehaviour], details(ex)
        assert details(ex)["rolledBack"] == "true"
        assert device.dev.tree_digest("ota") == before
        assert device.dev.hook_calls() == ["ota_pre_update.sh", "ota_post_update.sh"]
        sup.wait_settled(stacked(1))  # the agent on trial is gone, the old one runs
        assert sup.main_pid() == tracked and alive(tracked)
        assert sup.state().get("starts", 1) == 1  # nothing had to restart it
        rolled = device.log().split("rolling back")[-1]
        deadline = time.monotonic() + 30
        while "connected to" not in rolled:  # the old agent is back on line
            assert time.monotonic() < deadline, device.log()[-3000:]
            time.sleep(0.1)
            rolled = device.log().split("rolling back")[-1]
        if misbehaviour in ("exit1", "sleep"):
            assert "before it connected" in details(ex)["message"] or misbehaviour == "sleep"
        if misbehaviour == "segv":
            assert "after it connected" in details(ex)["message"]
    finally:
        sup.stop()
