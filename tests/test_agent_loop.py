"""The agent in process, through its real seam: the MQTT transport is passed in. A fake one
hands each request to an in-process Jobs service (the look-alike's own state machine, with no
broker and no sockets) and its replies and notifications back, so that the loop, the resync,
a reconnect, throttling, notify handling and a lost reply at a given step are each a test of a
second or so. (The artifact still comes over real HTTPS from the look-alike's store, and the
scripts are real.) Transient trouble never ends a job: it stays IN_PROGRESS and is taken up
again."""
from __future__ import annotations

import json
import threading
import time

import pytest

import ggc_ota as g
from tests.cloud.device import build_core_artifact, make_root
from tests.cloud.jobs import JobsService

THING = "seam-core"


class FakeTransport:
    """MqttClient's interface over an in-process JobsService: a publish is a request the service
    answers at once, through on_message. `breaks(topic)` may return an error to raise instead
    (a link that drops as the request goes out)."""

    def __init__(self, service: JobsService, on_message, on_connect) -> None:
        self.service, self.on_message, self.on_connect = service, on_message, on_connect
        self.connected, self.stopped = False, False
        self.subscriptions: list = []
        self.requests: list = []
        self.breaks = lambda topic: None
        self.retries_asked = 0
        self.last_error = None

    def start(self) -> None:
        self.connected = True
        self.on_connect()

    def stop(self, timeout: float = 5.0) -> None:
        self.connected, self.stopped = False, True

    def interrupt(self) -> None:
        pass

    def wait_connected(self, timeout: float) -> bool:
        return self.connected

    def retry_now(self) -> None:
        self.retries_asked += 1

    def subscribe(self, topic: str, qos: int = 1, timeout: float = 30.0) -> int:
        self.subscriptions.append(topic)
        return 1

    def publish(self, topic: str, payload: bytes, qos: int = 1, timeout: float = 30.0) -> None:
        if not self.connected:
            raise g.MqttNotConnected("not connected")
        error = self.breaks(topic)
        if error is not None:
            raise error
        self.requests.append(topic.split("/jobs/", 1)[1])
        self.service.handle(topic, payload)

    def deliver(self, topic: str, payload: dict) -> None:
        if self.connected:
            self.on_message(topic, json.dumps(payload).encode())

    def drop(self) -> None:
        self.connected = False

    def come_back(self) -> None:
        self.connected = True
        self.on_connect()


class Wiring:
    """A Jobs service and the transports the agent made on it (the latest is the live one)."""

    def __init__(self) -> None:
        self.transports: list = []
        self.service = JobsService(self.publish, minute=60.0)

    def publish(self, topic: str, payload: dict) -> None:
        if self.transports:
            self.transports[-1].deliver(topic, payload)

    def transport(self, on_message, on_connect) -> FakeTransport:
        self.transports.append(FakeTransport(self.service, on_message, on_connect))
        return self.transports[-1]

    @property
    def live(self) -> FakeTransport:
        return self.transports[-1]


@pytest.fixture
def wiring():
    w = Wiring()
    yield w
    w.service.stop()


@pytest.fixture
def root(cloud, tmp_path):
    dev = make_root(tmp_path / "greengrass", THING, cloud.pki.client(THING), cloud.pki.ca_path,
                    "localhost", cloud.port, ota_agent={"logFile": str(tmp_path / "agent.log"), "minFreeBytes": 0,
                                                        "operatingSystem": "ubuntu", "architecture": "x86_64"})
    g.setup_logging(str(tmp_path / "agent.log"), "INFO", to_stderr=False)
    return dev


def core_document(cloud, tmp_path) -> dict:
    art = build_core_artifact(tmp_path / "core.tar.gz", "1.11.6")
    cloud.store.put("bucket", f"seam/{tmp_path.name}.tar.gz", art.path)
    return {"softwareToUpdate": "core", "version": "1.11.6", "updateTargetsArchitecture": "x86_64",
            "updateTargetsOperatingSystem": "ubuntu",
            "artifact": {"url": cloud.store.presign("bucket", f"seam/{tmp_path.name}.tar.gz", 600),
                         "sha256": art.sha256, "size": art.size}}


# ---- one job, through Agent.process --------------------------------------------------------------

@pytest.fixture
def agent_and_job(cloud, tmp_path, root, wiring):
    agent = g.Agent(g.load_config(str(root.root)), [], "INFO", transport=wiring.transport)
    agent.state.ensure()
    agent.state.lock()
    wiring.service.create_job("seam-job", [THING], core_document(cloud, tmp_path))
    agent.cloud.connect()
    agent.cloud.jobs.subscribe()
    agent.cloud.subscribed = True
    execution = agent.cloud.jobs.describe("seam-job")
    yield agent, execution, root, wiring
    g.os.close(agent.state.lock_fd)


def cloud_status(wiring) -> str:
    return wiring.service.describe_job_execution("seam-job", THING)["execution"]["status"]


def break_describe(wiring, nth: int, error: Exception) -> None:
    """The `nth` describe of seam-job from now on raises `error` as it goes out."""
    seen = [0]

    def breaks(topic: str):
        if topic.endswith("/seam-job/get"):
            seen[0] += 1
            if seen[0] == nth:
                return error
        return None
    wiring.live.breaks = breaks


@pytest.mark.parametrize("error", [g.MqttTimeout("no reply to jobs/seam-job/get within 20 s"),
                                   g.MqttNotConnected("interrupted: the agent is stopping")])
def test_a_lost_reply_at_the_cancel_check_never_ends_the_job(agent_and_job, error):
    agent, execution, dev, wiring = agent_and_job
    break_describe(wiring, 1, error)  # the check after the unpack is the first describe
    with pytest.raises(g.MqttError):
        agent.process(execution)
    assert cloud_status(wiring) == "IN_PROGRESS" and agent.state.history() == []
    assert not agent.state.handled("seam-job", 1) and dev.hook_calls() == []
    assert list((dev.root / "ota-state/downloads").glob("seam-job.tar.gz"))  # kept: no second download
    agent.process(execution)  # taken up again: it runs to the end
    assert cloud_status(wiring) == "SUCCEEDED" and agent.state.history()[-1]["result"] == "SUCCEEDED"
    assert dev.core_version() == "1.11.6" and not agent.state.pending_statuses()


def test_throttling_beyond_the_retries_never_ends_the_job(agent_and_job, monkeypatch):
    agent, execution, dev, wiring = agent_and_job
    monkeypatch.setattr(g, "retry_delay", lambda *args: 0.01)
    wiring.service.inject_fault(THING, "describe", "RequestThrottled", count=5)  # the client retries 4 times
    with pytest.raises(g.MqttError, match="RequestThrottled"):
        agent.process(execution)
    assert cloud_status(wiring) == "IN_PROGRESS" and agent.state.history() == []
    agent.process(execution)
    assert cloud_status(wiring) == "SUCCEEDED"


def test_a_refusal_for_good_ends_the_job_with_its_code(agent_and_job):
    agent, execution, dev, wiring = agent_and_job
    wiring.service.inject_fault(THING, "describe", "InvalidRequest", count=1)
    agent.process(execution)
    ex = wiring.service.describe_job_execution("seam-job", THING)["execution"]
    details = ex["statusDetails"]["detailsMap"]
    assert ex["status"] == "FAILED" and details["reason"] == "JOBS_REJECTED"
    assert details["rolledBack"] == "false" and dev.hook_calls() == []


def test_a_stop_during_the_download_keeps_the_job(agent_and_job):
    agent, execution, dev, wiring = agent_and_job
    agent.cloud.stopping.set()
    with pytest.raises(g.AgentStopping):
        agent.process(execution)
    assert agent.state.history() == [] and not agent.state.handled("seam-job", 1)
    assert cloud_status(wiring) == "IN_PROGRESS" and dev.hook_calls() == []


# ---- the loop, through Cloud.loop -----------------------------------------------------------------

@pytest.fixture
def running(root, wiring, tmp_path):
    """A Cloud on the fake transport, its loop on a thread; `taken` lists the executions it
    handed to `process` (which reports SUCCEEDED at once, as a finished update would)."""
    cfg = g.load_config(str(root.root))
    state = g.State(cfg.ota["stateDir"])
    state.ensure()
    cloud = g.Cloud(cfg, state, wiring.transport)
    taken: list = []

    def process(execution: dict) -> None:
        taken.append(execution["jobId"])
        cloud.finish({"jobId": execution["jobId"], "executionNumber": execution["executionNumber"]}, "SUCCEEDED",
                     None, version="1")
    cloud.connect()
    thread = threading.Thread(target=cloud.loop, args=(process,), daemon=True)
    thread.start()
    yield cloud, taken
    cloud.stop()
    thread.join(10)
    assert not thread.is_alive()


def until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "not reached in time"
        time.sleep(0.02)


GREENGRASS = {"softwareToUpdate": "core", "version": "1"}


def test_the_loop_takes_jobs_oldest_first_and_leaves_others_alone(wiring, running):
    cloud, taken = running
    wiring.service.create_job("first", [THING], GREENGRASS)
    wiring.service.create_job("not-ours", [THING], {"operation": "reboot"})
    wiring.service.create_job("second", [THING], GREENGRASS)
    until(lambda: taken == ["first", "second"])
    assert wiring.service.describe_job_execution("not-ours", THING)["execution"]["status"] == "QUEUED"
    assert set(wiring.live.subscriptions) == set(cloud.jobs.reply_topics())
    assert not cloud.undelivered()


def test_a_notify_that_names_nothing_new_lists_nothing(wiring, running):
    cloud, taken = running
    wiring.service.create_job("one", [THING], GREENGRASS)
    until(lambda: taken == ["one"])
    until(lambda: not cloud.notified.is_set())
    lists = wiring.live.requests.count("get")
    cloud.on_notify({"jobs": {"QUEUED": [{"jobId": "one", "executionNumber": 1}]}})  # handled already
    time.sleep(0.3)
    assert wiring.live.requests.count("get") == lists and taken == ["one"]


def test_a_reconnect_delivers_what_waited_and_takes_the_next_job(wiring, running):
    cloud, taken = running
    until(lambda: cloud.subscribed)
    wiring.live.drop()
    wiring.service.create_job("while-away", [THING], GREENGRASS)  # its notify is lost with the link
    time.sleep(0.2)
    assert taken == []
    wiring.live.come_back()
    until(lambda: taken == ["while-away"])
    until(lambda: not cloud.undelivered())


def test_a_throttled_status_waits_on_disk_and_is_delivered_after_the_backoff(wiring, running, monkeypatch):
    cloud, taken = running
    monkeypatch.setattr(g, "retry_delay", lambda *args: 0.3)
    wiring.service.inject_fault(THING, "update", "RequestThrottled", count=5)  # beyond the client's retries
    wiring.service.create_job("slow", [THING], GREENGRASS)
    until(lambda: taken == ["slow"])
    until(lambda: cloud.deliver_after > 0)
    assert wiring.service.describe_job_execution("slow", THING)["execution"]["status"] == "QUEUED"
    until(lambda: wiring.service.describe_job_execution("slow", THING)["execution"]["status"] == "SUCCEEDED")
    assert not cloud.undelivered()


def test_the_resync_lists_the_jobs_again_without_a_notify(wiring, root, monkeypatch):
    monkeypatch.setattr(g, "RESYNC_SECONDS", 0.2)
    cfg = g.load_config(str(root.root))
    state = g.State(cfg.ota["stateDir"])
    state.ensure()
    cloud = g.Cloud(cfg, state, wiring.transport)
    cloud.connect()
    thread = threading.Thread(target=cloud.loop, args=(lambda execution: None,), daemon=True)
    thread.start()
    try:
        until(lambda: wiring.live.requests.count("get") >= 3)
    finally:
        cloud.stop()
        thread.join(10)


@pytest.fixture
def long_backoff(monkeypatch):
    monkeypatch.setattr(g, "RETRY_FIRST_SECONDS", 60.0)


def test_a_check_on_demand_cuts_the_backoff_short(wiring, long_backoff, running):
    """After a listing failed the loop waits (here 60 s); an operator's check lists at once, and,
    with the link down, makes the client connect now."""
    cloud, taken = running
    until(lambda: cloud.subscribed)
    failed = []

    def breaks(topic: str):
        if topic.endswith("/jobs/get") and not failed:
            failed.append(topic)
            return g.MqttNotConnected("the link dropped")
        return None
    wiring.live.breaks = breaks
    cloud.events.put(("resync", None))
    until(lambda: failed)
    wiring.service.create_job("after-the-fix", [THING], GREENGRASS)
    taken_at = time.monotonic()
    cloud.check_now()
    until(lambda: taken == ["after-the-fix"], timeout=20)
    assert time.monotonic() - taken_at < 20  # the backoff would have waited 60 s
    wiring.live.drop()
    cloud.check_now()
    until(lambda: wiring.live.retries_asked == 1)


def test_step_timers_are_sized_to_their_phase(root):
    cfg = g.load_config(str(root.root))
    ota = {**cfg.ota, "slowLinkBytesPerSecond": 8192, "scriptTimeout": 300, "healthCheckTimeout": 60,
           "healthCheckSeconds": 10, "newAgentTimeout": 120}
    assert g.step_timer_minutes(ota, "download", 100 * 2**20) == 215  # 100 MiB at 8 KiB/s, and a minute
    assert g.step_timer_minutes(ota, "pre_update") == 6 and g.step_timer_minutes(ota, "health_check") == 3
    assert g.step_timer_minutes(ota, "new_agent_trial") == 10
    assert g.step_timer_minutes(ota, "download", 10**12) == 10080  # AWS's most
    assert g.step_timer_minutes({**ota, "scriptTimeout": 0}, "post_update") == 1


def test_every_in_progress_update_carries_a_step_timer(agent_and_job):
    agent, execution, dev, wiring = agent_and_job
    agent.process(execution)
    updates = [json.loads(r["payload"]) for r in wiring.service.requests if r["topic"].endswith("seam-job/update")]
    in_progress = [u for u in updates if u["status"] == "IN_PROGRESS"]
    phases = [u["statusDetails"]["phase"] for u in in_progress]
    assert {"checking", "download", "unpack", "pre_update", "post_update", "health_check"} <= set(phases), phases
    assert all(isinstance(u.get("stepTimeoutInMinutes"), int) and 1 <= u["stepTimeoutInMinutes"] <= 10080
               for u in in_progress), in_progress
    assert all("stepTimeoutInMinutes" not in u for u in updates if u["status"] != "IN_PROGRESS")
