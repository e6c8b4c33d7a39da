"""A tiny random Qwen2-VL folder built offline (the config of tests/models/tiny_qwen2_vl.py, safetensors, a
Qwen2-VL image processor at the tiny tower's patch size, a word-level tokenizer with the vision tokens and a
chat template), and transformers' greedy tokens on it."""

from __future__ import annotations

import torch

from tests.models.tiny_qwen2_vl import IMAGE_TOKEN, MERGE, VISION_END, VISION_START, tiny_qwen2_vl_config

SPECIAL = {IMAGE_TOKEN: "<|image_pad|>", VISION_START: "<|vision_start|>", VISION_END: "<|vision_end|>",
           253: "<|video_pad|>", 1: "<|im_end|>", 240: "<|im_start|>"}
WORDS = [SPECIAL.get(i, f"w{i}") for i in range(256)]  # the tiny config's vocabulary: ids 0..255
WORDS[241], WORDS[242] = "user", "assistant"
PATCH = 4  # the tiny tower's patch size: an image of 8k x 8j pixels is a (1, 2k, 2j) grid, k*j image tokens
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|> assistant{% endif %}")


def image_processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    factor = PATCH * MERGE
    return Qwen2VLImageProcessorPil(patch_size=PATCH, merge_size=MERGE, temporal_patch_size=2,
                                    min_pixels=4 * factor**2, max_pixels=40 * factor**2)


def make_tiny_qwen2_vl(folder: str) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers import Qwen2VLForConditionalGeneration as HFQwen2VL

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", unk_token="w0",
                                        extra_special_tokens=[s for s in SPECIAL.values() if s != "<|im_end|>"])
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    model = HFQwen2VL(tiny_qwen2_vl_config()).float()
    with torch.no_grad():  # widen the random weights so greedy choices are not near-ties
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.08)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    image_processor().save_pretrained(folder)
    return folder


def load_reference(folder: str):
    from transformers import Qwen2VLForConditionalGeneration as HFQwen2VL

    return HFQwen2VL.from_pretrained(folder, dtype=torch.float32).eval()


@torch.inference_mode()
def reference_greedy(model, prompt_ids: list[int], images: list, max_new_tokens: int) -> list[int]:
    """transformers' greedy tokens for prompt ids whose image placeholders are already expanded."""
    from tests.models.tiny_qwen2_vl import token_type_kwargs

    ids = torch.tensor([prompt_ids])
    kwargs = {}
    if images:
        processed = image_processor()(images=images, return_tensors="pt")
        kwargs.update(pixel_values=processed["pixel_values"], image_grid_thw=processed["image_grid_thw"],
                      **token_type_kwargs(model.forward, ids))
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, **kwargs)
    return out[0, len(prompt_ids):].tolist()
