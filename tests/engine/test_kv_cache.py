"""Block pool and KV cache manager: allocation, ref counts, LRU reuse, verified prefix hits."""

from __future__ import annotations

from engine.config import SamplingParams
from engine.kv_cache import BlockPool, KVCacheManager, chain_hash
from engine.request import Request


def _request(tokens: list[int], rid: str = "r") -> Request:
    return Request(rid, tokens, SamplingParams())


def test_allocate_and_release_counts() -> None:
    pool = BlockPool(8)
    ids = pool.allocate(3)
    assert len(set(ids)) == 3 and pool.num_free == 5
    pool.release(ids)
    assert pool.num_free == 8
    assert all(pool.blocks[i].ref_count == 0 for i in ids)


def test_shared_block_survives_one_release() -> None:
    pool = BlockPool(4)
    (block,) = pool.allocate(1)
    pool.touch([block])
    pool.release([block])
    assert pool.blocks[block].ref_count == 1 and pool.num_free == 3
    pool.release([block])
    assert pool.num_free == 4


def test_uncached_blocks_are_reused_before_cached_ones() -> None:
    pool = BlockPool(3)
    a, b, c = pool.allocate(3)
    pool.register(a, 111, (1, 2))
    pool.release([a])  # cached: goes to the back of the LRU
    pool.release([b])  # uncached: goes to the front
    assert pool.allocate(1) == [b]
    assert pool.lookup(111, (1, 2)) == a  # still cached
    pool.release([c])
    assert pool.allocate(1) == [c]
    assert pool.allocate(1) == [a]  # evicted last, and its hash with it
    assert pool.lookup(111, (1, 2)) is None


def test_lookup_verifies_tokens() -> None:
    pool = BlockPool(2)
    (a,) = pool.allocate(1)
    pool.register(a, 42, (1, 2, 3))
    assert pool.lookup(42, (1, 2, 3)) == a
    assert pool.lookup(42, (9, 9, 9)) is None  # same hash, other tokens: a collision is not a hit


def test_prefix_match_reuses_full_blocks_and_leaves_one_token() -> None:
    kv = KVCacheManager(num_blocks=16, block_size=4)
    first = _request(list(range(12)), "a")
    assert kv.allocate(first, 12)
    first.num_computed_tokens = 12
    kv.cache_full_blocks(first)
    assert len(first.block_hashes) == 3

    same = _request(list(range(12)), "b")
    match = kv.match_prefix(same)
    assert match.block_ids == first.block_ids[:2]  # never the whole prompt: the last token must run
    assert kv.allocate(same, 4, match)
    assert same.num_computed_tokens == 8 and same.block_ids[:2] == first.block_ids[:2]
    assert kv.pool.blocks[first.block_ids[0]].ref_count == 2

    other = _request([0, 1, 2, 3, 99, 5, 6, 7, 8], "c")
    assert kv.match_prefix(other).block_ids == first.block_ids[:1]  # diverges in block 2


def test_chain_hash_depends_on_the_prefix() -> None:
    assert chain_hash(None, (1, 2)) != chain_hash(chain_hash(None, (0, 0)), (1, 2))


def test_allocate_refuses_without_side_effects() -> None:
    kv = KVCacheManager(num_blocks=2, block_size=4)
    request = _request(list(range(20)))
    assert not kv.allocate(request, 20)
    assert request.block_ids == [] and kv.num_free_blocks == 2
    assert kv.allocate(request, 8)
    assert kv.num_free_blocks == 0
    kv.free(request)
    assert kv.num_free_blocks == 2 and request.block_ids == []


def test_reserve_keeps_a_watermark() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=4)
    assert not kv.allocate(_request(list(range(12))), 12, reserve=2)
    assert kv.allocate(_request(list(range(8))), 8, reserve=2)
