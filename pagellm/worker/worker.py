"""Worker: owns one device, its model runner and its KV cache, and decides how many KV blocks fit."""

from __future__ import annotations

import logging
import os

import torch

from pagellm.config import EngineConfig
from pagellm.core.sched_output import ModelRunnerOutput, SchedulerOutput
from pagellm.worker.model_runner import ModelRunner

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


class Worker:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = torch.device(config.device_config.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        torch.manual_seed(config.model_config.seed)
        self.runner = ModelRunner(config, self.device)

    def load_model(self) -> None:
        self.runner.load_model()

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
            "KV cache: %d blocks of %d tokens (%d tokens, %.2f GiB)",
            num_blocks, cache.block_size, num_blocks * cache.block_size, num_blocks * per_block / 2**30,
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
