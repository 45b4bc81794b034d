"""analysis/ end to end: both commands on a synthetic sweep (2 models x 2 metrics x 3 K x 3
seeds), strict JSON, Parquet tables, figures, the PDF (one page per section), no torch import,
the MLflow source, flag errors, and figures on degenerate data."""
from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys

import matplotlib.image as mpimg
import pytest

from analysis.cross_model import AnalysisOptions, analyze, analyze_mlflow, load_tables, main
from analysis.compare import CompareOptions
from analysis.figures import FIGURES, figures_for
from analysis.report import SECTIONS
from conftest import ROOT
from synthetic_results import SynthCell, study, write_cell

KS = (10, 30, 100)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    return study(tmp_path_factory.mktemp("results") / "synthetic", ks=KS)


def _strict(path):
    return json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))


def _pdf_pages(pdf: bytes) -> int:
    return len(re.findall(rb"/Type\s*/Page[^s]", pdf))


def test_cross_model_command_end_to_end(sweep, tmp_path):
    out = tmp_path / "x" / "statistical_analysis.json"
    r = subprocess.run([sys.executable, "-m", "analysis.cross_model", "--result-dirs", str(sweep), "--output", str(out),
                        "--n-boot", "2000", "-q"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    a = _strict(out)
    assert a["cells"]["n_loaded"] == 2 * 2 * len(KS) and a["cells"]["n_skipped"] == 0
    assert len(a["ratios"]) == 2 * 2 * len(KS) * 3 and all(x["n_seeds"] == 3 for x in a["ratios"])
    assert len(a["dose_response"]) == 4 and all(d["ks"] == list(KS) for d in a["dose_response"])
    assert {h["id"]: h["verdict"] for h in a["hypotheses"]}.keys() == {f"H{i}" for i in range(1, 8)}
    tables = load_tables(out)
    assert set(tables) >= {"cells", "results", "ratios", "paired_tests", "dose_response", "stability", "metric_spearman",
                           "topk_overlap", "sensitivity_profile", "location", "location_tests", "top_weights_by_tensor",
                           "top_weights", "recurring_lines", "super_weights"}
    assert len(tables["results"]) == 2 * 2 * len(KS) * 3 * 3
    assert len(tables["top_weights"]) == 3 * 2 * 2 * sum(KS)  # every seed's K rows of every cell
    assert tables["ratios"]["mean"].dtype.kind == "f"
    assert figures_for(a) == list(FIGURES)[:6]  # no campaign data: the Phase 1 figures only
    for name in figures_for(a):
        png = out.parent / "figures" / f"{name}.png"
        assert mpimg.imread(png).shape[0] > 200, name
        assert (out.parent / "figures" / f"{name}.pdf").read_bytes().startswith(b"%PDF")
    assert sorted(a["figures"]) == sorted(f"figures/{n}.{e}" for n in figures_for(a) for e in ("png", "pdf"))


def test_report_command_end_to_end_without_torch(sweep, tmp_path):
    """``python -m analysis.report`` (its main, in a fresh interpreter) from the result folders:
    the analysis runs inside; torch is never imported on the way."""
    pdf = tmp_path / "research_summary.pdf"
    code = ("import sys; from analysis.report import main; rc = main(['--input-dirs', sys.argv[1], '--output', "
            "sys.argv[2], '-q']); print('TORCH' if 'torch' in sys.modules else 'NO_TORCH', rc)")
    r = subprocess.run([sys.executable, "-c", code, str(sweep), str(pdf)], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["NO_TORCH", "0"]
    data = pdf.read_bytes()
    assert data.startswith(b"%PDF") and _pdf_pages(data) == len(SECTIONS) == 8
    # every figure is embedded once (the location page holds two: parameter types, layer profile)
    assert len(re.findall(rb"/Subtype\s*/Image", data)) == len(figures_for({})) == 6
    if shutil.which("pdftoppm"):  # render a page when poppler is there (it is not on every machine)
        subprocess.run(["pdftoppm", "-f", "2", "-l", "2", "-r", "50", "-png", str(pdf), str(tmp_path / "p")], check=True)
        assert mpimg.imread(next(tmp_path.glob("p*.png"))).shape[0] > 300


def test_report_reuses_a_saved_analysis(sweep, tmp_path):
    from analysis.report import main as report_main

    out = tmp_path / "a.json"
    a = analyze([sweep], options=AnalysisOptions(compare=CompareOptions(n_boot=500), figures=False), output=out)
    (sw,) = a["super_weights"]["candidates"]  # in two cells' super_weights.json: listed once
    # global ranks 2, 3, 40 over seeds 0-2: inside the top 10 and 30 in two seeds, the top 100 in all three;
    # magnitude only bounds its rank from below (>= 500): never inside
    assert {(t["metric"], t["k"]): len(t["seeds_in_top_k"]) for t in sw["in_top_k"]} == {
        ("grad_x_weight", 10): 2, ("grad_x_weight", 30): 2, ("grad_x_weight", 100): 3,
        ("magnitude", 10): 0, ("magnitude", 30): 0, ("magnitude", 100): 0}
    a["super_weights"]["published"] = [{"model": "synth/llama-a", "hf_id": "x/y", "found": [{"layer": 1}], "missed": [],
                                        "new": []}]
    out.write_text(json.dumps(a))
    assert report_main(["--analysis", str(out), "--output", str(tmp_path / "r.pdf"), "-q"]) == 0
    assert _pdf_pages((tmp_path / "r.pdf").read_bytes()) == len(SECTIONS)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # sqlalchemy inside mlflow, not ours
def test_mlflow_source(tmp_path):
    """Cell runs logged as a sweep logs them (artifacts = the cell folder, tag cwa.kind = cell)
    are downloaded and analysed like folders; an unfinished run is skipped and counted."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("study", artifact_location=(tmp_path / "artifacts").as_uri())
    for cid, status in (("cell-a", "FINISHED"), ("cell-b", "FINISHED"), ("cell-c", "FAILED")):
        folder = write_cell(tmp_path / "src" / cid, SynthCell(metric="magnitude" if cid == "cell-b" else "grad_x_weight"))
        run = client.create_run(exp, tags={"cwa.kind": "cell", "cwa.cell_id": cid})
        client.log_artifacts(run.info.run_id, str(folder))
        client.set_terminated(run.info.run_id, status)
    other = client.create_run(exp, tags={"cwa.kind": "seed"})  # not a cell run: ignored
    client.set_terminated(other.info.run_id, "FINISHED")
    out = tmp_path / "out" / "statistical_analysis.json"
    a = analyze_mlflow("study", uri, options=AnalysisOptions(compare=CompareOptions(n_boot=500), figures=False),
                       output=out)
    assert a["cells"]["n_loaded"] == 2 and a["cells"]["n_skipped"] == 1
    assert a["cells"]["skipped"][0]["cell"] == "cell-c" and a["cells"]["skipped"][0]["status"] == "failed"
    assert {c["cell"]: c["dir"].startswith("mlflow:study/") for c in a["cells"]["table"]} == {"cell-a": True, "cell-b": True}
    assert len(a["metric_agreement"]["spearman"]) == 1
    assert _strict(out)["inputs"][0].startswith("mlflow experiment 'study'")
    with pytest.raises(ValueError, match="mlflow-experiment: no experiment 'nope'"):
        analyze_mlflow("nope", uri)


@pytest.mark.parametrize("argv, flag", [
    (["--result-dirs", "/no/such/dir", "--output", "x.json"], "result-dirs"),
    (["--result-dirs", ".", "--output", "x.json", "--threshold", "0.5"], "--threshold"),
    (["--result-dirs", ".", "--output", "x.json", "--tracking-uri", "sqlite:///x.db"], "--tracking-uri"),
    (["--output", "x.json"], "--result-dirs"),
])
def test_command_errors_are_one_line_naming_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert flag in err and err.startswith("python -m analysis.cross_model: error:")


def test_figures_on_degenerate_data(tmp_path):
    """One model, one seed, one K, infinite ratios, and no cells at all: every figure draws
    and its caption says what is missing."""
    write_cell(tmp_path / "c", SynthCell(seeds=(0,), jaccard=None, perturb="bit_flip", perturb_bit=14,
                                         ratios={"top_k": [None], "random_k": [2.0], "bottom_k": [1.0]}))
    (tmp_path / "empty").mkdir()
    opts = AnalysisOptions(compare=CompareOptions(n_boot=200), figures=False)
    one = analyze([tmp_path / "c"], options=opts)
    none = analyze([tmp_path / "empty"], options=opts)
    captions = {}
    for a, tag in ((one, "one"), (none, "none")):
        for name, fn in FIGURES.items():
            fig, cap = fn(a)
            fig.savefig(io.BytesIO(), format="png", dpi=40)  # drawing is where a bad value would raise
            captions[(tag, name)] = cap
    assert "infinite ratio" in captions[("one", "ratios_by_selection")]
    assert "one K" in captions[("one", "dose_response")]
    assert captions[("one", "stability_vs_k")].startswith("No cell has two or more seeds")
    assert all(c.startswith("No ") for (tag, _), c in captions.items() if tag == "none")
