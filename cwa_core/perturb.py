"""Perturbations as context managers that restore the touched entries bit for bit.

Only the selected entries' raw bits are saved (never a copy of the model). On exit they are
written back through an integer view of the storage, so even NaN payloads and -0.0 survive.

Arithmetic perturbations act on a tensor's effective value: for Gemma's norms (which multiply
by 1 + w) on the gain 1 + w, so zero gives a gain of 0 and sign_flip a gain of -(1 + w).
bit_flip acts on the stored bits whatever they mean (a hardware fault model).
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
    scale: float | None = None  # the perturbation's scale (see each one's description)
    bit: int | None = None  # bit_flip: which bit (default: the exponent's highest)
    seed: int = 0  # gauss_noise draws

    def resolved(self) -> "PerturbSpec":
        p = PERTURBATIONS.get(self.method)
        scale = self.scale if self.scale is not None else p.default_scale
        if p.takes_scale and scale is None:
            raise ValueError(f"perturbation {self.method!r} needs a scale")
        return replace(self, scale=scale if p.takes_scale else None)


@dataclass(frozen=True)
class Perturbation:
    """A registered perturbation. ``on_bits`` False: ``fn(values, spec) -> new values`` acts on
    the effective values (float32, or float64 for float64 tensors), offset included (Gemma's norm
    gains 1 + w), and the result is stored back in the tensor's dtype. ``on_bits`` True:
    ``fn(flat, idx, spec)`` edits the stored representation in place (a hardware fault model:
    offsets do not apply)."""

    name: str
    fn: Callable
    takes_scale: bool
    default_scale: float | None
    on_bits: bool
    description: str

    def apply(self, flat: torch.Tensor, idx: torch.Tensor, spec: PerturbSpec, offset: float = 0.0) -> None:
        """Perturb ``flat[idx]`` (a flat view of a parameter, (n,) indices) in place."""
        if self.on_bits:
            self.fn(flat, idx, spec)
            return
        work = torch.float64 if flat.dtype == torch.float64 else torch.float32
        v = flat[idx].to(work)
        if offset:
            flat[idx] = (self.fn(v + offset, spec) - offset).to(flat.dtype)
        else:
            flat[idx] = self.fn(v, spec).to(flat.dtype)


PERTURBATIONS: Registry[Perturbation] = Registry("perturbation")


def perturbation(name: str, *, takes_scale: bool = False, default_scale: float | None = None,
                 on_bits: bool = False, description: str = ""):
    def deco(fn):
        PERTURBATIONS.add(name, Perturbation(name, fn, takes_scale, default_scale, on_bits, description))
        return fn
    return deco


def int_view(flat: torch.Tensor) -> torch.Tensor:
    try:
        return flat.view(_INT_VIEW[flat.dtype])
    except KeyError:
        raise TypeError(f"cannot perturb tensors of dtype {flat.dtype}") from None


@perturbation("zero", description="w -> 0 (takes no scale)")
def _zero(w, spec):
    return torch.zeros_like(w)


@perturbation("sign_flip", takes_scale=True, default_scale=1.0,
              description="w -> -scale * w (scale default 1.0: the plain sign flip)")
def _sign_flip(w, spec):
    return -w if spec.scale == 1.0 else w * -spec.scale  # negation: exact for NaN payloads too


@perturbation("scale", takes_scale=True, default_scale=10.0, description="w -> scale * w (scale default 10)")
def _scale(w, spec):
    return w * spec.scale


@perturbation("gauss_noise", takes_scale=True, default_scale=1.0,
              description="w -> w + N(0,1) * scale * |w| (scale: the noise's std relative to |w|, default 1.0)")
def _gauss_noise(w, spec):
    gen = torch.Generator(device=w.device).manual_seed(spec.seed)
    noise = torch.randn(w.shape, generator=gen, device=w.device)  # float32 draws whatever the dtype
    return w + noise.to(w.dtype) * spec.scale * w.abs()


def check_bit(bit: int | None, dtype: torch.dtype) -> int:
    """The bit bit_flip flips in tensors of ``dtype``: ``bit``, or by default the exponent's
    highest (30 for float32, 14 for float16 and bfloat16). Raises ValueError (one line) for a
    bit outside the dtype's width or a dtype that cannot be perturbed."""
    if dtype not in EXPONENT_MSB:
        raise ValueError(f"bit_flip cannot flip bits of dtype {dtype}; allowed: "
                         f"{', '.join(str(d).removeprefix('torch.') for d in EXPONENT_MSB)}")
    if bit is None:
        return EXPONENT_MSB[dtype]
    nbits = torch.finfo(dtype).bits
    if isinstance(bit, bool) or not isinstance(bit, int) or not 0 <= bit < nbits:
        raise ValueError(f"bit {bit!r} out of range for {str(dtype).removeprefix('torch.')}: allowed 0..{nbits - 1}")
    return bit


def flip_bit(flat: torch.Tensor, idx: torch.Tensor, bit: int) -> None:
    """XOR one bit of the stored representation of ``flat[idx]`` (in its own dtype)."""
    iv = int_view(flat)
    nbits = iv.element_size() * 8
    bit = check_bit(bit, flat.dtype)
    mask = torch.tensor(1 << bit if bit < nbits - 1 else -(1 << bit), dtype=iv.dtype, device=iv.device)
    iv[idx] = iv[idx] ^ mask


@perturbation("bit_flip", on_bits=True,
              description="flip one bit of the stored value (--perturb-bit, default the exponent MSB; "
                          "takes no scale; Gemma's norm gains too: the stored bits, a hardware fault)")
def _bit_flip(flat, idx, spec):
    flip_bit(flat, idx, spec.bit)  # flip_bit resolves the default bit and checks it against the dtype


def flipped_bit(refs: Sequence[ParamRef], selection: Selection, spec: PerturbSpec) -> int | list[int] | None:
    """The bit ``spec`` flips in the selected tensors (None unless bit_flip; a sorted list if
    their dtypes resolve the default differently)."""
    if not PERTURBATIONS.get(spec.method).on_bits:
        return None
    bits = sorted({check_bit(spec.bit, refs[t].param.dtype) for t in torch.unique(selection.tensor_ids).tolist()})
    if not bits:
        return spec.bit
    return bits[0] if len(bits) == 1 else bits


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
                method.apply(flat, idx, replace(spec, seed=spec.seed * 1_000_003 + tid), refs[tid].offset)
                touched += idx.numel()
        yield touched
    finally:
        with torch.no_grad():
            for flat, idx, bits in reversed(saved):
                int_view(flat)[idx] = bits
            # check, not hope: a model left perturbed would corrupt every later number silently
            if not _all_restored(saved):
                for flat, idx, bits in saved:
                    if not torch.equal(int_view(flat)[idx], bits):
                        raise PerturbationLeakError(f"{int((int_view(flat)[idx] != bits).sum())} of {idx.numel()} "
                                                    "perturbed weights do not hold their original bits after restoring")


def _all_restored(saved: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> bool:
    """Whether every (flat, idx, bits) holds its saved bits again (:func:`all_equal`)."""
    return all_equal([(int_view(flat)[idx], bits) for flat, idx, bits in saved])


def all_equal(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> bool:
    """Whether each (now, saved) pair of tensors is equal everywhere: the comparisons stay on each
    device and are read back once per device, not once per tensor (a GPU sync each)."""
    per_device: dict[torch.device, list[torch.Tensor]] = {}
    for now, saved in pairs:
        per_device.setdefault(now.device, []).append((now == saved).all())
    return all(bool(torch.stack(oks).all()) for oks in per_device.values())


class PerturbationLeakError(RuntimeError):
    """Weights could not be restored bit for bit: the model can no longer be trusted (a sweep's
    actor that raises it is replaced, and reloads its model)."""
