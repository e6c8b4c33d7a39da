"""LoRARequest: which adapter a request runs with (vLLM's `LoRARequest(lora_name, lora_int_id, lora_path)`)."""

from __future__ import annotations

import msgspec


class LoRARequest(msgspec.Struct, array_like=True, omit_defaults=True):
    """An adapter by name, a positive integer id unique to it in this engine, and its PEFT folder.

    The id identifies the adapter's weights: two requests with the same id share them (and their prefix-cache
    blocks); a different adapter must get a different id."""

    lora_name: str
    lora_int_id: int
    lora_path: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.lora_name, str) or not self.lora_name:
            raise ValueError("lora_name: must be a non-empty string")
        if isinstance(self.lora_int_id, bool) or not isinstance(self.lora_int_id, int) or self.lora_int_id < 1:
            raise ValueError(f"lora_int_id: must be a positive integer, got {self.lora_int_id!r}")
        if not isinstance(self.lora_path, str) or not self.lora_path:
            raise ValueError("lora_path: must name the adapter's folder")

    @property
    def cache_key(self) -> tuple[str, int]:
        """What the adapter adds to its requests' prefix-cache block hashes."""
        return ("lora", self.lora_int_id)
