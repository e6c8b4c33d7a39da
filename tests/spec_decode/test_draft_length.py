"""The draft-length policy: k follows a request's acceptance down to none, and lookups back off where nothing is
found or accepted."""

from __future__ import annotations

import pytest

from pagellm.spec_decode.draft_length import MAX_BACKOFF, WORTH, DraftLengthPolicy, draft_length


@pytest.mark.parametrize("p, k", [(1.0, 4), (0.95, 4), (0.7, 3), (0.55, 2), (0.4, 1), (WORTH, 1), (0.29, 0),
                                  (0.0, 0)])
def test_draft_length_is_the_largest_k_worth_it(p, k):
    assert draft_length(p, 4) == k
    assert k == 0 or p ** k >= WORTH - 1e-12
    assert k == 4 or p ** (k + 1) < WORTH


def test_new_request_drafts_the_full_k_and_all_accepted_keeps_it():
    policy = DraftLengthPolicy(4, 5)
    policy.reset(0)
    assert policy.wanted(0, 10) == 5
    for n in range(10):
        policy.verified(0, 5, 5, 20 + 6 * n)
        assert policy.wanted(0, 20 + 6 * n) == 5


def test_rejections_shrink_k_then_back_off_and_try_again_with_one_draft():
    policy = DraftLengthPolicy(2, 4)
    policy.reset(1)
    seen = []
    tokens = 100
    for _ in range(6):
        k = policy.wanted(1, tokens)
        if not k:
            break
        seen.append(k)
        tokens += 1
        policy.verified(1, k, 0, tokens)
    assert seen[0] == 4 and seen == sorted(seen, reverse=True) and len(seen) < 6
    assert policy.wanted(1, tokens) == 0  # backing off
    wait = int(policy.next_lookup[1]) - tokens
    assert 1 <= wait <= MAX_BACKOFF
    assert policy.wanted(1, tokens + wait) == 1  # then one draft, from an even estimate


def test_lookups_that_find_nothing_back_off_exponentially_up_to_the_cap():
    policy = DraftLengthPolicy(1, 4)
    policy.reset(0)
    tokens, waits = 50, []
    for _ in range(10):
        assert policy.wanted(0, tokens) > 0
        policy.found_nothing(0, tokens)
        waits.append(int(policy.next_lookup[0]) - tokens)
        assert policy.wanted(0, tokens + waits[-1] - 1) == 0
        tokens += waits[-1]
    assert waits[:4] == [1, 2, 4, 8] and waits[-1] == MAX_BACKOFF
    policy.verified(0, 1, 1, tokens + 2)  # an accepted draft ends the backoff
    policy.found_nothing(0, tokens + 2)
    assert int(policy.next_lookup[0]) - (tokens + 2) == 1
    policy.reset(0)  # a new request in the row starts afresh
    assert policy.wanted(0, 0) == 4
