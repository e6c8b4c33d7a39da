"""Engine configuration: one dataclass per concern, gathered in EngineConfig.

EngineArgs (engine_args.py) turns flat user options into these; everything below the entrypoints reads them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

import torch

if TYPE_CHECKING:
    from pagellm.arch_config import ArchConfig

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


KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")


def resolve_kv_cache_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """The dtype K and V are stored in: 'auto' is the model's; 'fp8' (= 'fp8_e4m3') is float8 e4m3 with a scale
    per layer for K and one for V (attention/fp8_kv.py), half the bytes of bf16 and so twice the blocks."""
    if kv_cache_dtype == "auto":
        return model_dtype
    if kv_cache_dtype in ("fp8", "fp8_e4m3"):
        return torch.float8_e4m3fn
    raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}; got {kv_cache_dtype!r}")


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
    # auto | pagellm | transformers: pagellm's own model file or the transformers fallback (models/model_impl.py)
    model_impl: str = "auto"
    # Weight quantization method (layers/quantization): the option checked against the checkpoint; None: float.
    quantization: Optional[str] = None
    # Default sampling parameters (SamplingParams' names) from the model's generation_config.json, used where a
    # request leaves them out (EngineArgs.generation_config says where they come from).
    sampling_defaults: dict = field(default_factory=dict)
    runner: str = "generate"  # generate | pooling (pagellm/pooling: embeddings, one vector per prompt)
    # Images per prompt and the media rules (multimodal/processing.MultiModalConfig); read for vision models.
    multimodal_config: Any = None

    @property
    def arch(self) -> "ArchConfig":
        """The architecture's facts, read once from hf_config (pagellm/arch_config.py)."""
        cached = self.__dict__.get("_arch")
        if cached is None or cached[0] is not self.hf_config:
            from pagellm.arch_config import ArchConfig

            cached = (self.hf_config, ArchConfig.from_hf(self.hf_config))
            self.__dict__["_arch"] = cached
        return cached[1]

    @property
    def architecture(self) -> str:
        return self.arch.architecture or "LlamaForCausalLM"

    @property
    def num_layers(self) -> int:
        return self.arch.num_layers

    @property
    def num_kv_heads(self) -> int:
        return self.arch.num_kv_heads

    @property
    def head_dim(self) -> int:
        return self.arch.head_dim

    @property
    def vocab_size(self) -> int:
        return self.arch.vocab_size


@dataclass
class CacheConfig:
    block_size: int = 16
    enable_prefix_caching: bool = True
    kv_cache_memory: Optional[int] = None  # bytes for the KV cache; None: a fraction of free memory
    gpu_memory_utilization: float = 0.9  # fraction of device memory the engine may use (CPU: of free RAM)
    num_blocks: Optional[int] = None  # set by the worker after sizing the KV cache
    kv_cache_dtype: str = "auto"  # auto (the model's dtype) | fp8 | fp8_e4m3: see resolve_kv_cache_dtype


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
    # MoE layers: split whole experts over the tensor-parallel ranks instead of slicing every expert.
    enable_expert_parallel: bool = False
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
    "prompt_lookup_min": 2, "prompt_lookup_max": 5}` (prompt lookup), or `{"model": PATH,
    "num_speculative_tokens": 4}` (a draft model with the target's vocabulary; method "draft_model"). k is the
    most drafts a request verifies per step: each request asks for fewer, down to none, when its acceptance does
    not pay for them (spec_decode/draft_length.py)."""

    method: str = "ngram"
    num_speculative_tokens: int = 0
    # n-gram: the shortest and longest suffix looked up; one given alone sets both, none gives 5 and 5 (vLLM).
    prompt_lookup_min: Optional[int] = None
    prompt_lookup_max: Optional[int] = None
    # No drafts are proposed while the batch holds more requests than this: beyond it a verify step runs
    # without a CUDA graph and costs compute that a large batch does not have to spare (worker/speculation.py).
    disable_by_batch_size: int = 64
    # draft_model: the draft's path (or id), and its ModelConfig once the engine config resolves it.
    model: Optional[str] = None
    draft_model_config: Optional[ModelConfig] = None

    METHODS = ("ngram", "draft_model")

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
            options.setdefault("method", "draft_model")
        known = {"method", "num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max",
                 "disable_by_batch_size", "model"}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"speculative_config.{unknown[0]}: unknown field (known: {sorted(known)})")
        if "num_speculative_tokens" not in options:
            raise ValueError("speculative_config.num_speculative_tokens is required")
        config = cls(**options)
        config.validate()
        return config

    def validate(self) -> None:
        if self.method not in self.METHODS:
            raise ValueError(f"speculative_config.method must be one of {', '.join(self.METHODS)}, got "
                             f"{self.method!r}")
        if (self.method == "draft_model") != (self.model is not None):
            raise ValueError("speculative_config.model: a draft model is given by 'model' (method 'draft_model'); "
                             "'ngram' takes none")
        if self.model is not None and not isinstance(self.model, str):
            raise ValueError(f"speculative_config.model must be a path or model id, got {self.model!r}")

        def integer(name: str, value: Any, low: int) -> None:
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"speculative_config.{name} must be an integer >= {low}, got {value!r}")

        integer("num_speculative_tokens", self.num_speculative_tokens, 1)
        integer("disable_by_batch_size", self.disable_by_batch_size, 1)
        if self.method != "ngram":
            if self.prompt_lookup_min is not None or self.prompt_lookup_max is not None:
                raise ValueError("speculative_config.prompt_lookup_min/max: only the 'ngram' method looks up")
            return
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
    lora_config: Optional[Any] = None  # pagellm.lora.config.LoRAConfig when LoRA is enabled
