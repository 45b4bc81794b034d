"""Perturbations as context managers that restore the touched entries bit for bit.

Only the selected entries' raw bits are saved (never a copy of the model). On exit they are
written back through an integer view of the storage, so even NaN payloads and -0.0 survive.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from typing import Callable, Iterator, Sequence

import torch

from .architectures import ParamRef
from .registry import Registry
from .selection import Selection

_INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16,
             torch.bfloat16: torch.int16, torch.float64: torch.int64}
# Highest exponent bit of each format (sign bit is the top bit, the exponent just below it).
EXPONENT_MSB = {torch.float32: 30, torch.float16: 14, torch.bfloat16: 14, torch.float64: 62}


@dataclass(frozen=True)
class PerturbSpec:
    method: str
    scale: float | None = None  # gauss_noise: relative std; scale: the factor
    bit: int | None = None  # bit_flip: which bit (default: the exponent's highest)
    seed: int = 0  # gauss_noise draws

    def resolved(self) -> "PerturbSpec":
        p = PERTURBATIONS.get(self.method)
        scale = self.scale if self.scale is not None else p.default_scale
        if p.needs_scale and scale is None:
            raise ValueError(f"perturbation {self.method!r} needs a scale")
        return replace(self, scale=scale if p.needs_scale else None)


@dataclass(frozen=True)
class Perturbation:
    name: str
    apply: Callable[[torch.Tensor, torch.Tensor, PerturbSpec], None]  # (flat param, idx, spec)
    needs_scale: bool
    default_scale: float | None
    description: str


PERTURBATIONS: Registry[Perturbation] = Registry("perturbation")


def perturbation(name: str, *, needs_scale: bool = False, default_scale: float | None = None, description: str = ""):
    def deco(fn):
        PERTURBATIONS.add(name, Perturbation(name, fn, needs_scale, default_scale, description))
        return fn
    return deco


def int_view(flat: torch.Tensor) -> torch.Tensor:
    try:
        return flat.view(_INT_VIEW[flat.dtype])
    except KeyError:
        raise TypeError(f"cannot perturb tensors of dtype {flat.dtype}") from None


@perturbation("zero", description="w -> 0")
def _zero(flat, idx, spec):
    flat[idx] = 0


@perturbation("sign_flip", description="w -> -w")
def _sign_flip(flat, idx, spec):
    flat[idx] = -flat[idx]


@perturbation("scale", needs_scale=True, default_scale=10.0, description="w -> w * scale")
def _scale(flat, idx, spec):
    flat[idx] = flat[idx] * spec.scale


@perturbation("gauss_noise", needs_scale=True, default_scale=1.0,
              description="w -> w + N(0,1) * scale * |w|")
def _gauss_noise(flat, idx, spec):
    gen = torch.Generator(device=flat.device).manual_seed(spec.seed)
    w = flat[idx].float()
    noise = torch.randn(w.shape, generator=gen, device=flat.device)
    flat[idx] = (w + noise * spec.scale * w.abs()).to(flat.dtype)


def flip_bit(flat: torch.Tensor, idx: torch.Tensor, bit: int) -> None:
    """XOR one bit of the stored representation of ``flat[idx]`` (in its own dtype)."""
    iv = int_view(flat)
    nbits = iv.element_size() * 8
    if not 0 <= bit < nbits:
        raise ValueError(f"bit {bit} out of range for {flat.dtype}: allowed 0..{nbits - 1}")
    mask = torch.tensor(1 << bit if bit < nbits - 1 else -(1 << bit), dtype=iv.dtype, device=iv.device)
    iv[idx] = iv[idx] ^ mask


@perturbation("bit_flip", description="flip one bit of the stored value (default: exponent MSB)")
def _bit_flip(flat, idx, spec):
    flip_bit(flat, idx, EXPONENT_MSB[flat.dtype] if spec.bit is None else spec.bit)


@contextlib.contextmanager
def perturbed(refs: Sequence[ParamRef], selection: Selection, spec: PerturbSpec) -> Iterator[int]:
    """Apply ``spec`` to the selected weights; restore exactly those entries on exit.

    Yields the number of weights touched.
    """
    spec = spec.resolved()
    method = PERTURBATIONS.get(spec.method)
    saved: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    touched = 0
    try:
        with torch.no_grad():
            for tid, idx in selection.by_tensor().items():
                p = refs[tid].param
                if not p.is_contiguous():
                    raise ValueError(f"{refs[tid].name} is not contiguous; cannot perturb in place")
                flat = p.data.view(-1)
                idx = idx.to(flat.device)
                saved.append((flat, idx, int_view(flat)[idx]))  # indexing copies: the original bits
                # distinct seeds per tensor so noise is not the same pattern everywhere
                method.apply(flat, idx, replace(spec, seed=spec.seed * 1_000_003 + tid))
                touched += idx.numel()
        yield touched
    finally:
        with torch.no_grad():
            for flat, idx, bits in reversed(saved):
                int_view(flat)[idx] = bits
