"""LoRAConfig: the engine's LoRA limits (from --enable-lora, --max-loras, --max-lora-rank, --lora-modules)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from pagellm.lora.request import LoRARequest

# vLLM's switch for POST /v1/load_lora_adapter and /v1/unload_lora_adapter; pagellm reads the same name and its
# own (either set to 1/true turns them on).
RUNTIME_UPDATE_ENV = ("PAGELLM_ALLOW_RUNTIME_LORA_UPDATING", "VLLM_ALLOW_RUNTIME_LORA_UPDATING")


@dataclass
class LoRAConfig:
    max_loras: int = 1  # adapters one step may use at once (device slots)
    max_lora_rank: int = 16  # largest adapter rank served; every slot is this wide
    modules: list[LoRARequest] = field(default_factory=list)  # the adapters named at start (--lora-modules)


def runtime_updating_allowed() -> bool:
    return any(os.environ.get(name, "").strip().lower() in ("1", "true", "yes") for name in RUNTIME_UPDATE_ENV)


def parse_lora_modules(values: object) -> list[LoRARequest]:
    """--lora-modules name=path (repeatable), or in LLM(...) a list of such strings or a {name: path} dict.
    Ids are 1, 2, ... in the order given."""
    if values is None:
        return []
    if isinstance(values, dict):
        pairs = list(values.items())
    elif isinstance(values, (list, tuple)):
        pairs = []
        for v in values:
            if not isinstance(v, str) or "=" not in v:
                raise ValueError(f"lora_modules: expected name=path, got {v!r}")
            name, _, path = v.partition("=")
            pairs.append((name.strip(), path.strip()))
    else:
        raise ValueError(f"lora_modules: expected a list of name=path, got {type(values).__name__}")
    names = [n for n, _ in pairs]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ValueError(f"lora_modules: the name {sorted(dup)[0]!r} is given twice")
    return [LoRARequest(name, i + 1, path) for i, (name, path) in enumerate(pairs)]
