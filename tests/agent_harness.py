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
        self.cloud.publish_release(software="core", version=version, architecture="x86_64",
                                   operating_system=kw.get("os", "ubuntu"), tarball=art.path)
        return art

    def update_job(self, software: str = "core", arch: str = "x86_64", os_name: str = "ubuntu",
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
                return ex
            if self.proc is not None and self.proc.poll() is not None and self.proc.returncode != 0:
                raise AssertionError(f"the agent exited with {self.proc.returncode} while {job_id} was "
                                     f"{ex['status']}\n{self.log()[-4000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} still {ex['status']} after {timeout} s\n{self.log()[-4000:]}")
            time.sleep(0.1)

    def wait_log(self, text: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log():
            if time.monotonic() > deadline:
                raise AssertionError(f"never logged {text!r}\n{self.log()[-4000:]}")
            time.sleep(0.05)

    def history(self, job_id: str) -> list:
        return self.cloud.history(job_id, self.thing)


def agent_variant(tmp: Path, version: str, broken: Optional[str] = None) -> Path:
    """A copy of the agent under test announcing `version`. `broken="version"`: it fails
    `--version` (a binary that cannot even start)."""
    text = AGENT_SOURCE.read_text()
    assert '__version__ = "' in text
    import re
    text = re.sub(r'__version__ = "[^"]+"', f'__version__ = "{version}"', text, count=1)
    if broken == "connect":  # starts and runs, but dials the wrong port: never reaches CONNACK
        good = "port=self.port, client_id=self.thing_name"
        assert good in text
        text = text.replace(good, good.replace("self.port", "self.port + 1"))
    if broken == "version":
        text = text.replace("def main(argv", "def main(argv=None):\n    raise SystemExit(70)\n\n\ndef _unused(argv", 1)
    out = tmp / f"ggc-ota-{version}"
    out.write_text(text)
    os.chmod(out, 0o755)
    return out


def release_agent(device: Device, version: str, broken: Optional[str] = None):
    """Publish a variant of the agent script; not for a frozen agent under test."""
    import pytest
    if os.environ.get("GGC_OTA_AGENT"):
        pytest.skip("agent variants are made from the script; the binary has its own self-update test")
    from tests.cloud.device import build_agent_artifact
    source = agent_variant(device.tmp, version, broken)
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
