"""Perplexity the way published numbers report it: exp(mean next-token NLL) over windows."""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm


@dataclass(frozen=True)
class Perplexity:
    ppl: float
    nll: float  # mean next-token negative log-likelihood (nats)
    n_tokens: int  # predictions scored
    n_windows: int
    window_length: int


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def logits_of(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """(B, L, V) logits of a Hugging Face CausalLM, no KV cache."""
    return model(input_ids=input_ids, use_cache=False).logits


def nll_sum(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL in float32 whatever the logits' dtype: (B, L, V), (B, L) -> ()."""
    v = logits.shape[-1]
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, v).float(), input_ids[:, 1:].reshape(-1), reduction="sum"
    )


@torch.no_grad()
def perplexity(
    model: nn.Module,
    windows: torch.Tensor,
    *,
    batch_size: int = 8,
    progress: bool = False,
    desc: str = "perplexity",
) -> Perplexity:
    """Score every next-token prediction of ``windows`` (N, L); one device sync at the end."""
    if windows.dim() != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must be (N, L>=2), got {tuple(windows.shape)}")
    device = model_device(model)
    total = torch.zeros((), dtype=torch.float64, device=device)
    n, length = windows.shape
    for s in tqdm(range(0, n, batch_size), desc=desc, disable=not progress, leave=False, unit="batch"):
        ids = windows[s : s + batch_size].to(device, non_blocking=True)
        total += nll_sum(logits_of(model, ids), ids).double()
    n_tokens = n * (length - 1)
    nll = total.item() / n_tokens
    return Perplexity(ppl_of_nll(nll), nll, n_tokens, n, length)


def ppl_of_nll(nll: float) -> float:
    """exp(nll), and +inf where that overflows: a perturbation (an exponent bit flip in fp16 or
    bf16, say) can make the loss explode; NaN stays NaN. Never raises."""
    if math.isnan(nll):
        return math.nan
    try:
        return math.exp(nll)
    except OverflowError:
        return math.inf


def finite_status(x: float | None) -> str:
    """"finite", "inf" or "nan": what a perplexity was, kept beside it because strict JSON turns
    non-finite numbers into null (and a null must not read as "missing")."""
    if x is None or math.isnan(x):
        return "nan"
    return "finite" if math.isfinite(x) else "inf"


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """``model.eval()`` meanwhile (dropout off: a training-mode model gives noisy scores, spikes
    and perplexities), its training flag restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
