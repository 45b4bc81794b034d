"""Super weights through the command and a sweep: detection once per model and settings, its
causal test, each cell's ranks under its own metric, the figure, MLflow."""
from __future__ import annotations

import json
import math

import pytest
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

import orchestrator
from conftest import STORIES, TINYSTORIES, mlflow_runs_by_kind
from test_plots import assert_real_png
from test_superweights import plant

ROW, COL = 30, 100  # planted in layer 1's down projection


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """The real 260K Llama with one super weight planted: token " the" carries a large embedding
    channel, layer 1's MLP input COL reads it, down_proj[ROW, COL] makes a massive output."""
    out = tmp_path_factory.mktemp("planted") / "stories-planted"
    tok = AutoTokenizer.from_pretrained(STORIES)
    model = AutoModelForCausalLM.from_pretrained(STORIES).eval()
    plant(model, 1, row=ROW, col=COL, trigger=tok(" the", add_special_tokens=False)["input_ids"][-1], channel=5,
          amp=8.0, value=4.0)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


ARGS = ["--data-file", str(TINYSTORIES), "--topk", "20", "--mode", "per_layer", "--seeds", "0,1",
        "--max-samples", "4", "--max-length", "64", "--eval-samples", "16", "--no-progress"]


def test_the_command_finds_the_planted_weight_tests_it_and_ranks_it(planted, tmp_path):
    out = tmp_path / "sw"
    assert orchestrator.main(["--model", str(planted), "--metric", "magnitude", "--detect-super-weights",
                              "--out-dir", str(out)] + ARGS) == 0
    report = json.loads((out / "super_weights.json").read_text())
    assert [(c["layer"], c["row"], c["col"]) for c in report["candidates"]] == [(1, ROW, COL)]
    c = report["candidates"][0]
    assert c["value"] == 4.0 and c["round"] == 0 and c["dtype"] == "float32"
    assert c["spike_out_before"] > 1000 and c["spike_out_after"] < 50  # gone once zeroed
    # paired at the output spike's token, where the weight makes the whole spike; nothing rejected
    assert c["in_position"] == c["out_position"] and report["rejected"] == []
    assert c["contribution_abs"] == pytest.approx(abs(c["y_at_token"]), rel=1e-3) and c["contribution_abs"] > 1000
    # measured: zeroed x346, random x1.00005, restored x2.5 (84% of the damage recovered)
    assert c["ratio_zeroed"] > 100 and abs(c["ratio_random"] - 1) < 0.01 and c["recovered_fraction"] > 0.5
    assert c["ranks"]["magnitude"]["0"]["per_tensor"] == 1 and c["ranks"]["magnitude"]["1"]["per_tensor"] == 1
    assert report["rounds"] == 2 and report["converged"] and report["thresholds"]["out_ratio"] == 1000.0
    assert report["prompts"]["n_windows"] == 8 and "held-out" in report["prompts"]["source"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert "super_weights.json" in manifest["files"] and "plots/super_weight_spikes.png" in manifest["files"]
    assert manifest["settings"]["detect_super_weights"] is True
    assert_real_png(out / "plots" / "super_weight_spikes.png")


def test_a_single_prompt_as_in_the_published_method(planted, tmp_path):
    out = tmp_path / "one"
    prompt = "Once upon a time the cat saw the dog in the park."
    assert orchestrator.main(["--model", str(planted), "--metric", "magnitude", "--detect-super-weights",
                              "--super-prompt", prompt, "--out-dir", str(out)] + ARGS) == 0
    report = json.loads((out / "super_weights.json").read_text())
    assert report["prompts"] == {"source": "super_prompt", "n_windows": 1, "length": report["prompts"]["length"],
                                 "text": prompt}
    assert [(c["layer"], c["row"], c["col"]) for c in report["candidates"]] == [(1, ROW, COL)]


def test_thresholds_are_options_and_recorded(planted, tmp_path):
    out = tmp_path / "strict"
    assert orchestrator.main(["--model", str(planted), "--metric", "magnitude", "--detect-super-weights",
                              "--super-out-floor", "1e6", "--out-dir", str(out)] + ARGS) == 0
    report = json.loads((out / "super_weights.json").read_text())
    assert report["candidates"] == [] and report["thresholds"]["out_floor"] == 1e6


@pytest.mark.slow
def test_a_sweep_studies_once_per_model_and_ranks_under_each_cells_metric(planted, ray_local, tmp_path):
    raw = {"name": "swsweep", "model": str(planted), "data_file": str(TINYSTORIES), "topk": 20, "mode": "per_layer",
           "seeds": [0, 1], "max_samples": 4, "max_length": 64, "eval_samples": 16, "detect_super_weights": True,
           "metric": {"grid_search": ["magnitude", "grad_x_weight"]}, "resources": {"cpus_per_actor": 1}}
    f = tmp_path / "sw.yaml"
    f.write_text(yaml.safe_dump(raw))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert orchestrator.main(["--sweep", str(f), "--out-dir", str(tmp_path / "out"), "--tracking-uri", uri,
                              "--no-progress"]) == 0
    m = json.loads((tmp_path / "out" / "sweep_manifest.json").read_text())
    assert m["super_weight_studies"] == 1 and m["scoring_passes"] == 4
    for cid, cell in m["cells"].items():
        report = json.loads((tmp_path / "out" / cid / "super_weights.json").read_text())
        metric = cell["settings"]["metric"]
        (c,) = report["candidates"]
        assert (c["layer"], c["row"], c["col"]) == (1, ROW, COL) and set(c["ranks"]) == {metric}
        assert set(c["ranks"][metric]) == {"0", "1"} and all(r["per_tensor"] >= 1 for r in c["ranks"][metric].values())
        assert (tmp_path / "out" / cid / "plots" / "super_weight_spikes.png").exists()
    _, runs, by = mlflow_runs_by_kind(uri, "swsweep")
    for r in by["cell"]:
        assert r.data.metrics["super_weight_candidates"] == 1 and r.data.metrics["super_weights_ratio_zeroed"] > 100
        m = r.data.metrics  # the perplexities of the causal test, all candidates together
        assert m["super_weights_ppl_zeroed"] > 100 * m["super_weights_ppl_random"]
        assert m["super_weights_ppl_restored"] < m["super_weights_ppl_zeroed"] / 10
        for k in ("ratio_zeroed", "ratio_random", "ratio_restored"):  # and as log10, for the charts
            assert m[f"log10_super_weights_{k}"] == pytest.approx(math.log10(m[f"super_weights_{k}"]), rel=1e-12)
    from mlflow.tracking import MlflowClient

    arts = {a.path for a in MlflowClient(uri).list_artifacts(by["cell"][0].info.run_id, "plots")}
    assert "plots/super_weight_spikes.png" in arts


def test_a_mixture_of_experts_model_is_refused_before_any_work(tmp_path, capsys):
    from tiny_models import tiny_model

    model = tiny_model("mixtral")
    model.save_pretrained(tmp_path / "mixtral")
    AutoTokenizer.from_pretrained(STORIES).save_pretrained(tmp_path / "mixtral")
    capsys.readouterr()  # the saving's progress bars
    rc = orchestrator.main(["--model", str(tmp_path / "mixtral"), "--metric", "magnitude", "--detect-super-weights",
                            "--out-dir", str(tmp_path / "out"), "--topk", "2", "--data-file", str(TINYSTORIES),
                            "--max-length", "32", "--eval-samples", "4", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--detect-super-weights: mixtral has no single MLP down projection" in err[0]
    assert not (tmp_path / "out").exists()


def test_a_quantize_campaign_keeps_the_detected_super_weight_out_of_its_tensors_scale(planted, tmp_path):
    """Issue 17 through the command: quantized with the rest, the planted weight (4.0) sets its
    tensor's 8-bit scale to 4/127, so every other weight of layer 1's down projection below
    2/127 rounds to 0; the super_weights arm leaves the detected weight out of the scale. The
    whole model is quantized in both arms (8-bit per-tensor rounding of the other tensors costs
    ~1.19x here), so the difference is that one tensor's; at 4 bits the other tensors dominate.
    The by-construction version of this (the plant alone decides) is in test_quantize.py."""
    out = tmp_path / "q"
    assert orchestrator.main(["--model", str(planted), "--metric", "magnitude", "--detect-super-weights",
                              "--campaign", "quantize", "--quant-bits", "8,4", "--quant-group", "tensor",
                              "--protect", "none,super_weights", "--out-dir", str(out), *ARGS]) == 0
    camp = json.loads((out / "campaign_results.json").read_text())
    assert camp["arms"]["super_weights"]["n_protected"] == 1 and camp["settings"]["quant_group"] == "tensor"
    median = {(s["arm"], s["level"]): s["median_ratio"] for s in camp["summary"]}
    assert median[("none", 8)] > 1.03 * median[("super_weights", 8)]
    assert median[("none", 4)] >= median[("super_weights", 4)] > median[("super_weights", 8)] > 1
    assert len(camp["trials"]) == 2 * 2 * 2  # seeds x bit widths x arms: one trial each (deterministic)
    hits = {(r["arm"], r["level"], r["seed"]): r["changed"] for r in camp["trials"]}
    assert all(hits[("none", b, s)] >= hits[("super_weights", b, s)] for b in (8, 4) for s in (0, 1))
