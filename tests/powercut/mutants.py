"""Proof that the power-cut sweep can fail: every sync call of the agent (an fsync of a file,
of a directory, of a tree) is removed alone from a copy of ggc_ota.py, and the sweep runs against
that copy, cutting right before each sync call that is left (in the strict model, where the
durable state changes only at a sync, those are the cut points that tell every durable state
apart; in the data model a lost fsync of a file shows at the same points). A removal that no
cut point catches is either a sync the agent does not need, or a hole in the sweep.

    ./build.sh powercut --mutants [--kind K] [--model M] [--site N]
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import List, NamedTuple

SYNC_CALLS = {"fsync_dir", "fsync_file", "fsync_tree", "sync_tree"}
PRIMITIVES = {"fsync_dir", "fsync_file", "fsync_tree", "sync_tree"}  # what they call is not a site


class Site(NamedTuple):
    line: int        # 1-based
    function: str    # the function (Class.method) that calls it
    text: str        # the line as written


def sync_sites(source: str) -> List[Site]:
    """Every statement of the agent that is a sync call, outside the sync primitives themselves."""
    tree = ast.parse(source)
    lines = source.splitlines()
    sites: List[Site] = []

    def visit(node: ast.AST, where: List[str]) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.ClassDef)):
                visit(child, where + [child.name])
                continue
            if isinstance(child, ast.Expr) and isinstance(child.value, ast.Call) and is_sync(child.value) \
                    and not (where and where[-1] in PRIMITIVES):
                assert child.lineno == child.end_lineno, f"a sync call over several lines at {child.lineno}"
                sites.append(Site(child.lineno, ".".join(where), lines[child.lineno - 1].strip()))
            visit(child, where)

    visit(tree, [])
    return sites


def is_sync(call: ast.Call) -> bool:
    func = call.func
    if isinstance(func, ast.Name):
        return func.id in SYNC_CALLS
    return (isinstance(func, ast.Attribute) and func.attr in ("fsync", "fdatasync")
            and isinstance(func.value, ast.Name) and func.value.id == "os")


def without(source: str, sites: List[Site]) -> str:
    """The agent with the statements of `sites` replaced by `pass`."""
    lines = source.splitlines(keepends=True)
    for site in sites:
        line = lines[site.line - 1]
        indent = line[:len(line) - len(line.lstrip())]
        lines[site.line - 1] = f"{indent}pass  # sync removed for the power-cut sweep\n"
    return "".join(lines)


def write_mutant(source_path: Path, out: Path, sites: List[Site]) -> Path:
    out.write_text(without(source_path.read_text(), sites))
    out.chmod(0o755)
    compile(out.read_text(), str(out), "exec")
    return out
