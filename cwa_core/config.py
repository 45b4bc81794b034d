"""The settings of one experiment, validated once; errors name the setting and what is allowed."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from .architectures import PARAM_TYPES, DEFAULT_PARAM_TYPES
from .data import BOS_LAYOUTS, PROTOCOLS
from .demo import BUILTIN
from .metrics import METRICS
from .perturb import PERTURBATIONS
from .selection import MODES
from .superweights import SuperWeightOptions

CONTROLS = ("random_k", "bottom_k")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "bf16", "fp16", "fp32")


class ConfigError(ValueError):
    """A bad setting. ``key`` is the setting's name (flag or sweep key)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key


@dataclass(frozen=True)
class ExperimentConfig:
    model: str
    metric: str
    topk: int
    out_dir: str | None = None
    mode: str = "per_layer"
    max_samples: int = 30  # calibration windows
    max_length: int = 128  # tokens per calibration window
    eval_samples: int | None = None  # evaluation windows (the last of the eval text); None: the protocol's
    eval_length: int | None = None  # tokens per evaluation window; None: the protocol's default
    protocol: str = "heldout"  # how perplexity is measured: data.PROTOCOLS
    device: str = "auto"
    dtype: str = "auto"
    perturb: str = "sign_flip"
    perturb_scale: float | None = None
    perturb_bit: int | None = None
    controls: tuple[str, ...] = CONTROLS
    seeds: tuple[int, ...] = (0,)
    stability_check: bool = False
    save_plots: bool = False
    data_file: str | None = None
    eval_file: str | None = None
    bos: str = "window"
    param_types: tuple[str, ...] = DEFAULT_PARAM_TYPES
    hutchinson_probes: int = 16
    micro_batch: int | None = None
    eval_batch_size: int = 8
    stability_sample: int = 10_000
    revision: str | None = None
    trust_remote_code: bool = False
    hf_id: str | None = None  # the Hub id of a local copy (published super weights are matched on it)
    # super weights (cwa_core.superweights): detection, causal test, ranks under the metric
    detect_super_weights: bool = False
    super_out_ratio: float = SuperWeightOptions.out_ratio
    super_in_ratio: float = SuperWeightOptions.in_ratio
    super_out_floor: float = SuperWeightOptions.out_floor
    super_in_floor: float = SuperWeightOptions.in_floor
    super_max_rounds: int = SuperWeightOptions.max_rounds
    super_windows: int = 8  # prompts: the first held-out evaluation windows
    super_prompt: str | None = None  # or one prompt, as in the published method

    def __post_init__(self) -> None:
        for name, values in (("controls", self.controls), ("seeds", self.seeds), ("param_types", self.param_types)):
            object.__setattr__(self, name, tuple(values))
        self.validate()

    @property
    def resolved_eval_length(self) -> int:
        """Tokens per evaluation window (for "published" without eval_length: call
        :meth:`with_context` first, the default depends on the model's context)."""
        if self.eval_length is not None:
            return self.eval_length
        if PROTOCOLS[self.protocol].max_default_window is not None:
            raise ValueError(f"protocol {self.protocol}: eval_length depends on the model's context; "
                             "resolve it with with_context() first")
        return self.max_length

    def with_context(self, context: int | None) -> "ExperimentConfig":
        """This config with the protocol's defaults made concrete for a model of ``context``
        tokens: eval_length and eval_samples are what will be measured (and recorded)."""
        p = PROTOCOLS[self.protocol]
        length = self.eval_length
        if length is None:
            length = self.max_length if p.max_default_window is None else min(p.max_default_window, context or p.max_default_window)
        samples = self.eval_samples if self.eval_samples is not None else p.default_eval_samples
        return replace(self, eval_length=length, eval_samples=samples)

    def validate(self) -> None:
        def need(ok: bool, key: str, msg: str) -> None:
            if not ok:
                raise ConfigError(key, msg)

        need(isinstance(self.model, str) and bool(self.model), "model", "a Hugging Face id or a local directory is required")
        need(self.metric in METRICS, "metric", f"unknown {self.metric!r}; allowed: {', '.join(METRICS.names())}")
        need(_is_int(self.topk) and self.topk > 0, "topk", f"must be a positive integer, got {self.topk!r}")
        need(self.mode in MODES, "mode", f"unknown {self.mode!r}; allowed: {', '.join(MODES)}")
        need(self.perturb in PERTURBATIONS, "perturb", f"unknown {self.perturb!r}; allowed: {', '.join(PERTURBATIONS.names())}")
        for c in self.controls:
            need(c in CONTROLS, "controls", f"unknown {c!r}; allowed: {', '.join(CONTROLS)}")
        need(len(set(self.controls)) == len(self.controls), "controls", "a control is listed twice")
        need(len(self.seeds) > 0 and all(_is_int(s) and s >= 0 for s in self.seeds), "seeds",
             f"must be non-negative integers, got {list(self.seeds)!r}")
        need(len(set(self.seeds)) == len(self.seeds), "seeds", "a seed is listed twice")
        need(not self.stability_check or len(self.seeds) >= 2, "stability_check", "needs at least 2 seeds")
        for key in ("max_samples", "max_length", "hutchinson_probes", "eval_batch_size", "stability_sample"):
            v = getattr(self, key)
            need(_is_int(v) and v > 0, key, f"must be a positive integer, got {v!r}")
        for key in ("eval_length", "eval_samples", "micro_batch"):
            v = getattr(self, key)
            need(v is None or (_is_int(v) and v > 0), key, f"must be a positive integer, got {v!r}")
        need(self.max_length >= 2, "max_length", "windows need at least 2 tokens")
        need(self.eval_length is None or self.eval_length >= 2, "eval_length", "windows need at least 2 tokens")
        need(self.protocol in PROTOCOLS, "protocol", f"unknown {self.protocol!r}; allowed: {', '.join(PROTOCOLS)}")
        if PROTOCOLS[self.protocol].all_windows:
            need(self.eval_samples is None, "eval_samples",
                 f"protocol {self.protocol} evaluates every window of the evaluation text; leave eval_samples unset "
                 "(or use protocol heldout)")
        if PROTOCOLS[self.protocol].separate_calibration:
            need((self.data_file is None) == (self.eval_file is None), "data_file",
                 f"protocol {self.protocol} calibrates on a training text and evaluates a separate test text: give "
                 "both data_file (training text) and eval_file (test text), or neither (WikiText-2 train and test)")
            need(self.data_file is None or self.data_file == BUILTIN or self.eval_file == BUILTIN
                 or Path(self.data_file).resolve() != Path(self.eval_file).resolve(), "eval_file",
                 f"protocol {self.protocol} needs an evaluation text other than the calibration text")
        need(self.device in DEVICES or str(self.device).startswith("cuda:"), "device",
             f"unknown {self.device!r}; allowed: {', '.join(DEVICES)} (or cuda:N)")
        need(self.dtype in DTYPES, "dtype", f"unknown {self.dtype!r}; allowed: {', '.join(DTYPES)}")
        need(self.bos in BOS_LAYOUTS, "bos", f"unknown {self.bos!r}; allowed: {', '.join(BOS_LAYOUTS)}")
        # published takes the tokenizer's own layout; only the default "window" passes (recorded as what was used)
        need(PROTOCOLS[self.protocol].layout is None or self.bos == "window", "bos",
             f"protocol {self.protocol} tokenizes the whole text once with the tokenizer's own special tokens (for "
             "Llama one BOS at the start); bos (window or document) applies to protocol heldout only")
        for t in self.param_types:
            need(t in PARAM_TYPES, "param_types", f"unknown {t!r}; allowed: {', '.join(PARAM_TYPES)}")
        need(len(self.param_types) > 0, "param_types", "at least one parameter type")
        p = PERTURBATIONS.get(self.perturb)
        need(self.perturb_scale is None or p.takes_scale, "perturb_scale",
             f"only {', '.join(n for n in PERTURBATIONS.names() if PERTURBATIONS.get(n).takes_scale)} take a scale")
        need(self.perturb_scale is None or (isinstance(self.perturb_scale, (int, float))
                                            and not isinstance(self.perturb_scale, bool)
                                            and math.isfinite(self.perturb_scale)),
             "perturb_scale", f"must be a finite number, got {self.perturb_scale!r}")
        need(self.perturb_bit is None or self.perturb == "bit_flip", "perturb_bit", "only bit_flip takes a bit")
        # the model's width where --dtype says it; "auto" is checked once the model is loaded
        width = {"bf16": 16, "fp16": 16, "fp32": 32}.get(self.dtype, 64)
        need(self.perturb_bit is None or (_is_int(self.perturb_bit) and 0 <= self.perturb_bit < width), "perturb_bit",
             f"must be a bit index 0..{width - 1} for --dtype {self.dtype}, got {self.perturb_bit!r}" if width < 64 else
             f"must be a bit index 0..63 (0..15 for bf16/fp16, 0..31 for fp32), got {self.perturb_bit!r}")
        for key in ("data_file", "eval_file"):
            v = getattr(self, key)
            need(v is None or isinstance(v, str) and bool(v), key, f"expected a file path, got {v!r}")
            if v is not None and v != BUILTIN:
                need(not Path(v).is_dir(), key, f"{v!r} is a directory; expected a UTF-8 text file")
                need(Path(v).is_file(), key, f"no such file {v!r}")
        need(self.hf_id is None or (isinstance(self.hf_id, str) and "/" in self.hf_id), "hf_id",
             f"expected a Hugging Face id like org/name, got {self.hf_id!r}")
        for key in ("super_out_ratio", "super_in_ratio", "super_out_floor", "super_in_floor"):
            v = getattr(self, key)
            need(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0, key,
                 f"must be a finite number >= 0, got {v!r}")
        for key in ("super_max_rounds", "super_windows"):
            v = getattr(self, key)
            need(_is_int(v) and v >= 1, key, f"must be a positive integer, got {v!r}")
        need(self.super_prompt is None or (isinstance(self.super_prompt, str) and self.super_prompt.strip() != ""),
             "super_prompt", "must be a non-empty text")

    def super_weight_options(self) -> SuperWeightOptions:
        return SuperWeightOptions(out_ratio=self.super_out_ratio, in_ratio=self.super_in_ratio,
                                  out_floor=self.super_out_floor, in_floor=self.super_in_floor,
                                  max_rounds=self.super_max_rounds)

    def to_dict(self) -> dict:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in fields(cls)]


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# The settings that decide the data split (tokenized corpora, windows): work keyed by them is shared.
DATA_FIELDS = ("data_file", "eval_file", "bos", "max_length", "eval_length", "eval_samples", "protocol")


def settings_key(cfg: ExperimentConfig, names: tuple[str, ...]) -> tuple:
    """A hashable key of the named settings (lists as tuples)."""
    return tuple((n, tuple(v) if isinstance(v := getattr(cfg, n), (list, tuple)) else v) for n in names)
