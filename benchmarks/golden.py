"""Golden comparison: the numbers of a reference commit against the working tree, bit for bit.

Issue 16 (the redesign) must leave every number unchanged. Numbers are bit-exact only on one
machine (float32 CPU kernels differ between CPUs; the smoke sweep's demo model is even trained
on the machine), so no committed file of numbers can be the reference. Instead the check runs
the reference commit's code and the current tree on the same machine, with the same Python and
the same demo-model cache, and compares what they write:

    python -m benchmarks.golden check [--reference COMMIT]   # make golden
    python -m benchmarks.golden record --tree DIR --out OUT  # one tree's numbers -> OUT/golden.json
    python -m benchmarks.golden compare A.json B.json        # exit 0 equal, 1 not

``check`` extracts the reference (``benchmarks/golden_reference``: the pre-redesign commit) with
``git archive`` into a temporary folder (never a checkout or worktree), records it and the
current tree, and compares. ``record`` drives a tree only through its command lines, as
subprocesses with ``cwd=DIR``, ``PYTHONPATH=DIR`` and this interpreter (it checks that DIR's
packages, not the editable install's, are the ones imported); it never imports the project, so
it drives old and new code alike. Its workloads (tiny settings, about 2-3 minutes on 2 cores):

  (a) the tree's ``sweeps/smoke.yaml`` (Ray, MLflow, the sweep's own analysis and report), with
      smaller data and seeds (``SMOKE_OVERRIDES``; ``--full-smoke`` runs the file as it is);
  (b) single commands on the 260K model: each metric in both modes, the five perturbations spread
      over them so that each appears in both modes, controls, two seeds, stability, plus a few
      flags on one run each (published protocol, BOS per document, embeddings, micro-batches);
  (c) super-weight detection on a tiny random Llama with one planted super weight;
  (d) ``python -m analysis.cross_model`` over every result folder of (a)-(c).

``golden.json`` holds ``values``: a flat, sorted map from a key (file path inside the record,
then the JSON path) to a typed string (``float <repr>``, which is exact for a double and tells
-0.0 from 0.0; ``int``, ``str``, ``bool``, ``null``). JSON files are flattened whole; Parquet
files give their shape, column types and a sha256 per column (``window_nll`` every value);
``top_weights.csv`` its sha256 and row count; the MLflow database every run's metrics, params and
``cwa.*`` tags, keyed by run name. Sweep cells are named by what they are (``<cell
magnitude-global-K100-sign_flip>``), their ids kept as values, so that changed ids show once per
cell and the numbers are still compared. Paths are written relative to ``<OUT>``, ``<TREE>``, ``<CACHE>``
(the demo model's), ``<PLANTED>`` and ``<ASSETS>``, the longest first.

What is left out, because it differs between two runs of the same code (the whole list):
``EXCLUDED_KEYS`` (JSON keys at any depth, MLflow metric/param/tag names), keys ending in
``_seconds``, ``EXCLUDED_TOP`` (three top-level keys of ``sweep_manifest.json``), MLflow run ids
and timestamps, and every figure (``.png``, ``.pdf``).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import math
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
REFERENCE_FILE = REPO / "benchmarks" / "golden_reference"
ASSETS = Path(os.environ.get("CWA_ASSETS", REPO.parent / "shared" / "assets"))

# Keys that legitimately differ between two runs of the same code: timings, dates, the machine,
# package versions, git state, MLflow run ids, file lists and the run history of a sweep.
EXCLUDED_KEYS = frozenset({
    "timings_s", "seconds", "peak_memory",          # timings and memory
    "created_utc",                                  # dates
    "git", "packages", "host", "platform",          # provenance of the code and the machine
    "mlflow_run_id", "parent_run_id",               # MLflow ids
    "cwa.sweep_run_id",                             # MLflow tag holding a run id
    "files", "figures",                             # file lists (plots and figures among them)
})
EXCLUDED_SUFFIXES = ("_seconds",)
# top-level keys of one file: sweep_manifest.json's per-invocation history (timings), its Ray
# actors (node ids, resident memory) and its map to the stability runs' MLflow ids
EXCLUDED_TOP = {"sweep_manifest.json": frozenset({"runs", "actors", "stability_runs"})}
FIGURE_SUFFIXES = (".png", ".pdf")

SMOKE_OVERRIDES = {"seeds": [0, 1], "max_samples": 4, "max_length": 64, "eval_samples": 8}
METRICS = ("magnitude", "grad_x_weight", "grad_squared", "hutchinson_diag", "wanda", "act_contrib")
MODES = ("per_layer", "global")
PERTURBATIONS = ("sign_flip", "zero", "gauss_noise", "scale", "bit_flip")
COMMON = ["--topk", "20", "--controls", "random_k,bottom_k", "--seeds", "0,1", "--stability-check",
          "--max-samples", "2", "--max-length", "32", "--no-progress"]
HELDOUT = ["--eval-samples", "4"]  # protocol published evaluates every window of its text instead
PERTURB_ARGS = {"gauss_noise": ["--perturb-scale", "0.5"], "scale": ["--perturb-scale", "4"]}
# one run each: settings off the default path (keyed by metric/mode)
EXTRA_ARGS = {
    ("magnitude", "per_layer"): ["--protocol", "published", "--eval-file", "{OUT}/published_eval.txt"],
    ("grad_x_weight", "per_layer"): ["--micro-batch", "1", "--eval-batch-size", "3"],
    ("grad_squared", "per_layer"): ["--bos", "document"],
    ("hutchinson_diag", "per_layer"): ["--hutchinson-probes", "4"],
    ("hutchinson_diag", "global"): ["--hutchinson-probes", "4"],
    ("wanda", "global"): ["--param-types", "attention,mlp,norm,embedding,lm_head", "--perturb-bit", "31"],
    ("act_contrib", "per_layer"): ["--save-plots"],
}
PLANTED = {"layer": 1, "row": 7, "col": 40, "channel": 5, "trigger": 1, "amp": 4.0, "value": 3.0}
TIMEOUT_S = 1200


# ----------------------------------------------------------------------------- workloads


@dataclass
class Job:
    """One command line of the tree under test, run with ``cwd`` = the tree."""

    name: str
    argv: list[str]
    seconds: float = 0.0
    log: list[str] = field(default_factory=list)


def single_jobs(tree: Path, out: Path, assets: Path) -> list[Job]:
    """(b): every metric in both modes; the perturbations cycled so each meets both modes."""
    story, text = assets / "stories260k", assets / "corpora" / "tinystories_val.txt"
    jobs = []
    pairs = [(m, mode) for m in METRICS for mode in MODES]
    for i, (metric, mode) in enumerate(pairs):
        perturb = PERTURBATIONS[i % len(PERTURBATIONS)]
        name = f"{metric}-{mode}-{perturb}"
        extra = [a.replace("{OUT}", str(out)) for a in EXTRA_ARGS.get((metric, mode), [])]
        if "published" not in extra:
            extra += HELDOUT
        argv = [str(tree / "orchestrator.py"), "--model", str(story), "--data-file", str(text),
                "--metric", metric, "--mode", mode, "--perturb", perturb, *PERTURB_ARGS.get(perturb, []),
                *COMMON, *extra, "--out-dir", str(out / "runs" / "single" / name)]
        jobs.append(Job(f"single/{name}", argv))
    return jobs


def smoke_job(tree: Path, out: Path, full: bool) -> Job:
    """(a): the tree's own smoke sweep file, with ``SMOKE_OVERRIDES`` unless ``full``."""
    import yaml

    src = tree / "sweeps" / "smoke.yaml"
    sweep = src
    if not full:
        raw = yaml.safe_load(src.read_text(encoding="utf-8"))
        raw.update(SMOKE_OVERRIDES)
        sweep = out / "smoke.yaml"
        sweep.write_text(yaml.safe_dump(raw, sort_keys=True), encoding="utf-8")
    argv = [str(tree / "orchestrator.py"), "--sweep", str(sweep), "--out-dir", str(out / "runs" / "smoke"),
            "--tracking-uri", f"sqlite:///{out / 'mlflow.db'}", "--no-progress"]
    return Job("smoke", argv)


def superweight_job(tree: Path, out: Path, planted: Path, assets: Path) -> Job:
    """(c): detection, causal test and ranks on the planted model."""
    argv = [str(tree / "orchestrator.py"), "--model", str(planted),
            "--data-file", str(assets / "corpora" / "tinystories_val.txt"), "--metric", "grad_x_weight",
            "--mode", "per_layer", "--perturb", "sign_flip", *COMMON, *HELDOUT, "--detect-super-weights",
            "--super-windows", "4", "--out-dir", str(out / "runs" / "superweights")]
    return Job("superweights", argv)


def analysis_job(out: Path) -> Job:
    """(d): the cross-model analysis over every result folder."""
    argv = ["-m", "analysis.cross_model", "--result-dirs", str(out / "runs"),
            "--output", str(out / "analysis" / "statistical_analysis.json"), "--no-figures", "-q"]
    return Job("analysis", argv)


def build_planted_model(path: Path, assets: Path) -> Path:
    """A 2-layer random Llama (seed 0) with one super weight: the BOS token carries a large
    embedding channel, layer 1's MLP input ``col`` reads only that channel (so it spikes at the
    first token of every window) and ``down_proj[row, col]`` turns the spike into a massive
    output. The tokenizer is the 260K model's (vocab 512, BOS id 1)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    p = PLANTED
    cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                      bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        emb = model.model.embed_tokens.weight  # (vocab, hidden)
        emb[:, p["channel"]] = 0
        emb[p["trigger"], p["channel"]] = 10.0
        mlp = model.model.layers[p["layer"]].mlp
        for w in (mlp.gate_proj.weight, mlp.up_proj.weight):  # (intermediate, hidden)
            w[p["col"]] = 0
            w[p["col"], p["channel"]] = p["amp"]
        mlp.down_proj.weight[:, p["col"]] = 0  # (hidden, intermediate)
        mlp.down_proj.weight[p["row"], p["col"]] = p["value"]
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(assets / "stories260k" / name, path / name)
    return path


def tree_env(tree: Path, cache: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"PYTHONPATH": str(tree), "CWA_CACHE": str(cache), "PYTHONHASHSEED": "0",
                "MPLBACKEND": "Agg"})
    return env


def check_imports(tree: Path, env: dict[str, str]) -> None:
    """The tree's own packages must be imported, not the editable install's."""
    code = "import cwa_core, analysis; print(cwa_core.__file__); print(analysis.__file__)"
    got = subprocess.run([sys.executable, "-c", code], cwd=tree, env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    for f in got:
        if not Path(f).resolve().is_relative_to(tree.resolve()):
            raise RuntimeError(f"{tree}: imports {f} instead of its own packages (PYTHONPATH lost to the install)")


def run_job(job: Job, tree: Path, env: dict[str, str], logs: Path) -> Job:
    t0 = time.perf_counter()
    log = logs / (job.name.replace("/", "__") + ".log")
    with open(log, "w", encoding="utf-8") as fh:
        proc = subprocess.run([sys.executable, *job.argv], cwd=tree, env=env, stdout=fh, stderr=subprocess.STDOUT,
                              timeout=TIMEOUT_S)
    job.seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = log.read_text(encoding="utf-8", errors="replace").splitlines()[-15:]
        raise RuntimeError(f"{job.name} exited {proc.returncode} in {tree}:\n  " + "\n  ".join(tail))
    return job


def run_all(work: list[Job], tree: Path, env: dict[str, str], logs: Path, jobs: int) -> None:
    """Run ``work`` ``jobs`` at a time; the first failure cancels what has not started."""
    with concurrent.futures.ThreadPoolExecutor(max(1, jobs)) as pool:
        futures = [pool.submit(run_job, j, tree, env, logs) for j in work]
        try:
            for fut in concurrent.futures.as_completed(futures):
                job = fut.result()
                print(f"  {job.name}: {job.seconds:.1f} s", flush=True)
        except BaseException:
            for f in futures:
                f.cancel()
            raise


def record(tree: Path, out: Path, *, planted: Path | None = None, cache: Path | None = None, jobs: int = 2,
           full_smoke: bool = False, assets: Path = ASSETS) -> dict:
    """Run the workloads of ``tree`` into ``out`` and write ``out/golden.json``."""
    tree, out = tree.resolve(), out.resolve()
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty: give an empty or new folder")
    (out / "logs").mkdir(parents=True)
    cache = Path(cache or os.environ.get("CWA_CACHE") or REPO / ".cache" / "cwa-test").resolve()
    env = tree_env(tree, cache)
    check_imports(tree, env)
    t0 = time.perf_counter()
    planted = planted.resolve() if planted else build_planted_model(out / "planted", assets)
    text = (assets / "corpora" / "tinystories_val.txt").read_text(encoding="utf-8")
    (out / "published_eval.txt").write_text(text[-3000:], encoding="utf-8")  # 2 windows of 512 tokens
    work = [smoke_job(tree, out, full_smoke), *single_jobs(tree, out, assets),
            superweight_job(tree, out, planted, assets)]
    run_all(work, tree, env, out / "logs", jobs)
    job = run_job(analysis_job(out), tree, env, out / "logs")
    print(f"  {job.name}: {job.seconds:.1f} s", flush=True)
    roots = {str(out): "<OUT>", str(tree): "<TREE>", str(cache): "<CACHE>", str(planted): "<PLANTED>",
             str(assets.resolve()): "<ASSETS>"}
    values = collect(out, roots)
    rec = {"meta": {"tree": str(tree), "python": sys.executable, "cwa_cache": str(cache), "jobs": jobs,
                    "full_smoke": full_smoke, "seconds": round(time.perf_counter() - t0, 1),
                    "job_seconds": {j.name: round(j.seconds, 1) for j in [*work, job]}},
           "values": values}
    (out / "golden.json").write_text(json.dumps(rec, indent=0, sort_keys=True), encoding="utf-8")
    return rec


# ----------------------------------------------------------------------------- canonical record


def excluded(key: str) -> bool:
    return key in EXCLUDED_KEYS or key.endswith(EXCLUDED_SUFFIXES)


def scalar(v: Any, roots: dict[str, str]) -> str:
    """One typed, exact string per value (roots: absolute path prefix -> placeholder)."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return f"bool {v}"
    if isinstance(v, int):
        return f"int {v}"
    if isinstance(v, float):
        return f"float {v!r}"
    if isinstance(v, str):
        return f"str {substitute(v, roots)}"
    raise TypeError(f"unexpected value {v!r} ({type(v).__name__})")


def substitute(text: str, roots: dict[str, str]) -> str:
    for root, tag in sorted(roots.items(), key=lambda kv: -len(kv[0])):
        text = text.replace(root, tag)
    return text


def flatten(obj: Any, prefix: str, roots: dict[str, str], into: dict[str, str]) -> None:
    """JSON object -> ``into[prefix/key/[i]...] = scalar``; excluded keys dropped at any depth."""
    if isinstance(obj, dict):
        if not obj:
            into[prefix] = "{}"
        top = EXCLUDED_TOP.get(prefix.rsplit("/", 1)[-1], frozenset())
        for k, v in obj.items():
            if not excluded(str(k)) and k not in top:
                flatten(v, f"{prefix}/{substitute(str(k), roots)}", roots, into)
    elif isinstance(obj, list):
        if not obj:
            into[prefix] = "[]"
        for i, v in enumerate(obj):
            flatten(v, f"{prefix}[{i}]", roots, into)
    else:
        into[prefix] = scalar(obj, roots)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def column_digest(col, roots: dict[str, str]) -> str:
    """sha256 of a column's values: raw bytes for numbers, typed strings otherwise."""
    import numpy as np

    arr = col.to_numpy()
    if arr.dtype.kind in "biuf":
        return f"{arr.dtype} " + _sha(np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<")).tobytes())
    items = []
    for v in arr.tolist():
        if isinstance(v, float) and math.isnan(v):
            v = None
        items.append(json.dumps(v, default=str) if isinstance(v, (list, dict)) else scalar(v, roots))
    return "object " + _sha("\x00".join(items).encode("utf-8"))


def parquet_values(path: Path, key: str, roots: dict[str, str], into: dict[str, str]) -> None:
    import pandas as pd

    df = pd.read_parquet(path)
    into[f"{key}:shape"] = f"int {df.shape[0]} x {df.shape[1]}"
    if path.name == "window_nll.parquet":  # small: every value, keyed by (selection, seed, window)
        for r in df.sort_values(["selection", "seed", "window"]).itertuples(index=False):
            into[f"{key}/{r.selection}/seed{r.seed}/window{r.window}/nll"] = scalar(float(r.nll), roots)
            into[f"{key}/{r.selection}/seed{r.seed}/window{r.window}/tokens"] = scalar(int(r.tokens), roots)
        return
    for name in df.columns:
        if not excluded(str(name)):
            into[f"{key}/{name}"] = column_digest(df[name], roots)


def mlflow_values(db: Path, roots: dict[str, str], into: dict[str, str]) -> None:
    """Every run's status, metrics (by step), params and ``cwa.*`` tags, keyed by run name."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        names: dict[str, str] = {}
        for run, name, status in con.execute("SELECT run_uuid, name, status FROM runs ORDER BY start_time, run_uuid"):
            seen = sum(1 for n in names.values() if n.split("#")[0] == name)
            names[run] = f"{name}#{seen}" if seen else name  # two runs of one name: both kept
            into[f"mlflow/{names[run]}/status"] = scalar(status, roots)
        rows = con.execute("SELECT run_uuid, key, step, value, is_nan FROM metrics ORDER BY run_uuid, key, step, "
                           "timestamp")
        for run, k, step, value, is_nan in rows:
            if not excluded(k):
                value = "float nan" if is_nan else scalar(float(value), roots)
                into[f"mlflow/{names[run]}/metric/{k}/step{step}"] = value
        for run, k, v in con.execute("SELECT run_uuid, key, value FROM params"):
            if not excluded(k):
                into[f"mlflow/{names[run]}/param/{k}"] = scalar(v, roots)
        for run, k, v in con.execute("SELECT run_uuid, key, value FROM tags"):
            if k.startswith("cwa.") and not excluded(k):
                into[f"mlflow/{names[run]}/tag/{k}"] = scalar(v, roots)
    finally:
        con.close()


def cell_labels(out: Path) -> dict[str, str]:
    """Sweep cell id -> what the cell is (``<cell metric-mode-K-perturbation>``). Keys and values
    name cells by label, and each cell's id is one value of its own (``:cell_id``): should the
    redesign change the ids, that shows once per cell and the numbers are still compared."""
    labels: dict[str, str] = {}
    for manifest in sorted((out / "runs").rglob("sweep_manifest.json")):
        for res in sorted(manifest.parent.glob("*/perturbation_results.json")):
            r = json.loads(res.read_text(encoding="utf-8"))
            method = (r.get("perturbation") or {}).get("method")
            label = f"cell {r.get('metric')}-{r.get('mode')}-K{r.get('topk')}-{method}"
            n = sum(1 for v in labels.values() if v.split("#")[0] == label)
            labels[res.parent.name] = f"{label}#{n}" if n else label
    return labels


def collect(out: Path, roots: dict[str, str]) -> dict[str, str]:
    """Every number under ``out/runs`` and ``out/analysis`` and in ``out/mlflow.db``, canonical."""
    values: dict[str, str] = {}
    labels = cell_labels(out)
    roots = {**roots, **{cid: f"<{label}>" for cid, label in labels.items()}}
    for base in ("runs", "analysis"):
        for path in sorted((out / base).rglob("*")):
            rel = substitute(path.relative_to(out).as_posix(), roots)
            if path.is_dir() and path.name in labels:
                values[f"{rel}:cell_id"] = f"str {path.name}"
            if not path.is_file() or path.name.startswith(".") or path.suffix in FIGURE_SUFFIXES:
                continue
            if path.suffix == ".json":
                flatten(json.loads(path.read_text(encoding="utf-8")), rel, roots, values)
            elif path.suffix == ".parquet":
                parquet_values(path, rel, roots, values)
            elif path.name == "top_weights.csv":
                data = path.read_bytes()
                values[f"{rel}:sha256"] = f"str {_sha(data)}"
                values[f"{rel}:rows"] = scalar(max(0, data.count(b"\n") - 1), roots)
            else:
                values[f"{rel}:present"] = "bool True"  # error.txt, a file someone added: noticed
    if (out / "mlflow.db").exists():
        mlflow_values(out / "mlflow.db", roots, values)
    return dict(sorted(values.items()))


# ----------------------------------------------------------------------------- compare, check


def differences(a: dict[str, str], b: dict[str, str]) -> list[tuple[str, str | None, str | None]]:
    """(key, value in a, value in b) for each key whose values differ or that only one holds."""
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def report(diffs: list, n_a: int, n_b: int, labels: tuple[str, str] = ("A", "B"), limit: int = 50) -> None:
    for k, va, vb in diffs[:limit]:
        print(f"  {k}\n    {labels[0]}: {va if va is not None else '(missing)'}\n"
              f"    {labels[1]}: {vb if vb is not None else '(missing)'}")
    if len(diffs) > limit:
        print(f"  ... and {len(diffs) - limit} more")
    print(f"{len(diffs)} of {max(n_a, n_b)} keys differ" if diffs else f"equal: {n_a} keys")


def load_values(path: Path) -> dict[str, str]:
    return json.loads(Path(path).read_text(encoding="utf-8"))["values"]


def reference_commit() -> str:
    lines = [ln.strip() for ln in REFERENCE_FILE.read_text(encoding="utf-8").splitlines()]
    return next(ln for ln in lines if ln and not ln.startswith("#"))


def extract(commit: str, dest: Path) -> Path:
    """The reference tree, from ``git archive`` (nothing in the repository is touched)."""
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", commit], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def check(args: argparse.Namespace) -> int:
    commit = args.reference or reference_commit()
    full = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--verify", f"{commit}^{{commit}}"],
                          capture_output=True, text=True)
    if full.returncode != 0:
        print(f"golden: unknown reference commit {commit!r}; give a commit of this repository", file=sys.stderr)
        return 2
    commit = full.stdout.strip()
    out = Path(args.out or tempfile.mkdtemp(prefix="cwa-golden-")).resolve()
    current = Path(args.current or REPO).resolve()
    t0 = time.perf_counter()
    ref_tree = extract(commit, out / "reference-tree")
    planted = build_planted_model(out / "planted", ASSETS)
    kw = {"planted": planted, "cache": args.cache, "jobs": args.jobs, "full_smoke": args.full_smoke}
    recs = {}
    for label, tree in (("reference", ref_tree), ("current", current)):
        print(f"golden: recording {label} ({tree})", flush=True)
        try:
            recs[label] = record(tree, out / label, **kw)["values"]
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            print(f"golden: FAILED: the {label} tree did not run: {exc}\n  (records in {out})")
            return 1
    diffs = differences(recs["reference"], recs["current"])
    report(diffs, len(recs["reference"]), len(recs["current"]), ("reference", "current"))
    secs = time.perf_counter() - t0
    if diffs:
        print(f"golden: DIFFERENT: {len(diffs)} keys differ between {commit[:12]} and {current} "
              f"({secs:.0f} s; records in {out})")
        return 1
    print(f"golden: EQUAL: {len(recs['current'])} numbers and fields of {current} equal {commit[:12]}'s "
          f"bit for bit ({secs:.0f} s)")
    if not args.keep and not args.out:
        shutil.rmtree(out, ignore_errors=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.golden", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--cache", type=Path, help="demo-model cache (default $CWA_CACHE, else .cache/cwa-test)")
    common.add_argument("--jobs", type=int, default=2, help="commands run at once (default 2)")
    common.add_argument("--full-smoke", action="store_true", help="run sweeps/smoke.yaml as it is")
    r = sub.add_parser("record", parents=[common], help="run a tree's workloads, write OUT/golden.json")
    r.add_argument("--tree", type=Path, required=True)
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--planted", type=Path, help="a planted model folder to use (default: build one in OUT)")
    c = sub.add_parser("compare", help="compare two golden.json files exactly")
    c.add_argument("a", type=Path)
    c.add_argument("b", type=Path)
    k = sub.add_parser("check", parents=[common], help="record the reference commit and the current tree, compare")
    k.add_argument("--reference", help="commit (default: benchmarks/golden_reference)")
    k.add_argument("--current", type=Path, help="the tree to check (default: this repository's working tree)")
    k.add_argument("--out", type=Path, help="where to keep both records (default: a temporary folder)")
    k.add_argument("--keep", action="store_true", help="keep the temporary folder when equal")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "compare":
        a, b = load_values(args.a), load_values(args.b)
        diffs = differences(a, b)
        report(diffs, len(a), len(b), (str(args.a), str(args.b)))
        return 1 if diffs else 0
    if args.command == "record":
        rec = record(args.tree, args.out, planted=args.planted, cache=args.cache, jobs=args.jobs,
                     full_smoke=args.full_smoke)
        print(f"recorded {len(rec['values'])} keys in {rec['meta']['seconds']} s: {args.out / 'golden.json'}")
        return 0
    return check(args)


if __name__ == "__main__":
    sys.exit(main())
