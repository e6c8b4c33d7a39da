"""The proposer interface: what the engine hands a draft method each step, and what it gets back.

Every method (n-gram lookup now; EAGLE, MTP, a draft model later) guesses the next few tokens of some requests;
the target model then verifies all guesses in one forward pass and the rejection sampler keeps the longest
accepted prefix. The engine calls `propose` once per step, for the requests it speculates this step only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Protocol

import numpy as np

if TYPE_CHECKING:
    import torch


@dataclass
class ProposeBatch:
    """The requests speculated this step, in batch order.

    A method that needs more (EAGLE's hidden states, a draft model's block tables) gets a new field here, so
    the engine keeps one call for every method.
    """

    # Each request's tokens so far (prompt + output), a 1-D integer array. Usually a view of the engine's
    # buffer: a proposer reads it during the call and keeps no reference to it.
    token_ids: list[np.ndarray]
    # Draft tokens wanted per request; it may differ between requests, and 0 means none.
    num_speculative_tokens: list[int]
    # The runner's row of each request (a stateful proposer keys its state by row) and its KV block ids (a
    # draft model's cache is indexed by the target's blocks). Methods that need neither may get None.
    rows: Optional[list[int]] = None
    block_tables: Optional[list[np.ndarray]] = None

    def __post_init__(self) -> None:
        if len(self.token_ids) != len(self.num_speculative_tokens):
            raise ValueError(
                f"num_speculative_tokens has {len(self.num_speculative_tokens)} entries for "
                f"{len(self.token_ids)} requests"
            )
        for k in self.num_speculative_tokens:
            if k < 0:
                raise ValueError(f"num_speculative_tokens must be at least 0, got {k}")


@dataclass
class Drafts:
    """A proposer's guesses, one entry per request of the batch, in the same order."""

    # Request i's draft: at most num_speculative_tokens[i] ids, maybe fewer, maybe none. Plain lists: they do
    # not alias the engine's buffers and they serialize as they are.
    token_ids: list[list[int]]
    # Request i's draft distributions, [len(token_ids[i]), vocab] float32, for rejection sampling against the
    # target. None when the drafts are deterministic (n-gram lookup, greedy drafts): the sampler then treats
    # each draft token as proposed with probability 1.
    probs: Optional[list["torch.Tensor"]] = None


class Proposer(Protocol):
    """A draft method. Called once per step; it may keep its own state (a draft model's KV cache) between
    calls, keyed by whatever the batch gives it."""

    def propose(self, batch: ProposeBatch) -> Drafts:
        """Draft tokens for each request of `batch`: at most its num_speculative_tokens of them."""
        ...
