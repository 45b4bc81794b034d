"""The score distribution figure: density of the scores per parameter type, seeds pooled.

Part of :mod:`cwa_core.plots`; see its docstring for the conventions every figure follows.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.lines import Line2D

from . import style
from .style import (
    _ordered_types, _type_colors, _seeds_caption, _short_list, _samples_per_seed, _figure, _fmt,
    _note_below, _center_message, _weighted_quantile,
)

log = logging.getLogger(__name__)


def _type_scores(arrays: Sequence[np.ndarray]) -> dict[str, Any]:
    """One parameter type over seeds: the drawable (finite, >= 0) scores, each seed weighted
    equally (every score of seed s weighs 1 / its number of drawable scores), and what was
    dropped."""
    valid, weights = [], []
    dropped = {"NaN": 0, "inf": 0, "negative": 0}
    n = 0
    for arr in arrays:
        a = np.asarray(arr, dtype=np.float64).ravel()
        n += a.size
        nan, inf = np.isnan(a), np.isinf(a)
        fin = a[~nan & ~inf]
        dropped["NaN"] += int(nan.sum())
        dropped["inf"] += int(inf.sum())
        dropped["negative"] += int((fin < 0).sum())
        v = fin[fin >= 0]
        if v.size:
            valid.append(v)
            weights.append(np.full(v.size, 1.0 / v.size))
    v = np.concatenate(valid) if valid else np.empty(0)
    w = np.concatenate(weights) if weights else np.empty(0)
    pos = v > 0
    return {
        "n": n, "n_valid": int(v.size), "n_zero": int((~pos).sum()), "dropped": dropped,
        "log": np.log10(v[pos]), "w": w[pos],
        "p99": _weighted_quantile(v, w, 0.99) if v.size else math.nan,
        "equal": float(v[0]) if v.size and v.min() == v.max() else None,
    }


def _dropped_text(dropped: Mapping[str, int]) -> str:
    parts = [f"{c:,} {k}" for k, c in dropped.items() if c]
    return f"{', '.join(parts)} dropped" if parts else ""


def plot_sensitivity_distribution(
    samples: Mapping[str, np.ndarray] | Sequence[Mapping[str, np.ndarray]],
    metric: str,
    path: str | Path,
    *,
    seeds: Sequence[int] | None = None,
) -> Path:
    """Density of the scores per parameter type on a log score axis, seeds pooled.

    ``samples`` maps a parameter type to a 1-D array of non-negative scores (a uniform
    sample of weights, :func:`cwa_core.outputs.weighted_samples`), one mapping per seed
    (or a single mapping: one seed); ``seeds`` names them. Seeds are pooled with equal
    weight. Zeros cannot sit on a log axis: they are counted in the legend; NaN, inf and
    negative scores are dropped and counted there too. When no score is positive the axis
    is linear and the figure says "all N scores are 0". A dashed line marks each type's
    99th percentile (over its drawable scores, zeros included). Raises ValueError only
    when there is no array or every array is empty.
    """
    runs = _samples_per_seed(samples)
    if not runs or not any(runs):
        raise ValueError("plot_sensitivity_distribution: `samples` is empty")
    caption = _seeds_caption(seeds, len(runs))
    types = _ordered_types({t for run in runs for t in run})
    prepared = {t: _type_scores([run[t] for run in runs if t in run]) for t in types}
    if all(p["n"] == 0 for p in prepared.values()):
        raise ValueError("plot_sensitivity_distribution: every sample array is empty")
    for t, p in prepared.items():
        if _dropped_text(p["dropped"]):
            log.warning("plot_sensitivity_distribution: %s: %s", t, _dropped_text(p["dropped"]))
    colors = _type_colors(types)
    logs = [p["log"] for p in prepared.values() if p["log"].size]
    if len(runs) > 1:
        caption += ", pooled with equal weight per seed"

    with _figure(figsize=(7.5, 4.6)) as (fig, ax):
        handles: list[Any] = []
        for t in types:
            p = prepared[t]
            label = f"{t} (n={p['n']:,}"
            if p["equal"] is not None and p["n_valid"] > 1:
                label += f", all equal {_fmt(p['equal'])}"
            elif p["n_zero"]:
                label += f", {p['n_zero']:,} zero"
            if not p["n_valid"]:
                label += ", none drawable"
            dropped = _dropped_text(p["dropped"])
            label += f"; {dropped})" if dropped else ")"
            handles.append(Line2D([], [], color=colors[t], linewidth=6, alpha=0.6, label=label))
        if logs:
            _draw_log_density(ax, prepared, colors, np.concatenate(logs), metric)
            handles.append(Line2D([], [], color="0.3", linestyle="--", linewidth=1.3,
                                  label="99th percentile"))
            zero_types = [t for t in types if prepared[t]["n_zero"]]
            if zero_types:
                _note_below(ax, "zeros are not on the log axis; counted in the legend ("
                            + _short_list(zero_types) + ")")
        else:
            _draw_zero_fallback(ax, prepared, colors, metric)
        ax.legend(handles=handles, loc="upper left", frameon=False)
        ax.set_ylim(top=ax.get_ylim()[1] * (1.2 + 0.12 * len(handles)))  # room for the legend
        ax.set_title(f"Distribution of {metric} sensitivity by parameter type\n{caption}")
        return style._save(fig, path)  # looked up at call time: tests spy on it


def _draw_log_density(ax: Any, prepared: Mapping[str, Mapping[str, Any]],
                      colors: Mapping[str, str], all_logs: np.ndarray, metric: str) -> None:
    """Step densities per unit log10 score of the positive scores, on a log x axis."""
    lo, hi = float(all_logs.min()), float(all_logs.max())
    if hi - lo < 1e-9:  # ties: one value, give it a visible bin
        lo, hi = lo - 0.5, hi + 0.5
    edges = np.linspace(lo, hi, 61)
    for t, p in prepared.items():
        c = colors[t]
        if p["log"].size:
            counts, _ = np.histogram(p["log"], bins=edges, weights=p["w"])
            density = counts / (p["w"].sum() * np.diff(edges))
            ax.stairs(density, 10.0 ** edges, color=c, alpha=0.25, fill=True, linewidth=0)
            ax.stairs(density, 10.0 ** edges, color=c, linewidth=1.6)
        if np.isfinite(p["p99"]) and p["p99"] > 0:
            ax.axvline(p["p99"], color=c, linestyle="--", linewidth=1.3)
    ax.set_xscale("log")
    ax.set_xlim(10.0 ** lo, 10.0 ** hi)
    ax.set_ylim(bottom=0)
    ax.set_xlabel(f"{metric} score (dimensionless, log scale)")
    ax.set_ylabel("density (per unit log$_{10}$ score)")


def _draw_zero_fallback(ax: Any, prepared: Mapping[str, Mapping[str, Any]],
                        colors: Mapping[str, str], metric: str) -> None:
    """No positive score anywhere: a log axis is impossible. A linear axis with one bar per
    type at 0 (the share of its drawable scores that are 0, i.e. 1), and the message."""
    types = [t for t, p in prepared.items() if p["n_valid"]]
    width = 0.6 / max(len(types), 1)
    for j, t in enumerate(types):
        x = (j - (len(types) - 1) / 2) * width
        ax.bar(x, prepared[t]["n_zero"] / prepared[t]["n_valid"], width=width * 0.9,
               color=colors[t], alpha=0.7, edgecolor="black", linewidth=0.8)
    n_zero = sum(p["n_zero"] for p in prepared.values())
    dropped = {k: sum(p["dropped"][k] for p in prepared.values()) for k in ("NaN", "inf", "negative")}
    if n_zero:
        msg = f"all {n_zero:,} scores are 0" if n_zero > 1 else "the only score is 0"
    else:
        msg = "no finite, non-negative score to draw"
    if _dropped_text(dropped):
        msg += f"\n({_dropped_text(dropped)})"
    _center_message(ax, msg, x=0.7, y=0.9)
    ax.set_xscale("linear")
    ax.set_xlim(-1.0, 1.0)
    ax.set_ylim(0, 1.0)
    ax.set_xticks([0.0])
    ax.set_xlabel(f"{metric} score (linear axis: no positive score to place on a log axis)")
    ax.set_ylabel("share of the type's scores")
