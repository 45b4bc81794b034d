"""Small numerics shared by the science (``cwa_core``) and the analysis: set overlap, rank
correlation, the spread of a few values, and an exp that overflows to +inf.

Numpy and the standard library only (no torch, no scipy: a Ray worker does not pay half a
second for scipy, and ``analysis/`` never imports torch). Degenerate inputs have decided
answers (tests/test_numerics.py, tests/test_degenerate.py):

- :func:`jaccard`: two empty sets are identical (1.0); one empty set against a non-empty one 0.0.
- :func:`spearman`: Spearman's rho as ``scipy.stats.spearmanr`` defines it (to the last ulp or
  two: the arithmetic is the one ``cwa_core.stability`` has always used, so recorded stability
  values stay bit for bit what they were): the Pearson correlation of average ranks (ties share the mean of the ranks they span). A pair
  with NaN on either side is left out (a failed score says nothing about order); +-inf are
  ordinary extreme values (+inf ranks first); NaN when fewer than two pairs remain or either
  side is constant over them (undefined, not 0 or 1).
- :func:`spread`: summaries of the non-NaN values; None where undefined (no value; ``sd`` of one).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def jaccard(a, b, *, assume_unique: bool = False) -> float:
    """|A ∩ B| / |A ∪ B| of two 1-D arrays of ids, as sets (a repeated id counts once; with
    ``assume_unique`` the caller promises sorted unique ids and they are used as they are).
    Both empty: 1.0 (the same set)."""
    a, b = np.asarray(a), np.asarray(b)
    if not assume_unique:
        a, b = np.unique(a), np.unique(b)
    inter = np.intersect1d(a, b, assume_unique=True).size
    union = a.size + b.size - inter
    return 1.0 if union == 0 else inter / union


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties given the mean of the ranks they span (``scipy.stats.rankdata``'s
    default), vectorised. ``x`` must hold no NaN (NaN != NaN would make every NaN its own rank);
    +-inf are fine."""
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


def spearman(x: Sequence[float], y: Sequence[float]) -> tuple[float, int]:
    """(rho, n): Spearman's rank correlation of two equally long samples over the ``n`` pairs
    where neither side is NaN; rho is NaN when ``n`` < 2 or a side is constant (see the module
    docstring). The arithmetic is ``np.corrcoef(ranks_x, ranks_y)``, the layout stability.json
    values were always computed with (scipy stacks the rank columns, ``rowvar=False``: the same
    number up to the summation order, within 2 ulp; tests/test_numerics.py)."""
    a = np.asarray(x, dtype=np.float64).ravel()
    b = np.asarray(y, dtype=np.float64).ravel()
    if a.size != b.size:
        raise ValueError(f"spearman: the two samples differ in length ({a.size} vs {b.size}); "
                         "they must be paired")
    keep = ~(np.isnan(a) | np.isnan(b))
    a, b = a[keep], b[keep]
    n = int(a.size)
    if n < 2 or np.all(a == a[0]) or np.all(b == b[0]):
        return math.nan, n
    # ranks are finite even where scores are inf, so the correlation itself is well defined
    return float(np.clip(np.corrcoef(average_ranks(a), average_ranks(b))[0, 1], -1.0, 1.0)), n


def spread(values: Sequence[float]) -> dict:
    """mean, min, max, sd (n - 1) and n of the non-NaN ``values``; None where undefined. The mean
    is kept within [min, max] (the float mean of equal values can land one ulp outside them)."""
    x = np.asarray(list(values), dtype=np.float64).ravel()
    x = x[~np.isnan(x)]
    if x.size == 0:
        return {"n": 0, "mean": None, "min": None, "max": None, "sd": None}
    lo, hi = float(x.min()), float(x.max())
    return {"n": int(x.size), "mean": min(max(float(x.mean()), lo), hi), "min": lo, "max": hi,
            "sd": float(x.std(ddof=1)) if x.size > 1 else None}


def exp_or_inf(v: float) -> float:
    """exp(v), and +inf where that overflows (a perplexity from a mean NLL that exploded, say,
    under an exponent bit flip); NaN stays NaN. Never raises."""
    if math.isnan(v):
        return math.nan
    try:
        return math.exp(v)
    except OverflowError:
        return math.inf


def mean_ratio(values: Sequence[float]) -> float:
    """Mean of perplexity ratios over seeds: +inf when one overflowed, NaN when one is NaN."""
    return math.nan if any(math.isnan(v) for v in values) else sum(values) / len(values)
