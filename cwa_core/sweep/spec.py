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

from ..config import ConfigError, ExperimentConfig, defaults, sweep_keys


# key -> (python types allowed for one value, is it a list-valued key), from the settings' declarations
# (cwa_core.config), in declaration order: the grid's order
EXPERIMENT_KEYS: dict[str, tuple[tuple[type, ...], bool]] = {k: (v.types, v.is_list) for k, v in sweep_keys().items()}
RESOURCE_KEYS = {"gpus_per_actor": (int, float), "cpus_per_actor": (int, float), "actors_per_model": (int,)}
TRACKING_KEYS = {"experiment": (str,), "tracking_uri": (str, type(None)), "enabled": (bool,)}
RETRY_KEYS = {"task_tries": (int,), "actor_restarts": (int,)}
TOP_KEYS = {"name", "resources", "tracking", "retries", "report", *EXPERIMENT_KEYS}
MAX_FILE_BYTES = 1 << 20  # a sweep file is a page of settings, not data
MAX_NODES = 100_000  # YAML nodes after aliases are expanded (an alias bomb has billions)
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
class Retries:
    task_tries: int = 3  # a task (baseline, scoring, evaluation) runs at most this many times
    actor_restarts: int = 3  # a model's actor is replaced at most this many times (it reloads its model)


@dataclass(frozen=True)
class Cell:
    """One resolved experiment of the grid; ``id`` is :func:`cell_id` of its settings."""

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
    retries: Retries = field(default_factory=Retries)
    report: bool = False  # at the end: the cross-model analysis and the PDF report (analysis/)

    @property
    def spec_hash(self) -> str:
        return _hash({"name": self.name, "cells": sorted(c.id for c in self.cells)})


def _hash(obj: Any, n: int = 12) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


def _plain(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


def non_default(settings: dict) -> dict:
    """The settings that differ from their defaults (the required ones always)."""
    d = defaults()
    return {k: v for k, v in settings.items() if k not in d or _plain(v) != _plain(d[k])}


def cell_id(settings: dict) -> str:
    """A cell's id: a hash of its settings that differ from their defaults, so that a setting
    added to the tool (at its default) leaves every existing cell's id, and folder, as it was.
    A default that changes could give two cells one id: :func:`same_settings` tells them apart
    where a results folder is reused (resume)."""
    return _hash(non_default(settings))


def same_settings(recorded: dict | None, settings: dict) -> bool:
    """Whether a cell recorded with ``recorded`` settings (an older version may lack settings
    added since: those count as their defaults) is the cell ``settings`` describe."""
    if recorded is None:
        return False
    d = defaults()
    return all(_plain(recorded.get(k, d.get(k))) == _plain(v) for k, v in settings.items())


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


def parse(raw: Any, *, path: Path | None = None) -> Sweep:
    """Validate a sweep mapping and expand its grid; raises :class:`SpecError`. Cells keep
    ``builtin:demo`` unresolved (see :func:`resolved`)."""
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
    retries = Retries(**_section("retries", raw.get("retries"), RETRY_KEYS))
    if retries.task_tries < 1 or retries.actor_restarts < 0:
        raise SpecError(f"retries: task_tries >= 1 and actor_restarts >= 0, got {retries.task_tries} and "
                        f"{retries.actor_restarts}")
    keys = [k for k in EXPERIMENT_KEYS if k in raw]
    axes = [_axis(k, raw[k]) for k in keys]
    cells: list[Cell] = []
    seen: set[str] = set()
    for combo in itertools.product(*axes):
        settings = {k: (list(v) if isinstance(v, list) else ([v] if EXPERIMENT_KEYS[k][1] else v))
                    for k, v in zip(keys, combo)}
        try:
            config = ExperimentConfig(**settings)
        except ConfigError as e:
            raise SpecError(str(e)) from None
        except TypeError as e:
            raise SpecError(f"sweep: {e}") from None
        full = {k: v for k, v in config.to_dict().items() if k != "out_dir"}
        cid = cell_id(full)
        if cid in seen:
            continue
        seen.add(cid)
        cells.append(Cell(cid, full, config))
    if not cells:
        raise SpecError("sweep: the grid is empty")
    report = raw.get("report", False)
    if not isinstance(report, bool):
        raise SpecError(f"report: expected bool (true: analyse the results and write the PDF report), got {report!r}")
    return Sweep(name, raw, path, cells, resources, tracking, retries, report)


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader (no Python objects), refusing a key given twice."""


def _mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise SpecError(f"{key}: given twice in the sweep file (line {key_node.start_mark.line + 1})")
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def _expanded_size(node: yaml.Node, memo: dict[int, int]) -> int:
    """Nodes in the document once its aliases are expanded, computed on the alias graph
    (an alias bomb is small as text and as a graph, astronomically large expanded)."""
    key = id(node)
    if key not in memo:
        memo[key] = 0  # a recursive alias counts as 0 here; it is refused when constructed
        if isinstance(node, yaml.SequenceNode):
            total = 1 + sum(_expanded_size(n, memo) for n in node.value)
        elif isinstance(node, yaml.MappingNode):
            total = 1 + sum(_expanded_size(k, memo) + _expanded_size(v, memo) for k, v in node.value)
        else:
            total = 1
        memo[key] = min(total, 10 * MAX_NODES)
    return memo[key]


def read_yaml(p: Path) -> Any:
    """The YAML document in ``p``, safely: size-limited, UTF-8, one document, no duplicate keys,
    no alias expansion beyond :data:`MAX_NODES` nodes."""
    try:
        if p.stat().st_size > MAX_FILE_BYTES:
            raise SpecError(f"--sweep: {p.name} is {p.stat().st_size:,} bytes; a sweep file is at most {MAX_FILE_BYTES:,}")
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise SpecError(f"--sweep: {p.name} is not UTF-8 text (offset {e.start})") from None
    except OSError as e:
        raise SpecError(f"--sweep: cannot read {p.name} ({type(e).__name__})") from None
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, {}) > MAX_NODES:
            raise SpecError(f"--sweep: {p.name} expands (through YAML aliases) to more than {MAX_NODES:,} values; "
                            "write the settings out")
        return loader.construct_document(node)
    except yaml.YAMLError as e:
        first = str(e).replace("\n", " ").strip()
        raise SpecError(f"--sweep: {p.name} is not valid YAML ({' '.join(first.split())[:200]})") from None
    except RecursionError:
        raise SpecError(f"--sweep: {p.name} nests too deeply (a recursive YAML alias?)") from None
    finally:
        loader.dispose()


def load(path: str | Path) -> Sweep:
    """Read and validate a sweep file (``builtin:demo`` left unresolved)."""
    p = Path(path)
    if p.is_dir():
        raise SpecError(f"--sweep: {str(path)!r} is a directory; expected a YAML file")
    if not p.is_file():
        raise SpecError(f"--sweep: no such file {str(path)!r}")
    return parse(read_yaml(p), path=p)


def resolved(sweep: Sweep, configs: dict[str, ExperimentConfig]) -> Sweep:
    """The sweep with its cells' configs replaced (by cell id): made concrete for the model
    (protocol defaults) and the demo resolved. Ids stay those of the settings as written."""
    cells = [Cell(c.id, c.settings, configs.get(c.id, c.config)) for c in sweep.cells]
    return replace(sweep, cells=cells)


def with_out_dir(cell: Cell, root: Path) -> ExperimentConfig:
    return replace(cell.config, out_dir=str(root / cell.id))


def prepare(sweep: Sweep) -> Sweep:
    """The sweep as it will run: every cell checked against its model and data
    (:meth:`cwa_core.preflight.Preflight.prepare`: context, K, bit width, corpus length, files),
    the demo built when a cell uses it, and the protocol's defaults made concrete. Raises
    :class:`SpecError` (one line, naming the key) on the first problem, before Ray, MLflow or a
    results folder exist."""
    from ..preflight import Preflight

    try:
        configs = Preflight().prepare([c.config for c in sweep.cells], gpus=sweep.resources.gpus_per_actor > 0)
    except ConfigError as e:
        raise SpecError(str(e)) from None
    return resolved(sweep, {c.id: cfg for c, cfg in zip(sweep.cells, configs)})
