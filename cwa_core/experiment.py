"""One experiment: load -> score -> select -> perturb -> evaluate -> record.

The stages are separate functions so that the sweep layer can share work between cells
(one model load, one scoring pass per metric and seed, prefixes for smaller K); a cell runs
them through a worker (:mod:`cwa_core.cell`), in a sweep's actors and in the single command alike.
"""
from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from .architectures import ParamRef
from .config import ConfigError, ExperimentConfig
from .data import (PROTOCOLS, TOKENIZER_LAYOUT, DataSplit, TextFileError, TokenCache, load_wikitext2, read_text,
                   split, special_tokens_added, text_identity)
from .evaluate import Perplexity, finite_status, model_device, perplexity
from .metrics import METRICS, ScoreOptions, score
from .perturb import PerturbSpec, perturbed
from .schema import WINDOW_NLL
from .selection import KINDS, ScoreCollector, Selection, TensorStats, random_selection
from .stability import jaccard, pairwise, spearman
from .superweights import CandidateRanks, Coordinate, StudyLabels, StudyRequest, super_weight_study

log = logging.getLogger(__name__)

STABILITY_SAMPLE_SEED = 20240917  # fixed: the same weights are compared across seeds


class DataError(ConfigError):
    """The data cannot serve the experiment (missing, unreadable, too short); names the setting."""


def _read(cfg: ExperimentConfig, key: str) -> tuple[str, str]:
    """(text, source) of the data_file / eval_file setting ``key``, or of WikiText-2 through
    ``datasets`` when it is unset (calibration: the protocol's split; evaluation: test)."""
    path = getattr(cfg, key)
    if path:
        try:
            return read_text(path), str(path)
        except TextFileError as e:
            raise DataError(key, str(e)) from None
    part = "train" if key == "data_file" and PROTOCOLS[cfg.protocol].separate_calibration else "test"
    try:
        return load_wikitext2(part), f"wikitext-2-raw-v1/{part}"
    except Exception as e:  # no network, no datasets: say so plainly
        raise DataError(key, f"not given, and WikiText-2 ({part}) could not be loaded through `datasets` "
                             f"({type(e).__name__}); pass a local text file") from None


def load_split(cfg: ExperimentConfig, tokenizer, tokens: TokenCache | None = None) -> DataSplit:
    """Tokenize the calibration (and evaluation) text once and plan the windows of ``cfg.protocol``
    (``cfg`` resolved by :meth:`ExperimentConfig.with_context`). ``tokens``: the token ids of
    ``tokenizer`` already computed (a worker's, kept across data settings), else tokenized here."""
    if tokens is None:
        tokens = TokenCache(tokenizer)
    elif tokens.tokenizer is not tokenizer:
        raise ValueError("load_split: the token cache belongs to another tokenizer")
    proto = PROTOCOLS[cfg.protocol]
    calib_text, calib_src = _read(cfg, "data_file")
    texts = {"data_file": calib_text}
    separate = cfg.eval_file and (not cfg.data_file or Path(cfg.eval_file).resolve() != Path(cfg.data_file).resolve())
    if proto.separate_calibration or separate:
        eval_text, eval_src = _read(cfg, "eval_file")
        texts["eval_file"] = eval_text
    layout = proto.layout or cfg.bos  # published: the tokenizer's own special tokens; heldout: --bos
    try:
        streams = {k: tokens.stream(t, layout=layout, source=calib_src if k == "data_file" else eval_src)
                   for k, t in texts.items()}
    except ValueError as e:
        raise DataError("data_file", str(e)) from None
    try:
        out = split(streams["data_file"], streams.get("eval_file"), calib_length=cfg.max_length,
                    eval_length=cfg.resolved_eval_length, n_eval=cfg.eval_samples)
    except ValueError as e:
        raise DataError("eval_samples", str(e)) from None
    ev_sha = hashlib.sha256(texts.get("eval_file", calib_text).encode("utf-8")).hexdigest()
    protocol = {"name": proto.name, "eval_source": out.eval.source, "eval_sha256": ev_sha,
                "eval_text": text_identity(ev_sha, out.eval.source),
                "eval_tokens_total": len(out.eval), "window_length": out.eval_length, "eval_windows": out.n_eval,
                "all_windows": out.n_eval == out.eval.n_windows(out.eval_length),
                "bos": special_tokens_added(tokenizer) if layout == TOKENIZER_LAYOUT else cfg.bos,
                "calib_source": out.calib.source, "calib_disjoint": True}
    return replace(out, protocol=protocol)


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
    ranks: list[dict] | None = None  # CandidateRanks.entries() of the tracked weights

    def selection(self, kind: str, mode: str, k: int | None = None) -> Selection:
        sel = self.selections[(kind, mode)]
        return sel if k is None or k == sel.k else sel.prefix(k)


def calibration(metric: str, data: DataSplit, max_samples: int, seed: int) -> torch.Tensor | None:
    """The calibration windows a scoring pass of ``metric`` reads for ``seed`` (None: the metric
    reads no data)."""
    return None if METRICS.get(metric).data_independent else data.calib_windows(max_samples, seed)


def score_seed(model: nn.Module, refs: Sequence[ParamRef], data: DataSplit, *, metric: str, seed: int,
               k: int, modes: Sequence[str], max_samples: int, opts: ScoreOptions,
               stability_sample: int = 10_000, track: Sequence[Coordinate] = ()) -> SeedScores:
    """One scoring pass: top/bottom/random ``k`` per requested mode, plus the stability sample,
    and the ranks of the ``track``ed weights (super-weight candidates, published coordinates)."""
    t0 = time.perf_counter()
    gathers = {f"random_k/{m}": random_selection(refs, k, m, seed) for m in modes}
    total = sum(r.numel for r in refs)
    gathers["stability"] = random_selection(refs, min(stability_sample, total), "global", STABILITY_SAMPLE_SEED)
    collector = ScoreCollector(refs, k, tuple(modes), gathers, seed=seed)
    calib = calibration(metric, data, max_samples, seed)
    ranks = CandidateRanks(refs, track) if track else None
    sink = collector if ranks is None else (lambda r, s: (collector(r, s), ranks(r, s)))
    score(model, refs, metric, calib, sink, replace(opts, seed=seed))
    missing = collector.missing()
    if missing:
        raise RuntimeError(f"metric {metric} never scored {missing[:3]}")
    sels = {(kind, mode): collector.selection(kind, mode) for kind in KINDS for mode in modes}
    if model_device(model).type == "cuda":
        torch.cuda.synchronize()
    return SeedScores(seed, metric, k, sels, collector.gathered("stability"), list(collector.stats),
                      list(collector.samples), time.perf_counter() - t0, None if ranks is None else ranks.entries())


def evaluate_selection(model: nn.Module, refs: Sequence[ParamRef], sel: Selection, spec: PerturbSpec,
                       eval_windows: torch.Tensor, baseline: Perplexity | None, *, seed: int,
                       batch_size: int = 8, progress: bool = False) -> dict:
    """Perplexity with ``sel`` perturbed (restored afterwards), and its ratio to the baseline
    (None when the baseline is not at hand: the sweep's driver divides). ``bit``: the bit that
    bit_flip flipped (its default depends on the dtype), else None."""
    from .perturb import flipped_bit

    with perturbed(refs, sel, spec) as n:
        ppl = perplexity(model, eval_windows, batch_size=batch_size, progress=progress,
                         desc=f"ppl {sel.kind} seed {seed}")
    return {"selection": sel.kind, "seed": seed, "k": sel.k, "mode": sel.mode, "n_weights": n,
            "bit": flipped_bit(refs, sel, spec),
            "ppl": ppl.ppl, "ppl_ratio": None if baseline is None else ppl.ppl / baseline.ppl, "nll": ppl.nll,
            "ppl_status": finite_status(ppl.ppl), "window_nll": ppl.window_nll}


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
    super_weights: dict | None = None  # super_weights.json, when detection ran
    campaign: dict | None = None  # campaign_results.json, when a Phase 2 campaign ran (cwa_core.cell)

    def perturbation_report(self) -> dict:
        c = self.config
        spec = PerturbSpec(c.perturb, c.perturb_scale, c.perturb_bit).resolved()
        # the bit actually flipped, as the evaluations recorded it (the default depends on the dtype)
        flipped = [r["bit"] for r in self.results if r.get("bit") is not None]
        if flipped:
            spec = replace(spec, bit=flipped[0])
        return {
            "window_length": self.baseline.window_length, "eval_windows": self.baseline.n_windows,
            "eval_tokens": self.baseline.n_tokens, "baseline": {"ppl": self.baseline.ppl, "nll": self.baseline.nll},
            "perturbation": {"method": spec.method, "scale": spec.scale, "bit": spec.bit},
            "metric": c.metric, "topk": c.topk, "mode": c.mode, "protocol": self.data.get("protocol"),
            # the analysis cannot ask the metric registry (it never imports torch): the fact travels here
            "data_independent": METRICS.get(c.metric).data_independent,
            # per-window NLL sums (baseline and every row) live in a table beside this file
            "window_nll": WINDOW_NLL if self.baseline.window_nll is not None else None,
            "results": [{k: v for k, v in r.items() if k != "window_nll"} for r in self.results],
        }


def check_calibration(cfg: ExperimentConfig, data: DataSplit) -> None:
    """A data-dependent metric needs ``max_samples`` calibration windows outside the evaluation ones."""
    if not METRICS.get(cfg.metric).data_independent and data.calib_pool < cfg.max_samples:
        raise DataError("max_samples", f"{cfg.max_samples} calibration windows of {cfg.max_length} tokens do not fit "
                                       f"in the calibration text outside the evaluation windows ({data.calib_pool} "
                                       "fit); lower max_samples, max_length or eval_samples, or give a longer data_file")


class BaselineError(RuntimeError):
    """The unperturbed model's perplexity is not finite: nothing can be compared with it."""


def baseline_perplexity(model: nn.Module, data: DataSplit, cfg: ExperimentConfig, *, progress: bool = False) -> Perplexity:
    """Perplexity of the unperturbed model on the evaluation windows; it must be finite."""
    base = perplexity(model, data.eval_windows(), batch_size=cfg.eval_batch_size, progress=progress, desc="baseline ppl")
    if not math.isfinite(base.ppl):
        raise BaselineError(f"the unperturbed model's perplexity is {finite_status(base.ppl)} (dtype {cfg.dtype}): it "
                            "does not run in this dtype on this text; try dtype bf16 or fp32")
    return base


def super_weight_prompts(cfg: ExperimentConfig, data: DataSplit, tokenizer) -> tuple[torch.Tensor, str, str | None]:
    """(prompts (N, L), where they come from, the text of a single prompt): ``cfg.super_prompt``
    tokenized (the published method's single prompt), else the first ``cfg.super_windows``
    held-out evaluation windows."""
    if cfg.super_prompt:
        ids = tokenizer(cfg.super_prompt, add_special_tokens=True)["input_ids"]
        return torch.tensor([ids], dtype=torch.long), "super_prompt", cfg.super_prompt
    n = min(cfg.super_windows, data.n_eval)
    return data.eval_windows()[:n], f"the first {n} held-out evaluation windows ({data.eval.source})", None


def study_super_weights(cfg: ExperimentConfig, model: nn.Module, tokenizer, data: DataSplit, *, model_id: str,
                        hf_id: str | None, dtype: str,
                        baseline: Perplexity | None = None) -> tuple[dict, list[Coordinate]]:
    """Super-weight detection and causal test for ``cfg`` (its prompts, thresholds, seeds and
    evaluation windows): the report without ranks, and the weights to rank while scoring.
    ``baseline``: :func:`baseline_perplexity` when already measured (not measured again)."""
    prompts, source, text = super_weight_prompts(cfg, data, tokenizer)
    request = StudyRequest(StudyLabels(model_id, hf_id, dtype, source, text), prompts, data.eval_windows(),
                           seeds=cfg.seeds, batch_size=cfg.eval_batch_size, options=cfg.super_weight_options())
    return super_weight_study(model, request, baseline=baseline)


def tensor_table(refs: Sequence[ParamRef]) -> list[dict]:
    """The scored tensors as the outputs describe them (name, layer, type, shape, layout: how
    flat indices become coordinates, see architectures.LAYOUTS; offset: Gemma's 1 of 1 + w), in order."""
    return [{"name": r.name, "layer": r.layer, "param_type": r.param_type, "shape": list(r.shape),
             "layout": r.layout, "offset": r.offset} for r in refs]
