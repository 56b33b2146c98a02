"""Command line of the look-alike cloud.

  python -m tests.cloud serve --workdir DIR [--thing NAME ...] [--minute SECONDS]
      start broker + Jobs service + artifact store + control plane; writes DIR/cloud.json
  python -m tests.cloud --workdir DIR <operation> [options]
      operator calls against a running look-alike, with the AWS CLI's option names:
      create-software-update-job, publish-release, create-job, describe-job,
      describe-job-execution, cancel-job, add-thing, add-thing-group, make-root
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path

from .cloud import Cloud
from .control import ControlServer, call


def serve(args) -> int:
    workdir = Path(args.workdir).resolve()
    cloud = Cloud(workdir, minute=args.minute).start()
    control = ControlServer(cloud)
    control.start()
    for name in args.thing or []:
        cloud.add_thing(name)
    info = {"brokerHost": "localhost", "brokerPort": cloud.port, "storePort": cloud.store.port,
            "controlPort": control.port, "caPath": str(cloud.pki.ca_path),
            "serviceCert": str(cloud.pki.client("iot-service").cert),
            "serviceKey": str(cloud.pki.client("iot-service").key),
            "things": {n: {"cert": str(c.cert), "key": str(c.key)} for n, c in cloud.things.items()}}
    (workdir / "cloud.json").write_text(json.dumps(info, indent=2))
    print(json.dumps(info, indent=2), flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: done.set())
    signal.signal(signal.SIGINT, lambda *a: done.set())
    done.wait()
    control.stop()
    cloud.stop()
    return 0


def operator(args, extra: list[str]) -> int:
    info = json.loads((Path(args.workdir) / "cloud.json").read_text())
    parser = argparse.ArgumentParser(prog=f"python -m tests.cloud {args.operation}")
    op = args.operation
    if op == "create-software-update-job":
        parser.add_argument("--s3-url-signer-role", required=True)
        parser.add_argument("--software-to-update", required=True)
        parser.add_argument("--update-targets", required=True, nargs="+")
        parser.add_argument("--update-targets-architecture", required=True)
        parser.add_argument("--update-targets-operating-system", required=True)
        parser.add_argument("--update-agent-log-level")
        parser.add_argument("--amzn-client-token")
    elif op == "publish-release":
        for name in ("software", "version", "architecture", "operating-system", "tarball"):
            parser.add_argument("--" + name, required=True)
    elif op == "create-job":
        parser.add_argument("--job-id", required=True)
        parser.add_argument("--targets", required=True, nargs="+")
        parser.add_argument("--document-file", required=True)
        parser.add_argument("--description", default="")
    elif op in ("describe-job", "cancel-job"):
        parser.add_argument("--job-id", required=True)
        if op == "cancel-job":
            parser.add_argument("--force", action="store_true")
            parser.add_argument("--comment")
    elif op in ("describe-job-execution", "history"):
        parser.add_argument("--job-id", required=True)
        parser.add_argument("--thing-name", required=True)
    elif op in ("add-thing", "add-thing-group"):
        parser.add_argument("--name", required=True)
        if op == "add-thing-group":
            parser.add_argument("--things", nargs="+", required=True)
    elif op == "throttle-release":
        parser.add_argument("--software", required=True)
        parser.add_argument("--version", required=True)
        parser.add_argument("--bytes-per-second", required=True, type=int)
    elif op == "make-root":
        parser.add_argument("--root", required=True)
        parser.add_argument("--thing-name", required=True)
        parser.add_argument("--form", default="current", choices=["current", "legacy"])
        parser.add_argument("--agent")
    else:
        print(f"unknown operation {op!r}", file=sys.stderr)
        return 2
    opts = vars(parser.parse_args(extra))
    if op == "create-job":
        opts["document"] = json.loads(Path(opts.pop("document_file")).read_text())
    if op == "make-root":
        opts["thing"] = opts.pop("thing_name")
    if op == "throttle-release":
        opts["bytesPerSecond"] = opts.pop("bytes_per_second")
    status, body = call(info["controlPort"], op, {k: v for k, v in opts.items() if v is not None})
    print(json.dumps(body, indent=2))
    return 0 if status == 200 else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.cloud", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=".cloud")
    parser.add_argument("--minute", type=float, default=60.0, help="seconds in a Jobs timeout minute")
    parser.add_argument("--thing", action="append")
    parser.add_argument("operation")
    args, extra = parser.parse_known_args(argv)
    if args.operation == "serve":
        return serve(args)
    return operator(args, extra)


if __name__ == "__main__":
    sys.exit(main())
