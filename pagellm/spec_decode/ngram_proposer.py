"""N-gram proposer (prompt lookup decoding): draft the tokens that followed the last n-gram's previous occurrence.

Costs no model: it pays off where the output repeats its context (code edits, summaries and extraction that
quote the prompt, chat that repeats earlier turns). vLLM's `{"method": "ngram", "num_speculative_tokens": k,
"prompt_lookup_min": a, "prompt_lookup_max": b}`.

For tokens t[0..n): take the longest suffix of length L in [a, b] that also occurs earlier in t (an occurrence
may overlap the suffix, but is not the suffix itself); of its occurrences take the most recent one (nearest
the end: local context predicts best) and propose the up-to-k tokens after it. vLLM takes the earliest
occurrence instead, which gives a full k tokens more often inside runs of a repeated pattern.
"""

from __future__ import annotations

import numpy as np

from pagellm.spec_decode.proposer import Drafts, ProposeBatch


def ngram_lookup(tokens: np.ndarray, min_n: int, max_n: int, k: int) -> np.ndarray:
    """The up-to-k tokens after the most recent earlier occurrence of the longest matching suffix; empty if none.

    Vectorized over positions: one full-length comparison finds every earlier position holding the last token,
    then each further step back filters only the survivors. At 32k tokens that is 15-60 us for real text; a
    run of one token (every position survives every step) is the worst case, under 1 ms. The result is a
    copy, never a view of `tokens`.
    """
    n = len(tokens)
    if k <= 0 or n < min_n + 1:
        return tokens[:0].copy()
    # ends[i]: end position of an earlier window whose last `length` tokens equal the sequence's last `length`.
    # Ends run up to n - 2, so each window has at least one token after it and is never the suffix itself.
    ends = np.flatnonzero(tokens[: n - 1] == tokens[n - 1])
    length = 1
    while length < max_n and len(ends):
        reach = ends[ends >= length]  # windows that start at position 0 cannot grow
        longer = reach[tokens[reach - length] == tokens[n - 1 - length]]
        if not len(longer):
            break
        ends, length = longer, length + 1
    if not len(ends) or length < min_n:
        return tokens[:0].copy()
    start = int(ends[-1]) + 1  # ends are ascending: the last survivor is the most recent occurrence
    return tokens[start : start + k].copy()


class NgramProposer:
    """Prompt lookup over each request's own tokens. Stateless: nothing to keep between steps."""

    def __init__(self, prompt_lookup_min: int, prompt_lookup_max: int) -> None:
        for name, value in (("prompt_lookup_min", prompt_lookup_min), ("prompt_lookup_max", prompt_lookup_max)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        if prompt_lookup_min < 1:
            raise ValueError(f"prompt_lookup_min must be at least 1, got {prompt_lookup_min}")
        if prompt_lookup_max < prompt_lookup_min:
            raise ValueError(
                f"prompt_lookup_max must be at least prompt_lookup_min ({prompt_lookup_min}), got {prompt_lookup_max}"
            )
        self.prompt_lookup_min = prompt_lookup_min
        self.prompt_lookup_max = prompt_lookup_max

    def propose(self, batch: ProposeBatch) -> Drafts:
        """One lookup per request; draft probabilities are None (a lookup is a certainty, not a distribution)."""
        drafts = [
            ngram_lookup(np.asarray(tokens), self.prompt_lookup_min, self.prompt_lookup_max, k).tolist()
            for tokens, k in zip(batch.token_ids, batch.num_speculative_tokens)
        ]
        return Drafts(token_ids=drafts, probs=None)
