"""Statistics for a handful of seeds: intervals with known coverage, the paired test of top-K
against a control, Holm's adjustment, the critical K on a log-log dose-response curve,
chi-square of two distributions. Set overlap, rank correlation and the spread summary are
:mod:`cwa_core.numerics`' (shared with the science, one rule each).

Degenerate inputs have decided answers (tests/test_analysis.py, tests/test_honest_stats.py):
- ``seed_interval``: no value -> everything None; one value -> the value, no interval (one seed
  says nothing about spread); equal values -> zero width, ``no_spread`` set (the caller then
  takes the spread of the evaluation windows, :func:`window_bootstrap`); a +inf value ->
  the geometric mean is +inf and the interval [smallest seed, +inf] (order statistics: no t
  interval exists), its coverage stated.
- ``paired_test``: the count of seeds where top-K did more damage is always given; a test runs
  from 3 paired seeds (the t-test on log ratios when every difference is finite and they
  vary, else the exact signed-rank test with +inf ranked largest); where every seed agrees and
  the exact test cannot reach ``alpha`` with so few seeds, the verdict says so with the
  smallest attainable p, never "no significant difference". Both selections identical in
  every seed: one measurement repeated, no test over seeds.
- ``critical_k``: the first K that reaches the threshold is the bracket's upper end; an
  infinite ratio there gives the bracket, not an interpolated point.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from cwa_core.numerics import exp_or_inf as _exp

# scipy is imported inside the functions that need it: loading results does not pay for it.

TEST_NAME = ("paired t-test on log ratios (two-sided) when every ratio is finite and the differences vary; "
             "otherwise the exact Wilcoxon signed-rank test (two-sided, +inf ranked largest); the count of seeds "
             "where top_k did more damage always given")
T_METHOD = "t interval on log ratios over seeds (geometric mean; exact coverage when log ratios are normal)"
FEW_SEEDS = 5  # below this many seeds an interval over seeds is flagged


def _as_array(values: Sequence[float]) -> np.ndarray:
    return np.asarray(list(values), dtype=np.float64).ravel()


def order_quantile(sorted_values: np.ndarray, q: float) -> float:
    """Nearest-rank quantile of an ascending array (no interpolation, so +inf stays +inf and
    never meets inf - inf = NaN)."""
    n = sorted_values.size
    i = min(max(int(math.ceil(q * n)) - 1, 0), n - 1)
    return float(sorted_values[i])


def seed_interval(values: Sequence[float], *, level: float = 0.95) -> dict:
    """Geometric mean of ratios ``values`` (n,) over seeds and its interval.

    All finite, n >= 2, spread: exp(mean(log r) -+ t_{n-1, (1+level)/2} sd(log r) / sqrt(n)), the
    t interval (Student 1908) on the log scale, whose coverage is ``level`` when the log ratios
    are normal. A +inf value: [smallest seed, +inf], which lies below the median ratio with
    probability 1 - 0.5**n (stated as ``coverage``). Values must be > 0; NaN must be dropped by
    the caller (missing data, not a value). ``warning`` is set below :data:`FEW_SEEDS` seeds.
    """
    x = _as_array(values)
    n = int(x.size)
    out = {"n": n, "geomean": None, "lo": None, "hi": None, "level": level, "method": None, "code": "none",
           "coverage": None, "no_spread": False, "note": None, "warning": None}
    if n == 0:
        out["note"] = "no value"
        return out
    if np.isnan(x).any():
        raise ValueError("seed_interval: NaN among the values; drop missing values first")
    if (x <= 0).any():
        raise ValueError("seed_interval: a ratio <= 0 has no logarithm")
    if n < FEW_SEEDS:
        out["warning"] = (f"{n} seed(s), fewer than {FEW_SEEDS}: " + ("no interval from seeds" if n == 1 else
                          "the interval over seeds is wide and rests on log ratios being normal"))
    logs = np.log(x)
    lo_x, hi_x = float(logs.min()), float(logs.max())
    out["geomean"] = math.inf if np.isinf(logs).any() else _exp(min(max(float(logs.mean()), lo_x), hi_x))
    if n == 1:
        out["note"] = "one seed: no interval"
        return out
    if np.isinf(x).any():
        out.update(lo=float(x.min()), hi=math.inf, code="order", coverage=1 - 0.5 ** n,
                   method=f"an infinite ratio: [smallest seed, inf], below the median ratio with probability "
                          f"1 - 0.5^n = {1 - 0.5 ** n:.3g} (order statistics; no t interval exists)")
        return out
    sd = float(logs.std(ddof=1))
    if hi_x - lo_x <= 1e-12 * max(1.0, abs(hi_x)):
        out.update(lo=float(x.min()), hi=float(x.max()), code="zero", no_spread=True, method="no spread over seeds",
                   note=f"all {n} seeds give the same ratio: the seeds carry no spread")
        return out
    from scipy import stats

    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    m = float(logs.mean())
    out.update(lo=_exp(m - half), hi=_exp(m + half), code="t", coverage=level, method=T_METHOD)
    return out


def window_bootstrap(base_nll: Sequence[float], pert_nll: Sequence[float], tokens: Sequence[float], *,
                     n_boot: int = 10_000, seed: int = 0, level: float = 0.95, chunk: int = 1000) -> dict:
    """The perplexity ratio exp((sum pert - sum base) / sum tokens) and its paired percentile
    bootstrap interval over evaluation windows: each resample draws window indices with
    replacement, the same for the baseline and the perturbed model (Efron & Tibshirani 1993,
    ch. 13). ``base_nll``, ``pert_nll``: (W,) summed NLL per window; ``tokens``: (W,)
    predictions per window. +inf in ``pert_nll`` propagates (resamples that draw it give +inf)."""
    b, p, t = _as_array(base_nll), _as_array(pert_nll), _as_array(tokens)
    w = int(b.size)
    out = {"n_windows": w, "ratio": None, "lo": None, "hi": None, "n_boot": n_boot, "seed": seed, "level": level,
           "method": f"paired percentile bootstrap over the {w} evaluation windows ({n_boot} resamples, seed {seed}): "
                     "the spread of the evaluation text, not of seeds", "note": None}
    if p.size != w or t.size != w:
        raise ValueError(f"window_bootstrap: {w} baseline windows, {p.size} perturbed, {t.size} token counts")
    if w < 2 or np.isnan(b).any() or np.isnan(p).any() or not np.isfinite(b).all():
        out["note"] = "fewer than 2 windows or a missing / non-finite window: no interval"
        return out
    d = p - b  # (W,) paired difference in summed NLL
    with np.errstate(invalid="ignore", over="ignore"):
        out["ratio"] = float(np.exp(d.sum() / t.sum()))
        rng = np.random.default_rng(seed)
        ratios = []
        for start in range(0, n_boot, chunk):
            idx = rng.integers(0, w, size=(min(chunk, n_boot - start), w))  # (chunk, W)
            ratios.append(np.exp(d[idx].sum(axis=1) / t[idx].sum(axis=1)))
    r = np.sort(np.concatenate(ratios))
    a = (1.0 - level) / 2
    out["lo"], out["hi"] = order_quantile(r, a), order_quantile(r, 1 - a)
    return out


def signed_rank_exact(d: Sequence[float]) -> tuple[float | None, float | None]:
    """(W+, two-sided p) of the exact Wilcoxon signed-rank test of differences ``d`` (n,):
    zeros dropped (Wilcoxon's convention), |d| ranked with ties averaged and +-inf the largest,
    p = the share of the 2**m equally likely sign patterns whose W+ is as far from its mean as
    the observed one, counted exactly (a subset-sum table over the doubled ranks, any m).
    (None, None) when no difference is non-zero."""
    from scipy.stats import rankdata

    x = _as_array(d)
    x = x[x != 0]
    m = int(x.size)
    if m == 0:
        return None, None
    r2 = np.rint(2 * rankdata(np.abs(x))).astype(np.int64)  # doubled average ranks (+inf largest): integers
    total = int(r2.sum())
    counts = [1] + [0] * total  # counts[s]: sign patterns whose doubled W+ is s (Python ints: exact)
    for r in r2.tolist():
        counts = [counts[s] + (counts[s - r] if s >= r else 0) for s in range(total + 1)]
    w2 = int(r2[x > 0].sum())
    dev = abs(2 * w2 - total)  # distance of the doubled W+ from its mean, doubled
    extreme = sum(c for s, c in enumerate(counts) if abs(2 * s - total) >= dev)
    return w2 / 2, min(1.0, extreme / 2 ** m)


def min_attainable_p(n: int) -> float:
    """The smallest two-sided p of an exact paired sign or signed-rank test with ``n`` non-zero
    differences: every seed on one side, 2 / 2**n (0.25 at n = 3; below 0.05 from n = 6)."""
    return min(1.0, 2.0 / 2 ** n) if n > 0 else 1.0


def _count(d: np.ndarray, names: tuple[str, str]) -> dict:
    gt, lt = int((d > 0).sum()), int((d < 0).sum())
    n = int(d.size)
    text = f"{gt}/{n} seeds: {names[0]} > {names[1]}"
    if lt:
        text += f", {lt}/{n} {names[0]} < {names[1]}"
    if n - gt - lt:
        text += f", {n - gt - lt}/{n} equal"
    return {"top_greater": gt, "control_greater": lt, "equal": n - gt - lt, "n": n, "text": text}


def paired_test(top: Sequence[float], control: Sequence[float], *, alpha: float = 0.05,
                names: tuple[str, str] = ("top_k", "control")) -> dict:
    """Is top-K damage different from the control's, seed by seed?

    ``top``, ``control``: (n,) perplexity ratios paired by seed, > 0, +inf allowed (NaN pairs are
    dropped). d = log(top) - log(control); a pair where both are +inf shows no measurable
    difference (d = 0). The count of seeds on each side is always reported; the test is the
    paired t-test when every d is finite and they vary, else the exact signed-rank test with
    +inf ranked largest (:func:`signed_rank_exact`), whose smallest attainable p with n seeds
    is :func:`min_attainable_p`.
    """
    t, c = _as_array(top), _as_array(control)
    if t.size != c.size:
        raise ValueError(f"paired_test: {t.size} top-K ratios for {c.size} control ratios; pair them by seed")
    keep = ~(np.isnan(t) | np.isnan(c))
    t, c = t[keep], c[keep]
    n = int(t.size)
    with np.errstate(invalid="ignore", divide="ignore"):
        d = np.log(t) - np.log(c)
    d[np.isinf(t) & np.isinf(c)] = 0.0
    count = _count(d, names)
    finite = np.isfinite(d)
    m = int((d != 0).sum())
    out: dict = {"test": TEST_NAME, "n": n, "alpha": alpha, "p_value": None, "statistic": None, "test_used": None,
                 "mean_log_diff": None, "wilcoxon_p": None, "count": count, "count_text": count["text"],
                 "min_attainable_p": min_attainable_p(m), "deterministic": False}
    if n:
        out["mean_log_diff"] = float(d.mean()) if finite.all() else (math.inf if (d[~finite] > 0).all() else
                                                                     -math.inf if (d[~finite] < 0).all() else None)
    if n == 0:
        out["verdict"] = out["outcome"] = "no paired seeds"
        return out
    if n >= 2 and np.all(t == t[0]) and np.all(c == c[0]):
        out["deterministic"] = True
        out["outcome"] = "the same in every seed: no test"
        out["verdict"] = (f"{count['text']}: both selections give the same ratio in every seed (neither depends on "
                          "the seed), so the seeds repeat one measurement: no test over seeds (the ratio table's "
                          "interval over evaluation windows gives the spread)")
        return out
    out["statistic"], out["wilcoxon_p"] = signed_rank_exact(d)
    if n < 3:
        out["outcome"] = f"too few seeds (smallest p {out['min_attainable_p']:.3g})"
        out["verdict"] = (f"{count['text']}; not enough seeds for a test ({n} paired seed(s), at least 3; the exact "
                          f"test's smallest attainable p here is {out['min_attainable_p']:.3g})")
        out["statistic"] = None
        return out
    if finite.all() and np.ptp(d) > 1e-12 * max(1.0, float(np.abs(d).max())):
        from scipy import stats

        r = stats.ttest_1samp(d, 0.0)
        out["statistic"], out["p_value"], out["test_used"] = float(r.statistic), float(r.pvalue), "paired t"
    else:
        why = "an infinite ratio makes the t-test undefined" if not finite.all() else "the differences do not vary"
        out["p_value"], out["test_used"] = out["wilcoxon_p"], f"exact Wilcoxon signed-rank, +inf largest ({why})"
    out["verdict"], out["outcome"] = _verdict(out, d, alpha, names)
    return out


def _verdict(out: dict, d: np.ndarray, alpha: float, names: tuple[str, str]) -> tuple[str, str]:
    """(the verdict, a short outcome for tables). Where every seed agrees it never reads "no
    significant difference": it gives the count and why no p below ``alpha`` came out."""
    p, count = out["p_value"], out["count"]
    if p is None:
        return f"{count['text']}; no test possible (every difference zero)", "every difference zero"
    if p < alpha:
        worse = float(np.median(d)) > 0
        how = "worse" if worse else "less damaging"
        return (f"{names[0]} {how} than {names[1]} (p={p:.3g} < {alpha}, {out['test_used']}; {count['text']})",
                f"{names[0]} {how}")
    agree = count["equal"] == 0 and (count["top_greater"] == count["n"] or count["control_greater"] == count["n"])
    if agree:
        floor = out["min_attainable_p"]
        if floor >= alpha and out["test_used"] != "paired t":
            return (f"{count['text']}: every seed agrees, but {count['n']} seeds cannot reach p < {alpha} with an exact "
                    f"test (smallest attainable p = {floor:.3g})", f"all seeds agree; smallest p {floor:.3g}")
        also = f"; an exact test cannot go below p = {floor:.3g} with {count['n']} seeds" if floor >= alpha else ""
        return (f"{count['text']}: every seed agrees, but not significant by the {out['test_used']} "
                f"(p={p:.3g} >= {alpha}){also}", "all seeds agree; p >= alpha")
    return (f"no significant difference (p={p:.3g} >= {alpha}, {out['test_used']}; {count['text']})",
            "no significant difference")


def holm(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjustment (Holm 1979, Scand. J. Statist. 6:65-70) of the non-None
    p-values, in their order: the i-th smallest of m becomes max over j <= i of
    min(1, (m - j + 1) p_(j)). Rejecting where the adjusted p < alpha controls the family-wise
    error at alpha. None stays None (no test)."""
    idx = [i for i, p in enumerate(p_values) if p is not None]
    m = len(idx)
    out: list[float | None] = [None] * len(p_values)
    running = 0.0
    for j, i in enumerate(sorted(idx, key=lambda i: p_values[i])):
        running = max(running, min(1.0, (m - j) * float(p_values[i])))
        out[i] = running
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
