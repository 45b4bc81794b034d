"""Statistics that are honest with few seeds (issue 15, point 5): intervals with their real
coverage, the evaluation windows' spread where seeds carry none, paired tests that report the
count of agreeing seeds (inf ranked largest), and Holm's adjustment over a report's tests.
Each with a known answer computed here independently of analysis/stats.py."""
from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from analysis.compare import CompareOptions, ratio_summary
from analysis.cross_model import AnalysisOptions, analyze
from analysis.stats import holm, min_attainable_p, paired_test, seed_interval, signed_rank_exact, window_bootstrap
from synthetic_results import SynthCell, SynthModel, write_cell

FAST = AnalysisOptions(compare=CompareOptions(n_boot=2000), figures=False)


def by(rows, **match):
    return [r for r in rows if all(r.get(k) == v for k, v in match.items())]


# --------------------------------------------------------------------------- intervals over seeds

@pytest.mark.parametrize("values", [[2.0, 3.0, 5.0], [100.0, 120.0, 110.0, 95.0], [1.01, 1.02, 1.0, 1.05, 0.99, 1.03]])
def test_t_interval_on_log_ratios_equals_scipy(values):
    x = np.log(values)
    lo, hi = sps.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=sps.sem(x))  # independent: scipy on the logs
    iv = seed_interval(values)
    assert iv["code"] == "t" and iv["coverage"] == 0.95
    assert iv["lo"] == pytest.approx(math.exp(lo), rel=1e-12) and iv["hi"] == pytest.approx(math.exp(hi), rel=1e-12)
    assert iv["geomean"] == pytest.approx(math.exp(x.mean()), rel=1e-12)
    assert (iv["warning"] is not None) == (len(values) < 5)


def _lognormal_groups(n_draws: int, n_seeds: int, rng: np.random.Generator) -> pd.DataFrame:
    """``n_draws`` groups of ``n_seeds`` lognormal ratios (true geometric mean 3.0), in the
    results-table shape that ratio_summary reads."""
    ratios = 3.0 * np.exp(rng.normal(0.0, 0.4, size=(n_draws, n_seeds)))
    g = np.repeat(np.arange(n_draws), n_seeds)
    return pd.DataFrame({"protocol": "P1", "model": [f"m{i:05d}" for i in g], "metric": "grad_x_weight", "k": 10,
                         "mode": "global", "perturbation": "zero", "variant": "v", "selection": "random_k",
                         "seed": np.tile(np.arange(n_seeds), n_draws), "ratio": ratios.ravel(),
                         "ppl_status": "finite", "cell": [f"c{i}" for i in g], "model_name": "m"})


@pytest.mark.parametrize("n_seeds", [3, 5])
def test_interval_coverage_at_three_and_five_seeds(n_seeds):
    """2000 studies of n lognormal seeds: the interval the ratio table prints must cover the true
    geometric mean 95% of the time. The percentile bootstrap over seeds gave 74% (n = 3) and
    84% (n = 5): over 3 seeds it is [min, max]. Binomial sd of the coverage over 2000 draws: 0.5%."""
    df = _lognormal_groups(2000, n_seeds, np.random.default_rng(20250 + n_seeds))
    rows = ratio_summary(df, CompareOptions(n_boot=500))
    assert len(rows) == 2000
    covered = np.mean([r["geomean_ci"][0] <= 3.0 <= r["geomean_ci"][1] for r in rows])
    assert abs(covered - 0.95) < 0.017, covered
    assert all(r["interval_code"] == "t" and r["warning"] for r in rows) if n_seeds < 5 else True


def test_three_seeds_interval_is_wider_than_min_max():
    iv = seed_interval([1.0, 2.0, 3.0])
    assert iv["lo"] < 1.0 and iv["hi"] > 3.0  # [min, max] was the old interval; t(2) = 4.30 reaches beyond


# --------------------------------------------------------------------------- the evaluation windows

def test_window_bootstrap_known_answers():
    rng = np.random.default_rng(0)
    base = rng.uniform(100, 200, size=40)
    tokens = np.full(40, 63.0)
    # the same per-token damage in every window: every resample gives exp(0.5), zero width
    same = window_bootstrap(base, base + 0.5 * tokens, tokens, n_boot=500)
    assert same["ratio"] == pytest.approx(math.exp(0.5), rel=1e-12)
    assert same["lo"] == pytest.approx(math.exp(0.5), rel=1e-12) and same["hi"] == pytest.approx(math.exp(0.5), rel=1e-12)
    # two windows: a resample is (0, 0), (1, 1) (1/4 each) or one of each (1/2), so the 2.5% and
    # 97.5% quantiles are the two single-window ratios exactly
    two = window_bootstrap([10.0, 10.0], [12.0, 20.0], [5.0, 5.0], n_boot=4000)
    assert two["lo"] == pytest.approx(math.exp(2 / 5), rel=1e-12) and two["hi"] == pytest.approx(math.exp(10 / 5), rel=1e-12)
    assert two["ratio"] == pytest.approx(math.exp(12 / 10), rel=1e-12)


def test_window_bootstrap_agrees_with_the_normal_theory_interval():
    """Many windows of equal length: the ratio is exp(mean d / T) with d the per-window NLL
    difference, and its 95% interval is close to exp((mean d -+ 1.96 sd(d) / sqrt(W)) / T)."""
    rng = np.random.default_rng(1)
    w, tok = 400, 127.0
    base = rng.normal(300, 20, size=w)
    d = rng.normal(0.3 * tok, 15, size=w)
    wb = window_bootstrap(base, base + d, np.full(w, tok), n_boot=10_000, seed=3)
    half = 1.96 * d.std(ddof=1) / math.sqrt(w) / tok
    assert math.log(wb["ratio"]) == pytest.approx(d.mean() / tok, rel=1e-12)
    assert math.log(wb["lo"]) == pytest.approx(d.mean() / tok - half, abs=0.08 * half)
    assert math.log(wb["hi"]) == pytest.approx(d.mean() / tok + half, abs=0.08 * half)


def test_window_bootstrap_inf_and_missing():
    inf = window_bootstrap([1.0, 1.0, 1.0], [2.0, math.inf, 2.0], [1.0, 1.0, 1.0], n_boot=1000)
    assert inf["ratio"] == math.inf and inf["hi"] == math.inf and inf["lo"] == pytest.approx(math.e)
    nan = window_bootstrap([1.0, 1.0], [2.0, math.nan], [1.0, 1.0])
    assert nan["lo"] is None and "no interval" in nan["note"]


def _add_windows(folder, c: SynthCell, *, n_windows: int = 16, seed: int = 0, flag: bool | None = None) -> None:
    """window_nll.parquet beside a synthetic cell, consistent with its ratios: each row's
    per-window NLL is the baseline's plus a noisy per-window damage summing to log(ratio) x
    tokens. ``flag``: the metric's data_independent flag in perturbation_results.json."""
    rng = np.random.default_rng(seed)
    tok = c.window_length - 1
    base = rng.uniform(2.0, 3.0, size=n_windows) * tok
    rows = [("baseline", -1, base)]
    noise = rng.normal(0.0, 0.3, size=n_windows) * tok
    noise -= noise.mean()
    for sel, vals in c.ratios.items():
        for s, r in zip(c.seeds, vals):
            rows.append((sel, s, base + math.log(r) * tok + noise * (1.0 if r != 1.0 else 0.0)))
    df = pd.DataFrame([{"selection": sel, "seed": s, "window": i, "nll": v, "tokens": tok}
                       for sel, s, nll in rows for i, v in enumerate(nll)])
    df.to_parquet(folder / "window_nll.parquet", index=False)
    pert = json.loads((folder / "perturbation_results.json").read_text())
    pert["window_nll"] = "window_nll.parquet"
    if flag is not None:
        pert["data_independent"] = flag
    (folder / "perturbation_results.json").write_text(json.dumps(pert))


def test_data_independent_metric_gets_the_windows_spread_not_a_zero_width_interval(tmp_path):
    """magnitude: top-K and bottom-K do not depend on the seed, so every seed gives the same
    ratio; the interval must come from the evaluation windows (it had zero width)."""
    c = SynthCell(metric="magnitude", jaccard=1.0, ratios={"top_k": [50.0] * 3, "random_k": [1.4, 1.6, 1.5],
                                                            "bottom_k": [1.0] * 3})
    d = write_cell(tmp_path / "mag", c)
    _add_windows(d, c)
    a = analyze([str(tmp_path)], options=FAST)
    top = by(a["ratios"], selection="top_k")[0]
    assert top["interval_code"] == "windows" and "evaluation windows" in top["interval"]
    lo, hi = top["ci"]
    assert lo < 50.0 < hi and hi / lo > 1.05, top["ci"]  # a real spread, around the measured ratio
    w = pd.read_parquet(d / "window_nll.parquet")
    b, p = w[w.selection == "baseline"], w[(w.selection == "top_k") & (w.seed == 0)]
    want = window_bootstrap(b["nll"], p["nll"], b["tokens"], n_boot=2000, seed=0)
    assert (lo, hi) == (want["lo"], want["hi"]) and top["window_bootstrap"]["n_windows"] == 16
    assert by(a["ratios"], selection="random_k")[0]["interval_code"] == "t"  # random_k draws vary by seed
    # the deterministic pair (top vs bottom) is reported as a count, not tested as if replicated
    tb = by(a["paired_tests"], control="bottom_k")[0]
    assert tb["deterministic"] and tb["count_text"] == "3/3 seeds: top_k > bottom_k" and tb["p_value"] is None
    assert "not enough seeds" not in tb["verdict"]


def test_without_window_numbers_no_spread_is_said_and_one_seed_uses_the_flag(tmp_path):
    old = SynthCell(metric="magnitude", jaccard=1.0, ratios={"top_k": [50.0] * 3, "random_k": [1.4, 1.6, 1.5]})
    write_cell(tmp_path / "old", old)
    one = SynthCell(metric="magnitude", seeds=(0,), jaccard=None, ratios={"top_k": [40.0], "random_k": [1.5]},
                    model=SynthModel("synth/one", n_layers=4))
    _add_windows(write_cell(tmp_path / "one", one), one, flag=True)  # no stability.json: the flag says it
    a = analyze([str(tmp_path)], options=FAST)
    old_top = by(a["ratios"], selection="top_k", model="synth/llama-a")[0]
    assert old_top["interval_code"] == "zero" and "no per-window numbers" in old_top["note"]
    one_top = by(a["ratios"], selection="top_k", model="synth/one")[0]
    assert one_top["data_independent"] and one_top["interval_code"] == "windows" and one_top["ci"][0] < 40.0 < one_top["ci"][1]
    one_rnd = by(a["ratios"], selection="random_k", model="synth/one")[0]
    assert one_rnd["interval_code"] == "none" and one_rnd["ci"] == [None, None]


# --------------------------------------------------------------------------- paired tests

def test_top_inf_inf_40_against_random_is_reported_as_a_count_not_no_difference():
    """Issue 15: "top [inf, inf, 40] vs random [1.1, 1.2, 1.15] reads no significant difference"."""
    r = paired_test([math.inf, math.inf, 40.0], [1.1, 1.2, 1.15])
    assert "no significant difference" not in r["verdict"], r["verdict"]
    assert r["verdict"].startswith("3/3 seeds: top_k > control: every seed agrees")
    assert r["count"] == {"top_greater": 3, "control_greater": 0, "equal": 0, "n": 3,
                          "text": "3/3 seeds: top_k > control"}
    named = paired_test([math.inf, math.inf, 40.0], [1.1, 1.2, 1.15], names=("top_k", "random_k"))
    assert named["count_text"] == "3/3 seeds: top_k > random_k"
    assert r["min_attainable_p"] == 0.25 and "smallest attainable p = 0.25" in r["verdict"]
    assert r["p_value"] == pytest.approx(0.25)  # 2 of the 2^3 sign patterns are as extreme


def test_all_inf_is_a_count_not_not_enough_seeds():
    r = paired_test([math.inf] * 3, [1.1, 1.2, 1.15])
    assert not r["verdict"].startswith("not enough seeds"), r["verdict"]
    assert r["count_text"] == "3/3 seeds: top_k > control"
    assert r["p_value"] == pytest.approx(0.25) and not r["deterministic"]


def test_six_agreeing_seeds_with_inf_reach_significance():
    """inf ranked largest in an exact test that can reach significance: six agreeing seeds give
    p = 2/2^6 = 0.03125, the first n where agreeing seeds can pass 0.05."""
    r = paired_test([math.inf, math.inf, 40.0, math.inf, 50.0, 60.0], [1.1, 1.2, 1.15, 1.3, 1.1, 1.2])
    assert r["p_value"] == pytest.approx(2 / 64, rel=1e-12) and r["verdict"].startswith("top_k worse")


@pytest.mark.parametrize("n", [3, 4, 5, 6, 7, 8])
def test_every_seed_agreeing_never_reads_no_difference(n):
    rng = np.random.default_rng(n)
    for _ in range(200):
        ctl = rng.uniform(1.0, 3.0, n)
        top = ctl * rng.uniform(1.01, 50.0, n)
        top[rng.random(n) < 0.3] = math.inf
        r = paired_test(top, ctl)
        assert "no significant difference" not in r["verdict"] and r["count"]["top_greater"] == n
        assert r["verdict"].startswith("top_k worse") or r["verdict"].startswith(f"{n}/{n} seeds: top_k > control")
    assert min_attainable_p(n) == pytest.approx(min(1.0, 2 / 2 ** n))


def _brute_force_signed_rank(d) -> float:
    """Every one of the 2^m sign patterns of the ranks (average ranks for ties, inf largest)."""
    d = np.asarray([x for x in d if x != 0], dtype=float)
    ranks = sps.rankdata(np.abs(d))
    obs = ranks[d > 0].sum()
    mean = ranks.sum() / 2
    hits = sum(abs(sum(r for r, s in zip(ranks, signs) if s) - mean) >= abs(obs - mean) - 1e-9
               for signs in itertools.product([0, 1], repeat=len(d)))
    return hits / 2 ** len(d)


@pytest.mark.parametrize("d", [[0.3, -1.2, 2.5, 0.7, -0.1, 1.9, 3.3], [1.0, 1.0, -1.0, 2.0, 2.0, math.inf],
                               [math.inf, math.inf, 0.2, -0.5, 0.0], [-math.inf, 0.1, 0.2, 0.3]])
def test_exact_signed_rank_matches_enumeration_and_scipy(d):
    w, p = signed_rank_exact(d)
    assert p == pytest.approx(_brute_force_signed_rank(d), rel=1e-12)
    finite = [x for x in d if math.isfinite(x) and x != 0]
    if len(set(map(abs, finite))) == len(finite) == len([x for x in d if x != 0]):  # no ties, no inf: scipy's exact
        assert p == pytest.approx(sps.wilcoxon(finite, method="exact").pvalue, rel=1e-12)


# --------------------------------------------------------------------------- multiple comparisons

def test_holm_by_hand():
    """Holm (1979): sort, multiply the i-th smallest of m by (m - i + 1), keep the running max, cap at 1.
    0.005 x 4 = 0.02; 0.01 x 3 = 0.03; 0.03 x 2 = 0.06; 0.04 x 1 = 0.04 -> 0.06 (running max)."""
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.02, None, 0.01, 0.03]) == [pytest.approx(0.04), None, pytest.approx(0.03), pytest.approx(0.04)]
    assert holm([0.5, 0.6, 0.7]) == pytest.approx([1.0, 1.0, 1.0])  # 0.5 x 3 = 1.5 -> 1, then the running max
    assert holm([]) == [] and holm([None]) == [None]


def test_holm_across_the_report(tmp_path):
    for i, (top, rnd) in enumerate((([20.0, 30.0, 25.0, 28.0], [2.0, 2.2, 2.1, 2.4]),
                                    ([3.0, 2.0, 4.0, 2.5], [2.0, 2.2, 2.1, 2.4]),
                                    ([10.0, 12.0, 9.0, 15.0], [2.0, 2.6, 2.1, 2.4]))):
        write_cell(tmp_path / f"c{i}", SynthCell(topk=10 * (i + 1), seeds=(0, 1, 2, 3), jaccard=None,
                                                 ratios={"top_k": top, "random_k": rnd}))
    a = analyze([str(tmp_path)], options=FAST)
    family = a["paired_tests"] + a["location"]["fit"] + a["location"]["comparisons"]
    raw = [t["p_value"] for t in family if t["p_value"] is not None]
    assert len(a["paired_tests"]) == 3 and all(t["p_value"] is not None for t in a["paired_tests"])
    m = len(raw)
    order = np.argsort(raw)
    want = np.empty(m)
    running = 0.0
    for j, i in enumerate(order):  # written out again here, independently of analysis.stats.holm
        running = max(running, min(1.0, (m - j) * raw[i]))
        want[i] = running
    assert [t["p_holm"] for t in family if t["p_value"] is not None] == pytest.approx(list(want), rel=1e-12)
    assert all(t["p_holm"] is None for t in family if t["p_value"] is None)
    mc = a["multiple_comparisons"]
    assert mc["n_tests"] == m and mc["families"]["paired_tests"] == 3 and "Holm" in mc["method"]
    assert mc["significant_holm"] == sum(q < 0.05 for q in want)
    for t in a["paired_tests"]:  # the verdict says what the adjustment did
        assert ("Holm" in t["verdict"]) == (t["p_value"] < 0.05)


# --------------------------------------------------------------------------- the report says which

def _page_text(fig) -> str:
    from matplotlib.text import Text

    return "\n".join(t.get_text() for t in fig.findobj(Text))


def test_report_tables_name_the_interval_the_test_and_holm(tmp_path):
    from analysis.report import dose_page, ratios_page, study_page

    c = SynthCell(metric="magnitude", jaccard=1.0, ratios={"top_k": [None, None, 40.0],
                                                            "random_k": [1.1, 1.2, 1.15], "bottom_k": [1.0] * 3},
                  statuses={"top_k": ["inf", "inf", "finite"]})
    write_cell(tmp_path / "flip", c)
    a = analyze([str(tmp_path)], options=FAST)
    ratios = _page_text(ratios_page(a))
    assert "t = t interval on log ratios over seeds" in ratios and "w = paired" in ratios
    assert "WARNING: 3 of 3 rows rest on fewer than 5 seeds" in ratios
    assert "Geometric-mean perplexity ratio" in ratios and " how " in ratios
    tests = _page_text(dose_page(a))
    assert "p Holm" in tests and "top>ctl" in tests and "Holm" in tests
    assert "all seeds agree; smallest p 0.25" in tests and "no significant difference" not in tests
    assert "Holm (1979)" in _page_text(study_page(a)) and "t on log ratios" in _page_text(study_page(a))
