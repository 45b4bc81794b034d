"""The work an actor does, as a plain class: the runner wraps it with ``ray.remote``.

A worker loads one model once and keeps it resident; it tokenizes each corpus once; it
answers baseline, scoring and evaluation requests one at a time (an actor runs one task at a
time, so perturbations never overlap).
"""
from __future__ import annotations

import logging
import os
import time

import psutil
import torch

from ..architectures import scored_params
from ..config import DATA_FIELDS, ExperimentConfig, settings_key
from ..data import DataSplit
from ..experiment import (baseline_perplexity, evaluate_selection, load_split, score_seed, study_super_weights,
                          tensor_table)
from ..metrics import ScoreOptions
from ..models import load_model
from ..perturb import PerturbSpec
from ..selection import Selection
from .faults import maybe_fault

log = logging.getLogger(__name__)


class ModelWorker:
    def __init__(self, config: ExperimentConfig, *, threads: int | None = None, device_map: str | None = None) -> None:
        if threads:
            torch.set_num_threads(max(1, int(threads)))
        t = time.perf_counter()
        self.loaded = load_model(config.model, dtype=config.dtype, device=config.device if not device_map else "auto",
                                 device_map=device_map, revision=config.revision,
                                 trust_remote_code=config.trust_remote_code)
        self.load_seconds = time.perf_counter() - t
        self.counts = {"model_loads": 1, "scoring_passes": 0, "baselines": 0, "evaluations": 0}
        self._splits: dict[tuple, DataSplit] = {}
        self._refs: dict[tuple, list] = {}

    # -- caches --------------------------------------------------------------------------
    def _split(self, cfg: ExperimentConfig) -> DataSplit:
        key = settings_key(cfg, DATA_FIELDS)  # tokenized once per corpus and window plan
        if key not in self._splits:
            self._splits[key] = load_split(cfg, self.loaded.tokenizer)
        return self._splits[key]

    def _refs_for(self, param_types: tuple) -> list:
        if param_types not in self._refs:
            self._refs[param_types] = scored_params(self.loaded.model, param_types)
        return self._refs[param_types]

    # -- tasks ---------------------------------------------------------------------------
    def info(self) -> dict:
        return {"pid": os.getpid(), "model": self.loaded.info.__dict__, "load_seconds": self.load_seconds,
                "counts": dict(self.counts), "rss_bytes": psutil.Process().memory_info().rss,
                "cuda_allocated_bytes": torch.cuda.memory_allocated() if torch.cuda.is_available() else None}

    def baseline(self, cfg: ExperimentConfig) -> dict:
        maybe_fault("baseline", metric=cfg.metric)
        t = time.perf_counter()
        split = self._split(cfg)
        ppl = baseline_perplexity(self.loaded.model, split, cfg)
        self.counts["baselines"] += 1
        return {"ppl": ppl, "data": split.describe(), "seconds": time.perf_counter() - t,
                "model": dict(self.loaded.info.__dict__)}

    def superweights(self, cfg: ExperimentConfig) -> dict:
        """Super-weight detection and causal test: the report (ranks empty) and the weights the
        scoring passes rank."""
        maybe_fault("superweights", metric=cfg.metric)
        t = time.perf_counter()
        info = self.loaded.info
        report, track = study_super_weights(cfg, self.loaded.model, self.loaded.tokenizer, self._split(cfg),
                                            model_id=info.model_id, dtype=info.dtype,
                                            hf_id=cfg.hf_id or (info.model_id if info.source == "hub" else None))
        self.counts["super_weight_studies"] = self.counts.get("super_weight_studies", 0) + 1
        return {"report": report, "track": track, "seconds": time.perf_counter() - t}

    def score(self, cfg: ExperimentConfig, seed: int, k: int, modes: tuple[str, ...], track: tuple = ()) -> dict:
        """One scoring pass; only selections, samples, statistics (and ranks of ``track``ed
        weights) leave the worker."""
        maybe_fault("score", metric=cfg.metric, seed=seed)
        split = self._split(cfg)
        refs = self._refs_for(tuple(cfg.param_types))
        ss = score_seed(self.loaded.model, refs, split, metric=cfg.metric, seed=seed, k=k, modes=modes,
                        max_samples=cfg.max_samples, opts=ScoreOptions(cfg.micro_batch, cfg.hutchinson_probes),
                        stability_sample=cfg.stability_sample, track=track)
        self.counts["scoring_passes"] += 1
        return {"scores": ss, "tensors": tensor_table(refs)}

    def evaluate(self, cfg: ExperimentConfig, selection: Selection, seed: int) -> dict:
        maybe_fault("evaluate", metric=cfg.metric, topk=cfg.topk, perturb=cfg.perturb, seed=seed, kind=selection.kind)
        split = self._split(cfg)
        refs = self._refs_for(tuple(cfg.param_types))
        spec = PerturbSpec(cfg.perturb, cfg.perturb_scale, cfg.perturb_bit, seed)
        t = time.perf_counter()
        row = evaluate_selection(self.loaded.model, refs, selection, spec, split.eval_windows(), None, seed=seed,
                                 batch_size=cfg.eval_batch_size)
        self.counts["evaluations"] += 1
        row["seconds"] = time.perf_counter() - t
        return row

