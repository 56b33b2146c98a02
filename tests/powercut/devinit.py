"""A test device's init: what a boot starts, under a child subreaper, so that everything the
device ever runs (a daemon that double-forks included) stays in this process's tree and the
power cut can kill all of it.

    python -m tests.powercut.devinit [--pre PROGRAM ARG...] -- AGENT-COMMAND...

It runs PROGRAM (the core daemon's `greengrassd start`, as a boot does) to its end, starts the
agent, reaps every orphan, and on SIGTERM passes the signal to the agent and exits with its code.
"""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys

PR_SET_CHILD_SUBREAPER = 36


def main(argv: list) -> int:
    sep = argv.index("--")
    pre, agent = argv[:sep], argv[sep + 1:]
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")
    if pre and pre[0] == "--pre" and len(pre) > 1 and os.path.exists(pre[1]):
        subprocess.run(pre[1:], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       timeout=60, check=False)
    child = subprocess.Popen(agent, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    signal.signal(signal.SIGTERM, lambda *_: child.poll() is None and child.send_signal(signal.SIGTERM))
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            return 0
        except InterruptedError:
            continue
        if pid == child.pid:
            shut_down()
            return os.waitstatus_to_exitcode(status)


def shut_down() -> None:
    """The agent is gone: end what the device still runs (daemons the scripts started), as a
    shutdown does, so that nothing of the device outlives its init."""
    from tests.powercut.fs import with_descendants
    for pid in with_descendants({os.getpid()}) - {os.getpid()}:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
