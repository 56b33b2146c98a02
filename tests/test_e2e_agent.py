"""End to end: the agent updates itself, as the script in the foreground (the new agent on trial
from staging, then the swap and an exec in the same process). tests/test_e2e_self_update.py
covers the binary, the init systems and the crash at each step."""
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


def test_a_journal_of_the_previous_format_is_finished(device):
    """An agent of journal format 1 swapped the new agent in and exec'd it, unproven; the new
    agent (this one) finds that journal at `swapped`, proves itself in place and commits."""
    import json
    import shutil
    new_agent = release_agent(device, "0.2.0")
    job = device.update_job(software="ota_agent")
    stage = device.root / "ota-state/staging" / job
    (stage / "old").parent.mkdir(parents=True)
    live = device.root / "ota"
    shutil.copytree(live, stage / "old", symlinks=True)  # the old tree, moved aside by the swap
    shutil.copyfile(new_agent, live / "ota_agent/ggc-ota")  # the new one in place
    ident = [live.stat().st_dev, live.stat().st_ino]
    journal = {"jobId": job, "executionNumber": 1, "software": "ota_agent", "fromVersion": "0.1.0",
               "toVersion": "0.2.0", "startedAt": 1, "live": str(live), "new": str(stage / "new"),
               "old": str(stage / "old"), "stage": str(stage), "liveId": [0, 0], "newId": ident,
               "step": "swapped", "recoveries": 0, "starts": 0, "exchange": False}
    (device.root / "ota-state/journal.json").write_text(json.dumps(journal))
    device.start()
    ex = device.wait_status(job)
    assert ex["status"] == "SUCCEEDED", device.log()[-3000:]
    assert device.dev.hook_calls() == ["ota_post_update.sh"]
    assert not stage.exists() and device.status()["updateInFlight"] is None


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
    assert "connected to" in device.log().split("rolling back")[-1]  # the old agent, back on line


def test_a_failed_exec_of_the_new_agent_rolls_back(device):
    """The new agent proved itself, the trees were swapped, and then the exec failed (ENOEXEC
    injected): rolled back, FAILED with rolledBack "true", and this agent goes on."""
    before = device.dev.tree_digest("ota")
    release_agent(device, "0.2.0")
    device.start(crash_at="before_exec:ENOEXEC")
    ex = device.wait_status(device.update_job(software="ota_agent"))
    assert ex["status"] == "FAILED" and details(ex)["reason"] == "NEW_AGENT_BROKEN", device.log()[-3000:]
    assert details(ex)["rolledBack"] == "true"
    assert device.dev.tree_digest("ota") == before
    assert device.proc is not None and device.proc.poll() is None
