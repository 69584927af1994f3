"""``kvtc``: a KVTC-style transform codec (KVTC, NVIDIA, ICLR 2026: PCA decorrelation of
the KV features calibrated once per model, bit allocation over the components, entropy
coding), ``get_codec("kvtc", level=L, model=MODEL_DIR)``: here the codec given its
calibration (``KVTCCore``; ``kvtc.KVTCCodec`` adds ``model=``).

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

Calibration (``kvtc_calib``; on a model: ``kvtc_model``): computed once per model from
held-out text and cached beside the model (or under ~/.cache/splitserve/kvtc when the model's
directory is read-only); it is versioned, names the model it was computed on (a
fingerprint of its config and weights) and carries the measured perplexity cost of every
level. A stream names its calibration's fingerprint: decoding with another calibration
is a ``CodecError``.
"""

from __future__ import annotations

import struct
import threading
from typing import ClassVar

import torch

from kvtransfer.codecs import cachegen_quant as cq
from kvtransfer.codecs import kernels
from kvtransfer.codecs.base import CodecError, Payload
from kvtransfer.codecs.cachegen import CacheGenCodec
from kvtransfer.codecs.cachegen_format import OPTS
from kvtransfer.codecs.cachegen_tables import CacheGenTables
from kvtransfer.codecs.kvtc_calib import LEVEL_F, KVTCCalibration

DEFAULT_LEVEL = 2
# Stream options after cachegen's: the position of the first token (keys before RoPE).
_POS = struct.Struct("<I")
# Calibrations this process has loaded, by fingerprint: a codec built without one (e.g.
# by ``decode_any``) decodes a stream with the calibration the stream names, if loaded.
_LOADED: dict[int, KVTCCalibration] = {}
# The calibration of this process's model (``current()``).
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


class KVTCCore(CacheGenCodec):
    """The kvtc codec given its calibration (``kvtc.KVTCCodec``, the registered one, also
    takes a model directory)."""

    name, codec_id = "kvtc", 4
    options: ClassVar[tuple[str, ...]] = ("level", "calibration", "exact_head", "first_layer", "total_layers",
                                          "first_token")

    def __init__(self, level: int = DEFAULT_LEVEL, calibration: KVTCCalibration | None = None,
                 exact_head: int = 1, first_layer: int = 0, total_layers: int | None = None,
                 first_token: int = 0) -> None:
        """level: 0 (finest) .. len(LEVEL_F) - 1; calibration: a ``KVTCCalibration``.
        Without one, the codec only decodes, with the (loaded) calibration each stream
        names. first_token: the
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
        if len(opts) != OPTS.size + _POS.size:
            raise CodecError(f"kvtc stream options are {len(opts)} bytes, expected {OPTS.size + _POS.size}")
        fp = OPTS.unpack(opts[:OPTS.size])[5]
        if self.calibration is None:  # decode-only: the stream names its calibration
            if fp not in _LOADED:
                raise CodecError(f"kvtc stream was coded with calibration {fp:#010x}, which this process has not "
                                 f"loaded (loaded: {[f'{k:#010x}' for k in _LOADED]})")
            return KVTCCore(calibration=_LOADED[fp])._decode(payload, shape, dtype, opts)
        if fp != self.calibration.fingerprint:
            raise CodecError(f"kvtc stream was coded with calibration {fp:#010x}; this codec has calibration "
                             f"{self.calibration.fingerprint:#010x} (both sides need the same model calibration)")
        _, _, _, head, _, _, first_layer = OPTS.unpack(opts[:OPTS.size])
        self.calibration.check_shape(shape, first_layer)
        self._pos0.value = _POS.unpack(opts[OPTS.size:])[0] + head
        return super()._decode(payload, shape, dtype, opts[:OPTS.size])
