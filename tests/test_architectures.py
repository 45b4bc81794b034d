"""cwa_core.architectures on a tiny model of every supported family and on the real stories260k."""
from __future__ import annotations

import math
from collections import Counter
from functools import lru_cache

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from cwa_core.architectures import (
    ARCHITECTURES,
    LAYOUTS,
    PARAM_TYPES,
    UnsupportedArchitectureError,
    arch_spec,
    coordinates,
    decoder_layers,
    down_projections,
    flat_index,
    matrix_shape,
    scored_params,
    weight_row,
)
from conftest import STORIES
from tiny_models import HIDDEN, N_LAYERS, TINY_TYPES, tiny_model

ALL_TYPES = ["attention", "mlp", "norm", "embedding", "lm_head"]

# Per family: parameter names inside one block by type (relative to the block), the final norm's
# parameter names, the embedding modules, and whether lm_head is untied in the tiny config.
_LLAMA_ATTN = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
               "self_attn.o_proj.weight")
_LLAMA_MLP = ("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")
_LLAMA_NORM = ("input_layernorm.weight", "post_attention_layernorm.weight")
_LN = ("weight", "bias")

EXPECTED: dict[str, dict] = {
    "llama": dict(attention=_LLAMA_ATTN, mlp=_LLAMA_MLP, norm=_LLAMA_NORM,
                  final=("model.norm.weight",), emb=("model.embed_tokens.weight",), untied=True),
    "mistral": dict(attention=_LLAMA_ATTN, mlp=_LLAMA_MLP, norm=_LLAMA_NORM,
                    final=("model.norm.weight",), emb=("model.embed_tokens.weight",), untied=True),
    "mixtral": dict(attention=_LLAMA_ATTN,
                    mlp=("mlp.gate.weight", "mlp.experts.gate_up_proj", "mlp.experts.down_proj"),
                    norm=_LLAMA_NORM, final=("model.norm.weight",),
                    emb=("model.embed_tokens.weight",), untied=True),
    "qwen2": dict(attention=("self_attn.q_proj.weight", "self_attn.q_proj.bias",
                             "self_attn.k_proj.weight", "self_attn.k_proj.bias",
                             "self_attn.v_proj.weight", "self_attn.v_proj.bias",
                             "self_attn.o_proj.weight"),
                  mlp=_LLAMA_MLP, norm=_LLAMA_NORM, final=("model.norm.weight",),
                  emb=("model.embed_tokens.weight",), untied=True),
    "qwen3": dict(attention=_LLAMA_ATTN, mlp=_LLAMA_MLP,
                  norm=("self_attn.q_norm.weight", "self_attn.k_norm.weight") + _LLAMA_NORM,
                  final=("model.norm.weight",), emb=("model.embed_tokens.weight",), untied=True),
    "gemma": dict(attention=_LLAMA_ATTN, mlp=_LLAMA_MLP, norm=_LLAMA_NORM,
                  final=("model.norm.weight",), emb=("model.embed_tokens.weight",), untied=False),
    "gemma2": dict(attention=_LLAMA_ATTN, mlp=_LLAMA_MLP,
                   norm=_LLAMA_NORM + ("pre_feedforward_layernorm.weight",
                                       "post_feedforward_layernorm.weight"),
                   final=("model.norm.weight",), emb=("model.embed_tokens.weight",), untied=False),
    # OLMo's LayerNorms have no parameters
    "olmo": dict(attention=_LLAMA_ATTN, mlp=_LLAMA_MLP, norm=(), final=(),
                 emb=("model.embed_tokens.weight",), untied=True),
    "phi3": dict(attention=("self_attn.o_proj.weight", "self_attn.qkv_proj.weight"),
                 mlp=("mlp.gate_up_proj.weight", "mlp.down_proj.weight"), norm=_LLAMA_NORM,
                 final=("model.norm.weight",), emb=("model.embed_tokens.weight",), untied=True),
    "gpt2": dict(attention=tuple(f"attn.{m}.{l}" for m in ("c_attn", "c_proj") for l in _LN),
                 mlp=tuple(f"mlp.{m}.{l}" for m in ("c_fc", "c_proj") for l in _LN),
                 norm=tuple(f"{m}.{l}" for m in ("ln_1", "ln_2") for l in _LN),
                 final=("transformer.ln_f.weight", "transformer.ln_f.bias"),
                 emb=("transformer.wte.weight", "transformer.wpe.weight"), untied=False),
    "gpt_neox": dict(
        attention=tuple(f"attention.{m}.{l}" for m in ("query_key_value", "dense") for l in _LN),
        mlp=tuple(f"mlp.{m}.{l}" for m in ("dense_h_to_4h", "dense_4h_to_h") for l in _LN),
        norm=tuple(f"{m}.{l}" for m in ("input_layernorm", "post_attention_layernorm") for l in _LN),
        final=("gpt_neox.final_layer_norm.weight", "gpt_neox.final_layer_norm.bias"),
        emb=("gpt_neox.embed_in.weight",), untied=True),
}


@lru_cache(maxsize=None)
def _model(model_type: str):
    return tiny_model(model_type)


def test_every_architecture_has_a_tiny_model_and_expectations():
    assert set(TINY_TYPES) == set(ARCHITECTURES) == set(EXPECTED)
    for required in ("llama", "mistral", "qwen2", "gemma", "phi3", "gpt2", "gpt_neox"):
        assert required in TINY_TYPES


@pytest.mark.parametrize("model_type", TINY_TYPES)
def test_tiny_model_is_deterministic_eval_and_small(model_type):
    m = _model(model_type)
    assert not m.training
    assert m.config.model_type == model_type
    assert len(decoder_layers(m)) == N_LAYERS
    same = tiny_model(model_type, seed=0)
    other = tiny_model(model_type, seed=1)
    a, b, c = (dict(x.named_parameters()) for x in (m, same, other))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].dim() == 2)
    assert sum(p.numel() for p in m.parameters()) < 100_000


@pytest.mark.parametrize("model_type", TINY_TYPES)
def test_tiny_model_supports_hessian_vector_products(model_type):
    m = _model(model_type)
    params = [p for p in m.parameters() if p.requires_grad]
    x = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    loss = m(x, labels=x).loss
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    used = [(g, p) for g, p in zip(grads, params) if g is not None]
    assert len(used) >= len(params) - 2  # e.g. an unused router or position row at most
    vs = [torch.randn_like(p) for _, p in used]
    gv = sum((g * v).sum() for (g, _), v in zip(used, vs))
    hv = torch.autograd.grad(gv, [p for _, p in used], allow_unused=True)
    assert any(h is not None and h.abs().sum() > 0 for h in hv)


def _block_relative(name: str, layers_path: str) -> tuple[int, str]:
    idx, _, rest = name[len(layers_path) + 1:].partition(".")
    return int(idx), rest


@pytest.mark.parametrize("model_type", TINY_TYPES)
def test_scored_params_default(model_type):
    m = _model(model_type)
    exp = EXPECTED[model_type]
    spec = arch_spec(m)
    refs = scored_params(m)
    assert {r.param_type for r in refs} <= {"attention", "mlp", "norm"}
    # each tensor once
    assert len({id(r.param) for r in refs}) == len(refs)
    assert len({r.name for r in refs}) == len(refs)

    in_blocks = [r for r in refs if r.layer >= 0]
    outside = [r for r in refs if r.layer < 0]
    # outside the blocks only the final norm (as "norm", layer -1)
    assert sorted(r.name for r in outside) == sorted(exp["final"])
    assert all(r.param_type == "norm" for r in outside)

    assert {r.layer for r in in_blocks} == set(range(N_LAYERS))
    for layer in range(N_LAYERS):
        got = {t: [] for t in ("attention", "mlp", "norm")}
        for r in in_blocks:
            if r.layer == layer:
                idx, rest = _block_relative(r.name, spec.layers)
                assert idx == layer
                got[r.param_type].append(rest)
        for t in ("attention", "mlp", "norm"):
            assert sorted(got[t]) == sorted(exp[t]), (model_type, layer, t)

    per_layer = Counter(r.param_type for r in in_blocks if r.layer == 0)
    assert per_layer["attention"] == len(exp["attention"])
    assert per_layer["mlp"] == len(exp["mlp"])
    assert per_layer["norm"] == len(exp["norm"])
    assert len(refs) == N_LAYERS * sum(per_layer.values()) + len(exp["final"])

    named = dict(m.named_parameters())
    for r in refs:
        assert named[r.name] is r.param
        assert r.module.get_parameter(r.leaf) is r.param
        assert r.shape == tuple(r.param.shape) and r.numel == r.param.numel()


@pytest.mark.parametrize("model_type", TINY_TYPES)
def test_in_dim(model_type):
    m = _model(model_type)
    for r in scored_params(m, ALL_TYPES):
        if r.param.dim() == 1:
            assert r.in_dim is None, r.name
        elif isinstance(r.module, nn.Linear) and r.leaf == "weight":
            assert r.in_dim == 1, r.name
        elif type(r.module).__name__ == "Conv1D":
            assert model_type == "gpt2"
            assert r.in_dim == 0, r.name
            # Conv1D: y = x @ W + b, so the input axis has the block's hidden width
            if r.name.endswith(("c_attn.weight", "c_fc.weight")) or ".attn.c_proj." in r.name:
                assert r.param.shape[0] == HIDDEN
        elif r.layout == "linear":  # a router: F.linear(x, W) on a plain Parameter
            assert model_type == "mixtral" and r.name.endswith("mlp.gate.weight") and r.in_dim == 1, r.name
        else:  # embeddings, fused 3-D expert tensors
            assert r.in_dim is None, r.name
    if model_type == "gpt2":
        assert any(r.in_dim == 0 for r in scored_params(m))
    else:
        assert any(r.in_dim == 1 for r in scored_params(m))


@pytest.mark.parametrize("model_type", TINY_TYPES)
def test_scored_params_with_embeddings_and_head(model_type):
    m = _model(model_type)
    exp = EXPECTED[model_type]
    default = scored_params(m)
    full = scored_params(m, ALL_TYPES)
    extra = [r for r in full if r.param_type in ("embedding", "lm_head")]
    assert [r.name for r in full if r.param_type not in ("embedding", "lm_head")] == [
        r.name for r in default
    ]
    emb = [r.name for r in extra if r.param_type == "embedding"]
    head = [r for r in extra if r.param_type == "lm_head"]
    assert sorted(emb) == sorted(exp["emb"])
    assert all(r.layer == -1 for r in extra)
    out = m.get_output_embeddings().weight
    if exp["untied"]:
        assert len(head) == 1 and head[0].param is out
        assert head[0].in_dim == 1
    else:
        assert head == []
        assert any(r.param is out for r in extra if r.param_type == "embedding")  # tied, once
    assert len({id(r.param) for r in full}) == len(full)
    only_emb = scored_params(m, ["embedding"])
    assert sorted(r.name for r in only_emb) == sorted(exp["emb"])


@pytest.mark.parametrize("model_type", TINY_TYPES)
def test_down_projections(model_type):
    m = _model(model_type)
    if ARCHITECTURES[model_type].down_proj is None:  # mixture of experts
        with pytest.raises(UnsupportedArchitectureError, match="mixture of experts"):
            down_projections(m)
        return
    downs = down_projections(m)
    assert [i for i, _ in downs] == list(range(N_LAYERS))
    layers = decoder_layers(m)
    for i, mod in downs:
        assert any(mod is sub for sub in layers[i].modules())
        if isinstance(mod, nn.Linear):
            assert mod.out_features == HIDDEN
            assert mod.weight.shape[0] == HIDDEN
        else:  # GPT-2 Conv1D, weight (in, out)
            assert type(mod).__name__ == "Conv1D"
            assert mod.nf == HIDDEN and mod.weight.shape[1] == HIDDEN
        x = torch.randn(1, 3, mod.weight.shape[1] if isinstance(mod, nn.Linear) else mod.weight.shape[0])
        assert mod(x).shape[-1] == HIDDEN
    assert len({id(mod) for _, mod in downs}) == N_LAYERS


def test_unknown_model_type_lists_supported():
    with pytest.raises(UnsupportedArchitectureError) as exc:
        arch_spec("bert")
    msg = str(exc.value)
    assert "'bert'" in msg
    for t in ARCHITECTURES:
        assert t in msg

    m = _model("llama")
    m.config.model_type = "bert"
    try:
        for fn in (scored_params, down_projections, decoder_layers):
            with pytest.raises(UnsupportedArchitectureError, match="supported: .*llama"):
                fn(m)
    finally:
        m.config.model_type = "llama"


def test_module_without_config_is_refused():
    with pytest.raises(UnsupportedArchitectureError, match="model_type"):
        scored_params(nn.Linear(2, 2))


def test_unknown_param_type_lists_allowed():
    m = _model("llama")
    with pytest.raises(ValueError) as exc:
        scored_params(m, ["attention", "ffn"])
    msg = str(exc.value)
    assert "'ffn'" in msg
    for t in PARAM_TYPES:
        assert t in msg


def test_param_types_filter():
    m = _model("llama")
    assert {r.param_type for r in scored_params(m, ["mlp"])} == {"mlp"}
    assert len(scored_params(m, ["attention"])) == N_LAYERS * 4
    assert {r.param_type for r in scored_params(m, ("norm",))} == {"norm"}


# --------------------------------------------------------------------------- the real model


@pytest.fixture(scope="module")
def stories(assets):
    return AutoModelForCausalLM.from_pretrained(STORIES).eval()


def test_stories260k(stories):
    cfg = stories.config
    n_layers, hidden = cfg.num_hidden_layers, cfg.hidden_size
    assert (n_layers, hidden, cfg.tie_word_embeddings) == (5, 64, True)
    refs = scored_params(stories)
    assert len(refs) == n_layers * 9 + 1  # 4 attention + 3 mlp + 2 norm per block, final norm
    per = Counter((r.layer, r.param_type) for r in refs)
    for layer in range(n_layers):
        assert (per[(layer, "attention")], per[(layer, "mlp")], per[(layer, "norm")]) == (4, 3, 2)
    assert [r.name for r in refs if r.layer == -1] == ["model.norm.weight"]
    k = next(r for r in refs if r.name == "model.layers.0.self_attn.k_proj.weight")
    assert k.shape == (32, 64) and k.in_dim == 1  # 4 KV heads x head_dim 8: GQA
    # the tensors scored plus the tied embedding are every parameter of the model
    full = scored_params(stories, ALL_TYPES)
    assert [r.name for r in full if r.param_type == "embedding"] == ["model.embed_tokens.weight"]
    assert not any(r.param_type == "lm_head" for r in full)  # tied
    assert sum(r.numel for r in full) == sum(p.numel() for p in stories.parameters()) == 260_032
    downs = down_projections(stories)
    assert [i for i, _ in downs] == list(range(n_layers))
    for _, mod in downs:
        assert isinstance(mod, nn.Linear)
        assert (mod.out_features, mod.in_features) == (hidden, cfg.intermediate_size)


# --------------------------------------------------------------------------- coordinates, both ways


@pytest.mark.parametrize("model_type", TINY_TYPES)
def test_flat_index_inverts_coordinates_on_every_tensor(model_type):
    """Forward (flat index -> expert, row, col) then inverse is the identity on every index of
    every scored tensor, GPT-2's transposed Conv1D and Mixtral's fused experts included; and a
    matrix's row read through weight_row holds the entries the flat indices address."""
    seen = set()
    for r in scored_params(_model(model_type), ALL_TYPES):
        idx = torch.arange(r.numel)
        e, row, col = coordinates(r.layout, r.shape, idx)
        assert torch.equal(flat_index(r.layout, r.shape, row, col, e), idx), r.name
        seen.add(r.layout)
        if r.layout in ("vector",) or r.param.dim() != 2:
            continue
        rows, cols = matrix_shape(r.layout, r.shape)
        assert int(row.max()) == rows - 1 and int(col.max()) == cols - 1, r.name
        flat = r.param.detach().reshape(-1)
        for q in (0, rows - 1):
            got = weight_row(r.layout, r.param.detach(), q)
            assert got.shape == (cols,)
            assert torch.equal(got, flat[flat_index(r.layout, r.shape, q, torch.arange(cols))]), r.name
    assert "embedding" in seen and ("linear" in seen or model_type == "gpt2")  # OLMo's norms have no weights
    if model_type == "gpt2":
        assert {"conv1d", "position_embedding", "vector"} <= seen
    if model_type == "mixtral":
        assert {"experts"} & seen


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_layout_round_trips_both_ways(layout):
    """Synthetic shapes for every layout (experts_transposed has no tiny model): inverse then
    forward is the identity on every coordinate, forward then inverse on every flat index."""
    shape = {"vector": (7,)}.get(layout, (3, 5, 4) if layout.startswith("experts") else (5, 4))
    n = math.prod(shape)
    idx = torch.arange(n)
    e, row, col = coordinates(layout, shape, idx)
    assert torch.equal(flat_index(layout, shape, row, col, e), idx)
    assert sorted(flat_index(layout, shape, int(a), None if c is None else int(c), None if x is None else int(x))
                  for x, a, c in zip(e if e is not None else [None] * n, row, col if col is not None else [None] * n)
                  ) == list(range(n))  # Python ints too, each index once


def test_the_inverse_is_the_layout_formula_the_super_weights_used():
    """nn.Linear (out, in): row * in + col; GPT-2's Conv1D stores (in, out): col * out + row."""
    assert flat_index("linear", (6, 10), 2, 3) == 2 * 10 + 3
    assert flat_index("conv1d", (10, 6), 2, 3) == 3 * 6 + 2
    assert matrix_shape("linear", (6, 10)) == (6, 10) and matrix_shape("conv1d", (10, 6)) == (6, 10)
    w = torch.arange(60.0).reshape(10, 6)  # Conv1D: (in 10, out 6)
    assert torch.equal(weight_row("conv1d", w, 2), w[:, 2]) and torch.equal(weight_row("linear", w, 2), w[2])


def test_inverse_errors_name_the_allowed_choices():
    with pytest.raises(ValueError, match="unknown layout 'nope'; allowed: linear, conv1d"):
        flat_index("nope", (2, 2), 0, 0)
    with pytest.raises(ValueError, match="takes expert, row and col"):
        flat_index("experts", (2, 2, 2), 0, 0)
    with pytest.raises(ValueError, match="takes a row only"):
        flat_index("vector", (4,), 0, 1)
    with pytest.raises(ValueError, match="is not a matrix"):
        matrix_shape("vector", (4,))
    with pytest.raises(ValueError, match="needs a 2-D matrix layout"):
        weight_row("experts", torch.zeros(2, 2, 2), 0)
