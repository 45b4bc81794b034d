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


class _CountingTokenizer:
    """A tokenizer that counts the texts it is asked to tokenize (every other attribute its own)."""

    def __init__(self, tok) -> None:
        self.tok, self.calls = tok, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.tok(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tok, name)


def _same_split(a, b) -> None:
    assert torch.equal(a.eval_windows(), b.eval_windows()) and a.describe() == b.describe()
    assert a.calib_pool == b.calib_pool and a.shared == b.shared
    for seed in (0, 1):
        n = min(3, a.calib_pool)
        assert torch.equal(a.calib_windows(n, seed), b.calib_windows(n, seed))


def test_a_worker_tokenizes_a_text_once_whatever_windows_its_settings_cut(tokenizer):
    """Settings differing only in how windows are cut (max_length, eval_samples, eval_length)
    tokenize the corpus once and give the windows of fresh splits, bit for bit; another layout or
    another text is tokenized anew."""
    from cwa_core.experiment import load_split

    counting = _CountingTokenizer(tokenizer)
    w = Worker(tiny_model("llama", vocab_size=512), counting)
    cfg = _cfg()
    variants = [cfg, replace(cfg, max_length=32), replace(cfg, eval_samples=3), replace(cfg, eval_length=24),
                replace(cfg, max_length=32, eval_samples=1)]
    splits = [w.split(c) for c in variants]
    assert counting.calls == 1 and w.tokens.tokenizations == 1
    assert len({s.calib_length for s in splits}) == 2 and [s.n_eval for s in splits] == [2, 2, 3, 2, 1]
    assert splits[0].calib.tokens is splits[1].calib.tokens  # one tensor of token ids, shared
    for c, s in zip(variants, splits):
        _same_split(s, load_split(c, tokenizer))  # a fresh split: its own tokenization
    assert w.split(replace(cfg, max_length=32)) is splits[1]  # a data setting seen: its windows too
    w.split(replace(cfg, bos="document"))  # another layout: other token ids
    assert w.tokens.tokenizations == 2
    doc = w.split(replace(cfg, bos="document", max_length=32))
    assert w.tokens.tokenizations == 2
    _same_split(doc, load_split(replace(cfg, bos="document", max_length=32), tokenizer))
    with pytest.raises(ValueError, match="another tokenizer"):
        load_split(cfg, tokenizer, w.tokens)


def test_one_text_as_two_files_keeps_its_two_streams_and_sources(tokenizer, tmp_path):
    """A text tokenized once serves every file holding it, each stream with its own source; a
    split over two files never becomes a shared stream because their ids are the same tensor.
    Protocols published and heldout, calibration and evaluation files with the same text."""
    from cwa_core.data import TokenCache
    from cwa_core.experiment import load_split

    copy = tmp_path / "copy.txt"
    copy.write_bytes(TINYSTORIES.read_bytes())
    for protocol in ("published", "heldout"):
        cfg = ExperimentConfig(model="llama", metric="magnitude", topk=3, protocol=protocol, max_length=32,
                               data_file=str(copy), eval_file=str(TINYSTORIES)).with_context(64)
        tokens = TokenCache(tokenizer)
        cached = load_split(cfg, tokenizer, tokens)
        assert tokens.tokenizations == 1  # one text, two files: tokenized once
        assert cached.calib.tokens is cached.eval.tokens and cached.calib is not cached.eval
        assert cached.calib.source == str(copy) and cached.eval.source == str(TINYSTORIES)
        fresh = load_split(cfg, tokenizer)
        assert not cached.shared and not fresh.shared
        _same_split(cached, fresh)
        assert cached.protocol == fresh.protocol


def test_preflight_tokenizes_a_corpus_once_for_every_window_setting_of_a_sweep(tokenizer):
    pf = Preflight()
    cfg = _cfg()
    pf._tokenizers[(cfg.model, cfg.revision, cfg.trust_remote_code)] = counting = _CountingTokenizer(tokenizer)
    a, b = pf.check_data(cfg), pf.check_data(replace(cfg, max_length=24, eval_samples=3))
    assert counting.calls == 1 and pf.tokens(cfg).tokenizations == 1
    assert (a.calib_length, b.calib_length, a.n_eval, b.n_eval) == (16, 24, 2, 3)
    assert torch.equal(a.eval.tokens, b.eval.tokens)
