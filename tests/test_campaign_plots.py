"""The cell's campaign figures (cwa_core.plots.campaign): each draws a real PNG from a synthetic
campaign dict, degenerate ones included, and draws the numbers campaign_stats.summarize computed."""
from __future__ import annotations

import math

import numpy as np
import pytest
from matplotlib.collections import PathCollection

from cwa_core import plots
from cwa_core.campaign_stats import summarize
from cwa_core.plots import campaign as pc
from cwa_core.registry import Registry
from test_plots import assert_real_png, capture_figures, figure_texts, make_perturbation, make_samples, make_stats

ARMS = ["none", "top_k", "random_k", "bottom_k", "super_weights"]
KINDS = {"bit_errors": ("error_rate", 1, (1e-7, 1e-6, 1e-5, 1e-4)), "quantize": ("quant_bits", -1, (8, 4, 3)),
         "prune": ("sparsity", 1, (0.3, 0.5, 0.7))}
FIGS = (pc.plot_campaign_failure_rate, pc.plot_campaign_ratios, pc.plot_campaign_levels)
# harm per arm: the larger, the more trials fail (top_k protected best, none not at all)
TOLERANCE = {"none": 0.3, "top_k": 10.0, "random_k": 1.0, "bottom_k": 1.2, "super_weights": 2.0}


def _ratio(kind: str, level: float, arm: str, rng: np.random.Generator) -> float:
    harm = {"bit_errors": level * 1e6, "quantize": 2.0 ** (8 - level) / 16, "prune": level * 3}[kind]
    r = 1.0 + rng.exponential(harm / TOLERANCE[arm])
    return math.inf if r > 40 else r


def make_campaign(seeds=(0, 1, 2), kind="bit_errors", levels=None, trials=6, ratio=None, summary=True) -> dict:
    """A campaign_results.json dict: every arm of every trial, summarize() merged in (when ``summary``);
    ``ratio(arm, level, seed, trial)`` overrides the synthetic ratios."""
    level_name, harsher, default_levels = KINDS[kind]
    rng = np.random.default_rng(4)
    n_trials = trials if kind == "bit_errors" else 1
    rows = []
    for level in levels or default_levels:
        for seed in seeds:
            for t in range(n_trials):
                for arm in ARMS:
                    r = ratio(arm, level, seed, t) if ratio else _ratio(kind, level, arm, rng)
                    status = "finite" if math.isfinite(r) else ("nan" if math.isnan(r) else "inf")
                    rows.append({"arm": arm, "level": level, "seed": seed, "trial": t, "n_protected": 64,
                                 "changed": 3, "drawn": 3, "protected_hits": 0, "ppl": 12.0 * r,
                                 "nll": math.log(12.0 * r) if r > 0 and math.isfinite(r) else r, "status": status,
                                 "ppl_ratio": r, "seconds": 0.01})
    settings = {"protect": ARMS, "error_rate": [1e-6], "trials": n_trials, "bits": "all", "quant_bits": [8, 4, 3],
                "quant_group": "row", "sparsity": [0.5], "prune_group": "row", "fail_ratio": 2.0,
                "metric": "magnitude", "mode": "per_layer", "topk": 64, "seeds": list(seeds)}
    out = {"format": "cwa.campaign/1", "campaign": kind, "level_name": level_name, "harsher": harsher,
           "settings": settings, "model": "tiny", "baseline_ppl": 12.0, "dtype": "float32", "n_weights": 4096,
           "arms": {a: {"n_protected": 0 if a == "none" else 64} for a in ARMS}, "trials": rows}
    if summary:
        out.update(summarize(rows, fail_ratio=2.0, level_name=level_name, harsher=harsher, arms=ARMS))
    return out


def _axes(fig):
    return fig.axes[0]


def _line(fig, gid):
    """The drawn line called ``gid`` (an errorbar's caps share its gid; they have no line style)."""
    (line,) = [ln for ln in _axes(fig).lines if ln.get_gid() == gid and ln.get_linestyle() != "None"]
    return line


@pytest.mark.parametrize("kind", list(KINDS))
def test_each_figure_writes_a_real_png_for_every_campaign(tmp_path, monkeypatch, kind):
    figs = capture_figures(monkeypatch)
    camp = make_campaign(kind=kind)
    for f in FIGS:
        path = f(camp, tmp_path / f"{f.__name__}.png")
        assert path == tmp_path / f"{f.__name__}.png"
        assert_real_png(path)
    title = {"bit_errors": "Bit errors", "quantize": "RTN quantization", "prune": "Pruning"}[kind]
    for fig in figs:
        text = figure_texts(fig)
        assert title in text and "3 seeds: 0, 1, 2" in text and "perplexity ratio > 2 or non-finite" in text
        assert "harsher \u2192" in text and "top-K" in text and "random-K" in text and "no protection" in text
    assert _axes(figs[0]).get_xscale() == ("log" if kind == "bit_errors" else "linear")
    assert _axes(figs[0]).xaxis_inverted() == (kind == "quantize")  # fewer bits, harsher: to the right


def test_the_failure_figure_draws_summarize_failure_rates_and_the_headline(tmp_path, monkeypatch):
    figs = capture_figures(monkeypatch)
    camp = make_campaign()
    pc.plot_campaign_failure_rate(camp, tmp_path / "f.png")
    curves = pc.failure_curves(camp)
    assert list(curves) == ARMS
    for arm in ARMS:
        mine = [s for s in camp["summary"] if s["arm"] == arm]
        assert curves[arm]["failure_rate"].tolist() == [s["failure_rate"] for s in mine]
        assert curves[arm]["failure_lo"].tolist() == [s["failure_lo"] for s in mine]
        line = _line(figs[0], f"failure:{arm}")
        assert line.get_xdata().tolist() == [1e-7, 1e-6, 1e-5, 1e-4]
        assert line.get_ydata().tolist() == [s["failure_rate"] for s in mine]
    h = camp["headline"]
    assert h["available"] and h["value"] is not None
    text = figure_texts(figs[0])
    assert "L(top-K) / L(random-K) = " in text and "target failure rate 50%" in text
    marks = [ln for ln in _axes(figs[0]).lines if ln.get_label() == "tolerated level of top-K"]
    assert [ln.get_xdata()[0] for ln in marks] == [h["tolerated"]["top_k"]["level"]]


def test_the_level_figure_draws_the_summary_medians(tmp_path, monkeypatch):
    figs = capture_figures(monkeypatch)
    camp = make_campaign(kind="prune")
    pc.plot_campaign_levels(camp, tmp_path / "l.png")
    curves = pc.level_curves(camp)
    for arm in ARMS:
        med = [s["median_ratio"] for s in camp["summary"] if s["arm"] == arm]
        assert curves[arm]["median_ratio"].tolist() == med and all(math.isfinite(m) for m in med)
        assert _line(figs[0], f"median:{arm}").get_ydata().tolist() == med
    assert "perplexity (baseline 12)" in figure_texts(figs[0])  # the right-hand axis


def test_the_ratio_figure_draws_every_trial_inf_in_a_band_and_counts_nan(tmp_path, monkeypatch):
    def ratio(arm, level, seed, t):
        if arm == "none" and t < 2 and seed == 0:
            return math.nan if level == 1e-6 else math.inf
        return 1.0 + 0.01 * t + level * 1e5

    figs = capture_figures(monkeypatch)
    camp = make_campaign(levels=(1e-6, 1e-5), ratio=ratio)
    pc.plot_campaign_ratios(camp, tmp_path / "r.png")
    groups = pc.ratio_groups(camp)
    assert list(groups)[:2] == [("none", 1e-6), ("none", 1e-5)] and len(groups) == 2 * len(ARMS)
    assert int(np.isnan(groups[("none", 1e-6)]).sum()) == 2 and int(np.isposinf(groups[("none", 1e-5)]).sum()) == 2
    text = figure_texts(figs[0])
    assert "NaN x2" in text and "no protection (2 NaN)" in text and "inf (overflow)" in text
    ax = _axes(figs[0])
    n_points = sum(len(c.get_offsets()) for c in ax.collections if isinstance(c, PathCollection))
    assert n_points == sum(v.size - int(np.isnan(v).sum()) for v in groups.values())  # NaN: counted, not drawn
    assert ax.get_yscale() == "log" and ax.get_ylim()[1] > 2.0


def test_a_campaign_without_summary_is_summarized_for_the_figures(tmp_path):
    full, bare = make_campaign(kind="quantize"), make_campaign(kind="quantize", summary=False)
    assert "summary" not in bare
    a, b = pc.failure_curves(full), pc.failure_curves(bare)
    assert all(np.array_equal(a[k]["failure_rate"], b[k]["failure_rate"]) for k in ARMS)
    for f in FIGS:
        assert_real_png(f(bare, tmp_path / f"{f.__name__}.png"))


@pytest.mark.parametrize("case", ["one_level", "all_inf", "all_nan", "one_trial", "rate_zero"])
def test_degenerate_campaigns_still_draw(tmp_path, monkeypatch, case):
    figs = capture_figures(monkeypatch)
    kw = {"one_level": {"levels": (1e-6,)},
          "all_inf": {"ratio": lambda *a: math.inf},
          "all_nan": {"ratio": lambda *a: math.nan},
          "one_trial": {"seeds": (0,), "trials": 1, "levels": (1e-6,)},
          "rate_zero": {"levels": (0.0, 1e-6, 1e-5), "ratio": lambda arm, lv, s, t: 1.0 + lv * 1e5}}[case]
    camp = make_campaign(**kw)
    for f in FIGS:
        assert_real_png(f(camp, tmp_path / f"{f.__name__}.png"))
    texts = [figure_texts(fig) for fig in figs]
    if case == "all_inf":
        assert "inf (overflow)" in texts[1] and "inf (overflow): median or quantile" in texts[2]
        assert pc.failure_curves(camp)["top_k"]["failure_rate"].tolist() == [1.0] * 4
    if case == "all_nan":
        assert "NaN x" in texts[1] and "every trial NaN (not drawn): no protection at every level; top-K" in texts[2]
    if case == "rate_zero":
        assert "error rate 0 not drawn (log axis)" in texts[0]
        assert pc.failure_curves(camp)["none"]["levels"].tolist() == [0.0, 1e-6, 1e-5]  # the data keep it
    if case in ("one_level", "one_trial"):
        assert "headline not available" in texts[0]


def test_bad_campaigns_raise_naming_the_problem(tmp_path):
    for bad in (None, {}, {"trials": [], "summary": []}):
        with pytest.raises(ValueError, match="neither summary nor trials"):
            pc.plot_campaign_ratios(bad, tmp_path / "x.png")
    with pytest.raises(ValueError, match="level_name must be one of"):
        pc.failure_curves({**make_campaign(levels=(1e-6,)), "level_name": "rate"})


def test_the_registry_draws_the_campaign_figures_only_with_a_campaign(tmp_path, monkeypatch):
    names = ("campaign_failure_rate", "campaign_ratios", "campaign_levels")
    assert all(plots.FIGURES.get(n).needs == "campaign" for n in names)
    assert plots.PLOT_FILES[-3:] == tuple(f"{n}.png" for n in names)
    only = Registry("experiment figure")  # the campaign entries alone: the others are tested elsewhere
    for n in names:
        only.add(n, plots.FIGURES.get(n))
    monkeypatch.setattr(plots, "FIGURES", only)
    common = {"samples_per_seed": [make_samples(0)], "stats_per_seed": [make_stats(0)], "seeds": [0],
              "perturbation": make_perturbation(seeds=(0,))}
    assert plots.save_experiment_plots(tmp_path / "a", **common) == ([], {})
    paths, failed = plots.save_experiment_plots(tmp_path / "b", **common, campaign=make_campaign(seeds=(0,)))
    assert failed == {} and [p.name for p in paths] == [f"{n}.png" for n in names]
    for p in paths:
        assert_real_png(p)
