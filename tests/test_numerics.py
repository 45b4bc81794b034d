"""cwa_core.numerics: one Jaccard, one Spearman (scipy's definition, to 2 ulp; the stability
values' arithmetic bit for bit), one spread summary, one
overflowing exp, shared by the science and the analysis."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import rankdata, spearmanr

from cwa_core import numerics

NAN, INF = math.nan, math.inf


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


@pytest.mark.parametrize("seed,n,ties", [(0, 3, False), (1, 50, True), (2, 2000, True), (3, 10_000, True),
                                         (4, 10_000, False), (5, 777, True)])
def test_spearman_equals_scipy(seed, n, ties):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    y = x + rng.uniform(0.1, 3) * rng.normal(size=n)
    if ties:  # large tie groups on both sides: average ranks matter
        x, y = np.round(x, 1), np.round(y, 0)
        x[::5] = 0.0
    x32 = x.astype(np.float32)  # scores arrive as float32
    for a, b in ((x, y), (x32, y), (y, x32)):
        rho, m = numerics.spearman(a, b)
        want = float(np.clip(spearmanr(np.asarray(a, np.float64), np.asarray(b, np.float64)).statistic, -1, 1))
        assert m == n and rho == pytest.approx(want, rel=5e-16, abs=5e-16)  # scipy's number, to 2 ulp
        # and bit for bit the arithmetic stability.json values were computed with before the redesign
        ra, rb = rankdata(np.asarray(a, np.float64)), rankdata(np.asarray(b, np.float64))
        assert rho == float(np.clip(np.corrcoef(ra, rb)[0, 1], -1.0, 1.0))


def test_spearman_with_ties_by_hand():
    # average ranks (1.5, 1.5, 3) against (1, 2, 3): 1.5 / sqrt(1.5 * 2)
    rho, n = numerics.spearman([1, 1, 2], [1, 2, 3])
    assert n == 3 and rho == pytest.approx(1.5 / math.sqrt(3.0), abs=1e-15)
    assert rho == pytest.approx(spearmanr([1, 1, 2], [1, 2, 3]).statistic, rel=5e-16)


SPEARMAN_DEGENERATE = {
    "empty": ([], [], NAN, 0),
    "one pair": ([1], [2], NAN, 1),
    "two pairs": ([1, 2], [2, 1], -1.0, 2),  # defined, as scipy has it (its value, to the bit)
    "constant side": ([1, 1, 1], [1, 2, 3], NAN, 3),
    "both constant": ([2, 2], [5, 5], NAN, 2),
    "inf ranks first": ([1, 2, INF], [1, 2, 3], 1.0, 3),
    "inf against the order": ([INF, 1, 2], [1, 2, 3], -0.5, 3),
    "-inf ranks last": ([-INF, 0, 5], [1, 2, 3], 1.0, 3),
    "nan pair excluded": ([1, 2, NAN, 4], [1, 2, 3, 0], -0.5, 3),
    "one pair left": ([NAN, 1, 2], [1, NAN, 2], NAN, 1),
    "all nan": ([NAN, NAN], [NAN, NAN], NAN, 0),
    "equal infinities": ([INF, INF, INF], [1, 2, 3], NAN, 3),
}


@pytest.mark.parametrize("case", SPEARMAN_DEGENERATE)
def test_spearman_degenerate(case):
    a, b, want, n = SPEARMAN_DEGENERATE[case]
    rho, m = numerics.spearman(a, b)
    assert m == n and (_same(rho, want) or rho == pytest.approx(want, abs=1e-15)), (case, rho)
    if not math.isnan(want):
        keep = ~(np.isnan(np.asarray(a, float)) | np.isnan(np.asarray(b, float)))
        ref = spearmanr(np.asarray(a, float)[keep], np.asarray(b, float)[keep]).statistic
        assert rho == pytest.approx(float(np.clip(ref, -1, 1)), rel=5e-16, abs=5e-16)


def test_spearman_refuses_unpaired_samples():
    with pytest.raises(ValueError, match="differ in length"):
        numerics.spearman([1, 2, 3], [1, 2])


@pytest.mark.parametrize("levels", [2, 3, 50, 10_000])
def test_average_ranks_are_scipys(levels):
    x = np.random.default_rng(levels).integers(0, levels, size=3000).astype(np.float64)
    x[:3] = [INF, -INF, INF]
    np.testing.assert_array_equal(numerics.average_ranks(x), rankdata(x))


JACCARD = [([], [], 1.0), ([], [1], 0.0), ([7], [7], 1.0), ([1, 2, 3], [4, 5, 6], 0.0), ([1, 1, 2], [2], 0.5),
           ([1, 2, 3, 4], [3, 4, 5, 6, 7, 8], 0.25), ([5, 1], [1, 5], 1.0)]


@pytest.mark.parametrize("a,b,want", JACCARD)
def test_jaccard(a, b, want):
    assert numerics.jaccard(np.array(a, dtype=np.int64), np.array(b, dtype=np.int64)) == want
    ua, ub = np.unique(a).astype(np.int64), np.unique(b).astype(np.int64)
    assert numerics.jaccard(ua, ub, assume_unique=True) == want


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # sd of [1, inf]: NaN
def test_spread():
    X = 1.9127555772777218  # np.mean([X, X, X]) > X
    s = numerics.spread([X, X, X])
    assert (s["n"], s["mean"], s["min"], s["max"]) == (3, X, X, X)  # the mean kept within [min, max]
    assert s["sd"] == pytest.approx(0.0, abs=1e-15)  # numpy's float mean is an ulp off: sd is not exactly 0
    assert numerics.spread([]) == {"n": 0, "mean": None, "min": None, "max": None, "sd": None}
    assert numerics.spread([NAN, NAN]) == {"n": 0, "mean": None, "min": None, "max": None, "sd": None}
    assert numerics.spread([2.0, NAN]) == {"n": 1, "mean": 2.0, "min": 2.0, "max": 2.0, "sd": None}
    s = numerics.spread([1.0, 2.0, 4.0])
    assert s["mean"] == pytest.approx(7 / 3) and s["sd"] == pytest.approx(math.sqrt(7 / 3)) and s["n"] == 3
    s = numerics.spread([1.0, INF])
    assert s["max"] == INF and s["mean"] == INF and math.isnan(s["sd"])


@pytest.mark.parametrize("v,want", [(0.0, 1.0), (1.0, math.e), (1000.0, INF), (-1000.0, 0.0), (NAN, NAN),
                                    (INF, INF), (-INF, 0.0)])
def test_exp_or_inf(v, want):
    assert _same(numerics.exp_or_inf(v), want)


def test_mean_ratio():
    assert numerics.mean_ratio([2.0, 4.0]) == 3.0
    assert numerics.mean_ratio([2.0, INF]) == INF
    assert math.isnan(numerics.mean_ratio([2.0, NAN, INF]))
    assert numerics.mean_ratio([5.0]) == 5.0
