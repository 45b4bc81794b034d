"""cwa_core.schema: the vocabulary of results, the JSON encoding of non-finite numbers, and the one
reader of perplexity ratios (new files and old ones, whose non-finite numbers are null)."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT
from cwa_core import schema

NAN, INF = math.nan, math.inf


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


def test_importing_schema_and_numerics_pulls_in_no_torch():
    code = ("import sys; import cwa_core.schema, cwa_core.numerics; "
            "print('TORCH' if 'torch' in sys.modules else 'NO_TORCH', 'scipy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}).stdout.split()
    assert out == ["NO_TORCH", "False"]


def test_the_analysis_loads_without_torch():
    code = ("import sys; import analysis.load, analysis.compare, analysis.weights, analysis.common; "
            "print('TORCH' if 'torch' in sys.modules else 'NO_TORCH')")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}).stdout.split()
    assert out == ["NO_TORCH"]


def test_selections_have_one_order_and_every_attribute():
    assert schema.SELECTION_KINDS == ("top_k", "random_k", "bottom_k")
    assert schema.CONTROL_KINDS == ("random_k", "bottom_k")
    for table in (schema.SELECTION_LABELS, schema.SELECTION_COLORS, schema.SELECTION_MARKERS):
        assert tuple(table) == schema.SELECTION_KINDS
    assert len(set(schema.SELECTION_COLORS.values())) == 3 and len(set(schema.SELECTION_MARKERS.values())) == 3
    assert schema.selection_kind("random_k").label == "random-K"
    with pytest.raises(KeyError, match="known: top_k, random_k, bottom_k"):
        schema.selection_kind("middle_k")
    assert schema.ordered_selections(["bottom_k", "zzz", "top_k", "aaa", "top_k"]) == ["top_k", "bottom_k", "aaa", "zzz"]


def test_the_modules_use_the_declared_vocabulary():
    from analysis import figures
    from cwa_core import architectures, config, experiment, selection
    from cwa_core.plots import perturbation, style
    from cwa_core.sweep import tracking

    assert selection.KINDS == schema.SELECTION_KINDS
    assert config.CONTROLS == schema.CONTROL_KINDS == ("random_k", "bottom_k")  # the setting's default, in order
    assert perturbation._SELECTION_COLORS == figures.SELECTION_COLORS == schema.SELECTION_COLORS
    assert architectures.PARAM_TYPES == style._TYPE_ORDER == schema.PARAM_TYPES
    assert not hasattr(experiment, "WINDOW_NLL_FILE")  # declared once: schema.WINDOW_NLL
    assert tracking.TAG_KIND == schema.TAG_KIND == "cwa.kind" and tracking.TAG_CELL == "cwa.cell_id"


def test_dumps_writes_non_finite_numbers_explicitly_and_reads_them_back():
    obj = {"inf": INF, "ninf": -INF, "nan": NAN, "x": 1.5, "none": None, 3: (np.float32(2.5), np.int64(7)),
           "f64": np.float64(INF), "bool": np.bool_(True)}
    text = schema.dumps(obj)
    assert '"inf": Infinity' in text and '"ninf": -Infinity' in text and '"nan": NaN' in text
    assert '"none": null' in text and text.endswith("\n")
    back = json.loads(text)
    assert back["inf"] == INF and back["ninf"] == -INF and math.isnan(back["nan"]) and back["none"] is None
    assert back["3"] == [2.5, 7] and back["f64"] == INF and back["bool"] is True
    assert repr(back["x"]) == "1.5"


def test_dumps_keeps_finite_floats_exact():
    vals = [0.1 + 0.2, 1e-300, -0.0, 1.9127555772777218, float(np.float32(1 / 3))]
    back = json.loads(schema.dumps(vals))
    assert [v.hex() for v in back] == [v.hex() for v in vals]


@pytest.mark.parametrize("raw,want", [(None, NAN), (2, 2.0), (2.5, 2.5), ("inf", INF), ("-inf", -INF), ("nan", NAN),
                                      (INF, INF), (NAN, NAN)])
def test_number_reads_every_form(raw, want):
    assert _same(schema.number(raw), want)


@pytest.mark.parametrize("raw,want", [(None, None), (NAN, None), (INF, "inf"), (-INF, "-inf"), (np.float32(1.5), 1.5),
                                      (3, 3.0)])
def test_strict_number(raw, want):
    assert schema.strict_number(raw) == want


def test_finite_status():
    assert [schema.finite_status(v) for v in (1.0, INF, -INF, NAN, None)] == ["finite", "inf", "inf", "nan", "nan"]


# the three generations of a result row: in memory / new files (floats), old files (null + status),
# older files (null, no status), and a sweep driver's row that left the division
ROWS = [
    ({"ppl_ratio": 3.0, "ppl": 15.0, "ppl_status": "finite"}, 3.0, 15.0, "finite"),
    ({"ppl_ratio": INF, "ppl": INF, "ppl_status": "inf"}, INF, INF, "inf"),
    ({"ppl_ratio": NAN, "ppl": NAN, "ppl_status": "nan"}, NAN, NAN, "nan"),
    ({"ppl_ratio": None, "ppl": None, "ppl_status": "inf"}, INF, INF, "inf"),  # old file: null + status
    ({"ppl_ratio": None, "ppl": None, "ppl_status": "nan"}, NAN, NAN, "nan"),
    ({"ppl_ratio": None, "ppl": None}, NAN, NAN, "unknown"),  # older: nothing tells inf from nan
    ({"ppl_ratio": 2.0, "ppl": 10.0}, 2.0, 10.0, "finite"),  # older, finite
    ({"ppl_ratio": None, "ppl": 20.0}, 4.0, 20.0, "finite"),  # the division left to the reader (base 5)
    ({"ppl_ratio": None, "ppl": 20.0, "ppl_status": "finite"}, 4.0, 20.0, "finite"),
    ({"ppl_ratio": "inf", "ppl": "inf", "ppl_status": "inf"}, INF, INF, "inf"),  # strict strings
]


@pytest.mark.parametrize("row,ratio,ppl,status", ROWS)
def test_the_one_ratio_reader(row, ratio, ppl, status):
    got = schema.read_ratio(row, 5.0)
    assert _same(got, ratio)
    assert _same(schema.read_ppl(row), ppl)
    assert schema.read_status(row, got) == status


def test_ratio_reader_without_a_baseline_or_with_a_bad_one():
    row = {"ppl_ratio": None, "ppl": 20.0}
    assert math.isnan(schema.read_ratio(row)) and math.isnan(schema.read_ratio(row, 0.0))
    assert math.isnan(schema.read_ratio(row, INF)) and math.isnan(schema.read_ratio(row, NAN))
    assert schema.read_ratio({"ppl_ratio": None, "ppl": INF}, 5.0) == INF


def test_ratios_by_selection_reads_memory_new_and_old_files_alike(tmp_path):
    rows = [{"selection": "top_k", "seed": 0, "ppl": INF, "ppl_ratio": INF, "ppl_status": "inf"},
            {"selection": "random_k", "seed": 0, "ppl": NAN, "ppl_ratio": NAN, "ppl_status": "nan"},
            {"selection": "top_k", "seed": 1, "ppl": 30.0, "ppl_ratio": 6.0, "ppl_status": "finite"}]
    new = json.loads(schema.dumps(rows))
    old = json.loads(json.dumps([{k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                                  for k, v in r.items()} for r in rows]))
    assert old[0]["ppl_ratio"] is None  # what the writer did before
    for form in (rows, new, old):
        got = schema.ratios_by_selection(form)
        assert list(got) == ["top_k", "random_k"] and got["top_k"] == [INF, 6.0] and math.isnan(got["random_k"][0])


def test_experiment_json_round_trip_through_the_writer(tmp_path):
    from cwa_core.outputs import write_json

    rows = [{"selection": "top_k", "seed": 0, "ppl": INF, "ppl_ratio": INF, "nll": INF, "ppl_status": "inf"}]
    write_json(tmp_path / schema.PERTURBATION_RESULTS, {"baseline": {"ppl": 5.0}, "results": rows})
    back = json.loads((tmp_path / schema.PERTURBATION_RESULTS).read_text())
    assert back["results"] == rows
