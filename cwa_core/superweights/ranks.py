"""Super weights: ranks of tracked weights under a metric (:class:`CandidateRanks` while scoring,
:class:`RankTable` read back from its entries)."""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch

from ..architectures import ParamRef, flat_index, matrix_shape
from .records import Coordinate


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
                rows, cols = matrix_shape(ref.layout, ref.shape)
                if 0 <= c.row < rows and 0 <= c.col < cols:
                    self._by_tensor.setdefault(ref.name, []).append((c.key, flat_index(ref.layout, ref.shape, c.row, c.col)))

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
