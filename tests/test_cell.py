"""The one executor (cwa_core/cell.py): a cell gives the same numbers whichever way its stages
run (in order as the single command runs them, scattered as the sweep runs them, with scoring
passes shared at a larger K), its result is assembled once, and one preflight serves both
entry points."""
from __future__ import annotations

import math
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoTokenizer

from conftest import STORIES, TINYSTORIES
from cwa_core.cell import Shared, Worker, assemble, kinds, run_cell, shared_timings, study_ids
from cwa_core.config import ConfigError, ExperimentConfig
from cwa_core.evaluate import Perplexity
from cwa_core.preflight import Preflight
from tiny_models import tiny_model


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(STORIES)


def _cfg(**kw) -> ExperimentConfig:
    base = dict(model="llama", metric="grad_x_weight", topk=3, mode="per_layer", max_samples=2, max_length=16,
                eval_samples=2, seeds=(0, 1), stability_check=True, data_file=str(TINYSTORIES))
    return ExperimentConfig(**{**base, **kw})


def _numbers(res) -> list:
    return [(r["selection"], r["seed"], r["n_weights"], r["ppl"], r["ppl_ratio"], r["nll"]) for r in res.results]


@pytest.mark.parametrize("settings", [
    {},  # a gradient metric, per tensor
    {"metric": "magnitude", "mode": "global", "param_types": ("norm",)},  # fresh norm weights: all 1.0, ties
])
def test_in_order_scattered_and_shared_runs_give_the_same_numbers_bit_for_bit(settings, tokenizer):
    model = tiny_model("llama", vocab_size=512)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = _cfg(**settings)
    single = run_cell(Worker(model, tokenizer), cfg)  # the single command's order

    # the sweep's order: baseline, every scoring pass (at a larger K, both modes), then evaluations
    w = Worker(model, tokenizer)
    baseline = w.baseline(cfg)
    scored = [w.score(cfg, s, 7, ("global", "per_layer")) for s in cfg.seeds]
    rows = [w.evaluate(cfg, sc["scores"].selection(kind, cfg.mode, cfg.topk), s)
            for s, sc in zip(cfg.seeds, scored) for kind in kinds(cfg)]
    sweep = assemble(cfg, baseline, scored, rows, None, shared_timings(baseline, scored, rows, None))
    # and the benchmarks' way: passes shared by cells, handed in
    shared = run_cell(Worker(model, tokenizer), cfg, shared=Shared(baseline, None, dict(zip(cfg.seeds, scored))))

    assert [r[0] for r in _numbers(single)] == ["top_k", "random_k", "bottom_k"] * 2
    assert all(r[3] > 1 and r[4] == r[3] / single.baseline.ppl for r in _numbers(single))
    assert _numbers(single) == _numbers(sweep) == _numbers(shared)
    assert single.baseline == sweep.baseline and single.data == sweep.data and single.tensors == sweep.tensors
    # (repr: all-equal scores give a NaN Spearman, and NaN != NaN)
    assert repr(single.stability) == repr(sweep.stability) == repr(shared.stability)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # every perturbation restored
    assert list(single.timings) == ["data", "baseline_ppl", "score", "perturb_eval"]
    assert list(sweep.timings) == ["baseline_ppl (shared)", "score (shared)", "perturb_eval"]


def test_one_seed_no_controls_and_the_stage_hook(tokenizer):
    model = tiny_model("llama", vocab_size=512)
    seen = []

    class Hook:
        def __init__(self, name):
            self.name = name

        def __enter__(self):
            seen.append(self.name)

        def __exit__(self, *exc):
            return False

    res = run_cell(Worker(model, tokenizer), _cfg(seeds=(0,), stability_check=False, controls=()), stage=Hook)
    assert res.stability is None and [r["selection"] for r in res.results] == ["top_k"]
    assert seen == ["data", "baseline_ppl", "score", "perturb_eval"]
    res = run_cell(Worker(model, tokenizer), _cfg(controls=("bottom_k",)), stage=Hook)
    assert seen[4:] == ["data", "baseline_ppl", "score", "perturb_eval", "perturb_eval", "score", "perturb_eval",
                        "perturb_eval", "stability"]
    assert res.stability["seeds"] == [0, 1] and 0 <= res.stability["jaccard"]["mean"] <= 1


RANK = {"layer": 0, "row": 1, "col": 2, "per_tensor": 1, "global": 4, "global_lower_bound": False}


def _fake_scores(seed: int):
    return {"scores": SimpleNamespace(seed=seed, ranks=[RANK], seconds=0.25), "tensors": [{"shape": [2, 3]}]}


def test_assemble_divides_by_the_baseline_keeps_inf_and_nan_and_copies_the_shared_study():
    base = Perplexity(ppl=4.0, nll=math.log(4.0), n_tokens=10, n_windows=2, window_length=6)
    baseline = {"ppl": base, "data": {"eval_windows": 2}, "seconds": 1.5, "model": None}
    rows = [{"selection": k, "seed": 0, "ppl": p, "seconds": 0.5}
            for k, p in (("top_k", 8.0), ("random_k", math.inf), ("bottom_k", math.nan))]
    study = {"report": {"candidates": [{"layer": 0, "row": 1, "col": 2}], "published": None}, "seconds": 2.0}
    cfg = _cfg(seeds=(0,), stability_check=False, detect_super_weights=True)
    timings = shared_timings(baseline, [_fake_scores(0)], rows, study)
    res = assemble(cfg, baseline, [_fake_scores(0)], rows, study, timings)
    ratios = [r["ppl_ratio"] for r in res.results]
    assert ratios[0] == 2.0 and ratios[1] == math.inf and math.isnan(ratios[2])
    assert all("seconds" not in r for r in res.results) and res.data == {"eval_windows": 2}
    assert timings == {"baseline_ppl (shared)": 1.5, "score (shared)": 0.25, "perturb_eval": 1.5,
                       "super_weights (shared)": 2.0}
    assert res.super_weights["candidates"][0]["ranks"] == {
        "grad_x_weight": {"0": {"per_tensor": 1, "global": 4, "global_lower_bound": False}}}
    assert "ranks" not in study["report"]["candidates"][0]  # other cells share the study's report
    assert res.stability is None and res.tensors == [{"shape": [2, 3]}]


def test_the_hf_id_rule():
    hub = SimpleNamespace(model_id="org/model", source="hub", dtype="bfloat16")
    local = SimpleNamespace(model_id="/models/x", source="local", dtype="float32")
    cfg = _cfg()
    assert study_ids(cfg, hub) == ("org/model", "org/model", "bfloat16")
    assert study_ids(cfg, local) == ("/models/x", None, "float32")
    named = replace(cfg, hf_id="meta-llama/Llama-2-7b-hf")
    assert study_ids(named, local)[1] == study_ids(named, hub)[1] == "meta-llama/Llama-2-7b-hf"
    assert study_ids(cfg, None) == ("llama", None, "")


def test_preflight_prepare_checks_every_model_before_any_data():
    ok = ExperimentConfig(model=str(STORIES), metric="magnitude", topk=5, max_length=32, eval_samples=4,
                          data_file=str(TINYSTORIES), device="cpu")
    [ready] = Preflight().prepare([ok])
    assert ready.eval_length == 32 and ready.eval_samples == 4  # the protocol's defaults made concrete
    too_long = replace(ok, eval_samples=10**6)  # its data cannot hold the windows
    too_many = replace(ok, mode="global", topk=10**9)  # more than the model's weights
    with pytest.raises(ConfigError) as e:
        Preflight().prepare([too_long, too_many])
    assert e.value.key == "topk"  # the second config's model check comes before the first one's data
    with pytest.raises(ConfigError) as e:
        Preflight().prepare([too_long])
    assert e.value.key == "eval_samples"
