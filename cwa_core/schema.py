"""The vocabulary of results, declared once: file names, selection kinds (order, label, colour,
marker), parameter types, MLflow tag names, the result row, and how numbers go into and come
back out of the JSON files.

Standard library only: ``analysis/`` imports this module and never pulls in torch (a test
checks that), and a Ray worker pays nothing for it.

Numbers in the files
--------------------
An experiment's JSON files (``manifest.json``, ``perturbation_results.json``, ``stability.json``,
``super_weights.json``, ...) write every float as it is: a finite number as a JSON number, and
+inf, -inf and NaN as the tokens ``Infinity``, ``-Infinity`` and ``NaN`` that Python's ``json``
writes and reads back (:func:`dumps`). A value read back is therefore the value that was in
memory: a perplexity that overflowed reads as ``inf``, a NaN perplexity as ``nan``, and
``null`` only ever means "no value". Files written before this rule (every non-finite float
written as ``null``, a row's ``ppl_status`` telling "inf" from "nan") stay readable:
:func:`read_ratio` and :func:`read_ppl` read a ``null`` through the row's status.

The cross-model analysis writes strict JSON instead (``statistical_analysis.json``: +-inf as
the strings ``"inf"``/``"-inf"``, NaN as ``null``: missing or undefined; :func:`strict_number`).
:func:`number` reads every one of these forms back as a float.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

# --------------------------------------------------------------------------- file names

MANIFEST = "manifest.json"  # one experiment (cell); written last: a folder with one is complete
SWEEP_MANIFEST = "sweep_manifest.json"  # a sweep root: its cells by sub-folder
PERTURBATION_RESULTS = "perturbation_results.json"
SENSITIVITY_STATS = "sensitivity_stats.json"
STABILITY = "stability.json"
SUPER_WEIGHTS = "super_weights.json"
TOP_WEIGHTS_CSV = "top_weights.csv"
TOP_WEIGHTS_PARQUET = "top_weights.parquet"
SCORE_SAMPLE = "score_sample.parquet"
WINDOW_NLL = "window_nll.parquet"  # per evaluation window NLL sums, beside perturbation_results.json
ERROR_FILE = "error.txt"  # a failed sweep cell's error
STATISTICAL_ANALYSIS = "statistical_analysis.json"
PLOTS_DIR = "plots"
SUPER_WEIGHT_PLOT = "super_weight_spikes.png"

# --------------------------------------------------------------------------- selections


@dataclass(frozen=True)
class SelectionKind:
    """One kind of weight selection: its name in the files, how figures and tables show it."""

    name: str
    label: str  # in figures and text
    color: str  # Okabe-Ito (colour-blind safe), the experiment figures' palette
    marker: str  # series differ by marker too, so that they read in grayscale
    control: bool  # a control that top-K is compared against
    description: str


# The one order of the selections: figures, tables and tests list them so.
SELECTIONS: tuple[SelectionKind, ...] = (
    SelectionKind("top_k", "top-K", "#D55E00", "o", False, "the K weights with the highest scores"),
    SelectionKind("random_k", "random-K", "#0072B2", "s", True, "K weights drawn uniformly (seeded)"),
    SelectionKind("bottom_k", "bottom-K", "#009E73", "^", True, "the K weights with the lowest scores"),
)
SELECTION_KINDS = tuple(s.name for s in SELECTIONS)
CONTROL_KINDS = tuple(s.name for s in SELECTIONS if s.control)
SELECTION_LABELS = {s.name: s.label for s in SELECTIONS}
SELECTION_COLORS = {s.name: s.color for s in SELECTIONS}
SELECTION_MARKERS = {s.name: s.marker for s in SELECTIONS}
BASELINE = "baseline"  # the unperturbed model's rows in window_nll.parquet (seed -1)

# The arms (protected sets) of issue 17's campaigns, in their one order: no protection, the three
# selections above (same label, colour and marker), the detected super weights.
ARMS: tuple[SelectionKind, ...] = (
    SelectionKind("none", "no protection", "#000000", "D", True, "nothing protected"),
    *SELECTIONS,
    SelectionKind("super_weights", "super weights", "#CC79A7", "*", False, "the detected super-weight candidates"),
)
ARM_KINDS = tuple(a.name for a in ARMS)
ARM_LABELS = {a.name: a.label for a in ARMS}
ARM_COLORS = {a.name: a.color for a in ARMS}
ARM_MARKERS = {a.name: a.marker for a in ARMS}


def selection_kind(name: str) -> SelectionKind:
    """The :class:`SelectionKind` called ``name``; an unknown name raises, listing the known ones."""
    for s in SELECTIONS:
        if s.name == name:
            return s
    raise KeyError(f"unknown selection kind {name!r}; known: {', '.join(SELECTION_KINDS)}")


# --------------------------------------------------------------------------- parameter types

PARAM_TYPES = ("attention", "mlp", "norm", "embedding", "lm_head")  # in display order
DEFAULT_PARAM_TYPES = ("attention", "mlp", "norm")

# --------------------------------------------------------------------------- MLflow tags

TAG_CELL = "cwa.cell_id"
TAG_KIND = "cwa.kind"  # "sweep", "cell", "seed" or "stability"
TAG_SWEEP = "cwa.sweep"
TAG_STABILITY = "cwa.stability_key"
TAG_SWEEP_RUN = "cwa.sweep_run_id"
TAG_SUPERSEDED = "cwa.superseded"
TAG_ERROR = "cwa.error"
TAG_PLOTS_FAILED = "cwa.plots_failed"

# --------------------------------------------------------------------------- numbers

STATUSES = ("finite", "inf", "nan")  # a perplexity's ppl_status; "unknown": an old null without one


def finite_status(x: float | None) -> str:
    """"finite", "inf" or "nan": what a perplexity was (None counts as NaN). Written beside it in
    every result row (files from before :func:`dumps` wrote non-finite numbers as null)."""
    if x is None or math.isnan(x):
        return "nan"
    return "finite" if math.isfinite(x) else "inf"


def number(x: Any) -> float:
    """A number read back from any of the files as a float: numbers as they are, the tokens
    Infinity/NaN as Python's ``json`` reads them, the strict strings "inf"/"-inf"/"nan" (the
    analysis's JSON), and null as NaN (missing)."""
    return math.nan if x is None else float(x)


def strict_number(x: Any) -> float | str | None:
    """Strict JSON (the analysis's files): finite floats as they are, +-inf as "inf"/"-inf",
    NaN and None as null (missing or undefined)."""
    if x is None:
        return None
    x = float(x)
    if math.isnan(x):
        return None
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return x


def json_ready(o: Any) -> Any:
    """``o`` with tuples as lists, dict keys as strings, paths as strings and numpy / torch
    scalars as Python numbers; floats as they are, non-finite included (see the module docstring)."""
    if isinstance(o, dict):
        return {str(k): json_ready(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [json_ready(v) for v in o]
    if isinstance(o, Path):
        return str(o)
    if type(o).__module__.split(".")[0] in ("numpy", "torch") and hasattr(o, "item"):
        return json_ready(o.item())  # a numpy scalar or a one-element tensor
    return o


def dumps(obj: Any) -> str:
    """The text of an experiment's JSON file: indented, non-finite floats as Infinity/NaN tokens."""
    return json.dumps(json_ready(obj), indent=2, allow_nan=True) + "\n"


# --------------------------------------------------------------------------- result rows

# the keys of one row of perturbation_results.json's "results", in the order they are written
RESULT_FIELDS = ("selection", "seed", "k", "mode", "n_weights", "bit", "ppl", "ppl_ratio", "nll", "ppl_status")


def read_status(row: Mapping[str, Any], ratio: float) -> str:
    """A row's ``ppl_status``; where a file has none (written before it existed): "finite" when
    its ``ratio`` (:func:`read_ratio`) is, else "unknown" (an old null: inf or NaN, nothing tells)."""
    status = row.get("ppl_status")
    if status is not None:
        return str(status)
    return "finite" if math.isfinite(ratio) else "unknown"


def read_ratio(row: Mapping[str, Any], base_ppl: float | None = None) -> float:
    """The perplexity ratio of one result row, in memory or read back from any file.

    A number is taken as it is (inf and NaN included). A ``null`` (older files) reads through the
    row's ``ppl_status``: "inf" is +inf, "nan" NaN; else, with ``base_ppl`` given, the row's
    ``ppl`` / ``base_ppl`` (a sweep driver with no baseline at hand once left the division);
    else NaN (missing).
    """
    ratio = row.get("ppl_ratio")
    if ratio is not None:
        return number(ratio)
    status = row.get("ppl_status")
    if status == "inf":
        return math.inf
    if status == "nan":
        return math.nan
    ppl, base = number(row.get("ppl")), number(base_ppl)
    if not math.isnan(ppl) and math.isfinite(base) and base > 0:
        return ppl / base
    return math.nan


def read_ppl(row: Mapping[str, Any]) -> float:
    """The perturbed perplexity of one result row: a number as it is, a ``null`` (older files)
    +inf where the row's status says "inf", else NaN."""
    ppl = row.get("ppl")
    if ppl is not None:
        return number(ppl)
    return math.inf if row.get("ppl_status") == "inf" else math.nan


def ratios_by_selection(rows: Sequence[Mapping[str, Any]]) -> dict[str, list[float]]:
    """Perplexity ratios (:func:`read_ratio`) grouped by selection, in row (seed) order."""
    out: dict[str, list[float]] = {}
    for r in rows:
        out.setdefault(r["selection"], []).append(read_ratio(r))
    return out


def ordered_selections(names: Iterable[str]) -> list[str]:
    """``names`` (each once) in :data:`SELECTION_KINDS` order, unknown ones after them, sorted."""
    present = set(names)
    return [s for s in SELECTION_KINDS if s in present] + sorted(present.difference(SELECTION_KINDS))
