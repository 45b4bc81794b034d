"""The science stays pure: no Ray, MLflow, argparse or YAML outside the orchestration layer."""
from __future__ import annotations

import ast

from conftest import ROOT

FORBIDDEN = {"ray", "mlflow", "argparse", "yaml"}


def _imports(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module.split(".")[0]


def test_science_modules_import_no_orchestration_libraries():
    science = [p for p in (ROOT / "cwa_core").rglob("*.py") if "sweep" not in p.relative_to(ROOT / "cwa_core").parts]
    assert len(science) >= 10
    bad = {str(p.relative_to(ROOT)): sorted(set(_imports(p)) & FORBIDDEN) for p in science}
    assert {k: v for k, v in bad.items() if v} == {}


def test_the_check_would_catch_one(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("import os\nfrom ray import remote\ndef f():\n    import mlflow.tracking\n")
    assert set(_imports(f)) & FORBIDDEN == {"ray", "mlflow"}
