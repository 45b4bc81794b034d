"""Read result folders (single experiments and sweep roots, nested, mixed) into pandas tables.

A folder holding ``manifest.json`` is one experiment ("cell"); a folder holding
``sweep_manifest.json`` names its cells by their sub-folders. Folders whose manifest is not
``finished`` are skipped and counted. Fields added later (protocol block, ``ppl_status``,
``expert``, ``n_layers``, ``score_sample.parquet``, ``super_weights.json``, Parquet top
weights, ``window_nll.parquet``, the metric's ``data_independent`` flag in
``perturbation_results.json``, Phase 2's ``campaign_results.json``) are used when present and
derived or left out when not.

Top weights are digested one cell at a time (counts per tensor, candidate lines, sorted id
sets per seed) so that a hundred cells of ~430k rows each never sit in memory together.
Rows are chosen by ``rank`` (or by score when there is no rank), never by their order.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from cwa_core import schema

from .common import display_name
from .top_weights import LoadOptions, TensorIds, digest_top_weights, read_top_weights

log = logging.getLogger(__name__)

SWEEP_MANIFEST = schema.SWEEP_MANIFEST
# settings that do not change what was measured (where it ran, what was drawn, how it was batched)
NOT_MEASUREMENT = {"out_dir", "save_plots", "stability_check", "device", "eval_batch_size", "micro_batch",
                   "seeds", "controls", "stability_sample", *schema.CAMPAIGN_SETTINGS}  # a campaign adds its own file
# settings that are grouped on explicitly or belong to the evaluation protocol
EXPLICIT = {"model", "metric", "topk", "mode", "perturb", "perturb_scale", "perturb_bit",
            "eval_file", "eval_length", "eval_samples", "bos", "protocol", "dtype"}
PROTOCOL_FIELDS = ("eval_source", "eval_sha256", "window_length", "bos", "eval_windows", "dtype")
PROTOCOL_COLUMNS = ("name", *PROTOCOL_FIELDS, "calib_source")  # what a cell records of its protocol
_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32"}


@dataclass
class ResultSet:
    """Everything read from the folders, as tables keyed by ``cell`` (a unique folder label)."""

    cells: pd.DataFrame
    results: pd.DataFrame  # per cell, selection and seed: ratio (+inf kept), ppl_status
    stability: pd.DataFrame  # per cell, statistic (jaccard/spearman) and seed pair
    tensor_stats: pd.DataFrame  # per cell, seed and tensor: count, mean, ... of the scores
    topk_counts: pd.DataFrame  # per cell, seed and tensor: top-K weights there
    lines: pd.DataFrame  # per cell and seed: rows/columns holding many top-K weights
    score_sample: pd.DataFrame  # per cell and seed: (global_id, score) of the shared sample
    super_weights: list[dict]
    topk_keys: dict[tuple[str, int], np.ndarray]  # (cell, seed) -> sorted unique weight ids
    skipped: list[dict]
    warnings: list[str]
    top_weight_files: dict[str, Path] = field(default_factory=dict)
    # per cell, selection ("baseline" for the unperturbed model; seed -1), seed and evaluation window:
    # summed NLL and predictions (window_nll.parquet; absent in older folders)
    windows: pd.DataFrame = field(default_factory=pd.DataFrame)
    campaigns: list[dict] = field(default_factory=list)  # per campaign cell: {"cell": ..., **campaign_results.json}


# --------------------------------------------------------------------------- discovery

def find_experiment_dirs(paths: Iterable[str | Path]) -> list[Path]:
    """Every folder under ``paths`` that holds a ``manifest.json`` (sorted, each once)."""
    found: set[Path] = set()
    for p in map(Path, paths):
        if not p.exists():
            raise FileNotFoundError(f"result-dirs: no such folder {str(p)!r}")
        if p.is_file():
            p = p.parent
        for d, dirs, files in os.walk(p):
            if schema.MANIFEST in files:
                found.add(Path(d).resolve())
                dirs[:] = []  # an experiment's sub-folders (plots/) hold no experiments
            else:
                dirs.sort()
    return sorted(found)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


def _norm_dtype(x) -> str | None:
    if x is None:
        return None
    s = str(x).replace("torch.", "")
    return _DTYPES.get(s, s)


def protocol_key(manifest: dict, pert: dict) -> tuple[dict, bool]:
    """The evaluation protocol of a cell (``PROTOCOL_FIELDS``) and whether it was derived from
    older fields (no protocol block): corpus, window, BOS layout, windows and dtype."""
    data = manifest.get("data") or {}
    settings = manifest.get("settings") or {}
    prov = manifest.get("provenance") or {}
    dtype = _norm_dtype((prov.get("model") or {}).get("dtype") or prov.get("dtype") or settings.get("dtype"))
    p = data.get("protocol") or pert.get("protocol")
    if p:
        return {**{f: p.get(f) for f in PROTOCOL_COLUMNS}, "dtype": dtype}, False
    key = {"name": None, "eval_source": data.get("eval_source") or settings.get("eval_file") or settings.get("data_file"),
           "eval_sha256": None, "window_length": data.get("eval_length") or pert.get("window_length"),
           "bos": data.get("layout") or settings.get("bos"),
           "eval_windows": data.get("eval_windows") or pert.get("eval_windows"),
           "calib_source": data.get("calib_source"), "dtype": dtype}
    return key, True


def _variant(settings: dict) -> str:
    """A short hash of the settings that change the measurement but are not grouped on
    explicitly (calibration size, parameter types, ...): cells that differ there never pool."""
    rest = {k: v for k, v in settings.items() if k not in NOT_MEASUREMENT | EXPLICIT}
    if isinstance(rest.get("param_types"), list):
        rest["param_types"] = sorted(rest["param_types"])
    return hashlib.sha1(json.dumps(rest, sort_keys=True, default=str).encode()).hexdigest()[:8]


def perturbation_label(p: dict | None, settings: dict) -> str:
    p = p or {"method": settings.get("perturb"), "scale": settings.get("perturb_scale"), "bit": settings.get("perturb_bit")}
    extra = [f"{k}={p[k]:g}" if isinstance(p.get(k), float) else f"{k}={p[k]}" for k in ("scale", "bit") if p.get(k) is not None]
    return f"{p.get('method')}({', '.join(extra)})" if extra else str(p.get("method"))


# --------------------------------------------------------------------------- one cell

def _results_rows(cell: str, pert: dict) -> list[dict]:
    """One row per result: its ratio and perplexity read by :mod:`cwa_core.schema`'s one reader
    (+inf kept; an older file's null read through ``ppl_status``, "unknown" where it has none)."""
    base = (pert.get("baseline") or {}).get("ppl")
    rows = []
    for r in pert.get("results", []):
        ratio = schema.read_ratio(r, base)
        rows.append({"cell": cell, "selection": r.get("selection"), "seed": int(r.get("seed", -1)),
                     "k": r.get("k"), "n_weights": r.get("n_weights"), "ppl": schema.read_ppl(r), "ratio": ratio,
                     "ppl_status": schema.read_status(r, ratio)})
    return rows


def _stats_rows(cell: str, stats: dict) -> list[dict]:
    rows = []
    for s in stats.get("per_seed", []):
        for t in s.get("per_tensor", []):
            shape = list(t.get("shape") or [])
            rows.append({"cell": cell, "seed": int(s.get("seed", -1)), "parameter": t.get("name"),
                         "layer": int(t.get("layer", -1)), "param_type": t.get("param_type"),
                         "ndim": len(shape), "n_rows": shape[0] if shape else None,
                         "n_cols": shape[-1] if len(shape) >= 2 else None,
                         **{k: (np.nan if t.get(k) is None else float(t[k])) for k in ("count", "mean", "std", "max", "p99")}})
    return rows


def _stability_rows(cell: str, st: dict) -> list[dict]:
    rows = []
    for stat in ("jaccard", "spearman"):
        for p in (st.get(stat) or {}).get("pairs", []):
            v = p.get("value")
            rows.append({"cell": cell, "statistic": stat, "a": p.get("a"), "b": p.get("b"),
                         "value": schema.number(v), "source": schema.STABILITY})
    return rows



# --------------------------------------------------------------------------- everything

class _Skip(Exception):
    """A folder that holds no finished experiment: (status, error)."""


@dataclass
class _Cell:
    """What one experiment folder contributes to the tables."""

    row: dict
    results: list[dict]
    stability: list[dict]
    stats: list[dict]
    counts: pd.DataFrame | None = None
    lines: pd.DataFrame | None = None
    keys: dict = field(default_factory=dict)
    sample: pd.DataFrame | None = None
    super_weights: dict | None = None
    top_weights: Path | None = None
    windows: pd.DataFrame | None = None
    campaign: dict | None = None


def _read_cell(d: Path, cell: str, ids: TensorIds, opts: LoadOptions) -> _Cell:
    try:
        man = _read_json(d / schema.MANIFEST) or {}
    except json.JSONDecodeError as e:
        raise _Skip("unreadable", f"{schema.MANIFEST}: {e}") from None
    if man.get("status") != "finished":
        raise _Skip(man.get("status"), man.get("error"))
    pert = _read_json(d / schema.PERTURBATION_RESULTS)
    campaign = _read_json(d / schema.CAMPAIGN_RESULTS)
    if pert is None and campaign is None:
        raise _Skip("incomplete", f"no {schema.PERTURBATION_RESULTS}")
    pert = pert or {}  # a campaign cell without Phase 1 evaluations
    settings = man.get("settings") or {}
    prov_model = (man.get("provenance") or {}).get("model") or {}
    proto, derived = protocol_key(man, pert)
    stats = _read_json(d / schema.SENSITIVITY_STATS)
    srows = _stats_rows(cell, stats) if stats else []
    st = _read_json(d / schema.STABILITY)
    out = _Cell(row={}, results=_results_rows(cell, pert), stability=_stability_rows(cell, st) if st else [], stats=srows)
    k, mode = int(pert.get("topk") or settings.get("topk")), pert.get("mode") or settings.get("mode")
    n_layers = prov_model.get("n_layers")
    if n_layers is None and srows:  # older provenance: the deepest block scored
        n_layers = max(r["layer"] for r in srows) + 1
    tw = d / schema.TOP_WEIGHTS_PARQUET if (d / schema.TOP_WEIGHTS_PARQUET).exists() else d / schema.TOP_WEIGHTS_CSV
    n_top = 0
    if tw.exists():
        shapes = {r["parameter"]: (r["n_rows"], r["n_cols"]) for r in srows if r["seed"] == srows[0]["seed"]}
        df = read_top_weights(tw)
        n_top = len(df)
        out.counts, out.lines, out.keys = digest_top_weights(df, cell, k, mode, ids, shapes, opts)
        out.top_weights = tw
        if n_layers is None and len(out.counts):
            n_layers = int(out.counts["layer"].max()) + 1
    ss = d / schema.SCORE_SAMPLE
    if ss.exists():
        out.sample = pd.read_parquet(ss, columns=["seed", "global_id", "score"])
        out.sample.insert(0, "cell", cell)
    sw = _read_json(d / schema.SUPER_WEIGHTS)
    out.super_weights = {"cell": cell, **sw} if sw else None
    out.campaign = {"cell": cell, **campaign} if campaign else None
    wf = d / (pert.get("window_nll") or schema.WINDOW_NLL)
    if wf.is_file():
        out.windows = pd.read_parquet(wf, columns=["selection", "seed", "window", "nll", "tokens"])
        out.windows.insert(0, "cell", cell)
    seeds = sorted({int(r["seed"]) for r in pert.get("results", [])}) or list(settings.get("seeds", []))
    out.row = {
        "cell": cell, "dir": str(d),
        "model": settings.get("model") or prov_model.get("model_id"), "model_id": prov_model.get("model_id"),
        "hf_id": prov_model.get("hf_id"), "model_source": prov_model.get("source"),
        "model_type": prov_model.get("model_type"),
        "n_params": prov_model.get("n_params"), "n_layers": n_layers,
        "metric": pert.get("metric") or settings.get("metric"), "k": k, "mode": mode,
        "perturbation": perturbation_label(pert.get("perturbation"), settings),
        "param_types": ",".join(sorted(settings.get("param_types") or [])),
        "seeds": ",".join(map(str, seeds)), "n_seeds": len(seeds),
        "baseline_ppl": man.get("baseline_ppl", (pert.get("baseline") or {}).get("ppl")),
        "data_independent": (st or {}).get("data_independent", pert.get("data_independent")),
        "variant": _variant(settings), "protocol_derived": derived,
        **{f"protocol_{f}": proto.get(f) for f in PROTOCOL_COLUMNS},
        "has_top_weights": tw.exists(), "top_weight_rows": n_top, "has_score_sample": ss.exists(),
        "has_stability": st is not None, "has_super_weights": sw is not None,
        "plots_failed": json.dumps(man["plots_failed"]) if man.get("plots_failed") else None,
    }
    return out


def _labels(dirs: list[Path]) -> list[str]:
    """Cell labels: the folder name (a sweep's cell id), or parent/name where names repeat,
    with a counter if even that repeats."""
    count: dict[str, int] = {}
    for d in dirs:
        count[d.name] = count.get(d.name, 0) + 1
    out, seen = [], set()
    for d in dirs:
        label = d.name if count[d.name] == 1 else f"{d.parent.name}/{d.name}"
        base, i = label, 2
        while label in seen:
            label, i = f"{base}#{i}", i + 1
        seen.add(label)
        out.append(label)
    return out


def load_results(paths: Sequence[str | Path], opts: LoadOptions | None = None) -> ResultSet:
    """Read every experiment folder under ``paths`` (see the module docstring)."""
    opts = opts or LoadOptions()
    dirs = find_experiment_dirs(paths)
    sweeps: dict[Path, dict | None] = {}
    ids = TensorIds()
    got: list[_Cell] = []
    skipped: list[dict] = []
    seen: set[tuple[Path, str]] = set()
    for d, cell in zip(dirs, _labels(dirs)):
        if d.parent not in sweeps:
            sweeps[d.parent] = _read_json(d.parent / SWEEP_MANIFEST)
        entry = ((sweeps[d.parent] or {}).get("cells") or {}).get(d.name)
        if entry is not None:
            seen.add((d.parent, d.name))
        try:
            c = _read_cell(d, cell, ids, opts)
        except _Skip as e:
            skipped.append({"cell": cell, "dir": str(d), "status": e.args[0], "error": e.args[1]})
            continue
        c.row.update(sweep=(sweeps[d.parent] or {}).get("name") if entry else None,
                     mlflow_run_id=(entry or {}).get("mlflow_run_id"))
        got.append(c)
    for root, sweep in sweeps.items():  # cells a sweep planned that never wrote a finished folder
        for cid, e in ((sweep or {}).get("cells") or {}).items():
            if (root, cid) not in seen:
                skipped.append({"cell": cid, "dir": str(root / cid), "status": e.get("status"), "error": e.get("error")})
    if skipped:
        log.warning("%d result folder(s) skipped (not finished): %s", len(skipped),
                    ", ".join(f"{s['cell']} ({s['status']})" for s in skipped[:5]))
    cells = pd.DataFrame([c.row for c in got])
    if len(cells):
        cells = _assign_protocols(cells)
        cells["model_name"] = _short_names(cells["model"], cells["model_source"])
    keys = {k: v for c in got for k, v in c.keys.items()}
    return ResultSet(
        cells=cells, results=pd.DataFrame([r for c in got for r in c.results]),
        stability=pd.DataFrame([r for c in got for r in c.stability]),
        tensor_stats=pd.DataFrame([r for c in got for r in c.stats]),
        topk_counts=_concat([c.counts for c in got if c.counts is not None]),
        lines=_concat([c.lines for c in got if c.lines is not None]),
        score_sample=_concat([c.sample for c in got if c.sample is not None]),
        super_weights=[c.super_weights for c in got if c.super_weights], topk_keys=keys, skipped=skipped,
        warnings=[], top_weight_files={c.row["cell"]: c.top_weights for c in got if c.top_weights},
        windows=_concat([c.windows for c in got if c.windows is not None]),
        campaigns=[c.campaign for c in got if c.campaign])


def _concat(frames: list[pd.DataFrame]) -> pd.DataFrame:
    frames = [f for f in frames if len(f)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _assign_protocols(cells: pd.DataFrame) -> pd.DataFrame:
    """Protocol ids P1, P2, ... (in a stable order of their fields) and a readable label."""
    cols = [f"protocol_{f}" for f in PROTOCOL_FIELDS]
    keys = pd.Series(["|".join(map(str, r)) for r in cells[cols].itertuples(index=False)], index=cells.index)
    order = {k: f"P{i + 1}" for i, k in enumerate(sorted(keys.unique()))}
    cells = cells.copy()
    cells["protocol"] = keys.map(order)
    cells["protocol_label"] = [
        f"{r.protocol_name or 'derived'}: {r.protocol_eval_source}, {r.protocol_window_length}-token windows x "
        f"{r.protocol_eval_windows}, BOS per {r.protocol_bos}, {r.protocol_dtype}" for r in cells.itertuples()]
    return cells


def _short_names(models: pd.Series, sources: pd.Series) -> pd.Series:
    """Each model's :func:`~analysis.common.display_name` (a local folder's name, a Hub id as it
    is), unless two different models would share it: then the full id."""
    short = pd.Series([display_name(m, s if isinstance(s, str) else None) for m, s in zip(models.astype(str), sources)],
                      index=models.index)
    clash = short.groupby(short).transform(lambda s: models[s.index].nunique() > 1)
    return short.where(~clash, models.astype(str))
