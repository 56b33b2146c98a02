"""The device fixture: a Greengrass root in both config.json forms, the fake core daemon, the
four look-alike scripts (logging, told to fail or hang), and the artifact builder."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import tarfile

import pytest

from tests.cloud.device import SCRIPTS, build_agent_artifact, build_core_artifact, make_root


@pytest.fixture(params=["current", "legacy"])
def root(request, cloud, thing, tmp_path):
    return make_root(tmp_path / "greengrass", thing, cloud.add_thing(thing), cloud.pki.ca_path, "localhost",
                     cloud.port, form=request.param)


def test_config_forms(root):
    cfg = json.loads(root.config_path.read_text())
    core = cfg["coreThing"]
    assert core["thingArn"].endswith("thing/" + root.thing) and core["iotHost"] == "localhost"
    if "crypto" in cfg:
        cert_uri = cfg["crypto"]["principals"]["IoTCertificate"]["certificatePath"]
        assert cert_uri.startswith("file://") and os.path.exists(cert_uri[len("file://"):])
        assert os.path.exists(cfg["crypto"]["caPath"][len("file://"):])
    else:
        assert (root.root / "certs" / core["certPath"]).exists()
        assert (root.root / "certs" / core["keyPath"]).exists()


def test_layout_and_script_permissions(root):
    for name in SCRIPTS:
        st = (root.root / "usr/scripts" / name).stat()
        assert stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid()
        assert stat.S_IMODE(st.st_mode) == 0o700
    assert root.core_version() == "1.11.5"
    kept = root.kept_state()
    assert any(p.startswith("ggc/deployment/") for p in kept) and any(p.startswith("ggc/var/") for p in kept)
    assert (root.root / "ota/ota_agent").is_dir()


def test_scripts_log_and_drive_the_daemon(root):
    scripts = root.root / "usr/scripts"
    env = {"PATH": "/usr/bin:/bin", "GGC_OTA_JOB_ID": "job-1", "GGC_OTA_COMPONENT": "core"}
    assert subprocess.run([scripts / "ggc_post_update.sh"], env=env, timeout=20).returncode == 0
    pid = int((root.lab / "greengrassd.pid").read_text())
    os.kill(pid, 0)
    assert subprocess.run([scripts / "ggc_pre_update.sh"], env=env, timeout=20).returncode == 0
    assert not (root.lab / "greengrassd.pid").exists()
    assert root.hook_calls() == ["ggc_post_update.sh", "greengrassd start", "ggc_pre_update.sh",
                                 "greengrassd stop"]
    assert "job=job-1 component=core" in root.hook_log()


def test_scripts_fail_and_hang_on_request(root):
    script = root.root / "usr/scripts/ota_pre_update.sh"
    root.fail_script("ota_pre_update.sh", 7, once=True)
    assert subprocess.run([script], timeout=20).returncode == 7
    assert subprocess.run([script], timeout=20).returncode == 0
    root.fail_script("ota_pre_update.sh", 3)
    assert subprocess.run([script], timeout=20).returncode == 3
    assert subprocess.run([script], timeout=20).returncode == 3
    root.clear_script_faults()
    root.hang_script("ota_pre_update.sh", 30)
    with pytest.raises(subprocess.TimeoutExpired):
        subprocess.run([script], timeout=1)


def test_core_artifact_layout(tmp_path):
    art = build_core_artifact(tmp_path / "core.tar.gz", "1.11.6", payload_bytes=1000)
    with tarfile.open(art.path) as tar:
        names = set(tar.getnames())
        members = tar.getmembers()
    assert "greengrass/ggc/core/greengrassd" in names
    assert "greengrass/ggc/packages/1.11.6/VERSION" in names
    assert "greengrass/config/config.json" in names  # AWS ships config/ too; the agent ignores it
    assert all(m.uid == 0 for m in members)
    assert len(art.sha256) == 64 and art.size == art.path.stat().st_size


def test_agent_artifact_layout(tmp_path):
    agent = tmp_path / "agent"
    agent.write_text("#!/bin/sh\necho agent\n")
    art = build_agent_artifact(tmp_path / "agent.tar.gz", agent)
    with tarfile.open(art.path) as tar:
        info = tar.getmember("greengrass/ota/ota_agent/ggc-ota")
    assert info.isfile() and info.mode & 0o100
