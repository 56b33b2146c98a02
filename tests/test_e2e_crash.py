"""Kill the agent at every journaled step of a core update (os._exit through the crash-point
switch, and real SIGKILLs), restart it, and check: the root holds the whole old or the whole new
ggc/, kept state is intact, the scripts leave the right software running, and the job ends in a
terminal status that tells the truth."""
from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

import ggc_ota as g
from tests.agent_harness import Device, details

pytestmark = pytest.mark.e2e

def core_crash_outcomes() -> dict:
    """crash point -> (how the job ends, the core version after recovery), from the steps table:
    before the journal the job is taken again; from a step that rolls back, FAILED and the old
    core; from one that rolls forward, SUCCEEDED. The crash points inside a rollback need a
    failure first (test_crash_during_rollback_is_finished_on_restart)."""
    outcomes = {point: ("SUCCEEDED", "1.11.6") for point in g.BEFORE_JOURNAL}
    for name in g.plan_of("core"):
        step = g.STEP_BY_NAME[name]
        for point in (step.name, *step.inner):
            outcomes[point] = ("FAILED", "1.11.5") if step.after_crash == g.ROLL_BACK else ("SUCCEEDED", "1.11.6")
    return outcomes


CORE_STEPS = core_crash_outcomes()
assert len(CORE_STEPS) >= 10 and CORE_STEPS["commit"][0] == "SUCCEEDED" and CORE_STEPS["post_update"][0] == "FAILED"


@pytest.mark.frozen
@pytest.mark.parametrize("step", list(CORE_STEPS))
def test_crash_at_each_step_then_restart(cloud, tmp_path, step):
    device = Device(cloud, tmp_path)
    try:
        kept = device.dev.kept_state()
        old_tree = device.dev.tree_digest("ggc")
        device.release_core("1.11.6")
        device.start(crash_at=step)
        job = device.update_job()
        assert device.wait_exit(60) == 99, device.log()[-3000:]
        device.start()
        final, version = CORE_STEPS[step]
        ex = device.wait_status(job)
        detail = ex["statusDetails"]["detailsMap"]
        assert ex["status"] == final, device.log()[-3000:]
        assert device.dev.core_version() == version
        assert device.dev.kept_state() == kept
        if version == "1.11.5":
            assert device.dev.tree_digest("ggc") == old_tree
            assert detail["reason"] == "INTERRUPTED" and detail["rolledBack"] == "true"
        # the software that is installed is the one left running
        assert (device.dev.lab / "greengrassd.version").read_text().strip() == version
        status = device.status()
        assert status["updateInFlight"] is None and status["history"][-1]["result"] == final
        assert not list((device.root / "ota-state/staging").iterdir())
    finally:
        device.stop()


def test_crash_during_rollback_is_finished_on_restart(cloud, tmp_path):
    device = Device(cloud, tmp_path)
    try:
        old_tree = device.dev.tree_digest("ggc")
        device.release_core("1.11.6")
        device.dev.fail_script("ggc_post_update.sh", 2, once=True)
        device.start(crash_at="mid_restore")
        job = device.update_job()
        assert device.wait_exit(60) == 99
        device.start()
        ex = device.wait_status(job)
        assert ex["status"] == "FAILED" and ex["statusDetails"]["detailsMap"]["reason"] == "HOOK_FAILED"
        assert device.dev.tree_digest("ggc") == old_tree
    finally:
        device.stop()


@pytest.mark.frozen
def test_sigkill_mid_download_resumes(cloud, tmp_path):
    device = Device(cloud, tmp_path)
    try:
        art = device.release_core("1.11.6", payload_bytes=1_500_000)
        obj = device.stored(art)
        obj.faults.throttle_bps = 1_000_000
        device.start()
        job = device.update_job()
        device.wait_log("downloaded", timeout=30)
        time.sleep(0.5)
        device.kill9()
        obj.faults.throttle_bps = None
        device.start()
        assert device.wait_status(job)["status"] == "SUCCEEDED"
        ranges = [r for r, status in obj.requests if status == 206]
        assert ranges, obj.requests  # the second agent resumed the partial file
    finally:
        device.stop()


def digest(tree, as_recorded=None) -> list:
    """The content of a tree (or of a tree_digest record of it), by relative path."""
    if as_recorded is not None:
        prefix = tree.name + "/"
        return sorted((k.split("/", 1)[1], v) for k, v in as_recorded.items() if k.startswith(prefix))
    import hashlib
    return sorted((str(p.relative_to(tree)), "dir" if p.is_dir() and not p.is_symlink() else
                   "link:" + str(p.readlink()) if p.is_symlink() else hashlib.sha256(p.read_bytes()).hexdigest())
                  for p in tree.rglob("*"))


def restart_with_a_planted_journal(device, step: str, corrupt) -> tuple:
    """Crash a core update at `step`, rewrite its journal with `corrupt`, start the agent again:
    the job must end FAILED JOURNAL_CORRUPT. Returns (the execution, the live tree as it was)."""
    device.release_core("1.11.6")
    device.start(crash_at=step)
    job = device.update_job()
    assert device.wait_exit(60) == 99, device.log()[-3000:]
    journal = device.root / "ota-state/journal.json"
    journal.write_bytes(corrupt(journal.read_bytes()))
    live = device.dev.tree_digest("ggc")
    device.start()
    ex = device.wait_status(job)
    assert ex["status"] == "FAILED" and details(ex)["reason"] == "JOURNAL_CORRUPT", device.log()[-3000:]
    return ex, live


CORRUPTIONS = {
    "empty": lambda raw: b"",
    "truncated": lambda raw: raw[:len(raw) // 2],
    "garbage": lambda raw: b"\x00\xff not json at all",
    "not an object": lambda raw: b"[1, 2, 3]",
    "keys missing": lambda raw: b'{"jobId": "x"}',
}


@pytest.mark.parametrize("step", ["keep", "post_update", "health_check"])
@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_an_unreadable_journal_deletes_nothing(cloud, tmp_path, step, corruption):
    """Nothing is deleted on doubt: with the journal unreadable, the live tree stays as the crash
    left it, the staged trees (the old one among them, after the swap) are kept, the live core
    is started, and the job ends FAILED JOURNAL_CORRUPT."""
    device = Device(cloud, tmp_path)
    try:
        old_tree = device.dev.tree_digest("ggc")
        ex, live = restart_with_a_planted_journal(device, step, CORRUPTIONS[corruption])
        assert details(ex)["rolledBack"] == "false" and "kept in" in details(ex)["message"]
        assert device.dev.tree_digest("ggc") == live
        kept = list((device.root / "ota-state/kept").iterdir())
        assert len(kept) == 1
        if step == "keep":  # not swapped yet: the old tree is live, the new one kept
            assert live == old_tree and (kept[0] / "new").is_dir()
        else:  # swapped: the new tree is live, and the old one, kept, is whole
            assert live != old_tree and digest(kept[0] / "old") == digest(device.root / "ggc", old_tree)
        assert list((device.root / "ota-state").glob("journal.json.corrupt-*"))
        version = device.dev.core_version()
        assert (device.dev.lab / "greengrassd.version").read_text().strip() == version  # the live core runs
        assert device.proc.poll() is None and device.status()["updateInFlight"] is None
    finally:
        device.stop()


@pytest.mark.frozen
def test_a_boot_that_started_the_new_core_before_recovery_ends_with_the_old_core_running(cloud, tmp_path):
    """A power cut right after the swap, then a boot: the boot starts whatever core ggc/ holds
    (the new one) before the agent recovers. The rollback must stop it before it restores the
    old tree, or the old core's start finds it running and the new core runs on from a deleted
    tree (found by the power-cut sweep, core update, cut at step swapping)."""
    device = Device(cloud, tmp_path)
    try:
        device.release_core("1.11.6")
        device.start(crash_at="swap")  # the journal says swap, the trees not yet swapped
        job = device.update_job()
        assert device.wait_exit(60) == 99, device.log()[-3000:]
        # as a cut right after the swap's renames leaves it: the new tree live, the journal at "swap"
        journal = json.loads((device.root / "ota-state/journal.json").read_text())
        os.rename(journal["live"], journal["old"])
        os.rename(journal["new"], journal["live"])
        assert device.dev.core_version() == "1.11.6"
        # the boot: the core of whatever ggc/ holds starts, then the agent
        subprocess.run([str(device.root / "ggc/core/greengrassd"), "start"], check=True, timeout=30)
        assert (device.dev.lab / "greengrassd.version").read_text().strip() == "1.11.6"
        device.start()
        ex = device.wait_status(job)
        assert ex["status"] == "FAILED" and details(ex)["rolledBack"] == "true", device.log()[-3000:]
        assert device.dev.core_version() == "1.11.5"
        assert (device.dev.lab / "greengrassd.version").read_text().strip() == "1.11.5"
        pid = int((device.dev.lab / "greengrassd.pid").read_text())
        os.kill(pid, 0)
    finally:
        device.stop()


@pytest.mark.frozen
def test_a_download_left_by_a_power_cut_after_the_job_ended_is_removed_at_start(cloud, tmp_path):
    """The last step of an update removes its download without a sync; a power cut can bring it
    back. At start the agent removes the download of every job its history says has ended
    (found by the power-cut sweep, self-update, strict model, cut at the last operation)."""
    device = Device(cloud, tmp_path)
    try:
        device.release_core("1.11.6")
        device.start()
        job = device.update_job()
        assert device.wait_status(job)["status"] == "SUCCEEDED"
        device.stop()
        left = device.root / f"ota-state/downloads/{job}.tar.gz"
        left.write_bytes(b"what a power cut brought back")
        other = "OtherJob-" + device.thing
        cloud.jobs.create_job(other, [device.thing], {"operation": "reboot"})  # pending, not ours
        unrelated = device.root / f"ota-state/downloads/{other}.tar.gz.part"
        unrelated.write_bytes(b"a download to resume")  # a job still pending keeps what it has
        device.start()
        device.wait_log(f"removing the download of job {job}, which has ended")
        device.wait_log("connected to")
        time.sleep(1)  # the listing after the connect keeps a pending job's download
        assert not left.exists() and unrelated.exists()
    finally:
        device.stop()


def lie(change):
    def corrupt(raw: bytes) -> bytes:
        journal = json.loads(raw)
        change(journal)
        return json.dumps(journal).encode()
    return corrupt


LIES = {
    "live outside the root": lie(lambda j: j.update(live="/etc")),
    "stage elsewhere": lie(lambda j: j.update(stage="/", new="/new", old="/old")),
    "a number as a path": lie(lambda j: j.update(live=5)),
    "an unknown field": lie(lambda j: j.update(program="/bin/sh")),
    "a reason that is no code": lie(lambda j: j.update(reason="rm -rf /")),
    "a newer format": lie(lambda j: j.update(format=99)),
}


@pytest.mark.parametrize("lie_name", [pytest.param(name, marks=pytest.mark.frozen) if name == "live outside the root"
                                      else name for name in LIES])
def test_a_journal_that_lies_is_handled_as_a_corrupt_one(cloud, tmp_path, lie_name):
    """A journal is trusted whole or not at all: a planted one that names paths outside the
    root's trees and this job's staging, has fields of the wrong type or unknown ones, a reason
    that is no code, or a newer format, removes and runs nothing: JOURNAL_CORRUPT, both trees
    kept, the live core started."""
    device = Device(cloud, tmp_path)
    try:
        ex, live = restart_with_a_planted_journal(device, "post_update", LIES[lie_name])
        assert device.dev.tree_digest("ggc") == live
        assert len(list((device.root / "ota-state/kept").iterdir())) == 1
        if lie_name == "a newer format":
            assert "written by a newer agent" in device.log()
        assert device.proc.poll() is None
    finally:
        device.stop()
