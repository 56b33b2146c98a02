"""The power-cut file system: tests/powercut/model.py served over FUSE (libfuse 3 through
mfusepy), mounted over a test device's root. Its durable image lives in a backing directory;
a mount starts from that image, and the power going off writes the new durable image there.

    python -m tests.powercut.fs BACKING MOUNTPOINT --model data|strict|posix --control SOCKET
                                [--kill-env KEY=VALUE]

The control socket takes one JSON command a line and answers one JSON line:
  {"cmd": "stats"}               counters (operations, bytes, syncs, by category), the cut if any
  {"cmd": "arm", "after": K}     the power goes at the K-th state-changing operation from now
  {"cmd": "arm", "match": N, "nth": K}  ... at the K-th operation named N from now (model.normalize)
  {"cmd": "arm"}                 no cut; start recording operation names
  {"cmd": "names"}               the names of the operations since the last arm
  {"cmd": "sync_all"}            everything is durable (once a test device is set up)
  {"cmd": "no_syncs", "on": b}   sync calls do nothing from now (a test that the sweep can fail)
  {"cmd": "poweroff"}            the power goes now, if it has not already
  {"cmd": "unmount"}             write the durable image to BACKING, unmount, exit
When the power goes, every process whose environment holds --kill-env is SIGKILLed at once
(before the operation returns), and every operation from then on fails with EIO and changes
nothing: the device is dead. Only then does the operation that met the cut return.
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any, Optional

import mfusepy

from tests.powercut.model import Model, PowerCut


def processes_with(marker: bytes) -> list:
    """The processes whose environment holds `marker` (a device's init and its agent)."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        if marker in env:
            out.append(int(name))
    return out


def parents() -> dict:
    out = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    out[int(name)] = int(f.read().rsplit(b")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    return out


def device_processes(marker: bytes) -> set:
    """Every process of the device: the marked ones (its init, the agent) and all their
    descendants (scripts run with a clean environment; their daemons reparent to the init,
    a child subreaper)."""
    tree = with_descendants(set(processes_with(marker)))
    tree.discard(os.getpid())
    return tree


def with_descendants(roots: set) -> set:
    """`roots` and every process below them."""
    tree, family = set(roots), parents()
    grew = True
    while grew:
        grew = False
        for pid, ppid in family.items():
            if ppid in tree and pid not in tree:
                tree.add(pid)
                grew = True
    return tree


def kill_marked(marker: Optional[bytes]) -> int:
    """Power off: freeze every process of the device (a stopped process cannot fork), until no
    new one appears, then SIGKILL them all."""
    if not marker:
        return 0
    stopped: set = set()
    for _ in range(20):
        fresh = device_processes(marker) - stopped
        if not fresh:
            break
        for pid in fresh:
            try:
                os.kill(pid, signal.SIGSTOP)
            except ProcessLookupError:
                pass
        stopped |= fresh
    for pid in stopped:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return len(stopped)


class Ops(mfusepy.Operations):
    use_ns = True

    def __init__(self, model: Model, marker: Optional[bytes]) -> None:
        self.fs = model
        self.marker = marker
        self._lock = threading.RLock()
        self.killed = 0

    # every operation runs under the one lock, and the cut is checked first
    def _do(self, fn, *args: Any) -> Any:
        with self._lock:
            try:
                return fn(*args)
            except PowerCut:
                if not self.killed:
                    self.killed = kill_marked(self.marker) or -1
                raise mfusepy.FuseOSError(errno.EIO) from None
            except OSError as err:
                raise mfusepy.FuseOSError(err.errno or errno.EIO) from None

    def _node(self, path: Optional[str], fh: Optional[int]):
        return self.fs.node(fh) if fh else self.fs.lookup(path or "/")

    def _context(self) -> tuple:
        uid, gid, _ = mfusepy.fuse_get_context()
        return uid, gid

    # ---- reading ----------------------------------------------------------------------------------
    def getattr(self, path: str, fh: Optional[int] = None) -> dict:
        def attrs() -> dict:
            self.fs.check_power()
            node = self._node(path, fh)
            size = len(node.data) if node.kind == "f" else len(node.target) if node.kind == "l" else 4096
            return {"st_mode": node.type_bits | node.mode, "st_ino": node.ino, "st_nlink": max(node.nlink, 1),
                    "st_uid": node.uid, "st_gid": node.gid, "st_size": size, "st_blocks": (size + 511) // 512,
                    "st_atime": node.atime, "st_mtime": node.mtime, "st_ctime": node.ctime, "st_blksize": 4096}
        return self._do(attrs)

    def readdir(self, path: str, fh: int) -> list:
        def names() -> list:
            self.fs.check_power()
            node = self._node(path, None)
            return [".", ".."] + [(n, {"st_mode": self.fs.nodes[i].type_bits, "st_ino": i}, 0)
                                  for n, i in node.entries.items()]
        return self._do(names)

    def readlink(self, path: str) -> str:
        def target() -> str:
            self.fs.check_power()
            node = self.fs.lookup(path)
            if node.kind != "l":
                raise OSError(errno.EINVAL, path)
            return node.target
        return self._do(target)

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        def data() -> bytes:
            self.fs.check_power()
            return bytes(self.fs.node(fh).data[offset:offset + size])
        return self._do(data)

    def statfs(self, path: str) -> dict:
        return {"f_bsize": 4096, "f_frsize": 4096, "f_blocks": 4 << 20, "f_bfree": 3 << 20, "f_bavail": 3 << 20,
                "f_files": 1 << 20, "f_ffree": 1 << 19, "f_favail": 1 << 19, "f_namemax": 255}

    def access(self, path: str, amode: int) -> int:
        return self._do(lambda: (self.fs.check_power(), self.fs.lookup(path)) and 0)

    # ---- opening ----------------------------------------------------------------------------------
    def open(self, path: str, flags: int) -> int:
        def opened() -> int:
            self.fs.check_power()
            node = self.fs.lookup(path)
            node.opened += 1
            return node.ino
        return self._do(opened)

    def opendir(self, path: str) -> int:
        return self._do(lambda: (self.fs.check_power(), self.fs.lookup(path).ino)[1])

    def release(self, path: str, fh: int) -> int:
        def closed() -> int:
            node = self.fs.nodes.get(fh)
            if node is not None:
                node.opened -= 1
            return 0
        with self._lock:
            return closed()

    def releasedir(self, path: str, fh: int) -> int:
        return 0

    def flush(self, path: str, fh: int) -> int:
        return 0

    # ---- changing ---------------------------------------------------------------------------------
    def create(self, path: str, mode: int, fi: Any = None) -> int:
        def made() -> int:
            node = self.fs.create(path, "f", mode, *self._context())
            node.opened += 1
            return node.ino
        return self._do(made)

    def mknod(self, path: str, mode: int, dev: int) -> int:
        raise mfusepy.FuseOSError(errno.EPERM)

    def mkdir(self, path: str, mode: int) -> int:
        return self._do(lambda: self.fs.create(path, "d", mode, *self._context()) and 0)

    def symlink(self, target: str, source: str) -> int:
        # mfusepy: symlink(path of the new link, what it points at)
        return self._do(lambda: self.fs.create(target, "l", 0o777, *self._context(), target=source) and 0)

    def link(self, target: str, source: str) -> int:
        return self._do(lambda: self.fs.link(source, target) and 0)

    def unlink(self, path: str) -> int:
        return self._do(lambda: self.fs.unlink(path, False) or 0)

    def rmdir(self, path: str) -> int:
        return self._do(lambda: self.fs.unlink(path, True) or 0)

    def rename(self, old: str, new: str, flags: int = 0) -> int:
        return self._do(lambda: self.fs.rename(old, new, flags) or 0)

    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        return self._do(self.fs.write, fh, offset, data, path or f"<inode {fh}>")

    def truncate(self, path: str, length: int, fh: Optional[int] = None) -> int:
        return self._do(lambda: self.fs.truncate(self._node(path, fh), length, path or f"<inode {fh}>") or 0)

    def chmod(self, path: str, mode: int) -> int:
        return self._do(lambda: self.fs.setattr(self.fs.lookup(path), "chmod", path, mode=mode) or 0)

    def chown(self, path: str, uid: int, gid: int) -> int:
        return self._do(lambda: self.fs.setattr(self.fs.lookup(path), "chown", path, uid=uid, gid=gid) or 0)

    def utimens(self, path: str, times: Optional[tuple] = None) -> int:
        now = time.time_ns()
        times = tuple(int(t) for t in times) if times else (now, now)
        return self._do(lambda: self.fs.setattr(self.fs.lookup(path), "utimens", path, times=times) or 0)

    def fsync(self, path: str, datasync: int, fh: int) -> int:
        return self._do(lambda: self.fs.fsync(fh, bool(datasync), path or f"<inode {fh}>") or 0)

    def fsyncdir(self, path: str, datasync: int, fh: int) -> int:
        return self._do(lambda: self.fs.fsync(self.fs.lookup(path).ino, bool(datasync), path) or 0)


class PowerCutFUSE(mfusepy.FUSE):
    """mfusepy drops rename's flags (RENAME_EXCHANGE, RENAME_NOREPLACE); the agent uses them."""

    def rename_fuse_3(self, old: bytes, new: bytes, flags: int) -> int:
        return self.operations.rename(old.decode(self.encoding, self.errors), new.decode(self.encoding, self.errors),
                                      flags)


def serve_control(path: str, ops: Ops, backing: str, mountpoint: str) -> None:
    if os.path.exists(path):
        os.unlink(path)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(4)

    def handle(conn: socket.socket) -> None:
        with conn, conn.makefile("rwb") as stream:
            for line in stream:
                request = json.loads(line)
                reply = command(request)
                stream.write((json.dumps(reply) + "\n").encode())
                stream.flush()
                if request.get("cmd") == "unmount":
                    subprocess.run(["fusermount3", "-u", "-z", mountpoint], check=False)
                    return

    def command(request: dict) -> dict:
        cmd = request.get("cmd")
        fs = ops.fs
        with ops._lock:
            if cmd == "arm":
                fs.names = []
                if "match" in request:
                    fs.cut_match, fs.matched = (str(request["match"]), int(request["nth"])), 0
                elif "after" in request:
                    fs.cut_at = fs.counters.ops + int(request["after"])
            elif cmd == "names":
                return {"ok": True, "names": fs.names}
            elif cmd == "sync_all":
                fs.sync_everything()
            elif cmd == "no_syncs":
                fs.fail_syncs = bool(request.get("on", True))
            elif cmd == "poweroff":
                if fs.cut is None:
                    fs.cut = f"power off after operation {fs.counters.ops}"
                    ops.killed = kill_marked(ops.marker) or -1
            elif cmd == "unmount":
                if fs.cut is None:
                    fs.cut = f"unmounted after operation {fs.counters.ops}"
                fs.save(backing)
            elif cmd != "stats":
                return {"error": f"unknown command {cmd!r}"}
            return {"ok": True, "ops": fs.counters.ops, "cut": fs.cut, "killed": ops.killed, "model": fs.model,
                    "counters": fs.counters.as_dict(), "trace": fs.trace[-12:]}

    def accept() -> None:
        while True:
            conn, _ = server.accept()
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.powercut.fs")
    parser.add_argument("backing")
    parser.add_argument("mountpoint")
    parser.add_argument("--model", choices=("data", "strict", "posix"), default="data")
    parser.add_argument("--control", required=True)
    parser.add_argument("--kill-env", default="")
    args = parser.parse_args(argv)
    os.makedirs(args.backing, exist_ok=True)
    model = Model.load(args.backing, args.model)
    ops = Ops(model, args.kill_env.encode() or None)
    serve_control(args.control, ops, args.backing, args.mountpoint)
    PowerCutFUSE(ops, args.mountpoint, foreground=True, use_ino=True, hard_remove=True, default_permissions=True,
                 fsname="powercut", attr_timeout=0.0, entry_timeout=0.0, negative_timeout=0.0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
