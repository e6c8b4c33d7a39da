"""N-gram proposer: the vectorized lookup against a brute-force reference, the edge cases, and validation."""

from __future__ import annotations

import numpy as np
import pytest

from pagellm.spec_decode.ngram_proposer import NgramProposer, ngram_lookup
from pagellm.spec_decode.proposer import Drafts, ProposeBatch, Proposer


def reference(t: list[int], min_n: int, max_n: int, k: int) -> list[int]:
    """The rule as written: longest suffix L in [min_n, max_n] first, then its most recent earlier occurrence."""
    n = len(t)
    if k == 0:
        return []
    for length in range(max_n, min_n - 1, -1):
        if length >= n:
            continue
        suffix = t[n - length :]
        for start in range(n - length - 1, -1, -1):
            if t[start : start + length] == suffix:
                return t[start + length : start + length + k]
    return []


def propose_one(tokens: list[int], min_n: int, max_n: int, k: int) -> list[int]:
    proposer = NgramProposer(prompt_lookup_min=min_n, prompt_lookup_max=max_n)
    drafts = proposer.propose(ProposeBatch(token_ids=[np.array(tokens, dtype=np.int64)], num_speculative_tokens=[k]))
    assert drafts.probs is None
    return drafts.token_ids[0]


@pytest.mark.parametrize("vocab", [2, 3, 5, 20])
def test_matches_brute_force_on_random_sequences(vocab: int) -> None:
    # Small vocabularies make matches of every length common, and runs make overlapping occurrences common.
    rng = np.random.default_rng(vocab)
    for _ in range(800):
        n = int(rng.integers(0, 80))
        tokens = rng.integers(0, vocab, size=n).tolist()
        min_n = int(rng.integers(1, 5))
        max_n = min_n + int(rng.integers(0, 5))
        k = int(rng.integers(0, 8))
        got = ngram_lookup(np.array(tokens, dtype=np.int32), min_n, max_n, k)
        assert got.tolist() == reference(tokens, min_n, max_n, k), (tokens, min_n, max_n, k)


def test_batch_with_different_k_per_request_and_views() -> None:
    rng = np.random.default_rng(7)
    buffer = rng.integers(0, 4, size=(6, 50)).astype(np.int32)
    lengths = [50, 0, 1, 17, 33, 2]
    ks = [5, 3, 0, 1, 8, 2]
    views = [buffer[i, :length] for i, length in enumerate(lengths)]
    batch = ProposeBatch(token_ids=views, num_speculative_tokens=ks)
    proposer: Proposer = NgramProposer(prompt_lookup_min=1, prompt_lookup_max=3)
    drafts = proposer.propose(batch)
    assert isinstance(drafts, Drafts) and drafts.probs is None
    want = [reference(v.tolist(), 1, 3, k) for v, k in zip(views, ks)]
    assert drafts.token_ids == want
    assert all(type(tok) is int for draft in drafts.token_ids for tok in draft)
    # The engine overwrites its buffer next step; the drafts must not change with it.
    buffer[:] = -1
    assert drafts.token_ids == want


def test_short_sequences_and_k_zero_give_nothing() -> None:
    assert propose_one([], 1, 3, 4) == []
    assert propose_one([5], 1, 3, 4) == []
    assert propose_one([5, 5], 2, 3, 4) == []  # a length-2 suffix has nothing before it
    assert propose_one([5, 5], 1, 3, 4) == [5]
    assert propose_one([1, 2, 3, 1, 2, 3], 1, 3, 0) == []
    assert propose_one([1, 2, 3, 4], 1, 3, 4) == []  # the last token never occurred before


def test_match_near_the_end_gives_fewer_than_k() -> None:
    assert propose_one([4, 5, 6, 4, 5], 1, 2, 5) == [6, 4, 5]
    # Inside a run the most recent occurrence overlaps the suffix and leaves one token.
    assert propose_one([7, 7, 7, 7], 1, 3, 4) == [7]


def test_most_recent_occurrence_wins() -> None:
    tokens = [1, 2, 10, 1, 2, 20, 1, 2]
    assert propose_one(tokens, 2, 2, 3) == [20, 1, 2]
    assert propose_one(tokens, 1, 1, 2) == [20, 1]


def test_longest_suffix_wins_over_a_more_recent_shorter_one() -> None:
    tokens = [1, 2, 3, 9, 7, 7, 2, 3, 8, 1, 2, 3]
    assert propose_one(tokens, 1, 3, 3) == [9, 7, 7]  # [1, 2, 3] at 0 beats the later [2, 3] at 6
    assert propose_one(tokens, 1, 2, 3) == [8, 1, 2]  # capped at 2: the most recent [2, 3]
    assert propose_one(tokens, 1, 5, 3) == [9, 7, 7]  # no 4-gram matches; 3 is the longest


def test_matches_shorter_than_min_are_ignored() -> None:
    tokens = [3, 4, 5, 0, 4, 5]  # only [4, 5] (length 2) recurs
    assert propose_one(tokens, 2, 4, 2) == [0, 4]
    assert propose_one(tokens, 3, 4, 2) == []


def test_match_reaching_the_start_of_the_sequence() -> None:
    # The occurrence at position 0 cannot grow further back; it still counts at its own length.
    assert propose_one([5, 9, 5], 1, 2, 2) == [9, 5]
    assert propose_one([8, 5, 9, 8, 5], 1, 4, 3) == [9, 8, 5]


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"prompt_lookup_min": 0, "prompt_lookup_max": 3}, "prompt_lookup_min"),
        ({"prompt_lookup_min": 3, "prompt_lookup_max": 2}, "prompt_lookup_max"),
        ({"prompt_lookup_min": 1.5, "prompt_lookup_max": 3}, "prompt_lookup_min"),
        ({"prompt_lookup_min": 1, "prompt_lookup_max": True}, "prompt_lookup_max"),
    ],
)
def test_invalid_lookup_sizes_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field}"):
        NgramProposer(**kwargs)


def test_invalid_batch_names_the_field() -> None:
    tokens = np.arange(4)
    with pytest.raises(ValueError, match="^num_speculative_tokens"):
        ProposeBatch(token_ids=[tokens], num_speculative_tokens=[-1])
    with pytest.raises(ValueError, match="^num_speculative_tokens"):
        ProposeBatch(token_ids=[tokens, tokens], num_speculative_tokens=[2])
