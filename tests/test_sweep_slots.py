"""Sweeps on a Ray with room for one actor at a time (the flagship two-model sweep on one GPU):
every model gets its turn, the wait is said, and a sweep that can never fit is refused up front."""
from __future__ import annotations

import json
import logging
import shutil

import pytest
import yaml

import orchestrator
from cwa_core.sweep import spec as sweep_spec
from cwa_core.sweep.runner import SweepRunner, _Progress
from cwa_core.sweep.plan import make_plan
from conftest import STORIES, TINYSTORIES

pytestmark = pytest.mark.slow

SMALL = {"data_file": str(TINYSTORIES), "metric": "magnitude", "mode": "global", "topk": {"grid_search": [5, 10]},
         "seeds": [0], "max_samples": 2, "max_length": 32, "eval_samples": 4, "controls": ["random_k"],
         "perturb": "zero", "save_plots": False}


def _two_models(tmp) -> list[str]:
    """Two models with different paths: two actor groups (copies of the 260K model, in tmp)."""
    out = []
    for name in ("model-a", "model-b"):
        shutil.copytree(STORIES, tmp / name)
        out.append(str(tmp / name))
    return out


@pytest.mark.timeout(600)
def test_two_models_with_one_actor_slot_run_to_the_end_one_after_the_other(ray_local, tmp_path, caplog, monkeypatch):
    """The session's Ray has 2 CPUs and each actor asks for 2: one actor at a time. Before, the first
    model's actor held its slot to the end of the sweep and the second never started (2 of 4 cells,
    then nothing, forever). Now a model's actor is released when its cells are done. (The first
    baseline sleeps 8 s, so that the waiting model is looked at, 5 s in, whatever the machine's speed.)"""
    (tmp_path / "faults").mkdir()
    monkeypatch.setenv("CWA_FAULTS", json.dumps([{"where": "baseline", "action": "sleep", "seconds": 8}]))
    monkeypatch.setenv("CWA_FAULTS_STATE", str(tmp_path / "faults"))
    models = _two_models(tmp_path)
    sweep = sweep_spec.prepare(sweep_spec.parse({"name": "slots", **SMALL, "model": {"grid_search": models},
                                                 "resources": {"cpus_per_actor": 2, "actors_per_model": 1},
                                                 "tracking": {"enabled": False}}))
    with caplog.at_level(logging.INFO, logger="cwa_core.sweep.runner"):
        m = SweepRunner(sweep, tmp_path / "out", progress=False).run()
    assert [c["status"] for c in m["cells"].values()] == ["finished"] * 4
    assert sorted(a["model"] for a in m["actors"]) == sorted(models)  # each model's actor worked, once
    assert m["model_loads"] == 2 and all(a["counts"]["model_loads"] == 1 for a in m["actors"])
    assert all(a["counts"]["evaluations"] == 2 * 2 for a in m["actors"])  # 2 cells x (top_k, random_k)
    text = caplog.text
    waiting = [r.getMessage() for r in caplog.records if "waiting for resources" in r.getMessage()]
    assert len(waiting) == 1 and "waiting for resources: its actor needs 2 CPU, 0 GPU, 0 CPU, 0 GPU free now" in waiting[0], text[-3000:]
    assert "its actor(s) released" in text and "an actor started (resources freed)" in text


def test_the_progress_bar_says_a_model_waits_for_resources(tmp_path):
    sweep = sweep_spec.parse({"name": "bar", **SMALL, "model": {"grid_search": [str(STORIES), str(tmp_path / "b")]}})
    prog = _Progress(make_plan(sweep.cells), enabled=True)
    mk = list(prog.bars)[1]
    prog.waiting(mk)
    assert prog.bars[mk].postfix == "waiting for resources"
    prog.waiting(mk, False)
    assert prog.bars[mk].postfix == "running 2, failed 0"
    prog.close()


def test_a_sweep_whose_actor_fits_no_node_is_refused_in_one_line_with_nothing_written(ray_local, tmp_path, capsys):
    f = tmp_path / "big.yaml"
    f.write_text(yaml.safe_dump({"name": "big", **SMALL, "model": str(STORIES),
                                 "resources": {"cpus_per_actor": 3, "actors_per_model": 1}}))
    rc = orchestrator.main(["--sweep", str(f), "--out-dir", str(tmp_path / "out"), "--no-progress",
                            "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("orchestrator.py: error: resources: an actor needs 3 CPU, 0 GPU but no "
                                               "node of this Ray cluster has that (the largest has 2 CPU, 0 GPU)"), err
    assert not (tmp_path / "out").exists() and not (tmp_path / "mlflow.db").exists()
