"""Random-K controls: per-layer against global, peak resident memory and time, side by side.

Per-layer random-K draws K weights in every scored tensor (one seeded stream per tensor, so a
smaller K is a prefix of a larger one); global random-K draws K over the whole scored set. The
per-layer draw must cost no more memory than the global one: a tensor's draw may not keep its
whole permutation alive (``rng.permutation(n)[:k]`` is a view that does).

Two steps, each in a fresh subprocess per variant (``common.measure``: peak above the same
command on a tiny model, in model bytes):

* ``select``: ``selection.random_selection`` alone, on the scored tensors of a model built on
  the meta device (shapes only, nothing resident): the draw's own memory and time;
* ``score_seed``: one scoring pass as an experiment runs it (``experiment.score_seed`` with
  ``magnitude``, the random-K control and the stability sample drawn inside), on the real
  float32 model: what the draw adds to a whole pass.

Variants: ``per_layer`` (K=5 per tensor) and ``global`` (K=1000), the audit's settings.

Run: ``python -m benchmarks.random_k_memory [--quick] [--out DIR]``.
"""
from __future__ import annotations

import time

import torch

from benchmarks import common
from cwa_core.architectures import scored_params
from cwa_core.experiment import score_seed
from cwa_core.metrics import ScoreOptions
from cwa_core.selection import random_selection

K = {"per_layer": 5, "global": 1000}
VARIANTS = tuple(K)
STEPS = ("select", "score_seed")


def _meta_model(shape: common.Shape):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(shape.config(), dtype=torch.float32)


def run_variant(variant: str, shape: common.Shape, s: dict, meter: common.PeakMeter) -> dict:
    """One step (``s["step"]``) of one variant; returns its seconds and selection size."""
    mode, k = variant, K[variant]
    model = _meta_model(shape) if s["step"] == "select" else common.build_model(shape)
    refs = scored_params(model)
    meter.start()
    t = time.perf_counter()
    if s["step"] == "select":
        n = len(random_selection(refs, k, mode, seed=0))
    else:
        ss = score_seed(model, refs, None, metric="magnitude", seed=0, k=k, modes=(mode,), max_samples=1,
                        opts=ScoreOptions())
        n = len(ss.selection("random_k", mode))
    seconds = time.perf_counter() - t
    meter.stop()
    return {"seconds": seconds, "n_selected": n}


def main(argv=None) -> dict:
    return common.run_main(__doc__, _run, argv)


def _run(args) -> dict:
    shape = common.shape_for(args)
    meta = _meta_model(shape)
    refs = scored_params(meta)
    info = {**common.shape_dict(shape, meta), "dtype": "torch.float32"}
    scored = sum(r.numel for r in refs)
    del meta, refs
    settings = {"threads": 1 if args.quick else None}
    mem = {step: {v: common.measure("random_k_memory", v, shape, {**settings, "step": step}, info["bytes"],
                                    inprocess=args.inprocess)
                  for v in VARIANTS} for step in STEPS}
    rows, ratios = [], {}
    for step in STEPS:
        m = mem[step]
        for v in VARIANTS:
            rows.append([step, f"{v} K={K[v]}", m[v]["child"]["n_selected"], round(m[v]["child"]["seconds"], 3),
                         round((m[v]["peak_bytes"] - m[v]["baseline_peak_bytes"]) / 2**20, 1),
                         round(m[v]["extra_x_model"], 4)])
        ratios[step] = {
            "peak_per_layer_over_global": m["per_layer"]["peak_bytes"] / m["global"]["peak_bytes"],
            "extra_per_layer_minus_global_x_model": m["per_layer"]["extra_x_model"] - m["global"]["extra_x_model"],
            "time_per_layer_over_global": m["per_layer"]["child"]["seconds"] / max(m["global"]["child"]["seconds"], 1e-9),
        }
    print(f"random-K: {shape.name} ({info['params'] / 1e6:.1f}M params, {info['bytes'] / 2**20:.0f} MiB float32), "
          f"{scored / 1e6:.1f}M scored weights in {len(scored_params(_meta_model(shape)))} tensors")
    print(common.table(rows, ["step", "variant", "weights drawn", "seconds", "peak MiB above tiny", "extra / model"]))
    for step, r in ratios.items():
        print(f"{step}: peak per_layer / global {r['peak_per_layer_over_global']:.3f}   "
              f"extra per_layer - global {r['extra_per_layer_minus_global_x_model']:+.4f} x model   "
              f"time per_layer / global {r['time_per_layer_over_global']:.2f}")
    print(common.memory_note(mem["select"]))
    payload = {
        "settings": {"k": K, "seed": 0, "scored_param_types": ["attention", "mlp", "norm"], "scored_weights": scored,
                     "model": info, "steps": {"select": "random_selection on a meta-device model",
                                              "score_seed": "score_seed(magnitude) on the float32 model"}},
        "ratios": ratios,
        "seconds": {step: {v: mem[step][v]["child"]["seconds"] for v in VARIANTS} for step in STEPS},
        "memory": mem,
    }
    common.write_result("random_k_memory", payload, args.out)
    return payload


if __name__ == "__main__":
    main()
