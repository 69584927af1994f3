"""Manifest checks that need more than the schema: the model's files and config (directory,
tp vs heads, context length, tokenizer), vLLM pools, attention/expert placements, TLS and
API-key files. Every problem is reported at once, as (field path, reason)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cluster.errors import ManifestError
from cluster.manifest_schema import AFD_POOLS, Manifest

def check_kv_tls(m: Manifest, base_dir: str) -> None:
    """Both TLS files or neither; they exist; resolved against the manifest's directory."""
    kt = m.kv_transfer
    given = {f: getattr(kt, f) for f in ("tls_cert_file", "tls_key_file") if getattr(kt, f) is not None}
    if not given:
        return
    problems = []
    if len(given) == 1:
        (f,) = given
        other = "tls_key_file" if f == "tls_cert_file" else "tls_cert_file"
        problems.append((f"kv_transfer.{other}", f"needed with kv_transfer.{f} (TLS wants both)"))
    for f, value in given.items():
        p = Path(value) if Path(value).is_absolute() else Path(base_dir) / value
        if not p.is_file():
            problems.append((f"kv_transfer.{f}", f"{p} is not a file"))
        setattr(kt, f, str(p.resolve()))
    if problems:
        raise ManifestError(problems)


def check_api_keys_file(m: Manifest) -> None:
    path = m.api_keys_path()
    if path is None:
        return
    from cluster.http_guard import read_keys_file

    if not path.is_file():
        raise ManifestError([("server.api_keys_file", f"{path} does not exist (expected a file with one API key "
                                                      "per line)")])
    try:
        keys = read_keys_file(path)
    except (OSError, UnicodeDecodeError) as e:
        raise ManifestError([("server.api_keys_file", f"cannot read {path}: {e}")]) from None
    if not keys:
        raise ManifestError([("server.api_keys_file", f"{path} holds no key (one per line; '#' starts a comment)")])


# Architectures a vLLM pool may serve: those splitserve's own engine also runs and whose
# output is checked against it (tests/integration/test_vllm_serving.py).
VLLM_ARCHITECTURES = ("LlamaForCausalLM",)
# vLLM's CPU attention (vllm/v1/attention/backends/cpu_attn.py, 0.32): head sizes it
# supports and the block size it needs (a multiple of 32).
VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
VLLM_CPU_BLOCK_MULTIPLE = 32


def check_vllm_pools(m: Manifest, cfg: dict[str, object]) -> list[tuple[str, str]]:
    """What a vLLM pool cannot run, as (field path, reason); cfg is the model's config.json."""
    problems: list[tuple[str, str]] = []
    engines = {name: pool.engine for name, pool in m.pools.items()}
    vllm_pools = sorted(name for name, e in engines.items() if e == "vllm")
    if not vllm_pools:
        return problems
    # Mixed pairs (native prefill -> vLLM decode and the reverse) work: KV travels in
    # kvtransfer's engine-independent [layers, 2, tokens, kv_heads, head_dim] form.
    for name in vllm_pools:
        pool = m.pools[name]  # type: ignore[index]
        if name in AFD_POOLS:
            problems.append((f"pools.{name}.engine", f"vllm is not supported on the {name} pool (attention/expert "
                             "disaggregation runs splitserve's engine); allowed: native"))
        if pool.tp != 1:
            problems.append((f"pools.{name}.tp", f"tp={pool.tp} with engine vllm is not supported yet; "
                             "allowed: 1"))
    on_cpu = [n for n in vllm_pools if m.pools[n].num_gpus == 0]  # type: ignore[index]
    if on_cpu and m.kv_cache.block_size % VLLM_CPU_BLOCK_MULTIPLE:
        problems.append(("kv_cache.block_size", f"{m.kv_cache.block_size} with vLLM pools on CPU "
                         f"({', '.join(on_cpu)}); vLLM's CPU attention needs a multiple of "
                         f"{VLLM_CPU_BLOCK_MULTIPLE}"))
    where = "model.builtin" if m.model.builtin is not None else "model.path"
    archs = list(cfg.get("architectures") or [])  # type: ignore[call-overload]
    if not any(a in VLLM_ARCHITECTURES for a in archs):
        problems.append((where, f"architecture {archs} cannot run on a vLLM pool ({', '.join(vllm_pools)}) "
                         f"here; allowed: {', '.join(VLLM_ARCHITECTURES)}"))
    heads = int(cfg.get("num_attention_heads", 1))  # type: ignore[call-overload]
    head_dim = int(cfg.get("head_dim") or int(cfg.get("hidden_size", 0)) // max(1, heads))  # type: ignore[call-overload]
    if on_cpu and head_dim not in VLLM_CPU_HEAD_SIZES:
        problems.append((where, f"head_dim {head_dim} is not supported by vLLM's CPU attention (pools "
                         f"{', '.join(on_cpu)}); allowed: {', '.join(map(str, VLLM_CPU_HEAD_SIZES))} "
                         "(e.g. builtin small-llama, head_dim 32)"))
    return problems


def check_against_model(m: Manifest, require_tokenizer: bool = False) -> None:
    """Checks that need the model's config: directory, tp vs heads, context vs blocks;
    with require_tokenizer (serving needs one, planning does not) a readable tokenizer."""
    from engine.config import ModelConfig
    from engine.errors import ModelLoadError
    from engine.tokenizer import Tokenizer

    problems: list[tuple[str, str]] = []
    field = "model.builtin" if m.model.builtin is not None else "model.path"
    try:
        d = m.model_dir()  # a built-in or a GGUF is converted here once (cached)
    except ModelLoadError as e:
        raise ManifestError([(field, str(e))]) from None
    if not (d / "config.json").is_file():
        problems.append((field, f"no config.json in {d} (expected an HF-format model directory or a "
                                "Llama-family .gguf file; build one with 'splitserve make-model')"))
        raise ManifestError(problems)
    try:
        cfg = ModelConfig.from_dir(d)
    except Exception as e:  # noqa: BLE001 - reported as a manifest problem
        raise ManifestError([(field, f"cannot read model config: {e}")]) from None
    if require_tokenizer:
        try:
            Tokenizer.from_dir(d)
        except ModelLoadError as e:
            problems.append((field, str(e)))
    if m.afd:
        problems += afd_problems(m)
    for name, pool in m.pools.items():
        for what, n in (("attention heads", cfg.num_attention_heads), ("KV heads", cfg.num_key_value_heads)):
            if n % pool.tp:
                problems.append((f"pools.{name}.tp", f"tp={pool.tp} does not divide the model's "
                                 f"{n} {what}; allowed: a divisor of {n}"))
    problems += check_vllm_pools(m, json.loads((d / "config.json").read_text()))
    if m.model.max_model_len and m.model.max_model_len > cfg.max_position_embeddings:
        problems.append(("model.max_model_len", f"{m.model.max_model_len} exceeds the model's "
                         f"max_position_embeddings {cfg.max_position_embeddings}"))
    if problems:
        raise ManifestError(problems)


def _shape_of(m: Manifest) -> tuple[str, int, int, str]:
    """(HF architecture, layers, experts, model source field); a builtin is built (cached)."""
    from engine.config import ModelConfig

    cfg = ModelConfig.from_dir(m.model_dir())
    source = "model.builtin" if m.model.builtin is not None else "model.path"
    return cfg.hf_architecture, cfg.num_hidden_layers, cfg.num_local_experts, source


def read_expert_placement(m: Manifest) -> list[list[list[int]]]:
    """The expert pool's placement: per layer, per expert worker, the expert ids it holds."""
    from engine.experts import even_placement

    _, layers, experts, _ = _shape_of(m)
    pool = m.pools["expert"]  # type: ignore[index]
    if pool.placement in (None, "even"):
        return even_placement(layers, experts, pool.replicas)
    if isinstance(pool.placement, list):
        return pool.placement
    import json

    data = json.loads(Path(pool.placement).read_text())
    return data["layers"] if isinstance(data, dict) else data  # type: ignore[no-any-return]


def afd_problems(m: Manifest) -> list[tuple[str, str]]:
    """Attention/expert pools against the model: MoE only, tp 1, a placement that fits."""
    import json

    from engine.experts import placement_problems

    arch, layers, experts, source = _shape_of(m)
    if experts == 0:
        return [(f"pools.{p}", f"attention/expert pools need an MoE model; {source} is {arch} (dense): use "
                 "pools prefill and decode") for p in AFD_POOLS]
    problems: list[tuple[str, str]] = []
    for name in AFD_POOLS:
        if m.pools[name].tp != 1:  # type: ignore[index]
            problems.append((f"pools.{name}.tp", f"tp={m.pools[name].tp} not supported for the {name} pool; "  # type: ignore[index]
                             "allowed: 1 (scale with replicas)"))
    pool = m.pools["expert"]  # type: ignore[index]
    where = "pools.expert.placement"
    if pool.placement in (None, "even"):
        if pool.replicas > experts:
            problems.append(("pools.expert.replicas", f"{pool.replicas} expert workers for {experts} experts "
                             f"with placement even; allowed: 1..{experts}"))
        return problems
    if isinstance(pool.placement, list):
        layout: Any = pool.placement
        path = Path("the inline placement")
    else:
        path = Path(pool.placement)
        try:
            data = json.loads(path.read_text())
        except OSError as e:
            return problems + [(where, f"cannot read {path}: {e.strerror or e}; allowed: even or a PLACEMENT.json "
                                "from 'splitserve place-experts'")]
        except json.JSONDecodeError as e:
            return problems + [(where, f"{path} is not valid JSON: {e}")]
        layout = data.get("layers") if isinstance(data, dict) else None
        if layout is None:
            return problems + [(where, f"{path} has no 'layers' (per layer, per GPU, expert ids)")]
    for p in placement_problems(layout, layers, experts):
        problems.append((where, f"{p} (the model has {layers} layers x {experts} experts)"))
    gpus = {len(layer) for layer in layout if isinstance(layer, list)}
    if len(gpus) == 1 and pool.replicas != next(iter(gpus)):
        problems.append(("pools.expert.replicas", f"{pool.replicas}, but {path.name} places experts on "
                         f"{next(iter(gpus))} GPUs; allowed: {next(iter(gpus))} (one expert worker per GPU)"))
    return problems
