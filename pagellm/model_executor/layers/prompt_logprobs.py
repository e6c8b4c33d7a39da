"""Prompt logprobs: for each prompt position, the logprob and rank of the prompt token that follows it, and the
top k, from the raw log-softmax (no sampling parameters apply). Tensor math over blocks of positions, so that a
long prompt's [P, V] float32 temporaries stay bounded; the result crosses to the host once, as columns."""

from __future__ import annotations

from typing import Sequence

import torch

from pagellm.core.sched_output import PromptLogprobs
from pagellm.model_executor.layers.sampler import LogprobsTensors

# Prompt logprobs: the runner computes logits for this many positions at a time (bounding the [P, V] float32
# temporaries), and on a GPU the log-softmax, rank and top-k run over such a chunk at once.
PROMPT_LOGPROBS_CHUNK = 256
# On a CPU they run PROMPT_LOGPROBS_ROWS_CPU rows at a time instead: a block of rows stays in the cache across
# those passes over the vocabulary (on a 2-core CPU with SmolLM2's 49,152 tokens, 256 positions at 20 logprobs
# took 115-135 ms this way against 260-315 ms in whole-chunk passes, with identical results).
PROMPT_LOGPROBS_ROWS_CPU = 32


def prompt_logprobs_tensors(logits: torch.Tensor, next_token_ids: torch.Tensor,
                            num_logprobs: int) -> LogprobsTensors:
    """logits [P, V] at P prompt positions, next_token_ids [P] (the prompt token each position predicts) ->
    per position: that token's logprob and rank, then the top `num_logprobs`, from the raw log_softmax; [P, 1 + k]
    tensors on the logits' device."""
    P, device = logits.shape[0], logits.device
    targets = next_token_ids.to(device=device, dtype=torch.int64)
    k = num_logprobs
    ids = torch.empty(P, 1 + k, dtype=torch.int64, device=device)
    lps = torch.empty(P, 1 + k, dtype=torch.float32, device=device)
    ranks = torch.empty(P, 1 + k, dtype=torch.int64, device=device)
    ids[:, 0] = targets
    ranks[:, 1:] = torch.arange(1, k + 1, device=device)
    rows = PROMPT_LOGPROBS_CHUNK if device.type == "cuda" else PROMPT_LOGPROBS_ROWS_CPU
    for a in range(0, P, rows):
        b = min(P, a + rows)
        lp = torch.log_softmax(logits[a:b].to(torch.float32), dim=-1)
        chosen = lp.gather(1, targets[a:b, None])
        lps[a:b, :1] = chosen
        ranks[a:b, 0] = (lp > chosen).sum(dim=1, dtype=torch.int32) + 1  # 1 + the tokens strictly more likely
        if k:
            top_lps, top_ids = lp.topk(k, dim=1)
            lps[a:b, 1:] = top_lps
            ids[a:b, 1:] = top_ids
    return LogprobsTensors(token_ids=ids, logprobs=lps, ranks=ranks)


def compute_prompt_logprobs(logits: torch.Tensor, next_token_ids: torch.Tensor, num_logprobs: int,
                            first_position: int = 1) -> PromptLogprobs:
    """prompt_logprobs_tensors, copied to the host once, as the columns of the step message."""
    return to_prompt_logprobs([prompt_logprobs_tensors(logits, next_token_ids, num_logprobs)], first_position)


def to_prompt_logprobs(parts: Sequence[LogprobsTensors], first_position: int) -> PromptLogprobs:
    """Consecutive positions' tensors -> one PromptLogprobs (one device-to-host copy per column)."""
    if len(parts) == 1:
        ids, lps, ranks = parts[0].tolists()
    else:
        ids, lps, ranks = (torch.cat([getattr(p, name) for p in parts]).tolist()
                           for name in ("token_ids", "logprobs", "ranks"))
    return PromptLogprobs(first_position=first_position, token_ids=ids, logprobs=lps, ranks=ranks)
