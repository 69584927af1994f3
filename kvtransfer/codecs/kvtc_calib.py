"""The ``kvtc`` calibration of one model: PCA mean and basis per (layer, K/V), the
component RMS that scales each level's step, and each level's measured quality cost.

``calibrate_kv(samples)`` computes the transform from sample KV (no model needed: tests,
synthetic KV); ``kvtc.calibrate_model(model_dir)`` runs the model on held-out text
(``kvtransfer.kvprobe``: calibration texts, never the evaluation ones), computes the
transform and measures the perplexity change and KL of every level on the calibration
windows; ``kvtc.load_or_calibrate(model_dir)`` returns the cached one or computes and caches it.

Cache: ``MODEL_DIR/kvtc-v{VERSION}.npz`` when the directory is writable, else
``~/.cache/splitserve/kvtc/<model fingerprint>-v{VERSION}.npz``. A cached file whose
version or model fingerprint (config.json and the weights' size and first/last MiB)
differs is recomputed. ``fingerprint`` (CRC32 of the content) goes into every stream.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from kvtransfer import quality

VERSION = 3
# Quantiser step as a fraction of the (layer, K/V) component RMS, by level (0 finest).
LEVEL_F = (0.08, 0.12, 0.17, 0.23, 0.3, 0.4, 0.55, 0.75)
# Calibration windows of the transform and the sensitivity probe: context and scored
# continuation tokens.
CALIB_WINDOWS, CALIB_CTX, CALIB_CONT = 3, 1024, 64
# Windows on which every level's quality cost is measured (kvtransfer.quality's rule):
# as long as the held-out benchmark's contexts (2048) and more of them than the transform
# needs (8 x 63 scored tokens: the rule's interval shrinks with sqrt(tokens)).
MEASURE_WINDOWS, MEASURE_CTX, MEASURE_CONT = 8, 2048, 64
# Labels whose cost the calibration measures: int8, every kvtc level and cachegen's usable ones
# (cachegen 4-5 cost +78% / +276% on SmolLM2: never within a floor; unmeasured = inf).
MEASURE_LABELS = (("int8",) + tuple(f"kvtc:{lv}" for lv in range(len(LEVEL_F)))
                  + tuple(f"cachegen:{lv}" for lv in range(4)))
# Sensitivity probe: each (layer, K/V) alone quantised at this level's step; its mean KL
# sets that tensor's step multiplier (clipped to WEIGHT_RANGE, geometric mean 1).
PROBE_LEVEL, WEIGHT_RANGE = 7, (0.5, 2.0)


@dataclass
class KVTCCalibration:
    layers: int
    kv_heads: int
    head_dim: int
    # [L, 2, C] mean and [L, 2, C, C] orthonormal basis (columns by falling variance).
    mean: np.ndarray
    basis: np.ndarray
    # [L, 2] RMS of the components on the calibration KV.
    rms: np.ndarray
    # [L, 2] step multiplier per (layer, K/V) (bit allocation by sensitivity; 1 = none).
    weight: np.ndarray
    # Per level: measured perplexity change (%) and mean KL (nats) on the calibration
    # windows; NaN where not measured.
    ppl_cost_pct: np.ndarray = field(default_factory=lambda: np.full(len(LEVEL_F), np.nan))
    kl: np.ndarray = field(default_factory=lambda: np.full(len(LEVEL_F), np.nan))
    level_f: np.ndarray = field(default_factory=lambda: np.array(LEVEL_F, np.float64))
    model_fingerprint: str = ""
    version: int = VERSION
    # Keys are coded before RoPE when this holds the model's rotation frequencies
    # (float32 [head_dim // 2]; empty: keys coded as cached). RoPE turns each key's
    # coordinate pairs by an angle that grows with its position, so the PCA basis and the
    # anchor deltas across tokens see a rotating signal; undone per position on the
    # sender and re-applied on the receiver (KVTC does the same), the keys of SmolLM2-135M
    # code 10% smaller at half the KL (session 8 probe, benchmarks/results/2026-12-06-kv-quality).
    inv_freq: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    # Quality stats per measured label ("kvtc:L", "cachegen:L") and calibration window:
    # [labels, windows, 4] (``kvtransfer.quality.FIELDS``); costs() applies the rule.
    q_labels: list[str] = field(default_factory=list)
    q_stats: np.ndarray = field(default_factory=lambda: np.zeros((0, 0, len(quality.FIELDS))))

    def costs(self) -> dict[str, float]:
        """Expected perplexity increase (fraction: 0.01 = 1%) per label, ``{"kvtc:L": cost,
        "cachegen:L": cost}``, by the one rule of ``kvtransfer.quality`` (an upper bound:
        the larger of the measured mean perplexity change and KL, plus a one-sided 95%
        interval of what a 512-token evaluation measures; monotone in the level) on the
        per-token stats measured at calibration. A calibration saved before those stats
        existed (means only) gets the same rule with the per-token spread estimated from
        its KL (sd ~ sqrt(2 KL)) over CALIB_WINDOWS x (CALIB_CONT - 1) tokens; kvtc levels
        only. Levels not measured cost inf."""
        if self.q_labels:
            return quality.costs_by_label(self.q_labels, self.q_stats)
        n = CALIB_WINDOWS * (CALIB_CONT - 1)
        stats = []
        for p, k in zip(np.asarray(self.ppl_cost_pct, np.float64), np.asarray(self.kl, np.float64)):
            m = np.log1p(p / 100) if np.isfinite(p) else np.nan
            var = 2 * max(k, 0.0)
            stats.append([[m * n, var * (n - 1) + n * m * m, n, k * n]])
        return quality.costs_by_label([f"kvtc:{lv}" for lv in range(len(stats))], np.array(stats))

    def check_shape(self, shape: tuple[int, ...], first_layer: int = 0) -> None:
        L, _, _, H, D = shape
        if first_layer + L > self.layers or (H, D) != (self.kv_heads, self.head_dim):
            raise ValueError(f"kvtc calibration is for layers={self.layers} kv_heads={self.kv_heads} "
                             f"head_dim={self.head_dim}, not KV of shape {tuple(shape)} from layer {first_layer}")

    def steps(self, level: int, first_layer: int, layers: int) -> np.ndarray:
        sl = slice(first_layer, first_layer + layers)
        out = self.level_f[level] * self.rms[sl] * self.weight[sl]
        return np.maximum(out, 1e-30).astype(np.float32)

    def _arrays(self) -> dict[str, np.ndarray]:
        return {"meta": np.array([self.version, self.layers, self.kv_heads, self.head_dim], np.int64),
                "mean": self.mean, "basis": self.basis, "rms": self.rms, "weight": self.weight,
                "ppl_cost_pct": self.ppl_cost_pct, "kl": self.kl, "level_f": self.level_f,
                "model_fingerprint": np.frombuffer(self.model_fingerprint.encode(), np.uint8),
                "inv_freq": np.asarray(self.inv_freq, np.float32),
                "q_labels": np.frombuffer(",".join(self.q_labels).encode(), np.uint8),
                "q_stats": np.asarray(self.q_stats, np.float64)}

    @functools.cached_property
    def fingerprint(self) -> int:
        """CRC32 of the transform and steps (what both sides must share)."""
        crc = 0
        for k in ("meta", "mean", "basis", "rms", "weight", "level_f", "inv_freq"):
            crc = zlib.crc32(np.ascontiguousarray(self._arrays()[k]).tobytes(), zlib.crc32(k.encode(), crc))
        return crc

    def save(self, path: str | Path) -> None:
        buf = io.BytesIO()
        np.savez(buf, **self._arrays())  # type: ignore[arg-type]
        path = Path(path)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        tmp.write_bytes(buf.getvalue())
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> KVTCCalibration:
        with np.load(Path(path)) as z:
            a = {k: z[k] for k in z.files}
        version, layers, heads, dim = (int(v) for v in a["meta"])
        if version != VERSION:
            raise ValueError(f"kvtc calibration {path} is version {version}; this build reads version {VERSION}")
        out = cls(layers, heads, dim, a["mean"].astype(np.float32), a["basis"].astype(np.float32),
                  a["rms"].astype(np.float32), a["weight"].astype(np.float32), a["ppl_cost_pct"], a["kl"],
                  a["level_f"], bytes(a["model_fingerprint"]).decode(), inv_freq=a["inv_freq"].astype(np.float32))
        if "q_labels" in a and len(a["q_labels"]):  # saved without them: costs() estimates from the means
            out.q_labels = bytes(a["q_labels"]).decode().split(",")
            out.q_stats = a["q_stats"].astype(np.float64)
        return out


def rope_keys(keys: torch.Tensor, first_pos: int, inv_freq: np.ndarray, sign: float) -> torch.Tensor:
    """Keys [L, T, H, D] (float32) at positions first_pos.. rotated by RoPE (sign 1) or
    back (sign -1), HF rotate_half layout (``engine.rope``), angles in float64."""
    T, D = keys.shape[1], keys.shape[3]
    if len(inv_freq) != D // 2:
        raise ValueError(f"kvtc: {len(inv_freq)} RoPE frequencies for head_dim {D}")
    pos = torch.arange(first_pos, first_pos + T, dtype=torch.float64)
    ang = pos[:, None] * torch.from_numpy(np.asarray(inv_freq, np.float32)).double()[None, :]
    cos, sin = ang.cos().float()[None, :, None, :], (sign * ang.sin()).float()[None, :, None, :]
    a, b = keys[..., :D // 2], keys[..., D // 2:]
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)


def calibrate_kv(samples: list[torch.Tensor] | torch.Tensor, skip_head: int = 1,
                 inv_freq: np.ndarray | None = None) -> KVTCCalibration:
    """The transform from sample KV [L, 2, T, H, D] (the first skip_head tokens of each,
    the attention sink kept exact by the codec, left out). inv_freq: the model's RoPE
    frequencies to code keys before RoPE (samples start at position 0)."""
    items = [samples] if isinstance(samples, torch.Tensor) else list(samples)
    if not items:
        raise ValueError("kvtc calibration needs at least one KV sample")
    if inv_freq is not None and len(inv_freq):
        items = [torch.stack([rope_keys(s[:, 0].float(), 0, inv_freq, -1), s[:, 1].float()], dim=1) for s in items]
    L, _, _, H, D = items[0].shape
    C = H * D
    x = torch.cat([s[:, :, skip_head:].float().reshape(L, 2, -1, C) for s in items], dim=2).double()
    if x.shape[2] < 2:
        raise ValueError("kvtc calibration needs at least 2 tokens past the exact head")
    mean = x.mean(dim=2)
    xc = x - mean[:, :, None]
    cov = xc.transpose(-1, -2) @ xc / (x.shape[2] - 1)
    ev, vecs = torch.linalg.eigh(cov)
    basis = vecs.flip(-1)
    rms = ev.clamp_min(0).mean(dim=-1).sqrt()  # total variance per component
    return KVTCCalibration(L, H, D, mean.float().numpy(), basis.float().contiguous().numpy(),
                           np.maximum(rms.float().numpy(), 1e-12), np.ones((L, 2), np.float32),
                           inv_freq=np.zeros(0, np.float32) if inv_freq is None else np.asarray(inv_freq, np.float32))


def model_fingerprint(model_dir: str | Path) -> str:
    d = Path(model_dir)
    h = hashlib.sha256((d / "config.json").read_bytes())
    for w in sorted(d.glob("*.safetensors")):
        size = w.stat().st_size
        h.update(str(size).encode())
        with w.open("rb") as f:
            h.update(f.read(1 << 20))
            f.seek(max(0, size - (1 << 20)))
            h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


def cache_path(model_dir: str | Path, fp: str | None = None) -> Path:
    d = Path(model_dir)
    if os.access(d, os.W_OK):
        return d / f"kvtc-v{VERSION}.npz"
    root = Path(os.environ.get("SPLITSERVE_CACHE", Path.home() / ".cache" / "splitserve")) / "kvtc"
    root.mkdir(parents=True, exist_ok=True)
    return root / f"{fp or model_fingerprint(d)}-v{VERSION}.npz"


def sensitivity_weights(kl: np.ndarray) -> np.ndarray:
    """Step multipliers [L, 2] from each tensor's KL when quantised alone at one step.

    Bit allocation by measured sensitivity: with KL_i ~ s_i * step_i^2 (fine
    quantisation) and the rate of tensor i falling by log2(step_i) per component, the
    steps that minimise the rate at a given total KL satisfy step_i ~ 1 / sqrt(s_i)
    (Lagrange; all tensors have the same component count). Clipped to WEIGHT_RANGE (a
    probe on a few windows is noisy), geometric mean 1."""
    s = np.maximum(np.asarray(kl, np.float64), 1e-9)
    w = np.sqrt(np.median(s) / s)
    w = np.clip(w, *WEIGHT_RANGE)
    return (w / np.exp(np.log(w).mean())).astype(np.float32)
