"""``kvtc``: a KVTC-style transform codec (KVTC, NVIDIA, ICLR 2026: PCA decorrelation of
the KV features calibrated once per model, bit allocation over the components, entropy
coding), ``get_codec("kvtc", level=L, model=MODEL_DIR)``.

The method and the stream: ``kvtc_codec`` (``KVTCCore``, the codec given its
calibration); the calibration data: ``kvtc_calib``; calibrating on a model, measuring
each level's quality cost and the cache beside the model: ``kvtc_model``. This module is
the registered codec (``KVTCCodec``: also takes ``model=``), the names scripts and
workers use (``register``, ``current``, ``load_or_calibrate``, ``cached``,
``calibrate_model``, ...) and the command line::

    python -m kvtransfer.codecs.kvtc MODEL_DIR [--remeasure [--windows N]]
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np

from kvtransfer.codecs.kvtc_calib import MEASURE_WINDOWS, KVTCCalibration, cache_path
from kvtransfer.codecs.kvtc_codec import _CURRENT, _LOADED, DEFAULT_LEVEL, KVTCCore, current, register
from kvtransfer.codecs.kvtc_model import (LOCK_TIMEOUT_S, MEASURE_CHUNK, SENS_CONT, SENS_WINDOWS, cached,
                                          calibrate_from_kv, calibrate_model, code_like_transfers, load_or_calibrate,
                                          measure_costs, measure_kvs, remeasure)

__all__ = ["DEFAULT_LEVEL", "LOCK_TIMEOUT_S", "MEASURE_CHUNK", "SENS_CONT", "SENS_WINDOWS", "_CURRENT", "_LOADED",
           "KVTCCodec", "KVTCCore", "cached", "calibrate_from_kv", "calibrate_model", "code_like_transfers",
           "current", "load_or_calibrate", "measure_costs", "measure_kvs", "register", "remeasure"]


class KVTCCodec(KVTCCore):
    options: ClassVar[tuple[str, ...]] = ("level", "model", "calibration", "exact_head", "first_layer",
                                          "total_layers", "first_token")

    def __init__(self, level: int = DEFAULT_LEVEL, model: str | Path | None = None,
                 calibration: KVTCCalibration | None = None, exact_head: int = 1, first_layer: int = 0,
                 total_layers: int | None = None, first_token: int = 0) -> None:
        """``KVTCCore``'s options, and model: a model directory (calibrated once and
        cached: ``load_or_calibrate``) instead of calibration. Without either, the codec
        only decodes, with the (loaded) calibration each stream names."""
        if calibration is None and model is not None:
            calibration = load_or_calibrate(model)
        super().__init__(level=level, calibration=calibration, exact_head=exact_head, first_layer=first_layer,
                         total_layers=total_layers, first_token=first_token)


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
