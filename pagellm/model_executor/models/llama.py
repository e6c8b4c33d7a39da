"""Llama-family decoder: Llama 2/3/3.1, Mistral, Qwen2, SmolLM2 (all the same code, differing only in config).

Constructor convention (every model class in models/): `cls(config, dtype=None, device=None, quant_config=None)`
builds the module with uninitialized parameters (norm weights are ones) of `dtype` directly on `device`; a loader
then fills them through `load_weights`. Nothing is allocated twice and nothing is cast afterwards. With a
`quant_config` the linear layers hold that format's tensors instead (each layer is told its checkpoint name,
`prefix`, so a format can leave some layers in float).

Interface the model runner relies on: models/interface.py (forward, compute_logits, load_weights). The config's
facts are read once into an ArchConfig (pagellm/arch_config.py); a family that differs in a block subclasses
LlamaForCausalLM and builds its own decoder layer in `build_model` (models/gemma3.py).

Checkpoint names are HF's; q/k/v go into one qkv_proj and gate/up into one gate_up_proj through the merged
layers' weight_loader hooks.

Parallelism: under tensor parallelism the layers shard themselves (layers/linear.py, layers/embedding.py);
each attention layer holds its rank's heads. Under pipeline parallelism a stage builds only its decoder layers
(the others are empty `PPMissingLayer`s, so parameter names stay the checkpoint's), the first stage the
embedding, the last the final norm and LM head; `forward` then takes the previous stage's hidden states and
residual (`intermediate`) and, on a stage that is not last, returns both as `IntermediateTensors`. With one
stage (the default) nothing of this is visible.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Iterable, Optional

import torch
from torch import nn

from pagellm.arch_config import ArchConfig
from pagellm.attention import Attention, AttentionMetadata
from pagellm.attention.fp8_kv import load_kv_scale
from pagellm.distributed.parallel_state import get_pp_group, pp_layer_range
from pagellm.model_executor.layers.activation import get_act_and_mul
from pagellm.model_executor.layers.embedding import LMHead, VocabEmbedding
from pagellm.model_executor.layers.linear import (MergedLinear, QKVLinear, RowParallelLinear, input_quant_dtype,
                                                  materialize)
from pagellm.model_executor.layers.norm import RMSNorm
from pagellm.model_executor.layers.quantization.base import QuantizationConfig
from pagellm.model_executor.layers.rotary import RotaryEmbedding, get_rope
from pagellm.model_executor.models.utils import IntermediateTensors, PPMissingLayer

logger = logging.getLogger(__name__)

# checkpoint projection name -> (our merged module name, shard id)
STACKED_PARAMS = {
    "q_proj": ("qkv_proj", "q"),
    "k_proj": ("qkv_proj", "k"),
    "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}

# Checkpoint tensors that carry no weights of ours (recomputed buffers of old checkpoints).
_IGNORED = re.compile(r"(rotary_emb\.inv_freq|rotary_emb\.cos_cached|rotary_emb\.sin_cached)$")


class LlamaMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str, bias: bool = False,
                 dtype=None, device=None, quant_config: Optional[QuantizationConfig] = None, prefix: str = "") -> None:
        super().__init__()
        self.gate_up_proj = MergedLinear(hidden_size, [intermediate_size] * 2, bias, dtype, device,
                                         quant_config=quant_config, prefix=f"{prefix}.gate_up_proj")
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, bias, dtype, device, quant_config,
                                           f"{prefix}.down_proj")
        self.act_fn = get_act_and_mul(hidden_act)

    @property
    def input_quant_dtype(self) -> Optional[torch.dtype]:
        """The 8-bit dtype gate_up_proj quantizes its input to (W8A8; the norm before may do it), else None."""
        return input_quant_dtype(self.gate_up_proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x), input_quant_dtype(self.down_proj)))


class LlamaAttention(nn.Module):
    """qkv_proj -> (optional per-head q/k norm: Qwen3, Gemma 3) -> RoPE -> paged attention -> o_proj.

    `layer` picks the layer's attention window (ArchConfig.layer_window); `norm_cls` the q/k norm's kind;
    `scale` the softmax scale (default head_dim ** -0.5)."""

    def __init__(self, arch: ArchConfig, layer: int, qkv_bias: bool, o_bias: bool, qk_norm: bool = False,
                 dtype=None, device=None, rotary_emb: Optional[RotaryEmbedding] = None,
                 quant_config: Optional[QuantizationConfig] = None, prefix: str = "",
                 norm_cls: type[nn.Module] = RMSNorm, scale: Optional[float] = None) -> None:
        super().__init__()
        self.hidden_size = arch.hidden_size
        num_heads = arch.num_heads
        self.head_dim = arch.head_dim
        self.qkv_proj = QKVLinear(self.hidden_size, self.head_dim, num_heads, arch.num_kv_heads, qkv_bias, dtype,
                                  device, quant_config, f"{prefix}.qkv_proj")
        # This rank's heads (all of them without tensor parallelism).
        self.num_heads = self.qkv_proj.num_heads
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.o_proj = RowParallelLinear(num_heads * self.head_dim, self.hidden_size, o_bias, dtype, device,
                                        quant_config, f"{prefix}.o_proj")
        if qk_norm:
            self.q_norm = norm_cls(self.head_dim, arch.rms_norm_eps, dtype, device)
            self.k_norm = norm_cls(self.head_dim, arch.rms_norm_eps, dtype, device)
        else:
            self.q_norm = self.k_norm = None
        # One table per rope serves every layer: LlamaModel builds it once and passes it in.
        self.rotary_emb = rotary_emb if rotary_emb is not None else get_rope(arch, layer=layer, device=device)
        self.attn = Attention(self.num_heads, self.head_dim, self.num_kv_heads,
                              scale if scale is not None else self.head_dim**-0.5, device,
                              sliding_window=arch.layer_window(layer))

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, kv_cache: torch.Tensor,
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.qkv_proj(hidden).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.q_norm is not None:
            t = q.shape[0]
            q = self.q_norm(q.reshape(t, self.num_heads, self.head_dim)).view(t, self.q_size)
            k = self.k_norm(k.reshape(t, self.num_kv_heads, self.head_dim)).view(t, self.kv_size)
        q, k = self.rotary_emb(positions, q, k)
        out = self.attn(q, k, v.contiguous(), kv_cache, attn_metadata)
        return self.o_proj(out)


def dense_mlp(config: Any, layer_idx: int, dtype=None, device=None,
              quant_config: Optional[QuantizationConfig] = None, prefix: str = "") -> nn.Module:
    """The feed-forward block of a Llama layer (a model class's `make_mlp`; MoE families swap in their own)."""
    return LlamaMLP(config.hidden_size, config.intermediate_size, getattr(config, "hidden_act", "silu"),
                    bool(getattr(config, "mlp_bias", False)), dtype, device, quant_config, prefix)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, arch: ArchConfig, layer: int, qkv_bias: bool, o_bias: bool, mlp_bias: bool = False,
                 qk_norm: bool = False, dtype=None, device=None, rotary_emb: Optional[RotaryEmbedding] = None,
                 quant_config: Optional[QuantizationConfig] = None, prefix: str = "",
                 mlp: Optional[nn.Module] = None) -> None:
        """`mlp`: the feed-forward block when a family's differs (Mixture-of-Experts), else Llama's."""
        super().__init__()
        self.self_attn = LlamaAttention(arch, layer, qkv_bias, o_bias, qk_norm, dtype, device, rotary_emb,
                                        quant_config, f"{prefix}.self_attn")
        self.mlp = mlp if mlp is not None else LlamaMLP(arch.hidden_size, arch.intermediate_size, arch.hidden_act,
                                                        mlp_bias, dtype, device, quant_config, f"{prefix}.mlp")
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, dtype, device)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, dtype, device)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, residual: Optional[torch.Tensor],
                kv_cache: torch.Tensor, attn_metadata: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        # A W8A8 linear after a norm gets its input quantized by the norm, in the same pass.
        qkv_quant = input_quant_dtype(self.self_attn.qkv_proj)
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden, quant_dtype=qkv_quant)
        else:
            hidden, residual = self.input_layernorm(hidden, residual, qkv_quant)
        hidden = self.self_attn(positions, hidden, kv_cache, attn_metadata)
        hidden, residual = self.post_attention_layernorm(hidden, residual, input_quant_dtype(self.mlp))
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    """Embedding -> decoder layers -> final norm. `make_layer(layer, rotary_emb, prefix)` builds one decoder
    layer (a family that differs in a block passes its own); `norm_cls` is the final norm's kind."""

    def __init__(self, arch: ArchConfig, make_layer, dtype=None, device=None, need_embedding: bool = False,
                 norm_cls: type[nn.Module] = RMSNorm) -> None:
        super().__init__()
        pp = get_pp_group()
        self.is_first_stage, self.is_last_stage = pp.is_first_rank, pp.is_last_rank
        self.start_layer, self.end_layer = pp_layer_range(arch.num_layers)
        if self.is_first_stage or need_embedding:
            self.embed_tokens = VocabEmbedding(arch.vocab_size, arch.hidden_size, dtype, device)
        else:
            self.embed_tokens = PPMissingLayer()
        # One rotary table per layer type (full layers first: rope_freqs factors apply to them).
        self.rotary_emb = get_rope(arch, device=device)
        ropes = {"full_attention": self.rotary_emb}
        for i, kind in enumerate(arch.layer_types):
            if kind not in ropes:
                ropes[kind] = get_rope(arch, layer=i, device=device)
        self.layers = nn.ModuleList(
            make_layer(i, ropes[arch.layer_types[i]], f"model.layers.{i}")
            if self.start_layer <= i < self.end_layer else PPMissingLayer()
            for i in range(arch.num_layers)
        )
        self.norm = norm_cls(arch.hidden_size, arch.rms_norm_eps, dtype, device) if self.is_last_stage \
            else PPMissingLayer()
        self.embed_scale: Optional[float] = None  # Gemma multiplies the embeddings by sqrt(hidden_size)

    def forward(self, input_ids: Optional[torch.Tensor], positions: torch.Tensor, kv_caches: list[torch.Tensor],
                attn_metadata: AttentionMetadata, intermediate: Optional[IntermediateTensors] = None,
                inputs_embeds: Optional[torch.Tensor] = None) -> torch.Tensor | IntermediateTensors:
        """kv_caches: one per layer of this stage. `intermediate`: the previous stage's output (later stages).
        `inputs_embeds`: the token embeddings, given instead of input_ids (a vision model's image rows in them)."""
        if intermediate is None:
            hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
            if self.embed_scale is not None:
                hidden = hidden * torch.tensor(self.embed_scale, dtype=hidden.dtype)
            residual = None
        else:
            hidden, residual = intermediate.hidden, intermediate.residual
        for layer, kv_cache in zip(self.layers[self.start_layer:self.end_layer], kv_caches):
            hidden, residual = layer(positions, hidden, residual, kv_cache, attn_metadata)
        if not self.is_last_stage:
            return IntermediateTensors(hidden, residual)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(nn.Module):
    """Llama 2/3/3.1, SmolLM2 (and, by subclass, Mistral and Qwen2)."""

    qk_norm = False
    # A family whose feed-forward differs (MoE): (config, layer_idx, dtype, device, quant_config, prefix) -> module.
    make_mlp = None

    def __init__(self, config: Any, dtype: Optional[torch.dtype] = None,
                 device: Optional[torch.device | str] = None,
                 quant_config: Optional[QuantizationConfig] = None) -> None:
        super().__init__()
        self.config = config
        self.arch = arch = ArchConfig.from_hf(config)
        dtype = dtype or torch.get_default_dtype()
        self.tie_word_embeddings = arch.tie_word_embeddings
        last_stage = get_pp_group().is_last_rank
        self.model = self.build_model(arch, dtype, device, quant_config,
                                      need_embedding=self.tie_word_embeddings and last_stage)
        if last_stage:
            self.lm_head = LMHead(arch.hidden_size, arch.vocab_size, dtype, device,
                                  tie_to=self.model.embed_tokens if self.tie_word_embeddings else None)
        else:
            self.lm_head = PPMissingLayer()
        # Checkpoint names under these prefixes belong to other pipeline stages: skipped, never read.
        self._other_stages = tuple(name + "." for name, m in self.named_modules() if isinstance(m, PPMissingLayer))

    def build_model(self, arch: ArchConfig, dtype, device, quant_config, need_embedding: bool) -> nn.Module:
        """The decoder stack; a family whose layers differ overrides this (or only `make_layer`)."""
        qkv_bias, o_bias = self.attention_biases(self.config)
        mlp_bias = bool(getattr(self.config, "mlp_bias", False))

        def make_layer(i: int, rotary_emb: RotaryEmbedding, prefix: str) -> nn.Module:
            mlp = (self.make_mlp(self.config, i, dtype, device, quant_config, f"{prefix}.mlp")
                   if self.make_mlp is not None else None)
            return LlamaDecoderLayer(arch, i, qkv_bias, o_bias, mlp_bias, self.qk_norm, dtype, device, rotary_emb,
                                     quant_config, prefix, mlp)

        return LlamaModel(arch, make_layer, dtype, device, need_embedding)

    @staticmethod
    def attention_biases(config: Any) -> tuple[bool, bool]:
        """(bias on q/k/v, bias on o_proj). Llama's `attention_bias` puts a bias on all four."""
        bias = bool(getattr(config, "attention_bias", False))
        return bias, bias

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                attn_metadata: AttentionMetadata, intermediate: Optional[IntermediateTensors] = None,
                ) -> torch.Tensor | IntermediateTensors:
        return self.model(input_ids, positions, kv_caches, attn_metadata, intermediate)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    # ---- weights ----------------------------------------------------------------------------------------
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy HF-named checkpoint tensors into our parameters; returns the names of the parameters loaded.

        Unknown checkpoint names are skipped with a warning; a missing parameter is the caller's to report
        (load_model checks the returned set against named_parameters()).
        """
        params = dict(self.named_parameters())
        buffers = dict(self.named_buffers())
        loaded: set[str] = set()
        unknown: list[str] = []
        for name, tensor in weights:
            if _IGNORED.search(name):
                continue
            if name == "lm_head.weight" and self.tie_word_embeddings:
                continue  # tied: the embedding is the head
            if name == "rope_freqs.weight":  # GGUF (llama.cpp) per-frequency rope factors, Llama 3.1
                self.model.rotary_emb.set_freq_factors(materialize(tensor))  # shared by all layers
                continue
            if self._other_stages and name.startswith(self._other_stages):
                continue  # another pipeline stage's weight
            if load_kv_scale(buffers, name, tensor):
                continue  # an FP8 KV-cache scale (a buffer of the layer's Attention)
            target, shard_id = name, None
            parts = name.split(".")
            if len(parts) >= 2 and parts[-2] in STACKED_PARAMS:
                merged, shard_id = STACKED_PARAMS[parts[-2]]
                target = ".".join(parts[:-2] + [merged, parts[-1]])
            param = params.get(target)
            if param is None:
                unknown.append(name)
                continue
            loader = getattr(param, "weight_loader", None)
            try:
                if loader is None:
                    if shard_id is not None:
                        raise ValueError("parameter has no weight_loader for a merged shard")
                    param.data.copy_(materialize(tensor))
                elif shard_id is None:
                    loader(param, tensor)
                else:
                    loader(param, tensor, shard_id)
            except ValueError as e:
                raise ValueError(f"loading checkpoint tensor {name!r} into {target!r}: {e}") from None
            # A merged parameter counts as loaded only when all of its shards are.
            loaded.add(target if shard_id is None else f"{target}#{shard_id}")
        if unknown:
            shown = ", ".join(unknown[:8]) + (f", ... ({len(unknown)} in all)" if len(unknown) > 8 else "")
            logger.warning("checkpoint tensors with no matching parameter were skipped: %s", shown)
        return self._complete(loaded)

    def _complete(self, loaded: set[str]) -> set[str]:
        """Turn per-shard marks into parameter names, keeping a merged parameter only when every shard came."""
        done = {n for n in loaded if "#" not in n}
        shards: dict[str, set[str]] = {}
        for n in loaded:
            if "#" in n:
                base, shard = n.split("#")
                shards.setdefault(base, set()).add(shard)
        for base, got in shards.items():
            merged = base.split(".")[-2]
            want = {str(s) for m, s in STACKED_PARAMS.values() if m == merged}
            if got >= want:
                done.add(base)
        return done

    def required_params(self) -> dict[str, set[str]]:
        """Our parameter name -> the checkpoint names that fill it (for error messages)."""
        out: dict[str, set[str]] = {}
        for name, _ in self.named_parameters():
            parts = name.split(".")
            srcs = {".".join(parts[:-2] + [proj, parts[-1]])
                    for proj, (m, _s) in STACKED_PARAMS.items() if len(parts) >= 2 and parts[-2] == m}
            out[name] = srcs or {name}
        return out


class MistralForCausalLM(LlamaForCausalLM):
    """Mistral: Llama's layers, each with the config's sliding window (when it sets one)."""


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Qwen2 / Qwen2.5: Llama with a bias on q/k/v (always) and none on o_proj."""

    @staticmethod
    def attention_biases(config: Any) -> tuple[bool, bool]:
        return True, False
