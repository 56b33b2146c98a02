"""The documentation: every internal link and #anchor of the README and docs resolves, the
README tells nobody to look "above" or "below" for a section that is not there, and every size
figure an operator reads (the binary, its TMPDIR, RAM) agrees with the benchmark's results and
appears nowhere with another value."""
from __future__ import annotations

import json
import re
import unicodedata
from pathlib import Path

import pytest

from tests.conftest import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "bench/README.md",
        REPO / "tests/cloud/README.md"]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def github_anchor(heading: str) -> str:
    """The #anchor GitHub makes of a heading: lower case, punctuation dropped but - and _, spaces
    as hyphens (markdown code and emphasis marks dropped first)."""
    text = re.sub(r"[`*]", "", heading.strip()).lower()
    text = "".join(c for c in text if c in "-_ " or unicodedata.category(c)[0] in "LN")
    return text.replace(" ", "-")


def anchors(path: Path) -> set:
    found, seen = set(), {}
    in_code = False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        if in_code or not re.match(r"#{1,6} ", line):
            continue
        base = github_anchor(line.lstrip("#"))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(path: Path) -> list:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return [m.group(1) for m in LINK.finditer(text)]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_internal_link_and_anchor_resolves(doc):
    broken = []
    for target in links(doc):
        if re.match(r"[a-z]+://", target) or target.startswith("mailto:"):
            continue
        file_part, _, anchor = target.partition("#")
        dest = (doc.parent / file_part).resolve() if file_part else doc
        if not dest.exists():
            broken.append(f"{target}: no {dest}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading makes #{anchor} in {dest.name}")
    assert not broken, broken


def test_the_anchor_rule_is_githubs():
    assert github_anchor(" Migrating from AWS's ggc-ota") == "migrating-from-awss-ggc-ota"
    assert github_anchor(' "Not now": a pre-update script can postpone an update') == \
        "not-now-a-pre-update-script-can-postpone-an-update"
    assert github_anchor(" Step timers: no job stuck IN_PROGRESS") == "step-timers-no-job-stuck-in_progress"
    assert github_anchor(" Raspberry Pi OS, Ubuntu, Debian (systemd): the `.deb`") == \
        "raspberry-pi-os-ubuntu-debian-systemd-the-deb"


def test_no_pointer_to_a_section_by_a_name_that_is_not_a_heading():
    """"see the journal below", "see Processes above", "(see Archive)": a section named in
    prose must be a heading of the README (or a link)."""
    text = (REPO / "README.md").read_text()
    headings = {h.lower() for h in re.findall(r"(?m)^#{2,3} (.+)$", text)}
    for match in re.finditer(r"\(see ([A-Z][^)]*?)\)|see ([A-Z][\w ,'\"-]+?) (?:above|below)", text):
        name = (match.group(1) or match.group(2)).strip().lower()
        assert any(h.startswith(name) for h in headings), match.group(0)


def bench_figure(name: str) -> float:
    rows = json.loads((REPO / "bench/results.json").read_text())["figures"]
    return next(r for r in rows if r["figure"] == name)["value"]


def test_size_figures_agree_with_the_benchmark_everywhere():
    """One measurement per figure: the binary's size and idle RAM as bench/results.json has
    them in the README's requirements and performance tables, and no other value for them in
    the manual, the unit or the init files (docs/ and bench/ keep the history of earlier
    binaries, each figure with its date)."""
    size = f"{bench_figure('binary size'):.2f} MB"
    ram = f"{bench_figure('idle: unreclaimable (anonymous + tmpfs), binary'):.1f} MiB"
    readme = (REPO / "README.md").read_text()
    requirements = readme.split("## Requirements and compatibility")[1].split("\n## ")[0]
    performance = readme.split("## Performance")[1].split("\n## ")[0]
    for table in (requirements, performance):
        assert size in table and ram in table, (size, ram)
    files = [REPO / "README.md", REPO / "systemd/ggc-ota.service", REPO / "openwrt/ggc-ota",
             REPO / "openwrt/ggc-ota.config"]
    texts = {p: p.read_text() for p in files}
    for path, text in texts.items():
        for other in re.findall(r"\b\d+(?:\.\d+)? MB\b", text):
            if "binary" in text[max(0, text.find(other) - 80):text.find(other)].lower():
                assert other in (size, "8 MB"), f"{path.name}: {other}, not the measured {size}"
    assert not re.search(r"\d+ MiB|\d+ MB", texts[REPO / "systemd/ggc-ota.service"])
    assert not re.search(r"\d+ MiB|\d+ MB", texts[REPO / "openwrt/ggc-ota.config"])
