"""Super weights: the result types (options, coordinates, candidates, layer traces, a detection).

Convention everywhere: row = output channel, col = input channel, as in ``nn.Linear.weight``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..architectures import ParamRef

CONVENTION = "row = output channel, col = input channel (nn.Linear)"


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


@dataclass(frozen=True)
class StudyLabels:
    """What a ``super_weights.json`` report names besides its numbers: the model (``model_id``,
    its Hugging Face id ``hf_id``, which also picks the registry's published coordinates, and its
    ``dtype``) and where the prompts came from (``prompt_text``: the text of a single prompt)."""

    model_id: str
    hf_id: str | None
    dtype: str
    prompt_source: str
    prompt_text: str | None = None


@dataclass(frozen=True)
class StudyRequest:
    """What one super-weight study is about: detection on ``prompts`` with ``options``, the causal
    test on ``eval_windows`` with ``seeds`` (``batch_size`` windows per forward), reported under
    ``labels``."""

    labels: StudyLabels
    prompts: torch.Tensor  # (N, L) token ids the detection runs on
    eval_windows: torch.Tensor  # (n, L') held-out windows of the causal test
    seeds: Sequence[int]
    batch_size: int
    options: SuperWeightOptions = field(default_factory=SuperWeightOptions)
