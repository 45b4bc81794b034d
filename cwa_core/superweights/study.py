"""Super weights: the ``super_weights.json`` report and one whole study (detection, causal test,
registry; ranks filled in after scoring)."""
from __future__ import annotations

from dataclasses import asdict
from torch import nn

from ..architectures import matrix_shape
from ..evaluate import Perplexity
from .causal import CausalTest, causal_test
from .detection import detect_super_weights
from .plumbing import _threshold
from .ranks import RankSinks, _ranks_of
from .records import CONVENTION, Coordinate, Detection, StudyLabels, StudyRequest
from .registry import REPORTED_BY, match_published, published_coordinates


def super_weights_report(detection: Detection, causal: CausalTest | None, labels: StudyLabels, *,
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
    prompts = {"source": labels.prompt_source, "n_windows": detection.n_windows, "length": detection.length}
    if detection.n_windows == 1 and labels.prompt_text is not None:
        prompts["text"] = labels.prompt_text
    return {
        "model_id": labels.model_id, "hf_id": labels.hf_id, "dtype": labels.dtype, "convention": CONVENTION,
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


def super_weight_study(model: nn.Module, request: StudyRequest, *,
                       baseline: Perplexity | None = None) -> tuple[dict, list[Coordinate]]:
    """Detection, the causal test and the registry's coordinates, in one: the report (its ranks
    still empty: :func:`add_ranks` fills them after scoring) and the coordinates to rank under a
    metric (the candidates, then the published and the reported_by ones of the request's ``hf_id``).
    ``baseline``: the unperturbed perplexity of ``request.eval_windows`` when already measured (see
    :func:`causal_test`)."""
    hf_id = request.labels.hf_id
    det = detect_super_weights(model, request.prompts, request.options)
    causal = causal_test(model, det, request.eval_windows, seeds=request.seeds, batch_size=request.batch_size,
                         baseline=baseline)
    extra = [*published_coordinates(model, hf_id),  # detection has refused a model without down projections
             *published_coordinates(model, hf_id, REPORTED_BY)]
    published = match_published(hf_id, det.candidates, None, shapes={r.layer: matrix_shape(r.layout, r.shape) for r in det.refs})
    report = super_weights_report(det, causal, request.labels, published=published)
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
