"""Issue 17's settings: declared once (flags, sweep keys, checks), the cell's campaign trials and
the plan's trial tasks."""
from __future__ import annotations

import pytest
import yaml

import orchestrator
from cwa_core import config, schema
from cwa_core.config import ConfigError, ExperimentConfig
from cwa_core.sweep import spec
from cwa_core.sweep.plan import make_plan
from conftest import STORIES, TINYSTORIES

BASE = ["--model", str(STORIES), "--metric", "magnitude", "--topk", "4", "--data-file", str(TINYSTORIES)]

BAD_FLAGS = [
    (["--campaign", "bit_errors", "--error-rate", "2"], "--error-rate: must be error rates per bit in [0, 1], got [2.0]"),
    (["--campaign", "bit_errors", "--error-rate", "1e-6,1e-6"], "--error-rate: a value is listed twice"),
    (["--trials", "3"], "--trials: a campaign setting, but no campaign is chosen; add campaign (bit_errors, quantize, "
                        "prune)"),
    (["--campaign", "prune", "--protect", "super_weights"],
     "--protect: super_weights needs the super-weight study: add detect_super_weights"),
    (["--campaign", "quantize", "--quant-group", "12x"],
     "--quant-group: unknown '12x'; allowed: tensor, row or a positive integer"),
    (["--campaign", "quantize", "--quant-group", "0"], "--quant-group: unknown '0'"),
    (["--campaign", "quantize", "--quant-bits", "9"], "--quant-bits: must be an integer in 2..8, got 9"),
    (["--campaign", "prune", "--sparsity", "1"], "--sparsity: must be a number in [0, 1), got 1.0"),
    (["--campaign", "prune", "--sparsity", "nan"], "--sparsity: must be a number in [0, 1), got nan"),
    (["--campaign", "prune", "--fail-ratio", "0.5"], "--fail-ratio: must be a finite number >= 1"),
    (["--campaign", "prune", "--fail-ratio", "inf"], "--fail-ratio: must be a finite number >= 1"),
    (["--campaign", "prune", "--protect", "top_k,top_k"], "--protect: a value is listed twice"),
    (["--campaign", "prune", "--protect", "top_k,favourites"], "--protect: unknown 'favourites'; allowed: none, top_k"),
    (["--campaign", "melt"], "--campaign: invalid choice: 'melt'"),
    (["--campaign", "bit_errors", "--bits", "most"], "--bits: invalid choice: 'most'"),
    (["--campaign", "bit_errors", "--trials", "0"], "--trials: must be a positive integer, got 0"),
    (["--campaign", "bit_errors", "--error-rate", "lots"], "argument --error-rate: expected comma-separated numbers"),
]


@pytest.mark.parametrize("extra,message", BAD_FLAGS, ids=[" ".join(b[0]) for b in BAD_FLAGS])
def test_bad_campaign_flags_exit_2_in_one_line_before_anything(extra, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc = orchestrator.main([*BASE, *extra, "--out-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out").exists()


def test_the_campaign_section_is_the_schema_list_and_every_key_is_a_flag_and_sweep_key():
    section = [n for n, s in config.declared() if s.section == "campaign"]
    assert tuple(section) == schema.CAMPAIGN_SETTINGS
    assert all(n in spec.EXPERIMENT_KEYS for n in section)
    args = orchestrator.build_parser().parse_args([*BASE, "--out-dir", "x", "--campaign", "bit_errors",
                                                   "--error-rate", "1e-7,1e-5", "--protect", "none,bottom_k",
                                                   "--quant-group", "128"])
    cfg = orchestrator.config_from_args(args)
    assert cfg.error_rate == (1e-7, 1e-5) and cfg.protect == ("none", "bottom_k") and cfg.quant_group == "128"
    assert cfg.levels == (1e-7, 1e-5)


def test_campaign_trials_in_order_per_campaign():
    c = ExperimentConfig(model="m", metric="magnitude", topk=3, campaign="bit_errors", error_rate=(1e-5, 1e-6),
                         trials=2, seeds=(3, 1))
    assert c.campaign_trials() == [(3, 1e-5, 0), (3, 1e-5, 1), (3, 1e-6, 0), (3, 1e-6, 1),
                                   (1, 1e-5, 0), (1, 1e-5, 1), (1, 1e-6, 0), (1, 1e-6, 1)]
    q = ExperimentConfig(model="m", metric="magnitude", topk=3, campaign="quantize", quant_bits=[4, 8], trials=5)
    assert q.campaign_trials() == [(0, 4, 0), (0, 8, 0)] and q.quant_bits == (4, 8)  # one trial: deterministic
    assert ExperimentConfig(model="m", metric="magnitude", topk=3).campaign_trials() == []
    with pytest.raises(ConfigError, match="^sparsity: a campaign setting"):
        ExperimentConfig(model="m", metric="magnitude", topk=3, sparsity=(0.3,))


def test_the_plan_spreads_trials_as_tasks_that_wait_for_the_cells_inputs(tmp_path):
    raw = {"name": "c", "model": str(STORIES), "data_file": str(TINYSTORIES), "metric": "magnitude", "topk": 4,
           "seeds": [0, 1], "campaign": {"grid_search": ["none", "bit_errors", "prune"]}}
    sweep = spec.parse({**raw, "trials": 3, "error_rate": [1e-6, 1e-5]} | {"campaign": {"grid_search": ["bit_errors"]}})
    plan = make_plan(sweep.cells)
    trials = [t for t in plan.tasks if t.kind == "trial"]
    assert len(trials) == 2 * 2 * 3 == plan.counts()["trials"]
    cell = sweep.cells[0]
    assert [t.key[1:] for t in trials] == cell.config.campaign_trials()
    finish = next(t for t in plan.tasks if t.kind == "finish")
    assert finish.args.trials == tuple(t.id for t in trials) and set(finish.args.trials) <= set(finish.deps)
    for t in trials:  # the seed's scoring pass, the baseline; its own seed's pass in its arguments
        score = next(d for d in t.deps if d.startswith("score/"))
        assert t.deps == next(e for e in plan.tasks if e.kind == "evaluate").deps
        assert t.args[4] == finish.args.scores[cell.config.seeds.index(t.key[1])] and score in t.deps
    assert len({t.id for t in plan.tasks}) == len(plan.tasks)
    # quantize and prune: one task per seed and level; a cell without a campaign has none
    plain = spec.parse({**raw, "campaign": "none"})
    assert [t.kind for t in make_plan(plain.cells).tasks].count("trial") == 0
    pr = spec.parse({**raw, "campaign": "prune", "sparsity": [0.25, 0.5, 0.75]})
    assert [t.kind for t in make_plan(pr.cells).tasks].count("trial") == 2 * 3


def test_dry_run_counts_the_campaign_trials(tmp_path, capsys):
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({"name": "c", "model": str(STORIES), "data_file": str(TINYSTORIES),
                                 "metric": "magnitude", "topk": 4, "campaign": "bit_errors", "trials": 7,
                                 "error_rate": [1e-6, 1e-5, 1e-4]}))
    assert orchestrator.main(["--sweep", str(f), "--dry-run"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].endswith(", 21 campaign trial(s)")
