"""Sensitivity metrics: one score per weight, streamed to a sink one tensor at a time.

Every metric calls ``sink(ref, scores)`` exactly once per :class:`ParamRef`, with ``scores`` a
float32 tensor of the parameter's shape (on the parameter's device). A metric that cannot score
a tensor raises :class:`UnsupportedTensorError` before any work (never a silent stand-in). Where
a tensor's effective value is an offset from what is stored (Gemma's norm gains, 1 + w), the
metrics score the effective value: |1 + w|, |(1 + w) g| (dL/dgain = dL/dw, so the gradient and
Hessian metrics are unchanged). Gradient metrics score a
tensor inside its post-accumulate-grad hook and free the gradient at once, so no full set of
gradients (or scores) exists at any time. While they run, each decoder block is checkpointed
(its activations recomputed during the backward pass), so a calibration batch costs the
activations of one block rather than of all of them, and the loss keeps only the logits for its
backward pass (:class:`~cwa_core.backward._LeanNLLSum`); the gradients are the same, bit for bit.
"""
from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from .architectures import PARAM_TYPES, ParamRef, expert_inputs, experts_unsupported
from .backward import _batches, _grad_only_for, _hooked_backward, _mean_nll_parts, checkpointed_blocks  # noqa: F401
from .evaluate import eval_mode, logits_of
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


class UnsupportedTensorError(ValueError):
    """A metric cannot score one of the requested tensors; the message (one line) names the
    tensor, why, and the metrics and parameter types that would work. A usage error: the
    command exits with status 2."""


def _scores_anything(ref: ParamRef) -> str | None:
    return None


@dataclass(frozen=True)
class Metric:
    name: str
    fn: Callable[..., None]
    needs_grad: bool
    data_independent: bool
    description: str
    # why the metric cannot score a tensor, or None when it can
    unsupported: Callable[[ParamRef], str | None] = _scores_anything


METRICS: Registry[Metric] = Registry("metric")


def metric(name: str, *, needs_grad: bool = False, data_independent: bool = False, description: str = "",
           unsupported: Callable[[ParamRef], str | None] = _scores_anything):
    def deco(fn):
        METRICS.add(name, Metric(name, fn, needs_grad, data_independent, description, unsupported))
        return fn
    return deco


def check_supported(name: str, refs: Sequence[ParamRef], model_type: str | None = None) -> None:
    """Raise :class:`UnsupportedTensorError` if metric ``name`` cannot score one of ``refs``
    (cheap, no forward pass: callable before any work)."""
    m = METRICS.get(name)
    for r in refs:
        why = m.unsupported(r)
        if why is None:
            continue
        others = [n for n in METRICS.names() if n != name and METRICS.get(n).unsupported(r) is None]
        types = [t for t in PARAM_TYPES if t != r.param_type and any(x.param_type == t for x in refs)]
        fixes = []
        if others:
            fixes.append("use " + (f"{', '.join(others[:-1])} or {others[-1]}" if len(others) > 1 else others[0]))
        if types:
            fixes.append(f"--param-types {','.join(types)}")
        where = f" of {model_type}" if model_type else ""
        fix = f"; {', or '.join(fixes)}" if fixes else ""
        raise UnsupportedTensorError(f"{name} cannot score {r.name}{where}: {why}{fix}")


def score(model: nn.Module, refs: Sequence[ParamRef], name: str, calib: torch.Tensor | None,
          sink: Sink, opts: ScoreOptions = ScoreOptions()) -> Metric:
    """Score every tensor in ``refs`` with metric ``name`` on calibration windows ``calib`` (N, L)."""
    m = METRICS.get(name)
    check_supported(name, refs, getattr(getattr(model, "config", None), "model_type", None))
    if not m.data_independent and (calib is None or calib.numel() == 0):
        raise ValueError(f"metric {name!r} needs calibration windows")
    with eval_mode(model):
        if m.needs_grad:
            with _grad_only_for(model, refs):
                m.fn(model, refs, calib, sink, opts)
        else:
            with torch.no_grad():
                m.fn(model, refs, calib, sink, opts)
    return m


# --------------------------------------------------------------------------- metrics

def _value(r: ParamRef) -> torch.Tensor:
    """The tensor's effective value in float32: offset + w (Gemma's norm gain 1 + w), else w.
    May share storage with the parameter: never modify it in place."""
    w = r.param.detach().float()
    return w + r.offset if r.offset else w


@metric("magnitude", data_independent=True, description="|w| (|1 + w| for Gemma's norm gains)")
def _magnitude(model, refs, calib, sink, opts):
    for r in refs:
        sink(r, _value(r).abs())


@metric("grad_x_weight", needs_grad=True,
        description="|w * g|, g the gradient of the mean calibration loss (|(1 + w) g| for Gemma's norm gains)")
def _grad_x_weight(model, refs, calib, sink, opts):
    def on_grad(r: ParamRef, g: torch.Tensor) -> None:
        sink(r, (_value(r) * g.float()).abs_())

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

    _hooked_backward(model, refs, calib, opts, on_grad, "grad_squared", per_window=True)
    for r in refs:
        a = acc.pop(id(r.param), None)  # None: the tensor never got a gradient
        sink(r, a if a is not None else torch.zeros(r.shape, device=r.param.device))


def _generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _rademacher(shape, dtype: torch.dtype, device: torch.device, gen: torch.Generator) -> torch.Tensor:
    return (torch.randint(0, 2, shape, generator=gen, device=device) * 2 - 1).to(dtype)


def rademacher_probe(params: Sequence[torch.Tensor], seed: int) -> list[torch.Tensor]:
    """One Rademacher (+-1) tensor per parameter, each drawn on that parameter's device (a model
    spread over devices by ``device_map`` included), from one generator per device seeded with
    ``seed``, in parameter order: on a single device, one stream through every tensor."""
    gens: dict[torch.device, torch.Generator] = {}
    out = []
    for p in params:
        if p.device not in gens:
            gens[p.device] = _generator(p.device, seed)
        out.append(_rademacher(p.shape, p.dtype, p.device, gens[p.device]))
    return out


def hutchinson_diagonal(model: nn.Module, refs: Sequence[ParamRef], calib: torch.Tensor,
                        opts: ScoreOptions, probes_per_pass: int = 8) -> list[torch.Tensor]:
    """Hutchinson estimate of diag(H) of the mean calibration loss: mean over Rademacher
    probes z of z * (H z), with H z from a Hessian-vector product (double backward).

    The gradient graph of each micro-batch is built once and reused by every probe; probe
    ``i`` draws the same z in every micro-batch (H z is linear in the loss, so the parts add).
    """
    params = [r.param for r in refs]
    n = opts.hutchinson_probes
    acc = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in params]

    def probe(i: int) -> list[torch.Tensor]:
        return rademacher_probe(params, opts.seed * 1_000_003 + i)

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


# --------------------------------------------------------------------------- activation metrics
# wanda (|w| ||x||_2) and act_contrib (max over tokens of |x_k w_jk|) need what each scored tensor
# multiplies. Every tensor has a role saying what that is; a tensor without one is refused.
#   linear, conv1d: the module's input channels (a pre-hook); router included
#   experts: per expert, the tokens routed to it, and for down_proj what it multiplies
#   norm_gain: x_hat, through the norm's output minus its bias (= x_hat * gain, per channel)
#   bias: an input of 1 on every token the module saw: |b| sqrt(tokens) and max |1 * b| = |b|
#   embedding: a one-hot input: row v sees 1 on each occurrence of token v
#   position_embedding: row p sees 1 at position p of every window (not token p)


def _activation_role(r: ParamRef) -> str | None:
    if r.layout == "vector":
        if r.leaf == "bias" and (r.param_type == "norm" or isinstance(r.module, nn.Linear)
                                 or type(r.module).__name__ == "Conv1D"):
            return "bias"
        return "norm_gain" if r.param_type == "norm" and r.leaf == "weight" else None
    if r.layout == "experts":
        return "experts" if experts_unsupported(r.module) is None else None
    return r.layout if r.layout in ("linear", "conv1d", "embedding", "position_embedding") else None


def _activation_unsupported(r: ParamRef) -> str | None:
    if _activation_role(r) is not None:
        return None
    if r.layout.startswith("experts"):
        return f"cannot recompute what its experts see ({experts_unsupported(r.module) or 'stored (E, in, out)'})"
    return f"no known input for a {r.layout} {r.leaf} of {type(r.module).__name__}"


def _stat(x: torch.Tensor, use_max: bool) -> torch.Tensor:
    """(tokens, C) -> (C,): max |x| or sum of squares over tokens, in float32."""
    xf = x.detach().float()
    return xf.abs().amax(0) if use_max else xf.square().sum(0)


def _fold(acc: torch.Tensor, new: torch.Tensor, use_max: bool) -> None:
    torch.maximum(acc, new, out=acc) if use_max else acc.add_(new)


class _ActivationStats:
    """What every scored module saw over the calibration forwards, through hooks.

    ``chan[id(param)]``: per input channel of a weight, max |x| (``use_max``) or the sum of
    squares over tokens: (in,) for a linear or Conv1D, (E, in) for fused experts (each over its
    own routed tokens), (C,) for a norm gain (its output minus bias). Zero where nothing was
    seen. ``tokens[id(module)]``: how many tokens (rows of its input) the module saw.
    """

    def __init__(self, refs: Sequence[ParamRef], use_max: bool) -> None:
        self.use_max = use_max
        self.chan: dict[int, torch.Tensor] = {}
        self.tokens: dict[int, int] = {}
        self.handles = []
        by_module: dict[int, list[ParamRef]] = {}
        for r in refs:
            by_module.setdefault(id(r.module), []).append(r)
        for group in by_module.values():
            module, is_norm = group[0].module, group[0].param_type == "norm"
            role_of = [(_activation_role(r), r) for r in group]
            roles = dict(role_of)  # one linear or conv1d weight per module
            self.tokens[id(module)] = 0
            for role, r in role_of:
                if role in ("linear", "conv1d"):
                    self.chan[id(r.param)] = torch.zeros(r.shape[r.in_dim], device=r.param.device)
                elif role == "norm_gain":
                    self.chan[id(r.param)] = torch.zeros(r.shape, device=r.param.device)
                elif role == "experts":
                    self.chan[id(r.param)] = torch.zeros(r.shape[0], r.shape[2], device=r.param.device)
            if "experts" in roles:
                self.handles.append(module.register_forward_pre_hook(self._experts_hook(module, group)))
            elif is_norm:
                self.handles.append(module.register_forward_hook(self._norm_hook(roles.get("norm_gain"))))
            elif roles.keys() & {"linear", "conv1d", "bias"}:
                w = roles.get("linear") or roles.get("conv1d")
                self.handles.append(module.register_forward_pre_hook(self._input_hook(w)))

    def _input_hook(self, w: ParamRef | None):
        def hook(module, args):
            x = args[0].reshape(-1, args[0].shape[-1])  # (tokens, in)
            self.tokens[id(module)] += x.shape[0]
            if w is not None:
                _fold(self.chan[id(w.param)], _stat(x, self.use_max), self.use_max)
        return hook

    def _norm_hook(self, gain: ParamRef | None):
        def hook(module, args, out):
            out = out[0] if isinstance(out, tuple) else out
            y = out.reshape(-1, out.shape[-1])
            self.tokens[id(module)] += y.shape[0]
            if gain is not None:
                bias = getattr(module, "bias", None)
                y = y - bias if isinstance(bias, torch.Tensor) else y  # = x_hat * gain
                _fold(self.chan[id(gain.param)], _stat(y, self.use_max), self.use_max)
        return hook

    def _experts_hook(self, module: nn.Module, group: Sequence[ParamRef]):
        gate_up = next((r for r in group if r.param is getattr(module, "gate_up_proj", None)), None)
        down = next((r for r in group if r.param is getattr(module, "down_proj", None)), None)

        def hook(module, args):
            hidden, top_k_index = args[0], args[1]  # (T, H), (T, k)
            self.tokens[id(module)] += hidden.shape[0]
            for e, x, h in expert_inputs(module, hidden, top_k_index):
                if gate_up is not None:
                    _fold(self.chan[id(gate_up.param)][e], _stat(x, self.use_max), self.use_max)
                if down is not None:
                    _fold(self.chan[id(down.param)][e], _stat(h, self.use_max), self.use_max)
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _row_counts(r: ParamRef, calib: torch.Tensor) -> torch.Tensor:
    """(rows,) how often each row of an embedding was looked up: token ids, or positions."""
    c = torch.zeros(r.shape[0], device=r.param.device)
    if r.layout == "position_embedding":  # every window uses positions 0..L-1 once
        c[: calib.shape[1]] = calib.shape[0]
        return c
    counts = torch.bincount(calib.reshape(-1))[: r.shape[0]]
    c[: len(counts)] = counts.to(c.device).float()
    return c


def _activation_scores(model, refs, calib, sink, opts, use_max: bool) -> None:
    stats = _ActivationStats(refs, use_max)
    try:
        for _ in _forward_only(model, calib, opts, "activations"):
            pass
    finally:
        stats.remove()
    norm = (lambda c: c) if use_max else torch.sqrt  # ||x||_2 from sums of squares
    seen = (lambda c: (c > 0).float()) if use_max else torch.sqrt  # a one-hot input: 1 or sqrt(count)
    for r in refs:
        role = _activation_role(r)
        chan = stats.chan.get(id(r.param))
        if role == "linear":
            s = _value(r).abs() * norm(chan)[None, :]
        elif role == "conv1d":
            s = _value(r).abs() * norm(chan)[:, None]
        elif role == "experts":
            s = _value(r).abs() * norm(chan)[:, None, :]
        elif role == "norm_gain":
            s = norm(chan).clone()  # ||x_hat * gain||: |gain| ||x_hat|| per channel
        elif role == "bias":
            t = stats.tokens[id(r.module)]
            s = _value(r).abs() * ((1.0 if t else 0.0) if use_max else math.sqrt(t))
        elif role in ("embedding", "position_embedding"):
            s = _value(r).abs() * seen(_row_counts(r, calib))[:, None]
        else:  # check_supported refused these before any work
            raise UnsupportedTensorError(f"{r.name}: {_activation_unsupported(r)}")
        sink(r, s)


def _forward_only(model, calib, opts, desc):
    for _, ids in _batches(model, calib, opts.micro_batch, opts, desc):
        yield logits_of(model, ids)


@metric("wanda", unsupported=_activation_unsupported,
        description="|w| * ||x_in||_2 of its input channel over calibration tokens "
                    "(a bias: |b| sqrt(tokens); experts: their routed tokens)")
def _wanda(model, refs, calib, sink, opts):
    _activation_scores(model, refs, calib, sink, opts, use_max=False)


@metric("act_contrib", unsupported=_activation_unsupported,
        description="max over tokens of |x_k * W_jk|, a weight's largest single contribution")
def _act_contrib(model, refs, calib, sink, opts):
    _activation_scores(model, refs, calib, sink, opts, use_max=True)
