"""ModelRunner: one SchedulerOutput -> flat ragged input tensors -> model -> sampler -> ModelRunnerOutput.

All scheduled tokens of all requests go through the model as one flat batch (`input_ids[T]`, `positions[T]`,
`slot_mapping[T]`), with per-request `query_start_loc`, `seq_lens` and `block_tables`: exactly the shape a
GPU kernel wants. Decodes are placed first so attention can batch them densely.

On CUDA the inputs go into persistent device buffers (through pinned host twins, copied asynchronously), and a
step made only of decodes replays a CUDA graph captured for the next batch size up (`GRAPH_BATCH_SIZES`), its
padding rows marked as empty (slot -1, seq_len 0). The graph covers embedding, all layers, the final norm and
the LM head; sampling runs eagerly on the GPU after it. Mixed and prefill steps run eagerly (their GPU work is
large enough to hide the launches). `enforce_eager=True` turns the graphs off.

A step is launched (`execute_model_async`) and its result read later (`PendingOutput.result`), so that the
engine can schedule and launch the next step while this one runs on the GPU (async scheduling). Nothing in the
launch waits for the device: host tensors reach it through pinned memory, and the sampled tokens come back the
same way. A decode scheduled before its input token is known carries PLACEHOLDER_TOKEN; the runner takes that
token from the previous step's sampled tokens, on the device.
"""

from __future__ import annotations

import logging
from typing import Optional

import numpy as np
import torch

from pagellm.attention.metadata import AttentionMetadata
from pagellm.config import EngineConfig
from pagellm.core.sched_output import (
    PLACEHOLDER_TOKEN,
    ModelRunnerOutput,
    PromptLogprobs,
    ScheduledRequest,
    SchedulerOutput,
)
from pagellm.distributed.parallel_state import local_kv_cache_dims
from pagellm.model_executor.layers.sampler import (
    Sampler,
    SamplingMetadata,
    apply_grammar_bitmask,
    compute_prompt_logprobs,
    SamplerOutput,
    make_generator,
    to_device,
    to_token_logprobs,
)
from pagellm.model_executor.loader import load_model

logger = logging.getLogger(__name__)

# Decode batch sizes that get a CUDA graph; a decode step of n requests replays the smallest size >= n.
GRAPH_BATCH_SIZES = [1, 2, 4, 8] + list(range(16, 129, 16)) + list(range(160, 1025, 32))


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    sizes = [b for b in GRAPH_BATCH_SIZES if b < max_num_seqs]
    return sizes + [max_num_seqs]


class StepBuffers:
    """Persistent device tensors that a step's inputs are copied into, with pinned host twins.

    CUDA graphs read their inputs at fixed addresses, and eager steps reuse the same memory instead of allocating.
    The host side fills the numpy views of the pinned tensors; one asynchronous copy per tensor moves them. The
    previous step's copies are done by then: every step ends by reading its sampled tokens on the host.
    """

    def __init__(self, max_tokens: int, max_reqs: int, max_blocks: int, device: torch.device) -> None:
        pin = device.type == "cuda"  # (CPU buffers exist only in tests of this code path)

        def pair(shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
            host = torch.zeros(shape, dtype=dtype, pin_memory=pin)
            return torch.zeros(shape, dtype=dtype, device=device), host, host.numpy()

        self.input_ids, self._ids_host, self.ids_np = pair((max_tokens,), torch.int64)
        self.positions, self._pos_host, self.pos_np = pair((max_tokens,), torch.int64)
        self.slot_mapping, self._slot_host, self.slot_np = pair((max_tokens,), torch.int64)
        self.query_start_loc, self._qsl_host, self.qsl_np = pair((max_reqs + 1,), torch.int32)
        self.seq_lens, self._seq_host, self.seq_np = pair((max_reqs,), torch.int32)
        self.block_tables, self._bt_host, self.bt_np = pair((max_reqs, max_blocks), torch.int32)
        self.max_tokens, self.max_reqs, self.max_blocks = max_tokens, max_reqs, max_blocks
        self._uploaded: Optional[torch.cuda.Event] = None

    def wait_host_free(self) -> None:
        """Block until the last upload has read the pinned host buffers, before they are filled again (with
        async scheduling the previous step may not have started on the device yet)."""
        if self._uploaded is not None:
            self._uploaded.synchronize()
            self._uploaded = None

    def upload(self, num_tokens: int, num_reqs: int, num_block_cols: int) -> None:
        """Copy the filled host prefixes to the device, asynchronously."""
        self.input_ids[:num_tokens].copy_(self._ids_host[:num_tokens], non_blocking=True)
        self.positions[:num_tokens].copy_(self._pos_host[:num_tokens], non_blocking=True)
        self.slot_mapping[:num_tokens].copy_(self._slot_host[:num_tokens], non_blocking=True)
        self.query_start_loc[: num_reqs + 1].copy_(self._qsl_host[: num_reqs + 1], non_blocking=True)
        self.seq_lens[:num_reqs].copy_(self._seq_host[:num_reqs], non_blocking=True)
        if num_block_cols == self.max_blocks:
            self.block_tables[:num_reqs].copy_(self._bt_host[:num_reqs], non_blocking=True)
        else:  # only the columns in use: the rest of a row is never read (seq_lens bound every read)
            self.block_tables[:num_reqs, :num_block_cols].copy_(self._bt_host[:num_reqs, :num_block_cols],
                                                                 non_blocking=True)
        if self.input_ids.device.type == "cuda":
            self._uploaded = torch.cuda.Event()
            self._uploaded.record()


class PendingOutput:
    """A launched step. Its sampled token ids are on their way to pinned host memory; `result()` waits for them
    and builds the ModelRunnerOutput (token logprobs too, which read the device)."""

    def __init__(self, out: ModelRunnerOutput, sampled_reqs: Optional[list[ScheduledRequest]] = None,
                 sampler_output: Optional[SamplerOutput] = None) -> None:
        self._out = out
        self._reqs = sampled_reqs or []
        self._sampler_output = sampler_output
        self._event: Optional[torch.cuda.Event] = None
        self._host: Optional[torch.Tensor] = None
        if sampler_output is not None:
            ids = sampler_output.sampled_token_ids
            if ids.device.type == "cuda":
                self._host = torch.empty(ids.shape, dtype=ids.dtype, pin_memory=True)
                self._host.copy_(ids, non_blocking=True)
                self._event = torch.cuda.Event()
                self._event.record()
            else:
                self._host = ids

    def result(self) -> ModelRunnerOutput:
        so = self._sampler_output
        if so is not None:
            self._sampler_output = None
            if self._event is not None:
                self._event.synchronize()
            tokens = self._host.tolist()
            for row, r in enumerate(self._reqs):
                self._out.sampled_token_ids[r.req_id] = tokens[row]
                if r.sampling_params.logprobs is not None:
                    self._out.logprobs[r.req_id] = to_token_logprobs(so, row, r.sampling_params.logprobs)
        return self._out


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
        # The last launched step's sampled tokens (device) and each sampling request's row in them: the input
        # tokens of decodes scheduled ahead of them (PLACEHOLDER_TOKEN).
        self.prev_sampled: Optional[tuple[dict[str, int], torch.Tensor]] = None
        # The KV cache of this rank: its pipeline stage's layers, its tensor-parallel share of the KV heads
        # (the whole model's on a single device).
        self.num_cache_layers, self.num_cache_kv_heads = local_kv_cache_dims(self.model_config.num_layers,
                                                                             self.model_config.num_kv_heads)
        sc = config.scheduler_config
        self.max_model_len = config.model_config.max_model_len
        self.max_blocks_per_seq = -(-self.max_model_len // self.block_size)
        self.buffers: Optional[StepBuffers] = None
        if device.type == "cuda":
            self.buffers = StepBuffers(max(sc.max_num_batched_tokens, sc.max_num_seqs), sc.max_num_seqs,
                                       self.max_blocks_per_seq, device)
        # Pipeline stages exchange tensors with their neighbours every step: they run eagerly.
        self.use_graphs = (device.type == "cuda" and not config.model_config.enforce_eager
                           and config.parallel_config.pipeline_parallel_size == 1)
        # batch size -> (graph, logits it writes [bs, vocab])
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.graph_sizes: list[int] = graph_batch_sizes(sc.max_num_seqs) if self.use_graphs else []

    # ---- set-up -----------------------------------------------------------------------------------------
    def load_model(self) -> None:
        self.model = load_model(self.model_config, self.device)

    def release(self) -> None:
        """Drop the model, KV cache, graphs and buffers; the runner cannot step afterwards."""
        self.graphs.clear()
        self.kv_caches = []
        self.model = None
        self.buffers = None
        self.generators.clear()
        self.prev_sampled = None

    def kv_cache_bytes_per_block(self) -> int:
        mc = self.model_config
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_cache_layers * self.block_size * self.num_cache_kv_heads * mc.head_dim * elem

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self._allocate_kv_cache(num_blocks)
        if self.use_graphs:
            self.capture_graphs()

    def _allocate_kv_cache(self, num_blocks: int) -> None:
        mc = self.model_config
        shape = (2, num_blocks, self.block_size, self.num_cache_kv_heads, mc.head_dim)
        self.kv_caches = [torch.zeros(shape, dtype=self.dtype, device=self.device)
                          for _ in range(self.num_cache_layers)]

    def graph_memory_estimate(self) -> int:
        """Bytes the decode graphs' private memory pool will hold (activations of the largest graph: logits in
        the model dtype and float32, the MLP's widest tensors, split-KV partials), with a margin. The worker
        leaves this much out of the KV cache."""
        if not self.use_graphs:
            return 0
        cfg = self.model_config.hf_config
        elem = torch.empty((), dtype=self.dtype).element_size()
        bs = max(self.graph_sizes)
        per_row = (cfg.vocab_size * (elem + 4) + 3 * cfg.intermediate_size * elem * 2
                   + 16 * cfg.hidden_size * elem + 64 * cfg.num_attention_heads * self.model_config.head_dim * 4)
        return bs * per_row + 256 * 2**20

    def _fill_graph_padding(self, n: int, bs: int) -> None:
        """Rows n..bs of a graph batch: no token to write (slot -1), an empty context (seq_len 0)."""
        b = self.buffers
        b.ids_np[n:bs] = 0
        b.pos_np[n:bs] = 0
        b.slot_np[n:bs] = -1
        b.qsl_np[: bs + 1] = np.arange(bs + 1, dtype=np.int32)
        b.seq_np[n:bs] = 0

    def _graph_metadata(self, bs: int) -> AttentionMetadata:
        b = self.buffers
        return AttentionMetadata(
            num_actual_tokens=bs,
            query_start_loc=b.query_start_loc[: bs + 1],
            seq_lens=b.seq_lens[:bs],
            block_tables=b.block_tables[:bs],
            slot_mapping=b.slot_mapping[:bs],
            max_query_len=1,
            max_seq_len=self.max_model_len,  # fixed at capture: the split-KV choice must not change per step
            num_decodes=bs,
            block_size=self.block_size,
            # Host copies as the buffers hold them now (all padding at capture). The Triton backend reads only
            # their length; a CPU backend run in place of a graph (tests) reads the step's real lengths.
            query_start_loc_cpu=list(range(bs + 1)),
            seq_lens_cpu=b.seq_np[:bs].tolist(),
        )

    def _graph_forward(self, bs: int) -> torch.Tensor:
        b = self.buffers
        hidden = self.model(b.input_ids[:bs], b.positions[:bs], self.kv_caches, self._graph_metadata(bs))
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def capture_graphs(self) -> None:
        """One CUDA graph per decode batch size, largest first, all in one memory pool (a smaller graph reuses
        the larger one's activation memory). Inputs are all padding (empty contexts), so capture writes
        nothing into the KV cache."""
        import time

        start = time.perf_counter()
        before = torch.cuda.memory_reserved(self.device)
        pool = None
        for bs in sorted(self.graph_sizes, reverse=True):
            self._fill_graph_padding(0, bs)
            self.buffers.upload(bs, bs, 0)
            self._graph_forward(bs)  # warm-up: compiles the Triton kernels of this shape outside the capture
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = self._graph_forward(bs)
            pool = graph.pool()
            self.graphs[bs] = (graph, logits)
        torch.cuda.synchronize(self.device)
        logger.info("captured %d decode CUDA graphs (batch sizes %d..%d) in %.1fs, %.2f GiB",
                    len(self.graphs), min(self.graph_sizes), max(self.graph_sizes), time.perf_counter() - start,
                    (torch.cuda.memory_reserved(self.device) - before) / 2**30)

    @torch.inference_mode()
    def profile_run(self) -> int:
        """One forward pass at the largest batch the scheduler may send, to measure peak activation memory.
        Returns the bytes of the temporary KV cache it used (part of the peak, not of the activations)."""
        sc = self.config.scheduler_config
        num_tokens = min(sc.max_num_batched_tokens, sc.max_num_seqs * self.model_config.max_model_len)
        num_reqs = max(1, min(sc.max_num_seqs, num_tokens))
        per_req = [num_tokens // num_reqs + (1 if i < num_tokens % num_reqs else 0) for i in range(num_reqs)]
        blocks_per_req = [(n + self.block_size - 1) // self.block_size for n in per_req]
        saved = self.kv_caches
        self._allocate_kv_cache(sum(blocks_per_req))
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
        profile_kv = sum(c.numel() * c.element_size() for c in self.kv_caches)
        self.kv_caches = saved
        return profile_kv

    # ---- one step ---------------------------------------------------------------------------------------
    def _graph_size(self, reqs: list[ScheduledRequest]) -> Optional[int]:
        """The captured batch size this step replays, or None to run eagerly."""
        if not self.graphs or len(reqs) > self.graph_sizes[-1]:
            return None
        if any(r.num_scheduled_tokens != 1 for r in reqs):
            return None
        return next(bs for bs in self.graph_sizes if bs >= len(reqs))

    def _prepare_inputs(self, reqs: list[ScheduledRequest], pad_to: Optional[int] = None
                        ) -> tuple[torch.Tensor, torch.Tensor, Optional[AttentionMetadata]]:
        """The step's flat inputs. With pad_to (a graph batch size) they only go into the buffers, padded."""
        bs = self.block_size
        n = len(reqs)
        q_lens = np.fromiter((r.num_scheduled_tokens for r in reqs), dtype=np.int64, count=n)
        starts = np.fromiter((r.num_computed_tokens for r in reqs), dtype=np.int64, count=n)
        seq_lens = starts + q_lens
        qsl = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(q_lens, out=qsl[1:])
        total = int(qsl[-1])
        max_blocks = max(len(r.block_ids) for r in reqs)
        buf = self.buffers
        if buf is not None:
            buf.wait_host_free()

        if buf is None:
            block_tables = np.zeros((n, max_blocks), dtype=np.int64)
        else:
            block_tables = buf.bt_np[:n, :max_blocks]
        for i, r in enumerate(reqs):
            block_tables[i, : len(r.block_ids)] = r.block_ids
        if total == n:  # decodes only: one token per request
            input_ids = np.fromiter((r.token_ids[0] for r in reqs), dtype=np.int64, count=n)
            positions = starts
            slot_mapping = block_tables[np.arange(n), positions // bs].astype(np.int64) * bs + positions % bs
        else:
            input_ids = np.fromiter((t for r in reqs for t in r.token_ids), dtype=np.int64, count=total)
            # positions: for each token, its request's start + its offset inside the request's chunk
            req_of_token = np.repeat(np.arange(n), q_lens)
            positions = starts[req_of_token] + (np.arange(total) - qsl[:-1][req_of_token])
            slot_mapping = block_tables[req_of_token, positions // bs].astype(np.int64) * bs + positions % bs

        if buf is None:
            dev = self.device
            ids_t, pos_t = torch.from_numpy(input_ids).to(dev), torch.from_numpy(positions).to(dev)
            qsl_t = torch.from_numpy(qsl).to(dev, torch.int32)
            seq_t = torch.from_numpy(seq_lens).to(dev, torch.int32)
            bt_t = torch.from_numpy(block_tables).to(dev, torch.int32)
            slot_t = torch.from_numpy(slot_mapping).to(dev)
        else:
            buf.ids_np[:total] = input_ids
            buf.pos_np[:total] = positions
            buf.slot_np[:total] = slot_mapping
            buf.qsl_np[: n + 1] = qsl
            buf.seq_np[:n] = seq_lens
            if pad_to is not None:  # a graph replays: it was captured with its own views of these buffers
                self._fill_graph_padding(n, pad_to)
                buf.upload(pad_to, pad_to, max_blocks)
                return buf.input_ids[:pad_to], buf.positions[:pad_to], None
            buf.upload(total, n, max_blocks)
            ids_t, pos_t = buf.input_ids[:total], buf.positions[:total]
            qsl_t, seq_t, bt_t, slot_t = (buf.query_start_loc[: n + 1], buf.seq_lens[:n], buf.block_tables[:n],
                                          buf.slot_mapping[:total])
        meta = AttentionMetadata(
            num_actual_tokens=total,
            query_start_loc=qsl_t,
            seq_lens=seq_t,
            block_tables=bt_t,
            slot_mapping=slot_t,
            max_query_len=int(q_lens.max()),
            max_seq_len=int(seq_lens.max()),
            num_decodes=int(np.count_nonzero(q_lens == 1)),
            block_size=bs,
            query_start_loc_cpu=qsl.tolist(),
            seq_lens_cpu=seq_lens.tolist(),
        )
        return ids_t, pos_t, meta

    def _fill_placeholders(self, input_ids: torch.Tensor, reqs: list[ScheduledRequest]) -> None:
        """Decodes scheduled ahead of their input token (PLACEHOLDER_TOKEN): write the previous step's sampled
        tokens, still on the device, into their rows. They are one-token requests, which come first, so a
        placeholder's token index is its request's index."""
        rows = [i for i, r in enumerate(reqs) if r.token_ids[0] == PLACEHOLDER_TOKEN]
        if not rows:
            return
        if self.prev_sampled is None:
            raise RuntimeError("a decode was scheduled ahead of a token that no launched step samples")
        rows_of, sampled = self.prev_sampled
        src = [rows_of[reqs[i].req_id] for i in rows]
        dst_t = to_device(rows, torch.int64, self.device)
        src_t = to_device(src, torch.int64, self.device)
        input_ids.index_copy_(0, dst_t, sampled.index_select(0, src_t))

    def execute_model(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        return self.execute_model_async(sched).result()

    @torch.inference_mode()
    def execute_model_async(self, sched: SchedulerOutput) -> PendingOutput:
        """Launch the step; nothing here waits for the device (unless a sampling option needs a host-side
        decision, like top-p's fallback check)."""
        for req_id in sched.finished_req_ids:
            self.generators.pop(req_id, None)
        out = ModelRunnerOutput()
        if not sched.scheduled:
            return PendingOutput(out)
        # Decodes first, so the attention backend sees them as one dense block; decodes by context length, so
        # a backend that pads groups of decodes pads each only to its neighbours' lengths.
        reqs = sorted(sched.scheduled, key=lambda r: (r.num_scheduled_tokens != 1,
                                                      r.num_computed_tokens if r.num_scheduled_tokens == 1 else 0))
        graph_bs = self._graph_size(reqs)
        input_ids, positions, meta = self._prepare_inputs(reqs, pad_to=graph_bs)
        self._fill_placeholders(input_ids, reqs)
        sample_rows = [i for i, r in enumerate(reqs) if r.do_sample]
        if graph_bs is not None:  # decodes only: every row samples, none has prompt logprobs left
            graph, graph_logits = self.graphs[graph_bs]
            graph.replay()
            if not sample_rows:
                return PendingOutput(out)
            logits = graph_logits[: len(reqs)]
            if len(sample_rows) != len(reqs):
                logits = logits[to_device(sample_rows, torch.int64, self.device)]
            return self._sample(reqs, sample_rows, logits, out)
        hidden = self.model(input_ids, positions, self.kv_caches, meta)
        if hidden is None:  # a pipeline stage before the last: its output went to the next stage
            return PendingOutput(out)
        qsl = meta.query_start_loc_cpu
        pending = PendingOutput(out)
        if sample_rows:
            last = to_device([qsl[i + 1] - 1 for i in sample_rows], torch.int64, self.device)
            pending = self._sample(reqs, sample_rows, self.model.compute_logits(hidden[last]), out)
        for i, r in enumerate(reqs):
            if r.sampling_params.prompt_logprobs is not None:
                self._prompt_logprobs(r, hidden[qsl[i] : qsl[i + 1]], out)
        return pending

    def _sample(self, reqs: list[ScheduledRequest], rows: list[int], logits: torch.Tensor,
                out: ModelRunnerOutput) -> PendingOutput:
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
        self.prev_sampled = ({r.req_id: row for row, r in enumerate(sreqs)}, result.sampled_token_ids)
        return PendingOutput(out, sreqs, result)

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
