"""LLaVA-1.5 through LLM: greedy tokens equal transformers' (float32) on image+text prompts, images in the
prefix-cache keys, chunked prefill across an image span, and the processor's errors."""

from __future__ import annotations

import msgspec
import pytest
import torch

from pagellm import LLM, SamplingParams
from pagellm.engine.core_messages import EngineCoreRequest, InputMessage
from pagellm.model_executor.models.interface import VisionLanguageModel
from pagellm.multimodal.inputs import TensorData
from tests.multimodal.helpers import data_url, image, load_reference, make_tiny_llava, reference_greedy

GREEDY = SamplingParams(max_tokens=8, temperature=0.0)


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory) -> str:
    return make_tiny_llava(str(tmp_path_factory.mktemp("tiny-llava")))


@pytest.fixture(scope="module")
def reference(llava_dir):
    return load_reference(llava_dir)


@pytest.fixture(scope="module")
def llm(llava_dir):
    return LLM(llava_dir, dtype="float32", kv_cache_memory=8 * 2**20, max_model_len=256)


def runner_of(llm: LLM):
    return llm.llm_engine.core.executor.worker.runner


def test_greedy_matches_transformers_in_one_batch(llm, reference, llava_dir):
    prompts = [
        {"prompt": "USER: <image> w5 w6 ASSISTANT:", "multi_modal_data": {"image": image(1)}},
        {"prompt": "USER: w7 <image> w8 w9 w10 ASSISTANT:", "multi_modal_data": {"image": [image(2, (64, 30))]}},
        "USER: w11 w12 ASSISTANT:",
    ]
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    images = [[image(1)], [image(2, (64, 30))], []]
    for out, imgs in zip(outs, images):
        assert out.prompt_token_ids.count(3) == (16 if imgs else 0)  # the placeholder became 16 image tokens
        assert out.outputs[0].token_ids == reference_greedy(reference, llava_dir, out.prompt_token_ids, imgs, 8)


def test_two_images_in_one_prompt_and_chat_image_url(llm, reference, llava_dir):
    two = llm.generate({"prompt": "USER: <image> w3 <image> w4 ASSISTANT:",
                        "multi_modal_data": {"image": [image(3), image(4)]}}, GREEDY, use_tqdm=False)[0]
    assert two.outputs[0].token_ids == reference_greedy(reference, llava_dir, two.prompt_token_ids,
                                                        [image(3), image(4)], 8)
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(image(5))}},
                                             {"type": "text", "text": "w20 w21"}]}]
    chat = llm.chat(messages, GREEDY, use_tqdm=False)[0]
    assert chat.outputs[0].token_ids == reference_greedy(reference, llava_dir, chat.prompt_token_ids, [image(5)], 8)


def test_images_key_the_prefix_cache(llm):
    """Same text, different images: different outputs, no prefix hit. The same image again: a prefix hit."""
    text = "USER: <image> w30 w31 w32 w33 w34 w35 w36 w37 w38 w39 w40 w41 w42 w43 w44 w45 w46 ASSISTANT:"
    stats = llm.llm_engine.prefix_cache_stats

    def run(img):
        hits = stats.hits
        out = llm.generate({"prompt": text, "multi_modal_data": {"image": img}}, GREEDY, use_tqdm=False)[0]
        return out.outputs[0].token_ids, stats.hits - hits

    first, _ = run(image(10))
    other, other_hits = run(image(11))
    again, again_hits = run(image(10))
    assert other != first and other_hits == 0  # the first block holds the image's tokens: nothing shared
    assert again == first and again_hits >= 32  # both full blocks of the prompt came from the cache


def test_chunked_prefill_splits_an_image_span(llava_dir, reference):
    """A step budget of 6 tokens cuts the 16 image tokens over several steps: the image is encoded once."""
    llm = LLM(llava_dir, dtype="float32", kv_cache_memory=8 * 2**20, max_model_len=256,
              max_num_batched_tokens=6, max_num_seqs=2, enable_prefix_caching=False)
    out = llm.generate({"prompt": "USER: w1 <image> w2 ASSISTANT:", "multi_modal_data": {"image": image(7)}},
                       GREEDY, use_tqdm=False)[0]
    assert out.outputs[0].token_ids == reference_greedy(reference, llava_dir, out.prompt_token_ids, [image(7)], 8)
    mm = runner_of(llm).mm
    assert isinstance(runner_of(llm).model, VisionLanguageModel)
    assert mm.num_images_encoded == 1 and not mm.embeddings and not mm.features


def test_features_cross_the_process_boundary():
    """EngineCoreRequest with features through msgpack, as the server sends it to the engine core."""
    from pagellm.multimodal.inputs import make_feature

    pixels = torch.randn(1, 3, 4, 4)
    feature = make_feature("image", 2, 16, {"pixel_values": pixels, "grid": torch.tensor([[1, 2, 2]])})
    req = EngineCoreRequest("r", [1] * 20, SamplingParams(max_tokens=4), [2], 2, 0.0, mm_features=[feature])
    back = msgspec.msgpack.decode(msgspec.msgpack.encode(req), type=InputMessage)
    got = back.mm_features[0].torch_tensors()
    assert torch.equal(got["pixel_values"], pixels) and got["grid"].tolist() == [[1, 2, 2]]
    assert back.mm_features[0].hash == feature.hash
    bf16 = torch.randn(3, 5).to(torch.bfloat16)
    assert torch.equal(TensorData.from_tensor(bf16).to_tensor(), bf16)


def test_bad_image_prompts_are_value_errors_naming_the_field(llm, tiny_model_dir):
    with pytest.raises(ValueError, match=r"multi_modal_data: the prompt has 0 image placeholder"):
        llm.generate({"prompt": "USER: w1 ASSISTANT:", "multi_modal_data": {"image": image(1)}}, GREEDY)
    with pytest.raises(ValueError, match=r"multi_modal_data: 5 images in one prompt"):
        llm.generate({"prompt": "USER: " + "<image> " * 5, "multi_modal_data": {"image": [image(1)] * 5}}, GREEDY)
    with pytest.raises(ValueError, match=r"prompt: holds image token 3 without an image"):
        llm.generate({"prompt_token_ids": [1, 3, 5]}, GREEDY)  # would reach the model with no image rows
    with pytest.raises(ValueError, match=r"multi_modal_data: an image must be a PIL.Image"):
        llm.generate({"prompt": "USER: <image>", "multi_modal_data": {"image": "cat.png"}}, GREEDY)
    bad = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@"}}]}]
    with pytest.raises(ValueError, match=r"messages\[0\]\.content\[0\]\.image_url: .*not valid base64"):
        llm.chat(bad, GREEDY)
    text_only = LLM(tiny_model_dir("llama"), dtype="float32", kv_cache_memory=4 * 2**20, skip_tokenizer_init=True)
    with pytest.raises(ValueError, match="multi_modal_data: this model does not take images"):
        text_only.generate({"prompt_token_ids": [1, 2, 3], "multi_modal_data": {"image": image(1)}}, GREEDY)
    assert not llm.llm_engine.has_unfinished_requests()


def test_pipeline_parallelism_is_refused_for_a_vision_model(llava_dir):
    with pytest.raises(ValueError, match="^pipeline_parallel_size: a vision model runs with one pipeline stage"):
        LLM(llava_dir, pipeline_parallel_size=2)


def test_a_preempted_image_request_encodes_its_image_again(llava_dir, reference):
    """7 KV blocks for three image requests of 52 tokens each: one is preempted, comes back with its image and
    recomputes it; every output still equals transformers'."""
    llm = LLM(llava_dir, dtype="float32", kv_cache_memory=7 * 8192, max_model_len=96)
    assert llm.llm_engine.config.cache_config.num_blocks == 7
    prompts = [{"prompt": f"USER: <image> w{5 + i} w6 ASSISTANT:", "multi_modal_data": {"image": image(30 + i)}}
               for i in range(3)]
    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert llm.llm_engine.core.scheduler.num_preemptions_total >= 1
    for i, out in enumerate(outs):
        assert out.outputs[0].token_ids == reference_greedy(reference, llava_dir, out.prompt_token_ids,
                                                            [image(30 + i)], 30)
    assert runner_of(llm).mm.num_images_encoded > 3
