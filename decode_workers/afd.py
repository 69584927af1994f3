"""Attention/expert disaggregation (MoE decode) as Ray actors.

``AttentionWorker`` plays the decode role towards the router and the prefill workers: it
receives the prompt KV exactly as a DecodeWorker does (same connector, codecs,
prefetch) and runs continuous batching over an engine.afd.AFDRunner, whose MoE layers
reach the expert workers through decode_workers.exchange (one socket per expert worker;
payloads in shared memory when the expert worker is on the same node).
``ExpertWorker`` holds the experts a placement gives its slot (read from the model's
safetensors) and serves them to every attention worker (M:N).

Attention workers learn where the expert workers listen from the controller's snapshot
(``cluster_state``); a replaced expert worker (same slot, same experts) is reconnected
to at the next step. A step whose exchange fails fails its requests (the caller sees
an error at once, never a hang) and the worker keeps serving.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import torch

from cluster.manifest import Manifest
from cluster.manifest_checks import read_expert_placement
from cluster.worker_base import current_node_ip, slot_of
from decode_workers.worker import DecodeWorker
from engine.threads import compute_threads

logger = logging.getLogger(__name__)


class AttentionWorker(DecodeWorker):
    role = "attention"

    def __init__(self, worker_id: str, manifest_json: str, pool_name: str = "attention") -> None:
        super().__init__(worker_id, manifest_json, pool_name)
        self.placement = read_expert_placement(self.manifest)
        self.micro_batches = int(self.manifest.pools["expert"].micro_batches or 2)  # type: ignore[index]
        self.exchange: Any = None

    async def build_runner(self) -> Any:
        import asyncio

        from decode_workers.exchange import SocketExchange
        from engine.afd import build_attention_runner

        s = self.settings
        self.exchange = SocketExchange(self.placement, timeout_s=self.manifest.server.token_timeout_s,
                                       node_ip=current_node_ip())
        return await asyncio.to_thread(build_attention_runner, s.model_dir, s.dtype, s.num_blocks, s.block_size,
                                       self.exchange, self.micro_batches)

    async def cluster_state(self, state: dict[str, Any]) -> None:
        addresses: dict[int, tuple[str, int]] = {}
        for w in state["pools"].get("expert", []):
            st = w.get("stats") or {}
            if w.get("healthy") and st.get("exchange_addr") and st.get("shard") is not None:
                addresses[int(st["shard"])] = (str(st["exchange_addr"][0]), int(st["exchange_addr"][1]))
        if self.exchange is not None:
            # Set from the event loop while the engine thread may be mid-step: the step
            # then fails on the closed socket and the next one reconnects.
            self.exchange.set_addresses(addresses)

    async def set_placement(self, placement: list[list[list[int]]]) -> int:
        """Route by a new expert placement from the next step on; returns once no step
        uses the old one (the controller drops old expert copies only then)."""
        import asyncio

        assert self.engine is not None
        runner: Any = self.engine.runner
        await asyncio.to_thread(runner.set_placement, placement)
        self.placement = placement
        return int(runner.total.steps)

    async def health(self) -> dict[str, Any]:
        stats = await super().health()
        if self.engine is not None:
            runner: Any = self.engine.runner
            stats["expert_load"] = runner.expert_load.tolist()
            stats["afd_attention_s"] = runner.total.attention_s
            stats["afd_wait_s"] = runner.total.wait_s
            stats["expert_shards_known"] = sorted(self.exchange.addresses)
            # Shards on this node whose payloads go through shared memory (the rest: socket).
            stats["expert_shards_shm"] = sorted(s for s in self.exchange.addresses if self.exchange.uses_shm(s))
            stats["micro_batches"] = self.micro_batches
        return stats


class ExpertWorker:
    """Holds its slot's experts of every layer; serves them over decode_workers.exchange."""

    role = "expert"

    def __init__(self, worker_id: str, manifest_json: str, pool_name: str = "expert") -> None:
        self.worker_id = worker_id
        self.manifest = Manifest.model_validate_json(manifest_json)
        self.pool_name = pool_name
        self.pool = self.manifest.pools[pool_name]  # type: ignore[index]
        self.shard_index = slot_of(worker_id)
        torch.set_num_threads(compute_threads(self.pool.num_cpus))
        self.server: Any = None
        self.experts: list[list[int]] = []
        self._started_at = time.monotonic()

    async def start(self) -> dict[str, Any]:
        if self.server is not None:
            return await self.health()
        import asyncio

        from decode_workers.exchange import ExpertServer
        from engine.experts import ExpertShard, shard_experts
        from engine.engine import DTYPES

        placement = read_expert_placement(self.manifest)
        self.experts = shard_experts(placement, self.shard_index)
        shard = await asyncio.to_thread(ExpertShard.load_from, str(self.manifest.model_dir()),
                                        DTYPES[self.manifest.model.dtype], self.experts)
        ip = current_node_ip()
        self.server = ExpertServer(shard, host=ip if not ip.startswith("127.") else "127.0.0.1")
        logger.info("expert %s (shard %d) serving %s on %s", self.worker_id, self.shard_index,
                    self.experts, self.server.address)
        return await self.health()

    async def health(self) -> dict[str, Any]:
        stats: dict[str, Any] = {"worker_id": self.worker_id, "role": self.role, "pool": self.pool_name,
                                 "ready": self.server is not None, "draining": False, "pid": os.getpid(),
                                 "node_ip": current_node_ip(), "shard": self.shard_index,
                                 "experts": self.experts}
        if self.server is not None:
            shard = self.server.shard
            stats.update({"exchange_addr": list(self.server.address), "rows": shard.rows,
                          "busy_s": shard.busy_s, "requests": self.server.requests,
                          "connections": self.server.connections,
                          "shm_connections": self.server.shm_connections,
                          "expert_rows": [[layer, e, n] for (layer, e), n in sorted(shard.load.items())]})
        return stats

    async def cluster_state(self, state: dict[str, Any]) -> None:
        pass

    async def load_experts(self, experts: list[list[int]]) -> int:
        """Live re-placement, step 1: also hold these experts (per layer); returns how
        many were loaded. Experts already held keep serving."""
        import asyncio

        from engine.engine import DTYPES

        n = await asyncio.to_thread(self.server.shard.add, str(self.manifest.model_dir()),
                                    DTYPES[self.manifest.model.dtype], experts)
        self.experts = [sorted(set(a) | set(b)) for a, b in zip(self.experts, experts)]
        return int(n)

    async def drop_experts(self, keep: list[list[int]]) -> int:
        """Live re-placement, last step: release the experts (per layer) not in keep."""
        n = self.server.shard.drop_except(keep)
        self.experts = [sorted(k) for k in keep]
        return int(n)

    async def drain(self, timeout_s: float = 60.0) -> bool:
        return True

    async def abort(self, request_id: str) -> None:
        pass
