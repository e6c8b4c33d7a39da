"""ArchConfig: the facts of a model's architecture, read once from its transformers config.

Every room (model files, loader, worker, engine checks) reads these fields instead of re-deriving them from
the HF config, whose spelling differs between families and transformers versions (`head_dim` present or not,
`num_key_value_heads` absent for MHA, rope base in `rope_theta` or `rope_parameters`, sliding windows behind
flags or per-layer types, EOS as an int or a list). A new family that spells a fact differently changes
`from_hf` only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

FULL, SLIDING = "full_attention", "sliding_attention"


def _rope_dict(params: Any, legacy_theta: Any, legacy_scaling: Any) -> tuple[float, dict]:
    """(theta, scaling dict with a 'rope_type' key) from one rope parameter dict (transformers 5) or the legacy
    `rope_theta` / `rope_scaling` pair (whose type key was 'type' before 'rope_type')."""
    params = dict(params or {})
    theta = params.get("rope_theta") or legacy_theta or 10000.0
    scaling = params if params else dict(legacy_scaling or {})
    scaling["rope_type"] = scaling.get("rope_type") or scaling.get("type") or "default"
    if scaling["rope_type"] == "none":
        scaling["rope_type"] = "default"
    scaling.pop("rope_theta", None)
    if scaling["rope_type"] == "mrope":  # older Qwen2-VL configs: M-RoPE is default RoPE with 3 position rows
        scaling["rope_type"] = "default"
    return float(theta), scaling


def _eos_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value)
    return (int(value),)


def _config_window(config: Any) -> Optional[int]:
    """The window the config asks for, or None. Qwen2/Qwen3 carry `sliding_window` but use it only with
    `use_sliding_window`; Mistral and Gemma use it whenever it is set."""
    window = getattr(config, "sliding_window", None)
    if not window or getattr(config, "use_sliding_window", True) is False:
        return None
    return int(window)


def text_config_of(config: Any) -> Any:
    """The language model's config: a vision-language config's `text_config` (LLaVA, Qwen2-VL), else itself."""
    text = getattr(config, "text_config", None)
    if text is not None and getattr(config, "num_hidden_layers", None) is None:
        return text
    return config


@dataclass(frozen=True)
class ArchConfig:
    architecture: str  # config.architectures[0] (or the registry's name for the model_type)
    model_type: str
    hidden_size: int
    intermediate_size: int  # the dense MLP's width (a MoE model: its dense layers', else 0)
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position: int
    rms_norm_eps: float
    hidden_act: str
    tie_word_embeddings: bool
    eos_token_ids: tuple[int, ...]  # the config's EOS ids (first = the main one); () when it names none
    rope_theta: float
    rope_scaling: dict  # with a 'rope_type' key ('default' when unscaled)
    partial_rotary_factor: float
    # Sliding-window attention: the window, and each layer's type (FULL or SLIDING). No window: all FULL.
    sliding_window: Optional[int]
    layer_types: tuple[str, ...]
    # Rope of the sliding layers when it differs from the full layers' (Gemma 3's local base), else None.
    local_rope_theta: Optional[float] = None
    local_rope_scaling: Optional[dict] = None
    # Gemma-style extras (None / default when the family has none).
    query_pre_attn_scalar: Optional[float] = None
    attn_logit_softcapping: Optional[float] = None
    final_logit_softcapping: Optional[float] = None
    # Mixture of experts (0 when dense).
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    moe_renormalize: bool = False  # top-k weights renormalized to sum to 1 (Mixtral always; Qwen: norm_topk_prob)
    # M-RoPE (Qwen2-VL): the rotary frequencies split into (temporal, height, width) sections; None: 1-D RoPE.
    mrope_section: Optional[tuple[int, ...]] = None

    @classmethod
    def from_hf(cls, config: Any, architecture: Optional[str] = None) -> "ArchConfig":
        archs = getattr(config, "architectures", None) or []
        top, config = config, text_config_of(config)  # a vision-language model: its language model's facts
        g = lambda name, default=None: getattr(config, name, default)  # noqa: E731
        heads = int(config.num_attention_heads)
        layers = int(config.num_hidden_layers)
        window = _config_window(config)
        types = tuple(g("layer_types") or ()) or ((SLIDING if window else FULL),) * layers
        if len(types) != layers:
            raise ValueError(f"the model config lists {len(types)} layer_types for {layers} layers")
        if window is None or all(t == FULL for t in types):
            window, types = None, (FULL,) * layers
        params = g("rope_parameters") or {}
        local_theta = local_scaling = None
        if FULL in params or SLIDING in params:  # per-layer-type rope (Gemma 3)
            theta, scaling = _rope_dict(params.get(FULL) or params.get(SLIDING), None, None)
            if SLIDING in params:
                local_theta, local_scaling = _rope_dict(params[SLIDING], None, None)
        else:
            theta, scaling = _rope_dict(params, g("rope_theta"), g("rope_scaling"))
            if g("rope_local_base_freq"):
                local_theta, local_scaling = float(g("rope_local_base_freq")), {"rope_type": "default"}
        partial = g("partial_rotary_factor") or scaling.pop("partial_rotary_factor", None) or 1.0
        mrope_section = scaling.pop("mrope_section", None)
        # Qwen2-VL's text config has no tie_word_embeddings of its own: the top-level config's holds.
        tie = g("tie_word_embeddings")
        return cls(
            architecture=architecture or (archs[0] if archs else ""),
            model_type=str(g("model_type", "")),
            hidden_size=int(config.hidden_size),
            intermediate_size=int(g("intermediate_size") or 0),
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=int(g("num_key_value_heads") or heads),
            head_dim=int(g("head_dim") or config.hidden_size // heads),
            vocab_size=int(config.vocab_size),
            max_position=int(g("max_position_embeddings") or 2048),
            rms_norm_eps=float(g("rms_norm_eps") or 1e-6),
            hidden_act=str(g("hidden_activation") or g("hidden_act") or "silu"),
            tie_word_embeddings=bool(getattr(top, "tie_word_embeddings", False) if tie is None else tie),
            eos_token_ids=_eos_ids(g("eos_token_id")),
            rope_theta=theta,
            rope_scaling=scaling,
            partial_rotary_factor=float(partial),
            sliding_window=window,
            layer_types=types,
            local_rope_theta=local_theta,
            local_rope_scaling=local_scaling,
            query_pre_attn_scalar=g("query_pre_attn_scalar"),
            attn_logit_softcapping=g("attn_logit_softcapping"),
            final_logit_softcapping=g("final_logit_softcapping"),
            num_experts=int(g("num_local_experts") or g("num_experts") or 0),
            num_experts_per_tok=int(g("num_experts_per_tok") or 0),
            # Mixtral's experts are intermediate_size wide (it has no moe_intermediate_size).
            moe_intermediate_size=int(g("moe_intermediate_size") or (g("intermediate_size") if g("num_local_experts")
                                                                      else 0) or 0),
            shared_expert_intermediate_size=int(g("shared_expert_intermediate_size") or 0),
            moe_renormalize=(bool(g("norm_topk_prob", False)) if g("moe_intermediate_size")
                             else bool(g("num_local_experts"))),
            mrope_section=tuple(int(v) for v in mrope_section) if mrope_section else None,
        )

    def layer_window(self, layer: int) -> Optional[int]:
        """The attention window of one layer (None: full attention)."""
        return self.sliding_window if self.layer_types[layer] == SLIDING else None

    def layer_rope(self, layer: int) -> tuple[float, dict]:
        """(theta, scaling) of one layer's rotary embedding."""
        if self.layer_types[layer] == SLIDING and self.local_rope_theta is not None:
            return self.local_rope_theta, dict(self.local_rope_scaling or {"rope_type": "default"})
        return self.rope_theta, dict(self.rope_scaling)

    @property
    def mlp_width(self) -> int:
        """The widest MLP activation per token (buffer sizing): the dense MLP, or the routed experts plus the
        shared one."""
        moe = self.num_experts_per_tok * self.moe_intermediate_size + self.shared_expert_intermediate_size
        return max(self.intermediate_size, moe)
