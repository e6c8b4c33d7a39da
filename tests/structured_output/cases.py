"""Grammars every structured-output test runs, bounded so that any model (even random weights) finishes them,
and the checks of their outputs."""

from __future__ import annotations

import json
import os
import re

import jsonschema

# Nested objects, arrays, enums, required fields; every string and array has a bound so outputs terminate.
SCHEMA_PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"type": "string", "enum": ["admin", "user", "guest"]},
    },
    "required": ["name", "age", "role"],
    "additionalProperties": False,
}
SCHEMA_ORDER = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 1, "maximum": 9999},
        "items": {
            "type": "array", "minItems": 1, "maxItems": 3,
            "items": {
                "type": "object",
                "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{3}[0-9]{2}$"},
                               "qty": {"type": "integer", "minimum": 1, "maximum": 99}},
                "required": ["sku", "qty"], "additionalProperties": False,
            },
        },
        "paid": {"type": "boolean"},
    },
    "required": ["id", "items", "paid"],
    "additionalProperties": False,
}
SCHEMA_NESTED = {
    "type": "object",
    "properties": {
        "user": {
            "type": "object",
            "properties": {
                "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 4},
                "address": {"type": "object",
                            "properties": {"city": {"type": "string", "maxLength": 10},
                                           "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                            "required": ["city", "zip"], "additionalProperties": False},
            },
            "required": ["tags", "address"], "additionalProperties": False,
        },
        "level": {"enum": [1, 2, 3, None]},
    },
    "required": ["user", "level"],
    "additionalProperties": False,
}
SCHEMAS = {"person": SCHEMA_PERSON, "order": SCHEMA_ORDER, "nested": SCHEMA_NESTED}
REGEX = r"[0-9]{3}-[a-z]{2,4}(\.[0-9])?"
CHOICES = ["yes", "no", "maybe later", "I don't know"]


def check_json(text: str, schema: dict | None) -> None:
    value = json.loads(text)
    if schema is None:
        assert isinstance(value, dict), text
    else:
        jsonschema.validate(value, schema)


def check_regex(text: str) -> None:
    assert re.fullmatch(REGEX, text), text


def check_choice(text: str) -> None:
    assert text in CHOICES, text


def make_tiny_model(folder: str, smollm_path: str) -> str:
    """A 2-layer random Llama with the SmolLM2 tokenizer and a vocabulary 64 rows larger than the tokenizer's
    (as models pad theirs), saved as safetensors with the tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from pagellm.model_executor.loader.source import load_tokenizer, resolve_model_source

    tok = load_tokenizer(resolve_model_source(smollm_path))
    tok.save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tok) + 64, max_position_embeddings=1024,
                         rms_norm_eps=1e-6, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder, safe_serialization=True)
    return os.fspath(folder)
