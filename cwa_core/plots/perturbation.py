"""The perturbation figure: mean perplexity ratio per selection, every seed shown.

Part of :mod:`cwa_core.plots`; see its docstring for the conventions every figure follows.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from .. import schema
from . import style
from .style import (
    _OKABE_ITO, INF_HATCH as _INF_HATCH, INF_LABEL, NAN_LABEL, _num, _plural, _seeds_caption, _sorted_seeds, _figure, _fmt, _note_below,
)

log = logging.getLogger(__name__)


# the selections' one order, labels and palette (Okabe-Ito) are declared in cwa_core.schema
_SELECTION_ORDER = schema.SELECTION_KINDS
_SELECTION_LABELS = schema.SELECTION_LABELS
_SELECTION_COLORS = schema.SELECTION_COLORS


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


@dataclass(frozen=True)
class _Bars:
    """What the perturbation figure draws: per selection (in drawing order) every seed's
    ratio, the finite ones, and the counts of inf and NaN seeds; over all, the axis scale."""

    base_ppl: float
    groups: dict[str, list[tuple[Any, float]]]
    order: list[str]
    vals: dict[str, np.ndarray]
    fin: dict[str, np.ndarray]
    n_inf: dict[str, int]
    n_nan: dict[str, int]
    all_fin: np.ndarray
    use_log: bool

    @property
    def any_inf(self) -> int:
        return sum(self.n_inf.values())

    @property
    def any_nan(self) -> int:
        return sum(self.n_nan.values())

    @property
    def n_runs(self) -> int:
        return sum(v.size for v in self.vals.values())


def _bars(results: Mapping[str, Any]) -> _Bars:
    base_ppl = _num((results.get("baseline") or {}).get("ppl"))
    groups = _ratio_groups(results["results"], base_ppl)
    order = [s for s in _SELECTION_ORDER if s in groups]
    order += sorted(set(groups).difference(_SELECTION_ORDER))
    vals = {s: np.array([v for _, v in groups[s]], dtype=np.float64) for s in order}
    fin = {s: v[np.isfinite(v)] for s, v in vals.items()}
    all_fin = np.concatenate(list(fin.values()))
    use_log = bool(all_fin.size and all_fin.min() > 0 and all_fin.max() / all_fin.min() > 20.0)
    return _Bars(base_ppl, groups, order, vals, fin, {s: int(np.isposinf(v).sum()) for s, v in vals.items()},
                 {s: int(np.isnan(v).sum()) for s, v in vals.items()}, all_fin, use_log)


def _title(results: Mapping[str, Any], d: _Bars) -> str:
    """Metric, perturbation, K and mode; the baseline and its windows; the seeds; the non-finite runs."""
    metric = results.get("metric", "score")
    mode = results.get("mode")
    title = (f"{metric}: {_method_label(results.get('perturbation'))} of K={results.get('topk', '?')}"
             f" weights" + (f" ({mode})" if mode else ""))
    if results.get("baseline"):
        title += f"\nbaseline perplexity {_fmt(d.base_ppl)}"
        if results.get("window_length") is not None:
            title += f" (window {results['window_length']} tokens"
            if results.get("eval_tokens"):
                title += f", {int(results['eval_tokens']):,} eval tokens"
            title += ")"
    seeds = _sorted_seeds({seed for g in d.groups.values() for seed, _ in g if seed is not None})
    if seeds:
        title += f"; {_seeds_caption(seeds, len(seeds))}"
    any_inf, any_nan, n_runs = d.any_inf, d.any_nan, d.n_runs
    if any_inf or any_nan:
        bad = ", ".join(p for p in (f"{any_inf} inf" if any_inf else "", f"{any_nan} NaN" if any_nan else "") if p)
        title += (f"\nall {n_runs} runs non-finite ({bad})" if any_inf + any_nan == n_runs
                  else f"\nnon-finite: {any_inf + any_nan} of {n_runs} runs ({bad})")
    return title


def _y_limits(d: _Bars) -> tuple[float, float]:
    """(bottom, top) of the ratio axis: room above the largest finite ratio, more with an inf bar."""
    fin_max = float(d.all_fin.max()) if d.all_fin.size else 1.0
    if d.use_log:
        return min(float(d.all_fin.min()), 1.0) / 1.5, max(fin_max, 1.0) * (8.0 if d.any_inf else 2.5)
    top = max(fin_max, 1.0) * (1.45 if d.any_inf else 1.18)
    return 0.0, (top if d.all_fin.size else 2.0)


def _draw_selection(ax: Any, xi: float, s: str, d: _Bars, rng: np.random.Generator, bottom: float,
                    top: float) -> None:
    """One selection's bar (hatched to the top when a seed is inf), its seeds and NaN marker."""
    color = _SELECTION_COLORS.get(s, _OKABE_ITO["purple"])
    f, n_inf, n_nan = d.fin[s], d.n_inf[s], d.n_nan[s]
    if n_inf:  # the mean over seeds is inf: the bar fills the axis, hatched
        ax.bar(xi, top - bottom, bottom=bottom, width=0.6, color=color, alpha=0.35,
               hatch=_INF_HATCH, edgecolor="black", linewidth=0.8, zorder=2, gid=f"bar:{s}")
        ax.text(xi, bottom + 0.93 * (top - bottom) if not d.use_log else top / 1.35,
                f"{INF_LABEL}\n{n_inf} of {d.vals[s].size} seeds", ha="center", va="top",
                fontsize=9, zorder=5,
                bbox={"boxstyle": "round,pad=0.25", "facecolor": "white", "edgecolor": "none"})
        ax.scatter(np.full(n_inf, xi) + _jitter(rng, n_inf),
                   np.full(n_inf, 0.985), transform=ax.get_xaxis_transform(), marker="^",
                   s=40, color="white", edgecolor="black", linewidth=0.9, zorder=5, clip_on=False)
    elif f.size:
        mean = min(max(float(f.mean()), float(f.min())), float(f.max()))  # ulp-safe
        ax.bar(xi, mean, width=0.6, color=color, alpha=0.75, edgecolor="black",
               linewidth=0.8, zorder=2, gid=f"bar:{s}")
        ax.errorbar([xi], [mean], yerr=[[mean - f.min()], [f.max() - mean]], fmt="none",
                    ecolor="black", elinewidth=1.3, capsize=6, zorder=3)
        y = float(f.max()) * 1.12 if d.use_log else float(f.max()) + 0.03 * top
        label = _ratio_label(mean) + (f"\nmean of {f.size}" if n_nan else "")
        ax.text(xi, y, label, ha="center", va="bottom", fontsize=10, zorder=5)
    if f.size:
        ax.scatter(xi + _jitter(rng, f.size), f, s=26, color="white", edgecolor="black",
                   linewidth=0.9, zorder=4)
    if n_nan:
        ax.scatter([xi], [1.0], marker="x", s=60, color="black", linewidth=1.6, zorder=5)
        ax.annotate(f"{NAN_LABEL}" + (f" x{n_nan}" if n_nan > 1 else ""),
                    xy=(xi, 1.0), xytext=(7, 4), textcoords="offset points",
                    fontsize=10, fontweight="bold", zorder=6)


def _tick_labels(d: _Bars) -> list[str]:
    """"top-K\n(n=3 seeds, 1 inf)": each selection with its seed count and non-finite seeds."""
    labels = []
    for s in d.order:
        extra = [f"{d.n_inf[s]} inf" if d.n_inf[s] else "", f"{d.n_nan[s]} NaN" if d.n_nan[s] else ""]
        extra = [e for e in extra if e]
        labels.append(f"{_SELECTION_LABELS.get(s, s)}\n(n={_plural(d.vals[s].size, 'seed')}"
                      + (f", {', '.join(extra)})" if extra else ")"))
    return labels


def _legend_handles(d: _Bars) -> list[Any]:
    """Baseline, seeds and range (when a ratio is finite), inf and NaN (when there are any)."""
    any_inf, any_nan = d.any_inf, d.any_nan
    handles: list[Any] = [Line2D([], [], color="0.25", linestyle="--", label="baseline (ratio 1)")]
    if d.all_fin.size:
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
    return handles


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
    d = _bars(results)
    title = _title(results, d)
    bottom, top = _y_limits(d)
    rng = np.random.default_rng(0)  # deterministic jitter
    x = np.arange(len(d.order))
    with _figure(figsize=(max(5.5, 1.6 * len(d.order) + 2.5), 5.0)) as (fig, ax):
        if d.use_log:
            ax.set_yscale("log")
        ax.set_ylim(bottom, top)
        for xi, s in zip(x, d.order):
            _draw_selection(ax, xi, s, d, rng, bottom, top)
        ax.axhline(1.0, color="0.25", linestyle="--", linewidth=1.2, zorder=1)
        ax.set_xticks(x)
        ax.set_xticklabels(_tick_labels(d))
        ax.set_xlim(-0.6, len(d.order) - 0.4)
        ax.set_ylabel("perplexity ratio (perturbed / baseline" + (", log scale)" if d.use_log else ")"))
        ax.set_xlabel("weights perturbed")
        ax.grid(True, axis="y", which="major", alpha=0.3, zorder=0)
        ax.legend(handles=_legend_handles(d), frameon=True, framealpha=0.9, edgecolor="none",
                  loc="upper left", bbox_to_anchor=(1.01, 1.0))
        missing = [_SELECTION_LABELS[s] for s in _SELECTION_ORDER if s not in d.groups]
        if missing:
            _note_below(ax, f"not in these results: {', '.join(missing)}")
        ax.set_title(title)
        return style._save(fig, path)  # looked up at call time: tests spy on it


def _jitter(rng: np.random.Generator, n: int) -> np.ndarray | float:
    return rng.uniform(-0.13, 0.13, size=n) if n > 1 else 0.0
