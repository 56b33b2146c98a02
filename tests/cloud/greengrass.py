"""The Greengrass v1 control plane's part in OTA: a catalogue of released software (what AWS
publishes per OS/architecture) and `CreateSoftwareUpdateJob`, which creates an AWS IoT
snapshot job whose document (docs/contract.md, "The job document and the artifact") holds a
`${aws:iot:s3-presigned-url:...}` placeholder."""
from __future__ import annotations

import hashlib
import re
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .jobs import JobsError, JobsService

SUPPORTED_PLATFORMS = {  # the pairs Greengrass v1 ships updates for: (operating system, architecture)
    ("ubuntu", "x86_64"), ("ubuntu", "aarch64"), ("amazon_linux", "x86_64"),
    ("raspbian", "armv7l"), ("raspbian", "armv6l"), ("openwrt", "aarch64"), ("openwrt", "armv7l"),
}
ARCHITECTURES = ("armv6l", "armv7l", "x86_64", "aarch64")
OPERATING_SYSTEMS = ("ubuntu", "raspbian", "amazon_linux", "openwrt")
SOFTWARE = ("core", "ota_agent")
LOG_LEVELS = ("NONE", "TRACE", "DEBUG", "VERBOSE", "INFO", "WARN", "ERROR", "FATAL")
ACCOUNT = "123456789012"
REGION = "us-east-1"
BUCKET = "greengrass-updates"
ROLE_ARN = re.compile(r"^arn:aws:iam::\d{12}:role/[\w+=,.@/-]{1,512}$")
TARGET_ARN = re.compile(r"^arn:aws:iot:[a-z0-9-]+:\d{12}:(thing|thinggroup)/([a-zA-Z0-9:_-]{1,128})$")


class BadRequest(JobsError):
    def __init__(self, message: str) -> None:
        super().__init__("BadRequestException", message)


@dataclass(frozen=True)
class Release:
    software: str
    version: str
    architecture: str
    operating_system: str
    key: str
    sha256: str
    size: int


def version_key(version: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"[.-]", version))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Greengrass:
    def __init__(self, jobs: JobsService, store, things: dict, groups: dict) -> None:
        self.jobs = jobs
        self.store = store
        self.things = things
        self.groups = groups
        self.releases: list[Release] = []
        self._tokens: dict[str, tuple[tuple, dict]] = {}
        self._lock = threading.Lock()

    def publish_release(self, software: str, version: str, architecture: str, operating_system: str,
                        tarball: Path) -> Release:
        """Make `tarball` the artifact of `software` `version` for one platform."""
        if software not in SOFTWARE:
            raise BadRequest(f"SoftwareToUpdate must be one of {', '.join(SOFTWARE)}")
        tarball = Path(tarball)
        key = f"{software}/{version}/greengrass-{software}-{version}-{operating_system}-{architecture}.tar.gz"
        self.store.put(BUCKET, key, tarball)
        release = Release(software, version, architecture, operating_system, key,
                          sha256_file(tarball), tarball.stat().st_size)
        with self._lock:
            self.releases = [r for r in self.releases if (r.software, r.version, r.architecture,
                             r.operating_system) != (software, version, architecture, operating_system)]
            self.releases.append(release)
        return release

    def latest(self, software: str, architecture: str, operating_system: str) -> Optional[Release]:
        matching = [r for r in self.releases if (r.software, r.architecture, r.operating_system)
                    == (software, architecture, operating_system)]
        return max(matching, key=lambda r: version_key(r.version), default=None)

    def resolve_targets(self, targets: list) -> list[str]:
        things: list[str] = []
        for arn in targets:
            m = TARGET_ARN.match(arn if isinstance(arn, str) else "")
            if not m:
                raise BadRequest(f"UpdateTargets: {arn!r} is not a thing or thing-group ARN")
            kind, name = m.groups()
            if kind == "thing":
                if name not in self.things:
                    raise BadRequest(f"UpdateTargets: thing {name} does not exist")
                members = [name]
            else:
                if name not in self.groups:
                    raise BadRequest(f"UpdateTargets: thing group {name} does not exist")
                members = self.groups[name]
            things.extend(t for t in members if t not in things)
        return things

    def create_software_update_job(self, s3_url_signer_role: str, software_to_update: str,
                                   update_targets: list, update_targets_architecture: str,
                                   update_targets_operating_system: str,
                                   update_agent_log_level: Optional[str] = None,
                                   amzn_client_token: Optional[str] = None,
                                   url_expires_in_sec: int = 3600) -> dict:
        params = (s3_url_signer_role, software_to_update, tuple(update_targets or ()),
                  update_targets_architecture, update_targets_operating_system, update_agent_log_level)
        with self._lock:
            if amzn_client_token is not None and amzn_client_token in self._tokens:
                earlier_params, earlier = self._tokens[amzn_client_token]
                if earlier_params != params:
                    raise BadRequest("AmznClientToken was used before with other parameters")
                return dict(earlier)
        if not isinstance(s3_url_signer_role, str) or not ROLE_ARN.match(s3_url_signer_role):
            raise BadRequest("S3UrlSignerRole must be an IAM role ARN")
        if software_to_update not in SOFTWARE:
            raise BadRequest(f"SoftwareToUpdate must be one of {', '.join(SOFTWARE)}")
        if update_targets_architecture not in ARCHITECTURES:
            raise BadRequest(f"UpdateTargetsArchitecture must be one of {', '.join(ARCHITECTURES)}")
        if update_targets_operating_system not in OPERATING_SYSTEMS:
            raise BadRequest(f"UpdateTargetsOperatingSystem must be one of {', '.join(OPERATING_SYSTEMS)}")
        if (update_targets_operating_system, update_targets_architecture) not in SUPPORTED_PLATFORMS:
            raise BadRequest(f"{update_targets_operating_system}/{update_targets_architecture} "
                             "is not a supported platform")
        if update_agent_log_level is not None and update_agent_log_level not in LOG_LEVELS:
            raise BadRequest(f"UpdateAgentLogLevel must be one of {', '.join(LOG_LEVELS)}")
        if not update_targets:
            raise BadRequest("UpdateTargets must name at least one thing or thing group")
        things = self.resolve_targets(update_targets)
        release = self.latest(software_to_update, update_targets_architecture, update_targets_operating_system)
        if release is None:
            raise BadRequest(f"no {software_to_update} release for {update_targets_operating_system}/"
                             f"{update_targets_architecture}")
        document = {
            "softwareToUpdate": software_to_update,
            "version": release.version,
            "updateTargetsArchitecture": update_targets_architecture,
            "updateTargetsOperatingSystem": update_targets_operating_system,
            "artifact": {
                "url": f"${{aws:iot:s3-presigned-url:https://{BUCKET}.s3.amazonaws.com/{release.key}}}",
                "sha256": release.sha256,
                "size": release.size,
            },
        }
        if update_agent_log_level is not None:
            document["updateAgentLogLevel"] = update_agent_log_level
        job_id = f"GreengrassUpdateJob_{uuid.uuid4()}"
        self.jobs.create_job(job_id, things, document, targets=list(update_targets),
                             description=f"Greengrass {software_to_update} update to {release.version}",
                             presigned_url_config={"roleArn": s3_url_signer_role,
                                                   "expiresInSec": url_expires_in_sec})
        result = {"IotJobArn": f"arn:aws:iot:{REGION}:{ACCOUNT}:job/{job_id}", "IotJobId": job_id,
                  "PlatformSoftwareVersion": release.version}
        if amzn_client_token is not None:
            with self._lock:
                self._tokens[amzn_client_token] = (params, result)
        return dict(result)
