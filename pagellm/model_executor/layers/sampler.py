"""Sampler: one step's logits [N, V] -> one new token per request, batched, on any device.

Row i of the logits belongs to request i. The order of the work, per step:

1. logprobs (when any request asks): log_softmax of the model's raw logits in float32, before anything below
   changes them; the top-k of each row now, the sampled token's logprob and rank after sampling.
2. logit_bias, then the min_tokens mask (stop tokens -> -inf while a request is shorter than min_tokens),
   then repetition, frequency and presence penalties.
3. Greedy rows take the argmax. Random rows: temperature, min_p, top_k, top_p (over the top candidates found
   with topk, falling back to one full sort only when they hold too little mass; at least one token kept), softmax, then inverse-CDF sampling: one uniform u per row, and the first token whose cumulative
   probability exceeds u * total. One random number per row (not one per vocabulary entry, as the
   exponential-race or Gumbel tricks need) keeps the draw cheap on CPUs, where generating V random numbers
   per row cost more than the rest of sampling. A row with its own torch.Generator (a seeded request) draws
   its u with that generator only, so a seed gives the same tokens whatever else shares the batch.
   On CUDA, when no random row has min_p, top_k or top_p, one Triton kernel (triton_sampling) makes the same
   draw for the same u straight from the logits, in place of the upcast, softmax, cumsum and searchsorted; and
   greedy rows take their argmax from two Triton kernels reading the logits as they are.

Everything per token is a tensor op; the only Python loops are per request while building the metadata and
over the seeded rows' generators. `SamplingMetadata` carries flags (all_greedy, no_penalties, no_top_k, ...)
so the common cases skip the work they do not need.
"""

from __future__ import annotations

import functools
import types
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from pagellm.core.sched_output import TokenLogprobs
from pagellm.sampling_params import SamplingParams

Device = Union[str, torch.device]

def make_generator(seed: int, device: Device) -> torch.Generator:
    """The random stream of one seeded request; the model runner keeps it across the request's steps."""
    gen = torch.Generator(device=torch.device(device))
    gen.manual_seed(int(seed) % 2**64)  # negative seeds (allowed by SamplingParams) wrap like torch does
    return gen


def _pad_token_lists(lists: Sequence[Sequence[int]], pad: int, device: Device) -> torch.Tensor:
    """[N, max_len] int64, rows padded with `pad` (an id one past the vocabulary: scattered into a spare column)."""
    width = max(1, max((len(x) for x in lists), default=0))
    arr = np.full((len(lists), width), pad, dtype=np.int64)
    for i, ids in enumerate(lists):
        if len(ids):
            arr[i, : len(ids)] = ids
    np.clip(arr, 0, pad, out=arr)  # an out-of-range id must not index past the spare column
    return torch.from_numpy(arr).to(device)


def to_device(values: Union[list, torch.Tensor], dtype: torch.dtype, device: Device) -> torch.Tensor:
    """A small host list (or CPU tensor) on the device without waiting for the GPU. A blocking copy would first
    drain the stream (ending the overlap of the next step's host work with this step's forward pass); a pinned
    staging tensor (from torch's caching host allocator, which keeps it until the copy is done) copies
    asynchronously."""
    host = values.to(dtype) if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    if torch.device(device).type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def apply_grammar_bitmask(logits: torch.Tensor, bitmasks: Sequence[Optional[np.ndarray]]) -> None:
    """Structured output: in place, logits[i, t] = -inf where bit t of bitmasks[i] is 0 (rows with None are
    left alone). A bitmask row is int32 words, bit t % 32 of word t // 32 standing for token t; logits columns
    past the bitmask's width (a model vocabulary padded beyond the tokenizer's) are masked too."""
    rows = [i for i, b in enumerate(bitmasks) if b is not None]
    if not rows:
        return
    words = torch.from_numpy(np.stack([np.asarray(bitmasks[i], dtype=np.int32) for i in rows])).to(logits.device)
    shifts = torch.arange(32, dtype=torch.int32, device=logits.device)
    allowed = ((words.unsqueeze(-1) >> shifts) & 1).reshape(len(rows), -1).bool()
    vocab = logits.shape[-1]
    if allowed.shape[1] >= vocab:
        allowed = allowed[:, :vocab]
    else:
        allowed = torch.nn.functional.pad(allowed, (0, vocab - allowed.shape[1]), value=False)
    if len(rows) == logits.shape[0]:
        logits.masked_fill_(~allowed, float("-inf"))
    else:
        index = torch.tensor(rows, device=logits.device)
        logits[index] = logits[index].masked_fill(~allowed, float("-inf"))


@dataclass
class SamplingRows:
    """The sampling parameters of N rows as numpy columns, and the few per-row extras only some rows have.

    The model runner keeps one of these for all its request rows (set when a request arrives) and takes the
    rows of each step from it; tests build one from SamplingParams. Greedy rows keep their neutral values.
    """

    greedy: np.ndarray  # bool
    # float32 [6, N]: temperature, top_p, min_p, repetition, frequency and presence penalties
    floats: np.ndarray
    top_k: np.ndarray  # int64; 0 = no top-k
    num_logprobs: np.ndarray  # int64; -1 = no logprobs
    # Rare extras, by row: logit_bias; (min_tokens, stop ids) of rows with min_tokens.
    logit_bias: dict[int, dict[int, float]] = field(default_factory=dict)
    min_tokens: dict[int, tuple[int, list[int]]] = field(default_factory=dict)

    TEMPERATURE, TOP_P, MIN_P, REPETITION, FREQUENCY, PRESENCE = range(6)
    _NEUTRAL = (1.0, 1.0, 0.0, 1.0, 0.0, 0.0)

    @classmethod
    def empty(cls, n: int) -> "SamplingRows":
        return cls(greedy=np.ones(n, dtype=bool), floats=np.tile(np.array(cls._NEUTRAL, np.float32)[:, None], (1, n)),
                   top_k=np.zeros(n, dtype=np.int64), num_logprobs=np.full(n, -1, dtype=np.int64))

    @classmethod
    def from_params(cls, params: Sequence[SamplingParams]) -> "SamplingRows":
        rows = cls.empty(len(params))
        for i, p in enumerate(params):
            rows.set_row(i, p)
        return rows

    def set_row(self, row: int, p: SamplingParams) -> None:
        greedy = p.greedy
        self.greedy[row] = greedy
        self.floats[:, row] = (1.0 if greedy else p.temperature, 1.0 if greedy else p.top_p,
                               0.0 if greedy else p.min_p, p.repetition_penalty, p.frequency_penalty,
                               p.presence_penalty)
        self.top_k[row] = 0 if greedy else p.top_k
        self.num_logprobs[row] = -1 if p.logprobs is None else p.logprobs
        self.logit_bias.pop(row, None)
        self.min_tokens.pop(row, None)
        if p.logit_bias:
            self.logit_bias[row] = dict(p.logit_bias)
        if p.min_tokens:
            self.min_tokens[row] = (p.min_tokens, sorted(p.all_stop_token_ids))

    def clear_row(self, row: int) -> None:
        self.logit_bias.pop(row, None)
        self.min_tokens.pop(row, None)

    def take(self, rows: np.ndarray) -> "SamplingRows":
        """These rows, in this order, as a new SamplingRows (extras renumbered)."""
        taken = SamplingRows(greedy=self.greedy[rows], floats=self.floats[:, rows], top_k=self.top_k[rows],
                             num_logprobs=self.num_logprobs[rows])
        if self.logit_bias or self.min_tokens:
            for i, row in enumerate(rows.tolist()):
                if row in self.logit_bias:
                    taken.logit_bias[i] = self.logit_bias[row]
                if row in self.min_tokens:
                    taken.min_tokens[i] = self.min_tokens[row]
        return taken

    def uses_penalties(self) -> np.ndarray:
        """bool [N]: rows whose sampling reads their prompt or output tokens."""
        f = self.floats
        return (f[self.REPETITION] != 1.0) | (f[self.FREQUENCY] != 0.0) | (f[self.PRESENCE] != 0.0)


def _column(values: np.ndarray, device: Device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return to_device(torch.from_numpy(np.ascontiguousarray(values)), dtype, device)


@dataclass
class SamplingMetadata:
    """Per-step sampling inputs as tensors; row i is request i. Build it with `SamplingMetadata.build` (from
    SamplingParams) or `from_rows` (from the runner's rows)."""

    num_rows: int
    vocab_size: int
    all_greedy: bool
    all_random: bool
    # [N] bool, True on greedy rows; only when the batch mixes greedy and random rows.
    greedy_mask: Optional[torch.Tensor] = None
    # [N] float32 (1.0 on greedy rows); None when all rows are greedy or every temperature is 1.
    temperature: Optional[torch.Tensor] = None
    # [N] int64 in [1, V] (V: no cut); None when no random row uses top-k. max_top_k: its largest cut < V.
    top_k: Optional[torch.Tensor] = None
    max_top_k: int = 0
    # [N] float32 in (0, 1]; None when no random row uses top-p.
    top_p: Optional[torch.Tensor] = None
    # [N] float32 in [0, 1]; None when no random row uses min-p.
    min_p: Optional[torch.Tensor] = None
    # Penalties: [N] float32 each (neutral values on rows without them); None when no row uses that penalty.
    repetition_penalties: Optional[torch.Tensor] = None
    frequency_penalties: Optional[torch.Tensor] = None
    presence_penalties: Optional[torch.Tensor] = None
    # [N, Lp] / [N, Lo] int64 padded with vocab_size; only when some penalty needs them.
    prompt_token_ids: Optional[torch.Tensor] = None
    output_token_ids: Optional[torch.Tensor] = None
    # logit_bias as (rows, token ids, values); None when no row has one.
    logit_bias: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None
    # (rows, token ids) whose logits are -inf this step (stop tokens of rows below min_tokens).
    min_tokens_mask: Optional[tuple[torch.Tensor, torch.Tensor]] = None
    # How many top logprobs each row wants (None: no logprobs), and the largest of them.
    num_logprobs: list[Optional[int]] = field(default_factory=list)
    max_num_logprobs: Optional[int] = None
    # row -> generator, random rows of seeded requests only (greedy rows draw nothing).
    generators: dict[int, torch.Generator] = field(default_factory=dict)
    # True when some random row has no generator and draws from the shared (global) stream.
    needs_shared_draw: bool = False

    @property
    def no_penalties(self) -> bool:
        return self.repetition_penalties is None and self.frequency_penalties is None and self.presence_penalties is None

    @property
    def no_top_k(self) -> bool:
        return self.top_k is None

    @property
    def no_top_p(self) -> bool:
        return self.top_p is None

    @property
    def no_min_p(self) -> bool:
        return self.min_p is None

    @classmethod
    def build(
        cls,
        params: Sequence[SamplingParams],
        prompt_token_ids: Sequence[Sequence[int]],
        output_token_ids: Sequence[Sequence[int]],
        generators: dict[int, torch.Generator],
        vocab_size: int,
        device: Device,
    ) -> "SamplingMetadata":
        n = len(params)
        if len(prompt_token_ids) != n or len(output_token_ids) != n:
            raise ValueError("params, prompt_token_ids and output_token_ids must have one entry per row")
        return cls.from_rows(SamplingRows.from_params(params), prompt_token_ids, output_token_ids, generators,
                             vocab_size, device)

    @classmethod
    def from_rows(
        cls,
        rows: SamplingRows,
        prompt_token_ids: Sequence[Sequence[int]],
        output_token_ids: Sequence[Sequence[int]],
        generators: dict[int, torch.Generator],
        vocab_size: int,
        device: Device,
    ) -> "SamplingMetadata":
        """prompt_token_ids / output_token_ids: per row; only rows with penalties (and min_tokens, for the
        output length) are read, the others may be empty."""
        n = len(rows.greedy)
        V = vocab_size
        greedy = rows.greedy
        all_greedy = bool(greedy.all())
        all_random = not bool(greedy.any())
        md = cls(num_rows=n, vocab_size=V, all_greedy=all_greedy, all_random=all_random)
        f = rows.floats
        random_rows = ~greedy

        if not all_greedy:
            if not all_random:
                md.greedy_mask = _column(greedy, device, torch.bool)
            if (f[rows.TEMPERATURE] != 1.0).any():
                md.temperature = _column(f[rows.TEMPERATURE], device)
            ks = np.where(random_rows & (rows.top_k > 0) & (rows.top_k < V), rows.top_k, V)
            if (ks < V).any():
                md.top_k = _column(ks, device, torch.int64)
                md.max_top_k = int(ks[ks < V].max())
            if (f[rows.TOP_P] < 1.0).any():
                md.top_p = _column(f[rows.TOP_P], device)
            if (f[rows.MIN_P] > 0.0).any():
                md.min_p = _column(f[rows.MIN_P], device)
            md.generators = {row: gen for row, gen in generators.items() if 0 <= row < n and not greedy[row]}
            md.needs_shared_draw = any(row not in md.generators for row in np.flatnonzero(random_rows).tolist())

        has_rep = bool((f[rows.REPETITION] != 1.0).any())
        has_freq = bool((f[rows.FREQUENCY] != 0.0).any())
        has_pres = bool((f[rows.PRESENCE] != 0.0).any())
        if has_rep:
            md.repetition_penalties = _column(f[rows.REPETITION], device)
            md.prompt_token_ids = _pad_token_lists(
                [ids if r != 1.0 else () for ids, r in zip(prompt_token_ids, f[rows.REPETITION].tolist())], V, device)
        if has_freq:
            md.frequency_penalties = _column(f[rows.FREQUENCY], device)
        if has_pres:
            md.presence_penalties = _column(f[rows.PRESENCE], device)
        if has_rep or has_freq or has_pres:
            needs_output = rows.uses_penalties().tolist()
            md.output_token_ids = _pad_token_lists(
                [ids if need else () for ids, need in zip(output_token_ids, needs_output)], V, device)

        if rows.logit_bias:
            bias_rows, bias_toks, bias_vals = [], [], []
            for row, bias in rows.logit_bias.items():
                for tok, val in bias.items():
                    if 0 <= tok < V:  # the processor rejects ids outside the model's vocabulary
                        bias_rows.append(row)
                        bias_toks.append(tok)
                        bias_vals.append(float(val))
            if bias_rows:
                md.logit_bias = (to_device(bias_rows, torch.int64, device), to_device(bias_toks, torch.int64, device),
                                 to_device(bias_vals, torch.float32, device))
        if rows.min_tokens:
            stop_rows, stop_toks = [], []
            for row, (min_tokens, stop_ids) in rows.min_tokens.items():
                if len(output_token_ids[row]) < min_tokens:
                    for tok in stop_ids:
                        if 0 <= tok < V:
                            stop_rows.append(row)
                            stop_toks.append(tok)
            if stop_rows:
                md.min_tokens_mask = (to_device(stop_rows, torch.int64, device),
                                      to_device(stop_toks, torch.int64, device))

        wanted = rows.num_logprobs
        md.num_logprobs = [None if k < 0 else k for k in wanted.tolist()]
        md.max_num_logprobs = int(wanted.max()) if n and (wanted >= 0).any() else None
        return md


@dataclass
class LogprobsTensors:
    """Column 0: the sampled (or prompt) token; columns 1..k: the top-k, best first. All [N, k + 1]."""

    token_ids: torch.Tensor  # int64
    logprobs: torch.Tensor  # float32
    ranks: torch.Tensor  # int64, 1 = most likely

    def tolists(self) -> tuple[list[list[int]], list[list[float]], list[list[int]]]:
        return self.token_ids.tolist(), self.logprobs.tolist(), self.ranks.tolist()


@dataclass
class SamplerOutput:
    sampled_token_ids: torch.Tensor  # [N] int64
    logprobs: Optional[LogprobsTensors] = None
    _lists: Optional[tuple] = field(default=None, repr=False)  # host copy of `logprobs`, made once

    def logprobs_lists(self) -> tuple[list[list[int]], list[list[float]], list[list[int]]]:
        if self.logprobs is None:
            raise ValueError("logprobs: no row of this step asked for logprobs")
        if self._lists is None:
            self._lists = self.logprobs.tolists()  # one device->host copy for the whole batch
        return self._lists


def to_token_logprobs(output: SamplerOutput, row: int, num_logprobs: Optional[int] = None) -> TokenLogprobs:
    """Row `row` as Python lists: the sampled token first, then its top `num_logprobs` (default: all computed)."""
    ids, lps, ranks = output.logprobs_lists()
    width = len(ids[row]) if num_logprobs is None else min(len(ids[row]), 1 + num_logprobs)
    return TokenLogprobs(token_ids=ids[row][:width], logprobs=lps[row][:width], ranks=ranks[row][:width])


def _gather_logprobs(logprobs: torch.Tensor, token_ids: torch.Tensor, k: int) -> LogprobsTensors:
    """logprobs [N, V] (already log-softmaxed), token_ids [N] -> the token's logprob and rank plus the top-k."""
    chosen = logprobs.gather(1, token_ids.unsqueeze(1))  # [N, 1]
    # rank = 1 + the number of tokens strictly more likely
    chosen_rank = (logprobs > chosen).sum(dim=1, keepdim=True) + 1
    ids, lps, ranks = token_ids.unsqueeze(1), chosen, chosen_rank
    if k > 0:
        top_lps, top_ids = logprobs.topk(k, dim=1)
        top_ranks = torch.arange(1, k + 1, device=logprobs.device).expand(logprobs.shape[0], k)
        ids = torch.cat([ids, top_ids], dim=1)
        lps = torch.cat([lps, top_lps], dim=1)
        ranks = torch.cat([ranks, top_ranks], dim=1)
    return LogprobsTensors(token_ids=ids, logprobs=lps, ranks=ranks)


def apply_penalties(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
    """Repetition (tokens seen in prompt or output), frequency and presence (output counts) penalties."""
    n, V = logits.shape
    counts = torch.zeros(n, V + 1, dtype=logits.dtype, device=logits.device)
    assert md.output_token_ids is not None
    out_ids = md.output_token_ids.clamp(max=V)
    counts.scatter_add_(1, out_ids, torch.ones_like(out_ids, dtype=logits.dtype))
    counts = counts[:, :V]
    in_output = counts > 0
    if md.repetition_penalties is not None:
        assert md.prompt_token_ids is not None
        seen = torch.zeros(n, V + 1, dtype=torch.bool, device=logits.device)
        seen.scatter_(1, md.prompt_token_ids.clamp(max=V), True)
        seen = seen[:, :V] | in_output
        rep = md.repetition_penalties.unsqueeze(1)
        penalized = torch.where(logits > 0, logits / rep, logits * rep)
        logits = torch.where(seen, penalized, logits)
    if md.frequency_penalties is not None:
        logits = logits - md.frequency_penalties.unsqueeze(1) * counts
    if md.presence_penalties is not None:
        logits = logits - md.presence_penalties.unsqueeze(1) * in_output.to(logits.dtype)
    return logits


# top-p looks at this many best tokens per row first; a full sort happens only when they hold less mass than p.
TOP_P_CANDIDATES = 1024


def apply_top_k_top_p(logits: torch.Tensor, top_k: Optional[torch.Tensor], top_p: Optional[torch.Tensor],
                      max_top_k: Optional[int] = None) -> torch.Tensor:
    """Keep each row's k best tokens, then the smallest set of them whose probability reaches p (at least one).
    Rows with k = V and p = 1 are left exactly as they are. Changes `logits` in place and returns it.

    A full sort of the vocabulary is slow (450 ms for 64 x 49152 on a 2-core CPU; milliseconds on a GPU), and
    only the best tokens matter: topk finds max(k, TOP_P_CANDIDATES) candidates per row, and both cuts are made
    among them. That is exact for top-k, and for top-p whenever the candidates hold at least p of their row's
    probability (every token past them then has mass >= p before it and is dropped); otherwise one full sort.
    """
    if top_k is None and top_p is None:
        return logits
    V = logits.shape[1]
    if max_top_k is None:
        max_top_k = int(top_k[top_k < V].max()) if top_k is not None and bool((top_k < V).any()) else 0
    num_cand = min(V, max(max_top_k, TOP_P_CANDIDATES if top_p is not None else 1))
    vals, idx = logits.topk(num_cand, dim=1)  # best first
    positions = torch.arange(num_cand, device=logits.device).unsqueeze(0)
    drop = None
    restricted = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
    if top_k is not None:
        k_rows = top_k < V
        drop = positions >= top_k.unsqueeze(1)
        vals = vals.masked_fill(drop, float("-inf"))
        restricted |= k_rows
    if top_p is not None:
        p_rows = top_p < 1.0
        restricted |= p_rows
        # top-p reads the distribution after the top-k cut: over the candidates when a row has a k, else over
        # its whole row.
        norm = vals.logsumexp(dim=1, keepdim=True)
        if top_k is None or not bool(k_rows.all()):
            full = logits.logsumexp(dim=1, keepdim=True)
            norm = full if top_k is None else torch.where(k_rows.unsqueeze(1), norm, full)
            covered = (vals.logsumexp(dim=1, keepdim=True) - norm).exp().squeeze(1) >= top_p
            if top_k is not None:
                covered |= k_rows
            if not bool((covered | ~p_rows).all()):
                return _apply_top_k_top_p_sorted(logits, top_k, top_p)
        probs = (vals - norm).exp()
        mass_before = probs.cumsum(dim=1) - probs  # exactly 0 for the best token: it is always kept
        drop_p = (mass_before >= top_p.unsqueeze(1)) & p_rows.unsqueeze(1)
        drop = drop_p if drop is None else drop | drop_p
    keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, idx, ~drop)
    return logits.masked_fill_(~keep & restricted.unsqueeze(1), float("-inf"))


def _apply_top_k_top_p_sorted(logits: torch.Tensor, top_k: Optional[torch.Tensor],
                              top_p: Optional[torch.Tensor]) -> torch.Tensor:
    """apply_top_k_top_p by one full sort of each row (the fallback when the candidates are not enough)."""
    V = logits.shape[1]
    sorted_logits, order = logits.sort(dim=1, descending=True, stable=True)
    drop = None
    if top_k is not None:
        positions = torch.arange(V, device=logits.device).unsqueeze(0)
        drop = positions >= top_k.unsqueeze(1)
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    if top_p is not None:
        probs = sorted_logits.softmax(dim=1)
        mass_before = probs.cumsum(dim=1) - probs  # exactly 0 for the best token: it is always kept
        drop_p = (mass_before >= top_p.unsqueeze(1)) & (top_p < 1.0).unsqueeze(1)
        drop = drop_p if drop is None else drop | drop_p
    mask = torch.empty_like(drop).scatter_(1, order, drop)
    return logits.masked_fill_(mask, float("-inf"))


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens with prob < min_p * max prob, i.e. logit < max logit + log(min_p). In place."""
    threshold = logits.amax(dim=1, keepdim=True) + torch.log(min_p).unsqueeze(1)  # log(0) = -inf: keeps all
    return logits.masked_fill_(logits < threshold, float("-inf"))


def draw_uniforms(md: SamplingMetadata, device: torch.device) -> torch.Tensor:
    """[N, 1] uniforms in [0, 1): seeded rows from their own generator, the rest from the shared stream."""
    u = torch.empty((md.num_rows, 1), dtype=torch.float64, device=device)
    if md.needs_shared_draw:
        u.uniform_()
    for row, gen in md.generators.items():
        u[row].uniform_(generator=gen)
    return u


def inverse_cdf_sample(probs: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
    """A draw from each row of probs [N, V]: the first token whose cumulative probability exceeds u * total.

    A token of probability 0 spans an empty interval and is never drawn; the cumulative sum is float64 on the
    CPU (cheap there) so the intervals of a large vocabulary keep their widths.
    """
    cdf = probs.to(torch.float64).cumsum(dim=1) if probs.device.type == "cpu" else probs.cumsum(dim=1)
    u = draw_uniforms(md, probs.device).to(cdf.dtype) * cdf[:, -1:]
    idx = torch.searchsorted(cdf, u, right=True).clamp_(max=probs.shape[1] - 1)
    # Rounding can land u * total on the very end of the last interval; never return a zero-probability token.
    ok = probs.gather(1, idx) > 0
    if probs.device.type == "cpu" and bool(ok.all()):  # the usual case; the check is free on the CPU
        return idx.squeeze(1)
    return torch.where(ok, idx, probs.argmax(dim=1, keepdim=True)).squeeze(1)


class Sampler(nn.Module):
    def forward(self, logits: torch.Tensor, md: SamplingMetadata) -> SamplerOutput:
        if logits.dim() != 2 or logits.shape[0] != md.num_rows:
            raise ValueError(f"logits must be [{md.num_rows}, V], got {tuple(logits.shape)}")
        raw_logprobs = None
        if md.max_num_logprobs is not None:
            raw_logprobs = torch.log_softmax(logits.to(torch.float32), dim=1)

        edits = md.logit_bias is not None or md.min_tokens_mask is not None or not md.no_penalties
        # The fused kernel only reads the logits, in their own dtype: without edits they need no float32 copy.
        kernel = None if md.all_greedy else fused_sampler(logits, md)
        argmax = fused_argmax(logits)
        if edits or (not md.all_greedy and kernel is None):
            logits = logits.to(torch.float32, copy=True)  # never change the caller's tensor
            logits = self.process_logits(logits, md)
        elif kernel is None and argmax is None:
            logits = logits.to(torch.float32)
        if argmax is None:
            argmax = functools.partial(torch.argmax, dim=1)

        if md.all_greedy:
            sampled = argmax(logits)
        else:
            greedy_tokens = None if md.all_random else argmax(logits)
            if kernel is not None:
                sampled = kernel(logits, md.temperature, draw_uniforms(md, logits.device))
            else:
                sampled = self.sample_random(logits, md)
            if greedy_tokens is not None:
                sampled = torch.where(md.greedy_mask, greedy_tokens, sampled)

        out_logprobs = None
        if raw_logprobs is not None:
            out_logprobs = _gather_logprobs(raw_logprobs, sampled, md.max_num_logprobs)
        return SamplerOutput(sampled_token_ids=sampled, logprobs=out_logprobs)

    @staticmethod
    def process_logits(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
        """logit_bias, min_tokens mask and penalties: what both greedy and random rows see."""
        if md.logit_bias is not None:
            rows, toks, vals = md.logit_bias
            logits.index_put_((rows, toks), vals, accumulate=True)
        if md.min_tokens_mask is not None:
            rows, toks = md.min_tokens_mask
            logits.index_put_((rows, toks), torch.tensor(float("-inf"), device=logits.device))
        if not md.no_penalties:
            logits = apply_penalties(logits, md)
        return logits

    @staticmethod
    def sample_random(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
        """Temperature, min_p, top_k/top_p, softmax, inverse-CDF draw. Changes `logits` in place. (On CUDA,
        temperature-only rows take `fused_sampler` instead: forward decides which, once per step.)"""
        return inverse_cdf_sample(random_probs(logits, md), md)


@functools.lru_cache(maxsize=1)
def _triton_sampling() -> Optional[types.ModuleType]:
    """The Triton kernels' module (triton_sampling), or None where triton is missing (imported on first use: CUDA
    only)."""
    try:
        from pagellm.model_executor.layers import triton_sampling
    except ImportError:
        return None
    return triton_sampling


def fused_argmax(logits: torch.Tensor) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
    """The greedy rows' argmax in two Triton kernels (triton_sampling.argmax_rows) for CUDA logits, read in
    their own dtype: the index torch.argmax(dim=1) gives, without the float32 copy and torch's one-block-per-row
    reduction (31 us per token at batch 1 on an H200, vocabulary 128256). None: torch's."""
    kernels = _triton_sampling() if logits.is_cuda else None
    return kernels.argmax_rows if kernels is not None else None


def fused_sampler(logits: torch.Tensor, md: SamplingMetadata) -> Optional[Callable[..., torch.Tensor]]:
    """The one-kernel draw (triton_sampling) where it applies: CUDA logits whose random rows have at most a
    temperature (no min_p, top_k or top_p). It replaces the upcast, softmax, cumsum and searchsorted kernels and
    draws the same token for the same uniform, up to float32 rounding. None: take the torch path."""
    if not logits.is_cuda or not (md.no_top_k and md.no_top_p and md.no_min_p):
        return None
    kernels = _triton_sampling()
    return kernels.sample_from_logits if kernels is not None else None


def random_probs(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
    """What random rows draw from: temperature, min_p, top_k/top_p, softmax. Changes `logits` in place."""
    if md.temperature is not None:
        logits = logits.div_(md.temperature.unsqueeze(1))
    if md.min_p is not None:
        logits = apply_min_p(logits, md.min_p)
    logits = apply_top_k_top_p(logits, md.top_k, md.top_p, md.max_top_k)
    return logits.softmax(dim=1)


def target_probs(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
    """Speculative decoding: the distributions plain sampling draws from, [N, V] float32, for the rejection
    sampler; on greedy rows a one-hot of the argmax (exactly plain greedy's choice). Rows with logit_bias,
    min_tokens or penalties are never verified: none of those apply."""
    logits = logits.to(torch.float32)
    greedy_tokens = None if md.all_random else logits.argmax(dim=1)
    probs = torch.zeros_like(logits) if md.all_greedy else random_probs(logits.clone(), md)
    if greedy_tokens is not None:
        one_hot = torch.zeros_like(probs).scatter_(1, greedy_tokens.unsqueeze(1), 1.0)
        probs = one_hot if md.all_greedy else torch.where(md.greedy_mask.unsqueeze(1), one_hot, probs)
    return probs
