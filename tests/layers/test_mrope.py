"""M-RoPE (Qwen2-VL) against transformers: the prompt positions of get_rope_index and the rotation of q/k by
Qwen2VLRotaryEmbedding, on prompts with 0, 1 and 2 images; then the decode positions of later tokens."""

from __future__ import annotations

import pytest
import torch

from pagellm.arch_config import ArchConfig
from pagellm.model_executor.layers.mrope import MRotaryEmbedding, mrope_decode_positions, mrope_positions
from pagellm.model_executor.layers.rotary import get_rope
from tests.models.tiny_qwen2_vl import (IMAGE_TOKEN, MERGE, VISION_START, image_prompt, tiny_qwen2_vl_config,
                                       token_type_kwargs)

PROMPTS = {
    "text": [],
    "one_image": [(1, 4, 6)],
    "two_images": [(1, 6, 4), (1, 8, 8)],
}


@pytest.fixture(scope="module")
def hf_model():
    from transformers import Qwen2VLModel

    torch.manual_seed(0)
    return Qwen2VLModel(tiny_qwen2_vl_config()).eval()


def _hf_rope_index(model, ids: list[int], grids):
    t = torch.tensor([ids])
    grid = torch.tensor(grids) if grids else None
    positions, delta = model.get_rope_index(t, image_grid_thw=grid, **token_type_kwargs(model.get_rope_index, t))
    return positions[:, 0], int(delta.flatten()[0])


@pytest.mark.parametrize("name", list(PROMPTS))
def test_prompt_positions_match_transformers(hf_model, name):
    grids = PROMPTS[name]
    ids = image_prompt(grids, seed=len(grids))
    ref_pos, ref_delta = _hf_rope_index(hf_model, ids, grids)
    pos, delta = mrope_positions(ids, torch.tensor(grids) if grids else None, MERGE, IMAGE_TOKEN, VISION_START)
    assert pos.shape == (3, len(ids)) and pos.dtype == torch.int64
    assert torch.equal(pos, ref_pos)
    assert delta == ref_delta
    if grids:
        assert delta < 0  # an image takes fewer positions than tokens


def test_decode_positions_continue_from_delta(hf_model):
    """Later tokens: index + delta in all three rows, as transformers' generate places them."""
    grids = PROMPTS["two_images"]
    ids = image_prompt(grids, seed=3)
    pos, delta = mrope_positions(ids, grids, MERGE, IMAGE_TOKEN, VISION_START)
    later = mrope_decode_positions(delta, len(ids), len(ids) + 4)
    assert later.shape == (3, 4)
    assert torch.equal(later, (torch.arange(len(ids), len(ids) + 4) + delta).expand(3, -1))
    assert int(later[0, 0]) == int(pos.max()) + 1  # the first generated token follows the prompt's last position
    # The same as transformers' positions of the whole sequence when the generated tokens are plain text.
    full = ids + [7, 8, 9, 10]
    ref_pos, _ = _hf_rope_index(hf_model, full, grids)
    assert torch.equal(torch.cat([pos, later], dim=1), ref_pos)


def test_bad_prompts_raise():
    grids = [(1, 4, 4)]
    ids = image_prompt(grids)
    with pytest.raises(ValueError, match="image_grid_thw has 2 images"):
        mrope_positions(ids, grids * 2, MERGE, IMAGE_TOKEN, VISION_START)
    with pytest.raises(ValueError, match="image tokens"):
        mrope_positions(ids, [(1, 4, 8)], MERGE, IMAGE_TOKEN, VISION_START)  # needs 8 tokens, the prompt has 4
    with pytest.raises(ValueError, match="multiples"):
        mrope_positions(ids, [(1, 3, 4)], MERGE, IMAGE_TOKEN, VISION_START)
    with pytest.raises(ValueError, match="accounts for 0"):
        mrope_positions(ids, None, MERGE, IMAGE_TOKEN, VISION_START)


@pytest.mark.parametrize("name", list(PROMPTS))
def test_rotation_matches_transformers(hf_model, name):
    from transformers.models.qwen2_vl import modeling_qwen2_vl as hf

    grids = PROMPTS[name]
    ids = image_prompt(grids, seed=len(grids))
    text_config = tiny_qwen2_vl_config().text_config
    positions, _ = mrope_positions(ids, grids, MERGE, IMAGE_TOKEN, VISION_START)
    t, heads, kv_heads, d = len(ids), 4, 2, 16
    torch.manual_seed(1)
    q, k = torch.randn(t, heads * d), torch.randn(t, kv_heads * d)

    cos, sin = hf.Qwen2VLRotaryEmbedding(text_config)(q, positions[:, None, :])
    q4, k4 = q.view(1, t, heads, d).transpose(1, 2), k.view(1, t, kv_heads, d).transpose(1, 2)
    if cos.dim() == 4:  # older transformers: per-row cos/sin [3, 1, T, D], the sections picked when rotating
        ref_q, ref_k = hf.apply_multimodal_rotary_pos_emb(q4, k4, cos, sin, [2, 3, 3])
    else:
        ref_q, ref_k = hf.apply_rotary_pos_emb(q4, k4, cos, sin)
    rope = get_rope(ArchConfig.from_hf(text_config))
    assert isinstance(rope, MRotaryEmbedding) and rope.mrope_section == [2, 3, 3]
    out_q, out_k = rope(positions, q, k)
    torch.testing.assert_close(out_q, ref_q.transpose(1, 2).reshape(t, -1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_k, ref_k.transpose(1, 2).reshape(t, -1), atol=1e-5, rtol=1e-5)


def test_text_positions_are_plain_rope():
    """[T] positions, or [3, T] with equal rows, rotate as 1-D RoPE does."""
    rope = MRotaryEmbedding(16, 64, 10000.0, [2, 3, 3])
    pos = torch.arange(10) * 3
    q, k = torch.randn(10, 32), torch.randn(10, 16)
    a = rope(pos, q, k)
    b = rope(pos.expand(3, -1), q, k)
    torch.testing.assert_close(a[0], b[0])
    torch.testing.assert_close(a[1], b[1])
    with pytest.raises(ValueError, match="sum"):
        MRotaryEmbedding(16, 64, 10000.0, [2, 3, 4])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_in_place_matches_cpu(dtype):
    """The CUDA path (the Triton rotary kernel over a per-step table) against the torch path, on fused-QKV views."""
    head_dim, heads, kv_heads = 128, 8, 2
    rope = MRotaryEmbedding(head_dim, 4096, 1e6, [16, 24, 24])
    grids = [(1, 16, 20), (1, 8, 8)]
    ids = image_prompt(grids, seed=5, text_lens=[30, 7, 12])
    pos, _ = mrope_positions(ids, grids, MERGE, IMAGE_TOKEN, VISION_START)
    qkv = torch.randn(len(ids), (heads + 2 * kv_heads) * head_dim, dtype=dtype)
    q, k, _ = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    ref_q, ref_k = rope(pos, q.clone(), k.clone())
    qkv_gpu = qkv.cuda()
    gq, gk, _ = qkv_gpu.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    out_q, out_k = rope(pos.cuda(), gq, gk)
    tol = 1e-5 if dtype == torch.float32 else 1.6e-2
    torch.testing.assert_close(out_q.cpu().float(), ref_q.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(out_k.cpu().float(), ref_k.float(), atol=tol, rtol=tol)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_replay_matches_eager():
    """[3, T] positions inside a captured CUDA graph (a decode graph of the runner): new positions written into
    the static buffer give the eager result."""
    head_dim, heads, kv_heads, tokens = 128, 4, 2, 8
    rope = MRotaryEmbedding(head_dim, 4096, 1e6, [16, 24, 24], device="cuda")
    pos = torch.zeros(3, tokens, dtype=torch.int64, device="cuda")
    q0 = torch.randn(tokens, heads * head_dim, device="cuda")
    k0 = torch.randn(tokens, kv_heads * head_dim, device="cuda")
    q, k = q0.clone(), k0.clone()
    rope(pos, q, k)  # warm-up (Triton compiles outside the capture)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        rope(pos, q, k)
    new_pos = torch.randint(0, 4096, (3, tokens), device="cuda")
    pos.copy_(new_pos)
    q.copy_(q0)
    k.copy_(k0)
    graph.replay()
    want_q, want_k = MRotaryEmbedding(head_dim, 4096, 1e6, [16, 24, 24])(new_pos.cpu(), q0.cpu(), k0.cpu())
    torch.testing.assert_close(q.cpu(), want_q, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k.cpu(), want_k, atol=1e-5, rtol=1e-5)
