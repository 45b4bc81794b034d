"""MLflow tracking, from the driver only (workers return results; they never log).

Layout, all in one experiment per sweep name, marked as a model-development experiment
(``mlflow.experimentKind``) so that ``mlflow ui`` opens on its runs table, not on the GenAI pages:
  sweep run (the sweep file, and at the end the analysis and report, as artifacts)
    stability run per (model, metric, K, mode): jaccard_mean/min/max, spearman_mean
  cell run, top level: one row per cell in the runs table, to sort, filter and compare: every
  setting as a param; mean ratios by selection, Jaccard, the super-weight numbers and (after the
  analysis) the critical K as metrics; the cell's output folder as artifacts
    one run per seed and selection (params model, metric, mode, topk, perturbation,
    selection, seed, ppl_status; metrics ppl, baseline_ppl, ppl_ratio, log10_ppl_ratio, nll where finite)
Every perplexity ratio is logged twice: as it is and as its log10 (``log10_top_k_ppl_ratio_mean``
beside ``top_k_ppl_ratio_mean``, ``log10_ppl_ratio`` beside ``ppl_ratio``), so that MLflow's linear
charts read ratios that span orders of magnitude; a ratio that is not finite is logged as neither.
A cell is logged from its folder (the files written first are the record), so a cell whose files
were written but whose runs were not (a driver killed in between) is logged on resume without
recomputing anything. Every run below the sweep run is tagged with the cell id and the sweep
run's id. When a sweep run is resumed, its runs that the manifest does not record as complete
(left RUNNING by a dead driver, or half-logged) are marked KILLED and tagged superseded: they are
never counted as done, never deleted, and runs of other sweeps are never touched.
"""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

from ..evaluate import finite_status
from ..numerics import mean_ratio
from ..schema import ratios_by_selection
from .. import schema
from ..schema import (TAG_CELL, TAG_ERROR, TAG_KIND, TAG_PLOTS_FAILED, TAG_STABILITY, TAG_SUPERSEDED,  # noqa: F401
                      TAG_SWEEP, TAG_SWEEP_RUN)
from .faults import maybe_fault

log = logging.getLogger(__name__)

# MLflow 3 shows an experiment without this tag as a GenAI one (an empty overview page)
EXPERIMENT_KIND = "mlflow.experimentKind"
MODEL_DEVELOPMENT = "custom_model_development"


def ui_hint(uri: str, experiment_id: str, port: int = 5000) -> str:
    """How to look at a study in ``mlflow ui``: the command (this machine only) and the page of its
    cell runs, sorted by top-K damage, as charts (MLflow 3 opens on its GenAI pages unless the
    address asks for model training)."""
    query = ("workflowType=machine_learning&searchFilter=tags.%60cwa.kind%60%20%3D%20%27cell%27"
             "&orderByKey=metrics.%60top_k_ppl_ratio_mean%60&orderByAsc=false&compareRunsMode=CHART")
    return (f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port {port}, then open "
            f"http://127.0.0.1:{port}/#/experiments/{experiment_id}/runs?{query}")


def log10_ratio(v: float | None) -> float | None:
    """log10 of a perplexity ratio for the charts; None (not logged, as the ratio itself is not)
    when the ratio is missing, NaN or not positive, and +inf for +inf (dropped like the ratio)."""
    if v is None or not float(v) > 0:
        return None
    return math.log10(float(v))


def with_log10(ratios: dict[str, float | None]) -> dict[str, float | None]:
    """The ratios as they are and each as ``log10_<name>`` (:func:`log10_ratio`), for MLflow."""
    return {**ratios, **{f"log10_{k}": log10_ratio(v) for k, v in ratios.items()}}


def campaign_metrics(campaign: dict) -> dict[str, float | None]:
    """A campaign's aggregates for its cell run (not one run per trial): per arm and level the
    median ratio (and its log10) and the failure rate, named ``campaign/<arm>/<what>/<level>``;
    the headline when it has a value. Non-finite values are not logged (:meth:`Tracker._log`)."""
    out: dict[str, float | None] = {}
    for s in campaign.get("summary", []):
        at = f"{s['arm']}/{{}}/{s['level']:g}"
        out[f"campaign/{at.format('failure_rate')}"] = s["failure_rate"]
        out[f"campaign/{at.format('median_ratio')}"] = s["median_ratio"]
        out[f"campaign/{at.format('log10_median_ratio')}"] = log10_ratio(s["median_ratio"])
    head = campaign.get("headline") or {}
    if head.get("available") and head.get("value") is not None:
        out["campaign/headline"] = head["value"]
    return out


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

    enabled = True

    def __init__(self, tracking_uri: str | None, experiment: str) -> None:
        import mlflow
        from mlflow.tracking import MlflowClient

        self.uri = tracking_uri or mlflow.get_tracking_uri()
        self.client = MlflowClient(tracking_uri=self.uri)
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            self.experiment_id = self.client.create_experiment(experiment, artifact_location=_artifact_root(self.uri, experiment),
                                                               tags={EXPERIMENT_KIND: MODEL_DEVELOPMENT})
        else:
            self.experiment_id = exp.experiment_id
            if exp.tags.get(EXPERIMENT_KIND) != MODEL_DEVELOPMENT:
                self.client.set_experiment_tag(self.experiment_id, EXPERIMENT_KIND, MODEL_DEVELOPMENT)
        self.experiment = experiment
        self.resumed = False  # True once start_sweep has reopened an existing sweep run
        self.sweep_run_id: str | None = None  # set by start_sweep; every later run belongs to it
        self.opened: set[str] = set()  # runs this driver created and has not terminated yet

    # -- helpers ---------------------------------------------------------------------------
    def _run(self, name: str, parent: str | None, tags: dict) -> str:
        """A new run, nested under ``parent`` if given; every run after the sweep run's own is
        tagged with the sweep run's id."""
        all_tags = dict(tags)
        if parent:
            all_tags["mlflow.parentRunId"] = parent
        if self.sweep_run_id:
            all_tags.setdefault(TAG_SWEEP_RUN, self.sweep_run_id)
        run_id = self.client.create_run(self.experiment_id, tags=all_tags, run_name=name).info.run_id
        self.opened.add(run_id)
        return run_id

    def _end(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status)
        self.opened.discard(run_id)

    def _log(self, run_id: str, params: dict | None = None, metrics: dict | None = None) -> None:
        from mlflow.entities import Metric, Param

        now = int(time.time() * 1000)
        self.client.log_batch(
            run_id,
            metrics=[Metric(k, float(v), now, 0) for k, v in (metrics or {}).items()
                     if v is not None and finite_status(float(v)) == "finite"],
            params=[Param(k, str(v)[:6000]) for k, v in (params or {}).items()],
        )

    def _search(self, where: str) -> list:
        """Every run of the experiment matching ``where`` (paged)."""
        out, token = [], None
        while True:
            page = self.client.search_runs([self.experiment_id], filter_string=where, max_results=1000,
                                           page_token=token)
            out.extend(page)
            token = page.token
            if not token:
                return out

    # -- the sweep -------------------------------------------------------------------------
    def start_sweep(self, sweep, parent_run_id: str | None) -> str:
        """Open the sweep run (``parent_run_id``: reopen it, a resumed sweep) and return its id."""
        if parent_run_id:
            try:
                self.client.update_run(parent_run_id, status="RUNNING")
                self.resumed = True
                self.sweep_run_id = parent_run_id
                return parent_run_id
            except Exception:  # deleted or from another store: start afresh
                log.warning("parent run %s not found in %s; starting a new one", parent_run_id, self.uri)
        run_id = self._run(sweep.name, None, {TAG_SWEEP: sweep.name, TAG_KIND: "sweep"})
        self._log(run_id, params={"sweep": sweep.name, "cells": len(sweep.cells), "spec_hash": sweep.spec_hash})
        if sweep.path is not None:
            self.client.log_artifact(run_id, str(sweep.path))
        self.sweep_run_id = run_id
        return run_id

    def end_sweep(self, status: str, summary: dict) -> None:
        self._log(self.sweep_run_id, metrics={k: v for k, v in summary.items() if isinstance(v, (int, float))})
        self._end(self.sweep_run_id, status)

    def close_leftovers(self, cell_runs: set[str], stability_runs: set[str]) -> list[str]:
        """Mark KILLED (and superseded) every run of this sweep run that the manifest does not
        record as complete: cell runs not in ``cell_runs`` and their children, stability runs not
        in ``stability_runs``. Returns their ids. A fresh sweep run has none to look for."""
        if not self.resumed:
            return []
        closed = []
        for r in self._search(f"tags.`{TAG_SWEEP_RUN}` = '{self.sweep_run_id}'"):
            tags, run_id = r.data.tags, r.info.run_id
            kind = tags.get(TAG_KIND)
            if tags.get(TAG_SUPERSEDED) == "true" or r.info.status == "FAILED":
                continue
            keep = ((kind == "cell" and run_id in cell_runs) or (kind == "seed" and tags.get("mlflow.parentRunId") in cell_runs)
                    or (kind == "stability" and run_id in stability_runs))
            if keep:
                continue
            self.client.set_tag(run_id, TAG_SUPERSEDED, "true")
            if r.info.status != "KILLED":
                self.client.set_terminated(run_id, "KILLED")
            closed.append(run_id)
        return closed

    def kill_open(self) -> None:
        """Ctrl-C: every run this driver opened and did not finish is marked KILLED."""
        for run_id in list(self.opened):
            try:
                self._end(run_id, "KILLED")
            except Exception as e:  # noqa: BLE001 - best effort while stopping
                log.warning("could not mark run %s KILLED: %s", run_id, e)

    # -- cells -----------------------------------------------------------------------------
    @staticmethod
    def _name(cell) -> str:
        cfg = cell.config
        name = f"{Path(str(cell.settings['model'])).name}/{cfg.metric}/{cfg.mode}/K{cfg.topk}/{cfg.perturb}"
        return name if cfg.campaign == "none" else f"{name}/{cfg.campaign}"

    def log_cell(self, cell, cell_dir: Path) -> str:
        """The cell run with its children, read from the cell's written folder. If logging fails
        half-way, the runs it opened are marked KILLED before the error goes on."""
        before = set(self.opened)
        try:
            return self._log_cell(cell, cell_dir)
        except BaseException:
            for run_id in self.opened - before:
                try:
                    self.client.set_tag(run_id, TAG_SUPERSEDED, "true")
                    self._end(run_id, "KILLED")
                except Exception:  # noqa: BLE001 - MLflow itself may be what failed
                    pass
            raise

    def _log_cell(self, cell, cell_dir: Path) -> str:
        cfg = cell.config
        result = json.loads((cell_dir / schema.PERTURBATION_RESULTS).read_text())
        manifest = json.loads((cell_dir / schema.MANIFEST).read_text())
        name = self._name(cell)
        run_id = self._run(name, None, {TAG_CELL: cell.id, TAG_KIND: "cell", TAG_SWEEP: self.experiment})
        means = {k: mean_ratio(v) for k, v in ratios_by_selection(result["results"]).items()}
        if manifest.get("plots_failed"):
            self.client.set_tag(run_id, TAG_PLOTS_FAILED, "; ".join(f"{k}: {v}" for k, v in manifest["plots_failed"].items())[:5000])
        extra = {}
        if (cell_dir / schema.STABILITY).exists():  # on the cell's row too, to sort and compare
            stab = json.loads((cell_dir / schema.STABILITY).read_text())
            extra.update({"jaccard_mean": stab["jaccard"]["mean"], "spearman_mean": stab["spearman"]["mean"]})
        if (cell_dir / schema.SUPER_WEIGHTS).exists():
            report = json.loads((cell_dir / schema.SUPER_WEIGHTS).read_text())
            every = report.get("all") or {}
            random_ppl = every.get("ppl_random")
            extra.update({"super_weight_candidates": len(report["candidates"]),
                          "super_weights_ppl_zeroed": every.get("ppl_zeroed"),
                          "super_weights_ppl_random": random_ppl.get("mean") if isinstance(random_ppl, dict) else None,
                          "super_weights_ppl_restored": every.get("ppl_restored"),
                          **with_log10({f"super_weights_{k}": every.get(k)
                                        for k in ("ratio_zeroed", "ratio_random", "ratio_restored")})})
        if (cell_dir / schema.CAMPAIGN_RESULTS).exists():
            extra.update(campaign_metrics(json.loads((cell_dir / schema.CAMPAIGN_RESULTS).read_text())))
        self._log(run_id, params={**_flat(cell.settings), "cell_id": cell.id, "perturbation": cfg.perturb,
                                  "protocol": (result.get("protocol") or {}).get("name", cfg.protocol)},
                  metrics={"baseline_ppl": result["baseline"]["ppl"],
                           **with_log10({f"{k}_ppl_ratio_mean": v for k, v in means.items()}), **extra})
        maybe_fault("driver:mid_log", cell=cell.id)
        for r in result["results"]:
            child = self._run(f"{name}/{r['selection']}/seed{r['seed']}", run_id,
                              {TAG_CELL: cell.id, TAG_KIND: "seed"})
            self._log(child, params={"model": cell.settings["model"], "metric": cfg.metric, "mode": cfg.mode,
                                     "topk": cfg.topk, "perturbation": cfg.perturb, "selection": r["selection"],
                                     "seed": r["seed"], "cell_id": cell.id,
                                     "ppl_status": r.get("ppl_status", finite_status(r["ppl"]))},
                      metrics={"ppl": r["ppl"], "baseline_ppl": result["baseline"]["ppl"], "nll": r["nll"],
                               **with_log10({"ppl_ratio": r["ppl_ratio"]})})
            self._end(child)
        self.client.log_artifacts(run_id, str(cell_dir))
        self._end(run_id)
        return run_id

    def log_failed_cell(self, cell, error: str, cell_dir: Path | None) -> str:
        """A FAILED cell run carrying the error (and whatever the cell folder holds)."""
        run_id = self._run(self._name(cell), None, {TAG_CELL: cell.id, TAG_KIND: "cell", TAG_ERROR: error[:5000],
                                                    TAG_SWEEP: self.experiment})
        self._log(run_id, params={**_flat(cell.settings), "cell_id": cell.id})
        if cell_dir is not None and cell_dir.is_dir():
            self.client.log_artifacts(run_id, str(cell_dir))
        self._end(run_id, "FAILED")
        return run_id

    def log_stability(self, key: str, cell, stability: dict, plot: Path | None) -> str:
        cfg = cell.config
        name = f"stability/{Path(str(cell.settings['model'])).name}/{cfg.metric}/{cfg.mode}/K{cfg.topk}"
        run_id = self._run(name, self.sweep_run_id, {TAG_STABILITY: key, TAG_CELL: cell.id, TAG_KIND: "stability"})
        j, s = stability["jaccard"], stability["spearman"]
        self._log(run_id, params={"model": cell.settings["model"], "metric": cfg.metric, "mode": cfg.mode,
                                  "topk": cfg.topk, "seeds": ",".join(map(str, cfg.seeds)),
                                  "data_independent": stability["data_independent"]},
                  metrics={"jaccard_mean": j["mean"], "jaccard_min": j["min"], "jaccard_max": j["max"],
                           "spearman_mean": s["mean"]})
        self.client.log_text(run_id, json.dumps(stability, indent=2, default=str), schema.STABILITY)
        if plot is not None and plot.exists():
            self.client.log_artifact(run_id, str(plot))
        self._end(run_id)
        return run_id

    # -- the analysis ------------------------------------------------------------------------
    def log_analysis(self, folder: Path, cell_metrics: dict[str, dict[str, float]]) -> None:
        """The study's analysis and report (``folder``) on the sweep run; per-cell numbers of the
        analysis (``cell_metrics``: MLflow cell run id -> metrics, e.g. the critical K of its
        model and metric) on the cells' rows."""
        self.client.log_artifacts(self.sweep_run_id, str(folder), "analysis")
        for run_id, metrics in cell_metrics.items():
            self._log(run_id, metrics=metrics)


class NullTracker:
    """The tracker of a sweep without MLflow (``tracking.enabled: false``, or before MLflow has
    started): :class:`Tracker`'s methods, doing nothing, so that callers need not ask."""

    enabled = False
    uri = experiment = experiment_id = sweep_run_id = None
    resumed = False

    def start_sweep(self, sweep, parent_run_id: str | None) -> None:
        return None

    def end_sweep(self, status: str, summary: dict) -> None:
        pass

    def close_leftovers(self, cell_runs: set[str], stability_runs: set[str]) -> list[str]:
        return []

    def kill_open(self) -> None:
        pass

    def log_cell(self, cell, cell_dir: Path) -> None:
        return None

    def log_failed_cell(self, cell, error: str, cell_dir: Path | None) -> None:
        return None

    def log_stability(self, key: str, cell, stability: dict, plot: Path | None) -> None:
        return None

    def log_analysis(self, folder: Path, cell_metrics: dict[str, dict[str, float]]) -> None:
        pass

