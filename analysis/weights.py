"""Which weights come out on top: metric agreement on one model, where the top-K weights live
(parameter type, relative depth) with a chi-square test between models, the sensitivity
profile of the full score statistics, recurring rows/columns and super-weight candidates."""
from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

import numpy as np
import pandas as pd

from .common import SCORING, bin_label, cells_list, key_dict, one_cell_per_seed, relative_depth_bin
from .load import ResultSet
from .stats import chi_square_alike, jaccard_sorted, spearman, spread

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
                per.append({"seed_a": sa, "seed_b": sb, "rho": rho, "n_weights": n})
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
                j = jaccard_sorted(rs.topk_keys[(sets[a][sa], sa)], rs.topk_keys[(sets[b][sb], sb)])
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


def location(rs: ResultSet, opts: WeightOptions) -> tuple[list[dict], list[dict]]:
    """Share of the top-K weights by parameter type and by relative depth (mean over seeds),
    against the share of all weights there (enrichment); and a chi-square test of whether two
    models distribute alike (per protocol, metric, K and mode; global mode only)."""
    if rs.topk_counts.empty:
        return [], []
    tc = rs.topk_counts.merge(rs.cells[["cell", *SCORING, "model_name", "n_layers"]], on="cell")
    tc = one_cell_per_seed(tc, SCORING)
    tc["depth_bin"] = relative_depth_bin(tc["layer"], tc["n_layers"], opts.depth_bins)
    ws = rs.tensor_stats
    first_seed = ws.groupby("cell")["seed"].min() if not ws.empty else pd.Series(dtype=float)
    rows, counts = [], {}
    for key, g in tc.groupby(SCORING, sort=True, dropna=False):
        n_seeds = g["seed"].nunique()
        first = g["cell"].min()  # the weights' shares, from one cell and seed of this group
        w = ws[(ws["cell"] == first) & (ws["seed"] == first_seed[first])] if first in first_seed.index else ws.iloc[:0]
        if len(w):
            w = w.assign(depth_bin=relative_depth_bin(w["layer"], pd.Series(g["n_layers"].iloc[0], index=w.index),
                                                      opts.depth_bins))
        for axis, col in (("param_type", "param_type"), ("depth", "depth_bin")):
            c = g.groupby(col)["n"].sum() / n_seeds  # mean count per seed
            wshare = (w.groupby(col)["count"].sum() / w["count"].sum()) if len(w) else pd.Series(dtype=float)
            c = c.reindex(c.index.union(wshare.index), fill_value=0.0)  # a type with no top-K weight is a 0, not n/a
            counts[(key, axis)] = c.to_dict()
            for cat, v in c.items():
                share = v / c.sum()
                ws_ = wshare.get(cat)
                rows.append({**key_dict(SCORING, key), "model_name": g["model_name"].iloc[0], "axis": axis,
                             "category": bin_label(int(cat), opts.depth_bins) if axis == "depth" else cat,
                             "bin": int(cat) if axis == "depth" else None, "count_mean": v, "share": share,
                             "weight_share": ws_, "enrichment": share / ws_ if ws_ else None, "n_seeds": n_seeds,
                             "by_construction": key[SCORING.index("mode")] == "per_layer",
                             "cells": cells_list(g["cell"])})
    tests = []
    groups: dict[tuple, list] = {}
    for (key, axis) in counts:
        kd = key_dict(SCORING, key)
        groups.setdefault((kd["protocol"], kd["metric"], kd["k"], kd["mode"], kd["variant"], axis), []).append(key)
    for (proto, metric, k, mode, variant, axis), keys in sorted(groups.items(), key=lambda x: str(x[0])):
        for ka, kb in combinations(sorted(keys, key=str), 2):
            a, b = key_dict(SCORING, ka), key_dict(SCORING, kb)
            t = {"protocol": proto, "metric": metric, "k": k, "mode": mode, "variant": variant, "axis": axis,
                 "model_a": a["model"], "model_b": b["model"],
                 "cells": cells_list(tc[tc["model"].isin([a["model"], b["model"]]) & (tc["metric"] == metric)
                                        & (tc["k"] == k) & (tc["mode"] == mode) & (tc["protocol"] == proto)]["cell"])}
            if mode == "per_layer":
                t.update(p_value=None, note=PER_LAYER_NOTE)
            else:
                t.update(chi_square_alike(counts[(ka, axis)], counts[(kb, axis)]))
                t["counts"] = "mean top-K count per seed in each category"
            tests.append(t)
    return rows, tests


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


def super_weight_table(rs: ResultSet) -> tuple[list[dict], list[dict]]:
    """Super-weight candidates (once per model and coordinate) beside every metric's ranks, and
    whether each metric's top-K cells hold them; and the comparison with published ones."""
    if not rs.super_weights:
        return [], []
    cells = rs.cells.set_index("cell")
    seen, rows, published = set(), [], []
    for sw in rs.super_weights:
        model = cells.loc[sw["cell"], "model"]
        if sw.get("published") is not None:
            published.append({"model": model, "cell": sw["cell"], **sw["published"]})
        for c in sw.get("candidates", []):
            ident = (model, c.get("layer"), c.get("module"), c.get("row"), c.get("col"))
            if ident in seen:
                continue
            seen.add(ident)
            in_top = []
            for metric, per_seed in (c.get("ranks") or {}).items():
                mine = rs.cells[(rs.cells["model"] == model) & (rs.cells["metric"] == metric)]
                for (k, mode), g in mine.groupby(["k", "mode"]):
                    hits, total = [], 0
                    for seed, r in per_seed.items():
                        total += 1
                        rank = r.get("per_tensor") if mode == "per_layer" else r.get("global")
                        if rank is None and mode != "per_layer" and (r.get("global_lower_bound") or 0) > k:
                            continue  # only a lower bound, already above K
                        if rank is not None and rank <= k:
                            hits.append(int(seed))
                    in_top.append({"metric": metric, "k": int(k), "mode": mode, "seeds_in_top_k": hits,
                                   "seeds_ranked": total, "cells": cells_list(g["cell"])})
            rows.append({"model": model, "model_name": cells.loc[sw["cell"], "model_name"],
                         **{k: c.get(k) for k in ("layer", "module", "row", "col", "value", "round", "ppl_zeroed",
                                                  "ratio_zeroed", "ratio_random", "ratio_restored")},
                         "ranks": c.get("ranks"), "in_top_k": in_top, "cells": [sw["cell"]]})
    return rows, published
