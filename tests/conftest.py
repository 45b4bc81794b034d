"""Shared fixtures: paths to the read-only assets in ../shared/assets, tiny models."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("CWA_ASSETS", ROOT.parent / "shared" / "assets"))
STORIES = ASSETS / "stories260k"
TINYSTORIES = ASSETS / "corpora" / "tinystories_val.txt"
WIKITEXT = ASSETS / "corpora" / "wikitext2_test.raw"

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def assets() -> Path:
    if not STORIES.exists():
        pytest.fail(f"test assets missing at {ASSETS}; set CWA_ASSETS")
    return ASSETS

# The demo model is built once per checkout for the test session (a fresh clone builds it
# from scratch, so CI exercises the real first-use path).
os.environ.setdefault("CWA_CACHE", str(ROOT / ".cache" / "cwa-test"))


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the session (starting one costs seconds), loopback only; with its
    dashboard, so that the loopback test sees every listening process a user can start."""
    from cwa_core.sweep.runner import init_ray

    ray = init_ray(None, num_cpus=2, dashboard=True)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def demo_assets():
    from cwa_core.demo import ensure_demo_assets

    return ensure_demo_assets(progress=False)


def mlflow_runs_by_kind(uri: str, experiment: str):
    """(client, every run of an MLflow experiment, the same runs grouped by their ``cwa.kind``
    tag: sweep, cell, seed, stability)."""
    from mlflow.tracking import MlflowClient

    c = MlflowClient(uri)
    runs = c.search_runs([c.get_experiment_by_name(experiment).experiment_id], max_results=5000)
    by: dict[str, list] = {}
    for r in runs:
        by.setdefault(r.data.tags["cwa.kind"], []).append(r)
    return c, runs, by
