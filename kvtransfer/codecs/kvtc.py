"""``kvtc``: a KVTC-style transform codec (KVTC, NVIDIA, ICLR 2026: PCA decorrelation of
the KV features calibrated once per model, bit allocation over the components, entropy
coding), ``get_codec("kvtc", level=L, model=MODEL_DIR)``.

1. Transform: per (layer, K/V), the KV of one token (all KV heads, C = kv_heads *
   head_dim features) minus a calibrated mean, in a calibrated orthonormal PCA basis
   (components by falling variance). Keys are coded before RoPE (calibration v3): the
   sender undoes the rotation per position (``first_token``: where the slice starts,
   shipped in the stream) and the receiver re-applies it.
2. Bit allocation: one uniform quantiser step per (layer, K/V) over all its components.
   With an entropy coder after it, a common step is the rate-distortion optimum over
   components (reverse water-filling: a component whose spread is below the step codes
   to zeros at almost no rate, i.e. gets 0 bits; the rest get bits in proportion to
   log(spread / step)). The step is ``LEVEL_F[level]`` x the component RMS of that (layer,
   K/V) on the calibration text.
3. Token locality where it pays: each component is coded either centred on its mean or as
   a delta against its group's anchor token, whichever is smaller (``cachegen_quant``).
4. Entropy coding: CacheGen's ANS coder with tables chosen per component by spread,
   shipped in the stream (``cachegen``).
5. The first token of a stream is kept exact (``exact_head``, default 1): the attention
   sink, whose KV is far from the rest's distribution.

Calibration (``kvtransfer.codecs.kvtc_calib``): computed once per model from held-out
text and cached beside the model (or under ~/.cache/splitserve/kvtc when the model's
directory is read-only); it is versioned, names the model it was computed on (a
fingerprint of its config and weights) and carries the measured perplexity cost of every
level. A stream names its calibration's fingerprint: decoding with another calibration
is a ``CodecError``.
"""

from __future__ import annotations

import struct
import threading
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from kvtransfer.codecs import cachegen_quant as cq
from kvtransfer.codecs import kernels
from kvtransfer.codecs.base import CodecError, Payload
from kvtransfer.codecs.cachegen import _OPTS, CacheGenCodec
from kvtransfer.codecs.cachegen_tables import CacheGenTables
from kvtransfer.codecs.kvtc_calib import (CALIB_CONT, CALIB_CTX, CALIB_WINDOWS, LEVEL_F, MEASURE_CONT, MEASURE_CTX,
                                          MEASURE_LABELS, MEASURE_WINDOWS, PROBE_LEVEL, KVTCCalibration, cache_path,
                                          calibrate_kv, model_fingerprint, sensitivity_weights)

DEFAULT_LEVEL = 2
# Windows of the sensitivity probe (one score per (layer, K/V) and window: the bulk of
# the calibration's time; 1 window halves what 2 took, the weights are clipped anyway).
SENS_WINDOWS = 1
# Continuation tokens the sensitivity probe scores (a score costs a forward pass of
# them over the context: 16 instead of 64 cut the probe 4x; the KL of 15 positions ranks
# the 2 x layers tensors well enough for step weights clipped to 0.5-2x).
SENS_CONT = 16
# Stream options after cachegen's: the position of the first token (keys before RoPE).
_POS = struct.Struct("<I")
# Calibrations this process has loaded, by fingerprint: a codec built without one (e.g.
# by ``decode_any``) decodes a stream with the calibration the stream names, if loaded.
_LOADED: dict[int, KVTCCalibration] = {}


_CURRENT: list[KVTCCalibration] = []


def register(cal: KVTCCalibration, current: bool = False) -> KVTCCalibration:
    """Make cal known to this process (decoders find it by the fingerprint a stream
    names); current: also the one ``current()`` returns (a worker's model's)."""
    _LOADED[cal.fingerprint] = cal
    if current:
        _CURRENT[:] = [cal]
    return cal


def current() -> KVTCCalibration:
    """The calibration of this process's model (``register(cal, current=True)``, which a
    worker does at start when its manifest uses kvtc)."""
    if not _CURRENT:
        raise ValueError("kvtc: this process has no model calibration loaded (a worker loads it at start when "
                         "kv_transfer uses kvtc: kvtc.load_or_calibrate(MODEL_DIR))")
    return _CURRENT[0]


def _matrices(cal: KVTCCalibration, first_layer: int, layers: int) -> tuple[torch.Tensor, ...]:
    """Of layers first_layer.. (computed once per calibration): the basis [L * 2, C, C] and
    -mean basis [L * 2, 1, C] (encode, token-major rows: z = x basis - mean basis in one
    batched multiply-add), basis^T [L * 2, C, C] and the mean [L * 2, 1, C] (decode:
    x = z basis^T + mean)."""
    cache = cal.__dict__.setdefault("_matrices", {})
    key = (first_layer, layers)
    got = cache.get(key)
    if got is None:
        sl = slice(first_layer, first_layer + layers)
        basis = torch.from_numpy(cal.basis[sl]).reshape(layers * 2, *cal.basis.shape[2:])
        mean = torch.from_numpy(cal.mean[sl]).reshape(layers * 2, 1, -1)
        bt = basis.transpose(1, 2).contiguous()
        got = cache[key] = (basis.contiguous(), -torch.bmm(mean, basis), bt, mean.contiguous())
    return got


class KVTCCodec(CacheGenCodec):
    name, codec_id = "kvtc", 4
    options: ClassVar[tuple[str, ...]] = ("level", "model", "calibration", "exact_head", "first_layer",
                                          "total_layers", "first_token")

    def __init__(self, level: int = DEFAULT_LEVEL, model: str | Path | None = None,
                 calibration: KVTCCalibration | None = None, exact_head: int = 1, first_layer: int = 0,
                 total_layers: int | None = None, first_token: int = 0) -> None:
        """level: 0 (finest) .. len(LEVEL_F) - 1; model: a model directory (calibrated once
        and cached) or calibration: a ``KVTCCalibration``. Without either, the codec only
        decodes, with the (loaded) calibration each stream names. first_token: the
        position of the first token of the KV this codec encodes (a chunk's start in the
        prompt): keys are coded before RoPE, so the sender says where they sit (it goes
        into the stream; the receiver needs nothing)."""
        super().__init__(level=0, exact_head=exact_head, first_layer=first_layer, total_layers=total_layers)
        if level not in range(len(LEVEL_F)):
            raise ValueError(f"kvtc level must be 0..{len(LEVEL_F) - 1}, got {level!r}")
        if not 0 <= first_token < 2 ** 32:
            raise ValueError(f"kvtc first_token must be 0..2**32-1, got {first_token!r}")
        self.first_token = first_token
        self._pos0 = threading.local()  # decode: position of the first coded (middle) token
        if calibration is None and model is not None:
            calibration = load_or_calibrate(model)
        # without either: a decode-only codec (decode_any), taking the calibration the stream names
        self.level, self.calibration = level, calibration if calibration is None else register(calibration)

    def _levels(self) -> int:
        return len(LEVEL_F)

    def _stream_fingerprint(self) -> int:
        assert self.calibration is not None
        return self.calibration.fingerprint

    def _pca(self) -> bool:
        return True

    def quantize(self, kv: torch.Tensor) -> tuple[cq.Quantized, int, int]:
        L, _, T, H, D = kv.shape
        cal = self.calibration
        if cal is None:
            raise ValueError("kvtc needs its model's calibration to encode: pass model=MODEL_DIR (calibrated once, "
                             "cached) or calibration=")
        cal.check_shape(tuple(kv.shape), self.first_layer)
        head = min(self.exact_head, T)
        tail = min(self.exact_tail, T - head)
        Tm, C = T - head - tail, H * D
        x = torch.empty(L, 2, Tm, H, D, dtype=torch.float32)
        x.copy_(kv[:, :, head:T - tail])  # a fresh float32 copy: RoPE is undone in place
        if len(cal.inv_freq) and Tm:  # keys before RoPE
            kernels.rope_(x[:, 0].numpy(), self.first_token + head, cal.inv_freq, -1)
        b, bias, _, _ = _matrices(cal, self.first_layer, L)
        # [L * 2, T, C] token-major coordinates: x basis - mean basis (NaN or inf in x reaches
        # z; the quantiser refuses it)
        z = torch.baddbmm(bias, x.view(L * 2, Tm, C), b)
        return cq.quantize(z.view(L, 2, Tm, C), cal.steps(self.level, self.first_layer, L), self.group), head, tail

    def _inverse(self, mid: torch.Tensor, shape: tuple[int, ...], tables: CacheGenTables | None, flags: int,
                 first_layer: int) -> torch.Tensor:
        L, _, Tm, H, D = shape
        cal = self.calibration
        _, _, b, mean = _matrices(cal, first_layer, L)
        out = torch.baddbmm(mean, mid.view(L * 2, Tm, H * D), b).view(L, 2, Tm, H, D)
        if len(cal.inv_freq) and Tm:  # RoPE back onto the keys
            kernels.rope_(out[:, 0].numpy(), self._pos0.value, cal.inv_freq, 1)
        return out

    def _encode(self, kv: torch.Tensor) -> tuple[bytes, Payload]:
        opts, payload = super()._encode(kv)
        return opts + _POS.pack(self.first_token), payload

    def _decode(self, payload: memoryview, shape: tuple[int, ...], dtype: torch.dtype,
                opts: bytes) -> torch.Tensor:
        if len(opts) != _OPTS.size + _POS.size:
            raise CodecError(f"kvtc stream options are {len(opts)} bytes, expected {_OPTS.size + _POS.size}")
        fp = _OPTS.unpack(opts[:_OPTS.size])[5]
        if self.calibration is None:  # decode-only: the stream names its calibration
            if fp not in _LOADED:
                raise CodecError(f"kvtc stream was coded with calibration {fp:#010x}, which this process has not "
                                 f"loaded (loaded: {[f'{k:#010x}' for k in _LOADED]})")
            return KVTCCodec(calibration=_LOADED[fp])._decode(payload, shape, dtype, opts)
        if fp != self.calibration.fingerprint:
            raise CodecError(f"kvtc stream was coded with calibration {fp:#010x}; this codec has calibration "
                             f"{self.calibration.fingerprint:#010x} (both sides need the same model calibration)")
        _, _, _, head, _, _, first_layer = _OPTS.unpack(opts[:_OPTS.size])
        self.calibration.check_shape(shape, first_layer)
        self._pos0.value = _POS.unpack(opts[_OPTS.size:])[0] + head
        return super()._decode(payload, shape, dtype, opts[:_OPTS.size])


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
            c: CacheGenCodec = KVTCCodec(level=int(lv), calibration=cal, first_token=a)
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
                codec = KVTCCodec(level=PROBE_LEVEL, calibration=cal, first_layer=layer, total_layers=L)
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


def main(argv: list[str] | None = None) -> int:
    """python -m kvtransfer.codecs.kvtc MODEL_DIR: calibrate ahead of time (or show the
    cached calibration's per-level costs)."""
    import argparse
    import time

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("model_dir")
    ap.add_argument("--remeasure", action="store_true",
                    help="measure the cached calibration's quality stats again (transform unchanged)")
    ap.add_argument("--windows", type=int, default=MEASURE_WINDOWS, help="measurement windows (--remeasure)")
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    if args.remeasure:
        cal = remeasure(args.model_dir, args.windows, log=lambda m: print(m, flush=True))
    else:
        cal = load_or_calibrate(args.model_dir)
    print(f"kvtc calibration {cal.fingerprint:#010x} of {args.model_dir} ({time.monotonic() - t0:.0f} s): "
          f"{cache_path(args.model_dir)}")
    from kvtransfer import quality

    for label, cost in cal.costs().items():
        line = f"  {label}: cost {100 * cost:.2f}%"
        if label in cal.q_labels:
            dsum, dsq, n, klsum = cal.q_stats[cal.q_labels.index(label)].sum(axis=0)
            m = dsum / n
            sd = np.sqrt(max(0, dsq / n - m * m))
            line += (f"  (ppl {100 * np.expm1(m):+.2f}%  KL {klsum / n:.4f}  sd/token {sd:.3f}"
                     f"  tokens {int(n)}; rule Z={quality.Z} N_REF={quality.N_REF})")
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
