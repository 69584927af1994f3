"""`splitserve plan`: exit codes, and a planned manifest that validates."""

import subprocess
import sys
from pathlib import Path

import yaml

from cluster.manifest import load_manifest

ROOT = Path(__file__).resolve().parents[2]


def plan(manifest: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cluster", "plan", str(manifest), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)


def write(tmp_path: Path, **over) -> Path:
    data = {"name": "t", "model": {"path": str(ROOT / "deploy/models/opt-13b"), "dtype": "float16"},
            "hardware": {"gpu": "a100-80g", "num_gpus": 2},
            "workload": {"prompt_tokens": [64, 256], "output_tokens": [16, 64]},
            "slo": {"ttft_ms": 500, "tpot_ms": 100}}
    data.update(over)
    p = tmp_path / "m.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_plan_writes_a_valid_manifest(tmp_path):
    r = plan(write(tmp_path), tmp_path / "out.yaml")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "predicted goodput" in r.stdout
    m = load_manifest(tmp_path / "out.yaml")
    gpus = sum(p.replicas * p.tp for p in m.pools.values())
    assert m.mode in ("colocated", "disaggregated") and 1 <= gpus <= 2


def test_plan_bad_inputs_exit_2(tmp_path):
    r = plan(write(tmp_path, hardware={"gpu": "l40s", "num_gpus": 2},
                   model={"path": str(ROOT / "deploy/models/opt-66b"), "dtype": "float16"}), tmp_path / "o.yaml")
    assert r.returncode == 2 and "cannot hold" in r.stdout
    r = plan(write(tmp_path, hardware={"gpu": "tpu9", "num_gpus": 1}), tmp_path / "o.yaml")
    assert r.returncode == 2 and "hardware.gpu" in r.stdout and "a100-80g" in r.stdout
    data = write(tmp_path)
    d = yaml.safe_load(data.read_text())
    d.pop("hardware")
    data.write_text(yaml.safe_dump(d))
    r = plan(data, tmp_path / "o.yaml")
    assert r.returncode == 2 and "hardware" in r.stdout


def test_impossible_slo_exit_3_names_the_miss(tmp_path):
    r = plan(write(tmp_path, slo={"ttft_ms": 1, "tpot_ms": 100}), tmp_path / "o.yaml")
    assert r.returncode == 3, r.stdout + r.stderr
    assert "slo.ttft_ms" in r.stdout and "target 1.0 ms" in r.stdout
    assert (tmp_path / "o.yaml").is_file()  # the best layout found is still written


def test_attention_expert_layout_is_written_as_servable_pools(tmp_path):
    """A disaggregated/ae layout (2 groups of 1 attention + 2 expert workers on 2 nodes)
    becomes pools attention and expert that validate, each expert replicated once per
    group and each group's workers on its node; the kind counts as servable."""
    from cluster.manifest import parse_manifest
    from cluster.manifest_checks import read_expert_placement
    from placement.catalogue import gpu
    from placement.layout import Layout
    from placement.plan import Plan, planned_manifest
    from placement.search import NOT_SERVABLE, SLO

    m = parse_manifest({"model": {"builtin": "tiny-mixtral"}, "hardware": {"gpu": "cpu", "num_gpus": 8,
                        "node_ips": ["127.0.0.2", "127.0.0.3"]}, "pools": {"prefill": {}, "decode": {}}})
    lay = Layout("disaggregated", {"prefill": {"tp": 1, "pp": 1, "replicas": 2, "nodes": [0, 1]},
                                   "decode": {"attention_workers": 1, "expert_workers": 2, "gpus": 3,
                                              "replicas": 2, "nodes": [0, 1]}},
                 8, 10.0, 0.1, 0.01, kind="disaggregated/ae")
    data = planned_manifest(m, lay, gpu("cpu"))
    assert set(data["pools"]) == {"prefill", "attention", "expert"}
    planned = parse_manifest(data)
    assert planned.afd and planned.pools["attention"].replicas == 2 and planned.pools["expert"].replicas == 4
    assert planned.pools["expert"].nodes == ["127.0.0.2", "127.0.0.2", "127.0.0.3", "127.0.0.3"]
    assert planned.pools["attention"].nodes == ["127.0.0.2", "127.0.0.3"]
    layout = read_expert_placement(planned)
    assert layout[0] == [[0, 1, 2, 3], [4, 5, 6, 7], [0, 1, 2, 3], [4, 5, 6, 7]]
    assert "disaggregated/ae" not in NOT_SERVABLE
    summary = Plan(lay, data, SLO(1, 0.1), [], {"disaggregated/ae": lay}).summary()
    assert summary["best_of_each_kind"]["disaggregated/ae"]["servable"] is True
