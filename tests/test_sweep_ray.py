"""Sweeps on a local Ray: shared work, equality with the single command, resume, loopback."""
from __future__ import annotations

import ipaddress
import json
import shutil

import pandas as pd
import psutil
import pytest
import torch
import yaml

import orchestrator
from cwa_core.sweep import spec as sweep_spec
from cwa_core.sweep.runner import SweepRunner
from conftest import STORIES, TINYSTORIES, mlflow_runs_by_kind

pytestmark = pytest.mark.slow

SETTINGS = {"model": str(STORIES), "data_file": str(TINYSTORIES), "mode": "global", "seeds": [0, 1, 2],
            "max_samples": 6, "max_length": 64, "eval_samples": 12, "stability_check": True,
            "save_plots": False}


@pytest.fixture(scope="module")
def sweep_run(ray_local, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep260")
    raw = {"name": "real260", **SETTINGS, "metric": {"grid_search": ["grad_x_weight", "magnitude"]},
           "topk": {"grid_search": [20, 100]}, "perturb": {"grid_search": ["sign_flip", "zero"]},
           "resources": {"cpus_per_actor": 1, "actors_per_model": 1}}
    f = tmp / "real260.yaml"
    f.write_text(yaml.safe_dump(raw))
    uri = f"sqlite:///{tmp}/mlflow.db"
    rc = orchestrator.main(["--sweep", str(f), "--out-dir", str(tmp / "out"), "--tracking-uri", uri, "--no-progress"])
    assert rc == 0
    return tmp, f, uri


def test_one_model_load_per_actor_and_one_scoring_pass_per_metric_and_seed(sweep_run):
    tmp, _, _ = sweep_run
    m = json.loads((tmp / "out" / "sweep_manifest.json").read_text())
    assert len(m["cells"]) == 8 and all(c["status"] == "finished" for c in m["cells"].values())
    assert len(m["actors"]) == 1 and m["model_loads"] == 1
    assert m["actors"][0]["counts"]["model_loads"] == 1
    assert m["scoring_passes"] == 6  # 2 metrics x 3 seeds, whatever the 2 K and 2 perturbations
    assert sorted(m["scoring_passes_by_key"]) == sorted(f"{x}/seed{s}" for x in ("grad_x_weight", "magnitude") for s in range(3))
    assert m["actors"][0]["counts"]["baselines"] == 1 and m["actors"][0]["counts"]["evaluations"] == 8 * 3 * 3
    assert all(c.get("mlflow_run_id") for c in m["cells"].values())


@pytest.mark.parametrize("metric,topk,perturb", [("grad_x_weight", 20, "zero"), ("magnitude", 100, "sign_flip"),
                                                  ("grad_x_weight", 100, "sign_flip")])
def test_sweep_numbers_equal_the_single_command(sweep_run, metric, topk, perturb, tmp_path):
    tmp, _, _ = sweep_run
    sweep = sweep_spec.load(tmp / "real260.yaml")
    cell = next(c for c in sweep.cells if (c.config.metric, c.config.topk, c.config.perturb) == (metric, topk, perturb))
    argv = ["--model", str(STORIES), "--data-file", str(TINYSTORIES), "--metric", metric, "--topk", str(topk),
            "--mode", "global", "--perturb", perturb, "--seeds", "0,1,2", "--max-samples", "6", "--max-length", "64",
            "--eval-samples", "12", "--stability-check", "--out-dir", str(tmp_path / "single"), "--no-progress"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the sweep's actor computes with 1 thread (cpus_per_actor: 1)
    try:
        assert orchestrator.main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    single = json.loads((tmp_path / "single" / "perturbation_results.json").read_text())
    swept = json.loads((tmp / "out" / cell.id / "perturbation_results.json").read_text())
    assert single["baseline"] == swept["baseline"]
    assert single["data_independent"] == swept["data_independent"] == (metric == "magnitude")
    windows = [pd.read_parquet(d / "window_nll.parquet") for d in (tmp_path / "single", tmp / "out" / cell.id)]
    pd.testing.assert_frame_equal(windows[0], windows[1], check_exact=True)  # per-window sums, bit for bit
    assert len(windows[0]) == 12 * (1 + 3 * 3)
    assert [(r["selection"], r["seed"], r["ppl"], r["ppl_ratio"]) for r in single["results"]] == \
           [(r["selection"], r["seed"], r["ppl"], r["ppl_ratio"]) for r in swept["results"]]
    assert (tmp_path / "single" / "top_weights.csv").read_text() == (tmp / "out" / cell.id / "top_weights.csv").read_text()
    s1 = json.loads((tmp_path / "single" / "stability.json").read_text())
    s2 = json.loads((tmp / "out" / cell.id / "stability.json").read_text())
    assert s1["jaccard"] == s2["jaccard"]


def test_mlflow_holds_every_run_finished_with_params_and_metrics(sweep_run):
    tmp, _, uri = sweep_run
    c, runs, kinds = mlflow_runs_by_kind(uri, "real260")
    assert {k: len(v) for k, v in kinds.items()} == {"sweep": 1, "cell": 8, "seed": 72, "stability": 4}
    assert all(r.info.status == "FINISHED" for r in runs)
    parent = kinds["sweep"][0].info.run_id
    assert all(r.data.tags["mlflow.parentRunId"] == parent for r in kinds["stability"])
    # cells are top-level rows of the runs table (not collapsed under the sweep run), tagged with it
    assert all("mlflow.parentRunId" not in r.data.tags and r.data.tags["cwa.sweep_run_id"] == parent
               for r in kinds["cell"])
    cell_ids = {r.info.run_id for r in kinds["cell"]}
    assert all(r.data.tags["mlflow.parentRunId"] in cell_ids for r in kinds["seed"])
    for r in kinds["seed"]:
        assert {"model", "metric", "mode", "topk", "perturbation", "selection", "seed"} <= set(r.data.params)
        assert {"ppl", "baseline_ppl", "ppl_ratio"} <= set(r.data.metrics)
        assert r.data.metrics["ppl_ratio"] == pytest.approx(r.data.metrics["ppl"] / r.data.metrics["baseline_ppl"])
    for r in kinds["stability"]:
        j = r.data.metrics
        assert j["jaccard_min"] <= j["jaccard_mean"] <= j["jaccard_max"] <= 1
    arts = {a.path for a in c.list_artifacts(parent)}
    assert "real260.yaml" in arts
    cell_arts = {a.path for a in c.list_artifacts(kinds["cell"][0].info.run_id)}
    assert {"manifest.json", "top_weights.csv", "perturbation_results.json", "stability.json"} <= cell_arts


def test_second_run_starts_no_task_and_logs_nothing(sweep_run, monkeypatch):
    from mlflow.tracking import MlflowClient

    tmp, f, uri = sweep_run
    c = MlflowClient(uri)
    exp = c.get_experiment_by_name("real260")
    before = len(c.search_runs([exp.experiment_id], max_results=1000))
    manifest_before = (tmp / "out" / "sweep_manifest.json").read_text()
    # any attempt to create an actor would fail the test
    monkeypatch.setattr(SweepRunner, "_execute", lambda *a, **k: pytest.fail("a task was started"))
    assert orchestrator.main(["--sweep", str(f), "--out-dir", str(tmp / "out"), "--tracking-uri", uri, "--no-progress"]) == 0
    assert len(c.search_runs([exp.experiment_id], max_results=1000)) == before
    assert (tmp / "out" / "sweep_manifest.json").read_text() == manifest_before


def test_a_half_finished_sweep_resumes_only_what_is_missing(sweep_run, tmp_path):
    tmp, f, uri = sweep_run
    out = tmp_path / "out"
    shutil.copytree(tmp / "out", out)
    m = json.loads((out / "sweep_manifest.json").read_text())
    lost = sorted(m["cells"])[:2]
    for cid in lost:  # as if the driver died before these two cells were written
        m["cells"][cid]["status"] = "pending"
        shutil.rmtree(out / cid)
    (out / "sweep_manifest.json").write_text(json.dumps(m))
    runner = SweepRunner(sweep_spec.load(f), out, tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", progress=False)
    m2 = runner.run()
    assert all(c["status"] == "finished" for c in m2["cells"].values())
    assert m2["runs"][-1]["started_cells"] == 2
    for cid in lost:
        assert json.loads((out / cid / "manifest.json").read_text())["status"] == "finished"


def test_local_ray_listens_on_loopback_only(ray_local):
    listening = set()
    me = psutil.Process()
    for p in [me, *me.children(recursive=True)]:  # this session's Ray: GCS, raylet, workers, dashboard
        try:
            listening |= {c.laddr.ip for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}
        except (psutil.AccessDenied, psutil.NoSuchProcess):
            continue
    assert listening, "found no Ray listening sockets to check"
    for ip in listening:
        addr = ipaddress.ip_address(ip)
        addr = addr.ipv4_mapped or addr if isinstance(addr, ipaddress.IPv6Address) else addr
        assert addr.is_loopback, f"Ray listens on {ip}"


def _copy_store(tmp, dest):
    """The sweep's results and its MLflow store, as they were; the copy logs into ``dest``."""
    shutil.copytree(tmp / "out", dest / "out")
    shutil.copy(tmp / "mlflow.db", dest / "mlflow.db")
    return f"sqlite:///{dest}/mlflow.db"


def test_a_driver_killed_while_logging_resumes_with_every_run_logged_once(sweep_run, tmp_path):
    """The worst moment to die: a cell's MLflow runs are written, the manifest is not."""
    tmp, f, _ = sweep_run
    uri = _copy_store(tmp, tmp_path)
    c, _, before = mlflow_runs_by_kind(uri, "real260")
    out = tmp_path / "out"
    m = json.loads((out / "sweep_manifest.json").read_text())
    lost = sorted(m["cells"])[:3]
    lost_runs = {r.info.run_id for k in ("cell", "seed", "stability") for r in before[k] if r.data.tags["cwa.cell_id"] in lost}
    assert len(lost_runs) >= 3 * 10
    for cid in lost:
        m["cells"][cid] = {"status": "pending", "settings": m["cells"][cid]["settings"]}
        shutil.rmtree(out / cid)
    m["stability_runs"] = {k: v for k, v in m["stability_runs"].items() if v not in lost_runs}  # not saved either
    (out / "sweep_manifest.json").write_text(json.dumps(m))

    m2 = SweepRunner(sweep_spec.load(f), out, tracking_uri=uri, progress=False).run()
    assert m2["runs"][-1]["started_cells"] == 3 and m2["parent_run_id"] == m["parent_run_id"]
    _, runs, after = mlflow_runs_by_kind(uri, "real260")
    finished = {k: [r for r in v if r.info.status == "FINISHED"] for k, v in after.items()}
    assert {k: len(v) for k, v in finished.items()} == {k: len(v) for k, v in before.items()}  # each once, no more
    by_id = {r.info.run_id: r for r in runs}
    for run_id in lost_runs:  # the half-logged ones are kept, marked KILLED: never counted as done
        assert by_id[run_id].info.status == "KILLED" and by_id[run_id].data.tags["cwa.superseded"] == "true"
    assert not [r for r in runs if r.info.status == "RUNNING"]
    for cid in lost:
        assert m2["cells"][cid]["mlflow_run_id"] in {r.info.run_id for r in finished["cell"]}
    assert sorted(m2["stability_runs"]) == sorted(json.loads((tmp / "out" / "sweep_manifest.json").read_text())["stability_runs"])


def test_a_fresh_sweep_into_the_same_store_keeps_the_earlier_runs(sweep_run, tmp_path):
    tmp, _, _ = sweep_run
    uri = _copy_store(tmp, tmp_path)
    _, runs_before, _ = mlflow_runs_by_kind(uri, "real260")
    raw = {"name": "real260", **SETTINGS, "metric": "magnitude", "topk": 20, "perturb": "zero",
           "resources": {"cpus_per_actor": 1, "actors_per_model": 1}}
    f = tmp_path / "again.yaml"
    f.write_text(yaml.safe_dump(raw))
    sweep = sweep_spec.load(f)
    assert sweep.cells[0].id in json.loads((tmp / "out" / "sweep_manifest.json").read_text())["cells"]  # the same cell
    SweepRunner(sweep, tmp_path / "fresh", tracking_uri=uri, progress=False).run()
    _, runs_after, by = mlflow_runs_by_kind(uri, "real260")
    assert {r.info.run_id for r in runs_before} <= {r.info.run_id for r in runs_after}  # nothing deleted
    assert len(by["sweep"]) == 2 and len(by["cell"]) == 8 + 1 and len(by["seed"]) == 72 + 9


def test_local_ray_starts_no_idle_workers_of_its_own(ray_local):
    """Prestarted idle workers cost a small machine start-up time and background CPU; the
    raylet of a local Ray is told not to start them (and none is running beyond our actors)."""
    me = psutil.Process()
    raylets = [p for p in me.children(recursive=True) if p.name() == "raylet"]
    assert raylets, "no raylet found among this session's processes"
    assert raylets[0].environ().get("RAY_prestart_worker_first_driver") == "0"
    idle = []
    for p in raylets[0].children(recursive=True):
        try:
            if "ray::IDLE" in " ".join(p.cmdline()):
                idle.append(p)
        except (psutil.ZombieProcess, psutil.NoSuchProcess):  # an actor a finished sweep killed
            continue
    assert not idle, f"{len(idle)} idle Ray workers"
