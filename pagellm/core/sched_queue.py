"""The waiting queue: which waiting sequence the scheduler admits next, fairly between user requests.

Sequences belong to groups: the n sequences of one request and the prompts of one /v1/completions call are one
group (the processor names it; a sequence alone is its own group). The next sequence comes from the group that
runs the fewest sequences now, so a small request that arrives behind a large one takes the next free seat
instead of waiting for the large one's last sequence; among groups that run as many, the one that came first.
Under the priority policy priority comes first (lower value first): fairness is among equals. Within a group,
sequences keep their order, a preempted one first.

The queue keeps each group's count of running sequences (the scheduler reports every start and stop), because
the order depends on it. Groups sit in a heap by (priority, running, arrival); a key that changed leaves a stale
entry behind, skipped when it comes to the top.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from typing import Callable, Iterator

from pagellm.core.request import Request

# A group's key: (priority, sequences running, order of arrival); the order is (arrival_time, counter) under the
# priority policy and (counter,) under first come, first served; a preempted sequence's counter is negative.
GroupKey = tuple[int, int, tuple]


class FairQueue:
    """Waiting sequences, in the order above; `priority_policy` False gives every sequence priority 0."""

    def __init__(self, priority_policy: bool) -> None:
        self.priority_policy = priority_policy
        self._groups: dict[str, deque[Request]] = {}
        self._order: dict[str, tuple] = {}  # group id -> its order of arrival (see GroupKey)
        self._prio: dict[str, int] = {}
        self._running: dict[str, int] = {}  # group id -> its running sequences (groups with none are left out)
        self._heap: list[tuple[GroupKey, str]] = []
        self._counter = itertools.count(1)
        self._size = 0

    # ---- running sequences per group ----

    def num_running(self, group_id: str) -> int:
        return self._running.get(group_id, 0)

    def count_running(self, request: Request, delta: int) -> None:
        """A sequence of the request's group started (+1) or stopped (-1) running."""
        gid = request.group_id
        count = self._running.get(gid, 0) + delta
        assert count >= 0, f"group {gid}: more sequences stopped than started"
        if count:
            self._running[gid] = count
        else:
            del self._running[gid]
        if gid in self._groups:
            self._push(gid)

    @property
    def num_running_groups(self) -> int:
        return len(self._running)

    @property
    def running_counts(self) -> dict[str, int]:
        """Group id -> running sequences (a copy), for checks."""
        return dict(self._running)

    # ---- waiting sequences ----

    def add(self, request: Request) -> None:
        self._insert(request, front=False)

    def add_front(self, request: Request) -> None:
        """A preempted sequence: first of its group, and its group before others that run as many."""
        self._insert(request, front=True)

    def _insert(self, request: Request, front: bool) -> None:
        gid = request.group_id
        group = self._groups.get(gid)
        if group is None:
            count = next(self._counter)
            count = -count if front else count
            self._groups[gid] = group = deque()
            self._order[gid] = (request.arrival_time, count) if self.priority_policy else (count,)
            self._prio[gid] = request.priority if self.priority_policy else 0
            self._push(gid)
        if front:
            group.appendleft(request)
        else:
            group.append(request)
        self._size += 1

    def _key(self, gid: str) -> GroupKey:
        return (self._prio[gid], self._running.get(gid, 0), self._order[gid])

    def _push(self, gid: str) -> None:
        heap = self._heap
        if len(heap) > 4 * len(self._groups) + 64:  # mostly stale entries: rebuild
            heap[:] = [(self._key(g), g) for g in self._groups]
            heapq.heapify(heap)
        else:
            heapq.heappush(heap, (self._key(gid), gid))

    def peek(self) -> Request:
        """The next sequence to admit (IndexError when none waits)."""
        heap = self._heap
        while True:
            key, gid = heap[0]
            if gid in self._groups and self._key(gid) == key:
                return self._groups[gid][0]
            heapq.heappop(heap)

    def pop(self) -> Request:
        request = self.peek()
        self._take(request.group_id, self._groups[request.group_id].popleft)
        return request

    def remove(self, request: Request) -> None:
        group = self._groups.get(request.group_id)
        if group is None or request not in group:  # Request compares by identity
            raise ValueError(f"{request.request_id} is not waiting")
        self._take(request.group_id, lambda: group.remove(request))

    def _take(self, gid: str, take: Callable[[], None]) -> None:
        """Take one sequence out of group gid (by `take`); an empty group is forgotten."""
        take()
        self._size -= 1
        if not self._groups[gid]:
            del self._groups[gid], self._order[gid], self._prio[gid]

    def __len__(self) -> int:
        return self._size

    def __iter__(self) -> Iterator[Request]:
        """Every waiting sequence, group by group in the order of now."""
        for gid in sorted(self._groups, key=self._key):
            yield from self._groups[gid]
