"""Where the top-K weights live, tested against where the model's parameters are.

Enrichment of a group (a parameter type, a relative-depth bin) = the share of the top-K weights
in it / the share of the model's scored parameters in it; 1 is "as many as its size gives".
The null hypothesis of "no enrichment" is that the K top weights fall into the groups like K
weights drawn at random: counts ~ Multinomial(K, parameter shares).

- :func:`enrichment_rows` (per group): the exact two-sided binomial test of the count against
  Binomial(K, share) (``scipy.stats.binomtest``), and the enrichment's 95% interval: the exact
  (Clopper-Pearson) interval of the top-K share, divided by the parameter share.
- :func:`goodness_of_fit` (one model, all groups): Pearson's chi-square goodness of fit of the
  counts against K x share, groups - 1 degrees of freedom.
- :func:`compare_enrichment` (two models): do their enrichment profiles differ? A
  likelihood-ratio test (G^2) of the model x group interaction in a Poisson log-linear model of
  the counts, log E[count(m, g)] = log(K_m share(m, g)) + a_m + b_g, each model's own parameter
  shares as the offset and its overall level a_m free. Two models that each place their top-K
  in proportion to their own parameter counts have equal profiles (b_g = 0), whatever their
  shares; with equal shares the test is the G-test of homogeneity of the raw counts.

Counts are the mean top-K count per seed (seeds of one model re-measure one top-K set and
overlap: they are not pooled as independent draws); the exact tests take them to the nearest
whole weight. Statistics use scipy; the tests (tests/test_analysis.py) recompute every number
from the formulas.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

LEVEL = 0.95
SMALL_EXPECTED = 5.0  # the chi-square approximation is poor below this expected count
COUNTS_NOTE = ("counts are the mean top-K count per seed; the exact per-group tests and intervals use them rounded to "
               "whole weights")
METHOD = {
    "enrichment": "share of the top-K weights in a group / share of the model's scored parameters in it",
    "per_group": "exact two-sided binomial test of the group's count against Binomial(K, parameter share); "
                 "interval: 95% Clopper-Pearson interval of the top-K share / parameter share",
    "fit": "Pearson chi-square goodness of fit of the counts against K x parameter share (groups - 1 dof)",
    "comparison": "likelihood-ratio test (G^2, groups - 1 dof) of the model x group interaction in a Poisson "
                  "log-linear model with offset log(K x the model's own parameter share): do the two models' "
                  "enrichment profiles differ? Never a test of raw counts",
    "counts": COUNTS_NOTE,
}


def _aligned(counts: Mapping, shares: Mapping) -> tuple[list, np.ndarray, np.ndarray, list]:
    """Groups with a positive parameter share (sorted), their counts and shares renormalised
    over them; and the groups left out (no parameters there: nothing to compare against)."""
    groups = sorted({*counts, *shares}, key=str)
    keep = [g for g in groups if shares.get(g) is not None and float(shares[g]) > 0]
    dropped = [g for g in groups if g not in keep]
    x = np.array([float(counts.get(g, 0.0)) for g in keep])
    s = np.array([float(shares[g]) for g in keep])
    return keep, x, (s / s.sum() if s.size else s), dropped


def enrichment_rows(counts: Mapping, shares: Mapping, level: float = LEVEL) -> dict:
    """Per group: enrichment, its interval and the exact binomial p. ``counts``: group -> mean
    top-K count per seed; ``shares``: group -> share of the scored parameters (sums to 1)."""
    from scipy import stats

    k = sum(float(v) for v in counts.values())
    n = int(round(k))
    out = {}
    for g in sorted({*counts, *shares}, key=str):
        c, s = float(counts.get(g, 0.0)), shares.get(g)
        row = {"count": c, "share": c / k if k else None, "weight_share": s, "enrichment": None,
               "enrichment_ci": [None, None], "p_value": None}
        if s and s > 0 and n > 0:
            x = min(int(round(c)), n)
            bt = stats.binomtest(x, n, float(s))
            ci = bt.proportion_ci(confidence_level=level, method="exact")
            row.update(enrichment=(c / k) / s, enrichment_ci=[ci.low / s, ci.high / s], p_value=float(bt.pvalue))
        out[g] = row
    return out


def goodness_of_fit(counts: Mapping, shares: Mapping) -> dict:
    """Chi-square goodness of fit of one model's top-K counts to its own parameter shares."""
    from scipy import stats

    groups, x, s, dropped = _aligned(counts, shares)
    out = {"test": "chi-square goodness of fit to the parameter shares", "groups": [str(g) for g in groups],
           "chi2": None, "dof": None, "p_value": None, "k": float(x.sum()) if x.size else 0.0}
    if dropped:
        out["groups_without_parameters"] = [str(g) for g in dropped]
        if any(float(counts.get(g, 0)) > 0 for g in dropped):
            out["note"] = "top-K weights in a group with no parameter count (sensitivity_stats.json): left out"
    if len(groups) < 2 or x.sum() <= 0:
        out["note"] = "fewer than 2 groups with parameters, or no top-K weight: nothing to test"
        return out
    expected = x.sum() * s
    chi2, p = stats.chisquare(x, expected)
    out.update(chi2=float(chi2), dof=len(groups) - 1, p_value=float(p), min_expected=float(expected.min()))
    if expected.min() < SMALL_EXPECTED:
        out["note"] = (f"an expected count is under {SMALL_EXPECTED:g} ({expected.min():.3g}): the chi-square "
                       "approximation is rough there; the per-group exact tests hold")
    return out


def poisson_offset_fit(x: np.ndarray, e: np.ndarray, tol: float = 1e-12, max_iter: int = 100_000) -> np.ndarray:
    """Maximum-likelihood means of log mu = log e + a_row + b_col for a table of counts ``x``
    (R, G) with positive offsets ``e``, by iterative proportional fitting (the row and column
    sums of ``x`` are the sufficient statistics: the fit matches them)."""
    mu = e * (x.sum() / e.sum())
    for _ in range(max_iter):
        mu *= (x.sum(axis=1) / mu.sum(axis=1))[:, None]
        mu *= x.sum(axis=0) / mu.sum(axis=0)
        if np.abs(mu.sum(axis=1) - x.sum(axis=1)).max() <= tol * max(1.0, x.sum()):
            break
    return mu


def compare_enrichment(counts_a: Mapping, shares_a: Mapping, counts_b: Mapping, shares_b: Mapping) -> dict:
    """Do two models' enrichment profiles differ (each against its own parameter shares)? See
    the module docstring; groups missing from either model's parameters, and groups with no
    top-K weight in either model, carry no information on the difference and are left out."""
    from scipy import stats

    ga, xa, sa, _ = _aligned(counts_a, shares_a)
    gb, xb, sb, _ = _aligned(counts_b, shares_b)
    ia, ib = {g: i for i, g in enumerate(ga)}, {g: i for i, g in enumerate(gb)}
    common = [g for g in ga if g in ib and xa[ia[g]] + xb[ib[g]] > 0]
    out = {"test": "likelihood-ratio test of the model x group interaction (Poisson log-linear, offset: each model's "
                   "own parameter shares)", "groups": [str(g) for g in common], "g2": None, "chi2_pearson": None,
           "dof": None, "p_value": None}
    left = sorted({*map(str, ga), *map(str, gb)} - set(out["groups"]))
    if left:
        out["groups_left_out"] = left
    if len(common) < 2 or xa.sum() <= 0 or xb.sum() <= 0:
        out["note"] = "fewer than 2 groups with parameters and top-K weights in both models: nothing to test"
        return out
    x = np.array([[xa[ia[g]] for g in common], [xb[ib[g]] for g in common]])  # (2, G)
    e = np.array([[xa.sum() * sa[ia[g]] for g in common], [xb.sum() * sb[ib[g]] for g in common]])
    mu = poisson_offset_fit(x, e)
    with np.errstate(divide="ignore", invalid="ignore"):
        g2 = 2.0 * float(np.where(x > 0, x * np.log(x / mu), 0.0).sum())
    g2 = max(g2, 0.0)  # rounding can leave -1e-15 where the profiles are equal
    dof = len(common) - 1
    out.update(g2=g2, chi2_pearson=float(((x - mu) ** 2 / mu).sum()), dof=dof, p_value=float(stats.chi2.sf(g2, dof)))
    return out
