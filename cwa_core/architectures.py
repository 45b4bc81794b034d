"""The one table that knows where each architecture keeps its layers and projections.

Everything else asks this module for :class:`ParamRef` records; no other code spells an
attribute path. An unknown ``config.model_type`` fails loudly with the list of known ones.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .schema import DEFAULT_PARAM_TYPES, PARAM_TYPES  # noqa: F401  (declared once, torch-free)


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
    position_embeddings: tuple[str, ...] = ()  # those of ``embeddings`` whose rows are positions
    # mixture of experts, inside a block: the router (a linear map kept in a plain Parameter,
    # not an nn.Linear) and the fused experts module (3-D parameters, one matrix per expert)
    router: str | None = None
    experts: str | None = None
    # norms compute x_hat * (norm_offset + w): the stored w is an offset from the gain (Gemma: 1)
    norm_offset: float = 0.0


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
_MIXTRAL = replace(_LLAMA_LIKE, down_proj=None, router="mlp.gate", experts="mlp.experts")
# Gemma's RMSNorm multiplies by (1 + w) (weights initialised at 0)
_GEMMA = replace(_LLAMA_LIKE, norm_offset=1.0)

ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "mixtral": _MIXTRAL,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _GEMMA,
    "gemma2": _GEMMA,
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
        position_embeddings=("transformer.wpe",),
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
    # how the stored tensor maps inputs to outputs (a key of LAYOUTS); None: inferred from
    # in_dim and the shape (hand-built refs)
    layout: str | None = None
    # the effective value is offset + w (Gemma's norm gains: 1 + w); metrics score it and
    # arithmetic perturbations act on it
    offset: float = 0.0

    def __post_init__(self) -> None:
        if self.layout is None:
            inferred = "vector" if self.param.dim() == 1 else {1: "linear", 0: "conv1d"}.get(self.in_dim)
            if inferred is None:
                raise ValueError(f"{self.name}: give a layout; allowed: {', '.join(LAYOUTS)}")
            object.__setattr__(self, "layout", inferred)

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
        raise UnsupportedArchitectureError(unsupported_message(model_type)) from None


def unsupported_message(model_type: str) -> str:
    """One line: the model type is not in the table, which types are, where to add it."""
    return (f"unsupported model_type {model_type!r}; supported: {', '.join(sorted(ARCHITECTURES))} "
            "(add it to cwa_core.architectures.ARCHITECTURES)")


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


# --------------------------------------------------------------------------- layouts
# How a stored tensor maps inputs to outputs, and so how a flat index becomes the coordinates
# top_weights.csv reports: (expert, row, col) in the nn.Linear convention (row = output channel,
# col = input channel), expert None outside mixtures of experts, col None for vectors.

Coords = tuple["torch.Tensor | None", torch.Tensor, "torch.Tensor | None"]


def _rows_cols(shape: Sequence[int], idx: torch.Tensor) -> Coords:
    return None, idx // shape[1], idx % shape[1]


def _cols_rows(shape: Sequence[int], idx: torch.Tensor) -> Coords:
    return None, idx % shape[1], idx // shape[1]  # stored (in, out)


def _experts_out_in(shape: Sequence[int], idx: torch.Tensor) -> Coords:
    per = shape[1] * shape[2]
    return idx // per, (idx % per) // shape[2], idx % shape[2]


def _experts_in_out(shape: Sequence[int], idx: torch.Tensor) -> Coords:
    per = shape[1] * shape[2]
    return idx // per, idx % shape[2], (idx % per) // shape[2]


def _vector(shape: Sequence[int], idx: torch.Tensor) -> Coords:
    return None, idx, None


LAYOUTS: dict[str, Callable[[Sequence[int], torch.Tensor], Coords]] = {
    "linear": _rows_cols,  # (out, in): nn.Linear, and linear maps kept in plain Parameters (routers)
    "conv1d": _cols_rows,  # (in, out): GPT-2's Conv1D, y = x @ W + b
    "experts": _experts_out_in,  # (E, out, in): fused experts, F.linear(x, W[e])
    "experts_transposed": _experts_in_out,  # (E, in, out): x @ W[e]
    "embedding": _rows_cols,  # (V, H): row = token id (= the tied lm_head's output), col = channel
    "position_embedding": _rows_cols,  # (P, H): row = position, col = channel
    "vector": _vector,  # norm gains, biases: row = index
}
_IN_DIM = {"linear": 1, "conv1d": 0}


def coordinates(layout: str, shape: Sequence[int], flat_idx: torch.Tensor) -> Coords:
    """(expert, row, col) of flat indices (n,) into a tensor of ``shape`` stored as ``layout``,
    in the nn.Linear convention (row = output, col = input); None where a coordinate does not
    apply (expert outside mixtures of experts, col for vectors)."""
    try:
        fn = LAYOUTS[layout]
    except KeyError:
        raise ValueError(f"unknown layout {layout!r}; allowed: {', '.join(LAYOUTS)}") from None
    return fn(shape, flat_idx)


# The inverse of LAYOUTS: (expert, row, col) in the nn.Linear convention -> the flat index into
# the stored tensor, per layout (ints or tensors alike): flat_index(coordinates(i)) == i.
Index = "int | torch.Tensor"  # a Python int, or (n,) int64 indices


def _rows_cols_inv(shape: Sequence[int], e, row, col):
    return row * shape[1] + col


def _cols_rows_inv(shape: Sequence[int], e, row, col):
    return col * shape[1] + row  # stored (in, out)


def _experts_out_in_inv(shape: Sequence[int], e, row, col):
    return e * (shape[1] * shape[2]) + row * shape[2] + col


def _experts_in_out_inv(shape: Sequence[int], e, row, col):
    return e * (shape[1] * shape[2]) + col * shape[2] + row


def _vector_inv(shape: Sequence[int], e, row, col):
    return row


_INVERSE: dict[str, Callable] = {
    "linear": _rows_cols_inv, "conv1d": _cols_rows_inv, "experts": _experts_out_in_inv,
    "experts_transposed": _experts_in_out_inv, "embedding": _rows_cols_inv,
    "position_embedding": _rows_cols_inv, "vector": _vector_inv,
}
# (rows, cols) in the nn.Linear convention of a 2-D layout (of one expert's matrix for experts)
_MATRIX_AXES = {"linear": (0, 1), "conv1d": (1, 0), "embedding": (0, 1), "position_embedding": (0, 1),
                "experts": (1, 2), "experts_transposed": (2, 1)}


def flat_index(layout: str, shape: Sequence[int], row: Index, col: Index | None = None,
               expert: Index | None = None) -> Index:
    """The flat index into a tensor of ``shape`` stored as ``layout`` of the weight at (expert,
    row, col) in the nn.Linear convention (row = output, col = input): the inverse of
    :func:`coordinates`. ``expert`` only for experts layouts, ``col`` for all but vectors."""
    try:
        fn = _INVERSE[layout]
    except KeyError:
        raise ValueError(f"unknown layout {layout!r}; allowed: {', '.join(LAYOUTS)}") from None
    if (expert is None) != (layout not in ("experts", "experts_transposed")) or (col is None) != (layout == "vector"):
        raise ValueError(f"layout {layout!r} takes " + {"vector": "a row only", "experts": "expert, row and col",
                                                        "experts_transposed": "expert, row and col"}.get(layout, "row and col"))
    return fn(shape, expert, row, col)


def matrix_shape(layout: str, shape: Sequence[int]) -> tuple[int, int]:
    """(rows, cols) = (outputs, inputs) of a matrix stored as ``layout`` (of each expert's
    matrix for experts layouts): GPT-2's Conv1D stores (in, out)."""
    try:
        r, c = _MATRIX_AXES[layout]
    except KeyError:
        raise ValueError(f"layout {layout!r} is not a matrix; matrices: {', '.join(_MATRIX_AXES)}") from None
    return shape[r], shape[c]


def weight_row(layout: str, weight: torch.Tensor, row: int) -> torch.Tensor:
    """W[row, :] of a 2-D ``weight`` stored as ``layout`` in the nn.Linear convention: the
    weights of output ``row``, (in channels,): a view of ``weight``."""
    r, _ = _MATRIX_AXES.get(layout, (None, None)) if weight.dim() == 2 else (None, None)
    if r is None:
        raise ValueError(f"weight_row needs a 2-D matrix layout, got {layout!r} {tuple(weight.shape)}")
    return weight[row] if r == 0 else weight[:, row]


def _layout(spec: ArchSpec, model: nn.Module, name: str, inner_module: str | None, mod_name: str,
            module: nn.Module, param: torch.Tensor) -> str:
    """The layout of one parameter; a matrix the table cannot place raises."""
    if param.dim() == 1:
        return "vector"
    if mod_name in spec.embeddings and param.dim() == 2:
        return "position_embedding" if mod_name in spec.position_embeddings else "embedding"
    if param.dim() == 2 and (isinstance(module, nn.Linear) or (inner_module is not None and inner_module == spec.router)):
        return "linear"
    if param.dim() == 2 and type(module).__name__ == "Conv1D":
        return "conv1d"
    if param.dim() == 3 and inner_module is not None and inner_module == spec.experts:
        return "experts_transposed" if getattr(module, "is_transposed", False) else "experts"
    raise UnsupportedArchitectureError(
        f"cannot tell how {name} {tuple(param.shape)} of model_type {_model_type(model)!r} maps inputs "
        "to outputs; extend cwa_core.architectures.ARCHITECTURES"
    )


# --------------------------------------------------------------------------- fused experts

def experts_unsupported(experts: nn.Module) -> str | None:
    """Why :func:`expert_inputs` cannot recompute what a fused experts module's matrices see,
    or None when it can (transformers 5's gated, bias-free, (E, out, in) experts: Mixtral)."""
    if getattr(experts, "is_transposed", False):
        return "its experts are stored (E, in, out)"
    if getattr(experts, "has_bias", False) or not getattr(experts, "has_gate", True):
        return "its experts have biases or no gate"
    if not all(hasattr(experts, a) for a in ("gate_up_proj", "down_proj", "_apply_gate", "num_experts")):
        return f"{type(experts).__name__} is not a fused gate_up/down experts module"
    return None


def expert_inputs(experts: nn.Module, hidden: torch.Tensor, top_k_index: torch.Tensor
                  ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """(expert e, x_e (T_e, H), h_e (T_e, I)) for every expert that received tokens: the rows of
    ``hidden`` (T, H) routed to it (``top_k_index`` (T, k)) and what its down projection
    multiplies, recomputed as the module does: h_e = _apply_gate(x_e @ gate_up_proj[e].T)
    (act(gate) * up). Indices beyond the experts (expert-parallel sentinels) are skipped."""
    with torch.no_grad():
        for e in range(experts.num_experts):
            routed = (top_k_index == e).any(-1)  # (T,)
            if not bool(routed.any()):
                continue
            x = hidden[routed]
            yield e, x, experts._apply_gate(F.linear(x, experts.gate_up_proj[e]))


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
        inner_module = None  # the owning module's path inside its block
        if name.startswith(prefix):
            idx, _, inner = name[len(prefix):].partition(".")
            layer = int(idx)
            inner_module = inner.rpartition(".")[0]
            leafname = inner_module.rpartition(".")[2]
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
        layout = _layout(spec, model, name, inner_module, mod_name, module, param)
        offset = spec.norm_offset if ptype == "norm" and leaf == "weight" else 0.0
        refs.append(ParamRef(name, layer, ptype, param, module, leaf,
                             _IN_DIM.get(layout), layout, offset))  # a bias's layout is "vector": None
    if not refs:
        raise UnsupportedArchitectureError(f"no parameters of types {wanted} found in the model")
    return refs
