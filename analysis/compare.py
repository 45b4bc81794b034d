"""Perplexity damage compared across selections, K and seeds: ratio summaries with intervals
of known coverage (t on log ratios over seeds; the evaluation windows' bootstrap where seeds
carry no spread), the paired test of top-K against each control with Holm's adjustment over
a report's tests, dose-response and critical K, and top-K stability across seeds."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from cwa_core.numerics import jaccard, spread
from cwa_core.schema import CONTROL_KINDS

from .common import GROUP, SCORING, cells_list, key_dict
from .stats import FEW_SEEDS, critical_k, holm, loglog_at, paired_test, seed_interval, window_bootstrap

log = logging.getLogger(__name__)
INTERVALS = {
    "t": "t interval on log ratios over seeds: the geometric mean ratio exp(mean log r -+ t(n-1) sd / sqrt(n)); "
         "its coverage is the stated level when log ratios are normal (a simulation at n = 3 gives 95%, where the "
         "percentile bootstrap over 3 seeds, i.e. [min, max], gives 74%)",
    "windows": "paired percentile bootstrap over the evaluation windows (the same windows resampled for the "
               "baseline and the perturbed model): used where seeds carry no spread (every seed gives the same ratio, "
               "as a data-independent metric's top-K and bottom-K do, or one seed of such a metric)",
    "order": "an infinite ratio among the seeds: [smallest seed, inf], below the median with probability 1 - 0.5^n",
    "zero": "no spread over seeds and no per-window numbers (older folders): a zero-width interval",
    "none": "one seed: no interval",
    "few_seeds": f"rows with fewer than {FEW_SEEDS} seeds carry a warning: the interval over seeds is wide and rests "
                 "on log ratios being normal",
}
HOLM = ("Holm (1979) step-down adjustment over every test of this report that gives a p-value (the paired tests, "
        "the location goodness-of-fit tests and the location comparisons between models, together; the per-group "
        "enrichment tests, descriptive, are not in the family): p_holm < alpha controls the family-wise error at alpha")

@dataclass(frozen=True)
class CompareOptions:
    n_boot: int = 10_000  # window-bootstrap resamples (intervals where seeds carry no spread)
    boot_seed: int = 0  # the bootstrap's random seed (results are reproducible)
    level: float = 0.95
    alpha: float = 0.05
    threshold: float = 10.0  # critical K: the smallest K whose top-K ratio reaches this


def tagged_results(results: pd.DataFrame, cells: pd.DataFrame, warnings: list[str]) -> pd.DataFrame:
    """Per-seed results with their cell's group keys; a seed measured twice for the same group
    (the same cell read from two folders) is kept once, and said so."""
    if results.empty:
        return results
    extra = ["data_independent"] if "data_independent" in cells else []
    r = results.drop(columns=["k"], errors="ignore").merge(cells[["cell", *GROUP, "model_name", *extra]], on="cell",
                                                           how="inner")
    dup = r.duplicated([*GROUP, "selection", "seed"], keep="first")
    if dup.any():  # one line per repeating cell (a campaign cell repeats its Phase 1 measurement by design)
        first = r[~dup].set_index([*GROUP, "selection", "seed"])["cell"]
        for cell, rows in r[dup].groupby("cell", sort=False):
            row = next(rows.itertuples())
            of = first.loc[tuple(getattr(row, k) for k in [*GROUP, "selection", "seed"])]
            warnings.append(f"cell {cell} measures {row.model}/{row.metric}/K={row.k} again ({len(rows)} seed and "
                            f"selection values, e.g. seed {row.seed} {row.selection}); cell {of}'s values are used")
        r = r[~dup]
    return r.sort_values([*GROUP, "selection", "seed"], kind="stable").reset_index(drop=True)


def _window_sums(windows: pd.DataFrame | None) -> dict[tuple, tuple[np.ndarray, np.ndarray]]:
    """(cell, selection, seed) -> ((W,) summed NLL, (W,) predictions) in window order."""
    if windows is None or windows.empty:
        return {}
    w = windows.sort_values(["cell", "selection", "seed", "window"], kind="stable")
    return {(c, sel, int(seed)): (g["nll"].to_numpy(dtype=float), g["tokens"].to_numpy(dtype=float))
            for (c, sel, seed), g in w.groupby(["cell", "selection", "seed"], sort=False)}


def _window_interval(g: pd.DataFrame, win: dict, opts: CompareOptions) -> dict | None:
    """The window bootstrap of the group's first seed (its seeds repeat one measurement)."""
    x = g.iloc[0]
    base, pert = win.get((x["cell"], "baseline", -1)), win.get((x["cell"], x["selection"], int(x["seed"])))
    if base is None or pert is None or base[0].size != pert[0].size:
        return None
    wb = window_bootstrap(base[0], pert[0], base[1], n_boot=opts.n_boot, seed=opts.boot_seed, level=opts.level)
    return wb if wb["lo"] is not None else None


def _interval(g: pd.DataFrame, v: np.ndarray, seedless: bool, win: dict, opts: CompareOptions) -> dict:
    """The row's interval: over seeds (:func:`seed_interval`), or over evaluation windows where
    the seeds carry no spread (equal ratios, or one seed of a measurement that does not depend
    on the seed: ``seedless``)."""
    iv = seed_interval(v, level=opts.level)
    out = {"geomean": iv["geomean"], "ci": [iv["lo"], iv["hi"]], "interval": iv["method"], "interval_code": iv["code"],
           "interval_coverage": iv["coverage"], "warning": iv["warning"], "note": iv["note"], "window_bootstrap": None}
    if not (iv["no_spread"] or (iv["n"] == 1 and seedless)):
        return out
    wb = _window_interval(g, win, opts)
    why = "every seed gives the same ratio" if iv["no_spread"] else "one seed of a seed-independent measurement"
    if wb is None:
        out["note"] = (f"{why}; no per-window numbers (window_nll.parquet; older folders lack it) to give the "
                       "spread of the evaluation text" + (": the interval has zero width" if iv["no_spread"] else ""))
        return out
    out.update(ci=[wb["lo"], wb["hi"]], interval=wb["method"], interval_code="windows", interval_coverage=None,
               warning=None, window_bootstrap={k: wb[k] for k in ("ratio", "n_windows", "n_boot", "seed", "lo", "hi")},
               note=f"{why}: the interval is the evaluation windows' spread (seed {int(g.iloc[0]['seed'])}, "
                    f"cell {g.iloc[0]['cell']})")
    return out


def ratio_summary(r: pd.DataFrame, opts: CompareOptions, windows: pd.DataFrame | None = None) -> list[dict]:
    """Per group and selection: mean and geometric mean ratio over seeds, and an interval of
    the geometric mean with a stated method (``interval``, ``interval_code``: t, windows,
    order, zero or none); infinite ratios count as +inf, missing (NaN) ones are listed and left
    out. ``windows``: per-window NLL sums (:attr:`ResultSet.windows`) for the window bootstrap."""
    out = []
    if r.empty:
        return out
    win = _window_sums(windows)
    for key, g in r.groupby([*GROUP, "selection"], sort=True, dropna=False):
        v = g["ratio"].to_numpy(dtype=float)
        ok = ~np.isnan(v)
        indep = bool(g["data_independent"].fillna(False).astype(bool).any()) if "data_independent" in g else False
        row = {**key_dict([*GROUP, "selection"], key), "model_name": g["model_name"].iloc[0],
               "seeds": [int(s) for s in g["seed"]], "n_seeds": int(ok.sum()), "n_inf": int(np.isinf(v).sum()),
               "data_independent": indep,
               "missing": [{"cell": c, "seed": int(s), "ppl_status": st} for c, s, st, m in
                           zip(g["cell"], g["seed"], g["ppl_status"], ~ok) if m]}
        x = v[ok]
        mean = None if not x.size else (math.inf if np.isinf(x).any() else min(max(float(x.mean()), x.min()), x.max()))
        # a data-independent metric's top-K and bottom-K, perturbed without a seeded draw, are the same in every seed
        seedless = indep and key[-1] != "random_k" and not str(key[GROUP.index("perturbation")]).startswith("gauss_noise")
        iv = _interval(g[ok], x, seedless, win, opts)
        row.update(mean=mean, median=float(np.median(x)) if x.size else None,
                   min=float(x.min()) if x.size else None, max=float(x.max()) if x.size else None,
                   **iv, geomean_ci=list(iv["ci"]), level=opts.level, cells=cells_list(g["cell"]))
        out.append(row)
    few = sum(1 for x in out if x["warning"])
    if few:
        log.warning("%d of %d ratio summaries rest on fewer than %d seeds: their intervals over seeds are wide and "
                    "assume normal log ratios (see each row's warning)", few, len(out), FEW_SEEDS)
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
        for control in CONTROL_KINDS:
            if control not in wide:
                continue
            pair = wide[["top_k", control]].dropna()
            t = paired_test(pair["top_k"], pair[control], alpha=opts.alpha, names=("top_k", control))
            out.append({**key_dict(GROUP, key), "model_name": g["model_name"].iloc[0], "control": control,
                        "seeds": [int(s) for s in pair.index], **t, "cells": cells_list(g["cell"])})
    return out


def apply_holm(families: dict[str, list[dict]], alpha: float) -> dict:
    """Holm's adjustment over every row with a ``p_value`` in ``families`` (name -> rows, e.g.
    the paired tests and the location tests): each row gets ``p_holm`` (None without a test);
    a paired test's verdict says when the adjustment changes its reading. Returns the summary."""
    flat = [(name, row) for name, rows in families.items() for row in rows]
    adj = holm([row.get("p_value") for _, row in flat])
    for (name, row), q in zip(flat, adj):
        row["p_holm"] = q
        p = row.get("p_value")
        if q is None or "verdict" not in row or name != "paired_tests":
            continue
        if p < alpha <= q:
            row["verdict"] += f"; not significant after Holm's adjustment over this report's tests (p_holm={q:.3g})"
            row["outcome"] = f"{row.get('outcome')} (not after Holm)"
        elif q < alpha:
            row["verdict"] += f"; still significant after Holm's adjustment (p_holm={q:.3g})"
    tested = [(row.get("p_value"), q) for (_, row), q in zip(flat, adj) if q is not None]
    return {"method": HOLM, "alpha": alpha, "n_tests": len(tested),
            "families": {name: sum(1 for r in rows if r.get("p_value") is not None) for name, rows in families.items()},
            "significant_raw": sum(1 for p, _ in tested if p < alpha),
            "significant_holm": sum(1 for _, q in tested if q < alpha)}


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
                              "value": jaccard(per[a], per[b], assume_unique=True), "source": "top_weights"})
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
