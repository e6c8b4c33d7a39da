"""How many drafts to ask for, per request, from its measured acceptance: speculation that does not pay stops.

A draft token costs a position in the verify forward pass whether or not it is accepted, and the i-th draft
counts only if the i - 1 before it were accepted. With a per-token acceptance probability p, the i-th draft is
accepted with probability p**i, so a request asks for the largest k with p**k >= WORTH (k <= the configured
number). p is estimated from the request's own verify steps, with decay so that it follows the text: a verify
of k drafts that accepted a of them is a successes and, if a < k, one failure.

When p is too low for even one draft, or the lookup finds nothing, the request stops proposing for a while:
`backoff` tokens, doubling each time up to MAX_BACKOFF, back to 1 after a verify that accepted something. This
also bounds the host time the proposer costs on text that never repeats (one lookup per MAX_BACKOFF tokens).
"""

from __future__ import annotations

import math

import numpy as np

# The least acceptance probability a draft position must have to be asked for.
WORTH = 0.3
# Weight of the past in the acceptance estimate, per verify step.
DECAY = 0.8
# The prior estimate (2 successes in 2.5 trials, p = 0.8): a new request drafts the full k at once.
PRIOR_SUCCESSES, PRIOR_TRIALS = 2.0, 2.5
# Tokens a request waits, at most, between lookups that found nothing useful.
MAX_BACKOFF = 64


def draft_length(p: float, max_k: int) -> int:
    """The largest k <= max_k with p**k >= WORTH (0 when even one draft is not worth it)."""
    if p >= 1.0:
        return max_k
    if p < WORTH:
        return 0
    return min(max_k, int(math.log(WORTH) / math.log(p) + 1e-9))


class DraftLengthPolicy:
    """Per-row speculation state of the runner's batch: the acceptance estimate, the next k, and the backoff.
    Rows are the InputBatch's; `reset` when a row gets a new request."""

    def __init__(self, max_rows: int, max_k: int) -> None:
        self.max_k = max_k
        self.successes = np.zeros(max_rows)
        self.trials = np.ones(max_rows)
        self.backoff = np.zeros(max_rows, dtype=np.int64)
        self.next_lookup = np.zeros(max_rows, dtype=np.int64)  # token count from which the row may propose again

    def reset(self, row: int) -> None:
        self.successes[row], self.trials[row] = PRIOR_SUCCESSES, PRIOR_TRIALS
        self.backoff[row] = 0
        self.next_lookup[row] = 0

    def wanted(self, row: int, num_tokens: int) -> int:
        """Drafts to propose for the row, which now has num_tokens known tokens (0: not now)."""
        if num_tokens < self.next_lookup[row]:
            return 0
        return max(1, draft_length(self.successes[row] / self.trials[row], self.max_k))

    def found_nothing(self, row: int, num_tokens: int) -> None:
        """The lookup gave no draft: wait before the next one."""
        self._back_off(row, num_tokens)

    def verified(self, row: int, num_drafts: int, num_accepted: int, num_tokens: int) -> None:
        """A verify step of num_drafts drafts accepted num_accepted; num_tokens known tokens after it."""
        self.successes[row] = DECAY * self.successes[row] + num_accepted
        self.trials[row] = DECAY * self.trials[row] + num_accepted + (num_accepted < num_drafts)
        if num_accepted:
            self.backoff[row] = 0
        if draft_length(self.successes[row] / self.trials[row], self.max_k) == 0:
            self._back_off(row, num_tokens)
            # Try again later from an even estimate, not from the one that stopped it.
            self.successes[row], self.trials[row] = 0.5 * PRIOR_SUCCESSES, PRIOR_TRIALS

    def _back_off(self, row: int, num_tokens: int) -> None:
        self.backoff[row] = min(MAX_BACKOFF, max(1, 2 * int(self.backoff[row])))
        self.next_lookup[row] = num_tokens + self.backoff[row]
