"""`pagellm bench serve --base-url URL`: the fixed workloads of shared/BENCHMARKS.md against any
OpenAI-compatible server.

Each request is a token-id prompt sent to /v1/completions with stream=true, max_tokens = its output length and
ignore_eos, at Poisson arrivals of --request-rate requests/s (or all at once with "inf"). Reports requests/s,
output tokens/s, and TTFT, TPOT and ITL (mean, median, p99), and writes them as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from pagellm.bench.workloads import WORKLOADS, BenchRequest, Workload, make_requests


def add_serve_bench_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server, without /v1")
    parser.add_argument("--endpoint", default="/v1/completions", help="completions endpoint path")
    parser.add_argument("--model", default=None, help="model name to send (default: the server's first model)")
    parser.add_argument("--workload", default="smollm-cpu", choices=sorted(WORKLOADS),
                        help="a workload of shared/BENCHMARKS.md")
    parser.add_argument("--num-prompts", type=int, default=None, help="override the workload's request count")
    parser.add_argument("--request-rate", type=float, default=float("inf"),
                        help="mean requests per second, Poisson arrivals; inf sends all at once")
    parser.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight at once")
    parser.add_argument("--seed", type=int, default=0, help="seed of the arrival times")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--vocab-size", type=int, default=None,
                        help="vocabulary for the random prompt ids (default: the workload's model)")
    parser.add_argument("--tokenizer-model", default=None,
                        help="local model whose config gives the vocabulary size (default: the workload's; "
                        "the embedded model for smollm-cpu)")
    parser.add_argument("--api-key", default=None, help="Bearer key (default: $PAGELLM_API_KEY or $OPENAI_API_KEY)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds one request may take")
    parser.add_argument("--output-json", default=None, help="write the results here")


@dataclass
class RequestResult:
    prompt_len: int
    expected_output_len: int
    success: bool = False
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: Optional[str] = None


def _vocab_size(args: argparse.Namespace, workload: Workload) -> int:
    if args.vocab_size:
        return args.vocab_size
    if workload.shape is not None and args.tokenizer_model is None:
        return int(workload.shape["vocab_size"])
    from pagellm.model_executor.loader.source import load_hf_config, resolve_model_source

    return int(load_hf_config(resolve_model_source(args.tokenizer_model or workload.model)).vocab_size)


async def _one_request(client: Any, url: str, headers: dict, model: str, req: BenchRequest,
                       temperature: float) -> RequestResult:
    result = RequestResult(prompt_len=len(req.prompt_token_ids), expected_output_len=req.output_len)
    payload = {
        "model": model, "prompt": req.prompt_token_ids, "max_tokens": req.output_len, "ignore_eos": True,
        "temperature": temperature, "stream": True, "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    last = start
    chunks = 0
    usage_tokens = None
    try:
        async with client.stream("POST", url, json=payload, headers=headers) as response:
            if response.status_code != 200:
                body = (await response.aread()).decode(errors="replace")
                result.error = f"HTTP {response.status_code}: {body[:300]}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = str(chunk["error"])[:300]
                    return result
                if chunk.get("usage"):
                    usage_tokens = chunk["usage"].get("completion_tokens")
                if not chunk.get("choices"):
                    continue  # the usage chunk
                now = time.perf_counter()
                if chunks == 0:
                    result.ttft = now - start
                else:
                    result.itl.append(now - last)
                last = now
                chunks += 1
        result.latency = time.perf_counter() - start
        result.output_tokens = usage_tokens if usage_tokens is not None else chunks
        result.success = chunks > 0
        if not result.success:
            result.error = "no output"
    except Exception as e:  # noqa: BLE001 - one failed request is a result, not a crash
        result.error = f"{type(e).__name__}: {e}"
    return result


def _summary(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean_ms": 0.0, "median_ms": 0.0, "p99_ms": 0.0}
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]
    return {"mean_ms": 1000 * statistics.fmean(ordered), "median_ms": 1000 * statistics.median(ordered),
            "p99_ms": 1000 * p99}


async def _run(args: argparse.Namespace, requests: list[BenchRequest]) -> tuple[list[RequestResult], float, str]:
    import httpx

    base = args.base_url.rstrip("/")
    api_key = args.api_key or os.environ.get("PAGELLM_API_KEY") or os.environ.get("OPENAI_API_KEY")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    timeout = httpx.Timeout(args.timeout, connect=30.0)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        model = args.model
        if model is None:
            r = await client.get(f"{base}/v1/models", headers=headers)
            r.raise_for_status()
            model = r.json()["data"][0]["id"]
        url = f"{base}{args.endpoint}"
        rng = random.Random(args.seed)
        semaphore = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None

        async def limited(req: BenchRequest) -> RequestResult:
            if semaphore is None:
                return await _one_request(client, url, headers, model, req, args.temperature)
            async with semaphore:
                return await _one_request(client, url, headers, model, req, args.temperature)

        tasks = []
        start = time.perf_counter()
        for i, req in enumerate(requests):
            if i > 0 and math.isfinite(args.request_rate) and args.request_rate > 0:
                await asyncio.sleep(rng.expovariate(args.request_rate))
            tasks.append(asyncio.create_task(limited(req)))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    return list(results), duration, model


def run_serve_bench(args: argparse.Namespace) -> dict[str, Any]:
    workload = WORKLOADS[args.workload]
    if args.num_prompts:
        workload = Workload(**{**workload.__dict__, "num_requests": args.num_prompts})
    requests = make_requests(workload, _vocab_size(args, workload))
    results, duration, model = asyncio.run(_run(args, requests))
    ok = [r for r in results if r.success]
    output_tokens = sum(r.output_tokens for r in ok)
    input_tokens = sum(r.prompt_len for r in ok)
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    itls = [x for r in ok for x in r.itl]
    report = {
        "workload": workload.name, "base_url": args.base_url, "model": model,
        "request_rate": args.request_rate if math.isfinite(args.request_rate) else "inf",
        "max_concurrency": args.max_concurrency, "num_requests": len(results), "completed": len(ok),
        "failed": len(results) - len(ok), "duration_s": duration,
        "input_tokens": input_tokens, "output_tokens": output_tokens,
        "expected_output_tokens": sum(r.expected_output_len for r in results),
        "request_throughput": len(ok) / duration if duration else 0.0,
        "output_throughput": output_tokens / duration if duration else 0.0,
        "total_token_throughput": (input_tokens + output_tokens) / duration if duration else 0.0,
        "ttft": _summary([r.ttft for r in ok]), "tpot": _summary(tpots), "itl": _summary(itls),
        "e2e_latency": _summary([r.latency for r in ok]),
        "errors": sorted({r.error for r in results if r.error})[:10],
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpu_count": os.cpu_count()},
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    _print(report)
    if args.output_json:
        os.makedirs(os.path.dirname(os.path.abspath(args.output_json)), exist_ok=True)
        with open(args.output_json, "w") as f:
            json.dump(report, f, indent=2)
    return report


def _print(r: dict[str, Any]) -> None:
    print(f"==== pagellm bench serve: {r['workload']} -> {r['base_url']} ({r['model']}) ====")
    print(f"requests           {r['completed']} completed, {r['failed']} failed, rate {r['request_rate']}")
    print(f"duration           {r['duration_s']:.2f} s")
    print(f"tokens             {r['input_tokens']} in, {r['output_tokens']} out "
          f"(expected {r['expected_output_tokens']})")
    print(f"request throughput {r['request_throughput']:.2f} req/s")
    print(f"output throughput  {r['output_throughput']:.1f} tok/s   total {r['total_token_throughput']:.1f} tok/s")
    print(f"{'':18} {'mean':>10} {'median':>10} {'p99':>10}  (ms)")
    for name in ("ttft", "tpot", "itl", "e2e_latency"):
        s = r[name]
        print(f"{name:18} {s['mean_ms']:10.1f} {s['median_ms']:10.1f} {s['p99_ms']:10.1f}")
    for err in r["errors"]:
        print(f"error: {err}")


__all__ = ["add_serve_bench_args", "run_serve_bench", "RequestResult"]
