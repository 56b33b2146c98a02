"""The power-cut file system itself: what each model keeps across a cut, in memory (the model)
and through a real FUSE mount (a process writes, the power goes, the mount comes back)."""
from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import uuid

import pytest

from tests.powercut.model import Model, PowerCut
from tests.powercut.sweep import Mount, fuse_available, kill_device


def names(image: dict, ino: int = 1) -> dict:
    """path -> content (files), "dir", or "->target", from a durable image."""
    out = {}
    stack = [("", ino)]
    while stack:
        prefix, i = stack.pop()
        for name, child in image["nodes"][i]["entries"].items():
            node, path = image["nodes"][child], prefix + "/" + name
            if node["kind"] == "d":
                out[path] = "dir"
                stack.append((path, child))
            else:
                out[path] = node.get("data", "->" + node.get("target", ""))
    return out


def write_file(fs: Model, path: str, data: bytes, sync: bool) -> int:
    node = fs.create(path, "f", 0o644, 0, 0)
    fs.write(node.ino, 0, data, path)
    if sync:
        fs.fsync(node.ino, False, path)
    return node.ino


@pytest.mark.parametrize("model", ["data", "strict"])
def test_unsynced_data_is_lost_and_synced_data_kept(model):
    fs = Model(model)
    fs.create("/d", "d", 0o755, 0, 0)
    write_file(fs, "/d/synced", b"kept", sync=True)
    write_file(fs, "/d/unsynced", b"lost", sync=False)
    fs.fsync(fs.lookup("/d").ino, False, "/d")
    image = names(fs.durable_image())
    assert image["/d/synced"] == b"kept"
    assert image["/d/unsynced"] == b""  # the name is there, the data never was made durable


def test_data_model_keeps_names_at_once_strict_only_after_the_directory_sync():
    fs = Model("data")
    write_file(fs, "/a", b"x", sync=True)
    fs.rename("/a", "/b")
    assert names(fs.durable_image()) == {"/b": b"x"}
    fs = Model("strict")
    write_file(fs, "/a", b"x", sync=True)  # its data is durable, its name is not
    fs.rename("/a", "/b")
    assert names(fs.durable_image()) == {}
    fs = Model("strict")
    write_file(fs, "/a", b"x", sync=True)
    fs.fsync(1, False, "/")
    fs.rename("/a", "/b")
    fs.fsync(1, False, "/")
    assert names(fs.durable_image()) == {"/b": b"x"}


def test_strict_sync_of_one_directory_persists_the_log_before_it_in_order():
    fs = Model("strict")
    fs.create("/x", "d", 0o755, 0, 0)
    fs.create("/y", "d", 0o755, 0, 0)
    write_file(fs, "/x/f", b"1", sync=True)
    write_file(fs, "/y/g", b"2", sync=True)
    fs.fsync(fs.lookup("/x").ino, False, "/x")  # up to /x/f: /x, /y and /x/f, not /y/g
    assert names(fs.durable_image()) == {"/x": "dir", "/y": "dir", "/x/f": b"1"}


def test_rename_exchange_and_a_file_renamed_over_before_its_sync():
    fs = Model("data")
    write_file(fs, "/journal", b"step 1", sync=True)
    write_file(fs, "/journal.tmp", b"step 2", sync=False)
    fs.rename("/journal.tmp", "/journal")
    assert names(fs.durable_image()) == {"/journal": b""}  # the classic: renamed in, comes back empty
    fs.create("/a", "d", 0o755, 0, 0)
    fs.create("/b", "d", 0o755, 0, 0)
    write_file(fs, "/a/in-a", b"A", sync=True)
    fs.rename("/a", "/b", flags=2)
    assert names(fs.durable_image())["/b/in-a"] == b"A"


def test_the_cut_stops_every_operation_and_keeps_inode_numbers(tmp_path):
    fs = Model("data")
    fs.create("/d", "d", 0o755, 0, 0)
    ino = write_file(fs, "/d/f", b"durable", sync=True)
    fs.cut_at = fs.counters.ops + 3
    write_file(fs, "/d/g", b"", sync=False)  # operations 1 and 2 of 3: create, write
    with pytest.raises(PowerCut):
        fs.rename("/d/f", "/d/h")
    with pytest.raises(PowerCut):
        fs.create("/d/z", "f", 0o644, 0, 0)
    assert "rename /d/f -> /d/h" in fs.cut
    fs.save(str(tmp_path))
    again = Model.load(str(tmp_path), "data")
    assert again.lookup("/d/f").ino == ino and bytes(again.lookup("/d/f").data) == b"durable"
    assert not os.path.exists(tmp_path / "d")


# ---- through a real FUSE mount ------------------------------------------------------------------
WRITER = r"""
import os, sys
root = sys.argv[1]
def put(name, data, sync):
    fd = os.open(os.path.join(root, name), os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
    os.write(fd, data)
    if sync:
        os.fsync(fd)
    os.close(fd)
put("synced", b"kept", True)
put("unsynced", b"lost", False)
put("journal.tmp", b"new", False)
os.replace(os.path.join(root, "journal.tmp"), os.path.join(root, "journal"))
print("written", flush=True)
sys.stdin.read()  # holds on until the power goes
"""


@pytest.mark.parametrize("model", ["data", "strict"])
def test_a_mount_forgets_what_was_not_durable(tmp_path, model):
    why = fuse_available()
    if why:
        pytest.skip(f"no FUSE here: {why}")
    marker = f"GGC_OTA_POWERCUT_TEST={uuid.uuid4().hex}"
    backing, root = tmp_path / "disk", tmp_path / "root"
    with Mount(backing, root, model, marker) as m:
        fd = os.open(root, os.O_RDONLY)
        os.fsync(fd)  # an empty root, made durable
        os.close(fd)
        env = {**os.environ, marker.split("=")[0]: marker.split("=")[1]}
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(root)], env=env, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "written"
        assert (root / "unsynced").read_bytes() == b"lost"  # every process sees it until the cut
        state = m.ask("poweroff")
        assert state["cut"] and state["killed"] >= 1
        kill_device(marker)
        assert proc.wait(10) == -9
        assert m.ask("stats")["counters"]["fsync"] == 1
    with Mount(backing, root, model, marker):
        if model == "data":
            assert (root / "synced").read_bytes() == b"kept"
            assert (root / "unsynced").read_bytes() == b""
            assert (root / "journal").read_bytes() == b""  # renamed over before its sync: empty
        else:  # no directory was synced after the files were created: no name survives
            assert sorted(os.listdir(root)) == []


def test_a_mount_exchanges_with_renameat2(tmp_path):
    why = fuse_available()
    if why:
        pytest.skip(f"no FUSE here: {why}")
    with Mount(tmp_path / "disk", tmp_path / "root", "data", "X=1"):
        a, b = tmp_path / "root/a", tmp_path / "root/b"
        a.mkdir()
        b.mkdir()
        (a / "in-a").write_text("A")
        ino_a = a.stat().st_ino
        libc = ctypes.CDLL(None, use_errno=True)
        assert libc.renameat2(-100, bytes(a), -100, bytes(b), 2) == 0, os.strerror(ctypes.get_errno())
        assert (b / "in-a").read_text() == "A" and b.stat().st_ino == ino_a


def test_strict_a_file_renamed_over_lives_on_in_the_durable_namespace():
    """The live name moves to a new inode; until the directory is synced a cut brings the old
    inode back, whole (found by the sweep: the model forgot inodes the live tree had dropped)."""
    fs = Model("strict")
    write_file(fs, "/journal", b"step 1", sync=True)
    fs.fsync(1, False, "/")
    write_file(fs, "/journal.tmp", b"step 2", sync=True)
    fs.rename("/journal.tmp", "/journal")
    assert names(fs.durable_image()) == {"/journal": b"step 1"}
    fs.fsync(1, False, "/")
    assert names(fs.durable_image()) == {"/journal": b"step 2"}


def test_posix_a_directory_sync_persists_only_that_directorys_operations():
    fs = Model("posix")
    fs.create("/x", "d", 0o755, 0, 0)
    fs.create("/y", "d", 0o755, 0, 0)
    fs.fsync(1, False, "/")
    write_file(fs, "/y/g", b"2", sync=True)
    write_file(fs, "/x/f", b"1", sync=True)
    fs.fsync(fs.lookup("/x").ino, False, "/x")  # /x/f only: /y/g, created before it, waits for /y
    assert names(fs.durable_image()) == {"/x": "dir", "/y": "dir", "/x/f": b"1"}
    fs.rename("/x/f", "/y/f")  # touches both: wholly durable when either is synced
    fs.fsync(fs.lookup("/y").ino, False, "/y")
    assert names(fs.durable_image()) == {"/x": "dir", "/y": "dir", "/y/g": b"2", "/y/f": b"1"}
