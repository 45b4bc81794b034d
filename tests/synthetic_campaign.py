"""Synthetic Phase 2 campaign cells (issue 17): a Phase 1 folder of :mod:`synthetic_results` plus
a ``campaign_results.json`` in the contract's format, with planted numbers (failure-rate and
median-ratio curves per arm, paired p-values, a headline), for the analysis tests and the report.

The stored "summary", "paired" and "headline" are planted, not computed: the analysis reads them
as they are, so the tests know every number it must show (``summarized=True`` computes them with
:func:`cwa_core.campaign_stats.summarize` instead, as a real campaign cell stores them). The trials agree with the summary's
counts: at each level the first ``failures`` trials of an arm fail (ratio ``fail_value``), the
rest sit at the planted median.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from synthetic_results import SynthCell, write_cell

LEVEL_NAMES = {"bit_errors": "error_rate", "quantize": "quant_bits", "prune": "sparsity"}
HARSHER = {"bit_errors": +1, "quantize": -1, "prune": +1}
LEVELS = {"bit_errors": (1e-7, 1e-6, 1e-5, 1e-4), "quantize": (8, 4, 3), "prune": (0.3, 0.5, 0.7)}


def _default_fail(levels, harsher: int) -> Callable[[str, float], float]:
    """Failure rate per arm and level (0, 0.2, 0.8, 1 from the mildest level on): none one level
    earlier, top_k and super_weights one level later than random_k and bottom_k."""
    order = sorted(levels, reverse=harsher < 0)
    shift = {"none": -1, "random_k": 0, "bottom_k": 0, "top_k": 1, "super_weights": 1}

    def fail(arm: str, level: float) -> float:
        i = order.index(level) - shift.get(arm, 0)
        return [0.0, 0.2, 0.8, 1.0][max(0, min(i, 3))]
    return fail


@dataclass
class SynthCampaign:
    """One campaign cell's planted content. ``fail(arm, level)``: failure rate (a multiple of
    1 / n); ``median(arm, level)``: median ratio of the non-failing trials; ``headline``: the
    stored headline dict (None: written without one); ``p``: McNemar p of every paired row."""

    campaign: str = "bit_errors"
    arms: tuple[str, ...] = ("none", "top_k", "random_k")
    levels: tuple[float, ...] | None = None  # None: LEVELS[campaign]
    seeds: tuple[int, ...] = (0,)
    trials: int = 5
    fail_ratio: float = 2.0
    fail_value: float = float("inf")  # the ratio of a failing trial
    n_protected: int = 10
    fail: Callable[[str, float], float] | None = None
    median: Callable[[str, float], float] = lambda arm, level: 1.1
    p: float = 0.25
    summarized: bool = False  # True: "summary", "paired", "headline" from cwa_core.campaign_stats.summarize
    headline: dict | None = field(default_factory=lambda: {
        "available": True, "value": 10.0, "interval": [3.0, 30.0], "censored": False, "bound": None,
        "bound_value": None, "target": 0.5, "arm": "top_k", "reference": "random_k"})

    def level_list(self) -> tuple:
        return self.levels if self.levels is not None else LEVELS[self.campaign]


def _rows(c: SynthCampaign) -> tuple[list[dict], list[dict], list[dict]]:
    fail = c.fail or _default_fail(c.level_list(), HARSHER[c.campaign])
    n = len(c.seeds) * (c.trials if c.campaign == "bit_errors" else 1)
    trials, summary, paired = [], [], []
    for level in sorted(c.level_list()):
        for arm in c.arms:
            k = round(fail(arm, level) * n)
            med = c.median(arm, level)
            for u in range(n):
                seed, trial = c.seeds[u // (n // len(c.seeds))], u % (n // len(c.seeds))
                ratio = c.fail_value if u < k else med
                trials.append({"arm": arm, "level": level, "seed": seed, "trial": trial,
                               "n_protected": 0 if arm == "none" else c.n_protected, "changed": 3, "drawn": 3,
                               "protected_hits": 0, "ppl": 20.0 * ratio, "nll": 3.0,
                               "status": "nan" if ratio != ratio else "inf" if ratio == float("inf") else "finite",
                               "ppl_ratio": ratio,
                               "seconds": 0.01})
            summary.append({"arm": arm, "level": level, "n": n, "median_ratio": med if k < n / 2 else c.fail_value,
                            "q05": med, "q25": med, "q75": med if k < n / 4 else c.fail_value, "q95": c.fail_value,
                            "failures": k, "failure_rate": k / n, "failure_lo": max(0.0, k / n - 0.1),
                            "failure_hi": min(1.0, k / n + 0.1), "nonfinite": k if not c.fail_value < float("inf") else 0})
            if arm != "random_k" and "random_k" in c.arms:
                paired.append({"level": level, "arm": arm, "reference": "random_k", "n_pairs": n,
                               "arm_only_fail": 0, "reference_only_fail": 2, "p_value": c.p,
                               "median_log_ratio_diff": -0.1})
    return trials, summary, paired


def campaign_results(c: SynthCampaign, cell: SynthCell) -> dict:
    """The ``campaign_results.json`` content of ``c`` on ``cell``'s model and settings."""
    trials, summary, paired = _rows(c)
    level_name = LEVEL_NAMES[c.campaign]
    settings = {"protect": list(c.arms), "error_rate": [1e-6], "trials": c.trials, "bits": "all",
                "quant_bits": [8, 4, 3], "quant_group": "row", "sparsity": [0.5], "prune_group": "row",
                "fail_ratio": c.fail_ratio, "metric": cell.metric, "mode": cell.mode, "topk": cell.topk,
                "seeds": list(c.seeds), level_name: sorted(c.level_list())}
    out = {"format": "cwa.campaign/1", "campaign": c.campaign, "level_name": level_name, "harsher": HARSHER[c.campaign],
           "settings": settings, "model": cell.model.name, "baseline_ppl": cell.baseline_ppl, "dtype": cell.dtype,
           "n_weights": 262144, "arms": {a: {"n_protected": 0 if a == "none" else c.n_protected} for a in c.arms},
           "trials": trials, "summary": summary, "paired": paired}
    if c.summarized:
        from cwa_core.campaign_stats import summarize

        out.update(summarize(trials, fail_ratio=c.fail_ratio, level_name=level_name, harsher=HARSHER[c.campaign],
                             arms=list(c.arms)))
    elif c.headline is not None:
        out["headline"] = c.headline
    return out


def write_campaign_cell(folder: str | Path, cell: SynthCell, campaign: SynthCampaign) -> Path:
    """A Phase 1 folder (:func:`synthetic_results.write_cell`) with ``campaign_results.json``
    beside it (Infinity/NaN tokens, as Python's json writes them)."""
    d = write_cell(folder, cell)
    (d / "campaign_results.json").write_text(json.dumps(campaign_results(campaign, cell), indent=1))
    return d
