"""The runner's image bookkeeping (worker/mm_embeds.py) over a chunked prefill, with a stand-in model: image rows
land on their placeholder tokens, each image is encoded once, and an M-RoPE model's positions are its prompt's
3-row table on image steps and index + delta afterwards."""

from __future__ import annotations

import numpy as np
import torch

from pagellm.core.sched_output import CachedRequestData, NewRequestData, SchedulerOutput
from pagellm.multimodal.inputs import make_feature
from pagellm.sampling_params import SamplingParams
from pagellm.worker.input_batch import InputBatch
from pagellm.worker.mm_embeds import MultiModalEmbedder

IMG = 7
PROMPT = [1, 2, IMG, IMG, IMG, IMG, 3, 4]  # text, a 4-token image (grid 1x2x2 after the merge), text
# What Qwen2-VL's get_rope_index gives this prompt: text 0, 1; the image at 2 + (t, h, w); text on from 4.
TABLE = np.array([[0, 1, 2, 2, 2, 2, 4, 5],
                  [0, 1, 2, 2, 3, 3, 4, 5],
                  [0, 1, 2, 3, 2, 3, 4, 5]])
DELTA = 6 - 8


class StandIn:
    """The model interface mm_embeds relies on: embeddings are the token id (text) or 100 + image row."""

    def __init__(self, mrope: bool) -> None:
        self.encoded = 0
        if mrope:
            self.mrope_positions = lambda ids, grids: (torch.from_numpy(TABLE), DELTA)

    def get_image_embeddings(self, pixel_values, image_grid_thw):
        self.encoded += len(image_grid_thw)
        return torch.arange(100.0, 104.0).repeat(len(image_grid_thw))[:, None]

    def embed_input_ids(self, ids, image_embeds=None):
        embeds = ids.to(torch.float32)[:, None].clone()
        if image_embeds is not None:
            embeds[ids == IMG] = image_embeds
        return embeds


def _steps(mrope: bool):
    feature = make_feature("image", 2, 4, {"pixel_values": torch.zeros(16, 8),
                                           "image_grid_thw": torch.tensor([[1, 4, 4]])})
    model = StandIn(mrope)
    mm, batch = MultiModalEmbedder(model), InputBatch(4, 64, 16, torch.device("cpu"))
    params = SamplingParams(max_tokens=4)
    first = SchedulerOutput(new_reqs=[
        NewRequestData("img", PROMPT, params, [0], 0, 4, mm_features=[feature]),
        NewRequestData("txt", [5, 6, 8, 9], params, [1], 0, 4)])
    second = SchedulerOutput(cached=CachedRequestData())
    second.cached.add("img", [], 4, 4, [])
    third = SchedulerOutput(cached=CachedRequestData())
    third.cached.add("img", [], 8, 1, [9])
    for sched in (first, second, third):
        mm.apply(sched)
        step = batch.apply(sched)
        slices = mm.plan(step)
        ids = torch.from_numpy(step.input_ids)
        embeds = mm.inputs_embeds(slices, ids) if slices else model.embed_input_ids(ids)
        yield step, slices, embeds[:, 0].tolist(), mm


def test_image_rows_over_a_chunked_prefill():
    (s1, sl1, e1, mm), (s2, sl2, e2, _), (s3, sl3, e3, _) = _steps(mrope=False)
    img = s1.req_ids.index("img")
    a = int(s1.query_start_loc[img])
    assert e1[a:a + 4] == [1, 2, 100, 101] and len(sl1) == 1  # the chunk ends inside the image
    assert e2 == [102, 103, 3, 4] and sl2[0].done
    assert not sl3 and e3 == [9]
    assert mm.num_images_encoded == 1 and not mm.embeddings and not mm.features
    assert s3.positions.tolist() == [8] and mm.positions_3d is None  # no M-RoPE: untouched


def test_mrope_positions_follow_the_prompt_table_then_delta():
    gen = _steps(mrope=True)  # (one step at a time: positions_3d is the latest step's)
    step, _, _, mm = next(gen)
    img = step.req_ids.index("img")
    a = int(step.query_start_loc[img])
    assert mm.positions_3d[:, a:a + 4].tolist() == TABLE[:, :4].tolist()
    txt = step.req_ids.index("txt")
    b = int(step.query_start_loc[txt])
    assert mm.positions_3d[:, b:b + 4].tolist() == [[0, 1, 2, 3]] * 3  # a text-only request: plain positions
    step, _, _, mm = next(gen)
    assert mm.positions_3d.tolist() == TABLE[:, 4:].tolist()
    step, _, _, mm = next(gen)  # a decode at index 8: one row, index + delta (a CUDA graph can replay it)
    assert mm.positions_3d is None and step.positions.tolist() == [8 + DELTA]
    assert mm.rope_positions(torch.tensor([6])).tolist() == [6]
