"""The runner's images: encode each image when a prefill step first reaches its placeholder span, keep its
embeddings while a chunked prefill crosses the span, and hand the language model `inputs_embeds` with the
image rows scattered over the placeholder tokens.

A request's features (multimodal/inputs.py) arrive with its NewRequestData. Embeddings are kept per request and
image until a step has computed the image's last placeholder position, then dropped (and the request's features
with its last image): an image is encoded once per prefill (again only if the request is preempted: it comes
back with its features and recomputes). Steps that touch no image span (all
decodes, text-only requests) go the usual input_ids path, CUDA graphs included.

M-RoPE models (Qwen2-VL: the model has `mrope_positions(prompt_token_ids, image_grid_thw) -> ([3, P], delta)`):
a request with images gets its prompt's 3-row positions once, when it arrives. Text tokens have three equal
rows (their index plus the shift of the images before them; index + delta after the prompt), so a step without
image tokens keeps 1-D positions, shifted in place (CUDA graphs still replay); a step with image tokens hands the
model [3, T] positions (`rope_positions`). The KV slots stay at the tokens' indices.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from pagellm.core.sched_output import SchedulerOutput
from pagellm.multimodal.inputs import MultiModalFeature
from pagellm.worker.input_batch import StepInputs


@dataclass
class ImageSlice:
    """Rows [src, src + n) of one image's embeddings go to flat token indices [dst, dst + n) of the step."""

    key: tuple[str, int]  # (request id, image index in the prompt)
    feature: MultiModalFeature
    dst: int
    src: int
    n: int
    done: bool  # the step computes the image's last placeholder position: drop its embeddings afterwards


class MultiModalEmbedder:
    def __init__(self, model: Any) -> None:
        self.model = model
        self.features: dict[str, list[MultiModalFeature]] = {}
        self.embeddings: dict[tuple[str, int], torch.Tensor] = {}
        self.num_images_encoded = 0  # (tests and metrics: each image once per prefill)
        # M-RoPE: request id -> (its prompt's positions [3, P], its delta), for requests with images.
        self.uses_mrope = hasattr(model, "mrope_positions")
        self.rope: dict[str, tuple[np.ndarray, int]] = {}
        self.positions_3d: Optional[np.ndarray] = None  # this step's [3, T] positions, when it has image tokens

    def apply(self, sched: SchedulerOutput) -> None:
        """Follow the step message: forget requests that left or were preempted, take new ones' features."""
        for req_id in (*sched.finished_req_ids, *sched.preempted_req_ids):
            self._drop(req_id)
        for r in sched.new_reqs:
            if r.mm_features:
                self._drop(r.req_id)
                self.features[r.req_id] = list(r.mm_features)
                if self.uses_mrope:
                    grids = torch.cat([f.tensors["image_grid_thw"].to_tensor() for f in r.mm_features])
                    positions, delta = self.model.mrope_positions(list(r.prompt_token_ids), grids)
                    self.rope[r.req_id] = (np.asarray(positions, dtype=np.int64), int(delta))

    def _drop(self, req_id: str) -> None:
        self.rope.pop(req_id, None)
        feats = self.features.pop(req_id, None)
        for k in range(len(feats or ())):
            self.embeddings.pop((req_id, k), None)

    def plan(self, step: StepInputs) -> list[ImageSlice]:
        """The image rows this step computes (empty for most steps); for an M-RoPE model, also this step's
        positions (step.positions shifted in place, or positions_3d)."""
        slices = self._image_slices(step) if self.features else []
        self.positions_3d = None
        if self.rope:
            self._set_rope_positions(step, bool(slices))
        return slices

    def _set_rope_positions(self, step: StepInputs, with_images: bool) -> None:
        pos = step.positions
        full = np.broadcast_to(pos, (3, len(pos))).copy() if with_images else None
        qsl = step.query_start_loc
        for i, req_id in enumerate(step.req_ids):
            entry = self.rope.get(req_id)
            if entry is None:
                continue
            table, delta = entry
            a, b = int(qsl[i]), int(qsl[i + 1])
            idx = pos[a:b]
            rows = np.where(idx < table.shape[1], table[:, np.minimum(idx, table.shape[1] - 1)], idx + delta)
            if full is not None:
                full[:, a:b] = rows
            pos[a:b] = rows[0]  # text tokens: three equal rows
        self.positions_3d = full

    def rope_positions(self, positions: torch.Tensor) -> torch.Tensor:
        """The positions the model reads this step: [3, T] when it holds M-RoPE image tokens, else as given."""
        if self.positions_3d is None:
            return positions
        return torch.from_numpy(self.positions_3d).to(positions.device)

    def _image_slices(self, step: StepInputs) -> list[ImageSlice]:
        slices = []
        for i, req_id in enumerate(step.req_ids):
            feats = self.features.get(req_id)
            if not feats:
                continue
            start = int(step.starts[i])
            end = start + int(step.q_lens[i])
            base = int(step.query_start_loc[i])
            for k, f in enumerate(feats):
                lo, hi = max(start, f.offset), min(end, f.end)
                if lo < hi:
                    slices.append(ImageSlice((req_id, k), f, base + lo - start, lo - f.offset, hi - lo,
                                             end >= f.end))
        return slices

    def inputs_embeds(self, slices: list[ImageSlice], input_ids: torch.Tensor) -> torch.Tensor:
        """The step's token embeddings with the planned image rows in place."""
        missing = {s.key: s.feature for s in slices if s.key not in self.embeddings}
        if missing:  # the images first reached this step, through the vision tower in one call
            feats = list(missing.values())
            tensors = [f.torch_tensors() for f in feats]
            device = input_ids.device
            rows = self.model.get_image_embeddings(**{name: torch.cat([t[name] for t in tensors]).to(device)
                                                      for name in tensors[0]})
            for key, emb in zip(missing, rows.split([f.length for f in feats])):
                self.embeddings[key] = emb
            self.num_images_encoded += len(missing)
        ordered = sorted(slices, key=lambda s: s.dst)  # the step's image tokens, in order
        image_rows = torch.cat([self.embeddings[s.key][s.src : s.src + s.n] for s in ordered])
        embeds = self.model.embed_input_ids(input_ids, image_rows)
        for s in slices:
            if s.done:
                self.embeddings.pop(s.key, None)
                req_id, k = s.key
                if k == len(self.features.get(req_id, ())) - 1:  # its last image: the pixels are not needed again
                    self.features.pop(req_id, None)
        return embeds


def make_embedder(model: Any) -> Optional[MultiModalEmbedder]:
    """An embedder for a model that encodes images (multimodal/families.py says what it provides), else None."""
    return MultiModalEmbedder(model) if hasattr(model, "get_image_embeddings") else None
