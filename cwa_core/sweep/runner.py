"""Run a sweep on Ray: one actor group per model, work shared as the plan says, results
written per cell (single-experiment layout) and tracked in MLflow by the driver alone.

What survives what:
- **A cell's files are the record.** They are written first (atomically, the cell's
  ``manifest.json`` last), then logged to MLflow from those files; ``sweep_manifest.json`` records
  each step (``written``, then ``finished``). Running the same command again skips finished
  cells, logs written-but-unlogged ones from their files, and computes the rest.
- **A task fails** (an exception, an out-of-memory error): it runs again, up to
  ``retries.task_tries`` times in all. **An actor dies** (its process killed, out of memory, its
  weights not restorable): a new actor replaces it and reloads the model, up to
  ``retries.actor_restarts`` times per actor; the task it was running is charged a try, the ones
  queued behind it are not.
- **One cell's failure is that cell's alone**: a task out of tries, or an exception while writing,
  plotting or logging it, marks that cell failed (``sweep_manifest.json``, ``<cell>/error.txt``, a
  FAILED MLflow run); every other cell goes on.
- **The driver dies** (SIGKILL): nothing half-written counts. On resume, the sweep run's MLflow
  runs that the manifest does not record as complete are marked KILLED (see ``tracking``).
- **Ctrl-C** stops within seconds: finished cells are kept, open MLflow runs are marked KILLED,
  the actors are killed and a Ray this command started is shut down.
"""
from __future__ import annotations

import contextlib
import json
import logging
import shutil
import signal
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .. import schema
from ..cell import assemble, shared_timings
from ..outputs import atomic_write, write_experiment, write_failure
from . import faults
from .ledger import LOCK, MANIFEST, SweepBusyError, SweepManifest, _exclusive, finished_cells, written_cells
from .plan import Plan, make_plan
from .progress import _Progress
from .ray_setup import _RayWorker, init_ray
from .scheduler import WAIT_S, execute
from .slots import MAX_INFLIGHT, SweepResourceError, _fmt_resources, _one_line, _Slot, actor_demand, fits
from .spec import Cell, Sweep, with_out_dir
from .tracking import NullTracker, Tracker

# names that importers (orchestrator, tests, benchmarks) read here; the code lives in the modules above
__all__ = ["LOCK", "MANIFEST", "MAX_INFLIGHT", "WAIT_S", "SweepBusyError", "SweepResourceError", "SweepRunner",
           "_Progress", "_RayWorker", "finished_cells", "init_ray", "written_cells"]

log = logging.getLogger(__name__)


class SweepRunner:
    def __init__(self, sweep: Sweep, out_root: Path, *, address: str | None = None, tracking_uri: str | None = None,
                 progress: bool = True, num_cpus: int | None = None, dashboard: bool = False) -> None:
        self.sweep = sweep
        self.root = Path(out_root)
        self.address = address
        self.tracking_uri = tracking_uri or sweep.tracking.tracking_uri
        self.progress = progress
        self.num_cpus = num_cpus
        self.dashboard = dashboard
        self.manifest = SweepManifest.load(self.root, sweep.name)
        self.timings: dict[str, float] = {}
        self.interrupted = False
        self.refused = False  # the sweep can never fit this Ray: nothing is recorded
        self.abandon_tracking = False  # start-up failed or was stopped: MLflow is not to be started
        self.timings_at: dict[str, float] = {}  # perf_counter() of events: "sigint"

    # -- bookkeeping -----------------------------------------------------------------------
    def _save(self) -> None:
        self.manifest.save()

    def _entry(self, cell: Cell) -> dict:
        return self.manifest.entry(cell.id)

    def run(self) -> dict:
        """Run what is left of the sweep; returns the sweep manifest. KeyboardInterrupt is
        re-raised after the clean stop."""
        existed = self.root.exists()
        try:
            with _exclusive(self.root), _sigint_clock(self.timings_at):
                return self._run()
        except SweepResourceError:
            if not existed:  # refused before any work: leave no folder behind (only the lock is in it)
                shutil.rmtree(self.root, ignore_errors=True)
            raise

    def _run(self) -> dict:
        t0 = time.perf_counter()
        done = self.manifest.finished()
        to_log = self.manifest.written()
        compute = [c for c in self.sweep.cells if c.id not in done and c.id not in to_log]
        logging_only = [c for c in self.sweep.cells if c.id in to_log]
        self.manifest.begin(self.sweep)
        if not compute and not logging_only:
            log.info("sweep %s: all %d cells already finished; nothing to do", self.sweep.name, len(self.sweep.cells))
            return self.manifest
        plan = make_plan(compute)
        self.timings = {}
        tracker, ray, owns_ray, groups = NullTracker(), None, False, {}
        status = "FAILED"
        try:
            # MLflow's start-up (import, schema) overlaps Ray's and the actors' (model loading);
            # it writes nothing until the sweep is known to fit this Ray
            # (a Ctrl-C meanwhile does not wait for MLflow's start-up: the thread is abandoned)
            pool = ThreadPoolExecutor(max_workers=1)
            try:
                fit_checked = threading.Event()
                tracking = pool.submit(self._start_tracking, fit_checked) if self.sweep.tracking.enabled else None
                try:
                    if compute:
                        t = time.perf_counter()
                        # not ``import ray`` here: init_ray sets the loopback variable Ray reads at import
                        owns_ray = "ray" not in sys.modules or not sys.modules["ray"].is_initialized()
                        ray = init_ray(self.address, self.num_cpus, dashboard=self.dashboard)
                        self.timings["ray_start_s"] = time.perf_counter() - t
                        self._check_fit(ray)
                        groups = self._start_actors(ray, plan)
                except BaseException as e:
                    self.refused = isinstance(e, SweepResourceError)
                    self.abandon_tracking = True
                    raise
                finally:
                    fit_checked.set()
                tracker = tracking.result() if tracking else NullTracker()
            finally:
                pool.shutdown(wait=False)
            self._save()
            self._close_leftovers(tracker)
            for cell in logging_only:
                self._log_cell(cell, tracker)
            if compute:
                self._execute(ray, plan, groups, tracker)
            if self.sweep.report:
                self._report(tracker)
            pending_ids = {c.id for c in compute + logging_only}
            status = "FINISHED" if all(self.manifest.entry(cid)["status"] == "finished" for cid in pending_ids) else "FAILED"
        except KeyboardInterrupt:
            self.interrupted = True
            status = "KILLED"
            log.warning("Ctrl-C: stopping; finished cells are kept, open MLflow runs marked KILLED, actors and Ray stopped")
            raise
        finally:
            with _no_sigint(self.interrupted):
                self._stop(ray, owns_ray, groups, tracker, status, len(compute) + len(logging_only), t0)
        return self.manifest

    def _stop(self, ray, owns_ray: bool, groups: dict, tracker, status: str, started: int, t0: float) -> None:
        """Record the run, close MLflow, stop the actors and (if ours) Ray; never raises."""
        if self.refused:
            if ray is not None and owns_ray:
                with contextlib.suppress(Exception):
                    ray.shutdown()
            return
        # where the time went: start-up (Ray, MLflow), the first result (actor start, model
        # load, tokenizing, first task), the rest; benchmarks/sweep_overhead.py reads these
        self.manifest.add_run(started, time.perf_counter() - t0, status, self.timings)
        with contextlib.suppress(Exception):
            self._save()
        t = time.perf_counter()
        if tracker.sweep_run_id is not None:
            try:
                if self.interrupted:
                    tracker.kill_open()
                counts = self.manifest.statuses()
                tracker.end_sweep(status, {"cells_finished": counts["finished"], "cells_failed": counts["failed"],
                                           "model_loads": self.manifest.get("model_loads", 0)})
            except Exception as e:  # noqa: BLE001 - the files are the record; say so and go on
                log.warning("could not close the MLflow sweep run: %s", _one_line(e))
        self.timings["stop_tracking_s"] = time.perf_counter() - t
        if ray is not None:
            t = time.perf_counter()
            for slots in groups.values():
                for slot in slots:
                    with contextlib.suppress(Exception):
                        ray.kill(slot.actor)
            self.timings["stop_actors_s"] = time.perf_counter() - t
            if owns_ray:
                t = time.perf_counter()
                with contextlib.suppress(Exception):
                    ray.shutdown()
                self.timings["ray_shutdown_s"] = time.perf_counter() - t  # the same dict as the manifest's run entry
        if "sigint" in self.timings_at:
            self.timings["sigint_to_stopped_s"] = time.perf_counter() - self.timings_at["sigint"]
        with contextlib.suppress(Exception):
            self._save()

    # -- start-up --------------------------------------------------------------------------
    def _start_tracking(self, go: threading.Event) -> Tracker | NullTracker:
        t = time.perf_counter()
        go.wait()
        if self.abandon_tracking:  # refused, or stopped (Ctrl-C) while starting
            return NullTracker()
        tracker = Tracker(self.tracking_uri, self.sweep.tracking.experiment or self.sweep.name)
        self.manifest["mlflow"] = {"tracking_uri": tracker.uri, "experiment": tracker.experiment,
                                   "experiment_id": tracker.experiment_id}
        self.manifest["parent_run_id"] = tracker.start_sweep(self.sweep, self.manifest.get("parent_run_id"))
        self.timings["tracking_start_s"] = time.perf_counter() - t
        return tracker

    def _close_leftovers(self, tracker) -> None:
        """A resumed sweep run: what a dead driver left open or half-logged is marked KILLED."""
        cells = self.manifest["cells"].values()
        kept = {c["mlflow_run_id"] for c in cells if c.get("status") == "finished" and c.get("mlflow_run_id")}
        stab = set(self.manifest.get("stability_runs", {}).values())
        closed = set(tracker.close_leftovers(kept, stab))
        if closed:
            log.warning("marked %d MLflow run(s) of an interrupted run of this sweep KILLED (superseded)", len(closed))
            runs = self.manifest.get("stability_runs", {})
            for k in [k for k, run_id in runs.items() if run_id in closed]:
                del runs[k]

    def _new_actor(self, ray, cfg):
        res = self.sweep.resources
        opts = {"num_cpus": res.cpus_per_actor, "num_gpus": res.gpus_per_actor, "max_restarts": 0}
        env = faults.env_vars()
        if env:  # tests that inject faults pass them on to the actors
            opts["runtime_env"] = {"env_vars": env}
        device_map = "auto" if res.gpus_per_actor > 1 else None
        threads = max(1, int(res.cpus_per_actor)) if res.cpus_per_actor else None
        return ray.remote(_RayWorker).options(**opts).remote(cfg, threads=threads, device_map=device_map)

    def _start_actors(self, ray, plan: Plan) -> dict:
        """One actor group per model; each actor starts loading its model as soon as Ray places it
        (at once where there is room; the others when a model's actors are released)."""
        groups = {}
        for mk, cells in plan.models.items():
            groups[mk] = []
            for _ in range(self.sweep.resources.actors_per_model):
                slot = _Slot(None)
                slot.renew(self._new_actor(ray, cells[0].config))
                groups[mk].append(slot)
        return groups

    def _check_fit(self, ray) -> None:
        """Refuse a sweep whose actor fits on no node: on a local Ray (fixed resources) with one
        line; on a cluster (``--address``: an autoscaler may still add a node that fits) with a
        warning."""
        need = actor_demand(self.sweep.resources)
        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
        if any(fits(need, have) for have in nodes):
            return
        biggest = max(nodes, key=lambda h: (h.get("GPU", 0), h.get("CPU", 0)), default={})
        msg = (f"resources: an actor needs {_fmt_resources(need)} but no node of this Ray cluster has that "
               f"(the largest has {_fmt_resources(biggest)}); lower resources.cpus_per_actor / gpus_per_actor"
               + ("" if self.address else " or give --num-cpus"))
        if self.address:
            log.warning("%s; waiting for the autoscaler to add a node that fits", msg)
            return
        raise SweepResourceError(msg)

    # -- execution -------------------------------------------------------------------------
    def _execute(self, ray, plan: Plan, groups: dict[tuple, list[_Slot]], tracker) -> None:
        """The main loop (``scheduler.execute``); tests replace this method to start no task."""
        execute(self, ray, plan, groups, tracker)

    # -- the study's analysis ------------------------------------------------------------------
    def _report(self, tracker) -> None:
        """``report: true``: the cross-model analysis and the PDF report of every finished cell,
        in ``<root>/analysis/``; with tracking, logged to the sweep run, and each cell's critical K
        on its run. A failure here is recorded (``report_error``), never the cells' failure."""
        t = time.perf_counter()
        out = self.root / "analysis"
        try:
            from analysis.cross_model import analyze
            from analysis.report import write_report

            result = analyze([self.root], output=out / schema.STATISTICAL_ANALYSIS)
            write_report(result, out / "research_summary.pdf", figures_dir=out / "figures")
            self.manifest["report"] = {"dir": "analysis", "json": f"analysis/{schema.STATISTICAL_ANALYSIS}",
                                       "pdf": "analysis/research_summary.pdf", "error": None}
            runs = {cid: c.get("mlflow_run_id") for cid, c in self.manifest["cells"].items()}
            per_cell: dict[str, dict[str, float]] = {}
            for group in result.get("dose_response", []):
                crit = (group.get("critical") or {}).get("critical_k")
                if isinstance(crit, (int, float)):
                    for cid in group.get("cells", []):
                        if runs.get(cid):
                            per_cell.setdefault(runs[cid], {})["critical_k"] = float(crit)
            tracker.log_analysis(out, per_cell)
        except Exception as e:  # noqa: BLE001 - the numbers stand without their report
            log.error("the analysis or report failed: %s", _one_line(e))
            log.debug("%s", traceback.format_exc())
            self.manifest["report"] = {"dir": "analysis", "error": _one_line(e)}
        self.timings["report_s"] = time.perf_counter() - t
        self._save()

    # -- one cell --------------------------------------------------------------------------
    def _finish_cell(self, cell: Cell, baseline: dict, scored: list[dict], rows: list[dict], tracker,
                     study: dict | None = None, trials: list[list[dict]] | None = None) -> None:
        """Write the cell's files (then say so), then log them to MLflow (then say so). The cell's
        result is assembled as the single command's is (:func:`cwa_core.cell.assemble`)."""
        timings = shared_timings(baseline, scored, rows, study, trials or ())
        out_cfg = with_out_dir(cell, self.root)
        result = assemble(out_cfg, baseline, scored, rows, study, timings, trials=trials or ())
        cell_dir = Path(out_cfg.out_dir)
        info = baseline["model"]
        # the cell's total: its share of the work (shared parts in full) plus writing its files
        write_experiment(cell_dir, result, model_info=info, device=info["device"], dtype=info["dtype"],
                         started=time.perf_counter() - sum(timings.values()))
        entry = self._entry(cell)
        entry.update({"status": "written", "seconds": sum(timings.values()), "dir": cell.id, "error": None,
                      "stage": None})
        self._save()
        faults.maybe_fault("driver:after_write", cell=cell.id)
        self._log_cell(cell, tracker, raise_errors=True)

    def _log_cell(self, cell: Cell, tracker, *, raise_errors: bool = False) -> None:
        """Log a written cell from its folder (or, without tracking, just mark it finished: no run
        id recorded, no logging fault point passed)."""
        entry = self._entry(cell)
        cell_dir = self.root / cell.id
        if tracker.enabled:
            try:
                entry["mlflow_run_id"] = tracker.log_cell(cell, cell_dir)
                self._log_stability(cell, cell_dir, tracker)
            except Exception as e:  # noqa: BLE001 - MLflow down, disk full: the files stand
                e.cwa_stage = "log"
                if raise_errors:
                    raise
                self._fail_cell(cell, f"logging to MLflow failed: {_one_line(e)}", tracker, stage="log")
                return
            faults.maybe_fault("driver:after_log", cell=cell.id)
        entry.update({"status": "finished", "error": None, "stage": None})
        self._save()

    def _log_stability(self, cell: Cell, cell_dir: Path, tracker) -> None:
        cfg = cell.config
        if not cfg.stability_check or not (cell_dir / schema.STABILITY).exists():
            return
        known = self.manifest.setdefault("stability_runs", {})
        skey = f"{cell.settings['model']}|{cfg.metric}|{cfg.mode}|K{cfg.topk}|seeds{','.join(map(str, cfg.seeds))}"
        if skey not in known:
            from ..plots import FIGURES  # imported already: the cell's figures were drawn

            stability = json.loads((cell_dir / schema.STABILITY).read_text())
            plot = cell_dir / schema.PLOTS_DIR / FIGURES.get("stability_analysis").file
            known[skey] = tracker.log_stability(skey, cell, stability, plot)

    def _fail_cell(self, cell: Cell, why: str, tracker, *, stage: str) -> None:
        """Record a failed cell: sweep manifest, ``<cell>/error.txt``, a failed cell manifest
        (unless its complete files stand), a FAILED MLflow run. Never raises."""
        cell_dir = self.root / cell.id
        detail = traceback.format_exc()
        try:
            atomic_write(cell_dir / schema.ERROR_FILE, why + "\n" + ("" if detail.startswith("NoneType: None") else "\n" + detail))
            if stage != "log":  # a logging failure leaves complete files: resume logs them
                write_failure(cell_dir, with_out_dir(cell, self.root).to_dict(), RuntimeError(why), time.perf_counter())
        except Exception as e:  # noqa: BLE001
            log.warning("could not write the failure of cell %s: %s", cell.id, _one_line(e))
        entry = self._entry(cell)
        entry.update({"status": "failed", "error": why, "stage": stage, "error_file": str(cell_dir / schema.ERROR_FILE)})
        if tracker.enabled:
            try:
                entry["mlflow_failed_run_id"] = tracker.log_failed_cell(cell, why, cell_dir if cell_dir.is_dir() else None)
            except Exception as e:  # noqa: BLE001
                log.warning("could not log the failure of cell %s to MLflow: %s", cell.id, _one_line(e))
        with contextlib.suppress(Exception):
            self._save()


@contextlib.contextmanager
def _sigint_clock(at: dict):
    """While the sweep runs, a Ctrl-C is timed (``at["sigint"]``), then raised as KeyboardInterrupt
    as usual. (Nothing is written from the handler: it may interrupt a write to the same stream.)"""
    def handler(signum, frame):
        at.setdefault("sigint", time.perf_counter())
        raise KeyboardInterrupt

    previous = None
    with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
        previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def _no_sigint(active: bool):
    """While stopping after a Ctrl-C, a second Ctrl-C must not cut the clean-up short."""
    previous = None
    if active:
        with contextlib.suppress(ValueError):  # not the main thread
            previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
