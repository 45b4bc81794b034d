"""Statistics for a handful of seeds: bootstrap intervals, the paired test of top-K against
random-K, the critical K on a log-log dose-response curve, chi-square of two distributions,
set overlap and rank correlation.

Degenerate inputs have decided answers (tests/test_analysis.py):
- ``bootstrap_mean``: no value -> everything None; one value -> the value, no interval (one
  seed says nothing about spread); equal values -> a zero-width interval; +inf values make the
  resampled means that draw them +inf (perturbation damage that overflowed is real damage).
- ``paired_test``: fewer than 3 pairs, or every paired difference equal -> no p-value, the
  verdict says why.
- ``critical_k``: the first K that reaches the threshold is the bracket's upper end; an
  infinite ratio there gives the bracket, not an interpolated point.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

# scipy is imported inside the functions that need it: loading results does not pay for it.

TEST_NAME = "paired t-test on log ratios (two-sided); Wilcoxon signed-rank (exact) as a check"


def _as_array(values: Sequence[float]) -> np.ndarray:
    return np.asarray(list(values), dtype=np.float64).ravel()


def order_quantile(sorted_values: np.ndarray, q: float) -> float:
    """Nearest-rank quantile of an ascending array (no interpolation, so +inf stays +inf and
    never meets inf - inf = NaN)."""
    n = sorted_values.size
    i = min(max(int(math.ceil(q * n)) - 1, 0), n - 1)
    return float(sorted_values[i])


def bootstrap_mean(values: Sequence[float], *, n_boot: int = 10_000, seed: int = 0, level: float = 0.95,
                   geometric: bool = False) -> dict:
    """Mean of ``values`` (n,) over seeds and its percentile-bootstrap interval.

    ``geometric``: the mean and interval of log(values), exponentiated (values must be > 0).
    NaN must be removed by the caller (it is missing data, not a value). The interval is kept
    within [min, max] of the data: float sums of equal values can land one ulp outside them.
    """
    x = _as_array(values)
    out = {"n": int(x.size), "mean": None, "lo": None, "hi": None, "n_boot": n_boot, "seed": seed,
           "level": level, "method": "percentile bootstrap over seeds" + (" (geometric mean)" if geometric else "")}
    if x.size == 0:
        out["note"] = "no value"
        return out
    if np.isnan(x).any():
        raise ValueError("bootstrap_mean: NaN among the values; drop missing values first")
    if geometric:
        if (x <= 0).any():
            raise ValueError("bootstrap_mean: geometric mean of a non-positive value")
        x = np.log(x)
    lo_x, hi_x = float(x.min()), float(x.max())

    def back(v: float) -> float:
        v = min(max(v, lo_x), hi_x)
        return float(math.exp(v)) if geometric else v

    out["mean"] = back(float(x.mean()))
    if x.size == 1:
        out["note"] = "one seed: no interval"
        return out
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(n_boot, x.size))
    with np.errstate(invalid="ignore"):
        means = np.sort(x[idx].mean(axis=1))  # (n_boot,)
    a = (1.0 - level) / 2
    out["lo"], out["hi"] = back(order_quantile(means, a)), back(order_quantile(means, 1 - a))
    return out


def paired_test(top: Sequence[float], control: Sequence[float], *, alpha: float = 0.05) -> dict:
    """Is top-K damage different from the control's, seed by seed?

    ``top``, ``control``: (n,) perplexity ratios paired by seed, > 0, +inf allowed. The test runs
    on d = log(top) - log(control). A pair where both are +inf shows no measurable difference
    (d = 0). With a +inf difference the t-test is undefined and the (rank-based) Wilcoxon test,
    which only needs the order, is the one reported.
    """
    from scipy import stats

    t, c = _as_array(top), _as_array(control)
    if t.size != c.size:
        raise ValueError(f"paired_test: {t.size} top-K ratios for {c.size} control ratios; pair them by seed")
    keep = ~(np.isnan(t) | np.isnan(c))
    t, c = t[keep], c[keep]
    n = int(t.size)
    out: dict = {"test": TEST_NAME, "n": n, "alpha": alpha, "p_value": None, "statistic": None,
                 "mean_log_diff": None, "wilcoxon_p": None}
    if n < 3:
        out["verdict"] = f"not enough seeds: {n} paired seed(s), a test needs at least 3"
        return out
    with np.errstate(invalid="ignore"):
        d = np.log(t) - np.log(c)
    d[np.isinf(t) & np.isinf(c)] = 0.0
    finite = np.isfinite(d)
    out["mean_log_diff"] = float(d.mean()) if finite.all() else (math.inf if (d[~finite] > 0).all() else None)
    if np.all(d == d[0]) or (finite.all() and np.ptp(d) <= 1e-12 * max(1.0, float(np.abs(d).max()))):
        out["verdict"] = (f"not enough seeds: all {n} paired log-ratio differences are equal ({float(d[0]):.4g}); "
                          "no spread to test against")
        return out
    # Wilcoxon needs only the order of |d|: an infinite difference is the largest one
    big = (np.abs(d[finite]).max() if finite.any() else 1.0) * 2 + 1
    dw = np.where(np.isposinf(d), big, np.where(np.isneginf(d), -big, d))
    try:
        w = stats.wilcoxon(dw, zero_method="wilcox", alternative="two-sided")
        out["wilcoxon_p"] = float(w.pvalue)
    except ValueError:  # every difference zero after dropping zeros
        out["wilcoxon_p"] = None
    if finite.all():
        r = stats.ttest_1samp(d, 0.0)
        out["statistic"], out["p_value"] = float(r.statistic), float(r.pvalue)
        out["test_used"] = "paired t"
    else:
        out["statistic"], out["p_value"] = None, out["wilcoxon_p"]
        out["test_used"] = "Wilcoxon signed-rank (an infinite ratio makes the t-test undefined)"
    p = out["p_value"]
    if p is None:
        out["verdict"] = "no test possible (every difference zero)"
    elif p < alpha:
        worse = float(np.median(dw)) > 0
        out["verdict"] = f"top_k {'worse' if worse else 'less damaging'} than the control (p={p:.3g} < {alpha})"
    else:
        out["verdict"] = f"no significant difference (p={p:.3g} >= {alpha})"
    return out


def critical_k(ks: Sequence[float], ratios: Sequence[float], threshold: float) -> dict:
    """Smallest K whose ratio reaches ``threshold``, interpolated linearly in (log K, log ratio)
    between the last K below it and the first K at or above it.

    ``ks``: (n,) distinct K, any order; ``ratios``: (n,) > 0 (+inf allowed, NaN skipped).
    Returns ``critical_k`` (None when only a bound is known), ``bound`` (one of "interpolated",
    "exact", "at_or_below", "above", "between") and ``bracket`` [K below, K at/above].
    """
    k, r = _as_array(ks), _as_array(ratios)
    ok = ~np.isnan(r)
    k, r = k[ok], r[ok]
    order = np.argsort(k)
    k, r = k[order], r[order]
    out: dict = {"threshold": threshold, "critical_k": None, "bracket": None, "bound": None}
    if k.size == 0:
        out["note"] = "no K measured"
        return out
    passing = np.flatnonzero(r >= threshold)
    if passing.size == 0:
        out.update(bound="above", bracket=[float(k[-1]), None],
                   note=f"no K reaches {threshold:g}x: the critical K is above the largest measured ({k[-1]:g})")
        return out
    i = int(passing[0])
    if passing.size < k.size - i:
        out["non_monotone"] = True  # a larger K falls back under the threshold
    if i == 0:
        exact = bool(r[0] == threshold)
        out.update(bound="exact" if exact else "at_or_below", critical_k=float(k[0]) if exact else None,
                   bracket=[None, float(k[0])],
                   note=None if exact else f"the smallest K measured ({k[0]:g}) already reaches {threshold:g}x")
        return out
    k0, k1, r0, r1 = k[i - 1], k[i], r[i - 1], r[i]
    out["bracket"] = [float(k0), float(k1)]
    if r1 == threshold:
        out.update(bound="exact", critical_k=float(k1))
    elif not math.isfinite(r1):
        out.update(bound="between", note=f"the ratio at K={k1:g} is infinite: the crossing lies in ({k0:g}, {k1:g}], "
                                         "not interpolated")
    else:
        lk = math.log(k0) + (math.log(threshold) - math.log(r0)) * (math.log(k1) - math.log(k0)) / (math.log(r1) - math.log(r0))
        out.update(bound="interpolated", critical_k=float(math.exp(lk)))
    return out


def loglog_at(ks: Sequence[float], ratios: Sequence[float], k: float) -> float | None:
    """The ratio at ``k`` interpolated in (log K, log ratio) between its bracketing Ks (None if
    ``k`` is outside them or a bracketing ratio is missing or infinite)."""
    kk, rr = _as_array(ks), _as_array(ratios)
    order = np.argsort(kk)
    kk, rr = kk[order], rr[order]
    if kk.size == 0 or not kk[0] <= k <= kk[-1]:
        return None
    j = int(np.searchsorted(kk, k))
    if kk[j] == k:
        return float(rr[j]) if math.isfinite(rr[j]) else None
    k0, k1, r0, r1 = kk[j - 1], kk[j], rr[j - 1], rr[j]
    if not (math.isfinite(r0) and math.isfinite(r1)) or r0 <= 0 or r1 <= 0:
        return None
    f = (math.log(k) - math.log(k0)) / (math.log(k1) - math.log(k0))
    return float(math.exp(math.log(r0) + f * (math.log(r1) - math.log(r0))))


def chi_square_alike(a: dict, b: dict) -> dict:
    """Chi-square test of homogeneity: do two count distributions over the same categories
    (``a``, ``b``: category -> count) come from one distribution? Categories empty in both are
    dropped; Cramér's V is the effect size (0 alike .. 1 disjoint)."""
    from scipy import stats

    cats = sorted({*a, *b}, key=str)
    table = np.array([[float(a.get(c, 0)) for c in cats], [float(b.get(c, 0)) for c in cats]])
    keep = table.sum(axis=0) > 0
    table, cats = table[:, keep], [c for c, k in zip(cats, keep) if k]
    out = {"test": "chi-square test of homogeneity (2 x categories, no continuity correction)",
           "categories": [str(c) for c in cats], "chi2": None, "dof": None, "p_value": None, "cramers_v": None}
    if table.shape[1] < 2 or (table.sum(axis=1) == 0).any():
        out["note"] = "fewer than 2 non-empty categories or an empty distribution: nothing to test"
        return out
    chi2, p, dof, _ = stats.chi2_contingency(table, correction=False)
    n = table.sum()
    out.update(chi2=float(chi2), dof=int(dof), p_value=float(p), n=[float(x) for x in table.sum(axis=1)],
               cramers_v=float(math.sqrt(chi2 / (n * (min(table.shape) - 1)))))
    return out


def jaccard_sorted(a: np.ndarray, b: np.ndarray) -> float:
    """|A ∩ B| / |A ∪ B| of two sorted arrays of unique ids; both empty: 1.0."""
    inter = np.intersect1d(a, b, assume_unique=True).size
    union = a.size + b.size - inter
    return 1.0 if union == 0 else inter / union


def spearman(x: Sequence[float], y: Sequence[float]) -> tuple[float | None, int]:
    """Spearman rank correlation over the pairs where neither side is NaN; (None, n) when fewer
    than 3 pairs remain or a side is constant (undefined, not 0)."""
    from scipy import stats

    a, b = _as_array(x), _as_array(y)
    keep = ~(np.isnan(a) | np.isnan(b))
    a, b = a[keep], b[keep]
    n = int(a.size)
    if n < 3 or np.all(a == a[0]) or np.all(b == b[0]):
        return None, n
    rho = stats.spearmanr(a, b).statistic
    return float(np.clip(rho, -1.0, 1.0)), n


def spread(values: Sequence[float]) -> dict:
    """mean, min, max, sd (n - 1) and n of the non-NaN values; None where undefined."""
    x = _as_array(values)
    x = x[~np.isnan(x)]
    if x.size == 0:
        return {"n": 0, "mean": None, "min": None, "max": None, "sd": None}
    lo, hi = float(x.min()), float(x.max())
    return {"n": int(x.size), "mean": min(max(float(x.mean()), lo), hi), "min": lo, "max": hi,
            "sd": float(x.std(ddof=1)) if x.size > 1 else None}
