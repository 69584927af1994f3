"""Latency model of one instance (a TP group, possibly pipelined), in DistServe's form
(Zhong et al., OSDI 2024, section 4.1 / appendix A):

    prefill batch time = a + b * sum(l) + c * sum(l^2)         (l: prompt lengths)
    decode step time   = a + b * sum(context) + c * batch

Coefficients come from profiling this machine (``fit``) or from a roofline of the
catalogue's GPU. Tensor parallelism divides compute and memory traffic and adds two
all-reduces per layer; pipeline parallelism divides the per-stage time and adds a
point-to-point hop per stage. The KV-transfer term DistServe leaves out is ``kv_transfer_s``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from placement.catalogue import GPU, ModelShape

# Achieved fractions of peak (typical of well-tuned kernels: DistServe and vLLM reports
# show 40-60% MFU in prefill and 60-80% of HBM bandwidth in decode).
MFU = 0.5
MBU = 0.7
# Per-collective latency (NCCL all-reduce on NVLink, small messages), seconds.
ALLREDUCE_LATENCY_S = 10e-6


@dataclass(frozen=True)
class Coeffs:
    a: float
    b: float
    c: float

    def as_tuple(self) -> tuple[float, float, float]:
        return (self.a, self.b, self.c)


@dataclass(frozen=True)
class LatencyModel:
    prefill: Coeffs
    decode: Coeffs
    # Pipeline stages: the per-stage time is what limits throughput.
    pp: int = 1

    def prefill_s(self, lens: list[int] | np.ndarray) -> float:
        arr = np.asarray(lens, dtype=np.float64)
        p = self.prefill
        return p.a + p.b * arr.sum() + p.c * (arr * arr).sum()

    def decode_s(self, batch: int, total_context: int) -> float:
        d = self.decode
        return d.a + d.b * total_context + d.c * batch

    def mixed_s(self, prefill_lens: list[int], prefill_ctx: list[int], batch: int, total_context: int) -> float:
        """A colocated step: prefill chunks (with their earlier context) beside decodes."""
        if not prefill_lens:
            return self.decode_s(batch, total_context)
        p = self.prefill
        chunk = np.asarray(prefill_lens, dtype=np.float64)
        ctx = np.asarray(prefill_ctx, dtype=np.float64)
        t = p.a + p.b * chunk.sum() + p.c * (chunk * (chunk + 2 * ctx)).sum()
        if batch:
            t += self.decode.b * total_context + self.decode.c * batch
        return t

    def stage_s(self, t: float) -> float:
        return t / self.pp


def roofline(model: ModelShape, gpu: GPU, tp: int = 1, pp: int = 1, mfu: float = MFU,
             mbu: float = MBU) -> LatencyModel:
    """Coefficients from first principles for a GPU type (whole-model time; divide by pp
    for a stage). TP all-reduce uses the intra-node link, PP hops the same link."""
    flops = gpu.peak_tflops * 1e12 * mfu * tp
    bw = gpu.mem_bw_gbps * 1e9 * mbu * tp
    link = gpu.intra_node_gbps * 1e9
    act_bytes = model.hidden * model.bytes_per_param
    # Ring all-reduce moves 2(tp-1)/tp of the message; two per layer (attention, MLP).
    ar_per_token = 0.0 if tp == 1 else 2 * model.num_layers * 2 * (tp - 1) / tp * act_bytes / link
    ar_fixed = 0.0 if tp == 1 else 2 * model.num_layers * ALLREDUCE_LATENCY_S
    pp_hop = (pp - 1) * ALLREDUCE_LATENCY_S
    weights_s = model.weight_bytes / bw
    prefill = Coeffs(
        a=weights_s + ar_fixed + pp_hop,
        b=2 * model.active_params / flops + ar_per_token + (pp - 1) * act_bytes / link,
        # causal attention: QK^T and PV, 2 l^2 d flops per head per layer after masking
        c=2 * model.num_layers * model.num_heads * model.head_dim / flops,
    )
    decode = Coeffs(
        a=weights_s + ar_fixed + pp_hop,
        b=model.kv_bytes_per_token / bw,
        c=2 * model.active_params / flops + ar_per_token,
    )
    return LatencyModel(prefill, decode, pp)


def fit_prefill(samples: list[tuple[list[int], float]]) -> Coeffs:
    """Least squares a + b*sum(l) + c*sum(l^2) over (prompt lengths, seconds) samples."""
    X = np.array([[1.0, float(sum(ls)), float(sum(x * x for x in ls))] for ls, _ in samples])
    y = np.array([t for _, t in samples])
    return Coeffs(*_nnls(X, y))


def fit_decode(samples: list[tuple[int, int, float]]) -> Coeffs:
    """Least squares a + b*sum(context) + c*batch over (batch, total context, seconds)."""
    X = np.array([[1.0, float(ctx), float(b)] for b, ctx, _ in samples])
    y = np.array([t for _, _, t in samples])
    return Coeffs(*_nnls(X, y))


def _nnls(X: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """Non-negative least squares on relative error (a latency term cannot be negative;
    short and long batches count alike), by trying every subset of the 3 columns."""
    w = 1.0 / np.maximum(y, 1e-9)
    X, y = X * w[:, None], y * w
    best: tuple[float, np.ndarray] | None = None
    for mask in range(1, 8):
        cols = [i for i in range(3) if mask >> i & 1]
        coef, *_ = np.linalg.lstsq(X[:, cols], y, rcond=None)
        if (coef < 0).any():
            continue
        full = np.zeros(3)
        full[cols] = coef
        err = float(((X @ full - y) ** 2).sum())
        if best is None or err < best[0]:
            best = (err, full)
    full = best[1] if best is not None else np.zeros(3)
    return float(full[0]), float(full[1]), float(full[2])


def kv_transfer_s(model: ModelShape, tokens: int, link_gbps: float, codec_ratio: float = 1.0) -> float:
    """Seconds to move a prompt's KV over a link (bytes x codec ratio / bandwidth)."""
    return tokens * model.kv_bytes_per_token * codec_ratio / (link_gbps * 1e9)
