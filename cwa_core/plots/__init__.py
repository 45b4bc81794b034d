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
:mod:`.perturbation`, :mod:`.stability`), and here :data:`PLOT_FILES` and
:func:`save_experiment_plots`, which reads the figure functions from this module.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import style  # noqa: F401  first: selects the Agg backend before any pyplot import
from .distribution import plot_sensitivity_distribution
from .heatmap import heatmap_matrix, plot_sensitivity_heatmap
from .layers import plot_layer_comparison
from .perturbation import INF_LABEL, plot_perturbation_effects
from .stability import plot_stability
from .style import DPI, NAN_LABEL, OTHER_LAYER, layer_label

log = logging.getLogger(__name__)

__all__ = [
    "DPI",
    "PLOT_FILES",
    "heatmap_matrix",
    "layer_label",
    "plot_layer_comparison",
    "plot_perturbation_effects",
    "plot_sensitivity_distribution",
    "plot_sensitivity_heatmap",
    "plot_stability",
    "save_experiment_plots",
]

#: File names written by :func:`save_experiment_plots`, in order.
PLOT_FILES: tuple[str, ...] = (
    "sensitivity_distribution.png",
    "layer_comparison.png",
    "sensitivity_heatmap.png",
    "perturbation_effects.png",
    "stability_analysis.png",
)


def save_experiment_plots(
    out_dir: str | Path,
    *,
    samples_per_seed: Sequence[Mapping[str, np.ndarray]],
    stats_per_seed: Sequence[Mapping[str, Any]],
    seeds: Sequence[int],
    perturbation: Mapping[str, Any],
    stability: Mapping[str, Any] | None = None,
    metric: str | None = None,
) -> tuple[list[Path], dict[str, str]]:
    """Write every figure of one experiment into ``out_dir / "plots"``, each on its own.

    ``samples_per_seed[i]`` is :func:`cwa_core.outputs.weighted_samples` of seed ``seeds[i]``,
    ``stats_per_seed[i]`` element ``i`` of ``per_seed`` in ``sensitivity_stats.json``;
    ``perturbation`` the content of ``perturbation_results.json``; ``stability``
    (optional) that of ``stability.json``. The metric name defaults to the one recorded in
    ``perturbation`` (or ``stability``). A figure that raises is skipped with a warning and
    the others are still drawn. Returns ``(paths, failed)``: the written paths in the order of
    :data:`PLOT_FILES` (the stability figure only when given), and for every figure that
    raised its file name -> "ExceptionType: message" (one line).
    """
    metric = (metric or (perturbation or {}).get("metric")
              or (stability or {}).get("metric") or "score")
    plots = Path(out_dir) / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    jobs = [
        (PLOT_FILES[0], lambda p: plot_sensitivity_distribution(
            list(samples_per_seed), metric, p, seeds=seeds)),
        (PLOT_FILES[1], lambda p: plot_layer_comparison(
            [s.get("per_layer") or [] for s in stats_per_seed], metric, p, seeds=seeds)),
        (PLOT_FILES[2], lambda p: plot_sensitivity_heatmap(
            [s.get("per_tensor") or [] for s in stats_per_seed], metric, p, seeds=seeds)),
        (PLOT_FILES[3], lambda p: plot_perturbation_effects(perturbation, p)),
    ]
    if stability is not None:
        jobs.append((PLOT_FILES[4], lambda p: plot_stability(stability, p)))
    paths: list[Path] = []
    failed: dict[str, str] = {}
    for name, draw in jobs:
        try:
            paths.append(draw(plots / name))
        except Exception as e:  # one figure's failure must cost neither the others nor the numbers
            failed[name] = " ".join(f"{type(e).__name__}: {e}".split())
            log.warning("plot %s failed: %s", name, failed[name])
    return paths, failed
