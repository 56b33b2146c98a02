"""The static binary's launcher (packaging/launcher.c) and its bundle (packaging/bundle.py), on a
small bundle built here: this machine's printenv as the program, with its C library and loader,
so that a run prints how the launcher started it. Unpacked once beside the binary and verified at
every start; a damaged, truncated or partial copy replaced, never run; leftovers removed; TMPDIR
when the binary's directory takes nothing (read-only, full), and a clear error, with nothing left
behind, when TMPDIR is full too. The real binary is tested in tests/test_binary.py."""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO


@pytest.fixture(scope="session")
def launcher(tmp_path_factory) -> Path:
    """packaging/launcher.c built as ./build.sh builds it (static, musl, Debian's liblzma)."""
    musl = shutil.which("musl-gcc")
    listing = subprocess.run(["dpkg", "-L", "liblzma-dev"], capture_output=True, text=True)
    lib = next((line for line in listing.stdout.splitlines() if line.endswith("/liblzma.a")), None)
    if musl is None or lib is None:
        pytest.skip("musl-gcc or liblzma-dev is not installed (./build.sh test installs them)")
    work = tmp_path_factory.mktemp("launcher")
    (work / "inc").mkdir()
    shutil.copy("/usr/include/lzma.h", work / "inc")
    shutil.copytree("/usr/include/lzma", work / "inc/lzma")
    out = work / "launcher"
    subprocess.run([musl, "-static", "-Os", "-Wall", "-Wextra", "-Werror", "-Wno-format-truncation",
                    f"-I{work / 'inc'}", "-o", str(out), str(REPO / "packaging/launcher.c"), lib], check=True,
                   timeout=300)
    return out


@pytest.fixture(scope="session")
def bundle():
    spec = importlib.util.spec_from_file_location("bundle", REPO / "packaging/bundle.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def small_binary(launcher, bundle, tmp_path_factory) -> bytes:
    onedir = tmp_path_factory.mktemp("onedir")
    shutil.copy(shutil.which("printenv"), onedir / "printenv")
    (onedir / "data.bin").write_bytes(os.urandom(300_000))  # a file that does not compress
    return bundle.build(onedir, launcher, program="printenv")


def install(tmp_path: Path, binary: bytes) -> Path:
    path = tmp_path / "ota_agent" / "ggc-ota"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(binary)
    path.chmod(0o755)
    return path


def run(binary: Path, tmpdir: Path, *names: str) -> subprocess.CompletedProcess:
    tmpdir.mkdir(exist_ok=True)
    names = names or ("GGC_OTA_LAUNCHER_MODE", "GGC_OTA_LAUNCHER_LIBS")
    return subprocess.run([str(binary), *names], capture_output=True, text=True, timeout=60,
                          env={"TMPDIR": str(tmpdir), "PATH": "/usr/bin:/bin"})


def lib_dirs(directory: Path) -> list:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(".ggc-ota-"))


def snapshot(directory: Path) -> dict:
    """Every file's inode, size and modification time: what a start that writes nothing leaves."""
    return {p.name: (p.stat().st_ino, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(directory.iterdir())}


def test_unpacked_once_beside_the_binary_then_only_verified(tmp_path, small_binary):
    binary = install(tmp_path, small_binary)
    first = run(binary, tmp_path / "t")
    assert first.returncode == 0, first.stderr
    mode, libs = first.stdout.splitlines()
    [name] = lib_dirs(binary.parent)
    assert mode == "flash-new" and libs == str(binary.parent / name)
    assert {"printenv", "data.bin", "libc.so.6", ".manifest"} <= set(os.listdir(libs))
    before = snapshot(Path(libs)), Path(libs).stat().st_ino
    second = run(binary, tmp_path / "t", "GGC_OTA_LAUNCHER_MODE", "GGC_OTA_LAUNCHER_EXE")
    assert second.stdout.splitlines() == ["flash", str(binary)]
    assert (snapshot(Path(libs)), Path(libs).stat().st_ino) == before  # nothing written
    assert list((tmp_path / "t").iterdir()) == []  # nothing in TMPDIR


@pytest.mark.parametrize("damage", ["flip a byte", "truncate", "no manifest", "a link instead", "another mode"])
def test_a_damaged_copy_is_replaced_never_run(tmp_path, small_binary, damage):
    binary = install(tmp_path, small_binary)
    assert run(binary, tmp_path / "t").returncode == 0
    libs = binary.parent / lib_dirs(binary.parent)[0]
    good = (libs / "data.bin").read_bytes()
    if damage == "flip a byte":
        with open(libs / "data.bin", "r+b") as f:
            f.seek(123_456)
            byte = f.read(1)
            f.seek(123_456)
            f.write(bytes([byte[0] ^ 1]))
    elif damage == "truncate":
        os.truncate(libs / "data.bin", 1000)
    elif damage == "no manifest":
        (libs / ".manifest").unlink()
    elif damage == "a link instead":
        (libs / "data.bin").rename(tmp_path / "elsewhere.bin")
        (libs / "data.bin").symlink_to(tmp_path / "elsewhere.bin")
    else:
        (libs / "data.bin").chmod(0o666)
    again = run(binary, tmp_path / "t")
    assert again.returncode == 0 and again.stdout.splitlines()[0] == "flash-new", again.stderr
    assert (libs / "data.bin").read_bytes() == good and not (libs / "data.bin").is_symlink()
    assert oct((libs / "data.bin").stat().st_mode & 0o777) == oct(0o644)


def test_leftovers_beside_the_binary_are_removed(tmp_path, small_binary):
    """An unpack a power cut interrupted (.tmp-<pid> of a process that is gone) and another
    version's directory (the binary was replaced in place) go; a live process's unpack stays."""
    binary = install(tmp_path, small_binary)
    dead = binary.parent / ".ggc-ota-0123456789abcdef.tmp-999999999"
    other = binary.parent / ".ggc-ota-fedcba9876543210"
    live = binary.parent / f".ggc-ota-0123456789abcdef.tmp-{os.getpid()}"
    for d in (dead, other, live):
        d.mkdir()
        (d / "libc.so.6").write_bytes(b"partial")
    assert run(binary, tmp_path / "t").returncode == 0
    assert not dead.exists() and not other.exists() and live.exists()
    assert len(lib_dirs(binary.parent)) == 2  # this version's, and the live unpack


@pytest.fixture
def mounts(tmp_path):
    made = []

    def mount(path: Path, size: str, *options: str) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        opts = ",".join((f"size={size}",) + options)
        if subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True).returncode:
            pytest.skip("cannot mount a tmpfs here (needs root)")
        made.append(path)
        return path
    yield mount
    for path in reversed(made):
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_read_only_beside_the_binary_falls_back_to_tmpdir(tmp_path, small_binary, mounts):
    flash = mounts(tmp_path / "flash", "16m")
    binary = install(flash, small_binary)
    subprocess.run(["mount", "-o", "remount,ro", str(flash)], check=True)
    out = run(binary, tmp_path / "t")
    assert out.returncode == 0, out.stderr
    mode, libs = out.stdout.splitlines()
    assert mode.startswith("tmpdir: ") and "Read-only file system" in mode, mode
    assert Path(libs).parent == tmp_path / "t" and Path(libs).name.startswith("ggc-ota-")
    # that process is gone: the next start removes what it left in TMPDIR
    assert run(binary, tmp_path / "t").returncode == 0
    assert not Path(libs).exists() and len(list((tmp_path / "t").iterdir())) == 1


def test_no_room_anywhere_is_a_clear_error_that_leaves_nothing(tmp_path, small_binary, mounts):
    """A full flash and a full TMPDIR: exit 1, one message naming both places and why, and no
    partial unpack in either (the next try would have less room still)."""
    size = len(small_binary)
    flash = mounts(tmp_path / "flash", f"{size + 64 * 1024}")
    tmpdir = mounts(tmp_path / "t", "64k")
    binary = install(flash, small_binary)
    for _ in range(2):
        out = run(binary, tmpdir)
        assert out.returncode == 1, out.stdout + out.stderr
        assert out.stderr.count("\n") == 1 and out.stderr.startswith("ggc-ota: cannot unpack the agent's libraries")
        assert "beside the binary" in out.stderr and "No space left on device" in out.stderr
        assert str(tmpdir) in out.stderr and "Traceback" not in out.stderr
        assert lib_dirs(flash) == [] and list(tmpdir.iterdir()) == []


def test_a_truncated_binary_says_so(tmp_path, small_binary):
    binary = install(tmp_path, small_binary[:-100])
    out = run(binary, tmp_path / "t")
    assert out.returncode == 70 and "damaged or truncated" in out.stderr and lib_dirs(binary.parent) == []


def test_the_manifest_names_every_file_with_its_crc64(bundle, small_binary):
    """CRC-64 here is liblzma's (the launcher checks every unpacked file with lzma_crc64, and
    the tests above pass only when the two agree); this pins the reference value."""
    assert bundle.crc64(b"123456789") == 0x995DC9BBDF1939FA
    text = small_binary[-64 - 4096:].split(b"ggc-ota-libraries 1\n")[1].split(b"GGCOTAL1")[0].decode()
    lines = text.splitlines()
    assert lines[0].startswith("id ") and lines[1].startswith("loader ld-") and lines[2] == "program printenv"
    assert any(line.endswith(" data.bin") and line.startswith("file 0644 300000 ") for line in lines)
