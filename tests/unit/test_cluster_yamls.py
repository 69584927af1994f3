"""deploy/clusters/*.yaml pass Ray's own cluster-launcher schema, the way `ray up` checks
them (``prepare_config`` fills Ray's provider defaults, then ``validate_config``), and hold
what splitserve needs: GPU node types with the resources its plans ask for, setup commands
that install splitserve, start commands that start Ray."""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from placement.catalogue import gpu
from placement.groups import worker_bundles

CLUSTERS = Path(__file__).resolve().parents[2] / "deploy" / "clusters"


def load(name: str) -> dict:
    return yaml.safe_load((CLUSTERS / f"{name}.yaml").read_text())


def ray_checked(config: dict) -> dict:
    """What `ray up` does before talking to a cloud (autoscaler/_private/commands.py
    _bootstrap_config): fill the provider's defaults, then validate."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


@pytest.mark.parametrize("name", ["aws", "gcp", "local"])
def test_cluster_yaml_passes_rays_schema(name):
    prepared = ray_checked(load(name))
    assert prepared["cluster_name"].startswith("splitserve")
    setup = " ".join(prepared["setup_commands"])
    assert "pip install -e ~/splitserve" in setup and "ray[default]==" in setup
    assert prepared["file_mounts"]["~/splitserve"] == "."
    head = " ".join(prepared["head_start_ray_commands"])
    assert "ray start --head" in head and "--autoscaling-config=~/ray_bootstrap_config.yaml" in head
    assert "ray start --address=$RAY_HEAD_IP:6379" in " ".join(prepared["worker_start_ray_commands"])


def test_ray_version_in_setup_is_the_launchers():
    """Nodes must run the Ray the operator launches from (Ray refuses mismatched versions)."""
    import ray

    for name in ("aws", "gcp", "local"):
        assert f'"ray[default]=={ray.__version__}"' in " ".join(load(name)["setup_commands"]), name


@pytest.mark.parametrize("name, gpus", [("aws", {"a100x8": "a100-80g", "h100x8": "h100"}),
                                        ("gcp", {"a100x8": "a100-80g", "h100x8": "h100"})])
def test_gpu_node_types_fit_the_plans_bundles(name, gpus):
    """Each GPU node type holds a whole node of its catalogue GPU, and a worker's bundles at
    the largest tensor-parallel degree a plan uses on it (tp = GPUs per node, 1 GPU and a
    few CPUs per rank) fit on one node, as STRICT_PACK requires."""
    types = ray_checked(load(name))["available_node_types"]
    for node_type, gpu_name in gpus.items():
        res = types[node_type]["resources"]
        per_node = gpu(gpu_name).gpus_per_node
        assert res["GPU"] == per_node
        bundles = worker_bundles(per_node, 4, 1, None)
        for key in ("CPU", "GPU"):
            assert sum(b[key] for b in bundles) <= res[key], (node_type, key)
        assert res[f"accelerator_type:{gpu_name.split('-')[0].upper()}"] == 1
    assert "GPU" not in types["head"]["resources"]


def test_local_yaml_is_on_prem_by_ip():
    cfg = load("local")
    assert cfg["provider"]["type"] == "local"
    ips = [cfg["provider"]["head_ip"], *cfg["provider"]["worker_ips"]]
    assert len(set(ips)) == len(ips) >= 2
    assert ray_checked(cfg)["max_workers"] == len(cfg["provider"]["worker_ips"])


def test_the_check_rejects_what_ray_rejects():
    """The validator is live: a misspelt key and a head type that is not a node type fail."""
    bad = load("aws")
    bad["available_node_types"]["a100x8"]["resourcez"] = {}
    with pytest.raises(jsonschema.ValidationError, match="resourcez"):
        ray_checked(bad)
    bad = load("gcp")
    bad["head_node_type"] = "nope"
    with pytest.raises(ValueError, match="head_node_type"):
        ray_checked(bad)
