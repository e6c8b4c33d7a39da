"""Issue 13 item 2, "one request stalls everyone": how long a small request waits behind a big one.

Starts `pagellm serve` on the embedded SmolLM2 (or uses --base-url), then for each case sends the big request,
waits until the engine core runs it (/metrics shows a running sequence), sends a 4-token request, and prints
the time of each (from its own send to its response) and what the big response held.

    python benchmarks/one_request_stalls.py [--case prompt_logprobs|many_sequences|both] [--base-url URL]
        [--output-json F]

Cases (the issue's shapes):
- prompt_logprobs: an 8,000-token prompt (token ids drawn with a fixed seed), prompt_logprobs 20, max_tokens 1.
- many_sequences: 8 prompts x n=128 (1,024 sequences, max_tokens 16, the completions default).

A measurement, not a test: the figures depend on the machine and what else runs on it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from typing import Any, Optional

SMALL = {"prompt": "The capital of France is", "max_tokens": 4, "temperature": 0}


def post(url: str, body: dict, timeout: float = 1800.0) -> tuple[int, Any]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def running_sequences(base: str) -> float:
    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as r:
        text = r.read().decode()
    m = re.search(r"^pagellm:num_requests_running\{[^}]*\} ([0-9.e+]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


class Timed(threading.Thread):
    """One request in a thread: its status, body and seconds from send to response."""

    def __init__(self, url: str, body: dict) -> None:
        super().__init__(daemon=True)
        self.url, self.body = url, body
        self.status: Optional[int] = None
        self.response: Any = None
        self.seconds = 0.0

    def run(self) -> None:
        t0 = time.perf_counter()
        self.status, self.response = post(self.url, self.body)
        self.seconds = time.perf_counter() - t0


def big_request(case: str) -> dict:
    if case == "prompt_logprobs":
        rng = random.Random(0)
        ids = [rng.randrange(100, 49000) for _ in range(8000)]
        return {"prompt": ids, "max_tokens": 1, "prompt_logprobs": 20, "temperature": 0}
    prompts = [f"Story {i}: once upon a time" for i in range(8)]
    return {"prompt": prompts, "n": 128, "temperature": 1.0, "seed": 0}


def describe(case: str, status: int, body: Any) -> str:
    if status != 200:
        return f"status {status}: {json.dumps(body)[:200]}"
    choices = body.get("choices", [])
    if case == "prompt_logprobs":
        plp = choices[0].get("prompt_logprobs") if choices else None
        return f"prompt_logprobs in the response: {'%d positions' % len(plp) if plp else 'none'}"
    return f"{len(choices)} choices, {body['usage']['completion_tokens']} completion tokens"


def run_case(base: str, case: str) -> dict:
    url = f"{base}/v1/completions"
    post(url, SMALL)  # warm up
    t_alone = Timed(url, SMALL)
    t_alone.run()
    big = Timed(url, big_request(case))
    big.start()
    deadline = time.monotonic() + 600
    while running_sequences(base) < 1 and big.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    small = Timed(url, SMALL)
    small.start()
    small.join()
    big.join()
    result = {"case": case, "small_alone_s": round(t_alone.seconds, 3), "big_s": round(big.seconds, 2),
              "small_after_big_s": round(small.seconds, 2), "small_finished_first": small.seconds < big.seconds,
              "big": describe(case, big.status, big.response), "small_status": small.status}
    print(json.dumps(result), flush=True)
    return result


def start_server(port: int) -> subprocess.Popen:
    log = tempfile.NamedTemporaryFile(prefix="pagellm-stalls-", suffix=".log", delete=False)
    proc = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "pagellm"), "serve", "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited; see {log.name}")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.5)
    proc.terminate()
    raise RuntimeError("the server did not start within 600 s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", default="both", choices=["prompt_logprobs", "many_sequences", "both"])
    parser.add_argument("--base-url", default=None, help="a running server (default: start `pagellm serve`)")
    parser.add_argument("--port", type=int, default=8321)
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args()
    proc = None if args.base_url else start_server(args.port)
    base = args.base_url or f"http://127.0.0.1:{args.port}"
    try:
        cases = ["prompt_logprobs", "many_sequences"] if args.case == "both" else [args.case]
        results = [run_case(base, case) for case in cases]
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(60)
    if args.output_json:
        os.makedirs(os.path.dirname(os.path.abspath(args.output_json)), exist_ok=True)
        with open(args.output_json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
