"""Structured output through `LLM`: sampled requests (temperature 1) per grammar, 24 on a random model and 8
on the embedded SmolLM2 (a CPU decodes it 20x slower); every output finishes by the grammar and parses /
validates."""

from __future__ import annotations

import pytest

from pagellm import SamplingParams, StructuredOutputsParams
from tests.structured_output.cases import CHOICES, REGEX, SCHEMAS, check_choice, check_json, check_regex

N = 24
N_SMOLLM = 8


def _cases():
    for name, schema in SCHEMAS.items():
        yield f"json-{name}", StructuredOutputsParams(json=schema), lambda t, s=schema: check_json(t, s)
    yield "regex", StructuredOutputsParams(regex=REGEX), check_regex
    yield "choice", StructuredOutputsParams(choice=CHOICES), check_choice


CASES = list(_cases())


def _run_all(llm, prompts, max_tokens, temperature=1.0, extra=(), n=N):
    """One generate call with n requests of every case (so they batch), then check each output."""
    all_prompts, all_params, checks = [], [], []
    for name, so, check in list(CASES) + list(extra):
        for i in range(n):
            all_prompts.append(prompts[i % len(prompts)])
            all_params.append(SamplingParams(temperature=temperature, seed=i, max_tokens=max_tokens,
                                             structured_outputs=so))
            checks.append((name, check))
    outs = llm.generate(all_prompts, all_params, use_tqdm=False)
    for (name, check), out in zip(checks, outs):
        c = out.outputs[0]
        assert c.finish_reason == "stop", (name, c.text, c.finish_reason)
        check(c.text)
    return outs


@pytest.fixture(scope="module")
def tiny_llm(tiny_so_model):
    from pagellm import LLM

    return LLM(tiny_so_model, dtype="float32", max_model_len=1024, kv_cache_memory=64 * 2**20)


def test_random_model_every_grammar(tiny_llm):
    outs = _run_all(tiny_llm, ["hello", "write json", "x y z"], max_tokens=200)
    assert len(outs) == N * len(CASES)
    # Temperature 1 on random weights: the outputs differ (the mask constrains, it does not pick).
    assert len({o.outputs[0].text for o in outs}) > N


def test_random_model_json_object_closes_before_max_tokens(tiny_llm):
    """A random model seldom closes an unbounded JSON object by itself; near max_tokens the engine forces the
    shortest completion, and the request finishes with reason "stop" and stop_reason "json_closed", its JSON
    whole (the others closed it by themselves: stop_reason None)."""
    for max_tokens in (30, 120):
        outs = tiny_llm.generate(["hello", "write json", "x y z"] * (N // 3 + 1), [SamplingParams(
            temperature=1.0, seed=i, max_tokens=max_tokens, structured_outputs=StructuredOutputsParams(
                json_object=True)) for i in range(N // 3 * 3 + 3)], use_tqdm=False)
        reasons = set()
        for o in outs:
            c = o.outputs[0]
            check_json(c.text, None)
            assert len(c.token_ids) <= max_tokens
            reasons.add((c.finish_reason, c.stop_reason))
        assert reasons == {("stop", None), ("stop", "json_closed")}, reasons
    assert not tiny_llm.llm_engine.core.structured_output.budgets  # forgotten with their requests


def test_random_model_logits_wider_than_tokenizer(tiny_llm):
    """The tiny model has 64 more logits than tokens: those must never be sampled under a grammar."""
    tok = tiny_llm.get_tokenizer()
    outs = tiny_llm.generate(["a"] * 20, SamplingParams(temperature=2.0, seed=3, max_tokens=100,
                                                        structured_outputs=StructuredOutputsParams(
                                                            json=SCHEMAS["order"])), use_tqdm=False)
    for o in outs:
        assert all(t < len(tok) for t in o.outputs[0].token_ids)
        check_json(o.outputs[0].text, SCHEMAS["order"])


@pytest.mark.slow
def test_smollm_every_grammar(smollm_llm):
    tok = smollm_llm.get_tokenizer()
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
               for q in ("Describe a user as JSON.", "Give me an order as JSON.", "Answer: yes or no?")]
    _run_all(smollm_llm, prompts, max_tokens=200, n=N_SMOLLM)


@pytest.mark.slow
def test_smollm_json_object(smollm_llm):
    """json_object has no bounds: the model itself must close the object. A short example in the prompt, a cooler
    temperature and a frequency penalty (SmolLM2 otherwise loops over keys "0", "1", ... in about 1 request of 50
    until max_tokens) keep its objects short; all N outputs must finish and parse. The penalty also makes these
    grammar requests lockstep ones (see the scheduler): the grammar and the host-side token history together."""
    tok = smollm_llm.get_tokenizer()
    prompt = tok.apply_chat_template([
        {"role": "user", "content": "Reply with a small JSON object about a cat, like {\"name\":\"Tom\",\"age\":3}."},
    ], tokenize=False, add_generation_prompt=True)
    outs = smollm_llm.generate([prompt] * N_SMOLLM, [SamplingParams(
        temperature=0.8, frequency_penalty=1.0, seed=i, max_tokens=200,
        structured_outputs=StructuredOutputsParams(json_object=True)) for i in range(N_SMOLLM)], use_tqdm=False)
    for o in outs:
        assert o.outputs[0].finish_reason == "stop", o.outputs[0].text
        check_json(o.outputs[0].text, None)
    assert len({o.outputs[0].text for o in outs}) > 1  # sampled (seeds differ), not one answer every time


def test_greedy_and_n(tiny_llm):
    so = StructuredOutputsParams(choice=CHOICES)
    outs = tiny_llm.generate(["q"], SamplingParams(temperature=0.8, n=8, seed=1, max_tokens=20,
                                                   structured_outputs=so), use_tqdm=False)
    assert len(outs[0].outputs) == 8
    for c in outs[0].outputs:
        check_choice(c.text)
    out = tiny_llm.generate(["q"], SamplingParams(temperature=0, max_tokens=50,
                                                  structured_outputs=StructuredOutputsParams(
                                                      json=SCHEMAS["person"])), use_tqdm=False)
    check_json(out[0].outputs[0].text, SCHEMAS["person"])


def test_mixed_batch_with_unconstrained(tiny_llm):
    """Constrained and free requests in one batch: only the constrained ones are masked."""
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=30, ignore_eos=True) for i in range(5)]
    params += [SamplingParams(temperature=1.0, seed=i, max_tokens=60,
                              structured_outputs=StructuredOutputsParams(regex=REGEX)) for i in range(5)]
    outs = tiny_llm.generate(["p"] * 10, params, use_tqdm=False)
    for o in outs[:5]:
        assert len(o.outputs[0].token_ids) == 30
    for o in outs[5:]:
        check_regex(o.outputs[0].text)


@pytest.mark.parametrize("kwargs, needle", [
    ({"json": {"type": "objectx"}}, "structured_outputs.json"),
    ({"json": "{not json"}, "structured_outputs.json"),
    ({"regex": "[a-"}, "structured_outputs.regex"),
    ({"grammar": "start: foo"}, "structured_outputs.grammar"),
    ({"choice": []}, "structured_outputs.choice"),
    ({"choice": "yes"}, "structured_outputs.choice"),
    ({}, "structured_outputs"),
    ({"regex": "a", "choice": ["a"]}, "structured_outputs"),
])
def test_bad_grammars_are_value_errors(tiny_llm, kwargs, needle):
    with pytest.raises(ValueError, match=needle.replace(".", r"\.")):
        tiny_llm.generate(["x"], SamplingParams(structured_outputs=StructuredOutputsParams(**kwargs)),
                          use_tqdm=False)
    # The engine is still fine.
    assert tiny_llm.generate(["x"], SamplingParams(max_tokens=2), use_tqdm=False)[0].outputs[0].token_ids


def test_grammar_lark_and_gbnf(tiny_llm):
    lark = 'start: "(" num ("," num)* ")"\nnum: /[0-9]{1,3}/\n'
    gbnf = 'root ::= "color=" ("red" | "green")'
    outs = tiny_llm.generate(["g"] * 10, [SamplingParams(temperature=1.0, seed=i, max_tokens=80,
                                                         structured_outputs=StructuredOutputsParams(grammar=g))
                                          for i in range(5) for g in (lark, gbnf)], use_tqdm=False)
    import re

    for i, o in enumerate(outs):
        text = o.outputs[0].text
        if i % 2 == 0:
            assert re.fullmatch(r"\([0-9]{1,3}(,[0-9]{1,3})*\)", text), text
        else:
            assert text in ("color=red", "color=green"), text


def test_compiled_grammar_cache_is_bounded(tiny_llm):
    tiny_llm.generate(["c"], SamplingParams(max_tokens=5, structured_outputs=StructuredOutputsParams(regex="[ab]")),
                      use_tqdm=False)
    manager = tiny_llm.llm_engine.core.structured_output
    manager.cache.cap = 3
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=10,
                             structured_outputs=StructuredOutputsParams(regex=f"x{{{i + 1}}}")) for i in range(6)]
    outs = tiny_llm.generate(["c"] * 6, params, use_tqdm=False)
    assert [o.outputs[0].text for o in outs] == ["x" * (i + 1) for i in range(6)]
    assert len(manager.cache) <= 3
    assert not manager.matchers and not manager.pending  # finished requests leave nothing behind


def test_min_tokens_with_a_grammar_is_refused(tiny_llm):
    with pytest.raises(ValueError, match="^min_tokens"):
        tiny_llm.generate(["x"], SamplingParams(min_tokens=2, structured_outputs=StructuredOutputsParams(
            regex="a")), use_tqdm=False)
