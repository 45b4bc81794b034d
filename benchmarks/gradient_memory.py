"""Peak resident memory of gradient scoring, as a multiple of the model's bytes.

* ``grad_x_weight``: ``cwa_core.metrics.score`` into a ``ScoreCollector`` (K=500, per_layer and
  global): one backward of the mean calibration loss, each tensor scored in its
  post-accumulate-grad hook and its gradient freed at once, decoder blocks checkpointed, the
  loss keeping only the logits for its backward pass.
* ``plain``: the textbook version, "backward, then score every ``.grad``" (a full set of
  gradients exists, and every block's activations at once).
* ``grad_squared``: per-window gradients into one fp32 accumulator per scored tensor.

Run: ``python -m benchmarks.gradient_memory [--quick]``.
"""
from __future__ import annotations

import time

from benchmarks import common
from cwa_core.architectures import scored_params
from cwa_core.evaluate import logits_of, nll_sum
from cwa_core.metrics import ScoreOptions, score
from cwa_core.selection import MODES, ScoreCollector, tensor_offsets

K = 500
VARIANTS = ("grad_x_weight", "plain", "grad_squared", "grad_x_weight_no_checkpoint")
DESCRIPTION = {
    "grad_x_weight": "score() in post-accumulate-grad hooks, blocks checkpointed",
    "grad_x_weight_no_checkpoint": "score() in hooks, every block's activations kept",
    "plain": "backward, then score every .grad",
    "grad_squared": "score(): per-window backward, fp32 accumulators",
}


def _settings(args) -> dict:
    windows, length = (2, 32) if args.quick else (args.windows, args.length)
    return {"windows": windows, "length": length, "k": K, "param_types": ["attention", "mlp", "norm"],
            "threads": 1 if args.quick else None}


def run_variant(variant: str, shape: common.Shape, s: dict, meter: common.PeakMeter) -> dict:
    model = common.build_model(shape)
    refs = scored_params(model, s["param_types"])
    calib = common.random_windows(s["windows"], s["length"], shape.vocab)
    collector = ScoreCollector(refs, s["k"], MODES)
    meter.start()
    t = time.perf_counter()
    if variant == "plain":
        _plain(model, refs, calib, collector)
    elif variant in ("grad_x_weight", "grad_squared"):
        score(model, refs, variant, calib, collector)
    elif variant == "grad_x_weight_no_checkpoint":
        score(model, refs, "grad_x_weight", calib, collector, ScoreOptions(checkpoint=False))
    else:
        raise ValueError(f"unknown variant {variant!r}")
    seconds = time.perf_counter() - t
    meter.stop()
    top = collector.selection("top_k", "global")
    return {"seconds": seconds, "top_score": float(top.scores[0]), "top_id": int(top.global_ids(tensor_offsets(refs))[0]),
            "scored_params": sum(r.numel for r in refs)}


def _plain(model, refs, calib, collector) -> None:
    """Backward of the mean loss with gradients on the scored tensors, then score each ``.grad``."""
    wanted = {id(r.param) for r in refs}
    for p in model.parameters():
        p.requires_grad_(id(p) in wanted)
        p.grad = None
    loss = nll_sum(logits_of(model, calib), calib) / (calib.shape[0] * (calib.shape[1] - 1))
    loss.backward()
    del loss
    for r in refs:
        collector(r, (r.param.detach() * r.param.grad).abs_())
    for p in model.parameters():
        p.grad = None
        p.requires_grad_(True)


def main(argv=None) -> dict:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--windows", type=int, default=4, help="calibration windows (default 4)")
    p.add_argument("--length", type=int, default=128, help="tokens per calibration window (default 128)")
    return common.run_main(__doc__, _run, argv, p)


def _run(args) -> dict:
    shape = common.shape_for(args)
    s = _settings(args)
    model = common.build_model(shape)
    info = common.shape_dict(shape, model)
    nbytes = info["bytes"]
    del model
    rows, figures = [], {}
    for v in VARIANTS:
        m = common.measure("gradient_memory", v, shape, s, nbytes, inprocess=args.inprocess)
        figures[v] = m
        rows.append([v, round(m["peak_x_model"], 3), round(m["extra_x_model"], 3), round(m["child"]["seconds"], 2),
                     DESCRIPTION[v]])
    same = figures["grad_x_weight"]["child"]["top_id"] == figures["plain"]["child"]["top_id"]
    print(f"gradient scoring memory: {shape.name} ({info['params'] / 1e6:.1f}M params, {nbytes / 2**20:.0f} MiB fp32), "
          f"{s['windows']} x {s['length']} calibration tokens, K={K}, scored: {', '.join(s['param_types'])}")
    print(common.table(rows, ["variant", "peak / model", "extra / model", "seconds", "what"]))
    print(common.memory_note(figures))
    print(f"grad_x_weight and plain agree on the global top weight: {same}")
    payload = {"settings": {**s, "model": info}, "figures": figures, "same_top_weight": same}
    common.write_result("gradient_memory", payload, args.out)
    return payload


if __name__ == "__main__":
    main()
