"""The device-facing AWS IoT Jobs MQTT API, as a service connected to the broker.

Topics (under `$aws/things/<thing>/jobs/`): `get`, `start-next`, `<jobId>/get` (with `$next`),
`<jobId>/update`, each answered on `/accepted` or `/rejected`; `notify` and `notify-next`
published when a thing's pending executions change. Field names, error codes and transition
rules follow the AWS IoT Jobs API reference. Timestamps are epoch seconds (integers).

The service keeps every execution's full update history for assertions, and can inject
`RequestThrottled` / `InternalError` answers: per thing and count (`inject_fault`), for a share
of every request (`throttle_share`), or as AWS does, past a rate of requests per second for the
whole account (`rate_limit`, a token bucket). Each request is recorded with the code it was
answered with (`requests`). `minute` scales step and in-progress timeouts so
tests stay fast: a timeout of N minutes fires after N * `minute` seconds.
"""
from __future__ import annotations

import copy
import json
import random
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

PENDING = ("QUEUED", "IN_PROGRESS")
TERMINAL = ("SUCCEEDED", "FAILED", "REJECTED", "CANCELED", "TIMED_OUT", "REMOVED")
DEVICE_SETTABLE = ("IN_PROGRESS", "SUCCEEDED", "FAILED", "REJECTED")
DETAILS_KEY = re.compile(r"^[a-zA-Z0-9:_-]{1,128}$")
CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\ufeff]")
JOB_ID = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
MAX_DOCUMENT = 32 * 1024
MAX_PAYLOAD = 128 * 1024
MAX_CLIENT_TOKEN = 64


class JobsError(Exception):
    """A rejection: `code` is the AWS error code sent in the `/rejected` reply."""

    def __init__(self, code: str, message: str, execution_state: Optional[dict] = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.execution_state = execution_state


def now() -> int:
    return int(time.time())


@dataclass
class Execution:
    job_id: str
    thing: str
    execution_number: int
    queued_at: int
    status: str = "QUEUED"
    status_details: dict = field(default_factory=dict)
    started_at: Optional[int] = None
    last_updated_at: int = 0
    version: int = 1
    step_deadline: Optional[float] = None
    in_progress_deadline: Optional[float] = None
    history: list = field(default_factory=list)  # every accepted change, in order

    def summary(self) -> dict:
        out = {"jobId": self.job_id, "queuedAt": self.queued_at, "lastUpdatedAt": self.last_updated_at,
               "versionNumber": self.version, "executionNumber": self.execution_number}
        if self.started_at is not None:
            out["startedAt"] = self.started_at
        return out

    def state(self) -> dict:
        out: dict = {"status": self.status, "versionNumber": self.version}
        if self.status_details:
            out["statusDetails"] = dict(self.status_details)
        return out

    def record(self, source: str, **extra: Any) -> None:
        self.history.append({"at": time.time(), "source": source, "status": self.status,
                             "statusDetails": dict(self.status_details), "versionNumber": self.version,
                             **extra})


@dataclass
class Job:
    job_id: str
    document: dict
    targets: list
    things: list
    created_at: int
    status: str = "IN_PROGRESS"
    description: str = ""
    presigned_url_config: Optional[dict] = None
    timeout_minutes: Optional[float] = None
    comment: Optional[str] = None
    reason_code: Optional[str] = None
    last_updated_at: int = 0
    completed_at: Optional[int] = None


def validate_status_details(details: Any) -> dict:
    if details is None:
        return {}
    if not isinstance(details, dict):
        raise JobsError("InvalidRequest", "statusDetails must be an object of string values")
    if len(details) > 10:
        raise JobsError("InvalidRequest", "statusDetails may hold at most 10 entries")
    for key, value in details.items():
        if not DETAILS_KEY.match(key):
            raise JobsError("InvalidRequest", f"statusDetails key {key!r} must match [a-zA-Z0-9:_-]+")
        if not isinstance(value, str) or not 1 <= len(value) <= 1024:
            raise JobsError("InvalidRequest", f"statusDetails value of {key!r} must be a string of 1..1024 chars")
        if CONTROL_CHARS.search(value):
            raise JobsError("InvalidRequest", f"statusDetails value of {key!r} holds a control character")
    return dict(details)


def check_client_token(request: dict) -> None:
    token = request.get("clientToken")
    if token is not None and (not isinstance(token, str) or not 1 <= len(token) <= MAX_CLIENT_TOKEN):
        raise JobsError("InvalidRequest", "clientToken must be a string of 1..64 characters")


def check_step_timeout(request: dict) -> Optional[float]:
    value = request.get("stepTimeoutInMinutes")
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not (1 <= value <= 10080 or value == -1):
        raise JobsError("InvalidRequest", "stepTimeoutInMinutes must be an integer in 1..10080 (or -1)")
    return float(value)


class JobsService:
    """The Jobs state machine. `publish(topic, payload_dict)` is how it talks to devices;
    `presign(document)` turns stored documents into served ones (fresh URLs)."""

    def __init__(self, publish: Callable[[str, dict], None],
                 presign: Callable[[Any, Optional[dict]], Any] = lambda doc, cfg: doc,
                 minute: float = 60.0) -> None:
        self._publish = publish
        self._presign = presign
        self.minute = minute
        # a step timer's minute (stepTimeoutInMinutes): a real one unless a test asks for fast
        # step timers (an agent sizes them for real links, scripts and health checks)
        self.step_minute = 60.0
        self.jobs: dict[str, Job] = {}
        self.executions: dict[tuple[str, str], list[Execution]] = {}
        self.lock = threading.RLock()
        self.requests: list[dict] = []  # every request received, for assertions
        self._faults: list[dict] = []
        self._throttle_share = 0.0
        self._throttle_rng = random.Random(0)
        self._rate: Optional[float] = None
        self._bucket = (0.0, 0.0)  # (tokens, monotonic time of the last refill)
        self._tampers: list[dict] = []
        self._last_pending: dict[str, list] = {}
        self._last_head: dict[str, Optional[tuple]] = {}
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick_loop, name="jobs-timeouts", daemon=True)
        self._ticker.start()

    # ---- operator side -------------------------------------------------------------------
    def create_job(self, job_id: str, things: list[str], document: dict, targets: Optional[list] = None,
                   description: str = "", presigned_url_config: Optional[dict] = None,
                   timeout_minutes: Optional[float] = None) -> Job:
        if not JOB_ID.match(job_id or ""):
            raise JobsError("InvalidRequestException", "jobId must match [a-zA-Z0-9_-]{1,64}")
        if not isinstance(document, dict):
            raise JobsError("InvalidRequestException", "the job document must be a JSON object")
        if len(json.dumps(document).encode()) > MAX_DOCUMENT:
            raise JobsError("LimitExceededException", "the job document exceeds 32 KB")
        if presigned_url_config is not None:
            expires = presigned_url_config.get("expiresInSec", 3600)
            if not isinstance(expires, int) or not 60 <= expires <= 3600:
                raise JobsError("InvalidRequestException", "presignedUrlConfig.expiresInSec must be 60..3600")
        with self.lock:
            if job_id in self.jobs:
                raise JobsError("ResourceAlreadyExistsException", f"job {job_id} already exists")
            t = now()
            job = Job(job_id, copy.deepcopy(document), list(targets or things), list(things), t,
                      description=description, presigned_url_config=presigned_url_config,
                      timeout_minutes=timeout_minutes, last_updated_at=t)
            self.jobs[job_id] = job
            for thing in things:
                ex = Execution(job_id, thing, 1, queued_at=t, last_updated_at=t)
                ex.record("create")
                self.executions.setdefault((job_id, thing), []).append(ex)
            for thing in things:
                self._announce(thing)
            return job

    def cancel_job(self, job_id: str, force: bool = False, comment: Optional[str] = None,
                   reason_code: Optional[str] = None) -> Job:
        with self.lock:
            job = self._job(job_id)
            if job.status in ("CANCELED", "COMPLETED"):
                raise JobsError("InvalidRequestException", f"job {job_id} is already {job.status}")
            job.status, job.comment, job.reason_code = "CANCELED", comment, reason_code
            job.last_updated_at = now()
            for ex in self._executions_of(job_id):
                if ex.status == "QUEUED" or (force and ex.status == "IN_PROGRESS"):
                    self._set_status(ex, "CANCELED", ex.status_details, "cancel")
            for thing in job.things:
                self._announce(thing)
            return job

    def describe_job(self, job_id: str) -> dict:
        with self.lock:
            job = self._job(job_id)
            counts = {s: 0 for s in PENDING + TERMINAL}
            for ex in self._executions_of(job_id):
                counts[ex.status] += 1
            out = {
                "jobArn": f"arn:aws:iot:us-east-1:123456789012:job/{job.job_id}",
                "jobId": job.job_id, "targetSelection": "SNAPSHOT", "status": job.status,
                "description": job.description, "targets": list(job.targets),
                "createdAt": job.created_at, "lastUpdatedAt": job.last_updated_at,
                "jobProcessDetails": {
                    "numberOfQueuedThings": counts["QUEUED"],
                    "numberOfInProgressThings": counts["IN_PROGRESS"],
                    "numberOfSucceededThings": counts["SUCCEEDED"],
                    "numberOfFailedThings": counts["FAILED"],
                    "numberOfRejectedThings": counts["REJECTED"],
                    "numberOfCanceledThings": counts["CANCELED"],
                    "numberOfRemovedThings": counts["REMOVED"],
                    "numberOfTimedOutThings": counts["TIMED_OUT"],
                },
            }
            if job.presigned_url_config is not None:
                out["presignedUrlConfig"] = dict(job.presigned_url_config)
            if job.timeout_minutes is not None:
                out["timeoutConfig"] = {"inProgressTimeoutInMinutes": job.timeout_minutes}
            if job.completed_at is not None:
                out["completedAt"] = job.completed_at
            if job.comment:
                out["comment"] = job.comment
            if job.reason_code:
                out["reasonCode"] = job.reason_code
            return {"job": out}

    def describe_job_execution(self, job_id: str, thing: str, execution_number: Optional[int] = None) -> dict:
        with self.lock:
            ex = self._execution(job_id, thing, execution_number)
            out = {"jobId": ex.job_id, "thingArn": f"arn:aws:iot:us-east-1:123456789012:thing/{thing}",
                   "status": ex.status, "statusDetails": {"detailsMap": dict(ex.status_details)},
                   "queuedAt": ex.queued_at, "lastUpdatedAt": ex.last_updated_at,
                   "executionNumber": ex.execution_number, "versionNumber": ex.version}
            if ex.started_at is not None:
                out["startedAt"] = ex.started_at
            return {"execution": out}

    def history(self, job_id: str, thing: str) -> list[dict]:
        with self.lock:
            return copy.deepcopy(self._execution(job_id, thing, None).history)

    def inject_fault(self, thing: str, operation: str, code: str, count: int = 1) -> None:
        """Answer the next `count` requests of `operation` (get, describe, update, start-next)
        from `thing` with `code` (RequestThrottled, InternalError, ...)."""
        with self.lock:
            self._faults.append({"thing": thing, "operation": operation, "code": code, "count": count})

    def throttle_share(self, share: float, seed: int = 0) -> None:
        """Answer this share (0..1) of every device request, chosen at random, RequestThrottled."""
        with self.lock:
            self._throttle_share = share
            self._throttle_rng = random.Random(seed)

    def rate_limit(self, per_second: Optional[float]) -> None:
        """AWS's account-wide throttle: past `per_second` requests a second (bursts up to one
        second's worth), answer RequestThrottled. None: no limit."""
        with self.lock:
            self._rate = per_second
            self._bucket = (per_second or 0.0, time.monotonic())

    def _throttled(self) -> bool:
        if self._throttle_share and self._throttle_rng.random() < self._throttle_share:
            return True
        if self._rate is None:
            return False
        tokens, last = self._bucket
        now_ = time.monotonic()
        tokens = min(self._rate, tokens + (now_ - last) * self._rate)
        if tokens < 1.0:
            self._bucket = (tokens, now_)
            return True
        self._bucket = (tokens - 1.0, now_)
        return False

    def inject_reply(self, thing: str, operation: str, change: Callable[[dict], dict], count: int = 1) -> None:
        """Pass the next `count` accepted replies to `operation` from `thing` through `change`
        before they are sent: a hostile or broken cloud, for the device's tests."""
        with self.lock:
            self._tampers.append({"thing": thing, "operation": operation, "change": change, "count": count})

    def _tamper(self, thing: str, operation: str, reply: dict) -> dict:
        for tamper in self._tampers:
            if tamper["thing"] == thing and tamper["operation"] == operation and tamper["count"] > 0:
                tamper["count"] -= 1
                return tamper["change"](copy.deepcopy(reply))
        return reply

    def stop(self) -> None:
        self._stop.set()
        self._ticker.join(5)

    # ---- device side: one MQTT request in, replies out ---------------------------------------
    def handle(self, topic: str, payload: bytes) -> None:
        parts = topic.split("/")
        if len(parts) < 5 or parts[0] != "$aws" or parts[1] != "things" or parts[3] != "jobs":
            return
        thing, rest = parts[2], parts[4:]
        if rest[-1] in ("accepted", "rejected") or rest in (["notify"], ["notify-next"]):
            return  # our own replies and notifications
        with self.lock:
            record = {"thing": thing, "topic": topic, "payload": payload, "at": time.time(), "code": None}
            self.requests.append(record)
            request: dict = {}
            try:
                request = self._parse(payload)
                check_client_token(request)
                operation, job_id = self._route(rest)
                self._apply_fault(thing, operation)
                if self._throttled():
                    raise JobsError("RequestThrottled", "The rate exceeds the limit.")
                reply = self._dispatch(thing, operation, job_id, request)
                if "clientToken" in request:
                    reply["clientToken"] = request["clientToken"]
                self._publish(topic + "/accepted", self._tamper(thing, operation, reply))
            except JobsError as err:
                record["code"] = err.code
                self._publish(topic + "/rejected", self._rejection(err, request))
            self._announce(thing)

    @staticmethod
    def _parse(payload: bytes) -> dict:
        if len(payload) > MAX_PAYLOAD:
            raise JobsError("InvalidRequest", "payload exceeds 128 KB")
        if not payload.strip():
            return {}
        try:
            request = json.loads(payload.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise JobsError("InvalidJson", "the request payload is not valid JSON") from None
        if not isinstance(request, dict):
            raise JobsError("InvalidJson", "the request payload must be a JSON object")
        return request

    @staticmethod
    def _route(rest: list[str]) -> tuple[str, Optional[str]]:
        if rest == ["get"]:
            return "get", None
        if rest == ["start-next"]:
            return "start-next", None
        if len(rest) == 2 and rest[1] in ("get", "update"):
            job_id = rest[0]
            if not (job_id == "$next" and rest[1] == "get") and not JOB_ID.match(job_id):
                raise JobsError("InvalidTopic", f"invalid job id in topic: {job_id!r}")
            return ("describe" if rest[1] == "get" else "update"), job_id
        raise JobsError("InvalidTopic", "unknown jobs topic: " + "/".join(rest))

    def _apply_fault(self, thing: str, operation: str) -> None:
        for fault in self._faults:
            if fault["thing"] == thing and fault["operation"] == operation and fault["count"] > 0:
                fault["count"] -= 1
                raise JobsError(fault["code"], f"injected {fault['code']}")

    def _rejection(self, err: JobsError, request: dict) -> dict:
        out: dict = {"code": err.code, "message": err.message, "timestamp": now()}
        if isinstance(request, dict) and "clientToken" in request:
            out["clientToken"] = request["clientToken"]
        if err.execution_state is not None:
            out["executionState"] = err.execution_state
        return out

    def _dispatch(self, thing: str, operation: str, job_id: Optional[str], request: dict) -> dict:
        if operation == "get":
            return self._get_pending(thing)
        if operation == "start-next":
            return self._start_next(thing, request)
        if operation == "describe":
            return self._describe(thing, job_id or "", request)
        return self._update(thing, job_id or "", request)

    def _get_pending(self, thing: str) -> dict:
        pending = self._pending(thing)
        return {"inProgressJobs": [e.summary() for e in pending if e.status == "IN_PROGRESS"],
                "queuedJobs": [e.summary() for e in pending if e.status == "QUEUED"],
                "timestamp": now()}

    def _start_next(self, thing: str, request: dict) -> dict:
        details = validate_status_details(request.get("statusDetails"))
        step = check_step_timeout(request)
        pending = self._pending(thing)
        if not pending:
            return {"timestamp": now()}
        ex = pending[0]
        if ex.status == "QUEUED":
            self._set_status(ex, "IN_PROGRESS", details or ex.status_details, "start-next")
            self._arm_step_timeout(ex, step)
        return {"execution": self._execution_payload(ex, True), "timestamp": now()}

    def _describe(self, thing: str, job_id: str, request: dict) -> dict:
        include_doc = request.get("includeJobDocument", True)
        number = request.get("executionNumber")
        if number is not None and (not isinstance(number, int) or isinstance(number, bool) or number < 1):
            raise JobsError("InvalidRequest", "executionNumber must be a positive integer")
        if not isinstance(include_doc, bool):
            raise JobsError("InvalidRequest", "includeJobDocument must be a boolean")
        if job_id == "$next":
            pending = self._pending(thing)
            if not pending:
                return {"timestamp": now()}
            return {"execution": self._execution_payload(pending[0], include_doc), "timestamp": now()}
        ex = self._execution(job_id, thing, number, code="ResourceNotFound")
        if ex.status in TERMINAL:
            raise JobsError("TerminalStateReached", f"job execution {job_id} is {ex.status}")
        return {"execution": self._execution_payload(ex, include_doc), "timestamp": now()}

    def _update(self, thing: str, job_id: str, request: dict) -> dict:
        status = request.get("status")
        if status not in DEVICE_SETTABLE:
            raise JobsError("InvalidRequest", "status must be one of " + ", ".join(DEVICE_SETTABLE))
        details = request.get("statusDetails")
        details = validate_status_details(details) if details is not None else None
        expected = request.get("expectedVersion")
        if expected is not None and (not isinstance(expected, int) or isinstance(expected, bool)):
            raise JobsError("InvalidRequest", "expectedVersion must be an integer")
        number = request.get("executionNumber")
        if number is not None and (not isinstance(number, int) or isinstance(number, bool) or number < 1):
            raise JobsError("InvalidRequest", "executionNumber must be a positive integer")
        step = check_step_timeout(request)
        ex = self._execution(job_id, thing, number, code="ResourceNotFound")
        if expected is not None and expected != ex.version:
            raise JobsError("VersionMismatch", f"expected version {expected}, current {ex.version}",
                            execution_state=ex.state())
        if ex.status in TERMINAL:
            raise JobsError("InvalidStateTransition",
                            f"job execution {job_id} is {ex.status} and cannot become {status}")
        self._set_status(ex, status, ex.status_details if details is None else details, "device",
                         clientToken=request.get("clientToken"))
        if status == "IN_PROGRESS":
            self._arm_step_timeout(ex, step)
        reply: dict = {"timestamp": now()}
        if request.get("includeJobExecutionState"):
            reply["executionState"] = ex.state()
        if request.get("includeJobDocument"):
            job = self.jobs[job_id]
            reply["jobDocument"] = self._presign(copy.deepcopy(job.document), job.presigned_url_config)
        return reply

    # ---- internals -------------------------------------------------------------------------
    def _job(self, job_id: str) -> Job:
        if job_id not in self.jobs:
            raise JobsError("ResourceNotFoundException", f"job {job_id} not found")
        return self.jobs[job_id]

    def _executions_of(self, job_id: str) -> list[Execution]:
        return [ex for (jid, _), exs in self.executions.items() if jid == job_id for ex in exs]

    def _execution(self, job_id: str, thing: str, number: Optional[int],
                   code: str = "ResourceNotFoundException") -> Execution:
        exs = self.executions.get((job_id, thing))
        if not exs:
            raise JobsError(code, f"no execution of job {job_id} for {thing}")
        if number is None:
            return exs[-1]
        for ex in exs:
            if ex.execution_number == number:
                return ex
        raise JobsError(code, f"no execution number {number} of job {job_id} for {thing}")

    def _pending(self, thing: str) -> list[Execution]:
        out = [exs[-1] for (_, t), exs in self.executions.items() if t == thing and exs[-1].status in PENDING]
        # In-progress executions first, then queued ones, each oldest first (as $next and start-next pick).
        return sorted(out, key=lambda e: (e.status != "IN_PROGRESS", e.queued_at, e.job_id))

    def _execution_payload(self, ex: Execution, include_document: bool) -> dict:
        out = {"jobId": ex.job_id, "thingName": ex.thing, "status": ex.status,
               "queuedAt": ex.queued_at, "lastUpdatedAt": ex.last_updated_at,
               "versionNumber": ex.version, "executionNumber": ex.execution_number}
        if ex.started_at is not None:
            out["startedAt"] = ex.started_at
        if ex.status_details:
            out["statusDetails"] = dict(ex.status_details)
        if include_document:
            job = self.jobs[ex.job_id]
            out["jobDocument"] = self._presign(copy.deepcopy(job.document), job.presigned_url_config)
        return out

    def _set_status(self, ex: Execution, status: str, details: dict, source: str, **extra: Any) -> None:
        t = now()
        if status == "IN_PROGRESS" and ex.started_at is None:
            ex.started_at = t
            job = self.jobs[ex.job_id]
            if job.timeout_minutes:
                ex.in_progress_deadline = time.monotonic() + job.timeout_minutes * self.minute
        ex.status, ex.status_details = status, dict(details)
        ex.version += 1
        ex.last_updated_at = t
        if status in TERMINAL:
            ex.step_deadline = ex.in_progress_deadline = None
        ex.record(source, **extra)
        self._update_job_status(ex.job_id)

    def _arm_step_timeout(self, ex: Execution, minutes: Optional[float]) -> None:
        if minutes is None:
            return
        ex.step_deadline = None if minutes == -1 else time.monotonic() + minutes * self.step_minute

    def _update_job_status(self, job_id: str) -> None:
        job = self.jobs[job_id]
        job.last_updated_at = now()
        if job.status == "IN_PROGRESS" and all(e.status in TERMINAL for e in self._executions_of(job_id)):
            job.status, job.completed_at = "COMPLETED", now()

    def _announce(self, thing: str) -> None:
        """Publish notify when the thing's pending list changed, notify-next when its head did."""
        pending = self._pending(thing)
        listing = [(e.job_id, e.execution_number, e.status) for e in pending]
        if self._last_pending.get(thing, []) != listing:
            self._last_pending[thing] = listing
            jobs: dict = {}
            for e in pending:
                jobs.setdefault(e.status, []).append(e.summary())
            self._publish(f"$aws/things/{thing}/jobs/notify", {"timestamp": now(), "jobs": jobs})
        head = (pending[0].job_id, pending[0].execution_number) if pending else None
        if self._last_head.get(thing, None) != head:
            self._last_head[thing] = head
            msg: dict = {"timestamp": now()}
            if pending:
                msg["execution"] = self._execution_payload(pending[0], True)
            self._publish(f"$aws/things/{thing}/jobs/notify-next", msg)

    def _tick_loop(self) -> None:
        while not self._stop.wait(0.05):
            with self.lock:
                t = time.monotonic()
                for exs in self.executions.values():
                    ex = exs[-1]
                    if ex.status != "IN_PROGRESS":
                        continue
                    deadlines = [d for d in (ex.step_deadline, ex.in_progress_deadline) if d is not None]
                    if deadlines and t >= min(deadlines):
                        self._set_status(ex, "TIMED_OUT", ex.status_details, "timeout")
                        self._announce(ex.thing)
