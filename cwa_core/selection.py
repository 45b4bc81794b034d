"""Top-K, bottom-K and random-K selection, per tensor or global, without enumerating weights.

Scores arrive one tensor at a time (see :mod:`cwa_core.metrics`); :class:`ScoreCollector`
reduces each immediately to what outlives it: its top and bottom ``k`` (per tensor and a running
exact global merge), its scores at pre-drawn positions (random-K controls and the stability
sample), and its summary statistics. No full set of scores ever exists, and no Python object is
made per weight.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from .architectures import ParamRef
from .schema import SELECTION_KINDS

MODES = ("per_layer", "global")
KINDS = SELECTION_KINDS  # top_k, random_k, bottom_k: the one order (cwa_core.schema)


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
    selections independent of how tensors were batched. One ``topk`` of ``k + 1`` tells whether
    ties straddle the cut; only then are the tied indices enumerated (one more pass).
    """
    n = flat.numel()
    if not 0 <= k <= n:
        raise ValueError(f"topk_stable: k={k} is outside 0..{n} (the number of scores)")
    if k == 0 or k == n:
        v, i = torch.topk(flat, k, largest=largest, sorted=True)
        return (v, i) if k == 0 else _sorted_stable(v, i, largest)
    v, i = torch.topk(flat, k + 1, largest=largest, sorted=True)
    thr, nxt = v[k - 1], v[k]
    v, i = v[:k], i[:k]
    if bool(_same(nxt, thr)):  # ambiguous: an untaken entry equals the k-th; take the lowest-index ties
        taken = _same(v, thr)
        ties_taken = int(taken.sum())
        keep = ~taken
        tied = torch.nonzero(_same(flat, thr)).reshape(-1)[:ties_taken]
        v = torch.cat([v[keep], flat[tied]])
        i = torch.cat([i[keep], tied])
    return _sorted_stable(v, i, largest)


def _same(x: torch.Tensor, thr: torch.Tensor) -> torch.Tensor:
    """``x == thr``, except that NaN counts as equal to NaN (topk ranks NaN above everything)."""
    return torch.where(thr.isnan(), x.isnan(), x == thr)


def _sorted_stable(v: torch.Tensor, i: torch.Tensor, largest: bool) -> tuple[torch.Tensor, torch.Tensor]:
    order = _order(v, i, largest)
    return v[order], i[order]


def offsets_of(sizes: Sequence[int]) -> torch.Tensor:
    """Where each tensor's weights start in one model-wide numbering (for global ids)."""
    t = torch.tensor(list(sizes), dtype=torch.long)
    return torch.cumsum(t, 0) - t


def tensor_offsets(refs: Sequence[ParamRef]) -> torch.Tensor:
    return offsets_of(r.numel for r in refs)


def _unique_in_order(draws: np.ndarray) -> np.ndarray:
    _, first = np.unique(draws, return_index=True)
    return draws[np.sort(first)]


# Up to here a whole permutation is cheap (512 KiB of int64, cache-resident: about a
# millisecond). Beyond it, permuting costs about 125 ns a weight (0.5 s for 4M weights, 25 s
# for a 300M model's tensors, every seed), so larger ranges draw candidates instead.
DENSE_LIMIT = 1 << 16


def sample_without_replacement(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """``k`` distinct uniform draws from ``range(n)`` in random order, in O(k) memory.

    The draws do not depend on ``k`` (same rng state, same stream of candidates), so the
    first ``k`` of a larger draw are exactly a smaller draw: sweeps take prefixes. The result
    owns its memory: a slice of the permutation would keep all of it alive (per-layer random-K
    over a model's tensors used to hold one full int64 permutation per tensor at once).
    """
    if k > n:
        raise ValueError(f"cannot draw {k} distinct items from {n}")
    if n <= DENSE_LIMIT:
        return rng.permutation(n)[:k].copy()
    out = np.empty(0, dtype=np.int64)
    block = 4096
    while len(out) < k:
        out = _unique_in_order(np.concatenate([out, rng.integers(0, n, size=block, dtype=np.int64)]))
        block = min(block * 2, 1 << 20)
    return out[:k].copy()


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
    """Exact order statistic at quantile ``q`` (nearest rank); no size limit unlike quantile().
    NaN ranks above +inf (torch's order); :func:`tensor_stats` never asks with NaN present."""
    if x.numel() == 0:
        raise ValueError("_kth: no scores to take a quantile of")
    return torch.kthvalue(x, _rank(x.numel(), q)).values


def _quantiles(flat: torch.Tensor, qs: Sequence[float], *, by_sort: bool | None = None) -> list[torch.Tensor]:
    """Exact nearest-rank order statistics of a 1-D tensor. On the CPU by ``kthvalue``; on an
    accelerator by one device-wide sort (CUDA's kthvalue gives each slice one thread block, so
    a single slice of tens of millions of scores would crawl)."""
    if flat.numel() == 0:
        raise ValueError("_quantiles: no scores to take quantiles of")
    if by_sort is None:
        by_sort = flat.device.type != "cpu"
    if not by_sort:
        return [_kth(flat, q) for q in qs]
    srt = torch.sort(flat).values
    return [srt[_rank(flat.numel(), q) - 1] for q in qs]


def tensor_stats(ref: ParamRef, s: torch.Tensor) -> TensorStats:
    """Exact count, mean, std (n - 1), min, max and nearest-rank p50/p95/p99 of ``s`` (any shape).

    Degenerate scores, decided: one entry has std 0.0; any NaN makes every statistic except
    ``count`` NaN (an order statistic with NaN ranked somewhere would be silently wrong); +-inf
    are ordinary extreme values for min, max and the percentiles, the mean is what the sum gives
    (inf, or NaN for +inf with -inf) and std is NaN (undefined); no entries: count 0, NaN elsewhere.
    """
    flat = s.reshape(-1)
    n = flat.numel()
    if n == 0:
        return TensorStats(ref.name, ref.layer, ref.param_type, ref.shape, 0, *[math.nan] * 7)
    mean = flat.mean(dtype=torch.float64)
    std = flat.double().std() if n > 1 else torch.zeros((), dtype=torch.float64)
    vals = torch.stack([mean, std, flat.min().double(), flat.max().double(),
                        *(v.double() for v in _quantiles(flat, (0.50, 0.95, 0.99))),
                        flat.isnan().any().double(), flat.isfinite().all().double()])
    m, sd, lo, hi, p50, p95, p99, has_nan, finite = vals.tolist()  # one host sync per tensor
    if has_nan:
        m = sd = lo = hi = p50 = p95 = p99 = math.nan
    elif not finite:
        sd = math.nan  # inf - inf: the spread of a sample with an infinite value is undefined
    return TensorStats(ref.name, ref.layer, ref.param_type, ref.shape, n, m, sd, lo, hi, p50, p95, p99)


# --------------------------------------------------------------------------- CPU fast path
# On the CPU, torch.topk and torch.kthvalue cost several passes over a tensor each (kthvalue
# copies values *and* int64 indices). One float32 copy partitioned in place by numpy yields every
# order statistic a collector needs (both cut-offs, min, median, p95, p99, max) in about two
# passes; the selected indices then come from one comparison pass. Same answers, ties included.

_CHUNK = 1 << 20


def _select_positions(y: np.ndarray, positions: Sequence[int]) -> None:
    """Partition ``y`` in place so that ``y[p]`` is its ``p``-th smallest for every ``p``."""
    todo = [(0, y.size, sorted(set(positions)))]
    while todo:
        lo, hi, ps = todo.pop()
        if not ps:
            continue
        mid = (lo + hi) // 2
        j = min(range(len(ps)), key=lambda t: abs(ps[t] - mid))  # split the segment evenly
        p = ps[j]
        y[lo:hi].partition(p - lo)
        todo.append((lo, p, ps[:j]))
        todo.append((p + 1, hi, ps[j + 1:]))


def _first_equal(a: np.ndarray, value, count: int) -> np.ndarray:
    """The ``count`` lowest indices ``i`` with ``a[i] == value`` (chunked: bounded memory)."""
    found, need = [], count
    for start in range(0, a.size, _CHUNK):
        hits = np.flatnonzero(a[start:start + _CHUNK] == value)[:need] + start
        found.append(hits)
        need -= hits.size
        if need <= 0:
            break
    return np.concatenate(found) if found else np.empty(0, dtype=np.int64)


def _stable_cut(a: np.ndarray, thr, k: int, largest: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest (smallest) entries of ``a`` given the ``k``-th one, ``thr``: all strictly
    beyond it plus its lowest-index ties; sorted like :func:`topk_stable`."""
    beyond = np.flatnonzero(a > thr if largest else a < thr)
    idx = np.concatenate([beyond, _first_equal(a, thr, k - beyond.size)])
    i = torch.from_numpy(idx.astype(np.int64, copy=False))
    return _sorted_stable(torch.from_numpy(a[idx]), i, largest)


def _std64(a: np.ndarray, mean: float) -> float:
    """Sample standard deviation (n - 1) in float64, two-pass, in chunks (no float64 copy);
    0.0 for fewer than two values (as :func:`tensor_stats`)."""
    if a.size < 2:
        return 0.0
    ss = 0.0
    for start in range(0, a.size, _CHUNK):
        d = np.subtract(a[start:start + _CHUNK], mean, dtype=np.float64)
        ss += float(np.square(d, out=d).sum())  # not np.dot: BLAS threads fight over busy cores
    return math.sqrt(ss / (a.size - 1))


def _rank(n: int, q: float) -> int:
    """1-based nearest rank of quantile ``q`` among ``n`` values (see :func:`_kth`)."""
    return min(n, max(1, int(round(q * (n - 1))) + 1))


def _reduce_cpu(ref: ParamRef, flat: torch.Tensor, k: int):
    """(top (v, i), bottom (v, i), TensorStats) of a finite float32 CPU tensor; None otherwise
    (another device or dtype, no entries, k = 0, a NaN or inf: :func:`topk_stable` and
    :func:`tensor_stats` define those). ``k`` may equal the size (every entry, sorted)."""
    if not 0 <= k <= flat.numel():
        raise ValueError(f"_reduce_cpu: k={k} is outside 0..{flat.numel()} (the number of scores)")
    if flat.device.type != "cpu" or flat.dtype != torch.float32 or flat.numel() == 0 or k == 0:
        return None
    a = flat.contiguous().numpy()
    n = a.size
    with np.errstate(invalid="ignore", over="ignore"):  # inf - inf: NaN, caught just below
        total = float(a.sum(dtype=np.float64))
    if not math.isfinite(total):  # NaN or inf somewhere: the general path defines the semantics
        return None
    ranks = {q: _rank(n, q) - 1 for q in (0.50, 0.95, 0.99)}
    y = a.copy()
    _select_positions(y, [0, n - 1, k - 1, n - k, *ranks.values()])
    top = _stable_cut(a, y[n - k], k, largest=True)
    bottom = _stable_cut(a, y[k - 1], k, largest=False)
    mean = total / n
    stats = TensorStats(ref.name, ref.layer, ref.param_type, ref.shape, n, mean, _std64(a, mean),
                        float(y[0]), float(y[n - 1]), float(y[ranks[0.50]]), float(y[ranks[0.95]]),
                        float(y[ranks[0.99]]))
    return top, bottom, stats


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
        fast = _reduce_cpu(ref, flat, kk)
        for kind, largest in (("top_k", True), ("bottom_k", False)):
            if fast is not None:
                v, i = fast[0] if largest else fast[1]
            else:
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
        self.stats[t] = fast[2] if fast is not None else tensor_stats(ref, flat)
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
        missing = self.missing()
        if missing:
            raise RuntimeError(f"{len(missing)} tensors never scored, e.g. {missing[0]}")
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
        scores = torch.empty(len(sel))
        if len(sel):
            # the gathered scores follow by_tensor's order: tensors ascending, draw order within
            order = torch.argsort(sel.tensor_ids, stable=True)
            scores[order] = torch.cat([self._gathered[name][t] for t in sorted(self._gather_idx[name])])
        return Selection(sel.kind, sel.mode, sel.k, sel.tensor_ids, sel.flat_idx, scores)
