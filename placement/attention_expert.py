"""Attention/expert disaggregated MoE decode for the layout search (MegaScale-Infer, Zhu et
al. 2025): which attention:expert worker counts fit a node and their memory, their roofline
coefficients per layer and micro-batch (``AttentionExpert``, below, times the
ping-pong), the KV they hold and the rate they sustain."""

from __future__ import annotations

from dataclasses import dataclass

from placement.catalogue import GPU, ModelShape
from placement.latency import ALLREDUCE_LATENCY_S, Coeffs

# Fixed cost of one kernel sequence (a layer's attention or its experts on one GPU) and of
# one hop between the attention and expert pools, seconds: the same order as one small
# all-reduce (placement.latency).
AE_LAUNCH_S = ALLREDUCE_LATENCY_S
AE_HOP_S = ALLREDUCE_LATENCY_S


@dataclass(frozen=True)
class AttentionExpert:
    """MoE decode disaggregated into attention and expert workers (MegaScale-Infer,
    Zhu et al. 2025). Per layer, a micro-batch runs attention on the attention pool (each
    of the ``n_attention`` workers holds its share of the sequences and their KV), its
    routed hidden states go to the expert pool (``top_k`` experts per token, spread over
    ``n_expert`` workers), and back. With ``micro_batches`` m >= 2 the pools ping-pong:
    one works on micro-batch j while the other works on j - 1, so a step costs about
    m * layers * max(T_a, T_e) plus one fill, instead of layers * (T_a + T_e + 2 T_c).

    Coefficients are per layer and per micro-batch:
    attention: a + b * context tokens + c * sequences (on one attention worker);
    expert:    a + b * routed tokens + c * routed tokens^2 (on one expert worker; c is
               usually 0);
    comm:      a + b * tokens (one hop between the pools, either way).
    """

    attention: Coeffs
    expert: Coeffs
    comm: Coeffs
    layers: int
    top_k: int = 2
    n_attention: int = 1
    n_expert: int = 1
    micro_batches: int = 2
    # Cores the attention and expert workers share, None: each has its own device. With
    # fewer cores than workers (this machine: 1 attention + 2 expert processes on 2 cores)
    # the pools cannot overlap freely: a step takes at least all their work / cores.
    cores: float | None = None

    def parts(self, batch: int) -> int:
        """Micro-batches a step of ``batch`` sequences runs in: the batch splits between
        sequences, so never more parts than sequences (batch 1 runs in lock-step)."""
        return max(1, min(self.micro_batches, int(batch)))

    def stage_times(self, batch: int, total_context: int) -> tuple[float, float, float]:
        """(T_a, T_e, T_c): one micro-batch through one layer on each pool, and one hop."""
        m, na = self.parts(batch), max(1, self.n_attention)
        seqs = batch / (na * m)
        ctx = total_context / (na * m)
        ta = self.attention.a + self.attention.b * ctx + self.attention.c * seqs
        routed = batch / m * self.top_k / max(1, self.n_expert)
        te = self.expert.a + self.expert.b * routed + self.expert.c * routed * routed
        tc = self.comm.a + self.comm.b * batch / m
        return ta, te, tc

    def step_s(self, batch: int, total_context: int) -> float:
        """One decode step of the whole batch: the micro-batches' ping-pong simulated as
        two FIFO servers (the pools) with the hops as delays between them."""
        if batch <= 0:
            return 0.0
        ta, te, tc = self.stage_times(batch, total_context)
        m = self.parts(batch)
        step = pingpong_s(ta, te, tc, self.layers, m)
        if self.cores is not None and self.cores < max(1, self.n_attention) + max(1, self.n_expert):
            # Shared cores: every worker's work (hops counted on both sides) over the cores.
            work = m * self.layers * (max(1, self.n_attention) * ta + max(1, self.n_expert) * te + 2 * tc)
            step = max(step, work / self.cores)
        return step

    def closed_form_s(self, batch: int, total_context: int) -> float:
        """MegaScale-Infer's estimate when the pools overlap: (T_a + T_e + 2 T_c) +
        max(T_a, T_e) * (m * layers - 1)."""
        ta, te, tc = self.stage_times(batch, total_context)
        m = self.parts(batch)
        return (ta + te + 2 * tc) + max(ta, te) * (m * self.layers - 1)


def pingpong_s(ta: float, te: float, tc: float, layers: int, m: int) -> float:
    """Makespan of m micro-batches, each through ``layers`` x (attention ta, hop tc,
    experts te, hop tc), where the attention pool and the expert pool each serve one
    micro-batch at a time, in the order they become ready."""
    import heapq

    heap: list[tuple[float, int, int, int]] = [(0.0, j, 0, 0) for j in range(m)]  # (ready, mb, layer, pool)
    free = [0.0, 0.0]
    end_all = 0.0
    while heap:
        ready, j, layer, pool = heapq.heappop(heap)
        start = max(ready, free[pool])
        end = start + (ta if pool == 0 else te)
        free[pool] = end
        if pool == 0:
            heapq.heappush(heap, (end + tc, j, layer, 1))
        elif layer + 1 < layers:
            heapq.heappush(heap, (end + tc, j, layer + 1, 0))
        else:
            end_all = max(end_all, end + tc)
    return end_all


def ae_roofline(model: ModelShape, gpu: GPU, n_attention: int, n_expert: int,
                     micro_batches: int = 2) -> AttentionExpert:
    """Roofline coefficients of attention/expert disaggregated MoE decode (MegaScale-Infer,
    Zhu et al. 2025), per layer and micro-batch: an attention worker reads its layer's
    attention weights once (a), each context token's KV (b) and computes the projections
    per sequence (c); an expert worker reads its local experts' weights (a) and computes
    each routed token (b); a hop carries top_k copies of each token's hidden state over
    the node's link. The LM head and embeddings are left out (one per step, small)."""
    bw = gpu.mem_bw_gbps * 1e9 * (gpu.mbu or 0.6)
    fl = gpu.peak_tflops * 1e12 * (gpu.mfu or 0.5)
    p = model.bytes_per_param
    kv_layer = model.kv_bytes_per_token / model.num_layers
    attention = Coeffs(AE_LAUNCH_S + model.attn_params_per_layer * p / bw, kv_layer / bw,
                       2 * model.attn_params_per_layer / fl)
    local = -(-max(1, model.num_experts) // n_expert)
    expert = Coeffs(AE_LAUNCH_S + local * model.ffn_params_per_expert * p / bw,
                    2 * model.ffn_params_per_expert / fl, 0.0)
    comm = Coeffs(AE_HOP_S, model.hidden * p * max(1, model.top_k) / (gpu.intra_node_gbps * 1e9), 0.0)
    return AttentionExpert(attention, expert, comm, model.num_layers, max(1, model.top_k), n_attention,
                           n_expert, micro_batches)


def ae_kv_capacity_tokens(model: ModelShape, gpu: GPU, n_attention: int) -> int:
    """KV the attention workers hold beside all layers' attention weights and embeddings."""
    dense = (model.num_layers * model.attn_params_per_layer + 2 * model.vocab * model.hidden) * model.bytes_per_param
    free = gpu.mem_gib * (1 << 30) * 0.9 - dense
    return max(0, int(n_attention * free / model.kv_bytes_per_token))


def ae_options(model: ModelShape, gpu: GPU, max_gpus: int, min_kv_tokens: int) -> list[tuple[str, int, int]]:
    """("ae", attention workers, expert workers) that fit in one node and in memory."""
    if not model.num_experts:
        return []
    expert_bytes = model.num_layers * model.ffn_params_per_expert * model.bytes_per_param
    out = []
    for na in (1, 2, 4, 8):
        for ne in (1, 2, 4, 8, 16):
            if na + ne > min(gpu.gpus_per_node, max_gpus) or ne > model.num_experts:
                continue
            if -(-model.num_experts // ne) * expert_bytes > gpu.mem_gib * (1 << 30) * 0.9:
                continue
            if ae_kv_capacity_tokens(model, gpu, na) < min_kv_tokens:
                continue
            out.append(("ae", na, ne))
    return out


def ae_capacity(ae: AttentionExpert, kv_tokens: int, p: float, o: float, max_num_seqs: int) -> float:
    """Requests/s an attention/expert decode instance sustains at its largest batch (mean
    prompt p and output o tokens), by Little's law."""
    batch = max(1.0, min(max_num_seqs, kv_tokens / (p + o)))
    return batch / (ae.step_s(int(batch), int(batch * (p + o / 2))) * o)


def ae_fit(samples: list[tuple[int, int, float, float, float]], layers: int, top_k: int, n_attention: int,
           n_expert: int, micro_batches: int = 2, cores: float | None = None) -> AttentionExpert:
    """AttentionExpert coefficients fitted to measured lock-step (1 micro-batch) decode
    steps of this machine: ``samples`` = (batch, total context tokens, attention side's
    seconds, slowest expert worker's seconds, exchange seconds) per step. Per layer:
    attention a + c * sequences (+ b * context when the contexts vary independently of
    the batch), experts a + b * routed tokens, one hop a + b * tokens (two hops a layer);
    non-negative least squares."""
    import numpy as np

    from placement.latency import _nnls2

    b = np.array([float(s[0]) for s in samples])
    ctx = np.array([float(s[1]) for s in samples])
    att = np.array([s[2] for s in samples]) / (layers * max(1, n_attention))
    exp = np.array([s[3] for s in samples]) / layers
    hop = np.array([s[4] for s in samples]) / (2 * layers)
    one = np.ones_like(b)
    seqs = b / max(1, n_attention)
    a_a, c_a = _nnls2(np.stack([one, seqs], axis=1), att)
    b_a = 0.0
    if len(samples) >= 3 and np.linalg.matrix_rank(np.stack([one, seqs, ctx], axis=1)) == 3:
        a_a, b_a, c_a = _nnls2(np.stack([one, ctx / max(1, n_attention), seqs], axis=1), att)
    routed = b * max(1, top_k) / max(1, n_expert)
    a_e, b_e = _nnls2(np.stack([one, routed], axis=1), exp)
    a_c, b_c = _nnls2(np.stack([one, b], axis=1), hop)
    return AttentionExpert(Coeffs(float(a_a), float(b_a), float(c_a)), Coeffs(float(a_e), float(b_e), 0.0),
                           Coeffs(float(a_c), float(b_c), 0.0), layers, max(1, top_k), n_attention, n_expert,
                           micro_batches, cores)
