"""Figure of a super-weight hunt: each layer's largest |down-projection output|, round by round.

Reads the ``super_weights.json`` dict (:func:`cwa_core.superweights.super_weights_report`), so
the figure can be redrawn from the file alone. Same conventions as :mod:`cwa_core.plots` (style
from :mod:`cwa_core.plots.style`): Agg backend, Okabe-Ito colours, and markers plus line styles so
that rounds stay apart in grayscale.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .plots import style

__all__ = ["plot_super_weight_spikes"]

_ROUND_COLORS = tuple(style.color(c) for c in ("vermillion", "blue", "green", "orange", "purple", "sky_blue", "black"))
_MARKERS = ("o", "s", "^", "D", "v", "P", "X")
_DASHES = ("-", "--", "-.", ":")


def _positive(values: Any) -> np.ndarray:
    """Values a log axis can show: zeros, negatives and non-finite values become NaN (gaps)."""
    a = np.array([np.nan if v is None else v for v in values], dtype=np.float64)
    a[~np.isfinite(a) | (a <= 0)] = np.nan
    return a


def plot_super_weight_spikes(report: Mapping[str, Any], path: str | Path) -> Path:
    """One line per round: the largest |output| of each layer's down projection (log scale),
    round 0 being the unmodified model and round k the model with the candidates of rounds < k
    zeroed; the dotted grey line is each layer's output threshold; candidates are labelled
    (row, col) where they were found, and rejected proposals (a spike no single weight makes:
    ``report["rejected"]``) are grey crosses labelled "rejected (row, col)". Writes a PNG to
    ``path`` and returns it."""
    layers = sorted(report.get("layers") or [], key=lambda e: e["layer"])
    if not layers:
        raise ValueError("plot_super_weight_spikes: the report has no layers")
    x = np.array([e["layer"] for e in layers])
    n_rounds = max(len(e["max_out_per_round"]) for e in layers)
    by_round = [_positive([e["max_out_per_round"][k] if k < len(e["max_out_per_round"]) else None
                           for e in layers]) for k in range(n_rounds)]
    threshold = _positive([e.get("threshold_out") for e in layers])
    styles = zip(itertools.cycle(_ROUND_COLORS), itertools.cycle(_MARKERS), itertools.cycle(_DASHES))
    with style.figure(figsize=(max(6.0, 0.25 * len(x) + 4), 4.2)) as (fig, ax):
        for k, (y, (color, marker, dash)) in enumerate(zip(by_round, styles)):
            label = "round 0 (unmodified)" if k == 0 else f"round {k} ({_removed(report, k)} zeroed)"
            ax.plot(x, y, color=color, marker=marker, linestyle=dash, linewidth=1.6, markersize=5, label=label)
        if np.isfinite(threshold).any():
            ax.plot(x, threshold, color="#7f7f7f", linestyle=":", linewidth=1.2, label="detection threshold")
        for c in report.get("candidates") or []:
            k = int(c["round"])
            i = int(np.searchsorted(x, c["layer"]))
            if i < len(x) and x[i] == c["layer"] and math.isfinite(by_round[k][i]):
                ax.annotate(f"({c['row']}, {c['col']})", (x[i], by_round[k][i]), textcoords="offset points",
                            xytext=(4, 6), fontsize=8)
        first = True
        for c in report.get("rejected") or []:
            k, i = int(c["round"]), int(np.searchsorted(x, c["layer"]))
            if k < n_rounds and i < len(x) and x[i] == c["layer"] and math.isfinite(by_round[k][i]):
                ax.plot(x[i], by_round[k][i], linestyle="none", marker="x", markersize=9, color="#7f7f7f",
                        label="rejected proposal" if first else None)
                ax.annotate(f"rejected ({c['row']}, {c['col']})", (x[i], by_round[k][i]), textcoords="offset points",
                            xytext=(4, -12), fontsize=8, color="#555555")
                first = False
        ax.set_yscale("log")
        ax.set_xlabel("decoder layer (index)")
        ax.set_ylabel("largest |down_proj output| (activation units)")
        ax.set_xticks(x if len(x) <= 24 else x[:: math.ceil(len(x) / 24)])
        title = "Super-weight hunt"
        if report.get("model_id"):
            title += f": {report['model_id']}"
        ax.set_title(title)
        ax.legend(loc="best", frameon=False)
        return style.save_png(fig, path)


def _removed(report: Mapping[str, Any], k: int) -> int:
    """How many candidates are zeroed in round ``k`` (those found in rounds < k)."""
    return sum(1 for c in report.get("candidates") or [] if int(c["round"]) < k)
