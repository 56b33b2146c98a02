"""Running the real agent against the look-alike cloud: a device root with the agent installed
at <root>/ota/ota_agent/ggc-ota, started as a process (foreground or as a daemon), watched
through its log, the cloud's execution history and the root's lab, and stopped by its pid."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Optional

import pytest

from tests.cloud.device import DeviceRoot, build_core_artifact, make_root
from tests.conftest import REPO

AGENT_SOURCE = REPO / "ggc_ota.py"
ROLE = "arn:aws:iam::123456789012:role/GreengrassOTARole"
TERMINAL = ("SUCCEEDED", "FAILED", "REJECTED", "CANCELED", "TIMED_OUT", "REMOVED")
# the platform the agent under test runs as: x86_64 (the machines the tests run on), or
# GGC_OTA_AGENT_ARCH for a cross binary run by qemu-user (./build.sh binary --arch does so)
AGENT_ARCH = os.environ.get("GGC_OTA_AGENT_ARCH") or "x86_64"
AGENT_OS = "raspbian" if AGENT_ARCH in ("armv6l", "armv7l") else "ubuntu"  # a pair Greengrass ships


def agent_under_test() -> Path:
    """The agent binary to test: GGC_OTA_AGENT (e.g. dist/ggc-ota) or the script."""
    return Path(os.environ.get("GGC_OTA_AGENT") or AGENT_SOURCE)


class Device:
    def __init__(self, cloud, tmp: Path, form: str = "current", managed_respawn: bool = True,
                 ota: Optional[dict] = None, agent: Optional[Path] = None) -> None:
        self.cloud = cloud
        self.thing = "core-" + uuid.uuid4().hex[:8]
        settings = {"progressInterval": 0.2, "scriptTimeout": 20, "newAgentTimeout": 20, "reconnectMaxSeconds": 2,
                    "logFile": str(tmp / "agent.log")}
        settings.update(ota or {})
        self.dev: DeviceRoot = make_root(tmp / "greengrass", self.thing, cloud.add_thing(self.thing),
                                         cloud.pki.ca_path, "localhost", cloud.port, form=form,
                                         managed_respawn=managed_respawn, agent=agent or agent_under_test(),
                                         ota_agent=settings)
        self.root = self.dev.root
        self.log_path = Path(settings["logFile"])
        self.proc: Optional[subprocess.Popen] = None
        self.tmp = tmp
        self.artifacts = tmp  # where release artifacts are built (the cloud's side, not the device's)

    # ---- the agent process ---------------------------------------------------------------------
    @property
    def agent_path(self) -> Path:
        return self.root / "ota/ota_agent/ggc-ota"

    def command(self, *args: str) -> list:
        path = str(self.agent_path)
        if os.environ.get("GGC_OTA_AGENT"):
            return [path, *args]
        return [sys.executable, path, *args]

    def start(self, crash_at: Optional[str] = None, extra_env: Optional[dict] = None) -> subprocess.Popen:
        env = dict(os.environ)
        env.pop("GGC_OTA_CRASH_AT", None)
        if crash_at:
            env["GGC_OTA_CRASH_AT"] = crash_at
        env.update(extra_env or {})
        self.proc = subprocess.Popen(self.command("--root", str(self.root), "--foreground"),
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=open(self.tmp / "agent.stderr", "ab"), env=env, start_new_session=True)
        return self.proc

    def stop(self, timeout: float = 15) -> Optional[int]:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return proc.returncode if proc else None
        os.kill(proc.pid, signal.SIGTERM)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
            raise AssertionError("the agent did not stop on SIGTERM within 15 s") from None

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
        self.proc = None

    def wait_exit(self, timeout: float = 60) -> int:
        assert self.proc is not None
        code = self.proc.wait(timeout)
        self.proc = None
        return code

    def run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(*args), capture_output=True, text=True, timeout=timeout)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def status(self) -> dict:
        out = self.run("--root", str(self.root), "--status", "--json")
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    # ---- jobs ------------------------------------------------------------------------------------
    def release_core(self, version: str, payload_bytes: int = 2000, **kw) -> object:
        art = build_core_artifact(self.artifacts / f"core-{version}-{uuid.uuid4().hex[:4]}.tar.gz", version,
                                  payload_bytes=payload_bytes)
        self.cloud.publish_release(software="core", version=version, architecture=AGENT_ARCH,
                                   operating_system=kw.get("os", AGENT_OS), tarball=art.path)
        return art

    def stored(self, art) -> object:
        """The look-alike store's object for a released artifact: its `faults` slow or break the
        download, its `requests` show how it was fetched."""
        key = next(r.key for r in self.cloud.greengrass.releases if r.sha256 == art.sha256)
        return self.cloud.store.objects[f"greengrass-updates/{key}"]

    def update_job(self, software: str = "core", arch: str = AGENT_ARCH, os_name: str = AGENT_OS,
                   level: Optional[str] = "INFO") -> str:
        out = self.cloud.create_software_update_job(
            s3_url_signer_role=ROLE, software_to_update=software, update_targets=[self.cloud.thing_arn(self.thing)],
            update_targets_architecture=arch, update_targets_operating_system=os_name, update_agent_log_level=level)
        return out["IotJobId"]

    def execution(self, job_id: str) -> dict:
        return self.cloud.describe_job_execution(job_id, self.thing)["execution"]

    def wait_status(self, job_id: str, statuses=TERMINAL, timeout: float = 90) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            ex = self.execution(job_id)
            if ex["status"] in statuses:
                if ex["status"] in TERMINAL:
                    self.wait_job_settled(job_id, deadline=time.monotonic() + 30)
                return ex
            if self.proc is not None and self.proc.poll() is not None and self.proc.returncode != 0:
                raise AssertionError(f"the agent exited with {self.proc.returncode} while {job_id} was "
                                     f"{ex['status']}\n{self.log()[-4000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} still {ex['status']} after {timeout} s\n{self.log()[-4000:]}")
            time.sleep(0.1)

    def job_leftovers(self, job_id: str) -> list:
        """What the running agent still holds of a job: its journal, staging, download, postponement."""
        state = self.root / "ota-state"
        try:
            journal = json.loads((state / "journal.json").read_text()).get("jobId")
        except (OSError, ValueError, AttributeError):
            journal = None
        paths = [state / "journal.json"] if journal == job_id else []
        paths += [state / "staging" / job_id, state / "postponed" / f"{job_id}.json",
                 state / "downloads" / f"{job_id}.tar.gz", state / "downloads" / f"{job_id}.tar.gz.part"]
        return [p for p in paths if os.path.lexists(p)]

    def wait_job_settled(self, job_id: str, deadline: float) -> None:
        """The cloud has a job's end before the agent has cleaned up after it (the report comes
        first, so that a crash in between loses nothing): a test that looks at the device next
        waits, bounded, for the cleanup. Not while the agent is stopped or has exited."""
        while self.job_leftovers(job_id) and self.proc is not None and self.proc.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} ended in the cloud, but the agent still holds "
                                     f"{self.job_leftovers(job_id)}\n{self.log()[-4000:]}")
            time.sleep(0.05)

    def wait_log(self, text: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log():
            if time.monotonic() > deadline:
                raise AssertionError(f"never logged {text!r}\n{self.log()[-4000:]}")
            time.sleep(0.05)

    def history(self, job_id: str) -> list:
        return self.cloud.history(job_id, self.thing)


def agent_variant(tmp: Path, version: str, broken: Optional[str] = None, source: Optional[Path] = None) -> Path:
    """A copy of the agent under test (or of `source`) announcing `version`. `broken="version"`:
    it fails `--version` (a binary that cannot even start)."""
    text = (source or AGENT_SOURCE).read_text()
    assert '__version__ = "' in text
    import re
    text = re.sub(r'__version__ = "[^"]+"', f'__version__ = "{version}"', text, count=1)
    if broken == "connect":  # starts and runs, but dials the wrong port: never reaches CONNACK
        good = "port=cfg.port, client_id=cfg.client_id"
        assert good in text
        text = text.replace(good, good.replace("cfg.port", "cfg.port + 1"))
    if broken == "version":
        text = text.replace("def main(argv", "def main(argv=None):\n    raise SystemExit(70)\n\n\ndef _unused(argv", 1)
    out = tmp / f"ggc-ota-{version}"
    out.write_text(text)
    os.chmod(out, 0o755)
    return out


def release_agent(device: Device, version: str, broken: Optional[str] = None, source: Optional[Path] = None):
    """Publish a variant of the agent script (or of `source`); not for a frozen agent under test."""
    import pytest
    if os.environ.get("GGC_OTA_AGENT"):
        pytest.skip("agent variants are made from the script; the binary has its own self-update test")
    from tests.cloud.device import build_agent_artifact
    source = agent_variant(device.tmp, version, broken, source)
    art = build_agent_artifact(device.tmp / f"agent-{version}.tar.gz", source)
    device.cloud.publish_release(software="ota_agent", version=version, architecture="x86_64",
                                 operating_system="ubuntu", tarball=art.path)
    return source


def details(execution: dict) -> dict:
    """statusDetails of a describe-job-execution reply."""
    return execution["statusDetails"]["detailsMap"]


@pytest.fixture
def device(cloud, tmp_path):
    """A device root wired to the worker's look-alike cloud, with the agent under test; the
    agent is stopped by its pid afterwards. Test modules import this fixture."""
    d = Device(cloud, tmp_path)
    yield d
    d.stop()


# ---- the agent under an init system ------------------------------------------------------------

def proc_cmdline(pid: int) -> list:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def alive(pid: Optional[int]) -> bool:
    if not pid:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def agent_pids(root: Path) -> list:
    """Every live process of the agents of this root (launchers, agents, agents on trial): their
    command lines carry `--root <root>`; a test supervisor's does too, after `tests.supervisors`."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        args = proc_cmdline(int(entry.name))
        if "tests.supervisors" in args or "--root" not in args:
            continue
        if args[args.index("--root") + 1:args.index("--root") + 2] == [str(root)] and alive(int(entry.name)):
            out.append(int(entry.name))
    return sorted(out)


def extraction_usage(tmpdir: Path) -> tuple:
    """(directories, KiB allocated) of what the frozen binary unpacked into `tmpdir`."""
    dirs = [p for p in tmpdir.iterdir() if p.name.startswith(("ggc-ota-", "staticx-", "_MEI"))]
    seen, blocks = set(), 0
    for d in dirs:
        for dirpath, _, files in os.walk(d):
            for name in files:
                st = os.lstat(os.path.join(dirpath, name))
                if st.st_ino not in seen:
                    seen.add(st.st_ino)
                    blocks += st.st_blocks
    return len(dirs), blocks // 2


class Supervised:
    """The device's agent as an init system runs it. kind "none": daemon mode started by hand,
    nothing watches it; "systemd": tests/supervisors.py imitating the shipped unit (Type=forking,
    PIDFile, Restart=on-failure); "procd": the same imitating OpenWrt's procd (--foreground,
    respawn). The agent's TMPDIR is `tmpdir`."""

    def __init__(self, device: Device, kind: str, tmpdir: Path, first_env: Optional[dict] = None) -> None:
        self.device, self.kind, self.tmpdir = device, kind, tmpdir
        self.pid_file = device.tmp / "ggc-ota.pid"
        self.state_file = device.tmp / f"supervisor-{kind}.json"
        self.first_env = first_env or {}
        self.proc: Optional[subprocess.Popen] = None

    def env(self) -> dict:
        env = {k: v for k, v in os.environ.items() if k != "GGC_OTA_CRASH_AT"}
        env["TMPDIR"] = str(self.tmpdir)
        return env

    def start(self) -> None:
        root = str(self.device.root)
        daemon = self.device.command("--root", root, "--pid-file", str(self.pid_file))
        if self.kind == "none":
            out = subprocess.run(daemon, capture_output=True, text=True, timeout=60,
                                 env={**self.env(), **self.first_env})
            assert out.returncode == 0, out.stderr
            return
        sup = [sys.executable, "-m", "tests.supervisors", self.kind, "--state", str(self.state_file)]
        if self.kind == "systemd":
            assert not self.first_env
            cmd = sup + ["--pid-file", str(self.pid_file), "--"] + daemon
        else:
            for key, value in self.first_env.items():
                sup += ["--first-env", f"{key}={value}"]
            cmd = sup + ["--"] + self.device.command("--root", root, "--foreground")
        self.proc = subprocess.Popen(cmd, cwd=str(REPO), env=self.env(), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=open(self.device.tmp / "agent.stderr", "ab"),
                                     start_new_session=True)
        deadline = time.monotonic() + 60
        while not alive(self.main_pid()):
            assert self.proc.poll() is None and time.monotonic() < deadline, self.state()
            time.sleep(0.05)

    def state(self) -> dict:
        try:
            return json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return {}

    def main_pid(self) -> Optional[int]:
        """The process the init system tracks."""
        if self.kind == "none":
            try:
                return int(self.pid_file.read_text())
            except (OSError, ValueError):
                return None
        return self.state().get("main")

    def agent_running(self) -> bool:
        """The tracked process is alive and an agent holds the root's lock."""
        holder = self.device.status()["agentRunning"]
        return alive(self.main_pid()) and holder is not None and alive(int(holder))

    def wait_settled(self, expected: int, timeout: float = 45) -> None:
        """Until `expected` agent processes run (old stacks and trials gone) and one agent runs."""
        deadline = time.monotonic() + timeout
        while len(agent_pids(self.device.root)) != expected or not self.agent_running():
            assert time.monotonic() < deadline, (agent_pids(self.device.root), self.state(), self.device.log()[-3000:])
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(40)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        elif self.kind == "none" and alive(self.main_pid()):
            os.kill(self.main_pid(), signal.SIGTERM)
        deadline = time.monotonic() + 15
        while agent_pids(self.device.root) and time.monotonic() < deadline:
            time.sleep(0.1)
        for pid in agent_pids(self.device.root):  # whatever a failed test left behind
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
