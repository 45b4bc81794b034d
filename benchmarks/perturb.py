"""Apply and restore K=1000 sign flips, against one perplexity evaluation and a full-copy restore.

Ours: ``cwa_core.perturb.perturbed`` (saves the touched entries' raw bits only, writes them back
on exit). Full copy: clone every weight, flip, restore by copying everything back. The flips are
1000 weights drawn uniformly over the whole scored set (so most tensors are touched). Times are
medians of interleaved repetitions; memory is each one's peak above the resident model.

Run: ``python -m benchmarks.perturb [--quick]``.
"""
from __future__ import annotations

import statistics as st

import torch

from benchmarks import common
from cwa_core.architectures import scored_params
from cwa_core.evaluate import perplexity
from cwa_core.perturb import PERTURBATIONS, PerturbSpec, perturbed
from cwa_core.selection import random_selection

K = 1000
SPEC = PerturbSpec("sign_flip").resolved()  # scale 1.0: the plain flip
VARIANTS = ("ours", "full_copy")


def ours(refs, sel) -> None:
    with perturbed(refs, sel, SPEC):
        pass


def full_copy(model, refs, sel) -> None:
    """The textbook way: keep a copy of every weight, perturb, copy everything back."""
    with torch.no_grad():
        backup = [p.detach().clone() for p in model.parameters()]
        flip = PERTURBATIONS.get(SPEC.method).apply
        for tid, idx in sel.by_tensor().items():
            flip(refs[tid].param.data.view(-1), idx, SPEC)
        for p, b in zip(model.parameters(), backup):
            p.copy_(b)


def run_variant(variant: str, shape: common.Shape, s: dict, meter: common.PeakMeter) -> dict:
    model = common.build_model(shape)
    refs = scored_params(model)
    sel = random_selection(refs, s["k"], "global", seed=0)
    meter.start()
    if variant == "ours":
        ours(refs, sel)
    elif variant == "full_copy":
        full_copy(model, refs, sel)
    else:
        raise ValueError(f"unknown variant {variant!r}")
    meter.stop()
    return {}


def main(argv=None) -> dict:
    return common.run_main(__doc__, _run, argv)


def _run(args) -> dict:
    shape = common.shape_for(args)
    windows, length = (4, 256) if not args.quick else (2, 64)
    model = common.build_model(shape)
    refs = scored_params(model)
    info = common.shape_dict(shape, model)
    sel = random_selection(refs, K, "global", seed=0)
    touched = sorted(sel.by_tensor())
    before = [refs[t].param.detach().clone() for t in touched]
    ev = common.random_windows(windows, length, shape.vocab, seed=1)

    ours(refs, sel)  # warm-up (and the exactness check below)
    full_copy(model, refs, sel)
    restored = all(torch.equal(refs[t].param.view(torch.int32), b.view(torch.int32)) for t, b in zip(touched, before))
    del before
    with perturbed(refs, sel, SPEC):
        ppl_perturbed = perplexity(model, ev).ppl
    ppl_base = perplexity(model, ev).ppl

    ppl_reps, fast_reps = (2, 20) if not args.quick else (1, 5)
    t_ppl, t_ours, t_copy = [], [], []
    for _ in range(ppl_reps):  # interleaved so that load changes hit all three alike
        t_ppl.append(common.timed(lambda: perplexity(model, ev)))
        for _ in range(fast_reps):
            t_ours.append(common.timed(lambda: ours(refs, sel)))
        for _ in range(max(2, fast_reps // 5)):
            t_copy.append(common.timed(lambda: full_copy(model, refs, sel)))
    times = {"perplexity": st.median(t_ppl), "ours": st.median(t_ours), "full_copy": st.median(t_copy)}
    del model, refs
    mem = {v: common.measure("perturb", v, shape, {"k": K, "threads": 1 if args.quick else None}, info["bytes"], inprocess=args.inprocess) for v in VARIANTS}
    ratio_ppl = times["ours"] / times["perplexity"]
    ratio_copy = times["ours"] / times["full_copy"]
    rows = [["ours (touched entries' bits)", round(times["ours"] * 1e3, 3), round(mem["ours"]["extra_x_model"], 4)],
            ["full copy restore", round(times["full_copy"] * 1e3, 3), round(mem["full_copy"]["extra_x_model"], 4)],
            [f"one perplexity ({windows} x {length} tokens)", round(times["perplexity"] * 1e3, 1), ""]]
    print(f"apply + restore {K} sign flips: {shape.name} ({info['params'] / 1e6:.1f}M params, "
          f"{info['bytes'] / 2**20:.0f} MiB {info['dtype']}), {len(touched)} tensors touched")
    print(common.table(rows, ["what", "ms (median)", "extra / model"]))
    print(f"ours / one perplexity evaluation: {ratio_ppl:.2e}   ours / full copy: {ratio_copy:.3f}   "
          f"restored bit for bit: {restored}   perplexity moved by the flips: {ppl_perturbed != ppl_base}")
    print(common.memory_note(mem))
    payload = {
        "settings": {"k": K, "perturbation": "sign_flip", "selection": "random_k global (seed 0)",
                     "eval_windows": windows, "eval_length": length, "tensors_touched": len(touched), "model": info},
        "seconds": times, "ratio_to_perplexity": ratio_ppl, "ratio_to_full_copy": ratio_copy,
        "restored_exactly": restored, "perplexity_changed": ppl_perturbed != ppl_base,
        **common.memory_figures(mem),
    }
    common.write_result("perturb", payload, args.out)
    return payload


if __name__ == "__main__":
    main()
