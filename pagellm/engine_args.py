"""EngineArgs: one set of options for both `pagellm` CLI flags and `LLM(**kwargs)`, with vLLM's names."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch

from pagellm.arch_config import text_config_of
from pagellm.config import (
    CacheConfig,
    DeviceConfig,
    EngineConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
    SpeculativeConfig,
    KV_CACHE_DTYPES,
    resolve_dtype,
    resolve_kv_cache_dtype,
)
from pagellm.model_executor.layers.quantization import QUANTIZATION_METHODS, get_quant_config, resolve_quantization
from pagellm.model_executor.models.model_impl import MODEL_IMPLS, resolve_model_impl

logger = logging.getLogger(__name__)

RUNNERS = ["auto", "generate", "pooling"]

_HELP = {
    "model": "model: an HF model folder, a .gguf file, or a Hugging Face Hub id (from the local HF cache, else "
    "downloaded: config, tokenizer and safetensors) (default: the embedded SmolLM2-135M-Instruct GGUF)",
    "trust_remote_code": "let transformers run the model folder's own config and tokenizer code (the model itself "
    "always runs pagellm's implementation of its architecture)",
    "generation_config": "where default sampling parameters come from: auto (the model's generation_config.json: "
    "temperature, top_p, top_k, min_p, repetition_penalty, max_new_tokens), vllm (none: the engine's defaults), "
    "or a folder holding a generation_config.json; a request's own values always win",
    "enable_chunked_prefill": "chunked prefill is always on (prompts longer than the step's token budget are "
    "split); accepted for vLLM's flag, false is refused",
    "runner": "what the model is run for: generate (text generation), pooling (embeddings: llm.embed, "
    "/v1/embeddings, /v1/score), or auto (pooling for an encoder-only model such as BertModel or a "
    "sentence-transformers folder, else generate)",
    "tokenizer": "tokenizer folder, if not the model's own",
    "dtype": "weights and activations: auto (float32 on CPU, the checkpoint's bf16/fp16 on CUDA), "
    "float32, bfloat16 or float16",
    "max_model_len": "longest prompt + output in tokens (default: the model's max_position_embeddings)",
    "block_size": "tokens per KV-cache block",
    "enable_prefix_caching": "reuse the KV cache of shared prompt prefixes",
    "max_num_seqs": "most requests in one step (default: 256 on CUDA, 64 on CPU)",
    "max_num_batched_tokens": "token budget of one step; longer prompts are chunked (default: 8192 on CUDA, "
    "2048 on CPU)",
    "seed": "random seed of the engine (requests without their own seed)",
    "load_format": "auto (GGUF or safetensors by what the model is), safetensors, gguf, or dummy (random weights)",
    "kv_cache_memory": "bytes for the KV cache (default: on CUDA, what gpu_memory_utilization leaves; on CPU, "
    "10%% of available RAM)",
    "kv_cache_dtype": "how K and V are stored in the KV cache: auto (the model's dtype) or fp8 (= fp8_e4m3: "
    "float8 e4m3 with a per-layer scale for K and for V, from the checkpoint's k_scale/v_scale or 1.0; twice the "
    "blocks of bf16 in the same memory; CUDA needs compute capability 8.9+)",
    "gpu_memory_utilization": "fraction of the GPU memory the engine may use for weights, activations and KV cache",
    "device": "auto (cuda if available, else cpu), cuda, cuda:N or cpu",
    "scheduling_policy": "fcfs (first come, first served) or priority (lower value first, then arrival)",
    "served_model_name": "model name in the API (default: the model argument)",
    "skip_tokenizer_init": "load no tokenizer: prompts must be token ids and outputs carry no text",
    "enforce_eager": "CUDA: run every step eagerly (no CUDA graphs for decode batches)",
    "async_scheduling": "schedule and launch each step while the one before it runs on the device, hiding the "
    "host's per-step work (default: on with CUDA unless pipeline_parallel_size > 1, off on the CPU)",
    "tensor_parallel_size": "devices that split every layer's weights (one worker process per device)",
    "enable_expert_parallel": "Mixture-of-Experts models: split whole experts over the tensor-parallel ranks "
    "instead of slicing every expert's MLP (attention stays tensor-parallel)",
    "pipeline_parallel_size": "pipeline stages: devices that each hold a contiguous slice of the layers",
    "data_parallel_size": "engine cores behind one server (each with its own devices and KV cache); requests go "
    "to the least loaded, conversations stay on the core that caches their prefix (server only)",
    "distributed_step_timeout": "seconds a multi-device engine (mp or ray) waits for its workers' answer to one "
    "step before it declares them hung: the step fails and the engine reports unhealthy",
    "speculative_config": 'speculative decoding, as JSON: {"method": "ngram", "num_speculative_tokens": 4, '
    '"prompt_lookup_min": 2, "prompt_lookup_max": 5} drafts up to 4 tokens by looking up the last 2-5 tokens in '
    "the request's own prompt and output, and verifies them in one forward pass; each request drafts fewer, down "
    "to none, when its acceptance does not pay; \"disable_by_batch_size\": N (default 64) proposes nothing "
    "while more than N requests run (one device for now)",
    "quantization": "weight quantization: fp8 or int8 (a float checkpoint quantized per channel at load, "
    "activations per token), or the checkpoint's own format, detected from its quantization_config: gptq, awq "
    "(4-bit weights) or compressed-tensors (FP8/INT8 W8A8); with --load-format dummy, gptq and awq give random "
    "4-bit weights (group size 128)",
    "model_impl": "which implementation runs the model: auto (pagellm's own when it has the architecture, else "
    "the transformers fallback: transformers' modules with pagellm's paged attention; one device, float weights, "
    "no CUDA graphs), pagellm, or transformers (the fallback even for an architecture pagellm has)",
    "enable_lora": "serve LoRA adapters (PEFT folders: adapter_config.json + adapter_model.safetensors) on the "
    "q/k/v/o and gate/up/down projections; requests for different adapters share a batch",
    "lora_modules": "an adapter served from the start, as name=path (repeatable); a request picks it by its "
    "model field (server) or LoRARequest (LLM)",
    "max_loras": "adapters one batch may use at once (each holds a slot of max_lora_rank on the device)",
    "max_lora_rank": "largest adapter rank served (8, 16, 32, 64, ...); a higher-rank adapter is refused",
    "limit_mm_per_prompt": 'most images one prompt may hold, as JSON: {"image": 2} (default 4); vision models '
    "only (LLaVA-1.5)",
    "allowed_local_media_path": "a folder whose images requests may name as file:// URLs (default: none, file:// "
    "is refused)",
    "allowed_media_domains": "hosts whose http(s) image URLs the server fetches (repeatable; default: none, "
    "only data: URLs are read)",
    "distributed_executor_backend": "how the workers of a multi-device engine run: mp (one local process per "
    "device, the default) or ray (Ray actors in a placement group); uni: in the engine's process (1 device)",
}


@dataclass
class EngineArgs:
    model: Optional[str] = None
    tokenizer: Optional[str] = None
    dtype: str = "auto"
    max_model_len: Optional[int] = None
    block_size: int = 16
    enable_prefix_caching: bool = True
    max_num_seqs: Optional[int] = None
    max_num_batched_tokens: Optional[int] = None
    seed: int = 0
    load_format: str = "auto"
    kv_cache_memory: Optional[int] = None
    kv_cache_dtype: str = "auto"
    gpu_memory_utilization: float = 0.9
    device: str = "auto"
    scheduling_policy: str = "fcfs"
    served_model_name: Optional[str] = None
    skip_tokenizer_init: bool = False
    enforce_eager: bool = False
    async_scheduling: Optional[bool] = None
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    enable_expert_parallel: bool = False
    data_parallel_size: int = 1
    distributed_executor_backend: Optional[str] = None
    distributed_step_timeout: float = 300.0
    speculative_config: Optional[Any] = None  # a dict (LLM) or JSON text (CLI); see SpeculativeConfig
    quantization: Optional[str] = None
    trust_remote_code: bool = False
    generation_config: str = "auto"
    enable_chunked_prefill: Optional[bool] = None
    runner: str = "auto"
    model_impl: str = "auto"
    enable_lora: bool = False
    lora_modules: Optional[Any] = None  # list of "name=path" (CLI, LLM) or {name: path} (LLM)
    max_loras: int = 1
    max_lora_rank: int = 16
    limit_mm_per_prompt: Optional[Any] = None  # {"image": N} (LLM) or its JSON text (CLI)
    allowed_local_media_path: Optional[str] = None
    allowed_media_domains: Optional[list[str]] = None
    data_parallel_rank: int = 0  # set by the data-parallel server for each engine core; not a CLI flag

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser, positional_model: bool = False) -> argparse.ArgumentParser:
        defaults = EngineArgs()
        if positional_model:  # `pagellm serve MODEL` or, as vLLM's api_server takes it, `--model MODEL`
            parser.add_argument("model", nargs="?", default=None, help=_HELP["model"])
            parser.add_argument("--model", dest="model_option", default=None, metavar="MODEL",
                                help="the model, as the positional argument")
        else:
            parser.add_argument("--model", default=None, help=_HELP["model"])
        parser.add_argument("--trust-remote-code", action="store_true", help=_HELP["trust_remote_code"])
        parser.add_argument("--generation-config", default=defaults.generation_config,
                            help=_HELP["generation_config"])
        parser.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction, default=None,
                            help=_HELP["enable_chunked_prefill"])
        parser.add_argument("--runner", default=defaults.runner, choices=RUNNERS, help=_HELP["runner"])
        parser.add_argument("--model-impl", default=defaults.model_impl, choices=["auto", "pagellm", "transformers"],
                            help=_HELP["model_impl"])
        parser.add_argument("--tokenizer", default=None, help=_HELP["tokenizer"])
        parser.add_argument("--dtype", default=defaults.dtype, help=_HELP["dtype"])
        parser.add_argument("--max-model-len", type=int, default=None, help=_HELP["max_model_len"])
        parser.add_argument("--block-size", type=int, default=defaults.block_size, help=_HELP["block_size"])
        parser.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                            default=defaults.enable_prefix_caching, help=_HELP["enable_prefix_caching"])
        parser.add_argument("--max-num-seqs", type=int, default=None, help=_HELP["max_num_seqs"])
        parser.add_argument("--max-num-batched-tokens", type=int, default=None, help=_HELP["max_num_batched_tokens"])
        parser.add_argument("--seed", type=int, default=defaults.seed, help=_HELP["seed"])
        parser.add_argument("--load-format", default=defaults.load_format,
                            choices=["auto", "safetensors", "gguf", "dummy"], help=_HELP["load_format"])
        parser.add_argument("--kv-cache-memory", type=int, default=None, help=_HELP["kv_cache_memory"])
        parser.add_argument("--kv-cache-dtype", default=defaults.kv_cache_dtype, choices=list(KV_CACHE_DTYPES),
                            help=_HELP["kv_cache_dtype"])
        parser.add_argument("--gpu-memory-utilization", type=float, default=defaults.gpu_memory_utilization,
                            help=_HELP["gpu_memory_utilization"])
        parser.add_argument("--device", default=defaults.device, help=_HELP["device"])
        parser.add_argument("--scheduling-policy", default=defaults.scheduling_policy, choices=["fcfs", "priority"],
                            help=_HELP["scheduling_policy"])
        parser.add_argument("--served-model-name", default=None, help=_HELP["served_model_name"])
        parser.add_argument("--skip-tokenizer-init", action="store_true", help=_HELP["skip_tokenizer_init"])
        parser.add_argument("--enforce-eager", action="store_true", help=_HELP["enforce_eager"])
        parser.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                            help=_HELP["async_scheduling"])
        parser.add_argument("--tensor-parallel-size", "-tp", type=int, default=1, help=_HELP["tensor_parallel_size"])
        parser.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1,
                            help=_HELP["pipeline_parallel_size"])
        parser.add_argument("--enable-expert-parallel", action="store_true", help=_HELP["enable_expert_parallel"])
        parser.add_argument("--data-parallel-size", "-dp", type=int, default=1, help=_HELP["data_parallel_size"])
        parser.add_argument("--distributed-executor-backend", default=None, choices=["uni", "mp", "ray"],
                            help=_HELP["distributed_executor_backend"])
        parser.add_argument("--distributed-step-timeout", type=float, default=defaults.distributed_step_timeout,
                            help=_HELP["distributed_step_timeout"])
        parser.add_argument("--speculative-config", default=None, help=_HELP["speculative_config"])
        parser.add_argument("--quantization", "-q", default=None, help=_HELP["quantization"])
        parser.add_argument("--enable-lora", action="store_true", help=_HELP["enable_lora"])
        parser.add_argument("--lora-modules", action="append", default=None, metavar="NAME=PATH",
                            help=_HELP["lora_modules"])
        parser.add_argument("--max-loras", type=int, default=defaults.max_loras, help=_HELP["max_loras"])
        parser.add_argument("--max-lora-rank", type=int, default=defaults.max_lora_rank, help=_HELP["max_lora_rank"])
        parser.add_argument("--limit-mm-per-prompt", default=None, help=_HELP["limit_mm_per_prompt"])
        parser.add_argument("--allowed-local-media-path", default=None, help=_HELP["allowed_local_media_path"])
        parser.add_argument("--allowed-media-domains", action="append", default=None, metavar="HOST",
                            help=_HELP["allowed_media_domains"])
        return parser

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> "EngineArgs":
        option = getattr(args, "model_option", None)
        if option is not None:
            if getattr(args, "model", None) not in (None, option):
                raise ValueError(f"model: given twice ({args.model!r} and --model {option!r})")
            args.model = option
        return cls(**{name: getattr(args, name) for name in cls.field_names() if hasattr(args, name)})

    def _validate(self) -> None:
        def positive(name: str, value: Any) -> None:
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

        for name in ("block_size", "max_model_len", "max_num_seqs", "max_num_batched_tokens", "kv_cache_memory",
                     "tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size", "max_loras",
                     "max_lora_rank"):
            positive(name, getattr(self, name))
        if not (isinstance(self.distributed_step_timeout, (int, float)) and self.distributed_step_timeout > 0):
            raise ValueError(f"distributed_step_timeout must be a positive number of seconds, got "
                             f"{self.distributed_step_timeout!r}")
        if self.distributed_executor_backend not in (None, "uni", "mp", "ray"):
            raise ValueError(f"distributed_executor_backend must be uni, mp or ray, got "
                             f"{self.distributed_executor_backend!r}")
        if self.distributed_executor_backend == "uni" and self.tensor_parallel_size * self.pipeline_parallel_size > 1:
            raise ValueError("distributed_executor_backend='uni' runs one worker: use mp or ray with "
                             "tensor_parallel_size or pipeline_parallel_size > 1")
        if self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.scheduling_policy not in ("fcfs", "priority"):
            raise ValueError(f"scheduling_policy must be fcfs or priority, got {self.scheduling_policy!r}")
        resolve_kv_cache_dtype(self.kv_cache_dtype, torch.float32)  # a bad name fails here, naming the option
        if self.speculative_config is not None:
            SpeculativeConfig.from_dict(self.speculative_config)  # fails before the model loads
        if self.quantization is not None and self.quantization not in QUANTIZATION_METHODS:
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATION_METHODS)}; got "
                             f"{self.quantization!r}")
        if self.enable_chunked_prefill is False:
            raise ValueError("enable_chunked_prefill: pagellm always chunks prefills (a prompt longer than "
                             "max_num_batched_tokens is split over steps); it cannot be turned off. To schedule a "
                             "whole prompt in one step, raise max_num_batched_tokens to max_model_len")
        if self.runner not in RUNNERS:
            raise ValueError(f"runner must be one of {', '.join(RUNNERS)}, got {self.runner!r}")
        if self.model_impl not in MODEL_IMPLS:
            raise ValueError(f"model_impl must be one of {', '.join(MODEL_IMPLS)}; got {self.model_impl!r}")
        if not isinstance(self.trust_remote_code, bool):
            raise ValueError(f"trust_remote_code must be a boolean, got {self.trust_remote_code!r}")
        if self.load_format not in ("auto", "safetensors", "gguf", "dummy"):
            raise ValueError(f"load_format must be auto, safetensors, gguf or dummy, got {self.load_format!r}")

    def resolved_runner(self) -> str:
        """generate or pooling, from the option or (auto) the model's config, without loading weights."""
        from pagellm.model_executor.loader.source import load_hf_config, resolve_model_source

        if self.runner in ("generate", "pooling"):
            return self.runner
        source = resolve_model_source(self.model, self.trust_remote_code)
        return resolve_runner(self.runner, source, load_hf_config(source))

    def resolve_device(self) -> str:
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device: {self.device} was asked for, but CUDA is not available")
        if self.device != "cpu" and not self.device.startswith("cuda"):
            raise ValueError(f"device must be auto, cpu or cuda[:N], got {self.device!r}")
        return self.device

    def create_engine_config(self) -> EngineConfig:
        from pagellm.model_executor.loader.source import generation_defaults, load_hf_config, resolve_model_source

        self._validate()
        device = self.resolve_device()
        on_cuda = device.startswith("cuda")
        source = resolve_model_source(self.model, self.trust_remote_code)
        hf_config = load_hf_config(source)
        sampling_defaults = generation_defaults(source, self.generation_config)
        if sampling_defaults:
            from pagellm.sampling_params import SamplingParams

            try:
                SamplingParams(**sampling_defaults)
            except ValueError as e:
                raise ValueError(f"generation_config: the model's default sampling parameters are invalid: {e} "
                                 "(--generation-config vllm ignores them)") from None
            logger.info("default sampling parameters from the model's generation config: %s", sampling_defaults)
        config_dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
        if isinstance(config_dtype, str):
            config_dtype = getattr(torch, config_dtype, None)
        dtype = resolve_dtype(self.dtype, config_dtype, device)
        model_max = getattr(text_config_of(hf_config), "max_position_embeddings", None) or 2048
        if self.max_model_len is not None and self.max_model_len > model_max:
            raise ValueError(f"max_model_len ({self.max_model_len}) exceeds the model's max_position_embeddings "
                             f"({model_max})")
        max_model_len = self.max_model_len or model_max
        model_impl = resolve_model_impl(hf_config, self.model_impl)
        enforce_eager = self.enforce_eager
        if model_impl == "transformers":
            check_fallback_options(self, on_cuda)
            enforce_eager = True  # transformers' layers run eagerly: no CUDA graphs
        quantization = resolve_quantization(self.quantization, hf_config)
        get_quant_config(quantization, hf_config, self.load_format)  # a format it cannot build fails here
        model_config = ModelConfig(
            model=self.model or source.display_name,
            source=source,
            hf_config=hf_config,
            dtype=dtype,
            max_model_len=max_model_len,
            load_format=self.load_format,
            seed=self.seed,
            tokenizer=self.tokenizer,
            served_model_name=self.served_model_name,
            skip_tokenizer_init=self.skip_tokenizer_init,
            enforce_eager=enforce_eager,
            model_impl=model_impl,
            quantization=quantization,
            sampling_defaults=sampling_defaults,
            runner=resolve_runner(self.runner, source, hf_config),
            multimodal_config=self._multimodal_config(),
        )
        max_num_seqs = self.max_num_seqs or (256 if on_cuda else 64)
        max_batched = self.max_num_batched_tokens or (8192 if on_cuda else 2048)
        scheduler_config = SchedulerConfig(
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_batched,
            max_model_len=max_model_len,
            policy=self.scheduling_policy,
        )
        cache_config = CacheConfig(
            block_size=self.block_size,
            enable_prefix_caching=self.enable_prefix_caching,
            kv_cache_memory=self.kv_cache_memory,
            gpu_memory_utilization=self.gpu_memory_utilization,
            kv_cache_dtype=self.kv_cache_dtype,
        )
        parallel_config = ParallelConfig(
            tensor_parallel_size=self.tensor_parallel_size,
            pipeline_parallel_size=self.pipeline_parallel_size,
            enable_expert_parallel=bool(self.enable_expert_parallel),
            data_parallel_size=self.data_parallel_size,
            data_parallel_rank=self.data_parallel_rank,
            distributed_executor_backend=self.distributed_executor_backend,
            step_timeout_s=self.distributed_step_timeout,
        )
        check_parallel_fits_model(model_config.arch, parallel_config)
        from pagellm.model_executor.models.registry import is_multimodal

        if parallel_config.pipeline_parallel_size > 1 and is_multimodal(hf_config):
            raise ValueError("pipeline_parallel_size: a vision model runs with one pipeline stage for now (tensor "
                             "parallelism works)")
        speculative_config = None
        async_scheduling = self.async_scheduling
        if self.speculative_config is not None:
            speculative_config = SpeculativeConfig.from_dict(self.speculative_config)
            if speculative_config.model is not None:
                from pagellm.spec_decode.draft_model import draft_model_config

                speculative_config.draft_model_config = draft_model_config(speculative_config.model, model_config)
            if parallel_config.world_size > 1:
                raise ValueError("speculative_config: speculative decoding runs on one device for now (got "
                                 "tensor_parallel_size x pipeline_parallel_size = "
                                 f"{parallel_config.world_size})")
            if parallel_config.executor_backend != "uni":
                raise ValueError("speculative_config: speculative decoding runs in the engine's process for now "
                                 f"(distributed_executor_backend 'uni', got {parallel_config.executor_backend!r})")
        # Pipeline parallelism keeps one batch per stage in flight instead (EngineCore._step_pipelined).
        if self.async_scheduling and parallel_config.pipeline_parallel_size > 1:
            raise ValueError("async_scheduling: pipeline parallelism keeps a batch per stage in flight already; use "
                             "it with pipeline_parallel_size 1")
        scheduler_config.async_scheduling = (on_cuda and parallel_config.pipeline_parallel_size == 1
                                             if async_scheduling is None else async_scheduling)
        return EngineConfig(model_config, cache_config, scheduler_config, DeviceConfig(device), parallel_config,
                            speculative_config, self._lora_config(parallel_config, speculative_config))

    def _multimodal_config(self) -> Any:
        """Images per prompt and where images may come from (read by the processor of a vision model)."""
        from pagellm.multimodal.media import MediaRules
        from pagellm.multimodal.processing import MultiModalConfig, parse_limit_mm_per_prompt

        path = self.allowed_local_media_path
        if path is not None and not os.path.isdir(path):
            raise ValueError(f"allowed_local_media_path: {path!r} is not a folder")
        domains = self.allowed_media_domains or []
        if isinstance(domains, str):
            domains = [domains]
        hosts = tuple(h.strip().lower() for d in domains for h in str(d).split(",") if h.strip())
        return MultiModalConfig(parse_limit_mm_per_prompt(self.limit_mm_per_prompt), MediaRules(path, hosts))

    def _lora_config(self, parallel: ParallelConfig, speculative: Optional[SpeculativeConfig]) -> Any:
        """The LoRA limits, or None without enable_lora (adapters named without it are an error)."""
        from pagellm.lora.adapter import read_adapter_config
        from pagellm.lora.config import LoRAConfig, parse_lora_modules

        modules = parse_lora_modules(self.lora_modules)
        if not self.enable_lora:
            if modules:
                raise ValueError("lora_modules: adapters need enable_lora (--enable-lora)")
            return None
        if parallel.tensor_parallel_size > 1:
            raise ValueError("enable_lora: LoRA runs with tensor_parallel_size 1 for now")
        if speculative is not None:
            raise ValueError("enable_lora: LoRA and speculative_config do not run together yet")
        for m in modules:
            read_adapter_config(m.lora_path, self.max_lora_rank)  # missing files, rank above max: fail at start
        return LoRAConfig(self.max_loras, self.max_lora_rank, modules)


def check_fallback_options(args: EngineArgs, on_cuda: bool) -> None:
    """What the transformers fallback cannot do fails here, naming the option, before any model is built."""
    if args.tensor_parallel_size * args.pipeline_parallel_size > 1:
        raise ValueError("model_impl: the transformers fallback runs on one device; tensor_parallel_size and "
                         "pipeline_parallel_size must be 1")
    if args.quantization is not None:
        raise ValueError("quantization: the transformers fallback runs float weights only")
    if on_cuda and not args.enforce_eager:
        logger.info("the transformers fallback runs eagerly (no CUDA graphs)")


def resolve_runner(runner: str, source: Any, hf_config: Any) -> str:
    """auto -> pooling for pooling models (pooling/st_config.py says which), else generate."""
    from pagellm.pooling.st_config import is_encoder, is_pooling_model

    folder = source.path if source.kind == "hf" else None
    if runner == "auto":
        return "pooling" if is_pooling_model(folder, hf_config) else "generate"
    if runner == "generate" and is_encoder(hf_config):
        raise ValueError(f"runner: {hf_config.architectures[0]} is an encoder-only model and cannot generate "
                         "text; use runner='pooling' (or 'auto')")
    return runner


def check_parallel_fits_model(arch: Any, parallel: ParallelConfig) -> None:
    """Fail early, naming the option, when the model (an ArchConfig) cannot be split as asked."""
    tp, pp = parallel.tensor_parallel_size, parallel.pipeline_parallel_size
    heads, kv_heads = arch.num_heads, arch.num_kv_heads
    if heads % tp:
        raise ValueError(f"tensor_parallel_size ({tp}) must divide num_attention_heads ({heads})")
    if kv_heads % tp and tp % kv_heads:
        raise ValueError(f"tensor_parallel_size ({tp}) must divide num_key_value_heads ({kv_heads}) or be a "
                         f"multiple of it")
    inter = arch.intermediate_size
    if inter and inter % tp:
        raise ValueError(f"tensor_parallel_size ({tp}) must divide intermediate_size ({inter})")
    if pp > arch.num_layers:
        raise ValueError(f"pipeline_parallel_size ({pp}) exceeds the model's {arch.num_layers} layers")
    if arch.num_experts:  # a Mixture-of-Experts model
        if parallel.enable_expert_parallel and arch.num_experts % tp:
            raise ValueError(f"enable_expert_parallel: tensor_parallel_size ({tp}) must divide the number of "
                             f"experts ({arch.num_experts})")
        if not parallel.enable_expert_parallel and arch.moe_intermediate_size % tp:
            raise ValueError(f"tensor_parallel_size ({tp}) must divide the experts' intermediate size "
                             f"({arch.moe_intermediate_size}), or use enable_expert_parallel")
