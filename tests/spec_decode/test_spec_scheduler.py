"""The scheduler with speculative decoding, against the fake runner of tests/core (core_sim.py) proposing random
drafts and accepting a random number of them: budgets and caps hold, every step's inputs are the request's true
tokens followed by its drafts, each request attends only to its own true prefix (KV written for rejected drafts
is never read before it is recomputed), blocks past the computed tokens are given back, stop tokens among
accepted drafts end the request there, and nothing leaks (issue 14)."""

from __future__ import annotations

import random

from pagellm.core.request import RequestStatus
from tests.core.core_sim import check_invariants
from tests.core.test_scheduler_properties import BASES, VOCAB, Tracker, make_config


def test_random_driver_with_drafts_many_seeds():
    verified = accepted = 0
    for seed in range(40):
        rng = random.Random(1000 + seed)
        cfg = make_config(
            block_size=rng.choice([1, 2, 4, 8]),
            max_model_len=rng.randint(2, 64),
            extra_blocks=rng.randint(-2, 16),
            max_num_batched_tokens=rng.randint(1, 48),
            max_num_seqs=rng.randint(1, 8),
            policy=rng.choice(["fcfs", "priority"]),
            enable_prefix_caching=rng.random() < 0.8,
            num_speculative_tokens=rng.randint(1, 6),
        )
        t = Tracker(cfg, seed, rng.choice([0.0, 0.1]))
        t.runner.max_drafts = rng.randint(1, 8)  # may propose more than the scheduler verifies
        for _ in range(150):
            op = rng.random()
            if op < 0.3:
                tail = [rng.choice(VOCAB) for _ in range(rng.randint(0, 6))]
                t.add(rng.randrange(len(BASES)), rng.randint(0, 16), tail, rng.randint(1, 16), rng.randint(0, 3),
                      rng.randint(0, 2), rng.random() < 0.5, rng.random() < 0.3, group=rng.randint(-1, 2),
                      prompt_logprobs=rng.choice([-1, -1, -1, -1, 0]))
            elif op < 0.38 and t.live_ids():
                t.finish(rng.choice(t.live_ids()),
                         rng.choice([RequestStatus.FINISHED_ABORTED, RequestStatus.FINISHED_STOPPED]))
            else:
                t.step()
            check_invariants(t.sched)
        t.drain()
        verified += t.sched.spec_num_draft_tokens
        accepted += t.sched.spec_num_accepted_tokens
    assert verified > 500 and 0 < accepted < verified
