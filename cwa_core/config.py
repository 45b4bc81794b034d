"""The settings of one experiment, validated once; errors name the setting and what is allowed."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path

from .architectures import PARAM_TYPES, DEFAULT_PARAM_TYPES
from .data import BOS_LAYOUTS
from .metrics import METRICS
from .perturb import PERTURBATIONS
from .selection import MODES

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
    eval_samples: int = 64  # held-out evaluation windows (the last of the eval text)
    eval_length: int | None = None  # tokens per evaluation window; default max_length
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

    def __post_init__(self) -> None:
        for name, values in (("controls", self.controls), ("seeds", self.seeds), ("param_types", self.param_types)):
            object.__setattr__(self, name, tuple(values))
        self.validate()

    @property
    def resolved_eval_length(self) -> int:
        return self.eval_length or self.max_length

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
        for key in ("max_samples", "max_length", "eval_samples", "hutchinson_probes", "eval_batch_size", "stability_sample"):
            v = getattr(self, key)
            need(_is_int(v) and v > 0, key, f"must be a positive integer, got {v!r}")
        for key in ("eval_length", "micro_batch"):
            v = getattr(self, key)
            need(v is None or (_is_int(v) and v > 0), key, f"must be a positive integer, got {v!r}")
        need(self.max_length >= 2 and self.resolved_eval_length >= 2, "max_length", "windows need at least 2 tokens")
        need(self.device in DEVICES or str(self.device).startswith("cuda:"), "device",
             f"unknown {self.device!r}; allowed: {', '.join(DEVICES)} (or cuda:N)")
        need(self.dtype in DTYPES, "dtype", f"unknown {self.dtype!r}; allowed: {', '.join(DTYPES)}")
        need(self.bos in BOS_LAYOUTS, "bos", f"unknown {self.bos!r}; allowed: {', '.join(BOS_LAYOUTS)}")
        for t in self.param_types:
            need(t in PARAM_TYPES, "param_types", f"unknown {t!r}; allowed: {', '.join(PARAM_TYPES)}")
        need(len(self.param_types) > 0, "param_types", "at least one parameter type")
        p = PERTURBATIONS.get(self.perturb)
        need(self.perturb_scale is None or p.needs_scale, "perturb_scale",
             f"only {', '.join(n for n in PERTURBATIONS.names() if PERTURBATIONS.get(n).needs_scale)} take a scale")
        need(self.perturb_scale is None or isinstance(self.perturb_scale, (int, float)), "perturb_scale", "must be a number")
        need(self.perturb_bit is None or self.perturb == "bit_flip", "perturb_bit", "only bit_flip takes a bit")
        need(self.perturb_bit is None or (_is_int(self.perturb_bit) and 0 <= self.perturb_bit < 64), "perturb_bit",
             "must be a bit index 0..63 (0..15 for bf16/fp16, 0..31 for fp32)")
        for key in ("data_file", "eval_file"):
            v = getattr(self, key)
            need(v is None or Path(v).is_file(), key, f"no such file {v!r}")

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
