"""Prometheus metrics of the server, prefix `pagellm:`.

Request-side numbers (tokens, latencies) are measured in the API process as outputs arrive; core-side numbers
(running/waiting, KV-cache usage, prefix-cache counters, preemptions, queue times, speculative decoding's
drafts and accepted tokens) come from the engine core
process in a CoreStats message after every step, or on demand. Each server has its own registry.

Several API processes (`pagellm serve --api-server-count N`) use prometheus_client's multiprocess mode: the
launcher points PROMETHEUS_MULTIPROC_DIR at a private temporary folder before it starts them, each process
writes its numbers there, and whichever process answers /metrics renders all of them: counters and histograms
summed, the core gauges (the same cores' stats in every process) as the most recently set value. The cores'
own counters (prefix cache, preemptions, queue times) reach every process; one of them counts them.
"""

from __future__ import annotations

from typing import Any, Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401  (re-exported for the server)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                    80.0, 160.0, 320.0, 640.0)
_TPOT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
_TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)


class Metrics:
    def __init__(self, model_name: str, multiprocess: bool = False, count_core_counters: bool = True) -> None:
        """`multiprocess`: one of several API processes (see the module's docstring); `count_core_counters`:
        this process counts the cores' counters."""
        self.registry = CollectorRegistry(auto_describe=True)
        self.model_name = model_name
        self.multiprocess = multiprocess
        self.count_core_counters = count_core_counters
        r = self.registry
        lbl = ["model_name"]

        def gauge(name: str, doc: str) -> Any:
            return Gauge(f"pagellm:{name}", doc, lbl, registry=r, multiprocess_mode="mostrecent").labels(model_name)

        def counter(name: str, doc: str) -> Any:
            return Counter(f"pagellm:{name}", doc, lbl, registry=r).labels(model_name)

        def histogram(name: str, doc: str, buckets: tuple) -> Any:
            return Histogram(f"pagellm:{name}", doc, lbl, buckets=buckets, registry=r).labels(model_name)

        self.num_requests_running = gauge("num_requests_running", "Sequences running in the engine core.")
        self.num_requests_waiting = gauge("num_requests_waiting", "Sequences waiting in the engine core's queue.")
        self.kv_cache_usage = gauge("kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0 to 1).")
        self.num_kv_blocks = gauge("kv_cache_num_blocks", "KV-cache blocks in the pool.")
        self.prefix_cache_queries = counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.")
        self.prefix_cache_hits = counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.")
        self.num_preemptions = counter("num_preemptions", "Sequences preempted (KV cache full).")
        self.spec_num_drafts = counter("spec_decode_num_drafts", "Speculative decoding: drafts verified (one per "
                                       "request per verify step).")
        self.spec_num_draft_tokens = counter("spec_decode_num_draft_tokens", "Speculative decoding: draft tokens "
                                             "verified.")
        self.spec_num_accepted_tokens = counter("spec_decode_num_accepted_tokens", "Speculative decoding: draft "
                                                "tokens accepted.")
        self._spec_per_pos = Counter("pagellm:spec_decode_num_accepted_tokens_per_pos", "Speculative decoding: "
                                     "draft tokens accepted, by their position in the draft (0: the first).",
                                     ["model_name", "position"], registry=r)
        self._last_per_pos: list[int] = []
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of requests that started generating.")
        self.generation_tokens = counter("generation_tokens", "Generated tokens.")
        self._success = Counter("pagellm:request_success", "Finished sequences, by finish reason.",
                                ["model_name", "finished_reason"], registry=r)
        self.ttft = histogram("time_to_first_token_seconds", "Time from arrival to the first token.",
                              _LATENCY_BUCKETS)
        self.tpot = histogram("time_per_output_token_seconds", "Mean time per output token after the first.",
                              _TPOT_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "Time from arrival to the last token.",
                             _LATENCY_BUCKETS)
        self.queue_time = histogram("request_queue_time_seconds", "Time a sequence waited in the engine core's "
                                    "queue before it was first scheduled.", _LATENCY_BUCKETS)
        self.request_prompt_tokens = histogram("request_prompt_tokens", "Prompt tokens per request.", _TOKEN_BUCKETS)
        self.request_generation_tokens = histogram("request_generation_tokens", "Generated tokens per request.",
                                                   _TOKEN_BUCKETS)
        self._last = {"queries": 0, "hits": 0, "preemptions": 0, "drafts": 0, "draft_tokens": 0, "accepted": 0}
        self._routed = Counter("pagellm:engine_core_requests", "Requests sent to each engine core (data "
                               "parallelism: one core per replica).", ["model_name", "engine_core"], registry=r)
        # Per API key, labelled by the key's name (never the key): see entrypoints/openai/tenants.py.
        key = ["model_name", "key_name"]
        self._key_requests = Counter("pagellm:api_key_requests", "Requests made with each API key (those refused "
                                     "with 429 included).", key, registry=r)
        self._key_rate_limited = Counter("pagellm:api_key_rate_limited", "Requests of each API key refused with "
                                         "429, by the limit they hit.", [*key, "limit"], registry=r)
        self._key_prompt_tokens = Counter("pagellm:api_key_prompt_tokens", "Prompt tokens of each API key's "
                                          "requests that started generating.", key, registry=r)
        self._key_generation_tokens = Counter("pagellm:api_key_generation_tokens", "Tokens generated for each "
                                              "API key.", key, registry=r)

    def record_routed(self, core: int) -> None:
        self._routed.labels(self.model_name, str(core)).inc()

    def add_keys(self, limits: dict[str, tuple[str, ...]]) -> None:
        """Show every key's counters from the start (at 0): key name -> the limits it has."""
        for name in limits:
            for counter in (self._key_requests, self._key_prompt_tokens, self._key_generation_tokens):
                counter.labels(self.model_name, name)
            for limit in limits[name]:
                self._key_rate_limited.labels(self.model_name, name, limit)

    def record_key_request(self, key_name: str) -> None:
        self._key_requests.labels(self.model_name, key_name).inc()

    def record_key_rate_limited(self, key_name: str, limit: str) -> None:
        self._key_rate_limited.labels(self.model_name, key_name, limit).inc()

    def record_key_generation_tokens(self, key_name: str, n: int) -> None:
        self._key_generation_tokens.labels(self.model_name, key_name).inc(n)

    def record_core_stats(self, stats: Any) -> None:
        self.num_requests_running.set(stats.num_running)
        self.num_requests_waiting.set(stats.num_waiting)
        self.kv_cache_usage.set(stats.kv_cache_usage)
        self.num_kv_blocks.set(stats.num_blocks)
        if not self.count_core_counters:
            return
        for key, value, counter in (("queries", stats.prefix_cache_queries, self.prefix_cache_queries),
                                    ("hits", stats.prefix_cache_hits, self.prefix_cache_hits),
                                    ("preemptions", stats.num_preemptions, self.num_preemptions),
                                    ("drafts", stats.spec_num_drafts, self.spec_num_drafts),
                                    ("draft_tokens", stats.spec_num_draft_tokens, self.spec_num_draft_tokens),
                                    ("accepted", stats.spec_num_accepted_tokens, self.spec_num_accepted_tokens)):
            delta = value - self._last[key]
            if delta > 0:
                counter.inc(delta)
            self._last[key] = max(self._last[key], value)
        for pos, value in enumerate(stats.spec_num_accepted_per_pos):
            if pos == len(self._last_per_pos):
                self._last_per_pos.append(0)
            if value > self._last_per_pos[pos]:
                self._spec_per_pos.labels(self.model_name, str(pos)).inc(value - self._last_per_pos[pos])
                self._last_per_pos[pos] = value
        for t in stats.queue_times:
            self.queue_time.observe(t)

    def record_first_token(self, ttft: float, num_prompt_tokens: int, key_name: Optional[str] = None) -> None:
        self.ttft.observe(ttft)
        self.prompt_tokens.inc(num_prompt_tokens)
        self.request_prompt_tokens.observe(num_prompt_tokens)
        if key_name is not None:
            self._key_prompt_tokens.labels(self.model_name, key_name).inc(num_prompt_tokens)

    def record_generation_tokens(self, n: int) -> None:
        if n:
            self.generation_tokens.inc(n)

    def record_finished(self, e2e: float, tpot: Optional[float], num_generation_tokens: int,
                        finish_reasons: list[str]) -> None:
        self.e2e.observe(e2e)
        if tpot is not None:
            self.tpot.observe(tpot)
        self.request_generation_tokens.observe(num_generation_tokens)
        for reason in finish_reasons:
            self._success.labels(self.model_name, reason or "unknown").inc()

    def render(self) -> bytes:
        if not self.multiprocess:
            return generate_latest(self.registry)
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)
