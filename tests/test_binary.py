"""The static binary (dist/ggc-ota, from ./build.sh binary): no libc from the device, an empty
chroot, daemon mode as systemd's Type=forking drives it, the launcher's death, and a self-update
binary -> binary. Skipped when the binary has not been built."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.agent_harness import Device, extraction_usage
from tests.cloud.device import build_agent_artifact
from tests.conftest import REPO

BINARY = Path(os.environ.get("GGC_OTA_AGENT") or REPO / "dist/ggc-ota")
pytestmark = [pytest.mark.e2e, pytest.mark.frozen,
              pytest.mark.skipif(not BINARY.exists(), reason="no dist/ggc-ota: run ./build.sh binary")]


def descendants(pid: int) -> list:
    out = []
    for child in Path(f"/proc/{pid}/task").glob("*/children"):
        for c in child.read_text().split():
            out.append(int(c))
            out.extend(descendants(int(c)))
    return out


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def extractions(tmpdir: Path) -> list:
    return [p.name for p in tmpdir.iterdir() if p.name.startswith(("staticx-", "_MEI"))]


@pytest.fixture
def device(cloud, tmp_path):
    d = Device(cloud, tmp_path, agent=BINARY)
    d.command = lambda *args: [str(d.agent_path), *args]
    yield d
    d.stop()


def test_static_and_small():
    assert BINARY.stat().st_size <= 8_000_000, BINARY.stat().st_size
    out = subprocess.run(["ldd", str(BINARY)], capture_output=True, text=True)
    assert "not a dynamic executable" in (out.stdout + out.stderr)
    assert subprocess.run([str(BINARY), "--version"], capture_output=True, text=True).stdout.startswith("ggc-ota ")


@pytest.fixture
def chroot(device, tmp_path):
    """An empty root: the binary, a Greengrass root with config and certs, /proc, a TMPDIR."""
    jail = tmp_path / "jail"
    (jail / "proc").mkdir(parents=True)
    (jail / "tmp").mkdir()
    os.chmod(jail / "tmp", 0o1777)
    shutil.copy(BINARY, jail / "ggc-ota")
    shutil.copytree(device.root / "certs", jail / "greengrass/certs")
    for sub in ("ggc", "ota", "usr"):
        shutil.copytree(device.root / sub, jail / f"greengrass/{sub}", symlinks=True)
    cfg = json.loads(device.dev.config_path.read_text())
    cfg["coreThing"]["iotHost"] = "127.0.0.1"  # no resolver files in the jail
    cfg["crypto"]["caPath"] = "file:///greengrass/certs/root.ca.pem"
    principal = cfg["crypto"]["principals"]["IoTCertificate"]
    for key in ("certificatePath", "privateKeyPath"):
        principal[key] = principal[key].replace(str(device.root), "/greengrass")
    cfg["otaAgent"] = {"logFile": "/agent.log", "minFreeBytes": 0}
    (jail / "greengrass/config").mkdir()
    (jail / "greengrass/config/config.json").write_text(json.dumps(cfg))
    if subprocess.run(["mount", "-t", "proc", "proc", str(jail / "proc")]).returncode != 0:
        pytest.skip("cannot mount /proc in a chroot here")
    yield jail
    subprocess.run(["umount", "-l", str(jail / "proc")])


CHROOT = shutil.which("chroot") or "/usr/sbin/chroot"


def in_jail(jail, *args, **kw):
    return subprocess.run([CHROOT, str(jail), "/ggc-ota", *args], capture_output=True, text=True,
                          env={"TMPDIR": "/tmp", "PATH": "/"}, **kw)


def test_empty_chroot_version_dry_run_and_a_real_connection(chroot):
    assert not any((chroot / d).exists() for d in ("lib", "lib64", "usr/lib", "etc"))
    out = in_jail(chroot, "--version", timeout=60)
    assert out.returncode == 0 and out.stdout.startswith("ggc-ota "), out.stderr
    dry = in_jail(chroot, "--root", "/greengrass", "--dry-run", timeout=60)
    assert "OK   credentials" in dry.stdout and "OK   config" in dry.stdout, dry.stdout + dry.stderr
    proc = subprocess.Popen([CHROOT, str(chroot), "/ggc-ota", "--root", "/greengrass", "--foreground"],
                            env={"TMPDIR": "/tmp", "PATH": "/"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while "connected to 127.0.0.1" not in ((chroot / "agent.log").read_text()
                                                if (chroot / "agent.log").exists() else ""):
            assert proc.poll() is None and time.monotonic() < deadline, (chroot / "agent.log").read_text()
            time.sleep(0.1)
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(10)
    assert proc.returncode == 0


def test_daemon_mode_like_systemd(device, tmp_path):
    tmpdir = tmp_path / "t"
    tmpdir.mkdir()
    pid_file = tmp_path / "ggc-ota.pid"
    out = subprocess.run([str(device.agent_path), "--root", str(device.root), "--pid-file", str(pid_file)],
                         capture_output=True, text=True, timeout=60, env={**os.environ, "TMPDIR": str(tmpdir)})
    assert out.returncode == 0, out.stderr
    pid = int(pid_file.read_text())
    assert alive(pid) and os.getsid(pid) == pid
    assert os.readlink(f"/proc/{pid}/exe") == str(device.agent_path)  # the top process: the binary itself
    device.wait_log("connected to", timeout=30)
    tree = [pid, *descendants(pid)]
    assert len(tree) >= 2 and extractions(tmpdir)
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 5
    while any(alive(p) for p in tree):
        assert time.monotonic() < deadline, "the daemon's tree did not stop within 5 s of SIGTERM"
        time.sleep(0.05)
    time.sleep(0.2)
    assert extractions(tmpdir) == []


def shmem_kib() -> int:
    fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    return int(fields["Shmem"].split()[0])


# read by the importer at each later import, so never mapped: PyInstaller's module archives
READ_NOT_MAPPED = {"PYZ.pyz", "base_library.zip"}


def assert_every_unpacked_file_is_in_use(tmpdir: Path, top: int) -> None:
    """Every byte unpacked into TMPDIR is RAM on OpenWrt, so every file there must be one a
    process of the agent's tree maps (a library, the bootloader), or one of the module archives
    the importer reads. A second copy of a library, an extension module nothing imports, or a
    part of the archive left behind fails here, by name."""
    mapped = set()
    for pid in [top, *descendants(top)]:
        for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
            fields = line.split(maxsplit=5)
            if len(fields) == 6:
                mapped.add(os.path.realpath(fields[5]))
    unused = [str(f.relative_to(tmpdir)) for f in sorted(tmpdir.rglob("*"))
              if f.is_file() and not f.is_symlink() and f.name not in READ_NOT_MAPPED
              and os.path.realpath(f) not in mapped]
    assert unused == [], f"unpacked into TMPDIR but used by no process: {unused}"


def test_the_archive_copy_is_freed_once_python_runs_and_later_imports_still_work(device, tmp_path):
    """staticx unpacks PyInstaller's archive (6.6 MiB) into TMPDIR; once Python runs, the agent
    keeps only its module archive (1 MiB, in PyInstaller's directory) and deletes the rest. The
    kernel must see it freed (a file still open or mapped would keep its pages), and the modules
    the agent imports only later (http.client and tarfile for an update) must still load."""
    tmpdir = tmp_path / "t"
    tmpdir.mkdir()
    on_tmpfs = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(tmpdir)],
                              capture_output=True).returncode == 0
    try:
        before = shmem_kib()
        device.release_core("1.11.6")
        device.proc = subprocess.Popen(device.command("--root", str(device.root), "--foreground"),
                                       env={**os.environ, "TMPDIR": str(tmpdir)}, stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL, start_new_session=True)
        device.wait_log("connected to", timeout=30)
        time.sleep(1)
        pkgs = list(tmpdir.glob("staticx-*/*.pkg"))
        modules = list(tmpdir.glob("_MEI*/PYZ.pyz"))
        assert pkgs == [] and len(modules) == 1, sorted(str(p) for p in tmpdir.rglob("*"))
        _, kib = extraction_usage(tmpdir)
        # 24 MiB with the archive kept, 18.4 with Debian's Python and OpenSSL, 14.8 built for size
        assert kib < 16 * 1024, kib
        assert_every_unpacked_file_is_in_use(tmpdir, device.proc.pid)
        # every extension module is inside libpython (packaging/Setup.local): none is a file
        assert list(tmpdir.glob("_MEI*/python3*/lib-dynload/*.so")) == []
        if on_tmpfs:  # what the machine lost agrees: no deleted file is kept alive
            assert shmem_kib() - before < kib + 2048, (shmem_kib() - before, kib)
        assert device.wait_status(device.update_job())["status"] == "SUCCEEDED", device.log()[-3000:]
    finally:
        device.stop()
        if on_tmpfs:
            subprocess.run(["umount", "-l", str(tmpdir)], check=False)


def test_launcher_killed_the_agent_follows_and_the_next_start_cleans_up(device, tmp_path):
    tmpdir = tmp_path / "t"
    tmpdir.mkdir()
    env = {**os.environ, "TMPDIR": str(tmpdir)}
    proc = subprocess.Popen(device.command("--root", str(device.root), "--foreground"), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    device.wait_log("connected to", timeout=30)
    tree = descendants(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(5)
    deadline = time.monotonic() + 10
    while any(alive(p) for p in tree):
        assert time.monotonic() < deadline, "the agent outlived its launcher (PR_SET_PDEATHSIG)"
        time.sleep(0.05)
    stale = extractions(tmpdir)
    assert stale  # SIGKILL left the extraction behind...
    for name in stale:
        os.utime(tmpdir / name, (time.time() - 3600, time.time() - 3600))
    device.proc = subprocess.Popen(device.command("--root", str(device.root), "--foreground"), env=env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    device.wait_log("removed the stale extraction directory", timeout=30)  # ...and the next start removes it
    assert not set(stale) & set(extractions(tmpdir))


def test_self_update_in_the_foreground_exits_75_and_the_next_start_commits(device, cloud):
    """In the foreground the binary cannot exec its successor without nesting its launchers: once
    the new agent has proved itself and is swapped in, it exits 75 for the init system to start
    the new one, which commits. (tests/test_e2e_self_update.py runs this under procd and systemd.)"""
    art = build_agent_artifact(device.tmp / "agent.tar.gz", BINARY)
    cloud.publish_release(software="ota_agent", version="0.1.1", architecture="x86_64", operating_system="ubuntu",
                          tarball=art.path)
    device.start()
    job = device.update_job(software="ota_agent")
    assert device.wait_exit(90) == 75, device.log()[-3000:]
    assert device.execution(job)["status"] == "IN_PROGRESS"
    device.start()
    ex = device.wait_status(job)
    assert ex["status"] == "SUCCEEDED", device.log()[-3000:]
    assert device.dev.hook_calls() == ["ota_pre_update.sh", "ota_post_update.sh"]
