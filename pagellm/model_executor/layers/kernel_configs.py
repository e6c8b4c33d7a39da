"""Tile configs of the Triton kernels, read from one small table per kernel (w4a16_configs.py, moe_configs.py).

Why one shape of table: `benchmarks/tune_kernels.py` times candidate configs on a GPU and writes its winners as
JSON in exactly this shape, so baking them in is replacing the table's literal with it (`--bake`).

    TABLE = {
        "default": {"1": CONFIG, "16": CONFIG, "256": CONFIG},   # M bucket -> config
        "4096->6144": {...},                                     # optional: one shape's own buckets
    }

A kernel looks up its shape's key (when the table has it, else "default"), then the smallest bucket that is at
least M (past the last bucket: the last). A config is a flat dict of str -> int or str, which both JSON and
Python read. Lookups are pure host work on shapes, so they run inside CUDA-graph capture.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, Union

Config = dict[str, Union[int, str]]
Table = Mapping[str, Mapping[str, Config]]


def buckets_of(table: Table, key: str = "default") -> list[int]:
    """The M buckets of one entry, ascending."""
    return sorted(int(b) for b in table[key])


def bucket_for(m: float, buckets: list[int]) -> int:
    """The smallest bucket >= m; the largest when m is past them all."""
    for b in buckets:
        if m <= b:
            return b
    return buckets[-1]


def lookup(table: Table, m: float, shape_key: str | None = None) -> Config:
    """The config for M rows (a float for the MoE's average rows per expert) of one shape."""
    entry_key = shape_key if shape_key is not None and shape_key in table else "default"
    entry = table[entry_key]
    return dict(entry[str(bucket_for(m, buckets_of(table, entry_key)))])


def check_table(table: Table, check_config: Callable[[Config], None], name: str) -> None:
    """ValueError naming the table, entry and bucket when there is no "default" entry, an entry is empty, a
    bucket is not a positive integer, or check_config refuses a config (the check a baked table must pass)."""
    if "default" not in table:
        raise ValueError(f"{name}: no 'default' entry")
    for key, entry in table.items():
        if not entry:
            raise ValueError(f"{name}[{key!r}]: no buckets")
        for bucket, config in entry.items():
            where = f"{name}[{key!r}][{bucket!r}]"
            if not str(bucket).isdigit() or int(bucket) < 1:
                raise ValueError(f"{where}: bucket {bucket!r} is not a positive integer")
            try:
                check_config(config)
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None


def winners_table(cases: list[dict]) -> dict[str, dict[str, Config]]:
    """A table of measured winners, from tuning cases {"shape": key, "bucket": int, "times": {config id: seconds
    or None (failed, wrong, not run)}, "configs": {config id: Config}}.

    Each shape's bucket gets the config whose time, relative to the fastest of each case, has the smallest
    geometric mean over that bucket's cases (a config must have run every one of them); "default" gets the same
    over every shape's cases of the bucket, so it is the best all-rounder for shapes the table does not name.
    """
    configs: dict[str, Config] = {}
    groups: dict[tuple[str, int], list[dict]] = {}
    for case in cases:
        configs.update(case["configs"])
        groups.setdefault((case["shape"], case["bucket"]), []).append(case)
        groups.setdefault(("default", case["bucket"]), []).append(case)
    table: dict[str, dict[str, Config]] = {}
    for (shape, bucket), group in sorted(groups.items(), key=lambda kv: (kv[0][0] != "default", kv[0])):
        best = _best_overall(group)
        if best is not None:
            table.setdefault(shape, {})[str(bucket)] = dict(configs[best])
    return table


def _best_overall(group: list[dict]) -> str | None:
    scores: dict[str, float] = {}
    for cid in group[0]["times"]:
        ratios = []
        for case in group:
            times = [t for t in case["times"].values() if t]
            t = case["times"].get(cid)
            if not t or not times:
                break
            ratios.append(t / min(times))
        else:
            scores[cid] = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
    return min(scores, key=scores.get) if scores else None
