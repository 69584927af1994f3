import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cluster.errors import ManifestError
from cluster.manifest import load_manifest, parse_manifest

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, data: dict) -> Path:
    p = tmp_path / "m.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def problems(data: dict, tmp_path: Path) -> list[str]:
    with pytest.raises(ManifestError) as e:
        load_manifest(write(tmp_path, data))
    return e.value.lines()


def test_demo_manifest_is_valid():
    m = load_manifest(ROOT / "deploy/manifests/demo.yaml")
    assert m.mode == "disaggregated" and set(m.pools) == {"prefill", "decode"}
    assert load_manifest(ROOT / "deploy/manifests/demo-colocated.yaml").mode == "colocated"


def test_unknown_field_names_its_path(tmp_path):
    lines = problems({"model": {"builtin": "tiny-llama"}, "pools": {"decode": {"replicas": 1, "tpp": 2}}},
                     tmp_path)
    assert any(line.startswith("pools.decode.tpp: unknown field") for line in lines), lines


def test_bad_values_each_reported(tmp_path):
    lines = problems({"model": {"builtin": "tiny-llama", "dtype": "float64"}, "mode": "split",
                      "slo": {"ttft_ms": -1}}, tmp_path)
    joined = "\n".join(lines)
    assert "model.dtype" in joined and "mode" in joined and "slo.ttft_ms" in joined


def test_model_source_must_be_exactly_one(tmp_path):
    lines = problems({"model": {"name": "x"}}, tmp_path)
    assert any("exactly one of 'path'" in line for line in lines)


def test_missing_model_directory(tmp_path):
    lines = problems({"model": {"path": "nowhere"}}, tmp_path)
    assert lines[0].startswith("model.path: no config.json in")


def test_tp_must_divide_heads(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 100,
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512}))
    lines = problems({"model": {"path": "model"}, "pools": {"prefill": {"tp": 3}}}, tmp_path)
    assert any(line.startswith("pools.prefill.tp: tp=3 does not divide") for line in lines), lines


def test_pools_must_match_mode(tmp_path):
    with pytest.raises(ManifestError, match="remove"):
        parse_manifest({"model": {"builtin": "tiny-llama"}, "mode": "colocated",
                        "pools": {"prefill": {}}})


def test_validate_cli_exit_codes(tmp_path):
    bad = write(tmp_path, {"model": {"builtin": "tiny-llama"}, "bogus": 1})
    r = subprocess.run([sys.executable, "-m", "cluster", "validate", str(bad)],
                       capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 2 and r.stdout.strip() == "bogus: unknown field (check the spelling; see the manifest reference in README)"
    r = subprocess.run([sys.executable, "-m", "cluster", "validate", "deploy/manifests/demo.yaml"],
                       capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
