"""Protection campaigns (issue 17): one intervention on the whole model while a protected set is
left intact, measured against the same intervention with other protected sets (the arms).

A trial evaluates every arm under one intervention: bit errors (one draw shared by all arms,
applied outside each arm's set), round-to-nearest quantization, or pruning by a metric's scores.
Each arm's intervention is applied by :func:`applied`, a context manager that restores the
weights bit for bit on exit and checks it (:class:`~cwa_core.perturb.PerturbationLeakError`
otherwise). Weight ids are global: a tensor's offset in the refs' concatenation plus its flat
index (:func:`cwa_core.selection.tensor_offsets`).

Memory while applied: bit errors O(flips) (the draw and the flipped entries' bits); prune
O(pruned) (the pruned entries' bits, plus the scores the caller holds: O(weights) host memory);
quantize O(weights) host memory (every projection matrix is quantized at once, so a CPU copy of
each is kept to restore it). Quantization and pruning act on the attention and MLP projection
matrices only (:func:`compressed`); bit errors on every scored tensor.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from . import bit_errors as be
from .architectures import ARCHITECTURES, ParamRef, flat_index, matrix_shape
from .evaluate import finite_status, perplexity
from .metrics import ScoreOptions, score
from .perturb import PerturbationLeakError, all_equal, int_view
from .prune import GROUPS as PRUNE_GROUPS
from .prune import global_masks, prune_mask
from .quantize import parse_group, rtn
from .schema import ARM_KINDS, CAMPAIGNS, HARSHER, LEVEL_NAMES  # noqa: F401  (re-exported: the campaign's names)
from .selection import Selection, tensor_offsets



@dataclass(frozen=True)
class CampaignSpec:
    """What a campaign does besides its level: the bit class of bit errors, the group sharing one
    quantization scale, the group in which pruning compares scores."""

    campaign: str
    bits: str = "all"
    quant_group: str = "row"
    prune_group: str = "row"

    def __post_init__(self) -> None:
        if self.campaign not in CAMPAIGNS:
            raise ValueError(f"campaign: unknown {self.campaign!r}; allowed: {', '.join(CAMPAIGNS)}")
        if self.bits not in be.BIT_CLASSES:
            raise ValueError(f"bits: unknown {self.bits!r}; allowed: {', '.join(be.BIT_CLASSES)}")
        parse_group(self.quant_group)
        if self.prune_group not in PRUNE_GROUPS:
            raise ValueError(f"prune_group: unknown {self.prune_group!r}; allowed: {', '.join(PRUNE_GROUPS)}")


# --------------------------------------------------------------------------- protected sets

def protected_sets(selections: Mapping[str, Selection], offsets: torch.Tensor, arms: Sequence[str],
                   super_ids: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """arm -> its protected weights as sorted unique int64 global ids, in the order of ``arms``:
    ``none`` empty, top_k/random_k/bottom_k from ``selections`` (keyed by arm), ``super_weights``
    from ``super_ids`` (:func:`super_weight_ids`)."""
    if len(set(arms)) != len(arms):
        raise ValueError(f"protect: an arm appears twice in {list(arms)}; allowed: each of {', '.join(ARM_KINDS)} once")
    out: dict[str, np.ndarray] = {}
    for arm in arms:
        if arm not in ARM_KINDS:
            raise ValueError(f"protect: unknown arm {arm!r}; allowed: {', '.join(ARM_KINDS)}")
        if arm == "none":
            ids = np.empty(0, dtype=np.int64)
        elif arm == "super_weights":
            if super_ids is None:
                raise ValueError("protect: super_weights needs the detected candidates (detect_super_weights)")
            ids = np.asarray(super_ids, dtype=np.int64)
        else:
            if arm not in selections:
                raise ValueError(f"protect: no {arm} selection was given for arm {arm!r}")
            ids = selections[arm].global_ids(offsets).cpu().numpy()
        out[arm] = np.unique(ids).astype(np.int64)
    return out


_DOWN_PROJ = tuple(sorted({s.down_proj for s in ARCHITECTURES.values() if s.down_proj}))


def super_weight_ids(refs: Sequence[ParamRef], candidates: Sequence[Mapping]) -> np.ndarray:
    """Global ids (sorted, unique) of super-weight candidates (dicts with layer, row, col, and
    optionally module) in the down projection weight of their layer among ``refs``; a candidate
    whose tensor is not scored (or whose row/col is outside it) is an error naming it."""
    offsets = tensor_offsets(refs).tolist()
    ids, missing = [], []
    for c in candidates:
        layer, row, col = int(c["layer"]), int(c["row"]), int(c["col"])
        at = [i for i, r in enumerate(refs) if r.leaf == "weight" and r.layer == layer and r.in_dim is not None
              and (r.name == f"{c['module']}.weight" if c.get("module")
                   else any(r.name.endswith(f".{layer}.{d}.weight") for d in _DOWN_PROJ))]
        rows, cols = matrix_shape(refs[at[0]].layout, refs[at[0]].shape) if at else (0, 0)
        if len(at) != 1 or not (0 <= row < rows and 0 <= col < cols):
            missing.append(f"(layer {layer}, row {row}, col {col})")
            continue
        r = refs[at[0]]
        ids.append(offsets[at[0]] + int(flat_index(r.layout, r.shape, row, col)))
    if missing:
        raise ValueError(f"protect: super_weights candidates {', '.join(missing)} are not among the scored "
                         "tensors; score the mlp parameter type")
    return np.unique(np.asarray(ids, dtype=np.int64))


# --------------------------------------------------------------------------- draws and scores

def draw_rng(seed: int, trial: int, rate: float) -> np.random.Generator:
    """The generator of the (seed, trial, rate) bit-error draw, whoever runs it: a SeedSequence of
    the seed, the trial and the two uint32 halves of the rate's float64 bits."""
    bits = int(np.float64(rate).view(np.uint64))
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(trial), bits & 0xFFFFFFFF, bits >> 32]))


def draw_errors(refs: Sequence[ParamRef], rate: float, rng: np.random.Generator, *, bits: str = "all") -> be.BitErrors:
    """One draw of bit errors over every weight of ``refs``, indexed by global id. Refs of several
    dtypes are drawn per dtype group (in the order each dtype first appears among ``refs``), one
    after another from ``rng``, each over its group's weights in refs order."""
    offsets = tensor_offsets(refs).numpy()
    groups: dict[torch.dtype, list[int]] = {}
    for i, r in enumerate(refs):
        groups.setdefault(r.param.dtype, []).append(i)
    index, which = [], []
    for dtype, members in groups.items():
        sizes = np.asarray([refs[i].numel for i in members], dtype=np.int64)
        starts = np.cumsum(sizes) - sizes  # where each member starts in the group's numbering
        d = be.draw(int(sizes.sum()), dtype, rate, rng, bits=bits)
        pos = np.searchsorted(starts, d.index, side="right") - 1
        index.append(offsets[np.asarray(members, dtype=np.int64)[pos]] + d.index - starts[pos])
        which.append(d.bits)
    index, which = np.concatenate(index).astype(np.int64), np.concatenate(which).astype(np.int64)
    order = np.lexsort((which, index))
    return be.BitErrors(index[order], which[order])


def full_scores(model: nn.Module, refs: Sequence[ParamRef], metric: str, calib: torch.Tensor | None,
                opts: ScoreOptions = ScoreOptions()) -> list[torch.Tensor]:
    """Every weight's score under ``metric`` (float32 on the CPU, one tensor of each ref's shape, in
    refs order): what pruning ranks. Holds O(weights) host memory, 4 bytes a weight."""
    at = {id(r.param): i for i, r in enumerate(refs)}
    out: list[torch.Tensor | None] = [None] * len(refs)

    def sink(ref: ParamRef, s: torch.Tensor) -> None:
        out[at[id(ref.param)]] = s.detach().to(device="cpu", dtype=torch.float32, copy=True)

    score(model, refs, metric, calib, sink, opts)
    missing = [refs[i].name for i, s in enumerate(out) if s is None]
    if missing:
        raise RuntimeError(f"metric {metric} never scored {missing[:3]}")
    return out


# --------------------------------------------------------------------------- application

def _local(ids: np.ndarray, start: int, n: int) -> np.ndarray:
    """The flat indices (into one tensor of ``n`` weights starting at global id ``start``) of the
    sorted global ``ids`` that fall in it."""
    lo, hi = np.searchsorted(ids, [start, start + n])
    return ids[lo:hi] - start


def _mask(ids: np.ndarray, start: int, ref: ParamRef, device: torch.device) -> torch.Tensor | None:
    """The ref's protected weights as a bool tensor of its shape on ``device`` (None when none)."""
    local = _local(ids, start, ref.numel)
    if local.size == 0:
        return None
    mask = torch.zeros(ref.numel, dtype=torch.bool)
    mask[torch.from_numpy(local)] = True
    return mask.view(ref.shape).to(device)


def _flat(ref: ParamRef) -> torch.Tensor:
    if not ref.param.is_contiguous():
        raise ValueError(f"{ref.name} is not contiguous; cannot change it in place")
    return ref.param.data.view(-1)


@dataclass
class Applied:
    """What an arm's intervention did: ``changed`` (bit_errors: flips applied; otherwise weights
    whose stored bits differ) and ``protected_hits`` (bit_errors: flips of the draw on the arm's
    protected set; otherwise 0)."""

    changed: int = 0
    protected_hits: int = 0


@contextlib.contextmanager
def applied(refs: Sequence[ParamRef], spec: CampaignSpec, protected_ids: np.ndarray, level: float, *,
            draw: be.BitErrors | None = None, scores: Sequence[torch.Tensor] | None = None) -> Iterator[Applied]:
    """Apply ``spec``'s intervention at ``level`` to ``refs`` outside ``protected_ids`` (sorted global
    ids); restore every touched weight bit for bit on exit, checked. bit_errors: ``draw`` (global
    ids, :func:`draw_errors`); quantize: level = bits; prune: level = sparsity, ranking ``scores``."""
    ids = np.unique(np.asarray(protected_ids, dtype=np.int64))
    if spec.campaign == "bit_errors":
        if draw is None:
            raise ValueError("bit_errors: applied() needs the trial's draw")
        cm = _flipped(refs, draw, ids)
    elif spec.campaign == "quantize":
        cm = _quantized(refs, spec, ids, level)
    else:
        if scores is None or len(scores) != len(refs):
            raise ValueError("prune: applied() needs one score tensor per ref (full_scores)")
        cm = _pruned(refs, spec, ids, level, scores)
    with torch.no_grad(), cm as info:
        yield info


def _per_ref(index: np.ndarray, offsets: np.ndarray) -> Iterator[tuple[int, slice]]:
    """(ref position, slice of the sorted global ``index`` that falls in it) for refs with entries."""
    bounds = np.searchsorted(index, np.r_[offsets, np.iinfo(np.int64).max])
    for i in range(offsets.size):
        if bounds[i + 1] > bounds[i]:
            yield i, slice(int(bounds[i]), int(bounds[i + 1]))


@contextlib.contextmanager
def _flipped(refs: Sequence[ParamRef], draw: be.BitErrors, ids: np.ndarray) -> Iterator[Applied]:
    """XOR the draw's flips outside ``ids``; the same XOR again restores them, checked against the
    flipped weights' saved bits. O(flips) memory; the flips go to each device in one transfer."""
    arm = draw.outside(ids)
    index, masks = be.combined(arm)  # one mask per flipped weight
    offsets = tensor_offsets(refs).numpy()
    touched = list(_per_ref(index, offsets))
    local = np.concatenate([index[sl] - offsets[i] for i, sl in touched] or [np.empty(0, np.int64)])
    words = np.concatenate([be.signed(masks[sl], 8 * refs[i].param.element_size()) for i, sl in touched]
                           or [np.empty(0, np.int64)])
    sent = {d: (torch.from_numpy(local).to(d), torch.from_numpy(words).to(d))
            for d in {refs[i].param.device for i, _ in touched}}
    done: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []
    try:
        pos = 0
        for i, sl in touched:
            iv = int_view(_flat(refs[i]))
            on = sent[iv.device]
            idx, m = on[0][pos:pos + sl.stop - sl.start], on[1][pos:pos + sl.stop - sl.start].to(iv.dtype)
            pos += sl.stop - sl.start
            before = iv[idx]
            iv[idx] = before ^ m
            done.append((iv, idx, m, before))
        yield Applied(len(arm), len(draw) - len(arm))
    finally:
        for iv, idx, m, _ in reversed(done):
            iv[idx] = iv[idx] ^ m
        _check([(iv[idx], before) for iv, idx, _, before in done], "flipped")


def compressed(ref: ParamRef) -> bool:
    """Whether quantization and pruning act on ``ref``: the weight matrices of the attention and
    MLP projections, as RTN/GPTQ/AWQ quantize and Wanda/SparseGPT prune them; norms, biases,
    embeddings and the LM head stay as they are (bit errors hit every scored tensor)."""
    return ref.param_type in ("attention", "mlp") and ref.leaf == "weight" and ref.param.dim() >= 2


@contextlib.contextmanager
def _quantized(refs: Sequence[ParamRef], spec: CampaignSpec, ids: np.ndarray, bits: float) -> Iterator[Applied]:
    """Round-to-nearest quantization of every ref, the protected weights kept (and left out of their
    group's scale). Keeps a CPU copy of every tensor to restore: O(weights) host memory."""
    if isinstance(bits, float) and bits.is_integer():
        bits = int(bits)  # 4.0 read back from JSON is 4 bits; rtn refuses anything else not in 2..8
    offsets = tensor_offsets(refs).tolist()
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    info = Applied()
    try:
        for r, start in zip(refs, offsets):
            if not compressed(r):
                continue
            flat = _flat(r)
            protect = _mask(ids, start, r, r.param.device)
            q = rtn(r.param.data, bits, spec.quant_group, protected=protect, in_dim=r.in_dim)
            saved.append((flat, int_view(flat).to("cpu", copy=True)))
            info.changed += int((int_view(q.reshape(-1)) != int_view(flat)).sum())
            flat.copy_(q.reshape(-1))
            del q
        yield info
    finally:
        _write_back([(flat, None, orig) for flat, orig in saved])


@contextlib.contextmanager
def _pruned(refs: Sequence[ParamRef], spec: CampaignSpec, ids: np.ndarray, sparsity: float,
            scores: Sequence[torch.Tensor]) -> Iterator[Applied]:
    """Zero the lowest-scoring ``sparsity`` of each comparison group outside the protected weights;
    only the pruned entries' bits are kept to restore: O(pruned) memory, plus one bool mask (a byte
    a weight) of one tensor at a time, or of all of them for the global group."""
    offsets = tensor_offsets(refs).tolist()
    refs, offsets, scores = zip(*[(r, o, s) for r, o, s in zip(refs, offsets, scores) if compressed(r)]) or ((), (), ())
    protect = [_mask(ids, start, r, s.device) for r, start, s in zip(refs, offsets, scores)]
    if spec.prune_group == "global":
        masks = iter(global_masks(list(scores), sparsity, protected=protect))
    else:
        masks = (prune_mask(s, sparsity, group=spec.prune_group, protected=p, in_dim=r.in_dim)
                 for s, p, r in zip(scores, protect, refs))
    saved: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    info = Applied()
    try:
        for r, m in zip(refs, masks):
            flat = _flat(r)
            idx = torch.nonzero(m.reshape(-1)).reshape(-1).to(flat.device)
            bits = int_view(flat)[idx]
            saved.append((flat, idx, bits))
            info.changed += int((bits != 0).sum())
            flat[idx] = 0
        yield info
    finally:
        _write_back(saved)


def _write_back(saved: Sequence[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]]) -> None:
    """Write the saved bits back (``idx`` None: the whole tensor) and check every one holds."""
    for flat, idx, bits in reversed(saved):
        iv = int_view(flat)
        if idx is None:
            iv.copy_(bits)
        else:
            iv[idx] = bits
    _check([((int_view(flat) if idx is None else int_view(flat)[idx]).to(bits.device), bits)
            for flat, idx, bits in saved], "changed")


def _check(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], what: str) -> None:
    """Raise PerturbationLeakError unless every (now, saved) pair of bits is equal; the
    comparisons stay on their device and are read back once per device, not once per tensor."""
    if all_equal(pairs):
        return
    wrong = sum(int((now != saved).sum()) for now, saved in pairs)
    raise PerturbationLeakError(f"{wrong} of {sum(s.numel() for _, s in pairs)} {what} weights do not hold "
                                "their original bits after restoring")


# --------------------------------------------------------------------------- one trial

def run_trial(model: nn.Module, refs: Sequence[ParamRef], windows: torch.Tensor, spec: CampaignSpec,
              protected: Mapping[str, np.ndarray], *, level: float, seed: int, trial: int, batch_size: int = 8,
              scores: Sequence[torch.Tensor] | None = None) -> list[dict]:
    """One trial: every arm of ``protected`` (in its order) under the same intervention outside its
    own set, the perplexity of ``windows`` (N, L) meanwhile, the weights restored after each arm.
    One row per arm as the issue 17 contract (``ppl_ratio`` is the caller's)."""
    draw = None
    if spec.campaign == "bit_errors":
        draw = draw_errors(refs, level, draw_rng(seed, trial, level), bits=spec.bits)
    rows = []
    for arm, ids in protected.items():
        t0 = time.perf_counter()
        with applied(refs, spec, ids, level, draw=draw, scores=scores) as info:
            ppl = perplexity(model, windows, batch_size=batch_size, desc=f"ppl {arm} {spec.campaign}")
        rows.append({"arm": arm, "level": int(level) if spec.campaign == "quantize" else float(level),
                     "seed": seed, "trial": trial, "n_protected": int(ids.size),
                     "changed": info.changed, "drawn": 0, "protected_hits": info.protected_hits,
                     "ppl": ppl.ppl, "nll": ppl.nll, "status": finite_status(ppl.ppl),
                     "seconds": time.perf_counter() - t0})
    drawn = len(draw) if draw is not None else _unprotected_changes(refs, spec, level, scores, rows)
    for row in rows:
        row["drawn"] = drawn
    return rows


def _unprotected_changes(refs: Sequence[ParamRef], spec: CampaignSpec, level: float,
                         scores: Sequence[torch.Tensor] | None, rows: Sequence[dict]) -> int:
    """quantize/prune's ``drawn``: what arm ``none`` changes (applied once more if it was not run)."""
    for row in rows:
        if row["arm"] == "none":
            return row["changed"]
    with applied(refs, spec, np.empty(0, dtype=np.int64), level, scores=scores) as info:
        return info.changed
