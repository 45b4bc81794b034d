"""sweep_overhead: the same cells through the sweep orchestrator (Ray actor, MLflow, manifest)
and through a plain in-process loop calling cwa_core directly; both on 2 CPU cores.

The plain loop does the same work the plan does (one model load, one baseline, one scoring
pass per metric and seed, prefixes for smaller K, every output file written), so the ratio is
the orchestration's own cost: Ray start-up, the actor, moving selections, MLflow logging.
With ``--two-actors`` it also times the sweep as this 2-core machine is best used: two actors
of one CPU each (one model load each), against the same plain loop.

    python -m benchmarks.sweep_overhead [--quick] [--pairs N] [--two-actors]
"""
from __future__ import annotations

import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from benchmarks.common import ASSETS, parser, table, write_result


def sweep_dict(quick: bool, actors: int = 1) -> dict:
    return {
        "name": "overhead", "model": str(ASSETS / "stories260k"), "data_file": str(ASSETS / "corpora" / "tinystories_val.txt"),
        "metric": {"grid_search": ["grad_x_weight", "grad_squared"]}, "topk": {"grid_search": [50, 200]},
        "mode": "global", "perturb": {"grid_search": ["sign_flip", "zero"]}, "seeds": [0, 1, 2],
        # a workload of about a minute for the plain loop on 2 cores (the size)
        "max_samples": 4 if quick else 24, "max_length": 64 if quick else 256,
        "eval_samples": 4 if quick else 224, "eval_length": 64 if quick else 256,
        "stability_check": True, "save_plots": False,
        "resources": {"cpus_per_actor": 2 // actors, "actors_per_model": actors},  # 2 cores in all
    }


def plain_loop(sweep, out: Path) -> dict:
    """What a researcher's script would do with cwa_core alone, sharing the same work: one
    in-process worker, one baseline, one scoring pass per metric and seed (at the largest K, every
    mode), then each cell run by the executor with those passes (:func:`cwa_core.cell.run_cell`)."""
    from cwa_core.cell import Shared, run_cell
    from cwa_core.outputs import write_experiment
    from cwa_core.sweep.worker import ModelWorker

    cfg0 = sweep.cells[0].config
    worker = ModelWorker(cfg0)
    base = worker.baseline(cfg0)
    k_max = max(c.config.topk for c in sweep.cells)
    modes = tuple(sorted({c.config.mode for c in sweep.cells}))
    scores = {(metric, seed): worker.score(replace(cfg0, metric=metric), seed, k_max, modes)
              for metric in sorted({c.config.metric for c in sweep.cells}) for seed in cfg0.seeds}
    info = worker.loaded.info
    for cell in sweep.cells:
        cfg = replace(cell.config, out_dir=str(out / cell.id))
        res = run_cell(worker, cfg, shared=Shared(base, None, {s: scores[(cfg.metric, s)] for s in cfg.seeds}))
        write_experiment(out / cell.id, res, model_info=info.__dict__, device=info.device, dtype=info.dtype,
                         started=time.perf_counter())
    return {"model_loads": 1}


def run_sweep(sweep, out: Path) -> dict:
    """The whole command's work: Ray start-up included, shut down afterwards."""
    from cwa_core.sweep.runner import SweepRunner

    # the runner shuts down a Ray it started and times that (ray_shutdown_s); one someone else
    # started (the test session's) is left running
    m = SweepRunner(sweep, out, tracking_uri=f"sqlite:///{out}/mlflow.db", progress=False, num_cpus=2).run()
    return {"model_loads": m["model_loads"], "scoring_passes": m["scoring_passes"],
            "timings_s": {"ray_shutdown_s": 0.0, **m["runs"][-1]["timings_s"]}}


def main(argv=None) -> dict:
    from cwa_core.sweep import spec

    p = parser(__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=3, help="rounds of the variants, interleaved (default 3)")
    p.add_argument("--two-actors", action="store_true",
                   help="also time the sweep with 2 actors of 1 CPU each (how this 2-core machine is best used)")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    variants = {"plain": None, "sweep": 1, **({"sweep_2x1": 2} if args.two_actors else {})}  # name -> actors
    sweeps = {v: spec.parse(sweep_dict(args.quick, n)) for v, n in variants.items() if n}
    cells = sweeps["sweep"].cells
    times: dict[str, list[float]] = {v: [] for v in variants}
    counts: dict[str, dict] = {}
    rounds = 1 if args.quick else args.pairs
    names = list(variants)
    order = [v for i in range(rounds) for v in (names if i % 2 == 0 else names[::-1])]  # fair to each side
    breakdown: dict[str, list[dict]] = {v: [] for v in sweeps}
    numbers: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, variant in enumerate(order):
            out = Path(tmp) / f"{variant}{i}"
            t = time.perf_counter()
            counts[variant] = plain_loop(sweeps["sweep"], out) if variant == "plain" else run_sweep(sweeps[variant], out)
            times[variant].append(time.perf_counter() - t)
            if variant != "plain":
                breakdown[variant].append(counts[variant]["timings_s"])
            numbers.setdefault(variant, [r["ppl"] for c in cells
                                         for r in json.loads((out / c.id / "perturbation_results.json").read_text())["results"]])
    mean = {v: sum(ts) / len(ts) for v, ts in times.items()}
    ratio = {v: mean[v] / mean["plain"] for v in sweeps}
    same = {v: numbers[v] == numbers["plain"] for v in sweeps}
    max_rel = {v: max(abs(a / b - 1) for a, b in zip(numbers[v], numbers["plain"])) for v in sweeps}
    label = {"plain": "plain loop (cwa_core, 2 threads)", "sweep": "sweep: 1 actor x 2 CPUs",
             "sweep_2x1": "sweep: 2 actors x 1 CPU"}
    rows = [[label[v], mean[v], round(ratio.get(v, 1.0), 3), counts[v]["model_loads"],
             "" if v == "plain" else f"{same[v]} (max rel. diff {max_rel[v]:.1e})"] for v in variants]
    print(table(rows, ["variant", "seconds", "/ plain", "model loads", "same perplexities"]))
    print(f"{len(cells)} cells, {counts['sweep']['scoring_passes']} scoring passes; {rounds} rounds, order {order}")
    parts = {v: {k: sum(b.get(k, float("nan")) for b in bs) / len(bs) for k in bs[0]} for v, bs in breakdown.items()}
    for v, ps in parts.items():
        print(f"{label[v]}, its own steps (mean s): " + ", ".join(f"{k} {x:.2f}" for k, x in ps.items()))
    payload = {"settings": sweep_dict(args.quick), "cells": len(cells), "runs": times, "order": order,
               "plain_seconds": mean["plain"], "sweep_seconds": mean["sweep"], "ratio": ratio["sweep"],
               "model_loads": counts["sweep"]["model_loads"], "scoring_passes": counts["sweep"]["scoring_passes"],
               "same_numbers": same["sweep"], "max_relative_difference": max_rel, "sweep_steps_s": parts["sweep"],
               "quick": args.quick}
    if "sweep_2x1" in sweeps:
        payload["two_actors"] = {"seconds": mean["sweep_2x1"], "ratio": ratio["sweep_2x1"],
                                 "model_loads": counts["sweep_2x1"]["model_loads"],
                                 "scoring_passes": counts["sweep_2x1"]["scoring_passes"],
                                 "same_numbers": same["sweep_2x1"], "steps_s": parts["sweep_2x1"]}
    write_result("sweep_overhead", payload, args.out)
    return payload


if __name__ == "__main__":
    main()
