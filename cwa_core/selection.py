"""Top-K, bottom-K and random-K selection, per tensor or global, without enumerating weights.

Scores arrive one tensor at a time (see :mod:`cwa_core.metrics`); :class:`ScoreCollector`
reduces each immediately to what outlives it: its top and bottom ``k`` (per tensor and a running
exact global merge), its scores at pre-drawn positions (random-K controls and the stability
sample), and its summary statistics. No full set of scores ever exists, and no Python object is
made per weight.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from .architectures import ParamRef

MODES = ("per_layer", "global")
KINDS = ("top_k", "bottom_k", "random_k")


@dataclass
class Selection:
    """Chosen weights: parallel 1-D tensors, grouped by tensor in ``per_layer`` mode.

    Entries are ordered by rank: descending score for top_k, ascending for bottom_k, draw
    order for random_k (so that any prefix is itself a valid smaller selection).
    """

    kind: str
    mode: str
    k: int
    tensor_ids: torch.Tensor  # (n,) int64, index into the list of ParamRefs
    flat_idx: torch.Tensor  # (n,) int64, index into the flattened tensor
    scores: torch.Tensor  # (n,) float32

    def __len__(self) -> int:
        return self.flat_idx.numel()

    def ranks(self) -> torch.Tensor:
        """1-based rank within the selection (within its tensor in per_layer mode)."""
        if self.mode == "global" or len(self) == 0:
            return torch.arange(1, len(self) + 1)
        start = torch.ones_like(self.tensor_ids, dtype=torch.bool)
        start[1:] = self.tensor_ids[1:] != self.tensor_ids[:-1]
        pos = torch.arange(len(self))
        first = torch.cummax(torch.where(start, pos, torch.zeros_like(pos)), 0).values
        return pos - first + 1

    def prefix(self, k: int) -> "Selection":
        """The selection for a smaller ``k``: the first ``k`` overall or of every tensor."""
        if k > self.k:
            raise ValueError(f"cannot take k={k} from a selection of k={self.k}")
        keep = self.ranks() <= k
        return Selection(self.kind, self.mode, k, self.tensor_ids[keep], self.flat_idx[keep], self.scores[keep])

    def global_ids(self, offsets: torch.Tensor) -> torch.Tensor:
        """One int64 id per weight across the whole model (for set comparisons)."""
        return offsets[self.tensor_ids] + self.flat_idx

    def by_tensor(self) -> dict[int, torch.Tensor]:
        """tensor id -> flat indices (for perturbation)."""
        out: dict[int, torch.Tensor] = {}
        if len(self) == 0:
            return out
        tids, inverse = torch.unique(self.tensor_ids, return_inverse=True)
        order = torch.argsort(inverse, stable=True)
        counts = torch.bincount(inverse, minlength=len(tids)).tolist()
        for tid, chunk in zip(tids.tolist(), torch.split(self.flat_idx[order], counts)):
            out[tid] = chunk
        return out


def _order(scores: torch.Tensor, keys: torch.Tensor, largest: bool) -> torch.Tensor:
    """Permutation sorting by score (descending if ``largest``), ties by ascending key."""
    by_key = torch.argsort(keys, stable=True)
    by_score = torch.argsort(scores[by_key], descending=largest, stable=True)
    return by_key[by_score]


def topk_stable(flat: torch.Tensor, k: int, largest: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.topk`` with a deterministic tie-break (lowest index wins), sorted.

    Deterministic ties make a smaller K exactly a prefix of a larger one, and make global
    selections independent of how tensors were batched. Costs two extra passes over ``flat``;
    the tied indices are enumerated only when ties straddle the cut.
    """
    v, i = torch.topk(flat, k, largest=largest, sorted=True)
    if k == 0:
        return v, i
    thr = v[-1]
    ties_total = int((flat == thr).sum())
    ties_taken = int((v == thr).sum())
    if ties_total > ties_taken:  # ambiguous: take the lowest-index ties
        keep = v != thr
        tied = torch.nonzero(flat == thr).reshape(-1)[:ties_taken]
        v = torch.cat([v[keep], flat[tied]])
        i = torch.cat([i[keep], tied])
    order = _order(v, i, largest)
    return v[order], i[order]


def tensor_offsets(refs: Sequence[ParamRef]) -> torch.Tensor:
    sizes = torch.tensor([r.numel for r in refs], dtype=torch.long)
    return torch.cumsum(sizes, 0) - sizes


def _unique_in_order(draws: np.ndarray) -> np.ndarray:
    _, first = np.unique(draws, return_index=True)
    return draws[np.sort(first)]


DENSE_LIMIT = 1 << 22  # up to here a permutation is cheap (32 MB of int64)


def sample_without_replacement(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """``k`` distinct uniform draws from ``range(n)`` in random order, in O(k) memory.

    The draws do not depend on ``k`` (same rng state, same stream of candidates), so the
    first ``k`` of a larger draw are exactly a smaller draw: sweeps take prefixes.
    """
    if k > n:
        raise ValueError(f"cannot draw {k} distinct items from {n}")
    if n <= DENSE_LIMIT:
        return rng.permutation(n)[:k]
    out = np.empty(0, dtype=np.int64)
    block = 4096
    while len(out) < k:
        out = _unique_in_order(np.concatenate([out, rng.integers(0, n, size=block, dtype=np.int64)]))
        block = min(block * 2, 1 << 20)
    return out[:k]


def random_selection(refs: Sequence[ParamRef], k: int, mode: str, seed: int) -> Selection:
    """``random_k``: ``k`` uniform draws per tensor, or ``k`` over all weights (global)."""
    sizes = np.array([r.numel for r in refs], dtype=np.int64)
    if mode == "per_layer":
        tids, idx = [], []
        for t, n in enumerate(sizes):  # one stream per tensor: independent of k and of the others
            draw = sample_without_replacement(int(n), min(k, int(n)), np.random.default_rng([seed, 0x5E1EC7, t]))
            tids.append(np.full(len(draw), t, dtype=np.int64))
            idx.append(draw)
        tid, flat = np.concatenate(tids), np.concatenate(idx)
    elif mode == "global":
        total = int(sizes.sum())
        g = sample_without_replacement(total, min(k, total), np.random.default_rng([seed, 0x5E1EC7]))
        ends = np.cumsum(sizes)
        tid = np.searchsorted(ends, g, side="right")
        flat = g - (ends - sizes)[tid]
    else:
        raise ValueError(f"unknown mode {mode!r}; allowed: {', '.join(MODES)}")
    n = len(flat)
    return Selection("random_k", mode, k, torch.from_numpy(tid).long(), torch.from_numpy(flat).long(),
                     torch.full((n,), float("nan")))


@dataclass
class TensorStats:
    name: str
    layer: int
    param_type: str
    shape: tuple[int, ...]
    count: int
    mean: float
    std: float
    min: float
    max: float
    p50: float
    p95: float
    p99: float


def _kth(x: torch.Tensor, q: float) -> torch.Tensor:
    """Exact order statistic at quantile ``q`` (nearest rank); no size limit unlike quantile()."""
    k = min(x.numel(), max(1, int(round(q * (x.numel() - 1))) + 1))
    return torch.kthvalue(x, k).values


def tensor_stats(ref: ParamRef, s: torch.Tensor) -> TensorStats:
    flat = s.reshape(-1)
    mean = flat.mean(dtype=torch.float64)
    std = flat.double().std() if flat.numel() > 1 else torch.zeros((), dtype=torch.float64)
    vals = torch.stack([mean, std, flat.min().double(), flat.max().double(),
                        _kth(flat, 0.50).double(), _kth(flat, 0.95).double(), _kth(flat, 0.99).double()])
    m, sd, lo, hi, p50, p95, p99 = vals.tolist()  # one host sync per tensor
    return TensorStats(ref.name, ref.layer, ref.param_type, ref.shape, flat.numel(), m, sd, lo, hi, p50, p95, p99)


@dataclass
class ScoreCollector:
    """Sink for per-tensor scores: keeps selections, pre-drawn samples and statistics.

    ``k`` is the largest K any caller will need; smaller K are prefixes. ``gathers`` are
    selections (random-K controls, stability sample) whose scores are looked up as the
    tensors go by.
    """

    refs: Sequence[ParamRef]
    k: int
    modes: Sequence[str] = MODES
    gathers: dict[str, Selection] = field(default_factory=dict)
    sample_per_tensor: int = 4096  # for aggregate percentiles and distribution plots
    seed: int = 0

    def __post_init__(self) -> None:
        self._index = {id(r.param): i for i, r in enumerate(self.refs)}
        self._offsets = tensor_offsets(self.refs)
        self._per_tensor: dict[str, list] = {"top_k": [], "bottom_k": []}
        self._global: dict[str, tuple | None] = {"top_k": None, "bottom_k": None}
        self._gather_idx = {name: sel.by_tensor() for name, sel in self.gathers.items()}
        self._gathered: dict[str, dict[int, torch.Tensor]] = {name: {} for name in self.gathers}
        self.stats: list[TensorStats | None] = [None] * len(self.refs)
        self.samples: list[torch.Tensor | None] = [None] * len(self.refs)
        self._rng = torch.Generator().manual_seed(self.seed)

    def __call__(self, ref: ParamRef, scores: torch.Tensor) -> None:
        t = self._index[id(ref.param)]
        if self.stats[t] is not None:
            raise RuntimeError(f"{ref.name} scored twice")
        flat = scores.detach().reshape(-1).float()
        if flat.numel() != ref.numel:
            raise ValueError(f"scores for {ref.name} have {flat.numel()} entries, expected {ref.numel}")
        kk = min(self.k, flat.numel())
        for kind, largest in (("top_k", True), ("bottom_k", False)):
            v, i = topk_stable(flat, kk, largest)
            v, i = v.cpu(), i.cpu()
            tid = torch.full_like(i, t)
            if "per_layer" in self.modes:
                self._per_tensor[kind].append((tid, i, v))
            if "global" in self.modes:
                self._global[kind] = self._merge(self._global[kind], (tid, i, v), largest)
        for name, per in self._gather_idx.items():
            if t in per:
                idx = per[t]
                self._gathered[name][t] = flat[idx.to(flat.device)].cpu()
        self.stats[t] = tensor_stats(ref, flat)
        n = min(self.sample_per_tensor, flat.numel())
        pick = torch.randint(flat.numel(), (n,), generator=self._rng)
        self.samples[t] = flat[pick.to(flat.device)].cpu()

    def _merge(self, run: tuple | None, new: tuple, largest: bool) -> tuple:
        if run is None:
            return new
        tid, idx, val = (torch.cat([a, b]) for a, b in zip(run, new))
        keep = _order(val, self._offsets[tid] + idx, largest)[: self.k]  # ties: lowest global id
        return tid[keep], idx[keep], val[keep]

    def missing(self) -> list[str]:
        return [r.name for r, s in zip(self.refs, self.stats) if s is None]

    def selection(self, kind: str, mode: str) -> Selection:
        """The top_k / bottom_k / random_k selection (at the collector's ``k``) in ``mode``."""
        if self.missing():
            raise RuntimeError(f"{len(self.missing())} tensors never scored, e.g. {self.missing()[0]}")
        if mode not in self.modes:
            raise ValueError(f"mode {mode!r} was not collected; collected: {', '.join(self.modes)}")
        if kind == "random_k":
            return self.gathered(f"random_k/{mode}")
        if mode == "global":
            tid, idx, val = self._global[kind]
        else:
            parts = sorted(self._per_tensor[kind], key=lambda c: int(c[0][0]) if len(c[0]) else 0)
            tid, idx, val = (torch.cat(c) for c in zip(*parts))
        return Selection(kind, mode, self.k, tid, idx, val)

    def gathered(self, name: str) -> Selection:
        """A pre-drawn selection with its scores filled in."""
        sel = self.gathers[name]
        per = sel.by_tensor()
        scores = torch.empty(len(sel))
        for t, idx in per.items():
            mask = sel.tensor_ids == t
            # by_tensor keeps draw order within a tensor, so positions line up
            scores[mask] = self._gathered[name][t]
        return Selection(sel.kind, sel.mode, sel.k, sel.tensor_ids, sel.flat_idx, scores)
