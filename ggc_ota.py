#!/usr/bin/env python3
"""ggc-ota: over-the-air update agent for AWS IoT Greengrass v1 cores.

One module, standard library only, CPython 3.8+. It reads top to bottom in sections:

    errors        exception classes, each with a machine reason code for statusDetails.reason
    config        config.json (both Greengrass v1 forms) and the agent's own otaAgent block
    logging       the agent's logger
    MQTT codec    MQTT 3.1.1 packets: encode, decode, validate (bounded, never trusts lengths)
    MQTT client   TLS transport and one network thread: keepalive, QoS 1, reconnect with backoff
    Jobs client   the AWS IoT Jobs MQTT API: requests matched to replies by clientToken
    download      HTTPS download with sha256 on the fly, Range resume, fresh URLs after 403
    archive       safe unpacking of the gzip tar artifact into staging, and its layout check
    checks        the job document, the platform, the scripts, free disk
    hooks         the four managed-respawn scripts, with a timeout, in their own process group
    state         lock, outbox of status updates, history (the state directory)
    swap          the typed journal, the swap of the installed tree, the restore
    processes     starting programs and agents, the daemon, a new agent's self-test
    engine        the steps table, plans of steps, the runner, rollback, recovery
    trial         both sides of a self-update's trial
    prepare       what comes before anything is touched (also the dry-run's rehearsal)
    cloud side    the event loop, the outbox, the intake of jobs (the transport passed in)
    agent         the process: lock, recovery, one job at a time, the hand-over
    dry-run       the offline preflight and rehearsal, and --status
    CLI           the command line

README.md is the user's manual; docs/contract.md what the agent promises; docs/internals.md how it is built.
"""
from __future__ import annotations

import collections
import errno
import hashlib
import json
import logging
import os
import queue
import random
import re
import select
import signal
import socket
import ssl
import stat
import struct
import sys
import threading
import time
import types
import zlib

# Imported where they are used, so that an idle agent does not load them (2.8 MiB); typing is
# for type checkers only (mypy and pyright read `if TYPE_CHECKING:` whatever its origin).
TYPE_CHECKING = False
if TYPE_CHECKING:
    import http.client
    import subprocess
    import tarfile
    from typing import Any, BinaryIO, Callable, Dict, Iterator, List, Optional, Tuple

__version__ = "0.1.0"

# ============================================================================================
# errors: every failure the agent reports carries a short machine reason code, which goes
# straight into statusDetails.reason of the job it was working on. REASONS decides what a
# failure does: the status the job ends with (or IN_PROGRESS: transient, the job is taken up
# again), whether rolledBack can be "true", and where it can arise. classify() names the
# reason of any error; nothing else decides.
# ============================================================================================


class Reason(collections.namedtuple("Reason", ["status", "rolled_back", "where", "meaning"])):
    """What a reason code says. `status`: what the job ends with (FAILED, REJECTED, CANCELED:
    history only), IN_PROGRESS for transient trouble (nothing is reported; the job stays
    IN_PROGRESS and is taken up again), "-" for a start-up error that never reaches a job.
    `rolled_back`: statusDetails.rolledBack is "true" (yes), "false" (no: nothing was touched,
    or the rollback failed), or "true" only when the update had begun changing the device (-).
    `where`: job, start-up, or both."""

    __slots__ = ()

    @property
    def transient(self) -> bool:
        return self.status == "IN_PROGRESS"


# Every reason code the agent knows. README's table of reasons is this one (tests/test_repo.py
# checks that they agree, and that the code names no other).
REASONS = {
    "INVALID_DOCUMENT": Reason("REJECTED", "no", "job", "the job document is malformed (the message names the field)"),
    "PLATFORM_MISMATCH": Reason("REJECTED", "no", "job", "the update is for another architecture or operating system"),
    "SCRIPT_INVALID": Reason("FAILED", "no", "job", "a managed-respawn script is missing or unsafe (the message "
                                                    "names it)"),
    "DISK_FULL": Reason("FAILED", "-", "job", "not enough room (the check before the update), or the disk filled up"),
    "STATE_DIR_ELSEWHERE": Reason("FAILED", "no", "job", "the state directory is not on the root's filesystem"),
    "STATE_DIR_UNSAFE": Reason("FAILED", "-", "job, start-up", "the state directory, or one on its way, may be "
                               "written by another user, or was replaced while the agent ran"),
    "CONFIG_INVALID": Reason("FAILED", "no", "job, start-up", "the configuration is invalid (the message names the key "
                                                              "or file)"),
    "DOWNLOAD_FAILED": Reason("FAILED", "no", "job", "the artifact could not be fetched (the message says why)"),
    "URL_EXPIRED": Reason("FAILED", "no", "job", "the presigned URL kept being refused, even fresh ones"),
    "SIZE_MISMATCH": Reason("FAILED", "no", "job", "the server's artifact has another size than the document says"),
    "HASH_MISMATCH": Reason("FAILED", "no", "job", "the artifact's sha256 is not the document's"),
    "UNSAFE_ARCHIVE": Reason("FAILED", "no", "job",
                             "the artifact is not a safe gzip tar archive (the security model lists what is checked)"),
    "BAD_ARTIFACT_LAYOUT": Reason("FAILED", "no", "job", "the archive does not hold greengrass/ggc or greengrass/ota"),
    "NEW_AGENT_BROKEN": Reason("FAILED", "-", "job", "the new agent failed its self-test from staging, or could not "
                                                     "be started after the swap (then rolled back)"),
    "JOBS_REJECTED": Reason("FAILED", "no", "job", "the cloud refused a request for good (the message has its code)"),
    "HOOK_FAILED": Reason("FAILED", "yes", "job", "a script exited non-zero (its last lines are in the message)"),
    "HOOK_TIMEOUT": Reason("FAILED", "yes", "job", "a script ran past scriptTimeout and was stopped"),
    "HEALTH_CHECK_FAILED": Reason("FAILED", "yes", "job", "the new core did not pass the health check"),
    "NEW_AGENT_CRASHED": Reason("FAILED", "yes", "job", "the new agent on trial exited or was killed"),
    "NEW_AGENT_NO_CONNECTION": Reason("FAILED", "yes", "job", "the new agent on trial did not connect in time"),
    "NEW_AGENT_TIMEOUT": Reason("FAILED", "yes", "job", "the new agent on trial connected, then did not finish its "
                                                        "trial"),
    "NEW_AGENT_NO_REPORT": Reason("FAILED", "yes", "job", "the new agent on trial could not report to the cloud"),
    "INTERRUPTED": Reason("FAILED", "yes", "job", "the agent stopped during the update (found at the next start)"),
    "JOURNAL_CORRUPT": Reason("FAILED", "no", "job", "the update journal was unreadable: nothing was deleted, the "
                                                     "staged trees were kept (the message says where)"),
    "ROLLBACK_FAILED": Reason("FAILED", "no", "job", "the rollback itself failed: the device needs attention"),
    "INVALID_JOB_ID": Reason("FAILED", "no", "job", "a job id that is not an AWS job id was about to name a file "
                                                    "(the intake lets none through)"),
    "INTERNAL_ERROR": Reason("FAILED", "-", "job, start-up", "anything unexpected (the message says what)"),
    "CANCELED": Reason("CANCELED", "-", "job", "the job was canceled in the cloud (history only; nothing is "
                                               "reported)"),
    "LINK_DOWN": Reason("IN_PROGRESS", "-", "job, start-up", "the cloud could not be reached, or a reply was lost, "
                        "before anything was changed: the job is taken up again when the cloud answers"),
    "CLOUD_BUSY": Reason("IN_PROGRESS", "-", "job", "the cloud throttled a request (RequestThrottled, InternalError): "
                                                    "as LINK_DOWN"),
    "STOPPING": Reason("IN_PROGRESS", "-", "job", "the agent was told to stop before anything was changed: the "
                                                  "download resumes at the next start"),
    "POSTPONED": Reason("IN_PROGRESS", "-", "job", "a pre-update script said not now (exit 75): nothing was changed, "
                                                   "the download is kept, the update is tried again after "
                                                   "postponeSeconds"),
    "POSTPONED_TOO_LONG": Reason("FAILED", "no", "job", "a pre-update script said not now postponeLimit times in "
                                                        "a row"),
    "NOT_ROOT": Reason("-", "-", "start-up", "the agent must run as root (the dry-run and --status need not)"),
    "ALREADY_RUNNING": Reason("-", "-", "start-up", "another agent holds the state directory's lock (exit code 3)"),
}


class OtaError(Exception):
    """Base of every error the agent raises on purpose. A subclass names its reason; this base
    class takes the reason as its second argument."""

    reason = "INTERNAL_ERROR"

    def __init__(self, message: str, reason: Optional[str] = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class AgentStopping(BaseException):
    """SIGTERM arrived while the agent could still stop without harm (before any change). Not
    an Exception: no `except Exception` meant for failures may swallow it."""


class AgentReplaced(BaseException):
    """Another agent process now runs in place of this one (a self-update or its rollback
    handed over): this process must exit with `code` and touch nothing more."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def classify(err: BaseException) -> str:
    """The reason code of any error: the one it carries, DISK_FULL for a full disk, STOPPING for
    a stop, INTERNAL_ERROR for anything unforeseen (a bug, or input nothing foresaw)."""
    if isinstance(err, OtaError) and err.reason in REASONS:
        return err.reason
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        return "DISK_FULL"
    if isinstance(err, AgentStopping):
        return "STOPPING"
    return "INTERNAL_ERROR"


def rolled_back_value(code: str, touched: bool) -> str:
    """statusDetails.rolledBack for a job that ended with `code`; `touched`: the update had begun
    changing the device (its journal was written) and the rollback put the old software back."""
    rule = REASONS[code].rolled_back
    return "true" if rule == "yes" or (rule == "-" and touched) else "false"


class JobCanceled(OtaError):
    reason = "CANCELED"


class MqttError(OtaError):
    """The link to the cloud: down, refused, or a reply lost. Transient in a job."""

    reason = "LINK_DOWN"


class MqttProtocolError(MqttError):
    """The peer sent bytes that are not valid MQTT 3.1.1; the connection is closed."""


CONNACK_CODES = {0: "connection accepted", 1: "unacceptable protocol version", 2: "client identifier rejected",
                 3: "server unavailable", 4: "bad user name or password",
                 5: "not authorized (check the certificate's IoT policy)"}


class MqttConnectRefused(MqttError):
    """CONNACK with a non-zero return code."""

    def __init__(self, code: int) -> None:
        self.code = code
        super().__init__(f"broker refused the connection: {CONNACK_CODES.get(code, 'unknown code')} "
                         f"(CONNACK return code {code})")


class MqttAuthError(MqttError):
    """The TLS layer refused us: unknown server, wrong hostname, or our certificate refused."""


class CredentialsInvalid(MqttAuthError):
    """The root CA, the certificate or its key cannot be loaded: the configuration is wrong."""

    reason = "CONFIG_INVALID"


class MqttTimeout(MqttError):
    pass


class MqttSubscribeRefused(MqttError):
    pass


class MqttNotConnected(MqttError):
    pass


class ProxyFailed(MqttError):
    """The HTTP proxy refused the tunnel (its status line is in the message) or closed it."""


class ConfigError(OtaError):
    reason = "CONFIG_INVALID"


class StateDirUnsafe(OtaError):
    reason = "STATE_DIR_UNSAFE"


class StateDirElsewhere(OtaError):
    reason = "STATE_DIR_ELSEWHERE"


class DiskFull(OtaError):
    reason = "DISK_FULL"


# ============================================================================================
# filesystem: the primitives every later section uses. C library calls Python's os module lacks,
# durable directories and trees (fsync), and removing a tree.
# ============================================================================================

def libc_function(name: str) -> Optional[Callable[..., int]]:
    """A C library function Python's os module lacks (syncfs, renameat2, prctl, malloc_trim),
    through ctypes; None where the C library has none."""
    try:
        import ctypes
        return getattr(ctypes.CDLL(None, use_errno=True), name)
    except (ImportError, OSError, AttributeError):
        return None


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def walk_tree(top: str) -> Iterator[Tuple[str, List[str], List[str]]]:
    """os.walk(top) without following symlinks, top-down, and without recursion: a tree the
    cloud built can be deeper than Python's recursion limit (os.walk and shutil.rmtree recurse
    before Python 3.12). Directories that vanish meanwhile are skipped."""
    stack = [top]
    while stack:
        dirpath = stack.pop()
        dirnames, filenames = [], []
        try:
            with os.scandir(dirpath) as entries:
                for entry in entries:
                    (dirnames if entry.is_dir(follow_symlinks=False) else filenames).append(entry.name)
        except (FileNotFoundError, NotADirectoryError):
            continue
        yield dirpath, dirnames, filenames
        stack.extend(os.path.join(dirpath, d) for d in reversed(dirnames))


def remove_tree(path: str) -> None:
    """Remove a file, a symlink or a directory tree, however deep (iteratively, children first)."""
    if os.path.islink(path) or os.path.isfile(path):
        os.unlink(path)
        return
    if not os.path.isdir(path):
        return
    directories = []
    for dirpath, _, filenames in walk_tree(path):
        directories.append(dirpath)
        for name in filenames:
            os.unlink(os.path.join(dirpath, name))
    for dirpath in reversed(directories):  # deepest first: each is empty by the time it is removed
        os.rmdir(dirpath)


def fsync_tree(path: str) -> None:
    for dirpath, _, files in walk_tree(path):
        for name in files:
            full = os.path.join(dirpath, name)
            if not os.path.islink(full):
                fsync_file(full)
        fsync_dir(dirpath)


# ============================================================================================
# config: Greengrass v1's config.json in either form. Legacy: coreThing.caPath/certPath/keyPath
# relative to <root>/certs. Current (1.6+): crypto.caPath and
# crypto.principals.IoTCertificate.certificatePath/privateKeyPath as file:// URIs. Settings of
# the agent's own live in an optional top-level "otaAgent" object (README: Configuration).
# ============================================================================================

DEFAULT_ROOT = "/greengrass"
DEFAULT_LOG_FILE = "/var/log/greengrass/ota/ggc_ota.txt"
OPENWRT_RELEASE = "/etc/openwrt_release"
KEEPALIVE_MIN, KEEPALIVE_MAX, KEEPALIVE_DEFAULT = 30, 1200, 600  # AWS IoT Core's rules
CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")
THING_ARN = re.compile(r"arn:aws[a-z-]*:iot:[a-z0-9-]+:\d{12}:thing/([a-zA-Z0-9:_-]{1,128})")  # fullmatch

# key: (accepted types, default). Defaults that depend on the root are filled in by load_config.
OTA_AGENT_KEYS: Dict[str, Tuple[tuple, Any]] = {
    "stateDir": ((str,), None),                 # default <root>/ota-state
    "logFile": ((str,), DEFAULT_LOG_FILE),
    "logMaxBytes": ((int,), 5 * 1024 * 1024),
    "logBackups": ((int,), 3),
    "keep": ((list,), ["ggc/deployment", "ggc/var"]),
    "minFreeBytes": ((int,), 400 * 1024 * 1024),  # what Greengrass v1 asks of a core
    "scriptTimeout": ((int, float), 300),
    "architecture": ((str,), None),              # override uname -m
    "operatingSystem": ((str,), None),           # override /etc/os-release
    "extraCaPath": ((str,), None),               # one more CA file for HTTPS downloads and an https proxy
    "downloadReadTimeout": ((int, float), 60),
    "downloadRetries": ((int,), 8),
    "newAgentTimeout": ((int, float), 120),      # the new agent must reach CONNACK within this
    "progressInterval": ((int, float), 10),      # seconds between progress reports
    "corePidFile": ((str,), "/var/run/greengrassd.pid"),  # greengrassd's; the health check watches it
    "syslog": ((str,), "/dev/log"),              # the syslog socket; "" for none
    "healthCheckTimeout": ((int, float), 60),    # ggc_health_check.sh must pass within this
    "healthCheckSeconds": ((int, float), 10),    # without it, the core daemon must live this long
    "reconnectBaseSeconds": ((int, float), 10),  # first reconnect at a random moment within this
    "reconnectMaxSeconds": ((int, float), 120),  # cap of the MQTT reconnect backoff
    "clientId": ((str,), None),                  # the MQTT client id; default <thing name>-ota
    "slowLinkBytesPerSecond": ((int,), 8192),    # sizes a download's step timer (stepTimeoutInMinutes)
    "maxDownloadBytesPerSecond": ((int,), 0),    # caps the download's average rate; 0: no cap
    "postponeSeconds": ((int, float), 300),      # a pre-update script's "not now" (exit 75): try again after this
    "postponeLimit": ((int,), 12),               # ... at most this many times, then POSTPONED_TOO_LONG
    "reinstallSameVersion": ((bool,), False),    # a job for the version installed: install it again
}


class Software(collections.namedtuple("Software", ["tree", "pre_script", "post_script", "health_script", "daemon",
                                                   "entry", "steps"])):
    """One kind of software an update installs: its tree under the root (and greengrass/<tree>
    in the artifact), its two managed-respawn scripts and its optional health-check script (in
    <root>/usr/scripts), how it is stopped and started without them (`daemon stop|start`,
    relative to the root; None: nothing to do), the file the tree must hold (relative to the
    tree; None: any directory), and the plan of its update: the steps the engine runs (the
    steps table in the engine section says what each does)."""

    __slots__ = ()


SOFTWARE = {
    "core": Software("ggc", "ggc_pre_update.sh", "ggc_post_update.sh", "ggc_health_check.sh", "ggc/core/greengrassd",
                     None, ("pre_update", "keep", "swap", "post_update", "health_check", "commit")),
    "ota_agent": Software("ota", "ota_pre_update.sh", "ota_post_update.sh", None, None, "ota_agent/ggc-ota",
                          ("pre_update", "new_agent_trial", "swap", "hand_over", "commit")),
}
ALL_SCRIPTS = tuple(name for kind in SOFTWARE.values() for name in (kind.pre_script, kind.post_script))


class Proxy(collections.namedtuple("Proxy", ["scheme", "host", "port", "username", "password", "no_proxy",
                                             "source", "ca_files"], defaults=((),))):
    """An HTTP proxy that both channels go through (HTTP CONNECT; TLS stays end to end):
    `scheme` http or https (TLS to the proxy itself, verified against the system's CAs and
    `ca_files`), `no_proxy` the hosts reached directly, `source` where it came from
    (coreThing.networkProxy, HTTPS_PROXY)."""

    __slots__ = ()

    def shown(self) -> str:
        """The proxy as logs and the dry-run show it: the password never."""
        who = f"{self.username}:***@" if self.username else ""
        return f"{self.scheme}://{who}{self.host}:{self.port}"

    def used_for(self, host: str) -> bool:
        """False for a host of the no-proxy list: an exact name or address, a domain (with or
        without its leading dot) and its subdomains, or "*" for every host."""
        host = host.lower().rstrip(".")
        for entry in self.no_proxy:
            if entry == "*" or host == entry or host.endswith("." + entry.lstrip(".")):
                return False
        return True


def parse_proxy(url: Any, username: Any, password: Any, no_proxy: Any, source: str) -> Proxy:
    """A proxy from a URL (`http://host:port`, `https://user:pass@host:port`) and a no-proxy list
    (a comma-separated string, entries may carry a scheme and a port, as Greengrass writes them)."""
    import urllib.parse
    if not isinstance(url, str) or not url:
        raise ConfigError(f"{source}: the proxy URL must be a string such as http://host:3128")
    def invalid(why: str) -> ConfigError:  # never quoting the URL: part of a password would show
        return ConfigError(f"{source}: the proxy URL is not valid ({why}); a user name or password in it must be "
                           "percent-encoded (/ # ? @ : % as %2F %23 %3F %40 %3A %25)")

    try:
        parts = urllib.parse.urlsplit(url if "://" in url else "http://" + url)
        port = parts.port
    except ValueError:
        raise invalid("its host or port cannot be read") from None
    if "@" in parts.path + parts.query + parts.fragment:
        raise invalid("an @ after the host")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{source}: the proxy URL must be http:// or https:// with a host")
    user = username if isinstance(username, str) and username else urllib.parse.unquote(parts.username or "")
    secret = password if isinstance(password, str) and password else urllib.parse.unquote(parts.password or "")
    entries = []
    for item in (no_proxy or "").split(",") if isinstance(no_proxy, str) else []:
        item = item.strip().lower()
        item = item.split("://", 1)[-1].split("/", 1)[0]
        item = item.rsplit(":", 1)[0] if item.count(":") == 1 else item
        if item:
            entries.append(item)
    return Proxy(parts.scheme, parts.hostname, port or (443 if parts.scheme == "https" else 80), user or None,
                 secret or None, tuple(entries), source)


def load_proxy(core: dict, environ: Any) -> Optional[Proxy]:
    """Greengrass v1's own proxy block, coreThing.networkProxy, else HTTPS_PROXY and NO_PROXY."""
    block = core.get("networkProxy")
    if block is not None:
        if not isinstance(block, dict) or not isinstance(block.get("proxy"), dict):
            raise ConfigError("coreThing.networkProxy must hold a proxy object with a url")
        proxy = block["proxy"]
        return parse_proxy(proxy.get("url"), proxy.get("username"), proxy.get("password"),
                           block.get("noProxyAddresses"), "coreThing.networkProxy")
    url = environ.get("HTTPS_PROXY") or environ.get("https_proxy")
    if url:
        return parse_proxy(url, None, None, environ.get("NO_PROXY") or environ.get("no_proxy"), "HTTPS_PROXY")
    return None


class Config(collections.namedtuple("Config", [
        "root", "path", "thing_name", "thing_arn", "iot_host", "port", "keepalive", "ca_path", "cert_path",
        "key_path", "managed_respawn", "ota", "warnings", "unknown_keys", "proxy", "client_id"])):
    """config.json, checked: the paths and names (str), `port` and `keepalive` (int),
    `managed_respawn` (bool), `ota` (the otaAgent block with every default filled in), and what
    was odd about the file (`warnings`, `unknown_keys`: lists of str)."""

    __slots__ = ()


def default_root(executable: str) -> str:
    """<root> when the executable sits at <root>/ota/ota_agent/ggc-ota, else /greengrass."""
    path = os.path.abspath(executable)
    parts = path.split(os.sep)
    if len(parts) >= 4 and parts[-3:-1] == ["ota", "ota_agent"]:
        return os.sep.join(parts[:-3]) or os.sep
    return DEFAULT_ROOT


HOST_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252}[A-Za-z0-9])?|\[?[0-9A-Fa-f:.]{2,45}\]?")


def _file_uri(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{what} must be a file:// URI")
    if value.startswith("pkcs11:"):
        raise ConfigError(f"{what} is a PKCS#11 URI ({value.split(';')[0]}...): hardware security modules "
                          "are not supported by ggc-ota; use a file:// certificate and key")
    if not value.startswith("file://"):
        raise ConfigError(f"{what} must be a file:// URI, not {value!r}")
    return value[len("file://"):]


def _require(mapping: Any, key: str, where: str) -> Any:
    if not isinstance(mapping, dict) or key not in mapping:
        raise ConfigError(f"{where}.{key} is missing")
    return mapping[key]


def _load_ota_block(block: Any, root: str) -> Tuple[Dict[str, Any], List[str]]:
    if block is None:
        block = {}
    if not isinstance(block, dict):
        raise ConfigError("otaAgent must be an object")
    ota = {key: default for key, (_, default) in OTA_AGENT_KEYS.items()}
    ota["stateDir"] = os.path.join(root, "ota-state")
    if os.path.exists(OPENWRT_RELEASE):  # /var is RAM there, and logd keeps the log: no file by default
        ota["logFile"] = ""
    unknown = sorted(set(block) - set(OTA_AGENT_KEYS))
    for key, value in block.items():
        if key not in OTA_AGENT_KEYS:
            continue
        types = OTA_AGENT_KEYS[key][0]
        if value is not None and (not isinstance(value, types) or (isinstance(value, bool) and bool not in types)):
            raise ConfigError(f"otaAgent.{key} must be of type {'/'.join(t.__name__ for t in types)}")
        if isinstance(value, (int, float)) and value < 0:
            raise ConfigError(f"otaAgent.{key} must not be negative")
        if key == "keep" and not all(isinstance(k, str) and k and not os.path.isabs(k) and ".." not in k.split("/")
                                     for k in value):
            raise ConfigError("otaAgent.keep must list relative paths inside the root, such as ggc/var")
        ota[key] = value
    return ota, unknown


def describe_unknown_key(key: str) -> str:
    """`scriptTimout (did you mean scriptTimeout?)`, or the key alone when none is close."""
    import difflib
    close = difflib.get_close_matches(key, list(OTA_AGENT_KEYS), n=1, cutoff=0.6)
    return f"{key!r:.60} (did you mean {close[0]}?)" if close else f"{key!r:.60}"


def load_config(root: str, path: Optional[str] = None) -> Config:
    """Read and check config.json; every problem is a ConfigError that names the key."""
    root = os.path.abspath(root)
    path = path or os.path.join(root, "config", "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path} does not exist") from None
    except PermissionError:
        raise ConfigError(f"{path} is not readable") from None
    except (UnicodeDecodeError, ValueError) as err:
        raise ConfigError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path} must hold a JSON object")
    core = _require(doc, "coreThing", "config")
    warnings: List[str] = []
    arn = _require(core, "thingArn", "coreThing")
    match = THING_ARN.fullmatch(arn) if isinstance(arn, str) else None
    if not match:
        raise ConfigError(f"coreThing.thingArn {arn!r} is not a thing ARN")
    host = _require(core, "iotHost", "coreThing")
    if not isinstance(host, str) or not HOST_NAME.fullmatch(host):
        # it goes into a proxy's CONNECT request and the TLS handshake: no CR, LF, space or colon
        raise ConfigError(f"coreThing.iotHost {str(host)[:100]!r} must be a host name "
                          "(letters, digits, dots and hyphens) or an IP address")
    port = core.get("iotMqttPort", 8883)
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise ConfigError("coreThing.iotMqttPort must be a port number")
    keepalive = core.get("keepAlive", KEEPALIVE_DEFAULT)
    if not isinstance(keepalive, int) or isinstance(keepalive, bool):
        raise ConfigError("coreThing.keepAlive must be a whole number of seconds")
    if not KEEPALIVE_MIN <= keepalive <= KEEPALIVE_MAX:
        clamped = min(max(keepalive, KEEPALIVE_MIN), KEEPALIVE_MAX)
        warnings.append(f"coreThing.keepAlive {keepalive} is outside AWS IoT's {KEEPALIVE_MIN}..{KEEPALIVE_MAX} s; "
                        f"using {clamped}")
        keepalive = clamped
    crypto = doc.get("crypto")
    if crypto is not None:
        cert_principal = _require(_require(crypto, "principals", "crypto"), "IoTCertificate", "crypto.principals")
        ca = _file_uri(_require(crypto, "caPath", "crypto"), "crypto.caPath")
        cert = _file_uri(_require(cert_principal, "certificatePath", "crypto.principals.IoTCertificate"),
                         "crypto.principals.IoTCertificate.certificatePath")
        key = _file_uri(_require(cert_principal, "privateKeyPath", "crypto.principals.IoTCertificate"),
                        "crypto.principals.IoTCertificate.privateKeyPath")
    else:
        certs = os.path.join(root, "certs")
        names = {k: _require(core, k, "coreThing") for k in ("caPath", "certPath", "keyPath")}
        for k, v in names.items():
            if not isinstance(v, str) or not v:
                raise ConfigError(f"coreThing.{k} must be a file name")
        ca, cert, key = (os.path.join(certs, names[k]) for k in ("caPath", "certPath", "keyPath"))
    managed = doc.get("managedRespawn", False)
    if not isinstance(managed, bool):
        raise ConfigError("managedRespawn must be true or false")
    ota, unknown = _load_ota_block(doc.get("otaAgent"), root)
    if unknown:
        warnings.append("otaAgent has unknown keys (ignored): " + ", ".join(describe_unknown_key(k) for k in unknown))
    proxy = load_proxy(core, os.environ)
    if proxy is not None:  # an https proxy's certificate: the system's CAs, then the core's and extraCaPath
        proxy = proxy._replace(ca_files=tuple(p for p in (ca, ota.get("extraCaPath")) if p))
    client_id = ota["clientId"] or f"{match.group(1)}-ota"
    if not 1 <= len(client_id) <= 128 or CONTROL_CHARS.search(client_id):
        raise ConfigError("otaAgent.clientId must be 1 to 128 characters, without control characters")
    return Config(root=root, path=path, thing_name=match.group(1), thing_arn=arn, iot_host=host, port=port,
                  keepalive=keepalive, ca_path=ca, cert_path=cert, key_path=key, managed_respawn=managed,
                  ota=ota, warnings=warnings, unknown_keys=unknown, proxy=proxy, client_id=client_id)


# ============================================================================================
# logging: syslog, a size-rotated file (/var/log/greengrass/ota/ggc_ota.txt by default) and, in
# the foreground, stderr. The job document's updateAgentLogLevel (NONE, TRACE, DEBUG,
# VERBOSE, INFO, WARN, ERROR, FATAL) applies while that job runs. A filter redacts the query
# string of every URL, so a presigned URL's signature never reaches a log line.
# ============================================================================================

log = logging.getLogger("ggc-ota")
TRACE, VERBOSE = 5, 15
logging.addLevelName(TRACE, "TRACE")
logging.addLevelName(VERBOSE, "VERBOSE")
LOG_LEVELS = {"NONE": logging.CRITICAL + 10, "TRACE": TRACE, "DEBUG": logging.DEBUG, "VERBOSE": VERBOSE,
              "INFO": logging.INFO, "WARN": logging.WARNING, "ERROR": logging.ERROR, "FATAL": logging.CRITICAL}
DEFAULT_LOG_LEVEL = "INFO"
URL_QUERY = re.compile(r"(https?://[^\s?#\"']+)\?[^\s\"']*", re.IGNORECASE)
# A presigned URL's parameters, wherever they appear: http.client's errors carry the path and
# query without the scheme, so the URL pattern alone does not catch them.
AMZ_PARAMETER = re.compile(r"(X-Amz-[A-Za-z0-9-]+=)[^&\s\"'#]*", re.IGNORECASE)
LOG_CONTROL_CHAR = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")  # C0, DEL, C1, Unicode line breaks
MAX_LOG_RECORD = 4096  # characters of one log message; the rest is cut, with a note


def redact(text: str) -> str:
    return AMZ_PARAMETER.sub(r"\1<redacted>", URL_QUERY.sub(r"\1?<redacted>", text))


def one_log_line(text: str) -> str:
    """What a log record may say: redacted, control characters escaped (a newline from outside,
    in a job id or an archive member's name, cannot forge a line of its own), and bounded."""
    text = LOG_CONTROL_CHAR.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 256
                                else f"\\u{ord(m.group()):04x}", redact(text))
    if len(text) > MAX_LOG_RECORD:
        text = text[:MAX_LOG_RECORD] + f"... ({len(text) - MAX_LOG_RECORD} more characters)"
    return text


class RedactingFilter(logging.Filter):
    """Every record, its traceback included, goes through one_log_line: a traceback is appended
    to its message on the same line (its lines joined by " | "), so text from outside in an
    exception cannot forge a line, and a presigned URL in one is redacted."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.exc_info or record.exc_text:
            trace = record.exc_text or logging.Formatter().formatException(record.exc_info)  # type: ignore[arg-type]
            message += " | " + " | ".join(line.strip() for line in trace.splitlines() if line.strip())
            record.exc_info, record.exc_text = None, None
        clean = one_log_line(message)
        if clean != record.msg or record.args:
            record.msg, record.args = clean, None
        return True


def reopen_log_files() -> None:
    """SIGHUP (logrotate): the log file is opened again, under its name, at the next record."""
    for handler in log.handlers:
        if isinstance(handler, logging.FileHandler):
            with handler.lock:
                if handler.stream is not None:
                    handler.stream.close()
                    handler.stream = None  # reopened by FileHandler.emit
    log.info("log file reopened (SIGHUP)")


class UtcFormatter(logging.Formatter):
    """Times in UTC with their offset, as --status prints them: 2026-12-05T12:53:04.123+00:00."""

    def formatTime(self, record: logging.LogRecord, datefmt: Optional[str] = None) -> str:  # noqa: N802
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + \
            f".{int(record.msecs):03d}+00:00"


def setup_logging(log_file: Optional[str], level: str, to_stderr: bool, max_bytes: int = 5 * 1024 * 1024,
                  backups: int = 3, syslog_socket: Optional[str] = None) -> None:
    """The agent's log: the file (when set), syslog (when `syslog_socket` exists: /dev/log,
    which systemd's journal and OpenWrt's logd both read, with real priorities and no second
    timestamp), and stderr (`to_stderr`; left out when syslog has the lines and stderr is not a
    terminal: procd would file each line again, as daemon.err)."""
    log.handlers.clear()
    log.propagate = False
    fmt = UtcFormatter("%(asctime)s %(levelname)s [%(threadName)s] %(message)s")
    handlers: List[logging.Handler] = []
    if syslog_socket and os.path.exists(syslog_socket):
        syslog = Syslog(syslog_socket)
        syslog.setFormatter(logging.Formatter("%(message)s"))
        syslog.addFilter(RedactingFilter())
        log.addHandler(syslog)
        to_stderr = to_stderr and sys.stderr is not None and sys.stderr.isatty()
    if log_file:
        try:
            os.makedirs(os.path.dirname(log_file) or ".", exist_ok=True)
            handlers.append(RotatingFile(log_file, max_bytes, backups))
        except OSError as err:
            print(f"ggc-ota: cannot write the log file {log_file}: {err}; logging to stderr", file=sys.stderr)
            to_stderr = True
    if to_stderr:
        handlers.append(logging.StreamHandler(sys.stderr))
    for handler in handlers:
        handler.setFormatter(fmt)
        handler.addFilter(RedactingFilter())
        log.addHandler(handler)
    set_log_level(level)


class RotatingFile(logging.FileHandler):
    """The log file, renamed to .1, .2, ... when it would pass `max_bytes` (as the standard
    library's RotatingFileHandler, whose module costs an idle agent 0.6 MiB of imports)."""

    def __init__(self, path: str, max_bytes: int, backups: int) -> None:
        super().__init__(path, encoding="utf-8")
        self.max_bytes = max_bytes
        self.backups = backups

    def emit(self, record: logging.LogRecord) -> None:
        try:  # called with the handler's lock held
            if self.stream is not None and self.max_bytes > 0:
                if self.stream.tell() + len(self.format(record)) + 1 > self.max_bytes:
                    self._rotate()
        except Exception:  # as logging does: a log failure never stops the agent
            self.handleError(record)
            return
        super().emit(record)

    def _rotate(self) -> None:
        self.stream.close()
        self.stream = None  # reopened by FileHandler.emit
        for i in range(self.backups - 1, 0, -1):
            older = f"{self.baseFilename}.{i}"
            if os.path.exists(older):
                os.replace(older, f"{self.baseFilename}.{i + 1}")
        if self.backups > 0:
            os.replace(self.baseFilename, self.baseFilename + ".1")
        else:
            os.truncate(self.baseFilename, 0)


def set_log_level(level: str) -> None:
    log.setLevel(LOG_LEVELS.get(level.upper(), logging.INFO))


def set_job_log_level(job_level: str, base_level: str) -> None:
    """A job's updateAgentLogLevel may make the log more detailed while it runs, never quieter
    than the agent's own --log-level."""
    job, base = LOG_LEVELS.get(job_level.upper(), logging.INFO), LOG_LEVELS.get(base_level.upper(), logging.INFO)
    log.setLevel(min(job, base))


def log_event(message: str, *args: Any) -> None:
    """A job's life (its start, each phase, its result): logged at INFO whatever the level, so a
    device log always says what the agent did."""
    if log.handlers:
        log.handle(log.makeRecord(log.name, logging.INFO, "(event)", 0, message, args, None))


SYSLOG_FACILITY_DAEMON = 3
SYSLOG_SEVERITY = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))


class Syslog(logging.Handler):
    """Records to the local syslog socket as `<priority>ggc-ota[pid]: message` (RFC 3164 without
    the timestamp, which the daemon adds), in a few lines of socket code rather than
    logging.handlers (0.6 MiB of imports). Never blocks: a daemon that is away or behind loses
    the record, not the agent."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self.sock: Optional[socket.socket] = None

    def emit(self, record: logging.LogRecord) -> None:
        severity = next((sev for level, sev in SYSLOG_SEVERITY if record.levelno >= level), 7)
        data = f"<{SYSLOG_FACILITY_DAEMON * 8 + severity}>ggc-ota[{os.getpid()}]: {self.format(record)}"
        try:
            if self.sock is None:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self.sock.setblocking(False)  # a stuck journald or logd must never stop the agent
                self.sock.connect(self.path)
            self.sock.send(data.encode("utf-8", "replace")[:8192])
        except BlockingIOError:
            pass  # the daemon's queue is full: this record is lost, the agent goes on
        except OSError:
            self.close_socket()  # tried again with the next record (a restarted journald or logd)

    def close_socket(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def close(self) -> None:
        self.close_socket()
        super().close()


# ============================================================================================
# MQTT codec: the device's half of MQTT 3.1.1 (OASIS standard): what a client sends, and what it
# reads. Decoding validates everything the spec fixes (reserved flags, QoS, lengths, packet ids,
# return codes) and raises MqttProtocolError for anything else; a declared length above the cap
# is refused before any byte is buffered. (The broker's half is tests/cloud/mqtt_codec.py.)
# ============================================================================================

CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT = 8, 9, 10, 11, 12, 13, 14
PACKET_NAMES = {CONNECT: "CONNECT", CONNACK: "CONNACK", PUBLISH: "PUBLISH", PUBACK: "PUBACK",
                PUBREC: "PUBREC", PUBREL: "PUBREL", PUBCOMP: "PUBCOMP", SUBSCRIBE: "SUBSCRIBE",
                SUBACK: "SUBACK", UNSUBSCRIBE: "UNSUBSCRIBE", UNSUBACK: "UNSUBACK", PINGREQ: "PINGREQ",
                PINGRESP: "PINGRESP", DISCONNECT: "DISCONNECT"}
# Fixed-header flags that the spec requires for every type but PUBLISH.
REQUIRED_FLAGS = {CONNECT: 0, CONNACK: 0, PUBACK: 0, PUBREC: 0, PUBREL: 2, PUBCOMP: 0, SUBSCRIBE: 2,
                  SUBACK: 0, UNSUBSCRIBE: 2, UNSUBACK: 0, PINGREQ: 0, PINGRESP: 0, DISCONNECT: 0}
MAX_REMAINING_LENGTH = 268_435_455
DEFAULT_MAX_PACKET = 256 * 1024  # AWS IoT's payload limit is 128 KB; a topic and header fit beside it


class Packet(collections.namedtuple("Packet", [
        "type", "flags", "packet_id", "topic", "payload", "qos", "retain", "dup", "return_code",
        "session_present", "codes"],
        defaults=[0, 0, "", b"", 0, False, False, 0, False, ()])):
    """A decoded packet from the broker; only `type` is required. Fields not used by a type keep
    their defaults: numbers 0, `topic` "", `payload` b"", flags False. `codes` holds SUBACK's
    return codes."""

    __slots__ = ()

    @property
    def name(self) -> str:
        return PACKET_NAMES.get(self.type, str(self.type))


def encode_remaining_length(length: int) -> bytes:
    if not 0 <= length <= MAX_REMAINING_LENGTH:
        raise MqttProtocolError(f"remaining length {length} out of range")
    out = bytearray()
    while True:
        byte, length = length % 128, length // 128
        out.append(byte | (0x80 if length else 0))
        if not length:
            return bytes(out)


def decode_remaining_length(buf: bytes, offset: int = 1) -> Optional[Tuple[int, int]]:
    """(value, bytes used) of the length at buf[offset:], or None while incomplete."""
    value, multiplier = 0, 1
    for i in range(4):
        if offset + i >= len(buf):
            return None
        byte = buf[offset + i]
        value += (byte & 0x7F) * multiplier
        if not byte & 0x80:
            if i > 0 and byte == 0:
                raise MqttProtocolError("remaining length is not minimally encoded")
            return value, i + 1
        multiplier *= 128
    raise MqttProtocolError("remaining length longer than 4 bytes")


def encode_string(text: str) -> bytes:
    data = text.encode("utf-8")
    if len(data) > 65535:
        raise MqttProtocolError("string longer than 65535 bytes")
    if "\x00" in text:
        raise MqttProtocolError("string holds U+0000")
    return struct.pack("!H", len(data)) + data


def encode_packet(packet_type: int, flags: int, body: bytes) -> bytes:
    return bytes([(packet_type << 4) | flags]) + encode_remaining_length(len(body)) + body


def check_packet_id(packet_id: int) -> None:
    if not 1 <= packet_id <= 65535:
        raise MqttProtocolError(f"packet id {packet_id} outside 1..65535")


def encode_connect(client_id: str, keepalive: int, clean_session: bool = True) -> bytes:
    if not 0 <= keepalive <= 65535:
        raise MqttProtocolError("keepalive outside 0..65535")
    flags = 0x02 if clean_session else 0x00
    body = encode_string("MQTT") + bytes([4, flags]) + struct.pack("!H", keepalive) + encode_string(client_id)
    return encode_packet(CONNECT, 0, body)


def encode_publish(topic: str, payload: bytes, qos: int = 0, packet_id: int = 0,
                   retain: bool = False, dup: bool = False) -> bytes:
    if qos not in (0, 1, 2):
        raise MqttProtocolError(f"QoS {qos} does not exist")
    if not topic or "+" in topic or "#" in topic:
        raise MqttProtocolError(f"invalid topic name {topic!r}")
    flags = (0x08 if dup else 0) | (qos << 1) | (0x01 if retain else 0)
    body = encode_string(topic)
    if qos:
        check_packet_id(packet_id)
        body += struct.pack("!H", packet_id)
    return encode_packet(PUBLISH, flags, body + bytes(payload))


def _encode_id_only(packet_type: int, packet_id: int) -> bytes:
    check_packet_id(packet_id)
    return encode_packet(packet_type, REQUIRED_FLAGS[packet_type], struct.pack("!H", packet_id))


def encode_puback(packet_id: int) -> bytes:
    return _encode_id_only(PUBACK, packet_id)


def encode_subscribe(packet_id: int, topics: List[Tuple[str, int]]) -> bytes:
    check_packet_id(packet_id)
    if not topics:
        raise MqttProtocolError("SUBSCRIBE needs at least one topic filter")
    body = struct.pack("!H", packet_id)
    for topic, qos in topics:
        if qos not in (0, 1, 2):
            raise MqttProtocolError(f"QoS {qos} does not exist")
        body += encode_string(topic) + bytes([qos])
    return encode_packet(SUBSCRIBE, 2, body)


def encode_pingreq() -> bytes:
    return bytes([PINGREQ << 4, 0])


def encode_disconnect() -> bytes:
    return bytes([DISCONNECT << 4, 0])


class PacketBody:
    """A cursor over a packet body that refuses to read past its end."""

    def __init__(self, data: bytes, name: str) -> None:
        self.data, self.pos, self.name = data, 0, name

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise MqttProtocolError(f"{self.name} is truncated")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return struct.unpack("!H", self.take(2))[0]

    def string(self) -> str:
        raw = self.take(self.u16())
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise MqttProtocolError(f"{self.name} holds a string that is not UTF-8") from None
        if "\x00" in text:
            raise MqttProtocolError(f"{self.name} holds a string with U+0000")
        return text

    def rest(self) -> bytes:
        out = self.data[self.pos:]
        self.pos = len(self.data)
        return out

    def done(self) -> bool:
        return self.pos >= len(self.data)

    def finish(self) -> None:
        if not self.done():
            raise MqttProtocolError(f"{self.name} has {len(self.data) - self.pos} unexpected trailing bytes")


def decode_packet(packet_type: int, flags: int, body: bytes) -> Packet:
    """Decode and validate one whole packet (fixed header already split off)."""
    name = PACKET_NAMES.get(packet_type)
    if name is None:
        raise MqttProtocolError(f"reserved packet type {packet_type}")
    if packet_type != PUBLISH and flags != REQUIRED_FLAGS[packet_type]:
        raise MqttProtocolError(f"{name} with reserved flags {flags:#x}")
    b = PacketBody(body, name)
    if packet_type == PUBLISH:
        qos = (flags >> 1) & 0x03
        if qos == 3:
            raise MqttProtocolError("PUBLISH with QoS 3")
        dup = bool(flags & 0x08)
        if qos == 0 and dup:
            raise MqttProtocolError("PUBLISH with QoS 0 and DUP set")
        topic = b.string()
        if not topic or "+" in topic or "#" in topic:
            raise MqttProtocolError(f"PUBLISH to an invalid topic name {topic!r}")
        packet_id = 0
        if qos:
            packet_id = b.u16()
            check_packet_id(packet_id)
        return Packet(PUBLISH, flags, packet_id, topic, b.rest(), qos, bool(flags & 1), dup)
    if packet_type == CONNACK:
        if len(body) != 2:
            raise MqttProtocolError(f"CONNACK of length {len(body)}, not 2")
        ack_flags, code = body[0], body[1]
        if ack_flags & 0xFE:
            raise MqttProtocolError("CONNACK with reserved acknowledge flags")
        if code > 5:
            raise MqttProtocolError(f"CONNACK with unknown return code {code}")
        return Packet(CONNACK, flags, return_code=code, session_present=bool(ack_flags & 1))
    if packet_type in (PUBACK, PUBREC, PUBREL, PUBCOMP, UNSUBACK):
        if len(body) != 2:
            raise MqttProtocolError(f"{name} of length {len(body)}, not 2")
        packet_id = b.u16()
        check_packet_id(packet_id)
        return Packet(packet_type, flags, packet_id)
    if packet_type == SUBACK:
        packet_id = b.u16()
        check_packet_id(packet_id)
        codes = tuple(b.rest())
        if not codes:
            raise MqttProtocolError("SUBACK without return codes")
        if any(c not in (0, 1, 2, 0x80) for c in codes):
            raise MqttProtocolError(f"SUBACK with invalid return codes {codes}")
        return Packet(SUBACK, flags, packet_id, codes=codes)
    if packet_type == PINGRESP:
        b.finish()
        return Packet(packet_type, flags)
    # CONNECT, SUBSCRIBE, UNSUBSCRIBE, PINGREQ, DISCONNECT: only a client sends them (the broker's
    # half of the codec lives with the tests' brokers, in tests/cloud/mqtt_codec.py)
    raise MqttProtocolError(f"{name} from the broker: only a client sends it")


class PacketReader:
    """Splits a byte stream into packets. Memory is bounded by `max_packet`: a larger declared
    length is refused as soon as its length bytes arrive."""

    def __init__(self, max_packet: int = DEFAULT_MAX_PACKET,
                 decode: Callable[[int, int, bytes], Packet] = decode_packet) -> None:
        self.max_packet = max_packet
        self.decode = decode
        self._buf = bytearray()

    def feed(self, data: bytes) -> List[Packet]:
        self._buf += data
        packets = []
        while True:
            packet = self._next()
            if packet is None:
                return packets
            packets.append(packet)

    def _next(self) -> Optional[Packet]:
        if len(self._buf) < 2:
            return None
        length = decode_remaining_length(self._buf, 1)
        if length is None:
            return None
        remaining, used = length
        if remaining + 1 + used > self.max_packet:
            raise MqttProtocolError(f"packet of {remaining} bytes exceeds the {self.max_packet}-byte cap")
        end = 1 + used + remaining
        if len(self._buf) < end:
            return None
        header = self._buf[0]
        body = bytes(self._buf[1 + used:end])
        del self._buf[:end]
        return self.decode(header >> 4, header & 0x0F, body)

    @property
    def buffered(self) -> int:
        return len(self._buf)


# ============================================================================================
# MQTT client: TCP + TLS 1.2+ (mutual authentication, SNI, ALPN x-amzn-mqtt-ca on port 443)
# and one network thread that owns the socket. Other threads queue work for it and wait on
# events, so a long download never starves the keepalive, and no lock is held while a caller's
# callback runs. QoS 1 publishes that are unacknowledged at a disconnect are sent again after
# the reconnect with DUP set, until the caller's timeout expires; then they are dropped and the
# caller gets MqttTimeout. QoS 0 publishes made while disconnected are dropped.
# ============================================================================================

ALPN_AWS_IOT = "x-amzn-mqtt-ca"
STOP_GRACE_SECONDS = 1.0  # a stop waits this long for the network thread before it shuts its socket


class MqttSettings(collections.namedtuple("MqttSettings", [
        "host", "port", "client_id", "ca_path", "cert_path", "key_path",
        "keepalive", "connect_timeout", "connack_timeout", "ping_timeout", "io_timeout", "backoff_base",
        "backoff_cap", "not_authorized_backoff", "stable_after", "max_packet", "server_hostname", "alpn",
        "proxy"],
        defaults=[60, 10.0, 10.0, None, 30.0, 1.0, 120.0, 300.0, 60.0, DEFAULT_MAX_PACKET, None, None, None])):
    """Where and how to connect. Seconds unless said: `keepalive` (60); `connect_timeout` (10)
    for the TCP connect and the TLS handshake, each; `connack_timeout` (10); `ping_timeout`
    (None: half the keepalive, at most 30); `io_timeout` (30) for one blocking read or write of
    an open connection; `backoff_base` (1) and `backoff_cap` (120) of the reconnect backoff;
    `not_authorized_backoff` (300) after CONNACK 5, a policy problem not worth hammering;
    `stable_after` (60): a connection this old resets the backoff; `max_packet` in bytes;
    `server_hostname` (None: `host`) for SNI and the certificate name; `alpn` (None: only on
    port 443) offers x-amzn-mqtt-ca; `proxy` (None) an HTTP proxy to tunnel through."""

    __slots__ = ()

    def wants_alpn(self) -> bool:
        return self.port == 443 if self.alpn is None else self.alpn

    def ping_deadline(self) -> float:
        return self.ping_timeout if self.ping_timeout is not None else min(30.0, max(1.0, self.keepalive / 2))


def mqtt_settings(cfg: Config) -> MqttSettings:
    """The MQTT settings of a core's config.json."""
    proxy = cfg.proxy if cfg.proxy is not None and cfg.proxy.used_for(cfg.iot_host) else None
    return MqttSettings(host=cfg.iot_host, port=cfg.port, client_id=cfg.client_id, ca_path=cfg.ca_path,
                        cert_path=cfg.cert_path, key_path=cfg.key_path, keepalive=cfg.keepalive,
                        backoff_base=float(cfg.ota["reconnectBaseSeconds"]),
                        backoff_cap=float(cfg.ota["reconnectMaxSeconds"]), proxy=proxy)


def open_tunnel(proxy: Proxy, host: str, port: int, timeout: float,
                on_socket: Optional[Callable[[socket.socket], None]] = None) -> socket.socket:
    """A TCP connection to host:port through the proxy's HTTP CONNECT (with TLS to the proxy for
    an https proxy, and Basic authentication when it has a user). The caller's TLS runs inside,
    end to end (wrap_tls). ProxyFailed with the proxy's status line when it refuses."""
    import base64
    try:
        sock = socket.create_connection((proxy.host, proxy.port), timeout=timeout)
    except OSError as err:
        raise ProxyFailed(f"cannot reach the proxy {proxy.shown()}: {err.strerror or err}") from None
    if on_socket is not None:
        on_socket(sock)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if proxy.scheme == "https":
            sock = tls_to_proxy(proxy, sock)
        request = f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        if proxy.username:
            token = base64.b64encode(f"{proxy.username}:{proxy.password or ''}".encode()).decode()
            request += f"Proxy-Authorization: Basic {token}\r\n"
        sock.sendall((request + "\r\n").encode())
        reply = b""
        deadline = time.monotonic() + timeout  # for the whole reply: a proxy may drip it
        while b"\r\n\r\n" not in reply:
            left = deadline - time.monotonic()
            try:
                if left <= 0:
                    raise socket.timeout("timed out")
                sock.settimeout(left)
                data = sock.recv(1)  # byte by byte: nothing of the tunnel's own bytes may be consumed
            except socket.timeout:
                raise ProxyFailed(f"the proxy {proxy.shown()} did not answer CONNECT {host}:{port} within "
                                  f"{timeout:.0f} s") from None
            if not data:
                raise ProxyFailed(f"the proxy {proxy.shown()} closed the connection after CONNECT {host}:{port}")
            reply += data
            if len(reply) > 16384:
                raise ProxyFailed(f"the proxy {proxy.shown()} sent an endless reply to CONNECT")
        status = reply.split(b"\r\n", 1)[0].decode("latin-1")
        fields = status.split()
        if len(fields) < 2 or not fields[0].startswith("HTTP/") or not fields[1].startswith("2"):
            raise ProxyFailed(f"the proxy {proxy.shown()} refused CONNECT {host}:{port}: {one_log_line(status[:200])}")
        sock.settimeout(timeout)
        return sock
    except (ProxyFailed, OSError) as err:
        sock.close()
        if isinstance(err, ProxyFailed):
            raise
        raise ProxyFailed(f"the proxy {proxy.shown()} failed: {err}") from None


def system_and_given_cas(ca_files: Any) -> ssl.SSLContext:
    """A client context, TLS 1.2+, trusting the system's CA bundle where the device has one plus
    the given CA files (the bundled OpenSSL of a frozen binary looks for the build machine's
    paths, so the agent always names its CA files explicitly). For the download host and an
    https proxy; ssl.SSLError naming the file that does not load."""
    ctx = ssl.create_default_context()
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    for path in ca_files:
        if path and os.path.isfile(path):
            try:
                ctx.load_verify_locations(cafile=path)
            except ssl.SSLError as err:
                raise ssl.SSLError(f"cannot load CA file {path}: {err}") from None
    return ctx


def tls_to_proxy(proxy: Proxy, sock: socket.socket) -> ssl.SSLSocket:
    """TLS to an https proxy itself, its certificate checked against the system's CAs and the
    proxy's CA files. ProxyFailed when it does not verify."""
    try:
        ctx = system_and_given_cas(proxy.ca_files)
    except ssl.SSLError as err:
        raise ProxyFailed(f"{err.args[0]} (for the proxy)") from None
    try:
        return ctx.wrap_socket(sock, server_hostname=proxy.host)
    except ssl.SSLCertVerificationError as err:
        raise ProxyFailed(f"the proxy {proxy.shown()} failed TLS verification: {err.verify_message or err} "
                          "(its CA goes in otaAgent.extraCaPath)") from None
    except (ssl.SSLError, OSError) as err:
        raise ProxyFailed(f"TLS to the proxy {proxy.shown()} failed: {err}") from None


class TlsInTls:
    """TLS to a host inside the TLS to an https proxy. Python's ssl cannot wrap one SSLSocket in
    another, so the inner session runs on memory buffers over the outer socket. It offers what
    the MQTT client and http.client use of a socket: recv, recv_into, send, sendall, pending,
    fileno (for select), timeouts, makefile, shutdown and close."""

    def __init__(self, outer: ssl.SSLSocket, ctx: ssl.SSLContext, server_hostname: str) -> None:
        self.outer = outer
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._tls = ctx.wrap_bio(self._in, self._out, server_hostname=server_hostname)
        self._plain = bytearray()
        self._eof = False
        self._run(self._tls.do_handshake)

    def _flush(self) -> None:
        data = self._out.read()
        if data:
            self.outer.sendall(data)

    def _feed(self, blocking: bool, deadline: Optional[float] = None) -> bool:
        """Move the outer socket's bytes into the inner session: what the outer one has already
        decrypted, else (blocking) one recv, waiting no later than `deadline` (socket.timeout
        then). False: nothing came."""
        if self.outer.pending():
            self._in.write(self.outer.recv(self.outer.pending()))
            return True
        if not blocking:
            return False
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout("timed out")
            self.outer.settimeout(left)
        data = self.outer.recv(65536)
        if data:
            self._in.write(data)
        else:
            self._in.write_eof()
        return True

    def _deadline(self) -> Optional[float]:
        """One blocking call (a handshake, a recv, a send) ends within the socket's timeout as a
        whole, as a plain SSLSocket's does, however the bytes trickle in: a proxy that drips a
        TLS record one byte at a time would otherwise hold it for ever."""
        timeout = self.outer.gettimeout()
        return None if timeout is None else time.monotonic() + timeout

    def _run(self, step: Any, *args: Any) -> Any:
        """One inner-TLS step (handshake, write), feeding it the outer socket's bytes as it asks."""
        timeout, deadline = self.outer.gettimeout(), self._deadline()
        try:
            while True:
                try:
                    result = step(*args)
                    self._flush()
                    return result
                except ssl.SSLWantReadError:
                    self._flush()
                    self._feed(blocking=True, deadline=deadline)
        finally:
            self.outer.settimeout(timeout)

    def _fill(self, blocking: bool) -> None:
        timeout, deadline = self.outer.gettimeout(), self._deadline()
        try:
            while not self._plain and not self._eof:
                try:
                    data = self._tls.read(65536)
                except ssl.SSLWantReadError:
                    self._flush()
                    if not self._feed(blocking, deadline):
                        return
                    continue
                except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                    data = b""
                self._flush()
                if data:
                    self._plain += data
                else:
                    self._eof = True
        finally:
            self.outer.settimeout(timeout)

    def pending(self) -> int:
        """Bytes that a recv returns without waiting (what select on the fd cannot see)."""
        self._fill(blocking=False)
        return len(self._plain)

    def recv(self, size: int) -> bytes:
        self._fill(blocking=True)
        data = bytes(self._plain[:size])
        del self._plain[:size]
        return data

    def recv_into(self, buffer: Any, size: int = 0) -> int:
        data = self.recv(size or len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def sendall(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            sent = self._run(self._tls.write, view)
            view = view[sent:]

    def send(self, data: bytes) -> int:
        self.sendall(data)
        return len(data)

    def makefile(self, mode: str = "rb", buffering: Optional[int] = None, **_: Any) -> Any:
        import io
        return io.BufferedReader(socket.SocketIO(self, "rb"))  # type: ignore[arg-type]

    def _decref_socketios(self) -> None:
        """What a SocketIO calls on close (socket.socket keeps a count; nothing to do here)."""

    def fileno(self) -> int:
        return self.outer.fileno()

    def settimeout(self, timeout: Optional[float]) -> None:
        self.outer.settimeout(timeout)

    def gettimeout(self) -> Optional[float]:
        return self.outer.gettimeout()

    def setsockopt(self, *args: Any) -> None:
        self.outer.setsockopt(*args)

    def getpeercert(self, binary_form: bool = False) -> Any:
        return self._tls.getpeercert(binary_form)

    def selected_alpn_protocol(self) -> Optional[str]:
        return self._tls.selected_alpn_protocol()

    def shutdown(self, how: int) -> None:
        self.outer.shutdown(how)

    def close(self) -> None:
        self.outer.close()


def wrap_tls(ctx: ssl.SSLContext, sock: socket.socket, hostname: str) -> Any:
    """The caller's TLS over a TCP connection, or inside the TLS of an https proxy's tunnel."""
    if isinstance(sock, ssl.SSLSocket):
        return TlsInTls(sock, ctx, hostname)
    return ctx.wrap_socket(sock, server_hostname=hostname)


def tls_context(settings: MqttSettings) -> ssl.SSLContext:
    """Client context: TLS 1.2 or newer, server verified against the configured CA only (never
    the build machine's paths), hostname checked, our certificate and key loaded."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    check_credential_files(settings)
    try:
        ctx.load_verify_locations(cafile=settings.ca_path)
    except (OSError, ssl.SSLError) as err:
        raise CredentialsInvalid(f"cannot load the root CA {settings.ca_path}: {err}") from None
    try:
        ctx.load_cert_chain(settings.cert_path, settings.key_path)
    except ssl.SSLError as err:
        if "MISMATCH" in str(err).upper() or "NO_CERTIFICATE_ASSIGNED" in str(err).upper():
            raise CredentialsInvalid(f"the private key {settings.key_path} does not belong to the certificate "
                                     f"{settings.cert_path}: config.json must name the core's own pair") from None
        raise CredentialsInvalid(f"cannot load the certificate {settings.cert_path} with the key "
                                 f"{settings.key_path} ({err})") from None
    except OSError as err:
        raise CredentialsInvalid(f"cannot load the certificate {settings.cert_path} with the key "
                                 f"{settings.key_path}: {err.strerror or err}") from None
    if settings.wants_alpn():
        ctx.set_alpn_protocols([ALPN_AWS_IOT])
    return ctx


CREDENTIALS = (("ca_path", "root CA", b"-----BEGIN CERTIFICATE-----"),
               ("cert_path", "certificate", b"-----BEGIN CERTIFICATE-----"),
               ("key_path", "private key", b"PRIVATE KEY-----"))


def check_credential_files(settings: MqttSettings) -> None:
    """Each file config.json names for TLS exists, can be read, and holds what it should (a PEM
    certificate, a PEM private key): CredentialsInvalid naming the file and what is wrong,
    where the TLS library would only say "PEM lib"."""
    for field, what, marker in CREDENTIALS:
        path = getattr(settings, field)
        try:
            with open(path, "rb") as f:
                head = f.read(64 * 1024)
        except FileNotFoundError:
            raise CredentialsInvalid(f"the {what} file {path} does not exist (config.json names it)") from None
        except OSError as err:
            hint = " (run as root)" if isinstance(err, PermissionError) and os.geteuid() != 0 else ""
            raise CredentialsInvalid(f"the {what} file {path} cannot be read: {err.strerror}{hint}") from None
        if marker not in head:
            raise CredentialsInvalid(f"the {what} file {path} holds no PEM {what} "
                                     f"({marker.decode().strip('-')} not found)")


def open_tls(settings: MqttSettings, ctx: ssl.SSLContext,
             on_socket: Optional[Callable[[socket.socket], None]] = None) -> ssl.SSLSocket:
    """TCP (through the proxy's tunnel, if any), then TLS; each step under connect_timeout.
    `on_socket` is given the TCP socket as soon as it exists, so that a stop can shut it."""
    hostname = settings.server_hostname or settings.host
    try:
        if settings.proxy is not None:
            raw = open_tunnel(settings.proxy, settings.host, settings.port, settings.connect_timeout, on_socket)
        else:
            raw = socket.create_connection((settings.host, settings.port), timeout=settings.connect_timeout)
            if on_socket is not None:
                on_socket(raw)
    except socket.timeout:
        raise MqttTimeout(f"TCP connect to {settings.host}:{settings.port} timed out") from None
    except OSError as err:
        raise MqttError(f"cannot connect to {settings.host}:{settings.port}: {err.strerror or err}") from None
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        tls = wrap_tls(ctx, raw, hostname)  # handshake under connect_timeout
    except ssl.SSLCertVerificationError as err:
        raw.close()
        raise MqttAuthError(f"the server at {settings.host}:{settings.port} failed verification: "
                            f"{err.verify_message or err}") from None
    except socket.timeout:
        raw.close()
        raise MqttTimeout(f"TLS handshake with {settings.host}:{settings.port} timed out") from None
    except (ssl.SSLError, OSError) as err:
        raw.close()
        raise MqttAuthError(f"TLS handshake with {settings.host}:{settings.port} failed: {describe_tls_error(err)}") \
            from None
    tls.settimeout(settings.io_timeout)
    return tls


def shut_socket(fd: int, inode: int) -> None:
    """Shut the socket behind descriptor `fd` (both ways): every blocking call on it returns at
    once. Through a duplicate of the descriptor, checked to be that socket (`inode`): a
    descriptor closed meanwhile may already name another file."""
    try:
        dup_fd = os.dup(fd)
    except OSError:
        return
    try:
        st = os.fstat(dup_fd)
        if stat.S_ISSOCK(st.st_mode) and st.st_ino == inode:
            dup, dup_fd = socket.socket(fileno=dup_fd), -1
            with dup:
                dup.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        if dup_fd >= 0:
            os.close(dup_fd)


def link_error(connected: bool, err: OSError, doing: str) -> MqttError:
    """The MqttError for a link that failed while `doing`. Before CONNACK (not `connected`), a
    TLS error or a closed link most likely means the broker refused our certificate: under TLS
    1.3 the handshake completes first and the refusal shows only now."""
    if not connected:
        return MqttAuthError(f"the broker closed the TLS connection before CONNACK while {doing}: it may "
                             f"have refused the client certificate ({describe_tls_error(err)})")
    if isinstance(err, ssl.SSLError):
        return MqttError(f"TLS error while {doing}: {describe_tls_error(err)}")
    return MqttError(f"connection lost while {doing}: {err.strerror or err}")


def describe_tls_error(err: BaseException) -> str:
    text = str(err)
    if "CERTIFICATE_REQUIRED" in text.upper() or "UNKNOWN_CA" in text.upper() or "BAD_CERTIFICATE" in text.upper():
        return f"the broker refused our client certificate ({text})"
    if "VERSION" in text.upper():
        return f"no common TLS version (1.2 or newer required) ({text})"
    return text


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(cap, base * 2**attempt)]. For
    reconnects: a fleet that lost its broker at one instant comes back spread over the window."""
    return rng.uniform(0, min(cap, base * (2 ** min(attempt, 30))))


def retry_delay(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Exponential backoff with equal jitter: half of min(cap, base * 2**attempt) always, the
    other half at random. For a request the cloud throttled: never sooner than base / 2."""
    window = min(cap, base * (2 ** min(attempt, 30)))
    return window / 2 + rng.uniform(0, window / 2)


class Inflight:
    """A QoS 1 publish waiting for its PUBACK."""

    def __init__(self, packet_id: int, topic: str, payload: bytes) -> None:
        self.packet_id = packet_id
        self.topic = topic
        self.payload = payload
        self.done = threading.Event()
        self.sent_generation = -1  # the connection it was last sent on
        self.ever_sent = False
        self.error: Optional[BaseException] = None


class Subscription:
    """A subscription, re-sent on every new connection."""

    def __init__(self, topic: str, qos: int) -> None:
        self.topic = topic
        self.qos = qos
        self.granted = 0
        self.acked_generation = -1
        self.sent_generation = -1
        self.error: Optional[BaseException] = None
        self.refusals = 0            # SUBACK 0x80 in a row, after the first subscribe() succeeded
        self.retry_at: Optional[float] = None


class MqttClient:
    """A small, correct MQTT 3.1.1 client for one device identity.

    `on_message(topic, payload)` and `on_connect()` run in the network thread: they must not
    block (hand the work to another thread). `publish` with QoS 1 blocks until PUBACK or its
    timeout; `subscribe` until SUBACK; both work across reconnects.
    """

    def __init__(self, settings: MqttSettings, on_message: Callable[[str, bytes], None],
                 on_connect: Optional[Callable[[], None]] = None, rng: Optional[random.Random] = None) -> None:
        self.settings = settings
        self.on_message = on_message
        self.on_connect = on_connect
        self._rng = rng or random.Random()
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # a SUBACK arrived, or the connection changed
        self.inflight: Dict[int, Inflight] = {}
        self.subscriptions: Dict[str, Subscription] = {}
        self._sub_pending: Dict[int, List[str]] = {}
        self._outbox: List[bytes] = []
        self.next_id = 0
        self.generation = 0
        self._connected = threading.Event()
        self._stopping = threading.Event()
        self._retry = threading.Event()  # cuts a reconnect's backoff short (a stop, retry_now)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self.thread: Optional[threading.Thread] = None
        self._sock: Optional[ssl.SSLSocket] = None
        self._raw: Optional[Tuple[int, int]] = None  # the TCP socket under _sock, from its first moment
        self.last_error: Optional[BaseException] = None
        self.connect_count = 0
        self._ctx: Optional[ssl.SSLContext] = None

    # ---- public API --------------------------------------------------------------------------
    def start(self) -> None:
        self._ctx = tls_context(self.settings)
        self.thread = threading.Thread(target=self._run, name="mqtt", daemon=True)
        self.thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Send DISCONNECT if connected, end the network thread, fail every waiting caller. A
        thread held in a connect, a handshake or a read (a proxy that drips) has its socket shut
        under it."""
        self._stopping.set()
        self._retry.set()
        self._wake()
        if self.thread is not None:
            self.thread.join(min(timeout, STOP_GRACE_SECONDS))
            if self.thread.is_alive():
                self._shut_link()
                self.thread.join(timeout)
        with self._lock:
            for item in self.inflight.values():
                item.error = MqttNotConnected("client stopped")
                item.done.set()
            self.inflight.clear()
            for sub in self.subscriptions.values():  # a subscribe() waiting for its SUBACK fails at once
                if sub.acked_generation != self.generation or not self._connected.is_set():
                    sub.error = MqttNotConnected("client stopped")
            self._changed.notify_all()
        fds, self._wake_r, self._wake_w = (self._wake_r, self._wake_w), -1, -1
        for fd in fds:  # a late _wake() must not write into a descriptor reused by someone else
            if fd >= 0:
                os.close(fd)

    def retry_now(self) -> None:
        """Between two connection attempts: make the next one now (an operator fixed the policy)."""
        self._retry.set()

    def interrupt(self) -> None:
        """Fail every caller waiting for a PUBACK (the agent is stopping); the link stays up."""
        with self._lock:
            for item in self.inflight.values():
                item.error = MqttNotConnected("interrupted: the agent is stopping")
                item.done.set()
            self.inflight.clear()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def stopped(self) -> bool:
        return self._stopping.is_set()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def subscribe(self, topic: str, qos: int = 1, timeout: float = 30.0) -> int:
        """Subscribe (and stay subscribed across reconnects); returns the granted QoS."""
        if qos not in (0, 1):
            raise MqttError("AWS IoT supports QoS 0 and 1 only")
        deadline = time.monotonic() + timeout
        with self._lock:
            sub = self.subscriptions.get(topic)
            if sub is None or sub.qos != qos or sub.error is not None:
                sub = self.subscriptions[topic] = Subscription(topic, qos)
        self._wake()
        with self._changed:
            while True:
                if sub.error is not None:
                    self.subscriptions.pop(topic, None)
                    raise sub.error
                if sub.acked_generation == self.generation and self._connected.is_set():
                    return sub.granted
                left = deadline - time.monotonic()
                if left <= 0:
                    raise MqttTimeout(f"no SUBACK for {topic} within {timeout} s")
                self._changed.wait(left)

    def publish(self, topic: str, payload: bytes, qos: int = 1, timeout: float = 30.0) -> None:
        """QoS 0: queue and return (dropped if disconnected). QoS 1: wait for the PUBACK."""
        if isinstance(payload, str):
            payload = payload.encode("utf-8")
        if qos == 0:
            if self._connected.is_set():
                self._queue(encode_publish(topic, payload, 0))
            return
        if qos != 1:
            raise MqttError("AWS IoT supports QoS 0 and 1 only")
        with self._lock:
            item = Inflight(self.allocate_id(), topic, bytes(payload))
            self.inflight[item.packet_id] = item
        self._wake()
        if not item.done.wait(timeout):
            with self._lock:
                self.inflight.pop(item.packet_id, None)
                acked = item.done.is_set()  # the PUBACK came after the wait, before the lock
            if not acked:
                raise MqttTimeout(f"no PUBACK for a message to {topic} within {timeout} s")
        if item.error is not None:
            raise item.error

    def check_connection(self) -> None:
        """One TLS handshake and CONNECT/CONNACK, then DISCONNECT: raises what a session would.
        For a client that is not started (the dry-run's check)."""
        if self.thread is not None:
            raise MqttError("check_connection is for a client that is not started")
        self._ctx = self._ctx or tls_context(self.settings)
        self._sock = open_tls(self.settings, self._ctx)
        try:
            self._send(encode_connect(self.settings.client_id, self.settings.keepalive, clean_session=True))
            connack, _ = self._read_until_connack(PacketReader(self.settings.max_packet),
                                                  self.settings.connack_timeout)
            if connack.return_code != 0:
                raise MqttConnectRefused(connack.return_code)
            self._send(encode_disconnect())
        finally:
            sock, self._sock = self._sock, None
            sock.close()

    # ---- packet ids: 1..65535, wrapping, never one that is still in use ------------------------
    def allocate_id(self) -> int:
        in_use = set(self.inflight) | set(self._sub_pending)
        if len(in_use) >= 65535:
            raise MqttError("all 65535 packet ids are in use")
        while True:
            self.next_id = self.next_id % 65535 + 1
            if self.next_id not in in_use:
                return self.next_id

    # ---- the network thread --------------------------------------------------------------------
    def _wake(self) -> None:
        if self._wake_w < 0:
            return
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass

    def _queue(self, data: bytes) -> None:
        with self._lock:
            self._outbox.append(data)
        self._wake()

    def _run(self) -> None:
        attempt = 0
        while not self._stopping.is_set():
            started = time.monotonic()
            delay_floor = 0.0
            try:
                self._session()
            except MqttConnectRefused as err:
                self.last_error = err
                log.error("MQTT: %s", err)
                if err.code == 5:
                    log.error("MQTT: the IoT policy must allow iot:Connect for the client id %s "
                              "(otaAgent.clientId; default <thing name>-ota)", self.settings.client_id)
                    delay_floor = self.settings.not_authorized_backoff
            except MqttError as err:
                self.last_error = err
                if not self._stopping.is_set():
                    log.warning("MQTT: %s", err)
            except Exception as err:  # never let the network thread die
                self.last_error = err
                log.exception("MQTT: unexpected error in the network thread")
            finally:
                self._close_socket()
            if self._stopping.is_set():
                break
            if time.monotonic() - started >= self.settings.stable_after:
                attempt = 0
            delay = max(delay_floor, backoff_delay(attempt, self.settings.backoff_base,
                                                   self.settings.backoff_cap, self._rng))
            attempt += 1
            log.info("MQTT: reconnecting in %.1f s (attempt %d)", delay, attempt)
            self._retry.wait(delay)
            self._retry.clear()

    def _opening(self, raw: socket.socket) -> None:
        """The TCP socket of the connection being opened (open_tls's on_socket), kept as its
        descriptor and its inode: the TLS layers wrapped over it take the descriptor over."""
        self._raw = (raw.fileno(), os.fstat(raw.fileno()).st_ino)
        if self._stopping.is_set():
            self._shut_link()

    def _shut_link(self) -> None:
        """Shut the connection's TCP socket under whatever waits on it."""
        if self._raw is not None:
            shut_socket(*self._raw)

    def _close_socket(self) -> None:
        self._raw = None
        was_connected = self._connected.is_set()
        self._connected.clear()
        sock, self._sock = self._sock, None
        with self._lock:
            self._outbox.clear()
            self._sub_pending.clear()
            self._changed.notify_all()
        if sock is not None:
            try:
                if self._stopping.is_set() and was_connected:
                    sock.settimeout(1.0)
                    sock.sendall(encode_disconnect())
            except OSError:
                pass
            try:
                sock.close()
            except OSError:
                pass

    def _session(self) -> None:
        s = self.settings
        sock = open_tls(s, self._ctx or tls_context(s), self._opening)
        self._sock = sock
        reader = PacketReader(s.max_packet)
        self._send(encode_connect(s.client_id, s.keepalive, clean_session=True))
        connack, early = self._read_until_connack(reader, s.connack_timeout)
        if connack.return_code != 0:
            raise MqttConnectRefused(connack.return_code)
        with self._lock:
            self.generation += 1
            self.connect_count += 1
            self._connected.set()
            self._changed.notify_all()
        log.info("MQTT: connected to %s:%d as %s", s.host, s.port, s.client_id)
        if self.on_connect is not None:
            self.on_connect()
        for packet in early:  # what the broker sent right behind CONNACK, in the same read
            if packet.type != PINGRESP:
                self._handle(packet)
        self._loop(sock, reader)

    def _read_until_connack(self, reader: PacketReader, timeout: float) -> Tuple[Packet, List[Packet]]:
        """CONNACK, and the packets that came behind it in the same read (not to be lost)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise MqttTimeout(f"no CONNACK within {timeout} s")
            packets = self._read(reader, left)
            if packets:
                if packets[0].type != CONNACK:
                    raise MqttProtocolError(f"{packets[0].name} before CONNACK")
                return packets[0], packets[1:]

    def _read(self, reader: PacketReader, timeout: float) -> List[Packet]:
        """Wait up to `timeout` for data; read it all, including what the TLS layer already
        decrypted and buffered (SSLSocket.pending), which select() cannot see."""
        sock = self._sock
        assert sock is not None
        if not sock.pending():
            readable, _, _ = select.select([sock, self._wake_r], [], [], max(0.0, timeout))
            if self._wake_r in readable:
                self._drain_wake()
            if sock not in readable:
                return []
        chunks = []
        # Readable may mean only a TLS 1.3 session ticket: bound the read by the caller's wait, or
        # recv() would block for io_timeout waiting for application data. A timed-out SSL read
        # is safe to retry; a link that stays silent is caught by the keepalive.
        sock.settimeout(max(0.01, min(timeout, self.settings.io_timeout)))
        try:
            data = sock.recv(65536)
            if not data:
                raise MqttError(self._closed_message())
            chunks.append(data)
            while sock.pending():
                chunks.append(sock.recv(sock.pending()))
        except (ssl.SSLWantReadError, socket.timeout):
            pass
        except OSError as err:
            raise link_error(self._connected.is_set(), err, "reading") from None
        return reader.feed(b"".join(chunks))

    def _closed_message(self) -> str:
        if not self._connected.is_set():
            return ("the broker closed the connection before CONNACK: it may have refused the client "
                    "certificate (under TLS 1.3 that shows only now)")
        return (f"the broker closed the connection; if this repeats, another client may be connecting "
                f"with the same client id ({self.settings.client_id})")

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def _send(self, data: bytes) -> None:
        sock = self._sock
        assert sock is not None
        sock.settimeout(self.settings.io_timeout)
        try:
            sock.sendall(data)
        except socket.timeout:
            raise MqttTimeout("write timed out: the broker does not read") from None
        except OSError as err:
            raise link_error(self._connected.is_set(), err, "sending") from None
        self._last_send = time.monotonic()

    def _loop(self, sock: ssl.SSLSocket, reader: PacketReader) -> None:
        """Keepalive: a PINGREQ when nothing was sent, or nothing received, for `keepalive`
        seconds; no PINGRESP within the deadline means a dead link. Counting what is received
        matters: a client that publishes every few seconds never goes quiet, and a dead link
        would otherwise be left to TCP's retransmissions (about 15 minutes)."""
        s = self.settings
        self._last_send = last_receive = time.monotonic()
        ping_sent_at: Optional[float] = None
        while not self._stopping.is_set():
            self._flush_pending()
            now = time.monotonic()
            if ping_sent_at is not None and now - ping_sent_at > s.ping_deadline():
                raise MqttTimeout(f"no PINGRESP within {s.ping_deadline():.0f} s: the link is half-open")
            quiet_since = min(self._last_send, last_receive)
            if ping_sent_at is None and s.keepalive and now - quiet_since >= s.keepalive:
                self._send(encode_pingreq())
                ping_sent_at = time.monotonic()
            wait = s.keepalive - (time.monotonic() - min(self._last_send, last_receive)) if s.keepalive else 60.0
            if ping_sent_at is not None:
                wait = min(wait, ping_sent_at + s.ping_deadline() - time.monotonic())
            wait = min(wait, self._next_subscription_retry() - time.monotonic())
            packets = self._read(reader, max(0.0, wait))  # new work wakes the select
            if packets:
                last_receive = time.monotonic()
            for packet in packets:
                if packet.type == PINGRESP:
                    ping_sent_at = None
                else:
                    self._handle(packet)

    def _next_subscription_retry(self) -> float:
        with self._lock:
            times = [sub.retry_at for sub in self.subscriptions.values() if sub.retry_at is not None]
        return min(times) if times else float("inf")

    def _flush_pending(self) -> None:
        """Send what callers queued: raw packets, new subscriptions, unsent QoS 1 publishes."""
        with self._lock:
            outbox, self._outbox = self._outbox, []
            gen = self.generation
            now = time.monotonic()
            for sub in self.subscriptions.values():  # a refused re-subscription, due for another try
                if sub.retry_at is not None and now >= sub.retry_at:
                    sub.retry_at, sub.error, sub.sent_generation = None, None, -1
            subs = [sub for sub in self.subscriptions.values() if sub.sent_generation != gen and sub.error is None]
            sub_id = self.allocate_id() if subs else 0
            if subs:
                self._sub_pending[sub_id] = [sub.topic for sub in subs]
                for sub in subs:
                    sub.sent_generation = gen
            publishes = [item for item in self.inflight.values() if item.sent_generation != gen]
            packets = list(outbox)
            if subs:
                packets.append(encode_subscribe(sub_id, [(sub.topic, sub.qos) for sub in subs]))
            for item in publishes:
                packets.append(encode_publish(item.topic, item.payload, 1, item.packet_id, dup=item.ever_sent))
                item.sent_generation, item.ever_sent = gen, True
        for data in packets:
            self._send(data)

    def _handle(self, packet: Packet) -> None:
        if packet.type == PUBLISH:
            if packet.qos == 2:
                raise MqttProtocolError("PUBLISH with QoS 2, which this client never subscribes to")
            try:
                self.on_message(packet.topic, packet.payload)
            except Exception:
                log.exception("MQTT: the message handler failed for %s", packet.topic)
            if packet.qos == 1:
                self._send(encode_puback(packet.packet_id))
        elif packet.type == PUBACK:
            with self._lock:
                item = self.inflight.pop(packet.packet_id, None)
            if item is not None:
                item.done.set()
        elif packet.type == SUBACK:
            self._handle_suback(packet)
        elif packet.type == UNSUBACK:
            pass
        else:
            raise MqttProtocolError(f"unexpected {packet.name} from the broker")

    def _handle_suback(self, packet: Packet) -> None:
        with self._lock:
            topics = self._sub_pending.pop(packet.packet_id, None)
            if topics is None:
                return
            if len(topics) != len(packet.codes):
                raise MqttProtocolError(f"SUBACK with {len(packet.codes)} codes for {len(topics)} topics")
            for topic, code in zip(topics, packet.codes):
                log.debug("MQTT: SUBACK %s: %s", topic, "refused" if code == 0x80 else f"granted QoS {code}")
                sub = self.subscriptions.get(topic)
                if sub is None:
                    continue
                if code == 0x80:
                    sub.error = MqttSubscribeRefused(f"the broker refused the subscription to {topic}")
                    if sub.acked_generation >= 0:  # it was granted before: no caller waits, so retry
                        sub.refusals += 1
                        delay = backoff_delay(sub.refusals - 1, self.settings.backoff_base,
                                              self.settings.backoff_cap, self._rng) + 1.0
                        sub.retry_at = time.monotonic() + delay
                        log.error("MQTT: the broker refused the subscription to %s after a reconnect (check "
                                  "iot:Subscribe and iot:Receive in the certificate's IoT policy); trying again "
                                  "in %.0f s", topic, delay)
                else:
                    sub.granted, sub.refusals = code, 0
                    sub.acked_generation = self.generation
            self._changed.notify_all()


# ============================================================================================
# Jobs client: the device side of the AWS IoT Jobs MQTT API for one thing. It subscribes to
# every reply topic it uses and to notify before sending a request (AWS delivers replies
# without a subscription, other brokers do not), matches replies to requests by clientToken,
# and retries RequestThrottled and InternalError with backoff. It never calls start-next: that
# would start the head of the queue, whoever owns the job.
# ============================================================================================

RETRYABLE_JOBS_CODES = ("RequestThrottled", "InternalError")


JOB_ID = re.compile(r"[a-zA-Z0-9_-]{1,64}")  # AWS IoT's job ids
UNREADABLE_REPLY = "UnreadableReply"  # our code for a reply that cannot be parsed (not AWS's)


def valid_execution_number(value: Any) -> bool:
    """An execution number as AWS gives it: a positive integer (not a bool, a list or a string)."""
    return type(value) is int and 1 <= value <= 2 ** 53


def valid_job_id(value: Any) -> bool:
    return isinstance(value, str) and JOB_ID.fullmatch(value) is not None


class JobsRejected(OtaError):
    """A /rejected reply: `code` is AWS's error code (VersionMismatch, TerminalStateReached, ...).
    Throttling and the cloud's own errors are transient (CLOUD_BUSY); any other refusal is for
    good (JOBS_REJECTED)."""

    def __init__(self, code: str, message: str, execution_state: Optional[dict] = None) -> None:
        super().__init__(f"{code}: {message}", "CLOUD_BUSY" if code in RETRYABLE_JOBS_CODES else "JOBS_REJECTED")
        self.code = code
        self.execution_state = execution_state


UNANSWERED_WARNING = 3  # requests in a row with no reply: one WARNING naming the likely causes


class JobsClient:
    """`handle(topic, payload)` must be given every inbound message (it never blocks, so the MQTT
    network thread may call it); `on_notify(payload)` is called for each notify message."""

    def __init__(self, mqtt: MqttClient, thing: str, on_notify: Optional[Callable[[dict], None]] = None,
                 timeout: float = 20.0, retries: int = 4, retry_base: float = 1.0,
                 rng: Optional[random.Random] = None) -> None:
        self.mqtt = mqtt
        self.thing = thing
        self.prefix = f"$aws/things/{thing}/jobs/"
        self.on_notify = on_notify
        self.timeout = timeout
        self.retries = retries
        self.retry_base = retry_base
        self._rng = rng or random.Random()
        self._waiting: Dict[str, Tuple[threading.Event, list, str]] = {}  # token -> (event, box, suffix)
        self.unanswered = 0  # requests in a row that got no reply
        self._lock = threading.Lock()

    def reply_topics(self) -> List[str]:
        p = self.prefix
        return [p + "notify", p + "get/accepted", p + "get/rejected", p + "+/get/accepted", p + "+/get/rejected",
                p + "+/update/accepted", p + "+/update/rejected"]

    def subscribe(self, timeout: float = 30.0) -> None:
        for topic in self.reply_topics():
            self.mqtt.subscribe(topic, 1, timeout)

    def handle(self, topic: str, payload: bytes) -> bool:
        """True when the message was a Jobs reply or notification for this thing."""
        if not topic.startswith(self.prefix):
            return False
        rest = topic[len(self.prefix):]
        try:
            body = json.loads(payload.decode("utf-8")) if payload else {}
        except (UnicodeDecodeError, ValueError, RecursionError):
            log.warning("Jobs: a message on %s is not JSON that can be read", topic)
            self._fail_waiters(rest.rsplit("/", 1)[0], "unreadable")
            return True
        if not isinstance(body, dict):
            return True
        if rest == "notify":
            if self.on_notify is not None:
                self.on_notify(body)
            return True
        outcome = rest.rsplit("/", 1)[-1]
        if outcome in ("accepted", "rejected"):
            with self._lock:
                waiter = self._waiting.get(body.get("clientToken", ""))
            if waiter is not None:
                waiter[1].append((outcome, body))
                waiter[0].set()
        return True

    def interrupt(self) -> None:
        """Wake every caller waiting for a reply; each raises MqttNotConnected."""
        self._fail_waiters(None, "interrupted")

    def _fail_waiters(self, suffix: Optional[str], outcome: str) -> None:
        """Wake the callers waiting on a request to `suffix` (None: every caller) with `outcome`."""
        with self._lock:
            for event, box, asked in self._waiting.values():
                if suffix is None or asked == suffix:
                    box.append((outcome, {}))
                    event.set()

    def request(self, suffix: str, payload: Optional[dict] = None) -> dict:
        """Send one request and return the accepted reply; raise JobsRejected otherwise."""
        attempt = 0
        while True:
            try:
                return self._request_once(suffix, dict(payload or {}))
            except JobsRejected as err:
                if err.code not in RETRYABLE_JOBS_CODES or attempt >= self.retries:
                    raise
                delay = retry_delay(attempt, self.retry_base, 30.0, self._rng)
                log.warning("Jobs: %s answered %s; retrying in %.1f s", suffix, err.code, delay)
                time.sleep(delay)
                attempt += 1

    def _request_once(self, suffix: str, payload: dict) -> dict:
        token = os.urandom(16).hex()
        payload["clientToken"] = token
        event, box = threading.Event(), []
        with self._lock:
            self._waiting[token] = (event, box, suffix)
        log.debug("Jobs: -> %s%s clientToken=%s", self.prefix + suffix,
                  f" status={payload['status']}" if "status" in payload else "", token)
        try:
            self.mqtt.publish(self.prefix + suffix, json.dumps(payload, separators=(",", ":")).encode(), 1,
                              self.timeout)
            if not event.wait(self.timeout):
                self.unanswered += 1
                if self.unanswered == UNANSWERED_WARNING:
                    log.warning("Jobs: %d requests in a row got no reply. Likely causes: the thing name (%s) is "
                                "not the certificate's thing, or the IoT policy does not allow this client id (%s) "
                                "to publish to, subscribe to and receive $aws/things/%s/jobs/*", self.unanswered,
                                self.thing, getattr(getattr(self.mqtt, "settings", None), "client_id", "?"),
                                self.thing)
                raise MqttTimeout(f"no reply to jobs/{suffix} within {self.timeout} s")
        finally:
            with self._lock:
                self._waiting.pop(token, None)
        outcome, body = box[0]
        self.unanswered = 0
        told = body.get("execution") if isinstance(body.get("execution"), dict) else body
        log.debug("Jobs: <- %s/%s clientToken=%s%s%s", self.prefix + suffix, outcome, token,
                  f" status={told.get('status')}" if told.get("status") else "",
                  f" code={body.get('code')}" if body.get("code") else "")
        if outcome == "interrupted":
            raise MqttNotConnected("interrupted: the agent is stopping")
        if outcome == "unreadable":
            raise JobsRejected(UNREADABLE_REPLY, f"the reply to jobs/{suffix} is not JSON that can be read")
        if outcome == "rejected":
            raise JobsRejected(str(body.get("code", "Unknown")), str(body.get("message", "")),
                               body.get("executionState"))
        return body

    # ---- the operations the agent uses ------------------------------------------------------------
    def list_pending(self) -> Tuple[List[dict], List[dict]]:
        """(in-progress summaries, queued summaries), each oldest first. A summary whose jobId is
        not an AWS job id ([a-zA-Z0-9_-]{1,64}) is left out, with a warning: it would reach topic
        names and file names."""
        reply = self.request("get")

        def by_age(items: Any) -> List[dict]:
            out = []
            for item in items if isinstance(items, list) else []:
                if not isinstance(item, dict) or not valid_job_id(item.get("jobId")):
                    log.warning("jobs: ignoring a summary with an invalid jobId: %.100r", item)
                    continue
                if not valid_execution_number(item.get("executionNumber", 1)):
                    log.warning("jobs: ignoring job %s: its summary has no valid executionNumber (%.40r)",
                                item["jobId"], item.get("executionNumber"))
                    continue
                queued = item.get("queuedAt")
                out.append(dict(item, queuedAt=queued if isinstance(queued, (int, float)) else 0))
            return sorted(out, key=lambda i: (i["queuedAt"], i["jobId"]))
        return by_age(reply.get("inProgressJobs")), by_age(reply.get("queuedJobs"))

    def describe(self, job_id: str) -> Optional[dict]:
        """The execution with its document (a freshly presigned URL), or None once terminal. A
        reply about another job than the one asked for is refused (MqttProtocolError)."""
        if not valid_job_id(job_id):
            raise MqttProtocolError(f"not a job id: {job_id!r:.100}")
        try:
            reply = self.request(f"{job_id}/get", {"includeJobDocument": True})
        except JobsRejected as err:
            if err.code in ("TerminalStateReached", "ResourceNotFound"):
                return None
            raise
        execution = reply.get("execution")
        if execution is None:
            return None
        if not isinstance(execution, dict) or execution.get("jobId") != job_id:
            raise JobsRejected(UNREADABLE_REPLY, f"the reply to describing job {job_id} is about another job")
        if not valid_execution_number(execution.get("executionNumber", 1)):
            raise JobsRejected(UNREADABLE_REPLY, f"the reply to describing job {job_id} has no valid executionNumber")
        return execution

    def update(self, job_id: str, status: str, details: Optional[Dict[str, str]] = None,
               expected_version: Optional[int] = None, step_timeout_minutes: Optional[int] = None) -> dict:
        payload: Dict[str, Any] = {"status": status, "includeJobExecutionState": True}
        if details:
            payload["statusDetails"] = details
        if expected_version is not None:
            payload["expectedVersion"] = expected_version
        if step_timeout_minutes is not None:
            payload["stepTimeoutInMinutes"] = step_timeout_minutes
        return self.request(f"{job_id}/update", payload)


# ============================================================================================
# download: the artifact over HTTPS only, streamed to `<dest>.part` with its sha256 computed on
# the fly and its size checked. A reset resumes with Range (only after checking the answer:
# 206 with the matching Content-Range; 200 means start over; 416 means the partial file is
# wrong); after a restart the partial file is hashed again first. A 403 means the presigned URL
# expired: `fresh_url()` is asked for a new one. The URL's query string (its signature) never
# appears in a log line or an error message.
# ============================================================================================

DOWNLOAD_CHUNK = 256 * 1024
STALL_BYTES = 1024  # fewer bytes than this in downloadReadTimeout seconds: the download stalled


class DownloadError(OtaError):
    reason = "DOWNLOAD_FAILED"


class HashMismatch(OtaError):
    reason = "HASH_MISMATCH"


def redact_url(url: str) -> str:
    """The URL without its query string and fragment: safe for logs and statusDetails."""
    return url.split("#", 1)[0].split("?", 1)[0]


def https_context(ca_files: List[str]) -> ssl.SSLContext:
    """The download's TLS context (system_and_given_cas); ConfigError for a CA file that does
    not load."""
    try:
        return system_and_given_cas(ca_files)
    except ssl.SSLError as err:
        raise ConfigError(err.args[0]) from None


def sha256_of_file(path: str) -> Tuple[hashlib._Hash, int]:
    """(sha256 so far, bytes read) of a whole file, e.g. a partial download to resume."""
    digest = hashlib.sha256()
    done = 0
    view = memoryview(bytearray(DOWNLOAD_CHUNK))
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(view)
            if not n:
                return digest, done
            digest.update(view[:n])
            done += n


class RateLimit:
    """A token bucket: `rate` bytes a second on average, a burst of at most one second's worth."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self.tokens = float(rate)
        self.at = time.monotonic()

    def refill(self) -> None:
        now = time.monotonic()
        self.tokens = min(float(self.rate), self.tokens + (now - self.at) * self.rate)
        self.at = now

    def wait_for(self, want: int, stopped: Callable[[], bool]) -> int:
        """Wait (in slices, so that a stop is prompt) until some of `want` bytes may be read;
        returns how many."""
        want = max(1, min(want, self.rate))
        while True:
            self.refill()
            if self.tokens >= 1:
                return int(min(want, self.tokens))
            if stopped():
                return want
            time.sleep(min(0.2, (1 - self.tokens) / self.rate))

    def take(self, n: int) -> None:
        self.tokens -= n


class Download:
    """One artifact to fetch. `fresh_url()` returns a newly presigned URL (the agent describes
    the job again); `progress(done, total)` is called at most every `progress_interval` s."""

    def __init__(self, url: str, dest: str, sha256: str, size: int, context: ssl.SSLContext,
                 fresh_url: Optional[Callable[[], str]] = None,
                 progress: Optional[Callable[[int, int], None]] = None, progress_interval: float = 10.0,
                 read_timeout: float = 60.0, retries: int = 8, retry_base: float = 1.0, retry_cap: float = 60.0,
                 should_stop: Optional[Callable[[], bool]] = None, rng: Optional[random.Random] = None,
                 stall_bytes: int = STALL_BYTES, proxy: Optional[Proxy] = None, max_rate: int = 0) -> None:
        self.url = url
        self.limit = RateLimit(max_rate) if max_rate > 0 else None  # otaAgent.maxDownloadBytesPerSecond
        self.proxy = proxy
        self.stall_bytes = stall_bytes
        self.dest = dest
        self.sha256 = sha256
        self.size = size
        self.context = context
        self.fresh_url = fresh_url
        self.progress = progress
        self.progress_interval = progress_interval
        self.read_timeout = read_timeout
        self.retries = retries
        self.retry_base = retry_base
        self.retry_cap = retry_cap
        self.should_stop = should_stop
        self.rng = rng or random.Random()
        self.url_refreshes = 0
        self._aborted = False
        self._conn: Any = None  # the request under way, for abort()
        self._expired = False  # the watchdog shut the request before its body began
        self._have = 0  # bytes in the partial file, all of them in _digest
        self._digest: Any = None
        self._last_report = 0.0

    @property
    def partial(self) -> str:
        return self.dest + ".part"

    def run(self) -> None:
        """Fetch and verify; on success `dest` holds the artifact (not synced), else it is absent."""
        if not self.url.lower().startswith("https://"):
            raise DownloadError(f"the artifact URL must be https, not {redact_url(self.url)}")
        resumed = os.path.exists(self.partial)
        try:
            self._fetch()
        except HashMismatch:
            if not resumed:
                raise
            log.warning("download: hash mismatch after resuming an earlier partial file; starting over")
            self._fetch()  # _fetch removed the partial file: this run starts from byte 0
        # Not synced, nor is the partial file: the artifact is hashed again before any reuse, a
        # power cut that loses it (or its name) costs a download, never an update, and the tree
        # unpacked from it is made durable on its own (the power-cut sweep: docs/powercut.md).
        os.replace(self.partial, self.dest)

    def _fetch(self) -> None:
        self._resume_state()
        failures = 0
        while self._have < self.size:
            if self.stopped():  # aborted too: a request that ended between two reads starts no other
                raise DownloadError("download stopped", "CANCELED")
            before = self._have
            try:
                self._one_request()
                failures = 0
            except _Transient as err:
                if self.stopped():
                    raise DownloadError("download stopped", "CANCELED") from None
                # Progress made ends a failure streak, but a stall is a failure however little it brought.
                failures = 0 if self._have > before and not err.stalled else failures + 1
                if failures > self.retries:
                    raise DownloadError(f"giving up after {failures} failed attempts: {err}") from None
                delay = backoff_delay(max(0, failures - 1), self.retry_base, self.retry_cap, self.rng)
                log.warning("download: %s; retrying in %.1f s", err, delay)
                time.sleep(delay)
                if err.restart and os.path.exists(self.partial):
                    os.unlink(self.partial)
                if err.restart:
                    self._resume_state()
        self._report_progress(final=True)
        if self._digest.hexdigest() != self.sha256:
            os.unlink(self.partial)
            raise HashMismatch(f"sha256 of the download is {self._digest.hexdigest()}, "
                               f"the job document says {self.sha256}")

    def _resume_state(self) -> None:
        """Hash what a partial file already holds; discard it when it cannot be a prefix."""
        if os.path.exists(self.partial) and os.path.getsize(self.partial) > self.size:
            log.warning("download: discarding a partial file larger than the artifact")
            os.unlink(self.partial)
        if os.path.exists(self.partial):
            self._digest, self._have = sha256_of_file(self.partial)
            if self._have:
                log.info("download: resuming at byte %d of %d", self._have, self.size)
        else:
            open(self.partial, "wb").close()
            self._digest, self._have = hashlib.sha256(), 0

    def _start_over(self) -> None:
        open(self.partial, "wb").close()
        self._digest, self._have = hashlib.sha256(), 0

    def _one_request(self) -> None:
        import http.client
        import urllib.parse
        parts = urllib.parse.urlsplit(self.url)
        target = parts.path + ("?" + parts.query if parts.query else "")
        proxy = self.proxy if self.proxy is not None and self.proxy.used_for(parts.hostname or "") else None
        if proxy is not None:
            conn: Any = tunneled_https(proxy, parts.hostname or "", parts.port or 443, context=self.context,
                                       timeout=self.read_timeout)
        else:
            conn = http.client.HTTPSConnection(parts.hostname or "", parts.port or 443, context=self.context,
                                               timeout=self.read_timeout)
        self._conn = conn
        headers = {"User-Agent": f"ggc-ota/{__version__}"}
        if self._have:
            headers["Range"] = f"bytes={self._have}-"
        # Every step before the body (TCP connect, the proxy's CONNECT, each TLS handshake, the
        # response headers) ends within read_timeout as a whole: a server or proxy that drips
        # keeps every single read alive, so the watchdog shuts the socket instead.
        watchdog = threading.Timer(self.read_timeout, self._expire)
        watchdog.daemon = True
        self._expired = False
        try:
            try:
                watchdog.start()
                log.debug("download: GET %s%s", redact_url(self.url),
                          f" (Range {headers['Range']})" if "Range" in headers else "")
                conn.request("GET", target, headers=headers)
                resp = conn.getresponse()
                log.debug("download: HTTP %d%s", resp.status, f", Content-Range {resp.getheader('Content-Range')}"
                          if resp.getheader("Content-Range") else "")
            except ssl.SSLCertVerificationError as err:
                raise DownloadError(f"{redact_url(self.url)}: server certificate refused: "
                                    f"{err.verify_message or err}") from None
            except (OSError, http.client.HTTPException, ProxyFailed) as err:
                if self._expired:
                    raise _Transient(f"no response from {parts.hostname} within {self.read_timeout:.0f} s "
                                     "(connect, proxy, TLS and headers)", stalled=True) from None
                if isinstance(err, ProxyFailed):
                    raise _Transient(str(err)) from None
                raise _Transient(f"cannot reach {parts.hostname}: {err}") from None
            finally:
                watchdog.cancel()
            self._check_response(resp)
            self.stream_body(resp)
        finally:
            conn.close()

    def _check_response(self, resp: http.client.HTTPResponse) -> None:
        status = resp.status
        if status == 403:
            resp.read(64 * 1024)
            self._refresh_url()
            raise _Transient("the presigned URL was refused (403); retrying with a fresh one")
        if status >= 500:
            raise _Transient(f"the server answered {status}")
        if status == 416:
            raise _Transient("the server refused the resume range (416): restarting", restart=True)
        if status == 200 and self._have:
            log.warning("download: the server ignored the Range request; starting over")
            self._start_over()
        elif status == 206:
            expected = f"bytes {self._have}-{self.size - 1}/{self.size}"
            if resp.getheader("Content-Range", "") != expected:
                raise _Transient(f"unexpected Content-Range {resp.getheader('Content-Range')!r}", restart=True)
        elif status != 200:
            raise DownloadError(f"{redact_url(self.url)} answered HTTP {status}")
        length = resp.getheader("Content-Length")
        if length is not None and length.isdigit() and self._have + int(length) != self.size:
            raise DownloadError(f"the server has {self._have + int(length)} bytes, the job document says "
                                f"{self.size}", "SIZE_MISMATCH")

    def _expire(self) -> None:
        """The watchdog: the request outlived its deadline before its body began."""
        self._expired = True
        self._shut_socket()

    def abort(self) -> None:
        """From another thread (SIGTERM): end the request under way at once, in whatever step it
        is (a proxy's CONNECT and the TLS handshakes included); a read blocked on a silent server
        returns, and the download stops (its partial file is kept)."""
        self._aborted = True
        self._shut_socket()

    def _shut_socket(self) -> None:
        conn = self._conn
        sock = getattr(conn, "sock", None) if conn is not None else None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def stall_threshold(self) -> int:
        """Fewer bytes than this in read_timeout is a stall; under a rate cap, a quarter of what
        the cap lets through meanwhile, if that is less."""
        if self.limit is None:
            return self.stall_bytes
        return max(1, min(self.stall_bytes, int(self.limit.rate * self.read_timeout / 4)))

    def stopped(self) -> bool:
        """Told to stop, or aborted. should_stop first: in the agent it raises AgentStopping
        (which keeps the job and its partial file) or JobCanceled itself."""
        return (self.should_stop is not None and self.should_stop()) or self._aborted

    def stream_body(self, resp: http.client.HTTPResponse) -> None:
        """Write what arrives, one socket read at a time (read1: a server that sends one byte
        every few seconds cannot hold a read for long), checking between reads whether to stop.
        Less than STALL_BYTES in `read_timeout` seconds is a stall: the request is retried."""
        import http.client
        window_start, window_bytes = time.monotonic(), 0
        with open(self.partial, "r+b", buffering=0) as f:
            f.seek(self._have)
            f.truncate()
            try:
                while self._have < self.size:
                    want = min(DOWNLOAD_CHUNK, self.size - self._have)
                    if self.limit is not None:
                        want = self.limit.wait_for(want, self.stopped)
                        if self.stopped():
                            break
                    data = resp.read1(want)
                    if not data:
                        raise _Transient(f"connection closed at byte {self._have} of {self.size}")
                    if self.limit is not None:
                        self.limit.take(len(data))
                    f.write(data)
                    self._digest.update(data)
                    self._have += len(data)
                    window_bytes += len(data)
                    self._report_progress()
                    if self.stopped():
                        break
                    if time.monotonic() - window_start >= self.read_timeout:
                        if window_bytes < self.stall_threshold():
                            raise _Transient(f"the download stalled: {window_bytes} bytes in "
                                             f"{self.read_timeout:.0f} s", stalled=True)
                        window_start, window_bytes = time.monotonic(), 0
            except (OSError, http.client.HTTPException) as err:
                if isinstance(err, OSError) and err.errno == errno.ENOSPC:
                    raise DiskFull(f"the disk filled up at byte {self._have} of {self.size}") from None
                raise _Transient(f"connection lost at byte {self._have} of {self.size}: {err}") from None

    def _report_progress(self, final: bool = False) -> None:
        """Call `progress` at most every `progress_interval` seconds, and once at the end."""
        if self.progress is None:
            return
        now = time.monotonic()
        if final or now - self._last_report >= self.progress_interval:
            self._last_report = now
            self.progress(self._have, self.size)

    def _refresh_url(self) -> None:
        if self.fresh_url is None:
            raise DownloadError(f"{redact_url(self.url)} answered 403 and no fresh URL can be had", "URL_EXPIRED")
        self.url_refreshes += 1
        if self.url_refreshes > self.retries:
            raise DownloadError("the presigned URL was refused (403) even after refreshing it", "URL_EXPIRED")
        log.info("download: the presigned URL expired or was refused; asking for a fresh one")
        self.url = self.fresh_url()
        if not self.url.lower().startswith("https://"):
            raise DownloadError(f"the artifact URL must be https, not {redact_url(self.url)}")


def tunneled_https(proxy: Proxy, host: str, port: int, **kw: Any) -> Any:
    """An HTTPSConnection to host:port through the proxy's CONNECT; TLS end to end. (The class
    is made here because http.client is imported only when a download runs.)"""
    import http.client

    class TunneledHTTPS(http.client.HTTPSConnection):
        """HTTPS to the download host through the proxy's CONNECT; TLS end to end."""

        def __init__(self, proxy: Proxy, host: str, port: int, **kw: Any) -> None:
            super().__init__(host, port, **kw)
            self.proxy = proxy

        def connect(self) -> None:
            # self.sock is the raw socket from the first moment, so that abort() and the
            # download's watchdog can shut it while the proxy's reply or a handshake drips in
            sock = open_tunnel(self.proxy, self.host, self.port, self.timeout or 60.0,
                               on_socket=lambda raw: setattr(self, "sock", raw))
            self.sock = wrap_tls(self._context, sock, self.host)  # type: ignore[attr-defined]

    return TunneledHTTPS(proxy, host, port, **kw)


class _Transient(Exception):
    """A failure worth retrying. `restart`: the partial file is unusable; start from byte 0.
    `stalled`: data came, too slowly to count as progress."""

    def __init__(self, message: str, restart: bool = False, stalled: bool = False) -> None:
        super().__init__(message)
        self.restart = restart
        self.stalled = stalled


# ============================================================================================
# archive: the artifact is hostile until proven otherwise. One streaming pass: each member is
# checked before it is written, and a refusal removes the staging directory whole, so nothing
# of a hostile archive stays. Allowed: regular files, directories and relative symlinks that
# stay inside the tree; refused: absolute paths, `..`, hard links, devices, FIFOs, duplicate
# names, paths through a symlink or a file member (the two-step symlink trick), in any order.
# Extraction is done here, member by member (never tarfile.extract, whose filters had
# bypasses): files are created with O_EXCL|O_NOFOLLOW, setuid/setgid/sticky and group/other
# write bits are stripped, the archive's owners are ignored. Decompressing, parsing and
# creating files run on three threads, as `tar xzf` runs tar and gzip side by side.
# ============================================================================================

MAX_ARCHIVE_MEMBERS = 100_000
MAX_ARCHIVE_BYTES = 4 * 1024 ** 3
MAX_HEADER_BYTES = 64 * 1024  # a GNU long name or a PAX header larger than this is refused unread
SAFE_MODE_MASK = 0o755  # keeps the owner's bits and read/execute for others


class UnsafeArchive(OtaError):
    reason = "UNSAFE_ARCHIVE"


class ArchiveTooLarge(UnsafeArchive):
    """The members declare more bytes than the unpack may write (a gzip bomb, or a small disk)."""


class BadLayout(OtaError):
    reason = "BAD_ARTIFACT_LAYOUT"


def _member_path(name: str) -> str:
    """The member's relative path, normalized; UnsafeArchive for anything that could escape."""
    if "\x00" in name or not name:
        raise UnsafeArchive(f"member with an empty or NUL-holding name: {name!r}")
    if name.startswith("/"):
        raise UnsafeArchive(f"member with an absolute path: {name}")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchive(f"member with '..' in its path: {name}")
    if not parts:
        raise UnsafeArchive(f"member naming the archive's root: {name!r}")
    return "/".join(parts)


class _ArchiveChecker:
    """Checks members one at a time, in archive order, before each is written: the same rules
    whatever the order (a symlink or file member that an earlier member lies below is refused
    as surely as a member below an earlier symlink)."""

    def __init__(self, max_members: int, max_bytes: int) -> None:
        self.max_members = max_members
        self.max_bytes = max_bytes
        self.kinds: Dict[str, str] = {}  # member path -> file, dir or symlink
        self.parents: set = set()        # every directory some member lies below
        self.through: Dict[str, str] = {}  # a path a symlink's target resolves `..` after -> that link
        self.total = 0

    def check(self, info: tarfile.TarInfo) -> str:
        """The member's safe relative path; UnsafeArchive when it breaks a rule."""
        if len(self.kinds) >= self.max_members:
            raise UnsafeArchive(f"more than {self.max_members} members")
        rel = _member_path(info.name)
        if rel in self.kinds:
            raise UnsafeArchive(f"duplicate member name: {rel}")
        kind = self._kind(rel, info)
        if kind != "dir" and rel in self.parents:
            raise UnsafeArchive(f"a member lies below the {'regular file' if kind == 'file' else kind} {rel}")
        if kind == "symlink":
            self._check_link_chain(rel, info.linkname)
        parts = rel.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            if self.kinds.get(parent) == "symlink":
                raise UnsafeArchive(f"{rel} lies below the symlink {parent}")
            if self.kinds.get(parent) == "file":
                raise UnsafeArchive(f"{rel} lies below the regular file {parent}")
            self.parents.add(parent)
        self.kinds[rel] = kind
        return rel

    def _check_link_chain(self, rel: str, target: str) -> None:
        """No `..` resolved after a link, in any order: the kernel takes `..` from where a
        symlink points, not from where its name lies, so d/e/a -> .. and x -> d/e/a/../../../etc
        each stay inside the tree as text while x resolves to <root>/../etc. A link's target may
        pass through or end at another link otherwise (library chains, lib -> usr/lib): each
        link's own target is checked to stay inside its subtree."""
        if rel in self.through:
            raise UnsafeArchive(f"the symlink {self.through[rel]} resolves `..` through the symlink {rel}")
        where = rel.split("/")[:-1]
        parts = [p for p in target.split("/") if p not in ("", ".")]
        for i, part in enumerate(parts):
            if part == "..":
                where = where[:-1]
                continue
            where = where + [part]
            if ".." not in parts[i + 1:]:
                continue
            path = "/".join(where)
            if self.kinds.get(path) == "symlink":
                raise UnsafeArchive(f"the symlink {rel} resolves `..` through the symlink {path}")
            self.through.setdefault(path, rel)

    def _kind(self, rel: str, info: tarfile.TarInfo) -> str:
        if info.isreg():
            self.total += info.size
            if self.total > self.max_bytes:
                raise ArchiveTooLarge(f"unpacked size above {self.max_bytes} bytes")
            return "file"
        if info.isdir():
            return "dir"
        if info.issym():
            target = info.linkname
            if not target or target.startswith("/"):
                raise UnsafeArchive(f"symlink {rel} -> {target!r}: only relative symlinks are allowed")
            # It must stay inside the subtree that is installed (greengrass/ggc/ becomes <root>/ggc):
            # greengrass/ggc/escape -> ../../etc stays inside the archive, but not inside <root>/ggc.
            parts = rel.split("/")
            subtree = "/".join(parts[:2])
            resolved = os.path.normpath(os.path.join(os.path.dirname(rel), target))
            if len(parts) < 3 or not resolved.startswith(subtree + "/"):
                raise UnsafeArchive(f"symlink {rel} -> {target} points outside {subtree}/")
            return "symlink"
        if info.islnk():
            raise UnsafeArchive(f"hard link {rel}: not allowed")
        raise UnsafeArchive(f"{rel}: devices, FIFOs and other special members are not allowed")


UNPACK_CHUNK = 64 * 1024
UNPACK_AHEAD = 8        # decompressed chunks waiting for the parser: at most 512 KiB
GZIP_WBITS = 16 + zlib.MAX_WBITS  # zlib reads the gzip header and checks its CRC and length


class _GunzipStream:
    """The decompressed artifact as a file-like object for tarfile. A thread of its own inflates
    it (zlib releases the GIL), so decompressing overlaps writing files, as `tar xzf` overlaps
    its gzip process. Memory stays bounded: a few chunks in flight, whatever the size."""

    def __init__(self, path: str, sha256: Optional[str] = None) -> None:
        self._sha256 = sha256
        self._digest = hashlib.sha256()
        self._chunks: queue.Queue = queue.Queue(UNPACK_AHEAD)
        self._closing = threading.Event()
        self._current = b""
        self._offset = 0
        self._ended = False
        self.thread = threading.Thread(target=self._inflate_all, args=(path,), name="gunzip", daemon=True)
        self.thread.start()

    def read(self, size: int = UNPACK_CHUNK) -> bytes:
        """Up to `size` bytes (fewer is fine for tarfile); b"" at the end."""
        if self._offset >= len(self._current):
            self._current, self._offset = self._next_chunk(), 0
        out = self._current[self._offset:self._offset + size]
        self._offset += len(out)
        return out

    def close(self) -> None:
        self._closing.set()
        while self.thread.is_alive():
            try:
                self._chunks.get(timeout=0.1)  # unblock a producer waiting for room
            except queue.Empty:
                pass
        self.thread.join()

    def _next_chunk(self) -> bytes:
        if self._ended:
            return b""
        item = self._chunks.get()  # the producer always ends with None or an error
        if item is None:
            self._ended = True
            return b""
        if isinstance(item, BaseException):
            self._ended = True
            raise item
        return item

    def _put(self, item: Any) -> None:
        while not self._closing.is_set():
            try:
                self._chunks.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def drain(self) -> None:
        """Read to the end (past the tar's end marker), so that the whole file is hashed."""
        while self.read(UNPACK_CHUNK):
            pass

    def _inflate_all(self, path: str) -> None:
        try:  # one descriptor, never through a symlink: what is hashed is what is unpacked
            with os.fdopen(os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC), "rb") as f:
                self._inflate(f)
            if self._sha256 is not None and not self._closing.is_set() and self._digest.hexdigest() != self._sha256:
                self._put(HashMismatch(f"the artifact changed on disk: its sha256 is now {self._digest.hexdigest()}"))
                return
            self._put(None)
        except (OSError, EOFError, zlib.error) as err:
            if isinstance(err, OSError) and err.errno == errno.ENOSPC:
                self._put(err)
            else:
                self._put(UnsafeArchive(f"not a readable gzip tar archive: {err}"))
        except BaseException as err:  # whatever it is, the parser gets it and never waits forever
            self._put(err)

    def _inflate(self, f: BinaryIO) -> None:
        inflater = zlib.decompressobj(GZIP_WBITS)
        data = b""
        while not self._closing.is_set():
            if not data:
                data = f.read(UNPACK_CHUNK)
                if not data:
                    break
                self._digest.update(data)
            if inflater.eof:  # another gzip member may follow, after NUL padding
                data = data.lstrip(b"\0")
                if not data:
                    continue
                inflater = zlib.decompressobj(GZIP_WBITS)
            out = inflater.decompress(data, UNPACK_CHUNK)
            data = inflater.unused_data if inflater.eof else inflater.unconsumed_tail
            if out:
                self._put(out)
        if not inflater.eof and not self._closing.is_set():
            raise EOFError("the gzip stream ends before its end marker")


def unpack(path: str, staging: str, max_members: int = MAX_ARCHIVE_MEMBERS,
           max_bytes: int = MAX_ARCHIVE_BYTES, sha256: Optional[str] = None) -> int:
    """Check and write the archive under `staging` (which must not exist), in one streaming
    pass: each member is checked before it is written, and any refusal removes `staging`
    whole, so a hostile archive leaves nothing behind. Returns the number of members written.
    Everything is made durable (syncfs) before it returns."""
    os.makedirs(staging, mode=0o755)
    stream = _GunzipStream(path, sha256)
    try:
        count = _unpack_stream(stream, staging, _ArchiveChecker(max_members, max_bytes))
        if sha256 is not None:
            stream.drain()
    except BaseException:
        stream.close()
        remove_tree(staging)
        raise
    stream.close()
    sync_tree(staging)
    return count


def _bounded_tarinfo() -> type:
    """tarfile.TarInfo that refuses a GNU long-name/long-link or PAX header larger than
    MAX_HEADER_BYTES before reading it: tarfile reads such headers whole, before any check of
    ours could see the member (a 400 MB name in a 389 KB archive)."""
    import tarfile

    class BoundedTarInfo(tarfile.TarInfo):
        def _proc_member(self, tarfile_: Any) -> Any:
            extension = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE,
                         tarfile.SOLARIS_XHDTYPE)
            if self.type == tarfile.GNUTYPE_SPARSE:
                raise UnsafeArchive(f"sparse member {self.name!r:.200}: not allowed (a release has none)")
            if self.type in extension and self.size > MAX_HEADER_BYTES:
                raise UnsafeArchive(f"an extended header of {self.size} bytes (at most {MAX_HEADER_BYTES})")
            return super()._proc_member(tarfile_)

        # GNU sparse maps, old-style and in PAX headers (0.0, 0.1, 1.0), are read by tarfile in
        # loops whose length the archive sets (a 178 KB artifact grew the agent by 417 MiB):
        # a sparse member is refused before its map is read.
        def _refuse_sparse(self, *_: Any) -> Any:
            raise UnsafeArchive("a sparse member (GNU sparse map): not allowed (a release has none)")

        _proc_sparse = _proc_gnusparse_00 = _proc_gnusparse_01 = _proc_gnusparse_10 = _refuse_sparse

    return BoundedTarInfo


def _unpack_stream(stream: _GunzipStream, staging: str, checker: _ArchiveChecker) -> int:
    import tarfile
    _BoundedTarInfo = _bounded_tarinfo()  # noqa: N806 (a class)
    count = 0
    made = {staging}  # directories known to exist: no stat or mkdir per member
    writer = _FileWriter()
    try:
        tar = tarfile.open(fileobj=stream, mode="r|", bufsize=UNPACK_CHUNK, tarinfo=_BoundedTarInfo)
        for info in tar:
            rel = checker.check(info)
            dest = os.path.join(staging, rel)
            parent = os.path.dirname(dest)
            if parent not in made:
                os.makedirs(parent, mode=0o755, exist_ok=True)
                made.add(parent)
            mode = info.mode & SAFE_MODE_MASK
            if info.isdir():
                if dest not in made:
                    os.makedirs(dest, mode=0o755, exist_ok=True)
                    made.add(dest)
                os.chmod(dest, mode | 0o700)
            elif info.issym():
                os.symlink(info.linkname, dest)
            elif info.size <= UNPACK_CHUNK:
                writer.submit(dest, _read_member(tar, info), mode)
            else:
                _write_member(tar, info, dest, mode)
            count += 1
    except (tarfile.TarError, EOFError) as err:
        writer.finish(check=False)
        raise UnsafeArchive(f"not a readable gzip tar archive: {err}") from None
    except (RecursionError, MemoryError) as err:  # chained extension headers, and the like
        writer.finish(check=False)
        raise UnsafeArchive(f"the archive's headers are too deep or too large ({type(err).__name__})") from None
    except BaseException:
        writer.finish(check=False)
        raise
    writer.finish()
    if count == 0:
        raise UnsafeArchive("not a readable gzip tar archive: it holds no members")
    return count


UNPACK_QUEUED = 8  # small files read but not yet written: at most 512 KiB


class _FileWriter:
    """Creates the small members on a thread of its own while the archive is parsed: creating
    a file costs the kernel more than parsing its header, so the two overlap (as `tar`'s work
    overlaps its gzip process). The queue is bounded and always drained: `submit` cannot
    deadlock. (More writer threads were measured slower: creates contend in the kernel.)"""

    def __init__(self) -> None:
        self._jobs: queue.Queue = queue.Queue(UNPACK_QUEUED)
        self._error: Optional[BaseException] = None
        self.thread = threading.Thread(target=self._run, name="unpack-writer", daemon=True)
        self.thread.start()

    def submit(self, dest: str, data: bytes, mode: int) -> None:
        if self._error is not None:
            raise self._error
        self._jobs.put((dest, data, mode))

    def finish(self, check: bool = True) -> None:
        """Wait until every file is written; raise the first failure when `check`."""
        self._jobs.put(None)
        self.thread.join()
        if check and self._error is not None:
            raise self._error

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            if self._error is None:  # after a failure: only drain
                try:
                    _create_file(*job)
                except BaseException as err:  # handed to the parsing thread
                    self._error = err


def _read_member(tar: tarfile.TarFile, info: tarfile.TarInfo) -> bytes:
    source = tar.extractfile(info)
    data = source.read() if source is not None else b""
    if len(data) != info.size:
        raise UnsafeArchive(f"member {info.name} is truncated ({len(data)} of {info.size} bytes)")
    return data


def _open_new_file(dest: str) -> int:
    return os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0), 0o600)


def _create_file(dest: str, data: bytes, mode: int) -> None:
    fd = _open_new_file(dest)
    try:
        _write_all(fd, data)
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


def _write_member(tar: tarfile.TarFile, info: tarfile.TarInfo, dest: str, mode: int) -> None:
    """A large member, streamed through fixed chunks."""
    source = tar.extractfile(info)
    if source is None:
        raise UnsafeArchive(f"cannot read member {info.name}")
    fd = _open_new_file(dest)
    try:
        written = 0
        while True:
            chunk = source.read(UNPACK_CHUNK)
            if not chunk:
                break
            _write_all(fd, chunk)
            written += len(chunk)
        if written != info.size:
            raise UnsafeArchive(f"member {info.name} is truncated ({written} of {info.size} bytes)")
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def sync_tree(path: str) -> None:
    """Make everything under `path` durable: one syncfs(2) of its filesystem (as `sync -f`),
    far cheaper than an fsync per file; an fsync of every file and directory where syncfs is
    not available, or does not reach the storage: the kernel hands syncfs to no FUSE server
    (it returns 0 and the server never hears of it), so on a FUSE file system only fsyncs make
    data durable."""
    syncfs = libc_function("syncfs")
    if syncfs is not None and not filesystem_type(path).startswith("fuse"):
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            if syncfs(fd) == 0:
                return
        finally:
            os.close(fd)
    fsync_tree(path)


def filesystem_type(path: str) -> str:
    """The type of the file system `path` lies on ("ext4", "fuse.sshfs", ...), from the kernel's
    mount table; "" when it cannot be told."""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            table = f.read().splitlines()
    except OSError:
        return ""
    where = os.path.realpath(path)
    best, kind = -1, ""
    for line in table:
        fields, _, tail = line.partition(" - ")
        parts = fields.split()
        if len(parts) < 5 or not tail:
            continue
        mount = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), parts[4])
        inside = where == mount or where.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= best:
            best, kind = len(mount), tail.split()[0]
    return kind


def check_layout(staging: str, software: str) -> str:
    """The tree an update installs, as SOFTWARE says: greengrass/ggc for `core`, greengrass/ota
    for `ota_agent` (with an executable ota/ota_agent/ggc-ota). Returns its path in staging."""
    kind = SOFTWARE.get(software)
    if kind is None:
        raise BadLayout(f"unknown software {software!r}")
    tree = os.path.join(staging, "greengrass", kind.tree)
    if not os.path.isdir(tree) or os.path.islink(tree):
        raise BadLayout(f"a {software} artifact must hold the directory greengrass/{kind.tree}/")
    if kind.entry is not None:
        entry = os.path.join(tree, kind.entry)
        st = os.lstat(entry) if os.path.lexists(entry) else None
        if st is None or not stat.S_ISREG(st.st_mode) or not st.st_mode & stat.S_IXUSR:
            raise BadLayout(f"an {software} artifact must hold an executable greengrass/{kind.tree}/{kind.entry}")
    return tree


# ============================================================================================
# checks: everything verified before anything is touched. A document that is
# invalid or meant for another platform is REJECTED; what is wrong with the device (a missing
# or unsafe script, too little disk) is FAILED.
# ============================================================================================

SOFTWARE_KINDS = tuple(SOFTWARE)
ARCHITECTURES = ("armv6l", "armv7l", "x86_64", "aarch64")
OPERATING_SYSTEMS = ("ubuntu", "raspbian", "amazon_linux", "openwrt")
SUPPORTED_PLATFORMS = {("ubuntu", "x86_64"), ("ubuntu", "aarch64"), ("amazon_linux", "x86_64"),
                       ("raspbian", "armv7l"), ("raspbian", "armv6l"), ("openwrt", "aarch64"), ("openwrt", "armv7l")}
OS_RELEASE_IDS = {"ubuntu": "ubuntu", "amzn": "amazon_linux", "raspbian": "raspbian", "openwrt": "openwrt"}
VERSION_TEXT = re.compile(r"[0-9A-Za-z][0-9A-Za-z._+-]{0,63}")  # used with fullmatch: "$" allows a "\n"
SHA256_HEX = re.compile(r"[0-9a-f]{64}")


class InvalidDocument(OtaError):
    reason = "INVALID_DOCUMENT"


class PlatformMismatch(OtaError):
    reason = "PLATFORM_MISMATCH"


class ScriptInvalid(OtaError):
    reason = "SCRIPT_INVALID"


MAX_ARTIFACT_BYTES = 64 * 2**30


class UpdateDocument(collections.namedtuple("UpdateDocument", [
        "software", "version", "architecture", "operating_system", "log_level", "url", "sha256", "size"])):
    """A checked job document: every field a str but `size` (int)."""

    __slots__ = ()


def parse_document(doc: Any) -> UpdateDocument:
    """Check a Greengrass software-update job document; unknown fields are ignored."""
    if not isinstance(doc, dict):
        raise InvalidDocument("the job document is not a JSON object")
    software = _one_of(doc, "softwareToUpdate", SOFTWARE_KINDS)
    version = doc.get("version")
    if not isinstance(version, str) or not VERSION_TEXT.fullmatch(version):
        raise InvalidDocument("version must be a version string such as 1.11.6")
    arch = _one_of(doc, "updateTargetsArchitecture", ARCHITECTURES)
    os_name = _one_of(doc, "updateTargetsOperatingSystem", OPERATING_SYSTEMS)
    level = doc.get("updateAgentLogLevel", "ERROR")
    if not isinstance(level, str) or level.upper() not in LOG_LEVELS:
        raise InvalidDocument(f"updateAgentLogLevel must be one of {', '.join(LOG_LEVELS)}")
    artifact = doc.get("artifact")
    if not isinstance(artifact, dict):
        raise InvalidDocument("artifact must be an object with url, sha256 and size")
    url, digest, size = artifact.get("url"), artifact.get("sha256"), artifact.get("size")
    check_artifact_url(url)
    if not isinstance(digest, str) or not SHA256_HEX.fullmatch(digest):
        raise InvalidDocument("artifact.sha256 must be 64 lowercase hex digits")
    if not isinstance(size, int) or isinstance(size, bool) or not 0 < size <= MAX_ARTIFACT_BYTES:
        raise InvalidDocument(f"artifact.size must be a number of bytes from 1 to {MAX_ARTIFACT_BYTES}")
    return UpdateDocument(software, version, arch, os_name, level.upper(), url, digest, size)


def _one_of(doc: dict, key: str, allowed: Any) -> str:
    value = doc.get(key)
    if not isinstance(value, str) or value not in allowed:
        raise InvalidDocument(f"{key} must be one of {', '.join(allowed)}")
    return value


def check_artifact_url(url: Any) -> None:
    """An https URL with a host and a valid port, without white space or control characters."""
    import urllib.parse
    if not isinstance(url, str) or not url or len(url) > 8192 or re.search(r"[\x00-\x20\x7f]", url):
        raise InvalidDocument("artifact.url must be an https URL")
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 (raises ValueError for a port out of range)
    except ValueError as err:
        raise InvalidDocument(f"artifact.url is not a valid URL: {err}") from None
    if parts.scheme.lower() != "https" or not parts.hostname:
        raise InvalidDocument("artifact.url must be an https URL")


def detect_platform(ota: Dict[str, Any], etc: str = "/etc") -> Tuple[str, Optional[str]]:
    """(architecture, operating system or None when unknown) of this device."""
    arch = ota.get("architecture") or os.uname().machine
    if arch == "arm64":
        arch = "aarch64"
    if ota.get("operatingSystem"):
        return arch, ota["operatingSystem"]
    if os.path.exists(os.path.join(etc, "openwrt_release")):
        return arch, "openwrt"
    try:
        with open(os.path.join(etc, "os-release"), encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.strip().partition("=")
                if key == "ID":
                    return arch, OS_RELEASE_IDS.get(value.strip().strip('"').lower())
    except OSError:
        pass
    return arch, None


def check_platform(doc: UpdateDocument, arch: str, os_name: Optional[str]) -> Optional[str]:
    """PlatformMismatch when the document targets another platform; a warning text when this
    device's OS is not one Greengrass supports (the document's OS is then accepted)."""
    if (doc.operating_system, doc.architecture) not in SUPPORTED_PLATFORMS:
        raise InvalidDocument(f"{doc.operating_system}/{doc.architecture} is not a supported platform")
    if doc.architecture != arch:
        raise PlatformMismatch(f"the update is for {doc.architecture}, this device is {arch}")
    if os_name is None:
        return f"this device's OS is not one of {', '.join(OPERATING_SYSTEMS)}; accepting {doc.operating_system}"
    if os_name != doc.operating_system:
        raise PlatformMismatch(f"the update is for {doc.operating_system}, this device runs {os_name}")
    return None


def check_script(path: str) -> None:
    """Present, a regular file owned by root, executable by root only (no group/other write or
    execute), in directories that only root can write, all the way up. It is opened without
    following a symlink and checked through that descriptor, and the path must still name that
    very file: so no one but root can swap it before it runs."""
    name = os.path.basename(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise ScriptInvalid(f"{name} is missing ({path})") from None
    except OSError as err:
        if err.errno == errno.ELOOP and os.path.islink(path):
            raise ScriptInvalid(f"{name} is a symbolic link ({path} -> {os.readlink(path)}): a script must be a "
                                "regular file, which no link can change under the agent; copy it there") from None
        raise ScriptInvalid(f"{name} is not a regular file ({err.strerror})") from None
    try:
        st = os.fstat(fd)
        if not os.path.samestat(st, os.lstat(path)):
            raise ScriptInvalid(f"{name} changed while it was checked")
    finally:
        os.close(fd)
    if not stat.S_ISREG(st.st_mode):
        raise ScriptInvalid(f"{name} is not a regular file")
    if st.st_uid != 0:
        raise ScriptInvalid(f"{name} is owned by uid {st.st_uid}, not root")
    if st.st_mode & 0o033:
        raise ScriptInvalid(f"{name} has mode {stat.S_IMODE(st.st_mode):04o}: group/other may write or execute it")
    if not st.st_mode & stat.S_IXUSR:
        raise ScriptInvalid(f"{name} is not executable by its owner")
    unsafe = unsafe_ancestor(path, owners=(0,))  # no one but root may replace it, or a directory on its way
    if unsafe is not None:
        raise ScriptInvalid(f"{unsafe} (on the way to {name}) is writable by others than root")


def unsafe_ancestor(path: str, owners: Tuple[int, ...]) -> Optional[str]:
    """The first directory above `path`, up to /, that someone other than `owners` owns or may
    write (a sticky one, as /tmp, excepted: others cannot rename what is not theirs there); None
    when there is none. Whoever could write one could swap what lies below it."""
    directory = os.path.dirname(os.path.abspath(path))
    while True:
        st = os.stat(directory)
        if st.st_uid not in owners or (st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX):
            return directory
        if directory == os.path.dirname(directory):
            return None
        directory = os.path.dirname(directory)


def check_free_space(needs: List[Tuple[str, int]], floor: int) -> None:
    """`needs`: (path, bytes to be written there). Every filesystem must keep `floor` free
    after its writes; paths on one filesystem add up."""
    by_fs: Dict[int, Tuple[str, int]] = {}
    for path, nbytes in needs:
        probe = path
        while not os.path.exists(probe):
            probe = os.path.dirname(probe) or "."
        dev = os.stat(probe).st_dev
        first, total = by_fs.get(dev, (probe, 0))
        by_fs[dev] = (first, total + nbytes)
    for probe, total in by_fs.values():
        st = os.statvfs(probe)
        free = st.f_bavail * st.f_frsize
        if free < total + floor:
            raise DiskFull(f"{probe}: {free // 2**20} MiB free, the update needs {total // 2**20} MiB "
                           f"plus a floor of {floor // 2**20} MiB")


# ============================================================================================
# hooks: the four managed-respawn scripts, or greengrassd stop|start when
# managedRespawn is false. Fixed PATH, stdin from /dev/null, their own process group,
# output into the log, a timeout after which the group gets SIGTERM and then SIGKILL.
# ============================================================================================

HOOK_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


class HookFailed(OtaError):
    reason = "HOOK_FAILED"

    def __init__(self, message: str, reason: Optional[str] = None, exit_code: Optional[int] = None) -> None:
        super().__init__(message, reason)
        self.exit_code = exit_code  # the script's, when it exited


class Postponed(OtaError):
    """A pre-update script exited 75 (EX_TEMPFAIL): not now. Nothing was changed."""

    reason = "POSTPONED"


EX_TEMPFAIL = 75  # a pre-update script's "not now" (sysexits.h)


class HookTimeout(HookFailed):
    reason = "HOOK_TIMEOUT"


class HealthCheckFailed(OtaError):
    reason = "HEALTH_CHECK_FAILED"


HEALTH_RETRY_SECONDS = 2.0


SYSTEMD_RUNTIME = "/run/systemd/system"  # exists when systemd runs the system
HOOK_TAIL_LINES = 10     # a failing script's last lines go into the error (and statusDetails.message)
HOOK_TOKEN_ENV = "GGC_OTA_HOOK_RUN"
HOOK_LINE_CHARS = 300


HOOK_OUTPUT = "hook-output.log"  # in the state directory: where scripts (and what they leave running) write
HOOK_OUTPUT_MAX = 1024 * 1024    # emptied past this, at each script's start and every check
HOOK_OUTPUT_CHECK_SECONDS = 10.0


def run_hook(argv: List[str], env_extra: Dict[str, str], timeout: float, cwd: str, output: str) -> None:
    """Run a script (argv) with a fixed PATH, stdin from /dev/null, in a session of its own, its
    stdout and stderr going to the file `output` (O_APPEND), which the agent reads line by line
    into the log until the script exits. A process the script leaves running keeps that file and
    may write on: nothing it can break (a pipe closed under it would kill it with SIGPIPE, the
    core after its job reported SUCCEEDED); keep_trimming keeps the file small."""
    name = os.path.basename(argv[0]) + (" " + " ".join(argv[1:]) if argv[1:] else "")
    token = os.urandom(8).hex()  # every process the script starts inherits it, setsid or not
    env = {"PATH": HOOK_PATH, "HOME": "/", "LANG": "C", **env_extra, HOOK_TOKEN_ENV: token}
    log.info("hook: running %s", name)
    import subprocess
    trim_hook_output(output)
    keep_trimming(output)
    out_fd = os.open(output, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        in_fd = os.open(output, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        os.close(out_fd)
        raise
    try:
        os.lseek(in_fd, 0, os.SEEK_END)
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out_fd, stderr=subprocess.STDOUT,
                                    start_new_session=True, env=env, cwd=cwd)
        except OSError as err:
            raise HookFailed(f"{name} could not be started: {err.strerror or err}") from None
        finally:
            os.close(out_fd)
        tail: collections.deque = collections.deque(maxlen=HOOK_TAIL_LINES)
        code = _read_until_exit(proc, in_fd, name, tail, time.monotonic() + timeout)
    finally:
        os.close(in_fd)
    if code is None:
        kill_processes(lambda: set(session_members(proc.pid)) | set(processes_with_env(HOOK_TOKEN_ENV, token)))
        proc.wait()
        raise HookTimeout(f"{name} did not finish within {timeout:.0f} s and was stopped{_said(tail)}")
    if code != 0:
        raise HookFailed(f"{name} {describe_exit(code)}{_said(tail)}", exit_code=code)
    log.info("hook: %s succeeded", name)


def trim_hook_output(path: str) -> None:
    """Empty the scripts' output file once it passes HOOK_OUTPUT_MAX: its writers append
    (O_APPEND), so each goes on at the new end."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return
    try:
        if os.fstat(fd).st_size > HOOK_OUTPUT_MAX:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)


TRIMMED: set = set()  # the output files a thread of this process keeps small


def keep_trimming(path: str) -> None:
    """While this agent runs, trim the scripts' output file every HOOK_OUTPUT_CHECK_SECONDS (a
    process a script left running may write into it without end)."""
    if path in TRIMMED:
        return
    TRIMMED.add(path)

    def trim() -> None:
        while True:
            time.sleep(HOOK_OUTPUT_CHECK_SECONDS)
            trim_hook_output(path)
    threading.Thread(target=trim, name="hook-output", daemon=True).start()


def in_own_scope(argv: List[str]) -> List[str]:
    """Where systemd runs the system, a daemon the agent starts itself (greengrassd, with
    managedRespawn false) goes into a scope of its own, out of the agent's cgroup: stopping or
    restarting the agent's service then never stops the core. Elsewhere `argv` as it is."""
    if not os.path.isdir(SYSTEMD_RUNTIME):
        return argv
    tool = next((os.path.join(d, "systemd-run") for d in HOOK_PATH.split(":")
                 if os.access(os.path.join(d, "systemd-run"), os.X_OK)), None)
    if tool is None:
        return argv
    return [tool, "--scope", "--quiet", "--collect", f"--unit=greengrass-core-{int(time.time())}", "--"] + argv


def _said(tail: collections.deque) -> str:
    return "; its last output: " + " | ".join(tail) if tail else ""


def _read_until_exit(proc: subprocess.Popen, fd: int, name: str, tail: collections.deque,
                     deadline: float) -> Optional[int]:
    """Log what the script writes to its output file (read from `fd`) line by line, keeping only
    its last lines, until the script exits (its exit code) or the deadline passes (None)."""
    pending = b""
    while True:
        code = proc.poll()
        pending = _log_lines(pending + _read_new(fd), name, tail)
        if code is not None:
            break
        if time.monotonic() > deadline:
            return None
        time.sleep(0.1)
    if pending:
        _log_lines(pending + b"\n", name, tail)
    return code


def _read_new(fd: int, limit: int = 1024 * 1024) -> bytes:
    """What was appended to the file since the last read (at most `limit` bytes); from its start
    again when it was emptied meanwhile."""
    if os.lseek(fd, 0, os.SEEK_CUR) > os.fstat(fd).st_size:
        os.lseek(fd, 0, os.SEEK_SET)
    chunks, size = [], 0
    while size < limit:
        data = os.read(fd, 65536)
        if not data:
            break
        chunks.append(data)
        size += len(data)
    return b"".join(chunks)


def _log_lines(data: bytes, name: str, tail: collections.deque) -> bytes:
    """Log each complete line of `data` (bounded), keep it in `tail`; returns the incomplete rest,
    itself bounded."""
    *lines, rest = data.split(b"\n")
    for raw in lines:
        line = raw.decode("utf-8", "replace").rstrip()[:HOOK_LINE_CHARS]
        if line:
            tail.append(line)
            log.info("hook %s: %s", name, line)
    return rest[-HOOK_LINE_CHARS * 4:]


def kill_processes(members_now: Callable[[], set], grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds, to every process `members_now()` names (asked
    again each time: a script stopped late may have started more)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        members = members_now()
        for pid in members:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + grace
        while members and time.monotonic() < deadline:
            time.sleep(0.05)
            members = members_now()
        if not members:
            return


def processes_with_env(key: str, value: str) -> List[int]:
    """Processes whose environment holds key=value: what a script started, even after setsid
    and a double fork took it out of the script's session and parentage."""
    wanted = f"{key}={value}".encode()
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if wanted in f.read().split(b"\0"):
                        out.append(int(entry))
            except OSError:
                pass
    return [pid for pid in out if proc_stat(pid) is not None]


def session_members(sid: int) -> List[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = proc_stat(int(entry))
            if fields is not None and fields[3] == str(sid):
                out.append(int(entry))
    return out


# ---- other processes: a new agent on trial, a daemon handed over to, what a script started -----


def proc_stat(pid: int) -> Optional[List[str]]:
    """Fields of /proc/<pid>/stat after the command name (the state first, then the parent's
    pid, ...), or None when the process is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] == "Z" else fields


def boot_ticks() -> float:
    """Now, in the clock of process start times: clock ticks since boot."""
    try:
        with open("/proc/uptime") as f:
            return float(f.read().split()[0]) * os.sysconf("SC_CLK_TCK") - 1
    except (OSError, ValueError, IndexError):
        return 0.0


def process_start_time(pid: int) -> str:
    """The kernel's start time of a process (field 22 of its stat), which tells a process from a
    later one that reuses its pid; "" when it is gone."""
    fields = proc_stat(pid)
    return fields[19] if fields else ""


def watch_process(pid: int, started: str, what: str) -> None:
    """Stop this agent (SIGTERM to itself) when the process `pid`, started at `started`, is gone:
    checked every second by a daemon thread."""
    def watch() -> None:
        while True:
            time.sleep(1.0)
            if process_start_time(pid) != started:
                log.warning("%s (pid %d) is gone; stopping", what, pid)
                os.kill(os.getpid(), signal.SIGTERM)
                return
    if pid > 1 and started:
        threading.Thread(target=watch, name="watch-" + str(pid), daemon=True).start()


def stop_session(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """End a process started in a session of its own and everything still in that session
    (a frozen binary's launchers and agent): SIGTERM, SIGKILL after `grace` seconds; reaped."""
    import subprocess
    kill_processes(lambda: set(session_members(proc.pid)), grace)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:  # unkillable (a process stuck in the kernel): not waited for
        log.warning("pid %d did not end after SIGKILL", proc.pid)


def read_pid(path: str) -> Optional[int]:
    """The pid a PID file names, or None (no file, not a number)."""
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            text = f.read(32).strip()
    except OSError:
        return None
    return int(text) if text.isdigit() and int(text) > 1 else None


def describe_exit(code: Optional[int]) -> str:
    """`exited with code 1`, `was killed by SIGSEGV` (a Popen returncode)."""
    if code is not None and code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def last_line(path: str, limit: int = 4096) -> str:
    """The last non-empty line of a (possibly large) text file, at most 300 characters."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - limit))
            lines = [line.strip() for line in f.read().decode("utf-8", "replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1][:300] if lines else ""


# ============================================================================================
# state: the agent's own files in the state directory (default <root>/ota-state): the lock,
# the journal, pending status updates (the outbox), the history, downloads and staging. Every
# file is written whole: temp file, fsync, rename, fsync the directory.
# ============================================================================================

HISTORY_LIMIT = 200
TERMINAL_RESULTS = ("SUCCEEDED", "FAILED", "REJECTED")  # results of a job that has ended on this device


def write_json_atomic(path: str, value: Any, durable: bool = True) -> None:
    """Replace `path` at once (a reader sees the old file or the new one); `durable`: the new
    one survives a power cut once this returns."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open_new(tmp) as f:
            json.dump(value, f, indent=1, sort_keys=True)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    if durable:
        fsync_dir(os.path.dirname(path) or ".")


def open_new(path: str, mode: int = 0o600) -> Any:
    """A new file for writing text, never through a symlink: whatever lies at `path` (a temp file
    a crash left, a planted link) is removed first, then the file is created exclusively."""
    if os.path.lexists(path):
        os.unlink(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    return os.fdopen(fd, "w", encoding="utf-8")


def read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except ValueError:
        log.error("state: %s is not valid JSON; setting it aside", path)
        os.replace(path, path + ".corrupt")
        return None


class AnotherAgent(OtaError):
    reason = "ALREADY_RUNNING"


class JournalCorrupt(OtaError):
    reason = "JOURNAL_CORRUPT"


JOURNAL_MAX_BYTES = 64 * 1024


JOURNAL_KEYS = ("jobId", "executionNumber", "software", "live", "new", "old", "stage", "liveId", "step")
JOURNAL_MAX_BYTES = 64 * 1024


LOCK_FD_ENV = "GGC_OTA_LOCK_FD"  # an agent handed over to finds the lock's descriptor here
LOCK_WAIT_SECONDS = 15.0    # how long a starting agent waits for the previous one to stop
LOCK_POLL_SECONDS = 0.2


class State:
    def __init__(self, directory: str) -> None:
        self.dir = directory
        self.journal_path = os.path.join(directory, "journal.json")
        self.current_path = os.path.join(directory, "current.json")
        self.history_path = os.path.join(directory, "history.jsonl")
        self.outbox = os.path.join(directory, "outbox")
        self.downloads = os.path.join(directory, "downloads")
        self.staging = os.path.join(directory, "staging")
        self.postponed = os.path.join(directory, "postponed")
        self._lock_fd: Optional[int] = None
        self._identity: Optional[Tuple[int, int]] = None  # (device, inode) of the directory, from ensure()

    def ensure(self) -> None:
        """Create the state directory; refuse one that is a symlink, or that anyone but this
        agent's user may write, or that lies in a directory anyone else may write, all the way
        up: the agent runs as root and trusts what it finds there."""
        for d in (self.dir, self.outbox, self.downloads, self.staging):
            os.makedirs(d, mode=0o700, exist_ok=True)
        self.verify()
        st = os.lstat(self.dir)
        self._identity = (st.st_dev, st.st_ino)

    def verify(self) -> None:
        """The checks of ensure(), again (before each step of an update that trusts the state
        directory: unpack, the journal, the swap): STATE_DIR_UNSAFE when the directory, one of
        its own, or one on its way is not (or no longer) safe, or the directory was swapped."""
        for d in (self.dir, self.outbox, self.downloads, self.staging):
            st = os.lstat(d)
            if stat.S_ISLNK(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
                raise StateDirUnsafe(f"the state directory {d} is a symlink, not this user's, or writable by "
                                     "others: fix it (chmod 700, chown) or set otaAgent.stateDir")
        st = os.lstat(self.dir)
        if self._identity is not None and (st.st_dev, st.st_ino) != self._identity:
            raise StateDirUnsafe(f"the state directory {self.dir} was replaced while the agent ran")
        unsafe = unsafe_ancestor(self.dir, owners=(0, os.geteuid()))
        if unsafe is not None:
            raise StateDirUnsafe(f"{unsafe}, on the way to the state directory {self.dir}, may be written by another "
                           "user, who could swap the state directory: fix its owner or mode, or set "
                                 "otaAgent.stateDir")

    @staticmethod
    def job_path(directory: str, job_id: str, suffix: str = "") -> str:
        """<directory>/<jobId><suffix>: the one way a job's files are named. A job id comes from
        the cloud; only an AWS job id ([a-zA-Z0-9_-]{1,64}) may name a file, so none can lead
        outside the state directory."""
        if not valid_job_id(job_id):
            raise OtaError(f"not a job id: {job_id!r:.100}", "INVALID_JOB_ID")
        return os.path.join(directory, job_id + suffix)

    def lock(self, wait: float = 0.0, stopping: Optional[threading.Event] = None) -> None:
        """One agent per root: an exclusive lock held for the process's life. An agent handed
        over to (exec, a new daemon, a trial) adopts the descriptor it inherited. A lock held
        by another process is waited for up to `wait` seconds: an init system's restart, or a
        respawn after a launcher died, may start this agent while the previous one still stops."""
        import fcntl
        inherited = os.environ.pop(LOCK_FD_ENV, None)
        if inherited is not None and self._adopt(int(inherited)):
            return
        try:
            fd = os.open(os.path.join(self.dir, "lock"), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as err:
            raise StateDirUnsafe(f"cannot open the lock file {os.path.join(self.dir, 'lock')}: {err.strerror} "
                                 "(a symlink is refused)") from None
        deadline = time.monotonic() + wait
        said = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                holder = (os.pread(fd, 96, 0).decode(errors="replace").split() or ["unknown"])[0]
            if time.monotonic() >= deadline:
                os.close(fd)
                raise AnotherAgent(f"another agent already runs on this root (pid {holder})")
            if not said:
                log.warning("waiting up to %.0f s for the agent that holds the lock (pid %s) to stop", wait, holder)
                said = True
            if stopping is not None and stopping.wait(LOCK_POLL_SECONDS):
                os.close(fd)
                raise AgentStopping()
            if stopping is None:
                time.sleep(LOCK_POLL_SECONDS)
        os.set_inheritable(fd, True)  # kept across the exec of a self-update
        self._lock_fd = fd
        self.mark_lock_holder()

    def mark_lock_holder(self) -> None:
        """Write this process's pid and version into the lock file (what --status and a waiting
        agent show)."""
        if self._lock_fd is not None:
            os.ftruncate(self._lock_fd, 0)
            os.pwrite(self._lock_fd, f"{os.getpid()} {__version__}".encode(), 0)

    @property
    def lock_fd(self) -> Optional[int]:
        """The descriptor that holds the lock (kept across the exec of a self-update)."""
        return self._lock_fd

    def _adopt(self, fd: int) -> bool:
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(os.path.join(self.dir, "lock")))
        except OSError:
            return False
        if same:
            self._lock_fd = fd
            self.mark_lock_holder()
        return same

    def lock_holder(self) -> Optional[str]:
        """The pid holding the lock, or None when no agent holds it."""
        said = self.lock_holder_says()
        return None if said is None else (said.split() or ["unknown"])[0]

    def lock_holder_version(self) -> Optional[str]:
        """The version of the agent holding the lock (None: none holds it, or it did not say)."""
        said = (self.lock_holder_says() or "").split()
        return said[1] if len(said) == 2 and VERSION_TEXT.fullmatch(said[1]) else None

    def lock_holder_says(self) -> Optional[str]:
        """What the agent holding the lock wrote into it ("<pid> <version>"), or None."""
        import fcntl
        path = os.path.join(self.dir, "lock")
        if not os.path.exists(path):
            return None
        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        except OSError:
            return os.read(fd, 96).decode(errors="replace").strip() or "unknown"
        finally:
            os.close(fd)

    # ---- journal ----------------------------------------------------------------------------
    def has_journal(self) -> bool:
        """Whether a journal exists, readable or not: while one does, nothing is cleaned up."""
        return os.path.lexists(self.journal_path)

    def journal(self) -> Optional[dict]:
        """The update in flight; None when there is none. A journal that exists but cannot be
        read (empty, truncated, not JSON, not an object, keys missing) raises JournalCorrupt:
        doubt is never read as "no update in flight"."""
        try:
            with open(self.journal_path, "rb") as f:
                raw = f.read(JOURNAL_MAX_BYTES + 1)
        except FileNotFoundError:
            return None
        try:
            journal = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            journal = None
        missing = [k for k in JOURNAL_KEYS if not isinstance(journal, dict) or k not in journal]
        if len(raw) > JOURNAL_MAX_BYTES or missing:
            raise JournalCorrupt(f"the update journal {self.journal_path} cannot be read ({len(raw)} bytes"
                                 + (f", without {', '.join(missing[:4])}" if journal is not None else ", not JSON")
                                 + ")")
        return journal

    def set_aside_journal(self) -> str:
        """Move an unreadable journal out of the way, kept for a person to read; returns where."""
        aside = f"{self.journal_path}.corrupt-{int(time.time())}"
        os.replace(self.journal_path, aside)
        fsync_dir(self.dir)
        return aside

    def write_journal(self, journal: dict) -> None:
        write_json_atomic(self.journal_path, journal)

    def clear_journal(self) -> None:
        """Not synced: a journal that a power cut brings back is at `committed` or `rolled_back`,
        and finishing it again reports nothing twice (the history says it was handled)."""
        if os.path.exists(self.journal_path):
            os.unlink(self.journal_path)

    # ---- outbox: the latest status of each job not yet acknowledged by the cloud -----------------
    def queue_status(self, entry: dict) -> None:
        """Keep `entry` ({jobId, status, statusDetails, at}) as the job's latest unsent status.
        A terminal status is fsynced; an IN_PROGRESS one is not: a power cut that loses it loses
        nothing (the update is recovered and reported again), and a device on flash is spared
        two syncs per progress report."""
        write_json_atomic(self.job_path(self.outbox, entry["jobId"], ".json"), entry,
                          durable=entry["status"] != "IN_PROGRESS")

    def pending_statuses(self) -> List[dict]:
        out = []
        for name in sorted(os.listdir(self.outbox)):
            if name.endswith(".json"):
                entry = read_json(os.path.join(self.outbox, name))
                if isinstance(entry, dict):
                    out.append(entry)
        return sorted(out, key=lambda e: e.get("at", 0))

    def status_sent(self, entry: dict) -> None:
        path = self.job_path(self.outbox, entry["jobId"], ".json")
        current = read_json(path)
        if current is not None and current.get("at") == entry.get("at"):
            os.unlink(path)

    def downloads_by_job(self) -> List[Tuple[str, str]]:
        """(jobId, path) of every file in downloads/ (a finished download or a partial one)."""
        named = ((name.split(".", 1)[0], os.path.join(self.downloads, name)) for name in os.listdir(self.downloads))
        return [(job_id, path) for job_id, path in named if valid_job_id(job_id)]

    # ---- postponements: a job a pre-update script said "not now" to ---------------------------
    def postponement(self, job_id: str) -> Optional[dict]:
        """{executionNumber, count, retryAt} of a postponed job, or None."""
        entry = read_json(self.job_path(self.postponed, job_id, ".json")) if os.path.isdir(self.postponed) else None
        ok = isinstance(entry, dict) and type(entry.get("count")) is int and isinstance(entry.get("retryAt"),
                                                                                         (int, float))
        return entry if ok else None

    def postpone(self, job_id: str, number: int, count: int, retry_at: float) -> None:
        """Not synced: a power cut that loses it costs at most some more asking."""
        os.makedirs(self.postponed, mode=0o700, exist_ok=True)
        write_json_atomic(self.job_path(self.postponed, job_id, ".json"),
                          {"executionNumber": number, "count": count, "retryAt": retry_at}, durable=False)

    def end_postponement(self, job_id: str) -> None:
        path = self.job_path(self.postponed, job_id, ".json")
        if os.path.lexists(path):
            os.unlink(path)

    # ---- history ----------------------------------------------------------------------------
    def add_history(self, record: dict) -> None:
        """Append a record, keeping the last HISTORY_LIMIT. A full disk loses the record (logged),
        never the update: the cloud has the status all the same."""
        lines = self._history_lines()[-(HISTORY_LIMIT - 1):] + [json.dumps(record, sort_keys=True)]
        tmp = self.history_path + ".tmp"
        try:
            with open_new(tmp) as f:  # never through a planted symlink
                f.write("\n".join(lines) + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.history_path)
            fsync_dir(self.dir)
        except OSError as err:
            log.error("cannot write the update history (%s)", err)
            if os.path.exists(tmp):
                os.unlink(tmp)

    def history(self) -> List[dict]:
        out = []
        for line in self._history_lines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def _history_lines(self) -> List[str]:
        try:
            with open(self.history_path, encoding="utf-8") as f:
                return [line.rstrip("\n") for line in f if line.strip()]
        except FileNotFoundError:
            return []

    def handled(self, job_id: str, execution_number: int) -> bool:
        return any(h.get("jobId") == job_id and h.get("executionNumber") == execution_number and
                   h.get("result") in TERMINAL_RESULTS for h in self.history())


# ============================================================================================
# swap and journal: the installed tree (<root>/ggc or <root>/ota) is exchanged with the staged
# one under a write-ahead journal (<stateDir>/journal.json), written whole (temp, fsync, rename,
# fsync the directory) by the one agent that runs the update, before each step. Recovery decides
# by the identity (device, inode) of the tree now in place, never by guesswork, is safe to run
# twice, rolls forward only where the steps table says so, and otherwise back. The old tree is
# deleted only after the commit. renameat2(RENAME_EXCHANGE) swaps in one step where the kernel
# and filesystem allow it; two renames otherwise. GGC_OTA_CRASH_AT=<moment> makes the agent call
# os._exit at that moment (tests only; inert unset).
# ============================================================================================

CRASH_ENV = "GGC_OTA_CRASH_AT"
CRASH_EXIT = 99
MAX_RECOVERIES = 3        # a crash loop inside recovery ends in ROLLBACK_FAILED, never loops
MAX_TRIAL_STARTS = 2      # journal format 1 only: starts of an agent exec'd in place before rollback
# 1: no "format" key; a self-update's new agent was tried in place, after the swap.
# 2: the agent on trial wrote its progress into the journal; other names for some steps.
# 3: one writer per file: the agent on trial writes trial.json; step names are the phases'.
JOURNAL_FORMAT = 3
# The names formats 1 and 2 gave some steps, and the name each has now; `swapped` was one step
# for both kinds of software (core: before its post-update step; agent: before the hand-over).
OLD_STEP_NAMES = {"trial": "new_agent_trial", "proven": "new_agent_trial", "swapping": "swap",
                  "committed": "commit", "rolling_back": "roll_back"}
OLD_SWAPPED = {"core": "post_update", "ota_agent": "hand_over"}
NAMES_IN_FORMAT_2 = {"new_agent_trial": "trial", "keep": "pre_update", "swap": "swapping", "hand_over": "swapped",
                     "commit": "committed", "roll_back": "rolling_back"}
STEP_NAMES = ("pre_update", "keep", "new_agent_trial", "swap", "hand_over", "post_update", "health_check", "commit",
              "roll_back", "rolled_back")
NO_VALUE = type(None)

# Every field of a journal: (attribute, key on disk, types, default; REQUIRED: must be there).
REQUIRED = object()
JOURNAL_FIELDS: Tuple[Tuple[str, str, tuple, Any], ...] = (
    ("job_id", "jobId", (str,), REQUIRED), ("execution_number", "executionNumber", (int,), REQUIRED),
    ("software", "software", (str,), REQUIRED), ("step", "step", (str,), REQUIRED),
    ("live", "live", (str,), REQUIRED), ("stage", "stage", (str,), REQUIRED),
    ("live_id", "liveId", (list, NO_VALUE), REQUIRED), ("new_id", "newId", (list, NO_VALUE), None),
    ("format", "format", (int,), 1), ("recoveries", "recoveries", (int,), 0),
    ("from_version", "fromVersion", (str, NO_VALUE), None), ("to_version", "toVersion", (str,), ""),
    ("started_at", "startedAt", (int, float), 0), ("core_pid_file", "corePidFile", (str, NO_VALUE), None),
    ("exchange", "exchange", (bool, NO_VALUE), None), ("new_started", "newStarted", (bool,), False),
    ("reason", "reason", (str, NO_VALUE), None), ("message", "message", (str,), ""),
    ("starts", "starts", (int,), 0), ("health_check", "healthCheck", (str, NO_VALUE), None),
)
NEW_IN_FORMAT_3 = ("healthCheck",)  # left out of a journal written in an older format
# What every format writes for a person to read, derived from `stage` (and checked against it).
DERIVED_FIELDS: Dict[str, tuple] = {"new": (str,), "old": (str,)}
# What format 2 also wrote (the trial's progress, rolledBack): read, checked, and kept as it is.
LEGACY_FIELDS: Dict[str, tuple] = {"rolledBack": (str,), "trialConnected": (bool,), "trialReason": (str,),
                                   "trialMessage": (str,)}


class RollbackFailed(OtaError):
    reason = "ROLLBACK_FAILED"


class Journal:
    """The update in flight. Typed: Journal.load checks every field and path before anything
    trusts it, and reads every older format; to_disk writes the format the update began in."""

    job_id: str
    execution_number: int
    software: str
    step: str
    live: str
    stage: str
    live_id: Optional[List[int]]
    new_id: Optional[List[int]]
    format: int
    recoveries: int
    from_version: Optional[str]
    to_version: str
    started_at: float
    core_pid_file: Optional[str]
    exchange: Optional[bool]
    new_started: bool
    reason: Optional[str]
    message: str
    starts: int
    health_check: Optional[str]

    def __init__(self, **values: Any) -> None:
        self.legacy: Dict[str, Any] = values.pop("legacy", {})
        for attr, _, _, default in JOURNAL_FIELDS:
            value = values.pop(attr, default)
            if value is REQUIRED:
                raise TypeError(f"a journal needs {attr}")
            setattr(self, attr, value)
        if values:
            raise TypeError(f"no journal field {sorted(values)[0]}")

    @property
    def new(self) -> str:
        """Where the new tree waits in staging (and where the old one ends, exchanged)."""
        return os.path.join(self.stage, "new")

    @property
    def old(self) -> str:
        """Where the old tree goes by the swap."""
        return os.path.join(self.stage, "old")

    def to_disk(self) -> Dict[str, Any]:
        out: Dict[str, Any] = dict(self.legacy)
        for attr, key, _, default in JOURNAL_FIELDS:
            value = getattr(self, attr)
            if default is REQUIRED or value != default or attr == "format":
                out[key] = value
        out.update(new=self.new, old=self.old)
        if self.format < 3:
            out["step"] = NAMES_IN_FORMAT_2.get(self.step, self.step)
            for key in NEW_IN_FORMAT_3:
                out.pop(key, None)
            if self.format == 1:
                del out["format"]
        return out

    @classmethod
    def load(cls, raw: Any, root: str, staging: str, core_pid_file: str) -> Journal:
        """The journal `raw` (parsed JSON), checked whole: every field has its type, every path
        is the one this agent writes for that job (the live tree under the root, the staging of
        that job), its reasons are known ones, its format one this agent knows. JournalCorrupt
        otherwise: a planted or damaged journal never makes the agent remove, run or exec
        anything else."""
        def bad(why: str) -> JournalCorrupt:
            return JournalCorrupt(f"the update journal is not one this agent wrote: {why}")

        if not isinstance(raw, dict):
            raise bad("not a JSON object")
        fmt = raw.get("format", 1)
        if type(fmt) is int and fmt > JOURNAL_FORMAT:
            raise JournalCorrupt(f"the update journal was written by a newer agent (format {fmt}; this agent knows "
                                 f"{JOURNAL_FORMAT} and older): run that agent version again to finish the update, "
                                 "or check the trees by hand")
        known = {key: (attr, kinds, default) for attr, key, kinds, default in JOURNAL_FIELDS}
        values: Dict[str, Any] = {"legacy": {}}
        older = type(fmt) is int and fmt < 3
        for key, value in raw.items():
            attr, kinds, _ = known.get(key, (None, DERIVED_FIELDS.get(key) or (LEGACY_FIELDS.get(key) if older
                                                                                 else None), None))
            if kinds is None:
                raise bad(f"unknown field {key!r:.40}")
            if type(value) not in kinds:  # exact types: True is no executionNumber
                raise bad(f"{key} is a {type(value).__name__}")
            if attr is not None:
                values[attr] = value
            elif key in LEGACY_FIELDS:
                values["legacy"][key] = value
        missing = [key for key, (_, _, default) in known.items() if default is REQUIRED and key not in raw]
        if missing:
            raise bad(f"without {', '.join(missing[:4])}")
        job_id, software, step = values["job_id"], values["software"], values["step"]
        if fmt < 3:
            step = OLD_SWAPPED.get(software, step) if step == "swapped" else OLD_STEP_NAMES.get(step, step)
            values["step"] = step
        if not valid_job_id(job_id) or software not in SOFTWARE or step not in STEP_NAMES:
            raise bad(f"job {job_id!r:.80}, software {software!r:.40}, step {raw['step']!r:.40}")
        stage = os.path.join(staging, job_id)
        expected = {"live": os.path.join(root, SOFTWARE[software].tree), "stage": stage,
                    "new": os.path.join(stage, "new"), "old": os.path.join(stage, "old")}
        for key, path in expected.items():
            if key in raw and raw[key] != path:
                raise bad(f"{key} is {raw[key]!r:.200}, not {path}")
        for key in ("liveId", "newId"):
            ident = raw.get(key)
            if ident is not None and (len(ident) != 2 or any(type(n) is not int for n in ident)):
                raise bad(f"{key} is not a [device, inode] pair")
        for key in ("reason", "trialReason"):
            if raw.get(key) is not None and raw[key] not in REASONS:
                raise bad(f"{key} {raw[key]!r:.40} is no reason code")
        if raw.get("healthCheck") not in (None, "script", "pid", "skipped"):
            raise bad("healthCheck is not script, pid or skipped")
        if raw.get("corePidFile") not in (None, core_pid_file):
            raise bad(f"corePidFile is not the configured {core_pid_file}")
        if raw.get("executionNumber", 1) < 1 or raw.get("recoveries", 0) < 0:
            raise bad("a negative count")
        return cls(**values)


def crash_point(moment: str) -> None:
    """Tests only (inert unless GGC_OTA_CRASH_AT is set): GGC_OTA_CRASH_AT=<moment> exits with 99
    at that moment (a step's name: as it begins, its journal written and its phase reported; or a
    moment inside one, as the steps table lists), <moment>:hang stops there for good (for a
    SIGKILL from outside), <moment>:SIGSEGV (or another signal name) dies of that signal,
    <moment>:ENOSPC (or another errno name) raises that OSError there, as the next system call
    would."""
    wanted = os.environ.get(CRASH_ENV)
    if not wanted:
        return
    name, _, how = wanted.partition(":")
    if name != moment:
        return
    log.warning("crash point %s: %s on purpose (%s is set)", moment, how or "exiting", CRASH_ENV)
    for handler in log.handlers:
        handler.flush()
    if how == "hang":
        while True:
            time.sleep(3600)
    if how.startswith("SIG") and isinstance(getattr(signal, how, None), int):
        signal.signal(getattr(signal, how), signal.SIG_DFL)
        os.kill(os.getpid(), getattr(signal, how))
        time.sleep(5)
    if how.startswith("E") and isinstance(getattr(errno, how, None), int):
        raise OSError(getattr(errno, how), f"{os.strerror(getattr(errno, how))} (crash point {moment})")
    os._exit(CRASH_EXIT)


def path_id(path: str) -> Optional[List[int]]:
    """What the journal records of a tree: [device, inode]."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return [st.st_dev, st.st_ino]


def is_tree(path: str, recorded: Any) -> bool:
    """Whether `path` is the tree whose path_id was recorded. By inode alone: the trees an update
    swaps lie on one file system (rename needs it), and a device number need not survive a
    reboot (device-mapper, USB disks and FUSE mounts are numbered as they come up)."""
    now = path_id(path)
    return (now is not None and isinstance(recorded, list) and len(recorded) == 2
            and now[1] == recorded[1])


def rename_exchange(a: str, b: str) -> bool:
    """Swap two paths atomically with renameat2(RENAME_EXCHANGE); False when not supported."""
    renameat2 = libc_function("renameat2")
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange_flag = -100, 2
    rc = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange_flag)
    if rc == 0:
        return True
    import ctypes
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), a)


def copy_tree(src: str, dst: str) -> None:
    """Copy a directory tree, symlinks as symlinks; the first error is raised as it is (an
    OSError with its errno: ENOSPC is DISK_FULL), where shutil.copytree would collect them all."""
    import shutil
    for dirpath, dirnames, filenames in walk_tree(src):
        target = os.path.join(dst, os.path.relpath(dirpath, src))
        os.makedirs(target, exist_ok=True)
        shutil.copystat(dirpath, target, follow_symlinks=False)
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                os.symlink(os.readlink(path), os.path.join(target, name))
            elif name in filenames:
                shutil.copy2(path, os.path.join(target, name), follow_symlinks=False)


def copy_kept(live: str, new: str, keep: List[str], prefix: str) -> List[str]:
    """Copy each kept path (relative to the root, e.g. ggc/var) from the live tree into the new
    one, replacing what the new tree has there. Returns what was copied."""
    import shutil
    copied = []
    for rel in keep:
        parts = rel.strip("/").split("/")
        if parts[0] != prefix or len(parts) < 2:
            continue
        inner = os.path.join(*parts[1:])
        src, dst = os.path.join(live, inner), os.path.join(new, inner)
        if not os.path.lexists(src):
            continue
        remove_tree(dst)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        if os.path.isdir(src) and not os.path.islink(src):
            copy_tree(src, dst)
            sync_tree(dst)
        else:
            shutil.copy2(src, dst, follow_symlinks=False)
            if not os.path.islink(dst):
                fsync_file(dst)
        fsync_dir(os.path.dirname(dst))
        copied.append(rel)
    return copied


def swap_trees(journal: Journal) -> None:
    """Put the staged tree at the live path; the old tree ends at journal.old. Durable when it
    returns. The journal must already say `swap`."""
    live, new, old = journal.live, journal.new, journal.old
    if rename_exchange(new, live):
        journal.exchange = True
        crash_point("mid_swap")
        os.rename(new, old)
    else:
        journal.exchange = False
        os.rename(live, old)
        crash_point("mid_swap")
        os.rename(new, live)
    fsync_dir(os.path.dirname(live))
    fsync_dir(os.path.dirname(old))


def restore_old(journal: Journal) -> None:
    """Put the old tree back at the live path, whatever moment a crash interrupted."""
    live, old_id = journal.live, journal.live_id
    if is_tree(live, old_id):
        return
    source = next((p for p in (journal.old, journal.new) if is_tree(p, old_id)), None)
    if source is None:
        raise RollbackFailed(f"the old tree of {live} is nowhere to be found")
    aside = journal.old + ".rejected"
    if os.path.lexists(live):
        remove_tree(aside)
        os.rename(live, aside)
        crash_point("mid_restore")
    os.rename(source, live)
    fsync_dir(os.path.dirname(live))
    fsync_dir(os.path.dirname(source))


# ============================================================================================
# agent processes: how this agent starts programs and other agents (a clean environment, the
# right interpreter), starts itself as a daemon, hands its place to another agent file, and
# tries a new agent's file before trusting it.
# ============================================================================================

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_RUNNING = 0, 1, 2, 3
EXIT_RESTART = 75           # a frozen agent in the foreground after a self-update: start me again
TRIAL_ENV = "GGC_OTA_TRIAL"  # set for a new agent on trial: <jobId>:<pid of the old agent>:<its start time>
DAEMON_CHILD_FLAG = "--daemon-child"
FRESH_ENV = "GGC_OTA_FRESH_INTERPRETER"
JOURNAL_FORMAT_FLAG = "--journal-format"  # internal: print the journal format this agent writes
# What the launchers of a frozen binary tell the process they start: ours (packaging/launcher.c,
# the static binary's first part), the binary itself, the directory its libraries were unpacked
# into, and whether that is beside it (flash, or flash-new on the first start of a version) or in
# TMPDIR ("tmpdir: <why>"); staticx's in the binaries before it (STATICX_*); PyInstaller's (_PYI_*,
# _MEIPASS2 in older releases). A program this agent starts, a new agent binary above all, must
# not take them as its own.
LAUNCHER_EXE_ENV = "GGC_OTA_LAUNCHER_EXE"    # the binary itself
LAUNCHER_LIBS_ENV = "GGC_OTA_LAUNCHER_LIBS"  # the directory the libraries were unpacked into
LAUNCHER_MODE_ENV = "GGC_OTA_LAUNCHER_MODE"  # flash, flash-new, or "tmpdir: <why not beside the binary>"
LAUNCHER_ENV_PREFIXES = ("GGC_OTA_LAUNCHER_", "STATICX_", "_PYI_", "_MEIPASS")


class NewAgentBroken(OtaError):
    reason = "NEW_AGENT_BROKEN"


def child_environment(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """The environment for a program this agent starts. A frozen binary runs with the loader
    path of its own bundle (PyInstaller sets LD_LIBRARY_PATH and keeps the original in
    LD_LIBRARY_PATH_ORIG); another program must not load those libraries."""
    env = {key: value for key, value in os.environ.items()
           if key not in (FRESH_ENV, TRIAL_ENV, LOCK_FD_ENV) and not key.startswith(LAUNCHER_ENV_PREFIXES)}
    if getattr(sys, "frozen", False):
        for key in ("LD_LIBRARY_PATH", "LD_PRELOAD"):
            original = env.pop(key + "_ORIG", None)
            if original is not None:
                env[key] = original
            else:
                env.pop(key, None)
    env.update(extra or {})
    return env


def without_options(argv: List[str], names: Dict[str, bool]) -> List[str]:
    """`argv` without the options in `names` (name -> takes a value), in either form."""
    out: List[str] = []
    items = iter(argv)
    for item in items:
        name, has_value, _ = item.partition("=")
        if name in names:
            if names[name] and not has_value:
                next(items, None)
            continue
        out.append(item)
    return out


def running_agent_file() -> str:
    """The agent file this process runs: for the static binary the binary (not the unpacked
    program its launcher ran), for PyInstaller alone sys.executable, for the script itself."""
    if getattr(sys, "frozen", False):
        return os.environ.get(LAUNCHER_EXE_ENV) or sys.executable
    return os.path.abspath(sys.argv[0])


def agent_command(path: str, args: List[str]) -> List[str]:
    """How to start the agent at `path`: a frozen binary runs itself; the script version runs
    under the same interpreter as this one."""
    if getattr(sys, "frozen", False):
        return [path] + args
    return [sys.executable, path] + args


# ---- the static binary: its launcher ---------------------------------------------------------
# The binary is a launcher (packaging/launcher.c) carrying this agent frozen by PyInstaller as a
# directory, with its C libraries. The launcher unpacks them once per version beside the binary
# (flash: page cache the kernel can drop), or into TMPDIR where it cannot, then becomes this
# process with exec: nothing of it stays running. It says how through GGC_OTA_LAUNCHER_*.


def launcher_libraries() -> Optional[Tuple[str, str]]:
    """(where the binary's libraries are, what that means for the device) when this process is
    the static binary; None for the script."""
    libs, mode = os.environ.get(LAUNCHER_LIBS_ENV), os.environ.get(LAUNCHER_MODE_ENV, "")
    if not getattr(sys, "frozen", False) or not libs:
        return None
    if libraries_in_tmpdir():
        why = mode.partition(":")[2].strip() or "no reason given"
        return libs, f"in TMPDIR, RAM on most devices, unpacked at every start (not beside the binary: {why})"
    first = " (unpacked at this start: the first of this version)" if mode == "flash-new" else ""
    return libs, f"beside the binary, unpacked once for this version, page cache the kernel can reclaim{first}"


def settle_into_binary() -> None:
    """What the static binary does first, in every mode: name the process ggc-ota (the kernel
    named it after the C library's loader), keep host lookups to files and DNS (the device's own
    NSS modules were built for another C library than the one unpacked), and remove the
    libraries at exit when they are in TMPDIR (the agent logs that they are, once, at its start)."""
    prctl = libc_function("prctl")
    if prctl is not None:
        pr_set_name = 15
        prctl(pr_set_name, b"ggc-ota", 0, 0, 0)
    configure = libc_function("__nss_configure_lookup")
    if configure is not None:
        for database in (b"hosts", b"services", b"protocols"):
            configure(database, b"files dns" if database == b"hosts" else b"files")
    in_tmpdir = libraries_in_tmpdir()
    if in_tmpdir is not None:
        import atexit
        atexit.register(remove_tmpdir_libraries, in_tmpdir, os.getpid())


def libraries_in_tmpdir() -> Optional[str]:
    """The directory of the binary's libraries when its launcher put them in TMPDIR, else None."""
    in_tmpdir = getattr(sys, "frozen", False) and os.environ.get(LAUNCHER_MODE_ENV, "").startswith("tmpdir")
    return os.environ.get(LAUNCHER_LIBS_ENV) if in_tmpdir else None


def remove_tmpdir_libraries(path: str, pid: int) -> None:
    """At exit: the libraries this process unpacked into TMPDIR (not in a forked child)."""
    if os.getpid() == pid and os.path.basename(path) == f"ggc-ota-{pid}":
        try:
            remove_tree(path)
        except OSError:
            pass  # the next start of the binary removes what a gone agent left in TMPDIR


def write_pid(path: str, pid: Optional[int] = None) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open_new(tmp, 0o644) as f:
        f.write(f"{pid or os.getpid()}\n")
    os.replace(tmp, path)


def start_daemon(command: List[str], pid_file: str, lock_fd: Optional[int] = None, timeout: float = 30.0) -> int:
    """Start `command` (an agent with --foreground --daemon-child) detached, in a session of its
    own, and wait until it has written `pid_file` (it does so once it holds the lock and runs).
    Then name its top process there, as systemd's Type=forking expects (the agent itself; for a
    binary of staticx, which a downgrade may start, its outermost launcher, which forwards
    signals to the agent). `lock_fd`: the lock is handed to it.
    Returns that pid; raises OtaError with the daemon's last words when it dies or is late."""
    import subprocess
    if os.path.lexists(pid_file):
        os.unlink(pid_file)
    env = child_environment({LOCK_FD_ENV: str(lock_fd)} if lock_fd is not None else None)
    # Started with SIGHUP ignored, which exec keeps: the launchers of a staticx binary (which a
    # downgrade may start) do not forward SIGHUP and would die of it (a logrotate's HUP to the PID
    # file's process would stop the agent). The agent installs its own SIGHUP handler: reopen the log.
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN) if in_main else None
    try:
        child = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, start_new_session=True, close_fds=True, env=env,
                                 pass_fds=(lock_fd,) if lock_fd is not None else ())
    finally:
        if in_main:
            signal.signal(signal.SIGHUP, previous)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(pid_file) and child.poll() is None:
            try:
                write_pid(pid_file, child.pid)
            except OSError as err:  # a start either succeeds with a daemon running, or leaves none
                stop_session(child)
                raise OtaError(f"cannot write the PID file {pid_file} ({err.strerror or err}); the daemon was "
                               "stopped") from None
            return child.pid
        if child.poll() is not None:
            err = (child.stderr.read() if child.stderr else b"").decode(errors="replace").strip().splitlines()
            last = err[-1] if err else "no message"
            last = last[len("ggc-ota: "):] if last.startswith("ggc-ota: ") else last  # one prefix is enough
            message = f"the daemon exited with {child.returncode}: {last}"
            if child.returncode == EXIT_RUNNING:
                raise AnotherAgent(message)
            raise OtaError(message, "NEW_AGENT_CRASHED")
        time.sleep(0.05)
    stop_session(child)
    raise OtaError("the daemon did not write its PID file in time", "NEW_AGENT_CRASHED")


def self_test(agent: str, root: str, config_path: str) -> int:
    """The new agent must run from staging before it replaces this one: `--version`, then
    `--check-config` with this device's config. Returns the journal format it writes (2 for an
    agent that cannot say: the first release, which knows no other); NewAgentBroken otherwise."""
    import subprocess
    env = child_environment({CRASH_ENV: ""})
    for args in (["--version"], ["--root", root, "--config", config_path, "--check-config"]):
        try:
            out = subprocess.run(agent_command(agent, args), stdin=subprocess.DEVNULL, capture_output=True,
                                 timeout=60, env=env)
        except (OSError, subprocess.TimeoutExpired) as err:
            raise NewAgentBroken(f"the new agent does not run: {err}") from None
        if out.returncode != 0:
            tail = (out.stderr or out.stdout).decode(errors="replace").strip().splitlines()[-1:]
            raise NewAgentBroken(f"the new agent failed `{' '.join(args)}` with exit code {out.returncode}: "
                                 f"{' '.join(tail)}")
    try:  # whatever goes wrong here, format 2 is what every agent reads
        out = subprocess.run(agent_command(agent, [JOURNAL_FORMAT_FLAG]), stdin=subprocess.DEVNULL,
                             capture_output=True, timeout=10, env=env)
        said = out.stdout.decode(errors="replace").strip()
        fmt = int(said) if out.returncode == 0 and said.isdigit() else 2
    except (OSError, subprocess.TimeoutExpired):
        fmt = 2
    return max(2, min(fmt, JOURNAL_FORMAT))


def is_trial_of(job_id: str) -> bool:
    """Whether this process is the new agent that the agent running job `job_id` started on
    trial (GGC_OTA_TRIAL=<jobId>:<its pid>:<its start time>)."""
    trial_job, _, rest = os.environ.get(TRIAL_ENV, "").partition(":")
    return bool(trial_job) and trial_job == job_id and bool(rest)


def trial_supervisor() -> Tuple[int, str]:
    """(pid, start time) of the agent that runs this trial, from GGC_OTA_TRIAL."""
    _, _, rest = os.environ.get(TRIAL_ENV, "").partition(":")
    pid, _, started = rest.partition(":")
    return (int(pid) if pid.isdigit() else 0), started


# ============================================================================================
# the engine: an update is a plan, the list of steps its SOFTWARE row names, each a row of the
# steps table. One runner does every step the same way, in one order: the journal (durably),
# the phase report, the crash point, the action; and when the action fails, what the step
# says: roll back, roll forward (the next start finishes it), or stop and keep everything.
# Recovery at start resumes the same plans from the journal's step, as the table says.
# ============================================================================================

ROLL_BACK, ROLL_FORWARD, STOP, REPORT = "roll back", "roll forward", "stop, keep everything", "report"


class Step(collections.namedtuple("Step", ["name", "doing", "reports", "on_error", "after_crash", "inner"])):
    """One step of an update. `name`: the journal's step, the phase reported as it begins (when
    `reports`), and its crash point (GGC_OTA_CRASH_AT), reached once its journal is written and
    its phase reported, before its action. `doing`: what its action does. `on_error`: what the
    runner does when the action fails. `after_crash`: what recovery does when the journal names
    this step at start. `inner`: the crash points inside its action."""

    __slots__ = ()


# The steps of every plan, in the order plans take them. The runner, the recovery, the crash
# tests and docs/internals.md all read this table.
STEPS = (
    Step("pre_update", "the pre-update script stops the software", True, ROLL_BACK, ROLL_BACK, ()),
    Step("keep", "the kept state (otaAgent.keep) is copied into the new tree", False, ROLL_BACK, ROLL_BACK, ()),
    Step("new_agent_trial", "the new agent runs from staging, under the old one, and must prove itself: connect, "
         "run ota_post_update.sh, report new_agent_verified", True, ROLL_BACK, ROLL_BACK,
         ("trial_started", "new_agent_connected", "new_agent_verified")),
    Step("swap", "the live tree and the staged one are exchanged", False, ROLL_BACK, ROLL_BACK, ("mid_swap",)),
    Step("hand_over", "the new agent, now live, takes over from the old one", False, ROLL_BACK, ROLL_FORWARD,
         ("before_exec",)),
    Step("post_update", "the post-update script starts the new core", True, ROLL_BACK, ROLL_BACK, ()),
    Step("health_check", "the new core must prove healthy", True, ROLL_BACK, ROLL_BACK, ()),
    Step("commit", "the update is final: SUCCEEDED, the old tree deleted", False, ROLL_FORWARD, ROLL_FORWARD, ()),
    Step("roll_back", "the old tree is put back and its post-update script runs", False, STOP, ROLL_BACK,
         ("mid_restore", "after_restore")),
    Step("rolled_back", "the old software runs again: FAILED is reported", False, STOP, REPORT, ()),
)
STEP_BY_NAME = {step.name: step for step in STEPS}
ROLLBACK_PLAN = ("roll_back", "rolled_back")
NEW_SOFTWARE_STARTED = ("post_update", "health_check")  # from these steps on the new software may run
# The phases reported before the journal exists, each also a crash point as it begins: nothing
# in the root has changed yet, and a restart takes the job again.
BEFORE_JOURNAL = ("checking", "download", "unpack")


def plan_of(software: str) -> Tuple[str, ...]:
    """The steps of an update of `software`, from its SOFTWARE row."""
    return SOFTWARE[software].steps


# GGC_OTA_ACTION, why a script runs: an update's own step (the trial's ota_post_update.sh too),
# a rollback (stopping the new software, starting the old), the start of whatever core is live
# after a recovery that could not read the journal, or a pre-update script asked again after it
# postponed the update.
SCRIPT_ACTIONS = ("update", "rollback", "recovery", "postponed-retry")


HEALTH_CHECKS = ("script", "pid", "skipped")  # statusDetails.healthCheck of a core update that SUCCEEDED


def health_check_kind(cfg: Config, software: str, pid_file: Optional[str]) -> Tuple[str, str]:
    """How an update of `software` is checked before its commit, and with what: ("script", its
    path), ("pid", the PID file of the core daemon; `pid_file` is the one the old core had, or
    None), or ("skipped", why)."""
    name = SOFTWARE[software].health_script
    if name is None:
        return "skipped", f"{software} updates have no health check"
    script = os.path.join(cfg.root, "usr", "scripts", name)
    if os.path.lexists(script):
        return "script", script
    if pid_file:
        return "pid", pid_file
    return "skipped", f"neither {script} nor the core's PID file {cfg.ota['corePidFile']} exists"


class Hooks:
    """The scripts of an update, as the configuration says: the managed-respawn scripts, or
    `greengrassd stop|start` without them; and the core's health check."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.root = cfg.root
        self.output = os.path.join(cfg.ota["stateDir"], HOOK_OUTPUT)

    def run(self, software: str, which: str, journal: Journal, action: str = "update") -> None:
        """The pre-update (`which` "pre") or post-update ("post") script of `software`, told why it
        runs (`action`, in GGC_OTA_ACTION: SCRIPT_ACTIONS) and which versions it moves between
        (GGC_OTA_FROM_VERSION, GGC_OTA_TO_VERSION: for a rollback, from the new to the old)."""
        moving = (journal.to_version, journal.from_version) if action == "rollback" else \
            (journal.from_version, journal.to_version)
        env = {"GGC_OTA_JOB_ID": journal.job_id, "GGC_OTA_COMPONENT": software, "GGC_ROOT": self.root,
               "GGC_OTA_OLD_VERSION": journal.from_version or "", "GGC_OTA_NEW_VERSION": journal.to_version,
               "GGC_OTA_ACTION": action, "GGC_OTA_FROM_VERSION": moving[0] or "", "GGC_OTA_TO_VERSION": moving[1] or ""}
        kind = SOFTWARE[software]
        if self.cfg.managed_respawn:
            argv = [os.path.join(self.root, "usr", "scripts", kind.pre_script if which == "pre" else kind.post_script)]
            check_script(argv[0])  # again, right before it runs: recovery and rollback included
        elif kind.daemon is not None:
            argv = [os.path.join(self.root, kind.daemon), "stop" if which == "pre" else "start"]
            if which == "post":
                argv = in_own_scope(argv)
        else:
            return
        try:
            run_hook(argv, env, float(self.cfg.ota["scriptTimeout"]), self.root, self.output)
        except HookFailed as err:
            if which == "pre" and action != "rollback" and self.cfg.managed_respawn \
                    and err.exit_code == EX_TEMPFAIL and not isinstance(err, HookTimeout):
                raise Postponed(f"{os.path.basename(argv[0])} said not now (exit {EX_TEMPFAIL})") from None
            raise

    def check_health(self, software: str, journal: Journal, began: float) -> str:
        """The update commits only when the new software is healthy: its health-check script,
        when it exists, exits 0 within healthCheckTimeout (run again every 2 s until then); else
        the core daemon of corePidFile, when the old core had one, comes up and stays alive for
        healthCheckSeconds. With neither, the check is skipped with a warning. Returns how it was
        checked (HEALTH_CHECKS)."""
        kind, what = health_check_kind(self.cfg, software, journal.core_pid_file)
        if kind == "script":
            self.run_health_script(what, journal)
        elif kind == "pid":
            self.watch_core_daemon(what, began)
        else:
            log.warning("job %s: no health check: %s", journal.job_id, what)
        return kind

    def run_health_script(self, script: str, journal: Journal) -> None:
        timeout = float(self.cfg.ota["healthCheckTimeout"])
        deadline = time.monotonic() + timeout
        env = {"GGC_OTA_JOB_ID": journal.job_id, "GGC_ROOT": self.root, "GGC_OTA_NEW_VERSION": journal.to_version,
               "GGC_OTA_ACTION": "update", "GGC_OTA_FROM_VERSION": journal.from_version or "",
               "GGC_OTA_TO_VERSION": journal.to_version}
        while True:
            check_script(script)
            try:
                run_hook([script], env, max(1.0, deadline - time.monotonic()), self.root, self.output)
                return
            except HookFailed as err:
                failure = err
            if time.monotonic() + HEALTH_RETRY_SECONDS >= deadline:
                raise HealthCheckFailed(f"{os.path.basename(script)} did not pass within {timeout:.0f} s: {failure}")
            time.sleep(HEALTH_RETRY_SECONDS)

    def watch_core_daemon(self, pid_file: str, not_before: float) -> None:
        """The core daemon named by `pid_file` must come up and live healthCheckSeconds. Only a
        process started after the post-update step began (`not_before`, in the kernel's clock
        ticks since boot) counts: a stale PID file whose pid was reused by another process, or
        the old core's, proves nothing."""
        seconds, timeout = float(self.cfg.ota["healthCheckSeconds"]), float(self.cfg.ota["healthCheckTimeout"])
        start = time.monotonic()
        watched: Optional[Tuple[int, str]] = None
        stale = None
        while True:
            pid = read_pid(pid_file)
            started = process_start_time(pid) if pid else ""
            if started and int(started) < not_before:
                stale, started = pid, ""
            if watched is None and started:
                watched, start = (pid or 0, started), time.monotonic()
            elif watched is not None and (pid, started) != watched:
                raise HealthCheckFailed(f"the core daemon (pid {watched[0]}) died "
                                        f"{time.monotonic() - start:.1f} s after it started")
            if watched is None and time.monotonic() - start > timeout:
                raise HealthCheckFailed(f"the core daemon did not start within {timeout:.0f} s ({pid_file}"
                                        + (f" names pid {stale}, a process older than the update)" if stale else ")"))
            if watched is not None and time.monotonic() - start >= seconds:
                log.info("health check: the core daemon (pid %d) ran for %.0f s", watched[0], seconds)
                return
            time.sleep(0.2)


class Engine:
    """Runs the plan of an update under the journal, rolls it back when a step fails, and
    finishes at start whatever update a crash interrupted. What it needs from the rest of the
    agent comes in as callables: `finish(record, status, reason, message, rolled_back, version)`
    ends a job (history and report), `report(job_id, status, details)` reports a phase,
    `trial(journal)` tries a new agent (raising OtaError unless it proved itself), and
    `restart_as(path)` makes the agent at `path` the running one (raising AgentReplaced)."""

    def __init__(self, cfg: Config, state: State, report: Callable[[str, str, Dict[str, Any]], None],
                 finish: Callable[..., None], trial: Callable[[Journal], None],
                 restart_as: Callable[[str], None]) -> None:
        self.cfg = cfg
        self.state = state
        self.report = report
        self.finish = finish
        self.hooks = Hooks(cfg)
        self.exe_id = path_id(running_agent_file())  # which agent file this process runs
        self.new_began = 0.0  # clock ticks since boot when the new software's post-update step began
        self.actions: Dict[str, Callable[[Journal], None]] = {
            "pre_update": lambda j: self.hooks.run(j.software, "pre", j, self.pre_update_action(j)),
            "keep": self.keep, "new_agent_trial": trial, "swap": self.swap, "hand_over": self.hand_over,
            "post_update": self.post_update, "health_check": self.health_check, "commit": self.commit,
            "roll_back": self.restore, "rolled_back": self.close,
        }
        self.restart_as = restart_as

    # ---- the runner ----------------------------------------------------------------------------
    def begin(self, job_id: str, number: int, doc: UpdateDocument, stage: str, record: dict,
              journal_format: int = JOURNAL_FORMAT) -> None:
        """Write the journal of a new update (in `journal_format`: one the new agent of a
        self-update reads too) and run its plan."""
        self.state.verify()
        live = os.path.join(self.cfg.root, SOFTWARE[doc.software].tree)
        pid_file = self.cfg.ota["corePidFile"]
        journal = Journal(job_id=job_id, execution_number=number, software=doc.software, step="",
                          live=live, stage=stage, live_id=path_id(live), new_id=path_id(os.path.join(stage, "new")),
                          format=journal_format, from_version=record.get("fromVersion"), to_version=doc.version,
                          started_at=record["startedAt"], core_pid_file=pid_file if os.path.exists(pid_file) else None)
        self.run(journal, plan_of(doc.software))

    def run(self, journal: Journal, plan: Tuple[str, ...], resume: bool = False) -> None:
        """Do the steps of `plan` from the journal's step on (from the first when the journal
        names none of them). `resume`: the journal already names this step (recovery), whose
        journal, report and crash point were done before the crash: only its action runs."""
        first = plan.index(journal.step) if journal.step in plan else 0
        for index, name in enumerate(plan[first:]):
            step = STEP_BY_NAME[name]
            if index > 0 or not resume:
                try:
                    self.enter(journal, step)
                except Exception as err:  # the step never began: the update rolls back from the one before
                    if name in ROLLBACK_PLAN or (index == 0 and not resume):
                        raise  # a rollback's own; or the plan's first, before which nothing has changed
                    self.roll_back(journal, classify(err), str(err))
                    return
            try:
                self.actions[name](journal)
            except Exception as err:  # from the first step on, every failure is the step's to handle
                if self.on_error(journal, step, err):
                    continue
                return

    def enter(self, journal: Journal, step: Step) -> None:
        """Journal, phase report, crash point: the same for every step. The journal of a step
        of the plan is durable before its action (the commit's above all: SUCCEEDED is reported
        only once no restart can roll the update back); a rollback's goes on when the disk is
        full (its renames and scripts need no room, and it is safe to run twice)."""
        journal.step = step.name
        if step.name in ROLLBACK_PLAN:
            self.write_journal_if_possible(journal)
        else:
            self.state.verify()
            self.state.write_journal(journal.to_disk())
        if step.reports:
            self.report(journal.job_id, "IN_PROGRESS", {"phase": step.name, "version": journal.to_version})
        crash_point(step.name)

    def on_error(self, journal: Journal, step: Step, err: Exception) -> bool:
        """What `step` says to do when its action raised `err`; True: the plan goes on."""
        if isinstance(err, Postponed):  # the pre-update script changed nothing: neither does the agent
            self.withdraw(journal)
            raise err
        if step.on_error == ROLL_BACK:
            self.roll_back(journal, classify(err), str(err))
            return False
        if step.on_error == ROLL_FORWARD:
            log.error("job %s: %s failed (%s); the next start finishes it", journal.job_id, step.name, err)
            return False
        if step.name == "roll_back":  # STOP: the rollback failed; both trees stay where they are
            log.critical("ROLLBACK FAILED for job %s: %s. The device needs attention.", journal.job_id, err)
            journal.message = f"{journal.message}; rollback: {err}"
            journal.reason = "ROLLBACK_FAILED"
            return True
        log.critical("job %s: %s failed: %s. The device needs attention.", journal.job_id, step.name, err)
        return False

    def roll_back(self, journal: Journal, reason: str, message: str) -> None:
        """Old tree back in place, its post-update step run, FAILED reported. Never loops: a
        failure here is ROLLBACK_FAILED, logged loudly, and the staged trees are kept."""
        log.warning("job %s: rolling back (%s)", journal.job_id, reason)  # the job's end line says why
        # Past the post-update step the new software may be running; kept in the journal, since
        # a restart in the middle of the rollback no longer sees that step.
        journal.new_started = journal.new_started or journal.step in NEW_SOFTWARE_STARTED
        journal.reason = journal.reason or reason
        journal.message = journal.message or message
        self.run(journal, ROLLBACK_PLAN)

    def write_journal_if_possible(self, journal: Journal) -> None:
        """During a rollback: a full disk must not stop it. The renames and the
        scripts need no room; a journal write that fails leaves the previous step on disk, and
        recovery from it does the same again (every such step is safe to run twice)."""
        try:
            self.state.write_journal(journal.to_disk())
        except OSError as err:
            log.error("cannot write the journal (%s); going on", err)

    def withdraw(self, journal: Journal) -> None:
        """Undo the journal of an update whose pre-update script postponed it: its staging goes
        (the download stays), then the journal."""
        remove_tree(journal.stage)
        self.state.clear_journal()
        fsync_dir(self.state.dir)

    def pre_update_action(self, journal: Journal) -> str:
        """GGC_OTA_ACTION of the pre-update script: postponed-retry once it has said not now."""
        return "postponed-retry" if self.state.postponement(journal.job_id) else "update"

    # ---- the actions of the steps ----------------------------------------------------------------
    def keep(self, journal: Journal) -> None:
        copy_kept(journal.live, journal.new, self.cfg.ota["keep"], SOFTWARE[journal.software].tree)

    def swap(self, journal: Journal) -> None:
        swap_trees(journal)

    def hand_over(self, journal: Journal) -> None:
        """The proven new agent is live: make it the running agent (it commits when it starts).
        Nothing to do when this process is that agent (its recovery resumes here)."""
        installed = os.path.join(journal.live, SOFTWARE[journal.software].entry)
        if not is_tree(installed, self.exe_id):
            self.restart_as(installed)

    def post_update(self, journal: Journal) -> None:
        self.new_began = boot_ticks()
        self.hooks.run(journal.software, "post", journal)

    def health_check(self, journal: Journal) -> None:
        journal.health_check = self.hooks.check_health(journal.software, journal, self.new_began)

    def commit(self, journal: Journal) -> None:
        if not self.state.handled(journal.job_id, journal.execution_number):
            self.finish(self.record_of(journal), "SUCCEEDED", None, version=journal.to_version,
                        extra={"healthCheck": journal.health_check})
        self.clean_up(journal, keep_trees=False)

    def restore(self, journal: Journal) -> None:
        if journal.software == "core" and journal.new_started:
            try:  # stop the new software before its tree goes away
                self.hooks.run("core", "pre", journal, "rollback")
            except OtaError as err:
                log.warning("rollback: stopping the new software failed (%s); restoring anyway", err)
        restore_old(journal)
        crash_point("after_restore")
        self.hooks.run(journal.software, "post", journal, "rollback")

    def close(self, journal: Journal) -> None:
        """FAILED, reported by the agent that runs again: for a self-update, the restored one."""
        installed = os.path.join(journal.live, SOFTWARE["ota_agent"].entry)
        if journal.software == "ota_agent" and journal.reason != "ROLLBACK_FAILED" \
                and not is_tree(installed, self.exe_id):
            try:  # this process runs the new agent: the restored old one reports
                self.restart_as(installed)
            except OtaError as err:
                log.error("could not hand over to the restored agent (%s); reporting from this one", err)
        reason = journal.reason or "INTERNAL_ERROR"
        if not self.state.handled(journal.job_id, journal.execution_number):
            self.finish(self.record_of(journal), "FAILED", reason, journal.message,
                        rolled_back=rolled_back_value(reason, touched=True), changed=True)
        self.clean_up(journal, keep_trees=reason == "ROLLBACK_FAILED")

    def clean_up(self, journal: Journal, keep_trees: bool) -> None:
        """The update is over: its staging goes (or, when the rollback failed, is kept where no
        cleanup reaches, for a person to look at), then the journal, then the download."""
        if keep_trees and os.path.lexists(journal.stage):
            kept = self.keep_aside(journal.job_id)
            log.critical("job %s: the staged trees are kept in %s", journal.job_id, kept)
        remove_tree(journal.stage)
        self.state.clear_journal()
        remove_job_files(self.state, journal.job_id)

    def keep_aside(self, job_id: str) -> str:
        """Move a job's staging to <stateDir>/kept/, where no cleanup reaches; returns where."""
        kept_dir = os.path.join(self.state.dir, "kept")
        os.makedirs(kept_dir, mode=0o700, exist_ok=True)
        kept = os.path.join(kept_dir, f"{job_id}-{int(time.time())}")
        os.rename(State.job_path(self.state.staging, job_id), kept)
        fsync_dir(self.state.staging)
        fsync_dir(kept_dir)
        return kept

    @staticmethod
    def record_of(journal: Journal) -> dict:
        return {"jobId": journal.job_id, "executionNumber": journal.execution_number, "component": journal.software,
                "fromVersion": journal.from_version, "toVersion": journal.to_version, "startedAt": journal.started_at}

    # ---- recovery at start ------------------------------------------------------------------------
    def load_journal(self) -> Optional[Journal]:
        """The update in flight, checked whole (Journal.load); JournalCorrupt when it cannot be
        read or trusted."""
        raw = self.state.journal()
        if raw is None:
            return None
        return Journal.load(raw, self.cfg.root, self.state.staging, self.cfg.ota["corePidFile"])

    def recover(self, journal: Journal) -> None:
        """Finish the update `journal` names, as the steps table says for its step."""
        step = STEP_BY_NAME[journal.step]
        log.warning("recovery: found the journal of job %s at step %s", journal.job_id, journal.step)
        plan = ROLLBACK_PLAN if journal.step in ROLLBACK_PLAN else plan_of(journal.software)
        if step.after_crash == ROLL_FORWARD and (journal.step == "commit" or is_tree(journal.live, journal.new_id)):
            self.run(journal, plan, resume=True)
            return
        if step.after_crash == REPORT:
            self.run(journal, ROLLBACK_PLAN, resume=True)
            return
        journal.recoveries += 1
        if not is_tree(journal.live, journal.live_id):
            # the old tree is not live: whatever the step, the boot before this start may have
            # started the new software from it, which must be stopped before its tree goes
            journal.new_started = True
        self.write_journal_if_possible(journal)
        if journal.recoveries > MAX_RECOVERIES:
            log.critical("ROLLBACK FAILED: recovery of job %s was interrupted %d times; giving up",
                         journal.job_id, journal.recoveries - 1)
            journal.reason, journal.message = "ROLLBACK_FAILED", "recovery kept being interrupted"
            self.run(journal, ROLLBACK_PLAN[1:])
            return
        self.roll_back(journal, "INTERRUPTED", f"the agent stopped during the update (at step {journal.step})")

    def recover_without_journal(self, err: JournalCorrupt) -> None:
        """Nothing is deleted on doubt. With the journal unreadable, which tree is which cannot be
        known: both stay where they are (the staged trees move to <stateDir>/kept/, where no
        cleanup reaches), the live core is started, and each job that was staged ends FAILED
        JOURNAL_CORRUPT, telling where the trees are."""
        aside = self.state.set_aside_journal()
        log.critical("%s; kept as %s. Both trees are left where they are: the device needs a look.", err, aside)
        for name in sorted(os.listdir(self.state.staging)):
            if not valid_job_id(name):
                continue
            kept = self.keep_aside(name)
            software = "ota_agent" if any(os.path.isdir(os.path.join(kept, t, "ota_agent"))
                                          for t in ("new", "old")) else "core"
            if software == "core":
                try:  # whichever core is live, it must run
                    stand_in = Journal(job_id=name, execution_number=1, software="core", step="rolled_back",
                                       live="", stage="", live_id=None)
                    self.hooks.run("core", "post", stand_in, "recovery")
                except OtaError as hook_err:
                    log.error("recovery: starting the live core failed: %s", hook_err)
            record = {"jobId": name, "executionNumber": self.staged_execution(name), "component": software,
                      "startedAt": int(time.time())}
            self.finish(record, "FAILED", "JOURNAL_CORRUPT",
                        f"the update journal was unreadable; the live tree was left as it was and the staged "
                        f"trees were kept in {kept}", rolled_back=rolled_back_value("JOURNAL_CORRUPT", False))

    def staged_execution(self, job_id: str) -> int:
        """The execution number of a job from its last queued status, else 1."""
        try:
            entry = read_json(State.job_path(self.state.outbox, job_id, ".json"))
        except OtaError:
            entry = None
        return 1 if not isinstance(entry, dict) else int(entry.get("executionNumber") or 1)


def remove_job_files(state: State, job_id: str) -> None:
    """A job's staging and download (the finished one and a partial one), and its postponement."""
    state.end_postponement(job_id)
    remove_tree(State.job_path(state.staging, job_id))
    for suffix in (".tar.gz", ".tar.gz.part"):
        path = State.job_path(state.downloads, job_id, suffix)
        if os.path.exists(path):
            os.unlink(path)


# ============================================================================================
# the trial: a self-update's new agent runs from staging, under the old one, with the real
# config, and must prove itself (connect, run ota_post_update.sh, report) before the swap. The
# agent on trial tells the old one how it goes through a file only it writes, trial.json;
# under a journal of format 2 (the first release runs the trial, or is the one tried), through
# the journal's own fields, as format 2 had it.
# ============================================================================================

TRIAL_FILE = "trial.json"
TRIAL_STDERR = "new-agent.stderr"
TRIAL_GRACE_SECONDS = 5.0   # beyond newAgentTimeout, for the agent on trial to say why it gave up
TRIAL_MAX_BYTES = 4096


class TrialReport:
    """The channel from the agent on trial to the agent that runs the trial: what it has done
    (connected, verified) or why it gave up (a reason code and a message)."""

    def __init__(self, state: State, journal: Journal) -> None:
        self.state = state
        self.journal = journal
        self.path = os.path.join(state.dir, TRIAL_FILE)

    def clear(self) -> None:
        if os.path.lexists(self.path):
            os.unlink(self.path)

    def write(self, connected: bool = False, verified: bool = False, reason: Optional[str] = None,
              message: str = "") -> None:
        """The agent on trial's side. Not synced (format 3): a power cut ends the trial anyway,
        and the old agent that restarts rolls back."""
        if self.journal.format >= 3:
            write_json_atomic(self.path, {"jobId": self.journal.job_id, "connected": connected, "verified": verified,
                                          "reason": reason, "message": message}, durable=False)
            return
        raw = self.state.journal()
        if not isinstance(raw, dict) or raw.get("jobId") != self.journal.job_id:
            raise JournalCorrupt("the journal of the trial changed under the agent on trial")
        raw["trialConnected"] = connected
        if verified:
            raw["step"] = "proven"
        if reason:
            raw.update(trialReason=reason, trialMessage=message)
        self.state.write_journal(raw)

    def read(self) -> dict:
        """The old agent's side: {connected, verified, reason, message} as the trial last said,
        every value checked; {} before it has said anything."""
        if self.journal.format >= 3:
            try:
                with open(self.path, "rb") as f:
                    said = json.loads(f.read(TRIAL_MAX_BYTES).decode("utf-8"))
            except (OSError, ValueError):
                return {}
            if not isinstance(said, dict) or said.get("jobId") != self.journal.job_id:
                return {}
        else:
            try:
                raw = self.state.journal()
            except JournalCorrupt:
                return {}
            if not isinstance(raw, dict) or raw.get("jobId") != self.journal.job_id:
                return {}
            said = {"connected": raw.get("trialConnected"), "verified": raw.get("step") == "proven",
                    "reason": raw.get("trialReason"), "message": raw.get("trialMessage")}
        reason = said.get("reason")
        return {"connected": said.get("connected") is True, "verified": said.get("verified") is True,
                "reason": reason if reason in REASONS else None, "message": str(said.get("message") or "")[:1024]}


class TrialRun:
    """The old agent's side of a trial: start the new agent from staging and watch it."""

    def __init__(self, cfg: Config, state: State, argv: List[str], stopping: threading.Event,
                 leave_cloud: Callable[[], None]) -> None:
        self.cfg = cfg
        self.state = state
        self.argv = argv
        self.stopping = stopping
        self.leave_cloud = leave_cloud  # the agent on trial connects with this agent's client id

    def run(self, journal: Journal) -> None:
        """Raise OtaError (NEW_AGENT_CRASHED, NEW_AGENT_NO_CONNECTION, NEW_AGENT_TIMEOUT, or the
        trial's own reason) unless the new agent proved itself."""
        log.info("job %s: trying the new agent from staging", journal.job_id)
        report = TrialReport(self.state, journal)
        report.clear()
        self.leave_cloud()
        child = self.spawn(os.path.join(journal.new, SOFTWARE["ota_agent"].entry), journal)
        try:
            crash_point("trial_started")
            self.watch(child, report)
        finally:
            stop_session(child)
            self.state.mark_lock_holder()
            report.clear()
        log.info("job %s: the new agent proved itself", journal.job_id)

    def spawn(self, new_agent: str, journal: Journal) -> subprocess.Popen:
        import subprocess
        assert self.state.lock_fd is not None
        args = without_options(self.argv, {"--root": True, "--config": True, "--pid-file": True,
                                            "--foreground": False, DAEMON_CHILD_FLAG: False})
        args += ["--root", self.cfg.root, "--config", self.cfg.path, "--foreground"]
        me = os.getpid()
        env = child_environment({TRIAL_ENV: f"{journal.job_id}:{me}:{process_start_time(me)}",
                                 LOCK_FD_ENV: str(self.state.lock_fd)})
        with open(os.path.join(self.state.dir, TRIAL_STDERR), "wb") as stderr:
            return subprocess.Popen(agent_command(new_agent, args), stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=stderr, env=env,
                                    pass_fds=(self.state.lock_fd,), start_new_session=True)

    def watch(self, child: subprocess.Popen, report: TrialReport) -> None:
        """Wait for the agent on trial to exit, having said it was verified."""
        ota = self.cfg.ota
        connect_by = time.monotonic() + float(ota["newAgentTimeout"]) + TRIAL_GRACE_SECONDS
        finish_by: Optional[float] = None
        said: dict = {}
        while child.poll() is None:
            said = report.read() or said
            if self.stopping.is_set():
                raise AgentStopping()
            if said.get("connected") and finish_by is None:  # the script, then a report (as long as a connect)
                finish_by = time.monotonic() + float(ota["scriptTimeout"]) + float(ota["newAgentTimeout"]) \
                    + TRIAL_GRACE_SECONDS
            if finish_by is None and time.monotonic() > connect_by:
                raise OtaError(f"the new agent did not connect within {ota['newAgentTimeout']} s",
                               "NEW_AGENT_NO_CONNECTION")
            if finish_by is not None and time.monotonic() > finish_by:
                raise OtaError("the new agent connected but did not run ota_post_update.sh and report in time",
                               "NEW_AGENT_TIMEOUT")
            time.sleep(0.1)
        said = report.read() or said
        if child.returncode == 0 and said.get("verified"):
            return
        if said.get("reason"):
            raise OtaError(said.get("message") or "the new agent's trial failed", said["reason"])
        when = "after it connected" if said.get("connected") else "before it connected"
        tail = last_line(os.path.join(self.state.dir, TRIAL_STDERR))
        raise OtaError(f"the new agent {describe_exit(child.returncode)} {when}" + (f": {tail}" if tail else ""),
                       "NEW_AGENT_CRASHED")


# ============================================================================================
# preparing an update: everything before anything is touched, the same for an update and for
# the dry-run's rehearsal of one, which differs only in where it works (a scratch directory):
# the platform, the device (scripts, state directory, free space), the artifact (size and
# sha256), the unpack under the same free-space limit, the layout, a new agent's self-test.
# ============================================================================================


def check_device(cfg: Config, doc: UpdateDocument, state: State) -> None:
    """The device can take this update: the scripts (all four, whichever software: a rollback
    may need any of them), the state directory on the root's filesystem, and free space for the
    download, the unpacked tree and the kept state, beyond minFreeBytes."""
    if cfg.managed_respawn:
        for name in ALL_SCRIPTS:
            check_script(os.path.join(cfg.root, "usr", "scripts", name))
    elif SOFTWARE[doc.software].daemon:
        daemon = SOFTWARE[doc.software].daemon
        if not os.access(os.path.join(cfg.root, daemon), os.X_OK):
            raise ScriptInvalid(f"{daemon} is missing or not executable (managedRespawn is false)")
    staging = staging_dir(state)
    if os.stat(staging).st_dev != os.stat(cfg.root).st_dev:
        raise StateDirElsewhere("the state directory is not on the root's filesystem: staging cannot be renamed "
                                "into place")
    kept = sum(tree_size(os.path.join(cfg.root, rel)) for rel in cfg.ota["keep"])
    downloads = state.downloads if os.path.isdir(state.downloads) else staging
    check_free_space([(downloads, doc.size), (staging, 3 * doc.size + kept)], cfg.ota["minFreeBytes"])


def staging_dir(state: State) -> str:
    """Where an update unpacks: the staging directory, or, before the agent first made it (a
    dry-run on a fresh device), the directory it will be made in."""
    return state.staging if os.path.isdir(state.staging) else os.path.dirname(state.dir.rstrip("/"))


def artifact_download(cfg: Config, doc: UpdateDocument, dest: str, **hooks: Any) -> Download:
    """The download of a job's artifact: the CAs (the system's, caPath, extraCaPath), otaAgent's
    read timeout, retries and progress interval. `hooks`: fresh_url, progress, should_stop."""
    ca_files = [cfg.ca_path] + ([cfg.ota["extraCaPath"]] if cfg.ota.get("extraCaPath") else [])
    return Download(url=doc.url, dest=dest, sha256=doc.sha256, size=doc.size, context=https_context(ca_files),
                    read_timeout=cfg.ota["downloadReadTimeout"], retries=cfg.ota["downloadRetries"],
                    progress_interval=cfg.ota["progressInterval"], proxy=cfg.proxy,
                    max_rate=cfg.ota["maxDownloadBytesPerSecond"], **hooks)


def unpack_update(cfg: Config, doc: UpdateDocument, artifact: str, stage: str, state: State) -> str:
    """Unpack the artifact into `stage`/unpacked, within the room the staging's filesystem has
    beyond minFreeBytes (DISK_FULL past it), check its layout, and move the tree it installs to
    `stage`/new. Returns that path."""
    st = os.statvfs(staging_dir(state))
    room = st.f_bavail * st.f_frsize - cfg.ota["minFreeBytes"]
    try:
        unpack(artifact, os.path.join(stage, "unpacked"), max_bytes=max(0, min(MAX_ARCHIVE_BYTES, room)),
               sha256=doc.sha256)
    except ArchiveTooLarge as err:
        if room >= MAX_ARCHIVE_BYTES:
            raise  # the archive's own cap, not the disk: unsafe
        raise DiskFull(f"the artifact unpacks to more than the {max(0, room)} bytes free "
                       f"(beyond minFreeBytes): {err}") from None
    new = os.path.join(stage, "new")
    os.rename(check_layout(os.path.join(stage, "unpacked"), doc.software), new)
    return new


def try_new_tree(cfg: Config, doc: UpdateDocument, new: str) -> int:
    """A new agent must run from `new` before anything is touched (NEW_AGENT_BROKEN). Returns
    the journal format the update is written in: the one both agents read."""
    if doc.software != "ota_agent":
        return JOURNAL_FORMAT
    return self_test(os.path.join(new, SOFTWARE["ota_agent"].entry), cfg.root, cfg.path)


def tree_size(path: str) -> int:
    total = 0
    for dirpath, _, files in walk_tree(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total


# ============================================================================================
# the cloud side: on every connect and every notify it lists the pending executions with
# `get`, describes them, finishes an IN_PROGRESS one of its own and takes its queued jobs one
# at a time, oldest first. A job whose document has no softwareToUpdate is never touched. A
# (jobId, executionNumber) already handled is never run again. Every status goes through the
# outbox on disk, so none is lost while offline or across a crash. The MQTT transport is
# passed in (a real seam: tests give it a fake one).
# ============================================================================================

CONTROL_CHAR = re.compile(r"[\x00-\x1f\x7f-\x9f]")
DETAILS_KEY = re.compile(r"[a-zA-Z0-9:_-]+")  # used with fullmatch
UNDELIVERABLE = ("InvalidStateTransition", "TerminalStateReached", "ResourceNotFound", "InvalidRequest")
RESYNC_SECONDS = 3600.0     # list the jobs again about this often (+-25%) even without a notification
RETRY_FIRST_SECONDS, RETRY_MAX_SECONDS = 2.0, 60.0


STEP_TIMER_SLACK_SECONDS = 60.0  # beyond what a phase may take: its step timer's margin
STEP_TIMER_MAX_MINUTES = 10080     # AWS's limits for stepTimeoutInMinutes: 1..10080
UNPACK_SLOW_BYTES_PER_SECOND = 1024 * 1024


def step_timer_minutes(ota: Dict[str, Any], phase: str, remaining_bytes: int = 0) -> int:
    """stepTimeoutInMinutes for an IN_PROGRESS update that starts `phase`: how long the phase
    may take (a download from its remaining bytes at slowLinkBytesPerSecond; a script from
    scriptTimeout; a trial from newAgentTimeout; a health check from healthCheckTimeout), plus a
    margin. Should the device die or lose its link, the execution ends TIMED_OUT by then."""
    script, trial = float(ota["scriptTimeout"]), float(ota["newAgentTimeout"])
    link = max(1, ota["slowLinkBytesPerSecond"] or 1)
    if ota.get("maxDownloadBytesPerSecond"):  # a cap slower than the slow link sizes the timer
        link = max(1, min(link, ota["maxDownloadBytesPerSecond"]))
    seconds = {
        "checking": remaining_bytes / link, "download": remaining_bytes / link,
        "unpack": remaining_bytes / UNPACK_SLOW_BYTES_PER_SECOND + script,  # the pre-update script follows
        "pre_update": script, "post_update": script,
        "new_agent_trial": 2 * trial + script, "new_agent_verified": 2 * trial,  # then the hand-over
        "health_check": float(ota["healthCheckTimeout"]) + float(ota["healthCheckSeconds"]),
        "postponed": float(ota["postponeSeconds"]) + script,  # then the script runs again
    }.get(phase, 600.0)
    minutes = -(-(seconds + STEP_TIMER_SLACK_SECONDS) // 60)
    return int(min(STEP_TIMER_MAX_MINUTES, max(1, minutes)))


def clean_details(details: Dict[str, Any]) -> Dict[str, str]:
    """statusDetails AWS accepts: keys [a-zA-Z0-9:_-]+, values 1..1024 chars, no control chars."""
    out = {}
    for key, value in details.items():
        if value is None or not DETAILS_KEY.fullmatch(key):
            continue
        text = redact(CONTROL_CHAR.sub(" ", str(value))).strip()[:1024]
        if text:
            out[key] = text
    return out


def log_job_end(record: dict, result: str, reason: Optional[str], message: str, rolled_back: Optional[str]) -> None:
    """The one line of a job's end: its id, software, versions, result (and reason, rollback and
    message), and how long it took. INFO for SUCCEEDED, ERROR otherwise; logged whatever the level."""
    took = max(0.0, time.time() - float(record.get("startedAt") or time.time()))
    what = f"{record.get('component') or 'software'} {record.get('fromVersion') or '?'} -> " \
           f"{record.get('toVersion') or '?'}"
    if result == "SUCCEEDED":
        log_event("job %s: SUCCEEDED (%s, %.0f s)", record["jobId"], what, took)
        return
    rolled = {"true": ", rolled back", "false": ", nothing rolled back"}.get(rolled_back or "", "")
    log.error("job %s: %s %s (%s%s, %.0f s): %s", record["jobId"], result, reason, what, rolled, took, message)
    if log.getEffectiveLevel() > logging.ERROR:
        log_event("job %s: %s %s (%s%s, %.0f s): %s", record["jobId"], result, reason, what, rolled, took, message)


class Cloud:
    """The link to AWS IoT Jobs: the event loop, the outbox, the intake of jobs. `transport`
    makes the MQTT client: (on_message, on_connect) -> an object with MqttClient's methods."""

    def __init__(self, cfg: Config, state: State,
                 transport: Optional[Callable[[Callable[[str, bytes], None], Callable[[], None]], Any]] = None,
                 rng: Optional[random.Random] = None) -> None:
        self.cfg = cfg
        self.state = state
        self.transport = transport or (lambda on_message, on_connect: MqttClient(mqtt_settings(cfg), on_message,
                                                                                 on_connect))
        self.rng = rng or random.Random()
        self.events: queue.Queue = queue.Queue()  # (kind, payload) pairs for the main loop
        self.stopping = threading.Event()
        self.notified = threading.Event()  # a notify arrived and the loop has not synced since
        self.notified_jobs: Optional[set] = None  # the (jobId, executionNumber) pairs of the latest notify
        self.deliver_after = 0.0  # monotonic time before which no status is sent (the cloud throttled)
        self.deliver_failures = 0
        self.current_since: Tuple[Optional[str], int] = (None, 0)  # the job in flight, since when
        self.mqtt: Optional[Any] = None
        self.jobs: Optional[JobsClient] = None
        self.subscribed = False
        self.not_ours: set = set()
        self.current: Optional[str] = None
        self.current_canceled = threading.Event()
        self.unsaved: Dict[str, dict] = {}  # statuses the disk could not take
        self.on_listed: Optional[Callable[[set], None]] = None  # given the job ids pending, at each listing
        self.postponed_until: Optional[float] = None  # wall time when a postponed job is due

    # ---- the connection -------------------------------------------------------------------------
    def connect(self) -> None:
        self.mqtt = self.transport(self.on_message, self.on_connect)
        self.jobs = JobsClient(self.mqtt, self.cfg.thing_name, on_notify=self.on_notify)
        self.subscribed = False
        self.mqtt.start()

    def disconnect(self) -> None:
        """Leave the cloud: a new agent on trial connects with the same client id, and AWS IoT
        drops the older of two connections that share one."""
        if self.mqtt is not None:
            self.mqtt.stop()
        self.subscribed = False

    def reconnect_if_left(self) -> None:
        if self.mqtt is None or self.mqtt.stopped:
            self.connect()

    def stop(self) -> None:
        self.stopping.set()
        self.events.put(("stop", None))
        if self.jobs is not None:
            self.jobs.interrupt()
        if self.mqtt is not None:
            self.mqtt.interrupt()

    # ---- callbacks from the MQTT network thread: never block ----------------------------------
    def on_connect(self) -> None:
        self.events.put(("connected", None))

    def on_message(self, topic: str, payload: bytes) -> None:
        if self.jobs is not None:
            self.jobs.handle(topic, payload)

    def on_notify(self, payload: dict) -> None:
        jobs = payload.get("jobs") if isinstance(payload.get("jobs"), dict) else {}
        summaries = [j for items in jobs.values() if isinstance(items, list) for j in items
                     if isinstance(j, dict) and valid_job_id(j.get("jobId"))
                     and valid_execution_number(j.get("executionNumber", 1))]
        pending = {j.get("jobId") for j in summaries}
        self.notified_jobs = {(j.get("jobId"), j.get("executionNumber")) for j in summaries}
        if self.current is not None and self.current not in pending:
            self.current_canceled.set()  # confirmed by describing the job before acting on it
        if not self.notified.is_set():  # a flood of notifications is one pending flag, not a queue
            self.notified.set()
            self.events.put(("notify", None))

    # ---- the loop ---------------------------------------------------------------------------------
    def loop(self, process: Callable[[dict], None]) -> None:
        """Wait for an event: connected (subscribe, deliver, sync), notify (sync, unless it names
        only jobs already handled), and on a timer a resync (about hourly), or, while a status
        waits in the outbox (the cloud throttled it), a delivery attempt with backoff. After a
        request failed, a notify does not cut the backoff short: it makes the sync at its end.
        `process(execution)` takes one job."""
        next_wake = time.monotonic() + self.resync_interval()
        wait_again = RETRY_FIRST_SECONDS
        backoff_until = 0.0  # after a failed request: until then, a notify only marks a sync as due
        sync_due = False
        while not self.stopping.is_set():
            try:
                kind, _ = self.events.get(timeout=max(0.1, next_wake - time.monotonic()))
            except queue.Empty:
                kind = "resync" if sync_due or not self.undelivered() else "deliver"
            if kind == "check":
                backoff_until, sync_due = 0.0, False  # an operator's check cuts any backoff short
            if kind == "notify" and time.monotonic() < backoff_until:
                sync_due = True  # the backoff holds for every request, whatever wakes the loop
                continue
            try:
                self.handle_event(kind, process)
                if kind in ("connected", "notify", "resync", "deliver", "check"):
                    if self.undelivered():
                        next_wake = max(time.monotonic() + wait_again, self.deliver_after)
                        wait_again = min(wait_again * 2, RETRY_MAX_SECONDS)
                    else:
                        next_wake = time.monotonic() + self.resync_interval()
                        wait_again = RETRY_FIRST_SECONDS
                backoff_until, sync_due = 0.0, False  # a success ends the backoff (a due sync ran: connected, resync)
                if self.postponed_until is not None:  # a postponed job is due then: a sync at that time
                    sync_due = True
                    next_wake = min(next_wake, time.monotonic() + max(0.1, self.postponed_until - time.time()))
            except AgentStopping:
                break
            except Exception as err:  # transient: a request or its reply was lost; else a bug
                if REASONS[classify(err)].transient:
                    log.warning("talking to the cloud failed: %s; trying again in %.0f s", err, wait_again)
                else:
                    log.exception("unexpected error; trying again in %.0f s", wait_again)
                next_wake = time.monotonic() + wait_again
                wait_again = min(wait_again * 2, RETRY_MAX_SECONDS)
                backoff_until = next_wake

    def check_now(self) -> None:
        """An operator asks (SIGUSR1, `ggc-ota --check-now`): list the jobs now, whatever backoff
        runs; connect now if the link is down."""
        self.events.put(("check", None))

    def handle_event(self, kind: str, process: Callable[[dict], None]) -> None:
        if kind == "check":
            self.check_on_demand(process)
        elif kind == "connected":
            self.on_connected(process)
        elif kind == "notify" and self.nothing_new(self.notified_jobs):
            self.notified.clear()
            self.flush_outbox()
        elif kind in ("notify", "resync"):
            self.notified.clear()
            self.flush_outbox()
            self.sync(process)
        elif kind == "deliver":
            self.flush_outbox()

    def check_on_demand(self, process: Callable[[dict], None]) -> None:
        """What an operator's check does, said in the log."""
        if self.mqtt is None or not self.mqtt.connected:
            error = getattr(self.mqtt, "last_error", None)
            log.warning("check on demand: not connected%s; connecting now", f" ({error})" if error else "")
            if self.mqtt is not None:
                self.mqtt.retry_now()
            return
        log.info("check on demand: delivering waiting statuses and listing the jobs now")
        self.deliver_after = 0.0
        self.on_connected(process)  # subscribes first if it has not yet
        log.info("check on demand: done")

    def resync_interval(self) -> float:
        """About RESYNC_SECONDS, spread (+-25%) so that a fleet that connected together does not
        list its jobs together ever after."""
        return RESYNC_SECONDS * self.rng.uniform(0.75, 1.25)

    def undelivered(self) -> bool:
        """A status waits in the outbox (on disk or, the disk full, in memory)."""
        return bool(self.unsaved) or bool(self.state.pending_statuses())

    def nothing_new(self, keys: Optional[set]) -> bool:
        """True when a notify's pending list names only executions this agent has handled or
        left alone: listing the jobs again would tell nothing (a rollout's own IN_PROGRESS and
        SUCCEEDED notifications, for one)."""
        return keys is not None and all(key in self.not_ours or self.state.handled(*key) for key in keys)

    def on_connected(self, process: Callable[[dict], None]) -> None:
        assert self.jobs is not None
        if not self.subscribed:
            self.jobs.subscribe()
            self.subscribed = True
        self.flush_outbox()
        self.sync(process)

    # ---- statuses: the outbox -------------------------------------------------------------------
    def report(self, job_id: str, status: str, details: Dict[str, Any], remaining_bytes: int = 0) -> None:
        """Queue the status on disk and try to send it; an update never waits on the cloud. When
        the disk cannot take it (full), the status is kept in memory and sent all the same. An
        IN_PROGRESS status carries the step timer of its phase (`remaining_bytes`: of a download)."""
        entry: Dict[str, Any] = {"jobId": job_id, "status": status, "statusDetails": clean_details(details),
                                 "at": time.time()}
        if status == "IN_PROGRESS":
            entry["stepTimeoutInMinutes"] = step_timer_minutes(self.cfg.ota, str(details.get("phase")),
                                                               remaining_bytes)
            self.note_in_flight(job_id, entry["statusDetails"])
        try:
            self.state.queue_status(entry)
            self.unsaved.pop(job_id, None)
        except OSError as err:
            log.error("cannot write the status of job %s to disk (%s); keeping it in memory", job_id, err)
            self.unsaved[job_id] = entry
        try:
            self.flush_outbox()
        except MqttError:
            pass  # kept; the main loop retries

    def finish(self, record: dict, result: str, reason: Optional[str], message: str = "",
               rolled_back: Optional[str] = None, version: Optional[str] = None,
               extra: Optional[Dict[str, Any]] = None, changed: Optional[bool] = None) -> None:
        """A job ends: its status (with reason, message, rolledBack or version, and `extra`
        details) and its record in the history. `changed` (statusDetails.changed) tells a
        rolledBack "false" that means "nothing was touched" (False) from one that means "the
        rollback failed" (True)."""
        details: Dict[str, Any] = {"reason": reason, "message": message, "rolledBack": rolled_back,
                                   "version": version, **(extra or {}),
                                   "changed": None if changed is None else str(changed).lower()}
        self.report(record["jobId"], result, details)
        record.update(result=result, reason=reason, finishedAt=int(time.time()))
        if message:
            record["message"] = redact(message)[:1024]
        self.state.add_history(record)
        log_job_end(record, result, reason, message, rolled_back)

    def note_in_flight(self, job_id: str, details: Dict[str, str]) -> None:
        """<stateDir>/current.json: the job in flight and its latest phase, for --status (not
        fsynced: it is for a person's eyes, and a power cut that loses it loses nothing)."""
        if self.current_since[0] != job_id:
            self.current_since = (job_id, int(time.time()))
        try:
            write_json_atomic(self.state.current_path, {"jobId": job_id, "since": self.current_since[1], **details},
                              durable=False)
        except OSError:
            pass

    def flush_outbox(self) -> None:
        """Send the statuses waiting in the outbox (the latest of each job). After the cloud
        throttled one beyond the Jobs client's own retries, nothing is sent before the backoff
        ends (`deliver_after`): a newer status of the same job waits on disk, and the main loop
        delivers it then."""
        if self.jobs is None or self.mqtt is None or not self.mqtt.connected or not self.subscribed:
            return
        if time.monotonic() < self.deliver_after:
            return
        for entry in self.state.pending_statuses() + list(self.unsaved.values()):
            try:
                step = entry.get("stepTimeoutInMinutes")
                self.jobs.update(entry["jobId"], entry["status"], entry.get("statusDetails") or None,
                                 step_timeout_minutes=step if isinstance(step, int) and not isinstance(step, bool)
                                 else None)
            except JobsRejected as err:
                if err.code in UNDELIVERABLE:
                    log.warning("status %s of job %s can never be delivered (%s); dropping it",
                                entry["status"], entry["jobId"], err.code)
                elif REASONS[err.reason].transient:
                    delay = retry_delay(self.deliver_failures, RETRY_FIRST_SECONDS, RETRY_MAX_SECONDS, self.rng)
                    self.deliver_failures += 1
                    self.deliver_after = time.monotonic() + delay
                    log.warning("status %s of job %s not accepted (%s); kept, and sent again in %.0f s",
                                entry["status"], entry["jobId"], err.code, delay)
                    return
                else:
                    log.warning("status %s of job %s not accepted yet (%s); kept for later",
                                entry["status"], entry["jobId"], err.code)
                    continue
            except MqttError as err:
                log.info("status %s of job %s kept on disk until it can be delivered (%s)",
                         entry["status"], entry["jobId"], err)
                raise
            self.deliver_failures = 0
            if self.unsaved.get(entry["jobId"]) is entry:
                del self.unsaved[entry["jobId"]]
            else:
                self.state.status_sent(entry)

    # ---- intake ----------------------------------------------------------------------------------
    def sync(self, process: Callable[[dict], None]) -> None:
        """Take this thing's Greengrass update jobs, one at a time, oldest first."""
        assert self.jobs is not None and self.mqtt is not None
        while not self.stopping.is_set() and self.mqtt.connected:
            in_progress, queued = self.jobs.list_pending()
            if self.on_listed is not None:
                self.on_listed({summary["jobId"] for summary in in_progress + queued})
            execution = self.next_job(in_progress + queued)
            if execution is None:
                return
            process(execution)
            release_free_memory()

    def next_job(self, summaries: List[dict]) -> Optional[dict]:
        assert self.jobs is not None
        skipped: List[str] = []
        self.postponed_until = None
        for summary in summaries:
            key = (summary["jobId"], summary.get("executionNumber", 1))
            if key in self.not_ours or self.state.handled(*key):
                continue
            waits = self.state.postponement(key[0])
            if waits is not None and waits.get("executionNumber") == key[1] and waits["retryAt"] > time.time():
                self.postponed_until = float(waits["retryAt"])  # the loop wakes then; nothing overtakes it
                log.debug("job %s is postponed until %s", key[0], time.strftime("%H:%M:%SZ", time.gmtime(
                    self.postponed_until)))
                return None
            try:
                execution = self.jobs.describe(summary["jobId"])
            except JobsRejected as err:
                if err.code != UNREADABLE_REPLY:
                    raise
                # one job the cloud describes oddly must not hold up the ones behind it
                log.warning("job %s: %s; taking the next job, and this one again later", key[0], err)
                skipped.append(key[0])
                continue
            if execution is None:
                continue
            document = execution.get("jobDocument")
            if not isinstance(document, dict) or "softwareToUpdate" not in document:
                log.info("leaving job %s alone: it is not a Greengrass software update", key[0])
                self.not_ours.add(key)
                continue
            return execution
        if skipped:  # the main loop's backoff asks again (2 s, then up to a minute)
            raise MqttError(f"the description of job {', '.join(skipped)[:200]} could not be used")
        return None

    def fresh_url(self, job_id: str) -> str:
        assert self.jobs is not None
        execution = self.jobs.describe(job_id)
        if execution is None:
            raise JobCanceled(f"job {job_id} ended in the cloud")
        return parse_document(execution.get("jobDocument")).url

    def ensure_not_canceled(self, job_id: str) -> None:
        assert self.jobs is not None
        if self.jobs.describe(job_id) is None:
            raise JobCanceled(f"job {job_id} was canceled (or ended) in the cloud")
        self.current_canceled.clear()


def release_free_memory() -> None:
    """Hand memory freed since start-up (compiling this module) or by a finished job back to
    the system: glibc keeps freed heap pages in the process otherwise. Nothing elsewhere."""
    trim = libc_function("malloc_trim")
    if trim is not None:
        trim(0)


# ============================================================================================
# the agent: one process that holds the lock, finishes at start what a crash interrupted, and
# then takes jobs from the cloud one at a time: it prepares each (nothing touched) and hands
# it to the engine. As the new agent on trial it proves itself instead, and exits.
# ============================================================================================


def version_key(version: str) -> tuple:
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"[.+-]", version))


def installed_core_version(root: str) -> Optional[str]:
    try:
        names = [n for n in os.listdir(os.path.join(root, "ggc", "packages")) if VERSION_TEXT.fullmatch(n)]
    except OSError:
        return None
    return max(names, key=version_key) if names else None


class Agent:
    def __init__(self, cfg: Config, argv: List[str], base_level: str, pid_file: Optional[str] = None,
                 daemon: bool = False, transport: Optional[Callable[..., Any]] = None) -> None:
        self.cfg = cfg
        self.pid_file = pid_file
        self.daemon = daemon  # started by `ggc-ota` without --foreground: the PID file names this agent
        self.argv = argv
        self.base_level = base_level
        self.state = State(cfg.ota["stateDir"])
        self.cloud = Cloud(cfg, self.state, transport)
        self.trial_run = TrialRun(cfg, self.state, argv, self.cloud.stopping, self.cloud.disconnect)
        self.engine = Engine(cfg, self.state, self.cloud.report, self.cloud.finish, self.trial_run.run,
                             self.restart_as)
        self.active_download: Optional[Download] = None
        self.cloud.on_listed = self.forget_ended_downloads
        self.trial: Optional[Journal] = None           # this process is a new agent on trial (its journal)
        self.in_place_trial: Optional[Journal] = None  # the same, exec'd in place by an agent of format 1

    # ---- life cycle ----------------------------------------------------------------------------
    def start(self) -> None:
        self.state.ensure()
        self.state.lock(wait=LOCK_WAIT_SECONDS, stopping=self.cloud.stopping)
        for warning in self.cfg.warnings:
            log.warning("config: %s", warning)
        log.info("ggc-ota %s starting for %s (root %s, client id %s%s)", __version__, self.cfg.thing_name,
                 self.cfg.root, self.cfg.client_id,
                 f", through the proxy {self.cfg.proxy.shown()}" if self.cfg.proxy else "")
        if self.pid_file:
            write_pid(self.pid_file)  # systemd's Type=forking waits for this
        if not os.environ.get(TRIAL_ENV):  # what a crash left: the job in flight, a trial's news
            for path in (self.state.current_path, os.path.join(self.state.dir, TRIAL_FILE)):
                if os.path.lexists(path):
                    os.unlink(path)
        self.recover()

    def run(self) -> int:
        try:
            self.start()
            if self.trial is not None:
                return self.prove_new_agent(self.trial)
            self.cloud.connect()
            release_free_memory()
            if self.in_place_trial is not None:
                self.finish_self_update(self.in_place_trial)
            self.cloud.loop(self.process)
        except AgentReplaced as replaced:
            log.info("%s", replaced)
            return replaced.code
        except AgentStopping:  # told to stop before it ran (waiting for the lock)
            log.info("ggc-ota stopping before it started")
            return EXIT_OK
        log.info("ggc-ota stopping")
        self.cloud.disconnect()
        self.remove_pid_file()
        return EXIT_OK

    def remove_pid_file(self) -> None:
        """A clean stop leaves no PID file behind (a hand-over leaves its successor's)."""
        if self.pid_file and os.path.lexists(self.pid_file):
            try:
                os.unlink(self.pid_file)
            except OSError as err:
                log.warning("could not remove the PID file %s: %s", self.pid_file, err)

    def check_now(self) -> None:
        """SIGUSR1: list the jobs now (Cloud.check_now)."""
        self.cloud.check_now()

    def stop(self) -> None:
        """SIGTERM: stop soon. A download stops at once (its partial file is kept for the resume);
        a script or a swap in progress finishes first (each is bounded)."""
        self.cloud.stopping.set()
        download = self.active_download
        if download is not None:
            download.abort()
        self.cloud.stop()

    # ---- recovery at start ----------------------------------------------------------------------
    def recover(self) -> None:
        """At start: finish whatever update a crash interrupted, as the steps table says."""
        try:
            journal = self.engine.load_journal()
        except JournalCorrupt as err:
            self.engine.recover_without_journal(err)
            return
        if journal is None:
            for name in os.listdir(self.state.staging):  # staging of an update that never started
                remove_tree(os.path.join(self.state.staging, name))
            self.remove_finished_downloads()
            return
        if journal.step == "new_agent_trial" and is_trial_of(journal.job_id):
            self.trial = journal  # this process is the new agent the old one is trying
            return
        if journal.format == 1 and journal.software == "ota_agent" and journal.step == "hand_over":
            self.recover_in_place_trial(journal)
            return
        self.engine.recover(journal)

    def remove_finished_downloads(self) -> None:
        """An update's last step removes its download without a sync (a sync per file at the end
        of every update is flash wear for nothing), so a power cut right after it can bring the
        file back: at start, the download of a job the history says has ended goes."""
        ended = {h.get("jobId") for h in self.state.history() if h.get("result") in TERMINAL_RESULTS}
        for job_id, path in self.state.downloads_by_job():
            if job_id in ended:
                log.info("removing the download of job %s, which has ended", job_id)
                os.unlink(path)

    def forget_ended_downloads(self, pending: set) -> None:
        """A download (whole or partial) of a job the cloud no longer lists as pending goes: the
        job ended there (TIMED_OUT by its step timer while this agent was away, canceled,
        removed). A retried execution of it is pending again, and keeps its download."""
        if self.state.has_journal():
            return  # the update in flight keeps its files until it ends
        for job_id, path in self.state.downloads_by_job():
            if job_id not in pending:
                log.info("job %s is no longer pending in the cloud (timed out, canceled or removed): removing its "
                         "download", job_id)
                os.unlink(path)

    def recover_in_place_trial(self, journal: Journal) -> None:
        """A journal of format 1: the previous agent swapped the new agent in and exec'd it, so
        this process is that new agent, unproven. It proves itself in place (finish_self_update);
        after MAX_TRIAL_STARTS starts that never got that far, it rolls back."""
        if not is_tree(journal.live, journal.new_id):
            self.engine.roll_back(journal, "INTERRUPTED", "the agent stopped during the update (at step swapped)")
            return
        journal.starts += 1
        self.state.write_journal(journal.to_disk())
        if journal.starts > MAX_TRIAL_STARTS:
            self.engine.roll_back(journal, "NEW_AGENT_CRASHED",
                                  f"the new agent stopped {journal.starts - 1} times before it was confirmed")
            return
        self.in_place_trial = journal

    def finish_self_update(self, journal: Journal) -> None:
        """Format 1: this is the new agent on trial in place: it must connect, then
        ota_post_update.sh must pass."""
        assert self.cloud.mqtt is not None
        timeout = float(self.cfg.ota["newAgentTimeout"])
        if not self.cloud.mqtt.wait_connected(timeout):
            self.engine.roll_back(journal, "NEW_AGENT_NO_CONNECTION",
                                  f"the new agent did not connect within {timeout:.0f} s")
            return
        try:
            self.engine.hooks.run("ota_agent", "post", journal)
        except OtaError as err:
            self.engine.roll_back(journal, err.reason, str(err))
            return
        self.engine.run(journal, ("commit",))
        self.in_place_trial = None

    # ---- one job --------------------------------------------------------------------------------
    def process(self, execution: dict) -> None:
        """Take one job: prepare it (nothing touched), then let the engine run its plan. How a
        failure before the journal ends the job is REASONS' to say (classify)."""
        cloud = self.cloud
        job_id, number = execution["jobId"], execution.get("executionNumber", 1)
        record: Dict[str, Any] = {"jobId": job_id, "executionNumber": number, "startedAt": int(time.time())}
        cloud.current = job_id
        cloud.current_canceled.clear()
        log_event("job %s: starting", job_id)
        postponed = False
        try:
            doc = parse_document(execution.get("jobDocument"))
            record.update(component=doc.software, toVersion=doc.version, fromVersion=self.installed(doc.software))
            set_job_log_level(doc.log_level, self.base_level)
            if doc.version == record["fromVersion"] and not self.cfg.ota["reinstallSameVersion"]:
                check_platform(doc, *detect_platform(self.cfg.ota))  # another platform's job is REJECTED even so
                self.already_installed(record, doc)
            else:
                stage, journal_format = self.prepare(job_id, doc)
                self.engine.begin(job_id, number, doc, stage, record, journal_format)
                if doc.software == "ota_agent":
                    cloud.reconnect_if_left()  # the trial failed: this agent goes on
        except Postponed as err:
            postponed = self.postpone(record, doc, err)
        except (Exception, AgentStopping) as err:
            self.end_before_journal(job_id, record, err)
        finally:
            cloud.current = None
            set_log_level(self.base_level)
            if os.path.lexists(self.state.current_path) and not postponed:
                os.unlink(self.state.current_path)
        if not self.state.has_journal() and not postponed:
            remove_job_files(self.state, job_id)

    def already_installed(self, record: dict, doc: UpdateDocument) -> None:
        """A job for the version installed: SUCCEEDED at once, with nothing downloaded, stopped
        or run (a fleet-wide job must not restart the cores already there). reinstallSameVersion
        installs it again instead, to repair a tree."""
        message = f"{doc.software} {doc.version} is installed already; nothing was done " \
                  "(otaAgent.reinstallSameVersion installs it again)"
        log_event("job %s: %s", record["jobId"], message)
        self.cloud.finish(record, "SUCCEEDED", None, message, version=doc.version, changed=False,
                          extra={"alreadyInstalled": "true"})

    def postpone(self, record: dict, doc: UpdateDocument, err: Postponed) -> bool:
        """A pre-update script said not now: nothing was changed (the engine withdrew the journal
        and the staging); the download and the count are kept, IN_PROGRESS `postponed` reported,
        and the job taken again after postponeSeconds. Past postponeLimit: FAILED
        POSTPONED_TOO_LONG. Returns whether the job waits (False: it ended)."""
        job_id, number = record["jobId"], record["executionNumber"]
        earlier = self.state.postponement(job_id)
        count = (earlier["count"] if earlier and earlier.get("executionNumber") == number else 0) + 1
        limit = self.cfg.ota["postponeLimit"]
        if count > limit:
            remove_job_files(self.state, job_id)
            self.cloud.finish(record, "FAILED", "POSTPONED_TOO_LONG", f"{err}, {count} times in a row (postponeLimit "
                              f"{limit})", rolled_back=rolled_back_value("POSTPONED_TOO_LONG", touched=False),
                              changed=False)
            return False
        retry_at = time.time() + float(self.cfg.ota["postponeSeconds"])
        self.state.postpone(job_id, number, count, retry_at)
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(retry_at))
        log_event("job %s: postponed: %s (%d of at most %d); trying again at %s", job_id, err, count, limit, when)
        self.cloud.report(job_id, "IN_PROGRESS", {"phase": "postponed", "postponements": count, "retryAt": when,
                                                  "version": doc.version})
        return True

    def end_before_journal(self, job_id: str, record: dict, err: BaseException) -> None:
        """A job failed before its journal was written (nothing in the root changed): end it as
        REASONS says for its reason, or, transient, leave it IN_PROGRESS for the next sync."""
        code = classify(err)
        reason = REASONS[code]
        if code == "STOPPING":
            log.info("job %s: stopping; the download resumes at the next start", job_id)
            raise err
        if reason.transient:
            # The link, a lost reply, throttling: nothing is changed yet and nothing is reported;
            # the job stays IN_PROGRESS, and the next sync takes it up again (the download resumes).
            log.warning("job %s: %s; the job is taken up again when the cloud answers", job_id, err)
            raise MqttError(str(err)) from None
        if code == "CANCELED":
            log.warning("job %s abandoned: %s", job_id, err)
            record.update(result="CANCELED", reason=code, finishedAt=int(time.time()))
            self.state.add_history(record)
            return
        if code == "INTERNAL_ERROR" and not isinstance(err, (OtaError, OSError)):
            log.error("job %s failed on an unexpected error", job_id, exc_info=err)  # the traceback, once
            message = f"{type(err).__name__}: {err}"
        else:  # said once, by the job's end line
            message = str(err) if code != "JOBS_REJECTED" else f"the cloud refused a request: {err}"
        if not self.state.has_journal():
            remove_job_files(self.state, job_id)  # first: on a full disk this frees the room to report
        self.cloud.finish(record, reason.status, code, message, rolled_back=None if reason.status == "REJECTED"
                          else rolled_back_value(code, touched=False), changed=False)

    def prepare(self, job_id: str, doc: UpdateDocument) -> Tuple[str, int]:
        """Everything before anything is touched: the checks, the download, the unpack, the
        layout, a new agent's self-test. Returns the job's staging and its journal format."""
        warning = check_platform(doc, *detect_platform(self.cfg.ota))
        if warning:
            log.warning("job %s: %s", job_id, warning)
        self.phase(job_id, "checking", doc)
        check_device(self.cfg, doc, self.state)
        self.state.verify()  # again before each use: the download, the unpack, every step's journal
        artifact = self.download(job_id, doc)
        self.phase(job_id, "unpack", doc)
        self.state.verify()
        stage = State.job_path(self.state.staging, job_id)
        remove_tree(stage)
        os.makedirs(stage)
        unpack_update(self.cfg, doc, artifact, stage, self.state)
        # the job's staging directory and the new tree's name in it, durable before the journal
        # names them: where a directory sync persists only that directory (POSIX's letter), the
        # old tree would land after the swap in a directory no durable name leads to
        fsync_dir(stage)
        fsync_dir(self.state.staging)
        self.cloud.ensure_not_canceled(job_id)
        return stage, try_new_tree(self.cfg, doc, os.path.join(stage, "new"))

    def phase(self, job_id: str, name: str, doc: UpdateDocument, **details: Any) -> None:
        """A phase before the journal: reported (its step timer sized to the artifact), then its
        crash point."""
        self.cloud.report(job_id, "IN_PROGRESS", {"phase": name, **details, "version": doc.version},
                          remaining_bytes=doc.size)
        crash_point(name)

    def installed(self, software: str) -> Optional[str]:
        return installed_core_version(self.cfg.root) if software == "core" else __version__

    def download(self, job_id: str, doc: UpdateDocument) -> str:
        dest = State.job_path(self.state.downloads, job_id, ".tar.gz")
        if os.path.exists(dest) and sha256_of_file(dest)[0].hexdigest() == doc.sha256:
            log.info("job %s: the artifact was downloaded before", job_id)
            crash_point("download")
            return dest

        quarters = [-1]  # the last quarter logged at INFO

        def progress(done: int, total: int) -> None:
            percent = done * 100 // total
            quarter = percent // 25
            level = logging.INFO if quarter != quarters[0] else logging.DEBUG  # INFO every 25%: logd's ring is small
            quarters[0] = quarter
            log.log(level, "job %s: downloaded %d of %d bytes (%d%%)", job_id, done, total, percent)
            self.cloud.report(job_id, "IN_PROGRESS", {"phase": "download", "progress": f"{percent}%",
                                                      "bytes": f"{done}/{total}", "version": doc.version},
                              remaining_bytes=total - done)

        def should_stop() -> bool:
            if self.cloud.stopping.is_set():
                raise AgentStopping()
            if self.cloud.current_canceled.is_set():
                self.cloud.ensure_not_canceled(job_id)  # raises JobCanceled when the cloud ended the job
            return False

        log.info("job %s: downloading %s (%d bytes)", job_id, redact_url(doc.url), doc.size)
        crash_point("download")
        self.active_download = artifact_download(self.cfg, doc, dest, fresh_url=lambda: self.cloud.fresh_url(job_id),
                                                 progress=progress, should_stop=should_stop)
        try:
            if self.cloud.stopping.is_set():
                raise AgentStopping()
            self.active_download.run()
        finally:
            self.active_download = None
        return dest

    # ---- the new agent on trial -------------------------------------------------------------------
    def prove_new_agent(self, journal: Journal) -> int:
        """This process is the new agent on trial, started from staging by the old agent: connect,
        run ota_post_update.sh, report new_agent_verified, say so (TrialReport), exit. The old
        agent does the rest (swap, hand over), or the rollback when this fails."""
        cloud = self.cloud
        assert cloud.jobs is None
        watch_process(*trial_supervisor(), "the agent that runs this trial")
        report = TrialReport(self.state, journal)
        cloud.connect()
        assert cloud.mqtt is not None and cloud.jobs is not None
        timeout = float(self.cfg.ota["newAgentTimeout"])
        if not cloud.mqtt.wait_connected(timeout):
            return self.trial_failed(report, "NEW_AGENT_NO_CONNECTION",
                                     f"the new agent did not connect within {timeout:.0f} s")
        report.write(connected=True)
        crash_point("new_agent_connected")
        try:
            cloud.jobs.subscribe()
            self.engine.hooks.run("ota_agent", "post", journal)
            cloud.jobs.update(journal.job_id, "IN_PROGRESS",
                              clean_details({"phase": "new_agent_verified", "version": journal.to_version}),
                              step_timeout_minutes=step_timer_minutes(self.cfg.ota, "new_agent_verified"))
        except (JobsRejected, MqttError) as err:
            return self.trial_failed(report, "NEW_AGENT_NO_REPORT", f"the new agent could not report: {err}")
        except OtaError as err:
            return self.trial_failed(report, err.reason, str(err))
        report.write(connected=True, verified=True)
        crash_point("new_agent_verified")
        log.info("job %s: this new agent connected, ran ota_post_update.sh and reported", journal.job_id)
        cloud.disconnect()
        return EXIT_OK

    def trial_failed(self, report: TrialReport, reason: str, message: str) -> int:
        log.error("job %s: the new agent's trial failed: %s", report.journal.job_id, message)
        report.write(connected=reason != "NEW_AGENT_NO_CONNECTION", reason=reason, message=message)
        self.cloud.disconnect()
        return EXIT_FAILED

    # ---- handing over to another agent file ---------------------------------------------------
    def restart_as(self, path: str) -> None:
        """Replace this agent with the one at `path` without nesting one process stack in
        another. The script: exec (same PID). The frozen binary (whose successor may be a binary
        of staticx, a stack of launchers that an exec would nest): as a daemon, start a new
        daemon, name it in the PID file (systemd
        follows the PID file when the old main process exits) and exit; in the foreground,
        exit with 75 so that the init system (procd, runit, systemd Restart=) starts it.
        Raises OtaError when the new agent cannot be started; returns never otherwise."""
        if not getattr(sys, "frozen", False):
            self.exec_agent(path)
        self.cloud.disconnect()
        if self.daemon and self.pid_file:
            assert self.state.lock_fd is not None
            pid = start_daemon(agent_command(path, self.argv), self.pid_file, self.state.lock_fd)
            raise AgentReplaced(EXIT_OK, f"handed over to the agent {path} (pid {pid}); exiting")
        raise AgentReplaced(EXIT_RESTART, f"exiting with {EXIT_RESTART} so that the init system starts {path}")

    def exec_agent(self, path: str) -> None:
        """Replace this process with the agent at `path` (same PID: systemd and procd see no exit).
        Raises NewAgentBroken when the exec fails; returns never otherwise."""
        log.info("restarting as %s", path)
        self.cloud.disconnect()
        for handler in log.handlers:
            handler.flush()
        env = child_environment()
        if self.state.lock_fd is not None:
            env[LOCK_FD_ENV] = str(self.state.lock_fd)
        argv = agent_command(path, self.argv)
        try:
            crash_point("before_exec")
            os.execve(argv[0], argv, env)
        except OSError as err:
            raise NewAgentBroken(f"could not start {path}: {err.strerror or err}") from None


# ============================================================================================
# dry-run and status: the offline preflight (one line per check, exit 0 only when an update
# could run), the rehearsal of a job document on a scratch copy, and the update history.
# ============================================================================================


class Check(collections.namedtuple("Check", ["name", "ok", "message"])):
    """One line of the dry-run: what was checked (str), whether it passed (None: it could not be
    checked here, without root), and why."""

    __slots__ = ()


def preflight(root: str, config_path: Optional[str]) -> List[Check]:
    checks: List[Check] = []
    try:
        cfg = load_config(root, config_path)
    except ConfigError as err:
        return [Check("config", False, str(err))]
    alpn = " (ALPN x-amzn-mqtt-ca)" if cfg.port == 443 else ""  # an invalid port already failed load_config
    checks.append(Check("config", not cfg.unknown_keys,
                        f"{cfg.path}: thing {cfg.thing_name}, {cfg.iot_host}:{cfg.port}{alpn}, "
                        f"keepalive {cfg.keepalive} s"
                        + (f"; unknown otaAgent keys: {', '.join(describe_unknown_key(k) for k in cfg.unknown_keys)}"
                           if cfg.unknown_keys else "")))
    if cfg.proxy is not None:
        checks.append(check_proxy(cfg))
    try:
        tls_context(mqtt_settings(cfg))
        checks.append(Check("credentials", True, "root CA, certificate and key load and match"))
    except MqttAuthError as err:
        checks.append(Check("credentials", None if not_root_and_denied(str(err)) else False, str(err)))
    if cfg.managed_respawn:
        for name in ALL_SCRIPTS:
            path = os.path.join(cfg.root, "usr", "scripts", name)
            if os.geteuid() != 0 and not os.access(os.path.dirname(path), os.X_OK):
                checks.append(Check(f"script {name}", None, f"{os.path.dirname(path)} cannot be searched here: "
                                                            "needs root"))
                continue
            try:
                check_script(path)
                checks.append(Check(f"script {name}", True, "present, root's, executable by root only"))
            except ScriptInvalid as err:
                checks.append(Check(f"script {name}", None if not_root_and_denied(str(err)) else False, str(err)))
    else:
        ok = os.access(os.path.join(cfg.root, "ggc/core/greengrassd"), os.X_OK)
        checks.append(Check("greengrassd", ok, "managedRespawn is false: the agent runs ggc/core/greengrassd"))
    checks.append(check_health_setup(cfg))
    try:
        check_free_space([(cfg.root, 0)], cfg.ota["minFreeBytes"])
        checks.append(Check("disk", True, f"at least {cfg.ota['minFreeBytes'] // 2**20} MiB free"))
    except DiskFull as err:
        checks.append(Check("disk", False, str(err)))
    state_parent = cfg.ota["stateDir"] if os.path.exists(cfg.ota["stateDir"]) else os.path.dirname(cfg.ota["stateDir"])
    for path in (os.path.join(cfg.root, "ggc"), os.path.join(cfg.root, "ota"), state_parent):
        writable = os.access(path, os.W_OK)
        checks.append(Check(f"writable {path}", writable or (None if os.geteuid() != 0 else False),
                            "the agent must be able to write here" + ("" if writable or os.geteuid() == 0 else
                                                                      " (not this user: needs root)")))
    arch, os_name = detect_platform(cfg.ota)
    supported = any(arch == a and (os_name is None or os_name == o) for o, a in SUPPORTED_PLATFORMS)
    checks.append(Check("platform", supported, f"{os_name or 'unknown OS'}/{arch}"))
    libraries = launcher_libraries()
    if libraries is not None:
        checks.append(Check("libraries", True, f"{libraries[1]}: {libraries[0]}"))
    try:
        holder = State(cfg.ota["stateDir"]).lock_holder()
    except PermissionError:
        checks.append(Check("agent", None, "the state directory cannot be read here: needs root"))
        return checks
    checks.append(Check("agent", True, "none runs on this root" if holder is None else
                        f"one runs on this root (pid {holder}): it takes the jobs; this check changes nothing"))
    return checks


def not_root_and_denied(message: str) -> bool:
    """A check that failed only because this user may not read what it checks: SKIP, not FAIL."""
    return os.geteuid() != 0 and ("Permission denied" in message or "cannot be read" in message)


def check_health_setup(cfg: Config) -> Check:
    """How a core update would be checked before its commit (information: a skipped check is
    allowed, and said)."""
    pid_file = cfg.ota["corePidFile"]
    kind, what = health_check_kind(cfg, "core", pid_file if os.path.exists(pid_file) else None)
    if kind == "script":
        try:
            check_script(what)
        except ScriptInvalid as err:
            return Check("health check", False, str(err))
        return Check("health check", True, f"{what} must exit 0 within {cfg.ota['healthCheckTimeout']} s")
    if kind == "pid":
        return Check("health check", True, f"the core daemon of {what} must live {cfg.ota['healthCheckSeconds']} s "
                                           "after the post-update script")
    return Check("health check", True, f"skipped: {what}")


def check_proxy(cfg: Config) -> Check:
    """The proxy in use (the password masked), and whether it answers a CONNECT to the IoT
    endpoint (the one network step of the dry-run, taken only when a proxy is configured)."""
    proxy = cfg.proxy
    assert proxy is not None
    what = f"{proxy.shown()} (from {proxy.source})"
    if not proxy.used_for(cfg.iot_host):
        return Check("proxy", True, f"{what}; {cfg.iot_host} is on the no-proxy list: MQTT goes direct")
    try:
        open_tunnel(proxy, cfg.iot_host, cfg.port, 10.0).close()
    except ProxyFailed as err:
        return Check("proxy", False, f"{what}: {err}")
    return Check("proxy", True, f"{what} answers CONNECT {cfg.iot_host}:{cfg.port}")


def rehearse(root: str, config_path: Optional[str], document_path: str, artifact: Optional[str]) -> List[Check]:
    """The update's own preparation (prepare's steps, in a scratch directory): document, platform,
    device, size and sha256, unpack under the free-space limit the update would have, layout,
    and a new agent's self-test. It differs from an update only in what it does not touch."""
    checks: List[Check] = []
    cfg = load_config(root, config_path)
    state = State(cfg.ota["stateDir"])
    try:
        with open(document_path, encoding="utf-8") as f:
            raw = json.load(f)
        doc = parse_document(raw.get("jobDocument", raw) if isinstance(raw, dict) else raw)
        checks.append(Check("document", True, f"{doc.software} {doc.version} for {doc.operating_system}/"
                                              f"{doc.architecture}, {doc.size} bytes"))
        warning = check_platform(doc, *detect_platform(cfg.ota))
        checks.append(Check("platform", True, warning or "the document targets this device"))
    except (OSError, ValueError, OtaError) as err:
        return checks + [Check("document", False, str(err))]
    try:
        check_device(cfg, doc, state)
        checks.append(Check("device", True, "scripts, state directory and free space as the update needs them"))
    except (OSError, OtaError) as err:
        checks.append(Check("device", False, str(err)))
    import tempfile
    scratch = tempfile.mkdtemp(prefix="ggc-ota-rehearsal-")
    try:
        local = artifact or os.path.join(scratch, "artifact.tar.gz")
        if artifact is None:
            artifact_download(cfg, doc, local).run()
        digest, size = sha256_of_file(local)
        ok = size == doc.size and digest.hexdigest() == doc.sha256
        cap = cfg.ota["maxDownloadBytesPerSecond"]
        how = f"; downloaded at most {cap} bytes/s" if artifact is None and cap else ""
        checks.append(Check("artifact", ok, f"{size} bytes, sha256 {digest.hexdigest()}{how}"))
        if not ok:
            return checks
        new = unpack_update(cfg, doc, local, scratch, state)
        files = sum(len(f) for _, _, f in walk_tree(new))
        live = os.path.join(cfg.root, SOFTWARE[doc.software].tree)
        checks.append(Check("unpack", True, f"{files} files; would replace {live}"))
        if doc.software == "ota_agent":
            try_new_tree(cfg, doc, new)
            checks.append(Check("new agent", True, "runs from staging: --version and --check-config pass"))
        kept = [k for k in cfg.ota["keep"] if doc.software == "core" and os.path.exists(os.path.join(cfg.root, k))]
        checks.append(Check("keep", True, "would keep " + (", ".join(kept) or "nothing")))
    except (OSError, OtaError) as err:
        checks.append(Check("new agent" if isinstance(err, NewAgentBroken) else "artifact", False, str(err)))
    finally:
        remove_tree(scratch)
    return checks


def status_report(root: str, config_path: Optional[str]) -> dict:
    """What --status shows. Without root, what the state directory keeps from others (it is
    root's alone) is null, and `unreadable` says so: the report itself never fails for it."""
    cfg = load_config(root, config_path)
    state = State(cfg.ota["stateDir"])
    unreadable: List[str] = []
    denied = os.path.isdir(state.dir) and not os.access(state.dir, os.R_OK | os.X_OK)

    def read(what: str, get: Callable[[], Any], default: Any) -> Any:
        try:
            if denied:
                raise PermissionError(state.dir)
            return get()
        except PermissionError:
            unreadable.append(what)
            return default
    try:
        journal = read("the update in flight", state.journal, None)
    except JournalCorrupt as err:
        journal = {"step": f"unknown: {err}"}
    current = read("the update in flight", lambda: read_json(state.current_path)
                   if os.path.exists(state.current_path) else None, None)
    flight = journal and {k: journal.get(k) for k in ("jobId", "software", "fromVersion", "toVersion", "step")}
    if isinstance(current, dict):
        flight = {**current, **(flight or {})}
    holder = read("whether an agent runs", state.lock_holder, None)
    version = read("whether an agent runs", state.lock_holder_version, None) if holder else None
    return {"root": cfg.root, "thing": cfg.thing_name, "coreVersion": installed_core_version(cfg.root),
            "agentVersion": version or __version__,
            "agentRunning": int(holder) if holder and holder.isdigit() else None,
            "statusVersion": __version__,
            "maxDownloadBytesPerSecond": cfg.ota["maxDownloadBytesPerSecond"],
            "updateInFlight": typed_flight(flight) if flight else None,
            "pendingStatuses": read("the outbox", lambda: len(state.pending_statuses())
                                    if os.path.isdir(state.outbox) else 0, None),
            "history": read("the history", state.history, []),
            "unreadable": sorted(set(unreadable))}


def typed_flight(flight: dict) -> dict:
    """The update in flight with numbers as numbers: `progress` a percent, `bytes` split into
    `bytesDone` and `bytesTotal` (the statuses carry them as text, as statusDetails must)."""
    out = dict(flight)
    progress = str(out.get("progress") or "").rstrip("%")
    out["progress"] = int(progress) if progress.isdigit() else None
    done, _, total = str(out.pop("bytes", "") or "").partition("/")
    out["bytesDone"] = int(done) if done.isdigit() else None
    out["bytesTotal"] = int(total) if total.isdigit() else None
    return out


# ============================================================================================
# CLI
# ============================================================================================

# Runs the script the way `python3 ggc_ota.py` does (argv[0], sys.path[0], __main__), except
# that compile() frees the syntax tree before the code runs, and leaves out docstrings and
# asserts (optimize=2, as the frozen binary is built): 1 MiB less for a long-running agent.
SCRIPT_LOADER = ("import os, sys\n"
                 "__file__ = sys.argv[0] = sys.argv.pop(1)\n"
                 "sys.path[0] = os.path.dirname(__file__)\n"
                 "with open(__file__, 'rb') as f:\n"
                 "    exec(compile(f.read(), __file__, 'exec', optimize=2))\n")


# (option, metavar or None for a flag, help; None for an internal option)
OPTIONS: List[Tuple[str, Optional[str], Optional[str]]] = [
    ("--root", "DIR", "the Greengrass root (default: from the executable's path, else /greengrass)"),
    ("--config", "FILE", "config.json (default: <root>/config/config.json)"),
    ("--log-file", "FILE", "log file (default: otaAgent.logFile or /var/log/greengrass/ota/ggc_ota.txt)"),
    ("--log-level", "LEVEL", "one of " + ", ".join(LOG_LEVELS) + f" (default: {DEFAULT_LOG_LEVEL})"),
    ("--pid-file", "FILE", "write the daemon's PID here once it runs"),
    ("--foreground", None, "do not daemonize; log to stderr too"),
    ("--dry-run", None, "offline preflight; changes nothing"),
    ("--job-document", "FILE", "with --dry-run: rehearse this job document on a scratch copy"),
    ("--artifact", "FILE", "with --job-document: a local artifact instead of the URL"),
    ("--status", None, "installed versions, update in flight, history"),
    ("--json", None, "machine-readable output for --dry-run and --status"),
    ("--check-now", None, "make the running agent list its jobs now (after fixing a policy, say)"),
    ("--version", None, "print the version"),
    ("--check-config", None, None),
    (DAEMON_CHILD_FLAG, None, None),
    (JOURNAL_FORMAT_FLAG, None, None),
]


class UsageError(Exception):
    pass


def parse_args(argv: List[str]) -> Any:
    """The command line (`--name value` or `--name=value`), as attributes named like the
    options. A plain parser: argparse costs an idle agent 0.4 MiB of imports for 14 options."""
    args = types.SimpleNamespace(**{name[2:].replace("-", "_"): None if metavar else False
                                    for name, metavar, _ in OPTIONS})
    args.log_level = DEFAULT_LOG_LEVEL
    takes_value = {name: metavar is not None for name, metavar, _ in OPTIONS}
    items = iter(argv)
    for item in items:
        if item in ("-h", "--help"):
            print(cli_help())
            raise SystemExit(EXIT_OK)
        name, has_value, value = item.partition("=")
        if name not in takes_value:
            raise UsageError(f"unrecognized argument: {item}")
        if not takes_value[name]:
            if has_value:
                raise UsageError(f"{name} takes no value")
            value = True
        elif not has_value:
            value = next(items, None)
            if value is None or value in takes_value:
                raise UsageError(f"{name} expects a value")
        setattr(args, name[2:].replace("-", "_"), value)
    args.log_level = str(args.log_level).upper()
    if args.log_level == "WARNING":
        args.log_level = "WARN"
    if args.log_level not in LOG_LEVELS:
        raise UsageError(f"--log-level must be one of {', '.join(LOG_LEVELS)} (any case), not {args.log_level!r}")
    modes = [name for name in ("--dry-run", "--status", "--version", "--check-config", "--check-now",
                               JOURNAL_FORMAT_FLAG)
             if getattr(args, name[2:].replace("-", "_"))]
    if len(modes) > 1:
        raise UsageError(f"{' and '.join(modes)} cannot be used together")
    if args.json and not (args.dry_run or args.status):
        raise UsageError("--json goes with --dry-run or --status")
    running_only = [name for name in ("--foreground", "--pid-file", "--log-file")
                    if getattr(args, name[2:].replace("-", "_"))]
    if modes and running_only:
        raise UsageError(f"{running_only[0]} goes with running the agent, not with {modes[0]}")
    return args


def cli_help() -> str:
    lines = ["usage: ggc-ota [options]", "", "Over-the-air update agent for AWS IoT Greengrass v1 cores.", "",
             "options:", "  -h, --help            show this help and exit"]
    for name, metavar, text in OPTIONS:
        if text is not None:
            lines.append(f"  {name + (' ' + metavar if metavar else ''):<21} {text}")
    return "\n".join(lines)


def print_checks(checks: List[Check], as_json: bool) -> int:
    """One line per check, OK, FAIL or SKIP (could not be checked without root); exit 0 unless a
    check failed."""
    ok = all(c.ok is not False for c in checks)
    if as_json:
        print(json.dumps({"ok": ok, "checks": [{**c._asdict(), "result": check_result(c)} for c in checks]},
                         indent=2))
    else:
        for c in checks:  # a message can quote the network (a proxy's status line): escaped for the terminal
            print(f"{check_result(c):<4} {c.name}: {one_log_line(str(c.message))}")
    return EXIT_OK if ok else EXIT_FAILED


def check_result(check: Check) -> str:
    return "SKIP" if check.ok is None else ("OK" if check.ok else "FAIL")


def print_status(report: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(report, indent=2))
        return
    print(f"root: {report['root']} (thing {report['thing']})")
    print(f"core: {report['coreVersion'] or 'not installed'}; agent: {report['agentVersion']}"
          f" ({'running, pid ' + str(report['agentRunning']) if report['agentRunning'] else 'not running'})")
    if report.get("maxDownloadBytesPerSecond"):
        print(f"downloads capped at {report['maxDownloadBytesPerSecond']} bytes/s (otaAgent.maxDownloadBytesPerSecond)")
    flight = report["updateInFlight"]
    print("update in flight: " + (one_log_line(describe_flight(flight)) if flight else "none"))
    if report.get("unreadable"):
        print(f"not readable by this user (the state directory is root's alone; run as root): "
              f"{', '.join(report['unreadable'])}")
    print(f"history ({len(report['history'])}):")
    for h in report["history"][-20:]:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(h.get("finishedAt", 0)))
        reason = f" ({h.get('reason')})" if h.get("reason") else ""
        line = (f"  {when}Z {h.get('jobId')} {h.get('component')} {h.get('fromVersion')} -> {h.get('toVersion')}: "
                f"{h.get('result')}{reason}")
        print(one_log_line(line))  # the history can quote what the network said


def describe_flight(flight: dict) -> str:
    """`job J: download 43% (12345/28000 bytes), since 12:01:02Z` and, once journaled, its step."""
    parts = [f"job {flight.get('jobId')}"]
    if flight.get("software"):
        parts.append(f"{flight['software']} {flight.get('fromVersion')} -> {flight.get('toVersion')}, "
                     f"step {flight.get('step')}")
    elif flight.get("phase"):
        parts.append(f"{flight['phase']}" + (f" {flight['progress']}% ({flight['bytesDone']}/{flight['bytesTotal']} "
                                             "bytes)" if flight.get("progress") is not None else ""))
    if flight.get("since"):
        parts.append("since " + time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(flight["since"])))
    return ": ".join(parts[:2]) + (", " + parts[2] if len(parts) > 2 else "")


def ask_for_a_check(root: str, config_path: Optional[str]) -> int:
    """--check-now: SIGUSR1 to the agent process that holds this root's lock (never to the PID
    file's process, which for a binary of staticx was a launcher that would die of it)."""
    cfg = load_config(root, config_path)
    holder = State(cfg.ota["stateDir"]).lock_holder()
    if holder is None or not holder.isdigit():
        print(f"ggc-ota: no agent runs on {cfg.root}" + (f" (the lock names {holder!r:.20})" if holder else ""),
              file=sys.stderr)
        return EXIT_FAILED
    os.kill(int(holder), signal.SIGUSR1)
    print(f"asked the agent (pid {holder}) to list its jobs now; its log says what it found")
    return EXIT_OK


def daemonize(argv: List[str], pid_file: str) -> int:
    """Start a detached fresh copy of this executable (a new process rather than a double fork:
    it starts clean, as an init system would start it) and exit 0 once it has
    written the PID file; 1 (3 when another agent runs) with its reason if it dies first."""
    try:
        start_daemon(agent_command(running_agent_file(), argv + ["--foreground", DAEMON_CHILD_FLAG]), pid_file)
    except OtaError as err:
        print(f"ggc-ota: {err}", file=sys.stderr)
        return EXIT_RUNNING if err.reason == "ALREADY_RUNNING" else EXIT_FAILED
    return EXIT_OK


def run_agent(args: Any, argv: List[str]) -> int:
    if os.geteuid() != 0:
        raise OtaError("the agent must run as root; --dry-run and --status do not need it", "NOT_ROOT")
    os.umask(0o022)  # whatever started it: the log, history and state are never writable by others
    root = args.root or default_root(running_agent_file())
    cfg = load_config(root, args.config)
    pid_file = args.pid_file or os.path.join(cfg.ota["stateDir"], "ggc-ota.pid")
    if not args.foreground:
        return daemonize(argv, pid_file)
    restart_without_syntax_tree(argv)
    setup_logging(args.log_file or cfg.ota["logFile"], args.log_level, to_stderr=not args.daemon_child,
                  max_bytes=cfg.ota["logMaxBytes"], backups=cfg.ota["logBackups"], syslog_socket=cfg.ota["syslog"])
    where = launcher_libraries()
    if where is not None and libraries_in_tmpdir():
        log.warning("the binary's libraries are %s: %s", where[1], where[0])
    agent = Agent(cfg, argv, args.log_level, pid_file if (args.daemon_child or args.pid_file) else None,
                  daemon=args.daemon_child)
    handle_signals(agent)
    return agent.run()


def handle_signals(agent: Agent) -> None:
    """SIGTERM and SIGINT stop the agent; SIGHUP reopens the log file; SIGUSR1 makes it list its
    jobs now (`ggc-ota --check-now` sends it to the agent process itself). A Python signal handler
    runs in the main thread between two bytecodes, perhaps while that thread holds a lock the
    handler would need (the MQTT client's, a queue's): so the handler only writes the signal's
    number into a pipe, and a thread of its own acts on it."""
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)

    def on_signal(signum: int, _frame: Any) -> None:
        try:
            os.write(write_end, bytes([signum]))
        except OSError:  # the pipe is full: that signal is pending already
            pass

    def act() -> None:
        while True:
            for signum in os.read(read_end, 64):
                if signum == signal.SIGHUP:
                    reopen_log_files()
                elif signum == signal.SIGUSR1:
                    agent.check_now()
                else:
                    agent.stop()

    threading.Thread(target=act, name="signals", daemon=True).start()
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
        signal.signal(signum, on_signal)


def restart_without_syntax_tree(argv: List[str]) -> None:
    """Run as a script (`python3 ggc_ota.py`), CPython keeps the script's whole syntax tree in
    memory until the script's last line returns: 8.7 MiB for this file, a third of the agent's
    memory, for as long as it runs. The long-running agent therefore replaces itself once
    (exec: same PID, same arguments) with an interpreter that compiles the file through
    compile(), which frees the tree before the code runs. Not needed, and not done, in the
    frozen binary (precompiled) or when this file was imported as a module."""
    if getattr(sys, "frozen", False) or __name__ != "__main__" or os.environ.get(FRESH_ENV) or not sys.executable:
        return
    for handler in log.handlers:
        handler.flush()
    try:
        os.execve(sys.executable, [sys.executable, "-c", SCRIPT_LOADER, running_agent_file()] + argv,
                  {**os.environ, FRESH_ENV: "1"})
    except OSError as err:  # the agent runs all the same, with the tree kept
        print(f"ggc-ota: could not restart without the syntax tree ({err}); going on", file=sys.stderr)


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if getattr(sys, "frozen", False):
        settle_into_binary()
    try:
        args = parse_args(argv)
    except UsageError as err:
        print(f"usage: ggc-ota [options] (--help lists them)\nggc-ota: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    try:
        if args.version:
            print(f"ggc-ota {__version__}")
            return EXIT_OK
        if args.journal_format:  # asked by an older agent before it tries this one (self_test)
            print(JOURNAL_FORMAT)
            return EXIT_OK
        root = args.root or default_root(running_agent_file())
        if args.check_config:
            load_config(root, args.config)
            print("config OK")
            return EXIT_OK
        if args.status:
            print_status(status_report(root, args.config), args.json)
            return EXIT_OK
        if args.check_now:
            return ask_for_a_check(root, args.config)
        if args.dry_run:
            if args.artifact and not args.job_document:
                print("ggc-ota: --artifact goes with --job-document", file=sys.stderr)
                return EXIT_USAGE
            if args.job_document:
                return print_checks(rehearse(root, args.config, args.job_document, args.artifact), args.json)
            return print_checks(preflight(root, args.config), args.json)
        if args.job_document or args.artifact:
            print("ggc-ota: --job-document and --artifact go with --dry-run", file=sys.stderr)
            return EXIT_USAGE
        return run_agent(args, argv)
    except AnotherAgent as err:
        print(f"ggc-ota: {err}", file=sys.stderr)
        if log.handlers:
            log.critical("not starting: %s", err)
        return EXIT_RUNNING
    except (OtaError, OSError) as err:  # one line, never a traceback; a daemon's reaches its log
        text = f"{err.strerror}: {err.filename}" if isinstance(err, OSError) and err.filename else str(err)
        if isinstance(err, PermissionError) and os.geteuid() != 0:
            text += " (run as root)"
        print(f"ggc-ota: {text}", file=sys.stderr)
        if log.handlers:
            log.critical("stopping on a fatal error: %s", text)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
