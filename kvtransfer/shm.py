"""Same-node KV at memory speed: a pre-faulted shared-memory arena per prefill worker.

The sender (prefill worker) owns one ``ShmArena``: a tmpfs file created with mode 0600,
unlinked at once and kept open, so no file is ever left behind, whatever kills the
process; receivers on the same node open it through ``/proc/<pid>/fd/<fd>`` (same user
only), checked against the file's inode. Both sides map it once and touch every page
before serving, so no page fault lands on the transfer path.

Primitives and who calls them:
- ``ShmArena.put(request_id, kv)`` (sender): allocates a slot, copies the KV in layer by
  layer with a checksum per layer, publishes the slot; returns a ``KVHandle`` (transport
  ``"shm"``) or None when the arena is full (the caller falls back to the object store).
- ``read_into(handle, write, timeout_s)`` (receiver, ``kvtransfer.shm_read``): attaches the arena, takes a shared
  lock on the slot, checks that the slot still holds this transfer, hands each layer
  (a view of shared memory) to ``write(layer, kv_layer)`` (the scatter into the paged
  cache), verifies its checksum, marks the slot done.
- ``ShmArena.release(request_id)`` / ``sweep()`` (sender): free slots whose transfer is
  done, released, or older than the transfer TTL.

Slot lifetime (every way a slot can be held has a bound):
- reserved and being written (``buffer`` then ``put``, or ``put`` alone): by the sender's
  own thread; a ``release`` meanwhile is deferred to the end of the write, which then frees
  the slot instead of publishing it (``put`` raises ``KVTransferError``). A reservation
  whose ``put`` never comes is given back by ``discard`` (the prefill attempt ended), else
  at the TTL.
- published, not yet read: until a reader marks it done, the request is released, or the
  TTL. A ``release`` that comes before the ``put`` (the request ended while its KV was
  still being published) is remembered for a TTL, so the late ``put`` publishes nothing.
- under a reader's lock: until the reader is done, fails or dies (the kernel drops a dead
  process's locks); a reader checks its own deadline between pieces, so it holds the lock
  at most its timeout plus one piece's write. A slot still locked past its TTL is logged
  with the pid of the process that holds it.

No wrong KV: a slot is freed only under an exclusive ``lockf`` lock on its first byte; a
reader holds a shared lock on it while it reads (the kernel drops it if the reader dies),
so a slot is never reused under a reader. A reader that comes after the slot was freed
finds a different generation in the slot header and fails the transfer
(``KVTransferError``: the request is retried or recomputed, never fed stale KV).

Slot header (64 bytes at the slot's start): magic ``SSKVSLT1`` | generation u64 (random,
per transfer) | state u64 (1 ready, 2 done) | payload bytes u64; the payload follows at
+64. Checksums (one 64-bit wrap-around sum of the payload's words per layer: catches
stale, reused or torn slots, not adversaries, who cannot open a 0600 file of another
user) travel in the handle.
"""

from __future__ import annotations

import fcntl
import logging
import math
import mmap
import os
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch

from engine import kvcopy
from kvtransfer.base import KVHandle, KVTransferError

logger = logging.getLogger(__name__)

from kvtransfer.shm_layout import (  # noqa: F401
    ALIGN,
    DONE,
    FILE_PREFIX,
    HEADER,
    HEADER_BYTES,
    MAGIC,
    READY,
    SHM_DIR,
    ShmRef,
    _fused_ok,
    _lock_holder,
    _prefault,
    _sweep_stale_files,
    _words1,
    arena_bytes,
    checksum,
    piece_tokens,
    pieces,
)
from kvtransfer.shm_read import _attached, detach_dead, read, read_into  # noqa: F401


@dataclass
class _Slot:
    request_id: str
    offset: int
    length: int  # bytes reserved (header + payload, rounded up to ALIGN)
    generation: int
    created: float
    # The request ended (release) while a reader was still in the slot, or while the
    # sender was still writing it: freed at the first sweep that finds it unlocked (or by
    # the writer at the end of its write), whether or not a reader marked it done.
    released: bool = False
    # Reserved and being written by the sender (buffer/put): not published, not freed under
    # the writer (only at the TTL).
    writing: bool = True
    # Past its TTL and still locked: the holder was logged once.
    reported: bool = False
    # Word sums of each (layer, K/V) row, computed while the KV was gathered into the slot
    # (``set_sums``): ``put`` of the slot's own tensor then publishes without reading it.
    sums: list[int] | None = None


class ShmArena:
    """The sender's arena. Thread-safe (sends run on a pool, releases on the event loop)."""

    def __init__(self, nbytes: int, ttl_s: float = 300.0) -> None:
        if nbytes < ALIGN:
            raise ValueError(f"a KV arena needs at least {ALIGN} bytes, got {nbytes}")
        _sweep_stale_files()
        self.size = -(-nbytes // ALIGN) * ALIGN
        self.ttl_s = ttl_s
        path = os.path.join(SHM_DIR, f"{FILE_PREFIX}{os.getpid()}-{secrets.token_hex(4)}")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.unlink(path)  # from now on only this process's descriptor keeps it
            os.posix_fallocate(fd, 0, self.size)  # tmpfs pages now; full /dev/shm fails here, not later
            self.mm = mmap.mmap(fd, self.size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
        except BaseException:
            os.close(fd)
            raise
        _prefault(self.mm, write=True)
        self.fd = fd
        st = os.fstat(fd)
        self.dev, self.ino = st.st_dev, st.st_ino
        self._buf = torch.frombuffer(memoryview(self.mm), dtype=torch.uint8)
        self._lock = threading.Lock()
        self._free: list[tuple[int, int]] = [(0, self.size)]  # (offset, length), sorted, coalesced
        self._slots: dict[str, _Slot] = {}
        # Requests released (ended) -> when: a put that comes after its request's release
        # publishes nothing (kept for a TTL).
        self._ended: dict[str, float] = {}
        self._closed = False
        # Counters for health and benchmarks.
        self.puts = 0
        self.full = 0

    # -- allocation -------------------------------------------------------------------
    def _alloc(self, length: int) -> int | None:
        for i, (off, n) in enumerate(self._free):
            if n >= length:
                if n == length:
                    del self._free[i]
                else:
                    self._free[i] = (off + length, n - length)
                return off
        return None

    def _give_back(self, off: int, length: int) -> None:
        self._free.append((off, length))
        self._free.sort()
        merged: list[tuple[int, int]] = []
        for o, n in self._free:
            if merged and merged[-1][0] + merged[-1][1] == o:
                merged[-1] = (merged[-1][0], merged[-1][1] + n)
            else:
                merged.append((o, n))
        self._free = merged

    def _header(self, off: int) -> tuple[bytes, int, int, int]:
        return HEADER.unpack_from(self.mm, off)  # type: ignore[return-value]

    def _try_reclaim(self, slot: _Slot) -> bool:
        """Free slot unless a reader holds it (then it stays, for a later sweep)."""
        try:
            fcntl.lockf(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, slot.offset, os.SEEK_SET)
        except OSError:
            return False
        try:
            HEADER.pack_into(self.mm, slot.offset, b"\0" * 8, 0, 0, 0)
        finally:
            fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, slot.offset, os.SEEK_SET)
        self._give_back(slot.offset, slot.length)
        return True

    # -- sender -----------------------------------------------------------------------
    def _new_slot(self, request_id: str, payload: int) -> _Slot | None:
        length = -(-(HEADER_BYTES + payload) // ALIGN) * ALIGN
        with self._lock:
            if self._closed or request_id in self._ended:
                return None
            self.sweep_locked()
            old = self._slots.pop(request_id, None)
            if old is not None:  # a retried prefill of the same request replaces its slot
                if not self._try_reclaim(old):
                    self._slots[f"{request_id}#stale{old.generation:x}"] = old
            off = self._alloc(length)
            if off is None:
                self.full += 1
                return None
            slot = _Slot(request_id, off, length, secrets.randbits(63) | 1, time.monotonic())
            self._slots[request_id] = slot
            return slot

    def _view(self, slot: _Slot, shape: tuple[int, ...], dtype: torch.dtype, payload: int) -> torch.Tensor:
        start = slot.offset + HEADER_BYTES
        return self._buf[start: start + payload].view(dtype).view(shape)

    def buffer(self, request_id: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
        """A slot's memory for the request's KV to be gathered into (``ModelRunner.
        export_into``); ``put`` of that same tensor then publishes it without a copy. None
        if it does not fit now (the export goes to a fresh tensor)."""
        payload = math.prod(shape) * dtype.itemsize
        slot = self._new_slot(request_id, payload)
        return None if slot is None else self._view(slot, shape, dtype, payload)

    def set_sums(self, request_id: str, sums: list[int]) -> None:
        """The per-(layer, K/V) row sums of what was just gathered into the request's
        ``buffer`` (computed in the gather's loop, ``engine.kvcopy``)."""
        with self._lock:
            slot = self._slots.get(request_id)
            if slot is not None:
                slot.sums = list(sums)

    def put(self, request_id: str, kv: torch.Tensor) -> KVHandle | None:
        """Publish ``kv`` ([layers, 2, tokens, kv_heads, head_dim]): copied into a new slot,
        or, when it is the request's ``buffer``, as it stands; None if it does not fit.

        Checksums: with numba (``engine.kvcopy``), one per (layer, K/V) row, summed in the
        copy's own loop (or in the gather that filled the buffer, ``set_sums``); without,
        one per piece of ``shm_layout.PIECE_BYTES``, summed right after the piece's copy."""
        t0 = time.perf_counter()
        kv = kv.detach()
        payload = kv.numel() * kv.element_size()
        with self._lock:
            slot = self._slots.get(request_id)
            if slot is not None and slot.writing and slot.released:  # released while reserved
                slot.writing = False
                if self._try_reclaim(slot):
                    del self._slots[request_id]
                raise KVTransferError(f"KV of {request_id} was released while it was being published "
                                      "(its request ended)")
            self._check_not_ended(request_id)
            in_place = (slot is not None and slot.writing and not slot.released and kv.is_contiguous()
                        and kv.data_ptr() == self._buf.data_ptr() + slot.offset + HEADER_BYTES
                        and slot.length >= HEADER_BYTES + payload)
        if not in_place:
            slot = self._new_slot(request_id, payload)
            if slot is None:
                with self._lock:
                    self._check_not_ended(request_id)
                return None
        assert slot is not None
        off, gen = slot.offset, slot.generation
        try:
            dst = self._view(slot, tuple(kv.shape), kv.dtype, payload)
            rows = 2 * kv.shape[0]
            fused = kv.shape[2] > 0 and _fused_ok(kv) and kvcopy.available()
            if in_place and slot.sums is not None and len(slot.sums) == rows:
                step, sums = max(1, kv.shape[2]), list(slot.sums)
            elif fused:
                # One piece per (layer, K/V) row; the sums come out of the copy (or one
                # read of the buffer in place) at memory speed, all rows in one call.
                step, d = kv.shape[2], _words1(dst).reshape(rows, -1)
                sums = kvcopy.rows_sum(d) if in_place else kvcopy.copy_rows_sum(d, _words1(kv).reshape(rows, -1))
            else:
                step = piece_tokens(kv.shape, kv.element_size())
                sums = []
                # Piece by piece: the checksum reads what the copy just wrote, from cache.
                for layer, j, a, b in pieces(kv.shape, step):
                    piece = dst[layer, j, a:b]
                    if not in_place:
                        piece.copy_(kv[layer, j, a:b])
                    sums.append(checksum(piece))
            self._publish(request_id, slot, payload)
        except BaseException:
            self.discard(request_id, gen)
            raise
        self.puts += 1
        ref = ShmRef(os.getpid(), self.fd, self.dev, self.ino, self.size, off, payload, gen, step, sums)
        return KVHandle(request_id, tuple(kv.shape), str(kv.dtype).removeprefix("torch."), payload, "shm",
                        ref, time.perf_counter() - t0)

    def _check_not_ended(self, request_id: str) -> None:
        if request_id in self._ended:
            raise KVTransferError(f"KV of {request_id} was released before it was published "
                                  "(its request ended)")

    def _publish(self, request_id: str, slot: _Slot, payload: int) -> None:
        """End of the sender's write: the slot becomes readable, unless its request was
        released (or the slot expired) meanwhile; then it is freed, never published."""
        with self._lock:
            current = self._slots.get(request_id) is slot
            if not current or slot.released:
                slot.writing, slot.released = False, True  # a replaced one: the sweep frees it
                if current and self._try_reclaim(slot):
                    del self._slots[request_id]
                raise KVTransferError(f"KV of {request_id} was released while it was being published "
                                      "(its request ended)")
            HEADER.pack_into(self.mm, slot.offset, MAGIC, slot.generation, READY, payload)
            slot.writing = False

    def release(self, request_id: str) -> None:
        """The request ended (or its transfer was abandoned): free its slot now, or at a
        later sweep if a reader is still in it, or at the end of its write if the sender
        is still writing it; a put that comes later publishes nothing. Idempotent."""
        with self._lock:
            self._ended[request_id] = time.monotonic()
            slot = self._slots.get(request_id)
            if slot is None:
                return
            if slot.writing:  # the writer frees it when its write ends (_publish)
                slot.released = True
            elif self._try_reclaim(slot):
                del self._slots[request_id]
            else:
                slot.released = True

    def discard(self, request_id: str, generation: int | None = None, reserved_only: bool = False) -> None:
        """The sender gives up a slot it reserved or published (the prefill attempt ended
        without handing the KV on: aborted, failed, or its receiver died); unlike
        ``release``, the request may still come again (a retried prefill). With
        ``generation``, only that transfer's slot; with ``reserved_only``, only a slot not
        yet published."""
        with self._lock:
            slot = self._slots.get(request_id)
            if (slot is None or (generation is not None and slot.generation != generation)
                    or (reserved_only and not slot.writing)):
                return
            slot.writing = False
            if self._try_reclaim(slot):
                del self._slots[request_id]
            else:
                slot.released = True

    def sweep(self) -> None:
        with self._lock:
            self.sweep_locked()

    def sweep_locked(self) -> None:
        now = time.monotonic()
        for key, slot in list(self._slots.items()):
            expired = now - slot.created > self.ttl_s
            if slot.writing and not expired:
                continue  # the sender is still writing it
            magic, gen, state, _ = self._header(slot.offset)
            done = magic == MAGIC and gen == slot.generation and state == DONE
            stale = key != slot.request_id  # replaced by a retry
            if done or stale or slot.released or expired:
                if self._try_reclaim(slot):
                    del self._slots[key]
                elif expired and not slot.reported:
                    slot.reported = True
                    logger.warning("KV arena slot of %s is still locked %.0f s after it was made (TTL %.0f s): "
                                   "held by process %s", slot.request_id, now - slot.created, self.ttl_s,
                                   _lock_holder(self.fd, slot.offset))
        for rid in [r for r, t in self._ended.items() if now - t > self.ttl_s]:
            del self._ended[rid]

    def slots(self) -> list[dict[str, Any]]:
        """What each held slot is (debugging, tests): request, age, state in its header,
        whether released or being written, and the pid holding its lock (None: unlocked)."""
        now = time.monotonic()
        with self._lock:
            out = []
            for key, slot in self._slots.items():
                magic, gen, state, _ = self._header(slot.offset)
                out.append({"key": key, "request_id": slot.request_id, "age_s": now - slot.created,
                            "state": {READY: "ready", DONE: "done"}.get(state, "empty")
                            if magic == MAGIC and gen == slot.generation else "empty",
                            "released": slot.released, "writing": slot.writing,
                            "locked_by": _lock_holder(self.fd, slot.offset)})
            return out

    def held(self) -> int:
        """Slots not yet freed (0 when idle, after a sweep)."""
        with self._lock:
            self.sweep_locked()
            return len(self._slots)

    def free_bytes(self) -> int:
        with self._lock:
            return sum(n for _, n in self._free)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._slots.clear()
            del self._buf
            try:
                self.mm.close()
            except BufferError:  # a view is still alive: the mapping goes with the process
                pass
            os.close(self.fd)
