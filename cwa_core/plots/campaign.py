"""The campaign figures of one cell (issue 17): failure rate against level per arm, the ratio
distributions per arm and level, and the median ratio against level per arm.

Each is drawn from the cell's campaign dict (the content of ``campaign_results.json``): its
``summary`` and ``headline`` as :func:`cwa_core.campaign_stats.summarize` wrote them (computed
from ``trials`` and ``settings`` when absent), its ``trials`` for the ratio distributions. The
data functions :func:`failure_curves`, :func:`level_curves` and :func:`ratio_groups` return what
the figures draw. Part of :mod:`cwa_core.plots`; see its docstring for the shared conventions.
"""
from __future__ import annotations

import math
import textwrap
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import patheffects
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter, NullFormatter, PercentFormatter
from matplotlib.transforms import offset_copy

from .. import schema
from ..campaign_stats import summarize, trial_ratio
from . import style
from .style import (
    _OKABE_ITO, INF_HATCH as _INF_HATCH, INF_LABEL, NAN_LABEL, _center_message, _figure, _fmt, _note_below, _seeds_caption, _sorted_seeds,
)

CAMPAIGN_TITLES = {"bit_errors": "Bit errors", "quantize": "RTN quantization", "prune": "Pruning"}
LEVEL_LABELS = {"error_rate": "bit error rate (per stored bit)", "quant_bits": "quantization bits per weight",
                "sparsity": "sparsity (fraction of weights zeroed)"}


@dataclass(frozen=True)
class _Campaign:
    """A campaign dict read once: its names, arms in drawing order, summary and trial rows."""

    data: Mapping[str, Any]
    level_name: str
    harsher: int
    arms: list[str]
    summary: list[Mapping[str, Any]]
    trials: list[Mapping[str, Any]]
    headline: Mapping[str, Any]

    @property
    def settings(self) -> Mapping[str, Any]:
        return self.data.get("settings") or {}

    @property
    def levels(self) -> list[float]:
        return sorted({float(s["level"]) for s in self.summary})


def _read(campaign: Mapping[str, Any] | None, who: str) -> _Campaign:
    if not campaign or not (campaign.get("summary") or campaign.get("trials")):
        raise ValueError(f"{who}: the campaign has neither summary nor trials to draw")
    level_name, harsher = campaign.get("level_name"), campaign.get("harsher")
    if level_name not in LEVEL_LABELS or harsher not in (1, -1):
        raise ValueError(f"{who}: level_name must be one of {', '.join(LEVEL_LABELS)} and harsher +1 or -1, "
                         f"got {level_name!r} and {harsher!r}")
    trials = list(campaign.get("trials") or [])
    names = {s["arm"] for s in campaign.get("summary") or []} | {r["arm"] for r in trials}
    arms = [a for a in schema.ARM_KINDS if a in names] + sorted(names.difference(schema.ARM_KINDS))
    stats = {k: campaign.get(k) for k in ("summary", "headline")}
    if not stats["summary"]:
        settings = campaign.get("settings") or {}
        stats = summarize(trials, fail_ratio=float(settings.get("fail_ratio", 2.0)), level_name=level_name,
                          harsher=harsher, arms=arms)
    return _Campaign(campaign, level_name, harsher, arms, list(stats["summary"]), trials, stats["headline"] or {})


def _curve(c: _Campaign, arm: str, keys: Sequence[str]) -> dict[str, np.ndarray]:
    entries = sorted((s for s in c.summary if s["arm"] == arm), key=lambda s: float(s["level"]))
    out = {"levels": np.array([float(s["level"]) for s in entries])}
    for k in keys:
        out[k] = np.array([schema.number(s.get(k)) for s in entries], dtype=np.float64)
    return out


def failure_curves(campaign: Mapping[str, Any]) -> dict[str, dict[str, np.ndarray]]:
    """Per arm (drawing order): levels ascending and the failure rate, Wilson lo/hi and n drawn."""
    c = _read(campaign, "failure_curves")
    return {a: _curve(c, a, ("failure_rate", "failure_lo", "failure_hi", "n")) for a in c.arms}


def level_curves(campaign: Mapping[str, Any]) -> dict[str, dict[str, np.ndarray]]:
    """Per arm (drawing order): levels ascending and the median ratio with its 25% and 75% quantiles."""
    c = _read(campaign, "level_curves")
    return {a: _curve(c, a, ("median_ratio", "q25", "q75", "nonfinite", "n")) for a in c.arms}


def ratio_groups(campaign: Mapping[str, Any]) -> dict[tuple[str, float], np.ndarray]:
    """(arm, level) -> every trial's perplexity ratio (inf and NaN kept), arms in drawing order,
    levels ascending."""
    return _ratio_groups(_read(campaign, "ratio_groups"))


def _ratio_groups(c: _Campaign) -> dict[tuple[str, float], np.ndarray]:
    groups: dict[tuple[str, float], list[float]] = {}
    for r in c.trials:
        groups.setdefault((r["arm"], float(r["level"])), []).append(trial_ratio(r))
    order = sorted(groups, key=lambda k: (c.arms.index(k[0]), k[1]))
    return {k: np.array(groups[k], dtype=np.float64) for k in order}


# ----------------------------------------------------------------------------- shared pieces


def _label(arm: str) -> str:
    return schema.ARM_LABELS.get(arm, arm)


def _color(arm: str) -> str:
    return schema.ARM_COLORS.get(arm, _OKABE_ITO["sky_blue"])


def _marker(arm: str) -> str:
    return schema.ARM_MARKERS.get(arm, "P")


def _level_text(level_name: str, v: float) -> str:
    """A level as a tick label: error rates as 1e-7, 2.5e-6, 1.2e-4; bits and sparsity as 4, 0.5."""
    if level_name != "error_rate" or not 0 < v < math.inf:
        return f"{v:.3g}"
    mantissa, exponent = f"{v:.2e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def _subtitle(c: _Campaign) -> str:
    """What a trial is: the failure rule, the protected sets' K, the intervention's options, the seeds."""
    st = c.settings
    extra = {"bit_errors": f"bits: {st.get('bits', 'all')}", "quantize": f"group: {st.get('quant_group', '?')}",
             "prune": f"group: {st.get('prune_group', '?')}"}.get(c.data.get("campaign"), "")
    seeds = _sorted_seeds({r["seed"] for r in c.trials}) or list(st.get("seeds") or [])
    per = max(Counter((r["arm"], float(r["level"]), r["seed"]) for r in c.trials).values(), default=0)
    fail = schema.number(st.get("fail_ratio", 2.0))
    parts = [f"K = {st.get('topk', '?')} ({st.get('metric', '?')}, {st.get('mode', '?')})", extra,
             f"{_seeds_caption(seeds, len(seeds))}" + (f", {per} trials each" if per > 1 else "") if seeds else ""]
    return f"failure: perplexity ratio > {fail:g} or non-finite\n" + "; ".join(p for p in parts if p)


def _title(c: _Campaign, what: str) -> str:
    return f"{CAMPAIGN_TITLES.get(c.data.get('campaign'), c.data.get('campaign', 'campaign'))}: {what}"


def _level_axis(ax: Any, c: _Campaign, levels: Sequence[float]) -> None:
    """x axis of a level: log for error rates, bits reversed so that harsher always lies right."""
    lo, hi = min(levels), max(levels)
    if c.level_name == "error_rate":
        ax.set_xscale("log")
        pad = max((hi / lo) ** 0.06, 1.6)
        ax.set_xlim(lo / pad, hi * pad)
    else:
        pad = 0.06 * (hi - lo) or (0.5 if c.level_name == "quant_bits" else 0.05)
        ax.set_xlim(lo - pad, hi + pad)
    ax.set_xticks(list(levels))
    ax.set_xticklabels([_level_text(c.level_name, v) for v in levels])
    ax.minorticks_off()
    if c.harsher < 0:
        ax.invert_xaxis()
    scale = ", log scale" if c.level_name == "error_rate" else ""
    ax.set_xlabel(f"{LEVEL_LABELS[c.level_name]}{scale}   (harsher \u2192)")


def _drawable_levels(c: _Campaign) -> tuple[list[float], str]:
    """The levels an x axis can show, and a note on the ones it cannot (error rate 0 on a log axis)."""
    if c.level_name != "error_rate":
        return c.levels, ""
    dropped = [v for v in c.levels if v <= 0]
    note = f"error rate {', '.join(f'{v:g}' for v in dropped)} not drawn (log axis)" if dropped else ""
    return [v for v in c.levels if v > 0], note


def _legend(ax: Any, handles: list[Any], x: float = 1.01) -> None:
    """The legend right of the axes (``x`` in axes fractions: past a right-hand axis when there is one)."""
    ax.legend(handles=handles, frameon=True, framealpha=0.9, edgecolor="none", loc="upper left",
              bbox_to_anchor=(x, 1.0))


def _headline_note(c: _Campaign, width: int = 110) -> str:
    """The headline in words (wrapped), or why there is none."""
    h = c.headline
    if not h:
        return ""
    text = h.get("text") if h.get("available") else f"headline not available: {h.get('why', '?')}"
    return textwrap.fill(str(text), width)


def _ratio_axis(ax: Any, values: np.ndarray, fail_ratio: float) -> float:
    """Log ratio axis holding ``values`` (inf and NaN ignored), the baseline and the failure threshold;
    with an inf among them a hatched band on top labelled "inf (overflow)". Returns the y at which
    an inf is drawn."""
    fin = values[np.isfinite(values) & (values > 0)]
    bottom = (min(float(fin.min()), 1.0) if fin.size else 1.0) / 1.4
    top = max(float(fin.max()) if fin.size else 1.0, fail_ratio) * 1.6
    ax.set_yscale("log")
    y_inf = top * 1.4  # the inf markers low in the band, its label above them
    if np.isposinf(values).any():
        ax.axhspan(top, top * 3.0, facecolor="0.93", edgecolor="0.6", hatch=_INF_HATCH, linewidth=0, zorder=0)
        ax.text(0.01, top * 2.35, INF_LABEL, transform=ax.get_yaxis_transform(), ha="left", va="center", fontsize=9,
                zorder=6, bbox={"boxstyle": "round,pad=0.2", "facecolor": "white", "edgecolor": "none"})
        top *= 3.0
    ax.set_ylim(bottom, top)
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain if top / bottom <= 20 else NullFormatter())  # no 6x10^0
    ax.axhline(1.0, color="0.25", linestyle=":", linewidth=1.2, zorder=1)
    ax.axhline(fail_ratio, color="0.35", linestyle="--", linewidth=1.2, zorder=1)
    ax.set_ylabel("perplexity ratio (perturbed / baseline, log scale)")
    ax.grid(True, axis="y", which="major", alpha=0.3, zorder=0)
    return y_inf


def _ratio_handles(fail_ratio: float, inf_label: str | None) -> list[Any]:
    """Legend entries of :func:`_ratio_axis`'s lines, and of its inf band when ``inf_label`` is given."""
    handles = [Line2D([], [], color="0.25", linestyle=":", label="baseline (ratio 1)"),
               Line2D([], [], color="0.35", linestyle="--", label=f"failure threshold (ratio {fail_ratio:g})")]
    if inf_label:
        handles.append(Patch(facecolor="0.93", edgecolor="0.6", hatch=_INF_HATCH, label=inf_label))
    return handles


def _fail_ratio(c: _Campaign) -> float:
    return float(schema.number(c.settings.get("fail_ratio", 2.0)))


def plot_campaign_failure_rate(campaign: Mapping[str, Any], path: str | Path) -> Path:
    """Failure rate against level, one line per arm with its Wilson interval as error bars (arms set
    a few points apart so that the bars do not hide each other), the headline's target failure rate
    dashed and the tolerated levels it found marked on it; error rates on a log axis, bits reversed
    (harsher to the right). The headline's text goes under the axes."""
    c = _read(campaign, "plot_campaign_failure_rate")
    curves = {a: _curve(c, a, ("failure_rate", "failure_lo", "failure_hi")) for a in c.arms}
    levels, note = _drawable_levels(c)
    h = c.headline
    target = float(h.get("target", 0.5))
    with _figure(figsize=(8.0, 4.8)) as (fig, ax):
        for i, arm in enumerate(c.arms):
            cur = curves[arm]
            keep = np.isin(cur["levels"], levels)
            x, y = cur["levels"][keep], cur["failure_rate"][keep]
            err = [y - cur["failure_lo"][keep], cur["failure_hi"][keep] - y]
            shift = offset_copy(ax.transData, fig=fig, x=(i - (len(c.arms) - 1) / 2) * 3.5, units="points")
            ax.errorbar(x, y, yerr=err, transform=shift, color=_color(arm), marker=_marker(arm), markersize=6,
                        linewidth=1.6, capsize=3, label=_label(arm), gid=f"failure:{arm}", zorder=3)
        ax.axhline(target, color="0.35", linestyle="--", linewidth=1.2, zorder=1,
                   label=f"target failure rate {target:.0%}")
        for arm, tol in (h.get("tolerated") or {}).items():
            if tol.get("level") is not None and levels and min(levels) <= tol["level"] <= max(levels):
                ax.plot([tol["level"]], [target], marker="|", markersize=18, markeredgewidth=2.5,
                        color=_color(arm), zorder=4, label=f"tolerated level of {_label(arm)}")
        ax.set_ylim(-0.04, 1.04)
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        conf = float(h.get("confidence", 0.95))
        ax.set_ylabel(f"trials that failed ({conf:.0%} Wilson interval)")
        if levels:
            _level_axis(ax, c, levels)
        ax.grid(True, axis="y", alpha=0.3, zorder=0)
        handles, labels = ax.get_legend_handles_labels()
        arms_first = sorted(range(len(labels)), key=lambda i: labels[i] not in {_label(a) for a in c.arms})
        _legend(ax, [handles[i] for i in arms_first])
        notes = [n for n in (note, _headline_note(c)) if n]
        if notes:
            _note_below(ax, "\n".join(notes))
        ax.set_title(f"{_title(c, 'failure rate per protected set')}\n{_subtitle(c)}")
        return style._save(fig, path)


def _draw_group(ax: Any, x: float, w: float, r: np.ndarray, s: Mapping[str, Any], arm: str, y_inf: float,
                rng: np.random.Generator) -> None:
    """One arm at one level: its 25-75% box with the median, 5-95% whiskers, every trial as a dot
    (inf ones as triangles in the inf band), its NaN trials counted under it."""
    clip = (lambda v: y_inf if v == math.inf else v)
    q = {k: clip(schema.number(s.get(k))) for k in ("q05", "q25", "median_ratio", "q75", "q95")}
    color = _color(arm)
    if not math.isnan(q["median_ratio"]):
        ax.vlines(x, q["q05"], q["q95"], color=color, linewidth=1.2, zorder=2)
        ax.bar(x, q["q75"] - q["q25"], bottom=q["q25"], width=w * 0.8, color=color, alpha=0.3,
               edgecolor=color, linewidth=1.2, zorder=2, gid=f"box:{arm}:{s['level']}")
        ax.hlines(q["median_ratio"], x - w * 0.4, x + w * 0.4, color="black", linewidth=2.0, zorder=4,
                  path_effects=[patheffects.withStroke(linewidth=3.5, foreground="white")])
    fin, n_inf, n_nan = r[np.isfinite(r)], int(np.isposinf(r).sum()), int(np.isnan(r).sum())
    ax.scatter(x + rng.uniform(-w * 0.3, w * 0.3, fin.size), fin, s=9, color=color, alpha=0.6,
               linewidth=0, zorder=3)
    if n_inf:
        ax.scatter(x + rng.uniform(-w * 0.3, w * 0.3, n_inf), np.full(n_inf, y_inf), marker="^", s=28,
                   facecolor="white", edgecolor=color, linewidth=1.0, zorder=5)
    if n_nan:
        ax.annotate(f"{NAN_LABEL} x{n_nan}", xy=(x, 0), xycoords=("data", "axes fraction"), xytext=(0, 3),
                    textcoords="offset points", ha="center", va="bottom", rotation=90, fontsize=8,
                    color=color, fontweight="bold", zorder=6,
                    bbox={"boxstyle": "round,pad=0.15", "facecolor": "white", "edgecolor": "none", "alpha": 0.85})


def plot_campaign_ratios(campaign: Mapping[str, Any], path: str | Path) -> Path:
    """Every trial's perplexity ratio per level (groups, harsher to the right) and arm (colours) on a
    log axis: a box from the 25% to the 75% quantile with the median, whiskers 5-95% (the summary's
    quantiles), every trial a dot; inf ratios as triangles in a hatched band at the top, NaN ones
    counted under their arm ("NaN x2") and in the legend."""
    c = _read(campaign, "plot_campaign_ratios")
    groups = _ratio_groups(c)
    entries = {(s["arm"], float(s["level"])): s for s in c.summary}
    levels = c.levels if c.harsher > 0 else c.levels[::-1]
    allr = np.concatenate(list(groups.values())) if groups else np.array([])
    fail = _fail_ratio(c)
    rng = np.random.default_rng(0)  # deterministic jitter
    w = 0.8 / len(c.arms)
    with _figure(figsize=(max(7.0, 1.0 + len(levels) * (0.35 * len(c.arms) + 0.5)), 5.0)) as (fig, ax):
        y_inf = _ratio_axis(ax, allr, fail)
        for j, lv in enumerate(levels):
            for i, arm in enumerate(c.arms):
                if (arm, lv) in entries:
                    _draw_group(ax, j + (i - (len(c.arms) - 1) / 2) * w, w, groups.get((arm, lv), np.array([])),
                                entries[(arm, lv)], arm, y_inf, rng)
            if j:
                ax.axvline(j - 0.5, color="0.85", linewidth=0.8, zorder=0)
        ax.set_xticks(range(len(levels)))
        ax.set_xticklabels([_level_text(c.level_name, v) for v in levels])
        ax.set_xlim(-0.5, len(levels) - 0.5)
        ax.set_xlabel(f"{LEVEL_LABELS[c.level_name]}   (harsher \u2192)")
        nan_by_arm = {a: sum(int(np.isnan(v).sum()) for (b, _), v in groups.items() if b == a) for a in c.arms}
        handles = [Patch(facecolor=_color(a), alpha=0.5, edgecolor=_color(a),
                         label=_label(a) + (f" ({nan_by_arm[a]} {NAN_LABEL})" if nan_by_arm[a] else ""))
                   for a in c.arms]
        handles += [Line2D([], [], color="black", linewidth=2, label="median; box 25-75%, whiskers 5-95%")]
        if np.isposinf(allr).any():
            handles.append(Line2D([], [], marker="^", linestyle="none", markerfacecolor="white",
                                  markeredgecolor="black", label=f"{INF_LABEL}: one trial"))
        _legend(ax, handles + _ratio_handles(fail, "inf band" if np.isposinf(allr).any() else None))
        ax.set_title(f"{_title(c, 'perplexity ratio of every trial')}\n{_subtitle(c)}")
        return style._save(fig, path)


def _draw_level_curve(ax: Any, c: _Campaign, arm: str, cur: Mapping[str, np.ndarray], levels: Sequence[float],
                      y_inf: float) -> str:
    """One arm's median line and 25-75% band (inf drawn at ``y_inf``); returns a note naming the
    levels where every trial was NaN (nothing to draw there), or ""."""
    shown = np.isin(cur["levels"], levels)
    keep = shown & ~np.isnan(cur["median_ratio"])
    x = cur["levels"][keep]
    m, lo, hi = (np.where(np.isposinf(cur[k][keep]), y_inf, cur[k][keep]) for k in ("median_ratio", "q25", "q75"))
    ax.plot(x, m, color=_color(arm), marker=_marker(arm), markersize=6, linewidth=1.8, label=_label(arm),
            gid=f"median:{arm}", zorder=3)
    if x.size > 1:
        ax.fill_between(x, lo, hi, color=_color(arm), alpha=0.15, linewidth=0, zorder=2)
    elif x.size:
        ax.errorbar(x, m, yerr=[m - lo, hi - m], color=_color(arm), capsize=4, linewidth=1.2, zorder=2)
    nan = cur["levels"][shown & np.isnan(cur["median_ratio"])]
    if not nan.size:
        return ""
    where = "every level" if nan.size == shown.sum() else ", ".join(_level_text(c.level_name, v) for v in nan)
    return f"{_label(arm)} at {where}"


def plot_campaign_levels(campaign: Mapping[str, Any], path: str | Path) -> Path:
    """Median perplexity ratio against level per arm with its 25-75% band (error bars when there is
    one level), a perplexity axis on the right when the baseline is known; inf medians or quantiles
    drawn in the hatched inf band, a level where every trial was NaN left out and noted."""
    c = _read(campaign, "plot_campaign_levels")
    curves = {a: _curve(c, a, ("median_ratio", "q25", "q75")) for a in c.arms}
    levels, note = _drawable_levels(c)
    fail = _fail_ratio(c)
    allv = np.concatenate([np.concatenate([v["median_ratio"], v["q25"], v["q75"]]) for v in curves.values()])
    base = schema.number(c.data.get("baseline_ppl"))
    with _figure(figsize=(8.0, 4.8)) as (fig, ax):
        y_inf = _ratio_axis(ax, allv, fail)
        nan_notes = [n for n in (_draw_level_curve(ax, c, a, curves[a], levels, y_inf) for a in c.arms) if n]
        if not np.any(~np.isnan(allv)):
            _center_message(ax, f"no ratio to draw: every trial {NAN_LABEL}")
        if math.isfinite(base) and base > 0:
            sec = ax.secondary_yaxis("right", functions=(lambda r: r * base, lambda p: p / base))
            sec.set_ylabel(f"perplexity (baseline {_fmt(base)})")
            sec.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            sec.yaxis.set_minor_formatter(NullFormatter())
        if levels:
            _level_axis(ax, c, levels)
        _legend(ax, [*ax.get_legend_handles_labels()[0], Patch(facecolor="0.6", alpha=0.3, label="25-75% of trials"),
                     *_ratio_handles(fail, f"{INF_LABEL}: median or quantile" if np.isposinf(allv).any() else None)],
                x=1.13 if math.isfinite(base) and base > 0 else 1.01)
        nan_note = textwrap.fill(f"every trial {NAN_LABEL} (not drawn): " + "; ".join(nan_notes), 110) if nan_notes else ""
        notes = [n for n in (note, nan_note) if n]
        if notes:
            _note_below(ax, "\n".join(notes))
        ax.set_title(f"{_title(c, 'median perplexity ratio per protected set')}\n{_subtitle(c)}")
        return style._save(fig, path)
