"""The sweep manifest as a class: the same JSON file as the dict it replaces, changed through
named methods."""
from __future__ import annotations

import json

from cwa_core.sweep import spec as sweep_spec
from cwa_core.sweep.ledger import MANIFEST, SweepManifest
from conftest import TINYSTORIES

RAW = {"name": "ledger", "model": "/m/a", "metric": "magnitude", "data_file": str(TINYSTORIES), "topk": 5,
       "seeds": [0], "controls": ["random_k"]}


def test_a_new_manifest_records_the_sweep_and_saves_the_same_json_as_a_plain_dict(tmp_path):
    sweep = sweep_spec.parse({**RAW, "topk": {"grid_search": [5, 10]}})
    m = SweepManifest.load(tmp_path, sweep.name)
    assert m == {"name": "ledger", "cells": {}}
    m.begin(sweep)
    m.count("model_loads"), m.count("model_loads", 2), m.count("scoring_passes", 0)
    m.add_actors([{"model": {"model_id": "/m/a"}, "counts": {"evaluations": 4}, "load_seconds": 0.5,
                   "node": "n1", "extra": "dropped"}])
    m.add_run(2, 1.5, "FINISHED", {"tasks_s": 1.0})
    m.save()
    text = (tmp_path / MANIFEST).read_text()
    plain = json.loads(text)
    assert text == json.dumps(plain, indent=2) + "\n"
    assert list(plain["cells"]) == [c.id for c in sweep.cells]
    assert all(c["status"] == "pending" for c in plain["cells"].values())
    assert plain["model_loads"] == 3 and plain["scoring_passes"] == 0 and plain["spec_hash"] == sweep.spec_hash
    assert plain["actors"] == [{"node": "n1", "gpus": None, "model": "/m/a", "counts": {"evaluations": 4},
                                "load_seconds": 0.5, "rss_bytes": None, "cuda_allocated_bytes": None}]
    assert plain["runs"] == [{"started_cells": 2, "seconds": 1.5, "status": "FINISHED", "timings_s": {"tasks_s": 1.0}}]
    again = SweepManifest.load(tmp_path, "other name")  # read back: the file wins over the name
    assert again == plain and again.get("cells", {}) == plain["cells"]


def test_cells_in_flight_go_back_to_pending_unless_settled_and_statuses_count(tmp_path):
    m = SweepManifest(tmp_path, {"name": "x", "cells": {c: {"status": s} for c, s in
                                                        (("a", "written"), ("b", "finished"), ("c", "failed"))}})
    m.mark_pending(["a", "b", "c"])
    assert [m.entry(c)["status"] for c in "abc"] == ["pending", "finished", "failed"]
    assert m.statuses() == {"finished": 1, "failed": 1}
    assert m.finished() == set() and m.written() == set()  # no cell folder holds a finished manifest
    m.mark_pending([])
    assert SweepManifest(tmp_path, {"name": "x", "cells": {}}).statuses() == {"finished": 0, "failed": 0}


def test_cell_ids_hash_only_non_default_settings_so_a_new_setting_renames_nothing():
    """A setting added to the tool arrives at its default: hashing only the settings that differ
    from their defaults keeps every id (and results folder) of the cells written before."""
    cell = sweep_spec.parse(RAW).cells[0]
    assert cell.id == sweep_spec.cell_id(cell.settings)
    older = {k: v for k, v in cell.settings.items() if k not in ("super_min_drop", "stability_sample")}
    assert sweep_spec.cell_id(older) == cell.id  # a version without those settings gave the same id
    assert sweep_spec.non_default(cell.settings) == {"model": "/m/a", "metric": "magnitude", "topk": 5,
                                                     "data_file": str(TINYSTORIES), "controls": ["random_k"]}
    other = sweep_spec.parse({**RAW, "max_samples": 31}).cells[0]
    assert other.id != cell.id
    # a value equal to the default, written out, is the same cell
    assert sweep_spec.parse({**RAW, "max_samples": 30, "seeds": [0]}).cells[0].id == cell.id


def test_a_recorded_cell_under_other_settings_starts_anew_on_resume(tmp_path):
    """Two settings dicts can share an id when a default changed between versions; the manifest
    records each cell's settings and a resumed sweep recomputes a cell whose settings differ."""
    sweep = sweep_spec.parse(RAW)
    cid = sweep.cells[0].id
    older = {k: v for k, v in sweep.cells[0].settings.items() if k != "super_min_drop"}
    changed = {**sweep.cells[0].settings, "max_samples": 99}  # as if 99 had been the default then
    for recorded, kept in ((older, True), (changed, False), (None, False)):
        m = SweepManifest(tmp_path, {"name": "ledger", "cells": {cid: {"status": "finished", "settings": recorded}}})
        m.begin(sweep)
        assert (m.entry(cid)["status"] == "finished") is kept
        assert m.entry(cid)["settings"] == (recorded if kept else sweep.cells[0].settings)
    assert sweep_spec.same_settings({**older, "removed_long_ago": 1}, sweep.cells[0].settings)
