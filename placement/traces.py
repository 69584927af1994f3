"""Routing traces of a mixture-of-experts model: validation, statistics, and a synthetic
generator.

A trace is an integer array ``[tokens, layers, top_k]``: ``trace[t, l]`` holds the ids of
the ``top_k`` distinct experts token ``t`` was routed to at MoE layer ``l``.

Number of experts. A trace cannot tell an expert that no token chose from one that does
not exist, so callers should pass ``experts`` (the CLI's ``--experts``). Without it the
count is ``max id + 1``, which silently drops never-chosen experts at the top of the
range; the CLI logs that default.

Statistics:
- ``expert_loads``: ``[layers, experts]`` token counts (a token counts once at each of its
  ``top_k`` experts, so a layer's total is ``tokens * top_k``);
- ``coactivation``: ``[layers - 1, experts, experts]``, entry ``[l, i, j]`` = number of
  tokens routed to expert ``i`` at layer ``l`` and to expert ``j`` at layer ``l + 1``
  (every one of the ``top_k * top_k`` pairs of a token counts once).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from placement.errors import PlacementInputError


def load_trace(path: str | Path) -> np.ndarray:
    """Read a ``.npy`` trace; errors name the file and what a trace must be."""
    try:
        arr = np.load(Path(path), allow_pickle=False)
    except FileNotFoundError:
        raise PlacementInputError("trace", f"{path}: no such file") from None
    except (ValueError, OSError) as e:
        raise PlacementInputError(
            "trace", f"{path}: not a readable .npy array ({e}); expected an integer array [tokens, layers, top_k]"
        ) from None
    if not isinstance(arr, np.ndarray):
        raise PlacementInputError("trace", f"{path}: holds {type(arr).__name__}, expected one .npy array")
    return arr


def validate_trace(trace: object, experts: int | None = None) -> tuple[np.ndarray, int]:
    """Check a trace and return it as int64 with the number of experts.

    Raises PlacementInputError naming ``trace`` or ``experts`` with what is allowed.
    """
    if not isinstance(trace, np.ndarray):
        raise PlacementInputError("trace", f"expected a numpy array, found {type(trace).__name__}")
    if trace.dtype == np.bool_ or not np.issubdtype(trace.dtype, np.integer):
        raise PlacementInputError(
            "trace", f"dtype {trace.dtype} not allowed: expert ids must be integers (int8..int64, uint8..uint64)"
        )
    if trace.ndim != 3:
        raise PlacementInputError(
            "trace", f"shape {tuple(trace.shape)} has {trace.ndim} dimensions, expected 3: [tokens, layers, top_k]"
        )
    tokens, layers, top_k = trace.shape
    if tokens < 1 or layers < 1 or top_k < 1:
        raise PlacementInputError(
            "trace", f"shape {tuple(trace.shape)}: tokens, layers and top_k must each be at least 1"
        )
    if np.issubdtype(trace.dtype, np.unsignedinteger) and int(trace.max()) > np.iinfo(np.int64).max:
        raise PlacementInputError("trace", f"expert id {int(trace.max())} does not fit in int64")
    ids = trace.astype(np.int64, copy=False)
    low = int(ids.min())
    if low < 0:
        where = np.argwhere(ids < 0)[0]
        raise PlacementInputError(
            "trace", f"negative expert id {low} (first at token {where[0]}, layer {where[1]}); ids must be >= 0"
        )
    high = int(ids.max())
    if experts is None:
        experts = high + 1
    else:
        if isinstance(experts, bool) or not isinstance(experts, (int, np.integer)) or experts < 1:
            raise PlacementInputError("experts", f"{experts!r} is not allowed: must be a positive integer")
        experts = int(experts)
        if high >= experts:
            where = np.argwhere(ids >= experts)[0]
            raise PlacementInputError(
                "trace",
                f"expert ids up to {high} out of range (the first at token {where[0]}, layer {where[1]}); "
                f"with experts={experts} ids must be in [0, {experts - 1}]",
            )
    if top_k > experts:
        raise PlacementInputError("trace", f"top_k={top_k} exceeds the number of experts ({experts})")
    if top_k > 1:
        srt = np.sort(ids, axis=2)
        dup = np.argwhere(srt[:, :, 1:] == srt[:, :, :-1])
        if len(dup):
            t, layer, _ = dup[0]
            raise PlacementInputError(
                "trace",
                f"token {t} at layer {layer} lists expert {int(srt[t, layer][dup[0][2]])} twice; "
                "each token's top_k expert ids at a layer must be distinct",
            )
    return ids, experts


def expert_loads(trace: np.ndarray, experts: int) -> np.ndarray:
    """``[layers, experts]`` token counts (int64)."""
    _, layers, _ = trace.shape
    offset = (np.arange(layers, dtype=np.int64) * experts)[None, :, None]
    flat = (trace + offset).ravel()
    return np.bincount(flat, minlength=layers * experts).reshape(layers, experts)


def coactivation(trace: np.ndarray, experts: int) -> np.ndarray:
    """``[layers - 1, experts, experts]`` pair counts between consecutive layers (int64)."""
    tokens, layers, top_k = trace.shape
    out = np.zeros((max(layers - 1, 0), experts, experts), dtype=np.int64)
    for layer in range(layers - 1):
        src = trace[:, layer, :]
        dst = trace[:, layer + 1, :]
        pairs = (src[:, :, None] * experts + dst[:, None, :]).ravel()
        out[layer] = np.bincount(pairs, minlength=experts * experts).reshape(experts, experts)
    return out


def synthetic_trace(
    tokens: int,
    layers: int,
    experts: int,
    top_k: int,
    skew: float = 0.6,
    correlation: float = 0.7,
    fanout: int = 3,
    seed: int = 0,
) -> np.ndarray:
    """A skewed, layer-to-layer correlated routing trace ``[tokens, layers, top_k]`` (int32).

    - Popularity: at each layer, expert of popularity rank ``r`` (1-based) has weight
      ``r ** -skew`` (Zipf-like; 0 is uniform), ranks shuffled per layer.
    - Correlation: each expert ``i`` at layer ``l`` has ``fanout`` preferred successors at
      ``l + 1`` (drawn in proportion to their popularity, with random affinities). A token
      at ``l + 1`` draws its ``top_k`` distinct experts from
      ``correlation * mean(successors of its experts at l) + (1 - correlation) * popularity``.
    """
    if tokens < 1 or layers < 1 or experts < 1 or not 1 <= top_k <= experts:
        raise PlacementInputError(
            "synthetic_trace", "need tokens, layers, experts >= 1 and 1 <= top_k <= experts"
        )
    if not 0.0 <= correlation <= 1.0:
        raise PlacementInputError("correlation", f"{correlation} not in [0, 1]")
    rng = np.random.default_rng(seed)
    popularity = np.empty((layers, experts))
    base = np.arange(1, experts + 1, dtype=float) ** -float(skew)
    for layer in range(layers):
        popularity[layer] = rng.permutation(base) / base.sum()
    out = np.empty((tokens, layers, top_k), dtype=np.int32)
    out[:, 0, :] = _sample_distinct(np.broadcast_to(popularity[0], (tokens, experts)), top_k, rng)
    fan = min(fanout, experts)
    for layer in range(1, layers):
        affinity = np.zeros((experts, experts))
        for i in range(experts):
            succ = rng.choice(experts, size=fan, replace=False, p=popularity[layer])
            affinity[i, succ] = rng.dirichlet(np.ones(fan))
        prev = out[:, layer - 1, :].astype(np.int64)
        mix = affinity[prev].mean(axis=1)  # [tokens, experts]
        probs = correlation * mix + (1.0 - correlation) * popularity[layer][None, :]
        out[:, layer, :] = _sample_distinct(probs, top_k, rng)
    return out


def _sample_distinct(probs: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Per row, ``k`` distinct indices drawn without replacement in proportion to ``probs``
    (Gumbel top-k)."""
    with np.errstate(divide="ignore"):
        logits = np.log(probs)
    keys = logits + rng.gumbel(size=probs.shape)
    top = np.argpartition(-keys, k - 1, axis=1)[:, :k]
    return top
