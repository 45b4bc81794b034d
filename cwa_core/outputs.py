"""The files of one experiment: manifest, top weights, statistics, results, plots.

Every file is written atomically (temporary name, then rename), and ``manifest.json`` last,
so a folder with a manifest is complete; a failed run leaves a manifest saying so.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from .experiment import ExperimentResult, SeedScores
from .selection import TensorStats

PACKAGES = ("torch", "transformers", "numpy", "scipy", "tokenizers", "safetensors", "ray", "mlflow", "cwa")
STAT_KEYS = ("count", "mean", "std", "min", "max", "p50", "p95", "p99")
CSV_COLUMNS = ("parameter", "layer", "param_type", "row", "col", "score", "rank", "seed")


def atomic_write(path: Path, data: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


def _clean(o):
    """JSON-safe: NaN/inf become null (strict JSON), tuples lists, tensors numbers."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {str(k): _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    if isinstance(o, (np.generic, torch.Tensor)):
        return _clean(o.item())
    if isinstance(o, Path):
        return str(o)
    return o


def write_json(path: Path, obj) -> None:
    atomic_write(path, json.dumps(_clean(obj), indent=2, allow_nan=False) + "\n")


# --------------------------------------------------------------------------- provenance

def git_state(repo: Path | None = None) -> dict:
    repo = repo or Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if commit.returncode != 0:
            return {"commit": None, "dirty": None}
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        return {"commit": commit.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def package_versions(names: Iterable[str] = PACKAGES) -> dict:
    out = {"python": platform.python_version()}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            out[n] = None
    return out


def peak_memory() -> dict:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    out = {"cpu_max_rss_bytes": rss if sys.platform == "darwin" else rss * 1024}
    if torch.cuda.is_available():
        out["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
    return out


def provenance(device: str, dtype: str, model_info: dict | None) -> dict:
    return {"git": git_state(), "packages": package_versions(), "device": device, "dtype": dtype,
            "model": model_info, "host": platform.node(), "platform": platform.platform(),
            "torch_threads": torch.get_num_threads(),
            "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


# --------------------------------------------------------------------------- tables

def top_weights_rows(seed_scores: Sequence[SeedScores], tensors: Sequence[dict], k: int, mode: str) -> list[tuple]:
    """Rows of top_weights.csv for every seed, sorted by seed then descending score."""
    ncols = torch.tensor([s["shape"][1] if len(s["shape"]) == 2 else 1 for s in tensors])
    rows: list[tuple] = []
    for ss in seed_scores:
        sel = ss.selection("top_k", mode, k)
        order = torch.argsort(sel.scores, descending=True, stable=True)
        tid, idx, sc, rk = sel.tensor_ids[order], sel.flat_idx[order], sel.scores[order], sel.ranks()[order]
        nc = ncols[tid]
        r, c = (idx // nc).tolist(), (idx % nc).tolist()
        for t, ri, ci, s, rank in zip(tid.tolist(), r, c, sc.tolist(), rk.tolist()):
            m = tensors[t]
            rows.append((m["name"], m["layer"], m["param_type"], ri, ci, s, rank, ss.seed))
    return rows


def write_csv(path: Path, columns: Sequence[str], rows: Sequence[tuple]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    w.writerows((f"{v:.8g}" if isinstance(v, float) else v for v in row) for row in rows)
    atomic_write(path, buf.getvalue())


def _aggregate(group: Sequence[tuple[TensorStats, torch.Tensor]]) -> dict:
    """Exact count/mean/std/min/max over tensors; percentiles from per-tensor samples weighted
    by tensor size (each sample stands for numel/len(sample) weights)."""
    counts = np.array([s.count for s, _ in group], dtype=np.float64)
    means = np.array([s.mean for s, _ in group])
    n = counts.sum()
    mean = float((counts * means).sum() / n)
    ex2 = (counts * (np.array([s.std for s, _ in group]) ** 2 + means ** 2)).sum() / n
    vals = np.concatenate([x.numpy() for _, x in group]).astype(np.float64)
    w = np.concatenate([np.full(len(x), s.count / max(len(x), 1)) for s, x in group])
    order = np.argsort(vals)
    cw = np.cumsum(w[order]) / w.sum()
    pct = {f"p{q}": float(vals[order][min(np.searchsorted(cw, q / 100), len(vals) - 1)]) for q in (50, 95, 99)}
    return {"count": int(n), "mean": mean, "std": float(math.sqrt(max(ex2 - mean ** 2, 0.0))),
            "min": min(s.min for s, _ in group), "max": max(s.max for s, _ in group), **pct,
            "percentiles": "from a size-weighted sample of each tensor"}


def stats_report(ss: SeedScores) -> dict:
    per_tensor = [{"name": s.name, "layer": s.layer, "param_type": s.param_type, "shape": list(s.shape),
                   **{k: getattr(s, k) for k in STAT_KEYS}} for s in ss.stats]
    pairs = list(zip(ss.stats, ss.samples))
    by_layer: dict[int, list] = {}
    by_type: dict[str, list] = {}
    for p in pairs:
        by_layer.setdefault(p[0].layer, []).append(p)
        by_type.setdefault(p[0].param_type, []).append(p)
    return {
        "seed": ss.seed,
        "per_tensor": per_tensor,
        "per_layer": [{"layer": layer, **_aggregate(g)} for layer, g in sorted(by_layer.items())],
        "per_param_type": [{"param_type": t, **_aggregate(g)} for t, g in by_type.items()],
    }


def weighted_samples(ss: SeedScores, n: int = 20_000, seed: int = 0) -> dict[str, np.ndarray]:
    """Per parameter type, a sample of scores in which every weight is equally likely."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    groups: dict[str, list] = {}
    for s, x in zip(ss.stats, ss.samples):
        groups.setdefault(s.param_type, []).append((s.count, x.numpy()))
    for t, g in groups.items():
        vals = np.concatenate([x for _, x in g])
        w = np.concatenate([np.full(len(x), c / len(x)) for c, x in g])
        out[t] = rng.choice(vals, size=min(n, len(vals)), p=w / w.sum())
    return out


# --------------------------------------------------------------------------- the folder

def write_experiment(out_dir: str | Path, result: ExperimentResult, *, model_info: dict | None,
                     device: str, dtype: str, started: float, extra_timings: dict | None = None) -> dict:
    """Write every file of one experiment into ``out_dir``; returns the manifest."""
    out = Path(out_dir)
    cfg = result.config
    files: list[str] = []

    def put_json(name: str, obj) -> None:
        write_json(out / name, obj)
        files.append(name)

    write_csv(out / "top_weights.csv", CSV_COLUMNS, top_weights_rows(result.seed_scores, result.tensors, cfg.topk, cfg.mode))
    files.append("top_weights.csv")
    stats = {"metric": cfg.metric, "per_seed": [stats_report(ss) for ss in result.seed_scores]}
    put_json("sensitivity_stats.json", stats)
    perturbation = result.perturbation_report()
    put_json("perturbation_results.json", perturbation)
    if result.stability is not None:
        put_json("stability.json", result.stability)
    timings = {**(extra_timings or {}), **result.timings}
    if cfg.save_plots:
        from .plots import save_experiment_plots  # matplotlib only when asked

        t = time.perf_counter()
        paths = save_experiment_plots(out, samples=weighted_samples(result.seed_scores[0]),
                                      stats=stats["per_seed"][0], perturbation=perturbation,
                                      stability=result.stability)
        files += [str(Path(p).relative_to(out)) for p in paths]
        timings["plots"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - started
    manifest = {
        "status": "finished",
        "settings": cfg.to_dict(),
        "seeds": list(cfg.seeds),
        "data": result.data,
        "baseline_ppl": result.baseline.ppl,
        "provenance": provenance(device, dtype, model_info),
        "timings_s": timings,
        "peak_memory": peak_memory(),
        "files": files + ["manifest.json"],
    }
    write_json(out / "manifest.json", manifest)
    return manifest


def write_failure(out_dir: str | Path, cfg_dict: dict, error: BaseException, started: float) -> None:
    """A manifest that records a failed run (what was asked, what went wrong)."""
    write_json(Path(out_dir) / "manifest.json", {
        "status": "failed", "error": f"{type(error).__name__}: {error}", "settings": cfg_dict,
        "provenance": provenance("?", "?", None), "timings_s": {"total": time.perf_counter() - started},
        "peak_memory": peak_memory(), "files": ["manifest.json"],
    })
