"""Sweep files: every shipped file loads and says what it is; bad files exit 2 in one line."""
from __future__ import annotations

import re

import pytest
import yaml

import orchestrator
from cwa_core.sweep import spec as sweep_spec
from cwa_core.sweep.plan import make_plan
from conftest import ROOT, STORIES, TINYSTORIES

SWEEPS = sorted((ROOT / "sweeps").glob("*.yaml"))


def test_the_required_sweeps_ship():
    names = {p.stem for p in SWEEPS}
    assert {"smoke", "cross_model", "llama31_8b", "mistral_7b", "llama_family"} <= names


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_every_sweep_loads_and_its_header_is_true(path):
    text = path.read_text()
    header = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    head = "\n".join(header)
    assert len(header) >= 4, "a header comment says what the sweep studies"
    assert f"python orchestrator.py --sweep sweeps/{path.name}" in head
    assert re.search(r"[Ee]xpected run time", head)
    m = re.search(r"Cells: (\d+)", head)
    assert m, "the header gives the cell count"
    sweep = sweep_spec.parse(yaml.safe_load(text), path=path)
    assert len(sweep.cells) == int(m.group(1))
    assert sweep.name == path.stem


def test_grid_expansion_and_ids():
    raw = {"name": "t", "model": str(STORIES), "data_file": str(TINYSTORIES),
           "metric": {"grid_search": ["magnitude", "grad_x_weight"]}, "topk": {"grid_search": [5, 10, 20]},
           "mode": {"grid_search": ["global", "per_layer"]}, "seeds": [0, 1]}
    sweep = sweep_spec.parse(raw)
    assert len(sweep.cells) == 12 and len({c.id for c in sweep.cells}) == 12
    again = sweep_spec.parse(dict(raw))
    assert [c.id for c in again.cells] == [c.id for c in sweep.cells]  # ids are stable
    plan = make_plan(sweep.cells)
    # one scoring pass per (metric, seed) whatever the K and modes
    assert plan.counts()["scoring_passes"] == 4 and len(plan.baselines) == 1
    assert {t.k for t in plan.scores.values()} == {20}
    assert all(t.modes == {"global", "per_layer"} for t in plan.scores.values())
    changed = sweep_spec.parse({**raw, "max_samples": 7})
    assert not {c.id for c in changed.cells} & {c.id for c in sweep.cells}  # settings change the id


BAD = [
    ("metrik: magnitude\n", "metrik: unknown key; allowed:"),
    ("metric: fisher\n", "metric: unknown 'fisher'; allowed: magnitude"),
    ("metric: {grid_search: [magnitude, fisher]}\n", "metric: unknown 'fisher'"),
    ("topk: many\n", "topk: expected int"),
    ("topk: {grid_search: []}\n", "topk: a grid is written"),
    ("seeds: [0, x]\n", "seeds: expected a list of int"),
    ("controls: [random_k, top_k]\n", "controls: unknown 'top_k'; allowed: random_k, bottom_k"),
    ("resources: {gpus: 1}\n", "resources.gpus: unknown key; allowed: gpus_per_actor"),
    ("tracking: {uri: x}\n", "tracking.uri: unknown key"),
    ("stability_check: yes please\n", "stability_check: expected bool"),
    ("data_file: /no/such.txt\n", "data_file: no such file"),
]


@pytest.mark.parametrize("extra,message", BAD, ids=[b[1].split(":")[0] + str(i) for i, b in enumerate(BAD)])
def test_bad_sweep_exits_2_in_one_line_and_starts_nothing(extra, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = {"name": "bad", "model": str(STORIES), "data_file": str(TINYSTORIES), "metric": "magnitude", "topk": 5}
    key = extra.split(":")[0]
    body = yaml.safe_dump({k: v for k, v in base.items() if k != key}) + extra
    f = tmp_path / "bad.yaml"
    f.write_text(body)
    rc = orchestrator.main(["--sweep", str(f), "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and message in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]  # no MLflow store, no results


def test_missing_sweep_file_and_mixed_flags(tmp_path, capsys):
    assert orchestrator.main(["--sweep", str(tmp_path / "nope.yaml")]) == 2
    assert "--sweep: no such file" in capsys.readouterr().err
    assert orchestrator.main(["--sweep", str(SWEEPS[0]), "--metric", "magnitude"]) == 2
    assert "with --sweep, settings come from the sweep file" in capsys.readouterr().err


def test_dry_run_prints_the_cell_table_and_starts_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert orchestrator.main(["--sweep", str(ROOT / "sweeps" / "llama_family.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["id", "model", "metric", "mode", "K", "perturbation", "seeds"]
    rows = [l for l in out[2:] if l.strip() and not l.startswith("4 cells")]
    assert len(rows) == 4 and sum("meta-llama/Llama-2-7b-hf" in r for r in rows) == 2
    assert out[-1].startswith("4 cells over 2 model(s)") and "6 scoring pass(es)" in out[-1]
    assert list(tmp_path.iterdir()) == []


def test_a_gpu_sweep_with_a_named_dtype_is_prepared_on_a_cpu_head_node():
    """The driver (a cluster's head node) may have no GPU: a cell whose actors have GPUs and whose
    dtype is named is checked without asking this machine for CUDA."""
    import torch

    sweep = sweep_spec.parse({"name": "gpu", "model": str(STORIES), "data_file": str(TINYSTORIES), "metric": "magnitude",
                              "topk": 5, "dtype": "bf16", "device": "cuda", "perturb": "bit_flip", "max_length": 64,
                              "resources": {"gpus_per_actor": 1}})
    prepared = sweep_spec.prepare(sweep)
    assert [c.config.device for c in prepared.cells] == ["cuda"]
    from cwa_core.preflight import Preflight

    assert Preflight.run_dtype(prepared.cells[0].config, gpus=True) == torch.bfloat16
