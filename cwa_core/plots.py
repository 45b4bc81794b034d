"""Publication-quality figures of one critical-weight-analysis experiment.

Every public ``plot_*`` function is pure: it takes plain Python / numpy data (the
formats of the JSON files the experiment writes), writes exactly one PNG to
``path`` (parent directories are created) and returns that path as a
:class:`~pathlib.Path`. Empty input raises :class:`ValueError`.

Figures use matplotlib's object API with the non-interactive Agg backend, a
colour-blind-safe palette (Okabe-Ito for categories, viridis for colour maps)
and a local ``rc_context`` for fonts, so importing this module changes nothing
global apart from selecting the Agg backend.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import LogNorm, Normalize  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

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
_BAD_COLOR = "#d9d9d9"  # cells without data

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


def _prepare_path(path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


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
    """Compact number for annotations: 3 significant digits, scientific when needed."""
    if not np.isfinite(value):
        return ""
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


# ----------------------------------------------------------------------------- 1. distribution


def plot_sensitivity_distribution(
    samples: Mapping[str, np.ndarray], metric: str, path: str | Path
) -> Path:
    """Overlaid density histograms of log10(score) per parameter type.

    ``samples`` maps a parameter type to a 1-D array of non-negative scores (a
    uniform sample of weights). Zeros cannot be shown on a log axis: they are
    dropped and counted in the legend. Negative or non-finite values are dropped
    with a warning. A dashed vertical line marks each type's 99th percentile
    (computed over all its finite, non-negative scores, zeros included).
    """
    if not samples:
        raise ValueError("plot_sensitivity_distribution: `samples` is empty")
    types = _ordered_types(samples.keys())
    colors = _type_colors(types)

    prepared: dict[str, dict[str, Any]] = {}
    for t in types:
        arr = np.asarray(samples[t], dtype=np.float64).ravel()
        finite = arr[np.isfinite(arr)]
        valid = finite[finite >= 0]
        n_bad = arr.size - valid.size
        if n_bad:
            log.warning("%s: dropped %d negative or non-finite scores", t, n_bad)
        pos = valid[valid > 0]
        prepared[t] = {
            "log": np.log10(pos),
            "n": valid.size,
            "n_zero": int(valid.size - pos.size),
            "p99": float(np.percentile(valid, 99)) if valid.size else float("nan"),
        }
    if all(p["n"] == 0 for p in prepared.values()):
        raise ValueError("plot_sensitivity_distribution: every sample array is empty")
    all_logs = [p["log"] for p in prepared.values() if p["log"].size]
    if not all_logs:
        raise ValueError(
            "plot_sensitivity_distribution: no positive scores to show on a log axis"
        )
    concat = np.concatenate(all_logs)
    lo, hi = float(concat.min()), float(concat.max())
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    bins = np.linspace(lo, hi, 61)

    with plt.rc_context(_STYLE):
        fig, ax = plt.subplots(figsize=(7.5, 4.5))
        handles: list[Any] = []
        for t in types:
            p = prepared[t]
            c = colors[t]
            label = f"{t} (n={p['n']:,}"
            label += f", {p['n_zero']:,} zero)" if p["n_zero"] else ")"
            if p["log"].size:
                ax.hist(p["log"], bins=bins, density=True, color=c, alpha=0.25,
                        histtype="stepfilled", linewidth=0)
                ax.hist(p["log"], bins=bins, density=True, color=c,
                        histtype="step", linewidth=1.6)
            else:
                label += " - all zero"
            if np.isfinite(p["p99"]) and p["p99"] > 0:
                ax.axvline(np.log10(p["p99"]), color=c, linestyle="--", linewidth=1.3)
            handles.append(Line2D([], [], color=c, linewidth=6, alpha=0.6, label=label))
        handles.append(Line2D([], [], color="0.3", linestyle="--", linewidth=1.3,
                              label="99th percentile"))
        ax.legend(handles=handles, loc="upper left", frameon=False)
        ax.set_xlabel(f"log$_{{10}}$ {metric} score (dimensionless)")
        ax.set_ylabel("density (per unit log$_{10}$ score)")
        ax.set_title(f"Distribution of {metric} sensitivity by parameter type")
        ax.set_ylim(top=ax.get_ylim()[1] * 1.35)  # room for the legend
        return _save(fig, path)


# ----------------------------------------------------------------------------- 2. layers


def plot_layer_comparison(
    per_layer: Sequence[Mapping[str, Any]], metric: str, path: str | Path
) -> Path:
    """Per-layer mean, 99th percentile and maximum score on a log y-axis.

    Each dict has ``layer`` (-1 = outside the decoder blocks, drawn last as
    "other", unconnected to the decoder-layer lines), ``mean``, ``p99``, ``max``
    (plus other stats, unused).
    """
    if not per_layer:
        raise ValueError("plot_layer_comparison: `per_layer` is empty")
    rows = sorted(per_layer, key=lambda r: _layer_sort_key(r["layer"]))
    layers = [int(r["layer"]) for r in rows]
    if len(set(layers)) != len(layers):
        raise ValueError(f"plot_layer_comparison: duplicate layers in {layers}")
    x = np.arange(len(rows))
    is_other = np.array([layer == OTHER_LAYER for layer in layers])
    series = (
        ("max", "max", _OKABE_ITO["vermillion"], "^"),
        ("p99", "99th percentile", _OKABE_ITO["orange"], "s"),
        ("mean", "mean", _OKABE_ITO["blue"], "o"),
    )
    any_positive = False
    with plt.rc_context(_STYLE):
        fig, ax = plt.subplots(figsize=(max(6.5, 0.28 * len(rows) + 3), 4.5))
        for key, label, color, marker in series:
            y = np.array([float(r[key]) for r in rows], dtype=np.float64)
            any_positive |= bool(np.any(np.isfinite(y) & (y > 0)))
            dec = ~is_other
            ax.plot(x[dec], y[dec], color=color, marker=marker, markersize=5,
                    linewidth=1.6, label=label)
            if is_other.any():
                ax.plot(x[is_other], y[is_other], color=color, marker=marker,
                        markersize=7, linestyle="none")
        if is_other.any() and (~is_other).any():
            ax.axvline(x[is_other][0] - 0.5, color="0.6", linestyle=":", linewidth=1)
        if any_positive:
            ax.set_yscale("log")
        else:
            log.warning("plot_layer_comparison: no positive values, using a linear axis")
        ticks = _thin_ticks(len(rows))
        ax.set_xticks(x[ticks])
        ax.set_xticklabels([layer_label(layers[i]) for i in ticks])
        ax.set_xlim(-0.5, len(rows) - 0.5)
        ax.grid(True, which="major", axis="y", alpha=0.3)
        ax.set_xlabel("decoder layer index (\"other\" = outside the blocks)")
        ax.set_ylabel(f"{metric} score (dimensionless)")
        ax.set_title(f"Per-layer {metric} sensitivity")
        # outside the axes: never hides a point, whatever the layer count
        ax.legend(frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        return _save(fig, path)


# ----------------------------------------------------------------------------- 3. heatmap


def heatmap_matrix(
    per_tensor: Sequence[Mapping[str, Any]],
) -> tuple[list[str], list[int], np.ndarray]:
    """Aggregate per-tensor stats into a parameter-type x layer matrix.

    Each cell is the count-weighted mean score of all tensors of that type and
    layer: ``sum(count * mean) / sum(count)``. Cells with no tensor (or a total
    count of 0) are NaN. Returns ``(types, layers, matrix)`` with types in the
    canonical order (attention, mlp, norm, embedding, lm_head, then others) and
    layers ascending with -1 last; ``matrix.shape == (len(types), len(layers))``.
    """
    if not per_tensor:
        raise ValueError("heatmap_matrix: `per_tensor` is empty")
    types = _ordered_types(r["param_type"] for r in per_tensor)
    layers = sorted({int(r["layer"]) for r in per_tensor}, key=_layer_sort_key)
    ti = {t: i for i, t in enumerate(types)}
    li = {layer: j for j, layer in enumerate(layers)}
    weighted = np.zeros((len(types), len(layers)), dtype=np.float64)
    counts = np.zeros_like(weighted)
    for r in per_tensor:
        i, j = ti[r["param_type"]], li[int(r["layer"])]
        c = float(r["count"])
        weighted[i, j] += c * float(r["mean"])
        counts[i, j] += c
    with np.errstate(invalid="ignore", divide="ignore"):
        matrix = np.where(counts > 0, weighted / np.where(counts > 0, counts, 1), np.nan)
    return types, layers, matrix


def plot_sensitivity_heatmap(
    per_tensor: Sequence[Mapping[str, Any]], metric: str, path: str | Path
) -> Path:
    """Heatmap of the count-weighted mean score per parameter type and layer.

    Uses a log colour scale when the positive values span more than 2 decades;
    cells without tensors are grey; values are annotated when there are at most
    12 layer columns.
    """
    if not per_tensor:
        raise ValueError("plot_sensitivity_heatmap: `per_tensor` is empty")
    types, layers, matrix = heatmap_matrix(per_tensor)
    finite = matrix[np.isfinite(matrix)]
    positive = finite[finite > 0]
    use_log = positive.size > 0 and positive.max() / positive.min() > 100.0
    cmap = plt.get_cmap(_CMAP).with_extremes(bad=_BAD_COLOR)
    if use_log:
        cmap = cmap.with_extremes(under=cmap(0.0))
        norm: Normalize = LogNorm(vmin=float(positive.min()), vmax=float(positive.max()))
    else:
        vmin = float(finite.min()) if finite.size else 0.0
        vmax = float(finite.max()) if finite.size else 1.0
        if vmax <= vmin:
            vmin, vmax = vmin - 0.5, vmax + 0.5
        norm = Normalize(vmin=vmin, vmax=vmax)
    masked = np.ma.masked_invalid(matrix)
    n_t, n_l = matrix.shape
    annotate = n_l <= 12
    width = min(16.0, max(6.0, 0.75 * n_l + 3.0)) if annotate else min(16.0, max(7.0, 0.3 * n_l + 3))
    with plt.rc_context(_STYLE):
        fig, ax = plt.subplots(figsize=(width, max(3.0, 0.55 * n_t + 1.8)))
        im = ax.imshow(masked, cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
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
                                color=_text_color(cmap, norm, max(v, norm.vmin)))
                    else:
                        ax.text(j, i, "-", ha="center", va="center", fontsize=fs,
                                color="0.45")
        cbar = fig.colorbar(im, ax=ax, pad=0.02, extend="neither")
        scale = "log scale" if use_log else "linear scale"
        cbar.set_label(f"mean {metric} score\n(count-weighted, {scale})")
        ax.set_xlabel("decoder layer index (\"other\" = outside the blocks)")
        ax.set_ylabel("parameter type")
        ax.set_title(f"Mean {metric} sensitivity by parameter type and layer"
                     + ("  (grey: no tensors)" if np.isnan(matrix).any() else ""))
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


def plot_perturbation_effects(results: Mapping[str, Any], path: str | Path) -> Path:
    """Bar chart of the mean perplexity ratio per selection (top/random/bottom-K).

    ``results`` is the content of ``perturbation_results.json``. Error bars span
    the min..max over seeds, each seed is a dot over its bar, a dashed line marks
    the unperturbed baseline (ratio 1); the y-axis is logarithmic when the
    largest ratio exceeds the smallest by more than 20x.
    """
    if not results or not results.get("results"):
        raise ValueError("plot_perturbation_effects: no entries in results['results']")
    baseline = results.get("baseline") or {}
    base_ppl = baseline.get("ppl")
    groups: dict[str, list[tuple[Any, float]]] = {}
    for r in results["results"]:
        ratio = r.get("ppl_ratio")
        if ratio is None and base_ppl and r.get("ppl") is not None:
            ratio = float(r["ppl"]) / float(base_ppl)
        if ratio is None or not np.isfinite(float(ratio)):
            log.warning("plot_perturbation_effects: skipping entry without a finite ratio: %s", r)
            continue
        groups.setdefault(str(r["selection"]), []).append((r.get("seed"), float(ratio)))
    if not groups:
        raise ValueError("plot_perturbation_effects: no entry has a finite perplexity ratio")
    order = [s for s in _SELECTION_ORDER if s in groups]
    order += sorted(set(groups).difference(_SELECTION_ORDER))

    all_ratios = np.array([v for s in order for _, v in groups[s]])
    pos = all_ratios[all_ratios > 0]
    use_log = pos.size > 0 and pos.size == all_ratios.size and pos.max() / pos.min() > 20.0

    metric = results.get("metric", "score")
    k = results.get("topk", "?")
    mode = results.get("mode")
    method = _method_label(results.get("perturbation"))
    title = f"{metric}: {method} of K={k} weights" + (f" ({mode})" if mode else "")
    if base_ppl is not None:
        window = results.get("window_length")
        title += f"\nbaseline perplexity {float(base_ppl):.3g}"
        if window is not None:
            title += f" (window {window} tokens"
            if results.get("eval_tokens"):
                title += f", {int(results['eval_tokens']):,} eval tokens"
            title += ")"

    rng = np.random.default_rng(0)  # deterministic jitter
    with plt.rc_context(_STYLE):
        fig, ax = plt.subplots(figsize=(max(5.5, 1.6 * len(order) + 2.5), 4.8))
        x = np.arange(len(order))
        means, los, his = [], [], []
        for s in order:
            vals = np.array([v for _, v in groups[s]])
            means.append(vals.mean())
            los.append(vals.min())
            his.append(vals.max())
        means_a, los_a, his_a = np.array(means), np.array(los), np.array(his)
        colors = [_SELECTION_COLORS.get(s, _OKABE_ITO["purple"]) for s in order]
        ax.bar(x, means_a, width=0.6, color=colors, alpha=0.75, edgecolor="black",
               linewidth=0.8, zorder=2)
        # the mean of equal floats can land one ulp outside [min, max]: clamp, never negative
        yerr = np.clip(np.stack([means_a - los_a, his_a - means_a]), 0.0, None)
        ax.errorbar(x, means_a, yerr=yerr, fmt="none",
                    ecolor="black", elinewidth=1.3, capsize=6, zorder=3)
        for xi, s in zip(x, order):
            vals = np.array([v for _, v in groups[s]])
            jitter = rng.uniform(-0.13, 0.13, size=vals.size) if vals.size > 1 else 0.0
            ax.scatter(xi + jitter, vals, s=26, color="white", edgecolor="black",
                       linewidth=0.9, zorder=4)
        ax.axhline(1.0, color="0.25", linestyle="--", linewidth=1.2, zorder=1)
        if use_log:
            ax.set_yscale("log")
            ymin = min(float(pos.min()), 1.0) / 1.5
            ax.set_ylim(bottom=ymin, top=max(float(pos.max()), 1.0) * 2.5)
        else:
            ax.set_ylim(0, max(float(all_ratios.max()), 1.0) * 1.18)
        # value labels above the error bars
        for xi, m, h in zip(x, means_a, his_a):
            y = h * 1.12 if use_log else h + 0.03 * ax.get_ylim()[1]
            ax.text(xi, y, _ratio_label(m), ha="center", va="bottom", fontsize=10)
        labels = [f"{_SELECTION_LABELS.get(s, s)}\n(n={len(groups[s])} seeds)" for s in order]
        ax.set_xticks(x)
        ax.set_xticklabels(labels)
        ax.set_xlim(-0.6, len(order) - 0.4)
        ax.set_ylabel("perplexity ratio (perturbed / baseline)")
        ax.set_xlabel("weights perturbed")
        ax.grid(True, axis="y", which="major", alpha=0.3, zorder=0)
        handles = [
            Line2D([], [], color="0.25", linestyle="--", label="baseline (ratio 1)"),
            Line2D([], [], marker="o", linestyle="none", markerfacecolor="white",
                   markeredgecolor="black", label="individual seed"),
            Line2D([], [], color="black", marker="_", markersize=10, linewidth=1.3,
                   label="min-max over seeds"),
        ]
        ax.legend(handles=handles, frameon=False, loc="upper right")
        ax.set_title(title)
        return _save(fig, path)


# ----------------------------------------------------------------------------- 5. stability


def _pair_matrix(seeds: Sequence[Any], pairs: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """Symmetric seeds x seeds matrix from pairwise values (diagonal 1, missing NaN)."""
    idx = {s: i for i, s in enumerate(seeds)}
    n = len(seeds)
    m = np.full((n, n), np.nan)
    np.fill_diagonal(m, 1.0)
    for p in pairs:
        a, b = p["a"], p["b"]
        if a not in idx or b not in idx:
            log.warning("plot_stability: pair (%s, %s) refers to an unknown seed", a, b)
            continue
        m[idx[a], idx[b]] = m[idx[b], idx[a]] = float(p["value"])
    return m


def _draw_pair_panel(ax: Any, fig: Any, seeds: Sequence[Any], m: np.ndarray,
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
    ax.set_xlabel("seed")
    ax.set_ylabel("seed")
    ax.set_title(title)
    cbar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    cbar.set_label(cbar_label)


def plot_stability(stability: Mapping[str, Any], path: str | Path) -> Path:
    """Seeds x seeds matrices of top-K Jaccard overlap and Spearman rank correlation.

    ``stability`` is the content of ``stability.json``. The Spearman panel is
    omitted when that section is missing. A data-independent metric is flagged
    in the title (its overlap is 1.0 by construction).
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
        seeds = sorted(found)
    if not seeds:
        raise ValueError("plot_stability: no seeds and no pairs in `stability`")

    panels: list[tuple[np.ndarray, str, str, float]] = []
    k = stability.get("k", "?")
    jm = _pair_matrix(seeds, jac.get("pairs") or [])
    jt = f"Top-K overlap (Jaccard, K={k})"
    if jac.get("mean") is not None:
        jt += f"\nmean {jac['mean']:.3f}, min {jac.get('min', float('nan')):.3f}"
    panels.append((jm, jt, "Jaccard index of top-K sets", 0.0))
    if spe:
        sm = _pair_matrix(seeds, spe.get("pairs") or [])
        st = "Rank correlation (Spearman ρ"
        if spe.get("n_weights"):
            st += f", {int(spe['n_weights']):,} weights"
        st += ")"
        if spe.get("mean") is not None:
            st += f"\nmean {spe['mean']:.3f}, min {spe.get('min', float('nan')):.3f}"
        finite = sm[np.isfinite(sm)]
        vmin = -1.0 if finite.size and finite.min() < 0 else 0.0
        panels.append((sm, st, "Spearman ρ", vmin))

    metric = stability.get("metric", "score")
    mode = stability.get("mode")
    suptitle = f"Stability of the top-K {metric} weights across {len(seeds)} seeds"
    if mode:
        suptitle += f" ({mode})"
    if stability.get("data_independent"):
        suptitle += "\ndata-independent metric: 1.0 by construction"

    n = len(seeds)
    side = min(6.0, max(3.6, 0.55 * n + 2.2))
    with plt.rc_context(_STYLE):
        fig, axes = plt.subplots(1, len(panels), figsize=(side * len(panels) + 1.0, side + 0.9),
                                 squeeze=False, layout="constrained")
        for ax, (m, title, clabel, vmin) in zip(axes[0], panels):
            _draw_pair_panel(ax, fig, seeds, m, title, clabel, vmin)
        fig.suptitle(suptitle)
        return _save(fig, path)


# ----------------------------------------------------------------------------- 6. all


def save_experiment_plots(
    out_dir: str | Path,
    *,
    samples: Mapping[str, np.ndarray],
    stats: Mapping[str, Any],
    perturbation: Mapping[str, Any],
    stability: Mapping[str, Any] | None = None,
    metric: str | None = None,
) -> list[Path]:
    """Write every figure of one experiment into ``out_dir / "plots"``.

    ``stats`` is one element of ``per_seed`` in ``sensitivity_stats.json``;
    ``perturbation`` the content of ``perturbation_results.json``; ``stability``
    (optional) that of ``stability.json``. The metric name defaults to the one
    recorded in ``perturbation`` (or ``stability``). Returns the written paths in
    the order of :data:`PLOT_FILES` (the stability figure only when given).
    """
    if not stats:
        raise ValueError("save_experiment_plots: `stats` is empty")
    metric = (metric or (perturbation or {}).get("metric")
              or (stability or {}).get("metric") or "score")
    plots = Path(out_dir) / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    paths = [
        plot_sensitivity_distribution(samples, metric, plots / PLOT_FILES[0]),
        plot_layer_comparison(stats.get("per_layer") or [], metric, plots / PLOT_FILES[1]),
        plot_sensitivity_heatmap(stats.get("per_tensor") or [], metric, plots / PLOT_FILES[2]),
        plot_perturbation_effects(perturbation, plots / PLOT_FILES[3]),
    ]
    if stability is not None:
        paths.append(plot_stability(stability, plots / PLOT_FILES[4]))
    return paths
