"""Super weights (Yu et al. 2024, arXiv:2411.07191): detection by activation spikes, the
causal test, ranks under a metric, and the published coordinates.

A super weight is one entry ``W[row, col]`` of an MLP down projection that turns a massive
input activation (channel ``col``) into a massive output activation (channel ``row``) on a few
tokens; the model depends on that activation. Detection needs forward passes only: the output's
largest |value| gives the row and its token t; the column is read at that same token t (the
paper's Y[t, row] ~ X[t, col] W[row, col]), as the input channel whose term W[row, k] x[t, k]
makes most of the spike; zero the weight and look again.

Convention everywhere: row = output channel, col = input channel, as in ``nn.Linear.weight``
(out, in). GPT-2's ``Conv1D`` stores its weight (in, out); it is translated on the way in and
out, so a coordinate means the same thing for every family.
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from importlib import resources
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from .architectures import ParamRef, UnsupportedArchitectureError, arch_spec, down_projections, scored_params
from .evaluate import Perplexity, eval_mode, logits_of, model_device, perplexity
from .perturb import PerturbSpec, perturbed
from .selection import Selection, sample_without_replacement

log = logging.getLogger(__name__)

CONVENTION = "row = output channel, col = input channel (nn.Linear)"
ZERO = PerturbSpec("zero")

# |activation| histogram for the medians: log2 bins, 16 per octave, over [2^-64, 2^64]; values
# outside (zeros included) land in the end bins. A bin spans a factor 2^(1/16).
_LOG2_LO, _LOG2_HI, _PER_OCTAVE = -64.0, 64.0, 16
_BINS = int((_LOG2_HI - _LOG2_LO) * _PER_OCTAVE)
# activation entries reduced at once: bounds the float32 temporaries (64 MiB each) while keeping
# the kernel launches per batch few (an 8B model's (8, 2048, 14336) input: 14 chunks)
_CHUNK = 1 << 24


@dataclass(frozen=True)
class SuperWeightOptions:
    """Detection thresholds and loop limits (recorded with every result).

    In one round, a layer's down projection proposes a candidate when its largest |output|
    y[t, row] exceeds both ``out_floor`` and ``out_ratio`` x that layer's median |output|. The
    candidate's column is the input channel with the largest term |W[row, k] x[t, k]| at that
    same token t; it is reported only if that input |x[t, col]| exceeds both ``in_floor`` and
    ``in_ratio`` x its median |input| (strictly), and zeroing the weight lowers |y[t, row]| by
    at least ``min_drop`` of itself; otherwise it is recorded as rejected, with its numbers.

    * ``out_ratio`` 1000: Sun et al. 2024 ("Massive activations in large language models") call
      an activation massive at about 1000x the median magnitude (in LLaMA2-7B theirs reach the
      thousands, in channels 1415 and 2533: the rows of its super weights). A spike at the floor
      clears it whenever the median |output| is below 0.05.
    * ``out_floor`` / ``in_floor`` 50: the spike threshold of the super-weight authors' own code.
    * ``in_ratio`` 500: the input that feeds a super weight must be massive too; a spike at the
      floor clears 500x whenever the median |input| is below 0.1. The trained 260K Llama (no
      super weight) stays far below both sides: largest |input| 12.3, up to 103x its median;
      largest |output| 7.4, up to 29x (8 held-out TinyStories windows of 256 tokens).
    * ``min_drop`` 0.25: the share of the output spike at its token that zeroing the weight must
      remove, |y - W[row, col] x[t, col]| <= (1 - min_drop) |y|. It is exact without another
      forward pass: the down projection's input does not depend on its own weight. A weight that
      feeds nothing (share ~0) or whose removal flips the spike's sign without shrinking it
      (share ~2) fails; 0.25 still admits up to four equal weights feeding one row, the first
      of which is found in one round and the others in later ones (Llama-13B's two weights in
      row 2231, Yu et al. Table 2). A rejected spike stays in that layer, so the layer's smaller
      spikes are not examined in that state (the rejection says so in the result).

    Median: of |x| over every (window, position, channel) entry of the layer's down-projection
    input (resp. output) in that round's pass over the prompts, NaN entries left out. It is read
    from a streamed histogram of log2|x| (16 bins per octave, 2^-64..2^64; zeros and smaller
    values in the lowest bin, which reads as 0): the geometric centre of the bin holding the
    lower middle entry, exact to within a factor 2^(1/32) (2.2%). No activation is stored.
    """

    out_ratio: float = 1000.0
    in_ratio: float = 500.0
    out_floor: float = 50.0
    in_floor: float = 50.0
    min_drop: float = 0.25
    max_rounds: int = 8  # rounds that may propose candidates (one more pass measures the last)
    batch_size: int = 8  # prompt windows per forward
    max_positions: int = 1000  # token positions listed per candidate (the count is always given)

    def __post_init__(self) -> None:
        for name in ("out_ratio", "in_ratio", "out_floor", "in_floor"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"super-weight option {name}={v!r}; allowed: a finite number >= 0")
        if not (isinstance(self.min_drop, (int, float)) and 0 <= self.min_drop <= 1):
            raise ValueError(f"super-weight option min_drop={self.min_drop!r}; allowed: a number in [0, 1]")
        for name in ("max_rounds", "batch_size", "max_positions"):
            v = getattr(self, name)
            if not (isinstance(v, int) and v >= 1):
                raise ValueError(f"super-weight option {name}={v!r}; allowed: an integer >= 1")

    def thresholds(self) -> dict:
        return {"out_ratio": self.out_ratio, "in_ratio": self.in_ratio,
                "out_floor": self.out_floor, "in_floor": self.in_floor,
                "pairing": "col = argmax_k |W[row, k] x[t, k]| at the token t of the output spike y[t, row]",
                "min_drop": self.min_drop,
                "min_drop_rule": "reported only if |y[t, row] - W[row, col] x[t, col]| <= (1 - min_drop) |y[t, row]|",
                "median": "of |x| over all (window, position, channel) entries of the layer in that "
                          "round, from a log2 histogram (16 bins per octave, within 2.2%)",
                "max_rounds": self.max_rounds}


@dataclass
class Coordinate:
    """One weight of a down projection: ``module``.weight[row, col] in the nn.Linear convention."""

    layer: int
    row: int
    col: int
    module: str  # e.g. model.layers.1.mlp.down_proj

    @property
    def key(self) -> tuple[int, int, int]:
        return (self.layer, self.row, self.col)


@dataclass
class Candidate(Coordinate):
    """A detected super-weight candidate and the spikes around it."""

    value: float = math.nan  # the weight, before zeroing
    dtype: str = ""
    round: int = 0  # detection round (0: the unmodified model)
    col_rule: str = "input_max"  # or "largest_contribution" (see detect_super_weights)
    rejected: str = ""  # why the proposal is not reported; "" for a reported candidate
    spike_out_before: float = math.nan  # max |output| of channel ``row`` over the prompts
    spike_out_after: float = math.nan  # the same once this round's candidates are zeroed
    spike_in_before: float = math.nan  # max |input| of channel ``col``
    spike_in_after: float = math.nan
    threshold_out: float = math.nan  # the layer's thresholds in that round
    threshold_in: float = math.nan
    contribution: float = math.nan  # W[row, col] x[t, col] / y[t, row]: its share of the spike at token t
    contribution_abs: float = math.nan  # |W[row, col] x[t, col]| at the output spike's token t
    x_at_token: float = math.nan  # x[t, col]: the input that feeds it there
    y_at_token: float = math.nan  # y[t, row]: the output spike
    y_at_token_after: float = math.nan  # y[t, row] - W[row, col] x[t, col]: the output there once it is zeroed
    out_position: tuple[int, int] = (-1, -1)  # (window, position) t of the output spike
    in_position: tuple[int, int] = (-1, -1)  # the input is read at the same token: equal to out_position
    token_positions: list[tuple[int, int]] = field(default_factory=list)  # |y_row| > threshold_out
    n_token_positions: int = 0


@dataclass
class LayerTrace:
    """One down projection across the rounds (one entry per pass)."""

    layer: int
    module: str
    max_out: list[float] = field(default_factory=list)
    max_in: list[float] = field(default_factory=list)
    argmax_out: list[tuple[int, int, int]] = field(default_factory=list)  # (channel, window, position)
    argmax_in: list[tuple[int, int, int]] = field(default_factory=list)
    median_out: list[float] = field(default_factory=list)
    median_in: list[float] = field(default_factory=list)


@dataclass
class Detection:
    candidates: list[Candidate]
    layers: list[LayerTrace]
    rounds: int  # passes run (the last found nothing new, unless not converged)
    converged: bool  # False: max_rounds ran out with spikes left
    options: SuperWeightOptions
    n_windows: int
    length: int
    seconds: float
    refs: list[ParamRef]  # the down projections' weights, by layer (for zeroing)
    rejected: list[Candidate] = field(default_factory=list)  # proposals that failed the check, once each


# --------------------------------------------------------------------------- model plumbing


class _StopForward(Exception):
    """Raised by the deepest hook: later layers and the (B, L, V) logits are never computed."""


def _down_proj_refs(model: nn.Module) -> list[tuple[int, str, nn.Module, ParamRef]]:
    """(layer, module name, module, weight ref) of every down projection (architecture table)."""
    spec = arch_spec(model)
    if spec.down_proj is None:
        raise UnsupportedArchitectureError(
            f"super-weight detection does not support model_type {model.config.model_type!r}: a mixture of "
            "experts keeps all its experts' down projections in one fused 3-D parameter (transformers 5), "
            "with no module per expert to hook")
    projections = down_projections(model)
    by_module = {id(r.module): r for r in scored_params(model, ("mlp",)) if r.leaf == "weight"}
    out = []
    for layer, mod in projections:
        ref = by_module[id(mod)]
        if ref.in_dim is None:
            raise ValueError(f"{ref.name} is not a linear weight; cannot locate rows and columns")
        out.append((layer, f"{spec.layers}.{layer}.{spec.down_proj}", mod, ref))
    return out


def down_proj_shapes(model: nn.Module) -> dict[int, tuple[int, int]]:
    """layer -> (out channels, in channels) of its down projection (nn.Linear convention)."""
    return {layer: _linear_shape(ref) for layer, _, _, ref in _down_proj_refs(model)}


def _linear_shape(ref: ParamRef) -> tuple[int, int]:
    a, b = ref.shape
    return (a, b) if ref.in_dim == 1 else (b, a)  # Conv1D stores (in, out)


def _flat_index(ref: ParamRef, row: int, col: int) -> int:
    rows, cols = _linear_shape(ref)
    return row * cols + col if ref.in_dim == 1 else col * rows + row


def _weight_row(ref: ParamRef, row: int) -> torch.Tensor:
    """W[row, :] in the nn.Linear convention: (in channels,)."""
    w = ref.param.detach()
    return w[row] if ref.in_dim == 1 else w[:, row]


def _selection(refs: Sequence[ParamRef], items: Sequence[tuple[int, int]]) -> Selection:
    """A selection of (tensor id, flat index) pairs, for :func:`perturbed`."""
    tids = torch.tensor([t for t, _ in items], dtype=torch.long)
    flat = torch.tensor([i for _, i in items], dtype=torch.long)
    return Selection("super_weight", "global", len(items), tids, flat, torch.full((len(items),), math.nan))


def _windows(prompts: torch.Tensor) -> torch.Tensor:
    if prompts.dim() == 1:
        prompts = prompts[None]
    if prompts.dim() != 2 or prompts.shape[1] < 1 or prompts.dtype != torch.long:
        raise ValueError(f"prompts must be an (N, L) int64 tensor of token ids, got {tuple(prompts.shape)} "
                         f"{prompts.dtype}")
    return prompts


def _forward_pass(model: nn.Module, windows: torch.Tensor, batch_size: int,
                  hooks: Mapping[nn.Module, Callable[[torch.Tensor, torch.Tensor, int], None]],
                  stop: nn.Module) -> None:
    """Run ``windows`` through the model; ``hooks[m](x_in, y_out, first_window)`` sees each hooked
    module's (B, L, C) input and output. The forward ends after module ``stop``."""
    offset = [0]

    def make(fn, is_stop):
        def hook(module, args, out):
            fn(args[0].detach(), (out[0] if isinstance(out, tuple) else out).detach(), offset[0])
            if is_stop:
                raise _StopForward
        return hook

    handles = [m.register_forward_hook(make(fn, m is stop)) for m, fn in hooks.items()]
    device = model_device(model)
    try:
        with torch.no_grad():
            for s in range(0, windows.shape[0], batch_size):
                offset[0] = s
                try:
                    logits_of(model, windows[s:s + batch_size].to(device))
                except _StopForward:
                    pass
    finally:
        for h in handles:
            h.remove()


# --------------------------------------------------------------------------- streaming statistics


class _Spikes:
    """Running max |x| (with where), per-channel max |x| and a log2 histogram of one layer's
    input or output over a pass; memory: one (C,) vector and _BINS counts."""

    def __init__(self) -> None:
        self.max = -1.0
        self.where = (-1, -1, -1)  # (channel, window, position)
        self.signed = math.nan  # x at the max
        self.chan: torch.Tensor | None = None
        self.hist: torch.Tensor | None = None

    def update(self, x: torch.Tensor, offset: int) -> bool:
        """Fold in a (B, L, C) batch whose first window is ``offset``; True if the max moved."""
        b, length, c = x.shape
        flat = x.reshape(-1, c)
        if self.hist is None:
            self.hist = torch.zeros(_BINS, dtype=torch.float64, device=x.device)
            self.chan = torch.zeros(c, dtype=torch.float32, device=x.device)
        tok_max, tok_arg = [], []
        rows = max(1, _CHUNK // c)
        for s in range(0, flat.shape[0], rows):
            a = flat[s:s + rows].abs().float()  # (rows, C)
            # histc leaves NaN out; log2(0) = -inf and inf clamp into the end bins
            self.hist += torch.histc(torch.log2(a).clamp_(_LOG2_LO, _LOG2_HI), _BINS, _LOG2_LO, _LOG2_HI).double()
            a.nan_to_num_(nan=-1.0, posinf=math.inf)  # NaN is never a spike; inf is one
            m, i = a.max(dim=1)
            tok_max.append(m)
            tok_arg.append(i)
            torch.maximum(self.chan, a.amax(dim=0), out=self.chan)
        tm = torch.cat(tok_max)
        t = int(tm.argmax())
        best = float(tm[t])
        if best <= self.max:
            return False
        ch = int(torch.cat(tok_arg)[t])
        self.max = best
        self.where = (ch, offset + t // length, t % length)
        self.signed = float(flat[t, ch])
        return True

    def median(self) -> float:
        h = self.hist.cpu()
        total = float(h.sum())
        if total == 0:
            return math.nan
        b = int(torch.searchsorted(torch.cumsum(h, 0), (total + 1) // 2))  # lower middle entry
        return 0.0 if b == 0 else 2.0 ** (_LOG2_LO + (b + 0.5) / _PER_OCTAVE)


class _LayerPass:
    """Both sides of one down projection in one pass, and the input row at the output spike."""

    def __init__(self) -> None:
        self.x = _Spikes()
        self.y = _Spikes()
        self.x_at_out_max: torch.Tensor | None = None  # (in channels,) at the output spike's token

    def __call__(self, x: torch.Tensor, y: torch.Tensor, offset: int) -> None:
        self.x.update(x, offset)
        if self.y.update(y, offset):
            _, w, p = self.y.where
            self.x_at_out_max = x[w - offset, p].float().clone()


def _threshold(ratio: float, floor: float, median: float) -> float:
    return max(floor, ratio * median) if not math.isnan(median) else math.nan


# --------------------------------------------------------------------------- detection


def detect_super_weights(model: nn.Module, prompts: torch.Tensor,
                         opts: SuperWeightOptions = SuperWeightOptions()) -> Detection:
    """Find super-weight candidates in every layer's down projection, iteratively.

    ``prompts``: (N, L) int64 token windows (a single prompt (L,) or (1, L) works too). Round
    ``k`` runs the prompts with every candidate of rounds < k zeroed (restored bit for bit
    afterwards). In each layer whose output spikes (:class:`SuperWeightOptions`), row = the
    channel of the largest |output| y[t, row] and t its token; col = the input channel whose
    term |W[row, k] x[t, k]| is largest at that same token. The paper pairs them the same way
    (Yu et al. 2024, section 3.1: Y[t, row] ~ X[t, col] W[row, col]); reading col at t, and by
    the term rather than by |x[t, k]| alone, keeps a larger input spike elsewhere (another
    token) or one whose column feeds this row nothing from being taken for the source. Where the
    two readings agree ``col_rule`` is "input_max", else "largest_contribution" (e.g. the row
    still spikes after its first weight is zeroed: Llama-13B's two weights in one row). The
    candidate is reported only if x[t, col] passes the input threshold and zeroing it lowers
    |y[t, row]| by at least ``min_drop``; otherwise it goes to ``Detection.rejected`` with its
    numbers (once per coordinate) and is not zeroed. The loop ends when a round reports nothing
    new or after ``max_rounds``; one more pass then measures the spikes that the last round's
    removals leave. Each new candidate's token positions (|output of its row| > the threshold)
    come from one extra pass over the prompts in the same state. Memory: per layer a few
    channel vectors and a histogram.
    """
    with eval_mode(model):
        return _detect(model, _windows(prompts), opts)


def _detect(model: nn.Module, windows: torch.Tensor, opts: SuperWeightOptions) -> Detection:
    t0 = time.perf_counter()
    targets = _down_proj_refs(model)
    refs = [ref for *_, ref in targets]
    traces = [LayerTrace(layer, name) for layer, name, _, _ in targets]
    found: list[Candidate] = []
    rejected: dict[tuple[int, int, int], Candidate] = {}
    zeroed: list[tuple[int, int]] = []  # (tensor id, flat index) of found candidates
    last_new: list[Candidate] = []
    converged = False
    rounds = 0
    for rnd in range(opts.max_rounds + 1):
        with perturbed(refs, _selection(refs, zeroed), ZERO):
            passes = [_LayerPass() for _ in targets]
            _forward_pass(model, windows, opts.batch_size,
                          {mod: lp for (_, _, mod, _), lp in zip(targets, passes)}, targets[-1][2])
            rounds += 1
            for trace, lp in zip(traces, passes):
                trace.max_out.append(lp.y.max)
                trace.max_in.append(lp.x.max)
                trace.argmax_out.append(lp.y.where)
                trace.argmax_in.append(lp.x.where)
                trace.median_out.append(lp.y.median())
                trace.median_in.append(lp.x.median())
            for cand in last_new:  # what removing the previous round's candidates left
                lp = passes[cand.layer]
                cand.spike_out_after = float(lp.y.chan[cand.row])
                cand.spike_in_after = float(lp.x.chan[cand.col])
            proposed = [c for tgt, lp, trace in zip(targets, passes, traces)
                        if (c := _propose(tgt, lp, trace, found, rnd, opts)) is not None]
            for c in proposed:
                if c.rejected and c.key not in rejected:
                    rejected[c.key] = c
                    log.info("super weights round %d: %s rejected: %s", rnd, c.key, c.rejected)
            new = [c for c in proposed if not c.rejected]
            if not new:
                converged = True
                break
            if rnd == opts.max_rounds:  # measuring pass only: spikes remain
                break
            _token_positions(model, windows, targets, new, opts)
        for c in new:  # refs are indexed by layer (down_projections lists every block in order)
            zeroed.append((c.layer, _flat_index(refs[c.layer], c.row, c.col)))
        found.extend(new)
        last_new = new
        log.info("super weights round %d: %s", rnd, [c.key for c in new])
    if not converged:
        log.warning("super-weight detection stopped after max_rounds=%d with spikes left", opts.max_rounds)
    return Detection(found, traces, rounds, converged, opts, windows.shape[0], windows.shape[1],
                     time.perf_counter() - t0, refs, list(rejected.values()))


def _propose(target, lp: _LayerPass, trace: LayerTrace, found: Sequence[Candidate], rnd: int,
             opts: SuperWeightOptions) -> Candidate | None:
    """This round's proposal of one layer: None when its output does not spike, else a
    :class:`Candidate` whose ``rejected`` says why it fails the check ("" when it passes; see
    :func:`detect_super_weights`)."""
    layer, name, _, ref = target
    thr_out = _threshold(opts.out_ratio, opts.out_floor, trace.median_out[-1])
    thr_in = _threshold(opts.in_ratio, opts.in_floor, trace.median_in[-1])
    if not lp.y.max > thr_out:  # a NaN threshold compares False
        return None
    row, position = lp.y.where[0], lp.y.where[1:]
    x_t = lp.x_at_out_max  # (in channels,) the input at the output spike's token t
    w_row = _weight_row(ref, row).float()
    terms = (w_row * x_t).abs().nan_to_num_(nan=-1.0)  # |W[row, k] x[t, k]|, (in channels,)
    taken = [c.col for c in found if c.layer == layer and c.row == row]
    terms[taken] = -1.0  # zeroed already (their terms are 0 in this state anyway)
    col = int(terms.argmax())
    if not float(terms[col]) >= 0:
        return None  # nothing left to attribute the spike to
    rule = "input_max" if col == int(x_t.abs().nan_to_num(nan=-1.0).argmax()) else "largest_contribution"
    value, x_col, y_t = float(w_row[col]), float(x_t[col]), lp.y.signed
    after = y_t - value * x_col  # exact: the down projection's input does not depend on its own weight
    rejected = ""
    if not math.isfinite(y_t):
        rejected = f"the output spike y[t, {row}] = {y_t} is not finite: its share cannot be measured"
    elif value * x_col == 0:
        rejected = (f"no input channel feeds y[t, {row}]: every term W[{row}, k] x[t, k] is 0 (a bias, or zeroed "
                    "weights)")
    elif not abs(x_col) > thr_in:
        rejected = (f"input |x[t, {col}]| = {abs(x_col):.4g} at the output spike's token is not above the input "
                    f"threshold {thr_in:.4g}")
    elif not abs(after) <= (1 - opts.min_drop) * abs(y_t):
        rejected = (f"zeroing it leaves |y[t, {row}]| = {abs(after):.4g} of {abs(y_t):.4g} (removes "
                    f"{1 - abs(after) / abs(y_t):.3g} of the spike; min_drop {opts.min_drop:g}); this layer's "
                    "smaller spikes are not examined while this one stands")
    return Candidate(layer, row, col, name, value=value, dtype=str(ref.param.dtype).removeprefix("torch."),
                     round=rnd, col_rule=rule, rejected=rejected, spike_out_before=float(lp.y.chan[row]),
                     spike_in_before=float(lp.x.chan[col]), threshold_out=thr_out, threshold_in=thr_in,
                     contribution=value * x_col / y_t if y_t else math.nan, contribution_abs=abs(value * x_col),
                     x_at_token=x_col, y_at_token=y_t, y_at_token_after=after,
                     out_position=position, in_position=position)


def _capture_rows(model: nn.Module, windows: torch.Tensor, batch_size: int,
                  targets: Sequence, rows: Sequence[tuple[int, int]]) -> dict[tuple[int, int], torch.Tensor]:
    """Output channel ``row`` of layer ``layer``'s down projection at every token: (N, L) float32
    per requested (layer, row); the forward stops after the deepest of those layers."""
    n, length = windows.shape
    out = {key: torch.empty(n, length) for key in rows}
    by_layer: dict[int, list[int]] = {}
    for layer, row in rows:
        by_layer.setdefault(layer, []).append(row)

    def hook_for(layer):
        def fn(x, y, offset):
            for row in by_layer[layer]:
                out[(layer, row)][offset:offset + y.shape[0]] = y[..., row].float().cpu()
        return fn

    mods = {layer: mod for layer, _, mod, _ in targets}
    _forward_pass(model, windows, batch_size, {mods[layer]: hook_for(layer) for layer in by_layer},
                  mods[max(by_layer)])
    return out


def _token_positions(model, windows, targets, new: Sequence[Candidate], opts: SuperWeightOptions) -> None:
    rows = _capture_rows(model, windows, opts.batch_size, targets, sorted({(c.layer, c.row) for c in new}))
    for c in new:
        pos = torch.nonzero(rows[(c.layer, c.row)].abs() > c.threshold_out)
        c.n_token_positions = pos.shape[0]
        c.token_positions = [tuple(p) for p in pos[:opts.max_positions].tolist()]


# --------------------------------------------------------------------------- the causal test


@dataclass
class CausalTest:
    baseline: Perplexity
    candidates: list[dict]  # per candidate, in detection order
    all: dict
    seeds: tuple[int, ...]
    seconds: float


class _Restore:
    """Forward hooks writing recorded outputs back at chosen tokens: per module, a list of
    (row, (N, L) mask, (N, L) values). Batches must come in window order, each once (as
    :func:`~cwa_core.evaluate.perplexity` does); ``offsets`` checks that afterwards."""

    def __init__(self, plan: Mapping[nn.Module, list[tuple[int, torch.Tensor, torch.Tensor]]]) -> None:
        self.plan = plan
        self.offsets = {m: 0 for m in plan}

    @contextlib.contextmanager
    def active(self, n_windows: int) -> Iterator[None]:
        handles = [m.register_forward_hook(self._hook) for m in self.plan]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
        bad = {o for o in self.offsets.values() if o != n_windows}
        if bad:
            raise RuntimeError(f"restore hooks saw {bad} windows, expected {n_windows}")

    def _hook(self, module, args, out):
        y = out[0] if isinstance(out, tuple) else out
        s = self.offsets[module]
        self.offsets[module] = s + y.shape[0]
        for row, mask, vals in self.plan[module]:
            m = mask[s:s + y.shape[0]].to(y.device)
            y[..., row] = torch.where(m, vals[s:s + y.shape[0]].to(y.device, y.dtype), y[..., row])
        return out


def causal_test(model: nn.Module, detection: Detection, eval_windows: torch.Tensor, *,
                seeds: Sequence[int] = (0, 1, 2), batch_size: int = 8, progress: bool = False) -> CausalTest:
    """Perplexity on held-out ``eval_windows`` (N, L) with each candidate (and all of them) zeroed;
    with as many random weights of the same tensors zeroed (one draw per seed; the candidates
    themselves never drawn); and zeroed but with the original massive activation written back
    (output channel ``row`` of its down projection, only at the tokens where the original
    |output| there exceeded the detection threshold ``threshold_out``)."""
    with eval_mode(model):
        return _causal(model, detection, eval_windows, tuple(seeds), batch_size, progress)


def _causal(model, detection, eval_windows, seeds, batch_size, progress) -> CausalTest:
    t0 = time.perf_counter()
    refs = detection.refs
    targets = [(r.layer, r.name.rpartition(".")[0], r.module, r) for r in refs]  # as _down_proj_refs gives them
    mods = {r.layer: r.module for r in refs}
    ppl = functools.partial(perplexity, model, eval_windows, batch_size=batch_size, progress=progress)
    base = ppl(desc="baseline ppl")
    cands = detection.candidates
    if not cands:
        return CausalTest(base, [], _causal_row(base, [], None, None, None), seeds, time.perf_counter() - t0)
    orig = _capture_rows(model, eval_windows, batch_size, targets, sorted({(c.layer, c.row) for c in cands}))
    flat = {c.key: _flat_index(refs[c.layer], c.row, c.col) for c in cands}

    def evaluate(group: Sequence[Candidate]) -> dict:
        items = [(c.layer, flat[c.key]) for c in group]
        with perturbed(refs, _selection(refs, items), ZERO):
            zeroed = ppl(desc="ppl zeroed")
            plan: dict[nn.Module, list] = {}
            n_pos = 0
            for (layer, row), thr in _restore_rows(group).items():
                vals = orig[(layer, row)]
                mask = vals.abs() > thr
                n_pos += int(mask.sum())
                plan.setdefault(mods[layer], []).append((row, mask, vals))
            restore = _Restore(plan)
            with restore.active(eval_windows.shape[0]):
                restored = ppl(desc="ppl restored")
        randoms = {}
        for seed in seeds:
            with perturbed(refs, _selection(refs, _random_like(refs, items, seed)), ZERO):
                randoms[seed] = ppl(desc=f"ppl random seed {seed}")
        return _causal_row(base, group, zeroed, randoms, restored, n_pos)

    rows = [evaluate([c]) for c in cands]
    together = rows[0] if len(cands) == 1 else evaluate(cands)  # one candidate: the same evaluations
    return CausalTest(base, rows, together, seeds, time.perf_counter() - t0)


def _restore_rows(group: Sequence[Candidate]) -> dict[tuple[int, int], float]:
    """(layer, row) -> threshold of its earliest candidate: one write-back per output channel."""
    out: dict[tuple[int, int], float] = {}
    for c in sorted(group, key=lambda c: c.round):
        out.setdefault((c.layer, c.row), c.threshold_out)
    return out


def _random_like(refs: Sequence[ParamRef], items: Sequence[tuple[int, int]], seed: int) -> list[tuple[int, int]]:
    """As many uniform draws per tensor as ``items`` has there, never an item itself."""
    per: dict[int, set[int]] = {}
    for t, i in items:
        per.setdefault(t, set()).add(i)
    out = []
    for t, taken in sorted(per.items()):
        rng = np.random.default_rng([seed, 0x5E1EC7, 0x5B, t])  # own stream per tensor and seed
        draw = sample_without_replacement(refs[t].numel, min(refs[t].numel, 2 * len(taken)), rng)
        out.extend((t, int(i)) for i in [d for d in draw if int(d) not in taken][:len(taken)])
    return out


def _causal_row(base: Perplexity, group, zeroed: Perplexity | None, randoms: Mapping[int, Perplexity] | None,
                restored: Perplexity | None, n_pos: int = 0) -> dict:
    def ppl_ratio(p: Perplexity | None) -> tuple[float | None, float | None]:
        return (None, None) if p is None else (p.ppl, p.ppl / base.ppl)

    rnd, r_ratio = None, None
    if randoms:
        rnd = {"mean": float(np.mean([p.ppl for p in randoms.values()])),
               "per_seed": {str(s): p.ppl for s, p in randoms.items()}}
        r_ratio = rnd["mean"] / base.ppl
    recovered = None
    if zeroed is not None and restored is not None:
        damage = zeroed.nll - base.nll
        recovered = (zeroed.nll - restored.nll) / damage if damage > 0 else math.nan
    (z, z_ratio), (r, rs_ratio) = ppl_ratio(zeroed), ppl_ratio(restored)
    return {"n": len(group), "ppl_zeroed": z, "ratio_zeroed": z_ratio, "ppl_random": rnd, "ratio_random": r_ratio,
            "ppl_restored": r, "ratio_restored": rs_ratio,
            "recovered_fraction": recovered,  # share of the NLL increase undone by the write-back
            "restored_positions": n_pos}


# --------------------------------------------------------------------------- ranks under a metric


class CandidateRanks:
    """Score sink ranking tracked weights under one metric and seed; tee it with a collector:
    ``lambda r, s: (collector(r, s), ranks(r, s))``.

    ``per_tensor``: 1 + the number of scores of its own tensor strictly larger than its score
    (ties share the best rank, so it can differ from a position in a top-K selection, which breaks
    ties by lowest index). ``global``: the same over every scored tensor, exact while fewer than
    ``keep`` scores are larger (the ``keep`` largest scores overall are kept as a running merge);
    otherwise ``global`` is None and ``global_lower_bound`` is ``keep + 1``. NaN scores never
    count as larger; a tracked weight scoring NaN gets no rank. Tracked: ``candidates`` plus
    ``extra`` (e.g. published coordinates), anything with layer, row, col and module.
    """

    def __init__(self, refs: Sequence[ParamRef], candidates: Sequence[Coordinate], keep: int = 10_000,
                 extra: Sequence[Coordinate] = ()) -> None:
        if keep < 1:
            raise ValueError(f"keep={keep}; allowed: an integer >= 1")
        self.keep = keep
        self._top = torch.empty(0)
        by_name = {r.name: r for r in refs}
        self._tracked: dict[tuple[int, int, int], dict] = {}
        self._by_tensor: dict[str, list[tuple[tuple[int, int, int], int]]] = {}
        for c in [*candidates, *extra]:
            if c.key in self._tracked:
                continue
            entry = {"layer": c.layer, "row": c.row, "col": c.col, "module": c.module, "score": math.nan,
                     "per_tensor": None, "global": None, "global_lower_bound": None, "scored": False}
            self._tracked[c.key] = entry
            ref = by_name.get(c.module + ".weight")
            if ref is not None and ref.in_dim is not None:
                rows, cols = _linear_shape(ref)
                if 0 <= c.row < rows and 0 <= c.col < cols:
                    self._by_tensor.setdefault(ref.name, []).append((c.key, _flat_index(ref, c.row, c.col)))

    def __call__(self, ref: ParamRef, scores: torch.Tensor) -> None:
        flat = scores.detach().reshape(-1).float()
        if bool(flat.isnan().any()):
            flat = torch.where(flat.isnan(), float("-inf"), flat)
        k = min(self.keep, flat.numel())
        top = torch.topk(flat, k, sorted=False).values.cpu()
        merged = torch.cat([self._top, top])
        self._top = torch.topk(merged, min(self.keep, merged.numel()), sorted=False).values
        for key, idx in self._by_tensor.get(ref.name, ()):
            e = self._tracked[key]
            v = scores.detach().reshape(-1)[idx].float()
            e["scored"] = True
            e["score"] = float(v)
            if not bool(v.isnan()):
                e["per_tensor"] = int((flat > v).sum()) + 1

    def entries(self) -> list[dict]:
        """One dict per tracked weight: layer, row, col, module, score, per_tensor, global,
        global_lower_bound (ranks None where the tensor was never scored or the score is NaN)."""
        out = []
        for e in self._tracked.values():
            e = dict(e)
            if e["per_tensor"] is not None:
                larger = int((self._top > e["score"]).sum())
                if larger < self.keep:
                    e["global"] = larger + 1
                else:
                    e["global_lower_bound"] = self.keep + 1
            out.append(e)
        return out

    def rank(self, layer: int, row: int, col: int) -> dict:
        """{"per_tensor", "global", "global_lower_bound"} of one tracked weight."""
        return RankTable(self.entries()).rank(layer, row, col)


RankSinks = Mapping[str, Mapping[int | str, CandidateRanks]]  # metric -> seed -> sink


def _ranks_of(key: tuple[int, int, int], ranks: RankSinks | None) -> dict:
    if not ranks:
        return {}
    return {metric: {str(seed): sink.rank(*key) for seed, sink in by_seed.items()}
            for metric, by_seed in ranks.items()}


# --------------------------------------------------------------------------- published coordinates

# Registry statuses (cwa_core/known_super_weights.json): only "published" (Yu et al. 2024, its
# Table 2, its text or its authors' code) counts as published; "reported_by" (another named
# study) is matched and listed apart.
PUBLISHED, REPORTED_BY = "published", "reported_by"
STATUSES = (PUBLISHED, REPORTED_BY)


@functools.lru_cache(maxsize=1)
def known_super_weights() -> dict:
    """The registry of super-weight coordinates (cwa_core/known_super_weights.json), as loaded."""
    return json.loads(resources.files("cwa_core").joinpath("known_super_weights.json").read_text("utf-8"))


def _listed(hf_id: str | None) -> str | None:
    """The table's key for exactly ``hf_id`` or a listed alias of it; never a substring match."""
    table = known_super_weights()
    key = table["aliases"].get(hf_id, hf_id)
    return key if key in table["models"] else None


def registry_entries(hf_id: str | None, status: str | None = None) -> list[dict]:
    """The registry's entries for exactly ``hf_id`` (or an alias): dicts with ``coordinate``
    [L, row, col], ``status`` and ``sources``; only those of ``status`` when given; [] when the
    id is not listed."""
    if status is not None and status not in STATUSES:
        raise ValueError(f"status {status!r}; allowed: {', '.join(STATUSES)}")
    key = _listed(hf_id)
    if key is None:
        return []
    return [e for e in known_super_weights()["models"][key]["entries"] if status is None or e["status"] == status]


def published_coordinates(model_or_type: nn.Module | str, hf_id: str | None,
                          status: str = PUBLISHED) -> list[Coordinate]:
    """The super weights of ``hf_id`` with registry ``status`` (published by default; or
    "reported_by") as coordinates of this architecture's down projections (to track with
    :class:`CandidateRanks`); [] when the id is not listed or has none of that status."""
    entries = registry_entries(hf_id, status)
    if not entries:
        return []
    spec = arch_spec(model_or_type)
    return [Coordinate(layer, row, col, f"{spec.layers}.{layer}.{spec.down_proj}")
            for layer, row, col in (e["coordinate"] for e in entries)]


def match_published(hf_id: str | None, candidates: Sequence[Coordinate], ranks: RankSinks | None = None, *,
                    shapes: Mapping[int, tuple[int, int]]) -> dict | None:
    """Compare detected ``candidates`` with the registry's coordinates of ``hf_id`` (the exact id
    or a listed alias); None when it is not listed. ``found``, ``missed``, ``outside_shape`` and
    ``new`` (candidates not published) count only ``published`` entries; the ``reported_by``
    ones (another study) get their own found / missed / outside_shape. ``shapes``: layer ->
    (rows, cols) of this model's down projections (:func:`down_proj_shapes`); a coordinate
    outside them means another checkpoint. ``ranks``: metric -> seed -> :class:`CandidateRanks`
    built with :func:`published_coordinates` of both statuses as ``extra``."""
    key = _listed(hf_id)
    if key is None:
        return None
    table = known_super_weights()
    model = table["models"][key]
    by_status = {s: [tuple(e["coordinate"]) for e in model["entries"] if e["status"] == s] for s in STATUSES}
    detected = {c.key for c in candidates}

    def inside(k) -> bool:
        s = shapes.get(k[0])
        return s is not None and 0 <= k[1] < s[0] and 0 <= k[2] < s[1]

    def d(k) -> dict:
        return {"layer": k[0], "row": k[1], "col": k[2]}

    def compare(known) -> dict:
        return {"found": [d(k) for k in known if k in detected],
                "missed": [d(k) for k in known if k not in detected and inside(k)],
                "outside_shape": [d(k) for k in known if not inside(k)]}

    published = set(by_status[PUBLISHED])
    used = sorted({s["id"] for e in model["entries"] for s in e["sources"]})
    return {"hf_id": hf_id, "listed_as": key, "has_published": bool(published),
            **compare(by_status[PUBLISHED]),
            "new": [d(c.key) for c in candidates if c.key not in published],  # not published (may be reported_by)
            "reported_by": compare(by_status[REPORTED_BY]),
            "entries": [{**d(tuple(e["coordinate"])), "status": e["status"], "sources": e["sources"]}
                        for e in model["entries"]],
            "sources": {s: table["sources"][s] for s in used}, "note": model.get("note"),
            "ranks": [{**d(k), "status": s, "ranks": _ranks_of(k, ranks)}
                      for s in STATUSES for k in by_status[s] if inside(k)]}


# --------------------------------------------------------------------------- the result file


def super_weights_report(detection: Detection, causal: CausalTest | None, *, model_id: str, hf_id: str | None,
                         dtype: str, prompt_source: str, prompt_text: str | None = None,
                         ranks: RankSinks | None = None, published: dict | None = None) -> dict:
    """The JSON-ready ``super_weights.json`` dict (non-finite numbers stay floats)."""
    rejected = []
    for c in detection.rejected:
        row = asdict(c)
        row["out_position"], row["in_position"] = list(c.out_position), list(c.in_position)
        rejected.append(row)
    cand_rows = []
    for i, c in enumerate(detection.candidates):
        row = {k: v for k, v in asdict(c).items()}
        row["out_position"], row["in_position"] = list(c.out_position), list(c.in_position)
        row["token_positions"] = [list(p) for p in c.token_positions]
        if causal is not None:
            row.update({k: v for k, v in causal.candidates[i].items() if k != "n"})
        row["ranks"] = _ranks_of(c.key, ranks)
        cand_rows.append(row)
    layers = [{"layer": t.layer, "module": t.module, "max_out_per_round": t.max_out, "max_in_per_round": t.max_in,
               "argmax_out_per_round": [list(a) for a in t.argmax_out],
               "argmax_in_per_round": [list(a) for a in t.argmax_in],
               "median_out": t.median_out[0], "median_in": t.median_in[0],
               "median_out_per_round": t.median_out, "median_in_per_round": t.median_in,
               "threshold_out": _threshold(detection.options.out_ratio, detection.options.out_floor, t.median_out[0]),
               "threshold_in": _threshold(detection.options.in_ratio, detection.options.in_floor, t.median_in[0])}
              for t in detection.layers]
    prompts = {"source": prompt_source, "n_windows": detection.n_windows, "length": detection.length}
    if detection.n_windows == 1 and prompt_text is not None:
        prompts["text"] = prompt_text
    return {
        "model_id": model_id, "hf_id": hf_id, "dtype": dtype, "convention": CONVENTION,
        "thresholds": detection.options.thresholds(), "prompts": prompts,
        "rounds": detection.rounds, "converged": detection.converged,
        "detect_seconds": detection.seconds,
        "baseline_ppl": None if causal is None else causal.baseline.ppl,
        "eval": None if causal is None else {"n_windows": causal.baseline.n_windows,
                                             "window_length": causal.baseline.window_length,
                                             "seeds": list(causal.seeds), "seconds": causal.seconds},
        "candidates": cand_rows,
        "rejected": rejected,  # proposals that failed the check (not zeroed, not tested, not ranked)
        "all": None if causal is None else causal.all,
        "layers": layers,
        "published": published,
    }


# --------------------------------------------------------------------------- one study


class RankTable:
    """Ranks of tracked weights read back from :meth:`CandidateRanks.entries` (what a worker
    returns: no tensors), with the same ``rank(layer, row, col)``."""

    def __init__(self, entries: Sequence[Mapping]) -> None:
        self._by = {(e["layer"], e["row"], e["col"]): {k: e[k] for k in ("per_tensor", "global", "global_lower_bound")}
                    for e in entries}

    def rank(self, layer: int, row: int, col: int) -> dict:
        try:
            return dict(self._by[(layer, row, col)])
        except KeyError:
            raise KeyError(f"({layer}, {row}, {col}) is not tracked") from None


def super_weight_study(model: nn.Module, prompts: torch.Tensor, eval_windows: torch.Tensor,
                       opts: SuperWeightOptions, *, seeds: Sequence[int], batch_size: int, model_id: str,
                       hf_id: str | None, dtype: str, prompt_source: str,
                       prompt_text: str | None = None) -> tuple[dict, list[Coordinate]]:
    """Detection, the causal test and the registry's coordinates, in one: the report (its ranks
    still empty: :func:`add_ranks` fills them after scoring) and the coordinates to rank under a
    metric (the candidates, then the published and the reported_by ones of ``hf_id``)."""
    det = detect_super_weights(model, prompts, opts)
    causal = causal_test(model, det, eval_windows, seeds=seeds, batch_size=batch_size)
    extra = [*published_coordinates(model, hf_id),  # detection has refused a model without down projections
             *published_coordinates(model, hf_id, REPORTED_BY)]
    published = match_published(hf_id, det.candidates, None, shapes={r.layer: _linear_shape(r) for r in det.refs})
    report = super_weights_report(det, causal, model_id=model_id, hf_id=hf_id, dtype=dtype,
                                  prompt_source=prompt_source, prompt_text=prompt_text, published=published)
    tracked = [Coordinate(c.layer, c.row, c.col, c.module) for c in det.candidates]
    return report, tracked + [c for c in extra if c.key not in {t.key for t in tracked}]


def add_ranks(report: dict, ranks: RankSinks) -> dict:
    """``report`` with every candidate's and published weight's ranks under ``ranks`` (metric ->
    seed -> :class:`CandidateRanks` or :class:`RankTable`) filled in; returns it."""
    for row in report["candidates"]:
        row["ranks"] = _ranks_of((row["layer"], row["row"], row["col"]), ranks)
    for row in (report.get("published") or {}).get("ranks", []):
        row["ranks"] = _ranks_of((row["layer"], row["row"], row["col"]), ranks)
    return report
