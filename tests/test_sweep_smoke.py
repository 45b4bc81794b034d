"""The README's main command: the smoke sweep on the built-in demo model, end to end."""
from __future__ import annotations

import json

import pytest

import orchestrator
from conftest import ROOT, mlflow_runs_by_kind

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smoke(ray_local, demo_assets, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("smoke")
    uri = f"sqlite:///{tmp}/mlflow.db"
    rc = orchestrator.main(["--sweep", str(ROOT / "sweeps" / "smoke.yaml"), "--out-dir", str(tmp / "results"),
                            "--tracking-uri", uri, "--no-progress"])
    assert rc == 0
    return tmp, uri


def test_top_k_hurts_more_than_random_k_and_random_k_more_than_bottom_k(smoke):
    tmp, _ = smoke
    m = json.loads((tmp / "results" / "sweep_manifest.json").read_text())
    assert len(m["cells"]) == 4 and all(c["status"] == "finished" for c in m["cells"].values())
    assert m["model_loads"] == 1 and m["scoring_passes"] == 6
    for cid in m["cells"]:
        res = json.loads((tmp / "results" / cid / "perturbation_results.json").read_text())
        mean = {}
        for r in res["results"]:
            mean.setdefault(r["selection"], []).append(r["ppl_ratio"])
        mean = {k: sum(v) / len(v) for k, v in mean.items()}
        assert mean["top_k"] > mean["random_k"] > mean["bottom_k"], (cid, mean)
        assert mean["top_k"] > 1.5, (cid, mean)  # a real model reacts


def test_mlflow_store_has_finished_runs_params_metrics_and_plots(smoke):
    tmp, uri = smoke
    c, runs, by = mlflow_runs_by_kind(uri, "smoke")
    assert len(by["sweep"]) == 1 and by["sweep"][0].info.status == "FINISHED"
    assert len(by["cell"]) == 4 and len(by["seed"]) == 4 * 3 * 3 and len(by["stability"]) == 4
    assert all(r.info.status == "FINISHED" for r in runs)
    for r in by["seed"]:
        assert {"model", "metric", "mode", "topk", "perturbation", "selection", "seed"} <= set(r.data.params)
        assert {"ppl", "baseline_ppl", "ppl_ratio"} <= set(r.data.metrics)
    for r in by["stability"]:
        assert {"jaccard_mean", "jaccard_min", "jaccard_max"} <= set(r.data.metrics)
    plots = {a.path for a in c.list_artifacts(by["cell"][0].info.run_id, "plots")}
    assert {"plots/perturbation_effects.png", "plots/sensitivity_heatmap.png", "plots/stability_analysis.png"} <= plots
    assert "smoke.yaml" in {a.path for a in c.list_artifacts(by["sweep"][0].info.run_id)}


def test_the_ui_opens_on_the_runs_one_row_per_cell_with_the_key_numbers(smoke):
    """MLflow 3 shows an unmarked experiment as a GenAI one; this one is marked for model
    development. Cell runs are top level (not collapsed under the sweep run), each with its
    ratios by selection, Jaccard and (after the analysis) the critical K of its model and metric."""
    tmp, uri = smoke
    c, runs, by = mlflow_runs_by_kind(uri, "smoke")
    assert c.get_experiment_by_name("smoke").tags["mlflow.experimentKind"] == "custom_model_development"
    sweep_id = by["sweep"][0].info.run_id
    for r in by["cell"]:
        assert "mlflow.parentRunId" not in r.data.tags and r.data.tags["cwa.sweep_run_id"] == sweep_id
        assert {"top_k_ppl_ratio_mean", "random_k_ppl_ratio_mean", "bottom_k_ppl_ratio_mean", "jaccard_mean"} <= set(
            r.data.metrics)
    assert all(r.data.tags["mlflow.parentRunId"] == sweep_id for r in by["stability"])
    m = json.loads((tmp / "results" / "sweep_manifest.json").read_text())
    assert m["report"]["error"] is None
    analysis = json.loads((tmp / "results" / "analysis" / "statistical_analysis.json").read_text())
    critical = {cid: g["critical"]["critical_k"] for g in analysis["dose_response"] for cid in g["cells"]}
    assert len(critical) == 4  # each cell in one dose-response group (2 K per metric)
    for r in by["cell"]:  # a number where the analysis found one (interpolated), else only a bound: none
        want = critical[r.data.tags["cwa.cell_id"]]
        if isinstance(want, (int, float)):
            assert r.data.metrics["critical_k"] == pytest.approx(want)
        else:
            assert "critical_k" not in r.data.metrics


def test_the_study_ends_with_its_analysis_and_report(smoke):
    """``report: true``: the cross-model analysis (JSON, Parquet tables, figures) and the PDF,
    beside the results and on the sweep run."""
    tmp, uri = smoke
    out = tmp / "results" / "analysis"
    analysis = json.loads((out / "statistical_analysis.json").read_text())
    assert analysis["cells"]["n_loaded"] == 4 and analysis["cells"]["n_skipped"] == 0
    pdf = (out / "research_summary.pdf").read_bytes()
    assert pdf.startswith(b"%PDF") and pdf.count(b"/Type /Page") >= 5
    c, _, by = mlflow_runs_by_kind(uri, "smoke")
    arts = {a.path for a in c.list_artifacts(by["sweep"][0].info.run_id, "analysis")}
    assert {"analysis/statistical_analysis.json", "analysis/research_summary.pdf"} <= arts
