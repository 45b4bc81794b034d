"""Super weights: the causal test (perplexity with candidates zeroed, random weights zeroed, and
zeroed with the massive activation written back)."""
from __future__ import annotations

import contextlib
import functools
import math
import time
from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..architectures import ParamRef, flat_index
from ..evaluate import Perplexity, eval_mode, perplexity
from ..perturb import perturbed
from ..selection import sample_without_replacement
from .detection import _capture_rows
from .plumbing import ZERO, _selection
from .records import Candidate, Detection


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
                seeds: Sequence[int] = (0, 1, 2), batch_size: int = 8, progress: bool = False,
                baseline: Perplexity | None = None) -> CausalTest:
    """Perplexity on held-out ``eval_windows`` (N, L) with each candidate (and all of them) zeroed;
    with as many random weights of the same tensors zeroed (one draw per seed; the candidates
    themselves never drawn); and zeroed but with the original massive activation written back
    (output channel ``row`` of its down projection, only at the tokens where the original
    |output| there exceeded the detection threshold ``threshold_out``). ``baseline``: the
    unperturbed model's perplexity on these windows with this ``batch_size`` when the caller
    has it already (the experiment's baseline: the same numbers), else measured here."""
    if baseline is not None and (baseline.n_windows, baseline.window_length) != tuple(eval_windows.shape):
        raise ValueError(f"baseline: measured on {baseline.n_windows} windows of {baseline.window_length} tokens, "
                         f"eval_windows are {tuple(eval_windows.shape)}; pass the baseline of these windows")
    with eval_mode(model):
        return _causal(model, detection, eval_windows, tuple(seeds), batch_size, progress, baseline)


def _causal(model, detection, eval_windows, seeds, batch_size, progress, baseline) -> CausalTest:
    t0 = time.perf_counter()
    refs = detection.refs
    targets = [(r.layer, r.name.rpartition(".")[0], r.module, r) for r in refs]  # as _down_proj_refs gives them
    mods = {r.layer: r.module for r in refs}
    ppl = functools.partial(perplexity, model, eval_windows, batch_size=batch_size, progress=progress)
    base = baseline if baseline is not None else ppl(desc="baseline ppl")
    cands = detection.candidates
    if not cands:
        return CausalTest(base, [], _causal_row(base, [], None, None, None), seeds, time.perf_counter() - t0)
    orig = _capture_rows(model, eval_windows, batch_size, targets, sorted({(c.layer, c.row) for c in cands}))
    flat = {c.key: flat_index(refs[c.layer].layout, refs[c.layer].shape, c.row, c.col) for c in cands}

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
