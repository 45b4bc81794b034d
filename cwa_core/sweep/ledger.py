"""The sweep's record on disk: the results folder's lock (one driver at a time) and the sweep
manifest (``sweep_manifest.json``), read to know which cells are finished or written."""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
from pathlib import Path

MANIFEST = "sweep_manifest.json"
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
    cm = root / cid / "manifest.json"
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
