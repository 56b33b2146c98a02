"""The whole look-alike: broker + Jobs service + artifact store + Greengrass control plane,
started and stopped together. Tests use this Python API; the CLI (`python -m tests.cloud`)
drives the same objects through a small control server on loopback."""
from __future__ import annotations

import json
import socket
import threading
from pathlib import Path
from typing import Optional

import paho.mqtt.client as mqtt

from .broker import SERVICE_IDENTITY, Mosquitto
from .greengrass import ACCOUNT, REGION, Greengrass
from .jobs import JobsService
from .pki import ClientCert, Pki
from .store import ArtifactStore

HOST = "localhost"


class Cloud:
    def __init__(self, workdir: Path, minute: float = 60.0) -> None:
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.pki = Pki(self.dir / "pki")
        self.broker = Mosquitto(self.dir / "broker", self.pki)
        self.store = ArtifactStore(self.pki)
        self.jobs = JobsService(self._publish, self._presign, minute=minute)
        self.things: dict[str, ClientCert] = {}
        self.groups: dict[str, list[str]] = {}
        self.greengrass = Greengrass(self.jobs, self.store, self.things, self.groups)
        self._client: Optional[mqtt.Client] = None
        self._connected = threading.Event()
        self.published: list[tuple[str, dict]] = []

    # ---- life cycle -----------------------------------------------------------------------
    def start(self) -> Cloud:
        self.broker.start()
        self.store.start()
        self._connect_service()
        return self

    def stop(self) -> None:
        if self._client is not None:
            self._client.disconnect()
            self._client.loop_stop()
            self._client = None
        self.jobs.stop()
        self.store.stop()
        self.broker.stop()

    def __enter__(self) -> Cloud:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return self.broker.port

    # ---- identities -----------------------------------------------------------------------
    def add_thing(self, name: str) -> ClientCert:
        if name not in self.things:
            self.things[name] = self.pki.client(name)
        return self.things[name]

    def add_thing_group(self, name: str, things: list[str]) -> str:
        for t in things:
            self.add_thing(t)
        self.groups[name] = list(things)
        return f"arn:aws:iot:{REGION}:{ACCOUNT}:thinggroup/{name}"

    @staticmethod
    def thing_arn(name: str) -> str:
        return f"arn:aws:iot:{REGION}:{ACCOUNT}:thing/{name}"

    # ---- operator API (AWS names) ----------------------------------------------------------
    def create_software_update_job(self, **kwargs) -> dict:
        return self.greengrass.create_software_update_job(**kwargs)

    def publish_release(self, **kwargs):
        return self.greengrass.publish_release(**kwargs)

    def create_job(self, job_id: str, targets: list[str], document: dict, description: str = "",
                   presigned_url_config: Optional[dict] = None, timeout_minutes: Optional[float] = None) -> dict:
        things = self.greengrass.resolve_targets(targets)
        self.jobs.create_job(job_id, things, document, targets=targets, description=description,
                             presigned_url_config=presigned_url_config, timeout_minutes=timeout_minutes)
        return {"jobArn": f"arn:aws:iot:{REGION}:{ACCOUNT}:job/{job_id}", "jobId": job_id,
                "description": description}

    def describe_job(self, job_id: str) -> dict:
        return self.jobs.describe_job(job_id)

    def describe_job_execution(self, job_id: str, thing_name: str, execution_number: Optional[int] = None) -> dict:
        return self.jobs.describe_job_execution(job_id, thing_name, execution_number)

    def cancel_job(self, job_id: str, force: bool = False, comment: Optional[str] = None) -> dict:
        job = self.jobs.cancel_job(job_id, force=force, comment=comment)
        return {"jobArn": f"arn:aws:iot:{REGION}:{ACCOUNT}:job/{job.job_id}", "jobId": job.job_id}

    def history(self, job_id: str, thing_name: str) -> list[dict]:
        return self.jobs.history(job_id, thing_name)

    # ---- the service's MQTT connection ------------------------------------------------------
    def _presign(self, document, config: Optional[dict]):
        expires = (config or {}).get("expiresInSec", 3600)
        return self.store.substitute(document, expires)

    def _publish(self, topic: str, payload: dict) -> None:
        self.published.append((topic, payload))
        if self._client is not None:
            self._client.publish(topic, json.dumps(payload, separators=(",", ":")), qos=1)

    def _connect_service(self) -> None:
        ident = self.pki.client(SERVICE_IDENTITY)
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="iot-jobs-service",
                             protocol=mqtt.MQTTv311)
        client.tls_set(ca_certs=str(self.pki.ca_path), certfile=str(ident.cert), keyfile=str(ident.key))
        client.reconnect_delay_set(0.05, 0.5)  # a cloud service is back at once after a broker restart

        def on_connect(c, userdata, flags, reason_code, properties):
            if not reason_code.is_failure:
                c.subscribe("$aws/things/+/jobs/#", qos=1)

        def on_subscribe(c, userdata, mid, reason_codes, properties):
            self._connected.set()  # ready only once the broker acknowledged the subscription

        def on_disconnect(c, userdata, flags, reason_code, properties):
            self._connected.clear()

        def on_message(c, userdata, msg):
            self.jobs.handle(msg.topic, msg.payload)

        client.on_connect = on_connect
        client.on_disconnect = on_disconnect
        client.on_message = on_message
        client.on_subscribe = on_subscribe
        # A cloud service answers at once: no Nagle delay between its PUBACK and its reply.
        client.on_socket_open = lambda c, userdata, sock: sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client.connect(HOST, self.broker.port, keepalive=30)
        client.loop_start()
        self._client = client
        if not self._connected.wait(10):
            raise TimeoutError("the Jobs service could not connect to the broker:\n" + self.broker.log_text())

    def wait_service_connected(self, timeout: float = 10) -> bool:
        return self._connected.wait(timeout)
