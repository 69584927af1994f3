"""Tensor parallelism: column- and row-parallel linear layers over torch.distributed
(gloo on CPU, NCCL on GPUs). Each rank holds a slice of the weight; a row-parallel layer
all-reduces its partial outputs. With tp_size 1 nothing touches torch.distributed."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from engine.errors import ModelLoadError




class TPContext:
    def __init__(self, rank: int = 0, size: int = 1, group: object = None) -> None:
        self.rank, self.size, self.group = rank, size, group

    def shard(self, n: int, what: str) -> tuple[int, int]:
        """(start, length) of this rank's slice of n items; n must divide evenly."""
        if n % self.size:
            raise ModelLoadError(f"tp={self.size} does not divide the model's {n} {what}; "
                                 f"allowed tp: a divisor of {n}")
        per = n // self.size
        return self.rank * per, per

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(x, group=self.group)  # type: ignore[arg-type]
        return x


class ColumnParallelLinear(nn.Module):
    """y = x W^T with W's output rows split across ranks (no communication)."""

    def __init__(self, in_features: int, out_features: int, tp: TPContext, dtype: torch.dtype, what: str) -> None:
        super().__init__()
        self.start, self.local_out = tp.shard(out_features, what)
        self.weight = nn.Parameter(torch.empty(self.local_out, in_features, dtype=dtype), requires_grad=False)

    def load(self, full: torch.Tensor) -> None:
        self.weight.data.copy_(full[self.start:self.start + self.local_out])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.weight)


class RowParallelLinear(nn.Module):
    """y = x W^T with W's input columns split across ranks; partial sums all-reduced."""

    def __init__(self, in_features: int, out_features: int, tp: TPContext, dtype: torch.dtype, what: str) -> None:
        super().__init__()
        self.tp = tp
        self.start, self.local_in = tp.shard(in_features, what)
        self.weight = nn.Parameter(torch.empty(out_features, self.local_in, dtype=dtype), requires_grad=False)

    def load(self, full: torch.Tensor) -> None:
        self.weight.data.copy_(full[:, self.start:self.start + self.local_in])

    def forward(self, x: torch.Tensor, reduce: bool = True) -> torch.Tensor:
        y = torch.nn.functional.linear(x, self.weight)
        return self.tp.all_reduce(y) if reduce else y
