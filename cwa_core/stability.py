"""Stability of a metric across seeds: Jaccard of top-K sets, Spearman of scores."""
from __future__ import annotations

from itertools import combinations
from typing import Sequence

import numpy as np
import torch
from scipy.stats import rankdata


def jaccard(a: torch.Tensor, b: torch.Tensor) -> float:
    """|A ∩ B| / |A ∪ B| of two 1-D tensors of distinct ids."""
    a_np, b_np = a.cpu().numpy(), b.cpu().numpy()
    inter = np.intersect1d(a_np, b_np, assume_unique=True).size
    union = a_np.size + b_np.size - inter
    return 1.0 if union == 0 else inter / union


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation (average ranks for ties); NaN if either side is constant."""
    ra = rankdata(a.cpu().double().numpy())
    rb = rankdata(b.cpu().double().numpy())
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
