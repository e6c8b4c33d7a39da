"""KV blocks: reference counts, an O(1) LRU free queue, and the hash -> block map of the prefix cache.

A block with ref_cnt 0 sits in the free queue. If it holds a hash it still serves prefix hits until it is
popped for reuse (eviction): freed requests leave their prefix behind at no cost. Invariants:

    block.ref_cnt == 0  <=>  block is in the free queue
    block.block_hash is not None  <=>  cached_blocks[block.block_hash] is block
"""

from __future__ import annotations

import hashlib
from array import array
from typing import Any, Iterable, Optional, Sequence

# A full block's identity: sha256 over its parent's hash, its token ids and its extra keys.
BlockHash = bytes

_NO_PARENT = b"\x00"


def hash_block_tokens(parent: Optional[BlockHash], token_ids: Sequence[int], extra_keys: Any = None) -> BlockHash:
    """Hash of one full block. Covers the parent's hash, so equal hashes mean equal whole prefixes.

    sha256 rather than Python's hash(): the result is stable across processes and collisions cannot be forced
    by crafted prompts (a collision would hand one request another's KV).
    """
    h = hashlib.sha256()
    h.update(_NO_PARENT if parent is None else b"\x01" + parent)
    h.update(len(token_ids).to_bytes(4, "little"))
    h.update(array("q", token_ids).tobytes())
    if extra_keys is not None:
        h.update(b"\x02" + repr(extra_keys).encode("utf-8", "surrogatepass"))
    return h.digest()


class KVCacheBlock:
    __slots__ = ("block_id", "ref_cnt", "block_hash", "prev_free", "next_free")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: Optional[BlockHash] = None
        # Links of the free queue; both None when the block is not in it.
        self.prev_free: Optional[KVCacheBlock] = None
        self.next_free: Optional[KVCacheBlock] = None

    def __repr__(self) -> str:
        h = self.block_hash.hex()[:8] if self.block_hash else None
        return f"KVCacheBlock({self.block_id}, ref={self.ref_cnt}, hash={h})"


class FreeBlockQueue:
    """Doubly linked list of free blocks between two sentinels: O(1) popleft, append, appendleft, remove.

    Head = next to be reused (evicted); tail = most recently freed.
    """

    def __init__(self, blocks: Iterable[KVCacheBlock] = ()) -> None:
        self._head = KVCacheBlock(-1)
        self._tail = KVCacheBlock(-1)
        self._head.next_free = self._tail
        self._tail.prev_free = self._head
        self.num_free_blocks = 0
        for b in blocks:
            self.append(b)

    def __len__(self) -> int:
        return self.num_free_blocks

    @staticmethod
    def contains(block: KVCacheBlock) -> bool:
        return block.next_free is not None

    def _insert_after(self, prev: KVCacheBlock, block: KVCacheBlock) -> None:
        if block.next_free is not None or block.prev_free is not None:
            raise ValueError(f"{block} is already in the free queue")
        nxt = prev.next_free
        assert nxt is not None
        block.prev_free = prev
        block.next_free = nxt
        prev.next_free = block
        nxt.prev_free = block
        self.num_free_blocks += 1

    def append(self, block: KVCacheBlock) -> None:
        prev = self._tail.prev_free
        assert prev is not None
        self._insert_after(prev, block)

    def appendleft(self, block: KVCacheBlock) -> None:
        self._insert_after(self._head, block)

    def remove(self, block: KVCacheBlock) -> None:
        prev, nxt = block.prev_free, block.next_free
        if prev is None or nxt is None:
            raise ValueError(f"{block} is not in the free queue")
        prev.next_free = nxt
        nxt.prev_free = prev
        block.prev_free = block.next_free = None
        self.num_free_blocks -= 1

    def popleft(self) -> KVCacheBlock:
        block = self._head.next_free
        if block is self._tail or block is None:
            raise IndexError("no free blocks")
        self.remove(block)
        return block

    def __iter__(self):
        """Head to tail (for tests and debugging)."""
        b = self._head.next_free
        while b is not self._tail:
            assert b is not None
            yield b
            b = b.next_free


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVCacheBlock(i) for i in range(num_blocks)]
        self.free_block_queue = FreeBlockQueue(self.blocks)
        self.cached_blocks: dict[BlockHash, KVCacheBlock] = {}
        self.num_evictions = 0  # cached blocks whose hash was dropped for reuse

    # ---- allocation ----

    def get_num_free_blocks(self) -> int:
        """Blocks nobody references (cached or not): all can be handed out."""
        return self.free_block_queue.num_free_blocks

    @property
    def usage(self) -> float:
        return 1.0 - self.get_num_free_blocks() / self.num_blocks

    def get_new_blocks(self, n: int) -> list[KVCacheBlock]:
        """n blocks from the head of the free queue, each with ref_cnt 1; cached ones lose their hash."""
        if n > self.free_block_queue.num_free_blocks:
            raise ValueError(f"cannot get {n} blocks: only {self.free_block_queue.num_free_blocks} are free")
        out = []
        for _ in range(n):
            block = self.free_block_queue.popleft()
            assert block.ref_cnt == 0
            self._evict(block)
            block.ref_cnt = 1
            out.append(block)
        return out

    def _evict(self, block: KVCacheBlock) -> None:
        h = block.block_hash
        if h is None:
            return
        if self.cached_blocks.get(h) is block:
            del self.cached_blocks[h]
        block.block_hash = None
        self.num_evictions += 1

    def touch(self, blocks: Iterable[KVCacheBlock]) -> None:
        """One more reference each (a prefix hit). A free cached block leaves the free queue."""
        for block in blocks:
            if block.ref_cnt == 0:
                self.free_block_queue.remove(block)
            block.ref_cnt += 1

    def free_blocks(self, ordered_blocks: Iterable[KVCacheBlock]) -> None:
        """One reference less each; blocks reaching 0 become free, in the given order (pass a request's blocks
        last first, so that its tail is evicted before its prefix). Cached blocks join the tail of the queue
        (LRU); blocks without a hash have nothing to offer a later request and go to the head, to be reused
        first."""
        for block in ordered_blocks:
            if block.ref_cnt <= 0:
                raise ValueError(f"{block} freed more often than referenced")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                if block.block_hash is None:
                    self.free_block_queue.appendleft(block)
                else:
                    self.free_block_queue.append(block)

    # ---- prefix cache ----

    def get_cached_block(self, block_hash: BlockHash) -> Optional[KVCacheBlock]:
        if not self.enable_caching:
            return None
        return self.cached_blocks.get(block_hash)

    def cache_full_blocks(
        self,
        blocks: Sequence[KVCacheBlock],
        block_hashes: Sequence[BlockHash],
        num_cached_blocks: int,
        num_full_blocks: int,
    ) -> None:
        """Register blocks[num_cached_blocks:num_full_blocks] (a request's blocks, now full) under their hashes.

        A hash already mapped to another block (two requests filled the same prefix at once) keeps its mapping;
        this block then stays uncached and is freed like any other.
        """
        if not self.enable_caching:
            return
        for i in range(num_cached_blocks, num_full_blocks):
            block = blocks[i]
            if block.block_hash is not None:
                continue  # a prefix hit: already cached
            h = block_hashes[i]
            if h in self.cached_blocks:
                continue
            block.block_hash = h
            self.cached_blocks[h] = block

    def reset_prefix_cache(self) -> bool:
        """Forget every hash (e.g. after new weights). Blocks in use keep their contents for their owners but are
        never shared again. Returns True."""
        for block in self.cached_blocks.values():
            block.block_hash = None
        self.cached_blocks.clear()
        return True
