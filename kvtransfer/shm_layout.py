"""The same-node KV arena's layout, shared by its sender (kvtransfer.shm) and its
receivers (kvtransfer.shm_read): slot header, the handle's reference, checksums and
pieces, page prefaulting, lock probing. See kvtransfer.shm for the design."""

from __future__ import annotations

import fcntl
import logging
import math
import mmap
import os
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kvtransfer.base import TORCH_DTYPES

logger = logging.getLogger(__name__)


SHM_DIR = "/dev/shm"
FILE_PREFIX = "splitserve-kv-"
HEADER = struct.Struct("<8sQQQ")
MAGIC = b"SSKVSLT1"
HEADER_BYTES = 64
ALIGN = 4096
READY, DONE = 1, 2
PAGE = mmap.PAGESIZE


@dataclass
class ShmRef:
    # Owner process and its descriptor of the (unlinked) arena file.
    pid: int
    fd: int
    # Identity of the file (checked after opening /proc/<pid>/fd/<fd>: pid reuse).
    dev: int
    ino: int
    # Arena size, slot offset (its header), payload bytes, generation of this transfer.
    size: int
    offset: int
    nbytes: int
    generation: int
    # Tokens per checksummed piece, and the checksum of each piece (layer-major order, see
    # ``pieces``; ``checksum`` of its K and V parts, summed).
    piece_tokens: int
    sums: list[int]

    def __str__(self) -> str:  # the decode worker keys prefetches by str(handle.ref)
        return f"shm:{self.pid}:{self.ino}:{self.offset}:{self.generation:x}"


def _word_view(t: torch.Tensor) -> torch.Tensor:
    """The bytes of contiguous ``t`` as the widest integers that tile them."""
    b = t.reshape(-1).view(torch.uint8)
    for dt, size in ((torch.int64, 8), (torch.int32, 4), (torch.int16, 2)):
        if b.numel() % size == 0:
            return b.view(dt)
    return b


def checksum(t: torch.Tensor) -> int:
    """64-bit wrap-around sum of the words of contiguous ``t`` (memory-bandwidth speed)."""
    return int(_word_view(t).sum(dtype=torch.int64).item()) & 0xFFFFFFFFFFFFFFFF


def _fused_ok(kv: torch.Tensor) -> bool:
    """Whether engine.kvcopy's word loops apply: contiguous rows of whole 64-bit words."""
    return kv.is_contiguous() and kv[0, 0].numel() * kv.element_size() % 8 == 0


def _words1(t: torch.Tensor) -> Any:
    """A contiguous tensor's bytes as a 1-D numpy uint64 array (a view)."""
    return t.reshape(-1).view(torch.uint8).numpy().view(np.uint64)


# Bytes per checksummed piece: small enough that the copy and the checksum of a piece
# share the core's L2 cache, so the checksum costs a cache read, not a memory read.
PIECE_BYTES = 2 << 20


def piece_tokens(shape: tuple[int, ...] | torch.Size, itemsize: int) -> int:
    per_token = math.prod(shape[3:]) * itemsize
    return max(1, PIECE_BYTES // max(1, per_token))


def pieces(shape: tuple[int, ...] | torch.Size, step: int) -> list[tuple[int, int, int, int]]:
    """(layer, 0 for K / 1 for V, first token, end token) of every piece, in memory order
    (each piece is contiguous)."""
    tokens = shape[2]
    return [(layer, j, a, min(a + step, tokens)) for layer in range(shape[0]) for j in (0, 1)
            for a in range(0, tokens, step)]


def _prefault(mm: mmap.mmap, write: bool) -> None:
    """Touch every page so that no later access faults (the point of the arena)."""
    buf = memoryview(mm)
    try:
        t = torch.frombuffer(buf, dtype=torch.uint8)
        if write:
            t[::PAGE] = 0
        else:
            int(t[::PAGE].sum())
    finally:
        del t
        buf.release()


def _sweep_stale_files() -> None:
    """Files of arenas whose process died between creating and unlinking them."""
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return
    for name in names:
        if not name.startswith(FILE_PREFIX):
            continue
        try:
            pid = int(name[len(FILE_PREFIX):].split("-")[0])
        except ValueError:
            continue
        if not os.path.exists(f"/proc/{pid}"):
            try:
                os.unlink(os.path.join(SHM_DIR, name))
            except OSError:
                pass


_FLOCK = struct.Struct("hhqqi4x")  # struct flock on Linux x86-64/aarch64


def _lock_holder(fd: int, offset: int) -> int | None:
    """The pid of a process holding a lock on byte ``offset`` of ``fd``'s file that would
    conflict with an exclusive lock (None: unlocked). Locks of this process never
    conflict with its own, so they are not seen."""
    try:
        res = fcntl.fcntl(fd, fcntl.F_GETLK, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, offset, 1, 0))
    except OSError:
        return None
    l_type, _, _, _, pid = _FLOCK.unpack(res)
    return None if l_type == fcntl.F_UNLCK else pid


def arena_bytes(layers: int, kv_heads: int, head_dim: int, dtype: str, tokens: int) -> int:
    """Bytes that hold ``tokens`` tokens of KV (plus a header page per 16 slots)."""
    itemsize = TORCH_DTYPES[dtype].itemsize
    per_token = 2 * layers * kv_heads * head_dim * itemsize
    return int(math.ceil(tokens * per_token * 1.0625)) + 16 * ALIGN
