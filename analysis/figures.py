"""Figures of a cross-model analysis, drawn from the analysis dict alone (so the report can
redraw them from a saved JSON). Readable in grayscale: series differ by marker, line style
or hatch as well as colour; every axis names its unit. Degenerate data (one model, one seed,
one K, infinite ratios, nothing at all) draws what there is and says what is missing.

Each figure function returns ``(Figure, caption)``; :data:`FIGURES` lists them in report order,
Phase 2's (:mod:`analysis.campaign_figures`) last; :func:`figures_for` names those an analysis draws.
Matplotlib's object API is used (no pyplot): no global backend or figure state.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import numpy as np
from matplotlib.figure import Figure

from cwa_core.schema import PARAM_TYPES, SELECTION_COLORS, SELECTION_KINDS
from cwa_core.schema import SELECTION_MARKERS as MARKERS

from .campaign_figures import CAMPAIGN_FIGURES, campaign_figures_for
from .common import value
from .hypotheses import JACCARD_BARS

LINES = ["-", "--", ":", "-."]
SERIES_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]
GRAYS = ["0.0", "0.35", "0.6", "0.8"]
INF_NOTE = "an upward triangle at the top edge marks an infinite ratio"


def _cells_phrase(cells) -> str:
    cells = sorted(set(cells))
    if not cells:
        return "no cells"
    if len(cells) <= 4:
        return "cells " + ", ".join(cells)
    return f"{len(cells)} cells ({', '.join(cells[:3])}, ...; see cells.parquet)"


def _empty(ax, why: str) -> None:
    ax.text(0.5, 0.5, why, ha="center", va="center", wrap=True, fontsize=9, transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def _grid(n: int, w: float = 4.2, h: float = 3.4) -> tuple[Figure, list]:
    n = max(n, 1)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(w * cols, h * rows + 0.4), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _multi_protocol(a: dict) -> bool:
    return len(a.get("protocols", [])) > 1


def _k_axis(ax, ks) -> None:
    """A log K axis labelled at the measured K as plain numbers (no 3x10^1 clutter)."""
    from matplotlib.ticker import NullFormatter, NullLocator

    ks = sorted({int(k) for k in ks})
    ax.set_xscale("log")
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xticks(ks, [f"{k:,}" for k in ks])
    if len(ks) == 1:
        ax.set_xlim(ks[0] / 2, ks[0] * 2)


def _legend_outside(ax, **kw) -> None:
    """The legend to the right of the axes: it never hides a point."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, borderaxespad=0.0, **kw)


# --------------------------------------------------------------------------- figures

def ratios_figure(a: dict) -> tuple[Figure, str]:
    """Geometric-mean perplexity ratio by selection with its interval (t on log ratios over
    seeds, or the evaluation windows' bootstrap where seeds carry no spread), one panel per model."""
    rows = a.get("ratios", [])
    models = sorted({r["model_name"] for r in rows})
    fig, axes = _grid(len(models), w=5.0)
    notes = []
    if not rows:
        _empty(axes[0], "no perturbation results")
        return fig, "No perturbation results were found, so no perplexity ratios are drawn."
    for ax, model in zip(axes, models):
        mine = [r for r in rows if r["model_name"] == model]
        groups = sorted({(r["protocol"], r["metric"], r["k"], r["mode"], r["perturbation"], r["variant"]) for r in mine},
                        key=lambda g: (g[0], g[1], g[3], g[4], g[2], g[5]))
        finite_hi = max([value(r["ci"][1]) if r["ci"][1] is not None and math.isfinite(value(r["ci"][1]))
                         else value(r["geomean"]) for r in mine if math.isfinite(value(r["geomean"]))] + [2.0])
        top = finite_hi * 3
        for gi, g in enumerate(groups):
            for si, sel in enumerate(SELECTION_KINDS):
                r = next((r for r in mine if (r["protocol"], r["metric"], r["k"], r["mode"], r["perturbation"],
                                              r["variant"]) == g and r["selection"] == sel), None)
                if r is None or r["geomean"] is None:
                    continue
                x, m = gi + (si - 1) * 0.22, value(r["geomean"])
                if math.isinf(m):
                    ax.plot([x], [top], marker="^", ms=9, color=SELECTION_COLORS[sel], mfc="white", ls="none")
                    ax.annotate("inf", (x, top), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7)
                    notes.append("inf")
                    continue
                lo, hi = value(r["ci"][0]), value(r["ci"][1])
                err = None
                if not math.isnan(lo) and math.isfinite(hi):
                    err = [[max(m - lo, 0.0)], [max(hi - m, 0.0)]]
                elif r["n_seeds"] == 1:
                    notes.append("one seed")
                if r.get("interval_code") == "windows":
                    notes.append("windows")
                ax.errorbar([x], [m], yerr=err, marker=MARKERS[sel], color=SELECTION_COLORS[sel], capsize=3, ls="none",
                            ms=6, label=sel if gi == 0 else None)
        ax.set_yscale("log")
        ax.axhline(1.0, color="0.5", lw=0.8, ls=":")
        ax.set_xticks(range(len(groups)))
        many_p = len({x[4] for x in groups}) > 1
        ax.set_xticklabels([f"{g[1]} K={g[2]} {g[3]}" + (f" {g[4]}" if many_p else "") + (f" [{g[0]}]" if _multi_protocol(a)
                            else "") for g in groups], fontsize=6.5, rotation=35, ha="right")
        ax.set_ylabel("perplexity ratio (perturbed / baseline, x, log;\ngeometric mean over seeds)")
        ax.set_title(model, fontsize=10)
        lo, hi = ax.get_ylim()
        ax.set_ylim(lo, max(hi, top * 4))  # room above the highest point (and the inf markers)
    _legend_outside(axes[len(models) - 1], fontsize=7)
    missing = []
    if "one seed" in notes:
        missing.append("points without bars have one seed (no interval)")
    if "windows" in notes:
        missing.append("where every seed gives the same ratio the bar is the evaluation windows' bootstrap")
    if "inf" in notes:
        missing.append(INF_NOTE)
    cap = (f"Geometric-mean perplexity ratio of top-K, random-K and bottom-K perturbation with "
           f"{a['options']['compare']['level']:.0%} t intervals on log ratios over seeds, one panel per model "
           f"({'; '.join(missing) + '; ' if missing else ''}"
           f"from {_cells_phrase(c for r in rows for c in r['cells'])}).")
    return fig, cap


def dose_figure(a: dict) -> tuple[Figure, str]:
    """Damage against K on log-log axes, one panel per metric and mode, controls included."""
    dr = a.get("dose_response", [])
    panels = sorted({(d["metric"], d["mode"]) for d in dr})
    fig, axes = _grid(len(panels))
    thr = a["options"]["compare"]["threshold"]
    if not dr:
        _empty(axes[0], "no perturbation results")
        return fig, "No perturbation results were found, so no dose-response curve is drawn."
    single = False
    for ax, (metric, mode) in zip(axes, panels):
        mine = [d for d in dr if d["metric"] == metric and d["mode"] == mode]
        models = sorted({d["model_name"] for d in mine})
        ymax = 1.0
        for d in mine:
            ls = LINES[models.index(d["model_name"]) % len(LINES)]
            single |= d["n_k"] == 1
            for sel in SELECTION_KINDS:
                pts = [(p["k"], value(p[sel]["geomean"])) for p in d["points"] if sel in p and p[sel]["geomean"] is not None]
                if not pts:
                    continue
                ks, ys = zip(*pts)
                fin = [(k, y) for k, y in pts if math.isfinite(y)]
                if fin:
                    ymax = max(ymax, max(y for _, y in fin))
                    ax.plot(*zip(*fin), ls=ls, marker=MARKERS[sel], color=SELECTION_COLORS[sel], ms=5,
                            label=f"{d['model_name']} {sel}" + (f" ({d['perturbation']})" if len(mine) > len(models) else ""))
                for k, y in pts:
                    if math.isinf(y):
                        ax.plot([k], [ymax * 3], marker="^", color=SELECTION_COLORS[sel], mfc="white", ls="none", ms=8)
            ck = d["critical"]["critical_k"]
            if ck is not None:
                ax.axvline(ck, color="0.3", ls=ls, lw=0.8)
        ax.axhline(thr, color="0.4", lw=0.8, ls=":")
        ax.text(0.01, thr, f" {thr:g}x", transform=ax.get_yaxis_transform(), fontsize=7, va="bottom")
        _k_axis(ax, [p["k"] for d in mine for p in d["points"]])
        ax.set_yscale("log")
        ax.set_xlabel("K (weights per tensor)" if mode == "per_layer" else "K (weights, whole model)")
        ax.set_ylabel("perplexity ratio (x, geometric mean over seeds)")
        ax.set_title(f"{metric}, {mode}", fontsize=10)
        _legend_outside(ax, fontsize=6)
    extra = "; a panel with one K shows points only, not a curve" if single else ""
    cap = (f"Perplexity ratio against K on log-log axes per metric (line style: model; marker: selection), with the "
           f"{thr:g}x threshold (dotted) and each interpolated critical K (vertical line){extra} "
           f"(from {_cells_phrase(c for d in dr for c in d['cells'])}).")
    return fig, cap


def layer_profile_figure(a: dict) -> tuple[Figure, str]:
    """Mean score per weight by relative depth, relative to the model's mean; one line per model."""
    prof = [p for p in a.get("sensitivity_profile", []) if p["axis"] == "depth" and p["bin"] is not None and p["bin"] >= 0]
    metrics = sorted({p["metric"] for p in prof})
    fig, axes = _grid(len(metrics))
    if not prof:
        _empty(axes[0], "no per-tensor statistics (sensitivity_stats.json)")
        return fig, "No per-tensor score statistics were found, so no layer profile is drawn."
    bins = a["options"]["weights"]["depth_bins"]
    for ax, metric in zip(axes, metrics):
        keys = sorted({(p["model_name"], p["protocol"]) for p in prof if p["metric"] == metric})
        for i, (model, proto) in enumerate(keys):
            pts = sorted(((p["bin"] + 0.5) / bins, value(p["relative"])) for p in prof
                         if p["metric"] == metric and p["model_name"] == model and p["protocol"] == proto)
            ax.plot(*zip(*pts), ls=LINES[i % len(LINES)], marker=SERIES_MARKERS[i % len(SERIES_MARKERS)], ms=4,
                    color=GRAYS[i % len(GRAYS)], label=model + (f" [{proto}]" if _multi_protocol(a) else ""))
        ax.axhline(1.0, color="0.6", lw=0.8, ls=":")
        ax.set_xlim(0, 1)
        ax.set_xlabel("relative depth (layer / n_layers)")
        ax.set_ylabel("mean score per weight / model mean (x)")
        ax.set_title(metric, fontsize=10)
        ax.legend(fontsize=7)
    cells = {c for p in prof for c in p["cells"]}
    return fig, (f"Sensitivity by relative depth ({bins} bins, so models of different depth line up): each bin's mean "
                 f"score per weight over the model's mean, one line per model, one panel per metric "
                 f"(from {_cells_phrase(cells)}).")


def param_type_figure(a: dict) -> tuple[Figure, str]:
    """Parameter type by model heatmap: top-K enrichment (global mode) or relative mean score."""
    shares = [s for s in a.get("location", {}).get("shares", []) if s["axis"] == "param_type"
              and s["mode"] == "global" and s["enrichment"] is not None]
    if shares:
        ks = sorted({s["k"] for s in shares})
        k = ks[len(ks) // 2]
        rows = [s for s in shares if s["k"] == k]
        what, val = f"top-K enrichment (share of top-{k} / share of weights, global mode)", "enrichment"
    else:
        rows = [p for p in a.get("sensitivity_profile", []) if p["axis"] == "param_type"]
        what, val = "mean score per weight / model mean (all weights)", "relative"
    def row_key(r):  # one heat-map row per model, metric, protocol and variant: never two drawn on one
        return r["model_name"], r["metric"], r["protocol"], r["variant"]

    fig = Figure(figsize=(6.5, 1.2 + 0.45 * max(1, len({row_key(r) for r in rows}))), layout="constrained")
    ax = fig.subplots()
    if not rows:
        _empty(ax, "no top weights or statistics")
        return fig, "No top weights or score statistics were found, so no parameter-type map is drawn."
    ylabels = sorted({row_key(r) for r in rows})
    types = [t for t in PARAM_TYPES if any(r["category"] == t for r in rows)]
    types += sorted({r["category"] for r in rows} - set(types))
    m = np.full((len(ylabels), len(types)), np.nan)
    for r in rows:
        m[ylabels.index(row_key(r)), types.index(r["category"])] = value(r[val])
    im = ax.imshow(np.where(np.isfinite(m), m, np.nan), cmap="Greys", aspect="auto")
    fin = m[np.isfinite(m)]
    mid = (fin.max() + fin.min()) / 2 if fin.size else 0
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            ax.text(j, i, "n/a" if np.isnan(m[i, j]) else f"{m[i, j]:.2f}", ha="center", va="center", fontsize=8,
                    color="white" if np.isfinite(m[i, j]) and m[i, j] > mid else "black")
    ax.set_xticks(range(len(types)), types)
    many_p, many_v = (len({y[i] for y in ylabels}) > 1 for i in (2, 3))
    ax.set_yticks(range(len(ylabels)), [f"{mo} / {me}" + (f" [{p}]" if many_p else "") + (f" ({v})" if many_v else "")
                                        for mo, me, p, v in ylabels], fontsize=8)
    ax.set_xlabel("parameter type")
    fig.colorbar(im, ax=ax, label=f"{val} (x)")
    cells = {c for r in rows for c in r["cells"]}
    return fig, f"By parameter type and model: {what}, numbers printed in each cell (from {_cells_phrase(cells)})."


def agreement_figure(a: dict) -> tuple[Figure, str]:
    """Spearman between metrics on the shared weight sample, one matrix per model."""
    sp = a.get("metric_agreement", {}).get("spearman", [])
    models = sorted({(s["model_name"], s["protocol"]) for s in sp})
    fig, axes = _grid(len(models), w=3.8, h=3.4)
    if not sp:
        _empty(axes[0], "fewer than two metrics with a shared weight sample (score_sample.parquet) on one model")
        return fig, ("No two metrics were scored on a shared weight sample of one model, so no agreement matrix is "
                     "drawn.")
    for ax, (model, proto) in zip(axes, models):
        mine = [s for s in sp if s["model_name"] == model and s["protocol"] == proto]
        mets = sorted({s["metric_a"] for s in mine} | {s["metric_b"] for s in mine})
        m = np.eye(len(mets))
        for s in mine:
            i, j = mets.index(s["metric_a"]), mets.index(s["metric_b"])
            m[i, j] = m[j, i] = value(s["rho"]["mean"])
        im = ax.imshow(m, cmap="Greys", vmin=-1, vmax=1)
        for i in range(len(mets)):
            for j in range(len(mets)):
                ax.text(j, i, "n/a" if np.isnan(m[i, j]) else f"{m[i, j]:.2f}", ha="center", va="center", fontsize=8,
                        color="white" if np.isfinite(m[i, j]) and m[i, j] > 0 else "black")
        ax.set_xticks(range(len(mets)), mets, rotation=30, fontsize=7)
        ax.set_yticks(range(len(mets)), mets, fontsize=7)
        ax.set_title(model + (f" [{proto}]" if _multi_protocol(a) else ""), fontsize=10)
    fig.colorbar(im, ax=axes, shrink=0.8, label="Spearman rank correlation (mean over seeds)")
    cells = {c for s in sp for c in s["cells"]}
    return fig, (f"Spearman rank correlation between metrics on the shared weight sample (mean over seeds; 1 on the "
                 f"diagonal), one matrix per model (from {_cells_phrase(cells)}).")


def stability_figure(a: dict) -> tuple[Figure, str]:
    """Jaccard of top-K sets across seeds against K, with the min-max spread over seed pairs."""
    st = [s for s in a.get("stability", []) if s["jaccard"]["mean"] is not None]
    models = sorted({s["model_name"] for s in st})
    fig, axes = _grid(len(models))
    if not st:
        _empty(axes[0], "no stability: every cell has one seed (or no top weights)")
        return fig, "No cell has two or more seeds, so no stability across seeds is drawn."
    indep = False
    for ax, model in zip(axes, models):
        series = sorted({(s["metric"], s["mode"], s["protocol"]) for s in st if s["model_name"] == model})
        for i, key in enumerate(series):
            pts = sorted((s["k"], s["jaccard"]["mean"], s["jaccard"]["min"], s["jaccard"]["max"], s["data_independent"])
                         for s in st if s["model_name"] == model and (s["metric"], s["mode"], s["protocol"]) == key)
            ks, mean, lo, hi, di = zip(*pts)
            indep |= any(di)
            err = [[m - l for m, l in zip(mean, lo)], [h - m for m, h in zip(mean, hi)]]
            ax.errorbar(ks, mean, yerr=err, ls=LINES[i % len(LINES)], marker=SERIES_MARKERS[i % len(SERIES_MARKERS)],
                        color=GRAYS[i % len(GRAYS)], mfc="white" if any(di) else None, capsize=3, ms=5,
                        label=f"{key[0]} ({key[1]})" + (" [by construction]" if any(di) else ""))
        ks_here = [s["k"] for s in st if s["model_name"] == model]
        bars = [(k, bar) for k, bar in JACCARD_BARS.items()
                if min(ks_here) <= k <= max(ks_here)]  # a bar outside the measured K would only stretch the axis
        if bars:
            ax.plot(*zip(*bars), marker="_", ms=14, mew=2, color="0.5", ls="none",
                    label=f"hypothesised bar ({', '.join(map(str, JACCARD_BARS.values()))} at K = "
                          f"{', '.join(map(str, JACCARD_BARS))})")
        _k_axis(ax, ks_here)
        ax.set_ylim(-0.02, 1.05)
        ax.set_xlabel("K (weights)")
        ax.set_ylabel("Jaccard of top-K sets across seeds (0-1)")
        ax.set_title(model, fontsize=10)
        _legend_outside(ax, fontsize=6)
    cells = {c for s in st for c in s["cells"]}
    note = "; hollow markers: data-independent metrics, 1.0 by construction" if indep else ""
    return fig, (f"Top-K stability across seeds: mean Jaccard over seed pairs against K with the min-max range, "
                 f"grey dashes at the hypothesised bars (0.8, 0.6, 0.4 at K = 100, 500, 1000){note} "
                 f"(from {_cells_phrase(cells)}).")


FIGURES: dict[str, Callable[[dict], tuple[Figure, str]]] = {
    "ratios_by_selection": ratios_figure,
    "dose_response": dose_figure,
    "layer_profile": layer_profile_figure,
    "param_type_by_model": param_type_figure,
    "metric_agreement": agreement_figure,
    "stability_vs_k": stability_figure,
    **CAMPAIGN_FIGURES,  # Phase 2: drawn only for an analysis with that campaign's data
}


def figures_for(a: dict) -> list[str]:
    """The names of :data:`FIGURES` that ``a`` is drawn with: every Phase 1 figure (they say what
    is missing), a Phase 2 figure only when ``a`` holds its campaign."""
    return [name for name in FIGURES if name not in CAMPAIGN_FIGURES] + campaign_figures_for(a)


#: The PNG text chunk that holds a saved figure's caption (:func:`saved_caption` reads it back).
CAPTION_KEY = "Description"


def save_figures(a: dict, folder: str | Path) -> list[Path]:
    """Every figure as PNG and PDF in ``folder``; returns the paths written. Each PNG carries
    its caption (:data:`CAPTION_KEY`): the report embeds it without drawing the figure again."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in figures_for(a):
        fig, caption = FIGURES[name](a)
        for ext in ("png", "pdf"):
            p = out / f"{name}.{ext}"
            fig.savefig(p, dpi=130, **({"metadata": {CAPTION_KEY: caption}} if ext == "png" else {}))
            fig.set_layout_engine("none")  # laid out once: the second format reuses it
            paths.append(p)
    return paths


def saved_caption(png: str | Path) -> str | None:
    """The caption :func:`save_figures` wrote into ``png``; None when it holds none (a PNG
    saved before captions were kept in it)."""
    from PIL import Image

    with Image.open(png) as im:
        return getattr(im, "text", {}).get(CAPTION_KEY)
