"""The static binary (dist/ggc-ota, from ./build.sh binary): no libc from the device, an empty
chroot, daemon mode as systemd's Type=forking drives it, its libraries unpacked once beside it
(page cache, not tmpfs) or in TMPDIR where that cannot be, no room anywhere, and a self-update
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

from tests.agent_harness import Device
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
    return [p.name for p in tmpdir.iterdir() if p.name.startswith(("ggc-ota-", "staticx-", "_MEI"))]


def lib_dir(agent: Path) -> Path:
    """Where the launcher unpacked this binary's libraries: beside it, one directory per version."""
    [found] = [p for p in agent.parent.iterdir() if p.name.startswith(".ggc-ota-") and ".tmp-" not in p.name]
    return found


def mapped_files(pid: int) -> set:
    out = set()
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith("/"):
            out.add(fields[5])
    return out


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
    """One process: the launcher became the agent (exec), so the PID file names the agent
    itself, named ggc-ota, running the unpacked loader beside the binary; nothing in TMPDIR."""
    tmpdir = tmp_path / "t"
    tmpdir.mkdir()
    pid_file = tmp_path / "ggc-ota.pid"
    out = subprocess.run([str(device.agent_path), "--root", str(device.root), "--pid-file", str(pid_file)],
                         capture_output=True, text=True, timeout=60, env={**os.environ, "TMPDIR": str(tmpdir)})
    assert out.returncode == 0, out.stderr
    pid = int(pid_file.read_text())
    assert alive(pid) and os.getsid(pid) == pid and descendants(pid) == []
    assert Path(os.readlink(f"/proc/{pid}/exe")).parent == lib_dir(device.agent_path)
    assert Path(f"/proc/{pid}/comm").read_text().strip() == "ggc-ota"
    device.wait_log("connected to", timeout=30)
    time.sleep(10)  # still there, alone, ten seconds on
    assert alive(pid) and descendants(pid) == [] and extractions(tmpdir) == []
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 5
    while alive(pid):
        assert time.monotonic() < deadline, "the daemon did not stop within 5 s of SIGTERM"
        time.sleep(0.05)
    assert not pid_file.exists()


def shmem_kib() -> int:
    fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    return int(fields["Shmem"].split()[0])


def test_the_libraries_are_unpacked_once_beside_the_binary_and_take_no_tmpfs(device, tmp_path):
    """Every library the agent maps comes from the directory beside the binary (page cache the
    kernel can drop), TMPDIR stays empty and the kernel's tmpfs count does not grow; a second
    start writes nothing there; the modules an update imports late still load; --dry-run says
    where the libraries are."""
    tmpdir = tmp_path / "t"
    tmpdir.mkdir()
    on_tmpfs = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(tmpdir)],
                              capture_output=True).returncode == 0
    env = {**os.environ, "TMPDIR": str(tmpdir)}
    try:
        first = subprocess.run(device.command("--version"), capture_output=True, text=True, timeout=60, env=env)
        assert first.returncode == 0, first.stderr
        libs = lib_dir(device.agent_path)
        before = {f.name: (f.stat().st_ino, f.stat().st_mtime_ns) for f in libs.iterdir()}, libs.stat().st_mtime_ns
        shmem = shmem_kib()
        device.release_core("1.11.6")
        device.proc = subprocess.Popen(device.command("--root", str(device.root), "--foreground"), env=env,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        device.wait_log("connected to", timeout=30)
        time.sleep(1)
        libraries = {f for f in mapped_files(device.proc.pid) if ".so" in f}
        assert libraries and all(Path(f).parent == libs for f in libraries), libraries
        assert extractions(tmpdir) == [] and list(tmpdir.iterdir()) == []
        if on_tmpfs:
            assert shmem_kib() - shmem < 2048, shmem_kib() - shmem
        after = {f.name: (f.stat().st_ino, f.stat().st_mtime_ns) for f in libs.iterdir()}, libs.stat().st_mtime_ns
        assert after == before  # a start that finds them in place writes nothing there
        assert device.wait_status(device.update_job())["status"] == "SUCCEEDED", device.log()[-3000:]
        dry = subprocess.run(device.command("--root", str(device.root), "--dry-run"), capture_output=True,
                             text=True, timeout=60, env=env)
        line = next(x for x in dry.stdout.splitlines() if x.split()[1:2] == ["libraries:"])
        assert line.startswith("OK") and "beside the binary, unpacked once for this version" in line, line
    finally:
        device.stop()
        if on_tmpfs:
            subprocess.run(["umount", "-l", str(tmpdir)], check=False)


def test_with_no_room_beside_the_binary_the_libraries_live_in_tmpdir_for_the_agents_life(device, tmp_path):
    """The binary's directory read-only: the libraries go into TMPDIR, the log says so once at
    WARNING with the reason, --dry-run shows it, a clean stop removes them, and what a SIGKILL
    leaves is removed by the next start."""
    agent_dir = device.agent_path.parent
    if subprocess.run(["mount", "--bind", str(agent_dir), str(agent_dir)], capture_output=True).returncode:
        pytest.skip("cannot bind-mount here (needs root)")
    tmpdir = tmp_path / "t"
    tmpdir.mkdir()
    env = {**os.environ, "TMPDIR": str(tmpdir)}
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(agent_dir)], check=True)
        dry = subprocess.run(device.command("--root", str(device.root), "--dry-run"), capture_output=True,
                             text=True, timeout=60, env=env)
        line = next(x for x in dry.stdout.splitlines() if x.split()[1:2] == ["libraries:"])
        assert "in TMPDIR" in line and "Read-only file system" in line, line
        assert extractions(tmpdir) == []  # the dry-run's own copy went with it
        device.proc = subprocess.Popen(device.command("--root", str(device.root), "--foreground"), env=env,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        device.wait_log("connected to", timeout=30)
        assert device.log().count("WARNING [MainThread] the binary's libraries are in TMPDIR") == 1
        assert extractions(tmpdir) == [f"ggc-ota-{device.proc.pid}"]
        device.stop()
        assert extractions(tmpdir) == []
        connects = device.log().count("connected to")
        device.proc = subprocess.Popen(device.command("--root", str(device.root), "--foreground"), env=env,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 30
        while device.log().count("connected to") == connects:  # this start's own connect
            assert time.monotonic() < deadline, device.log()[-3000:]
            time.sleep(0.1)
        killed = device.proc.pid
        device.kill9()
        assert extractions(tmpdir) == [f"ggc-ota-{killed}"]
        again = subprocess.run(device.command("--version"), capture_output=True, text=True, timeout=60, env=env)
        assert again.returncode == 0 and extractions(tmpdir) == [], extractions(tmpdir)
    finally:
        device.stop()
        subprocess.run(["umount", "-l", str(agent_dir)], check=False)


def test_with_no_room_anywhere_a_start_fails_clearly_and_leaves_nothing(device, tmp_path):
    """A full flash beside the binary and a full TMPDIR: exit 1 (not a usage error), one line
    that names both places and what to do, and nothing left in either for the next try."""
    flash, tmpdir = tmp_path / "flash", tmp_path / "t"
    flash.mkdir()
    tmpdir.mkdir()
    size = BINARY.stat().st_size
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size + 256 * 1024}", "tmpfs", str(flash)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(tmpdir)], check=True)
        shutil.copy(BINARY, flash / "ggc-ota")
        for _ in range(2):
            out = subprocess.run([str(flash / "ggc-ota"), "--root", str(device.root), "--dry-run"],
                                 capture_output=True, text=True, timeout=60, env={**os.environ, "TMPDIR": str(tmpdir)})
            assert out.returncode == 1 and out.stderr.count("\n") == 1, out.stdout + out.stderr
            assert "cannot unpack the agent's libraries" in out.stderr and "No space left on device" in out.stderr
            assert "point TMPDIR at a directory with room" in out.stderr
            assert sorted(p.name for p in flash.iterdir()) == ["ggc-ota"] and list(tmpdir.iterdir()) == []
    finally:
        subprocess.run(["umount", "-l", str(tmpdir)], check=False)
        subprocess.run(["umount", "-l", str(flash)], check=False)


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


def with_another_library_id(binary: bytes) -> bytes:
    """The same binary, as another version's would be: its manifest's id changed (same length),
    so that it unpacks its libraries into a directory of its own."""
    head, _, rest = binary.rpartition(b"\nid ")
    ident, newline, tail = rest.partition(b"\n")
    assert len(ident) == 16 and newline
    other = bytes(b"0123456789abcdef"[(b"0123456789abcdef".index(c) + 1) % 16] for c in ident)
    return head + b"\nid " + other + b"\n" + tail


@pytest.mark.parametrize("outcome", ["commit", "rollback"])
def test_a_self_update_replaces_the_binary_and_its_libraries_together(device, cloud, tmp_path, outcome):
    """The new binary's first start, on trial from staging, unpacks its libraries there; the
    swap moves them in with it and the commit removes the old ones with the old tree. When the
    trial fails, the old binary and its libraries stay, and nothing of the new is left."""
    device.start()
    device.wait_log("connected to", timeout=30)
    old_dir = lib_dir(device.agent_path).name
    new_binary = tmp_path / "new" / "ota/ota_agent/ggc-ota"
    new_binary.parent.mkdir(parents=True)
    new_binary.write_bytes(with_another_library_id(BINARY.read_bytes()))
    new_binary.chmod(0o755)
    art = build_agent_artifact(device.tmp / "agent.tar.gz", new_binary)
    cloud.publish_release(software="ota_agent", version="0.1.1", architecture="x86_64", operating_system="ubuntu",
                          tarball=art.path)
    if outcome == "rollback":
        device.dev.fail_script("ota_post_update.sh", 1, once=True)  # the new agent's trial fails
    job = device.update_job(software="ota_agent")
    if outcome == "commit":
        assert device.wait_exit(90) == 75, device.log()[-3000:]
        device.start()
    ex = device.wait_status(job)
    assert ex["status"] == ("SUCCEEDED" if outcome == "commit" else "FAILED"), device.log()[-3000:]
    dirs = sorted(p.name for p in device.agent_path.parent.iterdir() if p.name.startswith(".ggc-ota-"))
    if outcome == "commit":
        assert dirs == [lib_dir(device.agent_path).name] and dirs != [old_dir]
        assert device.agent_path.read_bytes() == new_binary.read_bytes()
    else:
        assert dirs == [old_dir] and device.agent_path.read_bytes() == BINARY.read_bytes()
    assert not list((device.root / "ota-state/staging").glob("*"))  # the new one's copy went with its staging
