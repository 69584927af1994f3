"""One rule for what a lossy KV codec level costs in quality, for every codec (issue 19).

A level's cost is measured once per model at calibration (``kvtc.calibrate_model``: the
model scores continuations of held-out calibration windows with decode(encode(KV)) in
place of the exact KV) and stored; the adaptive controller admits a level only when its
stored cost is within ``kv_transfer.max_quality_loss``.

The rule (``level_cost``). Per scored token i, d_i = NLL_coded(i) - NLL_exact(i); over the
N calibration tokens, mean m and standard deviation s; KL the mean KL(exact || coded) of
the next-token distributions. The cost is

    expm1( max(m, KL) + Z * s * sqrt(1/N + 1/N_REF) )

i.e. the upper end of a one-sided 95% interval (Z = 1.645) of the perplexity change that
an evaluation of N_REF scored tokens would measure: the calibration's own uncertainty
(s / sqrt(N)) plus the noise of such an evaluation (s / sqrt(N_REF)), around the larger of
the two estimates of the mean (on real text the perplexity change ``m`` and the KL can
differ either way). Why not the mean alone: on a few hundred tokens the perplexity change
is +-1-1.5% noise, so a level whose calibration mean is 0.5% can measure 1.1% on other
texts (kvtc:5 in session 8); the interval makes the cost an upper bound, not an estimate.
Costs are then made monotone in the level (``envelope``: a finer level never costs more
than a coarser one of the same codec).

Stats are stored per calibration window (sums, not means) so that windows can be added
and the rule recomputed without re-running the model. This module imports nothing of
the project (codecs, calibration and the controller import it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

# One-sided 95% normal quantile.
Z = 1.645
# Scored tokens of the evaluation the floor must hold on (8 windows of 64 tokens: the
# held-out benchmark, benchmarks/kv_quality.py --windows 8).
N_REF = 512
# Stats arrays per window: sum of d_i, sum of d_i^2, tokens, KL summed over tokens.
FIELDS = ("dsum", "dsq", "n", "klsum")


def window_stats(d: Sequence[float] | np.ndarray, kl_per_token: Sequence[float] | np.ndarray) -> np.ndarray:
    """[dsum, dsq, n, klsum] of one window from its per-token NLL changes and KLs."""
    d = np.asarray(d, np.float64)
    k = np.asarray(kl_per_token, np.float64)
    return np.array([d.sum(), (d * d).sum(), len(d), k.sum()], np.float64)


def level_cost(stats: np.ndarray) -> float:
    """The cost (fraction: 0.01 = 1% perplexity) of one level from its per-window stats
    [windows, 4] (``window_stats``); inf without tokens or with a non-finite stat."""
    s = np.asarray(stats, np.float64).reshape(-1, len(FIELDS)).sum(axis=0)
    dsum, dsq, n, klsum = (float(v) for v in s)
    if n < 2 or not all(math.isfinite(v) for v in (dsum, dsq, klsum)):
        return math.inf
    m = dsum / n
    var = max(0.0, (dsq - n * m * m) / (n - 1))
    mean = max(m, klsum / n)
    return math.expm1(mean + Z * math.sqrt(var) * math.sqrt(1 / n + 1 / N_REF))


def envelope(costs: Sequence[float]) -> list[float]:
    """Costs of the levels of one codec (finest first) made monotone: a level costs at
    least every finer one (a finer step that measured worse is noise: the coarser level
    takes its cost)."""
    out, top = [], 0.0
    for c in costs:
        top = max(top, c if not math.isnan(c) else math.inf)
        out.append(top)
    return out


def costs_by_label(labels: Sequence[str], stats: np.ndarray) -> dict[str, float]:
    """{label: cost} for labels "codec:level" (or a codec without levels, "int8") with
    stats [labels, windows, 4]: the rule per level, then the envelope per codec (levels
    in ascending order)."""
    raw = {lb: level_cost(s) for lb, s in zip(labels, stats)}
    out: dict[str, float] = {}
    families: dict[str, list[tuple[int, str]]] = {}
    for lb in labels:
        name, _, lv = lb.partition(":")
        families.setdefault(name, []).append((int(lv) if lv else 0, lb))
    for name, items in families.items():
        if len(items) == 1 and ":" not in items[0][1]:  # a codec without levels (int8)
            out[items[0][1]] = max(0.0, raw[items[0][1]])
            continue
        items.sort()
        levels = [lv for lv, _ in items]
        # a level missing from the stats (not measured) is unknown: it and every coarser one cost inf
        full = {lv: raw[lb] for lv, lb in items}
        seq = [full.get(lv, math.inf) for lv in range(max(levels) + 1)]
        for lv, c in enumerate(envelope(seq)):
            if lv in full:
                out[f"{name}:{lv}"] = c
    return out
