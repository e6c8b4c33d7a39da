"""KVCacheManager: prefix lookup, the last-token rule, allocation and its failure."""

from __future__ import annotations

import pytest

from pagellm.core.kv_cache_manager import KVCacheManager

from tests.core.core_sim import make_request


def snapshot(kvm: KVCacheManager):
    pool = kvm.block_pool
    return (
        [(b.ref_cnt, b.block_hash) for b in pool.blocks],
        [b.block_id for b in pool.free_block_queue],
        {k: [b.block_id for b in v] for k, v in kvm.req_to_blocks.items()},
        dict(pool.cached_blocks),
    )


def admit(kvm: KVCacheManager, req, n=None):
    hits, num_hit = kvm.get_computed_blocks(req)
    n = req.num_tokens - num_hit if n is None else n
    assert kvm.allocate_slots(req, n, hits) is not None
    req.num_computed_tokens = num_hit + n
    return num_hit


def test_prefix_hit_on_second_request():
    kvm = KVCacheManager(num_blocks=16, block_size=4, enable_caching=True, max_model_len=64)
    shared = list(range(10, 22))  # 3 full blocks
    a = make_request("a", shared + [1, 2])
    assert admit(kvm, a) == 0
    b = make_request("b", shared + [3, 4, 5])
    hits, num_hit = kvm.get_computed_blocks(b)
    assert num_hit == 12 and [x.block_id for x in hits] == kvm.get_block_ids("a")[:3]
    assert kvm.allocate_slots(b, b.num_tokens - num_hit, hits) is not None
    assert all(x.ref_cnt == 2 for x in hits)
    assert kvm.get_block_ids("b")[:3] == kvm.get_block_ids("a")[:3]
    assert kvm.get_block_ids("b")[3] != kvm.get_block_ids("a")[3]
    stats = kvm.prefix_cache_stats
    assert (stats.requests, stats.queries, stats.hits) == (2, 14 + 15, 12)
    stats.reset()
    assert stats.queries == 0 and stats.hit_rate == 0.0


def test_hits_survive_free_until_evicted():
    kvm = KVCacheManager(num_blocks=4, block_size=4, enable_caching=True, max_model_len=64)
    prompt = list(range(9))
    a = make_request("a", prompt)
    admit(kvm, a)
    kvm.free(a)
    assert kvm.usage == 0.0
    b = make_request("b", prompt)
    assert kvm.get_computed_blocks(b)[1] == 8
    # Another request takes every block: the prefix is evicted.
    c = make_request("c", list(range(100, 116)))
    admit(kvm, c)
    kvm.free(c)
    assert kvm.get_computed_blocks(make_request("d", prompt))[1] == 0


def test_last_token_is_always_computed():
    kvm = KVCacheManager(num_blocks=16, block_size=4, enable_caching=True, max_model_len=64)
    prompt = list(range(8))  # exactly 2 full blocks
    admit(kvm, make_request("a", prompt))
    hits, num_hit = kvm.get_computed_blocks(make_request("b", prompt))
    assert num_hit == 4 and len(hits) == 1  # the last block is recomputed for the last token's logits
    hits, num_hit = kvm.get_computed_blocks(make_request("c", prompt + [99]))
    assert num_hit == 8


def test_hash_chain_depends_on_parent():
    kvm = KVCacheManager(num_blocks=16, block_size=4, enable_caching=True, max_model_len=64)
    a = make_request("a", [1, 1, 1, 1, 5, 6, 7, 8, 0])
    admit(kvm, a)
    # Same second block, different first block: different hash, and no hit at all.
    b = make_request("b", [2, 2, 2, 2, 5, 6, 7, 8, 0])
    assert kvm.get_computed_blocks(b)[1] == 0
    assert b.block_hashes[1] != a.block_hashes[1]
    assert kvm.block_pool.get_cached_block(b.block_hashes[1]) is None
    # Same first block, different second: one block.
    assert kvm.get_computed_blocks(make_request("c", [1, 1, 1, 1, 5, 6, 7, 9, 0]))[1] == 4


def test_allocation_failure_leaves_state_unchanged():
    kvm = KVCacheManager(num_blocks=4, block_size=4, enable_caching=True, max_model_len=64)
    a = make_request("a", list(range(8)) + [50])
    admit(kvm, a)  # 3 blocks
    before = snapshot(kvm)
    b = make_request("b", list(range(8)) + [60, 61, 62, 63, 64, 65])
    hits, num_hit = kvm.get_computed_blocks(b)
    assert num_hit == 8
    assert kvm.allocate_slots(b, b.num_tokens - num_hit, hits) is None  # needs 2 new blocks, 1 free
    assert snapshot(kvm) == before
    c = make_request("c", list(range(200, 220)))
    assert kvm.allocate_slots(c, 20) is None
    assert snapshot(kvm) == before
    assert kvm.allocate_slots(b, 4, hits) is not None  # 1 new block fits


def test_free_cached_hits_count_against_free_blocks():
    kvm = KVCacheManager(num_blocks=4, block_size=4, enable_caching=True, max_model_len=64)
    prefix = list(range(8))
    a = make_request("a", prefix + [9])
    admit(kvm, a)
    kvm.free(a)  # 2 cached free blocks + 2 other free blocks
    b = make_request("b", prefix + list(range(20, 29)))  # 17 tokens: 2 hits + 3 new blocks
    hits, num_hit = kvm.get_computed_blocks(b)
    assert num_hit == 8 and kvm.get_num_free_blocks() == 4
    before = snapshot(kvm)
    assert kvm.allocate_slots(b, 9, hits) is None  # 4 free, but 2 of them are the hits themselves
    assert snapshot(kvm) == before
    assert kvm.allocate_slots(b, 8, hits) is not None  # 2 new blocks: fits exactly
    assert kvm.get_num_free_blocks() == 0
    assert [x.ref_cnt for x in hits] == [1, 1]


def test_incremental_allocation_and_caching():
    kvm = KVCacheManager(num_blocks=8, block_size=4, enable_caching=True, max_model_len=64)
    a = make_request("a", list(range(10)))
    assert len(kvm.allocate_slots(a, 6)) == 2  # chunk 1: tokens 0..5
    a.num_computed_tokens = 6
    assert len(kvm.block_pool.cached_blocks) == 1
    assert len(kvm.allocate_slots(a, 4)) == 1  # chunk 2: tokens 6..9
    a.num_computed_tokens = 10
    assert len(kvm.block_pool.cached_blocks) == 2
    a.append_output_token_ids([11, 12])
    assert kvm.allocate_slots(a, 1) == []  # decode of token 10 fits the third block
    a.num_computed_tokens = 11
    assert len(kvm.get_block_ids("a")) == 3
    with pytest.raises(ValueError):
        kvm.allocate_slots(a, 1, kvm.get_blocks("a")[:1])  # hits only before the first block


def test_free_releases_tail_first():
    kvm = KVCacheManager(num_blocks=6, block_size=2, enable_caching=True, max_model_len=64)
    a = make_request("a", [1, 2, 3, 4, 5, 6, 7])
    admit(kvm, a)
    held = kvm.get_block_ids("a")
    kvm.free(a)
    queue = [b.block_id for b in kvm.block_pool.free_block_queue]
    # The half-full last block has no hash: reused first. The cached ones follow, last block first.
    assert queue[0] == held[3]
    assert queue[-3:] == [held[2], held[1], held[0]]
    assert kvm.get_block_ids("a") == []


def test_caching_disabled():
    kvm = KVCacheManager(num_blocks=8, block_size=4, enable_caching=False, max_model_len=64)
    prompt = list(range(12))
    admit(kvm, make_request("a", prompt))
    assert kvm.get_computed_blocks(make_request("b", prompt)) == ([], 0)
    assert kvm.prefix_cache_stats.hits == 0 and not kvm.block_pool.cached_blocks
