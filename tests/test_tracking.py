"""MLflow logging of a cell from its folder: every perplexity ratio also as its log10 (the UI's
charts are linear), read back from the store; non-finite ratios logged as neither."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from cwa_core.sweep.tracking import Tracker, log10_ratio
from synthetic_results import SynthCell, write_cell


def test_log10_ratio_degenerate_values():
    assert log10_ratio(1000.0) == pytest.approx(3.0, abs=1e-15) and log10_ratio(1.0) == 0.0
    assert log10_ratio(0.5) == pytest.approx(math.log10(0.5))
    assert log10_ratio(math.inf) == math.inf  # dropped by the logger, like the infinite ratio itself
    for v in (None, math.nan, 0.0, -2.0):
        assert log10_ratio(v) is None


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # sqlalchemy inside mlflow, not ours
def test_cell_and_seed_runs_carry_log10_ratios(tmp_path):
    """Ratios over eight orders of magnitude and one overflow (+inf): each seed run holds
    log10_ppl_ratio = log10(ppl_ratio); the cell run log10_<selection>_ppl_ratio_mean = log10 of
    the mean beside it; the infinite seed and the infinite top-K mean log neither number."""
    c = SynthCell(ratios={"top_k": [3e7, 2e8, None], "random_k": [3.0, 30.0, 300.0], "bottom_k": [1.01, 1.02, 1.0]},
                  statuses={"top_k": ["finite", "finite", "inf"]})
    folder = write_cell(tmp_path / "cell", c)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "study")
    config = SimpleNamespace(metric=c.metric, mode=c.mode, topk=c.topk, perturb=c.perturb, protocol="heldout",
                             seeds=c.seeds, campaign="none")
    cell = SimpleNamespace(id="cell-1", settings=c.settings, config=config)
    run_id = tracker.log_cell(cell, folder)

    client = tracker.client
    cell_metrics = client.get_run(run_id).data.metrics
    assert cell_metrics["random_k_ppl_ratio_mean"] == pytest.approx(111.0)
    for sel in ("random_k", "bottom_k"):
        assert cell_metrics[f"log10_{sel}_ppl_ratio_mean"] == pytest.approx(
            math.log10(cell_metrics[f"{sel}_ppl_ratio_mean"]), rel=1e-12)
    assert "top_k_ppl_ratio_mean" not in cell_metrics and "log10_top_k_ppl_ratio_mean" not in cell_metrics
    seeds = client.search_runs([tracker.experiment_id], filter_string="tags.`cwa.kind` = 'seed'")
    assert len(seeds) == 9
    logged = 0
    for r in seeds:
        m, p = r.data.metrics, r.data.params
        if p["ppl_status"] != "finite":
            assert "ppl_ratio" not in m and "log10_ppl_ratio" not in m
            continue
        assert m["log10_ppl_ratio"] == pytest.approx(math.log10(m["ppl_ratio"]), rel=1e-12)
        logged += 1
    assert logged == 8
    top = sorted(r.data.metrics["log10_ppl_ratio"] for r in seeds if r.data.params["selection"] == "top_k"
                 and "log10_ppl_ratio" in r.data.metrics)
    assert top == pytest.approx([math.log10(3e7), math.log10(2e8)])


def test_campaign_aggregates_are_named_per_arm_and_level_and_the_headline_only_with_a_value():
    from cwa_core.sweep.tracking import campaign_metrics

    camp = {"summary": [{"arm": "top_k", "level": 1e-06, "failure_rate": 0.25, "median_ratio": 100.0},
                        {"arm": "none", "level": 4, "failure_rate": 1.0, "median_ratio": math.inf}],
            "headline": {"available": True, "value": None, "censored": True}}
    m = campaign_metrics(camp)
    assert m == {"campaign/top_k/failure_rate/1e-06": 0.25, "campaign/top_k/median_ratio/1e-06": 100.0,
                 "campaign/top_k/log10_median_ratio/1e-06": pytest.approx(2.0, abs=1e-15),
                 "campaign/none/failure_rate/4": 1.0, "campaign/none/median_ratio/4": math.inf,
                 "campaign/none/log10_median_ratio/4": math.inf}  # inf is dropped when logged, as every ratio
    assert campaign_metrics({**camp, "headline": {"available": True, "value": 8.5}})["campaign/headline"] == 8.5
    assert campaign_metrics({"summary": [], "headline": {"available": False, "why": "one level"}}) == {}
