"""Gemma 1, 2 and 3 (text and multimodal): RMSNorm as x * (1 + w), embeddings scaled by sqrt(hidden).

Gemma 2 and 3 add sandwich norms around attention and MLP and query_pre_attn_scalar; Gemma 2
soft-caps attention and output logits; Gemma 3 adds q/k norms and a separate rope base for its
sliding-window layers. Defaults below are transformers' class defaults, which config.json omits.
"""
from __future__ import annotations

import numpy as np

from ...config import FULL_ATTENTION, SLIDING_ATTENTION
from .base import PLAIN_BLOCK_NAMES, SANDWICH_BLOCK_NAMES, Family, Variant, all_full, every_nth_full

_SHARED = dict(head_dim=256, max_position_embeddings=8192, rms_norm_eps=1e-6, pad_token_id=0, eos_token_id=1,
               bos_token_id=2, tie_word_embeddings=True, attention_bias=False)
_GEMMA1 = dict(_SHARED, vocab_size=256000, hidden_size=3072, intermediate_size=24576, num_hidden_layers=28,
               num_attention_heads=16, num_key_value_heads=16, hidden_act="gelu_pytorch_tanh")
_GEMMA2 = dict(_SHARED, vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
               num_attention_heads=8, num_key_value_heads=4, hidden_activation="gelu_pytorch_tanh",
               query_pre_attn_scalar=256, sliding_window=4096, final_logit_softcapping=30.0,
               attn_logit_softcapping=50.0)
_GEMMA3 = dict(_GEMMA2, vocab_size=262208, max_position_embeddings=131072, final_logit_softcapping=None,
               attn_logit_softcapping=None)

# SiglipVisionConfig's class defaults, and Gemma3Config's for the projector keys.
_SIGLIP = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, num_channels=3,
               image_size=224, patch_size=16, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
_GEMMA3_PROJECTOR = dict(mm_tokens_per_image=256, boi_token_index=255_999, eoi_token_index=256_000,
                         image_token_index=262_144)

_GEMMA = dict(norm_offset=1.0, scale_embeddings=True, legacy_activation={"gelu": "gelu_tanh"})
# Gemma 1 blocks are Llama-shaped; Gemma 2 and 3 norm before and after attention and MLP.
_GEMMA1_VARIANT = Variant(_GEMMA1, PLAIN_BLOCK_NAMES, all_full, **_GEMMA)
_GEMMA2_VARIANT = Variant(_GEMMA2, SANDWICH_BLOCK_NAMES, every_nth_full("sliding_window_pattern", 2),
                          sandwich_norms=True, uses_query_pre_attn_scalar=True, **_GEMMA)
_GEMMA3_TRAITS = dict(
    _GEMMA, sandwich_norms=True, qk_norm=True, uses_query_pre_attn_scalar=True,
    default_theta={FULL_ATTENTION: 1_000_000.0, SLIDING_ATTENTION: 10_000.0},
    local_theta_key="rope_local_base_freq", legacy_scaled_types=(FULL_ATTENTION,),
)
_GEMMA3_PATTERN = every_nth_full("sliding_window_pattern", 6)


def _gguf_config(meta: dict, hf_arch: str, config: dict) -> dict:
    """Gemma's GGUF-only keys: the local rope base, the window pattern, llama.cpp's attention scale."""
    arch = meta["general.architecture"]
    local_base = meta.get(f"{arch}.rope.freq_base_swa")
    if local_base is not None:
        config["rope_local_base_freq"] = local_base
    pattern = meta.get(f"{arch}.attention.sliding_window_pattern")
    if isinstance(pattern, list):  # one flag per layer: true = sliding
        config["layer_types"] = [SLIDING_ATTENTION if p else FULL_ATTENTION for p in pattern]
    elif pattern is not None:
        config["sliding_window_pattern"] = pattern
    if arch != "gemma":
        # llama.cpp scales queries by 1/sqrt(head_dim), except in the 27B models (46 layers in
        # Gemma 2, 62 in Gemma 3), which use hidden_size / num_heads.
        big = config.get("num_hidden_layers") in (46, 62)
        config["query_pre_attn_scalar"] = (config["hidden_size"] // config["num_attention_heads"] if big
                                           else config.get("head_dim", 256))
    return config


def _gguf_sanitize(name: str, array: np.ndarray, cfg) -> np.ndarray:
    """llama.cpp stores Gemma norm weights with the +1 already added; take it back off."""
    if name.endswith("norm"):
        return array.astype(np.float32) - np.float32(1)
    return array


GEMMA = Family(
    name="gemma",
    variants={
        "GemmaForCausalLM": _GEMMA1_VARIANT,
        "Gemma2ForCausalLM": _GEMMA2_VARIANT,
        "Gemma3ForCausalLM": Variant(_GEMMA3, SANDWICH_BLOCK_NAMES, _GEMMA3_PATTERN, **_GEMMA3_TRAITS),
        "Gemma3ForConditionalGeneration": Variant(_GEMMA3, SANDWICH_BLOCK_NAMES, _GEMMA3_PATTERN, multimodal=True,
                                                  vision_defaults=_SIGLIP, projector_defaults=_GEMMA3_PROJECTOR,
                                                  **_GEMMA3_TRAITS),
    },
    gguf_arches={"gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM"},
    gguf_config=_gguf_config,
    gguf_sanitize=_gguf_sanitize,
)
