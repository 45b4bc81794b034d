"""Placement on a simulated 2-node cluster, one fake GPU per node: one actor per node."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from conftest import ROOT, STORIES, TINYSTORIES

pytestmark = pytest.mark.slow

SCRIPT = textwrap.dedent("""
    import json, os, sys
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"   # loopback only, before importing ray
    from pathlib import Path
    import ray
    from ray.cluster_utils import Cluster
    from cwa_core.sweep import spec
    from cwa_core.sweep.runner import SweepRunner

    out = Path(sys.argv[1])
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 1})
    cluster.add_node(num_cpus=1, num_gpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    sweep = spec.parse({"name": "placement", "model": sys.argv[2], "data_file": sys.argv[3], "metric": "magnitude",
                        "topk": {"grid_search": [5, 10]}, "mode": "global", "seeds": [0], "max_samples": 2,
                        "max_length": 32, "eval_samples": 4, "controls": ["random_k"],
                        "resources": {"gpus_per_actor": 1, "cpus_per_actor": 1, "actors_per_model": 2},
                        "tracking": {"enabled": False}})
    m = SweepRunner(sweep, out, address=cluster.address, progress=False).run()
    print("RESULT " + json.dumps({"nodes": nodes, "actors": m["actors"],
                                  "status": [c["status"] for c in m["cells"].values()]}))
    ray.shutdown()
    cluster.shutdown()
""")


def test_one_actor_per_node_with_one_gpu_each(tmp_path):
    p = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "out"), str(STORIES), str(TINYSTORIES)],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    line = next((l for l in p.stdout.splitlines() if l.startswith("RESULT ")), None)
    assert line, p.stdout[-2000:] + p.stderr[-3000:]
    r = json.loads(line[len("RESULT "):])
    assert len(r["nodes"]) == 2
    assert r["status"] == ["finished", "finished"]
    actors = r["actors"]
    assert len(actors) == 2
    assert sorted(a["node"] for a in actors) == sorted(r["nodes"])  # one actor on each node
    assert all(len(a["gpus"]) == 1 for a in actors)  # each holds its node's one GPU
    assert all(a["counts"]["model_loads"] == 1 for a in actors)
