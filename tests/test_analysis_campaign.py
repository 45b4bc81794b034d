"""Phase 2 in the cross-model analysis (issue 17): campaign_results.json files as tables, the
headline in words, base vs instruct pairs, the report's Phase 2 pages and figures; and nothing
of it when no cell ran a campaign."""
from __future__ import annotations

import json
import math
import re
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
from matplotlib.figure import Figure

from analysis.campaign import INSTRUCT_TOKENS, headline_numbers, headline_sentence, instruct_base, model_pairs
from analysis.campaign_figures import CAMPAIGN_FIGURES, campaign_figures_for
from analysis.common import clean
from analysis.compare import CompareOptions
from analysis.cross_model import AnalysisOptions, analyze, load_tables
from analysis.figures import FIGURES, figures_for
from analysis.load import _variant
from analysis.report import SECTIONS, study_page, write_report
from analysis.report_phase2 import campaign_rows, phase2_sections, study_lines
from cwa_core.campaign_stats import summarize
from cwa_core.schema import ARM_LABELS
from synthetic_campaign import SynthCampaign, campaign_results, write_campaign_cell
from synthetic_results import SynthCell, SynthModel, write_cell

FAST = AnalysisOptions(compare=CompareOptions(n_boot=100), figures=False)
PHASE1_TABLES = ["cells", "results", "ratios", "paired_tests", "dose_response", "stability", "sensitivity_profile",
                 "location", "location_fit", "top_weights_by_tensor", "top_weights"]
BASE, INST = "org/Model-7B", "org/Model-7B-Instruct"


def _cell(model: str = BASE, **kw) -> SynthCell:
    return SynthCell(model=SynthModel(model), seeds=(0, 1), topk=10, **kw)


def _pdf_pages(path: Path) -> int:
    return len(re.findall(rb"/Type\s*/Page[^s]", path.read_bytes()))


# --------------------------------------------------------------------------- tables

def test_campaign_tables_hold_the_files_numbers(tmp_path):
    """bit_errors, 3 arms x 4 rates x (2 seeds x 5 trials): 120 trial rows; failing trials
    (ratio inf) kept as inf; the summary, paired and headline rows as stored, with the cell's
    Phase 1 keys."""
    c = SynthCampaign(seeds=(0, 1), trials=5)
    write_campaign_cell(tmp_path / "a", _cell(), c)
    out = tmp_path / "x" / "statistical_analysis.json"
    a = analyze([tmp_path / "a"], options=FAST, output=out)
    t = load_tables(out)
    trials, summary, head = t["campaign_trials"], t["campaign_summary"], t["campaign_headline"]
    assert len(trials) == 3 * 4 * 10 and set(trials["arm"]) == {"none", "top_k", "random_k"}
    cell = t["cells"].iloc[0]
    for k in ("cell", "protocol", "model", "model_name", "metric", "k", "mode", "variant"):
        assert (trials[k] == cell[k]).all() and (summary[k] == cell[k]).all(), k
    assert (trials["campaign"] == "bit_errors").all() and (trials["level_name"] == "error_rate").all()
    # random_k at 1e-5 fails in 0.8 of its 10 trials (planted): 8 rows of ratio inf, status "inf"
    rk = trials[(trials["arm"] == "random_k") & (trials["level"] == 1e-5)]
    assert len(rk) == 10 and int(rk["ppl_ratio"].map(math.isinf).sum()) == 8 and (rk["status"] == "inf").sum() == 8
    row = summary[(summary["arm"] == "top_k") & (summary["level"] == 1e-5)].iloc[0]
    assert (row["n"], row["failures"], row["failure_rate"]) == (10, 2, 0.2)
    assert row["failure_lo"] == pytest.approx(0.1) and row["failure_hi"] == pytest.approx(0.3)
    assert len(t["campaign_paired"]) == 4 * 2  # per level: none and top_k against random_k
    assert len(head) == 1 and head.iloc[0]["value"] == 10.0 and (head.iloc[0]["lo"], head.iloc[0]["hi"]) == (3.0, 30.0)
    assert bool(head.iloc[0]["available"]) and not bool(head.iloc[0]["censored"])
    assert a["campaign"]["cells"] == [cell["cell"]]
    assert json.loads(out.read_text())["campaign"]["headlines"][0]["value"] == 10.0


def test_inf_and_nan_stay_right(tmp_path):
    """A NaN perplexity ratio (NaN token in the file) and infinite medians: Parquet keeps NaN and
    inf, the strict JSON writes "inf" and null, the report table prints "inf" and "-"."""
    c = SynthCampaign(campaign="prune", seeds=(0, 1, 2), fail_value=float("nan"),
                      median=lambda arm, level: float("inf") if level == 0.7 else 1.5)
    d = write_campaign_cell(tmp_path / "a", _cell(), c)
    assert "NaN" in (d / "campaign_results.json").read_text()
    out = tmp_path / "x" / "statistical_analysis.json"
    analyze([d], options=FAST, output=out)
    t = load_tables(out)
    nan_rows = t["campaign_trials"]["ppl_ratio"].isna().sum()
    assert nan_rows == sum(round(f * 3) for f in (0.2, 0.8, 1.0)) + sum(round(f * 3) for f in (0.0, 0.2, 0.8)) \
        + sum(round(f * 3) for f in (0.0, 0.0, 0.2))  # none, random_k, top_k: planted failures, each NaN
    s = t["campaign_summary"]
    assert math.isinf(s[(s["arm"] == "top_k") & (s["level"] == 0.7)]["median_ratio"].iloc[0])
    a = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"non-strict JSON token {c}"))
    top = next(r for r in a["campaign"]["summary"] if r["arm"] == "top_k" and r["level"] == 0.7)
    assert top["median_ratio"] == "inf"
    none = next(r for r in a["campaign"]["summary"] if r["arm"] == "none" and r["level"] == 0.7)
    assert none["median_ratio"] is None  # NaN (the planted failing value) is missing, never a number
    rows = {(r[4], r[5]): r for r in campaign_rows(a, "prune")}
    assert rows[("top_k", "0.7")][7] == "inf" and rows[("none", "0.7")][7] == "-"


def test_cells_of_every_campaign_share_the_tables(tmp_path):
    """bit_errors (float rates), quantize (integer bits, an integer group size) and prune in one
    analysis: one Parquet table each, levels as floats, group settings as text."""
    for camp in ("bit_errors", "quantize", "prune"):
        d = write_campaign_cell(tmp_path / camp, _cell(), SynthCampaign(campaign=camp))
        f = json.loads((d / "campaign_results.json").read_text())
        f["settings"]["quant_group"] = 128 if camp == "quantize" else "row"
        (d / "campaign_results.json").write_text(json.dumps(f))
    out = tmp_path / "x" / "statistical_analysis.json"
    analyze([tmp_path], options=FAST, output=out)
    s = load_tables(out)["campaign_summary"]
    assert s.groupby("campaign")["level"].apply(lambda x: sorted(set(x))).to_dict() == {
        "bit_errors": [1e-7, 1e-6, 1e-5, 1e-4], "prune": [0.3, 0.5, 0.7], "quantize": [3.0, 4.0, 8.0]}
    assert set(s["quant_group"]) == {"row", "128"}


def test_a_campaign_cell_without_phase1_results_is_read(tmp_path):
    d = write_campaign_cell(tmp_path / "a", _cell(), SynthCampaign())
    (d / "perturbation_results.json").unlink()
    a = analyze([d], options=FAST)
    assert a["cells"]["n_skipped"] == 0 and a["ratios"] == [] and len(a["campaign"]["summary"]) == 12


def test_campaign_settings_never_split_a_phase1_variant():
    s = _cell().settings
    with_campaign = {**s, "campaign": "quantize", "protect": ["none", "top_k"], "error_rate": [1e-6], "trials": 3,
                     "bits": "all", "quant_bits": [4], "quant_group": "128", "sparsity": [0.5], "prune_group": "row",
                     "fail_ratio": 3.0}
    assert _variant(with_campaign) == _variant(s)
    assert _variant({**s, "max_samples": 99}) != _variant(s)  # a measurement setting still does


# --------------------------------------------------------------------------- no campaign data

def test_no_campaign_data_changes_nothing(tmp_path):
    """Phase 1 folders only: the same tables, JSON sections, figures and report pages as before
    Phase 2 existed; and a cell's Phase 1 numbers are the same with a campaign file beside them."""
    write_cell(tmp_path / "p1" / "a", _cell())
    out = tmp_path / "x" / "statistical_analysis.json"
    a = analyze([tmp_path / "p1"], options=replace(FAST, figures=True), output=out)
    assert list(a["tables"]) == PHASE1_TABLES
    assert "campaign" not in a and "pairs" not in a
    assert a["figures"] == [f"figures/{n}.{e}" for n in list(FIGURES)[:6] for e in ("png", "pdf")]
    assert sorted(p.name for p in (out.parent / "figures").iterdir()) == sorted(Path(f).name for f in a["figures"])
    assert phase2_sections(a) == [] and campaign_figures_for(a) == [] and study_lines(a) == []
    write_report(a, tmp_path / "r.pdf", figures_dir=out.parent / "figures")
    assert _pdf_pages(tmp_path / "r.pdf") == len(SECTIONS)
    write_campaign_cell(tmp_path / "p2" / "a", _cell(), SynthCampaign())
    b = analyze([tmp_path / "p2"], options=FAST)
    drop = ("cells", "dir", "created_utc", "inputs", "options", "campaign", "tables", "figures")

    def phase1(x):
        return json.loads(json.dumps({k: v for k, v in x.items() if k not in drop}).replace(str(tmp_path), "T")
                          .replace("/p1/", "/").replace("/p2/", "/"))
    assert phase1(b) == phase1(a)


# --------------------------------------------------------------------------- headline in words

HEAD = {"cell": "c", "model_name": "Llama-3.1-8B", "metric": "magnitude", "mode": "per_layer", "k": 64,
        "n_protected": 64, "campaign": "bit_errors", "level_name": "error_rate", "fail_ratio": 2.0,
        "available": True, "why": None, "value": 8.1, "lo": 3.2, "hi": 20.0, "censored": False, "bound": None,
        "headline": {"target": 0.5}}


@pytest.mark.parametrize("change, want", [
    ({}, "protecting the top-K=64 magnitude weights (per_layer) of Llama-3.1-8B tolerates 8.1x [3.2, 20] the bit error "
         "rate of protecting 64 random weights at a 50% failure rate (fail: ratio > 2 or non-finite)"),
    ({"censored": True, "bound": ">=", "value": 100.0, "lo": math.nan, "hi": math.nan},
     "protecting the top-K=64 magnitude weights (per_layer) of Llama-3.1-8B tolerates at least 100x the bit error "
     "rate of protecting 64 random weights at a 50% failure rate (fail: ratio > 2 or non-finite)"),
    ({"available": False, "why": "fewer than 2 levels"},
     "protecting the top-K=64 magnitude weights (per_layer) of Llama-3.1-8B: no bit_errors headline (fewer than 2 "
     "levels)"),
    ({"level_name": "quant_bits", "campaign": "quantize", "value": 1.5, "lo": 0.5, "hi": 2.0,
      "headline": {"target": 0.25}},
     "protecting the top-K=64 magnitude weights (per_layer) of Llama-3.1-8B needs 1.5 [0.5, 2] fewer bits than "
     "protecting 64 random weights at a 25% failure rate (fail: ratio > 2 or non-finite)"),
    ({"level_name": "sparsity", "campaign": "prune", "value": 0.12, "lo": 0.05, "hi": math.inf, "fail_ratio": 1.5},
     "protecting the top-K=64 magnitude weights (per_layer) of Llama-3.1-8B tolerates 0.12 [0.05, inf] more sparsity "
     "than protecting 64 random weights at a 50% failure rate (fail: ratio > 1.5 or non-finite)"),
    ({"n_protected": 4032},  # per_layer: K in each of 63 tensors
     "protecting the top-K=64 magnitude weights (per_layer: 4032 weights) of Llama-3.1-8B tolerates 8.1x [3.2, 20] the "
     "bit error rate of protecting 4032 random weights at a 50% failure rate (fail: ratio > 2 or non-finite)"),
    ({"value": math.inf, "lo": 2.0, "hi": math.inf, "n_protected": None, "k": 8},
     "protecting the top-K=8 magnitude weights (per_layer) of Llama-3.1-8B tolerates inf x [2, inf] the bit error rate "
     "of protecting 8 random weights at a 50% failure rate (fail: ratio > 2 or non-finite)"),
])
def test_headline_sentence(change, want):
    assert headline_sentence({**HEAD, **change}) == want


def test_headline_numbers_read_what_campaign_stats_stores():
    """summarize()'s headline: a point with its interval; a censored one holds its bound in
    "bound" (">= 12.3") and "bound_value", its "value" None; one bounded neither way has neither."""
    assert headline_numbers({"available": True, "value": 8.0, "interval": [2.0, math.inf], "censored": False,
                             "bound": None, "bound_value": None}) == {
        "available": True, "why": None, "value": 8.0, "lo": 2.0, "hi": math.inf, "censored": False, "bound": None}
    h = headline_numbers({"available": True, "value": None, "interval": [1.5, math.inf], "censored": True,
                          "bound": ">= 12.3", "bound_value": 12.3})
    assert (h["value"], h["bound"], h["censored"]) == (12.3, ">=", True)
    h = headline_numbers({"available": True, "value": None, "interval": [-math.inf, math.inf], "censored": True,
                          "bound": None, "bound_value": None})
    assert math.isnan(h["value"]) and h["bound"] is None
    assert headline_sentence({**HEAD, **h}) == ("protecting the top-K=64 magnitude weights (per_layer) of Llama-3.1-8B: "
                                                "the bit_errors headline cannot be bounded (both tolerated levels lie "
                                                "beyond the same end of the tested range) (fail: ratio > 2 or "
                                                "non-finite)")
    h = headline_numbers({"available": False, "why": "0 error_rate level(s) with paired trials"})
    assert (h["available"], h["why"]) == (False, "0 error_rate level(s) with paired trials")
    assert headline_numbers(None)["why"] == "no headline in campaign_results.json"


def test_a_cell_summarized_by_campaign_stats(tmp_path):
    """The file as a real cell writes it (summarize()'s output merged in): the analysis tables
    and the headline in words carry summarize()'s numbers."""
    c = SynthCampaign(seeds=(0, 1), trials=5, summarized=True)
    d = write_campaign_cell(tmp_path / "a", _cell(), c)
    stored = json.loads((d / "campaign_results.json").read_text())
    again = summarize(stored["trials"], fail_ratio=2.0, level_name="error_rate", harsher=1,
                      arms=["none", "top_k", "random_k"])
    out = tmp_path / "x" / "statistical_analysis.json"
    a = analyze([d], options=FAST, output=out)
    t = load_tables(out)
    s = t["campaign_summary"].set_index(["arm", "level"])
    for r in again["summary"]:
        got = s.loc[(r["arm"], r["level"])]
        assert (got["n"], got["failures"], got["failure_lo"]) == (r["n"], r["failures"], pytest.approx(r["failure_lo"]))
    hl = again["headline"]
    # random_k crosses 50% halfway (in log10) between 1e-6 and 1e-5, top_k between 1e-5 and 1e-4: 10x
    assert hl["available"] and not hl["censored"] and hl["value"] == pytest.approx(10.0)
    row = t["campaign_headline"].iloc[0]
    assert row["value"] == pytest.approx(hl["value"]) and row["lo"] == pytest.approx(hl["interval"][0])
    assert "tolerates 10x [" in headline_sentence(a["campaign"]["headlines"][0])


def test_headline_sentence_from_the_strict_json(tmp_path):
    """Read back from statistical_analysis.json ("inf" strings, null for NaN) the words are the same."""
    h = {"available": True, "value": "inf", "interval": [2.0, None], "censored": False, "target": 0.5}
    write_campaign_cell(tmp_path / "a", _cell(), SynthCampaign(headline=h))
    out = tmp_path / "x" / "statistical_analysis.json"
    analyze([tmp_path / "a"], options=FAST, output=out)
    head = json.loads(out.read_text())["campaign"]["headlines"][0]
    assert "tolerates inf x the bit error rate of protecting 10 random weights" in headline_sentence(head)


# --------------------------------------------------------------------------- base vs instruct

@pytest.mark.parametrize("model, base", [
    ("meta-llama/Llama-3.1-8B-Instruct", "meta-llama/Llama-3.1-8B"),
    ("google/gemma-2-2b-it", "google/gemma-2-2b"),
    ("meta-llama/Llama-2-7b-chat-hf", "meta-llama/Llama-2-7b-hf"),
    ("mistralai/Mistral-7B-Instruct-v0.1", "mistralai/Mistral-7B-v0.1"),
    ("Qwen/Qwen2.5-7B-instruct", "Qwen/Qwen2.5-7B"),
    ("org/Model-Chat", "org/Model"),
    ("org/Chat-model-it", "org/Chat-model"),  # the last token is the one removed
    ("/models/x-Instruct", "/models/x"),
    ("org/Model-INSTRUCT", None),  # case-sensitive
    ("org/Model-items", None),  # "-it" inside a word
    ("org/Model-it2", None),
    ("org/ModelInstruct", None),  # no "-" before it
    ("-it", None),  # nothing left of it
    ("org/Model-7B", None),
])
def test_instruct_base(model, base):
    assert instruct_base(model) == base


def test_instruct_tokens_are_the_documented_list():
    assert INSTRUCT_TOKENS == ("-Instruct", "-instruct", "-it", "-chat", "-Chat")


def test_model_pairs():
    models = ["a/M", "a/M-Instruct", "a/M-chat", "a/N-it", "b/X-it", "b/X"]
    assert model_pairs(models) == [("a/M", "a/M-Instruct"), ("a/M", "a/M-chat"), ("b/X", "b/X-it")]
    assert model_pairs(["a/M", "a/N"]) == [] and model_pairs([]) == []


def _pairs_study(root: Path) -> dict:
    """A base and its instruct model, each with Phase 1 ratios, a super-weight study and a
    bit_errors campaign; the instruct headline censored; a third model unpaired."""
    sw = {"all": {"n": 1, "ratio_zeroed": 45.0, "ratio_random": 1.01}}
    for model, top, zeroed, head in (
            (BASE, 100.0, 45.0, {"available": True, "value": 8.0, "interval": [3.0, 20.0], "censored": False}),
            (INST, 40.0, 1.5, {"available": True, "value": None, "interval": [2.0, math.inf], "censored": True,
                               "bound": ">= 50", "bound_value": 50.0}),
            ("org/Other-1B", 7.0, 2.0, {"available": False, "why": "no random_k arm"})):
        ratios = {"top_k": [top, top], "random_k": [2.0, 2.0], "bottom_k": [1.0, 1.0]}
        d = write_campaign_cell(root / model.split("/")[1], _cell(model, ratios=ratios, super_weights=[]),
                                SynthCampaign(headline=head))
        (d / "super_weights.json").write_text(json.dumps({**json.loads((d / "super_weights.json").read_text()),
                                                          "all": {**sw["all"], "ratio_zeroed": zeroed}}))
    out = root.parent / "x" / "statistical_analysis.json"
    return analyze([root], options=FAST, output=out)


def test_pairs_table(tmp_path):
    a = _pairs_study(tmp_path / "runs")
    rows = {r["quantity"]: r for r in a["pairs"]}
    assert {(r["base"], r["instruct"]) for r in a["pairs"]} == {(BASE, INST)}
    top = rows["phase 1 top_k ratio"]
    # the geometric mean over two equal seeds: exact up to exp(log(x)) rounding
    assert (top["base_value"], top["instruct_value"], top["difference"]) == pytest.approx((100.0, 40.0, -60.0))
    assert top["setting"] == "grad_x_weight K=10 global sign_flip" and top["protocol"] == "P1"
    assert rows["phase 1 random_k ratio"]["difference"] == 0.0
    z = rows["super weights ratio_zeroed"]
    assert (z["base_value"], z["instruct_value"], z["difference"]) == (45.0, 1.5, -43.5)
    assert rows["super weights ratio_random"]["difference"] == 0.0
    h = rows["bit_errors headline (error_rate)"]
    assert (h["base_value"], h["instruct_value"], h["difference"]) == (8.0, None, None)  # strict JSON: NaN is null
    assert h["note"] == "instruct >= 50"
    t = load_tables(tmp_path / "x" / "statistical_analysis.json")["pairs"]
    assert len(t) == 5 and t["difference"].isna().sum() == 1
    assert [n for n, _ in phase2_sections(a)][-1] == "Base and instruct models"


def test_no_pair_no_table_no_page(tmp_path):
    write_campaign_cell(tmp_path / "a", _cell(BASE), SynthCampaign())
    write_campaign_cell(tmp_path / "b", _cell("org/Other-7B-it"), SynthCampaign())
    out = tmp_path / "x" / "statistical_analysis.json"
    a = analyze([tmp_path], options=FAST, output=out)
    assert "pairs" not in a and "pairs" not in a["tables"]
    assert "Base and instruct models" not in dict(phase2_sections(a))


# --------------------------------------------------------------------------- report and figures

def test_report_pages_present_only_with_data(tmp_path):
    """Two campaigns (bit_errors, quantize): a headline page, a table and a figures page each, in
    the campaigns' order; the figures of the campaigns present saved, none of prune."""
    write_campaign_cell(tmp_path / "runs" / "q", _cell(), SynthCampaign(campaign="quantize"))
    write_campaign_cell(tmp_path / "runs" / "b", _cell(), SynthCampaign(campaign="bit_errors"))
    out = tmp_path / "x" / "statistical_analysis.json"
    a = analyze([tmp_path / "runs"], options=replace(FAST, figures=True), output=out)
    names = [n for n, _ in phase2_sections(a)]
    assert names == ["Phase 2 headlines", "Phase 2: bit_errors", "Phase 2: bit_errors, figures", "Phase 2: quantize",
                     "Phase 2: quantize, figures"]
    assert campaign_figures_for(a) == ["bit_errors_failure_rate", "bit_errors_median_ratio", "quantize_failure_rate",
                                       "quantize_median_ratio"]
    assert figures_for(a) == list(FIGURES)[:6] + campaign_figures_for(a)
    assert not (out.parent / "figures" / "prune_failure_rate.png").exists()
    assert (out.parent / "figures" / "quantize_median_ratio.png").is_file()
    write_report(a, tmp_path / "r.pdf", figures_dir=out.parent / "figures")
    assert _pdf_pages(tmp_path / "r.pdf") == len(SECTIONS) + 5
    study = "\n".join(t.get_text() for t in study_page(clean(a)).findobj(lambda o: hasattr(o, "get_text")))
    assert "Phase 2 (protection campaigns): 2 campaign cell(s): bit_errors, quantize" in study
    page = dict(phase2_sections(a))["Phase 2 headlines"](clean(a))
    text = "\n".join(t.get_text() for t in page.findobj(lambda o: hasattr(o, "get_text")))
    assert "tolerates 10x [3, 30] the bit error rate" in text.replace("\n", " ").replace("  ", " ")


def test_headline_page_keeps_to_its_page(tmp_path, monkeypatch):
    """More headlines than the page holds: the first ones, then how many more and where."""
    import analysis.report_phase2 as phase2

    for name in ("a", "b", "c"):
        write_campaign_cell(tmp_path / name, _cell(f"org/{name}"), SynthCampaign())
    a = clean(analyze([tmp_path], options=FAST))
    monkeypatch.setattr(phase2, "HEADLINES", 2)
    page = phase2.headline_page(a)
    text = "\n".join(t.get_text() for t in page.findobj(lambda o: hasattr(o, "get_text")))
    assert text.count("[cell") == 2 and "... 1 more headlines in campaign_headline.parquet" in text


def test_campaign_table_rows(tmp_path):
    """model, metric, K, mode, arm, level, n, median ratio, failure rate [Wilson], McNemar p;
    random_k is the reference; levels ascending within a cell, arms in the stored order."""
    write_campaign_cell(tmp_path / "a", _cell(), SynthCampaign(p=0.0312))
    a = clean(analyze([tmp_path / "a"], options=FAST))
    rows = campaign_rows(a, "bit_errors")
    assert len(rows) == 12
    assert rows[0] == ["Model-7B", "grad_x_weight", 10, "global", "none", "1e-07", 5, "1.1", "0.2 [0.1, 0.3]", "0.031"]
    assert rows[2][4] == "random_k" and rows[2][-1] == "reference"
    assert [r[5] for r in rows[::3]] == ["1e-07", "1e-06", "1e-05", "0.0001"]
    assert rows[-1][7:9] == ["inf", "1 [0.9, 1]"]


def _plotted(fig: Figure) -> dict[str, list]:
    """label -> y values of the error-bar series a figure's first panel draws."""
    return {c.get_label(): list(c.lines[0].get_ydata()) for c in fig.axes[0].containers}


def test_failure_figure_draws_the_summary(tmp_path):
    write_campaign_cell(tmp_path / "a", _cell(), SynthCampaign())
    a = clean(analyze([tmp_path / "a"], options=FAST))
    fig, cap = CAMPAIGN_FIGURES["bit_errors_failure_rate"](a)
    want = {ARM_LABELS[arm]: [r["failure_rate"] for r in a["campaign"]["summary"] if r["arm"] == arm] for arm in
            ("none", "top_k", "random_k")}
    assert _plotted(fig) == want == {"no protection": [0.2, 0.8, 1.0, 1.0], "top-K": [0.0, 0.0, 0.2, 0.8],
                                     "random-K": [0.0, 0.2, 0.8, 1.0]}
    assert fig.axes[0].get_xscale() == "log" and "Wilson" in cap


@pytest.mark.parametrize("campaign, levels, median", [
    ("bit_errors", (1e-6,), lambda arm, level: 1.2),  # one level
    ("quantize", (4, 3), lambda arm, level: float("inf")),  # every median infinite
    ("prune", (0.5,), lambda arm, level: float("nan")),  # NaN medians
])
def test_campaign_figures_on_degenerate_data(tmp_path, campaign, levels, median):
    c = SynthCampaign(campaign=campaign, levels=levels, median=median, seeds=(0,), trials=1,
                      fail=lambda arm, level: 0.0, headline={"available": False, "why": "fewer than 2 levels"})
    write_campaign_cell(tmp_path / "a", _cell(), c)
    a = clean(analyze([tmp_path / "a"], options=FAST))
    for name in campaign_figures_for(a):
        fig, cap = CAMPAIGN_FIGURES[name](a)
        fig.savefig(tmp_path / f"{name}.png", dpi=40)  # drawing is where a bad value would raise
        assert cap.startswith(campaign)
    page = dict(phase2_sections(a))[f"Phase 2: {campaign}"](a)
    page.savefig(tmp_path / "page.png", dpi=30)
    assert "no " + campaign + " headline (fewer than 2 levels)" in headline_sentence(a["campaign"]["headlines"][0])


def test_synthetic_file_follows_the_contract():
    """The helper's file has the contract's top-level keys and row fields (guards the tests' input)."""
    f = campaign_results(SynthCampaign(), _cell())
    assert {"format", "campaign", "level_name", "harsher", "settings", "model", "baseline_ppl", "dtype", "n_weights",
            "arms", "trials", "summary", "paired", "headline"} <= set(f)
    assert set(f["trials"][0]) == {"arm", "level", "seed", "trial", "n_protected", "changed", "drawn", "protected_hits",
                                   "ppl", "nll", "status", "ppl_ratio", "seconds"}
    assert set(f["summary"][0]) == {"arm", "level", "n", "median_ratio", "q05", "q25", "q75", "q95", "failures",
                                    "failure_rate", "failure_lo", "failure_hi", "nonfinite"}
    assert pd.DataFrame(f["trials"]).groupby(["arm", "level"]).size().eq(5).all()  # one seed x 5 trials
