"""The one table that knows where each architecture keeps its layers and projections.

Everything else asks this module for :class:`ParamRef` records; no other code spells an
attribute path. An unknown ``config.model_type`` fails loudly with the list of known ones.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterable

import torch
from torch import nn

PARAM_TYPES = ("attention", "mlp", "norm", "embedding", "lm_head")
DEFAULT_PARAM_TYPES = ("attention", "mlp", "norm")


@dataclass(frozen=True)
class ArchSpec:
    """Where one family keeps its parts (paths relative to the CausalLM)."""

    layers: str  # the ModuleList of decoder blocks
    attention: tuple[str, ...]  # prefixes, inside a block, of attention submodules
    mlp: tuple[str, ...]  # prefixes of MLP submodules
    # the MLP output projection inside a block (super-weight hunting); None where the family
    # has no single one per block (mixture of experts)
    down_proj: str | None
    embeddings: tuple[str, ...]  # token (and position) embeddings
    lm_head: tuple[str, ...]  # output projection (skipped when tied to the embeddings)
    final_norm: tuple[str, ...] = ()


_LLAMA_LIKE = ArchSpec(
    layers="model.layers",
    attention=("self_attn.",),
    mlp=("mlp.", "block_sparse_moe."),
    down_proj="mlp.down_proj",
    embeddings=("model.embed_tokens",),
    lm_head=("lm_head",),
    final_norm=("model.norm",),
)

# Mixtral's experts are fused 3-D parameters in transformers 5 (mlp.experts.gate_up_proj
# (E, 2I, H), mlp.experts.down_proj (E, H, I)); transformers 4 had block_sparse_moe.experts.N.w2.
# Either way there is no one down projection module per block.
_MIXTRAL = replace(_LLAMA_LIKE, down_proj=None)

ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "mixtral": _MIXTRAL,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "olmo": _LLAMA_LIKE,
    "phi3": _LLAMA_LIKE,  # fused qkv_proj and gate_up_proj, same places
    "gpt2": ArchSpec(
        layers="transformer.h",
        attention=("attn.",),
        mlp=("mlp.",),
        down_proj="mlp.c_proj",
        embeddings=("transformer.wte", "transformer.wpe"),
        lm_head=("lm_head",),
        final_norm=("transformer.ln_f",),
    ),
    "gpt_neox": ArchSpec(
        layers="gpt_neox.layers",
        attention=("attention.",),
        mlp=("mlp.",),
        down_proj="mlp.dense_4h_to_h",
        embeddings=("gpt_neox.embed_in",),
        lm_head=("embed_out", "lm_head"),  # embed_out in transformers 4, lm_head in 5
        final_norm=("gpt_neox.final_layer_norm",),
    ),
}


class UnsupportedArchitectureError(ValueError):
    pass


@dataclass(frozen=True, eq=False)
class ParamRef:
    """One scored weight tensor and what we know about it."""

    name: str  # full parameter name, e.g. model.layers.0.mlp.down_proj.weight
    layer: int  # decoder block index; -1 outside the blocks
    param_type: str  # one of PARAM_TYPES
    param: nn.Parameter
    module: nn.Module  # the module that owns the parameter
    leaf: str  # "weight" or "bias"
    in_dim: int | None  # axis of input channels for linear-like weights, else None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.param.shape)

    @property
    def numel(self) -> int:
        return self.param.numel()


def arch_spec(model_or_type: nn.Module | str) -> ArchSpec:
    """The table entry for a model (or a ``model_type`` string)."""
    model_type = model_or_type if isinstance(model_or_type, str) else _model_type(model_or_type)
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"unsupported model_type {model_type!r}; supported: {', '.join(sorted(ARCHITECTURES))}"
        ) from None


def _model_type(model: nn.Module) -> str:
    cfg = getattr(model, "config", None)
    mt = getattr(cfg, "model_type", None)
    if mt is None:
        raise UnsupportedArchitectureError("model has no config.model_type; expected a Hugging Face CausalLM")
    return mt


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.get_submodule(arch_spec(model).layers)


def down_projections(model: nn.Module) -> list[tuple[int, nn.Module]]:
    """(layer index, MLP output projection) for every block: where super weights live."""
    spec = arch_spec(model)
    if spec.down_proj is None:
        raise UnsupportedArchitectureError(
            f"model_type {_model_type(model)!r} has no single MLP down projection per block "
            "(mixture of experts); super-weight hunting needs a dense MLP"
        )
    return [(i, block.get_submodule(spec.down_proj)) for i, block in enumerate(decoder_layers(model))]


def _in_dim(module: nn.Module, leaf: str, param: torch.Tensor) -> int | None:
    if leaf != "weight" or param.dim() != 2:
        return None
    if isinstance(module, nn.Linear):
        return 1  # weight (out, in)
    if type(module).__name__ == "Conv1D":  # GPT-2: weight (in, out), y = x @ W
        return 0
    return None


def scored_params(
    model: nn.Module, param_types: Iterable[str] = DEFAULT_PARAM_TYPES
) -> list[ParamRef]:
    """Every parameter of the requested types, in model order, each tied tensor once.

    By default the decoder blocks' attention, MLP and norm weights; ``embedding`` and
    ``lm_head`` only when asked for. A parameter inside a block that the table cannot
    place raises, rather than silently being scored under the wrong type.
    """
    wanted = tuple(param_types)
    bad = [t for t in wanted if t not in PARAM_TYPES]
    if bad:
        raise ValueError(f"unknown parameter type {bad[0]!r}; allowed: {', '.join(PARAM_TYPES)}")
    spec = arch_spec(model)
    prefix = spec.layers + "."
    modules = dict(model.named_modules())
    refs: list[ParamRef] = []
    for name, param in model.named_parameters():  # tied tensors appear once
        mod_name, _, leaf = name.rpartition(".")
        layer = -1
        if name.startswith(prefix):
            idx, _, inner = name[len(prefix):].partition(".")
            layer = int(idx)
            leafname = inner.rpartition(".")[0].rpartition(".")[2]
            if inner.startswith(spec.attention) and "norm" not in leafname:
                ptype = "attention"
            elif inner.startswith(spec.mlp) and "norm" not in leafname:
                ptype = "mlp"
            elif "norm" in inner or "ln" in inner.split(".")[0]:
                ptype = "norm"
            else:
                raise UnsupportedArchitectureError(
                    f"cannot place parameter {name!r} of model_type {_model_type(model)!r}; "
                    "extend cwa_core.architectures.ARCHITECTURES"
                )
        elif mod_name in spec.embeddings:
            ptype = "embedding"
        elif mod_name in spec.lm_head:
            ptype = "lm_head"
        elif mod_name in spec.final_norm:
            ptype = "norm"
        else:
            continue
        if ptype not in wanted:
            continue
        module = modules[mod_name]
        refs.append(ParamRef(name, layer, ptype, param, module, leaf, _in_dim(module, leaf, param)))
    if not refs:
        raise UnsupportedArchitectureError(f"no parameters of types {wanted} found in the model")
    return refs
