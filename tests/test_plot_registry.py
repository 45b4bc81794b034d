"""The experiment figures' registry (cwa_core.plots.FIGURES): every entry is drawn from a small
synthetic result and writes its file under the name it always had; adding a figure is one entry."""
from __future__ import annotations

import ast
import math
from pathlib import Path

import numpy as np
import pytest

from cwa_core import plots
from cwa_core.plots import style as plot_style
from cwa_core.registry import Registry
from test_campaign_plots import make_campaign
from test_plots import assert_real_png, capture_figures, figure_texts, make_perturbation, make_samples, make_stats, \
    make_stability

# the file names written before the registry (PLOT_FILES[0..4], by position): they must not change
NAMES_BEFORE = ("sensitivity_distribution.png", "layer_comparison.png", "sensitivity_heatmap.png",
                "perturbation_effects.png", "stability_analysis.png")
CAMPAIGN_FIGURES = ("campaign_failure_rate", "campaign_ratios", "campaign_levels")  # issue 17, needs a campaign


def _inputs(seeds=(0, 1), stability=True) -> plots.ExperimentInputs:
    return plots.ExperimentInputs([make_samples(s) for s in seeds], [make_stats(s) for s in seeds], list(seeds),
                                  make_perturbation(seeds=seeds), make_stability() if stability else None, "m",
                                  make_campaign(seeds=seeds))


def test_the_registry_holds_todays_figures_under_todays_names():
    assert plots.PLOT_FILES == NAMES_BEFORE + tuple(f"{n}.png" for n in CAMPAIGN_FIGURES)
    assert tuple(plots.FIGURES.get(n).file for n in plots.FIGURES.names()) == plots.PLOT_FILES
    assert [n for n in plots.FIGURES.names() if plots.FIGURES.get(n).needs] == ["stability_analysis",
                                                                               *CAMPAIGN_FIGURES]
    with pytest.raises(ValueError, match="duplicate experiment figure name 'layer_comparison'"):
        plots.FIGURES.add("layer_comparison", plots.FIGURES.get("layer_comparison"))
    with pytest.raises(KeyError, match="allowed: sensitivity_distribution, layer_comparison"):
        plots.FIGURES.get("nope")


@pytest.mark.parametrize("name", list(plots.FIGURES.names()))
def test_every_entry_draws_its_own_file(tmp_path, monkeypatch, name):
    figs = capture_figures(monkeypatch)
    entry = plots.FIGURES.get(name)
    path = entry.draw(_inputs(seeds=(0, 1, 2)), tmp_path / entry.file)  # make_stability has 3 seeds
    assert path == tmp_path / f"{name}.png" and [p.name for p in tmp_path.iterdir()] == [f"{name}.png"]
    assert_real_png(path)
    assert len(figs) == 1 and "3 seeds: 0, 1, 2" in figure_texts(figs[0])  # drawn from the inputs given


def test_one_seed_and_no_stability_draw_the_other_four(tmp_path):
    x = _inputs(seeds=(7,), stability=False)
    paths, failed = plots.save_experiment_plots(tmp_path, samples_per_seed=x.samples_per_seed,
                                                stats_per_seed=x.stats_per_seed, seeds=x.seeds,
                                                perturbation=x.perturbation)
    assert failed == {}
    assert [p.name for p in paths] == list(NAMES_BEFORE[:4])
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == sorted(NAMES_BEFORE[:4])


def test_inf_and_nan_results_still_draw_every_figure(tmp_path):
    pert = make_perturbation(seeds=(0, 1))
    pert["results"][0]["ppl_ratio"], pert["results"][1]["ppl_ratio"] = math.inf, math.nan
    samples = [{"mlp": np.array([0.0, 0.0, math.inf, math.nan, 1.0])}, {"mlp": np.zeros(3)}]
    stats = [make_stats(0), make_stats(1)]
    stats[0]["per_layer"][0]["max"] = None  # a null (non-finite) statistic, as JSON holds it
    paths, failed = plots.save_experiment_plots(tmp_path, samples_per_seed=samples, stats_per_seed=stats,
                                                seeds=[0, 1], perturbation=pert, stability=make_stability())
    assert failed == {} and [p.name for p in paths] == list(NAMES_BEFORE)


def test_adding_a_figure_is_one_registry_entry(tmp_path, monkeypatch):
    """A new entry is drawn after the others, into its own file, and fails on its own."""
    kept = [plots.FIGURES.get(n) for n in ("perturbation_effects", "stability_analysis")]
    monkeypatch.setattr(plots, "FIGURES", Registry("experiment figure"))
    for entry in kept:
        plots.FIGURES.add(entry.name, entry)

    def broken(x, path):
        raise RuntimeError("not drawable")

    plots.FIGURES.add("extra", plots.ExperimentFigure("extra", broken))
    x = _inputs()
    paths, failed = plots.save_experiment_plots(tmp_path, samples_per_seed=x.samples_per_seed,
                                                stats_per_seed=x.stats_per_seed, seeds=x.seeds,
                                                perturbation=x.perturbation, stability=x.stability)
    assert [p.name for p in paths] == ["perturbation_effects.png", "stability_analysis.png"]
    assert failed == {"extra.png": "RuntimeError: not drawable"}


def test_entries_call_the_figure_functions_through_the_package(tmp_path, monkeypatch):
    """A test (or a caller) replacing plots.plot_stability reaches the registry's entry."""
    calls = []
    monkeypatch.setattr(plots, "plot_stability", lambda stab, path: calls.append(stab) or Path(path))
    x = _inputs()
    plots.FIGURES.get("stability_analysis").draw(x, tmp_path / "s.png")
    assert calls == [x.stability]


def test_the_super_weight_figure_uses_only_public_style_names():
    tree = ast.parse((Path(plots.__file__).parent.parent / "superweight_plots.py").read_text())
    imported = [a.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                and (node.module or "").startswith("plots") for a in node.names]
    used = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name) and node.value.id == "style"}
    assert imported == ["style"] and used == {"color", "figure", "save_png"}, (imported, used)
    assert plot_style.color("vermillion") == "#D55E00" and plot_style.color("blue") == "#0072B2"
