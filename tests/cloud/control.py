"""The look-alike's control plane over HTTP on loopback, for the CLI and the demo: POST
/<operation> with a JSON body of keyword arguments, answered with JSON (errors as
{"__type": code, "message": ...} with status 400, as AWS's JSON APIs do)."""
from __future__ import annotations

import dataclasses
import http.server
import json
import threading
import urllib.error
import urllib.request
from pathlib import Path

from .cloud import Cloud
from .device import make_root
from .jobs import JobsError

OPERATIONS = ("create-software-update-job", "publish-release", "create-job", "describe-job",
              "describe-job-execution", "cancel-job", "add-thing", "add-thing-group", "history", "make-root",
              "throttle-release")


def _jsonable(value):
    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    return json.loads(json.dumps(value, default=str))


def perform(cloud: Cloud, operation: str, args: dict):
    if operation == "add-thing":
        cert = cloud.add_thing(args["name"])
        return {"thingName": args["name"], "thingArn": cloud.thing_arn(args["name"]),
                "certificatePath": str(cert.cert), "privateKeyPath": str(cert.key),
                "caPath": str(cloud.pki.ca_path)}
    if operation == "add-thing-group":
        return {"thingGroupArn": cloud.add_thing_group(args["name"], args["things"])}
    if operation == "throttle-release":  # a slow link to the store, for demos
        release = next(r for r in cloud.greengrass.releases if (r.software, r.version) ==
                       (args["software"], args["version"]))
        cloud.store.faults("greengrass-updates", release.key).throttle_bps = int(args["bytesPerSecond"])
        return {"key": release.key, "throttleBps": int(args["bytesPerSecond"])}
    if operation == "make-root":
        cert = cloud.add_thing(args["thing"])
        dev = make_root(Path(args["root"]), args["thing"], cert, cloud.pki.ca_path, "localhost", cloud.port,
                        form=args.get("form", "current"), managed_respawn=args.get("managedRespawn", True),
                        core_version=args.get("coreVersion", "1.11.5"),
                        agent=Path(args["agent"]) if args.get("agent") else None,
                        ota_agent=args.get("otaAgent"))
        return {"root": str(dev.root), "config": str(dev.config_path), "lab": str(dev.lab)}
    method = getattr(cloud, operation.replace("-", "_"))
    return method(**args)


class ControlServer:
    def __init__(self, cloud: Cloud) -> None:
        self.cloud = cloud
        self.lock = threading.Lock()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                operation = self.path.strip("/")
                try:
                    if operation not in OPERATIONS:
                        raise JobsError("UnknownOperationException", f"no operation {operation!r}")
                    args = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                    with outer.lock:
                        status, body = 200, _jsonable(perform(outer.cloud, operation, args))
                except JobsError as err:
                    status, body = 400, {"__type": err.code, "message": err.message}
                except (TypeError, KeyError, ValueError) as err:
                    status, body = 400, {"__type": "InvalidRequestException", "message": str(err)}
                data = json.dumps(body, indent=2).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def call(port: int, operation: str, args: dict) -> tuple[int, dict]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/{operation}", data=json.dumps(args).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")
