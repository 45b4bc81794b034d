"""Shared benchmark plumbing: the Llama-shaped model, memory measurement, tables, JSON results.

Memory is measured in a fresh subprocess per variant (so one variant's peak cannot pollute the
next) with ``MALLOC_MMAP_THRESHOLD_=65536`` in its environment: glibc's malloc otherwise keeps
large freed blocks inside the process (its mmap threshold rises as they are freed), so resident
memory would overstate what is live. In the child the kernel's peak-RSS counter (VmHWM) is reset
through ``/proc/self/clear_refs`` right after the model is built, so the peak is that of the
measured step alone. Every figure is counted above what the same command uses on a tiny model,
and reported as a multiple (or fraction) of the measured model's bytes.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
# the shared real model and corpora (tests read the same place: tests/conftest.py)
ASSETS = Path(os.environ.get("CWA_ASSETS", ROOT.parent / "shared" / "assets"))
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


# --------------------------------------------------------------------------- models

@dataclass(frozen=True)
class Shape:
    """A Llama-shaped decoder (grouped-query attention, SwiGLU MLP, untied head)."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int

    def config(self):
        from transformers import AutoConfig

        return AutoConfig.for_model(
            "llama", vocab_size=self.vocab, hidden_size=self.hidden, intermediate_size=self.intermediate,
            num_hidden_layers=self.layers, num_attention_heads=self.heads, num_key_value_heads=self.kv_heads,
            head_dim=self.hidden // self.heads, max_position_embeddings=4096, tie_word_embeddings=False,
            bos_token_id=1, eos_token_id=2,
        )


# ~301.5M parameters: 20 blocks of 11.8M (236M, the default scored set) + 2 x 32.8M embedding/head.
LLAMA_300M = Shape("llama-300m", hidden=1024, intermediate=2816, layers=20, heads=16, kv_heads=8, vocab=32000)
# --quick: the same architecture, small enough for a CI smoke run in seconds.
QUICK = Shape("llama-quick", hidden=128, intermediate=352, layers=2, heads=4, kv_heads=2, vocab=2048)
# The memory baseline: "the same command on a tiny model".
TINY = Shape("llama-tiny", hidden=32, intermediate=64, layers=1, heads=2, kv_heads=1, vocab=256)
SHAPES = {s.name: s for s in (LLAMA_300M, QUICK, TINY)}


def build_model(shape: Shape):
    """Random float32 weights of ``shape``, the same every time (seed 0, global RNG untouched)."""
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(shape.config(), dtype=torch.float32)
    return model.eval()


def model_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def random_windows(n: int, length: int, vocab: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n, length), generator=g)


# --------------------------------------------------------------------------- memory

def _status() -> dict[str, int]:
    text = Path("/proc/self/status").read_text()
    return {k: int(re.search(rf"^{k}:\s+(\d+) kB", text, re.M).group(1)) * 1024 for k in ("VmRSS", "VmHWM")}


def reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter (Linux >= 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class PeakMeter:
    """Peak resident memory of one step: call :meth:`start` after setup, :meth:`stop` after the step."""

    def __init__(self) -> None:
        self.rss_start = self.peak = 0
        self._sampler = None

    def start(self) -> None:
        gc.collect()
        if not reset_peak():  # fall back to sampling
            import psutil
            import threading

            proc, stop = psutil.Process(), threading.Event()
            self._peak_sampled = proc.memory_info().rss

            def sample() -> None:
                while not stop.is_set():
                    self._peak_sampled = max(self._peak_sampled, proc.memory_info().rss)
                    time.sleep(0.002)

            self._sampler = (threading.Thread(target=sample, daemon=True), stop)
            self._sampler[0].start()
        self.rss_start = _status()["VmRSS"]

    def stop(self) -> dict[str, int]:
        if self._sampler is not None:
            self._sampler[1].set()
            self._sampler[0].join()
            self.peak = max(self._peak_sampled, _status()["VmRSS"])
        else:
            self.peak = _status()["VmHWM"]
        return {"rss_start": self.rss_start, "peak": self.peak}


def run_child(module: str, variant: str, shape: str, settings: dict, *, inprocess: bool = False) -> dict:
    """Run ``benchmarks.<module>.run_variant(variant, shape, settings, meter)`` and return its
    result with the memory figures; in a fresh subprocess unless ``inprocess``."""
    if inprocess:
        import importlib

        mod = importlib.import_module(f"benchmarks.{module}")
        meter = PeakMeter()
        out = mod.run_variant(variant, SHAPES[shape], settings, meter) or {}
        return {**out, **({"rss_start": meter.rss_start, "peak": meter.peak})}
    env = {**os.environ, **MALLOC_ENV, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "benchmarks._child", module, variant, shape, json.dumps(settings)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark child {module}/{variant}/{shape} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(module: str, variant: str, shape: Shape, settings: dict, model_nbytes: int, *,
            inprocess: bool = False) -> dict:
    """Peak of ``variant`` on ``shape`` minus the same command on the tiny model, in model bytes.

    ``peak_x_model``: the step's peak resident memory (the model included) / model bytes.
    ``extra_x_model``: what the step adds above the resident model / model bytes.
    """
    big = run_child(module, variant, shape.name, settings, inprocess=inprocess)
    tiny = run_child(module, variant, TINY.name, settings, inprocess=inprocess)
    return {
        "peak_x_model": (big["peak"] - tiny["peak"]) / model_nbytes,
        "extra_x_model": ((big["peak"] - big["rss_start"]) - (tiny["peak"] - tiny["rss_start"])) / model_nbytes,
        "resident_before_x_model": (big["rss_start"] - tiny["rss_start"]) / model_nbytes,
        "peak_bytes": big["peak"], "baseline_peak_bytes": tiny["peak"],
        "child": {k: v for k, v in big.items() if k not in ("peak", "rss_start")},
        "isolation": "in-process" if inprocess else "fresh subprocess, MALLOC_MMAP_THRESHOLD_=65536",
    }


# --------------------------------------------------------------------------- timing

def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[[], object]) -> float:
    sync()
    t = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t


def side_by_side(fns: dict[str, Callable[[], object]], reps: int) -> dict[str, float]:
    """Median seconds of each function, run interleaved so load changes hit all alike."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            times[k].append(timed(fn))
    return {k: statistics.median(v) for k, v in times.items()}


# --------------------------------------------------------------------------- reporting

def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        m = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        cpu = m.group(1).strip() if m else cpu
    except OSError:
        pass
    import transformers

    return {
        "date": _dt.datetime.now(_dt.timezone.utc).date().isoformat(),
        "cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(), "platform": platform.platform(),
    }


def table(rows: Sequence[Sequence], headers: Sequence[str]) -> str:
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(x) -> str:
    if isinstance(x, float):
        return f"{x:.4g}" if abs(x) < 1e4 else f"{x:.3e}"
    return str(x)


def memory_note(mem: dict[str, dict]) -> str:
    """The line saying how the memory figures of ``measure`` (variant -> figures) were taken."""
    return f"memory: {next(iter(mem.values()))['isolation']}; counted above the same command on a tiny model"


def memory_figures(mem: dict[str, dict], *, peak: bool = False) -> dict:
    """The JSON keys for ``measure``'s figures: extra (and peak) memory per variant, and all of them."""
    out = {"extra_memory_fraction_of_model": {v: m["extra_x_model"] for v, m in mem.items()}}
    if peak:
        out["peak_memory_x_model"] = {v: m["peak_x_model"] for v, m in mem.items()}
    return {**out, "memory": mem}


def write_result(name: str, payload: dict, out_dir: Path | str | None = None) -> Path:
    """``<out_dir or benchmarks/results>/<name>.json``: the payload plus the machine; says where."""
    out = Path(out_dir) if out_dir is not None else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps({"benchmark": name, "machine": machine(), **payload}, indent=2, default=str) + "\n")
    print(f"wrote {path}")
    return path


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="a much smaller model: a smoke run in seconds")
    p.add_argument("--out", default=None, help=f"directory for the JSON result (default {RESULTS})")
    p.add_argument("--inprocess", action="store_true",
                   help="measure memory in this process instead of fresh subprocesses (less exact; for tests)")
    return p


def run_main(doc: str, run, argv=None, parse: argparse.ArgumentParser | None = None) -> dict:
    """A benchmark's ``main``: its flags (``parse``, default the common ones with the module
    docstring's first line), then ``run(args)`` with the right number of threads."""
    args = (parse or parser(doc.splitlines()[0])).parse_args(argv)
    with threads_for(args.quick):
        return run(args)


@contextmanager
def threads_for(small: bool):
    """One intra-op thread for tiny models: on a busy machine every parallel region of a tiny op
    waits for a descheduled thread (measured: 25x slower with 2 threads than with 1)."""
    before = torch.get_num_threads()
    if small:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def shape_for(args) -> Shape:
    return QUICK if args.quick else LLAMA_300M


def shape_dict(shape: Shape, model: torch.nn.Module) -> dict:
    return {**asdict(shape), "params": n_params(model), "bytes": model_bytes(model),
            "dtype": str(next(model.parameters()).dtype)}
