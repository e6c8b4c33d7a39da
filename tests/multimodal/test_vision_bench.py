"""The image workloads' machinery (bench/vision.py) on a Qwen2-VL-7B config shrunk to a tiny shape: the prompts
hold Qwen2-VL's placeholder ids, both engines run every request with its own image token count, and the
results name both."""

from __future__ import annotations

import copy

from pagellm.bench.vision import make_image_requests, placeholder_ids, run_vision_bench, write_vision_model
from pagellm.bench.workloads import QWEN2_VL_7B, WORKLOADS


def _tiny_qwen2_vl_shape() -> dict:
    shape = copy.deepcopy(QWEN2_VL_7B)  # the workload's token ids, processor and merge size; tiny layers
    shape["vision_config"].update(depth=1, embed_dim=32, hidden_size=64, num_heads=2)
    shape["text_config"].update(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                                num_key_value_heads=2)
    shape["text_config"]["rope_parameters"]["mrope_section"] = [2, 3, 3]
    return shape


def test_qwen2vl_image_workload_runs_both_engines(tmp_path):
    assert WORKLOADS["qwen2vl-image"].images and WORKLOADS["qwen2vl-image"].shape is QWEN2_VL_7B
    shape = _tiny_qwen2_vl_shape()
    requests = make_image_requests(shape, 3, (4, 8), (3, 5))
    assert all(r.prompt_token_ids[1:4] == placeholder_ids(shape) == [151652, 151655, 151653] for r in requests)

    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(write_vision_model(shape, str(tmp_path)))
    image_tokens = sum(int(processor(images=[r.image], return_tensors="pt")["image_grid_thw"].prod()) // 4
                       for r in requests)
    text_tokens = sum(len(r.prompt_token_ids) - 1 for r in requests)  # the image token itself is expanded
    result = run_vision_bench({"dtype": "float32", "kv_cache_memory": 64 * 2**20, "max_model_len": 4096}, shape,
                              str(tmp_path), 3, (4, 8), (3, 5), True, 2, "cpu")
    assert result["output_tokens"] == sum(r.output_len for r in requests)
    assert result["pagellm"]["input_tokens"] == text_tokens + image_tokens
    assert image_tokens > 3 * 64  # random 300-640 px photos: hundreds of tokens each
    assert result["peer"]["seconds"] > 0 and result["ratio_output_tokens_per_s"] > 0
