"""The plan: which work the cells share.

One model load per actor; one baseline perplexity per (model, evaluation settings); one
super-weight study (detection and causal test) per (model, evaluation settings, thresholds,
seeds) where cells ask for it; one scoring pass per (model, metric, seed, calibration settings)
at the largest K and every mode any cell wants (smaller K are prefixes; it also ranks the
super-weight candidates, so it waits for their study); one evaluation per (cell, seed, selection).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..config import ExperimentConfig, pass_fields, settings_key
from .spec import Cell

# The settings that key each kind of shared work, from their declarations (cwa_core.config: a
# setting's ``passes``); the data split's settings are in every pass that reads data.
MODEL_FIELDS = pass_fields("model")
EVAL_FIELDS = pass_fields("eval")
SW_FIELDS = tuple(f for f in pass_fields("study") if f not in pass_fields("data"))
SCORE_FIELDS = pass_fields("score")


def model_key(cfg: ExperimentConfig) -> tuple:
    return settings_key(cfg, MODEL_FIELDS)


def baseline_key(cfg: ExperimentConfig) -> tuple:
    return (model_key(cfg), settings_key(cfg, EVAL_FIELDS))


def score_key(cfg: ExperimentConfig, seed: int) -> tuple:
    """A scoring pass; with super-weight detection on, it also ranks the study's candidates, so the
    study's settings key it too (with detection off they do not: such cells share passes)."""
    study = settings_key(cfg, SW_FIELDS) if cfg.detect_super_weights else ()
    return (model_key(cfg), settings_key(cfg, SCORE_FIELDS), study, ("seed", seed))


def sw_key(cfg: ExperimentConfig) -> tuple | None:
    """The super-weight study a cell needs, or None."""
    if not cfg.detect_super_weights:
        return None
    return (model_key(cfg), settings_key(cfg, EVAL_FIELDS + SW_FIELDS + ("seeds",)))


@dataclass
class ScoreTask:
    config: ExperimentConfig  # any cell's config (the shared fields are what matter)
    seed: int
    k: int = 0
    modes: set = field(default_factory=set)
    sw_key: tuple | None = None  # the study whose candidates this pass ranks (it waits for it)


@dataclass
class Plan:
    cells: list[Cell]
    models: dict[tuple, list[Cell]]  # model key -> its cells
    baselines: dict[tuple, ExperimentConfig]
    scores: dict[tuple, ScoreTask]
    studies: dict[tuple, ExperimentConfig] = field(default_factory=dict)  # super-weight studies

    def rows(self) -> list[dict]:
        """The cell table of ``--dry-run``."""
        return [{"id": c.id, "model": c.settings["model"], "metric": c.config.metric, "mode": c.config.mode,
                 "K": c.config.topk, "perturbation": c.config.perturb, "seeds": ",".join(map(str, c.config.seeds))}
                for c in self.cells]

    def counts(self) -> dict:
        return {"cells": len(self.cells), "models": len(self.models), "baselines": len(self.baselines),
                "scoring_passes": len(self.scores), "super_weight_studies": len(self.studies),
                "evaluations": sum(len(c.config.seeds) * (1 + len(c.config.controls)) for c in self.cells)}


def make_plan(cells: list[Cell]) -> Plan:
    models: dict[tuple, list[Cell]] = {}
    baselines: dict[tuple, ExperimentConfig] = {}
    scores: dict[tuple, ScoreTask] = {}
    studies: dict[tuple, ExperimentConfig] = {}
    for cell in cells:
        cfg = cell.config
        models.setdefault(model_key(cfg), []).append(cell)
        baselines.setdefault(baseline_key(cfg), cfg)
        study = sw_key(cfg)
        if study is not None:
            studies.setdefault(study, cfg)
        for seed in cfg.seeds:
            # the candidates depend on the study's model, data and thresholds, not on its seeds:
            # a pass shared by cells of other seed lists may rank those of any of their studies
            task = scores.setdefault(score_key(cfg, seed), ScoreTask(cfg, seed, sw_key=study))
            task.k = max(task.k, cfg.topk)
            task.modes.add(cfg.mode)
    return Plan(cells, models, baselines, scores, studies)


def format_table(rows: list[dict]) -> str:
    if not rows:
        return "(no cells)"
    cols = list(rows[0])
    width = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    line = lambda r: "  ".join(str(r[c]).ljust(width[c]) for c in cols)
    return "\n".join([line({c: c for c in cols}), line({c: "-" * width[c] for c in cols}), *map(line, rows)])

