"""End to end: the agent updates itself under each way it is run (a daemon started by hand with
no init system, the shipped systemd unit, OpenWrt's procd; see tests/supervisors.py), as the
script and as the frozen binary (GGC_OTA_AGENT=dist/ggc-ota: the `frozen` subset).

The new agent is on trial under the old one before it replaces it; the replacement never nests
one process stack in another; a new agent that fails its trial in any way leaves the old agent
installed and running; a SIGKILL of every process at any moment of a self-update leaves the old
or the new tree, an agent running, and a job that ends telling the truth."""
from __future__ import annotations

import os
import signal
import time

import pytest

import ggc_ota as g
from tests.agent_harness import (
    Device,
    Supervised,
    agent_pids,
    agent_under_test,
    agent_variant,
    alive,
    details,
    extraction_usage,
)
from tests.cloud.device import build_agent_artifact

pytestmark = [pytest.mark.e2e, pytest.mark.frozen]
FROZEN = bool(os.environ.get("GGC_OTA_AGENT"))
KINDS = ["none", "systemd", "procd"]

# A new agent that passes the self-test (--version, --check-config: the real agent answers) and
# then misbehaves. It runs the real agent, which the artifact carries beside it as ggc-ota.real.
WRAPPER = '''#!/usr/bin/env python3
import os, sys, time
real = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ggc-ota.real")
mode = "{mode}"
if not ("--version" in sys.argv or "--check-config" in sys.argv or "--journal-format" in sys.argv):
    if mode == "exit1":
        sys.exit(1)
    if mode == "sleep":
        time.sleep(100000)
    os.environ["GGC_OTA_CRASH_AT"] = "new_agent_connected:" + ("SIGSEGV" if mode == "segv" else "hang")
with open(real, "rb") as f:
    frozen = f.read(4) == b"\\x7fELF"
cmd = [real] if frozen else [sys.executable, real]
os.execv(cmd[0], cmd + sys.argv[1:])
'''
MISBEHAVIOURS = {
    "exit1": "NEW_AGENT_CRASHED",         # (a) exits 1 at start
    "segv": "NEW_AGENT_CRASHED",          # (b) dies of SIGSEGV right after connecting
    "sleep": "NEW_AGENT_NO_CONNECTION",   # (c) sleeps forever without connecting
    "hang": "NEW_AGENT_TIMEOUT",          # (d) connects, then never runs ota_post_update.sh
}


def publish_agent(device: Device, version: str, misbehaviour: str = "") -> None:
    """Publish an ota_agent release: the agent under test (the script announcing `version`; the
    binary as it is, with a RELEASE file that tells the trees apart), or a misbehaving wrapper."""
    real = agent_under_test() if FROZEN else agent_variant(device.tmp, version)
    out = device.tmp / f"agent-{version}.tar.gz"
    if misbehaviour:
        wrapper = device.tmp / "wrapper"
        wrapper.write_text(WRAPPER.format(mode=misbehaviour))
        art = build_agent_artifact(out, wrapper, extra={"ggc-ota.real": real.read_bytes()})
    else:
        art = build_agent_artifact(out, real, extra={"RELEASE": version.encode()})
    device.cloud.publish_release(software="ota_agent", version=version, architecture="x86_64",
                                 operating_system="ubuntu", tarball=art.path)


def installed_release(device: Device) -> str:
    marker = device.root / "ota/ota_agent/RELEASE"
    return marker.read_text() if marker.exists() else "0.1.0"


def stacked(n: int) -> int:
    """Processes of n running agents: one each, in either form (the binary's launcher becomes the
    agent with exec; the binaries of staticx were a stack of three)."""
    return n


@pytest.fixture
def tmpdir_t(tmp_path):
    t = tmp_path / "t"
    t.mkdir()
    return t


@pytest.mark.parametrize("kind", KINDS)
def test_three_self_updates_in_a_row_leave_the_tree_of_a_fresh_start(cloud, tmp_path, tmpdir_t, kind):
    device = Device(cloud, tmp_path)
    sup = Supervised(device, kind, tmpdir_t)
    try:
        sup.start()
        device.wait_log("connected to", timeout=30)
        sup.wait_settled(stacked(1))
        fresh = (len(agent_pids(device.root)), extraction_usage(tmpdir_t))
        for i in (1, 2, 3):
            version = f"0.1.{i}"
            before = (device.agent_path.stat().st_ino, device.log().count("connected to"))
            publish_agent(device, version)
            ex = device.wait_status(device.update_job(software="ota_agent"), timeout=120)
            assert ex["status"] == "SUCCEEDED", device.log()[-4000:]
            assert details(ex)["version"] == version
            assert installed_release(device) == version and device.agent_path.stat().st_ino != before[0]
            sup.wait_settled(stacked(1))
            deadline = time.monotonic() + 30
            while device.log().count("connected to") <= before[1] + 1:  # the trial's, then the new agent's
                assert time.monotonic() < deadline, device.log()[-3000:]
                time.sleep(0.1)
            if not FROZEN:
                assert f"ggc-ota {version} starting" in device.log()
        deadline = time.monotonic() + 20
        while (len(agent_pids(device.root)), extraction_usage(tmpdir_t)) != fresh:
            assert time.monotonic() < deadline, ((len(agent_pids(device.root)), extraction_usage(tmpdir_t)), fresh)
            time.sleep(0.2)
        state = sup.state()
        if kind == "systemd":  # never restarted: it followed the PID file (binary) or kept its PID (exec)
            assert state["starts"] == 1 and state["follows"] == (3 if FROZEN else 0), state
        if kind == "procd":  # the binary in the foreground exits 75 and is respawned; the script execs
            assert state["starts"] == (4 if FROZEN else 1) and set(state["exits"]) <= {75}, state
        history = device.status()["history"]
        assert [h["result"] for h in history] == ["SUCCEEDED"] * 3
        assert device.dev.hook_calls() == ["ota_pre_update.sh", "ota_post_update.sh"] * 3
    finally:
        sup.stop()


def agent_crash_outcomes() -> dict:
    """crash point (in the old agent, or the new one on trial) -> how the job ends, from the steps
    table (see tests/test_e2e_crash.py). The binary in the foreground hands over by exiting 75,
    never by exec, and its successor starts without the test's crash setting: `before_exec` and
    `commit` are reached by the script only."""
    outcomes = {}
    for name in g.plan_of("ota_agent"):
        step = g.STEP_BY_NAME[name]
        for point in (step.name, *step.inner):
            if not (FROZEN and point in ("before_exec", "commit")):
                outcomes[point] = "FAILED" if step.after_crash == g.ROLL_BACK else "SUCCEEDED"
    return outcomes


TRIAL_STEPS = agent_crash_outcomes()
assert len(TRIAL_STEPS) >= 8 and TRIAL_STEPS["hand_over"] == "SUCCEEDED" and TRIAL_STEPS["swap"] == "FAILED"


@pytest.mark.parametrize("step", list(TRIAL_STEPS))
def test_sigkill_of_every_process_at_each_step_then_a_restart(cloud, tmp_path, tmpdir_t, step):
    """A power cut, as near as a test gets: the agent stops at `step` (crash point :hang), every
    process of the device's agents gets SIGKILL, and the init system (procd-like) starts the
    installed agent again."""
    device = Device(cloud, tmp_path)
    sup = Supervised(device, "procd", tmpdir_t, first_env={"GGC_OTA_CRASH_AT": f"{step}:hang"})
    try:
        before = device.dev.tree_digest("ota")
        publish_agent(device, "0.2.0")
        sup.start()
        job = device.update_job(software="ota_agent")
        device.wait_log(f"crash point {step}: hang", timeout=60)
        for pid in agent_pids(device.root):
            os.kill(pid, signal.SIGKILL)
        ex = device.wait_status(job, timeout=90)
        assert ex["status"] == TRIAL_STEPS[step], device.log()[-4000:]
        if TRIAL_STEPS[step] == "FAILED":
            assert device.dev.tree_digest("ota") == before and installed_release(device) == "0.1.0"
            assert details(ex)["rolledBack"] == "true"
        else:
            assert installed_release(device) == "0.2.0"
        sup.wait_settled(stacked(1))
        assert device.status()["updateInFlight"] is None
        assert not list((device.root / "ota-state/staging").iterdir())
    finally:
        sup.stop()


def test_the_daemon_as_the_unit_starts_it_lives_updates_and_stops(cloud, tmp_path, tmpdir_t):
    device = Device(cloud, tmp_path)
    sup = Supervised(device, "systemd", tmpdir_t)
    try:
        sup.start()
        main = sup.main_pid()
        device.wait_log("connected to", timeout=30)
        time.sleep(10)
        assert alive(main) and sup.main_pid() == main and sup.state()["starts"] == 1, device.log()[-3000:]
        assert "is gone; stopping" not in device.log()
        device.release_core("1.11.6")
        assert device.wait_status(device.update_job(), timeout=90)["status"] == "SUCCEEDED"
        tree = agent_pids(device.root)
        assert main in tree and len(tree) == stacked(1)
        os.kill(main, signal.SIGTERM)  # systemctl stop: SIGTERM to the PID in the PID file
        deadline = time.monotonic() + 10
        while agent_pids(device.root):
            assert time.monotonic() < deadline, "the daemon's processes did not stop within 10 s of SIGTERM"
            time.sleep(0.05)
        deadline = time.monotonic() + 5
        while sup.state().get("state") != "inactive":
            assert time.monotonic() < deadline, sup.state()
            time.sleep(0.05)
        assert sup.state()["exits"] == [0]
        assert extraction_usage(tmpdir_t) == (0, 0)
    finally:
        sup.stop()
