"""cwa_core.campaign: issue 17's protected sets, trials and exact restore, checked on the weights.

Weights are compared through their stored integer bits (one int64 per weight over the refs'
concatenation, masked to the dtype's width), so a flip, a zero or a rounding shows up exactly.
"""
from __future__ import annotations

import json
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, STORIES
from cwa_core import bit_errors as be
from cwa_core import campaign as cp
from cwa_core.architectures import ParamRef, scored_params
from cwa_core.evaluate import finite_status, perplexity
from cwa_core.experiment import score_seed
from cwa_core.metrics import ScoreOptions, score
from cwa_core.perturb import PerturbationLeakError, int_view
from cwa_core.selection import tensor_offsets
from tiny_models import VOCAB, tiny_model

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ALL_ARMS = ("none", "top_k", "random_k", "bottom_k", "super_weights")


def bits_of(refs) -> np.ndarray:
    """Every weight's stored bits as non-negative int64, refs concatenated (global id order)."""
    out = []
    for r in refs:
        iv = int_view(r.param.data.reshape(-1)).to(torch.int64)
        out.append((iv & ((1 << (8 * r.param.element_size())) - 1)).numpy())
    return np.concatenate(out)


def flipped_pairs(before: np.ndarray, now: np.ndarray) -> set[tuple[int, int]]:
    """The (global id, bit) pairs that differ."""
    diff = before ^ now
    idx = np.flatnonzero(diff)
    w, b = np.nonzero((diff[idx, None] >> np.arange(64)) & 1)
    return set(zip(idx[w].tolist(), b.tolist()))


def setup(dtype=torch.float32, k=8, seed=0):
    """(model, refs, windows, protected sets of every arm) on a tiny Llama."""
    model = tiny_model("llama", dtype=dtype)
    refs = scored_params(model)
    scores = score_seed(model, refs, None, metric="magnitude", seed=seed, k=k, modes=("per_layer",),
                        max_samples=0, opts=ScoreOptions(), stability_sample=10)
    sels = {kind: scores.selection(kind, "per_layer") for kind in ("top_k", "random_k", "bottom_k")}
    down = [(i, r) for i, r in enumerate(refs) if r.name.endswith("mlp.down_proj.weight")]
    cands = [{"layer": down[0][1].layer, "row": 3, "col": 5}, {"layer": down[1][1].layer, "row": 0, "col": 63}]
    sids = cp.super_weight_ids(refs, cands)
    protected = cp.protected_sets(sels, tensor_offsets(refs), ALL_ARMS, sids)
    windows = torch.randint(3, VOCAB, (4, 24), generator=torch.Generator().manual_seed(1))
    return model, refs, windows, protected


# --------------------------------------------------------------------------- protected sets

def test_protected_sets_follow_the_arms_and_the_selections():
    model, refs, _, protected = setup()
    assert list(protected) == list(ALL_ARMS)
    assert protected["none"].size == 0 and protected["none"].dtype == np.int64
    offsets = tensor_offsets(refs).tolist()
    n_tensors = len(refs)
    for arm in ("top_k", "random_k", "bottom_k"):
        ids = protected[arm]
        assert ids.dtype == np.int64 and np.all(np.diff(ids) > 0)
        # per_layer K=8: 8 a tensor, or all of a tensor smaller than K (none here: the smallest has 32)
        per = np.bincount(np.searchsorted(offsets, ids, side="right") - 1, minlength=n_tensors)
        assert per.tolist() == [min(8, r.numel) for r in refs]
    # top_k by magnitude: within each tensor no unprotected |w| exceeds the smallest protected |w|
    allw = torch.cat([r.param.detach().reshape(-1).abs() for r in refs]).numpy()
    for t, r in enumerate(refs):
        lo, hi = offsets[t], offsets[t] + r.numel
        inside = protected["top_k"][(protected["top_k"] >= lo) & (protected["top_k"] < hi)]
        rest = np.setdiff1d(np.arange(lo, hi), inside)
        assert allw[rest].max() <= allw[inside].min()
    with pytest.raises(ValueError, match="protect: unknown arm 'top'; allowed: none, top_k"):
        cp.protected_sets({}, tensor_offsets(refs), ["top"])
    with pytest.raises(ValueError, match="protect: super_weights needs the detected candidates"):
        cp.protected_sets({}, tensor_offsets(refs), ["none", "super_weights"])
    with pytest.raises(ValueError, match="protect: an arm appears twice"):
        cp.protected_sets({}, tensor_offsets(refs), ["none", "none"])
    with pytest.raises(ValueError, match="protect: no top_k selection"):
        cp.protected_sets({}, tensor_offsets(refs), ["top_k"])


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_super_weight_ids_point_at_the_down_projection_weight(model_type):
    model = tiny_model(model_type)
    refs = scored_params(model)
    mod = "model.layers.1.mlp.down_proj" if model_type == "llama" else "transformer.h.1.mlp.c_proj"
    w = model.get_submodule(mod).weight
    with torch.no_grad():
        w.view(-1)[:] = torch.arange(w.numel(), dtype=w.dtype)  # each weight holds its own flat index
    ids = cp.super_weight_ids(refs, [{"layer": 1, "row": 7, "col": 2}, {"layer": 1, "row": 7, "col": 2, "module": mod}])
    assert ids.size == 1
    allw = torch.cat([r.param.detach().reshape(-1) for r in refs])
    # nn.Linear stores (out, in): W[7, 2]; GPT-2's Conv1D stores (in, out): weight[2, 7]
    want = w[7, 2] if model_type == "llama" else w[2, 7]
    assert allw[int(ids[0])] == want
    with pytest.raises(ValueError, match=r"candidates \(layer 9, row 0, col 0\) are not among the scored"):
        cp.super_weight_ids(refs, [{"layer": 9, "row": 0, "col": 0}])
    with pytest.raises(ValueError, match=r"\(layer 1, row 0, col 100000\)"):
        cp.super_weight_ids(refs, [{"layer": 1, "row": 0, "col": 100_000}])
    attn_only = [r for r in refs if r.param_type == "attention"]
    with pytest.raises(ValueError, match="score the mlp parameter type"):
        cp.super_weight_ids(attn_only, [{"layer": 1, "row": 7, "col": 2}])
    assert cp.super_weight_ids(refs, []).size == 0


def test_spec_validates_each_setting():
    assert cp.CampaignSpec("quantize", quant_group="128").quant_group == "128"
    for kwargs, msg in [({"campaign": "flip"}, "campaign: unknown 'flip'; allowed: bit_errors, quantize, prune"),
                        ({"campaign": "bit_errors", "bits": "low"}, "bits: unknown 'low'"),
                        ({"campaign": "quantize", "quant_group": "0"}, "quant_group: unknown '0'; allowed: tensor, row"),
                        ({"campaign": "quantize", "quant_group": "col"}, "quant_group: unknown 'col'"),
                        ({"campaign": "prune", "prune_group": "column"}, "prune_group: unknown 'column'")]:
        with pytest.raises(ValueError, match=msg):
            cp.CampaignSpec(**kwargs)
    assert cp.LEVEL_NAMES == {"bit_errors": "error_rate", "quantize": "quant_bits", "prune": "sparsity"}
    assert cp.HARSHER == {"bit_errors": 1, "quantize": -1, "prune": 1}


# --------------------------------------------------------------------------- the draw

def test_draw_rng_is_the_contract_seed_sequence():
    """Reference written from the contract: SeedSequence([seed, trial, lo, hi]) with lo, hi the
    uint32 halves of the rate's IEEE 754 double (here through struct, not numpy's views)."""
    for seed, trial, rate in [(0, 0, 1e-6), (3, 7, 0.25), (1, 2, 0.0), (5, 0, 1.0)]:
        lo, hi = struct.unpack("<II", struct.pack("<d", rate))
        ref = np.random.default_rng(np.random.SeedSequence([seed, trial, lo, hi]))
        assert np.array_equal(cp.draw_rng(seed, trial, rate).integers(0, 2**62, 8), ref.integers(0, 2**62, 8))
    first = cp.draw_rng(0, 0, 1e-3).integers(0, 2**62, 4)
    for other in [(1, 0, 1e-3), (0, 1, 1e-3), (0, 0, 2e-3)]:
        assert not np.array_equal(cp.draw_rng(*other).integers(0, 2**62, 4), first)


def test_draw_over_several_dtypes_is_each_group_in_turn():
    a = torch.nn.Parameter(torch.randn(40))
    b = torch.nn.Parameter(torch.randn(30).half())
    c = torch.nn.Parameter(torch.randn(50))
    lin = torch.nn.Linear(1, 1)
    refs = [ParamRef(n, 0, "norm", p, lin, "weight", None) for n, p in (("a", a), ("b", b), ("c", c))]
    d = cp.draw_errors(refs, 0.02, np.random.default_rng(7))
    rng = np.random.default_rng(7)  # independent: fp32 group (a then c) first, then fp16 (b)
    g32 = be.draw(90, torch.float32, 0.02, rng)
    g16 = be.draw(30, torch.float16, 0.02, rng)
    want = sorted([(int(i) if i < 40 else int(i) + 30, int(bit)) for i, bit in zip(g32.index, g32.bits)]
                  + [(40 + int(i), int(bit)) for i, bit in zip(g16.index, g16.bits)])
    assert list(zip(d.index.tolist(), d.bits.tolist())) == want and len(want) > 0
    assert all(bit < 16 for i, bit in want if 40 <= i < 70)  # fp16 weights get fp16 bits
    before = bits_of(refs)
    with cp.applied(refs, cp.CampaignSpec("bit_errors"), np.empty(0, np.int64), 0.02, draw=d):
        assert flipped_pairs(before, bits_of(refs)) == set(want)
    assert np.array_equal(bits_of(refs), before)


# --------------------------------------------------------------------------- trials

def test_rate_zero_gives_the_unperturbed_perplexity_exactly_in_every_arm():
    model, refs, windows, protected = setup()
    base = perplexity(model, windows).ppl
    rows = cp.run_trial(model, refs, windows, cp.CampaignSpec("bit_errors"), protected, level=0.0, seed=0, trial=0)
    assert [r["arm"] for r in rows] == list(ALL_ARMS)
    for r in rows:
        assert r["ppl"] == base and r["ppl"] / base == 1.0
        assert (r["changed"], r["drawn"], r["protected_hits"], r["status"]) == (0, 0, 0, "finite")


def test_rows_follow_the_contract_and_counts_add_up():
    model, refs, windows, protected = setup(k=64)
    rate = 2e-4
    rows = cp.run_trial(model, refs, windows, cp.CampaignSpec("bit_errors"), protected, level=rate, seed=3, trial=2)
    assert [set(r) for r in rows] == [{"arm", "level", "seed", "trial", "n_protected", "changed", "drawn",
                                       "protected_hits", "ppl", "nll", "status", "seconds"}] * len(ALL_ARMS)
    d = cp.draw_errors(refs, rate, cp.draw_rng(3, 2, rate))  # the same draw, recomputed
    assert len(d) > 0
    for r in rows:
        ids = protected[r["arm"]]
        hits = int(np.isin(d.index, ids).sum())  # independent count of flips on the set
        assert (r["level"], r["seed"], r["trial"], r["n_protected"]) == (rate, 3, 2, ids.size)
        assert (r["drawn"], r["protected_hits"], r["changed"]) == (len(d), hits, len(d) - hits)
        assert r["status"] == finite_status(r["ppl"]) and r["seconds"] > 0
    assert rows[0]["protected_hits"] == 0 and rows[0]["changed"] == rows[0]["drawn"]
    # paired: an arm the draw missed sees exactly arm none's model, so exactly its perplexity
    missed = [r for r in rows if r["protected_hits"] == 0]
    hit = [r for r in rows if r["protected_hits"] > 0]
    assert len(missed) >= 2 and hit and all(r["nll"] == rows[0]["nll"] for r in missed)
    assert protected["top_k"].size == sum(min(64, r.numel) for r in refs)  # K above a tensor's size: all of it


def test_protected_weights_are_never_flipped_and_arms_share_the_draw():
    model, refs, _, protected = setup(k=64)
    spec = cp.CampaignSpec("bit_errors")
    d = cp.draw_errors(refs, 0.01, cp.draw_rng(0, 0, 0.01))
    before = bits_of(refs)
    changed = {}
    for arm, ids in protected.items():
        with cp.applied(refs, spec, ids, 0.01, draw=d) as info:
            now = bits_of(refs)
            assert np.array_equal(now[ids], before[ids])  # protected coordinates hold their bits
            changed[arm] = flipped_pairs(before, now)
            assert info.changed == len(changed[arm]) and info.protected_hits == int(np.isin(d.index, ids).sum())
        assert np.array_equal(bits_of(refs), before)
    for a in protected:
        for b in protected:
            both = set(protected[a].tolist()) | set(protected[b].tolist())
            assert {p for p in changed[a] if p[0] not in both} == {p for p in changed[b] if p[0] not in both}
    assert changed["none"] == set(zip(d.index.tolist(), d.bits.tolist()))
    assert len(changed["none"]) > len(changed["top_k"]) > 0


def test_super_weights_are_protected_when_the_draw_hits_them():
    model, refs, _, protected = setup()
    sids = protected["super_weights"]
    d = be.BitErrors(np.sort(np.r_[sids, sids + 1]), np.full(2 * sids.size, 30, dtype=np.int64))  # planted hits
    before = bits_of(refs)
    with cp.applied(refs, cp.CampaignSpec("bit_errors"), sids, 1e-3, draw=d) as info:
        now = bits_of(refs)
        assert np.array_equal(now[sids], before[sids]) and not np.array_equal(now[sids + 1], before[sids + 1])
        assert (info.changed, info.protected_hits) == (sids.size, sids.size)
    assert np.array_equal(bits_of(refs), before)


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_arm_is_restored_bit_for_bit(dtype):
    model, refs, windows, protected = setup(dtype)
    before = bits_of(refs)
    base = perplexity(model, windows).ppl
    rows = cp.run_trial(model, refs, windows, cp.CampaignSpec("bit_errors"), protected, level=3e-3, seed=0, trial=1)
    assert np.array_equal(bits_of(refs), before)
    assert perplexity(model, windows).ppl == base
    assert all(r["changed"] > 0 for r in rows) and any(r["ppl"] != base for r in rows)


def test_the_real_260k_model_is_restored_bit_for_bit(assets):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(STORIES).eval()
    refs = scored_params(model)
    windows = torch.randint(3, 512, (2, 64), generator=torch.Generator().manual_seed(0))
    protected = cp.protected_sets({}, tensor_offsets(refs), ["none"])
    before, base = bits_of(refs), perplexity(model, windows).ppl
    rows = cp.run_trial(model, refs, windows, cp.CampaignSpec("bit_errors", bits="exponent"), protected,
                        level=1e-5, seed=0, trial=0)
    assert rows[0]["drawn"] > 0 and rows[0]["ppl"] != base
    assert np.array_equal(bits_of(refs), before) and perplexity(model, windows).ppl == base


def test_a_restore_that_does_not_hold_raises_a_leak_error():
    """Something writes to a changed weight while the arm is applied: the restore cannot hold."""
    model, refs, _, protected = setup()
    d = cp.draw_errors(refs, 1e-3, cp.draw_rng(0, 0, 1e-3))
    offsets = tensor_offsets(refs).tolist()
    with pytest.raises(PerturbationLeakError, match="1 of .* flipped weights do not hold their original bits"):
        with cp.applied(refs, cp.CampaignSpec("bit_errors"), protected["top_k"], 1e-3, draw=d):
            gid = int(d.outside(protected["top_k"]).index[0])
            t = int(np.searchsorted(offsets, gid, side="right") - 1)
            refs[t].param.data.view(-1)[gid - offsets[t]] = 1234.5


def test_same_seed_trial_rate_gives_the_same_draw_and_ppl_in_another_process():
    model, refs, windows, protected = setup()
    spec = cp.CampaignSpec("bit_errors", bits="mantissa")  # finite perplexities: compared with ==
    one = cp.run_trial(model, refs, windows, spec, protected, level=1e-3, seed=4, trial=9)
    two = cp.run_trial(model, refs, windows, spec, protected, level=1e-3, seed=4, trial=9)
    key = [(r["arm"], r["drawn"], r["changed"], r["ppl"]) for r in one]
    assert key == [(r["arm"], r["drawn"], r["changed"], r["ppl"]) for r in two]
    code = ("import json, sys; sys.path.insert(0, 'tests'); from test_campaign import setup; "
            "from cwa_core import campaign as cp; m, refs, w, p = setup(); "
            "rows = cp.run_trial(m, refs, w, cp.CampaignSpec('bit_errors', bits='mantissa'), p, level=1e-3, seed=4, trial=9); "
            "d = cp.draw_errors(refs, 1e-3, cp.draw_rng(4, 9, 1e-3), bits='mantissa'); "
            "print(json.dumps([[[r['arm'], r['drawn'], r['changed'], r['ppl']] for r in rows], "
            "d.index.tolist(), d.bits.tolist()]))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    rows, index, bits = json.loads(out.stdout.strip().splitlines()[-1])
    d = cp.draw_errors(refs, 1e-3, cp.draw_rng(4, 9, 1e-3), bits="mantissa")
    assert all(np.isfinite(r[3]) for r in rows)
    assert [tuple(r) for r in rows] == key and index == d.index.tolist() and bits == d.bits.tolist()
    other = cp.draw_errors(refs, 1e-3, cp.draw_rng(4, 10, 1e-3), bits="mantissa")  # another trial: another draw
    assert len(d) > 0 and (len(other) != len(d) or not np.array_equal(other.index, d.index))


# --------------------------------------------------------------------------- degenerate inputs

def test_rate_one_on_a_tiny_tensor_flips_every_unprotected_bit():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.0, float("inf"), float("nan")]))
    refs = [ParamRef("w", 0, "norm", p, torch.nn.Linear(1, 1), "weight", None)]
    before = bits_of(refs)
    d = cp.draw_errors(refs, 1.0, cp.draw_rng(0, 0, 1.0), bits="sign")
    assert d.index.tolist() == [0, 1, 2, 3, 4] and set(d.bits.tolist()) == {31}
    with cp.applied(refs, cp.CampaignSpec("bit_errors", bits="sign"), np.array([1, 4]), 1.0, draw=d) as info:
        got = p.detach().clone()
        assert (info.changed, info.protected_hits) == (3, 2)
    assert got[0] == -1.0 and got[1] == -2.0 and str(got[2].item()) == "-0.0" and got[3] == float("-inf")
    assert int(int_view(got)[4]) == int(int_view(p.detach())[4])  # the protected NaN keeps its payload
    assert np.array_equal(bits_of(refs), before)
    with pytest.raises(ValueError, match=r"error_rate: must be a number in \[0, 1\]"):
        cp.draw_errors(refs, -0.1, cp.draw_rng(0, 0, 0.1))


def test_non_finite_perplexity_is_reported_by_status():
    model, refs, windows, protected = setup()
    before = bits_of(refs)
    rows = cp.run_trial(model, refs, windows, cp.CampaignSpec("bit_errors", bits="exponent"),
                        {"none": protected["none"]}, level=0.5, seed=0, trial=0)
    assert rows[0]["status"] in ("inf", "nan") and rows[0]["status"] == finite_status(rows[0]["ppl"])
    assert np.array_equal(bits_of(refs), before)


def test_an_arm_protecting_a_whole_tensor_leaves_it_untouched():
    model, refs, _, _ = setup()
    offsets = tensor_offsets(refs).tolist()
    whole = np.arange(offsets[1], offsets[1] + refs[1].numel, dtype=np.int64)
    d = cp.draw_errors(refs, 0.05, cp.draw_rng(1, 0, 0.05))
    before = bits_of(refs)
    with cp.applied(refs, cp.CampaignSpec("bit_errors"), whole, 0.05, draw=d) as info:
        now = bits_of(refs)
        assert np.array_equal(now[whole], before[whole]) and info.protected_hits == int(np.isin(d.index, whole).sum()) > 0
    assert np.array_equal(bits_of(refs), before)


def test_full_scores_are_every_weight_in_refs_order():
    model, refs, windows, _ = setup()
    mag = cp.full_scores(model, refs, "magnitude", None)
    assert [tuple(s.shape) for s in mag] == [r.shape for r in refs]
    assert all(s.dtype == torch.float32 and torch.equal(s, r.param.detach().abs()) for s, r in zip(mag, refs))
    got = cp.full_scores(model, refs, "grad_x_weight", windows)  # hooks fire in reverse order
    by_name = {}
    score(model, refs, "grad_x_weight", windows, lambda r, s: by_name.__setitem__(r.name, s.detach().clone()))
    assert all(torch.equal(g, by_name[r.name]) for g, r in zip(got, refs))
    mag[0][0, 0] = -1.0  # a copy: the model is not touched
    assert refs[0].param[0, 0] != -1.0


# --------------------------------------------------------------------------- quantize and prune

def _scores(refs):
    return [r.param.detach().float().abs().cpu() for r in refs]  # magnitude: what Wanda's baseline ranks


@pytest.mark.parametrize("campaign,level", [("quantize", 3), ("prune", 0.5)])
def test_protected_weights_are_never_quantized_or_pruned(campaign, level):
    model, refs, _, protected = setup(k=16)
    spec, scores = cp.CampaignSpec(campaign, quant_group="8"), _scores(refs)
    before = bits_of(refs)
    for arm, ids in protected.items():
        with cp.applied(refs, spec, ids, level, scores=scores) as info:
            now = bits_of(refs)
            assert np.array_equal(now[ids], before[ids]), arm
            changed = np.flatnonzero(now != before)
            assert info.changed == changed.size > now.size // 3 and info.protected_hits == 0
            assert not np.isin(changed, ids).any()
        assert np.array_equal(bits_of(refs), before)


def test_pruning_half_zeroes_exactly_half_of_every_row_outside_the_protected_set():
    model, refs, _, protected = setup(k=8)
    spec = cp.CampaignSpec("prune")
    offsets = tensor_offsets(refs).tolist()
    for arm in ("none", "top_k"):
        with cp.applied(refs, spec, protected[arm], 0.5, scores=_scores(refs)):
            for r, start in zip(refs, offsets):
                w = r.param.detach()
                if not cp.compressed(r):  # norm gains: never pruned (nor quantized), as in Wanda
                    assert (w != 0).all(), r.name
                    continue
                assert ((w == 0).sum(dim=1) == w.shape[1] // 2).all(), (arm, r.name)
                ids = protected[arm][(protected[arm] >= start) & (protected[arm] < start + r.numel)] - start
                assert (w.reshape(-1)[torch.from_numpy(ids)] != 0).all()
    matrices = [r for r in refs if cp.compressed(r)]
    assert len(matrices) < len(refs) and all(r.param_type in ("attention", "mlp") for r in matrices)
    with cp.applied(refs, cp.CampaignSpec("prune", prune_group="global"), protected["none"], 0.25,
                    scores=_scores(refs)) as info:
        assert sum(int((r.param == 0).sum()) for r in refs) == int(sum(r.numel for r in matrices) * 0.25) == info.changed


@pytest.mark.parametrize("campaign,zero", [("prune", 0.0), ("bit_errors", 0.0)])
def test_level_zero_gives_the_unperturbed_perplexity_exactly(campaign, zero):
    model, refs, windows, protected = setup()
    base = perplexity(model, windows)
    rows = cp.run_trial(model, refs, windows, cp.CampaignSpec(campaign), protected, level=zero, seed=0, trial=0,
                        scores=_scores(refs))
    assert [(r["ppl"], r["nll"], r["changed"], r["drawn"]) for r in rows] == [(base.ppl, base.nll, 0, 0)] * len(rows)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("campaign,level", [("quantize", 4), ("prune", 0.5)])
def test_quantize_and_prune_restore_every_arm_bit_for_bit(campaign, level, dtype):
    model, refs, windows, protected = setup(dtype)
    before, base = bits_of(refs), perplexity(model, windows).ppl
    rows = cp.run_trial(model, refs, windows, cp.CampaignSpec(campaign), protected, level=level, seed=0, trial=0,
                        scores=_scores(refs))
    assert np.array_equal(bits_of(refs), before) and perplexity(model, windows).ppl == base
    none = rows[0]
    assert none["arm"] == "none" and all(r["drawn"] == none["changed"] > 0 for r in rows)
    assert all(r["protected_hits"] == 0 and r["ppl"] != base for r in rows)
    assert all(r["level"] == level and type(r["level"]) is type(level) for r in rows)
    # without arm none, drawn is still what arm none would change
    again = cp.run_trial(model, refs, windows, cp.CampaignSpec(campaign), {"top_k": protected["top_k"]},
                         level=level, seed=0, trial=0, scores=_scores(refs))
    assert again[0]["drawn"] == none["changed"] and again[0]["ppl"] == rows[1]["ppl"]
    assert np.array_equal(bits_of(refs), before)


def test_quantize_and_prune_refuse_bad_levels_and_missing_scores():
    model, refs, windows, protected = setup()
    none = {"none": protected["none"]}
    before = bits_of(refs)
    with pytest.raises(ValueError, match=r"quant_bits: must be an integer in 2..8, got 9"):
        cp.run_trial(model, refs, windows, cp.CampaignSpec("quantize"), none, level=9, seed=0, trial=0)
    with pytest.raises(ValueError, match=r"quant_bits: must be an integer in 2..8, got 3.5"):
        cp.run_trial(model, refs, windows, cp.CampaignSpec("quantize"), none, level=3.5, seed=0, trial=0)
    with pytest.raises(ValueError, match=r"sparsity: must be a number in \[0, 1\), got 1.0"):
        cp.run_trial(model, refs, windows, cp.CampaignSpec("prune"), none, level=1.0, seed=0, trial=0,
                     scores=_scores(refs))
    with pytest.raises(ValueError, match="prune: applied\\(\\) needs one score tensor per ref"):
        cp.run_trial(model, refs, windows, cp.CampaignSpec("prune"), none, level=0.5, seed=0, trial=0)
    assert np.array_equal(bits_of(refs), before)
    rows = cp.run_trial(model, refs, windows, cp.CampaignSpec("quantize"), none, level=8.0, seed=0, trial=0)
    assert rows[0]["level"] == 8 and rows[0]["changed"] > 0  # 8 bits read back from JSON as 8.0; not identity


def test_the_model_wide_draw_is_uniform_over_the_tensors():
    """Flips per tensor over many draws against numel x bits (chi-square), fp32 and fp16 refs mixed."""
    from scipy.stats import chisquare

    model, refs, _, _ = setup()
    with torch.no_grad():
        refs[0].param.data = refs[0].param.data.half()  # one fp16 group beside the fp32 one
    per_bit = np.asarray([r.numel * 8 * r.param.element_size() for r in refs], dtype=float)
    offsets = tensor_offsets(refs).numpy()
    counts = np.zeros(len(refs))
    for trial in range(300):
        d = cp.draw_errors(refs, 2e-4, cp.draw_rng(0, trial, 2e-4))
        counts += np.bincount(np.searchsorted(offsets, d.index, side="right") - 1, minlength=len(refs))
    assert counts.sum() == pytest.approx(per_bit.sum() * 2e-4 * 300, rel=0.05)
    assert chisquare(counts, per_bit / per_bit.sum() * counts.sum()).pvalue > 1e-3


def test_an_error_inside_an_arm_still_restores_the_weights():
    model, refs, _, protected = setup()
    before = bits_of(refs)
    for spec, kw in [(cp.CampaignSpec("bit_errors"), {"draw": cp.draw_errors(refs, 1e-2, cp.draw_rng(0, 0, 1e-2))}),
                     (cp.CampaignSpec("quantize"), {}), (cp.CampaignSpec("prune"), {"scores": _scores(refs)})]:
        with pytest.raises(KeyboardInterrupt):
            level = {"bit_errors": 1e-2, "quantize": 3, "prune": 0.5}[spec.campaign]
            with cp.applied(refs, spec, protected["top_k"], level, **kw):
                assert not np.array_equal(bits_of(refs), before)
                raise KeyboardInterrupt
        assert np.array_equal(bits_of(refs), before), spec.campaign


def test_quantize_and_prune_leave_norms_alone_and_bit_errors_do_not():
    """RTN/GPTQ quantize and Wanda prunes the projection matrices; norm gains stay as they are.
    Bit errors are hardware faults: they hit every scored tensor."""
    model, refs, _, protected = setup(k=8)
    others = [i for i, r in enumerate(refs) if not cp.compressed(r)]
    assert others and all(refs[i].param_type == "norm" for i in others)
    before = [refs[i].param.detach().clone() for i in others]
    for spec, level in ((cp.CampaignSpec("quantize", quant_group="tensor"), 2), (cp.CampaignSpec("prune"), 0.75)):
        with cp.applied(refs, spec, protected["none"], level, scores=_scores(refs)) as info:
            assert info.changed > 0
            assert all(torch.equal(refs[i].param.detach(), b) for i, b in zip(others, before))
    draw = cp.draw_errors(refs, 0.05, np.random.default_rng(0))
    with cp.applied(refs, cp.CampaignSpec("bit_errors"), protected["none"], 0.05, draw=draw):
        assert any(not torch.equal(refs[i].param.detach(), b) for i, b in zip(others, before))
