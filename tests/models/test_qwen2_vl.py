"""Qwen2-VL end to end at the module level: our tower + M-RoPE decoder over a paged KV cache (one prefill of the
image prompt, then decode steps) against transformers' Qwen2VLForConditionalGeneration in float32, same random
weights, both checkpoint layouts, tied and untied heads."""

from __future__ import annotations

import pytest
import torch

from pagellm.model_executor.layers.mrope import mrope_decode_positions
from pagellm.model_executor.models.qwen2_vl import Qwen2VLForConditionalGeneration
from tests.models.helpers import empty_kv_caches, single_request_metadata
from tests.models.tiny_qwen2_vl import (IMAGE_TOKEN, image_prompt, pixel_values_for, tiny_qwen2_vl_config,
                                       token_type_kwargs)

GENERATED = [17, 42, 99, 5, 230]  # teacher-forced continuation: each is one decode step


def _hf_model(tie: bool):
    from transformers import Qwen2VLForConditionalGeneration as HFQwen2VL

    torch.manual_seed(0)
    model = HFQwen2VL(tiny_qwen2_vl_config(tie)).eval()
    with torch.no_grad():  # widen the random weights so logits are not near-ties
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.08)
    return model


def _original_layout(name: str) -> str:
    """transformers 5 names -> the original Qwen2-VL checkpoint's."""
    return name.replace("model.language_model.", "model.").replace("model.visual.", "visual.")


@torch.inference_mode()
def _run_ours(model: Qwen2VLForConditionalGeneration, ids: list[int], grids, pixels, device="cpu") -> torch.Tensor:
    """Logits of every token: the prompt in one prefill (inputs_embeds, [3, T] positions), then one decode per
    generated token (token ids, positions index + delta)."""
    prompt_len = len(ids) - len(GENERATED)
    text_config = tiny_qwen2_vl_config().text_config
    caches = empty_kv_caches(text_config, len(ids), next(model.parameters()).dtype, device=device)
    prompt = torch.tensor(ids[:prompt_len], device=device)
    positions, delta = model.mrope_positions(prompt, grids)
    image_embeds = model.get_image_embeddings(pixels.to(device), torch.tensor(grids)) if grids else None
    embeds = model.embed_input_ids(prompt, image_embeds)
    hidden = model(None, positions.to(device), caches, single_request_metadata(0, prompt_len, device=device),
                   inputs_embeds=embeds)
    out = [model.compute_logits(hidden)]
    for i in range(prompt_len, len(ids)):
        pos = mrope_decode_positions(delta, i, i + 1, device=device)
        hidden = model(torch.tensor(ids[i:i + 1], device=device), pos, caches,
                       single_request_metadata(i, 1, device=device))
        out.append(model.compute_logits(hidden))
    return torch.cat(out).float().cpu()


@pytest.mark.parametrize("tie,layout,grids", [
    (False, "transformers5", [(1, 4, 6)]),
    (True, "original", [(1, 6, 4), (1, 8, 8)]),
    (False, "original", []),
])
def test_logits_match_transformers(tie, layout, grids):
    hf = _hf_model(tie)
    config = hf.config
    ids = image_prompt(grids, seed=7) + GENERATED
    pixels = pixel_values_for(grids, config, seed=1) if grids else None

    ours = Qwen2VLForConditionalGeneration(config, dtype=torch.float32)
    state = hf.state_dict()
    names = list(state) if layout == "transformers5" else [_original_layout(n) for n in state]
    loaded = ours.load_weights(zip(names, state.values()))
    assert loaded == {n for n, _ in ours.named_parameters()}

    t = torch.tensor([ids])
    kwargs = token_type_kwargs(hf.forward, t)
    if grids:
        kwargs.update(pixel_values=pixels, image_grid_thw=torch.tensor(grids))
    with torch.inference_mode():
        want = hf(input_ids=t, **kwargs).logits[0].float()
    got = _run_ours(ours, ids, grids, pixels)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
    assert torch.equal(got.argmax(-1), want.argmax(-1))


@torch.inference_mode()
def test_chunked_prefill_split_inside_an_image():
    """A prompt prefilled in chunks whose boundaries fall inside images (as the scheduler may cut it): each chunk
    takes its slice of the [3, T] positions and the image rows of the image tokens it holds, and the logits of
    its tokens equal the whole prefill's."""
    grids = [(1, 6, 4), (1, 8, 8)]
    hf = _hf_model(False)
    ours = Qwen2VLForConditionalGeneration(hf.config, dtype=torch.float32)
    ours.load_weights(hf.state_dict().items())
    prompt = torch.tensor(image_prompt(grids, seed=7))
    positions, _ = ours.mrope_positions(prompt, grids)
    image_rows = ours.get_image_embeddings(pixel_values_for(grids, hf.config, seed=1), torch.tensor(grids))
    text_config = tiny_qwen2_vl_config().text_config

    def prefill(cuts: list[int]) -> torch.Tensor:
        caches = empty_kv_caches(text_config, len(prompt))
        out = []
        for start, end in zip(cuts[:-1], cuts[1:]):
            first_row = int((prompt[:start] == IMAGE_TOKEN).sum())
            rows = image_rows[first_row:first_row + int((prompt[start:end] == IMAGE_TOKEN).sum())]
            embeds = ours.embed_input_ids(prompt[start:end], rows)
            hidden = ours(None, positions[:, start:end], caches, single_request_metadata(start, end - start),
                          inputs_embeds=embeds)
            out.append(ours.compute_logits(hidden))
        return torch.cat(out)

    whole = prefill([0, len(prompt)])
    cuts = [0, 9, 25, 30, len(prompt)]  # 9: inside the first image; 25 and 30: inside the second
    assert all(prompt[c - 1] == IMAGE_TOKEN and prompt[c] == IMAGE_TOKEN for c in cuts[1:-1])
    chunked = prefill(cuts)
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=1e-5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_transformers(dtype):
    """Tower, M-RoPE (the Triton rotary kernel) and Triton paged attention on CUDA against transformers on the CPU."""
    grids = [(1, 6, 4), (1, 8, 8)]
    hf = _hf_model(False)
    ids = image_prompt(grids, seed=7) + GENERATED
    pixels = pixel_values_for(grids, hf.config, seed=1)
    ours = Qwen2VLForConditionalGeneration(hf.config, dtype=dtype, device="cuda")
    ours.load_weights(hf.state_dict().items())
    t = torch.tensor([ids])
    with torch.inference_mode():
        want = hf(input_ids=t, pixel_values=pixels, image_grid_thw=torch.tensor(grids),
                  **token_type_kwargs(hf.forward, t)).logits[0].float()
    got = _run_ours(ours, ids, grids, pixels, device="cuda")
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=2e-3, rtol=0)
    else:
        assert (got - want).abs().max() < 0.1 * want.abs().max()


def test_embed_input_ids_checks_the_image_rows():
    ours = Qwen2VLForConditionalGeneration(tiny_qwen2_vl_config(), dtype=torch.float32)
    ids = torch.tensor(image_prompt([(1, 4, 4)]))  # 4 image tokens
    with pytest.raises(ValueError, match="4 image tokens but 3"):
        ours.embed_input_ids(ids, torch.zeros(3, 64))
    with pytest.raises(ValueError, match="4 image tokens but 0"):
        ours.embed_input_ids(ids)
    rows = torch.randn(4, 64)
    embeds = ours.embed_input_ids(ids, rows)
    assert torch.equal(embeds[ids == IMAGE_TOKEN], rows)


def test_arch_config_reads_the_text_config_and_mrope_section():
    """One ArchConfig for both spellings: transformers 5 (text_config, rope_parameters with mrope_section, tied
    head at the top level) and an older flat config (rope_scaling type "mrope"); get_rope gives M-RoPE."""
    from types import SimpleNamespace

    from pagellm.arch_config import ArchConfig
    from pagellm.model_executor.layers.mrope import MRotaryEmbedding
    from pagellm.model_executor.layers.rotary import get_rope

    new = ArchConfig.from_hf(tiny_qwen2_vl_config(tie_word_embeddings=True))
    assert (new.num_heads, new.num_kv_heads, new.head_dim, new.num_layers) == (4, 2, 16, 2)
    assert new.tie_word_embeddings and new.mrope_section == (2, 3, 3)
    assert new.rope_scaling == {"rope_type": "default"} and new.rope_theta == 10000.0
    old = ArchConfig.from_hf(SimpleNamespace(
        architectures=["Qwen2VLForConditionalGeneration"], model_type="qwen2_vl", hidden_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128, vocab_size=256,
        rope_theta=1e6, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, tie_word_embeddings=False))
    assert old.mrope_section == (2, 3, 3) and old.rope_scaling["rope_type"] == "default" and old.rope_theta == 1e6
    for arch in (new, old):
        rope = get_rope(arch)
        assert isinstance(rope, MRotaryEmbedding) and rope.mrope_section == [2, 3, 3]


def test_loads_lazy_checkpoint_tensors(tmp_path):
    """Tensor parallelism reads a checkpoint lazily (each tensor valid only while its file is open): the tower's
    tensors are copied as they stream past, so every parameter is filled with the checkpoint's values."""
    from safetensors.torch import save_file

    from pagellm.model_executor.loader.safetensors_loader import iterate_safetensors_weights

    hf = _hf_model(False)
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    save_file(state, str(tmp_path / "model.safetensors"))
    ours = Qwen2VLForConditionalGeneration(hf.config, dtype=torch.float32)
    loaded = ours.load_weights(iterate_safetensors_weights(str(tmp_path), lazy=True))
    assert loaded == {n for n, _ in ours.named_parameters()}
    assert torch.equal(ours.visual.patch_embed.proj.weight, state["model.visual.patch_embed.proj.weight"])
    assert torch.equal(ours.visual.merger.mlp[2].weight, state["model.visual.merger.mlp.2.weight"])
