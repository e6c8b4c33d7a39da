"""Request-level behaviour of the engine: seeds, n > 1, stop strings, aborts, and bad input."""

from __future__ import annotations

import pytest

from pagellm import SamplingParams
from tests.reference import random_prompt, tiny_llm

_llm = tiny_llm
_prompt = random_prompt


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return _llm(tiny_model_dir("qwen2"))


def _tokens(out) -> list[list[int]]:
    return [c.token_ids for c in out.outputs]


def test_seed_gives_same_tokens_whatever_the_batch(llm):
    seeded = SamplingParams(temperature=1.0, seed=1234, max_tokens=20, ignore_eos=True)
    target = _prompt(1, 30)
    alone = _tokens(llm.generate(target, seeded, use_tqdm=False)[0])
    others = [_prompt(i, 20) for i in range(2, 8)]
    mixed_params = [SamplingParams(temperature=0.8, max_tokens=20), SamplingParams(temperature=0.0, max_tokens=5),
                    SamplingParams(temperature=1.0, seed=99, max_tokens=12)] * 2
    outputs = llm.generate(others[:3] + [target] + others[3:], mixed_params[:3] + [seeded] + mixed_params[3:],
                           use_tqdm=False)
    assert _tokens(outputs[3]) == alone
    other_seed = SamplingParams(temperature=1.0, seed=4321, max_tokens=20, ignore_eos=True)
    assert _tokens(llm.generate(target, other_seed, use_tqdm=False)[0]) != alone


def test_n_sequences_share_the_prompt(llm):
    prompt = _prompt(11, 64)
    stats = llm.llm_engine.prefix_cache_stats
    hits = stats.hits
    out = llm.generate(prompt, SamplingParams(n=4, temperature=1.0, seed=5, max_tokens=12, ignore_eos=True),
                       use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2, 3]
    assert all(len(c.token_ids) == 12 for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1  # different seeds per sequence
    assert stats.hits - hits >= 3 * 48  # sequences 2..4 reuse the prompt's full blocks
    greedy = llm.generate(prompt, SamplingParams(n=3, temperature=0.0, max_tokens=8), use_tqdm=False)[0]
    assert len({tuple(c.token_ids) for c in greedy.outputs}) == 1


def test_max_tokens_min_tokens_and_stop_token_ids(llm):
    prompt = _prompt(3, 20)
    base = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True), use_tqdm=False)
    tokens = base[0].outputs[0].token_ids
    assert len(tokens) == 10 and base[0].outputs[0].finish_reason == "length"
    stop_at = tokens[4]
    first = tokens.index(stop_at)
    out = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=10, stop_token_ids=[stop_at]),
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids == tokens[: first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_at
    # min_tokens masks the stop token until enough tokens exist
    out = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=10, stop_token_ids=[stop_at],
                                              min_tokens=first + 2), use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) >= first + 2
    assert stop_at not in out.token_ids[: first + 2]


@pytest.mark.parametrize("bad, field", [
    (dict(max_tokens=-1), "max_tokens"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(n=0), "n"),
    (dict(temperature=-0.5), "temperature"),
    (dict(logprobs=1000), "logprobs"),
])
def test_invalid_sampling_params_name_the_field(bad, field):
    with pytest.raises(ValueError, match=rf"^{field}\b"):
        SamplingParams(**bad)


def test_bad_requests_do_not_disturb_the_engine(llm):
    engine = llm.llm_engine
    good = _prompt(21, 15)
    expected = _tokens(llm.generate(good, SamplingParams(temperature=0.0, max_tokens=6), use_tqdm=False)[0])
    engine.add_request("good", good, SamplingParams(temperature=0.0, max_tokens=6))
    engine.step()
    with pytest.raises(ValueError, match="^prompt"):
        engine.add_request("too-long", {"prompt_token_ids": [5] * 300}, SamplingParams())
    with pytest.raises(ValueError, match="^prompt"):
        engine.add_request("empty", {"prompt_token_ids": []}, SamplingParams())
    with pytest.raises(ValueError, match="^prompt_token_ids"):
        engine.add_request("oov", {"prompt_token_ids": [1, 10**6]}, SamplingParams())
    with pytest.raises(ValueError, match="^logit_bias"):
        engine.add_request("bias", good, SamplingParams(logit_bias={10**6: 1.0}))
    with pytest.raises(ValueError, match="^sampling_params"):
        engine.add_request("params", good, {"temperature": 0})
    with pytest.raises(ValueError, match="^prompt"):
        llm.generate([good, {"prompt_token_ids": [5] * 300}], SamplingParams(max_tokens=2), use_tqdm=False)
    finished = []
    while engine.has_unfinished_requests():
        finished += [o for o in engine.step() if o.finished]
    assert [o.request_id for o in finished] == ["good"]
    assert _tokens(finished[0]) == expected
    assert engine.core.scheduler.kv_cache_manager.usage == 0.0


def test_abort_frees_blocks(llm):
    engine = llm.llm_engine
    for i in range(4):
        engine.add_request(f"a{i}", _prompt(30 + i, 40), SamplingParams(max_tokens=50, ignore_eos=True))
    for _ in range(3):
        engine.step()
    engine.abort_request(["a1", "a3"])
    done = []
    while engine.has_unfinished_requests():
        done += [o.request_id for o in engine.step() if o.finished]
    assert sorted(done) == ["a0", "a2"]
    assert engine.core.scheduler.kv_cache_manager.usage == 0.0


def test_stop_strings_and_text(smollm_llm):
    prompt = "Count from one to ten in words: one, two,"
    greedy = SamplingParams(temperature=0.0, max_tokens=24)
    full = smollm_llm.generate(prompt, greedy, use_tqdm=False)[0].outputs[0]
    assert len(full.text) > 8
    stop = full.text[5:8]
    cut = smollm_llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=24, stop=[stop]),
                              use_tqdm=False)[0].outputs[0]
    assert cut.text == full.text[: full.text.index(stop)]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    kept = smollm_llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=24, stop=[stop],
                                                      include_stop_str_in_output=True), use_tqdm=False)[0].outputs[0]
    assert kept.text == full.text[: full.text.index(stop) + len(stop)]
    assert smollm_llm.llm_engine.core.scheduler.kv_cache_manager.usage == 0.0


def test_chat_uses_the_template(smollm_llm):
    out = smollm_llm.chat([{"role": "user", "content": "What is 2+2?"}],
                          SamplingParams(temperature=0.0, max_tokens=16), use_tqdm=False)[0]
    tokenizer = smollm_llm.get_tokenizer()
    assert tokenizer.decode(out.prompt_token_ids).rstrip().endswith("<|im_start|>assistant")
    assert out.outputs[0].text.strip()


def test_streamed_text_is_whole_utf8(smollm_llm):
    """Streamed deltas never end inside a UTF-8 character and add up to the final text."""
    from pagellm.engine.output_processor import OutputKind

    engine = smollm_llm.llm_engine
    params = SamplingParams(temperature=0.9, seed=3, max_tokens=48)
    prompt = "Write three emoji, then the Japanese word for cat in kanji:"
    engine.add_request("utf8", prompt, params, output_kind=OutputKind.DELTA)
    deltas, token_ids = [], []
    while engine.has_unfinished_requests():
        for out in engine.step():
            deltas.append(out.outputs[0].text)
            token_ids += out.outputs[0].token_ids
    full = smollm_llm.get_tokenizer().decode(token_ids, skip_special_tokens=True)
    assert "".join(deltas) == full
    if "\ufffd" not in full:
        assert all("\ufffd" not in d for d in deltas)
    assert any(ord(ch) > 127 for ch in full)  # the test did exercise multi-byte characters
