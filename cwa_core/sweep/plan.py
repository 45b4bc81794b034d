"""The plan: which work the cells share.

One model load per actor; one baseline perplexity per (model, evaluation settings); one
super-weight study (detection and causal test) per (model, evaluation settings, thresholds,
seeds) where cells ask for it; one scoring pass per (model, metric, seed, calibration settings)
at the largest K and every mode any cell wants (smaller K are prefixes; it also ranks the
super-weight candidates, so it waits for their study); one evaluation per (cell, seed, selection).

It also emits that work as tasks (:class:`Task`) with explicit dependencies (``Plan.tasks``): a
super-weight study waits for the baseline of its model and evaluation settings (its causal
test's reference, not measured again) and its scoring passes wait for it; a cell's evaluations
wait for its baseline, study and scoring passes; the cell's finish (run by the driver) waits for them all.
:mod:`.taskgraph` schedules them.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

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
    tasks: list[Task] = field(default_factory=list)  # the same work as tasks with dependencies

    def rows(self) -> list[dict]:
        """The cell table of ``--dry-run``."""
        return [{"id": c.id, "model": c.settings["model"], "metric": c.config.metric, "mode": c.config.mode,
                 "K": c.config.topk, "perturbation": c.config.perturb, "seeds": ",".join(map(str, c.config.seeds))}
                for c in self.cells]

    def counts(self) -> dict:
        return {"cells": len(self.cells), "models": len(self.models), "baselines": len(self.baselines),
                "scoring_passes": len(self.scores), "super_weight_studies": len(self.studies),
                "evaluations": sum(len(c.config.seeds) * (1 + len(c.config.controls)) for c in self.cells),
                "trials": sum(len(c.config.campaign_trials()) for c in self.cells)}


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
    plan = Plan(cells, models, baselines, scores, studies)
    plan.tasks = make_tasks(plan)
    return plan


@dataclass(frozen=True, eq=False)
class Task:
    """One unit of the plan's work: what it is, which model's actors run it, and the tasks
    whose results it needs (``deps``, ids of tasks earlier in ``Plan.tasks``).

    ``args`` by kind: baseline ``(config,)``; superweights ``(config,)`` (the baseline's
    perplexity is appended when it is done); score ``(config, seed, k, modes)``
    (the study's candidates are appended when it is done); evaluate ``(config, seed, selection
    kind, score task id)``; trial ``(config, seed, level, trial, score task id, study task id or
    None)`` (one trial of a campaign, every arm); finish :class:`CellInputs`."""

    id: str
    kind: str  # baseline | superweights | score | evaluate | trial | finish
    model_key: tuple
    deps: tuple[str, ...] = ()
    key: Any = None  # the sharing key: baseline, study or score key; (cell id, seed, selection); cell id
    args: Any = ()
    cell: str | None = None  # the one cell it serves (an evaluation, a finish); None if shared
    on_driver: bool = False  # run by the driver (a cell's finish: writing, logging), not by an actor


@dataclass(frozen=True)
class CellInputs:
    """What a cell's finish reads: the ids of the tasks whose results it writes."""

    cell: Cell
    baseline: str
    scores: tuple[str, ...]  # one per seed, in the cell's seed order
    evaluations: tuple[str, ...]  # per seed, top_k then the controls
    study: str | None = None
    trials: tuple[str, ...] = ()  # the campaign's trials, in ExperimentConfig.campaign_trials order


def make_tasks(plan: Plan) -> list[Task]:
    """The plan's work as tasks, in the order they are first handed out: baselines, studies
    (each after its baseline), scoring passes, then per cell its evaluations (seed by seed, top_k
    then controls) and its finish."""
    tasks: list[Task] = []
    ids: dict[tuple, str] = {}
    for i, (bk, cfg) in enumerate(plan.baselines.items()):
        ids[bk] = f"baseline/{i}"
        tasks.append(Task(ids[bk], "baseline", model_key(cfg), key=bk, args=(cfg,)))
    for i, (key, cfg) in enumerate(plan.studies.items()):
        ids[key] = f"superweights/{i}"
        base = (ids[baseline_key(cfg)],)  # the causal test's reference: the baseline of these eval settings
        tasks.append(Task(ids[key], "superweights", model_key(cfg), base, key=key, args=(cfg,)))
    for i, (sk, st) in enumerate(plan.scores.items()):
        ids[sk] = f"score/{i}"
        cfg = replace(st.config, topk=st.k)
        deps = () if st.sw_key is None else (ids[st.sw_key],)  # it ranks the study's candidates
        tasks.append(Task(ids[sk], "score", model_key(cfg), deps, sk, (cfg, st.seed, st.k, tuple(sorted(st.modes)))))
    for cell in plan.cells:
        tasks.extend(_cell_tasks(cell, ids))
    return tasks


def _cell_tasks(cell: Cell, ids: dict[tuple, str]) -> list[Task]:
    """A cell's evaluations and campaign trials (each waits for every input of the cell) and its finish."""
    cfg, mk = cell.config, model_key(cell.config)
    study = None if sw_key(cfg) is None else ids[sw_key(cfg)]
    scores = tuple(ids[score_key(cfg, s)] for s in cfg.seeds)
    inputs = (ids[baseline_key(cfg)], *([study] if study else []), *scores)
    evals = [Task(f"evaluate/{cell.id}/{seed}/{kind}", "evaluate", mk, inputs, (cell.id, seed, kind),
                  (cfg, seed, kind, score), cell=cell.id)
             for seed, score in zip(cfg.seeds, scores) for kind in ("top_k", *cfg.controls)]
    by_seed = dict(zip(cfg.seeds, scores))
    trials = [Task(f"trial/{cell.id}/{seed}/{level!r}/{t}", "trial", mk, inputs, (cell.id, seed, level, t),
                   (cfg, seed, level, t, by_seed[seed], study), cell=cell.id)
              for seed, level, t in cfg.campaign_trials()]
    work = (*(t.id for t in evals), *(t.id for t in trials))
    finish = Task(f"finish/{cell.id}", "finish", mk, (*inputs, *work), cell.id,
                  CellInputs(cell, inputs[0], scores, tuple(t.id for t in evals), study, tuple(t.id for t in trials)),
                  cell=cell.id, on_driver=True)
    return [*evals, *trials, finish]


def format_table(rows: list[dict]) -> str:
    if not rows:
        return "(no cells)"
    cols = list(rows[0])
    width = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    line = lambda r: "  ".join(str(r[c]).ljust(width[c]) for c in cols)
    return "\n".join([line({c: c for c in cols}), line({c: "-" * width[c] for c in cols}), *map(line, rows)])

