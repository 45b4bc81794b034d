"""The layer comparison figure: per-layer mean, 99th percentile and maximum over seeds.

Part of :mod:`cwa_core.plots`; see its docstring for the conventions every figure follows.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.patches import Patch

from . import style
from .style import (
    _OKABE_ITO, OTHER_LAYER, layer_label, _layer_sort_key, _num, _seeds_caption, _short_list,
    _rows_per_seed, _figure, _fmt, _thin_ticks, _note_below, _center_message,
)

log = logging.getLogger(__name__)


_LAYER_SERIES = (
    ("max", "max", _OKABE_ITO["vermillion"], "^"),
    ("p99", "99th percentile", _OKABE_ITO["orange"], "s"),
    ("mean", "mean", _OKABE_ITO["blue"], "o"),
)


def _layers_by_seed(runs: Sequence[Sequence[Mapping[str, Any]]], fn: str) -> list[dict[int, Mapping]]:
    out = []
    for rows in runs:
        d: dict[int, Mapping[str, Any]] = {}
        for r in rows:
            layer = int(r["layer"])
            if layer in d:
                raise ValueError(f"{fn}: duplicate layer {layer} within one seed")
            d[layer] = r
        out.append(d)
    return out


def _seed_summary(values: np.ndarray, have: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per column: the mean over the seeds that have it (inf and NaN propagate: a seed whose
    statistic is inf makes the mean inf), and the min/max over its finite values."""
    n_l = values.shape[1]
    mean, lo, hi = (np.full(n_l, np.nan) for _ in range(3))
    for j in range(n_l):
        v = values[have[:, j], j]
        if v.size:
            with np.errstate(invalid="ignore"):
                mean[j] = v.mean()
            f = v[np.isfinite(v)]
            if f.size:
                lo[j], hi[j] = f.min(), f.max()
                if np.isfinite(mean[j]):  # one-ulp rounding of equal values: keep lo <= mean <= hi
                    mean[j] = min(max(mean[j], lo[j]), hi[j])
    return mean, lo, hi


@dataclass(frozen=True)
class _LayerData:
    """The layers in drawing order ("other" last), per series key the (mean, min, max) over
    seeds of each layer, the seed count and the seeds' caption."""

    layers: list[int]
    summary: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]
    n_seeds: int
    caption: str

    @property
    def finite(self) -> np.ndarray:
        drawn = np.concatenate([m for m, _, _ in self.summary.values()])
        return drawn[np.isfinite(drawn)]

    @property
    def use_log(self) -> bool:
        return bool((self.finite > 0).any())


def _layer_data(per_layer: Any, seeds: Sequence[int] | None, fn: str) -> _LayerData:
    runs = _rows_per_seed(per_layer)
    if not runs or not any(runs):
        raise ValueError(f"{fn}: `per_layer` is empty")
    caption = _seeds_caption(seeds, len(runs))
    by_seed = _layers_by_seed(runs, fn)
    layers = sorted(set().union(*by_seed), key=_layer_sort_key)
    have = np.array([[layer in d for layer in layers] for d in by_seed])
    stats = {key: np.array([[_num(d[layer].get(key)) if layer in d else np.nan for layer in layers]
                            for d in by_seed]) for key, *_ in _LAYER_SERIES}
    summary = {key: _seed_summary(v, have) for key, v in stats.items()}
    if len(runs) > 1 and have.all() and all(
            np.array_equal(v, np.broadcast_to(v[0], v.shape), equal_nan=True) for v in stats.values()):
        caption += " (identical)"
    return _LayerData(layers, summary, len(runs), caption)


def _draw_series(ax: Any, d: _LayerData, key: str, label: str, color: str, marker: str) -> list[str]:
    """One statistic: the mean over seeds as a line (a lone marker for "other"), the seeds'
    min-max as a band, an inf as a triangle at the top. Returns what it could not draw."""
    x = np.arange(len(d.layers))
    is_other = np.array([layer == OTHER_LAYER for layer in d.layers])
    dec = ~is_other
    use_log = d.use_log
    mean, lo, hi = d.summary[key]
    ok = np.isfinite(mean) & ((mean > 0) if use_log else True)
    not_drawn = [f"{key} = {_fmt(mean[j])} in layer {layer_label(d.layers[j])}" for j in np.flatnonzero(~ok)]
    y = np.where(ok, mean, np.nan)
    ax.plot(x[dec], y[dec], color=color, marker=marker, markersize=5, linewidth=1.6,
            label=label)
    if is_other.any():
        ax.plot(x[is_other], y[is_other], color=color, marker=marker, markersize=7,
                linestyle="none")
    if d.n_seeds > 1:
        band = np.isfinite(lo) & np.isfinite(hi) & ((lo > 0) if use_log else True)
        ax.fill_between(x[dec], lo[dec], hi[dec], where=band[dec], color=color, alpha=0.18,
                        linewidth=0, interpolate=False)
        oth = is_other & band
        ax.vlines(x[oth], lo[oth], hi[oth], color=color, alpha=0.5, linewidth=5)
    for j in np.flatnonzero(np.isposinf(mean)):  # at the top edge, whatever the limits
        ax.plot([x[j]], [0.98], transform=ax.get_xaxis_transform(), color=color,
                marker="^", markersize=8, linestyle="none", clip_on=False)
        ax.annotate("inf", xy=(x[j], 0.98), xycoords=ax.get_xaxis_transform(),
                    xytext=(6, -3), textcoords="offset points", fontsize=9, color=color)
    return not_drawn


def _y_axis(ax: Any, d: _LayerData, fn: str) -> None:
    """Log scale when any value is positive; else a linear axis around the values, with a
    message when there is nothing finite or everything is 0."""
    if d.use_log:
        ax.set_yscale("log")
        return
    finite = d.finite
    log.warning("%s: no positive values, using a linear axis", fn)
    top = float(np.abs(finite).max()) * 1.2 if finite.size and finite.any() else 1.0
    ax.set_ylim(min(-0.05 * top, 1.1 * float(finite.min()) if finite.size else 0.0), top)
    if not finite.size:
        _center_message(ax, "no finite value to draw", y=0.75)
    elif not finite.any():
        _center_message(ax, f"all {finite.size:,} values are 0", y=0.75)


def plot_layer_comparison(
    per_layer: Sequence[Mapping[str, Any]] | Sequence[Sequence[Mapping[str, Any]]],
    metric: str,
    path: str | Path,
    *,
    seeds: Sequence[int] | None = None,
) -> Path:
    """Per-layer mean, 99th percentile and maximum score: the mean over seeds as a line, the
    seeds' min-max as a band (or a bar for "other").

    ``per_layer`` is one list of rows per seed (``per_layer`` of each ``per_seed`` element
    of ``sensitivity_stats.json``), or one seed's rows. Each row has ``layer`` (-1 = outside
    the decoder blocks, drawn last as "other", unconnected to the decoder-layer lines),
    ``mean``, ``p99``, ``max`` (``null``: NaN). The y axis is logarithmic when any value is
    positive; values it cannot show (zero, inf, NaN) are listed under the axes, and an inf
    is marked by a triangle at the top. Raises ValueError when there are no rows at all.
    """
    fn = "plot_layer_comparison"
    d = _layer_data(per_layer, seeds, fn)
    layers, n_seeds = d.layers, d.n_seeds
    x = np.arange(len(layers))
    is_other = np.array([layer == OTHER_LAYER for layer in layers])
    not_drawn: list[str] = []
    with _figure(figsize=(max(6.5, 0.28 * len(layers) + 3), 4.6)) as (fig, ax):
        for key, label, color, marker in _LAYER_SERIES:
            not_drawn += _draw_series(ax, d, key, label, color, marker)
        if is_other.any() and (~is_other).any():
            ax.axvline(x[is_other][0] - 0.5, color="0.6", linestyle=":", linewidth=1)
        _y_axis(ax, d, fn)
        ticks = _thin_ticks(len(layers))
        ax.set_xticks(x[ticks])
        ax.set_xticklabels([layer_label(layers[i]) for i in ticks])
        ax.set_xlim(-0.5, len(layers) - 0.5)
        ax.grid(True, which="major", axis="y", alpha=0.3)
        ax.set_xlabel("decoder layer index (\"other\" = outside the blocks)")
        ax.set_ylabel(f"{metric} score (dimensionless{', log scale' if d.use_log else ''})")
        how = "; lines: mean over seeds, band: min-max over seeds" if n_seeds > 1 else ""
        ax.set_title(f"Per-layer {metric} sensitivity\n{d.caption}{how}")
        handles, _ = ax.get_legend_handles_labels()
        if n_seeds > 1:
            handles.append(Patch(facecolor="0.5", alpha=0.3, label="min-max over seeds"))
        # outside the axes: never hides a point, whatever the layer count
        ax.legend(handles=handles, frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        if not_drawn:
            _note_below(ax, f"not drawn: {_short_list(not_drawn, 4)}")
        return style._save(fig, path)  # looked up at call time: tests spy on it
