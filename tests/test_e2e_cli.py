"""End to end: the command line: one agent per root, dry-run (preflight and rehearsal),
--status, daemon mode as systemd's Type=forking drives it, exit codes."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time

import pytest

from tests.agent_harness import Device, details, device  # noqa: F401 (device is a fixture)
from tests.cloud import Pki
from tests.cloud.device import build_core_artifact

pytestmark = pytest.mark.e2e


def test_version(device):
    out = device.run("--version")
    assert out.returncode == 0 and out.stdout.startswith("ggc-ota ")


@pytest.mark.frozen
def test_two_agents_on_one_root(device):
    device.start()
    device.wait_log("connected to", timeout=20)
    started = time.monotonic()
    second = device.run("--root", str(device.root), "--foreground", timeout=60)
    assert second.returncode == 3 and "another agent" in second.stderr
    assert time.monotonic() - started >= 14  # it waited for the holder to stop, 15 s, then gave up
    assert device.proc.poll() is None


@pytest.mark.frozen
def test_a_start_waits_for_the_agent_that_is_still_stopping(device):
    """An init system's restart, or a respawn after a launcher died, can start the agent while
    the previous one still holds the lock: the new one waits for it instead of exiting 3."""
    import fcntl
    device.state_dir = device.root / "ota-state"
    device.state_dir.mkdir(exist_ok=True)
    fd = os.open(device.state_dir / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, b"4242")
    try:
        proc = device.start()
        device.wait_log("waiting up to 15 s for the agent that holds the lock (pid 4242) to stop", timeout=30)
        time.sleep(2)
        assert proc.poll() is None and "connected to" not in device.log()
    finally:
        os.close(fd)  # the previous agent is gone
    device.wait_log("connected to", timeout=30)
    assert proc.poll() is None


@pytest.mark.skipif(bool(os.environ.get("GGC_OTA_AGENT")), reason="the script form only (a binary is precompiled)")
def test_script_agent_restarts_once_without_its_syntax_tree(device):
    """`python3 ggc-ota` keeps the script's syntax tree for as long as it runs: the agent
    execs, once, into an interpreter that compiled the file with compile() (same PID); what
    it starts does not inherit the marker, so a new agent does the same."""
    import ggc_ota as g
    proc = device.start()
    device.wait_log("connected to", timeout=20)
    cmdline = open(f"/proc/{proc.pid}/cmdline", "rb").read().split(b"\0")
    assert cmdline[1:4] == [b"-c", g.SCRIPT_LOADER.encode(), str(device.agent_path).encode()]
    assert cmdline[4:6] == [b"--root", str(device.root).encode()]
    environ = open(f"/proc/{proc.pid}/environ", "rb").read().split(b"\0")
    assert f"{g.FRESH_ENV}=1".encode() in environ
    assert device.log().count("starting for") == 1  # the restart happens before the agent starts
    os.environ[g.FRESH_ENV] = "1"
    try:
        assert g.FRESH_ENV not in g.child_environment()
    finally:
        del os.environ[g.FRESH_ENV]


def test_usage_errors_exit_2(device):
    assert device.run("--bogus").returncode == 2
    assert device.run("--root", str(device.root), "--artifact", "x").returncode == 2


@pytest.mark.frozen
def test_dry_run_good_root(device):
    out = device.run("--root", str(device.root), "--dry-run")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "OK   credentials" in out.stdout and "OK   script ggc_pre_update.sh" in out.stdout
    as_json = json.loads(device.run("--root", str(device.root), "--dry-run", "--json").stdout)
    assert as_json["ok"] is True and {c["name"] for c in as_json["checks"]} >= {"config", "credentials", "disk",
                                                                                "platform", "agent"}


@pytest.mark.frozen
def test_dry_run_cert_key_mismatch(device, tmp_path):
    other = Pki(tmp_path / "other").client("someone-else")
    (device.root / f"certs/{device.thing}.private.key").write_bytes(other.key.read_bytes())
    out = device.run("--root", str(device.root), "--dry-run")
    assert out.returncode == 1 and "FAIL credentials" in out.stdout


@pytest.mark.frozen
def test_dry_run_unsafe_script(device):
    os.chmod(device.root / "usr/scripts/ota_post_update.sh", 0o777)
    out = device.run("--root", str(device.root), "--dry-run")
    assert out.returncode == 1 and "FAIL script ota_post_update.sh" in out.stdout


def test_dry_run_sees_a_running_agent_and_unknown_keys(device):
    device.start()
    device.wait_log("connected to", timeout=20)
    out = device.run("--root", str(device.root), "--dry-run")
    assert out.returncode == 0 and "OK   agent: one runs on this root" in out.stdout  # information
    cfg = json.loads(device.dev.config_path.read_text())
    cfg["otaAgent"]["colour"] = "blue"
    device.dev.config_path.write_text(json.dumps(cfg))
    assert "unknown otaAgent keys: 'colour'" in device.run("--root", str(device.root), "--dry-run").stdout


@pytest.mark.frozen
def test_only_the_daemon_needs_root(cloud):
    """--dry-run and --status run as an ordinary user; the agent itself refuses to. What that
    user may not read (the key, the state directory) is SKIP (needs root), never FAIL, and
    --status (--json too) leaves it null and names it."""
    import shutil
    import tempfile
    from pathlib import Path
    frozen = bool(os.environ.get("GGC_OTA_AGENT"))
    python = "/usr/bin/python3"
    if not frozen and not os.path.exists(python):
        pytest.skip("no system python3 for an unprivileged run")
    public = Path(tempfile.mkdtemp(prefix="ggc-ota-public-"))
    dev = None
    try:
        os.chmod(public, 0o755)
        dev = Device(cloud, public)
        for p in [public, *public.rglob("*")]:
            if p.is_dir():
                os.chmod(p, 0o755)
        agent = public / "ggc_ota.py"
        shutil.copy(dev.agent_path, agent)
        os.chmod(agent, 0o755)

        def as_nobody(*args):
            cmd = [] if frozen else [python]
            return subprocess.run([*cmd, str(agent), "--root", str(dev.root), *args], capture_output=True,
                                  text=True, timeout=60, preexec_fn=lambda: os.setuid(65534))
        status = as_nobody("--status")
        assert status.returncode == 0, status.stderr
        dry = as_nobody("--dry-run")
        assert "must run as root" not in dry.stderr and "OK   config" in dry.stdout
        assert "SKIP credentials" in dry.stdout  # the key is root's alone, as it should be
        assert "FAIL" not in dry.stdout and dry.returncode == 0, dry.stdout
        daemon = as_nobody("--foreground")
        assert daemon.returncode == 1 and "must run as root" in daemon.stderr
        dev.start()  # as root: its state directory is root's alone
        dev.wait_log("connected to", timeout=30)
        status = as_nobody("--status")
        assert status.returncode == 0 and "Traceback" not in status.stderr, status.stderr
        assert "run as root" in status.stdout, status.stdout
        report = json.loads(as_nobody("--status", "--json").stdout)
        assert report["unreadable"] and report["agentRunning"] is None and report["history"] == []
    finally:
        if dev is not None:
            dev.stop()
        shutil.rmtree(public, ignore_errors=True)


def rehearsal_files(tmp_path):
    """A core artifact and its job document (also written to doc.json in tmp_path), for
    --dry-run --job-document."""
    art = build_core_artifact(tmp_path / "core.tar.gz", "1.11.6")
    doc = {"softwareToUpdate": "core", "version": "1.11.6", "updateTargetsArchitecture": "x86_64",
           "updateTargetsOperatingSystem": "ubuntu",
           "artifact": {"url": "https://example.invalid/x.tar.gz", "sha256": art.sha256, "size": art.size}}
    (tmp_path / "doc.json").write_text(json.dumps(doc))
    return art, doc


@pytest.mark.frozen
def test_rehearsal(device, tmp_path):
    art, doc = rehearsal_files(tmp_path)
    before = device.dev.tree_digest("ggc")
    out = device.run("--root", str(device.root), "--dry-run", "--job-document", str(tmp_path / "doc.json"),
                     "--artifact", str(art.path))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "would replace" in out.stdout and "ggc/var" in out.stdout
    assert device.dev.tree_digest("ggc") == before and device.dev.hook_calls() == []
    doc["artifact"]["sha256"] = "0" * 64
    (tmp_path / "doc.json").write_text(json.dumps(doc))
    out = device.run("--root", str(device.root), "--dry-run", "--job-document", str(tmp_path / "doc.json"),
                     "--artifact", str(art.path))
    assert out.returncode == 1 and "FAIL artifact" in out.stdout
    doc["updateTargetsArchitecture"] = "aarch64"
    (tmp_path / "doc.json").write_text(json.dumps(doc))
    out = device.run("--root", str(device.root), "--dry-run", "--job-document", str(tmp_path / "doc.json"),
                     "--artifact", str(art.path))
    assert out.returncode == 1 and "aarch64" in out.stdout


@pytest.mark.frozen
def test_a_rehearsal_unpacks_under_the_updates_free_space_limit(cloud, tmp_path, make_tmpfs):
    """The rehearsal passes only where the update would: an archive that unpacks to more than the
    room its filesystem has beyond minFreeBytes (while the check before the download, which
    sees only the archive's size, passes) fails the rehearsal and the update alike, DISK_FULL."""
    import tarfile

    from tests.cloud.device import write_core_tree
    disk = make_tmpfs("40m")
    device = Device(cloud, disk, ota={"minFreeBytes": 0, "logFile": str(tmp_path / "agent.log")})
    device.artifacts = tmp_path
    try:
        work = tmp_path / "expands"
        write_core_tree(work / "greengrass/ggc", "1.11.6")
        with open(work / "greengrass/ggc/zeros", "wb") as f:
            f.write(bytes(60 * 2**20))  # 60 MiB that gzip makes 60 KiB
        archive = tmp_path / "core-1.11.6.tar.gz"
        with tarfile.open(archive, "w:gz") as tar:
            tar.add(work / "greengrass", "greengrass")
        import hashlib
        doc = {"softwareToUpdate": "core", "version": "1.11.6", "updateTargetsArchitecture": "x86_64",
               "updateTargetsOperatingSystem": "ubuntu",
               "artifact": {"url": "https://example.invalid/x.tar.gz", "size": archive.stat().st_size,
                            "sha256": hashlib.sha256(archive.read_bytes()).hexdigest()}}
        (tmp_path / "doc.json").write_text(json.dumps(doc))
        out = device.run("--root", str(device.root), "--dry-run", "--job-document", str(tmp_path / "doc.json"),
                         "--artifact", str(archive))
        assert out.returncode == 1 and "OK   device" in out.stdout, out.stdout + out.stderr
        assert "FAIL artifact: the artifact unpacks to more than" in out.stdout
        device.cloud.publish_release(software="core", version="1.11.6", architecture="x86_64",
                                     operating_system="ubuntu", tarball=archive)
        device.start()
        ex = device.wait_status(device.update_job())
        assert ex["status"] == "FAILED" and details(ex)["reason"] == "DISK_FULL", device.log()[-3000:]
        assert "unpacks to more than" in details(ex)["message"] and device.dev.core_version() == "1.11.5"
    finally:
        device.stop()


def test_a_rehearsal_runs_a_new_agents_self_test(device, tmp_path):
    """A self-update rehearses as it runs: a new agent that cannot even start fails the
    rehearsal (NEW_AGENT_BROKEN in an update), one that can passes it."""
    import hashlib

    from tests.agent_harness import agent_variant
    from tests.cloud.device import build_agent_artifact
    for broken, code in (("version", 1), (None, 0)):
        agent = agent_variant(tmp_path, "0.2.0", broken=broken)
        art = build_agent_artifact(tmp_path / f"agent-{broken}.tar.gz", agent)
        doc = {"softwareToUpdate": "ota_agent", "version": "0.2.0", "updateTargetsArchitecture": "x86_64",
               "updateTargetsOperatingSystem": "ubuntu",
               "artifact": {"url": "https://example.invalid/x.tar.gz", "size": art.size,
                            "sha256": hashlib.sha256(art.path.read_bytes()).hexdigest()}}
        (tmp_path / "doc.json").write_text(json.dumps(doc))
        out = device.run("--root", str(device.root), "--dry-run", "--job-document", str(tmp_path / "doc.json"),
                         "--artifact", str(art.path))
        assert out.returncode == code, out.stdout + out.stderr
        assert ("FAIL new agent: the new agent failed `--version`" in out.stdout) == (broken is not None)
    assert device.dev.hook_calls() == []


def test_rehearsal_downloads_as_the_update_does(cloud, device, tmp_path):
    """The rehearsal's download is the update's: here the download host's CA is trusted only
    through otaAgent.extraCaPath (caPath names an unrelated CA), as it is for the update."""
    import trustme
    art = build_core_artifact(tmp_path / "core.tar.gz", "1.11.6")
    cloud.store.put("bucket", "rehearse/core.tar.gz", art.path)
    doc = {"softwareToUpdate": "core", "version": "1.11.6", "updateTargetsArchitecture": "x86_64",
           "updateTargetsOperatingSystem": "ubuntu",
           "artifact": {"url": cloud.store.presign("bucket", "rehearse/core.tar.gz", 300), "sha256": art.sha256,
                        "size": art.size}}
    (tmp_path / "doc.json").write_text(json.dumps(doc))
    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    cfg = json.loads(device.dev.config_path.read_text())
    cfg["crypto"]["caPath"] = f"file://{other}"
    cfg["otaAgent"]["extraCaPath"] = str(cloud.pki.ca_path)
    device.dev.config_path.write_text(json.dumps(cfg))
    out = device.run("--root", str(device.root), "--dry-run", "--job-document", str(tmp_path / "doc.json"))
    assert out.returncode == 0 and "OK   unpack" in out.stdout, out.stdout + out.stderr


def test_status_human(device):
    out = device.run("--root", str(device.root), "--status")
    assert out.returncode == 0 and "core: 1.11.5" in out.stdout and "update in flight: none" in out.stdout


@pytest.mark.frozen
def test_daemon_mode_as_systemd_forking(device):
    pid_file = device.tmp / "ggc-ota.pid"
    started = time.monotonic()
    out = device.run("--root", str(device.root), "--pid-file", str(pid_file), timeout=60)
    assert out.returncode == 0, out.stderr
    assert pid_file.exists(), "the parent exited before the PID file existed"
    pid = int(pid_file.read_text())
    os.kill(pid, 0)
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        assert b"ggc-ota" in f.read()
    assert os.getsid(pid) == pid  # a new session, detached from ours
    device.wait_log("connected to", timeout=20)
    os.kill(pid, signal.SIGTERM)
    deadline = started + 60
    stop_at = time.monotonic()
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        with open(f"/proc/{pid}/stat") as f:
            if f.read().split()[2] == "Z":
                break
        assert time.monotonic() - stop_at < 5, "the daemon did not stop within 5 s of SIGTERM"
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_daemon_reports_why_it_could_not_start(device):
    device.start()
    device.wait_log("connected to", timeout=20)
    out = device.run("--root", str(device.root), "--pid-file", str(device.tmp / "second.pid"), timeout=60)
    assert out.returncode == 3 and "another agent" in out.stderr


@pytest.mark.frozen
def test_logs_reach_syslog_with_real_priorities(cloud, tmp_path):
    """A real datagram socket stands in for /dev/log (journald and OpenWrt's logd both read it)."""
    import socket
    path = str(tmp_path / "log.sock")
    sink = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sink.bind(path)
    sink.settimeout(0.2)
    got: list = []
    done = threading.Event()

    def read() -> None:  # as a syslog daemon does, all along: a datagram queue holds only a few
        while not done.is_set():
            try:
                got.append(sink.recv(65536).decode())
            except socket.timeout:
                pass
            except OSError:
                return
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    device = Device(cloud, tmp_path, ota={"syslog": path})
    try:
        device.release_core("1.11.6")
        device.dev.fail_script("ggc_post_update.sh", 3, once=True)
        device.start()
        device.wait_status(device.update_job())
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not any(": FAILED HOOK_FAILED" in m for m in got):
            time.sleep(0.1)
        info = [m for m in got if m.startswith("<30>ggc-ota[")]    # daemon.info
        errors = [m for m in got if m.startswith("<27>ggc-ota[")]  # daemon.err
        assert any("connected to" in m for m in info), got[:5]
        warnings = [m for m in got if m.startswith("<28>ggc-ota[")]  # daemon.warning
        assert any("rolling back (HOOK_FAILED)" in m for m in warnings), got
        assert any(": FAILED HOOK_FAILED (core 1.11.5 -> 1.11.6, rolled back, " in m for m in errors), got
        assert not any(m.split("]: ", 1)[1][:4].isdigit() for m in got)  # no second timestamp inside
    finally:
        device.stop()
        done.set()
        reader.join(5)
        sink.close()


@pytest.mark.frozen
def test_a_job_at_its_default_level_error_still_logs_its_life(cloud, tmp_path):
    device = Device(cloud, tmp_path)
    try:
        device.release_core("1.11.6")
        device.start()
        job = device.cloud.create_software_update_job(
            s3_url_signer_role="arn:aws:iam::123456789012:role/R", software_to_update="core",
            update_targets=[cloud.thing_arn(device.thing)], update_targets_architecture="x86_64",
            update_targets_operating_system="ubuntu")["IotJobId"]  # no updateAgentLogLevel: ERROR
        assert device.wait_status(job)["status"] == "SUCCEEDED"
        device.wait_log(f"job {job}: SUCCEEDED", timeout=10)  # logged just after the status is sent
        text = device.log()
        assert f"job {job}: starting" in text and "downloaded" in text
    finally:
        device.stop()


def test_status_shows_the_job_in_flight_from_the_download_on(cloud, device):
    art = device.release_core("1.11.6", payload_bytes=1_500_000)
    device.stored(art).faults.throttle_bps = 300_000
    device.start()
    job = device.update_job()
    device.wait_log("downloaded", timeout=30)
    flight = device.status()["updateInFlight"]
    assert flight["jobId"] == job and flight["phase"] == "download" and isinstance(flight["progress"], int)
    assert 0 <= flight["bytesDone"] <= flight["bytesTotal"] and "bytes" not in flight
    out = device.run("--root", str(device.root), "--status")
    assert f"job {job}: download" in out.stdout and "since" in out.stdout
    assert device.wait_status(job)["status"] == "SUCCEEDED"
    assert device.status()["updateInFlight"] is None


def test_dry_run_on_a_live_device_passes(device):
    device.start()
    device.wait_log("connected to", timeout=30)
    out = device.run("--root", str(device.root), "--dry-run")
    assert out.returncode == 0, out.stdout
    assert "OK   agent: one runs on this root" in out.stdout and not re.search(r"\bR\d{1,2}\b", out.stdout)


@pytest.mark.parametrize("argv", [["--dry-run", "--status"], ["--json"]])
def test_mixed_modes_are_a_usage_error(device, argv):
    out = device.run("--root", str(device.root), *argv)
    assert out.returncode == 2 and "usage" in out.stderr


@pytest.mark.frozen
def test_a_daemons_fatal_error_reaches_its_log(device):
    key = next(device.root.glob("certs/*.private.key"))
    key.unlink()
    out = device.run("--root", str(device.root), "--pid-file", str(device.tmp / "x.pid"), timeout=60)
    device.wait_log("stopping on a fatal error", timeout=30)
    assert "private.key" in device.log().split("stopping on a fatal error")[1].splitlines()[0], out.stderr


def test_rehearsal_checks_the_device_as_the_update_does(device, tmp_path):
    art, doc = rehearsal_files(tmp_path)
    (device.root / "usr/scripts/ota_post_update.sh").unlink()  # a core update needs it too, for a rollback
    out = device.run("--root", str(device.root), "--dry-run", "--job-document", str(tmp_path / "doc.json"),
                     "--artifact", str(art.path))
    assert out.returncode == 1 and "FAIL device: ota_post_update.sh is missing" in out.stdout, out.stdout


@pytest.mark.frozen
def test_check_now_makes_the_running_agent_list_its_jobs(cloud, device):
    """`ggc-ota --check-now` (an operator who just fixed the IoT policy) signals the agent process
    that holds the root's lock (SIGUSR1), which lists its jobs at once and says so."""
    out = device.run("--root", str(device.root), "--check-now")
    assert out.returncode == 1 and "no agent runs on" in out.stderr, out.stdout + out.stderr

    def listings() -> int:
        return sum(1 for r in cloud.jobs.requests if r["thing"] == device.thing and r["topic"].endswith("/jobs/get"))
    device.start()
    try:
        deadline = time.monotonic() + 30
        while listings() == 0:
            assert time.monotonic() < deadline, device.log()[-2000:]
            time.sleep(0.1)
        before = listings()
        out = device.run("--root", str(device.root), "--check-now")
        assert out.returncode == 0 and "asked the agent (pid" in out.stdout, out.stdout + out.stderr
        deadline = time.monotonic() + 20
        while listings() == before or "check on demand: done" not in device.log():
            assert time.monotonic() < deadline, device.log()[-2000:]
            time.sleep(0.1)
        assert device.proc.poll() is None  # the signal did not stop it (nor any launcher of the binary)
        time.sleep(1)
        assert device.proc.poll() is None
    finally:
        device.stop()


@pytest.mark.frozen
def test_a_download_rate_cap_shows_in_the_status_and_holds(cloud, tmp_path):
    """otaAgent.maxDownloadBytesPerSecond: --status says so, and the update's download keeps to it."""
    cap = 400_000
    device = Device(cloud, tmp_path, ota={"maxDownloadBytesPerSecond": cap})
    try:
        art = device.release_core("1.11.6", payload_bytes=1_600_000)
        out = device.run("--root", str(device.root), "--status")
        assert f"downloads capped at {cap} bytes/s" in out.stdout, out.stdout
        status = json.loads(device.run("--root", str(device.root), "--status", "--json").stdout)
        assert status["maxDownloadBytesPerSecond"] == cap
        device.start()
        started = time.monotonic()
        ex = device.wait_status(device.update_job())
        assert ex["status"] == "SUCCEEDED", device.log()[-2000:]
        assert time.monotonic() - started >= (art.size - cap) / cap * 0.9  # slower is fine; faster is not
    finally:
        device.stop()


def test_status_json_has_types_and_the_running_agents_own_version(cloud, tmp_path):
    """--status --json: the pid a number (null when none runs), the version of the agent that runs
    (read from the lock it holds), beside the version of the ggc-ota that answers."""
    import sys

    import ggc_ota as g
    from tests.agent_harness import agent_variant
    from tests.conftest import REPO
    device = Device(cloud, tmp_path, agent=agent_variant(tmp_path, "0.0.7"))
    this = [sys.executable, str(REPO / "ggc_ota.py"), "--root", str(device.root), "--status", "--json"]
    try:
        idle = json.loads(subprocess.run(this, capture_output=True, text=True, check=True).stdout)
        assert idle["agentRunning"] is None and idle["agentVersion"] == idle["statusVersion"] == g.__version__
        device.start()
        device.wait_log("connected to", timeout=30)
        running = json.loads(subprocess.run(this, capture_output=True, text=True, check=True).stdout)
        assert running["agentRunning"] == device.proc.pid and running["agentVersion"] == "0.0.7"
        assert running["statusVersion"] == g.__version__ and running["pendingStatuses"] == 0
    finally:
        device.stop()


def test_a_jobs_debug_level_shows_the_conversation_and_the_end_is_one_line(cloud, device):
    """With updateAgentLogLevel DEBUG the job's log shows every Jobs request and reply, each HTTP
    status of the download (never its query string), every progress report;
    at INFO, progress every 25 %; the job's end is one line with versions and duration."""
    art = device.release_core("1.11.6", payload_bytes=1_500_000)
    device.stored(art).faults.throttle_bps = 600_000  # reports every 0.2 s: more than one per quarter
    device.start()
    job = device.update_job(level="DEBUG")
    assert device.wait_status(job)["status"] == "SUCCEEDED"
    device.wait_log(f"job {job}: SUCCEEDED (core 1.11.5 -> 1.11.6, ", timeout=10)
    text = device.log()
    for needed in (f"Jobs: -> $aws/things/{device.thing}/jobs/{job}/update status=IN_PROGRESS clientToken=",
                   f"Jobs: <- $aws/things/{device.thing}/jobs/{job}/update/accepted clientToken=",
                   "download: GET https://", "download: HTTP 200"):
        assert needed in text, needed
    assert "X-Amz-Signature" not in text and "X-Amz-Credential" not in text
    debug_progress = [line for line in text.splitlines() if " DEBUG " in line and "downloaded" in line]
    assert debug_progress
    job2 = device.update_job(level="INFO")  # the same release again, at INFO
    device.wait_status(job2)
    device.wait_log(f"job {job2}: ", timeout=10)
    later = device.log()[len(text):]
    assert len([line for line in later.splitlines() if " INFO " in line and "downloaded" in line]) <= 5


def test_a_failure_is_logged_once(cloud, device):
    art = device.release_core("1.11.6")
    device.stored(art).faults.corrupt_offset = 100  # HASH_MISMATCH
    device.start()
    job = device.update_job()
    ex = device.wait_status(job)
    assert ex["status"] == "FAILED" and details(ex)["reason"] == "HASH_MISMATCH"
    assert details(ex)["rolledBack"] == "false" and details(ex)["changed"] == "false"  # nothing was touched
    device.wait_log(f"job {job}: FAILED HASH_MISMATCH (core 1.11.5 -> 1.11.6, nothing rolled back, ", timeout=10)
    assert sum("the job document says" in line for line in device.log().splitlines()) == 1, device.log()[-3000:]


@pytest.mark.frozen
def test_a_start_into_a_held_lock_stops_at_sigterm_and_a_clean_stop_leaves_no_pid_file(device):
    """A start that waits for the lock says so at once and stops at SIGTERM (it ignored it for 15
    s); a daemon start into a held lock fails with one `ggc-ota:` prefix; a clean stop removes the
    PID file it was started with."""
    pid_file = device.tmp / "ggc-ota.pid"
    out = device.run("--root", str(device.root), "--pid-file", str(pid_file), timeout=60)
    assert out.returncode == 0, out.stderr
    daemon = int(pid_file.read_text())
    device.wait_log("connected to", timeout=20)
    second = subprocess.Popen(device.command("--root", str(device.root), "--foreground"), stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        device.wait_log("waiting up to 15 s for the agent that holds the lock", timeout=20)
        started = time.monotonic()
        second.send_signal(signal.SIGTERM)
        assert second.wait(10) == 0 and time.monotonic() - started < 5
    finally:
        if second.poll() is None:
            os.killpg(second.pid, signal.SIGKILL)
    other = device.run("--root", str(device.root), "--pid-file", str(device.tmp / "other.pid"), timeout=60)
    assert other.returncode == 3 and other.stderr.count("ggc-ota:") == 1, other.stderr
    os.kill(daemon, signal.SIGTERM)
    deadline = time.monotonic() + 15
    while pid_file.exists():
        assert time.monotonic() < deadline, "the PID file outlived a clean stop"
        time.sleep(0.1)


def test_a_symlinked_script_is_named_as_a_link(device):
    script = device.root / "usr/scripts/ggc_post_update.sh"
    real = device.root / "usr/scripts/real-post.sh"
    os.rename(script, real)
    os.symlink(real, script)
    out = device.run("--root", str(device.root), "--dry-run")
    assert out.returncode == 1 and "ggc_post_update.sh is a symbolic link" in out.stdout, out.stdout
    assert "Too many levels" not in out.stdout


@pytest.mark.frozen
def test_a_start_that_cannot_write_its_pid_file_leaves_nothing_running(device, make_tmpfs):
    """The starter names the daemon's top process in the PID file after the daemon wrote its own;
    when that write fails (here a filesystem with room for one page), the start used to report the
    failure and leave the daemon running, holding the lock. Now it stops the daemon first."""
    run_dir = make_tmpfs("4k")
    out = device.run("--root", str(device.root), "--pid-file", str(run_dir / "ggc-ota.pid"), timeout=60)
    assert out.returncode == 1 and "cannot write the PID file" in out.stderr, out.stdout + out.stderr
    deadline = time.monotonic() + 10
    while device.status()["agentRunning"] is not None:
        assert time.monotonic() < deadline, "a daemon runs after a start that reported a failure"
        time.sleep(0.2)
