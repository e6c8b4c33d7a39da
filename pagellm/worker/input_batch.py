"""InputBatch: the model runner's per-request rows, kept across steps, and the flat inputs of each step.

The scheduler sends a request in full once (sched_output.NewRequestData) and deltas afterwards; the rows here
hold what it sent: the request's tokens, block table, sampling parameters, seeded generator and (for
penalties) the output tokens it was told. A row is taken when a request arrives and given back when it
finishes or is preempted; rows need not be contiguous, since every step gathers its own rows in its own order.

Each step's flat inputs are numpy gathers over these rows (no Python loop over tokens or blocks):
`input_ids[T]`, `positions[T]`, `slot_mapping[T]`, per request `query_start_loc`, `seq_lens` and its block
table. A decode whose input token the message did not carry (scheduled before the previous step's token came
back) reads the row's last sampled token, which lives on the device (`last_token`).

Speculative decoding: a step may verify draft tokens of a request; they are the last `num_spec` of its scheduled
positions, written into its row like any token, and overwritten when the accepted tokens come back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from pagellm.core.sched_output import SchedulerOutput
from pagellm.model_executor.layers.sampler import SamplingRows, make_generator
from pagellm.sampling_params import SamplingParams


@dataclass
class StepInputs:
    """One step's requests (decodes first, by context length) and their flat host inputs."""

    req_ids: list[str]
    rows: np.ndarray  # int64 [B]: each request's row
    starts: np.ndarray  # int64 [B]: num_computed_tokens (position of the request's first token this step)
    q_lens: np.ndarray  # int64 [B]: tokens computed this step
    query_start_loc: np.ndarray  # int64 [B + 1]
    input_ids: np.ndarray  # int64 [T]; positions read from the device are filled there
    positions: np.ndarray  # int64 [T]
    slot_mapping: np.ndarray  # int64 [T]
    block_tables: np.ndarray  # int32 [B, max_blocks of the step]
    from_device: np.ndarray  # int64: indices of requests whose (single) input token is the row's last sample
    sample: np.ndarray  # int64: indices of requests that sample a token this step
    num_spec: np.ndarray  # int64 [B]: draft tokens each request verifies this step (its last positions)

    @property
    def num_reqs(self) -> int:
        return len(self.req_ids)

    @property
    def num_tokens(self) -> int:
        return int(self.query_start_loc[-1])

    @property
    def seq_lens(self) -> np.ndarray:
        return self.starts + self.q_lens

    @property
    def decodes_only(self) -> bool:
        return self.num_tokens == self.num_reqs


class InputBatch:
    def __init__(self, max_reqs: int, max_model_len: int, block_size: int, device: torch.device,
                 keep_sampling_state: bool = True) -> None:
        """`keep_sampling_state`: whether this rank samples (the driver): only it needs generators and outputs."""
        self.max_reqs = max_reqs
        self.max_model_len = max_model_len
        self.block_size = block_size
        self.device = device
        self.keep_sampling_state = keep_sampling_state
        max_blocks = -(-max_model_len // block_size)
        self.row_of: dict[str, int] = {}
        self.req_ids: list[Optional[str]] = [None] * max_reqs
        self._free_rows = list(range(max_reqs - 1, -1, -1))
        self.token_ids = np.zeros((max_reqs, max_model_len), dtype=np.int32)
        # Positions [0, num_host_tokens) of a row hold the tokens the messages carried (positions the runner
        # only ever read from the device may be left unwritten below it: they are in the KV cache already).
        self.num_host_tokens = np.zeros(max_reqs, dtype=np.int64)
        self.num_tokens = np.zeros(max_reqs, dtype=np.int64)  # every token of the request, sampled ones too
        self.num_prompt_tokens = np.zeros(max_reqs, dtype=np.int64)
        self.block_table = np.zeros((max_reqs, max_blocks), dtype=np.int32)
        self.num_blocks = np.zeros(max_reqs, dtype=np.int64)
        self.prompt_logprobs = np.full(max_reqs, -1, dtype=np.int64)  # -1: none
        self.can_speculate = np.zeros(max_reqs, dtype=bool)  # whether drafts may be proposed for the row
        self.sampling = SamplingRows.empty(max_reqs)
        self.output_token_ids: list[list[int]] = [[] for _ in range(max_reqs)]  # host-known outputs (penalties)
        self.generators: dict[int, torch.Generator] = {}
        # Generators of preempted requests, kept until they resume: a seed draws one stream however the request
        # was scheduled.
        self._parked_generators: dict[str, torch.Generator] = {}
        self.last_token = torch.zeros(max_reqs, dtype=torch.int64, device=device)
        # Called with the row of each request added (per-row state kept outside, e.g. the draft-length policy).
        self.on_add: Optional[Callable[[int], None]] = None

    def __len__(self) -> int:
        return len(self.row_of)

    # ---- rows in and out ---------------------------------------------------------------------------------
    def add(self, req_id: str, prompt_token_ids: list[int], output_token_ids: list[int], params: SamplingParams,
            block_ids: list[int]) -> int:
        if req_id in self.row_of:
            raise RuntimeError(f"request {req_id} is already in the batch")
        if not self._free_rows:
            raise RuntimeError(f"the batch is full ({self.max_reqs} requests)")
        row = self._free_rows.pop()
        self.row_of[req_id] = row
        self.req_ids[row] = req_id
        num_prompt, num_out = len(prompt_token_ids), len(output_token_ids)
        n = num_prompt + num_out
        self.token_ids[row, :num_prompt] = prompt_token_ids
        self.token_ids[row, num_prompt:n] = output_token_ids
        self.num_host_tokens[row] = self.num_tokens[row] = n
        self.num_prompt_tokens[row] = num_prompt
        self.block_table[row, : len(block_ids)] = block_ids
        self.num_blocks[row] = len(block_ids)
        self.prompt_logprobs[row] = -1 if params.prompt_logprobs is None else params.prompt_logprobs
        self.can_speculate[row] = can_speculate(params)
        if self.on_add is not None:
            self.on_add(row)
        if self.keep_sampling_state:
            self.sampling.set_row(row, params)
            self.output_token_ids[row] = list(output_token_ids)
            if params.seed is not None and not params.greedy:
                gen = self._parked_generators.pop(req_id, None)
                self.generators[row] = gen if gen is not None else make_generator(params.seed, self.device)
        return row

    def remove(self, req_id: str, preempted: bool = False) -> None:
        """Forget a request (finished, aborted or preempted); unknown ids are ignored."""
        if not preempted:
            self._parked_generators.pop(req_id, None)
        row = self.row_of.pop(req_id, None)
        if row is None:
            return
        self.req_ids[row] = None
        gen = self.generators.pop(row, None)
        if preempted and gen is not None:
            self._parked_generators[req_id] = gen
        self.sampling.clear_row(row)
        self.output_token_ids[row] = []
        self._free_rows.append(row)

    def _write_tokens(self, row: int, end: int, tokens: list[int]) -> None:
        """Tokens of positions [end - len(tokens), end), as a message carried them."""
        start = end - len(tokens)
        self.token_ids[row, start:end] = tokens
        self.num_host_tokens[row] = max(int(self.num_host_tokens[row]), end)
        if self.keep_sampling_state:
            self.output_token_ids[row].extend(tokens[max(0, int(self.num_prompt_tokens[row]) - start):])

    # ---- one step ----------------------------------------------------------------------------------------
    def apply(self, sched: SchedulerOutput) -> StepInputs:
        """Update the rows from a step message, then gather the step's flat inputs."""
        for req_id in sched.finished_req_ids:
            self.remove(req_id)
        for req_id in sched.preempted_req_ids:
            self.remove(req_id, preempted=True)
        entries: list[tuple[int, int, int, str, int]] = []  # (row, start, q_len, req_id, num_spec)
        for r in sched.new_reqs:
            row = self.add(r.req_id, r.prompt_token_ids, r.output_token_ids, r.sampling_params, r.block_ids)
            entries.append((row, r.num_computed_tokens, r.num_scheduled_tokens, r.req_id, 0))
        c = sched.cached
        spec = c.spec_token_ids
        for req_id, new_blocks, start, n, new_tokens in zip(c.req_ids, c.new_block_ids, c.num_computed_tokens,
                                                             c.num_scheduled_tokens, c.new_token_ids):
            row = self.row_of[req_id]
            if new_blocks:
                nb = int(self.num_blocks[row])
                self.block_table[row, nb : nb + len(new_blocks)] = new_blocks
                self.num_blocks[row] = nb + len(new_blocks)
            drafts = spec.get(req_id, ()) if spec else ()
            end = start + n - len(drafts)
            if new_tokens:
                self._write_tokens(row, end, new_tokens)
            if drafts:
                self.token_ids[row, end : start + n] = drafts
            entries.append((row, start, n, req_id, len(drafts)))
        # Decodes first (the attention backend batches them densely), decodes by context length.
        entries.sort(key=lambda e: (e[2] != 1, e[1] if e[2] == 1 else 0))
        return self._gather(entries)

    def _gather(self, entries: list[tuple[int, int, int, str, int]]) -> StepInputs:
        n = len(entries)
        rows = np.fromiter((e[0] for e in entries), dtype=np.int64, count=n)
        starts = np.fromiter((e[1] for e in entries), dtype=np.int64, count=n)
        q_lens = np.fromiter((e[2] for e in entries), dtype=np.int64, count=n)
        num_spec = np.fromiter((e[4] for e in entries), dtype=np.int64, count=n)
        qsl = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(q_lens, out=qsl[1:])
        total = int(qsl[-1])
        bs = self.block_size
        if total == n:  # decodes only: one token per request
            positions = starts.copy()
            token_rows = rows
        else:
            req_of_token = np.repeat(np.arange(n), q_lens)
            positions = starts[req_of_token] + (np.arange(total) - qsl[:-1][req_of_token])
            token_rows = rows[req_of_token]
        input_ids = self.token_ids[token_rows, positions].astype(np.int64)
        slot_mapping = self.block_table[token_rows, positions // bs].astype(np.int64) * bs + positions % bs
        max_cols = int(self.num_blocks[rows].max()) if n else 0
        block_tables = self.block_table[rows, :max_cols]
        seq_lens = starts + q_lens
        from_device = np.flatnonzero(starts >= self.num_host_tokens[rows])
        if from_device.size and (q_lens[from_device] != 1).any():
            raise RuntimeError("a step computes tokens the runner was never given")
        sample = np.flatnonzero(seq_lens >= self.num_tokens[rows])
        # The sampled token of each sampling row is the request's next token (on the device until it is read). A
        # row verifying drafts counts as if none were accepted; the runner adds the accepted ones.
        self.num_tokens[rows[sample]] = seq_lens[sample] - num_spec[sample] + 1
        return StepInputs([e[3] for e in entries], rows, starts, q_lens, qsl, input_ids, positions, slot_mapping,
                          block_tables, from_device, sample, num_spec)

    # ---- sampling state of the rows that sample --------------------------------------------------------------
    def prompt_token_ids(self, row: int) -> np.ndarray:
        return self.token_ids[row, : self.num_prompt_tokens[row]]

    def record_host_tokens(self, row: int, start: int, tokens: list[int]) -> int:
        """Tokens a step just gave the row, from position `start`, on the host: the proposer reads them. Sent
        again by the next message; num_host_tokens is left to the messages. Returns the row's known tokens."""
        end = min(start + len(tokens), self.max_model_len)
        if end > start:
            self.token_ids[row, start:end] = tokens[: end - start]
        return end

    def record_sampled(self, rows: torch.Tensor, sampled: torch.Tensor) -> None:
        """On the device: each row's last sampled token (the input of a decode scheduled ahead of it)."""
        self.last_token.index_copy_(0, rows, sampled)


def can_speculate(params: SamplingParams) -> bool:
    """Whether drafts may be verified for a request: not when its sampling reads its previous tokens or changes
    the logits (penalties, logit_bias, min_tokens, a grammar), nor when it wants logprobs (the verify step does
    not compute them)."""
    return (params.structured_outputs is None and not params.logit_bias and params.min_tokens == 0
            and params.presence_penalty == 0.0 and params.frequency_penalty == 0.0
            and params.repetition_penalty == 1.0 and params.logprobs is None and params.prompt_logprobs is None)
