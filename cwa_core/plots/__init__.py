"""Publication-quality figures of one critical-weight-analysis experiment.

Every public ``plot_*`` function is pure: it takes plain Python / numpy data (the
formats of the JSON files the experiment writes, ``null`` included), writes exactly
one PNG to ``path`` (parent directories are created) and returns that path as a
:class:`~pathlib.Path`. Only truly empty input (no rows, no arrays, no seeds) raises
:class:`ValueError`; degenerate numbers never do. They are drawn for what they are:
all-zero scores on a linear axis with "all N scores are 0", non-finite scores dropped
and counted on the figure, an infinite perplexity as a hatched bar to the top of the
axis labelled "inf (overflow)", a NaN perplexity as a cross marked "NaN" at the baseline,
values a log axis cannot show listed under it. Each figure says which seeds it shows.

The three data-dependent figures take one input per seed (a single seed's input is
accepted too) and show every seed: the distribution pools the seeds with equal weight,
the layer comparison draws the mean over seeds with their min-max band, the heatmap the
mean over seeds. :func:`save_experiment_plots` draws every figure on its own, so one
figure's failure costs no other.

Figures use matplotlib's object API with the non-interactive Agg backend, a
colour-blind-safe palette (Okabe-Ito for categories, viridis for colour maps)
and a local ``rc_context`` for fonts, so importing this module changes nothing
global apart from selecting the Agg backend.

Layout: :mod:`.style` (palette, rc style, figure context, PNG writer, shared helpers), one
module per figure (:mod:`.distribution`, :mod:`.layers`, :mod:`.heatmap`,
:mod:`.perturbation`, :mod:`.stability`; :mod:`.campaign` the three figures of a protection
campaign), and here the registry :data:`FIGURES` (one entry
per figure: its name, which is its file's stem, and how it is drawn from the experiment's
inputs), :data:`PLOT_FILES` derived from it and :func:`save_experiment_plots`. The entries
call the figure functions through this module's names (so that a test can replace one).
Adding a figure is one entry here (and its module).
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import style  # noqa: F401  first: selects the Agg backend before any pyplot import
from ..registry import Registry
from .campaign import plot_campaign_failure_rate, plot_campaign_levels, plot_campaign_ratios
from .distribution import plot_sensitivity_distribution
from .heatmap import heatmap_matrix, plot_sensitivity_heatmap
from .layers import plot_layer_comparison
from .perturbation import INF_LABEL, plot_perturbation_effects
from .stability import plot_stability
from .style import DPI, NAN_LABEL, OTHER_LAYER, layer_label

log = logging.getLogger(__name__)

__all__ = [
    "DPI",
    "FIGURES",
    "PLOT_FILES",
    "ExperimentFigure",
    "ExperimentInputs",
    "heatmap_matrix",
    "layer_label",
    "plot_campaign_failure_rate",
    "plot_campaign_levels",
    "plot_campaign_ratios",
    "plot_layer_comparison",
    "plot_perturbation_effects",
    "plot_sensitivity_distribution",
    "plot_sensitivity_heatmap",
    "plot_stability",
    "save_experiment_plots",
]


@dataclass(frozen=True)
class ExperimentInputs:
    """What the figures of one experiment are drawn from (see :func:`save_experiment_plots`)."""

    samples_per_seed: Sequence[Mapping[str, np.ndarray]]
    stats_per_seed: Sequence[Mapping[str, Any]]
    seeds: Sequence[int]
    perturbation: Mapping[str, Any]
    stability: Mapping[str, Any] | None
    metric: str
    campaign: Mapping[str, Any] | None = None  # the content of campaign_results.json (issue 17)


@dataclass(frozen=True)
class ExperimentFigure:
    """One registered figure: ``draw(inputs, path)`` writes the PNG ``path`` and returns it;
    ``needs``: an :class:`ExperimentInputs` field that may be None, the figure being skipped then."""

    name: str
    draw: Callable[[ExperimentInputs, Path], Path]
    needs: str | None = None

    @property
    def file(self) -> str:
        return f"{self.name}.png"


#: The experiment's figures by name (the file's stem), in the order they are drawn.
FIGURES: Registry[ExperimentFigure] = Registry("experiment figure")


def _figure(name: str, *, needs: str | None = None):
    def deco(draw: Callable[[ExperimentInputs, Path], Path]):
        FIGURES.add(name, ExperimentFigure(name, draw, needs))
        return draw
    return deco


@_figure("sensitivity_distribution")
def _distribution(x: ExperimentInputs, path: Path) -> Path:
    return plot_sensitivity_distribution(list(x.samples_per_seed), x.metric, path, seeds=x.seeds)


@_figure("layer_comparison")
def _layers(x: ExperimentInputs, path: Path) -> Path:
    return plot_layer_comparison([s.get("per_layer") or [] for s in x.stats_per_seed], x.metric, path,
                                 seeds=x.seeds)


@_figure("sensitivity_heatmap")
def _heatmap(x: ExperimentInputs, path: Path) -> Path:
    return plot_sensitivity_heatmap([s.get("per_tensor") or [] for s in x.stats_per_seed], x.metric, path,
                                    seeds=x.seeds)


@_figure("perturbation_effects")
def _perturbation(x: ExperimentInputs, path: Path) -> Path:
    return plot_perturbation_effects(x.perturbation, path)


@_figure("stability_analysis", needs="stability")
def _stability(x: ExperimentInputs, path: Path) -> Path:
    return plot_stability(x.stability, path)


@_figure("campaign_failure_rate", needs="campaign")
def _campaign_failure_rate(x: ExperimentInputs, path: Path) -> Path:
    return plot_campaign_failure_rate(x.campaign, path)


@_figure("campaign_ratios", needs="campaign")
def _campaign_ratios(x: ExperimentInputs, path: Path) -> Path:
    return plot_campaign_ratios(x.campaign, path)


@_figure("campaign_levels", needs="campaign")
def _campaign_levels(x: ExperimentInputs, path: Path) -> Path:
    return plot_campaign_levels(x.campaign, path)


#: File names written by :func:`save_experiment_plots`, in order (from :data:`FIGURES`).
PLOT_FILES: tuple[str, ...] = tuple(FIGURES.get(n).file for n in FIGURES.names())


def save_experiment_plots(
    out_dir: str | Path,
    *,
    samples_per_seed: Sequence[Mapping[str, np.ndarray]],
    stats_per_seed: Sequence[Mapping[str, Any]],
    seeds: Sequence[int],
    perturbation: Mapping[str, Any],
    stability: Mapping[str, Any] | None = None,
    metric: str | None = None,
    campaign: Mapping[str, Any] | None = None,
) -> tuple[list[Path], dict[str, str]]:
    """Write every figure of :data:`FIGURES` into ``out_dir / "plots"``, each on its own.

    ``samples_per_seed[i]`` is :func:`cwa_core.outputs.weighted_samples` of seed ``seeds[i]``,
    ``stats_per_seed[i]`` element ``i`` of ``per_seed`` in ``sensitivity_stats.json``;
    ``perturbation`` the content of ``perturbation_results.json``; ``stability``
    (optional) that of ``stability.json``, ``campaign`` (optional) that of ``campaign_results.json``. The metric name defaults to the one recorded in
    ``perturbation`` (or ``stability``). A figure that raises is skipped with a warning and
    the others are still drawn. Returns ``(paths, failed)``: the written paths in the order of
    :data:`PLOT_FILES` (the stability and campaign figures only when given), and for every figure that
    raised its file name -> "ExceptionType: message" (one line).
    """
    metric = (metric or (perturbation or {}).get("metric")
              or (stability or {}).get("metric") or "score")
    plots = Path(out_dir) / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    inputs = ExperimentInputs(samples_per_seed, stats_per_seed, seeds, perturbation, stability, metric, campaign)
    paths: list[Path] = []
    failed: dict[str, str] = {}
    for name in FIGURES.names():
        fig = FIGURES.get(name)
        if fig.needs is not None and getattr(inputs, fig.needs) is None:
            continue
        try:
            paths.append(fig.draw(inputs, plots / fig.file))
        except Exception as e:  # one figure's failure must cost neither the others nor the numbers
            failed[fig.file] = " ".join(f"{type(e).__name__}: {e}".split())
            log.warning("plot %s failed: %s", fig.file, failed[fig.file])
    return paths, failed
