"""Promises about the source itself: ggc_ota.py imports the standard library only, runs on
CPython 3.8+ (vermin), and the tree is clean for ruff."""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

AGENT = REPO / "ggc_ota.py"
VERMIN = str(Path(sys.executable).parent / "vermin")


def test_agent_imports_only_the_standard_library():
    std = set(sys.stdlib_module_names)
    tree = ast.parse(AGENT.read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            imported.add(node.module.split(".")[0])
    assert imported, "no imports found: the check would prove nothing"
    assert imported <= std | {"__future__"}, imported - std


def test_agent_runs_on_python_3_8():
    out = subprocess.run([VERMIN, "-t=3.8-", "--no-tips", "--violations",
                          "--eval-annotations", str(AGENT)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_vermin_would_catch_a_newer_feature(tmp_path):
    newer = tmp_path / "newer.py"
    newer.write_text("def f(x):\n    match x:\n        case 1:\n            return 2\n")
    out = subprocess.run([VERMIN, "-t=3.8-", "--no-tips", "--violations", str(newer)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0


def test_ruff_is_clean():
    ruff = pytest.importorskip("ruff")
    assert ruff
    out = subprocess.run([sys.executable, "-m", "ruff", "check", str(REPO)], capture_output=True, text=True,
                         timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stdout + out.stderr


# Modules an idle agent must not load: each costs memory on a router (the import diet in the
# bench/README.md), and `inspect` is excluded from the frozen binary altogether.
NOT_AT_IDLE = ("inspect", "dataclasses", "argparse", "http.client", "email", "tarfile", "subprocess",
               "logging.handlers", "pickle", "uuid", "urllib.parse", "tempfile", "typing", "shutil", "fnmatch")


def test_idle_agent_imports_stay_lean(tmp_path):
    code = ("import sys, ggc_ota\n"
            "ggc_ota.parse_args(['--root', '/x', '--foreground'])\n"
            "ggc_ota.setup_logging(sys.argv[1], 'INFO', to_stderr=True)\n"
            "ggc_ota.release_free_memory()\n"
            "print(' '.join(sorted(sys.modules)))\n")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "agent.log")], capture_output=True, text=True,
                         timeout=60, cwd=REPO, check=True)
    loaded = set(out.stdout.split())
    assert "ggc_ota" in loaded and "ssl" in loaded  # the check sees real imports
    assert not loaded & set(NOT_AT_IDLE), loaded & set(NOT_AT_IDLE)


def test_agent_never_imports_inspect():
    """The frozen binary is built without it (build.sh EXCLUDES)."""
    assert "inspect" in (REPO / "build.sh").read_text()
    tree = ast.parse(AGENT.read_text())
    names = {a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
    names |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert "inspect" not in names and "dataclasses" not in names


def readme_reason_rows() -> dict:
    """The README's table of reasons: {code: (status, rolled back, where, meaning)}."""
    text = (REPO / "README.md").read_text()
    start = text.index("| `statusDetails.reason` |")
    rows = {}
    for line in text[start:].splitlines()[2:]:
        if not line.startswith("| `"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0].strip("`")] = tuple(cells[1:5])
    return rows


def test_the_readme_table_of_reasons_is_the_registry():
    import ggc_ota as g
    rows = readme_reason_rows()
    assert rows == {code: tuple(r) for code, r in g.REASONS.items()}


def test_every_reason_the_code_names_is_registered():
    """Reason codes are written as string constants in a few forms: a class's `reason = "X"`, the
    second argument of an error's constructor, the third of finish(), the second of roll_back()
    and trial_failed(), and journal.reason = "X". Each must be a registered code: the registry
    is the only one (start-up errors included)."""
    import ggc_ota as g
    code = re.compile(r"^[A-Z][A-Z0-9_]{3,}$")
    named = set()
    tree = ast.parse(AGENT.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            for stmt in node.body:
                if (isinstance(stmt, ast.Assign) and any(getattr(t, "id", "") == "reason" for t in stmt.targets)
                        and isinstance(stmt.value, ast.Constant)):
                    named.add(stmt.value.value)
        elif isinstance(node, ast.Call):
            callee = getattr(node.func, "id", None) or getattr(node.func, "attr", "")
            position = {"finish": 2, "roll_back": 1, "trial_failed": 1}.get(callee, 1 if callee.endswith(
                ("Error", "Failed", "Full", "Archive", "Corrupt", "Invalid", "Document", "Mismatch")) else None)
            if position is not None and len(node.args) > position and isinstance(node.args[position], ast.Constant):
                value = node.args[position].value
                if isinstance(value, str) and code.match(value):
                    named.add(value)
            for kw in node.keywords:
                if kw.arg == "reason" and isinstance(kw.value, ast.Constant):
                    named.add(kw.value.value)
        elif isinstance(node, ast.Assign):
            values = node.value.elts if isinstance(node.value, ast.Tuple) else [node.value]
            for target in node.targets:
                targets = target.elts if isinstance(target, ast.Tuple) else [target]
                for one, value in zip(targets, values if len(values) == len(targets) else []):
                    if isinstance(one, ast.Attribute) and one.attr == "reason" and isinstance(value, ast.Constant):
                        named.add(value.value)
    assert len(named) > 15, named  # the scan sees the codes
    assert "ROLLBACK_FAILED" in named  # journal.reason = ... is seen
    assert named <= set(g.REASONS), named - set(g.REASONS)


def test_sections_use_nothing_defined_in_a_later_section():
    """ggc_ota.py reads top to bottom: a top-level function, class or constant uses only what its
    own section or an earlier one defines (sections begin with a `# ====` rule and a `# name:` line)."""
    lines = AGENT.read_text().splitlines()
    starts = [i + 1 for i, line in enumerate(lines) if line.startswith("# ====") and i + 1 < len(lines)
              and lines[i + 1].startswith("# ") and not lines[i + 1].startswith("# ====")]
    assert len(starts) >= 10, starts

    def section(lineno: int) -> int:
        return sum(1 for start in starts if start <= lineno)
    tree = ast.parse(AGENT.read_text())
    defined = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            defined.setdefault(node.name, section(node.lineno))
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    defined.setdefault(target.id, section(node.lineno))
    late = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.Assign)):
            for sub in ast.walk(node):
                if isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Load) and \
                        defined.get(sub.id, 0) > section(node.lineno):
                    late.add((getattr(node, "name", "?"), sub.id))
    assert not late, sorted(late)


def test_the_steps_tables_in_the_docs_are_the_engines():
    """docs/internals.md's table of steps is ggc_ota.STEPS, row for row, in order, and its table
    of plans is the SOFTWARE rows' plans."""
    import ggc_ota as g
    text = (REPO / "docs/internals.md").read_text()

    def table(header: str) -> list:
        start = text.index(header)
        rows = []
        for line in text[start:].splitlines()[2:]:
            if not line.startswith("| `"):
                break
            rows.append(tuple(c.strip() for c in line.strip("|").split("|")))
        return rows

    def names(items) -> str:
        return ", ".join(f"`{n}`" for n in items) or "—"
    expected = [(f"`{s.name}`", s.doing.replace("ota_post_update.sh", "`ota_post_update.sh`")
                 .replace("new_agent_verified", "`new_agent_verified`").replace("otaAgent.keep", "`otaAgent.keep`"),
                 "yes" if s.reports else "—", s.on_error, s.after_crash, names(s.inner)) for s in g.STEPS]
    assert table("| step | what its action does | phase reported |") == expected
    plans = [(f"`{name}`", " → ".join(f"`{step}`" for step in kind.steps)) for name, kind in g.SOFTWARE.items()]
    assert table("| software | its plan |") == plans


def test_the_plans_are_made_of_the_tables_steps():
    """Every plan ends with the commit, rolls forward only from the swap on, and the rollback's
    plan is the table's last two steps."""
    import ggc_ota as g
    for kind in g.SOFTWARE.values():
        assert set(kind.steps) <= set(g.STEP_BY_NAME) and kind.steps[-1] == "commit"
        forward = [n for n in kind.steps if g.STEP_BY_NAME[n].after_crash == g.ROLL_FORWARD]
        assert forward and all(kind.steps.index(n) > kind.steps.index("swap") for n in forward)
    assert g.ROLLBACK_PLAN == tuple(s.name for s in g.STEPS[-2:])
    assert set(g.STEP_NAMES) == set(g.STEP_BY_NAME)


def test_only_the_runner_writes_a_step():
    """A step is entered in one place (Engine.enter: journal, phase report, crash point), never
    set by hand elsewhere."""
    tree = ast.parse(AGENT.read_text())
    setters = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef):
            for sub in ast.walk(node):
                if isinstance(sub, ast.Assign) and any(isinstance(t, ast.Attribute) and t.attr == "step"
                                                       for t in sub.targets):
                    setters.append(node.name)
    assert setters == ["enter"], setters


def test_every_crash_point_belongs_to_one_step():
    """Each crash point in the code is a step's own (reached by the runner), one the steps table
    lists inside a step, or a phase before the journal, so that the crash tests, which read the
    table, reach every one."""
    import ggc_ota as g
    tree = ast.parse(AGENT.read_text())
    literal = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.args[1:2] and node.args[1] or None, ast.Constant) \
                and getattr(node.func, "attr", "") == "phase":
            literal.add(node.args[1].value)
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "crash_point" and \
                isinstance(node.args[0], ast.Constant):
            literal.add(node.args[0].value)
    inner = {p for s in g.STEPS for p in s.inner}
    assert len(literal) > 8 and literal == inner | set(g.BEFORE_JOURNAL), literal ^ (inner | set(g.BEFORE_JOURNAL))
    moments = [p for s in g.STEPS for p in (s.name, *s.inner)] + list(g.BEFORE_JOURNAL)
    assert len(moments) == len(set(moments))  # one name per moment


def test_the_repository_stands_alone():
    """Nothing in the tree points at the design notes it grew from: no requirement numbers (an R
    and a number), no section signs of a spec, no paths outside the repository."""
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    outside = re.compile(r"\bR(?:[1-9]|1\d|20)\b|SPEC §|\.\./shared|DIGEST\.md|FIELD-NOTES")
    found = []
    for name in tracked:
        try:
            text = (REPO / name).read_text()
        except (UnicodeDecodeError, FileNotFoundError, IsADirectoryError):
            continue  # binary files, and files deleted but not yet committed
        found += [f"{name}:{n}: {line.strip()[:80]}" for n, line in enumerate(text.splitlines(), 1)
                  if outside.search(line) and "outside = re.compile" not in line]
    assert not found, "\n".join(found)


def test_every_part_can_be_read_in_one_sitting():
    """No class of the agent over 450 lines, no function over 80."""
    tree = ast.parse(AGENT.read_text())
    long = [(n.name, n.end_lineno - n.lineno + 1) for n in ast.walk(tree)
            if (isinstance(n, ast.ClassDef) and n.end_lineno - n.lineno >= 450)
            or (isinstance(n, ast.FunctionDef) and n.end_lineno - n.lineno >= 80)]
    assert not long, long


def test_the_shipped_mqtt_code_is_the_clients_side_only():
    """What only a broker sends or reads (CONNACK, SUBACK, PINGRESP, a decoded CONNECT or
    SUBSCRIBE, UNSUBSCRIBE at all) lives with the tests' brokers, not in the agent."""
    import ggc_ota as g
    assert not [name for name in ("encode_connack", "encode_suback", "encode_pingresp", "encode_unsubscribe")
                if hasattr(g, name)]
    assert not {"topics", "client_id", "keepalive", "clean_session"} & set(g.Packet._fields)


def test_tests_use_the_agents_public_names():
    """Tests reach the agent through its public names only (a leading underscore is the
    module's own business)."""
    private = re.compile(r"\bg\._[a-zA-Z]")
    found = [f"{p.relative_to(REPO)}:{n}" for p in (REPO / "tests").rglob("*.py")
             for n, line in enumerate(p.read_text().splitlines(), 1) if private.search(line)]
    assert not found, found
