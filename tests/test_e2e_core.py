"""End to end: the real agent process, the look-alike cloud, core updates."""
from __future__ import annotations

import pytest

from tests.agent_harness import Device

pytestmark = pytest.mark.e2e


@pytest.fixture
def device(cloud, tmp_path):
    d = Device(cloud, tmp_path)
    yield d
    d.stop()


def test_core_update_succeeds(device):
    kept_before = device.dev.kept_state()
    device.release_core("1.11.6")
    device.start()
    job = device.update_job()
    ex = device.wait_status(job)
    assert ex["status"] == "SUCCEEDED", device.log()[-3000:]
    assert ex["statusDetails"]["detailsMap"]["version"] == "1.11.6"
    assert device.dev.core_version() == "1.11.6"
    assert device.dev.kept_state() == kept_before
    assert device.dev.hook_calls() == ["ggc_pre_update.sh", "greengrassd stop", "ggc_post_update.sh",
                                       "greengrassd start"]
    assert (device.dev.lab / "greengrassd.version").read_text().strip() == "1.11.6"
    phases = [h["statusDetails"].get("phase") for h in device.history(job) if h["status"] == "IN_PROGRESS"]
    assert "download" in phases and phases.index("download") < phases.index("post_update")
    status = device.status()
    assert status["coreVersion"] == "1.11.6" and status["history"][-1]["result"] == "SUCCEEDED"
    assert status["updateInFlight"] is None
    assert "X-Amz-Signature" not in device.log()
