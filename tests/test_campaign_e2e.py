"""Issue 17 end to end on the real 260K model: a campaign from the single command and from a
sweep (trials as tasks on two actors) gives the same numbers; its files, its MLflow aggregates."""
from __future__ import annotations

import json

import pandas as pd
import pytest
import yaml

import orchestrator
from conftest import STORIES, TINYSTORIES, mlflow_runs_by_kind

SETTINGS = {"model": str(STORIES), "data_file": str(TINYSTORIES), "metric": "magnitude", "topk": 16, "max_samples": 4,
            "max_length": 64, "eval_samples": 8, "seeds": [0, 1], "error_rate": [1e-5, 1e-4], "trials": 3,
            "sparsity": [0.25, 0.5], "protect": ["none", "top_k", "random_k"]}


def _flags(settings: dict) -> list[str]:
    out = []
    for k, v in settings.items():
        out += [orchestrator.flag(k), ",".join(map(str, v)) if isinstance(v, list) else str(v)]
    return out


def _rows(path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in json.loads(path.read_text())["trials"]]


@pytest.mark.slow
def test_a_campaign_gives_the_same_numbers_from_the_command_and_from_a_sweep(ray_local, tmp_path):
    singles = {}
    for campaign in ("bit_errors", "prune"):
        out = tmp_path / campaign
        flags = _flags({k: v for k, v in SETTINGS.items() if not (campaign == "prune" and k in ("error_rate", "trials"))
                        and not (campaign == "bit_errors" and k == "sparsity")})
        assert orchestrator.main([*flags, "--campaign", campaign, "--out-dir", str(out), "--no-progress"]) == 0
        singles[campaign] = out
    raw = {"name": "camp", **SETTINGS, "campaign": {"grid_search": ["bit_errors", "prune"]},
           "resources": {"cpus_per_actor": 1, "actors_per_model": 2}}
    # a grid sets every key for every cell: the prune cell gets error_rate/trials, unused (and recorded)
    f = tmp_path / "camp.yaml"
    f.write_text(yaml.safe_dump(raw))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert orchestrator.main(["--sweep", str(f), "--out-dir", str(tmp_path / "sweep"), "--tracking-uri", uri,
                              "--no-progress"]) == 0
    m = json.loads((tmp_path / "sweep" / "sweep_manifest.json").read_text())
    assert m["trials"] == 2 * 2 * 3 + 2 * 2 and len(m["actors"]) == 2
    assert sum(a["counts"].get("trials", 0) for a in m["actors"]) == m["trials"]
    by_campaign = {c["settings"]["campaign"]: cid for cid, c in m["cells"].items()}
    for campaign, single in singles.items():
        cell = tmp_path / "sweep" / by_campaign[campaign]
        rows = _rows(cell / "campaign_results.json")
        assert rows == _rows(single / "campaign_results.json")  # every trial of every arm, bit for bit
        assert len(rows) == {"bit_errors": 2 * 2 * 3, "prune": 2 * 2}[campaign] * 3
        table = pd.read_parquet(cell / "campaign_trials.parquet")
        assert table["ppl"].map(repr).tolist() == [repr(r["ppl"]) for r in rows]  # NaN and inf as they are
        assert set(table["campaign"]) == {campaign} and table["arm"].tolist() == [r["arm"] for r in rows]
        single_json = json.loads((single / "campaign_results.json").read_text())
        cell_json = json.loads((cell / "campaign_results.json").read_text())
        assert cell_json["summary"] == single_json["summary"] and cell_json["headline"] == single_json["headline"]
    # MLflow: the aggregates on each cell run (one run per cell, none per trial)
    _, runs, by = mlflow_runs_by_kind(uri, "camp")
    assert len(by["cell"]) == 2 and {r.data.tags["cwa.kind"] for r in runs} == {"sweep", "cell", "seed"}
    for r in by["cell"]:
        camp = json.loads((tmp_path / "sweep" / r.data.tags["cwa.cell_id"] / "campaign_results.json").read_text())
        for s in camp["summary"]:
            assert r.data.metrics[f"campaign/{s['arm']}/failure_rate/{s['level']:g}"] == s["failure_rate"]
        assert r.data.params["campaign"] == camp["campaign"]


def test_error_rate_zero_gives_ratio_one_exactly_in_every_arm_through_the_command(tmp_path):
    out = tmp_path / "zero"
    flags = _flags({**{k: v for k, v in SETTINGS.items() if k != "sparsity"}, "error_rate": [0.0], "seeds": [0],
                    "protect": ["none", "top_k", "random_k", "bottom_k"]})
    assert orchestrator.main([*flags, "--campaign", "bit_errors", "--out-dir", str(out), "--no-progress"]) == 0
    camp = json.loads((out / "campaign_results.json").read_text())
    assert len(camp["trials"]) == 3 * 4
    assert all(r["ppl_ratio"] == 1.0 and r["changed"] == 0 and r["drawn"] == 0 for r in camp["trials"])
    assert all(s["failure_rate"] == 0.0 and s["median_ratio"] == 1.0 for s in camp["summary"])
