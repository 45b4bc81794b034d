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
"""
from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import LogNorm, Normalize  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

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

DPI = 150

#: File names written by :func:`save_experiment_plots`, in order.
PLOT_FILES: tuple[str, ...] = (
    "sensitivity_distribution.png",
    "layer_comparison.png",
    "sensitivity_heatmap.png",
    "perturbation_effects.png",
    "stability_analysis.png",
)

# Okabe-Ito palette (colour-blind safe).
_OKABE_ITO = {
    "orange": "#E69F00",
    "sky_blue": "#56B4E9",
    "green": "#009E73",
    "yellow": "#F0E442",
    "blue": "#0072B2",
    "vermillion": "#D55E00",
    "purple": "#CC79A7",
    "black": "#000000",
}
_TYPE_ORDER = ("attention", "mlp", "norm", "embedding", "lm_head")
_TYPE_COLORS = {
    "attention": _OKABE_ITO["blue"],
    "mlp": _OKABE_ITO["orange"],
    "norm": _OKABE_ITO["green"],
    "embedding": _OKABE_ITO["purple"],
    "lm_head": _OKABE_ITO["vermillion"],
}
_EXTRA_COLORS = (_OKABE_ITO["sky_blue"], _OKABE_ITO["black"], _OKABE_ITO["yellow"])
_SELECTION_ORDER = ("top_k", "random_k", "bottom_k")
_SELECTION_LABELS = {"top_k": "top-K", "random_k": "random-K", "bottom_k": "bottom-K"}
_SELECTION_COLORS = {
    "top_k": _OKABE_ITO["vermillion"],
    "random_k": _OKABE_ITO["blue"],
    "bottom_k": _OKABE_ITO["green"],
}
_CMAP = "viridis"
_BAD_COLOR = "#d9d9d9"  # cells without data (or without a finite value)
_INF_HATCH = "//"
INF_LABEL = "inf (overflow)"  # label of a bar whose perplexity overflowed
NAN_LABEL = "NaN"

_STYLE: dict[str, Any] = {
    "font.size": 11,
    "axes.titlesize": 12,
    "axes.labelsize": 11,
    "xtick.labelsize": 10,
    "ytick.labelsize": 10,
    "legend.fontsize": 9,
    "figure.titlesize": 13,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": False,
    "savefig.dpi": DPI,
}

OTHER_LAYER = -1
_NOTE_OFFSET_PT = -46  # notes sit this far below the axes, under the tick labels and x label


# ----------------------------------------------------------------------------- helpers


def layer_label(layer: int) -> str:
    """Tick label of a layer index: ``-1`` (outside the decoder blocks) is "other"."""
    return "other" if int(layer) == OTHER_LAYER else str(int(layer))


def _layer_sort_key(layer: int) -> tuple[int, int]:
    """Decoder layers ascending, the "other" layer (-1) last."""
    layer = int(layer)
    return (1, 0) if layer == OTHER_LAYER else (0, layer)


def _ordered_types(types: Any) -> list[str]:
    """Known parameter types in canonical order, unknown ones after, sorted."""
    present = set(types)
    known = [t for t in _TYPE_ORDER if t in present]
    return known + sorted(present.difference(_TYPE_ORDER))


def _type_colors(types: Sequence[str]) -> dict[str, str]:
    colors: dict[str, str] = {}
    extra = iter(_EXTRA_COLORS * (1 + len(types)))
    for t in types:
        colors[t] = _TYPE_COLORS.get(t) or next(extra)
    return colors


def _num(value: Any) -> float:
    """A float from a JSON value: ``null`` (how strict JSON stores inf and NaN) becomes NaN."""
    return math.nan if value is None else float(value)


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}" + ("" if n == 1 else "s")


def _seeds_caption(seeds: Sequence[Any] | None, n: int) -> str:
    """"3 seeds: 0, 1, 2" (or "3 seeds" when the ids are unknown); long lists are shortened."""
    if seeds is None:
        return _plural(n, "seed")
    seeds = list(seeds)
    if len(seeds) != n:
        raise ValueError(f"seeds: {len(seeds)} ids given for {n} per-seed inputs; give one id per input")
    shown = [str(s) for s in seeds] if n <= 10 else [*map(str, seeds[:4]), "...", *map(str, seeds[-2:])]
    return f"{_plural(n, 'seed')}: {', '.join(shown)}"


def _sorted_seeds(seeds: Any) -> list:
    """Seeds in numeric order (2 before 10); as text when they are not all numbers."""
    seeds = list(seeds)
    try:
        return sorted(seeds)
    except TypeError:
        return sorted(seeds, key=str)


def _short_list(items: Sequence[str], limit: int = 6) -> str:
    items = list(items)
    return ", ".join(items if len(items) <= limit else [*items[:limit], f"... ({len(items)} in all)"])


def _samples_per_seed(data: Any) -> list:
    """One mapping per seed; a single mapping is one seed."""
    return [data] if isinstance(data, Mapping) else list(data)


def _rows_per_seed(data: Any) -> list:
    """One list of rows per seed; a list of rows (mappings) is one seed."""
    data = list(data)
    return [data] if data and isinstance(data[0], Mapping) else [list(rows) for rows in data]


def _prepare_path(path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def _figure(**kwargs: Any) -> Iterator[tuple[Any, Any]]:
    """``plt.subplots`` under the house style; the figure is closed however drawing ends."""
    with plt.rc_context(_STYLE):
        fig, ax = plt.subplots(**kwargs)
        try:
            yield fig, ax
        finally:
            plt.close(fig)


def _save(fig: Any, path: str | Path) -> Path:
    """Write ``fig`` as PNG (dpi 150, tight bbox), close it and return the path."""
    out = _prepare_path(path)
    try:
        fig.savefig(out, dpi=DPI, bbox_inches="tight", format="png", facecolor="white")
    finally:
        plt.close(fig)
    log.info("wrote %s", out)
    return out


def _fmt(value: float) -> str:
    """Compact number for annotations: 3 significant digits, scientific when needed;
    non-finite values spelled out ("inf", "-inf", "NaN")."""
    if math.isnan(value):
        return NAN_LABEL
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    a = abs(value)
    if a != 0 and (a < 1e-2 or a >= 1e4):
        return f"{value:.1e}"
    return f"{value:.3g}"


def _text_color(cmap: Any, norm: Any, value: float) -> str:
    """Black or white, whichever reads better on the cell colour of ``value``."""
    r, g, b, _ = cmap(norm(value))
    luminance = 0.2126 * r + 0.7152 * g + 0.0722 * b
    return "black" if luminance > 0.5 else "white"


def _thin_ticks(n: int, max_ticks: int = 20) -> list[int]:
    """Indices of at most ``max_ticks`` evenly spaced tick positions (always the last)."""
    if n <= max_ticks:
        return list(range(n))
    step = math.ceil(n / max_ticks)
    idx = list(range(0, n, step))
    if idx[-1] != n - 1:
        idx.append(n - 1)
    return idx


def _note_below(ax: Any, text: str) -> None:
    """A footnote under the axes (below the x label): what the axes could not show."""
    ax.annotate(text, xy=(0, 0), xycoords="axes fraction", xytext=(0, _NOTE_OFFSET_PT),
                textcoords="offset points", ha="left", va="top", fontsize=9, color="0.2")


def _center_message(ax: Any, text: str, x: float = 0.5, y: float = 0.5) -> None:
    """A boxed message in the axes (what the figure could not draw, and why)."""
    ax.text(x, y, text, transform=ax.transAxes, ha="center", va="center", fontsize=12,
            bbox={"boxstyle": "round,pad=0.5", "facecolor": "white", "edgecolor": "0.5"}, zorder=6)


def _weighted_quantile(values: np.ndarray, weights: np.ndarray, q: float) -> float:
    """Smallest value whose weighted cumulative share reaches ``q`` (inverted CDF; with equal
    weights the nearest-rank quantile)."""
    order = np.argsort(values, kind="stable")
    cw = np.cumsum(weights[order])
    i = int(np.searchsorted(cw, q * cw[-1] * (1 - 1e-12), side="left"))
    return float(values[order][min(i, values.size - 1)])


# ----------------------------------------------------------------------------- 1. distribution


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
        return _save(fig, path)


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


# ----------------------------------------------------------------------------- 2. layers

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
    drawn = np.concatenate([m for m, _, _ in summary.values()])
    finite = drawn[np.isfinite(drawn)]
    use_log = bool((finite > 0).any())

    x = np.arange(len(layers))
    is_other = np.array([layer == OTHER_LAYER for layer in layers])
    dec = ~is_other
    not_drawn: list[str] = []
    with _figure(figsize=(max(6.5, 0.28 * len(layers) + 3), 4.6)) as (fig, ax):
        for key, label, color, marker in _LAYER_SERIES:
            mean, lo, hi = summary[key]
            ok = np.isfinite(mean) & ((mean > 0) if use_log else True)
            for j in np.flatnonzero(~ok):
                not_drawn.append(f"{key} = {_fmt(mean[j])} in layer {layer_label(layers[j])}")
            y = np.where(ok, mean, np.nan)
            ax.plot(x[dec], y[dec], color=color, marker=marker, markersize=5, linewidth=1.6,
                    label=label)
            if is_other.any():
                ax.plot(x[is_other], y[is_other], color=color, marker=marker, markersize=7,
                        linestyle="none")
            if len(runs) > 1:
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
        if is_other.any() and dec.any():
            ax.axvline(x[is_other][0] - 0.5, color="0.6", linestyle=":", linewidth=1)
        if use_log:
            ax.set_yscale("log")
        else:
            log.warning("%s: no positive values, using a linear axis", fn)
            top = float(np.abs(finite).max()) * 1.2 if finite.size and finite.any() else 1.0
            ax.set_ylim(min(-0.05 * top, 1.1 * float(finite.min()) if finite.size else 0.0), top)
            if not finite.size:
                _center_message(ax, "no finite value to draw", y=0.75)
            elif not finite.any():
                _center_message(ax, f"all {finite.size:,} values are 0", y=0.75)
        ticks = _thin_ticks(len(layers))
        ax.set_xticks(x[ticks])
        ax.set_xticklabels([layer_label(layers[i]) for i in ticks])
        ax.set_xlim(-0.5, len(layers) - 0.5)
        ax.grid(True, which="major", axis="y", alpha=0.3)
        ax.set_xlabel("decoder layer index (\"other\" = outside the blocks)")
        ax.set_ylabel(f"{metric} score (dimensionless{', log scale' if use_log else ''})")
        how = "; lines: mean over seeds, band: min-max over seeds" if len(runs) > 1 else ""
        ax.set_title(f"Per-layer {metric} sensitivity\n{caption}{how}")
        handles, _ = ax.get_legend_handles_labels()
        if len(runs) > 1:
            handles.append(Patch(facecolor="0.5", alpha=0.3, label="min-max over seeds"))
        # outside the axes: never hides a point, whatever the layer count
        ax.legend(handles=handles, frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        if not_drawn:
            _note_below(ax, f"not drawn: {_short_list(not_drawn, 4)}")
        return _save(fig, path)


# ----------------------------------------------------------------------------- 3. heatmap


def _heatmap(per_tensor: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[int], np.ndarray, np.ndarray]:
    """(types, layers, count-weighted mean matrix, mask of cells with a tensor of count > 0)."""
    types = _ordered_types(r["param_type"] for r in per_tensor)
    layers = sorted({int(r["layer"]) for r in per_tensor}, key=_layer_sort_key)
    ti = {t: i for i, t in enumerate(types)}
    li = {layer: j for j, layer in enumerate(layers)}
    weighted = np.zeros((len(types), len(layers)), dtype=np.float64)
    counts = np.zeros_like(weighted)
    lo, hi = np.full_like(weighted, np.inf), np.full_like(weighted, -np.inf)
    for r in per_tensor:
        c = _num(r.get("count"))
        if not c > 0:  # an empty tensor says nothing (and 0 * inf would be NaN)
            continue
        i, j, m = ti[r["param_type"]], li[int(r["layer"])], _num(r.get("mean"))
        weighted[i, j] += c * m
        counts[i, j] += c
        lo[i, j], hi[i, j] = min(lo[i, j], m), max(hi[i, j], m)
    present = counts > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        matrix = np.where(present, weighted / np.where(present, counts, 1), np.nan)
        # (c * m) / c can land one ulp off m: keep a cell within its tensors' means
        matrix = np.where(np.isfinite(matrix), np.clip(matrix, lo, hi), matrix)
    return types, layers, matrix, present


def heatmap_matrix(
    per_tensor: Sequence[Mapping[str, Any]],
) -> tuple[list[str], list[int], np.ndarray]:
    """Aggregate per-tensor stats into a parameter-type x layer matrix.

    Each cell is the count-weighted mean score of all tensors of that type and
    layer: ``sum(count * mean) / sum(count)``. Cells with no tensor (or a total
    count of 0) are NaN; a tensor's inf or NaN mean makes its cell inf or NaN.
    Returns ``(types, layers, matrix)`` with types in the canonical order
    (attention, mlp, norm, embedding, lm_head, then others) and layers ascending
    with -1 last; ``matrix.shape == (len(types), len(layers))``.
    """
    if not per_tensor:
        raise ValueError("heatmap_matrix: `per_tensor` is empty")
    types, layers, matrix, _ = _heatmap(per_tensor)
    return types, layers, matrix


def _heatmap_over_seeds(runs: Sequence[Sequence[Mapping[str, Any]]]
                        ) -> tuple[list[str], list[int], np.ndarray, np.ndarray, float | None]:
    """Mean over seeds of each seed's matrix (cells where a seed has tensors), the union mask,
    and the largest seed-to-seed spread (max - min) / |mean| over cells (None with one seed)."""
    per = [_heatmap(rows) for rows in runs if rows]
    types = _ordered_types({t for p in per for t in p[0]})
    layers = sorted({layer for p in per for layer in p[1]}, key=_layer_sort_key)
    stack = np.full((len(per), len(types), len(layers)), np.nan)
    have = np.zeros(stack.shape, dtype=bool)
    for s, (ts, ls, m, pr) in enumerate(per):
        ii = np.array([types.index(t) for t in ts])[:, None]
        jj = np.array([layers.index(layer) for layer in ls])[None, :]
        stack[s, ii, jj], have[s, ii, jj] = m, pr
    present = have.any(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        total = np.where(have, stack, 0.0).sum(0)  # NaN and inf of a seed propagate
        matrix = np.where(present, total / np.maximum(have.sum(0), 1), np.nan)
        # the float mean of equal seeds can land one ulp outside them: keep it within their range
        lo, hi = np.where(have, stack, np.inf).min(0), np.where(have, stack, -np.inf).max(0)
        matrix = np.where(np.isfinite(matrix), np.clip(matrix, lo, hi), matrix)
    spread = None
    if len(per) > 1:
        spread = 0.0
        for i, j in zip(*np.nonzero(have.sum(0) > 1)):
            v = stack[have[:, i, j], i, j]
            if np.isfinite(v).all() and v.max() > v.min():
                spread = max(spread, float((v.max() - v.min()) / abs(v.mean())))
    return types, layers, matrix, present, spread


def plot_sensitivity_heatmap(
    per_tensor: Sequence[Mapping[str, Any]] | Sequence[Sequence[Mapping[str, Any]]],
    metric: str,
    path: str | Path,
    *,
    seeds: Sequence[int] | None = None,
) -> Path:
    """Heatmap of the count-weighted mean score per parameter type and layer, mean over seeds.

    ``per_tensor`` is one list of rows per seed (``per_tensor`` of each ``per_seed``
    element), or one seed's rows. Uses a log colour scale when the positive values span
    more than 2 decades; grey cells have no tensors ("-") or no finite value ("inf",
    "NaN"); values are annotated when there are at most 12 layer columns. Raises
    ValueError when there are no rows at all.
    """
    runs = _rows_per_seed(per_tensor)
    if not runs or not any(runs):
        raise ValueError("plot_sensitivity_heatmap: `per_tensor` is empty")
    caption = _seeds_caption(seeds, len(runs))
    types, layers, matrix, present, spread = _heatmap_over_seeds(runs)
    finite = matrix[np.isfinite(matrix)]
    positive = finite[finite > 0]
    use_log = bool(finite.size and finite.min() > 0 and positive.max() / positive.min() > 100.0)
    cmap = plt.get_cmap(_CMAP).with_extremes(bad=_BAD_COLOR)
    if use_log:
        norm: Normalize = LogNorm(vmin=float(positive.min()), vmax=float(positive.max()))
    else:
        vmin = float(finite.min()) if finite.size else 0.0
        vmax = float(finite.max()) if finite.size else 1.0
        if vmax <= vmin:  # one value (ties, zeros): a range around it, never below 0 for scores
            pad = abs(vmin) * 0.5 or 1.0
            vmin, vmax = (max(vmin - pad, 0.0) if vmin >= 0 else vmin - pad), vmax + pad
        norm = Normalize(vmin=vmin, vmax=vmax)
    n_t, n_l = matrix.shape
    annotate = n_l <= 12
    width = min(16.0, max(6.0, 0.75 * n_l + 3.0)) if annotate else min(16.0, max(7.0, 0.3 * n_l + 3))
    n_absent = int((~present).sum())
    n_bad = int((present & ~np.isfinite(matrix)).sum())
    with _figure(figsize=(width, max(3.2, 0.55 * n_t + 2.1))) as (fig, ax):
        im = ax.imshow(np.ma.masked_invalid(matrix), cmap=cmap, norm=norm, aspect="auto",
                       interpolation="nearest")
        for s in ax.spines.values():
            s.set_visible(False)
        ticks = list(range(n_l)) if annotate else _thin_ticks(n_l, 24)
        ax.set_xticks(ticks)
        ax.set_xticklabels([layer_label(layers[j]) for j in ticks])
        ax.set_yticks(range(n_t))
        ax.set_yticklabels(types)
        ax.set_xticks(np.arange(-0.5, n_l, 1), minor=True)
        ax.set_yticks(np.arange(-0.5, n_t, 1), minor=True)
        ax.grid(which="minor", color="white", linewidth=1.5)
        ax.tick_params(which="minor", length=0)
        ax.tick_params(which="major", length=0)
        if annotate:
            fs = 9 if n_l <= 8 else 8
            for i in range(n_t):
                for j in range(n_l):
                    v = matrix[i, j]
                    if np.isfinite(v):
                        ax.text(j, i, _fmt(v), ha="center", va="center", fontsize=fs,
                                color=_text_color(cmap, norm, min(max(v, norm.vmin), norm.vmax)))
                    else:
                        ax.text(j, i, _fmt(v) if present[i, j] else "-", ha="center",
                                va="center", fontsize=fs, color="0.25")
        cbar = fig.colorbar(im, ax=ax, pad=0.02, extend="neither")
        scale = "log scale" if use_log else "linear scale"
        cbar.set_label(f"mean {metric} score\n(count-weighted, {scale})")
        ax.set_xlabel("decoder layer index (\"other\" = outside the blocks)")
        ax.set_ylabel("parameter type")
        grey = [w for n, w in ((n_absent, "no tensors"), (n_bad, "no finite value")) if n]
        sub = caption + (", mean over seeds" if len(runs) > 1 else "")
        if spread is not None:
            sub += ("; seeds identical" if spread == 0 else
                    f"; largest seed spread {100 * spread:.3g}% of a cell's mean")
        if finite.size and finite.min() == finite.max():
            sub += f"; every cell {_fmt(float(finite[0]))}"
        if grey:
            sub += f"\ngrey: {' / '.join(grey)}"
        ax.set_title(f"Mean {metric} sensitivity by parameter type and layer\n{sub}")
        return _save(fig, path)


# ----------------------------------------------------------------------------- 4. perturbation


def _method_label(perturbation: Mapping[str, Any] | None) -> str:
    if not perturbation:
        return "perturbation"
    label = str(perturbation.get("method") or "perturbation")
    extras = [f"{k}={perturbation[k]}" for k in ("scale", "bit")
              if perturbation.get(k) is not None]
    return f"{label} ({', '.join(extras)})" if extras else label


def _ratio_label(ratio: float) -> str:
    """Bar label of a mean perplexity ratio, precise enough to show tiny effects."""
    if ratio >= 1000:
        return f"{ratio:.3g}x"
    if ratio >= 100:
        return f"{ratio:.0f}x"
    if ratio >= 10:
        return f"{ratio:.1f}x"
    return f"{ratio:.3f}x"


def _row_ratio(row: Mapping[str, Any], base_ppl: float) -> float:
    """The perplexity ratio of one result row, in memory or from JSON.

    A number is taken as it is (inf and NaN included). A JSON ``null`` is read through
    ``ppl_status``: "inf" is inf, "nan" NaN; "finite" (or no status) divides ``ppl`` by the
    baseline when both are there. Anything else (a null with nothing to read it by) is NaN.
    """
    ratio = row.get("ppl_ratio")
    if ratio is not None:
        return float(ratio)
    status = row.get("ppl_status")
    if status == "inf":
        return math.inf if not math.isinf(base_ppl) else math.nan
    if status == "nan":
        return math.nan
    ppl = _num(row.get("ppl"))
    if math.isfinite(ppl) and math.isfinite(base_ppl) and base_ppl > 0:
        return ppl / base_ppl
    log.warning("plot_perturbation_effects: no perplexity ratio to read in %s; drawn as NaN", dict(row))
    return math.nan


def _ratio_groups(rows: Sequence[Mapping[str, Any]], base_ppl: float) -> dict[str, list[tuple[Any, float]]]:
    groups: dict[str, list[tuple[Any, float]]] = {}
    for r in rows:
        v = _row_ratio(r, base_ppl)
        if math.isinf(v) and v < 0:
            v = math.nan  # a ratio of perplexities is never -inf: undefined
        groups.setdefault(str(r.get("selection")), []).append((r.get("seed"), v))
    return groups


def plot_perturbation_effects(results: Mapping[str, Any], path: str | Path) -> Path:
    """Bar chart of the mean perplexity ratio per selection (top/random/bottom-K), every seed shown.

    ``results`` is the content of ``perturbation_results.json`` (``null`` ratios read through
    each row's ``ppl_status``) or the same dict in memory (inf and NaN floats). Error bars span
    the min..max over the finite seeds, each seed is a dot, a dashed line marks the unperturbed
    baseline (ratio 1); the y axis is logarithmic when every finite ratio is positive and the
    largest exceeds the smallest by more than 20x (ratios below 1 stay in view).
    Non-finite perplexities are drawn, never dropped: a selection with an infinite seed has an
    infinite mean, a hatched bar to the top of the axis labelled "inf (overflow)" (its inf seeds
    as triangles at the top); a NaN seed is a cross at the baseline marked "NaN" and is left
    out of its bar's mean. The title counts the non-finite runs. Raises ValueError only when
    there is no result row.
    """
    if not results or not results.get("results"):
        raise ValueError("plot_perturbation_effects: no entries in results['results']")
    base_ppl = _num((results.get("baseline") or {}).get("ppl"))
    groups = _ratio_groups(results["results"], base_ppl)
    order = [s for s in _SELECTION_ORDER if s in groups]
    order += sorted(set(groups).difference(_SELECTION_ORDER))
    vals = {s: np.array([v for _, v in groups[s]], dtype=np.float64) for s in order}
    fin = {s: v[np.isfinite(v)] for s, v in vals.items()}
    n_inf = {s: int(np.isposinf(v).sum()) for s, v in vals.items()}
    n_nan = {s: int(np.isnan(v).sum()) for s, v in vals.items()}
    all_fin = np.concatenate(list(fin.values()))
    use_log = bool(all_fin.size and all_fin.min() > 0 and all_fin.max() / all_fin.min() > 20.0)
    any_inf, any_nan = sum(n_inf.values()), sum(n_nan.values())
    n_runs = sum(v.size for v in vals.values())

    metric = results.get("metric", "score")
    mode = results.get("mode")
    title = (f"{metric}: {_method_label(results.get('perturbation'))} of K={results.get('topk', '?')}"
             f" weights" + (f" ({mode})" if mode else ""))
    if results.get("baseline"):
        title += f"\nbaseline perplexity {_fmt(base_ppl)}"
        if results.get("window_length") is not None:
            title += f" (window {results['window_length']} tokens"
            if results.get("eval_tokens"):
                title += f", {int(results['eval_tokens']):,} eval tokens"
            title += ")"
    seeds = _sorted_seeds({seed for g in groups.values() for seed, _ in g if seed is not None})
    if seeds:
        title += f"; {_seeds_caption(seeds, len(seeds))}"
    if any_inf or any_nan:
        bad = ", ".join(p for p in (f"{any_inf} inf" if any_inf else "", f"{any_nan} NaN" if any_nan else "") if p)
        title += (f"\nall {n_runs} runs non-finite ({bad})" if any_inf + any_nan == n_runs
                  else f"\nnon-finite: {any_inf + any_nan} of {n_runs} runs ({bad})")

    fin_max = float(all_fin.max()) if all_fin.size else 1.0
    if use_log:
        bottom = min(float(all_fin.min()), 1.0) / 1.5
        top = max(fin_max, 1.0) * (8.0 if any_inf else 2.5)
    else:
        bottom = 0.0
        top = max(fin_max, 1.0) * (1.45 if any_inf else 1.18)
        if not all_fin.size:
            top = 2.0

    rng = np.random.default_rng(0)  # deterministic jitter
    x = np.arange(len(order))
    with _figure(figsize=(max(5.5, 1.6 * len(order) + 2.5), 5.0)) as (fig, ax):
        if use_log:
            ax.set_yscale("log")
        ax.set_ylim(bottom, top)
        for xi, s in zip(x, order):
            color = _SELECTION_COLORS.get(s, _OKABE_ITO["purple"])
            f = fin[s]
            if n_inf[s]:  # the mean over seeds is inf: the bar fills the axis, hatched
                ax.bar(xi, top - bottom, bottom=bottom, width=0.6, color=color, alpha=0.35,
                       hatch=_INF_HATCH, edgecolor="black", linewidth=0.8, zorder=2, gid=f"bar:{s}")
                ax.text(xi, bottom + 0.93 * (top - bottom) if not use_log else top / 1.35,
                        f"{INF_LABEL}\n{n_inf[s]} of {vals[s].size} seeds", ha="center", va="top",
                        fontsize=9, zorder=5,
                        bbox={"boxstyle": "round,pad=0.25", "facecolor": "white", "edgecolor": "none"})
                ax.scatter(np.full(n_inf[s], xi) + _jitter(rng, n_inf[s]),
                           np.full(n_inf[s], 0.985), transform=ax.get_xaxis_transform(), marker="^",
                           s=40, color="white", edgecolor="black", linewidth=0.9, zorder=5, clip_on=False)
            elif f.size:
                mean = min(max(float(f.mean()), float(f.min())), float(f.max()))  # ulp-safe
                ax.bar(xi, mean, width=0.6, color=color, alpha=0.75, edgecolor="black",
                       linewidth=0.8, zorder=2, gid=f"bar:{s}")
                ax.errorbar([xi], [mean], yerr=[[mean - f.min()], [f.max() - mean]], fmt="none",
                            ecolor="black", elinewidth=1.3, capsize=6, zorder=3)
                y = float(f.max()) * 1.12 if use_log else float(f.max()) + 0.03 * top
                label = _ratio_label(mean) + (f"\nmean of {f.size}" if n_nan[s] else "")
                ax.text(xi, y, label, ha="center", va="bottom", fontsize=10, zorder=5)
            if f.size:
                ax.scatter(xi + _jitter(rng, f.size), f, s=26, color="white", edgecolor="black",
                           linewidth=0.9, zorder=4)
            if n_nan[s]:
                ax.scatter([xi], [1.0], marker="x", s=60, color="black", linewidth=1.6, zorder=5)
                ax.annotate(f"{NAN_LABEL}" + (f" x{n_nan[s]}" if n_nan[s] > 1 else ""),
                            xy=(xi, 1.0), xytext=(7, 4), textcoords="offset points",
                            fontsize=10, fontweight="bold", zorder=6)
        ax.axhline(1.0, color="0.25", linestyle="--", linewidth=1.2, zorder=1)
        labels = []
        for s in order:
            extra = [f"{n_inf[s]} inf" if n_inf[s] else "", f"{n_nan[s]} NaN" if n_nan[s] else ""]
            extra = [e for e in extra if e]
            labels.append(f"{_SELECTION_LABELS.get(s, s)}\n(n={_plural(vals[s].size, 'seed')}"
                          + (f", {', '.join(extra)})" if extra else ")"))
        ax.set_xticks(x)
        ax.set_xticklabels(labels)
        ax.set_xlim(-0.6, len(order) - 0.4)
        ax.set_ylabel("perplexity ratio (perturbed / baseline" + (", log scale)" if use_log else ")"))
        ax.set_xlabel("weights perturbed")
        ax.grid(True, axis="y", which="major", alpha=0.3, zorder=0)
        handles: list[Any] = [Line2D([], [], color="0.25", linestyle="--", label="baseline (ratio 1)")]
        if all_fin.size:
            handles += [Line2D([], [], marker="o", linestyle="none", markerfacecolor="white",
                               markeredgecolor="black", label="individual seed"),
                        Line2D([], [], color="black", marker="_", markersize=10, linewidth=1.3,
                               label="min-max over seeds")]
        if any_inf:
            handles.append(Patch(facecolor="white", edgecolor="black", hatch=_INF_HATCH,
                                 label=f"{INF_LABEL}: {any_inf} seed{'s' if any_inf > 1 else ''}"))
        if any_nan:
            handles.append(Line2D([], [], marker="x", linestyle="none", color="black",
                                  label=f"{NAN_LABEL}: {any_nan} seed{'s' if any_nan > 1 else ''}"))
        ax.legend(handles=handles, frameon=True, framealpha=0.9, edgecolor="none",
                  loc="upper left", bbox_to_anchor=(1.01, 1.0))
        missing = [_SELECTION_LABELS[s] for s in _SELECTION_ORDER if s not in groups]
        if missing:
            _note_below(ax, f"not in these results: {', '.join(missing)}")
        ax.set_title(title)
        return _save(fig, path)


def _jitter(rng: np.random.Generator, n: int) -> np.ndarray | float:
    return rng.uniform(-0.13, 0.13, size=n) if n > 1 else 0.0


# ----------------------------------------------------------------------------- 5. stability


def _pair_matrix(seeds: Sequence[Any], pairs: Sequence[Mapping[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric seeds x seeds matrix from pairwise values (diagonal 1; ``null``: NaN), and the
    mask of cells that a pair gave (to tell a NaN value from a missing pair)."""
    idx = {s: i for i, s in enumerate(seeds)}
    n = len(seeds)
    m = np.full((n, n), np.nan)
    given = np.eye(n, dtype=bool)
    np.fill_diagonal(m, 1.0)
    for p in pairs:
        a, b = p["a"], p["b"]
        if a not in idx or b not in idx:
            log.warning("plot_stability: pair (%s, %s) refers to an unknown seed", a, b)
            continue
        m[idx[a], idx[b]] = m[idx[b], idx[a]] = _num(p.get("value"))
        given[idx[a], idx[b]] = given[idx[b], idx[a]] = True
    return m, given


def _draw_pair_panel(ax: Any, fig: Any, seeds: Sequence[Any], m: np.ndarray, given: np.ndarray,
                     title: str, cbar_label: str, vmin: float) -> None:
    cmap = plt.get_cmap(_CMAP).with_extremes(bad=_BAD_COLOR)
    norm = Normalize(vmin=vmin, vmax=1.0)
    im = ax.imshow(np.ma.masked_invalid(m), cmap=cmap, norm=norm, interpolation="nearest")
    n = len(seeds)
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    ax.set_xticklabels([str(s) for s in seeds])
    ax.set_yticklabels([str(s) for s in seeds])
    ax.tick_params(length=0)
    for s in ax.spines.values():
        s.set_visible(False)
    if n <= 12:
        fs = 10 if n <= 6 else 8
        for i in range(n):
            for j in range(n):
                v = m[i, j]
                if np.isfinite(v):
                    ax.text(j, i, f"{v:.3f}" if n <= 6 else f"{v:.2f}", ha="center",
                            va="center", fontsize=fs,
                            color=_text_color(cmap, norm, min(max(v, vmin), 1.0)))
                elif given[i, j]:
                    ax.text(j, i, NAN_LABEL, ha="center", va="center", fontsize=fs, color="0.25")
    ax.set_xlabel("seed")
    ax.set_ylabel("seed")
    ax.set_title(title)
    cbar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    cbar.set_label(cbar_label)


def _summary_line(sec: Mapping[str, Any], n_seeds: int) -> str:
    """"mean 0.812, min 0.780" from a pairwise section; says why when there is none."""
    if n_seeds < 2:
        return "\none seed: no pair to compare"
    if "mean" not in sec:
        return ""
    mean = sec.get("mean")
    if mean is None or not math.isfinite(float(mean)):
        return "\nno pair with a defined value"
    lo = _num(sec.get("min"))
    return f"\nmean {float(mean):.3f}, min " + (f"{lo:.3f}" if math.isfinite(lo) else _fmt(lo))


def plot_stability(stability: Mapping[str, Any], path: str | Path) -> Path:
    """Seeds x seeds matrices of top-K Jaccard overlap and Spearman rank correlation.

    ``stability`` is the content of ``stability.json``. The Spearman panel is omitted when
    that section is missing. A data-independent metric is flagged in the title (its overlap
    is 1.0 by construction). One seed gives a 1x1 matrix and "no pair to compare"; a pair
    whose value is NaN (``null``) is a grey cell marked "NaN", a missing pair a blank grey
    cell. Raises ValueError when there are no seeds and no pairs.
    """
    if not stability:
        raise ValueError("plot_stability: `stability` is empty")
    jac = stability.get("jaccard") or {}
    spe = stability.get("spearman") or {}
    seeds = list(stability.get("seeds") or [])
    if not seeds:
        found: list[Any] = []
        for sec in (jac, spe):
            for p in sec.get("pairs") or []:
                for s in (p["a"], p["b"]):
                    if s not in found:
                        found.append(s)
        seeds = _sorted_seeds(found)
    if not seeds:
        raise ValueError("plot_stability: no seeds and no pairs in `stability`")
    n = len(seeds)

    panels: list[tuple[np.ndarray, np.ndarray, str, str, float]] = []
    jm, jg = _pair_matrix(seeds, jac.get("pairs") or [])
    panels.append((jm, jg, f"Top-K overlap (Jaccard, K={stability.get('k', '?')})" + _summary_line(jac, n),
                   "Jaccard index of top-K sets", 0.0))
    if spe:
        sm, sg = _pair_matrix(seeds, spe.get("pairs") or [])
        st = "Rank correlation (Spearman ρ"
        if spe.get("n_weights"):
            st += f", {int(spe['n_weights']):,} weights"
        st += ")" + _summary_line(spe, n)
        finite = sm[np.isfinite(sm)]
        vmin = -1.0 if finite.size and finite.min() < 0 else 0.0
        panels.append((sm, sg, st, "Spearman ρ", vmin))

    metric = stability.get("metric", "score")
    mode = stability.get("mode")
    suptitle = f"Stability of the top-K {metric} weights, {_seeds_caption(seeds, n)}"
    if mode:
        suptitle += f" ({mode})"
    if stability.get("data_independent"):
        suptitle += "\ndata-independent metric: 1.0 by construction"

    side = min(6.0, max(3.6, 0.55 * n + 2.2))
    with _figure(nrows=1, ncols=len(panels), figsize=(side * len(panels) + 1.0, side + 1.1),
                 squeeze=False, layout="constrained") as (fig, axes):
        for ax, (m, given, title, clabel, vmin) in zip(axes[0], panels):
            _draw_pair_panel(ax, fig, seeds, m, given, title, clabel, vmin)
        fig.suptitle(suptitle)
        return _save(fig, path)


# ----------------------------------------------------------------------------- 6. all


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
