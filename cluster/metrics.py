"""Prometheus metrics of one ingress (its own registry, so several apps can share a process).

Besides splitserve's own names, the request latencies and the engine load are also exported
under vLLM's names and label (``vllm:...{model_name="<served model>"}``), so dashboards and
alerts written for vLLM work on splitserve unchanged (deploy/grafana/splitserve.json is one):

- ``vllm:time_to_first_token_seconds``, ``vllm:e2e_request_latency_seconds``: histograms,
  per finished request; ``vllm:inter_token_latency_seconds``: per output token after the
  first, the gap since the previous token (tokens that arrive together share the gap);
- ``vllm:num_requests_running``, ``vllm:num_requests_waiting``: summed over the workers;
  ``vllm:kv_cache_usage_perc``: KV blocks held / KV blocks, over the workers (a fraction,
  0..1, as vLLM's);
- ``vllm:prompt_tokens_total``, ``vllm:generation_tokens_total``: counters of finished requests.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LAT = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


# vLLM's bucket boundaries (vllm/v1/metrics/loggers.py), so quantiles compare like for like.
_VLLM_TTFT = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
              40.0, 80.0, 160.0, 640.0, 2560.0)
_VLLM_ITL = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_VLLM_E2E = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
             960.0, 1920.0, 7680.0)


class VllmMetrics:
    """The vLLM-named series of one served model (see the module doc)."""

    def __init__(self, registry: CollectorRegistry, model_name: str) -> None:
        r, label = registry, ["model_name"]
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token in seconds", label,
                              registry=r, buckets=_VLLM_TTFT).labels(model_name)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Time between output tokens in seconds", label,
                             registry=r, buckets=_VLLM_ITL).labels(model_name)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "End-to-end request latency in seconds", label,
                             registry=r, buckets=_VLLM_E2E).labels(model_name)
        self.running = Gauge("vllm:num_requests_running", "Requests running on the workers", label,
                             registry=r).labels(model_name)
        self.waiting = Gauge("vllm:num_requests_waiting", "Requests waiting on the workers", label,
                             registry=r).labels(model_name)
        self.kv_usage = Gauge("vllm:kv_cache_usage_perc", "KV-cache usage over the workers: 1 means 100 percent",
                              label, registry=r).labels(model_name)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens of finished requests", label,
                                     registry=r).labels(model_name)
        self.generation_tokens = Counter("vllm:generation_tokens", "Generated tokens of finished requests", label,
                                         registry=r).labels(model_name)


class Metrics:
    def __init__(self, model_name: str = "") -> None:
        r = self.registry = CollectorRegistry()
        self.vllm = VllmMetrics(r, model_name)
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
        self.rejected = Counter("splitserve_admission_rejected", "Requests answered 429 at admission, by "
                                "reason (ttft: predicted to miss the TTFT target with its prompt; ttft_queue: with the queue and the "
                                "shortest recent prompt, refused before its body was parsed; inflight: "
                                "server.max_waiting_requests)", ["reason"], registry=r)
        self.bodies = Counter("splitserve_ingress_bodies_parsed", "Request bodies the ingress parsed (and "
                              "tokenized); requests refused before are not counted", registry=r)
        self.reroutes = Counter("splitserve_request_reroutes", "Requests re-sent to another worker after a "
                                "worker fault, by stage (prefill: re-sent; decode: resumed from the prompt "
                                "and the tokens so far)", ["stage"], registry=r)
        self.kv_seconds = Counter("splitserve_kv_transfer_seconds", "Seconds spent moving KV", registry=r)
        self.running = Gauge("splitserve_worker_running_requests", "Running requests", ["worker", "pool"], registry=r)
        self.waiting = Gauge("splitserve_worker_waiting_requests", "Waiting requests", ["worker", "pool"], registry=r)
        self.kv_used = Gauge("splitserve_worker_kv_blocks_used", "KV blocks held by live requests (0 when idle)",
                             ["worker", "pool"], registry=r)
        self.kv_cached = Gauge("splitserve_worker_kv_blocks_cached", "KV blocks of the prefix cache that no live "
                               "request holds (evictable; counted free)", ["worker", "pool"], registry=r)
        self.kv_held = Gauge("splitserve_worker_kv_transfers_held", "KV transfers a worker holds: parts a sender "
                             "keeps for a receiver, transfers a receiver pulled ahead of its request",
                             ["worker", "pool"], registry=r)
        self.kv_total = Gauge("splitserve_worker_kv_blocks_total", "KV blocks", ["worker", "pool"], registry=r)
        self.prompt_computed = Gauge("splitserve_worker_prompt_tokens_computed",
                                     "Prompt tokens a worker computed since it started (prefix-cache hits, "
                                     "received KV and the shared prompt of n > 1 choices are not computed)",
                                     ["worker", "pool"], registry=r)
        self.inflight = Gauge("splitserve_inflight_requests", "Requests in flight at this ingress", registry=r)
        self.codec_profile = Gauge("splitserve_worker_kv_codec_profile_measured",
                                   "1 when an adaptive prefill worker measured its KV codecs on its model at "
                                   "start-up, 0 when it plans with the built-in defaults (the measurement "
                                   "failed; see its health)", ["worker", "pool"], registry=r)
        self._labels: set[tuple[str, str]] = set()
        self._profile_labels: set[tuple[str, str]] = set()
        # Attention/expert disaggregation: live expert load (for re-placement).
        self.expert_routed = Gauge("splitserve_expert_routed_tokens", "Token choices an attention worker routed "
                                   "to each (layer, expert) since it started", ["worker", "pool", "layer", "expert"],
                                   registry=r)
        self.expert_rows = Gauge("splitserve_expert_rows", "Token rows an expert worker computed per (layer, "
                                 "expert) since it started", ["worker", "pool", "layer", "expert"], registry=r)
        self._expert_labels: set[tuple[str, str, str, str, str]] = set()
        # Pools and autoscaling (cluster/autoscale.py, decided in the controller).
        self.pool_replicas = Gauge("splitserve_pool_replicas", "Live workers per pool (healthy, not draining)",
                                   ["pool"], registry=r)
        self.autoscale_target = Gauge("splitserve_autoscale_target_replicas", "The autoscaler's target size "
                                      "of each autoscaled pool", ["pool"], registry=r)
        self.autoscale_decisions = Counter("splitserve_autoscale_decisions", "Autoscaler decisions by pool and "
                                           "action (up, down, hold)", ["pool", "action"], registry=r)
        self.autoscale_unfulfilled = Counter("splitserve_autoscale_unfulfilled", "Scale-ups the cluster could not "
                                             "place (no node came up in time); the pool keeps serving at its size",
                                             ["pool"], registry=r)
        self.autoscale_short = Gauge("splitserve_autoscale_short_replicas", "Replicas the last scale-up of a pool "
                                     "could not place", ["pool"], registry=r)
        self._autoscale_seen: dict[tuple[str, str], int] = {}

    def update_workers(self, pools: dict[str, list[dict[str, Any]]]) -> None:
        seen: set[tuple[str, str]] = set()
        profiled: set[tuple[str, str]] = set()
        for pool, workers in pools.items():
            for w in workers:
                s, key = w.get("stats") or {}, (w["worker_id"], pool)
                seen.add(key)
                self.running.labels(*key).set(s.get("running", 0))
                self.waiting.labels(*key).set(s.get("waiting", 0))
                total = s.get("kv_blocks_total", 0)
                self.kv_total.labels(*key).set(total)
                self.kv_used.labels(*key).set(total - s.get("kv_blocks_free", total))
                self.kv_cached.labels(*key).set(s.get("kv_blocks_cached", 0))
                self.kv_held.labels(*key).set(s.get("kv_transfers_held", 0))
                if s.get("kv_codec_profile") is not None:
                    profiled.add(key)
                    self.codec_profile.labels(*key).set(1 if s["kv_codec_profile"] == "measured" else 0)
                self.prompt_computed.labels(*key).set(s.get("prompt_tokens_computed", 0))
        for key in self._labels - seen:
            for g in (self.running, self.waiting, self.kv_used, self.kv_cached, self.kv_held, self.kv_total,
                      self.prompt_computed):
                g.remove(*key)
        for pool, pool_workers in pools.items():
            self.pool_replicas.labels(pool).set(sum(1 for w in pool_workers if w.get("healthy")
                                                    and not (w.get("stats") or {}).get("draining")))
        workers = [w.get("stats") or {} for ws in pools.values() for w in ws]
        self.vllm.running.set(sum(s.get("running", 0) for s in workers))
        self.vllm.waiting.set(sum(s.get("waiting", 0) for s in workers))
        total = sum(s.get("kv_blocks_total", 0) for s in workers)
        free = sum(s.get("kv_blocks_free", s.get("kv_blocks_total", 0)) for s in workers)
        self.vllm.kv_usage.set((total - free) / total if total else 0.0)
        for key in self._profile_labels - profiled:
            self.codec_profile.remove(*key)
        self._labels, self._profile_labels = seen, profiled
        expert_seen: set[tuple[str, str, str, str, str]] = set()
        for pool, pool_workers in pools.items():
            for w in pool_workers:
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

    def update_autoscale(self, autoscale: dict[str, dict[str, Any]]) -> None:
        """The controller's autoscaling record: counters advance by what changed since the
        last snapshot this ingress saw."""
        for pool, a in autoscale.items():
            self.autoscale_target.labels(pool).set(a.get("target", 0))
            self.autoscale_short.labels(pool).set(a.get("short_by", 0))
            counts = {**{f"decision:{k}": v for k, v in (a.get("decisions") or {}).items()},
                      "unfulfilled": a.get("unfulfilled", 0)}
            for what, n in counts.items():
                key = (pool, what)
                delta = n - self._autoscale_seen.get(key, 0)
                if delta > 0:
                    if what == "unfulfilled":
                        self.autoscale_unfulfilled.labels(pool).inc(delta)
                    else:
                        self.autoscale_decisions.labels(pool, what.split(":", 1)[1]).inc(delta)
                self._autoscale_seen[key] = n

    def token_gap(self, seconds: float, tokens: int) -> None:
        """``tokens`` output tokens (not the first) arrived ``seconds`` after the previous ones."""
        for _ in range(tokens):
            self.vllm.itl.observe(seconds / tokens)

    def request_done(self, ttft_s: float | None, e2e_s: float, prompt_tokens: int, output_tokens: int) -> None:
        """A request that finished well: the vLLM-named latencies and token counters."""
        self.vllm.e2e.observe(e2e_s)
        if ttft_s is not None:
            self.vllm.ttft.observe(ttft_s)
        self.vllm.prompt_tokens.inc(prompt_tokens)
        self.vllm.generation_tokens.inc(output_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)
