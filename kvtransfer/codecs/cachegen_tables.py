"""Per-model side information for ``cachegen``, computed once by ``calibrate`` and cached:

- probability tables: for each level and role (anchor, other token, channel mean), the
  symbol counts of each table bucket, so streams do not carry them (see ``cachegen`` for
  the shipped alternative and its measured overhead). Which bucket a (layer, channel)
  row uses is still measured per chunk and shipped (5 bits a row): a chunk whose spread
  differs from the calibration data then costs a little more, never a flood of escapes.
  Buckets the calibration never saw fall back to a discretised Laplace table;
- optionally KVTC's decorrelating transform (KVTC, 2025): a PCA basis per (layer, K/V,
  kv_head) over head_dim, with the mean, applied before quantisation. Kept per level only
  where it makes streams smaller at the same step (same MSE: the basis is orthonormal).

``save(path)`` / ``load(path)`` store it as one ``.npz``; the stream names the tables'
fingerprint, and decoding with other tables is a ``CodecError``.
"""

from __future__ import annotations

import functools
import io
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from kvtransfer.codecs import cachegen_quant as cq
from kvtransfer.codecs import rangecoding

ROLES = ("anchor", "other", "ref")


@dataclass
class LevelTables:
    """Tables of one level: per role, counts per table bucket."""

    # Role -> bucket -> uint16 counts over that bucket's alphabet (2 R_b + 2 symbols).
    counts: list[dict[int, np.ndarray]]
    # Whether this level codes in the PCA basis.
    pca: bool = False

    def table(self, role: int, bucket: int) -> np.ndarray:
        found = self.counts[role].get(bucket)
        return laplace_counts(bucket) if found is None else found


def laplace_counts(bucket: int) -> np.ndarray:
    """A discretised Laplace table with the bucket's mean |q| (the fallback table)."""
    r = int(cq.RADIUS[bucket])
    spread = max(2.0 ** ((bucket + 0.5 - cq.OFFSET) / 2), 0.05)
    q = np.arange(-r, r + 1)
    p = np.exp(-np.abs(q) / spread)
    p = np.append(p / p.sum() * 0.999, 0.001)  # escape
    return rangecoding.normalize(p * rangecoding.TABLE_TOTAL)


@dataclass
class CacheGenTables:
    """Calibrated side information for one model shape (see the module docstring)."""

    # KV shape it applies to: layers, kv_heads, head_dim, and the token group size.
    layers: int
    kv_heads: int
    head_dim: int
    group: int
    # Level -> tables.
    levels: dict[int, LevelTables] = field(default_factory=dict)
    # PCA mean [L, 2, H, D] and orthonormal basis [L, 2, H, D, D] (columns by falling
    # variance), or None.
    pca_mean: np.ndarray | None = None
    pca_basis: np.ndarray | None = None

    def check_shape(self, shape: tuple[int, ...], first_layer: int = 0) -> None:
        """KV of shape covers layers first_layer.. of the calibrated model."""
        L, _, _, H, D = shape
        if first_layer + L > self.layers or (H, D) != (self.kv_heads, self.head_dim):
            raise ValueError(f"cachegen tables were calibrated for layers={self.layers} kv_heads={self.kv_heads} "
                             f"head_dim={self.head_dim}, not KV of shape {shape} from layer {first_layer}")

    def pca(self, first_layer: int, layers: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(mean, basis) of these layers, or None without a PCA basis."""
        if self.pca_mean is None or self.pca_basis is None:
            return None
        sl = slice(first_layer, first_layer + layers)
        return torch.from_numpy(self.pca_mean[sl]), torch.from_numpy(self.pca_basis[sl])

    def _arrays(self) -> dict[str, np.ndarray]:
        out = {"meta": np.array([self.layers, self.kv_heads, self.head_dim, self.group], np.int64)}
        if self.pca_mean is not None and self.pca_basis is not None:
            out["pca_mean"], out["pca_basis"] = self.pca_mean, self.pca_basis
        for lv, t in sorted(self.levels.items()):
            out[f"l{lv}_pca"] = np.array([t.pca])
            for r in range(len(ROLES)):
                for b, c in sorted(t.counts[r].items()):
                    out[f"l{lv}_r{r}_b{b}"] = c
        return out

    @functools.cached_property
    def fingerprint(self) -> int:
        """CRC32 of the content, computed once: treat the tables as immutable once used."""
        crc = 0
        for k, v in sorted(self._arrays().items()):
            crc = zlib.crc32(np.ascontiguousarray(v).tobytes(), zlib.crc32(k.encode(), crc))
        return crc

    def save(self, path: str | Path) -> None:
        buf = io.BytesIO()
        np.savez(buf, **self._arrays())  # type: ignore[arg-type]
        Path(path).write_bytes(buf.getvalue())

    @classmethod
    def load(cls, path: str | Path) -> CacheGenTables:
        with np.load(Path(path)) as z:
            arr = {k: z[k] for k in z.files}
        layers, heads, dim, group = (int(v) for v in arr["meta"])
        out = cls(layers, heads, dim, group, pca_mean=arr.get("pca_mean"), pca_basis=arr.get("pca_basis"))
        for lv in sorted({int(k[1:].split("_")[0]) for k in arr if k.startswith("l")}):
            counts = [{int(k.rsplit("_b", 1)[1]): v for k, v in arr.items() if k.startswith(f"l{lv}_r{r}_b")}
                      for r in range(len(ROLES))]
            out.levels[lv] = LevelTables(counts, bool(arr[f"l{lv}_pca"][0]))
        return out


def pca_basis(samples: list[torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
    """(mean [L, 2, H, D], basis [L, 2, H, D, D]) of sample KV [L, 2, T, H, D]."""
    x = torch.cat([s.float() for s in samples], dim=2)
    mean = x.mean(dim=2)
    c = (x - mean[:, :, None]).permute(0, 1, 3, 2, 4)  # [L, 2, H, T, D]
    cov = c.transpose(-1, -2) @ c / max(1, c.shape[3] - 1)
    _, vecs = torch.linalg.eigh(cov.double())
    basis = vecs.flip(-1).float()  # columns by falling variance
    return mean.numpy(), basis.contiguous().numpy()


def raw_counts(streams: cq.Streams) -> dict[int, np.ndarray]:
    """Symbol counts of each used bucket."""
    out = {}
    for b, s in zip(streams.buckets, streams.symbols):
        k = 2 * int(cq.RADIUS[b]) + 2
        out[b] = np.bincount(s, minlength=k)[:k]
    return out


# A shipped table is counted on at most this many of its symbols (a strided sample):
# any table decodes correctly, a sample this large costs well under 0.1% in size.
TABLE_SAMPLE = 1 << 16


def table_counts(streams: cq.Streams) -> dict[int, np.ndarray]:
    """Normalised counts of each used bucket's symbols (sampled past TABLE_SAMPLE)."""
    out = {}
    for b, s in zip(streams.buckets, streams.symbols):
        k = 2 * int(cq.RADIUS[b]) + 2
        out[b] = rangecoding.normalize(np.bincount(s[::max(1, len(s) // TABLE_SAMPLE)], minlength=k)[:k])
    return out


def merge_counts(acc: dict[int, np.ndarray], new: dict[int, np.ndarray]) -> None:
    for b, c in new.items():
        acc[b] = acc[b] + c.astype(np.int64) if b in acc else c.astype(np.int64)
