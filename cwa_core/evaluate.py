"""Perplexity the way published numbers report it: exp(mean next-token NLL) over windows."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .numerics import exp_or_inf as ppl_of_nll  # exp(nll), +inf where it overflows; NaN stays NaN
from .schema import finite_status  # noqa: F401  (re-exported: "finite", "inf" or "nan")


@dataclass(frozen=True)
class Perplexity:
    ppl: float
    nll: float  # mean next-token negative log-likelihood (nats)
    n_tokens: int  # predictions scored
    n_windows: int
    window_length: int
    # (n_windows,) summed next-token NLL of each window (float32 per-token losses summed in float64),
    # each over window_length - 1 predictions: the spread of the evaluation text (analysis/ bootstraps
    # windows). Computed beside the total above, never instead of it: ``nll`` stays bit for bit.
    window_nll: tuple[float, ...] | None = None


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


def nll_sums(logits: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(:func:`nll_sum`, the summed NLL of each window) from one float32 log-softmax: (B, L, V),
    (B, L) -> (), (B,) float64. ``cross_entropy`` is ``nll_loss(log_softmax)``, so the total equals
    :func:`nll_sum` bit for bit (tested); the per-window sums add the same per-token losses in float64."""
    b, _, v = logits.shape
    log_probs = F.log_softmax(logits[:, :-1].reshape(-1, v).float(), dim=-1)  # (B * (L-1), V)
    targets = input_ids[:, 1:].reshape(-1)
    total = F.nll_loss(log_probs, targets, reduction="sum")
    per_token = F.nll_loss(log_probs, targets, reduction="none")
    return total, per_token.view(b, -1).double().sum(dim=1)


@torch.no_grad()
def perplexity(
    model: nn.Module,
    windows: torch.Tensor,
    *,
    batch_size: int = 8,
    progress: bool = False,
    desc: str = "perplexity",
) -> Perplexity:
    """Score every next-token prediction of ``windows`` (N, L); one device sync at the end.
    The total (hence ``ppl``) is the sum of per-batch float32 sums in float64, as ever; the
    per-window sums (``window_nll``) are computed beside it."""
    if windows.dim() != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must be (N, L>=2), got {tuple(windows.shape)}")
    device = model_device(model)
    total = torch.zeros((), dtype=torch.float64, device=device)
    n, length = windows.shape
    per_window = torch.zeros(n, dtype=torch.float64, device=device)  # (N,)
    for s in tqdm(range(0, n, batch_size), desc=desc, disable=not progress, leave=False, unit="batch"):
        ids = windows[s : s + batch_size].to(device, non_blocking=True)
        batch_total, per_window[s : s + ids.shape[0]] = nll_sums(logits_of(model, ids), ids)
        total += batch_total.double()
    n_tokens = n * (length - 1)
    nll = total.item() / n_tokens
    return Perplexity(ppl_of_nll(nll), nll, n_tokens, n, length, tuple(per_window.tolist()))


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
