"""The analysis and the report on real results: a two-model sweep over the real 260K Llama and a
copy of it with one weight changed, ending with its report (report: true), then both commands
run as a researcher runs them."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

import orchestrator
from conftest import ROOT, STORIES, TINYSTORIES, mlflow_runs_by_kind

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def study(ray_local, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("two_models")
    edited = tmp / "stories260k-edited"
    model = AutoModelForCausalLM.from_pretrained(STORIES).eval()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[10, 20] *= 40.0  # one weight changed
    model.save_pretrained(edited)
    AutoTokenizer.from_pretrained(STORIES).save_pretrained(edited)
    raw = {"name": "two_models", "model": {"grid_search": [str(STORIES), str(edited)]}, "data_file": str(TINYSTORIES),
           "metric": {"grid_search": ["grad_x_weight", "magnitude"]}, "topk": {"grid_search": [20, 200]},
           "mode": "global", "seeds": [0, 1, 2], "max_samples": 6, "max_length": 64, "eval_samples": 16,
           "stability_check": True, "report": True, "resources": {"cpus_per_actor": 1}}
    f = tmp / "two.yaml"
    f.write_text(yaml.safe_dump(raw))
    uri = f"sqlite:///{tmp}/mlflow.db"
    assert orchestrator.main(["--sweep", str(f), "--out-dir", str(tmp / "out"), "--tracking-uri", uri,
                              "--no-progress"]) == 0
    return tmp, uri


def test_the_sweep_ends_with_its_report_logged_to_the_sweep_run(study):
    tmp, uri = study
    analysis = json.loads((tmp / "out" / "analysis" / "statistical_analysis.json").read_text())
    assert len(analysis["models"]) == 2 and analysis["cells"]["n_loaded"] == 8 and len(analysis["protocols"]) == 1
    c, _, by = mlflow_runs_by_kind(uri, "two_models")
    arts = {a.path for a in c.list_artifacts(by["sweep"][0].info.run_id, "analysis")}
    assert {"analysis/statistical_analysis.json", "analysis/research_summary.pdf", "analysis/figures"} <= arts


def test_both_commands_run_on_the_results_as_written(study):
    """`python -m analysis.cross_model` and `python -m analysis.report` in fresh interpreters;
    the PDF renders page by page (pdftoppm) and every figure is in it."""
    tmp, _ = study
    out = tmp / "again"
    p = subprocess.run([sys.executable, "-m", "analysis.cross_model", "--result-dirs", str(tmp / "out"), "--output",
                        str(out / "statistical_analysis.json"), "-q"], capture_output=True, text=True, cwd=tmp, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    a = json.loads((out / "statistical_analysis.json").read_text())
    assert {m["model_name"] for m in a["models"]} == {"stories260k", "stories260k-edited"}
    ratios = {(r["model_name"], r["metric"], r["k"], r["selection"]): r for r in a["ratios"]}
    assert len(ratios) == 2 * 2 * 2 * 3 and all(r["n_seeds"] == 3 for r in ratios.values())
    for key, r in ratios.items():  # top-K hurts far more than random-K on both models, at every K
        if key[3] == "top_k":
            assert r["geomean"] > 10 * ratios[key[:3] + ("random_k",)]["geomean"], key
    assert {d["metric"] for d in a["dose_response"]} == {"grad_x_weight", "magnitude"}
    for name in ("ratios_by_selection", "dose_response", "layer_profile", "param_type_by_model", "metric_agreement",
                 "stability_vs_k"):
        assert (out / "figures" / f"{name}.png").stat().st_size > 10_000 and (out / "figures" / f"{name}.pdf").exists()
    pdf = tmp / "research_summary.pdf"
    p = subprocess.run([sys.executable, "-m", "analysis.report", "--input-dirs", str(tmp / "out"), "--output",
                        str(pdf)], capture_output=True, text=True, cwd=tmp, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    data = pdf.read_bytes()
    assert data.startswith(b"%PDF") and data.count(b"/Type /Page\n") + data.count(b"/Type /Page ") >= 8
    if shutil.which("pdftoppm"):  # Debian's poppler-utils: each page renders
        r = subprocess.run(["pdftoppm", "-r", "30", "-png", str(pdf), str(tmp / "page")], capture_output=True, timeout=120)
        assert r.returncode == 0 and len(list(tmp.glob("page-*.png"))) >= 8
