"""What a verify step costs: the forward pass of B requests with k drafts each (k + 1 query tokens, logits at
every position) against a one-token decode, on the model runner of a real engine (dummy weights).

Issue 14 asks for this table at batch 1, 8 and 64 for k = 1..8 on the Llama-3.1-8B shape: it says where
speculation can pay (a verify that costs about one decode makes every accepted draft nearly free) and where it
cannot (a compute-bound batch pays for every draft position). The decode is timed both ways the engine runs it:
replaying its CUDA graph, and eagerly; so is the verify step (the engine replays a graph for verify steps of
up to 64 requests, and runs larger ones eagerly). Each figure is the median of --iters runs,
timed with CUDA events around the forward and the logits only (no sampling, no host scheduling).

    python benchmarks/spec_verify_cost.py [--context 1024] [--batch-sizes 1 8 64] [--ks 1 2 4 8] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile

import numpy as np
import torch

from pagellm import LLM
from pagellm.bench.workloads import LLAMA_8B, write_dummy_model
from pagellm.worker.input_batch import StepInputs


def make_step(batch: int, q_len: int, context: int, block_size: int, vocab: int) -> StepInputs:
    """B requests, each with `context` tokens already in its own KV blocks and q_len new tokens to compute."""
    rng = np.random.default_rng(0)
    per_req = -(-(context + q_len) // block_size)
    starts = np.full(batch, context, dtype=np.int64)
    q_lens = np.full(batch, q_len, dtype=np.int64)
    qsl = np.zeros(batch + 1, dtype=np.int64)
    np.cumsum(q_lens, out=qsl[1:])
    total = int(qsl[-1])
    tables = np.arange(batch * per_req, dtype=np.int32).reshape(batch, per_req)
    req = np.repeat(np.arange(batch), q_len)
    positions = starts[req] + (np.arange(total) - qsl[:-1][req])
    slots = tables[req, positions // block_size].astype(np.int64) * block_size + positions % block_size
    return StepInputs([f"r{i}" for i in range(batch)], np.arange(batch, dtype=np.int64), starts, q_lens, qsl,
                      rng.integers(1000, vocab - 1000, total).astype(np.int64), positions, slots, tables,
                      np.zeros(0, dtype=np.int64), np.arange(batch, dtype=np.int64),
                      np.full(batch, q_len - 1, dtype=np.int64))


def timed(fn, iters: int) -> float:
    """Median milliseconds of fn() over iters runs (after two warm-ups), by CUDA events."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=1024, help="tokens already in each request's KV cache")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6, 7, 8])
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--out", default=None, help="write the table as JSON here")
    args = parser.parse_args()
    folder = write_dummy_model(LLAMA_8B, tempfile.mkdtemp())
    max_bs = max(args.batch_sizes)
    llm = LLM(folder, load_format="dummy", dtype="bfloat16", skip_tokenizer_init=True, max_model_len=4096,
              max_num_seqs=max_bs, max_num_batched_tokens=max(8192, max_bs * (max(args.ks) + 1)))
    runner = llm.llm_engine.core.executor.worker.runner
    bs_blocks = runner.block_size
    need = max_bs * -(-(args.context + max(args.ks) + 1) // bs_blocks)
    if need > runner.kv_caches[0].shape[1]:
        raise SystemExit(f"the KV cache holds {runner.kv_caches[0].shape[1]} blocks; this table needs {need}")
    vocab = LLAMA_8B["vocab_size"]
    rows = []
    pool = [None]  # one memory pool for every graph captured here
    with torch.inference_mode():
        for batch in args.batch_sizes:
            def eager(q_len: int):
                step = make_step(batch, q_len, args.context, bs_blocks, vocab)

                def run():
                    ids, pos, meta = runner._upload_inputs(step)
                    runner.model.compute_logits(runner.model(ids, pos, runner.kv_caches, meta))
                return run

            decode_step = make_step(batch, 1, args.context, bs_blocks, vocab)
            graph_bs = runner._graph_size(decode_step)

            def graph():
                runner._upload_inputs(decode_step, pad_to=graph_bs)
                runner.graphs[graph_bs][0].replay()

            def in_graph(q_len: int):
                """The step captured in a CUDA graph, as the engine replays verify steps (its inputs stay in the
                runner's buffers)."""
                step = make_step(batch, q_len, args.context, bs_blocks, vocab)
                buf, total, cols = runner.buffers, step.num_tokens, step.block_tables.shape[1]
                buf.ids_np[:total], buf.pos_np[:total], buf.slot_np[:total] = (step.input_ids, step.positions,
                                                                               step.slot_mapping)
                buf.qsl_np[: batch + 1], buf.seq_np[:batch] = step.query_start_loc, step.seq_lens
                buf.bt_np[:batch, :cols] = step.block_tables
                buf.upload(total, batch, cols)
                runner._graph_forward(batch, q_len)
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool[0]):
                    runner._graph_forward(batch, q_len)
                pool[0] = graph.pool()
                return graph.replay

            decode_eager = timed(eager(1), args.iters)
            decode_graph = timed(graph, args.iters) if graph_bs is not None else None
            row = {"batch": batch, "decode_eager_ms": decode_eager, "decode_graph_ms": decode_graph,
                   "verify_eager_ms": {}, "verify_graph_ms": {}}
            for k in args.ks:
                row["verify_eager_ms"][k] = timed(eager(k + 1), args.iters)
                row["verify_graph_ms"][k] = timed(in_graph(k + 1), args.iters)
            rows.append(row)
            base = decode_graph or decode_eager
            print(f"batch {batch:>3}: decode {decode_eager:6.2f} ms eager, "
                  f"{decode_graph if decode_graph is not None else float('nan'):6.2f} ms graph", flush=True)
            for k in args.ks:
                ve, vg = row["verify_eager_ms"][k], row["verify_graph_ms"][k]
                print(f"batch {batch:>3} k={k}: verify {vg:6.2f} ms graph ({vg / base:.2f}x the decode graph), "
                      f"{ve:6.2f} ms eager", flush=True)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "shape": "Llama-3.1-8B (dummy bf16)",
              "context": args.context, "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
