"""CacheGen's quantiser and symbol streams (no entropy coder here).

Channel-major layout: ``z`` is ``[layers, 2, channels, tokens]`` float32, a channel being
one (kv_head, dim) of one layer's keys or values (or one PCA component of a head).

Quantiser (CacheGen, SIGCOMM 2024, section 4): tokens are grouped (``group`` tokens, the
first being the group's *anchor*). One uniform step ``delta[layer, kv]`` (a fraction of
that layer's RMS; the fraction grows with depth: shallow layers get more bins) applies to
every symbol of a layer: with entropy coding a uniform step is near MSE-optimal, and
channels of small spread cost almost nothing. Per channel:

- ``ref``: the channel mean in steps (int), symbols are centred on it;
- anchors: ``qa = round((a - ref) / delta)``, reconstructed ``a^ = ref + qa * delta``;
- other tokens: ``q = round((x - base) / delta)`` where ``base`` is the reconstructed
  anchor of the token's group (*delta mode*, token-wise locality) or ``ref`` (when the
  channel varies faster than it drifts: delta coding would cost more). The mode is chosen
  per channel by the smaller residual energy and shipped as one bit per channel.

Because deltas are taken against the reconstructed anchor, errors never accumulate: each
value is off by at most delta / 2.

Symbol streams: rows of integer symbols are assigned to one of ``NUM_BUCKETS`` tables by
their spread (mean |q|); a table's alphabet is ``[-R_b, R_b]`` plus an escape symbol whose
value goes, raw, to an escape list.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

NUM_BUCKETS = 24
OFFSET = 8  # bucket b holds rows with mean |q| in [2**((b-8)/2), 2**((b-7)/2))
MAX_RADIUS = 1024
# Alphabet radius per bucket: about 6x the bucket's upper mean |q| (a Laplace tail past
# that is < 0.3%), at least 1.
RADIUS = np.clip(np.ceil(6 * 2.0 ** ((np.arange(NUM_BUCKETS) + 1 - OFFSET) / 2)), 1, MAX_RADIUS).astype(np.int32)
_QMAX = 2 ** 30


@dataclass
class Quantized:
    """One chunk's quantised channels (see the module docstring)."""

    # Step per (layer, kv), float32 [L, 2].
    delta: np.ndarray
    # Channel mean in steps, int32 [L, 2, C].
    ref: np.ndarray
    # Delta mode (True) or centred on ref (False) per channel, bool [L, 2, C].
    mode: np.ndarray
    # Anchor symbols, int32 [L, 2, C, A].
    qa: np.ndarray
    # Symbols of the other tokens, int32 [L, 2, C, N].
    qd: np.ndarray
    # Sum of |qa| and of |qd| per row (L * 2 * C rows), when the quantiser counted them
    # (the table buckets follow from them without another pass).
    sum_a: np.ndarray | None = None
    sum_d: np.ndarray | None = None


def token_layout(tokens: int, group: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(anchor token indices, other token indices, group of each other token)."""
    t = np.arange(tokens)
    anchors = t[t % group == 0]
    others = t[t % group != 0]
    return anchors, others, others // group


def _round(x: torch.Tensor) -> torch.Tensor:
    return torch.round_(x).clamp_(-_QMAX, _QMAX).to(torch.int32)


def _groups(z: torch.Tensor, group: int) -> list[torch.Tensor]:
    """Views [L, 2, C, groups, group] of z's whole groups, then of its last partial one."""
    T = z.shape[3]
    full = T // group * group
    out = []
    if full:
        out.append(z[..., :full].unflatten(3, (T // group, group)))
    if T > full:
        out.append(z[..., full:].unsqueeze(3))
    return out


def quantize(z: torch.Tensor, delta: np.ndarray, group: int) -> Quantized:
    """z: float32 [L, 2, T, C] token-major (as KV is stored); delta: float32 [L, 2]
    (positive). ``kernels.quantize``; equals ``quantize_reference`` of z transposed."""
    from kvtransfer.codecs import kernels

    zc = z.detach().contiguous()
    ref, mode, qa, qd, sa, sd = kernels.quantize(zc.numpy(), np.ascontiguousarray(delta, np.float32), group)
    return Quantized(np.ascontiguousarray(delta, np.float32), ref, mode, qa, qd, sa, sd)


def quantize_reference(z: torch.Tensor, delta: np.ndarray, group: int) -> Quantized:
    """z: float32 [L, 2, C, T]; delta: float32 [L, 2] (positive): the quantiser in torch
    (readable; ``quantize`` is the fast one, tests compare them)."""
    L, _, C, T = z.shape
    d = torch.from_numpy(delta)[:, :, None, None]
    inv = 1 / d
    ref = _round(z.mean(dim=3, keepdim=True) * inv) if T else torch.zeros(L, 2, C, 1, dtype=torch.int32)
    ref_x = (ref.float() * d)[..., None]  # [L, 2, C, 1, 1]
    parts = _groups(z, group)
    qa = _round(torch.cat([(p[..., 0] - ref_x[..., 0]) * inv for p in parts], dim=3)) if parts else \
        torch.zeros(L, 2, C, 0, dtype=torch.int32)
    a_hat = ref_x[..., 0] + qa.float() * d  # [L, 2, C, A]
    e_delta = torch.zeros(L, 2, C)
    e_ref = torch.zeros(L, 2, C)
    a0 = 0
    for p in parts:
        n = p.shape[3]
        others = p[..., 1:]
        e_delta += (others - a_hat[..., a0:a0 + n, None]).pow_(2).sum(dim=(3, 4))
        e_ref += (others - ref_x).pow_(2).sum(dim=(3, 4))
        a0 += n
    mode = e_delta < e_ref
    qd, a0 = [], 0
    for p in parts:
        n = p.shape[3]
        base = torch.where(mode[..., None, None], a_hat[..., a0:a0 + n, None], ref_x)
        qd.append(_round((p[..., 1:] - base).mul_(inv[..., None])).flatten(3))
        a0 += n
    qd_all = torch.cat(qd, dim=3) if qd else torch.zeros(L, 2, C, 0, dtype=torch.int32)
    return Quantized(delta, ref[..., 0].numpy(), mode.numpy(), qa.numpy(), qd_all.numpy())


def reconstruct(q: Quantized, tokens: int, group: int) -> torch.Tensor:
    """Inverse of quantize: float32 [L, 2, C, T]."""
    d = torch.from_numpy(q.delta)[:, :, None, None]
    ref_x = (torch.from_numpy(q.ref)[..., None].float() * d)[..., None]
    a_hat = ref_x[..., 0] + torch.from_numpy(q.qa).float() * d
    qd = torch.from_numpy(q.qd)
    mode = torch.from_numpy(q.mode)[..., None, None]
    L, _, C = q.ref.shape
    out = torch.empty(L, 2, C, tokens, dtype=torch.float32)
    a0 = o0 = 0
    for p in _groups(out, group):
        n, g = p.shape[3], p.shape[4]
        anchor = a_hat[..., a0:a0 + n, None]
        p[..., :1] = anchor
        base = torch.where(mode, anchor, ref_x)
        k = n * (g - 1)
        p[..., 1:] = torch.addcmul(base, qd[..., o0:o0 + k].unflatten(3, (n, g - 1)).float(), d[..., None])
        a0, o0 = a0 + n, o0 + k
    return out


def reconstruct_tokens(delta: np.ndarray, ref: np.ndarray, mode: np.ndarray, qa: np.ndarray, qd: np.ndarray,
                       tokens: int, group: int) -> torch.Tensor:
    """Inverse of quantize, token-major: float32 [L, 2, T, C], in one pass
    (``kernels.reconstruct``; equals ``reconstruct_tokens_reference``)."""
    from kvtransfer.codecs import kernels

    return kernels.reconstruct(delta, ref, mode, qa, qd, tokens, group)


def reconstruct_tokens_reference(delta: np.ndarray, ref: np.ndarray, mode: np.ndarray, qa: np.ndarray,
                                 qd: np.ndarray, tokens: int, group: int) -> torch.Tensor:
    """Inverse of quantize, token-major: float32 [L, 2, T, C] (what ``reconstruct`` gives,
    transposed). The arithmetic is the encoder's (a^ = ref * d + qa * d, x = base + q * d,
    unfused), so every value is within delta / 2 of the input, whatever the slicing."""
    L, _, C = ref.shape
    # all symbols token-major in one int32 buffer (numpy transposes int32 faster than a
    # transposing int -> float copy), then one contiguous cast
    q = np.empty((L, 2, tokens, C), np.int32)
    full = tokens // group * group
    parts = [(0, tokens // group, group), (full, 1 if tokens > full else 0, tokens - full)]
    a0 = o0 = 0
    for t0, n, g in parts:
        if n:
            seg = q[:, :, t0:t0 + n * g].reshape(L, 2, n, g, C)
            seg[:, :, :, 0] = qa[..., a0:a0 + n].transpose(0, 1, 3, 2)
            k = n * (g - 1)
            seg[:, :, :, 1:] = qd[..., o0:o0 + k].reshape(L, 2, C, n, g - 1).transpose(0, 1, 3, 4, 2)
            a0, o0 = a0 + n, o0 + k
    out = torch.from_numpy(q).float()
    d = torch.from_numpy(delta)[:, :, None, None]  # [L, 2, 1, 1]
    out.mul_(d)
    ref_x = torch.from_numpy(ref)[:, :, None, :].float().mul_(d)  # [L, 2, 1, C]
    mode_t = torch.from_numpy(mode)[:, :, None, :]  # [L, 2, 1, C]
    for t0, n, g in parts:
        if n:
            tseg = out[:, :, t0:t0 + n * g].view(L, 2, n, g, C)
            anchor = tseg[:, :, :, 0]
            anchor.add_(ref_x)
            if g > 1:
                tseg[:, :, :, 1:].add_(torch.where(mode_t, anchor, ref_x)[:, :, :, None, :])
    return out


def buckets_of(rows: np.ndarray, sums: np.ndarray | None = None) -> np.ndarray:
    """Table bucket (uint8) of each row of symbols [R, n] by its mean |q| (sums: each
    row's sum of |q|, when known)."""
    if rows.shape[1] == 0:
        return np.zeros(rows.shape[0], np.uint8)
    spread = sums / rows.shape[1] if sums is not None else np.abs(rows).mean(axis=1)
    with np.errstate(divide="ignore"):
        b = np.floor(2 * np.log2(spread)) + OFFSET
    return np.clip(np.nan_to_num(b, neginf=0), 0, NUM_BUCKETS - 1).astype(np.uint8)


@dataclass
class Streams:
    """Rows of symbols sorted by bucket: one symbol array per used bucket."""

    # Used buckets, ascending.
    buckets: list[int]
    # Symbols (int32, 0..2R_b+1; 2R_b+1 = escape) per used bucket, row after row.
    symbols: list[np.ndarray]
    # Values of escaped symbols, in stream order.
    escapes: np.ndarray


def to_streams(rows: np.ndarray, bucket: np.ndarray) -> Streams:
    """rows int32 [R, n], bucket uint8 [R] -> Streams."""
    order = np.argsort(bucket, kind="stable")
    sb = bucket[order]
    radius = RADIUS[sb][:, None]
    s = rows[order]  # a copy: shifted in place below
    n = rows.shape[1]
    escapes = np.zeros(0, np.int32)
    if n and len(s):
        wide = np.flatnonzero(np.abs(s).max(axis=1) > radius[:, 0])  # rows holding escapes (rare)
        if len(wide):
            sub = s[wide]
            esc = np.abs(sub) > radius[wide]
            escapes = sub[esc].astype(np.int32)
            sub[esc] = (radius[wide] + radius[wide] + 1 - np.broadcast_to(radius[wide], sub.shape))[esc]
            s[wide] = sub
    s += radius
    counts = np.bincount(sb, minlength=NUM_BUCKETS)
    used = [int(b) for b in np.flatnonzero(counts)]
    flat = s.reshape(-1)
    bounds = np.concatenate([[0], np.cumsum(counts[used]) * n])
    return Streams(used, [flat[bounds[i]:bounds[i + 1]] for i in range(len(used))], escapes)


def from_streams(symbols: list[np.ndarray], bucket: np.ndarray, n: int, escapes: np.ndarray) -> np.ndarray:
    """Inverse of to_streams (given exactly this role's escaped values): rows int32 [R, n]."""
    order = np.argsort(bucket, kind="stable")
    sb = bucket[order]
    radius = RADIUS[sb][:, None]
    s = np.concatenate(symbols) if len(symbols) > 1 else (symbols[0].copy() if symbols else np.zeros(0, np.int32))
    s = s.astype(np.int32, copy=False).reshape(len(bucket), n)
    if len(escapes):
        esc = s == 2 * radius + 1
        if int(esc.sum()) != len(escapes):
            raise ValueError(f"{int(esc.sum())} escape symbols but {len(escapes)} escaped values")
        s -= radius
        s[esc] = escapes
    else:
        s -= radius
    inverse = np.empty_like(order)
    inverse[order] = np.arange(len(order))
    out: np.ndarray = s[inverse]
    return out


def used_buckets(bucket: np.ndarray) -> list[int]:
    return [int(b) for b in np.flatnonzero(np.bincount(bucket, minlength=NUM_BUCKETS))]


def row_counts(bucket: np.ndarray) -> np.ndarray:
    return np.bincount(bucket, minlength=NUM_BUCKETS)
