"""Small stand-ins for the init systems the agent runs under, for the tests. Each runs as a
process of its own and is a child subreaper (as PID 1 is), so that it learns the exit status of
every process it supervises, started by it or not. Its state goes to a JSON file after each
change: {"kind", "main", "starts", "follows", "exits", "state"}.

  python -m tests.supervisors systemd --state F --pid-file P -- COMMAND...
      imitates a systemd unit with Type=forking, PIDFile=P, Restart=on-failure, RestartSec=1,
      StartLimitBurst=5 and KillMode=mixed: COMMAND (the ExecStart) must exit 0 once P names a
      running process, the main process. When the main process exits, P is read again and a
      new live process there becomes the main one (systemd's service_sigchld_event: "forking
      services may occasionally move to a new PID, as long as they update the PID file before
      exiting the old PID"); otherwise a failed exit is restarted, a clean one ends the unit.
      SIGTERM: SIGTERM to the main process, SIGKILL to everything left after 15 s.

  python -m tests.supervisors procd --state F [--first-env K=V] -- COMMAND...
      imitates a procd instance with `respawn 3600 1 5`: COMMAND runs in the foreground and is
      started again 1 s after each exit, at most 5 times in a row when it ran shorter than the
      threshold. SIGTERM: SIGTERM to the process it started, SIGKILL to that process only after
      5 s (procd's term_timeout); what that process left behind is not procd's business.
      --first-env sets a variable for the first start only.
"""
from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

PR_SET_CHILD_SUBREAPER = 36


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def descendants(pid: int) -> list[int]:
    out = []
    for tasks in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            kids = [int(c) for c in tasks.read_text().split()]
        except OSError:
            continue
        for kid in kids:
            out.append(kid)
            out.extend(descendants(kid))
    return out


def read_pid(path: str) -> Optional[int]:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


class Supervisor:
    def __init__(self, kind: str, state_path: str) -> None:
        self.kind = kind
        self.state_path = state_path
        self.main: Optional[int] = None
        self.starts = 0
        self.follows = 0
        self.exits: list[int] = []  # exit codes of main processes (-N: killed by signal N)
        self.state = "starting"
        self.stopping = False
        signal.signal(signal.SIGTERM, self._on_term)
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")

    def _on_term(self, *_: object) -> None:
        self.stopping = True

    def save(self) -> None:
        tmp = self.state_path + ".tmp"
        Path(tmp).write_text(json.dumps({"kind": self.kind, "main": self.main, "starts": self.starts,
                                         "follows": self.follows, "exits": self.exits, "state": self.state}))
        os.replace(tmp, self.state_path)

    def reap(self) -> list[tuple[int, int]]:
        """(pid, exit code) of every child or adopted orphan that ended."""
        out = []
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return out
            if pid == 0:
                return out
            out.append((pid, os.waitstatus_to_exitcode(status)))

    def kill_all(self, sig: int) -> None:
        for pid in descendants(os.getpid()):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def wait_gone(self, pids_alive, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while pids_alive():
            self.reap()
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True


def run_systemd(sup: Supervisor, command: list[str], pid_file: str, env: dict) -> int:
    restarts: list[float] = []

    def start() -> Optional[int]:
        sup.starts += 1
        if os.path.exists(pid_file):
            os.unlink(pid_file)  # as systemd does before ExecStart of Type=forking
        starter = subprocess.Popen(command, stdin=subprocess.DEVNULL, env=env)
        deadline = time.monotonic() + 90  # TimeoutStartSec
        while starter.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if starter.returncode != 0:
            return None
        pid = read_pid(pid_file)
        return pid if pid and alive(pid) else None

    sup.main = start()
    sup.state = "running" if sup.main else "failed"
    sup.save()
    while sup.main and not sup.stopping:
        for pid, code in sup.reap():
            if pid != sup.main:
                continue
            moved = read_pid(pid_file)
            if moved and moved != pid and alive(moved):
                sup.main, sup.follows = moved, sup.follows + 1
                break
            sup.exits.append(code)
            if code == 0:
                sup.main, sup.state = None, "inactive"
                break
            restarts = [t for t in restarts if t > time.monotonic() - 60] + [time.monotonic()]
            if len(restarts) > 5:  # StartLimitBurst
                sup.main, sup.state = None, "failed"
                break
            time.sleep(1.0)  # RestartSec
            sup.main = start()
            sup.state = "running" if sup.main else "failed"
            break
        sup.save()
        time.sleep(0.05)
    if sup.stopping:
        if sup.main:
            try:
                os.kill(sup.main, signal.SIGTERM)  # KillMode=mixed: SIGTERM to the main process only
            except ProcessLookupError:
                pass
        if not sup.wait_gone(lambda: descendants(os.getpid()), 15):
            sup.kill_all(signal.SIGKILL)
            sup.wait_gone(lambda: descendants(os.getpid()), 5)
        sup.state = "inactive"
    sup.save()
    return 0


def run_procd(sup: Supervisor, command: list[str], env: dict, first_env: dict) -> int:
    quick_exits = 0
    child: Optional[subprocess.Popen] = None
    started = 0.0

    def spawn(extra: dict) -> subprocess.Popen:
        sup.starts += 1
        return subprocess.Popen(command, stdin=subprocess.DEVNULL, env={**env, **extra})

    child = spawn(first_env)
    started = time.monotonic()
    sup.main, sup.state = child.pid, "running"
    sup.save()
    while not sup.stopping:
        for pid, code in sup.reap():
            if pid != sup.main:
                continue
            child.returncode = code  # reaped here, not by Popen
            sup.exits.append(code)
            quick_exits = quick_exits + 1 if time.monotonic() - started < 3600 else 0
            if quick_exits > 5:
                sup.main, sup.state = None, "failed"
                break
            deadline = time.monotonic() + 1.0  # respawn timeout
            while time.monotonic() < deadline and not sup.stopping:
                sup.reap()
                time.sleep(0.05)
            if sup.stopping:
                sup.main = None
                break
            child = spawn({})
            started = time.monotonic()
            sup.main = child.pid
        sup.save()
        if sup.main is None:
            break
        time.sleep(0.05)
    if sup.stopping and sup.main:
        main = sup.main
        os.kill(main, signal.SIGTERM)
        if not sup.wait_gone(lambda: alive(main), 5):  # term_timeout
            os.kill(main, signal.SIGKILL)
            sup.wait_gone(lambda: alive(main), 5)
    sup.state = "inactive" if sup.stopping else sup.state
    sup.save()
    return 0


def main(argv: list[str]) -> int:
    kind, rest = argv[0], argv[1:]
    split = rest.index("--")
    options, command = rest[:split], rest[split + 1:]
    opts: dict = {"--first-env": []}
    items = iter(options)
    for item in items:
        value = next(items)
        if item == "--first-env":
            opts[item].append(value)
        else:
            opts[item] = value
    sup = Supervisor(kind, opts["--state"])
    env = dict(os.environ)
    if kind == "systemd":
        return run_systemd(sup, command, opts["--pid-file"], env)
    first_env = dict(kv.split("=", 1) for kv in opts["--first-env"])
    return run_procd(sup, command, env, first_env)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
