"""Rotary position embedding in the HF "rotate_half" layout (the two halves of a head
are the two coordinates of each rotated pair), with default, linear and llama3 frequency
scaling computed by the same formulas as transformers' rope initialisation.

Angles are computed in float32 from integer positions, as transformers does, and cached:
``Rotary.cos_sin(positions, dtype)`` indexes the cache with the position tensor.
"""

from __future__ import annotations

import math

import torch

from engine.config import ModelConfig


def inv_frequencies(cfg: ModelConfig) -> torch.Tensor:
    """float32 [head_dim // 2]: the rotation frequency of each coordinate pair."""
    dim = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    sc = cfg.rope_scaling
    if not sc:
        return inv
    factor = float(sc["factor"])
    if sc["rope_type"] == "linear":
        return inv / factor
    # llama3: wavelengths longer than the original context / low_freq_factor are slowed
    # down by `factor`, those shorter than context / high_freq_factor kept, and the band in
    # between interpolated smoothly.
    low, high = float(sc["low_freq_factor"]), float(sc["high_freq_factor"])
    old_len = float(sc["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


class Rotary:
    """cos/sin tables [positions, head_dim] in float32, grown on demand (doubling) up to
    what the positions seen so far need; one per model, on the model's device."""

    def __init__(self, cfg: ModelConfig, device: torch.device | str | None = None) -> None:
        self.inv_freq = inv_frequencies(cfg).to(device)
        self._cos = torch.empty(0, cfg.head_dim, device=device)
        self._sin = torch.empty(0, cfg.head_dim, device=device)

    def to(self, device: torch.device | str) -> Rotary:
        self.inv_freq = self.inv_freq.to(device)
        self._cos, self._sin = self._cos.to(device), self._sin.to(device)
        return self

    def _grow(self, n: int) -> None:
        size = max(64, 1 << (n - 1).bit_length())
        pos = torch.arange(size, device=self.inv_freq.device, dtype=torch.int64).float()
        freqs = pos[:, None] * self.inv_freq[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        self._cos, self._sin = emb.cos(), emb.sin()

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: LongTensor [T] -> (cos, sin), each [T, head_dim] in dtype."""
        if positions.numel():
            need = int(positions.max()) + 1
            if need > self._cos.shape[0]:
                self._grow(need)
        idx = positions.to(self._cos.device)
        return self._cos[idx].to(dtype), self._sin[idx].to(dtype)

    def tables(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: LongTensor [T] -> (cos, signed sin), each [T, 1, head_dim] in dtype, for
        ``rotate``: the sin of the first half of each head negated (the sign rotate_half
        puts on the rotated coordinates), so that a step rotates with 4 ops per layer."""
        cos, sin = self.cos_sin(positions, dtype)
        half = sin.shape[-1] // 2
        sin = torch.cat([-sin[:, :half], sin[:, half:]], dim=-1)
        return cos[:, None, :], sin[:, None, :]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, head_dim]; cos/sin: [T, head_dim]."""
    return x * cos[:, None, :] + rotate_half(x) * sin[:, None, :]


def rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """apply_rotary with ``Rotary.tables``' [T, 1, head_dim] cos and signed sin; bit-identical
    to it: element i of the first half is x_i*cos_i + x_{i+h}*(-sin_i), and
    (-a)*b == a*(-b) exactly in IEEE arithmetic; roll by half a head swaps the halves."""
    r = x.roll(x.shape[-1] // 2, -1)
    r.mul_(signed_sin)
    out = x * cos
    return out.add_(r)
