"""Paged attention: the metadata of one flat ragged batch, and the backends that attend over the KV cache."""

from pagellm.attention.layer import Attention
from pagellm.attention.metadata import AttentionMetadata

__all__ = ["Attention", "AttentionMetadata"]
