"""Multi-LoRA serving: PEFT adapters applied per token, so requests for different adapters share a batch.

request.py   LoRARequest (vLLM's name and fields); no torch, so core/ can hold it
config.py    LoRAConfig (max_loras, max_lora_rank, --lora-modules) and the runtime-updating switch
adapter.py   reading a PEFT adapter folder (adapter_config.json + adapter_model.safetensors), checked
layers.py    LoRALinear: a base linear layer plus the delta of each token's adapter (torch; Triton on CUDA)
triton_lora.py  the CUDA kernels: shrink (x @ A^T) and expand (u @ B^T), a token block per program
manager.py   the runner's adapter slots and each step's per-token slot index
"""

from pagellm.lora.request import LoRARequest

__all__ = ["LoRARequest"]
