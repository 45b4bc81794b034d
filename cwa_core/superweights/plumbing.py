"""Super weights: model plumbing (down projections, hooked forwards) and the streaming
statistics of one pass (max |x|, per-channel max, a log2 histogram for the median). Rows and
columns of a weight map to flat indices through :mod:`cwa_core.architectures` (flat_index)."""
from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from ..architectures import (ParamRef, UnsupportedArchitectureError, arch_spec, down_projections, matrix_shape,
                             scored_params)
from ..evaluate import logits_of, model_device
from ..perturb import PerturbSpec
from ..selection import Selection

ZERO = PerturbSpec("zero")

# |activation| histogram for the medians: log2 bins, 16 per octave, over [2^-64, 2^64]; values
# outside (zeros included) land in the end bins. A bin spans a factor 2^(1/16).
_LOG2_LO, _LOG2_HI, _PER_OCTAVE = -64.0, 64.0, 16
_BINS = int((_LOG2_HI - _LOG2_LO) * _PER_OCTAVE)
# activation entries reduced at once: bounds the float32 temporaries (64 MiB each) while keeping
# the kernel launches per batch few (an 8B model's (8, 2048, 14336) input: 14 chunks)
_CHUNK = 1 << 24


class _StopForward(Exception):
    """Raised by the deepest hook: later layers and the (B, L, V) logits are never computed."""


def _down_proj_refs(model: nn.Module) -> list[tuple[int, str, nn.Module, ParamRef]]:
    """(layer, module name, module, weight ref) of every down projection (architecture table)."""
    spec = arch_spec(model)
    if spec.down_proj is None:
        raise UnsupportedArchitectureError(
            f"super-weight detection does not support model_type {model.config.model_type!r}: a mixture of "
            "experts keeps all its experts' down projections in one fused 3-D parameter (transformers 5), "
            "with no module per expert to hook")
    projections = down_projections(model)
    by_module = {id(r.module): r for r in scored_params(model, ("mlp",)) if r.leaf == "weight"}
    out = []
    for layer, mod in projections:
        ref = by_module[id(mod)]
        if ref.in_dim is None:
            raise ValueError(f"{ref.name} is not a linear weight; cannot locate rows and columns")
        out.append((layer, f"{spec.layers}.{layer}.{spec.down_proj}", mod, ref))
    return out


def down_proj_shapes(model: nn.Module) -> dict[int, tuple[int, int]]:
    """layer -> (out channels, in channels) of its down projection (nn.Linear convention)."""
    return {layer: matrix_shape(ref.layout, ref.shape) for layer, _, _, ref in _down_proj_refs(model)}


def _selection(refs: Sequence[ParamRef], items: Sequence[tuple[int, int]]) -> Selection:
    """A selection of (tensor id, flat index) pairs, for :func:`perturbed`."""
    tids = torch.tensor([t for t, _ in items], dtype=torch.long)
    flat = torch.tensor([i for _, i in items], dtype=torch.long)
    return Selection("super_weight", "global", len(items), tids, flat, torch.full((len(items),), math.nan))


def _windows(prompts: torch.Tensor) -> torch.Tensor:
    if prompts.dim() == 1:
        prompts = prompts[None]
    if prompts.dim() != 2 or prompts.shape[1] < 1 or prompts.dtype != torch.long:
        raise ValueError(f"prompts must be an (N, L) int64 tensor of token ids, got {tuple(prompts.shape)} "
                         f"{prompts.dtype}")
    return prompts


def _forward_pass(model: nn.Module, windows: torch.Tensor, batch_size: int,
                  hooks: Mapping[nn.Module, Callable[[torch.Tensor, torch.Tensor, int], None]],
                  stop: nn.Module) -> None:
    """Run ``windows`` through the model; ``hooks[m](x_in, y_out, first_window)`` sees each hooked
    module's (B, L, C) input and output. The forward ends after module ``stop``."""
    offset = [0]

    def make(fn, is_stop):
        def hook(module, args, out):
            fn(args[0].detach(), (out[0] if isinstance(out, tuple) else out).detach(), offset[0])
            if is_stop:
                raise _StopForward
        return hook

    handles = [m.register_forward_hook(make(fn, m is stop)) for m, fn in hooks.items()]
    device = model_device(model)
    try:
        with torch.no_grad():
            for s in range(0, windows.shape[0], batch_size):
                offset[0] = s
                try:
                    logits_of(model, windows[s:s + batch_size].to(device))
                except _StopForward:
                    pass
    finally:
        for h in handles:
            h.remove()


# --------------------------------------------------------------------------- streaming statistics


class _Spikes:
    """Running max |x| (with where), per-channel max |x| and a log2 histogram of one layer's
    input or output over a pass; memory: one (C,) vector and _BINS counts."""

    def __init__(self) -> None:
        self.max = -1.0
        self.where = (-1, -1, -1)  # (channel, window, position)
        self.signed = math.nan  # x at the max
        self.chan: torch.Tensor | None = None
        self.hist: torch.Tensor | None = None

    def update(self, x: torch.Tensor, offset: int) -> bool:
        """Fold in a (B, L, C) batch whose first window is ``offset``; True if the max moved."""
        b, length, c = x.shape
        flat = x.reshape(-1, c)
        if self.hist is None:
            self.hist = torch.zeros(_BINS, dtype=torch.float64, device=x.device)
            self.chan = torch.zeros(c, dtype=torch.float32, device=x.device)
        tok_max, tok_arg = [], []
        rows = max(1, _CHUNK // c)
        for s in range(0, flat.shape[0], rows):
            a = flat[s:s + rows].abs().float()  # (rows, C)
            # histc leaves NaN out; log2(0) = -inf and inf clamp into the end bins
            self.hist += torch.histc(torch.log2(a).clamp_(_LOG2_LO, _LOG2_HI), _BINS, _LOG2_LO, _LOG2_HI).double()
            a.nan_to_num_(nan=-1.0, posinf=math.inf)  # NaN is never a spike; inf is one
            m, i = a.max(dim=1)
            tok_max.append(m)
            tok_arg.append(i)
            torch.maximum(self.chan, a.amax(dim=0), out=self.chan)
        tm = torch.cat(tok_max)
        t = int(tm.argmax())
        best = float(tm[t])
        if best <= self.max:
            return False
        ch = int(torch.cat(tok_arg)[t])
        self.max = best
        self.where = (ch, offset + t // length, t % length)
        self.signed = float(flat[t, ch])
        return True

    def median(self) -> float:
        h = self.hist.cpu()
        total = float(h.sum())
        if total == 0:
            return math.nan
        b = int(torch.searchsorted(torch.cumsum(h, 0), (total + 1) // 2))  # lower middle entry
        return 0.0 if b == 0 else 2.0 ** (_LOG2_LO + (b + 0.5) / _PER_OCTAVE)


class _LayerPass:
    """Both sides of one down projection in one pass, and the input row at the output spike."""

    def __init__(self) -> None:
        self.x = _Spikes()
        self.y = _Spikes()
        self.x_at_out_max: torch.Tensor | None = None  # (in channels,) at the output spike's token

    def __call__(self, x: torch.Tensor, y: torch.Tensor, offset: int) -> None:
        self.x.update(x, offset)
        if self.y.update(y, offset):
            _, w, p = self.y.where
            self.x_at_out_max = x[w - offset, p].float().clone()


def _threshold(ratio: float, floor: float, median: float) -> float:
    return max(floor, ratio * median) if not math.isnan(median) else math.nan
