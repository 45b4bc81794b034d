"""Run a sweep on Ray: one actor group per model, work shared as the plan says, results
written per cell (single-experiment layout) and tracked in MLflow by the driver alone.

``sweep_manifest.json`` is rewritten (atomically) after every cell, so a killed sweep loses at
most the cells in flight; running it again skips finished cells by id.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

from tqdm.auto import tqdm

from ..evaluate import Perplexity
from ..experiment import ExperimentResult, SeedScores, stability_report
from ..outputs import write_experiment, write_json
from ..selection import offsets_of
from .plan import Plan, baseline_key, make_plan, model_key, score_key
from .spec import Cell, Sweep, with_out_dir
from .worker import ModelWorker

log = logging.getLogger(__name__)
MANIFEST = "sweep_manifest.json"


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


class _Progress:
    """One live line per model and one overall: done, running, failed, elapsed, time left."""

    def __init__(self, plan: Plan, enabled: bool) -> None:
        self.bars = {}
        self.state: dict = {}
        total = len(plan.cells)
        self.overall = tqdm(total=total, desc="sweep", position=0, disable=not enabled, unit="cell", dynamic_ncols=True)
        for i, (mk, cells) in enumerate(plan.models.items(), start=1):
            name = Path(str(cells[0].settings["model"])).name
            self.bars[mk] = tqdm(total=len(cells), desc=f"  {name}", position=i, disable=not enabled, unit="cell",
                                 dynamic_ncols=True)
            self.state[mk] = {"running": 0, "failed": 0}
        self.state["all"] = {"running": 0, "failed": 0}

    def update(self, mk: tuple, *, done: int = 0, running: int = 0, failed: int = 0) -> None:
        for key, bar in ((mk, self.bars[mk]), ("all", self.overall)):
            st = self.state[key]
            st["running"] += running
            st["failed"] += failed
            bar.update(done + failed)
            bar.set_postfix_str(f"running {st['running']}, failed {st['failed']}")

    def close(self) -> None:
        for b in [*self.bars.values(), self.overall]:
            b.close()


def _read_manifest(root: Path) -> dict:
    p = root / MANIFEST
    if p.exists():
        return json.loads(p.read_text())
    return {}


def finished_cells(root: Path, m: dict) -> set[str]:
    """Cells whose sweep manifest ``m`` says finished and whose folder holds a finished manifest."""
    done = set()
    for cid, c in m.get("cells", {}).items():
        cm = root / cid / "manifest.json"
        if c.get("status") == "finished" and cm.exists() and json.loads(cm.read_text()).get("status") == "finished":
            done.add(cid)
    return done


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

    # -- bookkeeping -----------------------------------------------------------------------
    def _save(self) -> None:
        write_json(self.root / MANIFEST, self.manifest)

    def run(self) -> dict:
        t0 = time.perf_counter()
        done = finished_cells(self.root, self.manifest)
        pending = [c for c in self.sweep.cells if c.id not in done]
        self.manifest.update({"name": self.sweep.name, "spec_hash": self.sweep.spec_hash,
                              "sweep_file": str(self.sweep.path) if self.sweep.path else None})
        for c in self.sweep.cells:
            self.manifest["cells"].setdefault(c.id, {"status": "pending", "settings": c.settings})
        if not pending:
            log.info("sweep %s: all %d cells already finished; nothing to do", self.sweep.name, len(self.sweep.cells))
            return self.manifest
        self.root.mkdir(parents=True, exist_ok=True)
        plan = make_plan(pending)
        # MLflow's start-up (import, schema) overlaps Ray's and the actors' (model loading)
        self.timings = {}
        with ThreadPoolExecutor(max_workers=1) as pool:
            tracking = pool.submit(self._start_tracking) if self.sweep.tracking.enabled else None
            t = time.perf_counter()
            ray = init_ray(self.address, self.num_cpus, dashboard=self.dashboard)
            self.timings["ray_start_s"] = time.perf_counter() - t
            groups = self._start_actors(ray, plan)
            tracker = tracking.result() if tracking else None
        self._save()
        status = "FAILED"
        try:
            self._execute(ray, plan, groups, tracker)
            status = "FINISHED" if all(self.manifest["cells"][c.id]["status"] == "finished" for c in pending) else "FAILED"
        finally:
            # where the time went: start-up (Ray, MLflow), the first result (actor start, model
            # load, tokenizing, first task), the rest; benchmarks/sweep_overhead.py reads these
            self.manifest.setdefault("runs", []).append({"started_cells": len(pending), "seconds": time.perf_counter() - t0,
                                                         "status": status, "timings_s": self.timings})
            self._save()
            if tracker:
                tracker.end_sweep(self.manifest["parent_run_id"], status, {
                    "cells_finished": sum(c["status"] == "finished" for c in self.manifest["cells"].values()),
                    "model_loads": self.manifest.get("model_loads", 0)})
        return self.manifest

    # -- execution -------------------------------------------------------------------------
    def _start_tracking(self):
        from .tracking import Tracker

        t = time.perf_counter()
        tracker = Tracker(self.tracking_uri, self.sweep.tracking.experiment or self.sweep.name)
        self.manifest["mlflow"] = {"tracking_uri": tracker.uri, "experiment": tracker.experiment}
        self.manifest["parent_run_id"] = tracker.start_sweep(self.sweep, self.manifest.get("parent_run_id"))
        self.timings["tracking_start_s"] = time.perf_counter() - t
        return tracker

    def _start_actors(self, ray, plan: Plan) -> dict:
        """One actor group per model; each actor starts loading its model at once."""
        res = self.sweep.resources
        remote_cls = ray.remote(_RayWorker)
        groups = {}
        for mk, cells in plan.models.items():
            cfg = cells[0].config
            opts = {"num_cpus": res.cpus_per_actor, "num_gpus": res.gpus_per_actor, "max_restarts": 0}
            device_map = "auto" if res.gpus_per_actor > 1 else None
            threads = max(1, int(res.cpus_per_actor)) if res.cpus_per_actor else None
            groups[mk] = [remote_cls.options(**opts).remote(cfg, threads=threads, device_map=device_map)
                          for _ in range(res.actors_per_model)]
        return groups

    def _execute(self, ray, plan: Plan, groups: dict, tracker) -> None:
        outstanding = {g: [0] * len(a) for g, a in groups.items()}

        def submit(mk, method: str, *args):
            i = min(range(len(groups[mk])), key=lambda j: outstanding[mk][j])
            outstanding[mk][i] += 1
            return getattr(groups[mk][i], method).remote(*args), (mk, i)

        pending: dict = {}  # object ref -> (what, key, actor slot)
        baselines: dict[tuple, dict] = {}
        scores: dict[tuple, dict] = {}
        evals: dict[tuple, dict] = {}  # (cell id, seed, kind) -> row
        prog = _Progress(plan, self.progress)
        cell_state = {c.id: "waiting" for c in plan.cells}
        cells = {c.id: c for c in plan.cells}
        dependents: dict[tuple, list[Cell]] = {}  # baseline or score key -> the cells that need it
        for c in plan.cells:
            for k in {baseline_key(c.config), *(score_key(c.config, s) for s in c.config.seeds)}:
                dependents.setdefault(k, []).append(c)
        for bk, cfg in plan.baselines.items():
            ref, slot = submit(model_key(cfg), "baseline", cfg)
            pending[ref] = ("baseline", bk, slot)
        for sk, task in plan.scores.items():
            cfg = replace(task.config, topk=task.k)
            ref, slot = submit(model_key(cfg), "score", cfg, task.seed, task.k, tuple(sorted(task.modes)))
            pending[ref] = ("score", sk, slot)
        for c in plan.cells:
            prog.update(model_key(c.config), running=1)

        def cell_inputs_ready(cell: Cell) -> bool:
            cfg = cell.config
            return baseline_key(cfg) in baselines and all(score_key(cfg, s) in scores for s in cfg.seeds)

        def try_finish(cell: Cell) -> None:
            cfg = cell.config
            kinds = ("top_k", *cfg.controls)
            if cell_state[cell.id] != "evaluating":
                return
            if not all((cell.id, s, k) in evals for s in cfg.seeds for k in kinds):
                return
            self._finish_cell(cell, baselines[baseline_key(cfg)], [scores[score_key(cfg, s)] for s in cfg.seeds],
                              [evals[(cell.id, s, k)] for s in cfg.seeds for k in kinds], tracker)
            cell_state[cell.id] = "finished"
            prog.update(model_key(cfg), done=1, running=-1)

        def fail_cell(cell: Cell, why: str) -> None:
            if cell_state[cell.id] in ("finished", "failed"):
                return
            cell_state[cell.id] = "failed"
            self.manifest["cells"][cell.id].update({"status": "failed", "error": why})
            prog.update(model_key(cell.config), failed=1, running=-1)

        t_start = time.perf_counter()
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                self.timings.setdefault("first_result_s", time.perf_counter() - t_start)
                ref = ready[0]
                what, key, (mk, i) = pending.pop(ref)
                outstanding[mk][i] -= 1
                try:
                    value = ray.get(ref)
                except Exception as e:  # a task or its actor failed: fail what depends on it
                    why = f"{what} task failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                    log.error("%s", why)
                    for c in ([cells[key[0]]] if what == "evaluate" else dependents.get(key, [])):
                        fail_cell(c, why)
                    self._save()
                    continue
                if what == "evaluate":
                    evals[key] = value
                    try_finish(cells[key[0]])
                    continue
                (baselines if what == "baseline" else scores)[key] = value
                for c in dependents.get(key, []):
                    if cell_state[c.id] == "waiting" and cell_inputs_ready(c):
                        cell_state[c.id] = "evaluating"
                        cfg = c.config
                        for s in cfg.seeds:
                            ss: SeedScores = scores[score_key(cfg, s)]["scores"]
                            for kind in ("top_k", *cfg.controls):
                                ref2, slot = submit(model_key(cfg), "evaluate", cfg, ss.selection(kind, cfg.mode, cfg.topk), s)
                                pending[ref2] = ("evaluate", (c.id, s, kind), slot)
        finally:
            self.timings["tasks_s"] = time.perf_counter() - t_start
            prog.close()
            infos = []
            for mk, actors in groups.items():
                for a in actors:
                    try:
                        infos.append(ray.get(a.info.remote(), timeout=60))
                    except Exception as e:  # a dead actor: count what we can
                        log.warning("actor info unavailable: %s", type(e).__name__)
                    ray.kill(a)
            self.manifest["model_loads"] = self.manifest.get("model_loads", 0) + sum(x["counts"]["model_loads"] for x in infos)
            self.manifest["scoring_passes"] = self.manifest.get("scoring_passes", 0) + sum(x["counts"]["scoring_passes"] for x in infos)
            self.manifest.setdefault("actors", []).extend(
                {"node": x.get("node"), "gpus": x.get("gpus"), "model": x["model"]["model_id"], "counts": x["counts"],
                 "load_seconds": x["load_seconds"]} for x in infos)
            self.manifest["scoring_passes_by_key"] = sorted({f"{plan.scores[k].config.metric}/seed{plan.scores[k].seed}"
                                                             for k in scores})

    def _finish_cell(self, cell: Cell, baseline: dict, scored: list[dict], rows: list[dict], tracker) -> None:
        cfg = cell.config
        base: Perplexity = baseline["ppl"]
        # the worker does not know the baseline (another actor may have computed it)
        results = [{**{k: v for k, v in r.items() if k != "seconds"}, "ppl_ratio": r["ppl"] / base.ppl} for r in rows]
        seed_scores = [s["scores"] for s in scored]
        tensors = scored[0]["tensors"]
        stability = None
        if cfg.stability_check:
            stability = stability_report(seed_scores, k=cfg.topk, mode=cfg.mode, offsets=offsets_of(math.prod(t["shape"]) for t in tensors))
        timings = {"baseline_ppl (shared)": baseline["seconds"], "score (shared)": sum(s.seconds for s in seed_scores),
                   "perturb_eval": sum(r["seconds"] for r in rows)}
        out_cfg = with_out_dir(cell, self.root)
        result = ExperimentResult(out_cfg, base, results, seed_scores, stability, baseline["data"], tensors, timings)
        cell_dir = Path(out_cfg.out_dir)
        t = time.perf_counter()
        info = baseline["model"]
        write_experiment(cell_dir, result, model_info=info, device=info["device"], dtype=info["dtype"], started=t)
        entry = self.manifest["cells"][cell.id]
        entry.update({"status": "finished", "seconds": sum(timings.values()), "dir": cell.id, "error": None})
        if tracker:
            known = self.manifest.setdefault("stability_runs", {})
            forgotten = set(tracker.forget_cell(cell.id, self.manifest["parent_run_id"]))
            if forgotten:
                log.warning("cell %s was half-logged by an interrupted run; logged again", cell.id)
                for k in [k for k, run_id in known.items() if run_id in forgotten]:
                    del known[k]  # its stability run went with the cell's runs: log it again
            entry["mlflow_run_id"] = tracker.log_cell(self.manifest["parent_run_id"], cell,
                                                      result.perturbation_report(), cell_dir)
            if stability is not None:
                skey = f"{cell.settings['model']}|{cfg.metric}|{cfg.mode}|K{cfg.topk}|seeds{','.join(map(str, cfg.seeds))}"
                if skey not in known:
                    known[skey] = tracker.log_stability(self.manifest["parent_run_id"], skey, cell, stability,
                                                        cell_dir / "plots" / "stability_analysis.png")
        self._save()


class _RayWorker(ModelWorker):
    """The thin Ray adapter: where the actor runs (for placement checks and the manifest)."""

    def info(self) -> dict:
        import ray

        out = super().info()
        ctx = ray.get_runtime_context()
        out.update({"node": ctx.get_node_id(), "gpus": [str(g) for g in ray.get_gpu_ids()]})
        return out
