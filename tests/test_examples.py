"""The example managed-respawn scripts (examples/managed-respawn/): every end-to-end test runs
them (the look-alike device's scripts end in them, tests/cloud/device.py), with the core started
by its own greengrassd; here, the other two ways a device starts its core: a systemd unit and an
init script (procd, sysvinit), each with a stand-in that records what it was asked."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO

EXAMPLES = REPO / "examples/managed-respawn"
SCRIPTS = ("ggc_pre_update.sh", "ggc_post_update.sh", "ota_pre_update.sh", "ota_post_update.sh")


def stand_in(path: Path, body: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)


def run(script: str, tmp_path: Path, with_systemd: bool = False, with_init: bool = False) -> list:
    calls = tmp_path / "calls"
    bin_dir = tmp_path / "bin"
    root = tmp_path / "greengrass"
    stand_in(root / "ggc/core/greengrassd", f'echo "greengrassd $*" >> {calls}\n')
    unit_there = 0 if with_systemd else 1
    stand_in(bin_dir / "systemctl", f'[ "$1" = cat ] && exit {unit_there}\necho "systemctl $*" >> {calls}\n')
    init = tmp_path / "etc/init.d/greengrass"
    if with_init:
        stand_in(init, f'echo "init $*" >> {calls}\n')
    env = {"PATH": f"{bin_dir}:/usr/sbin:/usr/bin:/sbin:/bin", "GGC_ROOT": str(root),
           "GREENGRASS_INIT_SCRIPT": str(init), "GGC_OTA_ACTION": "update"}
    done = subprocess.run([str(EXAMPLES / script)], capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    return calls.read_text().splitlines() if calls.exists() else []


@pytest.mark.parametrize("script,verb", [("ggc_pre_update.sh", "stop"), ("ggc_post_update.sh", "start")])
def test_the_core_scripts_use_whatever_starts_the_core(tmp_path, script, verb):
    assert run(script, tmp_path / "own") == [f"greengrassd {verb}"]
    assert run(script, tmp_path / "procd", with_init=True) == [f"init {verb}"]
    systemd = run(script, tmp_path / "systemd", with_systemd=True, with_init=True)
    assert systemd == [f"systemctl {verb} greengrass.service"]


@pytest.mark.parametrize("script", ["ota_pre_update.sh", "ota_post_update.sh"])
def test_the_agent_scripts_change_nothing(tmp_path, script):
    assert run(script, tmp_path, with_systemd=True, with_init=True) == []


def test_the_examples_are_portable_sh_and_the_set_ggc_ota_checks_for():
    assert sorted(p.name for p in EXAMPLES.iterdir()) == sorted(SCRIPTS)
    for path in EXAMPLES.iterdir():
        assert path.read_text().startswith("#!/bin/sh\n") and os.access(path, os.X_OK)
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed")
    done = subprocess.run([shellcheck, "-s", "sh", *map(str, sorted(EXAMPLES.iterdir()))], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stdout
    busybox = shutil.which("busybox")
    for path in EXAMPLES.iterdir():  # OpenWrt's shell
        if busybox:
            assert subprocess.run([busybox, "ash", "-n", str(path)], timeout=60).returncode == 0
