"""The stability figure: seeds x seeds top-K Jaccard and Spearman matrices.

Part of :mod:`cwa_core.plots`; see its docstring for the conventions every figure follows.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import Normalize

from . import style
from .style import (
    _CMAP, _BAD_COLOR, NAN_LABEL, _num, _seeds_caption, _sorted_seeds, _figure, _fmt, _text_color,
)

log = logging.getLogger(__name__)


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
        return style._save(fig, path)  # looked up at call time: tests spy on it
