"""sweep_overhead: the same cells through the sweep orchestrator (Ray actor, MLflow, manifest)
and through a plain in-process loop calling cwa_core directly; both on 2 CPU cores.

The plain loop does the same work the plan does (one model load, one baseline, one scoring
pass per metric and seed, prefixes for smaller K, every output file written), so the ratio is
the orchestration's own cost: Ray start-up, the actor, moving selections, MLflow logging.

    python -m benchmarks.sweep_overhead [--quick]
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from benchmarks.common import ROOT, parser, table, write_result

ASSETS = Path(os.environ.get("CWA_ASSETS", ROOT.parent / "shared" / "assets"))


def sweep_dict(quick: bool) -> dict:
    return {
        "name": "overhead", "model": str(ASSETS / "stories260k"), "data_file": str(ASSETS / "corpora" / "tinystories_val.txt"),
        "metric": {"grid_search": ["grad_x_weight", "grad_squared"]}, "topk": {"grid_search": [50, 200]},
        "mode": "global", "perturb": {"grid_search": ["sign_flip", "zero"]}, "seeds": [0, 1, 2],
        # a workload of about a minute for the plain loop on 2 cores (the size)
        "max_samples": 4 if quick else 24, "max_length": 64 if quick else 256,
        "eval_samples": 4 if quick else 224, "eval_length": 64 if quick else 256,
        "stability_check": True, "save_plots": False,
        "resources": {"cpus_per_actor": 2, "actors_per_model": 1},
    }


def plain_loop(sweep, out: Path) -> dict:
    """What a researcher's script would do with cwa_core alone, sharing the same work."""
    from cwa_core.experiment import ExperimentResult, evaluate_selection, load_split, score_seed, stability_report
    from cwa_core.evaluate import perplexity
    from cwa_core.architectures import scored_params
    from cwa_core.metrics import ScoreOptions
    from cwa_core.models import load_model
    from cwa_core.outputs import write_experiment
    from cwa_core.perturb import PerturbSpec
    from cwa_core.selection import tensor_offsets

    cfg0 = sweep.cells[0].config
    lm = load_model(cfg0.model, dtype=cfg0.dtype, device=cfg0.device)
    split = load_split(cfg0, lm.tokenizer)
    refs = scored_params(lm.model, cfg0.param_types)
    tensors = [{"name": r.name, "layer": r.layer, "param_type": r.param_type, "shape": list(r.shape)} for r in refs]
    base = perplexity(lm.model, split.eval_windows(), batch_size=cfg0.eval_batch_size)
    k_max = max(c.config.topk for c in sweep.cells)
    modes = sorted({c.config.mode for c in sweep.cells})
    scores = {}
    for metric in sorted({c.config.metric for c in sweep.cells}):
        for seed in cfg0.seeds:
            scores[(metric, seed)] = score_seed(lm.model, refs, split, metric=metric, seed=seed, k=k_max, modes=modes,
                                                max_samples=cfg0.max_samples, opts=ScoreOptions(cfg0.micro_batch))
    for cell in sweep.cells:
        cfg = cell.config
        rows = []
        for seed in cfg.seeds:
            ss = scores[(cfg.metric, seed)]
            for kind in ("top_k", *cfg.controls):
                rows.append(evaluate_selection(lm.model, refs, ss.selection(kind, cfg.mode, cfg.topk),
                                               PerturbSpec(cfg.perturb, cfg.perturb_scale, cfg.perturb_bit, seed),
                                               split.eval_windows(), base, seed=seed, batch_size=cfg.eval_batch_size))
        seed_scores = [scores[(cfg.metric, s)] for s in cfg.seeds]
        stab = stability_report(seed_scores, k=cfg.topk, mode=cfg.mode, offsets=tensor_offsets(refs))
        res = ExperimentResult(replace(cfg, out_dir=str(out / cell.id)), base, rows, seed_scores, stab,
                               split.describe(), tensors, {})
        write_experiment(out / cell.id, res, model_info=lm.info.__dict__, device=lm.info.device, dtype=lm.info.dtype,
                         started=time.perf_counter())
    return {"model_loads": 1}


def run_sweep(sweep, out: Path) -> dict:
    """The whole command's work: Ray start-up included, shut down afterwards."""
    import ray

    from cwa_core.sweep.runner import SweepRunner

    ours = not ray.is_initialized()  # a Ray someone else started (the test session's) is left running
    try:
        m = SweepRunner(sweep, out, tracking_uri=f"sqlite:///{out}/mlflow.db", progress=False, num_cpus=2).run()
    finally:
        t = time.perf_counter()
        if ours:
            ray.shutdown()
        shutdown = time.perf_counter() - t
    return {"model_loads": m["model_loads"], "scoring_passes": m["scoring_passes"],
            "timings_s": {**m["runs"][-1]["timings_s"], "ray_shutdown_s": shutdown}}


def main(argv=None) -> dict:
    from cwa_core.sweep import spec

    p = parser(__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=3, help="plain/sweep pairs, interleaved (default 3)")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    sweep = spec.parse(sweep_dict(args.quick))
    times: dict[str, list[float]] = {"plain": [], "sweep": []}
    pairs = 1 if args.quick else args.pairs
    order = [v for i in range(pairs) for v in (("plain", "sweep") if i % 2 == 0 else ("sweep", "plain"))]  # fair to both
    breakdown = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, variant in enumerate(order):
            out = Path(tmp) / f"{variant}{i}"
            t = time.perf_counter()
            counts = plain_loop(sweep, out) if variant == "plain" else run_sweep(sweep, out)
            times[variant].append(time.perf_counter() - t)
            if variant == "sweep":
                swept = counts
                breakdown.append(counts["timings_s"])
            else:
                plain = counts
        first = {v: Path(tmp) / f"{v}{order.index(v)}" / sweep.cells[0].id / "perturbation_results.json" for v in times}
        a, b = (json.loads(first[v].read_text()) for v in ("plain", "sweep"))
        same = [r["ppl"] for r in a["results"]] == [r["ppl"] for r in b["results"]]
    t_plain, t_sweep = (sum(times[v]) / len(times[v]) for v in ("plain", "sweep"))
    rows = [["plain loop (cwa_core)", t_plain, plain["model_loads"]],
            ["sweep (Ray + MLflow)", t_sweep, swept["model_loads"]]]
    print(table(rows, ["variant", "seconds", "model loads"]))
    ratio = t_sweep / t_plain
    print(f"sweep / plain = {ratio:.3f} ({len(sweep.cells)} cells, {swept['scoring_passes']} scoring passes; "
          f"same numbers: {same})")
    parts = {k: sum(b.get(k, float("nan")) for b in breakdown) / len(breakdown) for k in breakdown[0]}
    print("sweep's own steps (mean s): " + ", ".join(f"{k} {v:.2f}" for k, v in parts.items()))
    payload = {"settings": sweep_dict(args.quick), "cells": len(sweep.cells), "runs": times, "plain_seconds": t_plain,
               "sweep_seconds": t_sweep, "ratio": ratio, "model_loads": swept["model_loads"],
               "scoring_passes": swept["scoring_passes"], "same_numbers": same, "quick": args.quick,
               "sweep_steps_s": parts, "order": order}
    write_result("sweep_overhead", payload, args.out)
    return payload


if __name__ == "__main__":
    main()
