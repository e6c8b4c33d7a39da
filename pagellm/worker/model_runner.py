"""ModelRunner: one step message -> the kept request rows -> flat ragged inputs -> model -> sampler -> tokens.

The runner keeps each request's state across steps in an InputBatch (worker/input_batch.py): the scheduler
sends a request once and deltas afterwards. All scheduled tokens of all requests go through the model as one
flat batch (`input_ids[T]`, `positions[T]`, `slot_mapping[T]`), with per-request `query_start_loc`, `seq_lens`
and `block_tables`: exactly the shape a GPU kernel wants. Decodes are placed first so attention can batch them
densely.

On CUDA the inputs go into persistent device buffers (through pinned host twins, copied asynchronously), and a
step made only of decodes replays a CUDA graph captured for the next batch size up (`GRAPH_BATCH_SIZES`), its
padding rows marked as empty (slot -1, seq_len 0). The graph covers embedding, all layers, the final norm and
the LM head; sampling runs eagerly on the GPU after it. Mixed and prefill steps run eagerly (their GPU work is
large enough to hide the launches). `enforce_eager=True` turns the graphs off. A pipeline stage's graph holds
its own layers only (and the LM head on the last); the activations go between stages outside the graphs
(worker/pipeline.py).

A step is launched (`execute_model_async`) and its result read later (`PendingOutput.result`), so that the
engine can schedule and launch the next step while this one runs on the GPU (async scheduling). Nothing in the
launch waits for the device: host tensors reach it through pinned memory, and the sampled tokens come back the
same way. Each sampled token is also kept on the device as its request's last token, the input of a decode
that was scheduled before the token came back.

Speculative decoding (n-gram, one device): after a step's answer is collected the runner proposes draft tokens
for the requests that may speculate (it holds their tokens), and returns them with the sampled tokens; a later
step verifies them (worker/speculation.py), in a CUDA graph of its own when it holds only decodes and verifies.

Only the driver (tensor-parallel rank 0 of the last pipeline stage) samples; the other ranks of the last stage
compute the logits with it (the vocabulary is split over them) and receive the sampled tokens by a broadcast on
the device, so that every rank has each request's last token.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import numpy as np
import torch

from pagellm.attention import fp8_kv
from pagellm.attention.metadata import AttentionMetadata
from pagellm.config import EngineConfig, resolve_kv_cache_dtype
from pagellm.core.sched_output import (
    ModelRunnerOutput,
    NewRequestData,
    PromptLogprobs,
    SchedulerOutput,
)
from pagellm.distributed.parallel_state import get_pp_group, get_tp_group, local_kv_cache_dims
from pagellm.model_executor.layers.prompt_logprobs import (
    PROMPT_LOGPROBS_CHUNK,
    prompt_logprobs_tensors,
    to_prompt_logprobs,
)
from pagellm.model_executor.layers.sampler import (
    Sampler,
    SamplerOutput,
    SamplingMetadata,
    apply_grammar_bitmask,
    fused_argmax,
    to_device,
    to_token_logprobs,
)
from pagellm.model_executor.loader import load_model
from pagellm.worker.input_batch import InputBatch, StepInputs
from pagellm.worker.mm_embeds import make_embedder
from pagellm.worker.speculation import VERIFY_GRAPH_MAX_BATCH, PaddedVerify, Speculator

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
    and builds the ModelRunnerOutput (token logprobs too, which read the device). It reads nothing of the
    runner's state, so another thread may call it while the runner launches the next step."""

    def __init__(self, req_ids: Optional[list[str]] = None, sampler_output: Optional[SamplerOutput] = None,
                 num_logprobs: Optional[list[Optional[int]]] = None,
                 prompt_logprobs: Optional[dict[str, PromptLogprobs]] = None) -> None:
        self._req_ids = req_ids or []
        self._sampler_output = sampler_output
        self._num_logprobs = num_logprobs
        self._prompt_logprobs = prompt_logprobs or {}
        self._event: Optional[torch.cuda.Event] = None
        self._host: Optional[torch.Tensor] = None
        self._ready: Optional[ModelRunnerOutput] = None  # a step whose answer was built already (verify steps)
        # Speculative decoding: request id -> position of its first new token (the runner proposes from there).
        self.token_starts: dict[str, int] = {}
        if sampler_output is not None:
            ids = sampler_output.sampled_token_ids
            if ids.device.type == "cuda":
                self._host = torch.empty(ids.shape, dtype=ids.dtype, pin_memory=True)
                self._host.copy_(ids, non_blocking=True)
                self._event = torch.cuda.Event()
                self._event.record()
            else:
                self._host = ids

    @classmethod
    def ready(cls, out: ModelRunnerOutput) -> "PendingOutput":
        """A step whose answer is built already."""
        pending = cls()
        pending._ready = out
        return pending

    def result(self) -> ModelRunnerOutput:
        if self._ready is not None:
            if self._prompt_logprobs:
                self._ready.prompt_logprobs = self._prompt_logprobs
            return self._ready
        out = ModelRunnerOutput(prompt_logprobs=self._prompt_logprobs)
        so = self._sampler_output
        if so is None:
            return out
        if self._event is not None:
            self._event.synchronize()
        tokens = self._host.tolist()
        out.req_ids = self._req_ids
        out.sampled_token_ids = [[t] for t in tokens]
        if so.logprobs is not None:
            out.logprobs = [None if k is None else [to_token_logprobs(so, row, k)]
                            for row, k in enumerate(self._num_logprobs)]
        return out


class ModelRunner:
    def __init__(self, config: EngineConfig, device: torch.device) -> None:
        self.config = config
        self.model_config = config.model_config
        self.device = device
        self.dtype = config.model_config.dtype
        # What K/V are stored in: the model's dtype, or float8 e4m3 (kv_cache_dtype="fp8": half the bytes of bf16).
        self.kv_cache_dtype = resolve_kv_cache_dtype(config.cache_config.kv_cache_dtype, self.dtype)
        fp8_kv.check_device_supports(self.kv_cache_dtype, device)
        self.block_size = config.cache_config.block_size
        self.model: Optional[torch.nn.Module] = None
        self.lora: Any = None  # LoRAManager with enable_lora (set in load_model)
        self.mm: Any = None  # MultiModalEmbedder of a vision model (set in load_model)
        self.kv_caches: list[torch.Tensor] = []
        self.sampler = Sampler()
        # The last stage computes logits; its tensor-parallel rank 0 (the driver) samples and answers.
        self.computes_logits = get_pp_group().is_last_rank
        self.is_driver = self.computes_logits and get_tp_group().is_first_rank
        # The KV cache of this rank: its pipeline stage's layers, its tensor-parallel share of the KV heads
        # (the whole model's on a single device).
        self.num_cache_layers, self.num_cache_kv_heads = local_kv_cache_dims(self.model_config.num_layers,
                                                                             self.model_config.num_kv_heads)
        sc = config.scheduler_config
        self.max_model_len = config.model_config.max_model_len
        self.max_blocks_per_seq = -(-self.max_model_len // self.block_size)
        self.batch = InputBatch(sc.max_num_seqs, self.max_model_len, self.block_size, device,
                                keep_sampling_state=self.is_driver)
        self.buffers: Optional[StepBuffers] = None
        if device.type == "cuda":
            self.buffers = StepBuffers(max(sc.max_num_batched_tokens, sc.max_num_seqs), sc.max_num_seqs,
                                       self.max_blocks_per_seq, device)
        # A pipeline stage (worker/pipeline.py) captures its own layers; the exchange with its neighbours stays
        # outside the graphs.
        self.pipelined = config.parallel_config.pipeline_parallel_size > 1
        self.use_graphs = device.type == "cuda" and not config.model_config.enforce_eager
        # batch size -> (graph, logits it writes [bs, vocab]; on a pipeline stage before the last, the [2, bs, H]
        # activations it sends)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.graph_sizes: list[int] = graph_batch_sizes(sc.max_num_seqs) if self.use_graphs else []
        # Speculative decoding: drafts after a step, verified in a later one (worker/speculation.py); verify
        # steps of up to VERIFY_GRAPH_MAX_BATCH requests replay a graph of their padded shape.
        spec = config.speculative_config
        self.spec = Speculator(self, spec, sc.max_num_seqs) if spec is not None else None
        self.verify_graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.verify_graph_sizes: list[int] = []
        if self.spec is not None and self.use_graphs and not self.pipelined:
            q = self.spec.query_len
            self.verify_graph_sizes = [bs for bs in self.graph_sizes
                                       if bs <= VERIFY_GRAPH_MAX_BATCH and bs * q <= self.buffers.max_tokens]
        # Lay verify steps out padded even without graphs (tests check the layout on the CPU this way).
        self.pad_verify_steps = bool(self.verify_graph_sizes)

    # ---- set-up -----------------------------------------------------------------------------------------
    def load_model(self) -> None:
        self.model = load_model(self.model_config, self.device)
        self.mm = make_embedder(self.model)  # a vision model: images encoded into inputs_embeds (mm_embeds.py)
        lc = self.config.lora_config
        if lc is not None:  # before memory profiling: the adapter slots are part of the weights' memory
            from pagellm.lora.manager import LoRAManager

            sc = self.config.scheduler_config
            self.lora = LoRAManager(self.model, lc.max_loras, lc.max_lora_rank, self.model_config.num_layers,
                                    max(sc.max_num_batched_tokens, sc.max_num_seqs), self.device, self.dtype)
        if self.spec is not None:
            self.spec.load()  # a draft model, if any

    def release(self) -> None:
        """Drop the model, KV cache, graphs and buffers; the runner cannot step afterwards."""
        self.graphs.clear()
        self.verify_graphs.clear()
        self.kv_caches = []
        if self.spec is not None:
            self.spec.release()
        self.model = None
        self.buffers = None

    def kv_cache_bytes_per_block(self) -> int:
        mc = self.model_config
        elem = torch.empty((), dtype=self.kv_cache_dtype).element_size()
        own = 2 * self.num_cache_layers * self.block_size * self.num_cache_kv_heads * mc.head_dim * elem
        return own + (self.spec.kv_bytes_per_block() if self.spec is not None else 0)  # a draft model's cache

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self._allocate_kv_cache(num_blocks)
        if self.spec is not None:
            self.spec.allocate(num_blocks)  # a draft model's cache, on the same block ids
        if self.use_graphs:
            self.capture_graphs()

    def _allocate_kv_cache(self, num_blocks: int) -> None:
        mc = self.model_config
        shape = (2, num_blocks, self.block_size, self.num_cache_kv_heads, mc.head_dim)
        self.kv_caches = [torch.zeros(shape, dtype=self.kv_cache_dtype, device=self.device)
                          for _ in range(self.num_cache_layers)]

    def graph_memory_estimate(self) -> int:
        """Bytes the decode graphs' private memory pool will hold (activations of the largest graph: logits in
        the model dtype and float32, the MLP's widest tensors, split-KV partials), with a margin. The worker
        leaves this much out of the KV cache."""
        if not self.use_graphs:
            return 0
        arch = self.model_config.arch
        elem = torch.empty((), dtype=self.dtype).element_size()
        bs = max([max(self.graph_sizes)] + [b * self.spec.query_len for b in self.verify_graph_sizes])
        per_row = (arch.vocab_size * (elem + 4) + 3 * arch.mlp_width * elem * 2
                   + 16 * arch.hidden_size * elem + 64 * arch.num_heads * arch.head_dim * 4)
        return bs * per_row + 256 * 2**20

    def _fill_graph_padding(self, n: int, bs: int, q: int = 1) -> None:
        """Requests n..bs of a graph batch of q tokens each: no token to write (slot -1), an empty context
        (seq_len 0)."""
        b = self.buffers
        b.ids_np[n * q : bs * q] = 0
        b.pos_np[n * q : bs * q] = 0
        b.slot_np[n * q : bs * q] = -1
        b.qsl_np[: bs + 1] = np.arange(bs + 1, dtype=np.int32) * q
        b.seq_np[n:bs] = 0

    def _graph_metadata(self, bs: int, q: int = 1) -> AttentionMetadata:
        """A graph batch: bs decodes (q == 1), or bs padded verify steps of q tokens each (the attention's
        prefill path, whose launch reads only the token and request counts)."""
        b = self.buffers
        return AttentionMetadata(
            num_actual_tokens=bs * q,
            query_start_loc=b.query_start_loc[: bs + 1],
            seq_lens=b.seq_lens[:bs],
            block_tables=b.block_tables[:bs],
            slot_mapping=b.slot_mapping[: bs * q],
            max_query_len=q,
            max_seq_len=self.max_model_len,  # fixed at capture: the split-KV choice must not change per step
            num_decodes=bs if q == 1 else 0,
            block_size=self.block_size,
            # Host copies as the buffers hold them now (all padding at capture). The Triton backend reads only
            # their length; a CPU backend run in place of a graph (tests) reads the step's real lengths.
            query_start_loc_cpu=list(range(0, bs * q + 1, q)),
            seq_lens_cpu=b.seq_np[:bs].tolist(),
        )

    def _graph_forward(self, bs: int, q: int = 1) -> torch.Tensor:
        """What a graph captures: the logits; on a pipeline stage before the last, the activations it sends."""
        b = self.buffers
        args = (b.input_ids[: bs * q], b.positions[: bs * q], self.kv_caches, self._graph_metadata(bs, q))
        if self.pipelined:
            out = self.model.graph_forward(*args)
            return self.model.compute_logits(out) if self.computes_logits else out
        return self.model.compute_logits(self.model(*args))

    @torch.inference_mode()
    def capture_graphs(self) -> None:
        """One CUDA graph per decode batch size, largest first, all in one memory pool (a smaller graph reuses
        the larger one's activation memory). Inputs are all padding (empty contexts), so capture writes
        nothing into the KV cache."""
        import time

        start = time.perf_counter()
        before = torch.cuda.memory_reserved(self.device)
        pool = None
        q_verify = self.spec.query_len if self.spec is not None else 0
        shapes = [(bs, 1) for bs in self.graph_sizes] + [(bs, q_verify) for bs in self.verify_graph_sizes]
        for bs, q in sorted(shapes, key=lambda shape: shape[0] * shape[1], reverse=True):
            if self.pipelined:
                self.model.prepare_graph_input(bs)
            self._fill_graph_padding(0, bs, q)
            self.buffers.upload(bs * q, bs, 0)
            self._graph_forward(bs, q)  # warm-up: compiles the Triton kernels of this shape outside the capture
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = self._graph_forward(bs, q)
            pool = graph.pool()
            (self.graphs if q == 1 else self.verify_graphs)[bs] = (graph, logits)
        if self.computes_logits and (argmax := fused_argmax(logits)) is not None:
            argmax(logits)  # compiles the greedy argmax here, not in the first greedy request
        torch.cuda.synchronize(self.device)
        logger.info("captured %d decode CUDA graphs (batch sizes %d..%d) and %d for verify steps in %.1fs, %.2f GiB",
                    len(self.graphs), min(self.graph_sizes), max(self.graph_sizes), len(self.verify_graphs),
                    time.perf_counter() - start, (torch.cuda.memory_reserved(self.device) - before) / 2**30)

    @torch.inference_mode()
    def profile_run(self) -> int:
        """One forward pass at the largest batch the scheduler may send, to measure peak activation memory.
        Returns the bytes of the temporary KV cache it used (part of the peak, not of the activations)."""
        from pagellm.sampling_params import SamplingParams

        sc = self.config.scheduler_config
        num_tokens = min(sc.max_num_batched_tokens, sc.max_num_seqs * self.model_config.max_model_len)
        num_reqs = max(1, min(sc.max_num_seqs, num_tokens))
        per_req = [num_tokens // num_reqs + (1 if i < num_tokens % num_reqs else 0) for i in range(num_reqs)]
        blocks_per_req = [(n + self.block_size - 1) // self.block_size for n in per_req]
        saved = self.kv_caches
        self._allocate_kv_cache(sum(blocks_per_req))
        params = SamplingParams(max_tokens=1)
        reqs, next_block = [], 0
        for i, (n, nb) in enumerate(zip(per_req, blocks_per_req)):
            reqs.append(NewRequestData(f"profile-{i}", [0] * n, params, list(range(next_block, next_block + nb)),
                                       num_computed_tokens=0, num_scheduled_tokens=n))
            next_block += nb
        self.execute_model_async(SchedulerOutput(new_reqs=reqs, num_batched_tokens=num_tokens)).result()
        for r in reqs:
            self.batch.remove(r.req_id)
        profile_kv = sum(c.numel() * c.element_size() for c in self.kv_caches)
        self.kv_caches = saved
        return profile_kv

    # ---- one step ---------------------------------------------------------------------------------------
    def _graph_size(self, step: StepInputs) -> Optional[int]:
        """The captured batch size this step replays, or None to run eagerly."""
        if not self.graphs or step.num_reqs > self.graph_sizes[-1] or not step.decodes_only:
            return None
        return next(bs for bs in self.graph_sizes if bs >= step.num_reqs)

    def _upload_inputs(self, step: StepInputs, pad_to: Optional[int] = None
                       ) -> tuple[torch.Tensor, torch.Tensor, Optional[AttentionMetadata]]:
        """The step's flat inputs on the device. With pad_to (a graph batch size) they only go into the buffers,
        padded; the graph reads them there."""
        n, total = step.num_reqs, step.num_tokens
        buf = self.buffers
        if buf is None:
            dev = self.device
            ids_t = torch.from_numpy(step.input_ids).to(dev)
            pos_t = torch.from_numpy(step.positions).to(dev)
            qsl_t = torch.from_numpy(step.query_start_loc).to(dev, torch.int32)
            seq_t = torch.from_numpy(step.seq_lens).to(dev, torch.int32)
            bt_t = torch.from_numpy(step.block_tables).to(dev, torch.int32)
            slot_t = torch.from_numpy(step.slot_mapping).to(dev)
        else:
            buf.wait_host_free()
            cols = step.block_tables.shape[1]
            buf.ids_np[:total] = step.input_ids
            buf.pos_np[:total] = step.positions
            buf.slot_np[:total] = step.slot_mapping
            buf.qsl_np[: n + 1] = step.query_start_loc
            buf.seq_np[:n] = step.seq_lens
            buf.bt_np[:n, :cols] = step.block_tables
            if pad_to is not None:  # a graph replays: it was captured with its own views of these buffers
                self._fill_graph_padding(n, pad_to)
                buf.upload(pad_to, pad_to, cols)
                return buf.input_ids[:pad_to], buf.positions[:pad_to], None
            buf.upload(total, n, cols)
            ids_t, pos_t = buf.input_ids[:total], buf.positions[:total]
            qsl_t, seq_t, bt_t, slot_t = (buf.query_start_loc[: n + 1], buf.seq_lens[:n], buf.block_tables[:n],
                                          buf.slot_mapping[:total])
        q_lens = step.q_lens
        meta = AttentionMetadata(
            num_actual_tokens=total,
            query_start_loc=qsl_t,
            seq_lens=seq_t,
            block_tables=bt_t,
            slot_mapping=slot_t,
            max_query_len=int(q_lens.max()),
            max_seq_len=int(step.seq_lens.max()),
            num_decodes=int(np.count_nonzero(q_lens == 1)),
            block_size=self.block_size,
            query_start_loc_cpu=step.query_start_loc.tolist(),
            seq_lens_cpu=step.seq_lens.tolist(),
        )
        return ids_t, pos_t, meta

    def _fill_from_device(self, input_ids: torch.Tensor, step: StepInputs, dst: Optional[np.ndarray] = None) -> None:
        """Decodes whose input token the message did not carry (scheduled before it came back): their rows' last
        sampled tokens, still on the device. They are one-token requests, which come first, so a request's
        token index is its request index (`dst` maps token indices to a padded layout's)."""
        idx = step.from_device
        if not idx.size:
            return
        dst = to_device(torch.from_numpy(idx if dst is None else dst[idx]), torch.int64, self.device)
        rows = to_device(torch.from_numpy(step.rows[idx]), torch.int64, self.device)
        input_ids.index_copy_(0, dst, self.batch.last_token.index_select(0, rows))

    def execute_model(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        return self.collect(self.execute_model_async(sched))

    def collect(self, pending: "PendingOutput") -> ModelRunnerOutput:
        """A launched step's answer (waits for the device), with the drafts proposed after it."""
        out = pending.result()
        if self.spec is not None and out.req_ids:
            out.spec_token_ids = self.spec.propose(out, pending.token_starts)
        return out

    @torch.inference_mode()
    def execute_model_async(self, sched: SchedulerOutput) -> PendingOutput:
        """Launch the step; nothing here waits for the device (unless a sampling option needs a host-side
        decision, like top-p's fallback check)."""
        if self.lora is not None:
            self.lora.update(sched)
        if self.mm is not None:
            self.mm.apply(sched)
        step = self.batch.apply(sched)
        if step.num_reqs == 0:
            return PendingOutput()
        pending = self._launch(step, sched)
        if self.spec is not None:
            pending.token_starts = self.spec.token_starts(step)
        return pending

    def _launch(self, step: StepInputs, sched: SchedulerOutput) -> PendingOutput:
        images = self.mm.plan(step) if self.mm is not None else []  # image rows: an eager step
        if self.pad_verify_steps and step.num_spec.any() and not images:
            padded = self.spec.padded_layout(step)
            if padded is not None and (not self.verify_graphs or step.num_reqs <= self.verify_graph_sizes[-1]):
                return self._launch_padded_verify(step, sched, padded)
        graph_bs = None if images else self._graph_size(step)
        if self.lora is not None:
            self.lora.set_step(step.req_ids, step.q_lens, graph_bs)
        input_ids, positions, meta = self._upload_inputs(step, pad_to=graph_bs)
        self._fill_from_device(input_ids, step)
        sample = step.sample
        if graph_bs is not None:  # decodes only: every row samples, none has prompt logprobs left
            graph, graph_logits = self.graphs[graph_bs]
            if self.pipelined:
                self.model.recv_for_graph(graph_bs)
            graph.replay()
            if self.pipelined and not self.computes_logits:
                self.model.send(graph_logits)  # this stage's activations, not logits
                return PendingOutput()
            if not sample.size or not self.computes_logits:
                return PendingOutput()
            logits = graph_logits[: step.num_reqs]
            if sample.size != step.num_reqs:
                logits = logits[to_device(torch.from_numpy(sample), torch.int64, self.device)]
            return self._sample(step, logits, sched)
        embeds = self.mm.inputs_embeds(images, input_ids) if images else None  # image rows in the embeddings
        hidden = (self.model(input_ids, positions, self.kv_caches, meta) if embeds is None
                  else self.model(None, self.mm.rope_positions(positions), self.kv_caches, meta, inputs_embeds=embeds))
        if hidden is None:  # a pipeline stage before the last: its output went to the next stage
            return PendingOutput()
        pending = PendingOutput()
        if sample.size and step.num_spec[sample].any():
            pending = self.spec.sample_and_verify(step, lambda idx: self.model.compute_logits(
                hidden[to_device(torch.from_numpy(idx), torch.int64, self.device)]), sched)
        elif sample.size:
            last = to_device(torch.from_numpy(step.query_start_loc[1:][sample] - 1), torch.int64, self.device)
            pending = self._sample(step, self.model.compute_logits(hidden[last]), sched)
        prompt_logprobs = self._prompt_logprobs(step, hidden)
        if prompt_logprobs:
            pending._prompt_logprobs = prompt_logprobs
        return pending

    def _launch_padded_verify(self, step: StepInputs, sched: SchedulerOutput, padded: PaddedVerify) -> PendingOutput:
        """A step of decodes and verifies in the uniform shape of worker/speculation.py: a captured graph of the
        next batch size up replays it (on the CPU, in tests, the same layout runs eagerly)."""
        n, q = step.num_reqs, padded.query_len
        cols = step.block_tables.shape[1]
        if self.verify_graphs:
            bs = next(b for b in self.verify_graph_sizes if b >= n)
            buf = self.buffers
            buf.wait_host_free()
            buf.ids_np[: n * q] = padded.input_ids
            buf.pos_np[: n * q] = padded.positions
            buf.slot_np[: n * q] = padded.slot_mapping
            buf.seq_np[:n] = step.seq_lens
            buf.bt_np[:n, :cols] = step.block_tables
            self._fill_graph_padding(n, bs, q)
            buf.upload(bs * q, bs, cols)
            self._fill_from_device(buf.input_ids[: bs * q], step, padded.dst)
            graph, logits = self.verify_graphs[bs]
            graph.replay()
        else:
            dev = self.device
            ids = torch.from_numpy(padded.input_ids).to(dev)
            self._fill_from_device(ids, step, padded.dst)
            qsl = np.arange(n + 1) * q
            meta = AttentionMetadata(
                num_actual_tokens=n * q, query_start_loc=torch.from_numpy(qsl).to(dev, torch.int32),
                seq_lens=torch.from_numpy(step.seq_lens).to(dev, torch.int32),
                block_tables=torch.from_numpy(step.block_tables).to(dev, torch.int32),
                slot_mapping=torch.from_numpy(padded.slot_mapping).to(dev), max_query_len=q,
                max_seq_len=int(step.seq_lens.max()), num_decodes=0, block_size=self.block_size,
                query_start_loc_cpu=qsl.tolist(), seq_lens_cpu=step.seq_lens.tolist())
            logits = self.model.compute_logits(self.model(ids, torch.from_numpy(padded.positions).to(dev),
                                                          self.kv_caches, meta))
        dst = padded.dst
        return self.spec.sample_and_verify(
            step, lambda idx: logits[to_device(torch.from_numpy(dst[idx]), torch.int64, self.device)], sched)

    def _sample(self, step: StepInputs, logits: torch.Tensor, sched: SchedulerOutput) -> PendingOutput:
        """The driver samples the rows that sample; every rank of the last stage keeps the tokens on the device
        as the rows' last tokens (the other ranks receive them by a broadcast)."""
        batch = self.batch
        rows = step.rows[step.sample]
        rows_t = to_device(torch.from_numpy(rows), torch.int64, self.device)
        tp = get_tp_group()
        if not self.is_driver:
            sampled = torch.empty(len(rows), dtype=torch.int64, device=self.device)
            batch.record_sampled(rows_t, tp.broadcast(sampled))
            return PendingOutput()
        req_ids = [step.req_ids[i] for i in step.sample.tolist()]
        if sched.grammar is not None:  # structured output
            apply_grammar_bitmask(logits, self._grammar_rows(sched, req_ids))
        sampling = batch.sampling.take(rows)
        penalties = sampling.uses_penalties()
        needs_tokens = penalties.any() or bool(sampling.min_tokens)
        prompts = [batch.prompt_token_ids(r) if p else () for r, p in zip(rows.tolist(), penalties.tolist())] \
            if needs_tokens else [()] * len(rows)
        outputs = [batch.output_token_ids[r] for r in rows.tolist()] if needs_tokens else [()] * len(rows)
        generators = {i: batch.generators[r] for i, r in enumerate(rows.tolist()) if r in batch.generators}
        metadata = SamplingMetadata.from_rows(sampling, prompts, outputs, generators, logits.shape[-1], self.device)
        result = self.sampler(logits, metadata)
        batch.record_sampled(rows_t, tp.broadcast(result.sampled_token_ids))
        return PendingOutput(req_ids, result, metadata.num_logprobs)

    @staticmethod
    def _grammar_rows(sched: SchedulerOutput, req_ids: list[str]) -> list[Optional[np.ndarray]]:
        """Each sampling request's row of the step's grammar bitmask (None: no grammar)."""
        g = sched.grammar
        words = np.frombuffer(g.words, dtype=np.int32).reshape(len(g.req_ids), g.width)
        row_of = {rid: i for i, rid in enumerate(g.req_ids)}
        return [words[row_of[rid]] if rid in row_of else None for rid in req_ids]

    def _prompt_logprobs(self, step: StepInputs, hidden: torch.Tensor) -> dict[str, PromptLogprobs]:
        """Logprobs of the prompt tokens computed this step: the hidden state at p predicts token p + 1. Every
        rank of the last stage computes the logits (the vocabulary is split over them), PROMPT_LOGPROBS_CHUNK
        positions at a time (the scheduler bounds the positions of a step); the driver keeps the logprobs."""
        batch = self.batch
        result: dict[str, PromptLogprobs] = {}
        qsl = step.query_start_loc
        for i in np.flatnonzero(batch.prompt_logprobs[step.rows] >= 0).tolist():
            row = int(step.rows[i])
            start = int(step.starts[i])
            end = min(start + int(step.q_lens[i]), int(batch.num_prompt_tokens[row]) - 1)
            if end <= start:
                continue
            targets = torch.from_numpy(batch.token_ids[row, start + 1 : end + 1].astype(np.int64))
            k = int(batch.prompt_logprobs[row])
            parts = []
            for a in range(0, end - start, PROMPT_LOGPROBS_CHUNK):
                b = min(end - start, a + PROMPT_LOGPROBS_CHUNK)
                logits = self.model.compute_logits(hidden[qsl[i] + a : qsl[i] + b])
                if self.is_driver:
                    parts.append(prompt_logprobs_tensors(logits, targets[a:b], k))
            if parts:
                result[step.req_ids[i]] = to_prompt_logprobs(parts, first_position=start + 1)
        return result

