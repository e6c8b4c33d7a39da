"""`quantize_model`: a float model pagellm loads -> an FP8 or INT8 W8A8 compressed-tensors checkpoint folder.

The offline step llm-compressor users run (its `QuantizationModifier(scheme="FP8_DYNAMIC" | "W8A8")`, with an
optional `SmoothQuantModifier(smoothing_strength=alpha)` first): the folder holds model.safetensors (each
decoder linear's `weight` in fp8 e4m3 or int8 and its per-output-channel `weight_scale` [out, 1] float32; the
rest in the checkpoint's dtype), config.json with llm-compressor's `quantization_config` (dynamic per-token
activations, an `ignore` list, "lm_head" always in it), the tokenizer files and generation_config.json. The
engine loads it as any compressed-tensors checkpoint: `LLM(folder)`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from typing import Any, Iterable, Optional

import torch

from pagellm.quantize.smoothing import DEFAULT_MAPPINGS

logger = logging.getLogger(__name__)

METHODS = ("fp8", "int8")


def _ignore_entries(ignore: Iterable[str]) -> list[str]:
    """The config's ignore list: "lm_head", then each user regex as llm-compressor writes one ("re:REGEX")."""
    entries = ["lm_head"]
    for pattern in ignore:
        if not isinstance(pattern, str) or not pattern:
            raise ValueError(f"ignore: each entry must be a non-empty regular expression; got {pattern!r}")
        body = pattern[3:] if pattern.startswith("re:") else pattern
        try:
            re.compile(body)
        except re.error as e:
            raise ValueError(f"ignore: {pattern!r} is not a regular expression ({e})") from None
        entries.append(f"re:{body}")
    return entries


def _check_calibration_ids(ids: Any, text: Optional[str]) -> list[list[int]]:
    if text is not None:
        raise ValueError("calibration_ids: give calibration_text or calibration_ids, not both")
    if (not isinstance(ids, (list, tuple)) or not ids or not all(
            isinstance(seq, (list, tuple)) and seq and all(isinstance(t, int) and t >= 0 for t in seq) for seq in ids)):
        raise ValueError("calibration_ids must be a non-empty list of non-empty lists of token ids")
    return [list(seq) for seq in ids]


def _check_output(output: Any) -> str:
    if not isinstance(output, (str, os.PathLike)) or not str(output):
        raise ValueError(f"output: a folder path is required; got {output!r}")
    output = os.fspath(output)
    if os.path.exists(output) and (not os.path.isdir(output) or os.listdir(output)):
        raise ValueError(f"output: {output} exists and is not an empty folder")
    return output


def read_float_checkpoint(model: Optional[str]) -> tuple[Any, Any, dict[str, torch.Tensor]]:
    """(source, HF config, state dict under HF names) of a float model: an HF folder or id, a GGUF (dequantized
    as the engine does), or None for the embedded model."""
    from pagellm.model_executor.layers.quantization import checkpoint_quantization
    from pagellm.model_executor.loader.source import load_hf_config, resolve_model_source

    source = resolve_model_source(model)
    config = load_hf_config(source)
    found = checkpoint_quantization(config)
    if found is not None:
        raise ValueError(f"model: {source.display_name} is already quantized ({found.get('quant_method')!r}); "
                         f"quantize a float checkpoint")
    if source.kind == "gguf":
        from pagellm.model_executor.loader.gguf_loader import iterate_gguf_weights

        weights = iterate_gguf_weights(source.file_path, config)
    else:
        from pagellm.model_executor.loader.safetensors_loader import iterate_safetensors_weights

        weights = iterate_safetensors_weights(source.path)
    return source, config, {name: t for name, t in weights}


def quantize_model(model: Optional[str], output: str, method: str, smoothquant: Optional[float] = None,
                   calibration_text: Optional[str] = None, ignore: Iterable[str] = (),
                   smooth_mappings: Iterable[str] = DEFAULT_MAPPINGS, gptq: bool = False,
                   max_calibration_tokens: int = 2048, calibration_ids: Optional[list[list[int]]] = None,
                   rotate: Optional[int] = None) -> dict[str, Any]:
    """Write `model` quantized with `method` (fp8 | int8 W8A8) to the folder `output`.

    smoothquant: alpha in [0, 1], smooth first (`smooth_mappings` say which inputs) with activation maxima from
    `calibration_text` (None: the built-in text) or `calibration_ids` (token id sequences instead of a text).
    gptq: round the weights with GPTQ against the calibration inputs (else to nearest). ignore: regexes of HF
    module names ("model.layers.0.mlp.down_proj") kept in float. Returns a summary (folder, quantized and
    ignored layers, seconds). rotate: int8 only, rotate the residual stream offline and down_proj's input at run
    time in blocks of this size (quantize/rotation.py; the engine applies the latter); not with smoothquant, and
    down_proj may not be ignored."""
    from pagellm.model_executor.layers.quantization.compressed_tensors import (
        MERGED_SHARDS,
        ROTATION_KEY,
        layer_is_ignored,
        name_is_ignored,
    )
    from pagellm.model_executor.layers.quantization.rtn import LINEAR_WEIGHT, quantization_config
    from pagellm.model_executor.layers.quantization.w8a8 import FP8
    from pagellm.model_executor.loader.source import load_tokenizer
    from pagellm.quantize.calibration import (
        BUILTIN_CALIBRATION_TEXT,
        calibration_chunks,
        collect_input_absmax,
        collect_input_hessians,
        hf_float_model,
    )
    from pagellm.quantize.rotation import rotate_state_dict, rotated_float_model
    from pagellm.quantize.smoothing import check_smoothing_args, smooth_state_dict

    start = time.perf_counter()
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    if not isinstance(gptq, bool):
        raise ValueError(f"gptq must be True or False; got {gptq!r}")
    entries = _ignore_entries(ignore)
    mappings = tuple(smooth_mappings)
    output = _check_output(output)
    if rotate is not None:
        if method != "int8":
            raise ValueError("rotate: only with method int8 (fp8's rounding error is relative, and rotations made "
                             "it worse: benchmarks/quant_rotation_sim.py)")
        if smoothquant is not None:
            raise ValueError("rotate: not combined with smoothquant (the rotation spreads the outlier channels that "
                             "smoothing would move into the weights)")
    source, config, state = read_float_checkpoint(model)
    if smoothquant is not None:
        check_smoothing_args(smoothquant, mappings, config)
    linears = [m.group(1) for name in state if (m := LINEAR_WEIGHT.match(name))]
    for pattern in entries[1:]:
        if not any(name_is_ignored([pattern], m) for m in linears):
            raise ValueError(f"ignore: {pattern[3:]!r} matches no linear layer of the model (e.g. {linears[0]})")
    for module in linears:  # a merged layer of the engine is all float or all quantized
        parent, _, last = module.rpartition(".")
        merged = next((k for k, shards in MERGED_SHARDS.items() if last in shards), None)
        if merged is not None:
            layer_is_ignored(entries, f"{parent}.{merged}")

    chunks = None
    if calibration_ids is not None:
        chunks = _check_calibration_ids(calibration_ids, calibration_text)
    elif smoothquant is not None or gptq:
        text = BUILTIN_CALIBRATION_TEXT if calibration_text is None else calibration_text
        chunks = calibration_chunks(load_tokenizer(source), text, max_calibration_tokens)
    config_overrides: dict[str, Any] = {}
    if rotate is not None:
        down = [m for m in linears if m.endswith(".mlp.down_proj")]
        if any(name_is_ignored(entries, m) for m in down):
            raise ValueError("ignore: with rotate, every down_proj is rotated at run time by its W8A8 layer; "
                             "keep none of them in float")
        state = rotate_state_dict(state, config, rotate)
        config_overrides["tie_word_embeddings"] = False  # the rotated LM head holds the final norm's weight
    if smoothquant is not None:
        act_max = collect_input_absmax(hf_float_model(config, state), chunks)
        state = smooth_state_dict(state, config, act_max, float(smoothquant), mappings)
    hessians = None
    if gptq:  # a rotated model is calibrated as the engine runs it (down_proj's input rotated)
        float_model = rotated_float_model(config, state) if rotate is not None else hf_float_model(config, state)
        hessians = collect_input_hessians(float_model, chunks)
    qdtype = FP8 if method == "fp8" else torch.int8
    quantized = _quantize_linears(state, entries, qdtype, hessians)
    qc = quantization_config("compressed-tensors", qdtype=qdtype, ignore=entries)
    if rotate is not None:
        qc[ROTATION_KEY] = {"block_size": rotate, "targets": [r"re:.*\.mlp\.down_proj"]}
    _write_folder(output, source, config, quantized, qc, config_overrides)
    ignored = [m for m in linears if name_is_ignored(entries, m)]
    summary = {"output": output, "method": method, "smoothquant": smoothquant, "gptq": bool(gptq), "rotate": rotate,
               "smooth_mappings": list(mappings) if smoothquant is not None else [],
               "quantized_layers": len(linears) - len(ignored), "ignored_layers": ignored,
               "seconds": round(time.perf_counter() - start, 1)}
    logger.info("wrote %s", summary)
    return summary


def _quantize_linears(state: dict[str, torch.Tensor], ignore: list[str], qdtype: torch.dtype,
                      hessians: Optional[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors: each decoder linear's weight -> `weight` (qdtype) + `weight_scale` [out, 1]
    (GPTQ-rounded against `hessians` when given, else rounded to nearest); ignored layers and the rest as they
    are."""
    from pagellm.model_executor.layers.quantization.compressed_tensors import name_is_ignored
    from pagellm.model_executor.layers.quantization.rtn import LINEAR_WEIGHT, w8a8_quantize
    from pagellm.quantize.gptq_w8 import gptq_quantize_w8

    out: dict[str, torch.Tensor] = {}
    by_input: dict[int, list[str]] = {}  # GPTQ: siblings sharing one Hessian are rounded as one stacked matrix
    for name, tensor in state.items():
        match = LINEAR_WEIGHT.match(name)
        if match is None or name_is_ignored(ignore, match.group(1)):
            out[name] = tensor
            continue
        module = match.group(1)
        if hessians is not None:
            by_input.setdefault(id(hessians[module]), []).append(module)
        else:
            tensors, _ = w8a8_quantize(tensor, qdtype)
            out.update({f"{module}.{key}": value for key, value in tensors.items()})
    for modules in by_input.values():
        weights = [state[f"{m}.weight"] for m in modules]
        q, scale = gptq_quantize_w8(torch.cat(weights), hessians[modules[0]], qdtype)
        rows = [w.shape[0] for w in weights]
        for m, qm, sm in zip(modules, q.split(rows), scale.split(rows)):
            out[f"{m}.weight"], out[f"{m}.weight_scale"] = qm.contiguous(), sm.contiguous()
    return out


def _write_folder(output: str, source, config, tensors: dict[str, torch.Tensor], qc: dict[str, Any],
                  config_overrides: Optional[dict[str, Any]] = None) -> None:
    from safetensors.torch import save_file

    from pagellm.model_executor.loader.source import load_generation_eos_ids, load_tokenizer

    os.makedirs(output, exist_ok=True)
    if source.kind == "hf":
        with open(os.path.join(source.path, "config.json")) as f:
            cfg = json.load(f)
    else:
        cfg = config.to_dict()
    cfg.update(config_overrides or {})
    cfg["quantization_config"] = qc
    with open(os.path.join(output, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2, default=str)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(output, "model.safetensors"),
              metadata={"format": "pt"})
    try:
        load_tokenizer(source).save_pretrained(output)
    except (OSError, ValueError) as e:  # a weights-only folder (tests' tiny models): the engine can still run it
        logger.warning("no tokenizer written (%s); load the checkpoint with skip_tokenizer_init=True", e)
    eos = load_generation_eos_ids(source)
    gen_path = os.path.join(source.path, "generation_config.json")
    if source.kind == "hf" and os.path.isfile(gen_path):
        with open(gen_path) as f:
            gen = json.load(f)
    else:
        gen = {"eos_token_id": sorted(eos)} if eos else None
    if gen:
        with open(os.path.join(output, "generation_config.json"), "w") as f:
            json.dump(gen, f, indent=2)
