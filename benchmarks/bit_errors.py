"""One bit-error trial of one arm against one perplexity evaluation of the same windows, and the
extra memory of draw + apply + restore at two model sizes and two flip counts.

Time: (a) ``perplexity`` of the windows; (b) one trial of the issue-17 ``bit_errors`` campaign
for one arm (a random K=1000 protected set), timed as ``campaign.run_trial`` runs it: the draw,
the flips applied outside the set, the perplexity, the restore and its check, the row.
Each repetition runs (a), (b) and (c) back to back in rotating order, (c) being the perplexity alone
of the model with (b)'s draw already applied; the ratios are the medians of the repetitions' b / a
(the claim: <= 1.05) and b / c (what draw + apply + restore add to evaluating the perturbed model;
b / a also holds any change in the perturbed model's own evaluation cost).

Memory: draw + apply + restore (no perplexity) with a fixed number of flips on the model's
dimensions at 2 and 20 decoder blocks (10x the scored weights), and with 10x the flips on the
small one. ``traced``: tracemalloc's peak (numpy and Python allocations); ``rss``: the process's
peak resident memory above its start (torch's CPU tensors included, page-granular); ``cuda``:
``torch.cuda.max_memory_allocated`` above its start, on a GPU. The claim: 10x the weights at the
same flips adds little (O(flips), not O(weights)); 10x the flips adds about 10x.

Run: ``python -m benchmarks.bit_errors [--quick] [--rate R] [--reps N]``.
"""
from __future__ import annotations

import dataclasses
import gc
import statistics
import tracemalloc

import numpy as np
import torch

from benchmarks import common
from cwa_core import campaign as cp
from cwa_core.architectures import scored_params
from cwa_core.evaluate import perplexity
from cwa_core.selection import random_selection, tensor_offsets

K = 1000
SPEC = cp.CampaignSpec("bit_errors")
LIMIT = 1.05  # the bound on (trial) / (perplexity)


def _parser():
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--rate", type=float, default=None, help="error rate per stored bit (default 1e-7; quick 1e-4)")
    p.add_argument("--reps", type=int, default=None, help="interleaved repetitions (default 7; quick 3)")
    p.add_argument("--flips", type=int, default=None, help="flips of the memory runs (default 10,000; quick 2,000)")
    return p


def main(argv=None) -> dict:
    return common.run_main(__doc__, _run, argv, _parser())


def _setup(shape: common.Shape, device: torch.device):
    model = common.build_model(shape).to(device)
    refs = scored_params(model)
    ids = cp.protected_sets({"random_k": random_selection(refs, K, "global", seed=0)}, tensor_offsets(refs),
                            ["random_k"])["random_k"]
    return model, refs, ids


def trial(model, refs, ids, windows, rate: float, n: int) -> float:
    """One arm of one trial: ``campaign.run_trial`` itself (draw, apply, perplexity, restore, the row)."""
    (row,) = cp.run_trial(model, refs, windows, SPEC, {"random_k": ids}, level=rate, seed=0, trial=n)
    return row["ppl"]


def overhead(refs, ids, rate: float, n: int) -> int:
    """Draw + apply + restore alone; the number of flips drawn."""
    draw = cp.draw_errors(refs, rate, cp.draw_rng(0, n, rate))
    with cp.applied(refs, SPEC, ids, rate, draw=draw):
        pass
    return len(draw)


def memory(refs, ids, flips: int, device: torch.device) -> dict:
    """Extra memory of :func:`overhead` at the rate that gives ``flips`` flips on average."""
    n_bits = sum(r.numel * 8 * r.param.element_size() for r in refs)
    rate = flips / n_bits
    overhead(refs, ids, rate, 0)  # warm-up: first-call allocations are not the draw's
    gc.collect()
    meter = common.PeakMeter()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        cuda0 = torch.cuda.memory_allocated()
    meter.start()
    tracemalloc.start()
    drawn = overhead(refs, ids, rate, 1)
    traced = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    meter.stop()
    out = {"weights": sum(r.numel for r in refs), "rate": rate, "flips": drawn, "traced_bytes": traced,
           "rss_bytes": meter.peak - meter.rss_start, "traced_bytes_per_flip": traced / max(drawn, 1)}
    if device.type == "cuda":
        torch.cuda.synchronize()
        out["cuda_bytes"] = torch.cuda.max_memory_allocated() - cuda0
    return out


def _memory_runs(shape: common.Shape, flips: int, device: torch.device) -> dict:
    """Fixed flips at 2 and 20 blocks (10x weights); 10x flips at 2 blocks."""
    runs = {}
    for name, layers, f in (("small", 2, flips), ("10x_weights", 20, flips), ("10x_flips", 2, 10 * flips)):
        model, refs, ids = _setup(dataclasses.replace(shape, name=f"{shape.name}-{layers}l", layers=layers), device)
        runs[name] = {"layers": layers, **memory(refs, ids, f, device)}
        del model, refs
        gc.collect()
    return runs


def _timing(model, refs, ids, windows, rate: float, reps: int) -> dict:
    """Per repetition, back to back in rotating order: (a) the clean perplexity, (b) a trial, and
    (c) the perplexity alone of the model with (b)'s draw applied beforehand (what the perturbed
    model costs to evaluate, apart from draw + apply + restore). Medians, and the medians of each
    repetition's b / a and b / c (a load change hits all three alike)."""
    before = [r.param.detach().clone() for r in refs]
    base = perplexity(model, windows).ppl
    times: dict[str, list[float]] = {"perplexity": [], "trial": [], "perturbed_perplexity": [],
                                     "draw_apply_restore": []}

    def perturbed(n: int) -> None:
        draw = cp.draw_errors(refs, rate, cp.draw_rng(0, n, rate))
        with cp.applied(refs, SPEC, ids, rate, draw=draw):
            times["perturbed_perplexity"].append(common.timed(lambda: perplexity(model, windows)))

    for rep in range(reps):
        steps = [lambda: times["perplexity"].append(common.timed(lambda: perplexity(model, windows))),
                 lambda: times["trial"].append(common.timed(lambda: trial(model, refs, ids, windows, rate, rep))),
                 lambda: perturbed(rep)]
        for step in steps[rep % 3:] + steps[:rep % 3]:
            step()
        times["draw_apply_restore"].append(common.timed(lambda: overhead(refs, ids, rate, rep)))
    restored = all(torch.equal(r.param, b) for r, b in zip(refs, before))
    ratios = [t / p for t, p in zip(times["trial"], times["perplexity"])]
    same_model = [t / p for t, p in zip(times["trial"], times["perturbed_perplexity"])]
    return {"seconds": {k: statistics.median(v) for k, v in times.items()}, "ratio": statistics.median(ratios),
            "ratio_to_perturbed_perplexity": statistics.median(same_model), "ratios": ratios,
            "ratios_to_perturbed_perplexity": same_model, "restored_exactly": restored, "baseline_ppl": base,
            "flips_per_draw": [overhead(refs, ids, rate, n) for n in range(3)]}


def _run(args) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    shape = common.shape_for(args)
    rate = args.rate if args.rate is not None else (1e-4 if args.quick else 1e-7)
    reps = args.reps or (3 if args.quick else 7)
    flips = args.flips or (2_000 if args.quick else 10_000)
    n_windows, length = (2, 64) if args.quick else (4, 256)
    model, refs, ids = _setup(shape, device)
    info = common.shape_dict(shape, model)
    windows = common.random_windows(n_windows, length, shape.vocab, seed=1)
    timing = _timing(model, refs, ids, windows, rate, reps)
    del model, refs
    gc.collect()
    mem = _memory_runs(shape, flips, device)
    weights_growth = mem["10x_weights"]["traced_bytes"] / mem["small"]["traced_bytes"]
    flips_growth = mem["10x_flips"]["traced_bytes"] / mem["small"]["traced_bytes"]
    verdict = "PASS" if timing["ratio"] <= LIMIT else "FAIL"
    memory_verdict = "PASS" if weights_growth < 2 < flips_growth else "FAIL"
    t = timing["seconds"]
    print(f"bit-error trial, one arm (random K={K} protected): {shape.name} ({info['params'] / 1e6:.1f}M params, "
          f"{info['dtype']}) on {device.type}, rate {rate:g} ({np.mean(timing['flips_per_draw']):.0f} flips a draw), "
          f"{n_windows} x {length} tokens")
    print(common.table([["perplexity (a)", round(t["perplexity"] * 1e3, 2)], ["trial (b)", round(t["trial"] * 1e3, 2)],
                        ["perplexity of the perturbed model (c)", round(t["perturbed_perplexity"] * 1e3, 2)],
                        ["draw + apply + restore", round(t["draw_apply_restore"] * 1e3, 3)]], ["what", "ms (median)"]))
    print(f"b / a = {timing['ratio']:.4f} (limit {LIMIT}): {verdict}   b / c = {timing['ratio_to_perturbed_perplexity']:.4f}"
          f"   restored bit for bit: {timing['restored_exactly']}")
    print(common.table([[k, v["layers"], v["weights"], v["flips"], v["traced_bytes"], v["rss_bytes"], v.get("cuda_bytes", "")]
                        for k, v in mem.items()], ["memory run", "blocks", "weights", "flips", "traced B", "rss B", "cuda B"]))
    print(f"traced bytes: 10x weights -> x{weights_growth:.2f}, 10x flips -> x{flips_growth:.2f}: "
          f"O(flips), not O(weights): {memory_verdict}")
    payload = {
        "settings": {"k": K, "rate": rate, "reps": reps, "eval_windows": n_windows, "eval_length": length,
                     "memory_flips": flips, "device": device.type, "model": info},
        **timing, "limit": LIMIT, "verdict": verdict,
        "memory_runs": mem, "traced_growth": {"10x_weights": weights_growth, "10x_flips": flips_growth},
        "memory_verdict": memory_verdict,
    }
    common.write_result("bit_errors", payload, args.out)
    return payload


if __name__ == "__main__":
    main()
