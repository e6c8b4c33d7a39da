"""`pagellm bench throughput --lora-adapters N`: the workload on the base model alone, then with N random
PEFT adapters (rank --lora-rank, on q/k/v/o and gate/up/down) mixed in: request i runs adapter i mod N, so every
step batches all N adapters together. Both engines run in this one process, one after the other, so the ratio
holds on a noisy machine; a third run times the LoRA engine on base-model requests only (the kernels' cost
when no token uses an adapter)."""

from __future__ import annotations

import gc
import json
import os
import tempfile
import time
from typing import Any

import torch

from pagellm.bench.workloads import BenchRequest

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_random_adapters(hf_config: Any, folder: str, count: int, rank: int) -> list[str]:
    """`count` PEFT adapter folders of random weights (bfloat16) for a Llama-shaped config."""
    from safetensors.torch import save_file

    hidden = hf_config.hidden_size
    heads = hf_config.num_attention_heads
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
    head_dim = getattr(hf_config, "head_dim", None) or hidden // heads
    inter = hf_config.intermediate_size
    dims = {"q_proj": (hidden, heads * head_dim), "k_proj": (hidden, kv_heads * head_dim),
            "v_proj": (hidden, kv_heads * head_dim), "o_proj": (heads * head_dim, hidden),
            "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden)}
    paths = []
    for i in range(count):
        gen = torch.Generator().manual_seed(1000 + i)
        tensors = {}
        for layer in range(hf_config.num_hidden_layers):
            for proj in PROJECTIONS:
                part = "self_attn" if proj in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
                fan_in, fan_out = dims[proj]
                prefix = f"base_model.model.model.layers.{layer}.{part}.{proj}"
                tensors[f"{prefix}.lora_A.weight"] = (torch.randn(rank, fan_in, generator=gen) * 0.01).bfloat16()
                tensors[f"{prefix}.lora_B.weight"] = (torch.randn(fan_out, rank, generator=gen) * 0.01).bfloat16()
        path = os.path.join(folder, f"adapter-{i}")
        os.makedirs(path)
        save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
        with open(os.path.join(path, "adapter_config.json"), "w") as f:
            json.dump({"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(PROJECTIONS),
                       "bias": "none"}, f)
        paths.append(path)
    return paths


def _timed_run(engine_kwargs: dict[str, Any], requests: list[BenchRequest], loras: list[Any]) -> list[float]:
    """Seconds of each list of per-request adapters (None: the base), on one engine."""
    from pagellm.entrypoints.llm import LLM
    from pagellm.sampling_params import SamplingParams

    llm = LLM(**engine_kwargs)
    prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in requests]
    params = [SamplingParams(max_tokens=r.output_len, ignore_eos=True, temperature=1.0, top_p=1.0,
                             detokenize=False) for r in requests]
    times = []
    for per_request in loras:
        # One warm-up request per distinct adapter: each is read from disk into its slot once, before the clock
        # (steady-state throughput, as with --lora-modules at start-up; loading mid-run stalls the step loop).
        first = list({id(lora): i for i, lora in reversed(list(enumerate(per_request)))}.values())
        warm = [SamplingParams(max_tokens=2, ignore_eos=True, detokenize=False)] * len(first)
        llm.generate([prompts[i] for i in first], warm, use_tqdm=False, lora_request=[per_request[i] for i in first])
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False, lora_request=per_request)
        times.append(time.perf_counter() - start)
        if sum(len(o.outputs[0].token_ids) for o in outputs) != sum(r.output_len for r in requests):
            raise RuntimeError("a LoRA bench run did not generate the workload's token count")
    llm.llm_engine.core.shutdown()
    del llm
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return times


def run_lora_ab(engine_kwargs: dict[str, Any], requests: list[BenchRequest], hf_config: Any, count: int,
                rank: int) -> dict[str, Any]:
    from pagellm.lora.request import LoRARequest

    num_out = sum(r.output_len for r in requests)
    base_only = [None] * len(requests)
    with tempfile.TemporaryDirectory(prefix="pagellm-bench-lora-") as folder:
        paths = write_random_adapters(hf_config, folder, count, rank)
        adapters = [LoRARequest(f"bench-{i}", i + 1, p) for i, p in enumerate(paths)]
        mixed = [adapters[i % count] for i in range(len(requests))]
        (base,) = _timed_run({**engine_kwargs, "enable_lora": False}, requests, [base_only])
        with_lora, lora_engine_base = _timed_run({**engine_kwargs, "enable_lora": True, "max_loras": count,
                                                  "max_lora_rank": rank}, requests, [mixed, base_only])
    result = {"adapters": count, "rank": rank,
              "base": {"seconds": base, "output_tokens_per_s": num_out / base},
              "lora_mixed": {"seconds": with_lora, "output_tokens_per_s": num_out / with_lora},
              "lora_engine_base_requests": {"seconds": lora_engine_base,
                                            "output_tokens_per_s": num_out / lora_engine_base}}
    result["lora_over_base"] = base / with_lora
    return result
