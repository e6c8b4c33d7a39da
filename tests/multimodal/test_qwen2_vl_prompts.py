"""Qwen2-VL's front end (multimodal/families.py + processing.py): a prompt's image placeholders expand into the
same token ids, and the features carry the same pixels and grids, as transformers' Qwen2VLProcessor gives.
(The model end to end: tests/multimodal/test_qwen2_vl_engine.py; this checks only what the engine sends it.)"""

from __future__ import annotations

import pytest
import torch

from pagellm.multimodal.families import image_family
from pagellm.multimodal.media import MediaRules
from pagellm.multimodal.processing import MultiModalConfig, MultiModalProcessor
from tests.multimodal.helpers import image

SPECIAL = ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"]


@pytest.fixture(scope="module")
def parts():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2VLConfig, Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    words = ["<unk>"] + [f"w{i}" for i in range(20)] + SPECIAL
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", extra_special_tokens=SPECIAL)
    ids = {w: words.index(w) for w in SPECIAL}
    config = Qwen2VLConfig(image_token_id=ids["<|image_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                           vision_end_token_id=ids["<|vision_end|>"], video_token_id=ids["<|video_pad|>"])
    image_processor = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=112 * 112)
    # transformers' processor, without the video processor its constructor insists on (torchvision is not here):
    # only its image path runs.
    hf = object.__new__(Qwen2VLProcessor)
    hf.image_processor, hf.tokenizer, hf.video_processor, hf.chat_template = image_processor, tokenizer, None, None
    hf.image_token, hf.video_token = "<|image_pad|>", "<|video_pad|>"
    hf.image_token_id, hf.video_token_id = ids["<|image_pad|>"], ids["<|video_pad|>"]
    ours = MultiModalProcessor(image_family("Qwen2VLForConditionalGeneration"), config, image_processor,
                               MultiModalConfig({"image": 4}, MediaRules()))
    return tokenizer, hf, ours


def test_placeholders_expand_as_transformers_processor(parts):
    tokenizer, hf, ours = parts
    placeholder = ours.placeholder
    text = f"w1 {placeholder} w2 w3 {placeholder} w4"
    images = [image(1, (60, 90)), image(2, (120, 70))]
    expected = hf(text=[text], images=images, return_tensors="pt")
    ids, features = ours.process(tokenizer.encode(text), images)
    assert ids == expected["input_ids"][0].tolist()
    grids = torch.cat([f.torch_tensors()["image_grid_thw"] for f in features])
    assert torch.equal(grids, expected["image_grid_thw"])
    pixels = torch.cat([f.torch_tensors()["pixel_values"] for f in features])
    assert torch.equal(pixels, expected["pixel_values"])
    start = tokenizer.convert_tokens_to_ids("<|vision_start|>")
    for f, grid in zip(features, grids):  # each span: the image's merged patches, all image tokens
        assert f.length == int(grid.prod()) // 4
        assert set(ids[f.offset:f.end]) == {ours.image_token_id} and ids[f.offset - 1] == start
