"""The command-line options of `pagellm serve` (kept apart from the server so `pagellm --help` stays light)."""

from __future__ import annotations

import argparse

from pagellm.engine.admission import WorkCaps
from pagellm.engine_args import EngineArgs

DEFAULT_MAX_BODY_BYTES = 8 * 2**20
# The work of one request (engine.admission.WorkCaps). Generous: 2**20 generated tokens is 1,024 sequences of
# 1,024 tokens, or n=128 chat completions that fill SmolLM2's 8,192-token context (about two hours of a 2-core
# CPU, minutes of one GPU); 2**20 prompt logprobs is a 50,000-token prompt at prompt_logprobs 20 (a JSON
# response of about 80 MB). They stop requests that would hold the engine for hours or answer with gigabytes.
DEFAULT_MAX_TOKENS_PER_REQUEST = 2**20
DEFAULT_MAX_PROMPT_LOGPROBS_PER_REQUEST = 2**20


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return number


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    EngineArgs.add_cli_args(parser, positional_model=True)
    group = parser.add_argument_group("server")
    group.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    group.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    group.add_argument("--api-key", action="append", default=None, metavar="KEY",
                       help="require 'Authorization: Bearer KEY' on /v1/*, /tokenize and /detokenize; repeat it "
                       "for several keys, named key-0, key-1, ... (default: $PAGELLM_API_KEY, unless "
                       "--api-key-file is given; /health, /metrics and /version stay open)")
    group.add_argument("--api-key-file", default=None, metavar="PATH",
                       help="more API keys, one a line: 'name key [max_in_flight=N] [tokens_per_minute=N]' "
                       "(# starts a comment line); over a limit a key's requests get 429 with Retry-After; "
                       "/metrics counts requests and tokens by key name")
    group.add_argument("--shared-prefix-cache", action="store_true",
                       help="let requests of different API keys hit each other's prefix cache (all keys are "
                       "one tenant); by default each key's prompts are cached apart, so that no key can learn "
                       "another's prompts from cache timing")
    group.add_argument("--chat-template", default=None,
                       help="Jinja chat template, or a file holding one (default: the model's)")
    group.add_argument("--max-queued-requests", type=int, default=None,
                       help="answer 429 when more sequences than this would wait beyond --max-num-seqs "
                       "(default: no limit)")
    group.add_argument("--api-server-count", type=int, default=1,
                       help="HTTP processes serving the one port, each reaching every engine core, so that "
                       "parsing, tokenization, detokenization and streaming spread over N processes; above 1, a "
                       "launcher process starts the engine core(s) and the N API processes (default: 1: one "
                       "server process and its engine core(s))")
    group.add_argument("--shutdown-timeout", type=float, default=30.0,
                       help="on SIGTERM, seconds to let requests in flight finish before exiting (default: 30)")
    group.add_argument("--max-request-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                       help="larger request bodies get 413 (default: 8 MiB)")
    group.add_argument("--max-tokens-per-request", type=_positive_int, default=DEFAULT_MAX_TOKENS_PER_REQUEST,
                       help="the most tokens one request may ask to generate, prompts x n x max_tokens (an unset "
                       "max_tokens counts as the room the prompt leaves); more is a 400 naming max_tokens (default: "
                       f"{DEFAULT_MAX_TOKENS_PER_REQUEST:,}: 1,024 sequences of 1,024 tokens, or n=128 completions "
                       "that fill an 8,192-token context; hours of a small CPU, minutes of a GPU)")
    group.add_argument("--max-prompt-logprobs-per-request", type=_positive_int,
                       default=DEFAULT_MAX_PROMPT_LOGPROBS_PER_REQUEST,
                       help="the most prompt logprobs one request may ask for, (prompt_logprobs + 1) x prompt "
                       "tokens over its prompts; more is a 400 naming prompt_logprobs (default: "
                       f"{DEFAULT_MAX_PROMPT_LOGPROBS_PER_REQUEST:,}: a 50,000-token prompt at prompt_logprobs 20, "
                       "a JSON response of about 80 MB)")
    group.add_argument("--enable-auto-tool-choice", action=argparse.BooleanOptionalAction, default=None,
                       help="let the model decide to call tools (tool_choice auto, the default when a request has "
                       "tools). Default: on when the tool-call parser is known: given by --tool-call-parser, or "
                       "inferred from the chat template (a template that does not read tools gets them in its "
                       "system message in the Hermes format)")
    group.add_argument("--tool-call-parser", default=None, choices=["hermes", "llama3_json"],
                       help="how tool calls are read from the model's text: hermes (<tool_call>{...}</tool_call>, "
                       "Hermes/Qwen) or llama3_json (Llama 3 JSON) (default: inferred from the chat template)")
    group.add_argument("--reasoning-parser", default=None, choices=["qwen3", "deepseek_r1"],
                       help="split the model's thinking (<think>...</think>) from its answer into the message's "
                       "reasoning_content (streamed as its own deltas): qwen3 (thinking only when the output starts "
                       "with <think>) or deepseek_r1 (the output starts inside the thinking; <think> optional)")
    parser.add_argument("--log-level", default=argparse.SUPPRESS,
                        choices=["debug", "info", "warning", "error"], help="log level (default: warning)")
    parser.epilog = (
        "Caps on one request: n <= 128; logprobs and top_logprobs <= 20; at most 64 stop strings of 1024 "
        "characters; at most 1024 logit_bias entries; at most 1024 prompts and 1024 sequences (prompts x n) "
        f"per /v1/completions request; a text prompt of at most max_model_len x 32 characters; prompt + "
        "max_tokens <= --max-model-len; the request body <= --max-request-body-bytes "
        f"(default {DEFAULT_MAX_BODY_BYTES} bytes); prompts x n x max_tokens <= --max-tokens-per-request and "
        "(prompt_logprobs + 1) x prompt tokens <= --max-prompt-logprobs-per-request."
    )


def work_caps_from_args(args: argparse.Namespace) -> WorkCaps:
    """The caps on one request's work, from the serve flags."""
    return WorkCaps(max_tokens=getattr(args, "max_tokens_per_request", DEFAULT_MAX_TOKENS_PER_REQUEST),
                    max_prompt_logprobs=getattr(args, "max_prompt_logprobs_per_request",
                                                DEFAULT_MAX_PROMPT_LOGPROBS_PER_REQUEST))
