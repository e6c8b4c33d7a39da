"""One request cannot stall the others (issue 13 item 2), on a tiny model: a small request that arrives behind a
big one finishes first. Ordering of finishes, never time."""

from __future__ import annotations

import pytest

from pagellm import SamplingParams
from pagellm.engine.output_processor import OutputKind
from tests.reference import random_prompt, tiny_llm


@pytest.fixture(scope="module")
def model_path(tiny_model_dir):
    return tiny_model_dir("qwen2")


def _run(engine, until_finished: str, max_steps: int = 2000) -> list[tuple[str, int]]:
    """Step until request `until_finished` finishes; the (request id, sequence index) of each sequence that
    finished, in order."""
    finished: list[tuple[str, int]] = []
    for _ in range(max_steps):
        for out in engine.step():
            for c in out.outputs:  # every output lists every sequence of its request: count each once
                if c.finish_reason is not None and (out.request_id, c.index) not in finished:
                    finished.append((out.request_id, c.index))
            if out.request_id == until_finished and out.finished:
                return finished
    raise AssertionError(f"{until_finished} did not finish in {max_steps} steps")


def test_small_request_finishes_before_a_big_n_request(model_path):
    """n=32 holds all 8 seats (and 24 sequences wait); a 4-token request sent after it finishes before any of
    the big request's sequences (first come, first served it would wait for three rounds of them)."""
    llm = tiny_llm(model_path, max_num_seqs=8)
    engine = llm.llm_engine
    big = SamplingParams(n=32, temperature=1.0, seed=0, max_tokens=24, ignore_eos=True)
    engine.add_request("big", random_prompt(1, 12)["prompt_token_ids"], big, output_kind=OutputKind.DELTA)
    for _ in range(3):
        engine.step()
    assert engine.core.scheduler.num_running == 8
    small = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    engine.add_request("small", random_prompt(2, 6)["prompt_token_ids"], small, output_kind=OutputKind.DELTA)
    finished = _run(engine, "small")
    assert finished == [("small", 0)]  # no sequence of "big" finished before it
    rest = _run(engine, "big")
    assert len(set(rest)) == 32 and engine.core.scheduler.num_preemptions_total >= 1


def test_small_request_is_not_held_by_a_long_prompt_logprobs_prompt(model_path):
    """A 200-token prompt with prompt_logprobs is computed 8 positions a step (the budget of 64 / 8), so a small
    request sent after it finishes first; the prompt logprobs still cover every position once."""
    llm = tiny_llm(model_path, max_num_batched_tokens=64)
    engine = llm.llm_engine
    prompt = random_prompt(3, 200)["prompt_token_ids"]
    engine.add_request("long", prompt, SamplingParams(max_tokens=1, prompt_logprobs=5))
    engine.step()
    engine.add_request("small", random_prompt(4, 6)["prompt_token_ids"],
                       SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    assert _run(engine, "small") == [("small", 0)]
    outputs = []
    while engine.has_unfinished_requests():
        outputs += [o for o in engine.step() if o.request_id == "long"]
    (final,) = outputs
    plp = final.prompt_logprobs
    assert len(plp) == len(prompt) and plp[0] is None
    assert all(prompt[i] in plp[i] and len(plp[i]) >= 5 for i in range(1, len(prompt)))
