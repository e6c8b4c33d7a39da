"""LoRAManager: the model runner's side of LoRA. It wraps the model's projections in LoRALinear layers, keeps
max_loras adapter slots (an adapter is read from its folder when a request first needs it and stays until its
slot is wanted by another), and turns each step's requests into a per-token slot index.

The scheduler never lets more distinct adapters run at once than there are slots (Scheduler's lora check), so a
new adapter always finds a slot that no running request uses.
"""

from __future__ import annotations

import logging
import re
from collections import OrderedDict
from typing import TYPE_CHECKING, Optional

import numpy as np
import torch
from torch import nn

from pagellm.lora.adapter import LAYER_SLICES, load_adapter
from pagellm.lora.layers import LoRALinear, LoRAStepState, slice_sizes_of
from pagellm.lora.request import LoRARequest

if TYPE_CHECKING:
    from pagellm.core.sched_output import SchedulerOutput

logger = logging.getLogger(__name__)

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)$")


class LoRAManager:
    def __init__(self, model: nn.Module, max_loras: int, max_rank: int, num_layers: int, max_tokens: int,
                 device: torch.device, dtype: torch.dtype) -> None:
        self.max_loras = max_loras
        self.max_rank = max_rank
        self.num_layers = num_layers
        use_kernels = device.type == "cuda"
        if use_kernels:
            from pagellm.lora import triton_lora

            if triton_lora.triton is None:
                raise ValueError("enable_lora: LoRA on CUDA needs triton (pip install triton)")
        self.state = LoRAStepState(torch.full((2, max_tokens), -1, dtype=torch.int32, device=device),
                                   use_kernels=use_kernels)
        self.layers: dict[tuple[int, str], LoRALinear] = {}
        self._wrap(model, dtype)
        self.slot_ids: list[Optional[int]] = [None] * max_loras  # lora_int_id held by each slot
        self.lru: "OrderedDict[int, None]" = OrderedDict()  # slots, least recently wanted first
        self.req_slot: dict[str, int] = {}  # request id -> slot (requests with an adapter only)

    def _wrap(self, model: nn.Module, dtype: torch.dtype) -> None:
        for name, module in list(model.named_modules()):
            m = _LAYER.search(name)
            if m is None or m.group(2) not in LAYER_SLICES or isinstance(module, LoRALinear):
                continue
            sizes = slice_sizes_of(module)
            if sizes is None or len(sizes) != LAYER_SLICES[m.group(2)]:
                continue
            wrapped = LoRALinear(module, sizes, self.max_loras, self.max_rank, self.state, dtype)
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name), attr, wrapped)
            self.layers[(int(m.group(1)), m.group(2))] = wrapped
        if not self.layers:
            raise ValueError("enable_lora: the model has no q/k/v/o or gate/up/down projections LoRA can attach to")

    # ---- requests ----------------------------------------------------------------------------------------
    def add_request(self, req_id: str, lora: Optional[LoRARequest]) -> None:
        if lora is not None:
            self.req_slot[req_id] = self._slot_for(lora)

    def remove_request(self, req_id: str) -> None:
        self.req_slot.pop(req_id, None)

    def _slot_for(self, lora: LoRARequest) -> int:
        if lora.lora_int_id in self.slot_ids:
            slot = self.slot_ids.index(lora.lora_int_id)
            self.lru.move_to_end(slot)
            return slot
        busy = set(self.req_slot.values())
        free = [s for s in range(self.max_loras) if self.slot_ids[s] is None]
        if not free:
            free = [s for s in self.lru if s not in busy]
        if not free:
            raise RuntimeError(f"all {self.max_loras} LoRA slots are used by running requests (max_loras)")
        slot = free[0]
        weights = load_adapter(lora.lora_path, self.max_rank, self.num_layers)
        for layer in self.layers.values():
            layer.clear_slot(slot)
        self.slot_ids[slot] = None
        for (index, name), slices in weights.layers.items():
            layer = self.layers.get((index, name))
            if layer is None:
                continue  # another pipeline stage's layer
            for i, pair in enumerate(slices):
                if pair is not None:
                    layer.set_slice(slot, i, pair[0], pair[1], f"layer {index} {name} slice {i}")
        self.slot_ids[slot] = lora.lora_int_id
        self.lru.pop(slot, None)
        self.lru[slot] = None
        logger.info("LoRA adapter %r (id %d) loaded into slot %d", lora.lora_name, lora.lora_int_id, slot)
        return slot

    # ---- one step ----------------------------------------------------------------------------------------
    def set_step(self, req_ids: list[str], q_lens: np.ndarray, pad_to: Optional[int] = None) -> None:
        """The step's per-token slots: request i's q_lens[i] tokens, in order (padding tokens: the base)."""
        slots = np.fromiter((self.req_slot.get(r, -1) for r in req_ids), dtype=np.int32, count=len(req_ids))
        per_token = np.repeat(slots, q_lens)
        total = len(per_token) if pad_to is None else max(pad_to, len(per_token))
        host = np.full(total, -1, dtype=np.int32)
        host[: len(per_token)] = per_token
        st = self.state
        if st.use_kernels:
            from pagellm.lora.triton_lora import slot_order

            # The kernels visit tokens in slot order (see triton_lora.py): the base model's tokens last.
            slots_host = torch.from_numpy(host)
            both = torch.stack([slots_host, slot_order(slots_host, self.max_loras)])
            # pinned, so the copy is queued on the stream and the host does not wait for the step before it
            st.token_slots[:, :total].copy_(both.pin_memory(), non_blocking=True)
            return
        runs: list[tuple[int, int, int]] = []
        start = 0
        for slot, n in zip(slots.tolist(), q_lens.tolist()):
            if slot >= 0 and n:
                if runs and runs[-1][0] == slot and runs[-1][2] == start:
                    runs[-1] = (slot, runs[-1][1], start + n)
                else:
                    runs.append((slot, start, start + n))
            start += n
        st.runs = runs

    def update(self, sched: "SchedulerOutput") -> None:
        """Requests that left free their slot's claim first; then the new ones take (maybe load) theirs."""
        for req_id in sched.finished_req_ids:
            self.remove_request(req_id)
        for req_id in sched.preempted_req_ids:
            self.remove_request(req_id)
        for new in sched.new_reqs:
            self.add_request(new.req_id, new.lora_request)
