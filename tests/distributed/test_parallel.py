"""Tensor and pipeline parallelism on the CPU (gloo): greedy tokens identical to one device, in float32.

The single-device engine is itself checked against transformers (tests/engine/test_correctness.py), so equality
with it is equality with the reference. Each multi-rank engine runs its ranks as processes (mp) or Ray actors. The
tests that compare what the ranks compute fork their mp workers from a server process that imported torch and
transformers once (the forkserver_workers fixture of tests/conftest.py: seconds saved per engine); those about
workers that die or hang spawn them, as the engine does by itself.
"""

from __future__ import annotations

import os
import random
import signal
import time

import pytest

from pagellm import LLM, SamplingParams
from pagellm.executor import WorkerDiedError

LOGPROB_TOL = 1e-4  # float32; the all-reduce sums partial products in another order than one matmul


def _llm(path: str, **kwargs) -> LLM:
    opts = dict(dtype="float32", skip_tokenizer_init=True, kv_cache_memory=4 * 2**20, max_model_len=256,
                max_num_batched_tokens=64)  # 64: longer prompts are chunked, so chunked prefill is covered too
    opts.update(kwargs)
    return LLM(path, **opts)


def _prompts(n: int = 6, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt_token_ids": [rng.randrange(3, 512) for _ in range(rng.randint(3, 90))]} for _ in range(n)]


PARAMS = SamplingParams(temperature=0.0, max_tokens=10, logprobs=2)


def _generate(path: str, **kwargs) -> list:
    llm = _llm(path, **kwargs)
    try:
        return [o.outputs[0] for o in llm.generate(_prompts(), PARAMS, use_tqdm=False)]
    finally:
        llm.shutdown()


_REFERENCE: dict[str, list] = {}


def _reference(path: str) -> list:
    if path not in _REFERENCE:
        _REFERENCE[path] = _generate(path)
    return _REFERENCE[path]


def _assert_same(got: list, ref: list) -> None:
    for g, r in zip(got, ref):
        assert g.token_ids == r.token_ids
        for tok, glp, rlp in zip(g.token_ids, g.logprobs, r.logprobs):
            assert abs(glp[tok].logprob - rlp[tok].logprob) < LOGPROB_TOL


@pytest.mark.parametrize("arch,tp,pp", [
    ("llama", 2, 1),      # 4 heads, 2 KV heads: one KV head per rank
    ("llama-kv1", 2, 1),  # 1 KV head: replicated on both ranks
    ("qwen2", 2, 1),      # q/k/v bias (column-parallel bias), tied embedding as the vocab-parallel LM head
    ("qwen3", 2, 1),      # per-head q/k norm, head_dim != hidden / heads
    ("llama", 1, 2),      # two pipeline stages of one layer each
    ("qwen2", 1, 2),      # tied embedding: the last stage holds it for the LM head too
    ("phi3", 2, 1),       # fused qkv_proj / gate_up_proj checkpoint tensors sliced per rank
    ("gemma3", 2, 1),     # sliding/global layers, Gemma norms; 2 KV heads, one per rank
    ("gemma3", 1, 2),     # the embedding scale on the first stage, the final norm on the last
])
@pytest.mark.usefixtures("forkserver_workers")
def test_mp_parallel_matches_single_device(tiny_model_dir, arch, tp, pp):
    path = tiny_model_dir(arch)
    got = _generate(path, tensor_parallel_size=tp, pipeline_parallel_size=pp)
    _assert_same(got, _reference(path))


@pytest.mark.parametrize("arch,ep", [
    ("mixtral", True),     # expert parallelism: experts 0-3 on rank 0, 4-7 on rank 1
    ("qwen2_moe", True),   # plus a shared expert (tensor-parallel) and a dense layer
    ("qwen3_moe", False),  # every expert's intermediate dim sliced over the two ranks
])
@pytest.mark.usefixtures("forkserver_workers")
def test_moe_tp2_and_ep2_match_single_device(tiny_model_dir, arch, ep):
    """Mixture-of-Experts at TP=2, with and without enable_expert_parallel: the single device's tokens and
    logprobs (the single device is checked against transformers in tests/engine/test_correctness.py)."""
    path = tiny_model_dir(arch)
    got = _generate(path, tensor_parallel_size=2, enable_expert_parallel=ep)
    _assert_same(got, _reference(path))


def test_expert_parallel_reaches_the_workers_process_groups(tiny_model_dir):
    """The option's way: EngineArgs -> ParallelConfig (what each worker gets) -> parallel_state, read by FusedMoE
    (whose split per rank is tested in tests/models/test_moe.py)."""
    from pagellm.distributed import parallel_state as ps
    from pagellm.engine_args import EngineArgs

    config = EngineArgs(model=tiny_model_dir("mixtral"), tensor_parallel_size=2, enable_expert_parallel=True,
                        skip_tokenizer_init=True, device="cpu").create_engine_config()
    assert config.parallel_config.enable_expert_parallel
    try:  # a one-process gloo world stands for a worker's init
        ps.init_distributed_environment(1, 0, f"tcp://127.0.0.1:{_free_port()}", 1, 1, backend="gloo",
                                        enable_expert_parallel=config.parallel_config.enable_expert_parallel)
        assert ps.expert_parallel_enabled()
    finally:
        ps.destroy_distributed_environment()
    assert not ps.expert_parallel_enabled()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_expert_parallel_needs_the_experts_to_divide():
    from transformers import MixtralConfig

    from pagellm.arch_config import ArchConfig
    from pagellm.config import ParallelConfig
    from pagellm.engine_args import check_parallel_fits_model

    config = ArchConfig.from_hf(MixtralConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                              intermediate_size=64, num_hidden_layers=2, num_local_experts=6,
                                              num_experts_per_tok=2, vocab_size=512))
    check_parallel_fits_model(config, ParallelConfig(tensor_parallel_size=2, enable_expert_parallel=True))
    with pytest.raises(ValueError, match=r"enable_expert_parallel: tensor_parallel_size \(4\) must divide the "
                                         r"number of experts \(6\)"):
        check_parallel_fits_model(config, ParallelConfig(tensor_parallel_size=4, enable_expert_parallel=True))


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
@pytest.mark.usefixtures("forkserver_workers")
def test_fp8_kv_cache_matches_single_device(tiny_model_dir, tp, pp):
    """kv_cache_dtype="fp8" split over ranks: each rank stores its own KV heads (TP) or layers (PP) in FP8 with
    the layer's scales, so the tokens and logprobs are the single device's FP8 engine's."""
    path = tiny_model_dir("llama")
    got = _generate(path, tensor_parallel_size=tp, pipeline_parallel_size=pp, kv_cache_dtype="fp8")
    _assert_same(got, _reference_fp8(path))


_REFERENCE_FP8: dict[str, list] = {}


def _reference_fp8(path: str) -> list:
    if path not in _REFERENCE_FP8:
        _REFERENCE_FP8[path] = _generate(path, kv_cache_dtype="fp8")
    return _REFERENCE_FP8[path]


@pytest.mark.parametrize("backend", ["mp", "ray"])
def test_async_scheduling_with_workers_matches_single_device(tiny_model_dir, backend, request):
    """TP=2 with async scheduling: step N+1 is sent while step N runs; a decode scheduled ahead of its input
    token reads it on the device, where the driver's broadcast put it on the other rank too. [ray] is also the
    check of tensor parallelism over Ray actors (Ray's execute_model is its submit_model then collect_model, both
    used here; pipeline parallelism over Ray: test_pp_keeps_two_micro_batches_in_flight[ray])."""
    request.getfixturevalue("local_ray" if backend == "ray" else "forkserver_workers")
    path = tiny_model_dir("llama")
    llm = _llm(path, tensor_parallel_size=2, async_scheduling=True, distributed_executor_backend=backend)
    try:
        assert llm.llm_engine.config.scheduler_config.async_scheduling
        got = [o.outputs[0] for o in llm.generate(_prompts(), PARAMS, use_tqdm=False)]
    finally:
        llm.shutdown()
    _assert_same(got, _reference(path))


@pytest.mark.usefixtures("forkserver_workers")
def test_mp_tp2_x_pp2_matches_single_device(tiny_model_dir):
    """Four ranks (two stages of two TP ranks)."""
    path = tiny_model_dir("llama")
    got = _generate(path, tensor_parallel_size=2, pipeline_parallel_size=2)
    _assert_same(got, _reference(path))


def test_dead_worker_fails_the_step_instead_of_hanging(tiny_model_dir):
    path = tiny_model_dir("llama")
    llm = _llm(path, tensor_parallel_size=2)
    try:
        executor = llm.llm_engine.core.executor
        os.kill(executor.pids[1], signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(WorkerDiedError, match="worker 1"):
            llm.generate(_prompts(2), PARAMS, use_tqdm=False)
        assert time.monotonic() - start < 30
        with pytest.raises(WorkerDiedError):  # and stays failed
            executor.check_health()
    finally:
        llm.shutdown()
    for proc in executor.procs:
        assert not proc.is_alive()


def test_hung_worker_fails_the_step_after_the_step_timeout(tiny_model_dir):
    """A worker that stops answering (SIGSTOP: alive, but never replies) fails the step once
    distributed_step_timeout has passed, naming the worker, instead of hanging the engine."""
    path = tiny_model_dir("llama")
    llm = _llm(path, tensor_parallel_size=2, distributed_step_timeout=3.0)
    executor = llm.llm_engine.core.executor
    try:
        assert llm.generate(_prompts(1), PARAMS, use_tqdm=False)[0].outputs[0].token_ids  # it works first
        os.kill(executor.pids[1], signal.SIGSTOP)
        start = time.monotonic()
        with pytest.raises(WorkerDiedError, match=r"worker\(s\) \[.*1.*\] gave no answer .* within 3 s"):
            llm.generate(_prompts(2), PARAMS, use_tqdm=False)
        assert 2.5 < time.monotonic() - start < 30
        with pytest.raises(WorkerDiedError):  # and stays failed
            executor.check_health()
    finally:
        llm.shutdown()  # kills the stopped worker
    for proc in executor.procs:
        assert not proc.is_alive()


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_parallel_options_are_validated(tiny_model_dir):
    path = tiny_model_dir("llama")
    with pytest.raises(ValueError, match="num_attention_heads"):
        _llm(path, tensor_parallel_size=3)
    with pytest.raises(ValueError, match="exceeds the model's 2 layers"):
        _llm(path, pipeline_parallel_size=3)
    with pytest.raises(ValueError, match="data_parallel_size"):
        _llm(path, data_parallel_size=2)
    with pytest.raises(ValueError, match="uni"):
        _llm(path, tensor_parallel_size=2, distributed_executor_backend="uni")
    for bad in (0, -1.0, "5"):
        with pytest.raises(ValueError, match="distributed_step_timeout"):
            _llm(path, tensor_parallel_size=2, distributed_step_timeout=bad)


@pytest.mark.parametrize("backend", ["mp", "ray"])
def test_pp_keeps_two_micro_batches_in_flight(tiny_model_dir, backend, request):
    """max_num_seqs=3 with 6 prompts: two groups of requests alternate, one batch on each stage at a time."""
    request.getfixturevalue("local_ray" if backend == "ray" else "forkserver_workers")
    path = tiny_model_dir("llama")
    llm = _llm(path, pipeline_parallel_size=2, max_num_seqs=3, distributed_executor_backend=backend)
    try:
        got = [o.outputs[0] for o in llm.generate(_prompts(), PARAMS, use_tqdm=False)]
        assert llm.llm_engine.core.peak_batches_in_flight == 2
    finally:
        llm.shutdown()
    _assert_same(got, _reference(path))


@pytest.mark.slow
@pytest.mark.usefixtures("forkserver_workers")
def test_gguf_tp3_matches_single_device(smollm_llm):
    """The embedded SmolLM2 GGUF (9 heads, 3 KV heads, tied 49152-token vocabulary) split over 3 ranks: the GGUF
    loader hands whole dequantized tensors and each layer's weight loader keeps its rank's slice."""
    prompts = ["The capital of France is", "def fibonacci(n):"]
    params = SamplingParams(temperature=0.0, max_tokens=12)
    ref = [o.outputs[0].token_ids for o in smollm_llm.generate(prompts, params, use_tqdm=False)]
    llm = LLM(dtype="float32", max_model_len=256, kv_cache_memory=32 * 2**20, tensor_parallel_size=3)
    try:
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    finally:
        llm.shutdown()
    assert got == ref


@pytest.mark.usefixtures("forkserver_workers")
def test_dummy_weights_under_tp(tiny_model_dir):
    llm = _llm(tiny_model_dir("qwen2"), tensor_parallel_size=2, load_format="dummy")
    try:
        out = llm.generate(_prompts(2), SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)
        assert all(len(o.outputs[0].token_ids) == 4 for o in out)
    finally:
        llm.shutdown()
