"""The sweep's main loop, the thin Ray adapter over :class:`~.taskgraph.TaskGraph`: ready tasks
go to the actors of their model as Ray places them, results come back to the graph, failures
are charged or replace the actor as the sweep's ``retries`` say, a cell is finished by the
runner once its inputs are all in, and a model's actors are released when it has nothing left
(:func:`execute`)."""
from __future__ import annotations

import contextlib
import logging
import time
import traceback
from typing import TYPE_CHECKING

from ..cell import protection
from .plan import CellInputs, Plan, Task, model_key
from .progress import _Progress
from .slots import (MAX_INFLIGHT, _fmt_resources, _has_process, _is_actor_loss, _needs_fresh_actor, _one_line,
                    _Slot, actor_demand, fits)
from .spec import Cell
from .taskgraph import TaskGraph

if TYPE_CHECKING:
    from .runner import SweepRunner

# the sweep's log lines keep the runner's name wherever the code lives (logs and tests filter on it)
log = logging.getLogger("cwa_core.sweep.runner")
WAIT_S = 1.0  # the longest the driver waits without looking at Ctrl-C
COUNTED = {"baseline": "baselines", "superweights": "super_weight_studies", "score": "scoring_passes",
           "evaluate": "evaluations", "trial": "trials"}


def execute(runner: SweepRunner, ray, plan: Plan, groups: dict[tuple, list[_Slot]], tracker) -> None:
    """Run the plan's tasks on the actor ``groups`` until every cell is finished or failed."""
    _Scheduler(runner, ray, plan, groups, tracker).run()


def _what(task: Task) -> str:
    if task.kind == "score":
        return f"scoring (seed {task.key[-1][1]})"
    if task.kind == "evaluate":
        return f"evaluation (seed {task.key[1]}, {task.key[2]})"
    if task.kind == "trial":
        return f"campaign trial (seed {task.key[1]}, level {task.key[2]:g}, trial {task.key[3]})"
    return {"baseline": "baseline", "superweights": "super-weight study"}[task.kind]


class _Scheduler:
    """One execution of a plan: the graph, the actors, the progress bars, the counts."""

    def __init__(self, runner: SweepRunner, ray, plan: Plan, groups: dict[tuple, list[_Slot]], tracker) -> None:
        self.runner, self.ray, self.plan, self.groups, self.tracker = runner, ray, plan, groups, tracker
        self.retries = runner.sweep.retries
        self.graph = TaskGraph(plan.tasks, self.retries.task_tries)
        self.configs = {mk: cells[0].config for mk, cells in plan.models.items()}
        self.prog = _Progress(plan, runner.progress)
        self.counts = dict.fromkeys(COUNTED.values(), 0)
        self.args: dict[str, tuple] = {}  # an actor task's arguments, built when first handed out
        self.released_infos: list[dict] = []  # what released actors said of themselves (for the manifest)

    # -- the loop ------------------------------------------------------------------------------
    def run(self) -> None:
        t_start = time.perf_counter()
        interrupted = False
        try:
            self._loop(t_start)
        except KeyboardInterrupt:
            interrupted = True
            raise
        finally:
            self.runner.timings["tasks_s"] = time.perf_counter() - t_start
            self.prog.close()
            self._record(interrupted)

    def _loop(self, t_start: float) -> None:
        next_look = 0.0  # when to look again for actors waiting on resources
        while True:
            for mk in self.groups:
                if any(s.alive for s in self.groups[mk]) and self.graph.model_finished(mk):
                    self._release(mk)
            self._submit_ready()
            inflight = {ref: (mk, slot, t) for mk, slots in self.groups.items() for slot in slots
                        for ref, t in slot.inflight}
            starting = {slot.ready_ref: (mk, slot) for mk, slots in self.groups.items() for slot in slots
                        if slot.alive and not slot.ready and self.graph.has_ready(mk)}
            if not inflight and not starting:
                break
            if starting and time.monotonic() >= next_look:
                self._note_waiting()
                next_look = time.monotonic() + 5.0
            ready, _ = self.ray.wait([*inflight, *starting], num_returns=1, timeout=WAIT_S)
            for ref in ready:
                if ref in starting:
                    self._on_started(ref, *starting[ref])
                else:
                    self._on_returned(ref, *inflight[ref], t_start)

    def _on_started(self, ref, mk: tuple, slot: _Slot) -> None:
        try:
            self.ray.get(ref)
        except Exception as e:  # noqa: BLE001 - it died starting (loading its model, say)
            self._replace_actor(mk, slot, None, f"actor lost while starting: {_one_line(e)}")
            self.runner._save()
            return
        slot.ready = True
        self._placed(mk, slot)

    def _on_returned(self, ref, mk: tuple, slot: _Slot, task: Task, t_start: float) -> None:
        if (ref, task) not in slot.inflight:
            return  # abandoned with a dead actor
        self.runner.timings.setdefault("first_result_s", time.perf_counter() - t_start)
        try:
            value = self.ray.get(ref)
        except Exception as e:  # noqa: BLE001 - sorted below
            if _is_actor_loss(self.ray, e):
                self._replace_actor(mk, slot, slot.inflight[0][1], f"actor lost: {_one_line(e)}")
            elif _needs_fresh_actor(e):
                self._replace_actor(mk, slot, task, _one_line(getattr(e, "cause", None) or e))
            else:
                slot.inflight.remove((ref, task))
                self._charge(task, _one_line(getattr(e, "cause", None) or e))
            self.runner._save()
            return
        slot.inflight.remove((ref, task))
        slot.completed += 1
        slot.ready = True  # it answered: loaded
        self.counts[COUNTED[task.kind]] += 1
        self.graph.done(task.id, value)
        while (fin := self.graph.take_driver()) is not None:
            self._finish(fin)

    # -- handing out ---------------------------------------------------------------------------
    def _submit_ready(self) -> None:
        for mk, slots in self.groups.items():
            if not any(s.alive for s in slots):
                last = next((s.last_error for s in slots if s.last_error), None)
                for t in self.graph.take_all(mk):  # no actor left for this model: its work cannot be done
                    self.graph.tries[t.id] = max(self.graph.tries[t.id], 1)
                    self._give_up(t, f"every actor of {self.configs[mk].model} died "
                                     f"({'; '.join(self.graph.errors[t.id][-1:]) or last or 'no error'})")
                continue
            for s in slots:
                if s.alive and not s.ready and not s.placed and self.graph.has_ready(mk) and _has_process(self.ray, s.actor):
                    self._placed(mk, s)
            live = [s for s in slots if s.alive and (s.ready or s.placed)]
            while live and self.graph.has_ready(mk):
                slot = min(live, key=lambda s: len(s.inflight))
                if len(slot.inflight) >= MAX_INFLIGHT:
                    break
                t = self.graph.take(mk)
                if t is None:
                    break  # only tasks of failed cells were left: dropped
                slot.inflight.append((getattr(slot.actor, t.kind).remote(*self._args(t)), t))

    def _args(self, t: Task) -> tuple:
        """What the actor's method gets: the plan's arguments, with what the task's inputs gave."""
        if t.id not in self.args:
            args = t.args
            if t.kind == "score" and t.deps:  # it ranks the study's super-weight candidates
                args = (*args, tuple(self.graph.results[t.deps[0]]["track"]))
            elif t.kind == "superweights":  # the causal test's reference: the baseline measured already
                args = (*args, self.graph.results[t.deps[0]]["ppl"])
            elif t.kind == "evaluate":
                cfg, seed, kind, score = args
                args = (cfg, self.graph.results[score]["scores"].selection(kind, cfg.mode, cfg.topk), seed)
            elif t.kind == "trial":  # the seed's protected sets: its selections, the study's candidates
                cfg, seed, level, trial, score, study = args
                res = self.graph.results
                args = (cfg, seed, level, trial, *protection(cfg, res[score], res[study] if study else None))
            self.args[t.id] = args
        return self.args[t.id]

    # -- failures ------------------------------------------------------------------------------
    def _charge(self, task: Task, why: str) -> None:
        """One try used: run it again (first in its queue) or give up."""
        if self.graph.charge(task.id, why):
            log.warning("%s task failed (try %d of %d), running it again: %s", task.kind, self.graph.tries[task.id],
                        self.retries.task_tries, why)
        else:
            self._give_up(task, why)

    def _give_up(self, task: Task, why: str) -> None:
        msg = f"{_what(task)} failed {self.graph.tries[task.id]} time(s): {why}"
        log.error("%s", msg)
        for t in self.graph.give_up(task.id):
            if t.kind == "finish":
                self._fail_cell(t.args.cell, msg)

    def _fail_cell(self, cell: Cell, why: str, *, stage: str = "compute") -> None:
        self.runner._fail_cell(cell, why, self.tracker, stage=stage)
        self.prog.update(model_key(cell.config), failed=True)

    def _replace_actor(self, mk: tuple, slot: _Slot, culprit: Task | None, why: str) -> None:
        """The slot's actor is gone (or not to be trusted): charge the task it was running (none
        if it died starting), requeue the others free, start a new actor if the budget allows."""
        others = [t for _, t in slot.inflight if t is not culprit]
        slot.inflight = []
        slot.last_error = why
        self.graph.requeue(t.id for t in others)
        if culprit is not None:
            self._charge(culprit, why)
        with contextlib.suppress(Exception):
            self.ray.kill(slot.actor)
        slot.deaths += 1
        model = self.configs[mk].model
        if slot.deaths > self.retries.actor_restarts:
            slot.alive = False
            log.error("an actor of %s died %d times; giving it up", model, slot.deaths)
            return
        log.warning("an actor of %s died or was reset (%s); starting a new one (%d of %d)", model, why, slot.deaths,
                    self.retries.actor_restarts)
        self.runner.manifest.count("actor_replacements")
        slot.renew(self.runner._new_actor(self.ray, self.configs[mk]))

    # -- a cell's finish (on the driver) -------------------------------------------------------
    def _finish(self, task: Task) -> None:
        inputs: CellInputs = task.args
        cell, res = inputs.cell, self.graph.results
        try:
            self.runner._finish_cell(cell, res[inputs.baseline], [res[s] for s in inputs.scores],
                                     [res[e] for e in inputs.evaluations], self.tracker,
                                     res[inputs.study] if inputs.study else None, [res[t] for t in inputs.trials])
        except Exception as e:  # noqa: BLE001 - the cell's failure is the cell's alone
            self.graph.give_up(task.id)
            self._fail_cell(cell, f"finishing the cell failed: {_one_line(e)}", stage=getattr(e, "cwa_stage", "write"))
            log.debug("%s", traceback.format_exc())
            return
        self.graph.done(task.id, None)
        self.prog.update(task.model_key)

    # -- actors and resources ------------------------------------------------------------------
    def _release(self, mk: tuple) -> None:
        """The model has nothing left: let its actors go, so that the resources they hold (a GPU)
        go to the models still waiting."""
        self.graph.drop(mk)
        for slot in self.groups[mk]:
            if not slot.alive:
                continue
            if slot.ready:
                info = self._info(slot)
                if info is not None:
                    self.released_infos.append(info)
            with contextlib.suppress(Exception):
                self.ray.kill(slot.actor)
            slot.alive, slot.released = False, True
        if any(s.released for s in self.groups[mk]) and len(self.groups) > 1:
            log.info("%s: all %d cell(s) done; its actor(s) released", self.configs[mk].model,
                     len(self.plan.models[mk]))

    def _info(self, slot: _Slot) -> dict | None:
        try:
            return self.ray.get(slot.actor.info.remote(), timeout=10)
        except Exception as e:  # noqa: BLE001 - a dead actor: count what we can
            log.warning("actor info unavailable: %s", type(e).__name__)
            return None

    def _note_waiting(self) -> None:
        """Say (once per wait) which models wait for resources another model's actors hold."""
        need = actor_demand(self.runner.sweep.resources)
        free = self.ray.available_resources()
        if fits(need, free):
            return  # being placed, not waiting
        for mk, slots in self.groups.items():
            if any(s.placed or s.ready for s in slots) or not any(
                    s.placed or s.ready for k, ss in self.groups.items() if k != mk for s in ss):
                continue  # it is working, or nobody is yet (all still starting)
            pending = [s for s in slots if s.alive and not s.waiting]
            for s in pending:
                s.waiting = True
            if pending:
                log.warning("%s: waiting for resources: its actor needs %s, %s free now; it starts when "
                            "another model's actors are released", self.configs[mk].model, _fmt_resources(need),
                            _fmt_resources(free))
                self.prog.waiting(mk)

    def _placed(self, mk: tuple, slot: _Slot) -> None:
        if not slot.placed and slot.waiting:
            log.info("%s: an actor started (resources freed)", self.configs[mk].model)
            self.prog.waiting(mk, False)
        slot.placed = True

    # -- the record ----------------------------------------------------------------------------
    def _record(self, interrupted: bool) -> None:
        """What the run did, into the sweep manifest (also after a Ctrl-C)."""
        infos = self.released_infos
        for slots in self.groups.values():
            for slot in slots:
                # busy actors would answer late: a Ctrl-C skips it; one never started has nothing to say
                if slot.alive and slot.ready and not interrupted:
                    info = self._info(slot)
                    if info is not None:
                        infos.append(info)
        m = self.runner.manifest
        # an actor replaced after finishing work had loaded its model too
        m.count("model_loads", len(infos) + sum(s.deaths for slots in self.groups.values() for s in slots))
        for what in ("scoring_passes", "super_weight_studies", "evaluations", "trials"):
            m.count(what, self.counts[what])
        m.add_actors(infos)
        done = [t.key for t in self.graph.tasks.values() if t.kind == "score" and self.graph.state[t.id] == "done"]
        m["scoring_passes_by_key"] = sorted({f"{self.plan.scores[k].config.metric}/seed{self.plan.scores[k].seed}"
                                             for k in done})
        m.mark_pending(t.key for t in self.graph.unsettled("finish"))  # cells in flight when stopped
