"""`pagellm bench latency`: how fast one small batch (by default one request) decodes.

Batch-1 decode speed is bound by reading all the weights once per token; this measures how close the engine
gets: B random prompts of --input-len tokens each generate exactly --output-len tokens, a few times after a
warm-up. It reports the mean latency of the whole batch and the output tokens/s of each request (the decode
rate a single user sees), on a workload model's shape with dummy weights or on any model.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from typing import Any

import torch

from pagellm.bench.runs import profile_kernels
from pagellm.bench.workloads import WORKLOADS, write_dummy_model
from pagellm.engine_args import EngineArgs


def add_latency_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workload", default=None, choices=sorted(WORKLOADS),
                        help="take the model shape of this workload (dummy weights) unless --model is given")
    parser.add_argument("--batch-size", type=int, default=1, help="requests decoded together (default: 1)")
    parser.add_argument("--input-len", type=int, default=128, help="prompt tokens per request (default: 128)")
    parser.add_argument("--output-len", type=int, default=256, help="new tokens per request (default: 256)")
    parser.add_argument("--num-iters", type=int, default=3, help="timed runs (default: 3)")
    parser.add_argument("--output-json", default=None, help="write the results here")
    parser.add_argument("--profile", action="store_true", help="after the timed runs, one more under torch.profiler: "
                        "the GPU kernels that took the most time, in microseconds per output token")
    EngineArgs.add_cli_args(parser)


def run_latency_bench(args: argparse.Namespace) -> dict[str, Any]:
    from pagellm.entrypoints.llm import LLM
    from pagellm.model_executor.loader.source import load_hf_config, resolve_model_source
    from pagellm.sampling_params import SamplingParams

    for name in ("batch_size", "input_len", "output_len", "num_iters"):
        if getattr(args, name) < 1:
            raise ValueError(f"{name} must be a positive integer, got {getattr(args, name)}")
    engine_args = EngineArgs.from_cli_args(args)
    kwargs = dict(vars(engine_args))
    tmp = None
    if args.workload is not None and engine_args.model is None:
        wl = WORKLOADS[args.workload]
        if wl.shape is not None:
            tmp = tempfile.TemporaryDirectory(prefix="pagellm-bench-")
            kwargs.update(model=write_dummy_model(wl.shape, tmp.name), load_format="dummy")
            if engine_args.dtype == "auto" and wl.dtype:
                kwargs["dtype"] = wl.dtype
    kwargs["skip_tokenizer_init"] = True
    if kwargs.get("max_model_len") is None:
        kwargs["max_model_len"] = args.input_len + args.output_len
    vocab = load_hf_config(resolve_model_source(kwargs["model"])).vocab_size
    rng = random.Random(0)
    prompts = [{"prompt_token_ids": [rng.randrange(1000, vocab - 1000) for _ in range(args.input_len)]}
               for _ in range(args.batch_size)]
    params = SamplingParams(max_tokens=args.output_len, ignore_eos=True, temperature=0.0, detokenize=False)

    llm = LLM(**kwargs)
    # The warm-up samples as the timed runs do (greedy), so that no kernel is first compiled inside them.
    llm.generate(prompts, SamplingParams(max_tokens=8, ignore_eos=True, temperature=0.0, detokenize=False),
                 use_tqdm=False)
    llm.llm_engine.core.scheduler.reset_prefix_cache()
    times = []
    for _ in range(args.num_iters):
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        times.append(time.perf_counter() - start)
        llm.llm_engine.core.scheduler.reset_prefix_cache()  # each run prefills again
        assert all(len(o.outputs[0].token_ids) == args.output_len for o in outs)
    latency = statistics.mean(times)
    on_cuda = llm.llm_engine.config.device_config.device.startswith("cuda")
    result = {
        "model": args.workload or kwargs["model"],
        "device": torch.cuda.get_device_name() if on_cuda else f"cpu ({os.cpu_count()} cores)",
        "torch": torch.__version__,
        "dtype": str(llm.llm_engine.config.model_config.dtype).replace("torch.", ""),
        "quantization": llm.llm_engine.config.model_config.quantization,
        "cuda_graphs": on_cuda and not engine_args.enforce_eager,
        "batch_size": args.batch_size,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "latencies_s": times,
        "mean_latency_s": latency,
        "output_tokens_per_s_per_request": args.output_len / latency,
        "output_tokens_per_s": args.batch_size * args.output_len / latency,
    }
    if llm.llm_engine.config.speculative_config is not None:
        from pagellm.bench.throughput import spec_decode_summary

        result["spec_decode"] = spec_decode_summary(llm.llm_engine.core.scheduler)
    if args.profile and on_cuda:
        result["kernels_us_per_token"] = profile_kernels(lambda: llm.generate(prompts, params, use_tqdm=False),
                                                         args.batch_size * args.output_len)
    if tmp is not None:
        tmp.cleanup()
    print(f"\nlatency: batch {args.batch_size}, {args.input_len} in / {args.output_len} out, {result['device']}, "
          f"{result['dtype']}{', ' + result['quantization'] if result['quantization'] else ''}, CUDA graphs {'on' if result['cuda_graphs'] else 'off'}")
    print(f"mean {latency:.3f} s over {args.num_iters} runs ({', '.join(f'{t:.3f}' for t in times)}); "
          f"{result['output_tokens_per_s_per_request']:.1f} output tokens/s per request, "
          f"{result['output_tokens_per_s']:.1f} in all")
    if "spec_decode" in result:
        sd = result["spec_decode"]
        print(f"speculative decoding: {sd['num_drafts']} drafts, acceptance {sd['acceptance']:.3f}, mean accepted "
              f"length {sd['mean_accepted_length']:.2f}")
    if args.output_json:
        os.makedirs(os.path.dirname(os.path.abspath(args.output_json)), exist_ok=True)
        with open(args.output_json, "w") as f:
            json.dump(result, f, indent=2)
    return result
