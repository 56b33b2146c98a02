"""The power-cut sweep: a real agent updates a test device whose root lies on the power-cut file
system (tests/powercut/fs.py); the power goes at its k-th state-changing operation; everything
of the device is SIGKILLed, what was not durable is dropped, the file system is mounted again
over what is durable, and the device boots: the core daemon of whatever ggc/ holds starts, then
the agent. After each cut the sweep checks what a device in the field relies on:

- the job ends in a terminal status that tells the truth (SUCCEEDED with the new software
  installed, FAILED with the old one back);
- ggc/ (and ota/) is exactly the whole old or the whole new tree: names, types, modes, content;
- the kept state (ggc/deployment, ggc/var) is byte-identical;
- the core daemon of the installed version runs (and an agent, after a self-update);
- no journal is left, and nothing in staging or downloads.

Kinds: "core" (an update that succeeds), "rollback" (its post-update script fails, so it rolls
back), "agent" (a self-update: the new agent on trial from staging, then the hand-over).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from tests.agent_harness import TERMINAL, Device, agent_pids, alive, release_agent
from tests.cloud.device import LAUNCHER_CACHE
from tests.conftest import REPO
from tests.powercut.fs import device_processes, kill_marked

KINDS = ("core", "rollback", "agent")
MODELS = ("data", "strict")  # and "posix", on request (./build.sh powercut --model posix)
OLD_CORE, NEW_CORE = "1.11.5", "1.11.6"
NEW_AGENT = "9.0.0"
MARKER_KEY = "GGC_OTA_POWERCUT_DEVICE"


def fuse_available() -> Optional[str]:
    """None when the power-cut file system can run here, else why not."""
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    if shutil.which("fusermount3") is None:
        return "fusermount3 (Debian's fuse3) is not installed"
    try:
        import mfusepy  # noqa: F401
    except (ImportError, OSError) as err:
        return f"mfusepy cannot load libfuse 3: {err}"
    return None


class Mount:
    """One mount of the power-cut file system: its own process, driven through a socket."""

    def __init__(self, backing: Path, mountpoint: Path, model: str, marker: str) -> None:
        self.backing, self.mountpoint, self.model, self.marker = backing, mountpoint, model, marker
        self.control = backing.parent / f"control-{uuid.uuid4().hex[:6]}.sock"
        self.proc: Optional[subprocess.Popen] = None
        self.log = backing.parent / "fs.log"

    def __enter__(self) -> Mount:
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.powercut.fs", str(self.backing), str(self.mountpoint),
             "--model", self.model, "--control", str(self.control), "--kill-env", self.marker],
            cwd=str(REPO), stdin=subprocess.DEVNULL, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT,
            start_new_session=True)
        deadline = time.monotonic() + 20
        while not (self.control.exists() and os.path.ismount(self.mountpoint)):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the power-cut file system did not mount:\n{self.log.read_text()[-2000:]}")
            time.sleep(0.02)
        return self

    def ask(self, cmd: str, **args) -> dict:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(30)
            s.connect(str(self.control))
            s.sendall((json.dumps({"cmd": cmd, **args}) + "\n").encode())
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
        return json.loads(buf)

    def __exit__(self, *exc) -> None:
        self.unmount()

    def unmount(self) -> None:
        """Write the durable image to the backing directory and unmount (whatever is running
        on the device must be dead first: power off)."""
        if self.proc is None:
            return
        try:
            if self.proc.poll() is None:
                self.ask("unmount")
                self.proc.wait(20)
        except (OSError, subprocess.TimeoutExpired, ValueError):
            self.proc.kill()
            self.proc.wait(5)
        finally:
            subprocess.run(["fusermount3", "-u", "-z", str(self.mountpoint)], capture_output=True)
            self.proc = None
            self.control.unlink(missing_ok=True)


def kill_device(marker: str, timeout: float = 20) -> None:
    """SIGKILL every process of the device until none is left (the power is off)."""
    deadline = time.monotonic() + timeout
    while True:
        kill_marked(marker.encode())
        left = [p for p in device_processes(marker.encode()) if alive(p)]
        if not left:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes of the device survive the power cut: {left}")
        time.sleep(0.05)


def tree_state(path: Path) -> Dict[str, str]:
    """Every name under `path`: type, mode and content (symlinks: their target)."""
    out = {}
    if not path.is_dir():
        return {"<missing>": str(path)}
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(LAUNCHER_CACHE))  # the binary's own cache
        for name in sorted(dirnames + filenames):
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            rel = os.path.relpath(p, path)
            mode = oct(st.st_mode & 0o7777)
            if os.path.islink(p):
                out[rel] = "link:" + os.readlink(p)
            elif os.path.isdir(p):
                out[rel] = f"dir {mode}"
            else:
                with open(p, "rb") as f:
                    out[rel] = f"file {mode} {hashlib.sha256(f.read()).hexdigest()[:16]} {st.st_size}"
    return out


KEPT = ("deployment", "var", "local.conf")  # the sweep's keep list, inside ggc/


def kept_state(root: Path) -> Dict[str, str]:
    return {k: v for k, v in tree_state(root / "ggc").items() if k.split("/")[0] in KEPT}


def software_only(tree: Dict[str, str]) -> Dict[str, str]:
    return {k: v for k, v in tree.items() if k.split("/")[0] not in KEPT}


@dataclass
class Outcome:
    kind: str
    model: str
    cut: Optional[int]
    second_cut: Optional[int] = None
    problems: List[str] = field(default_factory=list)
    cut_at: str = ""
    status: str = ""
    detail: str = ""
    trace: List[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def describe(self) -> str:
        where = f"cut at operation {self.cut}" + (f", then at {self.second_cut} of the recovery"
                                                   if self.second_cut else "")
        return (f"{self.kind}/{self.model} {where} ({self.cut_at or 'no cut'}): job {self.status} {self.detail}\n  "
                + "\n  ".join(self.problems) + "\n  the operations before the cut:\n    " + "\n    ".join(self.trace))


class Rig:
    """One test device on the power-cut file system, set up once and reset for every cut: its
    backing image is copied back from the pristine one, the lab cleared, the old core started."""

    def __init__(self, cloud, workdir: Path, kind: str, model: str, agent: Optional[Path] = None,
                 payload: int = 3000) -> None:
        self.cloud, self.kind, self.model = cloud, kind, model
        self.workdir = workdir
        self.pristine = workdir / "pristine"
        self.backing = workdir / "disk"
        self.marker = f"{MARKER_KEY}={uuid.uuid4().hex}"
        self.env = {MARKER_KEY: self.marker.split("=", 1)[1]}
        self.root = workdir / "greengrass"
        self.mount: Optional[Mount] = None
        self.boots = 0
        with Mount(self.backing, self.root, model, self.marker) as m:
            # progress reports on a timer would make two runs of an update differ in their operations
            self.device = Device(cloud, workdir, ota={"healthCheckSeconds": 0.5, "progressInterval": 60,
                                                      "keep": ["ggc/deployment", "ggc/var", "ggc/local.conf"]},
                                 agent=agent)
            # a kept path that is a single file (the trees above are directories)
            (self.root / "ggc/local.conf").write_text(f"local settings of {self.device.thing}\n")
            if kind == "agent":
                new_agent = release_agent(self.device, NEW_AGENT, source=agent)
                self.artifact = next(r for r in cloud.greengrass.releases if r.version == NEW_AGENT)
                self.new_agent = new_agent
            else:
                self.artifact = self.device.release_core(NEW_CORE, payload_bytes=payload)
            self.old = {"ggc": tree_state(self.root / "ggc"), "ota": tree_state(self.root / "ota")}
            self.kept = kept_state(self.root)
            m.ask("sync_all")
        shutil.copytree(self.backing, self.pristine)
        self.new: Dict[str, Dict[str, str]] = {}
        self.names: List[str] = []
        self.job = ""

    # ---- one boot of the device -------------------------------------------------------------------
    def power_on(self) -> Mount:
        """Mount the file system over what is durable. Every other power-on first takes a device
        number with a spacer mount, so the root comes back under another number than the boot
        before it, as a disk behind device-mapper or USB may after a reboot."""
        self.boots += 1
        spacer = self.workdir / "spacer"
        if self.boots % 2 == 0:
            spacer.mkdir(exist_ok=True)
            subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4k", "spacer", str(spacer)], check=True)
        try:
            self.mount = Mount(self.backing, self.root, self.model, self.marker).__enter__()
        finally:
            if self.boots % 2 == 0:
                subprocess.run(["umount", str(spacer)], check=True)
        return self.mount

    def boot(self) -> None:
        """What a boot starts: the core daemon of whatever ggc/ holds, then the agent."""
        lab = self.device.dev.lab
        (lab / "greengrassd.pid").unlink(missing_ok=True)  # /run does not survive a power cut
        greengrassd = self.root / "ggc/core/greengrassd"
        env = {k: v for k, v in os.environ.items() if k != "GGC_OTA_CRASH_AT"}
        env.update(self.env)
        command = [sys.executable, "-m", "tests.powercut.devinit", "--pre", str(greengrassd), "start", "--",
                   *self.device.command("--root", str(self.root), "--foreground")]
        self.device.proc = subprocess.Popen(command, cwd=str(REPO), env=env, stdin=subprocess.DEVNULL,
                                            stdout=subprocess.DEVNULL,
                                            stderr=open(self.workdir / "agent.stderr", "ab"),
                                            start_new_session=True)

    def power_off(self) -> None:
        self.mount.ask("poweroff")
        kill_device(self.marker)
        self.device.proc = None
        self.mount.unmount()
        self.mount = None

    def reset(self) -> None:
        if self.backing.exists():
            shutil.rmtree(self.backing)
        shutil.copytree(self.pristine, self.backing)
        lab = self.device.dev.lab
        for p in lab.iterdir():
            if p.name != "examples":  # the scripts the look-alike's scripts run
                p.unlink()
        if self.kind == "rollback":
            self.device.dev.fail_script_with("ggc_post_update.sh", NEW_CORE)
        self.device.log_path.write_text("")

    def wait_ready(self, since: float, timeout: float = 30) -> None:
        """Until the agent has listed its jobs once (it is up, connected and idle)."""
        deadline = time.monotonic() + timeout
        thing = self.device.thing
        while not any(r["thing"] == thing and r["topic"].endswith("/jobs/get") and r["at"] >= since
                      for r in list(self.cloud.jobs.requests)):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the agent never listed its jobs\n{self.device.log()[-3000:]}")
            time.sleep(0.05)

    def wait_quiet(self, seconds: float = 0.6, timeout: float = 60) -> None:
        """Until the file system has seen no operation for `seconds`."""
        deadline = time.monotonic() + timeout
        last, since = None, time.monotonic()
        while time.monotonic() < deadline:
            ops = self.mount.ask("stats")["ops"]
            if ops != last:
                last, since = ops, time.monotonic()
            elif time.monotonic() - since >= seconds:
                return
            time.sleep(0.1)

    def artifact_size(self) -> int:
        return int(self.artifact.size)

    def create_job(self) -> str:
        return self.device.update_job("ota_agent" if self.kind == "agent" else "core")

    def wait_end(self, job: str, cut_armed: bool, timeout: float = 90) -> str:
        """Until the job is terminal, or the power went. Returns 'cut' or the status."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if cut_armed and self.mount.ask("stats")["cut"]:
                return "cut"
            status = self.device.execution(job)["status"]
            if status in TERMINAL:
                return status
            time.sleep(0.05)
        raise RuntimeError(f"job {job} neither ended nor met the cut within {timeout} s\n{self.device.log()[-3000:]}")

    # ---- the reference run and a cut run ------------------------------------------------------------
    def reference(self) -> dict:
        """An update with no cut: how many operations it takes, what it wrote, the new trees."""
        self.reset()
        self.power_on()
        try:
            self.boot()
            start = time.time()
            self.wait_ready(start - 1)
            self.wait_quiet(0.3)
            before = self.mount.ask("arm")
            job = self.create_job()
            status = self.wait_end(job, cut_armed=False)
            self.wait_settled(job)
            after = self.mount.ask("stats")
            self.names = self.mount.ask("names")["names"]
            self.new = {"ggc": tree_state(self.root / "ggc"), "ota": tree_state(self.root / "ota")}
            expected = "FAILED" if self.kind == "rollback" else "SUCCEEDED"
            assert status == expected, f"the reference update ended {status}\n{self.device.log()[-3000:]}"
            return {"ops": len(self.names), "before": before["counters"], "after": after["counters"],
                    "names": self.names}
        finally:
            self.power_off()

    def wait_settled(self, job: str, timeout: float = 60) -> None:
        """Until no journal is left and the file system is quiet (clean-up done)."""
        deadline = time.monotonic() + timeout
        journal = self.root / "ota-state/journal.json"
        while time.monotonic() < deadline:
            if not journal.exists():
                break
            time.sleep(0.1)
        self.wait_quiet(0.5, timeout=max(1.0, deadline - time.monotonic()))

    def cut_point(self, index: int) -> dict:
        """The arm command that cuts at operation `index` (0-based) of the reference update: its
        name and the how-manieth of that name it is, so that timing cannot shift it."""
        name = self.names[index]
        return {"match": name, "nth": self.names[:index + 1].count(name)}

    def run_cut(self, cut: int, second_cut: Optional[int] = None) -> Outcome:
        """Cut at operation `cut` (1-based) of the reference update; with `second_cut`, cut again
        at that operation of the recovery after the first boot."""
        out = Outcome(self.kind, self.model, cut, second_cut)
        self.reset()
        self.power_on()
        job = None
        try:
            self.boot()
            self.wait_ready(time.time())
            self.mount.ask("arm", **(self.cut_point(cut - 1) if cut <= len(self.names) else {"after": cut}))
            job = self.job = self.create_job()
            ended = self.wait_end(job, cut_armed=True)
            stats = self.mount.ask("stats")
            out.cut_at = stats["cut"] or ""
            out.trace = stats["trace"]
            self.power_off()
            if second_cut is not None and ended == "cut":
                self.power_on()
                self.mount.ask("arm", after=second_cut)
                self.boot()
                again = self.wait_end(job, cut_armed=True)
                out.cut_at += f"; then {self.mount.ask('stats')['cut'] or 'no second cut (' + again + ')'}"
                self.power_off()
            self.power_on()
            self.boot()
            ex = self.device.wait_status(job, timeout=90)
            self.wait_settled(job)
            self.check(out, ex)
        except (AssertionError, RuntimeError, OSError, subprocess.SubprocessError) as err:
            out.problems.append(f"{type(err).__name__}: {err}")
        finally:
            if self.mount is not None:
                out.detail += "\n  agent log (tail):\n    " + "\n    ".join(self.device.log().splitlines()[-25:])
                self.power_off()
        return out

    def check(self, out: Outcome, ex: dict) -> None:
        details = ex.get("statusDetails", {}).get("detailsMap", {})
        out.status = ex["status"]
        out.detail = json.dumps(details)[:300]
        p = out.problems
        ggc, ota = tree_state(self.root / "ggc"), tree_state(self.root / "ota")
        tree, other = ("ota", ggc) if self.kind == "agent" else ("ggc", ota)
        now = ota if self.kind == "agent" else ggc
        installed_new = software_only(now) == software_only(self.new[tree])
        installed_old = software_only(now) == software_only(self.old[tree])
        if not (installed_new or installed_old):
            diff = sorted(set(now.items()) ^ set(self.old[tree].items()))[:6]
            p.append(f"{tree}/ is neither the old nor the new tree; against the old: {diff}")
        untouched = "ota" if tree == "ggc" else "ggc"
        if software_only(other) != software_only(self.old[untouched]):
            p.append(f"{untouched}/ changed though this update does not install it")
        if kept_state(self.root) != self.kept:
            diff = sorted(set(kept_state(self.root).items()) ^ set(self.kept.items()))[:6]
            p.append(f"the kept state changed: {diff}")
        if ex["status"] == "SUCCEEDED" and not installed_new:
            p.append("the job SUCCEEDED but the new software is not installed")
        if ex["status"] == "FAILED" and not installed_old:
            p.append("the job FAILED but the old software is not back")
        if ex["status"] == "FAILED" and details.get("rolledBack") != "true":
            p.append(f"FAILED without a rollback: {details}")
        if ex["status"] not in ("SUCCEEDED", "FAILED"):
            p.append(f"the job ended {ex['status']}")
        if self.kind == "rollback" and ex["status"] == "SUCCEEDED":
            p.append("the update whose post-update script fails SUCCEEDED")
        state = self.root / "ota-state"
        try:
            history = [json.loads(line) for line in (state / "history.jsonl").read_text().splitlines() if line.strip()]
        except (OSError, ValueError) as err:
            history = []
            p.append(f"the history cannot be read: {err}")
        recorded = [h.get("result") for h in history if h.get("jobId") == self.job]
        if recorded[-1:] != [ex["status"]]:
            p.append(f"the history does not record the job's end: {recorded}")
        for leftover in ("journal.json",):
            if (state / leftover).exists():
                p.append(f"{leftover} is left behind")
        for sub in ("staging", "downloads"):
            if (state / sub).is_dir() and list((state / sub).iterdir()):
                p.append(f"{sub}/ is not empty: {sorted(x.name for x in (state / sub).iterdir())}")
        lab = self.device.dev.lab
        version = self.device.dev.core_version()
        try:
            running = (lab / "greengrassd.version").read_text().strip()
            pid = int((lab / "greengrassd.pid").read_text())
        except (OSError, ValueError):
            running, pid = None, 0
        if running != version or not alive(pid):
            p.append(f"the core daemon of {version} does not run (running: {running}, pid {pid})")
        if not agent_pids(self.root):
            p.append("no agent runs")


def sample(total: int, count: int) -> List[int]:
    """`count` cut points spread evenly over 1..total (all of them when there are fewer)."""
    if total <= count:
        return list(range(1, total + 1))
    return sorted({1 + round(i * (total - 1) / (count - 1)) for i in range(count)})


def run_sweep(cloud, workdir: Path, kind: str, model: str, count: Optional[int] = None,
              second_cuts: int = 0, syncs: bool = False, log=print, agent: Optional[Path] = None) -> dict:
    """Cut at every operation of the update (count None), at `count` even samples, or (`syncs`)
    right before each sync call; `second_cuts`: that many runs cut again during the recovery.
    Returns a summary with every failure."""
    rig = Rig(cloud, workdir, kind, model, agent=agent)
    ref = rig.reference()
    total = ref["ops"] + 3  # a few past the end: the last clean-up is tried too
    if syncs:  # right before each sync call, and once the update is over (what is still not durable then)
        points = [i + 1 for i, name in enumerate(rig.names) if name.startswith(("fsync", "fdatasync"))] + [total]
    else:
        points = sample(total, count) if count else list(range(1, total + 1))
    outcomes = []
    for i, k in enumerate(points):
        out = rig.run_cut(k)
        outcomes.append(out)
        log(f"{time.strftime('%H:%M:%S')} {kind}/{model}: cut {k} of {total} ({i + 1}/{len(points)}): "
            f"{'ok' if out.ok else 'FAILED'}")
        if not out.ok:
            log(out.describe())
    for k in sample(total, second_cuts + 2)[1:-1] if second_cuts else []:
        out = rig.run_cut(k, second_cut=1 + (k * 7) % 40)
        outcomes.append(out)
        log(f"{kind}/{model}: cut {k}, then during recovery: {'ok' if out.ok else 'FAILED'}")
        if not out.ok:
            log(out.describe())
    failures = [o for o in outcomes if not o.ok]
    return {"kind": kind, "model": model, "operations": ref["ops"], "tried": len(outcomes),
            "passed": len(outcomes) - len(failures), "failures": failures, "reference": ref,
            "failed_at": [f"{o.cut}: {o.cut_at}" for o in failures]}


def run_pair(args: tuple) -> dict:
    """One kind and model in a process of its own, with a look-alike cloud of its own (for a
    pool): (kind, model, count, second cuts, workdir[, agent source, syncs only])."""
    kind, model, count, second, workdir = args[:5]
    agent = Path(args[5]) if len(args) > 5 and args[5] else None
    syncs = bool(args[6]) if len(args) > 6 else False
    from tests.cloud import Cloud
    from tests.conftest import MINUTE
    work = Path(workdir) / f"{kind}-{model}"
    cloud = Cloud(work / "cloud", minute=MINUTE).start()
    started = time.monotonic()
    try:
        result = run_sweep(cloud, work / "device", kind, model, count=count, second_cuts=second, syncs=syncs,
                           agent=agent, log=lambda line: print(line, flush=True))
    except Exception as err:  # the reference update itself failed: report it as this pair's failure
        result = {"kind": kind, "model": model, "operations": 0, "tried": 0, "passed": 0,
                  "failures": [], "error": f"{type(err).__name__}: {err}"}
    finally:
        cloud.stop()
    result["seconds"] = round(time.monotonic() - started, 1)
    result["failures"] = [f.describe() if hasattr(f, "describe") else f for f in result["failures"]]
    result.pop("reference", None)
    return result


def flash_wear(cloud, workdir: Path, kind: str, payload: int = 1 << 20) -> dict:
    """Bytes written and sync calls of one update (no cut), by phase, beside the artifact's
    compressed and unpacked sizes: what an update costs a device's flash."""
    rig = Rig(cloud, workdir, kind, "data", payload=payload)
    ref = rig.reference()
    before, after = ref["before"]["byCategory"], ref["after"]["byCategory"]
    phases = {}
    for name in sorted(set(before) | set(after)):
        b, a = before.get(name, {}), after.get(name, {})
        phases[name] = {k: a.get(k, 0) - b.get(k, 0) for k in ("bytes", "syncs", "ops")}
    tree = "ota" if kind == "agent" else "ggc"
    unpacked = sum(int(v.split()[3]) for k, v in rig.new[tree].items() if v.startswith("file"))
    compressed = rig.artifact_size()
    written = sum(p["bytes"] for p in phases.values())
    syncs = sum(p["syncs"] for p in phases.values())
    return {"kind": kind, "compressed": compressed, "unpacked": unpacked, "written": written, "syncs": syncs,
            "files": sum(1 for v in rig.new[tree].values() if v.startswith("file")), "phases": phases,
            "goal": compressed + unpacked + 64 * 1024, "met": written <= compressed + unpacked + 64 * 1024}
