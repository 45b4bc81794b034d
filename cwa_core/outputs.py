"""The files of one experiment: manifest, top weights, statistics, results, plots.

Every file is written atomically (temporary name, then rename), and ``manifest.json`` last,
so a folder with a manifest is complete; a failed run leaves a manifest saying so. File names
and the JSON encoding (non-finite numbers written as Infinity/NaN, not null) are
:mod:`cwa_core.schema`'s.
"""
from __future__ import annotations

import csv
import io
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

from . import schema
from .experiment import ExperimentResult, SeedScores
from .schema import SUPER_WEIGHT_PLOT
from .selection import TensorStats

PACKAGES = ("torch", "transformers", "numpy", "scipy", "tokenizers", "safetensors", "ray", "mlflow", "cwa")
STAT_KEYS = ("count", "mean", "std", "min", "max", "p50", "p95", "p99")
# coordinates in the nn.Linear convention: row = output channel, col = input channel; expert set
# for mixture-of-experts tensors only; vectors (norm gains, biases) row = index, col empty;
# embeddings row = token id (or position), col = channel (see architectures.LAYOUTS)
CSV_COLUMNS = ("parameter", "layer", "param_type", "expert", "row", "col", "score", "rank", "seed")


def atomic_write(path: Path, data: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


def write_json(path: Path, obj) -> None:
    """``obj`` as JSON (:func:`schema.dumps`: non-finite floats as Infinity/NaN, read back as such)."""
    atomic_write(path, schema.dumps(obj))


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
    """Rows of top_weights.csv (CSV_COLUMNS) for every seed, sorted by seed then descending
    score; coordinates from each tensor's layout (None where one does not apply)."""
    from .architectures import coordinates

    rows: list[tuple] = []
    for ss in seed_scores:
        sel = ss.selection("top_k", mode, k)
        order = torch.argsort(sel.scores, descending=True, stable=True)
        tid, idx, sc, rk = sel.tensor_ids[order], sel.flat_idx[order], sel.scores[order], sel.ranks()[order]
        coords = torch.full((3, len(tid)), -1, dtype=torch.long)  # expert, row, col; -1: none
        by_tid = torch.argsort(tid, stable=True)
        uniq, counts = torch.unique_consecutive(tid[by_tid], return_counts=True)
        for t, at in zip(uniq.tolist(), torch.split(by_tid, counts.tolist())):
            for axis, v in enumerate(coordinates(tensors[t]["layout"], tensors[t]["shape"], idx[at])):
                if v is not None:
                    coords[axis, at] = v
        for t, (e, r, c), s, rank in zip(tid.tolist(), coords.T.tolist(), sc.tolist(), rk.tolist()):
            m = tensors[t]
            rows.append((m["name"], m["layer"], m["param_type"], None if e < 0 else e, r,
                         None if c < 0 else c, s, rank, ss.seed))
    return rows


def write_csv(path: Path, columns: Sequence[str], rows: Sequence[tuple]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    w.writerows((f"{v:.8g}" if isinstance(v, float) else v for v in row) for row in rows)
    atomic_write(path, buf.getvalue())


def _aggregate(group: Sequence[tuple[TensorStats, torch.Tensor]]) -> dict:
    """Exact count/mean/std/min/max over tensors; percentiles from per-tensor samples weighted
    by tensor size (each sample stands for numel/len(sample) weights). ``std`` is the sample
    standard deviation (n - 1) of all the group's scores pooled, as per tensor: from each
    tensor's count, mean and sample std, sum of squared deviations = sum over tensors of
    (n_i - 1) s_i^2 + n_i (m_i - mean)^2."""
    counts = np.array([s.count for s, _ in group], dtype=np.float64)
    means = np.array([s.mean for s, _ in group])
    n = counts.sum()
    mean = float((counts * means).sum() / n)
    ss = float(((counts - 1) * np.array([s.std for s, _ in group]) ** 2 + counts * (means - mean) ** 2).sum())
    std = math.sqrt(ss / (n - 1)) if n > 1 else 0.0
    vals = np.concatenate([x.numpy() for _, x in group]).astype(np.float64)
    w = np.concatenate([np.full(len(x), s.count / max(len(x), 1)) for s, x in group])
    order = np.argsort(vals)
    cw = np.cumsum(w[order]) / w.sum()
    pct = {f"p{q}": float(vals[order][min(np.searchsorted(cw, q / 100), len(vals) - 1)]) for q in (50, 95, 99)}
    return {"count": int(n), "mean": mean, "std": std,
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
    """Per parameter type, at most ``n`` scores drawn so that every weight is equally likely (a
    tensor's sample stands for its ``count`` weights). Scores stay as they are, inf and NaN
    included (the figure counts them); a tensor with count 0 or no sampled score adds nothing,
    and a type left with nothing maps to an empty array."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    groups: dict[str, list] = {}
    for s, x in zip(ss.stats, ss.samples):
        g = groups.setdefault(s.param_type, [])
        x = x.numpy().ravel() if isinstance(x, torch.Tensor) else np.asarray(x).ravel()
        if s.count > 0 and x.size:  # else c / len(x) would divide by zero
            g.append((s.count, x))
    for t, g in groups.items():
        if not g:
            out[t] = np.empty(0, dtype=np.float32)
            continue
        vals = np.concatenate([x for _, x in g])
        w = np.concatenate([np.full(len(x), c / len(x)) for c, x in g])
        out[t] = rng.choice(vals, size=min(n, len(vals)), p=w / w.sum())
    return out


# --------------------------------------------------------------------------- the folder

def write_parquet(path: Path, columns: dict) -> None:
    """A table as Parquet (atomically), for the analysis to load fast: ``columns`` name -> array."""
    import pandas as pd

    buf = io.BytesIO()
    pd.DataFrame(columns).to_parquet(buf, index=False)
    atomic_write(path, buf.getvalue())


def top_weights_table(rows: Sequence[tuple]) -> dict:
    """The rows of top_weights.csv as columns (same names, same order)."""
    cols = list(zip(*rows)) if rows else [[] for _ in CSV_COLUMNS]
    return {name: list(col) for name, col in zip(CSV_COLUMNS, cols)}


def score_sample_table(seed_scores: Sequence[SeedScores], tensors: Sequence[dict]) -> dict:
    """The scores of the fixed stability sample of weights, every seed: the same weights for
    every metric on the same model and parameter types, so metrics can be correlated later."""
    offsets = np.cumsum([0] + [math.prod(t["shape"]) for t in tensors])[:-1]
    names = np.array([t["name"] for t in tensors], dtype=object)
    parts = {"seed": [], "global_id": [], "parameter": [], "flat_idx": [], "score": []}
    for ss in seed_scores:
        sel = ss.stability_sample
        tid, idx = sel.tensor_ids.numpy(), sel.flat_idx.numpy()
        parts["seed"].append(np.full(len(tid), ss.seed, dtype=np.int64))
        parts["global_id"].append(offsets[tid] + idx)
        parts["parameter"].append(names[tid])
        parts["flat_idx"].append(idx)
        parts["score"].append(sel.scores.numpy().astype(np.float32))
    return {k: np.concatenate(v) if v else np.array([]) for k, v in parts.items()}


CAMPAIGN_COLUMNS = ("arm", "level", "seed", "trial", "n_protected", "changed", "drawn", "protected_hits", "ppl",
                    "nll", "status", "ppl_ratio")


def campaign_table(campaign: dict) -> dict:
    """campaign_results.json's trial rows as columns (:data:`CAMPAIGN_COLUMNS`; not the seconds),
    with the campaign and its level's name on every row."""
    rows = campaign["trials"]
    cols = {c: [r[c] for r in rows] for c in CAMPAIGN_COLUMNS}
    return {"campaign": [campaign["campaign"]] * len(rows), "level_name": [campaign["level_name"]] * len(rows), **cols}


def window_nll_table(result: ExperimentResult) -> dict | None:
    """Per evaluation window the summed NLL (nats) and its predictions, for the baseline
    (selection :data:`schema.BASELINE`, seed -1) and every evaluated selection and seed: the rows of
    ``window_nll.parquet`` (None when the perplexities carry no per-window sums)."""
    base = result.baseline.window_nll
    if base is None:
        return None
    tokens = result.baseline.window_length - 1
    parts = [(schema.BASELINE, -1, base)] + [(r["selection"], r["seed"], r.get("window_nll")) for r in result.results]
    cols: dict[str, list] = {"selection": [], "seed": [], "window": [], "nll": [], "tokens": []}
    for sel, seed, nll in parts:
        if nll is None or len(nll) != len(base):
            raise ValueError(f"window_nll: {sel} seed {seed} has {None if nll is None else len(nll)} windows, "
                             f"the baseline {len(base)}")
        cols["selection"] += [sel] * len(nll)
        cols["seed"] += [int(seed)] * len(nll)
        cols["window"] += list(range(len(nll)))
        cols["nll"] += [float(x) for x in nll]  # +inf / NaN kept as such (Parquet holds them)
        cols["tokens"] += [tokens] * len(nll)
    return {"selection": cols["selection"], "seed": np.array(cols["seed"], dtype=np.int64),
            "window": np.array(cols["window"], dtype=np.int64), "nll": np.array(cols["nll"], dtype=np.float64),
            "tokens": np.array(cols["tokens"], dtype=np.int64)}


def write_experiment(out_dir: str | Path, result: ExperimentResult, *, model_info: dict | None,
                     device: str, dtype: str, started: float, extra_timings: dict | None = None) -> dict:
    """Write every file of one experiment into ``out_dir``; returns the manifest.

    The numbers come first; the figures last, each on its own: a figure that fails is named
    with its error in the manifest (``plots_failed``) and the numbers stand.
    """
    out = Path(out_dir)
    cfg = result.config
    files: list[str] = []

    def put_json(name: str, obj) -> None:
        write_json(out / name, obj)
        files.append(name)

    rows = top_weights_rows(result.seed_scores, result.tensors, cfg.topk, cfg.mode)
    write_csv(out / schema.TOP_WEIGHTS_CSV, CSV_COLUMNS, rows)
    write_parquet(out / schema.TOP_WEIGHTS_PARQUET, top_weights_table(rows))
    write_parquet(out / schema.SCORE_SAMPLE, score_sample_table(result.seed_scores, result.tensors))
    files += [schema.TOP_WEIGHTS_CSV, schema.TOP_WEIGHTS_PARQUET, schema.SCORE_SAMPLE]
    stats = {"metric": cfg.metric, "per_seed": [stats_report(ss) for ss in result.seed_scores]}
    put_json(schema.SENSITIVITY_STATS, stats)
    windows = window_nll_table(result)
    if windows is not None:
        write_parquet(out / schema.WINDOW_NLL, windows)
        files.append(schema.WINDOW_NLL)
    perturbation = result.perturbation_report()
    put_json(schema.PERTURBATION_RESULTS, perturbation)
    if result.stability is not None:
        put_json(schema.STABILITY, result.stability)
    if result.super_weights is not None:
        put_json(schema.SUPER_WEIGHTS, result.super_weights)
    if result.campaign is not None:
        put_json(schema.CAMPAIGN_RESULTS, result.campaign)
        write_parquet(out / schema.CAMPAIGN_TRIALS, campaign_table(result.campaign))
        files.append(schema.CAMPAIGN_TRIALS)
    timings = {**(extra_timings or {}), **result.timings}
    plots_failed: dict[str, str] = {}
    if result.super_weights is not None:  # detection's figure: drawn whenever detection ran
        try:
            from .superweight_plots import plot_super_weight_spikes

            path = plot_super_weight_spikes(result.super_weights, out / schema.PLOTS_DIR / SUPER_WEIGHT_PLOT)
            files.append(str(Path(path).relative_to(out)))
        except Exception as e:  # noqa: BLE001 - a figure is the least important output
            plots_failed[SUPER_WEIGHT_PLOT] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    if cfg.save_plots:
        t = time.perf_counter()
        try:
            from .plots import save_experiment_plots  # matplotlib only when asked

            paths, failed = save_experiment_plots(
                out, samples_per_seed=[weighted_samples(ss) for ss in result.seed_scores],
                stats_per_seed=stats["per_seed"], seeds=[ss.seed for ss in result.seed_scores],
                perturbation=perturbation, stability=result.stability, metric=cfg.metric, campaign=result.campaign)
            files += [str(Path(p).relative_to(out)) for p in paths]
            plots_failed.update(failed)
        except Exception as e:  # noqa: BLE001 - a figure is the least important output
            plots_failed["plots"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
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
        "files": files + [schema.MANIFEST],
        "plots_failed": plots_failed,
    }
    write_json(out / schema.MANIFEST, manifest)
    return manifest


def write_failure(out_dir: str | Path, cfg_dict: dict, error: BaseException, started: float) -> None:
    """A manifest that records a failed run (what was asked, what went wrong)."""
    write_json(Path(out_dir) / schema.MANIFEST, {
        "status": "failed", "error": f"{type(error).__name__}: {error}", "settings": cfg_dict,
        "provenance": provenance("?", "?", None), "timings_s": {"total": time.perf_counter() - started},
        "peak_memory": peak_memory(), "files": [schema.MANIFEST],
    })
