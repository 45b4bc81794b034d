"""Which weights come out on top: metric agreement on one model, where the top-K weights live
(parameter type, relative depth) against each model's own parameter shares (enrichment, tested
within a model and compared between models: analysis/enrichment.py), the sensitivity
profile of the full score statistics, recurring rows/columns and super-weight candidates."""
from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import combinations

import numpy as np
import pandas as pd

from cwa_core.numerics import jaccard, spearman, spread

from .common import SCORING, bin_label, cells_list, key_dict, one_cell_per_seed, relative_depth_bin
from .enrichment import compare_enrichment, enrichment_rows, goodness_of_fit
from .load import ResultSet

SAME_MODEL = ["protocol", "model", "param_types"]  # metrics are compared only within one of these
PER_LAYER_NOTE = ("per_layer mode takes K weights from every tensor, so where the top-K weights live is fixed by "
                  "construction (the number of tensors of each type and layer); no test is run on it")


@dataclass(frozen=True)
class WeightOptions:
    depth_bins: int = 10  # relative depth bins (layer / n_layers), so 32- and 40-layer models line up
    recurring_top: int = 25  # recurring lines kept per model, metric, K and mode


def data_independence(rs: ResultSet) -> dict[tuple, bool | None]:
    """(protocol, model, metric) -> whether the metric ignores the calibration data: from
    stability.json when there, else True when every seed's score sample is identical."""
    out: dict[tuple, bool | None] = {}
    c = rs.cells
    if c.empty:
        return out
    for key, g in c.groupby(["protocol", "model", "metric"]):
        flags = g["data_independent"].dropna()
        out[key] = bool(flags.astype(bool).any()) if len(flags) else None
    if not rs.score_sample.empty:
        ss = rs.score_sample.merge(c[["cell", "protocol", "model", "metric"]], on="cell")
        for key, g in ss.groupby(["protocol", "model", "metric"]):
            if out.get(key) is None and g["seed"].nunique() > 1:
                wide = g.pivot_table(index="global_id", columns="seed", values="score", aggfunc="first")
                out[key] = bool(wide.nunique(axis=1, dropna=False).le(1).all())
    return out


def _seed_pairs(a: list[int], b: list[int], a_indep: bool | None, b_indep: bool | None) -> list[tuple[int, int]]:
    """Same seeds where both have them; else a data-independent side's one score set against
    every seed of the other (its seeds are interchangeable)."""
    common = sorted(set(a) & set(b))
    if common:
        return [(s, s) for s in common]
    if a_indep:
        return [(a[0], s) for s in b]
    if b_indep:
        return [(s, b[0]) for s in a]
    return []


def metric_spearman(rs: ResultSet, indep: dict) -> list[dict]:
    """Spearman between every pair of metrics on the shared weight sample (score_sample), per
    model, protocol and parameter types, seed by seed, with the spread over seeds."""
    if rs.score_sample.empty:
        return []
    ss = rs.score_sample.merge(rs.cells[["cell", *SAME_MODEL, "metric", "model_name"]], on="cell")
    ss = one_cell_per_seed(ss, [*SAME_MODEL, "metric"])
    out = []
    for key, g in ss.groupby(SAME_MODEL, sort=True):
        samples = {m: {int(s): h.set_index("global_id")["score"] for s, h in gm.groupby("seed")}
                   for m, gm in g.groupby("metric")}
        for a, b in combinations(sorted(samples), 2):
            ia, ib = indep.get((key[0], key[1], a)), indep.get((key[0], key[1], b))
            per = []
            for sa, sb in _seed_pairs(sorted(samples[a]), sorted(samples[b]), ia, ib):
                x, y = samples[a][sa].align(samples[b][sb], join="inner")
                rho, n = spearman(x.to_numpy(), y.to_numpy())
                per.append({"seed_a": sa, "seed_b": sb, "rho": None if math.isnan(rho) else rho, "n_weights": n})
            rhos = [np.nan if p["rho"] is None else p["rho"] for p in per]
            cells = g[g["metric"].isin([a, b])]["cell"]
            out.append({**key_dict(SAME_MODEL, key), "model_name": g["model_name"].iloc[0], "metric_a": a,
                        "metric_b": b, "per_seed": per, "rho": spread(rhos),
                        "note": None if per else "no common seed and neither metric is data-independent",
                        "cells": cells_list(cells)})
    return out


def topk_overlap(rs: ResultSet, indep: dict) -> list[dict]:
    """Jaccard of the top-K sets of every pair of metrics at the same K, mode and seed."""
    if not rs.topk_keys:
        return []
    idx = pd.DataFrame([{"cell": c, "seed": s} for c, s in rs.topk_keys])
    idx = idx.merge(rs.cells[["cell", *SAME_MODEL, "k", "mode", "metric", "model_name"]], on="cell")
    by = [*SAME_MODEL, "k", "mode"]
    idx = one_cell_per_seed(idx, [*by, "metric"])
    out = []
    for key, g in idx.groupby(by, sort=True):
        sets = {m: {int(s): c for s, c in zip(gm["seed"], gm["cell"])} for m, gm in g.groupby("metric")}
        for a, b in combinations(sorted(sets), 2):
            ia, ib = indep.get((key[0], key[1], a)), indep.get((key[0], key[1], b))
            per = []
            for sa, sb in _seed_pairs(sorted(sets[a]), sorted(sets[b]), ia, ib):
                j = jaccard(rs.topk_keys[(sets[a][sa], sa)], rs.topk_keys[(sets[b][sb], sb)], assume_unique=True)
                per.append({"seed_a": sa, "seed_b": sb, "jaccard": j})
            out.append({**key_dict(by, key), "model_name": g["model_name"].iloc[0], "metric_a": a, "metric_b": b,
                        "per_seed": per, "jaccard": spread([p["jaccard"] for p in per]),
                        "cells": cells_list([*sets[a].values(), *sets[b].values()])})
    return out


def _weighted_mean(df: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    w = df.assign(cm=df["count"] * df["mean"])
    g = w.groupby(by, dropna=False)[["cm", "count"]].sum()
    return (g["cm"] / g["count"]).rename("mean_score").reset_index()


def sensitivity_profile(rs: ResultSet, opts: WeightOptions) -> list[dict]:
    """Mean score per weight by parameter type, relative-depth bin and layer, relative to the
    model's mean (so metrics and models of different scale line up), averaged over seeds; from
    sensitivity_stats (every weight, not just the top K)."""
    if rs.tensor_stats.empty:
        return []
    key = ["protocol", "model", "metric", "variant"]
    ts = rs.tensor_stats.merge(rs.cells[["cell", *key, "model_name", "n_layers"]], on="cell")
    ts = one_cell_per_seed(ts, key)
    ts = ts[np.isfinite(ts["mean"]) & (ts["count"] > 0)].copy()
    ts["depth_bin"] = relative_depth_bin(ts["layer"], ts["n_layers"], opts.depth_bins)
    overall = _weighted_mean(ts, [*key, "seed"]).rename(columns={"mean_score": "overall"})
    meta = {k: (g["model_name"].iloc[0], g["n_layers"].iloc[0], cells_list(g["cell"]))
            for k, g in ts.groupby(key, dropna=False)}  # per (protocol, model, metric, variant)
    out = []
    for axis, col in (("param_type", "param_type"), ("depth", "depth_bin"), ("layer", "layer")):
        m = _weighted_mean(ts, [*key, "seed", col]).merge(overall, on=[*key, "seed"])
        m["relative"] = m["mean_score"] / m["overall"]
        agg = m.groupby([*key, col], dropna=False).agg(mean_score=("mean_score", "mean"), relative=("relative", "mean"),
                                                       n_seeds=("seed", "nunique")).reset_index()
        for r in agg.to_dict("records"):
            model_name, n_layers, cells = meta[tuple(r[k] for k in key)]
            cat = r[col]
            out.append({**{k: r[k] for k in key}, "model_name": model_name, "n_layers": n_layers, "axis": axis,
                        "category": bin_label(int(cat), opts.depth_bins) if axis == "depth" else
                        (int(cat) if axis == "layer" else cat), "bin": int(cat) if axis == "depth" else None,
                        "mean_score": r["mean_score"], "relative": r["relative"], "n_seeds": r["n_seeds"],
                        "cells": cells})
    return out


def _location_counts(rs: ResultSet, opts: WeightOptions) -> dict[tuple, dict]:
    """(scoring key, axis) -> the mean top-K count per seed of each group, the share of the
    scored parameters in it (from one cell and seed of the key: every seed scores the same
    tensors), and the cells. Keys are :data:`SCORING` (protocol, model, metric, K, mode, variant)."""
    tc = rs.topk_counts.merge(rs.cells[["cell", *SCORING, "model_name", "n_layers"]], on="cell")
    tc = one_cell_per_seed(tc, SCORING)
    tc["depth_bin"] = relative_depth_bin(tc["layer"], tc["n_layers"], opts.depth_bins)
    ws = rs.tensor_stats
    first_seed = ws.groupby("cell")["seed"].min() if not ws.empty else pd.Series(dtype=float)
    out = {}
    for key, g in tc.groupby(SCORING, sort=True, dropna=False):
        first = g["cell"].min()
        w = ws[(ws["cell"] == first) & (ws["seed"] == first_seed[first])] if first in first_seed.index else ws.iloc[:0]
        if len(w):
            w = w.assign(depth_bin=relative_depth_bin(w["layer"], pd.Series(g["n_layers"].iloc[0], index=w.index),
                                                      opts.depth_bins))
        for axis, col in (("param_type", "param_type"), ("depth", "depth_bin")):
            c = g.groupby(col)["n"].sum() / g["seed"].nunique()  # mean count per seed
            wshare = (w.groupby(col)["count"].sum() / w["count"].sum()) if len(w) else pd.Series(dtype=float)
            c = c.reindex(c.index.union(wshare.index), fill_value=0.0)  # a type with no top-K weight is a 0, not n/a
            out[(key, axis)] = {"counts": c.to_dict(), "shares": wshare.to_dict(), "n_seeds": g["seed"].nunique(),
                                "model_name": g["model_name"].iloc[0], "cells": cells_list(g["cell"])}
    return out


def location(rs: ResultSet, opts: WeightOptions) -> tuple[list[dict], list[dict], list[dict]]:
    """Where the top-K weights live (parameter type, relative depth), against where the model's
    parameters are (analysis/enrichment.py): per group the enrichment with its interval and
    exact test; per model a goodness-of-fit test to its own parameter shares; and between two
    models of one protocol, metric, K, mode and variant a test of whether their enrichment
    differs (never their raw counts). Tests in global mode only (per_layer: by construction)."""
    if rs.topk_counts.empty:
        return [], [], []
    per = _location_counts(rs, opts)
    rows, fits = [], []
    for (key, axis), d in per.items():
        kd, per_layer = key_dict(SCORING, key), key[SCORING.index("mode")] == "per_layer"
        ids = {**kd, "model_name": d["model_name"], "axis": axis}
        for cat, r in enrichment_rows(d["counts"], d["shares"]).items():
            rows.append({**ids, "category": bin_label(int(cat), opts.depth_bins) if axis == "depth" else cat,
                         "bin": int(cat) if axis == "depth" else None, "count_mean": r["count"], "share": r["share"],
                         "weight_share": r["weight_share"], "enrichment": r["enrichment"],
                         "enrichment_ci": [None, None] if per_layer else r["enrichment_ci"],
                         "p_value": None if per_layer else r["p_value"],
                         "n_seeds": d["n_seeds"], "by_construction": per_layer, "cells": d["cells"]})
        fit = {"p_value": None, "note": PER_LAYER_NOTE} if per_layer else goodness_of_fit(d["counts"], d["shares"])
        fits.append({**ids, **fit, "cells": d["cells"]})
    pairs: dict[tuple, list] = {}
    for key, axis in per:
        kd = key_dict(SCORING, key)
        pairs.setdefault((*(kd[c] for c in SCORING if c != "model"), axis), []).append(key)
    tests = []
    for (*rest, axis), keys in sorted(pairs.items(), key=lambda x: tuple(v if isinstance(v, int) else str(v)
                                                                          for v in x[0])):  # K in numeric order
        for ka, kb in combinations(sorted(keys, key=str), 2):
            a, b = per[(ka, axis)], per[(kb, axis)]
            t = {**{c: v for c, v in zip([c for c in SCORING if c != "model"], rest)}, "axis": axis,
                 "model_a": key_dict(SCORING, ka)["model"], "model_b": key_dict(SCORING, kb)["model"],
                 "model_name_a": a["model_name"], "model_name_b": b["model_name"],
                 "cells": cells_list(a["cells"] + b["cells"])}
            if t["mode"] == "per_layer":
                t.update(p_value=None, note=PER_LAYER_NOTE)
            else:
                t.update(compare_enrichment(a["counts"], a["shares"], b["counts"], b["shares"]))
            tests.append(t)
    return rows, fits, tests


def recurring_lines(rs: ResultSet, opts: WeightOptions) -> tuple[list[dict], list[dict]]:
    """Rows/columns of a tensor holding many top-K weights (a super weight's signature: one
    input channel carrying a massive activation), per model, metric, K and mode, with in how
    many seeds each recurs; and the lines that several metrics agree on."""
    if rs.lines.empty:
        return [], []
    li = rs.lines.merge(rs.cells[["cell", *SCORING, "model_name", "n_seeds"]], on="cell")
    li = one_cell_per_seed(li, SCORING)
    line = ["parameter", "axis", "index"]
    agg = li.groupby([*SCORING, *line], dropna=False).agg(
        layer=("layer", "first"), param_type=("param_type", "first"), seeds_flagged=("seed", "nunique"),
        count_mean=("count", "mean"), share_mean=("share", "mean"), enrichment_max=("enrichment", "max"),
        k_tensor=("k_tensor", "max"), n_lines=("n_lines", "first"), n_seeds=("n_seeds", "max"),
        model_name=("model_name", "first"), cells=("cell", cells_list)).reset_index()
    agg = agg.sort_values([*SCORING, "seeds_flagged", "share_mean"], ascending=[True] * len(SCORING) + [False, False],
                          kind="stable").groupby(SCORING, dropna=False).head(opts.recurring_top)
    rows = agg.to_dict("records")
    cross = []
    for key, g in agg.groupby(["protocol", "model", *line]):
        if g["metric"].nunique() > 1:
            cross.append({**key_dict(["protocol", "model", *line], key), "model_name": g["model_name"].iloc[0],
                          "layer": g["layer"].iloc[0], "metrics": sorted(g["metric"].unique()),
                          "cells": sorted({c for cs in g["cells"] for c in cs})})
    return rows, cross


SW_GROUP = ["model", "protocol", "variant"]  # one super-weight study: its candidates, causal numbers and ranks
SW_NUMBERS = ("layer", "module", "row", "col", "value", "round", "ppl_zeroed", "ratio_zeroed", "ratio_random",
              "ratio_restored")


def _in_top_k(cells: pd.DataFrame, row: dict) -> list[dict]:
    """For each metric that ranked the candidate, and each K and mode of that metric's cells of
    the candidate's own model, protocol and variant: the seeds whose top-K holds it."""
    same = cells[(cells["model"] == row["model"]) & (cells["protocol"] == row["protocol"])
                 & (cells["variant"] == row["variant"])]
    out = []
    for metric, per_seed in sorted(row["ranks"].items()):
        for (k, mode), g in same[same["metric"] == metric].groupby(["k", "mode"]):
            ran = {s for seeds in g["seeds"] for s in str(seeds).split(",") if s != ""}
            hits, ranked = [], 0
            for seed, r in sorted(per_seed.items(), key=lambda x: int(x[0])):
                rank = r.get("per_tensor") if mode == "per_layer" else r.get("global")
                bound = None if mode == "per_layer" else r.get("global_lower_bound")
                if seed not in ran or (rank is None and (bound is None or bound <= k)):
                    continue  # ranked under a seed these cells did not run, or not known to be in or out
                ranked += 1
                if rank is not None and rank <= k:
                    hits.append(int(seed))
            out.append({"metric": metric, "k": int(k), "mode": mode, "seeds_in_top_k": hits, "seeds_ranked": ranked,
                        "cells": cells_list(g["cell"])})
    return out


def super_weight_table(rs: ResultSet) -> tuple[list[dict], list[dict]]:
    """Super-weight candidates, one row per coordinate and study (model, protocol, variant: the
    prompts and settings it was found with), with the causal numbers of that study, every
    metric's ranks (each cell's file ranks its own metric), and whether each metric's top-K
    cells of the same protocol and variant hold it; and the comparison with published
    coordinates, once per study."""
    if not rs.super_weights:
        return [], []
    cells = rs.cells.set_index("cell")
    rows: dict[tuple, dict] = {}
    published: dict[tuple, dict] = {}
    for sw in rs.super_weights:
        info = cells.loc[sw["cell"]]
        group = {k: info[k] for k in SW_GROUP}
        key = tuple(group.values())
        if sw.get("published") is not None:
            entry = published.setdefault(key, {**sw["published"], **group, "model_name": info["model_name"], "cells": []})
            entry["cells"].append(sw["cell"])
        for c in sw.get("candidates", []):
            row = rows.setdefault((*key, *(c.get(k) for k in ("layer", "module", "row", "col"))), {
                **group, "model_name": info["model_name"], **{k: c.get(k) for k in SW_NUMBERS}, "ranks": {}, "cells": []})
            row["cells"].append(sw["cell"])
            for metric, per_seed in (c.get("ranks") or {}).items():
                mine = row["ranks"].setdefault(metric, {})
                for seed, r in per_seed.items():
                    mine.setdefault(str(seed), r)  # one scoring pass per seed: the same rank in every cell
    for row in rows.values():
        row["in_top_k"] = _in_top_k(rs.cells, row)
        row["cells"] = cells_list(row["cells"])
    for p in published.values():
        p["cells"] = cells_list(p["cells"])
    return list(rows.values()), list(published.values())
