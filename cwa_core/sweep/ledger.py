"""The sweep's record on disk: the results folder's lock (one driver at a time) and the sweep
manifest (``sweep_manifest.json``, :class:`SweepManifest`), read to know which cells are
finished or written."""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterable
from pathlib import Path

from .. import schema

MANIFEST = schema.SWEEP_MANIFEST
LOCK = ".sweep.lock"


class SweepBusyError(RuntimeError):
    """Another driver is running a sweep into the same results folder."""


@contextlib.contextmanager
def _exclusive(root: Path):
    """Hold ``root/.sweep.lock`` (released by the kernel even if the driver is SIGKILLed)."""
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SweepBusyError(f"another sweep is running into {root} (it holds {root / LOCK}); "
                                 "wait for it, or choose another --out-dir") from None
        yield
    finally:
        os.close(fd)


def _read_manifest(root: Path) -> dict:
    p = root / MANIFEST
    if p.exists():
        return json.loads(p.read_text())
    return {}


def _folder_finished(root: Path, cid: str) -> bool:
    cm = root / cid / schema.MANIFEST
    try:
        return cm.exists() and json.loads(cm.read_text()).get("status") == "finished"
    except ValueError:
        return False


def finished_cells(root: Path, m: dict) -> set[str]:
    """Cells whose sweep manifest ``m`` says finished and whose folder holds a finished manifest."""
    return {cid for cid, c in m.get("cells", {}).items() if c.get("status") == "finished" and _folder_finished(root, cid)}


def written_cells(root: Path, m: dict) -> set[str]:
    """Cells whose folder is complete but which are not logged yet (a driver stopped between the
    two, or logging failed): they are logged from their files, not computed again."""
    return {cid for cid, c in m.get("cells", {}).items()
            if (c.get("status") == "written" or (c.get("status") == "failed" and c.get("stage") == "log"))
            and _folder_finished(root, cid)}


class SweepManifest(dict):
    """``sweep_manifest.json``: the sweep's record, kept in a results folder.

    It is the JSON object itself (a dict, so that readers index it as they read the file:
    ``m["cells"][cell_id]["status"]``); what the driver changes goes through these methods."""

    def __init__(self, root: Path, data: dict) -> None:
        super().__init__(data)
        self.root = Path(root)

    @classmethod
    def load(cls, root: Path, name: str) -> SweepManifest:
        """The manifest in ``root``, or a new one for the sweep ``name``."""
        return cls(root, _read_manifest(Path(root)) or {"name": name, "cells": {}})

    def save(self) -> None:
        from ..outputs import write_json  # numpy and torch: not for readers of the manifest

        write_json(self.root / MANIFEST, self)

    def begin(self, sweep) -> None:
        """A run of ``sweep`` starts: its identity, and every cell not recorded yet as pending."""
        self.update({"name": sweep.name, "spec_hash": sweep.spec_hash,
                     "sweep_file": str(sweep.path) if sweep.path else None})
        from .spec import same_settings

        for c in sweep.cells:  # a cell recorded under other settings (a default changed since) starts anew
            if not same_settings(self["cells"].get(c.id, {}).get("settings"), c.settings):
                self["cells"][c.id] = {"status": "pending", "settings": c.settings}

    def entry(self, cell_id: str) -> dict:
        return self["cells"][cell_id]

    def statuses(self) -> dict[str, int]:
        return {s: sum(c["status"] == s for c in self["cells"].values()) for s in ("finished", "failed")}

    def finished(self) -> set[str]:
        return finished_cells(self.root, self)

    def written(self) -> set[str]:
        return written_cells(self.root, self)

    def count(self, what: str, n: int = 1) -> None:
        """Add ``n`` to the counter ``what`` (model loads, scoring passes, actor replacements...)."""
        self[what] = self.get(what, 0) + n

    def add_actors(self, infos: Iterable[dict]) -> None:
        """What actors said of themselves (``ModelWorker.info``) as they went."""
        self.setdefault("actors", []).extend(
            {"node": x.get("node"), "gpus": x.get("gpus"), "model": x["model"]["model_id"], "counts": x["counts"],
             "load_seconds": x["load_seconds"], "rss_bytes": x.get("rss_bytes"),
             "cuda_allocated_bytes": x.get("cuda_allocated_bytes")} for x in infos)

    def mark_pending(self, cell_ids: Iterable[str]) -> None:
        """Cells in flight when the sweep stopped: pending again, unless finished or failed."""
        for cid in cell_ids:
            entry = self["cells"][cid]
            if entry["status"] not in ("finished", "failed"):
                entry["status"] = "pending"

    def add_run(self, started: int, seconds: float, status: str, timings: dict) -> None:
        """One invocation of the sweep (its ``timings`` dict is kept, not copied: later stops add to it)."""
        self.setdefault("runs", []).append({"started_cells": started, "seconds": seconds, "status": status,
                                            "timings_s": timings})
