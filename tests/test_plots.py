"""Figures of one experiment: every plot writes a real, non-blank PNG; aggregation is exact."""
from __future__ import annotations

import math
import re
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest
from matplotlib.text import Text

from cwa_core import plots
from cwa_core.plots import style as plot_style
from cwa_core.architectures import scored_params
from cwa_core.experiment import score_seed
from cwa_core.metrics import ScoreOptions
from cwa_core.outputs import stats_report, weighted_samples
from tiny_models import tiny_model

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
N_LAYERS = 5
HOT_LAYER = 3
METRIC = "grad_x_weight"


# ----------------------------------------------------------------------------- synthetic data


def _stats(values: np.ndarray) -> dict:
    return {
        "count": int(values.size),
        "mean": float(values.mean()),
        "std": float(values.std()),
        "min": float(values.min()),
        "max": float(values.max()),
        "p50": float(np.percentile(values, 50)),
        "p95": float(np.percentile(values, 95)),
        "p99": float(np.percentile(values, 99)),
    }


def make_samples(seed: int = 0) -> dict[str, np.ndarray]:
    """Lognormal scores per parameter type, a few exact zeros in attention."""
    rng = np.random.default_rng(seed)
    att = rng.lognormal(mean=-9.0, sigma=1.5, size=4000)
    att[:37] = 0.0
    return {
        "attention": att,
        "mlp": rng.lognormal(mean=-8.0, sigma=1.3, size=6000),
        "norm": rng.lognormal(mean=-5.5, sigma=1.0, size=300),
        "embedding": rng.lognormal(mean=-11.0, sigma=2.0, size=2000),
    }


def make_stats(seed: int = 0) -> dict:
    """A sensitivity_stats.json ``per_seed`` element: 5 layers, a hot layer 3."""
    rng = np.random.default_rng(seed)
    per_tensor, by_layer, by_type = [], {}, {}
    shapes = {"attention": ("q_proj", "k_proj", "v_proj", "o_proj"),
              "mlp": ("gate_proj", "up_proj", "down_proj"), "norm": ("input_layernorm",)}
    sizes = {"attention": 4096, "mlp": 11008, "norm": 64}
    mu = {"attention": -9.0, "mlp": -8.0, "norm": -5.5}
    for layer in range(N_LAYERS):
        for ptype, names in shapes.items():
            for name in names:
                shift = 3.0 if layer == HOT_LAYER else 0.0
                v = rng.lognormal(mu[ptype] + shift, 1.4, size=sizes[ptype] // 8)
                per_tensor.append({"name": f"model.layers.{layer}.{name}.weight",
                                   "layer": layer, "param_type": ptype, **_stats(v)})
                by_layer.setdefault(layer, []).append(v)
                by_type.setdefault(ptype, []).append(v)
    for name, ptype, m in (("model.norm.weight", "norm", -6.0),
                           ("model.embed_tokens.weight", "embedding", -11.0),
                           ("lm_head.weight", "lm_head", -7.0)):
        v = rng.lognormal(m, 1.8, size=2000)
        per_tensor.append({"name": name, "layer": -1, "param_type": ptype, **_stats(v)})
        by_layer.setdefault(-1, []).append(v)
        by_type.setdefault(ptype, []).append(v)
    per_layer = [{"layer": layer, **_stats(np.concatenate(vs))} for layer, vs in by_layer.items()]
    per_type = [{"param_type": t, **_stats(np.concatenate(vs))} for t, vs in by_type.items()]
    return {"seed": seed, "per_tensor": per_tensor, "per_layer": per_layer,
            "per_param_type": per_type}


def make_perturbation(selections=("top_k", "random_k", "bottom_k"), seeds=(0, 1, 2)) -> dict:
    base = {"top_k": 7.5, "random_k": 1.004, "bottom_k": 1.0001}
    rows = []
    for seed in seeds:
        for i, sel in enumerate(selections):
            ratio = base[sel] * (1.0 + 0.08 * (seed - 1) * (1.0 if sel == "top_k" else 0.01))
            rows.append({"selection": sel, "seed": seed, "k": 200, "n_weights": 200,
                         "ppl": 5.35 * ratio, "ppl_ratio": ratio, "nll": math.log(5.35 * ratio)})
    return {"window_length": 512, "eval_windows": 64, "eval_tokens": 32704,
            "baseline": {"ppl": 5.35, "nll": 1.677},
            "perturbation": {"method": "sign_flip", "scale": None, "bit": None},
            "metric": METRIC, "topk": 200, "mode": "global", "results": rows}


def make_stability(data_independent: bool = False) -> dict:
    seeds = [0, 1, 2]
    jac = {(0, 1): 0.81, (0, 2): 0.78, (1, 2): 0.80}
    spe = {(0, 1): 0.97, (0, 2): 0.95, (1, 2): 0.96}

    def section(d: dict) -> dict:
        vals = list(d.values())
        return {"pairs": [{"a": a, "b": b, "value": v} for (a, b), v in d.items()],
                "mean": float(np.mean(vals)), "min": min(vals), "max": max(vals)}

    return {"metric": METRIC, "data_independent": data_independent, "seeds": seeds, "k": 200,
            "mode": "global", "jaccard": section(jac),
            "spearman": {**section(spe), "n_weights": 10000}, "note": "synthetic"}


# ----------------------------------------------------------------------------- PNG checks


def assert_real_png(path: Path, min_px: int = 300) -> np.ndarray:
    """A valid, readable PNG, larger than ``min_px`` each side and not one flat colour."""
    path = Path(path)
    assert path.is_file(), f"{path} was not written"
    with open(path, "rb") as fh:
        assert fh.read(8) == PNG_SIGNATURE, f"{path} is not a PNG"
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[2] in (3, 4)
    h, w = img.shape[:2]
    assert h > min_px and w > min_px, f"{path.name} only {w}x{h} px"
    rgb = img[..., :3]
    assert float(rgb.std()) > 0.05, f"{path.name} looks blank (std {rgb.std():.4f})"
    # a figure has plenty of distinct colours (text, lines, fills)
    q = (np.clip(rgb, 0, 1) * 255).astype(np.uint32)
    packed = (q[..., 0] << 16) | (q[..., 1] << 8) | q[..., 2]
    assert np.unique(packed).size > 50
    return img


def capture_figures(monkeypatch: pytest.MonkeyPatch) -> list:
    """Every figure the plot functions save, in order (closed, but still inspectable)."""
    figs: list = []
    real = plot_style._save

    def spy(fig, path):
        figs.append(fig)
        return real(fig, path)

    monkeypatch.setattr(plot_style, "_save", spy)
    return figs


def figure_texts(fig) -> str:
    """Every text drawn on a figure (titles, labels, ticks, legend, annotations), one per line."""
    return "\n".join(t.get_text() for t in fig.findobj(Text) if t.get_text())


# ----------------------------------------------------------------------------- tests


def test_each_plot_writes_a_real_png(tmp_path: Path) -> None:
    stats = make_stats()
    out = tmp_path / "nested" / "dir"  # parent dirs are created
    written = [
        plots.plot_sensitivity_distribution(make_samples(), METRIC, out / "dist.png"),
        plots.plot_layer_comparison(stats["per_layer"], METRIC, out / "layers.png"),
        plots.plot_sensitivity_heatmap(stats["per_tensor"], METRIC, out / "heat.png"),
        plots.plot_perturbation_effects(make_perturbation(), out / "pert.png"),
        plots.plot_stability(make_stability(), out / "stab.png"),
    ]
    for p in written:
        assert isinstance(p, Path)
        assert_real_png(p)
    # the two-panel stability figure is wider than tall
    h, w = assert_real_png(written[-1]).shape[:2]
    assert w > 1.5 * h


def test_plots_handle_partial_and_edge_inputs(tmp_path: Path) -> None:
    # only top_k in the perturbation results, with a log axis (ratio spread > 20x)
    pert = make_perturbation(selections=("top_k",), seeds=(0,))
    pert["results"][0]["ppl_ratio"] = 400.0
    assert_real_png(plots.plot_perturbation_effects(pert, tmp_path / "p1.png"))
    # a type that is all zeros, plus a str path
    samples = make_samples()
    samples["lm_head"] = np.zeros(50)
    assert_real_png(plots.plot_sensitivity_distribution(samples, METRIC, str(tmp_path / "d.png")))
    # data-independent stability without a Spearman section
    stab = make_stability(data_independent=True)
    del stab["spearman"]
    assert_real_png(plots.plot_stability(stab, tmp_path / "s.png"))
    # narrow value range -> linear colour scale; many layers -> no annotations
    many = [{"name": f"l{i}.{t}", "layer": i, "param_type": t, "count": 10, "mean": 1.0 + i / 100}
            for i in range(40) for t in ("attention", "mlp")]
    assert_real_png(plots.plot_sensitivity_heatmap(many, METRIC, tmp_path / "h.png"))


def _experiment_kw(seeds=(0, 1, 2)) -> dict:
    return dict(samples_per_seed=[make_samples(s) for s in seeds],
                stats_per_seed=[make_stats(s) for s in seeds], seeds=list(seeds),
                perturbation=make_perturbation(seeds=seeds))


def test_save_experiment_plots_names_and_seeds(tmp_path: Path, monkeypatch) -> None:
    figs = capture_figures(monkeypatch)
    paths, failed = plots.save_experiment_plots(tmp_path, stability=make_stability(), **_experiment_kw())
    assert failed == {} and len(figs) == 5
    for fig in figs:  # every figure says which seeds it shows
        assert "3 seeds: 0, 1, 2" in figure_texts(fig)
    assert "pooled with equal weight per seed" in figure_texts(figs[0])
    assert "min-max over seeds" in figure_texts(figs[1])
    assert "mean over seeds" in figure_texts(figs[2])
    assert [p.name for p in paths] == [
        "sensitivity_distribution.png", "layer_comparison.png", "sensitivity_heatmap.png",
        "perturbation_effects.png", "stability_analysis.png"]
    assert all(p.parent == tmp_path / "plots" for p in paths)
    for p in paths:
        assert_real_png(p)

    other = tmp_path / "no_stab"
    paths, failed = plots.save_experiment_plots(other, **_experiment_kw(seeds=(5,)))
    assert failed == {}
    assert [p.name for p in paths] == [
        "sensitivity_distribution.png", "layer_comparison.png", "sensitivity_heatmap.png",
        "perturbation_effects.png"]
    assert sorted(q.name for q in (other / "plots").iterdir()) == sorted(p.name for p in paths)


def test_heatmap_matrix_count_weighted_means() -> None:
    per_tensor = [
        # attention, layer 0: two tensors combined -> (100*2 + 300*4) / 400 = 3.5
        {"name": "l0.q", "layer": 0, "param_type": "attention", "count": 100, "mean": 2.0},
        {"name": "l0.k", "layer": 0, "param_type": "attention", "count": 300, "mean": 4.0},
        # attention, layer 1: (10*1 + 30*5) / 40 = 4.0
        {"name": "l1.q", "layer": 1, "param_type": "attention", "count": 10, "mean": 1.0},
        {"name": "l1.o", "layer": 1, "param_type": "attention", "count": 30, "mean": 5.0},
        # mlp only in layer 1 -> mlp x layer 0 is missing (NaN)
        {"name": "l1.up", "layer": 1, "param_type": "mlp", "count": 50, "mean": 0.25},
        # the final norm, outside the blocks -> column "other" (-1) last
        {"name": "norm", "layer": -1, "param_type": "norm", "count": 8, "mean": 7.0},
        {"name": "embed", "layer": -1, "param_type": "embedding", "count": 1000, "mean": 0.5},
    ]
    types, layers, m = plots.heatmap_matrix(per_tensor)
    assert types == ["attention", "mlp", "norm", "embedding"]
    assert layers == [0, 1, -1]
    assert m.shape == (4, 3)
    expected = np.array([
        [3.5, 4.0, np.nan],
        [np.nan, 0.25, np.nan],
        [np.nan, np.nan, 7.0],
        [np.nan, np.nan, 0.5],
    ])
    np.testing.assert_allclose(m, expected, rtol=1e-12, equal_nan=True)
    assert int(np.isnan(m).sum()) == 7


def test_heatmap_matrix_zero_count_is_nan_and_hot_layer_found() -> None:
    types, layers, m = plots.heatmap_matrix(
        [{"name": "a", "layer": 2, "param_type": "mlp", "count": 0, "mean": 9.0}])
    assert (types, layers) == (["mlp"], [2]) and np.isnan(m[0, 0])
    # on the realistic stats the planted hot layer is the argmax for every decoder type
    types, layers, m = plots.heatmap_matrix(make_stats()["per_tensor"])
    assert layers == [0, 1, 2, 3, 4, -1]
    for t in ("attention", "mlp", "norm"):
        row = m[types.index(t), :N_LAYERS]
        assert layers[int(np.nanargmax(row))] == HOT_LAYER


def test_layer_label() -> None:
    assert plots.layer_label(-1) == "other" and plots.layer_label(7) == "7"


def test_empty_inputs_raise(tmp_path: Path) -> None:
    p = tmp_path / "x.png"
    cases = [
        lambda: plots.plot_sensitivity_distribution({}, METRIC, p),
        lambda: plots.plot_sensitivity_distribution({"mlp": np.array([])}, METRIC, p),
        lambda: plots.plot_sensitivity_distribution([{}, {"mlp": np.array([])}], METRIC, p),
        lambda: plots.plot_layer_comparison([], METRIC, p),
        lambda: plots.plot_layer_comparison([[], []], METRIC, p),
        lambda: plots.plot_sensitivity_heatmap([], METRIC, p),
        lambda: plots.heatmap_matrix([]),
        lambda: plots.plot_perturbation_effects({}, p),
        lambda: plots.plot_perturbation_effects({**make_perturbation(), "results": []}, p),
        lambda: plots.plot_stability({}, p),
        lambda: plots.plot_stability({"seeds": [], "jaccard": {"pairs": []}}, p),
    ]
    for case in cases:
        with pytest.raises(ValueError):
            case()
    assert not p.exists()


def test_equal_seeds_whose_mean_lands_one_ulp_above_their_max(tmp_path: Path) -> None:
    """The fresh-machine crash of `make smoke`: a seed-independent metric gives the same
    perplexity for every seed, and the mean of three copies of this float exceeds their max."""
    x = 1.9127555772777218
    assert np.mean([x, x, x]) > x  # the degenerate case itself, not a lucky model
    pert = make_perturbation()
    for r in pert["results"]:
        if r["selection"] == "random_k":
            r["ppl_ratio"] = x
    assert_real_png(plots.plot_perturbation_effects(pert, tmp_path / "equal.png"))


# ----------------------------------------------------------------------------- every seed drawn


def test_layer_comparison_draws_the_mean_over_seeds_and_their_range(tmp_path, monkeypatch) -> None:
    figs = capture_figures(monkeypatch)
    per_seed = [make_stats(s)["per_layer"] for s in (0, 1, 2)]
    plots.plot_layer_comparison(per_seed, METRIC, tmp_path / "l.png", seeds=[0, 1, 2])
    ax = figs[0].axes[0]
    decoder_lines = {ln.get_label(): ln for ln in ax.get_lines() if ln.get_label() in ("max", "mean")}
    by_layer = [{r["layer"]: r for r in rows} for rows in per_seed]
    for key in ("max", "mean"):
        want = [np.mean([b[layer][key] for b in by_layer]) for layer in range(N_LAYERS)]
        np.testing.assert_allclose(decoder_lines[key].get_ydata(), want, rtol=1e-12)
    # one band per series over the decoder layers, spanning the seeds' min..max of the max
    bands = [c for c in ax.collections if "Poly" in type(c).__name__]  # fill_between
    assert len(bands) == 3
    verts = bands[0].get_paths()[0].vertices  # the "max" band
    lo = min(b[HOT_LAYER]["max"] for b in by_layer)
    hi = max(b[HOT_LAYER]["max"] for b in by_layer)
    ys = verts[np.isclose(verts[:, 0], HOT_LAYER), 1]
    assert ys.min() == pytest.approx(lo, rel=1e-12) and ys.max() == pytest.approx(hi, rel=1e-12)
    # one seed: no band
    figs.clear()
    plots.plot_layer_comparison(per_seed[0], METRIC, tmp_path / "one.png", seeds=[0])
    assert not [c for c in figs[0].axes[0].collections if "Poly" in type(c).__name__]


def test_heatmap_draws_the_mean_of_the_seeds_matrices(tmp_path, monkeypatch) -> None:
    figs = capture_figures(monkeypatch)
    per_seed = [make_stats(s)["per_tensor"] for s in (0, 1, 2)]
    plots.plot_sensitivity_heatmap(per_seed, METRIC, tmp_path / "h.png", seeds=[0, 1, 2])
    drawn = figs[0].axes[0].images[0].get_array()
    want = np.mean([plots.heatmap_matrix(rows)[2] for rows in per_seed], axis=0)
    np.testing.assert_allclose(np.ma.filled(drawn, np.nan), want, rtol=1e-12, equal_nan=True)


def test_distribution_pools_seeds_with_equal_weight(tmp_path, monkeypatch) -> None:
    """Seed 0 has 1000 scores at 1e-3, seed 1 ten scores at 1e-1: pooled, each holds half."""
    figs = capture_figures(monkeypatch)
    runs = [{"mlp": np.full(1000, 1e-3)}, {"mlp": np.full(10, 1e-1)}]
    plots.plot_sensitivity_distribution(runs, METRIC, tmp_path / "d.png", seeds=[3, 4])
    ax = figs[0].axes[0]
    assert ax.get_xscale() == "log"
    steps = [p for p in ax.patches if type(p).__name__ == "StepPatch"]
    density, edges = steps[0].get_data()[:2]
    mass = density * np.diff(np.log10(edges))  # density is per unit log10 score
    assert mass.sum() == pytest.approx(1.0, rel=1e-12)
    assert sorted(mass[mass > 0]) == pytest.approx([0.5, 0.5], rel=1e-12)
    # the pooled 99th percentile: the top 1% of the weight lies at 1e-1
    p99 = [ln.get_xdata()[0] for ln in ax.get_lines() if ln.get_linestyle() == "--"]
    assert p99 == [pytest.approx(1e-1)]
    assert "2 seeds: 3, 4" in figure_texts(figs[0])


def test_the_write_experiment_call_on_real_scores_of_two_seeds(tmp_path, monkeypatch) -> None:
    """The call outputs.write_experiment makes, on SeedScores of a tiny Llama. Magnitude does not
    depend on the seed: exact statistics (per-tensor means, per-layer mean and max) agree to the
    bit and the figures draw them so; per-layer percentiles come from each seed's own sample."""
    model = tiny_model("llama")
    refs = scored_params(model)
    seed_scores = [score_seed(model, refs, None, metric="magnitude", seed=s, k=20, modes=("global",),
                              max_samples=1, opts=ScoreOptions(), stability_sample=100) for s in (0, 1)]
    figs = capture_figures(monkeypatch)
    paths, failed = plots.save_experiment_plots(
        tmp_path, samples_per_seed=[weighted_samples(ss) for ss in seed_scores],
        stats_per_seed=[stats_report(ss) for ss in seed_scores], seeds=[ss.seed for ss in seed_scores],
        perturbation=make_perturbation(seeds=(0, 1)), metric="magnitude")
    assert failed == {} and len(paths) == 4
    assert "2 seeds: 0, 1" in figure_texts(figs[0]) and "2 seeds: 0, 1" in figure_texts(figs[1])
    assert "2 seeds: 0, 1, mean over seeds; seeds identical" in figure_texts(figs[2])
    lines = {ln.get_label(): ln.get_ydata() for ln in figs[1].axes[0].get_lines()}
    seed0 = [r for r in stats_report(seed_scores[0])["per_layer"] if r["layer"] != -1]
    for key in ("mean", "max"):  # equal seeds: drawn at exactly their value
        assert lines[key].tolist() == [r[key] for r in seed0]
    # a fresh Llama's norm weights are all 1.0: magnitude ties, drawn as one value
    assert re.search(r"norm \(n=[\d,]+, all equal 1\)", figure_texts(figs[0]))


def test_the_figure_reads_ratios_as_schema_read_ratio_except_where_only_a_hand_made_dict_could_differ(caplog):
    """The perturbation figure keeps its own reader (``_row_ratio``): it equals
    ``schema.read_ratio`` on every row the experiment writes (a ratio in memory or in a new file;
    an old file's null with its status, over a finite baseline) but not on every dict a caller
    could hand it: a null ratio over an infinite baseline with status "inf" (the figure: NaN,
    inf / inf; the schema: inf), a null ratio beside an infinite ``ppl`` (the figure: NaN; the
    schema: +-inf); and the figure warns where it draws NaN for want of anything to read."""
    import itertools
    import logging

    from cwa_core.plots.perturbation import _row_ratio
    from cwa_core.schema import read_ratio

    inf, nan = math.inf, math.nan
    values = [None, 0.0, 2.0, -1.0, inf, -inf, nan]
    differ = []
    with caplog.at_level(logging.CRITICAL, logger="cwa_core.plots"):
        for ratio, ppl, status, base in itertools.product(values, values, [None, "finite", "inf", "nan", "unknown"],
                                                          [2.0, 0.0, -1.0, inf, nan]):
            row = {"ppl_ratio": ratio, "ppl": ppl, **({"ppl_status": status} if status else {})}
            a, b = _row_ratio(row, base), read_ratio(row, base)
            if not (a == b or (math.isnan(a) and math.isnan(b))):
                differ.append((ratio, ppl, status, base, a, b))
    assert differ and all(r is None and math.isnan(a) and (base == inf or ppl in (inf, -inf))
                          for r, ppl, _, base, a, _ in differ)
    assert {(ppl, status, base) for _, ppl, status, base, _, _ in differ} == (
        {(p, "inf", inf) for p in (None, 0.0, 2.0, -1.0, inf, -inf, nan)}
        | {(p, s, 2.0) for p in (inf, -inf) for s in (None, "finite", "unknown")})
