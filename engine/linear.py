"""Matmuls of the model's linears on CPU with weights pre-packed for oneDNN.

``F.linear`` on CPU hands fp32 to MKL's sgemm, which re-packs the weight matrix on every
call once the batch has more than one row: at 8 decode rows SmolLM2's lm_head (49152 x
576, 113 MB) took ~2.5x its single-row time, the weights being read, written and read
again. oneDNN with the weight reordered once at load into its blocked layout
(``torch.ops.mkldnn._reorder_linear_weight``, the prepacking torch.compile's freezing
does) reads each weight once per call at any batch, and runs bf16 with the CPU's
AVX-512 BF16 instructions (benchmarks/results/2026-12-06-speed). vLLM's CPU backend
prepacks its linears for oneDNN the same way (its own kernels; this uses torch's).

Results differ from ``F.linear`` by rounding only (another summation order; ~1e-6
relative in fp32). Default (``SPLITSERVE_LINEAR`` unset or ``auto``): pack fp32 and bf16
weights on CPU. Session 9 measured fp32 packed against MKL's ``F.linear`` on SmolLM2 with
one thread: decode step 54 vs 122 ms at batch 1 and 66 vs 205 ms at batch 8
(benchmarks/results/2026-12-06-speed, session 9), and the tests that compare greedy
output with transformers' generate (tests/unit/test_real_model.py, the tiny-model tests)
pass unchanged with it; fp32 packed is still not bit-identical to transformers by
construction. ``SPLITSERVE_LINEAR=torch`` packs nothing (``F.linear``, what transformers
runs: bit-identical fp32); ``onednn`` is the same as ``auto``. On other devices or
without oneDNN nothing is packed.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

ENV = "SPLITSERVE_LINEAR"
MODES = ("auto", "onednn", "torch")


def linear_mode() -> str:
    """SPLITSERVE_LINEAR: auto and onednn (pack fp32 and bf16), torch (none)."""
    mode = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"{ENV}={mode!r}: allowed {', '.join(MODES)}")
    return mode


def packing_enabled(device: torch.device | str = "cpu", dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether pack_model packs weights of this dtype on this device."""
    mode = linear_mode()
    wanted = {"auto": (torch.float32, torch.bfloat16), "onednn": (torch.float32, torch.bfloat16), "torch": ()}[mode]
    if dtype not in wanted:
        return False
    if torch.device(device).type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    return hasattr(torch.ops.mkldnn, "_reorder_linear_weight") and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class PackedWeight:
    """A weight [out, in] reordered for oneDNN; ``__call__(x)`` computes x W^T (no bias)."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.out_features, self.in_features = weight.shape
        self.dtype = weight.dtype
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), None)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.dtype:
            raise TypeError(f"input dtype {x.dtype} for a packed {self.dtype} weight")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] == 0:
            return x.new_empty(*lead, self.out_features)
        y = torch.ops.mkldnn._linear_pointwise(x2.contiguous(), self.packed, None, "none", [], "")
        return y.view(*lead, self.out_features)


def linear(x: torch.Tensor, weight: torch.Tensor, packed: PackedWeight | None) -> torch.Tensor:
    """x W^T through the packed weight when there is one, else F.linear."""
    return packed(x) if packed is not None else F.linear(x, weight)


def pack_model(model: nn.Module, free: bool = True) -> int:
    """Pack every linear of the model that has a ``pack()`` method (engine.tp's linears)
    and its lm_head; with free, the linears' plain weights are released (their memory
    would be a second copy). Returns how many weights were packed (0 when packing is off
    for the model's device or dtype)."""
    params = list(model.parameters())
    if not params or not packing_enabled(params[0].device, params[0].dtype):
        return 0
    n = 0
    for mod in model.modules():
        pack = getattr(mod, "pack", None)
        if callable(pack) and pack(free):
            n += 1
    logger.info("packed %d linear weights for oneDNN", n)
    return n
