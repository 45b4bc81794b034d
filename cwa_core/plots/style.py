"""Shared house style of the experiment figures: palette, rc settings, the figure context
and the PNG writer, and the small formatting helpers every figure uses.

Importing this module selects matplotlib's non-interactive Agg backend (and changes nothing
else global: the style is applied through a local ``rc_context``). The figure modules of
:mod:`cwa_core.plots` take their colours, style and :func:`_save` from here; figure modules
outside the package use the public :func:`color`, :func:`figure` and :func:`save_png`.
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

from ..schema import PARAM_TYPES  # noqa: E402

log = logging.getLogger(__name__)

DPI = 150

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
_TYPE_ORDER = PARAM_TYPES  # cwa_core.schema's display order
_TYPE_COLORS = {
    "attention": _OKABE_ITO["blue"],
    "mlp": _OKABE_ITO["orange"],
    "norm": _OKABE_ITO["green"],
    "embedding": _OKABE_ITO["purple"],
    "lm_head": _OKABE_ITO["vermillion"],
}
_EXTRA_COLORS = (_OKABE_ITO["sky_blue"], _OKABE_ITO["black"], _OKABE_ITO["yellow"])
_CMAP = "viridis"
_BAD_COLOR = "#d9d9d9"  # cells without data (or without a finite value)
NAN_LABEL = "NaN"
INF_LABEL = "inf (overflow)"  # a perplexity that overflowed, in legends and bands
INF_HATCH = "//"  # the band where infinite values are drawn

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





def color(name: str) -> str:
    """A colour of the house palette (Okabe-Ito) by name: "vermillion", "blue", "green", ..."""
    return _OKABE_ITO[name]


@contextmanager
def figure(**kwargs: Any) -> Iterator[tuple[Any, Any]]:
    """``plt.subplots(**kwargs)`` under the house style, for figure modules outside this
    package (write it with :func:`save_png`); the figure is closed however drawing ends."""
    with _figure(**kwargs) as (fig, ax):
        yield fig, ax


def save_png(fig: Any, path: str | Path) -> Path:
    """Write ``fig`` as the house PNG (dpi 150, tight bbox, white), close it, return the path."""
    return _save(fig, path)  # looked up at call time: tests spy on it


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
