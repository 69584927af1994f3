"""Prometheus metrics of one ingress (its own registry, so several apps can share a process)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LAT = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.ttft = Histogram("splitserve_ttft_seconds", "Time to first token", registry=r, buckets=_LAT)
        self.tpot = Histogram("splitserve_tpot_seconds", "Mean time per output token after the first",
                              registry=r, buckets=_LAT)
        self.e2e = Histogram("splitserve_e2e_seconds", "End-to-end request latency", registry=r, buckets=_LAT)
        self.queue = Histogram("splitserve_queue_seconds", "Time waiting in the prefill queue",
                               registry=r, buckets=_LAT)
        self.prefill = Histogram("splitserve_prefill_seconds", "Prefill compute time", registry=r,
                                 buckets=_LAT)
        self.requests = Counter("splitserve_requests", "Requests by outcome", ["outcome"], registry=r)
        self.tokens = Counter("splitserve_generated_tokens", "Tokens generated", registry=r)
        self.kv_bytes = Counter("splitserve_kv_transfer_bytes", "KV bytes moved prefill->decode", registry=r)
        self.kv_raw_bytes = Counter("splitserve_kv_transfer_raw_bytes", "KV bytes before encoding", registry=r)
        self.kv_transfers = Counter("splitserve_kv_transfers", "KV transfers by transport", ["transport"],
                                    registry=r)
        self.kv_chunks = Counter("splitserve_kv_transfer_chunks", "KV chunks sent across nodes, by codec "
                                 "(cachegen:LEVEL; recompute: left to the decode worker)", ["codec"], registry=r)
        self.kv_refetches = Counter("splitserve_kv_transfer_refetches", "KV streams fetched again after a "
                                    "failure (bad checksum, cut)", registry=r)
        self.kv_seconds = Counter("splitserve_kv_transfer_seconds", "Seconds spent moving KV", registry=r)
        self.running = Gauge("splitserve_worker_running_requests", "Running requests", ["worker", "pool"], registry=r)
        self.waiting = Gauge("splitserve_worker_waiting_requests", "Waiting requests", ["worker", "pool"], registry=r)
        self.kv_used = Gauge("splitserve_worker_kv_blocks_used", "KV blocks in use", ["worker", "pool"], registry=r)
        self.kv_total = Gauge("splitserve_worker_kv_blocks_total", "KV blocks", ["worker", "pool"], registry=r)
        self.inflight = Gauge("splitserve_inflight_requests", "Requests in flight at this ingress", registry=r)
        self._labels: set[tuple[str, str]] = set()
        # Attention/expert disaggregation: live expert load (for re-placement).
        self.expert_routed = Gauge("splitserve_expert_routed_tokens", "Token choices an attention worker routed "
                                   "to each (layer, expert) since it started", ["worker", "pool", "layer", "expert"],
                                   registry=r)
        self.expert_rows = Gauge("splitserve_expert_rows", "Token rows an expert worker computed per (layer, "
                                 "expert) since it started", ["worker", "pool", "layer", "expert"], registry=r)
        self._expert_labels: set[tuple[str, str, str, str, str]] = set()

    def update_workers(self, pools: dict[str, list[dict[str, Any]]]) -> None:
        seen: set[tuple[str, str]] = set()
        for pool, workers in pools.items():
            for w in workers:
                s, key = w.get("stats") or {}, (w["worker_id"], pool)
                seen.add(key)
                self.running.labels(*key).set(s.get("running", 0))
                self.waiting.labels(*key).set(s.get("waiting", 0))
                total = s.get("kv_blocks_total", 0)
                self.kv_total.labels(*key).set(total)
                self.kv_used.labels(*key).set(total - s.get("kv_blocks_free", total))
        for key in self._labels - seen:
            for g in (self.running, self.waiting, self.kv_used, self.kv_total):
                g.remove(*key)
        self._labels = seen
        expert_seen: set[tuple[str, str, str, str, str]] = set()
        for pool, workers in pools.items():
            for w in workers:
                s = w.get("stats") or {}
                for layer, counts in enumerate(s.get("expert_load") or []):
                    for e, n in enumerate(counts):
                        key5 = ("routed", w["worker_id"], pool, str(layer), str(e))
                        self.expert_routed.labels(*key5[1:]).set(n)
                        expert_seen.add(key5)
                for layer, e, n in s.get("expert_rows") or []:
                    key5 = ("rows", w["worker_id"], pool, str(layer), str(e))
                    self.expert_rows.labels(*key5[1:]).set(n)
                    expert_seen.add(key5)
        for key5 in self._expert_labels - expert_seen:
            (self.expert_routed if key5[0] == "routed" else self.expert_rows).remove(*key5[1:])
        self._expert_labels = expert_seen

    def render(self) -> bytes:
        return generate_latest(self.registry)
