"""Sweep files: validated once at load, then expanded into cells.

A sweep's keys are the single-experiment flags in snake_case, each a scalar (or list, for
``seeds``/``controls``) or a Ray Tune style grid ``{grid_search: [...]}``, plus ``name`` and the
``resources`` and ``tracking`` sections. Errors name the key and the allowed values.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from ..config import ConfigError, ExperimentConfig

BUILTIN_DEMO = "builtin:demo"

# key -> (python types allowed for one value, is it a list-valued key)
EXPERIMENT_KEYS: dict[str, tuple[tuple[type, ...], bool]] = {
    "model": ((str,), False), "metric": ((str,), False), "topk": ((int,), False), "mode": ((str,), False),
    "perturb": ((str,), False), "perturb_scale": ((int, float, type(None)), False),
    "perturb_bit": ((int, type(None)), False), "controls": ((str,), True), "seeds": ((int,), True),
    "max_samples": ((int,), False), "max_length": ((int,), False), "eval_samples": ((int,), False),
    "eval_length": ((int, type(None)), False), "data_file": ((str, type(None)), False),
    "eval_file": ((str, type(None)), False), "dtype": ((str,), False), "device": ((str,), False),
    "stability_check": ((bool,), False), "save_plots": ((bool,), False), "bos": ((str,), False),
    "param_types": ((str,), True), "hutchinson_probes": ((int,), False), "micro_batch": ((int, type(None)), False),
    "eval_batch_size": ((int,), False), "revision": ((str, type(None)), False),
    "trust_remote_code": ((bool,), False), "stability_sample": ((int,), False),
}
RESOURCE_KEYS = {"gpus_per_actor": (int, float), "cpus_per_actor": (int, float), "actors_per_model": (int,)}
TRACKING_KEYS = {"experiment": (str,), "tracking_uri": (str, type(None)), "enabled": (bool,)}
TOP_KEYS = {"name", "resources", "tracking", *EXPERIMENT_KEYS}
REQUIRED = ("name", "model", "metric", "topk")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class SpecError(ValueError):
    """A bad sweep file; the message is one line naming the key and what is allowed."""


@dataclass(frozen=True)
class Resources:
    gpus_per_actor: float = 0
    cpus_per_actor: float = 1
    actors_per_model: int = 1


@dataclass(frozen=True)
class Tracking:
    experiment: str | None = None  # default: the sweep name
    tracking_uri: str | None = None  # default: MLFLOW_TRACKING_URI or MLflow's own default
    enabled: bool = True


@dataclass(frozen=True)
class Cell:
    """One resolved experiment of the grid; ``id`` is a hash of its settings."""

    id: str
    settings: dict  # ExperimentConfig fields, builtin names unresolved (portable)
    config: ExperimentConfig  # resolved: builtin names replaced by local paths


@dataclass(frozen=True)
class Sweep:
    name: str
    raw: dict
    path: Path | None
    cells: list[Cell]
    resources: Resources = field(default_factory=Resources)
    tracking: Tracking = field(default_factory=Tracking)

    @property
    def spec_hash(self) -> str:
        return _hash({"name": self.name, "cells": sorted(c.id for c in self.cells)})


def _hash(obj: Any, n: int = 12) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


def _type_names(types: tuple[type, ...]) -> str:
    return " or ".join("null" if t is type(None) else t.__name__ for t in types)


def _check_value(key: str, value: Any) -> None:
    types, is_list = EXPERIMENT_KEYS[key]
    if is_list:
        items = [value] if isinstance(value, (str, int)) and not isinstance(value, bool) else value
        if not isinstance(items, list) or not all(isinstance(v, types) and not (isinstance(v, bool) and bool not in types) for v in items):
            raise SpecError(f"{key}: expected a list of {_type_names(types)}, got {value!r}")
        return
    if isinstance(value, bool) and bool not in types:
        raise SpecError(f"{key}: expected {_type_names(types)}, got {value!r}")
    if not isinstance(value, types):
        if float in types and isinstance(value, int):
            return
        raise SpecError(f"{key}: expected {_type_names(types)}, got {value!r}")


def _axis(key: str, value: Any) -> list:
    """The values a key takes: a grid's list, or the one value."""
    if isinstance(value, dict):
        if set(value) != {"grid_search"} or not isinstance(value["grid_search"], list) or not value["grid_search"]:
            raise SpecError(f"{key}: a grid is written {{grid_search: [v1, v2, ...]}} with a non-empty list")
        vals = value["grid_search"]
    else:
        vals = [value]
    for v in vals:
        _check_value(key, v)
    return vals


def _section(name: str, value: Any, allowed: dict) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise SpecError(f"{name}: expected a mapping with keys {', '.join(allowed)}")
    for k, v in value.items():
        if k not in allowed:
            raise SpecError(f"{name}.{k}: unknown key; allowed: {', '.join(allowed)}")
        if not isinstance(v, allowed[k]) or (isinstance(v, bool) and bool not in allowed[k]):
            raise SpecError(f"{name}.{k}: expected {_type_names(allowed[k])}, got {v!r}")
    return value


def resolve_builtin(settings: dict, demo_paths: "tuple[str, str] | None") -> dict:
    """Replace ``builtin:demo`` (model or data file) by the local demo model / corpus."""
    out = dict(settings)
    for key, idx in (("model", 0), ("data_file", 1), ("eval_file", 1)):
        if out.get(key) == BUILTIN_DEMO:
            if demo_paths is None:
                raise SpecError(f"{key}: {BUILTIN_DEMO} needs the demo assets")
            out[key] = demo_paths[idx]
    return out


def uses_demo(raw: dict) -> bool:
    vals = []
    for key in ("model", "data_file", "eval_file"):
        v = raw.get(key)
        vals += v["grid_search"] if isinstance(v, dict) and "grid_search" in v else [v]
    return BUILTIN_DEMO in vals


def parse(raw: Any, *, path: Path | None = None, demo_paths: tuple[str, str] | None = None) -> Sweep:
    """Validate a sweep mapping and expand its grid; raises :class:`SpecError`."""
    if not isinstance(raw, dict):
        raise SpecError("sweep file: expected a mapping of keys to values at the top level")
    for key in raw:
        if key not in TOP_KEYS:
            raise SpecError(f"{key}: unknown key; allowed: {', '.join(sorted(TOP_KEYS))}")
    for key in REQUIRED:
        if key not in raw:
            raise SpecError(f"{key}: required key missing")
    name = raw["name"]
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise SpecError(f"name: expected letters, digits, '_', '-', '.' (at most 64), got {name!r}")
    resources = Resources(**_section("resources", raw.get("resources"), RESOURCE_KEYS))
    if resources.actors_per_model < 1 or resources.gpus_per_actor < 0 or resources.cpus_per_actor < 0:
        raise SpecError("resources: actors_per_model >= 1, gpus_per_actor >= 0, cpus_per_actor >= 0")
    tracking = Tracking(**_section("tracking", raw.get("tracking"), TRACKING_KEYS))
    keys = [k for k in EXPERIMENT_KEYS if k in raw]
    axes = [_axis(k, raw[k]) for k in keys]
    cells: list[Cell] = []
    seen: set[str] = set()
    for combo in itertools.product(*axes):
        settings = {k: (list(v) if isinstance(v, list) else ([v] if EXPERIMENT_KEYS[k][1] else v))
                    for k, v in zip(keys, combo)}
        try:
            config = ExperimentConfig(**resolve_builtin(settings, demo_paths))
        except ConfigError as e:
            raise SpecError(str(e)) from None
        except TypeError as e:
            raise SpecError(f"sweep: {e}") from None
        full = {k: v for k, v in config.to_dict().items() if k != "out_dir"}
        full.update({k: settings[k] for k in ("model", "data_file", "eval_file") if settings.get(k) == BUILTIN_DEMO})
        cid = _hash(full)
        if cid in seen:
            continue
        seen.add(cid)
        cells.append(Cell(cid, full, config))
    return Sweep(name, raw, path, cells, resources, tracking)


def load(path: str | Path, *, demo_paths_fn=None) -> Sweep:
    """Read and validate a sweep file. ``demo_paths_fn`` builds the demo assets on demand."""
    p = Path(path)
    if not p.is_file():
        raise SpecError(f"--sweep: no such file {str(path)!r}")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise SpecError(f"--sweep: {p.name} is not valid YAML ({str(e).splitlines()[0]})") from None
    # validate everything first (a placeholder stands in for the demo assets), so that a typo
    # is reported at once, before the demo model is trained
    sweep = parse(raw, path=p, demo_paths=(BUILTIN_DEMO, __file__))
    if demo_paths_fn is None or not uses_demo(raw):
        return sweep
    return parse(raw, path=p, demo_paths=demo_paths_fn())


def with_out_dir(cell: Cell, root: Path) -> ExperimentConfig:
    return replace(cell.config, out_dir=str(root / cell.id))
