"""The golden comparison's record and compare logic (benchmarks/golden.py), on hand-made result
folders: no model runs. A last-bit change of one float is a difference; what two runs of the same
code legitimately differ in (timings, dates, git state, MLflow run ids, the output folder) is not."""
from __future__ import annotations

import json
import sqlite3

import numpy as np
import pandas as pd
import pytest

from benchmarks import golden
from conftest import ROOT

PPL = 12.41229590615842


def _results(out, *, ppl=PPL, seconds=1.5, commit="a" * 40, score=0.25, run_id="r1", stamp=1):
    """A fake record folder: one experiment, one analysis JSON, one MLflow database."""
    exp = out / "runs" / "single" / "magnitude-global-zero"
    exp.mkdir(parents=True)
    (exp / "perturbation_results.json").write_text(json.dumps(
        {"baseline": {"ppl": ppl, "nll": float(np.log(ppl))}, "results": [{"selection": "top_k", "seed": 0, "ppl": ppl * 2}],
         "protocol": {"eval_source": str(out / "eval.txt")}}))
    (exp / "manifest.json").write_text(json.dumps(
        {"status": "finished", "baseline_ppl": ppl, "timings_s": {"total": seconds},
         "provenance": {"git": {"commit": commit, "dirty": True}, "packages": {"torch": "2.x"}, "host": "h",
                        "device": "cpu"},
         "files": ["plots/a.png"], "settings": {"out_dir": str(exp)}}))
    (exp / "super_weights.json").write_text(json.dumps({"detect_seconds": seconds, "eval": {"seconds": seconds, "n": 4}}))
    pd.DataFrame({"selection": ["baseline", "top_k"], "seed": [-1, 0], "window": [0, 0], "nll": [84.0, ppl],
                  "tokens": [31, 31]}).to_parquet(exp / "window_nll.parquet")
    pd.DataFrame({"seed": [0, 0], "global_id": [3, 9], "parameter": ["a", "b"], "flat_idx": [3, 1],
                  "score": np.array([score, 0.5], dtype=np.float32)}).to_parquet(exp / "score_sample.parquet")
    (exp / "top_weights.csv").write_text("parameter,score\na,1.0\nb,0.5\n")
    (exp / "plots").mkdir()
    (exp / "plots" / "a.png").write_bytes(str(seconds).encode())  # figures are not compared
    ana = out / "analysis"
    ana.mkdir()
    (ana / "statistical_analysis.json").write_text(json.dumps(
        {"created_utc": f"2026-01-0{stamp}", "cells": {"table": [{"dir": str(exp), "mlflow_run_id": run_id}]},
         "figures": [f"figures/{stamp}.png"], "ratios": [{"geomean": ppl / 3}]}))
    con = sqlite3.connect(out / "mlflow.db")
    con.executescript(
        "CREATE TABLE runs (run_uuid TEXT, name TEXT, status TEXT, start_time INT);"
        "CREATE TABLE metrics (key TEXT, value FLOAT, timestamp INT, run_uuid TEXT, step INT, is_nan BOOLEAN);"
        "CREATE TABLE params (key TEXT, value TEXT, run_uuid TEXT);"
        "CREATE TABLE tags (key TEXT, value TEXT, run_uuid TEXT);")
    con.execute("INSERT INTO runs VALUES (?, 'builtin:demo/magnitude/global/K20/zero', 'FINISHED', ?)", (run_id, stamp))
    con.execute("INSERT INTO metrics VALUES ('ppl', ?, ?, ?, 0, 0)", (ppl, stamp, run_id))
    con.execute("INSERT INTO params VALUES ('topk', '20', ?)", (run_id,))
    con.executemany("INSERT INTO tags VALUES (?, ?, ?)", [("cwa.kind", "cell", run_id), ("cwa.sweep_run_id", run_id, run_id),
                                                          ("mlflow.user", f"u{stamp}", run_id)])
    con.commit()
    con.close()
    return golden.collect(out, {str(out): "<OUT>"})


def _write(path, values):
    path.write_text(json.dumps({"meta": {}, "values": values}))
    return path


def test_equal_records_are_equal_and_compare_exits_0(tmp_path, capsys):
    a = _results(tmp_path / "a")
    b = _results(tmp_path / "b")
    assert a == b and len(a) > 20
    assert golden.main(["compare", str(_write(tmp_path / "a.json", a)), str(_write(tmp_path / "b.json", b))]) == 0
    assert f"equal: {len(a)} keys" in capsys.readouterr().out


def test_one_float_differing_in_its_last_bit_is_reported_with_both_values(tmp_path, capsys):
    nudged = float(np.nextafter(PPL, np.inf))
    assert nudged != PPL and abs(nudged - PPL) < 1e-14
    a = _results(tmp_path / "a")
    b = _results(tmp_path / "b", ppl=nudged)
    diffs = golden.differences(a, b)
    keys = {k for k, _, _ in diffs}
    assert "runs/single/magnitude-global-zero/perturbation_results.json/baseline/ppl" in keys
    assert "runs/single/magnitude-global-zero/window_nll.parquet/top_k/seed0/window0/nll" in keys
    assert "mlflow/builtin:demo/magnitude/global/K20/zero/metric/ppl/step0" in keys
    assert "analysis/statistical_analysis.json/ratios[0]/geomean" in keys
    assert golden.main(["compare", str(_write(tmp_path / "a.json", a)), str(_write(tmp_path / "b.json", b))]) == 1
    out = capsys.readouterr().out
    assert f"float {PPL!r}" in out and f"float {nudged!r}" in out and f"{len(diffs)} of {len(a)} keys differ" in out


def test_a_float32_score_one_ulp_off_changes_its_column_digest(tmp_path):
    s = np.float32(0.25)
    a = _results(tmp_path / "a", score=float(s))
    b = _results(tmp_path / "b", score=float(np.nextafter(s, np.float32(1))))
    assert [k for k, _, _ in golden.differences(a, b)] == ["runs/single/magnitude-global-zero/score_sample.parquet/score"]


def test_excluded_keys_are_ignored(tmp_path):
    # timings, git state, dates, MLflow run ids and timestamps, figures and the folder all differ
    a = _results(tmp_path / "a", seconds=1.5, commit="a" * 40, run_id="r1", stamp=1)
    b = _results(tmp_path / "elsewhere", seconds=99.0, commit="b" * 40, run_id="r2", stamp=2)
    assert golden.differences(a, b) == []
    assert not any(("timings_s" in k or "git" in k or "created_utc" in k or "seconds" in k or "/files" in k
                    or "mlflow_run_id" in k or ".png" in k or "mlflow.user" in k) for k in a)
    assert a["runs/single/magnitude-global-zero/manifest.json/settings/out_dir"] == \
        "str <OUT>/runs/single/magnitude-global-zero"
    assert a["runs/single/magnitude-global-zero/super_weights.json/eval/n"] == "int 4"


def test_values_are_typed_and_exact():
    r = golden.scalar
    assert r(0.0, {}) != r(-0.0, {}) and r(1, {}) != r(1.0, {}) and r(True, {}) != r(1, {})
    assert r(float("nan"), {}) == r(float("nan"), {}) == "float nan" and r(float("inf"), {}) == "float inf"
    assert r(0.1 + 0.2, {}) != r(0.3, {})  # repr round-trips a double exactly
    assert r("/x/out/a", {"/x/out": "<OUT>", "/x": "<TREE>"}) == "str <OUT>/a"  # longest root first
    flat: dict[str, str] = {}
    golden.flatten({"runs": [1], "a": {"runs": [2], "b": []}}, "r/sweep_manifest.json", {}, flat)
    assert flat == {"r/sweep_manifest.json/a/runs[0]": "int 2", "r/sweep_manifest.json/a/b": "[]"}


def test_missing_and_extra_keys_are_differences(tmp_path):
    a = {"x": "int 1", "y": "float 2.0"}
    b = {"x": "int 1", "z": "float 2.0"}
    assert golden.differences(a, b) == [("y", "float 2.0", None), ("z", None, "float 2.0")]


def test_a_tree_with_its_own_packages_wins_over_the_editable_install(tmp_path):
    tree = tmp_path / "tree"
    for pkg in ("cwa_core", "analysis"):
        (tree / pkg).mkdir(parents=True)
        (tree / pkg / "__init__.py").write_text("")
    env = golden.tree_env(tree, tmp_path / "cache")
    golden.check_imports(tree, env)  # imports tree/cwa_core, not the installed /work/main one
    empty = tmp_path / "empty"
    empty.mkdir()
    if (ROOT / "cwa_core").is_dir():
        with pytest.raises(RuntimeError, match="instead of its own packages"):
            golden.check_imports(empty, golden.tree_env(empty, tmp_path / "cache"))


def test_an_unknown_reference_commit_exits_2(capsys):
    assert golden.main(["check", "--reference", "0" * 40]) == 2
    assert "unknown reference commit" in capsys.readouterr().err


def test_the_stored_reference_is_one_commit_of_this_repository():
    import subprocess

    commit = golden.reference_commit()
    assert len(commit) == 40 and all(c in "0123456789abcdef" for c in commit)
    kind = subprocess.run(["git", "-C", str(ROOT), "cat-file", "-t", commit], capture_output=True, text=True)
    if kind.returncode == 0:  # a shallow clone may lack it; the check then says so
        assert kind.stdout.strip() == "commit"


def test_the_harness_imports_none_of_the_project():
    import ast

    tree = ast.parse((ROOT / "benchmarks" / "golden.py").read_text())
    mods = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    mods |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not {m.split(".")[0] for m in mods} & {"cwa_core", "analysis", "orchestrator", "benchmarks"}


def test_two_mlflow_runs_of_one_name_are_both_kept(tmp_path):
    a = _results(tmp_path / "a")
    con = sqlite3.connect(tmp_path / "a" / "mlflow.db")
    con.execute("INSERT INTO runs VALUES ('r9', 'builtin:demo/magnitude/global/K20/zero', 'KILLED', 5)")
    con.commit()
    con.close()
    b = golden.collect(tmp_path / "a", {str(tmp_path / "a"): "<OUT>"})
    assert golden.differences(a, b) == [("mlflow/builtin:demo/magnitude/global/K20/zero#1/status", None, "str KILLED")]


def _sweep(out, ids, ppl=PPL):
    root = out / "runs" / "smoke"
    root.mkdir(parents=True)
    (root / "sweep_manifest.json").write_text(json.dumps(
        {"cells": {cid: {"status": "finished", "dir": cid, "seconds": 3.0} for cid in ids}, "runs": [{"seconds": 9}]}))
    for cid, k in zip(ids, (100, 1000)):
        (root / cid).mkdir()
        (root / cid / "perturbation_results.json").write_text(json.dumps(
            {"metric": "magnitude", "mode": "global", "topk": k, "perturbation": {"method": "sign_flip"},
             "baseline": {"ppl": ppl}}))
    return golden.collect(out, {str(out): "<OUT>"})


def test_sweep_cells_are_named_by_what_they_are_and_their_ids_compared_once(tmp_path):
    a = _sweep(tmp_path / "a", ["0123456789ab", "ba9876543210"])
    assert a["runs/smoke/<cell magnitude-global-K100-sign_flip>/perturbation_results.json/baseline/ppl"] == f"float {PPL!r}"
    assert a["runs/smoke/sweep_manifest.json/cells/<cell magnitude-global-K1000-sign_flip>/dir"] == \
        "str <cell magnitude-global-K1000-sign_flip>"
    b = _sweep(tmp_path / "b", ["cafecafecafe", "beefbeefbeef"], ppl=float(np.nextafter(PPL, 0)))
    assert [k for k, _, _ in golden.differences(a, b)] == sorted([
        "runs/smoke/<cell magnitude-global-K1000-sign_flip>/perturbation_results.json/baseline/ppl",
        "runs/smoke/<cell magnitude-global-K1000-sign_flip>:cell_id",
        "runs/smoke/<cell magnitude-global-K100-sign_flip>/perturbation_results.json/baseline/ppl",
        "runs/smoke/<cell magnitude-global-K100-sign_flip>:cell_id"])
