"""Qwen2-VL through LLM: greedy tokens equal transformers' Qwen2VLForConditionalGeneration.generate (float32) for
a batch of two prompts with images of different sizes (different grids, so different M-RoPE positions and
deltas) and a text-only one, whole and with chunked prefill cutting the image spans; and a chat image_url part."""

from __future__ import annotations

import pytest

from pagellm import LLM, SamplingParams
from pagellm.model_executor.models.interface import VisionLanguageModel
from tests.models.tiny_qwen2_vl import IMAGE_TOKEN
from tests.multimodal.helpers import data_url, image
from tests.multimodal.qwen2_vl_folder import load_reference, make_tiny_qwen2_vl, reference_greedy

GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
# (width, height) -> grid (1, 12, 10): 30 image tokens; (64, 30) -> (1, 8, 16): 32 image tokens
SIZES = [(40, 52), (64, 30)]
PROMPTS = [
    {"prompt": f"w5 w6 {PLACEHOLDER} w7 w8 w9", "multi_modal_data": {"image": image(1, SIZES[0])}},
    {"prompt": f"w10 {PLACEHOLDER} w11", "multi_modal_data": {"image": [image(2, SIZES[1])]}},
    "w12 w13 w14 w15",
]
IMAGES = [[image(1, SIZES[0])], [image(2, SIZES[1])], []]


@pytest.fixture(scope="module")
def qwen2_vl_dir(tmp_path_factory) -> str:
    return make_tiny_qwen2_vl(str(tmp_path_factory.mktemp("tiny-qwen2-vl")))


@pytest.fixture(scope="module")
def reference(qwen2_vl_dir):
    return load_reference(qwen2_vl_dir)


def _check_batch(llm: LLM, reference) -> list:
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o.prompt_token_ids.count(IMAGE_TOKEN) for o in outs] == [30, 32, 0]
    for out, imgs in zip(outs, IMAGES):
        assert out.outputs[0].token_ids == reference_greedy(reference, out.prompt_token_ids, imgs, 10)
    return outs


def test_batch_with_two_image_sizes_and_text_matches_transformers(qwen2_vl_dir, reference):
    llm = LLM(qwen2_vl_dir, dtype="float32", kv_cache_memory=8 * 2**20, max_model_len=256)
    runner = llm.llm_engine.core.executor.worker.runner
    assert isinstance(runner.model, VisionLanguageModel) and runner.mm.uses_mrope
    first = _check_batch(llm, reference)[0]
    # the same image prompt again: its full blocks come from the prefix cache, the rest (image rows included)
    # is computed at the same M-RoPE positions
    hits = llm.llm_engine.prefix_cache_stats.hits
    again = llm.generate(PROMPTS[0], GREEDY, use_tqdm=False)[0]
    assert llm.llm_engine.prefix_cache_stats.hits - hits >= 32
    assert again.outputs[0].token_ids == first.outputs[0].token_ids

    messages = [{"role": "user", "content": [{"type": "text", "text": "w20 w21"},
                                             {"type": "image_url", "image_url": {"url": data_url(image(5))}}]}]
    chat = llm.chat(messages, GREEDY, use_tqdm=False)[0]
    assert chat.prompt_token_ids.count(IMAGE_TOKEN) == 30
    assert chat.outputs[0].token_ids == reference_greedy(reference, chat.prompt_token_ids, [image(5)], 10)


def test_chunked_prefill_cuts_the_image_spans(qwen2_vl_dir, reference):
    """A step budget of 12 tokens cuts each image's span over several steps, beside other requests' decodes
    (steps with [3, T] positions holding index + delta rows): each image is encoded once, outputs unchanged."""
    llm = LLM(qwen2_vl_dir, dtype="float32", kv_cache_memory=8 * 2**20, max_model_len=256,
              max_num_batched_tokens=12, enable_prefix_caching=False)
    _check_batch(llm, reference)
    mm = llm.llm_engine.core.executor.worker.runner.mm
    assert mm.num_images_encoded == 2 and not mm.embeddings and not mm.features


def test_a_preempted_image_request_gets_its_positions_back(qwen2_vl_dir, reference):
    """8 KV blocks for three image requests of about 70 tokens each: one is preempted, comes back with its image,
    recomputes its M-RoPE positions and image rows, and every output still equals transformers'."""
    llm = LLM(qwen2_vl_dir, dtype="float32", kv_cache_memory=8 * 8192, max_model_len=96,
              enable_prefix_caching=False)  # the preempted request recomputes its image (no cache hit)
    assert llm.llm_engine.config.cache_config.num_blocks == 8
    prompts = [{"prompt": f"w{5 + i} {PLACEHOLDER} w6", "multi_modal_data": {"image": image(30 + i, SIZES[i % 2])}}
               for i in range(3)]
    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert llm.llm_engine.core.scheduler.num_preemptions_total >= 1
    for i, out in enumerate(outs):
        assert out.outputs[0].token_ids == reference_greedy(reference, out.prompt_token_ids,
                                                            [image(30 + i, SIZES[i % 2])], 30)
    assert llm.llm_engine.core.executor.worker.runner.mm.num_images_encoded > 3
