"""Round-to-nearest (RTN) symmetric quantization with a protected set (issue 17, ``quantize``).

Absmax quantization (Dettmers et al. 2022, "LLM.int8()", §2, "absmax quantization"): a group of
weights shares the scale ``s = max |w| / qmax``, ``qmax = 2^(bits-1) - 1``, and each weight becomes
``clamp(round(w / s), -qmax, qmax) * s``, dequantized back to w's dtype (the model runs as
before, on quantized values). ``torch.round`` rounds half to even (2.5 -> 2, 1.5 -> 2, -0.5 -> -0).

Protected weights keep their stored value bit for bit and are left out of their group's scale:
the super-weight paper's handling (Yu et al. 2024, "The Super Weight in Large Language Models",
§4, super-outlier aware quantization: the super weight is held out of the quantization and
restored afterwards, so it does not set the scale of the weights around it). Non-finite weights (inf, NaN) are treated
the same way: kept as they are and left out of the scale (an inf would make the scale inf and
every other weight of its group 0 or NaN). A group whose scale is 0 (its counted weights are all
zero, it has none, or their absmax / qmax underflows: subnormals) is left unchanged.

Groups follow the rows of the weight as a matrix ``(outputs, inputs)`` (:func:`to_rows`):
``tensor`` (one scale), ``row`` (one scale per output), or ``N`` (a positive integer: N consecutive
weights of a row along the input dimension; a row of n inputs has ceil(n / N) groups, the last one
shorter, n mod N weights, when N does not divide n).
"""
from __future__ import annotations

import numbers

import torch

GROUPS = ("tensor", "row")  # or a positive integer: weights per group along the input dimension


def to_rows(t: torch.Tensor, in_dim: int | None) -> torch.Tensor:
    """``t`` as a matrix (rows, inputs): axis ``in_dim`` last, every other axis flattened into rows
    (one row per output; per expert and output for 3-D experts tensors). ``in_dim`` None: the last
    axis is the input (a 1-D tensor is one row; an embedding one row per token; fused experts
    stored (E, out, in) one row per expert output; pass ``in_dim=1`` for (E, in, out))."""
    if t.dim() == 0:
        raise ValueError("a 0-d tensor has no rows")
    axis = t.dim() - 1 if in_dim is None else in_dim
    if not -t.dim() <= axis < t.dim():
        raise ValueError(f"in_dim: {in_dim} is not an axis of a tensor of shape {tuple(t.shape)}")
    return t.movedim(axis, -1).reshape(-1, t.shape[axis])


def from_rows(m: torch.Tensor, like: torch.Tensor, in_dim: int | None) -> torch.Tensor:
    """The inverse of :func:`to_rows`: a (rows, inputs) matrix back in the shape of ``like``."""
    axis = like.dim() - 1 if in_dim is None else in_dim
    moved = like.movedim(axis, -1).shape
    return m.reshape(moved).movedim(-1, axis)


def parse_group(text: str | int) -> str | int:
    """``"tensor"``, ``"row"``, or the group size N from ``"N"`` (a positive integer as text)."""
    if isinstance(text, str) and text in GROUPS:
        return text
    if isinstance(text, numbers.Integral) and not isinstance(text, bool) and text > 0:
        return int(text)
    if isinstance(text, str) and text.isascii() and text.isdigit() and int(text) > 0:
        return int(text)
    raise ValueError(f"quant_group: unknown {text!r}; allowed: tensor, row or a positive integer")


def check_mask(protected: torch.Tensor | None, shape: torch.Size) -> None:
    """A protected set as a bool mask of the weights' shape (or None: nothing protected)."""
    if protected is not None and (protected.shape != shape or protected.dtype != torch.bool):
        raise ValueError(f"protected: must be a bool mask of shape {tuple(shape)}, got "
                         f"{protected.dtype} {tuple(protected.shape)}")


def check_bits(bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral) or not 2 <= bits <= 8:
        raise ValueError(f"quant_bits: must be an integer in 2..8, got {bits!r}")
    return int(bits)


def _groups(x: torch.Tensor, keep: torch.Tensor, group: str | int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, keep) (rows, cols) reshaped so that every row is one group: group N pads each row with
    zeros (never a group's max, dropped again afterwards) to a multiple of N and cuts it in rows of N."""
    if group == "tensor":
        return x.reshape(1, -1), keep.reshape(1, -1)
    if group == "row":
        return x, keep
    pad = -x.shape[1] % group
    if pad:
        x = torch.cat([x, x.new_zeros(x.shape[0], pad)], dim=1)
        keep = torch.cat([keep, keep.new_ones(keep.shape[0], pad)], dim=1)
    return x.reshape(-1, group), keep.reshape(-1, group)


def rtn(w: torch.Tensor, bits: int, group: str | int, *, protected: torch.Tensor | None = None,
        in_dim: int | None = 1) -> torch.Tensor:
    """``w`` quantized to ``bits`` by symmetric RTN in groups ``group`` and dequantized, in w's dtype
    (``w`` is not modified; the arithmetic is float32). ``protected`` (bool, w's shape): weights
    kept bit for bit and left out of their group's scale. ``in_dim``: the input axis (1 for
    nn.Linear, 0 for GPT-2's Conv1D, None: the last axis, see :func:`to_rows`)."""
    qmax = 2 ** (check_bits(bits) - 1) - 1
    group = parse_group(group)
    check_mask(protected, w.shape)
    if w.numel() == 0:
        return w.detach().clone()
    x = to_rows(w.detach(), in_dim).float()  # (rows, inputs)
    rows, cols = x.shape
    keep = ~torch.isfinite(x)  # kept as they are and out of the scale: non-finite and protected
    if protected is not None:
        keep |= to_rows(protected, in_dim)
    x, keep = _groups(x, keep, group)  # (groups, size)
    scale = torch.where(keep, 0.0, x.abs()).amax(dim=1, keepdim=True).div_(qmax)  # (groups, 1)
    keep |= scale == 0  # nothing counted, only zeros, or an absmax so small that absmax / qmax underflows
    q = x.div(torch.where(scale == 0, 1.0, scale)).round_().clamp_(-qmax, qmax).mul_(scale)  # x may view w
    q = q.reshape(rows, -1)[:, :cols].to(w.dtype)
    keep = keep.reshape(rows, -1)[:, :cols]
    return torch.where(from_rows(keep, w, in_dim), w.detach(), from_rows(q, w, in_dim)).contiguous()
