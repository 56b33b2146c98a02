"""Fuzzing what the cloud sends through the agent's own code paths, in process and offline: job
documents through Agent.process (the whole job: parse, checks, download attempt, the status it
ends with), and arbitrary payloads on every Jobs reply topic through JobsClient.handle. No
exception may escape a job or a handler, every job ends with a status, and nothing outside the
state directory changes."""
from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import ggc_ota as g
from tests.cloud import Pki
from tests.cloud.device import make_root

VALID = {"softwareToUpdate": "core", "version": "1.11.6", "updateTargetsArchitecture": "x86_64",
         "updateTargetsOperatingSystem": "ubuntu", "updateAgentLogLevel": "INFO",
         "artifact": {"url": "https://127.0.0.1:1/x.tar.gz", "sha256": "0" * 64, "size": 10}}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12)


POISON = ["https://localhost:99999/x", "https://a/x\nb", "HTTPS://127.0.0.1:1/x", "https://", "1.0\n", "armv6l",
          "openwrt", "debug", -1, 0, 2**64, True, None, [], ["INFO"], {}, {"a": 1}, 1.5]


@st.composite
def documents(draw):
    """Mostly the valid document with one or two fields replaced (or removed), sometimes noise."""
    if draw(st.integers(0, 9)) == 0:
        return draw(json_values)
    doc = json.loads(json.dumps(VALID))
    for _ in range(draw(st.integers(1, 2))):
        path = draw(st.sampled_from([("softwareToUpdate",), ("version",), ("updateTargetsArchitecture",),
                                     ("updateTargetsOperatingSystem",), ("updateAgentLogLevel",), ("artifact",),
                                     ("artifact", "url"), ("artifact", "sha256"), ("artifact", "size")]))
        target = doc if len(path) == 1 or not isinstance(doc.get("artifact"), dict) else doc["artifact"]
        if draw(st.booleans()):
            target[path[-1]] = draw(st.sampled_from(POISON) | json_values)
        else:
            target.pop(path[-1], None)
    return doc


def tree(path):
    return sorted((str(p.relative_to(path)), p.is_dir() or p.read_bytes()) for p in path.rglob("*")
                  if "ota-state" not in p.relative_to(path).parts)


@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    work = tmp_path_factory.mktemp("fuzz")
    pki = Pki(work / "pki")
    dev = make_root(work / "greengrass", "fuzz-core", pki.client("fuzz-core"), pki.ca_path, "localhost", 8883,
                    ota_agent={"logFile": str(work / "agent.log"), "minFreeBytes": 0, "downloadRetries": 0,
                               "operatingSystem": "ubuntu", "architecture": "x86_64"})
    g.setup_logging(str(work / "agent.log"), "INFO", to_stderr=False)
    a = g.Agent(g.load_config(str(dev.root)), [], "INFO")
    a.state.ensure()
    a.state.lock()
    a.root_path = dev.root
    return a


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(doc=documents(), number=st.integers(1, 10**6))
@example(doc={**VALID, "updateAgentLogLevel": []}, number=1)  # the cases a review found, always tried
@example(doc={**VALID, "artifact": {**VALID["artifact"], "url": "https://localhost:99999/x"}}, number=2)
@example(doc={**VALID, "softwareToUpdate": ["core"]}, number=3)
@example(doc=[VALID], number=4)
def test_no_document_escapes_its_job(agent, doc, number):
    before = tree(agent.root_path)
    job_id = f"fuzz-{number}"
    agent.process({"jobId": job_id, "executionNumber": number, "jobDocument": doc})  # must not raise
    ends = [e for e in agent.state.pending_statuses() if e["jobId"] == job_id]
    assert ends and ends[-1]["status"] in ("REJECTED", "FAILED"), ends
    assert ends[-1]["statusDetails"].get("reason") not in (None, "INTERNAL_ERROR"), ends  # a named reason
    assert tree(agent.root_path) == before
    assert not g.os.listdir(agent.state.staging)


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(suffix=st.sampled_from(["notify", "get/accepted", "get/rejected", "j1/get/accepted", "j1/get/rejected",
                               "j1/update/accepted", "j1/update/rejected", "x/y/z"]),
       payload=st.one_of(st.binary(max_size=200), json_values.map(lambda v: json.dumps(v).encode()),
                         st.just(b"[" * 3000 + b"]" * 3000)))
def test_no_reply_breaks_the_jobs_client(suffix, payload):
    seen = []
    client = g.JobsClient(mqtt=None, thing="t", on_notify=seen.append)  # type: ignore[arg-type]
    assert client.handle(f"$aws/things/t/jobs/{suffix}", payload) is True
    assert all(isinstance(n, dict) for n in seen)
