"""The in-memory store of /v1/responses (serving_responses.ResponseStore): oldest evicted first by count and by
characters, and a response readable (and deletable) only with the API key that made it."""

from __future__ import annotations

from pagellm.entrypoints.openai.serving_responses import ResponseStore, StoredResponse


def entry(owner=None, chars=1) -> StoredResponse:
    return StoredResponse(owner=owner, response={"id": "x"}, conversation=[], chars=chars)


def test_evicts_oldest_by_count_then_by_chars():
    store = ResponseStore(max_responses=3, max_chars=100)
    for i in range(5):
        store.put(f"r{i}", entry())
    assert len(store) == 3 and store.get("r0", None) is None and store.get("r1", None) is None
    assert all(store.get(f"r{i}", None) is not None for i in (2, 3, 4))
    store.put("big", entry(chars=99))  # 3 + 99 > 100: the oldest go until it fits
    assert store.get("r2", None) is None and store.get("r3", None) is None and store.get("r4", None) is not None
    assert store.chars == 100
    store.put("huge", entry(chars=101))  # more than the whole budget: nothing can stay
    assert len(store) == 0 and store.chars == 0


def test_only_the_owner_reads_or_deletes():
    store = ResponseStore()
    store.put("mine", entry(owner="key-a", chars=10))
    assert store.get("mine", "key-b") is None and store.get("mine", None) is None
    assert not store.delete("mine", "key-b")
    assert store.get("mine", "key-a") is not None
    assert store.delete("mine", "key-a") and store.get("mine", "key-a") is None and store.chars == 0
