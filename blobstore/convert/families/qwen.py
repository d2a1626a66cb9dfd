"""Qwen2/2.5 (biases on q, k and v) and Qwen3 (per-head q/k RMSNorm, optional attention_bias).

Defaults below are transformers' class defaults, which config.json omits.
"""
from __future__ import annotations

from ...config import FULL_ATTENTION, SLIDING_ATTENTION
from .base import PLAIN_BLOCK_NAMES, Family, Variant

_QWEN2 = dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
              num_attention_heads=32, num_key_value_heads=32, head_dim=None, hidden_act="silu",
              max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=False, use_sliding_window=False,
              sliding_window=4096, max_window_layers=28, pad_token_id=None, bos_token_id=None, eos_token_id=None)
_QWEN3 = dict(_QWEN2, head_dim=128, attention_bias=False)


def _qwen_layers(cfg: dict, num_layers: int) -> list[str]:
    """With use_sliding_window, layers from max_window_layers on use the window."""
    sliding = cfg.get("use_sliding_window") and cfg.get("sliding_window")
    first = cfg.get("max_window_layers", num_layers)
    return [SLIDING_ATTENTION if sliding and i >= first else FULL_ATTENTION for i in range(num_layers)]


QWEN = Family(
    name="qwen",
    variants={
        "Qwen2ForCausalLM": Variant(_QWEN2, PLAIN_BLOCK_NAMES, _qwen_layers, qkv_bias=True),
        "Qwen3ForCausalLM": Variant(_QWEN3, PLAIN_BLOCK_NAMES, _qwen_layers, qk_norm=True),
    },
    gguf_arches={"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"},
)
