"""Super weights: detection by activation spikes, round by round (:func:`detect_super_weights`)."""
from __future__ import annotations

import logging
import math
import time
from typing import Sequence

import torch
from torch import nn

from ..architectures import flat_index, weight_row
from ..evaluate import eval_mode
from ..perturb import perturbed
from .plumbing import ZERO, _down_proj_refs, _forward_pass, _LayerPass, _selection, _threshold, _windows
from .records import Candidate, Detection, LayerTrace, SuperWeightOptions

log = logging.getLogger(__package__)  # "cwa_core.superweights", as before the split


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
            zeroed.append((c.layer, flat_index(refs[c.layer].layout, refs[c.layer].shape, c.row, c.col)))
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
    w_row = weight_row(ref.layout, ref.param.detach(), row).float()
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
