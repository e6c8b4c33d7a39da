"""Data parallelism behind one server: two engine cores (each its own process and KV cache) answer 64
concurrent requests with the single engine's greedy tokens, and both cores get a share; the router keeps a
conversation's next turn on the core that holds its prefix."""

from __future__ import annotations

import asyncio
import random
import re

import httpx
from tests.entrypoints.server_utils import RemoteServer, child_pids, cmdline

from pagellm import LLM, SamplingParams

NUM_REQUESTS = 64
MAX_TOKENS = 6


def _prompts() -> list[list[int]]:
    rng = random.Random(5)
    return [[rng.randrange(3, 4096) for _ in range(rng.randint(4, 40))] for _ in range(NUM_REQUESTS)]


def _args(model_dir: str, *extra: str) -> list[str]:
    return [model_dir, "--dtype", "float32", "--max-model-len", "256", "--skip-tokenizer-init",
            "--kv-cache-memory", str(8 * 2**20), *extra]


def test_dp2_server_answers_64_concurrent_requests_on_both_cores(tiny_served_model):
    prompts = _prompts()
    llm = LLM(tiny_served_model, dtype="float32", max_model_len=256, skip_tokenizer_init=True,
              kv_cache_memory=8 * 2**20)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                                             use_tqdm=False)]
    del llm

    with RemoteServer(_args(tiny_served_model, "--data-parallel-size", "2")) as server:
        cores = [p for p in child_pids(server.proc.pid) if "spawn_main" in cmdline(p)]
        assert len(cores) == 2, "two engine core processes"
        client = server.async_client()

        async def one(prompt: list[int]) -> list[int]:
            out = await client.completions.create(model=client_model, prompt=prompt, max_tokens=MAX_TOKENS,
                                                  temperature=0, logprobs=1, extra_body={"ignore_eos": True})
            return [int(t.split(":", 1)[1]) for t in out.choices[0].logprobs.tokens]

        async def run_all() -> list[list[int]]:
            return await asyncio.gather(*(one(p) for p in prompts))

        client_model = server.client().models.list().data[0].id
        got = asyncio.run(run_all())
        assert got == expected

        metrics = httpx.get(server.url("/metrics"), timeout=30).text
        routed = {int(core): float(n) for core, n in re.findall(
            r'pagellm:engine_core_requests_total\{engine_core="(\d+)",model_name="[^"]*"\} ([0-9.e+]+)', metrics)}
        if not routed:  # label order may differ
            routed = {int(core): float(n) for core, n in re.findall(
                r'pagellm:engine_core_requests_total\{model_name="[^"]*",engine_core="(\d+)"\} ([0-9.e+]+)', metrics)}
        assert sum(routed.values()) == NUM_REQUESTS, metrics
        assert set(routed) == {0, 1} and min(routed.values()) >= NUM_REQUESTS // 4, routed
        assert httpx.get(server.url("/health"), timeout=10).status_code == 200


def test_router_keeps_a_conversation_on_its_core_and_balances_the_rest(tiny_served_model):
    from pagellm.engine.dp_router import DPRouter
    from pagellm.engine_args import EngineArgs

    config = EngineArgs(model=tiny_served_model, skip_tokenizer_init=True, data_parallel_size=2,
                        max_num_seqs=8).create_engine_config()
    router = DPRouter(2, config.cache_config, config.scheduler_config.max_num_seqs)
    rng = random.Random(1)
    turn1 = [rng.randrange(3, 4096) for _ in range(40)]  # 2 full blocks of 16
    first = router.route(turn1)
    router.add(first, 1)
    other = 1 - first
    # A new, unrelated prompt goes to the idle core.
    assert router.route([rng.randrange(3, 4096) for _ in range(40)]) == other
    router.add(other, 1)
    # The next turn of the conversation (turn 1 + answer + new message) stays where its prefix is cached ...
    turn2 = turn1 + [rng.randrange(3, 4096) for _ in range(20)]
    assert router.route(turn2) == first
    # ... unless that core is much busier than the other (more than max_num_seqs / 2 sequences more).
    router.add(first, 5)
    assert router.route(turn2 + [7] * 16) == other
    # Without prefix caching, only the load counts.
    router.prefix_caching = False
    router.loads = [3, 1]
    assert router.route(turn1) == 1
