"""Live expert statistics of a running AFD deployment, read from its ``/metrics``: the
token choices its attention workers routed to each (layer, expert)
(``splitserve_expert_routed_tokens``, summed over attention workers) and its expert
pool's size. ``splitserve place-experts --from URL`` feeds them to the placement ILP."""

from __future__ import annotations

import os

import numpy as np

ROUTED = "splitserve_expert_routed_tokens"


class ExpertStatsError(Exception):
    """The URL gave no usable expert statistics (the message says why)."""


def parse_expert_loads(text: str) -> tuple[np.ndarray, int | None]:
    """(routed token choices [layers, experts] summed over attention workers, live expert
    workers or None) from Prometheus text."""
    from prometheus_client.parser import text_string_to_metric_families

    cells: dict[tuple[int, int], float] = {}
    replicas: int | None = None
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == ROUTED:
                key = (int(s.labels["layer"]), int(s.labels["expert"]))
                cells[key] = cells.get(key, 0.0) + s.value
            elif s.name == "splitserve_pool_replicas" and s.labels.get("pool") == "expert":
                replicas = int(s.value)
    if not cells:
        raise ExpertStatsError(f"no {ROUTED} samples: not an attention/expert deployment, or no attention "
                               "worker has reported yet")
    layers = 1 + max(k[0] for k in cells)
    experts = 1 + max(k[1] for k in cells)
    loads = np.zeros((layers, experts), dtype=np.int64)
    for (layer, e), v in cells.items():
        loads[layer, e] = int(v)
    if loads.sum() == 0:
        raise ExpertStatsError("the attention workers have routed no tokens yet: serve some traffic first")
    return loads, replicas


def fetch_expert_loads(url: str, api_key: str | None = None, timeout_s: float = 30.0) -> tuple[np.ndarray, int | None]:
    """GET URL/metrics (URL may already end in /metrics); the key defaults to
    $SPLITSERVE_API_KEY."""
    import httpx

    target = url.rstrip("/")
    if not target.endswith("/metrics"):
        target += "/metrics"
    key = api_key if api_key is not None else os.environ.get("SPLITSERVE_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        r = httpx.get(target, headers=headers, timeout=timeout_s)
    except httpx.HTTPError as e:
        raise ExpertStatsError(f"{target}: {type(e).__name__}: {e}") from None
    if r.status_code != 200:
        raise ExpertStatsError(f"{target}: HTTP {r.status_code}"
                               + (" (set SPLITSERVE_API_KEY)" if r.status_code == 401 else ""))
    return parse_expert_loads(r.text)
