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


# -- attention/expert disaggregation -------------------------------------------------
AFD = {"model": {"builtin": "tiny-mixtral"}, "pools": {"prefill": {}, "attention": {}, "expert": {"replicas": 2}}}


def test_demo_afd_manifest_is_valid_and_fits_two_cores():
    m = load_manifest(ROOT / "deploy/manifests/demo-afd.yaml")
    assert m.afd and m.decode_pool == "attention" and set(m.pools) == {"prefill", "attention", "expert"}
    assert m.pools["expert"].replicas == 2 and m.pools["attention"].replicas == 1
    assert m.pools["expert"].placement == "even" and m.pools["expert"].micro_batches == 2
    assert sum(p.replicas * p.num_cpus for p in m.pools.values()) <= 2
    from cluster.manifest_checks import read_expert_placement

    layout = read_expert_placement(m)
    assert len(layout) == 4 and layout[0] == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_afd_defaults_and_plain_decode_role(tmp_path):
    m = parse_manifest(AFD)
    assert m.pools["expert"].placement == "even" and m.pools["expert"].micro_batches == 2
    assert parse_manifest({"model": {"builtin": "tiny-mixtral"}}).decode_pool == "decode"


def test_afd_rejects_dense_model(tmp_path):
    lines = problems({**AFD, "model": {"builtin": "tiny-llama"}}, tmp_path)
    assert lines == ["pools.attention: attention/expert pools need an MoE model; model.builtin is LlamaForCausalLM "
                     "(dense): use pools prefill and decode",
                     "pools.expert: attention/expert pools need an MoE model; model.builtin is LlamaForCausalLM "
                     "(dense): use pools prefill and decode"]


def test_afd_placement_must_match_the_model(tmp_path):
    L = 4
    (tmp_path / "layers3.json").write_text(json.dumps({"layers": [[[0, 1, 2, 3], [4, 5, 6, 7]]] * 3}))
    lines = problems({**AFD, "pools": {**AFD["pools"], "expert": {"replicas": 2, "placement": "layers3.json"}}},
                     tmp_path)
    assert lines == ["pools.expert.placement: 3 layers; the model has 4 (the model has 4 layers x 8 experts)"]
    (tmp_path / "hole.json").write_text(json.dumps({"layers": [[[0, 1, 2], [4, 5, 6, 7]]] * L}))
    lines = problems({**AFD, "pools": {**AFD["pools"], "expert": {"replicas": 2, "placement": "hole.json"}}},
                     tmp_path)
    assert len(lines) == L and lines[0] == ("pools.expert.placement: layer 0: experts [3] have no replica "
                                            "(the model has 4 layers x 8 experts)")
    (tmp_path / "big.json").write_text(json.dumps({"layers": [[[0, 1, 2, 3, 8], [4, 5, 6, 7]]] * L}))
    lines = problems({**AFD, "pools": {**AFD["pools"], "expert": {"replicas": 2, "placement": "big.json"}}},
                     tmp_path)
    assert lines[0].startswith("pools.expert.placement: layer 0 shard 0: expert ids [8] outside 0..7")
    (tmp_path / "three.json").write_text(json.dumps({"layers": [[[0, 1, 2], [3, 4, 5], [6, 7, 0]]] * L}))
    lines = problems({**AFD, "pools": {**AFD["pools"], "expert": {"replicas": 2, "placement": "three.json"}}},
                     tmp_path)
    assert lines == ["pools.expert.replicas: 2, but three.json places experts on 3 GPUs; allowed: 3 "
                     "(one expert worker per GPU)"]
    lines = problems({**AFD, "pools": {**AFD["pools"], "expert": {"replicas": 2, "placement": "nope.json"}}},
                     tmp_path)
    assert lines[0].startswith("pools.expert.placement: cannot read")
    ok = load_manifest(write(tmp_path, {**AFD, "pools": {**AFD["pools"],
                                                         "expert": {"replicas": 3, "placement": "three.json"}}}))
    from cluster.manifest_checks import read_expert_placement

    assert read_expert_placement(ok)[0] == [[0, 1, 2], [3, 4, 5], [6, 7, 0]]


def test_afd_pool_fields_and_mixing_with_decode(tmp_path):
    lines = problems({"model": {"builtin": "tiny-mixtral"},
                      "pools": {"prefill": {}, "decode": {"placement": "even", "micro_batches": 1}}}, tmp_path)
    assert lines == ["pools.decode.placement: applies to the expert pool only",
                     "pools.decode.micro_batches: applies to the expert pool only"]
    lines = problems({**AFD, "pools": {**AFD["pools"], "expert": {"replicas": 9}}}, tmp_path)
    assert lines == ["pools.expert.replicas: 9 expert workers for 8 experts with placement even; allowed: 1..8"]
    lines = problems({**AFD, "pools": {**AFD["pools"], "attention": {"tp": 2}}}, tmp_path)
    assert lines == ["pools.attention.tp: tp=2 not supported for the attention pool; allowed: 1 (scale with replicas)"]
    with pytest.raises(ManifestError, match="remove"):
        parse_manifest({"model": {"builtin": "tiny-mixtral"}, "pools": {"decode": {}, "expert": {}}})
    lines = problems({**AFD, "pools": {**AFD["pools"], "expert": {"micro_batches": 3}}}, tmp_path)
    assert lines[0].startswith("pools.expert.micro_batches:")


def vllm_manifest(**over) -> dict:
    data = {"model": {"builtin": "small-llama"}, "kv_cache": {"block_size": 32},
            "pools": {"prefill": {"engine": "vllm"}, "decode": {"engine": "vllm"}}}
    data.update(over)
    return data


def test_vllm_engine_valid_and_default_native(tmp_path):
    m = load_manifest(write(tmp_path, vllm_manifest()))
    assert {p.engine for p in m.pools.values()} == {"vllm"}
    assert load_manifest(ROOT / "deploy/manifests/demo.yaml").pools["decode"].engine == "native"
    m = load_manifest(ROOT / "deploy/manifests/demo-vllm.yaml")
    assert {p.engine for p in m.pools.values()} == {"vllm"} and m.kv_cache.block_size % 32 == 0


def test_vllm_engine_rejects_what_vllm_cannot_run(tmp_path):
    # head_dim 16 (tiny-llama): vLLM's CPU attention rejects it.
    lines = problems(vllm_manifest(model={"builtin": "tiny-llama"}), tmp_path)
    assert lines == [lines[0]] and lines[0].startswith("model.builtin: head_dim 16 is not supported"), lines
    # Mixtral is not an architecture a vLLM pool serves here.
    lines = problems(vllm_manifest(model={"builtin": "tiny-mixtral"}), tmp_path)
    assert any(line.startswith("model.builtin: architecture ['MixtralForCausalLM']") for line in lines), lines
    # Block size must suit vLLM's CPU attention.
    lines = problems(vllm_manifest(kv_cache={"block_size": 16}), tmp_path)
    assert lines == ["kv_cache.block_size: 16 with vLLM pools on CPU (decode, prefill); vLLM's CPU "
                     "attention needs a multiple of 32"], lines
    # Mixed engines in one disaggregated pair are valid (KV moves in kvtransfer's form).
    m = load_manifest(write(tmp_path, vllm_manifest(pools={"prefill": {}, "decode": {"engine": "vllm"}})))
    assert (m.pools["prefill"].engine, m.pools["decode"].engine) == ("native", "vllm")
    lines = problems(vllm_manifest(pools={"prefill": {"engine": "vllm", "tp": 2}, "decode": {"engine": "vllm"}}),
                     tmp_path)
    assert lines == ["pools.prefill.tp: tp=2 with engine vllm is not supported yet; allowed: 1"], lines
    lines = problems(vllm_manifest(model={"builtin": "tiny-mixtral"}, pools={
        "prefill": {}, "attention": {"engine": "vllm"}, "expert": {}}), tmp_path)
    assert any(line.startswith("pools.attention.engine: vllm is not supported on the attention pool")
               for line in lines), lines
    lines = problems(vllm_manifest(pools={"prefill": {"engine": "sglang"}}), tmp_path)
    assert lines[0].startswith("pools.prefill.engine: Input should be 'native' or 'vllm'"), lines


def test_vllm_engine_checks_model_directory(tmp_path):
    from models.make import config_for

    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config_for("llama")))  # head_dim 16
    lines = problems(vllm_manifest(model={"path": str(d)}, mode="colocated",
                                   pools={"colocated": {"engine": "vllm"}}), tmp_path)
    assert lines == [lines[0]] and lines[0].startswith("model.path: head_dim 16 is not supported"), lines


def test_kv_tls_files_both_or_neither_and_existing(tmp_path):
    import yaml as _yaml

    from cluster.errors import ManifestError
    from cluster.manifest import parse_manifest

    data = _yaml.safe_load((ROOT / "deploy/manifests/demo-ha.yaml").read_text())
    (tmp_path / "kv.pem").write_text("cert")
    with pytest.raises(ManifestError) as err:
        parse_manifest({**data, "kv_transfer": {"tls_cert_file": "kv.pem"}}, base_dir=str(tmp_path))
    assert err.value.lines() == ["kv_transfer.tls_key_file: needed with kv_transfer.tls_cert_file (TLS wants both)"]
    with pytest.raises(ManifestError) as err:
        parse_manifest({**data, "kv_transfer": {"tls_cert_file": "kv.pem", "tls_key_file": "nope.key"}},
                       base_dir=str(tmp_path))
    assert err.value.lines()[0].startswith("kv_transfer.tls_key_file: ") and "is not a file" in err.value.lines()[0]
    (tmp_path / "kv.key").write_text("key")
    m = parse_manifest({**data, "kv_transfer": {"tls_cert_file": "kv.pem", "tls_key_file": "kv.key"}},
                       base_dir=str(tmp_path))
    assert m.kv_transfer.tls_cert_file == str((tmp_path / "kv.pem").resolve())  # workers read it anywhere


def test_kv_codec_levels_and_the_quality_floor(tmp_path):
    """kvtc is a manifest codec (levels 0..7), also as adaptive's lossy codec; a level
    outside the codec's range, and a pinned cachegen level whose measured perplexity cost
    is above max_quality_loss, are one-line errors at kv_transfer."""
    base = {"model": {"builtin": "tiny-llama"}}
    m = parse_manifest({**base, "kv_transfer": {"codec": "kvtc", "level": 7}})
    assert m.kv_transfer.codec == "kvtc" and m.kv_transfer.level == 7
    m = parse_manifest({**base, "kv_transfer": {"codec": "adaptive", "adaptive_lossy": "kvtc", "level": 6}})
    assert m.kv_transfer.adaptive_lossy == "kvtc"
    assert parse_manifest({**base, "kv_transfer": {"codec": "cachegen"}}).kv_transfer.level is None
    for kt, want in (({"codec": "cachegen", "level": 6}, "not a cachegen level"),
                     ({"codec": "cachegen", "level": 3}, "max_quality_loss"),
                     ({"codec": "int8", "level": 1}, "level applies to")):
        with pytest.raises(ManifestError) as err:
            parse_manifest({**base, "kv_transfer": kt})
        (line,) = err.value.lines()
        assert line.startswith("kv_transfer") and want in line, line
    # a looser floor admits the coarser level
    assert parse_manifest({**base, "kv_transfer": {"codec": "cachegen", "level": 3,
                                                   "max_quality_loss": 0.3}}).kv_transfer.level == 3
