"""Sensitivity metrics: one score per weight, streamed to a sink one tensor at a time.

Every metric calls ``sink(ref, scores)`` exactly once per :class:`ParamRef`, with ``scores`` a
float32 tensor of the parameter's shape (on the parameter's device). Gradient metrics score a
tensor inside its post-accumulate-grad hook and free the gradient at once, so no full set of
gradients (or scores) exists at any time. While they run, each decoder block is checkpointed
(its activations recomputed during the backward pass), so a calibration batch costs the
activations of one block rather than of all of them, and the loss keeps only the logits for its
backward pass (:class:`_LeanNLLSum`); the gradients are the same, bit for bit.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
import torch.utils.checkpoint
from torch import nn
from tqdm.auto import tqdm

from .architectures import ParamRef, UnsupportedArchitectureError, decoder_layers
from .evaluate import logits_of, model_device, nll_sum
from .registry import Registry

log = logging.getLogger(__name__)

Sink = Callable[[ParamRef, torch.Tensor], None]


@dataclass(frozen=True)
class ScoreOptions:
    micro_batch: int | None = None  # calibration windows per forward; None = all in one
    hutchinson_probes: int = 16
    seed: int = 0  # Hutchinson probe vectors
    progress: bool = False
    # Gradient metrics: recompute each decoder block's activations in the backward pass instead
    # of keeping all of them (about one extra forward; same gradients). Not used for the
    # double backward of hutchinson_diag.
    checkpoint: bool = True


@dataclass(frozen=True)
class Metric:
    name: str
    fn: Callable[..., None]
    needs_grad: bool
    data_independent: bool
    description: str


METRICS: Registry[Metric] = Registry("metric")


def metric(name: str, *, needs_grad: bool = False, data_independent: bool = False, description: str = ""):
    def deco(fn):
        METRICS.add(name, Metric(name, fn, needs_grad, data_independent, description))
        return fn
    return deco


def score(model: nn.Module, refs: Sequence[ParamRef], name: str, calib: torch.Tensor | None,
          sink: Sink, opts: ScoreOptions = ScoreOptions()) -> Metric:
    """Score every tensor in ``refs`` with metric ``name`` on calibration windows ``calib`` (N, L)."""
    m = METRICS.get(name)
    if not m.data_independent and (calib is None or calib.numel() == 0):
        raise ValueError(f"metric {name!r} needs calibration windows")
    was_training = model.training
    model.eval()
    try:
        if m.needs_grad:
            with _grad_only_for(model, refs):
                m.fn(model, refs, calib, sink, opts)
        else:
            with torch.no_grad():
                m.fn(model, refs, calib, sink, opts)
    finally:
        model.train(was_training)
    return m


# --------------------------------------------------------------------------- helpers

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


def _mean_nll_parts(model: nn.Module, calib: torch.Tensor, opts: ScoreOptions, desc: str, lean: bool = True):
    """Yield (is_last, loss part) whose sum is the mean next-token NLL over all windows.
    ``lean``: for one plain backward (see :class:`_LeanNLLSum`); False where it is differentiated twice."""
    device = model_device(model)
    n_tok = calib.shape[0] * (calib.shape[1] - 1)
    parts = _chunks(calib, opts.micro_batch)
    for i, ids in enumerate(tqdm(parts, desc=desc, disable=not opts.progress, leave=False, unit="batch")):
        ids = ids.to(device, non_blocking=True)
        yield i == len(parts) - 1, _nll_sum(logits_of(model, ids), ids, lean) / n_tok


def _by_param(refs: Sequence[ParamRef]) -> dict[int, ParamRef]:
    return {id(r.param): r for r in refs}


def _hooked_backward(model, refs, calib, opts, on_grad: Callable[[ParamRef, torch.Tensor], None], desc: str):
    """One backward of the mean calibration loss; ``on_grad`` sees each complete gradient,
    which is freed right after. With micro-batches, gradients accumulate until the last."""
    lookup = _by_param(refs)
    armed = [False]

    def hook(p: torch.Tensor) -> None:
        if armed[0]:
            on_grad(lookup[id(p)], p.grad)
            p.grad = None

    handles = [r.param.register_post_accumulate_grad_hook(hook) for r in refs]
    try:
        with checkpointed_blocks(model, opts.checkpoint):
            for last, loss in _mean_nll_parts(model, calib, opts, desc):
                armed[0] = last
                loss.backward()
                del loss
    finally:
        for h in handles:
            h.remove()


# --------------------------------------------------------------------------- metrics

@metric("magnitude", data_independent=True, description="|w|")
def _magnitude(model, refs, calib, sink, opts):
    for r in refs:
        sink(r, r.param.detach().abs().float())


@metric("grad_x_weight", needs_grad=True,
        description="|w * g|, g the gradient of the mean calibration loss")
def _grad_x_weight(model, refs, calib, sink, opts):
    def on_grad(r: ParamRef, g: torch.Tensor) -> None:
        sink(r, (r.param.detach().float() * g.float()).abs_())

    _hooked_backward(model, refs, calib, opts, on_grad, "grad_x_weight")


@metric("grad_squared", needs_grad=True,
        description="sum over calibration windows of per-window g^2 (empirical Fisher diagonal)")
def _grad_squared(model, refs, calib, sink, opts):
    acc: dict[int, torch.Tensor] = {}

    def on_grad(r: ParamRef, g: torch.Tensor) -> None:
        g = g.float()
        if id(r.param) in acc:
            acc[id(r.param)].addcmul_(g, g)
        else:
            acc[id(r.param)] = g * g

    device = model_device(model)
    lookup = _by_param(refs)

    def hook(p: torch.Tensor) -> None:
        on_grad(lookup[id(p)], p.grad)
        p.grad = None

    handles = [r.param.register_post_accumulate_grad_hook(hook) for r in refs]
    try:
        with checkpointed_blocks(model, opts.checkpoint):
            for w in tqdm(range(calib.shape[0]), desc="grad_squared", disable=not opts.progress,
                          leave=False, unit="window"):
                window = calib[w : w + 1].to(device)
                (_nll_sum(logits_of(model, window), window, True) / (window.shape[1] - 1)).backward()
    finally:
        for h in handles:
            h.remove()
    for r in refs:
        a = acc.pop(id(r.param), None)  # None: the tensor never got a gradient
        sink(r, a if a is not None else torch.zeros(r.shape, device=r.param.device))


def hutchinson_diagonal(model: nn.Module, refs: Sequence[ParamRef], calib: torch.Tensor,
                        opts: ScoreOptions, probes_per_pass: int = 8) -> list[torch.Tensor]:
    """Hutchinson estimate of diag(H) of the mean calibration loss: mean over Rademacher
    probes z of z * (H z), with H z from a Hessian-vector product (double backward).

    The gradient graph of each micro-batch is built once and reused by every probe; probe
    ``i`` draws the same z in every micro-batch (H z is linear in the loss, so the parts add).
    """
    params = [r.param for r in refs]
    device = model_device(model)
    n = opts.hutchinson_probes
    acc = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in params]

    def probe(i: int) -> list[torch.Tensor]:
        gen = torch.Generator(device=device).manual_seed(opts.seed * 1_000_003 + i)
        return [(torch.randint(0, 2, p.shape, generator=gen, device=device) * 2 - 1).to(p.dtype) for p in params]

    for _, loss in _mean_nll_parts(model, calib, opts, "hutchinson", lean=False):
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        for start in range(0, n, probes_per_pass):
            ids = range(start, min(n, start + probes_per_pass))
            zs = [probe(i) for i in ids]
            batched = [torch.stack([z[i] for z in zs]) for i in live]  # (P, *shape)
            hv = torch.autograd.grad([grads[i] for i in live], [params[i] for i in live],
                                     grad_outputs=batched, retain_graph=True, allow_unused=True,
                                     is_grads_batched=True)
            for i, z, h in zip(live, batched, hv):
                if h is not None:
                    acc[i] += (z.float() * h.float()).sum(0)
        del grads
    return [a / n for a in acc]


@contextlib.contextmanager
def _double_backward_attention(model: nn.Module) -> Iterator[None]:
    """Fused attention kernels have no double backward: use eager attention meanwhile."""
    cfg = getattr(model, "config", None)
    current = getattr(cfg, "_attn_implementation", None)
    switch = current not in (None, "eager") and hasattr(model, "set_attn_implementation")
    if switch:
        model.set_attn_implementation("eager")
    try:
        yield
    finally:
        if switch:
            model.set_attn_implementation(current)


@metric("hutchinson_diag", needs_grad=True,
        description="|diag(H)|, Hutchinson estimate E[z * Hz] with Rademacher probes")
def _hutchinson(model, refs, calib, sink, opts):
    with _double_backward_attention(model):
        diag = hutchinson_diagonal(model, refs, calib, opts)
    for r, d in zip(refs, diag):
        sink(r, d.abs_())


class _ActivationStats:
    """Per-input-channel max |x| (``use_max``) or sum of squares of every scored module's
    input, via hooks: ``chan[id(module)]``."""

    def __init__(self, refs: Sequence[ParamRef], use_max: bool) -> None:
        self.use_max = use_max
        self.chan: dict[int, torch.Tensor] = {}
        self.handles = []
        seen = set()
        for r in refs:
            if id(r.module) in seen:
                continue
            if r.in_dim is not None:
                seen.add(id(r.module))
                self.handles.append(r.module.register_forward_pre_hook(self._pre))
            elif r.param_type == "norm" and r.leaf == "weight":
                seen.add(id(r.module))
                self.handles.append(r.module.register_forward_hook(self._post))

    def _update(self, module: nn.Module, x: torch.Tensor) -> None:
        xf = x.detach().reshape(-1, x.shape[-1]).float()  # (tokens, channels)
        key = id(module)
        c = xf.abs().amax(0) if self.use_max else xf.square().sum(0)
        if key not in self.chan:
            self.chan[key] = c
        elif self.use_max:
            torch.maximum(self.chan[key], c, out=self.chan[key])
        else:
            self.chan[key] += c

    def _pre(self, module, args):
        self._update(module, args[0])

    def _post(self, module, args, out):
        out = out[0] if isinstance(out, tuple) else out
        bias = getattr(module, "bias", None)
        self._update(module, out - bias if isinstance(bias, torch.Tensor) else out)  # = x_hat * gamma

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _activation_scores(model, refs, calib, sink, opts, use_max: bool) -> None:
    stats = _ActivationStats(refs, use_max)
    try:
        for _ in _forward_only(model, calib, opts, "activations"):
            pass
    finally:
        stats.remove()
    counts = torch.bincount(calib.reshape(-1))
    for r in refs:
        w = r.param.detach().abs().float()
        chan = stats.chan.get(id(r.module))
        if chan is not None and not use_max:
            chan = chan.sqrt()  # ||x||_2 per channel
        if r.leaf == "bias":
            s = w
        elif r.in_dim is not None:
            s = torch.zeros_like(w) if chan is None else w * (chan[None, :] if r.in_dim == 1 else chan[:, None])
        elif r.param_type == "norm":
            s = torch.zeros_like(w) if chan is None else chan
        elif r.param_type == "embedding" and w.dim() == 2:
            c = torch.zeros(w.shape[0], device=w.device)
            n = min(len(counts), w.shape[0])
            c[:n] = counts[:n].to(w.device).float()
            s = w * ((c > 0).float() if use_max else c.sqrt())[:, None]
        else:
            s = w
        sink(r, s)


def _forward_only(model, calib, opts, desc):
    device = model_device(model)
    for ids in tqdm(_chunks(calib, opts.micro_batch), desc=desc, disable=not opts.progress, leave=False, unit="batch"):
        yield logits_of(model, ids.to(device, non_blocking=True))


@metric("wanda",
        description="|w| * ||x_in||_2 of its input channel over calibration tokens")
def _wanda(model, refs, calib, sink, opts):
    _activation_scores(model, refs, calib, sink, opts, use_max=False)


@metric("act_contrib",
        description="max over tokens of |x_k * W_jk|, a weight's largest single contribution")
def _act_contrib(model, refs, calib, sink, opts):
    _activation_scores(model, refs, calib, sink, opts, use_max=True)
