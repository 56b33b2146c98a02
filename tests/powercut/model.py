"""What a power cut keeps: an in-memory file system that remembers, beside what every process
sees, what has been made durable, under one of two models (docs/powercut.md):

- "data" (LazyFS's): a file's data is durable only once that file is fsynced (fsync or
  fdatasync); names (create, mkdir, symlink, link, unlink, rmdir, rename) are durable at once,
  in order.
- "strict" (POSIX): data as above; a name operation is durable only once a directory it touched
  is fsynced, and then together with every name operation before it (a journaling file system
  commits its log in order: the sync of one directory makes the whole log up to that operation
  durable, never a later one).
- "posix" (POSIX's letter): data as above; a directory sync makes durable only the name
  operations that touched that directory (a rename between two directories wholly), in order;
  the others wait for a sync of their own directory.

Both models keep inode attributes (mode, owner, times) at once, and an inode's identity (its
number) across the cut, as a disk does. Un-synced data reverts whole to what was last synced
(an empty file if it never was).

The FUSE side (tests/powercut/fs.py) calls the operations here; they take and return plain
values and raise OSError with the errno a kernel would give.
"""
from __future__ import annotations

import errno
import json
import os
import re
import stat
import time
from typing import Dict, List, Optional, Tuple

MODELS = ("data", "strict", "posix")
ROOT_INO = 1


class Node:
    __slots__ = ("ino", "kind", "mode", "uid", "gid", "mtime", "ctime", "atime", "data", "durable", "entries",
                 "target", "nlink", "opened")

    def __init__(self, ino: int, kind: str, mode: int, uid: int = 0, gid: int = 0) -> None:
        self.ino, self.kind, self.mode, self.uid, self.gid = ino, kind, mode & 0o7777, uid, gid
        self.mtime = self.ctime = self.atime = time.time_ns()
        self.data = bytearray()             # files: what every process reads
        self.durable = b""                  # files: what a power cut keeps
        self.entries: Dict[str, int] = {}   # directories: name -> inode
        self.target = ""                    # symlinks
        self.nlink = 0
        self.opened = 0

    @property
    def type_bits(self) -> int:
        return {"f": stat.S_IFREG, "d": stat.S_IFDIR, "l": stat.S_IFLNK}[self.kind]


class Counters:
    """What the device wrote: operations, bytes, syncs; by category of path (see category())."""

    def __init__(self) -> None:
        self.ops = 0
        self.bytes = 0
        self.fsync = 0
        self.fdatasync = 0
        self.fsyncdir = 0
        self.by_category: Dict[str, Dict[str, int]] = {}

    def add(self, category: str, key: str, amount: int = 1) -> None:
        bucket = self.by_category.setdefault(category, {"bytes": 0, "syncs": 0, "ops": 0})
        bucket[key] += amount

    def as_dict(self) -> dict:
        return {"ops": self.ops, "bytes": self.bytes, "fsync": self.fsync, "fdatasync": self.fdatasync,
                "fsyncdir": self.fsyncdir, "byCategory": self.by_category}


KEPT_PATHS = ("deployment", "var", "local.conf")  # the sweep's keep list, inside the staged ggc/


def category(path: str, verb: str = "") -> str:
    """Which phase of an update an operation belongs to (the flash-wear report's rows)."""
    parts = [p for p in path.split("/") if p]
    if verb in ("unlink", "rmdir"):
        return "clean-up"
    if verb.startswith("rename") and (parts[-1:] in (["new"], ["old"]) or parts in (["ggc"], ["ota"])
                                      or path.endswith(".rejected")):
        return "swap"
    if not parts:  # the root, whose entries the swap changes
        return "swap"
    if parts[0] == "ota-state":
        if len(parts) == 1:
            return "journal and statuses"
        if parts[1] == "downloads":
            return "download"
        if parts[1] == "staging":
            return "kept state" if len(parts) > 4 and parts[3] == "new" and parts[4] in KEPT_PATHS else "unpack"
        return "journal and statuses"
    if parts and parts[0] in ("ggc", "ota"):
        return "swap"
    return "other"


def normalize(what: str) -> str:
    """An operation as the sweep names a cut point: job ids, temp-file suffixes, sizes and
    offsets left out, so the same point of two runs of one update has the same name."""
    what = re.sub(r"GreengrassUpdateJob_[0-9a-f-]+", "JOB", what)
    what = re.sub(r"\.tmp\d+", ".tmp", what)
    what = re.sub(r"-\d{9,}", "-TIME", what)
    return re.sub(r"^write \d+ bytes at \d+ of", "write of", what)


class PowerCut(Exception):
    """Raised by an operation once the power is off: the operation did not happen."""


class Model:
    def __init__(self, model: str = "data") -> None:
        if model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}")
        self.model = model
        self.nodes: Dict[int, Node] = {}
        self.next_ino = ROOT_INO + 1
        root = Node(ROOT_INO, "d", 0o755)
        root.nlink = 2
        self.nodes[ROOT_INO] = root
        # the durable namespace: directory inode -> {name: inode}; in the data model it always
        # equals the live one, in the strict model it lags by the name operations in `pending`
        self.durable_dirs: Dict[int, Dict[str, int]] = {ROOT_INO: {}}
        self.pending: List[Tuple[tuple, frozenset]] = []
        self.counters = Counters()
        self.cut_at: Optional[int] = None   # the operation count at which the power goes
        self.cut_match: Optional[Tuple[str, int]] = None  # or at the n-th operation of this name
        self.matched = 0
        self.names: List[str] = []          # every operation's normalized name since the last arm
        self.cut: Optional[str] = None      # the operation that did not happen
        self.trace: List[str] = []          # the last operations, for a failure's report
        self.fail_syncs = False             # sync calls do nothing (a test that the sweep can fail)

    # ---- looking up -----------------------------------------------------------------------------
    def lookup(self, path: str) -> Node:
        node = self.nodes[ROOT_INO]
        for part in [p for p in path.split("/") if p]:
            if node.kind != "d":
                raise OSError(errno.ENOTDIR, path)
            ino = node.entries.get(part)
            if ino is None:
                raise OSError(errno.ENOENT, path)
            node = self.nodes[ino]
        return node

    def parent_of(self, path: str) -> Tuple[Node, str]:
        head, _, name = path.rstrip("/").rpartition("/")
        parent = self.lookup(head or "/")
        if parent.kind != "d":
            raise OSError(errno.ENOTDIR, path)
        if not name or len(name.encode()) > 255:
            raise OSError(errno.ENAMETOOLONG if name else errno.EINVAL, path)
        return parent, name

    def node(self, ino: int) -> Node:
        try:
            return self.nodes[ino]
        except KeyError:
            raise OSError(errno.EBADF, str(ino)) from None

    # ---- the cut --------------------------------------------------------------------------------
    def tick(self, what: str, path: str) -> None:
        """Count one state-changing operation; at the armed count the power goes before it."""
        if self.cut is not None:
            raise PowerCut(self.cut)
        name = normalize(what)
        if self.cut_match is not None and name == self.cut_match[0]:
            self.matched += 1
            if self.matched >= self.cut_match[1]:
                self.cut = f"operation {self.counters.ops + 1}: {what}"
                raise PowerCut(self.cut)
        if self.cut_at is not None and self.counters.ops + 1 >= self.cut_at:
            self.cut = f"operation {self.counters.ops + 1}: {what}"
            raise PowerCut(self.cut)
        self.names.append(name)
        self.counters.ops += 1
        self.counters.add(category(path, what.split(" ", 1)[0]), "ops")
        self.trace.append(f"{self.counters.ops}: {what}")
        del self.trace[:-40]

    def check_power(self) -> None:
        if self.cut is not None:
            raise PowerCut(self.cut)

    # ---- names: every change goes to the live namespace now, and to the durable one as the model says
    def _name_op(self, op: tuple, dirs: Tuple[int, ...]) -> None:
        self.pending.append((op, frozenset(dirs)))
        if self.model == "data":
            self._persist(len(self.pending))

    def _persist(self, upto: int) -> None:
        for op, _ in self.pending[:upto]:
            self._apply_durable(op)
        del self.pending[:upto]

    def _apply_durable(self, op: tuple) -> None:
        kind = op[0]
        if kind == "add":
            _, parent, name, ino, is_dir = op
            self.durable_dirs.setdefault(parent, {})[name] = ino
            if is_dir:
                self.durable_dirs.setdefault(ino, {})
        elif kind == "del":
            _, parent, name, ino = op
            entries = self.durable_dirs.setdefault(parent, {})
            if entries.get(name) == ino:
                del entries[name]
        elif kind == "rename":  # by the inodes it moved, as the operation saw them
            _, p1, n1, p2, n2, exchange, moving, there = op
            d1, d2 = self.durable_dirs.setdefault(p1, {}), self.durable_dirs.setdefault(p2, {})
            if exchange:
                d1[n1], d2[n2] = there, moving
            else:
                if d1.get(n1) == moving:
                    del d1[n1]
                d2[n2] = moving

    def sync_dir(self, ino: int) -> None:
        """fsync of a directory. strict: the name log up to the last operation that touched it;
        posix: only the operations that touched it (a rename wholly), in order."""
        if self.fail_syncs or self.model == "data":
            return
        if self.model == "posix":
            # the operations on this directory, and every earlier one on a directory they touch
            # (transitively): each directory's durable entries stay a snapshot of its own history
            chosen, needed = set(), {ino}
            for i in range(len(self.pending) - 1, -1, -1):
                if self.pending[i][1] & needed:
                    chosen.add(i)
                    needed |= self.pending[i][1]
            for i in sorted(chosen):
                self._apply_durable(self.pending[i][0])
            self.pending = [entry for i, entry in enumerate(self.pending) if i not in chosen]
            return
        last = max((i for i, (_, dirs) in enumerate(self.pending) if ino in dirs), default=-1)
        self._persist(last + 1)

    def sync_file(self, ino: int) -> None:
        if self.fail_syncs:
            return
        node = self.node(ino)
        if node.kind == "f":
            node.durable = bytes(node.data)

    def sync_everything(self) -> None:
        """What the harness does once a test device is set up: all of it is durable."""
        self._persist(len(self.pending))
        for node in self.nodes.values():
            if node.kind == "f":
                node.durable = bytes(node.data)

    # ---- operations -----------------------------------------------------------------------------
    def _new_node(self, kind: str, mode: int, uid: int, gid: int) -> Node:
        node = Node(self.next_ino, kind, mode, uid, gid)
        self.next_ino += 1
        self.nodes[node.ino] = node
        return node

    def _link_name(self, parent: Node, name: str, node: Node) -> None:
        if name in parent.entries:
            raise OSError(errno.EEXIST, name)
        parent.entries[name] = node.ino
        node.nlink += 2 if node.kind == "d" else 1
        if node.kind == "d":
            parent.nlink += 1
        parent.mtime = parent.ctime = time.time_ns()
        self._name_op(("add", parent.ino, name, node.ino, node.kind == "d"), (parent.ino,))

    def create(self, path: str, kind: str, mode: int, uid: int, gid: int, target: str = "") -> Node:
        parent, name = self.parent_of(path)
        if name in parent.entries:
            raise OSError(errno.EEXIST, path)
        self.tick(f"{ {'f': 'create', 'd': 'mkdir', 'l': 'symlink'}[kind]} {path}", path)
        node = self._new_node(kind, mode, uid, gid)
        node.target = target
        self._link_name(parent, name, node)
        return node

    def link(self, existing: str, path: str) -> Node:
        node = self.lookup(existing)
        if node.kind == "d":
            raise OSError(errno.EPERM, existing)
        parent, name = self.parent_of(path)
        if name in parent.entries:
            raise OSError(errno.EEXIST, path)
        self.tick(f"link {existing} -> {path}", path)
        self._link_name(parent, name, node)
        return node

    def _drop_name(self, parent: Node, name: str) -> None:
        node = self.nodes[parent.entries.pop(name)]
        node.nlink -= 2 if node.kind == "d" else 1
        if node.kind == "d":
            parent.nlink -= 1
        parent.mtime = parent.ctime = time.time_ns()
        # the node itself stays: the durable namespace may still name it (a file renamed over
        # before the directory was synced), and an image keeps only what it reaches

    def unlink(self, path: str, is_dir: bool) -> None:
        parent, name = self.parent_of(path)
        if name not in parent.entries:
            raise OSError(errno.ENOENT, path)
        node = self.nodes[parent.entries[name]]
        if is_dir and node.kind != "d":
            raise OSError(errno.ENOTDIR, path)
        if not is_dir and node.kind == "d":
            raise OSError(errno.EISDIR, path)
        if is_dir and node.entries:
            raise OSError(errno.ENOTEMPTY, path)
        self.tick(f"{'rmdir' if is_dir else 'unlink'} {path}", path)
        self._name_op(("del", parent.ino, name, node.ino), (parent.ino,))
        self._drop_name(parent, name)

    def rename(self, old: str, new: str, flags: int = 0) -> None:
        exchange, noreplace = bool(flags & 2), bool(flags & 1)
        p1, n1 = self.parent_of(old)
        p2, n2 = self.parent_of(new)
        if n1 not in p1.entries:
            raise OSError(errno.ENOENT, old)
        moving = self.nodes[p1.entries[n1]]
        there = self.nodes.get(p2.entries.get(n2, -1))
        if exchange and there is None:
            raise OSError(errno.ENOENT, new)
        if noreplace and there is not None:
            raise OSError(errno.EEXIST, new)
        if moving.kind == "d" and self._is_under(p2, moving):
            raise OSError(errno.EINVAL, new)
        if exchange and there is not None and there.kind == "d" and self._is_under(p1, there):
            raise OSError(errno.EINVAL, old)
        if there is not None and not exchange:
            if there.ino == moving.ino:
                return
            if moving.kind == "d" and there.kind != "d":
                raise OSError(errno.ENOTDIR, new)
            if moving.kind != "d" and there.kind == "d":
                raise OSError(errno.EISDIR, new)
            if there.kind == "d" and there.entries:
                raise OSError(errno.ENOTEMPTY, new)
        self.tick(f"rename{' (exchange)' if exchange else ''} {old} -> {new}", new)
        if exchange:
            p1.entries[n1], p2.entries[n2] = there.ino, moving.ino
            for node, src, dst in ((moving, p1, p2), (there, p2, p1)):
                if node.kind == "d":
                    src.nlink -= 1
                    dst.nlink += 1
        else:
            if there is not None:
                self._drop_name(p2, n2)
            del p1.entries[n1]
            p2.entries[n2] = moving.ino
            if moving.kind == "d":
                p1.nlink -= 1
                p2.nlink += 1
        now = time.time_ns()
        p1.mtime = p2.mtime = p1.ctime = p2.ctime = moving.ctime = now
        self._name_op(("rename", p1.ino, n1, p2.ino, n2, exchange, moving.ino, there.ino if there else None),
                      (p1.ino, p2.ino))

    def _is_under(self, node: Node, ancestor: Node) -> bool:
        """Whether directory `node` is `ancestor` or inside it (a rename that would make a loop)."""
        if node.ino == ancestor.ino:
            return True
        stack = [ancestor]
        while stack:
            d = stack.pop()
            for ino in d.entries.values():
                child = self.nodes[ino]
                if child.kind == "d":
                    if child.ino == node.ino:
                        return True
                    stack.append(child)
        return False

    def write(self, ino: int, offset: int, data: bytes, path: str) -> int:
        node = self.node(ino)
        self.tick(f"write {len(data)} bytes at {offset} of {path}", path)
        if offset > len(node.data):
            node.data.extend(b"\0" * (offset - len(node.data)))
        node.data[offset:offset + len(data)] = data
        node.mtime = node.ctime = time.time_ns()
        self.counters.bytes += len(data)
        self.counters.add(category(path, "write"), "bytes", len(data))
        return len(data)

    def truncate(self, node: Node, length: int, path: str) -> None:
        if node.kind != "f":
            raise OSError(errno.EISDIR, path)
        self.tick(f"truncate {path} to {length}", path)
        if length < len(node.data):
            del node.data[length:]
        else:
            node.data.extend(b"\0" * (length - len(node.data)))
        node.mtime = node.ctime = time.time_ns()

    def setattr(self, node: Node, what: str, path: str, mode: Optional[int] = None, uid: int = -1, gid: int = -1,
                times: Optional[Tuple[int, int]] = None) -> None:
        self.tick(f"{what} {path}", path)
        if mode is not None:
            node.mode = mode & 0o7777
        if uid != -1:
            node.uid = uid
        if gid != -1:
            node.gid = gid
        if times is not None:
            node.atime, node.mtime = times
        node.ctime = time.time_ns()

    def fsync(self, ino: int, datasync: bool, path: str) -> None:
        node = self.node(ino)
        self.tick(f"{'fdatasync' if datasync else 'fsync'}{'dir' if node.kind == 'd' else ''} {path}", path)
        self.counters.add(category(path, "fsync"), "syncs")
        if node.kind == "d":
            self.counters.fsyncdir += 1
            self.sync_dir(ino)
        else:
            if datasync:
                self.counters.fdatasync += 1
            else:
                self.counters.fsync += 1
            self.sync_file(ino)

    # ---- the durable image ----------------------------------------------------------------------
    def durable_image(self) -> dict:
        """What a power cut now would leave: every inode reachable from the root through durable
        names, files with their durable data."""
        nodes: Dict[int, dict] = {}
        stack = [ROOT_INO]
        while stack:
            ino = stack.pop()
            if ino in nodes or ino not in self.nodes:
                continue
            node = self.nodes[ino]
            entry = {"kind": node.kind, "mode": node.mode, "uid": node.uid, "gid": node.gid,
                     "mtime": node.mtime}
            if node.kind == "d":
                names = {n: i for n, i in self.durable_dirs.get(ino, {}).items() if i in self.nodes}
                entry["entries"] = names
                stack.extend(names.values())
            elif node.kind == "l":
                entry["target"] = node.target
            else:
                entry["data"] = node.durable
            nodes[ino] = entry
        return {"next": self.next_ino, "nodes": nodes}

    def save(self, directory: str) -> None:
        """Write the durable image into `directory` (the backing store): image.json and one file
        per inode's data, written whole and synced (this is the test's disk, not the device's)."""
        image = self.durable_image()
        data_dir = os.path.join(directory, "data")
        os.makedirs(data_dir, exist_ok=True)
        for name in os.listdir(data_dir):
            os.unlink(os.path.join(data_dir, name))
        meta = {"next": image["next"], "nodes": {}}
        for ino, entry in image["nodes"].items():
            entry = dict(entry)
            if "data" in entry:
                with open(os.path.join(data_dir, str(ino)), "wb") as f:
                    f.write(entry.pop("data"))
            meta["nodes"][str(ino)] = entry
        tmp = os.path.join(directory, "image.json.tmp")
        with open(tmp, "w") as f:
            json.dump(meta, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(directory, "image.json"))

    @classmethod
    def load(cls, directory: str, model: str) -> Model:
        """A model whose every node is durable, from an image `save` wrote (or an empty one)."""
        fs = cls(model)
        path = os.path.join(directory, "image.json")
        if not os.path.exists(path):
            return fs
        with open(path) as f:
            meta = json.load(f)
        fs.nodes.clear()
        fs.durable_dirs.clear()
        for key, entry in meta["nodes"].items():
            ino = int(key)
            node = Node(ino, entry["kind"], entry["mode"], entry["uid"], entry["gid"])
            node.mtime = node.ctime = node.atime = entry["mtime"]
            if node.kind == "d":
                node.entries = {n: int(i) for n, i in entry["entries"].items()}
                fs.durable_dirs[ino] = dict(node.entries)
            elif node.kind == "l":
                node.target = entry["target"]
            else:
                with open(os.path.join(directory, "data", key), "rb") as f:
                    node.data = bytearray(f.read())
                node.durable = bytes(node.data)
            fs.nodes[ino] = node
        for node in fs.nodes.values():
            if node.kind == "d":
                node.nlink += 2 if node.ino == ROOT_INO else 0
                for ino in node.entries.values():
                    child = fs.nodes[ino]
                    child.nlink += 2 if child.kind == "d" else 1
                    if child.kind == "d":
                        node.nlink += 1
        fs.next_ino = meta["next"]
        return fs
