"""Everything a user gives is checked before any work starts.

:class:`~cwa_core.config.ExperimentConfig` validates the settings on their own; this module
checks what needs the files: the model directory holds a config and weights (no weight is
read: shapes come from the config, through a model built on the ``meta`` device), the model's
context holds the windows asked, K fits the weights selected, the bit fits the dtype, the text
files are UTF-8 and hold the windows asked. Every problem is a one-line
:class:`~cwa_core.config.ConfigError` naming the setting and what is allowed, so that the command
exits with status 2 before a model is loaded, Ray or MLflow is started or a results folder is
made.

Checks are cached per model and per corpus, so a sweep of many cells pays each once.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Sequence

import torch

from .architectures import arch_spec, scored_params
from .config import DATA_FIELDS, ConfigError, ExperimentConfig, settings_key
from .data import DataSplit, TokenCache
from .demo import BUILTIN, BUILTIN_KEYS, ensure_demo_assets, resolve_builtin, uses_builtin
from .perturb import PERTURBATIONS, check_bit
from .metrics import UnsupportedTensorError, check_supported
from .models import (ModelLoadError, load_config, load_tokenizer, locate_model, model_context,
                     resolve_device, resolve_dtype)


@dataclass
class ModelFacts:
    """What the checks need to know of a model, read without its weights."""

    model_id: str
    model_type: str
    context: int | None  # tokens (config.max_position_embeddings); None where unstated
    config: object = field(repr=False)
    _sizes: dict = field(default_factory=dict, repr=False)
    _skeleton: object = field(default=None, repr=False)

    def refs(self, param_types: Sequence[str]) -> list:
        """The :class:`~cwa_core.architectures.ParamRef` of every tensor scored for
        ``param_types``, on a model built on the ``meta`` device (shapes and modules, no memory)."""
        key = tuple(param_types)
        if key not in self._sizes:
            from transformers import AutoModelForCausalLM

            if self._skeleton is None:
                with torch.device("meta"):
                    self._skeleton = AutoModelForCausalLM.from_config(self.config)
            self._sizes[key] = scored_params(self._skeleton, key)
        return self._sizes[key]

    def tensor_sizes(self, param_types: Sequence[str]) -> list[tuple[str, int]]:
        """(name, number of weights) of every tensor scored for ``param_types``."""
        return [(r.name, r.numel) for r in self.refs(param_types)]


class Preflight:
    """Checks experiments, remembering what it read (configs, tokenizers, corpora)."""

    def __init__(self) -> None:
        self._facts: dict[tuple, ModelFacts] = {}
        self._tokenizers: dict[tuple, object] = {}
        self._splits: dict[tuple, DataSplit] = {}
        self._tokens: dict[tuple, TokenCache] = {}  # per tokenizer: its corpora tokenized once

    # -- model ---------------------------------------------------------------------------
    def facts(self, cfg: ExperimentConfig) -> ModelFacts:
        key = (cfg.model, cfg.revision, cfg.trust_remote_code)
        if key not in self._facts:
            if cfg.model == BUILTIN:  # known from its recipe before it is first built
                from .demo import demo_config

                config = demo_config()
            else:
                try:
                    config = load_config(locate_model(cfg.model, cfg.revision),
                                         trust_remote_code=cfg.trust_remote_code)
                except ModelLoadError as e:
                    raise ConfigError("model", str(e)) from None
            self._facts[key] = ModelFacts(cfg.model, config.model_type, model_context(config), config)
        return self._facts[key]

    def check_model(self, cfg: ExperimentConfig, *, dtype: torch.dtype | None = None, here: bool = True) -> ModelFacts:
        """Device, context, K and bit against the model's config. ``dtype`` is the dtype the model
        will run in (default: what ``cfg.dtype`` resolves to on this machine); ``here``: the model
        runs on this machine (a sweep's GPU actors may run elsewhere: their device is not checked)."""
        if here:
            try:
                resolve_device(cfg.device)
            except ValueError as e:
                raise ConfigError("device", str(e)) from None
        facts = self.facts(cfg)
        ctx = facts.context
        for key in ("max_length", "eval_length"):
            value = cfg.max_length if key == "max_length" else cfg.resolved_eval_length
            if ctx is not None and value > ctx:
                raise ConfigError(key, f"{value} tokens is above the context of {cfg.model} ({ctx} tokens, "
                                       f"config.max_position_embeddings); allowed: 2..{ctx}")
        sizes = facts.tensor_sizes(cfg.param_types)
        types = ",".join(cfg.param_types)
        if cfg.mode == "global":
            total = sum(n for _, n in sizes)
            if cfg.topk > total:
                raise ConfigError("topk", f"{cfg.topk} is more than the {total:,} weights selected "
                                          f"(param_types {types}); allowed: 1..{total}")
        else:
            name, smallest = min(sizes, key=lambda t: t[1])
            if cfg.topk > smallest:
                raise ConfigError("topk", f"{cfg.topk} per tensor is more than the {smallest:,} weights of {name} "
                                          f"(per_layer mode takes K from every tensor); allowed: 1..{smallest}, "
                                          "or mode global, or param_types without that tensor's type")
        if cfg.detect_super_weights and arch_spec(facts.model_type).down_proj is None:
            raise ConfigError("detect_super_weights", f"{facts.model_type} has no single MLP down projection per "
                                                      "block (its experts are fused); allowed for dense models only")
        try:  # a metric that cannot score one of these tensors says so now, not after the baseline
            check_supported(cfg.metric, facts.refs(cfg.param_types), facts.model_type)
        except UnsupportedTensorError as e:
            raise ConfigError("metric", str(e)) from None
        if PERTURBATIONS.get(cfg.perturb).on_bits:
            try:
                check_bit(cfg.perturb_bit, dtype if dtype is not None else self.run_dtype(cfg))
            except ValueError as e:
                raise ConfigError("perturb_bit", str(e)) from None
        return facts

    @staticmethod
    def run_dtype(cfg: ExperimentConfig, *, gpus: bool | None = None) -> torch.dtype:
        """The dtype the model will run in: ``cfg.dtype``, or what "auto" resolves to on the
        device it will run on (``gpus``: the sweep's actors have GPUs, whatever this machine has)."""
        if cfg.dtype != "auto":  # a named dtype needs no device (a GPU sweep prepared on a CPU head node)
            try:
                return resolve_dtype(cfg.dtype)
            except ValueError as e:
                raise ConfigError("dtype", str(e)) from None
        if gpus is None:
            try:
                return resolve_dtype("auto", resolve_device(cfg.device))
            except ValueError as e:
                raise ConfigError("device", str(e)) from None
        return torch.bfloat16 if gpus else torch.float32

    # -- data ----------------------------------------------------------------------------
    def tokenizer(self, cfg: ExperimentConfig):
        key = (cfg.model, cfg.revision, cfg.trust_remote_code)
        if key not in self._tokenizers:
            try:
                self._tokenizers[key] = load_tokenizer(locate_model(cfg.model, cfg.revision),
                                                       trust_remote_code=cfg.trust_remote_code)
            except ModelLoadError as e:
                raise ConfigError("model", str(e)) from None
        return self._tokenizers[key]

    def tokens(self, cfg: ExperimentConfig) -> TokenCache:
        """The token ids of ``cfg``'s tokenizer, kept across data settings (each text tokenized once)."""
        key = (cfg.model, cfg.revision, cfg.trust_remote_code)
        if key not in self._tokens:
            self._tokens[key] = TokenCache(self.tokenizer(cfg))
        return self._tokens[key]

    def check_data(self, cfg: ExperimentConfig) -> DataSplit:
        """The corpus files read, tokenized and cut as the experiment will: they must hold the
        evaluation windows and (for a data-dependent metric) the calibration windows asked."""
        from .experiment import check_calibration, load_split

        key = (cfg.model, settings_key(cfg, DATA_FIELDS))
        if key not in self._splits:
            if uses_builtin(cfg.to_dict()):
                raise ConfigError("model", f"{BUILTIN} must be resolved (built) before its data is checked")
            self._splits[key] = load_split(cfg, self.tokenizer(cfg), self.tokens(cfg))
        split = self._splits[key]
        check_calibration(cfg, split)
        return split

    def resolve(self, cfg: ExperimentConfig) -> ExperimentConfig:
        """``cfg`` with the protocol's defaults made concrete for its model's context."""
        return cfg.with_context(self.facts(cfg).context)

    # -- the whole sequence ----------------------------------------------------------------
    def prepare(self, configs: Sequence[ExperimentConfig], *, gpus: bool | None = None) -> list[ExperimentConfig]:
        """``configs`` as they will run, every check done before any work (the single command's
        one config, a sweep's cells): each resolved and checked against its model (a typo costs
        no demo build), the demo built if one uses it and those it changed checked again, then
        each one's data. ``gpus``: where the models will run (None: here; True/False: a sweep's
        actors, with or without GPUs, wherever they are). Raises the first ConfigError."""
        def check(cfg: ExperimentConfig) -> None:
            dtype = None if gpus is None else self.run_dtype(cfg, gpus=gpus)
            self.check_model(cfg, dtype=dtype, here=not gpus)

        out = []
        for cfg in configs:
            cfg = self.resolve(cfg)
            check(cfg)
            out.append(cfg)
        if any(uses_builtin(cfg.to_dict()) for cfg in out):
            assets = ensure_demo_assets(progress=True)
            for i, cfg in enumerate(out):
                named = {k: getattr(cfg, k) for k in BUILTIN_KEYS}
                built = resolve_builtin(named, assets)
                if built != named:  # the demo's real folder and corpus: check again
                    out[i] = cfg = replace(cfg, **built)
                    check(cfg)
        for cfg in out:
            self.check_data(cfg)
        return out
