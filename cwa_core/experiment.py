"""One experiment: load -> score -> select -> perturb -> evaluate -> record.

The stages are separate functions so that the sweep layer can share work between cells
(one model load, one scoring pass per metric and seed, prefixes for smaller K); the
single-experiment command simply runs them in order.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .architectures import ParamRef, scored_params
from .config import ExperimentConfig
from .data import DataSplit, load_wikitext2_test, read_text, split, tokenize
from .evaluate import Perplexity, model_device, perplexity
from .metrics import METRICS, ScoreOptions, score
from .perturb import PerturbSpec, perturbed
from .selection import KINDS, ScoreCollector, Selection, TensorStats, random_selection, tensor_offsets
from .stability import jaccard, pairwise, spearman

log = logging.getLogger(__name__)

STABILITY_SAMPLE_SEED = 20240917  # fixed: the same weights are compared across seeds


class DataError(ValueError):
    pass


def load_split(cfg: ExperimentConfig, tokenizer) -> DataSplit:
    """Tokenize the calibration (and evaluation) text once and plan the windows."""
    if cfg.data_file:
        calib_text, calib_src = read_text(cfg.data_file), str(cfg.data_file)
    else:
        try:
            calib_text, calib_src = load_wikitext2_test(), "wikitext-2-raw-v1/test"
        except Exception as e:  # no network, no datasets: say so plainly
            raise DataError(
                f"no --data-file given and WikiText-2 could not be loaded through `datasets` "
                f"({type(e).__name__}); pass --data-file PATH to a local text file"
            ) from None
    calib = tokenize(tokenizer, calib_text, layout=cfg.bos, source=calib_src)
    ev = None
    if cfg.eval_file and (not cfg.data_file or Path(cfg.eval_file).resolve() != Path(cfg.data_file).resolve()):
        ev = tokenize(tokenizer, read_text(cfg.eval_file), layout=cfg.bos, source=str(cfg.eval_file))
    return split(calib, ev, calib_length=cfg.max_length, eval_length=cfg.resolved_eval_length,
                 n_eval=cfg.eval_samples)


@dataclass
class SeedScores:
    """What outlives one scoring pass: selections at the largest K, samples, statistics."""

    seed: int
    metric: str
    k: int
    selections: dict[tuple[str, str], Selection]  # (kind, mode) -> selection at k
    stability_sample: Selection
    stats: list[TensorStats]
    samples: list[torch.Tensor]
    seconds: float

    def selection(self, kind: str, mode: str, k: int | None = None) -> Selection:
        sel = self.selections[(kind, mode)]
        return sel if k is None or k == sel.k else sel.prefix(k)


def score_seed(model: nn.Module, refs: Sequence[ParamRef], data: DataSplit, *, metric: str, seed: int,
               k: int, modes: Sequence[str], max_samples: int, opts: ScoreOptions,
               stability_sample: int = 10_000) -> SeedScores:
    """One scoring pass: top/bottom/random ``k`` per requested mode, plus the stability sample."""
    t0 = time.perf_counter()
    gathers = {f"random_k/{m}": random_selection(refs, k, m, seed) for m in modes}
    total = sum(r.numel for r in refs)
    gathers["stability"] = random_selection(refs, min(stability_sample, total), "global", STABILITY_SAMPLE_SEED)
    collector = ScoreCollector(refs, k, tuple(modes), gathers, seed=seed)
    m = METRICS.get(metric)
    calib = None if m.data_independent else data.calib_windows(max_samples, seed)
    score(model, refs, metric, calib, collector, replace(opts, seed=seed))
    missing = collector.missing()
    if missing:
        raise RuntimeError(f"metric {metric} never scored {missing[:3]}")
    sels = {(kind, mode): collector.selection(kind, mode) for kind in KINDS for mode in modes}
    if model_device(model).type == "cuda":
        torch.cuda.synchronize()
    return SeedScores(seed, metric, k, sels, collector.gathered("stability"), list(collector.stats),
                      list(collector.samples), time.perf_counter() - t0)


def evaluate_selection(model: nn.Module, refs: Sequence[ParamRef], sel: Selection, spec: PerturbSpec,
                       eval_windows: torch.Tensor, baseline: Perplexity | None, *, seed: int,
                       batch_size: int = 8, progress: bool = False) -> dict:
    """Perplexity with ``sel`` perturbed (restored afterwards), and its ratio to the baseline
    (None when the baseline is not at hand: the sweep's driver divides)."""
    with perturbed(refs, sel, spec) as n:
        ppl = perplexity(model, eval_windows, batch_size=batch_size, progress=progress,
                         desc=f"ppl {sel.kind} seed {seed}")
    return {"selection": sel.kind, "seed": seed, "k": sel.k, "mode": sel.mode, "n_weights": n,
            "ppl": ppl.ppl, "ppl_ratio": None if baseline is None else ppl.ppl / baseline.ppl, "nll": ppl.nll}


def stability_report(scores: Sequence[SeedScores], *, k: int, mode: str, offsets: torch.Tensor) -> dict:
    """Pairwise Jaccard of top-K sets over all seed pairs; Spearman on the fixed weight sample."""
    m = METRICS.get(scores[0].metric)
    seeds = [s.seed for s in scores]
    ids = [s.selection("top_k", mode, k).global_ids(offsets) for s in scores]
    report = {
        "metric": m.name, "data_independent": m.data_independent, "seeds": seeds, "k": k, "mode": mode,
        "jaccard": pairwise(ids, seeds, jaccard),
        "spearman": {**pairwise([s.stability_sample.scores for s in scores], seeds, spearman),
                     "n_weights": len(scores[0].stability_sample)},
    }
    report["note"] = (
        f"{m.name} does not depend on the calibration data: every seed gives the same scores, so "
        "Jaccard and Spearman are 1.0 by construction, not evidence of stability."
        if m.data_independent else
        "Seeds change the calibration windows (and random draws); evaluation windows are fixed."
    )
    return report


@dataclass
class ExperimentResult:
    config: ExperimentConfig
    baseline: Perplexity
    results: list[dict]
    seed_scores: list[SeedScores]
    stability: dict | None
    data: dict
    tensors: list[dict]  # name, layer, param_type, shape of every scored tensor, by tensor id
    timings: dict[str, float] = field(default_factory=dict)

    def perturbation_report(self) -> dict:
        c = self.config
        spec = PerturbSpec(c.perturb, c.perturb_scale, c.perturb_bit).resolved()
        return {
            "window_length": self.baseline.window_length, "eval_windows": self.baseline.n_windows,
            "eval_tokens": self.baseline.n_tokens, "baseline": {"ppl": self.baseline.ppl, "nll": self.baseline.nll},
            "perturbation": {"method": spec.method, "scale": spec.scale, "bit": spec.bit},
            "metric": c.metric, "topk": c.topk, "mode": c.mode, "results": self.results,
        }


def run_experiment(cfg: ExperimentConfig, model: nn.Module, tokenizer, *, progress: bool = True) -> ExperimentResult:
    """Run every stage on a loaded model; the caller writes the outputs."""
    timings: dict[str, float] = {}
    t = time.perf_counter()
    data = load_split(cfg, tokenizer)
    if not METRICS.get(cfg.metric).data_independent:
        pool = data.calib_pool
        if pool < cfg.max_samples:
            raise DataError(f"--max-samples {cfg.max_samples} windows of {cfg.max_length} tokens do not fit in the "
                            f"calibration text outside the evaluation windows ({pool} fit); lower --max-samples, "
                            "--max-length or --eval-samples, or give a longer --data-file")
    refs = scored_params(model, cfg.param_types)
    timings["data"] = time.perf_counter() - t

    t = time.perf_counter()
    eval_windows = data.eval_windows()
    baseline = perplexity(model, eval_windows, batch_size=cfg.eval_batch_size, progress=progress, desc="baseline ppl")
    timings["baseline_ppl"] = time.perf_counter() - t
    log.info("baseline perplexity %.4f over %d windows of %d tokens", baseline.ppl, baseline.n_windows, baseline.window_length)

    opts = ScoreOptions(cfg.micro_batch, cfg.hutchinson_probes, 0, progress)
    spec = PerturbSpec(cfg.perturb, cfg.perturb_scale, cfg.perturb_bit)
    kinds = ("top_k", *cfg.controls)
    seed_scores, results = [], []
    timings["score"] = timings["perturb_eval"] = 0.0
    bar = tqdm(total=len(cfg.seeds) * (1 + len(kinds)), desc=f"{cfg.metric} {cfg.mode} K={cfg.topk}",
               disable=not progress, unit="step")
    for seed in cfg.seeds:
        bar.set_postfix_str(f"seed {seed}: scoring")
        ss = score_seed(model, refs, data, metric=cfg.metric, seed=seed, k=cfg.topk, modes=(cfg.mode,),
                        max_samples=cfg.max_samples, opts=opts, stability_sample=cfg.stability_sample)
        timings["score"] += ss.seconds
        seed_scores.append(ss)
        bar.update()
        for kind in kinds:
            bar.set_postfix_str(f"seed {seed}: {kind}")
            t = time.perf_counter()
            results.append(evaluate_selection(model, refs, ss.selection(kind, cfg.mode), replace(spec, seed=seed),
                                              eval_windows, baseline, seed=seed, batch_size=cfg.eval_batch_size))
            timings["perturb_eval"] += time.perf_counter() - t
            bar.update()
    bar.close()
    stability = None
    if cfg.stability_check:
        stability = stability_report(seed_scores, k=cfg.topk, mode=cfg.mode, offsets=tensor_offsets(refs))
    return ExperimentResult(cfg, baseline, results, seed_scores, stability, data.describe(), tensor_table(refs), timings)


def ratios_by_selection(rows: Sequence[dict]) -> dict[str, list[float]]:
    """Perplexity ratios grouped by selection (top_k, random_k, bottom_k), in seed order."""
    out: dict[str, list[float]] = {}
    for r in rows:
        out.setdefault(r["selection"], []).append(r["ppl_ratio"])
    return out


def tensor_table(refs: Sequence[ParamRef]) -> list[dict]:
    """The scored tensors as the outputs describe them (name, layer, type, shape), in order."""
    return [{"name": r.name, "layer": r.layer, "param_type": r.param_type, "shape": list(r.shape)} for r in refs]
