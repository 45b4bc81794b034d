"""Phase 2 figures across models (issue 17), drawn from the analysis dict's "campaign" section:
per campaign, the failure rate against the level (Wilson intervals) and the median perplexity
ratio against the level (25-75% band), one line per arm, one panel per model. Each returns
``(Figure, caption)`` like :mod:`analysis.figures`, which registers :data:`CAMPAIGN_FIGURES`.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Callable

from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from cwa_core.campaign_stats import SCALES
from cwa_core.schema import ARM_COLORS, ARM_KINDS, ARM_LABELS, ARM_MARKERS, CAMPAIGNS  # campaigns: the report's order

from .common import value

_PLAIN = FuncFormatter(lambda v, _: f"{v:g}")
CELL_LINES = ["-", "--", ":", "-."]  # line style: the model's cells (metric, K, mode)
AXIS = {"error_rate": "bit error rate per stored bit (log; harsher to the right)",
        "quant_bits": "quantization bits (fewer = harsher, to the right)",
        "sparsity": "sparsity (fraction of weights pruned; harsher to the right)"}


def campaign_rows(a: dict, campaign: str) -> list[dict]:
    """The summary rows (per cell, arm and level) of ``campaign`` in the analysis dict."""
    return [r for r in (a.get("campaign") or {}).get("summary", []) if r["campaign"] == campaign]


def _panels(n: int) -> tuple[Figure, list]:
    """Up to two panels a row (the report's page is portrait), room for one legend under them."""
    cols = min(max(n, 1), 2)
    rows = math.ceil(max(n, 1) / cols)
    fig = Figure(figsize=(5.0 * cols, 3.6 * rows + 0.9), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:max(n, 1)]


def _series(rows: list[dict]) -> dict[tuple, list[dict]]:
    """(cell label, arm) -> its rows by ascending level; cells in (metric, K, mode, cell) order."""
    out: dict[tuple, list[dict]] = {}
    for r in sorted(rows, key=lambda r: (r["metric"], r["k"], r["mode"], r["cell"],
                                         ARM_KINDS.index(r["arm"]) if r["arm"] in ARM_KINDS else 9, value(r["level"]))):
        out.setdefault((f"{r['metric']} K={r['k']} {r['mode']}", r["cell"], r["arm"]), []).append(r)
    return out


def _level_axis(ax, level_name: str, harsher: int, levels: list[float]) -> None:
    """The level on x, harsher to the right: a log axis where the statistics interpolate in log10."""
    if SCALES.get(level_name) == "log10":
        ax.set_xscale("log")
    elif harsher < 0:
        ax.set_xticks(sorted(set(levels)), [f"{x:g}" for x in sorted(set(levels))])
        ax.invert_xaxis()
    ax.set_xlabel(AXIS.get(level_name, level_name), fontsize=8)


def _draw(a: dict, campaign: str, y_of: Callable, ylabel: str, what: str) -> tuple[Figure, str]:
    """Panels per model, one line per arm (line style per cell), ``y_of(ax, pts, style)`` draws one."""
    rows = campaign_rows(a, campaign)
    models = sorted({r["model_name"] for r in rows})
    fig, axes = _panels(len(models))
    if not rows:
        axes[0].text(0.5, 0.5, f"no {campaign} campaign", ha="center", va="center", transform=axes[0].transAxes)
        return fig, f"No {campaign} campaign was found, so no {what} is drawn."
    level_name = rows[0]["level_name"]
    for ax, model in zip(axes, models):
        series = _series([r for r in rows if r["model_name"] == model])
        cells = list(dict.fromkeys(key[1] for key in series))
        for (label, cell, arm), pts in series.items():
            style = {"color": ARM_COLORS.get(arm, "0.5"), "marker": ARM_MARKERS.get(arm, "o"), "ms": 5,
                     "ls": CELL_LINES[cells.index(cell) % len(CELL_LINES)],
                     "label": ARM_LABELS.get(arm, arm) + (f" ({label})" if len(cells) > 1 else "")}
            y_of(ax, pts, style)
        _level_axis(ax, level_name, int(rows[0]["harsher"]), [value(r["level"]) for r in rows])
        ax.set_ylabel(ylabel, fontsize=8)
        ax.set_title(model, fontsize=10)
    legend = {label: h for ax in axes for h, label in zip(*ax.get_legend_handles_labels())}  # one entry a label
    widest = max(map(len, legend), default=1) + 6  # characters of one entry, its handle included
    cols = max(1, min(len(legend), 4, int(fig.get_figwidth() * 72 / (0.6 * 8)) // widest))  # 8 pt: ~0.6 em a char
    fig.legend(legend.values(), legend.keys(), loc="outside lower center", ncols=cols, fontsize=8, frameon=False)
    cells = sorted({r["cell"] for r in rows})
    return fig, f"{campaign}: {what}, one line per protected set (arm), one panel per model " \
                f"(from {len(cells)} cell{'s' if len(cells) > 1 else ''}: {', '.join(cells[:4])}" \
                f"{', ...' if len(cells) > 4 else ''})."


def _failure(ax, pts: list[dict], style: dict) -> None:
    x = [value(p["level"]) for p in pts]
    y = [value(p["failure_rate"]) for p in pts]
    lo = [max(0.0, yi - value(p["failure_lo"])) if math.isfinite(value(p["failure_lo"])) else 0.0 for p, yi in zip(pts, y)]
    hi = [max(0.0, value(p["failure_hi"]) - yi) if math.isfinite(value(p["failure_hi"])) else 0.0 for p, yi in zip(pts, y)]
    ax.errorbar(x, y, yerr=[lo, hi], capsize=3, **style)
    ax.set_ylim(-0.03, 1.03)


def failure_figure(a: dict, campaign: str) -> tuple[Figure, str]:
    """Failure rate against the level with its Wilson interval, and the headline's target."""
    fig, cap = _draw(a, campaign, _failure, "failure rate (share of trials)", "the failure rate (ratio above the "
                     "threshold or non-finite) against the level with Wilson 95% intervals, dotted line at the "
                     "headline's target")
    heads = [h for h in (a.get("campaign") or {}).get("headlines", []) if h["campaign"] == campaign]
    target = next((value((h.get("headline") or {}).get("target")) for h in heads if h.get("headline")), 0.5)
    for ax in fig.axes:
        if ax.get_visible() and ax.has_data():
            ax.axhline(target if math.isfinite(target) else 0.5, color="0.5", lw=0.8, ls=":")
    return fig, cap


def _median(ax, pts: list[dict], style: dict) -> None:
    x = [value(p["level"]) for p in pts]
    y = [value(p["median_ratio"]) for p in pts]
    finite = [(xi, yi) for xi, yi in zip(x, y) if math.isfinite(yi)]
    if finite:
        ax.plot(*zip(*finite), **style)
    inf = [xi for xi, yi in zip(x, y) if math.isinf(yi)]
    if inf:  # at the top edge of the panel (x in data, y in axes units)
        ax.plot(inf, [0.96] * len(inf), marker="^", color=style["color"], mfc="white", ls="none", ms=8,
                transform=ax.get_xaxis_transform())
    band = [(xi, value(p["q25"]), value(p["q75"])) for xi, p in zip(x, pts)
            if math.isfinite(value(p["q25"])) and math.isfinite(value(p["q75"]))]
    if len(band) > 1:
        bx, b_lo, b_hi = zip(*band)
        ax.fill_between(bx, b_lo, b_hi, color=style["color"], alpha=0.12, lw=0)
    ax.set_yscale("log")
    ax.set_ymargin(0.15)  # finite points stay under the top edge's infinite markers
    ax.yaxis.set_major_formatter(_PLAIN)  # 1.3, not 1.3 x 10^0, on a short log range
    # minor ticks labelled only on a range under a decade (else they crowd: 0.6 0.7 0.8 0.9 ...)
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if _decades(ax) < 1 else ""))
    ax.axhline(1.0, color="0.6", lw=0.8, ls=":")


def _decades(ax) -> float:
    lo, hi = sorted(ax.get_ylim())
    return math.log10(hi / lo) if lo > 0 else math.inf


def median_figure(a: dict, campaign: str) -> tuple[Figure, str]:
    """Median perplexity ratio against the level, the 25-75% band where finite."""
    return _draw(a, campaign, _median, "perplexity ratio (x, log; median over trials)",
                 "the median perplexity ratio (perturbed / baseline) against the level with the 25-75% band where "
                 "finite; an open triangle at the top marks an infinite median")


_KINDS = (("failure_rate", failure_figure), ("median_ratio", median_figure))
FIGURE_CAMPAIGN = {f"{c}_{kind}": c for c in CAMPAIGNS for kind, _ in _KINDS}  # figure name -> its campaign
CAMPAIGN_FIGURES: dict[str, Callable[[dict], tuple[Figure, str]]] = {
    f"{c}_{kind}": partial(fn, campaign=c) for c in CAMPAIGNS for kind, fn in _KINDS}


def campaign_figures_for(a: dict) -> list[str]:
    """The names of :data:`CAMPAIGN_FIGURES` that ``a`` has data for (none without campaign data)."""
    present = {r["campaign"] for r in (a.get("campaign") or {}).get("summary", [])}
    return [name for name, c in FIGURE_CAMPAIGN.items() if c in present]
