"""End to end: input from outside is hostile until checked. Cloud replies that name other jobs
or carry ids that are not AWS job ids, floods of notifications, signals (SIGHUP from a
logrotate, SIGTERM at any moment), a umask of 000: the agent neither crashes nor writes outside
its trees, and keeps working."""
from __future__ import annotations

import os
import signal
import stat
import subprocess
import time

import pytest

from tests.agent_harness import Device, details, device  # noqa: F401 (device is a fixture)

pytestmark = pytest.mark.e2e


def rss_kib(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def test_a_describe_reply_about_another_job_is_refused(device, cloud):
    """A reply whose jobId is `../../ggc` (or any other job than the one asked for) is refused: no
    path is built from it, nothing is deleted, and the job runs once the cloud answers right."""
    device.release_core("1.11.6")
    outside = device.root.parent / "ggc"
    outside.mkdir()
    (outside / "victim").write_text("keep me")
    cloud.jobs.inject_reply(device.thing, "describe",
                            lambda reply: {**reply, "execution": {**reply["execution"], "jobId": "../../ggc"}})
    device.start()
    ex = device.wait_status(device.update_job(), timeout=90)
    assert ex["status"] == "SUCCEEDED", device.log()[-3000:]
    assert "is about another job" in device.log()
    assert (outside / "victim").read_text() == "keep me"
    assert device.proc.poll() is None


@pytest.mark.parametrize("bad_id", ["../../ggc", "a+b", "a#b", "x\u0000y", "line\nCRITICAL forged", "j" * 65])
def test_job_ids_that_are_not_aws_job_ids_are_ignored(device, cloud, bad_id):
    device.release_core("1.11.6")
    cloud.jobs.inject_reply(device.thing, "get", lambda reply: {
        **reply, "queuedJobs": [{"jobId": bad_id, "queuedAt": 1, "executionNumber": 1}] + reply["queuedJobs"]})
    device.start()
    ex = device.wait_status(device.update_job(), timeout=90)
    assert ex["status"] == "SUCCEEDED", device.log()[-3000:]
    assert "ignoring a summary with an invalid jobId" in device.log()
    assert "\nCRITICAL forged" not in device.log()
    assert not (device.root.parent / "ggc").exists() and device.proc.poll() is None


def test_a_flood_of_notifications_is_one_pending_sync(device, cloud):
    """2000 notify messages of 90 KB each: they coalesce into one flag, the agent's memory does
    not grow with them, and it still takes the next job."""
    proc = device.start()
    device.wait_log("connected to", timeout=30)
    time.sleep(1)
    before = rss_kib(proc.pid)
    filler = {"jobs": {"QUEUED": [{"jobId": f"other-{i}", "queuedAt": 1, "executionNumber": 1}
                                  for i in range(1500)]}, "timestamp": 1}
    assert 80_000 < len(str(filler)) < 120_000
    topic = f"$aws/things/{device.thing}/jobs/notify"
    for _ in range(2000):
        cloud._publish(topic, filler)
    time.sleep(3)
    grown = rss_kib(proc.pid) - before
    assert grown < 30 * 1024, f"the agent grew by {grown} KiB"
    device.release_core("1.11.6")
    assert device.wait_status(device.update_job(), timeout=90)["status"] == "SUCCEEDED"


@pytest.mark.frozen
def test_sighup_reopens_the_log_and_the_agent_goes_on(device, tmp_path):
    """As a daemon: a logrotate-style SIGHUP to the PID file's process never stops the agent; it
    reopens the log (the agents of staticx binaries had a launcher there, which ignored it)."""
    from tests.agent_harness import Supervised, agent_pids, alive
    tmpdir = tmp_path / "t"
    tmpdir.mkdir()
    sup = Supervised(device, "none", tmpdir)
    sup.start()
    try:
        device.wait_log("connected to", timeout=30)
        top = sup.main_pid()
        os.kill(top, signal.SIGHUP)
        time.sleep(2)
        assert alive(top) and "is gone; stopping" not in device.log()
        rotated = device.log_path.with_suffix(".txt.1")
        os.replace(device.log_path, rotated)
        os.kill(int(device.status()["agentRunning"]), signal.SIGHUP)  # the agent itself
        device.wait_log("log file reopened", timeout=10)
        assert rotated.exists() and alive(top)  # the new file has the line (wait_log read it), the old one stays
        device.release_core("1.11.6")
        assert device.wait_status(device.update_job(), timeout=90)["status"] == "SUCCEEDED"
        assert len(agent_pids(device.root)) == 1  # either form: one process (the binary's launcher became it)
    finally:
        sup.stop()


def test_sigterm_storm_during_an_update_never_deadlocks(device, cloud):
    """Signals arrive while the main thread holds the MQTT client's and the queue's locks: the
    handler only writes to a pipe, so the agent stops within seconds however they land."""
    art = device.release_core("1.11.6", payload_bytes=600_000)
    device.stored(art).faults.throttle_bps = 400_000
    proc = device.start()
    device.update_job()
    device.wait_log("downloaded", timeout=30)
    for _ in range(50):
        os.kill(proc.pid, signal.SIGHUP)
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(15) == 0


def test_a_umask_of_000_leaves_no_file_writable_by_others(cloud, tmp_path):
    device = Device(cloud, tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "GGC_OTA_CRASH_AT"}
    device.proc = subprocess.Popen(device.command("--root", str(device.root), "--foreground"), env=env,
                                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   start_new_session=True, preexec_fn=lambda: os.umask(0))
    try:
        device.release_core("1.11.6")
        assert device.wait_status(device.update_job(), timeout=90)["status"] == "SUCCEEDED"
        state = device.root / "ota-state"
        deadline = time.monotonic() + 30  # the job's staging and download go just after its status
        while any(any((state / d).iterdir()) for d in ("staging", "downloads")) and time.monotonic() < deadline:
            time.sleep(0.1)
        checked = 0
        for path in [device.log_path, device.root / "ggc", *state.rglob("*"), *(device.root / "ggc").rglob("*")]:
            try:
                mode = path.lstat().st_mode
            except FileNotFoundError:
                continue  # removed by the agent since the listing (a delivered status, a temporary file): not left
            if stat.S_ISLNK(mode):
                continue  # a symlink's own mode is always 0777 on Linux, and nothing reads it
            assert not mode & stat.S_IWOTH and not (mode & stat.S_IWGRP), (path, oct(mode))
            checked += 1
        assert checked > 10
    finally:
        device.stop()


@pytest.mark.frozen
def test_sigterm_is_honoured_at_once_during_a_drip_download(device, cloud):
    """A server sending a little every few seconds: each read returns, and SIGTERM aborts the one
    under way, so the agent stops within seconds, keeping its partial file for the resume."""
    art = device.release_core("1.11.6", payload_bytes=600_000)
    device.stored(art).faults.throttle_bps = 500
    proc = device.start()
    device.update_job()
    device.wait_log("downloading", timeout=30)
    time.sleep(3)
    stopped = time.monotonic()
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(15) == 0 and time.monotonic() - stopped < 5
    assert list((device.root / "ota-state/downloads").glob("*.part"))


@pytest.mark.parametrize("problem", ["others-may-write", "a-symlink"])
def test_an_unsafe_state_directory_is_refused_at_start(cloud, tmp_path, problem):
    device = Device(cloud, tmp_path)
    state = device.root / "ota-state"
    if problem == "others-may-write":
        state.mkdir(mode=0o777)
        os.chmod(state, 0o777)
    else:
        (tmp_path / "elsewhere").mkdir(mode=0o700)
        state.symlink_to(tmp_path / "elsewhere")
    out = device.run("--root", str(device.root), "--foreground", timeout=60)
    assert out.returncode == 1 and "state directory" in out.stderr and "Traceback" not in out.stderr


def test_a_job_the_cloud_describes_oddly_does_not_hold_up_the_jobs_behind_it(device, cloud):
    """Every describe of job A names another job: A is taken up again later, with a warning,
    and job B, queued behind it, runs (A used to block the queue for good)."""
    device.release_core("1.11.6")
    first = device.update_job()
    cloud.jobs.inject_reply(device.thing, "describe", lambda reply: (
        {**reply, "execution": {**reply["execution"], "jobId": "SomeOtherJob"}}
        if reply.get("execution", {}).get("jobId") == first else reply), count=10**6)
    second = device.update_job()
    device.start()
    assert device.wait_status(second, timeout=90)["status"] == "SUCCEEDED", device.log()[-3000:]
    # both were queued in the same second, so B may have been taken first: A's warning may come after
    device.wait_log(f"the reply to describing job {first} is about another job; taking the next job", timeout=30)
    assert device.execution(first)["status"] == "QUEUED" and device.proc.poll() is None


@pytest.mark.parametrize("number", [[1], "1", True, 0, None])
def test_a_summary_with_an_odd_execution_number_is_skipped(device, cloud, number):
    """`"executionNumber": [1]` in a summary (or in a notify) made every sync fail: such a summary
    is skipped with a warning, and the jobs behind it run."""
    device.release_core("1.11.6")
    cloud.jobs.inject_reply(device.thing, "get", lambda reply: {
        **reply, "queuedJobs": [{"jobId": "OddJob", "queuedAt": 1, "executionNumber": number}] + reply["queuedJobs"]},
        count=10**6)
    device.start()
    device.wait_log("connected to", timeout=30)
    odd = {"jobId": "OddJob", "queuedAt": 1, "executionNumber": number}
    cloud._publish(f"$aws/things/{device.thing}/jobs/notify", {"timestamp": 1, "jobs": {"QUEUED": [odd]}})
    job = device.update_job()
    assert device.wait_status(job, timeout=90)["status"] == "SUCCEEDED", device.log()[-3000:]
    assert "ignoring job OddJob: its summary has no valid executionNumber" in device.log()
    assert device.proc.poll() is None
