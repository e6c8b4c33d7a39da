"""The scheduler with LoRA: at most max_loras distinct adapters among running requests (a request whose adapter
would be one more waits), each new request's adapter goes to the runner once, and block hashes depend on the
adapter (two adapters, or an adapter and the base, never share prefix-cache blocks)."""

from __future__ import annotations

from pagellm.core.request import Request
from pagellm.lora.request import LoRARequest
from pagellm.sampling_params import SamplingParams
from tests.core.core_sim import FakeRunner, check_drained, check_invariants, check_step, make_scheduler

A = LoRARequest("a", 1, "/adapters/a")
B = LoRARequest("b", 2, "/adapters/b")


def _request(req_id: str, prompt: list[int], lora, max_tokens: int = 4) -> Request:
    return Request(req_id, prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True), eos_token_id=None,
                   lora_request=lora)


def test_at_most_max_loras_adapters_run_at_once():
    sched = make_scheduler()
    sched.max_loras = 1  # as Scheduler(..., lora_config=LoRAConfig(max_loras=1)) sets it
    runner = FakeRunner(sched.block_size)
    loras = {"r1": A, "r2": B, "r3": A, "r4": None, "r5": B}
    for rid, lora in loras.items():
        sched.add_request(_request(rid, [3, 4, 5, 6, 7, int(rid[1])], lora))
    sent: dict[str, object] = {}
    for _ in range(200):
        if not sched.has_unfinished_requests():
            break
        so = sched.schedule()
        check_step(sched, so)
        for new in so.new_reqs:
            sent[new.req_id] = new.lora_request
        running = {r.lora_request.lora_int_id for r in sched.running if r.lora_request is not None}
        assert len(running) <= 1, running
        sched.update_from_output(so, runner.execute(so))
        check_invariants(sched)
    check_drained(sched)
    assert sent == loras


def test_block_hashes_depend_on_the_adapter():
    sched = make_scheduler()
    prompt = list(range(3, 3 + 3 * sched.block_size))
    hashes = {}
    for name, lora in (("base", None), ("a", A), ("a-again", A), ("b", B)):
        req = _request(name, prompt, lora)
        sched.add_request(req)
        hashes[name] = req.block_hashes
    assert len(hashes["base"]) == 3
    assert hashes["a"] == hashes["a-again"]
    assert len({tuple(h) for h in hashes.values()}) == 3  # base, a, b: all different
