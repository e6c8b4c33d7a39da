"""The fused MoE kernel's tile configs by rows per expert: the table of triton_moe.py.

M here is the average rows an expert gets, T * top_k / experts (decode of Qwen3-30B-A3B: well under 1; a
4096-token prefill of Mixtral: 1024). Shape entries are keyed "E x I x H" (this rank's experts, intermediate
and hidden sizes: w13 is [E, 2I, H]); "default" serves every other shape. A config:

    block_m     rows per block (each block holds one expert's rows; runs are padded to it)
    block_n, block_k    the output and reduction tiles of both GEMMs
    group_m     blocks of rows that walk the N tiles together, so that an expert's weight tile read by one
                block is still in L2 for the next (1: no grouping)
    num_warps, num_stages   Triton launch options

The figures below are not measurements: they are the tiles the kernel used before the table (checked on an H200,
where qwen3moe-mixed ran at 40x its peer), with group_m 1 (the same walk; group_m > 1 has run only under
Triton's interpreter, and the sweep tries it): `benchmarks/tune_kernels.py` (gpu_check.sh part `tune`)
writes measured winners in this format; `tune_kernels.py --bake OUT` writes them over FUSED_MOE_CONFIGS.
"""

from __future__ import annotations

from pagellm.model_executor.layers.kernel_configs import Config, Table, check_table, lookup

FIELDS = {"block_m": int, "block_n": int, "block_k": int, "group_m": int, "num_warps": int, "num_stages": int}

FUSED_MOE_CONFIGS: Table = {
    "default": {
        "1": {"block_m": 16, "block_n": 64, "block_k": 64, "group_m": 1, "num_warps": 4, "num_stages": 3},
        "4": {"block_m": 16, "block_n": 64, "block_k": 64, "group_m": 1, "num_warps": 4, "num_stages": 3},
        "16": {"block_m": 16, "block_n": 64, "block_k": 64, "group_m": 1, "num_warps": 4, "num_stages": 3},
        "64": {"block_m": 32, "block_n": 64, "block_k": 64, "group_m": 1, "num_warps": 4, "num_stages": 3},
        "256": {"block_m": 64, "block_n": 128, "block_k": 64, "group_m": 1, "num_warps": 8, "num_stages": 3},
        "1024": {"block_m": 64, "block_n": 128, "block_k": 64, "group_m": 1, "num_warps": 8, "num_stages": 3},
    },
}


def shape_key(experts: int, inter: int, hidden: int) -> str:
    return f"{experts}x{inter}x{hidden}"


def check_config(config: Config) -> None:
    """ValueError naming what a config gets wrong."""
    for field, kind in FIELDS.items():
        if not isinstance(config.get(field), kind) or config[field] < 1:
            raise ValueError(f"fused MoE config {config}: field {field!r} missing or not a positive int")
    for field in ("block_m", "block_n", "block_k"):
        v = config[field]
        if v < 16 or v & (v - 1):
            raise ValueError(f"fused MoE config {config}: {field} must be a power of two >= 16 (tl.dot)")


def moe_config(num_rows: int, experts: int, inter: int, hidden: int) -> Config:
    """The table's config for num_rows = T * top_k routed rows over `experts` local experts."""
    return lookup(FUSED_MOE_CONFIGS, num_rows / max(experts, 1), shape_key(experts, inter, hidden))


def check_moe_table(table: Table = FUSED_MOE_CONFIGS) -> None:
    """ValueError naming the entry and bucket of the first bad config (the tests run it on the baked table)."""
    check_table(table, check_config, "FUSED_MOE_CONFIGS")
