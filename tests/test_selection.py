"""Selection: exact global top-K by per-tensor top-K and merge; controls; prefixes."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cwa_core import metrics
from cwa_core.architectures import scored_params
from cwa_core.selection import ScoreCollector, random_selection, sample_without_replacement, tensor_offsets
from tiny_models import tiny_model


def _scored(k, modes=("per_layer", "global"), metric="magnitude", gathers=None):
    model = tiny_model("llama")
    refs = scored_params(model)
    col = ScoreCollector(refs, k, modes, gathers or {})
    calib = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    full = {}

    def sink(r, s):
        full[r.name] = s.clone()
        col(r, s)

    metrics.score(model, refs, metric, calib, sink)
    return refs, col, full


@pytest.mark.parametrize("metric", ["magnitude", "grad_x_weight"])
@pytest.mark.parametrize("k", [1, 37, 1000, 20000])
def test_global_topk_equals_brute_force(metric, k):
    refs, col, full = _scored(k, metric=metric)
    everything = torch.cat([full[r.name].reshape(-1) for r in refs])  # brute force, test only
    k_eff = min(k, everything.numel())
    offsets = tensor_offsets(refs)
    for kind, largest in (("top_k", True), ("bottom_k", False)):
        sel = col.selection(kind, "global")
        want_v, want_i = torch.topk(everything, k_eff, largest=largest)
        assert len(sel) == k_eff
        torch.testing.assert_close(sel.scores, want_v)  # same values, same order
        got_ids = sel.global_ids(offsets)
        torch.testing.assert_close(everything[got_ids], want_v)
        # exactly the brute-force answer, ties broken by lowest global id (norm weights of a
        # fresh model are all 1.0, so ties do occur here)
        e = everything.numpy()
        order = np.lexsort((np.arange(e.size), -e if largest else e))[:k_eff]
        assert got_ids.tolist() == order.tolist()


def test_per_layer_topk_is_each_tensors_topk_and_ranks_restart():
    refs, col, full = _scored(5)
    sel = col.selection("top_k", "per_layer")
    ranks = sel.ranks()
    for t, r in enumerate(refs):
        mask = sel.tensor_ids == t
        want = torch.topk(full[r.name].reshape(-1), min(5, r.numel))
        torch.testing.assert_close(sel.scores[mask], want.values)
        assert ranks[mask].tolist() == list(range(1, min(5, r.numel) + 1))
    # the global selection never contains more than the per-tensor ones allow
    assert len(col.selection("top_k", "global")) == 5


def test_prefix_of_largest_k_equals_smaller_k():
    refs, big, _ = _scored(50)
    _, small, _ = _scored(7)
    for mode in ("per_layer", "global"):
        for kind in ("top_k", "bottom_k"):
            a, b = big.selection(kind, mode).prefix(7), small.selection(kind, mode)
            torch.testing.assert_close(a.scores, b.scores)
            assert torch.equal(a.tensor_ids, b.tensor_ids)
    for mode in ("per_layer", "global"):
        r50, r7 = random_selection(refs, 50, mode, seed=3), random_selection(refs, 7, mode, seed=3)
        assert torch.equal(r50.prefix(7).flat_idx, r7.flat_idx) and torch.equal(r50.prefix(7).tensor_ids, r7.tensor_ids)
    rng = lambda: np.random.default_rng(5)
    big = sample_without_replacement(10**10, 9000, rng())  # the sparse path, several blocks
    assert np.array_equal(big[:100], sample_without_replacement(10**10, 100, rng()))


def test_random_k_is_distinct_seeded_and_covers_tensors_in_proportion():
    model = tiny_model("llama")
    refs = scored_params(model)
    offsets = tensor_offsets(refs)
    total = sum(r.numel for r in refs)
    a = random_selection(refs, 3000, "global", seed=1)
    b = random_selection(refs, 3000, "global", seed=1)
    c = random_selection(refs, 3000, "global", seed=2)
    ids = a.global_ids(offsets)
    assert torch.equal(ids, b.global_ids(offsets)) and not torch.equal(ids, c.global_ids(offsets))
    assert ids.unique().numel() == 3000 and ids.max() < total and ids.min() >= 0
    assert all((a.flat_idx[a.tensor_ids == t] < r.numel).all() for t, r in enumerate(refs))
    # mlp tensors hold a share of the weights; the draw should hold about the same share
    mlp = torch.tensor([r.param_type == "mlp" for r in refs])
    share = sum(r.numel for r in refs if r.param_type == "mlp") / total
    got = mlp[a.tensor_ids].float().mean().item()
    assert abs(got - share) < 0.04, (got, share)
    per = random_selection(refs, 20, "per_layer", seed=0)
    counts = torch.bincount(per.tensor_ids, minlength=len(refs))
    assert counts.tolist() == [min(20, r.numel) for r in refs]


def test_sampling_without_replacement_does_not_enumerate():
    rng = np.random.default_rng(0)
    n = 8_000_000_000  # an 8B model's weight count: a permutation would need 64 GB
    draw = sample_without_replacement(n, 1000, rng)
    assert len(np.unique(draw)) == 1000 and draw.max() < n
    # uniformity on a small range: every item about equally often over many draws
    hits = np.zeros(50)
    for _ in range(2000):
        hits[sample_without_replacement(50, 5, rng)] += 1
    assert hits.min() > 140 and hits.max() < 260  # expected 200 each


def test_random_k_scores_are_gathered_during_scoring():
    model = tiny_model("llama")
    refs = scored_params(model)
    rnd = random_selection(refs, 100, "global", seed=0)
    col = ScoreCollector(refs, 10, ("global",), {"random_k/global": rnd})
    full = {}
    metrics.score(model, refs, "magnitude", None, lambda r, s: (full.__setitem__(r.name, s), col(r, s)))
    got = col.selection("random_k", "global")
    want = torch.stack([full[refs[t].name].reshape(-1)[i] for t, i in zip(got.tensor_ids.tolist(), got.flat_idx.tolist())])
    torch.testing.assert_close(got.scores, want)


def test_missing_tensor_is_an_error():
    model = tiny_model("llama")
    refs = scored_params(model)
    col = ScoreCollector(refs, 3, ("global",))
    col(refs[0], refs[0].param.detach().abs())
    with pytest.raises(RuntimeError, match="never scored"):
        col.selection("top_k", "global")
