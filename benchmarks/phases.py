"""Per-phase breakdown from the server's Prometheus /metrics, scraped before and after a
run: the difference is what that run did (the server's counters are cumulative).

Phases (splitserve names; other servers' metrics are kept under "raw" only):
- queue: time in the prefill queue (splitserve_queue_seconds);
- prefill: prefill compute (splitserve_prefill_seconds);
- kv_transfer: bytes and seconds moved prefill -> decode (splitserve_kv_transfer_*), with
  the compression ratio when the server exports the uncompressed size
  (splitserve_kv_transfer_raw_bytes), else None;
- decode: server e2e minus server TTFT per request (mean), i.e. first token -> last token.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

logger = logging.getLogger(__name__)

Sample = dict[str, float]  # "name{labels}" -> value


def parse_metrics(text: str) -> Sample:
    out: Sample = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = float(s.value)
    return out


async def scrape(client: httpx.AsyncClient, url: str) -> Sample | None:
    """The server's metrics, or None when it has no Prometheus /metrics."""
    try:
        r = await client.get(f"{url}/metrics", timeout=10)
        if r.status_code != 200:
            return None
        return parse_metrics(r.text)
    except (httpx.HTTPError, ValueError) as e:
        logger.info("no metrics from %s: %s", url, e)
        return None


def _delta(before: Sample, after: Sample, key: str) -> float:
    return after.get(key, 0.0) - before.get(key, 0.0)


def _hist(before: Sample, after: Sample, name: str) -> dict[str, float | None] | None:
    count = _delta(before, after, f"{name}_count")
    if f"{name}_count" not in after:
        return None
    total = _delta(before, after, f"{name}_sum")
    buckets = []
    for key, value in after.items():
        if key.startswith(f"{name}_bucket{{le="):
            le = float(key[len(name) + 11:-1])
            buckets.append((le, value - before.get(key, 0.0)))
    buckets.sort()
    return {"count": count, "mean": total / count if count else None,
            "p50": _bucket_quantile(buckets, 0.5), "p90": _bucket_quantile(buckets, 0.9)}


def _bucket_quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """Prometheus histogram_quantile: linear interpolation inside the bucket."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lo_le, lo_count = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if math.isinf(le):
                return lo_le
            width = count - lo_count
            return lo_le + (le - lo_le) * ((rank - lo_count) / width if width else 0.0)
        lo_le, lo_count = le, count
    return None


def breakdown(before: Sample | None, after: Sample | None) -> dict[str, Any] | None:
    if before is None or after is None:
        return None
    phases: dict[str, Any] = {
        "queue_s": _hist(before, after, "splitserve_queue_seconds"),
        "prefill_s": _hist(before, after, "splitserve_prefill_seconds"),
        "server_ttft_s": _hist(before, after, "splitserve_ttft_seconds"),
        "server_tpot_s": _hist(before, after, "splitserve_tpot_seconds"),
        "server_e2e_s": _hist(before, after, "splitserve_e2e_seconds"),
    }
    e2e, ttft = phases["server_e2e_s"], phases["server_ttft_s"]
    decode = None
    if e2e and ttft and e2e["mean"] is not None and ttft["mean"] is not None:
        decode = e2e["mean"] - ttft["mean"]
    phases["decode_s_mean"] = decode
    kv_bytes = _delta(before, after, "splitserve_kv_transfer_bytes_total")
    kv_s = _delta(before, after, "splitserve_kv_transfer_seconds_total")
    raw_key = "splitserve_kv_transfer_raw_bytes_total"
    raw = _delta(before, after, raw_key) if raw_key in after else None
    phases["kv_transfer"] = {
        "bytes": kv_bytes,
        "seconds": kv_s,
        "gbps": kv_bytes * 8 / kv_s / 1e9 if kv_s > 0 else None,
        "compression_ratio": raw / kv_bytes if raw is not None and kv_bytes > 0 else None,
    }
    phases["raw"] = {k: _delta(before, after, k) for k in sorted(after)
                     if not k.startswith(("python_", "process_")) and "_bucket" not in k
                     and _delta(before, after, k) != 0}
    return phases
