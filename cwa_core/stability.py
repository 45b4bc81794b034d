"""Stability of a metric across seeds: Jaccard of top-K sets, Spearman of scores.

The arithmetic lives in :mod:`cwa_core.numerics` (shared with ``analysis/``); this module
takes tensors and pairs seeds. Degenerate inputs have decided answers (tests/test_degenerate.py):
- ``jaccard``: two empty sets are identical (1.0); one empty set against a non-empty one 0.0.
- ``spearman``: a pair with NaN on either side is excluded (a failed score says nothing about
  order; how many is logged); +-inf are ordinary extreme values (+inf ranks first); NaN when
  fewer than two pairs remain or either side is constant (undefined, not 0 or 1).
- ``pairwise``: fewer than two seeds give no pairs and mean/min/max NaN.
"""
from __future__ import annotations

import logging
import math
from itertools import combinations
from typing import Callable, Sequence

import numpy as np
import torch

from . import numerics
from .numerics import average_ranks  # noqa: F401  (re-exported: its home was here)

log = logging.getLogger(__name__)


def jaccard(a: torch.Tensor, b: torch.Tensor) -> float:
    """|A ∩ B| / |A ∪ B| of two 1-D tensors of ids (as sets: a repeated id counts once).
    Both empty: 1.0 (the same set)."""
    return numerics.jaccard(a.cpu().numpy(), b.cpu().numpy())


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two equally long 1-D tensors (:func:`numerics.spearman`:
    average ranks for ties, NaN pairs left out, NaN where undefined)."""
    x, y = a.cpu().double().numpy().ravel(), b.cpu().double().numpy().ravel()
    if x.size != y.size:
        raise ValueError(f"spearman: the two score samples differ in length ({x.size} vs {y.size}); "
                         "they must score the same weights")
    rho, n = numerics.spearman(x, y)
    if n < x.size:
        log.warning("spearman: %d of %d pairs have a NaN score and are left out", x.size - n, x.size)
    return rho


def pairwise(values: Sequence, seeds: Sequence[int], fn: Callable[..., float]) -> dict:
    """``fn`` over every unordered pair of seeds (not just neighbours), with mean/min/max over the
    pairs whose value is not NaN (:func:`numerics.spread`); NaN summaries when there is no such
    pair (e.g. one seed)."""
    if len(values) != len(seeds):
        raise ValueError(f"pairwise: {len(values)} values for {len(seeds)} seeds; need one per seed")
    pairs = [{"a": seeds[i], "b": seeds[j], "value": fn(values[i], values[j])}
             for i, j in combinations(range(len(seeds)), 2)]
    s = numerics.spread(np.array([p["value"] for p in pairs], dtype=float))
    return {"pairs": pairs, **{k: math.nan if s[k] is None else s[k] for k in ("mean", "min", "max")}}
