"""The Greengrass control plane of the look-alike (the release catalogue,
CreateSoftwareUpdateJob), through the Python API and the CLI, with mosquitto_sub (Debian's
client, not ours) watching the device topics."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from tests.cloud.device import build_core_artifact
from tests.cloud.jobs import JobsError
from tests.conftest import REPO

ROLE = "arn:aws:iam::123456789012:role/GreengrassOTARole"


@pytest.fixture(scope="module")
def release(cloud, tmp_path_factory):
    art = build_core_artifact(tmp_path_factory.mktemp("rel") / "core.tar.gz", "1.11.6")
    cloud.publish_release(software="core", version="1.11.6", architecture="x86_64",
                          operating_system="ubuntu", tarball=art.path)
    older = build_core_artifact(tmp_path_factory.mktemp("rel") / "old.tar.gz", "1.10.2")
    cloud.publish_release(software="core", version="1.10.2", architecture="x86_64",
                          operating_system="ubuntu", tarball=older.path)
    return art


def create(cloud, thing, **over):
    args = dict(s3_url_signer_role=ROLE, software_to_update="core", update_targets=[cloud.thing_arn(thing)],
                update_targets_architecture="x86_64", update_targets_operating_system="ubuntu",
                update_agent_log_level="WARN")
    args.update(over)
    return cloud.create_software_update_job(**args)


def test_create_software_update_job(cloud, device, release):
    out = create(cloud, device.thing)
    assert out["IotJobId"].startswith("GreengrassUpdateJob_")
    assert out["IotJobArn"].endswith(":job/" + out["IotJobId"]) and out["PlatformSoftwareVersion"] == "1.11.6"
    stored = cloud.jobs.jobs[out["IotJobId"]].document
    assert stored["artifact"]["url"].startswith("${aws:iot:s3-presigned-url:https://")
    _, reply = device.request(f"{out['IotJobId']}/get")
    doc = reply["execution"]["jobDocument"]
    assert doc["softwareToUpdate"] == "core" and doc["version"] == "1.11.6"
    assert doc["updateTargetsArchitecture"] == "x86_64" and doc["updateTargetsOperatingSystem"] == "ubuntu"
    assert doc["updateAgentLogLevel"] == "WARN"
    assert doc["artifact"]["sha256"] == release.sha256 and doc["artifact"]["size"] == release.size
    assert doc["artifact"]["url"].startswith("https://localhost:")
    job = cloud.describe_job(out["IotJobId"])["job"]
    assert job["presignedUrlConfig"] == {"roleArn": ROLE, "expiresInSec": 3600}
    assert job["status"] == "IN_PROGRESS" and job["jobProcessDetails"]["numberOfQueuedThings"] == 1
    assert set(job["jobProcessDetails"]) == {
        "numberOfQueuedThings", "numberOfInProgressThings", "numberOfSucceededThings", "numberOfFailedThings",
        "numberOfRejectedThings", "numberOfCanceledThings", "numberOfRemovedThings", "numberOfTimedOutThings"}


def test_log_level_is_optional(cloud, thing, release):
    out = create(cloud, thing, update_agent_log_level=None)
    assert "updateAgentLogLevel" not in cloud.jobs.jobs[out["IotJobId"]].document


@pytest.mark.parametrize("over,words", [
    ({"update_targets_operating_system": "amazon_linux", "update_targets_architecture": "aarch64"}, "supported"),
    ({"update_targets_architecture": "mips"}, "Architecture"),
    ({"update_targets_operating_system": "debian"}, "OperatingSystem"),
    ({"software_to_update": "lambda"}, "SoftwareToUpdate"),
    ({"update_agent_log_level": "LOUD"}, "LogLevel"),
    ({"s3_url_signer_role": "not-a-role"}, "S3UrlSignerRole"),
    ({"update_targets": []}, "UpdateTargets"),
    ({"update_targets": ["arn:aws:iot:us-east-1:123456789012:thing/nobody"]}, "does not exist"),
    ({"update_targets_operating_system": "openwrt", "update_targets_architecture": "aarch64"}, "no core release"),
])
def test_bad_requests(cloud, thing, release, over, words):
    with pytest.raises(JobsError) as err:
        create(cloud, thing, **over)
    assert err.value.code == "BadRequestException" and words in err.value.message


def test_every_r7_platform_is_accepted(cloud, thing, tmp_path):
    from tests.cloud.greengrass import SUPPORTED_PLATFORMS
    art = build_core_artifact(tmp_path / "a.tar.gz", "1.11.6")
    for os_name, arch in sorted(SUPPORTED_PLATFORMS):
        cloud.publish_release(software="ota_agent", version="9.9.9", architecture=arch,
                              operating_system=os_name, tarball=art.path)
        out = create(cloud, thing, software_to_update="ota_agent", update_targets_architecture=arch,
                     update_targets_operating_system=os_name)
        assert out["PlatformSoftwareVersion"] == "9.9.9"


def test_client_token_idempotency(cloud, thing, release):
    token = uuid.uuid4().hex
    first = create(cloud, thing, amzn_client_token=token)
    again = create(cloud, thing, amzn_client_token=token)
    assert first == again
    assert sum(1 for j in cloud.jobs.jobs if j == first["IotJobId"]) == 1
    with pytest.raises(JobsError):
        create(cloud, thing, amzn_client_token=token, update_agent_log_level="DEBUG")


def test_thing_group_targets(cloud, release):
    members = ["thing-" + uuid.uuid4().hex[:8] for _ in range(3)]
    group = cloud.add_thing_group("group-" + uuid.uuid4().hex[:6], members)
    out = cloud.create_software_update_job(
        s3_url_signer_role=ROLE, software_to_update="core", update_targets=[group],
        update_targets_architecture="x86_64", update_targets_operating_system="ubuntu")
    assert cloud.describe_job(out["IotJobId"])["job"]["jobProcessDetails"]["numberOfQueuedThings"] == 3
    for m in members:
        assert cloud.describe_job_execution(out["IotJobId"], m)["execution"]["status"] == "QUEUED"


def test_cli_drives_a_running_look_alike(tmp_path):
    """`python -m tests.cloud serve`, then the operator CLI, with mosquitto_sub as the device."""
    workdir = tmp_path / "cloud"
    workdir.mkdir()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    server = subprocess.Popen([sys.executable, "-m", "tests.cloud", "--workdir", str(workdir),
                               "--thing", "cli-thing", "serve"], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    sub = None
    try:
        deadline = time.monotonic() + 30
        while not (workdir / "cloud.json").exists():
            assert server.poll() is None, server.stdout.read().decode()
            assert time.monotonic() < deadline
            time.sleep(0.1)
        info = json.loads((workdir / "cloud.json").read_text())

        def cli(*args):
            return subprocess.run([sys.executable, "-m", "tests.cloud", "--workdir", str(workdir), *args],
                                  cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
        thing = info["things"]["cli-thing"]
        sub = subprocess.Popen(["mosquitto_sub", "-h", "localhost", "-p", str(info["brokerPort"]),
                                "--cafile", info["caPath"], "--cert", thing["cert"], "--key", thing["key"],
                                "-i", "cli-thing", "-t", "$aws/things/cli-thing/jobs/notify", "-C", "1", "-W", "30"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(1.0)  # let mosquitto_sub subscribe
        art = build_core_artifact(tmp_path / "core.tar.gz", "1.11.6")
        r = cli("publish-release", "--software", "core", "--version", "1.11.6", "--architecture", "x86_64",
                "--operating-system", "ubuntu", "--tarball", str(art.path))
        assert r.returncode == 0, r.stdout + r.stderr
        r = cli("create-software-update-job", "--s3-url-signer-role", ROLE, "--software-to-update", "core",
                "--update-targets", "arn:aws:iot:us-east-1:123456789012:thing/cli-thing",
                "--update-targets-architecture", "x86_64", "--update-targets-operating-system", "ubuntu")
        assert r.returncode == 0, r.stdout + r.stderr
        job_id = json.loads(r.stdout)["IotJobId"]
        out, err = sub.communicate(timeout=40)
        assert job_id in out, err
        r = cli("describe-job", "--job-id", job_id)
        assert json.loads(r.stdout)["job"]["jobProcessDetails"]["numberOfQueuedThings"] == 1
        r = cli("cancel-job", "--job-id", job_id)
        assert r.returncode == 0
        r = cli("describe-job-execution", "--job-id", job_id, "--thing-name", "cli-thing")
        assert json.loads(r.stdout)["execution"]["status"] == "CANCELED"
        r = cli("create-software-update-job", "--s3-url-signer-role", ROLE, "--software-to-update", "core",
                "--update-targets", "arn:aws:iot:us-east-1:123456789012:thing/cli-thing",
                "--update-targets-architecture", "x86_64", "--update-targets-operating-system", "raspbian")
        assert r.returncode == 1 and json.loads(r.stdout)["__type"] == "BadRequestException"
    finally:
        if sub is not None and sub.poll() is None:
            sub.kill()
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(20)
    assert server.returncode == 0
