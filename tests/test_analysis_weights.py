"""Where the top-K weights live (enrichment against each model's own parameter shares, and the
comparison of two models' enrichment), and the super-weight table (one row per coordinate,
protocol and variant). Known answers on synthetic result folders (tests/synthetic_results.py),
every statistic recomputed here from its formula with scipy's distributions."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import optimize
from scipy import stats as sps

from analysis.cross_model import AnalysisOptions, analyze
from analysis.compare import CompareOptions
from analysis.enrichment import compare_enrichment, enrichment_rows, goodness_of_fit
from synthetic_results import MODEL_A, SUPER_A, SynthCell, SynthModel, write_cell

FAST = AnalysisOptions(compare=CompareOptions(n_boot=200), figures=False)
FLAT = {"attention": 1.0, "mlp": 1.0, "norm": 1.0}
PLANTED = {"attention": 3.0, "mlp": 1.0, "norm": 1.0}  # an attention weight is 3x as likely to be on top
# MODEL_A (4 layers, hidden 64, inter 128): 4 x (4 x 4096 attention + 3 x 8192 MLP + 2 x 64 norm) + 64 = 164416
# weights, attention share 0.399. SHALLOW (2 layers, hidden 64, inter 342): 2 x (4 x 4096 + 3 x 21888 + 128) + 64,
# the same 164416 weights, attention share 0.199. Every tensor's size is a multiple of 64, so K = 164416 / 64 puts
# the top-K of both in exact proportion to their sizes (synthetic exact_placement); with attention weighted 3x,
# MODEL_A's K = (4 x (4 x 3 x 4096 + 3 x 8192 + 128) + 64) / 64 does.
SHALLOW = SynthModel("synth/shallow", n_layers=2, hidden=64, inter=342)
N_PARAMS = 164416
K_FLAT = N_PARAMS // 64
WEIGHTED_A = 4 * (4 * 3 * 4096 + 3 * 8192 + 128) + 64
K_PLANTED = WEIGHTED_A // 64


def _cell(model, k, type_means, **kw) -> SynthCell:
    return SynthCell(model=model, topk=k, seeds=(0,), jaccard=None, exact_placement=True, type_means=type_means, **kw)


def by(rows, **match):
    return [r for r in rows if all(r.get(k) == v for k, v in match.items())]


def _binom_two_sided(x: int, n: int, p: float) -> float:
    """Exact two-sided binomial p: the probability of every count no likelier than x."""
    pmf = sps.binom.pmf(np.arange(n + 1), n, p)
    return float(min(1.0, pmf[pmf <= pmf[x] * (1 + 1e-7)].sum()))


def _poisson_interaction_g2(x: np.ndarray, e: np.ndarray) -> float:
    """G^2 of log mu = log e + a_m + b_g against the saturated model, fitted by minimising the
    Poisson negative log-likelihood with scipy.optimize (not the module's proportional fitting)."""
    m, g = x.shape

    def mu(theta):
        a = np.concatenate([[0.0], theta[: m - 1]])
        return e * np.exp(a[:, None] + theta[m - 1:][None, :])

    def nll(theta):
        u = mu(theta)
        return float((u - x * np.log(u)).sum())

    def grad(theta):
        r = mu(theta) - x
        return np.concatenate([r.sum(axis=1)[1:], r.sum(axis=0)])

    theta0 = np.concatenate([np.zeros(m - 1), np.log(x.sum(axis=0) / e.sum(axis=0))])
    fit = optimize.minimize(nll, theta0, jac=grad, method="BFGS", options={"gtol": 1e-10, "maxiter": 10_000})
    u = mu(fit.x)
    return float(2 * np.where(x > 0, x * np.log(x / u), 0.0).sum())


# --------------------------------------------------------------------------- the statistics

def test_enrichment_statistics_match_their_formulas():
    counts, shares = {"attention": 70.0, "mlp": 25.0, "norm": 5.0}, {"attention": 0.4, "mlp": 0.55, "norm": 0.05}
    rows = enrichment_rows(counts, shares)
    for g in counts:
        x, s = int(counts[g]), shares[g]
        assert rows[g]["enrichment"] == pytest.approx((x / 100) / s, rel=1e-12)
        assert rows[g]["p_value"] == pytest.approx(_binom_two_sided(x, 100, s), rel=1e-9)
        lo, hi = sps.beta.ppf(0.025, x, 100 - x + 1), sps.beta.ppf(0.975, x + 1, 100 - x)  # Clopper-Pearson
        assert rows[g]["enrichment_ci"] == pytest.approx([lo / s, hi / s], rel=1e-9)
    fit = goodness_of_fit(counts, shares)
    e = 100 * np.array([0.4, 0.55, 0.05])
    chi2 = float(((np.array([70, 25, 5]) - e) ** 2 / e).sum())
    assert fit["chi2"] == pytest.approx(chi2, rel=1e-12) and fit["dof"] == 2
    assert fit["p_value"] == pytest.approx(sps.chi2.sf(chi2, 2), rel=1e-9)
    # counts exactly in proportion: no enrichment anywhere, chi-square 0, p 1
    exact = goodness_of_fit({"a": 40.0, "b": 60.0}, {"a": 0.4, "b": 0.6})
    assert exact["chi2"] == 0.0 and exact["p_value"] == 1.0
    assert [r["enrichment"] for r in enrichment_rows({"a": 40.0, "b": 60.0}, {"a": 0.4, "b": 0.6}).values()] == \
        pytest.approx([1.0, 1.0], rel=1e-12)


def test_comparison_is_a_poisson_interaction_test():
    xa, xb = {"attention": 60.0, "mlp": 30.0, "norm": 10.0}, {"attention": 20.0, "mlp": 70.0, "norm": 10.0}
    sa, sb = {"attention": 0.4, "mlp": 0.55, "norm": 0.05}, {"attention": 0.15, "mlp": 0.8, "norm": 0.05}
    t = compare_enrichment(xa, sa, xb, sb)
    x = np.array([[60, 30, 10], [20, 70, 10]], dtype=float)
    e = np.array([[40, 55, 5], [15, 80, 5]], dtype=float)
    g2 = _poisson_interaction_g2(x, e)
    assert t["g2"] == pytest.approx(g2, rel=1e-6) and t["dof"] == 2
    assert t["p_value"] == pytest.approx(sps.chi2.sf(g2, 2), rel=1e-5)
    # with equal parameter shares the offsets cancel: the G-test of homogeneity of the raw counts
    same = compare_enrichment(xa, sa, xb, sa)
    ref = sps.chi2_contingency(x, correction=False, lambda_="log-likelihood")
    assert same["g2"] == pytest.approx(ref.statistic, rel=1e-9) and same["p_value"] == pytest.approx(ref.pvalue, rel=1e-9)
    # each in proportion to its own (different) shares: equal profiles, nothing to find
    prop = compare_enrichment({g: 100 * v for g, v in sa.items()}, sa, {g: 300 * v for g, v in sb.items()}, sb)
    assert prop["g2"] == pytest.approx(0.0, abs=1e-9) and prop["p_value"] == pytest.approx(1.0)


def test_degenerate_enrichment_inputs():
    # no parameter counts: no enrichment, no test, said so
    rows = enrichment_rows({"mlp": 5.0}, {})
    assert rows["mlp"]["enrichment"] is None and rows["mlp"]["p_value"] is None
    assert goodness_of_fit({"mlp": 5.0}, {})["p_value"] is None
    # no top-K weight at all
    assert goodness_of_fit({"a": 0.0, "b": 0.0}, {"a": 0.5, "b": 0.5})["p_value"] is None
    # a group only one model has (e.g. biases) carries no information on the difference: left out
    t = compare_enrichment({"a": 10.0, "b": 10.0, "bias": 3.0}, {"a": 0.45, "b": 0.45, "bias": 0.1},
                           {"a": 10.0, "b": 10.0}, {"a": 0.5, "b": 0.5})
    assert t["groups"] == ["a", "b"] and t["groups_left_out"] == ["bias"] and t["g2"] == pytest.approx(0.0, abs=1e-12)
    # one group with top-K weights in neither model: no test
    assert compare_enrichment({"a": 5.0, "b": 0.0}, {"a": 0.5, "b": 0.5}, {"a": 7.0, "b": 0.0},
                              {"a": 0.5, "b": 0.5})["p_value"] is None


# --------------------------------------------------------------------------- through the pipeline

def _counts(loc, model, axis="param_type", groups=("attention", "mlp", "norm")) -> list[float]:
    return [by(loc["shares"], model=model, axis=axis, category=g)[0]["count_mean"] for g in groups]


def _shares(loc, model, axis="param_type", groups=("attention", "mlp", "norm")) -> list[float]:
    return [by(loc["shares"], model=model, axis=axis, category=g)[0]["weight_share"] for g in groups]


def test_models_placing_top_k_in_proportion_to_their_own_shares_are_alike(tmp_path):
    """Two models of different attention share (0.399 and 0.199), each with its top-K exactly
    in proportion to its own parameter counts: no enrichment, and no difference between them
    (the chi-square of raw counts used before called them different, p = 4e-54)."""
    write_cell(tmp_path / "a", _cell(MODEL_A, K_FLAT, FLAT))
    write_cell(tmp_path / "s", _cell(SHALLOW, K_FLAT, FLAT))
    a = analyze([str(tmp_path)], options=FAST)
    loc = a["location"]
    assert _counts(loc, "synth/llama-a") == [1024, 1536, 9] and _counts(loc, "synth/shallow") == [512, 2052, 5]
    assert _shares(loc, "synth/shallow")[0] == pytest.approx(2 * 4 * 4096 / N_PARAMS, rel=1e-12)
    for r in loc["shares"]:
        assert r["enrichment"] == pytest.approx(1.0, rel=1e-12), r
        assert r["enrichment_ci"][0] < 1.0 < r["enrichment_ci"][1] and r["p_value"] == pytest.approx(1.0)
    assert len(loc["fit"]) == 4
    assert all(f["chi2"] == pytest.approx(0.0, abs=1e-9) and f["p_value"] == pytest.approx(1.0) for f in loc["fit"])
    comps = {t["axis"]: t for t in loc["comparisons"]}
    assert set(comps) == {"param_type", "depth"}
    for t in comps.values():
        assert (t["model_a"], t["model_b"], sorted(t["cells"])) == ("synth/llama-a", "synth/shallow", ["a", "s"])
        assert t["g2"] == pytest.approx(0.0, abs=1e-9) and t["p_value"] == pytest.approx(1.0), t
    assert comps["param_type"]["dof"] == 2
    # what the chi-square of raw counts (the test used before) says of the same two models
    raw = sps.chi2_contingency(np.array([[1024, 1536, 9], [512, 2052, 5]]), correction=False)
    assert raw.pvalue < 1e-50


def test_planted_enrichment_is_found_and_a_different_profile_differs(tmp_path):
    """Attention weights 3x as likely to be on top of MODEL_A: enrichment 3 x 164416 / 295488
    = 1.669 (exact); the goodness of fit rejects no enrichment; against a model without it
    (SHALLOW, proportional) the enrichment differs; against SHALLOW with the same 3x it does not."""
    write_cell(tmp_path / "a", _cell(MODEL_A, K_PLANTED, PLANTED))
    write_cell(tmp_path / "flat", _cell(SHALLOW, K_PLANTED, FLAT))
    write_cell(tmp_path / "same", _cell(SynthModel("synth/shallow-3x", n_layers=2, hidden=64, inter=342), K_PLANTED,
                                        PLANTED, set_key="same"))
    a = analyze([str(tmp_path)], options=FAST)
    loc = a["location"]
    att = by(loc["shares"], model="synth/llama-a", axis="param_type", category="attention")[0]
    assert att["enrichment"] == pytest.approx(3 * N_PARAMS / WEIGHTED_A, rel=1e-12)
    assert att["count_mean"] == 16 * 3 * 64 and att["enrichment_ci"][0] > 1.5
    assert att["p_value"] == pytest.approx(_binom_two_sided(3072, K_PLANTED, att["weight_share"]), rel=1e-6, abs=1e-300)
    assert att["p_value"] < 1e-100
    fit = by(loc["fit"], model="synth/llama-a", axis="param_type")[0]
    e = K_PLANTED * np.array(_shares(loc, "synth/llama-a"))
    chi2 = float(((np.array(_counts(loc, "synth/llama-a")) - e) ** 2 / e).sum())
    assert fit["chi2"] == pytest.approx(chi2, rel=1e-9) and fit["p_value"] < 1e-100
    for other, differs in (("synth/shallow", True), ("synth/shallow-3x", False)):
        t = by(loc["comparisons"], model_a="synth/llama-a", model_b=other, axis="param_type")[0]
        x = np.array([_counts(loc, "synth/llama-a"), _counts(loc, other)])
        g2 = _poisson_interaction_g2(x, x.sum(axis=1, keepdims=True) * np.array([_shares(loc, "synth/llama-a"),
                                                                                 _shares(loc, other)]))
        assert t["g2"] == pytest.approx(g2, rel=1e-6, abs=1e-9)
        assert (t["p_value"] < 1e-30) if differs else (t["p_value"] > 0.5), (other, t)


def test_location_keys_on_variant(tmp_path):
    """Cells that differ in a setting outside the explicit keys (here the calibration size) are
    different variants: their enrichment rows and tests stay apart and name only their cells."""
    import json

    for name, model in (("a", MODEL_A), ("s", SHALLOW)):
        write_cell(tmp_path / name, _cell(model, K_FLAT, FLAT))
        write_cell(tmp_path / f"{name}-big", _cell(model, K_FLAT, PLANTED))
        m = json.loads((tmp_path / f"{name}-big" / "manifest.json").read_text())
        m["settings"]["max_samples"] = 64  # another variant of the same model, metric, K and mode
        (tmp_path / f"{name}-big" / "manifest.json").write_text(json.dumps(m))
    a = analyze([str(tmp_path)], options=FAST)
    comps = by(a["location"]["comparisons"], axis="param_type")
    assert len(comps) == 2 and {tuple(t["cells"]) for t in comps} == {("a", "s"), ("a-big", "s-big")}
    assert len({t["variant"] for t in comps}) == 2
    assert len(by(a["location"]["shares"], model="synth/llama-a", axis="param_type", category="attention")) == 2


# --------------------------------------------------------------------------- super weights

def _candidate(ratio_zeroed: float, metric: str, global_ranks: list[int | None], bound: int | None = None) -> list[dict]:
    """One candidate at layer 1 down_proj [3, 7], ranked under ``metric`` in seeds 0, 1, 2."""
    return [{"layer": 1, "module": "mlp.down_proj", "row": 3, "col": 7, "value": -12.5, "round": 1,
             "ppl_zeroed": 20.0 * ratio_zeroed, "ratio_zeroed": ratio_zeroed, "ratio_random": 1.0, "ratio_restored": 1.1,
             "ranks": {metric: {str(s): {"per_tensor": 1, "global": r, "global_lower_bound": None if r else bound}
                                for s, r in enumerate(global_ranks)}}}]


def _other_variant(folder) -> None:
    import json

    m = json.loads((folder / "manifest.json").read_text())
    m["settings"]["max_samples"] = 64  # a setting outside the explicit keys: another variant
    (folder / "manifest.json").write_text(json.dumps(m))


def test_super_weight_rows_per_protocol_and_variant(tmp_path):
    """One candidate coordinate found under two protocols (128- and 256-token windows) and, under
    the first, in two variants: three rows, each with its protocol, its own causal numbers, the
    ranks of every metric that ranked it there, and top-K membership counted only against the
    cells of its protocol and variant."""
    gxw_p1, gxw_p2, gxw_v = [5, 50, 5], [60, 70, 80], [1, 1, 1]
    plan = {  # folder: (window length, metric, K, candidates)
        "p1-gxw-k10": (128, "grad_x_weight", 10, _candidate(45.0, "grad_x_weight", gxw_p1)),
        "p1-gxw-k100": (128, "grad_x_weight", 100, _candidate(45.0, "grad_x_weight", gxw_p1)),
        "p1-mag-k10": (128, "magnitude", 10, _candidate(45.0, "magnitude", [3, 3, None], bound=5)),
        "p2-gxw-k10": (256, "grad_x_weight", 10, _candidate(12.0, "grad_x_weight", gxw_p2)),
        "p2-gxw-k100": (256, "grad_x_weight", 100, _candidate(12.0, "grad_x_weight", gxw_p2)),
        "v-gxw-k10": (128, "grad_x_weight", 10, _candidate(30.0, "grad_x_weight", gxw_v)),
    }
    for name, (wl, metric, k, cand) in plan.items():
        write_cell(tmp_path / name, SynthCell(window_length=wl, metric=metric, topk=k, super_weights=cand))
    _other_variant(tmp_path / "v-gxw-k10")
    a = analyze([str(tmp_path)], options=FAST)
    rows = a["super_weights"]["candidates"]
    assert len(rows) == 3 and all((r["layer"], r["row"], r["col"]) == (1, 3, 7) for r in rows)
    proto = {p["window_length"]: p["id"] for p in a["protocols"]}
    p1 = next(r for r in rows if r["protocol"] == proto[128] and r["ratio_zeroed"] == 45.0)
    p2 = next(r for r in rows if r["protocol"] == proto[256])
    v = next(r for r in rows if r["ratio_zeroed"] == 30.0)
    assert v["protocol"] == proto[128] and v["variant"] != p1["variant"] and p2["ratio_zeroed"] == 12.0
    assert p1["cells"] == ["p1-gxw-k10", "p1-gxw-k100", "p1-mag-k10"] and v["cells"] == ["v-gxw-k10"]

    def tops(row):
        return {(t["metric"], t["k"]): (t["seeds_in_top_k"], t["seeds_ranked"], t["cells"]) for t in row["in_top_k"]}

    # global ranks 5, 50, 5: in the top 10 in seeds 0 and 2, the top 100 in all; magnitude ranks 3, 3 and a bound
    # (>= 5) that cannot tell whether seed 2 is in the top 10: two seeds ranked, both in
    assert tops(p1) == {("grad_x_weight", 10): ([0, 2], 3, ["p1-gxw-k10"]),
                        ("grad_x_weight", 100): ([0, 1, 2], 3, ["p1-gxw-k100"]),
                        ("magnitude", 10): ([0, 1], 2, ["p1-mag-k10"])}
    assert tops(p2) == {("grad_x_weight", 10): ([], 3, ["p2-gxw-k10"]),
                        ("grad_x_weight", 100): ([0, 1, 2], 3, ["p2-gxw-k100"])}
    assert tops(v) == {("grad_x_weight", 10): ([0, 1, 2], 3, ["v-gxw-k10"])}
    assert sorted(p1["ranks"]) == ["grad_x_weight", "magnitude"] and sorted(p2["ranks"]) == ["grad_x_weight"]


def test_super_weight_rank_bound_above_k_counts_as_outside(tmp_path):
    """A global rank known only as a lower bound above K is ranked and outside the top K; one
    at or below K is unknown and not counted either way."""
    write_cell(tmp_path / "k10", SynthCell(topk=10, super_weights=_candidate(5.0, "grad_x_weight", [None, None, 4],
                                                                             bound=50)))
    write_cell(tmp_path / "k100", SynthCell(topk=100))
    (row,) = analyze([str(tmp_path)], options=FAST)["super_weights"]["candidates"]
    got = {t["k"]: (t["seeds_in_top_k"], t["seeds_ranked"]) for t in row["in_top_k"]}
    assert got == {10: ([2], 3), 100: ([2], 1)}
