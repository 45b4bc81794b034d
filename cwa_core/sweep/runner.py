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
import copy
import fcntl
import json
import logging
import math
import os
import shutil
import signal
import sys
import threading
import time
import traceback
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..evaluate import Perplexity
from ..experiment import ExperimentResult, SeedScores, stability_report
from ..outputs import atomic_write, write_experiment, write_failure, write_json
from ..selection import offsets_of
from ..superweights import RankTable, add_ranks
from . import faults
from .plan import Plan, baseline_key, make_plan, model_key, score_key, sw_key
from .spec import Cell, Sweep, with_out_dir
from .worker import ModelWorker

log = logging.getLogger(__name__)
MANIFEST = "sweep_manifest.json"
LOCK = ".sweep.lock"
MAX_INFLIGHT = 2  # tasks per actor: one running, one queued behind it (so it never idles)
WAIT_S = 1.0  # the longest the driver waits without looking at Ctrl-C


def init_ray(address: str | None, num_cpus: int | None = None, *, dashboard: bool = False):
    """Join ``address`` or start a local Ray that listens on the loopback address only.

    A local Ray starts without its dashboard unless asked (``dashboard=True``): on a small
    machine the dashboard's processes cost about a second of start-up and a few percent of
    every core for the whole sweep (measured: perturbation evaluations 10% slower with it,
    5% without; ``benchmarks/README.md``), and the sweep's own record is MLflow.
    """
    if not address:
        # On Linux this makes every Ray process (GCS, raylet, workers, dashboard) bind to
        # 127.0.0.1 instead of all interfaces. Ray reads it when first imported, so it is set
        # before the import; tests/test_sweep_ray.py checks the sockets.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        # Ray would start one idle Python worker per CPU as the driver connects; the sweep
        # starts its actors itself, and on a small machine those idle workers slow Ray's start
        # by about a second and keep polling for the whole sweep (measured in
        # benchmarks/README.md). Read by the raylet it starts; a user's own setting wins.
        os.environ.setdefault("RAY_prestart_worker_first_driver", "0")
    import ray

    if ray.is_initialized():
        return ray
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        from ray._private import ray_constants

        if os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0":
            # ray read the variable when first imported; if that was before we set it, say it again
            ray_constants.ENABLE_RAY_CLUSTER = False
        kw = {"num_cpus": num_cpus} if num_cpus else {}
        ctx = ray.init(log_to_driver=False, include_dashboard=dashboard, **kw)
        url = getattr(ctx, "dashboard_url", None)
        if url:
            log.info("Ray dashboard: http://%s", url)
    return ray


class SweepBusyError(RuntimeError):
    """Another driver is running a sweep into the same results folder."""


class SweepResourceError(RuntimeError):
    """The sweep's actors can never be placed on this Ray (one line; nothing is written)."""


def actor_demand(res) -> dict[str, float]:
    """What one actor asks Ray for."""
    return {"CPU": float(res.cpus_per_actor), "GPU": float(res.gpus_per_actor)}


def fits(need: dict[str, float], have: dict[str, float]) -> bool:
    return all(have.get(k, 0.0) >= v for k, v in need.items() if v > 0)


def _fmt_resources(r: dict) -> str:
    return ", ".join(f"{r.get(k, 0):g} {k}" for k in ("CPU", "GPU"))


@contextlib.contextmanager
def _exclusive(root: Path):
    """Hold ``root/.sweep.lock`` (released by the kernel even if the driver is SIGKILLed)."""
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SweepBusyError(f"another sweep is running into {root} (it holds {root / LOCK}); "
                                 "wait for it, or choose another --out-dir") from None
        yield
    finally:
        os.close(fd)


class _Progress:
    """One live line per model and one overall: done, running, failed, elapsed, time left."""

    def __init__(self, plan: Plan, enabled: bool) -> None:
        self.bars = {}
        self.overall = tqdm(total=len(plan.cells), desc="sweep", position=0, disable=not enabled, unit="cell",
                            dynamic_ncols=True)
        for i, (mk, cells) in enumerate(plan.models.items(), start=1):
            name = Path(str(cells[0].settings["model"])).name
            self.bars[mk] = tqdm(total=len(cells), desc=f"  {name}", position=i, disable=not enabled, unit="cell",
                                 dynamic_ncols=True)
        self.failed = {key: 0 for key in [*self.bars, "all"]}

    def waiting(self, mk: tuple, on: bool = True) -> None:
        """Show that the model waits for resources (its actor is not placed yet)."""
        bar = self.bars[mk]
        bar.set_postfix_str("waiting for resources" if on else f"running {bar.total - bar.n}, failed {self.failed[mk]}")

    def update(self, mk: tuple, *, failed: bool = False) -> None:
        for key, bar in ((mk, self.bars[mk]), ("all", self.overall)):
            self.failed[key] += failed
            bar.update(1)
            bar.set_postfix_str(f"running {bar.total - bar.n}, failed {self.failed[key]}")

    def close(self) -> None:
        for b in [*self.bars.values(), self.overall]:
            b.close()


def _read_manifest(root: Path) -> dict:
    p = root / MANIFEST
    if p.exists():
        return json.loads(p.read_text())
    return {}


def _folder_finished(root: Path, cid: str) -> bool:
    cm = root / cid / "manifest.json"
    try:
        return cm.exists() and json.loads(cm.read_text()).get("status") == "finished"
    except ValueError:
        return False


def finished_cells(root: Path, m: dict) -> set[str]:
    """Cells whose sweep manifest ``m`` says finished and whose folder holds a finished manifest."""
    return {cid for cid, c in m.get("cells", {}).items() if c.get("status") == "finished" and _folder_finished(root, cid)}


def written_cells(root: Path, m: dict) -> set[str]:
    """Cells whose folder is complete but which are not logged yet (a driver stopped between the
    two, or logging failed): they are logged from their files, not computed again."""
    return {cid for cid, c in m.get("cells", {}).items()
            if (c.get("status") == "written" or (c.get("status") == "failed" and c.get("stage") == "log"))
            and _folder_finished(root, cid)}


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:500]


@dataclass(eq=False)
class _Task:
    kind: str  # baseline | score | evaluate
    key: tuple  # baseline key, score key, or (cell id, seed, selection)
    mk: tuple  # model key: which actor group runs it
    args: tuple
    tries: int = 0
    seq: int = 0  # submission order (the oldest in flight on an actor is the one running)
    errors: list = field(default_factory=list)


@dataclass(eq=False)
class _Slot:
    """One actor of a model's group, replaced when it dies, released when its model is done.

    Tasks go only to an actor Ray has placed (loading its model, or ready): an actor still waiting
    for resources holds no work, so the work never waits behind a slot that another model's
    actors hold."""

    actor: Any
    ready_ref: Any = None  # the actor's __ray_ready__ call: returns once it is placed and loaded
    ready: bool = False
    placed: bool = False  # it has a process (loading its model): work may queue behind the load
    inflight: list = field(default_factory=list)  # [(ref, task)] in submission order
    deaths: int = 0
    alive: bool = True
    released: bool = False  # its model's cells are all done: the actor was let go
    completed: int = 0  # tasks the current actor finished (it has loaded its model)
    waiting: bool = False  # said to be waiting for resources (logged once per wait)
    last_error: str | None = None

    def renew(self, actor) -> None:
        self.actor, self.ready_ref, self.completed = actor, actor.__ray_ready__.remote(), 0
        self.ready = self.placed = self.waiting = False


def _is_actor_loss(ray, e: BaseException) -> bool:
    x = ray.exceptions
    return isinstance(e, (x.RayActorError, x.WorkerCrashedError, x.OutOfMemoryError, x.NodeDiedError,
                          x.LocalRayletDiedError, x.ActorUnschedulableError))


def _has_process(ray, actor) -> bool | None:
    """Whether Ray has given ``actor`` a process (placed it: it is loading its model, or ready);
    None where that cannot be read. From the GCS actor table (no dashboard needed): an actor
    still waiting for resources is pending creation without a pid."""
    try:
        from ray._private import state

        entry = state.actors(actor_id=actor._actor_id.hex())
        return entry.get("State") == "ALIVE" or bool(entry.get("Pid"))
    except Exception:  # noqa: BLE001 - a private API: without it, work waits for the actor to be ready
        return None


def _needs_fresh_actor(e: BaseException) -> bool:
    """A task error after which the actor's state cannot be trusted: out of (GPU) memory, or
    weights that could not be restored. The actor is replaced (and reloads its model)."""
    cause = getattr(e, "cause", None) or e
    name = type(cause).__name__
    return name in ("OutOfMemoryError", "PerturbationLeakError") or "out of memory" in str(cause).lower()


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
        self.manifest = _read_manifest(self.root) or {"name": sweep.name, "cells": {}}
        self.timings: dict[str, float] = {}
        self.interrupted = False
        self.refused = False  # the sweep can never fit this Ray: nothing is recorded
        self.abandon_tracking = False  # start-up failed or was stopped: MLflow is not to be started
        self.timings_at: dict[str, float] = {}  # perf_counter() of events: "sigint"

    # -- bookkeeping -----------------------------------------------------------------------
    def _save(self) -> None:
        write_json(self.root / MANIFEST, self.manifest)

    def _entry(self, cell: Cell) -> dict:
        return self.manifest["cells"][cell.id]

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
        done = finished_cells(self.root, self.manifest)
        to_log = written_cells(self.root, self.manifest)
        compute = [c for c in self.sweep.cells if c.id not in done and c.id not in to_log]
        logging_only = [c for c in self.sweep.cells if c.id in to_log]
        self.manifest.update({"name": self.sweep.name, "spec_hash": self.sweep.spec_hash,
                              "sweep_file": str(self.sweep.path) if self.sweep.path else None})
        for c in self.sweep.cells:
            self.manifest["cells"].setdefault(c.id, {"status": "pending", "settings": c.settings})
        if not compute and not logging_only:
            log.info("sweep %s: all %d cells already finished; nothing to do", self.sweep.name, len(self.sweep.cells))
            return self.manifest
        plan = make_plan(compute)
        self.timings = {}
        tracker, ray, owns_ray, groups = None, None, False, {}
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
                tracker = tracking.result() if tracking else None
            finally:
                pool.shutdown(wait=False)
            self._save()
            if tracker is not None:
                self._close_leftovers(tracker)
            for cell in logging_only:
                self._log_cell(cell, tracker)
            if compute:
                self._execute(ray, plan, groups, tracker)
            if self.sweep.report:
                self._report(tracker)
            pending_ids = {c.id for c in compute + logging_only}
            status = "FINISHED" if all(self.manifest["cells"][cid]["status"] == "finished" for cid in pending_ids) else "FAILED"
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
        self.manifest.setdefault("runs", []).append({"started_cells": started, "seconds": time.perf_counter() - t0,
                                                     "status": status, "timings_s": self.timings})
        with contextlib.suppress(Exception):
            self._save()
        t = time.perf_counter()
        if tracker is not None and tracker.sweep_run_id is not None:
            try:
                if self.interrupted:
                    tracker.kill_open()
                tracker.end_sweep(status, {
                    "cells_finished": sum(c["status"] == "finished" for c in self.manifest["cells"].values()),
                    "cells_failed": sum(c["status"] == "failed" for c in self.manifest["cells"].values()),
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
    def _start_tracking(self, go: threading.Event):
        t = time.perf_counter()
        from .tracking import Tracker  # importing MLflow: the slow part, overlapped

        go.wait()
        if self.abandon_tracking:  # refused, or stopped (Ctrl-C) while starting
            return None
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
        retries = self.sweep.retries
        queues: dict[tuple, deque[_Task]] = {mk: deque() for mk in groups}
        configs = {mk: cells[0].config for mk, cells in plan.models.items()}
        cells = {c.id: c for c in plan.cells}
        baselines: dict[tuple, dict] = {}
        studies: dict[tuple, dict] = {}  # super-weight studies
        scores: dict[tuple, dict] = {}
        evals: dict[tuple, dict] = {}  # (cell id, seed, kind) -> row
        blocked: dict[tuple, list[_Task]] = {}  # study key -> the scoring passes that rank its weights
        state = {c.id: "waiting" for c in plan.cells}
        dependents: dict[tuple, list[Cell]] = {}  # baseline or score key -> the cells that need it
        for c in plan.cells:
            for k in {baseline_key(c.config), sw_key(c.config), *(score_key(c.config, s) for s in c.config.seeds)}:
                if k is not None:
                    dependents.setdefault(k, []).append(c)
        for bk, cfg in plan.baselines.items():
            queues[model_key(cfg)].append(_Task("baseline", bk, model_key(cfg), (cfg,)))
        for key, cfg in plan.studies.items():
            queues[model_key(cfg)].append(_Task("superweights", key, model_key(cfg), (cfg,)))
        for sk, task in plan.scores.items():
            cfg = replace(task.config, topk=task.k)
            t = _Task("score", sk, model_key(cfg), (cfg, task.seed, task.k, tuple(sorted(task.modes))))
            if task.sw_key is None:
                queues[model_key(cfg)].append(t)
            else:  # it ranks the study's candidates: submitted when they are known
                blocked.setdefault(task.sw_key, []).append(t)
        prog = _Progress(plan, self.progress)
        counts = {"baselines": 0, "super_weight_studies": 0, "scoring_passes": 0, "evaluations": 0}
        seq = [0]
        released_infos: list[dict] = []  # what released actors said of themselves (for the manifest)

        def fail_cell(cell: Cell, why: str, *, stage: str = "compute") -> None:
            if state[cell.id] in ("finished", "failed"):
                return
            state[cell.id] = "failed"
            self._fail_cell(cell, why, tracker, stage=stage)
            prog.update(model_key(cell.config), failed=True)

        def give_up(task: _Task, why: str) -> None:
            what = {"baseline": "baseline", "superweights": "super-weight study", "score": f"scoring (seed {task.key[-1][1]})",
                    "evaluate": f"evaluation (seed {task.key[1]}, {task.key[2]})"}[task.kind]
            msg = f"{what} failed {task.tries} time(s): {why}"
            log.error("%s", msg)
            for c in ([cells[task.key[0]]] if task.kind == "evaluate" else dependents.get(task.key, [])):
                fail_cell(c, msg)

        def charge(task: _Task, why: str) -> None:
            """One try used: run it again (first in its queue) or give up."""
            task.tries += 1
            task.errors.append(why)
            if task.tries >= retries.task_tries:
                give_up(task, why)
            else:
                log.warning("%s task failed (try %d of %d), running it again: %s", task.kind, task.tries,
                            retries.task_tries, why)
                queues[task.mk].appendleft(task)

        def replace_actor(mk: tuple, slot: _Slot, culprit: _Task | None, why: str) -> None:
            """The slot's actor is gone (or not to be trusted): charge the task it was running (none
            if it died starting), requeue the others free, start a new actor if the budget allows."""
            others = [t for _, t in slot.inflight if t is not culprit]
            slot.inflight = []
            slot.last_error = why
            for t in sorted(others, key=lambda t: t.seq, reverse=True):
                queues[mk].appendleft(t)
            if culprit is not None:
                charge(culprit, why)
            with contextlib.suppress(Exception):
                ray.kill(slot.actor)
            slot.deaths += 1
            if slot.deaths > retries.actor_restarts:
                slot.alive = False
                log.error("an actor of %s died %d times; giving it up", configs[mk].model, slot.deaths)
                return
            log.warning("an actor of %s died or was reset (%s); starting a new one (%d of %d)", configs[mk].model,
                        why, slot.deaths, retries.actor_restarts)
            self.manifest["actor_replacements"] = self.manifest.get("actor_replacements", 0) + 1
            slot.renew(self._new_actor(ray, configs[mk]))

        def model_done(mk: tuple) -> bool:
            return (all(state[c.id] in ("finished", "failed") for c in plan.models[mk])
                    and not any(s.inflight for s in groups[mk]))

        def release(mk: tuple) -> None:
            """Every cell of the model is done: let its actors go, so that the resources they hold
            (a GPU) go to the models still waiting."""
            queues[mk].clear()
            for slot in groups[mk]:
                if not slot.alive:
                    continue
                if slot.ready:
                    try:
                        released_infos.append(ray.get(slot.actor.info.remote(), timeout=10))
                    except Exception as e:  # noqa: BLE001 - count what we can
                        log.warning("actor info unavailable: %s", type(e).__name__)
                with contextlib.suppress(Exception):
                    ray.kill(slot.actor)
                slot.alive, slot.released = False, True
            if any(s.released for s in groups[mk]) and len(groups) > 1:
                log.info("%s: all %d cell(s) done; its actor(s) released", configs[mk].model, len(plan.models[mk]))

        def note_waiting() -> None:
            """Say (once per wait) which models wait for resources another model's actors hold."""
            need = actor_demand(self.sweep.resources)
            free = ray.available_resources()
            if fits(need, free):
                return  # being placed, not waiting
            for mk, slots in groups.items():
                if any(s.placed or s.ready for s in slots) or not any(
                        s.placed or s.ready for k, ss in groups.items() if k != mk for s in ss):
                    continue  # it is working, or nobody is yet (all still starting)
                pending = [s for s in slots if s.alive and not s.waiting]
                for s in pending:
                    s.waiting = True
                if pending:
                    log.warning("%s: waiting for resources: its actor needs %s, %s free now; it starts when "
                                "another model's actors are released", configs[mk].model, _fmt_resources(need),
                                _fmt_resources(free))
                    prog.waiting(mk)

        def placed(mk: tuple, slot: _Slot) -> None:
            if not slot.placed and slot.waiting:
                log.info("%s: an actor started (resources freed)", configs[mk].model)
                prog.waiting(mk, False)
            slot.placed = True

        def submit_ready() -> None:
            for mk, slots in groups.items():
                q = queues[mk]
                if not any(s.alive for s in slots):
                    last = next((s.last_error for s in slots if s.last_error), None)
                    while q:  # no actor left for this model: its work cannot be done
                        t = q.popleft()
                        t.tries = max(t.tries, 1)
                        give_up(t, f"every actor of {configs[mk].model} died "
                                   f"({'; '.join(t.errors[-1:]) or last or 'no error'})")
                    continue
                for s in slots:
                    if s.alive and not s.ready and not s.placed and q and _has_process(ray, s.actor):
                        placed(mk, s)
                live = [s for s in slots if s.alive and (s.ready or s.placed)]
                while q and live:
                    slot = min(live, key=lambda s: len(s.inflight))
                    if len(slot.inflight) >= MAX_INFLIGHT:
                        break
                    t = q.popleft()
                    if t.kind == "evaluate" and state[t.key[0]] == "failed":
                        continue  # its cell failed already: the work would be thrown away
                    seq[0] += 1
                    t.seq = seq[0]
                    slot.inflight.append((getattr(slot.actor, t.kind).remote(*t.args), t))

        def inputs_ready(cell: Cell) -> bool:
            cfg = cell.config
            return (baseline_key(cfg) in baselines and all(score_key(cfg, s) in scores for s in cfg.seeds)
                    and (sw_key(cfg) is None or sw_key(cfg) in studies))

        def on_result(task: _Task, value: Any) -> None:
            if task.kind == "evaluate":
                counts["evaluations"] += 1
                evals[task.key] = value
                cell = cells[task.key[0]]
                cfg = cell.config
                if state[cell.id] == "evaluating" and all((cell.id, s, k) in evals for s in cfg.seeds
                                                          for k in ("top_k", *cfg.controls)):
                    try:
                        self._finish_cell(cell, baselines[baseline_key(cfg)], [scores[score_key(cfg, s)] for s in cfg.seeds],
                                          [evals[(cell.id, s, k)] for s in cfg.seeds for k in ("top_k", *cfg.controls)],
                                          tracker, studies.get(sw_key(cfg)))
                    except Exception as e:  # noqa: BLE001 - the cell's failure is the cell's alone
                        fail_cell(cell, f"finishing the cell failed: {_one_line(e)}",
                                  stage=getattr(e, "cwa_stage", "write"))
                        log.debug("%s", traceback.format_exc())
                        return
                    state[cell.id] = "finished"
                    prog.update(model_key(cfg))
                return
            counts[{"baseline": "baselines", "superweights": "super_weight_studies", "score": "scoring_passes"}[task.kind]] += 1
            {"baseline": baselines, "superweights": studies, "score": scores}[task.kind][task.key] = value
            if task.kind == "superweights":
                for t in blocked.pop(task.key, []):
                    t.args = (*t.args, tuple(value["track"]))
                    queues[t.mk].append(t)
            for c in dependents.get(task.key, []):
                if state[c.id] == "waiting" and inputs_ready(c):
                    state[c.id] = "evaluating"
                    cfg = c.config
                    for s in cfg.seeds:
                        ss: SeedScores = scores[score_key(cfg, s)]["scores"]
                        for kind in ("top_k", *cfg.controls):
                            queues[task.mk].append(_Task("evaluate", (c.id, s, kind), task.mk,
                                                         (cfg, ss.selection(kind, cfg.mode, cfg.topk), s)))

        t_start = time.perf_counter()
        interrupted = False
        next_look = 0.0  # when to look again for actors waiting on resources
        try:
            while True:
                for mk in groups:
                    if any(s.alive for s in groups[mk]) and model_done(mk):
                        release(mk)
                submit_ready()
                inflight = {ref: (mk, slot, t) for mk, slots in groups.items() for slot in slots
                            for ref, t in slot.inflight}
                starting = {slot.ready_ref: (mk, slot) for mk, slots in groups.items() for slot in slots
                            if slot.alive and not slot.ready and queues[mk]}
                if not inflight and not starting:
                    break
                if starting and time.monotonic() >= next_look:
                    note_waiting()
                    next_look = time.monotonic() + 5.0
                ready, _ = ray.wait([*inflight, *starting], num_returns=1, timeout=WAIT_S)
                for ref in ready:
                    if ref in starting:
                        mk, slot = starting[ref]
                        try:
                            ray.get(ref)
                        except Exception as e:  # noqa: BLE001 - it died starting (loading its model, say)
                            replace_actor(mk, slot, None, f"actor lost while starting: {_one_line(e)}")
                            self._save()
                            continue
                        slot.ready = True
                        placed(mk, slot)
                        continue
                    mk, slot, task = inflight[ref]
                    if (ref, task) not in slot.inflight:
                        continue  # abandoned with a dead actor
                    self.timings.setdefault("first_result_s", time.perf_counter() - t_start)
                    try:
                        value = ray.get(ref)
                    except Exception as e:  # noqa: BLE001 - sorted below
                        if _is_actor_loss(ray, e):
                            culprit = min((t for _, t in slot.inflight), key=lambda t: t.seq)
                            replace_actor(mk, slot, culprit, f"actor lost: {_one_line(e)}")
                        elif _needs_fresh_actor(e):
                            replace_actor(mk, slot, task, _one_line(getattr(e, "cause", None) or e))
                        else:
                            slot.inflight.remove((ref, task))
                            charge(task, _one_line(getattr(e, "cause", None) or e))
                        self._save()
                        continue
                    slot.inflight.remove((ref, task))
                    slot.completed += 1
                    slot.ready = True  # it answered: loaded
                    on_result(task, value)
        except KeyboardInterrupt:
            interrupted = True
            raise
        finally:
            self.timings["tasks_s"] = time.perf_counter() - t_start
            prog.close()
            infos = released_infos
            for slots in groups.values():
                for slot in slots:
                    # busy actors would answer late: a Ctrl-C skips it; one never started has nothing to say
                    if slot.alive and slot.ready and not interrupted:
                        try:
                            infos.append(ray.get(slot.actor.info.remote(), timeout=10))
                        except Exception as e:  # noqa: BLE001 - a dead actor: count what we can
                            log.warning("actor info unavailable: %s", type(e).__name__)
            # an actor replaced after finishing work had loaded its model too
            self.manifest["model_loads"] = self.manifest.get("model_loads", 0) + len(infos) + sum(
                s.deaths for slots in groups.values() for s in slots)
            for what in ("scoring_passes", "super_weight_studies", "evaluations"):
                self.manifest[what] = self.manifest.get(what, 0) + counts[what]
            self.manifest.setdefault("actors", []).extend(
                {"node": x.get("node"), "gpus": x.get("gpus"), "model": x["model"]["model_id"], "counts": x["counts"],
                 "load_seconds": x["load_seconds"], "rss_bytes": x.get("rss_bytes"),
                 "cuda_allocated_bytes": x.get("cuda_allocated_bytes")} for x in infos)
            self.manifest["scoring_passes_by_key"] = sorted({f"{plan.scores[k].config.metric}/seed{plan.scores[k].seed}"
                                                             for k in scores})
            for cid, st in state.items():  # cells still in flight when stopped stay pending
                if st in ("waiting", "evaluating") and self.manifest["cells"][cid]["status"] not in ("finished", "failed"):
                    self.manifest["cells"][cid]["status"] = "pending"

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

            result = analyze([self.root], output=out / "statistical_analysis.json")
            write_report(result, out / "research_summary.pdf", figures_dir=out / "figures")
            self.manifest["report"] = {"dir": "analysis", "json": "analysis/statistical_analysis.json",
                                       "pdf": "analysis/research_summary.pdf", "error": None}
            if tracker is not None:
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
                     study: dict | None = None) -> None:
        """Write the cell's files (then say so), then log them to MLflow (then say so)."""
        cfg = cell.config
        base: Perplexity = baseline["ppl"]
        # the worker does not know the baseline (another actor may have computed it)
        results = [{**{k: v for k, v in r.items() if k != "seconds"}, "ppl_ratio": r["ppl"] / base.ppl} for r in rows]
        seed_scores = [s["scores"] for s in scored]
        tensors = scored[0]["tensors"]
        stability = None
        if cfg.stability_check:
            stability = stability_report(seed_scores, k=cfg.topk, mode=cfg.mode,
                                         offsets=offsets_of(math.prod(t["shape"]) for t in tensors))
        timings = {"baseline_ppl (shared)": baseline["seconds"], "score (shared)": sum(s.seconds for s in seed_scores),
                   "perturb_eval": sum(r["seconds"] for r in rows)}
        sw = None
        if study is not None:  # the shared study, with the ranks under this cell's metric and seeds
            timings["super_weights (shared)"] = study["seconds"]
            sw = add_ranks(copy.deepcopy(study["report"]),
                           {cfg.metric: {ss.seed: RankTable(ss.ranks or []) for ss in seed_scores}})
        out_cfg = with_out_dir(cell, self.root)
        result = ExperimentResult(out_cfg, base, results, seed_scores, stability, baseline["data"], tensors, timings, sw)
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
        """Log a written cell from its folder (or, without tracking, just mark it finished)."""
        entry = self._entry(cell)
        cell_dir = self.root / cell.id
        if tracker is not None:
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
        if not cfg.stability_check or not (cell_dir / "stability.json").exists():
            return
        known = self.manifest.setdefault("stability_runs", {})
        skey = f"{cell.settings['model']}|{cfg.metric}|{cfg.mode}|K{cfg.topk}|seeds{','.join(map(str, cfg.seeds))}"
        if skey not in known:
            stability = json.loads((cell_dir / "stability.json").read_text())
            known[skey] = tracker.log_stability(skey, cell, stability, cell_dir / "plots" / "stability_analysis.png")

    def _fail_cell(self, cell: Cell, why: str, tracker, *, stage: str) -> None:
        """Record a failed cell: sweep manifest, ``<cell>/error.txt``, a failed cell manifest
        (unless its complete files stand), a FAILED MLflow run. Never raises."""
        cell_dir = self.root / cell.id
        detail = traceback.format_exc()
        try:
            atomic_write(cell_dir / "error.txt", why + "\n" + ("" if detail.startswith("NoneType: None") else "\n" + detail))
            if stage != "log":  # a logging failure leaves complete files: resume logs them
                write_failure(cell_dir, with_out_dir(cell, self.root).to_dict(), RuntimeError(why), time.perf_counter())
        except Exception as e:  # noqa: BLE001
            log.warning("could not write the failure of cell %s: %s", cell.id, _one_line(e))
        entry = self._entry(cell)
        entry.update({"status": "failed", "error": why, "stage": stage, "error_file": str(cell_dir / "error.txt")})
        if tracker is not None:
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


class _RayWorker(ModelWorker):
    """The thin Ray adapter: where the actor runs (for placement checks and the manifest)."""

    def info(self) -> dict:
        import ray

        out = super().info()
        ctx = ray.get_runtime_context()
        out.update({"node": ctx.get_node_id(), "gpus": [str(g) for g in ray.get_gpu_ids()]})
        return out
