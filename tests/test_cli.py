"""The single-experiment command: the documented run on the real model, and bad flags."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

import orchestrator
from conftest import ROOT, STORIES, TINYSTORIES

GOOD = ["--model", str(STORIES), "--data-file", str(TINYSTORIES), "--metric", "grad_x_weight", "--topk", "200",
        "--mode", "global"]


@pytest.fixture(scope="module")
def done_when_run(tmp_path_factory):
    """The command of the issue's 'Done when', on the real 260K model."""
    out = tmp_path_factory.mktemp("x")
    rc = orchestrator.main(GOOD + ["--mode", "global", "--perturb", "sign_flip", "--controls", "random_k,bottom_k",
                                   "--seeds", "0,1,2", "--stability-check", "--save-plots", "--out-dir", str(out),
                                   "--no-progress"])
    assert rc == 0
    return out


def test_documented_command_writes_every_file(done_when_run):
    out = done_when_run
    manifest = json.loads((out / "manifest.json").read_text())
    want = ["top_weights.csv", "top_weights.parquet", "score_sample.parquet", "sensitivity_stats.json",
            "perturbation_results.json", "window_nll.parquet", "stability.json",
            "plots/sensitivity_distribution.png", "plots/layer_comparison.png", "plots/sensitivity_heatmap.png",
            "plots/perturbation_effects.png", "plots/stability_analysis.png", "manifest.json"]
    assert sorted(manifest["files"]) == sorted(want)
    for f in want:
        assert (out / f).stat().st_size > 100, f
    assert manifest["status"] == "finished" and manifest["provenance"]["model"]["n_params"] == 260032
    assert manifest["plots_failed"] == {} and manifest["provenance"]["model"]["n_layers"] == 5
    assert manifest["provenance"]["model"]["revision"].startswith("sha256:")


def test_top_k_hurts_far_more_than_random_k_and_bottom_k_barely_moves(done_when_run):
    res = json.loads((done_when_run / "perturbation_results.json").read_text())
    by = {}
    for r in res["results"]:
        by.setdefault(r["selection"], []).append(r["ppl_ratio"])
    assert len(by["top_k"]) == len(by["random_k"]) == len(by["bottom_k"]) == 3
    assert min(by["top_k"]) > 10 * max(by["random_k"])  # every seed, clearly more
    assert max(by["random_k"]) < 1.2
    assert all(abs(r - 1) < 0.01 for r in by["bottom_k"])  # barely moves
    stab = json.loads((done_when_run / "stability.json").read_text())
    assert len(stab["jaccard"]["pairs"]) == 3 and 0 < stab["jaccard"]["mean"] <= 1
    assert -1 <= stab["spearman"]["mean"] <= 1 and stab["spearman"]["n_weights"] == 10_000


BAD = [
    (["--metric", "fisher"], "--metric", "grad_x_weight"),
    (["--topk", "0"], "--topk", "positive integer"),
    (["--topk", "-5"], "--topk", "positive integer"),
    (["--data-file", "/no/such/file.txt"], "--data-file", "no such file"),
    (["--controls", "random_k,top_k"], "--controls", "allowed: random_k, bottom_k"),
    (["--mode", "both"], "--mode", "per_layer"),
    (["--perturb", "melt"], "--perturb", "bit_flip"),
    (["--seeds", "0,x"], "--seeds", "integers"),
    (["--stability-check", "--seeds", "0"], "--stability-check", "2 seeds"),
    (["--model", "/no/such/model"], "--model", "no such directory"),
    (["--perturb", "zero", "--perturb-scale", "2"], "--perturb-scale", "gauss_noise"),  # sign_flip takes one
]


@pytest.mark.parametrize("extra,flag,allowed", BAD, ids=[b[1] + ":" + " ".join(b[0]) for b in BAD])
def test_bad_flags_exit_2_with_one_line_and_write_nothing(extra, flag, allowed, tmp_path, capsys):
    out = tmp_path / "out"
    rc = orchestrator.main(GOOD + ["--out-dir", str(out), "--no-progress"] + extra)  # later flags win
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1, err
    assert flag in err[0] and allowed in err[0], err[0]
    assert not out.exists()


def test_an_existing_experiment_is_not_overwritten_silently(done_when_run, capsys):
    before = (done_when_run / "manifest.json").read_text()
    rc = orchestrator.main(GOOD + ["--out-dir", str(done_when_run), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--out-dir" in err[0] and "--overwrite" in err[0]
    assert (done_when_run / "manifest.json").read_text() == before


def test_missing_required_flag_and_real_process_has_no_traceback(tmp_path):
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, str(ROOT / "orchestrator.py"), "--model", str(STORIES), "--metric",
                        "magnitude", "--topk", "0", "--out-dir", str(out)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert lines == ["orchestrator.py: error: --topk: must be a positive integer, got 0"]
    assert not out.exists()
    p = subprocess.run([sys.executable, str(ROOT / "orchestrator.py"), "--metric", "magnitude", "--topk", "3"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.strip().splitlines() == ["orchestrator.py: error: --model is required"]
