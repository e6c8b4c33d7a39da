"""SamplingParams: every invalid field raises a ValueError whose message names the field."""

from __future__ import annotations

import pytest

from pagellm.sampling_params import MAX_LOGPROBS, MAX_STOP_STRINGS, SamplingParams

INVALID = [
    # (field named in the message, kwargs)
    ("max_tokens", dict(max_tokens=-1)),
    ("max_tokens", dict(max_tokens=0)),
    ("max_tokens", dict(max_tokens=1.5)),
    ("max_tokens", dict(max_tokens="16")),
    ("top_p", dict(top_p=0.0)),
    ("top_p", dict(top_p=1.5)),
    ("top_p", dict(top_p=-0.1)),
    ("top_p", dict(top_p=float("nan"))),
    ("top_p", dict(top_p="0.5")),
    ("n", dict(n=0)),
    ("n", dict(n=-3)),
    ("n", dict(n=10_000)),
    ("n", dict(n=2.0)),
    ("n", dict(n=True)),
    ("temperature", dict(temperature=-1.0)),
    ("temperature", dict(temperature=float("inf"))),
    ("temperature", dict(temperature=None)),
    ("temperature", dict(temperature="hot")),
    ("top_k", dict(top_k=-2)),
    ("top_k", dict(top_k=2.5)),
    ("top_k", dict(top_k="5")),
    ("min_p", dict(min_p=2.0)),
    ("min_p", dict(min_p=-0.5)),
    ("presence_penalty", dict(presence_penalty=2.5)),
    ("presence_penalty", dict(presence_penalty=-2.5)),
    ("frequency_penalty", dict(frequency_penalty=3.0)),
    ("frequency_penalty", dict(frequency_penalty=-2.01)),
    ("repetition_penalty", dict(repetition_penalty=0.0)),
    ("repetition_penalty", dict(repetition_penalty=-1.0)),
    ("repetition_penalty", dict(repetition_penalty=2.5)),
    ("logprobs", dict(logprobs=MAX_LOGPROBS + 1)),
    ("logprobs", dict(logprobs=-1)),
    ("logprobs", dict(logprobs=1.5)),
    ("prompt_logprobs", dict(prompt_logprobs=21)),
    ("prompt_logprobs", dict(prompt_logprobs="3")),
    ("stop", dict(stop=["x"] * (MAX_STOP_STRINGS + 1))),
    ("stop", dict(stop=[""])),
    ("stop", dict(stop=[1, 2])),
    ("stop", dict(stop=["a" * 5000])),
    ("stop_token_ids", dict(stop_token_ids=[-1])),
    ("stop_token_ids", dict(stop_token_ids=["a"])),
    ("stop_token_ids", dict(stop_token_ids=[1.0])),
    ("min_tokens", dict(min_tokens=-1)),
    ("min_tokens", dict(min_tokens=20, max_tokens=10)),
    ("min_tokens", dict(min_tokens=1.0)),
    ("logit_bias", dict(logit_bias={"abc": 1.0})),
    ("logit_bias", dict(logit_bias={1: 500.0})),
    ("logit_bias", dict(logit_bias={1: -101.0})),
    ("logit_bias", dict(logit_bias={-5: 1.0})),
    ("logit_bias", dict(logit_bias={1: "a lot"})),
    ("logit_bias", dict(logit_bias={1: float("nan")})),
    ("logit_bias", dict(logit_bias=[1, 2, 3])),
    ("logit_bias", dict(logit_bias={i: 1.0 for i in range(2000)})),
    ("seed", dict(seed=1.5)),
    ("seed", dict(seed="42")),
    ("seed", dict(seed=2**70)),
    ("ignore_eos", dict(ignore_eos="yes")),
    ("include_stop_str_in_output", dict(include_stop_str_in_output=1)),
    ("skip_special_tokens", dict(skip_special_tokens=None)),
    ("detokenize", dict(detokenize="false")),
]


@pytest.mark.parametrize("name,kwargs", INVALID, ids=[f"{n}-{i}" for i, (n, _) in enumerate(INVALID)])
def test_invalid_field_names_itself(name: str, kwargs: dict) -> None:
    with pytest.raises(ValueError) as info:
        SamplingParams(**kwargs)
    assert name in str(info.value), f"message {str(info.value)!r} does not name {name}"


def test_defaults_are_valid_and_vllm_like() -> None:
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p) == (1, 1.0, 1.0, 0, 0.0)
    assert p.max_tokens == 16 and p.stop == [] and p.stop_token_ids == [] and p.all_stop_token_ids == set()
    assert not p.greedy


def test_normalisation() -> None:
    p = SamplingParams(stop="###", top_k=-1, logit_bias={"5": 1.5}, stop_token_ids=[7], temperature=0.0,
                       max_tokens=None)
    assert p.stop == ["###"]
    assert p.top_k == 0
    assert p.logit_bias == {5: 1.5}
    assert p.all_stop_token_ids == {7}
    assert p.greedy
    assert p.max_tokens is None


@pytest.mark.parametrize("kwargs", [
    dict(top_p=1.0), dict(top_p=1e-6), dict(min_p=0.0), dict(min_p=1.0), dict(top_k=1), dict(logprobs=0),
    dict(logprobs=20), dict(prompt_logprobs=0), dict(presence_penalty=-2.0), dict(frequency_penalty=2.0),
    dict(repetition_penalty=2.0), dict(min_tokens=16, max_tokens=16), dict(seed=-5), dict(seed=0),
    dict(logit_bias={3: -100, 4: 100.0}), dict(n=128), dict(temperature=0), dict(max_tokens=1),
])
def test_edge_values_are_accepted(kwargs: dict) -> None:
    SamplingParams(**kwargs)


def test_clone_is_deep() -> None:
    p = SamplingParams(stop=["a"], logit_bias={1: 1.0})
    c = p.clone()
    c.stop.append("b")
    c.logit_bias[2] = 2.0
    assert p.stop == ["a"] and p.logit_bias == {1: 1.0}
