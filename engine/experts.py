"""The expert side of attention/expert disaggregation (engine.afd): placements of experts
on shards, the shard that runs its experts' MLPs grouped, and the exchange interface the
attention side reaches shards through (``LocalExchange`` in-process; cluster transports in
decode_workers/exchange.py implement the same two calls). No Ray, no sockets here.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch

from engine.model import MLP

# placement[layer][shard] = expert ids that shard holds.
Placement = list[list[list[int]]]


def even_placement(num_layers: int, num_experts: int, shards: int) -> Placement:
    """Contiguous, equal-as-possible blocks: expert e on shard e * shards // num_experts."""
    if shards < 1 or shards > num_experts:
        raise ValueError(f"{shards} expert shards for {num_experts} experts; allowed: 1..{num_experts}")
    one = [[e for e in range(num_experts) if e * shards // num_experts == s] for s in range(shards)]
    return [[list(ids) for ids in one] for _ in range(num_layers)]


def placement_problems(placement: Any, num_layers: int, num_experts: int) -> list[str]:
    """What is wrong with a placement for a model of num_layers x num_experts ('' list: fine)."""
    if not isinstance(placement, list) or not all(isinstance(layer, list) for layer in placement):
        return ["not a list (per layer) of lists (per shard) of expert ids"]
    problems: list[str] = []
    if len(placement) != num_layers:
        problems.append(f"{len(placement)} layers; the model has {num_layers}")
    shards = {len(layer) for layer in placement}
    if len(shards) > 1:
        problems.append(f"layers list different numbers of shards: {sorted(shards)}")
    for i, layer in enumerate(placement):
        held: set[int] = set()
        for s, ids in enumerate(layer):
            if not isinstance(ids, list) or not all(isinstance(e, int) and not isinstance(e, bool) for e in ids):
                problems.append(f"layer {i} shard {s}: not a list of expert ids")
                continue
            bad = sorted(e for e in ids if not 0 <= e < num_experts)
            if bad:
                problems.append(f"layer {i} shard {s}: expert ids {bad} outside 0..{num_experts - 1}")
            held.update(ids)
        missing = sorted(set(range(num_experts)) - held)
        if missing:
            problems.append(f"layer {i}: experts {missing} have no replica")
    return problems


def shard_experts(placement: Placement, shard: int) -> list[list[int]]:
    """The expert ids one shard holds, per layer."""
    return [sorted(set(layer[shard])) for layer in placement]


@dataclass
class ExpertRequest:
    """Rows for one shard, one layer, one micro-batch: ``x`` [n, hidden] grouped by expert,
    ``groups`` (expert id, rows) in row order."""

    layer: int
    x: torch.Tensor
    groups: list[tuple[int, int]]


class ExpertShard:
    """The expert side: holds the MLPs of its experts (per layer) and runs them grouped."""

    def __init__(self, mlps: list[dict[int, MLP]]) -> None:
        self.mlps = mlps
        self.rows = 0  # rows computed since start
        self.busy_s = 0.0
        self.busy_cpu_s = 0.0  # CPU time of the computing thread (load-independent work)
        # Rows computed per (layer, expert) since start.
        self.load: dict[tuple[int, int], int] = {}

    @classmethod
    def load_from(cls, model_dir: str, dtype: torch.dtype, experts: list[list[int]]) -> ExpertShard:
        from engine.loader import load_experts

        return cls(load_experts(model_dir, dtype, experts))

    @property
    def experts(self) -> list[list[int]]:
        return [sorted(layer) for layer in self.mlps]

    def add(self, model_dir: str, dtype: torch.dtype, experts: list[list[int]]) -> int:
        """Load the given experts (per layer) that this shard lacks; returns how many.
        Held experts keep serving meanwhile (live re-placement: copy, switch, drop)."""
        from engine.loader import load_experts

        missing = [sorted(set(ids) - set(have)) for ids, have in zip(experts, self.mlps)]
        if not any(missing):
            return 0
        loaded = load_experts(model_dir, dtype, missing)
        for have, new in zip(self.mlps, loaded):
            have.update(new)
        return sum(map(len, missing))

    def drop_except(self, experts: list[list[int]]) -> int:
        """Release the experts (per layer) not listed; returns how many."""
        n = 0
        for have, keep in zip(self.mlps, experts):
            for e in [e for e in have if e not in keep]:
                del have[e]
                n += 1
        return n

    @torch.inference_mode()
    def run(self, req: ExpertRequest) -> torch.Tensor:
        """[n, hidden] outputs of each row's expert (unweighted), rows in request order."""
        t0, c0 = time.perf_counter(), time.thread_time()
        layer = self.mlps[req.layer]
        y = torch.empty_like(req.x)
        start = 0
        for e, n in req.groups:
            mlp = layer.get(e)
            if mlp is None:
                raise KeyError(f"layer {req.layer}: expert {e} is not held here (held: {sorted(layer)})")
            y[start:start + n] = mlp(req.x[start:start + n], reduce=False)
            start += n
            self.load[(req.layer, e)] = self.load.get((req.layer, e), 0) + n
        if start != req.x.shape[0]:
            raise ValueError(f"groups cover {start} rows, x has {req.x.shape[0]}")
        self.rows += start
        self.busy_s += time.perf_counter() - t0
        self.busy_cpu_s += time.thread_time() - c0
        return y


class ExpertExchange(ABC):
    """How the attention side reaches the expert shards. ``send`` must not wait for the
    result; ``recv`` returns the rows of the send with the same (shard, tag), tags being
    unique among the sends in flight."""

    def __init__(self, placement: Placement) -> None:
        self.placement = placement
        self.num_shards = len(placement[0]) if placement else 0

    def cost(self, shard: int) -> float:
        """Distance to a shard (0 = same node); dispatch prefers the nearest replica."""
        return 0.0

    @abstractmethod
    def send(self, shard: int, tag: int, req: ExpertRequest) -> None: ...

    @abstractmethod
    def recv(self, shard: int, tag: int) -> torch.Tensor: ...

    def reset(self) -> None:
        """Forget sends whose results will not be received (a failed step)."""


class LocalExchange(ExpertExchange):
    """Shards in this process; a shard runs a request when its result is received."""

    def __init__(self, placement: Placement, shards: list[ExpertShard]) -> None:
        super().__init__(placement)
        if len(shards) != self.num_shards:
            raise ValueError(f"{len(shards)} shards for a placement over {self.num_shards}")
        self.shards = shards
        self._inflight: dict[tuple[int, int], ExpertRequest] = {}

    def send(self, shard: int, tag: int, req: ExpertRequest) -> None:
        self._inflight[(shard, tag)] = req

    def recv(self, shard: int, tag: int) -> torch.Tensor:
        return self.shards[shard].run(self._inflight.pop((shard, tag)))

    def reset(self) -> None:
        self._inflight.clear()
