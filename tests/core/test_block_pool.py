"""Free queue, block pool and request block hashes."""

from __future__ import annotations

import pathlib
import re

import pytest

from pagellm.core.block_pool import BlockPool, FreeBlockQueue, KVCacheBlock, hash_block_tokens
from pagellm.core.request import RequestStatus

from tests.core.core_sim import make_request


def ids(queue: FreeBlockQueue) -> list[int]:
    return [b.block_id for b in queue]


def test_core_imports_no_torch():
    core = pathlib.Path(__file__).resolve().parents[2] / "pagellm" / "core"
    for path in core.glob("*.py"):
        src = path.read_text()
        assert not re.search(r"^\s*(import|from)\s+(torch|numpy)\b", src, re.M), path.name
        assert not re.search(r"^from\s+pagellm\.config\s+import", src, re.M), f"{path.name}: config imports torch"


# ---- FreeBlockQueue ----

def test_free_queue_order_and_o1_ops():
    blocks = [KVCacheBlock(i) for i in range(5)]
    q = FreeBlockQueue(blocks)
    assert len(q) == 5 and ids(q) == [0, 1, 2, 3, 4]
    q.remove(blocks[2])  # middle
    assert ids(q) == [0, 1, 3, 4] and len(q) == 4
    assert not FreeBlockQueue.contains(blocks[2])
    assert q.popleft() is blocks[0]
    q.append(blocks[2])
    q.appendleft(blocks[0])
    assert ids(q) == [0, 1, 3, 4, 2]
    q.remove(blocks[2])  # tail
    q.remove(blocks[0])  # head
    assert ids(q) == [1, 3, 4]
    for _ in range(3):
        q.popleft()
    assert len(q) == 0 and ids(q) == []
    with pytest.raises(IndexError):
        q.popleft()
    with pytest.raises(ValueError):
        q.remove(blocks[1])
    q.append(blocks[1])
    with pytest.raises(ValueError):
        q.append(blocks[1])


# ---- BlockPool ----

def test_new_blocks_come_from_head_with_ref_one():
    pool = BlockPool(4, enable_caching=True)
    got = pool.get_new_blocks(3)
    assert [b.block_id for b in got] == [0, 1, 2]
    assert all(b.ref_cnt == 1 for b in got)
    assert pool.get_num_free_blocks() == 1 and pool.usage == 0.75
    with pytest.raises(ValueError):
        pool.get_new_blocks(2)
    pool.free_blocks(reversed(got))
    assert pool.get_num_free_blocks() == 4 and pool.usage == 0.0


def test_eviction_of_cached_free_blocks_is_lru():
    pool = BlockPool(3, enable_caching=True)
    blocks = pool.get_new_blocks(3)
    hashes = [hash_block_tokens(None, [i, i]) for i in range(3)]
    pool.cache_full_blocks(blocks, hashes, 0, 3)
    assert all(pool.get_cached_block(h) is b for h, b in zip(hashes, blocks))
    pool.free_blocks(reversed(blocks))  # a request's tail first: 2, 1, 0
    assert ids(pool.free_block_queue) == [2, 1, 0]
    # Freed blocks keep their hashes: still hits.
    assert pool.get_cached_block(hashes[0]) is blocks[0]
    (b,) = pool.get_new_blocks(1)  # evicts block 2, the least valuable
    assert b is blocks[2] and b.block_hash is None
    assert pool.get_cached_block(hashes[2]) is None
    assert pool.get_cached_block(hashes[1]) is blocks[1]
    assert pool.num_evictions == 1


def test_uncached_free_blocks_are_reused_before_cached_ones():
    pool = BlockPool(4, enable_caching=True)
    blocks = pool.get_new_blocks(3)
    pool.cache_full_blocks(blocks, [hash_block_tokens(None, [1]), hash_block_tokens(None, [2])], 0, 2)
    pool.free_blocks(reversed(blocks))  # block 2 holds no hash
    assert ids(pool.free_block_queue) == [2, 3, 1, 0]


def test_touch_free_cached_block_revives_it():
    pool = BlockPool(2, enable_caching=True)
    (b,) = pool.get_new_blocks(1)
    h = hash_block_tokens(None, [7, 8])
    pool.cache_full_blocks([b], [h], 0, 1)
    pool.free_blocks([b])
    assert b.ref_cnt == 0 and pool.get_num_free_blocks() == 2
    hit = pool.get_cached_block(h)
    assert hit is b
    pool.touch([hit])
    assert b.ref_cnt == 1 and pool.get_num_free_blocks() == 1
    assert not FreeBlockQueue.contains(b)
    pool.touch([hit])  # a second sharer
    assert b.ref_cnt == 2
    pool.free_blocks([b])
    assert b.ref_cnt == 1 and pool.get_num_free_blocks() == 1
    pool.free_blocks([b])
    assert b.ref_cnt == 0 and pool.get_num_free_blocks() == 2
    with pytest.raises(ValueError):
        pool.free_blocks([b])


def test_existing_hash_mapping_is_kept():
    pool = BlockPool(4, enable_caching=True)
    a, b = pool.get_new_blocks(2)
    h = hash_block_tokens(None, [1, 2])
    pool.cache_full_blocks([a], [h], 0, 1)
    pool.cache_full_blocks([b], [h], 0, 1)
    assert pool.get_cached_block(h) is a
    assert b.block_hash is None
    pool.free_blocks([b])  # freeing the duplicate does not disturb the mapping
    pool.get_new_blocks(3)
    assert pool.get_cached_block(h) is a


def test_caching_disabled_and_reset():
    pool = BlockPool(2, enable_caching=False)
    (b,) = pool.get_new_blocks(1)
    h = hash_block_tokens(None, [1])
    pool.cache_full_blocks([b], [h], 0, 1)
    assert pool.get_cached_block(h) is None and b.block_hash is None

    pool = BlockPool(2, enable_caching=True)
    (b,) = pool.get_new_blocks(1)
    pool.cache_full_blocks([b], [h], 0, 1)
    assert pool.reset_prefix_cache()
    assert pool.get_cached_block(h) is None and b.block_hash is None


# ---- hashes and requests ----

def test_hash_covers_parent_tokens_and_extra_keys():
    h1 = hash_block_tokens(None, [1, 2])
    assert h1 == hash_block_tokens(None, [1, 2])
    assert h1 != hash_block_tokens(None, [2, 1])
    assert hash_block_tokens(h1, [3, 4]) != hash_block_tokens(hash_block_tokens(None, [9, 9]), [3, 4])
    assert hash_block_tokens(None, [3, 4]) != hash_block_tokens(h1, [3, 4])
    assert h1 != hash_block_tokens(None, [1, 2], extra_keys="salt")


def test_request_block_hashes_are_incremental():
    r = make_request("a", [1, 2, 3, 4, 5], max_tokens=10)
    assert r.block_hashes == []
    r.enable_block_hashing(2)
    assert len(r.block_hashes) == 2
    for t in [6, 7, 8]:
        r.append_output_token_ids(t)
    r.append_output_token_ids([9, 10])
    fresh = make_request("b", list(r.all_token_ids), max_tokens=10)
    fresh.enable_block_hashing(2)
    assert r.block_hashes == fresh.block_hashes and len(r.block_hashes) == 5
    assert r.num_tokens == 10 and r.num_prompt_tokens == 5 and r.num_output_tokens == 5
    assert r.all_token_ids == list(range(1, 11)) and r.prompt_token_ids == [1, 2, 3, 4, 5]


def test_request_status_helpers():
    r = make_request("a", [1], max_tokens=1)
    assert r.status == RequestStatus.WAITING and not r.is_finished and r.num_cached_tokens == -1
    for status, reason in [(RequestStatus.FINISHED_STOPPED, "stop"), (RequestStatus.FINISHED_LENGTH, "length"),
                           (RequestStatus.FINISHED_ABORTED, "abort")]:
        assert RequestStatus.is_finished(status) and RequestStatus.finish_reason(status) == reason
    for status in (RequestStatus.WAITING, RequestStatus.RUNNING, RequestStatus.PREEMPTED):
        assert not RequestStatus.is_finished(status) and RequestStatus.finish_reason(status) is None
