"""Cross-model statistical analysis of result folders (or an MLflow experiment's cell runs).

    python -m analysis.cross_model --result-dirs results/a results/b --output results/x/statistical_analysis.json
    python -m analysis.cross_model --mlflow-experiment cross_model --tracking-uri sqlite:///mlflow.db --output ...

Writes the JSON (strict: no NaN; infinite values as "inf"), the tables as Parquet beside it
(``pd.read_parquet("results/x/ratios.parquet")``) and the figures in ``figures/`` (PNG + PDF).
Cells that ran a Phase 2 campaign add the "campaign" section, its tables and figures, and base vs
instruct model pairs add "pairs" (:mod:`analysis.campaign`); without them nothing of it is written.
Library use: :func:`analyze` (what the sweep runner calls), :func:`load_tables`.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import sys
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Sequence

import pandas as pd

from cwa_core.schema import TAG_CELL, TAG_KIND

from .campaign import campaign_tables, pairs_table
from .common import GROUP, NUMBERS_NOTE, clean, cells_list
from .compare import (INTERVALS, CompareOptions, apply_holm, dose_response, paired_tests, ratio_summary,
                      stability_table, tagged_results)
from .enrichment import METHOD as ENRICHMENT_METHOD
from .hypotheses import check_hypotheses
from .load import PROTOCOL_COLUMNS, LoadOptions, ResultSet, load_results, read_top_weights
from .weights import (PER_LAYER_NOTE, WeightOptions, data_independence, location, metric_spearman, recurring_lines,
                      sensitivity_profile, super_weight_table, topk_overlap)

log = logging.getLogger(__name__)

SCHEMA = "cwa.statistical_analysis/1"
POOLING_NOTE = ("Cells are pooled over seeds only within one protocol, model, metric, K, mode, perturbation and "
                "variant (a hash of the remaining settings that change a measurement); cells measured under "
                "different evaluation protocols (corpus, window length, BOS layout, windows, dtype) are never "
                "pooled or compared as alike: every row names its protocol")


@dataclass(frozen=True)
class AnalysisOptions:
    """Everything the analysis can be told; the defaults are the documented study settings."""

    compare: CompareOptions = field(default_factory=CompareOptions)
    weights: WeightOptions = field(default_factory=WeightOptions)
    load: LoadOptions = field(default_factory=LoadOptions)
    top_weights_rows: int = 2_000_000  # concatenated top_weights.parquet beside the JSON up to this many rows
    figures: bool = True


def _frame(rows: list[dict]) -> pd.DataFrame:
    """A table of rows whose nested values (dicts, lists of dicts) become JSON text."""
    df = pd.DataFrame(rows)
    for c in df.columns:
        if df[c].map(lambda v: isinstance(v, (dict, list, tuple))).any():
            df[c] = df[c].map(lambda v: json.dumps(clean(v)) if isinstance(v, (dict, list, tuple)) else v)
        kinds = {type(v) for v in df[c] if v is not None and v == v}
        if len(kinds) > 1 and not kinds <= {int, float}:  # e.g. a category that is a layer or a type name
            df[c] = df[c].map(lambda v: None if v is None or v != v else str(v))
    return df


def _cells_table(rs: ResultSet) -> list[dict]:
    cols = ["cell", "dir", "sweep", "mlflow_run_id", "model", "model_name", "metric", "k", "mode", "perturbation",
            "seeds", "protocol", "variant", "param_types", "baseline_ppl", "n_layers", "top_weight_rows", "plots_failed"]
    return rs.cells[[c for c in cols if c in rs.cells]].to_dict("records") if len(rs.cells) else []


def _per_group(rs: ResultSet, column: str, describe) -> list[dict]:
    """``describe(key, group, first_row)`` for each value of ``column`` in the cells table."""
    return [] if rs.cells.empty else [describe(key, g, g.iloc[0]) for key, g in rs.cells.groupby(column)]


def _protocols(rs: ResultSet) -> list[dict]:
    return _per_group(rs, "protocol", lambda pid, g, r: {
        "id": pid, "label": r["protocol_label"], "derived_from_older_fields": bool(g["protocol_derived"].any()),
        **{f: r[f"protocol_{f}"] for f in PROTOCOL_COLUMNS},
        "models": sorted(g["model"].unique()), "cells": cells_list(g["cell"])})


def _models(rs: ResultSet) -> list[dict]:
    return _per_group(rs, "model", lambda m, g, r: {
        "model": m, "model_name": r["model_name"], "model_type": r["model_type"], "hf_id": r["hf_id"],
        "n_params": r["n_params"], "n_layers": r["n_layers"], "metrics": sorted(g["metric"].unique()),
        "ks": sorted(int(k) for k in g["k"].unique()), "modes": sorted(g["mode"].unique()),
        "protocols": sorted(g["protocol"].unique()), "cells": cells_list(g["cell"])})


def run_analysis(rs: ResultSet, opts: AnalysisOptions | None = None) -> tuple[dict, dict[str, pd.DataFrame]]:
    """Every section of the analysis (a dict, not yet JSON-cleaned) and its tables."""
    opts = opts or AnalysisOptions()
    warnings = list(rs.warnings)
    n_layers = rs.cells["n_layers"].dropna() if len(rs.cells) else pd.Series(dtype=float)
    if len(n_layers) and n_layers.min() < opts.weights.depth_bins:
        # more bins than a model has layers leaves bins empty and misaligns models of different depth
        opts = replace(opts, weights=replace(opts.weights, depth_bins=int(n_layers.min())))
        warnings.append(f"depth bins lowered to {opts.weights.depth_bins}: the shallowest model has that many layers")
    r = tagged_results(rs.results, rs.cells, warnings) if len(rs.cells) else pd.DataFrame()
    ratios = ratio_summary(r, opts.compare, rs.windows)
    indep = data_independence(rs)
    spear, overlap = metric_spearman(rs, indep), topk_overlap(rs, indep)
    shares, fits, chi = location(rs, opts.weights)
    lines, cross = recurring_lines(rs, opts.weights)
    sw, published = super_weight_table(rs)
    stab = stability_table(rs.stability, rs.cells, rs.topk_keys) if len(rs.cells) else []
    bad = r[r["ppl_status"] != "finite"] if len(r) else r
    a = {
        "schema": SCHEMA, "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "conventions": {"numbers": NUMBERS_NOTE, "pooling": POOLING_NOTE,
                        "ratio": "perplexity with the selection perturbed / unperturbed perplexity (x)",
                        "intervals": INTERVALS},
        "options": asdict(opts),
        "cells": {"n_loaded": len(rs.cells), "n_skipped": len(rs.skipped), "skipped": rs.skipped, "table": _cells_table(rs)},
        "protocols": _protocols(rs), "models": _models(rs),
        "ratios": ratios,
        "non_finite": {
            "inf": [{"cell": x.cell, "selection": x.selection, "seed": x.seed, "ppl_status": x.ppl_status}
                    for x in bad.itertuples() if x.ppl_status == "inf"],
            "missing": [{"cell": x.cell, "selection": x.selection, "seed": x.seed, "ppl_status": x.ppl_status}
                        for x in bad.itertuples() if x.ppl_status != "inf"],
            "note": "inf ratios (ppl_status inf, e.g. an exponent bit flip that overflowed) count as +inf damage; "
                    "nan or unknown ones (older files: a null with no status) are missing and left out"},
        "paired_tests": paired_tests(r, opts.compare),
        "dose_response": dose_response(ratios, opts.compare),
        "stability": stab,
        "metric_agreement": {"spearman": spear, "topk_overlap": overlap},
        "sensitivity_profile": sensitivity_profile(rs, opts.weights),
        "location": {"shares": shares, "fit": fits, "comparisons": chi, "method": ENRICHMENT_METHOD,
                     "note": PER_LAYER_NOTE if (len(rs.cells) and (rs.cells["mode"] == "per_layer").any()) else None},
        "recurring": {"lines": lines, "across_metrics": cross,
                      "rule": f"a row or column of a matrix with at least {opts.load.line_min_count} of its tensor's "
                              f"top-K weights and {opts.load.line_enrichment:g}x what uniform placement would give; "
                              f"the {opts.weights.recurring_top} most frequent per model, metric, K and mode"},
        "super_weights": {"candidates": sw, "published": published},
        "warnings": warnings,
    }
    # Holm over every test the report prints a p for: paired tests, location fits and comparisons
    a["multiple_comparisons"] = apply_holm({"paired_tests": a["paired_tests"], "location_fit": fits,
                                            "location_comparisons": chi}, opts.compare.alpha)
    a["hypotheses"] = check_hypotheses(a)
    dose_rows = [{**{k: d[k] for k in (*[g for g in GROUP if g != "k"], "model_name")}, "k": p["k"], "selection": sel,
                  **{f: p[sel][f] for f in ("geomean", "mean", "n_seeds", "n_inf")},
                  "ci_lo": p[sel]["ci"][0], "ci_hi": p[sel]["ci"][1], "cells": p[sel]["cells"]}
                 for d in a["dose_response"] for p in d["points"] for sel in p if sel != "k"]
    tables = {"cells": rs.cells, "results": r, "ratios": _frame(ratios), "paired_tests": _frame(a["paired_tests"]),
              "dose_response": _frame(dose_rows), "stability": _frame(stab), "metric_spearman": _frame(spear),
              "topk_overlap": _frame(overlap), "sensitivity_profile": _frame(a["sensitivity_profile"]),
              "location": _frame(shares), "location_fit": _frame(fits), "location_tests": _frame(chi),
              "recurring_lines": _frame(lines),
              "top_weights_by_tensor": rs.topk_counts, "super_weights": _frame(sw)}
    camp, camp_tables = campaign_tables(rs)  # Phase 2: present only when a cell ran a campaign
    if camp:
        a["campaign"] = camp
        tables.update(camp_tables)
    pairs = pairs_table(rs, ratios, camp.get("headlines", []))
    if pairs:
        a["pairs"] = pairs
        tables["pairs"] = pd.DataFrame(pairs)
    return a, {k: v for k, v in tables.items() if v is not None and len(v)}


def _full_top_weights(rs: ResultSet, limit: int) -> pd.DataFrame | None:
    """Every cell's top weights in one table (a ``cell`` column added) when they fit ``limit``."""
    total = int(rs.cells["top_weight_rows"].sum()) if len(rs.cells) else 0
    if not rs.top_weight_files or total > limit:
        return None
    frames = []
    for cell, path in rs.top_weight_files.items():
        df = read_top_weights(path)
        df.insert(0, "cell", cell)
        frames.append(df.astype({"parameter": str, "param_type": str, "expert": str}))
    return pd.concat(frames, ignore_index=True)


def write_outputs(a: dict, tables: dict[str, pd.DataFrame], output: str | Path, rs: ResultSet | None = None,
                  opts: AnalysisOptions | None = None) -> dict:
    """The JSON at ``output``, its tables as Parquet beside it, the figures in ``figures/``."""
    opts = opts or AnalysisOptions()
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    names = {}
    if rs is not None:
        full = _full_top_weights(rs, opts.top_weights_rows)
        if full is not None:
            tables = {**tables, "top_weights": full}
        else:
            a["warnings"].append(f"top weights ({int(rs.cells['top_weight_rows'].sum()) if len(rs.cells) else 0} rows) "
                                 f"not concatenated (limit {opts.top_weights_rows}): top_weights_by_tensor.parquet "
                                 "holds the counts; each cell's own file is in its folder (cells.parquet: dir)")
    for name, df in tables.items():
        path = out.parent / f"{name}.parquet"
        df.to_parquet(path, index=False)
        names[name] = path.name
    a["tables"] = names
    if opts.figures:
        from .figures import save_figures  # matplotlib only when figures are asked for

        a["figures"] = [str(p.relative_to(out.parent)) for p in save_figures(a, out.parent / "figures")]
    out.write_text(json.dumps(clean(a), indent=1, allow_nan=False) + "\n")
    return a


def analyze(inputs: Sequence[str | Path] | ResultSet, *, options: AnalysisOptions | None = None,
            output: str | Path | None = None) -> dict:
    """Analyse result folders (or an already loaded :class:`ResultSet`); with ``output`` also
    write the JSON, Parquet tables and figures. Returns the JSON-ready dict (strict)."""
    opts = options or AnalysisOptions()
    rs = inputs if isinstance(inputs, ResultSet) else load_results(list(inputs), opts.load)
    log.info("loaded %d cells (%d skipped)", len(rs.cells), len(rs.skipped))
    a, tables = run_analysis(rs, opts)
    a["inputs"] = [str(p) for p in inputs] if not isinstance(inputs, ResultSet) else None
    if output is not None:
        a = write_outputs(a, tables, output, rs, opts)
    return clean(a)


def analyze_mlflow(experiment: str, tracking_uri: str | None = None, *, options: AnalysisOptions | None = None,
                   output: str | Path | None = None) -> dict:
    """:func:`analyze` on the finished cell runs (tag cwa.kind = cell) of an MLflow experiment,
    downloaded to a temporary folder; each cell's ``dir`` then names its run."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ValueError(f"mlflow-experiment: no experiment {experiment!r} at {tracking_uri or 'the default tracking URI'}")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{TAG_KIND}` = 'cell'", max_results=50_000)
    skipped = []
    with tempfile.TemporaryDirectory(prefix="cwa-mlflow-") as tmp:
        where = {}
        for run in runs:
            cid = run.data.tags.get(TAG_CELL, run.info.run_id)
            if run.info.status != "FINISHED":
                skipped.append({"cell": cid, "dir": f"mlflow run {run.info.run_id}", "status": run.info.status.lower(),
                                "error": None})
                continue
            dest = Path(tmp) / cid
            dest.mkdir()
            client.download_artifacts(run.info.run_id, "", str(dest))
            where[cid] = run.info.run_id
        rs = load_results([tmp], (options or AnalysisOptions()).load) if where else None
        if rs is None:
            raise ValueError(f"mlflow-experiment: no finished cell run (tag {TAG_KIND} = cell) in {experiment!r}")
        rs.skipped.extend(skipped)
        rs.cells["mlflow_run_id"] = rs.cells["cell"].map(where)
        rs.cells["dir"] = [f"mlflow:{experiment}/{where.get(c, '?')}" for c in rs.cells["cell"]]
        a = analyze(rs, options=options, output=output)
    a["inputs"] = [f"mlflow experiment {experiment!r} at {tracking_uri or 'the default tracking URI'}"]
    if output is not None:  # record the source in the written JSON too
        Path(output).write_text(json.dumps(a, indent=1, allow_nan=False) + "\n")
    return a


def load_tables(json_path: str | Path) -> dict[str, pd.DataFrame]:
    """Every table written beside an analysis JSON, by name."""
    p = Path(json_path)
    names = json.loads(p.read_text()).get("tables", {})
    return {k: pd.read_parquet(p.parent / v) for k, v in names.items()}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m analysis.cross_model", description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--result-dirs", nargs="+", metavar="DIR", help="experiment folders or sweep roots (walked)")
    src.add_argument("--mlflow-experiment", metavar="NAME", help="read the finished cell runs of this experiment")
    ap.add_argument("--tracking-uri", help="MLflow tracking URI (with --mlflow-experiment)")
    ap.add_argument("--output", required=True, help="the JSON to write; tables and figures/ go beside it")
    ap.add_argument("--threshold", type=float, default=10.0, help="critical K: top-K ratio to reach (default 10)")
    ap.add_argument("--n-boot", type=int, default=10_000, help="bootstrap resamples (default 10000)")
    ap.add_argument("--boot-seed", type=int, default=0, help="bootstrap random seed (default 0)")
    ap.add_argument("--depth-bins", type=int, default=10, help="relative depth bins (default 10)")
    ap.add_argument("--top-weights-rows", type=int, default=2_000_000,
                    help="concatenate the cells' top weights beside the JSON up to this many rows (default 2000000)")
    ap.add_argument("--no-figures", action="store_true", help="skip the figures")
    ap.add_argument("-q", "--quiet", action="store_true")
    return ap


def options_from_args(args: argparse.Namespace) -> AnalysisOptions:
    return AnalysisOptions(compare=CompareOptions(n_boot=args.n_boot, boot_seed=args.boot_seed, threshold=args.threshold),
                           weights=WeightOptions(depth_bins=args.depth_bins), top_weights_rows=args.top_weights_rows,
                           figures=not args.no_figures)


def check_args(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.threshold <= 1:
        ap.error(f"--threshold: must be above 1 (a perplexity ratio), got {args.threshold}")
    if args.n_boot < 100:
        ap.error(f"--n-boot: at least 100 resamples, got {args.n_boot}")
    if args.depth_bins < 1:
        ap.error(f"--depth-bins: a positive integer, got {args.depth_bins}")
    if args.tracking_uri and not args.mlflow_experiment:
        ap.error("--tracking-uri: only with --mlflow-experiment")


def main(argv: Sequence[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    check_args(ap, args)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    opts = options_from_args(args)
    try:
        if args.mlflow_experiment:
            a = analyze_mlflow(args.mlflow_experiment, args.tracking_uri, options=opts, output=args.output)
        else:
            a = analyze(args.result_dirs, options=opts, output=args.output)
    except (FileNotFoundError, ValueError) as e:
        ap.error(str(e))
    log.info("%d cells analysed (%d skipped) -> %s", a["cells"]["n_loaded"], a["cells"]["n_skipped"], args.output)
    for h in a["hypotheses"]:
        log.info("%s %s: %s", h["id"], h["verdict"], h["statement"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
