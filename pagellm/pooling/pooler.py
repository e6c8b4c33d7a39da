"""Hidden states of a flat batch [T, H] -> one vector per request: mean, CLS (first token) or last token,
optionally L2-normalized. Pooling is done in float32 whatever the model's dtype."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pool(hidden: torch.Tensor, seq_lens: list[int], mode: str, normalize: bool) -> torch.Tensor:
    """hidden: [sum(seq_lens), H], requests back to back. Returns [len(seq_lens), H] float32."""
    lens = torch.tensor(seq_lens, device=hidden.device)
    ends = torch.cumsum(lens, 0)
    starts = ends - lens
    hidden = hidden.float()
    if mode == "cls":
        out = hidden[starts]
    elif mode == "last":
        out = hidden[ends - 1]
    elif mode == "mean":
        owner = torch.repeat_interleave(torch.arange(len(seq_lens), device=hidden.device), lens)
        out = torch.zeros(len(seq_lens), hidden.shape[1], device=hidden.device).index_add_(0, owner, hidden)
        out = out / lens.unsqueeze(1).to(out.dtype)
    else:
        raise ValueError(f"pooling mode must be mean, cls or last, got {mode!r}")
    return F.normalize(out, p=2, dim=-1) if normalize else out


def shorten(vector: torch.Tensor, dimensions: int | None, normalize: bool) -> torch.Tensor:
    """A Matryoshka embedding cut to its first `dimensions` values (renormalized when the model normalizes)."""
    if dimensions is None or dimensions >= vector.shape[-1]:
        return vector
    vector = vector[..., :dimensions]
    return F.normalize(vector, p=2, dim=-1) if normalize else vector
