"""A Greengrass v1 core's root directory as the agent meets it on a device (docs/contract.md,
"The Greengrass root on a device"), and a builder for update artifacts (the same, "The job
document and the artifact").

The root's "lab" directory (`<root>.lab`, beside the root, never inside it) is where the
look-alike scripts and the fake core daemon log their calls and read what the test wants of
them: `<script>.fail` (exit code, every call), `<script>.fail-once` (exit code, next call only),
`<script>.hang` (seconds to sleep first), `<script>.fail-with` (a version: fails while the live
core is that version), `greengrassd.<version>.dies-after` (seconds the core daemon of that
version lives).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
import signal
import subprocess
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .pki import ClientCert

# the managed-respawn scripts an operator starts from (the README's "Configure")
EXAMPLES = Path(__file__).resolve().parents[2] / "examples/managed-respawn"
# where the static binary's launcher unpacks its libraries, beside the binary (packaging/launcher.c)
LAUNCHER_CACHE = ".ggc-ota-"
SCRIPTS = ("ggc_pre_update.sh", "ggc_post_update.sh", "ota_pre_update.sh", "ota_post_update.sh")
KEPT = ("ggc/deployment", "ggc/var")

# Locate the root from a script's own path: <root>/usr/scripts/x.sh or <root>/ggc/core/greengrassd.
_LAB = 'root=$(cd "$(dirname "$0")/../.." && pwd)\nlab="$root.lab"\n'

HOOK_SCRIPT = """#!/bin/sh
# Look-alike managed-respawn script: logs each call, can be told to fail or to hang, then runs
# the example script of its name.
name=$(basename "$0")
{lab}mkdir -p "$lab"
echo "$name job=${{GGC_OTA_JOB_ID:-}} component=${{GGC_OTA_COMPONENT:-}}" \
  "from=${{GGC_OTA_OLD_VERSION:-}} to=${{GGC_OTA_NEW_VERSION:-}} action=${{GGC_OTA_ACTION:-}}" \
  "moving=${{GGC_OTA_FROM_VERSION:-}}->${{GGC_OTA_TO_VERSION:-}}" >> "$lab/hooks.log"
if [ -f "$lab/$name.hang" ]; then sleep "$(cat "$lab/$name.hang")"; fi
if [ -f "$lab/$name.fail-once" ]; then
  code=$(cat "$lab/$name.fail-once"); rm -f "$lab/$name.fail-once"; exit "$code"
fi
if [ -f "$lab/$name.fail" ]; then exit "$(cat "$lab/$name.fail")"; fi
if [ -f "$lab/$name.fail-with" ]; then  # fails while the live core is that version
  live=$(ls "$root/ggc/packages" 2>/dev/null | sort | tail -n 1)
  if [ "$live" = "$(cat "$lab/$name.fail-with")" ]; then exit 2; fi
fi
# then the example script of that name (examples/managed-respawn/, copied into the lab), as an
# operator installs it: it stops or starts the core with greengrassd here
GGC_ROOT=${{GGC_ROOT:-$root}}
export GGC_ROOT
exec "$lab/examples/$name"
"""

GREENGRASSD = """#!/bin/sh
# Look-alike Greengrass core daemon: `start` runs a placeholder process and writes its pid file,
# `stop` ends it. Each call is logged to the lab's hooks.log with the version it belongs to.
{lab}version=$(ls "$root/ggc/packages" 2>/dev/null | sort | tail -n 1)
mkdir -p "$lab"
pidfile="$lab/greengrassd.pid"
echo "greengrassd $1 version=$version" >> "$lab/hooks.log"
if [ -f "$lab/greengrassd.fail" ]; then exit "$(cat "$lab/greengrassd.fail")"; fi
case "$1" in
  start)
    if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then exit 0; fi
    if [ -f "$lab/greengrassd.$version.dies-after" ]; then
      nohup sleep "$(cat "$lab/greengrassd.$version.dies-after")" >/dev/null 2>&1 &
    else
      nohup sh -c 'while :; do sleep 1; done' >/dev/null 2>&1 &
    fi
    echo $! > "$pidfile"
    echo "$version" > "$lab/greengrassd.version" ;;
  stop)
    if [ -f "$pidfile" ]; then kill "$(cat "$pidfile")" 2>/dev/null; rm -f "$pidfile"; fi ;;
  *) echo "usage: greengrassd start|stop" >&2; exit 2 ;;
esac
exit 0
"""


@dataclass
class DeviceRoot:
    root: Path
    thing: str
    config_path: Path

    @property
    def lab(self) -> Path:
        return Path(str(self.root) + ".lab")

    def hook_calls(self) -> list[str]:
        try:
            return [line.split()[0] + (" " + line.split()[1] if line.startswith("greengrassd") else "")
                    for line in (self.lab / "hooks.log").read_text().splitlines()]
        except FileNotFoundError:
            return []

    def hook_log(self) -> str:
        try:
            return (self.lab / "hooks.log").read_text()
        except FileNotFoundError:
            return ""

    def fail_script(self, name: str, code: int = 1, once: bool = False) -> None:
        (self.lab / (name + (".fail-once" if once else ".fail"))).write_text(str(code))

    def fail_script_with(self, name: str, version: str) -> None:
        """`name` fails (exit 2) whenever the live core is `version`: a new core that cannot start."""
        (self.lab / f"{name}.fail-with").write_text(version)

    def hang_script(self, name: str, seconds: float) -> None:
        (self.lab / f"{name}.hang").write_text(str(seconds))

    def clear_script_faults(self) -> None:
        for p in self.lab.glob("*.fail*"):
            p.unlink()
        for p in self.lab.glob("*.hang"):
            p.unlink()

    def core_version(self) -> Optional[str]:
        versions = sorted(p.name for p in (self.root / "ggc/packages").iterdir()) if (
            self.root / "ggc/packages").is_dir() else []
        return versions[-1] if versions else None

    def kept_state(self) -> dict[str, str]:
        """sha256 of every file under the kept directories, by path relative to the root."""
        out = {}
        for kept in KEPT:
            base = self.root / kept
            for p in sorted(base.rglob("*")):
                if p.is_file():
                    out[str(p.relative_to(self.root))] = hashlib.sha256(p.read_bytes()).hexdigest()
        return out

    def tree_digest(self, sub: str) -> dict[str, str]:
        """Every name under <root>/<sub>, with its content. The static binary's unpacked libraries
        (.ggc-ota-<id> beside it) are left out: a cache of the binary, verified at each start."""
        out = {}
        for p in sorted((self.root / sub).rglob("*")):
            rel = str(p.relative_to(self.root))
            if any(part.startswith(LAUNCHER_CACHE) for part in p.relative_to(self.root).parts):
                continue
            if p.is_symlink():
                out[rel] = "link:" + os.readlink(p)
            elif p.is_file():
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                out[rel] = "dir"
        return out


def _write_exec(path: Path, text: str, mode: int = 0o700) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    os.chmod(path, mode)


def write_core_tree(ggc: Path, version: str, payload_bytes: int = 0, seed: int = 0) -> None:
    """The software part of `ggc/` for `version` (no kept state)."""
    _write_exec(ggc / "core/greengrassd", GREENGRASSD.format(lab=_LAB), 0o755)
    pkg = ggc / "packages" / version
    (pkg / "bin").mkdir(parents=True, exist_ok=True)
    (pkg / "bin/daemon").write_text(f"#!/bin/sh\necho greengrass daemon {version}\n")
    os.chmod(pkg / "bin/daemon", 0o755)
    (pkg / "VERSION").write_text(version + "\n")
    (pkg / "lib").mkdir(exist_ok=True)
    os.symlink("../VERSION", pkg / "lib/VERSION.link")
    if payload_bytes:
        rng = random.Random(seed)
        (pkg / "lib/payload.bin").write_bytes(rng.randbytes(payload_bytes) if hasattr(rng, "randbytes")
                                              else os.urandom(payload_bytes))


def write_kept_state(ggc: Path, seed: int = 1) -> None:
    rng = random.Random(seed)
    (ggc / "deployment/group").mkdir(parents=True, exist_ok=True)
    (ggc / "deployment/group/group.json").write_text(json.dumps({"Version": rng.random(), "Lambdas": []}))
    (ggc / "deployment/lambda").mkdir(parents=True, exist_ok=True)
    (ggc / "deployment/lambda/function.zip").write_bytes(bytes(rng.getrandbits(8) for _ in range(4096)))
    (ggc / "var/state/shadow").mkdir(parents=True, exist_ok=True)
    (ggc / "var/state/shadow/shadow.db").write_bytes(bytes(rng.getrandbits(8) for _ in range(8192)))
    (ggc / "var/log").mkdir(parents=True, exist_ok=True)
    (ggc / "var/log/runtime.log").write_text(f"runtime log {rng.random()}\n")


def config_document(root: Path, thing: str, ca: Path, cert: Path, key: Path, iot_host: str, port: int,
                    form: str = "current", managed_respawn: bool = True, keep_alive: int = 600,
                    ota_agent: Optional[dict] = None) -> dict:
    """config.json as Greengrass v1 writes it: `legacy` (paths relative to certs/) or `current`
    (`crypto` block with file:// URIs, Greengrass 1.6 and later)."""
    core = {
        "caPath": ca.name, "certPath": cert.name, "keyPath": key.name,
        "thingArn": f"arn:aws:iot:us-east-1:123456789012:thing/{thing}",
        "iotHost": iot_host, "ggHost": "greengrass-ats.iot.us-east-1.amazonaws.com",
        "keepAlive": keep_alive,
    }
    doc: dict = {"coreThing": core, "runtime": {"cgroup": {"useSystemd": "yes"}},
                 "managedRespawn": managed_respawn}
    if form == "current":
        core["iotMqttPort"] = port
        doc["crypto"] = {
            "caPath": f"file://{root}/certs/{ca.name}",
            "principals": {
                "IoTCertificate": {"privateKeyPath": f"file://{root}/certs/{key.name}",
                                   "certificatePath": f"file://{root}/certs/{cert.name}"},
                "SecretsManager": {"privateKeyPath": f"file://{root}/certs/{key.name}"},
            },
        }
    elif form == "legacy":
        core["iotMqttPort"] = port  # legacy files written by hand for a local broker still name the port
    else:
        raise ValueError(f"unknown config form {form!r}")
    if ota_agent is not None:
        doc["otaAgent"] = ota_agent
    return doc


def make_root(root: Path, thing: str, cert: ClientCert, ca_path: Path, iot_host: str, port: int,
              form: str = "current", managed_respawn: bool = True, core_version: str = "1.11.5",
              agent: Optional[Path] = None, ota_agent: Optional[dict] = None,
              keep_alive: int = 600) -> DeviceRoot:
    """Lay out a Greengrass root. `agent`: a file to install as ota/ota_agent/ggc-ota."""
    root = Path(root)
    certs = root / "certs"
    certs.mkdir(parents=True, exist_ok=True)
    ca = certs / "root.ca.pem"
    shutil.copyfile(ca_path, ca)
    dev_cert = certs / f"{thing}.cert.pem"
    dev_key = certs / f"{thing}.private.key"
    shutil.copyfile(cert.cert, dev_cert)
    shutil.copyfile(cert.key, dev_key)
    os.chmod(dev_key, 0o600)
    config = root / "config/config.json"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(json.dumps(config_document(root, thing, ca, dev_cert, dev_key, iot_host, port, form,
                                                 managed_respawn, keep_alive, ota_agent), indent=2))
    write_core_tree(root / "ggc", core_version)
    write_kept_state(root / "ggc", seed=hash(thing) & 0xFFFF)
    scripts = root / "usr/scripts"
    for name in SCRIPTS:
        _write_exec(scripts / name, HOOK_SCRIPT.format(lab=_LAB), 0o700)
    os.chmod(scripts, 0o755)
    ota_dir = root / "ota/ota_agent"
    ota_dir.mkdir(parents=True, exist_ok=True)
    if agent is not None:
        shutil.copyfile(agent, ota_dir / "ggc-ota")
        os.chmod(ota_dir / "ggc-ota", 0o755)
    lab = Path(str(root) + ".lab")
    lab.mkdir(exist_ok=True)
    shutil.copytree(EXAMPLES, lab / "examples", dirs_exist_ok=True)
    return DeviceRoot(root, thing, config)


# ---- artifacts --------------------------------------------------------------------------
@dataclass(frozen=True)
class Artifact:
    path: Path
    sha256: str
    size: int


def _finish(path: Path) -> Artifact:
    data_hash = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            data_hash.update(chunk)
    return Artifact(path, data_hash.hexdigest(), path.stat().st_size)


def _add_tree(tar: tarfile.TarFile, src: Path, arcname: str) -> None:
    def clean(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        info.mtime = int(time.time())
        return info
    tar.add(str(src), arcname=arcname, filter=clean)


def build_core_artifact(out: Path, version: str, payload_bytes: int = 0, workdir: Optional[Path] = None,
                        with_config: bool = True) -> Artifact:
    """A core release tarball: greengrass/ggc/... for `version` (and, like AWS's, config/ and
    certs/ that the agent must ignore)."""
    work = Path(workdir or str(out) + ".d")
    if work.exists():
        shutil.rmtree(work)
    write_core_tree(work / "greengrass/ggc", version, payload_bytes, seed=hash(version) & 0xFFFF)
    if with_config:
        (work / "greengrass/config").mkdir(parents=True)
        (work / "greengrass/config/config.json").write_text('{"coreThing": {}}\n')
        (work / "greengrass/certs").mkdir()
        (work / "greengrass/certs/README").write_text("put your certificates here\n")
    with tarfile.open(out, "w:gz") as tar:
        _add_tree(tar, work / "greengrass", "greengrass")
    shutil.rmtree(work)
    return _finish(Path(out))


def build_agent_artifact(out: Path, agent: Path, workdir: Optional[Path] = None,
                         extra: Optional[dict[str, bytes]] = None) -> Artifact:
    """An ota_agent release tarball: greengrass/ota/ota_agent/ggc-ota = `agent`, and `extra`
    files (name -> content) beside it, executable."""
    work = Path(workdir or str(out) + ".d")
    if work.exists():
        shutil.rmtree(work)
    dest = work / "greengrass/ota/ota_agent/ggc-ota"
    dest.parent.mkdir(parents=True)
    shutil.copyfile(agent, dest)
    os.chmod(dest, 0o755)
    for name, content in (extra or {}).items():
        (dest.parent / name).write_bytes(content)
        os.chmod(dest.parent / name, 0o755)
    with tarfile.open(out, "w:gz") as tar:
        _add_tree(tar, work / "greengrass", "greengrass")
    shutil.rmtree(work)
    return _finish(Path(out))


def build_raw_artifact(out: Path, members: list[tuple[tarfile.TarInfo, Optional[bytes]]]) -> Artifact:
    """A tarball made member by member, for hostile-archive tests."""
    with tarfile.open(out, "w:gz") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    return _finish(Path(out))


def stop_process(proc: subprocess.Popen, grace: float = 20.0) -> None:
    """SIGTERM, then SIGKILL to its whole process group after `grace` seconds (the agent, the
    look-alike cloud: each started in a session of its own)."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
