"""Global top-K: per-tensor top-K then an exact running merge, against "concatenate, then topk".

Ours: ``cwa_core.metrics.score(..., "magnitude", ...)`` into a ``ScoreCollector`` in global mode
(each tensor's |w| is reduced to its top and bottom K, statistics and samples, then dropped).
Naive: ``torch.topk(torch.cat([|w| for every tensor]), K)``. Same answer (the same set of global
ids), the time ratio (interleaved repetitions, medians), and each one's peak memory above the
resident model, as a fraction of the model's bytes.

Run: ``python -m benchmarks.topk [--quick]``.
"""
from __future__ import annotations

import torch

from benchmarks import common
from cwa_core.architectures import scored_params
from cwa_core.metrics import score
from cwa_core.selection import ScoreCollector, tensor_offsets

K = 1000
VARIANTS = ("ours", "naive")


def ours(model, refs, k: int = K) -> torch.Tensor:
    """Global ids of the top ``k`` |w|, by ScoreCollector (per-tensor top-K + exact merge)."""
    col = ScoreCollector(refs, k, ("global",))
    score(model, refs, "magnitude", None, col)
    return col.selection("top_k", "global").global_ids(tensor_offsets(refs))


def naive(model, refs, k: int = K) -> torch.Tensor:
    """Global ids of the top ``k`` |w|, by concatenating every score first."""
    everything = torch.cat([r.param.detach().abs().reshape(-1) for r in refs])
    return torch.topk(everything, k).indices


def run_variant(variant: str, shape: common.Shape, s: dict, meter: common.PeakMeter) -> dict:
    model = common.build_model(shape)
    refs = scored_params(model)
    fn = {"ours": ours, "naive": naive}[variant]
    meter.start()
    ids = fn(model, refs, s["k"])
    meter.stop()
    return {"n_ids": int(ids.numel())}


def main(argv=None) -> dict:
    return common.run_main(__doc__, _run, argv)


def _run(args) -> dict:
    shape = common.shape_for(args)
    reps = 2 if args.quick else 3
    model = common.build_model(shape)
    refs = scored_params(model)
    info = common.shape_dict(shape, model)
    scored = sum(r.numel for r in refs)
    a, b = ours(model, refs), naive(model, refs)
    same = bool(torch.equal(torch.sort(a).values, torch.sort(b).values))
    times = common.side_by_side({"ours": lambda: ours(model, refs), "naive": lambda: naive(model, refs)}, reps)
    del model, refs
    s = {"k": K, "threads": 1 if args.quick else None}
    mem = {v: common.measure("topk", v, shape, s, info["bytes"], inprocess=args.inprocess) for v in VARIANTS}
    rows = [[v, round(times[v], 3), round(mem[v]["extra_x_model"], 4), round(mem[v]["peak_x_model"], 3)] for v in VARIANTS]
    ratio = times["ours"] / times["naive"]
    print(f"global top-{K} of |w|: {shape.name} ({info['params'] / 1e6:.1f}M params, {info['bytes'] / 2**20:.0f} MiB "
          f"{info['dtype']}), {scored / 1e6:.1f}M scored weights (attention, mlp, norm)")
    print(common.table(rows, ["variant", "seconds (median)", "extra / model", "peak / model"]))
    print(f"time ours / naive: {ratio:.3f}   same set of global ids: {same}")
    print(common.memory_note(mem))
    payload = {
        "settings": {"k": K, "reps": reps, "scored_param_types": ["attention", "mlp", "norm"],
                     "scored_weights": scored, "model": info},
        "same_answer": same, "seconds": times, "time_ratio_ours_over_naive": ratio,
        **common.memory_figures(mem, peak=True),
    }
    common.write_result("topk", payload, args.out)
    return payload


if __name__ == "__main__":
    main()
