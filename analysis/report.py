"""The research summary: one PDF page per section (matplotlib PdfPages, no LaTeX).

    python -m analysis.report --input-dirs results/ --output research_summary.pdf
    python -m analysis.report --analysis results/x/statistical_analysis.json --output research_summary.pdf

Sections (:data:`SECTIONS`): study settings and protocols; perplexity ratios; paired tests and
critical K; stability; metric agreement; where the top-K weights live; recurring coordinates
and super weights; hypotheses. Each page holds its table, its figure (if any) and a
one-sentence caption saying what the figure shows and from which cells.
Library use: :func:`write_report` (the sweep runner calls it with :func:`analysis.analyze`'s dict).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import textwrap
from pathlib import Path
from typing import Callable, Sequence

from matplotlib.backends.backend_pdf import PdfPages
from matplotlib.figure import Figure

from cwa_core.schema import SELECTION_KINDS

from .common import clean
from .report_layout import (figure_into, titled_page, fmt, fmt_ci, grid_table, new_page, share_for_table, text_lines,
                            text_table, wrapped)
from .report_phase2 import phase2_sections, study_lines

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- sections

def study_page(a: dict) -> Figure:
    fig = titled_page("Critical weight analysis: research summary", 14)
    ax = fig.add_axes((0.05, 0.05, 0.9, 0.9))
    c = a["cells"]
    lines = [f"Created {a.get('created_utc')} from {', '.join(map(str, a.get('inputs') or []))}",
             f"Cells analysed: {c['n_loaded']}; skipped (not finished): {c['n_skipped']}", ""]
    for s in c["skipped"][:8]:
        lines.append(f"  skipped {s['cell']}: {s['status']} {s.get('error') or ''}")
    lines += ["", "Models:"]
    for m in a["models"]:
        lines.append(f"  {m['model_name']} ({m['model_type']}, {m['n_layers']} layers, {m['n_params']} parameters): "
                     f"metrics {', '.join(m['metrics'])}; K {', '.join(map(str, m['ks']))}; modes {', '.join(m['modes'])}")
    table = c["table"]
    lines += ["", "Settings: parameter types " + "; ".join(sorted({r["param_types"] for r in table})) +
              "; perturbations " + ", ".join(sorted({r["perturbation"] for r in table})) +
              "; seeds " + "; ".join(sorted({r["seeds"] for r in table})) +
              f"; {len({r['variant'] for r in table})} variant(s) of the remaining settings (see cells.parquet)"]
    lines += ["", f"Evaluation protocols ({len(a['protocols'])}):"]
    for p in a["protocols"]:
        lines.append(f"  {p['id']}: {p['label']}" + (" (derived from older fields)" if p["derived_from_older_fields"] else "")
                     + f"; {len(p['cells'])} cells")
    lines += ["", a["conventions"]["pooling"] + ".", a["conventions"]["numbers"] + "."]
    o = a["options"]["compare"]
    mc = a.get("multiple_comparisons") or {}
    lines += ["", f"Intervals ({o['level']:.0%}): t on log ratios over seeds (geometric mean); where seeds carry no "
                  f"spread, a paired bootstrap over the evaluation windows ({o['n_boot']} resamples, seed "
                  f"{o['boot_seed']}); an infinite seed: [smallest seed, inf]. Paired test: "
                  f"{(a['paired_tests'] or [{}])[0].get('test', 'none run')}. Multiple comparisons: Holm (1979) over "
                  f"the report's {mc.get('n_tests', 0)} tests. Critical K threshold: {o['threshold']:g}x."]
    lines += study_lines(a)  # Phase 2's headlines, when a cell ran a campaign
    camp = {h["cell"]: f" + {h['campaign']}" for h in (a.get("campaign") or {}).get("headlines", [])}
    lines += ["", "Cells:"] + [f"  {r['cell']}: {r['model_name']} {r['metric']} K={r['k']} {r['mode']} "
                               f"{r['perturbation']}{camp.get(r['cell'], '')} seeds {r['seeds']} [{r['protocol']}]"
                               for r in c["table"][:40]]
    if len(c["table"]) > 40:
        lines.append(f"  ... {len(c['table']) - 40} more (cells.parquet)")
    if a.get("warnings"):
        lines += ["", "Warnings:"] + [f"  {w}" for w in a["warnings"][:10]]
    text_lines(ax, lines, size=7)
    return fig


INTERVAL_CODES = {"t": "t", "windows": "w", "order": "o", "zero": "0", "none": "-"}
INTERVAL_NOTE = ("interval (column 'how', top/random/bottom): t = t interval on log ratios over seeds; w = paired "
                 "bootstrap over the evaluation windows (the seeds carry no spread: every seed gives the same ratio); "
                 "o = [smallest seed, inf] (an infinite seed); 0 = zero width (no spread, no per-window numbers); "
                 "- = one seed, no interval")


def ratios_page(a: dict) -> Figure:
    groups: dict[tuple, dict] = {}
    for r in a["ratios"]:
        key = (r["model_name"], r["metric"], r["k"], r["mode"], r["perturbation"], r["protocol"])
        groups.setdefault(key, {})[r["selection"]] = r
    rows = []
    for key, sel in groups.items():
        cols, how = [], []
        for s in SELECTION_KINDS:
            r = sel.get(s)
            cols += ["-", "-"] if r is None else [r["geomean"], fmt_ci(r["ci"])]
            how.append("." if r is None else INTERVAL_CODES.get(r.get("interval_code"), "?"))
        n = max(r["n_seeds"] for r in sel.values())
        bad = sum(r["n_inf"] for r in sel.values()), sum(len(r["missing"]) for r in sel.values())
        rows.append([*key, n, *cols, "/".join(how), f"{bad[0]}/{bad[1]}"])
    few = sum(1 for r in a["ratios"] if r.get("warning"))
    note = INTERVAL_NOTE + (f". WARNING: {few} of {len(a['ratios'])} rows rest on fewer than 5 seeds: their intervals "
                            "over seeds are wide and assume normal log ratios" if few else "")
    note, n_lines = wrapped(note)
    level = f"{a['options']['compare']['level']:.0%}"
    fig, (t, f) = new_page("Perplexity ratios by selection", share_for_table(len(rows), n_lines + 1))
    text_table(t, ["model", "metric", "K", "mode", "perturb", "prot", "seeds",
               *[c for sel in SELECTION_KINDS for c in (sel, f"{level} CI")], "how", "inf/miss"], rows,
           f"Geometric-mean perplexity ratio over seeds (perturbed / baseline), {level} intervals", " in ratios.parquet",
           note=note)
    figure_into(f, "ratios_by_selection", a)
    return fig


def _test_code(p: dict) -> str:
    used = p.get("test_used") or ""
    return "t" if used.startswith("paired t") else "exact" if used.startswith("exact") else "-"


def dose_page(a: dict) -> Figure:
    fig, (t, f) = new_page("Top-K against random-K, and damage against K")
    rows = [[p["model_name"], p["metric"], p["k"], p["mode"], p["control"], p["n"],
             f"{p['count']['top_greater']}/{p['count']['n']}" if p.get("count") else "-", p.get("mean_log_diff"),
             p["p_value"], p.get("p_holm"), _test_code(p), p.get("outcome") or p["verdict"]]
            for p in a["paired_tests"] if p["control"] == "random_k"]
    crit = [[d["model_name"], d["metric"], d["mode"], d["perturbation"], ",".join(map(str, d["ks"])),
             d["critical"]["critical_k"], d["critical"]["bound"],
             "-" if not d["critical"]["bracket"] else "-".join(fmt(b) for b in d["critical"]["bracket"]),
             d["random_k_at_critical"]] for d in a["dose_response"]]
    t.axis("off")
    sub1, sub2 = t.inset_axes((0, 0.42, 1, 0.58)), t.inset_axes((0, 0.0, 1, 0.36))
    mc = a.get("multiple_comparisons") or {}
    note, _ = wrapped("test: t = paired t-test on log ratios; exact = exact Wilcoxon signed-rank (+inf ranked largest),"
                      " used where a ratio is infinite or the differences do not vary (its smallest p is 2/2^n: 0.25 "
                      "with 3 seeds, below 0.05 from 6). top>ctl = seeds where top_k did more damage. p Holm: Holm "
                      f"(1979) over the report's {mc.get('n_tests', 0)} tests (paired, location fit and comparison). dlog ratio = "
                      "log(top_k ratio) - log(random_k ratio), mean over seeds")
    text_table(sub1, ["model", "metric", "K", "mode", "control", "n", "top>ctl", "mean dlog", "p", "p Holm", "test",
                  "outcome"], rows,
           "Paired test of top_k against random_k over seeds", " (and bottom_k) in paired_tests.parquet", max_rows=14,
           note=note)
    text_table(sub2, ["model", "metric", "mode", "perturb", "K measured", "critical K", "bound", "bracket", "random_k there"],
               crit, f"Critical K: smallest K whose top-K ratio (geometric mean) reaches "
                 f"{a['options']['compare']['threshold']:g}x, log-log interpolated", " in dose_response.parquet", max_rows=10)
    figure_into(f, "dose_response", a)
    return fig


def stability_page(a: dict) -> Figure:
    rows = [[s["model_name"], s["metric"], s["k"], s["mode"], s["jaccard"]["n"], s["jaccard"]["mean"], s["jaccard"]["min"],
             s["jaccard"]["max"], s["spearman"]["mean"], "yes (1.0 by construction)" if s["data_independent"] else "no",
             ",".join(s["sources"])] for s in a["stability"]]
    fig, (t, f) = new_page("Stability of the top-K sets across seeds", share_for_table(len(rows)))
    text_table(t, ["model", "metric", "K", "mode", "pairs", "Jaccard mean", "min", "max", "Spearman", "data-independent",
               "source"], rows, "Jaccard and Spearman over seed pairs", " in stability.parquet")
    figure_into(f, "stability_vs_k", a)
    return fig


def agreement_page(a: dict) -> Figure:
    sp = a["metric_agreement"]["spearman"]
    ov = a["metric_agreement"]["topk_overlap"]
    rows = [[s["model_name"], "Spearman (sample)", "-", "-", s["metric_a"], s["metric_b"], s["rho"]["n"], s["rho"]["mean"],
             s["rho"]["min"], s["rho"]["max"]] for s in sp]
    rows += [[o["model_name"], "top-K Jaccard", o["k"], o["mode"], o["metric_a"], o["metric_b"], o["jaccard"]["n"],
              o["jaccard"]["mean"], o["jaccard"]["min"], o["jaccard"]["max"]] for o in ov]
    fig, (t, f) = new_page("Do the metrics agree?", share_for_table(len(rows)))
    text_table(t, ["model", "measure", "K", "mode", "metric a", "metric b", "seeds", "mean", "min", "max"], rows,
               "Metric agreement on the same model", " in metric_spearman.parquet / topk_overlap.parquet")
    figure_into(f, "metric_agreement", a)
    return fig


def _most_enriched(a: dict, fit: dict) -> str:
    """The group of a model's largest enrichment, with its interval: "mlp 1.7 [1.5, 1.9]"."""
    mine = [s for s in a["location"]["shares"] if s["enrichment"] is not None and all(
        s[k] == fit[k] for k in ("protocol", "model", "metric", "k", "mode", "variant", "axis"))]
    if not mine:
        return "-"
    s = max(mine, key=lambda s: s["enrichment"])
    return f"{s['category']} {fmt(s['enrichment'])} {fmt_ci(s['enrichment_ci'])}"


def location_page(a: dict) -> Figure:
    fig, (t, f) = new_page("Where the top-K weights live", table_share=0.34)
    loc = a["location"]
    fits = [[x["model_name"], x["metric"], x["k"], x["mode"], x["axis"], x.get("chi2"), x.get("dof"), x["p_value"],
             _most_enriched(a, x)] for x in loc["fit"]]
    tests = [[x["metric"], x["k"], x["mode"], x["axis"], x["model_name_a"], x["model_name_b"], x.get("g2"), x.get("dof"),
              x["p_value"], x.get("p_holm")] for x in loc["comparisons"]]
    t.axis("off")
    sub1, sub2 = t.inset_axes((0, 0.52, 1, 0.48)), t.inset_axes((0, 0.06, 1, 0.4))
    text_table(sub1, ["model", "metric", "K", "mode", "by", "chi2", "dof", "p", "most enriched, 95% CI"], fits,
               "Enrichment: top-K share / parameter share, tested against the model's own parameter shares", " in "
               "location.parquet / location_fit.parquet", max_rows=8,
               note="chi-square goodness of fit of the top-K counts to K x parameter share; per group: exact binomial test "
                "and Clopper-Pearson interval")
    text_table(sub2, ["metric", "K", "mode", "by", "model a", "model b", "G2", "dof", "p", "p Holm"], tests,
               "Do two models' enrichment profiles differ? (never their raw counts)", " in location_tests.parquet",
               max_rows=8, note="likelihood-ratio test of the model x group interaction, Poisson log-linear model with "
                            "offset log(K x the model's own parameter share)")
    if loc.get("note"):
        t.text(0, 0.0, "\n".join(textwrap.wrap("Note: " + loc["note"], 140)), fontsize=7, va="bottom",
               transform=t.transAxes)
    sub = f.inset_axes((0, 0.56, 1, 0.44))
    sub2 = f.inset_axes((0, 0.04, 1, 0.42))
    f.axis("off")
    figure_into(sub, "param_type_by_model", a)
    figure_into(sub2, "layer_profile", a)
    return fig


def _published_line(p: dict) -> str:
    """One super-weight report's comparison with the registry: its published coordinates found
    and missed, and apart from them, those another study reported (never counted as published)."""
    n = {k: len(p.get(k) or []) for k in ("found", "missed", "new")}
    line = (f"published coordinates of {p.get('hf_id')}: {n['found']} found, {n['missed']} missed; "
            if p.get("has_published", True) else f"{p.get('hf_id')} has no published coordinates; ")
    line += f"{n['new']} candidates not published"
    rep = {k: len((p.get("reported_by") or {}).get(k) or []) for k in ("found", "missed")}
    if rep["found"] or rep["missed"]:
        line += f"; reported by another study only: {rep['found']} found, {rep['missed']} missed"
    return line


def recurring_page(a: dict) -> Figure:
    lines = a["recurring"]["lines"]
    fig, (t, b) = new_page("Recurring coordinates and super weights", share_for_table(len(lines)))
    rows = [[x["model_name"], x["metric"], x["k"], x["mode"], x["parameter"].replace("model.layers.", "L"), x["axis"],
             x["index"], f"{x['seeds_flagged']}/{x['n_seeds']}", x["count_mean"], x["share_mean"], x["enrichment_max"]]
            for x in lines]
    text_table(t, ["model", "metric", "K", "mode", "tensor", "axis", "index", "seeds", "count", "share", "enrichment"], rows,
               "Rows/columns holding many top-K weights", " in recurring_lines.parquet",
               empty="(none found)" if a["cells"]["n_loaded"] else "(nothing measured)")
    txt = [a["recurring"]["rule"] + ".", ""]
    cross = a["recurring"]["across_metrics"]
    txt.append(f"Lines flagged by several metrics: {len(cross)}")
    txt += [f"  {c['model_name']} {c['parameter']} {c['axis']} {c['index']}: {', '.join(c['metrics'])}" for c in cross[:8]]
    sw = a["super_weights"]["candidates"]
    txt += ["", f"Super-weight candidates: {len(sw) if sw else 'detection did not run (no super_weights.json)'}"]
    for c in (sw or [])[:10]:
        tops = "; ".join(f"{t['metric']} K={t['k']} {t['mode']}: {len(t['seeds_in_top_k'])}/{t['seeds_ranked']} seeds"
                         for t in c["in_top_k"])
        txt.append(f"  {c['model_name']} [{c['protocol']}] layer {c['layer']} {c['module']} [{c['row']}, {c['col']}] "
                   f"value {fmt(c['value'])}, zeroed ratio {fmt(c['ratio_zeroed'])} (random {fmt(c['ratio_random'])}); "
                   f"in top-K of the same protocol: {tops or '-'}")
    txt += [f"  {_published_line(p)}" for p in a["super_weights"]["published"]]
    text_lines(b, txt, size=7)
    return fig


# what a hypothesis case measured, in the order shown (keys of analysis.hypotheses' cases)
CASE_NUMBERS = (("mean ratio", "mean_ratio"), ("attention", "mean_score_attention"), ("mlp", "mean_score_mlp"),
                ("norm", "mean_score_norm"), ("early", "mean_score_early"), ("middle", "mean_score_middle"),
                ("late", "mean_score_late"), ("Jaccard", "jaccard_mean"), ("bar", "bar"), ("Spearman", "spearman_mean"))


def _cases_phrase(h: dict) -> str:
    """'3 / 4', with what the summary adds after it; or 'not measured: why'."""
    held, n = sum(bool(c["holds"]) for c in h["cases"]), len(h["cases"])
    if not n:
        return f"none measured: {h.get('why')}"
    extra = (h.get("summary") or "").partition(";")[2].strip()
    excluded = f"; {len(h['excluded'])} excluded (data-independent)" if h.get("excluded") else ""
    return f"{held} / {n}" + excluded + (f"; {extra}" if extra else "")


def hypotheses_rows(a: dict, max_failing: int = 14) -> tuple[list[list[str]], list[list[str]], int]:
    """The hypotheses table (hypothesis, rule, verdict, cases holding / measured) and the table
    of the cases that do not hold (hypothesis, model by its display name, metric, K, mode, the
    numbers measured), the first ``max_failing`` of them; and how many failing cases there are."""
    main = [[f"{h['id']}  {h['statement']}", h["rule"], h["verdict"], _cases_phrase(h)] for h in a["hypotheses"]]
    failing = [(h["id"], c) for h in a["hypotheses"] for c in h["cases"] if not c["holds"]]
    rows = [[hid, c.get("model_name") or c["model"], c.get("metric", "-"), fmt(c.get("k")), c.get("mode", "-"),
             ", ".join(f"{label} {fmt(c[key])}" for label, key in CASE_NUMBERS if key in c)]
            for hid, c in failing[:max_failing]]
    return main, rows, len(failing)


def hypotheses_page(a: dict) -> Figure:
    fig = titled_page("Seed hypotheses, checked")
    ax = fig.add_axes((0.05, 0.04, 0.9, 0.9))
    ax.axis("off")
    main, failing, n_failing = hypotheses_rows(a)
    ax.text(0, 1.0, "A hypothesis is supported only when every measured case holds. Every case, with its numbers\n"
                    "and cells: statistical_analysis.json, section \"hypotheses\".", fontsize=8, va="top",
            transform=ax.transAxes)
    bottom = grid_table(ax, ["hypothesis", "rule", "verdict", "cases holding / measured"], main,
                        [0.3, 0.38, 0.1, 0.22], top=0.95)
    ax.text(0, bottom - 0.03, f"Cases that do not hold ({n_failing})" + (
        f": the first {len(failing)}" if n_failing > len(failing) else ""), fontsize=9, fontweight="bold", va="top",
            transform=ax.transAxes)
    if failing:
        grid_table(ax, ["", "model", "metric", "K", "mode", "measured"], failing, [0.05, 0.22, 0.16, 0.07, 0.09, 0.41],
                   top=bottom - 0.06)
    else:
        ax.text(0, bottom - 0.06, "none: every measured case holds", fontsize=8, va="top", transform=ax.transAxes)
    return fig


SECTIONS: dict[str, Callable[[dict], Figure]] = {
    "Study, settings and protocols": study_page,
    "Perplexity ratios": ratios_page,
    "Paired tests and critical K": dose_page,
    "Stability": stability_page,
    "Metric agreement": agreement_page,
    "Where the top-K weights live": location_page,
    "Recurring coordinates and super weights": recurring_page,
    "Hypotheses": hypotheses_page,
}


def write_report(analysis: dict, pdf_path: str | Path, *, figures_dir: str | Path | None = None) -> Path:
    """One page per section of :data:`SECTIONS`, then the Phase 2 pages when the analysis holds
    campaign data or base/instruct pairs (:mod:`analysis.report_phase2`), into ``pdf_path``
    (from :func:`analysis.analyze`'s dict or a loaded statistical_analysis.json). ``figures_dir``:
    the PNGs the analysis saved (its ``figures/``), embedded instead of drawn again."""
    a = clean(analysis)
    a["_figures_dir"] = str(figures_dir) if figures_dir else None
    path = Path(pdf_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with PdfPages(path, metadata={"Title": "Critical weight analysis: research summary", "Creator": "cwa analysis"}) as pdf:
        for name, page in [*SECTIONS.items(), *phase2_sections(a)]:  # Phase 2 pages only with their data
            pdf.savefig(page(a))
            log.info("report page: %s", name)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m analysis.report", description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--input-dirs", nargs="+", metavar="DIR", help="result folders or sweep roots (analysed now)")
    src.add_argument("--analysis", metavar="JSON", help="a statistical_analysis.json written by analysis.cross_model")
    ap.add_argument("--output", required=True, help="the PDF to write")
    ap.add_argument("--analysis-output", metavar="JSON",
                    help="with --input-dirs: also write the analysis JSON, tables and figures here")
    ap.add_argument("-q", "--quiet", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    try:
        if args.analysis:
            p = Path(args.analysis)
            if not p.is_file():
                ap.error(f"--analysis: no such file {args.analysis!r}")
            a = json.loads(p.read_text())
            figures = p.parent / "figures"
        else:
            from .cross_model import analyze

            a = analyze(args.input_dirs, output=args.analysis_output)
            figures = Path(args.analysis_output).parent / "figures" if args.analysis_output else None
    except (FileNotFoundError, ValueError) as e:
        ap.error(str(e))
    write_report(a, args.output, figures_dir=figures)
    log.info("wrote %s (%d pages)", args.output, len(SECTIONS) + len(phase2_sections(clean(a))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
