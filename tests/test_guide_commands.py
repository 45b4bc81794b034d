"""The research guide's commands, as written, with orchestrator.py in place of
phase1_runner_enhanced.py: every form it uses runs and writes the files the guide expects.

The guide's form: ``--model ... --metric ... --topk ... --mode ... --max-samples ...
--max-length ... [--perturb ... --perturb-scale ...] --controls ... --seeds ...
--stability-check --device ... --save-plots --out-dir ...``. Here the model is the real local
260K-parameter Llama and the text a local file (``--data-file``) instead of hub ids, with few
and short windows (``--eval-samples`` too) so that each command takes seconds.
"""
from __future__ import annotations

import csv
import json

import pytest

import orchestrator
from conftest import STORIES, TINYSTORIES

PNG = b"\x89PNG\r\n\x1a\n"
COLUMNS = ["parameter", "layer", "param_type", "expert", "row", "col", "score", "rank", "seed"]
N_TENSORS = 46  # stories260k's default scored set: 5 blocks x (4 attention + 3 mlp + 2 norms) + final norm

# (id, metric, topk, mode, perturbation flags, seeds): one command per form the guide uses
FORMS = [
    ("phase1_magnitude_per_layer", "magnitude", 10, "per_layer", [], "0,1,2"),
    ("phase1_grad_x_weight_global", "grad_x_weight", 50, "global", [], "0,1,2,3,4"),
    ("phase1_grad_squared_per_layer", "grad_squared", 10, "per_layer", [], "0,1,2"),
    ("phase3_sign_flip_scale_1", "grad_x_weight", 50, "global", ["--perturb", "sign_flip", "--perturb-scale", "1.0"], "0,1,2"),
    ("phase3_gauss_noise", "magnitude", 10, "per_layer", ["--perturb", "gauss_noise", "--perturb-scale", "0.5"], "0,1,2,3,4"),
    ("phase3_bit_flip", "grad_squared", 50, "global", ["--perturb", "bit_flip"], "0,1,2"),
]


def _command(metric, topk, mode, perturb, seeds, out) -> list[str]:
    return (["--model", str(STORIES), "--metric", metric, "--topk", str(topk), "--mode", mode,
             "--max-samples", "4", "--max-length", "64"] + perturb +
            ["--controls", "random_k,bottom_k", "--seeds", seeds, "--stability-check", "--device", "cpu",
             "--save-plots", "--out-dir", str(out),
             "--data-file", str(TINYSTORIES), "--eval-samples", "4"])  # local stand-ins for the hub ids


@pytest.mark.parametrize("form,metric,topk,mode,perturb,seeds", FORMS, ids=[f[0] for f in FORMS])
def test_the_guides_command_runs_as_written(form, metric, topk, mode, perturb, seeds, tmp_path, assets):
    out = tmp_path / form
    assert orchestrator.main(_command(metric, topk, mode, perturb, seeds, out)) == 0
    n_seeds = len(seeds.split(","))

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "finished"
    s = manifest["settings"]
    assert (s["metric"], s["topk"], s["mode"], s["seeds"], s["device"]) == (
        metric, topk, mode, list(range(n_seeds)), "cpu")
    assert s["perturb"] == (perturb[1] if perturb else "sign_flip")
    for name in ("top_weights.csv", "sensitivity_stats.json"):
        assert name in manifest["files"] and (out / name).stat().st_size > 0

    rows = list(csv.reader((out / "top_weights.csv").open()))
    assert rows[0] == COLUMNS
    per_seed = topk * (N_TENSORS if mode == "per_layer" else 1)
    assert len(rows) - 1 == n_seeds * per_seed
    for seed in range(n_seeds):
        scores = [float(r[6]) for r in rows[1:] if r[8] == str(seed)]
        assert len(scores) == per_seed and scores == sorted(scores, reverse=True)
        assert all(x >= 0 for x in scores)

    stats = json.loads((out / "sensitivity_stats.json").read_text())
    assert stats["metric"] == metric and [p["seed"] for p in stats["per_seed"]] == list(range(n_seeds))
    first = stats["per_seed"][0]
    assert len(first["per_tensor"]) == N_TENSORS
    assert sum(t["count"] for t in first["per_layer"]) == sum(t["count"] for t in first["per_tensor"])

    plots = sorted((out / "plots").glob("*.png"))
    assert len(plots) == 5, plots
    for p in plots:
        assert p.read_bytes()[:8] == PNG and f"plots/{p.name}" in manifest["files"]

    res = json.loads((out / "perturbation_results.json").read_text())
    assert [r["selection"] for r in res["results"]] == ["top_k", "random_k", "bottom_k"] * n_seeds
    spec = res["perturbation"]
    want = {"phase3_sign_flip_scale_1": ("sign_flip", 1.0, None), "phase3_gauss_noise": ("gauss_noise", 0.5, None),
            "phase3_bit_flip": ("bit_flip", None, 30)}.get(form, ("sign_flip", 1.0, None))  # fp32: exponent MSB
    assert (spec["method"], spec["scale"], spec["bit"]) == want
    by = {}
    for r in res["results"]:
        by.setdefault(r["selection"], []).append(r["ppl_ratio"])
    if spec["method"] == "bit_flip":  # exponent flips: inf or NaN perplexities are expected, the bit is recorded
        assert {r["bit"] for r in res["results"]} == {30}
    else:  # the top-K weights matter more than K random ones, on average over the seeds
        assert all(x is not None and x > 0 for v in by.values() for x in v), by
        assert sum(by["top_k"]) > sum(by["random_k"]), by
    stab = json.loads((out / "stability.json").read_text())
    assert len(stab["jaccard"]["pairs"]) == n_seeds * (n_seeds - 1) // 2
