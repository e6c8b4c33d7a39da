"""Qwen2-VL's vision tower against transformers' Qwen2VisionTransformerPretrainedModel with the same random
weights, in float32: one image, two images of different grids, and a two-frame grid (attention per frame)."""

from __future__ import annotations

import pytest
import torch

from pagellm.model_executor.models.qwen2_vl_vision import Qwen2VisionTransformer, image_token_counts
from tests.models.tiny_qwen2_vl import merged_output, pixel_values_for, tiny_qwen2_vl_config


@pytest.fixture(scope="module")
def towers():
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

    config = tiny_qwen2_vl_config()
    torch.manual_seed(0)
    ref = Qwen2VisionTransformerPretrainedModel._from_config(config.vision_config, dtype=torch.float32).eval()
    with torch.no_grad():  # random init leaves some weights zero or one: make every tensor carry signal
        for p in ref.parameters():
            p.normal_(0.0, 0.2)
    ours = Qwen2VisionTransformer(config.vision_config, dtype=torch.float32)
    # transformers 5 names the tower model.visual.*, original checkpoints visual.*: both load.
    names = [("model.visual." if i % 2 else "visual.") + n for i, n in enumerate(ref.state_dict())]
    loaded = ours.load_weights(zip(names, ref.state_dict().values()))
    assert loaded == {n for n, _ in ours.named_parameters()}
    return config, ref, ours


@pytest.mark.parametrize("grids", [[(1, 4, 6)], [(1, 6, 4), (1, 8, 8)], [(2, 4, 4), (1, 2, 2)],
                                   [(1, 4, 4), (2, 4, 4), (1, 4, 6)]])  # equal frames batched in one call
def test_tower_matches_transformers(towers, grids):
    config, ref, ours = towers
    pixels = pixel_values_for(grids, config, seed=len(grids))
    grid = torch.tensor(grids)
    with torch.inference_mode():
        want = merged_output(ref(pixels, grid_thw=grid))
        got = ours(pixels, grid)
    assert got.shape == (sum(image_token_counts(grid, 2)), config.vision_config.hidden_size)
    assert (got - want).abs().max().item() < 1e-4


@pytest.mark.parametrize("grids", [[(1, 4, 6), (1, 8, 8)], [(1, 4, 6), (1, 4, 6)]])
def test_images_are_independent(towers, grids):
    """An image's embeddings do not depend on the other images of the batch (attention stays within one)."""
    config, _, ours = towers
    pixels = pixel_values_for(grids, config)
    with torch.inference_mode():
        both = ours(pixels, torch.tensor(grids))
        first = ours(pixels[:24], torch.tensor(grids[:1]))
    torch.testing.assert_close(both[:6], first, atol=1e-5, rtol=1e-5)


def test_bad_inputs_raise(towers):
    config, _, ours = towers
    pixels = pixel_values_for([(1, 4, 4)], config)
    with pytest.raises(ValueError, match="pixel_values must be"):
        ours(pixels, torch.tensor([[1, 4, 6]]))
    with pytest.raises(ValueError, match=r"\[n_images, 3\]"):
        ours(pixels, torch.tensor([1, 4, 4]))
    with pytest.raises(ValueError, match="multiples"):
        ours(pixel_values_for([(1, 3, 4)], config), torch.tensor([[1, 3, 4]]))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tower_on_cuda(towers, dtype):
    config, ref, ours = towers
    grids = [(1, 6, 4), (2, 8, 8)]
    pixels = pixel_values_for(grids, config, seed=2)
    with torch.inference_mode():
        want = merged_output(ref(pixels, grid_thw=torch.tensor(grids)))
        gpu = Qwen2VisionTransformer(config.vision_config, dtype=dtype, device="cuda")
        gpu.load_weights(("visual." + n, t) for n, t in ref.state_dict().items())
        got = gpu(pixels.cuda(), torch.tensor(grids)).float().cpu()
    tol = 1e-3 if dtype == torch.float32 else 0.05 * want.abs().max().item()
    assert (got - want).abs().max().item() < tol


def test_attention_runs_group_equal_neighbours():
    from pagellm.model_executor.models.qwen2_vl_vision import attention_runs

    assert attention_runs(torch.tensor([[1, 4, 4], [2, 4, 4], [1, 4, 6], [1, 4, 4]])) == \
        [(0, 3, 16), (48, 1, 24), (72, 1, 16)]
