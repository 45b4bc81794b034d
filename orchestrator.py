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


def _float_list(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _str_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def build_parser() -> OneLineParser:
    p = OneLineParser(prog="orchestrator.py", description=__doc__.split("\n")[0],
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _experiment_flags(p)
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


def _experiment_flags(p: OneLineParser) -> None:
    """One flag per declared setting (``cwa_core.config``): its type, default, choices and help
    come from the declaration, grouped by section."""
    from cwa_core.config import declared, defaults, value_types

    groups: dict[str, argparse._ArgumentGroup] = {}
    types, default = value_types(), defaults()
    for name, s in declared():
        if not s.flag:
            continue
        g = groups.get(s.section) or groups.setdefault(s.section, p.add_argument_group(f"{s.section} settings"))
        vt = types[name]
        if vt.types == (bool,):
            g.add_argument(flag(name), action="store_true", help=s.help)
        elif vt.is_list:
            g.add_argument(flag(name), type={int: _int_list, float: _float_list}.get(vt.item, _str_list),
                           default=",".join(map(str, default[name])), help=s.help)
        else:
            g.add_argument(flag(name), type=vt.item, default=default.get(name), help=s.help,
                           choices=s.choices() if s.choices is not None else None)


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
              f"{counts['scoring_passes']} scoring pass(es), {counts['evaluations']} perturbed evaluations"
              + (f", {counts['trials']} campaign trial(s)" if counts["trials"] else ""))
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

    from cwa_core import schema
    from cwa_core.numerics import mean_ratio
    from cwa_core.schema import ratios_by_selection

    for cell in sweep.cells:
        f = root / cell.id / schema.PERTURBATION_RESULTS
        if not f.exists():
            continue
        res = json.loads(f.read_text())
        ratios = "  ".join(f"{k} x{mean_ratio(v):.3f}" for k, v in ratios_by_selection(res["results"]).items())
        c = cell.config
        print(f"  {cell.id}  {c.metric:14s} {c.mode:9s} K={c.topk:<6d} {c.perturb:10s} {ratios}")
        camp = root / cell.id / schema.CAMPAIGN_RESULTS
        if camp.exists():  # the headline's sentence (the figures and the report hold the rest)
            head = json.loads(camp.read_text()).get("headline") or {}
            print(f"    {c.campaign}: {head.get('text') or head.get('why', 'no headline')}")


def run_single(args: argparse.Namespace) -> int:
    """One experiment: a one-cell plan run in-process, through the worker the sweep's actors
    are (:class:`~cwa_core.sweep.worker.ModelWorker`) and the cell the sweep's cells are
    (:func:`cwa_core.cell.run_cell`)."""
    from cwa_core import schema
    from cwa_core.cell import run_cell
    from cwa_core.config import ConfigError
    from cwa_core.experiment import BaselineError
    from cwa_core.models import ModelLoadError
    from cwa_core.outputs import write_experiment, write_failure
    from cwa_core.preflight import Preflight
    from cwa_core.sweep.worker import ModelWorker

    cfg = config_from_args(args)
    if (Path(cfg.out_dir) / schema.MANIFEST).exists() and not args.overwrite:
        raise UsageError(f"--out-dir: {cfg.out_dir} already holds an experiment ({schema.MANIFEST}); "
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
    from cwa_core.numerics import mean_ratio
    from cwa_core.schema import ratios_by_selection

    b = result.baseline
    print(f"baseline perplexity {b.ppl:.4f} ({b.n_windows} windows x {b.window_length} tokens)")
    for kind, ratios in ratios_by_selection(result.results).items():
        print(f"  {kind:9s} ppl ratio mean {mean_ratio(ratios):10.4f}  per seed " +
              ", ".join(f"{x:.4f}" for x in ratios))
    if result.stability:
        j = result.stability["jaccard"]
        print(f"  top-K Jaccard across seeds: mean {j['mean']:.3f} (min {j['min']:.3f}, max {j['max']:.3f})")
    if result.campaign:
        _campaign_summary(result.campaign)
    print(f"wrote {len(manifest['files'])} files to {out_dir} in {manifest['timings_s']['total']:.1f} s")


def _campaign_summary(c: dict) -> None:
    """Per level, each arm's failure rate [Wilson interval] and median ratio; then the headline."""
    print(f"campaign {c['campaign']} (failure: ratio > {c['settings']['fail_ratio']:g} or not finite)")
    for s in c["summary"]:
        print(f"  {c['level_name']} {s['level']:<8g} {s['arm']:13s} failed {s['failures']}/{s['n']} "
              f"[{s['failure_lo']:.2f}, {s['failure_hi']:.2f}]  median ratio {s['median_ratio']:.4g}")
    head = c.get("headline") or {}
    print("  " + (head.get("text") or f"headline: {head.get('why', 'not available')}"))


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
