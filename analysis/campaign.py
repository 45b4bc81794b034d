"""Phase 2 (issue 17) across cells: every campaign cell's ``campaign_results.json`` as tables,
and the pairing of base and instruct models.

The per-cell statistics (summary per arm and level, paired McNemar tests, the headline) are read
as :mod:`cwa_core.campaign_stats` stored them in the file, never recomputed here: one cell is one
scoring pass of one model, and its headline is the number the report states.

Tables (Parquet beside the analysis JSON, only when some cell has campaign data):
``campaign_trials`` (one row per arm per trial), ``campaign_summary`` (per cell, arm and level),
``campaign_paired`` (per cell, level and arm against the reference), ``campaign_headline`` (per
cell), and ``pairs`` (base vs instruct, only when a pair is found).
"""
from __future__ import annotations

import json
import math

import pandas as pd

from .common import value
from .load import ResultSet

# a cell's keys on every Phase 2 row: those of the Phase 1 tables, then the campaign's own
CELL_KEYS = ("cell", "protocol", "model", "model_name", "metric", "k", "mode", "variant")
LEVEL_WORDS = {"error_rate": "the bit error rate", "quant_bits": "bits", "sparsity": "sparsity"}
# Instruct variants of a base model id: the base id with one of these tokens inserted, at the end
# or before a "-" (Llama-2-7b-chat-hf, Mistral-7B-Instruct-v0.1, gemma-2-2b-it). Case-sensitive.
INSTRUCT_TOKENS = ("-Instruct", "-instruct", "-it", "-chat", "-Chat")


def _keys(cell: dict, camp: dict) -> dict:
    """A campaign cell's keys; its group settings as text (quant_group "row" or "128" in one column)."""
    s = camp.get("settings") or {}
    return {**{k: cell.get(k) for k in CELL_KEYS}, "campaign": camp.get("campaign"),
            "level_name": camp.get("level_name"), "harsher": camp.get("harsher"),
            **{k: None if s.get(k) is None else str(s[k]) for k in ("bits", "quant_group", "prune_group")},
            "fail_ratio": s.get("fail_ratio")}


def _flat(row: dict) -> dict:
    """A row whose nested values (lists, dicts) are JSON text, for Parquet."""
    return {k: json.dumps(v, allow_nan=True) if isinstance(v, (dict, list, tuple)) else v for k, v in row.items()}


def headline_numbers(h: dict | None) -> dict:
    """The numbers of a headline as :func:`cwa_core.campaign_stats.summarize` stores it, as the
    report prints them: ``available``, ``value`` (the point, or the bound's value when censored;
    NaN when neither), ``lo``, ``hi`` (its interval; NaN where absent), ``censored``, ``bound``
    (">=" or "<=" when only bounded), ``why`` (when not available)."""
    h = h or {"available": False, "why": "no headline in campaign_results.json"}
    iv = h.get("interval") or [None, None]
    censored = bool(h.get("censored", False))
    return {"available": bool(h.get("available", True)), "why": h.get("why"),
            "value": value(h.get("bound_value") if censored else h.get("value")), "lo": value(iv[0]),
            "hi": value(iv[1]), "censored": censored, "bound": str(h.get("bound") or "").partition(" ")[0] or None}


def campaign_tables(rs: ResultSet) -> tuple[dict, dict[str, pd.DataFrame]]:
    """The analysis' "campaign" section (per-cell keys, summaries, paired tests, headlines) and
    its tables; ``({}, {})`` when no cell has campaign data."""
    if not rs.campaigns:
        return {}, {}
    cells = rs.cells.set_index("cell", drop=False)
    trials, summary, paired, heads = [], [], [], []
    for camp in rs.campaigns:
        keys = _keys(cells.loc[camp["cell"]].to_dict(), camp)
        trials += [{**keys, **r} for r in camp.get("trials", [])]
        summary += [{**keys, **r} for r in camp.get("summary", [])]
        paired += [{**keys, **r} for r in camp.get("paired", [])]
        h = camp.get("headline")
        heads.append({**keys, "n_protected": (camp.get("arms") or {}).get("top_k", {}).get("n_protected"),
                      "baseline_ppl": camp.get("baseline_ppl"), **headline_numbers(h), "headline": h})
    section = {"cells": sorted({h["cell"] for h in heads}), "summary": summary, "paired": paired, "headlines": heads}
    tables = {"campaign_trials": pd.DataFrame(trials), "campaign_summary": pd.DataFrame(map(_flat, summary)),
              "campaign_paired": pd.DataFrame(map(_flat, paired)), "campaign_headline": pd.DataFrame(map(_flat, heads))}
    return section, {k: v for k, v in tables.items() if len(v)}


# --------------------------------------------------------------------------- headline in words

def _g(x: float) -> str:
    """A number as the headline prints it: 2 significant digits, plain between 0.01 and 10^4
    (100, 8.1, 0.12), else in e-notation (1e-06)."""
    return f"{float(f'{x:.2g}'):g}" if x == 0 or 0.01 <= abs(x) < 1e4 else f"{x:.2g}"


def headline_sentence(h: dict) -> str:
    """One headline row (:func:`campaign_tables`' ``headlines``) in words, e.g. "protecting the
    top-K=64 magnitude weights of m tolerates 8.1x [3.2, 20] the bit error rate of protecting 64
    random weights at a 50% failure rate (fail: ratio > 2 or non-finite)"."""
    k, n = h["k"], h.get("n_protected")
    n = k if n is None else n  # per_layer: K in each tensor, n in all
    who = (f"protecting the top-K={k} {h['metric']} weights ({h['mode']}{f': {n} weights' if n != k else ''}) of "
           f"{h['model_name']}")
    target = (h.get("headline") or {}).get("target", 0.5)
    fail = f"(fail: ratio > {_g(value(h['fail_ratio']))} or non-finite)" if h.get("fail_ratio") is not None else ""
    if not h["available"]:
        return f"{who}: no {h['campaign']} headline ({h['why'] or 'not computed'})"
    v, lo, hi = value(h["value"]), value(h["lo"]), value(h["hi"])
    iv = "" if math.isnan(lo) or math.isnan(hi) else f" [{_g(lo)}, {_g(hi)}]"
    word = LEVEL_WORDS.get(h["level_name"], h["level_name"])
    unit = ("x" if math.isfinite(v) else " x") if h["level_name"] == "error_rate" else ""
    if h["censored"] and h.get("bound") is None:
        return (f"{who}: the {h['campaign']} headline cannot be bounded (both tolerated levels lie beyond the same end "
                f"of the tested range) {fail}").rstrip()
    side = {">=": "at least ", "<=": "at most "}.get(h["bound"], "") if h["censored"] else ""
    amount = f"{side}{_g(v)}{unit}{iv}"
    at = f"at a {target:.0%} failure rate {fail}".rstrip()
    if h["level_name"] == "error_rate":
        return f"{who} tolerates {amount} {word} of protecting {n} random weights {at}"
    if h["level_name"] == "quant_bits":
        return f"{who} needs {amount} fewer {word} than protecting {n} random weights {at}"
    return f"{who} tolerates {amount} more {word} than protecting {n} random weights {at}"


# --------------------------------------------------------------------------- base vs instruct

def instruct_base(model: str) -> str | None:
    """The base model id of an instruct variant: the last :data:`INSTRUCT_TOKENS` token that ends
    the id or precedes a "-", removed; None when ``model`` carries no such token."""
    found = []
    for tok in INSTRUCT_TOKENS:
        start = 0
        while (i := model.find(tok, start)) > 0:
            if i + len(tok) == len(model) or model[i + len(tok)] == "-":
                found.append((i, tok))
            start = i + 1
    if not found:
        return None
    i, tok = max(found)
    return model[:i] + model[i + len(tok):]


def model_pairs(models) -> list[tuple[str, str]]:
    """(base, instruct) for every model whose :func:`instruct_base` is also among ``models``."""
    have = set(map(str, models))
    return sorted((b, m) for m in have if (b := instruct_base(m)) is not None and b in have)


PAIR_SETTING = ("protocol", "metric", "k", "mode", "perturbation", "variant")  # Phase 1 ratios match on these
HEAD_SETTING = ("protocol", "metric", "k", "mode", "variant", "campaign", "bits", "quant_group", "prune_group",
                "fail_ratio")


def _super_weight_effect(rs: ResultSet) -> dict[tuple, dict]:
    """(model, protocol) -> the super-weight study's causal row with every candidate zeroed
    together (super_weights.json's ``all``), from the first cell by label that has one."""
    cells = rs.cells.set_index("cell")
    out: dict[tuple, dict] = {}
    for sw in sorted(rs.super_weights, key=lambda x: x["cell"]):
        info = cells.loc[sw["cell"]]
        if sw.get("all"):
            out.setdefault((info["model"], info["protocol"]), {**sw["all"], "cell": sw["cell"]})
    return out


def _pair_row(pair: tuple[str, str], names: dict, where: dict, quantity: str, b, i, note: str = "") -> dict:
    """One row of the pairs table: ``where`` holds the matched settings (protocol, metric, K, ...)."""
    (base, inst), bv, iv = pair, value(b), value(i)
    keys = {k: where.get(k) for k in ("protocol", "metric", "k", "mode", "perturbation", "campaign", "variant")}
    setting = " ".join(str(x) for x in (keys["metric"], keys["k"] and f"K={keys['k']}", keys["mode"],
                                        keys["perturbation"] or keys["campaign"]) if x) or "-"
    return {"base": base, "instruct": inst, "base_name": names[base], "instruct_name": names[inst], **keys,
            "setting": setting, "quantity": quantity, "base_value": bv, "instruct_value": iv,
            "difference": iv - bv if math.isfinite(bv) and math.isfinite(iv) else math.nan, "note": note}


def _headline_value(h: dict) -> tuple[float, str]:
    """A headline's point value (NaN when censored or unavailable) and what stands instead."""
    if not h["available"]:
        return math.nan, f"unavailable ({h['why']})"
    if h["censored"]:
        return math.nan, f"{h['bound']} {_g(value(h['value']))}" if h.get("bound") else "not bounded"
    return value(h["value"]), ""


def pairs_table(rs: ResultSet, ratios: list[dict], headlines: list[dict]) -> list[dict]:
    """Base vs instruct, per pair and matching settings: Phase 1 top_k and random_k geometric-mean
    ratios, the super-weight study's ratio with every candidate zeroed (and its random control),
    each campaign headline; ``difference`` = instruct - base (NaN unless both are finite)."""
    if rs.cells.empty:
        return []
    pairs = model_pairs(rs.cells["model"].unique())
    names = dict(zip(rs.cells["model"].astype(str), rs.cells["model_name"]))
    sw = _super_weight_effect(rs)
    rows = []
    for pair in pairs:
        by_key: dict[tuple, dict] = {}
        for r in ratios:
            if r["model"] in pair and r["selection"] in ("top_k", "random_k"):
                by_key.setdefault((*(r[c] for c in PAIR_SETTING), r["selection"]), {})[r["model"]] = r["geomean"]
        for (*key, sel), v in sorted(by_key.items(), key=lambda kv: str(kv[0])):
            if len(v) == 2:
                rows.append(_pair_row(pair, names, dict(zip(PAIR_SETTING, key)), f"phase 1 {sel} ratio",
                                      v[pair[0]], v[pair[1]]))
        for (model, proto), b in sw.items():
            i = sw.get((pair[1], proto)) if model == pair[0] else None
            for q in ("ratio_zeroed", "ratio_random") if i is not None else ():
                rows.append(_pair_row(pair, names, {"protocol": proto}, f"super weights {q}", b.get(q), i.get(q),
                                      f"{b.get('n')} vs {i.get('n')} candidates"))
        heads: dict[tuple, dict] = {}
        for h in headlines:
            if h["model"] in pair:
                heads.setdefault(tuple(h[c] for c in HEAD_SETTING), {}).setdefault(h["model"], h)
        for key, hs in sorted(heads.items(), key=lambda kv: str(kv[0])):
            if len(hs) == 2:
                (bv, bn), (iv, inn) = (_headline_value(hs[m]) for m in pair)
                note = "; ".join(f"{who} {n}" for who, n in (("base", bn), ("instruct", inn)) if n)
                rows.append(_pair_row(pair, names, dict(zip(HEAD_SETTING, key)),
                                      f"{key[5]} headline ({hs[pair[0]]['level_name']})", bv, iv, note))
    return rows
