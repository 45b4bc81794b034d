"""cwa_core.campaign_stats: Wilson intervals, the exact McNemar test and the quantile rule against
independent references; summaries, pairs and the headline on rows built to known answers."""
from __future__ import annotations

import math
import random
import subprocess
import sys

import numpy as np
import pytest
from scipy.stats import binomtest, norm

from conftest import ROOT
from cwa_core import campaign_stats as cs

RATES = (1e-7, 1e-6, 1e-5, 1e-4)


def row(arm, level, seed, trial, ratio, status=None):
    status = status or ("finite" if math.isfinite(ratio) else ("nan" if math.isnan(ratio) else "inf"))
    return {"arm": arm, "level": level, "seed": seed, "trial": trial, "ppl_ratio": ratio, "ppl": 10.0 * ratio,
            "status": status, "n_protected": 4, "changed": 1, "drawn": 1, "protected_hits": 0, "nll": 2.3,
            "seconds": 0.01}


def curve_rows(arm, levels, failures, n=20, seeds=(0, 1)):
    """``n`` trials per seed and level; at level i the first ``failures[i] * n`` trials of each seed fail
    (ratio 3, above the threshold 2), the others have ratio 1.1."""
    out = []
    for level, rate in zip(levels, failures):
        for seed in seeds:
            k = round(rate * n)
            out += [row(arm, level, seed, t, 3.0 if t < k else 1.1) for t in range(n)]
    return out


def summarize(rows, level_name="error_rate", harsher=1, arms=("top_k", "random_k"), **kw):
    return cs.summarize(rows, fail_ratio=2.0, level_name=level_name, harsher=harsher, arms=list(arms), **kw)


def test_importing_it_pulls_in_neither_torch_nor_scipy():
    code = "import sys, cwa_core.campaign_stats; print('torch' in sys.modules, 'scipy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}).stdout.split()
    assert out == ["False", "False"]


# ----------------------------------------------------------------------------- Wilson


def wilson_reference(k, n, conf):
    """Agresti & Coull (1998), Am. Stat. 52:119, eq. (2): the score interval as the roots of the
    quadratic |p_hat - p| = z sqrt(p(1 - p)/n), written in the closed form of Newcombe (1998),
    Stat. Med. 17:857, method 3: (2np + z^2 +- z sqrt(z^2 + 4np(1-p))) / (2(n + z^2))."""
    z = norm.ppf(1 - (1 - conf) / 2)
    p = k / n
    root = z * math.sqrt(z * z + 4 * n * p * (1 - p))
    return ((2 * n * p + z * z - root) / (2 * (n + z * z)), (2 * n * p + z * z + root) / (2 * (n + z * z)))


@pytest.mark.parametrize("conf", [0.8, 0.95, 0.99])
def test_wilson_matches_an_independent_formula(conf):
    for n in (1, 2, 5, 17, 100, 1000):
        for k in sorted({0, 1, n // 3, n // 2, n - 1, n}):
            assert cs.wilson(k, n, conf) == pytest.approx(wilson_reference(k, n, conf), abs=1e-12)


def test_wilson_textbook_values():
    # Newcombe (1998), Stat. Med. 17:857, Table I, method 3 (score interval, 95%)
    for (k, n), (lo, hi) in {(81, 263): (0.2553, 0.3662), (15, 148): (0.0624, 0.1605),
                             (0, 20): (0.0, 0.1611), (1, 29): (0.0061, 0.1718)}.items():
        got = cs.wilson(k, n)
        assert round(got[0], 4) == lo and round(got[1], 4) == hi


def test_wilson_edges():
    assert all(math.isnan(v) for v in cs.wilson(0, 0))
    assert cs.wilson(0, 7)[0] == 0.0 and cs.wilson(7, 7)[1] == 1.0
    assert cs.wilson(1, 1) == (pytest.approx(wilson_reference(1, 1, 0.95)[0]), 1.0)
    for bad in ((3, 2), (-1, 2), (0.5, 2)):
        with pytest.raises(ValueError, match="wilson"):
            cs.wilson(*bad)
    with pytest.raises(ValueError, match="confidence"):
        cs.wilson(1, 2, 1.0)


# ----------------------------------------------------------------------------- McNemar


def test_exact_mcnemar_is_scipys_two_sided_binomial_test():
    for b in range(0, 26):
        for c in range(0, 26):
            if b + c:
                assert cs.mcnemar_exact(b, c) == pytest.approx(binomtest(min(b, c), b + c, 0.5).pvalue, rel=1e-12)
    assert cs.mcnemar_exact(0, 0) == 1.0
    assert cs.mcnemar_exact(0, 6) == 2 / 64 == cs.mcnemar_exact(6, 0)  # 2 * (1/2)^6
    assert cs.mcnemar_exact(5, 5) == 1.0
    assert 0.0 <= cs.mcnemar_exact(0, 2000) < 1e-300  # 2 / 2^2000: no overflow on the way
    with pytest.raises(ValueError, match="discordant"):
        cs.mcnemar_exact(-1, 2)


# ----------------------------------------------------------------------------- quantiles


def test_quantile_is_numpys_linear_rule_and_keeps_inf():
    x = np.random.default_rng(3).lognormal(size=37)
    for q in (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0):
        assert cs.quantile(x, q) == pytest.approx(float(np.quantile(x, q)), rel=1e-14)
    assert cs.quantile([4.0], 0.05) == 4.0 == cs.quantile([4.0], 0.95)  # n = 1: the value
    assert math.isnan(cs.quantile([], 0.5))
    assert cs.quantile([1.0, 2.0, math.inf], 0.5) == 2.0
    assert cs.quantile([1.0, 2.0, math.inf], 0.05) == pytest.approx(1.1)
    assert cs.quantile([1.0, 2.0, math.inf], 0.75) == math.inf
    assert cs.quantile([math.inf, math.inf], 0.5) == math.inf  # numpy gives NaN here
    assert cs.quantile([2.0, 2.0, 2.0], 0.3) == 2.0
    assert cs.quantile([1.0, math.inf], 0.0) == 1.0 and cs.quantile([1.0, math.inf], 1e-9) == math.inf
    for bad in ([1.0, math.nan], [-math.inf, 1.0]):
        with pytest.raises(ValueError, match="quantile"):
            cs.quantile(bad, 0.5)


# ----------------------------------------------------------------------------- summary


def test_failures_quantiles_and_non_finite_counts():
    ratios = [1.0, 2.0, 2.0000001, 5.0, math.inf, math.nan]  # 2.0 itself is no failure
    rows = [row("top_k", 1e-6, 0, t, r) for t, r in enumerate(ratios)]
    rows.append({**row("top_k", 1e-6, 0, 6, 1.0), "status": "nan"})  # a status says NaN: a failure
    rows.append({**row("top_k", 1e-6, 0, 7, 1.0), "ppl_ratio": None})  # a null ratio reads as NaN
    (s,) = summarize(rows, arms=["top_k"])["summary"]
    assert (s["n"], s["failures"], s["nonfinite"], s["n_inf"], s["n_nan"]) == (8, 6, 3, 1, 2)
    assert s["failure_rate"] == 6 / 8 and (s["failure_lo"], s["failure_hi"]) == cs.wilson(6, 8)
    kept = sorted([1.0, 2.0, 2.0000001, 5.0, 1.0])  # NaN left out; inf kept as the largest value
    for key, q in (("q05", 0.05), ("q25", 0.25), ("median_ratio", 0.5), ("q75", 0.75)):  # below the inf
        assert s[key] == pytest.approx(float(np.quantile(kept + [1e300], q)), rel=1e-15)
    assert s["median_ratio"] == pytest.approx(2.00000005) and s["q95"] == math.inf


def test_order_of_arms_and_levels_and_unsorted_rows():
    rows = curve_rows("top_k", RATES, [0, 0, 0.5, 1]) + curve_rows("random_k", RATES, [0, 0.5, 1, 1]) \
        + curve_rows("none", RATES, [0.1, 0.6, 1, 1]) + curve_rows("super_weights", RATES, [0, 0, 0, 0])
    shuffled = rows[:]
    random.Random(1).shuffle(shuffled)
    arms = ["none", "top_k", "random_k"]  # super_weights' rows are left out
    a, b = summarize(rows, arms=arms), summarize(shuffled, arms=arms)
    assert a == b
    assert [(s["arm"], s["level"]) for s in a["summary"]] == [(arm, lv) for arm in arms for lv in RATES]
    assert [s["failure_rate"] for s in a["summary"] if s["arm"] == "none"] == [0.1, 0.6, 1.0, 1.0]
    assert [(p["level"], p["arm"]) for p in a["paired"]] == [(lv, arm) for lv in RATES for arm in ("none", "top_k")]


def test_one_trial_all_failures_and_no_failures():
    (one,) = summarize([row("top_k", 0.5, 3, 0, 1.7)], level_name="sparsity", arms=["top_k"])["summary"]
    assert one["n"] == 1 and one["median_ratio"] == one["q05"] == one["q95"] == 1.7 and one["failures"] == 0
    assert (one["failure_lo"], one["failure_hi"]) == cs.wilson(0, 1)
    every = summarize([row("top_k", 1e-5, 0, t, math.inf) for t in range(4)], arms=["top_k"])["summary"][0]
    assert every["failure_rate"] == 1.0 and every["failure_hi"] == 1.0 and every["median_ratio"] == math.inf
    nans = summarize([row("top_k", 1e-5, 0, t, math.nan) for t in range(3)], arms=["top_k"])["summary"][0]
    assert nans["failures"] == 3 and math.isnan(nans["median_ratio"]) and nans["nonfinite"] == 3


def test_missing_arms_and_bad_input():
    out = summarize(curve_rows("top_k", RATES, [0, 0, 0.5, 1]), arms=["none", "top_k", "random_k"])
    assert {s["arm"] for s in out["summary"]} == {"top_k"} and out["paired"] == []
    assert out["headline"]["available"] is False and "random_k" in out["headline"]["why"]
    assert summarize([], arms=["top_k"])["summary"] == []
    dup = [row("top_k", 1e-6, 0, 1, 1.0)] * 2
    with pytest.raises(ValueError, match="appears twice"):
        summarize(dup)
    with pytest.raises(ValueError, match="lacks level"):
        summarize([{"arm": "top_k", "seed": 0}])
    for kw, match in (({"fail_ratio": 0}, "fail_ratio"), ({"level_name": "rate"}, "level_name"),
                      ({"harsher": 0}, "harsher"), ({"arms": []}, "arms"), ({"arms": "top_k"}, "arms"),
                      ({"target": 0.0}, "target"), ({"confidence": 1.5}, "confidence")):
        args = {"fail_ratio": 2.0, "level_name": "error_rate", "harsher": 1, "arms": ["top_k"], **kw}
        with pytest.raises(ValueError, match=match):
            cs.summarize([], **args)


# ----------------------------------------------------------------------------- paired


def test_paired_counts_p_value_and_log_ratio_difference():
    top = [1.1, 3.0, 1.2, 1.0, math.inf, 1.3]  # fails: trials 1 and 4
    ref = [3.0, 3.0, 4.0, 5.0, 1.1, math.nan]  # fails: 0, 1, 2, 3, 5
    rows = [row("top_k", 1e-6, 0, t, r) for t, r in enumerate(top)]
    rows += [row("random_k", 1e-6, 0, t, r) for t, r in enumerate(ref)]
    rows.append(row("random_k", 1e-6, 0, 99, 9.0))  # no partner: not a pair
    (p,) = summarize(rows)["paired"]
    assert (p["n_pairs"], p["arm_only_fail"], p["reference_only_fail"]) == (6, 1, 4)
    assert p["p_value"] == pytest.approx(binomtest(1, 5, 0.5).pvalue, rel=1e-12) == 0.375
    diffs = [math.log(a) - math.log(b) for a, b in zip(top, ref) if math.isfinite(a) and math.isfinite(b)]
    assert p["median_log_ratio_diff"] == pytest.approx(float(np.median(diffs)), rel=1e-14)


def test_paired_with_no_finite_pair_has_nan_difference():
    rows = [row("top_k", 8, 0, 0, math.inf), row("random_k", 8, 0, 0, 1.0)]
    (p,) = summarize(rows, level_name="quant_bits", harsher=-1)["paired"]
    assert math.isnan(p["median_log_ratio_diff"]) and p["p_value"] == 1.0 and p["arm_only_fail"] == 1


# ----------------------------------------------------------------------------- headline


def headline(top, ref, levels=RATES, level_name="error_rate", harsher=1, **kw):
    rows = curve_rows("top_k", levels, top) + curve_rows("random_k", levels, ref)
    return summarize(rows, level_name=level_name, harsher=harsher, **kw)["headline"]


def test_headline_error_rate_known_answers():
    h = headline([0, 0, 0.5, 1], [0, 0.5, 1, 1])  # reached exactly at 1e-5 and 1e-6
    assert h["available"] and not h["censored"]
    assert h["tolerated"]["top_k"]["level"] == pytest.approx(1e-5, rel=1e-12)
    assert h["tolerated"]["random_k"]["level"] == pytest.approx(1e-6, rel=1e-12)
    assert h["value"] == pytest.approx(10.0, rel=1e-12) and h["unit"] == "x"
    assert h["interval"][0] <= h["value"] <= h["interval"][1]
    assert h["tolerated"]["random_k"]["failure_rate"] == [0, 0.5, 1, 1]
    h = headline([0, 0.2, 0.8, 1], [0.2, 0.8, 1, 1])  # half way in log10: 10^-5.5 and 10^-6.5
    assert h["tolerated"]["top_k"]["level"] == pytest.approx(10 ** -5.5, rel=1e-12)
    assert h["tolerated"]["random_k"]["level"] == pytest.approx(10 ** -6.5, rel=1e-12)
    assert h["value"] == pytest.approx(10.0, rel=1e-12) and "L(top-K) / L(random-K) = 10," in h["text"] and "log10" in h["text"]


def test_headline_bits_and_sparsity_known_answers():
    h = headline([0, 0, 0.5, 1], [0, 0.5, 1, 1], levels=(8, 4, 3, 2), level_name="quant_bits", harsher=-1)
    assert (h["tolerated"]["top_k"]["level"], h["tolerated"]["random_k"]["level"], h["value"]) == (3, 4, 1)
    assert h["unit"] == "bits"
    # levels given ascending; harsher = fewer bits: random_k reaches 0.5 half way from 8 to 4 bits
    h = headline([1, 1, 0.5, 0], [1, 1, 1, 0], levels=(2, 3, 4, 8), level_name="quant_bits", harsher=-1)
    assert h["tolerated"]["random_k"]["level"] == pytest.approx(6.0) and h["tolerated"]["top_k"]["level"] == 4
    assert h["value"] == pytest.approx(2.0) and h["tolerated"]["top_k"]["levels"] == [8, 4, 3, 2]
    h = headline([0, 0.25, 0.75], [0.25, 0.75, 1], levels=(0.3, 0.5, 0.7), level_name="sparsity")
    assert h["tolerated"]["top_k"]["level"] == pytest.approx(0.6) and h["value"] == pytest.approx(0.2)
    assert h["tolerated"]["random_k"]["level"] == pytest.approx(0.4) and h["unit"] == "sparsity"


def test_identical_arms_give_one_and_zero_with_a_degenerate_interval():
    h = headline([0, 0.3, 0.7, 1], [0, 0.3, 0.7, 1])
    assert h["value"] == 1.0 and h["interval"] == [1.0, 1.0]
    h = headline([0, 0.3, 0.7], [0, 0.3, 0.7], levels=(8, 4, 3), level_name="quant_bits", harsher=-1)
    assert h["value"] == 0.0 and h["interval"] == [0.0, 0.0]


def test_every_trial_of_a_level_alike_gives_a_degenerate_interval_at_the_point():
    h = headline([0, 0, 1, 1], [0, 1, 1, 1])  # 0 -> 1 between levels: half way in log10
    assert h["value"] == pytest.approx(10.0) and h["interval"] == [pytest.approx(10.0)] * 2
    assert h["bootstrap"] == {"replicates": 2000, "seed": cs.BOOTSTRAP_SEED, "undetermined": 0}


def test_a_noisy_interval_contains_the_point_and_is_reproducible():
    rng = np.random.default_rng(5)
    rows = [row(arm, lv, s, t, 1.0 + rng.exponential(lv / scale)) for arm, scale in
            (("top_k", 1e-5), ("random_k", 1e-6)) for lv in RATES for s in (0, 1) for t in range(15)]
    h1, h2 = summarize(rows)["headline"], summarize(rows[::-1])["headline"]
    assert h1 == h2
    lo, hi = h1["interval"]
    assert lo < h1["value"] < hi and 1.0 < lo


def test_censored_tolerated_levels_give_bounds():
    h = headline([0, 0, 0, 0.25], [0, 0.5, 1, 1])  # top_k never reaches 50%
    top = h["tolerated"]["top_k"]
    assert top["censored"] and top["level"] is None and top["bound"] == ">= 0.0001" and top["bound_level"] == 1e-4
    assert h["censored"] and h["value"] is None and h["bound"] == ">= 100"
    assert h["bound_value"] == pytest.approx(100.0) and "L(top-K) / L(random-K) >= 100 (" in h["text"]
    h = headline([0.5, 1, 1, 1], [0, 0, 0.5, 1])  # top_k fails already at the mildest rate
    assert h["tolerated"]["top_k"]["bound"] == "<= 1e-07" and h["bound"] == "<= 0.01"
    h = headline([0, 0.5, 1], [0, 0, 0], levels=(8, 4, 3), level_name="quant_bits", harsher=-1)
    assert h["tolerated"]["random_k"]["bound"] == "<= 3" and h["bound"] == "<= -1"  # bits: fewer is harsher
    h = headline([0.75, 1], [0.5, 1], levels=(8, 4), level_name="quant_bits", harsher=-1)
    assert h["tolerated"]["top_k"]["bound"] == ">= 8"


@pytest.mark.parametrize("rate", [0.0, 1.0])
def test_no_failures_or_all_failures_cannot_be_bounded(rate):
    h = headline([rate] * 4, [rate] * 4)
    assert h["available"] and h["value"] is None and h["bound"] is None and "cannot be bounded" in h["text"]
    assert h["bootstrap"]["undetermined"] == 2000 and h["interval"] == [0.0, math.inf]  # 10^-inf, 10^inf


def test_headline_unavailable_with_one_level_or_error_rate_zero():
    h = headline([0.4], [0.6], levels=(1e-6,))
    assert h["available"] is False and "at least 2" in h["why"]
    h = headline([0, 1], [0, 1], levels=(0.0, 1e-6))  # rate 0 has no log10: one level left
    assert h["available"] is False
    h = headline([0, 1], [0, 1], levels=(0.0, 0.5), level_name="sparsity")  # sparsity 0 is a level
    assert h["available"] and h["value"] == 0.0


def test_headline_uses_the_reference_given():
    rows = curve_rows("top_k", RATES, [0, 0, 0.5, 1]) + curve_rows("bottom_k", RATES, [0, 0.5, 1, 1])
    h = summarize(rows, arms=["top_k", "bottom_k"], reference="bottom_k")["headline"]
    assert h["reference"] == "bottom_k" and h["value"] == pytest.approx(10.0)
    assert "bottom-K" in h["text"]
