"""Rejection sampler: which of a request's k draft tokens the target model keeps, and the one token after them.

Per request the target model scored the draft tokens d_0..d_{k-1} in one pass and gave k + 1 distributions
p_0..p_k, already after temperature, top-k, top-p and min-p (what plain sampling would draw from). The draft
proposed d_i from q_i, or without probabilities (n-gram), which counts as the point mass q_i = one-hot(d_i).

Random requests follow Leviathan et al. 2023 / Chen et al. 2023: accept d_i with probability
min(1, p_i(d_i) / q_i(d_i)); at the first rejection draw from the residual max(0, p_i - q_i), normalized (from
p_i if it is all zero, which only rounding can make happen) and stop; if all k are accepted, draw a bonus token
from p_k. Each emitted token then follows the target's distribution exactly, and a request gains 1..k+1 tokens.
Greedy requests (temperature 0) accept while d_i is the argmax of p_i and then emit that argmax: exactly the
tokens of plain greedy decoding.

Random numbers, in float64 as in the sampler: per random request one uniform per draft token and one for the
final inverse-CDF draw (k + 1 in all). A seeded request draws its k + 1 from its own generator, so a seed gives
the same tokens whatever else shares the batch; the other random requests share one draw from the global
stream; greedy requests draw nothing.

Everything per token is a tensor op over the whole batch ([R, K] or [R, V]); the only Python loop is over the
seeded requests' generators. num_draft and greedy are read on the host (the scheduler knows them there).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Sequence, Union

import torch

from pagellm.model_executor.layers.sampler import to_device

PLACEHOLDER_TOKEN_ID = -1  # fills the output past each request's tokens


@dataclass
class RejectionSamplerOutput:
    token_ids: torch.Tensor  # [R, K + 1] int64: the accepted drafts, then one more token, then -1
    num_tokens: torch.Tensor  # [R] int64 in [1, num_draft + 1]; num_tokens - 1 drafts were accepted

    def tolists(self) -> list[list[int]]:
        """Each request's new tokens as a Python list (one device-to-host copy per tensor)."""
        counts = self.num_tokens.tolist()
        return [row[:n] for row, n in zip(self.token_ids.tolist(), counts)]


def rejection_sample(
    draft_token_ids: torch.Tensor,
    num_draft: Union[torch.Tensor, Sequence[int]],
    target_probs: torch.Tensor,
    draft_probs: Optional[torch.Tensor] = None,
    greedy: Optional[Union[torch.Tensor, Sequence[bool]]] = None,
    generators: Optional[Mapping[int, torch.Generator]] = None,
) -> RejectionSamplerOutput:
    """Verify each request's drafts against the target's distributions.

    draft_token_ids: [R, K] integer, row r valid in its first num_draft[r] columns (the rest is ignored).
    num_draft: [R] counts in [0, K]. target_probs: [R, K + 1, V], row r valid in its first num_draft[r] + 1
    positions. draft_probs: [R, K, V], or None for drafts without probabilities (point masses).
    greedy: [R] bool, True for temperature-0 requests; None means none is greedy. For a greedy row the caller's
    target_probs must have the greedy token as their first argmax (softmax of the logits, or a one-hot).
    generators: row -> generator of the seeded requests, as SamplingMetadata.generators; greedy rows ignore theirs.
    """
    R, K, V = _check_shapes(draft_token_ids, target_probs, draft_probs)
    device = target_probs.device
    counts_host = _host_column(num_draft, torch.int64, "num_draft", R)
    if R and (int(counts_host.min()) < 0 or int(counts_host.max()) > K):
        raise ValueError(f"num_draft must lie in [0, {K}] (K = draft_token_ids.shape[1]), got {counts_host.tolist()}")
    greedy_host = (torch.zeros(R, dtype=torch.bool) if greedy is None
                   else _host_column(greedy, torch.bool, "greedy", R))
    generators = dict(generators or {})
    outside = [row for row in generators if not 0 <= row < R]
    if outside:
        raise ValueError(f"generators: rows {outside} are outside the batch of {R} requests")
    if R == 0:
        empty = torch.empty(0, dtype=torch.int64, device=device)
        return RejectionSamplerOutput(token_ids=empty.view(0, K + 1), num_tokens=empty)

    any_greedy, all_greedy = bool(greedy_host.any()), bool(greedy_host.all())
    num_draft_t = to_device(counts_host, torch.int64, device)
    positions = torch.arange(K, device=device)
    valid = positions < num_draft_t.unsqueeze(1)  # [R, K]
    # Padding may hold -1 or anything else: read token 0 there and never use it.
    drafts = draft_token_ids.to(device=device, dtype=torch.int64).masked_fill(~valid, 0)
    greedy_rows = to_device(greedy_host, torch.bool, device).unsqueeze(1) if any_greedy and not all_greedy else None

    if any_greedy:
        target_argmax = target_probs.argmax(dim=2)  # [R, K + 1]; ties go to the first, as in plain greedy
        accept = drafts == target_argmax[:, :K]
    if not all_greedy:
        u = _draw_uniforms(R, K, counts_host, greedy_host, generators, device)  # [R, K + 1] float64
        p_draft = target_probs[:, :K].gather(2, drafts.unsqueeze(2)).squeeze(2).to(torch.float64)
        if draft_probs is None:  # q(d) = 1: accept with probability p(d)
            random_accept = u[:, :K] < p_draft
        else:  # u < p(d) / q(d), without dividing (q(d) = 0 = p(d) rejects)
            q_draft = draft_probs.gather(2, drafts.unsqueeze(2)).squeeze(2).to(torch.float64)
            random_accept = u[:, :K] * q_draft < p_draft
        accept = random_accept if not any_greedy else torch.where(greedy_rows, accept, random_accept)
    # The accepted drafts are the leading run of accepted valid positions.
    num_accepted = (accept & valid).to(torch.int64).cumprod(dim=1).sum(dim=1)  # [R]

    if not all_greedy:
        u_final = u.gather(1, num_draft_t.unsqueeze(1)).squeeze(1)  # column num_draft: the request's last draw
        final = _draw_final(target_probs, draft_probs, drafts, num_draft_t, num_accepted, u_final)
    if any_greedy:
        greedy_final = target_argmax.gather(1, num_accepted.unsqueeze(1)).squeeze(1)
        final = greedy_final if all_greedy else torch.where(greedy_rows.squeeze(1), greedy_final, final)

    token_ids = torch.full((R, K + 1), PLACEHOLDER_TOKEN_ID, dtype=torch.int64, device=device)
    token_ids[:, :K] = drafts.masked_fill(positions >= num_accepted.unsqueeze(1), PLACEHOLDER_TOKEN_ID)
    token_ids.scatter_(1, num_accepted.unsqueeze(1), final.unsqueeze(1))
    return RejectionSamplerOutput(token_ids=token_ids, num_tokens=num_accepted + 1)


def _check_shapes(draft_token_ids: torch.Tensor, target_probs: torch.Tensor,
                  draft_probs: Optional[torch.Tensor]) -> tuple[int, int, int]:
    if draft_token_ids.dim() != 2:
        raise ValueError(f"draft_token_ids must be [R, K], got shape {tuple(draft_token_ids.shape)}")
    if draft_token_ids.is_floating_point() or draft_token_ids.dtype == torch.bool:
        raise ValueError(f"draft_token_ids must hold integer token ids, got {draft_token_ids.dtype}")
    R, K = draft_token_ids.shape
    if target_probs.dim() != 3 or tuple(target_probs.shape[:2]) != (R, K + 1) or target_probs.shape[2] == 0:
        raise ValueError(f"target_probs must be [R, K + 1, V] = [{R}, {K + 1}, V] with V > 0 (from "
                         f"draft_token_ids [{R}, {K}]), got shape {tuple(target_probs.shape)}")
    if not target_probs.is_floating_point():
        raise ValueError(f"target_probs must be floating point, got {target_probs.dtype}")
    V = target_probs.shape[2]
    if draft_probs is not None:
        if tuple(draft_probs.shape) != (R, K, V):
            raise ValueError(f"draft_probs must be [R, K, V] = [{R}, {K}, {V}], got shape {tuple(draft_probs.shape)}")
        if not draft_probs.is_floating_point():
            raise ValueError(f"draft_probs must be floating point, got {draft_probs.dtype}")
    return R, K, V


def _host_column(values: Union[torch.Tensor, Sequence], dtype: torch.dtype, name: str, R: int) -> torch.Tensor:
    """values as a CPU tensor of shape [R] (a device tensor is copied, which waits for the device)."""
    t = values.detach().cpu() if isinstance(values, torch.Tensor) else torch.as_tensor(values)
    if tuple(t.shape) != (R,):
        raise ValueError(f"{name} must have one entry per request ([{R}]), got shape {tuple(t.shape)}")
    if dtype != torch.bool and t.numel() and t.is_floating_point():
        raise ValueError(f"{name} must hold integers, got {t.dtype}")
    return t.to(dtype)


def _draw_uniforms(R: int, K: int, num_draft: torch.Tensor, greedy: torch.Tensor,
                   generators: dict[int, torch.Generator], device: torch.device) -> torch.Tensor:
    """[R, K + 1] float64 uniforms in [0, 1); a random row reads columns 0..num_draft. Seeded rows draw their
    num_draft + 1 numbers from their own generator; greedy rows keep zeros."""
    u = torch.zeros((R, K + 1), dtype=torch.float64, device=device)
    random_rows = (~greedy).nonzero().squeeze(1).tolist()
    if any(row not in generators for row in random_rows):
        u.uniform_()
    for row in random_rows:
        if row in generators:
            u[row, : int(num_draft[row]) + 1].uniform_(generator=generators[row])
    return u


def _draw_final(target_probs: torch.Tensor, draft_probs: Optional[torch.Tensor], drafts: torch.Tensor,
                num_draft: torch.Tensor, num_accepted: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """[R] tokens: from the residual at the first rejected position, or from p_k after k accepted drafts."""
    R, K = drafts.shape
    rows = torch.arange(R, device=drafts.device)
    probs = target_probs[rows, num_accepted].to(torch.float32)  # [R, V]: p at the first unaccepted position
    if K > 0:
        rejected = num_accepted < num_draft
        pos = num_accepted.clamp(max=K - 1)
        if draft_probs is None:  # max(0, p - one-hot(d)) is p without d
            residual = probs.scatter(1, drafts[rows, pos].unsqueeze(1), 0.0)
        else:
            residual = (probs - draft_probs[rows, pos].to(torch.float32)).clamp_(min=0.0)
        use_residual = rejected & (residual.sum(dim=1) > 0)
        probs = torch.where(use_residual.unsqueeze(1), residual, probs)
    return _inverse_cdf(probs, u)


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Row r's first token whose cumulative probability exceeds u[r] * total, as the sampler draws; a token of
    probability 0 is never returned (rounding at the end of the last interval falls back to the argmax)."""
    cdf = probs.to(torch.float64).cumsum(dim=1) if probs.device.type == "cpu" else probs.cumsum(dim=1)
    x = (u.to(cdf.dtype) * cdf[:, -1]).unsqueeze(1)
    idx = torch.searchsorted(cdf, x, right=True).clamp_(max=probs.shape[1] - 1)
    ok = probs.gather(1, idx) > 0
    return torch.where(ok, idx, probs.argmax(dim=1, keepdim=True)).squeeze(1)
