"""EPLB-style greedy baseline: DeepSeek's hierarchical expert-parallel load balancer
(github.com/deepseek-ai/EPLB, ``rebalance_experts_hierarchical``), re-implemented on numpy:

1. pack groups of contiguous experts onto nodes, each node receiving the same number of
   groups, heaviest group first onto the lightest node with room;
2. within each node, replicate its experts into the node's ``gpus_per_node * slots``
   physical slots, each time giving a replica to the expert with the highest load per
   replica;
3. pack the node's replicas onto its GPUs, ``slots`` each, heaviest replica first onto
   the lightest GPU with room.

When the groups do not divide evenly among nodes it falls back, as DeepSeek's does, to
the global policy (one node, one group). One deviation: step 3 prefers a GPU that does
not already hold a replica of the same expert (a duplicate on one GPU adds nothing).
It ignores co-activation: it is the baseline the ILP must beat on traffic.
"""

from __future__ import annotations

import numpy as np


def replicate(weight: np.ndarray, physical: int, most: int | None = None) -> np.ndarray:
    """Replica counts ``[experts]`` summing to ``physical``: repeatedly replicate the
    expert with the largest load per replica (minimises the largest replica load), at
    most ``most`` replicas each (``physical <= most * experts``)."""
    counts = np.ones(len(weight), dtype=np.int64)
    for _ in range(physical - len(weight)):
        per_replica = weight / counts
        if most is not None:
            per_replica = np.where(counts < most, per_replica, -np.inf)
        counts[int(np.argmax(per_replica))] += 1
    return counts


def balanced_packing(weight: np.ndarray, packs: int, per_pack: int, owner: np.ndarray | None = None) -> np.ndarray:
    """Pack index ``[items]``: heaviest item first onto the lightest pack with room
    (``per_pack`` items each); with ``owner`` (an id per item), packs already holding an
    item of the same owner are avoided when another has room."""
    pack_of = np.full(len(weight), -1, dtype=np.int64)
    load = np.zeros(packs)
    size = np.zeros(packs, dtype=np.int64)
    held: list[set[int]] = [set() for _ in range(packs)]
    for item in np.argsort(-weight, kind="stable"):
        room = size < per_pack
        if owner is not None:
            fresh = room & np.array([int(owner[item]) not in h for h in held])
            if fresh.any():
                room = fresh
        candidates = np.flatnonzero(room)
        pack = int(candidates[np.argmin(load[candidates])])
        pack_of[item] = pack
        load[pack] += weight[item]
        size[pack] += 1
        if owner is not None:
            held[pack].add(int(owner[item]))
    return pack_of


def eplb_layer(weight: np.ndarray, gpus: int, gpus_per_node: int, slots: int, groups: int | None = None) -> np.ndarray:
    """Placement ``[experts, gpus]`` (replica counts) of one layer with loads ``weight``.

    ``groups`` expert groups (contiguous ids; default: one group per expert)."""
    experts = len(weight)
    weight = weight.astype(float)
    groups = experts if groups is None else groups
    nodes = gpus // gpus_per_node
    if experts % groups or groups % nodes or experts % nodes:
        nodes, groups, per_node_gpus = 1, 1, gpus
    else:
        per_node_gpus = gpus_per_node
    group_size = experts // groups
    group_load = weight.reshape(groups, group_size).sum(axis=1)
    node_of_group = balanced_packing(group_load, nodes, groups // nodes)
    counts = np.zeros((experts, gpus), dtype=np.int64)
    for node in range(nodes):
        members = np.concatenate(
            [np.arange(g * group_size, (g + 1) * group_size) for g in np.flatnonzero(node_of_group == node)]
        )
        replicas = replicate(weight[members], per_node_gpus * slots)
        owner = np.repeat(members, replicas)
        replica_load = np.repeat(weight[members] / replicas, replicas)
        gpu_of = balanced_packing(replica_load, per_node_gpus, slots, owner)
        for e, g in zip(owner, gpu_of):
            counts[e, node * per_node_gpus + g] += 1
    return counts


def eplb(loads: np.ndarray, gpus: int, gpus_per_node: int, slots: int, groups: int | None = None) -> np.ndarray:
    """Placement ``[layers, experts, gpus]`` for per-layer loads ``[layers, experts]``."""
    return np.stack([eplb_layer(w, gpus, gpus_per_node, slots, groups) for w in loads])
