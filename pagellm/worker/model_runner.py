"""ModelRunner: one SchedulerOutput -> flat ragged input tensors -> model -> sampler -> ModelRunnerOutput.

All scheduled tokens of all requests go through the model as one flat batch (`input_ids[T]`, `positions[T]`,
`slot_mapping[T]`), with per-request `query_start_loc`, `seq_lens` and `block_tables`: exactly the shape a
GPU kernel wants. Decodes are placed first so attention can batch them densely.
"""

from __future__ import annotations

import logging
from typing import Optional

import numpy as np
import torch

from pagellm.attention.metadata import AttentionMetadata
from pagellm.config import EngineConfig
from pagellm.core.sched_output import ModelRunnerOutput, PromptLogprobs, ScheduledRequest, SchedulerOutput
from pagellm.model_executor.layers.sampler import (
    Sampler,
    SamplingMetadata,
    apply_grammar_bitmask,
    compute_prompt_logprobs,
    make_generator,
    to_token_logprobs,
)
from pagellm.model_executor.loader import load_model

logger = logging.getLogger(__name__)


class ModelRunner:
    def __init__(self, config: EngineConfig, device: torch.device) -> None:
        self.config = config
        self.model_config = config.model_config
        self.device = device
        self.dtype = config.model_config.dtype
        self.block_size = config.cache_config.block_size
        self.model: Optional[torch.nn.Module] = None
        self.kv_caches: list[torch.Tensor] = []
        self.sampler = Sampler()
        # Per-request sampling state that must outlive a step: seeded generators.
        self.generators: dict[str, torch.Generator] = {}

    # ---- set-up -----------------------------------------------------------------------------------------
    def load_model(self) -> None:
        self.model = load_model(self.model_config, self.device)

    def kv_cache_bytes_per_block(self) -> int:
        mc = self.model_config
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * mc.num_layers * self.block_size * mc.num_kv_heads * mc.head_dim * elem

    def initialize_kv_cache(self, num_blocks: int) -> None:
        mc = self.model_config
        shape = (2, num_blocks, self.block_size, mc.num_kv_heads, mc.head_dim)
        self.kv_caches = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(mc.num_layers)]

    @torch.inference_mode()
    def profile_run(self) -> None:
        """One forward pass at the largest batch the scheduler may send, to measure peak activation memory."""
        sc = self.config.scheduler_config
        num_tokens = min(sc.max_num_batched_tokens, sc.max_num_seqs * self.model_config.max_model_len)
        num_reqs = max(1, min(sc.max_num_seqs, num_tokens))
        per_req = [num_tokens // num_reqs + (1 if i < num_tokens % num_reqs else 0) for i in range(num_reqs)]
        blocks_per_req = [(n + self.block_size - 1) // self.block_size for n in per_req]
        saved = self.kv_caches
        self.initialize_kv_cache(sum(blocks_per_req))
        from pagellm.sampling_params import SamplingParams

        params = SamplingParams(max_tokens=1)
        reqs, next_block = [], 0
        for i, (n, nb) in enumerate(zip(per_req, blocks_per_req)):
            reqs.append(ScheduledRequest(
                req_id=f"profile-{i}", token_ids=[0] * n, num_computed_tokens=0,
                block_ids=list(range(next_block, next_block + nb)), sampling_params=params,
                prompt_token_ids=[0] * n, output_token_ids=[], do_sample=True,
            ))
            next_block += nb
        self.execute_model(SchedulerOutput(scheduled=reqs, num_batched_tokens=num_tokens))
        self.kv_caches = saved

    # ---- one step ---------------------------------------------------------------------------------------
    def _prepare_inputs(self, reqs: list[ScheduledRequest]) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        bs = self.block_size
        q_lens = np.array([r.num_scheduled_tokens for r in reqs], dtype=np.int64)
        starts = np.array([r.num_computed_tokens for r in reqs], dtype=np.int64)
        seq_lens = starts + q_lens
        qsl = np.zeros(len(reqs) + 1, dtype=np.int64)
        np.cumsum(q_lens, out=qsl[1:])
        total = int(qsl[-1])

        input_ids = np.fromiter((t for r in reqs for t in r.token_ids), dtype=np.int64, count=total)
        # positions: for each token, its request's start + its offset inside the request's chunk
        req_of_token = np.repeat(np.arange(len(reqs)), q_lens)
        positions = starts[req_of_token] + (np.arange(total) - qsl[:-1][req_of_token])

        max_blocks = max(len(r.block_ids) for r in reqs)
        block_tables = np.zeros((len(reqs), max_blocks), dtype=np.int64)
        for i, r in enumerate(reqs):
            block_tables[i, : len(r.block_ids)] = r.block_ids
        slot_mapping = block_tables[req_of_token, positions // bs] * bs + positions % bs

        dev = self.device
        meta = AttentionMetadata(
            num_actual_tokens=total,
            query_start_loc=torch.from_numpy(qsl).to(dev, torch.int32),
            seq_lens=torch.from_numpy(seq_lens).to(dev, torch.int32),
            block_tables=torch.from_numpy(block_tables).to(dev, torch.int32),
            slot_mapping=torch.from_numpy(slot_mapping).to(dev),
            max_query_len=int(q_lens.max()),
            max_seq_len=int(seq_lens.max()),
            num_decodes=int(np.count_nonzero(q_lens == 1)),
            block_size=bs,
            query_start_loc_cpu=qsl.tolist(),
            seq_lens_cpu=seq_lens.tolist(),
        )
        return torch.from_numpy(input_ids).to(dev), torch.from_numpy(positions).to(dev), meta

    @torch.inference_mode()
    def execute_model(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        for req_id in sched.finished_req_ids:
            self.generators.pop(req_id, None)
        out = ModelRunnerOutput()
        if not sched.scheduled:
            return out
        # Decodes first, so the attention backend sees them as one dense block; decodes by context length, so
        # a backend that pads groups of decodes pads each only to its neighbours' lengths.
        reqs = sorted(sched.scheduled, key=lambda r: (r.num_scheduled_tokens != 1,
                                                      r.num_computed_tokens if r.num_scheduled_tokens == 1 else 0))
        input_ids, positions, meta = self._prepare_inputs(reqs)
        hidden = self.model(input_ids, positions, self.kv_caches, meta)

        qsl = meta.query_start_loc_cpu
        sample_rows = [i for i, r in enumerate(reqs) if r.do_sample]
        if sample_rows:
            self._sample(reqs, sample_rows, hidden, qsl, out)
        for i, r in enumerate(reqs):
            if r.sampling_params.prompt_logprobs is not None:
                self._prompt_logprobs(r, hidden[qsl[i] : qsl[i + 1]], out)
        return out

    def _sample(self, reqs: list[ScheduledRequest], rows: list[int], hidden: torch.Tensor, qsl: list[int],
                out: ModelRunnerOutput) -> None:
        last = torch.tensor([qsl[i + 1] - 1 for i in rows], device=self.device)
        logits = self.model.compute_logits(hidden[last])
        sreqs = [reqs[i] for i in rows]
        apply_grammar_bitmask(logits, [r.grammar_bitmask for r in sreqs])  # structured output
        generators = {}
        for row, r in enumerate(sreqs):
            seed = r.sampling_params.seed
            if seed is not None:
                gen = self.generators.get(r.req_id)
                if gen is None:
                    gen = self.generators[r.req_id] = make_generator(seed, self.device)
                generators[row] = gen
        metadata = SamplingMetadata.build(
            [r.sampling_params for r in sreqs],
            [r.prompt_token_ids for r in sreqs],
            [r.output_token_ids for r in sreqs],
            generators,
            logits.shape[-1],
            self.device,
        )
        result = self.sampler(logits, metadata)
        tokens = result.sampled_token_ids.tolist()
        for row, r in enumerate(sreqs):
            out.sampled_token_ids[r.req_id] = tokens[row]
            if r.sampling_params.logprobs is not None:
                out.logprobs[r.req_id] = to_token_logprobs(result, row, r.sampling_params.logprobs)

    def _prompt_logprobs(self, r: ScheduledRequest, hidden: torch.Tensor, out: ModelRunnerOutput) -> None:
        """Logprobs of prompt tokens computed this step: the hidden state at p predicts token p + 1."""
        start = r.num_computed_tokens
        num_prompt = len(r.prompt_token_ids)
        end = min(start + r.num_scheduled_tokens, num_prompt - 1)
        if end <= start:
            return
        logits = self.model.compute_logits(hidden[: end - start])
        targets = torch.tensor(r.prompt_token_ids[start + 1 : end + 1], device=self.device)
        entries = compute_prompt_logprobs(logits, targets, r.sampling_params.prompt_logprobs)
        out.prompt_logprobs[r.req_id] = PromptLogprobs(first_position=start + 1, entries=entries)
