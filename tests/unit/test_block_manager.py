from engine.block_manager import BlockManager, NoFreeBlocksError
from engine.sequence import SamplingParams, Sequence

import pytest


def seq(rid: str, tokens: list[int]) -> Sequence:
    return Sequence(rid, tokens, SamplingParams(temperature=0, max_tokens=4))


def test_allocate_and_free_returns_every_block():
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    s = seq("a", list(range(10)))
    assert bm.blocks_needed(s, 10) == 3
    bm.allocate(s, 10)
    assert len(s.block_table) == 3 and bm.num_free_blocks == 5
    bm.allocate(s, 12)  # still fits in 3 blocks
    assert len(s.block_table) == 3
    bm.allocate(s, 13)
    assert len(s.block_table) == 4
    bm.free(s)
    assert bm.num_free_blocks == 8 and s.block_table == []
    with pytest.raises(NoFreeBlocksError):
        bm.allocate(seq("b", [1]), 100)


def test_prefix_cache_reuses_full_blocks_and_leaves_one_token():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = seq("a", list(range(12)))
    assert bm.match_prefix(a) == 0
    bm.allocate(a, 12)
    a.num_computed_tokens = 12
    bm.seal_full_blocks(a)
    table_a = list(a.block_table)
    bm.free(a)
    assert bm.num_free_blocks == 16  # hashed blocks are evictable, still counted free

    # Same 12 tokens: only 2 blocks reused, since the last token must be computed.
    b = seq("b", list(range(12)))
    assert bm.match_prefix(b) == 8
    assert b.block_table == table_a[:2]
    # Different tokens after the first block: one block reused.
    c = seq("c", [0, 1, 2, 3, 99, 98, 97, 96, 5])
    assert bm.match_prefix(c) == 4
    assert bm.blocks[table_a[0]].ref_count == 2
    bm.free(b)
    bm.free(c)
    assert bm.blocks[table_a[0]].ref_count == 0


def test_evicted_blocks_are_not_matched_again():
    bm = BlockManager(num_blocks=3, block_size=2)
    a = seq("a", [1, 2, 3, 4, 5])
    bm.allocate(a, 5)
    a.num_computed_tokens = 5
    bm.seal_full_blocks(a)
    bm.free(a)
    # Fill the whole cache with other tokens: a's hashed blocks get evicted.
    b = seq("b", [9] * 6)
    bm.allocate(b, 6)
    bm.free(b)
    c = seq("c", [1, 2, 3, 4, 5])
    assert bm.match_prefix(c) == 0


def test_cached_blocks_are_counted_apart_from_used():
    """Blocks of a finished request's prefix are cached (evictable): not used, and back in
    use only while a live request shares them."""
    bm = BlockManager(num_blocks=16, block_size=4)
    a = seq("a", list(range(12)))
    bm.allocate(a, 12)
    a.num_computed_tokens = 12
    bm.seal_full_blocks(a)
    assert (bm.num_used_blocks, bm.num_cached_blocks) == (3, 0)
    bm.free(a)
    assert (bm.num_used_blocks, bm.num_cached_blocks) == (0, 3)
    b = seq("b", list(range(12)))
    bm.match_prefix(b)  # takes 2 cached blocks back into use
    bm.allocate(b, 12)
    assert (bm.num_used_blocks, bm.num_cached_blocks) == (3, 1)
    bm.free(b)
    assert bm.num_used_blocks == 0
