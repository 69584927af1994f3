"""Paged KV-cache bookkeeping: fixed-size blocks, a free list, reference counts and
prefix caching by block hash.

A full block is identified by the hash of (hash of the previous block, its token ids);
a sequence whose prompt starts with the same tokens reuses those blocks instead of
computing them again. Freed blocks that carry a hash stay findable (in LRU order) until
their space is needed for something else.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from engine.sequence import Sequence


class NoFreeBlocksError(RuntimeError):
    """Raised when an allocation is attempted without checking capacity first."""


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    # Chain hash of a full block whose KV is valid, or None.
    block_hash: bytes | None = None
    # Token ids the hash was computed over (checked on lookup, so a hash collision can
    # never hand out wrong KV).
    token_ids: tuple[int, ...] = field(default_factory=tuple)


def chain_hash(prev_hash: bytes | None, token_ids: tuple[int, ...]) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    h.update(prev_hash or b"root")
    h.update(",".join(map(str, token_ids)).encode())
    return h.digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: deque[int] = deque(range(num_blocks))
        # Blocks with ref_count 0 that still hold hashed KV, least recently used first.
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self._hash_to_block: dict[bytes, int] = {}
        self.prefix_hits = 0
        self.prefix_queries = 0

    # -- capacity -------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free) + len(self._evictable)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks no live sequence holds that keep a prefix's KV (evictable, counted free)."""
        return len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """New blocks seq needs so that its table covers num_tokens slots."""
        need = -(-num_tokens // self.block_size)
        return max(0, need - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_needed(seq, num_tokens) <= self.num_free_blocks

    # -- allocation -----------------------------------------------------------------
    def _take_block(self) -> int:
        if self._free:
            block_id = self._free.popleft()
        elif self._evictable:
            block_id, _ = self._evictable.popitem(last=False)
            block = self.blocks[block_id]
            if block.block_hash is not None and self._hash_to_block.get(block.block_hash) == block_id:
                del self._hash_to_block[block.block_hash]
            block.block_hash, block.token_ids = None, ()
        else:
            raise NoFreeBlocksError("no free KV blocks")
        self.blocks[block_id].ref_count = 1
        return block_id

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Grow seq's block table to cover num_tokens slots."""
        n = self.blocks_needed(seq, num_tokens)
        if n > self.num_free_blocks:
            raise NoFreeBlocksError(f"need {n} blocks, {self.num_free_blocks} free")
        for _ in range(n):
            seq.block_table.append(self._take_block())

    def match_prefix(self, seq: Sequence) -> int:
        """On first admission: reuse cached full blocks of seq's tokens.

        Returns the number of tokens whose KV was found. At least one token is always left
        to compute, since the last position's logits are needed to sample.
        """
        assert not seq.block_table, "match_prefix is for a sequence without blocks"
        if not self.enable_prefix_caching:
            return 0
        tokens = seq.token_ids
        max_blocks = (len(tokens) - 1) // self.block_size
        prev: bytes | None = None
        self.prefix_queries += 1
        for i in range(max_blocks):
            chunk = tuple(tokens[i * self.block_size : (i + 1) * self.block_size])
            h = chain_hash(prev, chunk)
            block_id = self._hash_to_block.get(h)
            if block_id is None or self.blocks[block_id].token_ids != chunk:
                break
            block = self.blocks[block_id]
            if block.ref_count == 0:
                self._evictable.pop(block_id, None)
            block.ref_count += 1
            seq.block_table.append(block_id)
            prev = h
        cached = len(seq.block_table) * self.block_size
        if cached:
            self.prefix_hits += 1
        return cached

    def seal_full_blocks(self, seq: Sequence) -> None:
        """Hash the blocks of seq that are full of computed KV, so later requests reuse them."""
        if not self.enable_prefix_caching:
            return
        tokens = seq.token_ids
        n_full = min(seq.num_computed_tokens // self.block_size, len(seq.block_table))
        prev: bytes | None = None
        for i in range(n_full):
            block = self.blocks[seq.block_table[i]]
            chunk = tuple(tokens[i * self.block_size : (i + 1) * self.block_size])
            if block.block_hash is not None and block.token_ids == chunk:
                prev = block.block_hash
                continue
            h = chain_hash(prev, chunk)
            block.block_hash, block.token_ids = h, chunk
            self._hash_to_block.setdefault(h, block.block_id)
            prev = h

    def fork(self, parent: Sequence, child: Sequence, num_tokens: int) -> tuple[int, int] | None:
        """Give child the KV of parent's first num_tokens tokens: full blocks are shared
        (reference counts), a last partial block gets a fresh block that the caller must
        fill with a copy of the parent's. Returns that (source, destination) pair or None;
        raises NoFreeBlocksError when the partial block does not fit."""
        assert not child.block_table, "fork into a sequence without blocks"
        full, rem = divmod(num_tokens, self.block_size)
        if rem and not self.num_free_blocks:
            raise NoFreeBlocksError("no free KV block for the forked partial block")
        for block_id in parent.block_table[:full]:
            self.blocks[block_id].ref_count += 1
        child.block_table = list(parent.block_table[:full])
        copy = None
        if rem:
            dst = self._take_block()
            child.block_table.append(dst)
            copy = (parent.block_table[full], dst)
        child.num_computed_tokens = num_tokens
        return copy

    def free(self, seq: Sequence) -> None:
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count < 0:
                raise RuntimeError(f"block {block_id} freed twice")
            if block.ref_count == 0:
                if block.block_hash is not None:
                    self._evictable[block_id] = None
                else:
                    self._free.append(block_id)
        seq.block_table = []
        seq.num_computed_tokens = 0
