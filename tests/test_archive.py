"""ggc_ota's archive section: real artifacts unpack and pass the layout check; every hostile
member is refused before it is written, a refusal leaves nothing behind, and nothing lands
outside staging."""
from __future__ import annotations

import gzip
import io
import os
import stat
import tarfile
import threading

import pytest

import ggc_ota as g
from tests.cloud.device import build_agent_artifact, build_core_artifact, build_raw_artifact


def member(name, kind=tarfile.REGTYPE, data=b"x", mode=0o644, linkname=""):
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.linkname = kind, mode, linkname
    info.uid = info.gid = 4242
    return info, (data if kind == tarfile.REGTYPE else None)


def tree(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def test_core_artifact_unpacks_and_passes_layout(tmp_path):
    art = build_core_artifact(tmp_path / "core.tar.gz", "1.11.6", payload_bytes=50_000)
    staging = tmp_path / "staging"
    assert g.unpack(str(art.path), str(staging)) > 5
    ggc = g.check_layout(str(staging), "core")
    assert ggc == str(staging / "greengrass/ggc")
    assert (staging / "greengrass/ggc/packages/1.11.6/VERSION").read_text() == "1.11.6\n"
    assert os.readlink(staging / "greengrass/ggc/packages/1.11.6/lib/VERSION.link") == "../VERSION"
    assert os.access(staging / "greengrass/ggc/core/greengrassd", os.X_OK)
    with pytest.raises(g.BadLayout):
        g.check_layout(str(staging), "ota_agent")


def test_agent_artifact_layout(tmp_path):
    agent = tmp_path / "agent"
    agent.write_text("#!/bin/sh\necho hi\n")
    art = build_agent_artifact(tmp_path / "a.tar.gz", agent)
    g.unpack(str(art.path), str(tmp_path / "st"))
    assert g.check_layout(str(tmp_path / "st"), "ota_agent").endswith("greengrass/ota")
    with pytest.raises(g.BadLayout):
        g.check_layout(str(tmp_path / "st"), "core")


def test_agent_that_is_not_executable_is_refused(tmp_path):
    art = build_raw_artifact(tmp_path / "a.tar.gz", [member("greengrass/ota/ota_agent/ggc-ota", mode=0o644)])
    g.unpack(str(art.path), str(tmp_path / "st"))
    with pytest.raises(g.BadLayout, match="executable"):
        g.check_layout(str(tmp_path / "st"), "ota_agent")


def test_modes_are_sanitized_and_owners_ignored(tmp_path):
    art = build_raw_artifact(tmp_path / "a.tar.gz", [
        member("greengrass/ggc/suid", mode=0o4777), member("greengrass/ggc/sgid", mode=0o2775),
        member("greengrass/ggc/sticky", kind=tarfile.DIRTYPE, mode=0o1777)])
    g.unpack(str(art.path), str(tmp_path / "st"))
    for name in ("suid", "sgid", "sticky"):
        st = os.lstat(tmp_path / "st/greengrass/ggc" / name)
        assert not st.st_mode & (stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX | stat.S_IWGRP | stat.S_IWOTH)
        assert st.st_uid == os.getuid()
    assert stat.S_IMODE(os.lstat(tmp_path / "st/greengrass/ggc/suid").st_mode) == 0o755


HOSTILE = {
    "absolute": [member("/etc/evil")],
    "dotdot": [member("greengrass/../../evil")],
    "hardlink": [member("greengrass/a"), member("greengrass/b", tarfile.LNKTYPE, linkname="greengrass/a")],
    "chardev": [member("greengrass/dev", tarfile.CHRTYPE)],
    "blockdev": [member("greengrass/blk", tarfile.BLKTYPE)],
    "fifo": [member("greengrass/fifo", tarfile.FIFOTYPE)],
    "duplicate": [member("greengrass/a"), member("greengrass/./a")],
    "absolute-symlink": [member("greengrass/l", tarfile.SYMTYPE, linkname="/etc")],
    "escaping-symlink": [member("greengrass/ggc/l", tarfile.SYMTYPE, linkname="../../../etc")],
    "through-symlink": [member("greengrass/ggc/l", tarfile.SYMTYPE, linkname="."),
                        member("greengrass/ggc/l/evil")],
    "two-step": [member("greengrass/ggc/x", tarfile.SYMTYPE, linkname="../ggc"),
                 member("greengrass/ggc/x/y")],
    "below-a-file": [member("greengrass/f"), member("greengrass/f/g")],
    # the same tricks in the other order: the child first, then the symlink or file above it
    "symlink-after-child": [member("greengrass/ggc/l/evil"), member("greengrass/ggc/l", tarfile.SYMTYPE,
                                                                     linkname=".")],
    "file-after-child": [member("greengrass/f/g"), member("greengrass/f")],
    # inside the archive, but not inside the subtree that is installed (<root>/ggc)
    "symlink-out-of-subtree": [member("greengrass/ggc/escape", tarfile.SYMTYPE, linkname="../../etc")],
    "symlink-to-a-sibling-subtree": [member("greengrass/ggc/x", tarfile.SYMTYPE, linkname="../ota")],
    "subtree-is-a-symlink": [member("greengrass/ggc", tarfile.SYMTYPE, linkname="ota")],
    # links through links: each stays inside as text, but `..` after the link a escapes
    "link-chain": [member("greengrass/ggc/d/e/a", tarfile.SYMTYPE, linkname=".."),
                   member("greengrass/ggc/x", tarfile.SYMTYPE, linkname="d/e/a/../../../etc")],
    "link-chain-reversed": [member("greengrass/ggc/x", tarfile.SYMTYPE, linkname="d/e/a/../../../etc"),
                            member("greengrass/ggc/d/e/a", tarfile.SYMTYPE, linkname="..")],
    # a refusal late in the archive, after good members were already written
    "late": [member(f"greengrass/ggc/ok{i}", data=b"y" * 5000) for i in range(50)] + [member("/etc/evil")],
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_archives_refused_before_writing(tmp_path, case):
    work = tmp_path / "work"
    work.mkdir()
    art = build_raw_artifact(tmp_path / "bad.tar.gz", HOSTILE[case])
    before = tree(tmp_path)
    with pytest.raises(g.UnsafeArchive) as err:
        g.unpack(str(art.path), str(work / "staging"))
    assert err.value.reason == "UNSAFE_ARCHIVE"
    assert tree(tmp_path) == before, "something was written"


def test_caps_on_members_and_size(tmp_path):
    many = build_raw_artifact(tmp_path / "many.tar.gz", [member(f"greengrass/f{i}") for i in range(20)])
    with pytest.raises(g.UnsafeArchive, match="more than 10"):
        g.unpack(str(many.path), str(tmp_path / "s1"), max_members=10)
    big = build_raw_artifact(tmp_path / "big.tar.gz", [member("greengrass/big", data=b"x" * 5000)])
    with pytest.raises(g.UnsafeArchive, match="unpacked size"):
        g.unpack(str(big.path), str(tmp_path / "s2"), max_bytes=4000)
    assert not (tmp_path / "s1").exists() and not (tmp_path / "s2").exists()


@pytest.mark.parametrize("content", [b"", b"not a tarball at all", b"\x1f\x8b\x08\x00garbage"])
def test_not_an_archive(tmp_path, content):
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(content)
    with pytest.raises(g.UnsafeArchive, match="not a readable"):
        g.unpack(str(bad), str(tmp_path / "st"))


def test_staging_must_not_exist(tmp_path):
    art = build_core_artifact(tmp_path / "core.tar.gz", "1.11.6")
    (tmp_path / "st").mkdir()
    with pytest.raises(FileExistsError):
        g.unpack(str(art.path), str(tmp_path / "st"))


def tar_bytes(members):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for info, data in members:
            info.size = len(data) if data is not None else 0
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def test_large_and_small_members_written_intact(tmp_path):
    big = os.urandom(3 * g.UNPACK_CHUNK + 17)  # streamed in chunks by the parsing thread
    small = [os.urandom(n) for n in (0, 1, g.UNPACK_CHUNK)]  # handed whole to the writer thread
    members = [member("greengrass/ggc/big", data=big)] + [member(f"greengrass/ggc/s{i}", data=d)
                                                          for i, d in enumerate(small)]
    art = build_raw_artifact(tmp_path / "a.tar.gz", members)
    assert g.unpack(str(art.path), str(tmp_path / "st")) == 4
    assert (tmp_path / "st/greengrass/ggc/big").read_bytes() == big
    for i, data in enumerate(small):
        assert (tmp_path / f"st/greengrass/ggc/s{i}").read_bytes() == data


def test_concatenated_gzip_members_and_padding(tmp_path):
    """gzip allows several members back to back, and NUL padding after them (as gzip -d does)."""
    raw = tar_bytes([member(f"greengrass/ggc/f{i}", data=os.urandom(3000)) for i in range(30)])
    half = len(raw) // 2
    path = tmp_path / "multi.tar.gz"
    path.write_bytes(gzip.compress(raw[:half]) + b"\0" * 7 + gzip.compress(raw[half:]) + b"\0" * 512)
    assert g.unpack(str(path), str(tmp_path / "st")) == 30


@pytest.mark.parametrize("cut", ["gzip", "tar"])
def test_truncated_archive_refused_and_nothing_left(tmp_path, cut):
    members = [member(f"greengrass/ggc/f{i}", data=os.urandom(20_000)) for i in range(40)]
    path = tmp_path / "cut.tar.gz"
    if cut == "gzip":  # the compressed stream stops half way
        build_raw_artifact(path, members)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:  # a complete gzip stream of a tar cut inside a member's data
        raw = tar_bytes(members)
        path.write_bytes(gzip.compress(raw[: len(raw) // 2 + 100]))
    threads = threading.active_count()
    with pytest.raises(g.UnsafeArchive, match="not a readable|truncated"):
        g.unpack(str(path), str(tmp_path / "st"))
    assert not (tmp_path / "st").exists()
    assert threading.active_count() == threads, "the unpack threads must be gone"


@pytest.mark.parametrize("size", [20_000, 3 * 1024 * 1024])
def test_full_disk_during_unpack(tmp_path, make_tmpfs, size):
    """ENOSPC from the writer thread (small files) or the parsing thread (a large one) is raised
    as itself (the agent reports DISK_FULL), and the partial tree is removed."""
    tiny_disk = make_tmpfs("1m")
    members = [member(f"greengrass/ggc/f{i}", data=os.urandom(size)) for i in range(2 * 1024 * 1024 // size + 2)]
    art = build_raw_artifact(tmp_path / "a.tar.gz", members)
    threads = threading.active_count()
    with pytest.raises(OSError) as err:
        g.unpack(str(art.path), str(tiny_disk / "st"))
    assert err.value.errno == 28  # ENOSPC
    assert not (tiny_disk / "st").exists()
    assert threading.active_count() == threads


def gzip_bytes(tmp_path, name, raw: bytes):
    path = tmp_path / name
    path.write_bytes(gzip.compress(raw, 1))
    return str(path)


def test_huge_extended_headers_are_refused_unread(tmp_path):
    """tarfile reads a GNU long name or a PAX header whole before any member check: one larger
    than 64 KiB is refused before it is read."""
    for fmt, info in ((tarfile.GNU_FORMAT, tarfile.TarInfo("greengrass/" + "n" * 100_000)),
                      (tarfile.PAX_FORMAT, tarfile.TarInfo("greengrass/a"))):
        if fmt == tarfile.PAX_FORMAT:
            info.pax_headers = {"comment": "c" * 100_000}
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
            tar.addfile(info, io.BytesIO(b""))
        with pytest.raises(g.UnsafeArchive, match="extended header"):
            g.unpack(gzip_bytes(tmp_path, f"h{fmt}.tar.gz", buf.getvalue()), str(tmp_path / f"s{fmt}"))
        assert not (tmp_path / f"s{fmt}").exists()


def test_chained_long_name_headers_are_unsafe_not_a_crash(tmp_path):
    blocks = []
    for i in range(3000):
        name = f"greengrass/n{i}".encode() + b"\0"
        head = tarfile.TarInfo("././@LongLink")
        head.type, head.size = tarfile.GNUTYPE_LONGNAME, len(name)
        blocks.append(head.tobuf(tarfile.GNU_FORMAT) + name + b"\0" * (512 - len(name)))
    final = tarfile.TarInfo("greengrass/x")
    blocks.append(final.tobuf(tarfile.GNU_FORMAT) + b"\0" * 1024)
    with pytest.raises(g.UnsafeArchive, match="too deep|extended"):
        g.unpack(gzip_bytes(tmp_path, "chain.tar.gz", b"".join(blocks)), str(tmp_path / "s"))
    assert not (tmp_path / "s").exists()


def test_a_gzip_bomb_stops_at_the_budget(tmp_path):
    """50 MB of zeros in a 50 KB artifact: refused at the header, before a byte is written."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("greengrass/ggc/bomb")
        info.size = 50 * 1024 * 1024
        tar.addfile(info, io.BytesIO(b"\0" * info.size))
    path = gzip_bytes(tmp_path, "bomb.tar.gz", buf.getvalue())
    assert os.path.getsize(path) < 300_000
    with pytest.raises(g.UnsafeArchive, match="unpacked size above"):
        g.unpack(path, str(tmp_path / "s"), max_bytes=10 * 1024 * 1024)
    assert not (tmp_path / "s").exists()


def test_what_is_unpacked_is_what_was_hashed(tmp_path):
    """The artifact is hashed again through the descriptor it is unpacked from: a file changed
    on disk after the download's check is refused, and nothing of it stays."""
    art = build_core_artifact(tmp_path / "core.tar.gz", "1.11.6")
    assert g.unpack(str(art.path), str(tmp_path / "ok"), sha256=art.sha256) > 5
    with pytest.raises(g.HashMismatch, match="changed on disk"):
        g.unpack(str(art.path), str(tmp_path / "s"), sha256="0" * 64)
    assert not (tmp_path / "s").exists()


def gnu_sparse_archive(extended_blocks: int) -> bytes:
    """An old-style GNU sparse member whose header says more sparse maps follow, and
    `extended_blocks` blocks that each say the same: tarfile reads them all, unbounded."""
    info = tarfile.TarInfo("greengrass/ggc/sparse")
    info.type, info.size = tarfile.GNUTYPE_SPARSE, 0
    head = bytearray(info.tobuf(tarfile.GNU_FORMAT))
    head[482] = 1  # isextended
    head[148:156] = b" " * 8
    head[148:156] = b"%06o\0 " % tarfile.calc_chksums(bytes(head))[0]
    block = bytearray(512)
    block[0:12], block[12:24], block[504] = b"00000000000\0", b"00000000001\0", 1
    return bytes(head) + bytes(block) * extended_blocks + b"\0" * 1024


def test_sparse_members_are_refused_before_their_map_is_read(tmp_path):
    """tarfile reads a GNU sparse map in a loop the archive sets the length of (a 178 KB
    artifact grew the agent by 417 MiB): every kind of sparse member is refused, unread."""
    with pytest.raises(g.UnsafeArchive, match="sparse"):
        g.unpack(gzip_bytes(tmp_path, "old.tar.gz", gnu_sparse_archive(200_000)), str(tmp_path / "s1"))
    assert not (tmp_path / "s1").exists()
    for n, pax in enumerate(({"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": "greengrass/x",
                              "GNU.sparse.realsize": "10"},
                             {"GNU.sparse.map": "0,1", "GNU.sparse.size": "10"},
                             {"GNU.sparse.size": "10", "GNU.sparse.numblocks": "1", "GNU.sparse.offset": "0",
                              "GNU.sparse.numbytes": "1"})):
        info = tarfile.TarInfo("greengrass/ggc/x")
        info.pax_headers = pax
        data = b"999999999999\n" + b"\0" * 499
        info.size = len(data)
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
            tar.addfile(info, io.BytesIO(data))
        with pytest.raises(g.UnsafeArchive, match="sparse"):
            g.unpack(gzip_bytes(tmp_path, f"pax{n}.tar.gz", buf.getvalue()), str(tmp_path / f"p{n}"))
        assert not (tmp_path / f"p{n}").exists()


def test_a_tree_deeper_than_the_recursion_limit_is_refused_and_removed(tmp_path):
    """1,200 nested directories, then an absolute path: the archive is refused and its staging
    removed, without a RecursionError (which left the job unended and the agent in a crash
    loop); every walk of the agent over such a tree works."""
    depth = 1200
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        path = "greengrass/ggc"
        for _ in range(depth):
            path += "/d"
            info = tarfile.TarInfo(path)
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
        leaf = tarfile.TarInfo(path + "/f")
        leaf.size = 1
        tar.addfile(leaf, io.BytesIO(b"x"))
        tar.addfile(tarfile.TarInfo("/etc/evil"), io.BytesIO(b""))
    with pytest.raises(g.UnsafeArchive):
        g.unpack(gzip_bytes(tmp_path, "deep.tar.gz", buf.getvalue()), str(tmp_path / "s"))
    assert not (tmp_path / "s").exists()
    deep = tmp_path / "tree"
    try:
        walk_a_deep_tree(tmp_path, deep, depth)
    finally:  # a tree this deep also defeats pytest's own clean-up of old temporary directories
        g.remove_tree(str(deep))
        g.remove_tree(str(tmp_path / "copy"))


def walk_a_deep_tree(tmp_path, deep, depth: int) -> None:
    path = str(deep)
    os.mkdir(path)
    for _ in range(depth):  # os.makedirs recurses too
        path = os.path.join(path, "d")
        os.mkdir(path)
    with open(os.path.join(path, "f"), "wb") as f:
        f.write(b"xy")
    assert g.tree_size(str(deep)) == 2
    g.fsync_tree(str(deep))
    g.copy_tree(str(deep), str(tmp_path / "copy"))
    with open(os.path.join(str(tmp_path / "copy"), *(["d"] * depth), "f"), "rb") as f:
        assert f.read() == b"xy"
    g.remove_tree(str(deep))
    g.remove_tree(str(tmp_path / "copy"))
    assert not deep.exists() and not (tmp_path / "copy").exists()


def test_links_to_links_and_through_directory_links_without_dotdot_are_kept(tmp_path):
    """Library chains and directory links are ordinary in a release: only `..` resolved after a
    link is refused."""
    art = build_raw_artifact(tmp_path / "ok.tar.gz", [
        member("greengrass/ggc/usr/lib/libx.so.1.2", data=b"elf"),
        member("greengrass/ggc/usr/lib/libx.so.1", tarfile.SYMTYPE, linkname="libx.so.1.2"),
        member("greengrass/ggc/usr/lib/libx.so", tarfile.SYMTYPE, linkname="libx.so.1"),
        member("greengrass/ggc/lib", tarfile.SYMTYPE, linkname="usr/lib"),
        member("greengrass/ggc/bin/tool", tarfile.SYMTYPE, linkname="../lib/libx.so")])
    g.unpack(str(art.path), str(tmp_path / "st"))
    assert (tmp_path / "st/greengrass/ggc/bin/tool").read_bytes() == b"elf"
