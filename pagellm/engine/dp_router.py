"""Data parallelism: which engine core takes a new request.

The least loaded core, unless prefix caching is on and some core was last given a prompt that shares at least
half of this one's full blocks, and that core is not busier than the least loaded by more than half a batch
(max_num_seqs / 2): then that core, whose prefix cache most likely still holds the shared part (a
conversation's next turn).

A core's load is the number of sequences this process has in flight on it. Behind several API processes
(`--api-server-count`) each router sees only its own requests, so it also takes the core's last reported
running + waiting sequences (CoreStats, sent after every step) when that is larger; and each process keeps
its own prefix-affinity table.
"""

from __future__ import annotations

import collections
from typing import Any, Optional, Sequence

from pagellm.engine.core_messages import CoreStats

# Prefix-affinity entries kept (LRU): hash of a prompt's first k full blocks -> the core last given it.
_AFFINITY_ENTRIES = 1 << 16


class DPRouter:
    def __init__(self, dp_size: int, cache_config: Any, max_num_seqs: int,
                 reported: Optional[Sequence[CoreStats]] = None) -> None:
        """`reported`: the cores' last stats (a list kept up to date by the caller) when other API processes
        send requests to the same cores; None when this process is their only client."""
        self.dp_size = dp_size
        self.prefix_caching = bool(cache_config.enable_prefix_caching)
        self.block_size = cache_config.block_size
        self.max_num_seqs = max_num_seqs
        self.reported = reported
        self.loads: list[int] = [0] * dp_size  # sequences this process has in flight per core
        self._prefix_owner: "collections.OrderedDict[int, int]" = collections.OrderedDict()

    def add(self, core: int, n: int) -> None:
        self.loads[core] += n

    def release(self, core: int, n: int) -> None:
        self.loads[core] -= n

    def current_loads(self) -> list[int]:
        if self.reported is None:
            return self.loads
        return [max(own, s.num_running + s.num_waiting) for own, s in zip(self.loads, self.reported)]

    def route(self, prompt_token_ids: list[int], salt: Any = None) -> int:
        """The core for a new request (see the module's docstring)."""
        if self.dp_size == 1:
            return 0
        loads = self.current_loads()
        least = min(range(self.dp_size), key=lambda i: (loads[i], i))
        if not self.prefix_caching:
            return least
        bs = self.block_size
        num_blocks = len(prompt_token_ids) // bs
        hashes, h = [], hash(("pagellm-dp", salt if isinstance(salt, (str, int, tuple)) else None))
        for b in range(num_blocks):
            h = hash((h, tuple(prompt_token_ids[b * bs:(b + 1) * bs])))
            hashes.append(h)
        choice = least
        for k in range(num_blocks, 0, -1):  # longest shared prefix first
            owner = self._prefix_owner.get(hashes[k - 1])
            if owner is not None:
                if 2 * k >= num_blocks and loads[owner] - loads[least] <= self.max_num_seqs // 2:
                    choice = owner
                break
        for h in hashes:
            self._prefix_owner[h] = choice
            self._prefix_owner.move_to_end(h)
        while len(self._prefix_owner) > _AFFINITY_ENTRIES:
            self._prefix_owner.popitem(last=False)
        return choice
