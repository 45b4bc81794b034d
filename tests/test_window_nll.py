"""Per evaluation window NLL sums: recorded beside every perplexity (the analysis bootstraps
windows for the spread of a data-independent metric), while the perplexity itself stays the
per-batch float32 sums added in float64, bit for bit."""
from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

import orchestrator
from cwa_core.evaluate import perplexity
from conftest import STORIES, TINYSTORIES


@pytest.fixture(scope="module")
def model():
    return AutoModelForCausalLM.from_pretrained(STORIES).eval()


def _old_perplexity_nll(model, windows: torch.Tensor, batch_size: int) -> float:
    """cwa_core.evaluate.perplexity's total as it was before per-window sums were added."""
    total = torch.zeros((), dtype=torch.float64)
    with torch.no_grad():
        for s in range(0, windows.shape[0], batch_size):
            ids = windows[s : s + batch_size]
            logits = model(input_ids=ids, use_cache=False).logits
            v = logits.shape[-1]
            total += F.cross_entropy(logits[:, :-1].reshape(-1, v).float(), ids[:, 1:].reshape(-1),
                                     reduction="sum").double()
    return total.item() / (windows.shape[0] * (windows.shape[1] - 1))


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_perplexity_is_bit_for_bit_the_old_total_and_windows_add_up(model, batch_size):
    g = torch.Generator().manual_seed(batch_size)
    windows = torch.randint(3, 512, (7, 48), generator=g)  # (N, L); 7 windows: a ragged last batch
    r = perplexity(model, windows, batch_size=batch_size)
    assert r.nll == _old_perplexity_nll(model, windows, batch_size)  # exact, not approx
    assert r.ppl == math.exp(r.nll)
    assert len(r.window_nll) == 7
    with torch.no_grad():  # each window on its own, the textbook way
        one = [F.cross_entropy(model(w[None]).logits[0, :-1], w[1:], reduction="sum").item() for w in windows]
    assert list(r.window_nll) == pytest.approx(one, rel=1e-5)
    assert sum(r.window_nll) / r.n_tokens == pytest.approx(r.nll, rel=1e-6)


@pytest.mark.slow
def test_the_command_writes_window_nll_and_the_metric_flag(tmp_path):
    out = tmp_path / "mag"
    argv = ["--model", str(STORIES), "--data-file", str(TINYSTORIES), "--metric", "magnitude", "--topk", "30",
            "--mode", "global", "--perturb", "sign_flip", "--controls", "random_k,bottom_k", "--seeds", "0,1",
            "--max-samples", "4", "--max-length", "48", "--eval-samples", "6", "--out-dir", str(out), "--no-progress"]
    assert orchestrator.main(argv) == 0
    pert = json.loads((out / "perturbation_results.json").read_text())
    assert pert["data_independent"] is True and pert["window_nll"] == "window_nll.parquet"
    assert all("window_nll" not in r for r in pert["results"])  # the JSON stays readable
    assert "window_nll.parquet" in json.loads((out / "manifest.json").read_text())["files"]
    w = pd.read_parquet(out / "window_nll.parquet")
    assert len(w) == 6 * (1 + 2 * 3) and set(w["tokens"]) == {47}
    base = w[w["selection"] == "baseline"]
    assert list(base["seed"]) == [-1] * 6 and list(base["window"]) == list(range(6))
    assert base["nll"].sum() / base["tokens"].sum() == pytest.approx(pert["baseline"]["nll"], rel=1e-6)
    for r in pert["results"]:  # each row's ratio from its windows: exp((sum pert - sum base) / tokens)
        rows = w[(w["selection"] == r["selection"]) & (w["seed"] == r["seed"])]
        got = math.exp((rows["nll"].sum() - base["nll"].sum()) / base["tokens"].sum())
        assert got == pytest.approx(r["ppl_ratio"], rel=1e-5), r
    # magnitude's top-K does not depend on the seed: its interval comes from the windows
    from analysis.compare import CompareOptions
    from analysis.cross_model import AnalysisOptions, analyze

    a = analyze([str(out)], options=AnalysisOptions(compare=CompareOptions(n_boot=1000), figures=False))
    top = next(r for r in a["ratios"] if r["selection"] == "top_k")
    assert top["data_independent"] and top["interval_code"] == "windows"
    lo, hi = top["ci"]
    assert lo < top["geomean"] < hi


@pytest.mark.parametrize("b,length,v", [(8, 64, 512), (3, 100, 1024), (4, 33, 32000)])
def test_one_log_softmax_gives_nll_sum_bit_for_bit(b, length, v):
    """nll_sums shares one log-softmax between the total and the per-window sums: the total must be
    nll_sum's (cross_entropy's) to the last bit, the windows the per-token losses summed."""
    from cwa_core.evaluate import nll_sum, nll_sums

    g = torch.Generator().manual_seed(v)
    logits = torch.randn(b, length, v, generator=g) * 3
    ids = torch.randint(0, v, (b, length), generator=g)
    total, windows = nll_sums(logits, ids)
    assert total.item() == nll_sum(logits, ids).item()
    per_token = F.cross_entropy(logits[:, :-1].reshape(-1, v), ids[:, 1:].reshape(-1), reduction="none")
    assert torch.equal(windows, per_token.view(b, -1).double().sum(dim=1))
