"""``kvtc`` on a model: its calibration computed from the model's KV on held-out text
(``calibrate_model``: the transform, the sensitivity-weighted steps, then every level's
quality cost measured as transfers code it), re-measured (``remeasure``), and cached
beside the model with a file lock between processes (``load_or_calibrate``, ``cached``).
The transform itself is ``kvtc_calib``'s; the codec ``kvtc_codec``'s.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from kvtransfer.codecs.cachegen import CacheGenCodec
from kvtransfer.codecs.kvtc_calib import (CALIB_CONT, CALIB_CTX, CALIB_WINDOWS, LEVEL_F, MEASURE_CONT, MEASURE_CTX,
                                          MEASURE_LABELS, MEASURE_WINDOWS, PROBE_LEVEL, KVTCCalibration, cache_path,
                                          calibrate_kv, model_fingerprint, sensitivity_weights)
from kvtransfer.codecs.kvtc_codec import KVTCCore

# Windows of the sensitivity probe (one score per (layer, K/V) and window: the bulk of
# the calibration's time; 1 window halves what 2 took, the weights are clipped anyway).
SENS_WINDOWS = 1
# Continuation tokens the sensitivity probe scores (a score costs a forward pass of
# them over the context: 16 instead of 64 cut the probe 4x; the KL of 15 positions ranks
# the 2 x layers tensors well enough for step weights clipped to 0.5-2x).
SENS_CONT = 16


def calibrate_model(model_dir: str | Path, windows: int = CALIB_WINDOWS, ctx: int = CALIB_CTX,
                    cont: int = CALIB_CONT, measure: bool = True, sensitivity: bool = True,
                    rope: bool = True, measure_windows: int = MEASURE_WINDOWS, measure_ctx: int = MEASURE_CTX,
                    measure_cont: int = MEASURE_CONT) -> KVTCCalibration:
    """Run the model on the calibration texts: the transform (rope: keys before RoPE),
    (sensitivity) the step of each (layer, K/V) from its measured sensitivity on
    SENS_WINDOWS windows (both on ``windows`` windows of ctx + cont tokens), then
    (measure) the quality stats of every label of MEASURE_LABELS on ``measure_windows``
    windows of measure_ctx + measure_cont tokens (``measure_costs``)."""
    from kvtransfer import kvprobe

    probe = kvprobe.Probe(model_dir, max(ctx + cont, measure_ctx + measure_cont))
    kvs = [(probe.context_kv(ids[:ctx])[0], ids[ctx:])
           for _, ids in kvprobe.windows(probe.tok, "calib", windows, ctx, cont)]
    cal = calibrate_from_kv(probe, kvs, False, sensitivity, rope)
    if measure:
        measure_costs(probe, measure_kvs(probe, measure_windows, measure_ctx, measure_cont), cal)
    return cal


def measure_kvs(probe: Any, windows: int = MEASURE_WINDOWS, ctx: int = MEASURE_CTX,
                cont: int = MEASURE_CONT) -> list[tuple[torch.Tensor, list[int]]]:
    """(context KV, continuation ids) of the measurement windows (calibration texts)."""
    from kvtransfer import kvprobe

    return [(probe.context_kv(ids[:ctx])[0], ids[ctx:])
            for _, ids in kvprobe.windows(probe.tok, "calib", windows, ctx, cont)]


# Tokens per independently coded chunk when measuring (as transfers code them).
MEASURE_CHUNK = 512


def code_like_transfers(label: str, cal: KVTCCalibration, kv: torch.Tensor,
                        chunk: int = MEASURE_CHUNK) -> torch.Tensor:
    """decode(encode(kv)) with the codec of label ("kvtc:L" with cal, "cachegen:L", "int8"),
    token chunks coded independently at their positions."""
    name, _, lv = label.partition(":")
    parts = []
    for a in range(0, kv.shape[2], chunk):
        if name == "kvtc":
            c: CacheGenCodec = KVTCCore(level=int(lv), calibration=cal, first_token=a)
        elif name == "cachegen":
            c = CacheGenCodec(level=int(lv))
        elif name == "int8":
            from kvtransfer.codecs.int8 import Int8Codec

            c = Int8Codec()  # type: ignore[assignment]
        else:
            raise ValueError(f"measure_costs measures int8, kvtc and cachegen levels, not {label!r}")
        parts.append(c.decode(c.encode(kv[:, :, a:a + chunk])))
    return torch.cat(parts, dim=2)


def measure_costs(probe: Any, kvs: list[tuple[torch.Tensor, list[int]]], cal: KVTCCalibration,
                  labels: tuple[str, ...] = MEASURE_LABELS, log: Any = None) -> KVTCCalibration:
    """Per label and window, the quality stats (``kvtransfer.quality.window_stats``) of
    the continuation scored with decode(encode(KV)) in place of the exact bf16 KV; stored
    in cal (``q_labels``, ``q_stats``: ``cal.costs()`` applies the rule), and the means
    of the kvtc levels in ``ppl_cost_pct`` and ``kl``."""
    import time

    from kvtransfer import kvprobe, quality

    stats = np.zeros((len(labels), len(kvs), len(quality.FIELDS)))
    for w, (kv, cont_ids) in enumerate(kvs):
        t0 = time.monotonic()
        x = kv.to(torch.bfloat16)
        ref = probe.score(x, cont_ids, keep_logprobs=True)
        for i, lb in enumerate(labels):
            s = probe.score(code_like_transfers(lb, cal, x), cont_ids, keep_logprobs=True)
            assert s.token_nll is not None and ref.token_nll is not None
            stats[i, w] = quality.window_stats((s.token_nll - ref.token_nll).numpy(),
                                               kvprobe.kl_tokens(ref, s).numpy())
        if log:
            log(f"measured window {w + 1}/{len(kvs)} in {time.monotonic() - t0:.0f}s")
    cal.q_labels, cal.q_stats = list(labels), stats
    ppl, kl = np.full(len(LEVEL_F), np.nan), np.full(len(LEVEL_F), np.nan)
    for lb, st in zip(labels, stats):
        if lb.startswith("kvtc:"):
            dsum, _, n, klsum = st.sum(axis=0)
            ppl[int(lb[5:])], kl[int(lb[5:])] = 100 * np.expm1(dsum / n), klsum / n
    cal.ppl_cost_pct, cal.kl = ppl, kl
    return cal


def calibrate_from_kv(probe: Any, kvs: list[tuple[torch.Tensor, list[int]]], measure: bool = True,
                      sensitivity: bool = True, rope: bool = True) -> KVTCCalibration:
    """calibrate_model's work after the prefills: kvs holds (context KV, continuation
    token ids) of each calibration window (``kvprobe.Probe.context_kv``); measure: the
    quality stats on these same windows (``calibrate_model`` measures on its own)."""
    from engine.config import ModelConfig
    from engine.rope import inv_frequencies
    from kvtransfer import kvprobe

    model_dir = probe.model_dir
    cfg = ModelConfig.from_dir(model_dir)
    inv_freq = inv_frequencies(cfg).numpy() if rope else None
    cal = calibrate_kv([kv for kv, _ in kvs], inv_freq=inv_freq)
    cal.model_fingerprint = model_fingerprint(model_dir)
    if sensitivity:
        L = cal.layers
        kl_t = np.zeros((L, 2))
        for kv, cont_ids in kvs[:SENS_WINDOWS]:
            cont_ids = cont_ids[:SENS_CONT]
            ref = probe.score(kv, cont_ids, keep_logprobs=True)
            for layer in range(L):
                codec = KVTCCore(level=PROBE_LEVEL, calibration=cal, first_layer=layer, total_layers=L)
                coded = codec.decode(codec.encode(kv[layer:layer + 1]))
                for j in range(2):
                    x = kv.clone()
                    x[layer, j] = coded[0, j]
                    kl_t[layer, j] += kvprobe.kl(ref, probe.score(x, cont_ids, keep_logprobs=True))
        cal.weight = sensitivity_weights(kl_t)
        cal.__dict__.pop("fingerprint", None)  # the steps changed
    if measure:
        measure_costs(probe, kvs, cal)
    return cal


def remeasure(model_dir: str | Path, windows: int = MEASURE_WINDOWS, ctx: int = MEASURE_CTX,
              cont: int = MEASURE_CONT, log: Any = None) -> KVTCCalibration:
    """Measure the quality stats of the model's cached calibration again (its transform
    and steps, hence its fingerprint and every stream, unchanged) and save them with it."""
    from kvtransfer import kvprobe

    cal = load_or_calibrate(model_dir)
    probe = kvprobe.Probe(model_dir, ctx + cont)
    measure_costs(probe, measure_kvs(probe, windows, ctx, cont), cal, log=log)
    cal.save(cache_path(model_dir))
    return cal


# Longest wait for another process that is calibrating the same model (a worker pool
# starting at once: one calibrates, the others wait and load its file).
LOCK_TIMEOUT_S = 1800.0


def _cached(path: Path, fp: str) -> KVTCCalibration | None:
    if not path.exists():
        return None
    try:
        cal = KVTCCalibration.load(path)
    except (ValueError, KeyError, OSError):
        return None  # stale (another version) or damaged: recompute
    return cal if cal.model_fingerprint == fp else None


def cached(model_dir: str | Path) -> KVTCCalibration | None:
    """The model's calibration if one is cached (beside the model or under the cache
    root) for these weights, else None: never computes one."""
    fp = model_fingerprint(model_dir)
    return _cached(cache_path(model_dir, fp), fp)


def load_or_calibrate(model_dir: str | Path, timeout_s: float = LOCK_TIMEOUT_S) -> KVTCCalibration:
    """The model's calibration: cached, or computed now and cached (about 1-3 minutes of
    CPU for a 135M model: ``python -m kvtransfer.codecs.kvtc MODEL_DIR`` does it ahead of
    time). Processes calibrating the same model take a file lock: one computes, the
    others wait (at most timeout_s, then TimeoutError) and load its result."""
    import fcntl
    import logging
    import time

    fp = model_fingerprint(model_dir)
    path = cache_path(model_dir, fp)
    cal = _cached(path, fp)
    if cal is not None:
        return cal
    deadline = time.monotonic() + timeout_s
    with open(path.with_name(path.name + ".lock"), "a+") as lock:
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"kvtc: waited {timeout_s:.0f}s for another process calibrating "
                                       f"{model_dir} (lock {lock.name})") from None
                time.sleep(0.5)
        try:
            cal = _cached(path, fp)  # another process calibrated it while this one waited
            if cal is not None:
                return cal
            t0 = time.monotonic()
            cal = calibrate_model(model_dir)
            cal.save(path)
            logging.getLogger(__name__).info("kvtc calibration of %s took %.0f s (cached at %s)", model_dir,
                                             time.monotonic() - t0, path)
            return cal
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
