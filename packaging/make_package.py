"""Build the installable packages of ggc-ota from a built binary, without dpkg-deb or the
OpenWrt SDK: a `.deb` (Debian, Ubuntu, Raspberry Pi OS: the systemd unit) and an `.ipk`
(OpenWrt's opkg: the procd script and the UCI file as a conffile). Both are the same kind of
file, an `ar` archive of `debian-binary` ("2.0"), `control.tar.gz` (the control file, the
conffiles list, the maintainer scripts) and `data.tar.gz` (the files, owned by root), which
dpkg and opkg both read. The output is reproducible: every time stamp is SOURCE_DATE_EPOCH.

What a package installs:
  /usr/lib/ggc-ota/ggc-ota          the packaged agent (the package manager's copy)
  /usr/lib/ggc-ota/install-agent    copies it to <root>/ota/ota_agent/ggc-ota, where it runs
  .deb: /lib/systemd/system/ggc-ota.service
  .ipk: /etc/init.d/ggc-ota, /etc/config/ggc-ota (a conffile: an upgrade keeps the user's)
The agent runs from the Greengrass root, where a self-update replaces it; the package's own
copy stays apart, so that the package manager's view of its files is never wrong.

Usage: python make_package.py deb|ipk BINARY VERSION ARCH OUTPUT
       python make_package.py release DIST VERSION MACHINE...
  (release: for each machine name, DIST/ggc-ota-MACHINE packaged as DIST/ggc-ota_VERSION_<arch>.deb
  and .ipk; then DIST/SHA256SUMS of every binary and package, as sha256sum -c reads it)"""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import sys
import tarfile
import time
from pathlib import Path
from typing import Dict, List, Tuple

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DESCRIPTION = ("over-the-air update agent for AWS IoT Greengrass v1 cores\n"
               " Takes Greengrass software-update jobs from AWS IoT Jobs, downloads and verifies the\n"
               " new software, swaps it in atomically, runs the managed-respawn scripts, checks the\n"
               " new core's health and rolls back on any failure, including its own update.")
MAINTAINER = "ggc-ota maintainers <ggc-ota@users.noreply.github.com>"

# Debian's architecture names for the binaries' machine names; OpenWrt's are per target (its
# opkg lists the ones it takes in /etc/opkg.conf and /etc/opkg/arch.conf): a static binary runs
# on any of its family, so these are the common ones, and OPKG_ARCH names another
DEB_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "armhf", "armv6l": "armel"}
OPKG_ARCH = {"x86_64": "x86_64", "aarch64": "aarch64_generic", "armv7l": "arm_cortex-a7_neon-vfpv4",
             "armv6l": "arm_arm1176jzf-s_vfp"}

# the maintainer scripts: stop the service before the files change, seed the agent after
DEB_POSTINST = """#!/bin/sh
set -e
if [ "$1" = configure ]; then
    /usr/lib/ggc-ota/install-agent /greengrass
    if [ -d /run/systemd/system ]; then
        systemctl daemon-reload || true
        systemctl enable ggc-ota.service || true
        systemctl try-restart ggc-ota.service || true
    fi
fi
exit 0
"""
DEB_PRERM = """#!/bin/sh
set -e
if [ "$1" = remove ] && [ -d /run/systemd/system ]; then
    systemctl disable --now ggc-ota.service || true
fi
exit 0
"""
DEB_POSTRM = """#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload || true
fi
exit 0
"""
IPK_POSTINST = """#!/bin/sh
# not while an image is being built (IPKG_INSTROOT set): there is no device to seed yet
[ -n "$IPKG_INSTROOT" ] && exit 0
root=$(uci -q get ggc-ota.main.root || echo /greengrass)
/usr/lib/ggc-ota/install-agent "$root" || exit 1
/etc/init.d/ggc-ota enable
/etc/init.d/ggc-ota restart
exit 0
"""
IPK_PRERM = """#!/bin/sh
[ -n "$IPKG_INSTROOT" ] && exit 0
/etc/init.d/ggc-ota stop
/etc/init.d/ggc-ota disable
exit 0
"""


def epoch() -> int:
    return int(os.environ.get("SOURCE_DATE_EPOCH") or 1700000000)


def tar_gz(entries: List[Tuple[str, bytes, int]]) -> bytes:
    """A gzip-compressed tar of (path, content, mode) with the directories leading to them,
    owned by root, all stamped SOURCE_DATE_EPOCH."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.GNU_FORMAT) as tar:
        seen = {"."}
        for path, _, _ in entries:
            parts = path.split("/")[:-1]
            for i in range(1, len(parts) + 1):
                directory = "/".join(parts[:i])
                if directory not in seen:
                    seen.add(directory)
                    info = tarfile.TarInfo("./" + directory)
                    info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, epoch()
                    tar.addfile(info)
        for path, content, mode in entries:
            info = tarfile.TarInfo("./" + path)
            info.size, info.mode, info.mtime = len(content), mode, epoch()
            info.uname = info.gname = "root"
            tar.addfile(info, io.BytesIO(content))
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", mtime=epoch()) as gz:
        gz.write(raw.getvalue())
    return out.getvalue()


def ar_archive(members: List[Tuple[str, bytes]]) -> bytes:
    """The common `ar` format that dpkg and opkg read: a global header, then each member with
    a 60-byte header (name/, time, owner, group, mode, size) and its data padded to an even size."""
    out = [b"!<arch>\n"]
    for name, data in members:
        header = f"{name + '/':<16}{epoch():<12}{0:<6}{0:<6}{'100644':<8}{len(data):<10}`\n".encode()
        assert len(header) == 60, name
        out += [header, data, b"\n" if len(data) % 2 else b""]
    return b"".join(out)


def control_file(kind: str, version: str, arch: str, installed_kib: int) -> bytes:
    fields: Dict[str, str] = {"Package": "ggc-ota", "Version": version, "Architecture": arch,
                              "Maintainer": MAINTAINER, "Installed-Size": str(installed_kib),
                              "Section": "admin" if kind == "deb" else "utils", "Priority": "optional",
                              "Description": DESCRIPTION}
    if kind == "ipk":
        fields["Depends"] = "libc"  # every OpenWrt system has it; the binary itself needs none
        fields["Source"] = "feeds/packages/utils/ggc-ota"
        fields["SourceName"] = "ggc-ota"
        fields["License"] = "Apache-2.0"
    return "".join(f"{k}: {v}\n" for k, v in fields.items()).encode()


def package_files(kind: str, binary: Path) -> List[Tuple[str, bytes, int]]:
    files = [("usr/lib/ggc-ota/ggc-ota", binary.read_bytes(), 0o755),
             ("usr/lib/ggc-ota/install-agent", (HERE / "install-agent.sh").read_bytes(), 0o755)]
    if kind == "deb":
        files.append(("lib/systemd/system/ggc-ota.service", (REPO / "systemd/ggc-ota.service").read_bytes(), 0o644))
    else:
        files += [("etc/init.d/ggc-ota", (REPO / "openwrt/ggc-ota").read_bytes(), 0o755),
                  ("etc/config/ggc-ota", (REPO / "openwrt/ggc-ota.config").read_bytes(), 0o644)]
    return files


def build(kind: str, binary: Path, version: str, arch: str) -> bytes:
    if kind not in ("deb", "ipk"):
        raise SystemExit(f"make_package.py: the kind is deb or ipk, not {kind!r}")
    files = package_files(kind, binary)
    installed_kib = sum(len(content) for _, content, _ in files) // 1024 + 1
    control = [("control", control_file(kind, version, arch, installed_kib), 0o644)]
    if kind == "deb":
        control += [("postinst", DEB_POSTINST.encode(), 0o755), ("prerm", DEB_PRERM.encode(), 0o755),
                    ("postrm", DEB_POSTRM.encode(), 0o755)]
    else:
        control += [("conffiles", b"/etc/config/ggc-ota\n", 0o644),
                    ("postinst", IPK_POSTINST.encode(), 0o755), ("prerm", IPK_PRERM.encode(), 0o755)]
    return ar_archive([("debian-binary", b"2.0\n"), ("control.tar.gz", tar_gz(control)),
                       ("data.tar.gz", tar_gz(files))])


def write(output: Path, data: bytes) -> None:
    tmp = output.with_name(f"{output.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, output)


def release(dist: Path, version: str, machines: List[str]) -> List[Path]:
    """The packages of each machine's binary, then SHA256SUMS of all; returns what it wrote."""
    written = []
    for machine in machines:
        binary = dist / f"ggc-ota-{machine}"
        if machine not in DEB_ARCH or not binary.is_file():
            raise SystemExit(f"make_package.py: no {binary} of a known machine ({', '.join(DEB_ARCH)})")
        for kind, arch in (("deb", DEB_ARCH[machine]), ("ipk", OPKG_ARCH[machine])):
            out = dist / f"ggc-ota_{version}_{arch}.{kind}"
            write(out, build(kind, binary, version, arch))
            written.append(out)
    files = sorted([dist / f"ggc-ota-{m}" for m in machines] + written, key=lambda f: f.name)
    sums = "".join(f"{hashlib.sha256(f.read_bytes()).hexdigest()}  {f.name}\n" for f in files)
    write(dist / "SHA256SUMS", sums.encode())
    return written + [dist / "SHA256SUMS"]


def main(argv: List[str]) -> None:
    usage = __doc__.split("Usage: ")[1]
    if argv[:1] == ["release"] and len(argv) >= 4:
        for path in release(Path(argv[1]), argv[2], argv[3:]):
            print(f"{path}: {path.stat().st_size} bytes")
        return
    if len(argv) != 5:
        raise SystemExit(usage)
    kind, binary, version, arch, output = argv
    data = build(kind, Path(binary), version, arch)
    write(Path(output), data)
    print(f"{output}: {len(data)} bytes ({kind}, {arch}, {time.strftime('%Y-%m-%d', time.gmtime(epoch()))})")


if __name__ == "__main__":
    main(sys.argv[1:])
