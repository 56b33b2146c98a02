"""./build.sh demo: a whole Greengrass OTA update, end to end, against the local look-alike cloud.

It starts the look-alike (mosquitto with mutual TLS, the Jobs service, the S3 store) as its own
process, makes a Greengrass root with ggc-ota installed, publishes two core releases, starts the
agent, and drives everything through the look-alike's operator CLI, as a fleet operator would
drive AWS: one update that succeeds, then one whose post-update script fails and rolls back.
Everything it starts is stopped by its pid at the end, and its folder is removed.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.cloud.device import build_core_artifact, stop_process

REPO = Path(__file__).resolve().parent.parent
ROLE = "arn:aws:iam::123456789012:role/GreengrassOTARole"
THING = "demo-core"


def say(text: str) -> None:
    print(f"\n\033[1m==> {text}\033[0m", flush=True)


def show(text: str) -> None:
    for line in text.rstrip().splitlines():
        print(f"    {line}", flush=True)


class Demo:
    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.cloud_dir = workdir / "cloud"
        self.env = dict(os.environ, PYTHONPATH=str(REPO))
        self.cloud_proc: subprocess.Popen | None = None
        self.agent_proc: subprocess.Popen | None = None
        self.root = workdir / "greengrass"

    def cli(self, *args: str) -> dict:
        out = subprocess.run([sys.executable, "-m", "tests.cloud", "--workdir", str(self.cloud_dir), *args],
                             cwd=REPO, env=self.env, capture_output=True, text=True, timeout=60)
        body = json.loads(out.stdout or "{}")
        if out.returncode != 0:
            raise SystemExit(f"demo: {' '.join(args[:1])} failed: {body or out.stderr}")
        return body

    def agent(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(self.root / "ota/ota_agent/ggc-ota"), "--root", str(self.root),
                               *args], capture_output=True, text=True, timeout=60)

    # ---- steps --------------------------------------------------------------------------------
    def start_cloud(self) -> None:
        say("Starting the local AWS IoT look-alike (mosquitto + Jobs + S3 + Greengrass control plane)")
        self.cloud_dir.mkdir(parents=True)
        self.cloud_proc = subprocess.Popen([sys.executable, "-m", "tests.cloud", "--workdir", str(self.cloud_dir),
                                            "--thing", THING, "serve"], cwd=REPO, env=self.env,
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                           start_new_session=True)
        deadline = time.monotonic() + 30
        while not (self.cloud_dir / "cloud.json").exists():
            if self.cloud_proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("demo: the look-alike cloud did not start")
            time.sleep(0.1)
        info = json.loads((self.cloud_dir / "cloud.json").read_text())
        show(f"MQTT broker on localhost:{info['brokerPort']} (TLS 1.2+, client certificates required)\n"
             f"artifact store on https://localhost:{info['storePort']} (presigned URLs)")

    def make_device(self) -> None:
        say(f"Making a Greengrass core root at {self.root} with ggc-ota installed")
        self.cli("make-root", "--root", str(self.root), "--thing-name", THING, "--agent", str(REPO / "ggc_ota.py"))
        config = json.loads((self.root / "config/config.json").read_text())
        config["otaAgent"] = {"logFile": str(self.dir / "ggc_ota.txt"), "progressInterval": 0.5}
        (self.root / "config/config.json").write_text(json.dumps(config, indent=2))
        show(self.agent("--status").stdout)
        say("Dry-run: is this device ready for an update?")
        out = self.agent("--dry-run")
        show(out.stdout)
        if out.returncode != 0:
            raise SystemExit("demo: the dry-run found a problem")

    def publish(self, version: str, payload: int) -> None:
        art = build_core_artifact(self.dir / f"greengrass-{version}.tar.gz", version, payload_bytes=payload)
        self.cli("publish-release", "--software", "core", "--version", version, "--architecture", "x86_64",
                 "--operating-system", "ubuntu", "--tarball", str(art.path))
        show(f"published core {version} for ubuntu/x86_64: {art.size} bytes, sha256 {art.sha256[:16]}...")

    def start_agent(self) -> None:
        say("Starting ggc-ota (it connects with the core's own certificate and waits for jobs)")
        self.agent_proc = subprocess.Popen([sys.executable, str(self.root / "ota/ota_agent/ggc-ota"),
                                            "--root", str(self.root), "--foreground"],
                                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                           stderr=subprocess.DEVNULL, start_new_session=True)
        log = self.dir / "ggc_ota.txt"
        deadline = time.monotonic() + 30
        while "connected to" not in (log.read_text() if log.exists() else ""):
            if self.agent_proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("demo: the agent did not connect:\n" + (log.read_text() if log.exists() else ""))
            time.sleep(0.1)
        show(f"agent pid {self.agent_proc.pid}, log {log}")

    def update(self, version: str) -> str:
        say(f"Operator: create-software-update-job (core -> {version}, ubuntu/x86_64)")
        out = self.cli("create-software-update-job", "--s3-url-signer-role", ROLE, "--software-to-update", "core",
                       "--update-targets", f"arn:aws:iot:us-east-1:123456789012:thing/{THING}",
                       "--update-targets-architecture", "x86_64", "--update-targets-operating-system", "ubuntu",
                       "--update-agent-log-level", "INFO")
        show(json.dumps(out, indent=2))
        job = out["IotJobId"]
        say("Watching the job execution (describe-job-execution)")
        last = None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            ex = self.cli("describe-job-execution", "--job-id", job, "--thing-name", THING)["execution"]
            details = ex["statusDetails"]["detailsMap"]
            line = f"{ex['status']:<12} " + "  ".join(f"{k}={v}" for k, v in sorted(details.items()))
            if line != last:
                show(line)
                last = line
            if ex["status"] not in ("QUEUED", "IN_PROGRESS"):
                return job
            time.sleep(0.2)
        raise SystemExit("demo: the job did not finish in time")

    def describe(self, job: str) -> None:
        say("Operator: describe-job")
        job_info = self.cli("describe-job", "--job-id", job)["job"]
        show(json.dumps({k: job_info[k] for k in ("jobId", "status", "jobProcessDetails", "presignedUrlConfig")},
                        indent=2))

    def status(self) -> None:
        say("On the device: ggc-ota --status")
        show(self.agent("--status").stdout)

    def stop(self) -> None:
        for proc in (self.agent_proc, self.cloud_proc):
            if proc is not None:
                stop_process(proc)
        pid_file = Path(str(self.root) + ".lab") / "greengrassd.pid"
        if pid_file.exists():  # the look-alike core daemon the scripts started
            try:
                os.kill(int(pid_file.read_text()), signal.SIGTERM)
            except (ValueError, ProcessLookupError):
                pass


def main() -> int:
    workdir = Path(tempfile.mkdtemp(prefix="ggc-ota-demo-"))
    demo = Demo(workdir)
    try:
        demo.start_cloud()
        demo.make_device()
        say("Operator: publishing two Greengrass core releases to the look-alike catalogue")
        demo.publish("1.11.6", 6 * 1024 * 1024)
        demo.cli("throttle-release", "--software", "core", "--version", "1.11.6", "--bytes-per-second", "2000000")
        show("(the store serves it at 2 MB/s, so the download takes a few seconds)")
        demo.start_agent()
        job = demo.update("1.11.6")
        demo.describe(job)
        demo.status()

        say("Next update: this time ggc_post_update.sh fails, so the agent must roll back")
        demo.publish("1.11.7", 1024 * 1024)
        lab = Path(str(demo.root) + ".lab")
        (lab / "ggc_post_update.sh.fail-once").write_text("1")
        show("(the look-alike script is told to exit 1 once: the new core cannot start)")
        job = demo.update("1.11.7")
        demo.describe(job)
        demo.status()
        installed = sorted(p.name for p in (demo.root / "ggc/packages").iterdir())
        say(f"Installed core after the rollback: {installed[-1]} (1.11.6 still runs; 1.11.7 was rolled back)")
        return 0
    finally:
        demo.stop()
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(str(workdir / "greengrass") + ".lab", ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
