"""Metrics: each finds a planted outlier; each matches its definition computed naively."""
from __future__ import annotations

import math

import pytest
import torch

from cwa_core import metrics, selection
from cwa_core.architectures import scored_params
from cwa_core.evaluate import logits_of, nll_sum
from tiny_models import tiny_model

V, D = 128, 32


def _calib(v_star: int, n: int = 8, length: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (n, length), generator=g)
    ids[torch.rand(ids.shape, generator=g) < 0.3] = v_star  # a frequent target token
    return ids


def _planted():
    """A tiny Llama with one planted critical weight, ``lm_head[v*, d]``.

    Residual channel d is made constant (embedding column = 1), so after the final norm it
    carries a large, same-signed activation H into every logit; ``lm_head[v*, d]`` is set so
    that v* (30% of the targets) gets probability ~1/2. That weight then has the largest
    magnitude, the largest input activation times |w|, the largest gradient (H * (N p - n)),
    and the largest curvature (H^2 p (1 - p)): a planted outlier for every metric.
    """
    model = tiny_model("llama", tie_word_embeddings=False)
    v_star, d, gamma = 77, 5, 0.7
    with torch.no_grad():
        model.model.embed_tokens.weight[:, d] = 1.0
        model.model.norm.weight[d] = gamma
        model.lm_head.weight[v_star, d] = math.log(V) / (gamma * math.sqrt(D))
    # the outlier competes with every attention and MLP weight and the whole lm_head
    refs = scored_params(model, ["attention", "mlp", "lm_head"])
    return model, refs, v_star, d


@pytest.mark.parametrize("name", metrics.METRICS.names())
def test_every_metric_ranks_the_planted_outlier_first(name):
    model, refs, v_star, d = _planted()
    col = selection.ScoreCollector(refs, 3, ("global",))
    metrics.score(model, refs, name, _calib(v_star), col, metrics.ScoreOptions(hutchinson_probes=64))
    top = col.selection("top_k", "global")
    head = next(i for i, r in enumerate(refs) if r.name == "lm_head.weight")
    assert (top.tensor_ids[0].item(), top.flat_idx[0].item()) == (head, v_star * D + d)
    assert top.scores[0] > 1.25 * top.scores[1], f"{name}: margin too thin {top.scores.tolist()}"


def _mean_loss(model, ids):
    return nll_sum(logits_of(model, ids), ids) / (ids.shape[0] * (ids.shape[1] - 1))


def _collect_all(model, refs, name, calib, **kw):
    out = {}
    metrics.score(model, refs, name, calib, lambda r, s: out.__setitem__(r.name, s.clone()),
                  metrics.ScoreOptions(**kw))
    return out


def test_grad_x_weight_and_grad_squared_match_their_definitions():
    model = tiny_model("llama")
    refs = scored_params(model)
    calib = _calib(50, n=4, length=16)
    params = [r.param for r in refs]
    g_mean = torch.autograd.grad(_mean_loss(model, calib), params)
    per_window = [torch.autograd.grad(_mean_loss(model, calib[i:i + 1]), params) for i in range(4)]
    gxw = _collect_all(model, refs, "grad_x_weight", calib)
    gxw_mb = _collect_all(model, refs, "grad_x_weight", calib, micro_batch=1)  # accumulated
    gsq = _collect_all(model, refs, "grad_squared", calib)
    for i, r in enumerate(refs):
        want = (r.param.detach() * g_mean[i]).abs()
        torch.testing.assert_close(gxw[r.name], want, rtol=1e-4, atol=1e-9)
        torch.testing.assert_close(gxw_mb[r.name], want, rtol=1e-4, atol=1e-9)
        fisher = sum(pw[i] ** 2 for pw in per_window)  # sum of per-window squares ...
        torch.testing.assert_close(gsq[r.name], fisher, rtol=1e-4, atol=1e-12)
    # ... which is not the square of the summed gradient
    i = next(i for i, r in enumerate(refs) if r.name.endswith("mlp.down_proj.weight"))
    assert not torch.allclose(gsq[refs[i].name], (4 * g_mean[i]) ** 2, rtol=1e-2)
    assert all(r.param.grad is None for r in refs), "gradients must be freed"


def test_activation_metrics_match_brute_force_on_a_linear():
    model = tiny_model("llama")
    refs = scored_params(model)
    calib = _calib(50, n=3, length=16)
    ref = next(r for r in refs if r.name == "model.layers.1.mlp.down_proj.weight")
    seen = []
    h = ref.module.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        logits_of(model, calib)
    h.remove()
    x = torch.cat(seen)  # (tokens, in)
    w = ref.param.detach()  # (out, in)
    contrib = (x[:, None, :] * w[None, :, :]).abs().amax(0)  # max_t |x_tk W_jk|
    wanda = w.abs() * x.norm(dim=0)[None, :]
    torch.testing.assert_close(_collect_all(model, refs, "act_contrib", calib)[ref.name], contrib)
    torch.testing.assert_close(_collect_all(model, refs, "wanda", calib)[ref.name], wanda)


def test_hutchinson_agrees_with_the_exact_hessian_diagonal():
    """On a model small enough for the exact diagonal (one HVP per weight)."""
    model = tiny_model("llama", hidden_size=8, intermediate_size=8, num_attention_heads=2,
                       num_key_value_heads=1, vocab_size=V, num_hidden_layers=1)
    refs = [r for r in scored_params(model) if r.name.endswith(("down_proj.weight", "o_proj.weight"))]
    calib = _calib(50, n=2, length=12)
    params = [r.param for r in refs]
    grads = torch.autograd.grad(_mean_loss(model, calib), params, create_graph=True)
    exact = []
    for p, g in zip(params, grads):
        flat_g = g.reshape(-1)
        diag = torch.empty(p.numel())
        for i in range(p.numel()):
            diag[i] = torch.autograd.grad(flat_g[i], p, retain_graph=True)[0].reshape(-1)[i]
        exact.append(diag)
    exact = torch.cat(exact)
    est = torch.cat([d.reshape(-1) for d in metrics.hutchinson_diagonal(
        model, refs, calib, metrics.ScoreOptions(hutchinson_probes=4000, seed=0), probes_per_pass=200)])
    rel = (est - exact).norm() / exact.norm()
    corr = torch.corrcoef(torch.stack([est, exact]))[0, 1]
    assert rel < 0.1, f"relative error {rel:.3f}"
    assert corr > 0.99, f"correlation {corr:.4f}"
    # and the registered metric is |that estimate|
    got = _collect_all(model, refs, "hutchinson_diag", calib, hutchinson_probes=4000, seed=0)
    torch.testing.assert_close(torch.cat([got[r.name].reshape(-1) for r in refs]), est.abs())


def test_scores_are_float32_for_a_bf16_model():
    model = tiny_model("llama", dtype=torch.bfloat16)
    refs = scored_params(model)
    for name in ("magnitude", "grad_x_weight", "act_contrib"):
        out = _collect_all(model, refs, name, _calib(50, n=2, length=16))
        assert {s.dtype for s in out.values()} == {torch.float32}
        assert len(out) == len(refs)
        assert all(torch.isfinite(s).all() for s in out.values())


def test_requires_grad_is_restored_and_unknown_metric_lists_the_valid_ones():
    model = tiny_model("llama")
    before = [p.requires_grad for p in model.parameters()]
    refs = scored_params(model, ["mlp"])
    _collect_all(model, refs, "grad_x_weight", _calib(50, n=2, length=8))
    assert [p.requires_grad for p in model.parameters()] == before
    with pytest.raises(KeyError, match="allowed: magnitude, grad_x_weight"):
        metrics.METRICS.get("fisher")
