"""Make the static binary: the launcher (packaging/launcher.c, static) followed by the agent
frozen by PyInstaller as a directory, with the C libraries that directory needs (found with
ldd, the build machine's glibc and its loader), as one xz stream; then the manifest (each
file's name, mode, size and CRC-64, in the stream's order) and a 64-byte trailer:
"GGCOTAL1", then the stream's offset and length, the manifest's offset and length (each a
little-endian uint64), zero padding.

The launcher unpacks the directory once per version beside the binary and runs the agent from
there (see launcher.c). The xz stream uses a dictionary of 8 MiB (what the launcher's decoder
needs in RAM, once per version) and x86's branch filter where it applies.

Usage: python bundle.py ONEDIR LAUNCHER OUTPUT   (LD_LIBRARY_PATH as the build's Python needs)"""
from __future__ import annotations

import hashlib
import lzma
import os
import platform
import re
import struct
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Tuple

MAGIC = b"GGCOTAL1"
LDD_LINE = re.compile(r"^\s*(\S+)\s+=>\s+(\S+)\s+\(0x[0-9a-f]+\)$")
LOADER_LINE = re.compile(r"^\s*(/\S*ld-[^/\s]+\.so\.\d+)\s+\(0x[0-9a-f]+\)$")
DICT_SIZE = 8 << 20


def is_elf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"\x7fELF"


def dependencies(elf: Path) -> Tuple[Dict[str, Path], Path]:
    """What the loader maps for `elf`: {soname: file} and the loader itself."""
    out = subprocess.run(["ldd", str(elf)], capture_output=True, text=True, check=True).stdout
    libs, loader = {}, None
    for line in out.splitlines():
        m = LDD_LINE.match(line)
        if m and m.group(2).startswith("/"):
            libs[m.group(1)] = Path(m.group(2))
            continue
        m = LOADER_LINE.match(line)
        if m:
            loader = Path(m.group(1))
    if loader is None:
        raise SystemExit(f"bundle.py: ldd names no loader for {elf}:\n{out}")
    return libs, loader


def collect(onedir: Path, program: str) -> Tuple[List[Tuple[str, bytes, int]], str]:
    """The files of the frozen directory (it must be flat) and the C libraries its ELF files
    need that it lacks, each under the name the loader looks for; and the loader's name."""
    files: Dict[str, Tuple[bytes, int]] = {}
    for path in sorted(onedir.iterdir()):
        if path.is_dir():
            raise SystemExit(f"bundle.py: {path} is a directory; build the agent with --contents-directory .")
        files[path.name] = (path.read_bytes(), 0o755 if os.access(path, os.X_OK) else 0o644)
    if program not in files:
        raise SystemExit(f"bundle.py: no {program} in {onedir}")
    loader = None
    for name in list(files):
        if not is_elf(onedir / name):
            continue
        libs, found = dependencies(onedir / name)
        loader = loader or found
        for soname, path in libs.items():
            if soname not in files:
                files[soname] = (path.resolve().read_bytes(), 0o644)
    assert loader is not None
    files[loader.name] = (loader.resolve().read_bytes(), 0o755)
    empty = [name for name, (data, _) in files.items() if not data]
    if empty:
        raise SystemExit(f"bundle.py: empty files cannot be carried: {empty}")
    # the loader and the program first: what a start needs soonest
    order = [loader.name, program] + sorted(n for n in files if n not in (loader.name, program))
    return [(name, files[name][0], files[name][1]) for name in order], loader.name


_TABLE: List[int] = []


def crc64(data: bytes) -> int:
    """CRC-64/XZ (ECMA-182, reflected), as liblzma's lzma_crc64 computes it (a test checks the
    two agree)."""
    if not _TABLE:
        for i in range(256):
            crc = i
            for _ in range(8):
                crc = (crc >> 1) ^ (0xC96C5795D7870F42 if crc & 1 else 0)
            _TABLE.append(crc)
    crc, table = 0xFFFFFFFFFFFFFFFF, _TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFFFFFFFFFF


def manifest(files: List[Tuple[str, bytes, int]], loader: str, program: str) -> bytes:
    lines = [f"file {mode:04o} {len(data)} {crc64(data):016x} {name}" for name, data, mode in files]
    ident = hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]
    head = ["ggc-ota-libraries 1", f"id {ident}", f"loader {loader}", f"program {program}"]
    return ("\n".join(head + lines) + "\n").encode()


def compress(data: bytes) -> bytes:
    filters: List[dict] = []
    if platform.machine() in ("x86_64", "i686"):
        filters.append({"id": lzma.FILTER_X86})
    filters.append({"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME, "dict_size": DICT_SIZE})
    return lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, filters=filters)


def build(onedir: Path, launcher: Path, program: str = "ggc-ota-dynamic") -> bytes:
    files, loader = collect(onedir, program)
    head = launcher.read_bytes()
    payload = compress(b"".join(data for _, data, _ in files))
    text = manifest(files, loader, program)
    trailer = MAGIC + struct.pack("<4Q", len(head), len(payload), len(head) + len(payload), len(text))
    return head + payload + text + trailer.ljust(64, b"\0")


def main(argv: List[str]) -> None:
    if len(argv) != 3:
        raise SystemExit(__doc__.split("Usage: ")[1])
    onedir, launcher, output = (Path(a) for a in argv)
    data = build(onedir, launcher)
    tmp = output.with_name(output.name + ".tmp")
    tmp.write_bytes(data)
    tmp.chmod(0o755)
    os.replace(tmp, output)


if __name__ == "__main__":
    main(sys.argv[1:])
