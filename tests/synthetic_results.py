"""Synthetic result folders in the exact format the command and sweeps write, with planted
signals (ratios, type and depth profiles, stability, metric correlation, recurring lines),
for the analysis tests. Numpy and pandas only; Parquet written directly, so that even a
hundred cells of a 32-layer model's top weights are written in seconds.

``legacy=True`` writes the older format: no protocol block, no ``ppl_status``, no ``expert``
column, CSV top weights with col 0 for vectors, no ``n_layers``/``hf_id``, no score sample.
"""
from __future__ import annotations

import json
import math
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

CONTROLS = ("random_k", "bottom_k")
ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
NORMS = ("input_layernorm", "post_attention_layernorm")


def _h(*parts) -> int:
    """A stable small seed from strings and numbers (Python's hash() is salted per process)."""
    return zlib.crc32("|".join(map(str, parts)).encode())


@dataclass(frozen=True)
class SynthModel:
    """A Llama-shaped model: 4 attention + 3 MLP matrices + 2 norms per layer, a final norm."""

    name: str = "synth/llama-a"
    n_layers: int = 4
    hidden: int = 64
    inter: int = 128
    model_type: str = "llama"

    def tensors(self) -> list[dict]:
        h, i = self.hidden, self.inter
        shapes = {"self_attn.q_proj": [h, h], "self_attn.k_proj": [h, h], "self_attn.v_proj": [h, h],
                  "self_attn.o_proj": [h, h], "mlp.gate_proj": [i, h], "mlp.up_proj": [i, h], "mlp.down_proj": [h, i]}
        out = []
        for layer in range(self.n_layers):
            for m in ATTN + MLP:
                out.append({"name": f"model.layers.{layer}.{m}.weight", "layer": layer,
                            "param_type": "attention" if m in ATTN else "mlp", "shape": shapes[m]})
            for m in NORMS:
                out.append({"name": f"model.layers.{layer}.{m}.weight", "layer": layer, "param_type": "norm", "shape": [h]})
        out.append({"name": "model.norm.weight", "layer": -1, "param_type": "norm", "shape": [h]})
        return out


def flat_profile(depth: float) -> float:
    return 1.0


@dataclass
class SynthCell:
    """One experiment folder's planted content. ``ratios``: selection -> per-seed ratio (None
    is written as JSON null with the status from ``statuses``, default "inf")."""

    model: SynthModel = field(default_factory=SynthModel)
    metric: str = "grad_x_weight"
    topk: int = 10
    mode: str = "global"
    seeds: tuple[int, ...] = (0, 1, 2)
    perturb: str = "sign_flip"
    perturb_bit: int | None = None
    ratios: dict[str, Sequence[float | None]] = field(default_factory=lambda: {
        "top_k": [100.0, 120.0, 110.0], "random_k": [3.0, 3.2, 2.9], "bottom_k": [1.01, 1.02, 1.0]})
    statuses: dict[str, Sequence[str]] = field(default_factory=dict)
    baseline_ppl: float = 20.0
    window_length: int = 128
    eval_windows: int = 16
    eval_source: str = "corpora/tinystories_val.txt"
    bos: str = "window"
    dtype: str = "float32"
    type_means: dict[str, float] = field(default_factory=lambda: {"attention": 3.0, "mlp": 2.0, "norm": 1.0})
    depth_profile: Callable[[float], float] = flat_profile  # relative depth in (0, 1) -> factor
    jaccard: float | None = 0.9  # every seed pair; None: no stability.json
    spearman: float = 0.95
    sample_sigma: float = 0.2  # noise of the score sample around |z| (small: agrees with magnitude)
    sample_size: int = 400
    set_key: str = ""  # cells with the same key (and seed and shape) draw the same top-K positions; "" = per model
    seed_dependent_sets: bool = True  # False: every seed draws the same top-K set
    exact_placement: bool = False  # global: each tensor holds its expected share of K (largest remainder), no draw
    planted_line: tuple[str, str, int, int] | None = None  # (parameter, "row"/"col", index, weights)
    shuffle_rows: bool = False  # write top weights in random row order
    fmt: str = "parquet"
    legacy: bool = False
    status: str = "finished"
    super_weights: list[dict] | None = None
    data_independent: bool | None = None

    @property
    def settings(self) -> dict:
        return {"model": self.model.name, "metric": self.metric, "topk": self.topk, "out_dir": None, "mode": self.mode,
                "max_samples": 8, "max_length": self.window_length, "eval_samples": self.eval_windows,
                "eval_length": self.window_length, "protocol": "heldout", "device": "cpu", "dtype": "auto",
                "perturb": self.perturb, "perturb_scale": None, "perturb_bit": self.perturb_bit,
                "controls": [c for c in CONTROLS if c in self.ratios], "seeds": list(self.seeds),
                "stability_check": self.jaccard is not None and len(self.seeds) > 1, "save_plots": False,
                "data_file": self.eval_source, "eval_file": None, "bos": self.bos,
                "param_types": ["attention", "mlp", "norm"], "hutchinson_probes": 16, "micro_batch": None,
                "eval_batch_size": 8, "stability_sample": 10000, "revision": None, "trust_remote_code": False}


# --------------------------------------------------------------------------- the files

def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1, allow_nan=False))


def _protocol(c: SynthCell) -> dict:
    return {"name": "heldout", "eval_source": c.eval_source, "eval_sha256": f"sha-{_h(c.eval_source)}",
            "window_length": c.window_length, "bos": c.bos, "eval_windows": c.eval_windows,
            "calib_source": c.eval_source}


def _mean_score(c: SynthCell, t: dict) -> float:
    depth = (t["layer"] + 0.5) / c.model.n_layers if t["layer"] >= 0 else 1.0
    return c.type_means[t["param_type"]] * c.depth_profile(depth)


def _stats(c: SynthCell, tensors: list[dict]) -> dict:
    per_seed = []
    for s in c.seeds:
        jitter = 1.0 + 0.01 * ((s % 5) - 2)
        pt = []
        for t in tensors:
            n = int(np.prod(t["shape"]))
            m = _mean_score(c, t) * jitter
            pt.append({"name": t["name"], "layer": t["layer"], "param_type": t["param_type"], "shape": t["shape"],
                       "count": n, "mean": m, "std": m / 2, "min": 0.0, "max": m * 10, "p50": m * 0.8,
                       "p95": m * 3, "p99": m * 5})

        def agg(rows):
            n = sum(r["count"] for r in rows)
            return {"count": n, "mean": sum(r["count"] * r["mean"] for r in rows) / n, "std": 0.0,
                    "min": 0.0, "max": max(r["max"] for r in rows), "p50": 0.0, "p95": 0.0, "p99": 0.0}

        layers = sorted({t["layer"] for t in tensors})
        types = list(dict.fromkeys(t["param_type"] for t in tensors))
        per_seed.append({"seed": s, "per_tensor": pt,
                         "per_layer": [{"layer": L, **agg([r for r in pt if r["layer"] == L])} for L in layers],
                         "per_param_type": [{"param_type": T, **agg([r for r in pt if r["param_type"] == T])} for T in types]})
    return {"metric": c.metric, "per_seed": per_seed}


def _largest_remainder(k: int, w: np.ndarray) -> np.ndarray:
    """``k`` split in proportion to ``w`` in whole numbers (Hamilton's method: floors, then the
    largest remainders get one more each)."""
    q = k * w / w.sum()
    per = np.floor(q).astype(np.int64)
    per[np.argsort(-(q - per), kind="stable")[: k - per.sum()]] += 1
    return per


def top_weights_frame(c: SynthCell, tensors: list[dict]) -> pd.DataFrame:
    """Top-K rows of every seed (per tensor or global), sorted by seed then score unless
    ``shuffle_rows``; ranks are 1-based within the tensor (per_layer) or overall (global)."""
    numel = np.array([int(np.prod(t["shape"])) for t in tensors], dtype=np.int64)
    ncols = np.array([t["shape"][1] if len(t["shape"]) == 2 else 1 for t in tensors], dtype=np.int64)
    frames = []
    for s in c.seeds:
        rng = np.random.default_rng(_h(c.set_key or c.model.name, c.mode, s if c.seed_dependent_sets else 0))
        if c.mode == "per_layer":
            per = np.minimum(numel, c.topk)
        else:
            w = np.array([n * _mean_score(c, t) for n, t in zip(numel, tensors)])
            per = np.minimum(_largest_remainder(c.topk, w) if c.exact_placement else
                             rng.multinomial(c.topk, w / w.sum()), numel)
        tid = np.repeat(np.arange(len(tensors)), per)
        flat = np.concatenate([rng.choice(n, k, replace=False) for n, k in zip(numel, per)]) if per.sum() else np.zeros(0, np.int64)
        if c.planted_line is not None:  # m picks moved onto one row/column of one tensor
            name, axis, index, m = c.planted_line
            t = next(i for i, x in enumerate(tensors) if x["name"] == name)
            pos = np.flatnonzero(tid == t)[:m] if c.mode == "per_layer" else np.arange(min(m, len(tid)))
            tid[pos] = t
            other = np.arange(len(pos)) % tensors[t]["shape"][1 if axis == "row" else 0]
            flat[pos] = index * ncols[t] + other if axis == "row" else other * ncols[t] + index
        score = rng.random(len(tid)).astype(np.float32) + 1.0
        if c.mode == "per_layer":  # descending within each tensor: rank 1 first
            order = np.lexsort((-score, tid))
            tid, flat, score = tid[order], flat[order], score[order]
            start = np.concatenate([[0], np.cumsum(per)[:-1]])
            rank = np.arange(len(tid)) - np.repeat(start, per) + 1
            glob = np.argsort(-score, kind="stable")
            tid, flat, score, rank = tid[glob], flat[glob], score[glob], rank[glob]
        else:
            order = np.argsort(-score, kind="stable")
            tid, flat, score = tid[order], flat[order], score[order]
            rank = np.arange(1, len(tid) + 1)
        vec_shape = np.array([len(t["shape"]) == 1 for t in tensors])[tid]
        col = np.where(vec_shape, np.nan, flat % ncols[tid]).astype(float)
        frames.append(pd.DataFrame({
            "parameter": pd.Categorical.from_codes(tid, [t["name"] for t in tensors]),
            "layer": np.array([t["layer"] for t in tensors], dtype=np.int16)[tid],
            "param_type": pd.Categorical([t["param_type"] for t in tensors])[tid],
            "expert": pd.Categorical.from_codes(np.zeros(len(tid), np.int8), [""]),
            "row": np.where(vec_shape, flat, flat // ncols[tid]).astype(np.int32), "col": col,
            "score": score, "rank": rank.astype(np.int32), "seed": np.full(len(tid), s, dtype=np.int32)}))
    df = pd.concat(frames, ignore_index=True)
    if c.shuffle_rows:
        df = df.sample(frac=1.0, random_state=0).reset_index(drop=True)
    return df


def _score_sample(c: SynthCell) -> pd.DataFrame:
    z = np.abs(np.random.default_rng(_h(c.model.name, "sample")).standard_normal(c.sample_size)) + 1e-3
    frames = []
    for s in c.seeds:
        if c.metric == "magnitude":
            sc = z
        else:
            noise = np.random.default_rng(_h(c.model.name, c.metric, s)).standard_normal(c.sample_size)
            sc = z * np.exp(c.sample_sigma * noise)
        frames.append(pd.DataFrame({"seed": s, "global_id": np.arange(c.sample_size, dtype=np.int64) * 37,
                                    "parameter": "model.layers.0.mlp.up_proj.weight",
                                    "flat_idx": np.arange(c.sample_size, dtype=np.int64), "score": sc}))
    return pd.concat(frames, ignore_index=True)


def write_cell(folder: str | Path, c: SynthCell) -> Path:
    """Write one experiment folder; returns it."""
    d = Path(folder)
    d.mkdir(parents=True, exist_ok=True)
    tensors = c.model.tensors()
    settings = c.settings
    if c.status != "finished":
        _write_json(d / "manifest.json", {"status": c.status, "error": "RuntimeError: planted failure",
                                          "settings": settings, "files": ["manifest.json"]})
        return d
    files = []
    results = []
    for sel, vals in c.ratios.items():
        stats = list(c.statuses.get(sel, ["inf"] * len(vals)))
        for i, (s, r) in enumerate(zip(c.seeds, vals)):
            row = {"selection": sel, "seed": s, "k": c.topk, "mode": c.mode, "n_weights": c.topk,
                   "ppl": None if r is None else c.baseline_ppl * r, "ppl_ratio": r,
                   "nll": None if r is None else math.log(c.baseline_ppl * r)}
            if not c.legacy:
                row["ppl_status"] = "finite" if r is not None else stats[i]
            results.append(row)
    pert = {"window_length": c.window_length, "eval_windows": c.eval_windows,
            "eval_tokens": c.eval_windows * (c.window_length - 1),
            "baseline": {"ppl": c.baseline_ppl, "nll": math.log(c.baseline_ppl)},
            "perturbation": {"method": c.perturb, "scale": None, "bit": c.perturb_bit},
            "metric": c.metric, "topk": c.topk, "mode": c.mode, "results": results}
    data = {"calib_source": c.eval_source, "eval_source": c.eval_source, "layout": c.bos, "calib_length": c.window_length,
            "eval_length": c.window_length, "eval_windows": c.eval_windows,
            "eval_tokens_scored": c.eval_windows * (c.window_length - 1), "shared_stream": True}
    model = {"model_id": c.model.name, "source": "local", "revision": "sha256:0", "model_type": c.model.model_type,
             "dtype": c.dtype, "n_params": sum(int(np.prod(t["shape"])) for t in tensors)}
    if not c.legacy:
        pert["protocol"] = data["protocol"] = _protocol(c)
        model.update(n_layers=c.model.n_layers, hf_id=None)
    _write_json(d / "perturbation_results.json", pert)
    _write_json(d / "sensitivity_stats.json", _stats(c, tensors))
    files += ["perturbation_results.json", "sensitivity_stats.json"]
    tw = top_weights_frame(c, tensors)
    if c.legacy or c.fmt == "csv":
        tw = tw.drop(columns=["expert"]) if c.legacy else tw
        if c.legacy:
            tw["col"] = tw["col"].fillna(0).astype(np.int64)
        tw.to_csv(d / "top_weights.csv", index=False)
        files.append("top_weights.csv")
    else:
        tw.to_parquet(d / "top_weights.parquet", index=False)
        files.append("top_weights.parquet")
    if c.jaccard is not None and len(c.seeds) > 1:
        di = c.metric == "magnitude" if c.data_independent is None else c.data_independent
        pairs = [(a, b) for i, a in enumerate(c.seeds) for b in c.seeds[i + 1:]]
        jac = [min(1.0, c.jaccard + 0.01 * ((i % 3) - 1)) for i in range(len(pairs))]
        stab = {"metric": c.metric, "data_independent": di, "seeds": list(c.seeds), "k": c.topk, "mode": c.mode,
                "jaccard": {"pairs": [{"a": a, "b": b, "value": v} for (a, b), v in zip(pairs, jac)],
                            "mean": float(np.mean(jac)), "min": min(jac), "max": max(jac)},
                "spearman": {"pairs": [{"a": a, "b": b, "value": c.spearman} for a, b in pairs], "mean": c.spearman,
                             "min": c.spearman, "max": c.spearman, "n_weights": 10000},
                "note": "synthetic"}
        _write_json(d / "stability.json", stab)
        files.append("stability.json")
    if not c.legacy:
        _score_sample(c).to_parquet(d / "score_sample.parquet", index=False)
        files.append("score_sample.parquet")
    if c.super_weights is not None:
        _write_json(d / "super_weights.json", {"model_id": c.model.name, "hf_id": None, "thresholds": {},
                                               "candidates": c.super_weights, "all": {}, "published": None})
        files.append("super_weights.json")
    manifest = {"status": "finished", "settings": settings, "seeds": list(c.seeds), "data": data,
                "baseline_ppl": c.baseline_ppl, "provenance": {"model": model, "git": {"commit": None, "dirty": None},
                                                               "packages": {}, "device": "cpu", "dtype": c.dtype},
                "files": files + ["manifest.json"]}
    _write_json(d / "manifest.json", manifest)
    return d


def write_sweep(root: str | Path, name: str, cells: dict[str, SynthCell]) -> Path:
    """A sweep root: ``sweep_manifest.json`` and one folder per cell id."""
    root = Path(root)
    entries = {}
    for cid, c in cells.items():
        write_cell(root / cid, c)
        entries[cid] = {"status": c.status if c.status != "finished" else "finished", "settings": c.settings,
                        "dir": cid, "error": None if c.status == "finished" else "planted failure",
                        "mlflow_run_id": None}
    _write_json(root / "sweep_manifest.json", {"name": name, "cells": entries, "mlflow": None, "parent_run_id": None})
    return root


# --------------------------------------------------------------------------- ready-made studies

MODEL_A = SynthModel("synth/llama-a", n_layers=4)
MODEL_B = SynthModel("synth/mistral-b", n_layers=6, model_type="mistral")


SUPER_A = [{"layer": 1, "module": "mlp.down_proj", "row": 3, "col": 7, "value": -12.5, "round": 1, "ppl_zeroed": 900.0,
            "ratio_zeroed": 45.0, "ratio_random": 1.0, "ratio_restored": 1.0,
            "ranks": {"grad_x_weight": {"0": {"per_tensor": 1, "global": 2, "global_lower_bound": None},
                                        "1": {"per_tensor": 1, "global": 3, "global_lower_bound": None},
                                        "2": {"per_tensor": 2, "global": 40, "global_lower_bound": None}},
                      "magnitude": {"0": {"per_tensor": 5, "global": None, "global_lower_bound": 500}}}}]


def ratio_plan(model_factor: float, metric_factor: float, k: int, seeds: Sequence[int]) -> dict[str, list[float]]:
    """Damage growing with K (top-K ~ K^1.2), controls flat; a small seed jitter."""
    j = [1.0 + 0.03 * ((s % 3) - 1) for s in seeds]
    jr = [1.0 + 0.02 * (((s + 1) % 3) - 1) for s in seeds]  # not proportional to j: paired differences vary
    top = model_factor * metric_factor * (k / 10) ** 1.2
    return {"top_k": [top * x for x in j], "random_k": [1.5 * x * (1 + k / 1000) for x in jr],
            "bottom_k": [1.0 + 0.001 * x for x in j]}


def study(root: str | Path, *, ks: Sequence[int] = (10, 30, 100), seeds: Sequence[int] = (0, 1, 2),
          mode: str = "global", name: str = "synthetic") -> Path:
    """A sweep of 2 models x 2 metrics x len(ks) K x seeds, planted like a real study."""
    cells = {}
    for m, mf in ((MODEL_A, 2.0), (MODEL_B, 1.0)):
        for metric, ef, sigma in (("grad_x_weight", 1.0, 0.3), ("magnitude", 0.5, 0.0)):
            for k in ks:
                cells[f"{m.name.split('/')[-1]}-{metric}-k{k}"] = SynthCell(
                    model=m, metric=metric, topk=k, mode=mode, seeds=tuple(seeds),
                    ratios=ratio_plan(mf, ef, k, seeds), sample_sigma=sigma, set_key=f"{m.name}/{metric}",
                    jaccard=1.0 if metric == "magnitude" else 0.85, seed_dependent_sets=metric != "magnitude",
                    depth_profile=lambda x: 1.0 + 2.0 * math.exp(-((x - 0.5) ** 2) / 0.02),
                    planted_line=("model.layers.1.mlp.down_proj.weight", "col", 7, max(6, k // 5)) if m is MODEL_A else None,
                    super_weights=SUPER_A if m is MODEL_A and k == ks[-1] else None)
    return write_sweep(root, name, cells)


def speed_study(root: str | Path, *, n_cells: int = 100, n_layers: int = 32, k: int = 500,
                seeds: Sequence[int] = (0, 1, 2)) -> Path:
    """``n_cells`` per-layer cells on a 32-layer 4096/14336 model shape (7 matrices + 2 norms per
    layer): ~430k top-weight rows each. Four distinct folders are written and the rest copied
    (file copies, not a second generation): reading cost is per file either way."""
    import shutil

    model = SynthModel("synth/big", n_layers=n_layers, hidden=4096, inter=14336)
    base = SynthCell(model=model, topk=k, mode="per_layer", seeds=tuple(seeds), sample_size=2000)
    metrics = ("grad_x_weight", "magnitude", "wanda", "grad_squared")
    cells = {f"big-{metrics[i % 4]}-{i:03d}": replace(base, metric=metrics[i % 4], set_key=metrics[i % 4])
             for i in range(n_cells)}
    root = Path(root)
    written: dict[str, Path] = {}
    entries = {}
    for cid, c in cells.items():
        if c.metric not in written:
            written[c.metric] = write_cell(root / cid, c)
        else:
            shutil.copytree(written[c.metric], root / cid)
        entries[cid] = {"status": "finished", "settings": c.settings, "dir": cid, "error": None, "mlflow_run_id": None}
    _write_json(root / "sweep_manifest.json", {"name": "speed", "cells": entries, "mlflow": None, "parent_run_id": None})
    return root
