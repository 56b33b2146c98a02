"""./build.sh bench: each figure of the agent beside its baseline, measured in the same run on the
same machine (medians of several runs, and ratios), printed as a table and written to
bench/results.json. Loopback only; everything it starts is stopped by its pid.

  python -m tests.bench [--quick] [--only NAME ...] [--idle-seconds N] [--download-mib N]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import signal
import socket
import ssl
import stat
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from tests.cloud import Cloud
from tests.cloud.device import make_root, stop_process, write_core_tree
from tests.cloud.greengrass import sha256_file

REPO = Path(__file__).resolve().parent.parent
ROLE = "arn:aws:iam::123456789012:role/Bench"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def median(values):
    return statistics.median(values)


def random_file(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    block = os.urandom(8 * 1024 * 1024)
    with open(path, "wb") as f:
        left = size
        while left:
            chunk = block[: min(len(block), left)]
            f.write(chunk)
            digest.update(chunk)
            left -= len(chunk)
            block = block[1:] + block[:1]  # vary the data cheaply
    return digest.hexdigest()


def fast_tarball(src_parent: Path, out: Path) -> None:
    """tar + gzip -1: the agent reads any gzip level, and random payloads do not compress."""
    with open(out, "wb") as f:
        tar = subprocess.Popen(["tar", "-C", str(src_parent), "-cf", "-", "greengrass"], stdout=subprocess.PIPE)
        subprocess.run(["gzip", "-1"], stdin=tar.stdout, stdout=f, check=True)
        tar.wait()


def publish_core_release(cloud, work: Path, version: str, payload: int) -> Path:
    """A core release of `version` with `payload` random bytes, published at the look-alike."""
    tree = work / f"rel-{version}"
    write_core_tree(tree / "greengrass/ggc", version, 0)
    if payload:
        random_file(tree / f"greengrass/ggc/packages/{version}/lib/payload.bin", payload)
    out = work / f"core-{version}.tar.gz"
    fast_tarball(tree, out)
    shutil.rmtree(tree)
    cloud.publish_release(software="core", version=version, architecture="x86_64", operating_system="ubuntu",
                          tarball=out)
    return out


def timed(cmd, **kw) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, **kw)
    return time.perf_counter() - start


def idle_memory_kib(pid: int, tmpdir: Path) -> dict:
    """What a process tree costs a device, in three kinds (kB), from /proc/<pid>/smaps_rollup:
    `anonymous` (its private memory: heap, stacks, written pages of libraries), `tmpfs` (every
    file unpacked into `tmpdir`, a tmpfs on a device: RAM, mapped or not) and `evictable` (the
    pages of files it maps from a disk or flash: page cache, which the kernel drops and reads
    again under pressure). Unreclaimable, without swap (a router has none): anonymous + tmpfs.
    Pages shared between processes are split among them (PSS)."""
    tmpfs = 0
    seen = set()
    for f in tmpdir.rglob("*"):
        st = f.lstat()
        if stat.S_ISREG(st.st_mode) and st.st_ino not in seen:
            seen.add(st.st_ino)
            tmpfs += st.st_blocks * 512
    anonymous = evictable = 0
    for p in [pid, *descendants(pid)]:
        try:
            text = Path(f"/proc/{p}/smaps_rollup").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        fields = {line.split(":")[0]: int(line.split()[1]) for line in text.splitlines()[1:]}
        anonymous += fields["Pss_Anon"]
        evictable += fields["Pss_File"]
    tmpfs_kib = tmpfs // 1024
    return {"anonymous": anonymous, "tmpfs": tmpfs_kib, "evictable": evictable, "unreclaimable": anonymous + tmpfs_kib}


def anon_and_shmem_kib() -> int:
    """The machine's anonymous memory plus its tmpfs pages (kB), from /proc/meminfo."""
    fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    return int(fields["AnonPages"].split()[0]) + int(fields["Shmem"].split()[0])


def descendants(pid: int) -> list:
    out = []
    for child in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            for c in child.read_text().split():
                out.append(int(c))
                out.extend(descendants(int(c)))
        except FileNotFoundError:
            pass
    return out


def status_kib(pid: int, field: str) -> int:
    """A memory figure of /proc/<pid>/status (VmRSS, VmHWM), in kB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


class Bench:
    def __init__(self, args) -> None:
        self.args = args
        self.work = Path(tempfile.mkdtemp(prefix="ggc-ota-bench-"))
        self.cloud = Cloud(self.work / "cloud").start()
        self.rows: list = []
        self.python = sys.executable

    def close(self) -> None:
        self.cloud.stop()
        for pid_file in self.work.rglob("greengrassd.pid"):
            try:
                os.kill(int(pid_file.read_text()), signal.SIGTERM)
            except (ValueError, OSError):
                pass
        shutil.rmtree(self.work, ignore_errors=True)

    def row(self, figure, value, unit, baseline, base_value, ratio, target, met, runs) -> None:
        self.rows.append({"figure": figure, "value": float(f"{value:.4g}"), "unit": unit, "baseline": baseline,
                          "baselineValue": None if base_value is None else float(f"{base_value:.4g}"),
                          "ratio": None if ratio is None else float(f"{ratio:.4g}"), "target": target, "met": met,
                          "runs": runs})
        print(f"  {figure}: {value:.4g} {unit}"
              + (f"; baseline {base_value:.4g}; ratio {ratio:.4g}" if ratio is not None else "")
              + f"; target {target}: {'met' if met else 'MISSED'}", flush=True)

    # ---- a device with the agent --------------------------------------------------------------
    def device(self, name: str, agent: Path = REPO / "ggc_ota.py", ota: dict | None = None):
        thing = f"bench-{name}"
        root = self.work / name / "greengrass"
        settings = {"logFile": str(self.work / name / "agent.log"), "progressInterval": 5}
        settings.update(ota or {})
        dev = make_root(root, thing, self.cloud.add_thing(thing), self.cloud.pki.ca_path, "localhost",
                        self.cloud.port, agent=agent, ota_agent=settings)
        return dev

    def start_agent(self, dev, binary: bool = False, env: dict | None = None) -> subprocess.Popen:
        agent = dev.root / "ota/ota_agent/ggc-ota"
        cmd = [str(agent)] if binary else [self.python, str(agent)]
        return subprocess.Popen(cmd + ["--root", str(dev.root), "--foreground"], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                                env={**os.environ, **(env or {})})

    def wait_log(self, dev, text: str, timeout: float = 120) -> None:
        log = dev.root.parent / "agent.log"
        deadline = time.monotonic() + timeout
        while text not in (log.read_text() if log.exists() else ""):
            if time.monotonic() > deadline:
                raise SystemExit(f"bench: the agent never logged {text!r}")
            time.sleep(0.05)

    def core_release(self, version: str, payload: int) -> str:
        return str(publish_core_release(self.cloud, self.work, version, payload))

    def job(self, dev) -> str:
        return self.cloud.create_software_update_job(
            s3_url_signer_role=ROLE, software_to_update="core", update_targets=[self.cloud.thing_arn(dev.thing)],
            update_targets_architecture="x86_64", update_targets_operating_system="ubuntu",
            update_agent_log_level="INFO")["IotJobId"]

    def wait_done(self, dev, job: str, timeout: float = 600) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            ex = self.cloud.describe_job_execution(job, dev.thing)["execution"]
            if ex["status"] not in ("QUEUED", "IN_PROGRESS"):
                return ex
            if time.monotonic() > deadline:
                raise SystemExit(f"bench: job {job} still {ex['status']}")
            time.sleep(0.05)

    # ---- figures --------------------------------------------------------------------------------
    def download(self) -> None:
        size = self.args.download_mib * 1024 * 1024
        print(f"download + sha256 of {size >> 20} MiB over HTTPS on loopback", flush=True)
        src = self.work / "big.bin"
        digest = random_file(src, size)
        self.cloud.store.put("bench", "big.bin", src)
        ca = str(self.cloud.pki.ca_path)
        code = ("import sys, ggc_ota as g\n"
                "g.Download(url=sys.argv[1], dest=sys.argv[2], sha256=sys.argv[3], size=int(sys.argv[4]),"
                " context=g.https_context([sys.argv[5]])).run()\n")
        agent_times, curl_times = [], []
        for i in range(self.args.runs):
            dest = self.work / f"dl-{i}"
            url = self.cloud.store.presign("bench", "big.bin", 3600)
            agent_times.append(timed([self.python, "-c", code, url, str(dest), digest, str(size), ca], cwd=REPO))
            dest.unlink()
            url = self.cloud.store.presign("bench", "big.bin", 3600)
            start = time.perf_counter()
            out = subprocess.run(["bash", "-c", f"curl -sS --cacert {ca} '{url}' | sha256sum"], check=True,
                                 capture_output=True, text=True)
            curl_times.append(time.perf_counter() - start)
            assert out.stdout.split()[0] == digest
        agent, curl = size / median(agent_times) / 2**20, size / median(curl_times) / 2**20
        self.row("download + verify", agent, "MiB/s", "curl | sha256sum", curl, agent / curl, ">= 0.95x",
                 agent / curl >= 0.95, self.args.runs)
        src.unlink()

    def unpack(self) -> None:
        files, per_file = (1000, 40_000) if self.args.quick else (5000, 40_000)
        print(f"unpack + fsync of a {files * per_file // 10**6} MB, {files}-file tree", flush=True)
        tree = self.work / "tree"
        for i in range(files):
            d = tree / f"greengrass/ggc/packages/9.9.9/lib/d{i // 100:03d}"
            d.mkdir(parents=True, exist_ok=True)
            (d / f"f{i:05d}.so").write_bytes(os.urandom(per_file))
        tarball = self.work / "tree.tar.gz"
        fast_tarball(tree, tarball)
        shutil.rmtree(tree)
        # as the agent unpacks: hashing the artifact again through the descriptor it reads
        code = "import sys, ggc_ota as g\ng.unpack(sys.argv[1], sys.argv[2], sha256=sys.argv[3])\n"
        digest = hashlib.sha256(tarball.read_bytes()).hexdigest()
        agent_times, tar_times = [], []
        for i in range(self.args.runs):
            dest = self.work / f"un-{i}"
            agent_times.append(timed([self.python, "-c", code, str(tarball), str(dest), digest], cwd=REPO))
            shutil.rmtree(dest)
            dest.mkdir()
            tar_times.append(timed(["bash", "-c", f"tar xzf {tarball} -C {dest} && sync -f {dest}"]))
            shutil.rmtree(dest)
        ratio = median(tar_times) / median(agent_times)
        self.row("unpack + fsync", median(agent_times), "s", "tar xzf + sync -f", median(tar_times), ratio,
                 ">= 0.7x (speed)", ratio >= 0.7, self.args.runs)

    def memory(self) -> None:
        """Peak RSS during a 100 MiB update against the same process's RSS idle just before, for
        the script and the binary (goal: at most idle + 8 MiB); and the script's peak again for
        a 1 GiB update (goal: flat, within 10%). The peak is the kernel's VmHWM, reset when the
        job is created (/proc/<pid>/clear_refs): the script's start peaks higher (compiling
        ggc_ota.py), and that is not the update's."""
        sizes = [100 * 2**20, (200 if self.args.quick else 1024) * 2**20]
        print("peak memory of the agent during updates of " + " and ".join(f"{s >> 20} MiB" for s in sizes),
              flush=True)
        binary = REPO / "dist/ggc-ota"
        runs = [("script", sizes[0]), ("script", sizes[1])] + ([("binary", sizes[0])] if binary.exists() else [])
        peaks = {}
        for n, (kind, size) in enumerate(runs):
            dev = self.device(f"mem{n}", agent=binary if kind == "binary" else REPO / "ggc_ota.py",
                              ota={"minFreeBytes": 0})
            self.core_release(f"2.0.{n}", size)
            proc = self.start_agent(dev, binary=(kind == "binary"))
            try:
                self.wait_log(dev, "connected to")
                time.sleep(2.0)
                idle = status_kib(proc.pid, "VmRSS") / 1024
                # the peak from here on: the start's own (the script compiles itself) is not the update's
                Path(f"/proc/{proc.pid}/clear_refs").write_text("5")
                job = self.job(dev)
                ex = self.wait_done(dev, job)
                assert ex["status"] == "SUCCEEDED", ex
                peaks[(kind, size)] = (status_kib(proc.pid, "VmHWM") / 1024, idle)
                print(f"  {kind}, {size >> 20} MiB: idle {idle:.1f} MiB, peak {peaks[(kind, size)][0]:.1f} MiB",
                      flush=True)
            finally:
                stop_process(proc)
            shutil.rmtree(dev.root.parent, ignore_errors=True)
        for kind in ("script", "binary"):
            if (kind, sizes[0]) in peaks:
                peak, idle = peaks[(kind, sizes[0])]
                self.row(f"peak RSS, {sizes[0] >> 20} MiB update, {kind}", peak, "MiB", "RSS idle, just before",
                         idle, peak / idle, "<= idle + 8 MiB", peak <= idle + 8, 1)
        big, small = peaks[("script", sizes[1])][0], peaks[("script", sizes[0])][0]
        self.row(f"peak RSS, {sizes[1] >> 20} MiB update, script", big, "MiB", f"the {sizes[0] >> 20} MiB update",
                 small, big / small, "flat: within 10%", big / small <= 1.10, 1)

    def latency(self) -> None:
        jobs = 8 if self.args.quick else 20
        print(f"job created -> IN_PROGRESS, {jobs} jobs", flush=True)
        dev = self.device("latency")
        self.core_release("3.0.0", 0)
        proc = self.start_agent(dev)
        samples = []
        try:
            self.wait_log(dev, "connected to")
            time.sleep(0.5)
            for _ in range(jobs):
                created = time.time()
                job = self.job(dev)
                self.wait_done(dev, job)
                started = next(h["at"] for h in self.cloud.history(job, dev.thing) if h["status"] == "IN_PROGRESS")
                samples.append(started - created)
                # the next job must update again: roll the device back to the old version
                shutil.rmtree(dev.root / "ggc/packages/3.0.0")
        finally:
            stop_process(proc)
        base = self.broker_round_trip(jobs)
        value = median(samples)
        self.row("job created -> IN_PROGRESS", value, "s", "paho publish -> receive", base, value / base,
                 "<= 0.2 s", value <= 0.2, jobs)

    def broker_round_trip(self, n: int) -> float:
        import paho.mqtt.client as mqtt
        cert = self.cloud.add_thing("bench-paho")
        got = threading.Event()
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-paho", protocol=mqtt.MQTTv311)
        client.tls_set(ca_certs=str(self.cloud.pki.ca_path), certfile=str(cert.cert), keyfile=str(cert.key))
        client.on_message = lambda c, u, m: got.set()
        # as the agent does: the broker's round trip, not Nagle's algorithm's
        client.on_socket_open = lambda c, u, sock: sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        subscribed = threading.Event()
        client.on_subscribe = lambda *a: subscribed.set()
        client.connect("localhost", self.cloud.port)
        client.loop_start()
        client.subscribe("$aws/things/bench-paho/rt", 1)
        subscribed.wait(10)
        samples = []
        for _ in range(n):
            got.clear()
            start = time.perf_counter()
            client.publish("$aws/things/bench-paho/rt", b"x", qos=1)
            got.wait(10)
            samples.append(time.perf_counter() - start)
        client.disconnect()
        client.loop_stop()
        return median(samples)

    def idle(self) -> None:
        seconds = self.args.idle_seconds
        print(f"idle agent for {seconds} s", flush=True)
        dev = self.device("idle")
        proc = self.start_agent(dev)
        try:
            self.wait_log(dev, "connected to")
            before = cpu_seconds(proc.pid)
            time.sleep(seconds)
            used = cpu_seconds(proc.pid) - before
        finally:
            stop_process(proc)
        per_hour = used * 3600 / seconds
        self.row("idle CPU", per_hour, "CPU s/hour", None, None, None, "<= 1 CPU s/hour", per_hour <= 1.0, 1)

    def whole_update(self) -> None:
        size = 50 * 2**20
        print("whole core update of a 50 MiB artifact, excluding the scripts, against the sum of its parts",
              flush=True)
        wholes, parts = [], []
        runs = max(self.args.runs, 5)  # the overhead is a few tens of ms: more samples for a steadier median
        for n in range(runs):
            dev = self.device(f"whole{n}", ota={"minFreeBytes": 0})
            tarball = self.core_release(f"4.0.{n}", size)
            proc = self.start_agent(dev)
            try:
                self.wait_log(dev, "connected to")
                job = self.job(dev)
                assert self.wait_done(dev, job)["status"] == "SUCCEEDED"
                self.wait_log(dev, f"job {job}: SUCCEEDED")  # logged just after the status is sent
            finally:
                stop_process(proc)
            wholes.append(update_seconds(dev.root.parent / "agent.log", job))
            parts.append(self.parts_of_update(tarball, dev))
            shutil.rmtree(dev.root.parent, ignore_errors=True)
        whole, total = median(wholes), median(parts)
        self.row("whole update (no scripts)", whole, "s", "download + unpack + swap", total, whole / total,
                 "overhead <= 10%", whole / total <= 1.10, runs)

    def parts_of_update(self, tarball: str, dev) -> float:
        digest = sha256_file(Path(tarball))
        size = Path(tarball).stat().st_size
        release = next(r for r in self.cloud.greengrass.releases if r.sha256 == digest)
        url = self.cloud.store.presign("greengrass-updates", release.key)
        scratch = self.work / "parts"
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir()
        code = ("import sys, time, shutil, os, ggc_ota as g\n"
                "t = time.perf_counter()\n"
                "g.Download(url=sys.argv[1], dest=sys.argv[2] + '/a.tgz', sha256=sys.argv[3], size=int(sys.argv[4]),"
                " context=g.https_context([sys.argv[5]])).run()\n"
                "g.unpack(sys.argv[2] + '/a.tgz', sys.argv[2] + '/st', sha256=sys.argv[3])\n"
                "live = sys.argv[2] + '/live'\n"
                "shutil.copytree(sys.argv[6] + '/ggc', live, symlinks=True)\n"
                "new = g.check_layout(sys.argv[2] + '/st', 'core')\n"
                "g.copy_kept(live, new, ['ggc/deployment', 'ggc/var'], 'ggc')\n"
                "t_copy = time.perf_counter()\n"
                "shutil.rmtree(live); shutil.copytree(sys.argv[6] + '/ggc', live, symlinks=True)\n"
                "t_copy = time.perf_counter() - t_copy\n"
                "st = g.State(sys.argv[2] + '/state'); st.ensure()\n"
                "os.makedirs(sys.argv[2] + '/stage'); os.rename(new, sys.argv[2] + '/stage/new')\n"
                "j = g.Journal(job_id='bench', execution_number=1, software='core', step='swap', live=live,"
                " stage=sys.argv[2] + '/stage', live_id=g.path_id(live))\n"
                "st.write_journal(j.to_disk()); g.swap_trees(j)\n"
                "print(time.perf_counter() - t - t_copy)\n")
        out = subprocess.run([self.python, "-c", code, url, str(scratch), digest, str(size),
                              str(self.cloud.pki.ca_path), str(dev.root)], cwd=REPO, check=True,
                             capture_output=True, text=True)
        shutil.rmtree(scratch, ignore_errors=True)
        return float(out.stdout.strip())

    def binary(self) -> None:
        binary = REPO / "dist/ggc-ota"
        if not binary.exists():
            print("binary: dist/ggc-ota is missing (./build.sh binary); skipped", flush=True)
            return
        print("the static binary against python3 ggc_ota.py: size, start to first CONNECT, idle RAM", flush=True)
        size_mb = binary.stat().st_size / 1e6
        self.row("binary size", size_mb, "MB", None, None, None, "<= 8 MB", size_mb <= 8.0, 1)
        starts = {"binary": [], "script": []}
        rams = {}
        firsts = []
        for kind in ("binary", "script"):
            for i in range(self.args.runs + 2):
                elapsed, first, ram = self.start_to_connect(kind, binary, i, measure_ram=(i == 0))
                starts[kind].append(elapsed)
                if first is not None:
                    firsts.append(first)
                if ram is not None:
                    rams[kind] = ram
        b, s = median(starts["binary"]), median(starts["script"])
        self.row("start to first CONNECT", b, "s", "python3 ggc_ota.py", s, b / s, "<= 0.3 s", b <= 0.3,
                 len(starts["binary"]))
        first = median(firsts)
        self.row("first start of a version (unpacks its libraries)", first, "s", "the start above", b, first / b,
                 "reported", True, len(firsts))
        b_ram, s_ram = rams["binary"], rams["script"]
        for kind in ("anonymous", "tmpfs", "evictable"):
            self.row(f"idle: {kind}, binary", b_ram[kind], "MiB", "python3 ggc_ota.py", s_ram[kind],
                     b_ram[kind] / s_ram[kind] if s_ram[kind] else None, "reported", True, 1)
        self.row("idle: unreclaimable (anonymous + tmpfs), binary", b_ram["unreclaimable"], "MiB",
                 "python3 ggc_ota.py", s_ram["unreclaimable"], b_ram["unreclaimable"] / s_ram["unreclaimable"],
                 "<= 12 MiB", b_ram["unreclaimable"] <= 12.0, 1)
        system = b_ram.get("system")
        if system is not None:  # the same, seen from the kernel: what the machine lost
            self.row("idle: unreclaimable, /proc/meminfo view", system, "MiB", "the figure above",
                     b_ram["unreclaimable"], system / b_ram["unreclaimable"], "agrees within 1 MiB",
                     abs(system - b_ram["unreclaimable"]) <= 1.0, 1)
        self.binary_update(binary)

    def binary_update(self, binary: Path) -> None:
        """The whole 50 MiB core update again, by the binary and by the script in turn: what the
        binary's interpreter (built for size, -Os) costs an update, next to the script's
        CPython (-O2)."""
        print("whole core update of 50 MiB: the binary against the script", flush=True)
        seconds = {"binary": [], "script": []}
        runs = max(self.args.runs, 3)
        for n in range(runs):
            for kind in ("binary", "script"):
                dev = self.device(f"bupdate-{kind}{n}", agent=binary if kind == "binary" else REPO / "ggc_ota.py",
                                  ota={"minFreeBytes": 0})
                self.core_release(f"4.{1 if kind == 'binary' else 2}.{n}", 50 * 2**20)
                proc = self.start_agent(dev, binary=(kind == "binary"))
                try:
                    self.wait_log(dev, "connected to")
                    job = self.job(dev)
                    assert self.wait_done(dev, job)["status"] == "SUCCEEDED"
                    self.wait_log(dev, f"job {job}: SUCCEEDED")
                finally:
                    stop_process(proc)
                seconds[kind].append(update_seconds(dev.root.parent / "agent.log", job))
                shutil.rmtree(dev.root.parent, ignore_errors=True)
        b, s = median(seconds["binary"]), median(seconds["script"])
        self.row("whole update (no scripts), binary", b, "s", "the same by python3 ggc_ota.py", s, b / s,
                 "<= 1.25x the script", b / s <= 1.25, runs)

    def start_to_connect(self, kind: str, binary: Path, n: int, measure_ram: bool):
        """Time from spawning the agent to the first MQTT CONNECT at a TLS listener of ours."""
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(self.cloud.pki.server.cert), str(self.cloud.pki.server.key))
        agent = binary if kind == "binary" else REPO / "ggc_ota.py"
        dev = self.device(f"start-{kind}-{n}", agent=agent)
        cfg = json.loads(dev.config_path.read_text())
        cfg["coreThing"]["iotMqttPort"] = port
        dev.config_path.write_text(json.dumps(cfg))
        tmpdir = self.work / f"tmp-{kind}-{n}"
        tmpdir.mkdir()
        # TMPDIR on a tmpfs, as on OpenWrt: the kernel's own count can then check ours
        on_tmpfs = measure_ram and kind == "binary" and subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(tmpdir)], capture_output=True).returncode == 0
        system_before = anon_and_shmem_kib() if on_tmpfs else None
        first_start = None
        if kind == "binary":  # its first start unpacks the libraries beside it: timed apart
            started = time.perf_counter()
            subprocess.run([str(dev.root / "ota/ota_agent/ggc-ota"), "--version"], check=True, capture_output=True,
                           env={**os.environ, "TMPDIR": str(tmpdir)})
            first_start = time.perf_counter() - started
        start = time.perf_counter()
        proc = self.start_agent(dev, binary=(kind == "binary"), env={"TMPDIR": str(tmpdir)})
        try:
            listener.settimeout(30)
            conn, _ = listener.accept()
            tls = ctx.wrap_socket(conn, server_side=True)
            first = tls.recv(2)
            elapsed = time.perf_counter() - start
            assert first and first[0] >> 4 == 1, first  # CONNECT
            ram = None
            if measure_ram:
                time.sleep(2.0)
                ram = {k: v / 1024 for k, v in idle_memory_kib(proc.pid, tmpdir).items()}
                print(f"  {kind}: anonymous {ram['anonymous']:.1f} MiB, tmpfs {ram['tmpfs']:.1f} MiB, evictable "
                      f"{ram['evictable']:.1f} MiB", flush=True)
                if system_before is not None:
                    ram["system"] = (anon_and_shmem_kib() - system_before) / 1024
                    print(f"  {kind}: /proc/meminfo AnonPages + Shmem grew by {ram['system']:.1f} MiB", flush=True)
            tls.close()
        finally:
            stop_process(proc)
            listener.close()
            if on_tmpfs:
                subprocess.run(["umount", "-l", str(tmpdir)], check=False)
        return elapsed, first_start, ram


def wear(bench: Bench) -> None:
    """Flash written by one update, counted by the power-cut file system, by phase: bytes and
    sync calls, against the artifact's compressed and unpacked sizes (goal: at most compressed +
    unpacked + 64 KiB). Skipped where FUSE cannot run."""
    from tests.powercut.sweep import flash_wear, fuse_available
    why = fuse_available()
    if why:
        print(f"flash wear: SKIPPED ({why})", flush=True)
        return
    payload = (1 if bench.args.quick else 8) << 20
    for kind, what in (("core", "a core update"), ("agent", "a self-update")):
        w = flash_wear(bench.cloud, bench.work / f"wear-{kind}", kind, payload=payload)
        phases = ", ".join(f"{name} {p['bytes']} B / {p['syncs']} syncs" for name, p in sorted(w["phases"].items()))
        print(f"flash wear of {what} ({w['files']} files, {w['compressed']} B compressed, "
              f"{w['unpacked']} B unpacked): {phases}", flush=True)
        bench.row(f"flash written by {what}", w["written"] / 1024, "KiB",
                  "artifact compressed + unpacked", (w["compressed"] + w["unpacked"]) / 1024,
                  w["written"] / (w["compressed"] + w["unpacked"]), "compressed + unpacked + 64 KiB", w["met"],
                  1)
        bench.row(f"sync calls of {what}", w["syncs"], "calls", None, None, None,
                  "fewest that pass the power-cut sweep", True, 1)
        bench.wear = getattr(bench, "wear", {})
        bench.wear[kind] = w


def update_seconds(log: Path, job: str) -> float:
    """From the agent's log: the update's duration without the time spent in scripts."""
    from datetime import datetime

    def at(line: str) -> float:
        return datetime.strptime(line[:29], "%Y-%m-%dT%H:%M:%S.%f%z").timestamp()  # UTC, with its offset
    lines = log.read_text().splitlines()
    begin = next(at(line) for line in lines if f"job {job}: starting" in line)
    end = next(at(line) for line in lines if f"job {job}: SUCCEEDED" in line)
    scripts = 0.0
    running = None
    for line in lines:
        if "hook: running" in line:
            running = at(line)
        elif running is not None and ("succeeded" in line and "hook:" in line):
            scripts += at(line) - running
            running = None
    return end - begin - scripts


FIGURES = ("download", "unpack", "memory", "latency", "idle", "whole_update", "binary", "wear")


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench")
    parser.add_argument("--quick", action="store_true", help="smaller sizes and fewer runs (a smoke run)")
    parser.add_argument("--only", nargs="+", choices=FIGURES)
    parser.add_argument("--idle-seconds", type=int, default=600)
    parser.add_argument("--download-mib", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", default=str(REPO / "bench/results.json"))
    parser.add_argument("--fleet", type=int, nargs="?", const=200, metavar="N",
                        help="only the fleet simulation, with N agents (200)")
    parser.add_argument("--fleet-agent", type=Path, default=REPO / "ggc_ota.py",
                        help="the agent the fleet runs (e.g. an older ggc_ota.py, for a figure before a change)")
    args = parser.parse_args()
    if args.fleet:
        from tests.fleet import run
        run(args.fleet, idle_seconds=args.idle_seconds, out=Path(args.out), agent=args.fleet_agent)
        return 0
    if args.quick:
        args.idle_seconds = min(args.idle_seconds, 60)
        args.download_mib = min(args.download_mib, 128)
    bench = Bench(args)
    try:
        for name in args.only or FIGURES:
            wear(bench) if name == "wear" else getattr(bench, name)()
    finally:
        bench.close()
    now = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime())
    for row in bench.rows:
        row["measured"] = now
    rows = bench.rows
    out = Path(args.out)
    if args.only and out.exists():  # a partial run replaces its own rows, in place, and keeps the others
        fresh = {r["figure"]: r for r in rows}
        old = json.loads(out.read_text())["figures"]
        rows = [fresh.pop(r["figure"], r) for r in old] + list(fresh.values())
    result = {"date": now, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
              "python": platform.python_version(), "quick": args.quick, "figures": rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    bench.rows = rows
    print("\n| figure | value | baseline | ratio | target | met |\n|---|---|---|---|---|---|")
    for r in bench.rows:
        base = f"{r['baselineValue']} ({r['baseline']})" if r["baseline"] else "—"
        print(f"| {r['figure']} | {r['value']} {r['unit']} | {base} | {r['ratio'] if r['ratio'] else '—'} | "
              f"{r['target']} | {'yes' if r['met'] else 'no'} |")
    print(f"\nwritten to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
