"""cluster.yaml (for `ray up` on AWS): valid for Ray's own autoscaler, offline, and safe.

Validation is Ray's: the JSON schema shipped inside the installed ``ray`` package, and the same
``prepare_config`` + ``validate_config`` that ``ray up`` runs before it talks to AWS.
"""
from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray
import ray.autoscaler
import yaml
from packaging.requirements import Requirement
from ray.autoscaler._private.util import prepare_config, validate_config

from conftest import ROOT

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = None

CLUSTER = ROOT / "cluster.yaml"
SCHEMA = Path(ray.autoscaler.__file__).parent / "ray-schema.json"

# (vCPUs, GPUs) of the instance types the file may use, for checking `resources`.
INSTANCES = {
    "m5.xlarge": (4, 0), "m5.2xlarge": (8, 0), "m5.4xlarge": (16, 0),
    "g6e.xlarge": (4, 1), "g6e.2xlarge": (8, 1), "g6e.4xlarge": (16, 1), "g6e.12xlarge": (48, 4),
    "g6e.48xlarge": (192, 8), "p4d.24xlarge": (96, 8), "p4de.24xlarge": (96, 8), "p5.48xlarge": (192, 8),
}
TOKEN_LIKE = re.compile(r"hf_[A-Za-z0-9]{20,}")


@pytest.fixture(scope="module")
def text() -> str:
    return CLUSTER.read_text()


@pytest.fixture(scope="module")
def config(text) -> dict:
    return yaml.safe_load(text)


def ray_up_validate(config: dict) -> dict:
    """What `ray up` does to the file before any cloud call: fill in defaults, then validate."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def top_comment(text: str) -> str:
    lines = []
    for line in text.splitlines():
        if line.strip() and not line.startswith("#"):
            break
        lines.append(line)
    return "\n".join(lines)


def all_commands(config: dict) -> list[str]:
    keys = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
            "head_start_ray_commands", "worker_start_ray_commands")
    out = [c for k in keys for c in config.get(k) or []]
    for node_type in config["available_node_types"].values():
        out += [c for k in keys for c in node_type.get(k) or []]
    return out


# --------------------------------------------------------------------------- Ray's validation

def test_valid_against_rays_shipped_schema(config):
    schema = json.loads(SCHEMA.read_text())
    jsonschema.validate(config, schema)


def test_valid_for_ray_up(config):
    prepared = ray_up_validate(config)
    assert prepared["available_node_types"][prepared["head_node_type"]]["max_workers"] == 0


def test_validation_bites_on_a_misspelt_key(text):
    bad_text = re.sub(r"(?m)^max_workers:", "max_workerz:", text, count=1)
    assert bad_text != text
    bad = yaml.safe_load(bad_text)
    with pytest.raises(jsonschema.ValidationError, match="max_workerz"):
        jsonschema.validate(bad, json.loads(SCHEMA.read_text()))
    with pytest.raises(jsonschema.ValidationError, match="max_workerz"):
        ray_up_validate(bad)


def test_validation_bites_on_a_node_type_without_resources(config):
    bad = copy.deepcopy(config)
    del bad["available_node_types"]["gpu_worker"]["resources"]
    with pytest.raises(jsonschema.ValidationError, match="resources"):
        ray_up_validate(bad)


# --------------------------------------------------------------------------- the cluster

def test_aws_cluster_with_autoscaling_gpu_workers(config):
    assert config["provider"]["type"] == "aws"
    assert config["provider"]["region"]
    types = config["available_node_types"]
    head = config["head_node_type"]
    workers = {name: t for name, t in types.items() if name != head}
    assert workers
    for name, t in workers.items():
        assert t["min_workers"] == 0, name
        assert t["max_workers"] >= 1, name
    gpu = {name: t for name, t in workers.items() if t["resources"].get("GPU", 0) > 0}
    assert "gpu_worker" in gpu
    assert types[head]["resources"].get("GPU", 0) == 0
    assert config["max_workers"] >= max(t["max_workers"] for t in workers.values())
    assert config["idle_timeout_minutes"] > 0


def test_resources_match_the_instance_types(config):
    for name, t in config["available_node_types"].items():
        itype = t["node_config"]["InstanceType"]
        assert itype in INSTANCES, f"{name}: add {itype} to INSTANCES with its vCPUs and GPUs"
        cpus, gpus = INSTANCES[itype]
        assert t["resources"].get("GPU", 0) == gpus, name
        assert 0 < t["resources"].get("CPU", cpus) <= cpus, name


def test_one_deep_learning_ami_for_every_node(config):
    images = {t["node_config"]["ImageId"] for t in config["available_node_types"].values()}
    assert len(images) == 1, "one AMI everywhere: Ray needs the same Python on every node"
    (image,) = images
    assert re.fullmatch(r"ami-[0-9a-f]{8,17}|resolve:ssm:/aws/service/deeplearning/ami/x86_64/[a-z0-9.\-]+/latest/ami-id",
                        image), image


# --------------------------------------------------------------------------- setup

def pins(config: dict) -> dict:
    """{normalised name: Requirement} of every `name==version` in setup_commands."""
    out = {}
    for word in shlex.split(" ".join(config["setup_commands"])):
        if "==" in word:
            req = Requirement(word)
            out[req.name.lower().replace("_", "-")] = req
    return out


def pinned_version(req: Requirement) -> str:
    (spec,) = req.specifier
    assert spec.operator == "==", req
    return spec.version


def test_setup_installs_the_synced_project_with_pinned_versions(config):
    assert config["file_mounts"]["~/cwa"] == "."
    assert '-e "$HOME/cwa[hub]"' in " ".join(config["setup_commands"])
    pinned = pins(config)
    assert pinned["ray"].extras == {"default"}
    assert pinned_version(pinned["ray"]) == ray.__version__, "the cluster's Ray must equal the Ray that runs `ray up`"
    assert pinned_version(pinned["torch"]) == "2.13.0"


@pytest.mark.skipif(tomllib is None, reason="tomllib needs Python 3.11")
def test_every_project_dependency_is_pinned_within_its_range(config):
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pinned = pins(config)
    for dep in map(Requirement, project["dependencies"] + project["optional-dependencies"]["hub"]):
        name = dep.name.lower().replace("_", "-")
        assert name in pinned, f"{dep.name} is not pinned in setup_commands"
        assert dep.specifier.contains(pinned_version(pinned[name]), prereleases=True), (str(dep), str(pinned[name]))


def test_head_node_can_autoscale_and_track(config):
    head = " ".join(config["head_setup_commands"])
    assert "boto3" in head
    assert "MLFLOW_TRACKING_URI" in head and "sqlite:///$HOME/mlflow.db" in head
    assert any("--autoscaling-config=~/ray_bootstrap_config.yaml" in c for c in config["head_start_ray_commands"])
    assert any("$RAY_HEAD_IP" in c for c in config["worker_start_ray_commands"])


# --------------------------------------------------------------------------- the token

def test_no_secret_in_the_file(text, config):
    assert not TOKEN_LIKE.search(text)
    # HF_TOKEN only ever appears as a variable being read: $HF_TOKEN or ${HF_TOKEN...}.
    assert not re.search(r"(?<!\$)(?<!\$\{)HF_TOKEN", text)
    # And no command passes a token around: it travels as a file mount, never on a command line.
    commands = json.dumps(all_commands(config))
    assert "HF_TOKEN" not in commands and "--token" not in commands
    # Nor a value given to anything named like a token (YAML or JSON style, quoted or not).
    for source in (text, json.dumps(config)):
        assert not re.search(r"(?i)token[\"']?\s*[:=]\s*[\"']?[A-Za-z0-9_]{8,}", source)


def test_token_comes_from_a_file_outside_the_project(config):
    local = config["file_mounts"]["~/.cache/huggingface/token"]
    assert local.startswith("~/") and not local.startswith("~/cwa")
    project = ROOT.resolve()
    path = Path(local).expanduser().resolve()
    assert project not in path.parents


# --------------------------------------------------------------------------- the instructions

def test_top_comment_shows_the_commands(text):
    head = top_comment(text)
    for cmd in ("ray up cluster.yaml", "ray submit", "ray attach", "ray down cluster.yaml", "--address auto",
                "MLFLOW_TRACKING_URI", "ray dashboard cluster.yaml", '"$HF_TOKEN"'):
        assert cmd in head, cmd


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # ray.scripts imports Ray Serve (pydantic)
def test_documented_submit_reaches_the_orchestrator(text):
    """`ray submit` must hand the flags to orchestrator.py, and orchestrator.py must accept them."""
    from ray.scripts.scripts import submit

    import orchestrator

    lines = [ln.lstrip("# ").split("  #")[0] for ln in top_comment(text).splitlines()]
    submits = [shlex.split(ln) for ln in lines if ln.startswith("ray submit ")]
    assert submits
    for argv in submits:
        ctx = submit.make_context("submit", argv[2:])
        assert ctx.params["cluster_config_file"] == "cluster.yaml"
        assert ctx.params["script"] == "orchestrator.py"
        args = orchestrator.build_parser().parse_args(list(ctx.params["script_args"]))
        assert args.address == "auto"
        # ray submit runs the script in ~ on the head node, where the checkout is ~/cwa.
        assert args.sweep.startswith("cwa/sweeps/") and args.sweep.endswith(".yaml")


def test_autoscaler_prefers_the_cheap_gpu_worker(config):
    """Ray's own scheduler, offline: one-GPU actors fill the gpu_worker nodes before any p4d starts."""
    from ray.autoscaler._private.node_provider_availability_tracker import NodeAvailabilitySummary
    from ray.autoscaler._private.resource_demand_scheduler import _resource_based_utilization_scorer, get_nodes_for

    prepared = ray_up_validate(config)
    types, head = prepared["available_node_types"], prepared["head_node_type"]
    cheap = types["gpu_worker"]["max_workers"]
    summary = NodeAvailabilitySummary(node_availabilities={})

    def scorer(resources, demands, node_type):
        return _resource_based_utilization_scorer(resources, demands, node_availability_summary=summary)

    for n in range(1, 13):
        added, left = get_nodes_for(types, {head: 1}, head, prepared["max_workers"], [{"CPU": 1, "GPU": 1}] * n, scorer)
        assert added.get("gpu_worker", 0) == min(n, cheap), (n, dict(added))
        assert added.get("gpu_worker_8x", 0) == (1 if n > cheap else 0), (n, dict(added))
        assert not left, n
