"""A fleet on one machine: N real agents (the script form, each its own Python process), each
with its own Greengrass root, certificate and thing, against one look-alike cloud (one
mosquitto with mutual TLS, the Jobs service, the artifact store). `./build.sh bench --fleet N`
runs it; `tests/test_fleet.py` runs it small in CI.

What it measures, from the cloud's side wherever it can (the look-alike records every Jobs
request with its time and the code it was answered with; the broker's sockets give the bytes):

- rollout: one CreateSoftwareUpdateJob to a thing group of all N cores, a 1 MiB core artifact;
  how long until the last execution ends, Jobs requests per core, the agents' peak RSS;
- broker restart: when each core is connected again (from its own log), the share of the fleet
  in the busiest second, and the Jobs requests per core it cost;
- throttling: a rollout while the look-alike answers a share of all Jobs requests
  RequestThrottled; the shortest gap between a throttled request and its retry;
- idle: TCP segments and bytes (TLS included) per core per hour, on the broker's sockets;
- on paper: the same per-core figures scaled to 100,000 cores, against AWS IoT's quotas.
"""
from __future__ import annotations

import calendar
import collections
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import ggc_ota
from tests.bench import REPO, ROLE, publish_core_release, status_kib
from tests.cloud.cloud import Cloud
from tests.cloud.device import make_root

LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)\.(\d{3})\+00:00 ")  # the agent logs in UTC
TERMINAL = ("SUCCEEDED", "FAILED", "REJECTED", "CANCELED", "TIMED_OUT", "REMOVED")

# AWS IoT's default quotas, per account and Region (adjustable ones marked so). Connects: "AWS
# IoT Core endpoints and quotas", message broker. Jobs device API: "AWS IoT Device Management
# endpoints and quotas", the Jobs data plane (one quota per API, as we read it when writing this).
QUOTAS = {
    "connects_per_second": 500,          # Connect requests per second per account (adjustable)
    "connects_per_client_id": 1,         # per second, per client id (not adjustable)
    "jobs_api_per_second": 200,          # each of GetPendingJobExecutions, DescribeJobExecution,
                                         # UpdateJobExecution (adjustable)
    "rollout_per_minute": 1000,          # job executions AWS IoT Jobs rolls out a minute
}
PAPER_FLEET = 100_000


def log_times(path: Path, text: str) -> list:
    """Epoch times of the log lines that contain `text`."""
    out = []
    try:
        lines = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return out
    for line in lines:
        m = LOG_LINE.match(line)
        if m and text in line:
            out.append(calendar.timegm(time.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S")) + int(m.group(2)) / 1000)
    return out


def operation(topic: str) -> str:
    """GetPendingJobExecutions, DescribeJobExecution, UpdateJobExecution or StartNext, from a topic."""
    rest = topic.split("/jobs/", 1)[1]
    if rest == "get":
        return "GetPendingJobExecutions"
    if rest == "start-next":
        return "StartNextPendingJobExecution"
    return "DescribeJobExecution" if rest.endswith("/get") else "UpdateJobExecution"


def percentile(values: list, q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


class Core:
    """One device: its root, its log and its agent process."""

    def __init__(self, thing: str, root, log: Path) -> None:
        self.thing = thing
        self.dev = root
        self.log = log
        self.proc: Optional[subprocess.Popen] = None


class Fleet:
    def __init__(self, n: int, work: Optional[Path] = None, agent: Path = REPO / "ggc_ota.py",
                 ota: Optional[dict] = None) -> None:
        self.n = n
        self.work = Path(work or tempfile.mkdtemp(prefix="ggc-ota-fleet-"))
        self.cloud = Cloud(self.work / "cloud").start()
        things = [f"fleet-{i:04d}" for i in range(n)]
        self.group_arn = self.cloud.add_thing_group("fleet", things)
        self.cores = []
        for thing in things:
            log = self.work / thing / "agent.log"
            settings = {"logFile": str(log), "progressInterval": 5, "syslog": ""}
            settings.update(ota or {})
            dev = make_root(self.work / thing / "greengrass", thing, self.cloud.things[thing], self.cloud.pki.ca_path,
                            "localhost", self.cloud.port, agent=agent, ota_agent=settings)
            self.cores.append(Core(thing, dev, log))
        self.versions = 0

    # ---- life cycle ------------------------------------------------------------------------------
    def start(self) -> float:
        """Start every agent; return the seconds until each had listed its jobs once."""
        began = time.time()
        for core in self.cores:
            agent = core.dev.root / "ota/ota_agent/ggc-ota"
            core.proc = subprocess.Popen([sys.executable, str(agent), "--root", str(core.dev.root), "--foreground"],
                                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=open(core.log.parent / "stderr", "ab"), start_new_session=True)
        self.wait(lambda: len(self.listed_since(began)) == self.n, 60 + self.n, "every core to list its jobs")
        return time.time() - began

    def stop(self) -> None:
        for core in self.cores:
            if core.proc is not None and core.proc.poll() is None:
                os.killpg(core.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        for core in self.cores:
            if core.proc is None:
                continue
            try:
                core.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(core.proc.pid, signal.SIGKILL)
                core.proc.wait(5)
        for pid_file in self.work.rglob("greengrassd.pid"):  # the look-alike core daemons
            try:
                os.kill(int(pid_file.read_text()), signal.SIGTERM)
            except (ValueError, OSError):
                pass
        self.cloud.stop()

    def cleanup(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)

    @staticmethod
    def wait(condition, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise TimeoutError(f"fleet: waited {timeout:.0f} s for {what}")
            time.sleep(0.2)

    def alive(self) -> int:
        return sum(1 for c in self.cores if c.proc is not None and c.proc.poll() is None)

    # ---- what the cloud saw --------------------------------------------------------------------
    def requests_since(self, mark: int) -> list:
        with self.cloud.jobs.lock:
            return list(self.cloud.jobs.requests[mark:])

    def listed_since(self, since: float) -> set:
        with self.cloud.jobs.lock:
            return {r["thing"] for r in self.cloud.jobs.requests
                    if r["at"] >= since and r["topic"].endswith("/jobs/get")}

    def mark(self) -> int:
        with self.cloud.jobs.lock:
            return len(self.cloud.jobs.requests)

    def quiet(self, seconds: float = 3.0, timeout: float = 150.0) -> None:
        """Wait until no Jobs request came for `seconds` and every core's last request was
        answered: a core whose last one failed (throttled) will try again after its backoff,
        which can be longer than `seconds`."""
        def calm():
            with self.cloud.jobs.lock:
                requests = list(self.cloud.jobs.requests)
            last_code = {r["thing"]: r["code"] for r in requests}
            last = requests[-1]["at"] if requests else 0
            retrying = [thing for thing, code in last_code.items() if code in ggc_ota.RETRYABLE_JOBS_CODES]
            return time.time() - last >= seconds and not retrying
        self.wait(calm, timeout, "the fleet to fall quiet")

    def statuses(self, job: str) -> dict:
        out = {}
        for core in self.cores:
            out[core.thing] = self.cloud.describe_job_execution(job, core.thing)["execution"]["status"]
        return out

    # ---- figures -------------------------------------------------------------------------------
    def release(self, payload: int) -> str:
        self.versions += 1
        version = f"1.11.{5 + self.versions}"
        publish_core_release(self.cloud, self.work, version, payload)
        return version

    def rollout(self, payload: int = 1 << 20, throttle: float = 0.0, timeout: float = 900) -> dict:
        """One CreateSoftwareUpdateJob to the whole group; every execution must end."""
        self.release(payload)
        self.quiet()
        self.cloud.jobs.throttle_share(throttle, seed=self.versions)
        mark, began = self.mark(), time.time()
        try:
            job = self.cloud.create_software_update_job(
                s3_url_signer_role=ROLE, software_to_update="core", update_targets=[self.group_arn],
                update_targets_architecture="x86_64", update_targets_operating_system="ubuntu",
                update_agent_log_level="INFO")["IotJobId"]
            ended = {}

            def all_ended() -> bool:
                for thing, status in self.statuses(job).items():
                    if status in TERMINAL and thing not in ended:
                        ended[thing] = time.time()
                return len(ended) == self.n
            self.wait(all_ended, timeout, f"every execution of {job} to end")
            self.cloud.jobs.throttle_share(0.0)  # the retries still waiting go through
            self.quiet()
        finally:
            self.cloud.jobs.throttle_share(0.0)
        requests = self.requests_since(mark)
        by_op = collections.Counter(operation(r["topic"]) for r in requests)
        result = {
            "cores": self.n,
            "statuses": dict(collections.Counter(self.statuses(job).values())),
            "secondsToLast": round(max(ended.values()) - began, 1),
            "secondsMedian": round(statistics.median(ended.values()) - began, 1),
            "jobsRequestsPerCore": round(len(requests) / self.n, 2),
            "jobsRequestsPerCoreByApi": {op: round(c / self.n, 2) for op, c in sorted(by_op.items())},
            "peakRequestsPerSecond": max(collections.Counter(int(r["at"]) for r in requests).values()),
            "stillAlive": self.alive(),
            "peakAgentRssMiB": round(max(status_kib(c.proc.pid, "VmHWM") for c in self.cores) / 1024, 1),
        }
        if throttle:
            throttled = sum(r["code"] == "RequestThrottled" for r in requests)
            result.update(throttledShare=round(throttled / len(requests), 3), **self.retry_gaps(requests))
        return result

    @staticmethod
    def retry_gaps(requests: list) -> dict:
        """The gap between each throttled request and the next request of the same core to the
        same topic (its retry)."""
        gaps = []
        by_thing = collections.defaultdict(list)
        for r in requests:
            by_thing[r["thing"]].append(r)
        for items in by_thing.values():
            for i, r in enumerate(items):
                if r["code"] != "RequestThrottled":
                    continue
                nxt = next((x for x in items[i + 1:] if x["topic"] == r["topic"]), None)
                if nxt is not None:
                    gaps.append(nxt["at"] - r["at"])
        return {"retries": len(gaps), "minRetryGapSeconds": round(min(gaps), 3) if gaps else None,
                "medianRetryGapSeconds": round(statistics.median(gaps), 3) if gaps else None}

    def broker_restart(self, timeout: float = 300) -> dict:
        """Restart the broker; every core must connect again and list its jobs."""
        self.quiet()
        mark, down = self.mark(), time.time()
        self.cloud.broker.restart()
        up = time.time()
        self.cloud.wait_service_connected(10)

        def connected_again() -> list:
            out = []
            for core in self.cores:
                times = [t for t in log_times(core.log, "MQTT: connected to") if t >= down]
                if times:
                    out.append(times[0])
            return out
        self.wait(lambda: len(connected_again()) == self.n, timeout, "every core to reconnect")
        try:  # a request sent before the look-alike's Jobs service is back is lost: retried after 20 s
            self.wait(lambda: len(self.listed_since(up)) == self.n, 120, "every core to list its jobs again")
        except TimeoutError:
            missing = sorted({c.thing for c in self.cores} - self.listed_since(up))
            raise TimeoutError(f"fleet: {missing} never listed their jobs after the restart") from None
        self.quiet()
        times = [t - up for t in connected_again()]
        per_second = collections.Counter(int(max(0.0, t)) for t in times)
        requests = self.requests_since(mark)
        return {
            "cores": self.n,
            "brokerDownSeconds": round(up - down, 2),
            "reconnectSeconds": {"p50": round(percentile(times, 0.5), 2), "p95": round(percentile(times, 0.95), 2),
                                 "max": round(max(times), 2)},
            "busiestSecondShare": round(max(per_second.values()) / self.n, 3),
            "jobsRequestsPerCore": round(len(requests) / self.n, 2),
            "stillAlive": self.alive(),
        }

    def socket_counters(self) -> dict:
        """Per connection to the broker (by peer port): bytes and data segments each way, from
        the kernel's TCP counters of the broker's sockets (the TLS records as sent)."""
        out = subprocess.run(["ss", "-tinH", "state", "established", f"( sport = :{self.cloud.port} )"],
                             capture_output=True, text=True, check=True).stdout
        counters = {}
        peer = None
        for line in out.splitlines():
            if not line.startswith((" ", "\t")):
                peer = line.split()[-1]
                continue
            fields = dict(f.split(":", 1) for f in line.split() if ":" in f and not f.startswith("("))
            counters[peer] = {k: int(fields.get(k, "0")) for k in ("bytes_acked", "bytes_received",
                                                                   "data_segs_out", "data_segs_in")}
        return counters

    def idle(self, seconds: float) -> dict:
        """Traffic per core while nothing is pending, scaled to an hour."""
        self.quiet()
        service = self.cloud._client.socket().getsockname()[1] if self.cloud._client else None
        before, mark = self.socket_counters(), self.mark()
        time.sleep(seconds)
        after = self.socket_counters()
        totals = collections.Counter()
        for peer, end in after.items():
            if peer not in before or (service and peer.endswith(f":{service}")):
                continue
            for k, v in end.items():
                totals[k] += v - before[peer][k]
        scale = 3600.0 / seconds / self.n
        return {
            "cores": self.n, "seconds": seconds,
            "segmentsPerCoreHour": round((totals["data_segs_out"] + totals["data_segs_in"]) * scale, 1),
            "bytesPerCoreHour": round((totals["bytes_acked"] + totals["bytes_received"]) * scale),
            "jobsRequestsPerCoreHour": round(len(self.requests_since(mark)) * 3600.0 / seconds / self.n, 2),
        }


def on_paper(results: dict) -> dict:
    """The measured per-core figures at 100,000 cores, against AWS IoT's default quotas."""
    n = PAPER_FLEET
    restart, rollout = results["brokerRestart"], results["rollout"]
    connect_peak = n * restart["busiestSecondShare"]
    per_api = rollout["jobsRequestsPerCoreByApi"]
    rollout_rate = QUOTAS["rollout_per_minute"] / 60.0  # cores starting an update each second
    busiest_api = max(per_api.values())
    idle = results["idle"]
    return {
        "cores": n,
        "connectsPerSecondAfterOutage": round(connect_peak),
        "connectQuota": QUOTAS["connects_per_second"],
        "secondsToReconnectAllAtQuota": round(n / QUOTAS["connects_per_second"]),
        "jobsRequestsPerSecondInRollout": round(rollout_rate * rollout["jobsRequestsPerCore"], 1),
        "busiestApiPerSecondInRollout": round(rollout_rate * busiest_api, 1),
        "jobsApiQuota": QUOTAS["jobs_api_per_second"],
        # measured, or the hourly resync by design where the window was too short to see it
        "idleJobsRequestsPerSecond": round(n * max(idle["jobsRequestsPerCoreHour"],
                                                   3600.0 / ggc_ota.RESYNC_SECONDS) / 3600.0, 1),
        "idleBytesPerSecond": round(n * idle["bytesPerCoreHour"] / 3600.0),
    }


def run(n: int, idle_seconds: float, out: Optional[Path] = None, agent: Path = REPO / "ggc_ota.py") -> dict:
    """The whole simulation; returns (and writes into `out`'s "fleet" key) the figures."""
    fleet = Fleet(n, agent=agent)
    started = time.monotonic()
    try:
        results: dict = {"cores": n, "agent": str(agent), "startSeconds": round(fleet.start(), 1)}
        print(f"fleet: {n} agents connected and listed their jobs in {results['startSeconds']} s", flush=True)
        results["rollout"] = fleet.rollout()
        print("fleet: rollout", json.dumps(results["rollout"]), flush=True)
        results["brokerRestart"] = fleet.broker_restart()
        print("fleet: broker restart", json.dumps(results["brokerRestart"]), flush=True)
        results["throttled"] = fleet.rollout(throttle=0.3)
        print("fleet: throttled rollout", json.dumps(results["throttled"]), flush=True)
        results["idle"] = fleet.idle(idle_seconds)
        print("fleet: idle", json.dumps(results["idle"]), flush=True)
    except BaseException:
        fleet.stop()
        print(f"fleet: failed; the cores' roots and logs are kept in {fleet.work}", flush=True)
        raise
    fleet.stop()
    fleet.cleanup()
    results["onPaper"] = on_paper(results)
    results["benchSeconds"] = round(time.monotonic() - started)
    results["measured"] = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime())
    print("fleet: on paper at 100,000 cores", json.dumps(results["onPaper"]), flush=True)
    if out is not None:
        data = json.loads(out.read_text()) if out.exists() else {}
        data["fleet"] = results
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(data, indent=2) + "\n")
    return results
