"""Pruning masks: exact counts per row, layer and model, protected weights never pruned, ties and
NaN, and Wanda's and magnitude pruning reproduced on the real 260K model by code written here."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cwa_core import metrics
from cwa_core.architectures import scored_params
from cwa_core.prune import global_masks, prune_mask, pruned_counts
from conftest import STORIES, TINYSTORIES


def _scores(shape, seed: int) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("cols", [10, 11, 1, 2])
def test_half_of_every_row_is_pruned_floor_for_odd_rows(cols):
    s = _scores((7, cols), cols)
    m = prune_mask(s, 0.5)
    assert m.dtype == torch.bool and m.shape == s.shape
    assert m.sum(1).tolist() == [cols // 2] * 7
    kept_min = torch.where(m, float("inf"), s).amin(1)  # every pruned score <= every kept one
    assert (torch.where(m, s, -float("inf")).amax(1) <= kept_min).all()


def test_protected_weights_are_never_pruned_and_the_quota_comes_from_the_rest():
    s = _scores((6, 11), 1)
    prot = _scores((6, 11), 2) < 0.3
    prot[4, :8] = True  # 3 unprotected, quota 5: all 3 pruned
    prot[5] = True  # nothing to prune
    m = prune_mask(s, 0.5, protected=prot)
    assert not (m & prot).any()
    want = [min(5, int((~prot[r]).sum())) for r in range(6)]
    assert m.sum(1).tolist() == want and want[4:] == [3, 0]
    for r in range(6):  # the pruned ones are the lowest unprotected scores of the row
        free = s[r][~prot[r]].sort().values
        assert torch.equal(s[r][m[r]].sort().values, free[: want[r]])
    c = pruned_counts([m], 0.5)
    assert (c.pruned, c.asked, c.shortfall) == (sum(want), 30, 30 - sum(want))
    assert torch.equal(prune_mask(s, 0.5, protected=torch.zeros_like(prot)), prune_mask(s, 0.5))  # empty set


def test_layer_and_global_counts_are_exact():
    a, b = _scores((5, 7), 3), _scores((9,), 4)
    m = prune_mask(a, 0.3, group="layer")
    assert int(m.sum()) == int(35 * 0.3) == 10
    assert torch.equal(a[m].sort().values, a.flatten().sort().values[:10])
    prot = [a > 0.8, None]
    ga, gb = global_masks([a, b], 0.6, protected=prot)
    assert int(ga.sum() + gb.sum()) == int(44 * 0.6) and not (ga & prot[0]).any()
    allowed = torch.cat([a[~prot[0]], b]).sort().values
    assert torch.equal(torch.cat([a[ga], b[gb]]).sort().values, allowed[: int(44 * 0.6)])
    c = pruned_counts([ga, gb], 0.6, group="global", in_dims=[1, None])
    assert (c.pruned, c.asked) == (26, 26)
    assert pruned_counts([ga, gb], 0.6, group="layer", in_dims=[1, None]).asked == int(35 * 0.6) + int(9 * 0.6)
    assert pruned_counts([ga, gb], 0.6, group="row", in_dims=[1, None]).asked == 5 * int(7 * 0.6) + int(9 * 0.6)


def test_ties_go_to_the_lower_index_row_tensor_and_global():
    s = torch.ones(3, 6)
    assert prune_mask(s, 0.5).nonzero()[:, 1].tolist() == [0, 1, 2] * 3
    assert prune_mask(s, 0.5, group="layer").view(-1).nonzero().flatten().tolist() == list(range(9))
    a, b = global_masks([torch.ones(2, 2), torch.ones(4)], 0.75, protected=[None, None])
    assert a.all() and b.tolist() == [True, True, False, False]  # tensor order, then flat index
    a, b = global_masks([torch.ones(2, 2), torch.ones(4)], 0.75, protected=[torch.eye(2, dtype=torch.bool), None])
    assert a.tolist() == [[False, True], [True, False]] and b.tolist() == [True, True, True, True]


def test_nan_scores_rank_above_inf_and_are_pruned_last():
    nan, inf = float("nan"), float("inf")
    s = torch.tensor([[nan, 3.0, inf, 1.0, nan, -inf]])
    assert prune_mask(s, 0.5).tolist() == [[False, True, False, True, False, True]]
    assert prune_mask(s, 0.7).tolist() == [[False, True, True, True, False, True]]  # int(4.2) = 4: inf next
    assert prune_mask(torch.full((1, 4), nan), 0.5).tolist() == [[True, True, False, False]]
    assert torch.sort(s, stable=True).indices.tolist() == [[5, 3, 1, 2, 0, 4]]  # torch's order, which Wanda uses


def test_zero_sparsity_prunes_nothing_and_conv1d_rows_follow_the_input_axis():
    s = _scores((6, 9), 5)
    assert not prune_mask(s, 0.0).any() and not prune_mask(s, 0, group="layer").any()
    assert not global_masks([s], 0.0, protected=[None])[0].any()
    assert torch.equal(prune_mask(s, 0.4, in_dim=0), prune_mask(s.T.contiguous(), 0.4, in_dim=1).T)  # Conv1D (in, out)
    e = _scores((3, 4, 10), 6)  # experts (E, out, in): every expert's output row
    assert prune_mask(e, 0.5, in_dim=None).sum(-1).eq(5).all()
    assert prune_mask(_scores((8,), 7), 0.5, in_dim=None).sum() == 4  # a vector is one row


@pytest.mark.parametrize("sparsity", [1.0, -0.1, float("nan"), True, "0.5", 2])
def test_bad_sparsity(sparsity):
    with pytest.raises(ValueError, match=r"^sparsity: must be a number in \[0, 1\), got"):
        prune_mask(torch.ones(2, 2), sparsity)


def test_bad_group_and_masks():
    with pytest.raises(ValueError, match="^prune_group: prune_mask takes row or layer"):
        prune_mask(torch.ones(2, 2), 0.5, group="global")
    with pytest.raises(ValueError, match="^prune_group: unknown 'rows'"):
        pruned_counts([torch.ones(2, 2, dtype=torch.bool)], 0.5, group="rows")
    with pytest.raises(ValueError, match="^protected: must be a bool mask of shape"):
        prune_mask(torch.ones(2, 3), 0.5, protected=torch.ones(2, 3))
    with pytest.raises(ValueError, match="^protected: one entry"):
        global_masks([torch.ones(2)], 0.5, protected=[])


# --------------------------------------------------------------------------- Wanda and magnitude, real model

def _wanda_scaler_rows(model, modules, calib: torch.Tensor, batch: int) -> dict:
    """scaler_row of every module as locuslab/wanda lib/layerwrapper.py WrappedGPT.add_batch keeps it:
    per forward of ``tmp`` sequences, scaler_row *= nsamples / (nsamples + tmp); nsamples += tmp;
    scaler_row += ||x_j||_2^2 / nsamples over the batch's tokens (x the module's input, float32)."""
    state = {m: [torch.zeros(m.in_features), 0] for m in modules}

    def add_batch(module, args):
        inp = args[0]
        tmp = inp.shape[0]
        inp = inp.reshape(-1, inp.shape[-1]).t().float()  # (in, tokens)
        st = state[module]
        st[0] *= st[1] / (st[1] + tmp)
        st[1] += tmp
        st[0] += torch.norm(inp, p=2, dim=1) ** 2 / st[1]

    hooks = [m.register_forward_pre_hook(add_batch) for m in modules]
    try:
        with torch.no_grad():
            for i in range(0, calib.shape[0], batch):
                model(input_ids=calib[i:i + batch], use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return {m: st[0] for m, st in state.items()}


def _wanda_row_mask(metric: torch.Tensor, sparsity: float) -> torch.Tensor:
    """locuslab/wanda lib/prune.py prune_wanda (unstructured): sort_res = torch.sort(W_metric, dim=-1,
    stable=True); indices = sort_res[1][:, :int(W_metric.shape[1] * sparsity_ratio)]; W_mask.scatter_."""
    mask = torch.zeros_like(metric) == 1
    indices = torch.sort(metric, dim=-1, stable=True)[1][:, : int(metric.shape[1] * sparsity)]
    return mask.scatter_(1, indices, True)


def _magnitude_layer_mask(w: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Layer-wise magnitude pruning (Han et al. 2015 §3): the int(numel * s) smallest |w| of the tensor,
    ties to the lower flat index. (Wanda's own prune_magnitude prunes W_metric <= sorted[int(numel * s)],
    one weight more than the fraction: not followed here.)"""
    flat = torch.zeros(w.numel(), dtype=torch.bool)
    flat[torch.sort(w.abs().flatten(), stable=True).indices[: int(w.numel() * sparsity)]] = True
    return flat.view(w.shape)


@pytest.fixture(scope="module")
def stories(assets):
    tok = AutoTokenizer.from_pretrained(STORIES)
    model = AutoModelForCausalLM.from_pretrained(STORIES).eval()
    ids = torch.tensor(tok(TINYSTORIES.read_text(encoding="utf-8")[:30_000])["input_ids"][: 8 * 128]).view(8, 128)
    ids[:, 0] = tok.bos_token_id
    refs = [r for r in scored_params(model) if r.name.endswith(("q_proj.weight", "down_proj.weight"))]
    return model, ids, refs


def _metric_scores(model, refs, name: str, calib) -> dict:
    out = {}
    metrics.score(model, refs, name, calib, lambda r, s: out.__setitem__(r.name, s.clone()))
    return out


@pytest.mark.parametrize("sparsity", [0.5, 0.3])
def test_wanda_pruning_is_reproduced_on_the_real_model(stories, sparsity):
    model, calib, refs = stories
    scaler = _wanda_scaler_rows(model, [r.module for r in refs], calib, batch=3)  # 3 + 3 + 2: the rescaling runs
    ours = _metric_scores(model, refs, "wanda", calib)
    assert len(refs) == 10
    for r in refs:
        w_metric = torch.abs(r.param.detach()) * torch.sqrt(scaler[r.module].reshape((1, -1)))
        want = _wanda_row_mask(w_metric, sparsity)
        got = prune_mask(ours[r.name], sparsity, group="row", in_dim=r.in_dim)
        assert torch.equal(got, want), r.name
        assert got.sum() == r.shape[0] * int(r.shape[1] * sparsity)


def test_magnitude_pruning_is_reproduced_on_the_real_model(stories):
    model, calib, refs = stories
    ours = _metric_scores(model, refs, "magnitude", None)
    for r in refs:
        w = r.param.detach()
        assert torch.equal(prune_mask(ours[r.name], 0.5, group="layer"), _magnitude_layer_mask(w, 0.5)), r.name
        assert torch.equal(prune_mask(ours[r.name], 0.5, group="row"), _wanda_row_mask(w.abs(), 0.5)), r.name
        order = torch.sort(w.abs().flatten(), stable=True).indices
        p, k = int(w.numel() * 0.01), int(w.numel() * 0.5)
        protected = torch.zeros(w.numel(), dtype=torch.bool)
        protected[order[:p]] = True  # the smallest 1% protected: the next smallest go instead
        want = torch.zeros(w.numel(), dtype=torch.bool)
        want[order[p:p + k]] = True
        got = prune_mask(ours[r.name], 0.5, group="layer", protected=protected.view(w.shape))
        assert torch.equal(got.flatten(), want), r.name
