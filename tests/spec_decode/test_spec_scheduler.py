"""The scheduler with speculative decoding, against the fake runner of tests/core (core_sim.py) proposing random
drafts and accepting a random number of them: budgets and caps hold, every step's inputs are the request's true
tokens followed by its drafts, each request attends only to its own true prefix (KV written for rejected drafts
is never read before it is recomputed), blocks past the computed tokens are given back, stop tokens among
accepted drafts end the request there, and nothing leaks (issue 14)."""

from __future__ import annotations

from tests.core.test_scheduler_properties import random_run


def test_random_driver_with_drafts_many_seeds():
    verified = accepted = 0
    for seed in range(40):
        t = random_run(1000 + seed, 0.30, 0.08, [-1, -1, -1, -1, 0], max_drafts=8)
        verified += t.sched.spec_num_draft_tokens
        accepted += t.sched.spec_num_accepted_tokens
    assert verified > 500 and 0 < accepted < verified
