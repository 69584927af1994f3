"""Attention/expert disaggregated MoE decode for the layout search (MegaScale-Infer, Zhu et
al. 2025): which attention:expert worker counts fit a node and their memory, their roofline
coefficients per layer and micro-batch (``placement.latency.AttentionExpert`` simulates the
ping-pong), the KV they hold and the rate they sustain."""

from __future__ import annotations

from placement.catalogue import GPU, ModelShape
from placement.latency import ALLREDUCE_LATENCY_S, AttentionExpert, Coeffs

# Fixed cost of one kernel sequence (a layer's attention or its experts on one GPU) and of
# one hop between the attention and expert pools, seconds: the same order as one small
# all-reduce (placement.latency).
AE_LAUNCH_S = ALLREDUCE_LATENCY_S
AE_HOP_S = ALLREDUCE_LATENCY_S


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
