"""Stability of a metric across seeds: Jaccard of top-K sets, Spearman of scores.

Degenerate inputs have decided answers (tests/test_degenerate.py):
- ``jaccard``: two empty sets are identical (1.0); one empty set against a non-empty one 0.0.
- ``spearman``: a pair with NaN on either side is excluded (a failed score says nothing about
  order; how many is logged); +-inf are ordinary extreme values (+inf ranks first); NaN when
  fewer than two pairs remain or either side is constant (undefined, not 0 or 1).
- ``pairwise``: fewer than two seeds give no pairs and mean/min/max NaN (null in the JSON).
"""
from __future__ import annotations

import logging
from itertools import combinations
from typing import Callable, Sequence

import numpy as np
import torch

log = logging.getLogger(__name__)


def jaccard(a: torch.Tensor, b: torch.Tensor) -> float:
    """|A ∩ B| / |A ∪ B| of two 1-D tensors of ids (as sets: a repeated id counts once).
    Both empty: 1.0 (the same set)."""
    a_np, b_np = np.unique(a.cpu().numpy()), np.unique(b.cpu().numpy())
    inter = np.intersect1d(a_np, b_np, assume_unique=True).size
    union = a_np.size + b_np.size - inter
    return 1.0 if union == 0 else inter / union


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties given the mean of the ranks they span (``scipy.stats.rankdata``'s
    default), vectorised; kept here so that a worker does not import scipy (half a second).
    ``x`` must hold no NaN (NaN != NaN would make every NaN its own rank); +-inf are fine."""
    order = np.argsort(x, kind="stable")
    xs = x[order]
    new = np.empty(xs.size, dtype=bool)
    new[:1] = True
    new[1:] = xs[1:] != xs[:-1]
    starts = np.flatnonzero(new)
    ends = np.append(starts[1:], xs.size)  # exclusive
    ranks = np.empty(xs.size, dtype=np.float64)
    ranks[order] = ((starts + ends + 1) / 2.0)[np.cumsum(new) - 1]
    return ranks


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two equally long 1-D tensors (average ranks for ties).

    Pairs with a NaN on either side are left out; NaN if fewer than two pairs remain or
    either side is constant over them (see the module docstring).
    """
    x, y = a.cpu().double().numpy().ravel(), b.cpu().double().numpy().ravel()
    if x.size != y.size:
        raise ValueError(f"spearman: the two score samples differ in length ({x.size} vs {y.size}); "
                         "they must score the same weights")
    keep = ~(np.isnan(x) | np.isnan(y))
    if not keep.all():
        log.warning("spearman: %d of %d pairs have a NaN score and are left out", int((~keep).sum()), x.size)
        x, y = x[keep], y[keep]
    if x.size < 2:
        return float("nan")
    ra, rb = average_ranks(x), average_ranks(y)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    # ranks are finite even where scores are inf, so the correlation itself is well defined
    return float(np.clip(np.corrcoef(ra, rb)[0, 1], -1.0, 1.0))


def pairwise(values: Sequence, seeds: Sequence[int], fn: Callable[..., float]) -> dict:
    """``fn`` over every unordered pair of seeds (not just neighbours), with mean/min/max over the
    pairs whose value is not NaN; NaN summaries when there is no such pair (e.g. one seed)."""
    if len(values) != len(seeds):
        raise ValueError(f"pairwise: {len(values)} values for {len(seeds)} seeds; need one per seed")
    pairs = [{"a": seeds[i], "b": seeds[j], "value": fn(values[i], values[j])}
             for i, j in combinations(range(len(seeds)), 2)]
    vals = np.array([p["value"] for p in pairs], dtype=float)
    ok = vals[~np.isnan(vals)]
    if not ok.size:
        return {"pairs": pairs, "mean": float("nan"), "min": float("nan"), "max": float("nan")}
    lo, hi = float(ok.min()), float(ok.max())
    # the float mean of equal values can land one ulp outside them: keep mean within [min, max]
    return {"pairs": pairs, "mean": min(max(float(ok.mean()), lo), hi), "min": lo, "max": hi}
