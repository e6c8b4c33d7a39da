"""The caps on one user request's work (engine/admission.py: check_request_work), as the processor runs them."""

from __future__ import annotations

import pytest

from pagellm import SamplingParams
from pagellm.engine.admission import RequestLimits, WorkCaps, check_request_work

LIMITS = RequestLimits(vocab_size=1000, max_model_len=512)
CAPS = WorkCaps(max_tokens=4096, max_prompt_logprobs=1000)


def test_tokens_to_generate_are_prompts_x_n_x_max_tokens():
    check_request_work([5] * 8, SamplingParams(n=32, max_tokens=16), CAPS, LIMITS)  # 4,096: at the cap
    with pytest.raises(ValueError, match=r"^max_tokens: 8 prompt\(s\) x n=128 x max_tokens=16 = 16,384 tokens") as e:
        check_request_work([5] * 8, SamplingParams(n=128, max_tokens=16), CAPS, LIMITS)
    assert "--max-tokens-per-request" in str(e.value)


def test_an_unset_max_tokens_counts_the_room_the_prompt_leaves():
    check_request_work([500], SamplingParams(n=128, max_tokens=None), CAPS, LIMITS)  # 128 x 12
    with pytest.raises(ValueError, match=r"^max_tokens: 1 prompt\(s\) x n=9 x up to 507 tokens"):
        check_request_work([5], SamplingParams(n=9, max_tokens=None), CAPS, LIMITS)
    # A max_tokens beyond the room counts as the room (the processor cuts it, or refuses it on the server).
    check_request_work([500], SamplingParams(n=128, max_tokens=10_000), CAPS, LIMITS)


def test_prompt_logprobs_are_positions_x_top_k_plus_one():
    check_request_work([201] * 2, SamplingParams(max_tokens=1, prompt_logprobs=1), CAPS, LIMITS)  # 2 x 200 x 2
    with pytest.raises(ValueError, match=r"^prompt_logprobs: 299 prompt positions x 4 logprobs .* = 1,196") as e:
        check_request_work([300], SamplingParams(max_tokens=1, prompt_logprobs=3), CAPS, LIMITS)
    assert "--max-prompt-logprobs-per-request" in str(e.value)
    check_request_work([300], SamplingParams(max_tokens=1), CAPS, LIMITS)  # none asked


def test_no_caps_by_default():
    check_request_work([5] * 1024, SamplingParams(n=128, max_tokens=None, prompt_logprobs=20), WorkCaps(), LIMITS)
