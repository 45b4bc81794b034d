"""The backward-pass machinery of the gradient metrics: calibration batches, a lean loss,
per-tensor gradient hooks and per-block activation checkpointing.

Gradient metrics score a tensor inside its post-accumulate-grad hook and free the gradient at
once, so no full set of gradients (or scores) exists at any time. While they run, each decoder
block is checkpointed (its activations recomputed during the backward pass), and the loss keeps
only the logits for its backward pass (:class:`_LeanNLLSum`); the gradients are the same, bit
for bit. :mod:`cwa_core.metrics` holds the metrics themselves.
"""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import torch
import torch.utils.checkpoint
from torch import nn
from tqdm.auto import tqdm

from .architectures import ParamRef, UnsupportedArchitectureError, decoder_layers
from .evaluate import logits_of, model_device, nll_sum

if TYPE_CHECKING:
    from .metrics import ScoreOptions


@contextlib.contextmanager
def _grad_only_for(model: nn.Module, refs: Sequence[ParamRef]) -> Iterator[None]:
    """Gradients for the scored tensors only (no gradient buffer for the embedding table
    unless it is scored); everything restored afterwards."""
    saved = [(p, p.requires_grad, p.grad) for p in model.parameters()]
    wanted = {id(r.param) for r in refs}
    for p in model.parameters():
        p.requires_grad_(id(p) in wanted)
        p.grad = None
    try:
        with torch.enable_grad():
            yield
    finally:
        for p, rg, g in saved:
            p.requires_grad_(rg)
            p.grad = g


_NO_FORWARD = object()


@contextlib.contextmanager
def checkpointed_blocks(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Meanwhile, run every decoder block under ``torch.utils.checkpoint`` (non-reentrant)
    whenever gradients are enabled: only each block's input is kept for the backward pass, which
    recomputes the block's activations when it reaches it. Gradients are unchanged (the same
    operations run on the same inputs); the model's training flags are untouched.

    The blocks' ``forward`` is wrapped on the instance and restored afterwards. A model whose
    blocks the architecture table cannot find runs as it is.
    """
    if not enabled:
        yield
        return
    try:
        blocks = list(decoder_layers(model))
    except (UnsupportedArchitectureError, AttributeError):
        blocks = []
    saved = []
    for block in blocks:
        saved.append((block, block.__dict__.get("forward", _NO_FORWARD)))
        block.forward = _checkpointing(block.forward)
    try:
        yield
    finally:
        for block, fwd in saved:
            if fwd is _NO_FORWARD:
                del block.forward
            else:
                block.forward = fwd


def _checkpointing(forward: Callable) -> Callable:
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


def _chunks(calib: torch.Tensor, micro_batch: int | None) -> list[torch.Tensor]:
    mb = calib.shape[0] if not micro_batch else micro_batch
    return list(torch.split(calib, mb))


_LOSS_CHUNK = 1 << 24  # logits elements per chunk of the lean loss (64 MiB in float32)


class _LeanNLLSum(torch.autograd.Function):
    """:func:`~cwa_core.evaluate.nll_sum` for a single backward, lean on memory.

    ``nll_sum`` keeps a shifted copy of the (B, L, V) logits, their float32 log-softmax for the
    backward pass, and in the backward pass a dense NLL gradient and the log-softmax gradient
    at once: three to four logits-sized tensors. This keeps only the logits and builds their
    gradient in place, chunk by chunk, with the same kernels on the same rows (log-softmax,
    then its backward from the NLL gradient, then the cast to the logits' dtype), so the
    gradient is the same bit for bit. It is not twice differentiable (Hutchinson uses nll_sum).
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(logits, ids)
        total = torch.zeros((), dtype=torch.float64, device=logits.device)
        for b, s, e in _loss_chunks(logits):
            out = torch.log_softmax(logits[b, s:e].float(), -1)
            total -= out.gather(1, ids[b, s + 1:e + 1, None]).sum(dtype=torch.float64)
        return total.float()

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        logits, ids = ctx.saved_tensors
        grad = torch.zeros_like(logits)  # the last position predicts nothing: its rows stay 0
        for b, s, e in _loss_chunks(logits):
            out = torch.log_softmax(logits[b, s:e].float(), -1)
            idx = ids[b, s + 1:e + 1, None]
            g_out = torch.zeros_like(out).scatter_(1, idx, (-grad_total).to(out.dtype).expand(idx.shape))
            grad[b, s:e] = torch._log_softmax_backward_data(g_out, out, -1, out.dtype)
        return grad, None


def _loss_chunks(logits: torch.Tensor):
    """(window, first row, end row) over the rows that predict a next token."""
    b, length, v = logits.shape
    rows = max(1, _LOSS_CHUNK // v)
    for w in range(b):
        for s in range(0, length - 1, rows):
            yield w, s, min(s + rows, length - 1)


def _nll_sum(logits: torch.Tensor, ids: torch.Tensor, lean: bool) -> torch.Tensor:
    if lean and logits.requires_grad and logits.dim() == 3:
        return _LeanNLLSum.apply(logits, ids)
    return nll_sum(logits, ids)


def _batches(model: nn.Module, calib: torch.Tensor, batch: int | None, opts: ScoreOptions, desc: str):
    """Yield (is_last, ids on the model's device) over the calibration windows (N, L) in batches
    of ``batch`` windows (None: all at once), with a progress bar."""
    device = model_device(model)
    parts = _chunks(calib, batch)
    unit = "window" if batch == 1 else "batch"
    for i, ids in enumerate(tqdm(parts, desc=desc, disable=not opts.progress, leave=False, unit=unit)):
        yield i == len(parts) - 1, ids.to(device, non_blocking=True)


def _mean_nll_parts(model: nn.Module, calib: torch.Tensor, opts: ScoreOptions, desc: str, lean: bool = True):
    """Yield (is_last, loss part) whose sum is the mean next-token NLL over all windows.
    ``lean``: for one plain backward (see :class:`_LeanNLLSum`); False where it is differentiated twice."""
    n_tok = calib.shape[0] * (calib.shape[1] - 1)
    for last, ids in _batches(model, calib, opts.micro_batch, opts, desc):
        yield last, _nll_sum(logits_of(model, ids), ids, lean) / n_tok


def _per_window_nll(model: nn.Module, calib: torch.Tensor, opts: ScoreOptions, desc: str):
    """Yield (True, the mean NLL of one window) for every window: each is a loss of its own."""
    for _, ids in _batches(model, calib, 1, opts, desc):
        yield True, _nll_sum(logits_of(model, ids), ids, True) / (ids.shape[1] - 1)


def _by_param(refs: Sequence[ParamRef]) -> dict[int, ParamRef]:
    return {id(r.param): r for r in refs}


def _hooked_backward(model, refs, calib, opts, on_grad: Callable[[ParamRef, torch.Tensor], None], desc: str,
                     per_window: bool = False):
    """One backward of the mean calibration loss; ``on_grad`` sees each complete gradient,
    which is freed right after. With micro-batches, gradients accumulate until the last.
    ``per_window``: one backward per window instead, ``on_grad`` seeing every window's gradient."""
    lookup = _by_param(refs)
    armed = [False]

    def hook(p: torch.Tensor) -> None:
        if armed[0]:
            on_grad(lookup[id(p)], p.grad)
            p.grad = None

    handles = [r.param.register_post_accumulate_grad_hook(hook) for r in refs]
    try:
        with checkpointed_blocks(model, opts.checkpoint):
            parts = _per_window_nll(model, calib, opts, desc) if per_window else _mean_nll_parts(model, calib, opts, desc)
            for last, loss in parts:
                armed[0] = last
                loss.backward()
                del loss
    finally:
        for h in handles:
            h.remove()
