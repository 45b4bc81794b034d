"""Unstructured pruning masks with a protected set (issue 17, ``prune``).

The lowest-scored fraction ``sparsity`` of each comparison group is pruned (set to zero by the
caller); protected weights are never pruned, and the group's quota is taken from its unprotected
weights (a group with fewer unprotected weights than its quota loses all of them:
:func:`pruned_counts` reports the shortfall). Groups:

* ``row``: every output row of the weight as a matrix (:func:`~cwa_core.quantize.to_rows`) loses
  ``int(n_in * sparsity)`` weights (floor): Wanda's comparison group (Sun et al. 2023, "A Simple
  and Effective Pruning Approach for Large Language Models", §3 "comparison group"; locuslab/wanda
  lib/prune.py: ``sort_res = torch.sort(W_metric, dim=-1, stable=True)``, ``indices =
  sort_res[1][:, :int(W_metric.shape[1] * args.sparsity_ratio)]``).
* ``layer``: ``int(numel * sparsity)`` over the whole tensor: the per-layer comparison of magnitude
  pruning (Han et al. 2015, "Learning both Weights and Connections for Efficient Neural Networks",
  §3, which thresholds each layer; a fixed fraction per layer as in the Wanda paper's baseline).
* ``global``: ``int(total * sparsity)`` over all tensors together (:func:`global_masks`).

Order: ascending score, ties broken by position (stable sort): the lower input index within a
row, the lower stored flat index within a tensor, then the earlier tensor for ``global``. NaN
scores rank above every number, +inf included (``torch.sort``'s order, hence Wanda's): they are
pruned last, so the counts stay exact. Scores are compared in float32 (the metrics' dtype).

Memory: one sort per tensor (int64 indices and a running count, 16 bytes per weight, freed
before the next tensor); no Python object per weight. :func:`global_masks` holds every score and
its sort indices at once (about 20 bytes per weight on the first tensor's device).
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Sequence

import torch

from .quantize import check_mask, from_rows, to_rows

GROUPS = ("row", "layer", "global")


def check_sparsity(sparsity: float) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real) or not 0 <= sparsity < 1:
        raise ValueError(f"sparsity: must be a number in [0, 1), got {sparsity!r}")
    return float(sparsity)


def _lowest(key: torch.Tensor, protected: torch.Tensor | None, k: int) -> torch.Tensor:
    """(rows, n) bool: in every row of ``key`` (rows, n) the ``k`` lowest unprotected entries
    (stable ascending order; all unprotected ones where fewer than ``k``)."""
    mask = torch.zeros(key.shape, dtype=torch.bool, device=key.device)
    if k == 0:
        return mask
    order = torch.sort(key, dim=1, stable=True).indices  # (rows, n)
    if protected is None:
        return mask.scatter_(1, order[:, :k], True)
    free = ~protected.gather(1, order)  # unprotected, in score order
    return mask.scatter_(1, order, free & (free.cumsum(1) <= k))


def prune_mask(scores: torch.Tensor, sparsity: float, *, group: str = "row",
               protected: torch.Tensor | None = None, in_dim: int | None = 1) -> torch.Tensor:
    """Bool mask of ``scores``' shape, True = pruned: the lowest ``sparsity`` of each ``group``
    (``row``: every output row, its inputs along ``in_dim``; ``layer``: the whole tensor), never
    a ``protected`` (bool, same shape) weight."""
    s = check_sparsity(sparsity)
    check_mask(protected, scores.shape)
    if group not in ("row", "layer"):
        raise ValueError(f"prune_group: prune_mask takes row or layer (global: global_masks), got {group!r}")
    key = scores.detach().float()
    if key.numel() == 0:
        return torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if group == "row":
        rows = to_rows(key, in_dim)  # (outputs, inputs)
        prot = None if protected is None else to_rows(protected, in_dim)
        return from_rows(_lowest(rows, prot, int(rows.shape[1] * s)), scores, in_dim).contiguous()
    prot = None if protected is None else protected.reshape(1, -1)
    return _lowest(key.reshape(1, -1), prot, int(key.numel() * s)).view(scores.shape)


def global_masks(scores: Sequence[torch.Tensor], sparsity: float, *,
                 protected: Sequence[torch.Tensor | None]) -> list[torch.Tensor]:
    """One mask per tensor of ``scores`` (each on its tensor's device), True = pruned: the lowest
    ``int(total * sparsity)`` unprotected weights of all tensors together; ties by tensor order,
    then flat index."""
    s = check_sparsity(sparsity)
    if len(protected) != len(scores):
        raise ValueError(f"protected: one entry (a mask or None) per tensor, got {len(protected)} "
                         f"for {len(scores)} tensors")
    if not scores:
        return []
    dev = scores[0].device
    for t, p in zip(scores, protected):
        check_mask(p, t.shape)
    key = torch.cat([t.detach().reshape(-1).float().to(dev) for t in scores])[None]  # (1, total)
    prot = torch.cat([torch.zeros(t.numel(), dtype=torch.bool, device=dev) if p is None
                      else p.reshape(-1).to(dev) for t, p in zip(scores, protected)])[None]
    flat = _lowest(key, prot, int(key.shape[1] * s))[0]
    parts = flat.split([t.numel() for t in scores])
    return [m.view(t.shape).to(t.device) for m, t in zip(parts, scores)]


@dataclass(frozen=True)
class PruneCount:
    pruned: int  # weights in the masks
    asked: int  # what the sparsity asks for: the sum of every group's quota

    @property
    def shortfall(self) -> int:
        """Weights the protected sets kept from the quota (groups with too few unprotected weights)."""
        return self.asked - self.pruned


def pruned_counts(masks: Sequence[torch.Tensor], sparsity: float, *, group: str = "row",
                  in_dims: Sequence[int | None] | None = None) -> PruneCount:
    """How many weights ``masks`` prune and how many ``sparsity`` asks for under ``group``
    (``row``: rows x int(n_in * s) per tensor, inputs along ``in_dims`` (default 1 each);
    ``layer``: int(numel * s) per tensor; ``global``: int(total * s))."""
    s = check_sparsity(sparsity)
    dims = [1] * len(masks) if in_dims is None else list(in_dims)
    if len(dims) != len(masks):
        raise ValueError(f"in_dims: one per mask, got {len(dims)} for {len(masks)} masks")
    if group == "row":
        cols = [m.shape[-1 if d is None else d] for m, d in zip(masks, dims)]
        asked = sum(m.numel() // c * int(c * s) for m, c in zip(masks, cols))
    elif group == "layer":
        asked = sum(int(m.numel() * s) for m in masks)
    elif group == "global":
        asked = int(sum(m.numel() for m in masks) * s)
    else:
        raise ValueError(f"prune_group: unknown {group!r}; allowed: {', '.join(GROUPS)}")
    return PruneCount(sum(int(m.sum()) for m in masks), asked)
