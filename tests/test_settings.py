"""Settings are declared once (cwa_core.config): the command's flags, the sweep file's keys and types,
and the keys under which sweep cells share work are all derived from the declarations."""
from __future__ import annotations

import pytest

import orchestrator
from cwa_core import config
from cwa_core.config import ConfigError, ExperimentConfig
from cwa_core.sweep import plan, spec

REQUIRED = ["--model", "m", "--metric", "magnitude", "--topk", "3", "--out-dir", "x"]


def test_flag_defaults_are_the_declared_defaults():
    """The command's defaults cannot drift from the config's (they did: a changed config default
    did not reach the single command)."""
    cfg = orchestrator.config_from_args(orchestrator.build_parser().parse_args(REQUIRED))
    assert cfg == ExperimentConfig(model="m", metric="magnitude", topk=3, out_dir="x")
    assert cfg.controls == ("random_k", "bottom_k") and cfg.seeds == (0,) and cfg.max_samples == 30


def _flag_value(name: str):
    """A value of the setting's type other than its default, as typed and as parsed."""
    s, vt = dict(config.declared())[name], config.value_types()[name]
    default = config.defaults().get(name)
    if vt.types == (bool,):
        return None, True
    if s.choices is not None and not vt.is_list:
        pick = next(c for c in reversed(s.choices()) if c != default)
        return pick, pick
    if vt.is_list:
        return {int: ("3,1", [3, 1]), float: ("0.25,1e-3", [0.25, 0.001])}.get(vt.item, ("a,b", ["a", "b"]))
    return {int: ("7", 7), float: ("0.25", 0.25), str: ("text", "text")}[vt.item]


@pytest.mark.parametrize("name", [n for n, s in config.declared() if s.flag])
def test_every_flag_setting_is_a_flag_of_its_type(name):
    typed, parsed = _flag_value(name)
    argv = REQUIRED + [orchestrator.flag(name)] + ([] if typed is None else [typed])
    args = orchestrator.build_parser().parse_args(argv)
    assert getattr(args, name) == parsed


def test_every_config_field_is_declared_with_a_pass():
    names = ExperimentConfig.keys()
    decl = dict(config.declared())
    assert list(decl) == names
    assert all(s.passes and set(s.passes) <= set(config.PASSES) for s in decl.values())
    assert {n for n, s in decl.items() if not s.flag} == {"out_dir"}  # a flag of its own (also --sweep's root)


def test_sweep_keys_are_the_declared_settings():
    assert list(spec.EXPERIMENT_KEYS) == [n for n in ExperimentConfig.keys() if n != "out_dir"]
    assert spec.EXPERIMENT_KEYS["perturb_scale"] == ((int, float, type(None)), False)
    assert spec.EXPERIMENT_KEYS["seeds"] == ((int,), True)
    assert spec.EXPERIMENT_KEYS["super_out_ratio"] == ((int, float), False)
    base = {"name": "s", "model": "m", "metric": "magnitude", "topk": 2}
    sweep = spec.parse({**base, "stability_sample": {"grid_search": [100, 200]}})
    assert [c.config.stability_sample for c in sweep.cells] == [100, 200]
    with pytest.raises(spec.SpecError, match=r"^super_out_ratio: expected int or float, got 'big'$"):
        spec.parse({**base, "super_out_ratio": "big"})
    with pytest.raises(spec.SpecError, match=r"^stability_sample: must be a positive integer, got 0$"):
        spec.parse({**base, "stability_sample": 0})


def test_grid_order_is_declaration_order():
    """The first grid key in declaration order varies slowest (the cells' order, as before)."""
    sweep = spec.parse({"name": "s", "model": "m", "topk": 2, "metric": {"grid_search": ["magnitude", "wanda"]},
                        "mode": {"grid_search": ["per_layer", "global"]}})
    assert [(c.config.metric, c.config.mode) for c in sweep.cells] == [
        ("magnitude", "per_layer"), ("magnitude", "global"), ("wanda", "per_layer"), ("wanda", "global")]


def test_pass_keys_hold_the_settings_each_pass_reads():
    data = {"data_file", "eval_file", "bos", "max_length", "eval_length", "eval_samples", "protocol"}
    assert set(config.DATA_FIELDS) == data
    assert set(plan.MODEL_FIELDS) == {"model", "dtype", "device", "revision", "trust_remote_code"}
    assert set(plan.EVAL_FIELDS) == data | {"eval_batch_size"}
    assert set(plan.SW_FIELDS) == {"detect_super_weights", "super_out_ratio", "super_in_ratio", "super_out_floor", "super_min_drop",
                                   "super_in_floor", "super_max_rounds", "super_windows", "super_prompt", "hf_id"}
    assert set(plan.SCORE_FIELDS) == data | {"metric", "max_samples", "param_types", "hutchinson_probes",
                                             "micro_batch", "stability_sample"}


def _plan(**grid):
    raw = {"name": "s", "model": "m", "metric": "magnitude", "topk": 2, "seeds": [0, 1]}
    raw.update({k: {"grid_search": v} if isinstance(v, list) else v for k, v in grid.items()})
    return plan.make_plan(spec.parse(raw).cells)


def test_cells_share_exactly_the_work_their_settings_allow():
    c = _plan(super_out_ratio=[3.0, 5.0]).counts()  # detection off: the thresholds change nothing shared
    assert (c["cells"], c["scoring_passes"], c["baselines"], c["super_weight_studies"]) == (2, 2, 1, 0)
    c = _plan(super_out_ratio=[3.0, 5.0], detect_super_weights=True).counts()  # the passes rank other candidates
    assert (c["cells"], c["scoring_passes"], c["baselines"], c["super_weight_studies"]) == (2, 4, 1, 2)
    c = _plan(max_samples=[4, 8]).counts()
    assert (c["scoring_passes"], c["baselines"]) == (4, 1)
    c = _plan(eval_batch_size=[4, 8]).counts()
    assert (c["scoring_passes"], c["baselines"]) == (2, 2)
    p = _plan(topk=[2, 5], mode=["per_layer", "global"])
    assert len(p.scores) == 2 and {t.k for t in p.scores.values()} == {5}
    assert all(t.modes == {"per_layer", "global"} for t in p.scores.values())


@pytest.mark.parametrize("key, value, words", [
    ("metric", "fisher", "metric: unknown 'fisher'; allowed: magnitude"),
    ("controls", ("random_k", "random_k"), "controls: a control is listed twice"),
    ("param_types", (), "param_types: at least one parameter type"),
    ("super_in_floor", float("inf"), "super_in_floor: must be a finite number >= 0, got inf"),
    ("super_in_floor", float("nan"), "super_in_floor: must be a finite number >= 0, got nan"),
    ("perturb_scale", float("nan"), "perturb_scale: must be a finite number, got nan"),
    ("super_prompt", "  ", "super_prompt: must be a non-empty text"),
    ("hf_id", "llama", "hf_id: expected a Hugging Face id like org/name, got 'llama'"),
    ("device", "tpu", "device: unknown 'tpu'; allowed: auto, cpu, cuda (or cuda:N)"),
    ("eval_length", 1, "eval_length: windows need at least 2 tokens"),
    ("topk", True, "topk: must be a positive integer, got True"),
])
def test_each_setting_checks_itself_naming_its_key(key, value, words):
    with pytest.raises(ConfigError) as e:
        ExperimentConfig(**{"model": "m", "metric": "magnitude", "topk": 2, key: value})
    assert str(e.value).startswith(words) and e.value.key == key


def test_a_setting_added_in_one_declaration_reaches_flag_sweep_plan_and_science():
    """super_min_drop was added as one declaration in config.py plus its consumer
    (super_weight_options): the flag, the sweep key, the check and the study's key follow."""
    args = orchestrator.build_parser().parse_args(REQUIRED + ["--super-min-drop", "0.5"])
    cfg = orchestrator.config_from_args(args)
    assert cfg.super_min_drop == 0.5 and cfg.super_weight_options().min_drop == 0.5
    assert ExperimentConfig(model="m", metric="magnitude", topk=2).super_weight_options().min_drop == 0.25
    assert spec.EXPERIMENT_KEYS["super_min_drop"] == ((int, float), False)
    assert "super_min_drop" in plan.SW_FIELDS and "super_min_drop" not in plan.SCORE_FIELDS
    for bad in (1.5, -0.1, float("nan"), True):
        with pytest.raises(ConfigError, match=r"^super_min_drop: must be a number in \[0, 1\]"):
            ExperimentConfig(model="m", metric="magnitude", topk=2, super_min_drop=bad)
    c = _plan(super_min_drop=[0.25, 0.5], detect_super_weights=True).counts()
    assert (c["cells"], c["super_weight_studies"], c["scoring_passes"]) == (2, 2, 4)
