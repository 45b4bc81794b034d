"""Stability of a metric across seeds: Jaccard of top-K sets, Spearman of scores."""
from __future__ import annotations

from itertools import combinations
from typing import Sequence

import numpy as np
import torch


def jaccard(a: torch.Tensor, b: torch.Tensor) -> float:
    """|A ∩ B| / |A ∪ B| of two 1-D tensors of distinct ids."""
    a_np, b_np = a.cpu().numpy(), b.cpu().numpy()
    inter = np.intersect1d(a_np, b_np, assume_unique=True).size
    union = a_np.size + b_np.size - inter
    return 1.0 if union == 0 else inter / union


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties given the mean of the ranks they span (``scipy.stats.rankdata``'s
    default), vectorised; kept here so that a worker does not import scipy (half a second)."""
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
    """Spearman rank correlation (average ranks for ties); NaN if either side is constant."""
    ra = average_ranks(a.cpu().double().numpy())
    rb = average_ranks(b.cpu().double().numpy())
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def pairwise(values: Sequence, seeds: Sequence[int], fn) -> dict:
    """``fn`` over every unordered pair of seeds (not just neighbours), with mean/min/max."""
    pairs = [{"a": seeds[i], "b": seeds[j], "value": fn(values[i], values[j])}
             for i, j in combinations(range(len(seeds)), 2)]
    vals = np.array([p["value"] for p in pairs], dtype=float)
    ok = vals[~np.isnan(vals)]
    summary = {k: (float(f(ok)) if ok.size else float("nan")) for k, f in (("mean", np.mean), ("min", np.min), ("max", np.max))}
    return {"pairs": pairs, **summary}
