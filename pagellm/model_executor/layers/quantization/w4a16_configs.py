"""The W4A16 kernel's tile configs by M (rows of x) and layer shape: the table of triton_w4a16.py.

Keys of a shape entry are "K->N" (input -> output features of the layer as this rank holds it); "default" serves
every other shape. A config:

    kernel      "gemv": the batch-1 kernel on CUDA cores, one row of x per program (block_m 1; about 3.5
                instructions per weight; num_stages > 1 pipelines its K loop; needs tiles inside one group and
                K a multiple of block_k, else runs "fma")
                "gemv_rows": the same, each thread summing its columns down a tile's rows (about 2.7
                instructions per weight; one warp per program suits it; same needs, same fallback)
                "fma": the older GEMV kernel on CUDA cores, one row of x per program (block_m 1)
                "mma": the small-M kernel with tl.dot (tensor cores; BLOCK_M >= 16, BLOCK_K >= 128)
                "gemm": the large-M kernel (one dot per K tile, the weight tile unpacked to [BLOCK_K, BLOCK_N])
    block_m, block_n, block_k   tile sizes (powers of two; block_k a multiple of 8: eight 4-bit rows per int32)
    split_k     programs along K whose float32 partial sums are added at the end; 0: as many as fill about two
                waves of the GPU's SMs (small M has few output tiles)
    num_warps, num_stages       Triton launch options

The M = 1 and M = 128 entries are measured on an H200 (`gpu_check.sh tune-w4a16-m1 bake`, `tune-w4a16-m128
bake`: CUDA-graph replays, L2 flushed; benchmarks/results/h200-tp1-w4a16-m{1,128}-sweep.json; M = 1 again over
split sizes and both batch-1 kernels by benchmarks/w4a16_gemv_sweep.py, h200-tp1-w4a16-gemv-sweep.json: only
gate_up changed, to gemv_rows); the other buckets are still first guesses.
`benchmarks/tune_kernels.py` (gpu_check.sh part `tune`) writes measured winners in this format;
`tune_kernels.py --bake OUT` writes them over W4A16_CONFIGS.
"""

from __future__ import annotations

from pagellm.model_executor.layers.kernel_configs import Config, Table, check_table, lookup

KERNELS = ("fma", "gemv", "gemv_rows", "mma", "gemm")
ROW_KERNELS = ("fma", "gemv", "gemv_rows")  # one row of x per program, on CUDA cores (no tl.dot)
FIELDS = {"kernel": str, "block_m": int, "block_n": int, "block_k": int, "split_k": int, "num_warps": int,
          "num_stages": int}

W4A16_CONFIGS: Table = {
    "default": {
        "1": {"kernel": "gemv", "block_m": 1, "block_n": 256, "block_k": 128, "split_k": 0, "num_warps": 4,
              "num_stages": 1},
        "4": {"kernel": "mma", "block_m": 16, "block_n": 64, "block_k": 128, "split_k": 0, "num_warps": 4,
              "num_stages": 3},
        "16": {"kernel": "mma", "block_m": 16, "block_n": 64, "block_k": 128, "split_k": 0, "num_warps": 4,
               "num_stages": 3},
        "64": {"kernel": "mma", "block_m": 64, "block_n": 64, "block_k": 128, "split_k": 0, "num_warps": 4,
               "num_stages": 3},
        "128": {"kernel": "gemm", "block_m": 64, "block_n": 128, "block_k": 64, "split_k": 1, "num_warps": 8,
                "num_stages": 3},
        "256": {"kernel": "gemm", "block_m": 64, "block_n": 128, "block_k": 64, "split_k": 1, "num_warps": 8,
                "num_stages": 3},
    },
    "14336->4096": {
        "1": {"kernel": "gemv", "block_m": 1, "block_n": 256, "block_k": 128, "split_k": 16, "num_warps": 4,
              "num_stages": 3},
        "4": {"kernel": "mma", "block_m": 16, "block_n": 64, "block_k": 128, "split_k": 0, "num_warps": 4,
              "num_stages": 3},
        "16": {"kernel": "mma", "block_m": 16, "block_n": 64, "block_k": 128, "split_k": 0, "num_warps": 4,
               "num_stages": 3},
        "64": {"kernel": "mma", "block_m": 64, "block_n": 64, "block_k": 128, "split_k": 0, "num_warps": 4,
               "num_stages": 3},
        "128": {"kernel": "gemm", "block_m": 64, "block_n": 64, "block_k": 64, "split_k": 0, "num_warps": 4,
                "num_stages": 3},
        "256": {"kernel": "gemm", "block_m": 64, "block_n": 128, "block_k": 64, "split_k": 1, "num_warps": 8,
                "num_stages": 3},
    },
    "4096->6144": {
        "1": {"kernel": "gemv", "block_m": 1, "block_n": 256, "block_k": 128, "split_k": 0, "num_warps": 4,
              "num_stages": 1},
        "4": {"kernel": "mma", "block_m": 16, "block_n": 64, "block_k": 128, "split_k": 0, "num_warps": 4,
              "num_stages": 3},
        "16": {"kernel": "mma", "block_m": 16, "block_n": 64, "block_k": 128, "split_k": 0, "num_warps": 4,
               "num_stages": 3},
        "64": {"kernel": "mma", "block_m": 64, "block_n": 64, "block_k": 128, "split_k": 0, "num_warps": 4,
               "num_stages": 3},
        "128": {"kernel": "gemm", "block_m": 64, "block_n": 128, "block_k": 64, "split_k": 0, "num_warps": 8,
                "num_stages": 3},
        "256": {"kernel": "gemm", "block_m": 64, "block_n": 128, "block_k": 64, "split_k": 1, "num_warps": 8,
                "num_stages": 3},
    },
    "4096->4096": {
        "1": {"kernel": "gemv", "block_m": 1, "block_n": 256, "block_k": 128, "split_k": 0, "num_warps": 4,
              "num_stages": 1},
        "4": {"kernel": "mma", "block_m": 16, "block_n": 64, "block_k": 128, "split_k": 0, "num_warps": 4,
              "num_stages": 3},
        "16": {"kernel": "mma", "block_m": 16, "block_n": 64, "block_k": 128, "split_k": 0, "num_warps": 4,
               "num_stages": 3},
        "64": {"kernel": "mma", "block_m": 64, "block_n": 64, "block_k": 128, "split_k": 0, "num_warps": 4,
               "num_stages": 3},
        "128": {"kernel": "gemm", "block_m": 64, "block_n": 64, "block_k": 64, "split_k": 0, "num_warps": 4,
                "num_stages": 3},
        "256": {"kernel": "gemm", "block_m": 64, "block_n": 128, "block_k": 64, "split_k": 1, "num_warps": 8,
                "num_stages": 3},
    },
    "4096->28672": {
        "1": {"kernel": "gemv_rows", "block_m": 1, "block_n": 128, "block_k": 128, "split_k": 16, "num_warps": 1,
              "num_stages": 1},
        "4": {"kernel": "mma", "block_m": 16, "block_n": 64, "block_k": 128, "split_k": 0, "num_warps": 4,
              "num_stages": 3},
        "16": {"kernel": "mma", "block_m": 16, "block_n": 64, "block_k": 128, "split_k": 0, "num_warps": 4,
               "num_stages": 3},
        "64": {"kernel": "mma", "block_m": 64, "block_n": 64, "block_k": 128, "split_k": 0, "num_warps": 4,
               "num_stages": 3},
        "128": {"kernel": "gemm", "block_m": 128, "block_n": 128, "block_k": 64, "split_k": 1, "num_warps": 8,
                "num_stages": 3},
        "256": {"kernel": "gemm", "block_m": 64, "block_n": 128, "block_k": 64, "split_k": 1, "num_warps": 8,
                "num_stages": 3},
    },
}


def shape_key(k: int, n: int) -> str:
    return f"{k}->{n}"


def check_config(config: Config) -> None:
    """ValueError naming the field a config gets wrong (run on the table, and on every tuning candidate)."""
    for field, kind in FIELDS.items():
        if not isinstance(config.get(field), kind):
            raise ValueError(f"w4a16 config {config}: field {field!r} missing or not {kind.__name__}")
    if config["kernel"] not in KERNELS:
        raise ValueError(f"w4a16 config {config}: kernel must be one of {KERNELS}")
    for field in ("block_m", "block_n", "block_k"):
        v = config[field]
        if v < 1 or v & (v - 1):
            raise ValueError(f"w4a16 config {config}: {field} must be a power of two")
    if config["block_k"] < 16:
        raise ValueError(f"w4a16 config {config}: block_k must be at least 16")
    if config["kernel"] in ROW_KERNELS and config["block_m"] != 1:
        raise ValueError(f"w4a16 config {config}: the {config['kernel']} kernel takes one row per program "
                         "(block_m 1)")
    if config["kernel"] not in ROW_KERNELS and (config["block_m"] < 16 or config["block_n"] < 16):
        raise ValueError(f"w4a16 config {config}: tl.dot needs block_m and block_n of at least 16")
    if config["kernel"] == "mma" and config["block_k"] < 128:
        raise ValueError(f"w4a16 config {config}: the mma kernel needs block_k >= 128 (16 packed rows per dot)")
    if config["split_k"] < 0 or config["num_warps"] < 1 or config["num_stages"] < 1:
        raise ValueError(f"w4a16 config {config}: split_k >= 0, num_warps and num_stages >= 1")


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def auto_split_k(m: int, n: int, k: int, block_m: int, block_n: int, block_k: int, sms: int, kernel: str = "fma",
                 num_stages: int = 1) -> int:
    """Programs along K so that the output tiles times the split cover about two waves of SMs, each program
    still looping over at least four K tiles. `gemv`: four K tiles per program when its loop is pipelined
    (num_stages > 1), else one (a program would wait for each tile's load in turn; many programs in flight
    overlap them instead). `gemv_rows`: two (on gate_up at batch 1, 24.9 us against 27.5 for one and 30.5 for
    four)."""
    tiles = _cdiv(m, block_m) * _cdiv(n, block_n)
    split = 1
    if kernel == "gemv":
        return _cdiv(_cdiv(k, block_k), 4 if num_stages > 1 else 1)
    if kernel == "gemv_rows":
        return _cdiv(_cdiv(k, block_k), 2)
    while tiles * split < 2 * sms and k // (split * 2) >= 4 * block_k:
        split *= 2
    return split


# The smallest BLOCK_K each kernel takes: tl.dot wants 16 rows of K (the mma kernel's dots run on packed rows).
_MIN_BLOCK_K = {"fma": 16, "gemv": 16, "gemv_rows": 16, "mma": 128, "gemm": 16}


def launch_params(m: int, n: int, k: int, group_size: int, has_g_idx: bool, config: Config, sms: int
                  ) -> tuple[int, int, int, bool]:
    """(BLOCK_K, split, K per split, GROUP_PER_TILE) of a call: BLOCK_K drops to a power-of-two group size below
    it, so that a tile keeps to one group (its scales applied once); split as the config says (0:
    auto_split_k), then trimmed so that no program starts past K."""
    block_k = config["block_k"]
    if (not has_g_idx and group_size % block_k and _MIN_BLOCK_K[config["kernel"]] <= group_size < block_k
            and group_size & (group_size - 1) == 0):
        block_k = group_size
    group_per_tile = not has_g_idx and group_size % block_k == 0
    split = config["split_k"] or auto_split_k(m, n, k, config["block_m"], config["block_n"], block_k, sms,
                                              config["kernel"], config["num_stages"])
    k_per_split = _cdiv(_cdiv(k, split), block_k) * block_k
    return block_k, _cdiv(k, k_per_split), k_per_split, group_per_tile


def w4a16_config(m: int, k: int, n: int) -> Config:
    """The table's config for x [M, K] @ W [K, N]."""
    return lookup(W4A16_CONFIGS, m, shape_key(k, n))


def check_w4a16_table(table: Table = W4A16_CONFIGS) -> None:
    """ValueError naming the entry and bucket of the first bad config (the tests run it on the baked table)."""
    check_table(table, check_config, "W4A16_CONFIGS")
