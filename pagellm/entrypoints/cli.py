"""`pagellm serve | generate | chat | quantize | bench throughput | bench serve`: the command line."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Optional

from pagellm.engine_args import EngineArgs


def _add_sampling_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-tokens", type=int, default=64, help="most new tokens per answer")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--sampling-seed", type=int, default=None, help="per-request sampling seed")
    parser.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")


def _sampling_params(args: argparse.Namespace):
    from pagellm.sampling_params import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, seed=args.sampling_seed, stop=args.stop)


def _cmd_generate(args: argparse.Namespace) -> int:
    from pagellm.entrypoints.llm import LLM

    llm = LLM(**vars(EngineArgs.from_cli_args(args)))
    outputs = llm.generate(args.prompts, _sampling_params(args), use_tqdm=False)
    for out in outputs:
        print(out.prompt + out.outputs[0].text if args.echo else out.outputs[0].text)
    return 0


def _cmd_chat(args: argparse.Namespace) -> int:
    from pagellm.entrypoints.llm import LLM

    llm = LLM(**vars(EngineArgs.from_cli_args(args)))
    out = llm.chat([{"role": "user", "content": args.message}], _sampling_params(args), use_tqdm=False)
    print(out[0].outputs[0].text)
    return 0


def _cmd_bench_throughput(args: argparse.Namespace) -> int:
    from pagellm.bench.throughput import run_throughput_bench

    run_throughput_bench(args)
    return 0


def _cmd_bench_latency(args: argparse.Namespace) -> int:
    from pagellm.bench.latency import run_latency_bench

    run_latency_bench(args)
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from pagellm.entrypoints.openai.api_server import serve

    try:
        code = serve(args)
    except (RuntimeError, OSError) as e:  # the model is missing, the engine failed to start, ...
        print(f"error: {e}", file=sys.stderr)
        return 1
    # The engine process is joined and every socket closed: skip the interpreter's teardown (seconds with
    # torch loaded), so that a drained server exits promptly.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _cmd_bench_serve(args: argparse.Namespace) -> int:
    from pagellm.bench.serve import run_serve_bench

    report = run_serve_bench(args)
    return 0 if report["completed"] else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pagellm", description="pagellm: LLM inference and serving engine")
    parser.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    from pagellm import __version__

    parser.add_argument("--version", "-v", action="version", version=f"pagellm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    from pagellm.entrypoints.openai.cli_args import add_serve_args

    srv = sub.add_parser("serve", help="OpenAI-compatible HTTP server (default: the embedded model on "
                         "127.0.0.1:8000)", description="Serve a model over an OpenAI-compatible HTTP API.")
    add_serve_args(srv)
    srv.set_defaults(func=_cmd_serve)

    gen = sub.add_parser("generate", help="generate text for prompts given on the command line")
    gen.add_argument("prompts", nargs="+", help="one or more prompts")
    gen.add_argument("--echo", action="store_true", help="print the prompt before the answer")
    EngineArgs.add_cli_args(gen)
    _add_sampling_args(gen)
    gen.set_defaults(func=_cmd_generate)

    chat = sub.add_parser("chat", help="answer one user message with the model's chat template")
    chat.add_argument("message")
    EngineArgs.add_cli_args(chat)
    _add_sampling_args(chat)
    chat.set_defaults(func=_cmd_chat)

    from pagellm.quantize.cli import add_quantize_args, run_quantize

    quant = sub.add_parser("quantize", help="write an FP8 or INT8 W8A8 compressed-tensors checkpoint of a float "
                           "model (optionally SmoothQuant-smoothed)", description="Quantize a float model offline "
                           "into a compressed-tensors W8A8 checkpoint that LLM(folder) and `pagellm serve` load.")
    add_quantize_args(quant)
    quant.set_defaults(func=run_quantize)

    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    from pagellm.bench.throughput import add_throughput_args

    tp = bench_sub.add_parser("throughput", help="offline throughput on a fixed workload (shared/BENCHMARKS.md)")
    add_throughput_args(tp)
    tp.set_defaults(func=_cmd_bench_throughput)

    from pagellm.bench.latency import add_latency_args

    lat = bench_sub.add_parser("latency", help="decode speed of one small batch (default: one request)")
    add_latency_args(lat)
    lat.set_defaults(func=_cmd_bench_latency)

    from pagellm.bench.serve import add_serve_bench_args

    bs = bench_sub.add_parser("serve", help="serving benchmark against any OpenAI-compatible server "
                              "(shared/BENCHMARKS.md workloads, streaming, Poisson arrivals)")
    add_serve_bench_args(bs)
    bs.set_defaults(func=_cmd_bench_serve)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
