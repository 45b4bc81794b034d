"""Random bit errors in stored weights (issue 17, the ``bit_errors`` campaign's draw).

Every stored bit of the chosen bit class (``all``, ``sign``, ``exponent``, ``mantissa``) of
``n`` weights is flipped independently with probability ``rate``: the number of flips is
Binomial(n x bits per weight, rate), and their positions are uniform without replacement among
those bits. Both are drawn without materialising anything of the size of the model (at 8B
weights and rate 1e-7 that is ~13,000 flips among 1.3e11 bits): a count, then that many
distinct positions. A protected set is left out *after* the draw, so every arm of a trial
(each protected set) sees the same errors outside its own set: the paired design.

Flips are applied with XOR on the stored integer representation, so applying the same draw
twice restores every bit (several flips of one weight are combined into one mask first).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .perturb import EXPONENT_MSB, int_view

BIT_CLASSES = ("all", "sign", "exponent", "mantissa")


def bit_positions(dtype: torch.dtype, bits: str = "all") -> np.ndarray:
    """The bit indices (0 = least significant) of ``bits`` in a stored ``dtype`` value, ascending.
    IEEE 754 layout: the sign is the top bit, the exponent the bits below it down to the mantissa
    width (fp32: 23..30, fp16: 10..14, bf16: 7..14), the mantissa the rest."""
    if dtype not in EXPONENT_MSB:
        raise ValueError(f"bit errors: dtype {dtype} has no bit layout here; allowed: "
                         f"{', '.join(str(d).removeprefix('torch.') for d in EXPONENT_MSB)}")
    if bits not in BIT_CLASSES:
        raise ValueError(f"bits: unknown {bits!r}; allowed: {', '.join(BIT_CLASSES)}")
    width = torch.finfo(dtype).bits
    mantissa = int(round(-math.log2(torch.finfo(dtype).eps)))  # stored fraction bits: 2^-m = eps
    ranges = {"all": range(width), "sign": range(width - 1, width),
              "exponent": range(mantissa, width - 1), "mantissa": range(mantissa)}
    return np.asarray(ranges[bits], dtype=np.int64)


@dataclass(frozen=True)
class BitErrors:
    """One draw: flip ``bits[i]`` of weight ``index[i]`` (flat index over the weights drawn on),
    sorted by (index, bit), each (index, bit) once."""

    index: np.ndarray  # int64
    bits: np.ndarray  # int64

    def __len__(self) -> int:
        return int(self.index.size)

    def outside(self, protected: np.ndarray) -> "BitErrors":
        """The flips that do not hit the ``protected`` flat indices (the same draw, less them)."""
        keep = ~np.isin(self.index, np.asarray(protected, dtype=np.int64))
        return BitErrors(self.index[keep], self.bits[keep])

    def hits(self, protected: np.ndarray) -> int:
        """How many flips fall on the ``protected`` flat indices."""
        return int(np.isin(self.index, np.asarray(protected, dtype=np.int64)).sum())


def draw(n_weights: int, dtype: torch.dtype, rate: float, rng: np.random.Generator, *,
         bits: str = "all") -> BitErrors:
    """Independent errors at ``rate`` per stored bit of class ``bits`` over ``n_weights`` weights."""
    if not (isinstance(rate, (int, float)) and 0 <= rate <= 1):
        raise ValueError(f"error_rate: must be a number in [0, 1], got {rate!r}")
    allowed = bit_positions(dtype, bits)
    total = int(n_weights) * allowed.size
    count = int(rng.binomial(total, rate)) if total else 0
    flat = _distinct(total, count, rng)
    index, which = np.divmod(flat, allowed.size)
    return BitErrors(index, allowed[which])


def _distinct(total: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` distinct integers uniform in [0, total), sorted, in O(count) memory."""
    if count > total // 2:  # dense: choose among all (only for small totals at high rates)
        return np.sort(rng.choice(total, size=count, replace=False)).astype(np.int64)
    out = np.unique(rng.integers(0, total, size=count, dtype=np.int64))
    while out.size < count:  # collisions are rare when count << total; draw the missing ones again
        out = np.unique(np.concatenate([out, rng.integers(0, total, size=count - out.size, dtype=np.int64)]))
    return out


def combined(errors: BitErrors) -> tuple[np.ndarray, np.ndarray]:
    """(the distinct weight indices of ``errors``, ascending; one int64 XOR mask each): several
    flips of one weight are XORed together first."""
    if len(errors) == 0:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
    masks = np.left_shift(np.int64(1), errors.bits)
    starts = np.flatnonzero(np.concatenate([[True], errors.index[1:] != errors.index[:-1]]))
    return errors.index[starts], np.bitwise_xor.reduceat(masks, starts)


def xor_masks(flat: torch.Tensor, index: np.ndarray, masks: np.ndarray) -> None:
    """``flat[index] ^= masks`` on the stored bits (``flat`` a 1-D view in its own dtype, ``index``
    distinct, ``masks`` from :func:`combined`). Doing it twice restores every bit."""
    if index.size == 0:
        return
    iv = int_view(flat)
    idx = torch.from_numpy(index).to(iv.device)
    iv[idx] = iv[idx] ^ torch.from_numpy(signed(masks, iv.element_size() * 8)).to(device=iv.device, dtype=iv.dtype)


def signed(masks: np.ndarray, width: int) -> np.ndarray:
    """int64 XOR masks of ``width``-bit words as the signed integers of that width's view (a mask
    with the top bit set is negative there); int64 masks are signed already."""
    return masks if width >= 64 else np.where(masks >= 1 << (width - 1), masks - (1 << width), masks)


def apply(flat: torch.Tensor, errors: BitErrors) -> None:
    """XOR the draw into ``flat`` (a 1-D view of the weights drawn on, in their own dtype).
    Applying the same draw again restores every bit."""
    xor_masks(flat, *combined(errors))
