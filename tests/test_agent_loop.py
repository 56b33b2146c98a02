"""The agent loop in process, through a seam: a fake Jobs transport with scripted answers (the
artifact still comes over real HTTPS from the look-alike's store, the scripts are real), so
that a lost reply or a stop at a given step is a test of a second or so. Transient trouble
never ends a job: it stays IN_PROGRESS and is taken up again."""
from __future__ import annotations

import pytest

import ggc_ota as g
from tests.cloud.device import build_core_artifact, make_root


class FakeJobs:
    """Answers describe() with `execution`, except for the calls numbered in `fail` (1-based),
    which raise `error` as a lost reply (or a stop) would."""

    def __init__(self, execution: dict, fail=(), error=None) -> None:
        self.execution, self.fail, self.error = execution, set(fail), error
        self.describes = 0

    def describe(self, job_id: str):
        self.describes += 1
        if self.describes in self.fail:
            raise self.error
        return self.execution

    def update(self, *args, **kwargs):
        return {}

    def interrupt(self):
        pass


class FakeMqtt:
    connected, stopped = True, False

    def interrupt(self):
        pass

    def stop(self):
        pass


@pytest.fixture
def agent_and_job(cloud, tmp_path):
    dev = make_root(tmp_path / "greengrass", "seam-core", cloud.pki.client("seam-core"), cloud.pki.ca_path,
                    "localhost", cloud.port, ota_agent={"logFile": str(tmp_path / "agent.log"), "minFreeBytes": 0,
                                                        "operatingSystem": "ubuntu", "architecture": "x86_64"})
    g.setup_logging(str(tmp_path / "agent.log"), "INFO", to_stderr=False)
    agent = g.Agent(g.load_config(str(dev.root)), [], "INFO")
    agent.state.ensure()
    agent.state.lock()
    art = build_core_artifact(tmp_path / "core.tar.gz", "1.11.6")
    cloud.store.put("bucket", f"seam/{tmp_path.name}.tar.gz", art.path)
    doc = {"softwareToUpdate": "core", "version": "1.11.6", "updateTargetsArchitecture": "x86_64",
           "updateTargetsOperatingSystem": "ubuntu",
           "artifact": {"url": cloud.store.presign("bucket", f"seam/{tmp_path.name}.tar.gz", 600),
                        "sha256": art.sha256, "size": art.size}}
    execution = {"jobId": "seam-job", "executionNumber": 1, "jobDocument": doc}
    agent.mqtt = FakeMqtt()
    yield agent, execution, dev
    g.os.close(agent.state.lock_fd)


def statuses(agent):
    return [e["status"] for e in agent.state.pending_statuses() if e["jobId"] == "seam-job"]


@pytest.mark.parametrize("error", [g.MqttTimeout("no reply to jobs/seam-job/get within 20 s"),
                                   g.MqttNotConnected("interrupted: the agent is stopping"),
                                   g.JobsRejected("RequestThrottled", "slow down")])
def test_a_lost_reply_at_the_cancel_check_never_ends_the_job(agent_and_job, error):
    agent, execution, dev = agent_and_job
    agent.jobs = FakeJobs(execution, fail={1}, error=error)  # the check after unpack is the first describe
    with pytest.raises(g.MqttError):
        agent.process(execution)
    assert statuses(agent) == ["IN_PROGRESS"] and agent.state.history() == []
    assert not agent.state.handled("seam-job", 1) and dev.hook_calls() == []
    assert list((dev.root / "ota-state/downloads").glob("seam-job.tar.gz"))  # kept: no second download
    agent.jobs.fail = set()
    agent.process(execution)  # taken up again: it runs to the end
    assert statuses(agent) == ["SUCCEEDED"] and agent.state.history()[-1]["result"] == "SUCCEEDED"
    assert dev.core_version() == "1.11.6"


def test_a_refusal_for_good_ends_the_job_with_its_code(agent_and_job):
    agent, execution, dev = agent_and_job
    agent.jobs = FakeJobs(execution, fail={1}, error=g.JobsRejected("InvalidRequest", "no"))
    agent.process(execution)
    assert statuses(agent) == ["FAILED"]
    assert agent.state.pending_statuses()[-1]["statusDetails"]["reason"] == "JOBS_REJECTED"
    assert dev.hook_calls() == []


def test_a_stop_during_the_download_keeps_the_job(agent_and_job):
    agent, execution, dev = agent_and_job
    agent.jobs = FakeJobs(execution)
    agent.stopping.set()
    with pytest.raises(g.AgentStopping):
        agent.process(execution)
    assert statuses(agent) == ["IN_PROGRESS"] and agent.state.history() == []
