"""World, tensor-parallel (TP) and pipeline-parallel (PP) groups of one engine, and their collectives.

Rank layout (vLLM's): global rank = pp_rank * tp_size + tp_rank. A TP group is the tp_size consecutive ranks
of one pipeline stage; a PP group is the ranks with the same tp_rank, one per stage. The driver, the rank
whose output the executor reads, is tp_rank 0 of the last stage: global rank (pp_size - 1) * tp_size.

Every process of the engine calls `init_distributed_environment` once with the same sizes; torch.distributed
does the transport (NCCL for CUDA tensors, gloo for CPU tensors). Without it, the getters return trivial
groups of size 1 whose collectives return their input unchanged.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


class GroupCoordinator:
    """One process group seen from this rank: `ranks` (global), `rank_in_group`, `world_size`, collectives."""

    def __init__(self, ranks: list[int], rank: int, group: Optional["dist.ProcessGroup"]) -> None:
        self.ranks = list(ranks)
        self.rank = rank  # global rank of this process
        self.rank_in_group = self.ranks.index(rank)
        self.world_size = len(self.ranks)
        self.group = group

    @property
    def is_first_rank(self) -> bool:
        return self.rank_in_group == 0

    @property
    def is_last_rank(self) -> bool:
        return self.rank_in_group == self.world_size - 1

    @property
    def next_rank(self) -> int:
        """Global rank of the next member (wrapping)."""
        return self.ranks[(self.rank_in_group + 1) % self.world_size]

    @property
    def prev_rank(self) -> int:
        return self.ranks[(self.rank_in_group - 1) % self.world_size]

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over the group, in place; returns x. A no-op at size 1."""
        if self.world_size == 1:
            return x
        dist.all_reduce(x, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Every rank's x concatenated along dim, in group order. Returns x itself at size 1."""
        if self.world_size == 1:
            return x
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x, group=self.group)
        return torch.cat(parts, dim=dim)

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        """The group's first member's x, in place on every member; returns x. A no-op at size 1."""
        if self.world_size == 1:
            return x
        dist.broadcast(x, src=self.ranks[0], group=self.group)
        return x

    def send(self, x: torch.Tensor, dst: Optional[int] = None) -> None:
        """Point-to-point send to a global rank (default: the next member)."""
        dist.send(x.contiguous(), dst=self.next_rank if dst is None else dst)

    def recv(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
             src: Optional[int] = None) -> torch.Tensor:
        """Point-to-point receive from a global rank (default: the previous member)."""
        return self.recv_into(torch.empty(shape, dtype=dtype, device=device), src)

    def recv_into(self, x: torch.Tensor, src: Optional[int] = None) -> torch.Tensor:
        """recv into a given contiguous tensor (a CUDA graph's static input); returns x."""
        dist.recv(x, src=self.prev_rank if src is None else src)
        return x

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier(group=self.group)

    def __repr__(self) -> str:
        return f"GroupCoordinator(ranks={self.ranks}, rank_in_group={self.rank_in_group})"


_TRIVIAL = GroupCoordinator([0], 0, None)
_WORLD: Optional[GroupCoordinator] = None
_TP: Optional[GroupCoordinator] = None
_PP: Optional[GroupCoordinator] = None
# Expert parallelism: MoE layers split their experts over the TP group instead of slicing every expert.
_EXPERT_PARALLEL = False


def get_world_group() -> GroupCoordinator:
    return _WORLD or _TRIVIAL


def get_tp_group() -> GroupCoordinator:
    return _TP or _TRIVIAL


def get_pp_group() -> GroupCoordinator:
    return _PP or _TRIVIAL


def expert_parallel_enabled() -> bool:
    """Whether MoE layers split whole experts over the TP ranks (`enable_expert_parallel`)."""
    return _EXPERT_PARALLEL


def set_expert_parallel(enabled: bool) -> None:
    global _EXPERT_PARALLEL
    _EXPERT_PARALLEL = bool(enabled)


def model_parallel_is_initialized() -> bool:
    return _TP is not None


def tensor_model_parallel_all_reduce(x: torch.Tensor) -> torch.Tensor:
    return get_tp_group().all_reduce(x)


def tensor_model_parallel_all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return get_tp_group().all_gather(x, dim)


def init_distributed_environment(world_size: int, rank: int, init_method: str, tensor_parallel_size: int,
                                 pipeline_parallel_size: int, backend: Optional[str] = None,
                                 timeout_s: float = 600.0, enable_expert_parallel: bool = False) -> None:
    """Join the engine's process group and build the TP and PP groups. Called once per worker process.

    backend: "nccl" for CUDA devices, "gloo" for CPUs (default: by whether CUDA is in use).
    """
    global _WORLD, _TP, _PP
    if tensor_parallel_size * pipeline_parallel_size != world_size:
        raise ValueError(f"tensor_parallel_size ({tensor_parallel_size}) x pipeline_parallel_size "
                         f"({pipeline_parallel_size}) must equal the world size ({world_size})")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() and torch.cuda.is_initialized() else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, init_method=init_method, world_size=world_size, rank=rank,
                                timeout=timedelta(seconds=timeout_s))
    tp, pp = tensor_parallel_size, pipeline_parallel_size
    set_expert_parallel(enable_expert_parallel)
    _WORLD = GroupCoordinator(list(range(world_size)), rank, dist.group.WORLD)
    # new_group must be called by every rank for every group, in the same order.
    for stage in range(pp):
        ranks = list(range(stage * tp, (stage + 1) * tp))
        group = dist.new_group(ranks) if tp > 1 else None
        if rank in ranks:
            _TP = GroupCoordinator(ranks, rank, group)
    for tp_rank in range(tp):
        ranks = list(range(tp_rank, world_size, tp))
        group = dist.new_group(ranks) if pp > 1 else None
        if rank in ranks:
            _PP = GroupCoordinator(ranks, rank, group)
    logger.info("rank %d/%d: tp %s, pp %s (%s)", rank, world_size, _TP, _PP, backend)


def destroy_distributed_environment() -> None:
    global _WORLD, _TP, _PP, _EXPERT_PARALLEL
    _WORLD = _TP = _PP = None
    _EXPERT_PARALLEL = False
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # pragma: no cover - best effort at exit
            pass


def pp_layer_range(num_layers: int, pp_rank: Optional[int] = None, pp_size: Optional[int] = None) -> tuple[int, int]:
    """[start, end) of the decoder layers on a pipeline stage: contiguous, as even as possible."""
    if pp_rank is None or pp_size is None:
        g = get_pp_group()
        pp_rank, pp_size = g.rank_in_group, g.world_size
    if num_layers < pp_size:
        raise ValueError(f"pipeline_parallel_size ({pp_size}) exceeds the model's {num_layers} layers")
    return pp_rank * num_layers // pp_size, (pp_rank + 1) * num_layers // pp_size


def local_kv_cache_dims(num_layers: int, num_kv_heads: int) -> tuple[int, int]:
    """(layers, KV heads) whose cache this rank holds: its stage's layers, its share of the KV heads (one
    replicated head when there are fewer KV heads than TP ranks)."""
    start, end = pp_layer_range(num_layers)
    tp = get_tp_group().world_size
    return end - start, (num_kv_heads // tp if num_kv_heads >= tp else 1)
