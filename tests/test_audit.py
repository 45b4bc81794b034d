"""What an audit of the science found silently wrong, each pinned by a test that failed before.

Mixtral's router and experts, GPT-2's position embedding and every bias under the activation
metrics; Gemma's (1 + w) norm gains; coordinates in top_weights.csv; sign_flip's scale; the bit
bit_flip records; the pooled standard deviation; Hutchinson probes per device; random-K memory.
"""
from __future__ import annotations

import csv
import math
import tracemalloc
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cwa_core import metrics, perturb
from cwa_core.architectures import decoder_layers, scored_params
from cwa_core.config import ConfigError, ExperimentConfig
from cwa_core.evaluate import Perplexity, logits_of, nll_sum
from cwa_core.experiment import ExperimentResult, evaluate_selection, score_seed, tensor_table
from cwa_core.outputs import CSV_COLUMNS, _aggregate, top_weights_rows, write_csv
from cwa_core.perturb import PerturbSpec, int_view, perturbed
from cwa_core.selection import Selection, random_selection, sample_without_replacement, tensor_stats
from tiny_models import tiny_model

V = 128


def _calib(n: int = 3, length: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, V, (n, length), generator=torch.Generator().manual_seed(seed))


def _scores(model, refs, name, calib, **kw) -> dict[str, torch.Tensor]:
    out = {}
    metrics.score(model, refs, name, calib, lambda r, s: out.__setitem__(r.name, s.clone()),
                  metrics.ScoreOptions(**kw))
    return out


def _ref(refs, suffix):
    return next(r for r in refs if r.name.endswith(suffix))


# --------------------------------------------------------------------------- 1. mixture of experts

def _routed(model, calib):
    """Per block: the experts module's inputs (hidden (T, H), top-k index and weights) and output."""
    seen, handles = {}, []
    for i, block in enumerate(decoder_layers(model)):
        handles.append(block.mlp.experts.register_forward_hook(
            lambda m, a, out, i=i: seen.__setitem__(i, (a[0].detach(), a[1], a[2].detach(), out.detach()))))
    with torch.no_grad():
        logits_of(model, calib)
    for h in handles:
        h.remove()
    return seen


@pytest.mark.parametrize("name", ["wanda", "act_contrib"])
def test_mixtral_router_and_experts_are_scored_with_the_tokens_each_received(name):
    model = tiny_model("mixtral")
    refs = scored_params(model, ["mlp"])
    calib = _calib(n=1)  # one forward, so the captured routing is what the metric saw
    got = _scores(model, refs, name, calib)
    stat = (lambda x: x.abs().amax(0)) if name == "act_contrib" else (lambda x: x.norm(dim=0))
    for layer, (x, idx, wts, out) in _routed(model, calib).items():
        ex = decoder_layers(model)[layer].mlp.experts
        gu, dn = ex.gate_up_proj.detach(), ex.down_proj.detach()  # (E, 2I, H), (E, H, I)
        want_gu, want_dn = torch.zeros_like(gu), torch.zeros_like(dn)
        rebuilt = torch.zeros_like(out)
        routed = 0
        for e in range(gu.shape[0]):
            tok = (idx == e).any(-1)
            routed += int(tok.sum())
            if not tok.any():
                continue
            gate, up = F.linear(x[tok], gu[e]).chunk(2, dim=-1)
            h = F.silu(gate) * up  # (T_e, I): what down_proj[e] multiplies
            rebuilt[tok] += F.linear(h, dn[e]) * (wts * (idx == e)).sum(-1)[tok, None]
            want_gu[e] = gu[e].abs() * stat(x[tok])[None, :]
            want_dn[e] = dn[e].abs() * stat(h)[None, :]
        torch.testing.assert_close(rebuilt, out)  # those really are the experts' inputs
        assert routed == 2 * x.shape[0]  # top-2 routing: every token reached two experts
        prefix = f"model.layers.{layer}.mlp."
        torch.testing.assert_close(got[prefix + "experts.gate_up_proj"], want_gu)
        torch.testing.assert_close(got[prefix + "experts.down_proj"], want_dn)
        router = decoder_layers(model)[layer].mlp.gate.weight.detach()  # (E, H)
        torch.testing.assert_close(got[prefix + "gate.weight"], router.abs() * stat(x)[None, :])
        assert not torch.allclose(got[prefix + "experts.down_proj"], dn.abs())  # not magnitude


def test_a_metric_that_cannot_score_a_tensor_says_so_before_any_work():
    model = tiny_model("mixtral")
    for block in decoder_layers(model):
        block.mlp.experts.is_transposed = True  # (E, in, out): a layout the hooks do not know
    refs = scored_params(model, ["attention", "mlp", "norm"])
    forwards = []
    handle = model.register_forward_pre_hook(lambda m, a: forwards.append(1))
    try:
        with pytest.raises(metrics.UnsupportedTensorError) as exc:
            _scores(model, refs, "wanda", _calib())
        assert forwards == []
        msg = str(exc.value)
        assert "\n" not in msg
        assert msg.startswith("wanda cannot score model.layers.0.mlp.experts.gate_up_proj of mixtral: ")
        assert msg.endswith("; use magnitude, grad_x_weight, grad_squared or hutchinson_diag, "
                            "or --param-types attention,norm")
        metrics.check_supported("magnitude", refs)  # every tensor has a magnitude
        with pytest.raises(metrics.UnsupportedTensorError, match="act_contrib cannot score"):
            metrics.check_supported("act_contrib", refs, "mixtral")
    finally:
        handle.remove()


# --------------------------------------------------------------------------- 2, 3. positions, biases

@pytest.mark.parametrize("name", ["wanda", "act_contrib"])
def test_gpt2_position_embedding_rows_are_positions_and_token_rows_are_tokens(name):
    model = tiny_model("gpt2")
    refs = scored_params(model, ["embedding"])
    n, length = 3, 16
    calib = torch.full((n, length), 100)  # token 100 at every position: counts 48 by id, 3 by position
    calib[:, 0] = 7
    got = _scores(model, refs, name, calib)
    wpe, wte = model.transformer.wpe.weight.detach(), model.transformer.wte.weight.detach()
    pos = torch.zeros(wpe.shape[0])
    pos[:length] = n
    tok = torch.bincount(calib.reshape(-1), minlength=wte.shape[0]).float()
    f = (lambda c: (c > 0).float()) if name == "act_contrib" else torch.sqrt
    torch.testing.assert_close(got["transformer.wpe.weight"], wpe.abs() * f(pos)[:, None])
    torch.testing.assert_close(got["transformer.wte.weight"], wte.abs() * f(tok)[:, None])
    assert got["transformer.wpe.weight"][length:].abs().sum() == 0  # positions never used
    assert got["transformer.wpe.weight"][1].abs().sum() > 0  # position 1 used, token id 1 never


@pytest.mark.parametrize("model_type,bias", [
    ("qwen2", "layers.0.self_attn.q_proj.bias"),  # nn.Linear
    ("gpt2", "h.1.mlp.c_fc.bias"),  # Conv1D
    ("gpt2", "h.0.ln_1.bias"),  # LayerNorm
    ("gpt_neox", "layers.1.attention.dense.bias"),
])
def test_a_bias_is_scored_as_a_weight_whose_input_is_one_on_every_token(model_type, bias):
    model = tiny_model(model_type)
    refs = scored_params(model)
    calib = _calib(n=3, length=16)
    with torch.no_grad():  # biases start at zero: give them values that show a scale
        _ref(refs, bias).param.normal_(generator=torch.Generator().manual_seed(1))
    b = _ref(refs, bias).param.detach().abs()
    assert b.min() > 0
    wanda = _scores(model, refs, "wanda", calib)
    act = _scores(model, refs, "act_contrib", calib)
    tokens = calib.numel()  # every module of the stack sees every token
    torch.testing.assert_close(wanda[_ref(refs, bias).name], b * math.sqrt(tokens))
    torch.testing.assert_close(act[_ref(refs, bias).name], b)  # max over tokens of |1 * b|


# --------------------------------------------------------------------------- 4. Gemma's (1 + w)

def _gemma_norm():
    model = tiny_model("gemma")
    refs = scored_params(model)
    r = _ref(refs, "layers.0.input_layernorm.weight")
    with torch.no_grad():
        r.param.copy_(torch.linspace(-0.5, 0.5, r.numel))  # gains 0.5 .. 1.5
    return model, refs, r


def test_gemma_norm_offset_is_recorded_in_the_table():
    _, refs, r = _gemma_norm()
    assert r.offset == 1.0
    assert {x.offset for x in refs if x.param_type == "norm"} == {1.0}
    assert {x.offset for x in refs if x.param_type != "norm"} == {0.0}
    llama = scored_params(tiny_model("llama"))
    assert {x.offset for x in llama} == {0.0}


@pytest.mark.parametrize("method,scale,gain_factor", [
    ("zero", None, 0.0), ("sign_flip", None, -1.0), ("sign_flip", 2.0, -2.0), ("scale", 3.0, 3.0)])
def test_gemma_norm_perturbations_act_on_the_effective_gain(method, scale, gain_factor):
    model, refs, r = _gemma_norm()
    tid = next(i for i, x in enumerate(refs) if x is r)
    idx = torch.arange(r.numel)
    sel = Selection("top_k", "global", r.numel, torch.full_like(idx, tid), idx, torch.zeros(r.numel))
    x = torch.randn(2, 5, r.numel, generator=torch.Generator().manual_seed(0))
    before_bits = int_view(r.param.detach().reshape(-1)).clone()
    out = r.module(x)
    with perturbed(refs, sel, PerturbSpec(method, scale)):
        gain = 1.0 + r.param.detach()
        torch.testing.assert_close(gain, gain_factor * (1.0 + torch.linspace(-0.5, 0.5, r.numel)))
        torch.testing.assert_close(r.module(x), gain_factor * out)  # the norm's output, scaled
    assert torch.equal(int_view(r.param.detach().reshape(-1)), before_bits)  # restored bit for bit


def test_gemma_gauss_noise_is_relative_to_the_gain_and_bit_flip_to_the_stored_bits():
    model, refs, r = _gemma_norm()
    tid = next(i for i, x in enumerate(refs) if x is r)
    idx = torch.arange(r.numel)
    sel = Selection("top_k", "global", r.numel, torch.full_like(idx, tid), idx, torch.zeros(r.numel))
    w = r.param.detach().clone()
    gen = torch.Generator().manual_seed(5 * 1_000_003 + tid)  # the documented per-tensor seed
    noise = torch.randn(r.numel, generator=gen)
    with perturbed(refs, sel, PerturbSpec("gauss_noise", 0.5, seed=5)):
        torch.testing.assert_close(r.param.detach() - w, noise * 0.5 * (1.0 + w).abs())
    with perturbed(refs, sel, PerturbSpec("bit_flip")):
        flipped = int_view(r.param.detach().reshape(-1)) ^ int_view(w.reshape(-1))
        assert (flipped == 1 << 30).all()  # the stored value's exponent MSB: a hardware fault
    assert torch.equal(r.param.detach(), w)


def test_gemma_magnitude_and_grad_x_weight_score_the_gain():
    model, refs, r = _gemma_norm()
    calib = _calib(n=2, length=12)
    mag = _scores(model, refs, "magnitude", calib)[r.name]
    torch.testing.assert_close(mag, (1.0 + r.param.detach()).abs())
    params = [x.param for x in refs]
    loss = nll_sum(logits_of(model, calib), calib) / (calib.shape[0] * (calib.shape[1] - 1))
    g = torch.autograd.grad(loss, params)[refs.index(r)]  # dL/dgain = dL/dw
    gxw = _scores(model, refs, "grad_x_weight", calib)[r.name]
    torch.testing.assert_close(gxw, ((1.0 + r.param.detach()) * g).abs(), rtol=1e-4, atol=1e-9)
    assert not torch.allclose(gxw, (r.param.detach() * g).abs())


@pytest.mark.parametrize("model_type", ["gemma", "mixtral", "gpt2"])
def test_no_metric_changes_a_single_bit_of_the_model(model_type):
    model = tiny_model(model_type)
    refs = scored_params(model, ["attention", "mlp", "norm", "embedding", "lm_head"])
    before = {n: int_view(p.detach().reshape(-1)).clone() for n, p in model.named_parameters()}
    for name in metrics.METRICS.names():
        _scores(model, refs, name, _calib(n=2, length=8), hutchinson_probes=2)
        changed = [n for n, p in model.named_parameters() if not torch.equal(int_view(p.detach().reshape(-1)), before[n])]
        assert changed == [], (name, changed)


# --------------------------------------------------------------------------- 5. coordinates

def _plant_and_rank(model, param_types, plants):
    """Plant huge magnitudes at stored positions; top-1 per tensor by magnitude; csv rows by name."""
    refs = scored_params(model, param_types)
    with torch.no_grad():
        for name, pos in plants.items():
            _ref(refs, name).param[pos] = 1000.0
    ss = score_seed(model, refs, None, metric="magnitude", seed=0, k=1, modes=("per_layer",),
                    max_samples=1, opts=metrics.ScoreOptions(), stability_sample=10)
    table = tensor_table(refs)
    rows = top_weights_rows([ss], table, 1, "per_layer")
    return refs, table, {row[0]: dict(zip(CSV_COLUMNS, row)) for row in rows}


def test_top_weights_coordinates_follow_the_linear_convention(tmp_path):
    model = tiny_model("gpt2")
    refs, table, rows = _plant_and_rank(model, ["mlp", "norm"], {
        "h.0.mlp.c_fc.weight": (3, 40),  # Conv1D stores (in 32, out 64)
        "h.0.ln_1.weight": (7,)})
    layouts = {t["name"]: t["layout"] for t in table}
    assert layouts["transformer.h.0.mlp.c_fc.weight"] == "conv1d"
    assert layouts["transformer.h.0.ln_1.weight"] == layouts["transformer.h.0.mlp.c_fc.bias"] == "vector"
    c = rows["transformer.h.0.mlp.c_fc.weight"]
    assert (c["expert"], c["row"], c["col"]) == (None, 40, 3)  # row = output channel, col = input
    # the reported output channel is the one the weight writes to
    fc = model.transformer.h[0].mlp.c_fc
    x = torch.zeros(1, 1, 32)
    x[..., 3] = 1.0
    assert int(torch.argmax(fc(x) - fc.bias)) == 40
    n = rows["transformer.h.0.ln_1.weight"]
    assert (n["expert"], n["row"], n["col"]) == (None, 7, None)
    write_csv(tmp_path / "t.csv", CSV_COLUMNS, list(map(tuple, (r.values() for r in rows.values()))))
    got = list(csv.reader((tmp_path / "t.csv").open()))
    assert got[0] == ["parameter", "layer", "param_type", "expert", "row", "col", "score", "rank", "seed"]
    ln = next(r for r in got if r[0] == "transformer.h.0.ln_1.weight")
    assert (ln[3], ln[4], ln[5]) == ("", "7", "")


def test_expert_coordinates_and_linear_coordinates():
    model = tiny_model("mixtral")
    refs, table, rows = _plant_and_rank(model, ["mlp", "attention"], {
        "layers.1.mlp.experts.gate_up_proj": (2, 70, 5),  # (E, 2I, H): expert 2, output 70, input 5
        "layers.1.mlp.experts.down_proj": (3, 9, 60),  # (E, H, I)
        "layers.1.mlp.gate.weight": (1, 30),  # router (E, H), used as F.linear
        "layers.0.self_attn.q_proj.weight": (17, 4)})
    layouts = {t["name"]: t["layout"] for t in table}
    assert layouts["model.layers.1.mlp.experts.down_proj"] == "experts"
    assert layouts["model.layers.1.mlp.gate.weight"] == layouts["model.layers.0.self_attn.q_proj.weight"] == "linear"
    want = {"model.layers.1.mlp.experts.gate_up_proj": (2, 70, 5), "model.layers.1.mlp.experts.down_proj": (3, 9, 60),
            "model.layers.1.mlp.gate.weight": (None, 1, 30), "model.layers.0.self_attn.q_proj.weight": (None, 17, 4)}
    for name, coords in want.items():
        r = rows[name]
        assert (r["expert"], r["row"], r["col"]) == coords, name
        assert r["score"] == 1000.0 and r["rank"] == 1 and r["seed"] == 0


# --------------------------------------------------------------------------- 6, 7. scale and bit

def test_sign_flip_takes_a_scale_and_every_scale_is_documented():
    ok = ExperimentConfig(model="m", metric="magnitude", topk=1, perturb="sign_flip", perturb_scale=1.0)
    assert ok.perturb_scale == 1.0
    with pytest.raises(ConfigError, match="only sign_flip, scale, gauss_noise take a scale"):
        ExperimentConfig(model="m", metric="magnitude", topk=1, perturb="zero", perturb_scale=1.0)
    assert PerturbSpec("sign_flip").resolved().scale == 1.0
    for name in perturb.PERTURBATIONS.names():
        p = perturb.PERTURBATIONS.get(name)
        assert ("takes no scale" in p.description) != p.takes_scale, name  # each says what its scale is
        assert not p.takes_scale or f"default {p.default_scale:g}" in p.description, name
    model = tiny_model("llama")
    refs = scored_params(model)
    sel = random_selection(refs, 10, "global", seed=0)
    vals = lambda: torch.stack([refs[t].param.detach().reshape(-1)[i] for t, i in
                                zip(sel.tensor_ids.tolist(), sel.flat_idx.tolist())])
    w = vals()
    for scale, want in ((None, -w), (1.0, -w), (2.5, -2.5 * w)):
        with perturbed(refs, sel, PerturbSpec("sign_flip", scale)):
            torch.testing.assert_close(vals(), want)


def test_check_bit_resolves_the_default_and_refuses_bits_outside_the_dtype():
    assert perturb.check_bit(None, torch.float32) == 30
    assert perturb.check_bit(None, torch.float16) == perturb.check_bit(None, torch.bfloat16) == 14
    assert perturb.check_bit(31, torch.float32) == 31 and perturb.check_bit(0, torch.bfloat16) == 0
    for bit, dtype, allowed in ((16, torch.bfloat16, "0..15"), (32, torch.float32, "0..31"), (-1, torch.float16, "0..15")):
        with pytest.raises(ValueError) as exc:
            perturb.check_bit(bit, dtype)
        assert allowed in str(exc.value) and "\n" not in str(exc.value)
    base = dict(model="m", metric="magnitude", topk=1, perturb="bit_flip")
    for dtype, good, bad in (("bf16", 15, 16), ("fp16", 15, 16), ("fp32", 31, 32)):
        assert ExperimentConfig(**base, dtype=dtype, perturb_bit=good).perturb_bit == good
        with pytest.raises(ConfigError, match=f"0..{good} for --dtype {dtype}"):
            ExperimentConfig(**base, dtype=dtype, perturb_bit=bad)
    assert ExperimentConfig(**base, dtype="auto", perturb_bit=40).perturb_bit == 40  # resolved later


@pytest.mark.parametrize("dtype,bit", [(torch.float32, 30), (torch.bfloat16, 14)], ids=str)
def test_bit_flip_records_the_bit_actually_flipped(dtype, bit):
    model = tiny_model("llama", dtype=dtype)
    refs = scored_params(model)
    sel = random_selection(refs, 5, "global", seed=0)
    base = Perplexity(10.0, math.log(10.0), 30, 2, 16)
    row = evaluate_selection(model, refs, sel, PerturbSpec("bit_flip"), _calib(2, 16), base, seed=0)
    assert row["bit"] == bit
    plain = evaluate_selection(model, refs, sel, PerturbSpec("sign_flip"), _calib(2, 16), base, seed=0)
    assert plain["bit"] is None
    cfg = ExperimentConfig(model="m", metric="magnitude", topk=5, mode="global", perturb="bit_flip")
    res = ExperimentResult(cfg, base, [row], [], None, {}, tensor_table(refs))
    assert res.perturbation_report()["perturbation"] == {"method": "bit_flip", "scale": None, "bit": bit}


# --------------------------------------------------------------------------- 8. pooled std

def test_pooled_std_is_the_exact_sample_std_of_the_pooled_scores():
    rng = np.random.default_rng(0)
    raw = [rng.normal(5.0, 2.0, 2), rng.normal(-1.0, 0.1, 3), rng.normal(0.0, 10.0, 500), np.array([42.0])]
    model = tiny_model("llama")
    refs = scored_params(model)[:4]
    group = [(tensor_stats(r, torch.from_numpy(a).float()), torch.from_numpy(a).float()) for r, a in zip(refs, raw)]
    pooled = np.concatenate([a.astype(np.float32).astype(np.float64) for a in raw])
    agg = _aggregate(group)
    assert agg["count"] == pooled.size
    assert agg["mean"] == pytest.approx(pooled.mean(), rel=1e-12)
    assert agg["std"] == pytest.approx(np.std(pooled, ddof=1), rel=1e-9)
    same = [(tensor_stats(r, torch.full((4,), 3.0)), torch.full((4,), 3.0)) for r in refs[:2]]
    assert _aggregate(same)["std"] == 0.0  # equal values
    one = [(tensor_stats(refs[0], torch.tensor([2.0])), torch.tensor([2.0]))]
    assert _aggregate(one)["std"] == 0.0  # a single weight: no spread, as per tensor


# --------------------------------------------------------------------------- 10. Hutchinson probes

def test_hutchinson_probes_are_drawn_on_each_tensors_device(monkeypatch):
    model = tiny_model("llama")
    params = [r.param for r in scored_params(model)[:5]]
    for seed in (0, 7 * 1_000_003 + 3):  # the same draws as before on one device
        gen = torch.Generator().manual_seed(seed)
        want = [(torch.randint(0, 2, p.shape, generator=gen) * 2 - 1).to(p.dtype) for p in params]
        got = metrics.rademacher_probe(params, seed)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
    gens, draws = [], []
    monkeypatch.setattr(metrics, "_generator", lambda device, seed: gens.append((device, seed)) or
                        torch.Generator().manual_seed(seed))
    monkeypatch.setattr(metrics, "_rademacher", lambda shape, dtype, device, gen: draws.append(device) or
                        torch.ones(shape, dtype=dtype))
    dev = [torch.device("cuda", 0), torch.device("cuda", 1), torch.device("cuda", 0)]  # a device map
    fake = [SimpleNamespace(shape=(2, 3), dtype=torch.bfloat16, device=d) for d in dev]
    assert [z.shape for z in metrics.rademacher_probe(fake, 11)] == [(2, 3)] * 3
    assert draws == dev
    assert gens == [(dev[0], 11), (dev[1], 11)]  # one generator per device, the same seed


def test_hutchinson_diagonal_draws_every_probe_through_rademacher_probe(monkeypatch):
    model = tiny_model("llama")
    refs = scored_params(model, ["mlp"])
    calls = []
    real = metrics.rademacher_probe
    monkeypatch.setattr(metrics, "rademacher_probe", lambda ps, seed: calls.append(seed) or real(ps, seed))
    metrics.hutchinson_diagonal(model, refs, _calib(1, 8), metrics.ScoreOptions(hutchinson_probes=3, seed=2),
                                probes_per_pass=2)
    assert calls == [2 * 1_000_003 + i for i in range(3)]


# --------------------------------------------------------------------------- 11. random-K memory

@pytest.mark.parametrize("n", [1 << 16, 1 << 20])  # a whole permutation; candidates drawn in blocks
def test_per_layer_random_k_keeps_no_permutation_alive(n):
    tensors = 16  # 16 tensors of n weights: 8n bytes of int64 permutation each
    draw = sample_without_replacement(n, 5, np.random.default_rng(0))
    assert draw.base is None or draw.base.nbytes <= draw.nbytes  # owns its 5 entries only
    refs = [SimpleNamespace(numel=n) for _ in range(tensors)]
    tracemalloc.start()
    try:
        sel = random_selection(refs, 5, "per_layer", seed=0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(sel) == 5 * tensors and sel.flat_idx.max() < n
    assert peak < 2.5 * 8 * n, f"peak {peak / 2**20:.0f} MiB"  # one permutation at a time, not 16
    small = random_selection(refs[:3], 2, "per_layer", seed=0)  # draws still independent of K
    assert torch.equal(small.flat_idx, random_selection(refs[:3], 5, "per_layer", seed=0).prefix(2).flat_idx)
