"""The sweep's task graph and scheduler without Ray: the plan's tasks and their dependencies,
the state machine (order, dependencies, retries, failures that spread, a model finished), and
the scheduler's loop driven by a fake Ray whose actors fail on cue."""
from __future__ import annotations

import json
import logging

import pytest

from cwa_core.sweep import spec as sweep_spec
from cwa_core.sweep.ledger import SweepManifest
from cwa_core.sweep.plan import Task, make_plan
from cwa_core.sweep.scheduler import execute
from cwa_core.sweep.slots import _Slot
from cwa_core.sweep.taskgraph import TaskGraph
from cwa_core.sweep.tracking import NullTracker
from conftest import TINYSTORIES

BASE = {"model": "/m/a", "metric": "magnitude", "data_file": str(TINYSTORIES), "mode": "global", "topk": 5, "seeds": [0, 1],
        "max_samples": 2, "controls": ["random_k"], "perturb": "zero", "tracking": {"enabled": False}}


def _sweep(**over):
    return sweep_spec.parse({"name": "graph", **BASE, **over})


def _t(tid, mk="a", deps=(), cell=None, driver=False):
    return Task(tid, "x", (mk,), tuple(deps), cell=cell, on_driver=driver)


# --------------------------------------------------------------------------- the plan's tasks


def test_the_plan_emits_shared_work_once_and_each_cells_work_with_its_dependencies():
    plan = make_plan(_sweep(metric={"grid_search": ["magnitude", "wanda"]}, topk={"grid_search": [5, 10]}).cells)
    kinds = [t.kind for t in plan.tasks]
    assert kinds == ["baseline"] + ["score"] * 4 + (["evaluate"] * 4 + ["finish"]) * 4
    by_id = {t.id: t for t in plan.tasks}
    assert len(by_id) == len(plan.tasks)  # ids are unique
    for t in plan.tasks:  # every dependency comes earlier in the list
        assert all(list(by_id).index(d) < list(by_id).index(t.id) for d in t.deps)
    ev = next(t for t in plan.tasks if t.kind == "evaluate")
    assert by_id[ev.deps[0]].kind == "baseline" and [by_id[d].kind for d in ev.deps[1:]] == ["score", "score"]
    cfg, seed, kind, score = ev.args
    assert (seed, kind) == (0, "top_k") and by_id[score].args[1] == 0 and ev.cell == plan.cells[0].id
    fin = next(t for t in plan.tasks if t.kind == "finish")
    assert fin.on_driver and fin.args.cell is plan.cells[0] and fin.args.study is None
    assert fin.args.evaluations == tuple(t.id for t in plan.tasks[5:9]) and set(fin.args.evaluations) <= set(fin.deps)
    # the scoring pass runs at the largest K of the cells that share it
    assert sorted({t.args[2] for t in plan.tasks if t.kind == "score"}) == [10]
    assert plan.counts()["scoring_passes"] == 4 and len(plan.rows()) == 4


def test_a_scoring_pass_waits_for_the_super_weight_study_whose_candidates_it_ranks():
    plan = make_plan(_sweep(detect_super_weights=True).cells)
    by_kind = {}
    for t in plan.tasks:
        by_kind.setdefault(t.kind, []).append(t)
    study = by_kind["superweights"][0]
    # the study waits for the baseline of its model and evaluation settings (its causal test's reference)
    assert len(by_kind["superweights"]) == 1 and study.deps == (by_kind["baseline"][0].id,)
    assert all(s.deps == (study.id,) for s in by_kind["score"])
    assert by_kind["finish"][0].args.study == study.id and study.id in by_kind["evaluate"][0].deps


def test_each_super_weight_study_waits_for_the_baseline_of_its_own_evaluation_settings():
    from cwa_core.sweep.plan import baseline_key

    plan = make_plan(_sweep(detect_super_weights=True, eval_batch_size={"grid_search": [1, 2]},
                            super_out_ratio={"grid_search": [100.0, 1000.0]}).cells)
    by_id = {t.id: t for t in plan.tasks}
    studies = [t for t in plan.tasks if t.kind == "superweights"]
    assert len(studies) == 4 and len({t.deps for t in studies}) == 2  # two eval settings, two thresholds each
    for t in studies:
        [dep] = t.deps
        assert by_id[dep].kind == "baseline" and by_id[dep].key == baseline_key(t.args[0])
        assert by_id[dep].args[0].eval_batch_size == t.args[0].eval_batch_size


def test_an_empty_plan_has_no_tasks_and_a_finished_graph():
    plan = make_plan([])
    assert plan.tasks == [] and plan.counts()["cells"] == 0
    g = TaskGraph(plan.tasks, tries=3)
    assert g.take(("any",)) is None and g.take_driver() is None and g.model_finished(("any",))
    assert g.unsettled("finish") == []


# --------------------------------------------------------------------------- the state machine


def test_ready_tasks_come_out_in_plan_order_per_model_and_dependants_wait_for_all_their_inputs():
    g = TaskGraph([_t("a1"), _t("b1", "b"), _t("a2"), _t("a3", deps=["a1", "a2"]), _t("fin", deps=["a3"], driver=True)],
                  tries=2)
    assert g.state["a3"] == "waiting" and g.take(("b",)).id == "b1"
    a1, a2 = g.take(("a",)), g.take(("a",))
    assert (a1.id, a2.id) == ("a1", "a2") and g.take(("a",)) is None
    assert g.done("a1", 1) == [] and g.state["a3"] == "waiting"
    assert [t.id for t in g.done("a2", 2)] == ["a3"]
    assert g.take(("a",)).id == "a3" and g.take_driver() is None  # the finish waits for a3
    assert [t.id for t in g.done("a3", 3)] == ["fin"]
    assert g.take(("a",)) is None  # the driver's task is not an actor's
    assert g.take_driver().id == "fin"
    g.done("fin", None)
    assert g.results == {"a1": 1, "a2": 2, "a3": 3, "fin": None} and g.model_finished(("a",))
    with pytest.raises(ValueError, match="not running"):
        g.done("a1", 1)


def test_a_failed_try_runs_again_first_in_its_queue_until_its_tries_are_used():
    g = TaskGraph([_t("t"), _t("u"), _t("v", deps=["t"]), _t("fin", deps=["v", "u"], driver=True, cell="c")], tries=3)
    assert g.take(("a",)).id == "t"
    assert g.charge("t", "boom 1") is True and g.state["t"] == "ready"
    assert g.take(("a",)).id == "t"  # before u
    assert g.charge("t", "boom 2") is True
    g.take(("a",))
    assert g.charge("t", "boom 3") is False and g.tries["t"] == 3 and g.errors["t"] == ["boom 1", "boom 2", "boom 3"]
    assert [t.id for t in g.give_up("t")] == ["t", "v", "fin"]  # its dependants, transitively, in plan order
    assert {g.state[x] for x in ("t", "v", "fin")} == {"failed"} and "c" in g.dead_cells
    assert g.take(("a",)).id == "u"  # shared work of others still runs
    g.done("u", 0)
    assert g.model_finished(("a",)) and g.unsettled("x") == []


def test_one_try_only_gives_up_at_the_first_failure_and_tries_below_one_are_refused():
    g = TaskGraph([_t("t", cell="c"), _t("fin", deps=["t"], driver=True, cell="c")], tries=1)
    g.take(("a",))
    assert g.charge("t", "no") is False
    assert [t.id for t in g.give_up("t")] == ["t", "fin"] and g.model_finished(("a",))
    with pytest.raises(ValueError, match="at least 1"):
        TaskGraph([], tries=0)


def test_tasks_of_a_failed_cell_still_queued_are_dropped_and_running_ones_are_still_recorded():
    g = TaskGraph([_t("e1", cell="c"), _t("e2", cell="c"), _t("e3", cell="c"), _t("f1", cell="d"),
                   _t("fin", deps=["e1", "e2", "e3"], driver=True, cell="c")], tries=1)
    e1, e2 = g.take(("a",)), g.take(("a",))
    assert g.charge("e1", "poison") is False
    assert [t.id for t in g.give_up("e1")] == ["e1", "fin"]
    assert g.take(("a",)).id == "f1"  # e3 is dropped on the way
    assert g.state["e3"] == "failed"
    assert not g.model_finished(("a",))  # e2 is still running
    assert g.done("e2", "late") == [] and g.results["e2"] == "late"
    g.done("f1", 1)
    assert g.model_finished(("a",))


def test_requeued_tasks_go_back_first_in_their_order_uncharged():
    g = TaskGraph([_t("t1"), _t("t2"), _t("t3")], tries=2)
    g.take(("a",)), g.take(("a",))
    g.requeue(["t1", "t2"])
    assert [g.take(("a",)).id for _ in range(3)] == ["t1", "t2", "t3"] and g.tries == {"t1": 0, "t2": 0, "t3": 0}


def test_a_model_with_work_left_that_nobody_needs_is_finished_and_its_work_dropped():
    # the cell of model a failed (its baseline gave up); a's shared scoring pass is still queued
    g = TaskGraph([_t("base"), _t("score"), _t("ev", deps=["base", "score"], cell="c"),
                   _t("fin", deps=["ev"], driver=True, cell="c"), _t("other", "b")], tries=1)
    g.take(("a",))
    g.charge("base", "x")
    g.give_up("base")
    assert g.has_ready(("a",)) and g.model_finished(("a",)) and not g.model_finished(("b",))
    g.drop(("a",))
    assert not g.has_ready(("a",)) and g.state["score"] == "failed" and g.take(("a",)) is None
    assert g.take(("b",)).id == "other"


def test_take_all_hands_out_every_ready_task_of_a_model_dead_cells_included():
    g = TaskGraph([_t("t1", cell="c"), _t("t2", cell="c"), _t("t3", "b")], tries=1)
    g.dead_cells.add("c")
    assert [t.id for t in g.take_all(("a",))] == ["t1", "t2"] and not g.has_ready(("a",))
    assert [t.id for t in g.give_up("t1")] == ["t1"] and g.state["t2"] == "running"


def test_tasks_listed_twice_or_needing_unknown_tasks_are_refused():
    with pytest.raises(ValueError, match="listed twice"):
        TaskGraph([_t("t"), _t("t")], tries=1)
    with pytest.raises(ValueError, match="not listed before it"):
        TaskGraph([_t("t", deps=["later"]), _t("later")], tries=1)


# --------------------------------------------------------------------------- the loop, on a fake Ray


class _Exc:
    class RayActorError(Exception):
        pass

    WorkerCrashedError = OutOfMemoryError = NodeDiedError = LocalRayletDiedError = ActorUnschedulableError = RayActorError


class _Ref:
    def __init__(self, fn):
        self.fn = fn


class _Method:
    def __init__(self, actor, name):
        self.actor, self.name = actor, name

    def remote(self, *args):
        return _Ref(lambda: self.actor.call(self.name, args))


class _Scores:
    def selection(self, kind, mode, k):
        return (kind, mode, k)


class _Actor:
    def __init__(self, world, cfg):
        self.world, self.cfg, self.loads = world, cfg, 1
        self.counts = {}

    def __getattr__(self, name):
        if name.startswith("_") and name != "__ray_ready__":
            raise AttributeError(name)
        return _Method(self, name)

    def call(self, name, args):
        self.world.calls.append((name, args))
        error = self.world.fault(name, args)
        if error is not None:
            raise error
        self.counts[name] = self.counts.get(name, 0) + 1
        return {"__ray_ready__": lambda: None, "baseline": lambda: {"ppl": 10.0},
                "superweights": lambda: {"track": [(0, 1)], "report": {"candidates": [{"layer": 1, "row": 2, "col": 3,
                                                                                        "score": 9.0}]}}, "score": lambda: {"scores": _Scores(), "args": args},
                "evaluate": lambda: {"sel": args[1], "seed": args[2]},
                "trial": lambda: [{"seed": args[1], "level": args[2], "trial": args[3], "protect": args[4],
                                   "candidates": args[5]}],
                "info": lambda: {"model": {"model_id": self.cfg.model}, "counts": dict(self.counts),
                                 "load_seconds": 0.0}}[name]()


class _Ray:
    exceptions = _Exc

    def __init__(self, fault=None):
        self.calls, self.killed = [], 0
        self.fault = fault or (lambda name, args: None)

    def wait(self, refs, num_returns=1, timeout=None):
        return refs[:1], refs[1:]

    def get(self, ref, timeout=None):
        return ref.fn()

    def kill(self, actor):
        self.killed += 1

    def available_resources(self):
        return {"CPU": 64.0}


class _Runner:
    def __init__(self, sweep, tmp_path):
        self.sweep, self.progress, self.timings = sweep, False, {}
        self.manifest = SweepManifest(tmp_path, {"name": sweep.name, "cells": {}})
        self.manifest.begin(sweep)
        self.finished, self.failed, self.trials = {}, {}, {}

    def _save(self):
        pass

    def _new_actor(self, ray, cfg):
        return _Actor(ray, cfg)

    def _finish_cell(self, cell, baseline, scored, rows, tracker, study=None, trials=None):
        assert isinstance(tracker, NullTracker)  # the cell-writing methods get the null tracker itself
        self.finished[cell.id] = (baseline, scored, rows, study)
        self.trials[cell.id] = trials
        self.manifest.entry(cell.id)["status"] = "finished"

    def _fail_cell(self, cell, why, tracker, *, stage):
        assert isinstance(tracker, NullTracker)
        self.failed[cell.id] = (why, stage)
        self.manifest.entry(cell.id)["status"] = "failed"


def _execute(tmp_path, sweep, fault=None):
    ray = _Ray(fault)
    runner = _Runner(sweep, tmp_path)
    plan = make_plan(sweep.cells)
    groups = {}
    for mk, cells in plan.models.items():
        groups[mk] = []
        for _ in range(sweep.resources.actors_per_model):
            slot = _Slot(None)
            slot.renew(runner._new_actor(ray, cells[0].config))
            groups[mk].append(slot)
    execute(runner, ray, plan, groups, NullTracker())
    return runner, ray


def test_the_loop_finishes_every_cell_with_its_inputs_and_records_the_work(tmp_path):
    sweep = _sweep(metric={"grid_search": ["magnitude", "wanda"]}, model={"grid_search": ["/m/a", "/m/b"]},
                   detect_super_weights=True)
    runner, ray = _execute(tmp_path, sweep)
    assert sorted(runner.finished) == sorted(c.id for c in sweep.cells) and not runner.failed
    cell = sweep.cells[0]
    baseline, scored, rows, study = runner.finished[cell.id]
    assert baseline == {"ppl": 10.0} and study["track"] == [(0, 1)]
    # each study got the baseline perplexity of its model (its causal test measures none)
    assert [args[1:] for n, args in ray.calls if n == "superweights"] == [(10.0,), (10.0,)]
    assert [s["args"][1] for s in scored] == [0, 1] and all(s["args"][-1] == ((0, 1),) for s in scored)
    assert [(r["sel"][0], r["seed"]) for r in rows] == [("top_k", 0), ("random_k", 0), ("top_k", 1), ("random_k", 1)]
    m = runner.manifest
    assert m["scoring_passes"] == 8 and m["super_weight_studies"] == 2 and m["evaluations"] == 16
    assert m["model_loads"] == 2 and len(m["actors"]) == 2 and m["scoring_passes_by_key"] == [
        "magnitude/seed0", "magnitude/seed1", "wanda/seed0", "wanda/seed1"]
    # per model: the study before the passes that rank its candidates, the passes before evaluations
    a_calls = [n for n, args in ray.calls if n not in ("__ray_ready__", "info") and args[0].model == "/m/a"]
    assert a_calls.index("baseline") < a_calls.index("superweights") < a_calls.index("score") < a_calls.index("evaluate")
    assert a_calls.index("baseline") == 0 and a_calls.count("baseline") == 1


def test_a_task_failing_every_try_fails_its_cell_alone_after_its_tries(tmp_path, caplog):
    sweep = sweep_spec.parse({"name": "graph", **BASE, "metric": {"grid_search": ["magnitude", "wanda"]},
                              "retries": {"task_tries": 2, "actor_restarts": 3}})

    def fault(name, args):
        if name == "evaluate" and args[0].metric == "wanda" and args[1][0] == "top_k" and args[2] == 0:
            return RuntimeError("poison")
        return None

    with caplog.at_level(logging.WARNING, logger="cwa_core.sweep.runner"):
        runner, ray = _execute(tmp_path, sweep, fault)
    bad = next(c.id for c in sweep.cells if c.config.metric == "wanda")
    assert list(runner.failed) == [bad] and len(runner.finished) == 1
    why, stage = runner.failed[bad]
    assert why == "evaluation (seed 0, top_k) failed 2 time(s): RuntimeError: poison" and stage == "compute"
    assert "evaluate task failed (try 1 of 2), running it again: RuntimeError: poison" in caplog.text
    assert sum(1 for n, a in ray.calls if n == "evaluate" and a[0].metric == "wanda" and a[1][0] == "top_k"
               and a[2] == 0) == 2
    assert runner.manifest.statuses() == {"finished": 1, "failed": 1}


def test_a_lost_actor_is_replaced_and_its_queued_task_is_not_charged(tmp_path, caplog):
    state = {"lost": 0}

    def fault(name, args):
        if name == "evaluate" and not state["lost"]:  # the first evaluation; the second is queued behind it
            state["lost"] = 1
            return _Exc.RayActorError("the actor died")
        return None

    with caplog.at_level(logging.WARNING, logger="cwa_core.sweep.runner"):
        runner, ray = _execute(tmp_path, _sweep(), fault)
    assert len(runner.finished) == 1 and not runner.failed
    assert runner.manifest["actor_replacements"] == 1 and runner.manifest["model_loads"] == 2  # 1 replaced + 1 at the end
    assert "starting a new one (1 of 3)" in caplog.text
    assert caplog.text.count("task failed (try") == 1  # the one it was running, not the one queued
    assert sum(n == "evaluate" for n, _ in ray.calls) == 4 + 1


def test_a_baseline_failing_every_try_fails_every_cell_that_needs_it(tmp_path):
    sweep = _sweep(topk={"grid_search": [5, 10]})
    runner, ray = _execute(tmp_path, sweep, lambda name, args: RuntimeError("no data") if name == "baseline" else None)
    assert not runner.finished and list(runner.failed) == [c.id for c in sweep.cells]
    assert {w for w, _ in runner.failed.values()} == {"baseline failed 3 time(s): RuntimeError: no data"}
    assert sum(n == "evaluate" for n, _ in ray.calls) == 0
    assert runner.manifest["model_loads"] == 1  # the actor was released (and said so) when nothing was left


def test_when_every_actor_of_a_model_died_its_work_fails_and_the_other_model_finishes(tmp_path):
    sweep = _sweep(model={"grid_search": ["/m/a", "/m/b"]}, retries={"task_tries": 3, "actor_restarts": 0})

    def fault(name, args):
        return _Exc.RayActorError("killed") if name == "baseline" and args[0].model == "/m/a" else None

    runner, _ = _execute(tmp_path, sweep, fault)
    a, b = (c.id for c in sweep.cells)
    assert list(runner.finished) == [b] and list(runner.failed) == [a]
    assert runner.failed[a][0] == "baseline failed 1 time(s): every actor of /m/a died (actor lost: RayActorError: killed)"


def test_the_null_tracker_does_nothing():
    t = NullTracker()
    assert t.sweep_run_id is None and t.close_leftovers(set(), set()) == [] and t.log_cell(None, None) is None
    assert not t.enabled and t.log_failed_cell(None, "x", None) is None and t.log_stability("k", None, {}, None) is None
    t.end_sweep("FINISHED", {}), t.kill_open(), t.log_analysis(None, {})


class _Recorder:
    """A tracker that is on, recording what it is asked to log."""

    enabled = True

    def __init__(self):
        self.logged = []

    def log_cell(self, cell, cell_dir):
        self.logged.append(("cell", cell.id))
        return "run-1"

    def log_failed_cell(self, cell, why, cell_dir):
        self.logged.append(("failed", cell.id))
        return "run-2"


def test_the_cell_writers_take_the_null_tracker_and_record_no_run_ids_nor_pass_the_logging_fault_point(
        tmp_path, monkeypatch):
    from cwa_core.sweep import faults
    from cwa_core.sweep.runner import SweepRunner

    sweep = _sweep(topk={"grid_search": [5, 10]})
    a, b = sweep.cells
    monkeypatch.setenv(faults.ENV, '[{"where": "driver:after_log", "action": "raise", "times": -1}]')
    monkeypatch.setenv(faults.STATE_ENV, str(tmp_path))
    runner = SweepRunner(sweep, tmp_path / "out", progress=False)
    runner.manifest.begin(sweep)
    runner._log_cell(a, NullTracker())  # without tracking the fault point is not passed: no raise
    runner._fail_cell(b, "it broke", NullTracker(), stage="compute")
    cells = json.loads((tmp_path / "out" / "sweep_manifest.json").read_text())["cells"]
    assert cells[a.id]["status"] == "finished" and "mlflow_run_id" not in cells[a.id]
    assert cells[b.id]["status"] == "failed" and "mlflow_failed_run_id" not in cells[b.id]
    assert (tmp_path / "out" / b.id / "error.txt").read_text().startswith("it broke\n")
    # with tracking on: the run ids are recorded, and the fault point after logging is passed
    rec = _Recorder()
    runner._fail_cell(b, "it broke", rec, stage="compute")
    assert runner.manifest.entry(b.id)["mlflow_failed_run_id"] == "run-2"
    with pytest.raises(faults.InjectedFault, match="driver:after_log"):
        runner._log_cell(a, rec)
    assert runner.manifest.entry(a.id)["mlflow_run_id"] == "run-1" and rec.logged == [("failed", b.id), ("cell", a.id)]


# --------------------------------------------------------------------------- the study's baseline, on real workers


class _WorkerActor(_Actor):
    """A fake Ray actor that runs a real in-process :class:`~cwa_core.cell.Worker`."""

    def __init__(self, world, cfg, worker):
        super().__init__(world, cfg)
        self.worker = worker

    def call(self, name, args):
        self.world.calls.append((name, args))
        if name == "__ray_ready__":
            return None
        if name == "info":
            return {"model": {"model_id": self.cfg.model}, "counts": dict(self.worker.counts), "load_seconds": 0.0}
        return getattr(self.worker, name)(*args)


def _timeless(report: dict) -> str:
    """A study's report without its wall-clock seconds, as text (NaN == NaN there)."""
    report = {**report, "detect_seconds": None, "eval": {**report["eval"], "seconds": None}}
    return json.dumps(report, sort_keys=True, default=str)


def test_a_sweep_study_takes_its_baseline_from_the_baseline_task_one_pass_fewer_same_numbers(tmp_path, monkeypatch):
    import cwa_core.experiment as experiment_mod
    import cwa_core.superweights.causal as causal_mod
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cwa_core.cell import Worker
    from conftest import STORIES
    from test_superweights import plant

    tok = AutoTokenizer.from_pretrained(STORIES)
    model = AutoModelForCausalLM.from_pretrained(STORIES).eval()
    plant(model, 1, row=30, col=100, trigger=tok(" the", add_special_tokens=False)["input_ids"][-1], channel=5,
          amp=8.0, value=4.0)
    passes = []  # (where, what) of every perplexity pass of the baseline task and the causal test

    def counting(where, real):
        def perplexity(*a, **k):
            passes.append((where, k.get("desc")))
            return real(*a, **k)
        return perplexity

    monkeypatch.setattr(causal_mod, "perplexity", counting("study", causal_mod.perplexity))
    monkeypatch.setattr(experiment_mod, "perplexity", counting("baseline", experiment_mod.perplexity))
    sweep = _sweep(model=str(STORIES), detect_super_weights=True, topk=20, mode="per_layer", max_samples=4,
                   max_length=64, eval_samples=16, metric={"grid_search": ["magnitude", "wanda"]})
    cfg = sweep.cells[0].config

    # the study on its own measures its reference perplexity itself
    alone = Worker(model, tok).superweights(cfg)
    alone_passes = list(passes)
    assert alone_passes.count(("study", "baseline ppl")) == 1 and alone["report"]["candidates"]
    passes.clear()

    # the sweep: one baseline task; the study (shared by both cells) measures no baseline of its own
    ray, worker = _Ray(), Worker(model, tok)
    runner = _Runner(sweep, tmp_path)
    runner._new_actor = lambda ray_, cfg_: _WorkerActor(ray_, cfg_, worker)
    plan = make_plan(sweep.cells)
    slot = _Slot(None)
    slot.renew(runner._new_actor(ray, cfg))
    execute(runner, ray, plan, {next(iter(plan.models)): [slot]}, NullTracker())
    assert sorted(runner.finished) == sorted(c.id for c in sweep.cells) and not runner.failed
    # one pass fewer: the study's own baseline pass is gone, the baseline task's is the only one
    measured = [p for p in passes if p[0] == "study" or p[1] == "baseline ppl"]  # not the evaluations
    assert measured == [("baseline", "baseline ppl")] + [p for p in alone_passes if p != ("study", "baseline ppl")]
    assert len(measured) == len(alone_passes) and worker.counts["baselines"] == 1
    assert worker.counts["super_weight_studies"] == 1
    baseline, _, _, study = runner.finished[sweep.cells[0].id]
    assert study["report"]["baseline_ppl"] == baseline["ppl"].ppl
    assert _timeless(study["report"]) == _timeless(alone["report"])  # every number of the study, bit for bit
    assert study["track"] == alone["track"]


def test_campaign_trials_run_on_the_actors_with_their_seeds_protected_sets_and_reach_the_finish_in_order(tmp_path):
    """Issue 17: trials are tasks spread over the model's actors; each gets its seed's selections
    (the arms of ``protect``) and the study's candidates; the finish gets them in the cell's order."""
    sweep = _sweep(campaign="bit_errors", error_rate=[1e-6, 1e-5], trials=3, detect_super_weights=True,
                   protect=["none", "top_k", "random_k", "super_weights"])
    runner, ray = _execute(tmp_path, sweep)
    cell = sweep.cells[0]
    trials = runner.trials[cell.id]
    assert [(t[0]["seed"], t[0]["level"], t[0]["trial"]) for t in trials] == cell.config.campaign_trials()
    assert len(trials) == 2 * 2 * 3 and runner.manifest["trials"] == 12
    assert all(t[0]["protect"] == {"top_k": ("top_k", "global", 5), "random_k": ("random_k", "global", 5)}
               for t in trials)
    assert all(t[0]["candidates"] == [{"layer": 1, "row": 2, "col": 3}] for t in trials)  # coordinates only
