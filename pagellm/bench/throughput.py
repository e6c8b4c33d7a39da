"""`pagellm bench throughput`: a fixed seeded workload through LLM.generate, and the transformers peer.

The peer (static-batch, left-padded `generate()`) runs in the same process on the same machine right after
us, so the ratio holds on a noisy machine. Workloads are those of shared/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import tempfile
import time
from typing import Any, Optional

import torch

from pagellm.bench.runs import free_device_memory, peer_result, profile_kernels, time_peer_generate, timed_generate
from pagellm.bench.workloads import WORKLOADS, BenchRequest, Workload, make_requests, write_dummy_model
from pagellm.engine_args import EngineArgs


def add_throughput_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workload", default="smollm-cpu", choices=sorted(WORKLOADS) + ["custom"],
                        help="a workload of shared/BENCHMARKS.md, or custom (use --model/--num-prompts/lengths)")
    parser.add_argument("--num-prompts", type=int, default=None, help="override the workload's request count")
    parser.add_argument("--input-len", type=int, nargs=2, default=None, metavar=("MIN", "MAX"),
                        help="uniform input length range (custom workload)")
    parser.add_argument("--output-len", type=int, nargs=2, default=None, metavar=("MIN", "MAX"),
                        help="uniform output length range (custom workload)")
    parser.add_argument("--peer", default="hf", choices=["hf", "none"],
                        help="hf: also time transformers' static-batch generate() on the same requests")
    parser.add_argument("--peer-batch-size", type=int, default=None,
                        help="batch size of the transformers peer (default: 16 on CPU, 64 on CUDA)")
    parser.add_argument("--peer-requests", type=int, default=None,
                        help="time the peer on only the first N requests (a slow peer on a long workload); its "
                        "tokens/s counts those requests' output tokens (default: all)")
    parser.add_argument("--output-json", default=None, help="write the results here")
    parser.add_argument("--structured-output", default="none", choices=["none", "json"],
                        help="json: time the workload with and without a JSON schema grammar on every request "
                        "(same engine, runs alternated; no peer) and print the ratio")
    parser.add_argument("--repeats", type=int, default=3,
                        help="alternated runs of each (--structured-output); the best of each is reported")
    parser.add_argument("--lora-adapters", type=int, default=0, metavar="N",
                        help="time the workload on the base model alone and with N random LoRA adapters mixed in "
                        "(request i runs adapter i mod N; both in this run, no peer) and print the ratio")
    parser.add_argument("--lora-rank", type=int, default=16, help="rank of the --lora-adapters adapters")
    parser.add_argument("--profile", action="store_true", help="after the timed run, the workload once more under "
                        "torch.profiler (CUDA): the GPU kernels that took the most time, in microseconds per output "
                        "token")
    EngineArgs.add_cli_args(parser)


def _resolve_workload(args: argparse.Namespace) -> Workload:
    if args.workload == "custom":
        return Workload(name="custom", model=args.model, shape=None, num_requests=args.num_prompts or 64,
                        input_len=tuple(args.input_len or (128, 512)), output_len=tuple(args.output_len or (64, 256)),
                        dtype=None, load_format=args.load_format)
    wl = WORKLOADS[args.workload]
    if args.num_prompts:
        wl = Workload(**{**wl.__dict__, "num_requests": args.num_prompts})
    return wl


def run_pagellm(engine_kwargs: dict[str, Any], requests: list[BenchRequest], profile: bool = False) -> dict[str, Any]:
    from pagellm.entrypoints.llm import LLM
    from pagellm.sampling_params import SamplingParams

    llm = LLM(**engine_kwargs)
    prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in requests]
    params = [SamplingParams(max_tokens=r.output_len, ignore_eos=True, temperature=1.0, top_p=1.0,
                             detokenize=False) for r in requests]
    elapsed, _ = timed_generate(llm, prompts, params, sum(r.output_len for r in requests))
    config = llm.llm_engine.config
    result = {
        "engine": "pagellm",
        "seconds": elapsed,
        "num_blocks": config.cache_config.num_blocks,
        "kv_cache_dtype": config.cache_config.kv_cache_dtype,
        "dtype": str(config.model_config.dtype).replace("torch.", ""),
        "quantization": config.model_config.quantization,
        "model_impl": config.model_config.model_impl,
    }
    if config.speculative_config is not None:
        result["spec_decode"] = spec_decode_summary(llm.llm_engine.core.scheduler)
    if profile and torch.cuda.is_available():
        # The same work as the timed run: its prompts would otherwise come from the prefix cache.
        llm.llm_engine.core.scheduler.reset_prefix_cache()
        result["kernels_us_per_token"] = profile_kernels(lambda: llm.generate(prompts, params, use_tqdm=False),
                                                         sum(r.output_len for r in requests), top=30)
    llm.llm_engine.core.shutdown()  # the peer runs next on the same device: free ours first
    del llm
    free_device_memory()
    return result


def spec_decode_summary(scheduler: Any) -> dict[str, Any]:
    """Speculative decoding's counts since the engine started (the warm-up included): acceptance (accepted /
    draft tokens) and mean accepted length (tokens a verify step gives a request: accepted drafts + 1)."""
    drafts, draft_tokens = scheduler.spec_num_drafts, scheduler.spec_num_draft_tokens
    accepted = scheduler.spec_num_accepted_tokens
    return {"num_drafts": drafts, "num_draft_tokens": draft_tokens, "num_accepted_tokens": accepted,
            "acceptance": accepted / draft_tokens if draft_tokens else 0.0,
            "mean_accepted_length": 1 + accepted / drafts if drafts else 0.0}


# The grammar of `--structured-output json`: an object holding an array of strings, which never has to end,
# so that every one of a request's output_len tokens (ignore_eos) is sampled under an active grammar.
BENCH_SCHEMA = {"type": "object", "properties": {"notes": {"type": "array", "items": {"type": "string"}}},
                "required": ["notes"], "additionalProperties": False}


def run_structured_ab(engine_kwargs: dict[str, Any], requests: list[BenchRequest], repeats: int) -> dict[str, Any]:
    """Output tokens/s of the workload without and with a JSON schema on every request, alternated."""
    from pagellm.entrypoints.llm import LLM
    from pagellm.sampling_params import SamplingParams, StructuredOutputsParams

    llm = LLM(**{**engine_kwargs, "skip_tokenizer_init": False})
    prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in requests]
    schema = StructuredOutputsParams(json=BENCH_SCHEMA, disable_any_whitespace=False)

    def params(structured: bool) -> list[SamplingParams]:
        return [SamplingParams(max_tokens=r.output_len, ignore_eos=True, temperature=1.0, top_p=1.0, seed=i,
                               structured_outputs=schema if structured else None, detokenize=False)
                for i, r in enumerate(requests)]

    # Warm-up, including the grammar's compilation (cached by schema afterwards).
    llm.generate(prompts[:2], params(True)[:2], use_tqdm=False)
    llm.generate(prompts[:2], params(False)[:2], use_tqdm=False)
    num_out = sum(r.output_len for r in requests)
    times: dict[str, list[float]] = {"plain": [], "json": []}
    for _ in range(repeats):
        for name in ("plain", "json"):
            start = time.perf_counter()
            outputs = llm.generate(prompts, params(name == "json"), use_tqdm=False)
            times[name].append(time.perf_counter() - start)
            if sum(len(o.outputs[0].token_ids) for o in outputs) != num_out:
                raise RuntimeError("the structured run did not generate the workload's token count")
    so = llm.llm_engine.core.structured_output
    # Best of the alternated runs: on a shared machine the slower runs measure the neighbours.
    result = {name: {"seconds": min(ts), "all_seconds": ts,
                     "output_tokens_per_s": num_out / min(ts)} for name, ts in times.items()}
    result["json_over_plain"] = result["json"]["output_tokens_per_s"] / result["plain"]["output_tokens_per_s"]
    result["grammar_compile_seconds"] = so.compile_seconds if so is not None else 0.0
    result["schema"] = BENCH_SCHEMA
    del llm
    gc.collect()
    return result


def run_hf_peer(model_path: str, gguf_file: Optional[str], dtype: torch.dtype, device: str,
                requests: list[BenchRequest], batch_size: int, dummy: bool) -> dict[str, Any]:
    """transformers' generate() on static batches, left-padded, each batch run to its longest output."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if dummy:
        config = AutoConfig.from_pretrained(model_path)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:
        kwargs = {"gguf_file": gguf_file} if gguf_file else {}
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, **kwargs).to(device)
    model.eval()
    seconds = time_peer_generate(model, device, (
        ([r.prompt_token_ids for r in batch], max(r.output_len for r in batch), None)
        for batch in (requests[i : i + batch_size] for i in range(0, len(requests), batch_size))))
    del model
    gc.collect()
    return peer_result(batch_size, seconds, dtype)


def run_throughput_bench(args: argparse.Namespace) -> dict[str, Any]:
    wl = _resolve_workload(args)
    engine_args = EngineArgs.from_cli_args(args)
    device = engine_args.resolve_device()
    tmp = None
    model = engine_args.model or wl.model
    load_format = engine_args.load_format if engine_args.load_format != "auto" else wl.load_format
    if wl.shape is not None and engine_args.model is None:
        tmp = tempfile.TemporaryDirectory(prefix="pagellm-bench-")
        model = write_dummy_model(wl.shape, tmp.name)
        load_format = "dummy"
    engine_kwargs = {k: v for k, v in vars(engine_args).items()}
    engine_kwargs.update(model=model, load_format=load_format, skip_tokenizer_init=True)
    if engine_args.dtype == "auto" and wl.dtype:
        engine_kwargs["dtype"] = wl.dtype

    if wl.images:  # a vision model, one random image per request (bench/vision.py)
        from pagellm.bench.vision import run_vision_bench

        if tmp is None:
            raise ValueError(f"--workload {wl.name} builds its own model folder of its shape; drop --model")
        results = {"workload": wl.name, "model": wl.name + " shape (dummy weights)", "device": device,
                   **run_vision_bench(engine_kwargs, wl.shape, tmp.name, wl.num_requests, wl.input_len,
                                      wl.output_len, args.peer == "hf", args.peer_batch_size or 32, device)}
        tmp.cleanup()
        return _write_results(results, args.output_json)

    from pagellm.model_executor.loader.source import load_hf_config, resolve_model_source

    source = resolve_model_source(model)
    vocab = load_hf_config(source).vocab_size
    requests = make_requests(wl, vocab)
    num_in = sum(len(r.prompt_token_ids) for r in requests)
    num_out = sum(r.output_len for r in requests)

    if getattr(args, "structured_output", "none") == "json":
        ab = run_structured_ab(engine_kwargs, requests, max(1, args.repeats))
        results = {"workload": wl.name, "num_requests": len(requests), "input_tokens": num_in,
                   "output_tokens": num_out, "device": f"{device} ({os.cpu_count()} cores, torch threads "
                   f"{torch.get_num_threads()})", "structured_output": ab}
        print(f"\nworkload {wl.name}: {len(requests)} requests, {num_in} input / {num_out} output tokens, "
              f"{results['device']}")
        for name in ("plain", "json"):
            print(f"{name:<6} best {ab[name]['seconds']:7.1f} s  {ab[name]['output_tokens_per_s']:8.1f} out tok/s"
                  f"  (runs: {', '.join(f'{t:.1f}' for t in ab[name]['all_seconds'])} s)")
        print(f"json schema / plain, output tokens/s: {ab['json_over_plain']:.3f} "
              f"(grammar compile {ab['grammar_compile_seconds'] * 1000:.0f} ms, once, cached)")
        if tmp is not None:
            tmp.cleanup()
        return _write_results(results, args.output_json)

    if getattr(args, "lora_adapters", 0):
        from pagellm.bench.lora_bench import run_lora_ab

        ab = run_lora_ab(engine_kwargs, requests, load_hf_config(source), args.lora_adapters, args.lora_rank)
        results = {"workload": wl.name, "num_requests": len(requests), "input_tokens": num_in,
                   "output_tokens": num_out, "device": torch.cuda.get_device_name() if device.startswith("cuda")
                   else "cpu", "lora": ab}
        print(f"\nworkload {wl.name}: {len(requests)} requests, {num_in} input / {num_out} output tokens, "
              f"{results['device']}")
        for name in ("base", "lora_mixed", "lora_engine_base_requests"):
            print(f"{name:<28} {ab[name]['seconds']:7.1f} s  {ab[name]['output_tokens_per_s']:9.1f} out tok/s")
        print(f"lora ({ab['adapters']} adapters, rank {ab['rank']}) / base, output tokens/s: "
              f"{ab['lora_over_base']:.3f}")
        if tmp is not None:
            tmp.cleanup()
        return _write_results(results, args.output_json)

    ours = run_pagellm(engine_kwargs, requests, getattr(args, "profile", False))
    results: dict[str, Any] = {
        "workload": wl.name,
        "model": source.display_name if tmp is None else wl.name + " shape (dummy weights)",
        "num_requests": len(requests),
        "input_tokens": num_in,
        "output_tokens": num_out,
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else f"cpu ({os.cpu_count()} cores, "
        f"{platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()})",
        "torch": torch.__version__,
        "pagellm": ours,
    }
    runs = [(ours, requests)]
    if args.peer == "hf":
        # Said now, so that a peer cut short by a time limit leaves our figure behind.
        print(f"pagellm (before the peer): {ours['seconds']:.1f} s, {num_out / ours['seconds']:.1f} output tokens/s",
              flush=True)
        batch = args.peer_batch_size or (64 if device.startswith("cuda") else 16)
        peer_dtype = torch.float32 if device == "cpu" else getattr(torch, ours["dtype"])
        peer_requests = requests[:args.peer_requests] if getattr(args, "peer_requests", None) else requests
        peer = run_hf_peer(source.path, source.gguf_file, peer_dtype, device, peer_requests, batch,
                           dummy=load_format == "dummy")
        if len(peer_requests) < len(requests):
            peer["engine"] += f", first {len(peer_requests)} requests"
            peer["num_requests"] = len(peer_requests)
        results["peer"] = peer
        runs.append((peer, peer_requests))
    for run, reqs in runs:
        run_out = sum(r.output_len for r in reqs)
        run["requests_per_s"] = len(reqs) / run["seconds"]
        run["output_tokens_per_s"] = run_out / run["seconds"]
        run["total_tokens_per_s"] = (sum(len(r.prompt_token_ids) for r in reqs) + run_out) / run["seconds"]
    if "peer" in results:
        results["ratio_output_tokens_per_s"] = ours["output_tokens_per_s"] / results["peer"]["output_tokens_per_s"]
    if tmp is not None:
        tmp.cleanup()

    print(f"\nworkload {wl.name}: {len(requests)} requests, {num_in} input / {num_out} output tokens, "
          f"device {results['device']}")
    print(f"{'engine':<60} {'dtype':>9} {'seconds':>8} {'req/s':>7} {'out tok/s':>10}")
    for run, _ in runs:
        print(f"{run['engine']:<60} {run['dtype']:>9} {run['seconds']:>8.1f} {run['requests_per_s']:>7.2f} "
              f"{run['output_tokens_per_s']:>10.1f}")
    print(f"pagellm KV cache: {ours['num_blocks']} blocks of {engine_args.block_size} tokens "
          f"(kv_cache_dtype {ours['kv_cache_dtype']})")
    if "ratio_output_tokens_per_s" in results:
        print(f"ratio (pagellm / peer, output tokens/s): {results['ratio_output_tokens_per_s']:.2f}x")
    if "spec_decode" in ours:
        sd = ours["spec_decode"]
        print(f"speculative decoding: {sd['num_drafts']} drafts, acceptance {sd['acceptance']:.3f} "
              f"({sd['num_accepted_tokens']} of {sd['num_draft_tokens']} draft tokens), mean accepted length "
              f"{sd['mean_accepted_length']:.2f}")
    return _write_results(results, args.output_json)


def _write_results(results: dict[str, Any], path: Optional[str]) -> dict[str, Any]:
    """The results, also written as JSON to `path` when one is given."""
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(results, f, indent=2)
    return results
