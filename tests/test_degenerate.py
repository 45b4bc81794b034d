"""Degenerate numbers, fed straight to every figure and statistic of one experiment.

All seeds equal, one seed, a single weight, K equal to the tensor size, all-zero scores, ties,
inf and NaN scores, inf and NaN perplexities (in memory, as JSON Infinity/NaN, and as the null +
ppl_status of files written before non-finite numbers were written explicitly), ratios
below 1, missing controls, empty sets, constant inputs. Statistics are checked against
hand-computed values; figures must be real PNGs, and what they draw is read back from the
figure (axis scale, bar heights, label text).
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from cwa_core import plots, selection
from cwa_core.architectures import ParamRef
from cwa_core.experiment import SeedScores
from cwa_core.outputs import weighted_samples, write_json
from cwa_core.selection import TensorStats
from cwa_core.stability import jaccard, pairwise, spearman
from test_plots import METRIC, assert_real_png, capture_figures, figure_texts, make_stability

NAN, INF = math.nan, math.inf
X = 1.9127555772777218  # np.mean([X, X, X]) > X: the float that crashed `make smoke`
STAT_FIELDS = ("count", "mean", "std", "min", "max", "p50", "p95", "p99")


def _same(got: float, want: float) -> bool:
    """Equal, both NaN, or (finite) equal to 12 digits."""
    if math.isnan(want):
        return math.isnan(got)
    if math.isinf(want):
        return got == want
    return got == pytest.approx(want, rel=1e-12, abs=1e-300)


def _ref(numel: int = 1) -> ParamRef:
    return ParamRef("x", 0, "mlp", torch.nn.Parameter(torch.zeros(numel)), torch.nn.Linear(1, 1), "weight", None)


# ============================================================================= statistics

# tensor_stats: values -> (count, mean, std, min, max, p50, p95, p99), nearest-rank percentiles
TENSOR_STATS_CASES = {
    "one element": ([2.5], (1, 2.5, 0.0, 2.5, 2.5, 2.5, 2.5, 2.5)),
    "all equal (ties)": ([3.0] * 7, (7, 3.0, 0.0, 3.0, 3.0, 3.0, 3.0, 3.0)),
    "zeros": ([0.0] * 5, (5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)),
    # std = sqrt((1.5^2 + 0.5^2 + 0.5^2 + 1.5^2) / 3); p50 is rank round(0.5 * 3) + 1 = 3
    "four values": ([4.0, 1.0, 3.0, 2.0], (4, 2.5, math.sqrt(5 / 3), 1.0, 4.0, 3.0, 4.0, 4.0)),
    "inf is the largest value": ([1.0, INF, 2.0], (3, INF, NAN, 1.0, INF, 2.0, INF, INF)),
    "+inf with -inf": ([-INF, 1.0, INF], (3, NAN, NAN, -INF, INF, 1.0, INF, INF)),
    "nan makes every statistic nan": ([1.0, NAN, 2.0], (3, NAN, NAN, NAN, NAN, NAN, NAN, NAN)),
    "no entries": ([], (0, NAN, NAN, NAN, NAN, NAN, NAN, NAN)),
}


@pytest.mark.parametrize("case", TENSOR_STATS_CASES)
def test_tensor_stats_and_the_cpu_fast_path_on_degenerate_scores(case):
    values, want = TENSOR_STATS_CASES[case]
    t = torch.tensor(values, dtype=torch.float32)
    got = selection.tensor_stats(_ref(max(len(values), 1)), t)
    for field, w in zip(STAT_FIELDS, want):
        assert _same(getattr(got, field), w), (case, field, getattr(got, field), w)
    if values and not any(math.isnan(v) for v in values):  # the accelerator's sort path agrees
        qs = (0.50, 0.95, 0.99)
        assert [float(v) for v in selection._quantiles(t, qs, by_sort=True)] == list(want[5:])
    finite = bool(torch.isfinite(t).all()) and len(values) > 0
    for k in sorted({min(1, len(values)), len(values)}):  # k = 1 and k = numel (every entry)
        fast = selection._reduce_cpu(_ref(len(values)), t, k)
        assert (fast is not None) == finite  # inf and NaN take the general path
        if fast is not None:
            for field, w in zip(STAT_FIELDS, want):
                assert _same(getattr(fast[2], field), w), (case, field)


# (values, k) -> top indices, bottom indices: ties by lowest index, NaN above +inf
TOPK_CASES = {
    "one element": ([2.5], 1, [0], [0]),
    "K = numel": ([4.0, 1.0, 3.0, 2.0], 4, [0, 2, 3, 1], [1, 3, 2, 0]),
    "all equal, K = numel": ([3.0] * 7, 7, list(range(7)), list(range(7))),
    "all equal, K < numel": ([3.0] * 7, 3, [0, 1, 2], [0, 1, 2]),
    "zeros": ([0.0] * 5, 2, [0, 1], [0, 1]),
    "inf": ([1.0, INF, 2.0], 3, [1, 2, 0], [0, 2, 1]),
    "nan": ([1.0, NAN, 2.0], 3, [1, 2, 0], [0, 2, 1]),
}


@pytest.mark.parametrize("case", TOPK_CASES)
def test_topk_stable_and_the_cpu_fast_path_on_degenerate_scores(case):
    values, k, top, bottom = TOPK_CASES[case]
    t = torch.tensor(values, dtype=torch.float32)
    for largest, want in ((True, top), (False, bottom)):
        v, i = selection.topk_stable(t, k, largest)
        assert i.tolist() == want
        torch.testing.assert_close(v, t[want], rtol=0, atol=0, equal_nan=True)
    fast = selection._reduce_cpu(_ref(len(values)), t, k)
    if bool(torch.isfinite(t).all()):
        assert fast[0][1].tolist() == top and fast[1][1].tolist() == bottom
    else:
        assert fast is None


def test_k_beyond_the_tensor_is_a_one_line_error():
    t = torch.ones(3)
    with pytest.raises(ValueError, match=r"k=4 is outside 0\.\.3"):
        selection.topk_stable(t, 4)
    with pytest.raises(ValueError, match=r"k=4 is outside 0\.\.3"):
        selection._reduce_cpu(_ref(3), t, 4)
    v, i = selection.topk_stable(t, 0)
    assert v.numel() == 0 and i.numel() == 0


def _seed_scores(groups: list[tuple[str, int, list[float]]]) -> SeedScores:
    """A SeedScores holding only statistics and samples: (param_type, count, sample) per tensor."""
    stats = [TensorStats(f"t{i}", 0, ptype, (count,), count, *[0.0] * 7)
             for i, (ptype, count, _) in enumerate(groups)]
    samples = [torch.tensor(s, dtype=torch.float32) for _, _, s in groups]
    return SeedScores(0, METRIC, 1, {}, None, stats, samples, 0.0)


def test_weighted_samples_on_degenerate_tensors():
    # a single weight: its one score
    out = weighted_samples(_seed_scores([("mlp", 1, [0.7])]))
    assert out["mlp"].tolist() == [np.float32(0.7)]
    # a tensor without entries (count 0, empty sample) adds nothing; its type maps to nothing
    out = weighted_samples(_seed_scores([("norm", 0, []), ("mlp", 3, [1.0, 2.0, 3.0])]))
    assert out["norm"].size == 0 and sorted(set(out["mlp"].tolist())) <= [1.0, 2.0, 3.0]
    # all zeros, and inf / NaN scores kept as they are (the figure counts them)
    assert weighted_samples(_seed_scores([("mlp", 4, [0.0] * 4)]))["mlp"].tolist() == [0.0] * 4
    bad = weighted_samples(_seed_scores([("mlp", 2, [INF, NAN])]))["mlp"]
    assert bad.size == 2 and not np.isfinite(bad).any()
    # every weight equally likely: 3000 weights of score 1 against 1000 of score 5 -> 25% fives
    out = weighted_samples(_seed_scores([("mlp", 3000, [1.0] * 2000), ("mlp", 1000, [5.0] * 2000)]))
    assert out["mlp"].size == 4000
    assert float((out["mlp"] == 5.0).mean()) == pytest.approx(0.25, abs=0.03)


JACCARD_CASES = [([], [], 1.0), ([], [1], 0.0), ([7], [7], 1.0), ([1, 2, 3], [4, 5, 6], 0.0),
                 ([1, 1, 2], [2], 0.5)]  # a repeated id counts once (sets)


@pytest.mark.parametrize("a,b,want", JACCARD_CASES)
def test_jaccard_degenerate_sets(a, b, want):
    assert jaccard(torch.tensor(a, dtype=torch.long), torch.tensor(b, dtype=torch.long)) == want


SPEARMAN_CASES = {
    "constant side": ([1, 1, 1], [1, 2, 3], NAN),
    "both constant": ([2, 2], [5, 5], NAN),
    "one element": ([1], [1], NAN),
    "empty": ([], [], NAN),
    "inf ranks first": ([1, 2, INF], [1, 2, 3], 1.0),
    # ranks (3, 1, 2) against (1, 2, 3): centred (1, -1, 0).(-1, 0, 1) / 2 = -0.5
    "inf against the order": ([INF, 1, 2], [1, 2, 3], -0.5),
    "-inf ranks last": ([-INF, 0, 5], [1, 2, 3], 1.0),
    # the NaN pair is left out: (1, 2, 4) against (1, 2, 0) -> -0.5
    "nan pair excluded": ([1, 2, NAN, 4], [1, 2, 3, 0], -0.5),
    "nans on both sides": ([NAN, 1, 2, 3, 4], [1, 2, NAN, 3, 4], 1.0),
    "one pair left": ([NAN, 1, 2], [1, NAN, 2], NAN),
    "all nan": ([NAN, NAN], [NAN, NAN], NAN),
    # average ranks (1.5, 1.5, 3) against (1, 2, 3): 1.5 / sqrt(1.5 * 2)
    "ties": ([1, 1, 2], [1, 2, 3], 1.5 / math.sqrt(3.0)),
}


@pytest.mark.parametrize("case", SPEARMAN_CASES)
def test_spearman_degenerate_inputs(case, caplog):
    a, b, want = SPEARMAN_CASES[case]
    with caplog.at_level(logging.WARNING, logger="cwa_core.stability"):
        got = spearman(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64))
    assert _same(got, want), (case, got)
    if "nan" in case and "all" not in case:
        assert "have a NaN score and are left out" in caplog.text
        n = len(a)
        if n > 3:  # scipy's omit policy drops the same pairs
            assert got == pytest.approx(spearmanr(a, b, nan_policy="omit").statistic, abs=1e-12)


def test_spearman_refuses_samples_of_different_lengths():
    with pytest.raises(ValueError, match="differ in length"):
        spearman(torch.ones(3), torch.ones(4))


def test_pairwise_without_pairs_and_with_equal_values(tmp_path):
    for seeds in ([0], []):  # one seed (or none): no pair, summaries NaN
        out = pairwise([torch.tensor([1])] * len(seeds), seeds, jaccard)
        assert out["pairs"] == [] and all(math.isnan(out[k]) for k in ("mean", "min", "max"))
        write_json(tmp_path / "s.json", out)  # ... which the writer keeps explicit (NaN, not null)
        back = json.loads((tmp_path / "s.json").read_text())
        assert back["pairs"] == [] and all(math.isnan(back[k]) for k in ("mean", "min", "max"))
    out = pairwise([0, 1, 2], [0, 1, 2], lambda a, b: X)  # equal values: mean not an ulp above
    assert (out["mean"], out["min"], out["max"]) == (X, X, X)
    out = pairwise([0, 1], [4, 5], lambda a, b: NAN)  # every pair undefined
    assert out["pairs"][0]["value"] != out["pairs"][0]["value"] and math.isnan(out["mean"])
    with pytest.raises(ValueError, match="2 values for 3 seeds"):
        pairwise([0, 1], [0, 1, 2], jaccard)


# ============================================================================= figures


@pytest.fixture
def figs(monkeypatch):
    return capture_figures(monkeypatch)


def _bars(ax) -> list:
    return [p for p in ax.patches if (p.get_gid() or "").startswith("bar:")]


# ----------------------------------------------------------------------------- distribution

DIST_CASES = {
    # name: (samples per seed, x scale, text that must be on the figure)
    "all zero": ([{"mlp": np.zeros(100), "attention": np.zeros(50)}], "linear", "all 150 scores are 0"),
    "ties": ([{"mlp": np.full(40, 0.5)}], "log", "all equal 0.5"),
    "single weight": ([{"norm": np.array([3e-4])}], "log", "norm (n=1)"),
    "inf and nan dropped": ([{"mlp": np.array([1.0, NAN, INF, 2.0, NAN, INF, INF, 0.0])}], "log",
                            "2 NaN, 3 inf dropped"),
    "all nan": ([{"mlp": np.full(10, NAN)}], "linear", "no finite, non-negative score to draw"),
    "zeros beside positives": ([{"mlp": np.array([0.0, 0.0, 1e-3, 1e-2])}], "log", "2 zero"),
    "one seed of equal seeds": ([{"mlp": np.array([1e-3, 1e-2, 1e-1])}] * 3, "log", "3 seeds: 7, 8, 9"),
}


@pytest.mark.parametrize("case", DIST_CASES)
def test_distribution_on_degenerate_scores(case, tmp_path, figs):
    runs, scale, text = DIST_CASES[case]
    seeds = [7, 8, 9][:len(runs)]
    assert_real_png(plots.plot_sensitivity_distribution(runs, METRIC, tmp_path / "d.png", seeds=seeds))
    ax = figs[0].axes[0]
    assert ax.get_xscale() == scale
    assert text in figure_texts(figs[0])
    steps = [p for p in ax.patches if type(p).__name__ == "StepPatch" and p.get_fill()]
    if scale == "log":  # the drawable positive scores carry the whole density
        for s in steps:
            density, edges = s.get_data()[:2]
            assert float((density * np.diff(np.log10(edges))).sum()) == pytest.approx(1.0, rel=1e-12)
    else:
        assert not steps


def test_distribution_of_equal_seeds_is_that_of_one_seed(tmp_path, figs):
    run = {"mlp": np.array([1e-3, 1e-2, 1e-2, 1e-1])}
    plots.plot_sensitivity_distribution(run, METRIC, tmp_path / "one.png", seeds=[0])
    plots.plot_sensitivity_distribution([run] * 3, METRIC, tmp_path / "three.png", seeds=[0, 1, 2])
    one, three = ([p.get_data()[0] for p in f.axes[0].patches if type(p).__name__ == "StepPatch"]
                  for f in figs)
    np.testing.assert_allclose(one[0], three[0], rtol=1e-12)


# ----------------------------------------------------------------------------- layers


def _layer_rows(vals: dict[int, tuple[float, float, float]]) -> list[dict]:
    return [{"layer": layer, "mean": m, "p99": p, "max": x} for layer, (m, p, x) in vals.items()]


def test_layer_comparison_single_row_and_all_zero(tmp_path, figs):
    assert_real_png(plots.plot_layer_comparison(_layer_rows({0: (1e-3, 2e-3, 5e-3)}), METRIC,
                                                tmp_path / "one.png", seeds=[0]))
    ax = figs[0].axes[0]
    assert ax.get_yscale() == "log"
    lines = {ln.get_label(): ln.get_ydata().tolist() for ln in ax.get_lines()}
    assert lines["mean"] == [1e-3] and lines["max"] == [5e-3]
    assert_real_png(plots.plot_layer_comparison(_layer_rows({0: (0.0, 0.0, 0.0), -1: (0.0, 0.0, 0.0)}),
                                                METRIC, tmp_path / "zero.png"))
    ax = figs[1].axes[0]
    assert ax.get_yscale() == "linear" and "all 6 values are 0" in figure_texts(figs[1])
    assert ax.get_ylim()[0] < 0 < ax.get_ylim()[1]  # the zeros are inside the axes


def test_layer_comparison_of_equal_seeds_draws_exactly_their_value(tmp_path, figs):
    rows = _layer_rows({0: (X, X, X), 1: (X, X, X)})
    assert_real_png(plots.plot_layer_comparison([rows] * 3, METRIC, tmp_path / "eq.png", seeds=[0, 1, 2]))
    ax = figs[0].axes[0]
    assert {ln.get_label(): ln.get_ydata().tolist() for ln in ax.get_lines()}["mean"] == [X, X]
    assert "3 seeds: 0, 1, 2 (identical)" in figure_texts(figs[0])


def test_layer_comparison_with_inf_nan_and_null_statistics(tmp_path, figs):
    seeds = [_layer_rows({0: (1e-3, 2e-3, 5e-3), 1: (1e-3, 2e-3, 5e-3), 2: (1e-3, 2e-3, 5e-3)})
             for _ in range(3)]
    seeds[1][2]["max"] = INF  # one seed's max overflowed: the mean over seeds is inf
    seeds[2][1]["mean"] = None  # JSON null (a NaN): the mean over seeds is NaN
    assert_real_png(plots.plot_layer_comparison(seeds, METRIC, tmp_path / "bad.png", seeds=[0, 1, 2]))
    text = figure_texts(figs[0])
    assert "not drawn: max = inf in layer 2, mean = NaN in layer 1" in text
    assert "\ninf\n" in f"\n{text}\n"  # the inf marker's label
    lines = {ln.get_label(): ln.get_ydata() for ln in figs[0].axes[0].get_lines()}
    assert np.isnan(lines["max"][2]) and np.isnan(lines["mean"][1]) and lines["max"][0] == 5e-3


def test_layer_comparison_names_a_seed_count_mismatch():
    with pytest.raises(ValueError, match="seeds: 2 ids given for 3 per-seed inputs"):
        plots.plot_layer_comparison([_layer_rows({0: (1, 1, 1)})] * 3, METRIC, "unused.png", seeds=[0, 1])


# ----------------------------------------------------------------------------- heatmap


def _tensor(layer, ptype, count, mean):
    return {"name": f"{ptype}.{layer}", "layer": layer, "param_type": ptype, "count": count, "mean": mean}


def test_heatmap_single_tensor_of_one_weight(tmp_path, figs):
    assert_real_png(plots.plot_sensitivity_heatmap([_tensor(0, "mlp", 1, 0.5)], METRIC, tmp_path / "h.png"))
    ax = figs[0].axes[0]
    assert ax.images[0].get_array().shape == (1, 1) and "0.5" in figure_texts(figs[0])


def test_heatmap_all_zero_uses_a_linear_scale_from_zero(tmp_path, figs):
    rows = [_tensor(layer, t, 10, 0.0) for layer in (0, 1) for t in ("attention", "mlp")]
    assert_real_png(plots.plot_sensitivity_heatmap(rows, METRIC, tmp_path / "z.png"))
    norm = figs[0].axes[0].images[0].norm
    assert type(norm).__name__ == "Normalize" and (norm.vmin, norm.vmax) == (0.0, 1.0)
    assert "every cell 0" in figure_texts(figs[0])


def test_heatmap_marks_inf_nan_and_missing_cells(tmp_path, figs):
    rows = [_tensor(0, "attention", 10, INF), _tensor(1, "attention", 10, 2e-3),
            _tensor(0, "mlp", 10, None), _tensor(1, "mlp", 10, 1e-3),
            _tensor(-1, "norm", 4, 1.0),
            _tensor(1, "norm", 0, INF)]  # an empty tensor: no cell, and no NaN from 0 * inf
    assert_real_png(plots.plot_sensitivity_heatmap(rows, METRIC, tmp_path / "bad.png"))
    cells = [t.get_text() for t in figs[0].axes[0].texts]
    # row-major over (attention, mlp, norm) x (0, 1, other)
    assert cells == ["inf", "2.0e-03", "-", "NaN", "1.0e-03", "-", "-", "-", "1"]
    assert "grey: no tensors / no finite value" in figure_texts(figs[0])
    types, layers, m = plots.heatmap_matrix(rows)
    assert m[types.index("norm"), layers.index(1)] != m[types.index("norm"), layers.index(1)]  # NaN


def test_heatmap_of_equal_seeds_says_so(tmp_path, figs):
    rows = [_tensor(0, "mlp", 3, X), _tensor(1, "mlp", 3, 2 * X)]
    plots.plot_sensitivity_heatmap([rows] * 3, METRIC, tmp_path / "eq.png", seeds=[0, 1, 2])
    assert np.ma.filled(figs[0].axes[0].images[0].get_array()).tolist() == [[X, 2 * X]]
    assert "seeds identical" in figure_texts(figs[0])


# ----------------------------------------------------------------------------- perturbation


def _pert(cells: list[tuple[str, int, float]], baseline: float = 5.0) -> dict:
    """perturbation_results.json in memory: one row per (selection, seed, ratio)."""
    rows = []
    for sel, seed, ratio in cells:
        ppl = baseline * ratio
        status = "nan" if math.isnan(ppl) else ("finite" if math.isfinite(ppl) else "inf")
        rows.append({"selection": sel, "seed": seed, "k": 10, "mode": "global", "n_weights": 10,
                     "ppl": ppl, "ppl_ratio": ratio, "nll": math.log(ppl) if status == "finite" else ppl,
                     "ppl_status": status})
    return {"window_length": 64, "eval_windows": 4, "eval_tokens": 252,
            "baseline": {"ppl": baseline, "nll": math.log(baseline)},
            "perturbation": {"method": "bit_flip", "scale": None, "bit": 14}, "metric": METRIC,
            "topk": 10, "mode": "global", "results": rows}


def _as_json(obj: dict, tmp_path: Path) -> dict:
    write_json(tmp_path / "perturbation_results.json", obj)  # the experiment's own writer
    return json.loads((tmp_path / "perturbation_results.json").read_text())


def _as_old_json(obj: dict) -> dict:
    """As files were written before non-finite numbers were explicit: every one of them null."""
    def null(o):
        if isinstance(o, dict):
            return {k: null(v) for k, v in o.items()}
        if isinstance(o, list):
            return [null(v) for v in o]
        return None if isinstance(o, float) and not math.isfinite(o) else o
    return json.loads(json.dumps(null(obj), allow_nan=False))


def test_perturbation_equal_seeds_and_one_seed(tmp_path, figs):
    assert_real_png(plots.plot_perturbation_effects(
        _pert([(s, seed, X) for s in ("top_k", "random_k") for seed in (0, 1, 2)]), tmp_path / "eq.png"))
    bars = _bars(figs[0].axes[0])
    assert [b.get_height() for b in bars] == [X, X]  # the mean of equal seeds is exactly their value
    assert_real_png(plots.plot_perturbation_effects(_pert([("top_k", 3, 2.0)]), tmp_path / "one.png"))
    assert [b.get_height() for b in _bars(figs[1].axes[0])] == [2.0]
    assert "1 seed: 3" in figure_texts(figs[1])


@pytest.mark.parametrize("form", ["memory", "json", "old json"])
def test_perturbation_inf_and_nan_are_drawn_not_dropped(form, tmp_path, figs):
    cells = [("top_k", 0, INF), ("top_k", 1, 8.0), ("top_k", 2, 9.0),
             ("random_k", 0, 1.01), ("random_k", 1, NAN), ("random_k", 2, 1.03),
             ("bottom_k", 0, 1.0), ("bottom_k", 1, 1.0), ("bottom_k", 2, 1.0)]
    results = _pert(cells)
    if form == "json":
        results = _as_json(results, tmp_path)
        assert results["results"][0]["ppl_ratio"] == INF and results["results"][0]["ppl_status"] == "inf"
        assert math.isnan(results["results"][4]["ppl_ratio"]) and results["results"][4]["ppl_status"] == "nan"
    if form == "old json":
        results = _as_old_json(results)
        assert results["results"][0]["ppl_ratio"] is None and results["results"][0]["ppl_status"] == "inf"
    assert_real_png(plots.plot_perturbation_effects(results, tmp_path / "p.png"))
    ax = figs[0].axes[0]
    top, rnd, bot = _bars(ax)
    assert top.get_hatch() == "//" and top.get_y() + top.get_height() == pytest.approx(ax.get_ylim()[1])
    assert rnd.get_height() == pytest.approx(1.02) and not rnd.get_hatch()  # mean of the 2 finite
    assert bot.get_height() == 1.0
    text = figure_texts(figs[0])
    assert f"{plots.INF_LABEL}\n1 of 3 seeds" in text
    assert "NaN" in [t.get_text() for t in ax.texts]
    assert "non-finite: 2 of 9 runs (1 inf, 1 NaN)" in text
    assert "(n=3 seeds, 1 inf)" in text and "(n=3 seeds, 1 NaN)" in text


def test_perturbation_all_non_finite_still_renders(tmp_path, figs):
    results = _as_json(_pert([("top_k", s, INF) for s in (0, 1)] + [("random_k", s, NAN) for s in (0, 1)]),
                       tmp_path)
    assert_real_png(plots.plot_perturbation_effects(results, tmp_path / "all.png"))
    ax = figs[0].axes[0]
    assert len(_bars(ax)) == 1 and ax.get_yscale() == "linear" and ax.get_ylim() == (0.0, 2.0)
    assert "all 4 runs non-finite (2 inf, 2 NaN)" in figure_texts(figs[0])
    assert "NaN x2" in [t.get_text() for t in ax.texts]


def test_perturbation_ratios_below_one_stay_on_the_log_axis(tmp_path, figs):
    cells = [("top_k", s, 40.0) for s in (0, 1)] + [("bottom_k", s, 0.5) for s in (0, 1)]
    assert_real_png(plots.plot_perturbation_effects(_pert(cells), tmp_path / "low.png"))
    ax = figs[0].axes[0]
    lo, hi = ax.get_ylim()
    assert ax.get_yscale() == "log" and lo < 0.5 < 1.0 < 40.0 < hi
    assert [b.get_height() for b in _bars(ax)] == [40.0, 0.5]


def test_perturbation_without_controls_says_so(tmp_path, figs):
    assert_real_png(plots.plot_perturbation_effects(_pert([("top_k", 0, 3.0)]), tmp_path / "t.png"))
    assert len(_bars(figs[0].axes[0])) == 1
    assert "not in these results: random-K, bottom-K" in figure_texts(figs[0])


def test_perturbation_null_without_a_status_is_drawn_as_nan(tmp_path, figs, caplog):
    results = _pert([("top_k", 0, 3.0), ("top_k", 1, 3.0)])
    results["results"][1].update(ppl=None, ppl_ratio=None)
    del results["results"][1]["ppl_status"]  # a file written before ppl_status existed
    with caplog.at_level(logging.WARNING, logger="cwa_core.plots"):
        assert_real_png(plots.plot_perturbation_effects(results, tmp_path / "legacy.png"))
    assert "drawn as NaN" in caplog.text
    assert "non-finite: 1 of 2 runs (1 NaN)" in figure_texts(figs[0])


# ----------------------------------------------------------------------------- stability


def test_stability_one_seed_and_undefined_pairs(tmp_path, figs):
    one = {"metric": METRIC, "seeds": [0], "k": 5, "mode": "global", "data_independent": False,
           "jaccard": {"pairs": [], "mean": None, "min": None, "max": None},
           "spearman": {"pairs": [], "mean": None, "min": None, "max": None, "n_weights": 10}}
    assert_real_png(plots.plot_stability(one, tmp_path / "one.png"))
    assert figure_texts(figs[0]).count("one seed: no pair to compare") == 2
    assert all(ax.images[0].get_array().shape == (1, 1) for ax in figs[0].axes if ax.images)

    stab = make_stability()  # Spearman undefined for every pair (a constant score sample)
    stab["spearman"].update(mean=None, min=None, max=None,
                            pairs=[{**p, "value": None} for p in stab["spearman"]["pairs"]])
    assert_real_png(plots.plot_stability(stab, tmp_path / "nan.png"))
    spearman_ax = figs[1].axes[1]
    assert [t.get_text() for t in spearman_ax.texts].count("NaN") == 6  # every off-diagonal cell
    assert "no pair with a defined value" in figure_texts(figs[1])


# ============================================================================= one experiment


def test_one_failing_figure_costs_no_other(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(plots, "plot_layer_comparison", broken)
    samples = [{"mlp": np.array([1e-3, 1e-2])}]
    stats = [{"per_layer": _layer_rows({0: (1, 1, 1)}), "per_tensor": [_tensor(0, "mlp", 2, 1e-2)]}]
    paths, failed = plots.save_experiment_plots(
        tmp_path, samples_per_seed=samples, stats_per_seed=stats, seeds=[0],
        perturbation=_pert([("top_k", 0, 2.0)]), stability=make_stability())
    assert failed == {"layer_comparison.png": "RuntimeError: boom second line"}
    assert [p.name for p in paths] == ["sensitivity_distribution.png", "sensitivity_heatmap.png",
                                       "perturbation_effects.png", "stability_analysis.png"]
    for p in paths:
        assert_real_png(p)
    assert not (tmp_path / "plots" / "layer_comparison.png").exists()


def test_a_seed_count_mismatch_fails_only_the_per_seed_figures(tmp_path):
    stats = [{"per_layer": _layer_rows({0: (1, 1, 1)}), "per_tensor": [_tensor(0, "mlp", 2, 1.0)]}]
    paths, failed = plots.save_experiment_plots(
        tmp_path, samples_per_seed=[{"mlp": np.ones(3)}], stats_per_seed=stats, seeds=[0, 1],
        perturbation=_pert([("top_k", 0, 2.0)]))
    assert sorted(failed) == ["layer_comparison.png", "sensitivity_distribution.png",
                              "sensitivity_heatmap.png"]
    assert all(v.startswith("ValueError: seeds: 2 ids given for 1 per-seed inputs") for v in failed.values())
    assert [p.name for p in paths] == ["perturbation_effects.png"]


def test_a_wholly_degenerate_experiment_draws_every_figure(tmp_path, figs):
    """One seed, one weight per tensor, every score 0, every perplexity inf (as JSON)."""
    zero = torch.zeros(1)
    stats = [selection.tensor_stats(_ref(), zero)]
    per_tensor = [{"name": "w", "layer": 0, "param_type": "mlp", "count": 1,
                   **{k: getattr(stats[0], k) for k in STAT_FIELDS[1:]}}]
    samples = weighted_samples(_seed_scores([("mlp", 1, [0.0])]))
    one_seed = {"metric": METRIC, "seeds": [0], "k": 1, "jaccard": pairwise([zero], [0], jaccard),
                "spearman": {**pairwise([zero], [0], spearman), "n_weights": 1}}
    paths, failed = plots.save_experiment_plots(
        tmp_path, samples_per_seed=[samples],
        stats_per_seed=[{"per_layer": [{"layer": 0, **per_tensor[0]}], "per_tensor": per_tensor}],
        seeds=[0], perturbation=_as_json(_pert([("top_k", 0, INF), ("random_k", 0, INF)]), tmp_path),
        stability=json.loads(json.dumps(one_seed).replace("NaN", "null")))
    assert failed == {} and len(paths) == 5
    for p in paths:
        assert_real_png(p)
    dist, layers, heat, pert, stab = (figure_texts(f) for f in figs)
    assert "the only score is 0" in dist and "all 3 values are 0" in layers and "every cell 0" in heat
    assert "all 2 runs non-finite (2 inf)" in pert and "one seed: no pair to compare" in stab
