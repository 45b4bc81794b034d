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
from dataclasses import replace
from pathlib import Path

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a Ctrl-C
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
    from cwa_core.data import BOS_LAYOUTS, PROTOCOLS
    from cwa_core.metrics import METRICS
    from cwa_core.perturb import PERTURBATIONS
    from cwa_core.selection import MODES
    from cwa_core.superweights import SuperWeightOptions as SW

    p = OneLineParser(prog="orchestrator.py", description=__doc__.split("\n")[0],
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", help="Hugging Face id or local directory")
    p.add_argument("--metric", choices=METRICS.names(), help="sensitivity metric")
    p.add_argument("--topk", type=int, help="K weights to select (per tensor or global)")
    p.add_argument("--mode", default="per_layer", choices=list(MODES))
    p.add_argument("--max-samples", type=int, default=30, help="calibration windows")
    p.add_argument("--max-length", type=int, default=128, help="tokens per calibration window")
    p.add_argument("--eval-samples", type=int, default=None,
                   help="evaluation windows (protocol heldout: the last N of the evaluation text, default 64)")
    p.add_argument("--eval-length", type=int, default=None,
                   help="tokens per evaluation window (default: heldout --max-length; published min(2048, context))")
    p.add_argument("--protocol", default="heldout", choices=list(PROTOCOLS),
                   help="how perplexity is measured: heldout (quick, held-out tail) or published (whole test "
                        "text, calibration from a training text; comparable with the literature)")
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
                   help="protocol heldout: BOS at each window start (one stream) or at each blank-line-separated "
                        "document (published always takes the tokenizer's own special tokens, once per text)")
    p.add_argument("--param-types", type=_str_list, default=",".join(DEFAULT_PARAM_TYPES),
                   help="comma-separated from attention,mlp,norm,embedding,lm_head")
    p.add_argument("--hutchinson-probes", type=int, default=16)
    p.add_argument("--micro-batch", type=int, default=None, help="calibration windows per forward pass")
    p.add_argument("--eval-batch-size", type=int, default=8)
    p.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    p.add_argument("--hf-id", default=None,
                   help="the Hugging Face id of a local model copy (published super weights are matched on it)")
    sw = p.add_argument_group("super weights (activation-spike detection, causal test, ranks under --metric)")
    sw.add_argument("--detect-super-weights", action="store_true", help="write super_weights.json and its figure")
    sw.add_argument("--super-out-ratio", type=float, default=SW.out_ratio,
                    help="down-projection |output| spike over its layer's median")
    sw.add_argument("--super-in-ratio", type=float, default=SW.in_ratio,
                    help="down-projection |input| spike over its layer's median")
    sw.add_argument("--super-out-floor", type=float, default=SW.out_floor, help="absolute floor of the output spike")
    sw.add_argument("--super-in-floor", type=float, default=SW.in_floor, help="absolute floor of the input spike")
    sw.add_argument("--super-max-rounds", type=int, default=SW.max_rounds, help="zero what was found, look again")
    sw.add_argument("--super-windows", type=int, default=8, help="prompts: the first N held-out evaluation windows")
    sw.add_argument("--super-prompt", default=None, help="or one prompt text (the published method)")
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
        raise UsageError(_flag_message(e)) from None


def run_sweep(args: argparse.Namespace) -> int:
    from cwa_core.sweep import spec as sweep_spec
    from cwa_core.sweep.plan import format_table, make_plan

    single = [f for f in ("model", "metric", "topk", "data_file", "eval_file") if getattr(args, f) is not None]
    if single:
        raise UsageError(f"{flag(single[0])}: with --sweep, settings come from the sweep file; allowed with --sweep: "
                         "--dry-run, --address, --tracking-uri, --out-dir, --num-cpus, --dashboard, --no-progress")
    try:
        sweep = sweep_spec.load(args.sweep)
        if not args.dry_run:
            sweep = sweep_spec.prepare(sweep)
    except sweep_spec.SpecError as e:
        raise UsageError(str(e)) from None
    if args.dry_run:
        plan = make_plan(sweep.cells)
        print(format_table(plan.rows()))
        counts = plan.counts()
        print(f"{counts['cells']} cells over {counts['models']} model(s): {counts['baselines']} baseline evaluation(s), "
              f"{counts['scoring_passes']} scoring pass(es), {counts['evaluations']} perturbed evaluations")
        return 0
    from cwa_core.sweep.runner import SweepBusyError, SweepResourceError, SweepRunner

    root = Path(args.out_dir) if args.out_dir else Path("results") / sweep.name
    runner = SweepRunner(sweep, root, address=args.address, tracking_uri=args.tracking_uri,
                         progress=not args.no_progress, num_cpus=args.num_cpus, dashboard=args.dashboard)
    try:
        manifest = runner.run()
    except SweepBusyError as e:
        raise UsageError(f"--out-dir: {e}") from None
    except SweepResourceError as e:
        raise UsageError(str(e)) from None
    except KeyboardInterrupt:
        cells = runner.manifest.get("cells", {})
        n_done = sum(c["status"] == "finished" for c in cells.values())
        print(f"sweep {sweep.name}: interrupted; {n_done}/{len(cells)} cells finished and kept in {root}; "
              "run the same command again to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    _sweep_summary(root, sweep)
    if manifest.get("report", {}).get("pdf"):
        print(f"  report: {root / manifest['report']['pdf']} (analysis: {root / manifest['report']['json']})")
    if "experiment_id" in manifest.get("mlflow", {}):
        from cwa_core.sweep.tracking import ui_hint

        print(f"  browse: {ui_hint(manifest['mlflow']['tracking_uri'], manifest['mlflow']['experiment_id'])}")
    cells = manifest["cells"]
    n_done = sum(c["status"] == "finished" for c in cells.values())
    failed = [cid for cid, c in cells.items() if c["status"] == "failed"]
    where = f"results in {root}" + (f"; MLflow: {manifest['mlflow']['tracking_uri']}" if "mlflow" in manifest else "")
    if failed:
        print(f"sweep {sweep.name}: {n_done}/{len(cells)} cells finished, {len(failed)} FAILED "
              f"(errors in {root / 'sweep_manifest.json'} and {root}/<cell>/error.txt: "
              f"{', '.join(failed[:5])}{', ...' if len(failed) > 5 else ''}); run the same command again to retry them; "
              f"{where}")
        return 1
    print(f"sweep {sweep.name}: {n_done}/{len(cells)} cells finished, 0 failed; {where}")
    return 0


def _sweep_summary(root: Path, sweep) -> None:
    """One line per finished cell: its mean ratio per selection (inf where a seed overflowed)."""
    import json

    from cwa_core.experiment import mean_ratio, ratios_by_selection

    for cell in sweep.cells:
        f = root / cell.id / "perturbation_results.json"
        if not f.exists():
            continue
        res = json.loads(f.read_text())
        ratios = "  ".join(f"{k} x{mean_ratio(v):.3f}" for k, v in ratios_by_selection(res["results"]).items())
        c = cell.config
        print(f"  {cell.id}  {c.metric:14s} {c.mode:9s} K={c.topk:<6d} {c.perturb:10s} {ratios}")


def run_single(args: argparse.Namespace) -> int:
    """One experiment: a one-cell plan run in-process, through the worker the sweep's actors
    are (:class:`~cwa_core.sweep.worker.ModelWorker`) and the cell the sweep's cells are
    (:func:`cwa_core.cell.run_cell`)."""
    from cwa_core.cell import run_cell
    from cwa_core.config import ConfigError
    from cwa_core.experiment import BaselineError
    from cwa_core.models import ModelLoadError
    from cwa_core.outputs import write_experiment, write_failure
    from cwa_core.preflight import Preflight
    from cwa_core.sweep.worker import ModelWorker

    cfg = config_from_args(args)
    if (Path(cfg.out_dir) / "manifest.json").exists() and not args.overwrite:
        raise UsageError(f"--out-dir: {cfg.out_dir} already holds an experiment (manifest.json); "
                         "choose another folder or pass --overwrite")
    pf = Preflight()
    try:  # every check before any work: the model's config, then (demo built) the data
        [cfg] = pf.prepare([cfg])
        data = pf.check_data(cfg)  # checked already: the split, tokenized once
    except ConfigError as e:
        raise UsageError(_flag_message(e)) from None
    started = time.perf_counter()
    try:
        worker = ModelWorker(cfg, progress=not args.no_progress)
    except (ModelLoadError, ValueError) as e:
        raise UsageError(f"--model: {e}") from None
    worker.use_split(cfg, data)
    try:
        result = run_cell(worker, cfg, progress=not args.no_progress)
    except ConfigError as e:  # a metric that cannot score a tensor of this model, say
        raise UsageError(_flag_message(e)) from None
    except BaselineError as e:
        write_failure(cfg.out_dir, cfg.to_dict(), e, started)
        print(f"orchestrator.py: failed: {e}; details in {Path(cfg.out_dir) / 'manifest.json'}", file=sys.stderr)
        return 1
    except BaseException as e:
        write_failure(cfg.out_dir, cfg.to_dict(), e, started)
        raise
    info = worker.loaded.info
    manifest = write_experiment(cfg.out_dir, result, model_info=info.__dict__,
                                device=info.device, dtype=info.dtype, started=started,
                                extra_timings={"model_load": worker.load_seconds})
    _summary(result, manifest, cfg.out_dir)
    return 0


def _flag_message(e) -> str:
    """A ConfigError's one line, the setting named as the flag the user typed."""
    return f"{flag(e.key)}: {str(e).split(': ', 1)[1]}"


def _summary(result, manifest: dict, out_dir: str) -> None:
    from cwa_core.experiment import mean_ratio, ratios_by_selection

    b = result.baseline
    print(f"baseline perplexity {b.ppl:.4f} ({b.n_windows} windows x {b.window_length} tokens)")
    for kind, ratios in ratios_by_selection(result.results).items():
        print(f"  {kind:9s} ppl ratio mean {mean_ratio(ratios):10.4f}  per seed " +
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
    except KeyboardInterrupt:  # a sweep says more itself; a single experiment recorded its failure
        print("orchestrator.py: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    rc = main()
    if rc == EXIT_INTERRUPTED:
        # Ctrl-C: the clean stop is done (results kept, MLflow runs closed, actors and Ray stopped).
        # Python's own teardown of torch, Ray and MLflow can take half a minute on a busy machine
        # (measured: 35 s at load 16 on 2 cores, after a 2.7 s stop); a Ctrl-C must not wait for it.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    sys.exit(rc)
