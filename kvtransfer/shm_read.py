"""The receiving side of the same-node KV arena (kvtransfer.shm): attach a prefill
worker's arena, read a slot under a shared lock into the paged cache, checking its
checksums; unmap arenas whose owner died."""

from __future__ import annotations

import fcntl
import logging
import mmap
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine import kvcopy
from kvtransfer.base import TORCH_DTYPES, KVHandle, KVTransferError

logger = logging.getLogger(__name__)

from kvtransfer.shm_layout import (
    DONE,
    HEADER,
    HEADER_BYTES,
    MAGIC,
    ShmRef,
    _fused_ok,
    _prefault,
    _words1,
    checksum,
    pieces,
)


@dataclass
class _Attached:
    fd: int
    owner_fd: int
    mm: mmap.mmap
    buf: torch.Tensor


_attached: dict[tuple[int, int, int], _Attached] = {}
_attach_lock = threading.Lock()


def _attach(ref: ShmRef) -> _Attached:
    key = (ref.pid, ref.dev, ref.ino)
    with _attach_lock:
        a = _attached.get(key)
        if a is not None:
            return a
        try:
            fd = os.open(f"/proc/{ref.pid}/fd/{ref.fd}", os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise KVTransferError(f"KV arena of process {ref.pid} is gone ({e.strerror}): its prefill "
                                  "worker died") from None
        try:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != (ref.dev, ref.ino) or st.st_size != ref.size:
                raise KVTransferError(f"KV arena of process {ref.pid} is gone (descriptor {ref.fd} now "
                                      "names another file): its prefill worker died")
            mm = mmap.mmap(fd, ref.size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
        except BaseException:
            os.close(fd)
            raise
        _prefault(mm, write=False)
        a = _attached[key] = _Attached(fd, ref.fd, mm, torch.frombuffer(memoryview(mm), dtype=torch.uint8))
        return a


def detach_dead() -> int:
    """Unmap arenas whose owner process is gone, so that their memory returns (the file
    was unlinked: the last mapping frees it). Returns how many stay attached."""
    with _attach_lock:
        for key, a in list(_attached.items()):
            pid, dev, ino = key
            try:
                st = os.stat(f"/proc/{pid}/fd/{a.owner_fd}")
                alive = (st.st_dev, st.st_ino) == (dev, ino)
            except OSError:
                alive = False
            if not alive:
                del _attached[key]
                a.buf = torch.empty(0, dtype=torch.uint8)
                try:
                    a.mm.close()
                except BufferError:  # a reader still holds a view: unmapped with it
                    pass
                os.close(a.fd)
        return len(_attached)


def read_into(handle: KVHandle, write: Callable[[int, int, int, torch.Tensor], int | None],
              timeout_s: float) -> None:
    """Hand the slot's KV piece by piece to ``write(layer, j, first_token, kv)`` (j: 0 key,
    1 value; ``kv``: ``[n, kv_heads, head_dim]``, a view of shared memory valid only
    during the call; ``write`` returns the piece's ``checksum`` if it computed it while
    copying, else None),
    checking every piece's checksum; then mark the slot done. Raises ``KVTransferError`` if the slot no longer holds this
    transfer or a checksum fails (``write`` may have seen some layers by then)."""
    ref: ShmRef = handle.ref
    if ref is None:
        raise KVTransferError(f"KV of {handle.request_id} was released before it was read")
    a = _attach(ref)
    deadline = time.monotonic() + timeout_s
    while True:  # the sender holds the lock only for a few microseconds while freeing
        try:
            fcntl.lockf(a.fd, fcntl.LOCK_SH | fcntl.LOCK_NB, 1, ref.offset, os.SEEK_SET)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise KVTransferError(f"KV slot of {handle.request_id} stayed locked for {timeout_s}s") from None
            time.sleep(0.001)
    try:
        magic, gen, state, nbytes = HEADER.unpack_from(a.mm, ref.offset)
        if magic != MAGIC or gen != ref.generation or nbytes != ref.nbytes:
            raise KVTransferError(f"KV slot of {handle.request_id} was freed before it was read "
                                  "(released, aborted or expired)")
        dtype = TORCH_DTYPES[handle.dtype]
        start = ref.offset + HEADER_BYTES
        kv = a.buf[start: start + nbytes].view(dtype).view(handle.shape)
        spans = pieces(kv.shape, ref.piece_tokens)
        if len(ref.sums) != len(spans):
            raise KVTransferError(f"KV of {handle.request_id}: {len(ref.sums)} checksums for {len(spans)} pieces")
        for (layer, j, a0, b0), want in zip(spans, ref.sums):
            # A writer that sums the words it copies (ModelRunner.write_kv with numba) returns
            # the sum; else the scatter pulls the piece into cache and the checksum reads it
            # from there. A piece that fails was written into blocks that are then never used.
            if time.monotonic() > deadline:  # a reader holds the slot no longer than its deadline
                raise KVTransferError(f"KV of {handle.request_id} missed its {timeout_s}s deadline while "
                                      "being read")
            piece = kv[layer, j, a0:b0]
            got = write(layer, j, a0, piece)
            if (got if got is not None else checksum(piece)) != want:
                raise KVTransferError(f"KV of {handle.request_id} layer {layer} {'KV'[j]} tokens {a0}..{b0} "
                                      "failed its checksum")
        HEADER.pack_into(a.mm, ref.offset, MAGIC, gen, DONE, nbytes)
    finally:
        fcntl.lockf(a.fd, fcntl.LOCK_UN, 1, ref.offset, os.SEEK_SET)


def read(handle: KVHandle, timeout_s: float) -> torch.Tensor:
    """A private copy of the slot's KV (callers that want a tensor, not a scatter)."""
    out = torch.empty(handle.shape, dtype=TORCH_DTYPES[handle.dtype])

    fused = out.numel() > 0 and _fused_ok(out) and kvcopy.available()

    def write(layer: int, j: int, first: int, kv: torch.Tensor) -> int | None:
        dst = out[layer, j, first:first + kv.shape[0]]
        if fused and kv.is_contiguous():
            return kvcopy.copy_sum(_words1(dst), _words1(kv))
        dst.copy_(kv)
        return None

    read_into(handle, write, timeout_s)
    return out
