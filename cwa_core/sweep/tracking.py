"""MLflow tracking, from the driver only (workers return results; they never log).

Hierarchy, all in one experiment per sweep name:
  sweep run (parent; the sweep file as artifact)
    cell run (every setting as a param; mean ratios; the cell's output folder as artifacts)
      one run per seed and selection (params model, metric, mode, topk, perturbation,
      selection, seed; metrics ppl, baseline_ppl, ppl_ratio)
    stability run per (model, metric, K, mode): jaccard_mean/min/max, spearman_mean
Every run below the sweep run is tagged with the cell id and the sweep run's id, so a resumed
sweep can find (and replace) what an interrupted run of the same sweep half-logged, and
nothing else: runs of earlier sweeps of the same cells are never touched.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from ..experiment import ratios_by_selection

log = logging.getLogger(__name__)

TAG_CELL = "cwa.cell_id"
TAG_KIND = "cwa.kind"
TAG_SWEEP = "cwa.sweep"
TAG_STABILITY = "cwa.stability_key"
TAG_SWEEP_RUN = "cwa.sweep_run_id"


def _flat(settings: dict) -> dict[str, str]:
    return {k: (",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)) for k, v in settings.items()}


def _artifact_root(uri: str, experiment: str) -> str | None:
    """Artifacts beside a SQLite store (``<db dir>/mlruns/<experiment>``), not in whatever the
    current directory happens to be; other stores keep MLflow's own default."""
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):]).expanduser().resolve()
        return (db.parent / "mlruns" / experiment).as_uri()
    return None


class Tracker:
    """A thin wrapper over ``MlflowClient`` with explicit run ids (no global active run)."""

    def __init__(self, tracking_uri: str | None, experiment: str) -> None:
        import mlflow
        from mlflow.tracking import MlflowClient

        self.uri = tracking_uri or mlflow.get_tracking_uri()
        self.client = MlflowClient(tracking_uri=self.uri)
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            self.experiment_id = self.client.create_experiment(experiment, artifact_location=_artifact_root(self.uri, experiment))
        else:
            self.experiment_id = exp.experiment_id
        self.experiment = experiment
        self.resumed = False  # True once start_sweep has reopened an existing sweep run

    # -- helpers ---------------------------------------------------------------------------
    def _run(self, name: str, parent: str | None, tags: dict) -> str:
        all_tags = dict(tags)
        if parent:
            all_tags["mlflow.parentRunId"] = parent
            all_tags.setdefault(TAG_SWEEP_RUN, parent)
        return self.client.create_run(self.experiment_id, tags=all_tags, run_name=name).info.run_id

    def _log(self, run_id: str, params: dict | None = None, metrics: dict | None = None) -> None:
        from mlflow.entities import Metric, Param

        now = int(time.time() * 1000)
        self.client.log_batch(
            run_id,
            metrics=[Metric(k, float(v), now, 0) for k, v in (metrics or {}).items() if v is not None],
            params=[Param(k, str(v)[:6000]) for k, v in (params or {}).items()],
        )

    def runs_tagged(self, **tags: str) -> list:
        where = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
        return list(self.client.search_runs([self.experiment_id], filter_string=where, max_results=5000))

    # -- the sweep -------------------------------------------------------------------------
    def start_sweep(self, sweep, parent_run_id: str | None) -> str:
        if parent_run_id:
            try:
                self.client.update_run(parent_run_id, status="RUNNING")
                self.resumed = True
                return parent_run_id
            except Exception:  # deleted or from another store: start afresh
                log.warning("parent run %s not found in %s; starting a new one", parent_run_id, self.uri)
        run_id = self._run(sweep.name, None, {TAG_SWEEP: sweep.name, TAG_KIND: "sweep"})
        self._log(run_id, params={"sweep": sweep.name, "cells": len(sweep.cells), "spec_hash": sweep.spec_hash})
        if sweep.path is not None:
            self.client.log_artifact(run_id, str(sweep.path))
        return run_id

    def end_sweep(self, run_id: str, status: str, summary: dict) -> None:
        self._log(run_id, metrics={k: v for k, v in summary.items() if isinstance(v, (int, float))})
        self.client.set_terminated(run_id, status)

    def forget_cell(self, cell_id: str, sweep_run_id: str) -> list[str]:
        """Delete the runs of a cell that an interrupted run of this sweep (``sweep_run_id``)
        left behind, half-logged; returns their ids. A fresh sweep run has none to look for."""
        if not self.resumed:
            return []
        runs = self.runs_tagged(**{TAG_CELL: cell_id, TAG_SWEEP_RUN: sweep_run_id})
        for r in runs:
            self.client.delete_run(r.info.run_id)
        return [r.info.run_id for r in runs]

    def log_cell(self, parent: str, cell, result: dict, cell_dir: Path) -> str:
        """The cell run with its children; ``result`` is the cell's perturbation report."""
        cfg = cell.config
        name = f"{Path(str(cell.settings['model'])).name}/{cfg.metric}/{cfg.mode}/K{cfg.topk}/{cfg.perturb}"
        run_id = self._run(name, parent, {TAG_CELL: cell.id, TAG_KIND: "cell"})
        means = ratios_by_selection(result["results"])
        self._log(run_id, params={**_flat(cell.settings), "cell_id": cell.id, "perturbation": cfg.perturb},
                  metrics={"baseline_ppl": result["baseline"]["ppl"],
                           **{f"{k}_ppl_ratio_mean": sum(v) / len(v) for k, v in means.items()}})
        for r in result["results"]:
            child = self._run(f"{name}/{r['selection']}/seed{r['seed']}", run_id,
                              {TAG_CELL: cell.id, TAG_KIND: "seed", TAG_SWEEP_RUN: parent})
            self._log(child, params={"model": cell.settings["model"], "metric": cfg.metric, "mode": cfg.mode,
                                     "topk": cfg.topk, "perturbation": cfg.perturb, "selection": r["selection"],
                                     "seed": r["seed"], "cell_id": cell.id},
                      metrics={"ppl": r["ppl"], "baseline_ppl": result["baseline"]["ppl"], "ppl_ratio": r["ppl_ratio"],
                               "nll": r["nll"]})
            self.client.set_terminated(child, "FINISHED")
        self.client.log_artifacts(run_id, str(cell_dir))
        self.client.set_terminated(run_id, "FINISHED")
        return run_id

    def log_stability(self, parent: str, key: str, cell, stability: dict, plot: Path | None) -> str:
        cfg = cell.config
        name = f"stability/{Path(str(cell.settings['model'])).name}/{cfg.metric}/{cfg.mode}/K{cfg.topk}"
        run_id = self._run(name, parent, {TAG_STABILITY: key, TAG_CELL: cell.id, TAG_KIND: "stability"})
        j, s = stability["jaccard"], stability["spearman"]
        self._log(run_id, params={"model": cell.settings["model"], "metric": cfg.metric, "mode": cfg.mode,
                                  "topk": cfg.topk, "seeds": ",".join(map(str, cfg.seeds)),
                                  "data_independent": stability["data_independent"]},
                  metrics={"jaccard_mean": j["mean"], "jaccard_min": j["min"], "jaccard_max": j["max"],
                           "spearman_mean": s["mean"]})
        self.client.log_text(run_id, json.dumps(stability, indent=2, default=str), "stability.json")
        if plot is not None and plot.exists():
            self.client.log_artifact(run_id, str(plot))
        self.client.set_terminated(run_id, "FINISHED")
        return run_id
