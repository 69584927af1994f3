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
