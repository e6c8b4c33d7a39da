"""Engine configuration: one dataclass per concern, gathered in EngineConfig.

EngineArgs (engine_args.py) turns flat user options into these; everything below the entrypoints reads them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "half": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def resolve_dtype(dtype: str | torch.dtype, config_dtype: Optional[torch.dtype], device: str) -> torch.dtype:
    """'auto' follows the checkpoint's dtype on CUDA (bf16 when it is float32), and float32 on the CPU.

    The CPU default is float32 because that is what the reference (transformers) runs and our CPU path is a
    reference first; pass dtype="bfloat16" for speed on CPUs with native bf16.
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device == "cpu":
            return torch.float32
        if config_dtype in (torch.float16, torch.bfloat16):
            return config_dtype
        return torch.bfloat16
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ValueError(f"dtype must be one of auto, {', '.join(sorted(_DTYPES))}; got {dtype!r}") from None


@dataclass
class ModelConfig:
    model: str  # what the user named (path, GGUF file, or HF id)
    source: Any  # loader.source.ModelSource
    hf_config: Any  # transformers.PretrainedConfig
    dtype: torch.dtype
    max_model_len: int
    load_format: str = "auto"  # auto | safetensors | gguf | dummy
    seed: int = 0
    tokenizer: Optional[str] = None
    served_model_name: Optional[str] = None
    skip_tokenizer_init: bool = False
    enforce_eager: bool = False  # CUDA: no decode CUDA graphs
    # Default sampling parameters (SamplingParams' names) from the model's generation_config.json, used where a
    # request leaves them out (EngineArgs.generation_config says where they come from).
    sampling_defaults: dict = field(default_factory=dict)

    @property
    def architecture(self) -> str:
        archs = getattr(self.hf_config, "architectures", None) or []
        return archs[0] if archs else "LlamaForCausalLM"

    @property
    def num_layers(self) -> int:
        return self.hf_config.num_hidden_layers

    @property
    def num_kv_heads(self) -> int:
        return getattr(self.hf_config, "num_key_value_heads", None) or self.hf_config.num_attention_heads

    @property
    def head_dim(self) -> int:
        hd = getattr(self.hf_config, "head_dim", None)
        return hd or self.hf_config.hidden_size // self.hf_config.num_attention_heads

    @property
    def vocab_size(self) -> int:
        return self.hf_config.vocab_size


@dataclass
class CacheConfig:
    block_size: int = 16
    enable_prefix_caching: bool = True
    kv_cache_memory: Optional[int] = None  # bytes for the KV cache; None: a fraction of free memory
    gpu_memory_utilization: float = 0.9  # fraction of device memory the engine may use (CPU: of free RAM)
    num_blocks: Optional[int] = None  # set by the worker after sizing the KV cache


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int = 2048
    policy: str = "fcfs"  # fcfs | priority
    max_queued_requests: Optional[int] = None
    # Schedule step N+1 while step N runs on the device (decodes scheduled ahead of their input token).
    async_scheduling: bool = False


@dataclass
class DeviceConfig:
    device: str = "cpu"


@dataclass
class ParallelConfig:
    """How many devices one engine spans (tensor x pipeline) and how many engines serve (data parallel)."""

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    data_parallel_size: int = 1  # engine cores behind one API server (the server only)
    data_parallel_rank: int = 0  # which of them this engine core is (picks its devices)
    # uni (the worker in the engine's process) | mp (one process per rank) | ray (one Ray actor per rank);
    # None: uni at world size 1, else mp.
    distributed_executor_backend: Optional[str] = None
    # mp/ray: how long the engine waits for its workers' answer to one step before it declares them hung.
    step_timeout_s: float = 300.0

    @property
    def world_size(self) -> int:
        """Processes (devices) of one engine: tensor_parallel_size x pipeline_parallel_size."""
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def executor_backend(self) -> str:
        return self.distributed_executor_backend or ("mp" if self.world_size > 1 else "uni")


@dataclass
class SpeculativeConfig:
    """Speculative decoding, as vLLM spells it: `{"method": "ngram", "num_speculative_tokens": 4,
    "prompt_lookup_min": 2, "prompt_lookup_max": 5}`. Only n-gram (prompt lookup) exists so far; a draft model
    is refused by name rather than silently ignored."""

    method: str = "ngram"
    num_speculative_tokens: int = 0
    # n-gram: the shortest and longest suffix looked up; one given alone sets both, none gives 5 and 5 (vLLM).
    prompt_lookup_min: Optional[int] = None
    prompt_lookup_max: Optional[int] = None

    @classmethod
    def from_dict(cls, options: Any) -> "SpeculativeConfig":
        """A user's dict (or JSON text); ValueError naming the field on anything wrong."""
        import json

        if isinstance(options, str):
            try:
                options = json.loads(options)
            except ValueError as e:
                raise ValueError(f"speculative_config: not valid JSON ({e})") from None
        if isinstance(options, SpeculativeConfig):
            return options
        if not isinstance(options, dict):
            raise ValueError(f"speculative_config must be a dict (JSON object), got {type(options).__name__}")
        options = dict(options)
        if options.get("model") is not None:
            raise ValueError("speculative_config.model: draft-model speculation is not supported yet; use "
                             '{"method": "ngram", ...}')
        options.pop("model", None)
        known = {"method", "num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max"}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"speculative_config.{unknown[0]}: unknown field (known: {sorted(known)})")
        if "num_speculative_tokens" not in options:
            raise ValueError("speculative_config.num_speculative_tokens is required")
        config = cls(**options)
        config.validate()
        return config

    def validate(self) -> None:
        if self.method != "ngram":
            raise ValueError(f"speculative_config.method: only 'ngram' is supported, got {self.method!r}")

        def integer(name: str, value: Any, low: int) -> None:
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"speculative_config.{name} must be an integer >= {low}, got {value!r}")

        integer("num_speculative_tokens", self.num_speculative_tokens, 1)
        if self.prompt_lookup_min is None and self.prompt_lookup_max is None:
            self.prompt_lookup_min = self.prompt_lookup_max = 5
        elif self.prompt_lookup_min is None:
            self.prompt_lookup_min = self.prompt_lookup_max
        elif self.prompt_lookup_max is None:
            self.prompt_lookup_max = self.prompt_lookup_min
        integer("prompt_lookup_min", self.prompt_lookup_min, 1)
        integer("prompt_lookup_max", self.prompt_lookup_max, 1)
        if self.prompt_lookup_max < self.prompt_lookup_min:
            raise ValueError(f"speculative_config.prompt_lookup_max ({self.prompt_lookup_max}) must be at least "
                             f"prompt_lookup_min ({self.prompt_lookup_min})")


@dataclass
class EngineConfig:
    model_config: ModelConfig
    cache_config: CacheConfig
    scheduler_config: SchedulerConfig
    device_config: DeviceConfig = field(default_factory=DeviceConfig)
    parallel_config: ParallelConfig = field(default_factory=ParallelConfig)
    speculative_config: Optional[SpeculativeConfig] = None
