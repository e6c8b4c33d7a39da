"""A tiny random LLaVA-1.5 folder built offline (config, safetensors, CLIP image processor, word-level tokenizer
with a chat template), its transformers reference, and test images."""

from __future__ import annotations

import base64
import io

import numpy as np
import torch

WORDS = ["<unk>", "<s>", "</s>", "<image>", "USER:", "ASSISTANT:"] + [f"w{i}" for i in range(90)]
IMAGE_TOKEN_ID = 3
IMAGE_SIZE, PATCH = 28, 7  # 16 patches: 16 image tokens, one KV block
CHAT_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}USER: {{ m['content'] }} {% else %}"
                 "ASSISTANT: {{ m['content'] }} </s> {% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}ASSISTANT:{% endif %}")


def make_tiny_llava(folder: str) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
                              PreTrainedTokenizerFast)
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                        extra_special_tokens=["<image>"])
    tokenizer.chat_template = CHAT_TEMPLATE
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              image_size=IMAGE_SIZE, patch_size=PATCH, projection_dim=32)
    text = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=len(WORDS), max_position_embeddings=512,
                       bos_token_id=1, eos_token_id=2)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN_ID)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).float()
    with torch.no_grad():  # widen random weights so greedy choices are not near-ties
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.15)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE},
                          crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(folder)
    return folder


def load_reference(folder: str):
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()


def image(seed: int, size: tuple[int, int] = (40, 52)):
    """A random RGB PIL image (width, height)."""
    from PIL import Image

    arr = np.random.RandomState(seed).randint(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(arr)


def png_bytes(img, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def data_url(img, fmt: str = "PNG") -> str:
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(png_bytes(img, fmt)).decode()


@torch.inference_mode()
def reference_greedy(model, folder: str, prompt_ids: list[int], images: list, max_new_tokens: int) -> list[int]:
    """transformers' greedy tokens for prompt ids whose <image> tokens are already expanded."""
    from transformers import AutoImageProcessor

    kwargs = {}
    if images:
        kwargs["pixel_values"] = AutoImageProcessor.from_pretrained(folder)(images=images,
                                                                            return_tensors="pt")["pixel_values"]
    out = model.generate(input_ids=torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False,
                         **kwargs)
    return out[0, len(prompt_ids):].tolist()
