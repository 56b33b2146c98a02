"""End to end: the real agent process, the look-alike cloud, core updates."""
from __future__ import annotations

import pytest

from tests.agent_harness import Device, details, device  # noqa: F401 (device is a fixture)

pytestmark = pytest.mark.e2e


@pytest.mark.frozen
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


def assert_untouched(device, before_tree, before_kept):
    assert device.dev.tree_digest("ggc") == before_tree
    assert device.dev.kept_state() == before_kept


def snapshot(device):
    return device.dev.tree_digest("ggc"), device.dev.kept_state()


@pytest.mark.frozen
def test_wrong_hash_fails_and_touches_nothing(cloud, device):
    art = device.release_core("1.11.6")
    key = next(r.key for r in cloud.greengrass.releases if r.sha256 == art.sha256)
    cloud.store.faults("greengrass-updates", key).corrupt_offset = 100
    before = snapshot(device)
    device.start()
    ex = device.wait_status(device.update_job())
    assert ex["status"] == "FAILED" and details(ex)["reason"] == "HASH_MISMATCH"
    assert details(ex)["rolledBack"] == "false"
    assert device.dev.hook_calls() == []
    assert_untouched(device, *before)


@pytest.mark.parametrize("script,how,reason,calls", [
    ("ggc_pre_update.sh", "fail", "HOOK_FAILED",
     ["ggc_pre_update.sh", "ggc_post_update.sh", "greengrassd start"]),
    ("ggc_pre_update.sh", "hang", "HOOK_TIMEOUT",
     ["ggc_pre_update.sh", "ggc_post_update.sh", "greengrassd start"]),
    # a failed post-update step may have started the new software: it is stopped before the restore
    ("ggc_post_update.sh", "fail-once", "HOOK_FAILED",
     ["ggc_pre_update.sh", "greengrassd stop", "ggc_post_update.sh", "ggc_pre_update.sh", "greengrassd stop",
      "ggc_post_update.sh", "greengrassd start"]),
    ("ggc_post_update.sh", "hang-once", "HOOK_TIMEOUT",
     ["ggc_pre_update.sh", "greengrassd stop", "ggc_post_update.sh", "ggc_pre_update.sh", "greengrassd stop",
      "ggc_post_update.sh", "greengrassd start"]),
])
@pytest.mark.frozen
def test_script_failure_rolls_back(cloud, tmp_path, script, how, reason, calls):
    device = Device(cloud, tmp_path, ota={"scriptTimeout": 1.5})
    try:
        before = snapshot(device)
        device.release_core("1.11.6")
        if how == "fail":
            device.dev.fail_script(script, 3)
        elif how == "fail-once":
            device.dev.fail_script(script, 4, once=True)
        elif how == "hang":
            device.dev.hang_script(script, 30)
        else:  # the first call hangs, the rollback's call does not
            lab = device.dev.lab
            (lab / f"{script}.hang").write_text("30")
            wrapper = device.root / "usr/scripts" / script
            text = wrapper.read_text().replace(
                'if [ -f "$lab/$name.hang" ]; then sleep "$(cat "$lab/$name.hang")"; fi',
                'if [ -f "$lab/$name.hang" ]; then t=$(cat "$lab/$name.hang"); rm -f "$lab/$name.hang"; sleep "$t"; fi')
            wrapper.write_text(text)
        device.start()
        ex = device.wait_status(device.update_job())
        assert ex["status"] == "FAILED", device.log()[-3000:]
        assert details(ex)["reason"] == reason and details(ex)["rolledBack"] == "true"
        assert device.dev.core_version() == "1.11.5"
        assert_untouched(device, *before)
        assert device.dev.hook_calls() == calls
        assert (device.dev.lab / "greengrassd.version").read_text().strip() == "1.11.5"
        assert device.status()["history"][-1]["reason"] == reason
    finally:
        device.stop()


def test_rollback_that_fails_is_reported_and_not_looped(cloud, device):
    device.release_core("1.11.6")
    device.dev.fail_script("ggc_post_update.sh", 5)
    device.start()
    ex = device.wait_status(device.update_job())
    assert ex["status"] == "FAILED" and details(ex)["reason"] == "ROLLBACK_FAILED"
    assert details(ex)["rolledBack"] == "false"
    assert device.dev.core_version() == "1.11.5"  # the old tree is back even so
    assert "ROLLBACK FAILED" in device.log()
    assert device.dev.hook_calls().count("ggc_post_update.sh") == 2


@pytest.mark.parametrize("problem", ["missing", "group-writable", "other-executable", "not-root-dir"])
def test_missing_or_unsafe_script_touches_nothing(cloud, device, problem):
    import os
    script = device.root / "usr/scripts/ggc_post_update.sh"
    if problem == "missing":
        script.unlink()
    elif problem == "group-writable":
        os.chmod(script, 0o720)
    elif problem == "other-executable":
        os.chmod(script, 0o701)
    else:
        os.chmod(script.parent, 0o777)
    before = snapshot(device)
    device.release_core("1.11.6")
    device.start()
    ex = device.wait_status(device.update_job())
    assert ex["status"] == "FAILED" and details(ex)["reason"] == "SCRIPT_INVALID"
    assert device.dev.hook_calls() == []
    assert_untouched(device, *before)


@pytest.mark.frozen
def test_foreign_job_is_left_alone(cloud, device):
    foreign = "reboot-" + device.thing
    cloud.create_job(foreign, [cloud.thing_arn(device.thing)], {"operation": "reboot"})
    device.release_core("1.11.6")
    device.start()
    job = device.update_job()
    assert device.wait_status(job)["status"] == "SUCCEEDED"
    ex = device.execution(foreign)
    assert ex["status"] == "QUEUED" and ex["versionNumber"] == 1
    assert [h["source"] for h in device.history(foreign)] == ["create"]


@pytest.mark.parametrize("arch,os_name,override", [("aarch64", "ubuntu", None), ("x86_64", "ubuntu", "raspbian")])
def test_wrong_platform_is_rejected(cloud, tmp_path, arch, os_name, override):
    device = Device(cloud, tmp_path, ota={"operatingSystem": override} if override else None)
    try:
        art = device.release_core("1.11.6")
        cloud.publish_release(software="core", version="1.11.6", architecture=arch, operating_system=os_name,
                              tarball=art.path)
        before = snapshot(device)
        seen = len(cloud.store.log)
        device.start()
        ex = device.wait_status(device.update_job(arch=arch, os_name=os_name))
        assert ex["status"] == "REJECTED" and details(ex)["reason"] == "PLATFORM_MISMATCH"
        assert device.dev.hook_calls() == []
        assert_untouched(device, *before)
        assert cloud.store.log[seen:] == []  # rejected before anything was downloaded
    finally:
        device.stop()


def test_job_queued_while_agent_was_down(cloud, device):
    device.release_core("1.11.6")
    job = device.update_job()
    device.start()
    assert device.wait_status(job)["status"] == "SUCCEEDED"


def test_duplicate_notifications_run_scripts_once(cloud, device):
    device.release_core("1.11.6")
    device.start()
    job = device.update_job()
    assert device.wait_status(job)["status"] == "SUCCEEDED"
    summary = {"jobId": job, "queuedAt": 1, "lastUpdatedAt": 1, "versionNumber": 1, "executionNumber": 1}
    for _ in range(3):  # the same notification again, and again
        cloud._publish(f"$aws/things/{device.thing}/jobs/notify", {"timestamp": 1, "jobs": {"QUEUED": [summary]}})
    device.stop()
    device.start()  # and a restart, which lists and describes again
    device.wait_log("connected to", timeout=20)
    import time
    time.sleep(1.5)
    assert device.dev.hook_calls().count("ggc_pre_update.sh") == 1
    assert [h["status"] for h in device.history(job)].count("SUCCEEDED") == 1


def test_managed_respawn_false_uses_greengrassd(cloud, tmp_path):
    device = Device(cloud, tmp_path, managed_respawn=False, form="legacy")
    try:
        device.release_core("1.11.6")
        device.start()
        assert device.wait_status(device.update_job())["status"] == "SUCCEEDED"
        assert device.dev.hook_calls() == ["greengrassd stop", "greengrassd start"]
        assert (device.dev.lab / "greengrassd.version").read_text().strip() == "1.11.6"
    finally:
        device.stop()


def test_hostile_archive_touches_nothing(cloud, device, tmp_path):
    import tarfile

    from tests.cloud.device import build_raw_artifact
    info = tarfile.TarInfo("greengrass/ggc/../../../escaped")
    art = build_raw_artifact(tmp_path / "evil.tar.gz", [(info, b"pwned")])
    cloud.publish_release(software="core", version="6.6.6", architecture="x86_64", operating_system="ubuntu",
                          tarball=art.path)
    before = snapshot(device)
    device.start()
    ex = device.wait_status(device.update_job())
    assert ex["status"] == "FAILED" and details(ex)["reason"] == "UNSAFE_ARCHIVE"
    assert_untouched(device, *before)
    assert not list(tmp_path.parent.rglob("escaped"))


def test_disk_floor(cloud, tmp_path):
    device = Device(cloud, tmp_path, ota={"minFreeBytes": 10 ** 15})
    try:
        device.release_core("1.11.6")
        before = snapshot(device)
        device.start()
        ex = device.wait_status(device.update_job())
        assert ex["status"] == "FAILED" and details(ex)["reason"] == "DISK_FULL"
        assert_untouched(device, *before)
    finally:
        device.stop()


def test_invalid_document_is_rejected(cloud, device):
    job = "bad-doc-" + device.thing
    cloud.create_job(job, [cloud.thing_arn(device.thing)],
                     {"softwareToUpdate": "core", "version": "1.11.6", "updateTargetsArchitecture": "x86_64",
                      "updateTargetsOperatingSystem": "ubuntu", "artifact": {"url": "http://insecure/x",
                                                                              "sha256": "0" * 64, "size": 1}})
    device.start()
    ex = device.wait_status(job)
    assert ex["status"] == "REJECTED" and details(ex)["reason"] == "INVALID_DOCUMENT"


@pytest.fixture
def small_disk(make_tmpfs):
    """A real, small filesystem (tmpfs) for the device root."""
    return make_tmpfs("40m")


def test_full_disk(cloud, tmp_path, small_disk):
    import os
    import time
    device = Device(cloud, small_disk, ota={"minFreeBytes": 0, "logFile": str(tmp_path / "agent.log")})
    device.artifacts = tmp_path
    try:
        before = snapshot(device)
        device.release_core("1.11.7", payload_bytes=60 * 1024 * 1024)  # can never fit: refused by the check
        device.start()
        ex = device.wait_status(device.update_job())
        assert ex["status"] == "FAILED" and details(ex)["reason"] == "DISK_FULL"
        assert "MiB free" in details(ex)["message"]

        art = device.release_core("1.11.8", payload_bytes=6 * 1024 * 1024)  # fits, until the disk fills up
        key = next(r.key for r in cloud.greengrass.releases if r.sha256 == art.sha256)
        cloud.store.objects[f"greengrass-updates/{key}"].faults.throttle_bps = 3_000_000
        job = device.update_job()
        device.wait_log(f"job {job}: downloaded", timeout=30)
        st = os.statvfs(small_disk)
        with open(small_disk / "filler", "wb") as f:  # someone else eats the rest of the disk
            try:
                f.write(b"\0" * (st.f_bavail * st.f_frsize))
            except OSError:
                pass
        ex = device.wait_status(job)
        assert ex["status"] == "FAILED" and details(ex)["reason"] == "DISK_FULL", device.log()[-2000:]
        assert "disk filled up" in details(ex)["message"]
        assert_untouched(device, *before)
        assert not list((device.root / "ota-state/downloads").iterdir())  # the partial file is gone
        time.sleep(0.2)
    finally:
        device.stop()
