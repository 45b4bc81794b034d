"""The walk of a setting from the command to the science goes down and never back: the project's
modules form rooms, each importing only its own room or rooms below, with no import cycle
(imports inside functions count; ``if TYPE_CHECKING:`` blocks do not, they run nothing)."""
from __future__ import annotations

import ast
import re

import pytest

from conftest import ROOT

# Rooms from the top (the command) down to the vocabulary every room may use. A module takes the
# room of the first pattern its dotted name matches.
ROOMS = [
    ("command", r"orchestrator$"),
    ("sweep", r"cwa_core\.sweep(\..*)?$"),
    ("analysis", r"analysis(\..*)?$"),  # reads results (the sweep runs it at its end); never torch
    ("cell", r"cwa_core\.(cell|preflight|outputs|superweight_plots)$"),
    ("experiment", r"cwa_core\.experiment$"),
    ("settings", r"cwa_core\.config$"),
    ("science", r"cwa_core(\.(?!schema$|numerics$|campaign_stats$).*)?$"),
    ("vocabulary", r"cwa_core\.(schema|numerics|campaign_stats)$"),  # torch-free: the analysis reads them
]


def modules(root=ROOT) -> dict[str, object]:
    found = {}
    for p in [*root.glob("cwa_core/**/*.py"), *root.glob("analysis/*.py"), root / "orchestrator.py"]:
        parts = list(p.relative_to(root).with_suffix("").parts)
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return found


def _runtime_nodes(tree: ast.AST):
    """Every node except what sits under ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
            continue
        yield node
        stack.extend(ast.iter_child_nodes(node))


def imports(mods: dict[str, object]) -> dict[str, set[str]]:
    """module -> the project modules it imports (the longest module a name belongs to)."""
    def owner(name: str) -> str | None:
        parts = name.split(".")
        return next((".".join(parts[:i]) for i in range(len(parts), 0, -1) if ".".join(parts[:i]) in mods), None)

    edges = {}
    for m, path in mods.items():
        pkg = m.split(".") if path.name == "__init__.py" else m.split(".")[:-1]
        out = set()
        for node in _runtime_nodes(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(pkg[:len(pkg) - node.level + 1] + ([node.module] if node.module else []))
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            else:
                continue
            out |= {o for o in map(owner, names) if o is not None and o != m}
        edges[m] = out
    return edges


def room(module: str) -> int:
    return next(i for i, (_, pattern) in enumerate(ROOMS) if re.match(pattern, module))


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while not comp or comp[-1] != v:
                comp.append(stack.pop())
                on.discard(comp[-1])
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in list(edges):
        if v not in index:
            visit(v)
    return out


@pytest.fixture(scope="module")
def graph():
    return imports(modules())


def test_no_module_imports_a_room_above_its_own(graph):
    up = sorted(f"{a} ({ROOMS[room(a)][0]}) -> {b} ({ROOMS[room(b)][0]})"
                for a, bs in graph.items() for b in bs if room(b) < room(a))
    assert up == []


def test_no_import_cycles(graph):
    assert cycles(graph) == []


def test_analysis_reads_only_the_vocabulary_of_cwa_core(graph):
    used = {b for a, bs in graph.items() if a.startswith("analysis") for b in bs if b.startswith("cwa_core")}
    assert used and used <= {"cwa_core.schema", "cwa_core.numerics", "cwa_core.campaign_stats", "cwa_core"}


def test_campaign_stats_sits_in_the_vocabulary_room_and_imports_no_science(graph):
    assert ROOMS[room("cwa_core.campaign_stats")][0] == "vocabulary"
    assert graph["cwa_core.campaign_stats"] <= {"cwa_core.schema", "cwa_core.numerics"}


def test_the_checks_would_catch_a_step_back_and_a_cycle(tmp_path):
    (tmp_path / "cwa_core" / "sweep").mkdir(parents=True)
    (tmp_path / "analysis").mkdir()
    (tmp_path / "orchestrator.py").write_text("from cwa_core.sweep import runner\n")
    (tmp_path / "cwa_core" / "__init__.py").write_text("")
    (tmp_path / "cwa_core" / "sweep" / "__init__.py").write_text("")
    (tmp_path / "cwa_core" / "sweep" / "runner.py").write_text("from ..cell import run\n")
    (tmp_path / "cwa_core" / "cell.py").write_text("def run():\n    from .experiment import x\n")
    (tmp_path / "cwa_core" / "experiment.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .sweep import runner\n"
        "def x():\n    from . import cell\n")
    g = imports(modules(tmp_path))
    assert g["cwa_core.sweep.runner"] == {"cwa_core.cell"}
    assert g["cwa_core.experiment"] == {"cwa_core.cell"}  # the TYPE_CHECKING import does not count
    assert [b for a, bs in g.items() for b in bs if room(b) < room(a)] == ["cwa_core.cell"]
    assert cycles(g) == [["cwa_core.cell", "cwa_core.experiment"]]
