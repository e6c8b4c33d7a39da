"""KVCacheManager: which blocks each request holds, prefix lookup, and allocation for a step's new tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from pagellm.core.block_pool import BlockPool, KVCacheBlock
from pagellm.core.request import Request


@dataclass
class PrefixCacheStats:
    """Cumulative prefix-cache counters, in tokens (a live object: read deltas, or reset() it)."""

    requests: int = 0  # lookups counted
    queries: int = 0  # tokens looked up
    hits: int = 0  # tokens found in the cache

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0

    def reset(self) -> None:
        self.requests = self.queries = self.hits = 0


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True, max_model_len: int = 0) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.max_model_len = max_model_len
        self.block_pool = BlockPool(num_blocks, enable_caching)
        self.req_to_blocks: dict[str, list[KVCacheBlock]] = {}
        # The same blocks' ids, kept in step (the block table the scheduler sends every step, without rebuilding it).
        self.req_to_block_ids: dict[str, list[int]] = {}
        # How many leading blocks of each request are registered in (or came from) the prefix cache.
        self.num_cached_blocks: dict[str, int] = {}
        self.prefix_cache_stats = PrefixCacheStats()

    @property
    def num_blocks(self) -> int:
        return self.block_pool.num_blocks

    @property
    def usage(self) -> float:
        return self.block_pool.usage

    def get_num_free_blocks(self) -> int:
        return self.block_pool.get_num_free_blocks()

    # ---- prefix lookup ----

    def get_computed_blocks(self, request: Request, count_stats: bool = True) -> tuple[list[KVCacheBlock], int]:
        """The longest chain of cached full blocks that starts the request's tokens, and how many tokens it covers.

        At least one token is always left to compute (its logits give the next token), so a fully cached
        sequence gives up its last block. Nothing is touched: pass the blocks to allocate_slots.
        """
        if not self.enable_caching:
            return [], 0
        request.enable_block_hashing(self.block_size)
        max_blocks = (request.num_tokens - 1) // self.block_size
        hashes = request.block_hashes
        blocks: list[KVCacheBlock] = []
        for i in range(min(max_blocks, len(hashes))):
            block = self.block_pool.get_cached_block(hashes[i])
            if block is None:
                break
            blocks.append(block)
        num_hit = len(blocks) * self.block_size
        if count_stats:
            self.record_prefix_cache_query(request.num_tokens, num_hit)
        return blocks, num_hit

    def record_prefix_cache_query(self, num_tokens: int, num_hit_tokens: int) -> None:
        if not self.enable_caching:
            return
        self.prefix_cache_stats.requests += 1
        self.prefix_cache_stats.queries += num_tokens
        self.prefix_cache_stats.hits += num_hit_tokens

    # ---- allocation ----

    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        new_computed_blocks: Optional[list[KVCacheBlock]] = None,
    ) -> Optional[list[KVCacheBlock]]:
        """Give the request blocks for num_computed_tokens + hit tokens + num_new_tokens, or None.

        new_computed_blocks (from get_computed_blocks) may only be given while the request holds no blocks.
        On None nothing changed. On success the hit blocks are touched, and every block that these tokens fill
        is registered in the prefix cache right away: within one forward pass each layer writes all new K/V
        before any attention reads it, so another request scheduled in the same step may already share them.
        Returns the newly allocated blocks (not the hits).
        """
        if num_new_tokens < 0:
            raise ValueError(f"num_new_tokens must be non-negative, got {num_new_tokens}")
        hits = new_computed_blocks or []
        req_id = request.request_id
        req_blocks = self.req_to_blocks.get(req_id)
        if hits and req_blocks:
            raise ValueError(f"request {req_id} already holds blocks: prefix hits only apply before its first block")
        num_held = len(req_blocks) if req_blocks else 0
        num_total_tokens = request.num_computed_tokens + len(hits) * self.block_size + num_new_tokens
        if self.max_model_len and num_total_tokens > self.max_model_len:
            raise ValueError(
                f"request {req_id}: {num_total_tokens} tokens exceed max_model_len {self.max_model_len}"
            )
        num_new_blocks = max(0, cdiv(num_total_tokens, self.block_size) - num_held - len(hits))
        # Touching a free cached hit takes it out of the free queue: it can no longer be handed out.
        num_free_hits = sum(1 for b in hits if b.ref_cnt == 0)
        if num_new_blocks > self.block_pool.get_num_free_blocks() - num_free_hits:
            return None

        if req_blocks is None:
            req_blocks = self.req_to_blocks[req_id] = []
            self.req_to_block_ids[req_id] = []
            self.num_cached_blocks[req_id] = 0
        block_ids = self.req_to_block_ids[req_id]
        if hits:
            self.block_pool.touch(hits)
            req_blocks.extend(hits)
            block_ids.extend(b.block_id for b in hits)
            self.num_cached_blocks[req_id] = len(hits)
        new_blocks = self.block_pool.get_new_blocks(num_new_blocks) if num_new_blocks else []
        if new_blocks:
            req_blocks.extend(new_blocks)
            block_ids.extend(b.block_id for b in new_blocks)

        if self.enable_caching:
            request.enable_block_hashing(self.block_size)
            num_full = min(num_total_tokens // self.block_size, len(request.block_hashes))
            num_cached = self.num_cached_blocks[req_id]
            if num_full > num_cached:
                self.block_pool.cache_full_blocks(req_blocks, request.block_hashes, num_cached, num_full)
                self.num_cached_blocks[req_id] = num_full
        return new_blocks

    def free_excess(self, request: Request) -> None:
        """Give back the blocks past the request's computed tokens: after a verify step they held only rejected
        draft tokens (a block the prefix cache knows covers known tokens only, so it is never among them)."""
        req_id = request.request_id
        blocks = self.req_to_blocks.get(req_id)
        keep = cdiv(request.num_computed_tokens, self.block_size)
        if not blocks or len(blocks) <= keep:
            return
        assert self.num_cached_blocks[req_id] <= keep, "a cached block past the computed tokens"
        excess = blocks[keep:]
        del blocks[keep:]
        del self.req_to_block_ids[req_id][keep:]
        self.block_pool.free_blocks(reversed(excess))

    def free(self, request: Request) -> None:
        """Release the request's blocks, last block first (so its tail is evicted before its shared prefix)."""
        blocks = self.req_to_blocks.pop(request.request_id, None)
        self.req_to_block_ids.pop(request.request_id, None)
        self.num_cached_blocks.pop(request.request_id, None)
        if blocks:
            self.block_pool.free_blocks(reversed(blocks))

    def get_blocks(self, request_id: str) -> list[KVCacheBlock]:
        return self.req_to_blocks.get(request_id, [])

    def get_block_ids(self, request_id: str) -> list[int]:
        """The request's block table, a live list: read it, never change it."""
        return self.req_to_block_ids.get(request_id, [])

    def reset_prefix_cache(self) -> bool:
        ok = self.block_pool.reset_prefix_cache()
        if ok:
            # Blocks of running requests lost their hashes: never register them again.
            for req_id, blocks in self.req_to_blocks.items():
                self.num_cached_blocks[req_id] = len(blocks)
        return ok
