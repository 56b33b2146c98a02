"""End to end: the real agent process, the look-alike cloud, core updates."""
from __future__ import annotations

import subprocess

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
    device.stored(art).faults.corrupt_offset = 100
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
    assert details(ex)["rolledBack"] == "false" and details(ex)["changed"] == "true"  # not "nothing touched"
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


@pytest.mark.parametrize("arch,os_name,override,version", [("aarch64", "ubuntu", None, "1.11.6"),
                                                           ("x86_64", "ubuntu", "raspbian", "1.11.6"),
                                                           ("aarch64", "ubuntu", None, "1.11.5")])
def test_wrong_platform_is_rejected(cloud, tmp_path, arch, os_name, override, version):
    """Also for the version installed: a job for another platform is not this device's."""
    device = Device(cloud, tmp_path, ota={"operatingSystem": override} if override else None)
    try:
        art = device.release_core(version)
        cloud.publish_release(software="core", version=version, architecture=arch, operating_system=os_name,
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


def fill_disk(disk) -> None:
    """Someone else eats the rest of the disk (unbuffered: a partial write leaves nothing to flush)."""
    import os
    st = os.statvfs(disk)
    with open(disk / "filler", "wb", buffering=0) as f:
        try:
            f.write(b"\0" * (st.f_bavail * st.f_frsize))
        except OSError:
            pass


@pytest.fixture
def small_disk(make_tmpfs):
    """A real, small filesystem (tmpfs) for the device root."""
    return make_tmpfs("40m")


def test_full_disk(cloud, tmp_path, small_disk):
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
        device.stored(art).faults.throttle_bps = 3_000_000
        job = device.update_job()
        device.wait_log(f"job {job}: downloaded", timeout=30)
        fill_disk(small_disk)
        ex = device.wait_status(job)
        assert ex["status"] == "FAILED" and details(ex)["reason"] == "DISK_FULL", device.log()[-2000:]
        assert "disk filled up" in details(ex)["message"]
        assert_untouched(device, *before)
        assert not list((device.root / "ota-state/downloads").iterdir())  # the partial file is gone
        time.sleep(0.2)
    finally:
        device.stop()


# ---- the health check before the commit ---------------------------------------------------------

def health_device(cloud, tmp_path, **ota):
    settings = {"healthCheckSeconds": 3, "healthCheckTimeout": 4}
    settings.update(ota)
    device = Device(cloud, tmp_path, ota=settings)
    device.dev.lab.mkdir(parents=True, exist_ok=True)
    import subprocess
    subprocess.run([str(device.root / "ggc/core/greengrassd"), "start"], check=True)  # the old core runs
    return device


def health_script(device, body: str) -> None:
    import os
    script = device.root / "usr/scripts/ggc_health_check.sh"
    script.write_text("#!/bin/sh\n" + body + "\n")
    os.chmod(script, 0o700)


@pytest.mark.parametrize("case", ["daemon-lives", "daemon-dies", "script-passes", "script-fails", "script-hangs",
                                  pytest.param("stale-pid-file", marks=pytest.mark.frozen)])
def test_health_check_before_commit(cloud, tmp_path, case):
    pid_file = tmp_path / "greengrass.lab/greengrassd.pid"
    if case == "stale-pid-file":  # names a live process that is not the new core (a reused pid)
        pid_file = tmp_path / "stale.pid"
        other = subprocess.Popen(["sleep", "60"])
        pid_file.write_text(str(other.pid))
    device = health_device(cloud, tmp_path, corePidFile=str(pid_file))
    try:
        before = device.dev.tree_digest("ggc")
        if case == "daemon-dies":
            (device.dev.lab / "greengrassd.1.11.6.dies-after").write_text("1")
        if case.startswith("script"):
            health_script(device, {"script-passes": "exit 0", "script-fails": "echo core not ready; exit 1",
                                   "script-hangs": "sleep 100"}[case])
        device.release_core("1.11.6")
        device.start()
        ex = device.wait_status(device.update_job(), timeout=90)
        if case in ("daemon-lives", "script-passes"):
            assert ex["status"] == "SUCCEEDED", device.log()[-3000:]
            assert (device.dev.lab / "greengrassd.version").read_text().strip() == "1.11.6"
            assert details(ex)["healthCheck"] == ("pid" if case == "daemon-lives" else "script")
            out = device.run("--root", str(device.root), "--dry-run")
            assert ("OK   health check: the core daemon of" if case == "daemon-lives" else
                    "OK   health check: " + str(device.root / "usr/scripts/ggc_health_check.sh")) in out.stdout
            return
        assert ex["status"] == "FAILED", device.log()[-3000:]
        assert details(ex)["reason"] == "HEALTH_CHECK_FAILED" and details(ex)["rolledBack"] == "true"
        assert device.dev.tree_digest("ggc") == before
        assert (device.dev.lab / "greengrassd.version").read_text().strip() == "1.11.5"  # the old core runs again
        if case == "daemon-dies":
            assert "died" in details(ex)["message"]
        if case == "stale-pid-file":
            assert "a process older than the update" in details(ex)["message"]
    finally:
        device.stop()
        if case == "stale-pid-file":
            other.kill()
            other.wait()


def test_without_script_or_pid_file_the_health_check_is_skipped_with_a_warning(cloud, device):
    device.release_core("1.11.6")
    device.start()
    ex = device.wait_status(device.update_job())
    assert ex["status"] == "SUCCEEDED" and details(ex)["healthCheck"] == "skipped"
    assert "no health check: neither" in device.log()
    assert "OK   health check: skipped: neither" in device.run("--root", str(device.root), "--dry-run").stdout


def test_scripts_know_whether_they_update_or_roll_back(cloud, device):
    """GGC_OTA_ACTION says why a script runs, GGC_OTA_FROM_VERSION and GGC_OTA_TO_VERSION which
    way it moves: a rollback's scripts move from the new version back to the old."""
    device.dev.fail_script_with("ggc_post_update.sh", "1.11.6")  # the new core cannot start
    device.release_core("1.11.6")
    device.start()
    ex = device.wait_status(device.update_job())
    assert ex["status"] == "FAILED" and details(ex)["reason"] == "HOOK_FAILED", device.log()[-3000:]
    calls = [(line.split()[0], line.split("action=")[1].split()[0], line.split("moving=")[1].strip())
             for line in device.dev.hook_log().splitlines() if "action=" in line]  # the scripts, not greengrassd
    assert calls == [("ggc_pre_update.sh", "update", "1.11.5->1.11.6"),
                     ("ggc_post_update.sh", "update", "1.11.5->1.11.6"),
                     ("ggc_pre_update.sh", "rollback", "1.11.6->1.11.5"),
                     ("ggc_post_update.sh", "rollback", "1.11.6->1.11.5")], calls


@pytest.mark.parametrize("name", ["ota_pre_update.sh", "ota_post_update.sh"])
def test_a_core_update_needs_all_four_scripts(cloud, device, name):
    (device.root / "usr/scripts" / name).unlink()
    before = snapshot(device)
    device.release_core("1.11.6")
    device.start()
    ex = device.wait_status(device.update_job())
    assert ex["status"] == "FAILED" and details(ex)["reason"] == "SCRIPT_INVALID"
    assert name in details(ex)["message"] and device.dev.hook_calls() == []
    assert_untouched(device, *before)


MALFORMED = {
    "log level a list": {"updateAgentLogLevel": []},
    "log level an object": {"updateAgentLogLevel": {"a": 1}},
    "port out of range": {"artifact": {"url": "https://localhost:99999/x", "sha256": "0" * 64, "size": 1}},
    "url with a newline": {"artifact": {"url": "https://a/x\nb", "sha256": "0" * 64, "size": 1}},
    "software a list": {"softwareToUpdate": ["core"]},
    "architecture a number": {"updateTargetsArchitecture": 64},
    "size a string": {"artifact": {"url": "https://a/x", "sha256": "0" * 64, "size": "12"}},
    "version with a newline": {"version": "1.0\n"},
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_document_is_rejected_and_the_next_job_runs(cloud, device, case):
    doc = {"softwareToUpdate": "core", "version": "1.11.6", "updateTargetsArchitecture": "x86_64",
           "updateTargetsOperatingSystem": "ubuntu", "artifact": {"url": "https://a/x", "sha256": "0" * 64, "size": 1}}
    doc.update(MALFORMED[case])
    bad = "bad-" + device.thing
    cloud.create_job(bad, [cloud.thing_arn(device.thing)], doc)
    device.release_core("1.11.6")
    proc = device.start()
    good = device.update_job()
    ex = device.wait_status(bad)
    assert ex["status"] == "REJECTED" and details(ex)["reason"] == "INVALID_DOCUMENT", device.log()[-2000:]
    assert device.wait_status(good)["status"] == "SUCCEEDED"
    assert proc.poll() is None


def test_the_disk_filling_after_the_pre_update_script_still_rolls_back(cloud, tmp_path, small_disk):
    """The pre-update script has stopped the core; then the disk fills up. The rollback needs
    no room: the old tree stays, the post-update script starts the old core, FAILED DISK_FULL
    with rolledBack "true" is reported, and the agent goes on."""
    import time
    device = Device(cloud, small_disk, ota={"minFreeBytes": 0, "logFile": str(tmp_path / "agent.log")})
    device.artifacts = tmp_path
    try:
        before = snapshot(device)
        device.release_core("1.11.6", payload_bytes=1_000_000)
        device.dev.hang_script("ggc_pre_update.sh", 3)
        proc = device.start()
        job = device.update_job()
        device.wait_log("hook: running ggc_pre_update.sh", timeout=60)
        fill_disk(small_disk)
        ex = device.wait_status(job, timeout=90)
        assert ex["status"] == "FAILED" and details(ex)["reason"] == "DISK_FULL", device.log()[-3000:]
        assert details(ex)["rolledBack"] == "true"
        assert_untouched(device, *before)
        assert proc.poll() is None
        (small_disk / "filler").unlink()
        device.stop()
        connects = device.log().count("connected to")
        device.start()  # and a restart is clean
        deadline = time.monotonic() + 30
        while device.log().count("connected to") == connects:
            assert time.monotonic() < deadline and device.proc.poll() is None, device.log()[-3000:]
            time.sleep(0.1)
        assert device.status()["updateInFlight"] is None
    finally:
        device.stop()


@pytest.mark.frozen
def test_a_pre_update_script_that_says_not_now_postpones_the_update(cloud, tmp_path):
    """ggc_pre_update.sh exits 75 (EX_TEMPFAIL): nothing is touched, the job reports IN_PROGRESS
    `postponed` (with when it tries again), keeps its download, and is tried again after
    postponeSeconds, its script told GGC_OTA_ACTION=postponed-retry."""
    device = Device(cloud, tmp_path, ota={"postponeSeconds": 2})
    try:
        art = device.release_core("1.11.6")
        device.dev.fail_script("ggc_pre_update.sh", 75, once=True)
        device.start()
        job = device.update_job()
        ex = device.wait_status(job)
        assert ex["status"] == "SUCCEEDED", device.log()[-3000:]
        phases = [h["statusDetails"] for h in device.history(job) if h["status"] == "IN_PROGRESS"]
        postponed = [d for d in phases if d.get("phase") == "postponed"]
        assert len(postponed) == 1 and postponed[0]["postponements"] == "1" and postponed[0]["retryAt"].endswith("Z")
        actions = [line.split("action=")[1].split()[0] for line in device.dev.hook_log().splitlines()
                   if line.startswith("ggc_pre_update.sh")]
        assert actions == ["update", "postponed-retry"]
        assert len([r for r in device.stored(art).requests if r[1] in (200, 206)]) == 1  # downloaded once
        assert device.dev.core_version() == "1.11.6"
        assert not list((device.root / "ota-state/postponed").glob("*"))
    finally:
        device.stop()


def test_a_postponement_that_never_ends_fails_the_job_and_survives_a_restart(cloud, tmp_path):
    """At most postponeLimit postponements, counted across a restart; then FAILED
    POSTPONED_TOO_LONG, rolledBack "false", and nothing was ever touched."""
    device = Device(cloud, tmp_path, ota={"postponeSeconds": 1, "postponeLimit": 2})
    try:
        before = device.dev.tree_digest("ggc")
        device.release_core("1.11.6")
        device.dev.fail_script("ggc_pre_update.sh", 75)
        device.start()
        job = device.update_job()
        device.wait_log(f"job {job}: postponed", timeout=30)
        device.stop()  # a restart while postponed keeps the count and the download
        assert list((device.root / "ota-state/downloads").glob(f"{job}*"))
        device.start()
        ex = device.wait_status(job)
        assert ex["status"] == "FAILED" and details(ex)["reason"] == "POSTPONED_TOO_LONG", device.log()[-3000:]
        assert details(ex)["rolledBack"] == "false" and "3 times in a row" in details(ex)["message"]
        assert device.dev.tree_digest("ggc") == before
        assert set(device.dev.hook_calls()) == {"ggc_pre_update.sh"} and len(device.dev.hook_calls()) == 3
        assert not list((device.root / "ota-state/downloads").iterdir())
    finally:
        device.stop()


@pytest.mark.frozen
@pytest.mark.parametrize("reinstall", [False, True])
def test_a_job_for_the_version_installed(cloud, tmp_path, reinstall):
    """A job for the core version already installed (a fleet-wide job reaching a core that has
    it) ends SUCCEEDED at once: nothing downloaded, stopped or run, `alreadyInstalled` and
    `changed` "false" in statusDetails. reinstallSameVersion installs it again (a repair)."""
    device = Device(cloud, tmp_path, ota={"reinstallSameVersion": reinstall})
    try:
        art = device.release_core("1.11.5")  # what the device has
        before = snapshot(device)
        device.start()
        job = device.update_job()
        ex = device.wait_status(job)
        assert ex["status"] == "SUCCEEDED", device.log()[-3000:]
        fetched = [r for r in device.stored(art).requests if r[1] in (200, 206)]
        if reinstall:
            assert len(fetched) == 1 and "alreadyInstalled" not in details(ex)
            assert device.dev.hook_calls() == ["ggc_pre_update.sh", "greengrassd stop", "ggc_post_update.sh",
                                               "greengrassd start"]
        else:
            assert details(ex)["alreadyInstalled"] == "true" and details(ex)["changed"] == "false"
            assert "1.11.5 is installed already" in details(ex)["message"]
            assert fetched == [] and device.dev.hook_calls() == []
            assert_untouched(device, *before)
            assert device.status()["history"][-1]["result"] == "SUCCEEDED"
        assert device.dev.core_version() == "1.11.5"
    finally:
        device.stop()
