"""Process-group state for tensor and pipeline parallelism (torch.distributed: NCCL on GPUs, gloo on CPUs).

At size 1 (the default, and whenever torch.distributed was never initialized) every group is a trivial one
and every collective is a no-op that returns its input: single-device code pays nothing.
"""

from pagellm.distributed.parallel_state import (
    GroupCoordinator,
    destroy_distributed_environment,
    get_pp_group,
    get_tp_group,
    get_world_group,
    init_distributed_environment,
    model_parallel_is_initialized,
    pp_layer_range,
    tensor_model_parallel_all_gather,
    tensor_model_parallel_all_reduce,
)

__all__ = [
    "GroupCoordinator",
    "destroy_distributed_environment",
    "get_pp_group",
    "get_tp_group",
    "get_world_group",
    "init_distributed_environment",
    "model_parallel_is_initialized",
    "pp_layer_range",
    "tensor_model_parallel_all_gather",
    "tensor_model_parallel_all_reduce",
]
