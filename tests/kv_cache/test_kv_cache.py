"""Block pool and KV-cache manager: ref counts, LRU eviction, prefix hits."""

from __future__ import annotations

from compiled_llm.kv_cache.block_pool import BlockPool
from compiled_llm.kv_cache.kv_cache_manager import KVCacheManager, block_hash
from compiled_llm.request import Request
from compiled_llm.sampling_params import SamplingParams


def make_request(request_id: str, tokens: list[int]) -> Request:
    return Request(request_id, tokens, SamplingParams(), max_tokens=8, sampling_seed=0)


def test_pool_lru_eviction_and_refcounts() -> None:
    pool = BlockPool(4, enable_caching=True)
    a, b = pool.allocate(2)
    pool.cache(a, b"ha")
    pool.cache(b, b"hb")
    pool.free([b, a])  # tail first: b is evicted before a
    assert pool.num_free_blocks == 4
    assert pool.get_cached(b"ha") is a
    pool.allocate(2)  # the two never-used blocks
    (first,) = pool.allocate(1)
    assert first is b and pool.get_cached(b"hb") is None and pool.get_cached(b"ha") is a
    pool.touch([a])  # a prefix hit takes an idle cached block back off the free list
    assert a.ref_cnt == 1 and pool.num_free_blocks == 0


def test_manager_prefix_hits_share_blocks() -> None:
    manager = KVCacheManager(num_blocks=8, block_size=4, enable_prefix_caching=True)
    prompt = list(range(10))
    r1 = make_request("1", prompt)
    assert manager.get_computed_blocks(r1) == ([], 0)
    assert manager.allocate_slots(r1, len(prompt))
    r1.num_computed_tokens = len(prompt)
    r2 = make_request("2", prompt[:8] + [99, 98])
    hits, num_cached = manager.get_computed_blocks(r2)
    assert num_cached == 8 and [b.block_id for b in hits] == manager.block_ids(r1)[:2]
    assert manager.allocate_slots(r2, 2, hits)
    assert hits[0].ref_cnt == 2
    manager.forget(r1)
    manager.forget(r2)
    assert manager.num_free_blocks == 8


def test_whole_prompt_hit_still_computes_last_token() -> None:
    manager = KVCacheManager(num_blocks=8, block_size=4, enable_prefix_caching=True)
    prompt = list(range(8))
    r1 = make_request("1", prompt)
    manager.allocate_slots(r1, 8)
    _, num_cached = manager.get_computed_blocks(make_request("2", prompt))
    assert num_cached == 4  # the last block is recomputed so its last token yields logits


def test_allocation_failure_changes_nothing() -> None:
    manager = KVCacheManager(num_blocks=2, block_size=4, enable_prefix_caching=True)
    r = make_request("1", list(range(12)))
    assert not manager.allocate_slots(r, 12)
    assert manager.num_free_blocks == 2 and manager.block_ids(r) == []


def test_hash_chain_depends_on_parent() -> None:
    tokens = [1, 2, 3, 4]
    assert block_hash(b"x", tokens) != block_hash(b"y", tokens)
    assert block_hash(b"x", tokens) == block_hash(b"x", list(tokens))


def test_request_token_ids_slices_prompt_and_output() -> None:
    """Request.token_ids(start, end), which the step loop and the block hashes use instead of
    building all_token_ids, is that list's slice for every range."""
    request = make_request("r", [10, 11, 12, 13])
    request.output_token_ids.extend([20, 21, 22])
    whole = request.all_token_ids
    for start in range(len(whole) + 1):
        for end in range(start, len(whole) + 2):
            assert request.token_ids(start, end) == whole[start:end], (start, end)
