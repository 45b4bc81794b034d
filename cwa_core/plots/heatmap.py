"""The heatmap figure: count-weighted mean score per parameter type and layer.

Part of :mod:`cwa_core.plots`; see its docstring for the conventions every figure follows.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import LogNorm, Normalize

from . import style
from .style import (
    _CMAP, _BAD_COLOR, layer_label, _layer_sort_key, _ordered_types, _num, _seeds_caption, _rows_per_seed,
    _figure, _fmt, _text_color, _thin_ticks,
)


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
        return style._save(fig, path)  # looked up at call time: tests spy on it
