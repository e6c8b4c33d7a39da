"""Worker: owns one device, its model runner and its KV cache, and decides how many KV blocks fit.

With tensor or pipeline parallelism there is one Worker per device, each in its own process (executor/): the
worker joins the engine's torch.distributed group (NCCL on GPUs, gloo on CPUs) before its model is built, so
the layers shard themselves for its rank. At world size 1 it initializes nothing distributed.
"""

from __future__ import annotations

import logging
import os

import torch

from typing import Optional

from pagellm.config import EngineConfig
from pagellm.core.sched_output import ModelRunnerOutput, SchedulerOutput
from pagellm.distributed.parallel_state import get_pp_group, get_tp_group, init_distributed_environment
from pagellm.worker.model_runner import ModelRunner, PendingOutput

logger = logging.getLogger(__name__)

# Without an explicit kv_cache_memory the CPU gives the KV cache this share of the RAM that is available,
# leaving the rest to the model, activations and the rest of the machine.
CPU_KV_FRACTION = 0.1


def available_cpu_memory() -> int:
    """Bytes of RAM available to new allocations (MemAvailable), or total RAM where /proc is absent."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def device_for_rank(config: EngineConfig, local_rank: Optional[int]) -> torch.device:
    """This worker's device. On CUDA, data-parallel engine d's rank r uses GPU base + d * world_size + r
    (`local_rank` overrides that: Ray gives each actor its own CUDA_VISIBLE_DEVICES, so there it is 0)."""
    device = config.device_config.device
    pc = config.parallel_config
    if not device.startswith("cuda"):
        return torch.device(device)
    if local_rank is None:
        local_rank = pc.data_parallel_rank * pc.world_size
    base = int(device.split(":", 1)[1]) if ":" in device else 0
    return torch.device("cuda", base + local_rank)


class Worker:
    def __init__(self, config: EngineConfig, rank: int = 0, local_rank: Optional[int] = None,
                 distributed_init_method: Optional[str] = None) -> None:
        self.config = config
        self.rank = rank
        pc = config.parallel_config
        if local_rank is None and pc.world_size > 1:
            local_rank = pc.data_parallel_rank * pc.world_size + rank
        self.device = device_for_rank(config, local_rank)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if pc.world_size > 1:
            if distributed_init_method is None:
                raise ValueError("a worker of a multi-device engine needs distributed_init_method")
            init_distributed_environment(pc.world_size, rank, distributed_init_method, pc.tensor_parallel_size,
                                         pc.pipeline_parallel_size,
                                         backend="nccl" if self.device.type == "cuda" else "gloo",
                                         enable_expert_parallel=pc.enable_expert_parallel)
        torch.manual_seed(config.model_config.seed)
        self.runner = ModelRunner(config, self.device)

    @property
    def is_driver(self) -> bool:
        """The rank whose ModelRunnerOutput the engine reads: TP rank 0 of the last pipeline stage."""
        return get_pp_group().is_last_rank and get_tp_group().is_first_rank

    def load_model(self) -> None:
        self.runner.load_model()
        if get_pp_group().world_size > 1:
            from pagellm.worker.pipeline import PipelineStage

            mc = self.config.model_config
            self.runner.model = PipelineStage(self.runner.model, mc.arch.hidden_size, mc.dtype, self.device)

    def determine_num_blocks(self) -> int:
        """Blocks of KV cache that fit: kv_cache_memory bytes if given, else a share of the free memory."""
        cache = self.config.cache_config
        per_block = self.runner.kv_cache_bytes_per_block()
        if cache.kv_cache_memory is not None:
            budget = cache.kv_cache_memory
        elif self.device.type == "cuda":
            budget = self._profile_cuda_budget()
        else:
            budget = int(available_cpu_memory() * CPU_KV_FRACTION)
        num_blocks = budget // per_block
        mc = self.config.model_config
        if num_blocks * cache.block_size < mc.max_model_len:
            raise ValueError(
                f"kv_cache_memory: {budget} bytes hold {num_blocks} blocks ({num_blocks * cache.block_size} tokens), "
                f"fewer than max_model_len ({mc.max_model_len}); give more memory or a smaller max_model_len"
            )
        logger.info(
            "KV cache: %d blocks of %d tokens (%d tokens, %.2f GiB, %s)",
            num_blocks, cache.block_size, num_blocks * cache.block_size, num_blocks * per_block / 2**30,
            str(self.runner.kv_cache_dtype).replace("torch.", ""),
        )
        return num_blocks

    def _profile_cuda_budget(self) -> int:
        """gpu_memory_utilization of the device, minus the weights, the peak activations of the largest step
        (measured by running it), the decode CUDA graphs' pool (estimated: they are captured after the KV cache
        exists) and whatever other processes hold."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        free, total = torch.cuda.mem_get_info(self.device)
        used_by_others = total - free - torch.cuda.memory_reserved(self.device)
        weights = torch.cuda.memory_allocated(self.device)
        profile_kv = self.runner.profile_run()
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - profile_kv  # the profile's own small KV cache
        graphs = self.runner.graph_memory_estimate()
        budget = int(total * self.config.cache_config.gpu_memory_utilization) - peak - graphs - max(used_by_others, 0)
        logger.info("GPU memory: %.1f GiB total, weights %.2f GiB, peak activations %.2f GiB, CUDA graphs ~%.2f GiB, "
                    "others %.2f GiB -> KV cache %.2f GiB (gpu_memory_utilization %.2f)", total / 2**30,
                    weights / 2**30, (peak - weights) / 2**30, graphs / 2**30, max(used_by_others, 0) / 2**30,
                    max(budget, 0) / 2**30, self.config.cache_config.gpu_memory_utilization)
        torch.cuda.empty_cache()
        return max(budget, 0)

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self.runner.initialize_kv_cache(num_blocks)

    def shutdown(self) -> None:
        """Give the device memory back now (weights, KV cache, graphs), not whenever the engine is collected."""
        self.runner.release()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self.runner.execute_model(scheduler_output)

    def execute_model_async(self, scheduler_output: SchedulerOutput) -> PendingOutput:
        """Launch the step; `.result()` of the answer waits for it (async scheduling)."""
        return self.runner.execute_model_async(scheduler_output)

    def collect(self, pending: PendingOutput) -> ModelRunnerOutput:
        """A launched step's answer (waits for it), with any drafts proposed after it."""
        return self.runner.collect(pending)
