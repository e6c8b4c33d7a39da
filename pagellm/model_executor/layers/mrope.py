"""Multimodal rotary embedding (M-RoPE, Qwen2-VL): three position rows (temporal, height, width) per token.

The rotary frequencies are split into three sections (`mrope_section`, e.g. [16, 24, 24] for head_dim 128); the
angles of section i come from position row i. A text token has the same position in all three rows, so on text
M-RoPE is plain 1-D RoPE. An image's tokens get (t, h, w) grid coordinates offset by the text before it, and the
text after an image continues from the largest coordinate + 1, so a prompt's positions end below its length:
later tokens sit at `index + delta` (delta <= 0) in all three rows.

Two halves: `MRotaryEmbedding` rotates q/k (same call as RotaryEmbedding; rotary.get_rope builds it for an
ArchConfig with an mrope_section, so a Llama-family decoder takes it without a change), and
`mrope_positions` / `mrope_decode_positions` compute the [3, T] positions of a prompt and of later tokens.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from pagellm.model_executor.layers.rotary import RotaryEmbedding

class MRotaryEmbedding(RotaryEmbedding):
    """forward(positions, q [T, Hq*D], k [T, Hk*D]) -> rotated (q, k), same shapes and dtypes.

    `positions` is [3, T] (temporal, height, width rows) or [T] (text only: all three rows equal, which is
    ordinary RoPE). The cos|sin table is RotaryEmbedding's; only the gather differs: frequency j reads the row of
    the section it falls in.
    """

    def __init__(self, head_dim: int, max_position: int, base: float, mrope_section: Sequence[int],
                 device: Optional[torch.device] = None) -> None:
        section = [int(s) for s in mrope_section]
        if len(section) != 3 or sum(section) != head_dim // 2:
            raise ValueError(f"mrope_section {list(mrope_section)} must have 3 parts summing to head_dim // 2 "
                             f"({head_dim // 2})")
        super().__init__(head_dim, max_position, base, None, device)
        self.mrope_section = section
        # The frequency columns [start, end) that position row i drives.
        bounds = [0, section[0], section[0] + section[1], sum(section)]
        self._spans = list(zip(bounds[:-1], bounds[1:]))

    def merged_cos_sin(self, positions: torch.Tensor) -> torch.Tensor:
        """[3, T] positions -> [T, D] float32 cos|sin rows, each frequency taken from its section's row.
        Only slicing after one gather: no host data moves, so a CUDA graph can capture it."""
        half = self.head_dim // 2
        table = self.cos_sin_cache.index_select(0, positions.reshape(-1)).view(3, -1, self.head_dim)
        cos = [table[i, :, a:b] for i, (a, b) in enumerate(self._spans)]
        sin = [table[i, :, half + a:half + b] for i, (a, b) in enumerate(self._spans)]
        return torch.cat(cos + sin, dim=-1)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if positions.dim() == 1:
            return super().forward(positions, q, k)
        if positions.dim() != 2 or positions.shape[0] != 3:
            raise ValueError(f"M-RoPE positions must be [3, T] or [T], got {tuple(positions.shape)}")
        if self.cos_sin_cache.device != positions.device:
            self.cos_sin_cache = self.cos_sin_cache.to(positions.device)
        cos_sin = self.merged_cos_sin(positions)
        if q.is_cuda and q.stride(-1) == 1 and k.stride(-1) == 1:  # in place: the 1-D kernel over a per-step table
            from pagellm.model_executor.layers import triton_ops

            rows = torch.arange(cos_sin.shape[0], device=positions.device)
            triton_ops.rotary_neox_(rows, q, k, cos_sin, self.head_dim)
            return q, k
        half = self.head_dim // 2
        cos, sin = cos_sin[:, None, :half], cos_sin[:, None, half:]
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", mrope_section={self.mrope_section}"


def _as_list(x: Any) -> list:
    return x.tolist() if isinstance(x, torch.Tensor) else list(x)


def mrope_positions(input_ids: Sequence[int] | torch.Tensor, image_grid_thw: Optional[Sequence] | torch.Tensor,
                    spatial_merge_size: int, image_token_id: int, vision_start_token_id: int,
                    ) -> tuple[torch.Tensor, int]:
    """A prompt's M-RoPE positions [3, T] (int64) and its delta (later token i sits at i + delta).

    Each image is a run of `t * (h/m) * (w/m)` image tokens right after a vision-start token, in the order of
    `image_grid_thw` rows (t, h, w in patches before the merge, as the image processor gives them). Text tokens
    count on from the last position; an image's tokens get (t, h, w) grid coordinates (row-major, as the patch
    merger emits them) plus the position where the image starts; the text after it continues at that start +
    max(h, w) / m. Raises ValueError when the image tokens and the grids disagree.
    """
    ids = _as_list(input_ids)
    grids = [tuple(int(v) for v in g) for g in _as_list(image_grid_thw)] if image_grid_thw is not None else []
    m = int(spatial_merge_size)
    pieces: list[torch.Tensor] = []
    cursor = 0  # index of the first token not yet placed
    next_pos = 0  # the position the next text token gets
    for n, (t, h, w) in enumerate(grids):
        if h % m or w % m:
            raise ValueError(f"image_grid_thw[{n}] = {(t, h, w)}: h and w must be multiples of the merge size {m}")
        start = _next_image_start(ids, cursor, image_token_id, vision_start_token_id)
        if start is None:
            raise ValueError(f"image_grid_thw has {len(grids)} images but the prompt has only {n} "
                             f"(an image is vision-start token {vision_start_token_id} then image tokens)")
        gt, gh, gw = t, h // m, w // m
        count = gt * gh * gw
        if ids[start:start + count] != [image_token_id] * count or \
                (start + count < len(ids) and ids[start + count] == image_token_id):
            raise ValueError(f"image {n} (grid {(t, h, w)}) needs exactly {count} image tokens "
                             f"(id {image_token_id}) after its vision-start token")
        text_len = start - cursor
        pieces.append(torch.arange(next_pos, next_pos + text_len).expand(3, -1))
        next_pos += text_len
        tt, hh, ww = torch.meshgrid(torch.arange(gt), torch.arange(gh), torch.arange(gw), indexing="ij")
        pieces.append(torch.stack([tt, hh, ww]).reshape(3, -1) + next_pos)
        next_pos += max(gh, gw)
        cursor = start + count
    expected = sum(t * (h // m) * (w // m) for t, h, w in grids)
    if ids.count(image_token_id) != expected:
        raise ValueError(f"the prompt has {ids.count(image_token_id)} image tokens (id {image_token_id}) but "
                         f"image_grid_thw accounts for {expected}")
    pieces.append(torch.arange(next_pos, next_pos + len(ids) - cursor).expand(3, -1))
    positions = torch.cat(pieces, dim=1).to(torch.int64)
    delta = (int(positions.max()) + 1 - len(ids)) if ids else 0
    return positions, delta


def _next_image_start(ids: list[int], begin: int, image_token_id: int, vision_start_token_id: int) -> Optional[int]:
    """Index of the first image token that follows a vision-start token at or after `begin`, or None."""
    for i in range(begin, len(ids) - 1):
        if ids[i] == vision_start_token_id and ids[i + 1] == image_token_id:
            return i + 1
    return None


def mrope_decode_positions(delta: int, start: int, end: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """Positions [3, end - start] of the tokens at indices start..end-1 after the prompt: index + delta in all
    three rows (what the runner feeds for decode steps and generated tokens)."""
    return (torch.arange(start, end, dtype=torch.int64, device=device) + delta).expand(3, -1).contiguous()
