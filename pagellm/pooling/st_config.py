"""What a model folder says about pooling, read once: the pooling mode, normalization, the longest input and
the Matryoshka dimensions.

sentence-transformers folders list their pipeline in modules.json (Transformer -> Pooling -> Normalize); the
Pooling module's config (e.g. 1_Pooling/config.json) names the mode. A model without those files pools as vLLM
does by default: CLS for encoder-only models, the last token for decoders, normalized either way."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Optional

# Architectures that are run only as pooling models (no LM head). Decoders (…ForCausalLM) pool with
# runner='pooling' or from a sentence-transformers folder.
ENCODER_ARCHITECTURES = ("BertModel",)
POOLING_MODES = ("mean", "cls", "last")

_ST_MODES = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls",
             "pooling_mode_lasttoken": "last"}


@dataclass(frozen=True)
class PoolerConfig:
    pooling: str  # one of POOLING_MODES
    normalize: bool
    max_seq_length: Optional[int]  # sentence-transformers' limit (sentence_bert_config.json), if any
    matryoshka_dimensions: Optional[tuple[int, ...]]  # None: `dimensions` is refused; () : any size up to hidden
    hidden_size: int

    def check_dimensions(self, dimensions: Optional[int]) -> None:
        """A ValueError naming `dimensions` unless the model was trained to be cut to that size."""
        if dimensions is None:
            return
        if isinstance(dimensions, bool) or not isinstance(dimensions, int) or dimensions < 1:
            raise ValueError(f"dimensions must be a positive integer, got {dimensions!r}")
        if self.matryoshka_dimensions is None:
            raise ValueError("dimensions: this model does not support Matryoshka embeddings (its vectors cannot be "
                             "shortened); leave dimensions out")
        allowed = self.matryoshka_dimensions
        if dimensions > self.hidden_size or (allowed and dimensions not in allowed):
            sizes = ", ".join(map(str, allowed)) if allowed else f"1 to {self.hidden_size}"
            raise ValueError(f"dimensions: {dimensions} is not one this model allows ({sizes})")


def _read_json(path: str) -> Optional[dict[str, Any]]:
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def is_encoder(hf_config: Any) -> bool:
    return (getattr(hf_config, "architectures", None) or [None])[0] in ENCODER_ARCHITECTURES


def is_pooling_model(folder: Optional[str], hf_config: Any) -> bool:
    """runner='auto' picks pooling for an encoder-only architecture or a sentence-transformers folder
    (modules.json)."""
    if is_encoder(hf_config):
        return True
    return folder is not None and os.path.isfile(os.path.join(folder, "modules.json"))


def read_pooler_config(folder: Optional[str], hf_config: Any) -> PoolerConfig:
    pooling = "cls" if is_encoder(hf_config) else "last"
    normalize = True
    max_seq_length = None
    modules = _read_json(os.path.join(folder, "modules.json")) if folder else None
    if modules is not None:
        types = [m.get("type", "") for m in modules]
        normalize = any(t.endswith(".Normalize") for t in types)
        for m in modules:
            if m.get("type", "").endswith(".Pooling"):
                pooling = _st_pooling_mode(os.path.join(folder, m.get("path", "")))
        bert_cfg = _read_json(os.path.join(folder, "sentence_bert_config.json")) or {}
        max_seq_length = bert_cfg.get("max_seq_length")
    dims = getattr(hf_config, "matryoshka_dimensions", None)
    if dims:
        matryoshka: Optional[tuple[int, ...]] = tuple(int(d) for d in dims)
    elif getattr(hf_config, "is_matryoshka", False):
        matryoshka = ()
    else:
        matryoshka = None
    return PoolerConfig(pooling, normalize, max_seq_length, matryoshka, int(hf_config.hidden_size))


def _st_pooling_mode(path: str) -> str:
    cfg = _read_json(os.path.join(path, "config.json")) or {}
    if "pooling_mode" in cfg:  # newer sentence-transformers write one name
        name = {"lasttoken": "last", "mean": "mean", "cls": "cls"}.get(cfg["pooling_mode"])
        if name is None:
            raise ValueError(f"model: pooling mode {cfg['pooling_mode']!r} ({path}) is not supported; "
                             f"supported: mean, cls, lasttoken")
        return name
    on = [mode for key, mode in _ST_MODES.items() if cfg.get(key)]
    others = [k for k, v in cfg.items() if k.startswith("pooling_mode") and v and k not in _ST_MODES]
    if others or len(on) != 1:
        raise ValueError(f"model: the pooling config {path}/config.json asks for {on + others or 'no mode'}; "
                         f"supported: exactly one of mean, cls, lasttoken")
    return on[0]
