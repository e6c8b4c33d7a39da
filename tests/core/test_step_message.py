"""The step message carries deltas: a decode step's bytes grow with the batch, not with the context."""

from __future__ import annotations

import msgspec

from pagellm.core.sched_output import ModelRunnerOutput, SchedulerOutput
from tests.core.core_sim import make_request, make_scheduler, scheduled


def sample_all(sched, so: SchedulerOutput) -> ModelRunnerOutput:
    """Token 7 for every request whose step reaches its last token (the KV-checking FakeRunner is quadratic in
    the context: too slow for 64 x 1,400 tokens)."""
    done = [rid for rid, start, n in scheduled(so) if start + n >= sched.requests[rid].num_tokens]
    return ModelRunnerOutput(req_ids=done, sampled_token_ids=[[7]] * len(done))


def test_decode_step_stays_small_and_does_not_grow_with_the_outputs():
    """64 requests with 1,000-token prompts (ids as the server names them): once their prompts are in, each
    decode step's message is a few KB, the same after 10 and after 200 generated tokens."""
    sched = make_scheduler(num_blocks=64 * 80, block_size=16, max_num_batched_tokens=8192, max_num_seqs=64,
                           max_model_len=2048)
    for i in range(64):
        prompt = [(7 * i + j) % 500 + 3 for j in range(1000)]
        sched.add_request(make_request(f"cmpl-{i:032x}-0", prompt, max_tokens=400, ignore_eos=True))
    encoder = msgspec.msgpack.Encoder()
    sizes = []
    for step in range(210):
        so = sched.schedule()
        size = len(encoder.encode(so))
        if step == 0:
            assert len(so.new_reqs) >= 8 and size > 8 * 1000  # the prompts cross once (8,192 tokens a step)
        elif len(so.cached) == 64:
            sizes.append(size)
        sched.update_from_output(so, sample_all(sched, so))
    decode_sizes = sizes[10:]  # once the prompts are all in
    assert max(decode_sizes) < 6 * 1024, max(decode_sizes)
    # A step that opens new blocks carries their ids; otherwise the same bytes at output 10 and at output 200.
    assert sizes[10] <= sizes[-1] <= sizes[10] + 64 * 4
    back = msgspec.msgpack.decode(encoder.encode(so), type=SchedulerOutput)
    assert back == so
