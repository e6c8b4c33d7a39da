"""The model runner's part of speculative decoding: drafts proposed after a step, verified in a later one.

After a step's answer is collected, the proposer drafts tokens for the requests that sampled and may speculate,
as many as each one's measured acceptance makes worth it (spec_decode/draft_length.py). A later step that
verifies k drafts of a request computes its k + 1 positions in the same forward pass as everything else; the
target's distributions there (after the request's temperature, top-k, top-p and min-p, as plain sampling uses
them; one-hot for greedy requests) go to the rejection sampler, which returns 1..k+1 tokens.

Verify steps in a CUDA graph: a step of decodes and verifies only is laid out with every request holding
exactly Q = num_speculative_tokens + 1 query tokens, its own at the end and dummies in front (`PaddedVerify`).
A dummy sits at a real earlier position of its request, so it reads only KV that exists; its slot is -1, so it
writes nothing, and its outputs are never read. That uniform shape is what a graph captured per batch size
replays; the attention's prefill path launches from host integers only (tokens and requests), so it is
capturable as it is.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

import numpy as np
import torch

from pagellm.core.sched_output import ModelRunnerOutput, SchedulerOutput
from pagellm.model_executor.layers.sampler import SamplingMetadata, target_probs, to_device
from pagellm.spec_decode.draft_length import DraftLengthPolicy
from pagellm.spec_decode.draft_model import DraftModelProposer
from pagellm.spec_decode.ngram_proposer import NgramProposer
from pagellm.spec_decode.proposer import ProposeBatch, Proposer
from pagellm.spec_decode.rejection_sampler import rejection_sample
from pagellm.worker.input_batch import StepInputs

if TYPE_CHECKING:
    from pagellm.config import SpeculativeConfig
    from pagellm.worker.model_runner import ModelRunner, PendingOutput

# Verify steps of at most this many requests replay a CUDA graph (beyond, the padded tokens cost more compute
# than the graph saves in launches).
VERIFY_GRAPH_MAX_BATCH = 64


@dataclass
class PaddedVerify:
    """A step of decodes and verifies laid out as num_reqs x query_len tokens (dummies in front)."""

    query_len: int
    dst: np.ndarray  # int64 [T]: the padded index of each of the step's tokens
    input_ids: np.ndarray  # int64 [num_reqs * query_len]
    positions: np.ndarray
    slot_mapping: np.ndarray  # -1 for the dummies


class Speculator:
    def __init__(self, runner: "ModelRunner", spec: "SpeculativeConfig", max_reqs: int) -> None:
        self.runner = runner
        self.num_spec_tokens = spec.num_speculative_tokens
        self.query_len = spec.num_speculative_tokens + 1
        self.max_batch = spec.disable_by_batch_size
        self.policy = DraftLengthPolicy(max_reqs, spec.num_speculative_tokens)
        self.draft: Optional[DraftModelProposer] = None
        if spec.draft_model_config is not None:
            self.draft = DraftModelProposer(spec.draft_model_config, max_reqs, spec.num_speculative_tokens,
                                            runner.block_size, runner.device)
            self.proposer: Proposer = self.draft
        else:
            self.proposer = NgramProposer(spec.prompt_lookup_min, spec.prompt_lookup_max)
        runner.batch.on_add = self._on_add

    def _on_add(self, row: int) -> None:
        self.policy.reset(row)
        if self.draft is not None:
            self.draft.reset(row)

    # ---- the draft model's life, with the runner's ---------------------------------------------------------
    def load(self) -> None:
        if self.draft is not None:
            self.draft.load()

    def kv_bytes_per_block(self) -> int:
        return self.draft.bytes_per_block() if self.draft is not None else 0

    def allocate(self, num_blocks: int) -> None:
        if self.draft is not None:
            self.draft.allocate(num_blocks)

    def release(self) -> None:
        if self.draft is not None:
            self.draft.release()

    # ---- after a step: drafts ----------------------------------------------------------------------------
    @staticmethod
    def token_starts(step: StepInputs) -> dict[str, int]:
        """Position of each sampling request's first new token (after its computed, non-draft tokens)."""
        sample = step.sample
        starts = (step.seq_lens - step.num_spec)[sample].tolist()
        return {step.req_ids[i]: s for i, s in zip(sample.tolist(), starts)}

    def propose(self, out: ModelRunnerOutput, starts: dict[str, int]) -> dict[str, list[int]]:
        """Drafts for the requests that sampled in the step of `out` and may speculate; none while the batch
        holds more than disable_by_batch_size requests. With async scheduling a request may already decode in
        the next step: its drafts are stale, but they tell the scheduler it speculates (it then stops scheduling
        it ahead). `starts` gives the position of each request's first token of the step."""
        batch, policy, max_len = self.runner.batch, self.policy, self.runner.max_model_len
        rows, wanted, known_of = [], [], {}
        for req_id, tokens in zip(out.req_ids, out.sampled_token_ids):
            row = batch.row_of.get(req_id)
            if row is not None and batch.can_speculate[row]:  # the proposer reads them (later ones too)
                known_of[req_id] = (row, batch.record_host_tokens(row, starts[req_id], tokens))
        if len(batch) > self.max_batch:
            return {}
        for req_id, (row, known) in known_of.items():
            k = min(policy.wanted(row, known), max_len - known - 1)
            if k > 0:
                rows.append((req_id, row, known))
                wanted.append(k)
        if not rows:
            return {}
        drafts = self.proposer.propose(ProposeBatch(
            token_ids=[batch.token_ids[row, :known] for _, row, known in rows], num_speculative_tokens=wanted,
            rows=[row for _, row, _ in rows],
            block_tables=[batch.block_table[row, : batch.num_blocks[row]] for _, row, _ in rows]))
        found = {}
        for (req_id, row, known), d in zip(rows, drafts.token_ids):
            if d:
                found[req_id] = d
            else:
                policy.found_nothing(row, known)
        return found

    # ---- a verify step -----------------------------------------------------------------------------------
    def padded_layout(self, step: StepInputs) -> Optional[PaddedVerify]:
        """The step as num_reqs x Q tokens, or None when it does not fit that shape: a longer chunk, a context
        of at most Q tokens (no earlier positions to put dummies at), or prompt logprobs (they need the
        step's hidden states)."""
        q, n = self.query_len, step.num_reqs
        if (step.q_lens > q).any() or (step.seq_lens <= q).any() or \
                (self.runner.batch.prompt_logprobs[step.rows] >= 0).any():
            return None
        pad = q - step.q_lens
        token_req = np.repeat(np.arange(n), step.q_lens)
        dst = token_req * q + pad[token_req] + (np.arange(step.num_tokens) - step.query_start_loc[:-1][token_req])
        input_ids = np.zeros(n * q, dtype=np.int64)
        input_ids[dst] = step.input_ids
        slots = np.full(n * q, -1, dtype=np.int64)
        slots[dst] = step.slot_mapping
        positions = ((step.seq_lens - q)[:, None] + np.arange(q)[None, :]).reshape(-1)
        return PaddedVerify(q, dst, input_ids, positions, slots)

    def sample_and_verify(self, step: StepInputs, logits_at: Callable[[np.ndarray], torch.Tensor],
                          sched: SchedulerOutput) -> "PendingOutput":
        """A step in which some requests verify drafts: the others sample as usual, these go through the
        rejection sampler. `logits_at(token indices of the step)` gives the logits there. Waits for the device:
        the accepted counts decide the rows' token counts and blocks."""
        from pagellm.worker.model_runner import PendingOutput

        runner = self.runner
        assert runner.is_driver, "speculative decoding runs on one device"
        batch, device = runner.batch, runner.device
        sample = step.sample
        k_all = step.num_spec[sample]
        plain, verify = sample[k_all == 0], sample[k_all > 0]
        ends = step.query_start_loc[1:]
        tokens: dict[int, list[int]] = {}  # request index -> its new tokens
        plain_out = None
        if plain.size:
            plain_step = dataclasses.replace(step, sample=plain)
            plain_out = runner._sample(plain_step, logits_at(ends[plain] - 1), sched).result()
            tokens.update(zip(plain.tolist(), plain_out.sampled_token_ids))

        ks = step.num_spec[verify]
        R, K = len(verify), int(ks.max())
        # Row r's positions: its last k_r + 1, padded to K + 1 by repeating its last (never read past k_r + 1).
        offsets = np.minimum(np.arange(K + 1)[None, :], ks[:, None])
        index = (ends[verify] - 1 - ks)[:, None] + offsets
        logits = logits_at(index.reshape(-1))
        rows = step.rows[verify]
        V = logits.shape[-1]
        sampling = batch.sampling.take(np.repeat(rows, K + 1))
        md = SamplingMetadata.from_rows(sampling, [()] * len(sampling.greedy), [()] * len(sampling.greedy), {}, V,
                                        device)
        probs = target_probs(logits, md).view(R, K + 1, V)
        seq_lens = step.seq_lens[verify]
        drafts = np.full((R, K), -1, dtype=np.int64)
        for r, (row, k, end) in enumerate(zip(rows.tolist(), ks.tolist(), seq_lens.tolist())):
            drafts[r, :k] = batch.token_ids[row, end - k : end]
        generators = {r: batch.generators[row] for r, row in enumerate(rows.tolist()) if row in batch.generators}
        result = rejection_sample(torch.from_numpy(drafts), ks.tolist(), probs, None,
                                  batch.sampling.greedy[rows].tolist(), generators)
        for i, row, k, new in zip(verify.tolist(), rows.tolist(), ks.tolist(), result.tolists()):
            tokens[i] = new
            self.policy.verified(row, k, len(new) - 1, int(step.seq_lens[i]) - k + len(new))
            batch.num_tokens[row] += len(new) - 1  # counted as if no draft were accepted (InputBatch._gather)
            # The blocks past the computed tokens held only rejected drafts: the scheduler frees them.
            batch.num_blocks[row] = -(-(int(step.starts[i]) + len(new)) // runner.block_size)
        last_tokens = torch.tensor([tokens[i][-1] for i in verify.tolist()], dtype=torch.int64)
        batch.record_sampled(to_device(torch.from_numpy(rows), torch.int64, device), last_tokens.to(device))

        out = ModelRunnerOutput(req_ids=[step.req_ids[i] for i in sample.tolist()],
                                sampled_token_ids=[tokens[i] for i in sample.tolist()])
        if plain_out is not None and plain_out.logprobs:
            lp = dict(zip(plain.tolist(), plain_out.logprobs))
            out.logprobs = [lp.get(i) for i in sample.tolist()]
        return PendingOutput.ready(out)
