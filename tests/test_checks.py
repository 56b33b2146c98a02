"""The checks section: job documents, platform detection, the update scripts, free space."""
from __future__ import annotations

import os

import pytest

import ggc_ota as g

GOOD = {"softwareToUpdate": "core", "version": "1.11.6", "updateTargetsArchitecture": "x86_64",
        "updateTargetsOperatingSystem": "ubuntu", "updateAgentLogLevel": "WARN", "futureField": {"x": 1},
        "artifact": {"url": "https://b.s3.amazonaws.com/k?X-Amz-Signature=s", "sha256": "a" * 64, "size": 10}}


def doc(**changes):
    d = {**GOOD, "artifact": dict(GOOD["artifact"])}
    for key, value in changes.items():
        if key.startswith("artifact_"):
            d["artifact"][key[9:]] = value
        elif value is None:
            d.pop(key, None)
        else:
            d[key] = value
    return d


def test_good_document():
    parsed = g.parse_document(doc())
    assert (parsed.software, parsed.version, parsed.log_level, parsed.size) == ("core", "1.11.6", "WARN", 10)
    assert g.parse_document(doc(updateAgentLogLevel=None)).log_level == "ERROR"


@pytest.mark.parametrize("changes,words", [
    ({"softwareToUpdate": "lambda"}, "softwareToUpdate"),
    ({"version": ""}, "version"), ({"version": "1.0;rm -rf /"}, "version"), ({"version": 1.11}, "version"),
    ({"updateTargetsArchitecture": "mips"}, "Architecture"),
    ({"updateTargetsOperatingSystem": "windows"}, "OperatingSystem"),
    ({"updateAgentLogLevel": "LOUD"}, "LogLevel"),
    ({"artifact": "https://x"}, "artifact must be an object"),
    ({"artifact_url": "http://insecure/x"}, "https"), ({"artifact_url": None}, "https"),
    ({"artifact_sha256": "A" * 64}, "sha256"), ({"artifact_sha256": "a" * 63}, "sha256"),
    ({"artifact_size": 0}, "size"), ({"artifact_size": "10"}, "size"), ({"artifact_size": True}, "size"),
])
def test_bad_documents(changes, words):
    with pytest.raises(g.InvalidDocument, match=words):
        g.parse_document(doc(**changes))


def test_not_an_object():
    with pytest.raises(g.InvalidDocument):
        g.parse_document(["core"])


def etc(tmp_path, os_release=None, openwrt=False):
    d = tmp_path / "etc"
    d.mkdir()
    if os_release is not None:
        (d / "os-release").write_text(os_release)
    if openwrt:
        (d / "openwrt_release").write_text("DISTRIB_ID='OpenWrt'\n")
    return str(d)


@pytest.mark.parametrize("content,expected", [
    ('NAME="Ubuntu"\nID=ubuntu\n', "ubuntu"), ('ID="amzn"\n', "amazon_linux"), ("ID=raspbian\n", "raspbian"),
    ("ID=debian\n", None), ("", None),
])
def test_os_detection(tmp_path, content, expected):
    assert g.detect_platform({}, etc(tmp_path, content))[1] == expected


def test_openwrt_wins_and_overrides(tmp_path):
    path = etc(tmp_path, "ID=debian\n", openwrt=True)
    assert g.detect_platform({}, path)[1] == "openwrt"
    assert g.detect_platform({"operatingSystem": "raspbian", "architecture": "arm64"}, path) == ("aarch64", "raspbian")
    assert g.detect_platform({}, path)[0] == os.uname().machine


def test_platform_rules():
    d = g.parse_document(doc())
    assert g.check_platform(d, "x86_64", "ubuntu") is None
    assert "accepting" in g.check_platform(d, "x86_64", None)
    with pytest.raises(g.PlatformMismatch):
        g.check_platform(d, "aarch64", "ubuntu")
    with pytest.raises(g.PlatformMismatch):
        g.check_platform(d, "x86_64", "amazon_linux")
    with pytest.raises(g.InvalidDocument):  # not a pair Greengrass ships updates for
        g.check_platform(g.parse_document(doc(updateTargetsOperatingSystem="amazon_linux",
                                              updateTargetsArchitecture="aarch64")), "aarch64", "amazon_linux")


@pytest.fixture
def scripts(tmp_path):
    d = tmp_path / "scripts"
    d.mkdir(mode=0o755)
    os.chmod(d, 0o755)
    s = d / "ggc_pre_update.sh"
    s.write_text("#!/bin/sh\nexit 0\n")
    os.chmod(s, 0o700)
    return s


@pytest.mark.skipif(os.geteuid() != 0, reason="the update scripts must be root's; the tests run as root in CI")
def test_script_rules(scripts):
    g.check_script(str(scripts))
    for mode, words in ((0o720, "group/other"), (0o705, "group/other"), (0o600, "not executable")):
        os.chmod(scripts, mode)
        with pytest.raises(g.ScriptInvalid, match=words):
            g.check_script(str(scripts))
    os.chmod(scripts, 0o700)
    os.chown(scripts, 65534, 0)
    with pytest.raises(g.ScriptInvalid, match="uid 65534"):
        g.check_script(str(scripts))
    os.chown(scripts, 0, 0)
    os.chmod(scripts.parent, 0o775)
    with pytest.raises(g.ScriptInvalid, match="writable by others than root"):
        g.check_script(str(scripts))
    os.chmod(scripts.parent, 0o755)
    grandparent = scripts.parent.parent  # any directory on the way: whoever can write it can swap the script
    mode = grandparent.stat().st_mode
    os.chmod(grandparent, 0o777)
    with pytest.raises(g.ScriptInvalid, match=str(grandparent)):
        g.check_script(str(scripts))
    os.chmod(grandparent, 0o1777)  # sticky, as /tmp: others cannot replace root's entries
    g.check_script(str(scripts))
    os.chmod(grandparent, mode)
    link = scripts.parent / "link.sh"
    link.symlink_to(scripts)
    with pytest.raises(g.ScriptInvalid, match="regular file"):
        g.check_script(str(link))
    with pytest.raises(g.ScriptInvalid, match="missing"):
        g.check_script(str(scripts.parent / "absent.sh"))


def test_free_space_adds_up_per_filesystem(tmp_path):
    free = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
    g.check_free_space([(str(tmp_path / "a"), 10), (str(tmp_path / "b/c"), 10)], floor=0)
    # each alone fits, together they do not; by a margin, since other tests write and delete
    # files on the same file system meanwhile
    with pytest.raises(g.DiskFull):
        g.check_free_space([(str(tmp_path / "a"), free * 6 // 10), (str(tmp_path / "b"), free * 6 // 10)], floor=0)
    with pytest.raises(g.DiskFull):
        g.check_free_space([(str(tmp_path), 0)], floor=free * 2)
