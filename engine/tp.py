"""Tensor parallelism (Megatron style) over torch.distributed: gloo on CPU, NCCL on GPUs.

A column-parallel linear holds a slice of the weight's output rows (no communication); a
row-parallel linear holds a slice of the input columns and all-reduces its partial
outputs over the TP group. Attention splits heads, the MLP (and each MoE expert) splits
its intermediate dimension; embeddings, norms, router and lm_head are replicated.
With tp_size 1 nothing touches torch.distributed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from engine.errors import ModelLoadError
from engine.linear import PackedWeight, linear


@dataclass(frozen=True)
class Shard:
    """Which part of a full (checkpoint) tensor a rank holds."""
    full_shape: tuple[int, ...]  # the tensor's shape in the checkpoint
    dim: int | None  # split dimension; None when replicated
    start: int = 0
    length: int = 0


class TPContext:
    def __init__(self, rank: int = 0, size: int = 1, group: Any = None) -> None:
        if size < 1 or not 0 <= rank < size:
            raise ModelLoadError(f"tensor-parallel rank {rank} of size {size}: need 0 <= rank < size")
        self.rank, self.size, self.group = rank, size, group

    def split(self, n: int, what: str) -> tuple[int, int]:
        """(start, length) of this rank's contiguous share of n items; tp must divide n."""
        if n % self.size:
            raise ModelLoadError(f"tensor parallel size {self.size} does not divide the model's {n} {what}; "
                                 f"use a tp that divides {n}")
        per = n // self.size
        return self.rank * per, per

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum x over the TP group in place (a no-op for tp 1)."""
        if self.size > 1:
            dist.all_reduce(x, op=dist.ReduceOp.SUM, group=self.group)
        return x


def _frozen(shape: tuple[int, ...], dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)


class _PackableLinear(nn.Module):
    """A linear layer whose weight may be pre-packed for oneDNN (engine.linear)."""

    weight: torch.Tensor
    packed: PackedWeight | None

    def pack(self, free: bool = True) -> bool:
        """Pre-pack the weight for oneDNN (engine.linear.pack_model); with free, drop the
        plain copy. Returns True."""
        self.packed = PackedWeight(self.weight)
        if free:
            self.weight = _frozen((0, self.weight.shape[1]), self.weight.dtype)
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.packed)


class ColumnParallelLinear(_PackableLinear):
    """y = x W^T, W [out, in] split by output rows; `units` rows form one indivisible
    unit (head_dim for attention projections), so tp must divide out // units."""

    def __init__(self, in_features: int, out_features: int, tp: TPContext, dtype: torch.dtype, what: str,
                 units: int = 1) -> None:
        super().__init__()
        start, n = tp.split(out_features // units, what)
        self.shard = Shard((out_features, in_features), 0, start * units, n * units)
        self.weight = _frozen((n * units, in_features), dtype)
        self.packed: PackedWeight | None = None



class MergedColumnParallelLinear(_PackableLinear):
    """Column-parallel linears that read the same input, stored as one weight so that one
    matmul computes them all (q/k/v, gate/up): this rank's rows of each part, stacked in
    order. ``parts`` is (out_features, what, units) per part; ``part(i)`` is the view of
    part i's rows and the Shard of the checkpoint tensor it holds (engine.loader fills it).
    Each output element is the same dot product as in the separate linears."""

    def __init__(self, in_features: int, parts: list[tuple[int, str, int]], tp: TPContext,
                 dtype: torch.dtype) -> None:
        super().__init__()
        self.shards: list[Shard] = []
        self.sizes: list[int] = []
        for out_features, what, units in parts:
            start, n = tp.split(out_features // units, what)
            self.shards.append(Shard((out_features, in_features), 0, start * units, n * units))
            self.sizes.append(n * units)
        self.weight = _frozen((sum(self.sizes), in_features), dtype)
        self.packed: PackedWeight | None = None

    def part(self, i: int) -> tuple[torch.Tensor, Shard]:
        lo = sum(self.sizes[:i])
        return self.weight[lo:lo + self.sizes[i]], self.shards[i]



class RowParallelLinear(_PackableLinear):
    """y = x W^T, W [out, in] split by input columns; partial sums are all-reduced
    unless the caller defers the reduction (reduce=False), e.g. to sum MoE experts first."""

    def __init__(self, in_features: int, out_features: int, tp: TPContext, dtype: torch.dtype, what: str,
                 units: int = 1) -> None:
        super().__init__()
        self.tp = tp
        start, n = tp.split(in_features // units, what)
        self.shard = Shard((out_features, in_features), 1, start * units, n * units)
        self.weight = _frozen((out_features, n * units), dtype)
        self.packed: PackedWeight | None = None

    def forward(self, x: torch.Tensor, reduce: bool = True) -> torch.Tensor:
        y = linear(x, self.weight, self.packed)
        return self.tp.all_reduce(y) if reduce else y
