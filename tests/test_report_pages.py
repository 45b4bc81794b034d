"""The report's hypotheses page: a table naming each model by its display name (a local
folder's name, a Hub id as it is), never by the path it was loaded from."""
from __future__ import annotations

import json

import pytest
from matplotlib.table import Table
from matplotlib.text import Text

from analysis.common import display_name
from analysis.compare import CompareOptions
from analysis.cross_model import AnalysisOptions, analyze
from analysis.report import hypotheses_page
from synthetic_results import SynthCell, SynthModel, write_cell

FAST = AnalysisOptions(compare=CompareOptions(n_boot=200), figures=False)
CACHE = "/home/someone/.cache/cwa/demo-1a2b3c/cwa-demo"
HUB = "meta-llama/Llama-2-7b-hf"


@pytest.mark.parametrize("model, source, want", [
    (CACHE, "local", "cwa-demo"), (CACHE, None, "cwa-demo"), ("./stories260k/", None, "stories260k"),
    (HUB, "hub", HUB), (HUB, None, HUB), ("models/llama", "local", "llama"), ("builtin:demo", None, "builtin:demo"),
])
def test_display_name(model, source, want):
    assert display_name(model, source) == want


def _page_texts(fig) -> list[str]:
    texts = [t.get_text() for t in fig.findobj(Text)]
    for table in fig.findobj(Table):
        texts += [c.get_text().get_text() for c in table.get_celld().values()]
    return texts


def test_hypotheses_page_is_a_table_naming_models_by_display_name(tmp_path):
    """A local model loaded from a cache path and a Hub model, both failing H1 (top-K ratios
    3-5x): the page's tables name them "cwa-demo" and "meta-llama/Llama-2-7b-hf"; no text on
    the page holds the cache path."""
    bad = {"top_k": [3.0, 4.0, 5.0], "random_k": [1.5, 1.6, 1.7], "bottom_k": [1.0, 1.0, 1.0]}
    write_cell(tmp_path / "local", SynthCell(model=SynthModel(CACHE), ratios=bad))
    write_cell(tmp_path / "hub", SynthCell(model=SynthModel(HUB), ratios=bad))
    m = json.loads((tmp_path / "hub" / "manifest.json").read_text())
    m["provenance"]["model"]["source"] = "hub"
    (tmp_path / "hub" / "manifest.json").write_text(json.dumps(m))
    a = analyze([str(tmp_path)], options=FAST)
    fig = hypotheses_page(a)
    tables = fig.findobj(Table)
    assert len(tables) == 2  # the hypotheses, and the cases that do not hold
    head = [tables[0].get_celld()[(0, j)].get_text().get_text() for j in range(4)]
    assert head == ["hypothesis", "rule", "verdict", "cases holding / measured"]
    cells = {k: c.get_text().get_text() for k, c in tables[0].get_celld().items()}
    h1 = next(i for i in range(1, 8) if cells[(i, 0)].startswith("H1"))
    assert cells[(h1, 2)].replace("\n", " ") == "not supported" and cells[(h1, 3)] == "0 / 2"
    failing = tables[1].get_celld()
    models = {failing[(i, 1)].get_text().get_text() for i in range(1, 3)}
    assert models == {"cwa-demo", HUB}
    assert not [t for t in _page_texts(fig) if "/home" in t or ".cache" in t]
    # the JSON keeps the full id beside the display name
    h1_cases = next(h for h in a["hypotheses"] if h["id"] == "H1")["cases"]
    assert {(c["model"], c["model_name"]) for c in h1_cases} == {(CACHE, "cwa-demo"), (HUB, HUB)}


def test_parameter_type_map_draws_each_variant_on_its_own_row(tmp_path):
    """Two variants of one model and metric (another calibration size) have different enrichment:
    two rows of the heat map, not one overwritten by the other."""
    from analysis.figures import FIGURES

    flat, planted = {"attention": 1.0, "mlp": 1.0, "norm": 1.0}, {"attention": 3.0, "mlp": 1.0, "norm": 1.0}
    for name, means in (("a", flat), ("a-big", planted)):
        write_cell(tmp_path / name, SynthCell(topk=2569, seeds=(0,), jaccard=None, exact_placement=True,
                                              type_means=means))
    m = json.loads((tmp_path / "a-big" / "manifest.json").read_text())
    m["settings"]["max_samples"] = 64
    (tmp_path / "a-big" / "manifest.json").write_text(json.dumps(m))
    a = analyze([str(tmp_path)], options=FAST)
    fig, _ = FIGURES["param_type_by_model"](a)
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    variants = sorted({c["variant"] for c in a["cells"]["table"]})
    assert labels == [f"llama-a / grad_x_weight ({v})" for v in variants]
    shown = sorted(float(t.get_text()) for t in ax.texts if t.get_text() != "n/a")
    # attention, mlp, norm: 1, 1, 1 (proportional) and 3 N / N_weighted = 1.669, 0.556, 0.556 (attention 3x), up to
    # the whole-weight placement of K = 2569 and 2-digit printing
    assert shown == pytest.approx(sorted([1.0, 1.0, 1.0, 3 * 164416 / 295488, 164416 / 295488, 164416 / 295488]),
                                  abs=0.015)


def test_the_report_embeds_the_saved_figures_without_drawing_them_again(tmp_path, monkeypatch):
    """The analysis saves each figure once, its caption in the PNG; the report embeds the PNG
    with that caption (the caption the figure gives from the report's own dict) and draws
    nothing again. A PNG without a caption (saved before) is drawn again for its caption."""
    from PIL import Image

    from analysis import figures as figures_mod
    from analysis import report as report_mod
    from analysis import report_layout
    from analysis.common import clean

    for name in ("a", "b"):
        write_cell(tmp_path / "runs" / name, SynthCell(model=SynthModel(f"m/{name}"), seeds=(0, 1)))
    out = tmp_path / "x" / "statistical_analysis.json"
    a = analyze([str(tmp_path / "runs")], options=AnalysisOptions(compare=CompareOptions(n_boot=200)), output=out)
    folder = out.parent / "figures"
    want = {name: figures_mod.FIGURES[name](clean(a))[1] for name in figures_mod.figures_for(a)}
    assert {name: figures_mod.saved_caption(folder / f"{name}.png") for name in want} == want
    assert all(want.values())

    drawn = []
    monkeypatch.setattr(report_layout, "FIGURES", {n: (lambda a, n=n: drawn.append(n) or figures_mod.FIGURES[n](a))
                                                   for n in figures_mod.FIGURES})
    captions = {}
    real_into = report_mod.figure_into
    monkeypatch.setattr(report_mod, "figure_into",
                        lambda ax, name, a: captions.setdefault(name, real_into(ax, name, a)))
    report_mod.write_report(a, tmp_path / "r.pdf", figures_dir=folder)
    assert drawn == [] and captions == want

    png = folder / "dose_response.png"
    with Image.open(png) as im:
        im.save(png)  # pixels kept, text chunks dropped: a PNG of an older analysis
    assert figures_mod.saved_caption(png) is None
    captions.clear()
    report_mod.write_report(a, tmp_path / "r2.pdf", figures_dir=folder)
    assert drawn == ["dose_response"] and captions == want
