"""The research summary's Phase 2 pages (issue 17), present only when the analysis holds their
data: the headlines in words, one page per campaign (its table and figures), and base vs
instruct pairs. :func:`phase2_sections` lists them; :func:`analysis.report.write_report` appends them.
"""
from __future__ import annotations

import textwrap
from typing import Callable

from matplotlib.figure import Figure

from .campaign import INSTRUCT_TOKENS, headline_sentence
from .campaign_figures import CAMPAIGNS, FIGURE_CAMPAIGN, campaign_figures_for
from .common import value
from .report_layout import figure_into, titled_page, fmt, grid_table, text_lines, text_table, wrapped

HEADLINE_NOTE = ("Headline: the level at which an arm's failure rate first reaches the target going harsher (linear "
                 "interpolation between the tested levels, in log10 for the error rate), for top_k against random_k "
                 "of the same size: a ratio of error rates (x), bits saved, or sparsity gained; the interval is the "
                 "cell's paired bootstrap over trials. Where an arm never reaches the target in the tested range (or "
                 "already exceeds it at the mildest level) the headline is only a bound. Each line is one cell: one "
                 "model, metric, K and mode (campaign_headline.parquet).")
PAIRS_NOTE = (f"Pairs: a model id and the same id with an instruct token ({', '.join(INSTRUCT_TOKENS)}) at "
              "its end or before a '-'. Compared only on matching settings (protocol, metric, K, mode, perturbation "
              "or campaign, variant). Phase 1 ratios: geometric mean over seeds. Super weights: perplexity ratio with "
              "every candidate zeroed together, and with as many random weights zeroed. difference = instruct - base; "
              "'-' where one is not a finite number (the note says why).")
PAIR_ROWS = 40  # pairs table rows on its page; the rest are in pairs.parquet
HEADLINES = 24  # headline sentences on their page; the rest are in campaign_headline.parquet
TABLE_ROWS = 90  # campaign table rows per page; the rest are in campaign_summary.parquet


def headline_page(a: dict) -> Figure:
    """Each campaign cell's headline in words, by campaign."""
    fig = titled_page("Phase 2: what protecting the top-K weights buys")
    ax = fig.add_axes((0.05, 0.05, 0.9, 0.9))
    heads = a["campaign"]["headlines"]
    lines, left = [HEADLINE_NOTE, ""], HEADLINES
    for c in [*CAMPAIGNS, *sorted({h["campaign"] for h in heads} - set(CAMPAIGNS))]:
        mine = sorted((h for h in heads if h["campaign"] == c), key=lambda h: (h["model_name"], h["metric"], h["k"],
                                                                                h["mode"], h["cell"]))
        if mine and left > 0:
            lines += [f"{c}:"] + [f"  - {headline_sentence(h)} [cell {h['cell']}]." for h in mine[:left]] + [""]
        left -= len(mine)
    if left < 0:
        lines += [f"... {-left} more headlines in campaign_headline.parquet", ""]
    if a.get("pairs"):
        lines.append(f"Base vs instruct: {len({(p['base'], p['instruct']) for p in a['pairs']})} pair(s), compared on "
                     "the page 'Phase 2: base and instruct models'.")
    text_lines(ax, lines, size=7.5)
    return fig


def study_lines(a: dict, most: int = 6) -> list[str]:
    """The study page's Phase 2 lines: how many campaign cells, and the first ``most`` headlines
    in words; none without campaign data."""
    if not a.get("campaign"):
        return []
    heads = a["campaign"]["headlines"]
    kinds = [c for c in CAMPAIGNS if any(h["campaign"] == c for h in heads)]
    out = ["", f"Phase 2 (protection campaigns): {len(heads)} campaign cell(s): {', '.join(kinds)}; headlines "
               f"(page 'Phase 2: what protecting the top-K weights buys'):"]
    out += [f"  {headline_sentence(h)}." for h in heads[:most]]
    return out + ([f"  ... {len(heads) - most} more on that page"] if len(heads) > most else [])


def _fail_cell(r: dict) -> str:
    lo, hi = r.get("failure_lo"), r.get("failure_hi")
    iv = "" if lo is None or hi is None else f" [{fmt(lo, 2)}, {fmt(hi, 2)}]"
    return f"{fmt(r.get('failure_rate'), 2)}{iv}"


def campaign_rows(a: dict, campaign: str) -> list[list]:
    """The campaign table: model, metric, K, mode, arm, level, n, median ratio, failure rate
    [Wilson interval], exact McNemar p against the reference arm (each cell's own tests); by
    model, cell, level, then arm in the stored order."""
    p = {(r["cell"], r["level"], r["arm"]): r for r in a["campaign"]["paired"] if r["campaign"] == campaign}
    refs = {r["reference"] for r in p.values()}
    mine = [(i, r) for i, r in enumerate(a["campaign"]["summary"]) if r["campaign"] == campaign]
    mine.sort(key=lambda ir: (ir[1]["model_name"], ir[1]["metric"], ir[1]["k"], ir[1]["mode"], ir[1]["cell"],
                              value(ir[1]["level"]), ir[0]))
    rows = []
    for _, r in mine:
        t = p.get((r["cell"], r["level"], r["arm"]))
        rows.append([r["model_name"], r["metric"], r["k"], r["mode"], r["arm"], fmt(r["level"]), r["n"],
                     fmt(r["median_ratio"]), _fail_cell(r),
                     "reference" if r["arm"] in refs else "-" if t is None else fmt(t["p_value"], 2)])
    return rows


def campaign_page(a: dict, campaign: str) -> Figure:
    """One campaign's table: every cell, arm and level."""
    rows = campaign_rows(a, campaign)
    fail = sorted({fmt(s["fail_ratio"]) for s in a["campaign"]["headlines"] if s["campaign"] == campaign})
    note, _ = wrapped(f"fail: ratio > {' / '.join(fail)} or non-finite (nan counts as a failure). failure rate [Wilson "
                      "95% interval]; p: exact McNemar (two-sided binomial sign test on the discordant pairs: same seed "
                      "and trial) against random_k at the same level, within the cell, unadjusted", 120)
    fig = titled_page(f"Phase 2: {campaign}")
    text_table(fig.add_axes((0.05, 0.04, 0.9, 0.9)),
               ["model", "metric", "K", "mode", "arm", "level", "n", "median ratio", "failure rate [95%]", "p"], rows,
               f"{campaign}: perplexity ratio and failure rate per arm and level", " in campaign_summary.parquet",
               max_rows=TABLE_ROWS, note=note)
    return fig


def campaign_figures_page(a: dict, campaign: str) -> Figure:
    """One campaign's figures: failure rate and median ratio against the level."""
    fig = titled_page(f"Phase 2: {campaign}, figures")
    names = [n for n in campaign_figures_for(a) if FIGURE_CAMPAIGN[n] == campaign]
    for i, name in enumerate(names):
        h = 0.9 / len(names)
        figure_into(fig.add_axes((0.05, 0.95 - (i + 1) * h + 0.04, 0.9, h - 0.06)), name, a)
    return fig


def pairs_page(a: dict) -> Figure:
    """Base and instruct variants of one model side by side, on matching settings."""
    rows = [[p["base_name"], p["instruct_name"], p["protocol"] or "-", p["setting"], p["quantity"], fmt(p["base_value"]),
             fmt(p["instruct_value"]), fmt(p["difference"]), p["note"] or ""] for p in a["pairs"][:PAIR_ROWS]]
    fig = titled_page("Phase 2: base and instruct models")
    ax = fig.add_axes((0.05, 0.04, 0.9, 0.9))
    ax.axis("off")
    ax.text(0, 1.0, "\n".join(textwrap.wrap(PAIRS_NOTE, 125)), fontsize=7.5, va="top", transform=ax.transAxes)
    bottom = grid_table(ax, ["base", "instruct", "prot", "setting", "quantity", "base", "instruct", "difference",
                             "note"], rows, [0.13, 0.15, 0.05, 0.17, 0.14, 0.08, 0.08, 0.09, 0.11], top=0.93, size=6.5)
    if len(a["pairs"]) > PAIR_ROWS:
        ax.text(0, bottom - 0.01, f"... {len(a['pairs']) - PAIR_ROWS} more rows in pairs.parquet", fontsize=7,
                va="top", transform=ax.transAxes)
    return fig


def phase2_sections(a: dict) -> list[tuple[str, Callable[[dict], Figure]]]:
    """(name, page) of every Phase 2 page ``a`` has data for; none without campaign data or pairs."""
    out = []
    if a.get("campaign"):
        out.append(("Phase 2 headlines", headline_page))
        present = {FIGURE_CAMPAIGN[n] for n in campaign_figures_for(a)}
        for c in (c for c in CAMPAIGNS if c in present):
            out += [(f"Phase 2: {c}", lambda a, c=c: campaign_page(a, c)),
                    (f"Phase 2: {c}, figures", lambda a, c=c: campaign_figures_page(a, c))]
    if a.get("pairs"):
        out.append(("Base and instruct models", pairs_page))
    return out
