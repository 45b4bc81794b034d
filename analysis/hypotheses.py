"""The study's seed hypotheses, each stated, checked against the analysis with its numbers,
and judged "supported", "not supported" or "not measured" (with why). Never skipped.

A hypothesis over several models/metrics/K is supported only when every measured case holds
(the evidence lists each case, so a reader sees how many did)."""
from __future__ import annotations

from typing import Callable

import numpy as np

from .common import value

SUPPORTED, NOT_SUPPORTED, NOT_MEASURED = "supported", "not supported", "not measured"
JACCARD_BARS = {100: 0.8, 500: 0.6, 1000: 0.4}
TYPE_ORDER = ("attention", "mlp", "norm")


def _verdict(cases: list[dict], why_none: str) -> tuple[str, str | None]:
    if not cases:
        return NOT_MEASURED, why_none
    held = sum(bool(c["holds"]) for c in cases)
    return (SUPPORTED if held == len(cases) else NOT_SUPPORTED), f"holds in {held} of {len(cases)} cases"


def _ratio_range(a: dict, selection: str, lo: float | None, hi: float) -> list[dict]:
    cases = []
    for r in a["ratios"]:
        if r["selection"] != selection or r["mean"] is None:
            continue
        m = value(r["mean"])
        # a range [lo, hi] is inclusive; "under hi" (no lo) is strict
        holds = (m >= lo and m <= hi) if lo is not None else m < hi
        cases.append({"model": r["model"], "model_name": r["model_name"], "metric": r["metric"], "k": r["k"],
                      "mode": r["mode"],
                      "perturbation": r["perturbation"], "protocol": r["protocol"], "mean_ratio": r["mean"],
                      "ci": r["ci"], "n_seeds": r["n_seeds"], "holds": bool(holds), "cells": r["cells"]})
    return cases


def _types(a: dict) -> list[dict]:
    cases = []
    prof = [p for p in a["sensitivity_profile"] if p["axis"] == "param_type"]
    keys = sorted({(p["protocol"], p["model"], p["metric"], p["variant"]) for p in prof})
    for key in keys:
        rows = {p["category"]: p for p in prof if (p["protocol"], p["model"], p["metric"], p["variant"]) == key}
        if not all(t in rows for t in TYPE_ORDER):
            continue
        v = [value(rows[t]["mean_score"]) for t in TYPE_ORDER]
        cases.append({"protocol": key[0], "model": key[1], "model_name": rows[TYPE_ORDER[0]]["model_name"],
                      "metric": key[2], **{f"mean_score_{t}": rows[t]["mean_score"] for t in TYPE_ORDER},
                      "holds": bool(v[0] > v[1] > v[2]),
                      "cells": sorted({c for t in TYPE_ORDER for c in rows[t]["cells"]})})
    return cases


def _middle(a: dict) -> list[dict]:
    """Count-weighted mean score of the first, middle and last third of the layers."""
    cases = []
    prof = [p for p in a["sensitivity_profile"] if p["axis"] == "layer" and p["category"] >= 0]
    keys = sorted({(p["protocol"], p["model"], p["metric"], p["variant"]) for p in prof})
    for key in keys:
        rows = [p for p in prof if (p["protocol"], p["model"], p["metric"], p["variant"]) == key]
        n = rows[0]["n_layers"]
        if not n or n < 3:
            continue
        thirds: dict[int, list[float]] = {0: [], 1: [], 2: []}
        for p in rows:
            thirds[min(int(3 * (p["category"] + 0.5) / n), 2)].append(value(p["mean_score"]))
        if not all(thirds.values()):
            continue
        e, m, l_ = (float(np.mean(thirds[i])) for i in range(3))
        cases.append({"protocol": key[0], "model": key[1], "model_name": rows[0]["model_name"], "metric": key[2],
                      "n_layers": n,
                      "mean_score_early": e, "mean_score_middle": m, "mean_score_late": l_,
                      "holds": bool(m > e and m > l_), "cells": sorted({c for p in rows for c in p["cells"]})})
    return cases


def _jaccard(a: dict) -> tuple[list[dict], list[dict]]:
    cases, excluded = [], []
    for s in a["stability"]:
        if s["k"] not in JACCARD_BARS or s["jaccard"]["mean"] is None:
            continue
        bar = JACCARD_BARS[s["k"]]
        row = {"protocol": s["protocol"], "model": s["model"], "model_name": s["model_name"], "metric": s["metric"],
               "k": s["k"], "mode": s["mode"],
               "jaccard_mean": s["jaccard"]["mean"], "jaccard_min": s["jaccard"]["min"], "bar": bar,
               "n_pairs": s["jaccard"]["n"], "cells": s["cells"]}
        if s["data_independent"]:
            excluded.append({**row, "why": "data-independent metric: 1.0 by construction, not evidence"})
        else:
            cases.append({**row, "holds": bool(s["jaccard"]["mean"] > bar)})
    return cases, excluded


def _correlated(a: dict) -> list[dict]:
    cases = []
    for s in a["metric_agreement"]["spearman"]:
        if {s["metric_a"], s["metric_b"]} != {"grad_x_weight", "magnitude"} or s["rho"]["mean"] is None:
            continue
        cases.append({"protocol": s["protocol"], "model": s["model"], "model_name": s["model_name"],
                      "spearman_mean": s["rho"]["mean"],
                      "spearman_min": s["rho"]["min"], "n_seed_pairs": s["rho"]["n"],
                      "holds": bool(s["rho"]["mean"] > 0.5), "cells": s["cells"]})
    return cases


def check_hypotheses(a: dict) -> list[dict]:
    """Every hypothesis with its verdict, rule, cases (numbers and cells) and reason."""
    specs: list[tuple[str, str, str, Callable[[], list[dict]], str]] = [
        ("H1", "Perturbing the top-K weights raises perplexity 10x-1000x.",
         "mean top_k ratio over seeds within [10, 1000] in every model/metric/K/mode/perturbation/protocol group",
         lambda: _ratio_range(a, "top_k", 10.0, 1000.0), "no top_k result"),
        ("H2", "Perturbing K random weights raises perplexity 2x-10x.",
         "mean random_k ratio within [2, 10] in every group", lambda: _ratio_range(a, "random_k", 2.0, 10.0),
         "no random_k control was run"),
        ("H3", "Perturbing the bottom-K weights raises perplexity less than 2x.",
         "mean bottom_k ratio below 2 in every group", lambda: _ratio_range(a, "bottom_k", None, 2.0),
         "no bottom_k control was run"),
        ("H4", "Attention weights are more sensitive than MLP weights, which are more than norm weights.",
         "mean score per weight (count-weighted over tensors, mean over seeds; sensitivity_stats) "
         "attention > mlp > norm for every model and metric", lambda: _types(a),
         "no model and metric with statistics for all of attention, mlp and norm"),
        ("H5", "The middle layers are the most sensitive.",
         "mean score per weight of the middle third of the layers above both the first and the last third, "
         "for every model and metric", lambda: _middle(a), "no model with 3+ layers and per-tensor statistics"),
    ]
    out = []
    for hid, statement, rule, fn, why in specs:
        cases = fn()
        verdict, how = _verdict(cases, why)
        out.append({"id": hid, "statement": statement, "rule": rule, "verdict": verdict,
                    "why" if verdict == NOT_MEASURED else "summary": how, "cases": cases,
                    "cells": sorted({c for x in cases for c in x["cells"]})})
    cases, excluded = _jaccard(a)
    measured_k = sorted({c["k"] for c in cases})
    why = ("no data-dependent metric has stability at K = 100, 500 or 1000"
           + (" (only data-independent metrics there, excluded: their 1.0 is by construction)" if excluded else ""))
    verdict, how = _verdict(cases, why)
    if cases and len(measured_k) < len(JACCARD_BARS):
        how += f"; K = {', '.join(str(k) for k in JACCARD_BARS if k not in measured_k)} not measured"
    out.append({"id": "H6", "statement": "Top-K sets are stable across seeds: Jaccard above 0.8, 0.6 and 0.4 at "
                "K = 100, 500 and 1000.", "rule": "mean Jaccard over seed pairs above the bar at its K, for every "
                "data-dependent metric, model and mode measured at those K", "verdict": verdict,
                "why" if verdict == NOT_MEASURED else "summary": how, "cases": cases, "excluded": excluded,
                "cells": sorted({c for x in cases + excluded for c in x["cells"]})})
    cases = _correlated(a)
    verdict, how = _verdict(cases, "grad_x_weight and magnitude were not both scored with a shared weight sample "
                                   "(score_sample.parquet) on one model")
    out.append({"id": "H7", "statement": "grad_x_weight and magnitude scores are correlated (r > 0.5).",
                "rule": "Spearman rank correlation on the shared weight sample, mean over seeds, above 0.5 on every "
                        "model (rank correlation: the scores are heavy-tailed)", "verdict": verdict,
                "why" if verdict == NOT_MEASURED else "summary": how, "cases": cases,
                "cells": sorted({c for x in cases for c in x["cells"]})})
    return out
