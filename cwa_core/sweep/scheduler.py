"""The sweep's main loop: tasks go to the actors of their model as Ray places them, results
come back, retries and actor replacements follow the sweep's ``retries``, and each cell is
finished by the runner once its inputs are all in (:func:`execute`)."""
from __future__ import annotations

import contextlib
import logging
import time
import traceback
from collections import deque
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from ..experiment import SeedScores
from .plan import Plan, baseline_key, model_key, score_key, sw_key
from .progress import _Progress
from .slots import (MAX_INFLIGHT, _fmt_resources, _has_process, _is_actor_loss, _needs_fresh_actor, _one_line,
                    _Slot, _Task, actor_demand, fits)
from .spec import Cell

if TYPE_CHECKING:
    from .runner import SweepRunner

# the sweep's log lines keep the runner's name wherever the code lives (logs and tests filter on it)
log = logging.getLogger("cwa_core.sweep.runner")
WAIT_S = 1.0  # the longest the driver waits without looking at Ctrl-C


def execute(runner: SweepRunner, ray, plan: Plan, groups: dict[tuple, list[_Slot]], tracker) -> None:
    """Run the plan's tasks on the actor ``groups`` until every cell is finished or failed."""
    retries = runner.sweep.retries
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
    prog = _Progress(plan, runner.progress)
    counts = {"baselines": 0, "super_weight_studies": 0, "scoring_passes": 0, "evaluations": 0}
    seq = [0]
    released_infos: list[dict] = []  # what released actors said of themselves (for the manifest)

    def fail_cell(cell: Cell, why: str, *, stage: str = "compute") -> None:
        if state[cell.id] in ("finished", "failed"):
            return
        state[cell.id] = "failed"
        runner._fail_cell(cell, why, tracker, stage=stage)
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
        runner.manifest["actor_replacements"] = runner.manifest.get("actor_replacements", 0) + 1
        slot.renew(runner._new_actor(ray, configs[mk]))

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
        need = actor_demand(runner.sweep.resources)
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
                    runner._finish_cell(cell, baselines[baseline_key(cfg)], [scores[score_key(cfg, s)] for s in cfg.seeds],
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
                        runner._save()
                        continue
                    slot.ready = True
                    placed(mk, slot)
                    continue
                mk, slot, task = inflight[ref]
                if (ref, task) not in slot.inflight:
                    continue  # abandoned with a dead actor
                runner.timings.setdefault("first_result_s", time.perf_counter() - t_start)
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
                    runner._save()
                    continue
                slot.inflight.remove((ref, task))
                slot.completed += 1
                slot.ready = True  # it answered: loaded
                on_result(task, value)
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        runner.timings["tasks_s"] = time.perf_counter() - t_start
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
        runner.manifest["model_loads"] = runner.manifest.get("model_loads", 0) + len(infos) + sum(
            s.deaths for slots in groups.values() for s in slots)
        for what in ("scoring_passes", "super_weight_studies", "evaluations"):
            runner.manifest[what] = runner.manifest.get(what, 0) + counts[what]
        runner.manifest.setdefault("actors", []).extend(
            {"node": x.get("node"), "gpus": x.get("gpus"), "model": x["model"]["model_id"], "counts": x["counts"],
             "load_seconds": x["load_seconds"], "rss_bytes": x.get("rss_bytes"),
             "cuda_allocated_bytes": x.get("cuda_allocated_bytes")} for x in infos)
        runner.manifest["scoring_passes_by_key"] = sorted({f"{plan.scores[k].config.metric}/seed{plan.scores[k].seed}"
                                                         for k in scores})
        for cid, st in state.items():  # cells still in flight when stopped stay pending
            if st in ("waiting", "evaluating") and runner.manifest["cells"][cid]["status"] not in ("finished", "failed"):
                runner.manifest["cells"][cid]["status"] = "pending"
