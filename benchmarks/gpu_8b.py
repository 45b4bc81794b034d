"""The standard experiment on Llama-3.1-8B and Mistral-7B shapes, one GPU, stage by stage.

Each model is built from its published config (shapes only: random bf16 weights, nothing
downloaded) directly on the GPU, then runs the standard experiment through the executor that
every experiment runs through (``cwa_core.cell.run_cell``, its stages timed): baseline
perplexity; for seeds 0, 1, 2: grad_x_weight scoring (per_layer, K=500, 30 calibration
windows) and sign_flip evaluations of top_k and the random_k and bottom_k controls; the
stability report; plus magnitude global top-1000. Reported per stage: wall time and peak GPU
memory; for the perplexity pass: tokens per second and model FLOP utilisation (MFU).
Token windows are random ids (no data download). The whole run must take under 8 minutes.

Without CUDA (or with ``--cpu-smoke``) the same code runs on the CPU with the same configs
scaled down (hidden 256, intermediate 896, 4 heads, 1 KV head, vocab 4096, 2 layers; shorter
windows) to prove that it works; its timings say nothing about a GPU.

Run: ``python -m benchmarks.gpu_8b [--cpu-smoke] [--models llama-3.1-8b,mistral-7b-v0.1]``.
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace

import torch

from benchmarks import common
from cwa_core.architectures import scored_params
from cwa_core.cell import Worker, run_cell
from cwa_core.config import ExperimentConfig
from cwa_core.data import TokenStream, split
from cwa_core.evaluate import perplexity

log = logging.getLogger(__name__)

ASSETS = common.ASSETS
MODELS = {"llama-3.1-8b": "llama-3.1-8b.json", "mistral-7b-v0.1": "mistral-7b-v0.1.json"}
TIME_LIMIT_S = 8 * 60
STAGES = ("build", "baseline_ppl", "score", "perturb_eval", "stability", "magnitude_global_top1000")

# Dense bf16 tensor-core peaks (no sparsity), by substring of torch.cuda.get_device_name().
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("GH200", 989.0), ("H200", 989.0),
                    ("H100", 989.0), ("A100", 312.0), ("L40S", 362.0), ("A10G", 70.0), ("L4", 121.0))

# --cpu-smoke: the real configs with every width scaled down (and two layers).
SMOKE_WIDTHS = {"hidden_size": 256, "intermediate_size": 896, "num_attention_heads": 4, "num_key_value_heads": 1,
                "head_dim": 64, "num_hidden_layers": 2, "vocab_size": 4096, "bos_token_id": 1, "eos_token_id": 2}


@dataclass(frozen=True)
class Plan:
    """What the standard experiment runs (the defaults are the GPU benchmark's)."""

    seeds: tuple[int, ...] = (0, 1, 2)
    k: int = 500
    mode: str = "per_layer"
    metric: str = "grad_x_weight"
    perturb: str = "sign_flip"
    controls: tuple[str, ...] = ("random_k", "bottom_k")
    calib_windows: int = 30
    calib_length: int = 512
    eval_windows: int = 64
    eval_length: int = 512
    eval_batch_size: int = 16
    micro_batch: int | None = None  # None: all 30 windows in one backward (blocks checkpointed)
    magnitude_k: int = 1000


SMOKE_PLAN = Plan(calib_length=32, eval_windows=8, eval_length=32, eval_batch_size=8)


def peak_tflops(device_name: str | None) -> float | None:
    if not device_name:
        return None
    for key, tf in PEAK_BF16_TFLOPS:
        if key in device_name:
            return tf
    return None


def model_config(name: str, smoke: bool):
    from transformers import AutoConfig

    fields = json.loads((ASSETS / "configs" / MODELS[name]).read_text())
    if smoke:
        fields.update(SMOKE_WIDTHS)
    return AutoConfig.for_model(**fields)


def build(cfg, device: torch.device, dtype: torch.dtype):
    """Random weights in ``dtype``, created on ``device`` (no host copy of an 8B model)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    if next(model.parameters()).device.type != device.type:  # a loader that ignored the device context
        model.to(device)
    return model.eval()


def random_data(vocab: int, plan: Plan, seed: int = 0):
    """A random token stream split like a corpus: calibration pool first, evaluation windows last."""
    pool = 4 * plan.calib_windows * plan.calib_length
    n = pool + plan.eval_windows * plan.eval_length
    g = torch.Generator().manual_seed(seed)
    stream = TokenStream(torch.randint(3, vocab, (n,), generator=g), None, "window", "random token ids")
    return split(stream, None, calib_length=plan.calib_length, eval_length=plan.eval_length, n_eval=plan.eval_windows)


class Stages:
    """Wall time and peak accelerator memory per stage (accumulated over repeats)."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.seconds = {s: 0.0 for s in STAGES}
        self.peak = {s: 0 for s in STAGES}
        self.calls = {s: 0 for s in STAGES}

    @contextmanager
    def __call__(self, stage: str):
        if stage not in self.seconds:  # a stage of the executor's not reported here (data)
            yield
            return
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        try:
            yield
        finally:
            if self.cuda:
                torch.cuda.synchronize()
                self.peak[stage] = max(self.peak[stage], torch.cuda.max_memory_allocated())
            self.seconds[stage] += time.perf_counter() - t
            self.calls[stage] += 1


class BenchWorker(Worker):
    """The executor's worker on a model built in memory; a scoring pass that runs out of memory
    is micro-batched and run again (and so are the passes after it)."""

    def __init__(self, model, plan: Plan) -> None:
        super().__init__(model, None)
        self.micro_batch, self.calib_windows = plan.micro_batch, plan.calib_windows

    def score(self, cfg: ExperimentConfig, seed: int, k: int, modes, track=()) -> dict:
        while True:
            try:
                return super().score(replace(cfg, micro_batch=self.micro_batch), seed, k, modes, track)
            except torch.OutOfMemoryError:
                if self.micro_batch == 1:
                    raise
            # outside the except block: the exception's frames (and their tensors) are gone
            self.micro_batch = mb = max(1, math.ceil((self.micro_batch or self.calib_windows) / 3))
            log.warning("out of memory while scoring: retrying with micro_batch=%d", mb)
            print(f"  out of memory while scoring: retrying with micro_batch={mb}", flush=True)
            gc.collect()
            torch.cuda.empty_cache()


def experiment_config(name: str, plan: Plan, device: torch.device) -> ExperimentConfig:
    """The plan as the executor's cell (its data: :func:`random_data`, given to the worker)."""
    return ExperimentConfig(model=name, metric=plan.metric, topk=plan.k, mode=plan.mode, perturb=plan.perturb,
                            controls=plan.controls, seeds=plan.seeds, max_samples=plan.calib_windows,
                            max_length=plan.calib_length, eval_samples=plan.eval_windows, eval_length=plan.eval_length,
                            eval_batch_size=plan.eval_batch_size, micro_batch=plan.micro_batch, stability_check=True,
                            device=device.type, dtype="bf16")


def run_model(name: str, plan: Plan, device: torch.device, dtype: torch.dtype, smoke: bool) -> dict:
    cuda = device.type == "cuda"
    st = Stages(cuda)
    cfg = model_config(name, smoke)
    with st("build"):
        model = build(cfg, device, dtype)
    refs = scored_params(model)
    n_params = common.n_params(model)
    emb = model.get_input_embeddings().weight.numel()
    flops_per_token = 2 * (n_params - emb)  # every weight in a matmul; the embedding is a lookup
    cell = experiment_config(name, plan, device)
    worker = BenchWorker(model, plan)
    data = random_data(cfg.vocab_size, plan)
    worker.use_split(cell, data)
    ev = data.eval_windows()
    eval_tokens = ev.numel()

    t = time.perf_counter()  # one untimed batch first: kernel selection, allocator warm-up
    perplexity(model, ev[: plan.eval_batch_size], batch_size=plan.eval_batch_size)
    warmup_s = time.perf_counter() - t
    # the standard experiment, stage by stage (baseline_ppl, score, perturb_eval, stability)
    result = run_cell(worker, cell, stage=st)
    base_s = st.seconds["baseline_ppl"]
    baseline, results, stability = result.baseline, result.results, result.stability
    score_s = [ss.seconds for ss in result.seed_scores]
    with st("magnitude_global_top1000"):
        mag = worker.score(replace(cell, metric="magnitude", mode="global", topk=plan.magnitude_k), 0,
                           plan.magnitude_k, ("global",))["scores"]
    top_mag = mag.selection("top_k", "global")
    plan = replace(plan, micro_batch=worker.micro_batch)

    n_evals = len(results)
    eval_s = st.seconds["perturb_eval"] / max(1, n_evals)
    peak = peak_tflops(torch.cuda.get_device_name(device) if cuda else None)
    tps_base, tps_evals = eval_tokens / base_s, eval_tokens / eval_s

    def mfu(tps: float) -> float | None:
        return None if peak is None else flops_per_token * tps / (peak * 1e12)

    out = {
        "model": name, "config": {k: getattr(cfg, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                              "num_attention_heads", "num_key_value_heads", "vocab_size")},
        "params": n_params, "scored_params": sum(r.numel for r in refs), "dtype": str(dtype), "device": str(device),
        "stages": {s: {"seconds": st.seconds[s], "calls": st.calls[s],
                       "peak_gpu_bytes": st.peak[s] if cuda else None} for s in STAGES},
        "peak_gpu_bytes": max(st.peak.values()) if cuda else None, "warmup_seconds": warmup_s,
        "score_seconds_per_seed": score_s, "micro_batch_used": plan.micro_batch,
        "perplexity": {
            "baseline": baseline.ppl, "eval_tokens": eval_tokens, "windows": plan.eval_windows, "length": plan.eval_length,
            "tokens_per_s_baseline": tps_base, "tokens_per_s_perturbed_mean": tps_evals,
            "flops_per_token": flops_per_token, "peak_bf16_tflops_assumed": peak,
            "mfu_baseline": mfu(tps_base), "mfu_perturbed_mean": mfu(tps_evals),
        },
        "results": [{k: r[k] for k in ("selection", "seed", "k", "ppl", "ppl_ratio", "n_weights")} for r in results],
        "stability_jaccard_mean": stability["jaccard"]["mean"],
        "magnitude_top1000": {"n": len(top_mag), "largest": float(top_mag.scores[0])},
    }
    del model, refs, worker, result, mag
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return out


def main(argv=None) -> dict:
    t0 = time.perf_counter()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu-smoke", action="store_true", help="tiny widths on the CPU (automatic without CUDA)")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {', '.join(MODELS)}")
    p.add_argument("--micro-batch", type=int, default=None,
                   help="calibration windows per forward while scoring (default: all 30 in one backward)")
    p.add_argument("--out", default=None, help=f"directory for the JSON result (default {common.RESULTS})")
    args = p.parse_args(argv)
    smoke = args.cpu_smoke or not torch.cuda.is_available()
    device = torch.device("cpu" if smoke else "cuda")
    plan = replace(SMOKE_PLAN if smoke else Plan(), micro_batch=args.micro_batch)
    dtype = torch.bfloat16
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        p.error(f"unknown model {unknown[0]!r}; known: {', '.join(MODELS)}")
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else None
    peak = peak_tflops(gpu)
    if smoke:
        w = SMOKE_WIDTHS
        print(f"CPU SMOKE RUN (no GPU): the published configs scaled down to hidden {w['hidden_size']}, intermediate "
              f"{w['intermediate_size']}, {w['num_attention_heads']} heads, {w['num_key_value_heads']} KV head, vocab "
              f"{w['vocab_size']}, {w['num_hidden_layers']} layers, one CPU thread; timings say nothing about a GPU")
    else:
        print(f"GPU: {gpu}; MFU assumes a dense bf16 peak of "
              + (f"{peak:g} TFLOP/s" if peak else "(unknown for this device: MFU not reported)"))
    print(f"plan: {plan.metric} {plan.mode} K={plan.k} {plan.perturb}, controls {', '.join(plan.controls)}, seeds "
          f"{', '.join(map(str, plan.seeds))}, {plan.calib_windows} calibration windows x {plan.calib_length} tokens, "
          f"{plan.eval_windows} evaluation windows x {plan.eval_length} tokens, magnitude global top-{plan.magnitude_k}")
    runs = []
    with common.threads_for(smoke):
        for name in names:
            runs.append(run_model(name, plan, device, dtype, smoke))
            print(_table(runs[-1]), flush=True)
    total = time.perf_counter() - t0
    within = total < TIME_LIMIT_S
    print(f"total wall time {total:.1f} s ({'under' if within else 'OVER'} the {TIME_LIMIT_S // 60}-minute limit)")
    payload = {"mode": "cpu-smoke" if smoke else "gpu", "plan": asdict(plan), "peak_bf16_tflops_assumed": peak,
               "total_seconds": total, "under_time_limit": within, "time_limit_s": TIME_LIMIT_S, "models": runs}
    common.write_result("gpu_8b" if not smoke else "gpu_8b_cpu_smoke", payload, args.out)
    return payload


def _table(run: dict) -> str:
    gib = lambda b: "" if b is None else f"{b / 2**30:.1f}"  # noqa: E731
    rows = [[s, round(v["seconds"], 2), v["calls"], gib(v["peak_gpu_bytes"])] for s, v in run["stages"].items()]
    pp = run["perplexity"]
    mfu = "n/a" if pp["mfu_baseline"] is None else f"{100 * pp['mfu_baseline']:.1f}% (perturbed evals {100 * pp['mfu_perturbed_mean']:.1f}%)"
    head = (f"{run['model']}: {run['params'] / 1e6:,.1f}M params ({run['scored_params'] / 1e6:,.1f}M scored), {run['dtype']} "
            f"on {run['device']}; baseline ppl {pp['baseline']:.1f}; perplexity pass {pp['tokens_per_s_baseline']:,.0f} "
            f"tokens/s, MFU {mfu}; peak GPU memory {gib(run['peak_gpu_bytes']) or 'n/a'} GiB")
    return head + "\n" + common.table(rows, ["stage", "seconds", "calls", "peak GiB"])


if __name__ == "__main__":
    main()
