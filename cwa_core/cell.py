"""One cell, one unit of work: the code every entry point runs an experiment through.

A cell is one resolved :class:`~cwa_core.config.ExperimentConfig`. Its stages are tasks of a
:class:`Worker` (a model held in memory, its corpora tokenized once): the baseline perplexity,
the super-weight study (when asked), one scoring pass per seed, one evaluation per seed and
selection. :func:`assemble` turns the tasks' answers into the cell's
:class:`~cwa_core.experiment.ExperimentResult` (the caller writes it with
:func:`cwa_core.outputs.write_experiment`).

The sweep's actors are workers (``cwa_core.sweep.worker.ModelWorker``: it loads its model and
can be made to fail on purpose); its driver assembles each cell when the tasks' answers are in.
The single command builds the same worker in-process and runs :func:`run_cell`: the same tasks
in order, then the same :func:`assemble`. The benchmarks do the same, with work shared between
cells passed in (:class:`Shared`) and each stage timed (``stage``).
"""
from __future__ import annotations

import copy
import logging
import math
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Sequence

from torch import nn
from tqdm.auto import tqdm

from . import campaign as campaigns
from .architectures import scored_params
from .campaign_stats import summarize
from .config import DATA_FIELDS, ExperimentConfig, pass_fields, settings_key
from .data import DataSplit, TokenCache
from .experiment import (ExperimentResult, baseline_perplexity, calibration, check_calibration, evaluate_selection,
                         load_split, score_seed, stability_report, study_super_weights, tensor_table)
from .metrics import ScoreOptions
from .perturb import PerturbSpec
from .schema import CAMPAIGN_SETTINGS, HARSHER, LEVEL_NAMES, SELECTION_KINDS
from .selection import Selection, offsets_of, tensor_offsets
from .superweights import RankTable, add_ranks

# the single command's log lines keep the name they had (cwa_core.experiment ran them)
log = logging.getLogger("cwa_core.experiment")
Stage = Callable[[str], ContextManager]  # a stage's name -> a context around it (a timer, a profiler)


def study_ids(cfg: ExperimentConfig, info) -> tuple[str, str | None, str]:
    """(model id, Hugging Face id, dtype) that a super-weight report records. The Hugging Face id
    is ``cfg.hf_id``, else the model's own id when it came from the Hub (a local folder has none).
    ``info``: the loaded model's :class:`~cwa_core.models.ModelInfo`, or None for a model built
    in memory (its name is ``cfg.model``, its dtype unrecorded)."""
    if info is None:
        return cfg.model, cfg.hf_id, ""
    return info.model_id, cfg.hf_id or (info.model_id if info.source == "hub" else None), info.dtype


def kinds(cfg: ExperimentConfig) -> tuple[str, ...]:
    """The selections a cell evaluates per seed, in order: top-K, then its controls."""
    return ("top_k", *cfg.controls)


def protection(cfg: ExperimentConfig, scored: dict, study: dict | None) -> tuple[dict[str, Selection], list[dict]]:
    """What a trial's protected sets are made of: the seed's selections that ``cfg.protect``
    names (from its scoring pass, :meth:`Worker.score`) and the study's candidates (layer, row,
    col) when it names super_weights."""
    sels = {kind: scored["scores"].selection(kind, cfg.mode, cfg.topk) for kind in SELECTION_KINDS
            if kind in cfg.protect}
    cands = []
    if "super_weights" in cfg.protect:
        cands = [{k: c[k] for k in ("layer", "row", "col", "module") if k in c} for c in study["report"]["candidates"]]
    return sels, cands


class Worker:
    """A model held in memory and the tasks of cells on it, one at a time (a perturbation is
    restored before the next task starts). A corpus is tokenized once (per layout); each data
    setting only cuts its windows."""

    def __init__(self, model: nn.Module, tokenizer, info=None, *, progress: bool = False) -> None:
        self.model, self.tokenizer, self.model_info = model, tokenizer, info
        self.progress = progress  # progress bars of the baseline and the scoring passes
        self.counts = {"model_loads": 0, "scoring_passes": 0, "baselines": 0, "evaluations": 0}
        self._splits: dict[tuple, DataSplit] = {}
        self.tokens = TokenCache(tokenizer)  # token ids shared by the data settings of one text
        self._refs: dict[tuple, list] = {}
        self._prune_scores: tuple[tuple, list] | None = None  # the last full scoring (pruning ranks it)

    # -- caches --------------------------------------------------------------------------
    def use_split(self, cfg: ExperimentConfig, split: DataSplit) -> None:
        """Serve ``cfg``'s data setting with ``split`` (built already: by the checks, say)."""
        self._splits[settings_key(cfg, DATA_FIELDS)] = split

    def split(self, cfg: ExperimentConfig) -> DataSplit:
        key = settings_key(cfg, DATA_FIELDS)  # windows cut once per data setting, texts tokenized once
        if key not in self._splits:
            self._splits[key] = load_split(cfg, self.tokenizer, self.tokens)
        return self._splits[key]

    def refs(self, param_types: Sequence[str]) -> list:
        key = tuple(param_types)
        if key not in self._refs:
            self._refs[key] = scored_params(self.model, key)
        return self._refs[key]

    def prepare(self, cfg: ExperimentConfig) -> None:
        """The cell's data and scored tensors at hand; its calibration windows fit."""
        check_calibration(cfg, self.split(cfg))
        self.refs(cfg.param_types)

    # -- tasks ---------------------------------------------------------------------------
    def baseline(self, cfg: ExperimentConfig) -> dict:
        """The unperturbed perplexity (finite, else BaselineError) and the data's description."""
        t = time.perf_counter()
        split = self.split(cfg)
        ppl = baseline_perplexity(self.model, split, cfg, progress=self.progress)
        self.counts["baselines"] += 1
        return {"ppl": ppl, "data": split.describe(), "seconds": time.perf_counter() - t,
                "model": None if self.model_info is None else dict(self.model_info.__dict__)}

    def superweights(self, cfg: ExperimentConfig, baseline=None) -> dict:
        """Super-weight detection and causal test: the report (ranks empty) and the weights the
        scoring passes rank. ``baseline``: the unperturbed :class:`Perplexity` of these settings,
        when already measured (the causal test's reference; else it measures it)."""
        t = time.perf_counter()
        model_id, hf_id, dtype = study_ids(cfg, self.model_info)
        report, track = study_super_weights(cfg, self.model, self.tokenizer, self.split(cfg), model_id=model_id,
                                            hf_id=hf_id, dtype=dtype, baseline=baseline)
        self.counts["super_weight_studies"] = self.counts.get("super_weight_studies", 0) + 1
        return {"report": report, "track": track, "seconds": time.perf_counter() - t}

    def score(self, cfg: ExperimentConfig, seed: int, k: int, modes: tuple[str, ...], track: tuple = ()) -> dict:
        """One scoring pass at ``k`` for ``modes``; only selections, samples, statistics (and
        ranks of ``track``ed weights) leave the worker."""
        refs = self.refs(cfg.param_types)
        ss = score_seed(self.model, refs, self.split(cfg), metric=cfg.metric, seed=seed, k=k, modes=modes,
                        max_samples=cfg.max_samples,
                        opts=self._score_options(cfg, seed),
                        stability_sample=cfg.stability_sample, track=track)
        self.counts["scoring_passes"] += 1
        return {"scores": ss, "tensors": tensor_table(refs)}

    def _score_options(self, cfg: ExperimentConfig, seed: int) -> ScoreOptions:
        return ScoreOptions(cfg.micro_batch, cfg.hutchinson_probes, seed, self.progress)

    def trial(self, cfg: ExperimentConfig, seed: int, level: float, trial: int, selections: dict[str, Selection],
              candidates: Sequence[dict] = ()) -> list[dict]:
        """One trial of the cell's campaign: every arm of ``cfg.protect`` (its protected set from
        ``selections`` and the super-weight ``candidates``, see :func:`protection`) under the same
        intervention at ``level``; rows without the ratio (:func:`assemble` divides)."""
        refs = self.refs(cfg.param_types)
        sw = campaigns.super_weight_ids(refs, candidates) if "super_weights" in cfg.protect else None
        protected = campaigns.protected_sets(selections, tensor_offsets(refs), cfg.protect, super_ids=sw)
        spec = campaigns.CampaignSpec(cfg.campaign, cfg.bits, cfg.quant_group, cfg.prune_group)
        scores = self.full_scores(cfg, seed) if cfg.campaign == "prune" else None
        rows = campaigns.run_trial(self.model, refs, self.split(cfg).eval_windows(), spec, protected, level=level,
                                   seed=seed, trial=trial, batch_size=cfg.eval_batch_size, scores=scores)
        self.counts["trials"] = self.counts.get("trials", 0) + 1
        return rows

    def full_scores(self, cfg: ExperimentConfig, seed: int) -> list:
        """Every weight's score under ``cfg.metric`` for ``seed`` (what pruning ranks; the same
        calibration windows as the seed's scoring pass). The last one is kept (O(weights) host
        memory), so a cell's levels and trials score once."""
        key = (settings_key(cfg, pass_fields("score")), seed)
        if self._prune_scores is None or self._prune_scores[0] != key:
            self._prune_scores = None  # free the old one first
            calib = calibration(cfg.metric, self.split(cfg), cfg.max_samples, seed)
            self._prune_scores = (key, campaigns.full_scores(self.model, self.refs(cfg.param_types), cfg.metric, calib,
                                                             self._score_options(cfg, seed)))
        return self._prune_scores[1]

    def evaluate(self, cfg: ExperimentConfig, selection: Selection, seed: int) -> dict:
        """Perplexity with ``selection`` perturbed as ``cfg`` says (restored afterwards); the
        ratio to the baseline is left to :func:`assemble` (another worker may hold the baseline)."""
        refs = self.refs(cfg.param_types)
        spec = PerturbSpec(cfg.perturb, cfg.perturb_scale, cfg.perturb_bit, seed)
        t = time.perf_counter()
        row = evaluate_selection(self.model, refs, selection, spec, self.split(cfg).eval_windows(), None, seed=seed,
                                 batch_size=cfg.eval_batch_size)
        self.counts["evaluations"] += 1
        row["seconds"] = time.perf_counter() - t
        return row


def shared_timings(baseline: dict, scored: Sequence[dict], rows: Sequence[dict], study: dict | None,
                   trials: Sequence[list[dict]] = ()) -> dict:
    """A sweep cell's timings: its share of the work, the parts shared with other cells in full."""
    timings = {"baseline_ppl (shared)": baseline["seconds"],
               "score (shared)": sum(s["scores"].seconds for s in scored),
               "perturb_eval": sum(r["seconds"] for r in rows)}
    if study is not None:
        timings["super_weights (shared)"] = study["seconds"]
    if trials:
        timings["campaign"] = sum(r["seconds"] for t in trials for r in t)
    return timings


def assemble(cfg: ExperimentConfig, baseline: dict, scored: Sequence[dict], rows: Sequence[dict],
             study: dict | None, timings: dict[str, float], *, stage: Stage | None = None,
             trials: Sequence[list[dict]] = ()) -> ExperimentResult:
    """The cell's result from its tasks' answers: ``baseline`` (:meth:`Worker.baseline`),
    ``scored`` (:meth:`Worker.score`, one per seed in ``cfg.seeds`` order), ``rows``
    (:meth:`Worker.evaluate`, seed by seed, :func:`kinds` order), ``study``
    (:meth:`Worker.superweights`, or None), ``trials`` (:meth:`Worker.trial`, in
    :meth:`~cwa_core.config.ExperimentConfig.campaign_trials` order). The study's report is copied (cells share it) and given the
    ranks under this cell's metric and seeds."""
    base = baseline["ppl"]
    # the worker does not know the baseline (another actor may have computed it)
    results = [{**{k: v for k, v in r.items() if k != "seconds"}, "ppl_ratio": r["ppl"] / base.ppl} for r in rows]
    seed_scores = [s["scores"] for s in scored]
    tensors = scored[0]["tensors"]
    stability = None
    if cfg.stability_check:
        with (stage or _no_stage)("stability"):
            stability = stability_report(seed_scores, k=cfg.topk, mode=cfg.mode,
                                         offsets=offsets_of(math.prod(t["shape"]) for t in tensors))
    sw = None
    if study is not None:
        sw = add_ranks(copy.deepcopy(study["report"]),
                       {cfg.metric: {ss.seed: RankTable(ss.ranks or []) for ss in seed_scores}})
    campaign = None
    if cfg.campaign != "none":
        campaign = campaign_result(cfg, baseline, tensors, [r for t in trials for r in t])
    return ExperimentResult(cfg, base, results, seed_scores, stability, baseline["data"], tensors, timings, sw,
                            campaign)


def campaign_result(cfg: ExperimentConfig, baseline: dict, tensors: Sequence[dict], rows: Sequence[dict]) -> dict:
    """``campaign_results.json``: the campaign's settings, every trial row of every arm with its
    ratio to the baseline, and the statistics of :func:`cwa_core.campaign_stats.summarize`."""
    base = baseline["ppl"].ppl
    rows = [{**r, "ppl_ratio": r["ppl"] / base} for r in rows]
    settings = cfg.to_dict()
    out = {"format": "cwa.campaign/1", "campaign": cfg.campaign, "level_name": LEVEL_NAMES[cfg.campaign],
           "harsher": HARSHER[cfg.campaign],
           "settings": {k: settings[k] for k in (*CAMPAIGN_SETTINGS[1:], "metric", "mode", "topk", "seeds")},
           "model": cfg.model, "baseline_ppl": base, "dtype": (baseline.get("model") or {}).get("dtype"),
           "n_weights": sum(math.prod(t["shape"]) for t in tensors),
           "arms": {arm: {"n_protected": max((r["n_protected"] for r in rows if r["arm"] == arm), default=0)}
                    for arm in cfg.protect},
           "trials": rows}
    out.update(summarize(rows, fail_ratio=cfg.fail_ratio, level_name=out["level_name"], harsher=out["harsher"],
                         arms=list(cfg.protect)))
    return out


@dataclass
class Shared:
    """A cell's inputs computed elsewhere (shared with other cells): the baseline, the study,
    and scoring passes by seed (at a K of at least the cell's, for at least its mode)."""

    baseline: dict | None = None
    study: dict | None = None
    scores: dict[int, dict] = field(default_factory=dict)


def run_experiment(cfg: ExperimentConfig, model: nn.Module, tokenizer, *, progress: bool = True,
                   data: DataSplit | None = None, info=None) -> ExperimentResult:
    """Every stage of one cell on a model already loaded (:func:`run_cell` on a :class:`Worker`
    around it); the caller writes the outputs. ``cfg`` is resolved for the model
    (:meth:`ExperimentConfig.with_context`); ``data`` is its split when already built; ``info`` the
    model's :class:`~cwa_core.models.ModelInfo` (the super-weight report's ids and dtype), if known."""
    worker = Worker(model, tokenizer, info, progress=progress)
    if data is not None:
        worker.use_split(cfg, data)
    return run_cell(worker, cfg, progress=progress)


def run_cell(worker: Worker, cfg: ExperimentConfig, *, shared: Shared | None = None, progress: bool = False,
             stage: Stage | None = None) -> ExperimentResult:
    """Run the cell's stages on ``worker`` in order (what ``shared`` holds is not run again) and
    assemble its result. Timings: data, baseline_ppl, super_weights, score, perturb_eval (wall
    seconds; ``stage`` also wraps each call, and the stability report)."""
    shared = shared or Shared()
    clock = _Clock(stage)
    with clock("data"):
        worker.prepare(cfg)
    baseline = shared.baseline
    if baseline is None:
        with clock("baseline_ppl"):
            baseline = worker.baseline(cfg)
        b = baseline["ppl"]
        log.info("baseline perplexity %.4f over %d windows of %d tokens", b.ppl, b.n_windows, b.window_length)
    study = shared.study
    if study is None and cfg.detect_super_weights:
        with clock("super_weights"):
            study = worker.superweights(cfg, baseline["ppl"])
        log.info("super weights: %d candidate(s) in %.1f s", len(study["report"]["candidates"]),
                 clock.seconds["super_weights"])
    track = tuple(study["track"]) if study is not None else ()
    scored, rows = [], []
    bar = tqdm(total=len(cfg.seeds) * (1 + len(kinds(cfg))), desc=f"{cfg.metric} {cfg.mode} K={cfg.topk}",
               disable=not progress, unit="step")
    for seed in cfg.seeds:
        bar.set_postfix_str(f"seed {seed}: scoring")
        with clock("score"):
            answer = shared.scores.get(seed) or worker.score(cfg, seed, cfg.topk, (cfg.mode,), track)
        scored.append(answer)
        bar.update()
        for kind in kinds(cfg):
            bar.set_postfix_str(f"seed {seed}: {kind}")
            with clock("perturb_eval"):
                rows.append(worker.evaluate(cfg, answer["scores"].selection(kind, cfg.mode, cfg.topk), seed))
            bar.update()
    bar.close()
    trials = _run_campaign(worker, cfg, scored, study, clock, progress)
    return assemble(cfg, baseline, scored, rows, study, clock.seconds, stage=stage, trials=trials)


def _run_campaign(worker: Worker, cfg: ExperimentConfig, scored: Sequence[dict], study: dict | None, clock,
                  progress: bool) -> list[list[dict]]:
    """The cell's campaign trials (``cfg.campaign_trials()``), each on its seed's protected sets."""
    todo = cfg.campaign_trials()
    if not todo:
        return []
    by_seed = {seed: protection(cfg, answer, study) for seed, answer in zip(cfg.seeds, scored)}
    out = []
    for seed, level, trial in tqdm(todo, desc=f"{cfg.campaign} x{len(cfg.protect)} arms", disable=not progress,
                                   unit="trial"):
        with clock("campaign"):
            out.append(worker.trial(cfg, seed, level, trial, *by_seed[seed]))
    return out


def _no_stage(name: str) -> ContextManager:
    return nullcontext()


class _Clock:
    """Wall seconds per stage (summed over its calls), with the caller's ``stage`` around each."""

    def __init__(self, stage: Stage | None) -> None:
        self.stage = stage or _no_stage
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        self.seconds.setdefault(name, 0.0)
        with self.stage(name):
            t = time.perf_counter()
            try:
                yield
            finally:
                self.seconds[name] += time.perf_counter() - t
