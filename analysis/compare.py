"""Perplexity damage compared across selections, K and seeds: ratio summaries with bootstrap
intervals, the paired test of top-K against each control, dose-response and critical K,
and top-K stability across seeds."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from .common import GROUP, SCORING, cells_list, key_dict
from .stats import bootstrap_mean, critical_k, jaccard_sorted, loglog_at, paired_test, spread

@dataclass(frozen=True)
class CompareOptions:
    n_boot: int = 10_000  # bootstrap resamples
    boot_seed: int = 0  # the bootstrap's random seed (results are reproducible)
    level: float = 0.95
    alpha: float = 0.05
    threshold: float = 10.0  # critical K: the smallest K whose top-K ratio reaches this


def tagged_results(results: pd.DataFrame, cells: pd.DataFrame, warnings: list[str]) -> pd.DataFrame:
    """Per-seed results with their cell's group keys; a seed measured twice for the same group
    (the same cell read from two folders) is kept once, and said so."""
    if results.empty:
        return results
    r = results.drop(columns=["k"], errors="ignore").merge(cells[["cell", *GROUP, "model_name"]], on="cell", how="inner")
    dup = r.duplicated([*GROUP, "selection", "seed"], keep="first")
    if dup.any():
        for row in r[dup].itertuples():
            warnings.append(f"seed {row.seed} {row.selection} of {row.model}/{row.metric}/K={row.k} is measured again "
                            f"in cell {row.cell}; the first cell's value is used")
        r = r[~dup]
    return r.sort_values([*GROUP, "selection", "seed"], kind="stable").reset_index(drop=True)


def ratio_summary(r: pd.DataFrame, opts: CompareOptions) -> list[dict]:
    """Per group and selection: mean and geometric mean ratio over seeds with bootstrap
    intervals; infinite ratios count as +inf, missing (NaN) ones are listed and left out."""
    out = []
    if r.empty:
        return out
    for key, g in r.groupby([*GROUP, "selection"], sort=True, dropna=False):
        v = g["ratio"].to_numpy(dtype=float)
        ok = ~np.isnan(v)
        row = {**key_dict([*GROUP, "selection"], key), "model_name": g["model_name"].iloc[0],
               "seeds": [int(s) for s in g["seed"]], "n_seeds": int(ok.sum()), "n_inf": int(np.isinf(v).sum()),
               "missing": [{"cell": c, "seed": int(s), "ppl_status": st} for c, s, st, m in
                           zip(g["cell"], g["seed"], g["ppl_status"], ~ok) if m]}
        arith = bootstrap_mean(v[ok], n_boot=opts.n_boot, seed=opts.boot_seed, level=opts.level)
        geo = bootstrap_mean(v[ok], n_boot=opts.n_boot, seed=opts.boot_seed, level=opts.level, geometric=True)
        row.update(mean=arith["mean"], ci=[arith["lo"], arith["hi"]], geomean=geo["mean"], geomean_ci=[geo["lo"], geo["hi"]],
                   median=float(np.median(v[ok])) if ok.any() else None,
                   min=float(v[ok].min()) if ok.any() else None, max=float(v[ok].max()) if ok.any() else None,
                   interval=arith["method"] + f", {opts.n_boot} resamples, seed {opts.boot_seed}, {opts.level:.0%}",
                   note=arith.get("note"), cells=cells_list(g["cell"]))
        out.append(row)
    return out


def paired_tests(r: pd.DataFrame, opts: CompareOptions) -> list[dict]:
    """top_k against random_k (and bottom_k) seed by seed, per group."""
    out = []
    if r.empty:
        return out
    for key, g in r.groupby(GROUP, sort=True, dropna=False):
        wide = g.pivot_table(index="seed", columns="selection", values="ratio", aggfunc="first")
        if "top_k" not in wide:
            continue
        for control in ("random_k", "bottom_k"):
            if control not in wide:
                continue
            pair = wide[["top_k", control]].dropna()
            t = paired_test(pair["top_k"], pair[control], alpha=opts.alpha)
            out.append({**key_dict(GROUP, key), "model_name": g["model_name"].iloc[0], "control": control,
                        "seeds": [int(s) for s in pair.index], **t, "cells": cells_list(g["cell"])})
    return out


def dose_response(summary: list[dict], opts: CompareOptions) -> list[dict]:
    """Per group without K (cells that differ only in K): each selection's geometric-mean ratio
    against K, the critical K of top_k (log-log interpolation) and random_k there."""
    if not summary:
        return []
    s = pd.DataFrame(summary)
    rest = [c for c in GROUP if c != "k"]
    out = []
    for key, g in s.groupby(rest, sort=True, dropna=False):
        ks = sorted(g["k"].unique())
        points = []
        for k in ks:
            p = {"k": int(k)}
            for sel, h in g[g["k"] == k].groupby("selection"):
                h = h.iloc[0]
                p[sel] = {"geomean": h["geomean"], "ci": h["geomean_ci"], "mean": h["mean"], "n_seeds": h["n_seeds"],
                          "n_inf": h["n_inf"], "cells": h["cells"]}
            points.append(p)
        top = g[g["selection"] == "top_k"].sort_values("k")
        rnd = g[g["selection"] == "random_k"].sort_values("k")
        top_r = [np.nan if v is None else v for v in top["geomean"]]
        crit = critical_k(top["k"].tolist(), top_r, opts.threshold)
        at = None
        if crit["critical_k"] is not None and len(rnd):
            at = loglog_at(rnd["k"].tolist(), [np.nan if v is None else v for v in rnd["geomean"]], crit["critical_k"])
        rnd_bracket = {int(k): v for k, v in zip(rnd["k"], rnd["geomean"]) if crit["bracket"] and k in crit["bracket"]}
        out.append({**key_dict(rest, key), "model_name": g["model_name"].iloc[0], "ks": [int(k) for k in ks],
                    "n_k": len(ks), "points": points, "critical": crit,
                    "ratio_used": "geometric mean of the top_k ratio over seeds",
                    "random_k_at_critical": at, "random_k_at_bracket": rnd_bracket,
                    "note": None if len(ks) > 1 else "one K: no curve, only a bound on the critical K",
                    "cells": sorted({c for cs in g["cells"] for c in cs})})
    return out


def stability_table(stab: pd.DataFrame, cells: pd.DataFrame, keys: dict[tuple[str, int], np.ndarray]) -> list[dict]:
    """Jaccard and Spearman across seed pairs per model, metric, K and mode, with their spread.
    Pairs come from stability.json; a cell without one but with 2+ seeds of top weights gets
    its Jaccard from those (source "top_weights"). A data-independent metric's 1.0 is flagged."""
    rows = [] if stab.empty else [stab]
    have = set(stab["cell"]) if not stab.empty else set()
    extra = []
    by_cell: dict[str, dict[int, np.ndarray]] = {}
    for (cell, seed), ids in keys.items():
        if cell not in have:
            by_cell.setdefault(cell, {})[seed] = ids
    for cell, per in by_cell.items():
        seeds = sorted(per)
        for i, a in enumerate(seeds):
            for b in seeds[i + 1:]:
                extra.append({"cell": cell, "statistic": "jaccard", "a": a, "b": b,
                              "value": jaccard_sorted(per[a], per[b]), "source": "top_weights"})
    if extra:
        rows.append(pd.DataFrame(extra))
    if not rows:
        return []
    s = pd.concat(rows, ignore_index=True).merge(cells[["cell", *SCORING, "model_name", "data_independent"]], on="cell")
    # cells sharing a scoring pass report the same pairs: keep each pair once
    s = s.sort_values("cell", kind="stable").drop_duplicates([*SCORING, "statistic", "a", "b"])
    out = []
    for key, g in s.groupby(SCORING, sort=True, dropna=False):
        di = bool(g["data_independent"].fillna(False).astype(bool).any())
        row = {**key_dict(SCORING, key), "model_name": g["model_name"].iloc[0], "data_independent": di,
               "sources": sorted(set(g["source"])), "cells": cells_list(g["cell"])}
        for stat in ("jaccard", "spearman"):
            h = g[g["statistic"] == stat]
            row[stat] = {**spread(h["value"]), "pairs": [{"a": int(a), "b": int(b), "value": v}
                                                          for a, b, v in zip(h["a"], h["b"], h["value"])]}
        row["note"] = ("data-independent metric: every seed gives the same scores, so its agreement is 1.0 by "
                       "construction and is not evidence of stability") if di else None
        out.append(row)
    return out
