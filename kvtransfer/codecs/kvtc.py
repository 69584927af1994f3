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
from kvtransfer.codecs.base import CodecError, Payload
from kvtransfer.codecs.cachegen import _OPTS, CacheGenCodec
from kvtransfer.codecs.cachegen_tables import CacheGenTables
from kvtransfer.codecs.kvtc_calib import (CALIB_CONT, CALIB_CTX, CALIB_WINDOWS, LEVEL_F, PROBE_LEVEL, KVTCCalibration,
                                          cache_path, calibrate_kv, model_fingerprint, rope_keys,
                                          sensitivity_weights)

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
        sl = slice(self.first_layer, self.first_layer + L)
        x = kv[:, :, head:T - tail].float()
        if len(cal.inv_freq):  # keys before RoPE
            x = torch.stack([rope_keys(x[:, 0], self.first_token + head, cal.inv_freq, -1), x[:, 1]], dim=1)
        x = x.reshape(L, 2, T - head - tail, H * D)
        mean, basis = torch.from_numpy(cal.mean[sl]), torch.from_numpy(cal.basis[sl])
        # [L, 2, C, T] channel-major coordinates: basis^T (x - mean)
        z = torch.matmul(basis.transpose(-1, -2), (x - mean[:, :, None]).transpose(-1, -2)).contiguous()
        # NaN or inf anywhere in x reaches z (amax propagates NaN); one pass over z
        if z.numel() and not bool(torch.isfinite(z.abs().amax())):
            raise ValueError("kvtc codes finite KV only; this tensor holds NaN or inf (use 'lossless')")
        return cq.quantize(z, cal.steps(self.level, self.first_layer, L), self.group), head, tail

    def _inverse(self, mid: torch.Tensor, shape: tuple[int, ...], tables: CacheGenTables | None, flags: int,
                 first_layer: int) -> torch.Tensor:
        L, _, Tm, H, D = shape
        cal = self.calibration
        sl = slice(first_layer, first_layer + L)
        mean, basis = torch.from_numpy(cal.mean[sl]), torch.from_numpy(cal.basis[sl])
        out = torch.matmul(mid, basis.transpose(-1, -2)).add_(mean[:, :, None]).view(L, 2, Tm, H, D)
        if len(cal.inv_freq):  # RoPE back onto the keys
            out[:, 0] = rope_keys(out[:, 0], self._pos0.value, cal.inv_freq, 1)
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
                    rope: bool = True) -> KVTCCalibration:
    """Run the model on the calibration texts: the transform (rope: keys before RoPE),
    (sensitivity) the step of each (layer, K/V) from its measured sensitivity on
    SENS_WINDOWS windows, then (measure) every level's perplexity change and KL with
    decode(encode(KV)) in place of the exact KV."""
    from kvtransfer import kvprobe

    probe = kvprobe.Probe(model_dir, ctx + cont)
    wins = kvprobe.windows(probe.tok, "calib", windows, ctx, cont)
    kvs = []
    for _, ids in wins:
        kvs.append((probe.context_kv(ids[:ctx])[0], ids[ctx:]))
    return calibrate_from_kv(probe, kvs, measure, sensitivity, rope)


def calibrate_from_kv(probe: Any, kvs: list[tuple[torch.Tensor, list[int]]], measure: bool = True,
                      sensitivity: bool = True, rope: bool = True) -> KVTCCalibration:
    """calibrate_model's work after the prefills: kvs holds (context KV, continuation
    token ids) of each calibration window (``kvprobe.Probe.context_kv``)."""
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
        nll = np.zeros(len(LEVEL_F))
        kls = np.zeros(len(LEVEL_F))
        nll0, n = 0.0, 0
        for kv, cont_ids in kvs:
            ref = probe.score(kv, cont_ids, keep_logprobs=True)
            nll0, n = nll0 + ref.nll, n + ref.tokens
            for lv in range(len(LEVEL_F)):
                codec = KVTCCodec(level=lv, calibration=cal)
                s = probe.score(codec.decode(codec.encode(kv.to(torch.bfloat16))), cont_ids, keep_logprobs=True)
                nll[lv] += s.nll
                kls[lv] += kvprobe.kl(ref, s) / len(kvs)
        cal.ppl_cost_pct = np.array([kvprobe.ppl_change_pct(v, nll0, n) for v in nll])
        cal.kl = kls
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
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    cal = load_or_calibrate(args.model_dir)
    print(f"kvtc calibration {cal.fingerprint:#010x} of {args.model_dir} ({time.monotonic() - t0:.0f} s): "
          f"{cache_path(args.model_dir)}")
    for lv, (label, cost) in enumerate(cal.costs().items()):
        print(f"  {label}: ppl {cal.ppl_cost_pct[lv]:+.2f}%  KL {cal.kl[lv]:.4f}  expected cost {100 * cost:.2f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
