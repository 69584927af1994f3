"""Discrete-event simulator of a serving cluster, to score layouts without running them.

It models what the workers do: prefill instances batch prompts FCFS under a token budget
(chunking long ones); each finished prompt's KV crosses a link (FIFO per node pair, so
transfers contend) to a decode instance, which admits by free KV memory and runs
continuous batching; colocated instances mix decode tokens and prefill chunks in one
step (chunked prefill). Step times come from ``placement.latency.LatencyModel``.

Pipeline parallelism (``Instance(pp=...)``, opt-in) runs as concurrent stages: a step's batch
moves through the stages one after another, and the instance starts its next batch as soon
as the first stage is free, so up to pp batches are in flight; a decoding sequence is in at
most one of them (its next token needs the last), a prompt's next chunk may follow its
previous one a stage behind. Attention/expert disaggregated MoE decode (kind
"ae_decode") takes its step time from ``placement.latency.AttentionExpert``: micro-batches
ping-pong between the attention and expert pools.

The served system's costs around the engine (``placement.latency.Overheads``) are
explicit terms of ``ClusterSpec``: per request before the first worker, per prompt token,
before a disaggregated decode starts, per streaming step and per streamed token, per
prompt token and per finished prompt inside the prefilling worker. ``ClusterSpec.cores``
makes instances that share a machine's cores slow each other down.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from placement.attention_expert import AttentionExpert
from placement.latency import LatencyModel


@dataclass
class SimRequest:
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    # Filled by the simulation.
    first_token_s: float = float("nan")
    finish_s: float = float("nan")
    prefilled: int = 0
    generated: int = 0
    # Prompt tokens handed to a (pipelined) step, done or not.
    scheduled: int = 0

    @property
    def ttft_s(self) -> float:
        return self.first_token_s - self.arrival_s

    @property
    def tpot_s(self) -> float:
        if self.output_tokens <= 1:
            return 0.0
        return (self.finish_s - self.first_token_s) / (self.output_tokens - 1)


DECODE_KINDS = ("decode", "ae_decode")


@dataclass
class Instance:
    kind: str  # "prefill" | "decode" | "colocated" | "ae_decode"
    model: LatencyModel
    node: int = 0
    max_batched_tokens: int = 512
    max_num_seqs: int = 64
    kv_capacity_tokens: int = 1 << 30
    # Colocated only. False: prefill chunks ride along with the decodes in one step under
    # max_batched_tokens (chunked prefill, Sarathi-Serve). True: vLLM <= 0.3's scheduler,
    # which DistServe measured against: while prompts wait to be prefilled, a step runs
    # only prompts (whole, up to max_batched_tokens) and every decode waits for it.
    prefill_first: bool = False
    # State.
    queue: deque[SimRequest] = field(default_factory=deque)
    running: list[SimRequest] = field(default_factory=list)
    busy: bool = False
    kv_used: int = 0
    # Work owed to requests received since the last step (decode_admit_overhead_s).
    pending_s: float = 0.0
    # Pipeline stages run concurrently, each taking 1/pp of a step's time (opt-in: None
    # keeps the older behaviour, one step at a time whatever the latency model's pp).
    pp: int | None = None
    # kind "ae_decode": the attention/expert pools and their ping-pong.
    ae: AttentionExpert | None = None
    # Pipeline state: when each stage is next free; sequences in a step in flight.
    stage_free: list[float] = field(default_factory=list)
    inflight: set[int] = field(default_factory=set)
    # Seconds of steps run so far (all stages of a step count once), for utilisation.
    busy_s: float = 0.0

    @property
    def stages(self) -> int:
        return max(1, self.pp or 1)

    def load(self) -> float:
        if self.kind == "prefill":
            return sum(r.prompt_tokens - r.prefilled for r in self.queue) + (1e-3 if self.busy else 0)
        return len(self.running) + len(self.queue) + self.kv_used / max(1, self.kv_capacity_tokens)


@dataclass
class ClusterSpec:
    instances: list[Instance]
    kv_bytes_per_token: float = 0.0
    codec_ratio: float = 1.0
    # Link bandwidth (bytes/s) from node a to node b; same node is the local copy speed.
    link_bps: Callable[[int, int], float] = lambda a, b: 1e10 if a == b else 1.25e9
    # Fixed per-request overhead before prefill (HTTP, tokenize, routing, RPC) and per
    # decode step (streaming back), seconds: fitted from measurement on real runs.
    request_overhead_s: float = 0.0
    token_overhead_s: float = 0.0
    # More of the same (placement.latency.Overheads): per prompt token before the first
    # token; a disaggregated request's decode start beyond the KV's link time; per token
    # streamed (each decoding sequence of a step).
    prompt_token_overhead_s: float = 0.0
    decode_start_overhead_s: float = 0.0
    stream_overhead_s: float = 0.0
    # Inside the prefilling worker, added to its steps: per prompt token computed, per
    # prompt finished (KV export and hand-off).
    prefill_token_overhead_s: float = 0.0
    prefill_done_overhead_s: float = 0.0
    # Inside the decode worker, per disaggregated request it receives (taking the KV in and
    # importing it into its cache): added to its next step, so the sequences already
    # decoding wait for it, not only the newcomer (decode_start_overhead_s).
    decode_admit_overhead_s: float = 0.0
    # Cores the instances share (None: each has its own, as GPUs do). A step that starts
    # while k instances (itself included) are busy runs max(1, k / cores) times longer:
    # workers of one CPU machine, or of GPUs whose host threads are oversubscribed.
    cores: float | None = None
    # With cores: cores' worth of other work on the same cores the whole time (the ingress,
    # the load generator, Ray's own processes: their CPU per request times the rate). It
    # counts as busy instances do: a step starting while k instances are busy runs
    # max(1, (k + host_cores) / cores) times longer.
    host_cores: float = 0.0
    # Instead of cores, per instance kind: a step that starts while any other instance is
    # busy runs this many times longer (measured on the served system: a long prefill step
    # loses more to a busy neighbour than a short decode step does).
    shared_slowdown: dict[str, float] | None = None


class Simulation:
    def __init__(self, spec: ClusterSpec) -> None:
        self.spec = spec
        self.now = 0.0
        self._events: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._link_free: dict[tuple[int, int], float] = {}
        self.prefill = [i for i in spec.instances if i.kind == "prefill"]
        self.decode = [i for i in spec.instances if i.kind in DECODE_KINDS]
        self.colocated = [i for i in spec.instances if i.kind == "colocated"]
        if not self.colocated and not (self.prefill and self.decode):
            raise ValueError("a layout needs colocated instances, or prefill and decode instances")

    def at(self, t: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self._events, (t, next(self._seq), fn))

    def run(self, requests: list[SimRequest]) -> list[SimRequest]:
        for r in requests:
            delay = self.spec.request_overhead_s + self.spec.prompt_token_overhead_s * r.prompt_tokens
            self.at(r.arrival_s + delay, lambda r=r: self._arrive(r))
        while self._events:
            t, _, fn = heapq.heappop(self._events)
            self.now = t
            fn()
        return requests

    # -- routing ----------------------------------------------------------------------
    def _arrive(self, r: SimRequest) -> None:
        if self.colocated:
            inst = min(self.colocated, key=Instance.load)
        else:
            inst = min(self.prefill, key=Instance.load)
        inst.queue.append(r)
        self._kick(inst)

    def _kick(self, inst: Instance) -> None:
        if inst.busy:
            return
        if inst.kind == "prefill":
            self._prefill_step(inst)
        else:
            self._decode_step(inst)

    # -- prefill ----------------------------------------------------------------------
    def _step(self, inst: Instance, t: float, done: Callable[[], None]) -> None:
        """Occupy inst for a step of t seconds (all stages), then call done. With pp
        stages the step moves through them in turn (t / pp each, FIFO behind earlier
        steps) and the instance is free for its next step once stage 0 is."""
        pp = inst.stages
        inst.busy = True
        if self.spec.shared_slowdown:
            if any(i.busy for i in self.spec.instances if i is not inst):
                t *= self.spec.shared_slowdown.get(inst.kind, 1.0)
        elif self.spec.cores:
            k = sum(1 for i in self.spec.instances if i.busy)
            t *= max(1.0, (k + self.spec.host_cores) / self.spec.cores)
        inst.busy_s += t
        if pp == 1:
            def fin() -> None:
                inst.busy = False
                done()
                self._kick(inst)

            self.at(self.now + t, fin)
            return
        if len(inst.stage_free) != pp:
            inst.stage_free = [0.0] * pp
        s = t / pp
        end = self.now
        ends = []
        for i in range(pp):
            end = max(end, inst.stage_free[i]) + s
            inst.stage_free[i] = end
            ends.append(end)

        def first_free() -> None:
            inst.busy = False
            self._kick(inst)

        def fin() -> None:
            done()
            self._kick(inst)

        self.at(ends[0], first_free)
        self.at(ends[-1], fin)

    def _prefill_overhead(self, chunks: list[tuple[SimRequest, int, int]]) -> float:
        tokens = sum(n for _, n, _ in chunks)
        done = sum(1 for r, n, c in chunks if c + n >= r.prompt_tokens)
        return self.spec.prefill_token_overhead_s * tokens + self.spec.prefill_done_overhead_s * done

    def _prefill_step(self, inst: Instance) -> None:
        budget = inst.max_batched_tokens
        chunks: list[tuple[SimRequest, int, int]] = []  # (request, tokens, context before)
        for r in inst.queue:
            if budget <= 0:
                break
            n = min(r.prompt_tokens - r.scheduled, budget)
            if n <= 0:
                continue  # last chunk in flight (pipelined)
            chunks.append((r, n, r.scheduled))
            budget -= n
        if not chunks:
            return
        t = inst.model.mixed_s([n for _, n, _ in chunks], [c for _, _, c in chunks], 0, 0)
        t += self._prefill_overhead(chunks)
        for r, n, _ in chunks:
            r.scheduled += n

        def done() -> None:
            for r, n, _ in chunks:
                r.prefilled += n
                if r.prefilled >= r.prompt_tokens:
                    inst.queue.remove(r)
                    r.first_token_s = self.now
                    r.generated = 1
                    if r.output_tokens <= 1:
                        r.finish_s = self.now
                    else:
                        self._transfer(inst, r)

        self._step(inst, t, done)

    def _transfer(self, src: Instance, r: SimRequest) -> None:
        dst = min(self.decode, key=lambda d: (d.node != src.node, d.load()))
        nbytes = r.prompt_tokens * self.spec.kv_bytes_per_token * self.spec.codec_ratio
        key = (src.node, dst.node)
        start = max(self.now, self._link_free.get(key, 0.0))
        end = start + nbytes / self.spec.link_bps(src.node, dst.node)
        self._link_free[key] = end

        def landed() -> None:
            dst.queue.append(r)
            dst.pending_s += self.spec.decode_admit_overhead_s
            self._kick(dst)

        self.at(end + self.spec.decode_start_overhead_s, landed)

    # -- decode / colocated -----------------------------------------------------------
    def _admit(self, inst: Instance) -> None:
        while inst.queue and len(inst.running) < inst.max_num_seqs:
            r = inst.queue[0]
            need = r.prompt_tokens + r.output_tokens
            if inst.kv_used + need > inst.kv_capacity_tokens and inst.running:
                break
            inst.queue.popleft()
            inst.kv_used += need
            inst.running.append(r)

    def _decode_step(self, inst: Instance) -> None:
        self._admit(inst)
        if not inst.running:
            return
        decoding = [r for r in inst.running
                     if r.prefilled >= r.prompt_tokens and id(r) not in inst.inflight]
        if inst.stages > 1:
            # Micro-batches (vLLM's virtual engines): about 1/pp of the running sequences
            # per step, so that every stage has a batch to work on.
            decoding = decoding[:max(1, -(-len(inst.running) // inst.stages))]
        prefilling = [r for r in inst.running if r.scheduled < r.prompt_tokens]
        if inst.prefill_first and prefilling:
            decoding = []
        budget = inst.max_batched_tokens - len(decoding)
        chunks: list[tuple[SimRequest, int, int]] = []
        for r in prefilling:
            if budget <= 0:
                break
            n = min(r.prompt_tokens - r.scheduled, budget)
            chunks.append((r, n, r.scheduled))
            budget -= n
        if not decoding and not chunks:
            return  # everything runnable is in flight (pipelined)
        ctx = sum(r.prompt_tokens + r.generated for r in decoding)
        if inst.ae is not None and not chunks:
            t = inst.ae.step_s(len(decoding), ctx)
        else:
            t = inst.model.mixed_s([n for _, n, _ in chunks], [c for _, _, c in chunks], len(decoding), ctx)
        if decoding:
            t += self.spec.token_overhead_s + self.spec.stream_overhead_s * len(decoding)
        t += self._prefill_overhead(chunks) + inst.pending_s
        inst.pending_s = 0.0
        for r, n, _ in chunks:
            r.scheduled += n
        for r in decoding:
            inst.inflight.add(id(r))

        def done() -> None:
            for r in decoding:
                r.generated += 1
                inst.inflight.discard(id(r))
            for r, n, _ in chunks:
                r.prefilled += n
                if r.prefilled >= r.prompt_tokens:
                    r.first_token_s = self.now
                    r.generated = 1
            for r in list(inst.running):
                if (r.prefilled >= r.prompt_tokens and r.generated >= r.output_tokens
                        and id(r) not in inst.inflight):
                    r.finish_s = self.now
                    inst.running.remove(r)
                    inst.kv_used -= r.prompt_tokens + r.output_tokens

        self._step(inst, t, done)


def poisson_requests(rate: float, n: int, prompt_tokens: Callable[[np.random.Generator], int],
                     output_tokens: Callable[[np.random.Generator], int], seed: int = 0) -> list[SimRequest]:
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0 / rate, size=n)
    t = np.cumsum(gaps) - gaps[0]
    return [SimRequest(float(t[i]), prompt_tokens(rng), output_tokens(rng)) for i in range(n)]


def attainment(reqs: list[SimRequest], ttft_s: float, tpot_s: float) -> float:
    ok = sum(1 for r in reqs if r.ttft_s <= ttft_s and r.tpot_s <= tpot_s)
    return ok / max(1, len(reqs))


def max_goodput_rate(make_spec: Callable[[], ClusterSpec], make_requests: Callable[[float], list[SimRequest]],
                     ttft_s: float, tpot_s: float, target: float = 0.9, hi: float = 1.0,
                     iters: int = 12) -> float:
    """Highest request rate whose SLO attainment stays >= target (DistServe's goodput),
    by doubling then bisection. Returns 0 when even a trickle misses the SLO."""
    def ok(rate: float) -> bool:
        reqs = Simulation(make_spec()).run(make_requests(rate))
        return attainment(reqs, ttft_s, tpot_s) >= target

    lo = 0.0
    if not ok(hi * 1e-3):
        return 0.0
    while ok(hi) and hi < 1e6:
        lo, hi = hi, hi * 2
    for _ in range(iters):
        mid = (lo + hi) / 2
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return lo
