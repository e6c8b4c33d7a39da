"""Limits on what a request may hold, checked before anything that would crash on it (issue 13): integers inside
their real ranges, text that is valid Unicode, JSON nested at most MAX_JSON_DEPTH levels."""

from __future__ import annotations

import json
import random

import pytest

from pagellm.sampling_params import (
    MAX_JSON_DEPTH,
    RANGES,
    SamplingParams,
    StructuredOutputsParams,
    check_json_text,
    check_json_value,
    check_text,
)

HUGE = 2**64


@pytest.mark.parametrize("name", ["n", "top_k", "seed", "max_tokens", "min_tokens", "logprobs", "prompt_logprobs"])
def test_integer_fields_have_a_real_upper_bound(name: str) -> None:
    high = RANGES[name].high
    assert high is not None and high < 2**63
    kwargs = {name: high}
    if name == "min_tokens":
        kwargs["max_tokens"] = None
    SamplingParams(**kwargs)
    for value in (high + 1, HUGE):
        with pytest.raises(ValueError, match=rf"^{name} must be between"):
            SamplingParams(**{**kwargs, name: value})


@pytest.mark.parametrize("kwargs,name", [
    (dict(stop_token_ids=[HUGE]), "stop_token_ids"),
    (dict(logit_bias={HUGE: 1.0}), "logit_bias"),
    (dict(logit_bias={str(HUGE): 1.0}), "logit_bias"),
])
def test_token_ids_fit_in_31_bits(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=rf"^{name}"):
        SamplingParams(**kwargs)


def test_a_huge_integer_is_told_by_size_not_digits() -> None:
    with pytest.raises(ValueError) as info:
        SamplingParams(top_k=10**5000)
    assert "bits" in str(info.value) and len(str(info.value)) < 200


def test_the_seeds_of_n_sequences_stay_in_int64() -> None:
    p = SamplingParams(seed=RANGES["seed"].high, n=RANGES["n"].high)
    assert p.seed + p.n - 1 < 2**63


@pytest.mark.parametrize("text", ["\ud800", "ok \udfff", "\udc00\ud800"])
def test_lone_surrogates_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="^prompt must be valid Unicode"):
        check_text("prompt", text)
    with pytest.raises(ValueError, match="^stop must be valid Unicode"):
        SamplingParams(stop=[text])
    check_text("prompt", "caf\u00e9 \U0001f600")  # a real pair is fine


def test_json_value_depth_and_text() -> None:
    def nested(depth: int) -> list:
        value: list = []
        for _ in range(depth - 1):
            value = [value]
        return value

    check_json_value("tools", nested(MAX_JSON_DEPTH))
    with pytest.raises(ValueError, match="^tools is nested deeper than"):
        check_json_value("tools", nested(MAX_JSON_DEPTH + 1))
    with pytest.raises(ValueError, match="^tools is nested deeper than"):
        check_json_value("tools", nested(100_000))  # no RecursionError: the walk is iterative
    with pytest.raises(ValueError, match=r"^tools\.0\.function\.name must be valid Unicode"):
        check_json_value("tools", [{"function": {"name": "\ud800"}}])
    with pytest.raises(ValueError, match=r"^tools\.0 \(a key\) must be valid Unicode"):
        check_json_value("tools", [{"\ud800": 1}])


def _reference_depth(text: str) -> int:
    """Brackets outside strings, character by character, up to where json.loads would stop."""
    depth = deepest = 0
    in_string = escaped = False
    for c in text:
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c == "\\":
            break  # invalid JSON: the parse ends here
        elif c in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif c in "]}":
            depth -= 1
    return deepest


def test_json_text_depth_matches_a_character_scan() -> None:
    rng = random.Random(0)
    for _ in range(3000):
        text = "".join(rng.choice('[]{}"\\a\u00e9') for _ in range(rng.randint(0, 120)))
        deepest = _reference_depth(text)
        try:
            check_json_text("guided_json", text, max_depth=5)
            refused = False
        except ValueError:
            refused = True
        if deepest > 5:
            assert refused, text
        if "\\" not in text:
            assert refused == (deepest > 5), text


def test_json_text_depth_ignores_brackets_in_strings() -> None:
    deep_in_string = json.dumps({"a": "[" * 10_000, "b": '\\"' + "{" * 10_000})
    check_json_text("guided_json", deep_in_string)
    with pytest.raises(ValueError, match="^guided_json is nested deeper"):
        check_json_text("guided_json", "[" * 5000 + "]" * 5000)


def test_structured_outputs_checks_depth_before_parsing() -> None:
    with pytest.raises(ValueError, match=r"^structured_outputs\.json is nested deeper"):
        StructuredOutputsParams(json='{"a":' * 5000 + "1" + "}" * 5000)
    with pytest.raises(ValueError, match=r"^structured_outputs\.json is nested deeper"):
        StructuredOutputsParams(json={"items": json.loads("[" * 200 + "]" * 200)})
    with pytest.raises(ValueError, match=r"^structured_outputs\.regex must be valid Unicode"):
        StructuredOutputsParams(regex="a\ud800")
    with pytest.raises(ValueError, match=r"^structured_outputs\.choice must be valid Unicode"):
        StructuredOutputsParams(choice=["a", "\ud800"])
    with pytest.raises(ValueError, match=r"^structured_outputs: unknown field jsn"):
        SamplingParams(structured_outputs={"jsn": {}})
