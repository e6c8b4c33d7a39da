"""BertModel (encoder-only) in plain PyTorch, for embeddings.

Every prompt is attended bidirectionally in one step, whole: nothing is cached between steps, so there is no
KV cache at all. The linear layers run on the flat batch [T, H] (no padding work); only attention pads the
batch to its longest prompt, with a key mask, for one SDPA call per layer. Checkpoint names are HF's
(`embeddings.*`, `encoder.layer.N.*`, optionally under `bert.`); the unused `pooler.dense` is skipped."""

from __future__ import annotations

import logging
from typing import Any, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

_ACTIVATIONS = {"gelu": lambda x: F.gelu(x), "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
                "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu}


class BertEmbeddings(nn.Module):
    def __init__(self, config: Any, dtype: torch.dtype, device: Any) -> None:
        super().__init__()
        kw = {"dtype": dtype, "device": device}
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, **kw)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size, **kw)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size, **kw)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, **kw)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions) \
            + self.token_type_embeddings(token_type_ids)
        return self.LayerNorm(x)


class BertLayer(nn.Module):
    """Post-norm transformer layer: x = LN(x + attn(x)); x = LN(x + mlp(x))."""

    def __init__(self, config: Any, dtype: torch.dtype, device: Any) -> None:
        super().__init__()
        h, kw = config.hidden_size, {"dtype": dtype, "device": device}
        self.num_heads = config.num_attention_heads
        self.head_dim = h // self.num_heads
        self.qkv = nn.Linear(h, 3 * h, **kw)  # HF's query, key, value stacked
        self.attn_out = nn.Linear(h, h, **kw)
        self.attn_norm = nn.LayerNorm(h, eps=config.layer_norm_eps, **kw)
        self.up = nn.Linear(h, config.intermediate_size, **kw)
        self.down = nn.Linear(config.intermediate_size, h, **kw)
        self.out_norm = nn.LayerNorm(h, eps=config.layer_norm_eps, **kw)
        act = getattr(config, "hidden_act", "gelu")
        if act not in _ACTIVATIONS:
            raise ValueError(f"model: BERT hidden_act {act!r} is not supported ({', '.join(_ACTIVATIONS)})")
        self.act = _ACTIVATIONS[act]

    def forward(self, x: torch.Tensor, batch: "PaddedBatch") -> torch.Tensor:
        b, length, n, d = batch.num_reqs, batch.max_len, self.num_heads, self.head_dim
        qkv = batch.pad(self.qkv(x)).view(b, length, 3, n, d).permute(2, 0, 3, 1, 4)  # [3, B, n, L, d]
        attn = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=batch.key_mask)
        attn = batch.unpad(attn.transpose(1, 2).reshape(b, length, n * d))
        x = self.attn_norm(x + self.attn_out(attn))
        return self.out_norm(x + self.down(self.act(self.up(x))))


class PaddedBatch:
    """Where each token of the flat batch sits in the padded [B, L] layout that attention uses."""

    def __init__(self, seq_lens: list[int], device: torch.device) -> None:
        self.num_reqs, self.max_len = len(seq_lens), max(seq_lens)
        self.num_tokens = sum(seq_lens)
        lens = torch.tensor(seq_lens, device=device)
        starts = torch.cumsum(lens, 0) - lens
        owner = torch.repeat_interleave(torch.arange(self.num_reqs, device=device), lens)
        offset = torch.arange(self.num_tokens, device=device) - starts[owner]
        self.positions = offset
        self.index = owner * self.max_len + offset  # flat token -> padded row
        self.uniform = min(seq_lens) == self.max_len
        # [B, 1, 1, L]: True where a key is a real token; None when no request is padded.
        self.key_mask = None if self.uniform else \
            (torch.arange(self.max_len, device=device)[None, :] < lens[:, None])[:, None, None, :]

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        if self.uniform:
            return x
        out = x.new_zeros(self.num_reqs * self.max_len, x.shape[-1])
        return out.index_copy_(0, self.index, x)

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(self.num_reqs * self.max_len, -1)
        return x if self.uniform else x.index_select(0, self.index)


class BertModel(nn.Module):
    """Constructor as every model class: cls(config, dtype=None, device=None)."""

    def __init__(self, config: Any, dtype: Optional[torch.dtype] = None, device: Any = None) -> None:
        super().__init__()
        dtype = dtype or torch.get_default_dtype()
        self.config = config
        self.embeddings = BertEmbeddings(config, dtype, device)
        self.layers = nn.ModuleList(BertLayer(config, dtype, device) for _ in range(config.num_hidden_layers))

    def forward(self, input_ids: torch.Tensor, seq_lens: list[int],
                token_type_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """input_ids: [T], the requests' whole prompts back to back. Returns the last hidden states [T, H]."""
        batch = PaddedBatch(seq_lens, input_ids.device)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.embeddings(input_ids, batch.positions, token_type_ids)
        for layer in self.layers:
            x = layer(x, batch)
        return x

    # ---- weights ------------------------------------------------------------------------------------------
    _LAYER_NAMES = {"attention.output.dense": "attn_out", "attention.output.LayerNorm": "attn_norm",
                    "intermediate.dense": "up", "output.dense": "down", "output.LayerNorm": "out_norm"}
    _QKV = ("attention.self.query", "attention.self.key", "attention.self.value")

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy HF-named tensors into our parameters; returns the names of the parameters loaded (a fused qkv
        parameter counts once all three of its parts came)."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        qkv_parts: dict[str, int] = {}
        for name, tensor in weights:
            name = name.removeprefix("bert.").replace(".gamma", ".weight").replace(".beta", ".bias")
            target, rows = self._target(name)
            if target is None or target not in params:
                if not name.startswith("pooler.") and not name.endswith("position_ids"):
                    logger.warning("BERT checkpoint tensor %s is not used", name)
                continue
            param = params[target]
            if rows is None:
                param.copy_(tensor.to(param.dtype))
                loaded.add(target)
            else:
                size = param.shape[0] // 3
                param[rows * size:(rows + 1) * size].copy_(tensor.to(param.dtype))
                qkv_parts[target] = qkv_parts.get(target, 0) + 1
                if qkv_parts[target] == 3:
                    loaded.add(target)
        return loaded

    def _target(self, name: str) -> tuple[Optional[str], Optional[int]]:
        """Our parameter name for an HF name, and which third of the fused qkv it fills (None: all of it)."""
        if name.startswith("embeddings."):
            return name, None
        if not name.startswith("encoder.layer."):
            return None, None
        index, rest = name[len("encoder.layer."):].split(".", 1)
        module, leaf = rest.rsplit(".", 1)
        if module in self._QKV:
            return f"layers.{index}.qkv.{leaf}", self._QKV.index(module)
        if module in self._LAYER_NAMES:
            return f"layers.{index}.{self._LAYER_NAMES[module]}.{leaf}", None
        return None, None
