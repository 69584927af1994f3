"""Latency model of one instance (a TP group, possibly pipelined), in DistServe's form
(Zhong et al., OSDI 2024, section 4.1 / appendix A):

    prefill batch time = a + b * sum(l) + c * sum(l^2)         (l: prompt lengths)
    decode step time   = a + b * sum(context) + c * batch

Coefficients come from profiling this machine (``fit``) or from a roofline of the
catalogue's GPU. Tensor parallelism divides compute and memory traffic and adds two
all-reduces per layer; pipeline parallelism divides the per-stage time and adds a
point-to-point hop per stage (the simulator runs the stages concurrently). The KV-transfer
term DistServe leaves out is ``kv_transfer_s``.

Chunked prefill: a chunk of n tokens over ctx tokens already cached attends to ctx + n
keys. A causal kernel (flash attention) does n*ctx + n^2/2 of work, a kernel that applies
the causal mask to the full score matrix (plain SDPA with a mask, this repo's CPU engine)
n*(ctx + n); both reduce to c*l^2 for a whole prompt of l tokens, so ``attention`` picks
the chunk formula without changing the meaning of c.

``Overheads`` are the serving system's fixed costs around the engine (HTTP, routing, Ray
RPC, token streaming), measured on the served system, not on the engine alone.

MoE decode with attention and expert workers in separate pools is modelled in
``placement.attention_expert`` (``AttentionExpert``).
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


ATTENTION_KINDS = ("causal", "dense")


def chunk_attention_work(chunks: list[int] | np.ndarray, ctx: list[int] | np.ndarray,
                         attention: str = "causal") -> float:
    """The quadratic feature of a prefill batch: sum over chunks (n tokens after ctx cached
    ones) in units where a whole prompt of l tokens counts l^2."""
    n = np.asarray(chunks, dtype=np.float64)
    c = np.asarray(ctx, dtype=np.float64)
    if attention == "causal":
        return float((n * (n + 2 * c)).sum())
    if attention == "dense":
        return float((n * (n + c)).sum())
    raise ValueError(f"unknown attention kind {attention!r}; allowed: {ATTENTION_KINDS}")


@dataclass(frozen=True)
class LatencyModel:
    prefill: Coeffs
    decode: Coeffs
    # Pipeline stages: the per-stage time is what limits throughput.
    pp: int = 1
    # How chunked prefill's attention grows with the cached context (see the module doc).
    attention: str = "causal"

    def prefill_s(self, lens: list[int] | np.ndarray) -> float:
        arr = np.asarray(lens, dtype=np.float64)
        p = self.prefill
        return p.a + p.b * arr.sum() + p.c * (arr * arr).sum()

    def chunked_prefill_s(self, prompt_tokens: int, budget: int) -> float:
        """One prompt alone, prefilled in chunks of at most ``budget`` tokens."""
        t, done = 0.0, 0
        while done < prompt_tokens:
            n = min(budget, prompt_tokens - done)
            t += self.mixed_s([n], [done], 0, 0)
            done += n
        return t

    def decode_s(self, batch: int, total_context: int) -> float:
        d = self.decode
        return d.a + d.b * total_context + d.c * batch

    def mixed_s(self, prefill_lens: list[int], prefill_ctx: list[int], batch: int, total_context: int) -> float:
        """A colocated step: prefill chunks (with their earlier context) beside decodes."""
        if not prefill_lens:
            return self.decode_s(batch, total_context)
        p = self.prefill
        t = p.a + p.b * float(np.sum(prefill_lens)) + p.c * chunk_attention_work(prefill_lens, prefill_ctx,
                                                                               self.attention)
        if batch:
            t += self.decode.b * total_context + self.decode.c * batch
        return t

    def stage_s(self, t: float) -> float:
        return t / self.pp

    def scaled(self, k: float, decode: float | None = None) -> "LatencyModel":
        """Every step k times as long (a slower or busier machine); with ``decode``, the
        prefill terms by k and the decode terms by ``decode``. A mixed step's decode part
        uses the decode coefficients, so it scales with them."""
        def sc(c: Coeffs, f: float) -> Coeffs:
            return Coeffs(c.a * f, c.b * f, c.c * f)

        return LatencyModel(sc(self.prefill, k), sc(self.decode, k if decode is None else decode),
                            self.pp, self.attention)


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


def fit_prefill_steps(samples: list[tuple[list[int], list[int], float]],
                      attention: str = "causal") -> Coeffs:
    """Least squares a + b*sum(n) + c*attention_work over prefill steps as the workers run
    them: (chunk lengths, context cached before each chunk, seconds). Whole prompts are
    chunks with context 0."""
    X = np.array([[1.0, float(sum(ns)), chunk_attention_work(ns, cs, attention)] for ns, cs, _ in samples])
    y = np.array([t for _, _, t in samples])
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


@dataclass(frozen=True)
class Overheads:
    """What the served system adds around the engine's steps (seconds), measured by
    sending requests to the running server (``fit_overheads``), not on the engine alone.
    The simulator (``ClusterSpec``) takes them as explicit terms:

    - ``request_s`` + ``prompt_token_s`` * prompt tokens: every request's trip outside the
      engine that TTFT sees (HTTP, validation, routing, Ray RPC to the worker and back,
      and in a disaggregated layout publishing the prompt's KV before the first token
      returns);
    - ``decode_start_s``: disaggregated only, from the first token at the ingress until the
      decode worker queues the request (decode RPC, fetching and importing the KV), beyond
      the KV's time on the link;
    - ``step_s`` per engine step that streams tokens and ``stream_token_s`` per token it
      streams (one message per running sequence per step): the event loop's work, which
      shares the worker's core and interpreter with the engine, so it lengthens steps.
    - ``decode_admit_s``: disaggregated only, the decode worker's own work per request it
      receives (KV in and imported), which the sequences already decoding wait for.
    """

    request_s: float = 0.0
    prompt_token_s: float = 0.0
    decode_start_s: float = 0.0
    step_s: float = 0.0
    stream_token_s: float = 0.0
    # Inside the worker that prefills, beyond the engine's step: per prompt token of a
    # step and per prompt finished (KV export and hand-off, the event loop's work): they
    # lengthen the worker's steps, so they queue later prompts.
    prefill_token_s: float = 0.0
    prefill_done_s: float = 0.0
    # Inside the decode worker, per request it receives (KV in and imported), charged to
    # its next step: the running sequences wait for it too.
    decode_admit_s: float = 0.0

    def scaled(self, prefill: float, decode: float) -> "Overheads":
        """The same overheads on a machine running ``prefill`` times as long on the
        request's way to its first token (HTTP, routing, KV export) and ``decode`` times
        as long on the way out (decode start, per-step streaming): all of it is Python on
        the same cores as the engine, so it slows with them."""
        return Overheads(request_s=self.request_s * prefill, prompt_token_s=self.prompt_token_s * prefill,
                         decode_start_s=self.decode_start_s * decode, step_s=self.step_s * decode,
                         stream_token_s=self.stream_token_s * decode,
                         prefill_token_s=self.prefill_token_s * prefill,
                         prefill_done_s=self.prefill_done_s * prefill, decode_admit_s=self.decode_admit_s * decode)

    def spec_kwargs(self) -> dict[str, float]:
        """Keyword arguments of ``placement.simulator.ClusterSpec``."""
        return {"request_overhead_s": self.request_s, "prompt_token_overhead_s": self.prompt_token_s,
                "decode_start_overhead_s": self.decode_start_s, "token_overhead_s": self.step_s,
                "stream_overhead_s": self.stream_token_s, "prefill_token_overhead_s": self.prefill_token_s,
                "prefill_done_overhead_s": self.prefill_done_s, "decode_admit_overhead_s": self.decode_admit_s}


def _nnls2(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Non-negative least squares (absolute error) over every subset of X's columns."""
    best: tuple[float, np.ndarray] | None = None
    k = X.shape[1]
    for mask in range(1, 1 << k):
        cols = [i for i in range(k) if mask >> i & 1]
        coef, *_ = np.linalg.lstsq(X[:, cols], y, rcond=None)
        if (coef < 0).any():
            continue
        full = np.zeros(k)
        full[cols] = coef
        err = float(((X @ full - y) ** 2).sum())
        if best is None or err < best[0]:
            best = (err, full)
    return best[1] if best is not None else np.zeros(k)


def fit_overheads(lat: LatencyModel, budget: int, isolated: list[tuple[int, int, float, float]],
                  bursts: list[tuple[int, int, int, float]], disaggregated: bool,
                  kv_link_s: float = 0.0, prefill_busy: list[float | None] | None = None) -> Overheads:
    """Overheads of a served system from two kinds of probe requests.

    isolated: (prompt tokens, output tokens, TTFT, end-to-end seconds) of requests sent
    one at a time, prompts of several lengths and outputs of two or more lengths; their
    TTFT minus the model's (chunked) prefill time gives request_s + prompt_token_s * l,
    and their decode time (e2e - TTFT) = start + (output - 1) * period gives the start
    and the batch-1 token period.
    bursts: (sequences, total context per step, output tokens, mean e2e - TTFT) of
    requests sent together so that they decode as one batch; with batch 1 from the
    isolated ones, period(b) minus the model's decode step gives step_s + stream_token_s * b.
    kv_link_s: the link time the simulator already charges a disaggregated request's KV
    (mean over the isolated probes), left out of decode_start_s.
    prefill_busy: the busy seconds the prefilling worker's engine loop reported for each
    isolated probe's prefill (None where unknown); busy minus the model's prefill gives
    the in-worker terms prefill_done_s + prefill_token_s * l, and TTFT minus busy the
    outside ones. Without it, everything beyond the model's prefill counts as outside.
    """
    ls = np.array([float(p) for p, _, _, _ in isolated])
    model_pre = np.array([lat.chunked_prefill_s(int(p), budget) for p, _, _, _ in isolated])
    pdone = ptok_in = 0.0
    inside = np.zeros_like(ls)
    if prefill_busy is not None:
        known = np.array([b is not None for b in prefill_busy])
        if known.sum() >= 2:
            busy = np.array([b if b is not None else 0.0 for b in prefill_busy])
            lk = ls[known]
            pdone, ptok_in = _nnls2(np.stack([np.ones_like(lk), lk], axis=1), busy[known] - model_pre[known])
            inside = pdone + ptok_in * ls
    resid = np.array([ttft for _, _, ttft, _ in isolated]) - model_pre - inside
    req, ptok = _nnls2(np.stack([np.ones_like(ls), ls], axis=1), resid)
    outs = np.array([float(o) for _, o, _, _ in isolated])
    dec = np.array([e2e - ttft for _, _, ttft, e2e in isolated])
    X = np.stack([np.ones_like(outs), outs - 1], axis=1)
    start, period1 = _nnls2(X, dec)
    # Batch-1 context: the mean prompt of the isolated probes plus half their output.
    ctx1 = float(np.mean(ls + outs / 2))
    bs = [1.0]
    over = [period1 - lat.decode_s(1, int(ctx1))]
    for b, ctx, out, d in bursts:
        period = max(0.0, d - start) / max(1, out - 1)
        bs.append(float(b))
        over.append(period - lat.decode_s(b, ctx))
    bsa = np.array(bs)
    step, per_tok = _nnls2(np.stack([np.ones_like(bsa), bsa], axis=1), np.array(over))
    return Overheads(request_s=float(req), prompt_token_s=float(ptok),
                     decode_start_s=max(0.0, float(start) - kv_link_s) if disaggregated else 0.0,
                     step_s=float(step), stream_token_s=float(per_tok), prefill_token_s=float(ptok_in),
                     prefill_done_s=float(pdone))
