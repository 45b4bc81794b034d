"""Tiny randomly initialised CausalLMs, one per supported architecture, for fast tests.

``tiny_model("llama")`` builds a 2-layer, 32-wide model (vocab 128, intermediate 64, 4 heads,
2 KV heads where the family has grouped-query attention, 128 positions) with
``AutoModelForCausalLM.from_config``. Same seed, same weights. Attention is ``eager`` so that
Hessian-vector products (``create_graph=True`` then a second ``grad``) work: the CPU sdpa
kernel has no double backward.
"""
from __future__ import annotations

from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

N_LAYERS = 2
HIDDEN = 32
INTERMEDIATE = 64
VOCAB = 128
N_HEADS = 4
N_KV_HEADS = 2
MAX_POS = 128
HEAD_DIM = HIDDEN // N_HEADS

_GQA = {
    "num_attention_heads": N_HEADS,
    "num_key_value_heads": N_KV_HEADS,
    "head_dim": HEAD_DIM,
    "max_position_embeddings": MAX_POS,
}

# Per-family config fields on top of the common ones (vocab, hidden, layers).
_OVERRIDES: dict[str, dict[str, Any]] = {
    "llama": {**_GQA, "intermediate_size": INTERMEDIATE},
    "mistral": {**_GQA, "intermediate_size": INTERMEDIATE, "sliding_window": None},
    "mixtral": {
        **_GQA,
        "intermediate_size": INTERMEDIATE,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "sliding_window": None,
    },
    "qwen2": {**_GQA, "intermediate_size": INTERMEDIATE, "use_sliding_window": False},
    "qwen3": {**_GQA, "intermediate_size": INTERMEDIATE, "use_sliding_window": False},
    "gemma": {**_GQA, "intermediate_size": INTERMEDIATE, "pad_token_id": 0},
    "gemma2": {
        **_GQA,
        "intermediate_size": INTERMEDIATE,
        "pad_token_id": 0,
        "sliding_window": 64,
        "query_pre_attn_scalar": HEAD_DIM,
    },
    "olmo": {**_GQA, "intermediate_size": INTERMEDIATE, "pad_token_id": 1},
    "phi3": {
        **_GQA,
        "intermediate_size": INTERMEDIATE,
        "original_max_position_embeddings": MAX_POS,
        "pad_token_id": 0,
        "sliding_window": None,
    },
    "gpt2": {"n_embd": HIDDEN, "n_layer": N_LAYERS, "n_head": N_HEADS, "n_inner": INTERMEDIATE,
             "n_positions": MAX_POS},
    "gpt_neox": {
        "num_attention_heads": N_HEADS,
        "intermediate_size": INTERMEDIATE,
        "max_position_embeddings": MAX_POS,
    },
}

TINY_TYPES: tuple[str, ...] = tuple(_OVERRIDES)


def tiny_config(model_type: str, **overrides: Any):
    """The config :func:`tiny_model` builds from (fields may be overridden)."""
    if model_type not in _OVERRIDES:
        raise ValueError(f"no tiny config for {model_type!r}; known: {', '.join(TINY_TYPES)}")
    fields: dict[str, Any] = {
        "vocab_size": VOCAB,
        "hidden_size": HIDDEN,
        "num_hidden_layers": N_LAYERS,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    fields.update(_OVERRIDES[model_type])
    fields.update(overrides)
    if "head_dim" in fields and "head_dim" not in overrides:  # keep head_dim = hidden / heads
        fields["head_dim"] = fields["hidden_size"] // fields["num_attention_heads"]
    return AutoConfig.for_model(model_type, **fields)


def tiny_model(
    model_type: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any
) -> PreTrainedModel:
    """A deterministic (per seed), eval-mode, randomly initialised tiny CausalLM."""
    cfg = tiny_config(model_type, **overrides)
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        # eager: double backward (HVPs) through attention; the CPU sdpa kernel has none
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    model = model.to(dtype)
    model.eval()
    return model
