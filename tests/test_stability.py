"""Jaccard, Spearman and the pairwise summary, against independent references."""
import math

import numpy as np
import pytest
import torch
from scipy.stats import rankdata, spearmanr

from cwa_core.stability import average_ranks, jaccard, pairwise, spearman


@pytest.mark.parametrize("levels", [3, 50, 10_000])
def test_average_ranks_match_scipy_with_and_without_ties(levels):
    rng = np.random.default_rng(levels)
    x = rng.integers(0, levels, size=5000).astype(np.float64)  # 3 levels: huge tie groups
    np.testing.assert_array_equal(average_ranks(x), rankdata(x))


def test_spearman_matches_scipy_and_is_nan_for_a_constant_side():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2000, generator=g)
    b = a + 0.7 * torch.randn(2000, generator=g)
    b[::7] = 0.0  # ties
    assert spearman(a, b) == pytest.approx(spearmanr(a.numpy(), b.numpy()).statistic, abs=1e-12)
    assert spearman(a, a.exp()) == pytest.approx(1.0)  # monotone transform: rank correlation 1
    assert spearman(a, -a) == pytest.approx(-1.0)
    assert math.isnan(spearman(a, torch.ones(2000)))


def test_jaccard_counts_overlap_over_union():
    assert jaccard(torch.tensor([1, 2, 3, 4]), torch.tensor([3, 4, 5, 6, 7, 8])) == pytest.approx(2 / 8)
    assert jaccard(torch.tensor([5, 1]), torch.tensor([1, 5])) == 1.0
    assert jaccard(torch.tensor([1]), torch.tensor([2])) == 0.0
    assert jaccard(torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long)) == 1.0


def test_pairwise_covers_every_pair_and_skips_nan_in_the_summary():
    vals = {0: 1.0, 1: 2.0, 2: 4.0, 3: float("nan")}
    out = pairwise([0, 1, 2, 3], [10, 11, 12, 13], lambda i, j: vals[max(i, j)] if max(i, j) < 3 else float("nan"))
    assert [(p["a"], p["b"]) for p in out["pairs"]] == [(10, 11), (10, 12), (10, 13), (11, 12), (11, 13), (12, 13)]
    assert (out["mean"], out["min"], out["max"]) == pytest.approx(((2 + 4 + 4) / 3, 2.0, 4.0))
