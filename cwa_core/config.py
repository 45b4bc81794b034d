"""The settings of one experiment, declared once; errors name the setting and what is allowed.

Each field of :class:`ExperimentConfig` is declared with :func:`setting`: its default, its section,
its help line, which shared work it affects (``passes``) and its own check. Everything else is
derived from these declarations: the command's flags (``orchestrator.build_parser``), the sweep
file's keys and their types (:func:`sweep_keys`), and the keys under which sweep cells share work
(:func:`pass_fields`, used by ``cwa_core.sweep.plan``). Adding a setting is one declaration here
and the code that uses it.
"""
from __future__ import annotations

import math
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from functools import cache
from pathlib import Path
from typing import Any, Callable

from .architectures import PARAM_TYPES, DEFAULT_PARAM_TYPES
from .bit_errors import BIT_CLASSES
from .data import BOS_LAYOUTS, PROTOCOLS
from .demo import BUILTIN
from .metrics import METRICS
from .perturb import PERTURBATIONS
from .prune import GROUPS as PRUNE_GROUPS, check_sparsity
from .quantize import check_bits, parse_group
from .selection import MODES
from .superweights import SuperWeightOptions

from .schema import ARM_KINDS, CAMPAIGNS, CAMPAIGN_SETTINGS, LEVEL_NAMES
from .schema import CONTROL_KINDS as CONTROLS  # the selections that are controls, in their one order
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "bf16", "fp16", "fp32")
SECTIONS = ("model", "data", "scoring", "perturbation", "super weights", "campaign", "output")
# The shared work a setting decides (cwa_core.sweep.plan): the loaded model; the data split (tokenized
# corpora, windows: it also decides every pass below); the baseline evaluation; a scoring pass; a
# super-weight study (its settings also key the scoring pass that ranks its candidates); or only the
# cell's own work (its selections and their evaluations, its outputs), never shared. Every setting
# names at least one: a setting that changes shared work but keys none of it would make cells that
# differ in it silently share a pass.
PASSES = ("model", "data", "eval", "score", "study", "cell")


class ConfigError(ValueError):
    """A bad setting. ``key`` is the setting's name (flag or sweep key)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key


Check = Callable[[Any], "str | None"]  # a value -> what is wrong with it (None: nothing)


@dataclass(frozen=True)
class Setting:
    """What :func:`setting` declares about one field (the field's ``metadata["setting"]``)."""

    section: str
    help: str
    passes: tuple[str, ...] = ()
    choices: Callable[[], list[str]] | None = None  # allowed values, checked (and offered by the command)
    check: Check | None = None  # the field's own rule beyond its type and choices
    flag: bool = True  # a flag of the single command
    sweep: bool = True  # a key of sweep files


def setting(default: Any = MISSING, *, section: str, help: str, passes: tuple[str, ...] = (),
            choices: Callable[[], list[str]] | None = None, check: Check | None = None,
            flag: bool = True, sweep: bool = True):
    """A dataclass field of :class:`ExperimentConfig` with its declaration."""
    assert section in SECTIONS and passes and set(passes) <= set(PASSES), (section, passes)
    meta = {"setting": Setting(section, help, tuple(passes), choices, check, flag, sweep)}
    return field(default=default, metadata=meta)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _positive(v: object) -> str | None:
    return None if v is None or (_is_int(v) and v > 0) else f"must be a positive integer, got {v!r}"


def _window(v: object) -> str | None:
    return _positive(v) or (None if v is None or v >= 2 else "windows need at least 2 tokens")


def _at_least_one(v: object) -> str | None:
    return None if _is_int(v) and v >= 1 else f"must be a positive integer, got {v!r}"


def _nonnegative(v: object) -> str | None:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
    return None if ok else f"must be a finite number >= 0, got {v!r}"


def _share(v: object) -> str | None:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1
    return None if ok else f"must be a number in [0, 1], got {v!r}"


def _finite_or_none(v: object) -> str | None:
    ok = v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v))
    return None if ok else f"must be a finite number, got {v!r}"


def _text_file(v: object) -> str | None:
    if v is None:
        return None
    if not isinstance(v, str) or not v:
        return f"expected a file path, got {v!r}"
    if v != BUILTIN and Path(v).is_dir():
        return f"{v!r} is a directory; expected a UTF-8 text file"
    if v != BUILTIN and not Path(v).is_file():
        return f"no such file {v!r}"
    return None


def _model(v: object) -> str | None:
    return None if isinstance(v, str) and v else "a Hugging Face id or a local directory is required"


def _hf_id(v: object) -> str | None:
    ok = v is None or (isinstance(v, str) and "/" in v)
    return None if ok else f"expected a Hugging Face id like org/name, got {v!r}"


def _device(v: object) -> str | None:
    ok = v in DEVICES or str(v).startswith("cuda:")
    return None if ok else f"unknown {v!r}; allowed: {', '.join(DEVICES)} (or cuda:N)"


def _seeds(v: tuple) -> str | None:
    if not (len(v) > 0 and all(_is_int(s) and s >= 0 for s in v)):
        return f"must be non-negative integers, got {list(v)!r}"
    return "a seed is listed twice" if len(set(v)) != len(v) else None


def _controls(v: tuple) -> str | None:
    return "a control is listed twice" if len(set(v)) != len(v) else None


def _param_types(v: tuple) -> str | None:
    return "at least one parameter type" if len(v) == 0 else None


def _once(v: tuple) -> str | None:
    return "a value is listed twice" if len(set(v)) != len(v) else None


def _rates(v: tuple) -> str | None:
    ok = len(v) > 0 and all(isinstance(r, (int, float)) and not isinstance(r, bool) and 0 <= r <= 1 for r in v)
    return _once(v) if ok else f"must be error rates per bit in [0, 1], got {list(v)!r}"


def _problem(check: Callable[[Any], Any], v: object) -> str | None:
    """What ``check`` (a science module's own check, raising ValueError "<setting>: <problem>") says of ``v``."""
    try:
        check(v)
    except ValueError as e:
        return str(e).split(": ", 1)[-1]
    return None


def _each(check: Callable[[Any], Any]) -> Check:
    """A list setting's check: at least one value, each passing ``check``, none twice."""
    def run(v: tuple) -> str | None:
        if len(v) == 0:
            return "at least one value"
        return next((p for x in v if (p := _problem(check, x))), None) or _once(v)
    return run


def _quant_group(v: object) -> str | None:
    return _problem(parse_group, v) if isinstance(v, str) else f"expected text (tensor, row or a number), got {v!r}"


def _fail_ratio(v: object) -> str | None:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and 1 <= v < math.inf
    return None if ok else f"must be a finite number >= 1 (a trial fails above it), got {v!r}"


def _arms(v: tuple) -> str | None:
    return "at least one arm" if len(v) == 0 else _once(v)


def _prompt(v: object) -> str | None:
    return None if v is None or (isinstance(v, str) and v.strip() != "") else "must be a non-empty text"


_SW = SuperWeightOptions


@dataclass(frozen=True)
class ExperimentConfig:
    model: str = setting(section="model", help="Hugging Face id or local directory", passes=("model",),
                         check=_model)
    metric: str = setting(section="scoring", help="sensitivity metric", passes=("score",),
                          choices=lambda: METRICS.names())
    topk: int = setting(section="scoring", help="K weights to select (per tensor or global)", passes=("cell",),
                        check=_positive)
    mode: str = setting("per_layer", section="scoring", help="top K per tensor, or over the whole model",
                        passes=("cell",), choices=lambda: list(MODES))
    perturb: str = setting("sign_flip", section="perturbation", help="what is done to the selected weights",
                           passes=("cell",), choices=lambda: PERTURBATIONS.names())
    perturb_scale: float | None = setting(None, section="perturbation", passes=("cell",), check=_finite_or_none,
                                          help="gauss_noise: relative std; scale: factor")
    perturb_bit: int | None = setting(None, section="perturbation", passes=("cell",),
                                      help="bit_flip: bit index (default exponent MSB)")
    controls: tuple[str, ...] = setting(CONTROLS, section="perturbation", help="comma-separated: random_k,bottom_k",
                                        passes=("cell",), choices=lambda: list(CONTROLS), check=_controls)
    seeds: tuple[int, ...] = setting((0,), section="scoring", help="comma-separated seeds", passes=("cell",),
                                     check=_seeds)
    max_samples: int = setting(30, section="data", help="calibration windows", passes=("score",), check=_positive)
    max_length: int = setting(128, section="data", help="tokens per calibration window", passes=("data",),
                              check=_window)
    eval_samples: int | None = setting(None, section="data", passes=("data",), check=_positive,
                                       help="evaluation windows (protocol heldout: the last N of the evaluation "
                                            "text, default 64)")
    protocol: str = setting("heldout", section="data", passes=("data",), choices=lambda: list(PROTOCOLS),
                            help="how perplexity is measured: heldout (quick, held-out tail) or published (whole "
                                 "test text, calibration from a training text; comparable with the literature)")
    eval_length: int | None = setting(None, section="data", passes=("data",), check=_window,
                                      help="tokens per evaluation window (default: heldout --max-length; published "
                                           "min(2048, context))")
    data_file: str | None = setting(None, section="data", passes=("data",), check=_text_file,
                                    help="calibration text (default: WikiText-2 test via datasets)")
    eval_file: str | None = setting(None, section="data", passes=("data",), check=_text_file,
                                    help="evaluation text (default: held-out tail of the calibration text)")
    dtype: str = setting("auto", section="model", help="weights' dtype", passes=("model",),
                         choices=lambda: list(DTYPES))
    device: str = setting("auto", section="model", help="auto, cpu, cuda or cuda:N", passes=("model",),
                          check=_device)
    stability_check: bool = setting(False, passes=("cell",), section="output", help="Jaccard/Spearman across seeds")
    save_plots: bool = setting(False, passes=("cell",), section="output", help="write the figures")
    bos: str = setting("window", section="data", passes=("data",), choices=lambda: list(BOS_LAYOUTS),
                       help="protocol heldout: BOS at each window start (one stream) or at each blank-line-separated "
                            "document (published always takes the tokenizer's own special tokens, once per text)")
    param_types: tuple[str, ...] = setting(DEFAULT_PARAM_TYPES, section="scoring", passes=("score",),
                                           choices=lambda: list(PARAM_TYPES), check=_param_types,
                                           help="comma-separated from attention,mlp,norm,embedding,lm_head")
    hutchinson_probes: int = setting(16, section="scoring", help="hutchinson: random probes per window",
                                     passes=("score",), check=_positive)
    micro_batch: int | None = setting(None, section="scoring", help="calibration windows per forward pass",
                                      passes=("score",), check=_positive)
    eval_batch_size: int = setting(8, section="data", help="evaluation windows per forward pass", passes=("eval",),
                                   check=_positive)
    revision: str | None = setting(None, section="model", help="hub revision (branch, tag or commit)",
                                   passes=("model",))
    trust_remote_code: bool = setting(False, section="model", help="run the model repository's own code",
                                      passes=("model",))
    stability_sample: int = setting(10_000, section="scoring", passes=("score",), check=_positive,
                                    help="weights sampled for the Spearman rank correlation across seeds")
    hf_id: str | None = setting(None, section="model", passes=("study",), check=_hf_id,
                                help="the Hugging Face id of a local model copy (published super weights are "
                                     "matched on it)")
    # super weights (cwa_core.superweights): activation-spike detection, causal test, ranks under the metric
    detect_super_weights: bool = setting(False, section="super weights", passes=("study",),
                                         help="write super_weights.json and its figure")
    super_out_ratio: float = setting(_SW.out_ratio, section="super weights", passes=("study",), check=_nonnegative,
                                     help="down-projection |output| spike over its layer's median")
    super_in_ratio: float = setting(_SW.in_ratio, section="super weights", passes=("study",), check=_nonnegative,
                                    help="down-projection |input| spike over its layer's median")
    super_out_floor: float = setting(_SW.out_floor, section="super weights", passes=("study",), check=_nonnegative,
                                     help="absolute floor of the output spike")
    super_in_floor: float = setting(_SW.in_floor, section="super weights", passes=("study",), check=_nonnegative,
                                    help="absolute floor of the input spike")
    super_min_drop: float = setting(_SW.min_drop, section="super weights", passes=("study",), check=_share,
                                    help="share of the output spike that zeroing a candidate must remove")
    super_max_rounds: int = setting(_SW.max_rounds, section="super weights", passes=("study",),
                                    check=_at_least_one, help="zero what was found, look again")
    super_windows: int = setting(8, section="super weights", passes=("study",), check=_at_least_one,
                                 help="prompts: the first N held-out evaluation windows")
    super_prompt: str | None = setting(None, section="super weights", passes=("study",), check=_prompt,
                                       help="or one prompt text (the published method)")
    # Phase 2 (cwa_core.campaign): an intervention on the whole model, each protected set left intact
    campaign: str = setting("none", section="campaign", passes=("cell",), choices=lambda: ["none", *CAMPAIGNS],
                            help="bit_errors, quantize or prune the whole model with each --protect set left "
                                 "intact (none: Phase 1 only)")
    protect: tuple[str, ...] = setting(("none", "top_k", "random_k"), section="campaign", passes=("cell",),
                                       choices=lambda: list(ARM_KINDS), check=_arms,
                                       help="comma-separated arms: the sets left intact (top_k/random_k/bottom_k: "
                                            "--metric, --mode, --topk; super_weights: the detected candidates)")
    error_rate: tuple[float, ...] = setting((1e-6,), section="campaign", passes=("cell",), check=_rates,
                                            help="bit_errors: comma-separated error rates per stored bit")
    trials: int = setting(10, section="campaign", passes=("cell",), check=_positive,
                          help="bit_errors: independent draws per seed and rate (every arm sees each draw)")
    bits: str = setting("all", section="campaign", passes=("cell",), choices=lambda: list(BIT_CLASSES),
                        help="bit_errors: which stored bits may flip")
    quant_bits: tuple[int, ...] = setting((8, 4, 3), section="campaign", passes=("cell",), check=_each(check_bits),
                                          help="quantize: comma-separated bit widths (round to nearest, symmetric)")
    quant_group: str = setting("row", section="campaign", passes=("cell",), check=_quant_group,
                               help="quantize: weights sharing a scale: tensor, row, or N consecutive inputs")
    sparsity: tuple[float, ...] = setting((0.5,), section="campaign", passes=("cell",), check=_each(check_sparsity),
                                          help="prune: comma-separated shares of weights zeroed")
    prune_group: str = setting("row", section="campaign", passes=("cell",), choices=lambda: list(PRUNE_GROUPS),
                               help="prune: where the lowest scores are compared: each output row (Wanda), "
                                    "each tensor, or the whole model")
    fail_ratio: float = setting(2.0, section="campaign", passes=("cell",), check=_fail_ratio,
                                help="a trial fails when its perplexity ratio exceeds this (or is not finite)")
    out_dir: str | None = setting(None, section="output", passes=("cell",), flag=False, sweep=False,
                                  help="output folder (with --sweep: results root, default results/<name>)")

    def __post_init__(self) -> None:
        for name, vt in value_types().items():  # list settings as tuples (sweep files give lists)
            if vt.is_list:
                object.__setattr__(self, name, tuple(getattr(self, name)))
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
        """Each setting's own rule (its declaration), then the rules between settings."""
        for f in fields(self):
            _check_field(f.name, f.metadata["setting"], getattr(self, f.name))
        self._check_protocol()
        self._check_perturbation()
        self._check_campaign()
        if self.stability_check and len(self.seeds) < 2:
            raise ConfigError("stability_check", "needs at least 2 seeds")

    def _check_protocol(self) -> None:
        p = PROTOCOLS[self.protocol]
        if p.all_windows and self.eval_samples is not None:
            raise ConfigError("eval_samples", f"protocol {self.protocol} evaluates every window of the evaluation "
                              "text; leave eval_samples unset (or use protocol heldout)")
        if p.separate_calibration:
            if (self.data_file is None) != (self.eval_file is None):
                raise ConfigError("data_file", f"protocol {self.protocol} calibrates on a training text and evaluates "
                                  "a separate test text: give both data_file (training text) and eval_file (test "
                                  "text), or neither (WikiText-2 train and test)")
            if not (self.data_file is None or self.data_file == BUILTIN or self.eval_file == BUILTIN
                    or Path(self.data_file).resolve() != Path(self.eval_file).resolve()):
                raise ConfigError("eval_file", f"protocol {self.protocol} needs an evaluation text other than the "
                                  "calibration text")
        # published takes the tokenizer's own layout; only the default "window" passes (recorded as what was used)
        if p.layout is not None and self.bos != "window":
            raise ConfigError("bos", f"protocol {self.protocol} tokenizes the whole text once with the tokenizer's "
                              "own special tokens (for Llama one BOS at the start); bos (window or document) applies "
                              "to protocol heldout only")

    def _check_perturbation(self) -> None:
        if self.perturb_scale is not None and not PERTURBATIONS.get(self.perturb).takes_scale:
            scaled = (n for n in PERTURBATIONS.names() if PERTURBATIONS.get(n).takes_scale)
            raise ConfigError("perturb_scale", f"only {', '.join(scaled)} take a scale")
        if self.perturb_bit is None:
            return
        if self.perturb != "bit_flip":
            raise ConfigError("perturb_bit", "only bit_flip takes a bit")
        # the model's width where --dtype says it; "auto" is checked once the model is loaded
        width = {"bf16": 16, "fp16": 16, "fp32": 32}.get(self.dtype, 64)
        if not (_is_int(self.perturb_bit) and 0 <= self.perturb_bit < width):
            raise ConfigError("perturb_bit", f"must be a bit index 0..{width - 1} for --dtype {self.dtype}, got "
                              f"{self.perturb_bit!r}" if width < 64 else "must be a bit index 0..63 (0..15 for "
                              f"bf16/fp16, 0..31 for fp32), got {self.perturb_bit!r}")

    def _check_campaign(self) -> None:
        if self.campaign == "none":
            unused = [k for k in CAMPAIGN_SETTINGS[1:] if getattr(self, k) != _DEFAULTS()[k]]
            if unused:
                raise ConfigError(unused[0], f"a campaign setting, but no campaign is chosen; add campaign "
                                  f"({', '.join(CAMPAIGNS)})")
        elif "super_weights" in self.protect and not self.detect_super_weights:
            raise ConfigError("protect", "super_weights needs the super-weight study: add detect_super_weights")

    @property
    def levels(self) -> tuple:
        """The campaign's levels (error rates, bit widths or sparsities), as given; () without one."""
        return getattr(self, LEVEL_NAMES[self.campaign]) if self.campaign != "none" else ()

    def campaign_trials(self) -> list[tuple[int, float, int]]:
        """(seed, level, trial) of the campaign in the order its rows are kept: seed, level as
        given, trial. bit_errors draws ``trials`` times per seed and rate; quantize and prune are
        deterministic given the protected sets: one trial per seed and level. [] without a campaign."""
        n = self.trials if self.campaign == "bit_errors" else 1
        return [(seed, level, t) for seed in self.seeds for level in self.levels for t in range(n)]

    def super_weight_options(self) -> SuperWeightOptions:
        return SuperWeightOptions(out_ratio=self.super_out_ratio, in_ratio=self.super_in_ratio,
                                  out_floor=self.super_out_floor, in_floor=self.super_in_floor,
                                  min_drop=self.super_min_drop, max_rounds=self.super_max_rounds)

    def to_dict(self) -> dict:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in fields(cls)]


def _check_field(key: str, s: Setting, value: Any) -> None:
    if s.choices is not None:
        allowed = s.choices()
        for v in (value if isinstance(value, tuple) else (value,)):
            if v not in allowed:
                raise ConfigError(key, f"unknown {v!r}; allowed: {', '.join(allowed)}")
    problem = s.check(value) if s.check is not None else None
    if problem:
        raise ConfigError(key, problem)


@dataclass(frozen=True)
class ValueType:
    """A setting's type as written in a sweep file or on the command line, from its annotation."""

    types: tuple[type, ...]  # Python types one value may have (int accepted where float is)
    is_list: bool

    @property
    def item(self) -> type:
        """The type a command-line value is parsed to (not None)."""
        return next(t for t in reversed(self.types) if t is not type(None))


@cache
def value_types() -> dict[str, ValueType]:
    """Every setting's :class:`ValueType`, in declaration order, from the field annotations."""
    hints = typing.get_type_hints(ExperimentConfig)
    out = {}
    for f in fields(ExperimentConfig):
        hint = hints[f.name]
        is_list = typing.get_origin(hint) is tuple
        parts = typing.get_args(hint)[:1] if is_list else (
            typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,))
        ts = tuple(t for p in parts for t in ((int, float) if p is float else (p,)))
        out[f.name] = ValueType(ts, is_list)
    return out


def declared() -> list[tuple[str, Setting]]:
    """(name, declaration) of every setting, in declaration order."""
    return [(f.name, f.metadata["setting"]) for f in fields(ExperimentConfig)]


def sweep_keys() -> dict[str, ValueType]:
    """The experiment keys of a sweep file, with their types, in declaration order (the grid's order)."""
    return {name: value_types()[name] for name, s in declared() if s.sweep}


@cache
def pass_fields(pass_: str) -> tuple[str, ...]:
    """The settings that decide a pass's work: the pass's own, and the data split's for every pass
    that reads data (eval, score, study)."""
    assert pass_ in PASSES, pass_
    wanted = {pass_} | ({"data"} if pass_ in ("eval", "score", "study") else set())
    return tuple(name for name, s in declared() if wanted & set(s.passes))


def defaults() -> dict[str, Any]:
    """Every setting's default (the required ones absent)."""
    return {f.name: f.default for f in fields(ExperimentConfig) if f.default is not MISSING}


_DEFAULTS = cache(defaults)

# The settings that decide the data split (tokenized corpora, windows): work keyed by them is shared.
DATA_FIELDS = pass_fields("data")


def settings_key(cfg: ExperimentConfig, names: tuple[str, ...]) -> tuple:
    """A hashable key of the named settings (lists as tuples)."""
    return tuple((n, tuple(v) if isinstance(v := getattr(cfg, n), (list, tuple)) else v) for n in names)
