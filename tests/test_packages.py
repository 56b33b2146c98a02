"""The packages (packaging/make_package.py): the .deb read by Debian's own dpkg-deb, the .ipk
(the same ar format, which opkg reads) with its conffile and maintainer scripts, and
install-agent, which both postinst scripts run, against a real device root and the agent under
test (the script, or dist/ggc-ota in the frozen run)."""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tests.agent_harness import agent_under_test, agent_variant
from tests.cloud.device import make_root
from tests.conftest import REPO

MAKE = REPO / "packaging/make_package.py"


def packaged_agent(tmp: Path) -> Path:
    """What a package carries: a copy of the binary under test, or of the script, executable."""
    agent = agent_under_test()
    copy = tmp / "packaged" / "ggc-ota"
    copy.parent.mkdir(exist_ok=True)
    shutil.copyfile(agent, copy)
    copy.chmod(0o755)
    return copy


def build(kind: str, tmp: Path, arch: str, version: str = "0.1.0", binary=None) -> Path:
    out = tmp / f"ggc-ota_{version}_{arch}.{kind}"
    command = [sys.executable, str(MAKE), kind, str(binary or packaged_agent(tmp)), version, arch, str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, SOURCE_DATE_EPOCH="1767225600"))
    assert done.returncode == 0, done.stderr
    return out


def dpkg_deb(*args: str) -> str:
    if shutil.which("dpkg-deb") is None:
        pytest.skip("dpkg-deb is not installed")
    done = subprocess.run(["dpkg-deb", *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def ar_members(path: Path) -> list:
    """(name, data) of each member of an ar archive, read here (the format opkg's reader expects)."""
    data = path.read_bytes()
    assert data[:8] == b"!<arch>\n"
    members, pos = [], 8
    while pos < len(data):
        header = data[pos:pos + 60]
        assert header[58:60] == b"`\n", header
        size = int(header[48:58])
        members.append((header[:16].decode().strip().rstrip("/"), data[pos + 60:pos + 60 + size]))
        pos += 60 + size + size % 2
    return members


def contents(listing: str) -> dict:
    """dpkg-deb --contents: {path: (mode, owner)} of the files."""
    out = {}
    for line in listing.splitlines():
        fields = line.split()
        if not fields[0].startswith("d"):
            out[fields[-1].lstrip(".")] = (fields[0], fields[1])
    return out


@pytest.mark.frozen
def test_the_deb_is_read_by_dpkg_and_holds_the_agent_and_the_unit(tmp_path):
    deb = build("deb", tmp_path, "amd64")
    info = dpkg_deb("--info", str(deb))
    assert "Package: ggc-ota" in info and "Version: 0.1.0" in info and "Architecture: amd64" in info
    files = contents(dpkg_deb("--contents", str(deb)))
    assert files == {"/usr/lib/ggc-ota/ggc-ota": ("-rwxr-xr-x", "root/root"),
                     "/usr/lib/ggc-ota/install-agent": ("-rwxr-xr-x", "root/root"),
                     "/lib/systemd/system/ggc-ota.service": ("-rw-r--r--", "root/root")}
    dpkg_deb("-x", str(deb), str(tmp_path / "data"))
    dpkg_deb("-e", str(deb), str(tmp_path / "control"))
    assert (tmp_path / "data/usr/lib/ggc-ota/ggc-ota").read_bytes() == agent_under_test().read_bytes()
    assert (tmp_path / "data/lib/systemd/system/ggc-ota.service").read_text() == \
        (REPO / "systemd/ggc-ota.service").read_text()
    postinst = (tmp_path / "control/postinst").read_text()
    assert "/usr/lib/ggc-ota/install-agent /greengrass" in postinst and "systemctl enable ggc-ota" in postinst
    assert os.access(tmp_path / "control/postinst", os.X_OK) and os.access(tmp_path / "control/prerm", os.X_OK)
    again = build("deb", tmp_path / "data", "amd64")  # reproducible: the same bytes from the same input
    assert again.read_bytes() == deb.read_bytes()


@pytest.mark.frozen
def test_the_ipk_has_its_uci_file_as_a_conffile_and_the_procd_script(tmp_path):
    ipk = build("ipk", tmp_path, "x86_64")
    assert [name for name, _ in ar_members(ipk)] == ["debian-binary", "control.tar.gz", "data.tar.gz"]
    info = dpkg_deb("--info", str(ipk))  # the same format: Debian's reader takes it too
    assert "Package: ggc-ota" in info and "Architecture: x86_64" in info
    files = contents(dpkg_deb("--contents", str(ipk)))
    assert files["/etc/init.d/ggc-ota"][0] == "-rwxr-xr-x" and files["/etc/config/ggc-ota"][0] == "-rw-r--r--"
    assert "/usr/lib/ggc-ota/ggc-ota" in files and "/lib/systemd/system/ggc-ota.service" not in files
    dpkg_deb("-e", str(ipk), str(tmp_path / "control"))
    assert (tmp_path / "control/conffiles").read_text() == "/etc/config/ggc-ota\n"
    dpkg_deb("-x", str(ipk), str(tmp_path / "data"))
    assert (tmp_path / "data/etc/init.d/ggc-ota").read_text() == (REPO / "openwrt/ggc-ota").read_text()


def test_the_kind_is_checked(tmp_path):
    done = subprocess.run([sys.executable, str(MAKE), "rpm", str(agent_under_test()), "0.1.0", "x86_64",
                           str(tmp_path / "x")], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "deb or ipk" in done.stderr and not (tmp_path / "x").exists()


@pytest.fixture
def device_root(cloud, thing, tmp_path):
    """A device root with an older agent (0.0.9) installed where the agent runs."""
    old = agent_variant(tmp_path, "0.0.9", source=REPO / "ggc_ota.py")
    return make_root(tmp_path / "greengrass", thing, cloud.add_thing(thing), cloud.pki.ca_path, "localhost",
                     cloud.port, agent=old)


def install_agent(root: Path, packaged: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(REPO / "packaging/install-agent.sh"), str(root)], capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, GGC_OTA_PACKAGED=str(packaged)))


def installed_version(root: Path) -> str:
    agent = root / "ota/ota_agent/ggc-ota"
    command = [str(agent)] if os.access(agent, os.X_OK) else [sys.executable, str(agent)]
    return subprocess.run([*command, "--version"], capture_output=True, text=True, timeout=60).stdout.strip()


@pytest.mark.frozen
def test_install_agent_puts_the_packaged_agent_where_it_runs_once(device_root, tmp_path):
    """What each postinst runs: an agent of another version is replaced (the package's version
    wins), the same version is left alone, and nothing of the copy is left beside it."""
    root = device_root.root
    assert installed_version(root) == "ggc-ota 0.0.9"
    done = install_agent(root, packaged_agent(tmp_path))
    assert done.returncode == 0, done.stderr
    assert "is ggc-ota 0.1.0 (it was ggc-ota 0.0.9)" in done.stdout
    assert installed_version(root) == "ggc-ota 0.1.0"
    # nothing of the copy beside it (the binary's own unpacked libraries, .ggc-ota-<id>, aside)
    assert sorted(p.name for p in (root / "ota/ota_agent").iterdir() if not p.name.startswith(".ggc-ota-")) == \
        ["ggc-ota"]
    again = install_agent(root, packaged_agent(tmp_path))
    assert again.returncode == 0 and "is ggc-ota 0.1.0 already" in again.stdout
    # the package's own copy is never run: a binary unpacks its libraries only where it runs
    assert sorted(p.name for p in packaged_agent(tmp_path).parent.iterdir()) == ["ggc-ota"]


def test_install_agent_leaves_an_update_in_flight_alone(device_root, tmp_path):
    """The journal of an update in flight belongs to the agent that runs it: nothing is replaced,
    and the message says what to do."""
    root = device_root.root
    stage = root / "ota-state/staging/JobInFlight"
    journal = {"jobId": "JobInFlight", "executionNumber": 1, "software": "core", "fromVersion": "1.11.5",
               "toVersion": "1.11.6", "startedAt": 1, "live": str(root / "ggc"), "new": str(stage / "new"),
               "old": str(stage / "old"), "stage": str(stage), "liveId": [0, 0], "newId": [0, 0],
               "step": "pre_update", "recoveries": 0, "starts": 0, "exchange": False}
    (root / "ota-state").mkdir(exist_ok=True)
    (root / "ota-state/journal.json").write_text(json.dumps(journal))
    before = (root / "ota/ota_agent/ggc-ota").read_bytes()
    done = install_agent(root, packaged_agent(tmp_path))
    assert done.returncode == 1 and "an update is in flight" in done.stderr and "again once it has ended" in done.stderr
    assert (root / "ota/ota_agent/ggc-ota").read_bytes() == before
    (root / "config/config.json").write_text("{")  # --status cannot tell: the journal itself says so
    done = install_agent(root, packaged_agent(tmp_path))
    assert done.returncode == 1 and "an update is in flight" in done.stderr
    assert (root / "ota/ota_agent/ggc-ota").read_bytes() == before


def test_install_agent_refuses_a_binary_of_another_architecture(device_root, tmp_path):
    foreign = tmp_path / "ggc-ota-foreign"
    foreign.write_bytes(b"\x7fELF" + b"\0" * 60)  # not runnable here
    foreign.chmod(0o755)
    before = (device_root.root / "ota/ota_agent/ggc-ota").read_bytes()
    done = install_agent(device_root.root, foreign)
    assert done.returncode == 1 and "another architecture" in done.stderr
    assert (device_root.root / "ota/ota_agent/ggc-ota").read_bytes() == before


def test_the_ipk_postinst_seeds_the_agent_at_the_uci_root_and_starts_the_service(device_root, tmp_path):
    """The ipk's postinst under BusyBox ash, its absolute paths pointed into this test (uci and
    the init script stand in): the root comes from uci, the agent is seeded there, and the
    service is enabled and restarted; while an image is built (IPKG_INSTROOT) it does nothing."""
    busybox = shutil.which("busybox")
    if busybox is None:
        pytest.skip("busybox is not installed")
    ipk = build("ipk", tmp_path, "x86_64")
    control = dict(ar_members(ipk))["control.tar.gz"]
    with tarfile.open(fileobj=io.BytesIO(control)) as tar:
        postinst = tar.extractfile("./postinst").read().decode()
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    (bin_dir / "uci").write_text(f"#!/bin/sh\n[ \"$*\" = '-q get ggc-ota.main.root' ] && echo {device_root.root}\n")
    (bin_dir / "init").write_text(f"#!/bin/sh\necho \"init $*\" >> {calls}\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    script = postinst.replace("/usr/lib/ggc-ota/install-agent", str(REPO / "packaging/install-agent.sh")) \
        .replace("/etc/init.d/ggc-ota", str(bin_dir / "init"))
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", GGC_OTA_PACKAGED=str(packaged_agent(tmp_path)))
    done = subprocess.run([busybox, "ash", "-c", script], capture_output=True, text=True, timeout=120,
                          env=dict(env, IPKG_INSTROOT=str(tmp_path / "image")))
    assert done.returncode == 0 and not calls.exists() and installed_version(device_root.root) == "ggc-ota 0.0.9"
    done = subprocess.run([busybox, "ash", "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert installed_version(device_root.root) == "ggc-ota 0.1.0"
    assert calls.read_text().splitlines() == ["init enable", "init restart"]

