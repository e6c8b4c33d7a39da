"""The image workloads of `pagellm bench throughput` (`llava7b-image`, `qwen2vl-image`): one random image per
request through a LLaVA-1.5-7B- or Qwen2-VL-7B-shaped model with dummy weights, and transformers' generate() on
the same shape as the peer.

Each request, in this order from random.Random(0): its text length, its output length, its text token ids, then
its image (random pixels of a random size, so the image processor resizes and crops as it would a photo). The
prompt is the text with one image placeholder after its first token; both engines expand it into the model's
image tokens (LLaVA: 576 an image; Qwen2-VL: one per 28x28 pixels of the resized image, so the count varies).
pagellm's time includes its front end's image processing; the peer's includes its own.
"""

from __future__ import annotations

import gc
import inspect
import json
import os
import random
from dataclasses import dataclass
from typing import Any

import torch

from pagellm.bench.runs import free_device_memory, peer_result, time_peer_generate, timed_generate
from pagellm.multimodal.families import image_family

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]  # (Qwen2-VL normalizes with CLIP's statistics too)
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


@dataclass
class ImageRequest:
    prompt_token_ids: list[int]  # one image placeholder, not yet expanded
    output_len: int
    image: Any  # PIL.Image


def _preprocessor_config(shape: dict[str, Any]) -> dict[str, Any]:
    """The model's preprocessor_config.json, as its published checkpoint has it."""
    vc = shape["vision_config"]
    common = {"do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
              "image_mean": CLIP_MEAN, "image_std": CLIP_STD, "do_convert_rgb": True, "resample": 3}
    if _architecture(shape) == "Qwen2VLForConditionalGeneration":  # Qwen2-VL-7B-Instruct's pixel bounds
        min_pixels, max_pixels = 56 * 56, 28 * 28 * 1280
        return {**common, "image_processor_type": "Qwen2VLImageProcessor", "min_pixels": min_pixels,
                "max_pixels": max_pixels, "size": {"shortest_edge": min_pixels, "longest_edge": max_pixels},
                "patch_size": vc["patch_size"], "temporal_patch_size": vc["temporal_patch_size"],
                "merge_size": vc["spatial_merge_size"]}
    size = vc["image_size"]
    return {**common, "image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": size},
            "crop_size": {"height": size, "width": size}, "do_center_crop": True}


def _architecture(shape: dict[str, Any]) -> str:
    return shape["architectures"][0]


def placeholder_ids(shape: dict[str, Any]) -> list[int]:
    """The token ids of one image placeholder (the bench has no tokenizer): Qwen2-VL's image token sits between
    its vision-start and vision-end tokens (M-RoPE finds images by them)."""
    if _architecture(shape) == "Qwen2VLForConditionalGeneration":
        return [shape["vision_start_token_id"], shape["image_token_id"], shape["vision_end_token_id"]]
    return [shape["image_token_index"]]


def write_vision_model(shape: dict[str, Any], folder: str) -> str:
    """config.json + preprocessor_config.json: enough for load_format='dummy' and for the peer."""
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(shape, f)
    with open(os.path.join(folder, "preprocessor_config.json"), "w") as f:
        json.dump(_preprocessor_config(shape), f)
    return folder


def make_image_requests(shape: dict[str, Any], num_requests: int, input_len: tuple[int, int],
                        output_len: tuple[int, int]) -> list[ImageRequest]:
    import numpy as np
    from PIL import Image

    rng = random.Random(0)
    vocab = shape["text_config"]["vocab_size"]
    placeholder = placeholder_ids(shape)
    image_id = min(placeholder)  # text ids stay below the special tokens
    requests = []
    for _ in range(num_requests):
        in_len, out_len = rng.randint(*input_len), rng.randint(*output_len)
        ids = [rng.randrange(1000, min(image_id, vocab) - 1000) for _ in range(in_len)]
        w, h = rng.randint(300, 640), rng.randint(300, 640)
        pixels = np.random.default_rng(rng.randrange(2**31)).integers(0, 256, (h, w, 3), dtype=np.uint8)
        requests.append(ImageRequest(ids[:1] + placeholder + ids[1:], out_len, Image.fromarray(pixels)))
    return requests


def run_pagellm_images(engine_kwargs: dict[str, Any], requests: list[ImageRequest]) -> dict[str, Any]:
    from pagellm.entrypoints.llm import LLM
    from pagellm.sampling_params import SamplingParams

    llm = LLM(**engine_kwargs)
    prompts = [{"prompt_token_ids": r.prompt_token_ids, "multi_modal_data": {"image": r.image}} for r in requests]
    params = [SamplingParams(max_tokens=r.output_len, ignore_eos=True, detokenize=False) for r in requests]
    elapsed, outputs = timed_generate(llm, prompts, params, sum(r.output_len for r in requests))
    num_in = sum(len(o.prompt_token_ids) for o in outputs)  # image tokens included
    dtype = str(llm.llm_engine.config.model_config.dtype).replace("torch.", "")
    llm.llm_engine.core.shutdown()  # the peer runs next on the same device
    del llm, outputs
    free_device_memory()
    return {"engine": "pagellm", "seconds": elapsed, "input_tokens": num_in, "dtype": dtype}


def run_hf_images(folder: str, dtype: torch.dtype, device: str, requests: list[ImageRequest],
                  batch_size: int) -> dict[str, Any]:
    """transformers' generate() on static batches, left-padded, each batch run to its longest output. Each image
    is processed alone (as pagellm's front end does), on the clock, and its placeholder expanded to its own token
    count."""
    from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(folder)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype).eval()
    processor = AutoImageProcessor.from_pretrained(folder)
    family = image_family(config.architectures[0])
    image_id = family.token_id(config)
    # newer transformers releases place Qwen2-VL's images by mm_token_type_ids (text 0, image 1)
    token_types = "mm_token_type_ids" in inspect.signature(model.forward).parameters

    def batches():
        for i in range(0, len(requests), batch_size):
            batch = requests[i : i + batch_size]
            images = [processor(images=[r.image], return_tensors="pt") for r in batch]
            counts = [family.num_tokens(config, img) for img in images]
            prompts = [[t for tok in r.prompt_token_ids for t in ([tok] * n if tok == image_id else [tok])]
                       for r, n in zip(batch, counts)]

            def inputs(ids: torch.Tensor, images=images) -> dict[str, torch.Tensor]:
                out = {name: torch.cat([img[name] for img in images]).to(device) for name in family.input_names}
                out["pixel_values"] = out["pixel_values"].to(dtype)
                if token_types:
                    out["mm_token_type_ids"] = (ids == image_id).int().to(device)
                return out

            yield prompts, max(r.output_len for r in batch), inputs

    seconds = time_peer_generate(model, device, batches())
    del model
    gc.collect()
    return peer_result(batch_size, seconds, dtype)


def run_vision_bench(engine_kwargs: dict[str, Any], shape: dict[str, Any], folder: str, num_requests: int,
                     input_len: tuple[int, int], output_len: tuple[int, int], peer: bool, peer_batch_size: int,
                     device: str) -> dict[str, Any]:
    """Both engines on the same requests; output tokens/s of each and their ratio."""
    write_vision_model(shape, folder)
    requests = make_image_requests(shape, num_requests, input_len, output_len)
    num_out = sum(r.output_len for r in requests)
    ours = run_pagellm_images({**engine_kwargs, "model": folder, "load_format": "dummy",
                               "skip_tokenizer_init": True}, requests)
    ours["output_tokens_per_s"] = num_out / ours["seconds"]
    print(f"pagellm: {ours['seconds']:.1f} s, {ours['output_tokens_per_s']:.1f} output tokens/s "
          f"({len(requests)} requests, one image each, {ours['input_tokens']} input tokens with the images)",
          flush=True)
    results: dict[str, Any] = {"num_requests": len(requests), "output_tokens": num_out, "pagellm": ours}
    if peer:
        theirs = run_hf_images(folder, getattr(torch, ours["dtype"]), device, requests, peer_batch_size)
        theirs["output_tokens_per_s"] = num_out / theirs["seconds"]
        results["peer"] = theirs
        results["ratio_output_tokens_per_s"] = ours["output_tokens_per_s"] / theirs["output_tokens_per_s"]
        print(f"transformers: {theirs['seconds']:.1f} s, {theirs['output_tokens_per_s']:.1f} output tokens/s")
        print(f"ratio (pagellm / peer, output tokens/s): {results['ratio_output_tokens_per_s']:.2f}x")
    return results
