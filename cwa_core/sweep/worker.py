"""The work an actor does, as a plain class: the runner wraps it with ``ray.remote``, the single
command runs it in-process.

A worker loads one model once and keeps it resident; it tokenizes each corpus once; it
answers baseline, scoring and evaluation requests one at a time (an actor runs one task at a
time, so perturbations never overlap). The tasks are :class:`cwa_core.cell.Worker`'s; this
class adds the loading and the faults the tests inject (:mod:`.faults`).
"""
from __future__ import annotations

import logging
import os
import time

import psutil
import torch

from ..cell import Worker
from ..config import ExperimentConfig
from ..models import load_model
from ..selection import Selection
from .faults import maybe_fault

log = logging.getLogger(__name__)


class ModelWorker(Worker):
    def __init__(self, config: ExperimentConfig, *, threads: int | None = None, device_map: str | None = None,
                 progress: bool = False) -> None:
        if threads:
            torch.set_num_threads(max(1, int(threads)))
        t = time.perf_counter()
        self.loaded = load_model(config.model, dtype=config.dtype, device=config.device if not device_map else "auto",
                                 device_map=device_map, revision=config.revision,
                                 trust_remote_code=config.trust_remote_code)
        self.load_seconds = time.perf_counter() - t
        super().__init__(self.loaded.model, self.loaded.tokenizer, self.loaded.info, progress=progress)
        self.counts["model_loads"] = 1

    # -- tasks ---------------------------------------------------------------------------
    def info(self) -> dict:
        return {"pid": os.getpid(), "model": self.loaded.info.__dict__, "load_seconds": self.load_seconds,
                "counts": dict(self.counts), "rss_bytes": psutil.Process().memory_info().rss,
                "cuda_allocated_bytes": torch.cuda.memory_allocated() if torch.cuda.is_available() else None}

    def baseline(self, cfg: ExperimentConfig) -> dict:
        maybe_fault("baseline", metric=cfg.metric)
        return super().baseline(cfg)

    def superweights(self, cfg: ExperimentConfig, baseline=None) -> dict:
        maybe_fault("superweights", metric=cfg.metric)
        return super().superweights(cfg, baseline)

    def score(self, cfg: ExperimentConfig, seed: int, k: int, modes: tuple[str, ...], track: tuple = ()) -> dict:
        maybe_fault("score", metric=cfg.metric, seed=seed)
        return super().score(cfg, seed, k, modes, track)

    def trial(self, cfg: ExperimentConfig, seed: int, level: float, trial: int, selections: dict,
              candidates=()) -> list[dict]:
        maybe_fault("trial", metric=cfg.metric, campaign=cfg.campaign, seed=seed, trial=trial)
        return super().trial(cfg, seed, level, trial, selections, candidates)

    def evaluate(self, cfg: ExperimentConfig, selection: Selection, seed: int) -> dict:
        maybe_fault("evaluate", metric=cfg.metric, topk=cfg.topk, perturb=cfg.perturb, seed=seed, kind=selection.kind)
        return super().evaluate(cfg, selection, seed)
