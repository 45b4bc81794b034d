"""The benchmarks run (quick / CPU-smoke modes, in this process) and report what they claim.

No timing thresholds here: the machine is shared. What can fail is structural: our global top-K
and the naive one must give the same answer, perturbation must restore every bit, each JSON must
carry its figures, and ``gpu_8b`` must run every stage of the standard experiment end to end.
The last tests pin the speed and memory fixes the benchmarks led to: they change no answer.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from benchmarks import bit_errors, common, gpu_8b, gradient_memory, perturb, topk
from cwa_core import backward, metrics, selection
from cwa_core.architectures import ParamRef, decoder_layers, scored_params
from tiny_models import tiny_model

QUICK = ["--quick", "--inprocess"]


def _json(tmp_path, name):
    data = json.loads((tmp_path / f"{name}.json").read_text())
    assert data["benchmark"] == name
    assert {"date", "cpu", "torch", "transformers"} <= set(data["machine"])
    return data


def _finite(x) -> bool:
    return isinstance(x, float) and math.isfinite(x)


def test_topk_ours_equals_naive_and_reports_time_and_memory(tmp_path):
    out = topk.main([*QUICK, "--out", str(tmp_path)])
    assert out["same_answer"] is True
    data = _json(tmp_path, "topk")
    assert data["same_answer"] is True
    assert set(data["seconds"]) == {"ours", "naive"} and all(t > 0 for t in data["seconds"].values())
    assert data["time_ratio_ours_over_naive"] > 0
    for v in topk.VARIANTS:
        assert _finite(data["extra_memory_fraction_of_model"][v]) and _finite(data["peak_memory_x_model"][v])
    # and directly, on a model with ties (fresh norm weights are all 1.0): the same ids as brute force
    model = common.build_model(common.QUICK)
    refs = scored_params(model, ["attention", "mlp", "norm"])
    ours, naive = topk.ours(model, refs, 700), topk.naive(model, refs, 700)
    assert torch.equal(torch.sort(ours).values, torch.sort(naive).values)


def test_gradient_memory_reports_every_variant(tmp_path):
    out = gradient_memory.main([*QUICK, "--out", str(tmp_path)])
    data = _json(tmp_path, "gradient_memory")
    assert set(data["figures"]) == set(gradient_memory.VARIANTS)
    for fig in data["figures"].values():
        assert _finite(fig["peak_x_model"]) and _finite(fig["extra_x_model"])
        assert fig["child"]["seconds"] > 0
    assert out["same_top_weight"] is True  # hooks + checkpointing find what plain backward finds
    assert len({data["figures"][v]["child"]["top_id"] for v in ("grad_x_weight", "grad_x_weight_no_checkpoint", "plain")}) == 1


def test_perturb_restores_every_bit_and_reports_ratios(tmp_path):
    out = perturb.main([*QUICK, "--out", str(tmp_path)])
    data = _json(tmp_path, "perturb")
    assert out["restored_exactly"] is True and out["perplexity_changed"] is True
    assert set(data["seconds"]) == {"perplexity", "ours", "full_copy"}
    assert all(t > 0 for t in data["seconds"].values())
    assert data["ratio_to_perplexity"] > 0 and data["ratio_to_full_copy"] > 0
    assert set(data["extra_memory_fraction_of_model"]) == set(perturb.VARIANTS)


def test_bit_errors_trial_restores_and_reports_ratio_and_memory(tmp_path):
    out = bit_errors.main([*QUICK, "--out", str(tmp_path)])
    data = _json(tmp_path, "bit_errors")
    assert out["restored_exactly"] is True and data["restored_exactly"] is True
    assert set(data["seconds"]) == {"perplexity", "trial", "perturbed_perplexity", "draw_apply_restore"}
    assert all(t > 0 for t in data["seconds"].values()) and _finite(data["ratio"])
    assert len(data["ratios"]) == len(data["ratios_to_perturbed_perplexity"]) == 3
    assert _finite(data["ratio_to_perturbed_perplexity"])
    assert data["verdict"] in ("PASS", "FAIL") and data["limit"] == 1.05
    runs = data["memory_runs"]
    assert runs["10x_weights"]["weights"] / runs["small"]["weights"] == pytest.approx(10, rel=1e-3)  # 20 blocks vs 2
    assert runs["small"]["flips"] > 0 and runs["10x_flips"]["flips"] > 5 * runs["small"]["flips"]
    assert all(r["traced_bytes"] > 0 for r in runs.values())


def _check_smoke(out):
    assert out["mode"] == "cpu-smoke"
    for run in out["models"]:
        assert set(run["stages"]) == set(gpu_8b.STAGES)
        for name, stage in run["stages"].items():
            assert stage["seconds"] > 0 and stage["calls"] >= 1, name
        assert run["stages"]["score"]["calls"] == 3
        assert run["perplexity"]["baseline"] > 1
        assert run["perplexity"]["tokens_per_s_baseline"] > 0
        assert len(run["results"]) == 9  # (top_k, random_k, bottom_k) x seeds 0, 1, 2
        assert {(r["selection"], r["seed"]) for r in run["results"]} == {
            (k, s) for k in ("top_k", "random_k", "bottom_k") for s in (0, 1, 2)}
        assert all(r["ppl"] > 1 and r["n_weights"] > 0 for r in run["results"])
        assert 0 <= run["stability_jaccard_mean"] <= 1
        assert run["magnitude_top1000"]["n"] == 1000


def test_gpu_8b_cpu_smoke_runs_every_stage(tmp_path):
    out = gpu_8b.main(["--cpu-smoke", "--out", str(tmp_path)])
    assert [r["model"] for r in out["models"]] == list(gpu_8b.MODELS)
    _check_smoke(out)
    assert _json(tmp_path, "gpu_8b_cpu_smoke")["models"][0]["config"]["num_hidden_layers"] == 2


def test_gpu_8b_micro_batches_when_scoring_runs_out_of_memory(tmp_path, monkeypatch):
    from cwa_core import cell

    real, seen = cell.score_seed, []

    def flaky(*args, **kwargs):
        seen.append(kwargs["opts"].micro_batch)
        if len(seen) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(cell, "score_seed", flaky)
    out = gpu_8b.main(["--cpu-smoke", "--models", "mistral-7b-v0.1", "--out", str(tmp_path)])
    _check_smoke(out)
    assert seen[:2] == [None, 10] and out["models"][0]["micro_batch_used"] == 10


def test_peak_meter_sees_an_allocation():
    import mmap

    meter = common.PeakMeter()
    meter.start()
    # 64 MiB of fresh pages, touched: a heap allocation could reuse pages freed (but still
    # resident) by an earlier test in this process, and then no meter would see it
    buf = mmap.mmap(-1, 64 * 2**20)
    for i in range(0, len(buf), 4096):
        buf[i] = 1
    meter.stop()
    buf.close()
    assert meter.peak - meter.rss_start > 48 * 2**20


# --------------------------------------------------------------------------- the fixes change no answer

def _reference_topk(a: np.ndarray, k: int, largest: bool) -> list[int]:
    key = np.where(np.isnan(a), np.inf, a).astype(np.float64)
    nan = np.isnan(a).astype(int)  # NaN ranks above +inf, as in torch.topk
    order = np.lexsort((np.arange(a.size), -key, -nan) if largest else (np.arange(a.size), key, nan))
    return order[:k].tolist()


@pytest.mark.parametrize("kind", ["normal", "ties", "zeros_signed", "nan_inf"])
def test_topk_stable_and_the_cpu_fast_path_match_a_brute_force_order(kind):
    rng = np.random.default_rng(0)
    ref = ParamRef("x", 0, "mlp", torch.nn.Parameter(torch.zeros(1)), torch.nn.Linear(1, 1), "weight", None)
    for trial in range(60):
        n = int(rng.integers(1, 400))
        if kind == "normal":
            a = rng.standard_normal(n).astype(np.float32)
        elif kind == "ties":
            a = rng.integers(-3, 4, n).astype(np.float32)
        elif kind == "zeros_signed":
            a = np.where(rng.random(n) < 0.5, np.float32(0.0), np.float32(-0.0))
        else:
            a = rng.integers(-2, 3, n).astype(np.float32)
            u = rng.random(n)
            a[u < 0.1], a[(u > 0.1) & (u < 0.2)], a[(u > 0.2) & (u < 0.25)] = np.nan, np.inf, -np.inf
        t = torch.from_numpy(a)
        k = int(rng.integers(1, n + 1))
        fast = selection._reduce_cpu(ref, t, k)
        assert (fast is None) == (kind == "nan_inf" and not np.isfinite(a).all())
        for largest in (True, False):
            want = _reference_topk(a, k, largest)
            v, i = selection.topk_stable(t, k, largest)
            assert i.tolist() == want
            if fast is not None:
                fv, fi = fast[0] if largest else fast[1]
                assert fi.tolist() == want and torch.equal(fv, v)
        if fast is not None:
            stats = selection.tensor_stats(ref, t)
            for f in ("count", "min", "max", "p50", "p95", "p99"):
                assert getattr(fast[2], f) == getattr(stats, f), f
            for f in ("mean", "std"):
                assert getattr(fast[2], f) == pytest.approx(getattr(stats, f), rel=1e-12, abs=1e-12), f


def test_quantiles_by_sort_equal_kthvalue():
    g = torch.Generator().manual_seed(0)
    for n in (1, 2, 3, 10, 1001):
        x = torch.randint(-3, 4, (n,), generator=g).float()
        assert [float(v) for v in selection._quantiles(x, (0.5, 0.95, 0.99), by_sort=True)] == \
               [float(v) for v in selection._quantiles(x, (0.5, 0.95, 0.99), by_sort=False)]


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "mixtral"])
def test_checkpointed_blocks_give_bitwise_identical_scores(model_type):
    model = tiny_model(model_type)
    refs = scored_params(model)
    calib = torch.randint(3, 128, (3, 16), generator=torch.Generator().manual_seed(0))
    inner = [m for m in decoder_layers(model)[0].modules()]
    for name in ("grad_x_weight", "grad_squared"):
        got = {}
        for ck in (True, False):
            calls = []
            hooks = [m.register_forward_hook(lambda *a: calls.append(1)) for m in inner]
            out = {}
            metrics.score(model, refs, name, calib, lambda r, s: out.__setitem__(r.name, s.clone()),
                          metrics.ScoreOptions(checkpoint=ck))
            for h in hooks:
                h.remove()
            got[ck] = (out, len(calls))
        assert all(torch.equal(got[True][0][k], got[False][0][k]) for k in got[False][0])
        assert got[True][1] > got[False][1]  # the block really was recomputed in the backward
    assert all("forward" not in block.__dict__ for block in decoder_layers(model))  # wrapper removed


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_rows", [None, 1, 3])
def test_lean_loss_gives_nll_sums_gradient_bit_for_bit(dtype, chunk_rows, monkeypatch):
    g = torch.Generator().manual_seed(0)
    b, length, v = 3, 11, 1000
    if chunk_rows:
        monkeypatch.setattr(backward, "_LOSS_CHUNK", chunk_rows * v)
    x = (torch.randn(b, length, v, generator=g) * 3).to(dtype)
    ids = torch.randint(0, v, (b, length), generator=g)
    grads, losses = [], []
    for lean in (True, False):
        leaf = x.clone().requires_grad_(True)
        loss = backward._nll_sum(leaf * 1, ids, lean) / (b * (length - 1))  # * 1: logits are not leaves
        loss.backward()
        grads.append(leaf.grad)
        losses.append(loss.item())
    bits = torch.int16 if dtype == torch.bfloat16 else torch.int32
    assert torch.equal(grads[0].view(bits), grads[1].view(bits))
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)



@pytest.mark.slow
def test_sweep_overhead_runs_both_ways_with_one_model_load(tmp_path, ray_local):
    from benchmarks import sweep_overhead

    out = sweep_overhead.main(["--quick", "--two-actors", "--out", str(tmp_path)])
    data = _json(tmp_path, "sweep_overhead")
    assert out["same_numbers"] is True  # the sweep and the plain loop give the same perplexities
    assert data["model_loads"] == 1 and data["scoring_passes"] == 6  # 2 metrics x 3 seeds, shared across K
    assert data["cells"] == 8 and data["order"] == ["plain", "sweep", "sweep_2x1"]
    two = data["two_actors"]
    assert two["model_loads"] == 2 and two["scoring_passes"] == 6  # one load per actor; the passes split
    assert data["max_relative_difference"]["sweep_2x1"] < 1e-5 and _finite(two["ratio"])
    assert _finite(data["ratio"]) and data["ratio"] > 0
    steps = data["sweep_steps_s"]
    assert {"tracking_start_s", "first_result_s", "tasks_s", "ray_shutdown_s"} <= set(steps)
    assert 0 < steps["first_result_s"] < steps["tasks_s"]


def test_random_k_memory_measures_both_modes_side_by_side(tmp_path):
    from benchmarks import random_k_memory

    out = random_k_memory.main([*QUICK, "--out", str(tmp_path)])
    data = _json(tmp_path, "random_k_memory")
    for step in random_k_memory.STEPS:
        r = data["ratios"][step]
        assert _finite(r["peak_per_layer_over_global"]) and r["peak_per_layer_over_global"] > 0
        for v in random_k_memory.VARIANTS:
            assert data["memory"][step][v]["child"]["n_selected"] > 0
    assert out["ratios"]["select"]["peak_per_layer_over_global"] == data["ratios"]["select"]["peak_per_layer_over_global"]
