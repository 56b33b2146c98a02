"""Agents of another journal format, both ways, against real processes: the last agent of
journal format 2 (kept, as shipped, in tests/releases/) runs the trial of this one and hands over
to it, and this agent runs the trial of that one (a downgrade): each writes the journal in the
newest format both read, and the agent on trial reports the way the agent that runs the trial
reads."""
from __future__ import annotations

import gzip

import pytest

from tests.agent_harness import Device, agent_variant, details, release_agent
from tests.conftest import REPO

pytestmark = pytest.mark.e2e
FORMAT_2 = REPO / "tests/releases/ggc-ota-journal-format-2.py.gz"


def format_2_source(tmp):
    source = tmp / "format-2-source.py"
    source.write_bytes(gzip.decompress(FORMAT_2.read_bytes()))
    assert "JOURNAL_FORMAT = 2" in source.read_text()
    return source


def test_the_agent_of_format_2_updates_to_this_one(cloud, tmp_path):
    device = Device(cloud, tmp_path, agent=agent_variant(tmp_path, "0.0.9", source=format_2_source(tmp_path)))
    try:
        release_agent(device, "0.2.0")  # this agent
        device.start()
        job = device.update_job(software="ota_agent")
        ex = device.wait_status(job)
        assert ex["status"] == "SUCCEEDED", device.log()[-4000:]
        assert device.run("--version").stdout.strip() == "ggc-ota 0.2.0"
        assert device.dev.hook_calls() == ["ota_pre_update.sh", "ota_post_update.sh"]
        assert device.status()["updateInFlight"] is None
        assert not list((device.root / "ota-state/staging").iterdir())
    finally:
        device.stop()


def test_this_agent_updates_to_the_agent_of_format_2(cloud, tmp_path):
    """A downgrade: the older agent on trial reads only formats 1 and 2."""
    device = Device(cloud, tmp_path)
    try:
        release_agent(device, "0.0.9", source=format_2_source(tmp_path))
        device.start()
        job = device.update_job(software="ota_agent")
        ex = device.wait_status(job)
        assert ex["status"] == "SUCCEEDED", device.log()[-4000:]
        assert device.run("--version").stdout.strip() == "ggc-ota 0.0.9"
        assert device.status()["updateInFlight"] is None and not (device.root / "ota-state/kept").exists()
    finally:
        device.stop()


def test_a_failed_trial_of_the_agent_of_format_2_is_reported_with_its_reason(cloud, tmp_path):
    device = Device(cloud, tmp_path)
    try:
        before = device.dev.tree_digest("ota")
        release_agent(device, "0.0.9", source=format_2_source(tmp_path))
        device.dev.fail_script("ota_post_update.sh", 3, once=True)  # the trial's run fails
        device.start()
        ex = device.wait_status(device.update_job(software="ota_agent"))
        assert ex["status"] == "FAILED" and details(ex)["reason"] == "HOOK_FAILED", device.log()[-4000:]
        assert details(ex)["rolledBack"] == "true" and device.dev.tree_digest("ota") == before
        assert device.run("--version").stdout.strip() == "ggc-ota 0.1.0"
    finally:
        device.stop()
