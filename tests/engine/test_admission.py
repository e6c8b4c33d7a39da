"""The engine-core boundary: the processor's wire request, the one admission check both processes run, and that
whatever the API process lets through, the core takes (so no client waits for a request the core dropped)."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pagellm.engine.admission import RequestLimits, check_request, wrap_seed
from pagellm.engine.core_messages import EngineCoreRequest, InputMessage
from pagellm.engine.processor import ProcessedPrompt, Processor
from pagellm.entrypoints.openai.protocol import CompletionRequest
from pagellm.sampling_params import MAX_SEED, SamplingParams


@pytest.fixture(scope="module")
def core(tiny_model_dir):
    """An engine core on the tiny Llama (vocabulary 512, max_model_len 256), and the API side's processor."""
    from pagellm.engine.core import EngineCore
    from pagellm.engine_args import EngineArgs

    config = EngineArgs(model=tiny_model_dir("llama"), dtype="float32", skip_tokenizer_init=True,
                        kv_cache_memory=4 * 2**20, max_model_len=256).create_engine_config()
    engine_core = EngineCore(config)
    yield engine_core, Processor(config.model_config, None, {2})
    engine_core.shutdown()


def _decode(req: EngineCoreRequest) -> EngineCoreRequest:
    msg = msgspec.msgpack.Decoder(InputMessage).decode(msgspec.msgpack.encode(req))
    assert isinstance(msg, EngineCoreRequest)
    return msg


def test_wire_request_round_trip(core):
    _, processor = core
    params = SamplingParams(temperature=0.5, top_k=3, stop=["x"], stop_token_ids=[7], logit_bias={5: 1.5}, seed=11,
                            max_tokens=9, logprobs=2, prompt_logprobs=1, n=2)
    reqs = processor.make_requests("r1", ProcessedPrompt(None, [1, 2, 3]), params, arrival_time=123.5, priority=3,
                                   cache_salt="s")
    assert [r.request_id for r in reqs] == ["0_r1", "1_r1"]
    back = [_decode(r) for r in reqs]
    assert back == reqs
    sp = back[0].params()
    assert sp.all_stop_token_ids == {2, 7} and sp.n == 1 and sp.max_tokens == 9
    assert [r.sampling_params.seed for r in back] == [11, 12]
    assert back[0].sampling_params.prompt_logprobs == 1 and back[1].sampling_params.prompt_logprobs is None
    assert (back[0].arrival_time, back[0].priority, back[0].cache_salt) == (123.5, 3, "s")
    ignoring = processor.make_requests("r2", ProcessedPrompt(None, [1]), SamplingParams(stop_token_ids=[7],
                                                                                         ignore_eos=True))
    assert ignoring[0].all_stop_token_ids == [7]  # ignore_eos: EOS does not stop it


def test_limits_are_checked_in_the_processor(core):
    _, processor = core
    prompt = ProcessedPrompt(None, list(range(3, 203)))  # 200 tokens: 56 left of 256
    # min_tokens with no max_tokens: max_tokens is the room left, which min_tokens must fit in.
    with pytest.raises(ValueError, match=r"^min_tokens: 100000 new tokens do not fit.*at most 56"):
        processor.make_requests("r", prompt, SamplingParams(max_tokens=None, min_tokens=100_000))
    with pytest.raises(ValueError, match=r"^max_tokens: 57 new tokens do not fit"):
        processor.make_requests("r", prompt, SamplingParams(max_tokens=57), strict_max_tokens=True)
    assert processor.make_requests("r", prompt, SamplingParams(max_tokens=57))[0].sampling_params.max_tokens == 56
    with pytest.raises(ValueError, match=r"^logit_bias: token id 512 is outside"):
        processor.make_requests("r", prompt, SamplingParams(logit_bias={512: 1.0}))
    with pytest.raises(ValueError, match=r"^prompt_token_ids must be integers in \[0, 512\), got 512"):
        processor.tokenize_prompt([3, 512])
    with pytest.raises(ValueError, match=r"^prompt_token_ids must be integers"):
        processor.tokenize_prompt([3, True])


def test_seeds_of_n_sequences_stay_in_range(core):
    """seed 2**63 - 1 with n=2 once gave the second sequence seed 2**63, which the core could not decode."""
    engine_core, processor = core
    params = SamplingParams(seed=MAX_SEED, n=3, max_tokens=2)
    reqs = processor.make_requests("s", ProcessedPrompt(None, [5, 6]), params)
    assert [r.sampling_params.seed for r in reqs] == [MAX_SEED, -MAX_SEED, -MAX_SEED + 1]
    assert wrap_seed(-MAX_SEED - 1) == MAX_SEED
    for r in reqs:
        engine_core.add_request(_decode(r))
    engine_core.abort_requests([r.request_id for r in reqs])


def test_the_core_runs_the_same_check(core):
    engine_core, _ = core
    limits = RequestLimits(vocab_size=512, max_model_len=256)

    def req(**kwargs) -> EngineCoreRequest:
        fields = dict(request_id="x", prompt_token_ids=[3, 4], sampling_params=SamplingParams(max_tokens=4),
                      all_stop_token_ids=[2], eos_token_id=2, arrival_time=0.0)
        fields.update(kwargs)
        return EngineCoreRequest(**fields)

    for bad, field in [
        (req(prompt_token_ids=[]), "prompt"),
        (req(prompt_token_ids=[3, 600]), "prompt_token_ids"),
        (req(prompt_token_ids=list(range(3, 259))), "prompt"),
        (req(sampling_params=SamplingParams(max_tokens=None)), "max_tokens"),
        (req(sampling_params=SamplingParams(max_tokens=255)), "max_tokens"),
        (req(sampling_params=SamplingParams(max_tokens=2, n=2)), "n"),
        (req(sampling_params=SamplingParams(max_tokens=2, logit_bias={600: 1.0})), "logit_bias"),
        (req(all_stop_token_ids=[2**63]), "stop_token_ids"),
        (req(eos_token_id=-1), "eos_token_id"),
    ]:
        with pytest.raises(ValueError, match=f"^{field}"):
            check_request(bad, limits)
        with pytest.raises(ValueError, match=f"^{field}"):
            engine_core.add_request(bad)
    assert not engine_core.has_unfinished_requests()


_OPTIONAL_FIELDS = {
    "n": st.integers(1, 4),
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0.01, 1),
    "top_k": st.integers(-1, 600),
    "min_p": st.floats(0, 1),
    "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.floats(-2, 2),
    "repetition_penalty": st.floats(0.01, 2),
    "seed": st.integers(-MAX_SEED, MAX_SEED),
    "stop_token_ids": st.lists(st.integers(0, 2**40), max_size=3),  # beyond 2**31: a 400
    "ignore_eos": st.booleans(),
    "min_tokens": st.integers(0, 300),
    "max_tokens": st.one_of(st.none(), st.integers(1, 300)),
    "logprobs": st.integers(0, 5),
    "prompt_logprobs": st.integers(0, 5),
    "logit_bias": st.dictionaries(st.integers(0, 700).map(str), st.floats(-100, 100), max_size=3),
    "priority": st.integers(-10, 10),
}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt=st.lists(st.integers(0, 600), min_size=0, max_size=300),
       fields=st.fixed_dictionaries({}, optional=_OPTIONAL_FIELDS))
def test_whatever_the_api_admits_the_core_takes(core, prompt, fields):
    """Requests as the server builds them from a body: each is either refused by the API process (ValueError
    naming a field: a 400) or, encoded and decoded as it crosses to the core, taken by the core."""
    engine_core, processor = core
    body = CompletionRequest(prompt=prompt or [0], **fields)
    try:
        params = body.to_sampling_params(body.max_tokens)
        processed = processor.tokenize_prompt({"prompt_token_ids": prompt})
        reqs = processor.make_requests("h", processed, params, priority=body.priority, strict_max_tokens=True)
    except ValueError as e:
        assert str(e).split(" ")[0].rstrip(":").split(".")[0].isidentifier(), e
        return
    try:
        for r in reqs:
            engine_core.add_request(_decode(r))
    finally:
        engine_core.abort_requests([r.request_id for r in reqs])
    assert not engine_core.has_unfinished_requests()
