"""The hooks section: scripts run with a fixed PATH, stdin from /dev/null, their own process
group, output into the log; a timeout stops the whole group (grandchildren too)."""
from __future__ import annotations

import logging
import os
import signal
import time

import pytest

import ggc_ota as g


def script(tmp_path, body):
    p = tmp_path / "hook.sh"
    p.write_text("#!/bin/sh\n" + body)
    os.chmod(p, 0o700)
    return str(p)


def test_environment_stdin_and_output(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="ggc-ota")
    g.log.propagate = True  # let caplog see the agent's records; setup_logging turns it off again
    s = script(tmp_path, 'echo "path=$PATH job=$GGC_OTA_JOB_ID"\nread line && echo "stdin: $line"\n'
                         'echo "pgid=$(cut -d" " -f5 /proc/$$/stat) pid=$$"\nexit 0\n')
    g.run_hook([s], {"GGC_OTA_JOB_ID": "job-7"}, timeout=10, cwd=str(tmp_path), output=str(tmp_path / "out.log"))
    assert f"path={g.HOOK_PATH} job=job-7" in caplog.text
    assert "stdin:" not in caplog.text  # stdin is /dev/null: read gets nothing
    line = next(r.getMessage() for r in caplog.records if "pgid=" in r.getMessage())
    pgid, pid = line.split("pgid=")[1].split(" pid=")
    assert pgid.strip() == pid.strip()  # its own process group


def test_non_zero_exit(tmp_path):
    with pytest.raises(g.HookFailed) as err:
        g.run_hook([script(tmp_path, "exit 3\n")], {}, timeout=10, cwd=str(tmp_path), output=str(tmp_path / "out.log"))
    assert err.value.reason == "HOOK_FAILED" and "exited with code 3" in str(err.value)


def test_missing_script(tmp_path):
    with pytest.raises(g.HookFailed, match="could not be started"):
        g.run_hook([str(tmp_path / "absent.sh")], {}, timeout=10, cwd=str(tmp_path), output=str(tmp_path / "out.log"))


def test_timeout_kills_the_whole_group(tmp_path):
    pidfile = tmp_path / "grandchild.pid"
    s = script(tmp_path, f"sleep 300 &\necho $! > {pidfile}\ntrap '' TERM\nsleep 300\n")
    start = time.monotonic()
    with pytest.raises(g.HookFailed) as err:
        g.run_hook([s], {}, timeout=1, cwd=str(tmp_path), output=str(tmp_path / "out.log"))
    assert err.value.reason == "HOOK_TIMEOUT"
    assert time.monotonic() - start < 15  # SIGTERM ignored: SIGKILL after the grace period
    grandchild = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while True:
        try:
            os.kill(grandchild, 0)
        except ProcessLookupError:
            break
        with open(f"/proc/{grandchild}/stat") as f:
            if f.read().split()[2] == "Z":
                break
        assert time.monotonic() < deadline, "a grandchild survived the timeout"
        time.sleep(0.05)


def test_a_failing_script_says_why_in_its_last_lines(tmp_path):
    body = "".join(f"echo line {i}\n" for i in range(50)) + "echo 'greengrassd: port 8000 in use' >&2\nexit 4\n"
    with pytest.raises(g.HookFailed) as err:
        g.run_hook([script(tmp_path, body)], {}, timeout=10, cwd=str(tmp_path), output=str(tmp_path / "out.log"))
    message = str(err.value)
    assert "exited with code 4" in message and "port 8000 in use" in message
    assert "line 49" in message and "line 0 " not in message  # only the last lines


def test_a_daemon_that_keeps_the_output_neither_blocks_nor_grows_the_agent_or_the_disk(tmp_path, monkeypatch):
    """The script starts a process that keeps its stdout and writes without end: the hook
    returns when the script exits, the agent does not read on, and the output file is emptied
    whenever it passes its cap."""
    import resource
    monkeypatch.setattr(g, "HOOK_OUTPUT_MAX", 64 * 1024)
    monkeypatch.setattr(g, "HOOK_OUTPUT_CHECK_SECONDS", 0.2)
    flood = tmp_path / "flood.pid"
    output = tmp_path / "flood-out.log"
    line = "x" * 60
    body = f"(while :; do echo {line}; done) &\necho $! > {flood}\nexit 0\n"
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.monotonic()
    try:
        g.run_hook([script(tmp_path, body)], {}, timeout=10, cwd=str(tmp_path), output=str(output))
        assert time.monotonic() - started < 5
        sizes = []
        for _ in range(15):  # it keeps writing meanwhile
            time.sleep(0.2)
            sizes.append(output.stat().st_size)
        grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        assert grown_kib < 20 * 1024, grown_kib
        emptied = [b < a for a, b in zip(sizes, sizes[1:])]  # appended to only, it would only grow
        assert any(emptied) and max(sizes) < 64 * 2**20, sizes
    finally:
        os.kill(int(flood.read_text()), signal.SIGKILL)


def test_a_daemon_left_quiet_by_its_script_does_not_die_at_its_next_write(tmp_path):
    """A daemon a script starts keeps the script's stdout and says nothing for a while after the
    script exits: its next write must not kill it (SIGPIPE, when the agent closed a pipe), as
    the core died after its job reported SUCCEEDED."""
    pid_file, alive = tmp_path / "daemon.pid", tmp_path / "still-alive"
    body = (f"(sleep 1; echo after the script; echo more >&2; sleep 1; touch {alive}; sleep 300) &\n"
            f"echo $! > {pid_file}\necho started\nexit 0\n")
    g.run_hook([script(tmp_path, body)], {}, timeout=10, cwd=str(tmp_path), output=str(tmp_path / "out.log"))
    pid = int(pid_file.read_text())
    try:
        deadline = time.monotonic() + 10
        while not alive.exists():
            assert os.path.exists(f"/proc/{pid}"), "the daemon died"
            assert time.monotonic() < deadline, "the daemon never wrote on"
            time.sleep(0.1)
        assert "after the script" in (tmp_path / "out.log").read_text()
    finally:
        os.kill(pid, signal.SIGKILL)


def test_a_timeout_stops_the_scripts_whole_session(tmp_path):
    """Children that left the script's process group (setsid) are stopped too."""
    escaped = tmp_path / "escaped.pid"
    body = f"setsid sh -c 'echo $$ > {escaped}; exec sleep 300' &\nsleep 300\n"
    with pytest.raises(g.HookFailed) as err:
        g.run_hook([script(tmp_path, body)], {}, timeout=2, cwd=str(tmp_path), output=str(tmp_path / "out.log"))
    assert err.value.reason == "HOOK_TIMEOUT"
    pid = int(escaped.read_text())
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{pid}") and open(f"/proc/{pid}/stat").read().split()[2] != "Z":
        assert time.monotonic() < deadline, "a child that called setsid outlived the timeout"
        time.sleep(0.1)


def test_greengrassd_goes_into_its_own_scope_where_systemd_runs(tmp_path, monkeypatch):
    """Stopping the agent's service must not stop a core it started: under systemd the start goes
    through systemd-run --scope (out of the agent's cgroup); elsewhere it runs as it is."""
    argv = ["/greengrass/ggc/core/greengrassd", "start"]
    monkeypatch.setattr(g, "SYSTEMD_RUNTIME", str(tmp_path / "absent"))
    assert g.in_own_scope(argv) == argv
    monkeypatch.setattr(g, "SYSTEMD_RUNTIME", str(tmp_path))
    if not any(os.access(os.path.join(d, "systemd-run"), os.X_OK) for d in g.HOOK_PATH.split(":")):
        pytest.skip("systemd-run is not installed")
    wrapped = g.in_own_scope(argv)
    assert wrapped[0].endswith("/systemd-run") and "--scope" in wrapped and wrapped[-2:] == argv
