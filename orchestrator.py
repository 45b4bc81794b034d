#!/usr/bin/env python
"""The command: one critical-weight experiment from flags, or a whole grid from a sweep file.

    python orchestrator.py --model PATH_OR_ID --metric grad_x_weight --topk 200 --mode global \
        --perturb sign_flip --controls random_k,bottom_k --seeds 0,1,2 --stability-check \
        --save-plots --data-file corpus.txt --out-dir results/x

    python orchestrator.py --sweep sweeps/smoke.yaml [--dry-run] [--address auto] [--tracking-uri URI]

``builtin:demo`` as --model or --data-file means the small model trained (once, cached) on
the Python standard library's docstrings, and that corpus: no download needed.

Bad input exits with status 2 and one line naming the flag and the allowed values.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

EXIT_USAGE = 2
log = logging.getLogger("cwa")


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr and exit status 2 (no usage dump)."""

    def error(self, message: str) -> None:  # noqa: D401 - argparse API
        raise UsageError(message)


class UsageError(Exception):
    pass


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _str_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def build_parser() -> OneLineParser:
    from cwa_core.architectures import DEFAULT_PARAM_TYPES
    from cwa_core.config import DTYPES
    from cwa_core.data import BOS_LAYOUTS
    from cwa_core.metrics import METRICS
    from cwa_core.perturb import PERTURBATIONS
    from cwa_core.selection import MODES

    p = OneLineParser(prog="orchestrator.py", description=__doc__.split("\n")[0],
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", help="Hugging Face id or local directory")
    p.add_argument("--metric", choices=METRICS.names(), help="sensitivity metric")
    p.add_argument("--topk", type=int, help="K weights to select (per tensor or global)")
    p.add_argument("--mode", default="per_layer", choices=list(MODES))
    p.add_argument("--max-samples", type=int, default=30, help="calibration windows")
    p.add_argument("--max-length", type=int, default=128, help="tokens per calibration window")
    p.add_argument("--eval-samples", type=int, default=64, help="held-out evaluation windows")
    p.add_argument("--eval-length", type=int, default=None, help="tokens per evaluation window (default --max-length)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto", choices=list(DTYPES))
    p.add_argument("--perturb", default="sign_flip", choices=PERTURBATIONS.names())
    p.add_argument("--perturb-scale", type=float, default=None, help="gauss_noise: relative std; scale: factor")
    p.add_argument("--perturb-bit", type=int, default=None, help="bit_flip: bit index (default exponent MSB)")
    p.add_argument("--controls", type=_str_list, default="random_k,bottom_k", help="comma-separated: random_k,bottom_k")
    p.add_argument("--seeds", type=_int_list, default="0", help="comma-separated seeds")
    p.add_argument("--stability-check", action="store_true", help="Jaccard/Spearman across seeds")
    p.add_argument("--save-plots", action="store_true")
    p.add_argument("--data-file", help="calibration text (default: WikiText-2 test via datasets)")
    p.add_argument("--eval-file", help="evaluation text (default: held-out tail of the calibration text)")
    p.add_argument("--bos", default="window", choices=list(BOS_LAYOUTS),
                   help="BOS at each window start (one stream) or at each blank-line-separated document")
    p.add_argument("--param-types", type=_str_list, default=",".join(DEFAULT_PARAM_TYPES),
                   help="comma-separated from attention,mlp,norm,embedding,lm_head")
    p.add_argument("--hutchinson-probes", type=int, default=16)
    p.add_argument("--micro-batch", type=int, default=None, help="calibration windows per forward pass")
    p.add_argument("--eval-batch-size", type=int, default=8)
    p.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--out-dir", help="output folder (with --sweep: results root, default results/<name>)")
    p.add_argument("--sweep", help="YAML sweep file: run its whole grid on Ray")
    p.add_argument("--dry-run", action="store_true", help="with --sweep: print the cell table, start nothing")
    p.add_argument("--address", default=None, help="with --sweep: join this Ray cluster (e.g. auto)")
    p.add_argument("--tracking-uri", default=None, help="with --sweep: MLflow tracking URI")
    p.add_argument("--num-cpus", type=int, default=None, help="with --sweep: CPUs for a local Ray")
    p.add_argument("--dashboard", action="store_true", help="with --sweep: start a local Ray with its dashboard")
    p.add_argument("--overwrite", action="store_true", help="replace an experiment already in --out-dir")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def config_from_args(args: argparse.Namespace):
    from cwa_core.config import ConfigError, ExperimentConfig

    for key in ("model", "metric", "topk", "out_dir"):
        if getattr(args, key) is None:
            raise UsageError(f"{flag(key)} is required")
    kwargs = {k: getattr(args, k) for k in ExperimentConfig.keys() if hasattr(args, k)}
    try:
        return ExperimentConfig(**kwargs)
    except ConfigError as e:
        raise UsageError(f"{flag(e.key)}: {str(e).split(': ', 1)[1]}") from None


def demo_paths() -> tuple[str, str]:
    """(model dir, corpus file) of the built-in demo, trained and cached at first use."""
    from cwa_core.demo import ensure_demo_assets

    assets = ensure_demo_assets(progress=True)
    return str(assets.model_dir), str(assets.corpus_path)


def run_sweep(args: argparse.Namespace) -> int:
    from cwa_core.sweep import spec as sweep_spec
    from cwa_core.sweep.plan import format_table, make_plan

    single = [f for f in ("model", "metric", "topk", "data_file", "eval_file") if getattr(args, f) is not None]
    if single:
        raise UsageError(f"{flag(single[0])}: with --sweep, settings come from the sweep file; allowed with --sweep: "
                         "--dry-run, --address, --tracking-uri, --out-dir, --num-cpus, --dashboard, --no-progress")
    try:
        sweep = sweep_spec.load(args.sweep, demo_paths_fn=None if args.dry_run else demo_paths)
    except sweep_spec.SpecError as e:
        raise UsageError(str(e)) from None
    if args.dry_run:
        plan = make_plan(sweep.cells)
        print(format_table(plan.rows()))
        counts = plan.counts()
        print(f"{counts['cells']} cells over {counts['models']} model(s): {counts['baselines']} baseline evaluation(s), "
              f"{counts['scoring_passes']} scoring pass(es), {counts['evaluations']} perturbed evaluations")
        return 0
    from cwa_core.sweep.runner import SweepRunner

    root = Path(args.out_dir) if args.out_dir else Path("results") / sweep.name
    manifest = SweepRunner(sweep, root, address=args.address, tracking_uri=args.tracking_uri,
                           progress=not args.no_progress, num_cpus=args.num_cpus,
                           dashboard=args.dashboard).run()
    cells = manifest["cells"]
    n_done = sum(c["status"] == "finished" for c in cells.values())
    n_failed = sum(c["status"] == "failed" for c in cells.values())
    print(f"sweep {sweep.name}: {n_done}/{len(cells)} cells finished, {n_failed} failed; "
          f"results in {root}" + (f"; MLflow: {manifest['mlflow']['tracking_uri']}" if "mlflow" in manifest else ""))
    _sweep_summary(root, sweep)
    return 0 if n_failed == 0 else 1


def _sweep_summary(root: Path, sweep) -> None:
    import json

    from cwa_core.experiment import ratios_by_selection

    for cell in sweep.cells:
        f = root / cell.id / "perturbation_results.json"
        if not f.exists():
            continue
        res = json.loads(f.read_text())
        ratios = "  ".join(f"{k} x{sum(v) / len(v):.3f}" for k, v in ratios_by_selection(res["results"]).items())
        c = cell.config
        print(f"  {cell.id}  {c.metric:14s} {c.mode:9s} K={c.topk:<6d} {c.perturb:10s} {ratios}")


def run_single(args: argparse.Namespace) -> int:
    from cwa_core.config import ConfigError
    from cwa_core.experiment import DataError, run_experiment
    from cwa_core.models import ModelLoadError, load_model
    from cwa_core.outputs import write_experiment, write_failure

    if "builtin:demo" in (args.model, args.data_file, args.eval_file):
        model_dir, corpus = demo_paths()
        for key, value in (("model", model_dir), ("data_file", corpus), ("eval_file", corpus)):
            if getattr(args, key) == "builtin:demo":
                setattr(args, key, value)
    cfg = config_from_args(args)
    if (Path(cfg.out_dir) / "manifest.json").exists() and not args.overwrite:
        raise UsageError(f"--out-dir: {cfg.out_dir} already holds an experiment (manifest.json); "
                         "choose another folder or pass --overwrite")
    started = time.perf_counter()
    try:
        loaded = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device, revision=cfg.revision,
                            trust_remote_code=cfg.trust_remote_code)
    except (ModelLoadError, ConfigError, ValueError) as e:
        raise UsageError(f"--model: {e}") from None
    load_s = time.perf_counter() - started
    try:
        result = run_experiment(cfg, loaded.model, loaded.tokenizer, progress=not args.no_progress)
    except DataError as e:
        raise UsageError(str(e)) from None
    except BaseException as e:
        write_failure(cfg.out_dir, cfg.to_dict(), e, started)
        raise
    info = loaded.info
    manifest = write_experiment(cfg.out_dir, result, model_info=info.__dict__,
                                device=info.device, dtype=info.dtype, started=started,
                                extra_timings={"model_load": load_s})
    _summary(result, manifest, cfg.out_dir)
    return 0


def _summary(result, manifest: dict, out_dir: str) -> None:
    from cwa_core.experiment import ratios_by_selection

    b = result.baseline
    print(f"baseline perplexity {b.ppl:.4f} ({b.n_windows} windows x {b.window_length} tokens)")
    for kind, ratios in ratios_by_selection(result.results).items():
        print(f"  {kind:9s} ppl ratio mean {sum(ratios) / len(ratios):10.4f}  per seed " +
              ", ".join(f"{x:.4f}" for x in ratios))
    if result.stability:
        j = result.stability["jaccard"]
        print(f"  top-K Jaccard across seeds: mean {j['mean']:.3f} (min {j['min']:.3f}, max {j['max']:.3f})")
    print(f"wrote {len(manifest['files'])} files to {out_dir} in {manifest['timings_s']['total']:.1f} s")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("CWA_LOG", "INFO"), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        args = build_parser().parse_args(argv)
        return run_sweep(args) if args.sweep else run_single(args)
    except UsageError as e:
        print(f"orchestrator.py: error: {e}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
